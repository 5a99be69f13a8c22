"""Entries held at their values (``HMM(fixed=...)`` / ``with_constraints``) under EM and SGD.

Each EM iteration is checked against the constrained maximiser of the expected complete-data
log-likelihood, written here in NumPy/SciPy from the smoother's posteriors of the same model.
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.special

import ssmjax

T, B = 25, 2


def _states(seed, num_states=3):
    """``(B, T)`` paths of a sticky chain (NumPy: the data need no compiled sampler)."""
    rng = np.random.default_rng(seed)
    paths = np.zeros((B, T), int)
    paths[:, 0] = rng.integers(num_states, size=B)
    for t in range(1, T):
        move = rng.random(B) < 0.2
        paths[:, t] = np.where(move, rng.integers(num_states, size=B), paths[:, t - 1])
    return paths, rng


def _posteriors(hmm, ys):
    """Per-step state weights (pooled), initial and transition expected counts."""
    posts = [hmm.smoother(y) for y in ys]
    weights = np.concatenate([np.asarray(p.smoothed_probs) for p in posts])
    initial = sum(np.asarray(p.smoothed_probs[0]) for p in posts)
    transitions = sum(np.asarray(p.expected_transitions) for p in posts)
    return weights, initial, transitions


def _rows_oracle(counts, old, mask):
    """Maximiser of sum_j c_j log p_j over the rows' free entries, held entries kept."""
    counts, old = np.atleast_2d(counts), np.atleast_2d(old)
    mask = np.atleast_2d(mask)
    new = old.copy()
    for i in range(old.shape[0]):
        free = ~mask[i] & (old[i] > 0)
        if counts[i, free].sum() > 0:
            new[i, free] = (1.0 - old[i, mask[i]].sum()) * counts[i, free] / counts[i, free].sum()
    return new


def _em_chain(hmm, ys, iters, oracle):
    """``iters`` single EM iterations (one compiled program), each checked against ``oracle``."""
    lls = []
    for _ in range(iters):
        fitted, ll, _ = ssmjax.fit_em(hmm, ys, max_iters=1)
        post = _posteriors(hmm, ys)
        oracle(hmm, fitted, post)
        lls.append(float(ll[0]))
        hmm = fitted
    assert np.all(np.diff(lls) >= -1e-9 * abs(lls[0])), lls
    return hmm


def _assert_held(before, after, mask):
    before, after = np.asarray(before), np.asarray(after)
    assert np.array_equal(before[mask], after[mask])


def _chain_oracle(hmm, fitted, post):
    _, initial, transitions = post
    fixed = hmm.fixed
    np.testing.assert_allclose(
        fitted.initial_probs, _rows_oracle(initial, np.asarray(hmm.initial_probs), fixed["initial_probs"])[0],
        rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        fitted.transition_matrix,
        _rows_oracle(transitions, np.asarray(hmm.transition_matrix), fixed["transition_matrix"]), rtol=0, atol=1e-8)
    _assert_held(hmm.initial_log_probs, fitted.initial_log_probs, fixed["initial_probs"])
    _assert_held(hmm.transition_log_probs, fitted.transition_log_probs, fixed["transition_matrix"])


def _chain_masks():
    initial = np.array([True, False, False])
    transition = np.array([[False, True, False], [False, False, False], [True, True, True]])
    return initial, transition


def _base(emissions):
    return ssmjax.HMM(jnp.array([0.2, 0.5, 0.3]),
                      jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]]), emissions)


def test_em_poisson_and_chain():
    rates = jnp.array([[1.0, 4.0], [5.0, 1.0], [9.0, 9.0]])
    states, rng = _states(0)
    ys = jnp.asarray(rng.poisson(np.asarray(rates)[states]))
    initial, transition = _chain_masks()
    held_rates = np.array([[True, False], [False, False], [False, True]])
    start = _base(ssmjax.PoissonEmissions(rates=rates * 1.3)).with_constraints(
        fixed={"initial_probs": initial, "transition_matrix": transition, "emissions.rates": held_rates})
    y = np.asarray(ys, float).reshape(-1, 2)

    def oracle(hmm, fitted, post):
        _chain_oracle(hmm, fitted, post)
        weights = post[0]
        expected = np.where(held_rates, np.asarray(hmm.emissions.rates), weights.T @ y / weights.sum(0)[:, None])
        np.testing.assert_allclose(fitted.emissions.rates, expected, rtol=1e-8)
        _assert_held(hmm.emissions.log_rates, fitted.emissions.log_rates, held_rates)

    fitted = _em_chain(start, ys, 2, oracle)
    assert fitted.transition_matrix[2, 0] == 0.0  # a structural zero stays
    assert fitted.constraints == start.constraints


