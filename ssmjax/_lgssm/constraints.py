r"""What fitting may change in an LGSSM: covariance structure and fixed entries.

A leaf of :mod:`ssmjax._lgssm` (NumPy only). :class:`ssmjax.LGSSM` takes

* ``structure``: per covariance (``initial_cov``, ``transition_cov``, ``emission_cov``) one of
  ``"full"`` (the default), ``"diagonal"`` or ``"scalar"`` (:math:`\sigma^2 I`);
* ``fixed``: per field, ``True`` (the whole field is held) or a boolean array of the field's
  shape, ``True`` where the entry is held at its current value. A diagonal covariance takes a
  ``(D,)`` mask over its variances (a zero variance held fixed makes a state component
  deterministic, as the slope of a smooth trend); a full or scalar covariance is held whole
  or not at all.

Both are kept in the model (a static field), so that :func:`ssmjax.fit_em`,
:func:`ssmjax.fit_sgd`, :meth:`ssmjax.LGSSM.num_parameters` and saved files agree on them.
Time-varying fields take no constraints (they are fitted by ``fit_sgd``, whole).

Stored form, hashable and saved as JSON: a tuple of ``(name, structure, fixed)`` with
``fixed`` the row-major tuple of the field's full-shape mask (for a diagonal covariance
the off-diagonal entries are ``True``: held at zero).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

STRUCTURES = ("full", "diagonal", "scalar")
COVARIANCES = ("initial_cov", "transition_cov", "emission_cov")

_BASE_NDIM = {
    "initial_mean": 1, "initial_cov": 2, "transition_matrix": 2, "transition_cov": 2,
    "emission_matrix": 2, "emission_cov": 2, "transition_input_matrix": 2,
    "emission_input_matrix": 2, "transition_offset": 1, "emission_offset": 1,
}


def canonical(values: dict, structure: Optional[dict], fixed: Optional[dict]) -> tuple:
    """Validate ``structure`` and ``fixed`` against the model's field ``values``; the stored form.

    ``values`` maps every field name to its array (or None). Values are checked against the
    structure where they are concrete (not inside a transformation).
    """
    structure = dict(structure or {})
    fixed = dict(fixed or {})
    for what, given in (("structure", structure), ("fixed", fixed)):
        if not isinstance(given, dict):
            raise ValueError(f"`{what}` must be a dict from field names; got {type(given).__name__}.")
    for name in structure:
        if name not in COVARIANCES:
            raise ValueError(f"`structure` names `{name}`; it takes the covariances {list(COVARIANCES)}.")
    for name in list(structure) + list(fixed):
        if name not in values or values[name] is None:
            present = [n for n, v in values.items() if v is not None]
            raise ValueError(f"`{name}` is not a field of this model; expected one of {present}.")
        if values[name].ndim > _BASE_NDIM[name]:
            raise ValueError(
                f"`{name}` is time-varying; constraints apply to time-invariant fields "
                "(fit_sgd fits time-varying fields whole, frozen=(...) holds them)."
            )
    out = []
    for name, value in values.items():
        if value is None or (name not in structure and name not in fixed):
            continue
        kind = structure.get(name, "full") if name in COVARIANCES else ""
        if name in COVARIANCES and kind not in STRUCTURES:
            raise ValueError(f"`structure['{name}']` must be one of {list(STRUCTURES)}; got {kind!r}.")
        mask = _full_mask(name, kind, fixed.get(name, False), tuple(value.shape))
        if kind in ("diagonal", "scalar"):
            _check_structured_value(name, kind, value)
        out.append((name, kind, tuple(bool(b) for b in mask.reshape(-1))))
    return tuple(out)


def _full_mask(name, kind, given, shape) -> np.ndarray:
    if isinstance(given, (bool, np.bool_)):
        mask = np.full(shape, bool(given))
        if kind == "diagonal":
            mask |= ~np.eye(shape[0], dtype=bool)
        return mask
    mask = np.asarray(given)
    if mask.dtype != bool:
        raise ValueError(f"`fixed['{name}']` must be True, False or a boolean array; got dtype {mask.dtype}.")
    if kind == "diagonal":
        if mask.shape != shape[:1]:
            raise ValueError(
                f"`fixed['{name}']` of a diagonal covariance is a mask over its variances, shape "
                f"{shape[:1]}; got shape {mask.shape}."
            )
        return np.where(np.eye(shape[0], dtype=bool), np.diag(mask), True)
    if mask.shape != shape:
        raise ValueError(f"`fixed['{name}']` must have the field's shape {shape}; got shape {mask.shape}.")
    if kind in ("full", "scalar") and mask.any() and not mask.all():
        raise ValueError(
            f"`fixed['{name}']`: a {kind} covariance is held whole or not at all; to hold some "
            "variances, give it structure 'diagonal' and a mask over its diagonal."
        )
    return mask


def _check_structured_value(name, kind, value) -> None:
    try:
        cov = np.asarray(value, np.float64)
    except Exception:  # a tracer: checked where the values are concrete
        return
    if np.any(cov[~np.eye(cov.shape[0], dtype=bool)] != 0):
        raise ValueError(f"`{name}` has structure '{kind}' but nonzero off-diagonal entries.")
    if kind == "scalar" and np.ptp(np.diag(cov)) != 0:
        raise ValueError(f"`{name}` has structure 'scalar' but unequal variances {np.diag(cov).tolist()}.")


def structure_of(constraints: tuple, name: str) -> str:
    """``"full"``, ``"diagonal"`` or ``"scalar"`` for a covariance; ``""`` for another field."""
    for entry, kind, _ in constraints:
        if entry == name:
            return kind
    return "full" if name in COVARIANCES else ""


def fixed_of(constraints: tuple, name: str, shape: tuple) -> np.ndarray:
    """The boolean mask of held entries of ``name`` (all False if unconstrained)."""
    for entry, _, flat in constraints:
        if entry == name:
            return np.asarray(flat, bool).reshape(shape)
    return np.zeros(shape, bool)


def held_whole(constraints: tuple, name: str, shape: tuple) -> bool:
    return bool(fixed_of(constraints, name, shape).all())


def free_count(constraints: tuple, name: str, value) -> int:
    """Free parameters of one field: entries not held, a full covariance counted once per pair."""
    shape = tuple(value.shape)
    if len(shape) > _BASE_NDIM[name]:  # time-varying: every step's entries
        steps = shape[0]
        base = free_count((), name, np.zeros(shape[1:]))
        return steps * base
    mask = fixed_of(constraints, name, shape)
    if mask.all():
        return 0
    kind = structure_of(constraints, name)
    if kind == "full":
        d = shape[0]
        return d * (d + 1) // 2
    if kind == "scalar":
        return 1
    if kind == "diagonal":
        return int((~np.diag(mask)).sum())
    return int((~mask).sum())
