r"""The HMM forward and backward recursions, each written once, for one sequence or a batch.

Every HMM inference function, the custom gradients, the ``jax.vmap`` rules and fit_em's E-step
run :func:`forward` and :func:`backward`. Each is one loop over time around one named step:

* :func:`forward_step`: :math:`w = \hat p_t \odot e^{\ell_t - m_t}`, :math:`c_t = \sum_k w_k`,
  filtered :math:`= w / c_t`, next prediction :math:`= \text{filtered}\, A_t`; its
  underflow-proof form :func:`rescue_step` takes over for a sequence whose normaliser
  underflows (see the numerics in :mod:`ssmjax._hmm.inference`).
* :func:`backward_step`: :math:`v_t = w_t \odot \hat\beta_t` with the emission weights
  :math:`w_t = e^{\ell_t - \log c_t}`, :math:`\hat\beta_{t-1} = A_{t-1} v_t`.

**Layouts.** The arrays keep their caller's layout, named by its axes (``B`` batch, ``T``
time, ``K`` states): ``"TK"`` is one sequence, ``"BTK"`` what ``jax.vmap`` hands a batching
rule (no transposed copy in or out), ``"TBK"`` and ``"TKB"`` the E-step's. A loop step reads
and writes one block: a (K,) vector, a (B, K) block of rows (one matrix product a step), or a
state-major (K, B) block (``"TKB"``: the batch is the vectorised minor axis, faster for a few
states). Per-step scalars (shifts, normalisers) are (T,) or time-major (T, B).

**Drivers.** One sequence runs the loop as a ``lax.scan`` over time-major inputs, which
reverse-mode differentiation needs (:func:`_scan`). A batch runs it as a ``fori_loop`` that
reads and writes each step in place along the time axis of its layout (:func:`_indexed`), with
the masking for padding compiled only into a second loop taken when some sequence is padded.

**Strategies** (chosen by the callers, see :mod:`ssmjax._hmm.strategy`): where the emissions
:math:`e^{\ell_t - m_t}` are exponentiated (``emissions``: all steps before the loop, or the
shifts before and the exponentials in the loop, or both in the loop), whether padded rows are
frozen in the loop, and the run-time underflow rescue.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from .._fallback import _any_in_batch
from .._fallback import fallback as _fallback

# --------------------------------------------------------------------------- numerics and products


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


# Up to this many states a vector-matrix product in a scan step is a fused multiply-sum
# (no call into a matmul kernel): measured ~10% faster smoother steps at K = 16 on CPU.
_FUSED_MATVEC_MAX_STATES = 16


# Up to this many states a block of rows (B, K) is also multiplied by a fused multiply-sum: measured
# 8x faster loop steps than a matrix product at K = 5, B = 100 (a matmul kernel call per step costs
# more than the work); equal at K = 16, where the matrix product is kept.
_FUSED_BLOCK_MAX_STATES = 8


def _fused(x: Array) -> bool:
    return x.shape[-1] <= (_FUSED_MATVEC_MAX_STATES if x.ndim == 1 else _FUSED_BLOCK_MAX_STATES)


def _vecmat(x: Float[Array, "*B K"], matrix: Float[Array, "K M"]) -> Float[Array, "*B M"]:
    """``x @ matrix``; for a few states a fused multiply-sum (no call into a matmul kernel)."""
    if _fused(x):
        return jnp.sum(x[..., :, None] * matrix, axis=-2)
    return x @ matrix


def _matvec(matrix: Float[Array, "K K"], x: Float[Array, "*B K"]) -> Float[Array, "*B K"]:
    """``matrix @ x`` for a vector, ``x @ matrix.T`` for a batch of rows ``(B, K)`` (see :func:`_vecmat`)."""
    if x.ndim > 1:
        return jnp.sum(matrix * x[:, None, :], axis=-1) if _fused(x) else x @ matrix.T
    if x.shape[0] <= _FUSED_MATVEC_MAX_STATES:
        return jnp.sum(matrix * x[None, :], axis=1)
    return matrix @ x  # measured 1.25-1.9x faster than x @ matrix.T in a scan step at K = 32-64


def _augmented_transitions(transition_matrix: Float[Array, "*S K K"]):
    """``[A | 1]`` for a stationary ``A``, None for a time-varying one (see :func:`forward_step`).

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


def _exponent_split(probs: Float[Array, "..."]):
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


