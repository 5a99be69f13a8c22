"""InputDrivenHMM: transition probabilities that depend on inputs (IO-HMM, GLM-HMM).

Oracles: brute-force enumeration with the transition matrices built by hand, the plain HMM at zero
weights, scipy's optimiser for the M-step's logistic regressions, finite differences, and
statsmodels' MarkovRegression with time-varying transition probabilities (``exog_tvtp``).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from helpers import assert_allclose, enumerate_paths

import ssmjax

K, DU = 3, 2


def _model(rng, emissions=None):
    trans = rng.dirichlet(np.ones(K) * 3, size=K)
    emissions = emissions or ssmjax.PoissonEmissions(rates=jnp.asarray([[1.0], [4.0], [9.0]]))
    return ssmjax.InputDrivenHMM(
        jnp.asarray(rng.dirichlet(np.ones(K))), jnp.asarray(trans), emissions,
        transition_weights=jnp.asarray(rng.normal(size=(K, K, DU))),
    )


def _matrices(model, u):
    """p(z_{t+1} = j | z_t = i, u_{t+1}), by hand."""
    logits = np.log(np.asarray(model.transition_matrix))[None] + np.einsum("ijd,td->tij", np.asarray(model.transition_weights), u[1:])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_inference_equals_enumeration_with_padding():
    rng = np.random.default_rng(0)
    model = _model(rng)
    T = 6
    y = rng.poisson(4.0, size=(T, 1))
    u = rng.normal(size=(T, DU))
    lls = np.asarray(model.log_likelihoods(jnp.asarray(y)))
    pi = np.asarray(model.initial_probs)
    for length in (None, 4):
        n = length or T
        loglik, marg = enumerate_paths(pi, _matrices(model, u[:n]), lls[:n])
        u_pad = u.copy()
        if length:
            u_pad[length:] = np.nan  # padding may hold anything
        post = model.smoother(jnp.asarray(y), inputs=jnp.asarray(u_pad), length=length)
        assert_allclose(post.marginal_loglik, loglik, rtol=1e-10)
        assert_allclose(post.smoothed_probs[:n], marg, rtol=1e-8, atol=1e-12)
    # zero weights: the plain HMM
    plain = ssmjax.HMM(model.initial_probs, model.transition_matrix, model.emissions)
    zero = eqx.tree_at(lambda m: m.transition_weights, model, jnp.zeros_like(model.transition_weights))
    assert_allclose(zero.marginal_loglik(jnp.asarray(y), inputs=jnp.asarray(u)), plain.marginal_loglik(jnp.asarray(y)), rtol=1e-12)


def test_m_step_maximises_each_rows_logistic_regression():
    """After the M-step the transition coefficients maximise sum_t sum_ij xi_t(i, j) log p_t(i, j)
    (scipy's BFGS on the same objective), and the emissions get their closed-form M-step."""
    rng = np.random.default_rng(1)
    model = _model(rng)
    B, T = 3, 40
    u = jnp.asarray(rng.normal(size=(B, T, DU)))
    _, ys = jax.vmap(lambda k, x: model.sample(T, inputs=x, key=k))(jax.random.split(jax.random.key(0), B), u)
    lengths = jnp.array([T, T, 30])
    stats, _ = model._batched_e_step(model._prepare_batch(ys, lengths, u))
    m_step = eqx.filter_jit(lambda m, s: m._m_step(s, frozenset()))
    new = model
    for _ in range(6):  # Newton converges: a few M-steps on fixed statistics reach the maximiser
        new = m_step(new, stats)
    pairs = np.asarray(stats["transitions"]["pairs"]).reshape(-1, K, K)
    u1 = np.asarray(stats["transitions"]["inputs"]).reshape(-1, DU + 1)
    for i in range(K):
        def neg(theta):
            eta = u1 @ theta.reshape(K, DU + 1).T
            eta = eta - eta.max(1, keepdims=True)
            return -(np.sum(pairs[:, i] * eta) - np.sum(pairs[:, i].sum(1) * np.log(np.exp(eta).sum(1))))
        best = scipy.optimize.minimize(neg, np.zeros(K * (DU + 1)), method="BFGS", options={"gtol": 1e-10})
        coefs = np.concatenate([np.asarray(new.transition_weights[i]), np.asarray(new.transition_log_probs[i])[:, None]], 1)
        assert neg(coefs.ravel()) <= best.fun + 1e-7 * abs(best.fun)
    assert_allclose(new.emissions.rates, model.emissions.m_step_from_stats(stats["emissions"]).rates, rtol=1e-12)


def test_em_is_monotone_and_recovers_the_coefficients():
    rng = np.random.default_rng(2)
    true = ssmjax.InputDrivenHMM(
        jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [6.0]])),
        transition_weights=jnp.array([[[-1.0, 0.5], [1.0, -0.5]], [[0.75, -0.25], [-0.75, 0.25]]]),
    )
    B, T = 16, 250
    u = jnp.asarray(rng.normal(size=(B, T, 2)))
    _, ys = jax.vmap(lambda k, x: true.sample(T, inputs=x, key=k))(jax.random.split(jax.random.key(0), B), u)
    init = ssmjax.InputDrivenHMM.from_data(ys, 2, "poisson", inputs=u, key=jax.random.key(1))
    # a ragged batch whose padding holds NaN in emissions and inputs: the first EM entry is the
    # exact log-likelihood of the real steps
    lengths = np.full(B, T)
    lengths[:3] = [50, 120, 249]
    pad_y, pad_u = np.asarray(ys, float).copy(), np.asarray(u).copy()
    for b, n in enumerate(lengths):
        pad_y[b, n:], pad_u[b, n:] = np.nan, np.nan
    fit, lls, info = ssmjax.fit_em(init, pad_y, inputs=pad_u, lengths=lengths, max_iters=200, tol=1e-10)
    exact = sum(float(init.marginal_loglik(ys[b, :n], inputs=u[b, :n])) for b, n in enumerate(lengths))
    assert_allclose(lls[0], exact, rtol=1e-10)
    assert info.converged and np.all(np.isfinite(np.asarray(lls))) and np.all(np.diff(np.asarray(lls)) > -1e-8)
    assert float(lls[-1]) >= float(true.log_likelihood(pad_y, inputs=pad_u, lengths=lengths))
    # identified up to a shift common to a row's entries: compare differences between destinations
    w, w_true = np.asarray(fit.transition_weights), np.asarray(true.transition_weights)
    assert_allclose(w[:, 1] - w[:, 0], w_true[:, 1] - w_true[:, 0], atol=0.25)


