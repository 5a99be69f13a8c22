"""ssmjax: exact, fast, differentiable state-space models in JAX.

This file is the whole public API: it only re-exports. Conventions (axis names,
time indexing, what ``length`` does) are stated once in :mod:`ssmjax._types`.
"""

from . import datasets as datasets
from ._checks import set_value_checks as set_value_checks
from ._checks import value_checks as value_checks
from ._checks import value_checks_enabled as value_checks_enabled

# --- discrete hidden Markov models: inference (ssmjax/_hmm) ---
from ._hmm.inference import HMMFilterResult as HMMFilterResult
from ._hmm.inference import HMMPosterior as HMMPosterior
from ._hmm.inference import HMMStrategy as HMMStrategy
from ._hmm.inference import hmm_strategy as hmm_strategy
from ._hmm.inference import hmm_filter as hmm_filter
from ._hmm.inference import hmm_smoother as hmm_smoother
from ._hmm.inference import hmm_two_slice_marginals as hmm_two_slice_marginals
from ._hmm.inference import hmm_viterbi as hmm_viterbi
from ._hmm.inference import hmm_sample_posterior as hmm_sample_posterior
from ._hmm.inference import hmm_fixed_lag_smoother as hmm_fixed_lag_smoother
from ._hmm.inference import hmm_predict as hmm_predict
from ._hmm.model import HMM as HMM
from ._hmm.input_driven import InputDrivenHMM as InputDrivenHMM
from ._hmm.priors import BetaPrior as BetaPrior
from ._hmm.priors import DirichletPrior as DirichletPrior
from ._hmm.priors import GammaPrior as GammaPrior
from ._hmm.priors import GaussianMixturePrior as GaussianMixturePrior
from ._hmm.priors import GaussianPrior as GaussianPrior
from ._hmm.priors import HMMPrior as HMMPrior
from ._hmm.selection import NumStatesSelection as NumStatesSelection
from ._hmm.selection import select_num_states as select_num_states

# --- fitting (ssmjax/_fit) ---
from ._fit.em import EMInfo as EMInfo
from ._fit.em import fit_em as fit_em
from ._fit.em import fit_em_restarts as fit_em_restarts
from ._fit.protocol import AbstractFittableModel as AbstractFittableModel
from ._fit.sgd import fit_sgd as fit_sgd

# --- linear-Gaussian state-space models: inference (ssmjax/_lgssm) ---
from ._lgssm.model import LGSSM as LGSSM
from ._lgssm.inference import KalmanFilterResult as KalmanFilterResult
from ._lgssm.inference import RTSSmootherResult as RTSSmootherResult
from ._lgssm.inference import LGSSMForecastResult as LGSSMForecastResult
from ._lgssm.inference import kalman_filter as kalman_filter
from ._lgssm.inference import rts_smoother as rts_smoother
from ._lgssm.inference import lgssm_sample_posterior as lgssm_sample_posterior
from ._lgssm.inference import lgssm_sample as lgssm_sample
from ._lgssm.inference import lgssm_forecast as lgssm_forecast
from ._lgssm.inference import lgssm_strategy as lgssm_strategy
from ._lgssm.online import KalmanPredictResult as KalmanPredictResult
from ._lgssm.online import KalmanUpdateResult as KalmanUpdateResult
from ._lgssm.online import kalman_predict as kalman_predict
from ._lgssm.online import kalman_update as kalman_update
from ._lgssm.strategy import KalmanStrategy as KalmanStrategy
from ._lgssm.joint import lgssm_log_joint as lgssm_log_joint
from ._lgssm.joint import lgssm_posterior_entropy as lgssm_posterior_entropy

# --- emission models and Markov chains ---
from ._hmm.emissions import AbstractEmissions as AbstractEmissions
from ._hmm.emissions import AbstractExponentialFamilyEmissions as AbstractExponentialFamilyEmissions
from ._hmm.emissions import BernoulliEmissions as BernoulliEmissions
from ._hmm.emissions import CategoricalEmissions as CategoricalEmissions
from ._hmm.emissions import AbstractGaussianEmissions as AbstractGaussianEmissions
from ._hmm.emissions import GammaEmissions as GammaEmissions
from ._hmm.emissions import DiagonalGaussianEmissions as DiagonalGaussianEmissions
from ._hmm.emissions import GaussianEmissions as GaussianEmissions
from ._hmm.emissions import NoClosedFormMStepError as NoClosedFormMStepError
from ._hmm.emissions import GaussianMixtureEmissions as GaussianMixtureEmissions
from ._hmm.emissions import KnownStateEmissions as KnownStateEmissions
from ._hmm.emissions import MultinomialEmissions as MultinomialEmissions
from ._hmm.emissions import PoissonEmissions as PoissonEmissions
from ._hmm.emissions import LinearRegressionEmissions as LinearRegressionEmissions
from ._hmm.emissions import AutoregressiveEmissions as AutoregressiveEmissions
from ._hmm.emissions import PoissonRegressionEmissions as PoissonRegressionEmissions
from ._hmm.emissions import BernoulliRegressionEmissions as BernoulliRegressionEmissions
from ._hmm.emissions import ProductEmissions as ProductEmissions
from ._hmm.emissions import SphericalGaussianEmissions as SphericalGaussianEmissions
from ._hmm.emissions import StudentTEmissions as StudentTEmissions
from ._hmm.emissions import TiedGaussianEmissions as TiedGaussianEmissions
from ._markov import MarkovChain as MarkovChain
from ._markov import markov_transition_counts as markov_transition_counts

# --- batches of sequences of different lengths ---
from ._padding import pad as pad
from ._padding import unpad as unpad

# --- saving and loading ---
from ._io import load as load
from ._io import load_metadata as load_metadata
from ._io import save as save

__version__ = "0.1.0"
