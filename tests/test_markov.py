"""Fully observed Markov chains: the notes' weather example, the counting MLE, sampling, errors."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_allclose, random_stochastic_matrix

import ssmjax

# The weather chain of the Markov-chain notes (seed 001, §1), states in the
# notes' order: 0 = sun, 1 = cloud, 2 = rain. The notes fold the initial
# distribution into an augmented matrix whose row s_0 is (0, .33, .33, .33).
# The translated table omits the s_sun row; it is (0, .8, .1, .1) in the
# original notes (Ramage, CS229), and its only entry the worked example uses,
# P(cloud | sun) = .1, is fixed by the worked product itself.
SUN, CLOUD, RAIN = 0, 1, 2
WEATHER_TRANSITIONS = np.array(
    [
        [0.8, 0.1, 0.1],  # sun   -> sun, cloud, rain
        [0.2, 0.6, 0.2],  # cloud -> ...
        [0.1, 0.2, 0.7],  # rain  -> ...
    ]
)
WEATHER_SEQUENCE = np.array([SUN, CLOUD, RAIN, RAIN, CLOUD])  # z_1..z_5 of the notes


def test_weather_example_reproduces_the_notes_product():
    # The printed start row (.33, .33, .33) sums to .99, so it is not a
    # distribution (see the next test). With P(sun | s_0) = .33 exactly and the
    # remaining mass on the other states, the chain reproduces the worked
    # product .33 x .1 x .2 x .7 x .2 (the other start entries do not enter it).
    chain = ssmjax.MarkovChain(jnp.array([0.33, 0.33, 0.34]), jnp.asarray(WEATHER_TRANSITIONS))
    expected = 0.33 * 0.1 * 0.2 * 0.7 * 0.2
    assert_allclose(jnp.exp(chain.marginal_loglik(jnp.asarray(WEATHER_SEQUENCE))), expected)
    assert_allclose(chain.marginal_loglik(jnp.asarray(WEATHER_SEQUENCE)), math.log(expected))

    # The notes' statement of intent: s_0 moves uniformly to the three states.
    uniform = ssmjax.MarkovChain(jnp.full(3, 1 / 3), jnp.asarray(WEATHER_TRANSITIONS))
    assert_allclose(uniform.marginal_loglik(jnp.asarray(WEATHER_SEQUENCE)), math.log(0.1 * 0.2 * 0.7 * 0.2 / 3))


def test_weather_augmented_matrix_round_trip_and_printed_start_row_is_rejected():
    aug = np.zeros((4, 4))
    aug[0, 1:] = [0.33, 0.33, 0.34]
    aug[1:, 1:] = WEATHER_TRANSITIONS
    chain = ssmjax.MarkovChain.from_augmented_matrix(jnp.asarray(aug))
    assert_allclose(chain.initial_probs, aug[0, 1:])
    assert_allclose(chain.transition_matrix, WEATHER_TRANSITIONS)
    assert_allclose(chain.augmented_matrix, aug)
    # the product over the augmented matrix, prod_t A[z_{t-1}, z_t] with z_0 = s_0
    path = [0] + list(WEATHER_SEQUENCE + 1)
    direct = np.prod([aug[a, b] for a, b in zip(path[:-1], path[1:])])
    assert_allclose(jnp.exp(chain.marginal_loglik(jnp.asarray(WEATHER_SEQUENCE))), direct)

    aug_printed = aug.copy()
    aug_printed[0, 1:] = [0.33, 0.33, 0.33]
    with pytest.raises(ValueError, match="`initial_probs` must hold finite non-negative probabilities"):
        ssmjax.MarkovChain.from_augmented_matrix(jnp.asarray(aug_printed))
    bad_col = aug.copy()
    bad_col[1, 0] = 0.1
    with pytest.raises(ValueError, match="`augmented_matrix` must have a zero first column"):
        ssmjax.MarkovChain.from_augmented_matrix(jnp.asarray(bad_col))


def _numpy_log_prob(pi, A, z):
    out = np.log(pi[z[0]])
    for a, b in zip(z[:-1], z[1:]):
        out += np.log(A[a, b])
    return out


def test_log_prob_matches_loop_and_length_ignores_padding():
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(4))
    A = random_stochastic_matrix(rng, (4, 4))
    chain = ssmjax.MarkovChain(jnp.asarray(pi), jnp.asarray(A))
    z = rng.integers(0, 4, size=12)
    assert_allclose(chain.marginal_loglik(jnp.asarray(z)), _numpy_log_prob(pi, A, z))
    # padded steps hold garbage (out of range); only the first 7 count
    zp = z.copy()
    zp[7:] = 99
    assert_allclose(chain.marginal_loglik(jnp.asarray(zp), length=7), _numpy_log_prob(pi, A, z[:7]))
    f = jax.jit(lambda s, n: chain.marginal_loglik(s, length=n))
    assert_allclose(f(jnp.asarray(zp), 7), _numpy_log_prob(pi, A, z[:7]))
    assert_allclose(f(jnp.asarray(z), 1), np.log(pi[z[0]]))


def test_structural_zero_gives_exact_minus_inf_and_finite_gradient():
    chain = ssmjax.MarkovChain(jnp.array([1.0, 0.0]), jnp.array([[0.5, 0.5], [0.0, 1.0]]))
    assert float(chain.marginal_loglik(jnp.array([1, 1]))) == -np.inf
    assert float(chain.marginal_loglik(jnp.array([0, 1, 0]))) == -np.inf
    grads = jax.grad(lambda c: c.marginal_loglik(jnp.array([0, 0, 1, 1])))(chain)
    assert np.all(np.isfinite(grads.transition_matrix)) and np.all(np.isfinite(grads.initial_probs))


def _numpy_counts(states, lengths, k):
    init = np.zeros(k)
    trans = np.zeros((k, k))
    for seq, n in zip(states, lengths):
        init[seq[0]] += 1
        for t in range(n - 1):
            trans[seq[t], seq[t + 1]] += 1
    return init, trans


def _ragged_batch(rng, chain_pi, chain_A, batch, T):
    k = len(chain_pi)
    lengths = rng.integers(1, T + 1, size=batch)
    states = np.full((batch, T), -5)  # padding is garbage
    for b in range(batch):
        s = rng.choice(k, p=chain_pi)
        for t in range(lengths[b]):
            states[b, t] = s
            s = rng.choice(k, p=chain_A[s])
    return states, lengths


def test_fit_equals_counting_formula_on_ragged_batch():
    rng = np.random.default_rng(1)
    k = 4
    pi = rng.dirichlet(np.ones(k))
    A = random_stochastic_matrix(rng, (k, k), zeros=True)
    states, lengths = _ragged_batch(rng, pi, A, batch=9, T=15)
    init, trans = _numpy_counts(states, lengths, k)

    got_init, got_trans = ssmjax.markov_transition_counts(jnp.asarray(states), jnp.asarray(lengths), num_states=k)
    np.testing.assert_array_equal(got_init, init)
    np.testing.assert_array_equal(got_trans, trans)

    fitted = ssmjax.MarkovChain.fit(jnp.asarray(states), jnp.asarray(lengths), num_states=k)
    row = lambda c: c / c.sum(-1, keepdims=True)
    assert_allclose(fitted.initial_probs, row(init))
    safe_trans = np.where(trans.sum(-1, keepdims=True) > 0, row(np.where(trans.sum(-1, keepdims=True) > 0, trans, 1)), 1 / k)
    assert_allclose(fitted.transition_matrix, safe_trans)

    # jit with static num_states gives the same answer
    jfit = jax.jit(lambda s, n: ssmjax.MarkovChain.fit(s, n, num_states=k))
    assert_allclose(jfit(jnp.asarray(states), jnp.asarray(lengths)).transition_matrix, safe_trans)


def test_fit_pseudo_counts_and_empty_rows():
    # state 2 never appears: with no pseudo-counts its row is uniform (not NaN)
    states = jnp.array([[0, 1, 1, 0, 0], [1, 0, 7, 7, 7]])
    lengths = jnp.array([5, 2])
    init, trans = _numpy_counts(np.asarray(states), np.asarray(lengths), 3)
    fitted = ssmjax.MarkovChain.fit(states, lengths, num_states=3)
    assert_allclose(fitted.transition_matrix[2], np.full(3, 1 / 3))
    assert_allclose(fitted.initial_probs, init / init.sum())

    c = 0.5
    smoothed = ssmjax.MarkovChain.fit(states, lengths, num_states=3, pseudo_counts=c)
    assert_allclose(smoothed.initial_probs, (init + c) / (init + c).sum())
    assert_allclose(smoothed.transition_matrix, (trans + c) / (trans + c).sum(-1, keepdims=True))

    init_c = np.array([1.0, 2.0, 3.0])
    trans_c = np.arange(9.0).reshape(3, 3)
    custom = ssmjax.MarkovChain.fit(
        states, lengths, num_states=3, initial_pseudo_counts=init_c, transition_pseudo_counts=trans_c
    )
    assert_allclose(custom.initial_probs, (init + init_c) / (init + init_c).sum())
    expect = trans + trans_c
    expect = np.where(expect.sum(-1, keepdims=True) > 0, expect / np.maximum(expect.sum(-1, keepdims=True), 1e-300), 1 / 3)
    assert_allclose(custom.transition_matrix, expect)

    # num_states inferred from the real steps (7 is padding)
    assert ssmjax.MarkovChain.fit(states, lengths).num_states == 2


def test_mle_converges_to_truth_as_T_grows():
    rng = np.random.default_rng(2)
    k = 3
    pi = np.full(k, 1 / k)
    A = random_stochastic_matrix(rng, (k, k), concentration=3.0)
    truth = ssmjax.MarkovChain(jnp.asarray(pi), jnp.asarray(A))
    errors = []
    for T in (100, 1_000, 10_000):
        keys = jax.random.split(jax.random.key(T), 4)
        states = jax.vmap(lambda key: truth.sample(T, key=key))(keys)
        fitted = ssmjax.MarkovChain.fit(states, num_states=k)
        errors.append(float(jnp.max(jnp.abs(fitted.transition_matrix - truth.transition_matrix))))
    # standard error of a row estimate ~ sqrt(p(1-p) / n_i) with n_i ~ 4 T pi_i:
    # at T = 10000 every entry is within ~5 standard errors of the truth
    stat = np.asarray(truth.stationary_distribution)
    bound = 5 * np.sqrt(0.25 / (4 * 10_000 * stat.min()))
    assert errors[-1] < bound
    assert errors[-1] < errors[0]


def test_sample_statistics_match_the_chain():
    pi = np.array([0.2, 0.5, 0.3])
    A = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    chain = ssmjax.MarkovChain(jnp.asarray(pi), jnp.asarray(A))
    B, T = 2000, 30
    states = np.asarray(jax.vmap(lambda key: chain.sample(T, key=key))(jax.random.split(jax.random.key(3), B)))
    assert states.shape == (B, T) and states.min() >= 0 and states.max() < 3
    init, trans = _numpy_counts(states, np.full(B, T), 3)
    # first states: binomial proportions, 5 standard errors
    se = np.sqrt(pi * (1 - pi) / B)
    assert np.all(np.abs(init / B - pi) < 5 * se)
    n_from = trans.sum(-1, keepdims=True)
    se_t = np.sqrt(A * (1 - A) / n_from)
    assert np.all(np.abs(trans / n_from - A) < 5 * se_t)


def test_stationary_distribution_against_numpy_eig():
    rng = np.random.default_rng(4)
    A = random_stochastic_matrix(rng, (5, 5))
    chain = ssmjax.MarkovChain(jnp.full(5, 0.2), jnp.asarray(A))
    w, v = np.linalg.eig(A.T)
    p = np.real(v[:, np.argmin(np.abs(w - 1))])
    p = p / p.sum()
    assert_allclose(chain.stationary_distribution, p, rtol=1e-8, atol=1e-10)
    assert_allclose(chain.stationary_distribution @ A, chain.stationary_distribution, rtol=1e-8, atol=1e-10)


def test_errors_name_the_argument():
    A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
    pi = jnp.array([0.5, 0.5])
    with pytest.raises(ValueError, match=r"`transition_matrix` must have shape \(2, 2\).*got shape \(3, 3\)"):
        ssmjax.MarkovChain(pi, jnp.eye(3))
    with pytest.raises(ValueError, match="`transition_matrix` must hold finite non-negative probabilities"):
        ssmjax.MarkovChain(pi, jnp.array([[0.9, 0.2], [0.2, 0.8]]))
    with pytest.raises(ValueError, match="`initial_probs` must hold finite non-negative probabilities"):
        ssmjax.MarkovChain(jnp.array([1.2, -0.2]), A)
    chain = ssmjax.MarkovChain(pi, A)
    with pytest.raises(ValueError, match=r"`states` must hold states in \[0, 2\)"):
        chain.marginal_loglik(jnp.array([0, 2, 1]))
    with pytest.raises(ValueError, match="`states` must hold integer states"):
        chain.marginal_loglik(jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"`states` must have shape \(T,\)"):
        chain.marginal_loglik(jnp.zeros((2, 3), int))
    with pytest.raises(ValueError, match=r"`length` must lie in \[1, 3\]"):
        chain.marginal_loglik(jnp.array([0, 1, 1]), length=4)
    with pytest.raises(ValueError, match=r"`lengths` must lie in \[1, 3\]"):
        ssmjax.MarkovChain.fit(jnp.zeros((2, 3), int), jnp.array([0, 3]), num_states=2)
    with pytest.raises(ValueError, match=r"`lengths` must lie in \[1, 3\]"):
        ssmjax.MarkovChain.fit(jnp.zeros((2, 3), int), jnp.array([4, 3]), num_states=2)
    with pytest.raises(ValueError, match=r"`lengths` must have shape \(2,\)"):
        ssmjax.MarkovChain.fit(jnp.zeros((2, 3), int), jnp.array([3]), num_states=2)
    with pytest.raises(ValueError, match=r"`states` must hold states in \[0, 2\)"):
        ssmjax.MarkovChain.fit(jnp.array([[0, 1, 5]]), num_states=2)
    with pytest.raises(ValueError, match=r"`states` must have shape \(B, T\)"):
        ssmjax.MarkovChain.fit(jnp.array([0, 1, 1]), num_states=2)
    with pytest.raises(ValueError, match="`transition_pseudo_counts` must be finite and non-negative"):
        ssmjax.MarkovChain.fit(jnp.array([[0, 1, 1]]), num_states=2, transition_pseudo_counts=-1.0)


def test_value_errors_fire_under_jit():
    A = jnp.array([[0.9, 0.1], [0.2, 0.8]])
    pi = jnp.array([0.5, 0.5])
    chain = ssmjax.MarkovChain(pi, A)
    f = eqx.filter_jit(lambda s: chain.marginal_loglik(s))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`states` must hold states in \[0, 2\)"):
        f(jnp.array([0, 3, 1]))
    g = eqx.filter_jit(lambda a: ssmjax.MarkovChain(pi, a))
    with pytest.raises(eqx.EquinoxRuntimeError, match="`transition_matrix` must hold"):
        g(jnp.array([[0.9, 0.2], [0.2, 0.8]]))
    h = eqx.filter_jit(lambda s, n: ssmjax.MarkovChain.fit(s, n, num_states=2))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`lengths` must lie in \[1, 3\]"):
        h(jnp.zeros((1, 3), int), jnp.array([0]))
