r"""Exact inference in discrete hidden Markov models.

Forward filtering, forward-backward smoothing, two-slice marginals, Viterbi
decoding, forward-filter backward-sample, fixed-lag smoothing and state
prediction for one sequence. Every function takes the model as three arrays,

* ``initial_probs`` :math:`\pi`, shape ``(K,)``,
* ``transition_matrix`` :math:`A`, shape ``(K, K)`` or time-varying
  ``(T-1, K, K)`` (entry ``t`` moves :math:`z_t` to :math:`z_{t+1}`),
* ``log_likelihoods`` :math:`\ell_t(k) = \log p(y_t \mid z_t = k)`, shape ``(T, K)``,

so any emission model (a neural network too) plugs in through its
log-likelihoods. The time convention and what ``length`` does are stated once in
:mod:`ssmjax._types`; batch with :func:`jax.vmap`.

Padding (``length = L < T``)
    Steps ``t >= L`` are treated as *unobserved and frozen*: their
    log-likelihoods are replaced by zero and the transitions into them by the
    identity (both with ``where`` before any arithmetic, so NaN/inf there never
    reach values or gradients). Hence every per-step posterior output at a padded
    step repeats the value of step ``L - 1`` (``filtered_probs[t] =
    predicted_probs[t] = smoothed_probs[t] = filtered_probs[L-1]`` for
    ``t >= L``), padded two-slice marginals are zero, Viterbi paths and
    posterior samples repeat the state of step ``L - 1``.

Numerics
    The forward pass is scaled: each step's likelihoods are shifted by their
    maximum, :math:`B_t(k) = \exp(\ell_t(k) - m_t)`, so log-likelihoods of any
    magnitude (``-1e4`` per step and beyond) do not underflow. If the
    normaliser of some step still underflows (possible only when every state with
    non-zero predicted probability is hundreds of nats less likely than a
    state of predicted probability zero), the whole pass is redone with a shift
    within :math:`\log 2` of the exact log-sum-exp shift
    :math:`\max_k \ell_t(k) + \log p(z_t=k \mid y_{<t})`, read from the binary
    exponents of the predicted probabilities (no logarithm in the loop).
    The per-step log-normalisers are added with a pairwise sum, so the float32
    log-likelihood of long sequences keeps float64-level relative accuracy.
    Structural zeros in ``initial_probs`` and ``transition_matrix`` are exact:
    no logarithm of a probability is taken on the differentiable path.

Batches (``jax.vmap``)
    Under ``jax.vmap`` with a model shared by the batch (``initial_probs`` and a stationary
    ``transition_matrix`` not batched), :func:`hmm_filter`, :func:`hmm_smoother` and the
    gradient of the log-likelihood run one recursion for the whole batch (custom_vmap rules):
    each loop step advances all sequences with one matrix product, in the layout ``jax.vmap``
    hands over, with the same numerics (per-sequence padding, per-sequence underflow rescue)
    and, to round-off, the same results as the unbatched calls. fit_em's E-step runs the same
    recursion. A batch of models or a time-varying matrix runs the per-sequence recursion
    vectorised, as plain ``jax.vmap`` would. The smoother's derivatives are those of the
    per-sequence recursion (automatic differentiation).

Gradients
    :math:`\log p(y_{1:T})` has a custom VJP built from the scaled backward
    recursion:

    .. math::
        \frac{\partial \log p}{\partial \ell_t(k)} = p(z_t = k \mid y_{1:T}), \quad
        \frac{\partial \log p}{\partial A_{ij}} = \sum_t \frac{\alpha_t(i)\, e^{\ell_{t+1}(j)}
        \beta_{t+1}(j)}{p(y_{1:T})}, \quad
        \frac{\partial \log p}{\partial \pi_i} = \frac{e^{\ell_0(i)}\beta_0(i)}{p(y_{1:T})},

    evaluated with the scaled messages, never dividing by :math:`A_{ij}`, so
    they are exact and finite with structural zeros. The backward loop only
    carries and writes :math:`\hat\beta_t`;
    the gradient with respect to :math:`A` is then accumulated by matrix products of
    the filtered probabilities with the backward weights over blocks of rows (no
    (T, K, K) array and no (T, K) weight array for a stationary :math:`A`); memory is
    that of the filtered probabilities, the backward messages and the gradient itself
    (for a stationary :math:`A` the backward scan writes the gradient rows directly and
    carries the :math:`A`-gradient, so no (T, K) messages are stored: peak about 3.6x the
    (T, K) log-likelihoods at T = 1e6, K = 16, float32). When the filtered or predicted
    probabilities also receive cotangents, the VJP of the plain forward scan is
    used instead (exact too).

Where it lives
    This module holds the public functions: they validate (:mod:`ssmjax._hmm.validate`)
    and call the programs of :mod:`ssmjax._hmm.rules` (filter, smoother, custom gradient,
    ``jax.vmap`` rules, fit_em's E-step) and :mod:`ssmjax._hmm.decoding`, which run the one
    forward and one backward recursion of :mod:`ssmjax._hmm.recursion`, or the
    parallel-in-time forms of :mod:`ssmjax._hmm.parallel`. :mod:`ssmjax._hmm.strategy` makes
    the choices between them (:func:`hmm_strategy` shows them).
"""

