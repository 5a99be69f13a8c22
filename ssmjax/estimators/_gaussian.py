"""Gaussian HMM estimators: :class:`GaussianHMM` (four covariance types) and :class:`GMMHMM`."""

from __future__ import annotations

import numpy as np

import ssmjax
from ssmjax import _checks

from ._base import FittedParameter, as_array, float_dtype
from ._hmm import BaseHMMEstimator, check_parameter, check_probabilities, log, softmax

_FAMILIES = {
    "full": (ssmjax.GaussianEmissions, "gaussian"),
    "diag": (ssmjax.DiagonalGaussianEmissions, "gaussian_diag"),
    "spherical": (ssmjax.SphericalGaussianEmissions, "gaussian_spherical"),
    "tied": (ssmjax.TiedGaussianEmissions, "gaussian_tied"),
}


def _check_covariance_type(covariance_type, allowed) -> None:
    if covariance_type not in allowed:
        raise ValueError(f"`covariance_type` must be one of {list(allowed)}; got {covariance_type!r}.")


def _full_covariances(emissions) -> np.ndarray:
    """``(K, D, D)`` covariance matrices of a Gaussian emission model, in NumPy."""
    kind = emissions.covariance_type
    if kind in ("full", "tied"):
        chol = np.tril(np.asarray(emissions.chol_covs))
        return chol @ np.swapaxes(chol, -1, -2)
    if kind == "diag":
        variances = np.exp(np.asarray(emissions.log_variances))
    else:
        variances = np.broadcast_to(np.exp(np.asarray(emissions.log_variance))[:, None], emissions.means.shape)
    return variances[:, :, None] * np.eye(variances.shape[-1])


def _cholesky(name: str, covs: np.ndarray) -> np.ndarray:
    if not np.allclose(covs, np.swapaxes(covs, -1, -2)):
        raise ValueError(f"`{name}` must be symmetric.")
    try:
        return np.linalg.cholesky(covs)
    except np.linalg.LinAlgError:
        raise ValueError(f"`{name}` must be positive definite.") from None


def _reduced(covariance_type: str, covs: np.ndarray, k: int, d: int) -> np.ndarray | None:
    """A ``(K, D, D)`` value in the storage of ``covariance_type`` when it is exactly of that form."""
    if covs.shape != (k, d, d):
        return None
    diagonal = np.diagonal(covs, axis1=1, axis2=2)
    if covariance_type == "full":
        return covs
    if covariance_type == "tied":
        return covs[0] if np.array_equal(covs, np.broadcast_to(covs[0], covs.shape)) else None
    if not np.array_equal(covs, diagonal[:, :, None] * np.eye(d)):
        return None
    if covariance_type == "diag":
        return diagonal
    return diagonal[:, 0] if np.array_equal(diagonal, np.broadcast_to(diagonal[:, :1], diagonal.shape)) else None


def gaussian_emissions(covariance_type: str, means: np.ndarray, covars, min_variance: float,
                       name: str = "covars_"):
    """An ssmjax Gaussian emission model from hmmlearn's ``means_`` and ``covars_``.

    ``covars`` has the shape of ``covariance_type`` (hmmlearn's ``covars_`` setter): ``(K, D, D)``
    full, ``(D, D)`` tied, ``(K, D)`` diag, ``(K,)`` spherical; or ``(K, D, D)`` of that form.
    """
    k, d = means.shape
    shapes = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
    covars = np.asarray(covars, dtype=float_dtype())
    if covars.shape != shapes[covariance_type]:
        reduced = _reduced(covariance_type, covars, k, d)
        if reduced is None:
            raise ValueError(
                f"`{name}` of covariance_type={covariance_type!r} must have shape {shapes[covariance_type]} "
                f"(or ({k}, {d}, {d}) of that form); got shape {covars.shape}."
            )
        covars = reduced
    covars = check_parameter(name, covars, shapes[covariance_type], f"covariance_type={covariance_type!r}")
    family = _FAMILIES[covariance_type][0]
    if covariance_type in ("diag", "spherical"):
        if np.any(covars <= 0):
            raise ValueError(f"`{name}` must be positive; got min {covars.min()}.")
        if covariance_type == "diag":
            return family(means, log_variances=np.log(covars), min_variance=min_variance)
        return family(means, log_variance=np.log(covars), min_variance=min_variance)
    if covariance_type == "tied":
        return family(means, chol_cov=_cholesky(name, covars), min_variance=min_variance)
    return family(means, chol_covs=_cholesky(name, covars), min_variance=min_variance)


