"""What the estimators share: hmmlearn's data layout, fitted-parameter attributes and the EM fit.

hmmlearn's layout is one array ``X`` of shape ``(n_samples, n_features)`` holding every sequence
one after the other, with ``lengths`` (the sequence lengths, summing to ``n_samples``) saying
where each ends. ssmjax fits a padded batch ``(B, T, ...)`` with ``lengths`` ``(B,)``: :func:`pad`
and :func:`unpad` convert between the two.

A fitted parameter (``startprob_``, ``means_``, ``transition_cov_``, ...) is a
:class:`FittedParameter`: after ``fit`` it reads the fitted ssmjax model (``model_``) and writing it
rebuilds that model; before ``fit`` it holds the value a user gives for a parameter that
``init_params`` leaves out, as in hmmlearn.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

import ssmjax
from ssmjax import _checks, _padding


def float_dtype() -> np.dtype:
    """JAX's default float: float64 with ``jax_enable_x64`` on, float32 otherwise."""
    return np.dtype(jnp.result_type(float))


def jax_key(random_state) -> jax.Array:
    """A JAX PRNG key drawn from a scikit-learn ``random_state`` (None, an int or a RandomState)."""
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    return jax.random.key(int(seed))


def check_lengths(lengths, n_samples: int) -> np.ndarray:
    """hmmlearn's ``lengths`` as an int array: positive sequence lengths summing to ``n_samples``.

    Example:
        >>> from ssmjax.estimators._base import check_lengths
        >>> check_lengths([3, 2], 5).tolist(), check_lengths(None, 4).tolist()
        ([3, 2], [4])
    """
    if lengths is None:
        return np.array([n_samples], dtype=np.int64)
    values = np.asarray(lengths)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"`lengths` must be a non-empty 1-D sequence of sequence lengths; got shape {values.shape}."
        )
    if not (np.issubdtype(values.dtype, np.integer)
            or (np.issubdtype(values.dtype, np.floating) and np.all(values == np.floor(values)))):
        raise ValueError(f"`lengths` must hold integers; got {values.dtype} values {values.tolist()[:5]}.")
    values = values.astype(np.int64)
    if np.any(values < 1):
        raise ValueError(f"`lengths` must all be at least 1; got {values.tolist()}.")
    if int(values.sum()) != n_samples:
        raise ValueError(
            f"`lengths` must sum to the number of samples in X (n_samples = {n_samples}); "
            f"got lengths summing to {int(values.sum())}."
        )
    return values


