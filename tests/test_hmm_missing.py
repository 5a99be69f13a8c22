"""Missing observations in HMM emissions: NaN entries drop out of the likelihood and of EM's statistics.

Oracles: scipy log-densities of the observed entries only (the marginal of the observed block
for the full Gaussian), enumeration of every state path with the missing terms dropped by hand,
NumPy M-steps over the observed entries, and, for the full Gaussian, NumPy conditional moments
(``np.ix_`` on each step's observed block) and the stationarity of the observed-data likelihood
at EM's fixed point.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats as st
from helpers import assert_allclose, gaussian_conditional_moments, random_stochastic_matrix

import ssmjax

FAMILIES = ["categorical", "poisson", "gaussian_full", "gaussian_diag"]
K = 3


def _spd(rng, k, d):
    m = rng.normal(size=(k, d, d))
    return m @ np.swapaxes(m, -1, -2) + d * np.eye(d)


def _model(rng, name, dim=3):
    if name == "categorical":
        return ssmjax.CategoricalEmissions(probs=jnp.asarray(random_stochastic_matrix(rng, (K, 4))))
    if name == "poisson":
        return ssmjax.PoissonEmissions(rates=jnp.asarray(rng.uniform(0.5, 6.0, size=(K, dim))))
    means = jnp.asarray(rng.normal(size=(K, dim)) * 2.0)
    if name == "gaussian_full":
        return ssmjax.GaussianEmissions(means, jnp.asarray(_spd(rng, K, dim)))
    return ssmjax.DiagonalGaussianEmissions(means, jnp.asarray(rng.uniform(0.5, 2.0, size=(K, dim))))


def _draw(rng, name, n, dim=3, missing=0.3):
    """``n`` emissions with about ``missing`` of the entries NaN, and at least one fully missing step."""
    if name == "categorical":
        y = rng.integers(0, 4, size=n).astype(float)
    elif name == "poisson":
        y = rng.poisson(3.0, size=(n, dim)).astype(float)
    else:
        y = rng.normal(size=(n, dim)) * 2.0
    y[rng.random(y.shape) < missing] = np.nan
    y[min(1, n - 1)] = np.nan
    return y


def _oracle_log_prob(name, model, y):
    """Per-state log-density of the observed entries of one step, by scipy on the observed block."""
    y = np.atleast_1d(np.asarray(y, np.float64))
    obs = ~np.isnan(y)
    if not obs.any():
        return np.zeros(K)
    if name == "categorical":
        return np.log(np.asarray(model.probs, np.float64))[:, int(y[0])]
    if name == "poisson":
        return st.poisson.logpmf(y[obs][None, :], np.asarray(model.rates, np.float64)[:, obs]).sum(-1)
    means, covs = np.asarray(model.means, np.float64), np.asarray(model.covs, np.float64)
    return np.array([st.multivariate_normal(means[k][obs], covs[k][np.ix_(obs, obs)]).logpdf(y[obs]) for k in range(K)])


def _enumerate(pi, A, lls):
    """``(loglik, smoothed (T, K))`` by summing over every state path."""
    T = lls.shape[0]
    paths = np.array(list(itertools.product(range(K), repeat=T)))
    logj = np.log(pi)[paths[:, 0]] + lls[0, paths[:, 0]]
    for t in range(1, T):
        logj = logj + np.log(A)[paths[:, t - 1], paths[:, t]] + lls[t, paths[:, t]]
    top = logj.max()
    w = np.exp(logj - top)
    post = w / w.sum()
    smoothed = np.stack([np.bincount(paths[:, t], weights=post, minlength=K) for t in range(T)])
    return top + np.log(w.sum()), smoothed


# --------------------------------------------------------------------------- log-densities


@pytest.mark.parametrize("name", FAMILIES)
def test_log_likelihoods_are_those_of_the_observed_entries(name):
    rng = np.random.default_rng(0)
    model = _model(rng, name)
    ys = _draw(rng, name, 12)
    want = np.stack([_oracle_log_prob(name, model, y) for y in ys])
    assert_allclose(model.log_likelihoods(ys), want)
    assert_allclose(jax.jit(lambda m, y: m.log_likelihoods(y))(model, jnp.asarray(ys)), want)
    np.testing.assert_array_equal(np.asarray(model.log_likelihoods(ys))[1], 0.0)  # fully missing step
    # one step at a time, and the observed-data formula on steps without NaN
    assert_allclose(jax.vmap(model.log_prob)(jnp.asarray(ys)), want)
    full_rows = ~np.isnan(ys.reshape(len(ys), -1)).any(axis=1)
    assert_allclose(model.log_likelihoods(ys[full_rows]), want[full_rows])


@pytest.mark.parametrize("name", FAMILIES + ["gaussian_full_d10"])
def test_time_major_batch_with_missing_entries_and_padding(name):
    """The EM E-step's (T, K, B) log-likelihoods: observed entries only at real steps, 0 at padded
    ones, whatever the padding holds. D = 10 takes the generic path of the full Gaussian."""
    rng = np.random.default_rng(1)
    dim = 10 if name.endswith("d10") else 3
    family = "gaussian_full" if name.startswith("gaussian_full") else name
    model = _model(rng, family, dim)
    lengths = np.array([6, 2, 5])
    ys = np.stack([_draw(rng, family, 6, dim) for _ in lengths], axis=1)  # (T, B, ...)
    valid = np.arange(6)[:, None] < lengths[None, :]
    garbage = ys.copy()
    garbage[~valid] = np.inf
    got = jax.jit(lambda m, y, v: m._time_major_log_likelihoods(y, v))(model, jnp.asarray(garbage), jnp.asarray(valid))
    for b, n in enumerate(lengths):
        want = np.stack([_oracle_log_prob(family, model, ys[t, b]) for t in range(n)])
        assert_allclose(got[:n, :, b], want)
        np.testing.assert_array_equal(np.asarray(got[n:, :, b]), 0.0)


def test_float32_marginal_of_the_observed_block_is_accurate():
    rng = np.random.default_rng(2)
    model64 = _model(rng, "gaussian_full", 4)
    ys = _draw(rng, "gaussian_full", 20, 4)
    model32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), model64)
    got = model32.log_likelihoods(jnp.asarray(ys, jnp.float32))
    assert got.dtype == jnp.float32
    assert_allclose(got, np.stack([_oracle_log_prob("gaussian_full", model64, y) for y in ys]), dtype=np.float32)


def test_gradients_through_missing_entries_are_finite_and_ignore_them():
    rng = np.random.default_rng(3)
    for name in ("poisson", "gaussian_full", "gaussian_diag"):
        model = _model(rng, name)
        ys = _draw(rng, name, 10)
        grad = jax.grad(lambda m, y: jnp.sum(m.log_likelihoods(y)))(model, jnp.asarray(ys))
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
        # a fully missing step adds nothing to the gradient
        more = np.concatenate([ys, np.full((3,) + ys.shape[1:], np.nan)])
        grad_more = jax.grad(lambda m, y: jnp.sum(m.log_likelihoods(y)))(model, jnp.asarray(more))
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_more)):
            assert_allclose(a, b)


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("name", FAMILIES)
def test_posteriors_equal_enumeration_with_missing_terms_dropped(name):
    rng = np.random.default_rng(4)
    pi = rng.dirichlet(np.ones(K))
    A = random_stochastic_matrix(rng, (K, K))
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), _model(rng, name))
    ys = _draw(rng, name, 6)
    lls = np.stack([_oracle_log_prob(name, hmm.emissions, y) for y in ys])
    loglik, smoothed = _enumerate(pi, A, lls)
    assert_allclose(hmm.marginal_loglik(ys), loglik)
    assert_allclose(hmm.smoother(ys).smoothed_probs, smoothed)
    # padding after missing entries: garbage beyond `length` changes nothing
    padded = np.concatenate([ys, np.full((3,) + ys.shape[1:], 7.0)])
    assert_allclose(hmm.marginal_loglik(padded, length=6), loglik)
    assert_allclose(hmm.smoother(padded, length=6).smoothed_probs[:6], smoothed)
    # a vmapped batch mixing complete and incomplete sequences
    complete = np.where(np.isnan(ys), 1.0, ys)
    batch = jnp.asarray(np.stack([ys, complete]))
    got = jax.jit(jax.vmap(hmm.marginal_loglik))(batch)
    want_complete = _enumerate(pi, A, np.stack([_oracle_log_prob(name, hmm.emissions, y) for y in complete]))[0]
    assert_allclose(got, [loglik, want_complete])


# --------------------------------------------------------------------------- statistics and M-step


def _numpy_factorised_m_step(name, model, ys, w):
    """Weighted MLE of each (state, dimension) over the steps where that dimension is observed."""
    obs = ~np.isnan(ys)
    y0 = np.where(obs, ys, 0.0)
    if name == "categorical":
        counts = np.stack([(w[:, k][:, None] * (np.arange(4)[None, :] == y0[:, None]) * obs[:, None]).sum(0) for k in range(K)])
        return counts / counts.sum(1, keepdims=True)
    wd = w.T @ obs  # (K, D)
    mean = (w.T @ y0) / wd
    if name == "poisson":
        return mean
    second = (w.T @ (y0**2)) / wd
    return mean, second - mean**2 + model.min_variance


def _numpy_full_m_step(model, ys, w):
    """Exact EM for the observed entries: conditional moments of the missing block, step by step."""
    means, covs = np.asarray(model.means, np.float64), np.asarray(model.covs, np.float64)
    dim = means.shape[1]
    s1 = np.zeros((K, dim))
    s2 = np.zeros((K, dim, dim))
    for y, wn in zip(ys, w):
        for k, (ey, cov) in enumerate(gaussian_conditional_moments(means, covs, y)):
            s1[k] += wn[k] * ey
            s2[k] += wn[k] * (np.outer(ey, ey) + cov)
    total = w.sum(0)
    new_means = s1 / total[:, None]
    new_covs = s2 / total[:, None, None] - np.einsum("kd,ke->kde", new_means, new_means)
    return new_means, new_covs + model.min_variance * np.eye(dim)


@pytest.mark.parametrize("name", FAMILIES)
def test_m_step_leaves_out_exactly_what_is_missing(name):
    rng = np.random.default_rng(5)
    model = _model(rng, name)
    n = 60
    ys = _draw(rng, name, n)
    w = rng.dirichlet(np.ones(K), size=n)
    mask = rng.random(n) < 0.8
    garbage = ys.copy()
    garbage[~mask] = 1.0
    new = model.m_step(jnp.asarray(garbage), jnp.asarray(w), jnp.asarray(mask))
    jitted = jax.jit(lambda m, y, w, k: m.m_step(y, w, k))(model, jnp.asarray(garbage), jnp.asarray(w), jnp.asarray(mask))
    for got in (new, jitted):
        if name == "gaussian_full":
            want_means, want_covs = _numpy_full_m_step(model, ys[mask], w[mask])
            assert_allclose(got.means, want_means)
            assert_allclose(got.covs, want_covs)
        elif name.startswith("gaussian"):
            want_means, want_vars = _numpy_factorised_m_step(name, model, ys[mask], w[mask])
            assert_allclose(got.means, want_means)
            assert_allclose(got.variances, want_vars)
        elif name == "poisson":
            assert_allclose(got.rates, _numpy_factorised_m_step(name, model, ys[mask], w[mask]))
        else:
            assert_allclose(got.probs, _numpy_factorised_m_step(name, model, ys[mask], w[mask]))


@pytest.mark.parametrize("name", ["poisson", "gaussian_diag"])
def test_a_dimension_never_observed_in_a_state_keeps_its_parameters(name):
    rng = np.random.default_rng(6)
    model = _model(rng, name)
    ys = _draw(rng, name, 30, missing=0.0)
    ys[:, 2] = np.nan  # dimension 2 is never observed
    new = model.m_step(jnp.asarray(ys), jnp.asarray(rng.dirichlet(np.ones(K), size=30)))
    for got, old in zip(jax.tree.leaves(new), jax.tree.leaves(model)):
        np.testing.assert_array_equal(np.asarray(got)[:, 2], np.asarray(old)[:, 2])
        assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_e_step_with_missing_and_padding_equals_per_sequence_e_steps(name):
    """fit_em's batched E-step over a ragged batch with NaN at real steps and garbage in the
    padding: the sum of the per-sequence E-steps, and the summed enumeration log-likelihood."""
    rng = np.random.default_rng(7)
    pi = rng.dirichlet(np.ones(K))
    A = random_stochastic_matrix(rng, (K, K))
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), _model(rng, name))
    lengths = np.array([5, 3, 6])
    ys = np.stack([_draw(rng, name, 6) for _ in lengths])
    for b, n in enumerate(lengths):
        ys[b, n:] = 2.0  # valid-looking garbage: it must be ignored all the same
    emissions, lens, _ = hmm._check_batch(jnp.asarray(ys), jnp.asarray(lengths), None)
    stats, loglik = jax.jit(lambda m, y, n: m._batched_e_step(m._prepare_batch(y, n, None)))(hmm, emissions, lens)
    per_seq = [hmm._e_step(emissions[b], lens[b], None) for b in range(len(lengths))]
    want_stats = jax.tree.map(lambda *s: sum(s), *[s for s, _ in per_seq])
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
        assert_allclose(got, want)
    want_ll = sum(
        _enumerate(pi, A, np.stack([_oracle_log_prob(name, hmm.emissions, y) for y in ys[b, :n]]))[0]
        for b, n in enumerate(lengths)
    )
    assert_allclose(loglik, want_ll)


# --------------------------------------------------------------------------- fitting


def test_em_with_missing_entries_climbs_to_a_stationary_point_of_the_observed_likelihood():
    """Full-covariance Gaussian HMM, 25% of entries missing: EM's log-likelihoods never decrease,
    and at its fixed point the gradient of the observed-data log-likelihood vanishes."""
    rng = np.random.default_rng(8)
    true = ssmjax.HMM(
        jnp.asarray([0.5, 0.5]), jnp.asarray([[0.9, 0.1], [0.2, 0.8]]),
        ssmjax.GaussianEmissions(jnp.asarray([[-2.0, 0.0], [2.0, 1.0]]), jnp.asarray([[[1.0, 0.6], [0.6, 1.0]]] * 2)),
    )
    keys = jax.random.split(jax.random.key(0), 6)
    ys = np.stack([np.asarray(true.sample(80, key=k)[1]) for k in keys])
    ys[rng.random(ys.shape) < 0.25] = np.nan
    start = ssmjax.HMM.from_data(ys, 2, "gaussian", key=jax.random.key(1))
    fitted, lls, info = ssmjax.fit_em(start, ys, max_iters=400, tol=1e-13)
    lls = np.asarray(lls)[: info.num_iters]
    assert np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))
    assert lls[-1] > lls[0] + 10.0

    def total(emissions_model, hmm):
        m = ssmjax.HMM(hmm.initial_probs, hmm.transition_matrix, emissions_model)
        return sum(m.marginal_loglik(jnp.asarray(y)) for y in ys)

    g_start = jax.grad(total)(start.emissions, start)
    g_end = jax.grad(total)(fitted.emissions, fitted)
    for a, b in zip(jax.tree.leaves(g_end), jax.tree.leaves(g_start)):
        assert np.max(np.abs(np.asarray(a))) < 1e-4 * max(np.max(np.abs(np.asarray(b))), 1.0)


@pytest.mark.parametrize("emissions_type", ["poisson", "gaussian", "gaussian_diag", "categorical"])
def test_fit_em_and_fit_sgd_run_on_data_with_missing_entries(emissions_type):
    rng = np.random.default_rng(9)
    name = {"gaussian": "gaussian_full"}.get(emissions_type, emissions_type)
    ys = np.stack([_draw(rng, name, 40, missing=0.2) for _ in range(4)])
    model = ssmjax.HMM.from_data(ys, K, emissions_type, key=jax.random.key(0), num_classes=4 if name == "categorical" else None)
    fitted, lls, info = ssmjax.fit_em(model, ys, max_iters=20)
    lls = np.asarray(lls)[: info.num_iters]
    assert np.all(np.isfinite(lls)) and np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))
    sgd, losses = ssmjax.fit_sgd(model, ys, optax.adam(0.01), num_steps=5)
    assert np.all(np.isfinite(np.asarray(losses)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(sgd) if jnp.issubdtype(x.dtype, jnp.floating))


# --------------------------------------------------------------------------- errors


def test_infinite_entries_are_errors_that_name_the_argument():
    rng = np.random.default_rng(10)
    for name in FAMILIES:
        model = _model(rng, name)
        ys = _draw(rng, name, 4)
        ys[0] = np.inf
        with pytest.raises(ValueError, match="`emissions`"):
            model.log_likelihoods(ys)
    with pytest.raises(ValueError, match="observed .* in every dimension"):
        ssmjax.PoissonEmissions.from_data(np.array([[1.0, np.nan], [2.0, np.nan]]), 2)
    with pytest.raises(ValueError, match="observed .* in every dimension"):
        ssmjax.GaussianEmissions.from_data(np.array([[1.0, np.nan], [2.0, np.nan]]), 2, key=jax.random.key(0))


# --------------------------------------------------------------------------- partial labels


def test_known_states_condition_inference_and_em_exactly():
    """Labels at some steps (-1 or NaN elsewhere), joined by ProductEmissions: the posterior,
    log-likelihood and EM statistics are those of the enumeration restricted to the paths
    through the labels, with missing entries in the data as well."""
    rng = np.random.default_rng(11)
    pi = rng.dirichlet(np.ones(K))
    A = random_stochastic_matrix(rng, (K, K))
    data_model = _model(rng, "gaussian_diag")
    emissions = ssmjax.ProductEmissions(ssmjax.KnownStateEmissions(K), data_model)
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), emissions)
    ys = _draw(rng, "gaussian_diag", 6)
    labels = np.array([-1.0, 2.0, np.nan, -1.0, 0.0, -1.0])
    batch = np.column_stack([labels, ys])
    lls = np.stack([_oracle_log_prob("gaussian_diag", data_model, y) for y in ys])
    allowed = np.where((labels[:, None] < 0) | np.isnan(labels[:, None]) | (np.arange(K)[None] == labels[:, None]), 0.0, -np.inf)
    loglik, smoothed = _enumerate(pi, A, lls + allowed)
    assert_allclose(hmm.marginal_loglik(batch), loglik)
    post = hmm.smoother(batch).smoothed_probs
    assert_allclose(post, smoothed)
    np.testing.assert_array_equal(np.asarray(post)[[1, 4]].argmax(1), [2, 0])
    path = np.asarray(hmm.viterbi(batch))
    assert path[1] == 2 and path[4] == 0
    # EM: the batched E-step's statistics are the restricted posterior's
    emissions_b, lens, _ = hmm._check_batch(jnp.asarray(batch[None]), None, None)
    stats, ll = hmm._batched_e_step(hmm._prepare_batch(emissions_b, lens, None))
    assert_allclose(ll, loglik)
    assert_allclose(stats["initial"], smoothed[0])
    fitted, lls_em, info = ssmjax.fit_em(hmm, batch[None], max_iters=5, tol=0.0)
    assert np.all(np.diff(np.asarray(lls_em)) >= -1e-9 * np.abs(np.asarray(lls_em)[1:]))
    assert hmm.num_parameters() == (K - 1) + K * (K - 1) + 2 * K * 3  # the labels add no parameter
    with pytest.raises(ValueError, match="known states must be states in"):
        hmm.marginal_loglik(np.column_stack([np.full(6, 3.0), ys]))
