r"""Multivariate Gaussian emissions, with full or diagonal covariances.

:class:`GaussianEmissions` (``means`` and Cholesky factors ``chol_covs``) and
:class:`DiagonalGaussianEmissions` (``means`` and ``log_variances``), what they share
(:class:`AbstractGaussianEmissions`: the statistics, the M-step, the initialisers), the
sufficient statistics :class:`GaussianStats` (moments centred on the current means), and the
private functions they are built from: the log-densities (per step, and unrolled over a
time-major batch), the k-means initialiser, the statistics and the M-step.

Missing (NaN) entries: the diagonal family drops them (its dimensions are independent
given the state); the full family uses the marginal of the observed block, and its
statistics add the conditional moments of the missing entries given the observed ones and
the state, so that EM maximises the likelihood of the observed entries.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Shaped

from ... import _checks, _deprecation
from .base import (
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _branch,
    _check_some_observed,
    _check_weights,
    _fill_padding,
    _keep_where_empty,
    _missing,
    _observed_entries,
    _patch_missing,
)


@jax.jit
def _sym_cholesky(covs: Float[Array, "*K D D"]) -> Float[Array, "*K D D"]:
    """Cholesky factor of the symmetric part, one compiled program (eagerly: four)."""
    return jnp.linalg.cholesky(0.5 * (covs + jnp.swapaxes(covs, -1, -2)))


class GaussianStats(NamedTuple):
    r"""Sufficient statistics of :class:`GaussianEmissions`, centred on the model's current means ``m``.

    Attributes:
        sum_weights: ``(K,)``, :math:`\sum_n w_{nk}`.
        weighted_sums: ``(K, D)``, :math:`\sum_n w_{nk} (y_n - m_k)`.
        weighted_outer: ``(K, D, D)`` (full) or ``(K, D)`` (diag),
            :math:`\sum_n w_{nk} (y_n - m_k)(y_n - m_k)^\top` or its diagonal.
        dim_weights: ``(K, D)``, the weight behind each dimension's sums: ``sum_weights`` in every
            column, except that the diagonal family sums each dimension over the steps where it
            is observed.

    With missing entries the full family's sums are expectations given the observed entries
    and the state (:math:`\mathbb E[y_n - m_k]` and :math:`\mathbb E[(y_n - m_k)(y_n - m_k)^\top]`,
    which include the conditional covariance of the missing block); the diagonal family's
    leave the missing entries out.
    """

    sum_weights: Array
    weighted_sums: Array
    weighted_outer: Array
    dim_weights: Array


# Largest D for which the full-covariance log-likelihoods of a batch are forward
# substitution unrolled over D: D (D + 1) / 2 multiply-adds per step and state in one
# fused elementwise kernel, no library call. Above it, the generic per-step path.
_UNROLLED_SOLVE_MAX_DIM = 8


def _gaussian_full_log_prob(
    means: Float[Array, "K D"], chol_covs: Float[Array, "K D D"], emission: Float[Array, " D"]
) -> Float[Array, " K"]:
    # Whitening matrices L_k^{-1}, computed from the parameters alone: under
    # ``jax.vmap`` over emissions (``log_likelihoods``) they are computed once, and
    # z = L_k^{-1} (y - mu_k) for every step and state is one batched product
    # instead of a triangular solve per step.
    chol = jnp.tril(chol_covs)
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    diff = emission[None, :] - means
    z = jnp.einsum("kde,ke->kd", inv_chol, diff)
    log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol, axis1=-2, axis2=-1))), axis=-1)
    dim = means.shape[-1]
    return -0.5 * jnp.sum(z**2, axis=-1) - log_det - 0.5 * dim * math.log(2 * math.pi)


def _gaussian_marginal_log_prob(
    means: Float[Array, "K D"], chol_covs: Float[Array, "K D D"], emission: Float[Array, " D"]
) -> Float[Array, " K"]:
    r"""Log-density of the observed entries of ``emission`` (NaN = missing): the marginal
    :math:`\mathcal N(y_o; \mu_{k,o}, \Sigma_{k,oo})`, ``0`` when every entry is missing.

    With :math:`M` the 0/1 diagonal of observed entries, :math:`S = M \Sigma M + (I - M)` is
    :math:`\Sigma_{oo}` on the observed block and the identity elsewhere, so its Cholesky
    factor gives the determinant and the whitened residual of the observed block in fixed shapes.
    Up to ``_UNROLLED_SOLVE_MAX_DIM`` dimensions the factorisation is unrolled into elementwise
    arithmetic (:func:`_masked_whitening`), which XLA fuses over every step and state. A LAPACK
    factorisation per step and state needs ``(N, K, D, D)`` buffers, and a program that holds
    them runs slower even where the branch computing them is not taken (measured: vmapped
    log-likelihoods of complete data, B = 256, T = 1000, K = 5, D = 3, 6.3 against 14 ms).
    """
    observed, y = _observed_entries(emission)
    chol = jnp.tril(chol_covs)
    covs = chol @ jnp.swapaxes(chol, -1, -2)
    resid = jnp.where(observed, y[None, :] - means, 0.0)  # (K, D)
    dim = means.shape[-1]
    if dim <= _UNROLLED_SOLVE_MAX_DIM:
        quad, log_det = _masked_whitening(
            [resid[:, i] for i in range(dim)], [[covs[:, i, j] for j in range(dim)] for i in range(dim)], list(observed)
        )
    else:
        both = observed[:, None] & observed[None, :]
        s = jnp.where(both, covs, jnp.diag(jnp.where(observed, 0.0, 1.0)).astype(covs.dtype))
        chol_s = jnp.linalg.cholesky(s)
        z = jax.scipy.linalg.solve_triangular(chol_s, resid[..., None], lower=True)[..., 0]
        quad = jnp.sum(z**2, axis=-1)
        log_det = jnp.sum(jnp.log(jnp.diagonal(chol_s, axis1=-2, axis2=-1)), axis=-1)
    num_observed = jnp.sum(observed).astype(covs.dtype)
    return -0.5 * quad - log_det - 0.5 * num_observed * math.log(2 * math.pi)


def _masked_whitening(resid, cov, observed):
    r"""``(r^T S^{-1} r, log |L|)`` with :math:`S = M \Sigma M + (I - M)`, unrolled over the dimensions.

    ``resid[i]``, ``cov[i][j]`` and ``observed[i]`` are arrays that broadcast together (one
    per dimension or pair), ``resid`` zero at missing entries. The Cholesky factor of ``S``
    and the forward substitution are written out entry by entry, so every operation is
    elementwise over the broadcast shape.
    """
    dim = len(resid)
    chol = [[None] * dim for _ in range(dim)]
    z, quad, log_det = [], 0.0, 0.0
    for j in range(dim):
        diag = jnp.where(observed[j], cov[j][j], 1.0)
        for m in range(j):
            diag = diag - chol[j][m] ** 2
        chol[j][j] = jnp.sqrt(diag)
        inv = 1.0 / chol[j][j]
        for i in range(j + 1, dim):
            entry = jnp.where(observed[i] & observed[j], cov[i][j], 0.0)
            for m in range(j):
                entry = entry - chol[i][m] * chol[j][m]
            chol[i][j] = entry * inv
        r = resid[j]
        for m in range(j):
            r = r - chol[j][m] * z[m]
        z.append(r * inv)
        quad = quad + z[j] ** 2
        log_det = log_det + jnp.log(chol[j][j])
    return quad, log_det


def _gaussian_diag_log_prob(means, log_variances, emissions, axis: int = -1):
    """Diagonal-Gaussian log-densities; ``means`` and ``log_variances`` broadcast against
    ``emissions``, with the emission dimension D on ``axis`` (summed out). Missing (NaN)
    entries drop out."""
    observed, emissions = _observed_entries(emissions)
    diff = emissions - means
    terms = diff**2 * jnp.exp(-log_variances) + log_variances + math.log(2 * math.pi)
    return -0.5 * jnp.sum(jnp.where(observed, terms, 0.0), axis=axis)


class AbstractGaussianEmissions(AbstractExponentialFamilyEmissions):
    r"""Multivariate Gaussian emissions, :math:`p(y_t \mid z_t = k) = \mathcal N(y_t; \mu_k, \Sigma_k)`:
    what the full (:class:`GaussianEmissions`) and diagonal (:class:`DiagonalGaussianEmissions`)
    families share. Each stores its covariances its own way (Cholesky factors or log-variances).

    M-step: weighted means and weighted covariances plus a ridge,
    :math:`\Sigma_k = \frac{\sum_n w_{nk}(y_n-\mu_k)(y_n-\mu_k)^\top}{\sum_n w_{nk}} + \epsilon I`
    with :math:`\epsilon` = ``min_variance`` (default ``1e-6``, in squared
    emission units; set it to the scale of your data's measurement noise if a
    state may collapse onto few points). The ridge keeps covariances positive
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

    @abc.abstractmethod
    def _with_params(self, means, cov_param) -> "AbstractGaussianEmissions":
        """The same family with new means and stored covariance parameter."""

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

    def check_emissions(self, emissions, mask=None) -> Array:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.floating) or jnp.issubdtype(emissions.dtype, jnp.integer)):
            raise ValueError(f"`emissions` of a Gaussian model must be real numbers; got dtype {emissions.dtype}.")
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = xp.isinf(values)  # NaN is a missing entry
        if mask is not None:
            bad = bad & mask.reshape(mask.shape + (1,) * (bad.ndim - 1))
        return _checks.check_values(
            emissions, bad, "`emissions` must be finite at unpadded steps (NaN for a missing entry); got inf."
        )

    def _one_emission(self, emission) -> Float[Array, " D"]:
        """One step's emission, shape- and value-checked, in the model's dtype."""
        emission = _checks.to_device(emission)
        _checks.check_shape("emission", emission, (self.emission_dim,), "one emission vector")
        return self.check_emissions(emission[None])[0].astype(self.means.dtype)

    def suff_stats(self, emissions, weights, mask=None) -> GaussianStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled emission vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        missing = _missing(emissions, mask)
        emissions = _fill_padding(emissions, mask, 0).astype(self.means.dtype)
        weights = _check_weights(weights, n, self.num_states, mask, self.means.dtype)
        full = self.covariance_type == "full"
        if full:
            general = lambda y, w: _gaussian_missing_stats(self.means, self._cov_param(), y, w)  # noqa: E731
        else:
            general = lambda y, w: _gaussian_stats(self.means, *_observed_entries(y)[::-1], w, full)  # noqa: E731
        observed = lambda y, w: _gaussian_stats(self.means, y, None, w, full)  # noqa: E731
        return _branch(missing, general, observed, emissions, weights)

    def m_step_from_stats(self, stats: GaussianStats, frozen=frozenset()) -> "AbstractGaussianEmissions":
        old_cov_param = self._cov_param()
        full = self.covariance_type == "full"
        means, cov_param = _gaussian_m_step(
            self.means, old_cov_param, stats.sum_weights if full else stats.dim_weights, stats.weighted_sums,
            stats.weighted_outer, self.min_variance, full, "means" in frozen,
        )
        if "means" in frozen:
            means = self.means
        if "covs" in frozen:
            cov_param = old_cov_param
        return self._with_params(means, cov_param)

    # -- initialisers ------------------------------------------------------

    @classmethod
    @_deprecation.key_last("GaussianEmissions.random", skip=1)
    def random(
        cls, num_states: int, emission_dim: int, covariance_type: Optional[str] = None,
        *, min_variance: float = 1e-6, dtype=None, key: PRNGKeyArray,
    ) -> "AbstractGaussianEmissions":
        """Means drawn from N(0, I); identity covariances.

        ``covariance_type`` is deprecated: each class has its own (``"full"`` for
        :class:`GaussianEmissions`, ``"diag"`` for :class:`DiagonalGaussianEmissions`).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.GaussianEmissions.random(3, 2, key=jax.random.key(0)).covs.shape
            (3, 2, 2)
        """
        cls = _family(cls, covariance_type, "random")
        dtype = dtype or jnp.result_type(float)
        means = jax.random.normal(key, (num_states, emission_dim), dtype)
        covs = _identity_covs(num_states, emission_dim, cls.covariance_type, dtype)
        return cls(means, covs, min_variance=min_variance)

    @classmethod
    @_deprecation.key_last("GaussianEmissions.from_data", skip=1)
    def from_data(
        cls, emissions, num_states: int, covariance_type: Optional[str] = None,
        *, num_iters: int = 10, min_variance: float = 1e-6, key: PRNGKeyArray,
    ) -> "AbstractGaussianEmissions":
        r"""k-means initialisation: k-means++ seeding, ``num_iters`` Lloyd iterations, cluster covariances.

        Seeds are drawn greedy k-means++ style (``2 + floor(log K)`` candidates
        for each next seed, drawn with probability proportional to their squared
        distance to the nearest seed; the one lowering the k-means potential most
        is kept), refined by
        Lloyd iterations compiled in one ``lax.fori_loop`` (an empty cluster
        keeps its centre). Each state's covariance is its cluster's covariance
        shrunk toward the pooled covariance with the weight of ``D + 1``
        pseudo-points, so small clusters still get well-conditioned covariances.

        Args:
            emissions: pooled emissions, shape ``(N, D)`` with ``N >= num_states``; a missing
                (NaN) entry takes its dimension's mean for the clustering.
            num_states: ``K``.
            covariance_type: deprecated (each class has its own).
            num_iters: number of Lloyd iterations.
            min_variance: passed to the model.
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, ssmjax
            >>> ys = jax.random.normal(jax.random.key(1), (50, 2))
            >>> ssmjax.GaussianEmissions.from_data(ys, 3, key=jax.random.key(0)).means.shape
            (3, 2)
        """
        cls = _family(cls, covariance_type, "from_data")
        emissions = _checks.as_float_array("emissions", emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled emission vectors")
        n, d = emissions.shape
        if n < num_states:
            raise ValueError(f"`emissions` must hold at least num_states={num_states} rows; got {n}.")
        xp, values = _checks.host_arrays(emissions)
        emissions = _checks.check_values(emissions, xp.isinf(values), "`emissions` must be finite or NaN (missing).")
        _check_some_observed(emissions)
        # missing entries take their dimension's mean: a starting point, not an estimate
        emissions = jnp.where(jnp.isnan(emissions), jnp.nanmean(emissions, axis=0), emissions)
        full = cls.covariance_type == "full"
        centers, covs = _gaussian_init(key, emissions, min_variance, num_states, num_iters, full)
        return cls(centers, covs, min_variance=min_variance)


def _family(cls, covariance_type: Optional[str], method: str):
    """The class an initialiser builds: ``cls``, or for the deprecated ``covariance_type``
    argument the class of that covariance type (with a warning)."""
    if covariance_type is None:
        return cls
    families = {"full": GaussianEmissions, "diag": DiagonalGaussianEmissions}
    if covariance_type not in families:
        raise ValueError(f"`covariance_type` must be 'full' or 'diag'; got {covariance_type!r}.")
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


class GaussianEmissions(AbstractGaussianEmissions, metaclass=_FullOrDiagonal):
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

    def __init__(self, means, covs=None, *, chol_covs=None, min_variance: float = 1e-6):
        if (covs is None) == (chol_covs is None):
            raise ValueError("Pass exactly one of `covs` and `chol_covs`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        k, d = means.shape
        if covs is not None:
            covs = _checks.as_float_array("covs", covs, means.dtype)
            _checks.check_shape("covs", covs, (k, d, d), "full covariance matrices")
            self.chol_covs = _sym_cholesky(_checks.check_psd("covs", covs))
        else:
            chol_covs = _checks.as_float_array("chol_covs", chol_covs, means.dtype)
            _checks.check_shape("chol_covs", chol_covs, (k, d, d))
            self.chol_covs = chol_covs

    @property
    def covs(self) -> Float[Array, "K D D"]:
        chol = jnp.tril(self.chol_covs)
        return chol @ jnp.swapaxes(chol, -1, -2)

    @property
    def variances(self) -> Float[Array, "K D"]:
        return jnp.sum(jnp.tril(self.chol_covs) ** 2, axis=-1)

    def _cov_param(self) -> Array:
        return self.chol_covs

    def _with_params(self, means, cov_param) -> "GaussianEmissions":
        return GaussianEmissions(means, chol_covs=cov_param, min_variance=self.min_variance)

    def log_prob(self, emission) -> Float[Array, " K"]:
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
            lambda y: super(GaussianEmissions, self)._time_major_log_likelihoods(y, valid),
            emissions,
            lambda nan: jnp.any(nan, axis=-1)[:, None, :],  # (T, B, D) -> (T, 1, B)
        )

    def _unrolled_time_major_log_likelihoods(self, emissions, valid):
        # Elementwise arithmetic over the (T, K, B) output, one fused kernel with the batch
        # as the vectorised axis, instead of the base class's batched product over a
        # (K, D, T * B) residual and a transpose (0.6 against 2.2 ms at K = 5, D = 3,
        # B = 100, T = 1000).
        dim = self.emission_dim
        y = jnp.moveaxis(emissions, 2, 1).astype(self.means.dtype)  # (T, D, B)
        y = jnp.where(valid[:, None, :], y, 0.0)
        means = self.means[None, :, :, None]  # (1, K, D, 1)
        # z = L_k^{-1} (y - mu_k) by forward substitution, unrolled over the small D:
        # no factor inverse, no library call, only multiply-adds on (T, K, B) values
        chol = jnp.tril(self.chol_covs)
        diag = jnp.sum(chol * jnp.eye(dim, dtype=chol.dtype), axis=-1)  # (K, D), no gather
        inv_diag = 1.0 / diag
        log_det = jnp.sum(jnp.log(jnp.abs(diag)), axis=-1)
        zs, quad = [], 0.0
        for d in range(dim):
            r = y[:, None, d, :] - means[:, :, d]  # (T, K, B)
            for e in range(d):
                r = r - chol[None, :, d, e, None] * zs[e]
            zs.append(r * inv_diag[None, :, d, None])
            quad = quad + zs[d] * zs[d]
        out = -0.5 * quad - log_det[None, :, None] - 0.5 * dim * math.log(2 * math.pi)
        return jnp.where(valid[:, None, :], out, 0.0)

    def sample(self, state, *, key: PRNGKeyArray) -> Float[Array, " D"]:
        eps = jax.random.normal(key, (self.emission_dim,), self.means.dtype)
        return self.means[state] + jnp.tril(self.chol_covs[state]) @ eps


class DiagonalGaussianEmissions(AbstractGaussianEmissions):
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

    def __init__(self, means, variances=None, *, log_variances=None, min_variance: float = 1e-6):
        if (variances is None) == (log_variances is None):
            raise ValueError("Pass exactly one of `variances` and `log_variances`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        k, d = means.shape
        if variances is not None:
            variances = _checks.as_float_array("variances", variances, means.dtype)
            _checks.check_shape("variances", variances, (k, d), "one variance per state and dimension")
            xp, values = _checks.host_arrays(variances)
            bad = (values <= 0) | ~xp.isfinite(values)
            variances = _checks.check_values(variances, bad, "`variances` must be finite and positive.")
            self.log_variances = jnp.log(variances)
        else:
            log_variances = _checks.as_float_array("log_variances", log_variances, means.dtype)
            _checks.check_shape("log_variances", log_variances, (k, d))
            self.log_variances = log_variances

    @property
    def covs(self) -> Float[Array, "K D D"]:
        return jax.vmap(jnp.diag)(jnp.exp(self.log_variances))

    @property
    def variances(self) -> Float[Array, "K D"]:
        return jnp.exp(self.log_variances)

    def _cov_param(self) -> Array:
        return self.log_variances

    def _with_params(self, means, cov_param) -> "DiagonalGaussianEmissions":
        return DiagonalGaussianEmissions(means, log_variances=cov_param, min_variance=self.min_variance)

    def log_prob(self, emission) -> Float[Array, " K"]:
        return _gaussian_diag_log_prob(self.means, self.log_variances, self._one_emission(emission)[None, :])

    def _time_major_log_likelihoods(self, emissions, valid):
        # over a (T, K, D, B) virtual array, fused, never stored (see GaussianEmissions)
        y = jnp.moveaxis(emissions, 2, 1).astype(self.means.dtype)  # (T, D, B)
        y = jnp.where(valid[:, None, :], y, 0.0)
        means = self.means[None, :, :, None]  # (1, K, D, 1)
        out = _gaussian_diag_log_prob(means, self.log_variances[None, :, :, None], y[:, None], axis=2)
        return jnp.where(valid[:, None, :], out, 0.0)

    def sample(self, state, *, key: PRNGKeyArray) -> Float[Array, " D"]:
        eps = jax.random.normal(key, (self.emission_dim,), self.means.dtype)
        return self.means[state] + jnp.exp(0.5 * self.log_variances[state]) * eps


@functools.partial(jax.jit, static_argnames=("num_states", "num_iters", "full"))
def _gaussian_init(key, emissions, min_variance, num_states: int, num_iters: int, full: bool):
    """Centres and covariances of :meth:`GaussianEmissions.from_data`, one compiled program.

    Run op by op, the k-means seeding and refinement compiled about 90 small programs
    (about 6 s on a 2-core CPU) and their loops again on every call.
    """
    n, d = emissions.shape
    centers = _kmeans(key, emissions, num_states, num_iters)
    assign = jnp.argmin(_sq_dists(emissions, centers), axis=1)
    onehot = jax.nn.one_hot(assign, num_states, dtype=emissions.dtype)
    counts = onehot.sum(0)
    centred = emissions - emissions.mean(0)
    pooled = centred.T @ centred / n + min_variance * jnp.eye(d, dtype=emissions.dtype)
    diffs = emissions[:, None, :] - centers[None, :, :]  # (N, K, D)
    scatter = jnp.einsum("nk,nkd,nke->kde", onehot, diffs, diffs)
    prior = d + 1.0
    covs = (scatter + prior * pooled[None]) / (counts + prior)[:, None, None]
    covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2))
    if not full:
        covs = jnp.diagonal(covs, axis1=-2, axis2=-1)
    return centers, covs


