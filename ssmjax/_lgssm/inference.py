r"""Exact inference in linear-Gaussian state-space models.

Kalman filter, Rauch-Tung-Striebel smoother, forward-filter backward-sample,
ancestral sampling and forecasting for :class:`ssmjax.LGSSM`. The model, the time
convention, missing data (NaN) and padding (``length``) are described once in
:mod:`ssmjax._lgssm.model`.

Layout: public functions take loosely typed arguments, validate them
(:mod:`ssmjax._lgssm.validate`: shapes raise ``ValueError`` at trace time; covariances go
through value checks), choose a path in one place (:mod:`ssmjax._lgssm.strategy`,
inspectable with :func:`lgssm_strategy`, forced with ``strategy=``), then call jitted
private functions with full shape annotations. Each recursion is a ``lax.scan`` over a
named ``_step`` built from the Kalman step of :mod:`ssmjax._lgssm.step`.

Missing entries are handled exactly: at step ``t`` with observed mask ``m`` the rows
of :math:`C_t` and of the offset are zeroed where ``m`` is false, the missing rows and
columns of :math:`R_t` are replaced by the identity and the missing observations by
zero. The dummy dimensions are then independent of the state with zero innovation,
so they change neither the posterior nor the quadratic form or log-determinant of the
log-likelihood, and the :math:`\log 2\pi` constant is counted for observed entries
only. Every substitution is a ``where`` applied *before* arithmetic, so NaN/inf in
missing or padded entries never reach values or gradients.

Time-invariant models (``A, Q, C, R`` without a time axis) with ``Dx >= 3``, in the
covariance form, on sequences longer than 512 steps take the steady-state path of
:mod:`ssmjax._lgssm.steady` (the rule: :func:`ssmjax._lgssm.strategy.steady_state_applies`): the covariance
recursions run only until they settle, the means over every step; same results to
round-off, same derivatives (those of the full recursion), several times faster.

Under ``jax.vmap`` with a shared model, a batch with no missing entry and no padding
computes the covariances, gains and Cholesky factors once for the whole batch and only
the means per sequence (the ``"observed"`` masking of :mod:`ssmjax._lgssm.strategy`).
"""

from __future__ import annotations

import typing
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .. import _checks, _deprecation, _linalg
from . import diffuse, steady, step, strategy
from .canonical import LOG_2PI as _LOG_2PI
from .canonical import KalmanParams, _canonical, _dtype
from .params import AbstractLGSSM, model_dims, validate_shapes
from .parallel import _filter_parallel, _smoother_parallel
from .results import KalmanFilterResult, LGSSMForecastResult, RTSSmootherResult
from .small import GeneralOps, SmallOps, choose_ops, matmul_precision, psd_cholesky, symmetrize
from .strategy import KalmanStrategy
from .validate import _check_method, _check_time_sizes, _validate, _validate_inputs, _value_check_model

__all__ = [
    "KalmanFilterResult",
    "RTSSmootherResult",
    "LGSSMForecastResult",
    "kalman_filter",
    "rts_smoother",
    "lgssm_sample_posterior",
    "lgssm_sample",
    "lgssm_forecast",
    "lgssm_strategy",
    "KalmanStrategy",
]


# --------------------------------------------------------------------------- standard filter


def _filter_standard(
    params: KalmanParams,
    ys: Float[Array, "T Dy"],
    mask: Bool[Array, "T Dy"],
    valid_next: Bool[Array, " T"],
    has_length: bool,
    ops: type,
):
    dy = ys.shape[-1]
    dtype = ys.dtype
    eye_y = jnp.eye(dy, dtype=dtype)

    def _step(carry, x):
        mean, cov, loglik = carry
        q = params.at(x["t"])
        f_mean, f_cov, ll, factors, z = step.update(q, mean, cov, x["y"], x["mask"], eye_y, ops)
        p_mean, p_cov = step.predict(q, f_mean, f_cov, x["valid_next"], has_length, ops)  # x_{t+1}
        # factors and z leave the scan apart: under jax.vmap with a shared model the factors stay unbatched
        return (p_mean, p_cov, loglik + ll), (mean, cov, f_mean, f_cov, factors, z)

    xs = dict(t=jnp.arange(ys.shape[0]), y=ys, mask=mask, valid_next=valid_next)
    init = (params.initial_mean, params.initial_cov, jnp.zeros((), dtype))
    (_, _, loglik), (pm, pc, fm, fc, factors, z) = jax.lax.scan(_step, init, xs)
    return loglik, fm, fc, pm, pc, (factors, z)


# --------------------------------------------------------------------------- square-root filter


def _tria(pre):
    """Lower-triangular ``L`` with ``L L^T = pre pre^T`` (QR of ``pre^T``)."""
    r = jnp.linalg.qr(jnp.swapaxes(pre, -1, -2), mode="r")
    return jnp.swapaxes(r, -1, -2)


