r"""Hidden Markov models whose transition probabilities depend on inputs (IO-HMM, GLM-HMM).

:class:`InputDrivenHMM`: :math:`p(z_{t+1} = j \mid z_t = i, u_{t+1}) = \mathrm{softmax}_j(W_{ij} \cdot u_{t+1} + b_{ij})`,
a multinomial logistic regression per origin state on the input of the step the chain moves
to (the convention of the LGSSM's inputs, :math:`B_t u_{t+1}`, and of statsmodels'
``exog_tvtp``). ``b`` is stored as ``transition_log_probs``, so ``transition_matrix`` is the
matrix at :math:`u = 0`, and with ``W = 0`` the model is an :class:`ssmjax.HMM`. The emissions
are any family; a regression family reads the same ``inputs``. With ``shared_weights=True`` the
weights do not depend on the origin state, :math:`W_{ij} = W_j` (the GLM-HMM of Ashwood et al.,
2022, and of the ``ssm`` package's input-driven transitions): the inputs move every row's
logits alike, and each row keeps its own bias :math:`b_{ij}`.

**EM.** The E-step is exact (per sequence: the transition matrices vary in time). The
transition coefficients' M-step maximises the expected complete-data log-likelihood
:math:`\sum_t \sum_{ij} \xi_t(i, j) \log p(z_{t+1} = j \mid z_t = i, u_{t+1})`, one concave
multinomial logistic regression per origin state ``i`` on the two-slice marginals
:math:`\xi_t`, by ``NEWTON_STEPS`` Newton steps with backtracking (a step is taken only where
it does not lower that objective): a generalised EM whose log-likelihood never decreases.
The two-slice marginals and inputs of every step are kept for it, not summed over the batch.
With shared weights the M-step maximises in two blocks, each a concave problem: every row's
biases given :math:`W`, then :math:`W` given the biases, one multinomial logistic regression
over all (step, origin) pairs with the origin's biases as offsets (a conditional maximisation,
still never lowering the likelihood).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Shaped

from .. import _checks
from .._newton import finite_or_zero, safeguarded_newton
from .inference import hmm_smoother, hmm_two_slice_marginals
from .emissions.base import AbstractEmissions, _combine_sequences
from .initialise import FAMILIES, INPUT_FAMILIES
from .model import HMM


def _real_next(inputs, length):
    """``inputs[1:]``, the inputs the transitions read, zero past the end of the sequence (padding may hold anything)."""
    nxt = inputs[1:]
    if length is None:
        return nxt
    return jnp.where((jnp.arange(1, inputs.shape[0]) < length)[:, None], nxt, 0.0)


# Newton steps per M-step (each the best of several step lengths, see ssmjax._newton).
NEWTON_STEPS = 5


def _logistic_objective(coefs, pairs, u1, offsets=0.0):
    """``sum_t [xi_t . eta_t - n_t logsumexp(eta_t)]``, ``eta_t = coefs @ u1_t + offsets_t``: a multinomial
    logistic regression's expected log-likelihood (``coefs`` ``(K, P)``, ``pairs`` ``(N, K)``, ``u1`` ``(N, P)``)."""
    eta = u1 @ coefs.T + offsets
    return jnp.sum(pairs * eta) - jnp.sum(jnp.sum(pairs, axis=-1) * jax.nn.logsumexp(eta, axis=-1))


def _logistic_newton(coefs, pairs, u1, free, offsets=0.0):
    """``coefs`` ``(K, P)`` after ``NEWTON_STEPS`` safeguarded Newton steps on the columns ``free``."""
    num_states, num_free = coefs.shape[0], len(free)
    uf = u1[:, free]
    counts = jnp.sum(pairs, axis=-1)

    def direction(c):
        p = jax.nn.softmax(u1 @ c.T + offsets, axis=-1)  # (N, K)
        grad = ((pairs - counts[:, None] * p).T @ uf).reshape(-1)
        wp = (counts[:, None] * p)[:, :, None] * uf[:, None, :]  # (N, K, F)
        diag = jnp.einsum("nkp,nq->kpq", wp, uf)
        outer = wp.reshape(len(uf), -1).T @ (p[:, :, None] * uf[:, None, :]).reshape(len(uf), -1)
        eye_k = jnp.eye(num_states, dtype=c.dtype)
        info = (eye_k[:, None, :, None] * diag[:, :, None, :]).reshape(outer.shape) - outer  # minus the Hessian
        # The Hessian is singular along a shift common to all K entries of a column (it changes no
        # probability); a ridge at round-off scale makes the system solvable, and the shift the
        # round-off then puts into the step is removed, so coefficients do not drift along it.
        ridge = jnp.finfo(c.dtype).eps * (jnp.trace(info) + 1.0) * jnp.eye(info.shape[0], dtype=c.dtype)
        step = jnp.linalg.solve(info + ridge, grad).reshape(num_states, num_free)
        return finite_or_zero(step - jnp.mean(step, axis=0), axis=None)

    def apply(c, length, step):
        return c.at[:, free].add(length * step)

    def gain(c, step, length):
        return _logistic_objective(apply(c, length, step), pairs, u1, offsets) - _logistic_objective(c, pairs, u1, offsets)

    return safeguarded_newton(coefs, direction, gain, apply, num_steps=NEWTON_STEPS)