def _identity_covs(num_states: int, dim: int, covariance_type: str, dtype) -> jax.Array:
    if covariance_type == "full":
        return jnp.broadcast_to(jnp.eye(dim, dtype=dtype), (num_states, dim, dim))
    if covariance_type == "diag":
        return jnp.ones((num_states, dim), dtype)
    raise ValueError(f"`covariance_type` must be 'full' or 'diag'; got {covariance_type!r}.")


def _sq_dists(x: Float[Array, "N D"], centers: Float[Array, "K D"]) -> Float[Array, "N K"]:
    return jnp.sum((x[:, None, :] - centers[None, :, :]) ** 2, axis=-1)


def _kmeans(key: PRNGKeyArray, x: Float[Array, "N D"], num_states: int, num_iters: int) -> Float[Array, "K D"]:
    n = x.shape[0]
    num_trials = 2 + int(math.log(num_states))
    key_first, key_rest = jax.random.split(key)
    centers = jnp.zeros((num_states, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(key_first, (), 0, n)])

    def _seed_step(k, carry):
        centers, key = carry
        key, sub = jax.random.split(key)
        d2 = _sq_dists(x, centers)
        d2 = jnp.where(jnp.arange(num_states)[None, :] < k, d2, jnp.inf).min(axis=1)
        # greedy k-means++: draw a few candidates with probability proportional
        # to d2 (uniform if every point coincides with a seed) and keep the one
        # that most reduces the potential sum_n min(d2_n, |x_n - candidate|^2)
        logits = jnp.log(d2 + jnp.finfo(x.dtype).tiny)
        candidates = jax.random.categorical(sub, logits, shape=(num_trials,))
        potential = jnp.minimum(d2[None, :], _sq_dists(x, x[candidates]).T).sum(axis=1)
        idx = candidates[jnp.argmin(potential)]
        return centers.at[k].set(x[idx]), key

    centers, _ = jax.lax.fori_loop(1, num_states, _seed_step, (centers, key_rest))

    def _lloyd_step(_, centers):
        onehot = jax.nn.one_hot(jnp.argmin(_sq_dists(x, centers), axis=1), num_states, dtype=x.dtype)
        counts = onehot.sum(0)
        new = onehot.T @ x / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where((counts > 0)[:, None], new, centers)

    return jax.lax.fori_loop(0, num_iters, _lloyd_step, centers)


