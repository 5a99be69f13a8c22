"""GLM emissions per state: PoissonRegressionEmissions and BernoulliRegressionEmissions.

Oracles: scipy.stats' Poisson and Bernoulli log-pmfs at exp / sigmoid of W x + b (missing entries
left out by hand), brute-force enumeration of every state path, statsmodels' GLM (IRLS, frequency
weights, an offset for frozen coefficients) for the M-step's weighted regressions, the per-sequence
E-step for the batched one, and central differences for gradients.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from helpers import assert_allclose, enumerate_paths

import ssmjax
from ssmjax._hmm.emissions.base import _combine_sequences

K, D, DU = 2, 2, 2
FAMILIES = {
    "poisson": (ssmjax.PoissonRegressionEmissions, lambda rng, size: rng.poisson(3.0, size).astype(float)),
    "bernoulli": (ssmjax.BernoulliRegressionEmissions, lambda rng, size: rng.integers(0, 2, size).astype(float)),
}


def _glm(rng, name, dtype=np.float64):
    cls, _ = FAMILIES[name]
    return cls(weights=jnp.asarray(0.5 * rng.normal(size=(K, D, DU)), dtype),
               biases=jnp.asarray(rng.normal(size=(K, D)) + (1.0 if name == "poisson" else 0.0), dtype))


def _hmm(rng, emissions):
    return ssmjax.HMM(jnp.asarray(rng.dirichlet(np.ones(K))), jnp.asarray(rng.dirichlet(2 * np.ones(K), size=K)), emissions)


def _scipy_lls(model, y, x):
    """(T, K) log-likelihoods by scipy, NaN entries left out."""
    eta = np.einsum("kdp,tp->tkd", np.asarray(model.weights), x) + np.asarray(model.biases)
    obs = ~np.isnan(y)[:, None, :]
    y0 = np.where(np.isnan(y), 0, y)[:, None, :]
    if isinstance(model, ssmjax.PoissonRegressionEmissions):
        terms = st.poisson.logpmf(y0, np.exp(eta))
    else:
        terms = st.bernoulli.logpmf(y0, 1 / (1 + np.exp(-eta)))
    return np.where(obs, terms, 0.0).sum(-1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_log_likelihoods_match_scipy_and_enumeration_with_missing_entries(name):
    rng = np.random.default_rng(0)
    model = _glm(rng, name)
    hmm = _hmm(rng, model)
    T = 6
    y, u = FAMILIES[name][1](rng, (T, D)), rng.normal(size=(T, DU))
    y[1, 0] = np.nan  # partly observed: the entry drops out
    y[3] = np.nan  # fully missing: a zero row
    expected = _scipy_lls(model, y, u)
    assert_allclose(hmm.log_likelihoods(jnp.asarray(y), inputs=jnp.asarray(u)), expected, rtol=1e-12)
    assert_allclose(model.log_prob(jnp.asarray(y[1]), jnp.asarray(u[1])), expected[1], rtol=1e-12)
    # padding (step 5) may hold anything
    y_pad, u_pad = y.copy(), u.copy()
    y_pad[5], u_pad[5] = np.inf, np.nan
    post = hmm.smoother(jnp.asarray(y_pad), inputs=jnp.asarray(u_pad), length=5)
    loglik, marg = enumerate_paths(hmm.initial_probs, hmm.transition_matrix, expected[:5])
    assert_allclose(post.marginal_loglik, loglik, rtol=1e-12)
    assert_allclose(post.smoothed_probs[:5], marg, rtol=1e-9, atol=1e-12)
    # the E-step's time-major layout of a batch (T, B): the same numbers, zero at padding
    rows = model.joined(jnp.stack([jnp.asarray(y_pad), jnp.asarray(y)], 1), jnp.stack([jnp.asarray(u_pad), jnp.asarray(u)], 1))
    valid = jnp.asarray(np.stack([np.arange(T) < 5, np.arange(T) < T], 1))
    time_major = np.asarray(model._time_major_log_likelihoods(rows, valid))
    assert_allclose(time_major[:5, :, 0], expected[:5], rtol=1e-12)
    assert np.all(time_major[5, :, 0] == 0.0)
    assert_allclose(time_major[:, :, 1], expected, rtol=1e-12)


def _statsmodels_fit(name, y, x, w, offset, fit_weights, fit_bias):
    sm = pytest.importorskip("statsmodels.api")
    cols = ([x] if fit_weights else []) + ([np.ones((len(y), 1))] if fit_bias else [])
    family = sm.families.Poisson() if name == "poisson" else sm.families.Binomial()
    res = sm.GLM(y, np.concatenate(cols, 1), family=family, freq_weights=w, offset=offset).fit(tol=1e-14, maxiter=200)
    return res.params


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_m_step_equals_statsmodels_glm_with_frozen_coefficients(name):
    """The M-step (a few Newton steps, never lowering the objective) converges, repeated on the same
    statistics as EM's iterations do, to the maximiser of each (state, output)'s weighted GLM:
    statsmodels' IRLS on the observed real steps (frequency weights = the posterior weights), to
    1e-6. A state with no weight keeps its coefficients; frozen coefficients stay and the free ones
    maximise given them."""
    rng = np.random.default_rng(1)
    model = _glm(rng, name)
    n = 80
    y, u = FAMILIES[name][1](rng, (n, D)), rng.normal(size=(n, DU))
    y[3, 1] = np.nan  # partly observed
    y[7] = np.nan
    weights = np.zeros((n, K + 1))
    weights[:, :K] = rng.dirichlet(np.ones(K), size=n)  # the last state: no weight
    mask = np.arange(n) < n - 5
    y[-5:], u[-5:] = np.inf, np.nan  # padding
    three = type(model)(weights=jnp.concatenate([model.weights, model.weights[:1]]),
                        biases=jnp.concatenate([model.biases, model.biases[:1]]))
    stats = three.suff_stats(three.joined(jnp.asarray(y), jnp.asarray(u)), jnp.asarray(weights), jnp.asarray(mask))
    for frozen in ((), ("biases",), ("weights",)):
        m_step = jax.jit(lambda m, s: m.m_step_from_stats(s, frozen=frozenset(frozen)))
        new = three
        for _ in range(4):
            new = m_step(new, stats)
        for k in range(K):
            for d in range(D):
                keep = mask & ~np.isnan(y[:, d])
                w_old, b_old = np.asarray(three.weights[k, d]), float(three.biases[k, d])
                offset = (0.0 if "weights" not in frozen else u[keep] @ w_old) + (0.0 if "biases" not in frozen else b_old)
                params = _statsmodels_fit(name, y[keep, d], u[keep], weights[keep, k], np.broadcast_to(offset, keep.sum()),
                                          "weights" not in frozen, "biases" not in frozen)
                got = np.concatenate([np.asarray(new.weights[k, d])] * ("weights" not in frozen)
                                     + [np.asarray(new.biases[k, d])[None]] * ("biases" not in frozen))
                assert_allclose(got, params, rtol=1e-6, atol=1e-7)
        assert_allclose(new.weights[K], three.weights[K], rtol=0)
        assert_allclose(new.biases[K], three.biases[K], rtol=0)
        if frozen:
            field = frozen[0]
            assert_allclose(getattr(new, field), getattr(three, field), rtol=0)


def _simulate(name, B=8, T=200):
    """A two-state HMM with GLM emissions and data drawn from it with NumPy."""
    cls, _ = FAMILIES[name]
    if name == "poisson":
        weights, biases = np.array([[[0.8, -0.5]], [[-0.4, 0.3]]]), np.array([[0.3], [1.8]])
    else:  # two outcomes per step: the states are told apart better than by one
        weights = np.array([[[2.0, -1.0], [1.0, 0.5]], [[-1.5, 0.5], [-1.0, 1.0]]])
        biases = np.array([[1.0, -0.5], [-1.0, 0.5]])
    trans = np.array([[0.95, 0.05], [0.1, 0.9]])
    true = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.asarray(trans), cls(weights=jnp.asarray(weights), biases=jnp.asarray(biases)))
    rng = np.random.default_rng(7)
    states = np.zeros((B, T), int)
    states[:, 0] = rng.integers(0, 2, B)
    for t in range(1, T):
        states[:, t] = rng.random(B) < trans[states[:, t - 1], 1]
    u = rng.normal(size=(B, T, 2))
    eta = np.einsum("btdp,btp->btd", weights[states], u) + biases[states]
    ys = rng.poisson(np.exp(eta)) if name == "poisson" else rng.random(eta.shape) < 1 / (1 + np.exp(-eta))
    return true, ys.astype(float), u


@eqx.filter_jit
def _logliks(model, ys, u, lengths):
    """Each sequence's exact log-likelihood, by the per-sequence filter."""
    return jax.vmap(lambda y, x, n: model.marginal_loglik(y, inputs=x, length=n))(ys, u, lengths)


