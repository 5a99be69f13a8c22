"""ssmjax: exact, fast, differentiable state-space models in JAX.

This file is the whole public API: it only re-exports. Conventions (axis names,
time indexing, what ``length`` does) are stated once in :mod:`ssmjax._types`.
"""

from . import datasets as datasets
from ._checks import set_value_checks as set_value_checks
from ._checks import value_checks as value_checks
from ._checks import value_checks_enabled as value_checks_enabled

# --- discrete hidden Markov models: inference (ssmjax/_hmm) ---

# --- linear-Gaussian state-space models: inference (ssmjax/_lgssm) ---

__version__ = "0.1.0"
