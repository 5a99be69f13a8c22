r"""Known states (partial labels) as an emission: the state itself, observed at some steps.

:class:`KnownStateEmissions` reads one column holding the state at labelled steps and ``-1``
(or NaN) elsewhere: :math:`\log p(\ell_t \mid z_t = k)` is ``0`` where ``k`` is the label or the
step is unlabelled, and ``-inf`` where it is not. Joined to the data's own emission model by
:class:`~ssmjax.ProductEmissions`, every inference function, :func:`ssmjax.fit_em` and
:func:`ssmjax.fit_sgd` then condition exactly on the labels: the posterior is
:math:`p(z \mid y, z_L = \ell_L)` and the log-likelihood :math:`\log p(y, z_L = \ell_L)`
(semi-supervised EM).
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Real, Shaped

from ... import _checks
from .base import AbstractExponentialFamilyEmissions, _checked_indices


class KnownStateStats(NamedTuple):
    """No statistics: :class:`KnownStateEmissions` has nothing to learn."""


class KnownStateEmissions(AbstractExponentialFamilyEmissions):
    r"""The state, observed at labelled steps: one column, the state in ``[0, K)`` or ``-1`` / NaN for unknown.

    Args:
        num_states: ``K``.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> labels = ssmjax.KnownStateEmissions(2)
        >>> counts = ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0]]))
        >>> model = ssmjax.ProductEmissions(labels, counts)     # column 0: label, column 1: count
        >>> float(model.log_likelihoods(jnp.array([[-1.0, 3.0], [1.0, 7.0]]))[1, 0])
        -inf
    """

    states: int = eqx.field(static=True)

    @typing.no_type_check
    def __init__(self, num_states: int):
        num_states = _checks.positive_int("num_states", num_states)
        self.states = num_states

    @property
    def num_states(self) -> int:
        return self.states

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return ()

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        return _checked_indices(
            emissions, mask, self.states, "known states must be state indices",
            f"`emissions` of known states must be states in [0, {self.states}), or -1 / NaN for unknown.",
            minus_one_unknown=True,
        )

    def log_prob(self, emission: Real[ArrayLike, ""]) -> Float[Array, " K"]:
        emission = self._checked_emission(emission, "one state label")
        label = jnp.where(jnp.isnan(emission), -1, emission).astype(jnp.int32)
        match = (label < 0) | (jnp.arange(self.states) == label)
        return jnp.where(match, 0.0, -jnp.inf).astype(jnp.result_type(float))

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Int[Array, ""]:
        return jnp.asarray(state, jnp.int32)

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> KnownStateStats:
        return KnownStateStats()

    def m_step_from_stats(
        self,
        stats: KnownStateStats,
        frozen: AbstractSet[str] = frozenset(),
    ) -> "KnownStateEmissions":
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {}
