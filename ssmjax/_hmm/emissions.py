r"""Emission models for discrete-state hidden Markov models.

An emission model holds, for each of ``K`` hidden states, a distribution
:math:`p(y_t \mid z_t = k)` over one time step's emission :math:`y_t`. Its one
job in inference is to turn a sequence of emissions into the ``(T, K)`` matrix
``log_likelihoods[t, k] = log p(y_t | z_t = k)`` that :func:`ssmjax.hmm_filter`
and friends take (time convention: :mod:`ssmjax._types`).

The interface (:class:`AbstractEmissions`) is small so users can add families;
families with summable sufficient statistics and a closed-form maximiser
subclass :class:`AbstractExponentialFamilyEmissions`, which gives them
:meth:`~AbstractEmissions.m_step` for expectation-maximisation (EM).

Storage is unconstrained (STYLE §6): categorical ``logits``, Poisson
``log_rates``, Gaussian ``means`` with Cholesky factors ``chol_covs`` (full) or
``log_variances`` (diagonal). Any array value of those fields is a valid model,
so gradient-based fitting (optax) needs no bijectors. Constructors take the
constrained values (``probs``, ``rates``, ``covs``) and validate them; the
constrained views are read back through properties of the same names.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import NamedTuple, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

from .. import _checks

__all__ = [
    "AbstractEmissions",
    "AbstractExponentialFamilyEmissions",
    "NoClosedFormMStepError",
    "CategoricalEmissions",
    "GaussianEmissions",
    "PoissonEmissions",
    "CategoricalStats",
    "GaussianStats",
    "PoissonStats",
]


class NoClosedFormMStepError(NotImplementedError):
    """Raised by :meth:`AbstractEmissions.m_step` for a family without a closed-form M-step.

    Fitting code catches it (or tests :attr:`AbstractEmissions.has_closed_form_m_step`
    first) and falls back to gradient steps on the expected complete-data
    log-likelihood ``sum_n sum_k weights[n, k] * log_prob(emissions[n])[k]``.
    """


# --------------------------------------------------------------------------- helpers


@jax.jit
def softmax_rows(logits: Float[Array, "*K C"]) -> Float[Array, "*K C"]:
    """``jax.nn.softmax`` over the last axis, compiled as one program (eagerly it runs ~5 kernels,
    each compiled on first use); inlined under a trace."""
    return jax.nn.softmax(logits, axis=-1)


@jax.jit
def _sym_cholesky(covs: Float[Array, "*K D D"]) -> Float[Array, "*K D D"]:
    """Cholesky factor of the symmetric part, one compiled program (eagerly: four)."""
    return jnp.linalg.cholesky(0.5 * (covs + jnp.swapaxes(covs, -1, -2)))


def _step_mask(num_steps: int, length) -> Optional[jax.Array]:
    """Boolean (N,) mask of real steps, or None when every step is real."""
    length = _checks.check_length(length, num_steps)
    if length is None:
        return None
    if _checks.host_namespace(length) is np:  # concrete: no eager kernels
        return jnp.asarray(np.arange(num_steps) < int(length))
    return jnp.arange(num_steps) < length


def _as_mask(name: str, mask, num_steps: int) -> Optional[jax.Array]:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    _checks.check_shape(name, mask, (num_steps,), "one flag per pooled step, True for real steps")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"`{name}` must be a boolean array; got dtype {mask.dtype}.")
    return mask


def _fill_padding(emissions: jax.Array, mask: Optional[jax.Array], fill) -> jax.Array:
    """Replace emissions at padded steps by ``fill`` (so garbage never reaches the maths)."""
    if mask is None:
        return emissions
    m = mask.reshape(mask.shape + (1,) * (emissions.ndim - 1))
    return jnp.where(m, emissions, jnp.asarray(fill, emissions.dtype))


# --------------------------------------------------------------------------- interface


class AbstractEmissions(eqx.Module):
    r"""Interface of an HMM emission model: one distribution per hidden state.

    To add a family, subclass and implement the five abstract members:

    * ``num_states`` (property): the number of hidden states ``K``.
    * ``emission_shape`` (property): the shape of ONE time step's emission,
      ``()`` for a scalar symbol, ``(D,)`` for a vector.
    * ``log_prob(emission) -> Float[Array, "K"]``: per-state log-densities of ONE
      step's emission, ``log p(y | z = k)`` for ``k = 0..K-1``. It may assume a
      valid emission (validation is ``check_emissions``'s job) and must be pure
      JAX so that it jits, vmaps and differentiates.
    * ``sample(key, state)``: draw one emission given an integer state.
    * ``check_emissions(emissions, mask=None)``: value-check a stack of emissions
      of shape ``(N, *emission_shape)`` and return them guarded (use
      :func:`ssmjax._checks.check_values`, which raises ``ValueError`` eagerly and
      inserts a run-time check under ``jit``); steps where ``mask`` is ``False``
      are padding and must not be checked. Families without value constraints
      write ``return emissions``.

    Everything else is final (concrete here, never overridden):
    :meth:`log_likelihoods` maps ``log_prob`` over time, and :meth:`m_step`
    dispatches to the closed-form M-step of
    :class:`AbstractExponentialFamilyEmissions` or raises
    :class:`NoClosedFormMStepError`.

    ``log_likelihoods`` is a final *method* rather than a free function because
    it is generic in ``log_prob`` alone: every family gets the same batching,
    shape check and padding rule, and it reads naturally at the call site
    (``hmm_filter(pi, A, emissions_model.log_likelihoods(ys))``).

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> class Exponential(ssmjax.AbstractEmissions):
        ...     log_rates: jax.Array
        ...     @property
        ...     def num_states(self): return self.log_rates.shape[0]
        ...     @property
        ...     def emission_shape(self): return ()
        ...     def log_prob(self, emission):
        ...         return self.log_rates - jnp.exp(self.log_rates) * emission
        ...     def sample(self, key, state):
        ...         return jax.random.exponential(key) / jnp.exp(self.log_rates[state])
        ...     def check_emissions(self, emissions, mask=None):
        ...         return emissions
        >>> Exponential(jnp.zeros(3)).log_likelihoods(jnp.ones(5)).shape
        (5, 3)
    """

    @property
    @abc.abstractmethod
    def num_states(self) -> int:
        """Number of hidden states ``K``."""

    @property
    @abc.abstractmethod
    def emission_shape(self) -> tuple[int, ...]:
        """Shape of one time step's emission (``()`` for scalars)."""

    @abc.abstractmethod
    def log_prob(self, emission) -> Float[Array, " K"]:
        """Per-state log-likelihoods ``log p(emission | z = k)`` of ONE step's emission."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, state) -> Array:
        """One emission drawn from state ``state`` (an integer scalar)."""

    @abc.abstractmethod
    def check_emissions(self, emissions, mask=None) -> Array:
        """Value-check ``emissions`` of shape ``(N, *emission_shape)``; return them guarded."""

    # -- final -------------------------------------------------------------

    def log_likelihoods(self, emissions, *, length=None) -> Float[Array, "T K"]:
        r"""Log-likelihood matrix of a sequence: ``out[t, k] = log p(y_t | z_t = k)``.

        This is the ``log_likelihoods`` argument of :func:`ssmjax.hmm_filter`.
        Final: implemented once for every family from :meth:`log_prob`.

        Args:
            emissions: one sequence, shape ``(T, *emission_shape)``.
            length: optional number of real steps (see :mod:`ssmjax._types`).
                Steps ``t >= length`` are padding: they are neither checked nor
                evaluated, whatever they contain, and their rows are ``0``.

        Returns:
            Array of shape ``(T, K)``.

        Raises:
            ValueError: wrong shape or dtype of ``emissions`` (always), invalid
                values at real steps (eagerly; a run-time error under ``jit``).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> model = ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [5.0]]))
            >>> model.log_likelihoods(jnp.array([[0], [3], [7]])).shape
            (3, 2)
        """
        emissions = _checks.to_device(emissions)
        shape = tuple(self.emission_shape)
        _checks.check_shape("emissions", emissions, ("T",) + shape, "one emission per time step")
        num_steps = emissions.shape[0]
        mask = _step_mask(num_steps, length)
        emissions = self.check_emissions(emissions, mask)
        if mask is not None:
            # padded steps get the first (real) step's emission so log_prob and
            # its gradient only ever see valid inputs
            m = mask.reshape(mask.shape + (1,) * len(shape))
            emissions = jnp.where(m, emissions, emissions[:1])
        with _checks.value_checks(False):  # already checked above, in one reduction
            lls = jax.vmap(self.log_prob)(emissions)
        if mask is not None:
            lls = jnp.where(mask[:, None], lls, 0.0)
        return lls

    def _time_major_log_likelihoods(
        self, emissions, valid: Bool[Array, "T B"]
    ) -> Float[Array, "T K B"]:
        """State-major log-likelihoods of a time-major padded batch (the EM E-step's layout).

        ``emissions`` is ``(T, B, *emission_shape)``, already checked; ``out[t, k, b] =
        log p(emissions[t, b] | z = k)`` at real steps and ``0`` at padded ones (whose
        emissions may hold anything). Families may override it with a faster formula
        (:class:`GaussianEmissions` does); it must equal this default.
        """
        num_steps, num_seq = valid.shape
        shape = emissions.shape[2:]
        # padded steps evaluate step 0 of their sequence (always real) instead
        safe = jnp.where(valid.reshape(valid.shape + (1,) * len(shape)), emissions, emissions[:1])
        with _checks.value_checks(False):
            lls = jax.vmap(self.log_prob)(safe.reshape((num_steps * num_seq,) + shape))
        lls = jnp.swapaxes(lls.reshape(num_steps, num_seq, -1), 1, 2)
        return jnp.where(valid[:, None, :], lls, 0.0)

    @property
    def has_closed_form_m_step(self) -> bool:
        """Whether :meth:`m_step` is available (the family has summable sufficient statistics)."""
        return isinstance(self, AbstractExponentialFamilyEmissions)

    def m_step(self, emissions, weights, mask=None) -> "AbstractEmissions":
        r"""Closed-form M-step: the model maximising the weighted log-likelihood.

        Solves :math:`\max_\theta \sum_n \sum_k w_{nk} \log p_\theta(y_n \mid z = k)`
        over steps ``n`` pooled across all time steps of all sequences, with
        ``w = weights`` the posterior responsibilities (``smoothed_probs``).
        Equivalent to ``self.m_step_from_stats(self.suff_stats(emissions, weights, mask))``.

        Contract: a state whose total responsibility is zero keeps its current
        parameters (no NaN). Families without a closed form raise
        :class:`NoClosedFormMStepError` (check :attr:`has_closed_form_m_step`).

        Args:
            emissions: pooled emissions, shape ``(N, *emission_shape)``.
            weights: responsibilities, shape ``(N, K)``, non-negative.
            mask: optional boolean ``(N,)``; ``False`` marks padded steps, which
                are ignored whatever their emissions and weights contain.

        Returns:
            A new model of the same class.

        Raises:
            NoClosedFormMStepError: the family has no closed-form M-step.
        """
        if not isinstance(self, AbstractExponentialFamilyEmissions):
            raise NoClosedFormMStepError(
                f"{type(self).__name__} has no closed-form M-step (it does not subclass "
                "AbstractExponentialFamilyEmissions); fit its parameters by gradient steps instead."
            )
        return self.m_step_from_stats(self.suff_stats(emissions, weights, mask))


class AbstractExponentialFamilyEmissions(AbstractEmissions):
    r"""Emission families with summable sufficient statistics and a closed-form M-step.

    EM over batches or devices computes statistics per chunk, reduces them with
    ``jax.tree.map(jnp.add, stats_a, stats_b)`` (or ``jax.lax.psum``), then calls
    :meth:`m_step_from_stats` once. Statistics are a pytree of arrays whose
    leading axis is ``K``; they are linear in ``weights``, so the statistics of a
    concatenation equal the sum of the statistics of its parts.

    Statistics are computed by an *instance* and may depend on its current
    parameters (the Gaussian family centres its moments on the current means for
    numerical accuracy), so pass them to ``m_step_from_stats`` of the same
    instance that computed them, as EM does.

    Subclasses implement :meth:`suff_stats` and :meth:`m_step_from_stats`; in
    ``m_step_from_stats`` a state with zero total weight keeps its parameters.
    """

    @abc.abstractmethod
    def suff_stats(self, emissions, weights, mask=None) -> PyTree[Array]:
        """Weighted sufficient statistics of pooled ``emissions`` ``(N, ...)``, ``weights`` ``(N, K)``."""

    @abc.abstractmethod
    def m_step_from_stats(self, stats: PyTree[Array], frozen=frozenset()) -> "AbstractExponentialFamilyEmissions":
        """The maximiser given (summed) statistics; empty states keep their parameters.

        ``frozen`` names parameters (``"rates"``, ``"probs"``, ``"means"``, ``"covs"``)
        kept at their current values; the others get their exact maximiser given
        them (e.g. Gaussian covariances about frozen means).
        """


def _check_weights(weights, num_steps: int, num_states: int, mask, dtype) -> jax.Array:
    weights = _checks.as_float_array("weights", weights, dtype)
    _checks.check_shape("weights", weights, (num_steps, num_states), "responsibilities, one row per pooled step")
    if mask is not None:
        weights = jnp.where(mask[:, None], weights, 0.0)
    bad = (weights < 0) | ~jnp.isfinite(weights)
    return _checks.check_values(
        weights, bad, "`weights` must be finite and non-negative at unpadded steps."
    )


def _keep_where_empty(empty: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    e = empty.reshape(empty.shape + (1,) * (new.ndim - 1))
    return jnp.where(e, old, new)


# --------------------------------------------------------------------------- categorical


class CategoricalStats(NamedTuple):
    """Sufficient statistics of :class:`CategoricalEmissions`.

    Attributes:
        counts: ``(K, C)``, ``counts[k, c] = sum_n weights[n, k] * [y_n == c]``.
    """

    counts: Array


def _categorical_log_prob(logits: Float[Array, "K C"], emission: Int[Array, ""]) -> Float[Array, " K"]:
    return jax.nn.log_softmax(logits, axis=-1)[:, emission]


class CategoricalEmissions(AbstractExponentialFamilyEmissions):
    r"""Categorical emissions: :math:`p(y_t = c \mid z_t = k) = \mathrm{probs}[k, c]`.

    The emission at each step is one integer symbol in ``[0, C)``.

    Storage: ``logits`` (``(K, C)``), with ``probs = softmax(logits, axis=-1)``.
    Structural zeros in ``probs`` become ``logits = -inf``; ``log_prob`` is then
    exactly ``-inf`` for those symbols and finite elsewhere, without NaN, and
    gradients with respect to the finite logits stay finite. (A row of all
    ``-inf`` is not a distribution; the constructor cannot produce one.)

    Args:
        probs: ``(K, C)`` row-stochastic matrix (keyword or first positional).
        logits: alternatively, unconstrained ``(K, C)`` logits (keyword only).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.CategoricalEmissions(probs=jnp.array([[0.9, 0.1], [0.2, 0.8]]))
        >>> model.log_likelihoods(jnp.array([0, 1, 1])).shape
        (3, 2)
    """

    logits: Float[Array, "K C"]

    def __init__(self, probs=None, *, logits=None):
        if (probs is None) == (logits is None):
            raise ValueError("Pass exactly one of `probs` and `logits`.")
        if probs is not None:
            probs = _checks.as_float_array("probs", probs)
            _checks.check_shape("probs", probs, ("K", "C"), "one row of symbol probabilities per state")
            probs = _checks.check_probability_vector("probs", probs)
            self.logits = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
        else:
            logits = _checks.as_float_array("logits", logits)
            _checks.check_shape("logits", logits, ("K", "C"))
            self.logits = logits

    @property
    def num_states(self) -> int:
        return self.logits.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of symbols ``C``."""
        return self.logits.shape[1]

    @property
    def emission_shape(self) -> tuple[int, ...]:
        return ()

    @property
    def probs(self) -> Float[Array, "K C"]:
        """Emission probabilities, ``(K, C)``."""
        return softmax_rows(self.logits)

    def check_emissions(self, emissions, mask=None) -> Array:
        emissions = _checks.to_device(emissions)
        if not jnp.issubdtype(emissions.dtype, jnp.integer):
            raise ValueError(
                f"`emissions` of a categorical model must hold integer symbols; got dtype {emissions.dtype}."
            )
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = (values < 0) | (values >= self.num_classes)
        if mask is not None:
            bad = bad & mask.reshape(mask.shape + (1,) * (bad.ndim - 1))
        return _checks.check_values(
            emissions, bad, f"`emissions` must be symbols in [0, {self.num_classes}) (num_classes)."
        )

    def log_prob(self, emission) -> Float[Array, " K"]:
        emission = _checks.to_device(emission)
        _checks.check_shape("emission", emission, (), "one integer symbol")
        emission = self.check_emissions(emission)
        return _categorical_log_prob(self.logits, emission)

    def sample(self, key: PRNGKeyArray, state) -> Int[Array, ""]:
        return jax.random.categorical(key, self.logits[state])

    def suff_stats(self, emissions, weights, mask=None) -> CategoricalStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N",), "pooled integer symbols")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        emissions = _fill_padding(emissions, mask, 0)
        weights = _check_weights(weights, n, self.num_states, mask, self.logits.dtype)
        return CategoricalStats(counts=_categorical_counts(weights, emissions, self.num_classes))

    def m_step_from_stats(self, stats: CategoricalStats, frozen=frozenset()) -> "CategoricalEmissions":
        if "probs" in frozen:
            return self
        counts = jnp.asarray(stats.counts)
        _checks.check_shape("stats.counts", counts, (self.num_states, self.num_classes))
        return CategoricalEmissions(logits=_categorical_m_step(self.logits, counts))

    # -- initialisers ------------------------------------------------------

    @classmethod
    def random(cls, key: PRNGKeyArray, num_states: int, num_classes: int, dtype=None) -> "CategoricalEmissions":
        """Rows drawn from a flat Dirichlet(1, ..., 1).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.CategoricalEmissions.random(jax.random.key(0), 3, 4).probs.shape
            (3, 4)
        """
        dtype = dtype or jnp.result_type(float)
        probs = jax.random.dirichlet(key, jnp.ones(num_classes, dtype), shape=(num_states,))
        return cls(logits=jnp.log(probs))

    @classmethod
    def from_data(
        cls, key: PRNGKeyArray, emissions, num_states: int, num_classes: int, *, noise: float = 0.2
    ) -> "CategoricalEmissions":
        r"""Empirical symbol frequencies, perturbed per state by Dirichlet noise.

        ``probs[k] = (1 - noise) * f + noise * g_k`` where ``f`` are the add-one
        smoothed frequencies of the pooled ``emissions`` and ``g_k ~ Dirichlet(1)``,
        so states differ (EM cannot separate identical states) and no symbol has
        probability zero.

        Args:
            key: PRNG key.
            emissions: pooled integer symbols, shape ``(N,)``.
            num_states: ``K``.
            num_classes: ``C``.
            noise: mixing weight of the Dirichlet draw, in ``(0, 1]``.

        Example:
            >>> import jax, jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([0, 1, 1, 2, 1])
            >>> ssmjax.CategoricalEmissions.from_data(jax.random.key(0), ys, 2, 3).probs.shape
            (2, 3)
        """
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N",), "pooled integer symbols")
        probe = cls(logits=jnp.zeros((num_states, num_classes)))
        emissions = probe.check_emissions(emissions)
        counts = jnp.zeros(num_classes).at[emissions].add(1.0) + 1.0
        freqs = counts / counts.sum()
        g = jax.random.dirichlet(key, jnp.ones(num_classes, freqs.dtype), shape=(num_states,))
        probs = (1.0 - noise) * freqs[None, :] + noise * g
        return cls(logits=jnp.log(probs))


def _categorical_counts(weights: Float[Array, "N K"], emissions: Int[Array, " N"], num_classes: int) -> Float[Array, "K C"]:
    onehot = jax.nn.one_hot(emissions, num_classes, dtype=weights.dtype)
    return weights.T @ onehot


def _categorical_m_step(old_logits: Float[Array, "K C"], counts: Float[Array, "K C"]) -> Float[Array, "K C"]:
    totals = counts.sum(-1)
    empty = totals <= 0
    probs = counts / jnp.where(empty, 1.0, totals)[:, None]
    logits = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
    return _keep_where_empty(empty, logits, old_logits)


# --------------------------------------------------------------------------- Poisson


class PoissonStats(NamedTuple):
    """Sufficient statistics of :class:`PoissonEmissions`.

    Attributes:
        sum_weights: ``(K,)``, ``sum_n weights[n, k]``.
        weighted_sums: ``(K, D)``, ``sum_n weights[n, k] * y_n``.
    """

    sum_weights: Array
    weighted_sums: Array


def _poisson_log_prob(log_rates: Float[Array, "K D"], emission: Float[Array, " D"]) -> Float[Array, " K"]:
    # y log(rate) with the convention 0 * log(0) = 0 (zero rates: log_rates = -inf)
    y_log_rate = jnp.where(emission > 0, emission * log_rates, 0.0)
    return jnp.sum(y_log_rate - jnp.exp(log_rates) - gammaln(emission + 1.0), axis=-1)


class PoissonEmissions(AbstractExponentialFamilyEmissions):
    r"""Independent Poisson counts: :math:`p(y_t \mid z_t = k) = \prod_d \mathrm{Poi}(y_{td}; \lambda_{kd})`.

    Emissions are vectors of ``D`` non-negative integer counts per step (integer
    dtype, or float dtype holding integral values).

    Storage: ``log_rates`` (``(K, D)``), ``rates = exp(log_rates)``. A zero rate
    is ``log_rates = -inf``: count 0 then has probability 1 and any positive
    count probability 0 (``log_prob = -inf``, no NaN).

    M-step: the weighted mean, :math:`\lambda_k = \sum_n w_{nk} y_n / \sum_n w_{nk}`.

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

    def __init__(self, rates=None, *, log_rates=None):
        if (rates is None) == (log_rates is None):
            raise ValueError("Pass exactly one of `rates` and `log_rates`.")
        if rates is not None:
            rates = _checks.as_float_array("rates", rates)
            _checks.check_shape("rates", rates, ("K", "D"), "one rate per state and count dimension")
            xp, values = _checks.host_arrays(rates)
            bad = (values < 0) | ~xp.isfinite(values)
            rates = _checks.check_values(rates, bad, "`rates` must be finite and non-negative.")
            self.log_rates = jnp.where(rates > 0, jnp.log(jnp.where(rates > 0, rates, 1.0)), -jnp.inf)
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

    def check_emissions(self, emissions, mask=None) -> Array:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.integer) or jnp.issubdtype(emissions.dtype, jnp.floating)):
            raise ValueError(
                f"`emissions` of a Poisson model must be integer counts (integer or float dtype); "
                f"got dtype {emissions.dtype}."
            )
        xp, values, mask = _checks.host_arrays(emissions, mask)
        if jnp.issubdtype(emissions.dtype, jnp.integer):
            bad = values < 0
        else:
            bad = (values < 0) | (values != xp.floor(values)) | ~xp.isfinite(values)
        if mask is not None:
            bad = bad & mask.reshape(mask.shape + (1,) * (bad.ndim - 1))
        return _checks.check_values(
            emissions, bad, "`emissions` of a Poisson model must be non-negative integer counts."
        )

    def _float(self, emissions: jax.Array) -> jax.Array:
        return emissions.astype(self.log_rates.dtype)

    def log_prob(self, emission) -> Float[Array, " K"]:
        emission = _checks.to_device(emission)
        _checks.check_shape("emission", emission, (self.emission_dim,), "one vector of counts")
        emission = self.check_emissions(emission[None])[0]
        return _poisson_log_prob(self.log_rates, self._float(emission))

    def sample(self, key: PRNGKeyArray, state) -> Array:
        return jax.random.poisson(key, self.rates[state]).astype(jnp.int32)

    def suff_stats(self, emissions, weights, mask=None) -> PoissonStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled count vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        emissions = self._float(_fill_padding(emissions, mask, 0))
        weights = _check_weights(weights, n, self.num_states, mask, self.log_rates.dtype)
        return PoissonStats(sum_weights=weights.sum(0), weighted_sums=weights.T @ emissions)

    def m_step_from_stats(self, stats: PoissonStats, frozen=frozenset()) -> "PoissonEmissions":
        if "rates" in frozen:
            return self
        return PoissonEmissions(log_rates=_poisson_m_step(self.log_rates, stats.sum_weights, stats.weighted_sums))

    # -- initialisers ------------------------------------------------------

    @classmethod
    def random(
        cls, key: PRNGKeyArray, num_states: int, emission_dim: int, *, mean_rate: float = 5.0, dtype=None
    ) -> "PoissonEmissions":
        """Rates drawn from a Gamma(2, scale=mean_rate / 2) (mean ``mean_rate``).

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.PoissonEmissions.random(jax.random.key(0), 3, 2).rates.shape
            (3, 2)
        """
        dtype = dtype or jnp.result_type(float)
        rates = jax.random.gamma(key, 2.0, (num_states, emission_dim), dtype) * (mean_rate / 2.0)
        return cls(log_rates=jnp.log(rates))

    @classmethod
    def from_data(cls, emissions, num_states: int) -> "PoissonEmissions":
        r"""Rates at the ``(k + 1/2) / K`` quantiles of each count dimension.

        State ``k`` gets, in every dimension ``d``, the ``(k + 0.5) / K`` quantile
        of the pooled counts (linear interpolation), floored at
        ``0.1 * mean_d + 1e-3`` so no rate is zero (a zero rate could never
        explain a positive count, and EM could not move it). Ties, common for
        small counts, are broken by a deterministic spread ``x exp(0.1 (k/(K-1) - 1/2))``
        because EM cannot separate identical states.

        Args:
            emissions: pooled counts, shape ``(N, D)``.
            num_states: ``K``.

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> ys = jnp.array([[0], [1], [2], [8], [9], [10]])
            >>> ssmjax.PoissonEmissions.from_data(ys, 2).rates.shape
            (2, 1)
        """
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled count vectors")
        probe = cls(log_rates=jnp.zeros((num_states, emissions.shape[1])))
        emissions = probe._float(probe.check_emissions(emissions))
        return cls(log_rates=_poisson_init(emissions, num_states))


@functools.partial(jax.jit, static_argnames=("num_states",))
def _poisson_init(emissions, num_states: int):
    """Log-rates of :meth:`PoissonEmissions.from_data`, one compiled program (op by op: ~15 kernels)."""
    levels = (jnp.arange(num_states, dtype=emissions.dtype) + 0.5) / num_states
    q = jnp.quantile(emissions, levels, axis=0)  # (K, D)
    floor = 0.1 * emissions.mean(0) + 1e-3
    spread = jnp.exp(0.1 * (jnp.arange(num_states) / max(num_states - 1, 1) - 0.5))
    rates = jnp.maximum(q, floor[None, :]) * spread[:, None].astype(emissions.dtype)
    return jnp.log(rates)


def _poisson_m_step(
    old_log_rates: Float[Array, "K D"], sum_weights: Float[Array, " K"], weighted_sums: Float[Array, "K D"]
) -> Float[Array, "K D"]:
    empty = sum_weights <= 0
    rates = weighted_sums / jnp.where(empty, 1.0, sum_weights)[:, None]
    log_rates = jnp.where(rates > 0, jnp.log(jnp.where(rates > 0, rates, 1.0)), -jnp.inf)
    return _keep_where_empty(empty, log_rates, old_log_rates)


# --------------------------------------------------------------------------- Gaussian


class GaussianStats(NamedTuple):
    r"""Sufficient statistics of :class:`GaussianEmissions`, centred on the model's current means ``m``.

    Attributes:
        sum_weights: ``(K,)``, :math:`\sum_n w_{nk}`.
        weighted_sums: ``(K, D)``, :math:`\sum_n w_{nk} (y_n - m_k)`.
        weighted_outer: ``(K, D, D)`` (full) or ``(K, D)`` (diag),
            :math:`\sum_n w_{nk} (y_n - m_k)(y_n - m_k)^\top` or its diagonal.
    """

    sum_weights: Array
    weighted_sums: Array
    weighted_outer: Array


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


def _gaussian_diag_log_prob(means, log_variances, emissions, axis: int = -1):
    """Diagonal-Gaussian log-densities; ``means`` and ``log_variances`` broadcast against
    ``emissions``, with the emission dimension D on ``axis`` (summed out)."""
    diff = emissions - means
    return -0.5 * jnp.sum(diff**2 * jnp.exp(-log_variances) + log_variances + math.log(2 * math.pi), axis=axis)


class GaussianEmissions(AbstractExponentialFamilyEmissions):
    r"""Multivariate Gaussian emissions: :math:`p(y_t \mid z_t = k) = \mathcal N(y_t; \mu_k, \Sigma_k)`.

    ``covariance_type`` is read from the rank of ``covs``: ``(K, D, D)`` is
    ``"full"``, ``(K, D)`` is ``"diag"`` (the variances).

    Storage: ``means`` (``(K, D)``) and either ``chol_covs`` (``(K, D, D)``,
    only the lower triangle is read, ``covs = L L^T``; the sign of the diagonal
    is irrelevant) or ``log_variances`` (``(K, D)``). The other is ``None``.

    M-step: weighted means and weighted covariances plus a ridge,
    :math:`\Sigma_k = \frac{\sum_n w_{nk}(y_n-\mu_k)(y_n-\mu_k)^\top}{\sum_n w_{nk}} + \epsilon I`
    with :math:`\epsilon` = ``min_variance`` (default ``1e-6``, in squared
    emission units; set it to the scale of your data's measurement noise if a
    state may collapse onto few points). The ridge keeps covariances positive
    definite even for a state owning fewer than ``D + 1`` points. A state with
    zero total weight, or whose new covariance fails to factorise, keeps its
    previous parameters.

    Args:
        means: ``(K, D)``.
        covs: ``(K, D, D)`` symmetric positive-definite, or ``(K, D)`` positive variances.
        min_variance: ridge added by the M-step (a static, non-negative float).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> model = ssmjax.GaussianEmissions(means=jnp.zeros((2, 3)), covs=jnp.ones((2, 3)))
        >>> model.covariance_type, model.log_likelihoods(jnp.zeros((4, 3))).shape
        ('diag', (4, 2))
    """

    means: Float[Array, "K D"]
    chol_covs: Optional[Float[Array, "K D D"]]
    log_variances: Optional[Float[Array, "K D"]]
    min_variance: float = eqx.field(static=True)

    def __init__(self, means, covs=None, *, chol_covs=None, log_variances=None, min_variance: float = 1e-6):
        if sum(x is not None for x in (covs, chol_covs, log_variances)) != 1:
            raise ValueError("Pass exactly one of `covs`, `chol_covs` and `log_variances`.")
        if not (isinstance(min_variance, (int, float)) and min_variance >= 0):
            raise ValueError(f"`min_variance` must be a non-negative Python float; got {min_variance!r}.")
        means = _checks.as_float_array("means", means)
        _checks.check_shape("means", means, ("K", "D"), "one mean vector per state")
        k, d = means.shape
        xp, values = _checks.host_arrays(means)
        bad = ~xp.isfinite(values)
        means = _checks.check_values(means, bad, "`means` must be finite.")
        self.means = means
        self.min_variance = float(min_variance)
        self.chol_covs = None
        self.log_variances = None
        if covs is not None:
            covs = _checks.as_float_array("covs", covs, means.dtype)
            which = _checks.check_shape_options(
                "covs", covs, [(k, d, d), (k, d)], "full covariances or diagonal variances"
            )
            if which == 0:
                covs = _checks.check_psd("covs", covs)
                self.chol_covs = _sym_cholesky(covs)
            else:
                xp, values = _checks.host_arrays(covs)
                bad = (values <= 0) | ~xp.isfinite(values)
                covs = _checks.check_values(covs, bad, "`covs` (diagonal variances) must be finite and positive.")
                self.log_variances = jnp.log(covs)
        elif chol_covs is not None:
            chol_covs = _checks.as_float_array("chol_covs", chol_covs, means.dtype)
            _checks.check_shape("chol_covs", chol_covs, (k, d, d))
            self.chol_covs = chol_covs
        else:
            log_variances = _checks.as_float_array("log_variances", log_variances, means.dtype)
            _checks.check_shape("log_variances", log_variances, (k, d))
            self.log_variances = log_variances

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
    def covariance_type(self) -> str:
        """``"full"`` or ``"diag"``."""
        return "full" if self.chol_covs is not None else "diag"

    @property
    def covs(self) -> Float[Array, "K D D"]:
        """Covariance matrices ``(K, D, D)`` (dense, whatever ``covariance_type``)."""
        if self.chol_covs is not None:
            chol = jnp.tril(self.chol_covs)
            return chol @ jnp.swapaxes(chol, -1, -2)
        return jax.vmap(jnp.diag)(jnp.exp(self.log_variances))

    @property
    def variances(self) -> Float[Array, "K D"]:
        """Marginal variances ``(K, D)`` (the diagonals of :attr:`covs`)."""
        if self.chol_covs is not None:
            return jnp.sum(jnp.tril(self.chol_covs) ** 2, axis=-1)
        return jnp.exp(self.log_variances)

    def check_emissions(self, emissions, mask=None) -> Array:
        emissions = _checks.to_device(emissions)
        if not (jnp.issubdtype(emissions.dtype, jnp.floating) or jnp.issubdtype(emissions.dtype, jnp.integer)):
            raise ValueError(f"`emissions` of a Gaussian model must be real numbers; got dtype {emissions.dtype}.")
        xp, values, mask = _checks.host_arrays(emissions, mask)
        bad = xp.isnan(values)
        if mask is not None:
            bad = bad & mask.reshape(mask.shape + (1,) * (bad.ndim - 1))
        return _checks.check_values(emissions, bad, "`emissions` contains NaN at unpadded steps.")

    def log_prob(self, emission) -> Float[Array, " K"]:
        emission = _checks.to_device(emission)
        _checks.check_shape("emission", emission, (self.emission_dim,), "one emission vector")
        emission = self.check_emissions(emission[None])[0].astype(self.means.dtype)
        if self.chol_covs is not None:
            return _gaussian_full_log_prob(self.means, self.chol_covs, emission)
        return _gaussian_diag_log_prob(self.means, self.log_variances, emission[None, :])

    def _time_major_log_likelihoods(self, emissions, valid):
        # Elementwise arithmetic over the (T, K, B) output, one fused kernel with the batch
        # as the vectorised axis, instead of the base class's batched product over a
        # (K, D, T * B) residual and a transpose (0.6 against 2.2 ms at K = 5, D = 3,
        # B = 100, T = 1000).
        dim = self.emission_dim
        if self.chol_covs is not None and dim > _UNROLLED_SOLVE_MAX_DIM:
            return super()._time_major_log_likelihoods(emissions, valid)
        y = jnp.moveaxis(emissions, 2, 1).astype(self.means.dtype)  # (T, D, B)
        y = jnp.where(valid[:, None, :], y, 0.0)
        means = self.means[None, :, :, None]  # (1, K, D, 1)
        if self.chol_covs is None:  # over a (T, K, D, B) virtual array, fused, never stored
            out = _gaussian_diag_log_prob(means, self.log_variances[None, :, :, None], y[:, None], axis=2)
            return jnp.where(valid[:, None, :], out, 0.0)
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

    def sample(self, key: PRNGKeyArray, state) -> Float[Array, " D"]:
        eps = jax.random.normal(key, (self.emission_dim,), self.means.dtype)
        if self.chol_covs is not None:
            return self.means[state] + jnp.tril(self.chol_covs[state]) @ eps
        return self.means[state] + jnp.exp(0.5 * self.log_variances[state]) * eps

    def suff_stats(self, emissions, weights, mask=None) -> GaussianStats:
        emissions = _checks.to_device(emissions)
        _checks.check_shape("emissions", emissions, ("N", self.emission_dim), "pooled emission vectors")
        n = emissions.shape[0]
        mask = _as_mask("mask", mask, n)
        emissions = self.check_emissions(emissions, mask)
        emissions = _fill_padding(emissions, mask, 0).astype(self.means.dtype)
        weights = _check_weights(weights, n, self.num_states, mask, self.means.dtype)
        return _gaussian_stats(self.means, emissions, weights, self.covariance_type == "full")

    def m_step_from_stats(self, stats: GaussianStats, frozen=frozenset()) -> "GaussianEmissions":
        full = self.covariance_type == "full"
        old_cov_param = self.chol_covs if full else self.log_variances
        means, cov_param = _gaussian_m_step(
            self.means, old_cov_param, stats.sum_weights, stats.weighted_sums, stats.weighted_outer,
            self.min_variance, full, "means" in frozen,
        )
        if "means" in frozen:
            means = self.means
        if "covs" in frozen:
            cov_param = old_cov_param
        if full:
            return GaussianEmissions(means, chol_covs=cov_param, min_variance=self.min_variance)
        return GaussianEmissions(means, log_variances=cov_param, min_variance=self.min_variance)

    # -- initialisers ------------------------------------------------------

    @classmethod
    def random(
        cls, key: PRNGKeyArray, num_states: int, emission_dim: int, covariance_type: str = "full",
        *, min_variance: float = 1e-6, dtype=None,
    ) -> "GaussianEmissions":
        """Means drawn from N(0, I); identity covariances.

        Example:
            >>> import jax, ssmjax
            >>> ssmjax.GaussianEmissions.random(jax.random.key(0), 3, 2).covs.shape
            (3, 2, 2)
        """
        dtype = dtype or jnp.result_type(float)
        means = jax.random.normal(key, (num_states, emission_dim), dtype)
        covs = _identity_covs(num_states, emission_dim, covariance_type, dtype)
        return cls(means, covs, min_variance=min_variance)

    @classmethod
    def from_data(
        cls, key: PRNGKeyArray, emissions, num_states: int, covariance_type: str = "full",
        *, num_iters: int = 10, min_variance: float = 1e-6,
    ) -> "GaussianEmissions":
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
            key: PRNG key.
            emissions: pooled emissions, shape ``(N, D)`` with ``N >= num_states``.
            num_states: ``K``.
            covariance_type: ``"full"`` or ``"diag"``.
            num_iters: number of Lloyd iterations.
            min_variance: passed to the model.

        Example:
            >>> import jax, ssmjax
            >>> ys = jax.random.normal(jax.random.key(1), (50, 2))
            >>> ssmjax.GaussianEmissions.from_data(jax.random.key(0), ys, 3).means.shape
            (3, 2)
        """
        emissions = _checks.as_float_array("emissions", emissions)
        _checks.check_shape("emissions", emissions, ("N", "D"), "pooled emission vectors")
        n, d = emissions.shape
        if n < num_states:
            raise ValueError(f"`emissions` must hold at least num_states={num_states} rows; got {n}.")
        if covariance_type not in ("full", "diag"):
            raise ValueError(f"`covariance_type` must be 'full' or 'diag'; got {covariance_type!r}.")
        xp, values = _checks.host_arrays(emissions)
        emissions = _checks.check_values(emissions, ~xp.isfinite(values), "`emissions` must be finite.")
        centers, covs = _gaussian_init(key, emissions, min_variance, num_states, num_iters, covariance_type == "full")
        return cls(centers, covs, min_variance=min_variance)


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
    means: Float[Array, "K D"], emissions: Float[Array, "N D"], weights: Float[Array, "N K"], full: bool
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
    """
    num_steps, dim = emissions.shape
    num_states = means.shape[0]
    ref = _row_argmax(weights)
    onehot = jax.nn.one_hot(ref, num_states, dtype=emissions.dtype)
    u = emissions - means[ref]
    grouped_u = (onehot[:, :, None] * u[:, None, :]).reshape(num_steps, num_states * dim)
    squares = (u[:, :, None] * u[:, None, :]).reshape(num_steps, dim * dim) if full else u * u
    weights_t = weights.T
    # counts[k, j] = sum of w_nk over the steps with reference j; cross_u[k, j] likewise of w_nk u_n
    counts = weights_t @ onehot
    cross_u = (weights_t @ grouped_u).reshape(num_states, num_states, dim)
    sum_u = jnp.sum(cross_u, axis=1)  # every step has one reference state: no fifth product
    sum_sq = weights_t @ squares
    delta = means[None, :, :] - means[:, None, :]  # delta[k, j] = m_j - m_k
    weighted_sums = sum_u + jnp.einsum("kj,kjd->kd", counts, delta)
    if full:
        cross = jnp.einsum("kjd,kje->kde", cross_u, delta)
        weighted_outer = (
            sum_sq.reshape(num_states, dim, dim) + cross + jnp.swapaxes(cross, -1, -2)
            + jnp.einsum("kj,kjd,kje->kde", counts, delta, delta)
        )
    else:
        weighted_outer = sum_sq + 2.0 * jnp.einsum("kjd,kjd->kd", cross_u, delta) + jnp.einsum(
            "kj,kjd->kd", counts, delta**2
        )
    return GaussianStats(jnp.sum(counts, axis=1), weighted_sums, weighted_outer)


def _gaussian_m_step(
    old_means: Float[Array, "K D"],
    old_cov_param: Shaped[Array, "K D *d"],
    sum_weights: Float[Array, " K"],
    weighted_sums: Float[Array, "K D"],
    weighted_outer: Shaped[Array, "K D *d"],
    min_variance: float,
    full: bool,
    freeze_means: bool = False,
) -> tuple[Float[Array, "K D"], Shaped[Array, "K D *d"]]:
    empty = sum_weights <= 0
    safe_w = jnp.where(empty, 1.0, sum_weights)
    shift = weighted_sums / safe_w[:, None]  # new mean minus old mean
    if freeze_means:  # covariances about the (frozen) current means
        shift = jnp.zeros_like(shift)
    means = old_means + shift
    dim = old_means.shape[-1]
    if full:
        covs = weighted_outer / safe_w[:, None, None] - shift[:, :, None] * shift[:, None, :]
        covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2)) + min_variance * jnp.eye(dim, dtype=covs.dtype)
        new_param = jnp.linalg.cholesky(covs)
        failed = ~jnp.all(jnp.isfinite(new_param), axis=(-1, -2))
    else:
        variances = jnp.maximum(weighted_outer / safe_w[:, None] - shift**2, 0.0) + min_variance
        new_param = jnp.log(variances)
        failed = ~jnp.all(jnp.isfinite(new_param), axis=-1)
    keep = empty | failed
    return _keep_where_empty(keep, means, old_means), _keep_where_empty(keep, new_param, old_cov_param)
