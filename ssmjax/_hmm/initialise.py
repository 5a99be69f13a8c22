"""The data-driven starting models of :meth:`ssmjax.HMM.from_data`, and the names of the built-in
emission families it takes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .. import _checks
from .emissions import (
    AbstractEmissions,
    AutoregressiveEmissions,
    BernoulliEmissions,
    BernoulliRegressionEmissions,
    CategoricalEmissions,
    DiagonalGaussianEmissions,
    GammaEmissions,
    GaussianEmissions,
    GaussianMixtureEmissions,
    LinearRegressionEmissions,
    MultinomialEmissions,
    PoissonEmissions,
    PoissonRegressionEmissions,
    SphericalGaussianEmissions,
    StudentTEmissions,
    TiedGaussianEmissions,
)

# the names HMM.from_data takes for the built-in families
FAMILIES = {
    "poisson": PoissonEmissions,
    "gaussian": GaussianEmissions,
    "gaussian_diag": DiagonalGaussianEmissions,
    "gaussian_spherical": SphericalGaussianEmissions,
    "gaussian_tied": TiedGaussianEmissions,
    "categorical": CategoricalEmissions,
    "bernoulli": BernoulliEmissions,
    "multinomial": MultinomialEmissions,
    "gamma": GammaEmissions,
    "gmm": GaussianMixtureEmissions,
    "student_t": StudentTEmissions,
    "linear_regression": LinearRegressionEmissions,
    "poisson_regression": PoissonRegressionEmissions,
    "bernoulli_regression": BernoulliRegressionEmissions,
    "autoregressive": AutoregressiveEmissions,
}
# the families whose from_data takes (emissions, inputs, num_states): regressions on inputs
INPUT_FAMILIES = (LinearRegressionEmissions, PoissonRegressionEmissions, BernoulliRegressionEmissions)


def from_data(cls, emissions, num_states, emissions_type, *, lengths, inputs, stay_prob, num_classes, num_lags,
              structure, max_jump, key):
    """``cls.from_data``'s model (arguments as documented there)."""
    num_states = _checks.positive_int("num_states", num_states)
    emissions = _checks.host_copy(emissions)
    lengths = None if lengths is None else _checks.host_copy(lengths)
    inputs = None if inputs is None else _checks.host_copy(inputs)
    if emissions.ndim < 2:
        raise ValueError(
            f"`emissions` must be a batch (B, T, ...) of sequences; got shape {emissions.shape}."
        )
    family = FAMILIES.get(emissions_type) if isinstance(emissions_type, str) else emissions_type
    if not (isinstance(family, type) and issubclass(family, AbstractEmissions) and hasattr(family, "from_data")):
        raise ValueError(
            f"`emissions_type` must be one of {sorted(FAMILIES)} or an emission class with a `from_data`; "
            f"got {emissions_type!r}."
        )
    if family in FAMILIES.values():  # the built-in families' steps are symbols (categorical) or vectors
        symbols = family is CategoricalEmissions
        _checks.check_shape(
            "emissions", emissions, ("B", "T") if symbols else ("B", "T", "D"),
            f"a batch of sequences of {'integer symbols' if symbols else 'vectors'} for a {family.__name__} model",
        )
    num_seq, num_timesteps = emissions.shape[:2]
    lengths_np = np.full(num_seq, num_timesteps) if lengths is None else lengths
    mask = np.arange(num_timesteps)[None, :] < lengths_np[:, None]
    pooled = emissions[mask]
    if family is AutoregressiveEmissions:
        emission_model = family.from_data(
            emissions, num_states, num_lags=num_lags, inputs=inputs, lengths=lengths, key=key
        )
    elif family in INPUT_FAMILIES:
        if inputs is None:
            raise ValueError(f"`emissions_type={emissions_type!r}` needs `inputs` (B, T, Du); got None.")
        emission_model = family.from_data(emissions, inputs, num_states, lengths=lengths, key=key)
    elif inputs is not None:
        raise ValueError(f"`inputs` must be None for {family.__name__} (it takes no inputs).")
    elif family is CategoricalEmissions:
        num_classes = int(np.nanmax(pooled)) + 1 if num_classes is None else num_classes
        emission_model = family.from_data(pooled, num_states, num_classes, key=key)
    else:
        emission_model = family.from_data(pooled, num_states, key=key)
    initial, transition = start_log_probs(num_states, structure, max_jump, stay_prob)
    return cls(initial_log_probs=initial, transition_log_probs=transition, emissions=emission_model)


def start_log_probs(num_states: int, structure: str, max_jump: int, stay_prob: float):
    """``from_data``'s starting ``(initial_log_probs, transition_log_probs)``, which do not depend on
    the data: NumPy constants of JAX's default float dtype (the model built from them compiles
    nothing, where a ``log`` and a dtype conversion on the device each compiled a program)."""
    if structure == "ergodic":
        allowed = np.ones((num_states, num_states), bool)
        initial = np.full(num_states, 1.0 / num_states)
    elif structure == "left-right":
        max_jump = _checks.positive_int("max_jump", max_jump)
        steps = np.arange(num_states)[None, :] - np.arange(num_states)[:, None]
        allowed = (steps >= 0) & (steps <= max_jump)
        initial = np.eye(num_states)[0]
    else:
        raise ValueError(f"`structure` must be 'ergodic' or 'left-right'; got {structure!r}.")
    # stay_prob on the diagonal, the rest spread evenly over the allowed moves
    moves = allowed.sum(1, keepdims=True) - 1
    transition = np.where(allowed, (1.0 - stay_prob) / np.maximum(moves, 1), 0.0)
    np.fill_diagonal(transition, np.where(moves[:, 0] > 0, stay_prob, 1.0))
    dtype = np.dtype(jnp.result_type(float))
    with np.errstate(divide="ignore"):  # structural zeros: log-probability -inf
        return np.log(initial).astype(dtype), np.log(transition).astype(dtype)
