"""Saving and loading models: a JSON header plus equinox-serialised leaves.

File layout: one line of JSON (the *structure*: class names, static fields, array
shapes and dtypes, ``None`` fields), then the array leaves written by
:func:`equinox.tree_serialise_leaves`. Loading rebuilds an empty model of the same
structure from the header and fills it with
:func:`equinox.tree_deserialise_leaves`, so nothing is executed from the file:
only classes from ssmjax itself, or classes the caller passes explicitly, are
instantiated.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

_MAGIC = "ssmjax-model"
_VERSION = 1


def _class_name(cls) -> str:
    """``ssmjax:Name`` for a class of the public API (files stay loadable whichever private module
    defines it), else ``module:qualname``."""
    public = sys.modules.get("ssmjax")
    if public is not None and getattr(public, cls.__qualname__, None) is cls:
        return f"ssmjax:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def _describe(obj):
    if obj is None:
        return None
    if isinstance(obj, eqx.Module):
        fields = {}
        for f in dataclasses.fields(obj):
            if isinstance(getattr(type(obj), f.name, None), property):
                continue  # an abstract field a subclass computes (equinox AbstractVar): not stored
            value = getattr(obj, f.name)
            if f.metadata.get("static", False):
                fields[f.name] = {"static": _static(value, f.name)}
            else:
                fields[f.name] = _describe(value)
        return {"module": _class_name(type(obj)), "fields": fields}
    if eqx.is_array(obj) or isinstance(obj, np.ndarray):
        return {"array": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, (bool, int, float, str)):
        return {"static": obj}
    if isinstance(obj, tuple):  # e.g. the parts of a ProductEmissions
        return {"tuple": [_describe(item) for item in obj]}
    raise ValueError(f"cannot save a model containing {type(obj).__name__}")


def _static(value, name):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, tuple):  # e.g. an LGSSM's constraints; read back as tuples (_tuples)
        return [_static(item, name) for item in value]
    raise ValueError(f"cannot save static field `{name}` of type {type(value).__name__}")


def _tuples(value):
    """A static value as it was saved: JSON lists back to (hashable) tuples."""
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def _resolve(name: str, allowed: dict[str, type]):
    if name in allowed:
        return allowed[name]
    module, qualname = name.split(":")
    if not (module == "ssmjax" or module.startswith("ssmjax.")):
        raise ValueError(
            f"the file contains a model of class {name}, which is not part of ssmjax; "
            "pass it to load(..., classes=[YourClass]) if you trust the file."
        )
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _build(desc, allowed):
    if desc is None:
        return None
    if "array" in desc:
        return jnp.zeros(tuple(desc["array"]), dtype=desc["dtype"])
    if "static" in desc:
        return _tuples(desc["static"])
    if "tuple" in desc:
        return tuple(_build(item, allowed) for item in desc["tuple"])
    cls = _resolve(desc["module"], allowed)
    fields = desc["fields"]
    if cls.__name__ == "GaussianEmissions" and "log_variances" in fields:
        # written when one class held both storages: its diagonal models are DiagonalGaussianEmissions
        # now (the leaves, means then the stored covariance parameter, are in the same order)
        if fields["log_variances"] is not None:
            cls = _resolve("ssmjax:DiagonalGaussianEmissions", allowed)
        fields = {k: v for k, v in fields.items() if k != ("chol_covs" if fields["log_variances"] else "log_variances")}
    obj = object.__new__(cls)
    for name, sub in fields.items():
        object.__setattr__(obj, name, _build(sub, allowed))
    return obj


def save(path, model, *, metadata: dict | None = None) -> None:
    """Save any ssmjax model (HMM, LGSSM, MarkovChain, emission models) to ``path``.

    The write is atomic: the file appears complete or not at all.

    Args:
        path: file path (any extension; ``.eqx`` is customary).
        model: an ssmjax model, an equinox Module.
        metadata: a JSON-serialisable dict kept beside the model (e.g. the data's column names),
            read back by :func:`load_metadata`.

    Example:
        >>> import jax.numpy as jnp, ssmjax, tempfile, os
        >>> hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        ...                  ssmjax.PoissonEmissions(rates=jnp.array([[3.0], [12.0]])))
        >>> path = os.path.join(tempfile.mkdtemp(), "hmm.eqx")
        >>> ssmjax.save(path, hmm)
        >>> bool(jnp.all(ssmjax.load(path).transition_matrix == hmm.transition_matrix))
        True
    """
    if not isinstance(model, eqx.Module):
        raise ValueError(f"`model` must be an ssmjax model (an equinox Module); got {type(model).__name__}.")
    header = {"format": _MAGIC, "version": _VERSION, "structure": _describe(model),
              "jax_enable_x64": bool(jax.config.jax_enable_x64)}
    if metadata is not None:
        try:
            json.dumps(metadata)
        except TypeError as err:
            raise ValueError(f"`metadata` must be JSON-serialisable: {err}") from None
        header["metadata"] = metadata
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ssmjax-save-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            eqx.tree_serialise_leaves(f, model)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _header(f, path) -> dict:
    try:
        header = json.loads(f.readline())
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != _MAGIC:
        raise ValueError(f"{path} is not an ssmjax model file (no ssmjax header).")
    return header


def load_metadata(path) -> dict:
    """The ``metadata`` dict saved with a model by :func:`save` (empty if none was given)."""
    with open(path, "rb") as f:
        return dict(_header(f, path).get("metadata") or {})


def load(path, *, classes: Iterable[type] = ()):
    """Load a model written by :func:`save`.

    Args:
        path: the file.
        classes: extra (user-defined) equinox classes the file may contain, e.g. a
            custom emission model; ssmjax's own classes are always allowed.

    Returns:
        The model, with exactly the saved values and dtypes.

    Raises:
        ValueError: the file is not an ssmjax model file, or names a class that is
            neither ssmjax's nor in ``classes``.
    """
    allowed = {_class_name(c): c for c in classes}
    with open(path, "rb") as f:
        header = _header(f, path)
        if header.get("version") != _VERSION:
            raise ValueError(f"{path} has format version {header.get('version')}; this ssmjax reads {_VERSION}.")
        if header.get("jax_enable_x64") and not jax.config.jax_enable_x64:
            dtypes = set()

            def collect(d):
                if isinstance(d, dict):
                    if "dtype" in d:
                        dtypes.add(d["dtype"])
                    for v in d.values():
                        collect(v)

            collect(header["structure"])
            if dtypes & {"float64", "int64"}:
                raise ValueError(
                    f"{path} holds 64-bit arrays; enable them first with "
                    "jax.config.update('jax_enable_x64', True)."
                )
        skeleton = _build(header["structure"], allowed)
        return eqx.tree_deserialise_leaves(f, skeleton)
