"""Run under 4 fake CPU devices (see tests/test_sharding.py); prints one JSON line."""

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ssmjax  # noqa: E402
from ssmjax._fit import em as em_module  # noqa: E402

out = {"devices": jax.device_count()}
mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
batch = NamedSharding(mesh, P("batch"))
rng = np.random.default_rng(0)
y = rng.poisson(np.where(rng.random((8, 60, 1)) < 0.5, 3.0, 12.0)).astype(float)
lengths = np.array([60, 41, 60, 17, 33, 60, 52, 8])
y[np.arange(60)[None, :] >= lengths[:, None]] = np.nan
model = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.2, 0.8]]),
                   ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [20.0]])))
y_sh, len_sh = jax.device_put(y, batch), jax.device_put(lengths, batch)
out["input_sharded"] = len(y_sh.sharding.device_set) == 4

fit_1, lls_1, _ = ssmjax.fit_em(model, y, lengths=lengths, max_iters=15, tol=0.0)
fit_4, lls_4, _ = ssmjax.fit_em(model, y_sh, lengths=len_sh, max_iters=15, tol=0.0)
# (a different summation order may stop a converged run one round-off step apart)
n = min(len(lls_1), len(lls_4))
out["hmm_em_lls_maxdiff"] = float(np.max(np.abs(np.asarray(lls_1[:n]) - np.asarray(lls_4[:n]))))
out["hmm_em_rates_maxdiff"] = float(np.max(np.abs(np.asarray(fit_1.emissions.rates - fit_4.emissions.rates))))
loop = jax.jit(lambda y_, n_: em_module._em_loop(model, y_, n_, None, jnp.asarray(0.0), 30, frozenset(), False))
hlo = loop.lower(y_sh, len_sh.astype(jnp.int32)).compile().as_text()
out["hmm_em_all_reduce"] = "all-reduce" in hlo

sgd_1, losses_1 = ssmjax.fit_sgd(model, y, optax.adam(0.05), lengths=lengths, num_steps=25)
sgd_4, losses_4 = ssmjax.fit_sgd(model, y_sh, optax.adam(0.05), lengths=len_sh, num_steps=25)
out["hmm_sgd_losses_maxdiff"] = float(np.max(np.abs(np.asarray(losses_1) - np.asarray(losses_4))))

lg = ssmjax.LGSSM(initial_mean=jnp.zeros(2), initial_cov=jnp.eye(2), transition_matrix=0.5 * jnp.eye(2),
                  transition_cov=jnp.eye(2), emission_matrix=jnp.ones((1, 2)), emission_cov=jnp.eye(1))
ys = np.cumsum(rng.standard_normal((8, 40, 1)), axis=1)
lg_1, lg_lls_1, _ = ssmjax.fit_em(lg, ys, max_iters=10, tol=0.0)
lg_4, lg_lls_4, _ = ssmjax.fit_em(lg, jax.device_put(ys, batch), max_iters=10, tol=0.0)
out["lgssm_em_lls_maxdiff"] = float(np.max(np.abs(np.asarray(lg_lls_1) - np.asarray(lg_lls_4))))
out["lgssm_em_scale"] = float(np.max(np.abs(np.asarray(lg_lls_1))))

from ssmjax.examples import distributed_fit  # noqa: E402

example = distributed_fit.main(["--sequences-per-device", "2", "--num-timesteps", "80"])
out["example_devices"] = example["devices"]
out["example_rates"] = example["rates"]
print("RESULT " + json.dumps(out))
