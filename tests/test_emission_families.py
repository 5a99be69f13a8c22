"""The emission families beyond the first four, each through the same checks.

For every family: log-densities against scipy (with missing entries where the family has
them), the M-step against a NumPy weighted MLE (padding and an empty state included),
statistics that add across batches, EM on samples from a known model (never below the true
model's log-likelihood on the same data), sampling frequencies, save/load, jit/vmap/grad, and
errors that name the argument.
"""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from helpers import assert_allclose, gaussian_conditional_moments, pad_batch

import ssmjax

K = 3


class Bernoulli:
    name = "bernoulli"
    emissions_type = "bernoulli"

    @staticmethod
    def model(rng):
        probs = rng.uniform(0.1, 0.9, size=(K, 4))
        probs[0, 0], probs[1, 1] = 0.0, 1.0  # structural zero and one
        return ssmjax.BernoulliEmissions(probs=jnp.asarray(probs))

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = rng.integers(0, 2, size=(n, 4)).astype(float)
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def oracle_log_prob(model, y):
        obs = ~np.isnan(y)
        p = np.asarray(model.probs, np.float64)
        with np.errstate(divide="ignore"):
            return np.stack([st.bernoulli(p[k][obs]).logpmf(y[obs]).sum() for k in range(K)])

    @staticmethod
    def numpy_m_step(model, ys, w):
        obs = ~np.isnan(ys)
        y0 = np.where(obs, ys, 0.0)
        with np.errstate(invalid="ignore"):
            return {"probs": (w.T @ y0) / (w.T @ obs)}

    @staticmethod
    def params(model):
        return {"probs": np.asarray(model.probs)}

    @staticmethod
    def sample_mean(model, state):
        return np.asarray(model.probs)[state]

    @staticmethod
    def bad_data():
        return np.array([[0.0, 2.0, 1.0, 0.0]]), "must be 0 or 1"


class Multinomial:
    name = "multinomial"
    emissions_type = "multinomial"
    trials = 6

    @staticmethod
    def model(rng):
        probs = rng.dirichlet(np.ones(4), size=K)
        probs[0] = [0.5, 0.0, 0.3, 0.2]  # a structural zero
        return ssmjax.MultinomialEmissions(jnp.asarray(probs), num_trials=Multinomial.trials)

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = rng.multinomial(Multinomial.trials, [0.4, 0.1, 0.3, 0.2], size=n).astype(float)
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def oracle_log_prob(model, y):
        """scipy's multinomial over the observed categories and "the rest" (the missing ones pooled)."""
        obs = ~np.isnan(y)
        p = np.asarray(model.probs, np.float64)
        rest = Multinomial.trials - y[obs].sum()
        return np.stack([
            st.multinomial(Multinomial.trials, np.append(p[k][obs], p[k][~obs].sum())).logpmf(np.append(y[obs], rest))
            for k in range(K)
        ])

    @staticmethod
    def numpy_m_step(model, ys, w):
        p = np.asarray(model.probs, np.float64)
        counts = np.zeros((K, 4))
        for y, wn in zip(ys, w):
            obs = ~np.isnan(y)
            rest = Multinomial.trials - y[obs].sum()
            for k in range(K):
                counts[k, obs] += wn[k] * y[obs]
                if rest > 0:
                    counts[k, ~obs] += wn[k] * rest * p[k, ~obs] / p[k, ~obs].sum()
        with np.errstate(invalid="ignore"):
            return {"probs": counts / counts.sum(1, keepdims=True)}

    @staticmethod
    def params(model):
        return {"probs": np.asarray(model.probs)}

    @staticmethod
    def sample_mean(model, state):
        return Multinomial.trials * np.asarray(model.probs)[state]

    @staticmethod
    def bad_data():
        return np.array([[1.0, 1.0, 1.0, 0.0]]), "summing to num_trials=6"


