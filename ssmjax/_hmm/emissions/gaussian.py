r"""Multivariate Gaussian emissions, one class per covariance type (hmmlearn's four).

* :class:`GaussianEmissions`: a full covariance per state (Cholesky factors ``chol_covs``);
* :class:`TiedGaussianEmissions`: one full covariance shared by every state (``chol_cov``);
* :class:`DiagonalGaussianEmissions`: a diagonal covariance per state (``log_variances``);
* :class:`SphericalGaussianEmissions`: one variance per state (``log_variance``).

What they share is in :class:`AbstractGaussianEmissions` (statistics, M-step, initialisers);
the full and tied families share their log-densities (``_AbstractFullGaussian``), the
diagonal and spherical ones theirs (``_AbstractDiagonalGaussian``). The arithmetic is in
:mod:`ssmjax._hmm.emissions.gaussian_ops`.

Missing (NaN) entries: the diagonal and spherical families drop them (their dimensions are
independent given the state); the full and tied families use the marginal of the observed
block, and their statistics add the conditional moments of the missing entries given the
observed ones and the state, so that EM maximises the likelihood of the observed entries.
"""

from __future__ import annotations

import abc
import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, Optional

import equinox as eqx

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

from ... import _checks, _deprecation
from .base import (
    _at_real_steps,
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _branch,
    _check_some_observed,
    _check_weights,
    _fill_padding,
    _missing,
    _observed_entries,
    _patch_missing,
)
from ..priors import GaussianPrior
from .gaussian_ops import (
    _UNROLLED_SOLVE_MAX_DIM,
    GaussianStats,
    _gaussian_diag_log_prob,
    _gaussian_full_log_prob,
    _gaussian_init,
    _gaussian_m_step,
    _gaussian_marginal_log_prob,
    _gaussian_missing_stats,
    _gaussian_stats,
    _sym_cholesky,
    _unrolled_gaussian_log_density,
)


