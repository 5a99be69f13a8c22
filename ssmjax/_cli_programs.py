"""Whole programs of the console script, exported once and kept in its cache folder.

JAX's persistent compilation cache skips XLA's compilation on a repeated command, but not
JAX's own work before it: each jitted function is traced and lowered again to compute its
cache key, which was most of a repeated ``ssmjax fit`` (about 2 s for some 27 programs on a
2-core CPU). So a command runs its numeric work as one function, from its input arrays to
every number it prints, saves or plots, and :func:`run` exports that function
(:func:`jax.export.export`) and stores the serialized program in the cache folder, keyed by
the versions of ssmjax (and a stamp of its source files), jax, jaxlib, equinox and NumPy, the
backend, the command's options and the inputs' shapes and dtypes. A repeated command reads
it back and calls it: nothing is traced or lowered, and XLA's compilation of the program
comes from the persistent cache.

Outputs travel as flat arrays. Models among them are rebuilt from the structure that ssmjax's
model files describe (``ssmjax._io``): nothing in the cache folder is unpickled or run as
Python. An entry that cannot be read, is damaged, or does not match the call is ignored and
recomputed; entries are written whole (temporary file, then rename). Without the
``flatbuffers`` package, which JAX's serialization needs, programs are still exported and run,
but not stored.

Exported programs hold no host callbacks, so the functions run here are traced with value
checks off: their inputs are checked on the host first (the command's own data checks), as
:func:`ssmjax.fit_em` checks its inputs eagerly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import numpy as np

from ._fit.compiler import CPU_COMPILER_OPTIONS
from ._io import _build, _describe

_MAGIC = b"ssmjax-program\n"
_FORMAT = 1
_SUBDIR = "ssmjax-programs"


def run(name: str, fn: Callable, args: Sequence, options: dict, cache_dir: str | None = None,
        while_loading: Callable[[], object] | None = None):
    """``fn(*args)`` as one compiled program, read from ``cache_dir`` when it holds it.

    ``fn`` must be traceable and deterministic in ``args`` (NumPy arrays) and ``options`` (a
    JSON-serialisable dict of everything else that shapes it: ``fn`` reads nothing else). It
    returns a pytree of dicts, lists and tuples whose leaves are arrays, ssmjax models or JSON
    values (strings, numbers, None); the same comes back, with lists for tuples and JAX arrays
    for arrays. ``cache_dir`` None: exported and run, nothing read or written.

    ``while_loading``: run in a thread while XLA compiles the program or reads it back, which it
    does without holding Python's interpreter lock (the caller's next imports, say: on 2 cores
    matplotlib's import then costs a repeated ``ssmjax fit`` about 0.2 s less). Its errors are
    ignored.
    """
    args = tuple(np.asarray(a) for a in args)
    path = None
    if cache_dir is not None:
        key = _entry_key(name, args, options)
        path = os.path.join(cache_dir, _SUBDIR, f"{name}-{key[:40]}.bin")
        entry = _read(path, key, args)
        if entry is not None:
            exported, spec = entry
            try:
                return _unflatten(spec, list(_call(exported, args, while_loading)))
            except Exception:  # noqa: BLE001, S110 - a stored program this JAX cannot run: make it anew
                pass
    exported, spec = _export(fn, args)
    if path is not None:
        _write(path, key, exported, spec)
    return _unflatten(spec, list(_call(exported, args, while_loading)))


def _call(exported, args, while_loading=None):
    lowered = jax.jit(exported.call).lower(*args)
    helper = None
    if while_loading is not None:
        helper = threading.Thread(target=_quietly, args=(while_loading,), name="ssmjax-while-loading",
                                  daemon=True)
        helper.start()
    try:
        # XLA:CPU's classic emitters compile these loop-heavy programs about twice as fast (see
        # ssmjax._fit.compiler); the options are part of the persistent cache's key
        cpu = jax.default_backend() == "cpu"
        try:
            compiled = lowered.compile(dict(CPU_COMPILER_OPTIONS) if cpu else None)
        except Exception as err:  # noqa: BLE001 - only an option this jaxlib does not know is handled
            if not cpu or "compile option" not in str(err):
                raise
            compiled = lowered.compile()
        return jax.block_until_ready(compiled(*args))
    finally:
        if helper is not None:
            helper.join()


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001, S110 - a head start only: the caller does the work itself if it must
        pass


# ----------------------------------------------------------------------------- the key


def _entry_key(name: str, args, options: dict) -> str:
    import jaxlib

    from . import __version__

    facts = {
        "format": _FORMAT,
        "name": name,
        "options": options,
        "args": [[list(a.shape), str(a.dtype)] for a in args],
        "versions": [__version__, jax.__version__, jaxlib.__version__, eqx.__version__, np.__version__],
        "source": _source_stamp(),
        "backend": jax.default_backend(),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _source_stamp() -> str:
    """Size and modification time of every module of the package: an edited checkout (same
    version number, other code) must not run programs traced from the old code."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                st = os.stat(path)
                digest.update(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- export, store, read


def _export(fn, args):
    from ._checks import value_checks

    spec = {}

    def flat(*xs):
        with value_checks(False):  # checks inside a program are host callbacks
            leaves, spec["tree"] = _flatten(fn(*xs))
        return leaves

    exported = jax.export.export(jax.jit(flat))(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    return exported, spec["tree"]


def _write(path: str, key: str, exported, spec) -> None:
    """Store an entry whole or not at all; a cache that cannot be written is no error."""
    try:
        payload = bytes(exported.serialize())
    except ImportError:  # JAX's serialization needs the flatbuffers package
        return
    header = {"format": _FORMAT, "key": key, "spec": spec, "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + json.dumps(header).encode() + b"\n" + payload)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str, key: str, args):
    """``(exported, spec)`` of the entry at ``path``, or None where there is none that fits."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None
            header = json.loads(f.readline(1 << 24))
            payload = f.read()
        if (header.get("format") != _FORMAT or header.get("key") != key or len(payload) != header.get("size")
                or hashlib.sha256(payload).hexdigest() != header.get("sha256")):
            return None
        exported = jax.export.deserialize(bytearray(payload))
        expected = [(tuple(a.shape), np.dtype(a.dtype)) for a in args]
        if [(tuple(a.shape), np.dtype(a.dtype)) for a in exported.in_avals] != expected:
            return None
        return exported, header["spec"]
    except Exception:  # noqa: BLE001 - missing, unreadable or foreign: recompute
        return None


# ----------------------------------------------------------------------------- outputs


def _flatten(tree):
    """``(leaves, spec)``: the arrays of ``tree`` in order, and a JSON description of the rest."""
    leaves = []

    def walk(node):
        if isinstance(node, eqx.Module):
            arrays = [x for x in jax.tree.leaves(node) if eqx.is_array(x)]
            leaves.extend(arrays)
            return {"model": _describe(node), "count": len(arrays)}
        if eqx.is_array(node):
            leaves.append(node)
            return {"array": True}
        if isinstance(node, dict):
            return {"dict": {str(k): walk(v) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return {"list": [walk(v) for v in node]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"static": node}
        raise TypeError(f"cannot return a {type(node).__name__} from a cached program")

    return leaves, walk(tree)


def _unflatten(spec, leaves: list):
    it = iter(leaves)

    def fill(placeholder):
        value = next(it)
        if value.shape != placeholder.shape:
            raise ValueError("the program's arrays do not fit its description")
        return value

    def build(node):
        if "model" in node:
            skeleton = _build(node["model"], {})
            return jax.tree.map(lambda x: fill(x) if isinstance(x, jax.ShapeDtypeStruct) else x, skeleton)
        if "array" in node:
            return next(it)
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"].items()}
        if "list" in node:
            return [build(v) for v in node["list"]]
        return node["static"]

    out = build(spec)
    if next(it, None) is not None:
        raise ValueError("the program returned more arrays than its description holds")
    return out