class GaussianHMM(BaseHMMEstimator):
    r"""Hidden Markov model with Gaussian emissions, hmmlearn's ``GaussianHMM`` on :class:`ssmjax.HMM`.

    :math:`y_t \mid z_t = k \sim \mathcal N(\mu_k, \Sigma_k)`; ``covariance_type`` picks the
    emission class: ``"full"`` :class:`ssmjax.GaussianEmissions`, ``"diag"``
    :class:`ssmjax.DiagonalGaussianEmissions`, ``"spherical"``
    :class:`ssmjax.SphericalGaussianEmissions`, ``"tied"`` :class:`ssmjax.TiedGaussianEmissions`.
    Fitting is :func:`ssmjax.fit_em`; with hmmlearn's default priors it is hmmlearn's MAP update
    (:class:`ssmjax.GaussianPrior`). A NaN entry of ``X`` is missing (ssmjax's convention).

    Args:
        n_components: number of states ``K``.
        covariance_type: ``"full"``, ``"diag"``, ``"spherical"`` or ``"tied"``.
        min_covar: added to the diagonal of every covariance EM computes (ssmjax's
            ``min_variance``); hmmlearn adds it only to the initial covariances, so with
            ``min_covar=0`` the two fits agree.
        startprob_prior, transmat_prior: Dirichlet concentrations (``1``: flat).
        means_prior, means_weight, covars_prior, covars_weight: hmmlearn's prior on the means
            and covariances (:class:`ssmjax.GaussianPrior`).
        algorithm: ``"viterbi"`` or ``"map"``, what :meth:`decode` uses by default.
        random_state: seed of the initialisation and of :meth:`sample`.
        n_iter: maximum number of EM iterations.
        tol: stop once the relative improvement of the objective is at most ``tol`` (ssmjax's
            convention; hmmlearn's ``tol`` is absolute); None runs all ``n_iter`` iterations.
        params: letters of the parameters EM updates: ``s`` startprob, ``t`` transmat, ``m``
            means, ``c`` covars; the others are frozen.
        init_params: letters of the parameters fit initialises from the data; set the others as
            attributes before fit.

    Attributes:
        startprob_: ``(K,)``.
        transmat_: ``(K, K)``.
        means_: ``(K, D)``.
        covars_: read as ``(K, D, D)`` matrices (as hmmlearn); written in the covariance type's
            shape, ``(K, D, D)`` full, ``(D, D)`` tied, ``(K, D)`` diag, ``(K,)`` spherical.
        model_: the fitted :class:`ssmjax.HMM`.
        n_iter_, converged_, fit_status_, log_likelihoods_: the EM run (:class:`ssmjax.EMInfo`).

    Example:
        >>> import numpy as np
        >>> from ssmjax.estimators import GaussianHMM
        >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
        >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
        >>> hmm.means_.shape, hmm.covars_.shape, hmm.predict(X, lengths=[20, 10]).shape
        ((2, 1), (2, 1, 1), (30,))
    """

    means_ = FittedParameter()
    covars_ = FittedParameter()
    _letters = {
        "s": ("startprob_", "initial_probs"),
        "t": ("transmat_", "transition_matrix"),
        "m": ("means_", "emissions.means"),
        "c": ("covars_", "emissions.covs"),
    }

    def __init__(self, n_components=1, covariance_type="diag", min_covar=1e-3, startprob_prior=1.0,
                 transmat_prior=1.0, means_prior=0, means_weight=0, covars_prior=1e-2, covars_weight=1,
                 algorithm="viterbi", random_state=None, n_iter=10, tol=1e-6, params="stmc", init_params="stmc"):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params

    @property
    def _family(self) -> str:
        return _FAMILIES[self.covariance_type][1]

    def _validate_hyperparameters(self) -> None:
        _check_covariance_type(self.covariance_type, _FAMILIES)
        if not (isinstance(self.min_covar, (int, float)) and self.min_covar >= 0):
            raise ValueError(f"`min_covar` must be a non-negative float; got {self.min_covar!r}.")
        super()._validate_hyperparameters()

    def _read_emissions(self, emissions) -> dict:
        return {"means_": np.asarray(emissions.means), "covars_": _full_covariances(emissions)}

    def _build_emissions(self, parameters: dict):
        d = getattr(self, "n_features_in_", None)
        d = np.shape(parameters["means_"])[-1] if d is None else d
        means = check_parameter("means_", parameters["means_"], (self.n_components, d), "n_components x n_features")
        return gaussian_emissions(self.covariance_type, means, parameters["covars_"], float(self.min_covar))

    def _emission_prior(self):
        flat = np.all(np.asarray(self.means_weight) == 0) and np.all(np.asarray(self.covars_prior) == 0) and (
            np.all(np.asarray(self.covars_weight) <= (1 if self.covariance_type in ("diag", "spherical") else
                                                      getattr(self, "n_features_in_", 1))))
        if flat:
            return None
        return ssmjax.GaussianPrior(*(as_array(value) for value in (self.means_prior, self.means_weight,
                                                                    self.covars_prior, self.covars_weight)))


