"""scikit-learn estimators on ssmjax's models, for users coming from hmmlearn and pykalman.

``GaussianHMM(n_components=3).fit(X, lengths).predict(X, lengths)``: hmmlearn's classes, arguments,
fitted attributes (``startprob_``, ``transmat_``, ``means_``, ``covars_``, ...) and data layout
(every sequence of ``X`` one after the other, ``lengths`` saying where each ends), with ssmjax's
compiled EM (:func:`ssmjax.fit_em`) and inference underneath; the fitted ssmjax model is
``model_``. ``params`` and ``init_params`` take hmmlearn's letters: a parameter left out of
``params`` is frozen (``fit_em(..., frozen=...)``), one left out of ``init_params`` starts from
the value you set as an attribute before ``fit``. Arrays come back in JAX's default float
(float64 with ``jax_enable_x64``, else float32). Needs scikit-learn.

Differences from hmmlearn: ``tol`` is a relative improvement (ssmjax's), not an absolute one;
``min_covar`` is added to every covariance EM computes, not only to the initial ones; the
initial parameters come from ssmjax's ``from_data`` initialisers; a NaN entry of a real-valued
``X`` is a missing value; ``log_likelihoods_`` holds the log posterior when a prior is set.

scikit-learn's ``check_estimator``: these are unsupervised sequence models whose ``fit`` takes
``(X, lengths)``, not ``(X, y)``, so the checks that pass a target as the second argument
(reading it as ``lengths``), those written for classifiers, regressors or transformers, and those
that need ``fit`` to accept a single sample are skipped; tests/test_estimators.py runs the rest
and lists each skipped check with its reason.
"""

try:
    import sklearn as _sklearn  # noqa: F401
except ImportError as _error:
    raise ImportError("ssmjax.estimators needs scikit-learn: pip install 'ssmjax[sklearn]'") from _error

from ._discrete import CategoricalHMM as CategoricalHMM
from ._discrete import MultinomialHMM as MultinomialHMM
from ._discrete import PoissonHMM as PoissonHMM
from ._gaussian import GaussianHMM as GaussianHMM
from ._gaussian import GMMHMM as GMMHMM
from ._lgssm import KalmanSmoother as KalmanSmoother
from ._lgssm import LocalLevel as LocalLevel
