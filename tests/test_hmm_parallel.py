"""Parallel-in-time (associative-scan) HMM inference against the sequential functions and brute force.

Tolerances (float64 unless stated; ``helpers.TOLERANCES`` for comparisons with an oracle):

* parallel vs sequential ``ssmjax.hmm_*`` (filter, smoother incl. ``expected_transitions``, Viterbi
  ``log_prob``, gradients): ``rtol=1e-9, atol=1e-10`` (``helpers.tol(float64)``); observed ~1e-15.
* Viterbi paths: identical to the sequential ones (random models and exactly-computed ties); in the
  degenerate case of real-arithmetic ties rounded differently the path is checked to be optimal and
  ``log_prob`` equal to 1e-9 (see ``ssmjax._hmm.parallel``).
* float32, ``T = 10^5``, ``K = 4``: log-likelihood relative error vs float64 ``<= 1e-5`` (observed ~1e-7);
  float32 filtered/smoothed probabilities vs float64 within ``helpers.tol(float32)`` on ``T = 500``.
* posterior samples: identical to ``ssmjax.hmm_sample_posterior`` with the same key (float64), and path
  frequencies within 5 standard errors of the brute-force posterior.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_allclose, random_stochastic_matrix, tol
from test_hmm_oracle import brute_force, path_log_joints

import ssmjax

# the parallel-in-time algorithms, reached through the public functions
hmm_filter_parallel = functools.partial(ssmjax.hmm_filter, parallel=True)
hmm_smoother_parallel = functools.partial(ssmjax.hmm_smoother, parallel=True)
hmm_viterbi_parallel = functools.partial(ssmjax.hmm_viterbi, parallel=True)
hmm_sample_posterior_parallel = functools.partial(ssmjax.hmm_sample_posterior, parallel=True)

F64 = tol(np.float64)


def _model(seed, num_states=3, num_timesteps=6, time_varying=False, zeros=False, dtype=np.float64):
    rng = np.random.default_rng(seed)
    pi = random_stochastic_matrix(rng, (num_states,), zeros=zeros)
    shape = (num_timesteps - 1, num_states, num_states) if time_varying else (num_states, num_states)
    A = random_stochastic_matrix(rng, shape, zeros=zeros)
    ll = rng.normal(size=(num_timesteps, num_states)) * 2.0
    return pi.astype(dtype), A.astype(dtype), ll.astype(dtype)


def _pad_nan(ll, length):
    ll = np.array(ll)
    ll[length:] = np.nan
    ll[length:, 0] = np.inf
    return ll


def _close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **F64), a, b)


CASES = [(tv, z, n) for tv in (False, True) for z in (False, True) for n in (None, 4, 1)]


@pytest.mark.parametrize("time_varying,zeros,length", CASES)
def test_filter_and_smoother_equal_sequential(time_varying, zeros, length):
    pi, A, ll = _model(1 + time_varying + 2 * zeros, num_timesteps=7, time_varying=time_varying, zeros=zeros)
    if length is not None:
        ll = _pad_nan(ll, length)
    _close(hmm_filter_parallel(pi, A, ll, length=length), ssmjax.hmm_filter(pi, A, ll, length=length))
    post = hmm_smoother_parallel(pi, A, ll, length=length)
    _close(post, ssmjax.hmm_smoother(pi, A, ll, length=length))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(post))
    # and the brute-force oracle on the real steps
    n = ll.shape[0] if length is None else length
    oracle = brute_force(pi, A[: n - 1] if A.ndim == 3 else A, ll[:n])
    assert_allclose(post.marginal_loglik, oracle["loglik"])
    assert_allclose(post.smoothed_probs[:n], oracle["smoothed"])
    assert_allclose(post.expected_transitions, oracle["two_slice"].sum(0))
    # padded rows repeat filtered[L-1]
    for field in (post.filtered_probs, post.predicted_probs, post.smoothed_probs):
        np.testing.assert_array_equal(np.asarray(field[n:]), np.broadcast_to(post.filtered_probs[n - 1], field[n:].shape))


@pytest.mark.parametrize("time_varying,zeros", [(False, False), (True, True), (False, True)])
def test_viterbi_matches_brute_force_and_sequential(time_varying, zeros):
    for seed in range(4):
        pi, A, ll = _model(10 + seed, num_timesteps=6, time_varying=time_varying, zeros=zeros)
        path, log_prob = hmm_viterbi_parallel(pi, A, ll)
        seq_path, seq_log_prob = ssmjax.hmm_viterbi(pi, A, ll)
        oracle = brute_force(pi, A, ll)
        np.testing.assert_array_equal(path, oracle["viterbi_path"])
        np.testing.assert_array_equal(path, seq_path)
        np.testing.assert_allclose(log_prob, oracle["viterbi_log_prob"], **F64)
        np.testing.assert_allclose(log_prob, seq_log_prob, **F64)
        for length in (1, 3):
            padded = _pad_nan(ll, length)
            p_path, p_lp = hmm_viterbi_parallel(pi, A, padded, length=length)
            s_path, s_lp = ssmjax.hmm_viterbi(pi, A, padded, length=length)
            np.testing.assert_array_equal(p_path, s_path)
            np.testing.assert_allclose(p_lp, s_lp, **F64)


def test_viterbi_exact_ties_break_like_sequential():
    """Integer log-likelihoods and 0/1 transitions: every score is exact, ties abound (merging paths)."""
    rng = np.random.default_rng(0)
    num_ties = 0
    K, T = 3, 6  # one shape: one compilation
    for _ in range(30):
        # rows one-hot: several states share a successor (merging paths), log A in {0, -inf}
        A = np.zeros((T - 1, K, K))
        A[np.arange(T - 1)[:, None], np.arange(K)[None, :], rng.integers(0, K, size=(T - 1, K))] = 1.0
        ll = rng.integers(-2, 1, size=(T, K)).astype(np.float64)
        for pi in (np.eye(K)[rng.integers(K)], np.array([0.5, 0.0, 0.5]), np.full(K, 1.0 / K)):
            path, log_prob = hmm_viterbi_parallel(pi, A, ll)
            seq_path, seq_log_prob = ssmjax.hmm_viterbi(pi, A, ll)
            np.testing.assert_array_equal(path, seq_path)
            # the sequential scores are kept relative to their maximum (summed apart): equal to round-off
            np.testing.assert_allclose(float(log_prob), float(seq_log_prob), rtol=1e-15, atol=1e-15)
            _, logj = path_log_joints(pi, A, ll)
            num_ties += int(np.sum(logj == logj.max()) > 1)
    assert num_ties > 10  # the test does exercise ties


def test_viterbi_symmetric_ties_lowest_index():
    """All paths tie (uniform A, equal likelihoods): lowest index everywhere, as the sequential one."""
    for K, T in ((2, 5), (4, 7)):
        pi = np.full(K, 1.0 / K)
        A = np.full((K, K), 1.0 / K)
        ll = np.zeros((T, K))
        path, log_prob = hmm_viterbi_parallel(pi, A, ll)
        seq_path, seq_log_prob = ssmjax.hmm_viterbi(pi, A, ll)
        np.testing.assert_array_equal(path, np.zeros(T))
        np.testing.assert_array_equal(path, seq_path)
        np.testing.assert_allclose(log_prob, seq_log_prob, **F64)


def test_viterbi_degenerate_ties_give_an_optimal_path():
    """Real-arithmetic ties with inexact logs (documented degenerate case): optimal path, equal log_prob."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        K, T = 3, 5
        A = rng.choice([0.2, 0.3, 0.5], size=(K, K))
        A = A / A.sum(1, keepdims=True)
        pi = np.full(K, 1.0 / K)
        ll = np.log(rng.choice([0.25, 0.5], size=(T, K)))
        path, log_prob = hmm_viterbi_parallel(pi, A, ll)
        _, seq_log_prob = ssmjax.hmm_viterbi(pi, A, ll)
        paths, logj = path_log_joints(pi, A, ll)
        own = logj[np.all(paths == np.asarray(path)[None], axis=1)][0]
        np.testing.assert_allclose(own, logj.max(), **F64)
        np.testing.assert_allclose(log_prob, seq_log_prob, **F64)


