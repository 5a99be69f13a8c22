"""LGSSM inference against the dense-Gaussian oracle, pykalman, finite differences and itself."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from helpers import (
    FD_TOLERANCE,
    assert_allclose,
    central_difference_grad,
    sqrt_float32_near_singular_cov_rtol,
)
from ssmjax._lgssm import inference as lgssm_inference
from ssmjax._lgssm import small
from test_lgssm_oracle import dense_joint, oracle

FIELDS = (
    "marginal_loglik",
    "filtered_means",
    "filtered_covs",
    "predicted_means",
    "predicted_covs",
    "smoothed_means",
    "smoothed_covs",
    "smoothed_cross_covs",
)


def _spd(rng, n, lead=()):
    a = rng.normal(size=lead + (n, n))
    return a @ np.swapaxes(a, -1, -2) / n + 0.5 * np.eye(n)


def make_params(rng, dx, dy, T, du=None, time_varying=False, offsets=False, singular_q=False):
    tv_t = (T - 1,) if time_varying else ()
    tv_e = (T,) if time_varying else ()
    q = _spd(rng, dx, tv_t)
    if singular_q:  # first state component deterministic
        q = q.copy()
        q[..., 0, :] = 0.0
        q[..., :, 0] = 0.0
    params = dict(
        initial_mean=rng.normal(size=dx),
        initial_cov=_spd(rng, dx),
        transition_matrix=0.6 * rng.normal(size=tv_t + (dx, dx)) / np.sqrt(dx),
        transition_cov=q,
        emission_matrix=rng.normal(size=tv_e + (dy, dx)),
        emission_cov=_spd(rng, dy, tv_e),
    )
    if du is not None:
        params["transition_input_matrix"] = rng.normal(size=tv_t + (dx, du))
        params["emission_input_matrix"] = rng.normal(size=tv_e + (dy, du))
    if offsets:
        params["transition_offset"] = rng.normal(size=tv_t + (dx,))
        params["emission_offset"] = rng.normal(size=tv_e + (dy,))
    return params


def to_model(params, dtype=jnp.float64):
    return ssmjax.LGSSM(**{k: jnp.asarray(v, dtype) for k, v in params.items()})


CONFIGS = {
    # name: (dx, dy, du, T, time_varying, offsets, missing)
    "basic": (2, 1, None, 5, False, False, False),
    "full": (3, 2, 2, 6, True, True, True),
    "inputs-missing": (2, 3, 1, 5, False, True, True),
}


def make_case(name, seed=0):
    dx, dy, du, T, tv, off, missing = CONFIGS[name]
    rng = np.random.default_rng(seed)
    params = make_params(rng, dx, dy, T, du, tv, off)
    y = rng.normal(size=(T, dy))
    if missing:
        y[1, 0] = np.nan  # partial
        y[3] = np.nan  # whole step
    u = None if du is None else rng.normal(size=(T, du))
    return params, y, u


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ["standard", "sqrt"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_dense_oracle(name, method):
    params, y, u = make_case(name)
    ref = oracle(params, y, u)
    out = ssmjax.rts_smoother(to_model(params), y, inputs=u, method=method)
    for field in FIELDS:
        assert_allclose(getattr(out, field), ref[field], dtype=np.float64, err_msg=field)
    filt = ssmjax.kalman_filter(to_model(params), y, inputs=u, method=method)
    for field in FIELDS[:5]:
        assert_allclose(getattr(filt, field), ref[field], dtype=np.float64, err_msg=field)


def test_singular_transition_noise_deterministic_component():
    rng = np.random.default_rng(3)
    params = make_params(rng, 3, 1, 6, singular_q=True)
    y = rng.normal(size=(6, 1))
    ref = oracle(params, y)
    for method in ("standard", "sqrt"):
        out = ssmjax.rts_smoother(to_model(params), y, method=method)
        for field in FIELDS:
            assert_allclose(getattr(out, field), ref[field], dtype=np.float64, err_msg=f"{method} {field}")


def test_pykalman_agreement():
    pykalman = pytest.importorskip("pykalman")
    rng = np.random.default_rng(1)
    params = make_params(rng, 3, 2, 8)
    y = rng.normal(size=(8, 2))
    kf = pykalman.KalmanFilter(
        transition_matrices=params["transition_matrix"],
        observation_matrices=params["emission_matrix"],
        transition_covariance=params["transition_cov"],
        observation_covariance=params["emission_cov"],
        initial_state_mean=params["initial_mean"],
        initial_state_covariance=params["initial_cov"],
    )
    fm, fc = kf.filter(y)
    sm, sc = kf.smooth(y)
    out = ssmjax.rts_smoother(to_model(params), y)
    assert_allclose(out.filtered_means, fm, dtype=np.float64)
    assert_allclose(out.filtered_covs, fc, dtype=np.float64)
    assert_allclose(out.smoothed_means, sm, dtype=np.float64)
    assert_allclose(out.smoothed_covs, sc, dtype=np.float64)
    assert_allclose(out.marginal_loglik, kf.loglikelihood(y), dtype=np.float64)


def test_small_path_equals_general_path(monkeypatch):
    params, y, u = make_case("full", seed=4)
    model = to_model(params)
    assert lgssm_inference._ops_for(model) is small.SmallOps
    fast = ssmjax.rts_smoother(model, y, inputs=u)
    fast_sample = ssmjax.lgssm_sample_posterior(model, y, inputs=u, key=jax.random.key(0))
    monkeypatch.setattr(small, "SMALL_MAX_DX", 0)
    assert lgssm_inference._ops_for(model) is small.GeneralOps
    general = ssmjax.rts_smoother(model, y, inputs=u)
    general_sample = ssmjax.lgssm_sample_posterior(model, y, inputs=u, key=jax.random.key(0))
    for field in FIELDS:
        assert_allclose(getattr(fast, field), getattr(general, field), dtype=np.float64, err_msg=field)
    assert_allclose(fast_sample, general_sample, dtype=np.float64)


# --------------------------------------------------------------------------- padding and batches


def _pad(params, y, u, T_pad, garbage):
    """Pad emissions, inputs and time-varying parameters to T_pad steps with ``garbage``."""
    T = y.shape[0]
    y_p = np.full((T_pad, y.shape[1]), garbage)
    y_p[:T] = y
    u_p = None
    if u is not None:
        u_p = np.full((T_pad, u.shape[1]), garbage)
        u_p[:T] = u
    padded = {}
    for k, v in params.items():
        v = np.asarray(v)
        static = 1 if k.endswith(("mean", "offset")) else 2
        if v.ndim == static + 1:
            extra = (T_pad - T,) + v.shape[1:]
            v = np.concatenate([v, np.full(extra, garbage)], axis=0)
        padded[k] = v
    return padded, y_p, u_p


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_padding_changes_nothing_values_and_gradients(garbage):
    params, y, u = make_case("full", seed=5)
    T, T_pad = y.shape[0], 9
    padded, y_p, u_p = _pad(params, y, u, T_pad, garbage)
    ref = ssmjax.rts_smoother(to_model(params), y, inputs=u)
    out = ssmjax.rts_smoother(to_model(padded), y_p, inputs=u_p, length=T)
    for field in FIELDS:
        got = np.asarray(getattr(out, field))
        assert np.all(np.isfinite(got)), field
        want = np.asarray(getattr(ref, field))
        n = want.shape[0] if want.ndim else None
        assert_allclose(got[:n] if n is not None else got, want, dtype=np.float64, err_msg=field)
    # documented padded outputs: repeat the filtered moments of the last real step
    for field in ("filtered_means", "predicted_means", "smoothed_means", "smoothed_covs"):
        got = np.asarray(getattr(out, field))
        assert_allclose(got[T:], np.broadcast_to(np.asarray(ref.filtered_means if "means" in field else ref.filtered_covs)[-1], got[T:].shape), dtype=np.float64)
    assert np.all(np.asarray(out.smoothed_cross_covs)[T - 1 :] == 0.0)

    def loglik(model, y, u, length):
        return ssmjax.kalman_filter(model, y, inputs=u, length=length).marginal_loglik

    with ssmjax.value_checks(False):
        g_ref = jax.grad(loglik, argnums=(0, 1))(to_model(params), jnp.asarray(y), jnp.asarray(u), None)
        g_pad = jax.grad(loglik, argnums=(0, 1))(to_model(padded), jnp.asarray(y_p), jnp.asarray(u_p), T)
    for a, b in zip(jax.tree_util.tree_leaves(g_pad), jax.tree_util.tree_leaves(g_ref)):
        a = np.asarray(a)
        assert np.all(np.isfinite(a))
        if a.shape != np.shape(b):  # time-varying or emissions: real part equal, padding zero
            assert_allclose(a[: np.shape(b)[0]], b, dtype=np.float64)
            assert np.all(a[np.shape(b)[0] :] == 0.0)
        else:
            assert_allclose(a, b, dtype=np.float64)
    # posterior samples: finite, padded steps repeat the last real state
    s = np.asarray(ssmjax.lgssm_sample_posterior(to_model(padded), y_p, inputs=u_p, length=T, key=jax.random.key(1)))
    assert np.all(np.isfinite(s)) and np.all(s[T:] == s[T - 1])


def test_vmap_ragged_batch_equals_each_sequence():
    rng = np.random.default_rng(6)
    params = make_params(rng, 2, 2, 7, du=1, offsets=True)
    model = to_model(params)
    lengths = [7, 4, 1]
    ys, us = [], []
    for L in lengths:
        y = rng.normal(size=(L, 2))
        if L > 2:
            y[1, 1] = np.nan
        u = rng.normal(size=(L, 1))
        y_p = np.full((7, 2), np.nan)
        y_p[:L] = y
        u_p = np.full((7, 1), np.inf)
        u_p[:L] = u
        ys.append((y, y_p))
        us.append((u, u_p))
    Y = jnp.asarray(np.stack([p for _, p in ys]))
    U = jnp.asarray(np.stack([p for _, p in us]))

    def run(y, u, length):
        out = ssmjax.rts_smoother(model, y, inputs=u, length=length)
        grad = jax.grad(lambda m: ssmjax.kalman_filter(m, y, inputs=u, length=length).marginal_loglik)(model)
        return out, grad

    batched, grads = jax.jit(jax.vmap(run))(Y, U, jnp.asarray(lengths))
    for i, L in enumerate(lengths):
        single, g = run(jnp.asarray(ys[i][0]), jnp.asarray(us[i][0]), None)
        for field in FIELDS:
            want = np.asarray(getattr(single, field))
            got = np.asarray(getattr(batched, field))[i]
            assert np.all(np.isfinite(got))
            assert_allclose(got[: want.shape[0]] if want.ndim else got, want, dtype=np.float64, err_msg=field)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g)):
            assert_allclose(np.asarray(a)[i], b, dtype=np.float64)


# --------------------------------------------------------------------------- float32 and the sqrt form


def test_sqrt_stays_accurate_in_float32_where_standard_breaks():
    rng = np.random.default_rng(0)
    T, th = 1000, 0.3
    A = 0.99 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    C = np.array([[1.0, 0.5], [0.0, 1.0]])
    x, ys = np.zeros(2), []
    for _ in range(T):  # emission noise std 1e-6 of the unit-scale signal
        ys.append(C @ x + 1e-6 * rng.normal(size=2))
        x = A @ x + rng.normal(size=2)
    ys = np.array(ys)
    params = dict(
        initial_mean=np.zeros(2), initial_cov=np.eye(2), transition_matrix=A, transition_cov=np.eye(2),
        emission_matrix=C, emission_cov=1e-12 * np.eye(2),
    )
    ref = ssmjax.rts_smoother(to_model(params), ys)
    y32 = jnp.asarray(ys, jnp.float32)
    # the emission noise is 1e-12 of the initial covariance: the strategy warns for both forms in float32
    with pytest.warns(RuntimeWarning, match="the first steps' covariances"):
        sq = ssmjax.rts_smoother(to_model(params, jnp.float32), y32, method="sqrt")
    with pytest.warns(RuntimeWarning, match="the covariance form loses accuracy"):
        st = ssmjax.rts_smoother(to_model(params, jnp.float32), y32, method="standard")
    assert ssmjax.lgssm_strategy(to_model(params, jnp.float32), y32).form == "sqrt"  # what method="auto" takes
    for field in ("marginal_loglik", "filtered_means", "smoothed_means"):
        assert_allclose(getattr(sq, field), getattr(ref, field), dtype=np.float32, err_msg=field)
    filtered_scale = np.max(np.abs(np.asarray(ref.filtered_covs)), axis=(-1, -2))
    kappa = np.sqrt(np.max(np.abs(np.asarray(ref.predicted_covs))) / filtered_scale.min())
    rtol = sqrt_float32_near_singular_cov_rtol(kappa)
    assert 0.05 < rtol < 0.2  # the problem is as ill-conditioned as intended (kappa ~ 1e6)
    for field in ("filtered_covs", "smoothed_covs", "predicted_covs"):
        got, want = np.asarray(getattr(sq, field), np.float64), np.asarray(getattr(ref, field))
        assert np.all(np.isfinite(got))
        err = np.max(np.abs(got - want), axis=(-1, -2)) / np.max(np.abs(want), axis=(-1, -2))
        assert err.max() < rtol, field
        assert np.all(np.linalg.eigvalsh(got) > -1e-3 * np.max(np.abs(want))), field
    # the covariance form has lost the filtered covariance entirely (errors >> its scale)
    st_err = np.max(np.abs(np.asarray(st.filtered_covs, np.float64) - np.asarray(ref.filtered_covs)))
    assert not np.isfinite(st_err) or st_err > 10 * np.max(np.abs(np.asarray(ref.filtered_covs)))


def test_float32_standard_close_to_float64_on_benign_problem():
    params, y, u = make_case("full", seed=7)
    ref = ssmjax.rts_smoother(to_model(params), y, inputs=u)
    out = ssmjax.rts_smoother(
        to_model(params, jnp.float32), jnp.asarray(y, jnp.float32), inputs=jnp.asarray(u, jnp.float32)
    )
    assert out.smoothed_covs.dtype == jnp.float32
    for field in FIELDS:
        assert_allclose(getattr(out, field), getattr(ref, field), dtype=np.float32, err_msg=field)


# --------------------------------------------------------------------------- gradients


def test_gradients_match_finite_differences():
    params, y, u = make_case("inputs-missing", seed=8)
    model = to_model(params)
    names = sorted(params)

    @jax.jit
    def loglik(model, y):
        return ssmjax.kalman_filter(model, y, inputs=u).marginal_loglik

    with ssmjax.value_checks(False):
        g_model, g_y = jax.grad(loglik, argnums=(0, 1))(model, jnp.asarray(y))
        for name in names:
            base = np.asarray(params[name], np.float64)

            def f(v, name=name):
                return loglik(eqx.tree_at(lambda m: getattr(m, name), model, jnp.asarray(v)), jnp.asarray(y))

            fd = central_difference_grad(f, base)
            assert_allclose(getattr(g_model, name), fd, dtype=np.float64, **FD_TOLERANCE, err_msg=name)
        observed = ~np.isnan(y)
        y0 = np.where(observed, y, 0.0)

        def f_y(v):
            return loglik(model, jnp.where(jnp.asarray(observed), jnp.asarray(v), jnp.nan))

        fd = central_difference_grad(f_y, y0)
        g_y = np.asarray(g_y)
        assert np.all(g_y[~observed] == 0.0)
        assert_allclose(g_y, fd, dtype=np.float64, **FD_TOLERANCE)


@pytest.mark.parametrize("name", ["inputs-missing", "full"])
def test_sqrt_gradients_match_finite_differences(name):
    """``method="sqrt"`` (QR pre-arrays, Cholesky factors of the noise): gradients of the
    log-likelihood w.r.t. every model field and the observed emissions, float64."""
    params, y, u = make_case(name, seed=8)
    model = to_model(params)

    @jax.jit
    def loglik(model, y):
        return ssmjax.kalman_filter(model, y, inputs=u, method="sqrt").marginal_loglik

    with ssmjax.value_checks(False):
        g_model, g_y = jax.grad(loglik, argnums=(0, 1))(model, jnp.asarray(y))
        for field in sorted(params):
            base = np.asarray(params[field], np.float64)

            def f(v, field=field):
                return loglik(eqx.tree_at(lambda m: getattr(m, field), model, jnp.asarray(v)), jnp.asarray(y))

            fd = central_difference_grad(f, base)
            assert_allclose(getattr(g_model, field), fd, dtype=np.float64, **FD_TOLERANCE, err_msg=field)
        observed = ~np.isnan(y)
        y0 = np.where(observed, y, 0.0)

        def f_y(v):
            return loglik(model, jnp.where(jnp.asarray(observed), jnp.asarray(v), jnp.nan))

        fd = central_difference_grad(f_y, y0)
        g_y = np.asarray(g_y)
        assert np.all(g_y[~observed] == 0.0)
        assert_allclose(g_y, fd, dtype=np.float64, **FD_TOLERANCE)


def test_smoother_and_sampler_are_differentiable():
    params, y, u = make_case("full", seed=9)
    model = to_model(params)

    def smooth_loss(model):
        out = ssmjax.rts_smoother(model, y, inputs=u)
        return jnp.sum(out.smoothed_means**2) + jnp.sum(out.smoothed_covs) + jnp.sum(out.smoothed_cross_covs)

    def sample_loss(model):
        return jnp.sum(ssmjax.lgssm_sample_posterior(model, y, inputs=u, key=jax.random.key(0)) ** 2)

    with ssmjax.value_checks(False):
        for loss in (smooth_loss, sample_loss):
            g = jax.grad(loss)(model)
            f = jax.jit(loss)
            for name in ("transition_matrix", "emission_cov"):
                leaf = np.asarray(getattr(g, name))
                assert np.all(np.isfinite(leaf))
                # directional finite difference along a random direction
                d = np.random.default_rng(0).normal(size=leaf.shape)
                base = np.asarray(getattr(model, name))
                h = 1e-6
                plus = f(eqx.tree_at(lambda m: getattr(m, name), model, jnp.asarray(base + h * d)))
                minus = f(eqx.tree_at(lambda m: getattr(m, name), model, jnp.asarray(base - h * d)))
                assert_allclose(np.sum(leaf * d), (plus - minus) / (2 * h), dtype=np.float64, **FD_TOLERANCE)


# --------------------------------------------------------------------------- sampling and forecasting


def test_posterior_samples_match_dense_posterior():
    params, y, u = make_case("inputs-missing", seed=10)
    T, dx = y.shape[0], 2
    ref = oracle(params, y, u)
    mean, cov = ref["joint_mean"], ref["joint_cov"]
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    model = to_model(params)
    draw = jax.jit(jax.vmap(lambda k: ssmjax.lgssm_sample_posterior(model, y, inputs=u, key=k)))
    samples = np.asarray(draw(keys)).reshape(n, T * dx)
    emp_mean = samples.mean(0)
    emp_cov = np.cov(samples, rowvar=False)
    sd = np.sqrt(np.diag(cov))
    # 5-sigma bounds from the sampling distributions of the mean and of the covariance entries
    assert np.all(np.abs(emp_mean - mean) < 5 * sd / np.sqrt(n))
    cov_sd = np.sqrt((np.outer(sd**2, sd**2) + cov**2) / n)
    assert np.all(np.abs(emp_cov - cov) < 5 * cov_sd + 1e-12)


def test_lgssm_sample_matches_prior():
    rng = np.random.default_rng(11)
    T = 4
    params = make_params(rng, 2, 1, T, du=1, time_varying=True, offsets=True)
    u = rng.normal(size=(T, 1))
    mean, cov, dx, dy = dense_joint(params, T, u)
    n = 4000
    model = to_model(params)
    keys = jax.random.split(jax.random.key(1), n)
    states, ys = jax.jit(jax.vmap(lambda k: ssmjax.lgssm_sample(model, T, inputs=u, key=k)))(keys)
    assert states.shape == (n, T, 2) and ys.shape == (n, T, 1)
    z = np.concatenate([np.asarray(states).reshape(n, -1), np.asarray(ys).reshape(n, -1)], axis=1)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(z.mean(0) - mean) < 5 * sd / np.sqrt(n))
    cov_sd = np.sqrt((np.outer(sd**2, sd**2) + cov**2) / n)
    assert np.all(np.abs(np.cov(z, rowvar=False) - cov) < 5 * cov_sd)


def test_forecast_matches_dense_predictive():
    rng = np.random.default_rng(12)
    T, H, L = 6, 3, 4
    params = make_params(rng, 2, 2, T, du=1, offsets=True)
    y = rng.normal(size=(T, 2))
    y[1, 0] = np.nan
    u = rng.normal(size=(T, 1))
    future_u = rng.normal(size=(H, 1))
    out = ssmjax.lgssm_forecast(to_model(params), y, H, inputs=u, length=L, future_inputs=future_u)
    # oracle: the first L steps observed, H more steps unobserved, with the future inputs
    y_ext = np.concatenate([y[:L], np.full((H, 2), np.nan)])
    u_ext = np.concatenate([u[:L], future_u])
    mean, cov, dx, dy = dense_joint(params, L + H, u_ext)
    ref = oracle(params, y_ext, u_ext)
    sm = ref["smoothed_means"][L:]
    sc = ref["smoothed_covs"][L:]
    assert_allclose(out.state_means, sm, dtype=np.float64)
    assert_allclose(out.state_covs, sc, dtype=np.float64)
    C, R = params["emission_matrix"], params["emission_cov"]
    ym = sm @ C.T + future_u @ params["emission_input_matrix"].T + params["emission_offset"]
    assert_allclose(out.emission_means, ym, dtype=np.float64)
    assert_allclose(out.emission_covs, C @ sc @ C.T + R, dtype=np.float64)
    with pytest.raises(ValueError, match="`future_inputs`"):
        ssmjax.lgssm_forecast(to_model(params), y, H, inputs=u)


# --------------------------------------------------------------------------- compilation and errors


def test_no_recompilation_on_second_call():
    params, y, u = make_case("inputs-missing", seed=13)
    model = to_model(params)
    ssmjax.rts_smoother(model, y, inputs=u)
    before = lgssm_inference._smoother_jit._cache_size()
    ssmjax.rts_smoother(model, y + 1.0, inputs=u * 2.0)
    assert lgssm_inference._smoother_jit._cache_size() == before


def _base():
    return dict(
        initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2), transition_matrix=jnp.eye(2),
        transition_cov=jnp.eye(2), emission_matrix=jnp.ones((1, 2)), emission_cov=jnp.eye(1),
    )


def test_shape_errors_name_field_and_shapes():
    with pytest.raises(ValueError, match=r"`transition_matrix` must have shape \(2, 2\) or \(T-1, 2, 2\).*got shape \(3, 3\)"):
        ssmjax.LGSSM(**{**_base(), "transition_matrix": jnp.eye(3)})
    with pytest.raises(ValueError, match=r"`emission_cov` must have shape \(1, 1\).*got shape \(2, 2\)"):
        ssmjax.LGSSM(**{**_base(), "emission_cov": jnp.eye(2)})
    model = ssmjax.LGSSM(**_base())
    with pytest.raises(ValueError, match=r"`emissions` must have shape \(T, 1\).*got shape \(5, 2\)"):
        ssmjax.kalman_filter(model, jnp.zeros((5, 2)))
    tv = ssmjax.LGSSM(**{**_base(), "transition_matrix": jnp.stack([jnp.eye(2)] * 3)})
    with pytest.raises(ValueError, match=r"`transition_matrix` is time-varying with 3 entries; expected T-1 = 4"):
        ssmjax.rts_smoother(tv, jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match="`method` must be 'auto', 'standard' or 'sqrt'"):
        ssmjax.kalman_filter(model, jnp.zeros((5, 1)), method="fast")
    with pytest.raises(ValueError, match=r"`length` must lie in \[1, 5\]"):
        ssmjax.kalman_filter(model, jnp.zeros((5, 1)), length=6)


def test_inputs_required_and_rejected():
    with_inputs = ssmjax.LGSSM(**{**_base(), "emission_input_matrix": jnp.ones((1, 3))})
    with pytest.raises(ValueError, match=r"`emission_input_matrix`.*`inputs` of shape \(5, 3\)"):
        ssmjax.kalman_filter(with_inputs, jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match=r"`inputs` must have shape \(5, 3\).*got shape \(5, 2\)"):
        ssmjax.kalman_filter(with_inputs, jnp.zeros((5, 1)), inputs=jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="`inputs` were given but the model has no"):
        ssmjax.kalman_filter(ssmjax.LGSSM(**_base()), jnp.zeros((5, 1)), inputs=jnp.zeros((5, 3)))


def test_covariance_value_errors_eager_and_under_jit():
    asym = ssmjax.LGSSM(**{**_base(), "initial_cov": jnp.array([[1.0, 0.5], [0.0, 1.0]])})
    with pytest.raises(ValueError, match="`initial_cov` must be finite and symmetric"):
        ssmjax.kalman_filter(asym, jnp.zeros((3, 1)))
    indefinite = ssmjax.LGSSM(**{**_base(), "emission_cov": -jnp.eye(1)})
    with pytest.raises(ValueError, match="`emission_cov` must be positive definite"):
        ssmjax.rts_smoother(indefinite, jnp.zeros((3, 1)))
    neg_q = ssmjax.LGSSM(**{**_base(), "transition_cov": jnp.diag(jnp.array([1.0, -1.0]))})
    with pytest.raises(ValueError, match="`transition_cov` must be positive semi-definite"):
        ssmjax.kalman_filter(neg_q, jnp.zeros((3, 1)))

    @jax.jit
    def f(q):
        model = ssmjax.LGSSM(**{**_base(), "transition_cov": q})
        return ssmjax.kalman_filter(model, jnp.zeros((3, 1))).marginal_loglik

    assert np.isfinite(float(f(jnp.eye(2))))
    with pytest.raises(Exception, match="`transition_cov` must be positive semi-definite"):
        jax.block_until_ready(f(jnp.diag(jnp.array([1.0, -1.0]))))
    with ssmjax.value_checks(False):
        g = jax.jit(lambda q: ssmjax.kalman_filter(ssmjax.LGSSM(**{**_base(), "transition_cov": q}), jnp.zeros((3, 1))).marginal_loglik)
        g(jnp.diag(jnp.array([1.0, -1.0])))  # no check