def _state_max(x: Array, axis: int = 1) -> Array:
    """``max(x, axis)`` over the states axis; for a few states as elementwise maxima of slices.

    XLA's CPU row reduction over a short minor axis is slow (measured 0.15 ms at
    T = 1e4, K = 4, about a third of a whole forward pass; the elementwise form is ~3x faster).
    """
    num_states = x.shape[axis]
    if num_states <= 8:
        return functools.reduce(jnp.maximum, [lax.index_in_dim(x, k, axis, keepdims=False) for k in range(num_states)])
    return jnp.max(x, axis=axis)


def _underflow_threshold(dtype) -> float:
    """``log sqrt(tiny)``: a normaliser ``c_t < sqrt(tiny)`` sends a pass to the rescue mode of :func:`forward`."""
    return 0.5 * math.log(float(jnp.finfo(dtype).tiny))


def _emission_weights(ll, peak, log_c):
    r"""``exp(ll_t - log c_t)`` (NaN/overflow -> 0, see :func:`_finite_or_zero`)."""
    return _finite_or_zero(jnp.exp((ll - peak) - log_c))


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
    if x.shape[0] <= _FUSED_BLOCK_MAX_STATES:
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


def _time_update(buffer, row, t, time_axis):
    row = jnp.expand_dims(row, time_axis)
    return lax.dynamic_update_slice_in_dim(buffer, row, t, time_axis, allow_negative_indices=False)


# --------------------------------------------------------------------------- layouts

LAYOUTS = ("TK", "BTK", "TBK", "TKB")

# Where the emissions e^{ll_t - m_t} are computed: "before-loop" (one vectorised pass over all
# steps; the loop body is then a few kernels), "shifts-before-loop" (the shifts m_t before, the
# exponentials in the loop: no (T, ..., K) array of emissions) or "in-loop" (both in the loop).
EMISSIONS = ("before-loop", "shifts-before-loop", "in-loop")


def _check_options(layout: str, emissions: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}; got {layout!r}.")
    if emissions not in EMISSIONS:
        raise ValueError(f"`emissions` must be one of {EMISSIONS}; got {emissions!r}.")


def states_axis(layout: str) -> int:
    """Axis of the states in a loop step's block: 0 for state-major (K, B), -1 otherwise."""
    return 0 if layout == "TKB" else -1


def _step_axes(layout: str) -> str:
    """Axes of the per-step arrays (shifts, normalisers): (T,) or time-major (T, B)."""
    return "TB" if "B" in layout else "T"


def _valid_all(x, lengths, axes: str):
    """``t < lengths[b]`` for every step (and sequence), shaped to broadcast against ``x`` (axes ``axes``)."""
    num_timesteps = x.shape[axes.index("T")]
    steps = jnp.expand_dims(jnp.arange(num_timesteps), [i for i, a in enumerate(axes) if a != "T"])
    return steps < jnp.expand_dims(lengths, [i for i, a in enumerate(axes) if a != "B"])


def _valid_block(t, lengths, s_axis: int):
    """``t < lengths``, shaped to broadcast against one step's block."""
    is_valid = t < lengths
    if is_valid.ndim == 0:
        return is_valid
    return is_valid[None, :] if s_axis == 0 else is_valid[:, None]


def _per_state(x, s_axis: int):
    """A per-sequence scalar (or (B,) row) shaped to broadcast against a block."""
    return jnp.expand_dims(x, s_axis)


def _state_peaks(x, layout: str):
    """``max_k x[..., k, ...]`` over the states axis of ``layout`` (0 where not finite), no gradient."""
    axis = layout.index("K")
    peaks = _state_max(x, axis=axis) if x.shape[axis] <= 8 else jnp.max(x, axis=axis)
    return lax.stop_gradient(jnp.where(jnp.isfinite(peaks), peaks, 0.0))


def _block_peak(ll, s_axis: int):
    """The shift ``max_k ll(k)`` of one step's block (0 where not finite)."""
    peak = _state_max(ll, axis=s_axis % ll.ndim)
    return jnp.where(jnp.isfinite(peak), peak, 0.0)


def _transition_steps(transition_matrix, reverse: bool):
    """Per-step transition matrices as loop inputs (None when stationary): ``A_t`` (from ``z_t``
    to ``z_{t+1}``) forward, ``A_{t-1}`` backward; the unused end entry is the identity."""
    if transition_matrix.ndim == 2:
        return None
    eye = jnp.eye(transition_matrix.shape[-1], dtype=transition_matrix.dtype)[None]
    return jnp.concatenate([eye, transition_matrix] if reverse else [transition_matrix, eye])


