"""Kalman filter / RTS smoother speed: ssmjax vs dynamax vs pykalman, in one process.

T = 10^4, (Dx, Dy) in {(2, 1), (8, 4), (32, 8)}, float32. The model is time-invariant, so
ssmjax takes its steady-state path (``ssmjax._lgssm.steady``); the full recursion, which
time-varying models run, is timed alongside ("ssmjax_full"). jit warm (compile time
reported separately), ``block_until_ready``, median of repeats, ratios printed and saved
as JSON to ``benchmarks/results/lgssm_inference.json`` with date, machine and versions.
ssmjax and dynamax are timed in interleaved rounds (one call of each per round), so that
a change in the machine's load during the run reaches both sides of a ratio alike;
pykalman, ~100x slower, is timed on its own afterwards.

    python benchmarks/lgssm_inference.py [--quick] [--device cpu|gpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (and pykalman once)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--num-timesteps", type=int, default=10_000)
    ap.add_argument("--dims", default="2x1,8x4,32x8", help="comma-separated DxxDy pairs")
    ap.add_argument("--no-peers", action="store_true", help="time ssmjax only")
    ap.add_argument(
        "--out",
        default=str(pathlib.Path(__file__).resolve().parent / "results" / "lgssm_inference.json"),
    )
    return ap.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cuda" if ARGS.device == "gpu" else "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import ssmjax  # noqa: E402
from _common import dynamax_lgssm_params, installed_versions, write_record  # noqa: E402


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _compile_time(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _interleaved(calls: dict, repeats: int) -> dict:
    """``{key: fn}`` -> ``{key: dict(median_s, times_s, compile_s)}``: the first call of each
    (compilation) is timed apart, then every fn runs once per round, ``repeats`` rounds."""
    out = {key: dict(compile_s=_compile_time(fn), times_s=[]) for key, fn in calls.items()}
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            out[key]["times_s"].append(time.perf_counter() - t0)
    for res in out.values():
        res["median_s"] = statistics.median(res["times_s"])
    return out


def make_problem(dx, dy, T, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dx, dx))
    q, _ = np.linalg.qr(a)
    A = 0.95 * q
    Q = 0.1 * np.eye(dx)
    C = rng.normal(size=(dy, dx)) / np.sqrt(dx)
    R = 0.5 * np.eye(dy)
    m0, P0 = np.zeros(dx), np.eye(dx)
    x = np.zeros(dx)
    ys = np.zeros((T, dy))
    for t in range(T):
        ys[t] = C @ x + rng.normal(size=dy) * np.sqrt(0.5)
        x = A @ x + rng.normal(size=dx) * np.sqrt(0.1)
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return dict(m0=f32(m0), P0=f32(P0), A=f32(A), Q=f32(Q), C=f32(C), R=f32(R)), f32(ys)


def ssmjax_calls(p, ys):
    model = ssmjax.LGSSM(
        initial_mean=jnp.asarray(p["m0"]), initial_cov=jnp.asarray(p["P0"]),
        transition_matrix=jnp.asarray(p["A"]), transition_cov=jnp.asarray(p["Q"]),
        emission_matrix=jnp.asarray(p["C"]), emission_cov=jnp.asarray(p["R"]),
    )
    y = jnp.asarray(ys)
    filt = jax.jit(lambda m, y: ssmjax.kalman_filter(m, y))
    smooth = jax.jit(lambda m, y: ssmjax.rts_smoother(m, y))
    return {"filter": lambda: filt(model, y), "smoother": lambda: smooth(model, y)}


def ssmjax_full_calls(p, ys):
    """The full recursion on the same problem: what time-varying models, ``method="sqrt"`` and
    sequences whose covariances never settle run (the steady-state path switched off)."""
    from ssmjax._lgssm import inference as lgssm_inference

    model = ssmjax.LGSSM(
        initial_mean=jnp.asarray(p["m0"]), initial_cov=jnp.asarray(p["P0"]),
        transition_matrix=jnp.asarray(p["A"]), transition_cov=jnp.asarray(p["Q"]),
        emission_matrix=jnp.asarray(p["C"]), emission_cov=jnp.asarray(p["R"]),
    )
    y = jnp.asarray(ys)
    kw = dict(method="standard", ops=lgssm_inference._ops_for(model), transient_steps=y.shape[0])
    return {
        "filter": lambda: lgssm_inference._filter_jit(model, y, None, None, **kw),
        "smoother": lambda: lgssm_inference._smoother_jit(model, y, None, None, **kw),
    }


def dynamax_calls(p, ys):
    from dynamax.linear_gaussian_ssm import lgssm_filter, lgssm_smoother

    params = dynamax_lgssm_params(p)
    y = jnp.asarray(ys)
    filt = jax.jit(lambda pr, y: lgssm_filter(pr, y))
    smooth = jax.jit(lambda pr, y: lgssm_smoother(pr, y))
    return {"filter": lambda: filt(params, y), "smoother": lambda: smooth(params, y)}


def bench_pykalman(p, ys, repeats):
    from pykalman import KalmanFilter

    kf = KalmanFilter(
        transition_matrices=p["A"], observation_matrices=p["C"], transition_covariance=p["Q"],
        observation_covariance=p["R"], initial_state_mean=p["m0"], initial_state_covariance=p["P0"],
    )
    out = {}
    for name, fn in (("filter", lambda: kf.filter(ys)), ("smoother", lambda: kf.smooth(ys))):
        median, times = _time(fn, repeats)
        out[name] = dict(median_s=median, times_s=times, compile_s=0.0)
    return out


def main():
    repeats = 5 if ARGS.quick else 11
    py_repeats = 1 if ARGS.quick else 3
    T = ARGS.num_timesteps
    dims = [tuple(int(v) for v in d.split("x")) for d in ARGS.dims.split(",")]
    results = []
    for dx, dy in dims:
        p, ys = make_problem(dx, dy, T)
        calls = {("ssmjax", task): fn for task, fn in ssmjax_calls(p, ys).items()}
        calls.update({("ssmjax_full", task): fn for task, fn in ssmjax_full_calls(p, ys).items()})
        row = dict(Dx=dx, Dy=dy, T=T)
        if not ARGS.no_peers:
            try:
                calls.update({("dynamax", task): fn for task, fn in dynamax_calls(p, ys).items()})
            except ImportError as err:  # peer not installed
                row["dynamax"] = dict(error=str(err))
        for (lib, task), res in _interleaved(calls, repeats).items():
            row.setdefault(lib, {})[task] = res
        if not ARGS.no_peers:
            try:
                row["pykalman"] = bench_pykalman(p, ys, py_repeats)
            except ImportError as err:  # peer not installed
                row["pykalman"] = dict(error=str(err))
        for peer in ("dynamax", "pykalman"):
            if peer in row and "error" not in row[peer]:
                row[f"speedup_vs_{peer}"] = {
                    k: row[peer][k]["median_s"] / row["ssmjax"][k]["median_s"] for k in ("filter", "smoother")
                }
        results.append(row)
        line = f"(Dx={dx:2d}, Dy={dy}) "
        for k in ("filter", "smoother"):
            line += f"| {k}: ssmjax {1e3 * row['ssmjax'][k]['median_s']:8.2f} ms "
            line += f"(full recursion {1e3 * row['ssmjax_full'][k]['median_s']:8.2f} ms) "
            for peer in ("dynamax", "pykalman"):
                if f"speedup_vs_{peer}" in row:
                    line += (
                        f"{peer} {1e3 * row[peer][k]['median_s']:8.1f} ms "
                        f"(x{row[f'speedup_vs_{peer}'][k]:.1f}) "
                    )
        print(line, flush=True)
    record = dict(
        benchmark="lgssm_inference",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(
            platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
            device=str(jax.devices()[0]),
        ),
        versions=installed_versions(("jax", "jaxlib", "equinox", "numpy", "dynamax", "pykalman")),
        settings=dict(
            quick=ARGS.quick, repeats=repeats, pykalman_repeats=py_repeats, dtype="float32",
            timing="ssmjax and dynamax in interleaved rounds; pykalman on its own",
        ),
        results=results,
    )
    write_record(ARGS.out, record)


if __name__ == "__main__":
    main()