class Spherical:
    name = "gaussian_spherical"
    emissions_type = "gaussian_spherical"

    @staticmethod
    def model(rng):
        return ssmjax.SphericalGaussianEmissions(
            jnp.asarray(rng.normal(size=(K, 3)) * 3.0), jnp.asarray(rng.uniform(0.5, 2.0, size=K)), min_variance=0.0
        )

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = rng.normal(size=(n, 3)) * 3.0
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def oracle_log_prob(model, y):
        obs = ~np.isnan(y)
        mu, var = np.asarray(model.means, np.float64), np.asarray(model.variances, np.float64)
        return np.stack([st.norm(mu[k][obs], np.sqrt(var[k][obs])).logpdf(y[obs]).sum() for k in range(K)])

    @staticmethod
    def numpy_m_step(model, ys, w):
        obs = ~np.isnan(ys)
        y0 = np.where(obs, ys, 0.0)
        wd = w.T @ obs
        with np.errstate(invalid="ignore"):
            means = (w.T @ y0) / wd
            scatter = np.stack([(w[:, k][:, None] * obs * (y0 - means[k]) ** 2).sum(0) for k in range(K)])
            return {"means": means, "variances": (scatter.sum(1) / wd.sum(1))[:, None] * np.ones((1, 3))}

    @staticmethod
    def params(model):
        return {"means": np.asarray(model.means), "variances": np.asarray(model.variances)}

    @staticmethod
    def sample_mean(model, state):
        return np.asarray(model.means)[state]

    @staticmethod
    def bad_data():
        return np.array([[0.0, np.inf, 1.0]]), "must be finite"


class Tied:
    name = "gaussian_tied"
    emissions_type = "gaussian_tied"
    shared = ("covs",)

    @staticmethod
    def model(rng):
        a = rng.normal(size=(3, 3))
        return ssmjax.TiedGaussianEmissions(
            jnp.asarray(rng.normal(size=(K, 3)) * 3.0), jnp.asarray(a @ a.T + 3 * np.eye(3)), min_variance=0.0
        )

    draw = Spherical.draw

    @staticmethod
    def oracle_log_prob(model, y):
        obs = ~np.isnan(y)
        if not obs.any():
            return np.zeros(K)
        mu, cov = np.asarray(model.means, np.float64), np.asarray(model.cov, np.float64)
        return np.stack([st.multivariate_normal(mu[k][obs], cov[np.ix_(obs, obs)]).logpdf(y[obs]) for k in range(K)])

    @staticmethod
    def numpy_m_step(model, ys, w):
        means0, covs0 = np.asarray(model.means, np.float64), np.asarray(model.covs, np.float64)
        moments = [gaussian_conditional_moments(means0, covs0, y) for y in ys]
        total = w.sum(0)
        means = np.stack([sum(w[n, k] * moments[n][k][0] for n in range(len(ys))) for k in range(K)])
        with np.errstate(invalid="ignore"):
            means = means / total[:, None]
        scatter = sum(
            w[n, k] * (np.outer(moments[n][k][0] - means[k], moments[n][k][0] - means[k]) + moments[n][k][1])
            for n in range(len(ys)) for k in range(K) if total[k] > 0
        )
        return {"means": means, "covs": np.broadcast_to(scatter / total.sum(), (K, 3, 3))}

    @staticmethod
    def params(model):
        return {"means": np.asarray(model.means), "covs": np.asarray(model.covs)}

    sample_mean = Spherical.sample_mean
    bad_data = Spherical.bad_data


