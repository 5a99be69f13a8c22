"""EM for the emission families beyond the Gaussian: ssmjax vs dynamax and hmmlearn, in one process.

``linreg`` (a linear regression per state on 2 inputs), ``arhmm`` (first-order autoregression),
``logreg`` and ``poisreg`` (a logistic or Poisson regression per state on 2 inputs, one output)
are the input-driven families; hmmlearn has none of them, dynamax no Poisson regression.

Each family is fitted by each library to the same padded batch (K = 5 states, B = 100
sequences of T = 1000 steps, 50 EM iterations, no early stop), each from its own default
initialisation. "first" includes compilation (ssmjax's and dynamax's first call in this
process), "compiled" is a second call with equal shapes; hmmlearn compiles nothing. ssmjax's
"E-step only" first call, with the emissions frozen, is timed last in each row.

    python benchmarks/families.py               # full sizes
    python benchmarks/families.py --repeats 3   # each time the median over 3 processes
    python benchmarks/families.py --quick       # B = 10, T = 200, 10 iterations
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", False)

K, D, M, TRIALS, INPUTS = 5, 3, 2, 10, 2


def simulate(family, rng, num_seq, num_timesteps):
    """Data of a K-state sticky chain whose states differ in their emission law."""
    transition = np.full((K, K), 0.05 / (K - 1))
    np.fill_diagonal(transition, 0.95)
    z = np.zeros((num_seq, num_timesteps), int)
    z[:, 0] = rng.integers(0, K, num_seq)
    for t in range(1, num_timesteps):
        u = rng.random(num_seq)[:, None]
        z[:, t] = (u > np.cumsum(transition[z[:, t - 1]], axis=1)).sum(1)
    level = z[..., None] / (K - 1)  # (B, T, 1) in [0, 1]
    if family == "bernoulli":
        return (rng.random((num_seq, num_timesteps, D)) < 0.15 + 0.7 * level).astype(np.float32)
    if family == "multinomial":
        p = np.concatenate([0.1 + 0.6 * level, 0.7 - 0.6 * level, np.full_like(level, 0.1), np.full_like(level, 0.1)], -1)
        counts = np.stack([rng.multinomial(TRIALS, row) for row in p.reshape(-1, 4)])
        return counts.reshape(num_seq, num_timesteps, 4).astype(np.float32)
    if family == "gamma":
        return rng.gamma(2.0 + 4.0 * level, 1.0).astype(np.float32)
    if family == "linreg":  # y = W_z u + b_z + noise, returned as (emissions, inputs)
        u = rng.normal(size=(num_seq, num_timesteps, INPUTS))
        w = np.random.default_rng(1).normal(size=(K, D, INPUTS))
        y = np.einsum("btdp,btp->btd", w[z], u) + 2.0 * level + 0.3 * rng.normal(size=(num_seq, num_timesteps, D))
        return y.astype(np.float32), u.astype(np.float32)
    if family in ("logreg", "poisreg"):  # one output, a GLM per state on 2 inputs: (emissions, inputs)
        u = rng.normal(size=(num_seq, num_timesteps, INPUTS))
        w = np.random.default_rng(1).normal(size=(K, INPUTS))
        eta = np.einsum("btp,btp->bt", w[z], u)[..., None] + 2.0 * level - 1.0
        y = rng.random(eta.shape) < 1 / (1 + np.exp(-eta)) if family == "logreg" else rng.poisson(np.exp(eta))
        return y.astype(np.float32), u.astype(np.float32)
    if family == "arhmm":  # y_t = a_z y_{t-1} + b_z + noise
        y = np.zeros((num_seq, num_timesteps, D))
        a = np.linspace(-0.8, 0.8, K)
        for t in range(1, num_timesteps):
            y[:, t] = a[z[:, t], None] * y[:, t - 1] + level[:, t] + 0.3 * rng.normal(size=(num_seq, D))
        return y.astype(np.float32)
    centres = 4.0 * (z[..., None] - (K - 1) / 2) + rng.normal(size=(num_seq, num_timesteps, D))
    if family == "gmm":
        centres = centres + rng.choice([-1.0, 1.0], size=(num_seq, num_timesteps, 1))
    return centres.astype(np.float32)


SSMJAX_TYPES = {"bernoulli": "bernoulli", "multinomial": "multinomial", "spherical": "gaussian_spherical",
                "tied": "gaussian_tied", "gamma": "gamma", "gmm": "gmm", "linreg": "linear_regression",
                "arhmm": "autoregressive", "logreg": "bernoulli_regression", "poisreg": "poisson_regression"}


def ssmjax_start(family, ys):
    """``(model, emissions, inputs)``: ssmjax's own initialisation of the family on ``ys``."""
    import ssmjax

    ys, us = ys if isinstance(ys, tuple) else (ys, None)
    return ssmjax.HMM.from_data(ys, K, SSMJAX_TYPES[family], inputs=us, key=jax.random.key(0)), ys, us


