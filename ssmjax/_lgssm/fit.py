"""How an :class:`ssmjax.LGSSM` plugs into :func:`ssmjax.fit_em` and :func:`ssmjax.fit_sgd`.

* EM: the E-step is the RTS smoother plus :func:`ssmjax._lgssm.em.expected_stats`;
  the M-step is :func:`ssmjax._lgssm.em.m_step`. EM fits time-invariant models
  (every field without a time axis); time-varying ones are fitted with fit_sgd.
* SGD: the unconstrained view keeps matrices and offsets as they are and maps each
  covariance to its Cholesky factor with a log-diagonal, so every value is a valid
  (positive definite) model. Time-varying fields are fitted per step.

Parameter names (for ``frozen``) are the field names of the model that are not
``None``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._fit.protocol import check_frozen, observed_batch, unpadded_batch
from . import em as _em
from .constraints import _BASE_NDIM, COVARIANCES, fixed_of, free_count, held_whole, structure_of
from .inference import _ops_for, _smoother_diffuse_impl, _smoother_impl, marginal_loglik
from .params import FIELDS
from .validate import _value_check_model


def parameter_names(model) -> tuple[str, ...]:
    return tuple(name for name in FIELDS if getattr(model, name) is not None)


def _is_time_varying(model, name) -> bool:
    value = getattr(model, name)
    return value is not None and value.ndim > _BASE_NDIM[name]


def check_batch(model, emissions, lengths, inputs):
    emissions = _checks.as_float_array("emissions", emissions)
    _checks.check_shape("emissions", emissions, ("B", "T", model.emission_dim), "a padded batch of sequences")
    num_seq, num_timesteps, _ = emissions.shape
    if lengths is None:  # host-built: no eager XLA kernel to compile
        lengths = _checks.to_device(np.full((num_seq,), num_timesteps, np.int32))
    else:
        lengths = _checks.check_lengths(lengths, num_seq, num_timesteps)
    du = model.input_dim
    if du is None:
        if inputs is not None:
            raise ValueError("`inputs` must be None: the model has no input matrices.")
    else:
        if inputs is None:
            raise ValueError(
                f"`inputs` of shape (B, T, {du}) = ({num_seq}, {num_timesteps}, {du}) are required: "
                "the model has input matrices."
            )
        inputs = _checks.as_float_array("inputs", inputs, emissions.dtype)
        _checks.check_shape("inputs", inputs, (num_seq, num_timesteps, du), "(B, T, Du)")
    xp, steps = _checks.host_arrays(lengths)
    real = xp.arange(num_timesteps)[None, :] < steps[:, None]
    emissions = _checks.check_finite("emissions", emissions, real, missing=True)
    if inputs is not None:
        inputs = _checks.check_finite("inputs", inputs, real)
    # the starting model's covariances are user input: check them now
    _check_model_values(model, num_timesteps)
    for name in parameter_names(model):
        value = getattr(model, name)
        if _is_time_varying(model, name):
            needed = num_timesteps - 1 if name.startswith("transition") else num_timesteps
            if value.shape[0] != needed:
                raise ValueError(
                    f"`{name}` is time-varying with {value.shape[0]} steps; the batch has T = "
                    f"{num_timesteps}, so it needs {needed}."
                )
    return emissions, lengths, inputs


def _clearly_valid_covs(model) -> bool:
    """A strict host-side (NumPy) version of the inference functions' covariance checks.

    ``True`` only with a wide margin: finite, symmetric to a tenth of the tolerance,
    and well-conditioned positive (semi-)definite. Anything else goes to the exact
    checks, which raise the ValueError naming the parameter (or let it pass).
    """
    for name, semidefinite in (("initial_cov", False), ("transition_cov", True), ("emission_cov", False)):
        value = getattr(model, name)
        cov = np.asarray(value, np.float64)
        if not np.all(np.isfinite(cov)):
            return False
        rtol = 1e-5 if value.dtype == jnp.float32 else 1e-10
        scale = np.max(np.abs(cov), axis=(-1, -2), keepdims=True)
        if np.any(np.abs(cov - np.swapaxes(cov, -1, -2)) > 0.1 * rtol * scale):
            return False
        eig = np.linalg.eigvalsh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        floor = 0.0 if semidefinite else 1e3 * float(jnp.finfo(value.dtype).eps) * np.max(np.abs(eig))
        if np.any(eig.min(axis=-1) <= floor) and not (semidefinite and np.all(eig >= 0)):
            return False
    return True


def _check_model_values(model, num_timesteps):
    """The covariance checks of the inference functions, as ValueError before any EM work.

    Run op by op, the exact checks compile some forty tiny XLA kernels (longer than
    the EM loop itself on small problems); a strict NumPy pre-check clears the
    usual case, and only a doubtful model goes through them.
    """
    if not _checks.value_checks_enabled() or _clearly_valid_covs(model):
        return
    _value_check_model(model)


def e_step(model, emissions, length, inputs):
    # fit_em validated the batch and knows statically whether it has missing entries (NaN) or
    # padding. Without either, the covariances are computed once for the whole batch, so the
    # steady-state schedule would save one covariance recursion per iteration and cost compile
    # time (measured: B = 50, T = 1000, (4, 2), 20 iterations: first call 2.2 s against 1.0-1.3 s
    # with the sequential schedule, same run time); with them it saves one per sequence.
    observed = observed_batch()
    masking = "observed" if observed and unpadded_batch() else "masked"
    schedule = "sequential" if masking == "observed" else None
    if model.diffuse:
        post = _smoother_diffuse_impl(model, emissions, inputs, length, "standard", _ops_for(model), masking, schedule)
    else:
        post = _smoother_impl(model, emissions, inputs, length, "standard", _ops_for(model), masking, schedule=schedule)
    stats = _em.expected_stats(model, emissions, inputs, length, post, observed=observed)
    return stats, post.marginal_loglik


def num_parameters(model, frozen=()) -> int:
    frozen = check_frozen(model, frozen)
    return int(sum(free_count(model.constraints, n, getattr(model, n)) for n in parameter_names(model)
                   if not _held_whole(model, n, frozen)))


@jax.jit
def _summed_loglik(model, emissions, lengths, inputs):
    run = lambda y, n, u: marginal_loglik(model, y, inputs=u, length=n)  # noqa: E731
    return jnp.sum(jax.vmap(run)(emissions, lengths, inputs))


def batch_loglik(model, emissions, lengths, inputs):
    emissions, lengths, inputs = check_batch(model, emissions, lengths, inputs)
    with _checks.value_checks(False):  # checked above
        return _summed_loglik(model, emissions, lengths, inputs)


def check_em(model, frozen):
    varying = [n for n in parameter_names(model) if _is_time_varying(model, n)]
    if varying:
        raise ValueError(
            f"fit_em fits time-invariant LGSSMs; the field(s) {varying} are time-varying. "
            "Fit time-varying parameters with fit_sgd."
        )


def _held_whole(model, name, frozen=()) -> bool:
    """Fitting leaves ``name`` as it is: frozen, fixed whole, or the initial state of a model with a
    diffuse part (its prior is flat there and given elsewhere)."""
    return (name in frozen or held_whole(model.constraints, name, tuple(getattr(model, name).shape))
            or (bool(model.diffuse) and name in ("initial_mean", "initial_cov")))


def _held(model, frozen):
    """Per field, the mask of entries EM keeps (``fixed``, and whole fields as :func:`_held_whole`)."""
    return {n: fixed_of(model.constraints, n, tuple(getattr(model, n).shape)) | _held_whole(model, n, frozen)
            for n in parameter_names(model)}


def m_step(model, stats, frozen):
    structure = {n: structure_of(model.constraints, n) for n in COVARIANCES}
    new = _em.m_step(model, stats, _held(model, frozen), structure)
    names = list(new)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], model, [new[n] for n in names])


def _chol_to_unconstrained(chol):
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    eye = jnp.eye(chol.shape[-1], dtype=bool)
    return jnp.where(eye, jnp.log(diag)[..., None, :] * eye, jnp.tril(chol))


def _unconstrained_to_cov(u):
    eye = jnp.eye(u.shape[-1], dtype=bool)
    chol = jnp.where(eye, jnp.exp(u), jnp.tril(u))
    return chol @ jnp.swapaxes(chol, -1, -2)


def unconstrained(model):
    """Name -> free values: a full covariance as its Cholesky factor with a log-diagonal, a
    diagonal one as its log-variances, a scalar one as its log-variance; fields held whole by
    ``fixed`` are left out (held entries of the others are read back from ``model``)."""
    params = {}
    for name in parameter_names(model):
        value = getattr(model, name)
        if _held_whole(model, name):
            continue
        kind = structure_of(model.constraints, name)
        if kind == "diagonal":
            held = np.diag(fixed_of(model.constraints, name, tuple(value.shape)))
            variances = jnp.where(held, 1.0, jnp.diagonal(value))  # held variances (maybe 0) stay out
            variances = _checks.check_values(
                variances, ~(variances > 0), f"`{name}` must have positive free variances for gradient fitting."
            )
            params[name] = jnp.log(variances)
        elif kind == "scalar":
            params[name] = jnp.log(value[0, 0])
        elif name in COVARIANCES:
            chol = jnp.linalg.cholesky(0.5 * (value + jnp.swapaxes(value, -1, -2)))
            chol = _checks.check_values(
                chol, ~jnp.isfinite(chol),
                f"`{name}` must be positive definite for gradient fitting "
                "(its Cholesky factor parameterises it); add a small jitter to a singular one.",
            )
            params[name] = _chol_to_unconstrained(chol)
        else:
            params[name] = value
    return params


def from_unconstrained(model, params):
    names = list(params)
    values = []
    for name in names:
        current = getattr(model, name)
        kind = structure_of(model.constraints, name)
        held = fixed_of(model.constraints, name, tuple(current.shape))
        if kind == "diagonal":
            value = jnp.diag(jnp.where(np.diag(held), jnp.diagonal(current), jnp.exp(params[name])))
        elif kind == "scalar":
            value = jnp.exp(params[name]) * jnp.eye(current.shape[-1], dtype=current.dtype)
        elif name in COVARIANCES:
            value = _unconstrained_to_cov(params[name])
        else:
            value = jnp.where(held, current, params[name]) if held.any() else params[name]
        values.append(value)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], model, values)


__all__ = [
    "batch_loglik", "check_batch", "check_em", "e_step", "from_unconstrained", "m_step",
    "num_parameters", "parameter_names", "unconstrained",
]