class Gamma:
    name = "gamma"
    emissions_type = "gamma"

    @staticmethod
    def model(rng):
        return ssmjax.GammaEmissions(
            shapes=jnp.asarray(rng.uniform(0.5, 6.0, size=(K, 2))), rates=jnp.asarray(rng.uniform(0.3, 3.0, size=(K, 2)))
        )

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = rng.gamma(2.0, 1.5, size=(n, 2))
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def oracle_log_prob(model, y):
        obs = ~np.isnan(y)
        a, b = np.asarray(model.shapes, np.float64), np.asarray(model.rates, np.float64)
        return np.stack([st.gamma(a[k][obs], scale=1.0 / b[k][obs]).logpdf(y[obs]).sum() for k in range(K)])

    @staticmethod
    def numpy_m_step(model, ys, w):
        """Weighted MLE per (state, dimension): scipy's root of the profile equation for the shape."""
        from scipy.optimize import brentq
        from scipy.special import digamma

        obs = ~np.isnan(ys)
        shapes, rates = np.full((K, 2), np.nan), np.full((K, 2), np.nan)
        for k in range(K):
            for d in range(2):
                wk, yk = w[obs[:, d], k], ys[obs[:, d], d]
                if wk.sum() <= 0:
                    continue
                mean, mean_log = (wk * yk).sum() / wk.sum(), (wk * np.log(yk)).sum() / wk.sum()
                s = np.log(mean) - mean_log
                shapes[k, d] = brentq(lambda a: np.log(a) - digamma(a) - s, 1e-6, 1e8, xtol=1e-14, rtol=1e-14)
                rates[k, d] = shapes[k, d] / mean
        return {"shapes": shapes, "rates": rates}

    @staticmethod
    def params(model):
        return {"shapes": np.asarray(model.shapes), "rates": np.asarray(model.rates)}

    @staticmethod
    def sample_mean(model, state):
        return np.asarray(model.means)[state]

    @staticmethod
    def bad_data():
        return np.array([[1.0, -2.0]]), "must be positive"


class Mixture:
    name = "gmm"
    emissions_type = "gmm"
    M = 2

    @staticmethod
    def model(rng):
        components = ssmjax.DiagonalGaussianEmissions(
            jnp.asarray(rng.normal(size=(K * 2, 2)) * 3.0), jnp.asarray(rng.uniform(0.5, 2.0, size=(K * 2, 2))),
            min_variance=0.0,
        )
        return ssmjax.GaussianMixtureEmissions(jnp.asarray(rng.dirichlet(np.ones(2), size=K)), components)

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = rng.normal(size=(n, 2)) * 3.0
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def _component_logpdf(model, y):
        obs = ~np.isnan(y)
        mu, var = np.asarray(model.means, np.float64), np.asarray(model.components.variances, np.float64)
        mu = mu.reshape(-1, 2)
        return np.array([st.norm(mu[c][obs], np.sqrt(var[c][obs])).logpdf(y[obs]).sum() for c in range(K * 2)])

    @staticmethod
    def oracle_log_prob(model, y):
        from scipy.special import logsumexp

        joint = Mixture._component_logpdf(model, y).reshape(K, 2) + np.log(np.asarray(model.weights, np.float64))
        return logsumexp(joint, axis=1)

    @staticmethod
    def numpy_m_step(model, ys, w):
        from scipy.special import softmax

        joint = np.stack([Mixture._component_logpdf(model, y).reshape(K, 2) for y in ys]) + np.log(np.asarray(model.weights))
        r = (w[:, :, None] * softmax(joint, axis=2)).reshape(len(ys), -1)  # (N, K*M)
        obs = ~np.isnan(ys)
        y0 = np.where(obs, ys, 0.0)
        with np.errstate(invalid="ignore"):
            means = (r.T @ y0) / (r.T @ obs)
            variances = np.stack([(r[:, c][:, None] * obs * (y0 - means[c]) ** 2).sum(0) for c in range(K * 2)]) / (r.T @ obs)
            weights = r.sum(0).reshape(K, 2) / r.sum(0).reshape(K, 2).sum(1, keepdims=True)
        return {"weights": weights, "means": means.reshape(K, 2, 2), "variances": variances.reshape(K, 2, 2)}

    @staticmethod
    def params(model):
        return {
            "weights": np.asarray(model.weights), "means": np.asarray(model.means),
            "variances": np.asarray(model.components.variances).reshape(K, 2, 2),
        }

    @staticmethod
    def sample_mean(model, state):
        return np.einsum("m,md->d", np.asarray(model.weights)[state], np.asarray(model.means)[state])

    @staticmethod
    def bad_data():
        return np.array([[0.0, np.inf]]), "must be finite"

    # mixtures have many local optima: EM starts from the true model (and must not fall below it)
    start_from_truth = True


