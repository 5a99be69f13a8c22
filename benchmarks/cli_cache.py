"""Wall time of the ``ssmjax`` console script with and without its persistent compilation cache.

Each command runs as the user runs it, a new process (``python -m ssmjax.cli``), CPU:

* ``fit``: ``ssmjax fit hmm data.csv --emissions gaussian`` on 300 rows (2 columns);
* ``demo``: ``ssmjax demo`` (three EM fits, inference, two plots).

Per command: ``--no-cache`` (traced and compiled), the first run into an empty cache folder
(traced, compiled and written: JAX's compiled program and ssmjax's exported one), and repeated
runs (both read back: nothing traced or compiled). Medians of ``--repeats`` runs; every run's
time and the machine's load average are recorded with them (on a shared machine they say how
far to trust the medians). Python writes and reads its bytecode caches as by default
(``PYTHONDONTWRITEBYTECODE`` is removed from the children's environment: with it set, every run
would also compile ssmjax's sources, about 0.2 s), and one untimed run fills them first.

    python benchmarks/cli_cache.py [--repeats 3] [--out benchmarks/results/cli_cache.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args, env):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ssmjax.cli", *args], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ssmjax {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cli_cache.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="ssmjax-cli-")
    rng = np.random.default_rng(0)
    states = np.repeat(rng.integers(0, 2, 30), 10)
    data = np.c_[3.0 * states + rng.normal(size=300), -2.0 * states + rng.normal(size=300)]
    csv = os.path.join(work, "data.csv")
    np.savetxt(csv, data, delimiter=",", header="a,b", comments="")
    commands = {"fit": ["fit", "hmm", csv, "--emissions", "gaussian", "--output"], "demo": ["demo", "--output"]}
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    base_env.update(JAX_PLATFORMS="cpu", SSMJAX_NO_CACHE="0")
    run(["--no-cache", *commands["demo"], os.path.join(work, "bytecode")], base_env)  # fills the bytecode caches
    rows = []
    for name, command in commands.items():
        times = {"no_cache": [], "first": [], "repeated": []}
        for r in range(args.repeats):
            cache = os.path.join(work, f"cache-{name}-{r}")
            env = dict(base_env, SSMJAX_CACHE_DIR=cache)
            out = lambda tag: os.path.join(work, f"{name}-{r}-{tag}")  # noqa: E731
            times["no_cache"].append(run(["--no-cache", *command, out("off")], env))
            times["first"].append(run([*command, out("first")], env))
            times["repeated"].append(run([*command, out("again")], env))
        row = {"command": name, **{k: round(statistics.median(v), 3) for k, v in times.items()},
               "runs": {k: [round(t, 3) for t in v] for k, v in times.items()}}
        rows.append(row)
        print(row, flush=True)
    sys.path.insert(0, HERE)
    from _common import record, write_record

    settings = dict(repeats=args.repeats, fit_rows=300, bytecode_cache=True,
                    load_average=[round(load_start, 2), round(os.getloadavg()[0], 2)])  # 1-minute, at start and end
    write_record(args.out, record(("jax", "jaxlib", "equinox", "numpy", "matplotlib"), settings, rows))


if __name__ == "__main__":
    main()
