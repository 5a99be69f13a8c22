r"""Gaussian emissions that regress on covariates: linear regression per state and autoregression.

:class:`LinearRegressionEmissions`: :math:`y_t \mid z_t = k \sim \mathcal N(W_k x_t + b_k, \Sigma_k)`
with :math:`x_t` the step's ``inputs`` (the same argument, ``(T, Du)`` per sequence or
``(B, T, Du)`` for a batch, as the LGSSM takes). :class:`AutoregressiveEmissions` (an ARHMM)
regresses on the ``p`` previous emissions of the same sequence, and on inputs if it has any.

**Rows.** The statistics read each step's emission joined to its covariates,
``[y_t, x_t]`` (:meth:`~ssmjax.AbstractEmissions.joined`), so that pooling steps across
sequences, padding and the batched E-step of :func:`ssmjax.fit_em` treat them like any
other family's emissions.

**The first p steps** of an autoregressive model are conditioned on, as in statsmodels'
``MarkovAutoregression`` and the conditional likelihood of an AR model: their rows of
log-likelihoods are zero and they add nothing to the statistics, so the initial
distribution is that of the state at step 0 and the first modelled emission is step ``p``.
When sampling, the lags before step 0 are zero.

**Missing entries.** A step whose emission is entirely NaN is missing (a zero row, nothing
in the statistics); a partly observed step is rejected, and so is any NaN in the emissions
of an autoregressive model (a missing lag would make the step's density an integral over
it) or in ``inputs``.

**M-step.** Weighted least squares per state, exact: with :math:`\tilde x = [x, 1]`, the
statistics are centred on the current fit (residuals :math:`r_{nk} = y_n - W_k x_n - b_k`),
:math:`G_k = \sum_n w_{nk} \tilde x_n \tilde x_n^\top`, :math:`H_k = \sum_n w_{nk} r_{nk} \tilde x_n^\top`,
:math:`S_k = \sum_n w_{nk} r_{nk} r_{nk}^\top`, and the maximiser moves the coefficients by
:math:`\Delta_k = H_k G_k^{-1}` and sets :math:`\Sigma_k = (S_k - \Delta_k H_k^\top) / \sum_n w_{nk}`
(plus ``min_variance`` on the diagonal). Frozen ``weights`` or ``biases`` solve over the
free columns only.
"""

from __future__ import annotations

import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Shaped

from ... import _checks
from ..._padding import unpad
from .base import AbstractExponentialFamilyEmissions, _at_real_steps, _check_weights, _keep_where_empty
from .gaussian import _check_min_variance, _cholesky_field
from .gaussian_ops import (
    _UNROLLED_SOLVE_MAX_DIM,
    _gaussian_full_log_prob,
    _shrunk_moments,
    _soft_clusters,
    _sym_cholesky,
    _unrolled_gaussian_log_density,
)
from .host import generator, key_seed, on_host


class RegressionStats(NamedTuple):
    r"""Sufficient statistics of the regression families, centred on the current fit.

    Attributes:
        sum_weights: ``(K,)``, :math:`\sum_n w_{nk}`.
        gram: ``(K, P + 1, P + 1)``, :math:`\sum_n w_{nk} \tilde x_n \tilde x_n^\top`, :math:`\tilde x = [x, 1]`.
        cross: ``(K, D, P + 1)``, :math:`\sum_n w_{nk} r_{nk} \tilde x_n^\top`.
        outer: ``(K, D, D)``, :math:`\sum_n w_{nk} r_{nk} r_{nk}^\top`.
    """

    sum_weights: Array
    gram: Array
    cross: Array
    outer: Array


def _finite(name, value):
    xp, values = _checks.host_arrays(value)
    return _checks.check_values(value, ~xp.isfinite(values), f"`{name}` must be finite.")


def _lags(emissions, num_lags: int, xp=jnp):
    """``[y_{t-1}, ..., y_{t-p}]`` along the last axis, zeros before the start (time is axis 0)."""
    steps = emissions.shape[0]
    pad = lambda j: xp.zeros((j,) + emissions.shape[1:], emissions.dtype)  # noqa: E731
    return xp.concatenate(
        [xp.concatenate([pad(min(j, steps)), emissions[: max(steps - j, 0)]], axis=0) for j in range(1, num_lags + 1)],
        axis=-1,
    )


