r"""Exact inference in discrete hidden Markov models.

Forward filtering, forward-backward smoothing, two-slice marginals, Viterbi
decoding, forward-filter backward-sample, fixed-lag smoothing and state
prediction for one sequence. Every function takes the model as three arrays,

* ``initial_probs`` :math:`\pi`, shape ``(K,)``,
* ``transition_matrix`` :math:`A`, shape ``(K, K)`` or time-varying
  ``(T-1, K, K)`` (entry ``t`` moves :math:`z_t` to :math:`z_{t+1}`),
* ``log_likelihoods`` :math:`\ell_t(k) = \log p(y_t \mid z_t = k)`, shape ``(T, K)``,

so any emission model (a neural network too) plugs in through its
log-likelihoods. The time convention and what ``length`` does are stated once in
:mod:`ssmjax._types`; batch with :func:`jax.vmap`.

Padding (``length = L < T``)
    Steps ``t >= L`` are treated as *unobserved and frozen*: their
    log-likelihoods are replaced by zero and the transitions into them by the
    identity (both with ``where`` before any arithmetic, so NaN/inf there never
    reach values or gradients). Hence every per-step posterior output at a padded
    step repeats the value of step ``L - 1`` (``filtered_probs[t] =
    predicted_probs[t] = smoothed_probs[t] = filtered_probs[L-1]`` for
    ``t >= L``), padded two-slice marginals are zero, Viterbi paths and
    posterior samples repeat the state of step ``L - 1``.

Numerics
    The forward pass is scaled: each step's likelihoods are shifted by their
    maximum, :math:`B_t(k) = \exp(\ell_t(k) - m_t)`, so log-likelihoods of any
    magnitude (``-1e4`` per step and beyond) do not underflow. If the
    normaliser of some step still underflows (possible only when every state with
    non-zero predicted probability is hundreds of nats less likely than a
    state of predicted probability zero), the whole pass is redone with a shift
    within :math:`\log 2` of the exact log-sum-exp shift
    :math:`\max_k \ell_t(k) + \log p(z_t=k \mid y_{<t})`, read from the binary
    exponents of the predicted probabilities (no logarithm in the loop).
    The per-step log-normalisers are added with a pairwise sum, so the float32
    log-likelihood of long sequences keeps float64-level relative accuracy.
    Structural zeros in ``initial_probs`` and ``transition_matrix`` are exact:
    no logarithm of a probability is taken on the differentiable path.

Batches (``jax.vmap``)
    Under ``jax.vmap`` with a model shared by the batch (``initial_probs`` and a stationary
    ``transition_matrix`` not batched), :func:`hmm_filter`, :func:`hmm_smoother` and the
    gradient of the log-likelihood run one recursion for the whole batch (custom_vmap rules):
    each loop step advances all sequences with one matrix product, in the layout ``jax.vmap``
    hands over, with the same numerics (per-sequence padding, per-sequence underflow rescue)
    and, to round-off, the same results as the unbatched calls. fit_em's E-step runs the same
    recursion. A batch of models or a time-varying matrix runs the per-sequence recursion
    vectorised, as plain ``jax.vmap`` would. The smoother's derivatives are those of the
    per-sequence recursion (automatic differentiation).

Gradients
    :math:`\log p(y_{1:T})` has a custom VJP built from the scaled backward
    recursion:

    .. math::
        \frac{\partial \log p}{\partial \ell_t(k)} = p(z_t = k \mid y_{1:T}), \quad
        \frac{\partial \log p}{\partial A_{ij}} = \sum_t \frac{\alpha_t(i)\, e^{\ell_{t+1}(j)}
        \beta_{t+1}(j)}{p(y_{1:T})}, \quad
        \frac{\partial \log p}{\partial \pi_i} = \frac{e^{\ell_0(i)}\beta_0(i)}{p(y_{1:T})},

    evaluated with the scaled messages, never dividing by :math:`A_{ij}`, so
    they are exact and finite with structural zeros. The backward scan only
    carries :math:`\hat\beta_t` (padding folded into its inputs, no per-step masking);
    the gradient with respect to :math:`A` is then accumulated by matrix products of
    the filtered probabilities with the backward weights over blocks of rows (no
    (T, K, K) array and no (T, K) weight array for a stationary :math:`A`); memory is
    that of the filtered probabilities, the backward messages and the gradient itself
    (for a stationary :math:`A` the backward scan writes the gradient rows directly and
    carries the :math:`A`-gradient, so no (T, K) messages are stored: peak about 3.6x the
    (T, K) log-likelihoods at T = 1e6, K = 16, float32). When the filtered or predicted
    probabilities also receive cotangents, the VJP of the plain forward scan is
    used instead (exact too).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .. import _checks
from .._fallback import _any_in_batch
from .._fallback import fallback as _fallback

__all__ = [
    "HMMFilterResult",
    "HMMPosterior",
    "hmm_filter",
    "hmm_smoother",
    "hmm_two_slice_marginals",
    "hmm_viterbi",
    "hmm_sample_posterior",
    "hmm_fixed_lag_smoother",
    "hmm_predict",
]


# --------------------------------------------------------------------------- results


class HMMFilterResult(eqx.Module):
    r"""Output of :func:`ssmjax.hmm_filter`.

    Attributes:
        marginal_loglik: :math:`\log p(y_{0:L-1})` (real steps only), shape ().
        filtered_probs: :math:`p(z_t \mid y_{0:t})`, shape (T, K).
        predicted_probs: :math:`p(z_t \mid y_{0:t-1})`; ``predicted_probs[0]`` is
            ``initial_probs``, shape (T, K).

    At padded steps ``t >= length`` both fields repeat ``filtered_probs[length-1]``.
    """

    marginal_loglik: Float[Array, ""]
    filtered_probs: Float[Array, "T K"]
    predicted_probs: Float[Array, "T K"]


class HMMPosterior(eqx.Module):
    r"""Output of :func:`ssmjax.hmm_smoother`: the filter's fields plus smoothed ones.

    Attributes:
        marginal_loglik: :math:`\log p(y_{0:L-1})`, shape ().
        filtered_probs: :math:`p(z_t \mid y_{0:t})`, shape (T, K).
        predicted_probs: :math:`p(z_t \mid y_{0:t-1})`, shape (T, K).
        smoothed_probs: :math:`p(z_t \mid y_{0:L-1})`, shape (T, K).
        expected_transitions: :math:`\sum_{t=0}^{L-2} \xi_t` with
            :math:`\xi_t(i, j) = p(z_t = i, z_{t+1} = j \mid y_{0:L-1})`, shape (K, K).
            Also (K, K) for a time-varying ``transition_matrix``: the sum over
            time of the two-slice marginals (use :func:`ssmjax.hmm_two_slice_marginals`
            for the per-step ones).

    At padded steps ``t >= length`` the per-step fields repeat ``filtered_probs[length-1]``
    (which equals ``smoothed_probs[length-1]``); padded pairs add nothing to
    ``expected_transitions``.
    """

    marginal_loglik: Float[Array, ""]
    filtered_probs: Float[Array, "T K"]
    predicted_probs: Float[Array, "T K"]
    smoothed_probs: Float[Array, "T K"]
    expected_transitions: Float[Array, "K K"]


# --------------------------------------------------------------------------- helpers


def _pairwise_sum(x: Float[Array, " N ..."], axis: int = 0) -> Float[Array, "..."]:
    """Sum along ``axis`` by pairwise (tree) reduction: error O(log N · eps), not O(N · eps)."""
    x = jnp.moveaxis(x, axis, 0)
    n = x.shape[0]
    if n == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    size = 1 << max(n - 1, 0).bit_length()
    x = jnp.pad(x, [(0, size - n)] + [(0, 0)] * (x.ndim - 1))
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    return x[0]


def _safe_log(p: Array) -> Array:
    """``log p`` with ``-inf`` at zeros and a zero (not NaN) gradient there."""
    positive = p > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)), -jnp.inf)


def _finite_or_zero(v: Array) -> Array:
    r"""Replace overflowed backward weights by 0.

    :math:`e^{\ell_t(j)} \hat\beta_t(j) / c_t` overflows only for a state ``j`` that is
    unreachable (all paths into it have probability zero) yet hundreds of nats more
    likely than the reachable ones; every quantity it multiplies is then exactly
    zero, so 0 keeps values exact and avoids ``0 * inf = NaN``. (The derivative of
    the log-likelihood w.r.t. a structural zero leading into such a state is then
    reported as 0 instead of overflowing.)
    """
    return jnp.where(v < jnp.inf, v, 0.0)


def _masks(num_timesteps: int, length: Int[Array, ""]):
    """``valid[t] = t < length`` (real step; for t >= 1 also: pair t-1 -> t is real)."""
    valid = jnp.arange(num_timesteps) < length
    return valid


# Up to this many states a vector-matrix product in a scan step is a fused multiply-sum
# (no call into a matmul kernel): measured ~10% faster smoother steps at K = 16 on CPU.
_FUSED_MATVEC_MAX_STATES = 16


def _vecmat(x: Float[Array, "*B K"], matrix: Float[Array, "K M"]) -> Float[Array, "*B M"]:
    """``x @ matrix``; for one vector of a few states a fused multiply-sum (no call into a matmul
    kernel); for a batch of rows ``(B, K)`` always one matrix product (a multiply-sum would be a
    (B, K, M) elementwise product)."""
    if x.ndim == 1 and x.shape[0] <= _FUSED_MATVEC_MAX_STATES:
        return jnp.sum(x[:, None] * matrix, axis=0)
    return x @ matrix


def _next_transitions(transition_matrix: Float[Array, "*S K K"], num_timesteps: int):
    """Scan input ``A_t`` (from ``z_t`` to ``z_{t+1}``) for ``t = 0..T-1`` (entry ``T-1`` unused)."""
    if transition_matrix.ndim == 2:
        return None
    eye = jnp.eye(transition_matrix.shape[-1], dtype=transition_matrix.dtype)
    return jnp.concatenate([transition_matrix, eye[None]])


def _prev_transitions(transition_matrix: Float[Array, "*S K K"], num_timesteps: int):
    """Scan input ``A_{t-1}`` (from ``z_{t-1}`` to ``z_t``) for ``t = 0..T-1`` (entry 0 unused)."""
    if transition_matrix.ndim == 2:
        return None
    eye = jnp.eye(transition_matrix.shape[-1], dtype=transition_matrix.dtype)
    return jnp.concatenate([eye[None], transition_matrix])


def _matvec(matrix: Float[Array, "K K"], x: Float[Array, "*B K"]) -> Float[Array, "*B K"]:
    """``matrix @ x`` for a vector, ``x @ matrix.T`` for a batch of rows ``(B, K)`` (see :func:`_vecmat`)."""
    if x.ndim > 1:
        return x @ matrix.T
    if x.shape[0] <= _FUSED_MATVEC_MAX_STATES:
        return jnp.sum(matrix * x[None, :], axis=1)
    return matrix @ x  # measured 1.25-1.9x faster than x @ matrix.T in a scan step at K = 32-64


def _augmented_transitions(transition_matrix: Float[Array, "*S K K"]):
    """``[A | 1]`` for a stationary ``A``, None for a time-varying one (see :func:`_normalise_step`).

    On the matmul-kernel path (larger ``K``) zero columns pad the width to a multiple of
    8 (measured ~15% faster forward steps at K = 64 than an odd width K + 1).
    """
    num_states = transition_matrix.shape[-1]
    if transition_matrix.ndim == 3:
        return None
    dtype = transition_matrix.dtype
    columns = [transition_matrix, jnp.ones((num_states, 1), dtype)]
    if num_states > _FUSED_MATVEC_MAX_STATES:
        columns.append(jnp.zeros((num_states, -(num_states + 1) % 8), dtype))
    return jnp.concatenate(columns, axis=1)


def _floored(c: Array, floor) -> Array:
    """``c`` where ``c >= floor``, else ``floor`` (also for NaN); ``c`` itself when ``floor`` is None."""
    return c if floor is None else jnp.where(c >= floor, c, floor)


def _normalise_step(w: Array, transition: Float[Array, "K K"], augmented, floor=None, states_axis: int = -1):
    r"""``(filtered, c, next_pred)`` of one forward step from the unnormalised ``w``.

    The forward step of every recursion here: one sequence (``w`` of shape (K,)) or a batch
    advanced together (``w`` of shape (B, K), one matrix product per step, or state-major (K, B)
    with ``states_axis = 0``; see :func:`_batched_forward`).

    ``c = sum(w)``, ``filtered = w / c``, ``next_pred = filtered @ A``. With ``floor``, the
    divisions use ``max(c, floor)`` (``c`` itself is returned): a pass whose ``c`` falls
    below the floor is discarded, and the floor keeps the cotangents of the discarded pass
    (zero) from meeting ``1 / 0`` under autodiff. With ``augmented``
    (``[A | 1]``, stationary ``A``) one product gives :math:`(w A, \sum_k w_k)`, a kernel
    less per loop step (the sum is two kernels at larger ``K``). This matters beyond the
    saved kernel: XLA's CPU runtime runs a loop body of more than 8 kernels concurrently
    on its thread pool, whose hand-offs cost more than the work (measured 3x slower at
    K = 64), and this keeps the forward bodies at 7 or fewer.
    """
    def _per_state(x):  # a per-sequence scalar against (K,) (a plain scalar) or a block
        return x if w.ndim == 1 else jnp.expand_dims(x, states_axis)

    if augmented is None:
        c = jnp.sum(w, axis=states_axis)
        filtered = w / _per_state(_floored(c, floor))
        return filtered, c, _states_product(filtered, transition, states_axis)
    num_states = w.shape[states_axis]
    moved = _states_product(w, augmented, states_axis)
    c = lax.index_in_dim(moved, num_states, states_axis, keepdims=False)
    divisor = _per_state(_floored(c, floor))
    return w / divisor, c, lax.slice_in_dim(moved, 0, num_states, axis=states_axis) / divisor


def _transition_xs(transition_matrix, num_timesteps):
    """Per-pair transition matrices as scan inputs over ``T-1`` steps (None when stationary)."""
    return transition_matrix if transition_matrix.ndim == 3 else None


def _pick(transition_matrix, a_t):
    return transition_matrix if a_t is None else a_t


def _exponent_split(probs: Float[Array, " K"]):
    r"""``(log_scale, scale)`` with ``probs = mantissa * 2^e``, ``log_scale = e log 2``, ``scale = 2^{-e}``.

    Read from the floating-point exponent bits (exact, no logarithm): ``probs * scale``
    lies in ``[1/2, 1)`` for normal numbers; zeros and subnormals get the smallest
    normal exponent (``scale`` stays finite) and exact zeros ``e = 0`` (``scale = 1``, so
    derivatives with respect to a zero probability keep their natural scale).
    """
    dtype = probs.dtype
    finfo = jnp.finfo(dtype)
    nmant = int(finfo.nmant)
    bias = int(finfo.maxexp) - 1
    itype = jnp.int32 if finfo.bits == 32 else jnp.int64
    bits = lax.bitcast_convert_type(lax.stop_gradient(probs), itype)
    biased = jnp.maximum((bits >> nmant) & ((1 << finfo.nexp) - 1), 1)
    biased = jnp.where(probs == 0, bias - 1, biased)
    log_scale = (biased - (bias - 1)).astype(dtype) * jnp.asarray(math.log(2.0), dtype)
    scale = lax.bitcast_convert_type((2 * bias - 1 - biased) << nmant, dtype)
    return log_scale, scale


def _condition(pred: Float[Array, " K"], ll: Float[Array, " K"]):
    r"""One scaled Bayes update that cannot underflow.

    Returns ``(filtered, log_c)`` with ``log_c = log p(y_t | y_{<t}) - max_k ll_k``.
    The shift is :math:`s = \max_k (\ell_k - m + e_k \log 2)` over states with
    ``pred > 0`` (``e_k`` the binary exponent of ``pred_k``, ``m = max_k ll_k``): an
    approximation of :math:`\max_k \log(\text{pred}_k e^{\ell_k - m})` to within
    :math:`\log 2`, so the largest scaled term lies in ``[1/2, 1]`` and the normaliser
    in ``[1/2, K]`` whatever the magnitudes. ``m`` and ``s`` carry no gradient.
    """
    peak = lax.stop_gradient(jnp.max(ll))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    rel = ll - peak
    log_scale, scale = _exponent_split(pred)
    score = rel + log_scale
    shift = lax.stop_gradient(jnp.max(jnp.where(pred > 0, score, -jnp.inf)))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    arg = score - shift
    # arg <= 0 wherever pred > 0; the clamp only guards 0 * inf for states with pred = 0,
    # whose exponential is set to 0 outright: its derivative (the exponential itself) would
    # otherwise be ~1e308 and turn a zero cotangent into NaN under autodiff.
    clip = jnp.asarray(math.log(jnp.finfo(ll.dtype).max) - 1.0, ll.dtype)
    w = (pred * scale) * jnp.exp(jnp.where(pred > 0, jnp.where(arg > clip, clip, arg), -jnp.inf))
    c = jnp.sum(w)
    filtered = w / jnp.where(c > 0, c, 1.0)
    return filtered, jnp.log(c) + shift, peak


def _state_max(x: Array, axis: int = 1) -> Array:
    """``max(x, axis)`` over the states axis; for a few states as elementwise maxima of slices.

    XLA's CPU row reduction over a short minor axis is slow (measured 0.15 ms at
    T = 1e4, K = 4, about a third of a whole forward pass; the elementwise form is ~3x faster).
    """
    num_states = x.shape[axis]
    if num_states <= 8:
        return functools.reduce(jnp.maximum, [lax.index_in_dim(x, k, axis, keepdims=False) for k in range(num_states)])
    return jnp.max(x, axis=axis)


def _step_peaks(masked_ll: Float[Array, "T K"], valid: Array) -> Float[Array, " T"]:
    """Per-step shift ``max_k ll_t(k)`` (0 at padded steps and where it is not finite), no gradient."""
    peaks = lax.stop_gradient(_state_max(jnp.where(valid[:, None], masked_ll, 0.0)))
    return jnp.where(jnp.isfinite(peaks), peaks, 0.0)


def _robust_forward_scan(initial_probs, transition_matrix, masked_ll, valid):
    """Forward recursion with the underflow-proof shift of :func:`_condition`: ``(filtered, peaks, log_cs)``."""
    a_xs = _next_transitions(transition_matrix, masked_ll.shape[0])

    def _robust_step(pred, x):
        ll, is_valid, a_t = x
        ll = jnp.where(is_valid, ll, 0.0)
        filtered, log_c, peak = _condition(pred, ll)
        return _vecmat(filtered, _pick(transition_matrix, a_t)), (filtered, peak, log_c)

    _, out = lax.scan(_robust_step, initial_probs, (masked_ll, valid, a_xs))
    return out


def _underflow_threshold(dtype) -> float:
    """``log sqrt(tiny)``: a normaliser ``c_t < sqrt(tiny)`` sends a pass to :func:`_robust_forward_scan`."""
    return 0.5 * math.log(float(jnp.finfo(dtype).tiny))


def _forward_scan(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    masked_ll: Float[Array, "T K"],
    valid=None,
):
    """Scaled forward recursion over all ``T`` steps (no per-step padding logic).

    Returns ``(filtered, peaks, log_cs)`` with ``log c_t = peaks[t] + log_cs[t]``.
    Padded rows (``masked_ll = 0`` there) hold finite values that callers overwrite.
    The fast pass shifts each step by ``max_k ll_t(k)``; only if some normaliser
    underflows is the pass redone with the shift of :func:`_condition`.
    """
    a_xs = _next_transitions(transition_matrix, masked_ll.shape[0])
    if valid is None:
        valid = jnp.ones(masked_ll.shape[:1], bool)
    peaks = _step_peaks(masked_ll, valid)

    augmented = _augmented_transitions(transition_matrix)

    def _fast_step(pred, x):
        ll, is_valid, peak, a_t = x
        # masking here, not on a (T, K) copy of the input (one buffer less)
        ll = jnp.where(is_valid, ll, 0.0)
        w = pred * jnp.exp(ll - peak)
        # No guard on c: c = 0 (or NaN) only where the fast pass fails, which sends
        # the whole pass to the robust one below. Any extra op here (a ``where`` or a
        # clamp on c) adds a kernel to the loop body (see :func:`_normalise_step`).
        filtered, c, pred_next = _normalise_step(w, _pick(transition_matrix, a_t), augmented)
        return pred_next, (filtered, jnp.log(c))

    def _fast():
        _, (filtered, log_cs) = lax.scan(_fast_step, initial_probs, (masked_ll, valid, peaks, a_xs))
        return filtered, peaks, log_cs

    fast = _fast()
    threshold = _underflow_threshold(masked_ll.dtype)
    # ``not >=`` also catches NaN (a zero normaliser propagates NaN through the fast pass).
    underflow = jnp.logical_not(jnp.all(jnp.where(valid, fast[2], 0.0) >= threshold))
    return _fallback(underflow, fast, _robust_forward_scan, (initial_probs, transition_matrix, masked_ll, valid))


def _forward_impl(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
):
    """Plain (autodiff-able) forward pass.

    Returns ``(loglik, filtered, predicted, peaks, log_cs)``; the per-step
    log-normaliser is ``peaks[t] + log_cs[t]`` (both 0 at padded steps). Padded rows
    of ``filtered`` and ``predicted`` repeat ``filtered[length-1]``.
    """
    num_timesteps = log_likelihoods.shape[0]
    valid = _masks(num_timesteps, length)
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    raw, peaks, log_cs = _forward_scan(initial_probs, transition_matrix, masked_ll)
    last = lax.dynamic_index_in_dim(raw, length - 1, keepdims=False)
    filtered = jnp.where(valid[:, None], raw, last)
    # predicted[t] = filtered[t-1] @ A_{t-1}: one matrix product outside the scan
    # (removed by the compiler when unused, e.g. for the log-likelihood alone).
    if transition_matrix.ndim == 3:
        moved = jnp.einsum("ti,tij->tj", filtered[:-1], transition_matrix)
    else:
        moved = filtered[:-1] @ transition_matrix
    predicted = jnp.concatenate([initial_probs[None], moved])
    predicted = jnp.where(valid[:, None], predicted, last)
    peaks = jnp.where(valid, peaks, 0.0)
    log_cs = jnp.where(valid, log_cs, 0.0)
    loglik = _pairwise_sum(peaks) + _pairwise_sum(log_cs)
    return loglik, filtered, predicted, peaks, log_cs


def _emission_weights(ll, peak, log_c):
    r"""``exp(ll_t - log c_t)`` (NaN/overflow -> 0, see :func:`_finite_or_zero`)."""
    return _finite_or_zero(jnp.exp((ll - peak) - log_c))


# --------------------------------------------------------------------------- filter with custom VJP


# Under ``jax.vmap`` the filter's values, its forward pass with residuals and its gradient run
# on the batched recursion (custom_vmap rules, see "batched recursion" below) whenever the model
# is shared by the batch (``initial_probs`` and a stationary ``transition_matrix`` unbatched);
# otherwise (a batch of models, a time-varying matrix) each sequence runs its own recursion, as
# plain ``jax.vmap`` would do. The custom_vjp is outside the custom_vmap functions (JAX's
# requirement), so ``jax.grad(jax.vmap(...))`` and ``jax.vmap(jax.grad(...))`` both take them.


def _shared_model(in_batched, transition_matrix) -> bool:
    """Whether a custom_vmap rule can run the batched recursion: the model unbatched (and
    ``transition_matrix`` stationary), the log-likelihoods batched."""
    pi_batched, trans_batched, ll_batched = in_batched[:3]
    return ll_batched and not pi_batched and not trans_batched and transition_matrix.ndim == 2


def _per_sequence(fun, in_batched, *args):
    """The rule's fallback: ``jax.vmap`` of the unbatched function (all outputs batched)."""
    out = jax.vmap(fun, in_axes=tuple(0 if b else None for b in in_batched))(*args)
    return out, jax.tree.map(lambda _: True, out)


