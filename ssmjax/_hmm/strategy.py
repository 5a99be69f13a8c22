r"""Which path an HMM inference call takes, and why: decided here, once.

The recursions of :mod:`ssmjax._hmm.recursion` run one sequence or a batch in one of several
layouts, with the emissions exponentiated before or inside the loop; the parallel-in-time
forms of :mod:`ssmjax._hmm.parallel` are a schedule of their own. :func:`select_strategy`
makes every choice from shapes and options, :func:`ssmjax.hmm_strategy` shows it with the
reasons, and ``parallel=`` of the inference functions forces the schedule. One choice is
made at run time inside the compiled program and needs none here: a sequence whose
normalisers underflow is redone with the underflow-proof step (``rescue``).
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx

SCHEDULES = ("sequential", "parallel")

# Up to this many entries in a loop step's block (B * K), the batched passes exponentiate the
# log-likelihoods of all steps at once before the loop (one vectorised pass; the loop body is then
# a few kernels, and small blocks are bound by the per-kernel cost); from more on, inside the loop
# (no (T, B, K) array of emissions to allocate and write: large blocks are bound by memory).
PRECOMPUTED_EMISSIONS_MAX_BLOCK = 1024

# Above this many states, a batch's shifts (the row maxima) are taken for all steps before the loop:
# a row maximum over many states in the loop costs about a tenth of a step (measured K = 64).
IN_LOOP_SHIFT_MAX_STATES = 16

# At most this many states, fit_em's E-step runs the batch state-major ("TKB": the batch is the
# vectorised axis of every step); from more on batch-major rows ("TBK", one matrix product a
# step). Measured (CPU, T = 1000): K = 5, B = 100 state-major 2.3x faster; K = 16, B = 256
# batch-major 1.2x faster.
STATE_MAJOR_MAX_STATES = 8


class HMMStrategy(eqx.Module):
    """The path of an HMM inference call: what :func:`ssmjax.hmm_strategy` returns.

    Attributes:
        schedule: ``"sequential"`` (one loop over time) or ``"parallel"``
            (``lax.associative_scan``, :mod:`ssmjax._hmm.parallel`).
        batching: ``"single"`` (one sequence), ``"batched"`` (under ``jax.vmap`` with a shared
            stationary model: one loop advances the whole batch) or ``"per-sequence"`` (a batch
            of models or a time-varying matrix: each sequence's own recursion, vectorised).
        layout: the axes of the arrays the loop reads, ``"TK"`` or ``"BTK"`` (see
            :mod:`ssmjax._hmm.recursion`).
        emissions: where the shifted emissions are exponentiated (``"before-loop"``,
            ``"shifts-before-loop"`` or ``"in-loop"``).
        rescue: ``"run-time"``: a sequence whose normalisers underflow is redone with the
            underflow-proof step (the parallel schedule: by the sequential recursion), decided
            inside the compiled program.
        reasons: why each was chosen.

    Example:
        >>> import jax.numpy as jnp, ssmjax
        >>> pi, A, ll = jnp.ones(4) / 4, jnp.eye(4) * 0.6 + 0.1, jnp.zeros((100, 4))
        >>> ssmjax.hmm_strategy(pi, A, ll, batch_size=256).batching
        'batched'
    """

    schedule: str
    batching: str
    layout: str
    emissions: str
    rescue: str = "run-time"
    reasons: tuple = ()


def batch_emissions(num_seq: int, num_states: int) -> str:
    """Where a batch's loop exponentiates its emissions (see the constants above)."""
    if num_seq * num_states <= PRECOMPUTED_EMISSIONS_MAX_BLOCK:
        return "before-loop"
    return "shifts-before-loop" if num_states > IN_LOOP_SHIFT_MAX_STATES else "in-loop"


def e_step_layout(num_states: int) -> str:
    """fit_em's E-step layout: state-major for a few states, batch-major rows from more on."""
    return "TKB" if num_states <= STATE_MAJOR_MAX_STATES else "TBK"


def shared_model(in_batched, transition_matrix) -> bool:
    """Whether a ``jax.vmap`` rule runs the batched recursion: the log-likelihoods batched and the
    model (``initial_probs`` and a stationary ``transition_matrix``) shared."""
    pi_batched, trans_batched, ll_batched = in_batched[:3]
    return ll_batched and not pi_batched and not trans_batched and transition_matrix.ndim == 2


# One sequence: the filter exponentiates in the loop (no (T, K) array of emissions is kept, which
# keeps the gradient's memory at a few (T, K) arrays); the smoother before it (its backward pass
# reuses them as weights).
SINGLE_EMISSIONS = {"filter": "shifts-before-loop", "smoother": "before-loop"}


def select_strategy(
    function: str,
    num_states: int,
    time_varying: bool,
    parallel: bool = False,
    batch_size: Optional[int] = None,
    model_batched: bool = False,
) -> HMMStrategy:
    """The strategy of ``function`` (``"filter"`` or ``"smoother"``) for these shapes and options."""
    if parallel:
        return HMMStrategy(
            "parallel", "single" if batch_size is None else "per-sequence", "TK", "before-loop",
            reasons=("parallel=True: lax.associative_scan over time",
                     "a sequence whose scan underflows is redone by the sequential recursion and its rescue"),
        )
    if batch_size is None:
        return HMMStrategy(
            "sequential", "single", "TK", SINGLE_EMISSIONS[function],
            reasons=("one sequence: lax.scan over time", f"emissions for the {function}"),
        )
    if model_batched or time_varying:
        why = "a time-varying transition_matrix" if time_varying else "a batch of models"
        return HMMStrategy(
            "sequential", "per-sequence", "TK", SINGLE_EMISSIONS[function],
            reasons=(f"{why}: each sequence runs its own recursion, vectorised by jax.vmap",),
        )
    emissions = batch_emissions(batch_size, num_states)
    return HMMStrategy(
        "sequential", "batched", "BTK", emissions,
        reasons=(
            "a model shared by the batch: one loop advances all sequences (one matrix product a step)",
            f"B * K = {batch_size * num_states}: emissions {emissions} "
            f"(before the loop up to {PRECOMPUTED_EMISSIONS_MAX_BLOCK})",
        ),
    )