def _log_space_forward_backward(pi, A, ll):
    """float64 forward-backward in log space (log-sum-exp at every step): an underflow-free oracle."""
    from scipy.special import logsumexp

    log_pi, log_a = np.log(np.asarray(pi, float)), np.log(np.asarray(A, float))
    T = ll.shape[0]
    alpha = [log_pi + ll[0]]
    for t in range(1, T):
        alpha.append(logsumexp(alpha[-1][:, None] + log_a, axis=0) + ll[t])
    beta = [np.zeros_like(alpha[0])]
    for t in range(T - 1, 0, -1):
        beta.insert(0, logsumexp(log_a + (ll[t] + beta[0])[None, :], axis=1))
    loglik = logsumexp(alpha[-1])
    return loglik, np.exp(np.array(alpha) + np.array(beta) - loglik)


def test_underflowing_scan_is_redone_by_the_sequential_rescue():
    """A step where the only reachable state is 800 nats worse than an unreachable one underflows
    the scan's weights; that sequence is redone sequentially (values, gradients and samples equal
    the sequential functions', which the log-space oracle confirms), also inside a ``jax.vmap``
    batch beside a sequence that needs no rescue. A truly impossible sequence keeps ``-inf``."""
    with np.errstate(divide="ignore"):
        pi = np.array([1.0, 0.0, 0.0])
        A = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
        ll = np.random.default_rng(0).normal(size=(12, 3))
        ll[5] = [-800.0, -805.0, 0.0]
        oracle_loglik, oracle_smoothed = _log_space_forward_backward(pi, A, ll)
    assert ssmjax.hmm_strategy(pi, A, ll, parallel=True).rescue == "run-time"
    plain = np.random.default_rng(1).normal(size=(12, 3))
    out, seq = hmm_smoother_parallel(pi, A, ll), ssmjax.hmm_smoother(pi, A, ll)
    assert_allclose(out.marginal_loglik, oracle_loglik)
    for name in ("marginal_loglik", "filtered_probs", "predicted_probs", "smoothed_probs", "expected_transitions"):
        assert_allclose(getattr(out, name), getattr(seq, name), err_msg=name)
    # the filter's derivatives (d loglik / d ll = smoothed probabilities), alone and batched
    batch = jnp.asarray(np.stack([ll, plain]))
    grads = jax.vmap(jax.grad(lambda l: hmm_filter_parallel(pi, A, l).marginal_loglik))(batch)
    assert_allclose(jax.grad(lambda l: hmm_filter_parallel(pi, A, l).marginal_loglik)(ll), oracle_smoothed)
    both = jax.vmap(lambda l: hmm_smoother_parallel(pi, A, l))(batch)
    for i, one in enumerate((ll, plain)):
        seq = ssmjax.hmm_smoother(pi, A, one)
        assert_allclose(grads[i], seq.smoothed_probs)
        assert_allclose(both.marginal_loglik[i], seq.marginal_loglik)
        assert_allclose(both.smoothed_probs[i], seq.smoothed_probs)
    assert_allclose(hmm_smoother_parallel(pi, A, ll).smoothed_probs, oracle_smoothed)
    key = jax.random.key(3)
    np.testing.assert_array_equal(hmm_sample_posterior_parallel(pi, A, ll, key=key),
                                  ssmjax.hmm_sample_posterior(pi, A, ll, key=key))
    impossible = ll.copy()
    impossible[5] = [-np.inf, -np.inf, 0.0]  # only the unreachable state can emit step 5
    assert np.isneginf(float(hmm_filter_parallel(pi, A, impossible).marginal_loglik))
    assert np.isneginf(float(ssmjax.hmm_filter(pi, A, impossible).marginal_loglik))


