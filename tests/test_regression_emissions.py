"""Emissions that regress on covariates: LinearRegressionEmissions (inputs) and AutoregressiveEmissions (lags).

Oracles: scipy's normal density at W x + b, brute-force enumeration of every state path, NumPy
weighted least squares for the M-step (free and constrained), statsmodels' MarkovRegression and
MarkovAutoregression maximised log-likelihoods on data statsmodels ships, dynamax's
LinearRegressionHMM log-likelihood.
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

K, D, P = 2, 2, 3


def _regression(rng, k=K, d=D, p=P, cls=ssmjax.LinearRegressionEmissions, **kw):
    a = rng.normal(size=(k, d, d))
    covs = a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(d)
    return cls(weights=jnp.asarray(0.5 * rng.normal(size=(k, d, p))), biases=jnp.asarray(rng.normal(size=(k, d))),
               covs=jnp.asarray(covs), **kw)


def _hmm(rng, emissions, k=K):
    trans = rng.dirichlet(np.ones(k) * 2, size=k)
    return ssmjax.HMM(jnp.asarray(rng.dirichlet(np.ones(k))), jnp.asarray(trans), emissions)


def _scipy_lls(model, y, x):
    w, b, covs = (np.asarray(a) for a in (model.weights, model.biases, model.covs))
    return np.stack([st.multivariate_normal(w[k] @ x + b[k], covs[k]).logpdf(y) for k in range(len(b))])


def test_log_likelihoods_match_scipy_with_missing_steps_and_padding():
    rng = np.random.default_rng(0)
    model = _regression(rng)
    y, u = rng.normal(size=(7, D)), rng.normal(size=(7, P))
    y[2] = np.nan  # a missing step
    lls = model.log_likelihoods(jnp.asarray(y), inputs=jnp.asarray(u), length=6)
    expected = np.stack([_scipy_lls(model, y[t], u[t]) for t in range(7)])
    expected[2] = 0.0
    expected[6] = 0.0  # padding
    assert_allclose(lls, expected, rtol=1e-10, atol=1e-12)
    assert_allclose(model.log_prob(jnp.asarray(y[0]), jnp.asarray(u[0])), expected[0], rtol=1e-10)
    # garbage in the padding reaches nothing
    y_bad, u_bad = y.copy(), u.copy()
    y_bad[6], u_bad[6] = np.inf, np.nan
    assert_allclose(model.log_likelihoods(jnp.asarray(y_bad), inputs=jnp.asarray(u_bad), length=6), expected, rtol=1e-10)


def test_autoregressive_conditions_on_the_first_lags_and_equals_enumeration():
    rng = np.random.default_rng(1)
    p = 2
    ar = _regression(rng, d=1, p=p * 1 + 1, cls=ssmjax.AutoregressiveEmissions, num_lags=p)  # one input column
    hmm = _hmm(rng, ar)
    T = 7
    y, u = rng.normal(size=(T, 1)), rng.normal(size=(T, 1))
    lls = np.asarray(hmm.log_likelihoods(jnp.asarray(y), inputs=jnp.asarray(u)))
    assert np.all(lls[:p] == 0.0)
    for t in range(p, T):
        x = np.concatenate([y[t - 1], y[t - 2], u[t]])
        assert_allclose(lls[t], _scipy_lls(ar, y[t], x), rtol=1e-10)
    for length in (None, 5):
        post = hmm.smoother(jnp.asarray(y), inputs=jnp.asarray(u), length=length)
        n = length or T
        loglik, marg = enumerate_paths(hmm.initial_probs, hmm.transition_matrix, lls[:n])
        assert_allclose(post.marginal_loglik, loglik, rtol=1e-10)
        assert_allclose(post.smoothed_probs[: length or T], marg, rtol=1e-8, atol=1e-12)


def _weighted_lstsq(y, x, w, fit_weights=True, fit_bias=True, old_w=None, old_b=None):
    cols = ([x] if fit_weights else []) + ([np.ones((len(y), 1))] if fit_bias else [])
    target = y - (0 if fit_weights else x @ old_w.T) - (0 if fit_bias else old_b)
    design = np.concatenate(cols, axis=1)
    sw = np.sqrt(w)[:, None]
    coef = np.linalg.lstsq(design * sw, target * sw, rcond=None)[0].T
    w_new = coef[:, : x.shape[1]] if fit_weights else old_w
    b_new = coef[:, -1] if fit_bias else old_b
    resid = y - x @ w_new.T - b_new
    return w_new, b_new, (w[:, None] * resid).T @ resid / w.sum()


@pytest.mark.parametrize("frozen", [(), ("biases",), ("weights",)])
def test_m_step_is_weighted_least_squares(frozen):
    rng = np.random.default_rng(2)
    model = _regression(rng, k=3, min_variance=0.0)
    n = 60
    y, u = rng.normal(size=(n, D)), rng.normal(size=(n, P))
    y[5] = np.nan  # a missing step adds nothing
    weights = rng.dirichlet(np.ones(3), size=n)
    weights[:, 2] = 0.0  # an empty state keeps its parameters
    mask = np.ones(n, bool)
    mask[-4:] = False  # padding
    rows = model.joined(jnp.asarray(y), jnp.asarray(u))
    new = model.m_step_from_stats(model.suff_stats(rows, jnp.asarray(weights), jnp.asarray(mask)), frozen=frozenset(frozen))
    keep = mask & ~np.isnan(y).any(1)
    for k in range(2):
        w_k, b_k, cov_k = _weighted_lstsq(
            y[keep], u[keep], weights[keep, k], "weights" not in frozen, "biases" not in frozen,
            np.asarray(model.weights[k]), np.asarray(model.biases[k]),
        )
        assert_allclose(new.weights[k], w_k, rtol=1e-8, atol=1e-10)
        assert_allclose(new.biases[k], b_k, rtol=1e-8, atol=1e-10)
        assert_allclose(new.covs[k], cov_k, rtol=1e-8, atol=1e-10)
    for name in ("weights", "biases", "chol_covs"):
        assert_allclose(getattr(new, name)[2], getattr(model, name)[2], rtol=0)


def test_from_data_start_is_weighted_least_squares_and_traces():
    """The start's regressions are conditionals of weighted Gaussian moments: equal to weighted least
    squares (NumPy's lstsq) with the same weights; ``from_data`` under ``vmap`` over keys (its host
    arithmetic through a callback) gives the eager call's start, key by key."""
    from ssmjax._hmm.emissions.regression import _conditional_regressions

    rng = np.random.default_rng(3)
    n = 80
    y, u = rng.normal(size=(n, D)), rng.normal(size=(n, P))
    weights = rng.dirichlet(np.ones(2), size=n)
    rows = np.concatenate([y, u], axis=1)
    totals = weights.sum(0)
    means = weights.T @ rows / totals[:, None]
    covs = np.stack([((rows - m).T * w) @ (rows - m) for m, w in zip(means, weights.T)]) / totals[:, None, None]
    w_fit, b_fit, cov_fit = _conditional_regressions(means, covs, D)
    for k in range(2):
        w_k, b_k, cov_k = _weighted_lstsq(y, u, weights[:, k], True, True, np.zeros((D, P)), np.zeros(D))
        assert_allclose(w_fit[k], w_k, rtol=1e-10, atol=1e-12)
        assert_allclose(b_fit[k], b_k, rtol=1e-10, atol=1e-12)
        assert_allclose(cov_fit[k], cov_k, rtol=1e-10, atol=1e-12)

    ys, us = jnp.asarray(rng.normal(size=(3, 40, D))), jnp.asarray(rng.normal(size=(3, 40, P)))
    keys = jax.random.split(jax.random.key(0), 2)
    starts = [
        lambda k: ssmjax.LinearRegressionEmissions.from_data(ys, us, K, key=k),
        lambda k: ssmjax.AutoregressiveEmissions.from_data(ys, K, num_lags=2, inputs=us, key=k),
    ]
    for start in starts:
        traced = eqx.filter_vmap(start)(keys)
        for i, key in enumerate(keys):
            eager = start(key)
            for name in ("weights", "biases", "chol_covs"):
                assert_allclose(getattr(traced, name)[i], getattr(eager, name), rtol=1e-12)
        assert not np.allclose(traced.weights[0], traced.weights[1])  # the keys' k-means differ


