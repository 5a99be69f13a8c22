r"""Generalised linear models per state: Poisson and Bernoulli regressions on covariates.

:class:`PoissonRegressionEmissions`, :math:`y_{td} \mid z_t = k \sim \mathrm{Poi}(\exp(W_k x_t + b_k)_d)`, and
:class:`BernoulliRegressionEmissions`, :math:`y_{td} \mid z_t = k \sim \mathrm{Bern}(\sigma(W_k x_t + b_k)_d)`,
with :math:`x_t` the step's ``inputs`` (``(T, Du)`` per sequence, ``(B, T, Du)`` for a batch) and
``D`` outputs independent given the state. Both are canonical-link GLMs: with
:math:`\eta = W_k x + b_k`, :math:`\log p(y_d \mid x, z = k) = y_d \eta_d - A(\eta_d) + c(y_d)`
(:math:`A = \exp`, :math:`c(y) = -\log y!` for Poisson; :math:`A = \log(1 + e^\eta)`, :math:`c = 0`
for Bernoulli).

**Rows.** As for :class:`ssmjax.LinearRegressionEmissions`, the statistics read each step's
emission joined to its covariates, ``[y_t, x_t]``.

**Missing entries.** A NaN entry ``y_td`` drops out of the step's log-density and of the
M-step of output ``d`` (the outputs are independent given the state); a fully missing step
contributes nothing. NaN or inf in ``inputs`` at a real step is an error.

**M-step (generalised EM).** There is no closed form: for every state ``k`` and output ``d`` the
M-step maximises the concave :math:`\sum_n w_{nk} o_{nd} \log p(y_{nd} \mid x_n; W_{kd}, b_{kd})`
(:math:`o_{nd} = 1` where :math:`y_{nd}` is observed) by safeguarded Newton steps
(:func:`ssmjax._newton.safeguarded_newton`: the best of several step lengths, ``0`` among them),
so no step lowers the objective and EM never lowers the log-likelihood. The Newton system gets a ridge at
round-off scale (``eps`` times its trace) so that a singular one (fewer distinct covariate
vectors than coefficients) stays solvable; it changes the direction only, not the objective. A
step that is not finite (an output with no weight: a zero system) is dropped. Frozen ``weights``
or ``biases`` solve over the free coefficients only.

**Statistics.** Newton steps re-evaluate the objective at new coefficients, so they need the
data, not fixed-size sums: :class:`GLMStats` keeps one row per pooled step (weights, responses,
which are observed, covariates), padded and missing rows with zero weight. The statistics of
several sequences combine by concatenating rows (:class:`~ssmjax._hmm.emissions.base.AbstractStepStats`);
the HMM's batched E-step computes them once over all ``T * B`` steps of a batch.
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
from jax.scipy.special import gammaln
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Real, Shaped

from ... import _checks
from ..._newton import finite_or_zero, safeguarded_newton
from .base import AbstractExponentialFamilyEmissions, AbstractStepStats, _as_mask, _at_real_steps, _check_weights
from .gaussian_ops import _soft_clusters
from .host import generator, key_seed, on_host
from .regression import _finite, _pooled



class GLMStats(AbstractStepStats):
    """Per-step statistics of the GLM families (one row per pooled step; combine by concatenation).

    Attributes:
        weights: ``(N, K)`` posterior weights, zero at padded steps.
        responses: ``(N, D)`` emissions, zero where missing or padded.
        observed: ``(N, D)``, ``1`` where the entry is observed at a real step, else ``0``.
        covariates: ``(N, Du)`` inputs, zero at padded steps.
    """

    weights: Float[Array, "N K"]
    responses: Float[Array, "N D"]
    observed: Float[Array, "N D"]
    covariates: Float[Array, "N Du"]


# Newton steps per M-step and the step lengths each tries (1, 1/2, 1/4, 1/8, and 0): EM's next
# iterations go on from where these stop, so an M-step need not solve its problem to the end.
NEWTON_STEPS = 3
HALVINGS = 4


def _glm_newton(family, coefs, stats: GLMStats, free):
    """``coefs`` ``(K, D, Du + 1)`` (weights, then bias) after safeguarded Newton steps on the
    columns ``free`` of every (state, output) pair's weighted GLM objective."""
    n = stats.weights.shape[0]
    x1 = jnp.concatenate([stats.covariates, jnp.ones((n, 1), coefs.dtype)], axis=-1)
    xf = x1[:, free]
    num_free = len(free)
    omega = stats.weights[:, :, None] * stats.observed[:, None, :]  # (N, K, D)
    y = stats.responses[:, None, :]
    outer = (xf[:, :, None] * xf[:, None, :]).reshape(n, num_free * num_free)
    k, d = coefs.shape[:2]

    def weighted(values):
        # zero where a step has no weight for the pair, even where its value overflowed there
        return jnp.where(omega > 0, omega * values, 0.0)

    def direction(c):
        eta = jnp.einsum("np,kdp->nkd", x1, c)
        grad = jnp.einsum("nkd,nf->kdf", weighted(y - family._mean(eta)), xf)
        info = (weighted(family._variance(eta)).reshape(n, k * d).T @ outer).reshape(k, d, num_free, num_free)
        ridge = jnp.finfo(c.dtype).eps * jnp.trace(info, axis1=-2, axis2=-1)[..., None, None]
        return finite_or_zero(jnp.linalg.solve(info + ridge * jnp.eye(num_free, dtype=c.dtype), grad[..., None])[..., 0])

    def gain(c, step, length):
        # objective(c + length * step) - objective(c), term by term (no cancellation between sums)
        change = length * jnp.einsum("nf,kdf->nkd", xf, step)
        eta = jnp.einsum("np,kdp->nkd", x1, c)
        return jnp.sum(weighted(y * change - family._cumulant_increase(eta, change)), axis=0)

    return safeguarded_newton(coefs, direction, gain, lambda c, length, step: c.at[..., free].add(length[..., None] * step),
                              num_steps=NEWTON_STEPS, halvings=HALVINGS)


