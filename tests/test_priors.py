"""Priors and MAP estimation: hmmlearn's MAP updates, exact conditional modes, the log posterior EM reports,
its stationarity at EM's fixed point (also for fit_sgd's objective), and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_allclose, pad_batch, random_stochastic_matrix

import ssmjax

K = 3


@pytest.mark.parametrize("family", ["categorical", "multinomial"])
def test_one_map_iteration_equals_hmmlearns(family):
    """Dirichlet priors on the initial distribution, the transition rows (with stickiness) and,
    for the categorical family, the emission rows: one EM iteration equals hmmlearn's MAP update."""
    hmm_module = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(0)
    pi, A = rng.dirichlet(np.ones(K)), random_stochastic_matrix(rng, (K, K))
    lengths = [30, 20, 25]
    alpha_start = rng.uniform(1.0, 3.0, size=K)
    alpha_trans = rng.uniform(1.0, 3.0, size=(K, K))
    stickiness = 5.0
    common = dict(n_components=K, n_iter=1, init_params="", tol=-np.inf, params="ste",
                  startprob_prior=alpha_start, transmat_prior=alpha_trans + stickiness * np.eye(K))
    if family == "categorical":
        emissions = ssmjax.CategoricalEmissions(jnp.asarray(rng.dirichlet(np.ones(4), size=K)))
        alpha_emit = rng.uniform(0.8, 3.0, size=(K, 4))
        emission_prior = ssmjax.DirichletPrior(alpha_emit)
        peer = hmm_module.CategoricalHMM(n_features=4, emissionprob_prior=alpha_emit, **common)
        ys = rng.integers(0, 4, size=sum(lengths))
        X = ys[:, None]
    else:
        emissions = ssmjax.MultinomialEmissions(jnp.asarray(rng.dirichlet(np.ones(4), size=K)), num_trials=5)
        emission_prior = None  # hmmlearn's MultinomialHMM has no emission prior
        peer = hmm_module.MultinomialHMM(n_trials=5, **common)
        ys = rng.multinomial(5, [0.3, 0.3, 0.2, 0.2], size=sum(lengths))
        X = ys
    peer.emissionprob_ = np.asarray(emissions.probs)
    peer.startprob_, peer.transmat_ = pi, A
    peer.fit(X, lengths)
    prior = ssmjax.HMMPrior(initial=alpha_start, transition=alpha_trans, stickiness=stickiness, emissions=emission_prior)
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), emissions)
    fitted, _, _ = ssmjax.fit_em(hmm, pad_batch(ys, lengths, fill=0), lengths=lengths, max_iters=1, prior=prior)
    assert_allclose(fitted.initial_probs, peer.startprob_, rtol=1e-6, atol=1e-9)
    assert_allclose(fitted.transition_matrix, peer.transmat_, rtol=1e-6, atol=1e-9)
    assert_allclose(fitted.emissions.probs, peer.emissionprob_, rtol=1e-6, atol=1e-9)


def test_gamma_and_beta_priors_give_the_exact_conditional_modes():
    """Poisson rates under a Gamma prior and Bernoulli probabilities under a Beta prior maximise
    the weighted log-likelihood plus log prior: their gradient vanishes there. (hmmlearn's Poisson
    update is the posterior mean with the data weight of all states pooled, not a mode.)"""
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(K), size=60)
    cases = [
        (ssmjax.PoissonEmissions(rates=jnp.asarray(rng.uniform(1, 5, size=(K, 2)))), rng.poisson(3.0, size=(60, 2)),
         ssmjax.GammaPrior(3.0, 0.5), "log_rates"),
        (ssmjax.BernoulliEmissions(probs=jnp.asarray(rng.uniform(0.2, 0.8, size=(K, 2)))),
         rng.integers(0, 2, size=(60, 2)), ssmjax.BetaPrior(2.5, 1.5), "logits"),
    ]
    for model, ys, prior, field in cases:
        new = model.m_step_from_stats(model.suff_stats(ys, w), prior=prior)

        def objective(m):
            return jnp.sum(jnp.asarray(w) * m.log_likelihoods(ys)) + m.log_prior(prior)

        grad = np.asarray(getattr(jax.grad(objective)(new), field))
        scale = np.abs(np.asarray(getattr(jax.grad(objective)(model), field))).max()
        assert np.abs(grad).max() < 1e-9 * scale