from __future__ import annotations

import typing
from typing import Optional

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .. import _checks, _deprecation
from .decoding import fixed_lag_program, predict_program, sample_posterior_program, viterbi_program
from .parallel import _filter_parallel, _sample_posterior_parallel, _smoother_parallel, _viterbi_parallel
from .results import HMMFilterResult, HMMPosterior
from .rules import filter_program, smoother_program, two_slice_program
from .strategy import HMMStrategy, select_strategy
from .validate import ARGS_DOC, validate

__all__ = [
    "HMMFilterResult",
    "HMMPosterior",
    "HMMStrategy",
    "hmm_filter",
    "hmm_smoother",
    "hmm_two_slice_marginals",
    "hmm_viterbi",
    "hmm_sample_posterior",
    "hmm_fixed_lag_smoother",
    "hmm_predict",
    "hmm_strategy",
]


# --------------------------------------------------------------------------- public API


@typing.no_type_check
def hmm_filter(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    *,
    length: Int[ArrayLike, ""] | None = None,
    parallel: bool = False,
) -> HMMFilterResult:
    r"""Forward filtering and the marginal log-likelihood of one sequence.

    .. math::
        p(z_t \mid y_{0:t-1}) = \sum_i p(z_{t-1} = i \mid y_{0:t-1}) A_{i,z_t}, \qquad
        p(z_t \mid y_{0:t}) = \frac{p(z_t \mid y_{0:t-1}) e^{\ell_t(z_t)}}{c_t}, \qquad
        \log p(y_{0:L-1}) = \sum_{t<L} \log c_t

    with :math:`c_t = p(y_t \mid y_{0:t-1})`. Conventions: :mod:`ssmjax._types`;
    numerics and padding: :mod:`ssmjax._hmm.inference`. ``marginal_loglik`` has
    a memory-lean custom gradient (see the module docstring).

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        :class:`HMMFilterResult` with ``marginal_loglik`` (), ``filtered_probs`` (T, K)
        and ``predicted_probs`` (T, K). Padded rows repeat ``filtered_probs[L-1]``.

    Raises:
        ValueError: on shape mismatches (naming the argument and both shapes), and, when
            value checks are on, if probabilities are negative / do not sum to one or
            ``log_likelihoods`` is NaN/+inf at a real step (under ``jit`` these fire at
            run time through :func:`equinox.error_if`).

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> post = ssmjax.hmm_filter(pi, A, ll)
        >>> post.filtered_probs.shape
        (3, 2)
        >>> grads = jax.grad(lambda l: ssmjax.hmm_filter(pi, A, l).marginal_loglik)(ll)
        >>> bool(jnp.allclose(grads.sum(1), 1.0))
        True
        >>> lengths = jnp.array([3, 2])
        >>> batch = jnp.stack([ll, ll.at[2].set(jnp.nan)])
        >>> out = jax.vmap(lambda l, n: ssmjax.hmm_filter(pi, A, l, length=n))(batch, lengths)
        >>> out.marginal_loglik.shape
        (2,)
    """
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        return _filter_parallel(pi, trans, ll, n)
    return filter_program(pi, trans, ll, n)