def _batch_lengths(length, batched, axis_size):
    return length if batched else jnp.broadcast_to(length, (axis_size,))


@jax.custom_batching.custom_vmap
def _filter_values(initial_probs, transition_matrix, log_likelihoods, length):
    loglik, filtered, predicted, _, _ = _forward_impl(
        initial_probs, transition_matrix, log_likelihoods, length
    )
    return loglik, filtered, predicted


@jax.custom_batching.custom_vmap
def _filter_forward(initial_probs, transition_matrix, log_likelihoods, length):
    """``((loglik, filtered, predicted), (raw, peaks, log_cs))``: values and residuals of the VJP."""
    valid = _masks(log_likelihoods.shape[0], length)
    # ``ll`` is masked inside the scan (``valid``): no (T, K) masked copy is kept.
    raw, peaks, log_cs = _forward_scan(initial_probs, transition_matrix, log_likelihoods, valid)
    loglik, filtered, predicted, _, peaks, log_cs = _filter_outputs(
        initial_probs, transition_matrix, raw, peaks, log_cs, valid, length
    )
    # Residuals: the raw filtered rows (padded rows are never read) and two scalars a step.
    return (loglik, filtered, predicted), (raw, peaks, log_cs)


def _batched_filter(axis_size, in_batched, pi, trans, ll, length):
    lengths = _batch_lengths(length, in_batched[3], axis_size)
    filtered, predicted, peaks, log_cs, _ = _batched_forward(pi, trans, ll, lengths, "BTK")
    loglik = _pairwise_sum(peaks) + _pairwise_sum(log_cs)
    # residuals batched along their leading axis, as custom_vmap requires: (B, T)
    return (loglik, filtered, predicted), (filtered, peaks.T, log_cs.T)


