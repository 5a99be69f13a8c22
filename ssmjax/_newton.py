"""Safeguarded Newton steps for the generalised M-steps (GLM emissions, input-driven transitions).

Each step computes a Newton direction and then evaluates the objective's gain at the step lengths
``0, 1, 1/2, ..., 2^-(halvings-1)`` all at once, keeping the best. Length ``0`` is among them, so
no step lowers the objective, and an M-step built from these never lowers EM's likelihood. The
lengths are evaluated together rather than by a backtracking ``lax.while_loop``: such a loop,
nested in ``vmap`` inside the ``fori_loop`` of the M-step and the ``while_loop`` of
:func:`ssmjax.fit_em`, spun forever on XLA:CPU (jaxlib 0.10.2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

NEWTON_STEPS = 10
HALVINGS = 10


def finite_or_zero(step, axis=-1):
    """``step`` where it is finite along ``axis``, zero elsewhere (a singular system moves nothing)."""
    return jnp.where(jnp.all(jnp.isfinite(step), axis=axis, keepdims=True), step, 0.0)


def safeguarded_newton(
    coefs,
    direction: Callable,
    gain: Callable,
    apply: Callable,
    *,
    num_steps: int = NEWTON_STEPS,
    halvings: int = HALVINGS,
):
    """``coefs`` after ``num_steps`` safeguarded Newton steps.

    Args:
        coefs: the starting coefficients.
        direction: ``coefs -> step``, the Newton step (non-finite entries should be zeroed).
        gain: ``(coefs, step, length) -> objective(apply(coefs, length, step)) - objective(coefs)``,
            an array of gains, one per independent problem (any shape, ``()`` for one).
        apply: ``(coefs, length, step) -> new coefs``; ``length`` has the shape of the gains.
    """
    lengths = jnp.concatenate([jnp.zeros(1, coefs.dtype), 0.5 ** jnp.arange(halvings, dtype=coefs.dtype)])

    def step(_, c):
        move = direction(c)
        gains = jax.vmap(lambda a: gain(c, move, a))(lengths)  # (S, ...); length 0 gains exactly 0
        best = jnp.argmax(jnp.where(jnp.isfinite(gains), gains, -jnp.inf), axis=0)
        return apply(c, lengths[best], move)

    return jax.lax.fori_loop(0, num_steps, step, coefs)
