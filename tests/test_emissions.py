"""Emission families: log-densities vs scipy, M-steps vs numpy and hmmlearn, recovery, errors, user subclasses."""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from helpers import assert_allclose, random_stochastic_matrix

import ssmjax

# --------------------------------------------------------------------------- fixtures


def _spd(rng, k, d):
    m = rng.normal(size=(k, d, d))
    return m @ np.swapaxes(m, -1, -2) + d * np.eye(d)


def _models(rng):
    k = 3
    return {
        "categorical": ssmjax.CategoricalEmissions(probs=jnp.asarray(random_stochastic_matrix(rng, (k, 4)))),
        "poisson": ssmjax.PoissonEmissions(rates=jnp.asarray(rng.uniform(0.5, 8.0, size=(k, 2)))),
        "gaussian_full": ssmjax.GaussianEmissions(
            means=jnp.asarray(rng.normal(size=(k, 2))), covs=jnp.asarray(_spd(rng, k, 2))
        ),
        "gaussian_diag": ssmjax.DiagonalGaussianEmissions(
            means=jnp.asarray(rng.normal(size=(k, 2))), variances=jnp.asarray(rng.uniform(0.5, 2.0, size=(k, 2)))
        ),
    }


def _oracle_log_prob(name, model, y):
    """Independent per-state log-densities from scipy (or direct indexing for categorical)."""
    if name == "categorical":
        return np.log(np.asarray(model.probs))[:, int(y)]
    if name == "poisson":
        return st.poisson.logpmf(np.asarray(y)[None, :], np.asarray(model.rates)).sum(-1)
    covs = np.asarray(model.covs, np.float64)
    means = np.asarray(model.means, np.float64)
    return np.array([st.multivariate_normal(means[k], covs[k]).logpdf(y) for k in range(3)])


def _draw(rng, name, n):
    if name == "categorical":
        return rng.integers(0, 4, size=n)
    if name == "poisson":
        return rng.poisson(3.0, size=(n, 2))
    return rng.normal(size=(n, 2)) * 1.5


# --------------------------------------------------------------------------- log densities


@pytest.mark.parametrize("name", ["categorical", "poisson", "gaussian_full", "gaussian_diag"])
def test_log_likelihoods_match_scipy(name):
    rng = np.random.default_rng(0)
    model = _models(rng)[name]
    ys = _draw(rng, name, 6)
    lls = model.log_likelihoods(jnp.asarray(ys))
    assert lls.shape == (6, 3)
    assert_allclose(lls, np.stack([_oracle_log_prob(name, model, y) for y in ys]))
    assert_allclose(model.log_prob(jnp.asarray(ys[2])), _oracle_log_prob(name, model, ys[2]))


@pytest.mark.parametrize("name", ["categorical", "poisson", "gaussian_full", "gaussian_diag"])
def test_log_likelihoods_length_ignores_padding(name):
    rng = np.random.default_rng(1)
    model = _models(rng)[name]
    ys = _draw(rng, name, 7)
    garbage = ys.copy()
    garbage[4:] = -3  # invalid for categorical and Poisson; ignored as padding
    full = model.log_likelihoods(jnp.asarray(ys))
    padded = jax.jit(lambda y: model.log_likelihoods(y, length=4))(jnp.asarray(garbage))
    assert_allclose(padded[:4], full[:4])
    np.testing.assert_array_equal(padded[4:], 0.0)


@pytest.mark.parametrize(
    "name", ["categorical", "poisson", "gaussian_full", "gaussian_diag", "gaussian_full_d6", "gaussian_full_d10"]
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_time_major_batch_log_likelihoods_match_scipy(name, dtype):
    """The EM E-step's state-major (T, K, B) log-likelihoods of a ragged batch, garbage in the
    padding: scipy at real steps, 0 at padded ones. Gaussians up to D = 8 use unrolled
    elementwise whitening, D = 10 the generic per-step path."""
    rng = np.random.default_rng(7)
    if name.startswith("gaussian_full_d"):
        dim = int(name.rsplit("d", 1)[1])
        model = ssmjax.GaussianEmissions(
            means=jnp.asarray(rng.normal(size=(3, dim)) + 20.0), covs=jnp.asarray(_spd(rng, 3, dim))
        )
        draw = lambda n: rng.normal(size=(n, dim)) * 2.0 + 20.0  # noqa: E731 - offset data
        family = "gaussian_full"
    else:
        model = _models(rng)[name]
        draw = lambda n: _draw(rng, name, n)  # noqa: E731
        family = name
    model = jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, model)
    lengths = np.array([5, 2, 7])
    num_steps = int(lengths.max())
    ys = np.stack([draw(num_steps) for _ in lengths], axis=1)  # (T, B, ...)
    valid = np.arange(num_steps)[:, None] < lengths[None, :]
    garbage = ys.astype(np.float64) if family.startswith("gaussian") else ys.copy()
    garbage[~valid] = np.nan if family.startswith("gaussian") else -3
    got = jax.jit(lambda m, y, v: m._time_major_log_likelihoods(y, v))(model, jnp.asarray(garbage), jnp.asarray(valid))
    assert got.shape == (num_steps, 3, len(lengths))
    assert got.dtype == dtype
    for b, n in enumerate(lengths):
        want = np.stack([_oracle_log_prob(family, model, ys[t, b]) for t in range(n)])
        assert_allclose(got[:n, :, b], want, dtype=dtype)
        np.testing.assert_array_equal(np.asarray(got[n:, :, b]), 0.0)


