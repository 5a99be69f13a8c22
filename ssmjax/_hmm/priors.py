r"""Conjugate priors for HMM parameters, and the MAP updates EM takes with them.

:class:`HMMPrior` puts Dirichlet priors on the initial distribution and on each transition
row (with a "sticky" extra concentration on the diagonal) and, through ``emissions``, a
conjugate prior on the emission parameters: :class:`DirichletPrior` (categorical and
multinomial probabilities, mixture weights), :class:`GammaPrior` (Poisson and Gamma rates),
:class:`BetaPrior` (Bernoulli probabilities), :class:`GaussianPrior` (Gaussian means and
covariances, hmmlearn's parameterisation) or :class:`GaussianMixturePrior` (a Gaussian mixture's
weights and components). With a prior, :func:`ssmjax.fit_em` maximises
the log posterior :math:`\log p(y \mid \theta) + \log p(\theta)` (each M-step is the exact
conditional mode, so EM never decreases it) and reports it; :func:`ssmjax.fit_sgd` adds the
same log prior to its objective.

The modes follow hmmlearn's conventions: a probability row is
:math:`\propto \max(n + \alpha - 1, 0)` (so a concentration below one can set an entry to zero),
and structural zeros stay zero whatever the prior.
"""

from __future__ import annotations

import typing
from typing import Optional

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from jaxtyping import Array, ArrayLike, Float, Real

from .. import _checks


def _positive(name: str, value) -> Array:
    value = _checks.as_float_array(name, value)
    xp, host = _checks.host_arrays(value)
    return _checks.check_values(value, (host <= 0) | ~xp.isfinite(host), f"`{name}` must be finite and positive.")


def _non_negative(name: str, value) -> Array:
    value = _checks.as_float_array(name, value)
    xp, host = _checks.host_arrays(value)
    return _checks.check_values(value, (host < 0) | ~xp.isfinite(host), f"`{name}` must be finite and non-negative.")