class Product:
    """Counts (column 0), a symbol (column 1) and a diagonal Gaussian feature (columns 2-3)."""

    name = "product"
    emissions_type = None
    start_from_truth = True

    @staticmethod
    def model(rng):
        return ssmjax.ProductEmissions(
            ssmjax.PoissonEmissions(rates=jnp.asarray(rng.uniform(0.5, 8.0, size=(K, 1)))),
            ssmjax.CategoricalEmissions(jnp.asarray(rng.dirichlet(np.ones(3), size=K))),
            ssmjax.DiagonalGaussianEmissions(
                jnp.asarray(rng.normal(size=(K, 2)) * 3.0), jnp.asarray(rng.uniform(0.5, 2.0, size=(K, 2))), min_variance=0.0
            ),
        )

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = np.column_stack([rng.poisson(3.0, n), rng.integers(0, 3, n), rng.normal(size=(n, 2)) * 3.0]).astype(float)
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def oracle_log_prob(model, y):
        counts, symbols, gauss = model.parts
        out = np.zeros(K)
        if not np.isnan(y[0]):
            out += st.poisson(np.asarray(counts.rates, np.float64)[:, 0]).logpmf(y[0])
        if not np.isnan(y[1]):
            out += np.log(np.asarray(symbols.probs, np.float64))[:, int(y[1])]
        obs = ~np.isnan(y[2:])
        mu, var = np.asarray(gauss.means, np.float64), np.asarray(gauss.variances, np.float64)
        out += np.array([st.norm(mu[k][obs], np.sqrt(var[k][obs])).logpdf(y[2:][obs]).sum() for k in range(K)])
        return out

    @staticmethod
    def numpy_m_step(model, ys, w):
        obs = ~np.isnan(ys)
        y0 = np.where(obs, ys, 0.0)
        with np.errstate(invalid="ignore"):
            rates = (w.T @ y0[:, :1]) / (w.T @ obs[:, :1])
            onehot = (y0[:, 1:2] == np.arange(3)) & obs[:, 1:2]
            probs = (w.T @ onehot) / (w.T @ onehot).sum(1, keepdims=True)
            wd = w.T @ obs[:, 2:]
            means = (w.T @ y0[:, 2:]) / wd
            variances = np.stack([(w[:, k][:, None] * obs[:, 2:] * (y0[:, 2:] - means[k]) ** 2).sum(0) for k in range(K)]) / wd
        return {"rates": rates, "probs": probs, "means": means, "variances": variances}

    @staticmethod
    def params(model):
        counts, symbols, gauss = model.parts
        return {
            "rates": np.asarray(counts.rates), "probs": np.asarray(symbols.probs),
            "means": np.asarray(gauss.means), "variances": np.asarray(gauss.variances),
        }

    @staticmethod
    def sample_mean(model, state):
        counts, symbols, gauss = model.parts
        return np.concatenate([
            np.asarray(counts.rates)[state], [np.asarray(symbols.probs)[state] @ np.arange(3)], np.asarray(gauss.means)[state]
        ])

    @staticmethod
    def bad_data():
        return np.array([[-1.0, 0.0, 0.0, 0.0]]), "non-negative integer counts"


class StudentT:
    name = "student_t"
    emissions_type = "student_t"

    @staticmethod
    def model(rng):
        a = rng.normal(size=(K, 3, 3))
        return ssmjax.StudentTEmissions(
            jnp.asarray(rng.normal(size=(K, 3)) * 3.0), jnp.asarray(a @ np.swapaxes(a, 1, 2) + np.eye(3)),
            jnp.asarray(rng.uniform(3.0, 10.0, size=K)), min_variance=0.0,
        )

    @staticmethod
    def draw(rng, n, missing=0.0):
        y = rng.standard_t(4.0, size=(n, 3)) * 3.0
        y[rng.random(y.shape) < missing] = np.nan
        return y

    @staticmethod
    def oracle_log_prob(model, y):
        from test_student_t import scipy_log_prob

        return scipy_log_prob(*(np.asarray(p, np.float64) for p in (model.means, model.scales, model.dofs)), y)

    @staticmethod
    def numpy_m_step(model, ys, w):
        from test_student_t import numpy_ecm_step

        return numpy_ecm_step(*(np.asarray(p, np.float64) for p in (model.means, model.scales, model.dofs)), ys, w)

    @staticmethod
    def params(model):
        return {"means": np.asarray(model.means), "scales": np.asarray(model.scales), "dofs": np.asarray(model.dofs)}

    sample_mean = Spherical.sample_mean
    bad_data = Spherical.bad_data