def test_float32_gaussian_log_prob_is_accurate():
    rng = np.random.default_rng(2)
    means = rng.normal(size=(3, 3))
    covs = _spd(rng, 3, 3)
    model = ssmjax.GaussianEmissions(jnp.asarray(means, jnp.float32), jnp.asarray(covs, jnp.float32))
    ys = rng.normal(size=(5, 3))
    lls = model.log_likelihoods(jnp.asarray(ys, jnp.float32))
    assert lls.dtype == jnp.float32
    oracle = np.stack([[st.multivariate_normal(means[k], covs[k]).logpdf(y) for k in range(3)] for y in ys])
    assert_allclose(lls, oracle, dtype=np.float32)


def test_categorical_structural_zeros_exact_minus_inf_no_nan():
    probs = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    model = ssmjax.CategoricalEmissions(probs=probs)
    lls = model.log_likelihoods(jnp.array([0, 2, 1]))
    expected = np.array([[np.log(0.5), -np.inf], [-np.inf, 0.0], [np.log(0.5), -np.inf]])
    np.testing.assert_array_equal(np.isneginf(lls), np.isneginf(expected))
    assert not np.any(np.isnan(lls))
    assert_allclose(np.where(np.isinf(expected), 0, lls), np.where(np.isinf(expected), 0, expected))
    np.testing.assert_array_equal(model.probs, probs)
    # gradient of a finite objective stays finite
    grad = jax.grad(lambda m: m.log_likelihoods(jnp.array([0, 1]))[:, 0].sum())(model)
    assert np.all(np.isfinite(grad.logits))


def test_poisson_zero_rate_convention():
    model = ssmjax.PoissonEmissions(rates=jnp.array([[0.0], [2.0]]))
    lls = model.log_likelihoods(jnp.array([[0], [3]]))
    assert float(lls[0, 0]) == 0.0 and float(lls[1, 0]) == -np.inf
    assert_allclose(lls[:, 1], st.poisson.logpmf([0, 3], 2.0))
    # float counts holding integers are accepted
    assert_allclose(model.log_likelihoods(jnp.array([[0.0], [3.0]])), lls)


# --------------------------------------------------------------------------- M-steps


def _numpy_weighted_mle(name, ys, w, old):
    """Direct weighted maximum-likelihood formulas (numpy), empty states keep ``old``."""
    tot = w.sum(0)
    if name == "categorical":
        counts = np.stack([np.bincount(ys, weights=w[:, k], minlength=4) for k in range(w.shape[1])])
        new = counts / np.where(tot > 0, tot, 1)[:, None]
        return np.where(tot[:, None] > 0, new, old)
    if name == "poisson":
        new = (w.T @ ys) / np.where(tot > 0, tot, 1)[:, None]
        return np.where(tot[:, None] > 0, new, old)
    means_old, covs_old, min_var = old
    means, covs = [], []
    for k in range(w.shape[1]):
        if tot[k] == 0:
            means.append(means_old[k])
            covs.append(covs_old[k])
            continue
        mu = (w[:, k] @ ys) / tot[k]
        diff = ys - mu
        cov = (w[:, k, None] * diff).T @ diff / tot[k]
        if name == "gaussian_diag":
            cov = np.diag(np.diag(cov))
        means.append(mu)
        covs.append(cov + min_var * np.eye(ys.shape[1]))
    return np.array(means), np.array(covs)


def _params(name, model):
    if name == "categorical":
        return model.probs
    if name == "poisson":
        return model.rates
    return model.means, model.covs


