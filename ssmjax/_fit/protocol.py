"""The interface :func:`ssmjax.fit_em` and :func:`ssmjax.fit_sgd` rely on.

A fittable model is an :class:`equinox.Module` that implements the abstract
methods of :class:`AbstractFittableModel`. The EM loop only ever sees
*sufficient statistics*: pytrees of arrays that add up across sequences (and
across devices, when the batch is sharded), produced by ``_e_step`` for one
sequence and consumed by ``_m_step`` once per iteration. Gradient fitting only
ever sees the *unconstrained view*: a dict from parameter name to a pytree of
arrays in which every value is a valid model, so optax needs no bijectors.

Parameter names are the public ones (``"transition_matrix"``,
``"emission_cov"``, ``"emissions.means"``...). ``frozen`` in both fitting
functions takes these names: a frozen parameter never moves, and the others
get their exact constrained M-step (EM) or gradient update (SGD) given it.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax

PyTree = Any


class AbstractFittableModel(eqx.Module):
    """A state-space model that :func:`ssmjax.fit_em` and :func:`ssmjax.fit_sgd` can fit."""

    @abc.abstractmethod
    def parameter_names(self) -> tuple[str, ...]:
        """Names accepted by ``frozen``."""

    @abc.abstractmethod
    def marginal_loglik(self, emissions, *, length=None, inputs=None) -> jax.Array:
        """``log p(y_{1:T})`` of one sequence."""

    @abc.abstractmethod
    def _check_batch(self, emissions, lengths, inputs) -> tuple[jax.Array, jax.Array, Any]:
        """Validate a batch eagerly; return canonical ``(emissions (B, T, ...), lengths (B,), inputs)``."""

    @abc.abstractmethod
    def _check_em(self, frozen: frozenset[str]) -> None:
        """Raise ValueError (before any compute) if EM cannot fit this model with ``frozen``."""

    @abc.abstractmethod
    def _e_step(self, emissions, length, inputs) -> tuple[PyTree, jax.Array]:
        """Sufficient statistics and marginal log-likelihood of one sequence."""

    @abc.abstractmethod
    def _m_step(self, stats: PyTree, frozen: frozenset[str]) -> "AbstractFittableModel":
        """The constrained maximiser given summed statistics, keeping ``frozen`` parameters."""

    @abc.abstractmethod
    def _unconstrained(self) -> dict[str, PyTree]:
        """Unconstrained view: parameter name -> arrays; any value is a valid model."""

    @abc.abstractmethod
    def _from_unconstrained(self, params: dict[str, PyTree]) -> "AbstractFittableModel":
        """Inverse of :meth:`_unconstrained` (structure taken from ``self``)."""


def check_frozen(model: AbstractFittableModel, frozen) -> frozenset[str]:
    """Validate ``frozen`` against the model's parameter names (eager ValueError)."""
    if isinstance(frozen, str):
        frozen = (frozen,)
    frozen = tuple(frozen)
    names = model.parameter_names()
    unknown = [f for f in frozen if f not in names]
    if unknown:
        raise ValueError(
            f"`frozen` names unknown parameters {unknown} for {type(model).__name__}; "
            f"expected a subset of {list(names)}."
        )
    return frozenset(frozen)