def test_em_categorical_rows():
    probs = jnp.array([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    truth = _base(ssmjax.CategoricalEmissions(probs=probs))
    states, rng = _states(1)
    ys = jnp.asarray(np.array([[rng.choice(4, p=np.asarray(probs)[z]) for z in row] for row in states]))
    held = np.array([[False, True, False, False], [True, False, False, True], [False, False, False, False]])
    start = truth.with_constraints(fixed={"emissions.probs": held})
    symbols = np.asarray(ys).reshape(-1)

    def oracle(hmm, fitted, post):
        counts = post[0].T @ np.eye(4)[symbols]
        np.testing.assert_allclose(fitted.emissions.probs, _rows_oracle(counts, np.asarray(hmm.emissions.probs), held),
                                   rtol=0, atol=1e-8)
        _assert_held(hmm.emissions.logits, fitted.emissions.logits, held)

    _em_chain(start, ys, 2, oracle)


@pytest.mark.parametrize("family", ["diagonal", "full"])
def test_em_gaussian_means_and_variances(family):
    means = jnp.array([[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0], [0.0, -3.0, 2.0]])
    if family == "full":
        cov = jnp.array([[1.0, 0.4, 0.2], [0.4, 1.5, -0.3], [0.2, -0.3, 0.8]])
        emissions = ssmjax.GaussianEmissions(means, covs=jnp.stack([cov, 0.5 * cov, jnp.eye(3)]))
    else:
        emissions = ssmjax.DiagonalGaussianEmissions(means, jnp.array([[1.0, 0.5, 2.0], [0.7, 1.0, 1.0], [1.0, 2.0, 0.3]]))
    states, rng = _states(2)
    ys = jnp.asarray(np.asarray(means)[states] + rng.normal(size=(B, T, 3)) @ np.array([[1.0, 0.3, 0.0], [0, 1.0, -0.4], [0, 0, 0.8]]))
    held_means = np.array([[True, False, False], [False, True, True], [False, False, False]])
    fixed = {"emissions.means": held_means}
    held_vars = np.array([[False, True, False], [False, False, False], [True, False, False]])
    if family == "diagonal":
        fixed["emissions.covs"] = held_vars
    start = _base(emissions._with_params(means + 0.3, emissions._cov_param())).with_constraints(fixed=fixed)
    y = np.asarray(ys).reshape(-1, 3)
    min_var = start.emissions.min_variance

    def oracle(hmm, fitted, post):
        weights = post[0]
        old_means, old_covs = np.asarray(hmm.emissions.means), np.asarray(hmm.emissions.covs)
        for k in range(3):
            w = weights[:, k]
            ybar = w @ y / w.sum()
            mean = old_means[k].copy()
            free, held = ~held_means[k], held_means[k]
            # the free block minimises sum_n w_n (y_n - mu)' P (y_n - mu) given the held block
            prec = np.linalg.inv(old_covs[k])
            mean[free] = ybar[free] + np.linalg.solve(prec[np.ix_(free, free)], prec[np.ix_(free, held)] @ (ybar[held] - mean[held]))
            np.testing.assert_allclose(fitted.emissions.means[k], mean, rtol=0, atol=1e-8)
            centred = y - mean
            cov = (w[:, None] * centred).T @ centred / w.sum() + min_var * np.eye(3)
            if family == "diagonal":
                cov = np.diag(np.where(held_vars[k], np.diag(old_covs[k]), np.diag(cov)))
            np.testing.assert_allclose(fitted.emissions.covs[k], cov, rtol=1e-8, atol=1e-10)
        _assert_held(hmm.emissions.means, fitted.emissions.means, held_means)
        if family == "diagonal":
            _assert_held(hmm.emissions.log_variances, fitted.emissions.log_variances, held_vars)

    _em_chain(start, ys, 2, oracle)


def test_em_gamma_shapes_and_rates():
    emissions = ssmjax.GammaEmissions(jnp.array([[2.0, 5.0], [8.0, 1.5]]), jnp.array([[1.0, 2.0], [0.5, 1.0]]))
    truth = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.3, 0.7]]), emissions)
    states, rng = _states(3, 2)
    ys = jnp.asarray(rng.gamma(np.asarray(emissions.shapes)[states], 1.0 / np.asarray(emissions.rates)[states]))
    held_shapes = np.array([[True, False], [False, False]])
    held_rates = np.array([[False, False], [True, False]])
    start = truth.with_constraints(fixed={"emissions.shapes": held_shapes, "emissions.rates": held_rates})
    y = np.asarray(ys).reshape(-1, 2)

    def oracle(hmm, fitted, post):
        weights = post[0]
        shapes, rates = np.asarray(hmm.emissions.shapes), np.asarray(hmm.emissions.rates)
        for k in range(2):
            w = weights[:, k] / weights[:, k].sum()
            for d in range(2):
                mean, mean_log = w @ y[:, d], w @ np.log(y[:, d])
                a, b = shapes[k, d], rates[k, d]
                if held_rates[k, d]:  # d/da [a log b - lgamma(a) + a mean_log] = 0
                    a = scipy.optimize.brentq(lambda s: np.log(b) - scipy.special.digamma(s) + mean_log, 1e-6, 1e6, xtol=1e-14)
                elif not held_shapes[k, d]:
                    a = scipy.optimize.brentq(
                        lambda s: np.log(s) - scipy.special.digamma(s) - np.log(mean) + mean_log, 1e-6, 1e6, xtol=1e-14)
                    b = a / mean
                else:
                    b = a / mean
                np.testing.assert_allclose(fitted.emissions.shapes[k, d], a, rtol=1e-8)
                np.testing.assert_allclose(fitted.emissions.rates[k, d], b, rtol=1e-8)
        _assert_held(hmm.emissions.log_shapes, fitted.emissions.log_shapes, held_shapes)
        _assert_held(hmm.emissions.log_rates, fitted.emissions.log_rates, held_rates)

    _em_chain(start, ys, 2, oracle)