def test_gradients_fit_sgd_save_load_and_regression_emissions(tmp_path):
    import optax

    rng = np.random.default_rng(3)
    reg = ssmjax.LinearRegressionEmissions(weights=jnp.asarray(rng.normal(size=(K, 1, DU))), biases=jnp.zeros((K, 1)),
                                           covs=jnp.ones((K, 1, 1)))
    model = _model(rng, reg)
    y, u = jnp.asarray(rng.normal(size=(20, 1))), jnp.asarray(rng.normal(size=(20, DU)))
    # the emissions read the same inputs
    expected = ssmjax.hmm_filter(model.initial_probs, jnp.asarray(_matrices(model, np.asarray(u))),
                                 reg.log_likelihoods(y, inputs=u)).marginal_loglik
    assert_allclose(model.marginal_loglik(y, inputs=u), expected, rtol=1e-10)

    def loglik(a):
        return eqx.tree_at(lambda m: m.transition_weights, model, model.transition_weights.at[0, 1, 0].set(a)).marginal_loglik(y, inputs=u)

    a0, h = float(model.transition_weights[0, 1, 0]), 1e-5
    assert_allclose(jax.grad(loglik)(a0), (loglik(a0 + h) - loglik(a0 - h)) / (2 * h), rtol=1e-6)
    fitted, losses = ssmjax.fit_sgd(model, y[None], optax.adam(1e-2), inputs=u[None], num_steps=20)
    assert float(losses[-1]) < float(losses[0])
    ssmjax.save(tmp_path / "io.eqx", fitted)
    assert_allclose(ssmjax.load(tmp_path / "io.eqx").marginal_loglik(y, inputs=u), fitted.marginal_loglik(y, inputs=u), rtol=1e-12)


