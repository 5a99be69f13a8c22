"""Extreme but valid inputs: finite float32 results within the documented accuracy of float64
(``ssmjax._types``), or a clear error.

Thrown at every inference function: log-likelihoods near the float32 limits (K up to 64,
T up to 10^5), covariances with condition numbers up to 1e7 in both Kalman forms, sequences
of length 1, all-missing sequences, and near-diffuse priors (where the strategy selection
takes the square-root form, or warns). Also EM and SGD on data scaled by 1e-6 .. 1e6, Markov
chains of 10^5 steps, and emission families at extreme parameters and values.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ssmjax

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _float32(tree):
    """Floating leaves as float32 JAX arrays (call in 32-bit mode)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else x, tree)


def in_float32(fn, *args):
    """``fn`` on float32 copies of ``args`` in JAX's default 32-bit mode, as NumPy arrays."""
    with jax.enable_x64(False):
        return jax.tree.map(np.asarray, fn(*_float32(args)))


def rel_err(low, high):
    high = np.asarray(high, np.float64)
    return float(np.max(np.abs(np.asarray(low, np.float64) - high)) / max(np.max(np.abs(high)), 1e-30))


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- HMMs


def _hmm_problem(num_states, num_timesteps, scale, offset, seed):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(num_states))
    a = 0.8 * np.eye(num_states) + 0.2 * rng.dirichlet(np.ones(num_states), num_states)
    ll = offset - scale * np.abs(rng.standard_normal((num_timesteps, num_states)))
    return pi, a, ll


HMM_FUNCTIONS = {
    "filter": lambda p, a, ll: ssmjax.hmm_filter(p, a, ll),
    "smoother": lambda p, a, ll: ssmjax.hmm_smoother(p, a, ll),
    "two_slice": lambda p, a, ll: ssmjax.hmm_two_slice_marginals(p, a, ll),
    "viterbi": lambda p, a, ll: ssmjax.hmm_viterbi(p, a, ll)[1],
    "fixed_lag": lambda p, a, ll: ssmjax.hmm_fixed_lag_smoother(p, a, ll, 5),
    "predict": lambda p, a, ll: ssmjax.hmm_predict(p, a, ll, 3),
}


def _within_float32_accuracy(low, high) -> bool:
    """Scores (log-likelihoods, path log-probabilities) to 1e-5 relative; probabilities to 1e-4
    absolute, and expected counts to 1e-4 relative to the largest."""
    high = np.asarray(high, np.float64)
    if high.ndim == 0:
        return rel_err(low, high) <= 1e-5
    return float(np.max(np.abs(np.asarray(low, np.float64) - high))) <= 1e-4 * max(1.0, float(np.max(np.abs(high))))


def _check_hmm(pi, a, ll):
    for name, fn in HMM_FUNCTIONS.items():
        low, high = in_float32(fn, pi, a, ll), fn(pi, a, ll)
        assert _finite(low), name
        for lo, hi in zip(jax.tree.leaves(low), jax.tree.leaves(high)):
            assert _within_float32_accuracy(lo, hi), name
    path = in_float32(lambda p, t, l: ssmjax.hmm_sample_posterior(p, t, l, key=jax.random.key(0)), pi, a, ll)
    assert path.min() >= 0 and path.max() < len(pi)


@SETTINGS
@given(num_states=st.sampled_from([2, 64]), log_scale=st.floats(0, 33), offset=st.sampled_from([0.0, -1e30]),
       seed=st.integers(0, 2**16))
def test_hmm_log_likelihoods_near_the_float32_limits(num_states, log_scale, offset, seed):
    _check_hmm(*_hmm_problem(num_states, 300, 10.0**log_scale, offset, seed))


