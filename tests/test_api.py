"""One consistent public API: PRNG keys keyword-only and last, one name per concept, fixed return
arity, and the old spellings kept for one release with a DeprecationWarning naming the new one."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax


def _public_callables():
    """Every public function, and every public method and classmethod of the public classes."""
    for name in dir(ssmjax):
        obj = getattr(ssmjax, name)
        if name.startswith("_"):
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and obj.__module__.startswith("ssmjax"):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(fn):
                    yield f"{name}.{attr}", fn


DEPRECATED = {"HMM.posterior_sample", "LGSSM.posterior_sample"}  # the old spellings themselves


def test_keys_are_keyword_only_and_last():
    checked = 0
    for name, fn in _public_callables():
        params = inspect.signature(fn).parameters
        if "key" not in params or name in DEPRECATED:
            continue
        checked += 1
        key = params["key"]
        assert key.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert list(params)[-1] == "key", name
    assert checked >= 12  # the samplers, the initialisers, fit_sgd


def _hmm():
    return ssmjax.HMM(jnp.array([0.6, 0.4]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
                      ssmjax.PoissonEmissions(rates=jnp.array([[2.0], [9.0]])))


def _lgssm():
    return ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2), transition_matrix=0.9 * jnp.eye(2),
                        transition_cov=0.1 * jnp.eye(2), emission_matrix=jnp.ones((1, 2)), emission_cov=jnp.eye(1))


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _deprecated(new_name, old_call, new_call):
    with pytest.warns(DeprecationWarning, match=new_name):
        old = old_call()
    _same(old, new_call())


def test_old_spellings_warn_and_agree():
    key = jax.random.key(3)
    raw = jax.random.PRNGKey(3)
    hmm, lg, chain = _hmm(), _lgssm(), ssmjax.MarkovChain(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.3, 0.7]]))
    counts = hmm.sample(30, key=key)[1]
    ll = hmm.log_likelihoods(counts)
    ys = lg.sample(20, key=key)[1]
    states = chain.sample(10, key=key)
    cases = [
        ("key=key", lambda: ssmjax.hmm_sample_posterior(key, hmm.initial_probs, hmm.transition_matrix, ll),
         lambda: ssmjax.hmm_sample_posterior(hmm.initial_probs, hmm.transition_matrix, ll, key=key)),
        ("key=key", lambda: ssmjax.hmm_sample_posterior(raw, hmm.initial_probs, hmm.transition_matrix, ll),
         lambda: ssmjax.hmm_sample_posterior(hmm.initial_probs, hmm.transition_matrix, ll, key=raw)),
        ("key=key", lambda: ssmjax.lgssm_sample(key, lg, 7), lambda: ssmjax.lgssm_sample(lg, 7, key=key)),
        ("key=key", lambda: ssmjax.lgssm_sample_posterior(key, lg, ys), lambda: ssmjax.lgssm_sample_posterior(lg, ys, key=key)),
        ("key=key", lambda: hmm.sample(key, 5), lambda: hmm.sample(5, key=key)),
        ("sample_posterior", lambda: hmm.posterior_sample(key, counts), lambda: hmm.sample_posterior(counts, key=key)),
        ("HMM.viterbi", lambda: hmm.most_likely_states(counts), lambda: hmm.viterbi(counts)),
        ("key=key", lambda: ssmjax.HMM.from_data(key, counts[None], 2, "poisson"),
         lambda: ssmjax.HMM.from_data(counts[None], 2, "poisson", key=key)),
        ("key=key", lambda: ssmjax.HMM.random(key, 2, hmm.emissions), lambda: ssmjax.HMM.random(2, hmm.emissions, key=key)),
        ("key=key", lambda: ssmjax.PoissonEmissions.random(key, 2, 1), lambda: ssmjax.PoissonEmissions.random(2, 1, key=key)),
        ("key=key", lambda: ssmjax.GaussianEmissions.random(key, 2, 3), lambda: ssmjax.GaussianEmissions.random(2, 3, key=key)),
        ("key=key", lambda: ssmjax.CategoricalEmissions.random(key, 2, 3), lambda: ssmjax.CategoricalEmissions.random(2, 3, key=key)),
        ("key=key", lambda: ssmjax.GaussianEmissions.from_data(key, ys, 2), lambda: ssmjax.GaussianEmissions.from_data(ys, 2, key=key)),
        ("key=key", lambda: ssmjax.CategoricalEmissions.from_data(key, states, 2, 2),
         lambda: ssmjax.CategoricalEmissions.from_data(states, 2, 2, key=key)),
        ("key=key", lambda: chain.sample(key, 6), lambda: chain.sample(6, key=key)),
        ("marginal_loglik", lambda: chain.log_prob(states), lambda: chain.marginal_loglik(states)),
        ("key=key", lambda: lg.sample(key, 4), lambda: lg.sample(4, key=key)),
        ("sample_posterior", lambda: lg.posterior_sample(key, ys), lambda: lg.sample_posterior(ys, key=key)),
    ]
    for new_name, old_call, new_call in cases:
        _deprecated(new_name, old_call, new_call)


def test_gaussian_storages_are_separate_classes_and_the_old_spellings_still_build_them():
    means, variances = jnp.array([[0.0, 1.0], [2.0, -1.0]]), jnp.array([[1.0, 0.5], [2.0, 1.5]])
    new = ssmjax.DiagonalGaussianEmissions(means, variances)
    assert type(new) is not ssmjax.GaussianEmissions and isinstance(new, ssmjax.AbstractGaussianEmissions)
    old_calls = [
        lambda: ssmjax.GaussianEmissions(means, variances),
        lambda: ssmjax.GaussianEmissions(means, log_variances=jnp.log(variances)),
        lambda: ssmjax.GaussianEmissions(means=means, covs=variances),
    ]
    for call in old_calls:
        with pytest.warns(DeprecationWarning, match="DiagonalGaussianEmissions"):
            old = call()
        assert type(old) is ssmjax.DiagonalGaussianEmissions
        _same(old, new)
    key = jax.random.key(0)
    ys = jax.random.normal(jax.random.key(1), (40, 2))
    for method, args in (("random", (3, 2)), ("from_data", (ys, 3))):
        with pytest.warns(DeprecationWarning, match=f"DiagonalGaussianEmissions.{method}"):
            old = getattr(ssmjax.GaussianEmissions, method)(*args, "diag", key=key)
        _same(old, getattr(ssmjax.DiagonalGaussianEmissions, method)(*args, key=key))
    # the full class keeps its spelling and its storage
    full = ssmjax.GaussianEmissions(means, jnp.stack([jnp.eye(2)] * 2))
    assert full.covariance_type == "full" and full.chol_covs.shape == (2, 2, 2)


def test_fit_em_returns_three_values_and_the_old_flag_still_works():
    hmm = _hmm()
    counts = hmm.sample(40, key=jax.random.key(0))[1][None]
    fitted, lls, info = ssmjax.fit_em(hmm, counts, max_iters=3, tol=0.0)
    assert info.num_iters == len(lls) == 3
    with pytest.warns(DeprecationWarning, match="always returns"):
        old = ssmjax.fit_em(hmm, counts, max_iters=3, tol=0.0, return_info=False)
    assert len(old) == 2
    _same(old, (fitted, lls))
    with pytest.warns(DeprecationWarning, match="always returns"):
        assert len(ssmjax.fit_em(hmm, counts, max_iters=3, tol=0.0, return_info=True)) == 3


def test_emission_models_written_against_the_old_sample_protocol_still_sample():
    class OldPoisson(ssmjax.PoissonEmissions):
        def sample(self, key, state):  # the old argument order
            return jax.random.poisson(key, self.rates[state]).astype(jnp.int32)

    old = ssmjax.HMM(jnp.array([0.6, 0.4]), jnp.array([[0.9, 0.1], [0.2, 0.8]]), OldPoisson(rates=jnp.array([[2.0], [9.0]])))
    with pytest.warns(DeprecationWarning, match=r"sample\(self, state, \*, key\)"):
        states, counts = old.sample(12, key=jax.random.key(1))
    new_states, new_counts = _hmm().sample(12, key=jax.random.key(1))
    np.testing.assert_array_equal(states, new_states)
    np.testing.assert_array_equal(counts, new_counts)