def check_broadcasts(name: str, value, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` broadcasts to ``shape``."""
    try:
        fits = np.broadcast_shapes(np.shape(value), shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"`{name}` must broadcast to {tuple(shape)}; got shape {np.shape(value)}.")


def _times_log(weight, log_value):
    """``weight * log_value`` with ``0 * log 0 = 0`` (a flat prior at a structural zero adds nothing)."""
    return jnp.where(weight == 0, 0.0, weight * log_value)


class DirichletPrior(eqx.Module):
    r"""A Dirichlet prior on each row of probabilities: ``concentration`` broadcasts against the rows (``1``: flat).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> prior = ssmjax.DirichletPrior(2.0)
        >>> prior.mode_logits(jnp.array([[3.0, 1.0]]), jnp.zeros((1, 2))).shape
        (1, 2)
    """

    concentration: Array

    @typing.no_type_check
    def __init__(self, concentration: Real[ArrayLike, "..."] = 1.0):
        self.concentration = _positive("concentration", concentration)

    def log_prob(self, log_probs: Float[Array, "*rows K"]) -> Float[Array, ""]:
        """Summed log-density of the rows ``exp(log_probs)`` (over their last axis)."""
        alpha = jnp.broadcast_to(self.concentration, log_probs.shape).astype(log_probs.dtype)
        norm = gammaln(jnp.sum(alpha, axis=-1)) - jnp.sum(gammaln(alpha), axis=-1)
        return jnp.sum(norm + jnp.sum(_times_log(alpha - 1.0, log_probs), axis=-1))

    def mode_logits(
        self,
        counts: Float[Array, "*rows K"],
        old_logits: Float[Array, "*rows K"],
    ) -> Float[Array, "*rows K"]:
        """Logits of the rows' posterior mode given expected ``counts``: ``max(counts + alpha - 1, 0)``
        normalised; structural zeros (``old_logits = -inf``) stay, and a row with nothing keeps ``old_logits``."""
        alpha = jnp.broadcast_to(self.concentration, counts.shape).astype(counts.dtype)
        pseudo = jnp.where(jnp.isneginf(old_logits), 0.0, jnp.maximum(counts + alpha - 1.0, 0.0))
        totals = pseudo.sum(-1, keepdims=True)
        empty = totals <= 0
        probs = pseudo / jnp.where(empty, 1.0, totals)
        return jnp.where(empty, old_logits, jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf))


class GammaPrior(eqx.Module):
    r"""A Gamma(shape ``a``, rate ``b``) prior on positive rates: for Poisson rates the mode is
    :math:`(\sum w y + a - 1) / (\sum w + b)`; for the rates of :class:`~ssmjax.GammaEmissions`
    (shape :math:`\alpha`) it is :math:`(a - 1 + \alpha \sum w) / (b + \sum w y)`, and there ``a >= 1``.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> float(ssmjax.GammaPrior(2.0, 1.0).mode(jnp.array(6.0), jnp.array(3.0)))
        1.75
    """

    shape: Array
    rate: Array

    @typing.no_type_check
    def __init__(self, shape: Real[ArrayLike, "..."] = 1.0, rate: Real[ArrayLike, "..."] = 0.0):
        self.shape = _positive("shape", shape)
        self.rate = _non_negative("rate", rate)

    def log_prob(self, log_rates: Float[Array, "*shape"]) -> Float[Array, ""]:
        """Summed log-density of ``exp(log_rates)`` (up to its constant when ``rate = 0``, an improper prior)."""
        a, b = self.shape.astype(log_rates.dtype), self.rate.astype(log_rates.dtype)
        norm = jnp.where(b > 0, a * jnp.log(jnp.where(b > 0, b, 1.0)) - gammaln(a), 0.0)
        density = norm + _times_log(a - 1.0, log_rates) - b * jnp.exp(log_rates)
        return jnp.sum(jnp.broadcast_to(density, log_rates.shape))

    def mode(self, weighted_sums: Float[Array, "*shape"], weights: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The posterior mode of a rate given ``sum w y`` and ``sum w`` (0 where the shape allows it)."""
        num = jnp.maximum(weighted_sums + self.shape - 1.0, 0.0)
        den = weights + self.rate
        return num / jnp.where(den > 0, den, 1.0)


class BetaPrior(eqx.Module):
    r"""A Beta(``concentration1``, ``concentration0``) prior on probabilities of a 1 (Bernoulli).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> float(ssmjax.BetaPrior(2.0, 2.0).mode(jnp.array(3.0), jnp.array(4.0)))
        0.6666666666666666
    """

    concentration1: Array
    concentration0: Array

    @typing.no_type_check
    def __init__(self, concentration1: Real[ArrayLike, "..."] = 1.0, concentration0: Real[ArrayLike, "..."] = 1.0):
        self.concentration1 = _positive("concentration1", concentration1)
        self.concentration0 = _positive("concentration0", concentration0)

    def log_prob(self, logits: Float[Array, "*shape"]) -> Float[Array, ""]:
        """Summed log-density of ``sigmoid(logits)``."""
        a, b = self.concentration1.astype(logits.dtype), self.concentration0.astype(logits.dtype)
        log_p, log_q = -jnp.logaddexp(0.0, -logits), -jnp.logaddexp(0.0, logits)
        density = gammaln(a + b) - gammaln(a) - gammaln(b) + _times_log(a - 1.0, log_p) + _times_log(b - 1.0, log_q)
        return jnp.sum(jnp.broadcast_to(density, logits.shape))

    def mode(self, weighted_ones: Float[Array, "*shape"], weights: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The posterior mode given ``sum w y`` and ``sum w`` (clipped to ``[0, 1]`` for concentrations below one)."""
        ones = jnp.maximum(weighted_ones + self.concentration1 - 1.0, 0.0)
        zeros = jnp.maximum(weights - weighted_ones + self.concentration0 - 1.0, 0.0)
        total = ones + zeros
        return ones / jnp.where(total > 0, total, 1.0)


class GaussianPrior(eqx.Module):
    r"""hmmlearn's prior on Gaussian means and covariances (``means_prior``, ``means_weight``,
    ``covars_prior``, ``covars_weight``), for every covariance type.

    The M-step is hmmlearn's MAP update: means :math:`(\lambda \mu_0 + \sum w y) / (\lambda + \sum w)`,
    covariances :math:`(\Psi + S + \lambda (\mu - \mu_0)(\mu - \mu_0)^\top) / (a + \sum w)` with
    :math:`S` the weighted scatter about the new means and :math:`a = \max(\nu - D, 0)` (full, tied)
    or :math:`\max(\nu - 1, 0)` per dimension (diagonal, spherical), :math:`\nu` = ``covars_weight``.
    It is the exact maximiser of the expected log-likelihood plus the (unnormalised) log prior
    :math:`-\frac a2 \log|\Sigma| - \frac12 \mathrm{tr}(\Sigma^{-1}\Psi) - \frac\lambda2 (\mu - \mu_0)^\top
    \Sigma^{-1} (\mu - \mu_0)` (a normal-inverse-Wishart density up to its constant), which
    :meth:`~ssmjax.AbstractGaussianEmissions.log_prior` evaluates. The defaults are flat.

    Args:
        means_prior: :math:`\mu_0`, broadcast to ``(K, D)``.
        means_weight: :math:`\lambda \ge 0`, broadcast to ``(K,)``.
        covars_prior: :math:`\Psi`: ``(K, D)`` (or broadcastable) for diagonal and spherical,
            ``(K, D, D)`` for full, ``(D, D)`` for tied.
        covars_weight: :math:`\nu \ge 0`.

    Example:
        >>> import ssmjax
        >>> prior = ssmjax.HMMPrior(emissions=ssmjax.GaussianPrior(means_weight=1.0, covars_prior=0.1, covars_weight=3.0))
        >>> float(prior.emissions.covars_weight)
        3.0
    """

    means_prior: Array
    means_weight: Array
    covars_prior: Array
    covars_weight: Array

    @typing.no_type_check
    def __init__(
        self,
        means_prior: Real[ArrayLike, "..."] = 0.0,
        means_weight: Real[ArrayLike, "..."] = 0.0,
        covars_prior: Real[ArrayLike, "..."] = 0.0,
        covars_weight: Real[ArrayLike, "..."] = 0.0,
    ):
        self.means_prior = _checks.as_float_array("means_prior", means_prior)
        self.means_weight = _non_negative("means_weight", means_weight)
        self.covars_prior = _checks.as_float_array("covars_prior", covars_prior)
        self.covars_weight = _non_negative("covars_weight", covars_weight)


class GaussianMixturePrior(eqx.Module):
    r"""A prior on :class:`~ssmjax.GaussianMixtureEmissions`: a Dirichlet prior on each state's
    mixture weights and a :class:`GaussianPrior` on the ``K * M`` components (component ``m`` of
    state ``k`` is the components' state ``k * M + m``, so arrays broadcast to ``(K * M, ...)``).

    EM takes the exact posterior mode of the weights (:meth:`DirichletPrior.mode_logits`) and of the
    components given the E-step weights (:class:`GaussianPrior`'s update), so it never decreases the
    log posterior. To port an ``hmmlearn.hmm.GMMHMM`` prior, use :meth:`from_hmmlearn`.

    Args:
        weights: the mixture weights' prior (concentration broadcast to ``(K, M)``), or None (flat).
        components: the components' prior, or None (flat).

    Example:
        >>> import ssmjax
        >>> prior = ssmjax.GaussianMixturePrior(ssmjax.DirichletPrior(2.0), ssmjax.GaussianPrior(covars_prior=0.1, covars_weight=3.0))
        >>> hmm_prior = ssmjax.HMMPrior(emissions=prior)
        >>> float(hmm_prior.emissions.weights.concentration)
        2.0
    """

    weights: DirichletPrior
    components: Optional[GaussianPrior]

    @typing.no_type_check
    def __init__(self, weights: DirichletPrior | None = None, components: GaussianPrior | None = None):
        if weights is None:
            weights = DirichletPrior(1.0)
        if not isinstance(weights, DirichletPrior):
            raise ValueError(f"`weights` must be a DirichletPrior (or None); got {type(weights).__name__}.")
        if components is not None and not isinstance(components, GaussianPrior):
            raise ValueError(f"`components` must be a GaussianPrior (or None); got {type(components).__name__}.")
        self.weights, self.components = weights, components

    @classmethod
    @typing.no_type_check
    def from_hmmlearn(
        cls,
        covariance_type: str,
        num_features: int,
        weights_prior: Real[ArrayLike, "..."] = 1.0,
        means_prior: Real[ArrayLike, "..."] = 0.0,
        means_weight: Real[ArrayLike, "..."] = 0.0,
        covars_prior: Real[ArrayLike, "..."] | None = None,
        covars_weight: Real[ArrayLike, "..."] | None = None,
    ) -> "GaussianMixturePrior":
        r"""The prior whose MAP update is ``hmmlearn.hmm.GMMHMM``'s with these arguments (same names,
        same defaults, ``(K, M, ...)`` arrays), for the covariance types ``"diag"``, ``"spherical"``
        and ``"full"``.

        GMMHMM reads its covariance arguments per type: an inverse-gamma shape :math:`\alpha`
        (``covars_prior``) and scale :math:`\beta` (``covars_weight``) per variance for "diag" and
        "spherical", an inverse-Wishart scale :math:`\Psi` and degrees of freedom :math:`\nu` for
        "full", each times the normal prior on the mean. They map onto :class:`GaussianPrior`'s
        :math:`(\Psi', \nu')` as: diag :math:`\Psi' = 2\beta`, :math:`\nu' = 2\alpha + 4`;
        spherical :math:`\Psi' = 2\beta / D` per dimension, :math:`\nu' = 2 + (2\alpha + 2) / D`;
        full :math:`\Psi' = \Psi^\top`, :math:`\nu' = \nu + 2D + 2`. (GMMHMM's covariance update is
        not exactly its MAP one when the means also move: it takes the scatter about the previous
        means; ssmjax takes it about the new means, the exact mode. And GMMHMM does not clip
        ``weights_prior`` below one: its weights can turn negative where ssmjax's are zero.)

        Args:
            covariance_type: ``"diag"``, ``"spherical"`` or ``"full"`` (GMMHMM's "tied" shares one
                covariance per state, a model ssmjax does not have; pass a :class:`GaussianPrior` for
                :class:`~ssmjax.TiedGaussianEmissions` components, whose one covariance every
                component of every state shares).
            num_features: ``D``.
            weights_prior, means_prior, means_weight, covars_prior, covars_weight: as in GMMHMM
                (None: GMMHMM's default for the covariance type).

        Returns:
            The equivalent :class:`GaussianMixturePrior`.

        Raises:
            ValueError: for "tied" or another type, a "spherical" prior without ``covars_prior``, or a
                prior whose covariance pseudo-count is negative.

        Example:
            >>> import ssmjax
            >>> prior = ssmjax.GaussianMixturePrior.from_hmmlearn("diag", 2, covars_prior=1.0, covars_weight=0.5)
            >>> float(prior.components.covars_weight), float(prior.components.covars_prior)
            (6.0, 1.0)
        """
        d = int(num_features)
        if covariance_type not in ("diag", "spherical", "full"):
            raise ValueError(
                f"`covariance_type` must be 'diag', 'spherical' or 'full'; got {covariance_type!r} (GMMHMM's 'tied' "
                "shares one covariance per state, which ssmjax's mixtures do not: build a GaussianPrior directly)."
            )
        weights_prior, means_prior, means_weight = (
            np.asarray(weights_prior, float), np.asarray(means_prior, float), np.asarray(means_weight, float)
        )
        means_prior = means_prior.reshape(-1, d) if means_prior.ndim == 3 else means_prior
        means_weight = means_weight.reshape(-1) if means_weight.ndim == 2 else means_weight
        if covariance_type == "full":
            psi = np.asarray(0.0 if covars_prior is None else covars_prior, float)
            nu = np.asarray(-(d + 2.0) if covars_weight is None else covars_weight, float)
            if nu.ndim:
                raise ValueError(f"`covars_weight` must be one number for 'full'; got shape {nu.shape}.")
            if psi.ndim >= 2:  # GMMHMM adds the transpose of its scale
                psi = np.swapaxes(psi, -1, -2)
            psi = psi.reshape(-1, d, d) if psi.ndim == 4 else psi
            pseudo, new_weight = nu + d + 2.0, nu + 2.0 * d + 2.0
        else:
            default_alpha = -1.5 if covariance_type == "diag" else None
            alpha = np.asarray(covars_prior if covars_prior is not None else default_alpha, float)
            beta = np.asarray(0.0 if covars_weight is None else covars_weight, float)
            if covariance_type == "diag":
                shape = lambda x: x.reshape(-1, d) if x.ndim == 3 else x  # noqa: E731
                alpha, beta = shape(alpha), shape(beta)
                psi, pseudo, new_weight = 2.0 * beta, 2.0 * alpha + 3.0, 2.0 * alpha + 4.0
            else:
                if covars_prior is None:  # GMMHMM's default, -(M + 2) / 2, depends on M
                    raise ValueError("`covars_prior` must be given for 'spherical' (GMMHMM's default depends on M).")
                shape = lambda x: x.reshape(-1, 1) if x.ndim == 2 else x  # noqa: E731
                alpha, beta = shape(alpha), shape(beta)
                psi, pseudo, new_weight = 2.0 * beta / d, d + 2.0 * alpha + 2.0, 2.0 + (2.0 * alpha + 2.0) / d
        if np.any(pseudo < 0):
            raise ValueError(
                "`covars_prior`/`covars_weight` give a negative covariance pseudo-count, which has no "
                "GaussianPrior equivalent (and no posterior mode)."
            )
        components = GaussianPrior(means_prior, means_weight, psi, new_weight)
        return cls(DirichletPrior(weights_prior), components)


class HMMPrior(eqx.Module):
    r"""Priors on an HMM's parameters (``fit_em(..., prior=...)``, ``fit_sgd(..., prior=...)``).

    Attributes:
        initial: Dirichlet concentration of the initial distribution (``1``: flat).
        transition: Dirichlet concentration of each transition row.
        stickiness: extra concentration on the diagonal of the transition rows (a "sticky" HMM).
        emissions: the emission family's conjugate prior (:class:`DirichletPrior`,
            :class:`GammaPrior`, :class:`BetaPrior`, :class:`GaussianPrior` or
            :class:`GaussianMixturePrior`), or None.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> prior = ssmjax.HMMPrior(transition=1.0, stickiness=10.0, emissions=ssmjax.GammaPrior(2.0, 0.5))
        >>> prior.transition_prior(3).concentration.shape
        (3, 3)
    """

    initial: DirichletPrior
    transition: DirichletPrior
    stickiness: Array
    emissions: Optional[eqx.Module]

    @typing.no_type_check
    def __init__(
        self,
        initial: Real[ArrayLike, "..."] = 1.0,
        transition: Real[ArrayLike, "..."] = 1.0,
        stickiness: Real[ArrayLike, "..."] = 0.0,
        emissions: DirichletPrior | GammaPrior | BetaPrior | GaussianPrior | GaussianMixturePrior | None = None,
    ):
        self.initial = DirichletPrior(initial)
        self.transition = DirichletPrior(transition)
        self.stickiness = _non_negative("stickiness", stickiness)
        kinds = (DirichletPrior, GammaPrior, BetaPrior, GaussianPrior, GaussianMixturePrior)
        if emissions is not None and not isinstance(emissions, kinds):
            raise ValueError(
                "`emissions` must be a DirichletPrior, GammaPrior, BetaPrior, GaussianPrior or GaussianMixturePrior "
                f"(or None); got {type(emissions).__name__}."
            )
        self.emissions = emissions

    def transition_prior(self, num_states: int) -> DirichletPrior:
        """The transition rows' Dirichlet prior, stickiness included: ``(K, K)`` concentrations."""
        concentration = jnp.broadcast_to(self.transition.concentration, (num_states, num_states))
        return DirichletPrior(concentration + self.stickiness * jnp.eye(num_states, dtype=concentration.dtype))
