"""Kalman EM and gradient fitting of the LGSSM.

Oracles:
* pykalman's EM trajectory from the same start (fully observed data);
* Fisher's identity: the gradient of the EM objective Q(theta | theta0) at theta0
  equals the gradient of the exact log-likelihood (autodiff through the Kalman
  filter) -- a sharp test of the expected statistics, including missing entries;
* stationarity of Q in the free parameters at the M-step output, for any set of
  frozen fields -- a test that every M-step is the exact constrained maximiser;
* the published maximum-likelihood variances of the Nile local-level model.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ssmjax
from ssmjax._lgssm import fit as lgssm_fit
from ssmjax._lgssm.constraints import fixed_of

FIELDS = ("initial_mean", "initial_cov", "transition_matrix", "transition_cov", "emission_matrix",
          "emission_cov", "transition_input_matrix", "emission_input_matrix", "transition_offset",
          "emission_offset")


def simulate(rng, p, T, inputs=None):
    dx, dy = p["transition_matrix"].shape[0], p["emission_matrix"].shape[0]
    x = np.zeros((T, dx))
    y = np.zeros((T, dy))
    x[0] = rng.multivariate_normal(p["initial_mean"], p["initial_cov"])
    for t in range(T):
        if t:
            x[t] = p["transition_matrix"] @ x[t - 1] + rng.multivariate_normal(np.zeros(dx), p["transition_cov"])
            if p.get("transition_input_matrix") is not None:
                x[t] += p["transition_input_matrix"] @ inputs[t]
            if p.get("transition_offset") is not None:
                x[t] += p["transition_offset"]
        y[t] = p["emission_matrix"] @ x[t] + rng.multivariate_normal(np.zeros(dy), p["emission_cov"])
        if p.get("emission_input_matrix") is not None:
            y[t] += p["emission_input_matrix"] @ inputs[t]
        if p.get("emission_offset") is not None:
            y[t] += p["emission_offset"]
    return x, y


def full_params(rng, dx=2, dy=3, du=2, inputs=True, offsets=True):
    p = dict(
        initial_mean=rng.standard_normal(dx),
        initial_cov=np.eye(dx) * 0.8 + 0.1,
        transition_matrix=np.array([[0.9, 0.2], [-0.1, 0.8]]),
        transition_cov=np.array([[0.3, 0.05], [0.05, 0.2]]),
        emission_matrix=rng.standard_normal((dy, dx)),
        emission_cov=np.diag(rng.uniform(0.2, 0.8, dy)) + 0.05,
    )
    if inputs:
        p["transition_input_matrix"] = rng.standard_normal((dx, du)) * 0.5
        p["emission_input_matrix"] = rng.standard_normal((dy, du)) * 0.5
    if offsets:
        p["transition_offset"] = rng.standard_normal(dx) * 0.3
        p["emission_offset"] = rng.standard_normal(dy)
    return p


def make_model(p):
    return ssmjax.LGSSM(**{k: jnp.asarray(v) for k, v in p.items() if v is not None})


def q_function(model, stats):
    """Expected complete-data log-likelihood from the summed statistics (independent algebra)."""
    def gauss_term(count, s_tt, s_tz, s_zz, w, cov):
        d = cov.shape[0]
        resid = s_tt - w @ s_tz.T - s_tz @ w.T + w @ s_zz @ w.T
        _, logdet = jnp.linalg.slogdet(cov)
        return -0.5 * (count * (d * jnp.log(2 * jnp.pi) + logdet) + jnp.trace(jnp.linalg.solve(cov, resid)))

    n0, s1, s11 = stats["init_count"], stats["init_mean"], stats["init_second"]
    mu = model.initial_mean
    init = gauss_term(n0, s11, s1[:, None], n0 * jnp.ones((1, 1)), mu[:, None], model.initial_cov)
    w_tr = [model.transition_matrix]
    if model.transition_input_matrix is not None:
        w_tr.append(model.transition_input_matrix)
    if model.transition_offset is not None:
        w_tr.append(model.transition_offset[:, None])
    w_em = [model.emission_matrix]
    if model.emission_input_matrix is not None:
        w_em.append(model.emission_input_matrix)
    if model.emission_offset is not None:
        w_em.append(model.emission_offset[:, None])
    tr = gauss_term(stats["tr_count"], stats["tr_nextnext"], stats["tr_nextphi"], stats["tr_phiphi"],
                    jnp.concatenate(w_tr, axis=1), model.transition_cov)
    em = gauss_term(stats["em_count"], stats["em_yy"], stats["em_ypsi"], stats["em_psipsi"],
                    jnp.concatenate(w_em, axis=1), model.emission_cov)
    return init + tr + em


# Compiled once per shape (eager, every primitive would compile on its own); the gradient of the
# Q-function is shared by the Fisher-identity test and every case of the M-step test.
_e_step = eqx.filter_jit(lgssm_fit.e_step)
_q_grad = eqx.filter_jit(jax.grad(q_function))


def summed_stats(model, ys, lengths, inputs):
    total, ll = None, 0.0
    for b in range(ys.shape[0]):
        u = None if inputs is None else jnp.asarray(inputs[b])
        s, l_b = _e_step(model, jnp.asarray(ys[b]), jnp.asarray(lengths[b]), u)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        ll += l_b
    return total, ll


def sym(g):
    return 0.5 * (g + jnp.swapaxes(g, -1, -2)) if g.ndim == 2 and g.shape[0] == g.shape[1] else g


@pytest.fixture(scope="module")
def missing_batch():
    rng = np.random.default_rng(0)
    p = full_params(rng)
    lengths = [30, 22, 14]
    u = rng.standard_normal((3, 30, 2))
    ys = np.full((3, 30, 3), np.nan)
    for b, n in enumerate(lengths):
        _, y = simulate(rng, p, n, u[b])
        ys[b, :n] = y
    holes = rng.random(ys.shape) < 0.25
    ys[holes] = np.nan  # partially missing steps
    ys[0, 5] = np.nan  # a wholly missing step
    ys[1, 25:] = np.inf  # junk in the padding
    return p, ys, lengths, u


def test_fisher_identity_with_missing_entries_inputs_and_offsets(missing_batch):
    p, ys, lengths, u = missing_batch
    rng = np.random.default_rng(1)
    p0 = {k: (v + 0.1 * rng.standard_normal(v.shape) if k not in ("initial_cov", "transition_cov", "emission_cov") else v * 1.3)
          for k, v in p.items()}
    model = make_model(p0)
    stats, _ = summed_stats(model, ys, lengths, u)

    def loglik(m):
        return sum(
            ssmjax.kalman_filter(m, jnp.asarray(ys[b]), inputs=jnp.asarray(u[b]), length=n).marginal_loglik
            for b, n in enumerate(lengths)
        )

    g_exact = eqx.filter_jit(jax.grad(loglik))(model)
    g_q = _q_grad(model, stats)  # derivative in the model only: the statistics stay fixed
    for name in FIELDS:
        a, b = getattr(g_exact, name), getattr(g_q, name)
        np.testing.assert_allclose(sym(a), sym(b), rtol=1e-7, atol=1e-8, err_msg=name)


@pytest.mark.parametrize(
    "frozen",
    [(), ("transition_matrix",), ("emission_matrix", "initial_mean"), ("transition_input_matrix", "emission_offset"),
     ("transition_cov", "emission_cov")],
)
def test_m_step_is_the_exact_constrained_maximiser(missing_batch, frozen):
    p, ys, lengths, u = missing_batch
    model = make_model({k: v * 1.1 for k, v in p.items()})
    stats, _ = summed_stats(model, ys, lengths, u)
    new = lgssm_fit.m_step(model, stats, frozenset(frozen))
    grads = _q_grad(new, stats)
    for name in FIELDS:
        if name in frozen:
            np.testing.assert_array_equal(getattr(new, name), getattr(model, name))
        else:
            scale = 1.0 + float(jnp.max(jnp.abs(getattr(new, name))))
            np.testing.assert_allclose(sym(getattr(grads, name)), 0.0, atol=1e-7 * scale * stats["em_count"], err_msg=name)


def test_em_equals_pykalman_trajectory():
    pykalman = pytest.importorskip("pykalman")
    rng = np.random.default_rng(2)
    p = full_params(rng, inputs=False, offsets=False)
    _, y = simulate(rng, p, 150)
    start = dict(initial_mean=np.zeros(2), initial_cov=np.eye(2), transition_matrix=np.eye(2) * 0.5,
                 transition_cov=np.eye(2), emission_matrix=np.ones((3, 2)) * 0.3 + np.eye(3, 2),
                 emission_cov=np.eye(3))
    fitted, lls, _ = ssmjax.fit_em(make_model(start), y[None], max_iters=5, tol=0.0)
    kf = pykalman.KalmanFilter(
        transition_matrices=start["transition_matrix"], observation_matrices=start["emission_matrix"],
        transition_covariance=start["transition_cov"], observation_covariance=start["emission_cov"],
        initial_state_mean=start["initial_mean"], initial_state_covariance=start["initial_cov"],
        em_vars=["transition_matrices", "observation_matrices", "transition_covariance",
                 "observation_covariance", "initial_state_mean", "initial_state_covariance"],
    )
    ref_lls = []
    for _ in range(5):
        ref_lls.append(kf.loglikelihood(y))
        kf = kf.em(y, n_iter=1)
    np.testing.assert_allclose(lls, ref_lls, rtol=1e-10)
    np.testing.assert_allclose(fitted.transition_matrix, kf.transition_matrices, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.emission_matrix, kf.observation_matrices, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.transition_cov, kf.transition_covariance, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.emission_cov, kf.observation_covariance, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fitted.initial_cov, kf.initial_state_covariance, rtol=1e-8, atol=1e-12)


def local_level(sigma_eps2, sigma_eta2, dtype=jnp.float64, diffuse=None):
    return ssmjax.LGSSM(
        initial_mean=jnp.zeros(1, dtype), initial_cov=jnp.full((1, 1), 1e7, dtype),
        transition_matrix=jnp.ones((1, 1), dtype), transition_cov=jnp.full((1, 1), sigma_eta2, dtype),
        emission_matrix=jnp.ones((1, 1), dtype), emission_cov=jnp.full((1, 1), sigma_eps2, dtype),
        diffuse=diffuse,
    )


NILE_FROZEN = ("transition_matrix", "emission_matrix")


def test_exact_diffuse_likelihood_and_posterior_equal_statsmodels():
    """statsmodels' exact diffuse Kalman filter and smoother (``use_exact_diffuse=True``) on the Nile
    (local level) and on a local linear trend with missing entries (two diffuse states)."""
    sm = pytest.importorskip("statsmodels.api")
    nile = ssmjax.datasets.load_nile().values
    ref = sm.tsa.UnobservedComponents(nile, "local level", use_exact_diffuse=True)
    for eps2, eta2 in ((15099.0, 1469.1), (9000.0, 3000.0)):
        model = local_level(eps2, eta2, diffuse=True)
        np.testing.assert_allclose(float(model.marginal_loglik(nile[:, None])), ref.loglike([eps2, eta2]), rtol=1e-12)
    post, smoothed = model.smoother(nile[:, None]), ref.smooth([eps2, eta2])
    np.testing.assert_allclose(post.smoothed_means[:, 0], smoothed.smoothed_state[0], rtol=1e-10)
    np.testing.assert_allclose(post.smoothed_covs[:, 0, 0], smoothed.smoothed_state_cov[0, 0], rtol=1e-10)

    rng = np.random.default_rng(7)
    y = np.cumsum(np.cumsum(0.1 * rng.standard_normal(60)) + rng.standard_normal(60)) + rng.standard_normal(60)
    y[[3, 17, 18, 40]] = np.nan
    trend = ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2),
                         transition_matrix=jnp.array([[1.0, 1.0], [0.0, 1.0]]),
                         transition_cov=jnp.diag(jnp.array([0.8, 0.05])),
                         emission_matrix=jnp.array([[1.0, 0.0]]), emission_cov=jnp.eye(1) * 1.2, diffuse=True)
    ref = sm.tsa.UnobservedComponents(y, "local linear trend", use_exact_diffuse=True)
    params = [1.2, 0.8, 0.05]  # irregular, level, trend
    np.testing.assert_allclose(float(trend.marginal_loglik(y[:, None])), ref.loglike(params), rtol=1e-12)
    post, smoothed = trend.smoother(y[:, None]), ref.smooth(params)
    np.testing.assert_allclose(post.smoothed_means, smoothed.smoothed_state.T, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(post.smoothed_covs, np.moveaxis(smoothed.smoothed_state_cov, -1, 0), rtol=1e-9, atol=1e-9)
    # Cov(x_t, x_{t+1} | y) is statsmodels' smoothed_state_autocov[t], transposed, after its first two steps;
    # over those (its diffuse period) it differs from the limit of a proper prior N(0, kappa I), which
    # these are: the error of that prior falls as 1 / kappa.
    autocov = np.swapaxes(np.moveaxis(smoothed.smoothed_state_autocov, -1, 0)[:-1], -1, -2)
    np.testing.assert_allclose(post.smoothed_cross_covs[2:], autocov[2:], rtol=1e-9, atol=1e-9)
    errors = []
    for kappa in (1e4, 1e5):
        wide = eqx.tree_at(lambda m: m.initial_cov, trend, kappa * jnp.eye(2))
        wide = ssmjax.LGSSM(**{n: getattr(wide, n) for n in FIELDS if getattr(wide, n) is not None})
        errors.append(float(jnp.max(jnp.abs(wide.smoother(y[:, None]).smoothed_cross_covs - post.smoothed_cross_covs))))
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 5, errors
    # padding changes nothing
    padded = trend.smoother(np.concatenate([y, np.full(7, 1e9)])[:, None], length=60)
    np.testing.assert_allclose(padded.smoothed_means[:60], post.smoothed_means, rtol=1e-12)
    np.testing.assert_allclose(padded.marginal_loglik, post.marginal_loglik, rtol=1e-12)
    assert np.all(np.asarray(padded.smoothed_cross_covs[59:]) == 0)
    # parallel=True: the exact diffuse recursion is sequential, and the strategy says so
    chosen = ssmjax.lgssm_strategy(trend, y[:, None], parallel=True)
    assert chosen.schedule == "sequential" and "diffuse" in " ".join(chosen.reasons), chosen
    np.testing.assert_allclose(ssmjax.rts_smoother(trend, y[:, None], parallel=True).smoothed_means,
                               post.smoothed_means, rtol=1e-12)
    with pytest.raises(ValueError, match="`kalman_filter` needs a proper prior on the initial state"):
        ssmjax.kalman_filter(trend, y[:, None])
    with pytest.raises(jax.errors.JaxRuntimeError, match="do not identify the diffuse components"):  # found in the program
        trend.marginal_loglik(np.array([[1.0], [np.nan], [np.nan]]))
    with pytest.raises(ValueError, match=r"`diffuse` must be True, False or a boolean mask of shape \(2,\)"):
        ssmjax.LGSSM(**{n: getattr(trend, n) for n in FIELDS if getattr(trend, n) is not None}, diffuse=[1, 0])


def test_nile_local_level_em_reaches_published_mle():
    # Durbin & Koopman (2012), sec. 2.10: sigma^2_eps = 15099, sigma^2_eta = 1469.1 (exact diffuse prior);
    # statsmodels' own fit of the same likelihood stops lower (15068, 1485).
    nile = ssmjax.datasets.load_nile().values
    model = local_level(10000.0, 1000.0, diffuse=True)
    assert model.num_parameters(frozen=NILE_FROZEN) == 2
    fitted, lls, info = ssmjax.fit_em(model, nile[None, :, None], max_iters=3000, tol=1e-12,
                                      frozen=NILE_FROZEN)
    assert np.all(np.diff(np.asarray(lls)) >= -1e-10 * np.abs(np.asarray(lls[1:])))
    np.testing.assert_allclose(float(fitted.emission_cov[0, 0]), 15099.0, rtol=2e-3)
    np.testing.assert_allclose(float(fitted.transition_cov[0, 0]), 1469.1, rtol=2e-3)
    assert float(lls[-1]) >= -633.4646423212458  # statsmodels' maximum (use_exact_diffuse=True)
    for name in NILE_FROZEN + ("initial_mean", "initial_cov"):
        np.testing.assert_array_equal(getattr(fitted, name), getattr(model, name))


def test_sgd_agrees_with_em_on_nile():
    nile = ssmjax.datasets.load_nile().values / 100.0  # rescaled so one learning rate suits both variances
    model = local_level(1.0, 0.1, diffuse=True)
    em_fit, lls, _ = ssmjax.fit_em(model, nile[None, :, None], max_iters=5000, tol=1e-14, frozen=NILE_FROZEN)
    sgd_fit, losses = ssmjax.fit_sgd(model, nile[None, :, None], optax.adam(0.05), num_steps=1500,
                                     frozen=NILE_FROZEN)
    np.testing.assert_allclose(sgd_fit.emission_cov, em_fit.emission_cov, rtol=1e-3)
    np.testing.assert_allclose(sgd_fit.transition_cov, em_fit.transition_cov, rtol=1e-3)
    np.testing.assert_allclose(-float(losses[-1]) * len(nile), float(lls[-1]), rtol=1e-6)


def test_batched_em_reaches_the_mle_and_padding_is_irrelevant():
    rng = np.random.default_rng(3)
    p = full_params(rng, inputs=False, offsets=False)
    lengths = rng.integers(150, 300, size=12)
    ys = np.full((12, 300, 3), np.nan)
    for b, n in enumerate(lengths):
        ys[b, :n] = simulate(rng, p, int(n))[1]
    frozen = ("emission_matrix", "initial_mean", "initial_cov")
    start = dict(p, transition_matrix=np.eye(2) * 0.5, transition_cov=np.eye(2), emission_cov=np.eye(3))
    fitted, lls, info = ssmjax.fit_em(make_model(start), ys, lengths=lengths, max_iters=1000, tol=1e-11,
                                      frozen=frozen)
    assert info.converged
    ll_true = sum(float(make_model(p).marginal_loglik(jnp.asarray(ys[b]), length=int(n)))
                  for b, n in enumerate(lengths))
    ll_fit = sum(float(fitted.marginal_loglik(jnp.asarray(ys[b]), length=int(n))) for b, n in enumerate(lengths))
    # At the MLE the likelihood-ratio statistic 2 (ll_fit - ll_true) is >= 0 and ~ chi^2(dof):
    dof = 4 + 3 + 6  # A, Q, R free
    assert 0.0 <= 2 * (ll_fit - ll_true) <= dof + 6 * np.sqrt(2 * dof)
    # the well-identified dynamics are recovered (standard error ~0.02 here)
    np.testing.assert_allclose(fitted.transition_matrix, p["transition_matrix"], atol=0.1)
    junk = np.where(np.isnan(ys), 1e30, ys)
    _, lls_junk, _ = ssmjax.fit_em(make_model(start), junk, lengths=lengths, max_iters=3, tol=0.0, frozen=frozen)
    np.testing.assert_allclose(lls_junk, lls[:3], rtol=1e-12)


def test_lgssm_fit_errors():
    rng = np.random.default_rng(4)
    p = full_params(rng)
    model = make_model(p)
    y = np.zeros((2, 10, 3))
    with pytest.raises(ValueError, match=r"`inputs` of shape \(B, T, 2\)"):
        ssmjax.fit_em(model, y)
    with pytest.raises(ValueError, match=r"`emissions` must have shape \(B, T, 3\)"):
        ssmjax.fit_em(model, y[..., :2], inputs=np.zeros((2, 10, 2)))
    with pytest.raises(ValueError, match=r"`inputs` must have shape \(2, 10, 2\)"):
        ssmjax.fit_em(model, y, inputs=np.zeros((2, 10, 3)))
    with pytest.raises(ValueError, match="`frozen` names unknown parameters"):
        ssmjax.fit_em(model, y, inputs=np.zeros((2, 10, 2)), frozen=("rates",))
    tv = make_model({k: v for k, v in p.items() if "input" not in k})
    tv = ssmjax.LGSSM(**{**{k: getattr(tv, k) for k in FIELDS if getattr(tv, k) is not None},
                         "emission_matrix": jnp.stack([tv.emission_matrix] * 10)})
    with pytest.raises(ValueError, match=r"the field\(s\) \['emission_matrix'\] are time-varying"):
        ssmjax.fit_em(tv, y)
    # gradient fitting handles time-varying fields (one matrix per step)
    fitted, losses = ssmjax.fit_sgd(tv, y + rng.standard_normal(y.shape), optax.adam(0.01), num_steps=5)
    assert np.all(np.isfinite(losses)) and fitted.emission_matrix.shape == (10, 3, 2)


def test_degenerate_em_returns_last_good_model_and_bad_start_is_rejected():
    model = local_level(1.0, 1.0)
    tiny = np.array([[[1.0], [np.nan], [1.0]]])  # R collapses towards 0 on three points
    with pytest.warns(RuntimeWarning, match="last good model"):
        fitted, lls, info = ssmjax.fit_em(model, tiny, max_iters=500, tol=0.0,
                                          frozen=("initial_mean", "initial_cov"))
    assert info.status in ("not_finite", "decreased")
    assert np.all(np.isfinite(np.asarray(fitted.emission_cov)))
    assert np.isfinite(float(fitted.marginal_loglik(jnp.asarray(tiny[0]))))
    bad = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1), transition_matrix=jnp.eye(1),
                       transition_cov=jnp.eye(1), emission_matrix=jnp.eye(1), emission_cov=-jnp.eye(1))
    with pytest.raises(ValueError, match="`emission_cov` must be positive definite"):
        ssmjax.fit_em(bad, tiny)


# ------------------------------------------------------------------ constraints (structure, fixed)

CONSTRAINED = {
    # every equation with held entries that are not whole columns, and diagonal or scalar noise
    "decoupled": dict(
        structure={"initial_cov": "diagonal", "transition_cov": "scalar", "emission_cov": "diagonal"},
        fixed={"initial_mean": np.array([True, False]), "initial_cov": np.array([False, True]),
               "transition_matrix": np.array([[False, True], [False, False]]),
               "emission_matrix": np.array([[True, False], [False, False], [False, True]]),
               "emission_input_matrix": np.array([[False, True], [True, False], [False, False]]),
               "emission_cov": np.array([False, True, False]), "transition_offset": True},
    ),
    # held entries with a full noise covariance: the weights maximise Q given the current covariance
    "full_noise": dict(
        structure={"transition_cov": "diagonal"},
        fixed={"emission_matrix": np.array([[True, False], [False, False], [False, True]]),
               "transition_input_matrix": np.array([[True, False], [False, False]])},
    ),
}


def _constrained_start(p, case):
    values = {k: v * 1.1 for k, v in p.items()}
    for name, kind in CONSTRAINED[case]["structure"].items():
        diag = np.diag(values[name])
        values[name] = np.diag(diag) if kind == "diagonal" else np.mean(diag) * np.eye(len(diag))
    return ssmjax.LGSSM(**{k: jnp.asarray(v) for k, v in values.items()}, **CONSTRAINED[case])


@pytest.mark.parametrize("case", list(CONSTRAINED))
def test_constrained_m_step_is_the_maximiser_over_the_free_entries(missing_batch, case):
    p, ys, lengths, u = missing_batch
    model = _constrained_start(p, case)
    stats, _ = summed_stats(model, ys, lengths, u)
    new = lgssm_fit.m_step(model, stats, frozenset())
    assert new.constraints == model.constraints
    assert float(q_function(new, stats)) >= float(q_function(model, stats))
    # the weights are stationary given the noise covariances they were solved with: the new ones
    # where the rows decouple (decoupled case), the current ones otherwise
    with_cov = new if case == "decoupled" else eqx.tree_at(lambda m: m.emission_cov, new, model.emission_cov)
    grads, grads_cov = _q_grad(with_cov, stats), _q_grad(new, stats)
    tol = 1e-7 * float(stats["em_count"])
    for name in FIELDS:
        held = fixed_of(model.constraints, name, getattr(model, name).shape)
        before, after = np.asarray(getattr(model, name)), np.asarray(getattr(new, name))
        np.testing.assert_array_equal(after[held], before[held], err_msg=name)
        kind = model.structure.get(name)
        if kind is None:  # weights: zero gradient on the free entries
            g = np.asarray(getattr(grads, name))
            np.testing.assert_allclose(g[~held], 0.0, atol=tol * (1 + np.abs(after).max()), err_msg=name)
            continue
        g = np.asarray(sym(getattr(grads_cov, name)))
        if kind == "full":
            np.testing.assert_allclose(g, 0.0, atol=tol * (1 + np.abs(after).max()), err_msg=name)
        elif kind == "diagonal":
            np.testing.assert_array_equal(after[~np.eye(len(after), dtype=bool)], 0.0)
            np.testing.assert_allclose(np.diag(g)[~np.diag(held)], 0.0, atol=tol * (1 + np.abs(after).max()))
        else:  # scalar: stationary along the identity
            np.testing.assert_array_equal(after, after[0, 0] * np.eye(len(after)))
            np.testing.assert_allclose(np.trace(g), 0.0, atol=tol * (1 + np.abs(after).max()))


def test_smooth_trend_em_matches_statsmodels_mle_and_counts_parameters():
    """A local linear trend with a noise-free level (statsmodels' 'smooth trend'): the level
    variance held at zero, the slope and irregular variances free, the initial state known.
    EM's maximum is statsmodels' (Nelder-Mead and BFGS on the same likelihood), and the model's
    AIC and BIC are those of the free parameters."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(5)
    slope = np.cumsum(0.05 * rng.standard_normal(150))
    y = np.cumsum(slope) + 0.5 * rng.standard_normal(150)
    a0, p0 = np.array([y[0], 0.0]), np.diag([1.0, 0.1])
    start = ssmjax.LGSSM(
        initial_mean=jnp.asarray(a0), initial_cov=jnp.asarray(p0),
        transition_matrix=jnp.array([[1.0, 1.0], [0.0, 1.0]]), transition_cov=jnp.diag(jnp.array([0.0, 0.01])),
        emission_matrix=jnp.array([[1.0, 0.0]]), emission_cov=jnp.eye(1),
        structure={"transition_cov": "diagonal"},
        fixed={"initial_mean": True, "initial_cov": True, "transition_matrix": True, "emission_matrix": True,
               "transition_cov": np.array([True, False])},
    )
    assert start.num_parameters() == 2
    fitted, lls, _ = ssmjax.fit_em(start, y[None, :, None], max_iters=3000, tol=1e-13)
    assert np.all(np.diff(np.asarray(lls)) >= -1e-9 * np.abs(np.asarray(lls[1:])))
    assert float(fitted.transition_cov[0, 0]) == 0.0 and float(fitted.transition_cov[0, 1]) == 0.0

    mod = sm.tsa.UnobservedComponents(y, "smooth trend", loglikelihood_burn=0)  # every step counted, as here
    mod.initialize_known(a0, p0)
    res = mod.fit(start_params=[1.0, 0.01], method="nm", maxiter=4000, disp=False)
    res = mod.fit(start_params=res.params, method="bfgs", disp=False)
    ll_em = float(fitted.log_likelihood(y[None, :, None]))
    assert ll_em >= res.llf - 1e-3, (ll_em, res.llf)
    at_sm = eqx.tree_at(lambda m: (m.emission_cov, m.transition_cov), fitted,
                        (jnp.full((1, 1), res.params[0]), jnp.diag(jnp.array([0.0, res.params[1]]))))
    np.testing.assert_allclose(float(at_sm.marginal_loglik(y[:, None])), mod.loglike(res.params), rtol=1e-10)
    np.testing.assert_allclose([fitted.emission_cov[0, 0], fitted.transition_cov[1, 1]], res.params, rtol=2e-3)
    np.testing.assert_allclose(fitted.aic(y[None, :, None]), -2 * ll_em + 2 * 2, rtol=1e-12)
    np.testing.assert_allclose(fitted.bic(y[None, :, None]), -2 * ll_em + 2 * np.log(150), rtol=1e-12)


def test_constraints_reach_sgd_saved_files_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    p = full_params(rng, inputs=False)
    _, y = simulate(rng, p, 60)
    case = dict(structure={"emission_cov": "scalar", "transition_cov": "diagonal"},
                fixed={"transition_matrix": np.array([[False, True], [True, False]]),
                       "transition_cov": np.array([True, False])})
    start = ssmjax.LGSSM(**{k: jnp.asarray(v) for k, v in p.items() if k not in ("emission_cov", "transition_cov")},
                         emission_cov=0.5 * jnp.eye(3), transition_cov=jnp.diag(jnp.array([0.3, 0.2])), **case)
    # initial mean 2 and cov 3; transition: 2 free entries, 1 free variance, offset 2;
    # emission: matrix 6, one variance, offset 3
    assert start.num_parameters() == 2 + 3 + 2 + 1 + 2 + 6 + 1 + 3
    assert start.num_parameters(frozen=("emission_matrix",)) == start.num_parameters() - 6
    fitted, losses = ssmjax.fit_sgd(start, y[None], optax.adam(0.02), num_steps=100)
    assert float(losses[-1]) < float(losses[0])
    for name, mask in start.fixed.items():
        held = fixed_of(start.constraints, name, getattr(start, name).shape)
        np.testing.assert_array_equal(np.asarray(getattr(fitted, name))[held], np.asarray(getattr(start, name))[held])
    assert float(fitted.emission_cov[0, 0]) == float(fitted.emission_cov[2, 2]) != 0.5
    ssmjax.save(tmp_path / "m.eqx", fitted)
    back = ssmjax.load(tmp_path / "m.eqx")
    assert back.constraints == fitted.constraints and back.structure == fitted.structure
    assert float(back.log_likelihood(y[None])) == float(fitted.log_likelihood(y[None]))
    np.testing.assert_allclose(float(fitted.log_likelihood(y[None])), float(fitted.marginal_loglik(y)), rtol=1e-12)

    fields = {k: jnp.asarray(v) for k, v in p.items()}
    for kwargs, match in [
        (dict(structure={"transition_matrix": "diagonal"}), r"`structure` names `transition_matrix`"),
        (dict(structure={"emission_cov": "banded"}), r"must be one of \['full', 'diagonal', 'scalar'\]"),
        (dict(structure={"emission_cov": "diagonal"}), "`emission_cov` has structure 'diagonal' but nonzero"),
        (dict(fixed={"transition_matrix": np.ones((3, 3), bool)}), r"must have the field's shape \(2, 2\)"),
        (dict(fixed={"emission_cov": np.eye(3, dtype=bool)}), "held whole or not at all"),
        (dict(fixed={"transition_matrix": np.ones((2, 2))}), "boolean array"),
        (dict(fixed={"rates": True}), "`rates` is not a field of this model"),
    ]:
        with pytest.raises(ValueError, match=match):
            ssmjax.LGSSM(**fields, **kwargs)
    scalar = dict(fields, emission_cov=jnp.diag(jnp.array([1.0, 2.0, 1.0])))
    with pytest.raises(ValueError, match="structure 'scalar' but unequal variances"):
        ssmjax.LGSSM(**scalar, structure={"emission_cov": "scalar"})
    varying = dict(fields, transition_matrix=jnp.stack([fields["transition_matrix"]] * 5))
    with pytest.raises(ValueError, match="`transition_matrix` is time-varying; constraints apply"):
        ssmjax.LGSSM(**varying, fixed={"transition_matrix": True})
