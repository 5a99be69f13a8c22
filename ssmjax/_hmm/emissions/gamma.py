r"""Gamma emissions: a vector of ``D`` independent positive values per step (durations, amounts).

:class:`GammaEmissions` (stored as ``log_shapes`` and ``log_rates``), its sufficient statistics
:class:`GammaStats`, and the private log-density, shape solver and M-step it is built from.
An exponential emission is a Gamma with shape 1: build it with ``shapes=1`` and fit with
``frozen=("emissions.shapes",)``.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma, gammaln, polygamma
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

from ... import _checks
from ..priors import GammaPrior, check_broadcasts
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
from .host import on_host

# Newton steps of the shape equation (Minka's update converges quadratically from his
# closed-form start: 4 steps reach float64 round-off on every case in tests/test_emission_families.py)
_SHAPE_NEWTON_STEPS = 8
# Largest shape the M-step returns: all-equal values would send it to infinity
_MAX_SHAPE = 1e8
# Bisection steps of the MAP shape equation on [log 1e-8, log 1e8]: 2^-64 of that width is below
# float64 round-off of log(shape)
_MAP_SHAPE_BISECTIONS = 64


class GammaStats(NamedTuple):
    """Sufficient statistics of :class:`GammaEmissions`, each ``(K, D)`` over the steps where ``y_nd`` is observed.

    Attributes:
        observed_weights: ``sum_n weights[n, k]``.
        weighted_sums: ``sum_n weights[n, k] * y_nd``.
        weighted_logs: ``sum_n weights[n, k] * log(y_nd)``.
    """

    observed_weights: Array
    weighted_sums: Array
    weighted_logs: Array


def _gamma_log_prob(log_shapes, log_rates, emission) -> Float[Array, " K"]:
    observed, y = _observed_entries(emission, fill=1.0)  # missing values (NaN) drop out
    shapes = jnp.exp(log_shapes)
    terms = shapes * log_rates + (shapes - 1.0) * jnp.log(y) - jnp.exp(log_rates) * y - gammaln(shapes)
    return jnp.sum(jnp.where(observed, terms, 0.0), axis=-1)


def _solve_shape(log_gap):
    r"""The shape :math:`\alpha` with :math:`\log\alpha - \psi(\alpha) = s` for ``s = log_gap > 0``
    (the weighted log of the mean minus the weighted mean of the logs): Minka's start and
    Newton steps on :math:`1/\alpha` ("Estimating a Gamma distribution", 2002)."""
    s = jnp.maximum(log_gap, 1.0 / _MAX_SHAPE)
    shape = (3.0 - s + jnp.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)

    def newton(_, a):
        step = (jnp.log(a) - digamma(a) - s) / (a**2 * (1.0 / a - polygamma(1, a)))
        return jnp.clip(1.0 / (1.0 / a + step), 1.0 / _MAX_SHAPE, _MAX_SHAPE)

    return jax.lax.fori_loop(0, _SHAPE_NEWTON_STEPS, newton, shape)


def _inverse_digamma(target):
    """The ``x > 0`` with ``digamma(x) = target``: Minka's start and Newton steps (the shape given a frozen rate)."""
    x = jnp.where(target >= -2.22, jnp.exp(target) + 0.5, -1.0 / (target + 0.5772156649015329))

    def newton(_, x):
        return jnp.clip(x - (digamma(x) - target) / polygamma(1, x), 1.0 / _MAX_SHAPE, _MAX_SHAPE)

    return jax.lax.fori_loop(0, _SHAPE_NEWTON_STEPS, newton, x)


