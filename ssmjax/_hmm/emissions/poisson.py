r"""Poisson emissions: a vector of ``D`` independent non-negative counts per step.

:class:`PoissonEmissions` (stored as ``log_rates``, read back as ``rates``), its
sufficient statistics :class:`PoissonStats` (weights and weighted count sums), and
the private log-density, quantile initialiser and M-step functions it is built from.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Real, Shaped

from ... import _checks, _deprecation
from ..priors import GammaPrior
from .base import (
    _at_real_steps,
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _check_weights,
    _fill_padding,
    _log_or_minus_inf,
    _check_some_observed,
    _missing,
    _observed_entries,
    _observed_weights,
)
from .host import on_host


class PoissonStats(NamedTuple):
    """Sufficient statistics of :class:`PoissonEmissions`.

    Attributes:
        sum_weights: ``(K,)``, ``sum_n weights[n, k]``.
        weighted_sums: ``(K, D)``, ``sum_n weights[n, k] * y_nd`` over the steps where count ``d``
            is observed.
        observed_weights: ``(K, D)``, ``sum_n weights[n, k]`` over the steps where count ``d`` is
            observed (``sum_weights`` in every column when nothing is missing).
    """

    sum_weights: Array
    weighted_sums: Array
    observed_weights: Array


def _poisson_log_prob(log_rates: Float[Array, "K D"], emission: Float[Array, " D"]) -> Float[Array, " K"]:
    # missing counts (NaN) drop out: the dimensions are independent given the state
    observed, emission = _observed_entries(emission)
    # y log(rate) with the convention 0 * log(0) = 0 (zero rates: log_rates = -inf)
    y_log_rate = jnp.where(emission > 0, emission * log_rates, 0.0)
    terms = y_log_rate - jnp.exp(log_rates) - gammaln(emission + 1.0)
    return jnp.sum(jnp.where(observed, terms, 0.0), axis=-1)


class PoissonEmissions(AbstractExponentialFamilyEmissions):
    r"""Independent Poisson counts: :math:`p(y_t \mid z_t = k) = \prod_d \mathrm{Poi}(y_{td}; \lambda_{kd})`.

    Emissions are vectors of ``D`` non-negative integer counts per step (integer
    dtype, or float dtype holding integral values). In a float array a NaN count is
    missing: the step's log-density is that of its observed counts, and the M-step
    averages each count over the steps where it is observed.

    Storage: ``log_rates`` (``(K, D)``), ``rates = exp(log_rates)``. A zero rate
    is ``log_rates = -inf``: count 0 then has probability 1 and any positive
    count probability 0 (``log_prob = -inf``, no NaN).

    M-step: the weighted mean, :math:`\lambda_{kd} = \sum_n w_{nk} y_{nd} / \sum_n w_{nk}` over the
    steps where count ``d`` is observed.

    Args:
        rates: ``(K, D)`` non-negative finite rates.
        log_rates: alternatively, unconstrained ``(K, D)`` log-rates (keyword only).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.PoissonEmissions(rates=jnp.array([[1.0, 2.0], [10.0, 20.0]]))
        >>> model.log_likelihoods(jnp.array([[0, 1], [9, 22]])).shape
        (2, 2)
    """

    log_rates: Float[Array, "K D"]
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"rates": ("log_rates",)}

    @typing.no_type_check
    def __init__(
        self,
        rates: Float[ArrayLike, "K D"] | None = None,
        *,
        log_rates: Float[ArrayLike, "K D"] | None = None,
    ):
        if (rates is None) == (log_rates is None):
            raise ValueError("Pass exactly one of `rates` and `log_rates`.")
        if rates is not None:
            rates = _checks.as_float_array("rates", rates)
            _checks.check_shape("rates", rates, ("K", "D"), "one rate per state and count dimension")
            xp, values = _checks.host_arrays(rates)
            bad = (values < 0) | ~xp.isfinite(values)
            rates = _checks.check_values(rates, bad, "`rates` must be finite and non-negative.")
            self.log_rates = _log_or_minus_inf(rates)
        else:
            log_rates = _checks.as_float_array("log_rates", log_rates)
            _checks.check_shape("log_rates", log_rates, ("K", "D"))
            self.log_rates = log_rates

    @property
    def num_states(self) -> int:
        return self.log_rates.shape[0]

    @property
    def emission_dim(self) -> int:
        """Number of count dimensions ``D``."""
        return self.log_rates.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.emission_dim,)

    @property
    def rates(self) -> Float[Array, "K D"]:
        """Poisson rates, ``(K, D)``."""
        return jnp.exp(self.log_rates)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.integer) or jnp.issubdtype(emissions.dtype, jnp.floating)):
            raise ValueError(
                f"`emissions` of a Poisson model must be integer counts (integer or float dtype); "
                f"got dtype {emissions.dtype}."
            )
        xp, values, mask = _checks.host_arrays(emissions, mask)
        if jnp.issubdtype(emissions.dtype, jnp.integer):
            bad = values < 0
        else:  # NaN is a missing count
            bad = (((values < 0) | (values != xp.floor(values))) & ~xp.isnan(values)) | xp.isinf(values)
        bad = _at_real_steps(bad, mask)
        return _checks.check_values(
            emissions, bad, "`emissions` of a Poisson model must be non-negative integer counts (NaN for missing).",
            at="emissions",
        )

    def _float(self, emissions: jax.Array) -> jax.Array:
        return emissions.astype(self.log_rates.dtype)

    def log_prob(self, emission: Real[ArrayLike, " D"]) -> Float[Array, " K"]:
        emission = self._checked_emission(emission, "one vector of counts")
        return _poisson_log_prob(self.log_rates, self._float(emission))

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Real[Array, " D"]:
        return jax.random.poisson(key, self.rates[state]).astype(jnp.int32)

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> PoissonStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled count vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        missing = _missing(emissions, mask)
        observed, emissions = _observed_entries(self._float(_fill_padding(emissions, mask, 0)))
        weights = _check_weights(weights, n, self.num_states, mask, self.log_rates.dtype)
        sum_weights = weights.sum(0)
        observed_weights = _observed_weights(weights, observed, missing)
        return PoissonStats(sum_weights, weights.T @ emissions, observed_weights)

    def parameter_counts(self) -> dict[str, int]:
        return {"rates": int(np.isfinite(np.asarray(self.log_rates)).sum())}  # zero rates are fixed

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        if isinstance(prior, GammaPrior):
            return prior.log_prob(self.log_rates)
        return super().log_prior(prior)

    def m_step_from_stats(
        self,
        stats: PoissonStats,
        frozen: AbstractSet[str] = frozenset(),
        prior: PyTree | None = None,
    ) -> "PoissonEmissions":
        if "rates" in frozen:
            return self
        if isinstance(prior, GammaPrior):  # the posterior mode; nothing to learn from keeps its value
            nothing = stats.observed_weights + prior.rate <= 0
            rates = prior.mode(stats.weighted_sums, stats.observed_weights)
            return PoissonEmissions(log_rates=jnp.where(nothing, self.log_rates, _log_or_minus_inf(rates)))
        return PoissonEmissions(log_rates=_poisson_m_step(self.log_rates, stats.observed_weights, stats.weighted_sums))

    # -- initialisers ------------------------------------------------------

    @classmethod
    @_deprecation.key_last("PoissonEmissions.random", skip=1)
    @typing.no_type_check
    def random(
        cls, num_states: int, emission_dim: int, *, mean_rate: float = 5.0, dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ) -> PoissonEmissions:
        """Rates drawn from a Gamma(2, scale=mean_rate / 2) (mean ``mean_rate``).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.PoissonEmissions.random(3, 2, key=jax.random.key(0)).rates.shape
            (3, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emission_dim = _checks.positive_int("emission_dim", emission_dim)
        dtype = dtype or jnp.result_type(float)
        rates = jax.random.gamma(key, 2.0, (num_states, emission_dim), dtype) * (mean_rate / 2.0)
        return cls(log_rates=jnp.log(rates))

    @classmethod
    @typing.no_type_check
    def from_data(
        cls, emissions: Real[ArrayLike, "N D"], num_states: int, *, key: PRNGKeyArray | None = None
    ) -> PoissonEmissions:
        r"""Rates at the ``(k + 1/2) / K`` quantiles of each count dimension.

        State ``k`` gets, in every dimension ``d``, the ``(k + 0.5) / K`` quantile
        of the pooled counts (linear interpolation), floored at
        ``0.1 * mean_d + 1e-3`` so no rate is zero (a zero rate could never
        explain a positive count, and EM could not move it). Ties, common for
        small counts, are broken by a deterministic spread ``x exp(0.1 (k/(K-1) - 1/2))``
        because EM cannot separate identical states. Missing (NaN) counts are left out.

        Args:
            emissions: pooled counts, shape ``(N, D)``.
            num_states: ``K``.
            key: unused (the quantiles are deterministic); accepted so that every family's
                ``from_data`` takes the same arguments.

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([[0], [1], [2], [8], [9], [10]])
            >>> ssmjax.PoissonEmissions.from_data(ys, 2).rates.shape
            (2, 1)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled count vectors")
        probe = cls(log_rates=np.zeros((num_states, emissions.shape[1]), jnp.result_type(float)))
        emissions = probe._float(probe.check_emissions(emissions))
        _check_some_observed(emissions)
        return cls(log_rates=_poisson_init(emissions, num_states))


def _poisson_init(emissions, num_states: int):
    """Log-rates of :meth:`PoissonEmissions.from_data`, computed on the host (see :mod:`.host`)."""
    out = jax.ShapeDtypeStruct((num_states, emissions.shape[1]), emissions.dtype)

    def host(y):
        q = np.nanquantile(y, (np.arange(num_states) + 0.5) / num_states, axis=0)  # (K, D), observed counts
        floor = 0.1 * np.nanmean(y, axis=0) + 1e-3
        spread = np.exp(0.1 * (np.arange(num_states) / max(num_states - 1, 1) - 0.5))
        return np.log(np.maximum(q, floor) * spread[:, None]).astype(out.dtype)

    return on_host(host, out, emissions)


def _poisson_m_step(
    old_log_rates: Float[Array, "K D"], observed_weights: Float[Array, "K D"], weighted_sums: Float[Array, "K D"]
) -> Float[Array, "K D"]:
    # a rate with no observed count to learn from (zero weight) keeps its value
    empty = observed_weights <= 0
    rates = weighted_sums / jnp.where(empty, 1.0, observed_weights)
    log_rates = _log_or_minus_inf(rates)
    return jnp.where(empty, old_log_rates, log_rates)
