"""The emission interface and what every family shares.

:class:`AbstractEmissions` (the interface a family implements, with the final
``log_likelihoods`` and ``m_step``), :class:`AbstractExponentialFamilyEmissions`
(families with summable statistics and a closed-form M-step),
:class:`NoClosedFormMStepError`, and the private helpers the families' checks and
M-steps share (padding masks, weight validation, keeping empty states, missing
entries). It imports no family, so every family module can import it.

**Missing entries.** A NaN entry of a float emission is missing, with the semantics of
the LGSSM: a step contributes the log-density of its observed entries only (the
marginal of the observed block), a fully missing step contributes nothing (a row of
zeros), and the M-step's statistics leave out exactly what is missing. Families whose
dimensions are independent given the state (diagonal Gaussian, Poisson, categorical)
drop the missing dimensions; the full-covariance Gaussian uses the marginal of the
observed block, and its statistics the conditional moments of the missing entries
(exact EM for the observed-data likelihood). Whether a batch has missing entries is
decided where it is known (:func:`_missing`): an integer dtype or data without NaN take
the formulas for observed data, traced data choose at run time (:func:`_branch`).
"""

from __future__ import annotations

import abc
import inspect
import typing
from collections.abc import Set as AbstractSet
from typing import ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Shaped

from jax import lax

from ... import _checks, _deprecation
from ..._fallback import _any_in_batch
from ..._fit.protocol import observed_batch


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


def _missing(emissions, mask=None):
    """What is known before running about missing (NaN) entries at real steps.

    ``False`` where none can be: an integer dtype, a batch that :func:`ssmjax.fit_em` found
    fully observed (:func:`ssmjax._fit.protocol.observed_batch`), or concrete data without NaN.
    ``True`` for concrete data with NaN, and for traced data a traced boolean scalar.
    ``mask`` (real steps, over the leading axis) excludes padding.
    """
    if not jnp.issubdtype(emissions.dtype, jnp.floating) or observed_batch():
        return False
    xp, values, mask = _checks.host_arrays(emissions, mask)
    nan = xp.isnan(values)
    if mask is not None:
        nan = nan & mask.reshape(mask.shape + (1,) * (nan.ndim - mask.ndim))
    found = xp.any(nan)
    return bool(found) if xp is np else found


def _branch(missing, general, observed, *operands):
    """``observed(*operands)`` where no entry is missing, else ``general(*operands)``.

    ``missing`` is :func:`_missing`'s answer. Only when it is traced are both compiled,
    behind one ``lax.cond`` whose predicate stays unbatched under ``jax.vmap`` (whether any
    sequence of the batch has a missing entry).
    """
    if missing is False:
        return observed(*operands)
    if missing is True:
        return general(*operands)
    return lax.cond(_any_in_batch(missing), general, observed, *operands)


def _patch_missing(missing, observed, general, emissions, rows):
    """Per-step values: ``observed(emissions)`` where no entry is missing, ``general(emissions)`` where some are.

    ``missing`` is :func:`_missing`'s answer. When it is traced, ``observed`` runs on every
    step (missing entries set to 0, so its values and gradients stay finite) and, behind one
    ``lax.cond`` taken only if some entry is missing, ``general`` replaces the outputs that
    ``rows(isnan(emissions))`` marks. A batch without missing entries thus runs the formula
    for observed data at the top level of the program, where XLA fuses it with what follows,
    and the conditional adds one reduction and, when not taken, one zero array.
    """
    if missing is False:
        return observed(emissions)
    if missing is True:
        return general(emissions)
    nan = jnp.isnan(emissions)
    values = observed(jnp.where(nan, jnp.zeros((), emissions.dtype), emissions))
    marked = rows(nan)

    def correct(v, e):
        g = general(e)
        # equal values (-inf twice: an observed count on a structural zero) need no correction, and
        # their difference would be NaN; v = -inf implies g = -inf (missing entries only add terms)
        return jnp.where(marked & (g != v), g - v, 0.0)

    correction = lax.cond(_any_in_batch(jnp.any(nan)), correct, lambda v, e: jnp.zeros_like(v), values, emissions)
    return values + correction


def _observed_entries(emissions, fill=0.0):
    """``(observed, filled)``: where entries are numbers, and the emissions with missing ones
    set to ``fill``, so that no NaN reaches values or gradients."""
    if not jnp.issubdtype(emissions.dtype, jnp.floating):
        return jnp.ones(emissions.shape, bool), emissions
    observed = ~jnp.isnan(emissions)
    return observed, jnp.where(observed, emissions, jnp.asarray(fill, emissions.dtype))


