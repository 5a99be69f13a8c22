"""HMM models and learning: EM against hmmlearn, recovery, guards, frozen fields, SGD, restarts."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_allclose

import ssmjax


def simulate(rng, initial, transition, emit, lengths):
    """Independent numpy simulator: states and emissions of ragged sequences, NaN-padded."""
    seqs, states = [], []
    for n in lengths:
        z = np.empty(n, dtype=int)
        z[0] = rng.choice(len(initial), p=initial)
        for t in range(1, n):
            z[t] = rng.choice(len(initial), p=transition[z[t - 1]])
        states.append(z)
        seqs.append(np.stack([emit(rng, k) for k in z]))
    return states, seqs


def pad(seqs, fill=np.nan):
    T = max(len(s) for s in seqs)
    shape = (len(seqs), T) + seqs[0].shape[1:]
    out = np.full(shape, fill, dtype=float if np.isnan(fill) else seqs[0].dtype)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


PI = np.array([0.6, 0.3, 0.1])
A = np.array([[0.85, 0.10, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]])
LENGTHS = [120, 75, 40, 96]


def start_model(emissions):
    return ssmjax.HMM(
        initial_probs=jnp.array([0.4, 0.35, 0.25]),
        transition_matrix=jnp.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]]),
        emissions=emissions,
    )


def total_loglik(model, y, lengths):
    return sum(float(model.marginal_loglik(jnp.asarray(y[b]), length=int(n))) for b, n in enumerate(lengths))


# ------------------------------------------------------------------ hmmlearn trajectories
def run_hmmlearn(hmm, n_iter, X, lengths):
    # hmmlearn copies tol/n_iter into its convergence monitor at construction: set both
    hmm.n_iter = hmm.monitor_.n_iter = n_iter
    hmm.tol = hmm.monitor_.tol = -np.inf
    hmm.fit(X, lengths)
    assert hmm.monitor_.iter == n_iter
    return hmm


@pytest.mark.parametrize("n_iter", [1, 7])
def test_poisson_em_equals_hmmlearn(n_iter):
    hl = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(1)
    rates = np.array([[2.0, 9.0], [8.0, 1.0], [15.0, 15.0]])
    _, seqs = simulate(rng, PI, A, lambda r, k: r.poisson(rates[k]), LENGTHS)
    y = pad([s.astype(float) for s in seqs])
    init_rates = np.array([[3.0, 5.0], [6.0, 2.0], [10.0, 12.0]])
    model = start_model(ssmjax.PoissonEmissions(rates=jnp.asarray(init_rates)))
    fitted, lls, _ = ssmjax.fit_em(model, y, lengths=LENGTHS, max_iters=n_iter, tol=0.0)

    ref = hl.PoissonHMM(3, init_params="", params="stl", lambdas_prior=0.0, lambdas_weight=0.0)
    ref.startprob_ = np.asarray(model.initial_probs)
    ref.transmat_ = np.asarray(model.transition_matrix)
    ref.lambdas_ = init_rates
    ref = run_hmmlearn(ref, n_iter, np.concatenate(seqs), LENGTHS)
    np.testing.assert_allclose(lls[-1], ref.monitor_.history[-1], rtol=1e-10)
    np.testing.assert_allclose(fitted.initial_probs, ref.startprob_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.transition_matrix, ref.transmat_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.emissions.rates, ref.lambdas_, rtol=1e-8)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gaussian_em_equals_hmmlearn(covariance_type):
    hl = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(2)
    means = np.array([[0.0, 0.0], [3.0, -1.0], [-2.0, 4.0]])
    chol = np.array([[1.0, 0.0], [0.5, 0.8]])
    _, seqs = simulate(rng, PI, A, lambda r, k: means[k] + chol @ r.standard_normal(2), LENGTHS)
    y = pad(seqs)
    init_means = means + 0.7
    if covariance_type == "full":
        init_covs = np.stack([np.eye(2) * 1.5, np.array([[1.0, 0.3], [0.3, 2.0]]), np.eye(2)])
    else:
        init_covs = np.array([[1.5, 1.5], [1.0, 2.0], [1.0, 1.0]])
    family = (ssmjax.GaussianEmissions if covariance_type == "full" else ssmjax.DiagonalGaussianEmissions)
    emissions = family(jnp.asarray(init_means), jnp.asarray(init_covs), min_variance=0.0)
    model = start_model(emissions)
    n_iter = 6
    fitted, lls, _ = ssmjax.fit_em(model, y, lengths=LENGTHS, max_iters=n_iter, tol=0.0)

    ref = hl.GaussianHMM(3, covariance_type=covariance_type, init_params="", params="stmc",
                         min_covar=0.0, covars_prior=0.0, means_prior=0.0, means_weight=0.0)
    ref.startprob_ = np.asarray(model.initial_probs)
    ref.transmat_ = np.asarray(model.transition_matrix)
    ref.means_ = init_means
    ref.covars_ = init_covs
    ref = run_hmmlearn(ref, n_iter, np.concatenate(seqs), LENGTHS)
    np.testing.assert_allclose(lls[-1], ref.monitor_.history[-1], rtol=1e-10)
    np.testing.assert_allclose(fitted.transition_matrix, ref.transmat_, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(fitted.emissions.means, ref.means_, rtol=1e-7, atol=1e-10)
    if covariance_type == "full":
        np.testing.assert_allclose(fitted.emissions.covs, ref.covars_, rtol=1e-7, atol=1e-10)
    else:
        np.testing.assert_allclose(fitted.emissions.variances, np.diagonal(ref.covars_, axis1=1, axis2=2),
                                   rtol=1e-7, atol=1e-10)


def test_categorical_em_equals_hmmlearn():
    hl = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(3)
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]])
    _, seqs = simulate(rng, PI, A, lambda r, k: r.choice(4, p=probs[k]), LENGTHS)
    y = pad([s.astype(np.int64) for s in seqs], fill=0)
    init_probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.2, 0.3]])
    model = start_model(ssmjax.CategoricalEmissions(jnp.asarray(init_probs)))
    n_iter = 8
    fitted, lls, _ = ssmjax.fit_em(model, y, lengths=LENGTHS, max_iters=n_iter, tol=0.0)

    ref = hl.CategoricalHMM(3, n_features=4, init_params="", params="ste")
    ref.startprob_ = np.asarray(model.initial_probs)
    ref.transmat_ = np.asarray(model.transition_matrix)
    ref.emissionprob_ = init_probs
    ref = run_hmmlearn(ref, n_iter, np.concatenate(seqs)[:, None], LENGTHS)
    np.testing.assert_allclose(lls[-1], ref.monitor_.history[-1], rtol=1e-10)
    np.testing.assert_allclose(fitted.transition_matrix, ref.transmat_, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(fitted.emissions.probs, ref.emissionprob_, rtol=1e-7, atol=1e-12)


# ------------------------------------------------------------------ EM behaviour
@pytest.fixture(scope="module")
def poisson_data():
    rng = np.random.default_rng(4)
    rates = np.array([[2.0], [10.0], [25.0]])
    lengths = [400, 250, 333, 500, 120, 300]
    states, seqs = simulate(rng, PI, A, lambda r, k: r.poisson(rates[k]), lengths)
    return rates, lengths, states, pad([s.astype(float) for s in seqs])


def test_em_recovers_poisson_parameters_and_is_monotone(poisson_data):
    rates, lengths, _, y = poisson_data
    model = ssmjax.HMM.from_data(y, 3, "poisson", lengths=lengths, key=jax.random.key(0))
    fitted, lls, info = ssmjax.fit_em(model, y, lengths=lengths, max_iters=300, tol=1e-10)
    assert info.status in ("converged", "max_iters")
    assert np.all(np.diff(np.asarray(lls)) >= -1e-10 * np.abs(np.asarray(lls[1:])))
    order = np.argsort(np.asarray(fitted.emissions.rates[:, 0]))
    est = np.asarray(fitted.emissions.rates)[order, 0]
    n = sum(lengths)
    # each rate from roughly n/3 counts: standard error sqrt(rate / (n/3)); allow 5 of them
    np.testing.assert_allclose(est, rates[:, 0], atol=5 * np.sqrt(rates[:, 0].max() / (n / 3)) * 2)
    est_a = np.asarray(fitted.transition_matrix)[np.ix_(order, order)]
    np.testing.assert_allclose(est_a, A, atol=0.06)


def test_ragged_padding_content_is_irrelevant(poisson_data):
    rates, lengths, _, y = poisson_data
    model = start_model(ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0], [20.0]])))
    fit_nan, lls_nan, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=5, tol=0.0)
    y_junk = np.where(np.isnan(y), 7.0, y)
    fit_junk, lls_junk, _ = ssmjax.fit_em(model, y_junk, lengths=lengths, max_iters=5, tol=0.0)
    np.testing.assert_array_equal(lls_nan, lls_junk)
    np.testing.assert_array_equal(fit_nan.emissions.rates, fit_junk.emissions.rates)
    # and equals the sum of per-sequence log-likelihoods of the unpadded sequences
    per_seq = sum(
        float(model.marginal_loglik(jnp.asarray(y[b, :n]))) for b, n in enumerate(lengths)
    )
    np.testing.assert_allclose(lls_nan[0], per_seq, rtol=1e-12)


def test_frozen_fields_are_untouched(poisson_data):
    _, lengths, _, y = poisson_data
    model = start_model(ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0], [20.0]])))
    fitted, _, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=10, frozen=("transition_matrix",))
    np.testing.assert_array_equal(fitted.transition_log_probs, model.transition_log_probs)
    assert not np.allclose(fitted.emissions.rates, model.emissions.rates)
    fitted, _, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=10, frozen=("emissions.rates", "initial_probs"))
    np.testing.assert_array_equal(fitted.emissions.log_rates, model.emissions.log_rates)
    np.testing.assert_array_equal(fitted.initial_log_probs, model.initial_log_probs)
    fitted, _ = ssmjax.fit_sgd(model, y, optax.adam(0.01), lengths=lengths, num_steps=10, frozen=("emissions",))
    np.testing.assert_array_equal(fitted.emissions.log_rates, model.emissions.log_rates)
    assert not np.allclose(fitted.transition_matrix, model.transition_matrix)


def test_structural_zeros_survive_em_and_sgd(poisson_data):
    _, lengths, _, y = poisson_data
    transition = jnp.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.1, 0.0, 0.9]])
    model = ssmjax.HMM(jnp.array([1.0, 0.0, 0.0]), transition,
                       ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0], [20.0]])))
    fitted, lls, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=20)
    assert np.all(np.isfinite(lls))
    np.testing.assert_array_equal(np.asarray(fitted.transition_matrix) == 0, np.asarray(transition) == 0)
    fitted, losses = ssmjax.fit_sgd(model, y, optax.adam(0.01), lengths=lengths, num_steps=20)
    assert np.all(np.isfinite(losses))
    np.testing.assert_array_equal(np.asarray(fitted.transition_matrix) == 0, np.asarray(transition) == 0)


def test_sgd_reaches_em_optimum():
    rng = np.random.default_rng(5)
    pi, a = np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]])
    _, seqs = simulate(rng, pi, a, lambda r, k: r.poisson([3.0, 12.0][k], size=1), [200, 150])
    y = pad([s.astype(float) for s in seqs])
    model = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.3, 0.7]]),
                       ssmjax.PoissonEmissions(rates=jnp.array([[2.0], [9.0]])))
    # initial_probs frozen: with two sequences its MLE sits on the simplex boundary, which
    # logits only approach; every other optimum is interior, where SGD must match EM.
    frozen = ("initial_probs",)
    em_fit, lls, _ = ssmjax.fit_em(model, y, lengths=[200, 150], max_iters=2000, tol=1e-14, frozen=frozen)
    schedule = optax.exponential_decay(0.05, transition_steps=500, decay_rate=0.5)
    sgd_fit, losses = ssmjax.fit_sgd(model, y, optax.adam(schedule), lengths=[200, 150], num_steps=3000,
                                     frozen=frozen)
    best = total_loglik(em_fit, y, [200, 150])
    np.testing.assert_allclose(total_loglik(sgd_fit, y, [200, 150]), best, rtol=1e-7)
    np.testing.assert_allclose(sgd_fit.emissions.rates, em_fit.emissions.rates, rtol=2e-3)
    np.testing.assert_allclose(sgd_fit.transition_matrix, em_fit.transition_matrix, atol=2e-3)


def test_restarts_pick_the_best(poisson_data):
    _, lengths, _, y = poisson_data
    keys = jax.random.split(jax.random.key(3), 5)
    inits = eqx.filter_vmap(
        lambda k: ssmjax.HMM.random(3, ssmjax.PoissonEmissions.random(3, 1, mean_rate=10.0, key=k), key=k)
    )(keys)
    best, scores, histories = ssmjax.fit_em_restarts(inits, y, lengths=lengths, max_iters=40)
    assert scores.shape == (5,) and histories.shape == (5, 40)
    np.testing.assert_allclose(total_loglik(best, y, lengths), float(jnp.max(scores)), rtol=1e-10)


def test_bad_input_is_rejected_before_compute(poisson_data):
    _, lengths, _, y = poisson_data
    model = start_model(ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0], [20.0]])))
    with pytest.raises(ValueError, match=r"`emissions` must have shape \(B, T, 1\)"):
        ssmjax.fit_em(model, y[..., 0], lengths=lengths)
    bad = y.copy()
    bad[0, 3, 0] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        ssmjax.fit_em(model, bad, lengths=lengths)
    bad[0, 3, 0] = 2.5
    with pytest.raises(ValueError, match="integer"):
        ssmjax.fit_em(model, bad, lengths=lengths)
    with pytest.raises(ValueError, match=r"`lengths` must lie in \[1, 500\]"):
        ssmjax.fit_em(model, y, lengths=[0] + lengths[1:])
    with pytest.raises(ValueError, match=r"`lengths` must lie in \[1, 500\]"):
        ssmjax.fit_em(model, y, lengths=[501] + lengths[1:])
    with pytest.raises(ValueError, match="`frozen` names unknown parameters"):
        ssmjax.fit_em(model, y, lengths=lengths, frozen=("emission_matrix",))
    cat = start_model(ssmjax.CategoricalEmissions(jnp.full((3, 4), 0.25)))
    with pytest.raises(ValueError, match="emissions"):
        ssmjax.fit_em(cat, np.array([[0, 1, 4]]))


def test_model_methods_agree_with_functional_api(poisson_data):
    _, lengths, _, y = poisson_data
    model = start_model(ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [8.0], [20.0]])))
    seq = jnp.asarray(y[2])
    ll = model.log_likelihoods(seq, length=lengths[2])
    post = ssmjax.hmm_smoother(model.initial_probs, model.transition_matrix, ll, length=lengths[2])
    np.testing.assert_allclose(model.smoother(seq, length=lengths[2]).smoothed_probs, post.smoothed_probs)
    path, _ = ssmjax.hmm_viterbi(model.initial_probs, model.transition_matrix, ll, length=lengths[2])
    np.testing.assert_array_equal(model.viterbi(seq, length=lengths[2]), path)
    states, counts = model.sample(50, key=jax.random.key(0))
    assert states.shape == (50,) and counts.shape == (50, 1)
    z = model.sample_posterior(seq, length=lengths[2], key=jax.random.key(1))
    assert z.shape == (seq.shape[0],)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gaussian_m_step_with_frozen_means_is_exact(covariance_type):
    rng = np.random.default_rng(6)
    y = rng.standard_normal((60, 2)) @ np.array([[1.0, 0.4], [0.0, 0.7]]) + 1.0
    w = rng.dirichlet(np.ones(3), size=60)
    means = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    covs = np.stack([np.eye(2)] * 3) if covariance_type == "full" else np.ones((3, 2))
    em = (ssmjax.GaussianEmissions if covariance_type == "full" else ssmjax.DiagonalGaussianEmissions)(jnp.asarray(means), jnp.asarray(covs), min_variance=0.0)
    stats = em.suff_stats(jnp.asarray(y), jnp.asarray(w))
    new = em.m_step_from_stats(stats, frozen={"means"})
    np.testing.assert_array_equal(new.means, means)
    for k in range(3):
        d = y - means[k]
        ref = (w[:, k, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w[:, k].sum()
        if covariance_type == "diag":
            ref = np.diag(np.diag(ref))
        np.testing.assert_allclose(new.covs[k], ref, rtol=1e-10, atol=1e-12)
    kept = em.m_step_from_stats(stats, frozen={"covs"})
    np.testing.assert_allclose(kept.covs, em.covs)
    np.testing.assert_allclose(kept.means, (w.T @ y) / w.sum(0)[:, None], rtol=1e-10)


@pytest.mark.parametrize("family", ["gaussian", "gaussian_diag", "categorical"])
def test_em_recovers_parameters_for_every_family(family):
    rng = np.random.default_rng(7)
    pi, a = np.array([0.5, 0.5]), np.array([[0.95, 0.05], [0.10, 0.90]])
    lengths = [300] * 8
    if family == "categorical":
        probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
        _, seqs = simulate(rng, pi, a, lambda r, k: r.choice(3, p=probs[k]), lengths)
        y = np.stack(seqs).astype(np.int64)
    else:
        means = np.array([[-2.0, 0.0], [2.0, 1.0]])
        _, seqs = simulate(rng, pi, a, lambda r, k: means[k] + 0.7 * r.standard_normal(2), lengths)
        y = np.stack(seqs)
    model = ssmjax.HMM.from_data(y, 2, family, key=jax.random.key(1))
    fitted, lls, _ = ssmjax.fit_em(model, y, max_iters=200, tol=1e-9)
    assert np.all(np.diff(np.asarray(lls)) >= -1e-10 * np.abs(np.asarray(lls[1:])))
    if family == "categorical":
        order = np.argsort(np.asarray(fitted.emissions.probs[:, 0]))[::-1]
        # ~1200 draws per state: standard error of a probability <= 0.015
        np.testing.assert_allclose(np.asarray(fitted.emissions.probs)[order], probs, atol=0.05)
    else:
        order = np.argsort(np.asarray(fitted.emissions.means[:, 0]))
        np.testing.assert_allclose(np.asarray(fitted.emissions.means)[order], means, atol=0.06)
        np.testing.assert_allclose(np.asarray(fitted.emissions.variances)[order], 0.49, atol=0.05)
    np.testing.assert_allclose(np.asarray(fitted.transition_matrix)[np.ix_(order, order)], a, atol=0.03)


def test_state_without_responsibility_produces_no_nan():
    rng = np.random.default_rng(8)
    y = rng.poisson(5.0, size=(3, 100, 1)).astype(float)
    model = ssmjax.HMM(jnp.array([0.5, 0.5 - 1e-300, 1e-300]), jnp.full((3, 3), 1 / 3),
                       ssmjax.PoissonEmissions(rates=jnp.array([[4.0], [6.0], [1e6]])))
    fitted, lls, _ = ssmjax.fit_em(model, y, max_iters=20)
    assert np.all(np.isfinite(lls))
    assert np.all(np.isfinite(np.asarray(fitted.emissions.rates)))
    np.testing.assert_allclose(fitted.emissions.rates[2, 0], 1e6)  # kept, not NaN
    assert np.all(np.isfinite(np.asarray(fitted.transition_matrix)))


def test_gaussian_covariances_stay_positive_definite_when_a_state_collapses():
    rng = np.random.default_rng(9)
    y = np.concatenate([rng.standard_normal((1, 150, 2)), np.full((1, 50, 2), 3.0)], axis=1)  # a point mass
    model = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.1, 0.9]]),
                       ssmjax.GaussianEmissions(jnp.array([[0.0, 0.0], [3.0, 3.0]]), jnp.stack([jnp.eye(2)] * 2)))
    fitted, lls, _ = ssmjax.fit_em(model, y, max_iters=30)
    assert np.all(np.isfinite(lls))
    eig = np.linalg.eigvalsh(np.asarray(fitted.emissions.covs))
    assert np.all(eig > 0) and eig.min() >= 0.5 * fitted.emissions.min_variance


def test_categorical_emissions_must_be_integer_symbols():
    model = start_model(ssmjax.CategoricalEmissions(jnp.full((3, 4), 0.25)))
    with pytest.raises(ValueError, match="emissions"):
        ssmjax.fit_em(model, np.zeros((2, 5)) + 0.5)


@pytest.mark.parametrize("num_states", [3, 20])  # fused state products and matrix products
def test_batch_smoother_stats_equal_per_sequence_smoothers(num_states):
    """All sequences advanced together (state-major) == hmm_smoother per sequence, ragged, with
    structural zeros and garbage in the padding."""
    from ssmjax._hmm.rules import batch_smoother_stats as _batch_smoother_stats

    rng = np.random.default_rng(11)
    lengths = np.array([9, 1, 14, 5, 14])
    num_seq, num_timesteps = len(lengths), int(lengths.max())
    trans = rng.dirichlet(np.ones(num_states), size=num_states)
    trans[0, 1] = 0.0
    trans /= trans.sum(axis=1, keepdims=True)
    pi = rng.dirichlet(np.ones(num_states))
    pi[1] = 0.0
    pi /= pi.sum()
    lls = rng.normal(size=(num_seq, num_timesteps, num_states)) * 3.0
    for b, n in enumerate(lengths):
        lls[b, n:] = np.nan
    pi, trans, lls = (jnp.asarray(x, jnp.float64) for x in (pi, trans, lls))
    n = jnp.asarray(lengths, jnp.int32)
    valid = jnp.arange(num_timesteps)[:, None] < n[None, :]
    smoothed, expected, loglik = jax.jit(_batch_smoother_stats)(pi, trans, jnp.transpose(lls, (1, 2, 0)), valid)
    assert smoothed.shape == (num_timesteps, num_seq, num_states)
    want_expected = np.zeros((num_states, num_states))
    want_loglik = 0.0
    for b, length in enumerate(lengths):
        post = ssmjax.hmm_smoother(pi, trans, lls[b], length=int(length))
        assert_allclose(smoothed[:length, b], post.smoothed_probs[:length], dtype=np.float64)
        np.testing.assert_array_equal(np.asarray(smoothed[length:, b]), 0.0)
        want_expected += np.asarray(post.expected_transitions)
        want_loglik += float(post.marginal_loglik)
    assert_allclose(expected, want_expected, dtype=np.float64)
    assert_allclose(loglik, want_loglik, dtype=np.float64)


def _gaussian_batch(dtype, underflow):
    """A ragged NaN-padded Gaussian batch; with ``underflow`` its forward pass underflows."""
    rng = np.random.default_rng(3)
    lengths = np.array([7, 12, 3, 12])
    means = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    _, seqs = simulate(rng, PI, A, lambda r, k: means[k] + r.standard_normal(2), lengths)
    y = pad(seqs)
    pi, trans = PI, A
    if underflow:
        # state 2 is unreachable, yet at steps 2.. of sequence 1 thousands of nats likelier than states 0 and 1
        pi = np.array([0.6, 0.4, 0.0])
        trans = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.3, 0.3, 0.4]])
        y[1, 2 : lengths[1]] = means[2] * 400.0
    covs = np.stack([np.eye(2)] * 3)
    model = ssmjax.HMM(jnp.asarray(pi, dtype), jnp.asarray(trans, dtype),
                       ssmjax.GaussianEmissions(jnp.asarray(means, dtype), jnp.asarray(covs, dtype)))
    return model, jnp.asarray(y, dtype), jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("underflow", [False, True])
def test_batched_e_step_equals_sum_of_per_sequence_e_steps(dtype, underflow):
    """Ragged NaN-padded batch; with ``underflow`` one sequence needs the robust forward pass."""
    model, y, n = _gaussian_batch(dtype, underflow)
    lengths = np.asarray(n)

    def batched(m, y, n):
        return m._batched_e_step(m._prepare_batch(y, n, None))

    stats, ll = jax.jit(batched)(model, y, n)
    e_step = jax.jit(lambda m, y, n: m._e_step(y, n, None))
    per_seq = [e_step(model, y[b], n[b]) for b in range(len(lengths))]
    ref_stats = jax.tree.map(lambda *s: sum(s), *[s for s, _ in per_seq])
    assert np.isfinite(float(ll))
    assert_allclose(ll, sum(float(l) for _, l in per_seq), dtype=dtype)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
        assert_allclose(got, want, dtype=dtype)


def test_fast_e_step_leaves_out_the_fallback_and_flags_underflow():
    """Traced with fast_e_step (fit_em's first program), the batched E-step has no log-space
    pass: an underflow gives a NaN log-likelihood (a retry), never a wrong finite one."""
    from ssmjax._fit.protocol import tracing_fast_e_step

    def run(model, y, n, fast):
        with tracing_fast_e_step(fast):
            return jax.jit(lambda m, y, n: m._batched_e_step(m._prepare_batch(y, n, None))[1])(model, y, n)

    for underflow in (False, True):
        model, y, n = _gaussian_batch(np.float64, underflow)
        exact = float(run(model, y, n, False))
        assert np.isfinite(exact)
        if underflow:
            assert np.isnan(float(run(model, y, n, True)))
        else:
            assert float(run(model, y, n, True)) == exact


def test_fit_em_redoes_an_underflowing_iteration_with_the_exact_program():
    """Real underflow at the first E-step: fit_em (fast program, then the exact one from
    that iteration) equals the always-exact restarts loop started from the same model."""
    model, y, n = _gaussian_batch(np.float64, True)
    fitted, lls, _ = ssmjax.fit_em(model, y, lengths=n, max_iters=6, tol=0.0)
    stacked = jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, model)
    best, _, histories = ssmjax.fit_em_restarts(stacked, y, lengths=n, max_iters=6, tol=0.0)
    assert np.all(np.isfinite(np.asarray(lls))) and len(lls) == 6
    assert_allclose(lls, histories[0], dtype=np.float64)
    for got, want in zip(jax.tree.leaves(eqx.filter(fitted, eqx.is_array)), jax.tree.leaves(eqx.filter(best, eqx.is_array))):
        assert_allclose(got, want, dtype=np.float64)


def _flaky_fast_hmm(threshold):
    """A test model: under fast_e_step its E-step reports a retry once the log-likelihood
    passes ``threshold`` (as an underflow would); its exact E-step is the HMM's."""
    from ssmjax._fit.protocol import fast_e_step

    class FlakyFastHMM(ssmjax.HMM):
        def _batched_e_step(self, batch):
            stats, ll = super()._batched_e_step(batch)
            if fast_e_step():
                ll = jnp.where(ll > threshold, jnp.nan, ll)
            return stats, ll

    return FlakyFastHMM


def test_fit_em_retry_mid_run_continues_exactly_where_the_fast_program_stopped():
    from ssmjax._fit import em as em_module

    rng = np.random.default_rng(4)
    means = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    _, seqs = simulate(rng, PI, A, lambda r, k: means[k] + r.standard_normal(2), LENGTHS)
    y = jnp.asarray(pad(seqs))
    start = ssmjax.HMM.from_data(y, 3, "gaussian", lengths=jnp.asarray(LENGTHS), key=jax.random.key(0))
    lls0 = np.asarray(ssmjax.fit_em(start, y, lengths=jnp.asarray(LENGTHS), max_iters=8, tol=0.0)[1])
    rel = np.abs(np.diff(lls0)) / np.abs(lls0[:-1])  # rel[i - 1]: relative improvement of iteration i
    assert rel[2] < rel[1] and rel[2] < rel[0]
    tol = float(np.sqrt(rel[1] * rel[2]))  # the run converges at iteration 3, judged against iteration 2
    plain, plain_lls, plain_info = ssmjax.fit_em(start, y, lengths=jnp.asarray(LENGTHS), max_iters=8, tol=tol)
    assert (plain_info.num_iters, plain_info.status) == (4, "converged")
    # a retry at iteration 3: the exact program redoes it with the state the fast one left
    threshold = 0.5 * float(plain_lls[2] + plain_lls[3])
    flaky = _flaky_fast_hmm(threshold)(start.initial_probs, start.transition_matrix, start.emissions)
    args = em_module._prepare(flaky, y, jnp.asarray(LENGTHS), None, 8, tol, ())
    emissions, lengths, inputs, max_iters, frozen, observed = args
    fast_run = em_module._em_compiled(flaky, emissions, lengths, inputs, np.asarray(tol), max_iters, frozen, False,
                                      observed, True, None, None)
    assert int(fast_run.status) == em_module._RETRY and int(fast_run.it) == 4  # stopped after iteration 3
    fitted, lls, info = ssmjax.fit_em(flaky, y, lengths=jnp.asarray(LENGTHS), max_iters=8, tol=tol)
    assert (info.num_iters, info.status) == (plain_info.num_iters, plain_info.status)
    assert_allclose(lls, plain_lls, dtype=np.float64)
    for got, want in zip(jax.tree.leaves(eqx.filter(fitted, eqx.is_array)), jax.tree.leaves(eqx.filter(plain, eqx.is_array))):
        assert_allclose(got, want, dtype=np.float64)
