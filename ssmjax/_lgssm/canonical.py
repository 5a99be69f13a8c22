r"""Per-step parameters in one canonical form, shared by every Kalman recursion.

Inputs are folded into offsets, time-varying fields get ``T`` entries, and missing entries
and padding are sanitised *before* any arithmetic, so NaN/inf in missing or padded entries
never reach values or gradients (the convention is stated in :mod:`ssmjax._lgssm.model`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .params import AbstractLGSSM, model_dims
from .small import matmul_precision

LOG_2PI = math.log(2.0 * math.pi)

def _dtype(model: AbstractLGSSM, *arrays):
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(model)] + [a for a in arrays if a is not None]
    return jnp.result_type(*leaves)


def _canonical(model: AbstractLGSSM, emissions, inputs, length, observed: bool = False):
    """Per-step parameters with inputs folded into offsets, padding and missing data sanitised.

    Returns ``(p, tv, ys, mask, valid_next)``: ``p`` maps short names to arrays (time-varying
    ones, named in the static set ``tv``, have a leading T axis; transitions are extended
    with a harmless identity entry so every array has T entries), ``ys`` the emissions with
    missing and padded entries set to 0, ``mask`` (T, Dy) the observed entries,
    ``valid_next`` (T,) whether transition ``t`` is real (``t + 1 < length``).

    ``observed=True`` is the caller's promise that every entry is observed and every step
    real (``length`` is then ``None``): ``mask`` is a constant, so nothing that the
    covariance recursion reads depends on the emissions, and under ``jax.vmap`` with a
    shared model JAX computes the covariances once for the whole batch (see
    :mod:`ssmjax._lgssm.strategy`).
    """
    dtype = _dtype(model, emissions, inputs)
    num_timesteps = emissions.shape[0]
    dx, dy, du = model_dims(model)
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
    steps = jnp.arange(num_timesteps)
    end = num_timesteps if length is None else length
    valid = steps < end
    valid_next = steps + 1 < end
    eye_x = jnp.eye(dx, dtype=dtype)
    eye_y = jnp.eye(dy, dtype=dtype)

    def tvar(a, static_ndim):
        return a is not None and a.ndim == static_ndim + 1

    def sanitize(a, static_ndim, ok, safe):
        if a is None or not tvar(a, static_ndim) or length is None:
            return a
        ok = ok.reshape((-1,) + (1,) * static_ndim)
        return jnp.where(ok, a, safe)

    y = cast(emissions)
    u = cast(inputs)
    if u is not None and length is not None:
        u = jnp.where(valid[:, None], u, 0.0)
    if observed:
        mask = jnp.ones(y.shape, bool)
        ys = y
    else:
        mask = ~jnp.isnan(y) & valid[:, None]
        ys = jnp.where(mask, y, 0.0)

    # emissions
    C = sanitize(cast(model.emission_matrix), 2, valid, 0.0)
    R = sanitize(cast(model.emission_cov), 2, valid, eye_y)
    D = sanitize(cast(model.emission_input_matrix), 2, valid, 0.0)
    d = sanitize(cast(model.emission_offset), 1, valid, 0.0)
    e = d
    if D is not None:
        Du_t = jnp.einsum("tij,tj->ti" if D.ndim == 3 else "ij,tj->ti", D, u, precision=matmul_precision())
        e = Du_t if e is None else Du_t + e
    # transitions (T-1 entries when time-varying)
    vn = valid_next[: num_timesteps - 1]
    A = sanitize(cast(model.transition_matrix), 2, vn, eye_x)
    Q = sanitize(cast(model.transition_cov), 2, vn, 0.0)
    B = sanitize(cast(model.transition_input_matrix), 2, vn, 0.0)
    b = sanitize(cast(model.transition_offset), 1, vn, 0.0)
    f = b
    if B is not None:
        Bu = jnp.einsum(
            "tij,tj->ti" if B.ndim == 3 else "ij,tj->ti", B, u[1:], precision=matmul_precision()
        )
        f = Bu if f is None else Bu + f

    def extend(a, safe):
        # append a harmless entry so time-varying transitions have T entries
        return jnp.concatenate([a, safe[None]], axis=0)

    p = dict(m0=cast(model.initial_mean), P0=cast(model.initial_cov), C=C, R=R, A=A, Q=Q)
    tv = set()
    for key, static_ndim in (("C", 2), ("R", 2)):
        if tvar(p[key], static_ndim):
            tv.add(key)
    if e is not None:
        p["e"] = e
        if e.ndim == 2:
            tv.add("e")
    for key, safe in (("A", eye_x), ("Q", jnp.zeros_like(eye_x))):
        if tvar(p[key], 2):
            p[key] = extend(p[key], safe)
            tv.add(key)
    if f is not None:
        if f.ndim == 2:
            f = extend(f, jnp.zeros((dx,), dtype))
            tv.add("f")
        p["f"] = f
    return p, frozenset(tv), ys, mask, valid_next


def _at(p, tv, x, key):
    return x[key] if key in tv else p[key]


def _scan_inputs(p, tv, **extra):
    xs = {k: p[k] for k in tv}
    xs.update(extra)
    return xs
