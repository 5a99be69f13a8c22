r"""Per-step parameters in one canonical form, shared by every Kalman recursion.

Inputs are folded into offsets, time-varying fields get ``T`` entries, and missing entries
and padding are sanitised *before* any arithmetic, so NaN/inf in missing or padded entries
never reach values or gradients (the convention is stated in :mod:`ssmjax._lgssm.model`).
"""

from __future__ import annotations

import math

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .params import AbstractLGSSM, model_dims
from .small import matmul_precision

LOG_2PI = math.log(2.0 * math.pi)

def _dtype(model: AbstractLGSSM, *arrays):
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(model)] + [a for a in arrays if a is not None]
    return jnp.result_type(*leaves)


_STATIC_NDIM = dict(
    initial_mean=1, initial_cov=2, transition_matrix=2, transition_cov=2, transition_offset=1,
    emission_matrix=2, emission_cov=2, emission_offset=1,
)


class KalmanParams(eqx.Module):
    r"""The parameters one Kalman step reads, by name.

    Inputs are folded into the offsets (:math:`B_t u_{t+1} + b_t` and :math:`D_t u_t + d_t`),
    and a time-varying field has a leading axis of ``T`` entries (transitions get a harmless
    last entry), so that step ``t`` reads entry ``t`` of every time-varying field:
    :meth:`at`. Absent offsets are ``None``.
    """

    initial_mean: Array
    initial_cov: Array
    transition_matrix: Array
    transition_cov: Array
    emission_matrix: Array
    emission_cov: Array
    transition_offset: Optional[Array] = None
    emission_offset: Optional[Array] = None

    def is_time_varying(self, name: str) -> bool:
        value = getattr(self, name)
        return value is not None and value.ndim == _STATIC_NDIM[name] + 1

    def at(self, t) -> "KalmanParams":
        """The parameters of step ``t`` (a Python or traced integer): entry ``t`` of every time-varying field."""
        picked = {
            name: lax.dynamic_index_in_dim(getattr(self, name), t, keepdims=False)
            for name in _STATIC_NDIM
            if self.is_time_varying(name)
        }
        return eqx.tree_at(lambda p: [getattr(p, n) for n in picked], self, list(picked.values())) if picked else self


def _canonical(model: AbstractLGSSM, emissions, inputs, length, observed: bool = False):
    """Per-step parameters with inputs folded into offsets, padding and missing data sanitised.

    Returns ``(params, ys, mask, valid_next)``: ``params`` a :class:`KalmanParams`, ``ys``
    the emissions with missing and padded entries set to 0, ``mask`` (T, Dy) the observed
    entries, ``valid_next`` (T,) whether transition ``t`` is real (``t + 1 < length``).

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
        return a if a is None or a.ndim == safe.ndim else jnp.concatenate([a, safe[None]], axis=0)

    params = KalmanParams(
        initial_mean=cast(model.initial_mean), initial_cov=cast(model.initial_cov),
        transition_matrix=extend(A, eye_x), transition_cov=extend(Q, jnp.zeros_like(eye_x)),
        transition_offset=extend(f, jnp.zeros((dx,), dtype)),
        emission_matrix=C, emission_cov=R, emission_offset=e,
    )
    return params, ys, mask, valid_next
