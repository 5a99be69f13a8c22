r"""Exact diffuse initialisation: a flat prior on some components of the initial state.

An :class:`ssmjax.LGSSM` built with ``diffuse=`` has :math:`x_1 = \mu_0 + J\delta + \eta`, with
:math:`\delta` (the components marked diffuse, selected by :math:`J`) under a flat prior and
:math:`\eta \sim \mathcal N(0, P_*)`, :math:`P_*` the ``initial_cov`` with the diffuse rows and
columns set to zero (their ``initial_mean`` and ``initial_cov`` entries are not used).

**Likelihood.** Given :math:`\delta`, the model is proper, and its log-likelihood
:math:`\ell(\delta)` is what the Kalman filter computes with the initial mean's diffuse
components set to :math:`\delta` and covariance :math:`P_*`. The innovations are affine in
:math:`\delta`, so :math:`\ell` is exactly quadratic, with Hessian :math:`-S` (de Jong 1991). The
diffuse log-likelihood of Koopman and Durbin (2000), the one statsmodels reports, is the limit
of :math:`\log p_\kappa(y) + \tfrac d2 \log \kappa` for the prior :math:`N(0, \kappa I)` on
:math:`\delta`, :math:`\kappa \to \infty`:

.. math::

    \log L_d = \max_\delta \ell(\delta) - \tfrac12 \log |S|.

Here the maximiser is one Newton step from :math:`\mu_0` (exact for a quadratic), taken by
forward-mode derivatives of the same filter: no second copy of the recursion, no large
:math:`\kappa`. The data must identify :math:`\delta` (:math:`S` positive definite).

**Posterior.** Given :math:`\delta` the smoothed means are affine in it, :math:`m_t(\delta)`, with
covariances that do not depend on it, and :math:`\delta \mid y \sim N(\hat\delta, S^{-1})`. So the
smoothed means are :math:`m_t(\hat\delta)`, the smoothed covariances
:math:`P_{t|T} + M_t S^{-1} M_t^\top` and the cross-covariances
:math:`P_{t,t+1|T} + M_t S^{-1} M_{t+1}^\top` with :math:`M_t = \partial m_t / \partial \delta`.
The filtered and predicted fields of that result are those given :math:`\delta = \hat\delta`.

This module takes the filter and smoother as functions of the model (the inference module
passes its own), so it sits below :mod:`ssmjax._lgssm.inference` in the layering.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .results import RTSSmootherResult


def canonical(diffuse, state_dim: int) -> tuple:
    """The stored form of ``diffuse``: ``()`` (a proper prior) or a tuple of ``state_dim`` bools."""
    if diffuse is None or diffuse is False:
        return ()
    if diffuse is True:
        return (True,) * state_dim
    mask = np.asarray(diffuse)
    if mask.dtype != bool or mask.shape != (state_dim,):
        raise ValueError(
            f"`diffuse` must be True, False or a boolean mask of shape ({state_dim},) (Dx) over the state "
            f"components; got {mask.dtype} of shape {mask.shape}."
        )
    return tuple(bool(b) for b in mask) if mask.any() else ()


def _at(model, indices, delta):
    """The proper model given ``delta``: diffuse mean components set, their covariance rows zero."""
    keep = np.ones(model.state_dim, bool)
    keep[indices] = False
    proper = jnp.asarray(np.outer(keep, keep), model.initial_cov.dtype)
    return eqx.tree_at(
        lambda m: (m.initial_mean, m.initial_cov),
        model,
        (model.initial_mean.at[indices].set(delta), model.initial_cov * proper),
    )


def _identified(precision):
    chol = jnp.linalg.cholesky(precision)
    return _checks.check_values(
        chol, ~jnp.isfinite(chol),
        "the data do not identify the diffuse components of the initial state (the information "
        "matrix S is not positive definite): observe more steps, or give them a proper prior.",
    )


def _newton(loglik_at: Callable, start):
    """``(delta_hat, loglik(delta_hat), chol(S))`` of the quadratic ``loglik_at``."""
    grad = jax.jacfwd(loglik_at)
    chol = _identified(-jax.jacfwd(grad)(start))
    delta = start + jax.scipy.linalg.cho_solve((chol, True), grad(start))
    return delta, loglik_at(delta), chol


def loglik(run_loglik: Callable, model):
    """The diffuse log-likelihood; ``run_loglik(model)`` is the filter's for a proper model."""
    indices = np.flatnonzero(model.diffuse)
    loglik_at = lambda delta: run_loglik(_at(model, indices, delta))  # noqa: E731
    _, value, chol = _newton(loglik_at, model.initial_mean[indices])
    return value - jnp.sum(jnp.log(jnp.diagonal(chol)))


def smoother(run_smoother: Callable, model, length=None) -> RTSSmootherResult:
    """The diffuse posterior; ``run_smoother(model)`` is the RTS smoother for a proper model."""
    indices = np.flatnonzero(model.diffuse)
    post_at = lambda delta: run_smoother(_at(model, indices, delta))  # noqa: E731
    delta, value, chol = _newton(lambda d: post_at(d).marginal_loglik, model.initial_mean[indices])
    post = post_at(delta)
    gain = jax.jacfwd(lambda d: post_at(d).smoothed_means)(delta)  # (T, Dx, d): M_t
    root = jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(gain, -1, -2), lower=True)  # L^{-1} M_t^T
    extra = jnp.einsum("tki,tkj->tij", root, root)  # M_t S^{-1} M_t^T
    extra_cross = jnp.einsum("tki,tkj->tij", root[:-1], root[1:])
    if length is not None:  # pairs that reach into the padding keep their zero cross-covariance
        extra_cross = jnp.where((jnp.arange(1, gain.shape[0]) < length)[:, None, None], extra_cross, 0.0)
    return eqx.tree_at(
        lambda p: (p.marginal_loglik, p.smoothed_covs, p.smoothed_cross_covs),
        post,
        (value - jnp.sum(jnp.log(jnp.diagonal(chol))), post.smoothed_covs + extra,
         post.smoothed_cross_covs + extra_cross),
    )