def _log_or_minus_inf(x):
    """``log(x)`` with ``-inf`` at zeros and no NaN in its gradient (structural zeros)."""
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def _simplex_logits(name: str, probs, what: str):
    """Logits of checked ``(K, C)`` rows of probabilities (``-inf`` at structural zeros)."""
    probs = _checks.as_float_array(name, probs)
    _checks.check_shape(name, probs, ("K", "C"), what)
    return _log_or_minus_inf(_checks.check_probability_vector(name, probs))


def _normalised_logits(counts, old_logits):
    """Logits of the rows of ``counts`` normalised (the M-step of rows of probabilities); a row with
    no count keeps ``old_logits``."""
    totals = counts.sum(-1, keepdims=True)
    empty = totals <= 0
    return jnp.where(empty, old_logits, _log_or_minus_inf(counts / jnp.where(empty, 1.0, totals)))


def _free_simplex_entries(logits) -> int:
    """Free parameters of rows of probabilities: the non-zero entries of each row, minus one per row."""
    finite = np.isfinite(np.asarray(logits)).sum(axis=-1)
    return int(np.maximum(finite - 1, 0).sum())


_at_real_steps = _checks.at_real_steps


def _checked_indices(emissions, mask, size: int, what: str, message: str, minus_one_unknown: bool = False):
    """Emissions that index ``[0, size)`` (symbols, states): integers, or floats whose NaN (and, with
    ``minus_one_unknown``, ``-1``) marks an unknown entry; value-checked at real steps."""
    emissions = _checks.to_device(emissions)
    floating = jnp.issubdtype(emissions.dtype, jnp.floating)
    if not (floating or jnp.issubdtype(emissions.dtype, jnp.integer)):
        raise ValueError(f"`emissions` of {what}; got dtype {emissions.dtype}.")
    xp, values, mask = _checks.host_arrays(emissions, mask)
    unknown = xp.isnan(values) if floating else xp.zeros(values.shape, bool)
    if minus_one_unknown:
        unknown = unknown | (values == -1)
    bad = (values < 0) | (values >= size)
    if floating:
        bad = bad | (values != xp.floor(values))
    return _checks.check_values(emissions, _at_real_steps(bad & ~unknown, mask), message, at="emissions")


def _observed_weights(weights, observed, missing):
    """``(K, D)`` total weight behind each dimension: ``sum_n weights[n, k]`` over the steps where
    entry ``d`` is observed (the state's total in every column when nothing can be missing)."""
    if missing is False:
        return jnp.broadcast_to(weights.sum(0)[:, None], (weights.shape[1], observed.shape[-1]))
    return weights.T @ observed.astype(weights.dtype)


