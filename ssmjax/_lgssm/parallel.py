r"""Parallel-in-time (associative-scan) Kalman filter and RTS smoother.

Private counterparts of :func:`ssmjax.kalman_filter` and :func:`ssmjax.rts_smoother`
with the same arguments, validation (the sequential module's ``_validate`` and
``_canonical``, so errors, missing-data masking and padding are identical), result
classes and documented padded outputs, but :math:`O(\log T)` depth: the only
recursions are two :func:`jax.lax.associative_scan` calls (Särkkä &
García-Fernández, 2021). They do a constant factor more work (a
:math:`D_x \times D_x` solve per combination) and pay off only on parallel hardware
(see ``benchmarks/parallel.py``).

Notation (0-based, as in :mod:`ssmjax._lgssm.model`): step ``t`` has the masked
emission matrix :math:`H_t` (rows of missing entries zeroed), masked noise
:math:`R_t` (missing rows/columns replaced by the identity) and residual offset
:math:`e_t` (:math:`D_t u_t + d_t`); transition ``t`` is :math:`x_{t+1} = F_t x_t +
c_t + w_t`, :math:`w_t \sim \mathcal N(0, Q_t)` (:math:`c_t = B_t u_{t+1} + b_t`).

Filtering elements
    Element ``t`` describes :math:`p(x_t \mid x_{t-1}, y_t) = \mathcal N(A_t x_{t-1} +
    b_t, C_t)` together with the likelihood :math:`p(y_t \mid x_{t-1}) \propto
    \exp(-\tfrac12 x^\top J_t x + \eta_t^\top x)`. With :math:`(F, c, Q)` the
    transition into step ``t`` (for ``t = 0``: :math:`F = 0, c = \mu_0, Q = \Sigma_0`),
    :math:`S = H Q H^\top + R = L L^\top` (Cholesky) and the triangular solves
    :math:`W = L^{-1} H Q`, :math:`V = L^{-1} H F`, :math:`z = L^{-1}(y - H c - e)`:

    .. math::

        A = F - W^\top V,\quad b = c + W^\top z,\quad C = Q - W^\top W,\quad
        \eta = V^\top z,\quad J = V^\top V.

    Two elements combine (``i`` earlier, ``j`` later) with :math:`X = I + C_i J_j`:

    .. math::

        A_{ij} = A_j X^{-1} A_i,\quad b_{ij} = A_j X^{-1}(b_i + C_i \eta_j) + b_j,\quad
        C_{ij} = A_j X^{-1} C_i A_j^\top + C_j,\\
        \eta_{ij} = A_i^\top X^{-\top}(\eta_j - J_j b_i) + \eta_i,\quad
        J_{ij} = A_i^\top X^{-\top} J_j A_i + J_i.

    The prefix ending at ``t`` has :math:`A = 0`, :math:`b = m_{t|t}`,
    :math:`C = P_{t|t}`. :math:`C_i` and :math:`J_j` are only positive
    *semi*-definite (a deterministic state component, or fewer observations than
    states, makes them singular), so neither has a Cholesky factor in general and
    :math:`X` is not symmetric: it is solved by LU (``jax.scipy.linalg.lu_factor``; no inverse
    is formed; one LU serves :math:`X` and :math:`X^\top`). Its eigenvalues are those of :math:`I + C_i^{1/2} J_j C_i^{1/2}`,
    all real and :math:`\ge 1`, so the solve is always well posed. Every other solve
    (the elements above, the log-likelihood, the smoother gains) is a Cholesky
    solve. Covariances are symmetrised after each combination.

Log-likelihood
    After the scan, the predicted moments of every step come from the filtered
    moments of the previous one, vectorised over time
    (:math:`m_{t|t-1} = F_{t-1} m_{t-1|t-1} + c_{t-1}`,
    :math:`P_{t|t-1} = F_{t-1} P_{t-1|t-1} F_{t-1}^\top + Q_{t-1}`), and
    :math:`\log p(y_{1:T}) = \sum_t \log \mathcal N(y_t; H_t m_{t|t-1} + e_t,
    H_t P_{t|t-1} H_t^\top + R_t)` over the observed entries (Cholesky of the
    innovation covariance, :math:`\log 2\pi` counted per observed entry).

Smoothing elements
    Element ``t < T-1`` is :math:`p(x_t \mid x_{t+1}, y_{1:t}) = \mathcal N(E_t x_{t+1}
    + g_t, L_t)` with the RTS gain :math:`E_t = P_{t|t} F_t^\top P_{t+1|t}^{-1}`
    (Cholesky solve), :math:`g_t = m_{t|t} - E_t m_{t+1|t}`,
    :math:`L_t = P_{t|t} - E_t P_{t+1|t} E_t^\top`; the last one is
    :math:`(0, m_{T-1|T-1}, P_{T-1|T-1})`. Suffix compositions (``i`` earlier):
    :math:`E_{ij} = E_i E_j`, :math:`g_{ij} = E_i g_j + g_i`,
    :math:`L_{ij} = E_i L_j E_i^\top + L_i`, whose :math:`(g, L)` are the smoothed
    moments; cross-covariances are :math:`E_t P_{t+1|T}`. The gain needs
    :math:`P_{t+1|t}` positive definite at real steps (true unless the model makes a
    state component exactly known *and* has a deterministic transition for it; the
    sequential standard smoother, a Bryson-Frazier recursion, does not need this).

Padding and missing data
    As in :mod:`ssmjax._lgssm.inference`: padded steps have no observed entries and
    identity transitions with zero noise and offset, so their filtering elements are
    the identity element and their smoothing elements :math:`(0, m_{L-1|L-1},
    P_{L-1|L-1})`; all substitutions are ``where`` before arithmetic (NaN/inf there
    reach neither values nor gradients), and padded outputs are set exactly to the
    documented values (filtered moments of step ``length - 1``; zero
    cross-covariances). Gradients are plain automatic differentiation (exact).

References:
    S. Särkkä and Á. F. García-Fernández, "Temporal parallelization of Bayesian
    smoothers", IEEE Trans. Automatic Control 66(1), 2021.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax
from jaxtyping import Array, Float, Int

from .canonical import LOG_2PI as _LOG_2PI
from .canonical import _canonical
from .results import KalmanFilterResult, RTSSmootherResult
from .params import AbstractLGSSM
from .small import GeneralOps, symmetrize




def _t(a):
    return jnp.swapaxes(a, -1, -2)


# --------------------------------------------------------------------------- per-step parameters


def _steps(model, emissions, inputs, length):
    """Masked per-step parameters, each with a leading T axis.

    Returns ``dict(H, R, r, mask, F, c, Q, valid, valid_next)`` where ``r = y - e`` (zero
    at missing/padded entries) and ``(F, c, Q)[t]`` is transition ``t`` (``x_t -> x_{t+1}``;
    the identity with zero noise and offset where ``t + 1 >= length`` and at ``t = T-1``).
    """
    params, ys, mask, valid_next = _canonical(model, emissions, inputs, length)
    num_timesteps, dy = ys.shape
    dx = params.initial_mean.shape[-1]
    dtype = ys.dtype
    eye_x = jnp.eye(dx, dtype=dtype)
    eye_y = jnp.eye(dy, dtype=dtype)

    def full(name, static_shape):
        a = getattr(params, name)
        return a if params.is_time_varying(name) else jnp.broadcast_to(a, (num_timesteps,) + static_shape)

    # covariances enter symmetrised, so gradients w.r.t. them are symmetric (as the sequential ones)
    H = jnp.where(mask[:, :, None], full("emission_matrix", (dy, dx)), 0.0)
    R = jnp.where(mask[:, :, None] & mask[:, None, :], symmetrize(full("emission_cov", (dy, dy))), eye_y)
    r = ys
    if params.emission_offset is not None:
        r = r - full("emission_offset", (dy,))
    r = jnp.where(mask, r, 0.0)
    # transitions: the extra entry T-1 (and padding) is the identity
    vn = valid_next  # already False at t = T-1
    F = jnp.where(vn[:, None, None], full("transition_matrix", (dx, dx)), eye_x)
    Q = jnp.where(vn[:, None, None], symmetrize(full("transition_cov", (dx, dx))), 0.0)
    c = jnp.zeros((num_timesteps, dx), dtype)
    if params.transition_offset is not None:
        c = jnp.where(vn[:, None], full("transition_offset", (dx,)), 0.0)
    valid = jnp.arange(num_timesteps) < (num_timesteps if length is None else length)
    return dict(H=H, R=R, r=r, mask=mask, F=F, c=c, Q=Q, m0=params.initial_mean, P0=symmetrize(params.initial_cov), valid=valid,
                valid_next=vn)


# --------------------------------------------------------------------------- filtering


def _filtering_elements(s, ops):
    """Elements ``(A, b, C, eta, J)`` of shapes (T, Dx, Dx), (T, Dx), (T, Dx, Dx), (T, Dx), (T, Dx, Dx)."""
    dx = s["m0"].shape[-1]
    _mm, _mv = ops.mm, ops.mv
    # transition into step t: (F, c, Q)[t-1]; for t = 0 the prior with F = 0
    F = jnp.concatenate([jnp.zeros_like(s["F"][:1]), s["F"][:-1]])
    c = jnp.concatenate([s["m0"][None], s["c"][:-1]])
    Q = jnp.concatenate([s["P0"][None], s["Q"][:-1]])
    H, R = s["H"], s["R"]
    HQ = _mm(H, Q)
    S = symmetrize(_mm(HQ, _t(H)) + R)
    resid = s["r"] - _mv(H, c)
    rhs = jnp.concatenate([HQ, _mm(H, F), resid[..., None]], axis=-1)
    _, sol = ops.cholesky_solve_lower(S, rhs)
    W, V, z = sol[..., :dx], sol[..., dx : 2 * dx], sol[..., 2 * dx]
    A = F - _mm(_t(W), V)
    b = c + _mv(_t(W), z)
    C = symmetrize(Q - _mm(_t(W), W))
    eta = _mv(_t(V), z)
    J = symmetrize(_mm(_t(V), V))
    return A, b, C, eta, J


def _filtering_combine(earlier, later, ops):
    """Combine (batched) filtering elements, ``earlier`` then ``later``."""
    _mm, _mv = ops.mm, ops.mv
    A_i, b_i, C_i, eta_i, J_i = earlier
    A_j, b_j, C_j, eta_j, J_j = later
    dx = A_i.shape[-1]
    eye = jnp.eye(dx, dtype=A_i.dtype)
    X = eye + _mm(C_i, J_j)
    rhs = jnp.concatenate([A_i, (b_i + _mv(C_i, eta_j))[..., None], C_i], axis=-1)
    rhs_t = jnp.concatenate([(eta_j - _mv(J_j, b_i))[..., None], _mm(J_j, A_i)], axis=-1)
    sol, sol_t = ops.lu_solve_both(X, rhs, rhs_t)  # one LU for X and X^T
    sol_A, sol_b, sol_C = sol[..., :dx], sol[..., dx], sol[..., dx + 1 :]
    A = _mm(A_j, sol_A)
    b = _mv(A_j, sol_b) + b_j
    C = symmetrize(_mm(_mm(A_j, sol_C), _t(A_j)) + C_j)
    eta = _mv(_t(A_i), sol_t[..., 0]) + eta_i
    J = symmetrize(_mm(_t(A_i), sol_t[..., 1:]) + J_i)
    return A, b, C, eta, J


def _last_real(x, length):
    """``x[length - 1]`` (``x[-1]`` without padding)."""
    if length is None:
        return x[-1]
    return lax.dynamic_index_in_dim(x, length - 1, axis=0, keepdims=False)


def _pad_with(x, valid, last):
    """``x`` at real steps, ``last`` at padded ones."""
    return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, last)


def _filter_moments(s, length, ops):
    """``(fm, fc, pm, pc)`` from the prefix scan."""
    _mm, _mv = ops.mm, ops.mv
    combine = functools.partial(_filtering_combine, ops=ops)
    _, fm, fc, _, _ = lax.associative_scan(combine, _filtering_elements(s, ops))
    fc = symmetrize(fc)
    valid = s["valid"]
    if length is not None:  # documented padded outputs, exactly
        last_m, last_c = _last_real(fm, length), _last_real(fc, length)
        fm, fc = _pad_with(fm, valid, last_m), _pad_with(fc, valid, last_c)
    # predicted moments of step t from the filtered ones of step t-1, all steps at once
    F, c, Q = s["F"][:-1], s["c"][:-1], s["Q"][:-1]
    pm = jnp.concatenate([s["m0"][None], _mv(F, fm[:-1]) + c])
    pc = jnp.concatenate([s["P0"][None], symmetrize(_mm(_mm(F, fc[:-1]), _t(F)) + Q)])
    if length is not None:
        pm, pc = _pad_with(pm, valid, last_m), _pad_with(pc, valid, last_c)
    return fm, fc, pm, pc


def _innovations(s, pm, pc, ops):
    """Innovation covariances (T, Dy, Dy) and residuals (T, Dy) of every step given the past."""
    H, R = s["H"], s["R"]
    S = symmetrize(ops.mm(ops.mm(H, pc), _t(H)) + R)
    resid = jnp.where(s["mask"], s["r"] - ops.mv(H, pm), 0.0)
    return S, resid


def _loglik_from(s, log_diag, z):
    """``log p(y)`` from the innovations' Cholesky log-diagonals (T, Dy) and whitened residuals (T, Dy)."""
    nobs = jnp.sum(s["mask"]).astype(z.dtype)
    return -0.5 * jnp.sum(z * z) - jnp.sum(log_diag) - 0.5 * nobs * _LOG_2PI


