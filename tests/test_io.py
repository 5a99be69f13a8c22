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


def _saved_hmm(tmp_path):
    model = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
                       ssmjax.GaussianEmissions(jnp.zeros((2, 2)), jnp.stack([jnp.eye(2)] * 2)))
    path = tmp_path / "model.eqx"
    ssmjax.save(path, model)
    return model, path, path.read_bytes()


def test_damaged_files_raise_a_value_error_naming_the_file(tmp_path):
    _, path, raw = _saved_hmm(tmp_path)
    header_end = raw.index(b"\n") + 1
    damaged = tmp_path / "damaged.eqx"
    # cut anywhere: in the header, inside an array's own header, inside its data, at the last byte
    for cut in sorted({header_end // 2, header_end, header_end + 5, header_end + 100, (len(raw) + header_end) // 2,
                       len(raw) - 1}):
        damaged.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"damaged\.eqx (is damaged or incomplete|is not an ssmjax)"):
            ssmjax.load(damaged)
    damaged.write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match=r"damaged\.eqx is damaged: it holds more bytes"):
        ssmjax.load(damaged)
    damaged.write_bytes(raw[:header_end] + bytes(range(256)) * 4)  # a valid header over foreign bytes
    with pytest.raises(ValueError, match=r"damaged\.eqx is damaged or incomplete: reading its arrays failed at "
                                         r"`initial_log_probs`"):
        ssmjax.load(damaged)
    wrong_shape = raw.replace(b'"array": [2, 2]', b'"array": [3, 2]', 1)
    damaged.write_bytes(wrong_shape)
    with pytest.raises(ValueError, match=r"an array of shape \(2, 2\) where the header says \(3, 2\)"):
        ssmjax.load(damaged)
    damaged.write_bytes(raw.replace(b'"structure"', b'"structur"', 1))
    with pytest.raises(ValueError, match=r"damaged\.eqx is damaged: its header does not describe a model"):
        ssmjax.load(damaged)


@pytest.mark.parametrize("name", [b"os:system", b"builtins:eval", b"ssmjax._io:load", b"ssmjax:save"])
def test_files_naming_anything_but_a_model_class_are_refused(tmp_path, name):
    _, _, raw = _saved_hmm(tmp_path)
    evil = tmp_path / "evil.eqx"
    evil.write_bytes(raw.replace(b"ssmjax:HMM", name, 1))
    with pytest.raises(ValueError, match=r"evil\.eqx: the file (contains a model of class|names) "):
        ssmjax.load(evil)


def test_64_bit_file_loads_in_32_bit_mode_with_a_warning(tmp_path):
    model, path, _ = _saved_hmm(tmp_path)  # written with 64-bit mode on (tests/conftest.py)
    y = np.array([[0.3, -1.2], [2.0, 0.1], [np.nan, 0.5]])
    with jax.enable_x64(False):
        with pytest.warns(UserWarning, match=r"model\.eqx holds 64-bit arrays and 64-bit mode is off"):
            loaded = ssmjax.load(path)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(loaded, eqx.is_array)))
        loglik32 = float(loaded.marginal_loglik(y.astype(np.float32)))
    np.testing.assert_allclose(loglik32, float(model.marginal_loglik(y)), rtol=1e-6)
