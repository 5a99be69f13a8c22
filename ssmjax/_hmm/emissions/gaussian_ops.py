"""The arithmetic of the Gaussian emission families (:mod:`ssmjax._hmm.emissions.gaussian`).

Private functions only: the sufficient statistics :class:`GaussianStats`, the log-densities
(per step, and unrolled over the dimensions for missing entries), the k-means initialiser (on the host),
the statistics (with and without missing entries) and the M-step of every covariance type.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray
from scipy.cluster.vq import vq
from scipy.linalg import solve_triangular
from scipy.spatial.distance import cdist
from scipy.special import softmax

from .base import _keep_where_empty, _observed_entries
from .host import generator, key_seed, on_host


def _sym_cholesky(covs: Float[ArrayLike, "*K D D"]) -> Float[ArrayLike, "*K D D"]:
    """Cholesky factor of the symmetric part: one compiled program (eagerly: four), or NumPy's for a
    NumPy array (the host initialisers'); NaN where a matrix is not positive definite in both."""
    if isinstance(covs, np.ndarray):
        sym = 0.5 * (covs + np.swapaxes(covs, -1, -2))
        flat = sym.reshape((-1,) + sym.shape[-2:])
        out = np.full_like(flat, np.nan)
        for i, matrix in enumerate(flat):
            try:
                out[i] = np.linalg.cholesky(matrix)
            except np.linalg.LinAlgError:
                pass
        return out.reshape(sym.shape)
    return _sym_cholesky_program(covs)


@jax.jit
def _sym_cholesky_program(covs):
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


def _unrolled_gaussian_log_density(resid, chol_covs: Float[Array, "K D D"]):
    """``log N(r; 0, L_k L_k^T)`` of residuals given per dimension (``resid[d]``, ``(T, K, B)``, state on
    axis 1), with ``z = L_k^{-1} r`` by forward substitution unrolled over the small ``D``: no factor
    inverse, no library call, only multiply-adds on ``(T, K, B)`` values, which XLA fuses."""
    dim = len(resid)
    chol = jnp.tril(chol_covs)
    diag = jnp.sum(chol * jnp.eye(dim, dtype=chol.dtype), axis=-1)  # (K, D), no gather
    inv_diag = 1.0 / diag
    log_det = jnp.sum(jnp.log(jnp.abs(diag)), axis=-1)
    zs, quad = [], 0.0
    for d in range(dim):
        r = resid[d]
        for e in range(d):
            r = r - chol[None, :, d, e, None] * zs[e]
        zs.append(r * inv_diag[None, :, d, None])
        quad = quad + zs[d] * zs[d]
    return -0.5 * quad - log_det[None, :, None] - 0.5 * dim * math.log(2 * math.pi)


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


def _gaussian_init(key: PRNGKeyArray, emissions: Float[ArrayLike, "N D"], min_variance: float, num_states: int,
                   num_iters: int):
    """Centres ``(K, D)``, full covariances ``(K, D, D)`` and cluster sizes ``(K,)`` of
    :meth:`AbstractGaussianEmissions.from_data` (each family reduces the covariances to its own type).

    Computed on the host by :func:`_kmeans_host` (NumPy and SciPy; see :mod:`.host`): NumPy arrays for
    concrete data, and through :func:`jax.pure_callback` under a transformation.
    Compiled with XLA, the seeding and refinement loops were an initialiser program's larger part (about
    0.8 s to compile on a 2-core CPU, against 0.05 s to run them with NumPy at N = 10^5).
    """
    dtype = emissions.dtype
    d = emissions.shape[1]

    def host(seed, points):
        out = _kmeans_host(generator(seed), np.asarray(points, np.float64), min_variance, num_states, num_iters)
        return tuple(np.asarray(x, dtype) for x in out)

    shapes = (jax.ShapeDtypeStruct((num_states, d), dtype), jax.ShapeDtypeStruct((num_states, d, d), dtype),
              jax.ShapeDtypeStruct((num_states,), dtype))
    return on_host(host, shapes, key_seed(key), emissions)


# k-means clusters at most this many rows, drawn at random: plenty to place K centres, at a
# fraction of the time over 10^5 rows
_KMEANS_SAMPLE = 2**14


def _kmeans_host(rng: np.random.Generator, x: np.ndarray, min_variance: float, num_states: int, num_iters: int):
    """:func:`_gaussian_init` in NumPy: :func:`_kmeans` on at most :data:`_KMEANS_SAMPLE` rows, every row
    assigned to its nearest centre, and each cluster's covariance shrunk toward the pooled one with the
    weight of ``D + 1`` pseudo-points (small clusters still get well-conditioned covariances).

    One k-means run, as scikit-learn's default for k-means++ seeding: the best of several (the least
    within-cluster sum of squares) is not a better start for EM. On the US GDP growth data of the
    statsmodels migration page the best clustering splits the quarters by level, where the likelihood
    separates regimes by variance: EM from it ends 8.9 below the maximum for every key, and from one
    run's clusters it reaches the maximum for 19 keys in 40."""
    n = x.shape[0]
    sample = x if n <= _KMEANS_SAMPLE else x[rng.choice(n, _KMEANS_SAMPLE, replace=False)]
    centres = _kmeans(rng, sample, num_states, num_iters)
    assign = vq(x, centres, check_finite=False)[0]
    return _shrunk_moments(x, np.eye(num_states)[assign], min_variance, centres)


def _shrunk_moments(x: np.ndarray, weights: np.ndarray, min_variance: float, centres: Optional[np.ndarray] = None):
    """Per column of ``weights`` ``(N, K)``: centres ``(K, D)``, the weighted covariances of ``x`` ``(N, D)``
    about them ``(K, D, D)`` and the total weights ``(K,)``, each shrunk toward the pooled moments with
    the weight of ``D + 1`` pseudo-rows (a state of few rows still gets well-conditioned covariances).
    ``centres`` None: the weighted means (shrunk too); given (k-means'): kept as they are."""
    n, d = x.shape
    prior = d + 1.0
    mean = x.mean(axis=0)
    pooled = (x - mean).T @ (x - mean) / n + min_variance * np.eye(d)
    totals = weights.sum(axis=0) + prior
    if centres is None:
        centres = (weights.T @ x + prior * mean) / totals[:, None]
    scatter = np.empty((len(totals), d, d))
    for k, (centre, w) in enumerate(zip(centres, weights.T)):
        rows = w > 0  # a cluster's rows only, for hard assignments
        diffs = x[rows] - centre
        scatter[k] = (diffs.T * w[rows]) @ diffs
    covs = (scatter + prior * pooled) / totals[:, None, None]
    return centres, 0.5 * (covs + np.swapaxes(covs, -1, -2)), totals


def _gaussian_log_densities(x: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """``log N(x_n; means_k, covs_k)`` ``(N, K)`` of rows ``x`` ``(N, D)``, in NumPy and SciPy (the host
    initialisers' responsibilities)."""
    out = np.empty((x.shape[0], len(means)))
    for k, (mean, cov) in enumerate(zip(means, covs)):
        chol = np.linalg.cholesky(cov)
        white = solve_triangular(chol, (x - mean).T, lower=True)
        out[:, k] = -0.5 * np.sum(white**2, axis=0) - np.log(np.diag(chol)).sum() - 0.5 * mean.size * np.log(2 * np.pi)
    return out


def _soft_clusters(rng: np.random.Generator, x: np.ndarray, num_states: int, num_iters: int) -> np.ndarray:
    """Responsibilities ``(N, K)`` of rows ``x`` under the Gaussians of their k-means clusters
    (:func:`_kmeans_host`), in NumPy (float64): the regression and GLM families' starts."""
    x = np.asarray(x, np.float64)
    centres, covs, _ = _kmeans_host(rng, x, 1e-6, num_states, num_iters)
    return softmax(_gaussian_log_densities(x, centres, covs), axis=1)


def _kmeans(rng: np.random.Generator, x: np.ndarray, num_states: int, num_iters: int) -> np.ndarray:
    """k-means centres ``(K, D)``: greedy k-means++ seeding, then at most ``num_iters`` Lloyd iterations
    (an empty cluster keeps its centre; a stable assignment ends them, as later ones change nothing)."""
    n, d = x.shape
    num_trials = 2 + int(math.log(num_states))
    centres = np.empty((num_states, d))
    centres[0] = x[rng.integers(n)]
    d2 = np.sum((x - centres[0]) ** 2, axis=1)
    for k in range(1, num_states):
        # greedy k-means++: a few candidates drawn with probability proportional to d2 (uniform if
        # every point coincides with a seed); the one that most lowers the potential
        # sum_n min(d2_n, |x_n - candidate|^2) is kept
        total = d2.sum()
        candidates = rng.choice(n, size=num_trials, p=d2 / total if total > 0 else None)
        to_candidates = cdist(x, x[candidates], "sqeuclidean")  # (N, trials)
        best = np.argmin(np.minimum(d2[:, None], to_candidates).sum(axis=0))
        centres[k] = x[candidates[best]]
        d2 = np.minimum(d2, to_candidates[:, best])
    assign = vq(x, centres, check_finite=False)[0]
    for _ in range(num_iters):
        counts = np.bincount(assign, minlength=num_states)
        sums = np.stack([np.bincount(assign, weights=column, minlength=num_states) for column in x.T], axis=1)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        previous = assign
        assign = vq(x, centres, check_finite=False)[0]
        if np.array_equal(assign, previous):
            break
    return centres


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
    old_cov_param: Array,
    stats: GaussianStats,
    min_variance: float,
    covariance_type: str,
    freeze_means: bool = False,
    prior=None,
) -> tuple[Float[Array, "K D"], Array]:
    """New means and stored covariance parameter of one covariance type (the posterior mode under
    a :class:`~ssmjax.GaussianPrior`, if given).

    The stored parameter is that of the family: Cholesky factors ``(K, D, D)`` ("full") or
    ``(D, D)`` ("tied"), log-variances ``(K, D)`` ("diag") or ``(K,)`` ("spherical"). A state
    with no weight keeps its parameters, and so does one whose new covariance fails to
    factorise; for "diag" each (state, dimension) on its own, for "tied" the shared factor.
    """
    full = covariance_type in ("full", "tied")
    k, dim = old_means.shape
    dtype = old_means.dtype
    # the weight behind each mean: (K,) with full covariances (the conditional moments fill in
    # missing entries), (K, D) per dimension otherwise (missing entries are left out)
    weights = stats.sum_weights[:, None] if full else stats.dim_weights
    if prior is None:
        lam = jnp.zeros((), dtype)
        offset = jnp.zeros((), dtype)  # the prior mean minus the old mean
    else:
        lam = jnp.broadcast_to(prior.means_weight.astype(dtype), (k,))[:, None]
        offset = jnp.broadcast_to(prior.means_prior.astype(dtype), (k, dim)) - old_means
    denom = weights + lam
    empty = denom <= 0
    safe = jnp.where(empty, 1.0, denom)
    shift = (stats.weighted_sums + lam * offset) / safe  # new mean minus old mean
    if freeze_means:  # covariances about the (frozen) current means
        shift = jnp.zeros_like(shift)
    means = jnp.where(empty, old_means, old_means + shift)
    ridge = min_variance * jnp.eye(dim, dtype=dtype)
    # sum_n w (y - m_new)(y - m_new)^T = S - s d^T - d s^T + n d d^T (S, s about the old means); with
    # no prior and free means s = n d, and it is S - n d d^T
    if full:
        n = stats.sum_weights[:, None, None]
        outer = shift[:, :, None] * shift[:, None, :]
        if prior is None and not freeze_means:
            scatter = stats.weighted_outer - n * outer
        else:
            cross = stats.weighted_sums[:, :, None] * shift[:, None, :]
            scatter = stats.weighted_outer - cross - jnp.swapaxes(cross, -1, -2) + n * outer
        extra, pseudo = 0.0, 0.0
        if prior is not None:  # hmmlearn's MAP: (Psi + scatter + lambda (m - mu0)(m - mu0)^T) / (n + a)
            away = -(offset - shift)  # m_new - mu0
            extra = lam[:, :, None] * away[:, :, None] * away[:, None, :]
            psi = jnp.broadcast_to(prior.covars_prior.astype(dtype), (dim, dim) if covariance_type == "tied" else (k, dim, dim))
            pseudo = jnp.maximum(prior.covars_weight.astype(dtype) - dim, 0.0)
        if covariance_type == "tied":
            total = jnp.sum(stats.sum_weights) + pseudo
            psi_tied = 0.0 if prior is None else psi
            cov = (jnp.sum(scatter + extra, axis=0) + psi_tied) / jnp.where(total > 0, total, 1.0)
            new_chol = jnp.linalg.cholesky(0.5 * (cov + cov.T) + ridge)
            keep = (total <= 0) | ~jnp.all(jnp.isfinite(new_chol))
            return means, jnp.where(keep, old_cov_param, new_chol)
        numerator = scatter + extra + (0.0 if prior is None else psi)
        covs = numerator / jnp.where(empty, 1.0, stats.sum_weights[:, None] + pseudo)[:, :, None]
        new_chol = jnp.linalg.cholesky(0.5 * (covs + jnp.swapaxes(covs, -1, -2)) + ridge)
        keep = empty[:, 0] | ~jnp.all(jnp.isfinite(new_chol), axis=(-1, -2))
        return _keep_where_empty(keep, means, old_means), _keep_where_empty(keep, new_chol, old_cov_param)
    # sum_n w (y_d - m_new_d)^2 over the steps where y_d is observed
    if prior is None and not freeze_means:
        scatter = jnp.maximum(stats.weighted_outer - stats.dim_weights * shift**2, 0.0)
    else:
        scatter = jnp.maximum(stats.weighted_outer - 2.0 * stats.weighted_sums * shift + stats.dim_weights * shift**2, 0.0)
    pseudo = 0.0
    if prior is not None:
        away = shift - offset  # m_new - mu0
        scatter = scatter + lam * away**2 + jnp.broadcast_to(prior.covars_prior.astype(dtype), (k, dim))
        pseudo = jnp.maximum(prior.covars_weight.astype(dtype) - 1.0, 0.0)
    if covariance_type == "spherical":
        total = jnp.sum(stats.dim_weights + pseudo, axis=-1)
        variance = jnp.sum(scatter, axis=-1) / jnp.where(total > 0, total, 1.0) + min_variance
        keep = (total <= 0) | ~jnp.isfinite(jnp.log(variance))
        return means, jnp.where(keep, old_cov_param, jnp.log(variance))
    per_dim = stats.dim_weights + pseudo
    log_variances = jnp.log(scatter / jnp.where(per_dim > 0, per_dim, 1.0) + min_variance)
    keep = empty | (per_dim <= 0) | ~jnp.isfinite(log_variances)
    return jnp.where(keep, old_means, means), jnp.where(keep, old_cov_param, log_variances)
