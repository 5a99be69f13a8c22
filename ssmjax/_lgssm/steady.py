r"""Steady-state fast path of the Kalman filter and the RTS smoother (time-invariant models).

For a model whose ``A, Q, C, R`` do not depend on time, the covariance recursion of the
filter (:math:`P_{t|t-1} \mapsto P_{t+1|t}`, the Riccati map) does not depend on the data:
on fully observed steps it converges geometrically to a fixed point, after which every
covariance, gain and Cholesky factor of the filter repeats. The same holds, backwards from
the end, for the adjoint :math:`\Lambda_t` of the smoother's Bryson-Frazier recursion.
This path runs the covariance recursions only while they change (``lax.while_loop``,
storing at most ``transient_steps`` entries at each end), and over the whole sequence
only the recursions of the means (matrix-vector products); the ``(T, Dx, Dx)`` outputs are
gathered from the stored entries.

**Settled.** A step of a recursion is settled when every entry of the new matrix
:math:`M'` lies within ``TOLERANCE_ULPS`` units of round-off of the old one, relative to
its diagonal: :math:`|M'_{ij} - M_{ij}| \le 4\,\varepsilon \sqrt{M'_{ii} M'_{jj}}`, the size
of the round-off the full recursion itself makes at every step (in float32 it never reaches
an exact fixed point: its last bits keep moving). The first settled step of a geometric
transient is still about tolerance / (1 - rate) from the limit, so the recursion goes on
for as many steps again (:func:`_settle`), which squares that relative distance; its last
entry then stands for all later steps. The results agree with the full recursion to
round-off (``tests/test_lgssm_steady.py``).

**Where it applies.** ``method="standard"``, ``parallel=False``, ``A, Q, C, R`` without a
time axis (inputs and time-varying offsets are fine: they enter the means only), at least
``MIN_STATE_DIM`` states, and sequences longer than ``transient_steps`` (the rule is
:func:`ssmjax._lgssm.strategy.steady_state_applies`). Missing data and ``length`` are handled: the
forward recursion only settles from a step after which every real step is fully
observed. If a recursion has not settled within ``transient_steps`` (a slowly mixing
model, or missing entries late in the sequence), the full recursion runs instead
(:func:`ssmjax._fallback.fallback`: under ``jax.vmap`` only when some sequence of the
batch needs it). Derivatives are always those of the full recursion (a custom JVP), so
``jax.grad`` and ``jax.jvp`` see exactly what they saw before.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .._fallback import _any_in_batch, fallback
from .canonical import _canonical
from . import step, strategy
from .small import symmetrize

# A recursion has settled when a step moves no entry by more than this many units of
# round-off, relative to the diagonal (see the module docstring).
TOLERANCE_ULPS = 4.0
_LOG_2PI = math.log(2.0 * math.pi)
TRANSIENT_STEPS = strategy.TRANSIENT_STEPS


def _settled(new, old):
    """Every entry of ``new`` within ``TOLERANCE_ULPS`` round-off units of ``old`` (relative to the diagonal)."""
    tol = TOLERANCE_ULPS * jnp.finfo(new.dtype).eps
    d = jnp.abs(jnp.diagonal(new))
    return jnp.all(jnp.abs(new - old) <= tol * jnp.sqrt(d[:, None] * d[None, :]))


def _settle(first, settled, count):
    """``(first, done)`` after ``count`` steps of a recursion: ``first`` is the count at which it
    first settled (-1 before), and it is done once settled again after twice that many steps.

    A geometric transient :math:`c \rho^t` first moves less than the tolerance while still
    about tolerance / (1 - rho) from its limit; as many steps again square that relative
    distance (to far below round-off), so the repeated entries are the limit to round-off.
    """
    first = jnp.where((first < 0) & settled, count, first)
    return first, settled & (first >= 0) & (count >= 2 * first)


def _spread(table, tc, num_timesteps):
    """``(T, ...)`` from ``n + 1`` stored entries: ``table[t]`` for ``t < tc``, the steady entry
    ``table[n]`` after. Static slices, a broadcast and a select (no gather: under ``jax.vmap``,
    where ``tc`` differs between sequences, a gather per step would be slow)."""
    n = table.shape[0] - 1
    tail = jnp.broadcast_to(table[n], (num_timesteps - n,) + table.shape[1:])
    return jnp.concatenate([_head(table, tc), tail])


def _head(table, tc):
    """The first ``n`` steps' entries: ``table[t]`` for ``t < tc``, else the steady ``table[n]``."""
    n = table.shape[0] - 1
    early = (jnp.arange(n) < tc).reshape((n,) + (1,) * (table.ndim - 1))
    return jnp.where(early, table[:n], table[n])


