"""Discrete-HMM inference against the brute-force oracle, hmmlearn, and itself.

float64 for exactness (conftest enables x64); float32 for stability.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FD_TOLERANCE, assert_allclose, central_difference_grad, random_stochastic_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hmm_oracle import brute_force, brute_force_prefix, filtered_and_predicted

import ssmjax
from ssmjax._hmm import decoding as hmm_decoding
from ssmjax._hmm import rules as hmm_rules

CASES = [  # (time_varying, structural zeros)
    (False, False),
    (False, True),
    (True, False),
    (True, True),
]


def make_model(seed, num_states=3, num_timesteps=5, time_varying=False, zeros=False, scale=1.0):
    rng = np.random.default_rng(seed)
    pi = random_stochastic_matrix(rng, (num_states,), zeros=zeros)
    shape = (num_timesteps - 1, num_states, num_states) if time_varying else (num_states, num_states)
    A = random_stochastic_matrix(rng, shape, zeros=zeros)
    ll = scale * rng.normal(size=(num_timesteps, num_states))
    return pi, A, ll


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("time_varying,zeros", CASES)
def test_filter_smoother_two_slice_match_brute_force(time_varying, zeros):
    pi, A, ll = make_model(1, time_varying=time_varying, zeros=zeros)
    oracle = brute_force(pi, A, ll)
    filtered, predicted = filtered_and_predicted(pi, A, ll)

    filt = ssmjax.hmm_filter(pi, A, ll)
    assert_allclose(filt.marginal_loglik, oracle["loglik"])
    assert_allclose(filt.filtered_probs, filtered)
    assert_allclose(filt.predicted_probs, predicted)

    post = ssmjax.hmm_smoother(pi, A, ll)
    assert isinstance(post, ssmjax.HMMPosterior)
    assert_allclose(post.marginal_loglik, oracle["loglik"])
    assert_allclose(post.filtered_probs, filtered)
    assert_allclose(post.predicted_probs, predicted)
    assert_allclose(post.smoothed_probs, oracle["smoothed"])
    assert_allclose(post.expected_transitions, oracle["two_slice"].sum(0))

    xi = ssmjax.hmm_two_slice_marginals(pi, A, ll)
    assert xi.shape == (4, 3, 3)
    assert_allclose(xi, oracle["two_slice"])
    if zeros:
        # structural zeros stay exactly zero
        A_t = A if A.ndim == 3 else np.broadcast_to(A, xi.shape)
        assert np.all(np.asarray(xi)[A_t == 0] == 0)


@pytest.mark.parametrize("time_varying,zeros", CASES)
def test_viterbi_matches_brute_force(time_varying, zeros):
    pi, A, ll = make_model(2, time_varying=time_varying, zeros=zeros)
    oracle = brute_force(pi, A, ll)
    path, log_prob = ssmjax.hmm_viterbi(pi, A, ll)
    assert path.dtype == jnp.int32 and path.shape == (5,)
    np.testing.assert_array_equal(path, oracle["viterbi_path"])
    assert_allclose(log_prob, oracle["viterbi_log_prob"])


def test_viterbi_ties_go_to_lowest_index():
    K, T = 3, 4
    pi = np.full(K, 1 / K)
    A = np.full((K, K), 1 / K)
    ll = np.zeros((T, K))
    path, log_prob = ssmjax.hmm_viterbi(pi, A, ll)
    np.testing.assert_array_equal(path, np.zeros(T, np.int32))
    assert_allclose(log_prob, T * math.log(1 / K))


@pytest.mark.parametrize("time_varying,zeros", CASES)
@pytest.mark.parametrize("lag", [0, 1, 2, 7])
def test_fixed_lag_smoother_matches_brute_force(time_varying, zeros, lag):
    pi, A, ll = make_model(3, time_varying=time_varying, zeros=zeros)
    T = ll.shape[0]
    expected = np.stack(
        [brute_force_prefix(pi, A, ll, t)["smoothed"][max(t - lag, 0)] for t in range(T)]
    )
    assert_allclose(ssmjax.hmm_fixed_lag_smoother(pi, A, ll, lag), expected)


@pytest.mark.parametrize("time_varying,zeros", CASES)
def test_predict_matches_brute_force(time_varying, zeros):
    pi, A, ll = make_model(4, time_varying=time_varying, zeros=zeros)
    H = 3
    rng = np.random.default_rng(5)
    future = random_stochastic_matrix(rng, (H, 3, 3), zeros=zeros)
    # oracle: extend the chain with H unobserved steps (log-likelihood 0)
    A_all = np.concatenate([A, future]) if time_varying else None
    if time_varying:
        got = ssmjax.hmm_predict(pi, A, ll, H, future_transition_matrix=future)
        oracle = brute_force(pi, A_all, np.concatenate([ll, np.zeros((H, 3))]))["smoothed"][5:]
    else:
        got = ssmjax.hmm_predict(pi, A, ll, H)
        oracle = brute_force(pi, A, np.concatenate([ll, np.zeros((H, 3))]))["smoothed"][5:]
    assert got.shape == (H, 3)
    assert_allclose(got, oracle)


def test_predict_respects_length_and_future_default():
    pi, A, ll = make_model(6)
    got = ssmjax.hmm_predict(pi, A, np.concatenate([ll[:3], np.full((2, 3), np.nan)]), 2, length=3)
    oracle = brute_force(pi, A, np.concatenate([ll[:3], np.zeros((2, 3))]))["smoothed"][3:]
    assert_allclose(got, oracle)
    # a (K, K) future matrix for a time-varying model is broadcast over the horizon
    _, A_tv, _ = make_model(6, time_varying=True)
    got_tv = ssmjax.hmm_predict(pi, A_tv, ll, 2, future_transition_matrix=A)
    oracle_tv = brute_force(pi, np.concatenate([A_tv, [A, A]]), np.concatenate([ll, np.zeros((2, 3))]))
    assert_allclose(got_tv, oracle_tv["smoothed"][5:])


def test_single_step_and_single_state():
    pi, A, ll = make_model(7, num_timesteps=1)
    post = ssmjax.hmm_smoother(pi, A, ll)
    assert_allclose(post.marginal_loglik, brute_force(pi, A, ll)["loglik"])
    assert ssmjax.hmm_two_slice_marginals(pi, A, ll).shape == (0, 3, 3)
    assert_allclose(post.expected_transitions, np.zeros((3, 3)))
    ll1 = np.random.default_rng(0).normal(size=(4, 1))
    out = ssmjax.hmm_filter(np.ones(1), np.ones((1, 1)), ll1)
    assert_allclose(out.marginal_loglik, ll1.sum())


# --------------------------------------------------------------------------- sampling


def test_posterior_samples_are_exact():
    """Empirical path frequencies vs the brute-force posterior.

    Bound: for ``m`` categories and ``n`` draws, P(||p_hat - p||_1 >= eps) <=
    2^m exp(-n eps^2 / 2) (Bretagnolle-Huber-Carol); eps is solved for a false-alarm
    probability of 1e-6.
    """
    pi, A, ll = make_model(8, num_states=2, num_timesteps=4, time_varying=True, zeros=True)
    oracle = brute_force(pi, A, ll)
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: ssmjax.hmm_sample_posterior(pi, A, ll, key=k)))(keys))
    codes = draws @ (2 ** np.arange(3, -1, -1))
    oracle_codes = oracle["paths"] @ (2 ** np.arange(3, -1, -1))
    freq = np.bincount(codes, minlength=16) / n
    probs = np.zeros(16)
    probs[oracle_codes] = oracle["path_probs"]
    m = 16
    eps = math.sqrt(2 * (m * math.log(2) + math.log(1e6)) / n)
    assert np.abs(freq - probs).sum() < eps
    assert np.all(freq[probs == 0] == 0)  # impossible paths are never drawn


# --------------------------------------------------------------------------- ragged batches


def _pad(x, T, fill):
    x = np.asarray(x, np.float64)
    out = np.full((T,) + x.shape[1:], fill)
    out[: x.shape[0]] = x
    return out


@pytest.mark.parametrize("time_varying", [False, True])
def test_ragged_batch_equals_unpadded_runs(time_varying):
    T, lengths = 6, [6, 4, 1]
    models = [make_model(20 + i, num_timesteps=n, time_varying=time_varying, zeros=True) for i, n in enumerate(lengths)]
    pi = models[0][0]
    fills = [np.nan, np.inf, -np.inf]
    L = np.stack([_pad(m[2], T, f) for m, f in zip(models, fills)])
    n_arr = jnp.array(lengths)
    if time_varying:
        A = np.stack([_pad(m[1], T - 1, np.nan) for m in models])
        smooth = jax.vmap(lambda a, ll, n: ssmjax.hmm_smoother(pi, a, ll, length=n))(A, L, n_arr)
        xi = jax.vmap(lambda a, ll, n: ssmjax.hmm_two_slice_marginals(pi, a, ll, length=n))(A, L, n_arr)
        paths, _ = jax.vmap(lambda a, ll, n: ssmjax.hmm_viterbi(pi, a, ll, length=n))(A, L, n_arr)
    else:
        A = models[0][1]
        smooth = jax.vmap(lambda ll, n: ssmjax.hmm_smoother(pi, A, ll, length=n))(L, n_arr)
        xi = jax.vmap(lambda ll, n: ssmjax.hmm_two_slice_marginals(pi, A, ll, length=n))(L, n_arr)
        paths, _ = jax.vmap(lambda ll, n: ssmjax.hmm_viterbi(pi, A, ll, length=n))(L, n_arr)
    for b, (n, model) in enumerate(zip(lengths, models)):
        A_b = model[1] if time_varying else A
        alone = ssmjax.hmm_smoother(pi, A_b, model[2])
        assert_allclose(smooth.marginal_loglik[b], alone.marginal_loglik)
        for field in ("filtered_probs", "predicted_probs", "smoothed_probs"):
            got = np.asarray(getattr(smooth, field)[b])
            assert_allclose(got[:n], getattr(alone, field))
            # documented padding: rows t >= length repeat filtered_probs[length - 1]
            assert_allclose(got[n:], np.broadcast_to(alone.filtered_probs[-1], got[n:].shape))
        assert_allclose(smooth.expected_transitions[b], alone.expected_transitions)
        assert_allclose(xi[b, : n - 1], ssmjax.hmm_two_slice_marginals(pi, A_b, model[2]))
        assert np.all(np.asarray(xi[b, n - 1 :]) == 0)
        path_alone, _ = ssmjax.hmm_viterbi(pi, A_b, model[2])
        np.testing.assert_array_equal(paths[b, :n], path_alone)
        assert np.all(np.asarray(paths[b, n:]) == int(path_alone[-1]))
    assert np.all(np.isfinite(np.asarray(smooth.smoothed_probs)))


def test_ragged_samples_fixed_lag_and_predict():
    pi, A, ll = make_model(30, num_timesteps=4)
    padded = np.concatenate([ll, np.full((3, 3), np.nan)])
    key = jax.random.key(3)
    s_pad = ssmjax.hmm_sample_posterior(pi, A, padded, length=4, key=key)
    assert np.all(np.asarray(s_pad[4:]) == int(s_pad[3]))
    lag_pad = ssmjax.hmm_fixed_lag_smoother(pi, A, padded, 2, length=4)
    assert_allclose(lag_pad[:4], ssmjax.hmm_fixed_lag_smoother(pi, A, ll, 2))
    smoothed = ssmjax.hmm_smoother(pi, A, ll).smoothed_probs
    # rows t >= length: p(z_{t-lag} | y_{0:L-1})
    assert_allclose(lag_pad[4], smoothed[2])
    assert_allclose(lag_pad[5], smoothed[3])
    assert_allclose(
        ssmjax.hmm_predict(pi, A, padded, 2, length=4), ssmjax.hmm_predict(pi, A, ll, 2)
    )


# --------------------------------------------------------------------------- numerics


def test_float32_long_sequence_matches_float64():
    T, K = 200_000, 4
    pi, A, _ = make_model(40, num_states=K)
    ll = np.random.default_rng(41).normal(size=(T, K)) - 1.0
    ll64 = ssmjax.hmm_filter(pi, A, ll).marginal_loglik
    ll32 = ssmjax.hmm_filter(pi.astype(np.float32), A.astype(np.float32), ll.astype(np.float32)).marginal_loglik
    assert ll32.dtype == jnp.float32
    assert abs(float(ll32) - float(ll64)) <= 1e-5 * abs(float(ll64))


def test_mixed_precision_promotes_and_checks_each_argument_at_its_own_tolerance():
    # a float32 transition matrix beside float64 arrays: promoted, its float32 rounding accepted
    pi, A, _ = make_model(3, num_states=5)
    ll = np.random.default_rng(4).normal(size=(30, 5))
    A32 = np.asarray(A, np.float32)
    assert np.abs(np.float64(A32).sum(axis=1) - 1).max() > 1e-8  # beyond float64's tolerance
    mixed = ssmjax.hmm_filter(pi, A32, ll)
    assert mixed.marginal_loglik.dtype == jnp.float64
    renormalised = np.float64(A32) / np.float64(A32).sum(axis=1, keepdims=True)  # rows moved by ~1e-8
    np.testing.assert_allclose(mixed.marginal_loglik, ssmjax.hmm_filter(pi, renormalised, ll).marginal_loglik,
                               rtol=1e-6)
    # a float64 matrix off by more than float64's tolerance is still refused
    with pytest.raises(ValueError, match="`transition_matrix` must hold finite non-negative probabilities"):
        ssmjax.hmm_filter(pi, np.asarray(A) * (1 + 1e-6), ll)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_very_negative_log_likelihoods(dtype):
    pi, A, ll = make_model(42, time_varying=False, zeros=True)
    big = (ll - 1e4).astype(dtype)
    pi, A = pi.astype(dtype), A.astype(dtype)
    post = ssmjax.hmm_smoother(pi, A, big)
    # oracle on exactly the (rounded) inputs the function received
    ref = brute_force(pi.astype(np.float64), A.astype(np.float64), big.astype(np.float64))
    assert np.isfinite(float(post.marginal_loglik))
    assert_allclose(post.smoothed_probs, ref["smoothed"], dtype=dtype)
    assert_allclose(post.marginal_loglik, ref["loglik"], dtype=dtype)


def test_underflow_rescue_with_structural_zeros():
    """The only reachable state is 2000 nats worse than an unreachable one."""
    pi = np.array([1.0, 0.0])
    A = np.array([[1.0, 0.0], [0.5, 0.5]])
    ll = np.array([[0.0, 0.0], [-2000.0, 0.0], [-2000.0, 0.0]])
    post = ssmjax.hmm_smoother(pi, A, ll)
    assert_allclose(post.marginal_loglik, -4000.0)
    assert_allclose(post.smoothed_probs, np.array([[1.0, 0.0]] * 3))
    grads = jax.grad(lambda p, a, l: ssmjax.hmm_filter(p, a, l).marginal_loglik, argnums=(0, 1, 2))(pi, A, ll)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert_allclose(grads[2], post.smoothed_probs)
    assert_allclose(ssmjax.hmm_two_slice_marginals(pi, A, ll), np.array([[[1.0, 0.0], [0.0, 0.0]]] * 2))


def test_vmap_keeps_the_underflow_rescue_conditional():
    """Under ``jax.vmap`` the robust forward pass runs only when some sequence of the batch needs
    it (a ``cond`` on "any", not a ``select`` that runs it for every batch), and each sequence still
    gets exactly its unbatched result, values and gradients, whether or not it underflowed."""
    pi = np.array([1.0, 0.0])
    A = np.array([[1.0, 0.0], [0.5, 0.5]])
    rescue = np.array([[0.0, 0.0], [-2000.0, 0.0], [-2000.0, 0.0]])  # needs the robust pass
    plain = np.array([[0.1, -0.3], [-1.0, 0.2], [0.4, 0.0]])
    batch = jnp.asarray(np.stack([rescue, plain]))

    def loglik(f, l):
        return f(pi, A, l).marginal_loglik

    # the batched recursion chooses between its masked and unmasked loops once per loop
    # (recursion._indexed): the forward pass, its rescue, and the smoother's backward pass
    loop_choices = {ssmjax.hmm_filter: 2, ssmjax.hmm_smoother: 3}
    for f in (ssmjax.hmm_filter, ssmjax.hmm_smoother):
        # every conditional of the single-sequence program survives batching (a batched predicate
        # would have turned the rescue's into a select of both branches)
        def conditionals(fn, x):
            return jax.jit(fn).lower(x).as_text().count("stablehlo.case")

        single = conditionals(lambda l: f(pi, A, l), batch[0])
        batched = conditionals(jax.vmap(lambda l: f(pi, A, l)), batch)
        assert single >= 1 and batched == single + loop_choices[f], (f.__name__, single, batched)
        out = jax.vmap(lambda l: f(pi, A, l))(batch)
        grads = jax.vmap(jax.grad(lambda l: loglik(f, l)))(batch)
        for i, ll in enumerate((rescue, plain)):
            one = f(pi, A, ll)
            for name in ("marginal_loglik", "filtered_probs", "predicted_probs", "smoothed_probs"):
                if hasattr(one, name):
                    assert_allclose(getattr(out, name)[i], getattr(one, name), err_msg=f"{f.__name__} {name} {i}")
            g = jax.grad(lambda l: loglik(f, l))(ll)
            assert np.all(np.isfinite(np.asarray(grads[i])))
            assert_allclose(grads[i], g, err_msg=f"{f.__name__} grad {i}")
            # d loglik / d ll_t = smoothed_t (the filter's custom VJP, checked against finite
            # differences elsewhere; the smoother is plain autodiff through both forward passes)
            assert_allclose(g, one.smoothed_probs if hasattr(one, "smoothed_probs") else ssmjax.hmm_smoother(pi, A, ll).smoothed_probs)
        assert_allclose(out.marginal_loglik[0], -4000.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smoother_gradients_through_the_underflow_rescue(dtype):
    """Autodiff of ``hmm_smoother`` through a rescued forward pass: the discarded fast pass
    (normalisers below the threshold) must not leak NaN into the gradients. Transition
    probabilities are tiny but non-zero, so every derivative exists; the reference is
    ``hmm_filter``'s custom VJP, which is checked against finite differences elsewhere."""
    tiny = 1e-200 if dtype == np.float64 else 1e-30
    pi = np.array([1.0 - tiny, tiny], dtype)
    A = np.array([[1.0 - tiny, tiny], [0.5, 0.5]], dtype)
    ll = np.array([[0.0, 0.0], [-2000.0, 0.0], [-2000.0, 0.0], [0.3, -0.2]], dtype)

    def loglik(f):
        return lambda p, a, l: f(p, a, l).marginal_loglik

    got = jax.grad(loglik(ssmjax.hmm_smoother), argnums=(0, 1, 2))(pi, A, ll)
    want = jax.grad(loglik(ssmjax.hmm_filter), argnums=(0, 1, 2))(pi, A, ll)
    for name, g, w in zip(("initial_probs", "transition_matrix", "log_likelihoods"), got, want):
        assert np.all(np.isfinite(np.asarray(g))), name
        assert_allclose(g, w, dtype=dtype, err_msg=name)
    # a function of the smoothed probabilities: finite, and equal to finite differences
    weights = jnp.arange(ll.size, dtype=dtype).reshape(ll.shape) / ll.size

    def objective(l):
        return jnp.sum(ssmjax.hmm_smoother(pi, A, l).smoothed_probs * weights)

    g = jax.grad(objective)(ll)
    assert np.all(np.isfinite(np.asarray(g)))
    if dtype == np.float64:
        assert_allclose(g, central_difference_grad(lambda l: float(objective(l)), ll), **FD_TOLERANCE)