@typing.no_type_check
def hmm_smoother(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    *,
    length: Int[ArrayLike, ""] | None = None,
    parallel: bool = False,
) -> HMMPosterior:
    r"""Forward-backward smoothing of one sequence.

    With the scaled backward messages :math:`\hat\beta_{L-1} = 1`,
    :math:`\hat\beta_t(i) = \sum_j A_{ij} e^{\ell_{t+1}(j)} \hat\beta_{t+1}(j) / c_{t+1}`:

    .. math::
        p(z_t = k \mid y_{0:L-1}) = p(z_t = k \mid y_{0:t})\, \hat\beta_t(k), \qquad
        \xi_t(i, j) = \frac{p(z_t = i \mid y_{0:t}) A_{ij} e^{\ell_{t+1}(j)} \hat\beta_{t+1}(j)}{c_{t+1}}.

    All outputs are differentiable (``marginal_loglik`` through the custom VJP,
    the rest by automatic differentiation).

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        :class:`HMMPosterior`; ``expected_transitions`` is :math:`\sum_{t<L-1} \xi_t`,
        shape (K, K), also for a time-varying ``transition_matrix``.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> post = ssmjax.hmm_smoother(pi, A, ll)
        >>> bool(jnp.allclose(post.smoothed_probs.sum(1), 1.0))
        True
        >>> round(float(post.expected_transitions.sum()), 6)  # T - 1 pairs
        2.0
    """
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        return _smoother_parallel(pi, trans, ll, n)
    return smoother_program(pi, trans, ll, n)


@typing.no_type_check
def hmm_two_slice_marginals(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    *,
    length: Int[ArrayLike, ""] | None = None,
) -> Float[Array, "T-1 K K"]:
    r"""Pairwise posteriors :math:`\xi_t(i, j) = p(z_t = i, z_{t+1} = j \mid y_{0:L-1})`.

    Computed as in :func:`ssmjax.hmm_smoother` (see its equations).

    Args:{args}

    Returns:
        Array of shape (T-1, K, K); entry ``t`` pairs step ``t`` (rows) with ``t+1``
        (columns). Pairs with ``t + 1 >= length`` are zero.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> xi = ssmjax.hmm_two_slice_marginals(pi, A, ll)
        >>> xi.shape
        (2, 2, 2)
    """
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    return two_slice_program(pi, trans, ll, n)


@typing.no_type_check
def hmm_viterbi(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    *,
    length: Int[ArrayLike, ""] | None = None,
    parallel: bool = False,
) -> tuple[Int[Array, " T"], Float[Array, ""]]:
    r"""Most likely state path (Viterbi), computed in log space.

    .. math::
        \delta_0(k) = \log\pi_k + \ell_0(k), \qquad
        \delta_t(j) = \max_i \big(\delta_{t-1}(i) + \log A_{ij}\big) + \ell_t(j),

    then backtracking from :math:`\arg\max_k \delta_{L-1}(k)`.

    Ties are broken deterministically towards the **lowest state index**, both
    in the maximisation over predecessors and for the final state.

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).

    Returns:
        ``(path, log_prob)``: ``path`` int32 of shape (T,), the maximiser of
        :math:`p(z_{0:L-1}, y_{0:L-1})` (padded entries repeat ``path[L-1]``), and
        ``log_prob`` () :math:`= \max_z \log p(z_{0:L-1}, y_{0:L-1})`.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.05, 0.9]]))
        >>> path, log_prob = ssmjax.hmm_viterbi(pi, A, ll)
        >>> path.tolist()
        [0, 0, 1]
    """
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        return _viterbi_parallel(pi, trans, ll, n)
    return viterbi_program(pi, trans, ll, n)


