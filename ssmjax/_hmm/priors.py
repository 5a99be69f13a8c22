r"""Conjugate priors for HMM parameters, and the MAP updates EM takes with them.

:class:`HMMPrior` puts Dirichlet priors on the initial distribution and on each transition
row (with a "sticky" extra concentration on the diagonal) and, through ``emissions``, a
conjugate prior on the emission parameters: :class:`DirichletPrior` (categorical and
multinomial probabilities, mixture weights), :class:`GammaPrior` (Poisson rates),
:class:`BetaPrior` (Bernoulli probabilities) or :class:`GaussianPrior` (Gaussian means and
covariances, hmmlearn's parameterisation). With a prior, :func:`ssmjax.fit_em` maximises
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
    r"""A Gamma(shape ``a``, rate ``b``) prior on positive rates (Poisson): mode :math:`(\sum w y + a - 1) / (\sum w + b)`.

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


class HMMPrior(eqx.Module):
    r"""Priors on an HMM's parameters (``fit_em(..., prior=...)``, ``fit_sgd(..., prior=...)``).

    Attributes:
        initial: Dirichlet concentration of the initial distribution (``1``: flat).
        transition: Dirichlet concentration of each transition row.
        stickiness: extra concentration on the diagonal of the transition rows (a "sticky" HMM).
        emissions: the emission family's conjugate prior (:class:`DirichletPrior`,
            :class:`GammaPrior`, :class:`BetaPrior` or :class:`GaussianPrior`), or None.

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
        emissions: DirichletPrior | GammaPrior | BetaPrior | GaussianPrior | None = None,
    ):
        self.initial = DirichletPrior(initial)
        self.transition = DirichletPrior(transition)
        self.stickiness = _non_negative("stickiness", stickiness)
        if emissions is not None and not isinstance(emissions, (DirichletPrior, GammaPrior, BetaPrior, GaussianPrior)):
            raise ValueError(
                "`emissions` must be a DirichletPrior, GammaPrior, BetaPrior or GaussianPrior (or None); "
                f"got {type(emissions).__name__}."
            )
        self.emissions = emissions

    def transition_prior(self, num_states: int) -> DirichletPrior:
        """The transition rows' Dirichlet prior, stickiness included: ``(K, K)`` concentrations."""
        concentration = jnp.broadcast_to(self.transition.concentration, (num_states, num_states))
        return DirichletPrior(concentration + self.stickiness * jnp.eye(num_states, dtype=concentration.dtype))