def _assemble(table, first, stop, num_timesteps):
    """The smoother's ``(T, ...)`` output from its ``2n + 1`` table entries when the sequence ends
    at ``T``: entry ``t`` for ``t <= first``, end entry ``T - 1 - t`` for ``t >= stop``, the middle
    entry between (static slices and selects, as :func:`_spread`)."""
    n = (table.shape[0] - 1) // 2
    mid = jnp.broadcast_to(table[2 * n], (num_timesteps - n,) + table.shape[1:])
    start = jnp.concatenate([table[:n], mid])
    finish = jnp.concatenate([mid, jnp.flip(table[n : 2 * n], axis=0)])
    steps = jnp.arange(num_timesteps).reshape((-1,) + (1,) * (table.ndim - 1))
    return jnp.where(steps <= first, start, jnp.where(steps >= stop, finish, table[2 * n]))


def _while_any(running):
    """A ``lax.while_loop`` predicate that stays unbatched under ``jax.vmap``: whether any
    sequence of the batch is still running. With a batched predicate JAX would select between
    the old and new carry of every sequence at every step, stored buffers included (measured
    3-5x slower at B = 256); instead each body leaves a finished sequence's carry unchanged
    (:func:`_keep`) and writes its buffers only while running (:func:`_put`)."""
    return lambda carry: _any_in_batch(running(carry))


def _keep(go, new, old):
    return tuple(jnp.where(go, a, b) for a, b in zip(new, old))


def _put(buf, i, row, go):
    """``buf`` with row ``i`` set to ``row`` where ``go`` (one row read and written either way)."""
    return buf.at[i].set(jnp.where(go, row, buf[i]))


def _two_segment_scan(step, init, xs, table, tc, reverse=False):
    """``lax.scan`` of ``step(carry, x, entry)`` where ``entry`` is the stored entry of each step:
    over the first ``n`` steps ``table[t]`` (``t < tc``) or the steady ``table[n]`` as a scan
    input, then over the rest of the sequence the steady entry as a constant. Returns the
    stacked outputs. No per-step gather (slow under ``jax.vmap``, where ``tc`` differs between
    sequences) and no ``(T, ...)`` copy of the entries."""
    n = jax.tree.leaves(table)[0].shape[0] - 1
    num_timesteps = jax.tree.leaves(xs)[0].shape[0]
    head_xs = (jax.tree.map(lambda a: a[:n], xs), jax.tree.map(lambda a: _head(a, tc), table))
    steady_entry = jax.tree.map(lambda a: a[n], table)

    def head(carry, x):
        return step(carry, x[0], x[1])

    def tail(carry, x):
        return step(carry, x, steady_entry)

    if num_timesteps == n:
        return lax.scan(head, init, head_xs, reverse=reverse)[1]
    tail_xs = jax.tree.map(lambda a: a[n:], xs)
    if reverse:
        carry, tail_out = lax.scan(tail, init, tail_xs, reverse=True)
        _, head_out = lax.scan(head, carry, head_xs, reverse=True)
    else:
        carry, head_out = lax.scan(head, init, head_xs)
        _, tail_out = lax.scan(tail, carry, tail_xs)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head_out, tail_out)


def _index(table, j):
    return lax.dynamic_index_in_dim(table, j, keepdims=False)