def _row_argmax(w: Float[Array, "N K"]) -> Int[Array, " N"]:
    """``argmax(w, axis=1)`` (first maximum); for a few states as a chain of elementwise
    comparisons of the columns (XLA:CPU's reduction over a short minor axis is slow:
    0.7 ms against ~0.1 ms at N = 10^5, K = 5)."""
    num_states = w.shape[1]
    if num_states > 16:
        return jnp.argmax(w, axis=1)
    best, ref = w[:, 0], jnp.zeros(w.shape[:1], jnp.int32)
    for k in range(1, num_states):
        better = w[:, k] > best
        ref = jnp.where(better, k, ref)
        best = jnp.where(better, w[:, k], best)
    return ref


def _gaussian_stats(
    means: Float[Array, "K D"],
    emissions: Float[Array, "N D"],
    observed: Optional[Bool[Array, "N D"]],
    weights: Float[Array, "N K"],
    full: bool,
) -> GaussianStats:
    r"""Weighted sums about each state's mean, from three matrix products over the steps.

    Each step ``n`` is centred on the mean of its own reference state ``j(n) = argmax_k w_nk``:
    :math:`u_n = y_n - m_{j(n)}`, and :math:`y_n - m_k = u_n + \delta_{j(n) k}` with
    :math:`\delta_{jk} = m_j - m_k` formed exactly from the parameters. Every sum over ``n``
    is then a product ``weights.T @ feature`` for each of the per-step features
    ``onehot(j)``, ``onehot(j) (x) u`` and ``u (x) u`` (the sums of ``u`` are those of
    ``onehot(j) (x) u`` over ``j``), and the :math:`\delta` terms are added per pair of
    states. Rounding is that of centring each step on its own state's mean (the terms that
    dominate a state's sums have :math:`\delta = 0`), with no ``(N, K, D)`` or
    ``(N, K, D, D)`` temporaries, and as accurate in float32 as the direct weighted sums
    (which differ only by summation order). The products are separate, not one product of
    the features concatenated: XLA:CPU's classic loop emitter, which the fitting loops are
    compiled with (``ssmjax/_fit/compiler.py``), builds the concatenated operand slowly
    (measured 11 ms against 3.9 ms for separate products at ``N = 10^5, K = 5, D = 3``).

    ``observed`` (diagonal family only; ``None`` when nothing is missing) marks the entries to
    sum: ``u`` is zero at the others, and the counts behind each dimension's
    :math:`\delta` terms become one more product, of ``onehot(j) (x) observed``.
    """
    num_steps, dim = emissions.shape
    num_states = means.shape[0]
    ref = _row_argmax(weights)
    onehot = jax.nn.one_hot(ref, num_states, dtype=emissions.dtype)
    u = emissions - means[ref]
    if observed is not None:
        u = jnp.where(observed, u, 0.0)
    grouped_u = (onehot[:, :, None] * u[:, None, :]).reshape(num_steps, num_states * dim)
    squares = (u[:, :, None] * u[:, None, :]).reshape(num_steps, dim * dim) if full else u * u
    weights_t = weights.T
    # counts[k, j] = sum of w_nk over the steps with reference j; cross_u[k, j] likewise of w_nk u_n
    counts = weights_t @ onehot
    cross_u = (weights_t @ grouped_u).reshape(num_states, num_states, dim)
    sum_u = jnp.sum(cross_u, axis=1)  # every step has one reference state: no fifth product
    sum_sq = weights_t @ squares
    delta = means[None, :, :] - means[:, None, :]  # delta[k, j] = m_j - m_k
    if observed is None:
        dim_counts = counts[:, :, None]
    else:  # dim_counts[k, j, d] = sum of w_nk over the steps with reference j where y_nd is observed
        grouped_obs = (onehot[:, :, None] * observed[:, None, :].astype(emissions.dtype)).reshape(num_steps, -1)
        dim_counts = (weights_t @ grouped_obs).reshape(num_states, num_states, dim)
    weighted_sums = sum_u + jnp.sum(dim_counts * delta, axis=1)
    if full:
        cross = jnp.einsum("kjd,kje->kde", cross_u, delta)
        weighted_outer = (
            sum_sq.reshape(num_states, dim, dim) + cross + jnp.swapaxes(cross, -1, -2)
            + jnp.einsum("kj,kjd,kje->kde", counts, delta, delta)
        )
    else:
        weighted_outer = sum_sq + 2.0 * jnp.einsum("kjd,kjd->kd", cross_u, delta) + jnp.sum(
            dim_counts * delta**2, axis=1
        )
    sum_weights = jnp.sum(counts, axis=1)
    dim_weights = jnp.sum(dim_counts, axis=1) * jnp.ones((1, dim), emissions.dtype)
    return GaussianStats(sum_weights, weighted_sums, weighted_outer, dim_weights)


