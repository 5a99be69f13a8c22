"""Regression check for an XLA:CPU deadlock: repeated calls of a vmapped parallel Kalman filter.

With jaxlib 0.10.2, two independent batched LAPACK calls in one program can deadlock XLA:CPU on a
2-thread intra-op pool (each kernel splits its batch into chunks on the pool and blocks until they
finish). ssmjax's parallel filter used to make two such calls per associative-scan combination and
hung in about half of the runs of this script; see ``benchmarks/README.md``. It now makes one LAPACK
chain per program (none at Dx, Dy <= 8).

Runs ``--calls`` calls and exits 0, or exits 3 printing ``HANG`` if one call takes longer than
``--watchdog`` seconds (the first call, which compiles, gets ``--first-watchdog``, 120 s). Repeat it
a few times: the hang was intermittent. ``tests/test_lgssm_parallel.py::test_vmapped_library_path_does_not_deadlock``
runs it.

    python benchmarks/lapack_deadlock.py [--state-dim 12 --emission-dim 4] [--smoother] [--calls 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--num-timesteps", type=int, default=200)
ap.add_argument("--state-dim", type=int, default=12, help="above 8 the library (LAPACK) path is used")
ap.add_argument("--emission-dim", type=int, default=4)
ap.add_argument("--smoother", action="store_true")
ap.add_argument("--calls", type=int, default=60)
ap.add_argument("--watchdog", type=float, default=15.0)
ap.add_argument("--first-watchdog", type=float, default=120.0, help="limit for the first call (compiles)")
ARGS = ap.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def main():
    ssmjax.set_value_checks(False)
    rng = np.random.default_rng(0)
    dx, dy = ARGS.state_dim, ARGS.emission_dim
    q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    model = ssmjax.LGSSM(
        initial_mean=f32(np.zeros(dx)), initial_cov=f32(np.eye(dx)), transition_matrix=f32(0.95 * q),
        transition_cov=f32(0.1 * np.eye(dx)), emission_matrix=f32(rng.normal(size=(dy, dx)) / np.sqrt(dx)),
        emission_cov=f32(0.5 * np.eye(dy)),
    )
    fn = ssmjax.rts_smoother if ARGS.smoother else ssmjax.kalman_filter
    run = jax.jit(jax.vmap(lambda y: fn(model, y, parallel=True)))
    ys = f32(rng.normal(size=(ARGS.batch, ARGS.num_timesteps, dy)))
    threading.Thread(target=_watch, daemon=True).start()
    start = time.perf_counter()
    for call in range(ARGS.calls):
        _started.update(call=call, limit=ARGS.first_watchdog if call == 0 else ARGS.watchdog, t=time.monotonic())
        out = jax.block_until_ready(run(ys))
        _started["t"] = None
    print(f"ok: {ARGS.calls} calls in {time.perf_counter() - start:.1f} s, "
          f"log-likelihood sum {float(jnp.sum(out.marginal_loglik)):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