def test_float32_long_sequence():
    rng = np.random.default_rng(0)
    K, T = 4, 100_000
    pi = rng.dirichlet(np.ones(K))
    A = 0.9 * np.eye(K) + 0.1 * rng.dirichlet(np.ones(K), K)
    ll = rng.normal(size=(T, K)) * 3.0 - 2.0
    exact = float(ssmjax.hmm_filter(pi, A, ll).marginal_loglik)
    approx = hmm_filter_parallel(pi.astype(np.float32), A.astype(np.float32), ll.astype(np.float32))
    assert approx.marginal_loglik.dtype == jnp.float32
    assert abs(float(approx.marginal_loglik) - exact) <= 1e-5 * abs(exact)
    # shorter run: per-step float32 posteriors vs float64
    n = 500
    post32 = hmm_smoother_parallel(*(x.astype(np.float32) for x in (pi, A, ll[:n])))
    post64 = ssmjax.hmm_smoother(pi, A, ll[:n])
    assert_allclose(post32.filtered_probs, post64.filtered_probs, dtype=np.float32)
    assert_allclose(post32.smoothed_probs, post64.smoothed_probs, dtype=np.float32)
    path32, _ = hmm_viterbi_parallel(*(x.astype(np.float32) for x in (pi, A, ll[:n])))
    path64, _ = ssmjax.hmm_viterbi(pi, A, ll[:n])
    assert np.mean(np.asarray(path32) == np.asarray(path64)) > 0.99