def numpy_forward_backward(pi, A, ll, length):
    """Scaled forward-backward in float64 numpy over the first ``length`` steps (independent reference).

    Each step is shifted by the largest log-likelihood among states of non-zero predicted
    probability, so it also covers steps where every reachable state is thousands of nats
    less likely than an unreachable one. ``e_t = exp(ll_t) / c_t`` is infinite only for a
    state of filtered probability zero, whose terms are exactly zero: it is set to 0.
    """
    T, K = ll.shape
    trans = (lambda t: A[t]) if A.ndim == 3 else (lambda t: A)
    filtered, predicted, log_c = np.zeros((length, K)), np.zeros((length, K)), np.zeros(length)
    pred = pi
    for t in range(length):
        if t > 0:
            pred = filtered[t - 1] @ trans(t - 1)
        predicted[t] = pred
        shift = np.max(np.where(pred > 0, ll[t], -np.inf))
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.where(pred > 0, pred * np.exp(ll[t] - shift), 0.0)
        filtered[t] = w / w.sum()
        log_c[t] = np.log(w.sum()) + shift
    with np.errstate(over="ignore"):
        e = np.exp(ll[:length] - log_c[:, None])
    e = np.where(np.isfinite(e), e, 0.0)
    beta = np.ones((length, K))
    for t in range(length - 2, -1, -1):
        beta[t] = trans(t) @ (e[t + 1] * beta[t + 1])
    v = e * beta
    grad_trans = filtered[:-1, :, None] * v[1:, None, :]  # d log p / d A_t, per pair
    xi = grad_trans * np.stack([trans(t) for t in range(length - 1)])
    return dict(
        loglik=log_c.sum(), filtered=filtered, predicted=predicted, smoothed=filtered * beta,
        two_slice=xi, grad_pi=v[0], grad_trans=grad_trans,
    )