def test_em_recovers_a_switching_regression_and_batches_like_single_sequences():
    rng = np.random.default_rng(3)
    true = ssmjax.HMM(
        jnp.array([0.5, 0.5]), jnp.array([[0.95, 0.05], [0.1, 0.9]]),
        ssmjax.LinearRegressionEmissions(weights=jnp.array([[[1.0, -1.0]], [[-2.0, 0.5]]]),
                                         biases=jnp.array([[0.0], [1.0]]), covs=jnp.array([[[0.1]], [[0.2]]])),
    )
    B, T = 8, 150
    u = jnp.asarray(rng.normal(size=(B, T, 2)))
    keys = jax.random.split(jax.random.key(0), B)
    _, ys = jax.vmap(lambda k, x: true.sample(T, inputs=x, key=k))(keys, u)
    lengths = np.full(B, T)
    lengths[0] = 100
    init = ssmjax.HMM.from_data(ys, 2, "linear_regression", inputs=u, lengths=lengths, key=jax.random.key(1))
    ys, u = np.asarray(ys).copy(), np.asarray(u).copy()
    ys[0, 100:], u[0, 100:] = np.nan, np.inf  # the padding may hold anything
    fit, lls, info = ssmjax.fit_em(init, ys, inputs=u, lengths=lengths, max_iters=60)
    # the first entry is the initial model's exact log-likelihood; EM never decreases it
    single = sum(float(init.marginal_loglik(ys[b], inputs=u[b], length=int(lengths[b]))) for b in range(B))
    assert_allclose(lls[0], single, rtol=1e-10)
    assert np.all(np.diff(np.asarray(lls)) > -1e-8)
    assert float(lls[-1]) >= float(true.log_likelihood(ys, inputs=u, lengths=lengths))
    order = np.argsort(np.asarray(fit.emissions.biases[:, 0]))
    assert_allclose(fit.emissions.weights[order], true.emissions.weights, atol=0.05)
    assert_allclose(fit.emissions.covs[order], true.emissions.covs, atol=0.03)


