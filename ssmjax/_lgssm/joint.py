r"""Densities of whole paths under an LGSSM: the log joint and the posterior entropy.

These are the two pieces a variational objective needs when an LGSSM sits inside a
larger model (the Kalman VAE, :mod:`ssmjax.examples.kvae`): with :math:`q(x \mid y)` the
exact smoothing posterior and :math:`\tilde x \sim q` a reparameterised draw
(:func:`ssmjax.lgssm_sample_posterior`),

.. math::

    \log p(y_{1:T}) = \mathbb E_q[\log p(y_{1:T}, x_{1:T})] + \mathbb H[q]
    \approx \log p(y_{1:T}, \tilde x_{1:T}) + \mathbb H[q],

an unbiased single-sample estimate whose expectation is the Kalman filter's
``marginal_loglik``. Model, time convention, missing data and padding: see
:mod:`ssmjax._lgssm.model`.
"""

from __future__ import annotations

import typing
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from .._checks import as_float_array, check_length, check_psd, check_shape
from .canonical import LOG_2PI as _LOG_2PI
from .canonical import _canonical
from .results import RTSSmootherResult
from .validate import _validate
from .params import AbstractLGSSM, model_dims
from .small import choose_ops, matmul_precision


__all__ = ["lgssm_log_joint", "lgssm_posterior_entropy"]


def _gaussian_terms(
    resid: Float[Array, "N D"], cov: Float[Array, "N D D"]
) -> tuple[Float[Array, " N"], Float[Array, " N"]]:
    """``(|L^{-1} r|^2, log det L)`` per row, with ``L L^T = cov`` (positive definite).

    Callers stack all their densities into this one call. Up to size 8 it is unrolled arithmetic
    (no library call: the Kalman VAE's objective over thousands of vmapped draws), above that
    ``GeneralOps``, whose stacks never make a batched LAPACK call (see :mod:`ssmjax._linalg`).
    """
    d = cov.shape[-1]
    log_diag, white = choose_ops(d, d).cholesky_solve_lower(cov, resid[..., None])
    return jnp.sum(white[..., 0] ** 2, axis=-1), jnp.sum(log_diag, axis=-1)


def _padded(resid: Float[Array, "N d"], cov: Float[Array, "N d d"], size: int):
    """Embed d-dimensional densities in ``size`` dimensions (zero residual, unit variance there),
    which leaves the whitened norm and the log-determinant unchanged."""
    extra = size - resid.shape[-1]
    if extra == 0:
        return resid, cov
    num = resid.shape[0]
    resid = jnp.concatenate([resid, jnp.zeros((num, extra), resid.dtype)], axis=-1)
    cov = jnp.concatenate(
        [
            jnp.concatenate([cov, jnp.zeros((num, cov.shape[-1], extra), cov.dtype)], axis=-1),
            jnp.concatenate(
                [
                    jnp.zeros((num, extra, cov.shape[-1]), cov.dtype),
                    jnp.broadcast_to(jnp.eye(extra, dtype=cov.dtype), (num, extra, extra)),
                ],
                axis=-1,
            ),
        ],
        axis=-2,
    )
    return resid, cov


def _per_step(a, static_ndim: int, num: int):
    """Broadcast a shared parameter to ``num`` entries (time-varying ones already have them)."""
    if a.ndim == static_ndim + 1:
        return a[:num]
    return jnp.broadcast_to(a, (num,) + a.shape)


def _log_joint_impl(
    model: AbstractLGSSM,
    states: Float[Array, "T Dx"],
    emissions: Float[Array, "T Dy"],
    inputs: Optional[Float[Array, "T Du"]],
    length: Optional[Int[Array, ""]],
) -> Float[Array, ""]:
    params, ys, mask, valid_next = _canonical(model, emissions, inputs, length)
    num_timesteps, dx = states.shape
    dtype = ys.dtype
    steps = jnp.arange(num_timesteps)
    valid = steps < (num_timesteps if length is None else length)
    # padded states may hold anything: replace them before any arithmetic
    x = jnp.where(valid[:, None], jnp.asarray(states, dtype), 0.0)
    mm = lambda a, v: jnp.matmul(a, v[..., None], precision=matmul_precision())[..., 0]  # noqa: E731

    # x_1 ~ N(m0, P0)
    resids = [(x[0] - params.initial_mean)[None]]
    covs = [params.initial_cov[None]]

    # x_{t+1} | x_t ~ N(A_t x_t + f_t, Q_t) for real transitions
    if num_timesteps > 1:
        vn: Bool[Array, " T-1"] = valid_next[: num_timesteps - 1]
        A = _per_step(params.transition_matrix, 2, num_timesteps - 1)
        Q = _per_step(params.transition_cov, 2, num_timesteps - 1)
        Q = jnp.where(vn[:, None, None], Q, jnp.eye(dx, dtype=dtype))
        mean = mm(A, x[:-1])
        if params.transition_offset is not None:
            mean = mean + _per_step(params.transition_offset, 1, num_timesteps - 1)
        resids.append(jnp.where(vn[:, None], x[1:] - mean, 0.0))
        covs.append(Q)
        counted = jnp.concatenate([jnp.ones((1,), bool), vn])
    else:
        counted = jnp.ones((1,), bool)

    # y_t | x_t ~ N(C_t x_t + e_t, R_t) on the observed entries of real steps; each unobserved
    # entry is a unit-variance dummy with zero residual and no normalising constant
    dy = ys.shape[-1]
    C = _per_step(params.emission_matrix, 2, num_timesteps)
    R = _per_step(params.emission_cov, 2, num_timesteps)
    mean_y = mm(C, x)
    if params.emission_offset is not None:
        mean_y = mean_y + _per_step(params.emission_offset, 1, num_timesteps)
    resid_y = jnp.where(mask, ys - mean_y, 0.0)
    R = jnp.where(mask[:, :, None] & mask[:, None, :], R, jnp.eye(dy, dtype=dtype))

    size = max(dx, dy)
    state_part = _padded(jnp.concatenate(resids), jnp.concatenate(covs), size)
    emission_part = _padded(resid_y, R, size)
    quad, half_logdet = _gaussian_terms(
        jnp.concatenate([state_part[0], emission_part[0]]), jnp.concatenate([state_part[1], emission_part[1]])
    )
    logpdf = -0.5 * quad - half_logdet
    total = jnp.sum(jnp.where(counted, logpdf[:num_timesteps] - 0.5 * dx * _LOG_2PI, 0.0))
    observed = jnp.sum(mask, axis=-1).astype(dtype)
    total = total + jnp.sum(logpdf[num_timesteps:] - 0.5 * observed * _LOG_2PI)
    return total


