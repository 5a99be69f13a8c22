"""±inf in observed data is an error naming the argument and the first offending entry, at every
entry point, eagerly and under ``jit`` (NaN stays a missing value)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ssmjax

JIT_ERROR = jax.errors.JaxRuntimeError


def _hmm(kind):
    pi, a = jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]])
    if kind == "poisson":
        return ssmjax.HMM(pi, a, ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [4.0]])))
    if kind == "gaussian":
        return ssmjax.HMM(pi, a, ssmjax.GaussianEmissions(jnp.zeros((2, 1)), jnp.ones((2, 1, 1))))
    return ssmjax.HMM(pi, a, ssmjax.LinearRegressionEmissions(jnp.zeros((2, 1, 1)), jnp.zeros((2, 1)),
                                                              jnp.ones((2, 1, 1))))


LGSSM = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1), transition_matrix=jnp.eye(1),
                     transition_cov=jnp.eye(1), emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1))


def _batch(value=np.inf):
    y = np.ones((3, 12, 1))
    y[0, 4, 0] = np.nan  # missing: allowed
    y[1, 7, 0] = value
    return y


BATCH_CALLS = {
    "fit_em": lambda m, y, u: ssmjax.fit_em(m, y, inputs=u, max_iters=2),
    "fit_sgd": lambda m, y, u: ssmjax.fit_sgd(m, y, optax.adam(0.1), inputs=u, num_steps=2),
    "log_likelihood": lambda m, y, u: m.log_likelihood(y, inputs=u),
    "bic": lambda m, y, u: m.bic(y, inputs=u),
}


@pytest.mark.parametrize("value", [np.inf, -np.inf])
@pytest.mark.parametrize("call", sorted(BATCH_CALLS))
@pytest.mark.parametrize("kind", ["poisson", "gaussian", "regression", "lgssm"])
def test_batch_entry_points_name_the_first_infinite_entry(kind, call, value):
    model = LGSSM if kind == "lgssm" else _hmm(kind)
    inputs = np.ones((3, 12, 1)) if kind == "regression" else None
    with pytest.raises(ValueError, match=r"`emissions` .*; the first is emissions\[1, 7, 0\]\.$"):
        BATCH_CALLS[call](model, _batch(value), inputs)


@pytest.mark.parametrize("kind", ["poisson", "gaussian", "lgssm"])
def test_one_sequence_eager_jit_and_vmap(kind):
    model = LGSSM if kind == "lgssm" else _hmm(kind)
    y = _batch()
    loglik = model.marginal_loglik
    with pytest.raises(ValueError, match=r"the first is emissions\[7, 0\]\.$"):
        loglik(y[1])
    with pytest.raises(JIT_ERROR, match=r"the first is emissions\[7, 0\]\."):
        jax.jit(lambda e: loglik(e))(y[1])
    with pytest.raises(JIT_ERROR, match=r"the first is emissions\[7, 0\]\."):  # the position within a sequence
        jax.jit(jax.vmap(lambda e: loglik(e)))(y)
    # padding past `length` may hold anything, NaN is missing: both fine
    assert np.isfinite(float(loglik(y[1], length=7)))
    assert np.isfinite(float(jax.jit(lambda e: loglik(e))(y[0])))


def test_lgssm_inference_functions_and_inputs():
    y = _batch()[1]
    for fn in (ssmjax.kalman_filter, ssmjax.rts_smoother):
        with pytest.raises(ValueError, match=r"the first is emissions\[7, 0\]"):
            fn(LGSSM, y)
    with pytest.raises(ValueError, match=r"the first is emissions\[7, 0\]"):
        LGSSM.forecast(y, 3)
    driven = LGSSM.__class__(**{**{f: getattr(LGSSM, f) for f in ("initial_mean", "initial_cov", "transition_matrix",
                                                                    "transition_cov", "emission_matrix",
                                                                    "emission_cov")},
                                "transition_input_matrix": jnp.ones((1, 1))})
    u = np.ones((12, 1))
    u[3, 0] = -np.inf
    with pytest.raises(ValueError, match=r"`inputs` must be finite; the first is inputs\[3, 0\]"):
        ssmjax.kalman_filter(driven, np.ones((12, 1)), inputs=u)
    with pytest.raises(JIT_ERROR, match=r"inputs\[3, 0\]"):
        jax.jit(lambda v: ssmjax.kalman_filter(driven, np.ones((12, 1)), inputs=v).marginal_loglik)(u)


@pytest.mark.parametrize("field", ["initial_mean", "transition_matrix", "transition_offset", "emission_matrix",
                                   "emission_input_matrix"])
def test_lgssm_weights_and_offsets_must_be_finite(field):
    # not only the covariances: a NaN weight would turn every result into NaN
    fields = {f: getattr(LGSSM, f) for f in ("initial_mean", "initial_cov", "transition_matrix", "transition_cov",
                                              "emission_matrix", "emission_cov")}
    fields.update(transition_offset=jnp.zeros(1), emission_input_matrix=jnp.ones((1, 1)))
    bad = {**fields, field: fields[field].at[(0,) * fields[field].ndim].set(jnp.nan)}
    y, u = np.ones((12, 1)), np.ones((12, 1))
    where = f"{field}[{', '.join(['0'] * fields[field].ndim)}]"
    with pytest.raises(ValueError, match=rf"`{field}` must be finite; the first is {re.escape(where)}"):
        ssmjax.LGSSM(**bad).marginal_loglik(y, inputs=u)
    with pytest.raises(JIT_ERROR, match=re.escape(where)):
        jax.jit(lambda m: m.marginal_loglik(y, inputs=u))(ssmjax.LGSSM(**bad))
    # a time-varying field's padded steps may hold anything
    varying = jnp.ones((12, 1, 1)).at[9:].set(jnp.nan)
    model = ssmjax.LGSSM(**{**fields, "emission_matrix": varying})
    assert np.isfinite(float(model.marginal_loglik(y, inputs=u, length=9)))
    with pytest.raises(ValueError, match=r"the first is emission_matrix\[9, 0, 0\]"):
        model.marginal_loglik(y, inputs=u)


def test_hmm_log_likelihoods_with_plus_inf_are_named():
    ll = np.zeros((6, 2))
    ll[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"\+inf at unpadded steps; the first is log_likelihoods\[4, 1\]"):
        ssmjax.hmm_filter(jnp.array([0.5, 0.5]), jnp.eye(2), ll)
    ll[4, 1] = -np.inf  # an impossible state: allowed
    assert np.isfinite(float(ssmjax.hmm_filter(jnp.array([0.5, 0.5]), jnp.full((2, 2), 0.5), ll).marginal_loglik))


def test_checks_switched_off_skip_the_position_search():
    with ssmjax.value_checks(False):
        assert not np.isfinite(float(LGSSM.marginal_loglik(_batch()[1])))