@pytest.mark.parametrize("name", ["categorical", "poisson", "gaussian_full", "gaussian_diag"])
def test_m_step_matches_numpy_with_mask_and_empty_state(name):
    rng = np.random.default_rng(3)
    model = _models(rng)[name]
    n = 40
    ys = _draw(rng, name, n)
    w = rng.dirichlet(np.ones(3), size=n)
    w[:, 1] = 0.0  # state 1 gets no responsibility: keeps its parameters
    mask = rng.random(n) < 0.7
    # padded steps hold garbage in emissions and weights
    ys_bad = ys.astype(float).copy() if name.startswith("gaussian") else ys.copy()
    ys_bad[~mask] = np.nan if name.startswith("gaussian") else -7
    w_bad = w.copy()
    w_bad[~mask] = np.nan
    new = model.m_step(jnp.asarray(ys_bad), jnp.asarray(w_bad), jnp.asarray(mask))
    old = _params(name, model)
    if name.startswith("gaussian"):
        old = (np.asarray(old[0]), np.asarray(old[1]), model.min_variance)
    expected = _numpy_weighted_mle(name, ys[mask], w[mask], old)
    got = _params(name, new)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert not np.any(np.isnan(g))
        assert_allclose(g, e)
    # the empty state kept its parameters exactly
    for g, o in zip(jax.tree.leaves(got), jax.tree.leaves(_params(name, model))):
        np.testing.assert_array_equal(np.asarray(g)[1], np.asarray(o)[1])
    assert type(new) is type(model)


@pytest.mark.parametrize("name", ["categorical", "poisson", "gaussian_full", "gaussian_diag"])
def test_suff_stats_add_across_batches(name):
    rng = np.random.default_rng(4)
    model = _models(rng)[name]
    ys = _draw(rng, name, 30)
    w = rng.dirichlet(np.ones(3), size=30)
    whole = model.suff_stats(jnp.asarray(ys), jnp.asarray(w))
    parts = [model.suff_stats(jnp.asarray(ys[a:b]), jnp.asarray(w[a:b])) for a, b in [(0, 7), (7, 19), (19, 30)]]
    summed = jax.tree.map(lambda *xs: sum(xs), *parts)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(summed)):
        assert_allclose(a, b)
    m1 = model.m_step_from_stats(summed)
    m2 = model.m_step(jnp.asarray(ys), jnp.asarray(w))
    for a, b in zip(jax.tree.leaves(_params(name, m1)), jax.tree.leaves(_params(name, m2))):
        assert_allclose(a, b)


def test_m_step_jits_and_stats_are_the_documented_namedtuples():
    rng = np.random.default_rng(5)
    model = _models(rng)["gaussian_full"]
    ys = jnp.asarray(_draw(rng, "gaussian_full", 20))
    w = jnp.asarray(rng.dirichlet(np.ones(3), size=20))
    stats = model.suff_stats(ys, w)
    assert stats.sum_weights.shape == (3,) and stats.weighted_sums.shape == (3, 2)
    assert stats.weighted_outer.shape == (3, 2, 2)
    jitted = eqx.filter_jit(lambda m, y, ww: m.m_step(y, ww))(model, ys, w)
    assert_allclose(jitted.covs, model.m_step(ys, w).covs)


def test_gaussian_m_step_keeps_covariances_positive_definite():
    # state 0 owns a single point, state 1 two coincident points: the ridge keeps them PD
    model = ssmjax.GaussianEmissions(jnp.zeros((2, 3)), jnp.broadcast_to(jnp.eye(3), (2, 3, 3)), min_variance=1e-4)
    ys = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    w = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    new = model.m_step(ys, w)
    assert_allclose(new.covs, np.broadcast_to(1e-4 * np.eye(3), (2, 3, 3)))
    assert np.all(np.isfinite(new.log_likelihoods(ys)))


# --------------------------------------------------------------------------- hmmlearn


def _brute_force_posteriors(pi, A, lls):
    """Smoothed marginals of one short sequence by enumerating every state path."""
    T, K = lls.shape
    post = np.zeros((T, K))
    for path in itertools.product(range(K), repeat=T):
        logp = np.log(pi[path[0]]) + lls[0, path[0]]
        for t in range(1, T):
            logp += np.log(A[path[t - 1], path[t]]) + lls[t, path[t]]
        post[np.arange(T), path] += np.exp(logp)
    return post / post.sum(1, keepdims=True)


