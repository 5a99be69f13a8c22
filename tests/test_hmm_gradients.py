"""Gradients of HMM inference: custom VJP vs finite differences of the brute-force oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FD_TOLERANCE, assert_allclose, central_difference_grad, random_stochastic_matrix
from test_hmm_oracle import brute_force, brute_force_loglik_linear, brute_force_posteriors_linear

import ssmjax

CASES = [(False, False), (False, True), (True, False), (True, True)]


def make_model(seed, num_states=3, num_timesteps=5, time_varying=False, zeros=False):
    rng = np.random.default_rng(seed)
    pi = random_stochastic_matrix(rng, (num_states,), zeros=zeros)
    shape = (num_timesteps - 1, num_states, num_states) if time_varying else (num_states, num_states)
    A = random_stochastic_matrix(rng, shape, zeros=zeros)
    ll = rng.normal(size=(num_timesteps, num_states))
    return pi, A, ll


def fd_grads(pi, A, ll):
    return (
        central_difference_grad(lambda x: brute_force_loglik_linear(x, A, ll), pi),
        central_difference_grad(lambda x: brute_force_loglik_linear(pi, x, ll), A),
        central_difference_grad(lambda x: brute_force_loglik_linear(pi, A, x), ll),
    )


def loglik(pi, A, ll):
    # no value checks: finite differences / gradients leave the probability simplex
    return ssmjax.hmm_filter(pi, A, ll).marginal_loglik


@pytest.mark.parametrize("time_varying,zeros", CASES)
def test_loglik_gradient_matches_finite_differences(time_varying, zeros):
    pi, A, ll = make_model(1, time_varying=time_varying, zeros=zeros)
    expected = fd_grads(pi, A, ll)
    got = jax.grad(loglik, argnums=(0, 1, 2))(pi, A, ll)
    got_jit = jax.jit(jax.grad(loglik, argnums=(0, 1, 2)))(pi, A, ll)
    for g, gj, e in zip(got, got_jit, expected):
        assert np.all(np.isfinite(np.asarray(g)))
        assert_allclose(g, e, **FD_TOLERANCE)
        assert_allclose(gj, e, **FD_TOLERANCE)
    # d log p / d ll = smoothed posterior
    assert_allclose(got[2], brute_force(pi, A, ll)["smoothed"])


@pytest.mark.parametrize("time_varying", [False, True])
def test_gradient_under_vmap_with_ragged_padding(time_varying):
    """vmap over a padded batch (NaN/inf padding) == each sequence alone; no NaN."""
    T, lengths = 5, [5, 3, 1]
    models = [make_model(10 + i, num_timesteps=n, time_varying=time_varying, zeros=True) for i, n in enumerate(lengths)]
    pi = models[0][0]
    fills = [np.nan, np.inf, -np.inf]

    def pad(x, size, fill):
        out = np.full((size,) + x.shape[1:], fill)
        out[: x.shape[0]] = x
        return out

    L = np.stack([pad(m[2], T, f) for m, f in zip(models, fills)])
    n_arr = jnp.array(lengths)
    if time_varying:
        A = np.stack([pad(m[1], T - 1, np.nan) for m in models])
        grads = jax.jit(jax.vmap(jax.grad(lambda p, a, l, n: ssmjax.hmm_filter(p, a, l, length=n).marginal_loglik, argnums=(0, 1, 2)), in_axes=(None, 0, 0, 0)))(pi, A, L, n_arr)
    else:
        A = models[0][1]
        grads = jax.jit(jax.vmap(jax.grad(lambda p, a, l, n: ssmjax.hmm_filter(p, a, l, length=n).marginal_loglik, argnums=(0, 1, 2)), in_axes=(None, None, 0, 0)))(pi, A, L, n_arr)
    for leaf in grads:
        assert np.all(np.isfinite(np.asarray(leaf)))
    for b, (n, (_, A_b, ll_b)) in enumerate(zip(lengths, models)):
        A_b = A_b if time_varying else A
        g_pi, g_A, g_ll = jax.grad(loglik, argnums=(0, 1, 2))(pi, A_b, ll_b)
        assert_allclose(grads[0][b], g_pi)
        assert_allclose(grads[2][b, :n], g_ll)
        assert np.all(np.asarray(grads[2][b, n:]) == 0)
        if time_varying:
            assert_allclose(grads[1][b, : n - 1], g_A)
            assert np.all(np.asarray(grads[1][b, n - 1 :]) == 0)
        else:
            assert_allclose(grads[1][b], g_A)


def test_filter_outputs_fall_back_to_exact_autodiff():
    """Cotangents on filtered/predicted probabilities use the plain scan's VJP."""
    pi, A, ll = make_model(2, zeros=True)
    weights = np.random.default_rng(3).normal(size=(2, 5, 3))

    def f(p, a, l):
        out = ssmjax.hmm_filter(p, a, l)
        return out.marginal_loglik + jnp.sum(weights[0] * out.filtered_probs) + jnp.sum(weights[1] * out.predicted_probs)

    def f_np(p, a, l):
        # independent: filtered/predicted from the forward recursion in numpy
        T, K = l.shape
        pred = p
        total = 0.0
        value = 0.0
        for t in range(T):
            if t > 0:
                pred = filt @ a
            w = pred * np.exp(l[t])
            total += np.log(w.sum())
            filt = w / w.sum()
            value += np.sum(weights[0][t] * filt) + np.sum(weights[1][t] * pred)
        return total + value

    got = jax.grad(f, argnums=(0, 1, 2))(pi, A, ll)
    expected = (
        central_difference_grad(lambda x: f_np(x, A, ll), pi),
        central_difference_grad(lambda x: f_np(pi, x, ll), A),
        central_difference_grad(lambda x: f_np(pi, A, x), ll),
    )
    for g, e in zip(got, expected):
        assert_allclose(g, e, **FD_TOLERANCE)


