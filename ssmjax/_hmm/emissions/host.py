"""Host-side arithmetic of the emission families' initialisers (their ``from_data``).

An initialiser runs once per fit, on data the caller holds, and its few operations cost more to
compile with XLA (0.1 to 1 s on a 2-core CPU: quantiles, k-means loops, threefry draws) than to run
with NumPy (milliseconds). So each initialiser's arithmetic is one NumPy function, run directly on
concrete data (nothing compiles) and through :func:`jax.pure_callback` under ``jit`` or ``vmap``:
``from_data`` stays traceable and gives the same start either way. Its random draws come from NumPy
generators seeded with the bits of the caller's JAX key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ... import _checks


def key_seed(key: PRNGKeyArray) -> Array:
    """The bits of a JAX key (typed or raw), which seed the host generators."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def generator(seed, stream: int = 0) -> np.random.Generator:
    """A NumPy generator from a key's bits; different ``stream`` numbers give independent streams."""
    return np.random.default_rng([*np.ravel(np.asarray(seed)).tolist(), stream])


def on_host(fn, shapes, *args):
    """``fn(*args)`` on NumPy arrays: called directly for concrete arguments (its NumPy results
    returned), through :func:`jax.pure_callback` under a transformation (``shapes``: its results'
    :class:`jax.ShapeDtypeStruct`)."""
    if not any(isinstance(a, jax.core.Tracer) for a in args):
        return fn(*(_checks.host_copy(a) for a in args))
    return jax.pure_callback(lambda *a: fn(*(np.asarray(x) for x in a)), shapes, *args, vmap_method="sequential")
