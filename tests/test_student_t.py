"""Student-t emissions: log-densities against scipy, the ECM M-step against NumPy, EM on samples
from a Student-t HMM, the Gaussian limit, missing entries, frozen degrees of freedom, float32 and
the errors that name the argument.

The NumPy oracle (:func:`numpy_ecm_step`) is also the M-step oracle of the family's spec in
tests/test_emission_families.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from helpers import assert_allclose, gaussian_conditional_moments
from scipy.optimize import brentq
from scipy.special import digamma

import ssmjax


def scipy_log_prob(means, scales, dofs, y):
    """Per-state log-density of the observed entries of ``y``: scipy's multivariate t of the observed
    block (same degrees of freedom), ``0`` when every entry is missing."""
    obs = ~np.isnan(y)
    if not obs.any():
        return np.zeros(len(means))
    return np.array([
        st.multivariate_t(means[k][obs], scales[k][np.ix_(obs, obs)], df=dofs[k]).logpdf(y[obs])
        for k in range(len(means))
    ])


def numpy_ecm_step(means, scales, dofs, ys, w, frozen=()):
    """One ECM M-step by NumPy, step by step: per step and state the conditional moments of ``y`` given its
    observed block (:func:`helpers.gaussian_conditional_moments`), ``u = (nu + D_o) / (nu + delta^2)`` and
    ``E[log tau] = psi((nu + D_o) / 2) - log((nu + delta^2) / 2)``; means and scales weighted by ``w u``, the
    conditional covariances by ``w``; the degrees of freedom by scipy's root of their equation. States
    without weight get NaN."""
    num_states, dim = means.shape
    moments = [gaussian_conditional_moments(means, scales, y) for y in ys]
    u, e_log_tau = np.zeros(w.shape), np.zeros(w.shape)
    for n, y in enumerate(ys):
        obs = ~np.isnan(y)
        for k in range(num_states):
            r = y[obs] - means[k][obs]
            delta2 = r @ np.linalg.solve(scales[k][np.ix_(obs, obs)], r) if obs.any() else 0.0
            u[n, k] = (dofs[k] + obs.sum()) / (dofs[k] + delta2)
            e_log_tau[n, k] = digamma((dofs[k] + obs.sum()) / 2) - np.log((dofs[k] + delta2) / 2)
    new_means, new_scales, new_dofs = np.full(means.shape, np.nan), np.full(scales.shape, np.nan), np.full(dofs.shape, np.nan)
    for k in range(num_states):
        total = w[:, k].sum()
        if total <= 0:
            continue
        wu = w[:, k] * u[:, k]
        ey = np.stack([m[k][0] for m in moments])
        new_means[k] = means[k] if "means" in frozen else (wu @ ey) / wu.sum()
        resid = ey - new_means[k]
        scatter = np.einsum("n,nd,ne->de", wu, resid, resid) + sum(w[n, k] * m[k][1] for n, m in enumerate(moments))
        new_scales[k] = scales[k] if "scales" in frozen else scatter / total
        c = (w[:, k] @ (e_log_tau[:, k] - u[:, k])) / total
        equation = lambda nu: np.log(nu / 2) - digamma(nu / 2) + 1 + c  # noqa: E731
        new_dofs[k] = dofs[k] if "dofs" in frozen else brentq(equation, 1e-6, 1e9, xtol=1e-14, rtol=1e-14)
    return {"means": new_means, "scales": new_scales, "dofs": new_dofs}


def _params(model):
    return {"means": np.asarray(model.means), "scales": np.asarray(model.scales), "dofs": np.asarray(model.dofs)}


def _model(rng, dofs, dim=3, min_variance=0.0):
    num_states = len(dofs)
    a = rng.normal(size=(num_states, dim, dim))
    return ssmjax.StudentTEmissions(
        jnp.asarray(rng.normal(size=(num_states, dim)) * 2.0), jnp.asarray(a @ np.swapaxes(a, 1, 2) + np.eye(dim)),
        jnp.asarray(dofs, dtype=float), min_variance=min_variance,
    )


def _heavy_data(rng, n, dim=3, missing=0.0):
    y = rng.standard_t(2.5, size=(n, dim)) * 2.0
    y[rng.random(y.shape) < missing] = np.nan
    return y


def test_log_prob_matches_scipy_multivariate_t():
    """From heavy to nearly Gaussian tails (the direct and the series forms of the Gamma-function terms)."""
    rng = np.random.default_rng(0)
    model = _model(rng, [0.7, 4.0, 250.0, 3e4])
    ys = _heavy_data(rng, 24)
    ys[0] = 40.0  # far in the tails
    means, scales, dofs = (np.asarray(p) for p in (model.means, model.scales, model.dofs))
    want = np.stack([scipy_log_prob(means, scales, dofs, y) for y in ys])
    assert_allclose(model.log_likelihoods(ys), want)  # the formula for complete data
    assert_allclose(model.log_prob(ys[0]), want[0])  # the general one


def test_missing_entries_use_the_marginal_of_the_observed_block():
    """A Student-t's marginal is a Student-t with the same degrees of freedom."""
    rng = np.random.default_rng(1)
    model = _model(rng, [1.5, 6.0, 400.0, 2e5])
    ys = _heavy_data(rng, 24, missing=0.35)
    ys[3] = np.nan  # a fully missing step contributes nothing
    ys[4, 1:] = np.nan
    means, scales, dofs = (np.asarray(p) for p in (model.means, model.scales, model.dofs))
    want = np.stack([scipy_log_prob(means, scales, dofs, y) for y in ys])
    np.testing.assert_array_equal(want[3], 0.0)
    assert_allclose(model.log_likelihoods(ys), want)
    assert_allclose(jax.jit(lambda m, y: m.log_likelihoods(y))(model, jnp.asarray(ys)), want)


