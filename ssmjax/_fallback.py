"""A conditional fallback that stays a conditional under ``jax.vmap``.

Used where a fast pass is almost always right and a slower one must take over when it is
not: the HMM forward passes (underflow, :mod:`ssmjax._hmm.inference`) and the
steady-state Kalman path (no steady state reached, :mod:`ssmjax._lgssm.steady`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool


@jax.custom_batching.custom_vmap
def _any_in_batch(flag: Bool[Array, ""]) -> Bool[Array, ""]:
    """``flag``; under ``jax.vmap``, whether it holds for any member of the batch (unbatched)."""
    return flag


@_any_in_batch.def_vmap
def _any_in_batch_rule(axis_size, in_batched, flag):
    (batched,) = in_batched
    return (jnp.any(flag) if batched else flag), False


@jax.custom_batching.custom_vmap
def _rows_to_redo(flag: Bool[Array, ""]) -> Bool[Array, ""]:
    """Inside :func:`fallback`'s robust branch, which sequences take the robust result: unbatched
    the branch runs only if ``flag`` holds, so a constant True (the compiler then drops the select and
    keeps no copy of the fast results); under ``jax.vmap``, ``flag`` of each member."""
    return jnp.ones_like(flag)


@_rows_to_redo.def_vmap
def _rows_to_redo_rule(axis_size, in_batched, flag):
    (batched,) = in_batched
    return flag, batched


def fallback(needed, fast, robust, robust_args):
    """``robust(*robust_args)`` where ``needed``, else ``fast`` -- computing the robust pass only if needed.

    A ``lax.cond`` on ``needed`` itself would do, unbatched; but under ``jax.vmap`` a cond on a
    batched predicate becomes a ``select`` that runs both branches for every sequence, so the
    rarely needed robust pass would cost every batch as much as the fast one. The predicate here is
    "some sequence of the batch needs it" (:func:`_any_in_batch`, unbatched), and within that
    branch each sequence selects its own result, so every sequence gets what it gets unbatched.
    Derivatives are those of the same ``cond`` (the predicate is boolean).
    """

    def redo():
        again = robust(*robust_args)
        take = _rows_to_redo(needed)
        return jax.tree.map(lambda r, f: jnp.where(take, r, f), again, fast)

    return lax.cond(_any_in_batch(needed), redo, lambda: fast)
