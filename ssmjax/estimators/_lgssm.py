r"""Linear-Gaussian state-space estimators: :class:`KalmanSmoother` and :class:`LocalLevel`.

Both wrap :class:`ssmjax.LGSSM` (:math:`x_{t+1} = A x_t + w_t`, :math:`y_t = C x_t + v_t`,
:math:`w_t \sim \mathcal N(0, Q)`, :math:`v_t \sim \mathcal N(0, R)`,
:math:`x_1 \sim \mathcal N(m, P)`) and fit it by :func:`ssmjax.fit_em` (Kalman EM) over
hmmlearn-style ``X`` and ``lengths``. A NaN entry of ``X`` is missing.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

import ssmjax
from ssmjax import _checks

from ._base import BaseStateSpaceEstimator, FittedParameter, as_array, float_dtype, jax_key, unpad
from ._hmm import check_parameter


@eqx.filter_jit
def _smoothed(model, emissions, lengths):
    """Smoothed state means ``(B, T, Dx)`` and log-likelihoods ``(B,)`` of a padded batch."""

    def one(y, n):
        post = model.smoother(y, length=n)
        return post.smoothed_means, post.marginal_loglik

    return jax.vmap(one)(emissions, lengths)


def _covariance(name: str, value, dim: int, semidefinite: bool = False) -> np.ndarray:
    value = check_parameter(name, value, (dim, dim), "a covariance matrix")
    if not np.allclose(value, value.T):
        raise ValueError(f"`{name}` must be symmetric; got {value.tolist()}.")
    smallest = np.linalg.eigvalsh(value).min()
    if smallest < 0 or (smallest == 0 and not semidefinite):
        raise ValueError(f"`{name}` must be positive {'semi-' if semidefinite else ''}definite; "
                         f"got smallest eigenvalue {smallest}.")
    return value


class BaseLGSSMEstimator(BaseStateSpaceEstimator):
    """scikit-learn's interface on an :class:`ssmjax.LGSSM` (abstract)."""

    def fit(self, X, lengths=None):
        """Estimate the parameters by Kalman EM (:func:`ssmjax.fit_em`).

        Parameters named in ``init_params`` are initialised from ``X``; the others start from the
        values you set as attributes. EM updates those named in ``params`` and holds the rest.

        Args:
            X: ``(n_samples, n_features)`` emissions, the sequences one after the other.
            lengths: sequence lengths summing to ``n_samples``; None for one sequence.

        Returns:
            The fitted estimator (``model_``, the parameters, ``n_iter_``, ``converged_``,
            ``fit_status_``, ``log_likelihoods_``).

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import KalmanSmoother
            >>> X = np.cumsum(np.random.default_rng(0).normal(size=(50, 2)), axis=0)
            >>> kf = KalmanSmoother(n_dim_state=2, n_iter=5, random_state=0).fit(X, lengths=[30, 20])
            >>> bool(kf.log_likelihoods_[-1] > kf.log_likelihoods_[0])
            True
        """
        return self._fit(X, lengths)

    def _smooth(self, X, lengths):
        model = self._fitted_model()
        X, emissions, lengths = self._batch(X, lengths)
        with ssmjax.value_checks(False):  # X checked above, the model when it was built
            means, log_likelihoods = _smoothed(model, emissions, lengths)
        return as_array(unpad(means, lengths)), float(np.sum(np.asarray(log_likelihoods)))

    def smooth(self, X, lengths=None) -> np.ndarray:
        """Smoothed state means ``E[x_t | its sequence]``, ``(n_samples, n_dim_state)`` (RTS smoother).

        Args:
            X: ``(n_samples, n_features)``.
            lengths: sequence lengths summing to ``n_samples``, or None.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import KalmanSmoother
            >>> X = np.cumsum(np.random.default_rng(0).normal(size=(50, 2)), axis=0)
            >>> kf = KalmanSmoother(n_dim_state=2, n_iter=5, random_state=0).fit(X, lengths=[30, 20])
            >>> kf.smooth(X, lengths=[30, 20]).shape
            (50, 2)
        """
        return self._smooth(X, lengths)[0]

    def predict(self, X, lengths=None) -> np.ndarray:
        """The smoothed state means (:meth:`smooth`), scikit-learn's name.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import KalmanSmoother
            >>> X = np.cumsum(np.random.default_rng(0).normal(size=(50, 2)), axis=0)
            >>> kf = KalmanSmoother(n_dim_state=2, n_iter=5, random_state=0).fit(X, lengths=[30, 20])
            >>> bool(np.array_equal(kf.predict(X, lengths=[30, 20]), kf.smooth(X, lengths=[30, 20])))
            True
        """
        return self._smooth(X, lengths)[0]

    def score(self, X, lengths=None) -> float:
        """Summed log-likelihood of the sequences of ``X`` (the Kalman filter's).

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import KalmanSmoother
            >>> X = np.cumsum(np.random.default_rng(0).normal(size=(50, 2)), axis=0)
            >>> kf = KalmanSmoother(n_dim_state=2, n_iter=5, random_state=0).fit(X, lengths=[30, 20])
            >>> bool(kf.score(X, lengths=[30, 20]) >= kf.log_likelihoods_[-1])
            True
        """
        return self._smooth(X, lengths)[1]

    def sample(self, n_samples: int = 1, random_state=None):
        """Draw one sequence: ``(X (n_samples, n_features), states (n_samples, n_dim_state))``.

        Args:
            n_samples: its length.
            random_state: seed or ``RandomState``; None uses the estimator's ``random_state``.

        Example:
            >>> import numpy as np
            >>> from ssmjax.estimators import KalmanSmoother
            >>> X = np.cumsum(np.random.default_rng(0).normal(size=(50, 2)), axis=0)
            >>> kf = KalmanSmoother(n_dim_state=2, n_iter=5, random_state=0).fit(X, lengths=[30, 20])
            >>> samples, states = kf.sample(10, random_state=1)
            >>> samples.shape, states.shape
            ((10, 2), (10, 2))
        """
        model = self._fitted_model()
        n_samples = _checks.positive_int("n_samples", n_samples)
        key = jax_key(self.random_state if random_state is None else random_state)
        states, emissions = model.sample(n_samples, key=key)
        return as_array(emissions), as_array(states)