class AbstractGLMEmissions(AbstractExponentialFamilyEmissions):
    r"""A canonical-link GLM per state on covariates: :math:`\log p(y_d \mid x, z = k) = y_d \eta_{kd} - A(\eta_{kd}) + c(y_d)`.

    :math:`\eta_k = W_k x + b_k`; ``weights`` ``(K, D, Du)``, ``biases`` ``(K, D)``. A family
    gives its cumulant :math:`A` (with its first two derivatives), :math:`c`, the valid values
    and a sampler. Statistics and M-step: :mod:`ssmjax._hmm.emissions.glm`.
    """

    weights: Float[Array, "K D Du"]
    biases: Float[Array, "K D"]
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {"weights": ("weights",), "biases": ("biases",)}
    # the Newton steps evaluate the cumulant at every step for every state and output (ssmjax._fit.compiler)
    _prefers_fusion_emitters: ClassVar[bool] = True

    @typing.no_type_check
    def __init__(self, weights: Float[ArrayLike, "K D Du"], biases: Float[ArrayLike, "K D"]):
        weights = _checks.as_float_array("weights", weights)
        _checks.check_shape("weights", weights, ("K", "D", "Du"), "one coefficient matrix per state")
        k, d, du = weights.shape
        if du < 1:
            raise ValueError(
                f"`weights` must have at least one input column (shape (K, D, Du), Du >= 1); got shape {weights.shape}."
            )
        biases = _checks.as_float_array("biases", biases, weights.dtype)
        _checks.check_shape("biases", biases, (k, d), "one intercept vector per state")
        self.weights, self.biases = _finite("weights", weights), _finite("biases", biases)

    # -- the family ----------------------------------------------------------

    _values: ClassVar[str]  # what a valid emission entry is, for messages

    @staticmethod
    @abc.abstractmethod
    def _cumulant(eta):
        """:math:`A(\\eta)`."""

    @staticmethod
    @abc.abstractmethod
    def _cumulant_increase(eta, change):
        """:math:`A(\\eta + \\delta) - A(\\eta)`, accurate when the change is small."""

    @staticmethod
    @abc.abstractmethod
    def _mean(eta):
        """:math:`A'(\\eta)`, the mean of ``y``."""

    @staticmethod
    @abc.abstractmethod
    def _variance(eta):
        """:math:`A''(\\eta)`, the variance of ``y``."""

    @staticmethod
    @abc.abstractmethod
    def _log_base(y):
        """:math:`c(y)`."""

    @staticmethod
    @abc.abstractmethod
    def _invalid(xp, values):
        """Flags of entries that are not valid emissions (NaN, a missing entry, is valid)."""

    @staticmethod
    @abc.abstractmethod
    def _draw(key, eta):
        """Emissions drawn at linear predictors ``eta``."""

    @staticmethod
    @abc.abstractmethod
    def _link(mean):
        """:math:`(A')^{-1}`, of means clipped inside the family's range (the initialiser's start)."""

    # -- views -------------------------------------------------------------

    @property
    def num_states(self) -> int:
        return self.weights.shape[0]

    @property
    def emission_dim(self) -> int:
        """Number of outputs ``D``."""
        return self.weights.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return (self.emission_dim,)

    @property
    def input_dim(self) -> Optional[int]:
        return self.weights.shape[2]

    # -- checks ------------------------------------------------------------

    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.number) or jnp.issubdtype(emissions.dtype, jnp.bool_)):
            raise ValueError(f"`emissions` of a {type(self).__name__} must hold {self._values}; got dtype {emissions.dtype}.")
        if jnp.issubdtype(emissions.dtype, jnp.bool_):
            emissions = emissions.astype(jnp.int32)
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = _at_real_steps(self._invalid(xp, values), mask)
        message = f"`emissions` of a {type(self).__name__} must be {self._values} (NaN for missing)"
        if xp is np and bad.any():
            message += f"; got {values[bad][0].item()!r}"
        return _checks.check_values(emissions, bad, message + ".", at="emissions")

    @typing.no_type_check
    def check_inputs(
        self, inputs: Float[ArrayLike, "N Du"] | None, num_steps: int, mask: Bool[ArrayLike, " N"] | None = None
    ) -> Float[Array, "N Du"] | None:
        if inputs is None:
            raise ValueError(f"{type(self).__name__} needs `inputs` of shape (T, {self.input_dim}); got None.")
        return _checks.check_inputs(inputs, num_steps, self.input_dim, mask, self.weights.dtype)

    def joined(self, emissions: Shaped[Array, "T ..."], inputs: Float[Array, "T ..."] | None) -> Shaped[Array, "T ..."]:
        dtype = self.weights.dtype
        return jnp.concatenate([emissions.astype(dtype), inputs.astype(dtype)], axis=-1)

    # -- densities ---------------------------------------------------------

    def _split(self, rows, real=None):
        """``(y, x, observed)`` of rows ``[y, x]``: missing and padded entries of ``y`` and padded ``x``
        set to 0 so that no NaN reaches values or gradients; ``real`` flags the real steps."""
        d = self.emission_dim
        y, x = rows[..., :d], rows[..., d:]
        observed = ~jnp.isnan(y)
        if real is not None:
            observed = observed & real[..., None]
            x = jnp.where(real[..., None], x, 0.0)
        return jnp.where(observed, y, 0.0), x, observed

    def _log_densities(self, y, x, observed) -> Float[Array, "... K"]:
        eta = jnp.einsum("...p,kdp->...kd", x, self.weights) + self.biases
        terms = y[..., None, :] * eta - self._cumulant(eta) + self._log_base(y)[..., None, :]
        return jnp.sum(jnp.where(observed[..., None, :], terms, 0.0), axis=-1)

    def _stacked_log_probs(self, rows, missing) -> Float[Array, "N K"]:
        return self._log_densities(*self._split(rows))

    def _time_major_log_likelihoods(self, emissions, valid):
        return jnp.swapaxes(self._log_densities(*self._split(emissions, valid)), 1, 2)

    def log_prob(
        self, emission: Real[ArrayLike, " D"], covariates: Float[ArrayLike, " Du"] | None = None
    ) -> Float[Array, " K"]:
        r"""``log p(y | x, z = k)`` of one step, ``covariates`` :math:`x` its ``(Du,)`` inputs."""
        emission = self._checked_emission(emission, "one emission vector")
        covariates = self._checked_covariates(covariates)
        return self._stacked_log_probs(self.joined(emission[None], covariates[None]), None)[0]

    def _checked_covariates(self, covariates):
        if covariates is None:
            raise ValueError(f"`covariates` of shape ({self.input_dim},) are required; got None.")
        covariates = _checks.as_float_array("covariates", covariates, self.weights.dtype)
        _checks.check_shape("covariates", covariates, (self.input_dim,), "the step's inputs")
        xp, values = _checks.host_arrays(covariates)
        return _checks.check_values(covariates, ~xp.isfinite(values), "`covariates` must be finite.")

    def sample(
        self, state: Int[ArrayLike, ""], covariates: Float[ArrayLike, " Du"] | None = None, *, key: PRNGKeyArray
    ) -> Real[Array, " D"]:
        """One emission ``(D,)`` from state ``state`` given the step's ``covariates`` ``(Du,)``."""
        return self._draw(key, self.weights[state] @ covariates + self.biases[state])

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
    ) -> GLMStats:
        """Per-step statistics of pooled rows ``[y, x]`` ``(N, D + Du)`` (:meth:`joined`)."""
        rows = _checks.to_device(emissions)
        d = self.emission_dim
        _checks.check_shape("emissions", rows, ("N", d + self.input_dim), "rows [y, x]")
        n = rows.shape[0]
        mask = _as_mask("mask", mask, n)
        dtype = self.weights.dtype
        y = self.check_emissions(rows[:, :d], mask).astype(dtype)
        x = _checks.check_inputs(rows[:, d:], n, self.input_dim, mask, dtype)
        y, x, observed = self._split(jnp.concatenate([y, x], axis=1), mask)
        w = _check_weights(weights, n, self.num_states, mask, dtype)
        return GLMStats(weights=w, responses=y, observed=observed.astype(dtype), covariates=x)

    def m_step_from_stats(self, stats: GLMStats, frozen: AbstractSet[str] = frozenset()) -> "AbstractGLMEmissions":
        du = self.input_dim
        free = [i for i in range(du) if "weights" not in frozen] + ([du] if "biases" not in frozen else [])
        if not free:
            return self
        coefs = jnp.concatenate([self.weights, self.biases[..., None]], axis=-1)
        coefs = _glm_newton(self, coefs, stats, np.asarray(free))
        return eqx.tree_at(lambda m: (m.weights, m.biases), self, (coefs[..., :du], coefs[..., du]))

    def parameter_counts(self) -> dict[str, int]:
        k, d, du = self.weights.shape
        return {"weights": k * d * du, "biases": k * d}

    # -- initialiser ---------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def from_data(
        cls,
        emissions: Real[ArrayLike, "T D"] | Real[ArrayLike, "B T D"],
        inputs: Float[ArrayLike, "T Du"] | Float[ArrayLike, "B T Du"],
        num_states: int,
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        key: PRNGKeyArray,
    ) -> AbstractGLMEmissions:
        """A starting model: soft clusters of the steps, then one M-step.

        k-means on the standardised rows ``[g(y), x]`` (``g = log1p`` for counts; missing entries
        at their column's mean) gives responsibilities from the clusters' Gaussians (as
        :meth:`ssmjax.GaussianEmissions.from_data`), mixed half and half with uniform ones so that
        no state's first fit separates its data perfectly (infinite coefficients). Each state
        then starts from the intercepts of its weighted means and takes one M-step.

        Args:
            emissions: ``(T, D)`` or a padded batch ``(B, T, D)``.
            inputs: ``(T, Du)`` or ``(B, T, Du)``, matching.
            num_states: ``K``.
            lengths: ``(B,)`` real steps of a batch (None: all).
            key: PRNG key (keyword-only).

        Example:
            >>> import jax, ssmjax
            >>> u = jax.random.normal(jax.random.key(0), (100, 2))
            >>> y = jax.random.poisson(jax.random.key(1), jax.numpy.exp(u[:, :1]))
            >>> ssmjax.PoissonRegressionEmissions.from_data(y, u, 2, key=jax.random.key(2)).weights.shape
            (2, 1, 2)
        """
        num_states = _checks.positive_int("num_states", num_states)
        emissions, inputs = np.asarray(emissions), np.asarray(inputs, float)
        if emissions.ndim == 2:
            emissions, inputs = emissions[None], inputs[None]
        if emissions.ndim != 3 or inputs.ndim != 3 or inputs.shape[:2] != emissions.shape[:2]:
            raise ValueError(
                "`emissions` (T, D) or (B, T, D) and `inputs` (T, Du) or (B, T, Du) must match in their leading axes; "
                f"got shapes {emissions.shape} and {inputs.shape}."
            )
        dtype = jnp.result_type(float)
        d, du = emissions.shape[-1], inputs.shape[-1]
        start = cls(weights=np.zeros((num_states, d, du), dtype), biases=np.zeros((num_states, d), dtype))
        y = _pooled(emissions, lengths)
        x = _checks.check_inputs(_pooled(inputs, lengths), y.shape[0], du)
        y = np.asarray(start.check_emissions(y), dtype)
        keep = ~np.isnan(y).all(axis=1)
        if keep.sum() < num_states:
            raise ValueError(f"need at least num_states={num_states} observed steps to initialise; got {keep.sum()}.")
        if np.isnan(y[keep]).all(axis=0).any():
            raise ValueError("`emissions` must have an observed (non-NaN) entry in every dimension.")
        y, x = y[keep], np.asarray(x, dtype)[keep]
        # the clusters, on the host: standardised [g(y), x], a missing entry at its column's mean
        level = np.log1p(np.abs(y))
        level = np.where(np.isnan(level), np.nanmean(level, axis=0), level)
        features = np.concatenate([level, x], axis=1)
        spread = np.std(features, axis=0)
        features = (features - features.mean(0)) / np.where(spread > 0, spread, 1.0)
        shape = jax.ShapeDtypeStruct((features.shape[0], num_states), dtype)
        resp = on_host(lambda seed, f: _soft_clusters(generator(seed), f, num_states, 10).astype(dtype), shape,
                       key_seed(key), features)
        with _checks.value_checks(False):  # rows checked above
            return _initialise(start, _checks.to_device(np.concatenate([y, x], axis=1)), _checks.to_device(resp))