class GMMHMM(BaseHMMEstimator):
    r"""Hidden Markov model with a Gaussian mixture per state (:class:`ssmjax.GaussianMixtureEmissions`).

    :math:`y_t \mid z_t = k \sim \sum_m w_{km} \mathcal N(\mu_{km}, \Sigma_{km})`, fitted by
    maximum likelihood (a Dirichlet prior on the weights only). ssmjax's tied mixture ties one
    covariance across every component of every state, hmmlearn's one per state, so
    ``covariance_type`` is ``"full"``, ``"diag"`` or ``"spherical"``. The components' means and
    covariances are updated together: ``params`` holds both ``m`` and ``c`` or neither.

    Args:
        n_components: number of states ``K``.
        n_mix: components per state ``M``.
        covariance_type: ``"full"``, ``"diag"`` or ``"spherical"``.
        min_covar: added to the diagonal of every component covariance EM computes.
        startprob_prior, transmat_prior, weights_prior: Dirichlet concentrations (``1``: flat).
        algorithm, random_state, n_iter, tol: as :class:`GaussianHMM`.
        params, init_params: letters ``s`` startprob, ``t`` transmat, ``w`` weights, ``m`` means,
            ``c`` covars.

    Attributes:
        weights_: ``(K, M)``.
        means_: ``(K, M, D)``.
        covars_: ``(K, M, D, D)`` full, ``(K, M, D)`` diag, ``(K, M)`` spherical (read and written).

    Example:
        >>> import numpy as np
        >>> from ssmjax.estimators import GMMHMM
        >>> X = np.random.default_rng(0).normal(size=(60, 2))
        >>> hmm = GMMHMM(n_components=2, n_mix=2, n_iter=3, random_state=0).fit(X)
        >>> hmm.weights_.shape, hmm.means_.shape, hmm.covars_.shape
        ((2, 2), (2, 2, 2), (2, 2, 2))
    """

    weights_ = FittedParameter()
    means_ = FittedParameter()
    covars_ = FittedParameter()
    _letters = {
        "s": ("startprob_", "initial_probs"),
        "t": ("transmat_", "transition_matrix"),
        "w": ("weights_", "emissions.weights"),
        "m": ("means_", "emissions.components"),
        "c": ("covars_", "emissions.components"),
    }

    def __init__(self, n_components=1, n_mix=1, covariance_type="diag", min_covar=1e-3, startprob_prior=1.0,
                 transmat_prior=1.0, weights_prior=1.0, algorithm="viterbi", random_state=None, n_iter=10,
                 tol=1e-6, params="stmcw", init_params="stmcw"):
        self.n_components = n_components
        self.n_mix = n_mix
        self.covariance_type = covariance_type
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.weights_prior = weights_prior
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params

    def _validate_hyperparameters(self) -> None:
        _check_covariance_type(self.covariance_type, ("full", "diag", "spherical"))
        _checks.positive_int("n_mix", self.n_mix)
        if isinstance(self.params, str) and ("m" in self.params) != ("c" in self.params):
            raise ValueError(f"`params` must hold both 'm' and 'c' or neither for GMMHMM; got {self.params!r}.")
        super()._validate_hyperparameters()

    def _initial_model(self, emissions, lengths, key) -> ssmjax.HMM:
        pooled = emissions[np.arange(emissions.shape[1])[None, :] < lengths[:, None]]
        family = _FAMILIES[self.covariance_type][0]
        mixture = ssmjax.GaussianMixtureEmissions.from_data(pooled, self.n_components, num_mix=self.n_mix,
                                                            family=family, key=key)
        k = self.n_components  # the chain HMM.from_data starts from: uniform start, 0.9 on the diagonal
        transition = np.full((k, k), 0.1 / max(k - 1, 1))
        np.fill_diagonal(transition, 0.9 if k > 1 else 1.0)
        return ssmjax.HMM(np.full(k, 1.0 / k), transition, mixture)

    def _read_emissions(self, emissions) -> dict:
        k, m = self.n_components, self.n_mix
        covs = _full_covariances(emissions.components)
        d = covs.shape[-1]
        if self.covariance_type == "diag":
            covs = np.diagonal(covs, axis1=-2, axis2=-1)
        elif self.covariance_type == "spherical":
            covs = covs[:, 0, 0]
        return {
            "weights_": softmax(emissions.mixture_logits),
            "means_": np.asarray(emissions.components.means).reshape(k, m, d),
            "covars_": covs.reshape((k, m) + covs.shape[1:]),
        }

    def _build_emissions(self, parameters: dict):
        k, m = self.n_components, self.n_mix
        d = getattr(self, "n_features_in_", None)
        d = np.shape(parameters["means_"])[-1] if d is None else d
        weights = check_probabilities("weights_", parameters["weights_"], (k, m), "n_components x n_mix")
        means = check_parameter("means_", parameters["means_"], (k, m, d), "n_components x n_mix x n_features")
        shapes = {"full": (k, m, d, d), "diag": (k, m, d), "spherical": (k, m)}
        covars = check_parameter("covars_", parameters["covars_"], shapes[self.covariance_type],
                                 f"covariance_type={self.covariance_type!r}")
        components = gaussian_emissions(self.covariance_type, means.reshape(k * m, d),
                                        covars.reshape((k * m,) + covars.shape[2:]), float(self.min_covar))
        return ssmjax.GaussianMixtureEmissions(mixture_logits=log(weights), components=components)

    def _emission_prior(self):
        if np.all(np.asarray(self.weights_prior) == 1):
            return None
        return ssmjax.DirichletPrior(as_array(self.weights_prior))