class AbstractGaussianEmissions(AbstractExponentialFamilyEmissions):
    r"""Multivariate Gaussian emissions, :math:`p(y_t \mid z_t = k) = \mathcal N(y_t; \mu_k, \Sigma_k)`:
    what the four covariance types share. Each stores its covariances its own way.

    M-step: weighted means and weighted covariances plus a ridge,
    :math:`\Sigma_k = \frac{\sum_n w_{nk}(y_n-\mu_k)(y_n-\mu_k)^\top}{\sum_n w_{nk}} + \epsilon I`
    with :math:`\epsilon` = ``min_variance`` (default ``1e-6``, in squared
    emission units; set it to the scale of your data's measurement noise if a
    state may collapse onto few points). The tied covariance pools the states' scatter
    (divided by the total weight), the diagonal one keeps the diagonal, the spherical one
    averages the diagonal. The ridge keeps covariances positive
    definite even for a state owning fewer than ``D + 1`` points. A state with
    zero total weight, or whose new covariance fails to factorise, keeps its
    previous parameters.
    """

    means: eqx.AbstractVar[Float[Array, "K D"]]
    min_variance: eqx.AbstractVar[float]
    covariance_type: eqx.AbstractClassVar[str]

    @property
    @abc.abstractmethod
    def covs(self) -> Float[Array, "K D D"]:
        """Covariance matrices ``(K, D, D)`` (dense, whatever the storage)."""

    @property
    @abc.abstractmethod
    def variances(self) -> Float[Array, "K D"]:
        """Marginal variances ``(K, D)`` (the diagonals of :attr:`covs`)."""

    @abc.abstractmethod
    def _cov_param(self) -> Array:
        """The stored covariance parameter (what the M-step updates)."""

    def _with_params(self, means, cov_param) -> "AbstractGaussianEmissions":
        """The same family with new means and stored covariance parameter."""
        return self._from_cov_param(means, cov_param, self.min_variance)

    @classmethod
    @abc.abstractmethod
    def _from_cov_param(cls, means, cov_param, min_variance: float) -> "AbstractGaussianEmissions":
        """The model with these means and stored covariance parameter."""

    @classmethod
    @abc.abstractmethod
    def _cov_param_from_full(cls, covs: Float[Array, "K D D"], counts: Float[Array, " K"]) -> Array:
        """The stored covariance parameter closest to per-state ``covs`` (weighted by ``counts``)."""

    @property
    def num_states(self) -> int:
        return self.means.shape[0]

    @property
    def emission_dim(self) -> int:
        """Emission dimension ``D``."""
        return self.means.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.emission_dim,)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.floating) or jnp.issubdtype(emissions.dtype, jnp.integer)):
            raise ValueError(f"`emissions` of a Gaussian model must be real numbers; got dtype {emissions.dtype}.")
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = xp.isinf(values)  # NaN is a missing entry
        bad = _at_real_steps(bad, mask)
        return _checks.check_values(
            emissions, bad, "`emissions` must be finite at unpadded steps (NaN for a missing entry); got inf.", at="emissions"
        )

    def _one_emission(self, emission) -> Float[Array, " D"]:
        """One step's emission, shape- and value-checked, in the model's dtype."""
        return self._checked_emission(emission, "one emission vector").astype(self.means.dtype)

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> GaussianStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled emission vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        missing = _missing(emissions, mask)
        emissions = _fill_padding(emissions, mask, 0).astype(self.means.dtype)
        weights = _check_weights(weights, n, self.num_states, mask, self.means.dtype)
        full = self.covariance_type in ("full", "tied")
        if full:
            general = lambda y, w: _gaussian_missing_stats(self.means, self.chol_covs, y, w)  # noqa: E731
        else:
            general = lambda y, w: _gaussian_stats(self.means, *_observed_entries(y)[::-1], w, full)  # noqa: E731
        observed = lambda y, w: _gaussian_stats(self.means, y, None, w, full)  # noqa: E731
        return _branch(missing, general, observed, emissions, weights)

    def parameter_counts(self) -> dict[str, int]:
        k, d = self.means.shape
        per_type = {"full": k * d * (d + 1) // 2, "tied": d * (d + 1) // 2, "diag": k * d, "spherical": k}
        return {"means": k * d, "covs": per_type[self.covariance_type]}

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        if not isinstance(prior, GaussianPrior):
            return super().log_prior(prior)
        k, d = self.means.shape
        dtype = self.means.dtype
        lam = jnp.broadcast_to(prior.means_weight.astype(dtype), (k,))
        away = self.means - jnp.broadcast_to(prior.means_prior.astype(dtype), (k, d))
        if self.covariance_type in ("diag", "spherical"):
            var = self.variances
            psi = jnp.broadcast_to(prior.covars_prior.astype(dtype), (k, d))
            a = jnp.maximum(prior.covars_weight.astype(dtype) - 1.0, 0.0)
            return jnp.sum(-0.5 * a * jnp.log(var) - (psi + lam[:, None] * away**2) / (2.0 * var))
        chol = jnp.tril(self.chol_covs)
        a = jnp.maximum(prior.covars_weight.astype(dtype) - d, 0.0)
        half_log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol, axis1=-2, axis2=-1))), axis=-1)
        white = jax.scipy.linalg.solve_triangular(chol, away[..., None], lower=True)[..., 0]
        quad = jnp.sum(white**2, axis=-1)
        tied = self.covariance_type == "tied"
        psi = jnp.broadcast_to(prior.covars_prior.astype(dtype), (k, d, d) if not tied else (d, d))
        inv_chol = jax.scipy.linalg.solve_triangular(chol, jnp.broadcast_to(jnp.eye(d, dtype=dtype), chol.shape), lower=True)
        trace = jnp.einsum("kij,kjl,kil->k", inv_chol, jnp.broadcast_to(psi, (k, d, d)), inv_chol)  # tr(Sigma^-1 Psi)
        if tied:  # one covariance: its terms once, the means' terms per state
            return -a * half_log_det[0] - 0.5 * trace[0] - 0.5 * jnp.sum(lam * quad)
        return jnp.sum(-a * half_log_det - 0.5 * trace - 0.5 * lam * quad)

    def m_step_from_stats(
        self,
        stats: GaussianStats,
        frozen: AbstractSet[str] = frozenset(),
        prior: PyTree | None = None,
    ) -> "AbstractGaussianEmissions":
        old_cov_param = self._cov_param()
        means, cov_param = _gaussian_m_step(
            self.means, old_cov_param, stats, self.min_variance, self.covariance_type, "means" in frozen,
            prior if isinstance(prior, GaussianPrior) else None,
        )
        if "means" in frozen:
            means = self.means
        if "covs" in frozen:
            cov_param = old_cov_param
        return self._with_params(means, cov_param)

    # -- initialisers ------------------------------------------------------

    @classmethod
    @_deprecation.key_last("GaussianEmissions.random", skip=1)
    @typing.no_type_check
    def random(
        cls, num_states: int, emission_dim: int, covariance_type: str | None = None,
        *, min_variance: float = 1e-6, dtype: DTypeLike | None = None, key: PRNGKeyArray,
    ) -> AbstractGaussianEmissions:
        """Means drawn from N(0, I); identity covariances.

        ``covariance_type`` is deprecated: each class has its own (``"full"`` for
        :class:`GaussianEmissions`, ``"diag"`` for :class:`DiagonalGaussianEmissions`, ...).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.GaussianEmissions.random(3, 2, key=jax.random.key(0)).covs.shape
            (3, 2, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emission_dim = _checks.positive_int("emission_dim", emission_dim)
        cls = _family(cls, covariance_type, "random")
        dtype = dtype or jnp.result_type(float)
        means = jax.random.normal(key, (num_states, emission_dim), dtype)
        eye = jnp.broadcast_to(jnp.eye(emission_dim, dtype=dtype), (num_states, emission_dim, emission_dim))
        return cls._from_cov_param(means, cls._cov_param_from_full(eye, jnp.ones(num_states, dtype)), min_variance)

    @classmethod
    @_deprecation.key_last("GaussianEmissions.from_data", skip=1)
    @typing.no_type_check
    def from_data(
        cls, emissions: Float[ArrayLike, "N D"], num_states: int, covariance_type: str | None = None,
        *, num_iters: int = 10, min_variance: float = 1e-6, key: PRNGKeyArray,
    ) -> AbstractGaussianEmissions:
        r"""k-means initialisation: k-means++ seeding, ``num_iters`` Lloyd iterations, cluster covariances.

        Seeds are drawn greedy k-means++ style (``2 + floor(log K)`` candidates
        for each next seed, drawn with probability proportional to their squared
        distance to the nearest seed; the one lowering the k-means potential most
        is kept), refined by at most ``num_iters`` Lloyd iterations (an empty cluster
        keeps its centre), on at most 16384 rows drawn at random; every row then joins
        its nearest centre. Each state's covariance is its cluster's covariance
        shrunk toward the pooled covariance with the weight of ``D + 1``
        pseudo-points, so small clusters still get well-conditioned covariances.
        The clustering runs on the host (NumPy and SciPy, seeded from ``key``), also
        under ``jax.jit`` and ``jax.vmap`` (through :func:`jax.pure_callback`).

        Args:
            emissions: pooled emissions, shape ``(N, D)`` with ``N >= num_states``; a missing
                (NaN) entry takes its dimension's mean for the clustering.
            num_states: ``K``.
            covariance_type: deprecated (each class has its own).
            num_iters: the most Lloyd iterations of a run.
            min_variance: passed to the model.
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, ssmjax
            >>> ys = jax.random.normal(jax.random.key(1), (50, 2))
            >>> ssmjax.GaussianEmissions.from_data(ys, 3, key=jax.random.key(0)).means.shape
            (3, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        cls = _family(cls, covariance_type, "from_data")
        emissions = _kmeans_points(emissions, num_states)
        model = _kmeans_start(cls, key, emissions, min_variance, num_states, num_iters)
        return _factorised(model, model, min_variance)


def _factorised(result, gaussian: AbstractGaussianEmissions, min_variance: float):
    """``result``, checked that the k-means start ``gaussian`` in it has finite covariance storage (a
    Cholesky factorisation or a logarithm fails on constant data without a ridge)."""
    xp, cov_param = _checks.host_arrays(gaussian._cov_param())
    return _checks.check_values(
        result, ~xp.isfinite(cov_param),
        f"`emissions` give no positive-definite covariance (constant data with min_variance={min_variance}?).",
    )


def _kmeans_points(emissions, num_states: int) -> Array:
    """The pooled ``(N, D)`` emissions that k-means clusters, checked; a missing (NaN) entry takes its
    dimension's mean."""
    emissions = _checks.as_float_array("emissions", emissions)
    _checks.check_shape("emissions", emissions, ("N", "D"), "pooled emission vectors")
    if emissions.shape[0] < num_states:
        raise ValueError(f"`emissions` must hold at least num_states={num_states} rows; got {emissions.shape[0]}.")
    xp, values = _checks.host_arrays(emissions)
    emissions = _checks.check_values(emissions, xp.isinf(values), "`emissions` must be finite or NaN (missing).", at="emissions")
    _check_some_observed(emissions)
    missing = xp.isnan(values)
    # missing entries take their dimension's mean: a starting point, not an estimate (traced: always applied)
    if xp is not np or xp.any(missing):
        emissions = _checks.to_device(xp.where(missing, xp.nanmean(values, axis=0), values)) if xp is np else (
            jnp.where(missing, jnp.nanmean(emissions, axis=0), emissions))
    return emissions


def _kmeans_start(cls, key, emissions, min_variance: float, num_states: int, num_iters: int):
    """``cls.from_data``'s model from :func:`_kmeans_points`: k-means centres, and cluster
    covariances in the family's storage, computed on the host for concrete data (nothing to
    compile) and traceable."""
    centers, covs, counts = _gaussian_init(key, emissions, min_variance, num_states, num_iters)
    with _checks.value_checks(False):  # a failed factorisation is checked on the result
        return cls._from_cov_param(centers, cls._cov_param_from_full(covs, counts), min_variance)


def _family(cls, covariance_type: Optional[str], method: str):
    """The class an initialiser builds: ``cls``, or for the deprecated ``covariance_type``
    argument the class of that covariance type (with a warning)."""
    if covariance_type is None:
        return cls
    families = {c.covariance_type: c for c in (GaussianEmissions, DiagonalGaussianEmissions,
                                                SphericalGaussianEmissions, TiedGaussianEmissions)}
    if covariance_type not in families:
        raise ValueError(f"`covariance_type` must be one of {sorted(families)}; got {covariance_type!r}.")
    target = families[covariance_type]
    _deprecation.warn(
        f"{cls.__name__}.{method}(..., covariance_type={covariance_type!r})", f"{target.__name__}.{method}(...)"
    )
    return target


def _check_min_variance(min_variance) -> float:
    if not (isinstance(min_variance, (int, float)) and min_variance >= 0):
        raise ValueError(f"`min_variance` must be a non-negative Python float; got {min_variance!r}.")
    return float(min_variance)


def _checked_means(means):
    means = _checks.as_float_array("means", means)
    _checks.check_shape("means", means, ("K", "D"), "one mean vector per state")
    xp, values = _checks.host_arrays(means)
    return _checks.check_values(means, ~xp.isfinite(values), "`means` must be finite.")


def _cholesky_field(name, value, chol_name, chol, shape, dtype, what):
    """The Cholesky factor of a positive-definite field, from the matrix (``name``, checked) or from
    the factor itself (``chol_name``), whichever is given."""
    if value is not None:
        value = _checks.as_float_array(name, value, dtype)
        _checks.check_shape(name, value, shape, what)
        return _sym_cholesky(_checks.check_psd(name, value))
    chol = _checks.as_float_array(chol_name, chol, dtype)
    _checks.check_shape(chol_name, chol, shape)
    return chol


class _FullOrDiagonal(type(eqx.Module)):
    """``GaussianEmissions(means, variances)`` with (K, D) variances (or ``log_variances=``) builds a
    :class:`DiagonalGaussianEmissions`, with a warning: the spelling of the one class that held both
    storages, kept for one release."""

    def __call__(cls, means, covs=None, *args, **kwargs):
        diagonal = kwargs.get("log_variances") is not None or (covs is not None and jnp.ndim(covs) == 2)
        if cls is GaussianEmissions and diagonal:
            _deprecation.warn(
                "GaussianEmissions with diagonal variances", "DiagonalGaussianEmissions(means, variances)"
            )
            return DiagonalGaussianEmissions(means, covs, *args, **kwargs)
        if cls is GaussianEmissions:
            kwargs.pop("log_variances", None)  # an explicit None from the old signature
        return super().__call__(means, covs, *args, **kwargs)


class _AbstractFullGaussian(AbstractGaussianEmissions):
    """The log-densities and sampler of the families with a full covariance per state (read
    through ``chol_covs``, ``(K, D, D)``, whatever the storage: a field or a property of the
    subclass; not an annotation here, which would make a property's value be computed whenever
    an instance is built)."""

    @property
    def covs(self) -> Float[Array, "K D D"]:
        chol = jnp.tril(self.chol_covs)
        return chol @ jnp.swapaxes(chol, -1, -2)

    @property
    def variances(self) -> Float[Array, "K D"]:
        return jnp.sum(jnp.tril(self.chol_covs) ** 2, axis=-1)

    def log_prob(self, emission: Float[ArrayLike, " D"]) -> Float[Array, " K"]:
        return _gaussian_marginal_log_prob(self.means, self.chol_covs, self._one_emission(emission))

    def _log_prob_observed(self, emission) -> Float[Array, " K"]:
        return _gaussian_full_log_prob(self.means, self.chol_covs, self._one_emission(emission))

    def _time_major_log_likelihoods(self, emissions, valid):
        if self.emission_dim > _UNROLLED_SOLVE_MAX_DIM:
            return super()._time_major_log_likelihoods(emissions, valid)
        emissions = jnp.where(valid[:, :, None], emissions, 0.0)  # garbage in the padding is no missing entry
        return _patch_missing(
            _missing(emissions, valid),
            lambda y: self._unrolled_time_major_log_likelihoods(y, valid),
            lambda y: super(_AbstractFullGaussian, self)._time_major_log_likelihoods(y, valid),
            emissions,
            lambda nan: jnp.any(nan, axis=-1)[:, None, :],  # (T, B, D) -> (T, 1, B)
        )

    def _unrolled_time_major_log_likelihoods(self, emissions, valid):
        # Elementwise arithmetic over the (T, K, B) output, one fused kernel with the batch
        # as the vectorised axis, instead of the base class's batched product over a
        # (K, D, T * B) residual and a transpose (0.6 against 2.2 ms at K = 5, D = 3,
        # B = 100, T = 1000).
        y = jnp.moveaxis(emissions, 2, 1).astype(self.means.dtype)  # (T, D, B)
        y = jnp.where(valid[:, None, :], y, 0.0)
        means = self.means[None, :, :, None]  # (1, K, D, 1)
        resid = [y[:, None, d, :] - means[:, :, d] for d in range(self.emission_dim)]  # (T, K, B) each
        return jnp.where(valid[:, None, :], _unrolled_gaussian_log_density(resid, self.chol_covs), 0.0)

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Float[Array, " D"]:
        eps = jax.random.normal(key, (self.emission_dim,), self.means.dtype)
        return self.means[state] + jnp.tril(self.chol_covs[state]) @ eps


class _AbstractDiagonalGaussian(AbstractGaussianEmissions):
    """The log-densities and sampler of the families with a diagonal covariance per state (read
    through ``log_variances``, ``(K, D)``, whatever the storage: a field or a property of the
    subclass, as ``chol_covs`` of :class:`_AbstractFullGaussian`)."""

    @property
    def covs(self) -> Float[Array, "K D D"]:
        return jax.vmap(jnp.diag)(self.variances)

    @property
    def variances(self) -> Float[Array, "K D"]:
        return jnp.exp(self.log_variances)

    @property
    def chol_covs(self) -> Float[Array, "K D D"]:
        return jax.vmap(jnp.diag)(jnp.exp(0.5 * self.log_variances))

    def log_prob(self, emission: Float[ArrayLike, " D"]) -> Float[Array, " K"]:
        return _gaussian_diag_log_prob(self.means, self.log_variances, self._one_emission(emission)[None, :])

    def _time_major_log_likelihoods(self, emissions, valid):
        # over a (T, K, D, B) virtual array, fused, never stored (see _AbstractFullGaussian)
        y = jnp.moveaxis(emissions, 2, 1).astype(self.means.dtype)  # (T, D, B)
        y = jnp.where(valid[:, None, :], y, 0.0)
        means = self.means[None, :, :, None]  # (1, K, D, 1)
        out = _gaussian_diag_log_prob(means, self.log_variances[None, :, :, None], y[:, None], axis=2)
        return jnp.where(valid[:, None, :], out, 0.0)

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Float[Array, " D"]:
        eps = jax.random.normal(key, (self.emission_dim,), self.means.dtype)
        return self.means[state] + jnp.exp(0.5 * self.log_variances[state]) * eps


class GaussianEmissions(_AbstractFullGaussian, metaclass=_FullOrDiagonal):
    r"""Gaussian emissions with full covariances, :math:`\mathcal N(y_t; \mu_k, \Sigma_k)`.

    Storage: ``means`` ``(K, D)`` and ``chol_covs`` ``(K, D, D)``: only the lower triangle is
    read, ``covs = L L^T`` (the sign of the diagonal is irrelevant), so any array value is a
    valid model. M-step and ``min_variance``: :class:`AbstractGaussianEmissions`.

    Args:
        means: ``(K, D)``.
        covs: ``(K, D, D)`` symmetric positive-definite; or pass ``chol_covs`` instead.
        min_variance: ridge added by the M-step (a static, non-negative float).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.GaussianEmissions(means=jnp.zeros((2, 3)), covs=jnp.stack([jnp.eye(3)] * 2))
        >>> model.covariance_type, model.log_likelihoods(jnp.zeros((4, 3))).shape
        ('full', (4, 2))
    """

    means: Float[Array, "K D"]
    chol_covs: Float[Array, "K D D"]
    min_variance: float = eqx.field(static=True)
    covariance_type: ClassVar[str] = "full"
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"means": ("means",), "covs": ("chol_covs",)}

    @typing.no_type_check
    def __init__(
        self,
        means: Float[ArrayLike, "K D"],
        covs: Float[ArrayLike, "K D D"] | None = None,
        *,
        chol_covs: Float[ArrayLike, "K D D"] | None = None,
        min_variance: float = 1e-6,
    ):
        if (covs is None) == (chol_covs is None):
            raise ValueError("Pass exactly one of `covs` and `chol_covs`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        k, d = means.shape
        self.chol_covs = _cholesky_field("covs", covs, "chol_covs", chol_covs, (k, d, d), means.dtype,
                                         "full covariance matrices")

    def _cov_param(self) -> Array:
        return self.chol_covs

    @classmethod
    def _from_cov_param(cls, means, cov_param, min_variance) -> "GaussianEmissions":
        return GaussianEmissions(means, chol_covs=cov_param, min_variance=min_variance)

    @classmethod
    def _cov_param_from_full(cls, covs, counts):
        return _sym_cholesky(covs)


class TiedGaussianEmissions(_AbstractFullGaussian):
    r"""Gaussian emissions with one full covariance shared by every state, :math:`\mathcal N(y_t; \mu_k, \Sigma)`.

    Storage: ``means`` ``(K, D)`` and ``chol_cov`` ``(D, D)`` (lower triangle read, ``cov = L L^T``).
    The M-step pools the states' scatter about their new means (hmmlearn's ``"tied"``);
    ``min_variance``: :class:`AbstractGaussianEmissions`.

    Args:
        means: ``(K, D)``.
        cov: ``(D, D)`` symmetric positive-definite; or pass ``chol_cov`` instead.
        min_variance: ridge added by the M-step (a static, non-negative float).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.TiedGaussianEmissions(jnp.zeros((2, 3)), jnp.eye(3))
        >>> model.covariance_type, model.covs.shape
        ('tied', (2, 3, 3))
    """

    means: Float[Array, "K D"]
    chol_cov: Float[Array, "D D"]
    min_variance: float = eqx.field(static=True)
    covariance_type: ClassVar[str] = "tied"
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"means": ("means",), "covs": ("chol_cov",)}

    @typing.no_type_check
    def __init__(
        self,
        means: Float[ArrayLike, "K D"],
        cov: Float[ArrayLike, "D D"] | None = None,
        *,
        chol_cov: Float[ArrayLike, "D D"] | None = None,
        min_variance: float = 1e-6,
    ):
        if (cov is None) == (chol_cov is None):
            raise ValueError("Pass exactly one of `cov` and `chol_cov`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        d = means.shape[1]
        self.chol_cov = _cholesky_field("cov", cov, "chol_cov", chol_cov, (d, d), means.dtype,
                                        "one covariance matrix shared by every state")

    @property
    def chol_covs(self) -> Float[Array, "K D D"]:
        return jnp.broadcast_to(self.chol_cov, (self.num_states,) + self.chol_cov.shape)

    @property
    def cov(self) -> Float[Array, "D D"]:
        """The shared covariance matrix ``(D, D)``."""
        chol = jnp.tril(self.chol_cov)
        return chol @ chol.T

    def _cov_param(self) -> Array:
        return self.chol_cov

    @classmethod
    def _from_cov_param(cls, means, cov_param, min_variance) -> "TiedGaussianEmissions":
        return TiedGaussianEmissions(means, chol_cov=cov_param, min_variance=min_variance)

    @classmethod
    def _cov_param_from_full(cls, covs, counts):
        xp = np if isinstance(covs, np.ndarray) else jnp  # the host initialiser's, or traced
        return _sym_cholesky(xp.einsum("k,kde->de", counts, covs) / xp.sum(counts))


class DiagonalGaussianEmissions(_AbstractDiagonalGaussian):
    r"""Gaussian emissions with diagonal covariances, :math:`\mathcal N(y_t; \mu_k, \mathrm{diag}(\sigma^2_k))`.

    Storage: ``means`` ``(K, D)`` and ``log_variances`` ``(K, D)``, so any array value is a valid
    model. M-step and ``min_variance``: :class:`AbstractGaussianEmissions`.

    Args:
        means: ``(K, D)``.
        variances: ``(K, D)`` positive variances; or pass ``log_variances`` instead.
        min_variance: ridge added by the M-step (a static, non-negative float).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.DiagonalGaussianEmissions(means=jnp.zeros((2, 3)), variances=jnp.ones((2, 3)))
        >>> model.covariance_type, model.log_likelihoods(jnp.zeros((4, 3))).shape
        ('diag', (4, 2))
    """

    means: Float[Array, "K D"]
    log_variances: Float[Array, "K D"]
    min_variance: float = eqx.field(static=True)
    covariance_type: ClassVar[str] = "diag"
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"means": ("means",), "covs": ("log_variances",)}

    @typing.no_type_check
    def __init__(
        self,
        means: Float[ArrayLike, "K D"],
        variances: Float[ArrayLike, "K D"] | None = None,
        *,
        log_variances: Float[ArrayLike, "K D"] | None = None,
        min_variance: float = 1e-6,
    ):
        if (variances is None) == (log_variances is None):
            raise ValueError("Pass exactly one of `variances` and `log_variances`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        k, d = means.shape
        if variances is not None:
            self.log_variances = jnp.log(_checked_variances(variances, (k, d), means.dtype, "one variance per state and dimension"))
        else:
            log_variances = _checks.as_float_array("log_variances", log_variances, means.dtype)
            _checks.check_shape("log_variances", log_variances, (k, d))
            self.log_variances = log_variances

    def _cov_param(self) -> Array:
        return self.log_variances

    @classmethod
    def _from_cov_param(cls, means, cov_param, min_variance) -> "DiagonalGaussianEmissions":
        return DiagonalGaussianEmissions(means, log_variances=cov_param, min_variance=min_variance)

    @classmethod
    def _cov_param_from_full(cls, covs, counts):
        xp = np if isinstance(covs, np.ndarray) else jnp  # as TiedGaussianEmissions'
        return _log_variances(xp.diagonal(covs, axis1=-2, axis2=-1))


class SphericalGaussianEmissions(_AbstractDiagonalGaussian):
    r"""Gaussian emissions with one variance per state, :math:`\mathcal N(y_t; \mu_k, \sigma^2_k I)`.

    Storage: ``means`` ``(K, D)`` and ``log_variance`` ``(K,)``. The M-step averages the
    per-dimension variances about the new means (hmmlearn's ``"spherical"``; with missing
    entries, over the observed ones); ``min_variance``: :class:`AbstractGaussianEmissions`.

    Args:
        means: ``(K, D)``.
        variances: ``(K,)`` positive variances; or pass ``log_variance`` instead.
        min_variance: ridge added by the M-step (a static, non-negative float).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.SphericalGaussianEmissions(jnp.zeros((2, 3)), jnp.array([1.0, 4.0]))
        >>> model.covariance_type, model.variances.shape
        ('spherical', (2, 3))
    """

    means: Float[Array, "K D"]
    log_variance: Float[Array, " K"]
    min_variance: float = eqx.field(static=True)
    covariance_type: ClassVar[str] = "spherical"
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"means": ("means",), "covs": ("log_variance",)}

    @typing.no_type_check
    def __init__(
        self,
        means: Float[ArrayLike, "K D"],
        variances: Float[ArrayLike, " K"] | None = None,
        *,
        log_variance: Float[ArrayLike, " K"] | None = None,
        min_variance: float = 1e-6,
    ):
        if (variances is None) == (log_variance is None):
            raise ValueError("Pass exactly one of `variances` and `log_variance`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        k = means.shape[0]
        if variances is not None:
            self.log_variance = jnp.log(_checked_variances(variances, (k,), means.dtype, "one variance per state"))
        else:
            log_variance = _checks.as_float_array("log_variance", log_variance, means.dtype)
            _checks.check_shape("log_variance", log_variance, (k,))
            self.log_variance = log_variance

    @property
    def log_variances(self) -> Float[Array, "K D"]:
        return jnp.broadcast_to(self.log_variance[:, None], self.means.shape)

    def _cov_param(self) -> Array:
        return self.log_variance

    @classmethod
    def _from_cov_param(cls, means, cov_param, min_variance) -> "SphericalGaussianEmissions":
        return SphericalGaussianEmissions(means, log_variance=cov_param, min_variance=min_variance)

    @classmethod
    def _cov_param_from_full(cls, covs, counts):
        xp = np if isinstance(covs, np.ndarray) else jnp  # as TiedGaussianEmissions'
        return _log_variances(xp.mean(xp.diagonal(covs, axis1=-2, axis2=-1), axis=-1))


def _log_variances(variances):
    """``log(variances)``, NumPy's for the host initialiser's arrays; a zero variance (constant data
    without a ridge) gives ``-inf`` quietly in both, for the check on the result (``_factorised``)."""
    if isinstance(variances, np.ndarray):
        with np.errstate(divide="ignore"):
            return np.log(variances)
    return jnp.log(variances)


def _checked_variances(variances, shape, dtype, what):
    variances = _checks.as_float_array("variances", variances, dtype)
    _checks.check_shape("variances", variances, shape, what)
    xp, values = _checks.host_arrays(variances)
    bad = (values <= 0) | ~xp.isfinite(values)
    return _checks.check_values(variances, bad, "`variances` must be finite and positive.")