_log_joint_jit = jax.jit(_log_joint_impl)


@typing.no_type_check
def lgssm_log_joint(
    model: AbstractLGSSM,
    states: Float[ArrayLike, "T Dx"],
    emissions: Float[ArrayLike, "T Dy"],
    *,
    inputs: Float[ArrayLike, "T Du"] | None = None,
    length: Int[ArrayLike, ""] | None = None,
) -> Float[Array, ""]:
    r"""Log joint density :math:`\log p(y_{1:T}, x_{1:T} \mid u_{1:T})` of a state path and the emissions.

    .. math::

        \log \mathcal N(x_1; \mu_0, \Sigma_0)
        + \sum_{t=1}^{T-1} \log \mathcal N(x_{t+1}; A_t x_t + B_t u_{t+1} + b_t, Q_t)
        + \sum_{t=1}^{T} \log \mathcal N(y_t; C_t x_t + D_t u_t + d_t, R_t),

    where a step with missing (NaN) emission entries contributes the density of its
    observed entries only, and steps ``t >= length`` (states, emissions, inputs and
    time-varying parameters there may hold anything) contribute nothing. Differentiable
    in the model, the states and the emissions; with ``states`` drawn by
    :func:`ssmjax.lgssm_sample_posterior` it is the reconstruction-plus-prior term of a
    variational objective (see :mod:`ssmjax._lgssm.joint`).

    ``transition_cov`` must be positive *definite* here (a density of the path does not
    exist for exactly deterministic components); this is value-checked like the other
    covariances. Conventions: :mod:`ssmjax._lgssm.model`.

    Args:
        model: an :class:`ssmjax.LGSSM` (parameters may be time-varying).
        states: (T, Dx) state path :math:`x_{1:T}`.
        emissions: (T, Dy), NaN marks missing entries.
        inputs: (T, Du) or None, as in :func:`ssmjax.kalman_filter`.
        length: number of real steps (int, may be traced) or None for all T.

    Returns:
        A scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> import ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1),
        ...     transition_matrix=jnp.eye(1), transition_cov=jnp.eye(1),
        ...     emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
        >>> round(float(ssmjax.lgssm_log_joint(model, jnp.zeros((1, 1)), jnp.zeros((1, 1)))), 6)  # 2 log N(0; 0, 1)
        -1.837877
    """
    model, y, u, length_arr = _validate(model, emissions, inputs, length)
    dx, _, _ = model_dims(model)
    x = as_float_array("states", states)
    check_shape("states", x, (y.shape[0], dx), f"T = {y.shape[0]} from emissions, Dx = {dx} from initial_mean")
    valid_next = None
    if length_arr is not None:
        valid_next = jnp.arange(y.shape[0] - 1) + 1 < length_arr
    transition_cov = check_psd("transition_cov", model.transition_cov, valid=valid_next, semidefinite=False)
    model = eqx.tree_at(lambda m: m.transition_cov, model, transition_cov)
    return _log_joint_jit(model, x, y, u, length_arr)


# --------------------------------------------------------------------------- posterior entropy