# --------------------------------------------------------------------------- the steps


def forward_step(pred: Array, emission: Array, transition, augmented=None, floor=None, s_axis: int = -1):
    r"""One scaled forward step: ``(filtered, c, next_pred)`` from the predicted probabilities
    :math:`\hat p_t` and the shifted emissions :math:`e^{\ell_t - m_t}`.

    ``w = pred * emission``, ``c = sum(w)``, ``filtered = w / c``, ``next_pred = filtered @ A``;
    for one sequence (K,), a block of rows (B, K) or a state-major block (K, B)
    (``s_axis = 0``). With ``floor``, the divisions use ``max(c, floor)`` (``c`` itself is
    returned): a pass whose ``c`` falls below the floor is discarded, and the floor keeps the
    cotangents of the discarded pass (zero) from meeting ``1 / 0`` under autodiff. With
    ``augmented`` (``[A | 1]``, stationary ``A``) one product gives :math:`(w A, \sum_k w_k)`, a
    kernel less per loop step (the sum is two kernels at larger ``K``). This matters beyond the
    saved kernel: XLA's CPU runtime runs a loop body of more than 8 kernels concurrently on its
    thread pool, whose hand-offs cost more than the work (measured 3x slower at K = 64), and this
    keeps the forward bodies at 7 or fewer.
    """
    w = pred * emission
    if augmented is None:
        c = jnp.sum(w, axis=s_axis)
        filtered = w / _per_state(_floored(c, floor), s_axis)
        return filtered, c, _states_product(filtered, transition, s_axis)
    num_states = w.shape[s_axis]
    moved = _states_product(w, augmented, s_axis)
    c = lax.index_in_dim(moved, num_states, s_axis, keepdims=False)
    divisor = _per_state(_floored(c, floor), s_axis)
    return w / divisor, c, lax.slice_in_dim(moved, 0, num_states, axis=s_axis) / divisor