def test_em_reports_the_log_posterior_and_climbs_to_a_stationary_point_of_it():
    rng = np.random.default_rng(2)
    true = ssmjax.HMM(jnp.ones(K) / K, jnp.asarray(random_stochastic_matrix(rng, (K, K))),
                      ssmjax.PoissonEmissions(rates=jnp.asarray([[1.0], [4.0], [9.0]])))
    ys = np.stack([np.asarray(true.sample(100, key=k)[1]) for k in jax.random.split(jax.random.key(0), 4)])
    prior = ssmjax.HMMPrior(initial=2.0, transition=1.5, stickiness=20.0, emissions=ssmjax.GammaPrior(2.0, 0.1))
    start = ssmjax.HMM.from_data(ys, K, "poisson", key=jax.random.key(1))
    fitted, lls, info = ssmjax.fit_em(start, ys, max_iters=500, tol=1e-13, prior=prior)
    lls = np.asarray(lls)[: info.num_iters]
    assert np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))
    assert_allclose(lls[0], start.log_posterior(ys, prior))
    assert float(fitted.log_posterior(ys, prior)) >= lls[-1] - 1e-9 * abs(lls[-1])
    # stationarity in the unconstrained view, which fit_sgd differentiates: its loss with the
    # same prior has zero gradient at EM's fixed point
    params = fitted._unconstrained()
    grad = jax.grad(lambda p: fitted._from_unconstrained(p).log_posterior(ys, prior))(params)
    grad0 = jax.grad(lambda p: start._from_unconstrained(p).log_posterior(ys, prior))(start._unconstrained())
    top = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grad))
    top0 = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grad0))
    assert top < 1e-5 * top0


def test_a_sticky_prior_and_a_rate_prior_prevent_collapse():
    """One state sees only zeros: without a prior its rate collapses to exactly 0 (log-rate -inf);
    a Gamma prior with shape > 1 keeps it positive, and stickiness raises the diagonal."""
    rng = np.random.default_rng(3)
    ys = np.concatenate([np.zeros((1, 40, 1)), rng.poisson(6.0, size=(1, 60, 1))], axis=1)
    start = ssmjax.HMM(jnp.ones(2) / 2, jnp.asarray([[0.9, 0.1], [0.1, 0.9]]),
                       ssmjax.PoissonEmissions(rates=jnp.asarray([[0.5], [5.0]])))
    plain, _, _ = ssmjax.fit_em(start, ys, max_iters=200)
    assert float(jnp.min(plain.emissions.rates)) < 1e-6
    prior = ssmjax.HMMPrior(stickiness=50.0, emissions=ssmjax.GammaPrior(2.0, 1.0))
    smoothed, _, _ = ssmjax.fit_em(start, ys, max_iters=200, prior=prior)
    assert float(jnp.min(smoothed.emissions.rates)) > 0.01  # about (a - 1) / (40 + b) = 1 / 41
    stay, stay_plain = np.diag(np.asarray(smoothed.transition_matrix)), np.diag(np.asarray(plain.transition_matrix))
    assert stay[0] > stay_plain[0]  # state 1 is absorbing in both (1 up to round-off)


def test_fit_sgd_adds_the_log_prior():
    rng = np.random.default_rng(4)
    ys = rng.poisson(3.0, size=(2, 50, 1)).astype(float)
    start = ssmjax.HMM(jnp.ones(2) / 2, jnp.asarray([[0.8, 0.2], [0.2, 0.8]]),
                       ssmjax.PoissonEmissions(rates=jnp.asarray([[1.0], [5.0]])))
    strong = ssmjax.HMMPrior(emissions=ssmjax.GammaPrior(1000.0 * 20.0 + 1.0, 1000.0))  # mode 20
    import optax

    fitted, losses = ssmjax.fit_sgd(start, ys, optax.adam(0.05), num_steps=300, prior=strong)
    plain, _ = ssmjax.fit_sgd(start, ys, optax.adam(0.05), num_steps=300)
    assert np.all(np.asarray(fitted.emissions.rates) > 10.0)  # pulled towards the prior's mode
    assert np.all(np.asarray(plain.emissions.rates) < 10.0)
    assert_allclose(losses[0], -start.log_posterior(ys, strong) / ys.shape[0] / ys.shape[1], rtol=1e-6)


def test_bad_priors_are_errors_that_name_the_argument():
    with pytest.raises(ValueError, match="`concentration` must be finite and positive"):
        ssmjax.DirichletPrior(0.0)
    with pytest.raises(ValueError, match="`stickiness` must be finite and non-negative"):
        ssmjax.HMMPrior(stickiness=-1.0)
    with pytest.raises(ValueError, match="`shape` must be finite and positive"):
        ssmjax.GammaPrior(-2.0, 1.0)
    with pytest.raises(ValueError, match="`emissions` must be a DirichletPrior"):
        ssmjax.HMMPrior(emissions="gamma")
    hmm = ssmjax.HMM(jnp.ones(2) / 2, jnp.eye(2), ssmjax.PoissonEmissions(rates=jnp.ones((2, 1))))
    ys = np.ones((1, 5, 1))
    with pytest.raises(ValueError, match="PoissonEmissions takes no emission prior; got DirichletPrior"):
        ssmjax.fit_em(hmm, ys, prior=ssmjax.HMMPrior(emissions=ssmjax.DirichletPrior(2.0)))
    with pytest.raises(ValueError, match=r"`prior.transition.concentration` must broadcast to \(2, 2\)"):
        ssmjax.fit_em(hmm, ys, prior=ssmjax.HMMPrior(transition=jnp.ones(3)))
    with pytest.raises(ValueError, match="`prior` must be an ssmjax.HMMPrior"):
        ssmjax.fit_em(hmm, ys, prior=ssmjax.GammaPrior(2.0, 1.0))
    lgssm = ssmjax.LGSSM(
        initial_mean=jnp.zeros(1), initial_cov=jnp.eye(1), transition_matrix=jnp.eye(1),
        transition_cov=jnp.eye(1), emission_matrix=jnp.eye(1), emission_cov=jnp.eye(1),
    )
    with pytest.raises(ValueError, match="LGSSM takes no prior"):
        ssmjax.fit_em(lgssm, ys, prior=ssmjax.HMMPrior())