@_filter_values.def_vmap
def _filter_values_vmap(axis_size, in_batched, pi, trans, ll, length):
    if not _shared_model(in_batched, trans):
        return _per_sequence(_filter_values.fun, in_batched, pi, trans, ll, length)
    values, _ = _batched_filter(axis_size, in_batched, pi, trans, ll, length)
    return values, (True, True, True)


@_filter_forward.def_vmap
def _filter_forward_vmap(axis_size, in_batched, pi, trans, ll, length):
    if not _shared_model(in_batched, trans):
        return _per_sequence(_filter_forward.fun, in_batched, pi, trans, ll, length)
    out = _batched_filter(axis_size, in_batched, pi, trans, ll, length)
    return out, ((True, True, True), (True, True, True))


@jax.custom_vjp
def _filter_core(initial_probs, transition_matrix, log_likelihoods, length):
    return _filter_values(initial_probs, transition_matrix, log_likelihoods, length)


def _filter_outputs(pi, trans, raw, peaks, log_cs, valid, length):
    """From a forward pass's raw rows and per-step normalisers: log-likelihood, filtered and
    predicted probabilities (padded rows repeat step ``length - 1``), the last real row, and the
    normalisers zeroed at padded steps."""
    last = lax.dynamic_index_in_dim(raw, length - 1, keepdims=False)
    filtered = jnp.where(valid[:, None], raw, last)
    if trans.ndim == 3:
        moved = jnp.einsum("ti,tij->tj", filtered[:-1], trans)
    else:
        moved = filtered[:-1] @ trans
    predicted = jnp.where(valid[:, None], jnp.concatenate([pi[None], moved]), last)
    peaks = jnp.where(valid, peaks, 0.0)
    log_cs = jnp.where(valid, log_cs, 0.0)
    loglik = _pairwise_sum(peaks) + _pairwise_sum(log_cs)
    return loglik, filtered, predicted, last, peaks, log_cs


def _filter_core_fwd(initial_probs, transition_matrix, log_likelihoods, length):
    pi, trans, ll, n = (p.value for p in (initial_probs, transition_matrix, log_likelihoods, length))
    values, (raw, peaks, log_cs) = _filter_forward(pi, trans, ll, n)
    return values, (pi, trans, ll, n, raw, peaks, log_cs)


def _filter_core_bwd(residuals, cotangents):
    pi, trans, ll, length, raw, peaks, log_cs = residuals
    ct_loglik, ct_filtered, ct_predicted = cotangents
    length_ct = None
    if not (isinstance(ct_filtered, SymbolicZero) and isinstance(ct_predicted, SymbolicZero)):
        # General case: VJP of the plain forward scan (exact, more memory).
        def _plain(p, a, l):
            return _forward_impl(p, a, l, length)[:3]

        _, vjp = jax.vjp(_plain, pi, trans, ll)
        cts = tuple(
            jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c
            for c in (ct_loglik, ct_filtered, ct_predicted)
        )
        return (*vjp(cts), length_ct)
    if isinstance(ct_loglik, SymbolicZero):
        return (None, None, None, length_ct)
    grad_pi, grad_trans, grad_ll = _loglik_grads(pi, trans, ll, length, raw, peaks, log_cs, ct_loglik)
    return (grad_pi, grad_trans, grad_ll, length_ct)


@jax.custom_batching.custom_vmap
def _loglik_grads(pi, trans, ll, length, raw, peaks, log_cs, ct):
    r"""Gradients of :math:`\log p` with respect to ``(pi, trans, ll)`` times the cotangent ``ct``,
    from the forward pass's residuals: one backward scan (see the module docstring)."""
    grads = _unit_loglik_grads(pi, trans, ll, length, raw, peaks, log_cs)
    return tuple(g * ct for g in grads)


def _unit_loglik_grads(pi, trans, ll, length, raw, peaks, log_cs):
    valid = _masks(ll.shape[0], length)
    # Per-step shift log c_t = peak_t + log_cs_t (applied as (ll - peak) - log_cs, exact
    # for large |ll|), peak = +inf at padded steps: the emission weight is then 0 there
    # whatever ll holds (NaN/inf -> 0 by _finite_or_zero), so the scan needs no masking.
    shift = (jnp.where(valid, peaks, jnp.inf), log_cs)
    if trans.ndim == 2:
        return _fused_backward_scan(trans, ll, shift, valid, raw)
    betas = _lean_backward_scan(trans, ll, shift, valid)
    grad_pi = _weights(ll[0], shift[0][0], shift[1][0]) * betas[0]
    # d log p / d A_{t} = outer(filtered[t], v[t+1]) on real pairs, v = weights * betas.
    if trans.ndim == 3:
        v_next = _weights(ll[1:], shift[0][1:, None], shift[1][1:, None]) * betas[1:]
        grad_trans = raw[:-1, :, None] * v_next[:, None, :]
    else:
        grad_trans = _blocked_transition_grad(raw, ll, shift, betas)
    grad_ll = jnp.where(valid[:, None], raw * betas, 0.0)
    return grad_pi, grad_trans, grad_ll


@_loglik_grads.def_vmap
def _loglik_grads_vmap(axis_size, in_batched, pi, trans, ll, length, raw, peaks, log_cs, ct):
    if not (_shared_model(in_batched, trans) and all(in_batched[4:7])):
        return _per_sequence(_loglik_grads.fun, in_batched, pi, trans, ll, length, raw, peaks, log_cs, ct)
    lengths = _batch_lengths(length, in_batched[3], axis_size)
    scale = _batch_lengths(ct, in_batched[7], axis_size)
    # the cotangents scale the gradient rows as the loop writes them (no further (B, T, K) pass)
    grad_ll, vs, grad_pi = _batched_backward(
        trans, ll, lengths, raw, peaks.T, log_cs.T, "BTK", padded_rows_zero=True, row_scale=scale
    )
    # per sequence (the batch of cotangents is summed by JAX where the model is shared)
    grad_trans = _batched_pair_sums(raw, vs, "BTK") * scale[:, None, None]
    return (grad_pi * scale[:, None], grad_trans, grad_ll), (True, True, True)


