"""Count and symbol HMM estimators: :class:`PoissonHMM`, :class:`CategoricalHMM`, :class:`MultinomialHMM`."""

from __future__ import annotations

import numpy as np

import ssmjax

from ._base import FittedParameter, as_array
from ._hmm import BaseHMMEstimator, check_parameter, check_probabilities, log, softmax


class PoissonHMM(BaseHMMEstimator):
    r"""Hidden Markov model with independent Poisson counts (:class:`ssmjax.PoissonEmissions`).

    :math:`y_{td} \mid z_t = k \sim \mathrm{Poisson}(\lambda_{kd})`. A NaN count is missing.

    Args:
        n_components: number of states ``K``.
        startprob_prior, transmat_prior: Dirichlet concentrations (``1``: flat).
        lambdas_prior, lambdas_weight: hmmlearn's prior on the rates, the M-step
            :math:`(\text{prior} + \sum w y) / (\text{weight} + \sum w)` (a
            :class:`ssmjax.GammaPrior` of shape ``prior + 1`` and rate ``weight``).
        algorithm, random_state, n_iter, tol: as :class:`~ssmjax.estimators.GaussianHMM`.
        params, init_params: letters ``s`` startprob, ``t`` transmat, ``l`` lambdas.

    Attributes:
        lambdas_: ``(K, D)`` rates.

    Example:
        >>> import numpy as np
        >>> from ssmjax.estimators import PoissonHMM
        >>> X = np.random.default_rng(0).poisson([2.0] * 30 + [12.0] * 30)[:, None]
        >>> hmm = PoissonHMM(n_components=2, n_iter=20, random_state=0).fit(X)
        >>> sorted(np.round(hmm.lambdas_[:, 0]).tolist())
        [2.0, 12.0]
    """

    lambdas_ = FittedParameter()
    _letters = {"s": ("startprob_", "initial_probs"), "t": ("transmat_", "transition_matrix"),
                "l": ("lambdas_", "emissions.rates")}
    _family = "poisson"

    def __init__(self, n_components=1, startprob_prior=1.0, transmat_prior=1.0, lambdas_prior=0.0,
                 lambdas_weight=0.0, algorithm="viterbi", random_state=None, n_iter=10, tol=1e-6, params="stl",
                 init_params="stl"):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.lambdas_prior = lambdas_prior
        self.lambdas_weight = lambdas_weight
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params

    def _read_emissions(self, emissions) -> dict:
        return {"lambdas_": np.exp(np.asarray(emissions.log_rates))}

    def _build_emissions(self, parameters: dict):
        rates = check_parameter("lambdas_", parameters["lambdas_"], (self.n_components, self.n_features_in_),
                                "n_components x n_features")
        if np.any(rates < 0):
            raise ValueError(f"`lambdas_` must be non-negative; got min {rates.min()}.")
        return ssmjax.PoissonEmissions(log_rates=log(rates))

    def _validate_X(self, X, reset):
        X = super()._validate_X(X, reset)
        observed = X[~np.isnan(X)]
        if np.any(observed < 0) or np.any(observed != np.floor(observed)):
            raise ValueError("`X` of PoissonHMM must hold non-negative integer counts (NaN for missing).")
        return X

    def _emission_prior(self):
        if self.lambdas_prior == 0 and self.lambdas_weight == 0:
            return None
        return ssmjax.GammaPrior(as_array(self.lambdas_prior) + 1.0, as_array(self.lambdas_weight))


class _SymbolHMM(BaseHMMEstimator):
    """Emission probabilities ``emissionprob_`` ``(K, n_features)`` (categorical, multinomial)."""

    emissionprob_ = FittedParameter()
    _letters = {"s": ("startprob_", "initial_probs"), "t": ("transmat_", "transition_matrix"),
                "e": ("emissionprob_", "emissions.probs")}
    _float_input = False

    def _read_emissions(self, emissions) -> dict:
        return {"emissionprob_": softmax(emissions.logits)}

    def _probabilities(self, parameters: dict, num_classes: int) -> np.ndarray:
        return check_probabilities("emissionprob_", parameters["emissionprob_"], (self.n_components, num_classes),
                                   "n_components x n_features (symbols)")

    def _emission_prior(self):
        if np.all(np.asarray(self.emissionprob_prior) == 1):
            return None
        return ssmjax.DirichletPrior(as_array(self.emissionprob_prior))