def forward(params, ys, mask, valid, valid_next, end, has_length, ops, transient_steps):
    """Steady-state Kalman filter.

    Returns ``(outputs, parts, need_full)``: ``outputs = (loglik, fm, fc, pm, pc)`` as the full
    filter's; ``parts`` what the smoother needs (the ``n + 1`` stored entries, ``tc`` and ``z``);
    ``need_full`` whether the covariance recursion did not settle in time.
    """
    num_timesteps, dy = ys.shape
    dx = params.initial_mean.shape[-1]
    dtype = ys.dtype
    A, Q, C, R = params.transition_matrix, params.transition_cov, params.emission_matrix, params.emission_cov
    eye_x = jnp.eye(dx, dtype=dtype)
    eye_y = jnp.eye(dy, dtype=dtype)
    n = min(num_timesteps, transient_steps)

    def cov_step(pred_cov, m, vn):
        # the full filter's step (masked C and R), see ssmjax._lgssm.step
        Cm = jnp.where(m[:, None], C, 0.0)
        Rm = jnp.where(m[:, None] & m[None, :], R, eye_y)
        f_cov, half_logdet, sol = step.update_cov(pred_cov, Cm, Rm, ops)
        next_cov = step.predict_cov(f_cov, jnp.where(vn, A, eye_x), jnp.where(vn, Q, 0.0), ops)
        return f_cov, next_cov, sol, half_logdet

    # from step t on, every real step is fully observed
    observed = jnp.all(mask, axis=1) | ~valid
    observed_from = jnp.flip(jnp.cumprod(jnp.flip(observed).astype(jnp.int32))) > 0

    def running(carry):
        t, _, done = carry[:3]
        return (t < n) & ~done

    def body(carry):
        t, pred_cov, done, first, pcb, fcb, sb, ldb = carry
        go = running(carry)
        i = jnp.minimum(t, n - 1)
        f_cov, next_cov, sol, ld = cov_step(pred_cov, mask[i], valid_next[i])
        pcb, fcb = _put(pcb, i, pred_cov, go), _put(fcb, i, f_cov, go)
        sb, ldb = _put(sb, i, sol, go), _put(ldb, i, ld, go)
        settled = _settled(next_cov, pred_cov) & observed_from[i] & valid_next[i]
        new_first, new_done = _settle(first, settled, t + 1)
        step = (t + 1, next_cov, new_done | (t + 1 >= end), new_first)
        return _keep(go, step, (t, pred_cov, done, first)) + (pcb, fcb, sb, ldb)

    zeros = lambda *shape: jnp.zeros((n,) + shape, dtype)  # noqa: E731
    init = (jnp.int32(0), params.initial_cov, jnp.bool_(False), jnp.int32(-1))
    init = init + (zeros(dx, dx), zeros(dx, dx), zeros(dy, 2 * dx + dy), zeros())
    tc, steady_cov, done, _, pcb, fcb, sb, ldb = lax.while_loop(_while_any(running), body, init)
    # slot n: the steady state (steps t >= tc), one more step of the same update
    f_cov, _, sol, ld = cov_step(steady_cov, jnp.ones((dy,), bool), jnp.bool_(True))
    pcb = jnp.concatenate([pcb, steady_cov[None]])
    fcb = jnp.concatenate([fcb, f_cov[None]])
    sb = jnp.concatenate([sb, sol[None]])
    ldb = jnp.concatenate([ldb, ld[None]])
    xs = dict(t=jnp.arange(num_timesteps), y=ys, mask=mask, vn=valid_next)

    def mean_step(mean, x, s):
        # A, C are time-invariant on this path; the offsets may vary in time
        q = params.at(x["t"])
        pred_y = step.predicted_emission(q, C, mean, ops)
        f_mean, z = step.update_mean(mean, s, jnp.where(x["mask"], x["y"] - pred_y, 0.0), ops)
        Ae, _, offset = step.transition(q, x["vn"], has_length)
        return step.predict_mean(f_mean, Ae, offset, ops), (mean, f_mean, z)

    pm, fm, zs = _two_segment_scan(mean_step, params.initial_mean, xs, sb, tc)
    nobs = jnp.sum(mask).astype(dtype)
    loglik = -0.5 * jnp.sum(zs * zs) - jnp.sum(jnp.where(valid, _spread(ldb, tc, num_timesteps), 0.0))
    loglik = loglik - 0.5 * nobs * _LOG_2PI
    fc, pc = _spread(fcb, tc, num_timesteps), _spread(pcb, tc, num_timesteps)
    if has_length:
        # padded steps repeat the filtered covariance of step end - 1 (as the full filter)
        last = _index(fc, end - 1)
        fc = jnp.where(valid[:, None, None], fc, last)
        pc = jnp.where(valid[:, None, None], pc, last)
    parts = dict(pcb=pcb, fcb=fcb, sb=sb, tc=tc, zs=zs)
    return (loglik, fm, fc, pm, pc), parts, ~done


