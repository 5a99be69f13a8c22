"""ssmjax.estimators against hmmlearn and pykalman: EM from the same start, inference, conventions.

Each EM test starts both libraries from the same parameters (``init_params=""``), runs the same
number of iterations and compares the log-likelihoods and the fitted parameters. One fit per
emission family and covariance type: every fit compiles an EM program, and this file has to stay
fast, so the ``params`` letters (frozen parameters) and the priors are varied across those fits
rather than tested in fits of their own.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

hl = pytest.importorskip("hmmlearn.hmm")
pytest.importorskip("sklearn")

from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.utils.estimator_checks import estimator_checks_generator  # noqa: E402

from ssmjax.estimators import CategoricalHMM, GaussianHMM, KalmanSmoother, LocalLevel, PoissonHMM  # noqa: E402

# The parity tolerances (float64): EM is the same arithmetic in another order, so iterates agree
# to round-off amplified by a few iterations; measured about 1e-12 relative.
LOGLIK_RTOL = 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-6, 1e-9
N_ITER = 5
LENGTHS = [70, 45, 35]

START = np.array([0.6, 0.3, 0.1])
TRANSITION = np.array([[0.85, 0.1, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
MEANS = np.array([[0.0, 0.0], [3.0, -1.0], [-2.0, 3.0]])
FULL_COVS = np.array([[[1.0, 0.3], [0.3, 0.6]], [[0.5, -0.1], [-0.1, 0.8]], [[0.7, 0.0], [0.0, 0.4]]])


def sample_sequences(generator, lengths):
    """Sequences drawn by an hmmlearn model, concatenated (hmmlearn's layout)."""
    parts = [generator.sample(n, random_state=seed)[0] for seed, n in enumerate(lengths)]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def gaussian_data():
    generator = hl.GaussianHMM(3, covariance_type="full")
    generator.startprob_, generator.transmat_, generator.means_, generator.covars_ = START, TRANSITION, MEANS, FULL_COVS
    return sample_sequences(generator, LENGTHS)


def start_covars(covariance_type):
    return {
        "full": FULL_COVS * 1.3,
        "tied": FULL_COVS[0] * 1.5,
        "diag": np.array([[1.2, 0.7], [0.6, 0.9], [0.8, 0.5]]),
        "spherical": np.array([1.1, 0.7, 0.6]),
    }[covariance_type]


def set_chain(hmm, start=START, transition=TRANSITION):
    hmm.startprob_ = np.array([0.4, 0.35, 0.25]) if start is START else start
    hmm.transmat_ = np.full((3, 3), 0.1) + 0.7 * np.eye(3) if transition is TRANSITION else transition


def fit_both(ours, theirs, X, lengths, **parameters):
    for model in (ours, theirs):
        set_chain(model)
        for name, value in parameters.items():
            setattr(model, name, value)
    ours.fit(X, lengths)
    theirs.fit(X, lengths)
    assert ours.n_iter_ == N_ITER and theirs.monitor_.iter == N_ITER
    return ours, theirs


def assert_same_chain(ours, theirs):
    np.testing.assert_allclose(ours.startprob_, theirs.startprob_, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    np.testing.assert_allclose(ours.transmat_, theirs.transmat_, rtol=PARAM_RTOL, atol=PARAM_ATOL)


# (covariance type, params letters, prior settings): priors off where the log-likelihood histories are
# compared (ours is the log posterior under a prior, hmmlearn's the log-likelihood).
GAUSSIAN_CASES = {
    "full": ("stmc", dict(covars_prior=0.0, covars_weight=0.0)),
    "diag": ("stmc", dict()),  # hmmlearn's default prior on the covariances
    "spherical": ("smc", dict(means_prior=1.0, means_weight=0.5, covars_prior=0.1, covars_weight=2.0)),
    "tied": ("stm", dict(covars_prior=0.0, covars_weight=0.0)),
}
# (hmmlearn 0.3.3 divides by zero updating covariances with frozen means, params="stc": it only
# gathers the posterior weights when it updates the means.)


@pytest.fixture(scope="module")
def fitted_gaussian(gaussian_data):
    fits = {}
    for covariance_type, (params, prior) in GAUSSIAN_CASES.items():
        ours = GaussianHMM(3, covariance_type=covariance_type, min_covar=0.0, n_iter=N_ITER, tol=None,
                           params=params, init_params="", **prior)
        theirs = hl.GaussianHMM(3, covariance_type=covariance_type, n_iter=N_ITER, tol=-np.inf, params=params,
                                init_params="", **prior)
        fits[covariance_type] = fit_both(ours, theirs, gaussian_data, LENGTHS, means_=MEANS + 0.5,
                                         covars_=start_covars(covariance_type))
    return fits


@pytest.mark.parametrize("covariance_type", list(GAUSSIAN_CASES))
def test_gaussian_em_equals_hmmlearn(fitted_gaussian, gaussian_data, covariance_type):
    ours, theirs = fitted_gaussian[covariance_type]
    params, prior = GAUSSIAN_CASES[covariance_type]
    assert ours.n_iter_ == N_ITER and not ours.converged_  # tol=None: every iteration, as hmmlearn's tol=-inf
    if prior.get("covars_prior") == 0.0:  # no prior: both report the log-likelihood of each iterate
        np.testing.assert_allclose(ours.log_likelihoods_, theirs.monitor_.history, rtol=LOGLIK_RTOL)
    assert_same_chain(ours, theirs)
    np.testing.assert_allclose(ours.means_, theirs.means_, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    # hmmlearn 0.3.3 reads a spherical covars_ back with the wrong shape; its stored variances are right
    ref_covars = theirs._covars_[:, 0, None, None] * np.eye(2) if covariance_type == "spherical" else theirs.covars_
    np.testing.assert_allclose(ours.covars_, ref_covars, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    assert ours.covars_.dtype == np.float64 and ours.model_.emissions.means.dtype == np.float64
    # the parameters left out of `params` are frozen
    if "t" not in params:
        np.testing.assert_allclose(ours.transmat_, np.full((3, 3), 0.1) + 0.7 * np.eye(3), rtol=1e-12)
    if "c" not in params:
        np.testing.assert_allclose(ours.covars_[0], start_covars(covariance_type), rtol=1e-12)


def test_inference_equals_hmmlearn(fitted_gaussian, gaussian_data):
    ours, theirs = fitted_gaussian["diag"]
    X, lengths = gaussian_data, LENGTHS
    log_prob, posteriors = ours.score_samples(X, lengths)
    ref_log_prob, ref_posteriors = theirs.score_samples(X, lengths)
    np.testing.assert_allclose(log_prob, ref_log_prob, rtol=LOGLIK_RTOL)
    np.testing.assert_allclose(posteriors, ref_posteriors, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    np.testing.assert_allclose(ours.score(X, lengths), theirs.score(X, lengths), rtol=LOGLIK_RTOL)
    np.testing.assert_allclose(ours.predict_proba(X, lengths), theirs.predict_proba(X, lengths), atol=PARAM_ATOL)
    viterbi_log_prob, states = ours.decode(X, lengths)
    ref_viterbi_log_prob, ref_states = theirs.decode(X, lengths)
    np.testing.assert_allclose(viterbi_log_prob, ref_viterbi_log_prob, rtol=LOGLIK_RTOL)
    np.testing.assert_array_equal(states, ref_states)
    np.testing.assert_array_equal(ours.predict(X, lengths), theirs.predict(X, lengths))
    np.testing.assert_array_equal(ours.decode(X, lengths, algorithm="map")[1],
                                  theirs.decode(X, lengths, algorithm="map")[1])
    np.testing.assert_allclose(ours.aic(X, lengths), theirs.aic(X, lengths), rtol=LOGLIK_RTOL)
    np.testing.assert_allclose(ours.bic(X, lengths), theirs.bic(X, lengths), rtol=LOGLIK_RTOL)
    # the sequences are scored one by one: other lengths, another result
    assert not np.isclose(ours.score(X, [sum(lengths)]), ours.score(X, lengths), rtol=1e-9)


def test_fitted_attributes_can_be_set_and_round_trip(fitted_gaussian, gaussian_data):
    ours, theirs = fitted_gaussian["diag"]
    copy = pickle.loads(pickle.dumps(ours))
    np.testing.assert_array_equal(copy.covars_, ours.covars_)
    copy.means_ = theirs.means_ + 1.0  # writing a parameter after fit rebuilds the model
    theirs_copy = pickle.loads(pickle.dumps(theirs))
    theirs_copy.means_ = theirs.means_ + 1.0
    np.testing.assert_allclose(copy.score(gaussian_data, LENGTHS), theirs_copy.score(gaussian_data, LENGTHS),
                               rtol=LOGLIK_RTOL)
    np.testing.assert_allclose(copy.model_.emissions.means, theirs.means_ + 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match=r"`covars_` of covariance_type='diag' must have shape \(3, 2\)"):
        copy.covars_ = np.ones(3)
    with pytest.raises(ValueError, match="`transmat_` must hold non-negative probabilities summing to 1"):
        copy.transmat_ = np.ones((3, 3))


def test_poisson_em_equals_hmmlearn():
    generator = hl.PoissonHMM(3)
    generator.startprob_, generator.transmat_ = START, TRANSITION
    generator.lambdas_ = np.array([[1.0, 6.0], [5.0, 1.0], [12.0, 10.0]])
    X = sample_sequences(generator, LENGTHS)
    start_rates = np.array([[2.0, 4.0], [4.0, 2.0], [9.0, 9.0]])
    ours = PoissonHMM(3, n_iter=N_ITER, tol=0.0, params="sl", init_params="")
    theirs = hl.PoissonHMM(3, n_iter=N_ITER, tol=-np.inf, params="sl", init_params="")
    fit_both(ours, theirs, X, LENGTHS, lambdas_=start_rates)
    np.testing.assert_allclose(ours.log_likelihoods_, theirs.monitor_.history, rtol=LOGLIK_RTOL)
    assert_same_chain(ours, theirs)
    np.testing.assert_allclose(ours.lambdas_, theirs.lambdas_, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    np.testing.assert_allclose(ours.transmat_, np.full((3, 3), 0.1) + 0.7 * np.eye(3), rtol=1e-12)  # frozen


def test_categorical_em_with_priors_equals_hmmlearn():
    generator = hl.CategoricalHMM(3, n_features=4)
    generator.startprob_, generator.transmat_ = START, TRANSITION
    generator.emissionprob_ = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]])
    X = sample_sequences(generator, LENGTHS)
    start_probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.2, 0.3]])
    priors = dict(startprob_prior=1.5, transmat_prior=2.0, emissionprob_prior=1.2)
    ours = CategoricalHMM(3, n_features=4, n_iter=N_ITER, tol=0.0, init_params="", **priors)
    theirs = hl.CategoricalHMM(3, n_features=4, n_iter=N_ITER, tol=-np.inf, init_params="", **priors)
    fit_both(ours, theirs, X, LENGTHS, emissionprob_=start_probs)
    assert_same_chain(ours, theirs)
    np.testing.assert_allclose(ours.emissionprob_, theirs.emissionprob_, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    symbols, states = ours.sample(12, random_state=0)
    assert symbols.shape == (12, 1) and states.shape == (12,)
    assert set(np.unique(symbols)) <= {0, 1, 2, 3} and set(np.unique(states)) <= {0, 1, 2}
    np.testing.assert_array_equal(ours.sample(12, random_state=0)[0], symbols)  # seeded


def test_kalman_em_equals_pykalman():
    pykalman = pytest.importorskip("pykalman")
    rng = np.random.default_rng(3)
    A = np.array([[0.9, 0.2], [0.0, 0.8]])
    x, X = np.zeros(2), np.zeros((60, 2))
    for t in range(60):
        x = A @ x + 0.5 * rng.standard_normal(2)
        X[t] = np.array([[1.0, 0.0], [0.5, 1.0]]) @ x + 0.3 * rng.standard_normal(2)
    start = dict(transition_matrix_=0.5 * np.eye(2), transition_cov_=np.eye(2),
                 emission_matrix_=np.array([[1.0, 0.2], [0.3, 1.0]]), emission_cov_=np.eye(2),
                 initial_mean_=np.zeros(2), initial_cov_=np.eye(2))
    ours = KalmanSmoother(n_dim_state=2, n_iter=3, tol=0.0, init_params="")
    for name, value in start.items():
        setattr(ours, name, value)
    ours.fit(X)
    kf = pykalman.KalmanFilter(
        transition_matrices=start["transition_matrix_"], observation_matrices=start["emission_matrix_"],
        transition_covariance=start["transition_cov_"], observation_covariance=start["emission_cov_"],
        initial_state_mean=start["initial_mean_"], initial_state_covariance=start["initial_cov_"],
        em_vars=["transition_matrices", "observation_matrices", "transition_covariance", "observation_covariance",
                 "initial_state_mean", "initial_state_covariance"])
    ref_lls = []
    for _ in range(3):
        ref_lls.append(kf.loglikelihood(X))
        kf = kf.em(X, n_iter=1)
    np.testing.assert_allclose(ours.log_likelihoods_, ref_lls, rtol=LOGLIK_RTOL)
    for name, ref in (("transition_matrix_", kf.transition_matrices), ("transition_cov_", kf.transition_covariance),
                      ("emission_matrix_", kf.observation_matrices), ("emission_cov_", kf.observation_covariance),
                      ("initial_mean_", kf.initial_state_mean), ("initial_cov_", kf.initial_state_covariance)):
        np.testing.assert_allclose(getattr(ours, name), ref, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)
    np.testing.assert_allclose(ours.score(X), kf.loglikelihood(X), rtol=LOGLIK_RTOL)
    np.testing.assert_allclose(ours.smooth(X), kf.smooth(X)[0], rtol=PARAM_RTOL, atol=PARAM_ATOL)


def test_local_level_recovers_the_nile_mle():
    import ssmjax

    nile = ssmjax.datasets.load_nile().values[:, None]
    model = LocalLevel(n_iter=500, tol=1e-12).fit(nile / 100.0)
    # the maximum-likelihood variances of Durbin and Koopman (2012, section 2.10), in (flow / 100)^2
    np.testing.assert_allclose([model.noise_variance_, model.level_variance_], [1.5099, 0.14691], rtol=2e-3)
    assert model.n_iter_ > 10 and model.log_likelihoods_[-1] >= model.log_likelihoods_[0]


def test_lengths_and_input_errors(fitted_gaussian, gaussian_data):
    ours = fitted_gaussian["full"][0]
    with pytest.raises(ValueError, match=r"`lengths` must sum to the number of samples in X \(n_samples = 150\); "
                                         r"got lengths summing to 149"):
        ours.score(gaussian_data, [70, 45, 34])
    with pytest.raises(ValueError, match="`lengths` must all be at least 1"):
        ours.predict(gaussian_data, [150, 0])
    with pytest.raises(ValueError, match="`lengths` must hold integers"):
        ours.predict(gaussian_data, [75.5, 74.5])
    with pytest.raises(ValueError, match="X has 3 features, but GaussianHMM is expecting 2 features"):
        ours.predict(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="`covariance_type` must be one of"):
        GaussianHMM(covariance_type="banded").fit(gaussian_data)
    with pytest.raises(ValueError, match="`params` must be a string of the letters 'stmc'"):
        GaussianHMM(params="stx").fit(gaussian_data)
    with pytest.raises(ValueError, match="`means_` must be set before fit: init_params='stc' leaves out 'm'"):
        GaussianHMM(2, init_params="stc").fit(gaussian_data)
    with pytest.raises(ValueError, match="`X` of CategoricalHMM must have shape \\(n_samples, 1\\)"):
        CategoricalHMM(2).fit(np.zeros((5, 2), int))
    with pytest.raises(ValueError, match="`X` of PoissonHMM must hold non-negative integer counts"):
        PoissonHMM(2).fit(np.array([[1.0], [2.5]]))
    with pytest.raises(NotFittedError):
        GaussianHMM().predict(gaussian_data)


# scikit-learn's common checks that apply. Skipped, each for its reason:
# * a target passed as fit's second argument, which these estimators read as hmmlearn's `lengths`:
#   check_fit_score_takes_y, check_estimators_overwrite_params, check_dont_overwrite_parameters,
#   check_estimators_fit_returns_self, check_readonly_memmap_input, check_n_features_in_after_fitting,
#   check_positive_only_tag_during_fit, check_estimators_dtypes, check_dtype_object,
#   check_pipeline_consistency, check_estimators_pickle, check_f_contiguous_array_estimator,
#   check_methods_sample_order_invariance, check_methods_subset_invariance, check_fit2d_1feature,
#   check_dict_unchanged, check_fit_idempotent, check_fit_check_is_fitted, check_n_features_in,
#   check_fit2d_predict1d (pickling, parameter writes and feature counts are tested above instead);
# * check_fit2d_1sample passes but compiles an EM program (about 1 s), over this file's time budget;
# * check_methods_sample_order_invariance and check_methods_subset_invariance would fail anyway:
#   an HMM's outputs depend on the order of the samples, by design;
# * check_array_api_input: no array API support.
SKLEARN_CHECKS = (
    "check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types", "check_estimator_repr",
    "check_no_attributes_set_in_init", "check_estimators_unfitted", "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order", "check_complex_data", "check_estimators_empty_data_messages", "check_estimator_sparse_tag",
    "check_estimator_sparse_array", "check_estimator_sparse_matrix", "check_parameters_default_constructible",
    "check_get_params_invariance", "check_set_params", "check_fit1d",
)


@pytest.mark.parametrize("name", SKLEARN_CHECKS)
def test_sklearn_common_checks(name):
    checks = {getattr(check, "func", check).__name__: (estimator, check)
              for estimator, check in estimator_checks_generator(GaussianHMM(n_components=1, n_iter=1))}
    assert name in checks, f"scikit-learn no longer runs {name}"
    estimator, check = checks[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)
