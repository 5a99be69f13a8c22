"""Axis glossary and array aliases shared by the whole package.

Every shape annotation in ssmjax uses the same axis names:

=============  ==============================================================
``T``          time steps of one sequence (``"T-1"``: pairwise quantities)
``T_minus_1``  the same ``T - 1`` in an argument, where jaxtyping cannot compute it
``K``          discrete states of a hidden Markov model (``K_plus_1``: with a start state)
``C``          categories of a categorical emission
``Dx``         latent (state) dimension of a linear-Gaussian model
``Dy``         emission (observation) dimension
``Du``         input (control) dimension
``D``          emission dimension of an HMM emission model
``P``          covariates of a regression emission (inputs, or lagged emissions)
``M``          components of a mixture
``N``          pooled steps (every real step of a batch, in one axis)
``B``          batch of sequences
``R``          restarts of :func:`ssmjax.fit_em_restarts`
``H``          forecast horizon (``num_steps``)
``iters``      EM iterations run (``max_iters``: as many as allowed)
=============  ==============================================================

Public signatures carry these shapes (jaxtyping). The test run checks every annotated
function through jaxtyping's import hook, except the public entry points, which validate
their own arguments (a ``ValueError`` naming the argument, Python lists accepted) and are
marked ``@typing.no_type_check`` so that the hook does not pre-empt those errors; their
annotations are checked against the documented examples instead (``tests/signatures.py``).

Time convention (stated once, linked from every docstring): time is 0-based in
arrays. For an HMM, ``transition_matrix[i, j] = p(z_{t+1} = j | z_t = i)``; a
time-varying one has shape ``(T-1, K, K)`` and entry ``t`` moves ``z_t`` to
``z_{t+1}``. ``log_likelihoods[t, k] = log p(y_t | z_t = k)``.

``length`` (an int, possibly traced) marks steps ``t >= length`` as padding:
they contribute nothing to the log-likelihood, to posteriors at real steps, or
to gradients, whatever they contain (NaN and inf included). Outputs at padded
steps are finite and documented per function.

Precision: every function runs in the precision of its inputs. In float32 the results
agree with float64 to about ``1e-5`` relative to the largest entry (probabilities to
``1e-4`` absolute), for log-likelihoods up to the float32 range, ``K`` up to 64 and
``T`` up to ``10^5``, and covariances with condition numbers up to ``1e7`` (tested in
``tests/test_extremes.py``; measured per function in ``benchmarks/float32.py``). One
case needs care: an initial covariance far larger than the emission noise (a
near-diffuse prior). The default ``method="auto"`` then takes the square-root form,
and the smoother warns where even that loses the first steps' covariances; an exact
diffuse prior (``LGSSM(..., diffuse=True)``) or float64 avoids the problem.
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Scalar

Scalarish = Union[int, float, ArrayLike]
LengthLike = Union[int, Int[ArrayLike, ""], None]

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "PRNGKeyArray",
    "Scalar",
    "Scalarish",
    "LengthLike",
    "jax",
    "np",
]
