"""Model selection: free-parameter counts, AIC and BIC against hmmlearn's, and choosing K."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_allclose, random_stochastic_matrix

import ssmjax

K = 3


def _gaussian(rng, kind, d=2):
    means = jnp.asarray(rng.normal(size=(K, d)) * 3.0)
    a = rng.normal(size=(K, d, d))
    covs = a @ np.swapaxes(a, 1, 2) + d * np.eye(d)
    if kind == "full":
        return ssmjax.GaussianEmissions(means, jnp.asarray(covs))
    if kind == "diag":
        return ssmjax.DiagonalGaussianEmissions(means, jnp.asarray(np.diagonal(covs, axis1=1, axis2=2)))
    if kind == "spherical":
        return ssmjax.SphericalGaussianEmissions(means, jnp.asarray(covs[:, 0, 0]))
    return ssmjax.TiedGaussianEmissions(means, jnp.asarray(covs[0]))


@pytest.mark.parametrize("kind", ["full", "diag", "spherical", "tied", "multinomial", "categorical", "poisson"])
def test_num_parameters_aic_and_bic_equal_hmmlearns(kind):
    hmm_module = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(0)
    pi, A = rng.dirichlet(np.ones(K)), random_stochastic_matrix(rng, (K, K))
    lengths = [40, 25, 30]
    if kind == "multinomial":
        emissions = ssmjax.MultinomialEmissions(jnp.asarray(rng.dirichlet(np.ones(4), size=K)), num_trials=5)
        ys = rng.multinomial(5, [0.3, 0.3, 0.2, 0.2], size=sum(lengths))
        peer = hmm_module.MultinomialHMM(K, n_trials=5)
        peer.emissionprob_ = np.asarray(emissions.probs)
    elif kind == "categorical":
        emissions = ssmjax.CategoricalEmissions(jnp.asarray(rng.dirichlet(np.ones(4), size=K)))
        ys = rng.integers(0, 4, size=sum(lengths))
        peer = hmm_module.CategoricalHMM(K, n_features=4)
        peer.emissionprob_ = np.asarray(emissions.probs)
    elif kind == "poisson":
        emissions = ssmjax.PoissonEmissions(rates=jnp.asarray(rng.uniform(1, 6, size=(K, 2))))
        ys = rng.poisson(3.0, size=(sum(lengths), 2))
        peer = hmm_module.PoissonHMM(K)
        peer.lambdas_ = np.asarray(emissions.rates)
    else:
        emissions = _gaussian(rng, kind)
        ys = rng.normal(size=(sum(lengths), 2)) * 3.0
        peer = hmm_module.GaussianHMM(K, covariance_type=kind)
        peer.means_ = np.asarray(emissions.means)
        peer.covars_ = np.asarray(
            {"full": emissions.covs, "diag": emissions.variances, "spherical": emissions.variances[:, 0],
             "tied": emissions.covs[0]}[kind]
        )
    peer.startprob_, peer.transmat_ = pi, A
    peer.n_features = 4 if kind in ("multinomial", "categorical") else 2
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), emissions)
    batch = np.zeros((3, max(lengths)) + ys.shape[1:], ys.dtype)
    starts = np.cumsum([0] + lengths)
    for b, (a, z) in enumerate(zip(starts[:-1], starts[1:])):
        batch[b, : z - a] = ys[a:z]
    X = ys[:, None] if kind == "categorical" else ys
    assert hmm.num_parameters() == sum(peer._get_n_fit_scalars_per_param().values())
    assert_allclose(hmm.log_likelihood(batch, lengths=lengths), peer.score(X, lengths))
    assert_allclose(hmm.aic(batch, lengths=lengths), peer.aic(X, lengths))
    assert_allclose(hmm.bic(batch, lengths=lengths), peer.bic(X, lengths))


def test_structural_zeros_frozen_fields_and_families_count_by_hand():
    pi = jnp.array([1.0, 0.0, 0.0])  # left-right chain: starts in state 0
    A = jnp.array([[0.8, 0.2, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]])
    cat = ssmjax.CategoricalEmissions(jnp.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    hmm = ssmjax.HMM(pi, A, cat)
    # initial 0, transitions 1 + 1 + 0, emissions 1 + 2 + 0
    assert hmm.num_parameters() == 5
    assert hmm.num_parameters(frozen=("transition_matrix",)) == 3
    assert hmm.num_parameters(frozen=("emissions.probs",)) == 2
    assert hmm.num_parameters(frozen=("emissions",)) == 2
    with pytest.raises(ValueError, match="frozen"):
        hmm.num_parameters(frozen=("emissions.means",))
    # families: Gamma 2KD, GMM K(M-1) + components, product the sum of its parts
    gamma = ssmjax.GammaEmissions(shapes=jnp.ones((3, 2)), rates=jnp.ones((3, 2)))
    assert sum(gamma.parameter_counts().values()) == 12
    comps = ssmjax.DiagonalGaussianEmissions(jnp.zeros((6, 2)), jnp.ones((6, 2)))
    gmm = ssmjax.GaussianMixtureEmissions(jnp.full((3, 2), 0.5), comps)
    assert gmm.parameter_counts() == {"weights": 3, "components": 24}
    product = ssmjax.ProductEmissions(gamma, cat)
    assert product.parameter_counts() == {"parts": 12 + 3}


def test_select_num_states_finds_the_true_number_by_bic_and_held_out_likelihood():
    true = ssmjax.HMM(
        jnp.ones(3) / 3, jnp.asarray([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]),
        ssmjax.DiagonalGaussianEmissions(jnp.asarray([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]), jnp.ones((3, 2))),
    )
    keys = jax.random.split(jax.random.key(0), 6)
    ys = np.stack([np.asarray(true.sample(120, key=k)[1]) for k in keys])
    chosen = ssmjax.select_num_states(
        ys, [2, 3, 4], "gaussian_diag", num_restarts=2, num_folds=2, max_iters=100, key=jax.random.key(1)
    )
    assert chosen.best_by_bic == 3
    assert chosen.best_by_heldout == 3
    # the rows are the fitted models' own scores
    assert_allclose(chosen.bic[1], chosen.models[1].bic(ys))
    assert chosen.num_parameters.tolist() == [m.num_parameters() for m in chosen.models]
    assert "BIC" in chosen.table()
    for bad in (7, -1, 2.5):
        with pytest.raises(ValueError, match=rf"`num_folds` must be an int in \[0, 6\].*got {bad}"):
            ssmjax.select_num_states(ys, [2], "gaussian_diag", num_folds=bad, key=jax.random.key(0))


def test_left_right_structure_is_declared_kept_by_em_and_counted():
    true = ssmjax.HMM(
        jnp.asarray([1.0, 0.0, 0.0]), jnp.asarray([[0.95, 0.05, 0.0], [0.0, 0.95, 0.05], [0.0, 0.0, 1.0]]),
        ssmjax.DiagonalGaussianEmissions(jnp.asarray([[-3.0], [0.0], [3.0]]), jnp.ones((3, 1))),
    )
    ys = np.stack([np.asarray(true.sample(80, key=k)[1]) for k in jax.random.split(jax.random.key(2), 5)])
    start = ssmjax.HMM.from_data(ys, 3, "gaussian_diag", structure="left-right", key=jax.random.key(0))
    band = np.asarray([[1, 1, 0], [0, 1, 1], [0, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(start.transition_matrix) > 0, band)
    np.testing.assert_array_equal(np.asarray(start.initial_probs), [1.0, 0.0, 0.0])
    fitted, _, _ = ssmjax.fit_em(start, ys, max_iters=30)
    np.testing.assert_array_equal(np.asarray(fitted.transition_matrix)[~band], 0.0)
    # initial 0, transitions 1 + 1 + 0, means and variances 3 + 3
    assert start.num_parameters() == 8
    wide = ssmjax.HMM.from_data(ys, 3, "gaussian_diag", structure="left-right", max_jump=2, key=jax.random.key(0))
    assert np.all(np.asarray(wide.transition_matrix)[0] > 0)
    with pytest.raises(ValueError, match="structure"):
        ssmjax.HMM.from_data(ys, 3, "gaussian_diag", structure="banded", key=jax.random.key(0))