def _loglik(s, pm, pc, ops):
    """``log p(y)`` of every observed entry given the past."""
    S, resid = _innovations(s, pm, pc, ops)
    log_diag, z = ops.cholesky_solve_lower(S, resid[..., None])
    return _loglik_from(s, log_diag, z[..., 0])


def _filter(s, length, ops):
    """``(loglik, fm, fc, pm, pc)``."""
    fm, fc, pm, pc = _filter_moments(s, length, ops)
    return _loglik(s, pm, pc, ops), fm, fc, pm, pc


def _block(a, n):
    """``a`` (..., k, k) as the leading block of ``diag(a, I)`` (..., n, n)."""
    k = a.shape[-1]
    if k == n:
        return a
    eye = jnp.eye(n, dtype=a.dtype)
    return eye.at[:k, :k].set(0.0) + jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, n - k), (0, n - k)])


def _joint_cholesky_solves(S, resid, pred, FP):
    """Library path of the smoother: the log-likelihood's ``(log diag L_S, L_S^{-1} r)`` and the gains'
    ``P_{t+1|t}^{-1} F_t P_{t|t}``, with both systems in one batched Cholesky and solve chain (block
    ``diag(S, I)`` and ``diag(P, I)`` of a common size; the identity blocks add log 1 = 0 and zero
    rows). Two independent LAPACK chains could run concurrently and deadlock XLA:CPU (see
    :meth:`GeneralOps.lu_solve_both <ssmjax._lgssm.small.GeneralOps.lu_solve_both>`)."""
    num_timesteps, dy = resid.shape
    dx = FP.shape[-1]
    n = max(dx, dy)
    rhs_s = jnp.zeros((num_timesteps, n, dx), resid.dtype).at[:, :dy, 0].set(resid)
    rhs_p = jnp.pad(FP, [(0, 0), (0, n - dx), (0, 0)])
    chol = jnp.linalg.cholesky(jnp.concatenate([_block(S, n), _block(pred, n)]))
    half = jsl.solve_triangular(chol, jnp.concatenate([rhs_s, rhs_p]), lower=True)
    gain_t = jsl.solve_triangular(chol[num_timesteps:], half[num_timesteps:], lower=True, trans="T")
    log_diag = jnp.log(jnp.diagonal(chol[:num_timesteps], axis1=-2, axis2=-1))
    return log_diag, half[:num_timesteps, :dy, 0], gain_t[:, :dx]


