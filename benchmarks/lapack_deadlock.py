"""Regression check for an XLA:CPU deadlock: repeated calls of vmapped programs with batched LAPACK calls.

With jaxlib 0.10.2, two independent batched LAPACK calls in one program can deadlock XLA:CPU on a
2-thread intra-op pool: a kernel with enough work splits its batch into chunks on the pool and blocks
until they finish, so when both pool threads run such a kernel, neither chunk queue is served (native
stacks: both ``tf_XLAEigen`` threads in ``jax::ParallelBatchMap`` -> ``BlockingCounter::Wait``).
Under ``jax.vmap`` with a shared model the batch becomes the right-hand sides of the solves, which is
what makes them large. Each task is a program that hangs this way when written naively:

- ``filter`` / ``smoother``: the parallel Kalman filter / smoother at Dx > 8 (library path). Two
  solves per associative-scan combination hang in about half of the runs; the combination makes one
  LAPACK chain (none at Dx, Dy <= 8).
- ``gradient``: ``jax.grad`` of the summed log-likelihood of a vmapped sequential Kalman filter at
  Dx = 12 with missing entries, so that each sequence has its own covariances (a training step).
  The derivative rules of ``cholesky`` and ``triangular_solve`` make several independent solves over
  the whole batch per step (with the library functions: a hang within 8 calls in 2 of 3 runs);
  ``ssmjax._linalg`` factors a stack of matrices one matrix per call.
- ``path-density``: ``lgssm_log_joint`` of posterior draws plus ``lgssm_posterior_entropy`` over
  20 000 draws of a time-varying model (the Kalman VAE's sampled objective). Three separate solves
  for the initial, transition and emission densities hang at the second call; they are one stacked
  factorisation (unrolled at these sizes).

Runs ``--calls`` calls and exits 0, or exits 3 printing ``HANG`` if one call takes longer than
``--watchdog`` seconds (the first call, which compiles, gets ``--first-watchdog``, 120 s). Repeat it
a few times: the hang was intermittent. ``tests/test_lgssm_parallel.py::test_vmapped_library_path_does_not_deadlock``
runs it.

    python benchmarks/lapack_deadlock.py [--task filter|smoother|gradient|path-density] [--calls 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--task", choices=("filter", "smoother", "gradient", "path-density"), default="filter")
ap.add_argument("--batch", type=int, default=None, help="default 64 (filter, smoother), 4000 (gradient), 20000 draws")
ap.add_argument("--num-timesteps", type=int, default=None, help="default 200 (filter, smoother), 50 (gradient), 20")
ap.add_argument("--state-dim", type=int, default=None, help="default 12 (above 8 the parallel filter uses LAPACK), 4")
ap.add_argument("--emission-dim", type=int, default=None, help="default 4, 2 (path-density)")
ap.add_argument("--calls", type=int, default=60)
ap.add_argument("--watchdog", type=float, default=15.0)
ap.add_argument("--first-watchdog", type=float, default=120.0, help="limit for the first call (compiles)")
ARGS = ap.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ssmjax  # noqa: E402

_started = {"t": None, "limit": None, "call": None}


def _watch():
    while True:
        time.sleep(0.5)
        t = _started["t"]
        if t is not None and time.monotonic() - t > _started["limit"]:
            print(f"HANG at call {_started['call']}", flush=True)
            os._exit(3)


def _program(rng):
    """``(run, argument)``: the jitted, vmapped program of ``--task`` and its batched input."""
    path = ARGS.task == "path-density"
    dx = ARGS.state_dim or (4 if path else 12)
    dy = ARGS.emission_dim or (2 if path else 4)
    batch = ARGS.batch or {"path-density": 20000, "gradient": 4000}.get(ARGS.task, 64)
    num_timesteps = ARGS.num_timesteps or {"path-density": 20, "gradient": 50}.get(ARGS.task, 200)
    q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    model = ssmjax.LGSSM(
        initial_mean=f32(np.zeros(dx)), initial_cov=f32(np.eye(dx)), transition_matrix=f32(0.95 * q),
        transition_cov=f32(0.1 * np.eye(dx)), emission_matrix=f32(rng.normal(size=(dy, dx)) / np.sqrt(dx)),
        emission_cov=f32(0.5 * np.eye(dy)),
    )
    if ARGS.task == "gradient":
        ys = np.asarray(rng.normal(size=(batch, num_timesteps, dy)), np.float32)
        ys[:, ::7, 0] = np.nan

        def total(m, ys):
            return jnp.sum(jax.vmap(lambda y: ssmjax.kalman_filter(m, y).marginal_loglik)(ys))

        return jax.jit(lambda ys: jax.grad(total)(model, ys).emission_cov), f32(ys)
    if not path:
        fn = ssmjax.rts_smoother if ARGS.task == "smoother" else ssmjax.kalman_filter
        run = jax.jit(jax.vmap(lambda y: fn(model, y, parallel=True).marginal_loglik))
        return run, f32(rng.normal(size=(batch, num_timesteps, dy)))
    # one sequence, a time-varying model shared by every draw, as in the Kalman VAE's objective
    rotations = np.stack([np.linalg.qr(rng.normal(size=(dx, dx)))[0] for _ in range(num_timesteps - 1)])
    model = eqx.tree_at(lambda m: m.transition_matrix, model, f32(0.95 * rotations))
    y = f32(rng.normal(size=(num_timesteps, dy)))
    post = ssmjax.rts_smoother(model, y)

    def estimate(key):
        z = ssmjax.lgssm_sample_posterior(model, y, key=key)
        return ssmjax.lgssm_log_joint(model, z, y) + ssmjax.lgssm_posterior_entropy(post)

    return jax.jit(jax.vmap(estimate)), jax.random.split(jax.random.key(0), batch)


def main():
    ssmjax.set_value_checks(False)
    run, argument = _program(np.random.default_rng(0))
    threading.Thread(target=_watch, daemon=True).start()
    start = time.perf_counter()
    for call in range(ARGS.calls):
        _started.update(call=call, limit=ARGS.first_watchdog if call == 0 else ARGS.watchdog, t=time.monotonic())
        out = jax.block_until_ready(run(argument))
        _started["t"] = None
    print(f"ok: {ARGS.task}, {ARGS.calls} calls in {time.perf_counter() - start:.1f} s, "
          f"sum of outputs {float(jnp.sum(out)):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
