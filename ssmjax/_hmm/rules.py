r"""Filter and smoother programs on top of the recursions: custom gradients and ``jax.vmap`` rules.

* The log-likelihood has a custom VJP: one backward pass from the forward pass's residuals
  (:func:`ssmjax._hmm.recursion.loglik_gradients`; the equations are in
  :mod:`ssmjax._hmm.inference`). When the filtered or predicted probabilities also receive
  cotangents, the VJP of the plain forward pass is used instead (exact too).
* Under ``jax.vmap`` with a model shared by the batch (:func:`ssmjax._hmm.strategy.shared_model`),
  the filter's values, its forward pass with residuals, the log-likelihood's gradient and the
  smoother's values run one recursion for the whole batch (``custom_vmap`` rules), in the
  ``"BTK"`` layout ``jax.vmap`` hands over. Otherwise each sequence runs its own recursion, as
  plain ``jax.vmap`` would. The custom_vjp is outside the custom_vmap functions (JAX's
  requirement), so ``jax.grad(jax.vmap(...))`` and ``jax.vmap(jax.grad(...))`` both take them.
  The smoother's derivatives are those of the per-sequence recursion (automatic differentiation).
* fit_em's E-step (:func:`batch_smoother_stats`) runs the same batched recursion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Bool, Float, Int

from .._fit.protocol import unpadded_batch
from . import strategy
from .recursion import _pairwise_sum, backward, forward, loglik_gradients, pair_sums
from .results import HMMFilterResult, HMMPosterior, posterior_treedef

_FILTER = strategy.SINGLE_EMISSIONS["filter"]
_SMOOTHER = strategy.SINGLE_EMISSIONS["smoother"]


def _frozen_outputs(pi, trans, raw, length):
    """Filtered and predicted probabilities of one sequence from a forward pass's rows: rows at
    padded steps repeat step ``length - 1``; ``predicted[t] = filtered[t-1] @ A_{t-1}`` is one
    matrix product outside the loop (removed by the compiler when unused)."""
    valid = (jnp.arange(raw.shape[0]) < length)[:, None]
    last = lax.dynamic_index_in_dim(raw, length - 1, keepdims=False)
    filtered = jnp.where(valid, raw, last)
    if trans.ndim == 3:
        moved = jnp.einsum("ti,tij->tj", filtered[:-1], trans)
    else:
        moved = filtered[:-1] @ trans
    predicted = jnp.where(valid, jnp.concatenate([pi[None], moved]), last)
    return filtered, predicted


def _loglik(peaks, log_cs):
    """:math:`\\log p = \\sum_t (m_t + \\log c_t - m_t)`, each term added pairwise along time."""
    return _pairwise_sum(peaks) + _pairwise_sum(log_cs)


def forward_values(initial_probs, transition_matrix, log_likelihoods, length):
    """Plain (autodiff-able) forward pass of one sequence: ``(loglik, filtered, predicted, fwd)``, with
    the :class:`ssmjax._hmm.recursion.ForwardPass` itself (its rows are the loop's, padding unfrozen)."""
    fwd = forward(initial_probs, transition_matrix, log_likelihoods, length, emissions=_FILTER)
    filtered, predicted = _frozen_outputs(initial_probs, transition_matrix, fwd.filtered, length)
    return _loglik(fwd.peaks, fwd.log_cs), filtered, predicted, fwd


def _per_sequence(fun, in_batched, *args):
    """A rule's fallback: ``jax.vmap`` of the unbatched function (all outputs batched)."""
    out = jax.vmap(fun, in_axes=tuple(0 if b else None for b in in_batched))(*args)
    return out, jax.tree.map(lambda _: True, out)


def _batch_lengths(length, batched, axis_size):
    return length if batched else jnp.broadcast_to(length, (axis_size,))


def _batched_forward(axis_size, in_batched, pi, trans, ll, length):
    lengths = _batch_lengths(length, in_batched[3], axis_size)
    emissions = strategy.batch_emissions(axis_size, ll.shape[-1])
    return lengths, forward(pi, trans, ll, lengths, "BTK", emissions=emissions, freeze=True)


# --------------------------------------------------------------------------- filter


@jax.custom_batching.custom_vmap
def _filter_values(initial_probs, transition_matrix, log_likelihoods, length):
    return forward_values(initial_probs, transition_matrix, log_likelihoods, length)[:3]


@jax.custom_batching.custom_vmap
def _filter_forward(initial_probs, transition_matrix, log_likelihoods, length):
    """``((loglik, filtered, predicted), (raw, peaks, log_cs))``: values and residuals of the VJP."""
    *values, fwd = forward_values(initial_probs, transition_matrix, log_likelihoods, length)
    # Residuals: the loop's rows (padded rows are finite and never read: their weights are 0),
    # not a frozen copy of them, and two scalars a step.
    return tuple(values), (fwd.filtered, fwd.peaks, fwd.log_cs)


def _batched_filter(axis_size, in_batched, pi, trans, ll, length):
    _, fwd = _batched_forward(axis_size, in_batched, pi, trans, ll, length)
    loglik = _loglik(fwd.peaks, fwd.log_cs)
    # residuals batched along their leading axis, as custom_vmap requires: (B, T)
    return (loglik, fwd.filtered, fwd.predicted), (fwd.filtered, fwd.peaks.T, fwd.log_cs.T)


@_filter_values.def_vmap
def _filter_values_vmap(axis_size, in_batched, pi, trans, ll, length):
    if not strategy.shared_model(in_batched, trans):
        return _per_sequence(_filter_values.fun, in_batched, pi, trans, ll, length)
    values, _ = _batched_filter(axis_size, in_batched, pi, trans, ll, length)
    return values, (True, True, True)


@_filter_forward.def_vmap
def _filter_forward_vmap(axis_size, in_batched, pi, trans, ll, length):
    if not strategy.shared_model(in_batched, trans):
        return _per_sequence(_filter_forward.fun, in_batched, pi, trans, ll, length)
    out = _batched_filter(axis_size, in_batched, pi, trans, ll, length)
    return out, ((True, True, True), (True, True, True))


@jax.custom_vjp
def filter_core(initial_probs, transition_matrix, log_likelihoods, length):
    """``(loglik, filtered, predicted)`` of one sequence, with the custom VJP and vmap rules."""
    return _filter_values(initial_probs, transition_matrix, log_likelihoods, length)


def _filter_core_fwd(initial_probs, transition_matrix, log_likelihoods, length):
    pi, trans, ll, n = (p.value for p in (initial_probs, transition_matrix, log_likelihoods, length))
    values, (filtered, peaks, log_cs) = _filter_forward(pi, trans, ll, n)
    return values, (pi, trans, ll, n, filtered, peaks, log_cs)


def _filter_core_bwd(residuals, cotangents):
    pi, trans, ll, length, filtered, peaks, log_cs = residuals
    ct_loglik, ct_filtered, ct_predicted = cotangents
    if not (isinstance(ct_filtered, SymbolicZero) and isinstance(ct_predicted, SymbolicZero)):
        # General case: VJP of the plain forward pass (exact, more memory).
        _, vjp = jax.vjp(lambda p, a, l: forward_values(p, a, l, length)[:3], pi, trans, ll)
        cts = tuple(
            jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c
            for c in (ct_loglik, ct_filtered, ct_predicted)
        )
        return (*vjp(cts), None)
    if isinstance(ct_loglik, SymbolicZero):
        return (None, None, None, None)
    grad_pi, grad_trans, grad_ll = _loglik_grads(pi, trans, ll, length, filtered, peaks, log_cs, ct_loglik)
    return (grad_pi, grad_trans, grad_ll, None)


filter_core.defvjp(_filter_core_fwd, _filter_core_bwd, symbolic_zeros=True)


@jax.custom_batching.custom_vmap
def _loglik_grads(pi, trans, ll, length, filtered, peaks, log_cs, ct):
    r"""Gradients of :math:`\log p` with respect to ``(pi, trans, ll)`` times the cotangent ``ct``."""
    grads = loglik_gradients(trans, ll, length, filtered, peaks, log_cs)
    return tuple(g * ct for g in grads)


@_loglik_grads.def_vmap
def _loglik_grads_vmap(axis_size, in_batched, pi, trans, ll, length, filtered, peaks, log_cs, ct):
    if not (strategy.shared_model(in_batched, trans) and all(in_batched[4:7])):
        return _per_sequence(_loglik_grads.fun, in_batched, pi, trans, ll, length, filtered, peaks, log_cs, ct)
    lengths = _batch_lengths(length, in_batched[3], axis_size)
    scale = _batch_lengths(ct, in_batched[7], axis_size)
    # the cotangents scale the gradient rows as the loop writes them (no further (B, T, K) pass)
    out = backward(
        trans, ll, lengths, peaks.T, log_cs.T, "BTK", filtered=filtered,
        emissions=strategy.batch_emissions(axis_size, ll.shape[-1]), padded_rows_zero=True, row_scale=scale,
    )
    # per sequence (the batch of cotangents is summed by JAX where the model is shared)
    grad_trans = pair_sums(filtered, out.v_next, "BTK") * scale[:, None, None]
    return (out.v_first * scale[:, None], grad_trans, out.rows), (True, True, True)


@jax.jit
def filter_program(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> HMMFilterResult:
    loglik, filtered, predicted = filter_core(initial_probs, transition_matrix, log_likelihoods, length)
    return HMMFilterResult(loglik, filtered, predicted)


# --------------------------------------------------------------------------- smoother


def smoother_parts(initial_probs, transition_matrix, log_likelihoods, length):
    """Forward and backward pass of one sequence: ``(loglik, filtered, predicted, smoothed, v_next)``."""
    fwd = forward(
        initial_probs, transition_matrix, log_likelihoods, length, emissions=_SMOOTHER, floor=True, weights=True
    )
    filtered, predicted = _frozen_outputs(initial_probs, transition_matrix, fwd.filtered, length)
    # beta = 1 from step length-1 on, so the padded rows repeat filtered[length-1].
    bwd = backward(transition_matrix, log_likelihoods, length, fwd.peaks, fwd.log_cs, filtered=filtered, weights=fwd.weights)
    return _loglik(fwd.peaks, fwd.log_cs), filtered, predicted, bwd.rows, bwd.v_next


def _smoother_impl(initial_probs, transition_matrix, log_likelihoods, length) -> HMMPosterior:
    loglik, filtered, predicted, smoothed, v_next = smoother_parts(
        initial_probs, transition_matrix, log_likelihoods, length
    )
    if transition_matrix.ndim == 3:
        expected = jnp.einsum("ti,tj,tij->ij", filtered[:-1], v_next, transition_matrix)
    else:
        expected = transition_matrix * pair_sums(filtered, v_next)
    return HMMPosterior(loglik, filtered, predicted, smoothed, expected)


# Values under ``jax.vmap`` from the batched recursion when the model is shared; derivatives
# (forward and reverse mode) are those of the per-sequence recursion, by automatic
# differentiation (custom_vmap functions have no reverse mode).
@jax.custom_jvp
@jax.custom_batching.custom_vmap
def _smoother_values(initial_probs, transition_matrix, log_likelihoods, length) -> HMMPosterior:
    return _smoother_impl(initial_probs, transition_matrix, log_likelihoods, length)


@_smoother_values.def_vmap
def _smoother_values_vmap(axis_size, in_batched, pi, trans, ll, length):
    if not strategy.shared_model(in_batched, trans):
        return _per_sequence(_smoother_impl, in_batched, pi, trans, ll, length)
    lengths, fwd = _batched_forward(axis_size, in_batched, pi, trans, ll, length)
    bwd = backward(
        trans, ll, lengths, fwd.peaks, fwd.log_cs, "BTK", filtered=fwd.filtered,
        emissions=strategy.batch_emissions(axis_size, ll.shape[-1]),
    )
    expected = trans * pair_sums(fwd.filtered, bwd.v_next, "BTK")
    fields = (_loglik(fwd.peaks, fwd.log_cs), fwd.filtered, fwd.predicted, bwd.rows, expected)
    # unflattened, not constructed: the fields carry a batch axis (no (T, K) annotation check)
    out = jax.tree.unflatten(posterior_treedef(), fields)
    return out, jax.tree.map(lambda _: True, out)


@_smoother_values.defjvp
def _smoother_values_jvp(primals, tangents):
    out, out_dot = jax.jvp(_smoother_impl, primals, tangents)
    return jax.tree.map(_batch_axis_first, out), jax.tree.map(_batch_axis_first, out_dot)


def _batch_axis_first(x):
    """``x``; under ``jax.vmap`` batched along its leading axis, as the custom_vmap rule's outputs.

    JAX assigns a custom_jvp function's batched outputs the batch axes of the function it traced
    first (here the custom_vmap rule: axis 0), also for the outputs of its JVP rule, traced later
    (under ``jax.grad(jax.vmap(...))``); the per-sequence recursion vmapped puts the batch axis of
    scan outputs second. A reshape's batching rule moves the batch axis to the front.
    """
    return lax.squeeze(lax.reshape(x, (1, *x.shape)), (0,))


@jax.jit
def smoother_program(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> HMMPosterior:
    return _smoother_values(initial_probs, transition_matrix, log_likelihoods, length)


@jax.jit
def two_slice_program(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> Float[Array, "T-1 K K"]:
    _, filtered, _, _, v_next = smoother_parts(initial_probs, transition_matrix, log_likelihoods, length)
    return filtered[:-1, :, None] * v_next[:, None, :] * transition_matrix


# --------------------------------------------------------------------------- fit_em's E-step


def batch_smoother_stats(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "K K"],
    log_likelihoods: Float[Array, "T K B"],
    valid: Bool[Array, "T B"],
    fallback: bool = True,
):
    r"""Forward-backward for a padded batch of sequences at once (the E-step of EM).

    ``log_likelihoods`` are state-major, ``[t, k, b]``; ``valid[t, b]`` marks real steps (a prefix
    of each sequence). With ``fallback=False`` the underflow-proof pass is left out of the program
    and an underflow returns a NaN log-likelihood instead (see ``fast_e_step`` in
    ``ssmjax/_fit/protocol.py``).

    Returns ``(smoothed, expected_transitions, loglik)``: smoothed probabilities
    ``(T, B, K)`` (time-major, zero at padded steps), the two-slice marginals summed
    over pairs and sequences ``(K, K)``, and :math:`\sum_b \log p(y^{(b)})`. Equal to
    summing :func:`ssmjax.hmm_smoother` over the batch (``tests/test_hmm_fit.py`` checks it).

    The batched recursion of ``jax.vmap(hmm_smoother)``, in the layout of
    :func:`ssmjax._hmm.strategy.e_step_layout`. Not differentiated (EM needs no gradient);
    stationary ``transition_matrix`` only.
    """
    layout = strategy.e_step_layout(log_likelihoods.shape[1])
    ll = log_likelihoods if layout == "TKB" else jnp.swapaxes(log_likelihoods, 1, 2)
    lengths = jnp.sum(valid, axis=0, dtype=jnp.int32)
    # fit_em knows statically whether its batch is padded: then one loop per pass is compiled
    padded = False if unpadded_batch() else None
    # padded rows are never read (their emission weights are 0): nothing is frozen
    fwd = forward(initial_probs, transition_matrix, ll, lengths, layout, emissions="before-loop", rescue=fallback,
                  padded=padded)
    bwd = backward(
        transition_matrix, ll, lengths, fwd.peaks, fwd.log_cs, layout,
        filtered=fwd.filtered, emissions="before-loop", padded_rows_zero=True, padded=padded,
    )
    expected = transition_matrix * pair_sums(fwd.filtered, bwd.v_next, layout, over_batch=True)
    # per step over the batch, then pairwise over time (both are 0 at padded steps)
    loglik = _pairwise_sum(jnp.sum(fwd.peaks + fwd.log_cs, axis=1))
    if not fallback:
        loglik = jnp.where(jnp.any(fwd.needed), jnp.nan, loglik)
    smoothed = bwd.rows if layout == "TBK" else jnp.swapaxes(bwd.rows, 1, 2)
    return smoothed, expected, loglik