def _weights(ll, peak, log_c):
    return _finite_or_zero(jnp.exp((ll - peak) - log_c))


def _lean_backward_scan(transition_matrix, log_likelihoods, shift, valid):
    r"""Scaled backward messages :math:`\hat\beta_t` (T, K) with a minimal loop body.

    ``beta_{t-1} = A_{t-1} (exp(ll_t - shift_t) * beta_t) + pad_t`` with ``shift_t = +inf``
    and ``pad_t = 1`` at padded steps (so ``beta = 1`` from ``length - 1`` on, exactly).
    """
    num_states = log_likelihoods.shape[1]
    a_xs = _prev_transitions(transition_matrix, log_likelihoods.shape[0])
    def _step(beta, x):
        ll, peak, log_c, is_valid, a_t = x
        v = _weights(ll, peak, log_c) * beta
        return _matvec(_pick(transition_matrix, a_t), v) + jnp.logical_not(is_valid).astype(v.dtype), beta

    ones = jnp.ones((num_states,), log_likelihoods.dtype)
    _, betas = lax.scan(_step, ones, (log_likelihoods, *shift, valid, a_xs), reverse=True)
    return betas


def _fused_backward_block(transition_matrix, beta, xs):
    r"""Backward recursion over one block of steps: ``(beta before the block, v rows, gradient rows)``.

    ``beta`` is :math:`\hat\beta` at the block's last step; ``xs = (ll, peak, log_c, valid,
    raw)``, each with a leading step axis. The emission weights are exponentiated for the
    whole block before the scan (one vectorised pass instead of ``K`` scalar exponentials
    per step), the loop only carries and writes :math:`\hat\beta_t`, and the rows
    :math:`v_t = w_t \hat\beta_t` and ``raw[t] * beta_t`` (0 at padded steps) are formed
    from the block's messages afterwards.
    """
    ll, peak, log_c, valid, raw = xs
    weights = _weights(ll, peak[:, None], log_c[:, None])
    pad = jnp.logical_not(valid).astype(weights.dtype)

    def _step(beta, x):
        w, p = x
        beta_prev = _matvec(transition_matrix, w * beta) + p
        # Writing the new carry (not the old one) spares XLA a copy of the carry per step.
        return beta_prev, beta_prev

    beta_before, shifted = lax.scan(_step, beta, (weights, pad), reverse=True)
    betas = jnp.concatenate([shifted[1:], beta[None]])  # beta_t = shifted[t + 1]
    return beta_before, weights * betas, jnp.where(valid[:, None], raw * betas, 0.0)


def _fused_backward_scan(transition_matrix, log_likelihoods, shift, valid, raw):
    r"""Gradients of :math:`\log p` for a stationary ``A`` from one backward pass, no (T, K) messages.

    The pass writes the gradient row ``raw[t] * beta_t`` (the smoothed probabilities,
    0 at padded steps) straight into the output and never stores the backward messages
    for all steps: it walks backwards over blocks of ``_GRAD_BLOCK`` steps (a
    ``fori_loop`` whose gradient buffer is updated in place), runs the step recursion
    inside each block, and adds the block's :math:`\sum_t \text{raw}_{t-1} \otimes v_t`
    as one matrix product (the rows ``raw[t-1]`` are one slice of ``raw`` starting a
    step before the block). The first block, which holds ``t = 0``, is a final scan of
    static length. Returns ``(grad_pi, grad_trans, grad_ll)`` for a unit cotangent.
    """
    num_timesteps, num_states = log_likelihoods.shape
    dtype = log_likelihoods.dtype
    xs_all = (log_likelihoods, shift[0], shift[1], valid, raw)
    block = min(_GRAD_BLOCK, num_timesteps)
    num_blocks = num_timesteps // block - 1
    head = num_timesteps - num_blocks * block  # in [block, 2 block): every loop block starts at t >= 1
    beta = jnp.ones((num_states,), dtype)
    acc = jnp.zeros((num_states, num_states), dtype)
    grad_ll = jnp.zeros((num_timesteps, num_states), dtype)

    def _block(i, state):
        beta, acc, grad_ll = state
        start = head + (num_blocks - 1 - i) * block
        xs = tuple(lax.dynamic_slice_in_dim(x, start, block) for x in xs_all)
        beta, v, rows = _fused_backward_block(transition_matrix, beta, xs)
        acc = acc + lax.dynamic_slice_in_dim(raw, start - 1, block).T @ v
        grad_ll = lax.dynamic_update_slice_in_dim(grad_ll, rows, start, axis=0)
        return beta, acc, grad_ll

    if num_blocks:
        beta, acc, grad_ll = lax.fori_loop(0, num_blocks, _block, (beta, acc, grad_ll))
    _, v, rows = _fused_backward_block(transition_matrix, beta, tuple(x[:head] for x in xs_all))
    acc = acc + raw[: head - 1].T @ v[1:]
    grad_ll = lax.dynamic_update_slice_in_dim(grad_ll, rows, 0, axis=0)
    return v[0], acc, grad_ll


_GRAD_BLOCK = 256


