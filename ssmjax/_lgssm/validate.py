"""Argument checks shared by every LGSSM inference function: shapes (``ValueError`` at trace time)
and values (covariances positive definite, every other field finite: value checks, also under
``jax.jit``)."""

from __future__ import annotations

import equinox as eqx

from .._checks import as_float_array, check_finite, check_length, check_psd, check_shape, host_arrays
from .params import AbstractLGSSM, _field_shapes, model_dims, validate_shapes


def _validate(model, emissions, inputs, length, *, need_inputs_name="inputs"):
    """Shape checks (ValueError) and covariance value checks; returns canonical arguments."""
    if not isinstance(model, AbstractLGSSM):
        raise ValueError(f"`model` must be an ssmjax.LGSSM; got {type(model).__name__}.")
    time_sizes = validate_shapes(model)
    dx, dy, du = model_dims(model)
    y = as_float_array("emissions", emissions)
    meaning = f"T time steps; Dy = {dy} from emission_matrix"
    if y.ndim != 2:
        check_shape("emissions", y, ("T", dy), meaning + "; use jax.vmap for a batch")
    check_shape("emissions", y, ("T", dy), meaning)
    num_timesteps = y.shape[0]
    if num_timesteps < 1:
        raise ValueError("`emissions` must have at least one time step; got shape (0, ...).")
    _check_time_sizes(time_sizes, num_timesteps)
    u = _validate_inputs(model, inputs, num_timesteps, du, "inputs")
    length_arr = check_length(length, num_timesteps)
    real = None
    if length_arr is not None:
        xp, length_host = host_arrays(length_arr)
        real = xp.arange(num_timesteps) < length_host
    y = check_finite("emissions", y, real, missing=True)
    u = None if u is None else check_finite("inputs", u, real)
    model = _value_check_model(model, real)
    return model, y, u, length_arr


def _check_time_sizes(time_sizes, num_timesteps):
    for name, size in time_sizes.items():
        if size is None:
            continue
        expected = num_timesteps - 1 if name.startswith("transition") else num_timesteps
        axis = "T-1" if name.startswith("transition") else "T"
        if size != expected:
            raise ValueError(
                f"`{name}` is time-varying with {size} entries; expected {axis} = {expected} "
                f"entries for emissions of T = {num_timesteps} steps."
            )


def _validate_inputs(model, inputs, num_timesteps, du, name):
    has_input_matrix = model.transition_input_matrix is not None or model.emission_input_matrix is not None
    if has_input_matrix and inputs is None:
        which = [
            n for n in ("transition_input_matrix", "emission_input_matrix") if getattr(model, n) is not None
        ]
        raise ValueError(
            f"the model has {', '.join('`' + w + '`' for w in which)}, so `{name}` of shape "
            f"({num_timesteps}, {du}) (T, Du) is required; got None."
        )
    if not has_input_matrix and inputs is not None:
        raise ValueError(
            f"`{name}` were given but the model has no `transition_input_matrix` or "
            "`emission_input_matrix`; pass inputs=None or add an input matrix."
        )
    if inputs is None:
        return None
    u = as_float_array(name, inputs)
    check_shape(name, u, (num_timesteps, du), "T, Du (Du from the input matrices)")
    return u


def _value_check_model(model, real=None):
    """The covariances checked, and every other field finite (a NaN weight would otherwise turn
    every result into NaN); ``real`` (T,) marks the real steps (None: every step), so a
    time-varying field's padded steps may hold anything."""
    valid, valid_next = real, None if real is None else real[1:]
    checked = {
        "initial_cov": check_psd("initial_cov", model.initial_cov, valid=None, semidefinite=False),
        "transition_cov": check_psd("transition_cov", model.transition_cov, valid=valid_next, semidefinite=True),
        "emission_cov": check_psd("emission_cov", model.emission_cov, valid=valid, semidefinite=False),
    }
    for name, (step_shape, time_axis) in _field_shapes(*model_dims(model)).items():
        value = getattr(model, name)
        if name in checked or value is None:
            continue
        varying = value.ndim > len(step_shape)
        checked[name] = check_finite(name, value, {"T-1": valid_next, "T": valid}[time_axis] if varying else None)
    names = tuple(checked)
    return eqx.tree_at(lambda m: tuple(getattr(m, n) for n in names), model, tuple(checked[n] for n in names))


def _check_method(method):
    if method not in ("auto", "standard", "sqrt"):
        raise ValueError(f"`method` must be 'auto', 'standard' or 'sqrt'; got {method!r}.")