def _gaussian_missing_stats(
    means: Float[Array, "K D"], chol_covs: Float[Array, "K D D"], emissions: Float[Array, "N D"],
    weights: Float[Array, "N K"],
) -> GaussianStats:
    r"""Full-covariance statistics with missing (NaN) entries: conditional moments per step and state.

    Given the observed block :math:`o` and state :math:`k`, the residual :math:`y_n - m_k` has mean
    :math:`d_{nk} = \Sigma_k M S^{-1} M r_{nk}` and covariance :math:`\Sigma_k - \Sigma_k M S^{-1} M
    \Sigma_k` (:math:`M`, :math:`S` as in :func:`_gaussian_marginal_log_prob`, :math:`r` the residual
    with missing entries zero): on the observed block the residual itself and no variance, on the
    missing block the Gaussian conditional. One factorisation of :math:`S` per step and state.
    """
    observed, y = _observed_entries(emissions)
    chol = jnp.tril(chol_covs)
    covs = chol @ jnp.swapaxes(chol, -1, -2)  # (K, D, D)
    obs = observed.astype(covs.dtype)
    both = obs[:, None, :, None] * obs[:, None, None, :]  # (N, 1, D, D)
    eye = jnp.eye(covs.shape[-1], dtype=covs.dtype)
    s = both * covs[None] + (1.0 - obs)[:, None, :, None] * eye  # (N, K, D, D)
    chol_s = jnp.linalg.cholesky(s)
    resid = obs[:, None, :] * (y[:, None, :] - means[None])  # (N, K, D)
    solve = functools.partial(jax.scipy.linalg.solve_triangular, lower=True)
    g = solve(chol_s, obs[:, None, :, None] * covs[None])  # L^{-1} M Sigma
    z = solve(chol_s, resid[..., None])[..., 0]
    d = jnp.einsum("nkij,nki->nkj", g, z)  # Sigma M S^{-1} M r
    cond_cov = covs[None] - jnp.einsum("nkij,nkil->nkjl", g, g)
    sum_weights = jnp.sum(weights, axis=0)
    weighted_sums = jnp.einsum("nk,nkd->kd", weights, d)
    weighted_outer = jnp.einsum("nk,nkd,nke->kde", weights, d, d) + jnp.einsum("nk,nkde->kde", weights, cond_cov)
    dim_weights = jnp.broadcast_to(sum_weights[:, None], means.shape)
    return GaussianStats(sum_weights, weighted_sums, weighted_outer, dim_weights)


