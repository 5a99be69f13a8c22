"""Deprecated spellings of the public API, kept for one release.

Each old spelling still works and warns with a ``DeprecationWarning`` that names the new one:
a PRNG key passed first (the key is now keyword-only and last everywhere), and renamed methods
(one name per concept: a model's method is its inference function's name without the model
prefix, e.g. :func:`ssmjax.hmm_viterbi` and ``HMM.viterbi``).
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np


def warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}.",
        DeprecationWarning,
        stacklevel=3,
    )


def is_key(x) -> bool:
    """A typed PRNG key (``jax.random.key``) or a raw one (``jax.random.PRNGKey``: uint32, shape (2,))."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == np.uint32 and tuple(getattr(x, "shape", ())) == (2,)


def key_last(name: str, skip: int = 0):
    """Accept the old call of ``name`` with the key as the first positional argument (after
    ``skip`` arguments: ``self`` or ``cls``), with a warning; the new call passes ``key=``."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if "key" not in kwargs and len(args) > skip and is_key(args[skip]):
                warn(f"passing the key first to {name}(key, ...)", f"{name}(..., key=key)")
                kwargs["key"] = args[skip]
                args = args[:skip] + args[skip + 1 :]
            return fn(*args, **kwargs)

        return wrapper

    return decorate
