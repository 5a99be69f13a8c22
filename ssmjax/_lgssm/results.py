"""Result types of the LGSSM inference functions (a leaf module: fields only)."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float

class KalmanFilterResult(eqx.Module):
    r"""Output of :func:`ssmjax.kalman_filter`.

    Attributes:
        marginal_loglik: :math:`\log p(y_{1:T})` (observed entries, real steps only).
        filtered_means: :math:`E[x_t \mid y_{1:t}]`, shape (T, Dx).
        filtered_covs: :math:`\mathrm{Cov}[x_t \mid y_{1:t}]`, shape (T, Dx, Dx).
        predicted_means: :math:`E[x_t \mid y_{1:t-1}]` (``predicted_means[0]`` is the
            initial mean), shape (T, Dx).
        predicted_covs: :math:`\mathrm{Cov}[x_t \mid y_{1:t-1}]`, shape (T, Dx, Dx).

    At padded steps (``t >= length``) every field repeats the filtered moments of
    step ``length - 1``.
    """

    marginal_loglik: Float[Array, ""]
    filtered_means: Float[Array, "T Dx"]
    filtered_covs: Float[Array, "T Dx Dx"]
    predicted_means: Float[Array, "T Dx"]
    predicted_covs: Float[Array, "T Dx Dx"]


class RTSSmootherResult(eqx.Module):
    r"""Output of :func:`ssmjax.rts_smoother`: the filter's fields plus smoothed ones.

    Attributes:
        marginal_loglik: :math:`\log p(y_{1:T})`.
        filtered_means, filtered_covs, predicted_means, predicted_covs: as in
            :class:`KalmanFilterResult`.
        smoothed_means: :math:`E[x_t \mid y_{1:T}]`, shape (T, Dx).
        smoothed_covs: :math:`\mathrm{Cov}[x_t \mid y_{1:T}]`, shape (T, Dx, Dx).
        smoothed_cross_covs: :math:`\mathrm{Cov}[x_t, x_{t+1} \mid y_{1:T}]`, shape
            (T-1, Dx, Dx); entry ``t`` pairs step ``t`` (rows) with ``t+1`` (columns).

    At padded steps smoothed moments repeat those of step ``length - 1`` and
    cross-covariances of pairs with ``t + 1 >= length`` are zero.
    """

    marginal_loglik: Float[Array, ""]
    filtered_means: Float[Array, "T Dx"]
    filtered_covs: Float[Array, "T Dx Dx"]
    predicted_means: Float[Array, "T Dx"]
    predicted_covs: Float[Array, "T Dx Dx"]
    smoothed_means: Float[Array, "T Dx"]
    smoothed_covs: Float[Array, "T Dx Dx"]
    smoothed_cross_covs: Float[Array, "T-1 Dx Dx"]


class LGSSMForecastResult(eqx.Module):
    r"""Output of :func:`ssmjax.lgssm_forecast`: predictive moments ``H = num_steps`` ahead.

    With ``L = length`` (or ``T``), entry ``h`` describes step ``L + h`` given the
    observed :math:`y_{1:L}` (0-based: ``emissions[:L]``).

    Attributes:
        state_means: :math:`E[x_{L+h} \mid y]`, shape (H, Dx).
        state_covs: :math:`\mathrm{Cov}[x_{L+h} \mid y]`, shape (H, Dx, Dx).
        emission_means: :math:`E[y_{L+h} \mid y]`, shape (H, Dy).
        emission_covs: :math:`\mathrm{Cov}[y_{L+h} \mid y]`, shape (H, Dy, Dy).
    """

    state_means: Float[Array, "H Dx"]
    state_covs: Float[Array, "H Dx Dx"]
    emission_means: Float[Array, "H Dy"]
    emission_covs: Float[Array, "H Dy Dy"]