def _blocked_transition_grad(raw, ll, shift, betas):
    r"""``sum_t outer(raw[t], v[t+1])`` with ``v = exp(ll - shift) * betas``, in blocks of rows.

    Never materialises ``v`` (T, K): a loop over blocks of ``_GRAD_BLOCK`` pairs, each a
    small matrix product (the last block is shifted back to stay in bounds and its
    already-counted rows are masked out).
    """
    num_pairs = raw.shape[0] - 1
    num_states = raw.shape[1]
    if num_pairs <= _GRAD_BLOCK:
        v_next = _weights(ll[1:], shift[0][1:, None], shift[1][1:, None]) * betas[1:]
        return raw[:-1].T @ v_next
    num_blocks = -(-num_pairs // _GRAD_BLOCK)
    rows = jnp.arange(_GRAD_BLOCK)

    def _body(i, acc):
        begin = i * _GRAD_BLOCK
        start = jnp.minimum(begin, num_pairs - _GRAD_BLOCK)
        f = lax.dynamic_slice_in_dim(raw, start, _GRAD_BLOCK)
        l_next = lax.dynamic_slice_in_dim(ll, start + 1, _GRAD_BLOCK)
        p_next = lax.dynamic_slice_in_dim(shift[0], start + 1, _GRAD_BLOCK)
        c_next = lax.dynamic_slice_in_dim(shift[1], start + 1, _GRAD_BLOCK)
        b_next = lax.dynamic_slice_in_dim(betas, start + 1, _GRAD_BLOCK)
        fresh = (start + rows) >= begin
        v = jnp.where(fresh[:, None], _weights(l_next, p_next[:, None], c_next[:, None]) * b_next, 0.0)
        return acc + f.T @ v

    acc0 = jnp.zeros((num_states, num_states), raw.dtype)
    return lax.fori_loop(0, num_blocks, _body, acc0)


_filter_core.defvjp(_filter_core_fwd, _filter_core_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------- private jitted algorithms


@jax.jit
def _filter(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> HMMFilterResult:
    loglik, filtered, predicted = _filter_core(initial_probs, transition_matrix, log_likelihoods, length)
    return HMMFilterResult(loglik, filtered, predicted)


def _smoother_forward(initial_probs, transition_matrix, masked_ll, valid):
    r"""Forward pass of the smoother: ``(filtered, peaks, log_cs, weights)``, all (autodiff-able).

    As :func:`_forward_scan`, but the shifted emissions :math:`E_t = e^{\ell_t - m_t}`
    are exponentiated for all steps at once before the scan (a vectorised pass instead
    of ``K`` scalar exponentials in every loop step), and the per-step normalisers come
    out as ``c_t`` (their logarithms are taken outside the loop). Also returns the
    backward weights :math:`e^{\ell_t - m_t} / c_t` of the accepted pass (rows at padded
    steps are finite and unused).
    """
    a_xs = _next_transitions(transition_matrix, masked_ll.shape[0])
    peaks = _step_peaks(masked_ll, valid)
    emissions = jnp.exp(masked_ll - peaks[:, None])  # in [0, 1]

    augmented = _augmented_transitions(transition_matrix)
    threshold = math.exp(_underflow_threshold(masked_ll.dtype))

    def _step(pred, x):
        e, a_t = x
        # c < threshold (0, NaN) sends the pass to the robust one (see _forward_scan). This
        # pass is differentiated even then (both branches of the fallback are), so it
        # divides by c floored at the threshold: finite cotangents, and unchanged values
        # and derivatives wherever the pass is accepted.
        filtered, c, pred_next = _normalise_step(pred * e, _pick(transition_matrix, a_t), augmented, threshold)
        return pred_next, (filtered, c)

    _, (raw, cs) = lax.scan(_step, initial_probs, (emissions, a_xs))
    underflow = jnp.logical_not(jnp.all(cs >= threshold))  # padded steps have c_t = 1

    # c_t >= sqrt(tiny) on an accepted pass and e <= 1: the weights are finite.
    cs = _floored(cs, threshold)
    fast = (raw, peaks, jnp.log(cs), emissions / cs[:, None])
    return _fallback(underflow, fast, _robust_smoother_forward, (initial_probs, transition_matrix, masked_ll, valid))


def _robust_smoother_forward(initial_probs, transition_matrix, masked_ll, valid):
    """The smoother's forward pass in the underflow-proof form (see :func:`_smoother_forward`)."""
    filtered, robust_peaks, log_cs = _robust_forward_scan(initial_probs, transition_matrix, masked_ll, valid)
    weights = _emission_weights(masked_ll, robust_peaks[:, None], log_cs[:, None])
    return filtered, robust_peaks, log_cs, weights


def _smoother_backward(transition_matrix, weights, valid, raw, last):
    r"""Backward scan of the smoother: ``(smoothed, v)``, both (T, K).

    :math:`\hat\beta_{t-1} = A_{t-1} v_t` with :math:`v_t = w_t \odot \hat\beta_t` and
    :math:`\hat\beta_t = 1` for ``t >= length - 1`` (a ``where`` on real steps, so padded
    weights contribute nothing); the loop writes ``smoothed[t] = raw[t] * beta_t``
    (``last`` at padded steps) and ``v_t`` (0 at padded steps) directly. Outputs that
    are not used are removed by the compiler.
    """
    num_states = weights.shape[1]
    a_xs = _prev_transitions(transition_matrix, weights.shape[0])

    def _step(beta, x):
        w, is_valid, f, a_t = x
        v = w * beta
        beta_prev = jnp.where(is_valid, _matvec(_pick(transition_matrix, a_t), v), 1.0)
        return beta_prev, (jnp.where(is_valid, f * beta, last), jnp.where(is_valid, v, 0.0))

    ones = jnp.ones((num_states,), weights.dtype)
    _, (smoothed, v) = lax.scan(_step, ones, (weights, valid, raw, a_xs), reverse=True)
    return smoothed, v


def _smoother_parts(initial_probs, transition_matrix, log_likelihoods, length):
    """Forward pass, smoothed probabilities and the per-pair factors of the two-slice marginals."""
    num_timesteps = log_likelihoods.shape[0]
    valid = _masks(num_timesteps, length)
    # Masked (not raw) log-likelihoods: this path is differentiated by autodiff.
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    raw, peaks, log_cs, weights = _smoother_forward(initial_probs, transition_matrix, masked_ll, valid)
    loglik, filtered, predicted, last, _, _ = _filter_outputs(
        initial_probs, transition_matrix, raw, peaks, log_cs, valid, length
    )
    # beta = 1 from step length-1 on, so padded rows repeat filtered[length-1].
    smoothed, v = _smoother_backward(transition_matrix, weights, valid, raw, last)
    # xi_t = A_t * outer(filtered[t], v[t+1]) on real pairs (v = 0 at padded steps).
    return loglik, filtered, predicted, smoothed, v[1:]


def _smoother_impl(initial_probs, transition_matrix, log_likelihoods, length) -> HMMPosterior:
    loglik, filtered, predicted, smoothed, v_next = _smoother_parts(
        initial_probs, transition_matrix, log_likelihoods, length
    )
    if transition_matrix.ndim == 3:
        expected = jnp.einsum("ti,tj,tij->ij", filtered[:-1], v_next, transition_matrix)
    else:
        expected = transition_matrix * (filtered[:-1].T @ v_next)
    return HMMPosterior(loglik, filtered, predicted, smoothed, expected)


# Values under ``jax.vmap`` from the batched recursion when the model is shared (see
# _filter_values); derivatives (forward and reverse mode) are those of the per-sequence
# recursion, by automatic differentiation (custom_vmap functions have no reverse mode).
@jax.custom_jvp
@jax.custom_batching.custom_vmap
def _smoother_values(initial_probs, transition_matrix, log_likelihoods, length) -> HMMPosterior:
    return _smoother_impl(initial_probs, transition_matrix, log_likelihoods, length)


@_smoother_values.def_vmap
def _smoother_values_vmap(axis_size, in_batched, pi, trans, ll, length):
    if not _shared_model(in_batched, trans):
        return _per_sequence(_smoother_impl, in_batched, pi, trans, ll, length)
    lengths = _batch_lengths(length, in_batched[3], axis_size)
    filtered, predicted, peaks, log_cs, _ = _batched_forward(pi, trans, ll, lengths, "BTK")
    smoothed, vs, _ = _batched_backward(trans, ll, lengths, filtered, peaks, log_cs, "BTK")
    loglik = _pairwise_sum(peaks) + _pairwise_sum(log_cs)
    expected = trans * _batched_pair_sums(filtered, vs, "BTK")
    # unflattened, not constructed: the fields carry a batch axis (no (T, K) annotation check)
    out = jax.tree.unflatten(_posterior_treedef(), (loglik, filtered, predicted, smoothed, expected))
    return out, jax.tree.map(lambda _: True, out)


def _posterior_treedef():
    one, row = jnp.zeros(()), jnp.zeros((1, 1))
    return jax.tree.structure(HMMPosterior(one, row, row, row, row))


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
def _smoother(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> HMMPosterior:
    return _smoother_values(initial_probs, transition_matrix, log_likelihoods, length)


@jax.jit
def _two_slice(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> Float[Array, "T-1 K K"]:
    _, filtered, _, _, v_next = _smoother_parts(initial_probs, transition_matrix, log_likelihoods, length)
    return filtered[:-1, :, None] * v_next[:, None, :] * transition_matrix


# --------------------------------------------------------------------------- batched recursion
#
# Many sequences under one stationary model, advanced together: one loop over time for the whole
# batch, each step one product of the (B, K) or (K, B) block of messages with the (K, K) matrix
# (:func:`_normalise_step` forward, :func:`_backward_message` backward: the same step functions as
# the per-sequence scans). Used by ``jax.vmap`` of hmm_filter / hmm_smoother / the log-likelihood
# gradient (custom_vmap rules above) and by fit_em's E-step (:func:`_batch_smoother_stats`).
#
# The arrays keep the caller's layout, named by its axes (B batch, T time, K states): "BTK" is
# what ``jax.vmap`` hands over (no transposed copy in or out), "TKB" and "TBK" the E-step's. Each
# loop step reads and writes one (B, K) block ("BTK", "TBK") or (K, B) block ("TKB": the states
# lead and the batch is the vectorised minor axis, faster for a few states); per-step scalars
# (shifts, normalisers) are time-major (T, B) arrays in every layout.


def _states_axis(layout: str) -> int:
    """Axis of the states in a loop step's block: 0 for (K, B), -1 for (B, K)."""
    return 0 if layout == "TKB" else -1


def _step_layout(layout: str) -> str:
    """Per-step arrays (shifts, normalisers) are time-major (T, B) in every layout: each step
    reads and writes one contiguous row."""
    return "TB"


def _steps_against(x, layout: str):
    """A per-step (T, B) array shaped to broadcast against an array in ``layout``."""
    order = layout.replace("K", "")
    x = x if order == "TB" else x.T
    return jnp.expand_dims(x, layout.index("K"))


def _to_sequences(x, layout: str):
    """An array in ``layout`` (or its per-step (B, T) / (T, B) form) as (B, T, K) / (B, T)."""
    axes = layout if x.ndim == 3 else _step_layout(layout)
    want = "BTK" if x.ndim == 3 else "BT"
    return jnp.transpose(x, [axes.index(a) for a in want])


def _from_sequences(x, layout: str):
    """Inverse of :func:`_to_sequences`."""
    axes = layout if x.ndim == 3 else _step_layout(layout)
    have = "BTK" if x.ndim == 3 else "BT"
    return jnp.transpose(x, [have.index(a) for a in axes])


def _states_product(x, matrix, states_axis):
    """``x @ matrix`` along the states: (B, K) -> (B, M), or state-major (K, B) -> (M, B)."""
    if states_axis == 0:
        return _state_major_product(matrix, x)
    return _vecmat(x, matrix)


def _state_major_product(matrix, x):
    r"""``matrix.T @ x`` for state-major ``x`` (K, B): ``out[j, b] = sum_i matrix[i, j] x[i, b]``.

    For a few states a fused multiply-sum over the leading axis (the batch stays the
    vectorised minor axis, no call into a matmul kernel), else a matrix product.
    """
    if x.shape[0] <= _FUSED_MATVEC_MAX_STATES:
        return jnp.sum(matrix[:, :, None] * x[:, None, :], axis=0)
    return matrix.T @ x


def _backward_message(transition: Float[Array, "K K"], v: Array, states_axis: int = -1) -> Array:
    r"""One backward step :math:`\hat\beta_{t-1} = A v_t`: ``v`` of shape (K,), a batch of rows
    (B, K), or state-major (K, B) (``states_axis = 0``)."""
    if states_axis == 0:
        return _state_major_product(transition.T, v)
    return _matvec(transition, v)


# The loop indices are in range: no negative-index handling (a scalar kernel more per read and
# write, measured 1.7x slower steps at K = 5, B = 100).
def _time_index(x, t, time_axis):
    return lax.dynamic_index_in_dim(x, t, time_axis, keepdims=False, allow_negative_indices=False)


def _step_log_likelihoods(log_likelihoods, t, time_axis, is_valid):
    """Step ``t``'s log-likelihoods in a batched loop; 0 at padded entries when ``is_valid`` is given."""
    ll = _time_index(log_likelihoods, t, time_axis)
    return ll if is_valid is None else jnp.where(is_valid, ll, 0.0)


def _time_update(buffer, row, t, time_axis):
    row = jnp.expand_dims(row, time_axis)
    return lax.dynamic_update_slice_in_dim(buffer, row, t, time_axis, allow_negative_indices=False)


def _split_loops(body, num_timesteps, lengths, state, reverse, first=0):
    """``body(masked, t, state)`` for the steps ``t = first .. T-1`` (descending with ``reverse``).

    A batch without padding (every ``length = T``) runs the body without any masking
    (``masked=False``: no per-step selects), others with ``masked=True``: a conditional between two
    loops of static length (a loop with a run-time trip count evaluates its condition on the host
    every step, measured 1.6x slower at K = 5, B = 100). The predicate is one for the whole batch,
    also under a further ``jax.vmap`` (:func:`ssmjax._fallback._any_in_batch`).
    """

    def _loop(masked):
        step = functools.partial(body, masked)
        if reverse:
            return lambda s: lax.fori_loop(0, num_timesteps - first, lambda i, c: step(num_timesteps - 1 - i, c), s)
        return lambda s: lax.fori_loop(first, num_timesteps, step, s)

    padded = _any_in_batch(jnp.any(lengths < num_timesteps))
    return lax.cond(padded, _loop(True), _loop(False), state)


# Up to this many entries in a loop step's block (B * K), the batched passes exponentiate the
# log-likelihoods of all steps at once before the loop (one vectorised pass; the loop body is then
# a few kernels, and small blocks are bound by the per-kernel cost); from more on, inside the loop
# (no (T, B, K) array of emissions to allocate and write: large blocks are bound by memory).
_PRECOMPUTED_EMISSIONS_MAX_BLOCK = 1024


def _precomputed_emissions(log_likelihoods, layout, precompute=None) -> bool:
    if precompute is not None:
        return precompute
    num_seq, num_states = log_likelihoods.shape[layout.index("B")], log_likelihoods.shape[layout.index("K")]
    return num_seq * num_states <= _PRECOMPUTED_EMISSIONS_MAX_BLOCK


def _valid_all(x, lengths, layout):
    """``t < lengths[b]`` for every step and sequence, shaped to broadcast against ``x`` (in ``layout``)."""
    num_timesteps = x.shape[layout.index("T")]
    steps = jnp.expand_dims(jnp.arange(num_timesteps), [i for i, a in enumerate(layout) if a != "T"])
    return steps < jnp.expand_dims(lengths, [i for i, a in enumerate(layout) if a != "B"])


def _state_peaks(x, layout):
    """``max_k x[..., k, ...]`` over the states axis of ``layout`` (0 where not finite)."""
    axis = layout.index("K")
    peaks = _state_max(x, axis=axis) if x.shape[axis] <= 8 else jnp.max(x, axis=axis)
    return jnp.where(jnp.isfinite(peaks), peaks, 0.0)


def _valid_block(t, lengths, states_axis):
    """``t < lengths`` shaped to broadcast against a step's block."""
    is_valid = t < lengths
    return is_valid[None, :] if states_axis == 0 else is_valid[:, None]


def _batched_forward_fast(
    initial_probs, transition_matrix, log_likelihoods, lengths, layout, freeze_padded=True, precompute=None
):
    """The scaled forward pass of a batch (see the section comment), padding frozen in the loop
    (:func:`_split_loops`).

    Returns ``(filtered, predicted, peaks, cs)``: filtered and predicted probabilities in
    ``layout`` (rows at padded steps repeat the last real filtered row), per-step shifts
    ``max_k ll_t(k)`` and normalisers ``c_t`` as (T, B) arrays (0 and 1 at padded steps).
    ``c_t`` is not guarded: the caller checks it. With ``freeze_padded=False`` the rows at padded
    steps are left finite but meaningless (fewer selects in the loop; the E-step reads none of them).
    """
    time_axis = layout.index("T")
    states_axis = _states_axis(layout)
    num_timesteps = log_likelihoods.shape[time_axis]
    num_seq, num_states = log_likelihoods.shape[layout.index("B")], log_likelihoods.shape[layout.index("K")]
    dtype = log_likelihoods.dtype
    augmented = _augmented_transitions(transition_matrix)
    if states_axis == 0:
        start = jnp.broadcast_to(initial_probs[:, None], (num_states, num_seq))
    else:
        start = jnp.broadcast_to(initial_probs, (num_seq, num_states))
    step_shape = (num_timesteps, num_seq)
    precomputed = _precomputed_emissions(log_likelihoods, layout, precompute)
    if precomputed:
        masked_ll = jnp.where(_valid_all(log_likelihoods, lengths, layout), log_likelihoods, 0.0)
        all_peaks = _state_peaks(masked_ll, layout)
        emissions = jnp.exp(masked_ll - jnp.expand_dims(all_peaks, layout.index("K")))  # 1 at padded steps
    elif num_states > _FUSED_MATVEC_MAX_STATES:
        # the shifts of all steps in one pass before the loop: a row maximum over many states in
        # the loop costs about a tenth of a step (measured K = 64)
        all_peaks = _state_peaks(jnp.where(_valid_all(log_likelihoods, lengths, layout), log_likelihoods, 0.0), layout)
    peaks_before = precomputed or num_states > _FUSED_MATVEC_MAX_STATES
    if peaks_before and layout.replace("K", "") == "BT":
        all_peaks = all_peaks.T

    def _body(masked, t, state):
        pred, last, filtered, predicted, peaks, cs = state
        # padded steps: the log-likelihoods are masked (the emissions then are 1) and the rows frozen
        masked = masked and (freeze_padded or not precomputed)
        if masked:
            is_valid = _valid_block(t, lengths, states_axis)
        if precomputed:
            e = _time_index(emissions, t, time_axis)
        else:
            ll = _step_log_likelihoods(log_likelihoods, t, time_axis, is_valid if masked else None)
            if peaks_before:
                peak = _time_index(peaks, t, 0)
            else:
                peak = _state_max(ll, axis=0) if states_axis == 0 else jnp.max(ll, axis=-1)
                peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
                peaks = _time_update(peaks, peak, t, 0)
            e = jnp.exp(ll - jnp.expand_dims(peak, states_axis))
        new, c, pred_next = _normalise_step(pred * e, transition_matrix, augmented, states_axis=states_axis)
        if masked and freeze_padded:
            new = jnp.where(is_valid, new, last)
            pred = jnp.where(is_valid, pred, last)
        filtered = _time_update(filtered, new, t, time_axis)
        predicted = _time_update(predicted, pred, t, time_axis)
        cs = _time_update(cs, c, t, 0)
        return pred_next, new, filtered, predicted, peaks, cs

    state = (
        start,
        start,
        jnp.zeros(log_likelihoods.shape, dtype),
        jnp.zeros(log_likelihoods.shape, dtype),
        all_peaks if peaks_before else jnp.zeros(step_shape, dtype),
        jnp.ones(step_shape, dtype),
    )
    filtered, predicted, peaks, cs = _split_loops(_body, num_timesteps, lengths, state, reverse=False)[2:]
    steps = _valid_all(cs, lengths, _step_layout(layout))
    return filtered, predicted, jnp.where(steps, peaks, 0.0), jnp.where(steps, cs, 1.0)


def _robust_batch_rows(needed, fast, initial_probs, transition_matrix, log_likelihoods, lengths, layout):
    """The underflow-proof forward pass for the sequences flagged in ``needed``, ``fast`` for the others."""
    sequences = _to_sequences(log_likelihoods, layout)
    num_timesteps = sequences.shape[1]

    def _one(ll, length):
        valid = _masks(num_timesteps, length)
        masked = jnp.where(valid[:, None], ll, 0.0)
        raw, peaks, log_cs = _robust_forward_scan(initial_probs, transition_matrix, masked, valid)
        _, filtered, predicted, _, peaks, log_cs = _filter_outputs(
            initial_probs, transition_matrix, raw, peaks, log_cs, valid, length
        )
        return filtered, predicted, peaks, log_cs

    robust = jax.vmap(_one)(sequences, lengths)

    def _select(r, f):
        r = _from_sequences(r, layout)
        axes = layout if r.ndim == 3 else _step_layout(layout)
        take = jnp.expand_dims(needed, [i for i, a in enumerate(axes) if a != "B"])
        return jnp.where(take, r, f)

    return tuple(_select(r, f) for r, f in zip(robust, fast))


def _batched_forward(
    initial_probs, transition_matrix, log_likelihoods, lengths, layout, fallback=True, freeze_padded=True, precompute=None
):
    """Forward pass of a batch: ``(filtered, predicted, peaks, log_cs, underflow)``.

    The fast pass (:func:`_batched_forward_fast`); if some normaliser of some sequence underflows,
    those sequences are redone with the underflow-proof shift (:func:`_robust_forward_scan`,
    through :func:`ssmjax._fallback.fallback`: the rescue is a conditional, also under a further
    ``jax.vmap``). With ``fallback=False`` no rescue is compiled (``underflow`` tells the caller).
    ``log_cs`` is 0 at padded steps, so ``log p = sum_t (peaks + log_cs)`` per sequence.
    """
    filtered, predicted, peaks, cs = _batched_forward_fast(
        initial_probs, transition_matrix, log_likelihoods, lengths, layout, freeze_padded, precompute
    )
    threshold = math.exp(_underflow_threshold(log_likelihoods.dtype))
    # ``not >=`` also catches NaN; padded steps have c = 1
    needed = jnp.logical_not(jnp.all(cs >= threshold, axis=_step_layout(layout).index("T")))
    fast = (filtered, predicted, peaks, jnp.log(_floored(cs, threshold)))
    underflow = jnp.any(needed)
    if not fallback:
        return (*fast, underflow)
    rescue = functools.partial(_robust_batch_rows, layout=layout)
    out = _fallback(
        underflow, fast, rescue, (needed, fast, initial_probs, transition_matrix, log_likelihoods, lengths)
    )
    return (*out, underflow)


def _batched_backward(
    transition_matrix,
    log_likelihoods,
    lengths,
    filtered,
    peaks,
    log_cs,
    layout,
    padded_rows_zero=False,
    precompute=None,
    row_scale=None,
):
    r"""Backward pass of a batch: ``(smoothed, v_next, v_first)``, in the layouts of :func:`_batched_forward`.

    :math:`v_t = w_t \odot \hat\beta_t` with the emission weights :math:`w_t = e^{\ell_t - \log c_t}`
    (recomputed from the log-likelihoods, 0 at padded steps), :math:`\hat\beta_{t-1} = A v_t`
    (:func:`_backward_message`), :math:`\hat\beta = 1` from step ``length - 1`` on. ``smoothed =
    filtered * beta`` (rows at padded steps repeat ``filtered``'s, or are 0 with
    ``padded_rows_zero``: then ``smoothed`` is the gradient of :math:`\log p` with respect to the
    log-likelihoods; ``row_scale`` (B,) multiplies its rows), ``v_next[t]`` is :math:`v_{t+1}` (0 at padded steps and at the last step: the
    rows pair with ``filtered[t]`` in :func:`_batched_pair_sums`) and ``v_first`` is :math:`v_0`
    (the gradient of :math:`\log p` with respect to :math:`\pi`).
    """
    time_axis = layout.index("T")
    states_axis = _states_axis(layout)
    num_timesteps = log_likelihoods.shape[time_axis]
    dtype = log_likelihoods.dtype

    precomputed = _precomputed_emissions(log_likelihoods, layout, precompute)
    if precomputed:
        valid = _valid_all(log_likelihoods, lengths, layout)
        weights = _emission_weights(
            jnp.where(valid, log_likelihoods, 0.0), _steps_against(peaks, layout), _steps_against(log_cs, layout)
        )
        weights = jnp.where(valid, weights, 0.0)

    def _body(masked, t, state, write_v=True):
        beta, _, smoothed, v_next = state
        if masked:
            is_valid = _valid_block(t, lengths, states_axis)
        if precomputed:
            w = _time_index(weights, t, time_axis)
        else:
            ll = _step_log_likelihoods(log_likelihoods, t, time_axis, is_valid if masked else None)
            peak = jnp.expand_dims(_time_index(peaks, t, 0), states_axis)
            log_c = jnp.expand_dims(_time_index(log_cs, t, 0), states_axis)
            w = _emission_weights(ll, peak, log_c)
            if masked:
                w = jnp.where(is_valid, w, 0.0)
        v = w * beta
        row = _time_index(filtered, t, time_axis) * beta
        if row_scale is not None:
            row = row * jnp.expand_dims(row_scale, states_axis)
        if masked and padded_rows_zero:
            row = jnp.where(is_valid, row, 0.0)
        smoothed = _time_update(smoothed, row, t, time_axis)
        if write_v:  # v_t is row t - 1 of v_next
            v_next = _time_update(v_next, v, t - 1, time_axis)
        beta_prev = _backward_message(transition_matrix, v, states_axis)
        if masked:
            beta_prev = jnp.where(is_valid, beta_prev, 1.0)
        return beta_prev, v, smoothed, v_next

    block = _time_index(log_likelihoods, 0, time_axis).shape
    ones = jnp.ones(block, dtype)
    zeros = jnp.zeros(log_likelihoods.shape, dtype)
    state = (ones, ones, zeros, zeros)
    state = _split_loops(_body, num_timesteps, lengths, state, reverse=True, first=1)
    _, v_first, smoothed, v_next = _body(True, 0, state, write_v=False)
    return smoothed, v_next, v_first


def _batched_pair_sums(filtered, v_next, layout, over_batch=False):
    r""":math:`\sum_t` ``outer(filtered[t], v_next[t])`` (``v_next[t] = v_{t+1}``, 0 at the last
    step): per sequence (B, K, K), or also summed over the batch (K, K) with ``over_batch``. One
    matrix product of the whole arrays (aligned by the backward pass: no shifted copies)."""
    f, v = filtered, v_next
    spec = layout.lower()
    lhs, rhs = spec.replace("k", "i"), spec.replace("k", "j")
    return jnp.einsum(f"{lhs},{rhs}->{'' if over_batch else 'b'}ij", f, v)


# At most this many states, fit_em's E-step runs the batch state-major ("TKB": the batch is the
# vectorised axis of every step); from more on batch-major rows ("TBK", one matrix product a
# step). Measured (CPU, T = 1000): K = 5, B = 100 state-major 2.3x faster; K = 16, B = 256
# batch-major 1.2x faster.
_STATE_MAJOR_MAX_STATES = 8


def _batch_smoother_stats(
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
    summing :func:`hmm_smoother` over the batch (``tests/test_hmm_fit.py`` checks it).

    The same batched recursion as ``jax.vmap(hmm_smoother)`` (:func:`_batched_forward`,
    :func:`_batched_backward`), state-major for a few states, else time-major rows
    (``_STATE_MAJOR_MAX_STATES``). Not differentiated (EM needs no gradient); stationary
    ``transition_matrix`` only.
    """
    num_states = log_likelihoods.shape[1]
    if num_states <= _STATE_MAJOR_MAX_STATES:
        layout, ll = "TKB", log_likelihoods
    else:
        layout, ll = "TBK", jnp.swapaxes(log_likelihoods, 1, 2)
    lengths = jnp.sum(valid, axis=0, dtype=jnp.int32)
    filtered, _, peaks, log_cs, underflow = _batched_forward(
        initial_probs, transition_matrix, ll, lengths, layout, fallback=fallback, freeze_padded=False, precompute=True
    )
    smoothed, vs, _ = _batched_backward(
        transition_matrix, ll, lengths, filtered, peaks, log_cs, layout, padded_rows_zero=True, precompute=True
    )
    expected = transition_matrix * _batched_pair_sums(filtered, vs, layout, over_batch=True)
    # per step over the batch, then pairwise over time (both are 0 at padded steps)
    loglik = _pairwise_sum(jnp.sum(peaks + log_cs, axis=1))
    if not fallback:
        loglik = jnp.where(underflow, jnp.nan, loglik)
    if layout == "TKB":
        smoothed = jnp.swapaxes(smoothed, 1, 2)
    return smoothed, expected, loglik


@jax.jit
def _viterbi(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
):
    num_timesteps, num_states = log_likelihoods.shape
    valid = _masks(num_timesteps, length)
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    log_trans = _safe_log(transition_matrix)
    a_xs = _transition_xs(log_trans, num_timesteps)
    states = jnp.arange(num_states)

    def _forward_step(score_prev, x):
        ll, is_valid, log_a_t = x
        log_a = _pick(log_trans, log_a_t)
        cand = score_prev[:, None] + log_a  # (from i, to j)
        best_from = jnp.argmax(cand, axis=0)  # first maximum = lowest index
        score = jnp.max(cand, axis=0) + ll
        score = jnp.where(is_valid, score, score_prev)
        best_from = jnp.where(is_valid, best_from, states)
        return score, best_from.astype(jnp.int32)

    score0 = _safe_log(initial_probs) + masked_ll[0]
    score_last, pointers = lax.scan(_forward_step, score0, (masked_ll[1:], valid[1:], a_xs))
    last_state = jnp.argmax(score_last).astype(jnp.int32)

    def _backtrack_step(state_next, pointer):
        state = pointer[state_next]
        return state, state

    _, path = lax.scan(_backtrack_step, last_state, pointers, reverse=True)
    path = jnp.concatenate([path, last_state[None]])
    return path, jnp.max(score_last)


@jax.jit
def _sample_posterior(
    key: PRNGKeyArray,
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> Int[Array, " T"]:
    num_timesteps = log_likelihoods.shape[0]
    valid = _masks(num_timesteps, length)
    _, filtered, _, _, _ = _forward_impl(initial_probs, transition_matrix, log_likelihoods, length)
    keys = jax.random.split(key, num_timesteps)
    last = jax.random.categorical(keys[-1], _safe_log(filtered[-1])).astype(jnp.int32)
    a_xs = _transition_xs(transition_matrix, num_timesteps)

    def _step(state_next, x):
        f_t, key_t, valid_next, a_t = x
        trans = _pick(transition_matrix, a_t)
        drawn = jax.random.categorical(key_t, _safe_log(f_t * trans[:, state_next])).astype(jnp.int32)
        state = jnp.where(valid_next, drawn, state_next)
        return state, state

    _, states = lax.scan(_step, last, (filtered[:-1], keys[:-1], valid[1:], a_xs), reverse=True)
    return jnp.concatenate([states, last[None]])


@functools.partial(jax.jit, static_argnames=("lag",))
def _fixed_lag(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
    lag: int,
) -> Float[Array, "T K"]:
    num_timesteps, num_states = log_likelihoods.shape
    valid = _masks(num_timesteps, length)
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    _, filtered, _, peaks, log_cs = _forward_impl(initial_probs, transition_matrix, log_likelihoods, length)
    weights = jnp.where(valid[:, None], _emission_weights(masked_ll, peaks[:, None], log_cs[:, None]), 1.0)
    steps = jnp.arange(num_timesteps)
    start = jnp.maximum(steps - lag, 0)  # window start s0(t)

    def _step(betas, k):
        # backward step through s = t - k (from z_{s-1} to z_s) for every t at once
        s = steps - k
        active = s > start
        s_idx = jnp.clip(s, 1, num_timesteps - 1)
        v = weights[s_idx] * betas
        if transition_matrix.ndim == 3:
            moved = jnp.einsum("tij,tj->ti", transition_matrix[s_idx - 1], v)
        else:
            moved = v @ transition_matrix.T
        moved = jnp.where(valid[s_idx][:, None], moved, v)
        scale = jnp.max(moved, axis=1, keepdims=True)
        moved = moved / jnp.where(scale > 0, scale, 1.0)
        return jnp.where(active[:, None], moved, betas), None

    betas0 = jnp.ones((num_timesteps, num_states), masked_ll.dtype)
    betas, _ = lax.scan(_step, betas0, jnp.arange(min(lag, num_timesteps - 1)))
    joint = filtered[start] * betas
    total = jnp.sum(joint, axis=1, keepdims=True)
    return joint / jnp.where(total > 0, total, 1.0)


@jax.jit
def _predict(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
    future_transitions: Float[Array, "H K K"],
) -> Float[Array, "H K"]:
    _, filtered, _, _, _ = _forward_impl(initial_probs, transition_matrix, log_likelihoods, length)

    def _step(probs, trans):
        probs = probs @ trans
        return probs, probs

    _, out = lax.scan(_step, filtered[-1], future_transitions)
    return out


# --------------------------------------------------------------------------- validation


def _validate(initial_probs, transition_matrix, log_likelihoods, length):
    """Shape checks (ValueError) and value checks; returns canonical guarded arrays."""
    ll = _checks.as_float_array("log_likelihoods", log_likelihoods)
    pi = _checks.as_float_array("initial_probs", initial_probs)
    trans = _checks.as_float_array("transition_matrix", transition_matrix)
    _checks.check_shape("log_likelihoods", ll, ("T", "K"), "log p(y_t | z_t = k); use jax.vmap for a batch")
    num_timesteps, num_states = ll.shape
    if num_timesteps < 1:
        raise ValueError(f"`log_likelihoods` must have at least one time step; got shape {tuple(ll.shape)}.")
    if num_states < 1:
        raise ValueError(f"`log_likelihoods` must have at least one state; got shape {tuple(ll.shape)}.")
    _checks.check_shape("initial_probs", pi, (num_states,), f"K = {num_states} from log_likelihoods")
    _checks.check_shape_options(
        "transition_matrix",
        trans,
        [(num_states, num_states), (num_timesteps - 1, num_states, num_states)],
        f"stationary (K, K), or time-varying (T-1, K, K) with T = {num_timesteps}, K = {num_states}",
    )
    dtype = jnp.result_type(ll.dtype, pi.dtype, trans.dtype)
    ll, pi, trans = ll.astype(dtype), pi.astype(dtype), trans.astype(dtype)
    length_arr = _checks.check_length(length, num_timesteps)
    if length_arr is None:
        length_arr = jnp.asarray(num_timesteps, jnp.int32)
    valid = jnp.arange(num_timesteps) < length_arr
    pi = _checks.check_probability_vector("initial_probs", pi)
    if trans.ndim == 3:
        # Only transitions between real steps are used (and checked).
        trans = jnp.where(valid[1:, None, None], trans, jnp.asarray(1.0 / num_states, dtype))
    trans = _checks.check_probability_vector("transition_matrix", trans)
    # The checks on ``log_likelihoods`` guard the small ``initial_probs`` (used by every
    # algorithm): guarding ``ll`` itself made XLA keep a (T, K) copy of it.
    pi = _checks.check_values(
        pi, jnp.isnan(ll) & valid[:, None], "`log_likelihoods` contains NaN at unpadded steps."
    )
    pi = _checks.check_values(
        pi,
        (ll == jnp.inf) & valid[:, None],
        "`log_likelihoods` contains +inf at unpadded steps.",
    )
    return pi, trans, ll, length_arr


_ARGS_DOC = r"""
        initial_probs: :math:`\pi_k = p(z_0 = k)`, shape (K,).
        transition_matrix: :math:`A_{ij} = p(z_{t+1} = j \mid z_t = i)`, shape (K, K), or
            time-varying (T-1, K, K) where entry ``t`` moves :math:`z_t` to :math:`z_{t+1}`.
        log_likelihoods: :math:`\ell_t(k) = \log p(y_t \mid z_t = k)`, shape (T, K).
        length: number of real steps ``L`` (int, may be traced); steps ``t >= L`` are
            padding and may hold anything (NaN and inf included). ``None`` means ``T``.
            See :mod:`ssmjax._types`."""


# --------------------------------------------------------------------------- public API


def hmm_filter(
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    *,
    length=None,
    parallel: bool = False,
) -> HMMFilterResult:
    r"""Forward filtering and the marginal log-likelihood of one sequence.

    .. math::
        p(z_t \mid y_{0:t-1}) = \sum_i p(z_{t-1} = i \mid y_{0:t-1}) A_{i,z_t}, \qquad
        p(z_t \mid y_{0:t}) = \frac{p(z_t \mid y_{0:t-1}) e^{\ell_t(z_t)}}{c_t}, \qquad
        \log p(y_{0:L-1}) = \sum_{t<L} \log c_t

    with :math:`c_t = p(y_t \mid y_{0:t-1})`. Conventions: :mod:`ssmjax._types`;
    numerics and padding: :mod:`ssmjax._hmm.inference`. ``marginal_loglik`` has
    a memory-lean custom gradient (see the module docstring).

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        :class:`HMMFilterResult` with ``marginal_loglik`` (), ``filtered_probs`` (T, K)
        and ``predicted_probs`` (T, K). Padded rows repeat ``filtered_probs[L-1]``.

    Raises:
        ValueError: on shape mismatches (naming the argument and both shapes), and, when
            value checks are on, if probabilities are negative / do not sum to one or
            ``log_likelihoods`` is NaN/+inf at a real step (under ``jit`` these fire at
            run time through :func:`equinox.error_if`).

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> post = ssmjax.hmm_filter(pi, A, ll)
        >>> post.filtered_probs.shape
        (3, 2)
        >>> grads = jax.grad(lambda l: ssmjax.hmm_filter(pi, A, l).marginal_loglik)(ll)
        >>> bool(jnp.allclose(grads.sum(1), 1.0))
        True
        >>> lengths = jnp.array([3, 2])
        >>> batch = jnp.stack([ll, ll.at[2].set(jnp.nan)])
        >>> out = jax.vmap(lambda l, n: ssmjax.hmm_filter(pi, A, l, length=n))(batch, lengths)
        >>> out.marginal_loglik.shape
        (2,)
    """
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        from .parallel import _filter_parallel

        return _filter_parallel(pi, trans, ll, n)
    return _filter(pi, trans, ll, n)


def hmm_smoother(
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    *,
    length=None,
    parallel: bool = False,
) -> HMMPosterior:
    r"""Forward-backward smoothing of one sequence.

    With the scaled backward messages :math:`\hat\beta_{L-1} = 1`,
    :math:`\hat\beta_t(i) = \sum_j A_{ij} e^{\ell_{t+1}(j)} \hat\beta_{t+1}(j) / c_{t+1}`:

    .. math::
        p(z_t = k \mid y_{0:L-1}) = p(z_t = k \mid y_{0:t})\, \hat\beta_t(k), \qquad
        \xi_t(i, j) = \frac{p(z_t = i \mid y_{0:t}) A_{ij} e^{\ell_{t+1}(j)} \hat\beta_{t+1}(j)}{c_{t+1}}.

    All outputs are differentiable (``marginal_loglik`` through the custom VJP,
    the rest by automatic differentiation).

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        :class:`HMMPosterior`; ``expected_transitions`` is :math:`\sum_{t<L-1} \xi_t`,
        shape (K, K), also for a time-varying ``transition_matrix``.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> post = ssmjax.hmm_smoother(pi, A, ll)
        >>> bool(jnp.allclose(post.smoothed_probs.sum(1), 1.0))
        True
        >>> round(float(post.expected_transitions.sum()), 6)  # T - 1 pairs
        2.0
    """
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        from .parallel import _smoother_parallel

        return _smoother_parallel(pi, trans, ll, n)
    return _smoother(pi, trans, ll, n)


def hmm_two_slice_marginals(
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    *,
    length=None,
) -> Array:
    r"""Pairwise posteriors :math:`\xi_t(i, j) = p(z_t = i, z_{t+1} = j \mid y_{0:L-1})`.

    Computed as in :func:`ssmjax.hmm_smoother` (see its equations).

    Args:{args}

    Returns:
        Array of shape (T-1, K, K); entry ``t`` pairs step ``t`` (rows) with ``t+1``
        (columns). Pairs with ``t + 1 >= length`` are zero.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> xi = ssmjax.hmm_two_slice_marginals(pi, A, ll)
        >>> xi.shape
        (2, 2, 2)
    """
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    return _two_slice(pi, trans, ll, n)


def hmm_viterbi(
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    *,
    length=None,
    parallel: bool = False,
):
    r"""Most likely state path (Viterbi), computed in log space.

    .. math::
        \delta_0(k) = \log\pi_k + \ell_0(k), \qquad
        \delta_t(j) = \max_i \big(\delta_{t-1}(i) + \log A_{ij}\big) + \ell_t(j),

    then backtracking from :math:`\arg\max_k \delta_{L-1}(k)`.

    Ties are broken deterministically towards the **lowest state index**, both
    in the maximisation over predecessors and for the final state.

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        ``(path, log_prob)``: ``path`` int32 of shape (T,), the maximiser of
        :math:`p(z_{0:L-1}, y_{0:L-1})` (padded entries repeat ``path[L-1]``), and
        ``log_prob`` () :math:`= \max_z \log p(z_{0:L-1}, y_{0:L-1})`.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.05, 0.9]]))
        >>> path, log_prob = ssmjax.hmm_viterbi(pi, A, ll)
        >>> path.tolist()
        [0, 0, 1]
    """
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        from .parallel import _viterbi_parallel

        return _viterbi_parallel(pi, trans, ll, n)
    return _viterbi(pi, trans, ll, n)


def hmm_sample_posterior(
    key: PRNGKeyArray,
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    *,
    length=None,
    parallel: bool = False,
) -> Array:
    r"""An exact draw of :math:`z_{0:L-1} \sim p(z \mid y_{0:L-1})` (forward filter, backward sample).

    .. math::
        z_{L-1} \sim p(z_{L-1} \mid y_{0:L-1}), \qquad
        p(z_t = i \mid z_{t+1}, y) \propto p(z_t = i \mid y_{0:t}) A_{i, z_{t+1}}.

    For several draws, ``jax.vmap`` over keys.

    Args:
        key: a JAX PRNG key.{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        int32 array of shape (T,); padded entries repeat the state at ``L - 1``.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> keys = jax.random.split(jax.random.key(0), 100)
        >>> draws = jax.vmap(lambda k: ssmjax.hmm_sample_posterior(k, pi, A, ll))(keys)
        >>> draws.shape
        (100, 3)
    """
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        from .parallel import _sample_posterior_parallel

        return _sample_posterior_parallel(key, pi, trans, ll, n)
    return _sample_posterior(key, pi, trans, ll, n)


def hmm_fixed_lag_smoother(
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    lag: int,
    *,
    length=None,
) -> Array:
    r"""Fixed-lag smoothing: row ``t`` is :math:`p(z_{t-\mathrm{lag}} \mid y_{0:t})`.

    .. math::
        p(z_s \mid y_{0:t}) \propto p(z_s \mid y_{0:s})\, \hat\beta^{(t)}_s, \qquad
        \hat\beta^{(t)}_t = 1, \quad
        \hat\beta^{(t)}_{r-1} \propto A_{r-1}\big(e^{\ell_r} \odot \hat\beta^{(t)}_r\big)

    with :math:`s = \max(t - \mathrm{lag}, 0)`: rows ``t < lag`` hold
    :math:`p(z_0 \mid y_{0:t})` (the smoothed first state given the data so far).
    All windows are advanced together by a scan of ``lag`` vectorised backward
    steps: :math:`O(T \cdot \mathrm{lag} \cdot K^2)` work, :math:`O(T K)` memory.
    ``lag = 0`` gives the filtered probabilities; ``lag >= T - 1`` gives, in the last
    row, the smoothed :math:`p(z_{T-1-\mathrm{lag}} \mid y)`. Rows ``t >= length``
    hold :math:`p(z_{t-\mathrm{lag}} \mid y_{0:L-1})` (no further data arrives).

    Args:{args}
        lag: non-negative Python int (static: the scan length).

    Returns:
        Array of shape (T, K).

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`, and for a negative or non-int ``lag``.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> probs = ssmjax.hmm_fixed_lag_smoother(pi, A, ll, lag=1)
        >>> probs.shape
        (3, 2)
    """
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ValueError(f"`lag` must be a non-negative Python int; got {lag!r}.")
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    return _fixed_lag(pi, trans, ll, n, lag=lag)


def hmm_predict(
    initial_probs: ArrayLike,
    transition_matrix: ArrayLike,
    log_likelihoods: ArrayLike,
    num_steps: int,
    *,
    length=None,
    future_transition_matrix: Optional[ArrayLike] = None,
) -> Array:
    r"""State predictions :math:`p(z_{L-1+h} \mid y_{0:L-1})` for ``h = 1..num_steps``.

    .. math::
        p(z_{L-1+h} \mid y_{0:L-1}) = p(z_{L-1} \mid y_{0:L-1})\, F_0 F_1 \cdots F_{h-1}

    where :math:`F_h` is ``future_transition_matrix`` (entry ``h`` moves
    :math:`z_{L-1+h}` to :math:`z_{L+h}`). Prediction starts from the last *real* step
    ``L - 1`` (``L = length``), whatever the padding holds.

    Args:{args}
        num_steps: horizon ``H`` (positive Python int).
        future_transition_matrix: transitions beyond the data, shape (K, K) or (H, K, K).
            Defaults to ``transition_matrix`` when that is stationary; **required**
            when ``transition_matrix`` is time-varying (its entries cover only the
            observed steps, and guessing future dynamics silently would be wrong).

    Returns:
        Array of shape (H, K).

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`; for a bad ``num_steps``; when
            ``future_transition_matrix`` is missing for a time-varying model or has
            the wrong shape or values.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> ssmjax.hmm_predict(pi, A, ll, num_steps=4).shape
        (4, 2)
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive Python int; got {num_steps!r}.")
    pi, trans, ll, n = _validate(initial_probs, transition_matrix, log_likelihoods, length)
    num_states = ll.shape[1]
    if future_transition_matrix is None:
        if trans.ndim == 3:
            raise ValueError(
                "`future_transition_matrix` of shape (K, K) or (num_steps, K, K) = "
                f"({num_steps}, {num_states}, {num_states}) is required when `transition_matrix` "
                f"is time-varying; got None."
            )
        future = jnp.broadcast_to(trans, (num_steps, num_states, num_states))
    else:
        future = _checks.as_float_array("future_transition_matrix", future_transition_matrix, trans.dtype)
        which = _checks.check_shape_options(
            "future_transition_matrix",
            future,
            [(num_states, num_states), (num_steps, num_states, num_states)],
            f"K = {num_states}, num_steps = {num_steps}",
        )
        future = _checks.check_probability_vector("future_transition_matrix", future)
        if which == 0:
            future = jnp.broadcast_to(future, (num_steps, num_states, num_states))
    return _predict(pi, trans, ll, n, future)


for _fn in (
    hmm_filter,
    hmm_smoother,
    hmm_two_slice_marginals,
    hmm_viterbi,
    hmm_sample_posterior,
    hmm_fixed_lag_smoother,
    hmm_predict,
):
    _fn.__doc__ = _fn.__doc__.replace("{args}", _ARGS_DOC)
del _fn