def test_sgd_holds_fixed_entries():
    rates = jnp.array([[1.0, 4.0], [5.0, 1.0], [9.0, 9.0]])
    states, rng = _states(4)
    ys = jnp.asarray(rng.poisson(np.asarray(rates)[states]))
    initial, transition = _chain_masks()
    held_rates = np.array([[True, False], [False, False], [False, True]])
    start = _base(ssmjax.PoissonEmissions(rates=rates * 1.5)).with_constraints(
        fixed={"initial_probs": initial, "transition_matrix": transition, "emissions.rates": held_rates})
    fitted, losses = ssmjax.fit_sgd(start, ys, optax.adam(0.05), num_steps=25)
    assert losses[-1] < losses[0]
    for name, mask in (("initial_log_probs", initial), ("transition_log_probs", transition)):
        before, after = np.asarray(getattr(start, name)), np.asarray(getattr(fitted, name))
        assert np.array_equal(before[mask], after[mask])
        free = ~mask & np.isfinite(before)
        assert np.all(np.abs(before[free] - after[free]) > 1e-4)  # the free ones move
    _assert_held(start.emissions.log_rates, fitted.emissions.log_rates, held_rates)
    assert np.all(np.abs(np.asarray(start.emissions.log_rates - fitted.emissions.log_rates))[~held_rates] > 1e-4)
    np.testing.assert_allclose(fitted.transition_matrix.sum(-1), 1.0, rtol=1e-14)
    assert fitted.transition_matrix[2, 0] == 0.0
    assert fitted.constraints == start.constraints


def test_num_parameters_bic_and_save_load():
    hmm = _base(ssmjax.DiagonalGaussianEmissions(jnp.zeros((3, 2)), jnp.ones((3, 2))))
    initial, transition = _chain_masks()
    held = hmm.with_constraints(fixed={"initial_probs": initial, "transition_matrix": transition,
                                       "emissions.means": np.array([[True, True], [False, True], [False, False]]),
                                       "emissions.covs": True})
    # initial: 2 free entries, 1 parameter; transition row 0: 2 free (1), row 1: 3 (2), row 2 held;
    # 3 free means; covariances held
    assert hmm.num_parameters() == 2 + 5 + 6 + 6
    assert held.num_parameters() == 1 + 3 + 3
    assert held.num_parameters(frozen=("emissions",)) == 4
    ys = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10, 2)))
    assert np.isclose(hmm.bic(ys) - held.bic(ys), np.log(10) * (19 - 7))
    path = os.path.join(tempfile.mkdtemp(), "held.eqx")
    ssmjax.save(path, held)
    loaded = ssmjax.load(path)
    assert loaded.constraints == held.constraints
    assert loaded.num_parameters() == held.num_parameters()
    assert set(loaded.fixed) == set(held.fixed)
    for name, mask in held.fixed.items():
        assert np.array_equal(loaded.fixed[name], mask)


def test_errors():
    hmm = _base(ssmjax.GaussianEmissions(jnp.zeros((3, 2)), covs=jnp.stack([jnp.eye(2)] * 3)))
    with pytest.raises(ValueError, match="`emission.means`.*not a parameter.*expected one of"):
        hmm.with_constraints(fixed={"emission.means": True})
    with pytest.raises(ValueError, match=r"`fixed\['transition_matrix'\]`.*shape \(3, 3\); got shape \(3,\)"):
        hmm.with_constraints(fixed={"transition_matrix": np.array([True, False, False])})
    with pytest.raises(ValueError, match=r"`fixed\['initial_probs'\]`.*boolean.*got dtype int"):
        hmm.with_constraints(fixed={"initial_probs": np.array([1, 0, 0])})
    with pytest.raises(ValueError, match="entries of `emissions.covs` cannot be fixed"):
        hmm.with_constraints(fixed={"emissions.covs": np.eye(2, dtype=bool)[None].repeat(3, 0)})
    with pytest.raises(ValueError, match="`fixed` must be a dict"):
        hmm.with_constraints(fixed=[("initial_probs", True)])
    # a whole-field mask of a field without entry masks is the field held whole
    assert hmm.with_constraints(fixed={"emissions.covs": np.ones((3, 2, 2), bool)}).fixed == {"emissions.covs": True}
