"""The public signatures' jaxtyping annotations, checked against real calls.

The test run's jaxtyping import hook (``--jaxtyping-packages=ssmjax,beartype.beartype``) checks every
annotated function of ssmjax, except the public entry points: they are marked
``@typing.no_type_check`` because they validate their own arguments (a ``ValueError`` that names the
argument, lists accepted), and the hook would pre-empt those errors. Their annotations are checked
here instead: :func:`checking` swaps each entry point for a copy that beartype and jaxtyping check
(arguments, return value and the axis sizes shared between them), the documented examples then run
through those copies, and :func:`unchecked` lists the entry points that no example reached.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator

import beartype
import jaxtyping

import ssmjax


def _is_deprecated(fn: Callable) -> bool:
    return (inspect.getdoc(fn) or "").startswith("Deprecated")


def _clone(fn: Callable) -> types.FunctionType:
    """The same function without ``__no_type_check__`` (so it can be checked)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return copy


def public_callables() -> Iterator[tuple[str, object, str, Callable]]:
    """``(qualified name, owner, attribute, function)`` of every public function of ``ssmjax`` and
    every public method (and ``__init__``) defined by a public class, deprecated spellings aside."""
    for name in sorted(dir(ssmjax)):
        obj = getattr(ssmjax, name)
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if inspect.isfunction(obj):
            if not _is_deprecated(obj):
                yield name, ssmjax, name, obj
        elif inspect.isclass(obj) and obj.__module__.startswith("ssmjax"):
            for attr, value in vars(obj).items():
                fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if not inspect.isfunction(fn) or (attr.startswith("_") and attr != "__init__"):
                    continue
                if not _is_deprecated(fn):
                    yield f"{name}.{attr}", obj, attr, fn


def exempt(fn: Callable) -> bool:
    return bool(getattr(inspect.unwrap(fn), "__no_type_check__", False))


@contextlib.contextmanager
def checking() -> Iterator[dict[str, int]]:
    """Within the block, every exempt public entry point runs as a checked copy; yields the call
    counts by qualified name."""
    calls: dict[str, int] = {}
    restore = []
    for qualname, owner, attr, fn in public_callables():
        if not exempt(fn) or getattr(fn, "__isabstractmethod__", False):
            continue
        checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)(_clone(inspect.unwrap(fn)))
        calls[qualname] = 0

        def counted(*args, __checked=checked, __name=qualname, **kwargs):
            calls[__name] += 1
            return __checked(*args, **kwargs)

        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        replacement = classmethod(counted) if isinstance(original, classmethod) else counted
        setattr(owner, attr, replacement)
        restore.append((owner, attr, original))
    try:
        yield calls
    finally:
        for owner, attr, original in reversed(restore):
            setattr(owner, attr, original)


def missing_annotations() -> list[str]:
    """Public parameters and returns without an annotation."""
    missing = []
    for qualname, _, attr, fn in public_callables():
        signature = inspect.signature(inspect.unwrap(fn))
        for param in list(signature.parameters.values()):
            if param.name in ("self", "cls"):
                continue
            if param.annotation is inspect.Parameter.empty:
                missing.append(f"{qualname}({param.name})")
        if attr != "__init__" and signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{qualname} -> ?")
    return missing
