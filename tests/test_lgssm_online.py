"""Online Kalman filtering (kalman_update / kalman_predict): one step at a time, the whole filter."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax
from helpers import assert_allclose
from test_lgssm_inference import make_params, to_model
from test_lgssm_oracle import oracle


def _online(model, ys, us):
    """The filter run as a stream: predict (from the second step on), then update."""
    mean, cov = model.initial_mean, model.initial_cov
    out = {"filtered_means": [], "filtered_covs": [], "predicted_means": [], "predicted_covs": [], "logliks": []}
    for t in range(len(ys)):
        u = None if us is None else us[t]
        if t:
            ahead = ssmjax.kalman_predict(model, out["filtered_means"][-1], out["filtered_covs"][-1], inputs=u)
            mean, cov = ahead.predicted_mean, ahead.predicted_cov
        step = ssmjax.kalman_update(model, mean, cov, ys[t], inputs=u)
        for name, value in (("predicted_means", mean), ("predicted_covs", cov), ("filtered_means", step.filtered_mean),
                            ("filtered_covs", step.filtered_cov), ("logliks", step.loglik)):
            out[name].append(value)
    return {name: np.stack(values) for name, values in out.items()}


@pytest.mark.parametrize("du", [None, 2])
def test_stream_of_steps_is_the_filter_and_the_dense_oracle(du):
    """Inputs, offsets, a partly and a wholly missing step: every moment equals kalman_filter's, the
    log-likelihood increments sum to the dense-Gaussian oracle's log p(y)."""
    rng = np.random.default_rng(3)
    params = make_params(rng, 3, 2, 7, du=du, offsets=True)
    model = to_model(params)
    ys = rng.normal(size=(7, 2))
    ys[2, 1] = np.nan
    ys[4] = np.nan
    us = None if du is None else rng.normal(size=(7, du))
    got = _online(model, jnp.asarray(ys), None if us is None else jnp.asarray(us))
    whole = ssmjax.kalman_filter(model, ys, inputs=us)
    dense = oracle(params, ys, us)
    for name in ("filtered_means", "filtered_covs", "predicted_means", "predicted_covs"):
        assert_allclose(got[name], getattr(whole, name))
        assert_allclose(got[name], dense[name])
    assert got["logliks"][4] == 0.0  # nothing observed: no evidence
    assert_allclose(got["logliks"].sum(), whole.marginal_loglik)
    assert_allclose(got["logliks"].sum(), dense["marginal_loglik"])


def test_pykalman_filter_update_agrees():
    pykalman = pytest.importorskip("pykalman")
    rng = np.random.default_rng(4)
    params = make_params(rng, 2, 2, 5, offsets=True)
    kf = pykalman.KalmanFilter(
        transition_matrices=params["transition_matrix"], observation_matrices=params["emission_matrix"],
        transition_covariance=params["transition_cov"], observation_covariance=params["emission_cov"],
        transition_offsets=params["transition_offset"], observation_offsets=params["emission_offset"],
        initial_state_mean=params["initial_mean"], initial_state_covariance=params["initial_cov"],
    )
    model = to_model(params)
    mean, cov = rng.normal(size=2), params["initial_cov"]
    y = rng.normal(size=2)
    want_mean, want_cov = kf.filter_update(mean, cov, y)  # predict, then update
    ahead = ssmjax.kalman_predict(model, mean, cov)
    got = ssmjax.kalman_update(model, ahead.predicted_mean, ahead.predicted_cov, y)
    assert_allclose(got.filtered_mean, want_mean)
    assert_allclose(got.filtered_cov, want_cov)


def test_jit_vmap_and_gradients_through_a_scan_of_steps():
    """A compiled scan of online steps over a batch: the filter's log-likelihood and its gradient."""
    rng = np.random.default_rng(5)
    model = to_model(make_params(rng, 2, 1, 6))
    ys = jnp.asarray(rng.normal(size=(4, 6, 1)))

    def loglik(model, y):
        def body(carry, y_t):
            step = ssmjax.kalman_update(model, *carry, y_t)
            ahead = ssmjax.kalman_predict(model, step.filtered_mean, step.filtered_cov)
            return (ahead.predicted_mean, ahead.predicted_cov), step.loglik

        return jax.lax.scan(body, (model.initial_mean, model.initial_cov), y)[1].sum()

    batched = eqx.filter_jit(jax.vmap(loglik, in_axes=(None, 0)))(model, ys)
    assert_allclose(batched, jax.vmap(lambda y: ssmjax.kalman_filter(model, y).marginal_loglik)(ys))
    grad = eqx.filter_grad(lambda m: loglik(m, ys[0]))(model)
    want = eqx.filter_grad(lambda m: ssmjax.kalman_filter(m, ys[0]).marginal_loglik)(model)
    for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want)):
        assert_allclose(g, w)


def test_bad_arguments_are_named():
    rng = np.random.default_rng(6)
    params = make_params(rng, 2, 1, 4, du=1)
    model = to_model(params)
    mean, cov = model.initial_mean, model.initial_cov
    with pytest.raises(ValueError, match=r"`predicted_mean` must have shape \(2,\)"):
        ssmjax.kalman_update(model, jnp.zeros(3), cov, jnp.zeros(1), inputs=jnp.zeros(1))
    with pytest.raises(ValueError, match=r"`emission` must have shape \(1,\)"):
        ssmjax.kalman_update(model, mean, cov, jnp.zeros((1, 1)), inputs=jnp.zeros(1))
    with pytest.raises(ValueError, match=r"so `inputs` \(1,\), the inputs of this step, are required"):
        ssmjax.kalman_update(model, mean, cov, jnp.zeros(1))
    with pytest.raises(ValueError, match="`inputs` must be finite"):
        ssmjax.kalman_predict(model, mean, cov, inputs=jnp.array([np.nan]))
    with pytest.raises(ValueError, match="`filtered_cov` must be"):
        ssmjax.kalman_predict(model, mean, -jnp.eye(2), inputs=jnp.zeros(1))
    with pytest.raises(ValueError, match="`inputs` were given but the model has no input matrix"):
        ssmjax.kalman_predict(to_model(make_params(rng, 2, 1, 4)), mean, cov, inputs=jnp.zeros(1))
    varying = to_model(make_params(rng, 2, 1, 4, time_varying=True))
    with pytest.raises(ValueError, match=r"`kalman_update` needs a time-invariant model.*'emission_cov'"):
        ssmjax.kalman_update(varying, mean, cov, jnp.zeros(1))
    diffuse = ssmjax.LGSSM(**{k: jnp.asarray(v) for k, v in make_params(rng, 2, 1, 4).items()}, diffuse=True)
    with pytest.raises(ValueError, match="`kalman_predict` needs a proper prior"):
        ssmjax.kalman_predict(diffuse, mean, cov)
