"""Data-parallel EM over several devices and hosts, with JAX's own runtime.

ssmjax needs no cluster layer of its own: ``fit_em`` and ``fit_sgd`` are jitted
programs over a batch axis, so when the batch is *sharded* over a device mesh
(``jax.sharding.NamedSharding`` on the batch axis) XLA runs each device's E-step on
its own sequences, all-reduces the summed sufficient statistics (or gradients),
and performs the M-step (or optimizer update) replicated on every device. The
answer equals the single-device one.

One host, several devices (GPUs, or fake CPU devices for a try-out)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m ssmjax.examples.distributed_fit

Several processes (one per host, or one per GPU): run the same command in each,
naming the coordinator. Each process generates or loads only its own share of the
sequences, and ``jax.make_array_from_process_local_data`` assembles the global
batch::

    python -m ssmjax.examples.distributed_fit --coordinator 10.0.0.1:1234 \\
        --num-processes 2 --process-id 0     # on host 0
    python -m ssmjax.examples.distributed_fit --coordinator 10.0.0.1:1234 \\
        --num-processes 2 --process-id 1     # on host 1

Under a cluster manager that JAX recognises (SLURM, Open MPI, Kubernetes jobs),
``--cluster`` lets ``jax.distributed.initialize()`` read all three from the
environment. ``--checkpoint PATH`` (on a file system every process sees) makes the
fit resumable: run the same command again after an interruption.

The batch size must be divisible by the total number of devices. See
``docs/distributed.md`` for the whole recipe.
"""

from __future__ import annotations

import argparse

import numpy as np


def simulate_counts(seed: int, num_sequences: int, num_timesteps: int) -> np.ndarray:
    """Counts from a 2-state Poisson HMM (rates 3 and 12), one host's share."""
    rng = np.random.default_rng(seed)
    transition = np.array([[0.95, 0.05], [0.10, 0.90]])
    rates = np.array([3.0, 12.0])
    y = np.zeros((num_sequences, num_timesteps, 1))
    for b in range(num_sequences):
        z = rng.integers(2)
        for t in range(num_timesteps):
            z = rng.choice(2, p=transition[z]) if t else z
            y[b, t, 0] = rng.poisson(rates[z])
    return y


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Data-parallel EM with jax.sharding")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host only)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--cluster", action="store_true",
                        help="let jax.distributed detect the coordinator and processes (SLURM, Open MPI, ...)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file for a resumable fit")
    parser.add_argument("--sequences-per-device", type=int, default=4)
    parser.add_argument("--num-timesteps", type=int, default=200)
    args = parser.parse_args(argv)

    import jax

    if args.cluster:
        jax.distributed.initialize()
    elif args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import ssmjax

    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, P("batch"))
    local_sequences = args.sequences_per_device * jax.local_device_count()
    local = simulate_counts(1000 + jax.process_index(), local_sequences, args.num_timesteps)
    emissions = jax.make_array_from_process_local_data(batch, local.astype(np.float32))

    model = ssmjax.HMM(
        initial_probs=jnp.array([0.5, 0.5]),
        transition_matrix=jnp.array([[0.8, 0.2], [0.2, 0.8]]),
        emissions=ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [20.0]])),
    )
    fitted, lls, _ = ssmjax.fit_em(model, emissions, max_iters=100, tol=1e-7, checkpoint=args.checkpoint)
    result = {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "sequences": int(emissions.shape[0]),
        "iterations": int(lls.shape[0]),
        "loglik": float(lls[-1]),
        "rates": np.asarray(fitted.emissions.rates[:, 0]).tolist(),
    }
    if jax.process_index() == 0:
        print(f"{result['devices']} devices in {result['processes']} process(es), "
              f"{result['sequences']} sequences sharded on the batch axis")
        print(f"EM: {result['iterations']} iterations, final log-likelihood {result['loglik']:.3f}, "
              f"rates {np.round(result['rates'], 3).tolist()}")
    return result


if __name__ == "__main__":
    main()
