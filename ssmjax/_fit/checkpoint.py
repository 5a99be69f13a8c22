"""Checkpoints of long fits: the whole loop state, written atomically every few iterations.

A checkpoint file has the layout of a saved model (:mod:`ssmjax._io`): one JSON line,
then the array leaves of the loop's state (equinox serialisation). The header holds
the fit's *settings*: the starting model's structure, the loop's options and a
fingerprint of the data. A fit resumes only from a checkpoint with equal settings, so
a stale file from another fit is an error, not a silent restart from the wrong place.

The state holds everything the loop carries (for EM the model, the two before it,
the log-likelihoods so far and the status; for SGD the parameters, the optimizer
state, the losses so far and the PRNG key), so a resumed fit runs the same compiled
segments on the same values as an uninterrupted one and ends bit for bit equal.

With several processes (``jax.distributed``) the state is replicated: process 0
writes the file and every process reads it back, so the path must be on a file
system they share.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from .. import _io
from .._checks import host_arrays, positive_int

_MAGIC = "ssmjax-checkpoint"
_VERSION = 1


def check_every(checkpoint, every) -> int:
    """``every`` as a positive int (the iterations between two writes)."""
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"`checkpoint` must be a file path or None; got {type(checkpoint).__name__}.")
    return positive_int("checkpoint_every", every)


def fingerprint(emissions, lengths, inputs) -> dict:
    """Shapes, dtypes and sums of the batch: enough to tell one data set from another."""
    out = {}
    for name, value in (("emissions", emissions), ("lengths", lengths), ("inputs", inputs)):
        if value is None:
            continue
        xp, values = host_arrays(value)
        total = xp.sum(xp.where(xp.isnan(values), 0, values)) if xp.issubdtype(values.dtype, xp.floating) else xp.sum(values)
        out[name] = {"shape": list(value.shape), "dtype": str(value.dtype), "sum": float(total)}
    return out


def leaf_sums(tree) -> list:
    """The sum of each array leaf of a model (or prior): a fingerprint of its values."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    return [float(np.sum(np.asarray(x, dtype=np.float64))) for x in leaves]


def settings(kind: str, model, batch, prior, **options) -> dict:
    """The JSON form of what a checkpoint must match to be resumed: the starting model (structure
    and values), the batch ``(emissions, lengths, inputs)``, the prior and the fit's options."""
    return json.loads(json.dumps({
        "kind": kind, "model": _io._describe(model), "start": leaf_sums(model), "data": fingerprint(*batch),
        "prior": None if prior is None else leaf_sums(prior), **options,
    }))


def _same(saved, now) -> bool:
    if isinstance(saved, dict) and isinstance(now, dict):
        return saved.keys() == now.keys() and all(_same(saved[k], now[k]) for k in now)
    if isinstance(saved, float) and isinstance(now, float):  # data sums: summation order may differ
        return bool(np.isclose(saved, now, rtol=1e-6, atol=1e-6))
    return saved == now


def _difference(saved: dict, now: dict, prefix: str = "") -> str:
    for key in now:
        if key not in saved or not _same(saved[key], now[key]):
            if isinstance(now[key], dict) and isinstance(saved.get(key), dict):
                return _difference(saved[key], now[key], f"{prefix}{key}.")
            return f"{prefix}{key} (saved {json.dumps(saved.get(key))[:80]}, now {json.dumps(now[key])[:80]})"
    return "its settings"


def read(path, expected: dict, like):
    """``(state, header)`` saved at ``path`` for a fit with settings ``expected``, or ``None``
    when there is no file yet. ``like`` is a state of the right structure (a placeholder)."""
    if path is None or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        header = _io.read_header(f, path, _MAGIC, "checkpoint")
        if header.get("version") != _VERSION:
            raise ValueError(f"{path} has checkpoint version {header.get('version')}; this ssmjax reads {_VERSION}.")
        saved = header.get("settings")
        if not isinstance(saved, dict) or not _same(saved, expected):
            what = _difference(saved, expected) if isinstance(saved, dict) else "its settings"
            raise ValueError(
                f"{path} is a checkpoint of another fit: {what} differ. Remove it, or pass another "
                "`checkpoint` path, to start this fit afresh."
            )
        placeholder = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        return _io.read_leaves(f, path, placeholder), header


def write(path, expected: dict, state, **extra) -> None:
    """Write ``state`` (process 0 only; the state is replicated) with ``extra`` header fields."""
    if jax.process_index() != 0:
        return
    header = {"format": _MAGIC, "version": _VERSION, "settings": expected, **extra}
    _io.write_atomic(path, header, jax.tree.map(np.asarray, state))