# --------------------------------------------------------------------------- smoothing


def _smoothing_combine(earlier, later, ops):
    """Compose (batched) smoothing elements: ``x_i = E_i x_j + g_i``, ``x_j = E_j x_k + g_j``."""
    _mm, _mv = ops.mm, ops.mv
    E_i, g_i, L_i = earlier
    E_j, g_j, L_j = later
    E = _mm(E_i, E_j)
    g = _mv(E_i, g_j) + g_i
    L = symmetrize(_mm(_mm(E_i, L_j), _t(E_i)) + L_i)
    return E, g, L


def _gain_system(s, fc, pc, ops):
    """The RTS gains' system ``P_{t+1|t} E_t^T = F_t P_{t|t}``: ``(P, F P)`` for t = 0..T-2, with the identity
    for ``P`` where ``t + 1 >= length`` (those gains are zeroed)."""
    dx = fc.shape[-1]
    vn = s["valid_next"][:-1]
    pred = jnp.where(vn[:, None, None], pc[1:], jnp.eye(dx, dtype=fc.dtype))
    return pred, ops.mm(s["F"][:-1], fc[:-1])


def _smooth(s, fm, fc, pm, gain_t, FP, length, ops):
    """``(sm, sc, cross)`` from the suffix scan, given ``gain_t = P_{t+1|t}^{-1} F_t P_{t|t}`` (T-1, Dx, Dx)."""
    _mm, _mv = ops.mm, ops.mv
    num_timesteps, dx = fm.shape
    vn = s["valid_next"][:-1]
    gain = jnp.where(vn[:, None, None], _t(gain_t), 0.0)
    g = fm[:-1] - _mv(gain, pm[1:])
    L = symmetrize(fc[:-1] - _mm(gain, FP))
    E = jnp.concatenate([gain, jnp.zeros((1, dx, dx), fm.dtype)])
    g = jnp.concatenate([g, fm[-1:]])
    L = jnp.concatenate([L, fc[-1:]])
    # suffix scan: reverse time by hand so the combine's argument order is explicit
    _, sm, sc = lax.associative_scan(
        lambda later, earlier: _smoothing_combine(earlier, later, ops), (E[::-1], g[::-1], L[::-1])
    )
    sm, sc = sm[::-1], symmetrize(sc[::-1])
    if length is not None:
        valid = s["valid"]
        sm = _pad_with(sm, valid, _last_real(fm, length))
        sc = _pad_with(sc, valid, _last_real(fc, length))
    cross = _mm(gain, sc[1:])  # zero where t + 1 >= length (gain is zero there)
    return sm, sc, cross


