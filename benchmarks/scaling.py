"""Weak scaling of data-parallel EM: iterations per second as devices and processes are added.

    python benchmarks/scaling.py [--share 32] [--iters 20] [--repeats 5]

Each configuration runs in fresh processes: 1, 2 or 4 CPU devices in one process
(``--xla_force_host_platform_device_count``), and two processes joined by
``jax.distributed`` on localhost with 1 or 2 devices each. Every device holds the same
share of the batch (``--share`` sequences of T = 200), so perfect weak scaling keeps the
iterations per second constant while the batch grows with the device count. Timed: a
warm ``fit_em`` of ``--iters`` iterations (``tol=None``), median of ``--repeats``, for a
Poisson HMM (K = 4) and an LGSSM (Dx = 4, Dy = 2). Results: ``results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)]  # (processes, devices per process)


def worker(out, processes, devices, process_id, address, share, iters, repeats):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax

    if processes > 1:
        jax.distributed.initialize(coordinator_address=address, num_processes=processes, process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ssmjax

    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("batch"))
    rng = np.random.default_rng(process_id)
    local = share * jax.local_device_count()
    total = share * jax.device_count()

    def global_batch(x):
        return jax.make_array_from_process_local_data(rows, x, (total,) + x.shape[1:])

    counts = global_batch(rng.poisson(rng.choice([2.0, 5.0, 9.0, 14.0], (local, 200, 1))).astype(np.float32))
    series = global_batch(np.cumsum(rng.standard_normal((local, 200, 2)), axis=1).astype(np.float32))
    models = {
        "hmm": (ssmjax.HMM(jnp.full(4, 0.25), 0.7 * jnp.eye(4) + 0.075,
                           ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [4.0], [8.0], [16.0]]))), counts),
        "lgssm": (ssmjax.LGSSM(initial_mean=jnp.zeros(4), initial_cov=jnp.eye(4),
                               transition_matrix=0.9 * jnp.eye(4), transition_cov=jnp.eye(4),
                               emission_matrix=jnp.ones((2, 4)) / 4, emission_cov=jnp.eye(2)), series),
    }
    result = {"processes": jax.process_count(), "devices": jax.device_count(), "sequences": total}
    for name, (model, data) in models.items():
        start = time.perf_counter()
        jax.block_until_ready(ssmjax.fit_em(model, data, max_iters=iters, tol=None))
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _, lls, _ = ssmjax.fit_em(model, data, max_iters=iters, tol=None)
            jax.block_until_ready(lls)
            times.append(time.perf_counter() - start)
        result[name] = {"first_call_s": first, "median_s": statistics.median(times),
                        "iters_per_s": iters / statistics.median(times)}
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=int, default=32, help="sequences per device")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scaling.json"))
    parser.add_argument("--worker", nargs=5, metavar=("OUT", "PROCESSES", "DEVICES", "ID", "ADDRESS"))
    args = parser.parse_args()
    if args.worker:
        out, processes, devices, process_id, address = args.worker
        worker(out, int(processes), int(devices), int(process_id), address, args.share, args.iters, args.repeats)
        return
    sys.path.insert(0, HERE)
    from _common import record, write_record

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    rows = []
    for processes, devices in CONFIGS:
        out = os.path.join("/tmp", f"ssmjax-scaling-{processes}x{devices}.json")
        address = f"127.0.0.1:{_free_port()}"
        procs = [subprocess.Popen([sys.executable, __file__, "--share", str(args.share), "--iters", str(args.iters),
                                   "--repeats", str(args.repeats), "--worker", out, str(processes), str(devices),
                                   str(i), address], env=env) for i in range(processes)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"configuration {processes}x{devices} failed")
        with open(out) as f:
            rows.append(json.load(f))
        print(json.dumps(rows[-1]))
    write_record(args.out, record(("jax", "jaxlib", "equinox", "numpy"),
                                  dict(share=args.share, iters=args.iters, timesteps=200, repeats=args.repeats), rows))


if __name__ == "__main__":
    main()