class CategoricalHMM(_SymbolHMM):
    r"""Hidden Markov model of integer symbols (:class:`ssmjax.CategoricalEmissions`).

    ``X`` is ``(n_samples, 1)``, one symbol in ``[0, n_features)`` per step, as in hmmlearn.

    Args:
        n_components: number of states ``K``.
        n_features: number of symbols ``C``; None takes ``max(X) + 1`` at fit.
        startprob_prior, transmat_prior, emissionprob_prior: Dirichlet concentrations (``1``: flat).
        algorithm, random_state, n_iter, tol: as :class:`~ssmjax.estimators.GaussianHMM`.
        params, init_params: letters ``s`` startprob, ``t`` transmat, ``e`` emissionprob.

    Attributes:
        emissionprob_: ``(K, C)``.
        n_features_: the number of symbols ``C`` of the fitted model.

    Example:
        >>> import numpy as np
        >>> from ssmjax.estimators import CategoricalHMM
        >>> X = np.array([[0], [0], [1], [0], [2], [2], [1], [2]])
        >>> hmm = CategoricalHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[4, 4])
        >>> hmm.emissionprob_.shape, hmm.predict(X).shape
        ((2, 3), (8,))
    """

    _family = "categorical"

    def __init__(self, n_components=1, n_features=None, startprob_prior=1.0, transmat_prior=1.0,
                 emissionprob_prior=1.0, algorithm="viterbi", random_state=None, n_iter=10, tol=1e-6,
                 params="ste", init_params="ste"):
        self.n_components = n_components
        self.n_features = n_features
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.emissionprob_prior = emissionprob_prior
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params

    def _validate_X(self, X, reset):
        X = super()._validate_X(X, reset)
        if X.shape[1] != 1:
            raise ValueError(f"`X` of CategoricalHMM must have shape (n_samples, 1), one symbol per step; "
                             f"got shape {X.shape}.")
        if reset:
            symbols = int(X.max()) + 1
            if self.n_features is not None and symbols > self.n_features:
                raise ValueError(f"`X` holds symbol {symbols - 1}, but n_features = {self.n_features} symbols.")
            self.n_features_ = symbols if self.n_features is None else int(self.n_features)
        return X

    def _emission_rows(self, X):
        return X[:, 0]

    def _initial_model(self, emissions, lengths, key):
        return ssmjax.HMM.from_data(emissions, self.n_components, "categorical", lengths=lengths,
                                    num_classes=self.n_features_, key=key)

    def _build_emissions(self, parameters: dict):
        probs = self._probabilities(parameters, self.n_features_)
        return ssmjax.CategoricalEmissions(logits=log(probs))


class MultinomialHMM(_SymbolHMM):
    r"""Hidden Markov model of count vectors over ``n_features`` categories (:class:`ssmjax.MultinomialEmissions`).

    Each row of ``X`` holds ``n_trials`` draws spread over the ``n_features`` categories (the same
    ``n_trials`` for every row, ssmjax's multinomial).

    Args:
        n_components: number of states ``K``.
        n_trials: trials per step; None takes the first row's total at fit.
        startprob_prior, transmat_prior, emissionprob_prior: Dirichlet concentrations (``1``: flat).
        algorithm, random_state, n_iter, tol: as :class:`~ssmjax.estimators.GaussianHMM`.
        params, init_params: letters ``s`` startprob, ``t`` transmat, ``e`` emissionprob.

    Attributes:
        emissionprob_: ``(K, n_features)``.

    Example:
        >>> import numpy as np
        >>> from ssmjax.estimators import MultinomialHMM
        >>> X = np.array([[3, 0, 1], [4, 0, 0], [0, 2, 2], [1, 1, 2], [0, 3, 1]])
        >>> hmm = MultinomialHMM(n_components=2, n_iter=5, random_state=0).fit(X)
        >>> hmm.emissionprob_.shape, hmm.n_trials_
        ((2, 3), 4)
    """

    _family = "multinomial"

    def __init__(self, n_components=1, n_trials=None, startprob_prior=1.0, transmat_prior=1.0,
                 emissionprob_prior=1.0, algorithm="viterbi", random_state=None, n_iter=10, tol=1e-6,
                 params="ste", init_params="ste"):
        self.n_components = n_components
        self.n_trials = n_trials
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.emissionprob_prior = emissionprob_prior
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params

    def _validate_X(self, X, reset):
        X = super()._validate_X(X, reset)
        if reset:
            self.n_trials_ = int(X[0].sum()) if self.n_trials is None else int(self.n_trials)
        totals = X.sum(axis=1)
        if np.any(totals != self.n_trials_):
            row = int(np.argmax(totals != self.n_trials_))
            raise ValueError(f"`X` rows must each sum to n_trials = {self.n_trials_}; row {row} sums to {totals[row]}.")
        return X

    def _build_emissions(self, parameters: dict):
        probs = self._probabilities(parameters, self.n_features_in_)
        return ssmjax.MultinomialEmissions(logits=log(probs), num_trials=self.n_trials_)