FAMILIES = [Bernoulli, Multinomial, Spherical, Tied, Gamma, Mixture, Product, StudentT]
IDS = [f.name for f in FAMILIES]


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_log_likelihoods_match_scipy_with_missing_entries(fam):
    rng = np.random.default_rng(0)
    model = fam.model(rng)
    ys = fam.draw(rng, 20, missing=0.25)
    want = np.stack([fam.oracle_log_prob(model, y) for y in ys])
    assert_allclose(model.log_likelihoods(ys), want)
    assert_allclose(jax.jit(lambda m, y: m.log_likelihoods(y))(model, jnp.asarray(ys)), want)
    complete = fam.draw(rng, 20)
    assert_allclose(model.log_likelihoods(complete), np.stack([fam.oracle_log_prob(model, y) for y in complete]))


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_m_step_matches_numpy_with_padding_missing_entries_and_an_empty_state(fam):
    rng = np.random.default_rng(1)
    model = fam.model(rng)
    n = 80
    ys = fam.draw(rng, n, missing=0.2)
    w = rng.dirichlet(np.ones(K), size=n)
    w[:, 2] = 0.0  # state 2 gets no responsibility: keeps its parameters
    mask = rng.random(n) < 0.75
    garbage = ys.copy()
    garbage[~mask] = 7.0
    new = jax.jit(lambda m, y, w, k: m.m_step(y, w, k))(model, jnp.asarray(garbage), jnp.asarray(w), jnp.asarray(mask))
    want = fam.numpy_m_step(model, ys[mask], w[mask])
    got = fam.params(new)
    for name in want:
        assert_allclose(got[name][:2], want[name][:2])
        if name in getattr(fam, "shared", ()):  # one value for every state: learnt from the others
            assert_allclose(got[name][2], want[name][2])
        else:
            np.testing.assert_array_equal(got[name][2], fam.params(model)[name][2])
    assert type(new) is type(model)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_statistics_add_across_batches(fam):
    rng = np.random.default_rng(2)
    model = fam.model(rng)
    ys = fam.draw(rng, 30, missing=0.1)
    w = rng.dirichlet(np.ones(K), size=30)
    whole = model.suff_stats(ys, w)
    parts = jax.tree.map(jnp.add, model.suff_stats(ys[:12], w[:12]), model.suff_stats(ys[12:], w[12:]))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        assert_allclose(a, b)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_batched_e_step_of_a_ragged_batch_equals_per_sequence_e_steps(fam):
    """fit_em's time-major E-step (each family's own layout and reuse of its log-densities) against
    the per-sequence E-step, over missing entries and valid-looking garbage in the padding."""
    rng = np.random.default_rng(5)
    hmm = ssmjax.HMM(jnp.asarray(rng.dirichlet(np.ones(K))), jnp.asarray(rng.dirichlet(np.ones(K), size=K)), fam.model(rng))
    lengths = np.array([7, 4, 9])
    ys = np.stack([fam.draw(rng, 9, missing=0.2) for _ in lengths])
    padding = fam.draw(rng, 9)
    for b, n in enumerate(lengths):
        ys[b, n:] = padding[n:]
    emissions, lens, _ = hmm._check_batch(jnp.asarray(ys), jnp.asarray(lengths), None)
    stats, loglik = jax.jit(lambda m, y, n: m._batched_e_step(m._prepare_batch(y, n, None)))(hmm, emissions, lens)
    per_seq = [hmm._e_step(emissions[b], lens[b], None) for b in range(len(lengths))]
    want = jax.tree.map(lambda *s: sum(s), *[s for s, _ in per_seq])
    assert jax.tree.structure(stats) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(stats), jax.tree.leaves(want)):
        assert_allclose(got, expected)
    assert_allclose(loglik, sum(ll for _, ll in per_seq))


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_em_on_samples_reaches_at_least_the_true_models_likelihood(fam):
    """EM's iterates never lose likelihood, and the best of four runs from ``HMM.from_data`` starts
    (vmapped over keys: the initialisers' host callbacks) ends at least at the true model's likelihood.
    One run from one start can end in a local maximum (tied Gaussian: for 9 keys in 30)."""
    rng = np.random.default_rng(3)
    true = ssmjax.HMM(
        jnp.asarray([0.5, 0.3, 0.2]), jnp.asarray([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.1, 0.1, 0.8]]),
        fam.model(rng),
    )
    keys = jax.random.split(jax.random.key(0), 8)
    ys = np.stack([np.asarray(true.sample(150, key=k)[1]) for k in keys])
    if getattr(fam, "start_from_truth", False):
        starts = eqx.filter_vmap(lambda _: true)(jnp.arange(1))  # the true model, stacked as one restart
    else:
        start = lambda k: ssmjax.HMM.from_data(ys, K, fam.emissions_type, key=k)  # noqa: E731
        starts = eqx.filter_vmap(start)(jax.random.split(jax.random.key(1), 4))
    _, scores, histories = ssmjax.fit_em_restarts(starts, ys, max_iters=200, tol=1e-10)
    for lls in np.asarray(histories):
        lls = lls[~np.isnan(lls)]
        assert np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))
    true_ll = sum(float(true.marginal_loglik(jnp.asarray(y))) for y in ys)
    assert float(np.max(scores)) >= true_ll - 1e-6 * abs(true_ll)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_samples_have_the_model_mean(fam):
    model = fam.model(np.random.default_rng(4))
    draws = jax.vmap(lambda k: model.sample(1, key=k))(jax.random.split(jax.random.key(0), 4000))
    draws = np.asarray(draws, np.float64)
    mean, sd = draws.mean(0), draws.std(0) + 1e-12
    assert np.all(np.abs(mean - fam.sample_mean(model, 1)) <= 5 * sd / np.sqrt(len(draws)) + 1e-12)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_save_load_round_trip_and_jit_vmap_grad(fam, tmp_path):
    rng = np.random.default_rng(5)
    hmm = ssmjax.HMM(jnp.ones(K) / K, jnp.full((K, K), 1.0 / K), fam.model(rng))
    path = os.path.join(tmp_path, "hmm.eqx")
    ssmjax.save(path, hmm)
    loaded = ssmjax.load(path)
    assert type(loaded.emissions) is type(hmm.emissions)
    ys = jnp.asarray(np.stack([fam.draw(rng, 12, missing=0.1) for _ in range(3)]))
    assert_allclose(jax.vmap(loaded.marginal_loglik)(ys), jax.vmap(hmm.marginal_loglik)(ys))
    grad = jax.grad(lambda m: jnp.sum(jax.vmap(m.marginal_loglik)(ys)))(hmm)
    finite = [np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad)]
    assert finite and all(finite)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_invalid_emissions_are_errors_eager_and_under_jit(fam):
    model = fam.model(np.random.default_rng(6))
    bad, message = fam.bad_data()
    with pytest.raises(ValueError, match=message):
        model.log_likelihoods(bad)
    with pytest.raises(Exception, match=message):
        jax.jit(lambda m, y: m.log_likelihoods(y))(model, jnp.asarray(bad))
    with pytest.raises(ValueError, match="`emissions` must have shape"):
        model.log_likelihoods(np.zeros((3, 17)))