@pytest.mark.parametrize(
    "num_states,time_varying,rescue",
    [(3, False, False), (3, True, False), (20, False, False), (20, True, False), (20, False, True)],
)
def test_long_padded_sequences_match_numpy_forward_backward(num_states, time_varying, rescue):
    """Many steps (several gradient blocks), padding from mid-block on (NaN there), K on both
    sides of the fused/matmul-kernel switch, optionally an underflow rescue: values and the
    custom gradient against a float64 numpy forward-backward."""
    T, L = 1000, 777
    pi, A, ll = make_model(60 + num_states, num_states=num_states, num_timesteps=T, time_varying=time_varying,
                           zeros=True)
    if rescue:  # state 0 unreachable; at one step every reachable state is 2000 nats worse
        pi[0] = 0.0
        pi /= pi.sum()
        A[:, 0] = 0.0
        A[0] = 0.0
        A[0, 0] = 1.0
        A /= A.sum(-1, keepdims=True)
        ll[300] = -2000.0
        ll[300, 0] = 0.0
    ref = numpy_forward_backward(pi, A, ll, L)
    padded = ll.copy()
    padded[L:] = np.nan
    if time_varying:
        A = A.copy()
        A[L - 1 :] = np.nan
    last = ref["filtered"][-1]

    post = ssmjax.hmm_smoother(pi, A, padded, length=L)
    assert_allclose(post.marginal_loglik, ref["loglik"])
    for name in ("filtered", "predicted", "smoothed"):
        got = np.asarray(getattr(post, f"{name}_probs"))
        assert_allclose(got[:L], ref[name])
        assert_allclose(got[L:], np.broadcast_to(last, (T - L, num_states)))
    assert_allclose(post.expected_transitions, ref["two_slice"].sum(0))
    xi = ssmjax.hmm_two_slice_marginals(pi, A, padded, length=L)
    assert_allclose(xi[: L - 1], ref["two_slice"])
    assert np.all(np.asarray(xi[L - 1 :]) == 0)

    loglik = jax.jit(
        jax.value_and_grad(lambda p, a, l: ssmjax.hmm_filter(p, a, l, length=L).marginal_loglik, argnums=(0, 1, 2))
    )
    value, (g_pi, g_A, g_ll) = loglik(pi, A, padded)
    assert_allclose(value, ref["loglik"])
    assert_allclose(g_pi, ref["grad_pi"])
    assert_allclose(g_ll[:L], ref["smoothed"])
    assert np.all(np.asarray(g_ll[L:]) == 0)
    # (with the rescue, d/dA into the unreachable state is reported as 0, see _finite_or_zero)
    cols = slice(1, None) if rescue else slice(None)
    if time_varying:
        assert_allclose(g_A[: L - 1, :, cols], ref["grad_trans"][:, :, cols])
        assert np.all(np.asarray(g_A[L - 1 :]) == 0)
    else:
        assert_allclose(g_A[:, cols], ref["grad_trans"].sum(0)[:, cols])


