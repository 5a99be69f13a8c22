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

import typing
import dataclasses
import importlib
import json
import os
import re
import sys
import tempfile
import warnings
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
    module, _, qualname = str(name).partition(":")
    if not (module == "ssmjax" or module.startswith("ssmjax.")):
        raise ValueError(
            f"the file contains a model of class {name}, which is not part of ssmjax; "
            "pass it to load(..., classes=[YourClass]) if you trust the file."
        )
    # only ssmjax's own modules are imported, and only an equinox Module class is used
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, eqx.Module)):
        raise ValueError(f"the file names {name!r}, which is not an ssmjax model class")
    return obj


def _build(desc, allowed):
    if desc is None:
        return None
    if "array" in desc:  # a placeholder of the saved shape in the dtype JAX gives it now
        return jax.ShapeDtypeStruct(tuple(int(n) for n in desc["array"]), _canonical(desc["dtype"]))
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


@typing.no_type_check
def save(path: str | os.PathLike, model: eqx.Module, *, metadata: dict | None = None) -> None:
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
    write_atomic(path, header, model)


def write_atomic(path, header: dict, tree) -> None:
    """Write ``header`` (one JSON line) and ``tree``'s array leaves to ``path``, atomically: a
    temporary file in the same directory, flushed to disk, then renamed over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ssmjax-save-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            eqx.tree_serialise_leaves(f, tree)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _canonical(dtype: str) -> np.dtype:
    """The dtype an array saved as ``dtype`` gets now: 32 bits for 64 when 64-bit mode is off."""
    dtype = np.dtype(dtype)
    if not jax.config.jax_enable_x64 and dtype.itemsize == 8 and dtype.kind in "fiuc":
        return np.dtype({"f": "float32", "i": "int32", "u": "uint32", "c": "complex64"}[dtype.kind])
    return dtype


def read_header(f, path, magic: str = _MAGIC, what: str = "model file") -> dict:
    """The JSON header line of an open ssmjax file, or a ValueError naming ``path``."""
    try:
        header = json.loads(f.readline(1 << 24))
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != magic:
        raise ValueError(f"{path} is not an ssmjax {what} (no {magic} header).")
    return header


@typing.no_type_check
def load_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` dict saved with a model by :func:`save` (empty if none was given).

    Example:
        >>> import jax.numpy as jnp, ssmjax, tempfile, os
        >>> chain = ssmjax.MarkovChain(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]))
        >>> path = os.path.join(tempfile.mkdtemp(), "chain.eqx")
        >>> ssmjax.save(path, chain, metadata={"source": "weather"})
        >>> ssmjax.load_metadata(path)
        {'source': 'weather'}
    """
    with open(path, "rb") as f:
        return dict(read_header(f, path).get("metadata") or {})


def read_leaves(f, path, like):
    """The rest of the open file ``f`` as the array leaves of the pytree ``like`` (arrays or
    ``jax.ShapeDtypeStruct`` placeholders), or a ValueError naming ``path`` and what is wrong."""
    try:
        tree = eqx.tree_deserialise_leaves(f, like, filter_spec=_leaf)
        trailing = f.read(1)
    except Exception as err:  # cut short, overwritten, or another file's bytes
        cause = err
        while cause.__cause__ is not None:  # equinox wraps the reader's error with the leaf's path
            cause = cause.__cause__
        where = ".".join(re.findall(r"name='(\w+)'", str(err))) if cause is not err else ""
        raise ValueError(
            f"{path} is damaged or incomplete: reading its arrays failed"
            + (f" at `{where}`" if where else "") + f" ({type(cause).__name__}: {cause})."
        ) from None
    if trailing:
        raise ValueError(f"{path} is damaged: it holds more bytes than its header describes.")
    return tree


def _leaf(f, like):
    """One saved array, read without unpickling, checked against the header's shape."""
    value = np.load(f, allow_pickle=False)
    if value.shape != like.shape:
        raise ValueError(f"an array of shape {value.shape} where the header says {like.shape}")
    return jnp.asarray(value.astype(like.dtype))


@typing.no_type_check
def load(path: str | os.PathLike, *, classes: Iterable[type] = ()) -> eqx.Module:
    """Load a model written by :func:`save`.

    A file saved with 64-bit arrays (``jax_enable_x64`` on, as the ``ssmjax`` command line
    runs) loads in JAX's default 32-bit mode too: its arrays are converted to 32 bits
    (float64 to float32, int64 to int32), as ``jax.numpy`` converts any 64-bit input, with
    a warning. Switch 64-bit mode on before loading to keep them exact.

    Args:
        path: the file.
        classes: extra (user-defined) equinox classes the file may contain, e.g. a
            custom emission model; ssmjax's own classes are always allowed.

    Returns:
        The model, with exactly the saved values and dtypes (64-bit mode permitting).

    Raises:
        ValueError: the file is not an ssmjax model file, is damaged or cut short, or
            names a class that is neither ssmjax's nor in ``classes``. Nothing named in
            the file is executed: only ssmjax's own model classes (or ``classes``) are built.
    """
    allowed = {_class_name(c): c for c in classes}
    with open(path, "rb") as f:
        header = read_header(f, path)
        if header.get("version") != _VERSION:
            raise ValueError(f"{path} has format version {header.get('version')}; this ssmjax reads {_VERSION}.")
        try:
            skeleton = _build(header["structure"], allowed)
        except ValueError as err:
            raise ValueError(f"{path}: {str(err).rstrip('.')}.") from None
        except Exception as err:  # a header that parses but does not describe a model
            raise ValueError(f"{path} is damaged: its header does not describe a model ({err!r}).") from None
        model = read_leaves(f, path, skeleton)
    if header.get("jax_enable_x64") and not jax.config.jax_enable_x64 and _has_64_bit(header["structure"]):
        warnings.warn(
            f"{path} holds 64-bit arrays and 64-bit mode is off: they were loaded as 32-bit "
            "(float32, int32). Call jax.config.update('jax_enable_x64', True) before loading to keep them.",
            UserWarning,
            stacklevel=2,
        )
    return model


def _has_64_bit(desc) -> bool:
    if isinstance(desc, dict):
        if "dtype" in desc and np.dtype(desc["dtype"]).itemsize == 8:
            return True
        return any(_has_64_bit(v) for v in desc.values())
    if isinstance(desc, list):
        return any(_has_64_bit(v) for v in desc)
    return False