def _filter_sqrt(
    params: KalmanParams,
    ys: Float[Array, "T Dy"],
    mask: Bool[Array, "T Dy"],
    valid_next: Bool[Array, " T"],
    has_length: bool,
):
    ops = GeneralOps
    dx = params.initial_mean.shape[-1]
    dy = ys.shape[-1]
    dtype = ys.dtype
    eye_y = jnp.eye(dy, dtype=dtype)
    chol_q = psd_cholesky(params.transition_cov)  # batched when time-varying
    # the square-root form reads Q through its Cholesky factor
    factored = eqx.tree_at(lambda p: p.transition_cov, params, chol_q)
    zeros_yx = jnp.zeros((dx, dy), dtype)

    def _step(carry, x):
        mean, chol_p, loglik = carry
        q, m = factored.at(x["t"]), x["mask"]
        C, R = step.masked_emission(q, m, eye_y)
        resid = jnp.where(m, x["y"] - step.predicted_emission(q, C, mean, ops), 0.0)
        chol_r = _linalg.cholesky(R)
        pre = jnp.block([[chol_r, ops.mm(C, chol_p)], [zeros_yx, chol_p]])
        post = _tria(pre)
        chol_s = post[:dy, :dy]
        gain_s = post[dy:, :dy]
        chol_f = post[dy:, dy:]
        z = ops.solve_lower(chol_s, resid[:, None])[:, 0]
        f_mean = mean + ops.mv(gain_s, z)
        nobs = jnp.sum(m).astype(dtype)
        ll = -0.5 * jnp.sum(z * z) - jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol_s)))) - 0.5 * nobs * _LOG_2PI
        A, cq, offset = step.transition(q, x["valid_next"], has_length)
        p_mean = step.predict_mean(f_mean, A, offset, ops)
        chol_pp = _tria(jnp.concatenate([ops.mm(A, chol_f), cq], axis=1))
        return (p_mean, chol_pp, loglik + ll), (mean, chol_p, f_mean, chol_f)

    xs = dict(t=jnp.arange(ys.shape[0]), y=ys, mask=mask, valid_next=valid_next)
    init = (params.initial_mean, _linalg.cholesky(params.initial_cov), jnp.zeros((), dtype))
    (_, _, loglik), (pm, chol_pc, fm, chol_fc) = jax.lax.scan(_step, init, xs)
    return loglik, fm, chol_fc, pm, chol_pc, chol_q


def _outer(chol):
    return jnp.matmul(chol, jnp.swapaxes(chol, -1, -2), precision=matmul_precision())


# --------------------------------------------------------------------------- smoothers


def _transitions(params: KalmanParams, num_timesteps):
    """Transition matrices t = 0..T-2, batched: (T-1, Dx, Dx)."""
    A = params.transition_matrix
    if params.is_time_varying("transition_matrix"):
        return A[: num_timesteps - 1]
    return jnp.broadcast_to(A, (num_timesteps - 1,) + A.shape)


def _smoother_gains(A, filtered_covs, chol_pred_next, valid_next, ops):
    """RTS gains ``G_t = P_{t|t} A_t^T P_{t+1|t}^{-1}`` for t = 0..T-2, all at once (not in the scan)."""
    AP = ops.mm(A, filtered_covs)
    gt = ops.solve_lower_t(chol_pred_next, ops.solve_lower(chol_pred_next, AP))
    return jnp.where(valid_next[:, None, None], jnp.swapaxes(gt, -1, -2), 0.0)


def _smooth_standard(
    params: KalmanParams,
    fm: Float[Array, "T Dx"],
    fc: Float[Array, "T Dx Dx"],
    pc: Float[Array, "T Dx Dx"],
    factors: tuple[Float[Array, "T Dy _"], Float[Array, "T Dy"]],
    valid_next: Bool[Array, " T"],
    ops: type,
):
    r"""Smoothed moments by the modified Bryson-Frazier recursion (no Dx x Dx solves).

    Mathematically identical to the RTS recursion. With the filter's per-step factors
    ``factors = ([W_t, V_t, L_t^{-1}], z_t)`` (:mod:`ssmjax._lgssm.step`), :math:`W_t = L_t^{-1} C_t P_{t|t-1}`,
    :math:`V_t = L_t^{-1} C_t`, :math:`z_t = L_t^{-1} r_t`
    (:math:`L_t L_t^\top = S_t`, missing rows of :math:`C_t` zeroed), the adjoint
    :math:`\lambda_t, \Lambda_t` (:math:`\lambda_T = 0, \Lambda_T = 0` past the end) obeys

    .. math::

        \hat\lambda_t = A_t^\top \lambda_{t+1},\quad \hat\Lambda_t = A_t^\top \Lambda_{t+1} A_t,\\
        m_{t|T} = m_{t|t} + P_{t|t} \hat\lambda_t,\quad
        P_{t|T} = P_{t|t} - P_{t|t} \hat\Lambda_t P_{t|t},\\
        \mathrm{Cov}(x_t, x_{t+1} \mid y) = P_{t|t} A_t^\top (I - \Lambda_{t+1} P_{t+1|t}),\\
        F_t = I - W_t^\top V_t,\quad \lambda_t = V_t^\top z_t + F_t^\top \hat\lambda_t,\quad
        \Lambda_t = V_t^\top V_t + F_t^\top \hat\Lambda_t F_t.

    Only matrix products run inside the scan (no factorisation), and a singular
    :math:`P_{t+1|t}` (deterministic components) is no problem.
    """
    num_timesteps, dx = fm.shape
    dtype = fm.dtype
    eye_x = jnp.eye(dx, dtype=dtype)
    # At large Dx, (T, Dx, Dx) temporaries cost real time on CPU (fresh pages on every call),
    # so P_{t+1|t} is carried from the previous (later) iteration instead of a shifted copy,
    # and the T-1 cross-covariances are written in place into a carried buffer instead of
    # slicing a T-entry scan output (entry T-1 is zero and lands on T-2 before being
    # overwritten). At small sizes those copies are cheap and the plain layout is faster.
    in_place = ops is GeneralOps and num_timesteps > 1

    def _step(carry, x):
        if in_place:
            lam, Lam, pc_next, cross_buf = carry  # lambda_{t+1}, Lambda_{t+1}, P_{t+1|t}, output
        else:
            (lam, Lam), pc_next = carry, x["pc_next"]
        A = jnp.where(x["valid_next"], params.at(x["t"]).transition_matrix, eye_x)
        Pf, sol, zt = x["fc"], x["factors"], x["z"]
        Wt, Vt = sol[:, :dx], sol[:, dx : 2 * dx]
        X = ops.mm(Pf, A.T)  # P_{t|t} A_t^T
        # B_t = A_t F_t = A_t - (A_t W_t^T) V_t, so lambda_t = V^T z + B^T lambda_{t+1}
        Bt = A - ops.mm(ops.mm(A, Wt.T), Vt)
        Y = ops.mm(X, Lam)
        s_mean = x["fm"] + ops.mv(X, lam)
        s_cov = symmetrize(Pf - ops.mm(Y, X.T))
        cross = jnp.where(x["valid_next"], X - ops.mm(Y, pc_next), 0.0)
        lam_new = ops.mv(Vt.T, zt) + ops.mv(Bt.T, lam)
        Lam_new = symmetrize(ops.mm(Vt.T, Vt) + ops.mm(ops.mm(Bt.T, Lam), Bt))
        if not in_place:
            return (lam_new, Lam_new), (s_mean, s_cov, cross)
        idx = jnp.minimum(x["t"], num_timesteps - 2)
        cross_buf = jax.lax.dynamic_update_slice_in_dim(cross_buf, cross[None], idx, axis=0)
        return (lam_new, Lam_new, x["pc"], cross_buf), (s_mean, s_cov)

    xs = dict(t=jnp.arange(num_timesteps), fm=fm, fc=fc, factors=factors[0], z=factors[1], valid_next=valid_next)
    zeros = jnp.zeros((dx, dx), dtype)
    if not in_place:
        xs["pc_next"] = jnp.concatenate([pc[1:], zeros[None]], axis=0)
        _, (sm, sc, cross) = jax.lax.scan(_step, (jnp.zeros((dx,), dtype), zeros), xs, reverse=True)
        return sm, sc, cross[:-1]
    xs.update(pc=pc)
    init = (jnp.zeros((dx,), dtype), zeros, zeros, jnp.zeros((num_timesteps - 1, dx, dx), dtype))
    (_, _, _, cross), (sm, sc) = jax.lax.scan(_step, init, xs, reverse=True)
    return sm, sc, cross