# --------------------------------------------------------------------------- compilation


def test_no_recompilation_on_equal_shapes():
    funcs = [hmm_rules.filter_program, hmm_rules.smoother_program, hmm_decoding.viterbi_program]
    pi, A, ll = make_model(50)
    _, _, ll2 = make_model(51)
    ssmjax.hmm_filter(pi, A, ll)
    ssmjax.hmm_smoother(pi, A, ll, length=3)
    ssmjax.hmm_viterbi(pi, A, ll)
    before = [f._cache_size() for f in funcs]
    ssmjax.hmm_filter(pi, A, ll2)
    ssmjax.hmm_smoother(pi, A, ll2, length=4)
    ssmjax.hmm_viterbi(pi, A, ll2)
    assert [f._cache_size() for f in funcs] == before

    traces = []

    @jax.jit
    def loglik(ll, n):
        traces.append(1)
        return ssmjax.hmm_filter(pi, A, ll, length=n).marginal_loglik

    loglik(ll, 5)
    loglik(ll2, 3)
    assert len(traces) == 1


# --------------------------------------------------------------------------- errors


def _bad_model():
    return make_model(60)


@pytest.mark.parametrize(
    "name,mutate,pattern",
    [
        ("transition", lambda pi, A, ll: (pi, A[:2, :2], ll), r"`transition_matrix` must have shape \(3, 3\) or \(4, 3, 3\).*got shape \(2, 2\)"),
        ("initial", lambda pi, A, ll: (pi[:2], A, ll), r"`initial_probs` must have shape \(3,\).*got shape \(2,\)"),
        ("loglik_rank", lambda pi, A, ll: (pi, A, ll[0]), r"`log_likelihoods` must have shape \(T, K\).*got shape \(3,\)"),
        ("tv_length", lambda pi, A, ll: (pi, np.stack([A] * 5), ll), r"`transition_matrix`.*got shape \(5, 3, 3\)"),
    ],
)
def test_shape_errors_name_the_argument(name, mutate, pattern):
    args = mutate(*_bad_model())
    with pytest.raises(ValueError, match=pattern):
        ssmjax.hmm_filter(*args)
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda *a: ssmjax.hmm_smoother(*a).marginal_loglik)(*args)