@eqx.filter_jit
def _initialise(start, rows, resp):
    """The start from the clusters' responsibilities ``resp``: their intercepts and one M-step, one
    compiled program (op by op, it compiled dozens of kernels)."""
    y, x, observed = start._split(rows)
    resp = 0.5 * resp + 0.5 / start.num_states
    obs = observed.astype(rows.dtype)
    means = (resp.T @ y) / (resp.T @ obs)  # (K, D); every column has an observed entry
    start = eqx.tree_at(lambda m: m.biases, start, start._link(means))
    return start.m_step_from_stats(start.suff_stats(rows, resp))


class PoissonRegressionEmissions(AbstractGLMEmissions):
    r"""Poisson regression per state: :math:`y_{td} \mid z_t = k \sim \mathrm{Poi}(\exp(W_k x_t + b_k)_d)` given ``inputs`` :math:`x_t`.

    Emissions are ``D`` non-negative integer counts per step (integer dtype, or float with
    integral values and NaN for a missing count). M-step: Newton steps on each state's
    weighted Poisson regression (:mod:`ssmjax._hmm.emissions.glm`), so :func:`ssmjax.fit_em`
    runs a generalised EM.

    Args:
        weights: ``(K, D, Du)`` coefficients of the log-rates.
        biases: ``(K, D)`` intercepts of the log-rates.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.PoissonRegressionEmissions(weights=jnp.array([[[1.0]], [[-1.0]]]), biases=jnp.zeros((2, 1)))
        >>> lls = model.log_likelihoods(jnp.array([[0], [3]]), inputs=jnp.array([[0.0], [1.0]]))
        >>> lls.shape, round(float(lls[0, 0]), 4)
        ((2, 2), -1.0)
    """

    _values: ClassVar[str] = "non-negative integer counts"

    @staticmethod
    def _cumulant(eta):
        return jnp.exp(eta)

    @staticmethod
    def _cumulant_increase(eta, change):
        return jnp.exp(eta) * jnp.expm1(change)

    @staticmethod
    def _mean(eta):
        return jnp.exp(eta)

    @staticmethod
    def _variance(eta):
        return jnp.exp(eta)

    @staticmethod
    def _log_base(y):
        return -gammaln(y + 1.0)

    @staticmethod
    def _invalid(xp, values):
        if not xp.issubdtype(values.dtype, xp.floating):
            return values < 0
        return ((values < 0) | (values != xp.floor(values)) | xp.isinf(values)) & ~xp.isnan(values)

    @staticmethod
    def _draw(key, eta):
        return jax.random.poisson(key, jnp.exp(eta)).astype(jnp.int32)

    @staticmethod
    def _link(mean):
        return jnp.log(jnp.maximum(mean, 1e-3))