def _hmmlearn_peer(fam, model):
    """hmmlearn's model of the family with neutral priors and our parameters, or None."""
    hmm = pytest.importorskip("hmmlearn.hmm")
    common = dict(n_components=K, n_iter=1, init_params="", tol=-np.inf)
    if fam is Multinomial:
        peer = hmm.MultinomialHMM(n_trials=Multinomial.trials, params="e", **common)
        peer.emissionprob_ = np.asarray(model.probs)
        return peer, lambda p: {"probs": p.emissionprob_}
    if fam in (Spherical, Tied):
        kind = "spherical" if fam is Spherical else "tied"
        peer = hmm.GaussianHMM(
            covariance_type=kind, params="mc", means_prior=0.0, means_weight=0.0,
            covars_prior=0.0, covars_weight=1.0 if kind == "spherical" else 0.0, min_covar=0.0, **common,
        )
        peer.means_ = np.asarray(model.means)
        peer.covars_ = np.asarray(model.variances[:, 0] if kind == "spherical" else model.cov)
        if kind == "spherical":  # hmmlearn's covars_ view: (K, D, D)
            return peer, lambda p: {"means": p.means_, "variances": np.broadcast_to(np.asarray(p._covars_).reshape(K, -1), (K, 3))}
        return peer, lambda p: {"means": p.means_, "covs": p.covars_}
    if fam is Mixture:
        peer = hmm.GMMHMM(
            n_mix=2, covariance_type="diag", params="mcw", weights_prior=1.0, means_prior=0.0, means_weight=0.0,
            covars_prior=-1.5, covars_weight=0.0, min_covar=0.0, **common,
        )
        peer.weights_ = np.asarray(model.weights)
        peer.means_ = np.asarray(model.means)
        peer.covars_ = np.asarray(model.components.variances).reshape(K, 2, 2)
        # hmmlearn's GMMHMM takes the component covariances about the previous means (its c_n),
        # not the new ones: not the maximiser, so only weights and means are compared; the exact
        # covariance update is checked against NumPy in the M-step test above
        return peer, lambda p: {"weights": p.weights_, "means": p.means_}
    return None


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_one_em_iteration_equals_hmmlearns(fam):
    """One Baum-Welch iteration of the emission parameters from the same start, on complete data."""
    rng = np.random.default_rng(7)
    model = fam.model(rng)
    if fam is Multinomial:  # hmmlearn cannot start from a structural zero (log 0 in its E-step)
        model = ssmjax.MultinomialEmissions(jnp.asarray(rng.dirichlet(np.ones(4), size=K)), num_trials=fam.trials)
    found = _hmmlearn_peer(fam, model)
    if found is None:
        pytest.skip(f"hmmlearn has no {fam.name} HMM")
    peer, peer_params = found
    pi = rng.dirichlet(np.ones(K))
    A = rng.dirichlet(np.ones(K), size=K)
    lengths = [30, 20, 25]
    ys = fam.draw(rng, sum(lengths))
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), model)
    fitted, _, _ = ssmjax.fit_em(hmm, pad_batch(ys, lengths), lengths=lengths, max_iters=1, frozen=("initial_probs", "transition_matrix"))
    peer.startprob_, peer.transmat_ = pi, A
    peer.fit(ys.astype(int) if fam is Multinomial else ys, lengths)
    want = peer_params(peer)
    got = fam.params(fitted.emissions)
    for name in want:
        assert_allclose(got[name], want[name], rtol=1e-7, atol=1e-9)



def test_gamma_frozen_rates_or_shapes_get_the_conditional_maximiser():
    """With one parameter frozen, the other maximises the weighted log-likelihood given it:
    the gradient of that objective with respect to the free one vanishes."""
    rng = np.random.default_rng(8)
    model = Gamma.model(rng)
    ys = Gamma.draw(rng, 200, missing=0.1)
    w = rng.dirichlet(np.ones(K), size=200)

    def objective(m):
        return jnp.sum(jnp.asarray(w) * m.log_likelihoods(ys))

    for frozen, free in (({"rates"}, "log_shapes"), ({"shapes"}, "log_rates")):
        new = model.m_step_from_stats(model.suff_stats(ys, w), frozen=frozen)
        kept = "log_rates" if free == "log_shapes" else "log_shapes"
        np.testing.assert_array_equal(np.asarray(getattr(new, kept)), np.asarray(getattr(model, kept)))
        grad = getattr(jax.grad(objective)(new), free)
        scale = np.abs(np.asarray(getattr(jax.grad(objective)(model), free))).max()
        assert np.abs(np.asarray(grad)).max() < 1e-8 * max(scale, 1.0)