@pytest.mark.parametrize("kind", ["full", "diag", "spherical", "tied"])
def test_gaussian_prior_map_iteration_equals_hmmlearns(kind):
    """hmmlearn's GaussianHMM with means_prior, means_weight, covars_prior and covars_weight: one EM
    iteration of every parameter from the same start (hmmlearn applies no ridge)."""
    hmm_module = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(5)
    d = 2
    pi, A = rng.dirichlet(np.ones(K)), random_stochastic_matrix(rng, (K, K))
    means = rng.normal(size=(K, d)) * 3.0
    a = rng.normal(size=(K, d, d))
    covs = a @ np.swapaxes(a, 1, 2) + d * np.eye(d)
    lengths = [40, 30]
    ys = rng.normal(size=(sum(lengths), d)) * 3.0
    means_prior, means_weight = rng.normal(size=(K, d)), 1.3  # hmmlearn broadcasts a scalar weight only
    if kind in ("diag", "spherical"):
        covars_prior, covars_weight = rng.uniform(0.2, 1.0, size=(K, d)), 3.0
    elif kind == "full":
        b = rng.normal(size=(K, d, d))
        covars_prior, covars_weight = b @ np.swapaxes(b, 1, 2) * 0.2, 5.0
    else:
        covars_prior, covars_weight = np.eye(d) * 0.5, 4.0
    if kind == "spherical":
        covars_prior = 0.5  # hmmlearn broadcasts it against (K, D) per-dimension sums
    family = {"full": ssmjax.GaussianEmissions, "diag": ssmjax.DiagonalGaussianEmissions,
              "spherical": ssmjax.SphericalGaussianEmissions, "tied": ssmjax.TiedGaussianEmissions}[kind]
    cov_arg = {"full": covs, "diag": np.diagonal(covs, axis1=1, axis2=2), "spherical": covs[:, 0, 0],
               "tied": covs[0]}[kind]
    emissions = family(jnp.asarray(means), jnp.asarray(cov_arg), min_variance=0.0)
    peer = hmm_module.GaussianHMM(
        K, covariance_type=kind, n_iter=1, init_params="", tol=-np.inf, params="stmc", min_covar=0.0,
        means_prior=means_prior, means_weight=means_weight,
        covars_prior=covars_prior, covars_weight=covars_weight,
    )
    peer.startprob_, peer.transmat_, peer.means_ = pi, A, means
    peer.covars_ = np.asarray(cov_arg)
    peer.fit(ys, lengths)
    prior = ssmjax.HMMPrior(emissions=ssmjax.GaussianPrior(means_prior, means_weight, covars_prior, covars_weight))
    hmm = ssmjax.HMM(jnp.asarray(pi), jnp.asarray(A), emissions)
    fitted, _, _ = ssmjax.fit_em(hmm, pad_batch(ys, lengths, fill=0), lengths=lengths, max_iters=1, prior=prior)
    assert_allclose(fitted.emissions.means, peer.means_, rtol=1e-6, atol=1e-9)
    if kind == "spherical":  # hmmlearn's covars_ view of its tiled (K, D) array is malformed: read the array
        assert_allclose(fitted.emissions.variances, np.broadcast_to(np.asarray(peer._covars_).reshape(K, -1), (K, d)),
                        rtol=1e-6, atol=1e-9)
    else:
        assert_allclose(fitted.emissions.covs, peer.covars_, rtol=1e-6, atol=1e-9)
    if kind != "full":
        return
    # the log posterior EM reports never decreases, and its maximiser is a stationary point
    fitted, lls, info = ssmjax.fit_em(hmm, pad_batch(ys, lengths, fill=0), lengths=lengths, max_iters=300, tol=1e-13, prior=prior)
    lls = np.asarray(lls)[: info.num_iters]
    assert np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))
    def total(em, chain):
        model = ssmjax.HMM(chain.initial_probs, chain.transition_matrix, em)
        return model.log_posterior(pad_batch(ys, lengths, fill=0), prior, lengths=lengths)

    g_end = jax.grad(total)(fitted.emissions, fitted)
    g_start = jax.grad(total)(hmm.emissions, hmm)
    top = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(g_end))
    top0 = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(g_start))
    assert top < 1e-5 * top0