def ssmjax_fit(family, model, ys, us, num_iters, frozen=()):
    import ssmjax

    fitted, lls, info = ssmjax.fit_em(model, ys, inputs=us, max_iters=num_iters, tol=None, frozen=frozen)
    jax.block_until_ready(lls)
    if info.num_iters != num_iters:  # equal work: dynamax runs every iteration
        raise RuntimeError(f"{family}: ssmjax stopped after {info.num_iters} iterations ({info.status})")
    return float(lls[-1])


def run_ssmjax(family, ys, num_iters):
    return ssmjax_fit(family, *ssmjax_start(family, ys), num_iters)


def run_dynamax(family, ys, num_iters):
    import dynamax.hidden_markov_model as h

    key = jax.random.key(0)
    inputs = None
    if family == "linreg":
        y, inputs = (jnp.asarray(a) for a in ys)
        hmm = h.LinearRegressionHMM(K, INPUTS, D)
        params, props = hmm.initialize(key, method="kmeans", emissions=y.reshape(-1, D))
        params, lps = hmm.fit_em(params, props, y, inputs=inputs, num_iters=num_iters, verbose=False)
        return float(jax.block_until_ready(lps)[-1])
    if family == "logreg":  # its M-step: m_step_num_iters (50) optax steps
        y, inputs = (jnp.asarray(a) for a in ys)
        hmm = h.LogisticRegressionHMM(K, INPUTS)
        params, props = hmm.initialize(key, method="kmeans", emissions=y.reshape(-1), inputs=inputs.reshape(-1, INPUTS))
        params, lps = hmm.fit_em(params, props, y[..., 0], inputs=inputs, num_iters=num_iters, verbose=False)
        return float(jax.block_until_ready(lps)[-1])
    if family == "poisreg":
        return None  # dynamax has no Poisson regression HMM
    y = jnp.asarray(ys)
    if family == "arhmm":
        hmm = h.LinearAutoregressiveHMM(K, D, num_lags=1)
        params, props = hmm.initialize(key, method="kmeans", emissions=y.reshape(-1, D))
        inputs = jax.vmap(hmm.compute_inputs)(y)
        params, lps = hmm.fit_em(params, props, y, inputs=inputs, num_iters=num_iters, verbose=False)
        return float(jax.block_until_ready(lps)[-1])
    if family == "bernoulli":
        hmm = h.BernoulliHMM(K, D)
        params, props = hmm.initialize(key)
    elif family == "multinomial":
        hmm = h.MultinomialHMM(K, 1, 4, TRIALS)
        params, props = hmm.initialize(key)
        y = y[:, :, None, :]
    elif family == "spherical":
        hmm = h.SphericalGaussianHMM(K, D)
        params, props = hmm.initialize(key, method="kmeans", emissions=y.reshape(-1, D))
    elif family == "tied":
        hmm = h.SharedCovarianceGaussianHMM(K, D)
        params, props = hmm.initialize(key, method="kmeans", emissions=y.reshape(-1, D))
    elif family == "gamma":
        hmm = h.GammaHMM(K)
        params, props = hmm.initialize(key)
        y = y[..., 0]
    else:
        hmm = h.DiagonalGaussianMixtureHMM(K, M, D)
        params, props = hmm.initialize(key, method="kmeans", emissions=y.reshape(-1, D))
    params, lps = hmm.fit_em(params, props, y, num_iters=num_iters, verbose=False)
    jax.block_until_ready(lps)
    return float(lps[-1])


