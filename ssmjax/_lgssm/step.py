r"""The Kalman step, once: every forward recursion of the covariance form is built from it.

The update at one step splits into a half that reads only the model and the observation
pattern (:func:`update_cov`: innovation covariance, its Cholesky factor, the filtered
covariance) and a half that reads the data (:func:`update_mean`: innovation, filtered mean).
The prediction splits the same way (:func:`predict_cov`, :func:`predict_mean`).

The parameters of one step are read by name from a
:class:`ssmjax._lgssm.canonical.KalmanParams` at that step (``params.at(t)``):
:func:`masked_emission`, :func:`predicted_emission` and :func:`transition` give what the
halves need, with missing entries and padding applied.

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

**For the families that come next.** A filter that linearises (an extended Kalman filter:
:math:`C_t` the Jacobian of the emission function at the predicted mean, the residual
``y - h(m)`` in place of ``y - C m``; the same for the transition) reuses these four
functions as they are; a switching model runs them once per regime inside its own scan.
Each reads only arrays and named fields, so such a model supplies its per-step
:class:`~ssmjax._lgssm.canonical.KalmanParams` and needs no copy of the recursion.
"""

from __future__ import annotations

import jax.numpy as jnp

from .canonical import LOG_2PI
from .small import symmetrize


def masked_emission(q, m, eye_y):
    """``(C, R)`` of one step with the rows (and the block of ``R``) of missing entries neutralised."""
    C = jnp.where(m[:, None], q.emission_matrix, 0.0)
    R = jnp.where(m[:, None] & m[None, :], q.emission_cov, eye_y)
    return C, R


def predicted_emission(q, C, mean, ops):
    """``C m + offset`` of one step (``C`` as from :func:`masked_emission`)."""
    pred_y = ops.mv(C, mean)
    return pred_y if q.emission_offset is None else pred_y + q.emission_offset


def transition(q, valid_next, has_length):
    """``(A, Q, offset)`` of one step; the identity, zero noise and no offset past the last real step."""
    A, Q, offset = q.transition_matrix, q.transition_cov, q.transition_offset
    if has_length:
        A = jnp.where(valid_next, A, jnp.eye(A.shape[-1], dtype=A.dtype))
        Q = jnp.where(valid_next, Q, 0.0)
        offset = None if offset is None else jnp.where(valid_next, offset, 0.0)
    return A, Q, offset


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


def update(q, pred_mean, pred_cov, y, m, eye_y, ops):
    r"""One whole update: ``(f_mean, f_cov, loglik, factors, z)`` from the predicted moments and the
    observed entries ``m`` of ``y`` (both halves, and :math:`\log p(y_t \mid y_{1:t-1})` over them)."""
    C, R = masked_emission(q, m, eye_y)
    f_cov, half_logdet, factors = update_cov(pred_cov, C, R, ops)
    f_mean, z = update_mean(pred_mean, factors, jnp.where(m, y - predicted_emission(q, C, pred_mean, ops), 0.0), ops)
    nobs = jnp.sum(m).astype(y.dtype)
    return f_mean, f_cov, -0.5 * jnp.sum(z * z) - half_logdet - 0.5 * nobs * LOG_2PI, factors, z


def predict(q, f_mean, f_cov, valid_next, has_length, ops):
    """One whole prediction: ``(p_mean, p_cov)`` of the next step from the filtered moments."""
    A, Q, offset = transition(q, valid_next, has_length)
    return predict_mean(f_mean, A, offset, ops), predict_cov(f_cov, A, Q, ops)