def _smooth_sqrt(
    params: KalmanParams,
    fm: Float[Array, "T Dx"],
    chol_fc: Float[Array, "T Dx Dx"],
    pm: Float[Array, "T Dx"],
    chol_pc: Float[Array, "T Dx Dx"],
    chol_q,
    valid_next: Bool[Array, " T"],
):
    ops = GeneralOps
    num_timesteps, dx = fm.shape
    eye_x = jnp.eye(dx, dtype=fm.dtype)
    vn = valid_next[:-1]
    A = _transitions(params, num_timesteps)
    chol_pred_next = jnp.where(vn[:, None, None], chol_pc[1:], eye_x)
    G = _smoother_gains(A, _outer(chol_fc[:-1]), chol_pred_next, vn, ops)
    cq = chol_q[: num_timesteps - 1] if chol_q.ndim == 3 else chol_q
    # parts of the pre-array that do not depend on the recursion, batched
    part_f = ops.mm(eye_x - ops.mm(G, A), chol_fc[:-1])
    part_q = ops.mm(G, cq)

    def _step(carry, x):
        s_mean_next, chol_s_next = carry
        gain = x["G"]
        s_mean = x["fm"] + ops.mv(gain, s_mean_next - x["pm_next"])
        gs = ops.mm(gain, chol_s_next)
        chol_s = _tria(jnp.concatenate([x["part_f"], x["part_q"], gs], axis=1))
        cross = ops.mm(gs, chol_s_next.T)
        return (s_mean, chol_s), (s_mean, chol_s, cross)

    xs = dict(G=G, fm=fm[:-1], pm_next=pm[1:], part_f=part_f, part_q=part_q)
    _, (sm, chol_sc, cross) = jax.lax.scan(_step, (fm[-1], chol_fc[-1]), xs, reverse=True)
    sm = jnp.concatenate([sm, fm[-1:]], axis=0)
    chol_sc = jnp.concatenate([chol_sc, chol_fc[-1:]], axis=0)
    return sm, chol_sc, cross


# --------------------------------------------------------------------------- jitted cores


def _run_filter(model, emissions, inputs, length, method, ops, observed=False):
    params, ys, mask, valid_next = _canonical(model, emissions, inputs, length, observed)
    has_length = length is not None
    if method == "sqrt":
        loglik, fm, chol_fc, pm, chol_pc, chol_q = _filter_sqrt(params, ys, mask, valid_next, has_length)
        return params, valid_next, (loglik, fm, chol_fc, pm, chol_pc, chol_q)
    loglik, fm, fc, pm, pc, factors = _filter_standard(params, ys, mask, valid_next, has_length, ops)
    return params, valid_next, (loglik, fm, fc, pm, pc, factors)


def _filter_full(model, emissions, inputs, length, ops, method="standard", observed=False):
    """The full filter recursion: ``(loglik, fm, fc, pm, pc)``."""
    _, _, out = _run_filter(model, emissions, inputs, length, method, ops, observed)
    if method == "sqrt":
        loglik, fm, chol_fc, pm, chol_pc, _ = out
        return loglik, fm, _outer(chol_fc), pm, _outer(chol_pc)
    loglik, fm, fc, pm, pc, _ = out
    return loglik, fm, fc, pm, pc


