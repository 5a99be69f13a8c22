r"""The hidden Markov model as an equinox Module.

.. math::
    z_1 \sim \mathrm{Cat}(\pi), \qquad z_{t+1} \mid z_t = i \sim \mathrm{Cat}(A_{i,:}), \qquad
    y_t \mid z_t = k \sim p_k(y_t)

with :math:`\pi` = ``initial_probs``, :math:`A` = ``transition_matrix`` and
:math:`p_k` given by an emission model (:class:`ssmjax.PoissonEmissions`,
:class:`ssmjax.GaussianEmissions`, :class:`ssmjax.CategoricalEmissions` or your own
:class:`ssmjax.AbstractEmissions`). Conventions (time indexing, ``length``) are in
:mod:`ssmjax._types`.

Storage is unconstrained (log-probabilities, which may be ``-inf`` for structural
zeros), so any array value is a valid model and gradient fitting needs no
bijectors; ``initial_probs`` and ``transition_matrix`` are read back as properties.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Shaped

from .. import _checks, _deprecation
from .._fit.protocol import AbstractFittableModel, check_frozen
from .emissions import AbstractEmissions, softmax_rows
from . import constraints as _constraints
from . import fit as _fit
from . import initialise as _initialise
from .priors import HMMPrior
from .results import HMMFilterResult, HMMPosterior
from .inference import hmm_filter, hmm_sample_posterior, hmm_smoother, hmm_viterbi


def _filter_fn(model, emissions, length, inputs=None):
    ll = model.log_likelihoods(emissions, length=length, inputs=inputs)
    return hmm_filter(model.initial_probs, model._transitions(inputs, length), ll, length=length)


def _smoother_fn(model, emissions, length, inputs=None):
    ll = model.log_likelihoods(emissions, length=length, inputs=inputs)
    return hmm_smoother(model.initial_probs, model._transitions(inputs, length), ll, length=length)


def _viterbi_fn(model, emissions, length, inputs=None):
    ll = model.log_likelihoods(emissions, length=length, inputs=inputs)
    path, _ = hmm_viterbi(model.initial_probs, model._transitions(inputs, length), ll, length=length)
    return path


def _posterior_sample_fn(model, emissions, length, inputs, key):
    ll = model.log_likelihoods(emissions, length=length, inputs=inputs)
    return hmm_sample_posterior(model.initial_probs, model._transitions(inputs, length), ll, length=length, key=key)


@eqx.filter_jit
def _run_jit(fn, model, emissions, length, inputs, extra):
    return fn(model, emissions, length, inputs, *extra)


class HMM(AbstractFittableModel):
    """A hidden Markov model with a pluggable emission model.

    Args:
        initial_probs: ``(K,)`` initial state distribution.
        transition_matrix: ``(K, K)`` row-stochastic matrix,
            ``transition_matrix[i, j] = p(z_{t+1} = j | z_t = i)``. Zeros are allowed
            and stay exactly zero under EM and gradient fitting.
        emissions: an emission model with ``K`` states.
        fixed: entries that fitting holds at their current values, per parameter name
            (:meth:`parameter_names`): ``True`` for the whole field, or a boolean mask of the
            field's stored shape (``(K,)`` initial, ``(K, K)`` transition, e.g. ``(K, D)`` for
            ``"emissions.means"``), ``True`` where held. :func:`ssmjax.fit_em`,
            :func:`ssmjax.fit_sgd` and :meth:`num_parameters` respect them; which fields take entry
            masks, and the exact M-steps, are in :mod:`ssmjax._hmm.constraints`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> hmm = ssmjax.HMM(
        ...     initial_probs=jnp.array([0.5, 0.5]),
        ...     transition_matrix=jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        ...     emissions=ssmjax.PoissonEmissions(rates=jnp.array([[3.0], [12.0]])),
        ... )
        >>> counts = jnp.array([[2], [4], [11], [14], [3]])
        >>> hmm.viterbi(counts).tolist()
        [0, 0, 1, 1, 0]
    """

    initial_log_probs: jax.Array
    transition_log_probs: jax.Array
    emissions: AbstractEmissions
    constraints: tuple = eqx.field(static=True, default=())

    @typing.no_type_check
    def __init__(
        self,
        initial_probs: Float[ArrayLike, " K"] | None = None,
        transition_matrix: Float[ArrayLike, "K K"] | None = None,
        emissions: AbstractEmissions | None = None,
        *,
        initial_log_probs: Float[ArrayLike, " K"] | None = None,
        transition_log_probs: Float[ArrayLike, "K K"] | None = None,
        fixed: dict[str, bool | Bool[ArrayLike, "..."]] | None = None,
    ):
        if not isinstance(emissions, AbstractEmissions):
            raise ValueError(
                f"`emissions` must be an ssmjax emission model (e.g. ssmjax.PoissonEmissions); "
                f"got {type(emissions).__name__}."
            )
        num_states = emissions.num_states
        if (initial_probs is None) == (initial_log_probs is None):
            raise ValueError("Give exactly one of `initial_probs` and `initial_log_probs`.")
        if (transition_matrix is None) == (transition_log_probs is None):
            raise ValueError("Give exactly one of `transition_matrix` and `transition_log_probs`.")
        if initial_log_probs is None:
            initial_probs = _checks.as_float_array("initial_probs", initial_probs)
            _checks.check_shape("initial_probs", initial_probs, (num_states,), "one entry per state")
            initial_probs = _checks.check_probability_vector("initial_probs", initial_probs)
            initial_log_probs = jnp.log(initial_probs)
        else:
            initial_log_probs = _checks.as_float_array("initial_log_probs", initial_log_probs)
            _checks.check_shape("initial_log_probs", initial_log_probs, (num_states,))
        if transition_log_probs is None:
            transition_matrix = _checks.as_float_array("transition_matrix", transition_matrix)
            _checks.check_shape("transition_matrix", transition_matrix, (num_states, num_states))
            transition_matrix = _checks.check_probability_vector("transition_matrix", transition_matrix)
            transition_log_probs = jnp.log(transition_matrix)
        else:
            transition_log_probs = _checks.as_float_array("transition_log_probs", transition_log_probs)
            _checks.check_shape("transition_log_probs", transition_log_probs, (num_states, num_states))
        self.initial_log_probs = initial_log_probs
        self.transition_log_probs = transition_log_probs
        self.emissions = emissions
        self.constraints = _constraints.canonical(self, fixed)
        if self.constraints:
            normal = _constraints.normalised(self)
            self.initial_log_probs, self.transition_log_probs = normal.initial_log_probs, normal.transition_log_probs
            self.emissions = normal.emissions

    # ------------------------------------------------------------------ views
    @property
    def num_states(self) -> int:
        """Number of hidden states ``K``."""
        return self.initial_log_probs.shape[-1]

    @property
    def initial_probs(self) -> Float[Array, " K"]:
        """``(K,)`` initial distribution (softmax of the stored log-probabilities)."""
        return softmax_rows(self.initial_log_probs)

    @property
    def transition_matrix(self) -> Float[Array, "K K"]:
        """``(K, K)`` transition matrix (row-wise softmax of the stored log-probabilities)."""
        return softmax_rows(self.transition_log_probs)

    def parameter_names(self) -> tuple[str, ...]:
        """Names accepted by ``frozen`` in :func:`ssmjax.fit_em` / :func:`ssmjax.fit_sgd`.

        ``"initial_probs"``, ``"transition_matrix"``, ``"emissions"`` (all emission
        parameters) and, for the built-in families, ``"emissions.rates"``,
        ``"emissions.means"``, ``"emissions.covs"`` or ``"emissions.probs"``.
        """
        sub = tuple(f"emissions.{n}" for n in _fit.emission_fields(self.emissions))
        return ("initial_probs", "transition_matrix", "emissions") + sub

    @property
    def fixed(self) -> dict[str, np.ndarray | bool]:
        """The entries fitting holds (``True`` = held): a mask per field with some held, ``True`` for
        a field held whole."""
        return {**{name: True for name in _constraints.held_whole(self.constraints)}, **_constraints.masks(self)}

    @typing.no_type_check
    def with_constraints(self, *, fixed: dict[str, bool | Bool[ArrayLike, "..."]] | None = None) -> HMM:
        """The same model with these held entries in place of its own (see ``fixed`` above).

        Constrained probability rows are stored normalised, so a held entry keeps exactly its value.

        Example:
            >>> import jax.numpy as jnp, numpy as np, ssmjax
            >>> hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
            ...                  ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])))
            >>> held = hmm.with_constraints(fixed={"transition_matrix": np.array([[False, True], [False, False]]),
            ...                                    "emissions.rates": np.array([[True], [False]])})
            >>> hmm.num_parameters(), held.num_parameters()  # the held rate, and row 0 is all held
            (5, 3)
        """
        new = object.__new__(type(self))  # a copy that keeps a subclass and its fields
        for field in dataclasses.fields(self):
            object.__setattr__(new, field.name, getattr(self, field.name))
        object.__setattr__(new, "constraints", _constraints.canonical(self, fixed))
        return _constraints.normalised(new)

    # ------------------------------------------------------------ inference
    @typing.no_type_check
    def log_likelihoods(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> Float[Array, "T K"]:
        """``(T, K)`` emission log-likelihoods of one sequence (see the emission model)."""
        return self.emissions.log_likelihoods(emissions, length=length, inputs=self._emission_inputs(inputs))

    # The inputs' consumers: the emissions here; a model whose transitions read inputs
    # (ssmjax.InputDrivenHMM) overrides these four.
    def _emission_inputs(self, inputs):
        return inputs

    def _check_inputs(self, inputs, num_steps: int, mask=None):
        """One sequence's (or a pooled batch's) ``inputs`` ``(N, Du)``, checked; ``None`` where none are taken."""
        return self.emissions.check_inputs(inputs, num_steps, mask)

    def _transitions(self, inputs, length=None):
        """The transition matrix of one sequence: ``(K, K)``, or ``(T - 1, K, K)`` where it varies."""
        return self.transition_matrix

    def _transition_log_matrices(self, inputs, length=None):
        return self.transition_log_probs

    @typing.no_type_check
    def marginal_loglik(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> Float[Array, ""]:
        """``log p(y_{1:T})`` of one sequence ``(T, *emission_shape)`` (``inputs`` ``(T, Du)`` for
        emissions that take them)."""
        return self.filter(emissions, length=length, inputs=inputs).marginal_loglik

    @typing.no_type_check
    def log_likelihood(
        self,
        emissions: Shaped[ArrayLike, "B T ..."],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
    ) -> Float[Array, ""]:
        """Summed ``log p(y)`` of a padded batch ``(B, T, *emission_shape)`` (``lengths`` ``(B,)`` or None).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
            ...                  ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])))
            >>> ys = jnp.array([[[0], [1], [7]], [[5], [6], [0]]])
            >>> bool(jnp.isclose(hmm.log_likelihood(ys), hmm.marginal_loglik(ys[0]) + hmm.marginal_loglik(ys[1])))
            True
        """
        emissions, lengths, inputs = self._check_batch(emissions, lengths, inputs)
        with _checks.value_checks(False):  # checked above
            return _batch_loglik(self, emissions, lengths, inputs)

    @typing.no_type_check
    def num_parameters(self, frozen: Sequence[str] = ()) -> int:
        """Free parameters, as AIC and BIC count them: ``K - 1`` initial probabilities and ``K - 1`` per
        transition row, less the structural zeros (fixed at zero) and the entries held by ``fixed``,
        plus the emissions' free parameters (:meth:`~ssmjax.AbstractEmissions.parameter_counts`,
        less their held entries); names in ``frozen`` (as :func:`ssmjax.fit_em` takes them) count nothing.

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> hmm = ssmjax.HMM(jnp.array([1.0, 0.0]), jnp.array([[0.9, 0.1], [0.0, 1.0]]),
            ...                  ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])))
            >>> hmm.num_parameters(), hmm.num_parameters(frozen=("emissions",))
            (3, 1)
        """
        frozen = set(check_frozen(self, frozen))
        initial = np.isfinite(np.asarray(self.initial_log_probs)).sum() - 1
        rows = np.isfinite(np.asarray(self.transition_log_probs)).sum(axis=-1)
        counts = {"initial_probs": int(initial), "transition_matrix": int(np.maximum(rows - 1, 0).sum())}
        counts.update({f"emissions.{n}" if _fit.emission_fields(self.emissions) else n: c
                       for n, c in self.emissions.parameter_counts().items()})
        if "emissions" in frozen or "emissions" in _constraints.held_whole(self.constraints):
            frozen |= {n for n in counts if n.startswith("emissions")}
        return int(sum(_constraints.free_count(self, n, c) for n, c in counts.items() if n not in frozen))

    @typing.no_type_check
    def aic(
        self,
        emissions: Shaped[ArrayLike, "B T ..."],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
        frozen: Sequence[str] = (),
    ) -> float:
        """Akaike's criterion of a padded batch, ``-2 log p(y) + 2 p`` (:meth:`num_parameters`); lower is better."""
        loglik = self.log_likelihood(emissions, lengths=lengths, inputs=inputs)
        return float(-2.0 * loglik + 2.0 * self.num_parameters(frozen))

    @typing.no_type_check
    def bic(
        self,
        emissions: Shaped[ArrayLike, "B T ..."],
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
        frozen: Sequence[str] = (),
    ) -> float:
        """Schwarz's criterion of a padded batch, ``-2 log p(y) + p log N`` with ``N`` the number of real
        steps (hmmlearn's convention); lower is better."""
        emissions, lengths, inputs = self._check_batch(emissions, lengths, inputs)
        with _checks.value_checks(False):  # checked above
            loglik = _batch_loglik(self, emissions, lengths, inputs)
        num_steps = int(np.sum(_checks.host_copy(lengths)))
        return float(-2.0 * loglik + np.log(num_steps) * self.num_parameters(frozen))

    @typing.no_type_check
    def filter(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> HMMFilterResult:
        """Forward filtering of one sequence; see :func:`ssmjax.hmm_filter`."""
        return self._run(_filter_fn, emissions, length, inputs)

    @typing.no_type_check
    def smoother(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> HMMPosterior:
        """Forward-backward smoothing of one sequence; see :func:`ssmjax.hmm_smoother`."""
        return self._run(_smoother_fn, emissions, length, inputs)

    @typing.no_type_check
    def viterbi(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
    ) -> Int[Array, " T"]:
        """Most likely state path ``(T,)`` of one sequence; see :func:`ssmjax.hmm_viterbi`."""
        return self._run(_viterbi_fn, emissions, length, inputs)

    @_deprecation.key_last("HMM.sample_posterior", skip=1)
    @typing.no_type_check
    def sample_posterior(
        self,
        emissions: Shaped[ArrayLike, "T ..."],
        *,
        length: Int[ArrayLike, ""] | None = None,
        inputs: Float[ArrayLike, "T Du"] | None = None,
        key: PRNGKeyArray,
    ) -> Int[Array, " T"]:
        """An exact draw of ``z_{1:T}`` from ``p(z | y)``; see :func:`ssmjax.hmm_sample_posterior`.

        Example:
            >>> import jax, jax.numpy as jnp, ssmjax
            >>> hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
            ...                  ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])))
            >>> hmm.sample_posterior(jnp.array([[0], [1], [7]]), key=jax.random.key(0)).shape
            (3,)
        """
        return self._run(_posterior_sample_fn, emissions, length, inputs, key)

    def most_likely_states(self, emissions, *, length=None) -> Int[Array, " T"]:
        """Deprecated spelling of :meth:`viterbi`."""
        _deprecation.warn("HMM.most_likely_states", "HMM.viterbi")
        return self.viterbi(emissions, length=length)

    def posterior_sample(self, key, emissions, *, length=None) -> Int[Array, " T"]:
        """Deprecated spelling of :meth:`sample_posterior`."""
        _deprecation.warn("HMM.posterior_sample(key, ...)", "HMM.sample_posterior(..., key=key)")
        return self.sample_posterior(emissions, length=length, key=key)

    def _run(self, fn, emissions, length, inputs, *extra):
        """``fn(self, emissions, length, inputs, *extra)``; called eagerly, as one compiled program.

        Eagerly (no tracers), the emissions and ``length`` are validated here -- shapes,
        and values with NumPy -- raising ``ValueError`` as before, and ``fn`` then runs
        compiled (``equinox.filter_jit``, cached per shape) with its own value checks off.
        Run op by op instead, the log-likelihoods and validation compiled dozens of small
        kernels on first use (seconds on CPU). Under a trace ``fn`` is simply inlined.
        """
        leaves = jax.tree_util.tree_leaves((self, emissions, length, inputs, extra))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return fn(self, emissions, length, inputs, *extra)
        emissions = _checks.to_device(emissions)
        shape = tuple(self.emissions.emission_shape)
        _checks.check_shape("emissions", emissions, ("T",) + shape, "one emission per time step")
        length = _checks.check_length(length, emissions.shape[0])
        mask = None if length is None else np.arange(emissions.shape[0]) < int(length)
        self.emissions.check_emissions(emissions, mask)
        inputs = self._check_inputs(inputs, emissions.shape[0], mask)
        with _checks.value_checks(False):  # checked above
            return _run_jit(fn, self, emissions, length, inputs, extra)

    @_deprecation.key_last("HMM.sample", skip=1)
    @typing.no_type_check
    def sample(
        self, num_timesteps: int, *, inputs: Float[ArrayLike, "T Du"] | None = None, key: PRNGKeyArray
    ) -> tuple[Int[Array, " T"], Shaped[Array, "T ..."]]:
        """Draw ``(states (T,), emissions (T, *emission_shape))`` from the model (``inputs`` ``(T, Du)``
        for emissions that take them).

        Example:
            >>> import jax, jax.numpy as jnp, ssmjax
            >>> hmm = ssmjax.HMM(jnp.array([1.0, 0.0]), jnp.array([[0.9, 0.1], [0.1, 0.9]]),
            ...                  ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [9.0]])))
            >>> states, counts = hmm.sample(20, key=jax.random.key(0))
            >>> states.shape, counts.shape
            ((20,), (20, 1))
        """
        num_timesteps = _checks.positive_int("num_timesteps", num_timesteps)
        # One compiled program (an eager call would compile every primitive of the
        # samplers separately: seconds on first use).
        inputs = self._check_inputs(inputs, num_timesteps)
        return _sample_jit(self, key, num_timesteps, inputs)

    # --------------------------------------------------------- initialisers
    @classmethod
    @_deprecation.key_last("HMM.from_data", skip=1)
    @typing.no_type_check
    def from_data(
        cls,
        emissions: Shaped[ArrayLike, "B T ..."],
        num_states: int,
        emissions_type: str | type[AbstractEmissions] = "poisson",
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
        inputs: Float[ArrayLike, "B T Du"] | None = None,
        stay_prob: float = 0.9,
        num_classes: int | None = None,
        num_lags: int = 1,
        structure: str = "ergodic",
        max_jump: int = 1,
        key: PRNGKeyArray,
    ) -> HMM:
        """A data-driven starting model for EM.

        Emission parameters come from the pooled real steps: quantiles for Poisson,
        k-means(++) clusters for Gaussian (``"gaussian"`` full or ``"gaussian_diag"``),
        smoothed frequencies plus Dirichlet noise for categorical. Missing (NaN) entries
        are left out (each family's ``from_data`` says how). The initial
        distribution is uniform and the transition matrix puts ``stay_prob`` on the
        diagonal.

        ``structure="left-right"`` declares a left-right (Bakis) chain instead: it starts in
        state 0, and from state ``i`` moves only to states ``i .. i + max_jump`` (the last state
        is absorbing). The other entries are structural zeros, which EM and gradient fitting
        keep, and which :meth:`num_parameters` does not count.

        Args:
            emissions: ``(B, T, D)`` batch (``(B, T)`` ints for categorical).
            num_states: ``K``.
            emissions_type: ``"poisson"``, ``"gaussian"``, ``"gaussian_diag"``, ``"gaussian_spherical"``,
                ``"gaussian_tied"``, ``"categorical"``,
                ``"bernoulli"``, ``"multinomial"``, ``"gamma"``, ``"gmm"`` (two diagonal
                components per state), ``"student_t"``, ``"linear_regression"``, ``"poisson_regression"`` and
                ``"bernoulli_regression"`` (on ``inputs``), ``"autoregressive"``
                (on ``num_lags`` past emissions, and ``inputs`` if given), or an emission class (its
                ``from_data(pooled, num_states, key=key)`` builds the emission model).
            lengths: ``(B,)`` lengths or ``None``.
            inputs: ``(B, T, Du)`` covariates, for the regression families.
            stay_prob: diagonal of the initial transition matrix.
            num_classes: number of symbols (categorical only; default ``max + 1``).
            num_lags: the order ``p`` of an ``"autoregressive"`` model.
            structure: ``"ergodic"`` (every transition allowed) or ``"left-right"``.
            max_jump: the band of a left-right chain (``1``: stay or move to the next state).
            key: PRNG key (keyword-only; the Poisson initialisation does not use it).
        """
        return _initialise.from_data(
            cls, emissions, num_states, emissions_type, lengths=lengths, inputs=inputs, stay_prob=stay_prob,
            num_classes=num_classes, num_lags=num_lags, structure=structure, max_jump=max_jump, key=key,
        )

    @classmethod
    @_deprecation.key_last("HMM.random", skip=1)
    @typing.no_type_check
    def random(
        cls, num_states: int, emissions: AbstractEmissions, *, concentration: float = 1.0, key: PRNGKeyArray
    ) -> HMM:
        """Random initial distribution and transition rows (Dirichlet) around ``emissions``."""
        k1, k2 = jax.random.split(key)
        dtype = jnp.result_type(float)
        alpha = jnp.full((num_states,), concentration, dtype)
        initial = jax.random.dirichlet(k1, alpha)
        transition = jax.random.dirichlet(k2, alpha, shape=(num_states,))
        return cls(initial_log_probs=jnp.log(initial), transition_log_probs=jnp.log(transition),
                   emissions=emissions)

    # ------------------------------------------------------------- fitting
    def _check_batch(self, emissions, lengths, inputs):
        return _fit.check_batch(self, emissions, lengths, inputs)

    def _checked_batch_inputs(self, inputs, num_seq, num_timesteps, mask):
        return _fit.checked_batch_inputs(self, inputs, num_seq, num_timesteps, mask)

    def _check_em(self, frozen):
        return _fit.check_em(self, frozen)

    def _e_step(self, emissions, length, inputs):
        return _fit.e_step(self, emissions, length, inputs)

    def _emission_stats(self, emissions, length, inputs, smoothed_probs):
        return _fit.emission_stats(self, emissions, length, inputs, smoothed_probs)

    _has_fast_e_step = True  # the log-space forward pass is left out of fit_em's first program

    @property
    def _prefers_fusion_emitters(self) -> bool:
        """Whether fit_em should compile with XLA's default emitters (see ssmjax._fit.compiler)."""
        return getattr(self.emissions, "_prefers_fusion_emitters", False)

    def _prepare_batch(self, emissions, lengths, inputs):
        return _fit.prepare_batch(self, emissions, lengths, inputs)

    def _batched_e_step(self, batch):
        return _fit.batched_e_step(self, batch)

    def _check_prior(self, prior) -> None:
        return _fit.check_prior(self, prior)

    def _log_prior(self, prior):
        return _fit.log_prior(self, prior)

    @typing.no_type_check
    def log_posterior(
        self,
        emissions: Shaped[ArrayLike, "B T ..."],
        prior: HMMPrior,
        *,
        lengths: Int[ArrayLike, " B"] | None = None,
    ) -> Float[Array, ""]:
        """``log p(y) + log p(parameters)`` of a padded batch under an :class:`~ssmjax.HMMPrior` (what
        ``fit_em(..., prior=prior)`` maximises).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
            ...                  ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])))
            >>> ys = jnp.array([[[0], [1], [7]]])
            >>> flat = ssmjax.HMMPrior(initial=1.0, transition=1.0)  # Dirichlet(1) rows: log density 0
            >>> bool(hmm.log_posterior(ys, ssmjax.HMMPrior(transition=2.0)) < hmm.log_posterior(ys, flat))
            True
        """
        self._check_prior(prior)
        return self.log_likelihood(emissions, lengths=lengths) + self._log_prior(prior)

    def _m_step(self, stats, frozen, prior=None):
        return _fit.m_step(self, stats, frozen, prior)

    def _unconstrained(self):
        return _fit.unconstrained(self)

    def _from_unconstrained(self, params):
        return _fit.from_unconstrained(self, params)

def _sample(model: HMM, key, num_timesteps: int, inputs=None):
    key_init, key_trans, key_emit = jax.random.split(key, 3)
    z0 = jax.random.categorical(key_init, model.initial_log_probs)
    log_trans = model._transition_log_matrices(inputs)
    keys = jax.random.split(key_trans, num_timesteps - 1)

    def _step(z, x):
        k, logits = x if log_trans.ndim == 3 else (x, log_trans)
        z_next = jax.random.categorical(k, logits[z])
        return z_next, z_next

    _, rest = jax.lax.scan(_step, z0, (keys, log_trans) if log_trans.ndim == 3 else keys)
    states = jnp.concatenate([z0[None], rest])
    return states, model.emissions._sample_sequence(states, model._emission_inputs(inputs), key_emit)


_sample_jit = eqx.filter_jit(_sample)


@eqx.filter_jit
def _batch_loglik(model: HMM, emissions, lengths, inputs=None):
    return jnp.sum(jax.vmap(lambda y, n, u: _filter_fn(model, y, n, u).marginal_loglik)(emissions, lengths, inputs))
