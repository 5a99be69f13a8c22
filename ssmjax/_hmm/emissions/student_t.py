r"""Multivariate Student-t emissions: heavy-tailed vectors, fitted by EM through their scale-mixture form.

:class:`StudentTEmissions` (stored as ``means``, Cholesky factors ``chol_scales`` and ``log_dofs``),
its statistics :class:`StudentTStats`, and the private log-density, E-step and M-step it is built from.

A Student-t vector is a Gaussian whose precision is scaled by a latent Gamma variable,

.. math::
    \tau_t \mid z_t = k \sim \mathrm{Gamma}(\nu_k / 2, \text{rate } \nu_k / 2), \qquad
    y_t \mid \tau_t, z_t = k \sim \mathcal N(\mu_k, \Sigma_k / \tau_t),

so EM treats :math:`(z_t, \tau_t)` as missing data (an ECM algorithm: Liu and Rubin, 1995; Peel and
McLachlan, 2000). Given the observed entries :math:`o` of a step and state :math:`k`, the precision
scale is :math:`\tau \sim \mathrm{Gamma}((\nu_k + D_o)/2, (\nu_k + \delta^2)/2)` with
:math:`\delta^2` the Mahalanobis distance of the observed block, and the missing block is Gaussian
given :math:`\tau` (covariance the Gaussian conditional one divided by :math:`\tau`).
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Shaped

from ... import _checks
from .base import (
    AbstractExponentialFamilyEmissions,
    _as_mask,
    _at_real_steps,
    _branch,
    _check_weights,
    _fill_padding,
    _keep_where_empty,
    _missing,
    _observed_entries,
)
from .gamma import _solve_shape
from .gaussian import GaussianEmissions, _check_min_variance, _checked_means, _cholesky_field
from .gaussian_ops import _UNROLLED_SOLVE_MAX_DIM, _masked_whitening

# Above this argument the Gamma-function terms are asymptotic series: the direct differences of
# log-Gamma values cancel (at nu = 1e8 about eight of float64's sixteen digits), while the series'
# first left-out terms are at float64 round-off here (1 / (1680 a^7) < 1e-15, 1 / (240 a^8) ~ 1e-16 at a = 50).
_SERIES_MIN = 50.0


class StudentTStats(NamedTuple):
    r"""Statistics of :class:`StudentTEmissions`, centred on the model's current means ``m`` and computed
    with its current parameters (the expected precision scales :math:`u_{nk} = \mathbb E[\tau \mid y_n, k]`).

    Attributes:
        sum_weights: ``(K,)``, :math:`\sum_n w_{nk}`.
        scaled_weights: ``(K,)``, :math:`\sum_n w_{nk} u_{nk}`.
        weighted_sums: ``(K, D)``, :math:`\sum_n w_{nk} u_{nk} \mathbb E[y_n - m_k]`.
        weighted_outer: ``(K, D, D)``, :math:`\sum_n w_{nk} \mathbb E[\tau (y_n - m_k)(y_n - m_k)^\top]`.
        weighted_gaps: ``(K,)``, :math:`\sum_n w_{nk} (\mathbb E[\tau] - \mathbb E[\log \tau] - 1)`, the
            term of the degrees-of-freedom equation (non-negative).

    Expectations are given the step's observed entries and the state; without missing entries
    :math:`\mathbb E[y_n - m_k]` is the residual itself.
    """

    sum_weights: Array
    scaled_weights: Array
    weighted_sums: Array
    weighted_outer: Array
    weighted_gaps: Array


def _stirling_tail(x):
    """``log Gamma(x)`` minus its Stirling approximation ``(x - 1/2) log x - x + log(2 pi) / 2``, for ``x >= _SERIES_MIN``."""
    inv = 1.0 / x
    inv2 = inv * inv
    return inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))


def _log_gamma_ratio(a, h):
    r""":math:`\log\Gamma(a + h) - \log\Gamma(a) - h \log a` for ``a > 0``, ``h >= 0``: the direct difference
    below ``_SERIES_MIN``, above it Stirling's series with :math:`\log(1 + h/a)` (no cancellation), so the
    density stays accurate as the degrees of freedom grow."""
    big = a >= _SERIES_MIN
    a_big = jnp.where(big, a, _SERIES_MIN)  # both branches finite, so is the gradient
    b = a_big + h
    series = (b - 0.5) * jnp.log1p(h / a_big) - h + (_stirling_tail(b) - _stirling_tail(a_big))
    a_small = jnp.where(big, 1.0, a)
    direct = gammaln(a_small + h) - gammaln(a_small) - h * jnp.log(a_small)
    return jnp.where(big, series, direct)


def _log_minus_digamma(a):
    r""":math:`\log a - \psi(a) > 0` for ``a > 0`` (asymptotic series above ``_SERIES_MIN``, where the difference cancels)."""
    big = a >= _SERIES_MIN
    a_big = jnp.where(big, a, _SERIES_MIN)
    inv = 1.0 / a_big
    inv2 = inv * inv
    series = inv * (0.5 + inv * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 / 252.0)))
    a_small = jnp.where(big, 1.0, a)
    return jnp.where(big, series, jnp.log(a_small) - digamma(a_small))


def _student_t_log_density(quad, half_log_det, num_observed, dofs):
    r"""Student-t log-density from the Mahalanobis distance ``quad`` of ``num_observed`` entries and
    :math:`\log|L|` of their scale block (arrays that broadcast together):

    .. math::
        \log\Gamma(\tfrac{\nu + D}{2}) - \log\Gamma(\tfrac{\nu}{2}) - \tfrac{D}{2}\log(\nu\pi) - \log|L|
        - \tfrac{\nu + D}{2} \log(1 + \delta^2/\nu),

    written as :func:`_log_gamma_ratio` minus :math:`\tfrac{D}{2}\log 2\pi`, which tends to the
    Gaussian log-density as :math:`\nu \to \infty`.
    """
    half_dim = 0.5 * num_observed
    return (
        _log_gamma_ratio(0.5 * dofs, half_dim) - half_dim * math.log(2 * math.pi) - half_log_det
        - (0.5 * dofs + half_dim) * jnp.log1p(quad / dofs)
    )


def _whitening_matrices(chol_scales: Float[Array, "K D D"]):
    """``(L_k^{-1}, log |L_k|)`` of the lower triangles, from the parameters alone (under ``jax.vmap``
    over emissions they are computed once)."""
    chol = jnp.tril(chol_scales)
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    half_log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol, axis1=-2, axis2=-1))), axis=-1)
    return inv_chol, half_log_det


@jax.jit
def _observed_log_prob(means, chol_scales, dofs, emission: Float[Array, " D"]) -> Float[Array, " K"]:
    inv_chol, half_log_det = _whitening_matrices(chol_scales)
    z = jnp.einsum("kde,ke->kd", inv_chol, emission[None, :] - means)
    return _student_t_log_density(jnp.sum(z**2, axis=-1), half_log_det, means.shape[-1], dofs)


@jax.jit
def _marginal_log_prob(means, chol_scales, dofs, emission: Float[Array, " D"]) -> Float[Array, " K"]:
    r"""Log-density of the observed entries (NaN = missing): the Student-t marginal of the observed block,
    with the same degrees of freedom; ``0`` when every entry is missing.

    As for the Gaussian (:func:`~ssmjax._hmm.emissions.gaussian_ops._gaussian_marginal_log_prob`), the
    observed block's factor is that of :math:`S = M \Sigma M + (I - M)`, unrolled for small ``D``.
    """
    observed, y = _observed_entries(emission)
    chol = jnp.tril(chol_scales)
    scales = chol @ jnp.swapaxes(chol, -1, -2)
    resid = jnp.where(observed, y[None, :] - means, 0.0)  # (K, D)
    dim = means.shape[-1]
    if dim <= _UNROLLED_SOLVE_MAX_DIM:
        quad, half_log_det = _masked_whitening(
            [resid[:, i] for i in range(dim)], [[scales[:, i, j] for j in range(dim)] for i in range(dim)], list(observed)
        )
    else:
        both = observed[:, None] & observed[None, :]
        s = jnp.where(both, scales, jnp.diag(jnp.where(observed, 0.0, 1.0)).astype(scales.dtype))
        chol_s = jnp.linalg.cholesky(s)
        z = jax.scipy.linalg.solve_triangular(chol_s, resid[..., None], lower=True)[..., 0]
        quad = jnp.sum(z**2, axis=-1)
        half_log_det = jnp.sum(jnp.log(jnp.diagonal(chol_s, axis1=-2, axis2=-1)), axis=-1)
    return _student_t_log_density(quad, half_log_det, jnp.sum(observed).astype(scales.dtype), dofs)


def _observed_moments(means, chol_scales, emissions: Float[Array, "N D"]):
    """``(resid, cond_cov, quad, num_observed)`` of complete emissions: residuals ``(N, K, D)``, no conditional
    covariance (``None``), Mahalanobis distances ``(N, K)`` and ``D``."""
    inv_chol, _ = _whitening_matrices(chol_scales)
    resid = emissions[:, None, :] - means[None]
    z = jnp.einsum("kde,nke->nkd", inv_chol, resid)
    return resid, None, jnp.sum(z**2, axis=-1), jnp.asarray(means.shape[-1], means.dtype)


def _missing_moments(means, chol_scales, emissions: Float[Array, "N D"]):
    r"""``(resid, cond_cov, quad, num_observed)`` with missing (NaN) entries: per step and state the
    conditional mean of the residual given the observed block, :math:`\Sigma M S^{-1} M r`, the
    conditional covariance of the missing block times :math:`\tau`, :math:`\Sigma - \Sigma M S^{-1} M \Sigma`
    (zero on the observed block), the observed block's Mahalanobis distance :math:`r^\top S^{-1} r`
    and the number of observed entries ``(N,)``. One factorisation of :math:`S` per step and state."""
    observed, y = _observed_entries(emissions)
    chol = jnp.tril(chol_scales)
    scales = chol @ jnp.swapaxes(chol, -1, -2)  # (K, D, D)
    obs = observed.astype(scales.dtype)
    both = obs[:, None, :, None] * obs[:, None, None, :]  # (N, 1, D, D)
    eye = jnp.eye(scales.shape[-1], dtype=scales.dtype)
    s = both * scales[None] + (1.0 - obs)[:, None, :, None] * eye  # (N, K, D, D)
    chol_s = jnp.linalg.cholesky(s)
    resid = obs[:, None, :] * (y[:, None, :] - means[None])  # (N, K, D)
    solve = functools.partial(jax.scipy.linalg.solve_triangular, lower=True)
    g = solve(chol_s, obs[:, None, :, None] * scales[None])  # L_S^{-1} M Sigma
    z = solve(chol_s, resid[..., None])[..., 0]
    cond_mean = jnp.einsum("nkij,nki->nkj", g, z)
    cond_cov = scales[None] - jnp.einsum("nkij,nkil->nkjl", g, g)
    return cond_mean, cond_cov, jnp.sum(z**2, axis=-1), jnp.sum(obs, axis=-1)[:, None]


def _student_t_stats(dofs, weights, resid, cond_cov, quad, num_observed) -> StudentTStats:
    r"""The E-step's sums from per-step moments: :math:`u = (\nu + D_o) / (\nu + \delta^2)` and
    :math:`\mathbb E[\tau] - \mathbb E[\log\tau] - 1 = (u - 1 - \log u) + (\log a - \psi(a))`,
    :math:`a = (\nu + D_o)/2` (both terms non-negative, each computed without cancellation)."""
    excess = (num_observed - quad) / (dofs + quad)  # u - 1
    # log u: log1p near u = 1 (no cancellation), a difference of logs far out in the tails, where
    # u - 1 rounds to -1
    near = jnp.abs(excess) < 0.5
    log_scale = jnp.where(
        near, jnp.log1p(jnp.where(near, excess, 0.0)), jnp.log(dofs + num_observed) - jnp.log(dofs + quad)
    )
    gap = (excess - log_scale) + _log_minus_digamma(0.5 * (dofs + num_observed))
    scaled = weights * (1.0 + excess)
    outer = jnp.einsum("nk,nkd,nke->kde", scaled, resid, resid)
    if cond_cov is not None:  # E[tau C / tau] = C: weighted by w, not w u
        outer = outer + jnp.einsum("nk,nkde->kde", weights, cond_cov)
    return StudentTStats(
        sum_weights=jnp.sum(weights, axis=0),
        scaled_weights=jnp.sum(scaled, axis=0),
        weighted_sums=jnp.einsum("nk,nkd->kd", scaled, resid),
        weighted_outer=outer,
        weighted_gaps=jnp.sum(jnp.where(weights > 0, weights * gap, 0.0), axis=0),
    )


@jax.jit
def _observed_stats(means, chol_scales, dofs, emissions: Float[Array, "N D"], weights: Float[Array, "N K"]) -> StudentTStats:
    """The statistics of complete emissions, one compiled program (eagerly, about forty)."""
    return _student_t_stats(dofs, weights, *_observed_moments(means, chol_scales, emissions))


@jax.jit
def _missing_stats(means, chol_scales, dofs, emissions: Float[Array, "N D"], weights: Float[Array, "N K"]) -> StudentTStats:
    """The statistics of emissions with missing (NaN) entries, one compiled program."""
    return _student_t_stats(dofs, weights, *_missing_moments(means, chol_scales, emissions))


@functools.partial(jax.jit, static_argnames=("min_variance", "frozen"))
def _student_t_m_step(means, chol_scales, log_dofs, stats: StudentTStats, min_variance: float, frozen):
    r"""``(means, chol_scales, log_dofs)`` maximising the expected complete-data log-likelihood (the
    conditional maximisation steps of ECM); frozen parameters keep their values, empty states all three."""
    empty = (stats.sum_weights <= 0) | (stats.scaled_weights <= 0)
    scaled = jnp.where(empty, 1.0, stats.scaled_weights)
    shift = stats.weighted_sums / scaled[:, None]  # new mean minus old mean
    if "means" in frozen:
        shift = jnp.zeros_like(shift)
    new_means = means + shift
    new_chol = chol_scales
    keep_chol = empty
    if "scales" not in frozen:
        # sum_n w u (y - m_new)(y - m_new)^T = O - s d^T - d s^T + (sum w u) d d^T, about the old means
        cross = stats.weighted_sums[:, :, None] * shift[:, None, :]
        scatter = (
            stats.weighted_outer - cross - jnp.swapaxes(cross, -1, -2)
            + stats.scaled_weights[:, None, None] * shift[:, :, None] * shift[:, None, :]
        )
        total = jnp.where(empty, 1.0, stats.sum_weights)[:, None, None]
        ridge = min_variance * jnp.eye(means.shape[-1], dtype=means.dtype)
        new_chol = jnp.linalg.cholesky(0.5 * (scatter + jnp.swapaxes(scatter, -1, -2)) / total + ridge)
        keep_chol = empty | ~jnp.all(jnp.isfinite(new_chol), axis=(-1, -2))
    new_log_dofs = log_dofs
    if "dofs" not in frozen:
        # 0 = log(nu/2) - psi(nu/2) + 1 - mean(E tau - E log tau): the Gamma shape equation in nu/2
        gap = stats.weighted_gaps / jnp.where(empty, 1.0, stats.sum_weights)
        new_log_dofs = jnp.where(empty, log_dofs, jnp.log(2.0 * _solve_shape(gap)))
    return (
        _keep_where_empty(empty, new_means, means),
        _keep_where_empty(keep_chol, new_chol, chol_scales),
        new_log_dofs,
    )


# from_data clusters the data clipped to these quantiles of each dimension
_INIT_CLIP_LEVEL = 0.01


@functools.partial(jax.jit, static_argnames=("level",))
def _clip_to_quantiles(emissions: Float[Array, "N D"], level: float) -> Float[Array, "N D"]:
    """Each dimension clipped to its ``level`` and ``1 - level`` quantiles of the observed values (NaN stays)."""
    low, high = jnp.nanquantile(emissions, jnp.array([level, 1.0 - level], emissions.dtype), axis=0)
    return jnp.clip(emissions, low, high)


class StudentTEmissions(AbstractExponentialFamilyEmissions):
    r"""Multivariate Student-t emissions with a full scale matrix per state,
    :math:`p(y_t \mid z_t = k) = t_{\nu_k}(y_t; \mu_k, \Sigma_k)`:

    .. math::
        t_\nu(y; \mu, \Sigma) = \frac{\Gamma(\frac{\nu + D}{2})}{\Gamma(\frac{\nu}{2}) (\nu\pi)^{D/2} |\Sigma|^{1/2}}
        \left(1 + \frac{(y - \mu)^\top \Sigma^{-1} (y - \mu)}{\nu}\right)^{-\frac{\nu + D}{2}},

    with location :math:`\mu_k`, scale matrix :math:`\Sigma_k` (the covariance is
    :math:`\frac{\nu_k}{\nu_k - 2}\Sigma_k` when :math:`\nu_k > 2`) and degrees of freedom :math:`\nu_k`.
    As :math:`\nu_k \to \infty` it becomes :math:`\mathcal N(\mu_k, \Sigma_k)` (:class:`GaussianEmissions`).
    Heavy tails make a state robust to outlying steps, which a Gaussian state would have to explain.

    Storage: ``means`` ``(K, D)``, ``chol_scales`` ``(K, D, D)`` (only the lower triangle is read,
    ``scales = L L^T``) and ``log_dofs`` ``(K,)``, so any array value is a valid model.

    EM (ECM; Liu and Rubin 1995, Peel and McLachlan 2000): the E-step gives, per step and state, the
    state's weight :math:`w_{nk}` and the expected precision scale
    :math:`u_{nk} = (\nu_k + D) / (\nu_k + \delta_{nk}^2)`, :math:`\delta_{nk}^2` the Mahalanobis distance
    of :math:`y_n` (both with the current parameters). The M-step takes means and scale matrices
    weighted by :math:`w_{nk} u_{nk}`,

    .. math::
        \mu_k = \frac{\sum_n w_{nk} u_{nk} y_n}{\sum_n w_{nk} u_{nk}}, \qquad
        \Sigma_k = \frac{\sum_n w_{nk} u_{nk} (y_n - \mu_k)(y_n - \mu_k)^\top}{\sum_n w_{nk}} + \epsilon I,

    (:math:`\epsilon` = ``min_variance``, as for :class:`AbstractGaussianEmissions`), and then
    :math:`\nu_k` solving

    .. math::
        \log\frac{\nu_k}{2} - \psi\left(\frac{\nu_k}{2}\right) + 1
        + \frac{\sum_n w_{nk} (\mathbb E[\log\tau_{nk}] - u_{nk})}{\sum_n w_{nk}} = 0

    (the Gamma family's shape equation in :math:`\nu_k / 2`: Newton's method from Minka's start,
    :class:`~ssmjax.GammaEmissions`). Each step raises the likelihood. The degrees of freedom are at
    most ``2e8`` (data without heavy tails send them to infinity); freeze them with
    ``frozen=("emissions.dofs",)``. A state with no weight keeps its parameters, and so does a scale
    matrix that fails to factorise.

    Missing (NaN) entries: a step's density is the Student-t marginal of its observed block (the
    same :math:`\nu_k`, :math:`D` the number of observed entries), and the statistics take the missing
    block's conditional moments given the observed entries (exact EM for the observed-data likelihood).

    Args:
        means: ``(K, D)`` locations.
        scales: ``(K, D, D)`` symmetric positive-definite scale matrices; or pass ``chol_scales``.
        dofs: ``(K,)`` positive degrees of freedom (or one number for all); or pass ``log_dofs``.
        chol_scales, log_dofs: the unconstrained storage (keyword only).
        min_variance: ridge added by the M-step (a static, non-negative float).

    Raises:
        ValueError: a missing or doubly given parameter, a wrong shape (naming the argument),
            non-positive or non-finite ``dofs``, or ``scales`` not positive definite.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.StudentTEmissions(jnp.zeros((2, 3)), jnp.stack([jnp.eye(3)] * 2), dofs=jnp.array([3.0, 30.0]))
        >>> model.log_likelihoods(jnp.array([[1.5, 0.0, 0.0], [8.0, 0.0, 0.0]])).argmax(axis=1).tolist()  # an outlier: heavy tails
        [1, 0]

    References:
        Liu, C. and Rubin, D. B. (1995). ML estimation of the t distribution using EM and its
        extensions, ECM and ECME. *Statistica Sinica* 5, 19-39.

        Peel, D. and McLachlan, G. J. (2000). Robust mixture modelling using the t distribution.
        *Statistics and Computing* 10, 339-348.
    """

    means: Float[Array, "K D"]
    chol_scales: Float[Array, "K D D"]
    log_dofs: Float[Array, " K"]
    min_variance: float = eqx.field(static=True)
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "means": ("means",), "scales": ("chol_scales",), "dofs": ("log_dofs",),
    }

    @typing.no_type_check
    def __init__(
        self,
        means: Float[ArrayLike, "K D"],
        scales: Float[ArrayLike, "K D D"] | None = None,
        dofs: Float[ArrayLike, " K"] | float | None = None,
        *,
        chol_scales: Float[ArrayLike, "K D D"] | None = None,
        log_dofs: Float[ArrayLike, " K"] | None = None,
        min_variance: float = 1e-6,
    ):
        if (scales is None) == (chol_scales is None) or (dofs is None) == (log_dofs is None):
            raise ValueError("Pass exactly one of `scales` and `chol_scales`, and one of `dofs` and `log_dofs`.")
        self.min_variance = _check_min_variance(min_variance)
        self.means = means = _checked_means(means)
        k, d = means.shape
        self.chol_scales = _cholesky_field("scales", scales, "chol_scales", chol_scales, (k, d, d), means.dtype,
                                           "one scale matrix per state")
        if dofs is not None:
            dofs = _checks.as_float_array("dofs", dofs, means.dtype)
            if dofs.ndim == 0:
                dofs = jnp.broadcast_to(dofs, (k,))
            _checks.check_shape("dofs", dofs, (k,), "one number of degrees of freedom per state")
            xp, values = _checks.host_arrays(dofs)
            dofs = _checks.check_values(dofs, (values <= 0) | ~xp.isfinite(values), "`dofs` must be finite and positive.")
            self.log_dofs = jnp.log(dofs)
        else:
            log_dofs = _checks.as_float_array("log_dofs", log_dofs, means.dtype)
            _checks.check_shape("log_dofs", log_dofs, (k,))
            self.log_dofs = log_dofs

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

    @property
    def scales(self) -> Float[Array, "K D D"]:
        """Scale matrices :math:`\\Sigma_k`, ``(K, D, D)``."""
        chol = jnp.tril(self.chol_scales)
        return chol @ jnp.swapaxes(chol, -1, -2)

    @property
    def dofs(self) -> Float[Array, " K"]:
        """Degrees of freedom :math:`\\nu_k`, ``(K,)``."""
        return jnp.exp(self.log_dofs)

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.floating) or jnp.issubdtype(emissions.dtype, jnp.integer)):
            raise ValueError(f"`emissions` of a Student-t model must be real numbers; got dtype {emissions.dtype}.")
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = _at_real_steps(xp.isinf(values), mask)  # NaN is a missing entry
        return _checks.check_values(
            emissions, bad, "`emissions` must be finite at unpadded steps (NaN for a missing entry); got inf.", at="emissions"
        )

    def _one_emission(self, emission) -> Float[Array, " D"]:
        return self._checked_emission(emission, "one emission vector").astype(self.means.dtype)

    def log_prob(self, emission: Float[ArrayLike, " D"]) -> Float[Array, " K"]:
        return _marginal_log_prob(self.means, self.chol_scales, self.dofs, self._one_emission(emission))

    def _log_prob_observed(self, emission) -> Float[Array, " K"]:
        return _observed_log_prob(self.means, self.chol_scales, self.dofs, self._one_emission(emission))

    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Float[Array, " D"]:
        key_scale, key_normal = jax.random.split(key)
        half_dof = 0.5 * self.dofs[state]
        # tau ~ Gamma(nu/2, rate nu/2) in log space: a small nu draws tau below the smallest float
        log_tau = jax.random.loggamma(key_scale, half_dof, dtype=self.means.dtype) - jnp.log(half_dof)
        eps = jax.random.normal(key_normal, (self.emission_dim,), self.means.dtype)
        return self.means[state] + (jnp.tril(self.chol_scales[state]) @ eps) * jnp.exp(-0.5 * log_tau)

    @typing.no_type_check
    def suff_stats(
        self, emissions: Shaped[ArrayLike, "N ..."], weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> StudentTStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled emission vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        missing = _missing(emissions, mask)
        emissions = _fill_padding(emissions, mask, 0).astype(self.means.dtype)
        weights = _check_weights(weights, n, self.num_states, mask, self.means.dtype)
        params = (self.means, self.chol_scales, self.dofs)
        general = lambda y, w: _missing_stats(*params, y, w)  # noqa: E731
        observed = lambda y, w: _observed_stats(*params, y, w)  # noqa: E731
        return _branch(missing, general, observed, emissions, weights)

    def m_step_from_stats(self, stats: StudentTStats, frozen: AbstractSet[str] = frozenset()) -> StudentTEmissions:
        means, chol_scales, log_dofs = _student_t_m_step(
            self.means, self.chol_scales, self.log_dofs, stats, min_variance=self.min_variance,
            frozen=frozenset(frozen) & {"means", "scales", "dofs"},
        )
        return StudentTEmissions(means, chol_scales=chol_scales, log_dofs=log_dofs, min_variance=self.min_variance)

    def parameter_counts(self) -> dict[str, int]:
        k, d = self.means.shape
        return {"means": k * d, "scales": k * d * (d + 1) // 2, "dofs": k}

    # -- initialisers ------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def random(
        cls, num_states: int, emission_dim: int, *, dofs: float = 10.0, min_variance: float = 1e-6,
        dtype: DTypeLike | None = None, key: PRNGKeyArray,
    ) -> StudentTEmissions:
        """Means drawn from N(0, I); identity scale matrices; ``dofs`` degrees of freedom in every state.

        Example:
            >>> import jax, ssmjax
            >>> model = ssmjax.StudentTEmissions.random(3, 2, dofs=4.0, key=jax.random.key(0))
            >>> model.scales.shape, model.dofs.tolist()
            ((3, 2, 2), [4.0, 4.0, 4.0])
        """
        num_states = _checks.positive_int("num_states", num_states)
        emission_dim = _checks.positive_int("emission_dim", emission_dim)
        dtype = dtype or jnp.result_type(float)
        means = jax.random.normal(key, (num_states, emission_dim), dtype)
        eye = jnp.broadcast_to(jnp.eye(emission_dim, dtype=dtype), (num_states, emission_dim, emission_dim))
        return cls(means, chol_scales=eye, dofs=jnp.full((num_states,), dofs, dtype), min_variance=min_variance)

    @classmethod
    @typing.no_type_check
    def from_data(
        cls, emissions: Float[ArrayLike, "N D"], num_states: int, *, dofs: float = 10.0, num_iters: int = 10,
        min_variance: float = 1e-6, key: PRNGKeyArray,
    ) -> StudentTEmissions:
        r"""The Gaussian family's k-means initialiser (:meth:`GaussianEmissions.from_data`) on the data clipped
        to each dimension's 1st to 99th percentiles, with ``dofs`` degrees of freedom in every state and scale
        matrices :math:`\frac{\nu - 2}{\nu}` times the cluster covariances (the clusters' covariances
        themselves when :math:`\nu \le 2`). The clipping keeps the far outliers that heavy tails produce
        from seeding clusters of their own (k-means++ draws seeds with probability growing as the squared
        distance).

        Args:
            emissions: pooled emissions, shape ``(N, D)`` with ``N >= num_states``; a missing (NaN) entry
                takes its dimension's mean for the clustering.
            num_states: ``K``.
            dofs: the starting degrees of freedom (positive).
            num_iters: number of Lloyd iterations.
            min_variance: passed to the model.
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, ssmjax
            >>> ys = jax.random.normal(jax.random.key(1), (60, 2))
            >>> ssmjax.StudentTEmissions.from_data(ys, 2, key=jax.random.key(0)).means.shape
            (2, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        if not (isinstance(dofs, (int, float)) and math.isfinite(dofs) and dofs > 0):
            raise ValueError(f"`dofs` must be a finite positive number; got {dofs!r}.")
        emissions = _checks.as_float_array("emissions", emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled emission vectors")
        xp, values = _checks.host_arrays(emissions)
        emissions = _checks.check_values(emissions, xp.isinf(values), "`emissions` must be finite or NaN (missing).", at="emissions")
        clipped = _clip_to_quantiles(emissions, _INIT_CLIP_LEVEL)
        start = GaussianEmissions.from_data(clipped, num_states, num_iters=num_iters, min_variance=min_variance, key=key)
        shrink = (dofs - 2.0) / dofs if dofs > 2 else 1.0
        chol_scales = math.sqrt(shrink) * start.chol_covs
        dofs_k = jnp.full((num_states,), dofs, start.means.dtype)
        return cls(start.means, chol_scales=chol_scales, dofs=dofs_k, min_variance=min_variance)