def test_autoregressive_em_sampling_and_gradients():
    true = ssmjax.HMM(
        jnp.array([0.5, 0.5]), jnp.array([[0.95, 0.05], [0.1, 0.9]]),
        ssmjax.AutoregressiveEmissions(weights=jnp.array([[[0.9, -0.2]], [[-0.5, 0.1]]]), biases=jnp.array([[0.0], [1.0]]),
                                       covs=jnp.array([[[0.1]], [[0.2]]]), num_lags=2),
    )
    keys = jax.random.split(jax.random.key(0), 10)
    _, ys = jax.vmap(lambda k: true.sample(200, key=k))(keys)
    init = ssmjax.HMM.from_data(ys, 2, "autoregressive", num_lags=2, key=jax.random.key(1))
    fit, lls, _ = ssmjax.fit_em(init, ys, max_iters=60)
    assert float(lls[-1]) >= float(true.log_likelihood(ys))
    order = np.argsort(np.asarray(fit.emissions.biases[:, 0]))
    assert_allclose(fit.emissions.weights[order], true.emissions.weights, atol=0.05)
    # vmap of the smoother (batched core) equals the per-sequence calls
    batched = jax.jit(jax.vmap(lambda y: fit.smoother(y).smoothed_probs))(ys[:3])
    for b in range(3):
        assert_allclose(batched[b], fit.smoother(ys[b]).smoothed_probs, rtol=1e-9, atol=1e-12)
    # gradient of the log-likelihood against central differences in one coefficient
    def loglik(a):
        e = eqx.tree_at(lambda m: m.emissions.weights, fit, fit.emissions.weights.at[0, 0, 0].set(a))
        return e.marginal_loglik(ys[0])
    a0, h = float(fit.emissions.weights[0, 0, 0]), 1e-5
    assert_allclose(jax.grad(loglik)(a0), (loglik(a0 + h) - loglik(a0 - h)) / (2 * h), rtol=1e-6)


def test_fit_sgd_and_save_load_with_inputs(tmp_path):
    import optax

    rng = np.random.default_rng(5)
    model = _hmm(rng, _regression(rng))
    u = jnp.asarray(rng.normal(size=(3, 40, P)))
    ys = jnp.asarray(rng.normal(size=(3, 40, D)))
    fitted, losses = ssmjax.fit_sgd(model, ys, optax.adam(1e-2), inputs=u, num_steps=20)
    assert np.all(np.isfinite(np.asarray(losses))) and float(losses[-1]) < float(losses[0])
    path = tmp_path / "reg.eqx"
    ssmjax.save(path, fitted)
    loaded = ssmjax.load(path)
    assert_allclose(loaded.log_likelihood(ys, inputs=u), fitted.log_likelihood(ys, inputs=u), rtol=1e-12)
    ar = _hmm(rng, _regression(rng, d=1, p=2, cls=ssmjax.AutoregressiveEmissions, num_lags=2))
    ssmjax.save(path, ar)
    assert ssmjax.load(path).emissions.num_lags == 2