def _smoother_full(model, emissions, inputs, length, ops, method="standard", observed=False):
    """The full filter and smoother recursions: ``(loglik, fm, fc, pm, pc, sm, sc, cross)``."""
    params, valid_next, out = _run_filter(model, emissions, inputs, length, method, ops, observed)
    if method == "sqrt":
        loglik, fm, chol_fc, pm, chol_pc, chol_q = out
        sm, chol_sc, cross = _smooth_sqrt(params, fm, chol_fc, pm, chol_pc, chol_q, valid_next)
        return loglik, fm, _outer(chol_fc), pm, _outer(chol_pc), sm, _outer(chol_sc), cross
    loglik, fm, fc, pm, pc, factors = out
    sm, sc, cross = _smooth_standard(params, fm, fc, pc, factors, valid_next, ops)
    return loglik, fm, fc, pm, pc, sm, sc, cross


def _run(smoother, model, emissions, inputs, length, method, ops, masking, transient_steps, schedule):
    """The filter or smoother outputs along the path chosen by :mod:`ssmjax._lgssm.strategy`
    (``schedule=None``: by its rule, with ``transient_steps`` for the steady-state path)."""
    full = _smoother_full if smoother else _filter_full
    if schedule is None:
        schedule = "steady-state" if strategy.steady_state_applies(model, emissions.shape[0], method, transient_steps) else "sequential"
    if schedule == "steady-state":
        return steady.run(model, emissions, inputs, length, smoother, ops, transient_steps, masking, full)

    def run(model, emissions, inputs, length, observed):
        return full(model, emissions, inputs, length, ops, method, observed)

    return strategy.run_masked_or_observed(masking, run, model, emissions, inputs, length)


def _filter_impl(
    model: AbstractLGSSM,
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
    method: str,
    ops: type,
    masking: str = "auto",
    transient_steps: int = strategy.TRANSIENT_STEPS,
    schedule: Optional[str] = None,
) -> KalmanFilterResult:
    loglik, fm, fc, pm, pc = _run(False, model, emissions, inputs, length, method, ops, masking, transient_steps, schedule)
    return KalmanFilterResult(
        marginal_loglik=loglik, filtered_means=fm, filtered_covs=fc, predicted_means=pm, predicted_covs=pc
    )


def _smoother_impl(
    model: AbstractLGSSM,
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
    method: str,
    ops: type,
    masking: str = "auto",
    transient_steps: int = strategy.TRANSIENT_STEPS,
    schedule: Optional[str] = None,
) -> RTSSmootherResult:
    loglik, fm, fc, pm, pc, sm, sc, cross = _run(
        True, model, emissions, inputs, length, method, ops, masking, transient_steps, schedule
    )
    return RTSSmootherResult(
        marginal_loglik=loglik, filtered_means=fm, filtered_covs=fc, predicted_means=pm, predicted_covs=pc,
        smoothed_means=sm, smoothed_covs=sc, smoothed_cross_covs=cross,
    )


_STATIC = ("method", "ops", "masking", "transient_steps", "schedule")
_filter_jit = jax.jit(_filter_impl, static_argnames=_STATIC)
_smoother_jit = jax.jit(_smoother_impl, static_argnames=_STATIC)


def _sample_posterior_impl(
    key: PRNGKeyArray,
    model: AbstractLGSSM,
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
    ops: type,
) -> Float[Array, "T Dx"]:
    params, valid_next, out = _run_filter(model, emissions, inputs, length, "standard", ops)
    _, fm, fc, pm, pc, _ = out
    num_timesteps, dx = fm.shape
    eye_x = jnp.eye(dx, dtype=fm.dtype)
    vn = valid_next[:-1]
    A = _transitions(params, num_timesteps)
    pred_next = jnp.where(vn[:, None, None], pc[1:], eye_x)
    G = _smoother_gains(A, fc[:-1], ops.cholesky(pred_next), vn, ops)
    # x_t | x_{t+1}, y_{1:t} ~ N(m_t + G_t (x_{t+1} - m_{t+1|t}), P_t - G_t P_{t+1|t} G_t^T)
    cond_covs = symmetrize(fc[:-1] - ops.mm(ops.mm(G, pc[1:]), jnp.swapaxes(G, -1, -2)))
    chol = psd_cholesky(jnp.concatenate([cond_covs, fc[-1:]], axis=0))
    noise = ops.mv(chol, jax.random.normal(key, fm.shape, fm.dtype))
    offsets = fm - jnp.concatenate([ops.mv(G, pm[1:]), jnp.zeros((1, dx), fm.dtype)], axis=0) + noise

    def _step(x_next, x):
        state = x["offset"] + ops.mv(x["G"], x_next)
        return state, state

    last = offsets[-1]
    _, states = jax.lax.scan(_step, last, dict(G=G, offset=offsets[:-1]), reverse=True)
    states = jnp.concatenate([states, last[None]], axis=0)
    if length is not None:
        keep = jnp.arange(num_timesteps) < length
        states = jnp.where(keep[:, None], states, states[length - 1])
    return states


_sample_posterior_jit = jax.jit(_sample_posterior_impl, static_argnames=("ops",))


# --------------------------------------------------------------------------- public API


def _validate_and_choose(model, emissions, inputs, length, method, parallel, forced, smoother=False):
    _check_method(method)
    if parallel and method == "sqrt":
        raise ValueError(f"`parallel=True` supports method='standard' only; got method={method!r}.")
    model, y, u, length_arr = _validate(model, emissions, inputs, length)
    if forced is not None:
        return model, y, u, length_arr, strategy.check_forced(forced, model, y, length_arr)
    return model, y, u, length_arr, strategy.select_strategy(model, y, length_arr, method, parallel, smoother)


