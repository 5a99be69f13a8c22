"""First-use latency: how long common calls take in a fresh process, and how many XLA programs they compile.

Each scenario runs in its own new Python process (nothing cached), CPU, and reports the
wall time of the timed block and the number of XLA compilations it triggered (counted
with a ``jax.monitoring`` listener). Eagerly, every ``jnp`` operation compiles its own
small program the first time it meets a shape, so a call that runs op by op can spend
seconds compiling; ssmjax runs validation with NumPy and the numerics as one compiled
program per call.

    python benchmarks/first_use.py [--repeats 3] [--baseline PATH] [--out PATH]

``--baseline`` also times the ssmjax of another checkout (e.g. ``git worktree add
/tmp/old <commit>``), alternating the two checkouts run by run, so that a change in the
machine's load reaches both alike.
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

HERE = pathlib.Path(__file__).resolve().parent

PRELUDE = r"""
import json, os, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, SRC)
import numpy as np
import jax
import jax.numpy as jnp
import ssmjax
compiles = [0]
def _listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles[0] += 1
jax.monitoring.register_event_duration_secs_listener(_listener)
"""

# name -> (setup, timed block); the timed block must leave its results in `out`
SCENARIOS = {
    "HMM.from_data gaussian (B=100, T=1000, D=3, K=5)": (
        "rng = np.random.default_rng(0)\n"
        "ys = (rng.standard_normal((100, 1000, 3)) + 3 * rng.integers(0, 5, (100, 1000, 1))).astype(np.float32)\n",
        "out = ssmjax.HMM.from_data(ys, 5, 'gaussian', key=jax.random.key(1))\n",
    ),
    "Poisson HMM (earthquakes, T=107): from_data, marginal_loglik, viterbi, smoother": (
        "jax.config.update('jax_enable_x64', True)\n"
        "from ssmjax.datasets import load_earthquakes\n"
        "y = np.asarray(load_earthquakes().values, np.float64)[:, None]\n",
        "m = ssmjax.HMM.from_data(y[None], 2, 'poisson', key=jax.random.key(0))\n"
        "out = (m.marginal_loglik(y), m.viterbi(y), m.smoother(y).smoothed_probs,\n"
        "       m.transition_matrix, m.emissions.rates)\n",
    ),
    "LGSSM local level (Nile, T=100): construct, rts_smoother": (
        "jax.config.update('jax_enable_x64', True)\n"
        "from ssmjax.datasets import load_nile\n"
        "y = np.asarray(load_nile().values, np.float64)[:, None]\n",
        "model = ssmjax.LGSSM(initial_mean=np.zeros(1), initial_cov=np.full((1, 1), 1e7),\n"
        "    transition_matrix=np.ones((1, 1)), transition_cov=np.full((1, 1), 1400.0),\n"
        "    emission_matrix=np.ones((1, 1)), emission_cov=np.full((1, 1), 15000.0))\n"
        "out = ssmjax.rts_smoother(model, y)\n",
    ),
    "MarkovChain (5 state sequences, T=40): fit, marginal_loglik": (
        "states = np.random.default_rng(0).integers(0, 3, (5, 40))\n",
        "chain = ssmjax.MarkovChain.fit(states)\n"
        "out = (chain.transition_matrix, chain.marginal_loglik(states[0]))\n",
    ),
    "ssmjax demo (whole: 3 EM fits, inference, 2 plots)": (
        "import io, tempfile\n"
        "from ssmjax.cli import run_demo\n",
        "run_demo(out=io.StringIO(), output_dir=tempfile.mkdtemp())\nout = None\n",
    ),
}

RUN = r"""
exec(SETUP)
compiles[0] = 0
t0 = time.perf_counter()
exec(TIMED)
jax.block_until_ready(out)
print(json.dumps(dict(seconds=time.perf_counter() - t0, compiles=compiles[0])))
"""


def run_once(src: str, setup: str, timed: str) -> dict:
    code = f"SRC = {src!r}\nSETUP = {setup!r}\nTIMED = {timed!r}\n" + PRELUDE + RUN
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _commit(src: str):
    proc = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="another checkout to time alongside this one")
    ap.add_argument("--out", default=str(HERE / "results" / "first_use.json"))
    args = ap.parse_args()
    sources = {"current": str(HERE.parent)}
    if args.baseline:
        sources["baseline"] = str(pathlib.Path(args.baseline).resolve())
    rows = []
    for name, (setup, timed) in SCENARIOS.items():
        runs = {key: [] for key in sources}
        for _ in range(args.repeats):
            for key, src in sources.items():
                runs[key].append(run_once(src, setup, timed))
        row = dict(scenario=name)
        for key, rs in runs.items():
            row[key] = dict(
                median_s=statistics.median(r["seconds"] for r in rs),
                seconds=[r["seconds"] for r in rs],
                compiles=rs[0]["compiles"],
            )
        rows.append(row)
        line = "  ".join(
            f"{key}: {row[key]['median_s']:6.2f} s {row[key]['compiles']:3d} compilations" for key in sources
        )
        print(f"{line}  | {name}", flush=True)
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="minutes"),
        machine=dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count()),
        versions=dict(python=platform.python_version()),
        commits={key: _commit(src) for key, src in sources.items()},
        repeats=args.repeats,
        rows=rows,
    )
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