@pytest.mark.parametrize("time_varying,zeros,length", [(False, True, 5), (True, True, 4)])
def test_gradients_equal_sequential(time_varying, zeros, length):
    pi, A, ll = _model(7, num_timesteps=7, time_varying=time_varying, zeros=zeros)
    if length is not None:
        ll = _pad_nan(ll, length)

    def loss(fn, smoother):
        def f(p, a, l):
            out = fn(p, a, l, length=length)
            value = out.marginal_loglik
            if smoother:
                value = value + jnp.sum(out.smoothed_probs**2) + jnp.sum(out.expected_transitions * a)
            return value + jnp.sum(jnp.sin(out.filtered_probs))

        return jax.grad(f, argnums=(0, 1, 2))

    # filter with the plain log-likelihood (the sequential custom VJP), smoother with every output
    for smoother in (False, True):
        fns = (hmm_smoother_parallel, ssmjax.hmm_smoother) if smoother else (
            hmm_filter_parallel,
            ssmjax.hmm_filter,
        )
        if not smoother and time_varying:
            continue
        g_par = loss(fns[0], smoother)(pi, A, ll)
        g_seq = loss(fns[1], smoother)(pi, A, ll)
        for g in g_par:
            assert bool(jnp.all(jnp.isfinite(g)))
        _close(g_par, g_seq)
        if length is not None:
            assert not np.any(np.asarray(g_par[2])[length:])


def test_jit_and_vmap_ragged_batch():
    pi, A, _ = _model(3, num_timesteps=8)
    rng = np.random.default_rng(5)
    ll = rng.normal(size=(3, 8, 3))
    lengths = np.array([8, 5, 2])
    ll = np.stack([_pad_nan(ll[b], n) for b, n in enumerate(lengths)])

    def run(fns, l, n):
        filt = fns[0](pi, A, l, length=n)
        post = fns[1](pi, A, l, length=n)
        path, lp = fns[2](pi, A, l, length=n)
        return filt, post, path, lp

    par = (hmm_filter_parallel, hmm_smoother_parallel, hmm_viterbi_parallel)
    seq = (ssmjax.hmm_filter, ssmjax.hmm_smoother, ssmjax.hmm_viterbi)
    got = jax.jit(jax.vmap(lambda l, n: run(par, l, n)))(ll, lengths)
    want = jax.vmap(lambda l, n: run(seq, l, n))(ll, lengths)
    _close(got, want)
    for b, n in enumerate(lengths):  # each row equals its unpadded run
        single = hmm_smoother_parallel(pi, A, ll[b, :n])
        _close(single.smoothed_probs, got[1].smoothed_probs[b, :n])
        _close(single.marginal_loglik, got[1].marginal_loglik[b])


@pytest.mark.parametrize("time_varying,length", [(True, 4)])
def test_posterior_samples(time_varying, length):
    pi, A, ll = _model(11, num_states=2, num_timesteps=5, time_varying=time_varying, zeros=True)
    if length is not None:
        ll = _pad_nan(ll, length)
    keys = jax.random.split(jax.random.key(0), 3000)
    draw_par = jax.vmap(lambda k: hmm_sample_posterior_parallel(pi, A, ll, length=length, key=k))(keys)
    draw_seq = jax.vmap(lambda k: ssmjax.hmm_sample_posterior(pi, A, ll, length=length, key=k))(keys)
    np.testing.assert_array_equal(draw_par, draw_seq)
    n = ll.shape[0] if length is None else length
    draws = np.asarray(draw_par)
    assert np.all(draws[:, n:] == draws[:, n - 1 : n])
    oracle = brute_force(pi, A[: n - 1] if A.ndim == 3 else A, ll[:n])
    index = {tuple(p): i for i, p in enumerate(oracle["paths"])}
    counts = np.bincount([index[tuple(d)] for d in draws[:, :n]], minlength=len(index)) / len(draws)
    se = np.sqrt(oracle["path_probs"] * (1 - oracle["path_probs"]) / len(draws))
    assert np.all(np.abs(counts - oracle["path_probs"]) <= 5 * se + 1e-12)


def test_errors_identical_to_sequential():
    pi, A, ll = _model(0)
    bad_cases = [
        (pi[:2], A, ll),
        (pi, A[:, :2], ll),
        (pi, A, ll[:, 0]),
        (pi * 2, A, ll),
        (pi, A, np.where(np.arange(6)[:, None] == 2, np.nan, ll)),
    ]
    for args in bad_cases:
        for par, seq in (
            (hmm_filter_parallel, ssmjax.hmm_filter),
            (hmm_smoother_parallel, ssmjax.hmm_smoother),
            (hmm_viterbi_parallel, ssmjax.hmm_viterbi),
        ):
            with pytest.raises(ValueError) as want:
                seq(*args)
            with pytest.raises(ValueError, match=None) as got:
                par(*args)
            assert str(got.value) == str(want.value)


def test_single_step():
    pi, A, ll = _model(2, num_timesteps=1)
    _close(hmm_smoother_parallel(pi, A, ll), ssmjax.hmm_smoother(pi, A, ll))
    _close(hmm_viterbi_parallel(pi, A, ll), ssmjax.hmm_viterbi(pi, A, ll))
    key = jax.random.key(0)
    _close(hmm_sample_posterior_parallel(pi, A, ll, key=key), ssmjax.hmm_sample_posterior(pi, A, ll, key=key))
