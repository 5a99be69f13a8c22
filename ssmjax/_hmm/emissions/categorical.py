r"""Categorical emissions: one integer symbol in ``[0, C)`` per step.

:class:`CategoricalEmissions` (stored as ``logits``, read back as ``probs``), its
sufficient statistics :class:`CategoricalStats` (weighted symbol counts), and the
private log-density, counting and M-step functions it is built from.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Real, Shaped

from ... import _checks, _deprecation
from ..priors import DirichletPrior
from .base import (
    _checked_indices,
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _check_weights,
    _fill_padding,
    _free_simplex_entries,
    _normalised_logits,
    _simplex_logits,
    _observed_entries,
    softmax_rows,
)


class CategoricalStats(NamedTuple):
    """Sufficient statistics of :class:`CategoricalEmissions`.

    Attributes:
        counts: ``(K, C)``, ``counts[k, c] = sum_n weights[n, k] * [y_n == c]``.
    """

    counts: Array


def _categorical_log_prob(logits: Float[Array, "K C"], emission) -> Float[Array, " K"]:
    observed, symbol = _observed_entries(emission)  # a missing symbol (NaN) contributes nothing
    return jnp.where(observed, jax.nn.log_softmax(logits, axis=-1)[:, symbol.astype(jnp.int32)], 0.0)


def _rows_logits(probs, logits, what: str):
    """The ``logits`` a constructor stores: from ``probs`` (checked rows, ``-inf`` at structural zeros) or as given."""
    if (probs is None) == (logits is None):
        raise ValueError("Pass exactly one of `probs` and `logits`.")
    if probs is not None:
        return _simplex_logits("probs", probs, what)
    logits = _checks.as_float_array("logits", logits)
    _checks.check_shape("logits", logits, ("K", "C"))
    return logits


class _AbstractProbabilityRows(AbstractExponentialFamilyEmissions):
    """What the families with one row of category probabilities per state share (categorical,
    multinomial): the storage, its views, the free-parameter count, the Dirichlet prior and the
    M-step of the rows from their expected counts."""

    logits: eqx.AbstractVar[Float[Array, "K C"]]
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"probs": ("logits",)}

    @property
    def num_states(self) -> int:
        return self.logits.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of categories ``C``."""
        return self.logits.shape[1]

    @property
    def probs(self) -> Float[Array, "K C"]:
        """Category probabilities, ``(K, C)``."""
        return softmax_rows(self.logits)

    def parameter_counts(self) -> dict[str, int]:
        return {"probs": _free_simplex_entries(self.logits)}  # structural zeros are fixed

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        if isinstance(prior, DirichletPrior):
            return prior.log_prob(jax.nn.log_softmax(self.logits, axis=-1))
        return super().log_prior(prior)

    def _rows_m_step(self, counts, prior):
        """New logits from expected ``counts`` ``(K, C)``: the normalised rows, or their posterior mode."""
        if isinstance(prior, DirichletPrior):
            return prior.mode_logits(counts, self.logits)
        return _normalised_logits(counts, self.logits)