def rescue_step(pred: Array, ll: Array, transition, s_axis: int = -1):
    r"""The forward step with a shift that cannot underflow: ``(filtered, log_c, peak, next_pred)``.

    ``log_c = log p(y_t | y_{<t}) - peak`` with ``peak = max_k ll_k``. The shift is
    :math:`s = \max_k (\ell_k - m + e_k \log 2)` over states with ``pred > 0`` (``e_k`` the
    binary exponent of ``pred_k``, read from its bits, :func:`_exponent_split`): an
    approximation of :math:`\max_k \log(\text{pred}_k e^{\ell_k - m})` to within
    :math:`\log 2`, so the largest scaled term lies in ``[1/2, 1]`` and the normaliser in
    ``[1/2, K]`` whatever the magnitudes. ``m`` and ``s`` carry no gradient.
    """
    peak = lax.stop_gradient(jnp.max(ll, axis=s_axis, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    log_scale, scale = _exponent_split(pred)
    score = (ll - peak) + log_scale
    shift = lax.stop_gradient(jnp.max(jnp.where(pred > 0, score, -jnp.inf), axis=s_axis, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    arg = score - shift
    # arg <= 0 wherever pred > 0; the clamp only guards 0 * inf for states with pred = 0,
    # whose exponential is set to 0 outright: its derivative (the exponential itself) would
    # otherwise be ~1e308 and turn a zero cotangent into NaN under autodiff.
    clip = jnp.asarray(math.log(jnp.finfo(ll.dtype).max) - 1.0, ll.dtype)
    w = (pred * scale) * jnp.exp(jnp.where(pred > 0, jnp.where(arg > clip, clip, arg), -jnp.inf))
    c = jnp.sum(w, axis=s_axis, keepdims=True)
    filtered = w / jnp.where(c > 0, c, 1.0)
    log_c = jnp.squeeze(jnp.log(c) + shift, s_axis)
    return filtered, log_c, jnp.squeeze(peak, s_axis), _states_product(filtered, transition, s_axis)


def backward_step(beta: Array, weight: Array, transition, s_axis: int = -1):
    r"""One backward step: ``(v, beta_prev)`` with :math:`v_t = w_t \odot \hat\beta_t` and
    :math:`\hat\beta_{t-1} = A_{t-1} v_t` (:func:`_backward_message`)."""
    v = weight * beta
    return v, _backward_message(transition, v, s_axis)


# --------------------------------------------------------------------------- the drivers


def _scan(body, carry, xs, steps, reverse: bool):
    """``body(True, carry, t, x)`` over ``steps`` as a ``lax.scan`` (inputs and outputs time-major)."""
    return lax.scan(lambda c, x: body(True, c, x[0], x[1]), carry, (steps, xs), reverse=reverse)


def _indexed(body, carry, xs, x_axes, out_axes, num_steps: int, lengths, reverse: bool, first: int = 0, offsets=None,
             padded: bool | None = None):
    """``body(masked, carry, t, x)`` for ``t = first .. num_steps - 1`` (descending with ``reverse``)
    as a ``fori_loop`` that reads input ``i`` at step ``t`` along its axis ``x_axes[i]`` and writes
    output ``j`` at row ``t - offsets[j]`` along ``out_axes[j]`` of a zero-filled buffer, in place.

    A batch without padding (every ``length = T``) runs the body without any masking
    (``masked=False``: no per-step selects), others with ``masked=True``: a conditional between two
    loops of static length (a loop with a run-time trip count evaluates its condition on the host
    every step, measured 1.6x slower at K = 5, B = 100). The predicate is one for the whole batch,
    also under a further ``jax.vmap`` (:func:`ssmjax._fallback._any_in_batch`). A caller that
    knows the answer statically passes ``padded`` (True or False): only that loop is compiled.
    Returns ``(carry, outputs)``.
    """
    offsets = offsets or (0,) * len(out_axes)

    def read(t):
        return tuple(None if x is None else _time_index(x, t, a) for x, a in zip(xs, x_axes))

    x0 = tuple(
        None if x is None else jax.ShapeDtypeStruct(x.shape[:a] + x.shape[a + 1 :], x.dtype)
        for x, a in zip(xs, x_axes)
    )
    blocks = jax.eval_shape(lambda c, x: body(True, c, jnp.int32(first), x)[1], carry, x0)
    buffers = tuple(
        None if b is None else jnp.zeros(b.shape[:a] + (num_steps,) + b.shape[a:], b.dtype)
        for b, a in zip(blocks, out_axes)
    )

    def loop(masked):
        def step(t, state):
            c, bufs = state
            c, outs = body(masked, c, t, read(t))
            bufs = tuple(
                b if o is None else _time_update(b, o, t - off, a)
                for b, o, a, off in zip(bufs, outs, out_axes, offsets)
            )
            return c, bufs

        if reverse:
            return lambda s: lax.fori_loop(0, num_steps - first, lambda i, c: step(num_steps - 1 - i, c), s)
        return lambda s: lax.fori_loop(first, num_steps, step, s)

    if padded is not None:
        return loop(padded)((carry, buffers))
    some_padded = _any_in_batch(jnp.any(lengths < num_steps))
    return lax.cond(some_padded, loop(True), loop(False), (carry, buffers))


# --------------------------------------------------------------------------- forward


class ForwardPass(NamedTuple):
    """What :func:`forward` returns, in its layout.

    ``filtered`` and ``predicted`` (``None`` unless ``freeze``) have padded rows that repeat the
    last real filtered row (``freeze``) or are finite and meaningless. ``peaks`` (the shifts
    :math:`m_t`) and ``log_cs`` (:math:`\\log c_t - m_t`) are per step and 0 at padded steps, so
    :math:`\\log p = \\sum_t` (``peaks + log_cs``). ``weights`` are the backward pass's emission
    weights :math:`e^{\\ell_t - \\log c_t}` (0 at padded steps) when asked for. ``needed`` flags
    the sequences whose fast pass underflowed (and were rescued, with ``rescue``).
    """

    filtered: Array
    predicted: Optional[Array]
    peaks: Array
    log_cs: Array
    weights: Optional[Array]
    needed: Array


def _forward_body(masked, carry, t, x, *, transition_matrix, augmented, lengths, s_axis, mode, floor, freeze):
    # the last filtered row is carried only to freeze padded rows in the loop
    pred, last = carry if freeze else (carry, None)
    source, shift, a_t = x
    transition = transition_matrix if a_t is None else a_t
    is_valid = _valid_block(t, lengths, s_axis) if masked else None
    peak = None
    if mode == "before-loop":
        new, norm, pred_next = forward_step(pred, source, transition, augmented, floor, s_axis)
    else:
        # padded steps: masked here, not on a copy of the input (one buffer less)
        ll = jnp.where(is_valid, source, 0.0) if masked else source
        if mode == "rescue":
            new, norm, peak, pred_next = rescue_step(pred, ll, transition, s_axis)
        else:
            if mode == "in-loop":
                peak = shift = _block_peak(ll, s_axis)
            emission = jnp.exp(ll - _per_state(shift, s_axis))
            new, norm, pred_next = forward_step(pred, emission, transition, augmented, floor, s_axis)
    if freeze and masked:
        new = jnp.where(is_valid, new, last)
        pred = jnp.where(is_valid, pred, last)
    return ((pred_next, new) if freeze else pred_next), (new, pred if freeze else None, norm, peak)


def _forward_loop(
    initial_probs,
    transition_matrix,
    log_likelihoods,
    lengths,
    layout,
    mode,
    floor,
    freeze,
    masked_ll=None,
    padded=None,
):
    """One pass of :func:`forward`: ``(filtered, predicted, peaks, norms)`` with the normalisers
    ``c_t`` (fast modes) or ``log c_t - m_t`` (``mode="rescue"``)."""
    time_axis, s_axis = layout.index("T"), states_axis(layout)
    num_timesteps = log_likelihoods.shape[time_axis]
    block = _time_index(log_likelihoods, 0, time_axis).shape
    start = jnp.broadcast_to(initial_probs[:, None] if s_axis == 0 else initial_probs, block)
    step_axes = _step_axes(layout)
    if masked_ll is None and mode in ("before-loop", "shifts-before-loop"):
        masked_ll = jnp.where(_valid_all(log_likelihoods, lengths, layout), log_likelihoods, 0.0)
    shifts = None
    if mode in ("before-loop", "shifts-before-loop"):
        shifts = _state_peaks(masked_ll, layout)
        if step_axes == "TB" and layout.replace("K", "") == "BT":
            shifts = shifts.T
    if mode == "before-loop":
        source = jnp.exp(masked_ll - _steps_against(shifts, layout))  # in [0, 1], 1 at padded steps
    else:
        source = log_likelihoods
    body = functools.partial(
        _forward_body,
        transition_matrix=transition_matrix,
        augmented=None if mode == "rescue" else _augmented_transitions(transition_matrix),
        lengths=lengths,
        s_axis=s_axis,
        mode=mode,
        floor=floor,
        freeze=freeze,
    )
    a_steps = _transition_steps(transition_matrix, reverse=False)
    xs = (source, shifts if mode == "shifts-before-loop" else None, a_steps)
    carry = (start, start) if freeze else start
    if layout == "TK":
        _, outs = _scan(body, carry, xs, jnp.arange(num_timesteps), reverse=False)
    else:
        _, outs = _indexed(
            body, carry, xs, (time_axis, 0, 0), (time_axis, time_axis, 0, 0), num_timesteps, lengths, False,
            padded=padded,
        )
    filtered, predicted, norms, peaks = outs
    emissions = source if mode == "before-loop" else None
    return filtered, predicted, (shifts if peaks is None else peaks), norms, emissions


def forward(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Array,
    lengths: Int[Array, "*B"],
    layout: str = "TK",
    *,
    emissions: str = "shifts-before-loop",
    floor: bool = False,
    freeze: bool = False,
    weights: bool = False,
    rescue: bool = True,
    padded: bool | None = None,
) -> ForwardPass:
    r"""The scaled forward recursion of one sequence (``layout="TK"``) or a batch.

    The fast pass shifts each step by :math:`m_t = \max_k \ell_t(k)`. A sequence some of whose
    normalisers fall below :math:`\sqrt{\text{tiny}}` (or are NaN) is redone with
    :func:`rescue_step` (``rescue``: a conditional that stays one under ``jax.vmap``,
    :func:`ssmjax._fallback.fallback`), whose results replace that sequence's. With
    ``floor`` the fast pass divides by normalisers floored at that threshold (for a pass that
    is differentiated, see :func:`forward_step`). A time-varying ``transition_matrix``
    (T-1, K, K) is for one sequence only. ``padded``: whether some sequence is padded, where the
    caller knows it statically (None: decided at run time, see :func:`_indexed`).
    """
    _check_options(layout, emissions)
    step_axes = _step_axes(layout)
    valid = _valid_all(log_likelihoods, lengths, layout)
    masked_ll = jnp.where(valid, log_likelihoods, 0.0) if emissions != "in-loop" or weights else None
    filtered, predicted, peaks, cs, emission = _forward_loop(
        initial_probs, transition_matrix, log_likelihoods, lengths, layout, emissions,
        _underflow_floor(log_likelihoods.dtype) if floor else None, freeze, masked_ll, padded,
    )
    steps = _valid_all(cs, lengths, step_axes)
    threshold = _underflow_floor(log_likelihoods.dtype)
    # ``not >=`` also catches NaN; padded steps count as accepted
    needed = jnp.logical_not(jnp.all(jnp.where(steps, cs, 1.0) >= threshold, axis=0))
    log_cs = jnp.log(jnp.where(steps, _floored(cs, threshold), 1.0))

    def _finish(filtered, predicted, peaks, log_cs, emission=None, cs=None):
        peaks = jnp.where(steps, peaks, 0.0)
        log_cs = jnp.where(steps, log_cs, 0.0)
        w = None
        if weights and emission is not None:
            # the emissions of the loop over its (floored) normalisers: finite on an accepted pass
            w = emission / _steps_against(_floored(cs, threshold), layout)
        elif weights:
            w = _emission_weights(masked_ll, _steps_against(peaks, layout), _steps_against(log_cs, layout))
        if weights:
            w = jnp.where(valid, w, 0.0)
        return filtered, predicted, peaks, log_cs, w

    fast = _finish(filtered, predicted, peaks, log_cs, emission, cs)
    if not rescue:
        return ForwardPass(*fast, needed)

    def _rescued(needed, fast):
        robust = _forward_loop(
            initial_probs, transition_matrix, log_likelihoods, lengths, layout, "rescue", None, freeze,
            padded=padded,
        )
        robust = _finish(*robust[:4])
        if layout == "TK":  # the fallback itself selects per sequence
            return robust
        return tuple(
            None if r is None else jnp.where(_sequences_against(needed, r.ndim, layout), r, f)
            for r, f in zip(robust, fast)
        )

    flag = needed if layout == "TK" else jnp.any(needed)
    out = _fallback(flag, fast, _rescued, (needed, fast))
    return ForwardPass(*out, needed)


def _underflow_floor(dtype) -> float:
    """``sqrt(tiny)``: a normaliser below it sends a sequence to :func:`rescue_step`."""
    return math.exp(_underflow_threshold(dtype))


def _steps_against(x, layout: str):
    """A per-step (T,) or (T, B) array shaped to broadcast against an array in ``layout``."""
    if "B" in layout and layout.replace("K", "") == "BT":
        x = x.T
    return jnp.expand_dims(x, layout.index("K"))


def _sequences_against(flags, ndim: int, layout: str):
    """Per-sequence flags (B,) shaped against an array in ``layout`` (ndim 3) or a per-step (T, B) one."""
    axes = layout if ndim == 3 else "TB"
    return jnp.expand_dims(flags, [i for i, a in enumerate(axes) if a != "B"])


# --------------------------------------------------------------------------- backward


def _backward_body(
    masked, beta, t, x, *, transition_matrix, lengths, s_axis, mode, padded_rows_zero, row_scale, betas_only=False
):
    source, peak, log_c, filtered, a_t = x
    transition = transition_matrix if a_t is None else a_t
    is_valid = _valid_block(t, lengths, s_axis) if masked else None
    if mode == "before-loop":
        w = source  # 0 at padded steps
    else:
        ll = jnp.where(is_valid, source, 0.0) if masked else source
        w = _emission_weights(ll, _per_state(peak, s_axis), _per_state(log_c, s_axis))
        if masked:
            w = jnp.where(is_valid, w, 0.0)
    v, beta_prev = backward_step(beta, w, transition, s_axis)
    if masked:
        beta_prev = jnp.where(is_valid, beta_prev, 1.0)
    if betas_only:
        # Writing the new carry (not the old one) spares XLA a copy of the carry per step.
        return beta_prev, beta_prev
    row = None
    if filtered is not None:
        row = filtered * beta
        if row_scale is not None:
            row = row * _per_state(row_scale, s_axis)
        if masked and padded_rows_zero:
            row = jnp.where(is_valid, row, 0.0)
    return beta_prev, (row, v)


class BackwardPass(NamedTuple):
    r"""What :func:`backward` returns: ``rows`` (``filtered * beta``: the smoothed probabilities,
    in the layout), ``v_next`` (:math:`v_{t+1}` paired with step ``t``: (T-1, K) for one
    sequence, or, for a batch, the layout's shape with a zero last step) and ``v_first``
    (:math:`v_0`, the gradient of :math:`\log p` with respect to :math:`\pi`)."""

    rows: Optional[Array]
    v_next: Array
    v_first: Array


def backward(
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Array,
    lengths: Int[Array, "*B"],
    peaks: Array,
    log_cs: Array,
    layout: str = "TK",
    *,
    filtered: Optional[Array] = None,
    weights: Optional[Array] = None,
    emissions: str = "in-loop",
    padded_rows_zero: bool = False,
    row_scale: Optional[Array] = None,
    padded: bool | None = None,
) -> BackwardPass:
    r"""The scaled backward recursion of one sequence (``layout="TK"``) or a batch.

    :math:`\hat\beta = 1` from step ``length - 1`` on. The emission weights are ``weights``
    when given (0 at padded steps, e.g. from :func:`forward`), else computed from the
    log-likelihoods and the forward pass's ``peaks`` and ``log_cs``, all steps before the loop
    (``emissions="before-loop"``) or step by step. With ``filtered`` (frozen padded rows),
    the loop writes ``rows = filtered * beta``, which repeat ``filtered`` at padded steps or
    are 0 there (``padded_rows_zero``: the gradient of :math:`\log p` with respect to the
    log-likelihoods); ``row_scale`` (B,) multiplies them. ``padded`` as in :func:`forward`.
    """
    _check_options(layout, emissions)
    time_axis, s_axis = layout.index("T"), states_axis(layout)
    num_timesteps = log_likelihoods.shape[time_axis]
    mode = "before-loop"
    if weights is None and emissions == "before-loop":
        valid = _valid_all(log_likelihoods, lengths, layout)
        weights = _emission_weights(
            jnp.where(valid, log_likelihoods, 0.0), _steps_against(peaks, layout), _steps_against(log_cs, layout)
        )
        weights = jnp.where(valid, weights, 0.0)
    elif weights is None:
        mode = "in-loop"
    body = functools.partial(
        _backward_body,
        transition_matrix=transition_matrix,
        lengths=lengths,
        s_axis=s_axis,
        mode=mode,
        padded_rows_zero=padded_rows_zero,
        row_scale=row_scale,
    )
    source = weights if mode == "before-loop" else log_likelihoods
    in_loop = mode == "in-loop"
    xs = (
        source,
        peaks if in_loop else None,
        log_cs if in_loop else None,
        filtered,
        _transition_steps(transition_matrix, reverse=True),
    )
    ones = jnp.ones(_time_index(log_likelihoods, 0, time_axis).shape, log_likelihoods.dtype)
    if layout == "TK":
        _, (rows, v) = _scan(body, ones, xs, jnp.arange(num_timesteps), reverse=True)
        return BackwardPass(rows, v[1:], v[0])
    # steps T-1 .. 1 in the loop, writing v_t to row t - 1 (aligned with filtered[t - 1] for the
    # pair sums: no shifted copies), then step 0 on its own (its v is the gradient w.r.t. pi)
    beta, (rows, v_next) = _indexed(
        body, ones, xs, (time_axis, 0, 0, time_axis, 0), (time_axis, time_axis),
        num_timesteps, lengths, True, first=1, offsets=(0, 1), padded=padded,
    )
    x0 = tuple(None if x is None else _time_index(x, 0, a) for x, a in zip(xs, (time_axis, 0, 0, time_axis, 0)))
    _, (row0, v_first) = body(True, beta, jnp.int32(0), x0)
    if rows is not None:
        rows = _time_update(rows, row0, 0, time_axis)
    return BackwardPass(rows, v_next, v_first)


def pair_sums(filtered, v_next, layout: str = "TK", over_batch: bool = False):
    r""":math:`\sum_t` ``outer(filtered[t], v_{t+1})``: (K, K) for one sequence, (B, K, K) per
    sequence of a batch, or (K, K) summed over it too (``over_batch``). One matrix product of the
    whole arrays (a batch's ``v_next`` is aligned with ``filtered`` by :func:`backward`); summed over
    the batch, one small product per step, then the sum over steps: a product contracting the time
    and batch axes together transposes both arrays first, measured 2-13x slower on CPU (T = 1000,
    K = 5-64, B = 64-256)."""
    if layout == "TK":
        return filtered[:-1].T @ v_next
    spec = layout.lower()
    lhs, rhs = spec.replace("k", "i"), spec.replace("k", "j")
    if over_batch:
        return jnp.sum(jnp.einsum(f"{lhs},{rhs}->tij", filtered, v_next), axis=0)
    return jnp.einsum(f"{lhs},{rhs}->bij", filtered, v_next)


# --------------------------------------------------------------------------- memory-lean gradient

# Steps per block of the memory-lean backward pass (:func:`loglik_gradients`).
_GRAD_BLOCK = 256


def loglik_gradients(transition_matrix, log_likelihoods, length, filtered, peaks, log_cs):
    r"""Gradients of :math:`\log p` of one sequence, for a unit cotangent: ``(grad_pi,
    grad_trans, grad_ll)``, from the forward pass's filtered rows and per-step normalisers.

    :math:`\partial \log p / \partial \ell_t = p(z_t \mid y)` (the smoothed rows, 0 at padded
    steps), :math:`\partial \log p / \partial \pi = v_0` and :math:`\partial \log p / \partial
    A = \sum_t \text{filtered}_t \otimes v_{t+1}` (per pair for a time-varying :math:`A`).
    For a stationary :math:`A` no (T, K) array of messages is kept: :func:`backward` runs over
    blocks of ``_GRAD_BLOCK`` steps from the end (a ``fori_loop`` whose gradient buffer is
    updated in place), each block's emission weights exponentiated in one vectorised pass, and
    each block's share of :math:`\partial \log p / \partial A` added as one matrix product of
    its rows of ``filtered`` (a slice starting a step before the block) with its messages.
    The first block, which holds ``t = 0``, runs last with a static length.
    """
    num_timesteps, num_states = log_likelihoods.shape
    if transition_matrix.ndim == 3:
        out = backward(
            transition_matrix, log_likelihoods, length, peaks, log_cs, filtered=filtered, padded_rows_zero=True
        )
        grad_trans = filtered[:-1, :, None] * out.v_next[:, None, :]
        return out.v_first, grad_trans, out.rows
    dtype = log_likelihoods.dtype
    block = min(_GRAD_BLOCK, num_timesteps)
    num_blocks = num_timesteps // block - 1
    head = num_timesteps - num_blocks * block  # in [block, 2 block): every loop block starts at t >= 1

    def _block(start, size, beta):
        """Steps ``start .. start + size - 1`` backwards from ``beta``: ``(beta before, (rows, v))``.

        The loop carries and writes only the messages; the rows and :math:`v_t` are formed from
        the block's messages afterwards, vectorised.
        """
        sl = functools.partial(lax.dynamic_slice_in_dim, start_index=start, slice_size=size)
        ll, pk, lc, f = sl(log_likelihoods), sl(peaks), sl(log_cs), sl(filtered)
        valid = ((start + jnp.arange(size)) < length)[:, None]
        w = jnp.where(valid, _emission_weights(ll, pk[:, None], lc[:, None]), 0.0)
        body = functools.partial(
            _backward_body,
            transition_matrix=transition_matrix,
            lengths=length,
            s_axis=-1,
            mode="before-loop",
            padded_rows_zero=True,
            row_scale=None,
            betas_only=True,
        )
        beta_before, shifted = _scan(body, beta, (w, None, None, None, None), start + jnp.arange(size), reverse=True)
        betas = jnp.concatenate([shifted[1:], beta[None]])  # beta_t = shifted[t + 1]
        return beta_before, (jnp.where(valid, f * betas, 0.0), w * betas)

    def _loop_block(i, state):
        beta, acc, grad_ll = state
        start = head + (num_blocks - 1 - i) * block
        beta, (rows, v) = _block(start, block, beta)
        acc = acc + lax.dynamic_slice_in_dim(filtered, start - 1, block).T @ v
        grad_ll = lax.dynamic_update_slice_in_dim(grad_ll, rows, start, axis=0)
        return beta, acc, grad_ll

    beta = jnp.ones((num_states,), dtype)
    acc = jnp.zeros((num_states, num_states), dtype)
    grad_ll = jnp.zeros((num_timesteps, num_states), dtype)
    if num_blocks:
        beta, acc, grad_ll = lax.fori_loop(0, num_blocks, _loop_block, (beta, acc, grad_ll))
    _, (rows, v) = _block(0, head, beta)
    acc = acc + filtered[: head - 1].T @ v[1:]
    grad_ll = lax.dynamic_update_slice_in_dim(grad_ll, rows, 0, axis=0)
    return v[0], acc, grad_ll
