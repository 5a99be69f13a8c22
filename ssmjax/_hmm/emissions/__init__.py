r"""Emission models for discrete-state hidden Markov models.

An emission model holds, for each of ``K`` hidden states, a distribution
:math:`p(y_t \mid z_t = k)` over one time step's emission :math:`y_t`. Its one
job in inference is to turn a sequence of emissions into the ``(T, K)`` matrix
``log_likelihoods[t, k] = log p(y_t | z_t = k)`` that :func:`ssmjax.hmm_filter`
and friends take (time convention: :mod:`ssmjax._types`).

The interface (:class:`AbstractEmissions`) is small so users can add families;
families with summable sufficient statistics and a closed-form maximiser
subclass :class:`AbstractExponentialFamilyEmissions`, which gives them
:meth:`~AbstractEmissions.m_step` for expectation-maximisation (EM).

Storage is unconstrained (STYLE §6): categorical ``logits``, Poisson
``log_rates``, Gaussian ``means`` with Cholesky factors ``chol_covs`` (:class:`GaussianEmissions`) or
``log_variances`` (:class:`DiagonalGaussianEmissions`). Any array value of those fields is a valid model,
so gradient-based fitting (optax) needs no bijectors. Constructors take the
constrained values (``probs``, ``rates``, ``covs``) and validate them; the
constrained views are read back through properties of the same names.
"""

from .base import AbstractEmissions as AbstractEmissions
from .base import AbstractExponentialFamilyEmissions as AbstractExponentialFamilyEmissions
from .base import NoClosedFormMStepError as NoClosedFormMStepError
from .base import softmax_rows as softmax_rows
from .bernoulli import BernoulliEmissions as BernoulliEmissions
from .bernoulli import BernoulliStats as BernoulliStats
from .categorical import CategoricalEmissions as CategoricalEmissions
from .categorical import CategoricalStats as CategoricalStats
from .gamma import GammaEmissions as GammaEmissions
from .gamma import GammaStats as GammaStats
from .gaussian import AbstractGaussianEmissions as AbstractGaussianEmissions
from .gaussian import DiagonalGaussianEmissions as DiagonalGaussianEmissions
from .gaussian import GaussianEmissions as GaussianEmissions
from .gaussian import GaussianStats as GaussianStats
from .gaussian import SphericalGaussianEmissions as SphericalGaussianEmissions
from .gaussian import TiedGaussianEmissions as TiedGaussianEmissions
from .labels import KnownStateEmissions as KnownStateEmissions
from .mixture import GaussianMixtureEmissions as GaussianMixtureEmissions
from .mixture import GaussianMixtureStats as GaussianMixtureStats
from .multinomial import MultinomialEmissions as MultinomialEmissions
from .multinomial import MultinomialStats as MultinomialStats
from .poisson import PoissonEmissions as PoissonEmissions
from .regression import AutoregressiveEmissions as AutoregressiveEmissions
from .regression import LinearRegressionEmissions as LinearRegressionEmissions
from .regression import RegressionStats as RegressionStats
from .glm import BernoulliRegressionEmissions as BernoulliRegressionEmissions
from .glm import GLMStats as GLMStats
from .glm import PoissonRegressionEmissions as PoissonRegressionEmissions
from .product import ProductEmissions as ProductEmissions
from .product import ProductStats as ProductStats
from .student_t import StudentTEmissions as StudentTEmissions
from .student_t import StudentTStats as StudentTStats
from .poisson import PoissonStats as PoissonStats

__all__ = [
    "AbstractEmissions",
    "AbstractExponentialFamilyEmissions",
    "NoClosedFormMStepError",
    "BernoulliEmissions",
    "CategoricalEmissions",
    "GammaEmissions",
    "AbstractGaussianEmissions",
    "GaussianEmissions",
    "DiagonalGaussianEmissions",
    "SphericalGaussianEmissions",
    "TiedGaussianEmissions",
    "GaussianMixtureEmissions",
    "KnownStateEmissions",
    "MultinomialEmissions",
    "PoissonEmissions",
    "LinearRegressionEmissions",
    "AutoregressiveEmissions",
    "PoissonRegressionEmissions",
    "BernoulliRegressionEmissions",
    "ProductEmissions",
    "StudentTEmissions",
    "BernoulliStats",
    "CategoricalStats",
    "GammaStats",
    "GaussianStats",
    "GaussianMixtureStats",
    "MultinomialStats",
    "PoissonStats",
    "RegressionStats",
    "GLMStats",
    "ProductStats",
    "StudentTStats",
]
