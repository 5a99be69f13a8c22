"""Argument checks shared by the HMM inference functions (sequential and parallel)."""

from __future__ import annotations

import jax.numpy as jnp

from .. import _checks


def validate(initial_probs, transition_matrix, log_likelihoods, length):
    """Shape checks (ValueError) and value checks; returns canonical guarded arrays."""
    ll = _checks.as_float_array("log_likelihoods", log_likelihoods)
    pi = _checks.as_float_array("initial_probs", initial_probs)
    trans = _checks.as_float_array("transition_matrix", transition_matrix)
    _checks.check_shape("log_likelihoods", ll, ("T", "K"), "log p(y_t | z_t = k); use jax.vmap for a batch")
    num_timesteps, num_states = ll.shape
    if num_timesteps < 1:
        raise ValueError(f"`log_likelihoods` must have at least one time step; got shape {tuple(ll.shape)}.")
    if num_states < 1:
        raise ValueError(f"`log_likelihoods` must have at least one state; got shape {tuple(ll.shape)}.")
    _checks.check_shape("initial_probs", pi, (num_states,), f"K = {num_states} from log_likelihoods")
    _checks.check_shape_options(
        "transition_matrix",
        trans,
        [(num_states, num_states), (num_timesteps - 1, num_states, num_states)],
        f"stationary (K, K), or time-varying (T-1, K, K) with T = {num_timesteps}, K = {num_states}",
    )
    dtype = jnp.result_type(ll.dtype, pi.dtype, trans.dtype)
    # probabilities promoted from float32 keep float32's rounding: checked at their own tolerance
    pi_atol, trans_atol = _checks.probability_atol(pi.dtype), _checks.probability_atol(trans.dtype)
    ll, pi, trans = ll.astype(dtype), pi.astype(dtype), trans.astype(dtype)
    length_arr = _checks.check_length(length, num_timesteps)
    if length_arr is None:
        length_arr = jnp.asarray(num_timesteps, jnp.int32)
    valid = jnp.arange(num_timesteps) < length_arr
    pi = _checks.check_probability_vector("initial_probs", pi, atol=pi_atol)
    if trans.ndim == 3:
        # Only transitions between real steps are used (and checked).
        trans = jnp.where(valid[1:, None, None], trans, jnp.asarray(1.0 / num_states, dtype))
    trans = _checks.check_probability_vector("transition_matrix", trans, atol=trans_atol)
    # The checks on ``log_likelihoods`` guard the small ``initial_probs`` (used by every
    # algorithm): guarding ``ll`` itself made XLA keep a (T, K) copy of it.
    pi = _checks.check_values(
        pi, jnp.isnan(ll) & valid[:, None], "`log_likelihoods` contains NaN at unpadded steps.", at="log_likelihoods"
    )
    pi = _checks.check_values(
        pi,
        (ll == jnp.inf) & valid[:, None],
        "`log_likelihoods` contains +inf at unpadded steps.",
        at="log_likelihoods",
    )
    return pi, trans, ll, length_arr



ARGS_DOC = r"""
        initial_probs: :math:`\pi_k = p(z_0 = k)`, shape (K,).
        transition_matrix: :math:`A_{ij} = p(z_{t+1} = j \mid z_t = i)`, shape (K, K), or
            time-varying (T-1, K, K) where entry ``t`` moves :math:`z_t` to :math:`z_{t+1}`.
        log_likelihoods: :math:`\ell_t(k) = \log p(y_t \mid z_t = k)`, shape (T, K).
        length: number of real steps ``L`` (int, may be traced); steps ``t >= L`` are
            padding and may hold anything (NaN and inf included). ``None`` means ``T``.
            See :mod:`ssmjax._types`."""