VALUE_ERRORS = [
    (lambda pi, A, ll: (pi * -1, A, ll), "`initial_probs`"),
    (lambda pi, A, ll: (pi, A * 1.5, ll), "`transition_matrix`"),
    (lambda pi, A, ll: (pi, A, np.where(np.arange(5)[:, None] == 2, np.nan, ll)), "`log_likelihoods` contains NaN"),
]


@pytest.mark.parametrize("mutate,pattern", VALUE_ERRORS)
def test_value_errors_eager_jit_and_switch(mutate, pattern):
    args = mutate(*_bad_model())
    with pytest.raises(ValueError, match=pattern):
        ssmjax.hmm_smoother(*args)
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match=pattern):
        jax.block_until_ready(jax.jit(lambda *a: ssmjax.hmm_filter(*a).marginal_loglik)(*args))
    with ssmjax.value_checks(False):
        ssmjax.hmm_smoother(*args)  # no error


def test_other_argument_errors():
    pi, A, ll = _bad_model()
    with pytest.raises(ValueError, match="`length` must lie in"):
        ssmjax.hmm_filter(pi, A, ll, length=9)
    with pytest.raises(ValueError, match="`lag`"):
        ssmjax.hmm_fixed_lag_smoother(pi, A, ll, -1)
    with pytest.raises(ValueError, match="`num_steps`"):
        ssmjax.hmm_predict(pi, A, ll, 0)
    _, A_tv, _ = make_model(60, time_varying=True)
    with pytest.raises(ValueError, match="`future_transition_matrix`.*required"):
        ssmjax.hmm_predict(pi, A_tv, ll, 2)
    with pytest.raises(ValueError, match=r"`future_transition_matrix` must have shape"):
        ssmjax.hmm_predict(pi, A, ll, 2, future_transition_matrix=np.eye(2))
    # NaN in padding is fine
    padded = np.concatenate([ll[:2], np.full((3, 3), np.nan)])
    assert np.isfinite(float(ssmjax.hmm_filter(pi, A, padded, length=2).marginal_loglik))