def test_hmm_k64_t1e5_in_float32():
    pi, a, ll = _hmm_problem(64, 100_000, 1e33, 0.0, 0)
    for name in ("filter", "viterbi"):  # the smoother at K = 64: the hypothesis test above
        fn = HMM_FUNCTIONS[name]
        low, high = in_float32(fn, pi, a, ll), fn(pi, a, ll)
        assert _finite(low)
        for lo, hi in zip(jax.tree.leaves(low), jax.tree.leaves(high)):
            assert _within_float32_accuracy(lo, hi), name
    path32 = in_float32(lambda p, t, l: ssmjax.hmm_viterbi(p, t, l)[0], pi, a, ll)
    assert np.mean(path32 != np.asarray(ssmjax.hmm_viterbi(pi, a, ll)[0])) <= 1e-3


# --------------------------------------------------------------------------- Kalman


def _spd(rng, dim, cond, scale):
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * (scale * np.logspace(0, -np.log10(cond), dim))) @ q.T


def _lgssm(seed, cond_q=1.0, cond_r=1.0, cond_p0=1.0, p0_scale=1.0, dx=4, dy=2):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dx, dx))
    a = 0.95 * a / np.max(np.abs(np.linalg.eigvals(a)))
    return ssmjax.LGSSM(initial_mean=np.zeros(dx), initial_cov=_spd(rng, dx, cond_p0, p0_scale), transition_matrix=a,
                        transition_cov=_spd(rng, dx, cond_q, 0.1), emission_matrix=rng.standard_normal((dy, dx)),
                        emission_cov=_spd(rng, dy, cond_r, 0.5))


@SETTINGS
@given(log_cond=st.tuples(st.floats(0, 7), st.floats(0, 7), st.floats(0, 7)),
       method=st.sampled_from(["auto", "standard", "sqrt"]), seed=st.integers(0, 2**16))
def test_kalman_condition_numbers_up_to_1e7_in_float32(log_cond, method, seed):
    cq, cr, cp = (10.0**c for c in log_cond)
    model = _lgssm(seed, cq, cr, cp)
    _, y = ssmjax.lgssm_sample(model, 200, key=jax.random.key(seed))
    y = np.array(y)
    y[17, 0] = np.nan  # a missing entry: the masked recursion
    smooth = lambda m, e: ssmjax.rts_smoother(m, e, method=method)  # noqa: E731
    low, high = in_float32(smooth, model, y), smooth(model, y)
    assert _finite(low)
    for field in ("filtered_means", "smoothed_means", "smoothed_covs", "marginal_loglik"):
        assert rel_err(getattr(low, field), getattr(high, field)) <= 1e-5, field
    forecast = in_float32(lambda m, e: ssmjax.lgssm_forecast(m, e, 5), model, y)
    assert _finite(forecast)
    draw = in_float32(lambda m, e: ssmjax.lgssm_sample_posterior(m, e, key=jax.random.key(1)), model, y)
    assert _finite(draw)


def test_near_diffuse_float32_prior_takes_the_square_root_form_or_warns():
    model = _lgssm(0, p0_scale=1e7)
    _, y = ssmjax.lgssm_sample(model, 300, key=jax.random.key(0))
    y = np.array(y)
    with jax.enable_x64(False):
        model32, y32 = _float32((model, y))
        chosen = ssmjax.lgssm_strategy(model32, y32)
        assert chosen.form == "sqrt" and "initial_cov" in chosen.reasons[0]
        assert ssmjax.lgssm_strategy(model32.__class__(**_fields(model32, initial_cov=jnp.eye(4, dtype=jnp.float32))),
                                     y32).form == "covariance"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            filtered = ssmjax.kalman_filter(model32, y32)  # the square-root filter: accurate, no warning
        with pytest.warns(RuntimeWarning, match="covariance form loses accuracy"):
            ssmjax.kalman_filter(model32, y32, method="standard")
        with pytest.warns(RuntimeWarning, match="the first steps' covariances"):
            ssmjax.rts_smoother(model32, y32)
    assert ssmjax.lgssm_strategy(model, y).form == "covariance"  # float64: no change
    reference = ssmjax.kalman_filter(model, y)
    assert rel_err(filtered.filtered_means, reference.filtered_means) <= 1e-5
    assert rel_err(filtered.marginal_loglik, reference.marginal_loglik) <= 1e-5