def _dispatch(smoother, chosen, model, y, u, length):
    """Run the filter (or smoother) along ``chosen``, a :class:`ssmjax.KalmanStrategy`.

    A model with diffuse components runs the exact diffuse versions (:mod:`ssmjax._lgssm.diffuse`) on a
    sequential schedule; its filter returns the log-likelihood only (see :func:`_proper_only`).
    """
    ops = SmallOps if chosen.ops == "small" else GeneralOps
    method = "sqrt" if chosen.form == "sqrt" else "standard"
    schedule = chosen.schedule
    if getattr(model, "diffuse", ()):
        run = _smoother_diffuse_jit if smoother else _loglik_diffuse_jit
    elif schedule == "parallel":
        return (_smoother_parallel if smoother else _filter_parallel)(model, y, u, length, ops=ops)
    else:
        run = _smoother_jit if smoother else _filter_jit
    return run(model, y, u, length, method=method, ops=ops, masking=chosen.masking, schedule=schedule)


def _proper_only(model, what: str) -> None:
    """A model with a diffuse initial state has an improper prior: what needs a proper one refuses it."""
    if getattr(model, "diffuse", ()):
        raise ValueError(
            f"`{what}` needs a proper prior on the initial state, and the model has diffuse components "
            f"{[int(i) for i in np.flatnonzero(model.diffuse)]}: use rts_smoother (the exact diffuse posterior) or "
            "model.marginal_loglik, or give the model a proper initial_cov (diffuse=None)."
        )


def _smoother_diffuse_impl(model, y, u, length, method, ops, masking, schedule):
    run = lambda m: _smoother_impl(m, y, u, length, method, ops, masking, schedule=schedule)  # noqa: E731
    return diffuse.smoother(run, model, length)


def _loglik_diffuse_impl(model, y, u, length, method, ops, masking, schedule):
    run = lambda m: _filter_impl(m, y, u, length, method, ops, masking, schedule=schedule).marginal_loglik  # noqa: E731
    return diffuse.loglik(run, model)


_SERIAL = ("method", "ops", "masking", "schedule")
_smoother_diffuse_jit = jax.jit(_smoother_diffuse_impl, static_argnames=_SERIAL)
_loglik_diffuse_jit = jax.jit(_loglik_diffuse_impl, static_argnames=_SERIAL)


def marginal_loglik(model, emissions, *, inputs=None, length=None) -> Array:
    """``log p(y_{1:T})`` of one sequence: the Kalman filter's, or the exact diffuse log-likelihood
    (:mod:`ssmjax._lgssm.diffuse`) when the model has diffuse components."""
    model, y, u, length_arr, chosen = _validate_and_choose(model, emissions, inputs, length, "auto", False, None)
    out = _dispatch(False, chosen, model, y, u, length_arr)
    return out if getattr(model, "diffuse", ()) else out.marginal_loglik


@typing.no_type_check
def lgssm_strategy(
    model: AbstractLGSSM,
    emissions: Float[ArrayLike, "T Dy"],
    *,
    inputs: Float[ArrayLike, "T Du"] | None = None,
    length: Int[ArrayLike, ""] | None = None,
    method: str = "auto",
    parallel: bool = False,
) -> KalmanStrategy:
    r"""The path that :func:`kalman_filter` and :func:`rts_smoother` take for these arguments, and why.

    The choice is made in one place (:mod:`ssmjax._lgssm.strategy`) from shapes, options and,
    for concrete emissions, whether any entry is missing or any step padded. Pass the result,
    or one built by hand, as ``strategy=`` to force a path; the results are the same to
    round-off whatever the path.

    Args:
        model, emissions, inputs, length, method, parallel: as in :func:`kalman_filter`.

    Returns:
        A :class:`KalmanStrategy` with the reasons for each choice.

    Example:
        >>> import jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(4), initial_cov=jnp.eye(4),
        ...     transition_matrix=0.9 * jnp.eye(4), transition_cov=0.1 * jnp.eye(4),
        ...     emission_matrix=jnp.ones((2, 4)), emission_cov=jnp.eye(2))
        >>> chosen = ssmjax.lgssm_strategy(model, jnp.zeros((1000, 2)))
        >>> chosen.schedule, chosen.form, chosen.ops, chosen.masking
        ('steady-state', 'covariance', 'small', 'observed')
        >>> forced = ssmjax.KalmanStrategy(schedule="sequential", form="covariance", ops="general", masking="masked")
        >>> post = ssmjax.rts_smoother(model, jnp.zeros((1000, 2)), strategy=forced)
    """
    return _validate_and_choose(model, emissions, inputs, length, method, parallel, None)[-1]


def _ops_for(model):
    dx, dy, _ = model_dims(model)
    return choose_ops(dx, dy)


