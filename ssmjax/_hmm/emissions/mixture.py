r"""Gaussian-mixture emissions (GMM-HMM): a mixture of ``M`` Gaussians per state.

:class:`GaussianMixtureEmissions` holds the mixture weights (``mixture_logits``, ``(K, M)``)
and the ``K * M`` components as one Gaussian emission model of any covariance type
(component ``m`` of state ``k`` is its state ``k * M + m``), so that the components' log-densities,
missing entries, statistics and M-step are the Gaussian families' own.

EM: given the state responsibilities ``w_nk``, the statistics split each step over the state's
components by their posterior :math:`r_{nkm} \propto \pi_{km} \mathcal N(y_n; \mu_{km}, \Sigma_{km})`;
the components then take the Gaussian M-step with weights :math:`w_{nk} r_{nkm}`, and the mixture
weights are the normalised :math:`\sum_n w_{nk} r_{nkm}`. Under a :class:`~ssmjax.GaussianMixturePrior`
both are the posterior modes instead (a Dirichlet prior on the weights, a
:class:`~ssmjax.GaussianPrior` on the components).
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

from ... import _checks
from ..._fit.compiler import fast_compile_jit
from ..priors import DirichletPrior, GaussianMixturePrior, check_broadcasts
from .base import (
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _check_weights,
    _fill_padding,
    _free_simplex_entries,
    _missing,
    _normalised_logits,
    _simplex_logits,
    softmax_rows,
)
from .gaussian import AbstractGaussianEmissions, DiagonalGaussianEmissions, _factorised, _kmeans_points, _kmeans_start
from .host import generator, key_seed, on_host


class GaussianMixtureStats(NamedTuple):
    """Sufficient statistics of :class:`GaussianMixtureEmissions`.

    Attributes:
        mixture_counts: ``(K, M)``, ``sum_n w_nk r_nkm``.
        components: the components' statistics with weights ``w_nk r_nkm`` (their ``suff_stats``).
    """

    mixture_counts: Array
    components: PyTree[Array]


def _logsumexp_components(x: Float[Array, "..."], axis: int = -1) -> Float[Array, "..."]:
    """``logsumexp(x, axis)`` over the few (static) components on ``axis``, as elementwise operations
    on their slices: XLA:CPU's reductions over a short axis are slow (the mixture's
    log-likelihoods of 10^5 steps, K = 5, M = 2: 8.4 ms against 3.1 ms for its components'). The
    shift carries no gradient, as in :func:`jax.nn.logsumexp`; all ``-inf`` gives ``-inf``."""
    parts = [jax.lax.index_in_dim(x, m, axis, keepdims=False) for m in range(x.shape[axis])]
    peak = functools.reduce(jnp.maximum, parts)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    return jnp.log(functools.reduce(jnp.add, [jnp.exp(p - shift) for p in parts])) + shift


def _responsibilities(joint: Float[Array, "..."], axis: int):
    """Per-state log-densities and the components' posterior ``r`` from the joint log-densities
    ``log pi_km + log N(y; mu_km, Sigma_km)`` (components on ``axis``); ``r = 0`` where the joint is ``-inf``."""
    total = _logsumexp_components(joint, axis)
    within = jnp.exp(joint - jnp.expand_dims(total, axis))
    return total, jnp.where(jnp.isfinite(joint), within, 0.0)


@fast_compile_jit
def _mixture_start(cls, family, states, eps, spread, min_variance):
    """:meth:`GaussianMixtureEmissions.from_data`'s model from the states' k-means start and the standard
    normal draws ``eps`` ``(K, M, D)``, one compiled program."""
    num_states, num_mix, d = eps.shape
    means = states.means[:, None, :] + spread * jnp.sqrt(states.variances)[:, None, :] * eps
    covs = jnp.repeat(states.covs, num_mix, axis=0)  # (K*M, D, D), state-major
    cov_param = family._cov_param_from_full(covs, jnp.ones(num_states * num_mix, covs.dtype))
    with _checks.value_checks(False):  # the states' covariances are checked on the result
        components = family._from_cov_param(means.reshape(num_states * num_mix, d), cov_param, min_variance)
        logits = jnp.full((num_states, num_mix), -math.log(num_mix), means.dtype)
        return cls(mixture_logits=logits, components=components)


class GaussianMixtureEmissions(AbstractExponentialFamilyEmissions):
    r"""A mixture of ``M`` Gaussians per state: :math:`p(y_t \mid z_t = k) = \sum_m \pi_{km} \mathcal N(y_t; \mu_{km}, \Sigma_{km})`.

    Args:
        weights: ``(K, M)`` mixture weights, rows summing to one.
        components: a Gaussian emission model with ``K * M`` states (any of the four covariance
            types; :class:`~ssmjax.TiedGaussianEmissions` ties one covariance across every
            component of every state); component ``m`` of state ``k`` is its state ``k * M + m``.
        mixture_logits: alternatively, unconstrained ``(K, M)`` logits (keyword only).

    Missing (NaN) entries are the components' business: each component's density is that of
    the observed entries, and so is the mixture's.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> components = ssmjax.DiagonalGaussianEmissions(jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 2)))
        >>> model = ssmjax.GaussianMixtureEmissions(jnp.array([[0.5, 0.5], [0.9, 0.1]]), components)
        >>> model.num_states, model.num_mix, model.log_likelihoods(jnp.zeros((3, 2))).shape
        (2, 2, (3, 2))
    """

    mixture_logits: Float[Array, "K M"]
    components: AbstractGaussianEmissions
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "weights": ("mixture_logits",),
        "components": ("components",),
    }

    @typing.no_type_check
    def __init__(
        self,
        weights: Float[ArrayLike, "K M"] | None = None,
        components: AbstractGaussianEmissions | None = None,
        *,
        mixture_logits: Float[ArrayLike, "K M"] | None = None,
    ):
        if (weights is None) == (mixture_logits is None):
            raise ValueError("Pass exactly one of `weights` and `mixture_logits`.")
        if not isinstance(components, AbstractGaussianEmissions):
            raise ValueError(
                f"`components` must be a Gaussian emission model (K * M states); got {type(components).__name__}."
            )
        if weights is not None:
            mixture_logits = _simplex_logits("weights", weights, "one row of mixture weights per state")
        else:
            mixture_logits = _checks.as_float_array("mixture_logits", mixture_logits)
            _checks.check_shape("mixture_logits", mixture_logits, ("K", "M"))
        k, m = mixture_logits.shape
        if components.num_states != k * m:
            raise ValueError(
                f"`components` must have K * M = {k * m} states (component m of state k is state k * M + m); "
                f"got {components.num_states}."
            )
        self.mixture_logits, self.components = mixture_logits, components

    @property
    def num_states(self) -> int:
        return self.mixture_logits.shape[0]

    @property
    def num_mix(self) -> int:
        """Number of mixture components per state ``M``."""
        return self.mixture_logits.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return self.components.emission_shape

    @property
    def weights(self) -> Float[Array, "K M"]:
        """Mixture weights ``(K, M)``."""
        return softmax_rows(self.mixture_logits)

    @property
    def means(self) -> Float[Array, "K M D"]:
        """Component means ``(K, M, D)``."""
        return self.components.means.reshape(self.num_states, self.num_mix, -1)

    @property
    def covs(self) -> Float[Array, "K M D D"]:
        """Component covariances ``(K, M, D, D)``."""
        d = self.components.emission_dim
        return self.components.covs.reshape(self.num_states, self.num_mix, d, d)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        return self.components.check_emissions(emissions, mask)

    def _mix(self, component_lls):
        """Per-state log-densities from the components' ``(..., K * M)`` (the last axis)."""
        shape = component_lls.shape[:-1] + (self.num_states, self.num_mix)
        return _logsumexp_components(component_lls.reshape(shape) + jax.nn.log_softmax(self.mixture_logits, axis=-1))

    def log_prob(self, emission: Float[ArrayLike, " D"]) -> Float[Array, " K"]:
        return self._mix(self.components.log_prob(emission))

    def _log_prob_observed(self, emission) -> Float[Array, " K"]:
        return self._mix(self.components._log_prob_observed(emission))

    def _time_major_log_likelihoods(self, emissions, valid):
        return self._time_major_terms(emissions, valid)[0]

    def _time_major_terms(self, emissions, valid):
        # the components' posterior r (T, K, M, B) is a by-product, reused by the statistics
        components = self.components._time_major_log_likelihoods(emissions, valid)  # (T, K*M, B)
        num_steps, _, num_seq = components.shape
        log_weights = jax.nn.log_softmax(self.mixture_logits, axis=-1)[None, :, :, None]
        joint = components.reshape(num_steps, self.num_states, self.num_mix, num_seq) + log_weights
        lls, within = _responsibilities(joint, axis=2)
        return jnp.where(valid[:, None, :], lls, 0.0), within

    def _time_major_stats(self, emissions, valid, smoothed, within):
        split = jnp.swapaxes(smoothed, 1, 2)[:, :, None, :] * within  # (T, K, M, B): w_nk r_nkm
        num_steps, num_seq = valid.shape
        flat = (num_steps * num_seq,)
        rows = jnp.swapaxes(split.reshape(num_steps, -1, num_seq), 1, 2).reshape(flat + (-1,))  # (T * B, K * M)
        return GaussianMixtureStats(
            mixture_counts=split.sum((0, 3)),
            components=self.components.suff_stats(emissions.reshape(flat + emissions.shape[2:]), rows, valid.reshape(flat)),
        )

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Float[Array, " D"]:
        key_mix, key_component = jax.random.split(key)
        m = jax.random.categorical(key_mix, self.mixture_logits[state])
        return self.components.sample(state * self.num_mix + m, key=key_component)

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> GaussianMixtureStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N",) + tuple(self.emission_shape), "pooled emission vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        dtype = self.mixture_logits.dtype
        weights = _check_weights(weights, n, self.num_states, mask, dtype)
        filled = _fill_padding(emissions, mask, 0).astype(dtype)
        with _checks.value_checks(False):  # checked above
            component_lls = self.components._stacked_log_probs(filled, _missing(filled, mask))  # (N, K*M)
        joint = component_lls.reshape(n, self.num_states, self.num_mix) + jax.nn.log_softmax(self.mixture_logits, axis=-1)
        _, within = _responsibilities(joint, axis=-1)  # r_nkm
        split = (weights[:, :, None] * within).reshape(n, -1)  # w_nk r_nkm
        return GaussianMixtureStats(
            mixture_counts=split.sum(0).reshape(self.num_states, self.num_mix),
            components=self.components.suff_stats(emissions, split, mask),
        )

    def parameter_counts(self) -> dict[str, int]:
        return {
            "weights": _free_simplex_entries(self.mixture_logits),
            "components": sum(self.components.parameter_counts().values()),
        }

    def _split_prior(self, prior):
        """``(weights prior, components prior)`` of ``prior``, checked against this model's shapes."""
        if isinstance(prior, DirichletPrior):  # on the mixture weights only
            prior = GaussianMixturePrior(weights=prior)
        if not isinstance(prior, GaussianMixturePrior):
            return None
        k, m, d = self.num_states, self.num_mix, self.components.emission_dim
        check_broadcasts("prior.emissions.weights.concentration", prior.weights.concentration, (k, m))
        gaussian = prior.components
        if gaussian is not None:
            check_broadcasts("prior.emissions.components.means_prior", gaussian.means_prior, (k * m, d))
            check_broadcasts("prior.emissions.components.means_weight", gaussian.means_weight, (k * m,))
            kind = self.components.covariance_type
            psi_shape = {"full": (k * m, d, d), "tied": (d, d)}.get(kind, (k * m, d))
            check_broadcasts("prior.emissions.components.covars_prior", gaussian.covars_prior, psi_shape)
        return prior.weights, gaussian

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        """The weights' Dirichlet log-density plus the components' :class:`~ssmjax.GaussianPrior` term,
        under a :class:`~ssmjax.GaussianMixturePrior` (or a :class:`~ssmjax.DirichletPrior` on the weights)."""
        split = self._split_prior(prior)
        if split is None:
            return super().log_prior(prior)
        weights, gaussian = split
        log_weights = weights.log_prob(jax.nn.log_softmax(self.mixture_logits, axis=-1))
        return log_weights + self.components.log_prior(gaussian)

    def m_step_from_stats(
        self,
        stats: GaussianMixtureStats,
        frozen: AbstractSet[str] = frozenset(),
        prior: PyTree | None = None,
    ) -> "GaussianMixtureEmissions":
        split = self._split_prior(prior)
        weights_prior, components_prior = (None, None) if split is None else split
        logits = self.mixture_logits
        if "weights" not in frozen:
            if weights_prior is not None:
                logits = weights_prior.mode_logits(stats.mixture_counts, logits)
            else:
                logits = _normalised_logits(stats.mixture_counts, logits)
        components = self.components
        if "components" not in frozen:
            components = components.m_step_from_stats(
                stats.components, frozen={"means", "covs"} & set(frozen), prior=components_prior
            )
        return GaussianMixtureEmissions(mixture_logits=logits, components=components)

    # -- initialisers ------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def from_data(
        cls, emissions: Float[ArrayLike, "N D"], num_states: int, *, num_mix: int = 2,
        family: type[AbstractGaussianEmissions] = DiagonalGaussianEmissions, spread: float = 0.5,
        num_iters: int = 10, min_variance: float = 1e-6, key: PRNGKeyArray,
    ) -> GaussianMixtureEmissions:
        r"""States by the family's k-means initialiser; each state's ``M`` components at its mean
        plus ``spread`` times its standard deviations times a standard normal draw, with the
        state's covariance; equal mixture weights.

        Args:
            emissions: pooled emissions, shape ``(N, D)``.
            num_states: ``K``.
            num_mix: ``M``.
            family: the components' Gaussian class (default diagonal, as hmmlearn's GMMHMM).
            spread: how far the components start from their state's mean, in standard deviations.
            num_iters: the states' Lloyd iterations (as the family's ``from_data``).
            min_variance: the components' ridge (as the family's ``from_data``).
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, ssmjax
            >>> ys = jax.random.normal(jax.random.key(1), (60, 2))
            >>> ssmjax.GaussianMixtureEmissions.from_data(ys, 2, num_mix=3, key=jax.random.key(0)).means.shape
            (2, 3, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        num_mix = _checks.positive_int("num_mix", num_mix)
        points = _kmeans_points(emissions, num_states)
        states = _kmeans_start(family, key, points, min_variance, num_states, num_iters)
        # the components' spread drawn on the host too (see .host): a threefry draw in the start's program
        # compiled a dozen kernels
        shape = jax.ShapeDtypeStruct((num_states, num_mix, states.emission_dim), states.means.dtype)
        draw = lambda seed: generator(seed, 1).standard_normal(shape.shape).astype(shape.dtype)  # noqa: E731
        eps = on_host(draw, shape, key_seed(key))
        model = _mixture_start(cls, family, states, eps, spread, min_variance)
        return _factorised(model, model.components, min_variance)