def _solve_map_shape(counts, log_prior_total, mean_log, prior_shape):
    r"""The shape :math:`\alpha` maximising the expected log posterior with the rate profiled out:
    the root of :math:`h(\alpha) = \log(a - 1 + n\alpha) - \log(b + \sum w y) + \overline{\log y} - \psi(\alpha)`,
    ``log_prior_total`` :math:`= \log(b + \sum w y)`. For :math:`a \ge 1`, :math:`h` decreases from
    :math:`+\infty` to :math:`\log n - \log(b + \sum w y) + \overline{\log y} \le 0` (Jensen): one root,
    found by bisection in :math:`\log\alpha` (robust where Newton's method is not: the curvature changes sign)."""

    def h(log_shape):
        shape = jnp.exp(log_shape)
        return jnp.log(prior_shape - 1.0 + counts * shape) - log_prior_total + mean_log - digamma(shape)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = h(mid) > 0  # the root lies above mid
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo = jnp.full_like(mean_log, -jnp.log(_MAX_SHAPE))
    lo, hi = jax.lax.fori_loop(0, _MAP_SHAPE_BISECTIONS, bisect, (lo, -lo))
    return 0.5 * (lo + hi)


class GammaEmissions(AbstractExponentialFamilyEmissions):
    r"""Independent Gamma values: :math:`p(y_t \mid z_t = k) = \prod_d \mathrm{Gamma}(y_{td}; \alpha_{kd}, \beta_{kd})`.

    Density :math:`\beta^\alpha y^{\alpha - 1} e^{-\beta y} / \Gamma(\alpha)` (shape :math:`\alpha`,
    rate :math:`\beta`, mean :math:`\alpha / \beta`). Emissions are vectors of ``D`` positive
    values per step; a NaN value is missing and drops out.

    Storage: ``log_shapes`` and ``log_rates`` (``(K, D)``), so any array value is a valid model.

    M-step (exact, with a solver): for each state and dimension, the shape solves
    :math:`\log\alpha - \psi(\alpha) = \log \bar y - \overline{\log y}` (weighted means over the
    observed steps; Newton's method from Minka's closed-form start, to round-off), and the rate
    is :math:`\alpha / \bar y`. A (state, dimension) pair with no weight keeps its values; one whose
    values are all equal gets the largest shape, ``1e8``.

    Prior: a :class:`~ssmjax.GammaPrior` (shape :math:`a \ge 1`, rate :math:`b`) on the rates. The
    M-step is then the joint mode of the expected log posterior: the rate given the shape is
    :math:`(a - 1 + \alpha \sum w) / (b + \sum w y)`, and the shape solves the profiled equation
    :math:`\log(a - 1 + \alpha \sum w) - \log(b + \sum w y) + \overline{\log y} = \psi(\alpha)`
    (bisection, to round-off); with one of them frozen, the other is its conditional mode.

    Args:
        shapes: ``(K, D)`` positive shapes (or one number for all).
        rates: ``(K, D)`` positive rates.
        log_shapes, log_rates: alternatively, the unconstrained storage (keyword only).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.GammaEmissions(shapes=jnp.array([[2.0], [5.0]]), rates=jnp.array([[1.0], [0.5]]))
        >>> model.log_likelihoods(jnp.array([[1.5], [9.0], [3.0]])).shape
        (3, 2)
    """

    log_shapes: Float[Array, "K D"]
    log_rates: Float[Array, "K D"]
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"shapes": ("log_shapes",), "rates": ("log_rates",)}

    @typing.no_type_check
    def __init__(
        self,
        shapes: Float[ArrayLike, "K D"] | None = None,
        rates: Float[ArrayLike, "K D"] | None = None,
        *,
        log_shapes: Float[ArrayLike, "K D"] | None = None,
        log_rates: Float[ArrayLike, "K D"] | None = None,
    ):
        if (rates is None) == (log_rates is None) or (shapes is None) == (log_shapes is None):
            raise ValueError("Pass exactly one of `shapes` and `log_shapes`, and one of `rates` and `log_rates`.")
        if log_rates is None:
            rates = _checks.as_float_array("rates", rates)
            _checks.check_shape("rates", rates, ("K", "D"), "one rate per state and dimension")
            log_rates = jnp.log(_positive("rates", rates))
        else:
            log_rates = _checks.as_float_array("log_rates", log_rates)
            _checks.check_shape("log_rates", log_rates, ("K", "D"))
        if log_shapes is None:
            shapes = jnp.broadcast_to(_checks.as_float_array("shapes", shapes, log_rates.dtype), log_rates.shape)
            log_shapes = jnp.log(_positive("shapes", shapes))
        else:
            log_shapes = _checks.as_float_array("log_shapes", log_shapes, log_rates.dtype)
            _checks.check_shape("log_shapes", log_shapes, log_rates.shape)
        self.log_shapes, self.log_rates = log_shapes, log_rates

    @property
    def num_states(self) -> int:
        return self.log_rates.shape[0]

    @property
    def emission_dim(self) -> int:
        """Number of values per step ``D``."""
        return self.log_rates.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.emission_dim,)

    @property
    def shapes(self) -> Float[Array, "K D"]:
        """Shapes :math:`\\alpha`, ``(K, D)``."""
        return jnp.exp(self.log_shapes)

    @property
    def rates(self) -> Float[Array, "K D"]:
        """Rates :math:`\\beta`, ``(K, D)``."""
        return jnp.exp(self.log_rates)

    @property
    def means(self) -> Float[Array, "K D"]:
        """Means :math:`\\alpha / \\beta`, ``(K, D)``."""
        return jnp.exp(self.log_shapes - self.log_rates)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.floating) or jnp.issubdtype(emissions.dtype, jnp.integer)):
            raise ValueError(f"`emissions` of a Gamma model must be positive numbers; got dtype {emissions.dtype}.")
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = ((values <= 0) | xp.isinf(values)) & ~xp.isnan(values)
        bad = _at_real_steps(bad, mask)
        return _checks.check_values(emissions, bad, "`emissions` of a Gamma model must be positive and finite (NaN for missing).", at="emissions")

    def _float(self, emissions: jax.Array) -> jax.Array:
        return emissions.astype(self.log_rates.dtype)

    def log_prob(self, emission: Float[ArrayLike, " D"]) -> Float[Array, " K"]:
        emission = self._checked_emission(emission, "one vector of positive values")
        return _gamma_log_prob(self.log_shapes, self.log_rates, self._float(emission))

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Float[Array, " D"]:
        return jax.random.gamma(key, self.shapes[state], dtype=self.log_rates.dtype) / self.rates[state]

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> GammaStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled positive value vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        observed, y = _observed_entries(self._float(_fill_padding(emissions, mask, 1)), fill=1.0)
        weights = _check_weights(weights, n, self.num_states, mask, self.log_rates.dtype)
        obs = observed.astype(weights.dtype)
        counts = _observed_weights(weights, observed, _missing(emissions, mask))
        return GammaStats(counts, weights.T @ (obs * y), weights.T @ (obs * jnp.log(y)))

    def _rate_prior(self, prior):
        if not isinstance(prior, GammaPrior):
            return None
        shape = self.log_rates.shape
        check_broadcasts("prior.emissions.shape", prior.shape, shape)
        check_broadcasts("prior.emissions.rate", prior.rate, shape)
        xp, host = _checks.host_arrays(prior.shape)
        _checks.check_values(prior.shape, host < 1, "`prior.emissions.shape` must be at least 1 for Gamma emissions "
                             "(below one the prior's density is unbounded at rate 0 and the posterior has no mode).")
        return prior

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        """The :class:`~ssmjax.GammaPrior` log-density of the rates (the shapes are flat)."""
        rate_prior = self._rate_prior(prior)
        if rate_prior is None:
            return super().log_prior(prior)
        return rate_prior.log_prob(self.log_rates)

    def m_step_from_stats(
        self, stats: GammaStats, frozen: AbstractSet[str] = frozenset(), prior: PyTree | None = None
    ) -> "GammaEmissions":
        rate_prior = self._rate_prior(prior)
        empty = stats.observed_weights <= 0
        total = jnp.where(empty, 1.0, stats.observed_weights)
        mean, mean_log = stats.weighted_sums / total, stats.weighted_logs / total
        dtype = self.log_rates.dtype
        if "shapes" in frozen:
            log_shapes = self.log_shapes
        elif "rates" in frozen:  # the maximiser given the rate: digamma(shape) = log rate + mean log
            log_shapes = jnp.where(empty, self.log_shapes, jnp.log(_inverse_digamma(self.log_rates + mean_log)))
        elif rate_prior is not None:  # the joint mode, the rate profiled out
            a, b = rate_prior.shape.astype(dtype), rate_prior.rate.astype(dtype)
            log_total = jnp.log(b + stats.weighted_sums)
            log_shapes = jnp.where(empty, self.log_shapes, _solve_map_shape(total, log_total, mean_log, a))
        else:
            log_shapes = jnp.where(empty, self.log_shapes, jnp.log(_solve_shape(jnp.log(mean) - mean_log)))
        log_rates = self.log_rates
        if "rates" not in frozen and rate_prior is not None:  # the mode given the shape
            a, b = rate_prior.shape.astype(dtype), rate_prior.rate.astype(dtype)
            numerator = a - 1.0 + jnp.exp(log_shapes) * stats.observed_weights
            denominator = b + stats.weighted_sums
            nothing = (numerator <= 0) | (denominator <= 0)
            log_rates = jnp.where(nothing, self.log_rates, jnp.log(jnp.where(nothing, 1.0, numerator / denominator)))
        elif "rates" not in frozen:  # the maximiser given the shape: rate = shape / mean
            log_rates = jnp.where(empty, self.log_rates, log_shapes - jnp.log(mean))
        return GammaEmissions(log_shapes=log_shapes, log_rates=log_rates)

    # -- initialisers ------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def random(
        cls, num_states: int, emission_dim: int, *, dtype: DTypeLike | None = None, key: PRNGKeyArray
    ) -> GammaEmissions:
        """Shapes from ``Uniform(1, 5)``, rates from ``Uniform(0.5, 2)``.

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.GammaEmissions.random(3, 2, key=jax.random.key(0)).shapes.shape
            (3, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emission_dim = _checks.positive_int("emission_dim", emission_dim)
        dtype = dtype or jnp.result_type(float)
        k1, k2 = jax.random.split(key)
        shapes = jax.random.uniform(k1, (num_states, emission_dim), dtype, 1.0, 5.0)
        rates = jax.random.uniform(k2, (num_states, emission_dim), dtype, 0.5, 2.0)
        return cls(log_shapes=jnp.log(shapes), log_rates=jnp.log(rates))

    @classmethod
    @typing.no_type_check
    def from_data(
        cls, emissions: Float[ArrayLike, "N D"], num_states: int, *, key: PRNGKeyArray | None = None
    ) -> GammaEmissions:
        r"""State ``k``'s mean at the ``(k + 1/2) / K`` quantile of each dimension (observed values),
        and one shape for all states from the pooled data's method of moments (mean² / variance).

        Args:
            emissions: pooled positive values, shape ``(N, D)``.
            num_states: ``K``.
            key: unused (deterministic); accepted so that every family's initialiser takes it.

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([[0.5], [1.0], [4.0], [6.0]])
            >>> ssmjax.GammaEmissions.from_data(ys, 2).means.shape
            (2, 1)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled positive value vectors")
        zeros = np.zeros((num_states, emissions.shape[1]), jnp.result_type(float))  # host: no compilation
        probe = cls(log_shapes=zeros, log_rates=zeros)
        emissions = probe._float(probe.check_emissions(emissions))
        _check_some_observed(emissions)
        log_shapes, log_rates = _gamma_init(emissions, num_states)
        return cls(log_shapes=log_shapes, log_rates=log_rates)


def _gamma_init(emissions, num_states: int):
    """``(log_shapes, log_rates)`` of :meth:`GammaEmissions.from_data`, computed on the host (see
    :mod:`.host`)."""
    out = jax.ShapeDtypeStruct((num_states, emissions.shape[1]), emissions.dtype)

    def host(y):
        means = np.nanquantile(y, (np.arange(num_states) + 0.5) / num_states, axis=0)  # (K, D)
        shape = np.nanmean(y, axis=0) ** 2 / np.maximum(np.nanvar(y, axis=0), 1e-12)
        shapes = np.broadcast_to(np.clip(shape, 0.1, 1e3), means.shape)
        return np.log(shapes).astype(out.dtype), np.log(shapes / means).astype(out.dtype)

    return on_host(host, (out, out), emissions)


def _positive(name, values):
    xp, host = _checks.host_arrays(values)
    return _checks.check_values(values, (host <= 0) | ~xp.isfinite(host), f"`{name}` must be finite and positive.")
