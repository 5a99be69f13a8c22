"""The interface :func:`ssmjax.fit_em` and :func:`ssmjax.fit_sgd` rely on.

A fittable model is an :class:`equinox.Module` that implements the abstract
methods of :class:`AbstractFittableModel`. The EM loop only ever sees
*sufficient statistics*: pytrees of arrays that add up across sequences (and
across devices, when the batch is sharded), produced by ``_e_step`` for one
sequence and consumed by ``_m_step`` once per iteration. Gradient fitting only
ever sees the *unconstrained view*: a dict from parameter name to a pytree of
arrays in which every value is a valid model, so optax needs no bijectors.

A model may also define the pair ``_prepare_batch(emissions, lengths, inputs)``
and ``_batched_e_step(batch)``. The first maps the padded batch ``(B, T, ...)``
to any pytree (layouts the E-step wants, e.g. time-major), once per fit, outside
the compiled loop; the second takes that pytree and returns the *summed*
statistics and the summed log-likelihood. :func:`ssmjax.fit_em` then calls them
instead of ``jax.vmap`` of ``_e_step`` (the HMM does, to run emission maths and
forward-backward for all sequences at once). The result must equal the sum of
``_e_step`` over the batch.

While :func:`ssmjax.fit_em` traces its loop, :func:`observed_batch` tells an
E-step whether every entry of the batch's emissions at real (unpadded) steps is
a number (no NaN). It is a static fact, part of the compiled loop's cache key,
so an E-step may skip missing-data work (the LGSSM skips the per-step
conditioning of missing entries). Likewise :func:`unpadded_batch`: every
sequence has length ``T`` (the LGSSM then computes its covariances once for the
whole batch). Outside ``fit_em`` both are ``False``.

While :func:`ssmjax.fit_em` traces its first program, :func:`fast_e_step` is
``True`` for models whose ``_has_fast_e_step`` is true. Their E-step may then
leave out an exact fallback that only rare numerical cases need and that costs
much compile time (the HMM's log-space forward pass, on underflow), and return a
non-finite log-likelihood where the fallback would have been needed. ``fit_em``
then redoes that iteration and the rest with a second program, traced with
:func:`fast_e_step` ``False``: the result is that of the second program, and the
fallback is compiled only for data that need it.

Parameter names are the public ones (``"transition_matrix"``,
``"emission_cov"``, ``"emissions.means"``...). ``frozen`` in both fitting
functions takes these names: a frozen parameter never moves, and the others
get their exact constrained M-step (EM) or gradient update (SGD) given it.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import equinox as eqx
import jax
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

PyTree = Any

# Static facts about the loop being traced (see the module doc), set by fit_em while it traces.
_TRACING = {"observed_batch": False, "unpadded_batch": False, "fast_e_step": False}


@contextlib.contextmanager
def _tracing(name: str, value: bool) -> Iterator[None]:
    previous = _TRACING[name]
    _TRACING[name] = bool(value)
    try:
        yield
    finally:
        _TRACING[name] = previous


def observed_batch() -> bool:
    """Whether the batch being traced by ``fit_em`` has no NaN at real steps (see the module doc)."""
    return _TRACING["observed_batch"]


def unpadded_batch() -> bool:
    """Whether every sequence of the batch being traced by ``fit_em`` has length ``T`` (see the module doc)."""
    return _TRACING["unpadded_batch"]


@contextlib.contextmanager
def tracing_batch_pattern(pattern: tuple[bool, bool]) -> Iterator[None]:
    """Set :func:`observed_batch` and :func:`unpadded_batch` (``pattern``) while a fitting loop is traced."""
    observed, unpadded = pattern
    with _tracing("observed_batch", observed), _tracing("unpadded_batch", unpadded):
        yield


def fast_e_step() -> bool:
    """Whether the E-step being traced may leave out its rarely needed fallback (see the module doc)."""
    return _TRACING["fast_e_step"]


def tracing_fast_e_step(fast: bool):
    """Set :func:`fast_e_step` while a fitting loop is traced."""
    return _tracing("fast_e_step", fast)


class AbstractFittableModel(eqx.Module):
    """A state-space model that :func:`ssmjax.fit_em` and :func:`ssmjax.fit_sgd` can fit."""

    @abc.abstractmethod
    def parameter_names(self) -> tuple[str, ...]:
        """Names accepted by ``frozen``."""

    @abc.abstractmethod
    def marginal_loglik(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> Float[Array, ""]:
        """``log p(y_{1:T})`` of one sequence."""

    @abc.abstractmethod
    def _check_batch(self, emissions, lengths, inputs) -> tuple[jax.Array, jax.Array, Any]:
        """Validate a batch eagerly; return canonical ``(emissions (B, T, ...), lengths (B,), inputs)``."""

    def _check_prior(self, prior) -> None:
        """Validate ``prior`` for this model (eager ``ValueError``); models without priors accept only None."""
        if prior is not None:
            raise ValueError(f"{type(self).__name__} takes no prior; got {type(prior).__name__}.")

    def _log_prior(self, prior):
        """``log p(parameters)`` under ``prior`` (0 for None): what ``fit_em`` adds to the log-likelihood."""
        return 0.0

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


# A fitting function returns the class it was given.
Model = TypeVar("Model", bound=AbstractFittableModel)


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
