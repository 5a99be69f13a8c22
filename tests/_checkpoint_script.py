"""Fits that tests/test_checkpoint.py kills and resumes.

``python _checkpoint_script.py run em|sgd PATH``: fit with a checkpoint at ``PATH`` after every
iteration (the test kills this process mid-run).
``python _checkpoint_script.py finish DIR``: resume both killed fits from ``DIR/em.ckpt`` and
``DIR/sgd.ckpt``, run the same fits uninterrupted (with and without checkpoints), and write the
results to ``DIR/result.json``.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ssmjax  # noqa: E402

EM_ITERS, SGD_STEPS = 100, 120

rng = np.random.default_rng(0)
series = np.cumsum(rng.standard_normal((8, 100, 2)), axis=1)
lgssm = ssmjax.LGSSM(initial_mean=jnp.zeros(3), initial_cov=jnp.eye(3), transition_matrix=0.9 * jnp.eye(3),
                     transition_cov=jnp.eye(3), emission_matrix=jnp.ones((2, 3)) / 3, emission_cov=jnp.eye(2))
counts = rng.poisson(np.where(rng.random((8, 100, 1)) < 0.5, 3.0, 12.0)).astype(float)
hmm = ssmjax.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.8, 0.2], [0.2, 0.8]]),
                 ssmjax.PoissonEmissions(rates=jnp.array([[1.0], [20.0]])))


def fit(kind, path, every):
    """The fit under test: (log-likelihoods or losses, fitted parameter leaves)."""
    if kind == "em":
        model, values, _ = ssmjax.fit_em(lgssm, series, max_iters=EM_ITERS, tol=0.0, checkpoint=path,
                                         checkpoint_every=every)
    else:
        model, values = ssmjax.fit_sgd(hmm, counts, optax.adam(0.01), num_steps=SGD_STEPS, batch_size=4,
                                       checkpoint=path, checkpoint_every=every, key=jax.random.key(7))
    leaves = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(model) if hasattr(x, "dtype")]
    return {"values": np.asarray(values).tolist(), "leaves": leaves}


if sys.argv[1] == "run":
    fit(sys.argv[2], sys.argv[3], 1)
else:
    folder = sys.argv[2]
    out = {}
    for kind in ("em", "sgd"):
        path = os.path.join(folder, f"{kind}.ckpt")
        with open(path, "rb") as f:
            out[f"{kind}_killed_at"] = json.loads(f.readline())["iteration"]
        out[f"{kind}_resumed"] = fit(kind, path, 1)
        out[f"{kind}_uninterrupted"] = fit(kind, os.path.join(folder, f"{kind}-fresh.ckpt"), 1)
        out[f"{kind}_plain"] = fit(kind, None, 1)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(out, f)
