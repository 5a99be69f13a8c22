r"""Fully observed (visible) Markov chains: probability of a state sequence and the counting MLE.

Convention (the "start state" :math:`s_0`). A chain over states
:math:`S = \{0, \dots, K-1\}` starts, before its first real step, in a fixed
start state :math:`s_0 \notin S`: :math:`z_0 \equiv s_0`. One augmented
transition matrix :math:`\bar A \in \mathbb R^{(K+1)\times(K+1)}`, indexed
``0`` for :math:`s_0` and ``1..K`` for the real states, then parameterises the
whole chain, and

.. math::

    P(z_1, \dots, z_T) = \prod_{t=1}^{T} \bar A_{z_{t-1} z_t}.

Nothing moves back into :math:`s_0` (column 0 of :math:`\bar A` is zero), so
:math:`\bar A` splits into the two parameters ssmjax uses everywhere:

* ``initial_probs[j] = \bar A_{0, j+1}`` (the start state's row, the usual
  :math:`\pi`), and
* ``transition_matrix[i, j] = \bar A_{i+1, j+1} = p(z_{t+1} = j \mid z_t = i)``.

In 0-based array time (:mod:`ssmjax._types`) a sequence ``states`` of shape
``(T,)`` therefore has

.. math::

    \log P(\mathrm{states}) = \log \pi_{z_0} + \sum_{t=0}^{T-2} \log A_{z_t z_{t+1}}.

:meth:`MarkovChain.from_augmented_matrix` and :attr:`MarkovChain.augmented_matrix`
convert between the two forms. Maximum likelihood counts transitions, the start
state's "transitions" being the first states of the sequences:
:math:`\hat{\bar A}_{ij} = n_{ij} / \sum_{j'} n_{ij'}`.

Storage: a :class:`MarkovChain` is fitted in closed form, so it stores the
probabilities as given (``initial_probs``, ``transition_matrix``), exact zeros
included; log-probabilities of zero-probability events are exactly ``-inf``.

References:
    D. Ramage, *Hidden Markov Models Fundamentals*, CS229 section notes (2007), §1.
"""

from __future__ import annotations

import functools
import typing
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from . import _checks, _deprecation

__all__ = ["MarkovChain", "markov_transition_counts"]


def _safe_log(p: jax.Array) -> jax.Array:
    """log with exact -inf at zeros and a zero (not NaN) gradient there."""
    positive = p > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)), -jnp.inf)


def _check_states(
    name: str, states: jax.Array, num_states: int, mask: "Optional[jax.Array | np.ndarray]"
) -> jax.Array:
    xp, values, mask = _checks.host_arrays(states, mask)  # NumPy when concrete: nothing to compile
    bad = (values < 0) | (values >= num_states)
    if mask is not None:
        bad = bad & mask
    return _checks.check_values(
        states, bad, f"`{name}` must hold states in [0, {num_states}) (num_states) at unpadded steps."
    )


def _check_lengths(lengths, batch_size: int, num_timesteps: int) -> jax.Array:
    if lengths is None:
        return _checks.to_device(np.full((batch_size,), num_timesteps, np.int32))
    lengths = _checks.to_device(lengths)
    _checks.check_shape("lengths", lengths, (batch_size,), "one length per sequence")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"`lengths` must hold integers; got dtype {lengths.dtype}.")
    lengths = lengths.astype(jnp.int32)
    xp, values = _checks.host_arrays(lengths)
    bad = (values < 1) | (values > num_timesteps)
    return _checks.check_values(
        lengths, bad, f"`lengths` must lie in [1, {num_timesteps}] (the number of time steps T)."
    )


@functools.partial(jax.jit, static_argnames=("num_states", "dtype"))
def _counts(
    states: Int[Array, "B T"], lengths: Int[Array, " B"], num_states: int, dtype
) -> tuple[Float[Array, " K"], Float[Array, "K K"]]:
    num_timesteps = states.shape[1]
    valid = jnp.arange(num_timesteps)[None, :] < lengths[:, None]  # (B, T)
    safe = jnp.where(valid, states, 0)
    initial = jnp.zeros(num_states, dtype).at[safe[:, 0]].add(1.0)
    pair_valid = valid[:, 1:]  # pair (t, t+1) is real iff t+1 < length
    flat = safe[:, :-1] * num_states + safe[:, 1:]
    trans = jnp.zeros(num_states * num_states, dtype).at[flat.reshape(-1)].add(
        pair_valid.reshape(-1).astype(dtype)
    )
    return initial, trans.reshape(num_states, num_states)