def pad(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``(B, max(lengths), ...)``: the concatenated sequences ``rows`` as a batch (:func:`ssmjax.pad`),
    padded with zero, a valid value for every emission family (ssmjax ignores it anyway)."""
    return _padding.pad(rows, lengths, fill=0)[0]


def unpad(batch, lengths: np.ndarray) -> np.ndarray:
    """The real steps of a ``(B, T, ...)`` batch, concatenated (hmmlearn's layout)."""
    return _padding.unpad(batch, lengths, concatenate=True)


class FittedParameter:
    """A fitted-parameter attribute (``startprob_``, ``covars_``, ...) of an estimator.

    Reading it after ``fit`` gives the fitted ssmjax model's value (a NumPy array); writing it
    rebuilds that model. Before ``fit``, a written value is kept and used by ``fit`` as the
    starting value when ``init_params`` leaves the parameter out.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, estimator, owner=None):
        if estimator is None:
            return self
        return estimator._get_parameter(self.name)

    def __set__(self, estimator, value):
        estimator._set_parameter(self.name, value)


class BaseStateSpaceEstimator(BaseEstimator):
    """An ssmjax model fitted by EM behind scikit-learn's estimator interface (abstract).

    Subclasses say which parameters there are (``_letters``: letter of ``init_params`` and
    ``params`` -> attribute name and ``frozen`` name of :func:`ssmjax.fit_em`), how ``X`` is
    validated (``_validate_X``), how a model is built from parameters and read back
    (``_build_model``, ``_read_parameters``) and initialised (``_initial_parameters``).
    """

    _letters: dict[str, tuple[str, str]] = {}
    _float_input = True  # X holds real numbers (NaN = missing); False: integer symbols or counts

    # ------------------------------------------------------------- parameters
    def __sklearn_is_fitted__(self) -> bool:
        return "model_" in self.__dict__

    def _get_parameter(self, name: str):
        if "model_" in self.__dict__:
            return self._read_parameters(self.model_)[name]
        pending = self.__dict__.get("_pending_parameters", {})
        if name in pending:
            return pending[name]
        raise AttributeError(
            f"{type(self).__name__} has no `{name}` yet: it is set by fit, or by you before fit."
        )

    def _set_parameter(self, name: str, value) -> None:
        if "model_" in self.__dict__:
            parameters = self._read_parameters(self.model_)
            parameters[name] = np.asarray(value)
            self.model_ = self._build_model(parameters)
        else:
            self.__dict__.setdefault("_pending_parameters", {})[name] = np.asarray(value)

    def _read_parameters(self, model) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _build_model(self, parameters: dict[str, np.ndarray]):
        raise NotImplementedError

    def _initial_parameters(self, emissions, lengths, key) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _prior(self):
        """The prior ``fit_em`` maximises with (None: maximum likelihood)."""
        return None

    # ------------------------------------------------------------- validation
    def _check_letters(self) -> None:
        for name in ("init_params", "params"):
            value = getattr(self, name)
            if not isinstance(value, str) or set(value) - set(self._letters):
                raise ValueError(
                    f"`{name}` must be a string of the letters {''.join(self._letters)!r} "
                    f"({', '.join(f'{k}: {v[0]}' for k, v in self._letters.items())}); got {value!r}."
                )
        _checks.positive_int("n_iter", self.n_iter)
        if self.tol is not None and not _checks.is_non_negative_number(self.tol):
            raise ValueError(f"`tol` must be a non-negative number (relative improvement), or None to run all "
                             f"`n_iter` iterations; got {self.tol!r}.")

    def _validate_hyperparameters(self) -> None:
        self._check_letters()

    def _validate_X(self, X, reset: bool) -> np.ndarray:
        """``X`` as a 2-D NumPy array of the estimator's dtype (sets ``n_features_in_`` when ``reset``)."""
        if self._float_input:
            return validate_data(self, X, reset=reset, dtype=float_dtype(), ensure_all_finite="allow-nan")
        X = validate_data(self, X, reset=reset, dtype=None)
        if not np.issubdtype(X.dtype, np.integer):
            if not (np.issubdtype(X.dtype, np.floating) and np.all(np.isfinite(X)) and np.all(X == np.floor(X))):
                raise ValueError(f"`X` of {type(self).__name__} must hold integers; got {X.dtype} values.")
        if np.any(X < 0):
            raise ValueError(f"`X` of {type(self).__name__} must be non-negative; got min {X.min()}.")
        return X.astype(np.int64 if float_dtype() == np.float64 else np.int32)

    def _emission_rows(self, X: np.ndarray) -> np.ndarray:
        """The ssmjax emissions of the steps of ``X`` (one row per step)."""
        return X

    def _batch(self, X, lengths, reset: bool = False):
        """``(X, padded emissions (B, T, ...), lengths (B,))`` of hmmlearn-style input."""
        X = self._validate_X(X, reset=reset)
        lengths = check_lengths(lengths, X.shape[0])
        return X, pad(self._emission_rows(X), lengths), lengths

    def _fitted_model(self):
        check_is_fitted(self)
        return self.model_

    # --------------------------------------------------------------------- fit
    def _fit(self, X, lengths):
        """Initialise (``init_params``), then run :func:`ssmjax.fit_em` with the parameters left out
        of ``params`` frozen."""
        self._validate_hyperparameters()
        X, emissions, lengths = self._batch(X, lengths, reset=True)
        previous = self._read_parameters(self.model_) if "model_" in self.__dict__ else {}
        pending = self.__dict__.pop("_pending_parameters", {})
        parameters = {}
        for letter, (name, _) in self._letters.items():
            if letter in self.init_params:
                continue
            if name in pending:
                parameters[name] = pending[name]
            elif name in previous:
                parameters[name] = previous[name]
            else:
                raise ValueError(
                    f"`{name}` must be set before fit: init_params={self.init_params!r} leaves out {letter!r}, "
                    f"so fit starts from the `{name}` you give."
                )
        if self.init_params:
            initial = self._initial_parameters(emissions, lengths, jax_key(self.random_state))
            parameters.update({name: initial[name] for letter, (name, _) in self._letters.items()
                               if letter in self.init_params})
        start = self._build_model(parameters)
        frozen = tuple(frozen for letter, (_, frozen) in self._letters.items() if letter not in self.params)
        fitted, log_likelihoods, info = ssmjax.fit_em(
            start, emissions, lengths=lengths, max_iters=int(self.n_iter), tol=None if self.tol is None else float(self.tol),
            frozen=frozen, prior=self._prior(),
        )
        self.model_ = fitted
        self.log_likelihoods_ = np.asarray(log_likelihoods)
        self.n_iter_ = info.num_iters
        self.converged_ = info.converged
        self.fit_status_ = info.status
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = self._float_input  # NaN is a missing entry, as everywhere in ssmjax
        tags.target_tags.required = False
        return tags


def as_array(value: Any, dtype=None) -> np.ndarray:
    """A NumPy copy of a JAX or NumPy array (``dtype``: JAX's default float unless given)."""
    return np.array(value, dtype=float_dtype() if dtype is None else dtype)