@pytest.mark.parametrize("time_varying", [False, True])
def test_smoother_outputs_are_differentiable(time_varying):
    pi, A, ll = make_model(4, time_varying=time_varying, zeros=True)
    weights = np.random.default_rng(5).normal(size=(5, 3))
    weights2 = np.random.default_rng(6).normal(size=(3, 3))

    def f(p, a, l):
        post = ssmjax.hmm_smoother(p, a, l)
        return jnp.sum(weights * post.smoothed_probs) + jnp.sum(weights2 * post.expected_transitions)

    def f_oracle(p, a, l):
        smoothed, pair_sum = brute_force_posteriors_linear(p, a, l)
        return np.sum(weights * smoothed) + np.sum(weights2 * pair_sum)

    got = jax.grad(f, argnums=(0, 1, 2))(pi, A, ll)
    expected = (
        central_difference_grad(lambda x: f_oracle(x, A, ll), pi),
        central_difference_grad(lambda x: f_oracle(pi, x, ll), A),
        central_difference_grad(lambda x: f_oracle(pi, A, x), ll),
    )
    for g, e in zip(got, expected):
        assert np.all(np.isfinite(np.asarray(g)))
        assert_allclose(g, e, **FD_TOLERANCE)


def test_value_and_grad_float32_is_finite_for_long_sequences():
    pi, A, _ = make_model(7, num_states=4, zeros=True)
    ll = (np.random.default_rng(8).normal(size=(20_000, 4)) - 1e4).astype(np.float32)
    value, grads = jax.jit(jax.value_and_grad(loglik, argnums=(0, 1, 2)))(
        pi.astype(np.float32), A.astype(np.float32), ll
    )
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert_allclose(np.asarray(grads[2]).sum(1), np.ones(20_000), dtype=np.float32)


def test_value_and_grad_peak_memory_is_at_most_four_loglik_arrays():
    # Peak = argument + output + temporaries - aliased bytes of the compiled
    # value_and_grad (as in benchmarks/hmm_inference.py), relative to the (T, K)
    # float32 log-likelihood array; deterministic (compile-time analysis only).
    num_timesteps, num_states = 100_000, 16
    spec = (
        jax.ShapeDtypeStruct((num_states,), jnp.float32),
        jax.ShapeDtypeStruct((num_states, num_states), jnp.float32),
        jax.ShapeDtypeStruct((num_timesteps, num_states), jnp.float32),
    )
    # The bound is XLA:CPU's buffer assignment (on an H200, jax 0.11.2, the same program measured 27.7 MB,
    # 4.3 arrays), so the program is compiled for the CPU whatever the default device is.
    spec = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])) for s in spec)
    compiled = jax.jit(jax.value_and_grad(loglik, argnums=(0, 1, 2))).lower(*spec).compile()
    mem = compiled.memory_analysis()
    if mem is None:  # pragma: no cover - backend without memory analysis
        pytest.skip("no memory analysis on this backend")
    peak = (
        int(mem.temp_size_in_bytes)
        + int(mem.argument_size_in_bytes)
        + int(mem.output_size_in_bytes)
        - int(getattr(mem, "alias_size_in_bytes", 0))
    )
    assert peak <= 4 * num_timesteps * num_states * 4