def _prepare_batch(states, lengths, num_states):
    states = _checks.to_device(states)
    _checks.check_shape("states", states, ("B", "T"), "a batch of state sequences (use states[None] for one)")
    if not jnp.issubdtype(states.dtype, jnp.integer):
        raise ValueError(f"`states` must hold integer states; got dtype {states.dtype}.")
    batch_size, num_timesteps = states.shape
    if num_timesteps < 1:
        raise ValueError("`states` must have at least one time step; got shape (B, 0).")
    lengths = _check_lengths(lengths, batch_size, num_timesteps)
    if num_states is None:
        if isinstance(states, jax.core.Tracer):
            raise ValueError("`num_states` must be given when `states` is traced (under jit/vmap).")
        valid = np.arange(num_timesteps)[None, :] < _checks.host_copy(lengths)[:, None]
        num_states = int(_checks.host_copy(states)[valid].max()) + 1
    num_states = _checks.positive_int("num_states", num_states)
    xp, lengths_v = _checks.host_arrays(lengths)
    valid = xp.arange(num_timesteps)[None, :] < lengths_v[:, None]
    states = _check_states("states", states, num_states, valid)
    return states.astype(jnp.int32), lengths, num_states


@typing.no_type_check
def markov_transition_counts(
    states: Int[ArrayLike, "B T"], lengths: Int[ArrayLike, " B"] | None = None, *, num_states: int | None = None
) -> tuple[Float[Array, " K"], Float[Array, "K K"]]:
    r"""Counts of first states and of transitions in a ragged batch of state sequences.

    ``initial_counts[j]`` is the number of sequences starting in ``j`` (the
    start state's row of the augmented count matrix) and
    ``transition_counts[i, j]`` the number of pairs :math:`(z_t, z_{t+1}) = (i, j)`
    with ``t + 1 < lengths[b]``. Steps ``t >= lengths[b]`` are padding and are
    ignored whatever they contain.

    Args:
        states: integer states, shape ``(B, T)``.
        lengths: optional ``(B,)`` integers in ``[1, T]`` (default: all ``T``).
        num_states: ``K``; inferred as ``max(states) + 1`` over real steps if
            omitted (eager calls only: it fixes output shapes).

    Returns:
        ``(initial_counts, transition_counts)`` of shapes ``(K,)`` and ``(K, K)``
        (floating dtype).

    Raises:
        ValueError: bad shapes or dtypes, states outside ``[0, K)`` at real
            steps, lengths outside ``[1, T]`` (a run-time error under ``jit``).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> init, trans = ssmjax.markov_transition_counts(jnp.array([[0, 1, 1, 9]]), jnp.array([3]), num_states=2)
        >>> init.tolist(), trans.tolist()
        ([1.0, 0.0], [[0.0, 1.0], [0.0, 1.0]])
    """
    states, lengths, num_states = _prepare_batch(states, lengths, num_states)
    return _counts(states, lengths, num_states, jnp.result_type(float))