def run_hmmlearn(family, ys, num_iters):
    from hmmlearn import hmm

    common = dict(n_components=K, n_iter=num_iters, tol=-np.inf, random_state=0)
    if family == "multinomial":
        model = hmm.MultinomialHMM(n_trials=TRIALS, **common)
        X = ys.reshape(-1, 4).astype(int)
    elif family in ("spherical", "tied"):
        model = hmm.GaussianHMM(covariance_type=family, **common)
        X = ys.reshape(-1, D)
    elif family == "gmm":
        model = hmm.GMMHMM(n_mix=M, covariance_type="diag", **common)
        X = ys.reshape(-1, D)
    else:
        return None  # hmmlearn has no Bernoulli, Gamma, regression or autoregressive HMM
    model.fit(X, [ys.shape[1]] * ys.shape[0])
    return float(model.score(X, [ys.shape[1]] * ys.shape[0]))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(families, num_seq, num_timesteps, num_iters):
    """One row per family: each library's first and second call, interleaved in this process."""
    jax.block_until_ready(jax.random.key(0))  # the backend's start-up: the process's, not the first row's
    rows = []
    for family in families:
        ys = simulate(family, np.random.default_rng(0), num_seq, num_timesteps)
        row = {"family": family}
        for name, fn in (("ssmjax", run_ssmjax), ("dynamax", run_dynamax)):
            result, first = timed(fn, family, ys, num_iters)
            if result is None:  # the library has no such model
                row[name] = None
                continue
            _, second = timed(fn, family, ys, num_iters)
            row[name] = {"first_s": round(first, 3), "compiled_s": round(second, 3)}
        result, t = timed(run_hmmlearn, family, ys, num_iters)
        row["hmmlearn"] = None if result is None else {"first_s": round(t, 3)}
        # "E-step only": the same fit with the emissions frozen, its initialisation untimed (the compiled
        # forward-backward pass and transition update, emission log-likelihoods computed once); last in
        # the row, so the process's shared start-up costs are already paid
        model, ys_, us = jax.block_until_ready(ssmjax_start(family, ys))
        _, floor = timed(ssmjax_fit, family, model, ys_, us, num_iters, ("emissions",))
        row["ssmjax"]["e_step_only_first_s"] = round(floor, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def median_rows(runs):
    """Each cell of the rows of several processes, as its median (first calls vary run to run on a
    shared machine by up to a third)."""
    def cell(values):
        if values[0] is None:
            return None
        return {key: round(statistics.median(v[key] for v in values), 3) for key in values[0]}

    return [{"family": rows[0]["family"], **{lib: cell([r[lib] for r in rows]) for lib in ("ssmjax", "dynamax", "hmmlearn")}}
            for rows in zip(*runs)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--families", default="bernoulli,multinomial,spherical,tied,gamma,gmm,linreg,arhmm,logreg,poisreg")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes; each time is the median over them")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # a child of --repeats
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "families.json"))
    args = parser.parse_args()
    num_seq, num_timesteps, num_iters = (10, 200, 10) if args.quick else (100, 1000, 50)
    families = args.families.split(",")
    if args.repeats == 1:
        rows = measure(families, num_seq, num_timesteps, num_iters)
    else:
        child = [sys.executable, os.path.abspath(__file__), "--families", args.families, "--rows-only"]
        runs = []
        for r in range(args.repeats):
            print(f"process {r + 1} of {args.repeats}", flush=True)
            out = subprocess.run(child + (["--quick"] if args.quick else []), check=True, capture_output=True, text=True)
            runs.append([json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")])
            print("\n".join(json.dumps(row) for row in runs[-1]), flush=True)
        rows = median_rows(runs)
    if not (args.quick or args.rows_only):
        from _common import record, write_record

        write_record(args.out, record(("jax", "jaxlib", "equinox", "numpy", "dynamax", "hmmlearn"),
                                      dict(K=K, B=num_seq, T=num_timesteps, iters=num_iters, repeats=args.repeats), rows))


if __name__ == "__main__":
    main()
