"""Decoding, sampling and prediction for one sequence: Viterbi, forward-filter backward-sample,
fixed-lag smoothing and state prediction (the forward pass is :func:`ssmjax._hmm.rules.forward_values`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .recursion import _emission_weights, _safe_log
from .rules import forward_values


def _masks(num_timesteps: int, length: Int[Array, ""]):
    """``valid[t] = t < length`` (real step; for t >= 1 also: pair t-1 -> t is real)."""
    return jnp.arange(num_timesteps) < length


def _transition_xs(transition_matrix):
    """Per-pair transition matrices as scan inputs over ``T-1`` steps (None when stationary)."""
    return transition_matrix if transition_matrix.ndim == 3 else None


def _pick(transition_matrix, a_t):
    return transition_matrix if a_t is None else a_t


@jax.jit
def viterbi_program(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
):
    num_timesteps, num_states = log_likelihoods.shape
    valid = _masks(num_timesteps, length)
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    log_trans = _safe_log(transition_matrix)
    a_xs = _transition_xs(log_trans)
    states = jnp.arange(num_states)

    # The scores are carried relative to their maximum, which is kept apart and summed at the end:
    # raw scores grow like t |ll| and, in float32, soon lose the O(1) differences the decisions need.
    def _shifted(score):
        top = jnp.max(score)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        return score - top, top

    def _forward_step(score_prev, x):
        ll, is_valid, log_a_t = x
        log_a = _pick(log_trans, log_a_t)
        cand = score_prev[:, None] + log_a  # (from i, to j)
        best_from = jnp.argmax(cand, axis=0)  # first maximum = lowest index
        score = jnp.max(cand, axis=0) + ll
        score, top = _shifted(jnp.where(is_valid, score, score_prev))
        best_from = jnp.where(is_valid, best_from, states)
        return score, (best_from.astype(jnp.int32), top)

    score0, top0 = _shifted(_safe_log(initial_probs) + masked_ll[0])
    score_last, (pointers, tops) = lax.scan(_forward_step, score0, (masked_ll[1:], valid[1:], a_xs))
    last_state = jnp.argmax(score_last).astype(jnp.int32)

    def _backtrack_step(state_next, pointer):
        state = pointer[state_next]
        return state, state

    _, path = lax.scan(_backtrack_step, last_state, pointers, reverse=True)
    path = jnp.concatenate([path, last_state[None]])
    return path, jnp.max(score_last) + top0 + jnp.sum(tops)


@jax.jit
def sample_posterior_program(
    key: PRNGKeyArray,
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
) -> Int[Array, " T"]:
    num_timesteps = log_likelihoods.shape[0]
    valid = _masks(num_timesteps, length)
    _, filtered, _, _ = forward_values(initial_probs, transition_matrix, log_likelihoods, length)
    keys = jax.random.split(key, num_timesteps)
    last = jax.random.categorical(keys[-1], _safe_log(filtered[-1])).astype(jnp.int32)
    a_xs = _transition_xs(transition_matrix)

    def _step(state_next, x):
        f_t, key_t, valid_next, a_t = x
        trans = _pick(transition_matrix, a_t)
        drawn = jax.random.categorical(key_t, _safe_log(f_t * trans[:, state_next])).astype(jnp.int32)
        state = jnp.where(valid_next, drawn, state_next)
        return state, state

    _, states = lax.scan(_step, last, (filtered[:-1], keys[:-1], valid[1:], a_xs), reverse=True)
    return jnp.concatenate([states, last[None]])


@functools.partial(jax.jit, static_argnames=("lag",))
def fixed_lag_program(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
    lag: int,
) -> Float[Array, "T K"]:
    num_timesteps, num_states = log_likelihoods.shape
    valid = _masks(num_timesteps, length)
    masked_ll = jnp.where(valid[:, None], log_likelihoods, 0.0)
    _, filtered, _, fwd = forward_values(initial_probs, transition_matrix, log_likelihoods, length)
    peaks, log_cs = fwd.peaks, fwd.log_cs
    weights = jnp.where(valid[:, None], _emission_weights(masked_ll, peaks[:, None], log_cs[:, None]), 1.0)
    steps = jnp.arange(num_timesteps)
    start = jnp.maximum(steps - lag, 0)  # window start s0(t)

    def _step(betas, k):
        # backward step through s = t - k (from z_{s-1} to z_s) for every t at once
        s = steps - k
        active = s > start
        s_idx = jnp.clip(s, 1, num_timesteps - 1)
        v = weights[s_idx] * betas
        if transition_matrix.ndim == 3:
            moved = jnp.einsum("tij,tj->ti", transition_matrix[s_idx - 1], v)
        else:
            moved = v @ transition_matrix.T
        moved = jnp.where(valid[s_idx][:, None], moved, v)
        scale = jnp.max(moved, axis=1, keepdims=True)
        moved = moved / jnp.where(scale > 0, scale, 1.0)
        return jnp.where(active[:, None], moved, betas), None

    betas0 = jnp.ones((num_timesteps, num_states), masked_ll.dtype)
    betas, _ = lax.scan(_step, betas0, jnp.arange(min(lag, num_timesteps - 1)))
    joint = filtered[start] * betas
    total = jnp.sum(joint, axis=1, keepdims=True)
    return joint / jnp.where(total > 0, total, 1.0)


@jax.jit
def predict_program(
    initial_probs: Float[Array, " K"],
    transition_matrix: Float[Array, "*S K K"],
    log_likelihoods: Float[Array, "T K"],
    length: Int[Array, ""],
    future_transitions: Float[Array, "H K K"],
) -> Float[Array, "H K"]:
    _, filtered, _, _ = forward_values(initial_probs, transition_matrix, log_likelihoods, length)

    def _step(probs, trans):
        probs = probs @ trans
        return probs, probs

    _, out = lax.scan(_step, filtered[-1], future_transitions)
    return out