class MarkovChain(eqx.Module):
    r"""A fully observed first-order Markov chain with initial distribution and transition matrix.

    .. math::

        p(z_0 = j) = \pi_j, \qquad p(z_{t+1} = j \mid z_t = i) = A_{ij}.

    ``initial_probs`` is the start state's row of the augmented matrix of the
    module docs (:mod:`ssmjax._markov`): ``initial_probs[j] = \bar A_{0, j+1}``.

    Args:
        initial_probs: ``(K,)`` probability vector :math:`\pi`.
        transition_matrix: ``(K, K)`` row-stochastic matrix :math:`A`.

    Raises:
        ValueError: wrong shapes, or rows that are not probability vectors
            (value check: eager ``ValueError``, run-time error under ``jit``).

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> chain = ssmjax.MarkovChain(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]))
        >>> round(float(jnp.exp(chain.marginal_loglik(jnp.array([0, 0, 1])))), 4)  # 0.5 * 0.9 * 0.1
        0.045
    """

    initial_probs: Float[Array, " K"]
    transition_matrix: Float[Array, "K K"]

    @typing.no_type_check
    def __init__(self, initial_probs: Float[ArrayLike, " K"], transition_matrix: Float[ArrayLike, "K K"]):
        initial_probs = _checks.as_float_array("initial_probs", initial_probs)
        _checks.check_shape("initial_probs", initial_probs, ("K",), "initial state distribution")
        k = initial_probs.shape[0]
        transition_matrix = _checks.as_float_array("transition_matrix", transition_matrix, initial_probs.dtype)
        _checks.check_shape("transition_matrix", transition_matrix, (k, k), "row-stochastic, rows = from-state")
        self.initial_probs = _checks.check_probability_vector("initial_probs", initial_probs)
        self.transition_matrix = _checks.check_probability_vector("transition_matrix", transition_matrix)

    @classmethod
    @typing.no_type_check
    def from_augmented_matrix(cls, augmented_matrix: Float[ArrayLike, "K_plus_1 K_plus_1"]) -> MarkovChain:
        r"""Build a chain from the ``(K+1, K+1)`` matrix :math:`\bar A` whose index 0 is the start state.

        Row 0 becomes ``initial_probs`` and the lower-right ``K x K`` block the
        ``transition_matrix``; column 0 must be zero (no transition into
        :math:`s_0`).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> aug = jnp.array([[0, 0.5, 0.5], [0, 0.9, 0.1], [0, 0.2, 0.8]])
            >>> ssmjax.MarkovChain.from_augmented_matrix(aug).initial_probs.tolist()
            [0.5, 0.5]
        """
        aug = _checks.as_float_array("augmented_matrix", augmented_matrix)
        _checks.check_shape("augmented_matrix", aug, ("K+1", "K+1"), "start state first")
        if aug.shape[0] != aug.shape[1] or aug.shape[0] < 2:
            raise ValueError(
                f"`augmented_matrix` must be square of size K+1 >= 2; got shape {tuple(aug.shape)}."
            )
        aug = _checks.check_values(
            aug, aug[:, 0] != 0, "`augmented_matrix` must have a zero first column (nothing returns to s_0)."
        )
        return cls(aug[0, 1:], aug[1:, 1:])

    @property
    def num_states(self) -> int:
        """Number of states ``K``."""
        return self.initial_probs.shape[0]

    @property
    def augmented_matrix(self) -> Float[Array, "K1 K1"]:
        r"""The ``(K+1, K+1)`` matrix :math:`\bar A` with the start state :math:`s_0` at index 0."""
        k = self.num_states
        aug = jnp.zeros((k + 1, k + 1), self.initial_probs.dtype)
        return aug.at[0, 1:].set(self.initial_probs).at[1:, 1:].set(self.transition_matrix)

    @property
    def stationary_distribution(self) -> Float[Array, " K"]:
        r"""A distribution :math:`p` with :math:`p^\top A = p^\top`, :math:`\sum_j p_j = 1`.

        Solved as the least-squares solution of the stacked system
        :math:`[A^\top - I; \mathbf 1^\top] p = [0; 1]`, exact for an irreducible
        chain (unique stationary distribution). For a reducible chain the
        stationary distribution is not unique and the minimum-norm solution is
        returned, which need not be non-negative.

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> chain = ssmjax.MarkovChain(jnp.array([1.0, 0.0]), jnp.array([[0.9, 0.1], [0.2, 0.8]]))
            >>> [round(x, 4) for x in chain.stationary_distribution.tolist()]
            [0.6667, 0.3333]
        """
        return _stationary(self.transition_matrix)

    @typing.no_type_check
    def marginal_loglik(
        self,
        states: Int[ArrayLike, " T"],
        *,
        length: Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, ""]:
        r"""Log-likelihood of one fully observed state sequence, :math:`\log \pi_{z_0} + \sum_t \log A_{z_t z_{t+1}}`.

        Args:
            states: integer states, shape ``(T,)``.
            length: optional number of real steps (:mod:`ssmjax._types`); steps
                ``t >= length`` are ignored whatever they contain.

        Returns:
            Scalar; exactly ``-inf`` if the sequence uses a zero-probability
            start or transition.

        Raises:
            ValueError: wrong shape or dtype; states outside ``[0, K)`` at real
                steps or ``length`` outside ``[1, T]`` (value checks).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> chain = ssmjax.MarkovChain(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]))
            >>> round(float(chain.marginal_loglik(jnp.array([0, 1, 7]), length=2)), 6)  # log(0.5 * 0.1)
            -2.995732
        """
        states = _checks.to_device(states)
        _checks.check_shape("states", states, ("T",), "one state sequence; use jax.vmap for a batch")
        if not jnp.issubdtype(states.dtype, jnp.integer):
            raise ValueError(f"`states` must hold integer states; got dtype {states.dtype}.")
        num_timesteps = states.shape[0]
        if num_timesteps < 1:
            raise ValueError("`states` must have at least one time step; got shape (0,).")
        length = _checks.check_length(length, num_timesteps)
        if length is None:
            length = _checks.to_device(np.int32(num_timesteps))
        xp, length_v = _checks.host_arrays(length)
        valid = xp.arange(num_timesteps) < length_v
        states = _check_states("states", states, self.num_states, valid)
        return _log_prob(self.initial_probs, self.transition_matrix, states.astype(jnp.int32), length)

    def log_prob(self, states, *, length=None) -> Float[Array, ""]:
        """Deprecated spelling of :meth:`marginal_loglik`."""
        _deprecation.warn("MarkovChain.log_prob", "MarkovChain.marginal_loglik")
        return self.marginal_loglik(states, length=length)

    @_deprecation.key_last("MarkovChain.sample", skip=1)
    @typing.no_type_check
    def sample(self, num_timesteps: int, *, key: PRNGKeyArray) -> Int[Array, " T"]:
        """Draw one state sequence of ``num_timesteps`` steps (``jax.vmap`` over keys for a batch).

        Example:
            >>> import jax, jax.numpy as jnp, ssmjax
            >>> chain = ssmjax.MarkovChain(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]))
            >>> chain.sample(6, key=jax.random.key(0)).shape
            (6,)
        """
        num_timesteps = _checks.positive_int("num_timesteps", num_timesteps)
        return _sample(self.initial_probs, self.transition_matrix, key, num_timesteps)

    @classmethod
    @typing.no_type_check
    def fit(
        cls,
        states: Int[ArrayLike, "B T"],
        lengths: Int[ArrayLike, " B"] | None = None,
        *,
        num_states: int | None = None,
        pseudo_counts: float = 0.0,
        initial_pseudo_counts: Float[ArrayLike, " K"] | float | None = None,
        transition_pseudo_counts: Float[ArrayLike, "K K"] | float | None = None,
    ) -> MarkovChain:
        r"""Closed-form maximum-likelihood (or Dirichlet-smoothed) chain from a ragged batch.

        .. math::

            \hat\pi_j = \frac{n_{0j} + c_{0j}}{\sum_{j'} (n_{0j'} + c_{0j'})}, \qquad
            \hat A_{ij} = \frac{n_{ij} + c_{ij}}{\sum_{j'} (n_{ij'} + c_{ij'})},

        with :math:`n_{0j}` the number of sequences starting in ``j`` and
        :math:`n_{ij}` the number of ``i -> j`` transitions within each
        sequence's length (:func:`markov_transition_counts`). With ``c = 0`` this
        is the MLE; with pseudo-counts ``c`` it is the posterior mean under a
        Dirichlet(``c``) prior on each row (equivalently the MAP under
        Dirichlet(``c + 1``)).

        A row whose counts and pseudo-counts are all zero (a state never left
        in the data) is set to the uniform distribution ``1/K``, not NaN.

        Args:
            states: integer states, shape ``(B, T)`` (``states[None]`` for one sequence).
            lengths: optional ``(B,)`` integers in ``[1, T]``; default all ``T``.
            num_states: ``K``; required under ``jit``, else ``max(states) + 1``.
            pseudo_counts: non-negative scalar added to every count.
            initial_pseudo_counts: optional, broadcastable to ``(K,)``; overrides
                ``pseudo_counts`` for the initial row.
            transition_pseudo_counts: optional, broadcastable to ``(K, K)``;
                overrides ``pseudo_counts`` for the transition rows.

        Returns:
            The fitted :class:`MarkovChain`.

        Raises:
            ValueError: bad shapes or dtypes; states outside ``[0, K)`` at real
                steps, lengths outside ``[1, T]``, negative pseudo-counts (value
                checks: run-time errors under ``jit``).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> states = jnp.array([[0, 0, 1, 1], [1, 0, 0, 0]])
            >>> chain = ssmjax.MarkovChain.fit(states, jnp.array([4, 2]))
            >>> chain.initial_probs.tolist(), chain.transition_matrix.tolist()
            ([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]])
        """
        states, lengths, num_states = _prepare_batch(states, lengths, num_states)
        dtype = jnp.result_type(float)
        init_c = pseudo_counts if initial_pseudo_counts is None else initial_pseudo_counts
        trans_c = pseudo_counts if transition_pseudo_counts is None else transition_pseudo_counts
        init_c = _as_pseudo_counts("initial_pseudo_counts", init_c, (num_states,), dtype)
        trans_c = _as_pseudo_counts("transition_pseudo_counts", trans_c, (num_states, num_states), dtype)
        return cls(*_fitted_probs(states, lengths, init_c, trans_c, num_states, dtype))