@typing.no_type_check
def kalman_filter(
    model: AbstractLGSSM,
    emissions: Float[ArrayLike, "T Dy"],
    *,
    inputs: Float[ArrayLike, "T Du"] | None = None,
    length: Int[ArrayLike, ""] | None = None,
    method: str = "auto",
    parallel: bool = False,
    strategy: KalmanStrategy | None = None,
) -> KalmanFilterResult:
    r"""Kalman filter: filtered and one-step predicted moments and :math:`\log p(y_{1:T})`.

    For the model, time convention, missing data and padding see
    :mod:`ssmjax._lgssm.model`. With predicted moments :math:`m_{t|t-1}, P_{t|t-1}`, the
    update at step :math:`t` is

    .. math::

        S_t = C_t P_{t|t-1} C_t^\top + R_t,\quad K_t = P_{t|t-1} C_t^\top S_t^{-1},\\
        m_{t|t} = m_{t|t-1} + K_t (y_t - C_t m_{t|t-1} - D_t u_t - d_t),\quad
        P_{t|t} = P_{t|t-1} - K_t S_t K_t^\top,

    computed through the Cholesky factor of :math:`S_t` (no inverse), which also gives
    :math:`\log p(y_t \mid y_{1:t-1}) = \log \mathcal N(y_t; C_t m_{t|t-1} + D_t u_t + d_t, S_t)`,
    restricted to the observed entries of :math:`y_t`.

    Args:
        model: an :class:`ssmjax.LGSSM`.
        emissions: (T, Dy); NaN entries are missing.
        inputs: (T, Du), required exactly when the model has input matrices.
        length: number of real steps (see :mod:`ssmjax._types`); steps ``>= length`` are padding.
        method: ``"auto"`` (the default: ``"standard"``, or ``"sqrt"`` for a float32 model
            whose initial covariance dwarfs the emission noise, where the covariance form
            loses accuracy; see :func:`lgssm_strategy`), ``"standard"`` (covariance form;
            small dimensions take an unrolled, elementwise fast path automatically, and
            time-invariant models on long sequences compute the covariances only until
            they settle, see :mod:`ssmjax._lgssm.steady`) or ``"sqrt"`` (Cholesky factors
            propagated by QR; slower, stays accurate in float32 when the covariance form
            loses positive-definiteness, e.g. near-singular emission noise or a
            near-diffuse prior).

        parallel: ``True`` runs the parallel-in-time version (``lax.associative_scan``,
            O(log T) depth; :mod:`ssmjax._lgssm.parallel`) with ``method="standard"``; same
            results to round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).
        strategy: a :class:`KalmanStrategy` forcing the path (schedule, form, ops, masking);
            ``None`` chooses one as :func:`lgssm_strategy` reports. ``method`` and
            ``parallel`` are then ignored.
    Returns:
        A :class:`KalmanFilterResult`.

    Raises:
        ValueError: wrong shapes (naming the argument and both shapes), inputs missing or
            unexpected, a bad ``length`` or ``method``, or (value checks) covariances that
            are not symmetric positive (semi-)definite.

    Example:
        >>> import jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1),
        ...     transition_matrix=jnp.eye(1), transition_cov=0.1 * jnp.eye(1),
        ...     emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
        >>> result = ssmjax.kalman_filter(model, jnp.array([[0.5], [jnp.nan], [1.0]]))
        >>> result.filtered_means.shape
        (3, 1)
    """
    _proper_only(model, "kalman_filter")
    model, y, u, length_arr, chosen = _validate_and_choose(model, emissions, inputs, length, method, parallel, strategy)
    return _dispatch(False, chosen, model, y, u, length_arr)


@typing.no_type_check
def rts_smoother(
    model: AbstractLGSSM,
    emissions: Float[ArrayLike, "T Dy"],
    *,
    inputs: Float[ArrayLike, "T Du"] | None = None,
    length: Int[ArrayLike, ""] | None = None,
    method: str = "auto",
    parallel: bool = False,
    strategy: KalmanStrategy | None = None,
) -> RTSSmootherResult:
    r"""Rauch-Tung-Striebel smoother: posterior marginals and lag-one cross-covariances.

    Runs :func:`kalman_filter`, then, backwards from :math:`t = T-1`,

    .. math::

        G_t = P_{t|t} A_t^\top P_{t+1|t}^{-1},\quad
        m_{t|T} = m_{t|t} + G_t (m_{t+1|T} - m_{t+1|t}),\\
        P_{t|T} = P_{t|t} + G_t (P_{t+1|T} - P_{t+1|t}) G_t^\top,\quad
        \mathrm{Cov}(x_t, x_{t+1} \mid y_{1:T}) = G_t P_{t+1|T}.

    ``method="standard"`` evaluates exactly these moments by the equivalent modified
    Bryson-Frazier recursion (only matrix products in the backward scan, no per-step
    factorisation or inverse of :math:`P_{t+1|t}`). ``method="sqrt"`` computes the gains for
    all steps at once before the backward scan and propagates Cholesky factors of
    :math:`P_{t|T}` through the QR of
    :math:`[(I - G_t A_t) L_{t|t},\ G_t L_{Q_t},\ G_t L_{t+1|T}]`.
    Arguments, missing data and padding as in :func:`kalman_filter` (convention:
    :mod:`ssmjax._lgssm.model`).

        parallel: ``True`` runs the parallel-in-time version (``lax.associative_scan``,
            O(log T) depth; :mod:`ssmjax._lgssm.parallel`) with ``method="standard"``; same
            results to round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).
        strategy: a :class:`KalmanStrategy` forcing the path (schedule, form, ops, masking);
            ``None`` chooses one as :func:`lgssm_strategy` reports. ``method`` and
            ``parallel`` are then ignored.
    Returns:
        An :class:`RTSSmootherResult`.

    Raises:
        ValueError: as :func:`kalman_filter`.

    Example:
        >>> import jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1),
        ...     transition_matrix=jnp.eye(1), transition_cov=0.1 * jnp.eye(1),
        ...     emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
        >>> post = ssmjax.rts_smoother(model, jnp.array([[0.5], [jnp.nan], [1.0]]))
        >>> post.smoothed_cross_covs.shape
        (2, 1, 1)
    """
    model, y, u, length_arr, chosen = _validate_and_choose(model, emissions, inputs, length, method, parallel, strategy,
                                                           smoother=True)
    return _dispatch(True, chosen, model, y, u, length_arr)