class CategoricalEmissions(_AbstractProbabilityRows):
    r"""Categorical emissions: :math:`p(y_t = c \mid z_t = k) = \mathrm{probs}[k, c]`.

    The emission at each step is one integer symbol in ``[0, C)``: an integer array, or a
    float array of integral values in which NaN marks a missing symbol (the step then
    contributes no emission term, and no count to the M-step).

    Storage: ``logits`` (``(K, C)``), with ``probs = softmax(logits, axis=-1)``.
    Structural zeros in ``probs`` become ``logits = -inf``; ``log_prob`` is then
    exactly ``-inf`` for those symbols and finite elsewhere, without NaN, and
    gradients with respect to the finite logits stay finite. (A row of all
    ``-inf`` is not a distribution; the constructor cannot produce one.)

    Args:
        probs: ``(K, C)`` row-stochastic matrix (keyword or first positional).
        logits: alternatively, unconstrained ``(K, C)`` logits (keyword only).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.CategoricalEmissions(probs=jnp.array([[0.9, 0.1], [0.2, 0.8]]))
        >>> model.log_likelihoods(jnp.array([0, 1, 1])).shape
        (3, 2)
    """

    logits: Float[Array, "K C"]

    @typing.no_type_check
    def __init__(self, probs: Float[ArrayLike, "K C"] | None = None, *, logits: Float[ArrayLike, "K C"] | None = None):
        self.logits = _rows_logits(probs, logits, "one row of symbol probabilities per state")

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return ()

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        return _checked_indices(
            emissions, mask, self.num_classes, "a categorical model must hold integer symbols",
            f"`emissions` must be symbols in [0, {self.num_classes}) (num_classes), or NaN for missing.",
        )

    def log_prob(self, emission: Real[ArrayLike, ""]) -> Float[Array, " K"]:
        emission = self._checked_emission(emission, "one integer symbol")
        return _categorical_log_prob(self.logits, emission)

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Int[Array, ""]:
        return jax.random.categorical(key, self.logits[state])

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> CategoricalStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N",), "pooled integer symbols")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        observed, emissions = _observed_entries(_fill_padding(emissions, mask, 0))
        weights = _check_weights(weights, n, self.num_states, mask, self.logits.dtype)
        weights = jnp.where(observed[:, None], weights, 0.0)
        return CategoricalStats(counts=_categorical_counts(weights, emissions.astype(jnp.int32), self.num_classes))

    def m_step_from_stats(
        self,
        stats: CategoricalStats,
        frozen: AbstractSet[str] = frozenset(),
        prior: PyTree | None = None,
    ) -> "CategoricalEmissions":
        if "probs" in frozen:
            return self
        counts = jnp.asarray(stats.counts)
        _checks.check_shape("stats.counts", counts, (self.num_states, self.num_classes))
        return CategoricalEmissions(logits=self._rows_m_step(counts, prior))

    # -- initialisers ------------------------------------------------------

    @classmethod
    @_deprecation.key_last("CategoricalEmissions.random", skip=1)
    @typing.no_type_check
    def random(
        cls, num_states: int, num_classes: int, dtype: DTypeLike | None = None, *, key: PRNGKeyArray
    ) -> CategoricalEmissions:
        """Rows drawn from a flat Dirichlet(1, ..., 1).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.CategoricalEmissions.random(3, 4, key=jax.random.key(0)).probs.shape
            (3, 4)
        """
        num_states = _checks.positive_int("num_states", num_states)
        num_classes = _checks.positive_int("num_classes", num_classes)
        dtype = dtype or jnp.result_type(float)
        probs = jax.random.dirichlet(key, jnp.ones(num_classes, dtype), shape=(num_states,))
        return cls(logits=jnp.log(probs))

    @classmethod
    @_deprecation.key_last("CategoricalEmissions.from_data", skip=1)
    @typing.no_type_check
    def from_data(
        cls, emissions: Real[ArrayLike, " N"], num_states: int, num_classes: int, *, noise: float = 0.2,
        key: PRNGKeyArray,
    ) -> CategoricalEmissions:
        r"""Empirical symbol frequencies, perturbed per state by Dirichlet noise.

        ``probs[k] = (1 - noise) * f + noise * g_k`` where ``f`` are the add-one
        smoothed frequencies of the pooled ``emissions`` and ``g_k ~ Dirichlet(1)``,
        so states differ (EM cannot separate identical states) and no symbol has
        probability zero.

        Args:
            emissions: pooled integer symbols, shape ``(N,)`` (NaN for missing, left out).
            num_states: ``K``.
            num_classes: ``C``.
            noise: mixing weight of the Dirichlet draw, in ``(0, 1]``.
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([0, 1, 1, 2, 1])
            >>> ssmjax.CategoricalEmissions.from_data(ys, 2, 3, key=jax.random.key(0)).probs.shape
            (2, 3)
        """
        num_states = _checks.positive_int("num_states", num_states)
        num_classes = _checks.positive_int("num_classes", num_classes)
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N",), "pooled integer symbols")
        probe = cls(logits=np.zeros((num_states, num_classes), jnp.result_type(float)))
        observed, emissions = _observed_entries(probe.check_emissions(emissions))
        counts = jnp.zeros(num_classes).at[emissions.astype(jnp.int32)].add(observed.astype(float)) + 1.0
        freqs = counts / counts.sum()
        g = jax.random.dirichlet(key, jnp.ones(num_classes, freqs.dtype), shape=(num_states,))
        probs = (1.0 - noise) * freqs[None, :] + noise * g
        return cls(logits=jnp.log(probs))


def _categorical_counts(
    weights: Float[Array, "N K"],
    emissions: Int[Array, " N"],
    num_classes: int,
) -> Float[Array, "K C"]:
    onehot = jax.nn.one_hot(emissions, num_classes, dtype=weights.dtype)
    return weights.T @ onehot

