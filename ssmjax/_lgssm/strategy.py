r"""How missing entries and padding reach the Kalman covariance recursions: decided here, once.

The covariance recursions (:mod:`ssmjax._lgssm.step`) read the model and, through the mask
of observed entries and the padding (``length``), the observation pattern, but never the
data. Two maskings compute the same results:

* ``"observed"``: every entry observed and every step real. The mask is then a constant,
  so under ``jax.vmap`` with a shared model the covariances, gains and Cholesky factors
  are computed once for the whole batch and only the means per sequence (as in a
  hand-written batched filter).
* ``"masked"``: per-sequence masks, exact for any pattern of missing entries and any
  ``length``; under ``jax.vmap`` every sequence carries its own covariances.

:func:`choose_masking` picks one where the data are concrete (an eager call: checked on
the host). Where they are traced (inside ``jax.jit``, ``jax.vmap`` or ``jax.grad``) it
returns ``"auto"``, decided at run time: ``"observed"`` unless some sequence of the batch
has a missing entry at a real step or padding (:func:`ssmjax._fallback._any_in_batch`
keeps that predicate unbatched, so the conditional stays a conditional under
``jax.vmap``). The full recursion does so in :func:`run_masked_or_observed`; the
steady-state path (:func:`ssmjax._lgssm.steady.run`) folds the choice into its own
fallback, so that a program holds two copies of the recursion, not four.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._fallback import _any_in_batch

MASKINGS = ("observed", "masked", "auto")


def _concrete(x) -> bool:
    return x is None or not isinstance(x, jax.core.Tracer)


def choose_masking(emissions, length) -> str:
    """``"observed"`` or ``"masked"`` for concrete arguments, ``"auto"`` for traced ones."""
    if not (_concrete(emissions) and _concrete(length)):
        return "auto"
    return "masked" if bool(needs_mask(np, np.asarray(emissions), None if length is None else np.asarray(length))) else "observed"


def needs_mask(xp, emissions, length):
    """Whether a missing entry sits at a real step, or the sequence is padded."""
    num_timesteps = emissions.shape[0]
    missing = xp.isnan(emissions)
    if length is None:
        return xp.any(missing)
    real = xp.arange(num_timesteps) < length
    return xp.any(missing & real[:, None]) | (length < num_timesteps)


def run_masked_or_observed(masking: str, run, model, emissions, inputs, length):
    """``run(model, emissions, inputs, length, observed)`` with the masking chosen as the module says.

    ``observed=True`` calls get ``length=None``: it is only taken where no step is padded.
    """
    if masking == "observed":
        return run(model, emissions, inputs, None, True)
    if masking == "masked":
        return run(model, emissions, inputs, length, False)
    if masking != "auto":
        raise ValueError(f"`masking` must be one of {MASKINGS}; got {masking!r}.")
    needed = _any_in_batch(needs_mask(jnp, emissions, length))
    return lax.cond(
        needed,
        lambda m, y, u, n: run(m, y, u, n, False),
        lambda m, y, u, n: run(m, y, u, None, True),
        model, emissions, inputs, length,
    )