def test_errors_name_the_argument():
    rng = np.random.default_rng(6)
    reg = _hmm(rng, _regression(rng))
    y, u = jnp.zeros((5, D)), jnp.zeros((5, P))
    with pytest.raises(ValueError, match="needs `inputs`"):
        reg.filter(y)
    with pytest.raises(ValueError, match="`inputs` must have shape"):
        reg.filter(y, inputs=jnp.zeros((4, P)))
    with pytest.raises(ValueError, match="`inputs` must be finite"):
        reg.filter(y, inputs=u.at[1, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="NaN in every entry"):
        reg.filter(y.at[1, 0].set(jnp.nan), inputs=u)
    with pytest.raises(jax.errors.JaxRuntimeError, match="`inputs` must be finite"):  # under jit: at run time
        jax.jit(lambda a: reg.marginal_loglik(y, inputs=a))(u.at[0, 0].set(jnp.inf)).block_until_ready()
    with pytest.raises(ValueError, match="`inputs` must be None for PoissonEmissions"):
        ssmjax.HMM.from_data(jnp.ones((1, 5, 1)), 2, "poisson", inputs=jnp.ones((1, 5, 1)), key=jax.random.key(0))
    poisson = ssmjax.HMM.from_data(jnp.ones((1, 5, 1)), 2, "poisson", key=jax.random.key(0))
    with pytest.raises(ValueError, match="`inputs` must be None for PoissonEmissions"):
        poisson.smoother(jnp.ones((5, 1)), inputs=jnp.ones((5, 1)))
    ar = _hmm(rng, _regression(rng, d=1, p=3, cls=ssmjax.AutoregressiveEmissions, num_lags=3))
    with pytest.raises(ValueError, match="longer than 3 steps"):
        ar.filter(jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="no missing entries"):
        ar.filter(jnp.zeros((6, 1)).at[2, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="at least num_lags"):
        ssmjax.AutoregressiveEmissions(weights=jnp.zeros((2, 2, 3)), biases=jnp.zeros((2, 2)), covs=jnp.stack([jnp.eye(2)] * 2), num_lags=2)
    with pytest.raises(ValueError, match="`weights` must be finite"):
        ssmjax.LinearRegressionEmissions(weights=jnp.full((2, 1, 1), jnp.nan), biases=jnp.zeros((2, 1)), covs=jnp.ones((2, 1, 1)))


# --------------------------------------------------------------------------- peers


def _macrodata():
    sm = pytest.importorskip("statsmodels.api")
    return sm, sm.datasets.macrodata.load_pandas().data


def test_markov_regression_parity_with_statsmodels():
    """Switching intercept, slope on unemployment and variance for inflation (statsmodels' macrodata).

    At statsmodels' estimate (and its ergodic initial distribution) the log-likelihoods agree to
    round-off. ssmjax's maximum, over 20 parallel restarts perturbed around the pooled least-squares
    fit (``fit_em_restarts``), is at least statsmodels' (its initial distribution is free, so it
    nests statsmodels' model).
    """
    sm, data = _macrodata()
    infl, unemp = data["infl"].to_numpy(), data["unemp"].to_numpy()
    model = sm.tsa.MarkovRegression(infl, k_regimes=2, exog=unemp, switching_variance=True)
    res = model.fit(disp=False)  # its default start, deterministic (its random search can end at NaN)
    pr = dict(zip(model.param_names, res.params))
    y, u = jnp.asarray(infl)[None, :, None], jnp.asarray(unemp)[None, :, None]
    at_sm = ssmjax.HMM(
        jnp.asarray(model.initial_probabilities(res.params)), jnp.asarray(res.regime_transition[:, :, 0].T),
        ssmjax.LinearRegressionEmissions(
            weights=jnp.array([[[pr["x1[0]"]]], [[pr["x1[1]"]]]]), biases=jnp.array([[pr["const[0]"]], [pr["const[1]"]]]),
            covs=jnp.array([[[pr["sigma2[0]"]]], [[pr["sigma2[1]"]]]]),
        ),
    )
    assert_allclose(at_sm.log_likelihood(y, inputs=u), res.llf, rtol=1e-10)

    base = ssmjax.HMM.from_data(y, 2, "linear_regression", inputs=u, key=jax.random.key(0))
    coef = np.linalg.lstsq(np.c_[unemp, np.ones_like(unemp)], infl, rcond=None)[0]
    scale = np.std(infl - np.c_[unemp, np.ones_like(unemp)] @ coef)

    def perturbed(key):
        k1, k2 = jax.random.split(key)
        e = base.emissions
        e = eqx.tree_at(lambda m: (m.weights, m.biases), e, (
            coef[0] + 0.5 * jax.random.normal(k1, e.weights.shape), coef[1] + scale * jax.random.normal(k2, e.biases.shape)))
        return eqx.tree_at(lambda m: m.emissions, base, e)

    starts = eqx.filter_vmap(perturbed)(jax.random.split(jax.random.key(1), 20))
    _, scores, _ = ssmjax.fit_em_restarts(starts, y, inputs=u, max_iters=1000, tol=1e-10)
    assert float(jnp.max(scores)) >= res.llf - 1e-3


def test_markov_autoregression_parity_with_statsmodels():
    """A Markov-switching AR(2) of quarterly US GDP growth (statsmodels' macrodata): switching AR
    coefficients about a common mean, the first two quarters conditioned on, as statsmodels does.
    At statsmodels' estimate (intercepts mu (1 - phi_1 - phi_2), its ergodic initial distribution)
    the log-likelihoods agree to round-off; the ARHMM (free intercepts, variances and initial
    distribution) nests that model, so its EM maximum from ``HMM.from_data`` is at least statsmodels'.

    The variance does not switch here: with ``switching_variance=True`` and ``order >= 2``,
    statsmodels 0.14-0.15 broadcasts the variances against the regime of step t - 1 (its
    ``_conditional_loglikelihoods``), a different model (at order 1 the two agree).
    """
    sm, data = _macrodata()
    growth = 100 * np.diff(np.log(data["realgdp"].to_numpy()))
    model = sm.tsa.MarkovAutoregression(
        growth, k_regimes=2, order=2, switching_ar=True, switching_variance=False, switching_trend=False)
    res = model.fit(disp=False)  # its default start, deterministic (its random search can end at NaN)
    pr = dict(zip(model.param_names, res.params))
    phi = np.array([[pr[f"ar.L1[{k}]"], pr[f"ar.L2[{k}]"]] for k in range(2)])
    at_sm = ssmjax.HMM(
        jnp.asarray(model.initial_probabilities(res.params)), jnp.asarray(res.regime_transition[:, :, 0].T),
        ssmjax.AutoregressiveEmissions(
            weights=jnp.asarray(phi[:, None, :]), biases=jnp.asarray(pr["const"] * (1 - phi.sum(1)))[:, None],
            covs=jnp.full((2, 1, 1), pr["sigma2"]), num_lags=2,
        ),
    )
    y = jnp.asarray(growth)[None, :, None]
    assert_allclose(at_sm.log_likelihood(y), res.llf, rtol=1e-10)
    init = ssmjax.HMM.from_data(y, 2, "autoregressive", num_lags=2, key=jax.random.key(0))
    _, lls, info = ssmjax.fit_em(init, y, max_iters=1000, tol=1e-10)
    assert float(lls[-1]) >= res.llf - 1e-3


def test_linear_regression_hmm_parity_with_dynamax():
    pytest.importorskip("dynamax")
    from dynamax.hidden_markov_model import LinearRegressionHMM

    rng = np.random.default_rng(7)
    hmm = _hmm(rng, _regression(rng))
    y, u = jnp.asarray(rng.normal(size=(30, D))), jnp.asarray(rng.normal(size=(30, P)))
    dyn = LinearRegressionHMM(K, P, D)
    params, _ = dyn.initialize(
        jax.random.key(0), initial_probs=hmm.initial_probs, transition_matrix=hmm.transition_matrix,
        emission_weights=hmm.emissions.weights, emission_biases=hmm.emissions.biases, emission_covariances=hmm.emissions.covs,
    )
    assert_allclose(hmm.marginal_loglik(y, inputs=u), dyn.marginal_log_prob(params, y, inputs=u), rtol=1e-10)