class KalmanSmoother(BaseLGSSMEstimator):
    r"""A linear-Gaussian state-space model fitted by EM, with its smoother as ``predict``.

    Args:
        n_dim_state: state dimension ``Dx``.
        n_iter: maximum number of EM iterations.
        tol: stop once the relative improvement of the log-likelihood is at most ``tol``; None runs
            all ``n_iter`` iterations.
        params: letters of the parameters EM updates: ``A`` transition_matrix, ``Q``
            transition_cov, ``C`` emission_matrix, ``R`` emission_cov, ``m`` initial_mean, ``P``
            initial_cov; the others are frozen.
        init_params: letters of the parameters fit initialises from the data: ``A`` identity,
            ``Q`` 0.1 identity, ``C`` the leading principal axes of ``X`` (random columns beyond
            ``n_features``), ``R`` half of each feature's variance, ``m`` the state whose emission
            is the mean of ``X``, ``P`` identity. Set the others as attributes before fit.
        random_state: seed of the initialisation and of :meth:`sample`.

    Attributes:
        transition_matrix_, transition_cov_: ``(Dx, Dx)``.
        emission_matrix_: ``(Dy, Dx)``.
        emission_cov_: ``(Dy, Dy)``.
        initial_mean_: ``(Dx,)``.
        initial_cov_: ``(Dx, Dx)``.
        model_: the fitted :class:`ssmjax.LGSSM`.

    Example:
        >>> import numpy as np
        >>> from ssmjax.estimators import KalmanSmoother
        >>> X = np.cumsum(np.random.default_rng(0).normal(size=(50, 2)), axis=0)
        >>> kf = KalmanSmoother(n_dim_state=2, n_iter=5, random_state=0).fit(X, lengths=[30, 20])
        >>> kf.smooth(X, lengths=[30, 20]).shape, kf.emission_matrix_.shape
        ((50, 2), (2, 2))
    """

    transition_matrix_ = FittedParameter()
    transition_cov_ = FittedParameter()
    emission_matrix_ = FittedParameter()
    emission_cov_ = FittedParameter()
    initial_mean_ = FittedParameter()
    initial_cov_ = FittedParameter()
    _letters = {
        "A": ("transition_matrix_", "transition_matrix"),
        "Q": ("transition_cov_", "transition_cov"),
        "C": ("emission_matrix_", "emission_matrix"),
        "R": ("emission_cov_", "emission_cov"),
        "m": ("initial_mean_", "initial_mean"),
        "P": ("initial_cov_", "initial_cov"),
    }

    def __init__(self, n_dim_state=1, n_iter=10, tol=1e-6, params="AQCRmP", init_params="AQCRmP",
                 random_state=None):
        self.n_dim_state = n_dim_state
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params
        self.random_state = random_state

    def _validate_hyperparameters(self) -> None:
        _checks.positive_int("n_dim_state", self.n_dim_state)
        super()._validate_hyperparameters()

    def _read_parameters(self, model) -> dict:
        return {name: np.asarray(getattr(model, field)) for name, field in self._letters.values()}

    def _build_model(self, parameters: dict) -> ssmjax.LGSSM:
        dx, dy = self.n_dim_state, self.n_features_in_
        return ssmjax.LGSSM(
            initial_mean=check_parameter("initial_mean_", parameters["initial_mean_"], (dx,), "n_dim_state"),
            initial_cov=_covariance("initial_cov_", parameters["initial_cov_"], dx),
            transition_matrix=check_parameter("transition_matrix_", parameters["transition_matrix_"], (dx, dx),
                                              "n_dim_state x n_dim_state"),
            transition_cov=_covariance("transition_cov_", parameters["transition_cov_"], dx, semidefinite=True),
            emission_matrix=check_parameter("emission_matrix_", parameters["emission_matrix_"], (dy, dx),
                                            "n_features x n_dim_state"),
            emission_cov=_covariance("emission_cov_", parameters["emission_cov_"], dy),
        )

    def _initial_parameters(self, emissions, lengths, key) -> dict:
        dx, dy = self.n_dim_state, emissions.shape[-1]
        rows = emissions[np.arange(emissions.shape[1])[None, :] < lengths[:, None]]
        rows = rows[~np.isnan(rows).any(axis=1)]
        if rows.shape[0] < 2:
            raise ValueError(f"`X` must hold at least 2 fully observed samples to initialise from; got {rows.shape[0]}.")
        mean, cov = rows.mean(axis=0), np.atleast_2d(np.cov(rows.T)) + 1e-6 * np.eye(dy)
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1][: min(dx, dy)]
        emission_matrix = np.zeros((dy, dx))
        emission_matrix[:, : len(order)] = eigvecs[:, order] * np.sqrt(eigvals[order])
        if dx > dy:  # directions the data cannot tell apart yet: small random loadings
            extra = np.asarray(jax.random.normal(key, (dy, dx - dy)), float)
            emission_matrix[:, dy:] = 0.1 * np.sqrt(eigvals.mean()) * extra
        dtype = float_dtype()
        return {
            "transition_matrix_": np.eye(dx, dtype=dtype),
            "transition_cov_": 0.1 * np.eye(dx, dtype=dtype),
            "emission_matrix_": emission_matrix.astype(dtype),
            "emission_cov_": np.diag(0.5 * np.diag(cov)).astype(dtype),
            "initial_mean_": (np.linalg.pinv(emission_matrix) @ mean).astype(dtype),
            "initial_cov_": np.eye(dx, dtype=dtype),
        }


