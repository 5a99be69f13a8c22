r"""Product emissions: independent emission families over blocks of one emission vector.

:class:`ProductEmissions` joins families that are independent given the state, for example
counts next to a Gaussian feature: :math:`p(y_t \mid z_t = k) = \prod_j p_j(y_t^{(j)} \mid z_t = k)`.
Each part reads its own consecutive columns of the ``(T, D)`` emissions (one column for a
part with scalar emissions, such as a categorical symbol), so the data of every part sit in
one float array. Everything else is the parts' own: log-densities, missing entries (NaN),
value checks, statistics (a tuple, one per part) and M-steps.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Real, Shaped

from ... import _checks
from .base import AbstractEmissions, AbstractExponentialFamilyEmissions


class ProductStats(NamedTuple):
    """Sufficient statistics of :class:`ProductEmissions`: ``parts``, one statistics pytree per part."""

    parts: tuple[PyTree[Array], ...]


def _width(part: AbstractEmissions) -> int:
    shape = tuple(part.emission_shape)
    if len(shape) > 1:
        raise ValueError(f"a part of ProductEmissions must have scalar or vector emissions; {type(part).__name__} has {shape}.")
    return shape[0] if shape else 1


class ProductEmissions(AbstractExponentialFamilyEmissions):
    r"""Independent emission families over consecutive blocks of columns.

    Args:
        parts: the emission models, each with scalar or vector emissions, all with the same
            number of states and a closed-form M-step. Part ``j`` reads the next
            ``emission_dim`` columns (one for a scalar part).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> counts = ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0]]))
        >>> feature = ssmjax.DiagonalGaussianEmissions(jnp.array([[0.0, 1.0], [2.0, 3.0]]), jnp.ones((2, 2)))
        >>> model = ssmjax.ProductEmissions(counts, feature)
        >>> model.emission_shape, model.log_likelihoods(jnp.array([[3.0, 0.1, 0.9], [9.0, float("nan"), 2.5]])).shape
        ((3,), (2, 2))
    """

    parts: tuple[AbstractExponentialFamilyEmissions, ...]
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"parts": ("parts",)}

    @typing.no_type_check
    def __init__(self, *parts: AbstractExponentialFamilyEmissions):
        if not parts:
            raise ValueError("`parts` must hold at least one emission model.")
        for j, part in enumerate(parts):
            if not isinstance(part, AbstractExponentialFamilyEmissions):
                raise ValueError(
                    f"`parts[{j}]` must be an emission model with a closed-form M-step; got {type(part).__name__}."
                )
            _width(part)
        states = {part.num_states for part in parts}
        if len(states) != 1:
            raise ValueError(f"`parts` must all have the same number of states; got {[p.num_states for p in parts]}.")
        self.parts = tuple(parts)

    @property
    def num_states(self) -> int:
        return self.parts[0].num_states

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (sum(_width(p) for p in self.parts),)

    def _blocks(self, emissions):
        """Each part's columns of ``(..., D)`` emissions, in its own shape."""
        out, start = [], 0
        for part in self.parts:
            width = _width(part)
            block = emissions[..., start : start + width]
            out.append(block if part.emission_shape else block[..., 0])
            start += width
        return out

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        checked = [part.check_emissions(block, mask) for part, block in zip(self.parts, self._blocks(emissions))]
        # keep every part's run-time check alive under jit (they return their block guarded)
        return jnp.concatenate([c.astype(emissions.dtype).reshape(emissions.shape[:-1] + (-1,)) for c in checked], axis=-1)

    def log_prob(self, emission: Real[ArrayLike, " D"]) -> Float[Array, " K"]:
        emission = _checks.to_device(emission)
        _checks.check_shape("emission", emission, self.emission_shape, "one emission vector")
        return sum(part.log_prob(block) for part, block in zip(self.parts, self._blocks(emission)))

    def _time_major_log_likelihoods(self, emissions, valid):
        return sum(
            part._time_major_log_likelihoods(block, valid) for part, block in zip(self.parts, self._blocks(emissions))
        )

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Real[Array, " D"]:
        keys = jax.random.split(key, len(self.parts))
        draws = [part.sample(state, key=k) for part, k in zip(self.parts, keys)]
        dtype = jnp.result_type(float)
        return jnp.concatenate([jnp.atleast_1d(d).astype(dtype) for d in draws])

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> ProductStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N",) + self.emission_shape, "pooled emission vectors")
        return ProductStats(
            tuple(part.suff_stats(block, weights, mask) for part, block in zip(self.parts, self._blocks(emissions)))
        )

    def parameter_counts(self) -> dict[str, int]:
        return {"parts": sum(sum(part.parameter_counts().values()) for part in self.parts)}

    def m_step_from_stats(self, stats: ProductStats, frozen: AbstractSet[str] = frozenset()) -> "ProductEmissions":
        if "parts" in frozen:
            return self
        return ProductEmissions(*(part.m_step_from_stats(s) for part, s in zip(self.parts, stats.parts)))
