"""The hidden Markov model estimators' shared interface: hmmlearn's methods on an :class:`ssmjax.HMM`.

Each method converts hmmlearn's concatenated ``X`` and ``lengths`` into a padded batch, runs one
compiled, vectorised ssmjax function over it (the smoother, Viterbi, the sampler) and returns
NumPy arrays laid out as hmmlearn lays them out. The families are in
:mod:`ssmjax.estimators._gaussian` and :mod:`ssmjax.estimators._discrete`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

import ssmjax
from ssmjax import _checks

from ._base import BaseStateSpaceEstimator, FittedParameter, as_array, float_dtype, jax_key, unpad


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Row-wise softmax in NumPy (``-inf`` logits, structural zeros, give exactly zero)."""
    logits = np.asarray(logits)
    shifted = np.exp(logits - np.max(logits, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def log(values) -> np.ndarray:
    """``log`` in NumPy with ``log 0 = -inf`` and no warning (structural zeros)."""
    with np.errstate(divide="ignore"):
        return np.log(values)


def check_parameter(name: str, value, shape: tuple, what: str) -> np.ndarray:
    """A fitted-parameter value as a float array of ``shape``, finite; the error names the attribute."""
    value = np.asarray(value, dtype=float_dtype())
    if value.shape != shape:
        raise ValueError(f"`{name}` must have shape {shape} ({what}); got shape {value.shape}.")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"`{name}` must be finite; got {value}.")
    return value


def check_probabilities(name: str, value, shape: tuple, what: str) -> np.ndarray:
    """Rows of probabilities (non-negative, summing to one along the last axis)."""
    value = check_parameter(name, value, shape, what)
    sums = value.sum(axis=-1)
    atol = 1e-6 if value.dtype == np.float64 else 1e-4
    if np.any(value < 0) or not np.allclose(sums, 1.0, rtol=0.0, atol=atol):
        raise ValueError(f"`{name}` must hold non-negative probabilities summing to 1 along its last axis; "
                         f"got sums {np.round(sums, 8).tolist()}.")
    return value


@eqx.filter_jit
def _posteriors(model, emissions, lengths):
    """Smoothed state probabilities ``(B, T, K)`` and log-likelihoods ``(B,)`` of a padded batch."""

    def one(y, n):
        post = model.smoother(y, length=n)
        return post.smoothed_probs, post.marginal_loglik

    return jax.vmap(one)(emissions, lengths)


@eqx.filter_jit
def _viterbi(model, emissions, lengths):
    """Most likely paths ``(B, T)`` and their joint log-probabilities ``(B,)``."""

    def one(y, n):
        log_likelihoods = model.log_likelihoods(y, length=n)
        return ssmjax.hmm_viterbi(model.initial_probs, model.transition_matrix, log_likelihoods, length=n)

    return jax.vmap(one)(emissions, lengths)


class BaseHMMEstimator(BaseStateSpaceEstimator):
    """hmmlearn's interface on an :class:`ssmjax.HMM` (abstract: a family gives the emissions).

    Subclasses set ``_letters`` (with ``"s"`` and ``"t"`` for the chain), implement
    ``_read_emissions``, ``_build_emissions`` and, if ``HMM.from_data`` does not know the family,
    ``_initial_model``, and ``_emission_prior`` when the family has one.
    """

    startprob_ = FittedParameter()
    transmat_ = FittedParameter()
    _family = ""  # the emissions_type of ssmjax.HMM.from_data

    # ------------------------------------------------------------- parameters
    def _read_parameters(self, model) -> dict:
        parameters = {
            "startprob_": softmax(model.initial_log_probs),
            "transmat_": softmax(model.transition_log_probs),
        }
        parameters.update(self._read_emissions(model.emissions))
        return parameters

    def _build_model(self, parameters: dict) -> ssmjax.HMM:
        k = self.n_components
        start = check_probabilities("startprob_", parameters["startprob_"], (k,), "one probability per state")
        transition = check_probabilities("transmat_", parameters["transmat_"], (k, k), "n_components x n_components")
        return ssmjax.HMM(initial_log_probs=log(start), transition_log_probs=log(transition),
                          emissions=self._build_emissions(parameters))

    def _read_emissions(self, emissions) -> dict:
        raise NotImplementedError

    def _build_emissions(self, parameters: dict):
        raise NotImplementedError

    def _initial_model(self, emissions, lengths, key) -> ssmjax.HMM:
        return ssmjax.HMM.from_data(emissions, self.n_components, self._family, lengths=lengths, key=key)

    def _initial_parameters(self, emissions, lengths, key) -> dict:
        n_samples = int(lengths.sum())
        if n_samples < self.n_components:
            raise ValueError(
                f"`X` must hold at least n_components = {self.n_components} samples to initialise "
                f"from; got {n_samples}."
            )
        return self._read_parameters(self._initial_model(emissions, lengths, key))

    def _emission_prior(self):
        return None

    def _prior(self):
        emissions = self._emission_prior()
        flat_chain = np.all(np.asarray(self.startprob_prior) == 1) and np.all(np.asarray(self.transmat_prior) == 1)
        if flat_chain and emissions is None:
            return None
        return ssmjax.HMMPrior(initial=as_array(self.startprob_prior), transition=as_array(self.transmat_prior),
                               emissions=emissions)

    def _validate_hyperparameters(self) -> None:
        _checks.positive_int("n_components", self.n_components)
        super()._validate_hyperparameters()

    # ------------------------------------------------------------- inference
    def _checked_batch(self, X, lengths):
        """The fitted model and the padded batch of ``X``, its values checked against the model."""
        model = self._fitted_model()
        X, emissions, lengths = self._batch(X, lengths)
        try:  # the rows of X, so that an error's index is X's
            model.emissions.check_emissions(self._emission_rows(X))
        except ValueError as err:
            raise ValueError(f"`X` does not fit the fitted {type(self).__name__}: {err}") from err
        return model, emissions, lengths

    def fit(self, X, lengths=None):
        """Estimate the parameters by EM (:func:`ssmjax.fit_em`, one compiled loop).

        Parameters named in ``init_params`` are initialised from ``X`` first (the family's
        ``from_data`` initialiser, seeded by ``random_state``); the others start from the values
        you set on the estimator (or from the previous fit). EM then updates the parameters named
        in ``params`` and holds the rest fixed, for at most ``n_iter`` iterations, stopping once the
        relative improvement is at most ``tol``.

        Args:
            X: ``(n_samples, n_features)``, the sequences one after the other.
            lengths: lengths of the sequences, summing to ``n_samples``; None for one sequence.

        Returns:
            The estimator, fitted: ``model_``, the parameters (``startprob_``, ...), ``n_iter_``,
            ``converged_``, ``fit_status_`` and ``log_likelihoods_`` (per iteration; the log
            posterior when a prior is set).

        Raises:
            ValueError: on a bad ``X``, ``lengths`` or hyperparameter, or a parameter left out of
                ``init_params`` and not set.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> hmm.n_iter_ <= 5, hmm.transmat_.shape
            (True, (2, 2))
        """
        return self._fit(X, lengths)

    def score_samples(self, X, lengths=None):
        """Log-likelihood of ``X`` and the smoothed state probabilities of each sample.

        Args:
            X: ``(n_samples, n_features)``.
            lengths: sequence lengths summing to ``n_samples``, or None.

        Returns:
            ``(log_prob, posteriors)``: the summed log-likelihood of the sequences and
            ``(n_samples, n_components)`` probabilities ``p(z_t = k | its sequence)``.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> log_prob, posteriors = hmm.score_samples(X, lengths=[20, 10])
            >>> posteriors.shape, bool(np.allclose(posteriors.sum(axis=1), 1.0))
            ((30, 2), True)
        """
        model, emissions, lengths = self._checked_batch(X, lengths)
        with ssmjax.value_checks(False):  # checked above
            probs, log_likelihoods = _posteriors(model, emissions, lengths)
        return float(np.sum(np.asarray(log_likelihoods))), as_array(unpad(probs, lengths))

    def score(self, X, lengths=None) -> float:
        """Summed log-likelihood of the sequences of ``X`` under the fitted model.

        Args:
            X: ``(n_samples, n_features)``.
            lengths: sequence lengths summing to ``n_samples``, or None.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> bool(hmm.score(X, lengths=[20, 10]) > hmm.score(X + 10.0, lengths=[20, 10]))
            True
        """
        return self.score_samples(X, lengths)[0]

    def predict_proba(self, X, lengths=None) -> np.ndarray:
        """Smoothed state probabilities ``(n_samples, n_components)`` (forward-backward).

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> hmm.predict_proba(X, lengths=[20, 10]).shape
            (30, 2)
        """
        return self.score_samples(X, lengths)[1]

    def decode(self, X, lengths=None, algorithm=None):
        """The most likely states: ``(log_prob, states)``.

        Args:
            X: ``(n_samples, n_features)``.
            lengths: sequence lengths summing to ``n_samples``, or None.
            algorithm: ``"viterbi"`` (the most likely path of each sequence; ``log_prob`` is the
                summed joint log-probability of the paths and the data) or ``"map"`` (the most
                likely state at each step; ``log_prob`` is the log-likelihood); None: the
                estimator's ``algorithm``.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> log_prob, states = hmm.decode(X, lengths=[20, 10], algorithm="viterbi")
            >>> states.shape
            (30,)
        """
        algorithm = self.algorithm if algorithm is None else algorithm
        if algorithm not in ("viterbi", "map"):
            raise ValueError(f"`algorithm` must be 'viterbi' or 'map'; got {algorithm!r}.")
        if algorithm == "map":
            log_prob, probs = self.score_samples(X, lengths)
            return log_prob, np.argmax(probs, axis=1)
        model, emissions, lengths = self._checked_batch(X, lengths)
        with ssmjax.value_checks(False):  # checked above
            paths, log_probs = _viterbi(model, emissions, lengths)
        return float(np.sum(np.asarray(log_probs))), unpad(paths, lengths).astype(np.int64)

    def predict(self, X, lengths=None) -> np.ndarray:
        """The Viterbi path of each sequence, concatenated: ``(n_samples,)`` state indices.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> states = hmm.predict(X, lengths=[20, 10])
            >>> bool(states[0] != states[12])  # the level moved at step 10
            True
        """
        return self.decode(X, lengths, algorithm="viterbi")[1]

    def sample(self, n_samples: int = 1, random_state=None):
        """Draw one sequence from the fitted model: ``(X (n_samples, n_features), states (n_samples,))``.

        Args:
            n_samples: its length.
            random_state: seed or ``RandomState``; None uses the estimator's ``random_state``.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> samples, states = hmm.sample(8, random_state=1)
            >>> samples.shape, states.shape
            ((8, 1), (8,))
        """
        model = self._fitted_model()
        n_samples = _checks.positive_int("n_samples", n_samples)
        key = jax_key(self.random_state if random_state is None else random_state)
        states, emissions = model.sample(n_samples, key=key)
        emissions = np.asarray(emissions)
        return emissions.reshape(n_samples, -1), np.asarray(states).astype(np.int64)

    def _num_parameters(self) -> int:
        # hmmlearn's count: every entry of the chain, also a probability that EM drove to exactly zero
        # (which HMM.num_parameters leaves out as a structural zero) and those `params` holds fixed
        k = self.n_components
        return (k - 1) * (k + 1) + sum(self._fitted_model().emissions.parameter_counts().values())

    def aic(self, X, lengths=None) -> float:
        """Akaike's criterion ``-2 log p(X) + 2 p``; ``p`` counts every free parameter (as hmmlearn).

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> bool(hmm.aic(X, lengths=[20, 10]) < hmm.bic(X, lengths=[20, 10]))
            True
        """
        return -2.0 * self.score(X, lengths) + 2.0 * self._num_parameters()

    def bic(self, X, lengths=None) -> float:
        """Schwarz's criterion ``-2 log p(X) + p log n_samples``; lower is better.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import GaussianHMM
            >>> X = np.random.default_rng(0).normal(size=(30, 1)) + np.repeat([[0.0], [4.0], [0.0]], 10, axis=0)
            >>> hmm = GaussianHMM(n_components=2, n_iter=5, random_state=0).fit(X, lengths=[20, 10])
            >>> bool(np.isclose(hmm.bic(X, lengths=[20, 10]) - hmm.aic(X, lengths=[20, 10]), 7 * (np.log(30) - 2)))
            True
        """
        log_prob = self.score(X, lengths)
        return -2.0 * log_prob + self._num_parameters() * float(np.log(np.shape(X)[0]))