@_deprecation.key_last("lgssm_sample_posterior")
@typing.no_type_check
def lgssm_sample_posterior(
    model: AbstractLGSSM,
    emissions: Float[ArrayLike, "T Dy"],
    *,
    inputs: Float[ArrayLike, "T Du"] | None = None,
    length: Int[ArrayLike, ""] | None = None,
    key: PRNGKeyArray,
) -> Float[Array, "T Dx"]:
    r"""One exact joint sample of :math:`x_{1:T} \mid y_{1:T}` (forward filter, backward sample).

    After the Kalman filter, :math:`x_T \sim \mathcal N(m_{T|T}, P_{T|T})` and, backwards,

    .. math::

        x_t \mid x_{t+1} \sim \mathcal N\big(m_{t|t} + G_t (x_{t+1} - m_{t+1|t}),\
        P_{t|t} - G_t P_{t+1|t} G_t^\top\big).

    The sample is a differentiable function of the parameters and emissions
    (reparameterised: standard normal noise times a Cholesky factor; singular
    conditional covariances, e.g. from deterministic components, are allowed).
    Arguments, missing data and padding as in :func:`kalman_filter` (convention:
    :mod:`ssmjax._lgssm.model`); padded steps repeat ``x[length - 1]``.

    Args:
        model, emissions, inputs, length: as in :func:`kalman_filter`.
        key: a JAX PRNG key (keyword-only, as everywhere in ssmjax).

    Returns:
        States of shape (T, Dx).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1),
        ...     transition_matrix=jnp.eye(1), transition_cov=0.1 * jnp.eye(1),
        ...     emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
        >>> ssmjax.lgssm_sample_posterior(model, jnp.ones((4, 1)), key=jax.random.key(0)).shape
        (4, 1)
    """
    _proper_only(model, "lgssm_sample_posterior")
    model, y, u, length_arr = _validate(model, emissions, inputs, length)
    return _sample_posterior_jit(key, model, y, u, length_arr, ops=_ops_for(model))


def _sample_impl(
    key: PRNGKeyArray, model: AbstractLGSSM, inputs: Optional[Float[Array, "T Du"]], num_timesteps: int
) -> tuple[Float[Array, "T Dx"], Float[Array, "T Dy"]]:
    dx, dy, _ = model_dims(model)
    dummy = jnp.zeros((num_timesteps, dy), _dtype(model, inputs))
    params, _, _, _ = _canonical(model, dummy, inputs, None)
    dtype = dummy.dtype
    k0, k1, k2 = jax.random.split(key, 3)
    ops = GeneralOps
    x0 = params.initial_mean + ops.mv(jnp.linalg.cholesky(params.initial_cov), jax.random.normal(k0, (dx,), dtype))
    # sampling reads Q through its Cholesky factor
    factored = eqx.tree_at(lambda p: p.transition_cov, params, psd_cholesky(params.transition_cov))
    noise = jax.random.normal(k1, (num_timesteps, dx), dtype)

    def _step(state, x):
        q = factored.at(x["t"])
        return step.predict_mean(state, q.transition_matrix, q.transition_offset, ops) + ops.mv(q.transition_cov, x["noise"]), state

    _, states = jax.lax.scan(_step, x0, dict(t=jnp.arange(num_timesteps), noise=noise))
    C = params.emission_matrix
    chol_r = jnp.linalg.cholesky(params.emission_cov)
    eps = jax.random.normal(k2, (num_timesteps, dy), dtype)
    means = jnp.einsum("tij,tj->ti" if C.ndim == 3 else "ij,tj->ti", C, states, precision=matmul_precision())
    if params.emission_offset is not None:
        means = means + params.emission_offset
    noise_y = jnp.einsum(
        "tij,tj->ti" if chol_r.ndim == 3 else "ij,tj->ti", chol_r, eps, precision=matmul_precision()
    )
    return states, means + noise_y


_sample_jit = jax.jit(_sample_impl, static_argnames=("num_timesteps",))


@_deprecation.key_last("lgssm_sample")
@typing.no_type_check
def lgssm_sample(
    model: AbstractLGSSM, num_timesteps: int, *, inputs: Float[ArrayLike, "T Du"] | None = None, key: PRNGKeyArray
) -> tuple[Float[Array, "T Dx"], Float[Array, "T Dy"]]:
    r"""Draw states and emissions from the model (ancestral sampling).

    :math:`x_1 \sim \mathcal N(\mu_0, \Sigma_0)`, then the transition and emission
    equations of :mod:`ssmjax._lgssm.model` with fresh Gaussian noise. Time-varying
    fields must have ``num_timesteps - 1`` (transitions) or ``num_timesteps``
    (emissions) entries.

    Args:
        model: an :class:`ssmjax.LGSSM`.
        num_timesteps: T, a Python int.
        inputs: (T, Du), required exactly when the model has input matrices.
        key: a JAX PRNG key (keyword-only).

    Returns:
        ``(states, emissions)`` of shapes (T, Dx) and (T, Dy).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2),
        ...     transition_matrix=0.9 * jnp.eye(2), transition_cov=0.1 * jnp.eye(2),
        ...     emission_matrix=jnp.ones((1, 2)), emission_cov=jnp.eye(1))
        >>> states, emissions = ssmjax.lgssm_sample(model, 5, key=jax.random.key(0))
        >>> states.shape, emissions.shape
        ((5, 2), (5, 1))
    """
    if not isinstance(model, AbstractLGSSM):
        raise ValueError(f"`model` must be an ssmjax.LGSSM; got {type(model).__name__}.")
    num_timesteps = _checks.positive_int("num_timesteps", num_timesteps)
    _proper_only(model, "lgssm_sample")
    time_sizes = validate_shapes(model)
    _check_time_sizes(time_sizes, num_timesteps)
    _, _, du = model_dims(model)
    u = _validate_inputs(model, inputs, num_timesteps, du, "inputs")
    model = _value_check_model(model)
    return _sample_jit(key, model, u, num_timesteps=num_timesteps)