@eqx.filter_jit
def _batched_and_per_sequence_stats(model, ys, lengths, u):
    batched = model._batched_e_step(model._prepare_batch(ys, lengths, u))
    per_seq, lls = jax.vmap(model._e_step)(ys, lengths, u)
    return batched, (_combine_sequences(per_seq), jnp.sum(lls))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_em_is_monotone_recovers_coefficients_and_batches_like_single_sequences(name):
    true, ys, u = _simulate(name)
    B, T = ys.shape[:2]
    lengths = np.full(B, T)
    lengths[:2] = [120, 181]
    ys[2, 10, 0] = np.nan  # a missing entry at a real step
    init = ssmjax.HMM.from_data(ys, 2, f"{name}_regression", inputs=u, lengths=lengths, key=jax.random.key(2))
    nan_pad, zero_pad = (ys.copy(), u.copy()), (ys.copy(), u.copy())
    for b, n in enumerate(lengths):
        nan_pad[0][b, n:], nan_pad[1][b, n:] = np.nan, np.inf
        zero_pad[0][b, n:], zero_pad[1][b, n:] = 0.0, 0.0
    fit, lls, info = ssmjax.fit_em(init, nan_pad[0], inputs=nan_pad[1], lengths=lengths, max_iters=60, tol=1e-9)
    # the first entry is the initial model's exact log-likelihood; EM never decreases it
    assert_allclose(lls[0], np.sum(_logliks(init, ys, u, lengths)), rtol=1e-12)
    assert np.all(np.diff(np.asarray(lls)) >= -1e-9 * abs(float(lls[0])))
    assert float(lls[-1]) >= float(np.sum(_logliks(true, ys, u, lengths)))
    order = np.argsort(np.asarray(fit.emissions.biases[:, 0]))
    order_true = np.argsort(np.asarray(true.emissions.biases[:, 0]))
    # about two standard errors of the coefficients at these sizes
    atol = 0.15 if name == "poisson" else 0.4
    assert_allclose(fit.emissions.weights[order], true.emissions.weights[order_true], atol=atol)
    assert_allclose(fit.emissions.biases[order], true.emissions.biases[order_true], atol=atol)
    # whatever the padding holds, the same fit (for one family through fit_em_restarts: a batch of models)
    if name == "poisson":
        stacked = jax.tree.map(lambda a: jnp.stack([a, a]) if eqx.is_array(a) else a, init)
        again, scores, _ = ssmjax.fit_em_restarts(stacked, zero_pad[0], inputs=zero_pad[1], lengths=lengths,
                                                  max_iters=60, tol=1e-9)
        assert_allclose(scores, np.sum(_logliks(fit, ys, u, lengths)), rtol=1e-10)
    else:
        again, _, _ = ssmjax.fit_em(init, zero_pad[0], inputs=zero_pad[1], lengths=lengths, max_iters=60, tol=1e-9)
    assert_allclose(again.emissions.weights, fit.emissions.weights, rtol=1e-8, atol=1e-10)
    # the batched E-step's statistics give the M-step of the per-sequence E-steps' statistics combined
    (batched, loglik), (per_seq, loglik_seq) = _batched_and_per_sequence_stats(
        init, jnp.asarray(nan_pad[0]), jnp.asarray(lengths), jnp.asarray(nan_pad[1]))
    assert_allclose(loglik, loglik_seq, rtol=1e-12)
    m_step = eqx.filter_jit(lambda m, s: m._m_step(s, frozenset()))
    for x, y in zip(jax.tree.leaves(m_step(init, batched)), jax.tree.leaves(m_step(init, per_seq))):
        assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def test_input_driven_hmm_with_glm_emissions_and_fit_sgd():
    """An IO-HMM whose emissions are a GLM on the same inputs: its vmapped per-sequence E-step
    concatenates the emission statistics; EM is monotone. fit_sgd lowers the loss (frozen biases
    stay), and gradients agree with central differences."""
    import optax

    true, ys, u = _simulate("bernoulli", B=4, T=60)
    io = ssmjax.InputDrivenHMM(true.initial_probs, true.transition_matrix,
                               eqx.tree_at(lambda e: e.biases, true.emissions, 0.5 * true.emissions.biases),
                               transition_weights=jnp.zeros((2, 2, 2)))
    _, lls, _ = ssmjax.fit_em(io, ys, inputs=u, max_iters=8, tol=0.0)
    assert np.all(np.diff(np.asarray(lls)) >= -1e-9 * abs(float(lls[0])))
    fitted, losses = ssmjax.fit_sgd(true, ys, optax.adam(5e-2), inputs=u, num_steps=25, frozen=("emissions.biases",),
                                    key=jax.random.key(4))
    assert np.all(np.isfinite(np.asarray(losses))) and float(losses[-1]) < float(losses[0])
    assert_allclose(fitted.emissions.biases, true.emissions.biases, rtol=0)

    def loglik(a):
        return eqx.tree_at(lambda m: m.emissions.weights, true, true.emissions.weights.at[1, 0, 0].set(a)).marginal_loglik(
            ys[0], inputs=u[0])

    a0, h = float(true.emissions.weights[1, 0, 0]), 1e-5
    assert_allclose(jax.grad(loglik)(a0), (loglik(a0 + h) - loglik(a0 - h)) / (2 * h), rtol=1e-6)


