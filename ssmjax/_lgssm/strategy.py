r"""Which path an LGSSM inference call takes, and why: decided here, once.

:func:`select_strategy` chooses, from shapes, options and (where concrete) the data, a
:class:`KalmanStrategy`: the schedule (``"sequential"``, ``"steady-state"`` or
``"parallel"``), the form (``"covariance"`` or ``"sqrt"``), the linear-algebra ops
(``"small"``: unrolled elementwise, or ``"general"``: BLAS/LAPACK, see
:mod:`ssmjax._lgssm.small`) and the masking below, each with the reason it was chosen.
:func:`ssmjax.lgssm_strategy` shows it; ``strategy=`` of :func:`ssmjax.kalman_filter` and
:func:`ssmjax.rts_smoother` forces one. Two rare cases are decided at run time, inside the
compiled program, and need no choice: a steady-state recursion that does not settle falls
back to the full one (:mod:`ssmjax._lgssm.steady`), and ``"auto"`` masking below.

**Masking**: how missing entries and padding reach the covariance recursions.

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

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._fallback import _any_in_batch
from .small import SMALL_MAX_DX, SMALL_MAX_DY, choose_ops

SCHEDULES = ("sequential", "steady-state", "parallel")
FORMS = ("covariance", "sqrt")
OPS = ("small", "general")
MASKINGS = ("observed", "masked", "auto")

# Entries stored per transient of the steady-state path (the start of the filter, the end of the
# smoother's adjoint); sequences at most this long take the full recursion.
TRANSIENT_STEPS = 512

# Below this state dimension the full recursion is a few fused kernels per step and beats the
# steady-state path's two mean scans (measured with T = 10^3 and 10^4, float32, 2-core CPU:
# (2, 1) full 0.20 / 0.88 ms against 0.49 / 1.07 ms; (3, 1) full 1.44 / 13.98 ms against
# 0.46 / 1.33 ms).
MIN_STATE_DIM = 3

# Ratios of the initial covariance to the emission noise (their largest eigenvalues) from
# which float32 needs the square-root form, and from which even that loses the first smoothed
# covariances (see choose_form).
ROBUST_PRIOR_RATIO = 100.0
DIFFUSE_PRIOR_RATIO = 1e4


class KalmanStrategy(eqx.Module):
    """The path of an LGSSM inference call: what :func:`ssmjax.lgssm_strategy` returns and what
    ``strategy=`` of :func:`ssmjax.kalman_filter` / :func:`ssmjax.rts_smoother` takes.

    Attributes:
        schedule: ``"sequential"`` (one ``lax.scan``), ``"steady-state"`` (covariances only
            until they settle, time-invariant models) or ``"parallel"`` (``lax.associative_scan``).
        form: ``"covariance"`` or ``"sqrt"`` (Cholesky factors propagated by QR).
        ops: ``"small"`` (unrolled elementwise) or ``"general"`` (BLAS/LAPACK).
        masking: ``"observed"``, ``"masked"`` or ``"auto"`` (see :mod:`ssmjax._lgssm.strategy`).
        reasons: why each was chosen (empty for a strategy built by hand).

    Example:
        >>> import ssmjax
        >>> chosen = ssmjax.KalmanStrategy(schedule="sequential", form="sqrt", ops="general", masking="masked")
        >>> chosen.schedule, chosen.reasons
        ('sequential', ())
    """

    schedule: str = eqx.field(static=True)
    form: str = eqx.field(static=True)
    ops: str = eqx.field(static=True)
    masking: str = eqx.field(static=True)
    reasons: tuple[str, ...] = eqx.field(static=True, default=())

    def __check_init__(self):
        for name, allowed in (("schedule", SCHEDULES), ("form", FORMS), ("ops", OPS), ("masking", MASKINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}; got {getattr(self, name)!r}.")
        if self.schedule != "sequential" and self.form != "covariance":
            raise ValueError(f"the {self.schedule!r} schedule supports form='covariance' only; got form={self.form!r}.")
        if self.form == "sqrt" and self.ops == "small":
            raise ValueError("form='sqrt' runs on ops='general' only (its QR steps are LAPACK calls); got ops='small'.")


def _time_invariant(model) -> bool:
    return all(getattr(model, n).ndim == 2 for n in ("transition_matrix", "transition_cov", "emission_matrix", "emission_cov"))


def steady_state_applies(model, num_timesteps: int, method: str, transient_steps: int = TRANSIENT_STEPS) -> bool:
    """Whether the steady-state schedule is chosen (static: shapes and options only)."""
    return (
        method == "standard"
        and _time_invariant(model)
        and model.transition_matrix.shape[-1] >= MIN_STATE_DIM
        and num_timesteps > transient_steps
    )


def prior_to_noise_ratio(model) -> "float | None":
    r""":math:`\lambda_{\max}(P_0) / \lambda_{\max}(R)`, how far the initial covariance dwarfs the emission
    noise, of a concrete model held in single (or lower) precision; ``None`` for float64 or traced
    models, whose form is not chosen by it."""
    p0, r = model.initial_cov, model.emission_cov
    if jnp.finfo(p0.dtype).bits > 32 or isinstance(p0, jax.core.Tracer) or isinstance(r, jax.core.Tracer):
        return None
    p0, r = np.asarray(p0, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.eigvalsh(p0)[-1] / np.max(np.linalg.eigvalsh(r)))


def choose_form(model, method: str, parallel: bool, smoother: bool) -> tuple[str, str]:
    """``(form, reason)``: ``method="auto"`` takes the square-root form for a float32 model whose
    initial covariance is :data:`ROBUST_PRIOR_RATIO` times its emission noise or more. The
    covariance form loses accuracy there: measured (``benchmarks/float32.py``, Dx = 4, T = 10^3),
    smoothed covariances off by 5.5e-4 at a ratio of 200 and 3.6e-2 at 2000, against 6.5e-6 and
    1.4e-4 in the square-root form. Where the form cannot follow (``parallel=True``, an explicit
    ``method="standard"``), or where even the square-root smoother loses the first steps'
    covariances (a ratio of :data:`DIFFUSE_PRIOR_RATIO` or more), a warning says so."""
    ratio = prior_to_noise_ratio(model)
    risky = ratio is not None and ratio >= ROBUST_PRIOR_RATIO
    if method == "auto":
        method = "sqrt" if risky and not parallel else "standard"
        why = (f"method='auto', float32 with initial_cov {ratio:.2g} times the emission noise" if method == "sqrt"
               else "method='auto'")
    else:
        why = f"method={method!r}"
    form = "sqrt" if method == "sqrt" else "covariance"
    if risky and form == "covariance":
        warnings.warn(
            f"float32 model with an initial covariance {ratio:.2g} times its emission noise: the covariance "
            f"form{' of the parallel schedule' if parallel else ''} loses accuracy here (smoothed covariances "
            "first). Use method='sqrt' on the sequential schedule, or float64.", RuntimeWarning, stacklevel=5)
    elif smoother and ratio is not None and ratio >= DIFFUSE_PRIOR_RATIO:
        warnings.warn(
            f"float32 model with an initial covariance {ratio:.2g} times its emission noise: even the square-root "
            "smoother loses accuracy in the first steps' covariances. Use float64 (or, for a prior meant to be "
            "flat, an exact diffuse one: LGSSM(..., diffuse=True)).", RuntimeWarning, stacklevel=5)
    return form, f"form {form!r}: {why}"


def select_strategy(model, emissions, length, method: str, parallel: bool, smoother: bool = False) -> KalmanStrategy:
    """The strategy of a call with validated arguments (see the module doc)."""
    dx, dy = model.emission_matrix.shape[-1], model.emission_matrix.shape[-2]
    num_timesteps = emissions.shape[0]
    form, why = choose_form(model, method, parallel, smoother)
    method = "sqrt" if form == "sqrt" else "standard"
    reasons = [why]
    if form == "sqrt":
        ops = "general"
        reasons.append("ops 'general': the square-root form's QR and triangular solves are LAPACK calls")
    else:
        ops = choose_ops(dx, dy).name
        reasons.append(
            f"ops {ops!r}: (Dx, Dy) = ({dx}, {dy}) "
            + ("within" if ops == "small" else "beyond") + f" ({SMALL_MAX_DX}, {SMALL_MAX_DY})"
        )
    if parallel and getattr(model, "diffuse", ()):
        schedule = "sequential"
        reasons.append("schedule 'sequential': parallel=True, but the exact diffuse recursion is sequential")
    elif parallel:
        schedule = "parallel"
        reasons.append("schedule 'parallel': parallel=True")
    elif steady_state_applies(model, num_timesteps, method):
        schedule = "steady-state"
        reasons.append(
            f"schedule 'steady-state': time-invariant A, Q, C, R, Dx >= {MIN_STATE_DIM}, T = {num_timesteps} > {TRANSIENT_STEPS}"
        )
    else:
        schedule = "sequential"
        why = []
        if method != "standard":
            why.append("form 'sqrt'")
        if not _time_invariant(model):
            why.append("time-varying A, Q, C or R")
        if dx < MIN_STATE_DIM:
            why.append(f"Dx = {dx} < {MIN_STATE_DIM}")
        if num_timesteps <= TRANSIENT_STEPS:
            why.append(f"T = {num_timesteps} <= {TRANSIENT_STEPS}")
        reasons.append("schedule 'sequential': " + ", ".join(why))
    if schedule == "parallel":
        masking = "masked"
        reasons.append("masking 'masked': the parallel form masks per sequence")
    else:
        masking = choose_masking(emissions, length)
        reasons.append(
            {
                "observed": "masking 'observed': no missing entry, no padding",
                "masked": "masking 'masked': missing entries or padding",
                "auto": "masking 'auto': traced data, decided at run time (covariances once per batch unless "
                "some sequence has missing entries or padding)",
            }[masking]
        )
    return KalmanStrategy(schedule, form, ops, masking, tuple(reasons))


def check_forced(chosen, model, emissions, length) -> KalmanStrategy:
    """A strategy given as ``strategy=``, checked against the call (``ValueError`` if it cannot run it)."""
    if not isinstance(chosen, KalmanStrategy):
        raise ValueError(f"`strategy` must be an ssmjax.KalmanStrategy or None; got {type(chosen).__name__}.")
    if chosen.schedule == "steady-state":
        if not _time_invariant(model):
            raise ValueError("the 'steady-state' schedule needs time-invariant A, Q, C, R; the model has a time axis.")
        if emissions.shape[0] <= TRANSIENT_STEPS:
            raise ValueError(f"the 'steady-state' schedule needs T > {TRANSIENT_STEPS}; got T = {emissions.shape[0]}.")
    if chosen.masking == "observed" and chosen.schedule != "parallel":
        found = choose_masking(emissions, length)
        if found != "observed":
            raise ValueError(
                "masking 'observed' needs concrete emissions with no missing entry and no padding; "
                f"these call for {found!r}."
            )
    return chosen


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