class LinearRegressionEmissions(AbstractExponentialFamilyEmissions):
    r"""A linear-Gaussian regression per state, :math:`y_t \sim \mathcal N(W_k x_t + b_k, \Sigma_k)` given ``inputs`` :math:`x_t`.

    Storage: ``weights`` ``(K, D, P)``, ``biases`` ``(K, D)`` and the Cholesky factors
    ``chol_covs`` ``(K, D, D)`` (only the lower triangle is read). Statistics and M-step:
    :mod:`ssmjax._hmm.emissions.regression`.

    Args:
        weights: ``(K, D, P)`` regression coefficients.
        biases: ``(K, D)`` intercepts.
        covs: ``(K, D, D)`` symmetric positive-definite; or pass ``chol_covs`` instead.
        min_variance: ridge added to the covariances by the M-step (a static, non-negative float).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.LinearRegressionEmissions(
        ...     weights=jnp.array([[[1.0]], [[-1.0]]]), biases=jnp.zeros((2, 1)), covs=jnp.ones((2, 1, 1)))
        >>> model.input_dim, model.log_likelihoods(jnp.ones((4, 1)), inputs=jnp.ones((4, 1))).shape
        (1, (4, 2))
    """

    weights: Float[Array, "K D P"]
    biases: Float[Array, "K D"]
    chol_covs: Float[Array, "K D D"]
    min_variance: float = eqx.field(static=True)
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "weights": ("weights",), "biases": ("biases",), "covs": ("chol_covs",)
    }

    @typing.no_type_check
    def __init__(
        self,
        weights: Float[ArrayLike, "K D P"],
        biases: Float[ArrayLike, "K D"],
        covs: Float[ArrayLike, "K D D"] | None = None,
        *,
        chol_covs: Float[ArrayLike, "K D D"] | None = None,
        min_variance: float = 1e-6,
    ):
        if (covs is None) == (chol_covs is None):
            raise ValueError("Pass exactly one of `covs` and `chol_covs`.")
        self.min_variance = _check_min_variance(min_variance)
        weights = _checks.as_float_array("weights", weights)
        _checks.check_shape("weights", weights, ("K", "D", "P"), "one coefficient matrix per state")
        k, d, _ = weights.shape
        biases = _checks.as_float_array("biases", biases, weights.dtype)
        _checks.check_shape("biases", biases, (k, d), "one intercept vector per state")
        self.weights, self.biases = (_finite(name, value) for name, value in (("weights", weights), ("biases", biases)))
        self.chol_covs = _cholesky_field("covs", covs, "chol_covs", chol_covs, (k, d, d), weights.dtype,
                                         "a full covariance matrix per state")

    # -- views -------------------------------------------------------------

    @property
    def num_states(self) -> int:
        return self.weights.shape[0]

    @property
    def emission_dim(self) -> int:
        return self.weights.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.emission_dim,)

    @property
    def num_covariates(self) -> int:
        """``P``: the columns of ``weights`` (inputs, and lags for an autoregressive model)."""
        return self.weights.shape[2]

    @property
    def input_dim(self) -> Optional[int]:
        return self.num_covariates

    @property
    def covs(self) -> Float[Array, "K D D"]:
        chol = jnp.tril(self.chol_covs)
        return chol @ jnp.swapaxes(chol, -1, -2)

    def _with(self, weights, biases, chol_covs):
        return eqx.tree_at(lambda m: (m.weights, m.biases, m.chol_covs), self, (weights, biases, chol_covs))

    # -- checks ------------------------------------------------------------

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not jnp.issubdtype(emissions.dtype, jnp.floating):
            emissions = emissions.astype(self.weights.dtype)
        xp, values, mask = _checks.host_arrays(emissions, mask)
        nan = xp.isnan(values)
        partly = xp.any(nan, axis=-1) & ~xp.all(nan, axis=-1)
        bad = _at_real_steps(xp.isinf(values) | partly[..., None], mask)
        return _checks.check_values(
            emissions, bad,
            f"`emissions` of {type(self).__name__} must be finite; a missing step is NaN in every entry.",
            at="emissions",
        )

    def _input_columns(self) -> int:
        return self.num_covariates

    @typing.no_type_check
    def check_inputs(
        self, inputs: Float[ArrayLike, "N Du"] | None, num_steps: int, mask: Bool[ArrayLike, " N"] | None = None
    ) -> Float[Array, "N Du"] | None:
        width = self._input_columns()
        if inputs is None:
            if width:
                raise ValueError(f"{type(self).__name__} needs `inputs` of shape (T, {width}); got None.")
            return None
        if not width:
            raise ValueError(
                f"`inputs` must be None for this {type(self).__name__} (it has no input columns); "
                f"got an array of shape {jnp.shape(inputs)}."
            )
        return _checks.check_inputs(inputs, num_steps, width, mask, self.weights.dtype)

    def joined(self, emissions: Shaped[Array, "T ..."], inputs: Float[Array, "T ..."] | None) -> Shaped[Array, "T ..."]:
        return jnp.concatenate([emissions.astype(self.weights.dtype), inputs.astype(self.weights.dtype)], axis=-1)

    # -- densities ---------------------------------------------------------

    def _split(self, rows):
        d = self.emission_dim
        y, x = rows[..., :d], rows[..., d:]
        observed = ~jnp.isnan(y[..., 0])
        return jnp.where(observed[..., None], y, 0.0), x, observed

    def _residuals(self, y, x) -> Float[Array, "N K D"]:
        means = jnp.einsum("kdp,np->nkd", self.weights, x) + self.biases[None]
        return y[:, None, :] - means

    def _stacked_log_probs(self, rows, missing) -> Float[Array, "N K"]:
        y, x, observed = self._split(rows)
        means = y[:, None, :] - self._residuals(y, x)  # (N, K, D)
        lls = jax.vmap(lambda m, e: _gaussian_full_log_prob(m, self.chol_covs, e))(means, y)
        return jnp.where(observed[:, None], lls, 0.0)

    def _time_major_log_likelihoods(self, emissions, valid):
        # as the full Gaussian's: elementwise over (T, K, B), the batch as the vectorised axis
        if self.emission_dim > _UNROLLED_SOLVE_MAX_DIM:
            return super()._time_major_log_likelihoods(emissions, valid)
        d = self.emission_dim
        observed = ~jnp.isnan(emissions[..., 0]) & valid  # (T, B); conditioned AR steps read as missing
        y = jnp.where(observed[..., None], emissions[..., :d], 0.0)
        x = jnp.where(valid[..., None], emissions[..., d:], 0.0)
        means = jnp.einsum("kdp,tbp->tkdb", self.weights, x) + self.biases[None, :, :, None]  # (T, K, D, B)
        resid = [y[:, None, :, i] - means[:, :, i] for i in range(d)]
        return jnp.where(observed[:, None, :], _unrolled_gaussian_log_density(resid, self.chol_covs), 0.0)

    def log_prob(
        self, emission: Float[ArrayLike, " D"], covariates: Float[ArrayLike, " P"] | None = None
    ) -> Float[Array, " K"]:
        r"""``log p(y | x, z = k)`` of one step, ``covariates`` :math:`x` its ``P`` regressors (all NaN: ``0``)."""
        emission = self._checked_emission(emission, "one emission vector")
        covariates = _checks.as_float_array("covariates", covariates, self.weights.dtype)
        _checks.check_shape("covariates", covariates, (self.num_covariates,), "the step's regressors")
        return self._stacked_log_probs(jnp.concatenate([emission, covariates])[None], None)[0]

    def sample(
        self, state: Int[ArrayLike, ""], covariates: Float[ArrayLike, " P"] | None = None, *, key: PRNGKeyArray
    ) -> Float[Array, " D"]:
        """One emission from state ``state`` given the step's ``covariates`` ``(P,)``."""
        eps = jax.random.normal(key, (self.emission_dim,), self.weights.dtype)
        mean = self.weights[state] @ covariates + self.biases[state]
        return mean + jnp.tril(self.chol_covs[state]) @ eps

    def _sample_sequence(self, states, inputs, key):
        keys = jax.random.split(key, states.shape[0])
        return jax.vmap(lambda z, u, k: self.sample(z, u, key=k))(states, inputs, keys)

    # -- EM ------------------------------------------------------------------

    @typing.no_type_check
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> RegressionStats:
        """Weighted statistics of pooled rows ``[y, x]`` ``(N, D + P)`` (:meth:`joined`)."""
        rows = _checks.as_float_array("emissions", emissions, self.weights.dtype)
        _checks.check_shape("emissions", rows, ("N", self.emission_dim + self.num_covariates), "rows [y, x]")
        y, x, observed = self._split(rows)
        if mask is not None:  # padded rows may hold anything: keep it out of the products
            mask = jnp.asarray(mask)
            observed = observed & mask
            y = jnp.where(observed[:, None], y, 0.0)
            x = jnp.where(mask[:, None], x, 0.0)
        w = _check_weights(weights, rows.shape[0], self.num_states, mask, rows.dtype)
        w = jnp.where(observed[:, None], w, 0.0)
        x1 = jnp.concatenate([x, jnp.ones(x.shape[:1] + (1,), x.dtype)], axis=-1)
        r = self._residuals(y, x)
        n, k, d = r.shape
        wr = (w[:, :, None] * r).reshape(n, k * d)
        # each sum over the steps is one matrix product of two (N, .) operands; the residuals'
        # outer products come as every pair of states, of which the diagonal blocks are kept
        # (one large product runs faster on CPU than K batched thin ones)
        pairs = (wr.T @ r.reshape(n, k * d)).reshape(k, d, k, d)
        return RegressionStats(
            sum_weights=w.sum(0),
            gram=((w[:, :, None] * x1[:, None, :]).reshape(n, -1).T @ x1).reshape(k, x1.shape[1], x1.shape[1]),
            cross=(wr.T @ x1).reshape(k, d, x1.shape[1]),
            outer=jnp.einsum("kdke->kde", pairs),
        )

    def m_step_from_stats(
        self,
        stats: RegressionStats,
        frozen: AbstractSet[str] = frozenset(),
    ) -> "LinearRegressionEmissions":
        p = self.num_covariates
        free = [i for i in range(p) if "weights" not in frozen] + ([p] if "biases" not in frozen else [])
        dtype = stats.gram.dtype
        delta = jnp.zeros_like(stats.cross)
        outer = stats.outer
        if free:
            idx = np.asarray(free)
            gram = stats.gram[:, idx][:, :, idx]
            cross = stats.cross[:, :, idx]
            # a ridge at round-off scale keeps a singular Gram matrix (a state with fewer steps
            # than coefficients) solvable without moving a well-posed solution
            scale = jnp.trace(gram, axis1=-2, axis2=-1)[:, None, None] / len(free)
            ridge = jnp.finfo(dtype).eps * scale * jnp.eye(len(free), dtype=dtype)
            step = jnp.swapaxes(jnp.linalg.solve(gram + ridge, jnp.swapaxes(cross, -1, -2)), -1, -2)
            delta = delta.at[:, :, idx].set(step)
            outer = outer - step @ jnp.swapaxes(cross, -1, -2)
        empty = stats.sum_weights <= 0
        weights = _keep_where_empty(empty, self.weights + delta[:, :, :p], self.weights)
        biases = _keep_where_empty(empty, self.biases + delta[:, :, p], self.biases)
        chol = self.chol_covs
        if "covs" not in frozen:
            d = self.emission_dim
            covs = outer / jnp.where(empty, 1.0, stats.sum_weights)[:, None, None]
            covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2)) + self.min_variance * jnp.eye(d, dtype=dtype)
            chol = _keep_where_empty(empty, jnp.linalg.cholesky(jnp.where(empty[:, None, None], jnp.eye(d, dtype=dtype), covs)), chol)
        return self._with(weights, biases, chol)

    def parameter_counts(self) -> dict[str, int]:
        k, d, p = self.weights.shape
        return {"weights": k * d * p, "biases": k * d, "covs": k * d * (d + 1) // 2}

    # -- initialisers ------------------------------------------------------

    @classmethod
    def _from_rows(cls, rows, num_states: int, num_covariates: int, extra, *, min_variance, key):
        """The start of :meth:`from_data` from the pooled rows ``[y, x]`` (observed steps only):
        :func:`_regression_start`, on the host."""
        rows = np.asarray(rows)
        rows = rows[~np.isnan(rows).any(axis=1)]
        if rows.shape[0] < num_states:
            raise ValueError(f"need at least num_states={num_states} observed steps to initialise; got {rows.shape[0]}.")
        dim = rows.shape[1] - num_covariates
        dtype = jnp.result_type(float)

        def host(seed, points):
            out = _regression_start(generator(seed), np.asarray(points, np.float64), dim, num_states)
            return tuple(np.asarray(x, dtype) for x in out)

        shapes = (jax.ShapeDtypeStruct((num_states, dim, num_covariates), dtype),
                  jax.ShapeDtypeStruct((num_states, dim), dtype), jax.ShapeDtypeStruct((num_states, dim, dim), dtype))
        weights, biases, chol = on_host(host, shapes, key_seed(key), rows)
        return cls(weights=weights, biases=biases, chol_covs=chol, min_variance=min_variance, **extra)

    @classmethod
    @typing.no_type_check
    def from_data(
        cls,
        emissions: Float[ArrayLike, "T D"] | Float[ArrayLike, "B T D"],
        inputs: Float[ArrayLike, "T P"] | Float[ArrayLike, "B T P"],
        num_states: int,
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        min_variance: float = 1e-6,
        key: PRNGKeyArray,
    ) -> LinearRegressionEmissions:
        """A starting model: k-means on the joined ``[y, x]`` rows, then a least-squares fit within each cluster.

        Args:
            emissions: ``(T, D)`` or a padded batch ``(B, T, D)``.
            inputs: ``(T, P)`` or ``(B, T, P)``, matching.
            num_states: ``K``.
            lengths: ``(B,)`` real steps of a batch (None: all).
            min_variance: passed to the model.
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, ssmjax
            >>> u = jax.random.normal(jax.random.key(0), (200, 2))
            >>> y = u @ jax.numpy.ones((2, 1))
            >>> ssmjax.LinearRegressionEmissions.from_data(y, u, 2, key=jax.random.key(1)).weights.shape
            (2, 1, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions, inputs = np.asarray(emissions, float), np.asarray(inputs, float)
        if emissions.ndim == 2:
            emissions, inputs = emissions[None], inputs[None]
        if emissions.ndim != 3 or inputs.ndim != 3 or inputs.shape[:2] != emissions.shape[:2]:
            raise ValueError(
                "`emissions` (T, D) or (B, T, D) and `inputs` (T, P) or (B, T, P) must match in their leading axes; "
                f"got shapes {emissions.shape} and {inputs.shape}."
            )
        rows = _pooled(np.concatenate([emissions, inputs], axis=-1), lengths)
        return cls._from_rows(rows, num_states, inputs.shape[-1], {}, min_variance=min_variance, key=key)


def _regression_start(rng: np.random.Generator, rows: np.ndarray, dim: int, num_states: int):
    """Weights ``(K, D, P)``, biases ``(K, D)`` and covariance Cholesky factors ``(K, D, D)`` of a
    start, in NumPy and SciPy: each row's responsibilities under the Gaussians of k-means clusters of
    the rows ``[y, x]`` (:func:`._soft_clusters`), then each state's weighted least-squares regression
    of ``y`` on ``[x, 1]`` (:func:`_conditional_regressions` of the weighted moments), the moments
    shrunk toward the pooled ones by ``D + P + 1`` pseudo-rows (:func:`._shrunk_moments`), so that a
    state of few rows still gets a well-posed start."""
    resp = _soft_clusters(rng, rows, num_states, 10)
    means, covs, _ = _shrunk_moments(rows, resp, 1e-6)
    weights, biases, covs = _conditional_regressions(means, covs, dim)
    return weights, biases, _sym_cholesky(covs)


def _conditional_regressions(means: np.ndarray, covs: np.ndarray, dim: int):
    r"""Regressions ``(W, b, Σ)`` of ``y`` on ``x`` from Gaussians over ``[y, x]`` (``means``
    ``(K, D + P)``, ``covs`` ``(K, D + P, D + P)``): each one's conditional,
    :math:`W = \Sigma_{yx} \Sigma_{xx}^{-1}`, :math:`b = \mu_y - W \mu_x`,
    :math:`\Sigma = \Sigma_{yy} - W \Sigma_{xy}`. For weighted moments of rows this is the weighted
    least-squares fit of ``y`` on ``[x, 1]`` (the M-step's maximiser given those weights)."""
    s_yy, s_yx, s_xx = covs[:, :dim, :dim], covs[:, :dim, dim:], covs[:, dim:, dim:]
    weights = np.swapaxes(np.linalg.solve(s_xx, np.swapaxes(s_yx, -1, -2)), -1, -2)
    biases = means[:, :dim] - np.einsum("kdp,kp->kd", weights, means[:, dim:])
    return weights, biases, s_yy - weights @ np.swapaxes(s_yx, -1, -2)


def _autoregressive_rows(emissions, inputs, num_lags: int, xp):
    """Rows ``[y_t, y_{t-1}, ..., y_{t-p}, u_t]`` (time is axis 0), the first ``p`` steps' emission part
    NaN: they are conditioned on, so they read as missing."""
    steps = emissions.shape[0]
    if steps <= num_lags:
        raise ValueError(
            f"an AutoregressiveEmissions with num_lags={num_lags} needs sequences longer than {num_lags} steps; "
            f"got T = {steps}."
        )
    covariates = _lags(emissions, num_lags, xp)
    if inputs is not None:
        covariates = xp.concatenate([covariates, inputs], axis=-1)
    first = (xp.arange(steps) < num_lags).reshape((steps,) + (1,) * (emissions.ndim - 1))
    return xp.concatenate([xp.where(first, np.nan, emissions), covariates], axis=-1)


def _pooled(rows, lengths):
    """The real steps of a padded batch of rows ``(B, T, C)``, pooled to ``(N, C)``."""
    if lengths is None:
        return rows.reshape((-1,) + rows.shape[2:])
    return unpad(rows, _checks.host_copy(lengths), concatenate=True)


class AutoregressiveEmissions(LinearRegressionEmissions):
    r"""Autoregressive Gaussian emissions (an ARHMM): :math:`y_t \sim \mathcal N(\sum_{j=1}^p A_{k,j} y_{t-j} + B_k u_t + b_k, \Sigma_k)`.

    ``weights`` ``(K, D, p D + Du)`` hold the lag matrices :math:`[A_{k,1}, \dots, A_{k,p}]`
    then the input matrix :math:`B_k` (``Du = 0``: no inputs). The first ``p`` steps of each
    sequence are conditioned on (module docstring), so a sequence needs more than ``p`` steps.

    Args:
        weights: ``(K, D, p D + Du)``.
        biases: ``(K, D)``.
        covs: ``(K, D, D)``; or ``chol_covs``.
        num_lags: ``p >= 1``.
        min_variance: as :class:`LinearRegressionEmissions`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> ar = ssmjax.AutoregressiveEmissions(
        ...     weights=jnp.array([[[0.9]], [[-0.5]]]), biases=jnp.zeros((2, 1)), covs=jnp.ones((2, 1, 1)), num_lags=1)
        >>> lls = ar.log_likelihoods(jnp.array([[1.0], [0.8], [0.9]]))
        >>> lls.shape, lls[0].tolist()
        ((3, 2), [0.0, 0.0])
    """

    num_lags: int = eqx.field(static=True)

    @typing.no_type_check
    def __init__(
        self,
        weights: Float[ArrayLike, "K D P"],
        biases: Float[ArrayLike, "K D"],
        covs: Float[ArrayLike, "K D D"] | None = None,
        *,
        num_lags: int,
        chol_covs: Float[ArrayLike, "K D D"] | None = None,
        min_variance: float = 1e-6,
    ):
        num_lags = _checks.positive_int("num_lags", num_lags)
        super().__init__(weights, biases, covs, chol_covs=chol_covs, min_variance=min_variance)
        self.num_lags = num_lags
        if self.num_covariates < self.num_lags * self.emission_dim:
            raise ValueError(
                f"`weights` must have at least num_lags * D = {self.num_lags * self.emission_dim} columns "
                f"(the lag matrices, then any input columns); got shape {tuple(self.weights.shape)}."
            )

    @property
    def input_dim(self) -> Optional[int]:
        width = self._input_columns()
        return width if width else None

    def _input_columns(self) -> int:
        return self.num_covariates - self.num_lags * self.emission_dim

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not jnp.issubdtype(emissions.dtype, jnp.floating):
            emissions = emissions.astype(self.weights.dtype)
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = _at_real_steps(~xp.isfinite(values), mask)
        return _checks.check_values(
            emissions, bad, "`emissions` of an AutoregressiveEmissions must be finite (no missing entries: they are lags too).", at="emissions"
        )

    def joined(self, emissions: Shaped[Array, "T ..."], inputs: Float[Array, "T ..."] | None) -> Shaped[Array, "T ..."]:
        dtype = self.weights.dtype
        return _autoregressive_rows(emissions.astype(dtype), None if inputs is None else inputs.astype(dtype), self.num_lags, jnp)

    def _sample_sequence(self, states, inputs, key):
        p, d = self.num_lags, self.emission_dim
        keys = jax.random.split(key, states.shape[0])
        xs = (states, keys) if inputs is None else (states, keys, inputs)

        def step(history, x):
            covariates = history if inputs is None else jnp.concatenate([history, x[2]])
            y = self.sample(x[0], covariates, key=x[1])
            return jnp.concatenate([y, history[: (p - 1) * d]]), y

        return jax.lax.scan(step, jnp.zeros((p * d,), self.weights.dtype), xs)[1]

    @classmethod
    @typing.no_type_check
    def from_data(
        cls,
        emissions: Float[ArrayLike, "T D"] | Float[ArrayLike, "B T D"],
        num_states: int,
        *,
        num_lags: int = 1,
        inputs: Float[ArrayLike, "T Du"] | Float[ArrayLike, "B T Du"] | None = None,
        lengths: Int[ArrayLike, " B"] | None = None,
        min_variance: float = 1e-6,
        key: PRNGKeyArray,
    ) -> AutoregressiveEmissions:
        """A starting model: k-means on the rows ``[y_t, y_{t-1}, ..., y_{t-p}, u_t]`` of the modelled
        steps, then a least-squares fit within each cluster.

        Example:
            >>> import jax, ssmjax
            >>> y = jax.numpy.cumsum(jax.random.normal(jax.random.key(0), (300, 1)), axis=0)
            >>> ssmjax.AutoregressiveEmissions.from_data(y, 2, num_lags=2, key=jax.random.key(1)).weights.shape
            (2, 1, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions = np.asarray(emissions, float)
        if emissions.ndim == 2:
            emissions = emissions[None]
            inputs = None if inputs is None else np.asarray(inputs, float)[None]
        if emissions.ndim != 3:
            raise ValueError(f"`emissions` must have shape (T, D) or (B, T, D); got shape {emissions.shape}.")
        num_lags = _checks.positive_int("num_lags", num_lags)
        time_first = lambda a: None if a is None else np.swapaxes(np.asarray(a, float), 0, 1)  # noqa: E731
        rows = _autoregressive_rows(time_first(emissions), time_first(inputs), num_lags, np)
        rows = _pooled(np.swapaxes(rows, 0, 1), lengths)
        num_covariates = rows.shape[1] - emissions.shape[-1]
        return cls._from_rows(rows, num_states, num_covariates, {"num_lags": num_lags}, min_variance=min_variance, key=key)
