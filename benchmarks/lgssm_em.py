"""Kalman EM over a batch, first call included: ssmjax ``fit_em`` vs dynamax ``LinearGaussianSSM.fit_em``.

B = 50 sequences of T = 1000 steps, (Dx, Dy) = (4, 2), 20 iterations, float32, the same initial model
for both (no biases, every other parameter fitted). Each library runs in a fresh process (a first
call, compilation included, can be timed once per process), then a second call; ``--repeats N``
alternates the libraries N times and reports medians of the per-run ratios.

    python benchmarks/lgssm_em.py [--repeats 3] [--out benchmarks/results/lgssm_em.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

DX, DY, T, B, ITERS = 4, 2, 1000, 50, 20


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    A = np.linalg.qr(rng.standard_normal((DX, DX)))[0] * 0.95
    C = rng.standard_normal((DY, DX))
    ys = np.zeros((B, T, DY))
    x = rng.standard_normal((B, DX))
    for t in range(T):
        ys[:, t] = x @ C.T + rng.normal(size=(B, DY)) * np.sqrt(0.5)
        x = x @ A.T + rng.normal(size=(B, DX)) * np.sqrt(0.1)
    start = dict(m0=np.zeros(DX), P0=np.eye(DX), A=0.5 * np.eye(DX), Q=np.eye(DX),
                 C=rng.standard_normal((DY, DX)), R=np.eye(DY))
    return ys.astype(np.float32), {k: v.astype(np.float32) for k, v in start.items()}


def _one(lib: str) -> dict:
    """Fit in this process: first call (compilation included), then a second call."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ys, s = _data()
    import jax
    import jax.numpy as jnp

    if lib == "ssmjax":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
        import ssmjax

        model = ssmjax.LGSSM(initial_mean=s["m0"], initial_cov=s["P0"], transition_matrix=s["A"],
                             transition_cov=s["Q"], emission_matrix=s["C"], emission_cov=s["R"])

        def fit():
            return ssmjax.fit_em(model, ys, max_iters=ITERS, tol=None)[1]
    else:
        from dynamax.linear_gaussian_ssm import LinearGaussianSSM

        ssm = LinearGaussianSSM(DX, DY, has_dynamics_bias=False, has_emissions_bias=False)
        params, props = ssm.initialize(
            jax.random.key(0), initial_mean=jnp.asarray(s["m0"]), initial_covariance=jnp.asarray(s["P0"]),
            dynamics_weights=jnp.asarray(s["A"]), dynamics_covariance=jnp.asarray(s["Q"]),
            emission_weights=jnp.asarray(s["C"]), emission_covariance=jnp.asarray(s["R"]),
        )
        data = jnp.asarray(ys)

        def fit():
            return ssm.fit_em(params, props, data, num_iters=ITERS, verbose=False)[1]

    times, lls = [], None
    for _ in range(2):
        start = time.perf_counter()
        lls = jax.block_until_ready(fit())
        times.append(time.perf_counter() - start)
    return dict(first_call_s=times[0], second_call_s=times[1], final_loglik=float(lls[-1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", choices=("ssmjax", "dynamax"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "lgssm_em.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one)))
        return
    runs = []
    for i in range(args.repeats):
        run = {}
        for lib in ("ssmjax", "dynamax"):
            out = subprocess.run([sys.executable, __file__, "--one", lib], capture_output=True, text=True, check=True)
            run[lib] = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"run {i}: " + ", ".join(f"{k} first {v['first_call_s']:.2f} s, second {v['second_call_s']:.2f} s, "
                                      f"loglik {v['final_loglik']:.1f}" for k, v in run.items()), flush=True)
    ratios = {key: [r["dynamax"][key] / r["ssmjax"][key] for r in runs] for key in ("first_call_s", "second_call_s")}
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from _common import installed_versions, write_record

    record = dict(
        benchmark="lgssm_em", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count()),
        versions=installed_versions(("jax", "jaxlib", "equinox", "numpy", "dynamax")),
        settings=dict(B=B, T=T, Dx=DX, Dy=DY, iters=ITERS, dtype="float32", repeats=args.repeats),
        runs=runs, median_ratio={k: statistics.median(v) for k, v in ratios.items()},
    )
    print("dynamax / ssmjax, median of per-run ratios: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in record["median_ratio"].items()))
    write_record(args.out, record)


if __name__ == "__main__":
    main()
