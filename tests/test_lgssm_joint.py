"""Path densities of an LGSSM (log joint, posterior entropy) against the dense-Gaussian oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from helpers import FD_TOLERANCE, assert_allclose, central_difference_grad
from test_lgssm_inference import CONFIGS, make_case, make_params, to_model
from test_lgssm_oracle import condition, dense_joint


def _dense_log_joint(params, states, emissions, inputs):
    """log N of (x_{1:T}, observed y entries) under the dense joint Gaussian."""
    y = np.asarray(emissions, np.float64)
    T = y.shape[0]
    mean, cov, dx, dy = dense_joint(params, T, inputs)
    obs = ~np.isnan(y.reshape(-1))
    idx = np.concatenate([np.arange(T * dx), T * dx + np.flatnonzero(obs)])
    v = np.concatenate([np.asarray(states, np.float64).reshape(-1), y.reshape(-1)[obs]]) - mean[idx]
    S = cov[np.ix_(idx, idx)]
    _, logdet = np.linalg.slogdet(S)
    return -0.5 * (v @ np.linalg.solve(S, v) + logdet + idx.size * np.log(2 * np.pi))


def _dense_entropy(params, emissions, inputs):
    _, post_cov, _ = condition(params, emissions, inputs)
    _, logdet = np.linalg.slogdet(post_cov)
    n = post_cov.shape[0]
    return 0.5 * (logdet + n * (1.0 + np.log(2 * np.pi)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_log_joint_matches_dense_gaussian(name):
    params, y, u = make_case(name)
    model = to_model(params)
    states = np.random.default_rng(1).normal(size=(y.shape[0], params["initial_mean"].shape[0]))
    got = ssmjax.lgssm_log_joint(model, states, y, inputs=u)
    assert_allclose(got, _dense_log_joint(params, states, y, u), jnp.float64)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_posterior_entropy_matches_dense_posterior(name):
    params, y, u = make_case(name)
    post = ssmjax.rts_smoother(to_model(params), y, inputs=u)
    assert_allclose(ssmjax.lgssm_posterior_entropy(post), _dense_entropy(params, y, u), jnp.float64)


def test_log_joint_and_entropy_above_the_unrolled_sizes():
    # Dy = 9 and 2 Dx = 10 exceed the unrolled-ops limit (8): the densities go through LAPACK
    rng = np.random.default_rng(3)
    T = 4
    params = make_params(rng, 5, 9, T, None, True, True)
    y = rng.normal(size=(T, 9))
    y[1, :4] = np.nan
    y[2] = np.nan
    model = to_model(params)
    states = rng.normal(size=(T, 5))
    assert_allclose(ssmjax.lgssm_log_joint(model, states, y), _dense_log_joint(params, states, y, None), jnp.float64)
    post = ssmjax.rts_smoother(model, y)
    assert_allclose(ssmjax.lgssm_posterior_entropy(post), _dense_entropy(params, y, None), jnp.float64)


def test_log_joint_plus_entropy_is_unbiased_for_marginal_loglik():
    # E_q[log p(y, x)] + H[q] = log p(y) for the exact posterior q; the Monte Carlo average
    # over posterior draws must agree within a few standard errors.
    params, y, u = make_case("full")
    model = to_model(params)
    post = ssmjax.rts_smoother(model, y, inputs=u)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: ssmjax.lgssm_sample_posterior(model, y, inputs=u, key=k))(keys)
    logj = jax.vmap(lambda x: ssmjax.lgssm_log_joint(model, x, y, inputs=u))(draws)
    estimate = logj + ssmjax.lgssm_posterior_entropy(post)
    stderr = float(jnp.std(estimate)) / np.sqrt(len(keys))
    assert stderr > 0.0
    assert abs(float(jnp.mean(estimate)) - float(post.marginal_loglik)) < 4.0 * stderr


def test_padding_is_ignored_values_and_gradients():
    params, y, u = make_case("full")
    model = to_model(params)
    T = y.shape[0]
    L = T - 2
    states = np.random.default_rng(2).normal(size=(T, params["initial_mean"].shape[0]))
    bad_y, bad_u, bad_x = y.copy(), u.copy(), states.copy()
    bad_y[L:] = np.inf
    bad_u[L:] = np.nan
    bad_x[L:] = np.nan
    bad_params = {k: np.array(v, copy=True) for k, v in params.items()}
    bad_params["transition_cov"][L - 1 :] = np.nan  # transitions into padded steps
    bad_params["emission_cov"][L:] = np.nan
    short = {k: (v[: L - 1] if k.startswith("transition") else v[:L]) if np.ndim(v) == 3 or (
        k.endswith("offset") and np.ndim(v) == 2) else v for k, v in params.items()}
    want = ssmjax.lgssm_log_joint(to_model(short), states[:L], y[:L], inputs=u[:L])
    got = ssmjax.lgssm_log_joint(to_model(bad_params), bad_x, bad_y, inputs=bad_u, length=L)
    assert_allclose(got, want, jnp.float64)
    grad = jax.grad(lambda x: ssmjax.lgssm_log_joint(to_model(bad_params), x, bad_y, inputs=bad_u, length=L))(
        jnp.asarray(bad_x)
    )
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert bool(jnp.all(grad[L:] == 0.0))
    post = ssmjax.rts_smoother(to_model(bad_params), bad_y, inputs=bad_u, length=L)
    want_h = ssmjax.lgssm_posterior_entropy(ssmjax.rts_smoother(to_model(short), y[:L], inputs=u[:L]))
    assert_allclose(ssmjax.lgssm_posterior_entropy(post, length=L), want_h, jnp.float64)


def test_gradients_match_finite_differences():
    params, y, u = make_case("inputs-missing")
    states = np.random.default_rng(3).normal(size=(y.shape[0], params["initial_mean"].shape[0]))

    def f(theta):
        p = dict(params, transition_matrix=theta[:4].reshape(2, 2), emission_offset=theta[4:])
        model = to_model(p)
        post = ssmjax.rts_smoother(model, y, inputs=u)
        return ssmjax.lgssm_log_joint(model, states, y, inputs=u) + ssmjax.lgssm_posterior_entropy(post)

    theta = np.concatenate([np.ravel(params["transition_matrix"]), params["emission_offset"]])
    auto = jax.grad(f)(jnp.asarray(theta))
    fd = central_difference_grad(f, theta)
    assert_allclose(auto, fd, **FD_TOLERANCE)


def test_errors_name_the_argument():
    params, y, u = make_case("basic")
    model = to_model(params)
    with pytest.raises(ValueError, match=r"`states`.*\(5, 3\)"):
        ssmjax.lgssm_log_joint(model, np.zeros((5, 3)), y)
    singular = dict(params, transition_cov=np.diag([0.0, 1.0]))
    with pytest.raises(ValueError, match="`transition_cov` must be positive definite"):
        ssmjax.lgssm_log_joint(to_model(singular), np.zeros((5, 2)), y)
    with pytest.raises(ValueError, match="`posterior` must be the ssmjax.RTSSmootherResult"):
        ssmjax.lgssm_posterior_entropy(ssmjax.kalman_filter(model, y))


def test_float32_log_joint_and_entropy_close_to_float64():
    rng = np.random.default_rng(4)
    params = make_params(rng, 4, 2, 200, time_varying=True)
    model64 = to_model(params)
    y = np.asarray(ssmjax.lgssm_sample(model64, 200, key=jax.random.key(1))[1])
    states = np.asarray(ssmjax.lgssm_sample_posterior(model64, y, key=jax.random.key(2)))
    model32 = to_model(params, jnp.float32)
    for fn in (
        lambda m, yy, xx: ssmjax.lgssm_log_joint(m, xx, yy),
        lambda m, yy, xx: ssmjax.lgssm_posterior_entropy(ssmjax.rts_smoother(m, yy)),
    ):
        v64 = fn(model64, y, states)
        v32 = fn(model32, y.astype(np.float32), states.astype(np.float32))
        assert v32.dtype == jnp.float32 and bool(jnp.isfinite(v32))
        assert_allclose(v32, v64, jnp.float32)