def _entropy_impl(
    smoothed_covs: Float[Array, "T Dx Dx"],
    smoothed_cross_covs: Float[Array, "T-1 Dx Dx"],
    length: Optional[Int[Array, ""]],
) -> Float[Array, ""]:
    num_timesteps, dx = smoothed_covs.shape[:2]
    dtype = smoothed_covs.dtype
    last = num_timesteps - 1 if length is None else length - 1
    # H = H(x_L) + sum_{t < L} H(x_t | x_{t+1}) for the Markov posterior; the conditional
    # covariance is the Schur complement S_t - X_t S_{t+1}^{-1} X_t^T, taken from the
    # Cholesky factor of the joint covariance of the pair (x_{t+1}, x_t).
    # The last state's covariance rides in the same stack of Cholesky factors as the pairs
    # (embedded with a unit block below it), one factorisation as in _gaussian_terms; its
    # log-diagonal sums to log det S_L / 2.
    s_last = smoothed_covs[last]
    mats = _padded(jnp.zeros((1, dx), dtype), (0.5 * (s_last + s_last.T))[None], 2 * dx)[1]
    if num_timesteps > 1:
        s_next = smoothed_covs[1:]
        cross = smoothed_cross_covs  # Cov(x_t, x_{t+1})
        pair = jnp.concatenate(
            [
                jnp.concatenate([s_next, jnp.swapaxes(cross, -1, -2)], axis=-1),
                jnp.concatenate([cross, smoothed_covs[:-1]], axis=-1),
            ],
            axis=-2,
        )
        real = jnp.arange(num_timesteps - 1) < last
        pair = jnp.where(real[:, None, None], pair, jnp.eye(2 * dx, dtype=dtype))
        mats = jnp.concatenate([0.5 * (pair + jnp.swapaxes(pair, -1, -2)), mats])
        num_terms = last.astype(dtype) if length is not None else jnp.asarray(num_timesteps - 1, dtype)
    else:
        real = jnp.zeros((0,), bool)
        num_terms = jnp.zeros((), dtype)
    chol = choose_ops(2 * dx, 2 * dx).cholesky(mats)
    log_diag = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1))
    # log det of a conditional block = 2 * sum log diag of the lower-right Cholesky block
    joint_logdet = 2.0 * jnp.sum(jnp.where(real, jnp.sum(log_diag[:-1, dx:], axis=-1), 0.0))
    last_logdet = 2.0 * jnp.sum(log_diag[-1])
    return 0.5 * (joint_logdet + last_logdet) + 0.5 * dx * (num_terms + 1.0) * (1.0 + _LOG_2PI)


_entropy_jit = jax.jit(_entropy_impl)


@typing.no_type_check
def lgssm_posterior_entropy(
    posterior: RTSSmootherResult, *, length: Int[ArrayLike, ""] | None = None
) -> Float[Array, ""]:
    r"""Entropy :math:`\mathbb H[p(x_{1:T} \mid y_{1:T})]` of the joint smoothing posterior.

    The posterior is Gaussian and Markov, so its entropy is that of the last state plus
    the conditional entropies of :math:`x_t \mid x_{t+1}`:

    .. math::

        \mathbb H = \tfrac12 \log\det(2\pi e\, S_T)
        + \sum_{t=1}^{T-1} \tfrac12 \log\det\big(2\pi e\,(S_t - X_t S_{t+1}^{-1} X_t^\top)\big),

    with :math:`S_t` = ``smoothed_covs[t]`` and :math:`X_t` = ``smoothed_cross_covs[t]``.
    Together with :func:`lgssm_log_joint` at a posterior draw it gives an unbiased
    estimate of :math:`\log p(y_{1:T})` (see :mod:`ssmjax._lgssm.joint`).
    Differentiable. The posterior covariances must be positive definite (true when
    ``initial_cov`` and ``transition_cov`` are); a singular one gives ``-inf`` or NaN.

    Args:
        posterior: the :class:`ssmjax.RTSSmootherResult` of :func:`ssmjax.rts_smoother`.
        length: the ``length`` the smoother was run with (steps ``t >= length`` are
            ignored), or None.

    Returns:
        A scalar (nats).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1),
        ...                      transition_matrix=jnp.zeros((1, 1)), transition_cov=jnp.eye(1),
        ...                      emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))
        >>> post = ssmjax.rts_smoother(model, jnp.zeros((3, 1)))
        >>> h = ssmjax.lgssm_posterior_entropy(post)  # independent steps, each N(., 1/2)
        >>> bool(jnp.isclose(h, 3 * 0.5 * jnp.log(2 * jnp.pi * jnp.e * 0.5)))
        True
    """
    if not isinstance(posterior, RTSSmootherResult):
        raise ValueError(
            "`posterior` must be the ssmjax.RTSSmootherResult returned by ssmjax.rts_smoother; "
            f"got {type(posterior).__name__}."
        )
    covs = as_float_array("posterior.smoothed_covs", posterior.smoothed_covs)
    if covs.ndim != 3 or covs.shape[-1] != covs.shape[-2]:
        check_shape("posterior.smoothed_covs", covs, ("T", "Dx", "Dx"), "use jax.vmap for a batch")
    num_timesteps, dx = covs.shape[:2]
    cross = as_float_array("posterior.smoothed_cross_covs", posterior.smoothed_cross_covs)
    check_shape("posterior.smoothed_cross_covs", cross, (num_timesteps - 1, dx, dx), "T-1, Dx, Dx")
    length_arr = check_length(length, num_timesteps)
    return _entropy_jit(covs, cross, length_arr)