@pytest.mark.parametrize("name", ["categorical", "poisson", "gaussian_full", "gaussian_diag"])
def test_m_step_equals_hmmlearn_one_iteration(name):
    hmm = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(6)
    k = 3
    model = _models(rng)[name]
    if name.startswith("gaussian"):  # hmmlearn applies no ridge when its priors are neutral
        kind = "full" if name == "gaussian_full" else "diag"
        family = (ssmjax.GaussianEmissions if kind == "full" else ssmjax.DiagonalGaussianEmissions)
        model = family(model.means, model.covs if kind == "full" else model.variances, min_variance=0.0)
    pi = rng.dirichlet(np.ones(k))
    A = random_stochastic_matrix(rng, (k, k))
    lengths = [5, 6, 4]
    ys = _draw(rng, name, sum(lengths))
    # our E-step: brute force over paths, per sequence
    lls = np.asarray(model.log_likelihoods(jnp.asarray(ys)))
    bounds = np.cumsum([0] + lengths)
    post = np.concatenate([_brute_force_posteriors(pi, A, lls[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    ours = model.m_step(jnp.asarray(ys), jnp.asarray(post))

    common = dict(n_components=k, n_iter=1, init_params="", tol=-np.inf)
    if name == "categorical":
        peer = hmm.CategoricalHMM(n_features=4, params="e", emissionprob_prior=1.0, **common)
        peer.emissionprob_ = np.asarray(model.probs)
        X = ys[:, None]
    elif name == "poisson":
        peer = hmm.PoissonHMM(params="l", lambdas_prior=0.0, lambdas_weight=0.0, **common)
        peer.lambdas_ = np.asarray(model.rates)
        X = ys
    else:
        peer = hmm.GaussianHMM(
            covariance_type=kind, params="mc", means_prior=0.0, means_weight=0.0,
            covars_prior=0.0, covars_weight=1.0, min_covar=0.0, **common,
        )
        peer.means_ = np.asarray(model.means)
        peer.covars_ = np.asarray(model.covs if kind == "full" else model.variances)
        X = ys
    peer.startprob_ = pi
    peer.transmat_ = A
    peer.fit(X, lengths)

    if name == "categorical":
        assert_allclose(ours.probs, peer.emissionprob_, rtol=1e-7, atol=1e-9)
    elif name == "poisson":
        assert_allclose(ours.rates, peer.lambdas_, rtol=1e-7, atol=1e-9)
    else:
        assert_allclose(ours.means, peer.means_, rtol=1e-7, atol=1e-9)
        assert_allclose(ours.covs, peer.covars_, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("name", ["categorical", "poisson", "gaussian_full", "gaussian_diag"])
def test_m_step_recovers_parameters_from_samples(name):
    rng = np.random.default_rng(7)
    truth = _models(rng)[name]
    n = 30_000
    states = jnp.asarray(rng.integers(0, 3, size=n))
    keys = jax.random.split(jax.random.key(8), n)
    ys = jax.vmap(lambda k, z: truth.sample(z, key=k))(keys, states)
    w = jax.nn.one_hot(states, 3, dtype=jnp.float64)
    start = _models(np.random.default_rng(99))[name]
    if name.startswith("gaussian"):
        start = (ssmjax.GaussianEmissions if name == "gaussian_full" else ssmjax.DiagonalGaussianEmissions)(
            start.means, start.covs if name == "gaussian_full" else start.variances, min_variance=0.0
        )
    fitted = start.m_step(ys, w)
    n_k = np.asarray(w.sum(0))
    # 5 standard errors of each estimator
    if name == "categorical":
        p = np.asarray(truth.probs)
        assert np.all(np.abs(np.asarray(fitted.probs) - p) < 5 * np.sqrt(p * (1 - p) / n_k[:, None]))
    elif name == "poisson":
        lam = np.asarray(truth.rates)
        assert np.all(np.abs(np.asarray(fitted.rates) - lam) < 5 * np.sqrt(lam / n_k[:, None]))
    else:
        S = np.asarray(truth.covs)
        var = np.diagonal(S, axis1=1, axis2=2)
        assert np.all(np.abs(np.asarray(fitted.means - truth.means)) < 5 * np.sqrt(var / n_k[:, None]))
        # var of a sample covariance entry: (S_ii S_jj + S_ij^2) / n
        se = np.sqrt((var[:, :, None] * var[:, None, :] + S**2) / n_k[:, None, None])
        assert np.all(np.abs(np.asarray(fitted.covs) - S) < 5 * se)


# --------------------------------------------------------------------------- initialisers


def test_initialisers_give_valid_models():
    key = jax.random.key(10)
    rng = np.random.default_rng(10)
    cat = ssmjax.CategoricalEmissions.random(3, 5, key=key)
    assert cat.probs.shape == (3, 5)
    assert_allclose(cat.probs.sum(-1), np.ones(3))
    ys = jnp.asarray(rng.integers(0, 5, size=200))
    cat = ssmjax.CategoricalEmissions.from_data(ys, 3, 5, key=key)
    assert np.all(np.asarray(cat.probs) > 0) and not np.allclose(cat.probs[0], cat.probs[1])

    pois = ssmjax.PoissonEmissions.random(4, 2, key=key)
    assert pois.rates.shape == (4, 2) and np.all(np.asarray(pois.rates) > 0)
    counts = jnp.asarray(np.concatenate([rng.poisson(1.0, (300, 2)), rng.poisson(20.0, (300, 2))]))
    pois = ssmjax.PoissonEmissions.from_data(counts, 3)
    rates = np.asarray(pois.rates)
    assert np.all(rates > 0) and np.all(np.diff(rates, axis=0) > 0)

    gauss = ssmjax.DiagonalGaussianEmissions.random(3, 2, key=key)
    assert gauss.covariance_type == "diag" and gauss.covs.shape == (3, 2, 2)
    centres = np.array([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    data = np.concatenate([c + rng.normal(size=(100, 2)) for c in centres])
    for cov_type in ("full", "diag"):
        family = (ssmjax.GaussianEmissions if cov_type == "full" else ssmjax.DiagonalGaussianEmissions)
        g = family.from_data(jnp.asarray(data), 3, key=key)
        assert g.covariance_type == cov_type
        found = np.asarray(g.means)[np.argsort(np.asarray(g.means)[:, 0])]
        assert np.all(np.abs(found - centres) < 0.5)
        assert np.all(np.linalg.eigvalsh(np.asarray(g.covs)) > 0)


# --------------------------------------------------------------------------- transformations


def test_jit_vmap_grad_and_no_recompilation():
    rng = np.random.default_rng(11)
    model = _models(rng)["poisson"]
    traces = []

    @eqx.filter_jit
    def total(m, y):
        traces.append(1)
        return m.log_likelihoods(y).sum()

    ys = jnp.asarray(rng.poisson(3.0, size=(8, 2)))
    total(model, ys)
    total(model, ys + 1)
    assert len(traces) == 1
    # vmap over a batch of sequences
    batch = jnp.asarray(rng.poisson(3.0, size=(4, 8, 2)))
    assert jax.vmap(model.log_likelihoods)(batch).shape == (4, 8, 3)
    # gradient w.r.t. the unconstrained log-rates matches the analytic y - rate
    g = jax.grad(lambda m: m.log_likelihoods(ys).sum())(model)
    expected = np.asarray(ys).sum(0)[None, :] - ys.shape[0] * np.asarray(model.rates)
    assert_allclose(g.log_rates, expected)


# --------------------------------------------------------------------------- errors


def test_shape_and_dtype_errors_name_the_argument():
    rng = np.random.default_rng(12)
    models = _models(rng)
    with pytest.raises(ValueError, match="`emissions` of a categorical model must hold integer symbols"):
        models["categorical"].log_likelihoods(jnp.array([True, False]))
    with pytest.raises(ValueError, match=r"`emissions` must be symbols in \[0, 4\)"):
        models["categorical"].log_likelihoods(jnp.array([0.0, 1.5]))  # floats: integral values or NaN
    with pytest.raises(ValueError, match=r"`emissions` must have shape \(T, 2\).*got shape \(4, 3\)"):
        models["gaussian_full"].log_likelihoods(jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"`emissions` must have shape \(T, 2\).*got shape \(4,\)"):
        models["poisson"].log_likelihoods(jnp.zeros(4, int))
    with pytest.raises(ValueError, match=r"`weights` must have shape \(5, 3\)"):
        models["poisson"].m_step(jnp.zeros((5, 2), int), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(5,\)"):
        models["poisson"].m_step(jnp.zeros((5, 2), int), jnp.ones((5, 3)), jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"`probs` must have shape \(K, C\)"):
        ssmjax.CategoricalEmissions(probs=jnp.ones(3) / 3)
    with pytest.raises(ValueError, match=r"`covs` must have shape \(2, 3, 3\)"):
        ssmjax.GaussianEmissions(jnp.zeros((2, 3)), jnp.ones((2, 2, 3)))
    with pytest.raises(ValueError, match=r"`variances` must have shape \(2, 3\)"):
        ssmjax.DiagonalGaussianEmissions(jnp.zeros((2, 3)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="exactly one of `rates` and `log_rates`"):
        ssmjax.PoissonEmissions()


_INITIALISERS = {  # every emission initialiser that takes a number of states, called with K = n
    "bernoulli.random": lambda n, y, u, key: ssmjax.BernoulliEmissions.random(n, 2, key=key),
    "bernoulli.from_data": lambda n, y, u, key: ssmjax.BernoulliEmissions.from_data((y > 0).astype(float), n, key=key),
    "categorical.random": lambda n, y, u, key: ssmjax.CategoricalEmissions.random(n, 3, key=key),
    "categorical.from_data": lambda n, y, u, key: ssmjax.CategoricalEmissions.from_data(
        (y[:, 0] > 0).astype(int), n, 2, key=key),
    "gamma.random": lambda n, y, u, key: ssmjax.GammaEmissions.random(n, 2, key=key),
    "gamma.from_data": lambda n, y, u, key: ssmjax.GammaEmissions.from_data(np.abs(y) + 0.1, n, key=key),
    "gaussian.random": lambda n, y, u, key: ssmjax.GaussianEmissions.random(n, 2, key=key),
    "gaussian.from_data": lambda n, y, u, key: ssmjax.GaussianEmissions.from_data(y, n, key=key),
    "gmm.from_data": lambda n, y, u, key: ssmjax.GaussianMixtureEmissions.from_data(y, n, key=key),
    "multinomial.random": lambda n, y, u, key: ssmjax.MultinomialEmissions.random(n, 3, 5, key=key),
    "multinomial.from_data": lambda n, y, u, key: ssmjax.MultinomialEmissions.from_data(
        np.stack([np.full(len(y), 2), np.full(len(y), 3)], 1), n, key=key),
    "poisson.random": lambda n, y, u, key: ssmjax.PoissonEmissions.random(n, 2, key=key),
    "poisson.from_data": lambda n, y, u, key: ssmjax.PoissonEmissions.from_data(np.round(np.abs(y)), n, key=key),
    "student_t.random": lambda n, y, u, key: ssmjax.StudentTEmissions.random(n, 2, key=key),
    "student_t.from_data": lambda n, y, u, key: ssmjax.StudentTEmissions.from_data(y, n, key=key),
    "linear_regression.from_data": lambda n, y, u, key: ssmjax.LinearRegressionEmissions.from_data(y[None], u[None], n, key=key),
    "poisson_regression.from_data": lambda n, y, u, key: ssmjax.PoissonRegressionEmissions.from_data(
        np.round(np.abs(y[None, :, :1])), u[None], n, key=key),
    "autoregressive.from_data": lambda n, y, u, key: ssmjax.AutoregressiveEmissions.from_data(y[None], n, key=key),
    "HMM.from_data": lambda n, y, u, key: ssmjax.HMM.from_data(y[None], n, "gaussian", key=key),
    "select_num_states": lambda n, y, u, key: ssmjax.select_num_states(y[None], [n], "gaussian", key=key),
}


@pytest.mark.parametrize("name", sorted(_INITIALISERS))
def test_every_initialiser_checks_the_number_of_states(name):
    rng = np.random.default_rng(0)
    y, u, key = rng.normal(size=(40, 2)), rng.normal(size=(40, 2)), jax.random.key(0)
    start = _INITIALISERS[name]
    message = "`num_states` must hold positive ints" if name == "select_num_states" else "`num_states` must be a positive int"
    for bad in (0, -1, 2.5, np.float64(2.0), True, "2"):
        with pytest.raises(ValueError, match=message):
            start(bad, y, u, key)
    if name != "select_num_states":  # a NumPy integer is a number of states like a Python one
        assert start(np.int64(2), y, u, key).num_states == 2


def test_hmm_from_data_states_the_batch_shape_of_each_family():
    """A batch of the wrong rank is named as the batch the user passed, not as the pooled rows the family sees."""
    from ssmjax._hmm.initialise import FAMILIES

    rng = np.random.default_rng(1)
    for name, family in FAMILIES.items():
        symbols = family is ssmjax.CategoricalEmissions
        wrong = np.ones((2, 30, 1)) if symbols else np.ones((2, 30))
        expected = r"\(B, T\)" if symbols else r"\(B, T, D\)"
        with pytest.raises(ValueError, match=rf"`emissions` must have shape {expected} .*got shape \({', '.join(map(str, wrong.shape))}\)"):
            ssmjax.HMM.from_data(wrong, 2, name, inputs=rng.normal(size=(2, 30, 1)), key=jax.random.key(0))


def test_value_errors_eager_and_under_jit():
    rng = np.random.default_rng(13)
    models = _models(rng)
    with pytest.raises(ValueError, match=r"`emissions` must be symbols in \[0, 4\)"):
        models["categorical"].log_likelihoods(jnp.array([0, 4]))
    with pytest.raises(ValueError, match="`emissions` of a Poisson model must be non-negative integer counts"):
        models["poisson"].log_likelihoods(jnp.array([[1, -1]]))
    with pytest.raises(ValueError, match="`emissions` of a Poisson model must be non-negative integer counts"):
        models["poisson"].log_prob(jnp.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="`weights` must be finite and non-negative"):
        models["poisson"].m_step(jnp.zeros((2, 2), int), -jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="`probs` must hold finite non-negative probabilities"):
        ssmjax.CategoricalEmissions(probs=jnp.array([[0.5, 0.6]]))
    with pytest.raises(ValueError, match="`covs` must be positive definite"):
        ssmjax.GaussianEmissions(jnp.zeros((1, 2)), jnp.array([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="`rates` must be finite and non-negative"):
        ssmjax.PoissonEmissions(rates=jnp.array([[-1.0]]))

    f = eqx.filter_jit(lambda m, y: m.log_likelihoods(y))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`emissions` must be symbols in \[0, 4\)"):
        f(models["categorical"], jnp.array([0, 7]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-negative integer counts"):
        f(models["poisson"], jnp.array([[0.5, 1.0]]))
    g = eqx.filter_jit(lambda r: ssmjax.PoissonEmissions(rates=r).rates)
    with pytest.raises(eqx.EquinoxRuntimeError, match="`rates` must be finite and non-negative"):
        g(jnp.array([[-2.0]]))


@pytest.mark.parametrize("family", [ssmjax.GaussianEmissions, ssmjax.TiedGaussianEmissions,
                                    ssmjax.DiagonalGaussianEmissions, ssmjax.SphericalGaussianEmissions,
                                    ssmjax.GaussianMixtureEmissions])
def test_kmeans_start_without_a_covariance_is_an_error_not_nan(family):
    """Constant data and no ridge leave k-means no covariance to factorise: an error, eagerly and under jit."""
    constant = jnp.ones((10, 2))
    message = r"`emissions` give no positive-definite covariance \(constant data with min_variance=0.0"
    with pytest.raises(ValueError, match=message):
        family.from_data(constant, 2, min_variance=0.0, key=jax.random.key(0))
    start = eqx.filter_jit(lambda y: family.from_data(y, 2, min_variance=0.0, key=jax.random.key(0)))
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(start(constant))
    ridged = family.from_data(constant, 2, key=jax.random.key(0))  # the default ridge: a valid start
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(ridged))


# --------------------------------------------------------------------------- user-defined family


class StudentTEmissions(ssmjax.AbstractEmissions):
    """A user family: scalar Student-t emissions with per-state location and log-scale."""

    loc: jax.Array
    log_scale: jax.Array
    df: float = eqx.field(static=True, default=4.0)

    @property
    def num_states(self):
        return self.loc.shape[0]

    @property
    def emission_shape(self):
        return ()

    def log_prob(self, emission):
        return jax.scipy.stats.t.logpdf(emission, self.df, self.loc, jnp.exp(self.log_scale))

    def sample(self, state, *, key):
        return self.loc[state] + jnp.exp(self.log_scale[state]) * jax.random.t(key, self.df)

    def check_emissions(self, emissions, mask=None):
        return emissions


def test_user_defined_family_works_through_the_interface():
    model = StudentTEmissions(jnp.array([-1.0, 0.0, 2.0]), jnp.array([0.0, 0.5, -0.3]))
    ys = jnp.asarray(np.random.default_rng(14).normal(size=9))
    lls = model.log_likelihoods(ys)
    assert lls.shape == (9, 3)
    oracle = st.t.logpdf(np.asarray(ys)[:, None], 4.0, np.asarray(model.loc), np.exp(np.asarray(model.log_scale)))
    assert_allclose(lls, oracle)
    assert_allclose(model.log_likelihoods(ys, length=5)[:5], oracle[:5])
    assert not model.has_closed_form_m_step
    assert ssmjax.PoissonEmissions(rates=jnp.ones((1, 1))).has_closed_form_m_step
    with pytest.raises(ssmjax.NoClosedFormMStepError, match="StudentTEmissions has no closed-form M-step"):
        model.m_step(ys, jnp.ones((9, 3)) / 3)
    grad = jax.grad(lambda m: m.log_likelihoods(ys).sum())(model)
    assert np.all(np.isfinite(grad.loc))
    keys = jax.random.split(jax.random.key(0), 4)
    assert jax.vmap(lambda k, z: model.sample(z, key=k))(keys, jnp.array([0, 1, 2, 0])).shape == (4,)


# --------------------------------------------------------------------------- storage and float32


def test_constrained_views_round_trip_the_constructor_values():
    # the scipy oracles above read the model's views; pin those views to the inputs
    rng = np.random.default_rng(15)
    probs = random_stochastic_matrix(rng, (3, 4), zeros=True)
    assert_allclose(ssmjax.CategoricalEmissions(probs=jnp.asarray(probs)).probs, probs)
    rates = rng.uniform(0.1, 9.0, size=(3, 2))
    assert_allclose(ssmjax.PoissonEmissions(rates=jnp.asarray(rates)).rates, rates)
    means, covs, variances = rng.normal(size=(3, 2)), _spd(rng, 3, 2), rng.uniform(0.5, 2.0, size=(3, 2))
    full = ssmjax.GaussianEmissions(jnp.asarray(means), jnp.asarray(covs))
    assert full.covariance_type == "full"
    assert_allclose(full.means, means)
    assert_allclose(full.covs, covs)
    assert_allclose(full.variances, np.diagonal(covs, axis1=1, axis2=2))
    diag = ssmjax.DiagonalGaussianEmissions(jnp.asarray(means), jnp.asarray(variances))
    assert_allclose(diag.covs, np.stack([np.diag(v) for v in variances]))
    # any unconstrained value is a valid model: only the lower triangle of chol_covs is read
    raw = jnp.asarray(rng.normal(size=(3, 2, 2)))
    model = ssmjax.GaussianEmissions(jnp.asarray(means), chol_covs=raw)
    lower = np.tril(np.asarray(raw))
    assert_allclose(model.covs, lower @ np.swapaxes(lower, -1, -2))
    assert np.all(np.isfinite(model.log_likelihoods(jnp.zeros((2, 2)))))


def test_float32_gaussian_m_step_is_stable_for_offset_data():
    # moments are centred on the current means, so a large common offset costs no precision
    rng = np.random.default_rng(16)
    offset = 1e3
    ys = offset + rng.normal(size=(500, 2)) @ np.array([[1.0, 0.3], [0.0, 0.5]])
    w = rng.dirichlet(np.ones(2), size=500)
    start = ssmjax.GaussianEmissions(
        jnp.full((2, 2), offset, jnp.float32), jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (2, 2, 2)),
        min_variance=0.0,
    )
    new = start.m_step(jnp.asarray(ys, jnp.float32), jnp.asarray(w, jnp.float32))
    means, covs = _numpy_weighted_mle("gaussian_full", ys, w, (None, None, 0.0))
    assert new.covs.dtype == jnp.float32
    assert_allclose(new.means, means, dtype=np.float32)
    assert_allclose(new.covs, covs, dtype=np.float32)


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("hard", [True, False])
def test_float32_gaussian_stats_for_widely_separated_states(covariance, hard):
    # States 300 standard deviations apart: sums about a common centre would lose ~eps * 300^2
    # (a few per cent) in float32; each state's sums must keep float32 accuracy.
    rng = np.random.default_rng(17)
    num_states, dim, n = 4, 3, 4000
    true_means = rng.normal(size=(num_states, dim)) * 300.0
    z = rng.integers(num_states, size=n)
    ys = true_means[z] + rng.normal(size=(n, dim))
    w = np.eye(num_states)[z] if hard else rng.dirichlet(np.full(num_states, 0.3), size=n)
    means = true_means + 0.1  # the model's current means (the centres of the statistics)
    covs = np.broadcast_to(np.eye(dim), (num_states, dim, dim))
    model = (ssmjax.GaussianEmissions if covariance == "full" else ssmjax.DiagonalGaussianEmissions)(
        jnp.asarray(means, jnp.float32),
        jnp.asarray(covs if covariance == "full" else np.ones((num_states, dim)), jnp.float32),
    )
    stats = model.suff_stats(jnp.asarray(ys, jnp.float32), jnp.asarray(w, jnp.float32))
    # float64 oracle, direct weighted sums, from the same float32-rounded inputs (rounding y ~ 300
    # to float32 alone moves y - m by ~2e-5, which no algorithm can recover)
    ys, means, w = (np.asarray(np.asarray(a, np.float32), np.float64) for a in (ys, means, w))
    diffs = ys[:, None, :] - means[None]
    expected_outer = (
        np.einsum("nk,nkd,nke->kde", w, diffs, diffs) if covariance == "full" else np.einsum("nk,nkd->kd", w, diffs**2)
    )
    expected_sums = np.einsum("nk,nkd->kd", w, diffs)
    np.testing.assert_allclose(stats.sum_weights, w.sum(0), rtol=1e-5)
    # the sums about the means are small differences of large terms: compare on the scale of their terms
    scale = np.einsum("nk,nkd->kd", w, np.abs(diffs))
    assert np.all(np.abs(np.asarray(stats.weighted_sums) - expected_sums) <= 1e-5 * scale)
    np.testing.assert_allclose(stats.weighted_outer, expected_outer, rtol=2e-5)


def test_no_field_is_shadowed_by_a_property():
    """A dataclass field that a subclass provides as a property is read by equinox whenever an
    instance is built (a broadcast compiled and run per construction): every public module's
    fields are stored values."""
    import dataclasses
    import inspect

    shadowed = {
        name: [f.name for f in dataclasses.fields(cls) if isinstance(inspect.getattr_static(cls, f.name, None), property)]
        for name, cls in vars(ssmjax).items()
        if inspect.isclass(cls) and issubclass(cls, eqx.Module) and dataclasses.is_dataclass(cls)
    }
    assert not {k: v for k, v in shadowed.items() if v}
    assert {f.name for f in dataclasses.fields(ssmjax.TiedGaussianEmissions)} == {"means", "chol_cov", "min_variance"}
