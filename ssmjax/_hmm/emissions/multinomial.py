r"""Multinomial emissions: a vector of ``C`` counts of ``n`` trials per step.

:class:`MultinomialEmissions` (stored as ``logits``, read back as ``probs``; the number of
trials ``num_trials`` is static), its sufficient statistics :class:`MultinomialStats`, and the
private log-density and statistics functions it is built from.

**Missing counts.** The counts of one step are not independent (they sum to ``n``), so a
missing count does not simply drop out. Given the state, the counts of the observed categories
and the number of the remaining trials, ``n`` minus their sum, are multinomial over the observed
categories and "the rest", whose probability is the sum of the missing categories'. That is the
exact log-density of the observed counts, and the M-step splits the remaining trials over the
missing categories in proportion to their probabilities under each state (their conditional
expectation): exact EM for the observed-data likelihood.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln, logsumexp
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Real, Shaped

from ... import _checks
from .base import (
    _at_real_steps,
    _as_mask,
    _check_some_observed,
    _check_weights,
    _fill_padding,
    _missing,
    _observed_entries,
)
from .categorical import _AbstractProbabilityRows, _rows_logits
from .host import generator, key_seed, on_host


class MultinomialStats(NamedTuple):
    """Sufficient statistics of :class:`MultinomialEmissions`.

    Attributes:
        counts: ``(K, C)``, ``sum_n weights[n, k] * E[y_nc]``: the observed count, or for a
            missing count its expectation given the step's observed counts and state ``k``.
    """

    counts: Array


def _multinomial_log_prob(
    logits: Float[Array, "K C"],
    num_trials: int,
    emission: Float[Array, " C"],
) -> Float[Array, " K"]:
    observed, y = _observed_entries(emission)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    rest = num_trials - jnp.sum(jnp.where(observed, y, 0.0))  # trials falling in the missing categories
    # log of the missing categories' total probability; where they have none (no missing category,
    # or only structural zeros) a finite dummy enters the logsumexp, so that no gradient is NaN
    missing_log_p = jnp.where(observed, -jnp.inf, log_probs)
    has_mass = jnp.any(jnp.isfinite(missing_log_p), axis=-1, keepdims=True)
    log_p_rest = logsumexp(jnp.where(has_mass, missing_log_p, 0.0), axis=-1)
    rest_term = jnp.where(rest > 0, rest * jnp.where(has_mass[:, 0], log_p_rest, -jnp.inf), 0.0)
    return _counted_terms(log_probs, num_trials, y, observed) - gammaln(rest + 1.0) + rest_term


def _counted_terms(log_probs: Float[Array, "K C"], num_trials: int, y: Float[Array, " C"], observed) -> Float[Array, " K"]:
    """The terms of the observed counts, ``log n! - sum log y_c! + sum y_c log p_kc`` over the observed
    categories (``observed``: a mask, or True), with 0 log 0 = 0 (structural zeros: log p = -inf);
    with every count observed, the whole log-density."""
    y_log_p = jnp.where(observed & (y > 0), y * log_probs, 0.0)
    return gammaln(num_trials + 1.0) - jnp.sum(jnp.where(observed, gammaln(y + 1.0), 0.0)) + jnp.sum(y_log_p, axis=-1)


def _multinomial_init(emissions, key, noise, num_states: int):
    """Logits of :meth:`MultinomialEmissions.from_data`, computed on the host (see :mod:`.host`)."""
    shape = jax.ShapeDtypeStruct((num_states, emissions.shape[1]), emissions.dtype)

    def host(seed, y):
        counts = np.where(np.isnan(y), 0.0, y).sum(0) + 1.0
        freqs = counts / counts.sum()
        g = generator(seed).dirichlet(np.ones(shape.shape[1]), size=shape.shape[0])
        return np.log((1.0 - noise) * freqs + noise * g).astype(shape.dtype)

    return on_host(host, shape, key_seed(key), emissions)


class MultinomialEmissions(_AbstractProbabilityRows):
    r"""Counts of ``n`` trials over ``C`` categories: :math:`p(y_t \mid z_t = k) = \mathrm{Mult}(y_t; n, p_k)`.

    Emissions are vectors of ``C`` non-negative integer counts summing to ``num_trials`` per
    step (integer dtype, or float holding integral values). In a float array a NaN count is
    missing (see :mod:`ssmjax._hmm.emissions.multinomial`): the counts observed at that step
    must then sum to at most ``num_trials``. ``num_trials = 1`` is a one-hot categorical.

    Storage: ``logits`` (``(K, C)``), ``probs = softmax(logits)``; ``num_trials`` is static.

    M-step: :math:`p_{kc} \propto \sum_n w_{nk} \mathbb E[y_{nc}]`; a state with no weight keeps
    its probabilities.

    Args:
        probs: ``(K, C)`` row-stochastic matrix.
        num_trials: the number of trials ``n`` of every step (a positive int).
        logits: alternatively, unconstrained ``(K, C)`` logits (keyword only).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.MultinomialEmissions(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]), num_trials=5)
        >>> model.log_likelihoods(jnp.array([[4, 1, 0], [0, 2, 3]])).shape
        (2, 2)
    """

    logits: Float[Array, "K C"]
    num_trials: int = eqx.field(static=True)

    @typing.no_type_check
    def __init__(
        self, probs: Float[ArrayLike, "K C"] | None = None, num_trials: int = 1, *,
        logits: Float[ArrayLike, "K C"] | None = None,
    ):
        num_trials = _checks.positive_int("num_trials", num_trials)
        self.num_trials = num_trials
        self.logits = _rows_logits(probs, logits, "one row of category probabilities per state")

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.num_classes,)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.integer) or jnp.issubdtype(emissions.dtype, jnp.floating)):
            raise ValueError(f"`emissions` of a multinomial model must hold counts; got dtype {emissions.dtype}.")
        xp, values, mask = _checks.host_arrays(emissions, mask)
        if jnp.issubdtype(emissions.dtype, jnp.floating):
            nan = xp.isnan(values)
            bad_entry = (((values < 0) | (values != xp.floor(values))) & ~nan) | xp.isinf(values)
            total = xp.sum(xp.where(nan, 0, values), axis=-1)
            bad_total = xp.where(xp.any(nan, axis=-1), total > self.num_trials, total != self.num_trials)
        else:
            bad_entry = values < 0
            bad_total = xp.sum(values, axis=-1) != self.num_trials
        bad = xp.any(bad_entry, axis=-1) | bad_total
        bad = _at_real_steps(bad, mask)
        return _checks.check_values(
            emissions, bad,
            f"`emissions` of a multinomial model must be non-negative integer counts summing to num_trials="
            f"{self.num_trials} (observed counts at most that where some are NaN, missing).",
            at="emissions",
        )

    def _float(self, emissions: jax.Array) -> jax.Array:
        return emissions.astype(self.logits.dtype)

    def log_prob(self, emission: Real[ArrayLike, " C"]) -> Float[Array, " K"]:
        emission = self._checked_emission(emission, "one vector of counts")
        return _multinomial_log_prob(self.logits, self.num_trials, self._float(emission))

    def _log_prob_observed(self, emission) -> Float[Array, " K"]:
        # every count observed: no missing categories' share to sum
        return _counted_terms(jax.nn.log_softmax(self.logits, axis=-1), self.num_trials, self._float(emission), True)

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Real[Array, " C"]:
        draws = jax.random.categorical(key, self.logits[state], shape=(self.num_trials,))
        return jnp.zeros(self.num_classes, jnp.int32).at[draws].add(1)

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> MultinomialStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.num_classes), "pooled count vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        observed, y = _observed_entries(self._float(_fill_padding(emissions, mask, 0)))
        weights = _check_weights(weights, n, self.num_states, mask, self.logits.dtype)
        counts = weights.T @ y
        if _missing(emissions, mask) is False:
            return MultinomialStats(counts=counts)
        # the remaining trials of each step, split over its missing categories under each state
        rest = self.num_trials - jnp.sum(y, axis=-1)  # (N,), 0 where nothing is missing
        log_probs = jax.nn.log_softmax(self.logits, axis=-1)
        missing_log_p = jnp.where(observed[:, None, :], -jnp.inf, log_probs[None])  # (N, K, C)
        share = jnp.exp(missing_log_p - logsumexp(missing_log_p, axis=-1, keepdims=True))
        share = jnp.where(jnp.isfinite(missing_log_p), share, 0.0)  # no missing category: no share
        counts = counts + jnp.einsum("nk,n,nkc->kc", weights, rest, share)
        return MultinomialStats(counts=counts)

    def m_step_from_stats(
        self,
        stats: MultinomialStats,
        frozen: AbstractSet[str] = frozenset(),
        prior: PyTree | None = None,
    ) -> "MultinomialEmissions":
        if "probs" in frozen:
            return self
        return MultinomialEmissions(logits=self._rows_m_step(stats.counts, prior), num_trials=self.num_trials)

    # -- initialisers ------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def random(
        cls, num_states: int, num_classes: int, num_trials: int, *, dtype: DTypeLike | None = None, key: PRNGKeyArray
    ) -> MultinomialEmissions:
        """Rows drawn from a flat Dirichlet(1, ..., 1).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.MultinomialEmissions.random(3, 4, 10, key=jax.random.key(0)).probs.shape
            (3, 4)
        """
        num_states = _checks.positive_int("num_states", num_states)
        num_classes = _checks.positive_int("num_classes", num_classes)
        dtype = dtype or jnp.result_type(float)
        probs = jax.random.dirichlet(key, jnp.ones(num_classes, dtype), shape=(num_states,))
        return cls(logits=jnp.log(probs), num_trials=num_trials)

    @classmethod
    @typing.no_type_check
    def from_data(
        cls, emissions: Real[ArrayLike, "N C"], num_states: int, *, num_trials: int | None = None,
        noise: float = 0.2, key: PRNGKeyArray | None = None,
    ) -> MultinomialEmissions:
        r"""Pooled category frequencies, perturbed per state by Dirichlet noise.

        ``probs[k] = (1 - noise) * f + noise * g_k`` with ``f`` the add-one smoothed pooled
        frequencies (missing counts left out) and ``g_k ~ Dirichlet(1)``.

        Args:
            emissions: pooled count vectors, shape ``(N, C)``.
            num_states: ``K``.
            num_trials: ``n``; by default the total of the first step without a missing count.
            noise: mixing weight of the Dirichlet draw, in ``(0, 1]``.
            key: PRNG key (keyword-only; default ``jax.random.key(0)``).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([[3, 1, 0], [0, 2, 2], [1, 1, 2]])
            >>> ssmjax.MultinomialEmissions.from_data(ys, 2).num_trials
            4
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", "C"), "pooled count vectors")
        if num_trials is None:
            values = np.asarray(jax.device_get(emissions), float)
            complete = ~np.isnan(values).any(axis=1)
            if not complete.any():
                raise ValueError("`emissions` has no step without a missing count; pass `num_trials`.")
            num_trials = int(values[complete][0].sum())
        probe = cls(logits=np.zeros((num_states, emissions.shape[1]), jnp.result_type(float)), num_trials=num_trials)
        emissions = probe._float(probe.check_emissions(emissions))
        _check_some_observed(emissions)
        key = jax.random.key(0) if key is None else key
        return cls(logits=_multinomial_init(emissions, key, noise, num_states), num_trials=num_trials)