# --------------------------------------------------------------------------- jitted cores


# ``ops`` (:mod:`ssmjax._lgssm.small`): at small dimensions every factorisation and product is
# unrolled elementwise arithmetic (SmallOps, with :func:`_lu_solve_both_unrolled`), which XLA fuses;
# batched library calls on tiny matrices are what made the vmapped parallel filter slow on a GPU.
@functools.partial(jax.jit, static_argnames=("ops",))
def _filter_parallel(
    model: AbstractLGSSM,
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
    ops: type = GeneralOps,
) -> KalmanFilterResult:
    s = _steps(model, emissions, inputs, length)
    loglik, fm, fc, pm, pc = _filter(s, length, ops)
    return KalmanFilterResult(
        marginal_loglik=loglik, filtered_means=fm, filtered_covs=fc, predicted_means=pm, predicted_covs=pc
    )


@functools.partial(jax.jit, static_argnames=("ops",))
def _smoother_parallel(
    model: AbstractLGSSM,
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
    ops: type = GeneralOps,
) -> RTSSmootherResult:
    s = _steps(model, emissions, inputs, length)
    num_timesteps, dx = emissions.shape[0], s["m0"].shape[-1]
    if num_timesteps == 1:
        # Nothing to smooth. Skipping the empty (0, Dx, Dx) batch also avoids a zero-size LAPACK
        # call: with it, XLA:CPU on a 1-CPU affinity (jaxlib 0.10.2) compiled the step's other
        # Cholesky as an untyped custom call that fails at run time ("No registered implementation
        # for untyped custom call to lapack_dpotrf_ffi"); see test_single_step_on_one_cpu.
        loglik, fm, fc, pm, pc = _filter(s, length, ops)
        sm, sc, cross = fm, fc, jnp.zeros((0, dx, dx), fm.dtype)
    else:
        fm, fc, pm, pc = _filter_moments(s, length, ops)
        pred, FP = _gain_system(s, fc, pc, ops)
        if ops is GeneralOps:  # the log-likelihood's and the gains' solves as one LAPACK chain
            log_diag, z, gain_t = _joint_cholesky_solves(*_innovations(s, pm, pc, ops), pred, FP)
            loglik = _loglik_from(s, log_diag, z)
        else:
            loglik = _loglik(s, pm, pc, ops)
            chol = ops.cholesky(pred)
            gain_t = ops.solve_lower_t(chol, ops.solve_lower(chol, FP))
        sm, sc, cross = _smooth(s, fm, fc, pm, gain_t, FP, length, ops)
    return RTSSmootherResult(
        marginal_loglik=loglik, filtered_means=fm, filtered_covs=fc, predicted_means=pm, predicted_covs=pc,
        smoothed_means=sm, smoothed_covs=sc, smoothed_cross_covs=cross,
    )