@pytest.mark.parametrize("frozen", [(), ("means",), ("dofs",), ("scales",)])
def test_m_step_matches_numpy_ecm(frozen):
    """With missing entries, padding (garbage in it) and a state without weight, which keeps its parameters."""
    rng = np.random.default_rng(2)
    model = _model(rng, [2.5, 9.0, 5.0])
    n = 60
    ys = _heavy_data(rng, n, missing=0.2)
    w = rng.dirichlet(np.ones(3), size=n)
    w[:, 2] = 0.0
    mask = rng.random(n) < 0.8
    garbage = np.where(mask[:, None], ys, 1e300)
    new = model.m_step_from_stats(model.suff_stats(garbage, w, mask), frozen=frozenset(frozen))
    old = _params(model)
    want = numpy_ecm_step(old["means"], old["scales"], old["dofs"], ys[mask], w[mask], frozen)
    got = _params(new)
    for name in want:
        assert_allclose(got[name][:2], want[name][:2])
        np.testing.assert_array_equal(got[name][2], old[name][2])
        if name in frozen:
            np.testing.assert_array_equal(got[name], old[name])


TRUE = dict(
    initial=np.array([0.5, 0.5]), transition=np.array([[0.95, 0.05], [0.1, 0.9]]),
    means=np.array([[-2.0, 0.0], [2.0, 1.0]]), scales=np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.5], [0.5, 2.0]]]),
    dofs=np.array([3.0, 8.0]),
)


# one compiled EM program for the tests that fit the same shapes (max_iters is static)
_EM_ITERS = 300


def _samples(seed, num_seq=4, num_steps=600):
    """States and emissions of the true HMM drawn by NumPy (the scale mixture: y = mu + L eps / sqrt(tau))."""
    rng = np.random.default_rng(seed)
    states = np.zeros((num_seq, num_steps), int)
    states[:, 0] = rng.choice(2, size=num_seq, p=TRUE["initial"])
    for t in range(1, num_steps):
        states[:, t] = (rng.random(num_seq) > TRUE["transition"][states[:, t - 1], 0]).astype(int)
    dofs = TRUE["dofs"][states]
    tau = rng.gamma(dofs / 2, 2 / dofs)
    eps = np.einsum("btde,bte->btd", np.linalg.cholesky(TRUE["scales"])[states], rng.standard_normal(states.shape + (2,)))
    return states, TRUE["means"][states] + eps / np.sqrt(tau)[..., None]


def _numpy_true_log_likelihood(ys):
    """log p(ys) under the true HMM: scipy's densities and the scaled forward recursion, by NumPy."""
    total = 0.0
    for y in ys:
        dens = np.stack([
            st.multivariate_t(TRUE["means"][k], TRUE["scales"][k], df=TRUE["dofs"][k]).pdf(y) for k in range(2)
        ], axis=1)
        alpha = TRUE["initial"] * dens[0]
        for t in range(1, len(y)):
            total += np.log(alpha.sum())
            alpha = (alpha / alpha.sum()) @ TRUE["transition"] * dens[t]
        total += np.log(alpha.sum())
    return total


def test_em_increases_the_log_likelihood_on_samples_of_a_student_t_hmm():
    _, ys = _samples(seed=0)
    start = ssmjax.HMM.from_data(ys, 2, "student_t", key=jax.random.key(1))
    assert isinstance(start.emissions, ssmjax.StudentTEmissions)
    fitted, lls, info = ssmjax.fit_em(start, ys, max_iters=_EM_ITERS, tol=0.0)
    lls = np.asarray(lls)[: info.num_iters]
    assert info.num_iters > 100
    # ECM never decreases the likelihood; converged, successive values differ by round-off of the
    # E-step's sums over 2400 steps (seen: 3e-12 relative)
    assert np.all(np.diff(lls) >= -1e-10 * np.abs(lls[1:]))
    assert lls[-1] > lls[0] + 1.0
    assert lls[-1] >= _numpy_true_log_likelihood(ys)