class InputDrivenHMM(HMM):
    r"""An HMM whose transition probabilities depend on inputs: :math:`p(z_{t+1} = j \mid z_t = i, u_{t+1}) = \mathrm{softmax}_j(W_{ij} \cdot u_{t+1} + b_{ij})`.

    Args:
        initial_probs: ``(K,)``.
        transition_matrix: ``(K, K)``, the transition matrix at ``u = 0`` (``softmax(b)``); no zero entries.
        emissions: any emission model with ``K`` states (a regression family reads the same inputs).
        transition_weights: ``(K, K, Du)``, :math:`W`; with ``shared_weights``, ``(K, Du)`` (or
            ``(K, K, Du)`` with equal rows).
        shared_weights: one weight vector per destination state, shared by all origins (GLM-HMM).

    Every method of :class:`ssmjax.HMM`, :func:`ssmjax.fit_em` (module docstring) and
    :func:`ssmjax.fit_sgd` take ``inputs`` ``(T, Du)`` (``(B, T, Du)`` for a batch); the input of
    step 0 is read by nothing but the emissions.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> hmm = ssmjax.InputDrivenHMM(
        ...     jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.1, 0.9]]),
        ...     ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0]])),
        ...     transition_weights=jnp.array([[[0.0], [3.0]], [[0.0], [-3.0]]]))
        >>> u = jnp.array([[0.0], [2.0], [-2.0], [2.0]])  # positive: towards state 1 from 0, towards 0 from 1
        >>> hmm.viterbi(jnp.array([[1], [7], [9], [0]]), inputs=u).tolist()
        [0, 1, 1, 0]
    """

    transition_weights: Float[Array, "K K Du"]
    shared_weights: bool = eqx.field(static=True, default=False)

    @typing.no_type_check
    def __init__(
        self,
        initial_probs: Float[ArrayLike, " K"] | None = None,
        transition_matrix: Float[ArrayLike, "K K"] | None = None,
        emissions: AbstractEmissions | None = None,
        transition_weights: Float[ArrayLike, "K K Du"] | Float[ArrayLike, "K Du"] | None = None,
        *,
        shared_weights: bool = False,
        initial_log_probs: Float[ArrayLike, " K"] | None = None,
        transition_log_probs: Float[ArrayLike, "K K"] | None = None,
    ):
        super().__init__(initial_probs, transition_matrix, emissions,
                         initial_log_probs=initial_log_probs, transition_log_probs=transition_log_probs)
        k = self.num_states
        if transition_weights is None:
            raise ValueError("`transition_weights` (K, K, Du) is required; zeros give an ordinary HMM.")
        weights = _checks.as_float_array("transition_weights", transition_weights, self.transition_log_probs.dtype)
        self.shared_weights = bool(shared_weights)
        if self.shared_weights and weights.ndim == 2:
            _checks.check_shape("transition_weights", weights, (k, "Du"), "one coefficient vector per destination")
            weights = jnp.broadcast_to(weights, (k,) + weights.shape)
        _checks.check_shape("transition_weights", weights, (k, k, "Du"), "one coefficient vector per transition")
        xp, values, logits = _checks.host_arrays(weights, self.transition_log_probs)
        if self.shared_weights:
            weights = _checks.check_values(
                weights, values != values[:1],
                "`transition_weights` of shared_weights=True must be equal for every origin state (rows).",
            )
        self.transition_weights = _checks.check_values(weights, ~xp.isfinite(values), "`transition_weights` must be finite.")
        self.transition_log_probs = _checks.check_values(
            self.transition_log_probs, ~xp.isfinite(logits),
            "`transition_matrix` of an InputDrivenHMM must have no zero entry (a logistic regression per row)."
        )
        taken = emissions.input_dim
        if taken is not None and taken != weights.shape[-1]:
            raise ValueError(
                f"the emissions read {taken} input columns and `transition_weights` {weights.shape[-1]}; "
                "both read the same `inputs`, so they must agree."
            )

    @property
    def input_dim(self) -> int:
        """``Du``, the columns of ``inputs``."""
        return self.transition_weights.shape[-1]

    def parameter_names(self) -> tuple[str, ...]:
        return super().parameter_names() + ("transition_weights",)

    # -- inputs ----------------------------------------------------------------

    def _emission_inputs(self, inputs):
        return inputs if self.emissions.input_dim is not None else None

    def _check_inputs(self, inputs, num_steps: int, mask=None):
        if inputs is None:
            raise ValueError(f"an InputDrivenHMM needs `inputs` of shape (T, {self.input_dim}); got None.")
        inputs = _checks.check_inputs(inputs, num_steps, self.input_dim, mask, self.transition_weights.dtype)
        if self.emissions.input_dim is not None:
            self.emissions.check_inputs(inputs, num_steps, mask)
        return inputs

    def _transition_log_matrices(self, inputs: Float[Array, "T Du"], length=None) -> Float[Array, "T-1 K K"]:
        nxt = _real_next(inputs, length)
        logits = self.transition_log_probs + jnp.einsum("ijd,td->tij", self.transition_weights, nxt)
        return jax.nn.log_softmax(logits, axis=-1)

    def _transitions(self, inputs: Float[Array, "T Du"], length=None) -> Float[Array, "T-1 K K"]:
        return jnp.exp(self._transition_log_matrices(inputs, length))

    @typing.no_type_check
    def transition_matrices(self, inputs: Float[ArrayLike, "T Du"]) -> Float[Array, "T-1 K K"]:
        """Each step's transition matrix, ``[t, i, j] = p(z_{t+1} = j | z_t = i, u_{t+1})``, for ``inputs`` ``(T, Du)``.

        Example:
            >>> import jax.numpy as jnp, numpy as np, ssmjax
            >>> hmm = ssmjax.InputDrivenHMM(
            ...     jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.1, 0.9]]),
            ...     ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0]])),
            ...     transition_weights=jnp.array([[0.0], [3.0]]), shared_weights=True)
            >>> matrices = hmm.transition_matrices(jnp.array([[0.0], [0.0], [1.0]]))
            >>> print(np.asarray(matrices[1], np.float64).round(2))  # u = 1 moves both rows towards state 1
            [[0.31 0.69]
             [0.01 0.99]]
        """
        inputs = self._check_inputs(inputs, jnp.shape(inputs)[0])
        return self._transitions(inputs)

    # -- EM ----------------------------------------------------------------------

    _has_fast_e_step = False

    def _check_prior(self, prior) -> None:
        if prior is not None:
            raise ValueError("an InputDrivenHMM takes no prior (prior=None).")

    def _e_step(self, emissions, length, inputs):
        trans = self._transitions(inputs, length)
        ll = self.log_likelihoods(emissions, length=length, inputs=inputs)
        post = hmm_smoother(self.initial_probs, trans, ll, length=length)
        xi = hmm_two_slice_marginals(self.initial_probs, trans, ll, length=length)  # zero past the end
        nxt = _real_next(inputs, length)
        u1 = jnp.concatenate([nxt, jnp.ones(nxt.shape[:1] + (1,), nxt.dtype)], axis=-1)
        transitions = {"pairs": xi, "inputs": u1}  # per step: the M-step's logistic regressions read them
        stats = {"initial": post.smoothed_probs[0], "transitions": transitions,
                 "emissions": self._emission_stats(emissions, length, inputs, post.smoothed_probs)}
        return stats, post.marginal_loglik

    def _prepare_batch(self, emissions, lengths, inputs):
        return emissions, lengths, inputs

    def _batched_e_step(self, batch):
        stats, lls = jax.vmap(self._e_step)(*batch)
        combined = {k: _combine_sequences(v) for k, v in stats.items() if k != "transitions"}
        return {**combined, "transitions": stats["transitions"]}, jnp.sum(lls)

    def _m_step(self, stats, frozen, prior=None):
        # the initial distribution and the emissions as an HMM's; the chain's rows below
        updated = super()._m_step(stats, set(frozen) | {"transition_matrix"}, prior)
        du = self.input_dim
        free = [i for i in range(du) if "transition_weights" not in frozen]
        free += [du] if "transition_matrix" not in frozen else []
        if not free:
            return updated
        k = self.num_states
        pairs = stats["transitions"]["pairs"].reshape(-1, k, k)
        u1 = stats["transitions"]["inputs"].reshape(-1, du + 1)
        # The Newton solves run after the emissions' M-step, not beside it: two independent LAPACK
        # calls in one program can deadlock XLA:CPU (ssmjax._lgssm.small.GeneralOps.lu_solve_both).
        pairs, u1, _ = jax.lax.optimization_barrier((pairs, u1, jax.tree.leaves(eqx.filter(updated, eqx.is_array))))
        coefs = jnp.concatenate([self.transition_weights, self.transition_log_probs[..., None]], axis=-1)
        per_row = jax.vmap(lambda c, xi, cols: _logistic_newton(c, xi, u1, cols), in_axes=(0, 1, None))
        if not self.shared_weights:
            coefs = per_row(coefs, pairs, np.asarray(free))
        else:
            if "transition_matrix" not in frozen:  # each row's biases, the shared weights held
                coefs = per_row(coefs, pairs, np.asarray([du]))
            if "transition_weights" not in frozen:  # the shared weights, each origin's biases as offsets
                rows = pairs.reshape(-1, k)  # (step, origin) pairs: counts over destinations
                offsets = jnp.tile(coefs[..., du], (pairs.shape[0], 1))
                shared = _logistic_newton(coefs[0, :, :du], rows, jnp.repeat(u1[:, :du], k, axis=0),
                                          np.arange(du), offsets)
                coefs = coefs.at[..., :du].set(jnp.broadcast_to(shared, (k, k, du)))
        # the bias is stored normalised (log-probabilities at u = 0); a shift per row changes nothing
        return eqx.tree_at(
            lambda m: (m.transition_weights, m.transition_log_probs),
            updated,
            (coefs[..., :du], jax.nn.log_softmax(coefs[..., du], axis=-1)),
        )

    @typing.no_type_check
    def num_parameters(self, frozen: Sequence[str] = ()) -> int:
        """Free parameters as :meth:`ssmjax.HMM.num_parameters` counts them, plus the transition weights
        (``K - 1`` free per row and input, one row when they are shared).

        Example:
            >>> import jax.numpy as jnp, ssmjax
            >>> hmm = ssmjax.InputDrivenHMM(
            ...     jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.1, 0.9]]),
            ...     ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0]])),
            ...     transition_weights=jnp.zeros((2, 2, 3)))
            >>> hmm.num_parameters(), hmm.num_parameters(frozen=("transition_weights",))
            (11, 5)
        """
        rows = 1 if self.shared_weights else self.num_states
        weights = 0 if "transition_weights" in frozen else rows * (self.num_states - 1) * self.input_dim
        return super().num_parameters(tuple(f for f in frozen if f != "transition_weights")) + weights

    def _unconstrained(self):
        weights = self.transition_weights[0] if self.shared_weights else self.transition_weights
        return {**super()._unconstrained(), "transition_weights": weights}

    def _from_unconstrained(self, params):
        base = super()._from_unconstrained({k: v for k, v in params.items() if k != "transition_weights"})
        return eqx.tree_at(
            lambda m: (m.initial_log_probs, m.transition_log_probs, m.emissions, m.transition_weights),
            self,
            (base.initial_log_probs, base.transition_log_probs, base.emissions,
             jnp.broadcast_to(params["transition_weights"], self.transition_weights.shape)),
        )

    # -- initialiser ---------------------------------------------------------------

    @classmethod
    @typing.no_type_check
    def from_data(
        cls,
        emissions: Shaped[ArrayLike, "B T ..."],
        num_states: int,
        emissions_type: str | type[AbstractEmissions] = "poisson",
        *,
        inputs: Float[ArrayLike, "B T Du"],
        lengths: Int[ArrayLike, " B"] | None = None,
        stay_prob: float = 0.9,
        num_classes: int | None = None,
        num_lags: int = 1,
        shared_weights: bool = False,
        key: PRNGKeyArray,
    ) -> InputDrivenHMM:
        """:meth:`ssmjax.HMM.from_data`'s starting model (the other arguments as there) with zero
        transition weights: transitions that do not yet depend on ``inputs`` ``(B, T, Du)``.

        Example:
            >>> import jax, jax.numpy as jnp, ssmjax
            >>> y = jax.random.poisson(jax.random.key(0), 3.0, (2, 50, 1))
            >>> u = jax.random.normal(jax.random.key(1), (2, 50, 3))
            >>> ssmjax.InputDrivenHMM.from_data(y, 2, "poisson", inputs=u, key=jax.random.key(2)).transition_weights.shape
            (2, 2, 3)
        """
        inputs = np.asarray(inputs)
        if inputs.ndim != 3:
            raise ValueError(f"`inputs` must be a batch (B, T, Du); got shape {inputs.shape}.")
        family = FAMILIES.get(emissions_type) if isinstance(emissions_type, str) else emissions_type
        # a regression family reads the same inputs; other families none
        base = HMM.from_data(emissions, num_states, emissions_type, lengths=lengths,
                             inputs=inputs if family in INPUT_FAMILIES else None, stay_prob=stay_prob,
                             num_classes=num_classes, num_lags=num_lags, key=key)
        return cls(initial_log_probs=base.initial_log_probs, transition_log_probs=base.transition_log_probs,
                   emissions=base.emissions, shared_weights=shared_weights,
                   transition_weights=np.zeros((num_states, num_states, inputs.shape[-1]), np.asarray(base.initial_log_probs).dtype))
