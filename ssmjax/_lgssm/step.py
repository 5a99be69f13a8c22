r"""The Kalman step, once: every forward recursion of the covariance form is built from it.

The update at one step splits into a half that reads only the model and the observation
pattern (:func:`update_cov`: innovation covariance, its Cholesky factor, the filtered
covariance) and a half that reads the data (:func:`update_mean`: innovation, filtered mean).
The prediction splits the same way (:func:`predict_cov`, :func:`predict_mean`).

The split is what makes batching cheap. The full recursion (:mod:`ssmjax._lgssm.inference`)
runs both halves in one ``lax.scan``; the steady-state path (:mod:`ssmjax._lgssm.steady`)
runs the covariance half only until it settles and the mean half over every step. Under
``jax.vmap`` with a shared model and a mask that does not depend on the data (the
``"observed"`` masking of :mod:`ssmjax._lgssm.strategy`), JAX keeps the covariance half
unbatched: it runs once for the whole batch, and only the mean half runs per sequence.

With :math:`S = C P C^\top + R = L L^\top` the covariance half solves
:math:`L^{-1} [C P,\ C,\ I] = [W,\ V,\ L^{-1}]` once, so that the gain is
:math:`K = W^\top L^{-1}`, :math:`P_{t|t} = P - W^\top W`, and the mean half needs only
products: :math:`z = L^{-1} r`, :math:`m_{t|t} = m + W^\top z`. The smoother reads
:math:`W, V` and :math:`z` (see ``_smooth_standard``).
"""

from __future__ import annotations

import jax.numpy as jnp

from .small import symmetrize


def update_cov(pred_cov, C, R, ops):
    """``(f_cov, half_logdet, factors)``: the data-free half of the update.

    ``C`` and ``R`` are already masked (rows of missing entries zero, their block of ``R`` the
    identity); ``half_logdet`` is ``sum(log diag L)``; ``factors = [W, V, L^{-1}]``, (Dy, 2 Dx + Dy).
    """
    dx, dy = pred_cov.shape[-1], C.shape[-2]
    CP = ops.mm(C, pred_cov)
    S = symmetrize(ops.mm(CP, jnp.swapaxes(C, -1, -2)) + R)
    eye_y = jnp.broadcast_to(jnp.eye(dy, dtype=S.dtype), C.shape[:-2] + (dy, dy))
    log_diag, factors = ops.cholesky_solve_lower(S, jnp.concatenate([CP, C, eye_y], axis=-1))
    W = factors[..., :dx]
    f_cov = symmetrize(pred_cov - ops.mm(jnp.swapaxes(W, -1, -2), W))
    return f_cov, jnp.sum(log_diag, axis=-1), factors


def update_mean(pred_mean, factors, resid, ops):
    """``(f_mean, z)``: the data half of the update, ``z = L^{-1} r`` the whitened innovation."""
    dx = pred_mean.shape[-1]
    z = ops.mv(factors[..., 2 * dx :], resid)
    return pred_mean + ops.mv(jnp.swapaxes(factors[..., :dx], -1, -2), z), z


def predict_cov(f_cov, A, Q, ops):
    """``A P A^T + Q``."""
    return symmetrize(ops.mm(ops.mm(A, f_cov), jnp.swapaxes(A, -1, -2)) + Q)


def predict_mean(f_mean, A, offset, ops):
    """``A m + offset`` (``offset`` may be ``None``)."""
    mean = ops.mv(A, f_mean)
    return mean if offset is None else mean + offset
