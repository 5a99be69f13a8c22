r"""Parallel-in-time (associative-scan) inference in discrete hidden Markov models.

Private counterparts of :func:`ssmjax.hmm_filter`, :func:`ssmjax.hmm_smoother`,
:func:`ssmjax.hmm_viterbi` and :func:`ssmjax.hmm_sample_posterior` with the same
arguments, validation (:func:`ssmjax._hmm.validate.validate`, so errors are
identical), return types and documented padded outputs, but with
:math:`O(\log T)` depth: every recursion is a :func:`jax.lax.associative_scan`
(Hassan, Särkkä & García-Fernández, 2021). They do :math:`O(T K^3)` work instead
of :math:`O(T K^2)`, so they pay off only on parallel hardware (see
``benchmarks/parallel.py``).

Elements
    Step ``t`` is the matrix :math:`M_t(i, j) = A_{t-1}(i, j)\, e^{\ell_t(j) - m_t}`
    (``m_t = max_k ℓ_t(k)``); step 0 is :math:`M_0(i, j) = \pi_j e^{\ell_0(j) - m_0}`
    (all rows equal). The prefix products :math:`M_0 M_1 \cdots M_t` have every row
    equal to the unnormalised forward message :math:`\alpha_t`; the suffix products
    :math:`M_{t+1} \cdots M_{L-1} \mathbf 1` are the backward messages
    :math:`\beta_t`. An element is stored as ``(matrix / s, log s + log-scale)`` with
    ``s`` the largest entry, so products never underflow or overflow as a whole
    (float32 works for any ``T``); ``s`` carries no gradient (the represented
    value does not depend on it), so plain automatic differentiation is exact.
    The log-scales are summed along the scan tree, i.e. pairwise: the float32
    log-likelihood of ``T = 10^5`` steps keeps a relative error of about ``1e-7``.

Viterbi
    The same scan in the max-plus semiring on :math:`V_t(i, j) = \log A_{t-1}(i, j) +
    \ell_t(j)` gives every :math:`\delta_t` (the best log joint of a path ending in
    each state). Back-pointers are then computed for all steps at once exactly as in
    the sequential code (first maximum = lowest index) and the backtrack, a
    composition of the maps ``z_{t+1} -> z_t``, is itself an associative scan
    (composition of index maps). Because the rule "lowest index among the optimal
    predecessors, starting from the lowest optimal final state" picks the optimal path
    that is smallest in reverse-lexicographic order, the parallel and sequential
    paths are identical whenever their :math:`\delta_t` are: always in exact
    arithmetic. **Degenerate case**: the scan adds the same terms in a different
    order, so when two paths have *exactly equal* scores in real arithmetic but the
    float sums round differently (for example a symmetric model with
    ``log A`` not exactly representable), either implementation may break the tie
    differently by one ulp; both paths are then optimal to rounding and the
    ``log_prob`` values agree to rounding. When all scores are computed exactly
    (e.g. integer log-likelihoods and ``A``, ``pi`` with entries in {0, 1}) ties are
    broken identically.

Posterior sampling
    For every step ``t`` and every possible next state ``j`` a state is drawn from
    :math:`p(z_t \mid z_{t+1} = j, y_{0:t}) \propto p(z_t \mid y_{0:t}) A_t(\cdot, j)`
    (one key per step, shared by the ``K`` draws, exactly as the sequential code
    uses it), and the sample is the composition of these maps from the final
    draw: an exact draw from :math:`p(z_{0:L-1} \mid y_{0:L-1})` (each step only
    ever uses one of its ``K`` draws). With the same key the draw equals the
    sequential one, up to floating-point rounding of the filtered probabilities.

Underflow
    Each element is scaled by the maximum log-likelihood of its step (not by the
    exact log-sum-exp with the predicted probabilities, which a parallel method
    does not have). If at some real step every state with non-zero predicted
    probability is more than ~700 nats (float64; ~87 in float32) less likely than
    a state of predicted probability zero, that step's weights underflow to zero
    and the scan's log-likelihood is ``-inf``. Such a sequence is redone by the
    sequential program, whose forward pass has the underflow-proof rescue
    (:mod:`ssmjax._hmm.recursion`), decided inside the compiled program by
    :func:`ssmjax._fallback.fallback` (a conditional that stays one under ``jax.vmap``);
    a sequence that is truly impossible under the model keeps its ``-inf``.

Padding follows :mod:`ssmjax._hmm.inference`: steps ``t >= length`` get
``ℓ_t = 0`` and identity transitions, through ``where`` before any arithmetic, so
NaN/inf there reach neither values nor gradients.

References:
    S. S. Hassan, S. Särkkä and Á. F. García-Fernández, "Temporal parallelization
    of inference in hidden Markov models", IEEE Trans. Signal Processing 69, 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._fallback import fallback
from .decoding import sample_posterior_program
from .recursion import _safe_log
from .results import HMMFilterResult, HMMPosterior
from .rules import filter_program, smoother_program

__all__ = [
    "_filter_parallel",
    "_smoother_parallel",
    "_viterbi_parallel",
    "_sample_posterior_parallel",
]


# --------------------------------------------------------------------------- elements and combines


def _masked_inputs(transition_matrix, log_likelihoods, length):
    """``(valid, masked_ll, peaks, trans)``: padding replaced by ``ℓ = 0`` and identity moves.

    ``trans`` has shape (T-1, K, K) (a stationary matrix is broadcast); entry ``t``
    moves ``z_t`` to ``z_{t+1}`` and is the identity when ``t + 1 >= length``.
    """
    num_timesteps, num_states = log_likelihoods.shape
    valid = jnp.arange(num_timesteps) < length
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    peaks = lax.stop_gradient(jnp.max(masked_ll, axis=1))
    peaks = jnp.where(jnp.isfinite(peaks), peaks, 0.0)
    eye = jnp.eye(num_states, dtype=log_likelihoods.dtype)
    trans = jnp.broadcast_to(transition_matrix, (num_timesteps - 1, num_states, num_states))
    trans = jnp.where(valid[1:, None, None], trans, eye)
    return valid, masked_ll, peaks, trans


def _normalise(matrix: Float[Array, "*N K K"]):
    """``(matrix / s, log s)`` with ``s`` the largest entry (1 if all zero), no gradient on ``s``."""
    scale = lax.stop_gradient(jnp.max(matrix, axis=(-2, -1)))
    scale = jnp.where(scale > 0, scale, 1.0)
    return matrix / scale[..., None, None], jnp.log(scale)


def _product_combine(earlier, later):
    """``earlier @ later`` on scaled elements ``(matrix, log_scale)``."""
    m_a, log_a = earlier
    m_b, log_b = later
    matrix, log_s = _normalise(jnp.matmul(m_a, m_b))
    return matrix, log_a + log_b + log_s


def _maxplus_combine(earlier, later):
    """Max-plus product ``C(i, k) = max_j a(i, j) + b(j, k)``."""
    return jnp.max(earlier[..., :, :, None] + later[..., None, :, :], axis=-2)


def _compose_combine(earlier, later):
    """Suffix composition of index maps (scanned on reversed time): ``later ∘ earlier``."""
    return jnp.take_along_axis(later, earlier, axis=-1)


def _elements(initial_probs, masked_ll, peaks, trans):
    """Scaled elements ``M_t`` (T, K, K) and their log-scales (T,)."""
    num_states = masked_ll.shape[1]
    weights = jnp.exp(masked_ll - peaks[:, None])
    first = jnp.broadcast_to(initial_probs * weights[0], (num_states, num_states))
    rest = trans * weights[1:, None, :]
    matrices, log_s = _normalise(jnp.concatenate([first[None], rest]))
    return matrices, log_s + peaks


def _forward(initial_probs, masked_ll, peaks, trans, valid, length):
    """``(loglik, filtered, predicted, raw_filtered)`` from the prefix products."""
    matrices, log_scales = _elements(initial_probs, masked_ll, peaks, trans)
    prefix, prefix_log = lax.associative_scan(_product_combine, (matrices, log_scales))
    alpha = prefix[:, 0, :]  # every row is alpha_t (scaled)
    total = jnp.sum(alpha, axis=1)
    safe_total = jnp.where(total > 0, total, 1.0)
    raw = alpha / safe_total[:, None]
    # Padded steps are identity moves with zero log-likelihood: the last prefix is that of L-1.
    # -inf where the scan underflowed (the caller redoes that sequence), through a safe log so that
    # the discarded result's derivatives are zeros, not NaN
    loglik = prefix_log[-1] + jnp.where(total[-1] > 0, jnp.log(safe_total[-1]), -jnp.inf)
    last = lax.dynamic_index_in_dim(raw, length - 1, keepdims=False)
    filtered = jnp.where(valid[:, None], raw, last)
    moved = jnp.einsum("ti,tij->tj", filtered[:-1], trans)
    predicted = jnp.concatenate([initial_probs[None], moved])
    predicted = jnp.where(valid[:, None], predicted, last)
    return loglik, filtered, predicted, moved


def _rescued(loglik, result, sequential, args):
    """``result``, or where the scan's log-likelihood underflowed to ``-inf`` (see Underflow above),
    ``sequential(*args)``: the same quantities from the sequential recursion and its rescue."""
    return fallback(jnp.isneginf(loglik), result, sequential, args)


# --------------------------------------------------------------------------- jitted algorithms


@jax.jit
def _filter_parallel(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> HMMFilterResult:
    valid, masked_ll, peaks, trans = _masked_inputs(transition_matrix, log_likelihoods, length)
    loglik, filtered, predicted, _ = _forward(initial_probs, masked_ll, peaks, trans, valid, length)
    result = HMMFilterResult(loglik, filtered, predicted)
    return _rescued(loglik, result, filter_program, (initial_probs, transition_matrix, log_likelihoods, length))


@jax.jit
def _smoother_parallel(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> HMMPosterior:
    num_timesteps, num_states = log_likelihoods.shape
    valid, masked_ll, peaks, trans = _masked_inputs(transition_matrix, log_likelihoods, length)
    loglik, filtered, predicted, moved = _forward(initial_probs, masked_ll, peaks, trans, valid, length)
    # Backward messages: beta_t = M_{t+1} ... M_{T-1} 1 (padded elements are identities).
    matrices, log_scales = _elements(initial_probs, masked_ll, peaks, trans)
    eye = jnp.eye(num_states, dtype=matrices.dtype)
    suffix_elems = jnp.concatenate([matrices[1:], eye[None]])
    suffix_logs = jnp.concatenate([log_scales[1:], jnp.zeros((1,), log_scales.dtype)])
    # Reverse time by hand so the combine's argument order is explicit.
    suffix, _ = lax.associative_scan(
        lambda later, earlier: _product_combine(earlier, later),
        (suffix_elems[::-1], suffix_logs[::-1]),
    )
    betas = jnp.sum(suffix[::-1], axis=2)  # (T, K), each scaled by a constant
    joint = filtered * betas
    norm = jnp.sum(joint, axis=1, keepdims=True)
    smoothed = joint / jnp.where(norm > 0, norm, 1.0)
    last = lax.dynamic_index_in_dim(filtered, length - 1, keepdims=False)
    smoothed = jnp.where(valid[:, None], smoothed, last)
    # xi_t(i, j) = filtered_t(i) A_t(i, j) w_{t+1}(j) / Z_t with w = exp(ll - m) beta.
    weights = jnp.exp(masked_ll[1:] - peaks[1:, None]) * betas[1:]
    pair_valid = valid[1:]
    z = jnp.sum(moved * weights, axis=1)
    ok = pair_valid & (z > 0)
    u = jnp.where(ok[:, None], filtered[:-1] / jnp.where(ok, z, 1.0)[:, None], 0.0)
    if transition_matrix.ndim == 3:
        expected = jnp.einsum("ti,tj,tij->ij", u, weights, trans)
    else:
        expected = transition_matrix * (u.T @ weights)
    result = HMMPosterior(loglik, filtered, predicted, smoothed, expected)
    return _rescued(loglik, result, smoother_program, (initial_probs, transition_matrix, log_likelihoods, length))


def _backtrack(pointers: Int[Array, "N K"], last_state: Int[Array, ""]) -> Int[Array, " N+1"]:
    """``path[T-1] = last_state``, ``path[t] = pointers[t][path[t+1]]`` by a parallel suffix composition."""
    composed = lax.associative_scan(_compose_combine, pointers[::-1])[::-1]
    path = composed[:, last_state]
    return jnp.concatenate([path, last_state[None]]).astype(jnp.int32)


@jax.jit
def _viterbi_parallel(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
):
    num_timesteps, num_states = log_likelihoods.shape
    valid, masked_ll, _, trans = _masked_inputs(transition_matrix, log_likelihoods, length)
    log_trans = _safe_log(trans)  # identity at padded pairs: 0 on the diagonal, -inf off it
    first = jnp.broadcast_to(_safe_log(initial_probs) + masked_ll[0], (num_states, num_states))
    rest = log_trans + masked_ll[1:, None, :]
    elements = jnp.concatenate([first[None], rest])
    deltas = lax.associative_scan(_maxplus_combine, elements)[:, 0, :]  # (T, K)
    # Back-pointers exactly as the sequential recursion: first maximum = lowest index.
    cand = deltas[:-1, :, None] + log_trans  # (T-1, from i, to j)
    states = jnp.arange(num_states, dtype=jnp.int32)
    pointers = jnp.argmax(cand, axis=1).astype(jnp.int32)
    pointers = jnp.where(valid[1:, None], pointers, states)
    last_state = jnp.argmax(deltas[-1]).astype(jnp.int32)
    return _backtrack(pointers, last_state), jnp.max(deltas[-1])


@jax.jit
def _sample_posterior_parallel(
    key: PRNGKeyArray,
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> Int[Array, " T"]:
    num_timesteps, num_states = log_likelihoods.shape
    valid, masked_ll, peaks, trans = _masked_inputs(transition_matrix, log_likelihoods, length)
    loglik, filtered, _, _ = _forward(initial_probs, masked_ll, peaks, trans, valid, length)
    keys = jax.random.split(key, num_timesteps)
    last = jax.random.categorical(keys[-1], _safe_log(filtered[-1])).astype(jnp.int32)
    # logits[t, j, i] = log(filtered_t(i) A_t(i, j)): the conditional of z_t given z_{t+1} = j.
    logits = _safe_log(jnp.swapaxes(filtered[:-1, :, None] * trans, 1, 2))

    def _draw(key_t, logits_t):
        # one key per step, shared by the K draws (as the sequential code uses it)
        return jax.vmap(lambda lg: jax.random.categorical(key_t, lg))(logits_t)

    draws = jax.vmap(_draw)(keys[:-1], logits).astype(jnp.int32)
    states = jnp.arange(num_states, dtype=jnp.int32)
    pointers = jnp.where(valid[1:, None], draws, states)
    args = (key, initial_probs, transition_matrix, log_likelihoods, length)
    return _rescued(loglik, _backtrack(pointers, last), sample_posterior_program, args)