@_deprecation.key_last("hmm_sample_posterior")
@typing.no_type_check
def hmm_sample_posterior(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    *,
    length: Int[ArrayLike, ""] | None = None,
    parallel: bool = False,
    key: PRNGKeyArray,
) -> Int[Array, " T"]:
    r"""An exact draw of :math:`z_{0:L-1} \sim p(z \mid y_{0:L-1})` (forward filter, backward sample).

    .. math::
        z_{L-1} \sim p(z_{L-1} \mid y_{0:L-1}), \qquad
        p(z_t = i \mid z_{t+1}, y) \propto p(z_t = i \mid y_{0:t}) A_{i, z_{t+1}}.

    For several draws, ``jax.vmap`` over keys.

    Args:{args}
        parallel: ``True`` runs the parallel-in-time (``lax.associative_scan``,
            O(log T) depth) version from :mod:`ssmjax._hmm.parallel`; same results to
            round-off. Worth it on accelerators for long sequences; on CPU the
            sequential scan is faster (see ``benchmarks/README.md``).
        key: a JAX PRNG key (keyword-only, as everywhere in ssmjax).

    Returns:
        int32 array of shape (T,); padded entries repeat the state at ``L - 1``.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`.

    Example:
        >>> import jax, jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> keys = jax.random.split(jax.random.key(0), 100)
        >>> draws = jax.vmap(lambda k: ssmjax.hmm_sample_posterior(pi, A, ll, key=k))(keys)
        >>> draws.shape
        (100, 3)
    """
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    if parallel:
        return _sample_posterior_parallel(key, pi, trans, ll, n)
    return sample_posterior_program(key, pi, trans, ll, n)


@typing.no_type_check
def hmm_fixed_lag_smoother(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    lag: int,
    *,
    length: Int[ArrayLike, ""] | None = None,
) -> Float[Array, "T K"]:
    r"""Fixed-lag smoothing: row ``t`` is :math:`p(z_{t-\mathrm{lag}} \mid y_{0:t})`.

    .. math::
        p(z_s \mid y_{0:t}) \propto p(z_s \mid y_{0:s})\, \hat\beta^{(t)}_s, \qquad
        \hat\beta^{(t)}_t = 1, \quad
        \hat\beta^{(t)}_{r-1} \propto A_{r-1}\big(e^{\ell_r} \odot \hat\beta^{(t)}_r\big)

    with :math:`s = \max(t - \mathrm{lag}, 0)`: rows ``t < lag`` hold
    :math:`p(z_0 \mid y_{0:t})` (the smoothed first state given the data so far).
    All windows are advanced together by a scan of ``lag`` vectorised backward
    steps: :math:`O(T \cdot \mathrm{lag} \cdot K^2)` work, :math:`O(T K)` memory.
    ``lag = 0`` gives the filtered probabilities; ``lag >= T - 1`` gives, in the last
    row, the smoothed :math:`p(z_{T-1-\mathrm{lag}} \mid y)`. Rows ``t >= length``
    hold :math:`p(z_{t-\mathrm{lag}} \mid y_{0:L-1})` (no further data arrives).

    Args:{args}
        lag: non-negative Python int (static: the scan length).

    Returns:
        Array of shape (T, K).

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`, and for a negative or non-int ``lag``.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> probs = ssmjax.hmm_fixed_lag_smoother(pi, A, ll, lag=1)
        >>> probs.shape
        (3, 2)
    """
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ValueError(f"`lag` must be a non-negative Python int; got {lag!r}.")
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    return fixed_lag_program(pi, trans, ll, n, lag=lag)


