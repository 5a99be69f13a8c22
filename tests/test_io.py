"""ssmjax.save / ssmjax.load round-trip every model type exactly."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmjax


def models():
    k = jax.random.key(0)
    pi, a = jnp.array([0.2, 0.8]), jnp.array([[0.9, 0.1], [0.0, 1.0]])  # a structural zero
    yield ssmjax.HMM(pi, a, ssmjax.PoissonEmissions(rates=jnp.array([[3.0, 1.0], [12.0, 4.0]])))
    yield ssmjax.HMM(pi, a, ssmjax.GaussianEmissions(jnp.ones((2, 3)), jnp.stack([jnp.eye(3)] * 2), min_variance=1e-3))
    yield ssmjax.HMM(pi, a, ssmjax.DiagonalGaussianEmissions(jnp.ones((2, 3)), jnp.ones((2, 3))))
    yield ssmjax.HMM(pi, a, ssmjax.CategoricalEmissions.random(2, 5, key=k))
    yield ssmjax.MarkovChain(pi, a)
    yield ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2), transition_matrix=jnp.eye(2),
                       transition_cov=jnp.eye(2), emission_matrix=jnp.ones((4, 1, 2)), emission_cov=jnp.eye(1),
                       transition_input_matrix=jnp.ones((2, 3)), emission_offset=jnp.ones(1))
    yield ssmjax.PoissonEmissions(rates=jnp.array([[2.0]]))


@pytest.mark.parametrize("model", list(models()), ids=lambda m: type(m).__name__)
def test_round_trip_is_exact(model, tmp_path):
    path = tmp_path / "model.eqx"
    ssmjax.save(path, model)
    loaded = ssmjax.load(path)
    assert type(loaded) is type(model)
    assert jax.tree.structure(loaded) == jax.tree.structure(model)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # static fields survive too
    assert eqx.tree_equal(eqx.filter(loaded, eqx.is_array, inverse=True), eqx.filter(model, eqx.is_array, inverse=True))


def test_files_name_public_classes_by_their_public_name(tmp_path):
    # the header names ssmjax.HMM, not the private module that defines it, so files outlive a
    # reorganisation of the private modules
    ssmjax.save(tmp_path / "m", next(models()))
    header = (tmp_path / "m").read_bytes().split(b"\n", 1)[0].decode()
    assert '"ssmjax:HMM"' in header and '"ssmjax:PoissonEmissions"' in header
    assert "ssmjax._hmm" not in header


DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.mark.parametrize(
    "name, family, loglik",
    [  # log-likelihoods computed, in float32, by the version that wrote the files
        ("hmm_gaussian_diag_before_split.eqx", "DiagonalGaussianEmissions", -31.964494705200195),
        ("hmm_gaussian_full_before_split.eqx", "GaussianEmissions", -30.215560913085938),
    ],
)
def test_files_from_before_the_gaussian_split_load(name, family, loglik):
    # written when GaussianEmissions held both storages (chol_covs or log_variances, the other None)
    model = ssmjax.load(DATA / name)
    assert type(model.emissions) is getattr(ssmjax, family)
    y = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    np.testing.assert_allclose(float(model.marginal_loglik(y)), loglik, rtol=1e-6)


def test_loaded_model_computes_the_same(tmp_path):
    model = next(models())
    ssmjax.save(tmp_path / "m", model)
    y = jnp.array([[2, 1], [14, 3], [11, 5]])
    assert float(ssmjax.load(tmp_path / "m").marginal_loglik(y)) == float(model.marginal_loglik(y))


class Exponential(ssmjax.AbstractEmissions):
    log_rates: jax.Array

    @property
    def num_states(self):
        return self.log_rates.shape[0]

    @property
    def emission_shape(self):
        return ()

    def log_prob(self, emission):
        return self.log_rates - jnp.exp(self.log_rates) * emission

    def sample(self, key, state):
        return jax.random.exponential(key) / jnp.exp(self.log_rates[state])

    def check_emissions(self, emissions, mask=None):
        return emissions


def test_user_classes_need_explicit_permission(tmp_path):
    model = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.eye(2), Exponential(jnp.zeros(2)))
    ssmjax.save(tmp_path / "m", model)
    with pytest.raises(ValueError, match="not part of ssmjax; pass it to load"):
        ssmjax.load(tmp_path / "m")
    loaded = ssmjax.load(tmp_path / "m", classes=[Exponential])
    np.testing.assert_array_equal(loaded.emissions.log_rates, model.emissions.log_rates)


def test_bad_files_are_rejected(tmp_path):
    (tmp_path / "x").write_text("hello\n")
    with pytest.raises(ValueError, match="not an ssmjax model file"):
        ssmjax.load(tmp_path / "x")
    with pytest.raises(ValueError, match="`model` must be an ssmjax model"):
        ssmjax.save(tmp_path / "y", {"a": 1})
    assert not (tmp_path / "y").exists()
