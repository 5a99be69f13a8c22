"""Fields and shape rules of the LGSSM, and the abstract type the inference functions accept.

A leaf of :mod:`ssmjax._lgssm`: the inference modules check and read models through this
module, and :mod:`ssmjax._lgssm.model` defines :class:`ssmjax.LGSSM` on top of them and of
the inference functions its methods call (no import cycle). The convention is stated in
:mod:`ssmjax._lgssm.model`.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_shape_options
from .._fit.protocol import AbstractFittableModel

_TRANSITION = ("transition_matrix", "transition_cov", "transition_input_matrix", "transition_offset")
_EMISSION = ("emission_matrix", "emission_cov", "emission_input_matrix", "emission_offset")
FIELDS = ("initial_mean", "initial_cov") + _TRANSITION + _EMISSION


def _to_array(x):
    if x is None or isinstance(x, jax.Array):
        return x
    if isinstance(x, (np.ndarray, list, tuple, float, int, np.generic)):
        arr = jnp.asarray(x)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(jnp.result_type(float))
        return arr
    return x  # e.g. sentinels placed by pytree utilities


def _field_shapes(dx, dy, du):
    """Per field: (static shape, name of the time axis)."""
    return {
        "initial_mean": ((dx,), None),
        "initial_cov": ((dx, dx), None),
        "transition_matrix": ((dx, dx), "T-1"),
        "transition_cov": ((dx, dx), "T-1"),
        "transition_input_matrix": ((dx, du), "T-1"),
        "transition_offset": ((dx,), "T-1"),
        "emission_matrix": ((dy, dx), "T"),
        "emission_cov": ((dy, dy), "T"),
        "emission_input_matrix": ((dy, du), "T"),
        "emission_offset": ((dy,), "T"),
    }


def model_dims(model: "AbstractLGSSM") -> tuple[int, int, int | None]:
    """(Dx, Dy, Du) of a model; Du is None without input matrices."""
    dx = model.initial_mean.shape[-1]
    dy = model.emission_matrix.shape[-2]
    du = None
    for name in ("transition_input_matrix", "emission_input_matrix"):
        m = getattr(model, name)
        if m is not None:
            du = m.shape[-1]
            break
    return dx, dy, du


def validate_shapes(model: "AbstractLGSSM") -> dict[str, Optional[int]]:
    """Check every field's shape (ValueError naming it); return {field: time-axis size or None}."""
    for name in ("initial_mean", "emission_matrix"):
        if not hasattr(getattr(model, name), "shape"):
            raise ValueError(f"`{name}` must be an array; got {type(getattr(model, name)).__name__}.")
    if model.initial_mean.ndim != 1:
        raise ValueError(
            f"`initial_mean` must have shape (Dx,); got shape {tuple(model.initial_mean.shape)}."
        )
    if model.emission_matrix.ndim not in (2, 3):
        raise ValueError(
            "`emission_matrix` must have shape (Dy, Dx) or (T, Dy, Dx); "
            f"got shape {tuple(model.emission_matrix.shape)}."
        )
    dx, dy, du = model_dims(model)
    shapes = _field_shapes(dx, dy, du)
    time_sizes: dict[str, Optional[int]] = {}
    for name in FIELDS:
        value = getattr(model, name)
        if value is None:
            if name in ("initial_mean", "initial_cov", "transition_matrix", "transition_cov",
                        "emission_matrix", "emission_cov"):
                raise ValueError(f"`{name}` is required.")
            time_sizes[name] = None
            continue
        if not hasattr(value, "shape"):
            raise ValueError(f"`{name}` must be an array; got {type(value).__name__}.")
        static, axis = shapes[name]
        options = [static] if axis is None else [static, (axis,) + static]
        meaning = f"Dx = {dx} from initial_mean, Dy = {dy} from emission_matrix"
        if du is not None:
            meaning += f", Du = {du} from the input matrices"
        which = check_shape_options(name, value, options, meaning)
        time_sizes[name] = int(value.shape[0]) if which == 1 else None
    # time-varying fields of one kind must agree on their number of entries
    for group, axis in ((_TRANSITION, "T-1"), (_EMISSION, "T")):
        sizes = {n: time_sizes[n] for n in group if time_sizes[n] is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"time-varying fields must agree on their leading ({axis}) axis; got {sizes}."
            )
    tsizes = [time_sizes[n] for n in _TRANSITION if time_sizes[n] is not None]
    esizes = [time_sizes[n] for n in _EMISSION if time_sizes[n] is not None]
    if tsizes and esizes and tsizes[0] != esizes[0] - 1:
        raise ValueError(
            f"time-varying transition fields have {tsizes[0]} entries and time-varying emission "
            f"fields {esizes[0]}; expected T-1 and T."
        )
    return time_sizes


class AbstractLGSSM(AbstractFittableModel):
    """The fields every LGSSM has (see :class:`ssmjax.LGSSM`, its one concrete subclass)."""

    initial_mean: eqx.AbstractVar[jax.Array]
    initial_cov: eqx.AbstractVar[jax.Array]
    transition_matrix: eqx.AbstractVar[jax.Array]
    transition_cov: eqx.AbstractVar[jax.Array]
    emission_matrix: eqx.AbstractVar[jax.Array]
    emission_cov: eqx.AbstractVar[jax.Array]
    transition_input_matrix: eqx.AbstractVar[Optional[jax.Array]]
    emission_input_matrix: eqx.AbstractVar[Optional[jax.Array]]
    transition_offset: eqx.AbstractVar[Optional[jax.Array]]
    emission_offset: eqx.AbstractVar[Optional[jax.Array]]