def _as_pseudo_counts(name: str, value, shape: tuple[int, ...], dtype) -> jax.Array:
    xp = _checks.host_namespace(value)  # on the host: checked and broadcast without compiling anything
    arr = np.asarray(value, dtype) if xp is np else _checks.as_float_array(name, value, dtype)
    try:
        arr = xp.broadcast_to(arr, shape)
    except ValueError as err:
        raise ValueError(
            f"`{name}` must be a scalar or broadcastable to shape {shape}; got shape {tuple(arr.shape)}."
        ) from err
    arr = _checks.check_values(arr, (arr < 0) | ~xp.isfinite(arr), f"`{name}` must be finite and non-negative.")
    return _checks.to_device(arr)


@functools.partial(jax.jit, static_argnames=("num_states", "dtype"))
def _fitted_probs(states, lengths, initial_pseudo_counts, transition_pseudo_counts, num_states: int, dtype):
    """The maximum a posteriori ``(initial_probs, transition_matrix)`` of :meth:`MarkovChain.fit`, one program."""
    initial, trans = _counts(states, lengths, num_states, dtype)
    return _normalise_rows(initial + initial_pseudo_counts), _normalise_rows(trans + transition_pseudo_counts)


@jax.jit
def _normalise_rows(counts: Float[Array, "*rows K"]) -> Float[Array, "*rows K"]:
    totals = counts.sum(-1, keepdims=True)
    uniform = jnp.full_like(counts, 1.0 / counts.shape[-1])
    return jnp.where(totals > 0, counts / jnp.where(totals > 0, totals, 1.0), uniform)