def test_float32_em_is_stable_and_monotone():
    true, ys, u = _simulate("poisson", B=3, T=80)
    init = ssmjax.HMM.from_data(ys, 2, "poisson_regression", inputs=u, key=jax.random.key(5))
    init32 = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_array(a) else a, init)
    _, lls, info = ssmjax.fit_em(init32, ys.astype(np.float32), inputs=u.astype(np.float32), max_iters=30)
    assert lls.dtype == jnp.float32 and info.status in ("converged", "max_iters")
    assert np.all(np.diff(np.asarray(lls)) >= -1e-5 * abs(float(lls[0])))
    lengths = np.full(len(ys), ys.shape[1])
    assert float(lls[-1]) >= float(np.sum(_logliks(true, ys, u, lengths))) - 1e-4 * abs(float(lls[-1]))


def test_sampling_counts_and_errors_name_the_argument():
    rng = np.random.default_rng(6)
    poisson, bernoulli = _hmm(rng, _glm(rng, "poisson")), _hmm(rng, _glm(rng, "bernoulli"))
    u = jnp.asarray(rng.normal(size=(5, DU)))
    states, counts = poisson.sample(5, inputs=u, key=jax.random.key(0))
    assert counts.shape == (5, D) and np.all(np.asarray(counts) >= 0)
    assert set(np.unique(np.asarray(bernoulli.sample(5, inputs=u, key=jax.random.key(0))[1]))) <= {0, 1}
    assert poisson.emissions.parameter_counts() == {"weights": K * D * DU, "biases": K * D}
    assert poisson.num_parameters(frozen=("emissions.weights",)) == 1 + K * (K - 1) + K * D
    y = jnp.ones((5, D))
    with pytest.raises(ValueError, match="needs `inputs`"):
        poisson.filter(y)
    with pytest.raises(ValueError, match="`inputs` must have shape"):
        poisson.filter(y, inputs=jnp.zeros((5, DU + 1)))
    with pytest.raises(ValueError, match="`inputs` must be finite"):
        poisson.filter(y, inputs=u.at[2, 0].set(jnp.inf))
    with pytest.raises(ValueError, match=r"non-negative integer counts \(NaN for missing\); got -1.0"):
        poisson.filter(y.at[1, 0].set(-1.0), inputs=u)
    with pytest.raises(ValueError, match="non-negative integer counts"):
        poisson.filter(y.at[1, 0].set(0.5), inputs=u)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        bernoulli.filter(y.at[1, 0].set(2.0), inputs=u)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        ssmjax.fit_em(bernoulli, (2 * y)[None], inputs=u[None])
    with pytest.raises(ValueError, match="`inputs` must be finite"):
        ssmjax.fit_em(bernoulli, y[None], inputs=u.at[0, 0].set(jnp.nan)[None])
    with pytest.raises(ValueError, match="`emissions` must have shape"):
        bernoulli.filter(jnp.ones((5, D + 1)), inputs=u)
    with pytest.raises(ValueError, match="`weights` must be finite"):
        ssmjax.PoissonRegressionEmissions(weights=jnp.full((2, 1, 1), jnp.nan), biases=jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="`biases` must have shape"):
        ssmjax.PoissonRegressionEmissions(weights=jnp.zeros((2, 1, 1)), biases=jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="at least one input column"):
        ssmjax.BernoulliRegressionEmissions(weights=jnp.zeros((2, 1, 0)), biases=jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="needs `inputs`"):
        ssmjax.HMM.from_data(jnp.ones((1, 5, 1)), 2, "poisson_regression", key=jax.random.key(0))
    with pytest.raises(ValueError, match="`covariates` must have shape"):
        poisson.emissions.log_prob(y[0], jnp.zeros(DU + 1))
