"""Priors on Gaussian-mixture and Gamma emissions: hmmlearn's GMMHMM MAP updates over several
iterations, the Gamma rate prior's joint mode against SciPy, the log posterior EM reports, and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
from helpers import assert_allclose, pad_batch, random_stochastic_matrix

import ssmjax

K, M, D = 2, 2, 2


def _gmm_start(rng, kind):
    means = rng.normal(size=(K, M, D)) * 2.0
    a = rng.normal(size=(K, M, D, D))
    covs = a @ np.swapaxes(a, -1, -2) + D * np.eye(D)
    cov_arg = {"full": covs, "diag": np.diagonal(covs, axis1=-2, axis2=-1), "spherical": covs[..., 0, 0]}[kind]
    family = {"full": ssmjax.GaussianEmissions, "diag": ssmjax.DiagonalGaussianEmissions,
              "spherical": ssmjax.SphericalGaussianEmissions}[kind]
    components = family(jnp.asarray(means.reshape(K * M, D)), jnp.asarray(cov_arg.reshape((K * M,) + cov_arg.shape[2:])),
                        min_variance=0.0)
    weights = rng.dirichlet(np.ones(M), size=K)
    return ssmjax.GaussianMixtureEmissions(jnp.asarray(weights), components), means, cov_arg, weights


def _gmmhmm_prior(rng, kind):
    """GMMHMM's prior arguments, (K, M, ...) arrays, each covariance pseudo-count positive."""
    args = dict(weights_prior=rng.uniform(1.0, 3.0, size=(K, M)), means_prior=rng.normal(size=(K, M, D)),
                means_weight=rng.uniform(0.5, 2.0, size=(K, M)))
    if kind == "full":
        b = rng.normal(size=(K, M, D, D))
        args.update(covars_prior=b @ np.swapaxes(b, -1, -2) * 0.3, covars_weight=1.5)
    elif kind == "diag":
        args.update(covars_prior=rng.uniform(-1.0, 2.0, size=(K, M, D)), covars_weight=rng.uniform(0.1, 1.0, size=(K, M, D)))
    else:
        args.update(covars_prior=rng.uniform(-1.0, 2.0, size=(K, M)), covars_weight=rng.uniform(0.1, 1.0, size=(K, M)))
    return args