def _check_some_observed(emissions) -> None:
    """An initialiser's check: every emission dimension of ``(N, ...)`` pooled data has an observed entry."""
    if not jnp.issubdtype(emissions.dtype, jnp.floating):
        return
    xp, values = _checks.host_arrays(emissions)
    empty = xp.all(xp.isnan(values), axis=0)
    _checks.check_values(emissions, empty, "`emissions` must have an observed (non-NaN) entry in every dimension.")


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
      JAX so that it jits, vmaps and differentiates. A family that supports missing
      entries returns the log-density of the observed entries of a step with NaN
      entries (zeros for a fully missing step); one that does not should reject NaN
      in ``check_emissions``.
    * ``sample(state, *, key)``: draw one emission given an integer state.
    * ``check_emissions(emissions, mask=None)``: value-check a stack of emissions
      of shape ``(N, *emission_shape)`` and return them guarded (use
      :func:`ssmjax._checks.check_values`, which raises ``ValueError`` eagerly and
      inserts a run-time check under ``jit``); steps where ``mask`` is ``False``
      are padding and must not be checked. Families without value constraints
      write ``return emissions``.

    A family may also override ``_log_prob_observed(emission)``, a faster ``log_prob``
    for emissions without missing entries; :meth:`log_likelihoods` uses it where the data
    are known to have none.

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
        ...     def sample(self, state, *, key):
        ...         return jax.random.exponential(key) / jnp.exp(self.log_rates[state])
        ...     def check_emissions(self, emissions, mask=None):
        ...         return emissions
        >>> Exponential(jnp.zeros(3)).log_likelihoods(jnp.ones(5)).shape
        (5, 3)
    """

    # Public parameter name -> the stored fields that hold it (``{"rates": ("log_rates",)}``):
    # the names ``frozen`` takes as ``"emissions.<name>"`` in fit_em and fit_sgd. Empty: the
    # family is fitted or frozen as a whole.
    parameter_fields: ClassVar[dict[str, tuple[str, ...]]] = {}

    @property
    @abc.abstractmethod
    def num_states(self) -> int:
        """Number of hidden states ``K``."""

    @property
    @abc.abstractmethod
    def emission_shape(self) -> tuple[int, ...]:
        """Shape of one time step's emission (``()`` for scalars)."""

    @abc.abstractmethod
    def log_prob(self, emission: Shaped[ArrayLike, "..."]) -> Float[Array, " K"]:
        """Per-state log-likelihoods ``log p(emission | z = k)`` of ONE step's emission."""

    @abc.abstractmethod
    def sample(self, state: Int[ArrayLike, ""], *, key: PRNGKeyArray) -> Shaped[Array, "..."]:
        """One emission drawn from state ``state`` (an integer scalar)."""

    @abc.abstractmethod
    @typing.no_type_check
    def check_emissions(
        self, emissions: Shaped[ArrayLike, "..."], mask: Bool[ArrayLike, "..."] | None = None
    ) -> Shaped[Array, "..."]:
        """Value-check ``emissions`` of shape ``(N, *emission_shape)``; return them guarded."""

    # -- final -------------------------------------------------------------

    @property
    def input_dim(self) -> Optional[int]:
        """Columns of ``inputs`` ``(T, input_dim)`` the family conditions on; ``None`` for a family
        that takes no inputs (the default)."""
        return None

    @typing.no_type_check
    def check_inputs(
        self, inputs: Float[ArrayLike, "N Du"] | None, num_steps: int, mask: Bool[ArrayLike, " N"] | None = None
    ) -> Float[Array, "N Du"] | None:
        """Validate one sequence's ``inputs`` (``None`` for a family without inputs); return them guarded."""
        if inputs is not None:
            raise ValueError(
                f"`inputs` must be None for {type(self).__name__} (it takes no inputs); "
                f"got an array of shape {jnp.shape(inputs)}."
            )
        return None

    def joined(self, emissions: Shaped[Array, "T ..."], inputs: Float[Array, "T ..."] | None) -> Shaped[Array, "T ..."]:
        """The per-step rows the family's statistics read: ``emissions`` themselves, or for a
        family with covariates (:class:`ssmjax.LinearRegressionEmissions`) each step's emission
        joined to its covariates. Time is axis 0; further leading axes (a batch) are allowed."""
        return emissions

    @typing.no_type_check
    def log_likelihoods(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> Float[Array, "T K"]:
        r"""Log-likelihood matrix of a sequence: ``out[t, k] = log p(y_t | z_t = k)``.

        This is the ``log_likelihoods`` argument of :func:`ssmjax.hmm_filter`.
        Final: implemented once for every family from :meth:`log_prob`.

        Args:
            emissions: one sequence, shape ``(T, *emission_shape)``. NaN entries are
                missing (see :mod:`ssmjax._hmm.emissions.base`): a row holds the
                log-density of the step's observed entries, ``0`` for a fully missing step.
            length: optional number of real steps (see :mod:`ssmjax._types`).
                Steps ``t >= length`` are padding: they are neither checked nor
                evaluated, whatever they contain, and their rows are ``0``.
            inputs: ``(T, input_dim)`` covariates, for a family that takes them
                (:attr:`input_dim`); ``None`` otherwise.

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
        inputs = self.check_inputs(inputs, num_steps, mask)
        if mask is not None:
            # padded steps get the first (real) step's emission so log_prob and
            # its gradient only ever see valid inputs
            m = mask.reshape(mask.shape + (1,) * len(shape))
            emissions = jnp.where(m, emissions, emissions[:1])
            if inputs is not None:
                inputs = jnp.where(mask[:, None], inputs, inputs[:1])
        rows = self.joined(emissions, inputs)
        with _checks.value_checks(False):  # already checked above, in one reduction
            lls = self._stacked_log_probs(rows, _missing(rows, mask))
        if mask is not None:
            lls = jnp.where(mask[:, None], lls, 0.0)
        return lls

    def _sample_sequence(self, states, inputs, key) -> Array:
        """Emissions ``(T, *emission_shape)`` along a path of ``states`` (one key per step); families
        whose emissions read covariates or their own past override it."""
        keys = jax.random.split(key, states.shape[0])
        return jax.vmap(lambda state, k: _emission_sample(self, state, k))(states, keys)

    def _checked_emission(self, emission, what: str) -> Array:
        """One step's emission for ``log_prob``: on the device, shape- and value-checked."""
        emission = _checks.to_device(emission)
        _checks.check_shape("emission", emission, tuple(self.emission_shape), what)
        return self.check_emissions(emission[None])[0]

    def _log_prob_observed(self, emission) -> Float[Array, " K"]:
        """:meth:`log_prob` of an emission without missing entries (families may override it with a faster formula)."""
        return self.log_prob(emission)

    def _stacked_log_probs(self, emissions, missing) -> Float[Array, "N K"]:
        """``log_prob`` of each of ``(N, *emission_shape)`` valid emissions; ``missing`` as :func:`_missing`."""
        general = jax.vmap(self.log_prob)
        if type(self)._log_prob_observed is AbstractEmissions._log_prob_observed:
            return general(emissions)
        steps = lambda nan: jnp.any(nan.reshape(nan.shape[0], -1), axis=1)[:, None]  # noqa: E731
        return _patch_missing(missing, jax.vmap(self._log_prob_observed), general, emissions, steps)

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
            lls = self._stacked_log_probs(safe.reshape((num_steps * num_seq,) + shape), _missing(emissions, valid))
        lls = jnp.swapaxes(lls.reshape(num_steps, num_seq, -1), 1, 2)
        return jnp.where(valid[:, None, :], lls, 0.0)

    def _time_major_terms(self, emissions, valid: Bool[Array, "T B"]) -> tuple[Float[Array, "T K B"], PyTree]:
        """:meth:`_time_major_log_likelihoods`, and what the family's statistics of the same batch
        reuse of their computation (``None``: nothing; see ``_time_major_stats``)."""
        return self._time_major_log_likelihoods(emissions, valid), None

    def log_prior(self, prior: PyTree | None) -> Float[Array, ""]:
        """``log p(parameters)`` under ``prior`` (:mod:`ssmjax._hmm.priors`); ``0`` for None.

        Families with a conjugate prior override it (and take ``prior=`` in ``m_step_from_stats``).
        """
        if prior is None:
            return jnp.zeros(())
        raise ValueError(f"{type(self).__name__} takes no emission prior; got {type(prior).__name__}.")

    def parameter_counts(self) -> dict[str, int]:
        """Free parameters per public parameter name (``parameter_fields``; one ``"emissions"``
        entry for a family without them): what AIC and BIC count.

        The default counts every stored entry; the built-in families subtract what their
        constraints fix (probabilities summing to one, structural zeros, symmetry).
        """
        fields = type(self).parameter_fields
        if not fields:
            return {"emissions": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self))}
        return {name: sum(int(np.size(getattr(self, a))) for a in attrs) for name, attrs in fields.items()}

    @property
    def has_closed_form_m_step(self) -> bool:
        """Whether :meth:`m_step` is available (the family has summable sufficient statistics)."""
        return isinstance(self, AbstractExponentialFamilyEmissions)

    @typing.no_type_check
    def m_step(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> AbstractEmissions:
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

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> poisson = ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [5.0]]))
            >>> counts = jnp.array([[0.0], [2.0], [6.0], [8.0]])
            >>> weights = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
            >>> bool(jnp.allclose(poisson.m_step(counts, weights).rates, jnp.array([[1.0], [7.0]])))  # weighted means
            True
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

    A family whose M-step needs the data rather than sums (the GLM families' Newton steps)
    returns :class:`AbstractStepStats` instead, one row per pooled step: those combine by
    concatenating rows (:func:`_combine_sequences`), and equal the statistics of the pooled steps.

    Example:
        The statistics of two halves of the data add up to those of the whole, for every
        built-in family with summable statistics:

        >>> import equinox as eqx, jax, jax.numpy as jnp, ssmjax
        >>> states = jnp.arange(40) % 2
        >>> weights = jax.nn.one_hot(states, 2)
        >>> counts = (jnp.arange(120).reshape(40, 3) * 7) % 5
        >>> normal = jax.random.normal(jax.random.key(0), (40, 3))
        >>> eye = jnp.tile(jnp.eye(3), (2, 1, 1))
        >>> cases = [
        ...     (ssmjax.PoissonEmissions(rates=jnp.ones((2, 3))), counts),
        ...     (ssmjax.BernoulliEmissions(probs=jnp.full((2, 3), 0.5)), counts % 2),
        ...     (ssmjax.CategoricalEmissions(probs=jnp.full((2, 4), 0.25)), counts[:, 0] % 4),
        ...     (ssmjax.GammaEmissions(shapes=jnp.ones((2, 3)), rates=jnp.ones((2, 3))), counts + 0.5),
        ...     (ssmjax.GaussianEmissions(jnp.zeros((2, 3)), eye), normal),
        ...     (ssmjax.MultinomialEmissions(jnp.full((2, 4), 0.25), num_trials=10),
        ...      jnp.tile(jnp.array([1, 2, 3, 4]), (40, 1))),
        ...     (ssmjax.StudentTEmissions(jnp.zeros((2, 3)), eye, jnp.full(2, 4.0)), normal),
        ...     (ssmjax.GaussianMixtureEmissions(
        ...         jnp.full((2, 2), 0.5), ssmjax.DiagonalGaussianEmissions(normal[:4], jnp.ones((4, 3)))), normal),
        ...     (ssmjax.ProductEmissions(ssmjax.PoissonEmissions(rates=jnp.ones((2, 1))),
        ...                              ssmjax.DiagonalGaussianEmissions(jnp.zeros((2, 2)), jnp.ones((2, 2)))),
        ...      jnp.concatenate([counts[:, :1], normal[:, :2]], axis=1)),
        ...     (ssmjax.KnownStateEmissions(2), states),
        ... ]
        >>> stats = eqx.filter_jit(lambda family, rows, w: family.suff_stats(rows, w))  # one program per size
        >>> def halves_add_up(family, rows):
        ...     whole = stats(family, rows, weights)
        ...     halves = jax.tree.map(jnp.add, stats(family, rows[:20], weights[:20]),
        ...                           stats(family, rows[20:], weights[20:]))
        ...     return all(bool(jnp.allclose(a, b)) for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(halves)))
        >>> [halves_add_up(family, rows) for family, rows in cases] == [True] * len(cases)
        True

        A family with covariates reads each step's emission joined to them:

        >>> regression = ssmjax.LinearRegressionEmissions(jnp.ones((2, 1, 2)), jnp.zeros((2, 1)), jnp.ones((2, 1, 1)))
        >>> halves_add_up(regression, regression.joined(normal[:, :1], normal[:, 1:]))
        True
    """

    @abc.abstractmethod
    def suff_stats(
        self,
        emissions: Shaped[ArrayLike, "N ..."],
        weights: Float[ArrayLike, "N K"],
        mask: Bool[ArrayLike, " N"] | None = None,
    ) -> PyTree[Array]:
        """Weighted sufficient statistics of pooled ``emissions`` ``(N, ...)``, ``weights`` ``(N, K)``."""

    def _time_major_stats(self, emissions, valid: Bool[Array, "T B"], smoothed: Float[Array, "T B K"], terms):
        """:meth:`suff_stats` of a time-major padded batch ``(T, B, ...)`` with weights ``smoothed``
        (zero at padded steps), given ``terms`` from :meth:`_time_major_terms` on the same batch."""
        flat = (valid.size,)
        return self.suff_stats(
            emissions.reshape(flat + emissions.shape[2:]), smoothed.reshape(flat + smoothed.shape[2:]), valid.reshape(flat)
        )

    @abc.abstractmethod
    def m_step_from_stats(
        self,
        stats: PyTree[Array],
        frozen: AbstractSet[str] = frozenset(),
    ) -> "AbstractExponentialFamilyEmissions":
        """The maximiser given (summed) statistics; empty states keep their parameters.

        ``frozen`` names parameters (``"rates"``, ``"probs"``, ``"means"``, ``"covs"``)
        kept at their current values; the others get their exact maximiser given
        them (e.g. Gaussian covariances about frozen means).
        """


class AbstractStepStats(eqx.Module):
    """Statistics that keep one row per pooled step (every leaf has the leading axis ``N``).

    For a family whose M-step re-reads the data (iterative, no fixed-size sufficient
    statistics). Padded and missing steps are rows of zero weight. The statistics of several
    chunks are their rows concatenated, not added (:func:`_combine_sequences`).
    """


def _combine_sequences(stats: PyTree[Array]) -> PyTree[Array]:
    """The statistics of ``B`` sequences stacked on a leading axis (``jax.vmap`` of a per-sequence
    E-step) combined into one: summed over that axis, except :class:`AbstractStepStats`, whose
    sequence axis merges into their step axis."""

    def combine(s):
        if isinstance(s, AbstractStepStats):
            return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), s)
        return jnp.sum(s, axis=0)

    return jax.tree.map(combine, stats, is_leaf=lambda s: isinstance(s, AbstractStepStats))


def _emission_sample(emissions: AbstractEmissions, state, key):
    """``emissions.sample(state, key=key)``; an emission model written against the old protocol,
    ``sample(self, key, state)``, is called that way, with a warning."""
    first = next(iter(inspect.signature(emissions.sample).parameters))
    if first == "key":
        _deprecation.warn(
            f"{type(emissions).__name__}.sample(self, key, state)", "sample(self, state, *, key)"
        )
        return emissions.sample(key, state)
    return emissions.sample(state, key=key)


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
