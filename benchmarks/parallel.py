"""Benchmark: sequential (``lax.scan``) vs parallel-in-time (``lax.associative_scan``) inference.

HMM, K = 16 states, float32, one sequence, T in {10^2, 10^3, 10^4, 10^5} (and 10^6 without
``--quick``), for the filter, the smoother and Viterbi. Each function is jitted and warmed up
(compile time reported separately), timed with ``block_until_ready``, median of repeats (>= 5).
Value checks are switched off (they are identical in both paths). Prints a table with the
parallel/sequential ratio and, per algorithm, the crossover: the smallest T at which the parallel
version is faster (on CPU the parallel versions do O(T K^3) work against O(T K^2) and are expected
to lose; the benefit needs a GPU/TPU, ``--device gpu``).

Usage::

    python benchmarks/parallel.py [--quick] [--device cpu|gpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys


def _parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T up to 10^5 and 5 repeats")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "parallel.json"))
    return parser.parse_args()


ARGS = _parse()
os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu" if ARGS.device == "gpu" else "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ssmjax  # noqa: E402
from _common import compile_and_time  # noqa: E402
from ssmjax._hmm import decoding as _decoding  # noqa: E402
from ssmjax._hmm import rules as _rules  # noqa: E402
from ssmjax._hmm import parallel as _parallel  # noqa: E402

NUM_STATES = 16
TIMESTEPS = (10**2, 10**3, 10**4, 10**5) if ARGS.quick else (10**2, 10**3, 10**4, 10**5, 10**6)
REPEATS = 5 if ARGS.quick else 9


def _timing(fn, *args):
    """(compile seconds, median run seconds) of a jitted function (fewer repeats at T = 10^6)."""
    num_timesteps = max(a.shape[0] for a in jax.tree.leaves(args) if getattr(a, "ndim", 0) >= 2)
    compile_s, median_s, _ = compile_and_time(fn, *args, repeats=REPEATS if num_timesteps < 10**6 else 5)
    return compile_s, median_s


def _model(num_timesteps, num_states=NUM_STATES, seed=0):
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(num_states)).astype(np.float32)
    A = (0.8 * np.eye(num_states) + 0.2 * rng.dirichlet(np.ones(num_states), num_states)).astype(np.float32)
    ll = rng.normal(size=(num_timesteps, num_states)).astype(np.float32)
    length = jnp.asarray(num_timesteps, jnp.int32)
    return jnp.asarray(pi), jnp.asarray(A), jnp.asarray(ll), length


# The private jitted algorithms (validation is identical for both and excluded).
HMM_FUNCTIONS = {
    "filter": (_rules.filter_program, _parallel._filter_parallel),
    "smoother": (_rules.smoother_program, _parallel._smoother_parallel),
    "viterbi": (_decoding.viterbi_program, _parallel._viterbi_parallel),
}


def _hmm_rows():
    rows = []
    for num_timesteps in TIMESTEPS:
        args = _model(num_timesteps)
        for name, (seq_fn, par_fn) in HMM_FUNCTIONS.items():
            seq_compile, seq_s = _timing(seq_fn, *args)
            par_compile, par_s = _timing(par_fn, *args)
            row = dict(
                model="hmm",
                algorithm=name,
                K=NUM_STATES,
                T=num_timesteps,
                sequential_s=seq_s,
                parallel_s=par_s,
                parallel_over_sequential=par_s / seq_s,
                sequential_compile_s=seq_compile,
                parallel_compile_s=par_compile,
            )
            print(
                f"  hmm {name:9s} T={num_timesteps:>8d}  seq {seq_s * 1e3:10.3f} ms  "
                f"par {par_s * 1e3:10.3f} ms  ratio {par_s / seq_s:7.2f}",
                flush=True,
            )
            rows.append(row)
    return rows


# --- LGSSM rows (parallel Kalman filter / RTS smoother) -------------------------------------
STATE_DIM, EMISSION_DIM = 4, 2


def _lgssm_args(num_timesteps, seed=0):
    """A stable Dx = 4, Dy = 2 float32 model and emissions sampled from it (full length)."""
    from ssmjax._lgssm.inference import lgssm_sample

    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(STATE_DIM, STATE_DIM)))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    model = ssmjax.LGSSM(
        initial_mean=f32(np.zeros(STATE_DIM)), initial_cov=f32(np.eye(STATE_DIM)),
        transition_matrix=f32(0.95 * rotation), transition_cov=f32(0.1 * np.eye(STATE_DIM)),
        emission_matrix=f32(rng.normal(size=(EMISSION_DIM, STATE_DIM))), emission_cov=f32(0.5 * np.eye(EMISSION_DIM)),
    )
    _, emissions = lgssm_sample(model, num_timesteps, key=jax.random.key(seed))
    return model, emissions, None, jnp.asarray(num_timesteps, jnp.int32)


def _lgssm_functions():
    import functools

    from ssmjax._lgssm import inference as lgssm_sequential
    from ssmjax._lgssm import parallel as lgssm_parallel

    ops = lgssm_sequential.choose_ops(STATE_DIM, EMISSION_DIM)
    seq_filter = functools.partial(lgssm_sequential._filter_impl, method="standard", ops=ops)
    seq_smoother = functools.partial(lgssm_sequential._smoother_impl, method="standard", ops=ops)
    return {
        "filter": (seq_filter, lgssm_parallel._filter_parallel),
        "smoother": (seq_smoother, lgssm_parallel._smoother_parallel),
    }


def _lgssm_rows():
    """Sequential (standard covariance form, as ssmjax.kalman_filter/rts_smoother) vs parallel, float32."""
    rows = []
    functions = _lgssm_functions()
    # LGSSM rows stop at T = 10^4: a T = 10^5 run did not finish within 10 minutes on the
    # 2-core CPU these tables were measured on (not diagnosed further; see benchmarks/README.md).
    for num_timesteps in [t for t in TIMESTEPS if t <= 10**4]:
        args = _lgssm_args(num_timesteps)
        for name, (seq_fn, par_fn) in functions.items():
            seq_compile, seq_s = _timing(seq_fn, *args)
            par_compile, par_s = _timing(par_fn, *args)
            rows.append(dict(
                model="lgssm", algorithm=name, K=None, Dx=STATE_DIM, Dy=EMISSION_DIM, T=num_timesteps,
                sequential_s=seq_s, parallel_s=par_s, parallel_over_sequential=par_s / seq_s,
                sequential_compile_s=seq_compile, parallel_compile_s=par_compile,
            ))
            print(
                f"  lgssm {name:9s} T={num_timesteps:>8d}  seq {seq_s * 1e3:10.3f} ms  "
                f"par {par_s * 1e3:10.3f} ms  ratio {par_s / seq_s:7.2f}",
                flush=True,
            )
    return rows
# ---------------------------------------------------------------------------------------------


def _crossovers(rows):
    """Per (model, algorithm): the smallest T at which parallel is faster, or None."""
    out = {}
    for row in rows:
        key = f"{row['model']}/{row['algorithm']}"
        out.setdefault(key, None)
        if row["parallel_s"] < row["sequential_s"] and out[key] is None:
            out[key] = row["T"]
    return out


def _versions():
    versions = {"python": sys.version.split()[0], "jax": jax.__version__, "numpy": np.__version__}
    for mod in ("jaxlib", "equinox"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    versions["ssmjax"] = ssmjax.__version__
    return versions


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _table(rows, crossovers):
    lines = [
        "| model | algorithm | K | T | sequential (ms) | parallel (ms) | parallel / sequential |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['algorithm']} | {r['K']} | {r['T']:.0e} | {r['sequential_s'] * 1e3:.3f} | "
            f"{r['parallel_s'] * 1e3:.3f} | {r['parallel_over_sequential']:.2f} |"
        )
    lines.append("")
    for key, value in crossovers.items():
        lines.append(f"crossover {key}: " + (f"parallel faster from T = {value}" if value else "parallel never faster"))
    return "\n".join(lines)


def main():
    ssmjax.set_value_checks(False)
    device = jax.devices()[0]
    print(f"device {device}, K = {NUM_STATES}, float32, repeats {REPEATS}", flush=True)
    rows = _hmm_rows() + _lgssm_rows()
    crossovers = _crossovers(rows)
    print()
    print(_table(rows, crossovers))
    payload = {
        "benchmark": "parallel",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "device": f"{device.platform}:{device.id}",
            "device_kind": getattr(device, "device_kind", None),
        },
        "versions": _versions(),
        "settings": {"quick": ARGS.quick, "repeats": REPEATS, "dtype": "float32", "value_checks": False},
        "timings": rows,
        "crossover_T": crossovers,
    }
    os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
    with open(ARGS.out, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"\nwrote {ARGS.out}")


if __name__ == "__main__":
    main()