@pytest.mark.parametrize("kind", ["diag", "spherical", "full"])
def test_gmm_prior_iterations_equal_hmmlearns(kind):
    """Three MAP iterations of the weights and covariances (means held: GMMHMM takes its covariance
    scatter about the previous means, which is the mode only when they stay) from the same start equal
    hmmlearn's GMMHMM, log-likelihood history included; and one full iteration's weights and means."""
    hmm_module = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(11)
    emissions, means, cov_arg, weights = _gmm_start(rng, kind)
    pi, A = rng.dirichlet(np.ones(K)), random_stochastic_matrix(rng, (K, K))
    lengths = [25, 15]
    ys = rng.normal(size=(sum(lengths), D)) * 2.0
    padded = pad_batch(ys, lengths, fill=0)
    args = _gmmhmm_prior(rng, kind)
    prior = ssmjax.GaussianMixturePrior.from_hmmlearn(kind, D, **args)

    def peer_model(params):
        peer = hmm_module.GMMHMM(K, n_mix=M, covariance_type=kind, n_iter=1, init_params="", tol=-np.inf,
                                 params=params, min_covar=0.0, **args)
        peer.startprob_, peer.transmat_, peer.weights_, peer.means_, peer.covars_ = pi, A, weights, means, cov_arg
        return peer

    m_step = jax.jit(lambda em, w: em.m_step_from_stats(em.suff_stats(ys, w), frozen={"means"}, prior=prior))

    def iteration(hmm):  # the E-step and the emissions' M-step, through the public methods
        posterior = hmm.smoother(ys)
        em = m_step(hmm.emissions, posterior.smoothed_probs)
        return ssmjax.HMM(hmm.initial_probs, hmm.transition_matrix, em), posterior.marginal_loglik

    peer = peer_model("cw")
    history, ours = [], []
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), emissions)
    for _ in range(3):
        peer.fit(ys)
        history.append(peer.monitor_.history[-1])
        hmm, loglik = iteration(hmm)
        ours.append(float(loglik))
    assert_allclose(np.asarray(ours), np.asarray(history), rtol=1e-6, atol=0)
    assert_allclose(hmm.emissions.weights, peer.weights_, rtol=1e-6, atol=1e-9)
    if kind == "full":
        assert_allclose(hmm.emissions.covs, peer.covars_, rtol=1e-6, atol=1e-9)
    elif kind == "diag":
        assert_allclose(hmm.emissions.components.variances.reshape(K, M, D), peer.covars_, rtol=1e-6, atol=1e-9)
    else:
        assert_allclose(hmm.emissions.components.variances[:, 0].reshape(K, M), peer.covars_, rtol=1e-6, atol=1e-9)

    if kind != "full":  # one fit_em per covariance type would exceed the tests' time budget
        return
    # fit_em, every parameter free: the weights and means (which do not see the covariance update)
    # equal GMMHMM's, and the reported log posterior is hmmlearn's log-likelihood plus the log prior
    peer = peer_model("stmcw")
    peer.fit(ys, lengths)
    start = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), emissions)
    hmm_prior = ssmjax.HMMPrior(emissions=prior)
    fitted, lls, _ = ssmjax.fit_em(start, padded, lengths=lengths, max_iters=1, prior=hmm_prior)
    assert_allclose(fitted.emissions.weights, peer.weights_, rtol=1e-6, atol=1e-9)
    assert_allclose(fitted.emissions.means, peer.means_, rtol=1e-6, atol=1e-9)
    assert_allclose(fitted.transition_matrix, peer.transmat_, rtol=1e-6, atol=1e-9)
    log_prior = start.emissions.log_prior(prior)  # the chain's flat Dirichlet(1) priors on K = 2 entries add 0
    assert_allclose(lls[0], peer.monitor_.history[0] + log_prior, rtol=1e-6, atol=0)


def test_gmm_prior_m_step_is_the_exact_mode_of_the_log_posterior():
    """Weights, means and full covariances together: the gradient of the expected complete-data log
    posterior (component responsibilities held) vanishes at the M-step's output, so ``log_prior``
    and the update agree; the weights' term is SciPy's Dirichlet density."""
    rng = np.random.default_rng(12)
    emissions, *_ = _gmm_start(rng, "full")
    ys = rng.normal(size=(50, D)) * 2.0
    w = rng.dirichlet(np.ones(K), size=50)
    prior = ssmjax.GaussianMixturePrior.from_hmmlearn("full", D, **_gmmhmm_prior(rng, "full"))
    new = jax.jit(lambda em: em.m_step_from_stats(em.suff_stats(ys, w), prior=prior))(emissions)

    def complete_log_likelihoods(m):  # (N, K, M): log pi_km + log N(y_n; mu_km, Sigma_km)
        return jax.nn.log_softmax(m.mixture_logits, axis=-1) + m.components.log_likelihoods(ys).reshape(-1, K, M)

    split = w[:, :, None] * scipy.special.softmax(np.asarray(complete_log_likelihoods(emissions)), axis=-1)  # w_nk r_nkm

    def objective(m):
        complete = jax.nn.log_softmax(m.mixture_logits, axis=-1) + m.components.log_likelihoods(ys).reshape(-1, K, M)
        return jnp.sum(split * complete) + m.log_prior(prior)

    gradient = jax.jit(jax.grad(objective))
    grad, grad0 = gradient(new), gradient(emissions)
    top = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grad))
    top0 = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grad0))
    assert top < 1e-9 * top0
    flat = ssmjax.GaussianMixturePrior(weights=prior.weights)
    want = sum(scipy.stats.dirichlet.logpdf(np.asarray(new.weights)[k], np.asarray(prior.weights.concentration)[k])
               for k in range(K))
    assert_allclose(new.log_prior(flat), want, rtol=1e-10)