# --------------------------------------------------------------------------- hmmlearn


def test_agrees_with_hmmlearn_categorical():
    hmm = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(70)
    K, C, T = 3, 4, 50
    pi = random_stochastic_matrix(rng, (K,))
    A = random_stochastic_matrix(rng, (K, K))
    B = random_stochastic_matrix(rng, (K, C))
    x = rng.integers(0, C, size=T)
    model = hmm.CategoricalHMM(n_components=K, n_features=C, init_params="", params="")
    model.startprob_, model.transmat_, model.emissionprob_ = pi, A, B
    X = x[:, None]
    ll = np.log(B[:, x].T)
    post = ssmjax.hmm_smoother(pi, A, ll)
    assert_allclose(post.marginal_loglik, model.score(X))
    assert_allclose(post.smoothed_probs, model.predict_proba(X))
    log_prob, path = model.decode(X, algorithm="viterbi")
    ours, our_log_prob = ssmjax.hmm_viterbi(pi, A, ll)
    np.testing.assert_array_equal(ours, path)
    assert_allclose(our_log_prob, log_prob)


# --------------------------------------------------------------------------- properties


@settings(max_examples=12, deadline=None)
@given(
    num_states=st.integers(1, 3),
    num_timesteps=st.integers(1, 4),
    time_varying=st.booleans(),
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
    length_frac=st.floats(0.0, 1.0),
)
def test_property_random_models_match_brute_force(num_states, num_timesteps, time_varying, zeros, seed, length_frac):
    pi, A, ll = make_model(seed, num_states, num_timesteps, time_varying, zeros, scale=3.0)
    length = max(1, round(length_frac * num_timesteps))
    A_real = A[: length - 1] if time_varying else A
    oracle = brute_force(pi, A_real, ll[:length])
    post = ssmjax.hmm_smoother(pi, A, ll, length=length)
    assert_allclose(post.marginal_loglik, oracle["loglik"])
    assert_allclose(post.smoothed_probs[:length], oracle["smoothed"])
    assert_allclose(post.expected_transitions, oracle["two_slice"].sum(0) if length > 1 else np.zeros((num_states,) * 2))
    _, log_prob = ssmjax.hmm_viterbi(pi, A, ll, length=length)
    assert_allclose(log_prob, oracle["viterbi_log_prob"])