def test_errors_name_the_argument():
    rng = np.random.default_rng(4)
    model = _model(rng)
    y, u = jnp.ones((5, 1)), jnp.zeros((5, DU))
    with pytest.raises(ValueError, match="needs `inputs`"):
        model.filter(y)
    with pytest.raises(ValueError, match="`inputs` must have shape"):
        model.filter(y, inputs=jnp.zeros((5, DU + 1)))
    with pytest.raises(ValueError, match="`inputs` must be finite"):
        model.filter(y, inputs=u.at[2, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="no zero entry"):
        ssmjax.InputDrivenHMM(jnp.ones(2) / 2, jnp.array([[1.0, 0.0], [0.5, 0.5]]),
                              ssmjax.PoissonEmissions(rates=jnp.ones((2, 1))), transition_weights=jnp.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="`transition_weights` must have shape"):
        ssmjax.InputDrivenHMM(jnp.ones(2) / 2, jnp.full((2, 2), 0.5),
                              ssmjax.PoissonEmissions(rates=jnp.ones((2, 1))), transition_weights=jnp.zeros((3, 2, 1)))
    with pytest.raises(ValueError, match="must agree"):
        ssmjax.InputDrivenHMM(
            jnp.ones(2) / 2, jnp.full((2, 2), 0.5),
            ssmjax.LinearRegressionEmissions(weights=jnp.zeros((2, 1, 3)), biases=jnp.zeros((2, 1)), covs=jnp.ones((2, 1, 1))),
            transition_weights=jnp.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="takes no prior"):
        ssmjax.fit_em(model, y[None], inputs=u[None], prior=ssmjax.HMMPrior())


def test_markov_regression_tvtp_parity_with_statsmodels():
    """Switching mean and variance of inflation with transition probabilities driven by the
    (standardised) unemployment rate, statsmodels' macrodata. At statsmodels' estimate -- its
    initial distribution moved one transition ahead, since its first transition leads into the
    first observation -- the log-likelihoods agree to round-off; ssmjax's maximum over 10 parallel
    restarts (means perturbed around ``from_data``'s) is at least statsmodels'."""
    sm = pytest.importorskip("statsmodels.api")
    data = sm.datasets.macrodata.load_pandas().data
    infl, unemp = data["infl"].to_numpy(), data["unemp"].to_numpy()
    x = (unemp - unemp.mean()) / unemp.std()
    model = sm.tsa.MarkovRegression(infl, k_regimes=2, exog_tvtp=sm.add_constant(x), switching_variance=True)
    res = model.fit(disp=False)
    pr = dict(zip(model.param_names, res.params))
    rt = res.regime_transition  # [to, from, t]
    logits = np.array([[pr["p[0->0].tvtp0"], 0.0], [pr["p[1->0].tvtp0"], 0.0]])
    weights = np.array([[[pr["p[0->0].tvtp1"]], [0.0]], [[pr["p[1->0].tvtp1"]], [0.0]]])
    at_sm = ssmjax.InputDrivenHMM(
        jnp.asarray(rt[:, :, 0] @ model.initial_probabilities(res.params, rt)),
        jnp.asarray(np.exp(logits) / np.exp(logits).sum(1, keepdims=True)),
        ssmjax.GaussianEmissions(means=jnp.array([[pr["const[0]"]], [pr["const[1]"]]]),
                                 covs=jnp.array([[[pr["sigma2[0]"]]], [[pr["sigma2[1]"]]]])),
        transition_weights=jnp.asarray(weights),
    )
    y, u = jnp.asarray(infl)[None, :, None], jnp.asarray(x)[None, :, None]
    assert_allclose(at_sm.log_likelihood(y, inputs=u), res.llf, rtol=1e-10)

    start = ssmjax.InputDrivenHMM.from_data(y, 2, "gaussian", inputs=u, key=jax.random.key(0))

    def perturbed(key):
        e = start.emissions
        return eqx.tree_at(lambda m: m.emissions.means, start, e.means + 2.0 * jax.random.normal(key, e.means.shape))

    starts = eqx.filter_vmap(perturbed)(jax.random.split(jax.random.key(3), 10))
    _, scores, _ = ssmjax.fit_em_restarts(starts, y, inputs=u, max_iters=500, tol=1e-10)
    assert float(jnp.max(scores)) >= res.llf - 1e-3


def test_shared_weights_glm_hmm():
    """Weights shared by every origin state (GLM-HMM): inference is the per-row model's with equal
    rows; the M-step (biases per row, then the shared weights) reaches the joint maximiser over
    (W, b) of the expected complete-data log-likelihood (scipy's BFGS over all rows at once); EM
    and fit_sgd keep the rows tied, and the model counts (K - 1) Du weights."""
    import optax

    rng = np.random.default_rng(4)
    base = _model(rng)
    shared = rng.normal(size=(K, DU))
    model = ssmjax.InputDrivenHMM(base.initial_probs, base.transition_matrix, base.emissions,
                                  transition_weights=jnp.asarray(shared), shared_weights=True)
    rows = ssmjax.InputDrivenHMM(base.initial_probs, base.transition_matrix, base.emissions,
                                 transition_weights=jnp.asarray(np.broadcast_to(shared, (K, K, DU))))
    B, T = 3, 40
    u = jnp.asarray(rng.normal(size=(B, T, DU)))
    _, ys = jax.vmap(lambda k, x: model.sample(T, inputs=x, key=k))(jax.random.split(jax.random.key(5), B), u)
    assert_allclose(model.log_likelihood(ys, inputs=u), rows.log_likelihood(ys, inputs=u), rtol=1e-12)
    assert model.num_parameters() == rows.num_parameters() - (K - 1) * (K - 1) * DU

    stats, _ = model._batched_e_step(model._prepare_batch(ys, jnp.full((B,), T), u))
    m_step = eqx.filter_jit(lambda m, s: m._m_step(s, frozenset()))
    new = model
    for _ in range(10):  # conditional maximisations on fixed statistics converge to the joint maximiser
        new = m_step(new, stats)
    pairs = np.asarray(stats["transitions"]["pairs"]).reshape(-1, K, K)
    x = np.asarray(stats["transitions"]["inputs"]).reshape(-1, DU + 1)[:, :DU]

    def neg(theta):
        w, b = theta[: K * DU].reshape(K, DU), theta[K * DU :].reshape(K, K)
        eta = (x @ w.T)[:, None, :] + b[None]  # (N, origin, destination)
        eta = eta - eta.max(-1, keepdims=True)
        return -(np.sum(pairs * eta) - np.sum(pairs.sum(-1) * np.log(np.exp(eta).sum(-1))))

    best = scipy.optimize.minimize(neg, np.zeros(K * DU + K * K), method="BFGS", options={"gtol": 1e-10})
    ours = np.concatenate([np.asarray(new.transition_weights[0]).ravel(), np.asarray(new.transition_log_probs).ravel()])
    assert neg(ours) <= best.fun + 1e-7 * abs(best.fun)
    np.testing.assert_array_equal(new.transition_weights, np.broadcast_to(new.transition_weights[0], (K, K, DU)))

    fit, lls, _ = ssmjax.fit_em(model, ys, inputs=u, max_iters=15, tol=0.0)
    assert np.all(np.diff(np.asarray(lls)) >= -1e-9 * np.abs(np.asarray(lls[1:])))
    sgd, _ = ssmjax.fit_sgd(model, ys, optax.adam(0.05), inputs=u, num_steps=10)
    for fitted in (fit, sgd):
        assert fitted.shared_weights
        np.testing.assert_array_equal(fitted.transition_weights,
                                      np.broadcast_to(fitted.transition_weights[0], (K, K, DU)))
    with pytest.raises(ValueError, match="must be equal for every origin state"):
        ssmjax.InputDrivenHMM(base.initial_probs, base.transition_matrix, base.emissions,
                              transition_weights=base.transition_weights, shared_weights=True)