@typing.no_type_check
def hmm_predict(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    num_steps: int,
    *,
    length: Int[ArrayLike, ""] | None = None,
    future_transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "H K K"] | None = None,
) -> Float[Array, "H K"]:
    r"""State predictions :math:`p(z_{L-1+h} \mid y_{0:L-1})` for ``h = 1..num_steps``.

    .. math::
        p(z_{L-1+h} \mid y_{0:L-1}) = p(z_{L-1} \mid y_{0:L-1})\, F_0 F_1 \cdots F_{h-1}

    where :math:`F_h` is ``future_transition_matrix`` (entry ``h`` moves
    :math:`z_{L-1+h}` to :math:`z_{L+h}`). Prediction starts from the last *real* step
    ``L - 1`` (``L = length``), whatever the padding holds.

    Args:{args}
        num_steps: horizon ``H`` (positive int).
        future_transition_matrix: transitions beyond the data, shape (K, K) or (H, K, K).
            Defaults to ``transition_matrix`` when that is stationary; **required**
            when ``transition_matrix`` is time-varying (its entries cover only the
            observed steps, and guessing future dynamics silently would be wrong).

    Returns:
        Array of shape (H, K).

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`; for a bad ``num_steps``; when
            ``future_transition_matrix`` is missing for a time-varying model or has
            the wrong shape or values.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi = jnp.array([0.5, 0.5])
        >>> A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
        >>> ll = jnp.log(jnp.array([[0.7, 0.1], [0.6, 0.2], [0.1, 0.9]]))
        >>> ssmjax.hmm_predict(pi, A, ll, num_steps=4).shape
        (4, 2)
    """
    num_steps = _checks.positive_int("num_steps", num_steps)
    pi, trans, ll, n = validate(initial_probs, transition_matrix, log_likelihoods, length)
    num_states = ll.shape[1]
    if future_transition_matrix is None:
        if trans.ndim == 3:
            raise ValueError(
                "`future_transition_matrix` of shape (K, K) or (num_steps, K, K) = "
                f"({num_steps}, {num_states}, {num_states}) is required when `transition_matrix` "
                f"is time-varying; got None."
            )
        future = jnp.broadcast_to(trans, (num_steps, num_states, num_states))
    else:
        future = _checks.as_float_array("future_transition_matrix", future_transition_matrix, trans.dtype)
        which = _checks.check_shape_options(
            "future_transition_matrix",
            future,
            [(num_states, num_states), (num_steps, num_states, num_states)],
            f"K = {num_states}, num_steps = {num_steps}",
        )
        future = _checks.check_probability_vector("future_transition_matrix", future)
        if which == 0:
            future = jnp.broadcast_to(future, (num_steps, num_states, num_states))
    return predict_program(pi, trans, ll, n, future)


@typing.no_type_check
def hmm_strategy(
    initial_probs: Float[ArrayLike, " K"],
    transition_matrix: Float[ArrayLike, "K K"] | Float[ArrayLike, "T_minus_1 K K"],
    log_likelihoods: Float[ArrayLike, "T K"],
    *,
    function: str = "smoother",
    parallel: bool = False,
    batch_size: Optional[int] = None,
    model_batched: bool = False,
) -> HMMStrategy:
    r"""Which path :func:`ssmjax.hmm_filter` or :func:`ssmjax.hmm_smoother` takes for these
    arguments, and why (see :mod:`ssmjax._hmm.strategy`).

    Args:
        initial_probs: as for :func:`ssmjax.hmm_filter`, shape (K,).
        transition_matrix: as for :func:`ssmjax.hmm_filter`, shape (K, K) or (T-1, K, K).
        log_likelihoods: as for :func:`ssmjax.hmm_filter`, shape (T, K).
        function: ``"filter"`` or ``"smoother"``.
        parallel: the ``parallel=`` option of the call.
        batch_size: ``B`` when the call runs under ``jax.vmap`` over ``B`` sequences
            (``log_likelihoods`` is then one of them); ``None`` for one sequence.
        model_batched: whether ``jax.vmap`` also maps the model (``initial_probs`` or
            ``transition_matrix``).

    Returns:
        :class:`HMMStrategy`.

    Raises:
        ValueError: as :func:`ssmjax.hmm_filter`, and for an unknown ``function``.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi, A, ll = jnp.ones(16) / 16, jnp.full((16, 16), 1 / 16), jnp.zeros((1000, 16))
        >>> chosen = ssmjax.hmm_strategy(pi, A, ll, batch_size=256)
        >>> chosen.batching, chosen.layout, chosen.emissions
        ('batched', 'BTK', 'in-loop')
    """
    if function not in ("filter", "smoother"):
        raise ValueError(f"`function` must be 'filter' or 'smoother'; got {function!r}.")
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    _, trans, ll, _ = validate(initial_probs, transition_matrix, log_likelihoods, None)
    return select_strategy(function, ll.shape[1], trans.ndim == 3, parallel, batch_size, model_batched)


for _fn in (
    hmm_filter,
    hmm_smoother,
    hmm_two_slice_marginals,
    hmm_viterbi,
    hmm_sample_posterior,
    hmm_fixed_lag_smoother,
    hmm_predict,
):
    _fn.__doc__ = _fn.__doc__.replace("{args}", ARGS_DOC)
del _fn