def _gamma_objective(x, w, y, a0, b0):
    """Minus the expected complete-data log posterior of one (state, dimension) and its gradient in
    (log shape, log rate)."""
    alpha, beta = np.exp(x)
    n, s, slog = w.sum(), w @ y, w @ np.log(y)
    value = alpha * np.log(beta) * n + (alpha - 1) * slog - beta * s - n * scipy.special.gammaln(alpha)
    value += (a0 - 1) * np.log(beta) - b0 * beta
    d_alpha = n * np.log(beta) + slog - n * scipy.special.digamma(alpha)
    d_beta = alpha * n / beta - s + (a0 - 1) / beta - b0
    return -value, -np.array([d_alpha * alpha, d_beta * beta])


def test_gamma_rate_prior_m_step_is_scipys_joint_mode():
    rng = np.random.default_rng(13)
    model = ssmjax.GammaEmissions(shapes=jnp.asarray(rng.uniform(1, 4, size=(K, 3))),
                                  rates=jnp.asarray(rng.uniform(0.5, 2, size=(K, 3))))
    ys = rng.gamma(2.0, 1.5, size=(60, 3))
    w = rng.dirichlet(np.ones(K), size=60)
    a0, b0 = rng.uniform(1.0, 6.0, size=(K, 3)), rng.uniform(0.0, 5.0, size=(K, 3))
    prior = ssmjax.GammaPrior(a0, b0)
    new = model.m_step_from_stats(model.suff_stats(ys, w), prior=prior)
    for k in range(K):
        for d in range(3):
            args = (w[:, k], ys[:, d], a0[k, d], b0[k, d])
            found = scipy.optimize.minimize(_gamma_objective, np.zeros(2), args=args, jac=True, method="BFGS",
                                            options={"gtol": 1e-12})
            polished = scipy.optimize.root(lambda x: _gamma_objective(x, *args)[1], found.x, tol=1e-14)
            assert np.abs(_gamma_objective(polished.x, *args)[1]).max() < 1e-10 * w[:, k].sum()
            assert_allclose(np.exp(polished.x), [new.shapes[k, d], new.rates[k, d]], rtol=1e-8, atol=0)
    # with the shapes held, the rate is its conditional mode: (a0 - 1 + alpha n) / (b0 + sum w y)
    held = model.m_step_from_stats(model.suff_stats(ys, w), frozen={"shapes"}, prior=prior)
    want = (a0 - 1 + np.asarray(model.shapes) * w.sum(0)[:, None]) / (b0 + w.T @ ys)
    assert_allclose(held.rates, want, rtol=1e-10)
    logpdf = scipy.stats.gamma.logpdf(np.asarray(new.rates), a0, scale=1 / b0).sum()
    assert_allclose(new.log_prior(prior), logpdf, rtol=1e-10)


def test_gamma_prior_em_climbs_the_log_posterior():
    rng = np.random.default_rng(14)
    ys = np.concatenate([rng.gamma(2.0, 1.0, size=(2, 30, 1)), rng.gamma(8.0, 1.0, size=(2, 30, 1))], axis=1)
    start = ssmjax.HMM(jnp.ones(2) / 2, jnp.asarray([[0.9, 0.1], [0.1, 0.9]]),
                       ssmjax.GammaEmissions(shapes=jnp.asarray([[1.0], [3.0]]), rates=jnp.asarray([[1.0], [0.5]])))
    prior = ssmjax.HMMPrior(emissions=ssmjax.GammaPrior(3.0, 2.0))
    _, lls, info = ssmjax.fit_em(start, ys, max_iters=15, tol=0.0, prior=prior)
    lls = np.asarray(lls)[: info.num_iters]
    assert np.all(np.diff(lls) >= -1e-10 * np.abs(lls[1:]))
    assert_allclose(lls[0], start.log_posterior(ys, prior), rtol=1e-10)