def _gaussian_m_step(
    old_means: Float[Array, "K D"],
    old_cov_param: Shaped[Array, "K D *d"],
    sum_weights: Shaped[Array, "K *dw"],
    weighted_sums: Float[Array, "K D"],
    weighted_outer: Shaped[Array, "K D *d"],
    min_variance: float,
    full: bool,
    freeze_means: bool = False,
) -> tuple[Float[Array, "K D"], Shaped[Array, "K D *d"]]:
    # sum_weights: (K,) for the full family, (K, D) per dimension for the diagonal one
    empty = sum_weights <= 0
    safe_w = jnp.where(empty, 1.0, sum_weights)
    shift = weighted_sums / (safe_w[:, None] if full else safe_w)  # new mean minus old mean
    if freeze_means:  # covariances about the (frozen) current means
        shift = jnp.zeros_like(shift)
    means = old_means + shift
    dim = old_means.shape[-1]
    if full:
        covs = weighted_outer / safe_w[:, None, None] - shift[:, :, None] * shift[:, None, :]
        covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2)) + min_variance * jnp.eye(dim, dtype=covs.dtype)
        new_param = jnp.linalg.cholesky(covs)
        failed = ~jnp.all(jnp.isfinite(new_param), axis=(-1, -2))
    else:  # each (state, dimension) on its own: one with no observed entry keeps its values
        variances = jnp.maximum(weighted_outer / safe_w - shift**2, 0.0) + min_variance
        new_param = jnp.log(variances)
        keep = empty | ~jnp.isfinite(new_param)
        return jnp.where(keep, old_means, means), jnp.where(keep, old_cov_param, new_param)
    keep = empty | failed
    return _keep_where_empty(keep, means, old_means), _keep_where_empty(keep, new_param, old_cov_param)