@jax.jit
def _log_prob(
    initial_probs: Float[Array, " K"], transition_matrix: Float[Array, "K K"], states: Int[Array, " T"], length: Int[Array, ""]
) -> Float[Array, ""]:
    num_timesteps = states.shape[0]
    safe = jnp.where(jnp.arange(num_timesteps) < length, states, 0)
    log_trans = _safe_log(transition_matrix)[safe[:-1], safe[1:]]  # (T-1,)
    pair_valid = jnp.arange(1, num_timesteps) < length
    return _safe_log(initial_probs)[safe[0]] + jnp.sum(jnp.where(pair_valid, log_trans, 0.0))


@functools.partial(jax.jit, static_argnames=("num_timesteps",))
def _sample(
    initial_probs: Float[Array, " K"], transition_matrix: Float[Array, "K K"], key: PRNGKeyArray, num_timesteps: int
) -> Int[Array, " T"]:
    key_first, key_rest = jax.random.split(key)
    log_trans = _safe_log(transition_matrix)
    first = jax.random.categorical(key_first, _safe_log(initial_probs)).astype(jnp.int32)

    def _step(state, step_key):
        nxt = jax.random.categorical(step_key, log_trans[state]).astype(jnp.int32)
        return nxt, nxt

    _, rest = jax.lax.scan(_step, first, jax.random.split(key_rest, num_timesteps - 1))
    return jnp.concatenate([first[None], rest])


@jax.jit
def _stationary(transition_matrix: Float[Array, "K K"]) -> Float[Array, " K"]:
    k = transition_matrix.shape[0]
    system = jnp.concatenate([transition_matrix.T - jnp.eye(k, dtype=transition_matrix.dtype),
                              jnp.ones((1, k), transition_matrix.dtype)])
    rhs = jnp.zeros(k + 1, transition_matrix.dtype).at[k].set(1.0)
    solution, *_ = jnp.linalg.lstsq(system, rhs)
    return solution