class LocalLevel(BaseLGSSMEstimator):
    r"""The local level model (random walk plus noise) of a 1-D series, fitted by EM.

    .. math::
        \mu_{t+1} = \mu_t + \eta_t,\ \eta_t \sim \mathcal N(0, \sigma^2_\eta), \qquad
        y_t = \mu_t + \varepsilon_t,\ \varepsilon_t \sim \mathcal N(0, \sigma^2_\varepsilon),

    with a diffuse (flat) prior on the first level, handled exactly (``ssmjax.LGSSM(diffuse=True)``),
    so :meth:`score` is the exact diffuse log-likelihood statsmodels reports.

    Args:
        n_iter: maximum number of EM iterations.
        tol: stop once the relative improvement of the log-likelihood is at most ``tol``; None runs
            all ``n_iter`` iterations.
        params: letters of the variances EM updates: ``Q`` level, ``R`` noise.
        init_params: letters of the variances fit initialises from the data (each half the
            variance of the series' first differences); set the others as attributes before fit.
        random_state: seed of :meth:`sample`.

    Attributes:
        level_variance_: :math:`\sigma^2_\eta`, a float.
        noise_variance_: :math:`\sigma^2_\varepsilon`, a float.
        model_: the fitted :class:`ssmjax.LGSSM`.

    Example:
        >>> import ssmjax
        >>> from ssmjax.estimators import LocalLevel
        >>> nile = ssmjax.datasets.load_nile().values[:, None] / 100.0
        >>> ll = LocalLevel(n_iter=200).fit(nile)
        >>> ll.smooth(nile).shape, bool(ll.noise_variance_ > ll.level_variance_)
        ((100, 1), True)
    """

    level_variance_ = FittedParameter()
    noise_variance_ = FittedParameter()
    _letters = {"Q": ("level_variance_", "transition_cov"), "R": ("noise_variance_", "emission_cov")}
    _held = ("transition_matrix", "emission_matrix", "initial_mean", "initial_cov")

    def __init__(self, n_iter=100, tol=1e-6, params="QR", init_params="QR", random_state=None):
        self.n_iter = n_iter
        self.tol = tol
        self.params = params
        self.init_params = init_params
        self.random_state = random_state

    def _validate_X(self, X, reset):
        X = super()._validate_X(X, reset)
        if X.shape[1] != 1:
            raise ValueError(f"`X` of LocalLevel must have shape (n_samples, 1), one series; got shape {X.shape}.")
        return X

    def _read_parameters(self, model) -> dict:
        return {"level_variance_": np.asarray(model.transition_cov)[0, 0],
                "noise_variance_": np.asarray(model.emission_cov)[0, 0]}

    def _build_model(self, parameters: dict) -> ssmjax.LGSSM:
        level = check_parameter("level_variance_", parameters["level_variance_"], (), "a variance")
        noise = check_parameter("noise_variance_", parameters["noise_variance_"], (), "a variance")
        if level < 0 or noise <= 0:
            raise ValueError(f"`level_variance_` must be >= 0 and `noise_variance_` > 0; got {level} and {noise}.")
        one = np.ones((1, 1), float_dtype())
        return ssmjax.LGSSM(initial_mean=np.zeros(1, float_dtype()), initial_cov=one, transition_matrix=one,
                            transition_cov=level * one, emission_matrix=one, emission_cov=noise * one,
                            fixed={name: True for name in self._held}, diffuse=True)

    def _initial_parameters(self, emissions, lengths, key) -> dict:
        steps = np.arange(emissions.shape[1])[None, :] < lengths[:, None]
        differences = np.diff(np.where(steps[..., None], emissions, np.nan), axis=1)
        spread = np.nanvar(differences) if np.isfinite(differences).sum() > 1 else np.nanvar(emissions[steps])
        variance = np.asarray(max(float(spread), 1e-6) / 2.0, float_dtype())
        return {"level_variance_": variance, "noise_variance_": variance}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.one_d_array = False
        return tags