def _fields(model, **changes):
    names = ("initial_mean", "initial_cov", "transition_matrix", "transition_cov", "emission_matrix", "emission_cov")
    return {**{n: getattr(model, n) for n in names}, **changes}


# --------------------------------------------------------------------------- lengths of 1, all missing


def test_length_one_everywhere():
    pi, a, ll = _hmm_problem(3, 1, 1.0, 0.0, 0)
    padded = np.concatenate([ll, np.full((4, 3), np.nan)])
    for name, fn in HMM_FUNCTIONS.items():
        one = fn(pi, a, ll)
        assert _finite(one), name
        if name not in ("fixed_lag", "predict", "two_slice"):
            lengthy = {"filter": ssmjax.hmm_filter, "smoother": ssmjax.hmm_smoother}.get(name)
            if lengthy is not None:
                np.testing.assert_allclose(lengthy(pi, a, padded, length=1).marginal_loglik, one.marginal_loglik)
    model = _lgssm(0)
    y = np.array([[0.3, -0.2]])
    for fn in (ssmjax.kalman_filter, ssmjax.rts_smoother):
        out = fn(model, y)
        assert _finite(out)
        padded_out = fn(model, np.concatenate([y, np.full((4, 2), np.inf)]), length=1)
        np.testing.assert_allclose(padded_out.marginal_loglik, out.marginal_loglik, rtol=1e-12)
    assert _finite(ssmjax.lgssm_forecast(model, y, 3))
    assert _finite(ssmjax.lgssm_sample_posterior(model, y, key=jax.random.key(0)))
    assert _finite(in_float32(lambda m, e: ssmjax.rts_smoother(m, e), model, y))


def test_all_missing_sequences_give_the_prior():
    model = _lgssm(1)
    y = np.full((6, 2), np.nan)
    post = ssmjax.rts_smoother(model, y)
    assert float(post.marginal_loglik) == 0.0
    a = np.asarray(model.transition_matrix)
    prior_cov = [np.asarray(model.initial_cov)]
    for _ in range(5):
        prior_cov.append(a @ prior_cov[-1] @ a.T + np.asarray(model.transition_cov))
    np.testing.assert_allclose(post.smoothed_means, 0.0, atol=1e-12)
    np.testing.assert_allclose(post.smoothed_covs, np.stack(prior_cov), rtol=1e-10)
    assert _finite(in_float32(lambda m, e: ssmjax.rts_smoother(m, e, method="sqrt"), model, y))
    hmm = ssmjax.HMM(jnp.array([0.3, 0.7]), jnp.array([[0.9, 0.1], [0.4, 0.6]]),
                     ssmjax.GaussianEmissions(jnp.zeros((2, 1)), jnp.ones((2, 1, 1))))
    hmm_post = hmm.smoother(np.full((4, 1), np.nan))
    assert abs(float(hmm_post.marginal_loglik)) <= 1e-12
    marginals = [np.array([0.3, 0.7])]
    for _ in range(3):
        marginals.append(marginals[-1] @ np.asarray(hmm.transition_matrix))
    np.testing.assert_allclose(hmm_post.smoothed_probs, np.stack(marginals), rtol=1e-10)
    batch = np.random.default_rng(0).standard_normal((3, 8, 1))
    batch[1] = np.nan  # one sequence entirely missing inside a fitted batch
    fitted, lls, _ = ssmjax.fit_em(hmm, batch, max_iters=5)
    assert _finite(lls) and _finite(fitted.emissions.means)


# --------------------------------------------------------------------------- fitting, chains, emission families