def backward(params, fm, parts, valid_next, end, has_length, ops):
    """Steady-state Bryson-Frazier smoother (as ``_smooth_standard``): ``((sm, sc, cross), need_full)``."""
    num_timesteps, dx = fm.shape
    dtype = fm.dtype
    A = params.transition_matrix
    pcb, fcb, sb, tc, zs = (parts[k] for k in ("pcb", "fcb", "sb", "tc", "zs"))
    n = fcb.shape[0] - 1

    def slot(t):  # the stored entry of step t
        return jnp.where(t < tc, t, n)

    mm = ops.mm
    last = num_timesteps - 1

    def moments(lam_next, t):
        """``(Lambda_t, P_{t|T}, Cov(x_t, x_{t+1} | y))`` of step ``t`` from ``Lambda_{t+1}``.

        As ``_smooth_standard``: B = A (I - W^T V). The full recursion uses A = I at the last
        real step t = end - 1, but there (and at padded steps) Lambda_{t+1} = 0, so A does."""
        j = slot(t)
        s = _index(sb, j)
        W, V = s[:, :dx], s[:, dx : 2 * dx]
        pf = _index(fcb, j)
        B = A - mm(mm(A, W.T), V)
        lam = symmetrize(mm(V.T, V) + mm(mm(B.T, lam_next), B))
        X = mm(pf, A.T)
        Y = mm(X, lam_next)
        s_cov = symmetrize(pf - mm(Y, X.T))
        pc_next = _index(pcb, slot(jnp.minimum(t + 1, last)))
        cross = jnp.where(valid_next[t], X - mm(Y, pc_next), 0.0)
        return lam, s_cov, cross

    # phase E: backwards from the end while the forward pass is steady, until Lambda settles;
    # entry k of the buffers is step t = end - 1 - k
    def running_end(carry):
        t, k, _, stop = carry[:4]
        return ~stop & (k < n) & (t >= tc)

    def body_end(carry):
        t, k, lam_next, stop, first, buf_sc, buf_cross = carry
        go = running_end(carry)
        ts = jnp.clip(t, 0, last)
        lam, s_cov, cross = moments(lam_next, ts)
        i = jnp.minimum(k, n - 1)
        buf_sc, buf_cross = _put(buf_sc, i, s_cov, go), _put(buf_cross, i, cross, go)
        new_first, done = _settle(first, _settled(lam, lam_next) & valid_next[ts], k + 1)
        return _keep(go, (t - 1, k + 1, lam, done, new_first), (t, k, lam_next, stop, first)) + (buf_sc, buf_cross)

    zeros = jnp.zeros((dx, dx), dtype)
    buffers = (jnp.zeros((n, dx, dx), dtype), jnp.zeros((n, dx, dx), dtype))
    init = (end - 1, jnp.int32(0), zeros, jnp.bool_(False), jnp.int32(-1)) + buffers
    t_end, _, lam_mid, settled, _, end_sc, end_cross = lax.while_loop(_while_any(running_end), body_end, init)
    stop = t_end + 1  # steps stop .. end - 1 are in the end buffers; tc .. stop - 1 see Lambda = lam_mid
    need_full = ~settled & (t_end >= tc)

    # phase S: the forward transient, backwards from min(tc, stop) - 1 to 0 (entry t is step t)
    first = jnp.minimum(tc, stop) - 1

    def running_start(carry):
        return carry[0] >= 0

    def body_start(carry):
        t, lam_next, buf_sc, buf_cross = carry
        go = running_start(carry)
        ts = jnp.maximum(t, 0)
        lam, s_cov, cross = moments(lam_next, ts)
        buf_sc, buf_cross = _put(buf_sc, ts, s_cov, go), _put(buf_cross, ts, cross, go)
        return _keep(go, (t - 1, lam), (t, lam_next)) + (buf_sc, buf_cross)

    init = (first, lam_mid) + buffers
    _, _, start_sc, start_cross = lax.while_loop(_while_any(running_start), body_start, init)

    # the steps between: steady forward moments, Lambda_{t+1} = lam_mid
    _, mid_sc, mid_cross = moments(lam_mid, jnp.minimum(tc, last))
    sc_tab = jnp.concatenate([start_sc, end_sc, mid_sc[None]])
    cross_tab = jnp.concatenate([start_cross, end_cross, mid_cross[None]])

    if has_length:
        # the end entries sit at steps end - 1 - k; padded steps repeat step end - 1
        steps = jnp.minimum(jnp.arange(num_timesteps), end - 1)
        idx = jnp.where(steps <= first, steps, jnp.where(steps < stop, 2 * n, n + end - 1 - steps))
        sc = sc_tab[idx]
        cross = cross_tab[idx[:-1]]
    else:
        sc = _assemble(sc_tab, first, stop, num_timesteps)
        cross = _assemble(cross_tab, first, stop, num_timesteps)[:-1]

    def mean_step(lam_next, x, table):
        u = ops.mv(A.T, lam_next)  # A_t^T lambda_{t+1}
        s = table["factors"]
        s_mean = x["fm"] + ops.mv(table["fc"], u)
        lam = ops.mv(s[:, dx : 2 * dx].T, x["z"] - ops.mv(s[:, :dx], u)) + u
        return lam, (s_mean,)

    # parts["fc"] holds P_{t|t} (padded steps repeat step end - 1, where lambda = 0 anyway)
    xs = dict(fm=fm, z=zs)
    table = dict(factors=sb, fc=fcb)
    (sm,) = _two_segment_scan(mean_step, jnp.zeros((dx,), dtype), xs, table, tc, reverse=True)
    return (sm, sc, cross), need_full