def test_em_recovers_the_parameters():
    states, ys = _samples(seed=3)
    start = ssmjax.HMM.from_data(ys, 2, "student_t", key=jax.random.key(1))
    fitted, _, _ = ssmjax.fit_em(start, ys, max_iters=_EM_ITERS, tol=1e-10)
    em = fitted.emissions
    order = np.argsort(np.asarray(em.means)[:, 0])  # the true states are sorted by their first mean
    means, scales, dofs = np.asarray(em.means)[order], np.asarray(em.scales)[order], np.asarray(em.dofs)[order]
    counts = np.bincount(states.ravel(), minlength=2)
    # five standard errors of a mean (the t's covariance nu / (nu - 2) Sigma over the state's steps)
    covs = TRUE["scales"] * (TRUE["dofs"] / (TRUE["dofs"] - 2))[:, None, None]
    se = np.sqrt(np.diagonal(covs, axis1=1, axis2=2) / counts[:, None])
    assert np.all(np.abs(means - TRUE["means"]) < 5 * se)
    # five standard errors of a scale entry: (S_ii S_jj + S_ij^2) (nu + D + 2) / (nu + D) / n
    diag = np.diagonal(TRUE["scales"], axis1=1, axis2=2)
    inflation = (TRUE["dofs"] + 4) / (TRUE["dofs"] + 2)
    var = (diag[:, :, None] * diag[:, None, :] + TRUE["scales"] ** 2) * (inflation / counts)[:, None, None]
    assert np.all(np.abs(scales - TRUE["scales"]) < 5 * np.sqrt(var))
    # nu: over 20 samples of this size the fitted log nu spread by 0.05 (nu = 3) and 0.12 (nu = 8); five of them
    assert np.all(np.abs(np.log(dofs / TRUE["dofs"])) < [0.25, 0.6])


