r"""Bernoulli emissions: a vector of ``D`` independent binary outcomes per step.

:class:`BernoulliEmissions` (stored as log-odds ``logits``, read back as ``probs``), its
sufficient statistics :class:`BernoulliStats`, and the private log-density and M-step
functions it is built from.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Real, Shaped

from ... import _checks
from ..priors import BetaPrior
from .base import (
    _at_real_steps,
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _check_some_observed,
    _check_weights,
    _fill_padding,
    _missing,
    _observed_entries,
    _observed_weights,
)
from .host import generator, key_seed, on_host


class BernoulliStats(NamedTuple):
    """Sufficient statistics of :class:`BernoulliEmissions`.

    Attributes:
        sum_weights: ``(K,)``, ``sum_n weights[n, k]``.
        weighted_ones: ``(K, D)``, ``sum_n weights[n, k] * y_nd`` over the steps where ``y_nd`` is observed.
        observed_weights: ``(K, D)``, ``sum_n weights[n, k]`` over the steps where ``y_nd`` is observed.
    """

    sum_weights: Array
    weighted_ones: Array
    observed_weights: Array


def _log_odds(probs):
    """Log-odds of probabilities in ``[0, 1]``: ``-inf`` and ``+inf`` at the ends (structural zeros and ones)."""
    inner = (probs > 0) & (probs < 1)
    safe = jnp.where(inner, probs, 0.5)
    return jnp.where(inner, jnp.log(safe) - jnp.log1p(-safe), jnp.where(probs >= 1, jnp.inf, -jnp.inf))


def _bernoulli_log_prob(logits: Float[Array, "K D"], emission: Float[Array, " D"]) -> Float[Array, " K"]:
    observed, y = _observed_entries(emission)  # missing outcomes (NaN) drop out
    # log sigmoid(+-logit) picks the term of the outcome only: no 0 * (-inf) at structural zeros/ones
    terms = jnp.where(y > 0, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
    return jnp.sum(jnp.where(observed, terms, 0.0), axis=-1)


def _bernoulli_init(emissions, key, noise, num_states: int):
    """Logits of :meth:`BernoulliEmissions.from_data`, computed on the host (see :mod:`.host`)."""
    shape = jax.ShapeDtypeStruct((num_states, emissions.shape[1]), emissions.dtype)

    def host(seed, y):
        observed = ~np.isnan(y)
        freqs = (np.where(observed, y, 0.0).sum(0) + 1.0) / (observed.sum(0) + 2.0)
        probs = (1.0 - noise) * freqs + noise * generator(seed).uniform(size=shape.shape)
        return (np.log(probs) - np.log1p(-probs)).astype(shape.dtype)  # inside (0, 1): finite

    return on_host(host, shape, key_seed(key), emissions)


class BernoulliEmissions(AbstractExponentialFamilyEmissions):
    r"""Independent binary outcomes: :math:`p(y_t \mid z_t = k) = \prod_d p_{kd}^{y_{td}} (1 - p_{kd})^{1 - y_{td}}`.

    Emissions are vectors of ``D`` outcomes in ``{0, 1}`` per step (bool, integer or float
    dtype). In a float array a NaN outcome is missing: it drops out of the step's
    log-density, and the M-step averages each outcome over the steps where it is observed.

    Storage: log-odds ``logits`` (``(K, D)``), ``probs = sigmoid(logits)``. A probability of
    exactly 0 or 1 is a logit of ``-inf`` or ``+inf``: the impossible outcome then has
    log-density ``-inf`` (no NaN).

    M-step: :math:`p_{kd} = \sum_n w_{nk} y_{nd} / \sum_n w_{nk}` over the steps where
    :math:`y_{nd}` is observed; a (state, outcome) pair with no weight keeps its value.

    Args:
        probs: ``(K, D)`` probabilities of a 1, in ``[0, 1]``.
        logits: alternatively, unconstrained ``(K, D)`` log-odds (keyword only).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.BernoulliEmissions(probs=jnp.array([[0.9, 0.2], [0.1, 0.7]]))
        >>> model.log_likelihoods(jnp.array([[1, 0], [0, 1], [1, 1]])).shape
        (3, 2)
    """

    logits: Float[Array, "K D"]
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"probs": ("logits",)}

    @typing.no_type_check
    def __init__(self, probs: Float[ArrayLike, "K D"] | None = None, *, logits: Float[ArrayLike, "K D"] | None = None):
        if (probs is None) == (logits is None):
            raise ValueError("Pass exactly one of `probs` and `logits`.")
        if probs is not None:
            probs = _checks.as_float_array("probs", probs)
            _checks.check_shape("probs", probs, ("K", "D"), "one probability of a 1 per state and outcome")
            xp, values = _checks.host_arrays(probs)
            bad = (values < 0) | (values > 1) | ~xp.isfinite(values)
            probs = _checks.check_values(probs, bad, "`probs` must hold probabilities in [0, 1].")
            self.logits = _log_odds(probs)
        else:
            logits = _checks.as_float_array("logits", logits)
            _checks.check_shape("logits", logits, ("K", "D"))
            self.logits = logits

    @property
    def num_states(self) -> int:
        return self.logits.shape[0]

    @property
    def emission_dim(self) -> int:
        """Number of binary outcomes ``D``."""
        return self.logits.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.emission_dim,)

    @property
    def probs(self) -> Float[Array, "K D"]:
        """Probabilities of a 1, ``(K, D)``."""
        return jax.nn.sigmoid(self.logits)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (
            jnp.issubdtype(emissions.dtype, jnp.bool_)
            or jnp.issubdtype(emissions.dtype, jnp.integer)
            or jnp.issubdtype(emissions.dtype, jnp.floating)
        ):
            raise ValueError(f"`emissions` of a Bernoulli model must hold 0/1 outcomes; got dtype {emissions.dtype}.")
        if jnp.issubdtype(emissions.dtype, jnp.bool_):
            return emissions
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = (values != 0) & (values != 1)
        if jnp.issubdtype(emissions.dtype, jnp.floating):
            bad = bad & ~xp.isnan(values)  # NaN is a missing outcome
        bad = _at_real_steps(bad, mask)
        return _checks.check_values(emissions, bad, "`emissions` of a Bernoulli model must be 0 or 1 (NaN for missing).", at="emissions")

    def _float(self, emissions: jax.Array) -> jax.Array:
        return emissions.astype(self.logits.dtype)

    def log_prob(self, emission: Real[ArrayLike, " D"]) -> Float[Array, " K"]:
        emission = self._checked_emission(emission, "one vector of 0/1 outcomes")
        return _bernoulli_log_prob(self.logits, self._float(emission))

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Real[Array, " D"]:
        return jax.random.bernoulli(key, self.probs[state]).astype(jnp.int32)

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> BernoulliStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled 0/1 outcome vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        missing = _missing(emissions, mask)
        observed, emissions = _observed_entries(self._float(_fill_padding(emissions, mask, 0)))
        weights = _check_weights(weights, n, self.num_states, mask, self.logits.dtype)
        sum_weights = weights.sum(0)
        observed_weights = _observed_weights(weights, observed, missing)
        return BernoulliStats(sum_weights, weights.T @ emissions, observed_weights)

    def parameter_counts(self) -> dict[str, int]:
        return {"probs": int(np.isfinite(np.asarray(self.logits)).sum())}  # probabilities 0 and 1 are fixed

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        if isinstance(prior, BetaPrior):
            return prior.log_prob(self.logits)
        return super().log_prior(prior)

    def m_step_from_stats(
        self,
        stats: BernoulliStats,
        frozen: AbstractSet[str] = frozenset(),
        prior: PyTree | None = None,
    ) -> "BernoulliEmissions":
        if "probs" in frozen:
            return self
        if isinstance(prior, BetaPrior):  # the posterior mode; nothing to learn from keeps its value
            probs = prior.mode(stats.weighted_ones, stats.observed_weights)
            nothing = (stats.observed_weights + prior.concentration1 + prior.concentration0 - 2.0) <= 0
            return BernoulliEmissions(logits=jnp.where(nothing, self.logits, _log_odds(probs)))
        empty = stats.observed_weights <= 0
        probs = stats.weighted_ones / jnp.where(empty, 1.0, stats.observed_weights)
        return BernoulliEmissions(logits=jnp.where(empty, self.logits, _log_odds(probs)))

    # -- initialisers ------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def random(
        cls, num_states: int, emission_dim: int, *, dtype: DTypeLike | None = None, key: PRNGKeyArray
    ) -> BernoulliEmissions:
        """Probabilities drawn uniformly from ``(0.05, 0.95)``.

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.BernoulliEmissions.random(3, 4, key=jax.random.key(0)).probs.shape
            (3, 4)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emission_dim = _checks.positive_int("emission_dim", emission_dim)
        dtype = dtype or jnp.result_type(float)
        probs = jax.random.uniform(key, (num_states, emission_dim), dtype, 0.05, 0.95)
        return cls(logits=_log_odds(probs))

    @classmethod
    @typing.no_type_check
    def from_data(
        cls, emissions: Real[ArrayLike, "N D"], num_states: int, *, noise: float = 0.3,
        key: PRNGKeyArray | None = None,
    ) -> BernoulliEmissions:
        r"""Observed frequencies of each outcome, spread per state by uniform noise.

        ``probs[k] = (1 - noise) * f + noise * u_k`` with ``f`` the add-one smoothed frequency
        of a 1 in each dimension (missing outcomes left out) and ``u_k ~ Uniform(0, 1)^D``, so
        states differ (EM cannot separate identical states) and no probability is 0 or 1.

        Args:
            emissions: pooled outcomes, shape ``(N, D)``.
            num_states: ``K``.
            noise: mixing weight of the uniform draw, in ``(0, 1]``.
            key: PRNG key (keyword-only; default ``jax.random.key(0)``).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([[0, 1], [1, 1], [0, 0], [1, 0]])
            >>> ssmjax.BernoulliEmissions.from_data(ys, 2).probs.shape
            (2, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled 0/1 outcome vectors")
        probe = cls(logits=np.zeros((num_states, emissions.shape[1]), jnp.result_type(float)))  # host: no compilation
        emissions = probe._float(probe.check_emissions(emissions))
        _check_some_observed(emissions)
        key = jax.random.key(0) if key is None else key
        return cls(logits=_bernoulli_init(emissions, key, noise, num_states))