def steady_outputs(model, emissions, inputs, length, smoother, ops, transient_steps, observed=False):
    """``(outputs, need_full, settled_at)`` of the steady-state path, without the fallback.

    ``settled_at`` is the first step whose forward moments are the steady ones (the length
    when the recursion ran to the end of the real steps within ``transient_steps``).
    """
    params, ys, mask, valid_next = _canonical(model, emissions, inputs, length, observed)
    num_timesteps = ys.shape[0]
    has_length = length is not None
    end = jnp.asarray(num_timesteps if length is None else length, jnp.int32)
    valid = jnp.arange(num_timesteps) < end
    out, parts, need_full = forward(params, ys, mask, valid, valid_next, end, has_length, ops, transient_steps)
    if smoother:
        (sm, sc, cross), need_back = backward(params, out[1], parts, valid_next, end, has_length, ops)
        out = out + (sm, sc, cross)
        need_full = need_full | need_back
    return out, need_full, parts["tc"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8))
def run(model, emissions, inputs, length, smoother, ops, transient_steps, masking, full):
    """The steady-state filter (``smoother=False``) or smoother, falling back to ``full``.

    ``full(model, emissions, inputs, length, ops, "standard", observed)`` is the full
    recursion; derivatives are its own. ``masking`` is that of :mod:`ssmjax._lgssm.strategy`.
    With ``"auto"`` the steady-state pass runs with the ``"observed"`` masking, and the full
    recursion with the ``"masked"`` one is the one fallback for both reasons, a recursion
    that did not settle and a batch with missing entries or padding: one copy of the full
    recursion in the program instead of two.
    """
    observed = masking != "masked"
    out, need_full, _ = steady_outputs(
        model, emissions, inputs, None if observed else length, smoother, ops, transient_steps, observed
    )
    if masking == "auto":
        need_full = need_full | strategy.needs_mask(jnp, emissions, length)
        observed = False
    return fallback(need_full, out, lambda *a: full(*a, ops, "standard", observed), (model, emissions, inputs, length))


@run.defjvp
def _run_jvp(smoother, ops, transient_steps, masking, full, primals, tangents):
    return jax.jvp(lambda *a: full(*a, ops, "standard", masking == "observed"), primals, tangents)