@settings(SETTINGS, max_examples=4)
@given(log_scale=st.floats(-6, 6), seed=st.integers(0, 2**16))
def test_fits_on_data_of_extreme_scale_stay_finite_in_float32(log_scale, seed):
    """EM and SGD on data scaled by 1e-6 .. 1e6, float32: finite, and EM never decreases (or says so)."""
    scale = 10.0**log_scale
    rng = np.random.default_rng(seed)
    y = scale * (rng.standard_normal((4, 60, 1)) + np.where(rng.random((4, 60, 1)) < 0.5, -2.0, 2.0))
    with jax.enable_x64(False):
        hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.1, 0.9]]),
                         ssmjax.GaussianEmissions(jnp.array([[-scale], [scale]]), jnp.ones((2, 1, 1)) * scale**2))
        lgssm = ssmjax.LGSSM(initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1) * scale**2,
                             transition_matrix=0.9 * jnp.eye(1), transition_cov=jnp.eye(1) * scale**2,
                             emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1) * scale**2)
        data = jnp.asarray(y, jnp.float32)
        for model in (hmm, lgssm):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fitted, lls, info = ssmjax.fit_em(model, data, max_iters=15)
            assert _finite(lls) and _finite(fitted)
            if info.status not in ("decreased", "not_finite"):
                assert np.all(np.diff(np.asarray(lls)) >= -1e-5 * np.abs(np.asarray(lls[:-1]))), type(model)
            else:  # the guard stopped the loop, and said so
                assert any("fit_em stopped" in str(w.message) for w in caught)
            fitted, losses = ssmjax.fit_sgd(model, data, optax_adam(), num_steps=10)
            assert _finite(fitted) and np.isfinite(np.asarray(losses)[-1])


def optax_adam():
    import optax

    return optax.adam(0.05)


def test_markov_chain_long_sequences_in_float32():
    rng = np.random.default_rng(0)
    states = rng.integers(0, 5, size=(3, 100_000))
    fitted = ssmjax.MarkovChain.fit(states)
    high = fitted.marginal_loglik(states[0])
    low = in_float32(lambda s: ssmjax.MarkovChain.fit(s).marginal_loglik(s[0]), states)
    assert np.isfinite(low) and rel_err(low, high) <= 1e-5


@pytest.mark.parametrize("family", ["poisson", "gaussian", "categorical", "bernoulli", "gamma"])
def test_emission_families_at_extreme_values_in_float32(family):
    """Log-likelihoods of extreme but valid emissions: finite, and within float32 accuracy of float64."""
    rng = np.random.default_rng(0)
    if family == "poisson":
        model = ssmjax.PoissonEmissions(rates=np.array([[1e-3], [1e8]]))
        y = np.array([[0.0], [1e9], [3.0], [1e8]])
    elif family == "gaussian":
        model = ssmjax.GaussianEmissions(np.array([[0.0, 0.0], [1e15, -1e15]]),
                                         np.stack([np.diag([1e-6, 1e-6]), np.diag([1e28, 1e28])]))
        y = np.array([[1e-3, -1e-3], [1e15, -1e15], [3e15, 0.0]])
    elif family == "categorical":
        model = ssmjax.CategoricalEmissions(probs=np.array([[1 - 63e-9] + [1e-9] * 63, [1 / 64] * 64]))
        y = np.array([0, 5, 63])
    elif family == "bernoulli":
        model = ssmjax.BernoulliEmissions(probs=np.array([[1e-7, 1 - 1e-7], [0.5, 0.5]]))
        y = np.array([[1.0, 0.0], [0.0, 1.0]])
    else:
        model = ssmjax.GammaEmissions(shapes=np.array([[1e-3], [1e4]]), rates=np.array([[1e-3], [1e2]]))
        y = np.array([[1e-30], [1e30], [100.0]])
    del rng
    high = model.log_likelihoods(y)
    low = in_float32(lambda m, e: m.log_likelihoods(e), model, y)
    assert _finite(high) and _finite(low), family
    assert rel_err(low, high) <= 1e-5, family