def test_frozen_dofs_are_kept_by_em_and_not_counted():
    _, ys = _samples(seed=0)
    start = ssmjax.HMM.from_data(ys, 2, "student_t", key=jax.random.key(1))
    fitted, lls, info = ssmjax.fit_em(start, ys, max_iters=_EM_ITERS, tol=1e-10, frozen=("emissions.dofs",))
    np.testing.assert_array_equal(np.asarray(fitted.emissions.log_dofs), np.asarray(start.emissions.log_dofs))
    assert not np.allclose(np.asarray(fitted.emissions.means), np.asarray(start.emissions.means))
    lls = np.asarray(lls)[: info.num_iters]
    assert np.all(np.diff(lls) >= -1e-10 * np.abs(lls[1:]))  # round-off only, as above
    k, d = 2, 2
    counts = {"means": k * d, "scales": k * d * (d + 1) // 2, "dofs": k}
    assert start.emissions.parameter_counts() == counts
    chain = (k - 1) + k * (k - 1)
    assert start.num_parameters() == chain + sum(counts.values())
    assert start.num_parameters(frozen=("emissions.dofs",)) == chain + sum(counts.values()) - k


def test_large_dofs_give_the_gaussian_family():
    """At nu = 1e13 the t differs from the Gaussian by O(delta^2 / nu), below float64 tolerance: the Gaussian
    log-densities (scipy's, of the observed block) and, with nu frozen, the Gaussian family's M-step (missing
    entries included: the conditional moments then equal the Gaussian's)."""
    rng = np.random.default_rng(4)
    means = rng.normal(size=(3, 3)) * 2.0
    a = rng.normal(size=(3, 3, 3))
    covs = a @ np.swapaxes(a, 1, 2) + np.eye(3)
    t = ssmjax.StudentTEmissions(jnp.asarray(means), jnp.asarray(covs), 1e13, min_variance=1e-3)
    gauss = ssmjax.GaussianEmissions(jnp.asarray(means), jnp.asarray(covs), min_variance=1e-3)
    ys = rng.normal(size=(60, 3)) * 2.0  # the shapes of the M-step test: its compiled programs serve here
    ys[rng.random(ys.shape) < 0.25] = np.nan
    w = rng.dirichlet(np.ones(3), size=60)
    gaussian = [[st.multivariate_normal(means[k][o], covs[k][np.ix_(o, o)]).logpdf(y[o]) if o.any() else 0.0
                 for k in range(3)] for y, o in zip(ys, ~np.isnan(ys))]
    assert_allclose(t.log_likelihoods(ys), np.array(gaussian))
    complete = np.nan_to_num(ys)
    assert_allclose(t.log_likelihoods(complete), np.stack([st.multivariate_normal(means[k], covs[k]).logpdf(complete) for k in range(3)], 1))
    new_t = t.m_step_from_stats(t.suff_stats(ys, w), frozen={"dofs"})
    new_gauss = jax.jit(lambda m, y, w: m.m_step(y, w))(gauss, ys, w)  # one program: faster to compile than eagerly
    assert_allclose(new_t.means, new_gauss.means)
    assert_allclose(new_t.scales, new_gauss.covs)
    # and the free degrees of freedom grow without bound on Gaussian data
    assert float(jnp.min(t.m_step(ys, w).dofs)) > 1e3


def test_samples_follow_the_scale_mixture():
    """The Mahalanobis distance of a draw over D is F(D, nu)-distributed (Kolmogorov-Smirnov against scipy)."""
    model = _model(np.random.default_rng(5), [3.0, 12.0])
    means, scales, dofs = (np.asarray(p) for p in (model.means, model.scales, model.dofs))
    n = 1000
    states = np.repeat([0, 1], n)
    draws = np.asarray(jax.jit(jax.vmap(lambda s, k: model.sample(s, key=k)))(states, jax.random.split(jax.random.key(0), 2 * n)))
    for state in range(2):
        r = draws[states == state] - means[state]
        f = np.einsum("nd,nd->n", r, np.linalg.solve(scales[state], r.T).T) / 3
        assert st.kstest(f, st.f(3, dofs[state]).cdf).pvalue > 1e-3


def test_float32_em_stays_finite():
    """Heavy tails (nu = 3) and three equal outliers far out, on which a state may collapse: every
    intermediate stays finite (an expected precision scale that underflows to 0 at zero weight included)."""
    _, ys = _samples(seed=6, num_steps=120)
    ys[0, :3] = 1e4
    start = ssmjax.HMM.from_data(ys, 2, "student_t", key=jax.random.key(1))
    with jax.enable_x64(False):
        start = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, start)
        fitted, lls, info = ssmjax.fit_em(start, ys.astype(np.float32), max_iters=30, tol=0.0)
        leaves = jax.tree.leaves(fitted.emissions)
        assert all(leaf.dtype == jnp.float32 for leaf in leaves)
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
        lls = np.asarray(lls)[: info.num_iters]
        assert info.num_iters > 10 and np.all(np.isfinite(lls)) and lls[-1] > lls[0]


def test_bad_arguments_are_value_errors_naming_them():
    means, scales = jnp.zeros((2, 3)), jnp.stack([jnp.eye(3)] * 2)
    with pytest.raises(ValueError, match="`dofs` must be finite and positive"):
        ssmjax.StudentTEmissions(means, scales, jnp.array([3.0, 0.0]))
    with pytest.raises(ValueError, match="`dofs` must be finite and positive"):
        ssmjax.StudentTEmissions(means, scales, -1.0)
    with pytest.raises(ValueError, match="`dofs` must be finite and positive"):
        ssmjax.StudentTEmissions(means, scales, jnp.array([3.0, jnp.nan]))
    with pytest.raises(ValueError, match=r"`dofs` must have shape \(2,\)"):
        ssmjax.StudentTEmissions(means, scales, jnp.ones(3))
    with pytest.raises(ValueError, match=r"`scales` must have shape \(2, 3, 3\)"):
        ssmjax.StudentTEmissions(means, jnp.ones((2, 3)), 3.0)
    with pytest.raises(ValueError, match="`means` must have shape"):
        ssmjax.StudentTEmissions(jnp.zeros(3), scales, 3.0)
    with pytest.raises(ValueError, match="`log_dofs` must have shape"):
        ssmjax.StudentTEmissions(means, scales, log_dofs=jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="`scales`"):
        ssmjax.StudentTEmissions(means, -scales, 3.0)  # not positive definite
    with pytest.raises(ValueError, match="exactly one of `scales` and `chol_scales`"):
        ssmjax.StudentTEmissions(means, dofs=3.0)
    with pytest.raises(ValueError, match="`dofs` must be a finite positive number"):
        ssmjax.StudentTEmissions.from_data(np.zeros((5, 3)), 2, dofs=0.0, key=jax.random.key(0))
    model = ssmjax.StudentTEmissions(means, scales, 3.0)
    with pytest.raises(ValueError, match="`emissions` must have shape"):
        model.log_likelihoods(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="`weights` must have shape"):
        model.suff_stats(np.zeros((4, 3)), np.ones((4, 3)))