class BernoulliRegressionEmissions(AbstractGLMEmissions):
    r"""Logistic regression per state: :math:`y_{td} \mid z_t = k \sim \mathrm{Bern}(\sigma(W_k x_t + b_k)_d)` given ``inputs`` :math:`x_t`.

    Emissions are ``D`` outcomes in ``{0, 1}`` per step (bool, integer or float dtype; NaN for
    a missing outcome). M-step: Newton steps on each state's weighted logistic regression
    (:mod:`ssmjax._hmm.emissions.glm`), so :func:`ssmjax.fit_em` runs a generalised EM.

    Args:
        weights: ``(K, D, Du)`` coefficients of the log-odds.
        biases: ``(K, D)`` intercepts of the log-odds.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.BernoulliRegressionEmissions(weights=jnp.array([[[2.0]], [[-2.0]]]), biases=jnp.zeros((2, 1)))
        >>> lls = model.log_likelihoods(jnp.array([[1], [0]]), inputs=jnp.array([[0.0], [1.0]]))
        >>> lls.shape, round(float(lls[0, 0]), 4)
        ((2, 2), -0.6931)
    """

    _values: ClassVar[str] = "0 or 1"

    @staticmethod
    def _cumulant(eta):
        return jax.nn.softplus(eta)

    @staticmethod
    def _cumulant_increase(eta, change):
        # softplus(eta + change) - softplus(eta) = log1p(expm1(change) sigmoid(eta)), with the
        # roles of the two terms swapped for a positive change so that expm1 cannot overflow
        down = jnp.log1p(jnp.expm1(-jnp.abs(change)) * jax.nn.sigmoid(jnp.where(change > 0, -eta, eta)))
        return jnp.where(change > 0, change + down, down)

    @staticmethod
    def _mean(eta):
        return jax.nn.sigmoid(eta)

    @staticmethod
    def _variance(eta):
        return jax.nn.sigmoid(eta) * jax.nn.sigmoid(-eta)

    @staticmethod
    def _log_base(y):
        return jnp.zeros_like(y)

    @staticmethod
    def _invalid(xp, values):
        bad = (values != 0) & (values != 1)
        return bad & ~xp.isnan(values) if xp.issubdtype(values.dtype, xp.floating) else bad

    @staticmethod
    def _draw(key, eta):
        return jax.random.bernoulli(key, jax.nn.sigmoid(eta)).astype(jnp.int32)

    @staticmethod
    def _link(mean):
        mean = jnp.clip(mean, 0.01, 0.99)
        return jnp.log(mean) - jnp.log1p(-mean)
