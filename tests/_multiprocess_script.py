"""One process of a multi-process fit (see tests/test_multiprocess.py); writes a JSON file.

``python _multiprocess_script.py OUT.json`` fits on one process (one CPU device);
``python _multiprocess_script.py OUT.json ADDRESS NUM_PROCESSES PROCESS_ID`` joins
``jax.distributed`` with two CPU devices in this process. Either way the same global
batch is fitted: each process builds only its own rows of it, and
``jax.make_array_from_process_local_data`` assembles the global array.
"""

import json
import os
import sys

distributed = len(sys.argv) > 2
os.environ["JAX_PLATFORMS"] = "cpu"
if distributed:  # added to the inherited flags (the compile-speed option of tests/conftest.py)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
if distributed:
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=int(sys.argv[3]),
                               process_id=int(sys.argv[4]))

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ssmjax  # noqa: E402

B, T = 8, 50
mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
rows = NamedSharding(mesh, P("batch"))


def global_batch(array):
    """The global ``array`` sharded on its first axis, from this process's rows only."""
    per_process = array.shape[0] // jax.process_count()
    start = jax.process_index() * per_process
    return jax.make_array_from_process_local_data(rows, array[start:start + per_process], array.shape)


def gathered(x):
    """A (possibly sharded) result as one NumPy array on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


rng = np.random.default_rng(0)
counts = rng.poisson(np.where(rng.random((B, T, 1)) < 0.5, 3.0, 12.0)).astype(float)
lengths = np.array([50, 41, 50, 17, 33, 50, 29, 8], np.int32)
counts[np.arange(T)[None, :] >= lengths[:, None]] = np.nan
series = np.cumsum(rng.standard_normal((B, T, 1)), axis=1)
series[2, 5:9] = np.nan  # missing values: the general E-step

y, n, z = global_batch(counts), global_batch(lengths), global_batch(series)
out = {"devices": jax.device_count(), "processes": jax.process_count(),
       "sharded": not y.is_fully_addressable if distributed else True}

hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.2, 0.8]]),
                 ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [20.0]])))
fit, lls, info = ssmjax.fit_em(hmm, y, lengths=n, max_iters=12, tol=0.0)
out["hmm_em_lls"] = np.asarray(lls).tolist()
out["hmm_em_rates"] = np.asarray(fit.emissions.rates).ravel().tolist()
out["hmm_loglik"] = float(fit.log_likelihood(y, lengths=n))
out["hmm_bic"] = float(fit.bic(y, lengths=n))

starts = eqx.filter_vmap(lambda r: ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.2, 0.8]]),
                                              ssmjax.PoissonEmissions(rates=r)))(jnp.array([[[1.0], [20.0]],
                                                                                            [[5.0], [6.0]]]))
best, scores, _ = ssmjax.fit_em_restarts(starts, y, lengths=n, max_iters=8, tol=0.0)
out["hmm_restart_scores"] = np.asarray(scores).tolist()

sgd, losses = ssmjax.fit_sgd(hmm, y, optax.adam(0.05), lengths=n, num_steps=10)
out["hmm_sgd_losses"] = np.asarray(losses).tolist()

smooth = jax.vmap(lambda e, k: ssmjax.hmm_smoother(fit.initial_probs, fit.transition_matrix,
                                                   fit.log_likelihoods(e, length=k), length=k))
posterior = jax.jit(smooth)(y, n)
out["hmm_smoothed"] = gathered(posterior.smoothed_probs).ravel().tolist()
out["hmm_viterbi"] = gathered(jax.vmap(lambda e, k: fit.viterbi(e, length=k))(y, n)).ravel().tolist()

lg = ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2), transition_matrix=0.5 * jnp.eye(2),
                  transition_cov=jnp.eye(2), emission_matrix=jnp.ones((1, 2)), emission_cov=jnp.eye(1))
lg_fit, lg_lls, _ = ssmjax.fit_em(lg, z, max_iters=8, tol=0.0)
out["lgssm_em_lls"] = np.asarray(lg_lls).tolist()
out["lgssm_transition"] = np.asarray(lg_fit.transition_matrix).ravel().tolist()
_, lg_losses = ssmjax.fit_sgd(lg, z, optax.adam(0.02), num_steps=10)
out["lgssm_sgd_losses"] = np.asarray(lg_losses).tolist()
filtered = jax.jit(jax.vmap(ssmjax.kalman_filter, in_axes=(None, 0)))(lg_fit, z)
out["kalman_loglik"] = gathered(filtered.marginal_loglik).tolist()

from ssmjax.examples import distributed_fit  # noqa: E402

example = distributed_fit.main(["--sequences-per-device", "2", "--num-timesteps", "60"])
out["example_rates"] = example["rates"]
out["example_sequences"] = example["sequences"]

if jax.process_index() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