def _forecast_impl(
    model: AbstractLGSSM,
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
    future_inputs: Optional[Float[Array, "H Du"]],
    num_steps: int,
    ops: type,
) -> LGSSMForecastResult:
    _, _, out = _run_filter(model, emissions, inputs, length, "standard", ops)
    _, fm, fc, _, _, _ = out
    num_timesteps = emissions.shape[0]
    dtype = fm.dtype
    end = num_timesteps if length is None else length
    # parameters of the last real step, reused over the horizon
    t_idx = jnp.maximum(end - 2, 0)
    e_idx = end - 1

    def pick(a, static_ndim, idx):
        if a is None:
            return None
        a = jnp.asarray(a, dtype)
        return a[idx] if a.ndim == static_ndim + 1 else a

    A = pick(model.transition_matrix, 2, t_idx)
    Q = pick(model.transition_cov, 2, t_idx)
    B = pick(model.transition_input_matrix, 2, t_idx)
    b = pick(model.transition_offset, 1, t_idx)
    C = pick(model.emission_matrix, 2, e_idx)
    R = pick(model.emission_cov, 2, e_idx)
    D = pick(model.emission_input_matrix, 2, e_idx)
    d = pick(model.emission_offset, 1, e_idx)
    fu = None if future_inputs is None else jnp.asarray(future_inputs, dtype)

    def _step(carry, x):
        mean, cov = carry
        mean = ops.mv(A, mean)
        if B is not None:
            mean = mean + ops.mv(B, x["u"])
        if b is not None:
            mean = mean + b
        cov = symmetrize(ops.mm(ops.mm(A, cov), A.T) + Q)
        y_mean = ops.mv(C, mean)
        if D is not None:
            y_mean = y_mean + ops.mv(D, x["u"])
        if d is not None:
            y_mean = y_mean + d
        y_cov = symmetrize(ops.mm(ops.mm(C, cov), C.T) + R)
        return (mean, cov), (mean, cov, y_mean, y_cov)

    xs = dict(step=jnp.arange(num_steps))
    if fu is not None:
        xs["u"] = fu
    _, (sm, sc, ym, yc) = jax.lax.scan(_step, (fm[-1], fc[-1]), xs)
    return LGSSMForecastResult(state_means=sm, state_covs=sc, emission_means=ym, emission_covs=yc)


_forecast_jit = jax.jit(_forecast_impl, static_argnames=("num_steps", "ops"))


@typing.no_type_check
def lgssm_forecast(
    model: AbstractLGSSM,
    emissions: Float[ArrayLike, "T Dy"],
    num_steps: int,
    *,
    inputs: Float[ArrayLike, "T Du"] | None = None,
    length: Int[ArrayLike, ""] | None = None,
    future_inputs: Float[ArrayLike, "H Du"] | None = None,
) -> LGSSMForecastResult:
    r"""Predictive moments of future states and emissions given the observed sequence.

    With ``L = length`` (or ``T``) observed steps and filtered moments
    :math:`m_{L|L}, P_{L|L}` of the last real step, for :math:`h = 0, \dots, H-1`

    .. math::

        m_{L+h+1} = A m_{L+h} + B u_{L+h+1} + b,\quad P_{L+h+1} = A P_{L+h} A^\top + Q,\\
        E[y] = C m + D u + d,\quad \mathrm{Cov}[y] = C P C^\top + R

    (1-based math, as in :mod:`ssmjax._lgssm.model`; entry ``h`` of the result is
    0-based step ``L + h``).

    **Future inputs.** ``future_inputs`` (H, Du) supplies the inputs of the forecast
    steps: ``future_inputs[h]`` is the input of 0-based step ``L + h``, used both by
    the transition into it and by its emission. It is required exactly when the model
    has input matrices.

    **Time-varying parameters** cover the observed window only (T-1 / T entries, like
    the filter); every forecast step reuses the parameters of the last real step:
    transition entry ``max(L - 2, 0)`` and emission entry ``L - 1``. To forecast with
    other parameters, build a time-invariant model with them and call
    :func:`lgssm_forecast` on it.

    Args:
        model: an :class:`ssmjax.LGSSM`.
        emissions: (T, Dy), NaN = missing.
        num_steps: H, a Python int ``>= 0``.
        inputs: (T, Du) inputs of the observed window.
        length: number of real steps (padding convention of :mod:`ssmjax._types`).
        future_inputs: (H, Du) inputs of the forecast steps.

    Returns:
        An :class:`LGSSMForecastResult`.

    Example:
        >>> import jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1),
        ...     transition_matrix=jnp.eye(1), transition_cov=0.1 * jnp.eye(1),
        ...     emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
        >>> fc = ssmjax.lgssm_forecast(model, jnp.ones((5, 1)), 3)
        >>> fc.emission_means.shape
        (3, 1)
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be a non-negative Python int; got {num_steps!r}.")
    _proper_only(model, "lgssm_forecast")
    model, y, u, length_arr = _validate(model, emissions, inputs, length)
    _, _, du = model_dims(model)
    fu = _validate_inputs(model, future_inputs, num_steps, du, "future_inputs")
    time_sizes = validate_shapes(model)
    tv_transition = any(time_sizes[n] is not None for n in time_sizes if n.startswith("transition"))
    if tv_transition and y.shape[0] < 2 and num_steps > 0:
        raise ValueError("a time-varying transition needs T >= 2 to forecast (no transition entry to reuse).")
    return _forecast_jit(model, y, u, length_arr, fu, num_steps=num_steps, ops=_ops_for(model))