def test_bad_mixture_and_gamma_priors_are_errors_that_name_the_argument():
    rng = np.random.default_rng(15)
    gmm, *_ = _gmm_start(rng, "diag")
    gamma = ssmjax.GammaEmissions(shapes=jnp.ones((K, 1)), rates=jnp.ones((K, 1)))
    ys = np.ones((1, 4, 1))
    with pytest.raises(ValueError, match="`weights` must be a DirichletPrior"):
        ssmjax.GaussianMixturePrior(weights=ssmjax.GammaPrior(2.0))
    with pytest.raises(ValueError, match="`components` must be a GaussianPrior"):
        ssmjax.GaussianMixturePrior(components=ssmjax.DirichletPrior(2.0))
    with pytest.raises(ValueError, match="'tied'"):
        ssmjax.GaussianMixturePrior.from_hmmlearn("tied", D)
    with pytest.raises(ValueError, match="negative covariance pseudo-count"):
        ssmjax.GaussianMixturePrior.from_hmmlearn("diag", D, covars_prior=-3.0)
    hmm = ssmjax.HMM(jnp.ones(K) / K, jnp.eye(K), gmm)
    bad = ssmjax.HMMPrior(emissions=ssmjax.GaussianMixturePrior(ssmjax.DirichletPrior(jnp.ones(3))))
    with pytest.raises(ValueError, match=r"`prior.emissions.weights.concentration` must broadcast to \(2, 2\)"):
        ssmjax.fit_em(hmm, np.ones((1, 4, D)), prior=bad)
    bad = ssmjax.HMMPrior(emissions=ssmjax.GaussianMixturePrior(components=ssmjax.GaussianPrior(means_prior=jnp.ones(3))))
    with pytest.raises(ValueError, match="`prior.emissions.components.means_prior` must broadcast"):
        hmm.log_posterior(np.ones((1, 4, D)), bad)
    with pytest.raises(ValueError, match="GaussianMixtureEmissions takes no emission prior; got GammaPrior"):
        hmm.log_posterior(np.ones((1, 4, D)), ssmjax.HMMPrior(emissions=ssmjax.GammaPrior(2.0)))
    chain = ssmjax.HMM(jnp.ones(K) / K, jnp.asarray([[0.9, 0.1], [0.2, 0.8]]), gamma)
    with pytest.raises(ValueError, match=r"`prior.emissions.shape` must broadcast to \(2, 1\)"):
        ssmjax.fit_em(chain, ys, prior=ssmjax.HMMPrior(emissions=ssmjax.GammaPrior(jnp.full(3, 2.0))))
    with pytest.raises(ValueError, match="`prior.emissions.shape` must be at least 1"):
        ssmjax.fit_em(chain, ys, prior=ssmjax.HMMPrior(emissions=ssmjax.GammaPrior(0.5, 1.0)))
    with pytest.raises(ValueError, match="GammaEmissions takes no emission prior; got DirichletPrior"):
        ssmjax.fit_em(chain, ys, prior=ssmjax.HMMPrior(emissions=ssmjax.DirichletPrior(2.0)))
    assert chain.num_parameters() == 2 * K * 1 + K - 1 + K * (K - 1)  # priors add no parameters


def test_logsumexp_over_components_equals_jax():
    """The mixture's log-sum-exp over its few components (elementwise over the M slices) equals
    ``jax.scipy.special.logsumexp``: values, gradients, and rows with -inf entries or all -inf."""
    from jax.scipy.special import logsumexp

    from ssmjax._hmm.emissions.mixture import _logsumexp_components

    x = np.random.default_rng(0).normal(size=(6, 5, 3)) * 30.0
    x[0, 0, 1] = -np.inf
    x[1, 2] = -np.inf
    x = jnp.asarray(x)
    np.testing.assert_allclose(_logsumexp_components(x), logsumexp(x, axis=-1), rtol=1e-14)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)))
    finite = jnp.where(jnp.isfinite(x), x, -5.0)
    grad = jax.grad(lambda v: jnp.sum(weights * _logsumexp_components(v)))(finite)
    np.testing.assert_allclose(grad, jax.grad(lambda v: jnp.sum(weights * logsumexp(v, axis=-1)))(finite), rtol=1e-13)
