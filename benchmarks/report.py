"""Render the measured results in benchmarks/results/*.json as Markdown tables.

    python benchmarks/report.py            # prints the tables
    python benchmarks/report.py --write    # replaces the generated part of benchmarks/README.md

Nothing here measures anything: every number comes from a JSON file written by
one of the benchmark scripts, together with its date, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- BEGIN GENERATED TABLES -->", "<!-- END GENERATED TABLES -->"


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ms(seconds):
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def _ratio(peer, ours):
    return "–" if peer is None or ours is None else f"{peer / ours:.1f}×"


def _header(d):
    machine = d.get("machine") or {}
    versions = d.get("versions") or {}
    mach = ", ".join(str(machine[k]) for k in ("cpu", "processor", "device") if machine.get(k))
    cores = machine.get("cpu_count") or versions.get("cpu_count")
    skip = {"platform", "processor", "cpu_count", "ssmjax", "python"}
    if versions.get("jaxlib") == versions.get("jax"):
        skip.add("jaxlib")  # released together
    vers = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k not in skip)
    return f"_Measured {d.get('date', '?')[:16]} on {mach or d.get('device', '?')} ({cores} cores); {vers}._"


def hmm_table(d):
    lines = [
        "### HMM inference (`benchmarks/hmm_inference.py`): one sequence, T = 10^4, float32",
        "",
        _header(d),
        "",
        "Times in ms (median of repeats, jit warm); `×` as in the caveats.",
        "hmmlearn is timed with its default `implementation=\"log\"` and with `\"scaling\"`.",
        "",
        "| K | task | ssmjax | compile s | dynamax | × dynamax | hmmlearn (log) | × | hmmlearn (scaling) | × |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in d["timings"]:
        for task in ("filter", "smoother", "value_and_grad"):
            ours = row.get(f"ssmjax_{task}_s")
            dx = row.get(f"dynamax_{task}_s")
            hl = row.get(f"hmmlearn_{task}_s")
            hs = row.get(f"hmmlearn_scaling_{task}_s")
            comp = row.get(f"ssmjax_{task}_compile_s")
            lines.append(
                f"| {row['K']} | {task} | {_ms(ours)} | {comp:.2f} | {_ms(dx)} | {_ratio(dx, ours)} | "
                f"{_ms(hl)} | {_ratio(hl, ours)} | {_ms(hs)} | {_ratio(hs, ours)} |"
            )
    mem = d.get("memory")
    if mem:
        lines += [
            "",
            f"Peak memory of `value_and_grad` at T = {mem['T']:,}, K = {mem['K']} (XLA `memory_analysis`), "
            "in multiples of the log-likelihood array:",
            "",
            "| variant | peak / log-likelihood array |",
            "|---|---|",
        ]
        for key, label in (("ssmjax_custom_vjp", "ssmjax (custom VJP)"), ("plain_autodiff_scan", "plain autodiff through the scan"),
                           ("forward_only", "forward pass only")):
            if key in mem:
                lines.append(f"| {label} | {mem[key]['peak_over_loglik_array']:.2f}× |")
    return "\n".join(lines)


def lgssm_table(d):
    lines = [
        "### LGSSM inference (`benchmarks/lgssm_inference.py`): T = 10^4, float32",
        "",
        _header(d),
        "",
        "Time-invariant model: the steady-state path from 3 states; \"full recursion\" = that path off, "
        "as time-varying models and `method=\"sqrt\"` run.",
        "",
        "| (Dx, Dy) | task | ssmjax ms | compile s | dynamax ms | × dynamax | pykalman ms | × pykalman "
        "| full recursion ms | full × dynamax |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in d["results"]:
        for task in ("filter", "smoother"):
            ours = row["ssmjax"][task]["median_s"]
            dx = (row.get("dynamax") or {}).get(task, {}).get("median_s")
            pk = (row.get("pykalman") or {}).get(task, {}).get("median_s")
            full = (row.get("ssmjax_full") or {}).get(task, {}).get("median_s")
            lines.append(
                f"| ({row['Dx']}, {row['Dy']}) | {task} | {_ms(ours)} | {row['ssmjax'][task]['compile_s']:.2f} | "
                f"{_ms(dx)} | {_ratio(dx, ours)} | {_ms(pk)} | {_ratio(pk, ours)} | {_ms(full)} | {_ratio(dx, full)} |"
            )
    return "\n".join(lines)


def fit_table(d):
    h, k = d["gaussian_hmm_em"], d["kalman_em"]
    lines = [
        "### Fitting end to end (`benchmarks/fit.py`), float32, same initial model for every library",
        "",
        _header(d),
        "",
        f"Gaussian HMM EM: {h['config']}. Final log-likelihoods by ssmjax's exact filter.",
    ]
    repeats = d.get("repeats", 1)
    if repeats > 1:
        lines += [
            "",
            f"{repeats} fresh-process runs; speed-ups formed within each run (listed), the column their median.",
        ]
    lines += [
        "",
        "| library | first call s (incl. compile) | second call s | final log-likelihood | ssmjax speed-up (first call) |"
        + (" per run |" if repeats > 1 else ""),
        "|---|---|---|---|---|" + ("---|" if repeats > 1 else ""),
    ]
    ours = h["ssmjax"]["first_call_s"]
    for lib in ("ssmjax", "dynamax", "hmmlearn"):
        r = h.get(lib)
        if r:
            speedup = h["speedup_median"][lib] if repeats > 1 else r["first_call_s"] / ours
            row = (f"| {lib} | {r['first_call_s']:.2f} | {r['compiled_s']:.2f} | {r['final_loglik']:.2f} | "
                   f"{speedup:.1f}× |")
            if repeats > 1:
                row += " " + ", ".join(f"{x:.1f}×" for x in h["speedup_runs"][lib]) + " |"
            lines.append(row)
    lines += [
        "",
        f"Kalman EM: {k['config']} (pykalman fits one sequence at a time).",
        "",
        "| run | first call s (incl. compile) | second call s | final log-likelihood |",
        "|---|---|---|---|",
    ]
    for key, label in (("ssmjax_single", "ssmjax, 1 sequence"), ("pykalman_single", "pykalman, 1 sequence"),
                       ("ssmjax_batch", f"ssmjax, {k['config']['B']} sequences")):
        r = k.get(key)
        if r:
            lines.append(f"| {label} | {r['first_call_s']:.2f} | {r['compiled_s']:.2f} | {r['final_loglik']:.2f} |")
    if k.get("pykalman_single"):
        pk = k["pykalman_single"]["first_call_s"]
        compiled, first = pk / k["ssmjax_single"]["compiled_s"], pk / k["ssmjax_single"]["first_call_s"]
        if "speedup_runs" in k:  # medians of the per-run ratios, as for the HMM
            compiled = statistics.median(k["speedup_runs"]["compiled"])
            first = statistics.median(k["speedup_runs"]["first_call"])
        lines.append("")
        lines.append(f"pykalman / ssmjax (1 sequence): {compiled:.1f}× once compiled, "
                     f"{first:.1f}× including compilation"
                     + (" (medians of the runs)." if "speedup_runs" in k else "."))
    e = _load("estimators.json")
    if e is not None:
        rows = {r["library"]: r for r in e["rows"]}
        ours, ref = rows["ssmjax.estimators"], rows["hmmlearn"]
        lines += [
            "",
            f"`ssmjax.estimators.GaussianHMM.fit` (hmmlearn's layout, same start; `estimators.py`, one process): "
            f"{ours['first_call_s']:.2f} s first call, {ours['compiled_s']:.2f} s compiled; hmmlearn "
            f"{ref['first_call_s']:.2f} s ({ref['first_call_s'] / ours['first_call_s']:.1f}×).",
        ]
    return "\n".join(lines)


def parallel_table(d):
    rows = d.get("results") or d.get("timings") or []
    if not rows:
        return ""
    lines = [
        "### Sequential vs parallel-in-time (`benchmarks/parallel.py`), float32",
        "",
        _header(d),
        "",
        "`parallel / sequential` > 1 means the sequential scan is faster.",
        "",
        "| model | algorithm | T | sequential ms | parallel ms | parallel / sequential | compile s (seq / par) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = f"HMM K={r['K']}" if r.get("model") == "hmm" else f"LGSSM Dx={r.get('Dx')}, Dy={r.get('Dy')}"
        lines.append(
            f"| {model} | {r['algorithm']} | {r['T']:,} | {_ms(r['sequential_s'])} | {_ms(r['parallel_s'])} | "
            f"{r['parallel_over_sequential']:.1f} | {r['sequential_compile_s']:.2f} / {r['parallel_compile_s']:.2f} |"
        )
    return "\n".join(lines)


def first_use_table(d):
    rows = d.get("rows") or []
    if not rows:
        return ""
    commits = d.get("commits") or {}
    has_base = "baseline" in rows[0]
    lines = [
        "### First use in a fresh process (`benchmarks/first_use.py`), CPU",
        "",
        _header(d),
        "",
        f"Wall time of the call (median of {d.get('repeats', '?')} new processes) and the number of XLA programs it "
        "compiled." + (f" Baseline: commit {commits.get('baseline')}; this: {commits.get('current')}." if has_base else ""),
        "",
    ]
    if has_base:
        lines += ["| scenario | baseline s (compilations) | this s (compilations) | speed-up |", "|---|---|---|---|"]
    else:
        lines += ["| scenario | s (compilations) |", "|---|---|"]
    for r in rows:
        cur = r["current"]
        cell = f"{cur['median_s']:.2f} ({cur['compiles']})"
        if has_base:
            base = r["baseline"]
            lines.append(f"| {r['scenario']} | {base['median_s']:.2f} ({base['compiles']}) | {cell} | "
                         f"{_ratio(base['median_s'], cur['median_s'])} |")
        else:
            lines.append(f"| {r['scenario']} | {cell} |")
    return "\n".join(lines)


def cli_cache_table(d):
    lines = [
        "### The console script and its compilation cache (`benchmarks/cli_cache.py`), CPU",
        "",
        _header(d),
        "",
        f"New process, wall s, median of {d['settings']['repeats']}"
        + (", .pyc cached" if d["settings"].get("bytecode_cache") else "")
        + f". `fit`: `ssmjax fit hmm`, {d['settings']['fit_rows']} rows x 2, Gaussian.",
        "",
        "| command | --no-cache | first run | repeated run |",
        "|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(f"| `ssmjax {r['command']}` | {r['no_cache']:.2f} | {r['first']:.2f} | {r['repeated']:.2f} |")
    return "\n".join(lines)


def scaling_table(d):
    st = d["settings"]
    lines = [
        "### Weak scaling of data-parallel EM (`benchmarks/scaling.py`), CPU devices",
        "",
        _header(d),
        "",
        f"{st['share']} sequences of T = {st['timesteps']} per device, float32; EM iterations per second (warm, "
        f"median of {st['repeats']}); 2 processes: `jax.distributed` on localhost.",
        "",
        "| processes x devices | sequences | Poisson HMM K=4 it/s | LGSSM 4x2 it/s |",
        "|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(f"| {r['processes']} x {r['devices'] // r['processes']} | {r['sequences']} | "
                     f"{r['hmm']['iters_per_s']:.1f} | {r['lgssm']['iters_per_s']:.1f} |")
    return "\n".join(lines)


_SHORT = {"filtered probs": "filtered", "smoothed probs": "smoothed", "log-likelihood (rel)": "loglik",
          "filtered means": "m filt.", "smoothed means": "m smooth.", "smoothed covs": "P smooth.",
          "path (fraction differing)": "path", "path log-probability (rel)": "score", "two-slice probs": "probs",
          "emission means": "means", "entropy (rel)": "entropy", "log density (rel)": "log density"}


def float32_table(d):
    lines = [
        f"### float32 accuracy against float64 (`benchmarks/float32.py`), T = {d['settings']['timesteps']}",
        "",
        _header(d),
        "",
        "Largest error of float32 against float64: probabilities absolute, the rest relative to the largest "
        "float64 entry, paths as the fraction of steps differing. HMM K = 16, LGSSM 4x2.",
        "",
        "| function | compared | ssmjax | dynamax |",
        "|---|---|---|---|",
    ]
    groups = {}
    for r in d["rows"]:
        groups.setdefault(r["function"], []).append(r)
    err = lambda v: "–" if v is None else ("NaN" if v != v else f"{v:.0e}")  # noqa: E731
    previous = None
    for function, rows in groups.items():
        outputs = ", ".join(_SHORT.get(r["output"], r["output"]) for r in rows)
        shown, previous = ("as above" if outputs == previous else outputs), outputs
        lines.append(f"| {function} | {shown} | {' · '.join(err(r['ssmjax']) for r in rows)} | "
                     f"{' · '.join(err(r['dynamax']) for r in rows)} |")
    return "\n".join(lines)


def batched_table(d, title):
    rows = d.get("results") or []
    if not rows:
        return ""
    # the CPU table leaves the float32 errors to the JSON (the GPU one shows them: TF32 would show there)
    with_errors = title != "CPU" and any(r["max_rel_error"] for r in rows)
    lines = [
        f"### Batched throughput (`benchmarks/batched.py`), {title}",
        "",
        _header(d),
        "",
        "`jax.jit(jax.vmap(...))` over B sequences of T = 1000 (unless said), float32, median ms; compile s = "
        "ssmjax / dynamax. LGSSM "
        "`sequential` returns every field, `loglik + means` what training keeps."
        + (" Error = largest `||out - ref|| / ||ref||` over the first sequences against a float64 NumPy reference "
           "(log-likelihood; smoothed means and covariances, or smoothed probabilities)." if with_errors else ""),
        "",
        "| model | task | variant | B | ssmjax ms | dynamax ms | × dynamax | compile s |"
        + (" error ssmjax / dynamax |" if with_errors else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if with_errors else ""),
    ]

    def key(r):
        size = f"HMM K={r['K']}" if r["model"] == "hmm" else f"LGSSM {r['Dx']}x{r['Dy']}"
        return size, r["algorithm"], r["variant"], r["B"], r["T"]

    def err(x):
        return "–" if x is None else "/".join(f"{v:.0e}" for v in x["max_rel_error"].values())

    peers = {key(r): r for r in rows if r["library"] == "dynamax"}
    for r in rows:
        if r["library"] != "ssmjax":
            continue
        p = peers.get(key(r))
        size, task, variant, batch, steps = key(r)
        cells = [
            size, task, variant + ("" if steps == 1000 else f", T={steps}"), str(batch), _ms(r["median_s"]),
            _ms(p["median_s"] if p else None),
            _ratio(p["median_s"] if p else None, r["median_s"]),
            f"{r['compile_s']:.1f} / " + (f"{p['compile_s']:.1f}" if p else "–"),
        ]
        if with_errors:
            cells.append(f"{err(r)} / {err(p)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lgssm_em_table(d):
    st, runs = d["settings"], d["runs"]
    lines = [
        "### Kalman EM over a batch, first call included (`benchmarks/lgssm_em.py`), CPU",
        "",
        _header(d),
        "",
        f"B = {st['B']}, T = {st['T']}, (Dx, Dy) = ({st['Dx']}, {st['Dy']}), {st['iters']} iterations, {st['dtype']}, same "
        f"initial model; each library in a fresh process, {st['repeats']} alternating runs (medians).",
        "",
        "| library | first call s | second call s | final log-likelihood |",
        "|---|---|---|---|",
    ]
    for lib in ("ssmjax", "dynamax"):
        first = statistics.median(r[lib]["first_call_s"] for r in runs)
        second = statistics.median(r[lib]["second_call_s"] for r in runs)
        lines.append(f"| {lib} | {first:.2f} | {second:.2f} | {runs[0][lib]['final_loglik']:.1f} |")
    m = d["median_ratio"]
    lines += ["", f"dynamax / ssmjax: {m['first_call_s']:.1f}× first call, {m['second_call_s']:.1f}× second call."]
    return "\n".join(lines)


def _seconds(value):
    return "–" if value is None else f"{value:.2f}"


def families_table(d):
    st = d["settings"]
    lines = [
        "### EM per emission family, first call included (`benchmarks/families.py`), CPU",
        "",
        _header(d),
        "",
        f"K = {st['K']}, B = {st['B']}, T = {st['T']}, {st['iters']} iterations, float32; first call = "
        "each library's initialisation + fit, with compiling (s)"
        + (f"; median of {st['repeats']} processes." if st.get("repeats", 1) > 1 else ".")
        + " E-step only: ssmjax with the emissions frozen, initialisation untimed.",
        "",
        "| family | ssmjax first / compiled | E-step only | dynamax first / compiled | × dynamax | hmmlearn | × hmmlearn |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        s, dm, h = r["ssmjax"], r["dynamax"], r["hmmlearn"]
        peer = None if h is None else h["first_s"]
        dm_cell = "–" if dm is None else f"{dm['first_s']:.2f} / {dm['compiled_s']:.2f}"
        lines.append(
            f"| {r['family']} | {s['first_s']:.2f} / {s['compiled_s']:.2f} | {_seconds(s.get('e_step_only_first_s'))} | {dm_cell} "
            f"| {_ratio(None if dm is None else dm['first_s'], s['first_s'])} | {'–' if peer is None else format(peer, '.2f')} "
            f"| {_ratio(peer, s['first_s'])} |"
        )
    return "\n".join(lines)


def render() -> str:
    parts = []
    for name, fn in (("hmm_inference.json", hmm_table), ("lgssm_inference.json", lgssm_table),
                     ("fit.json", fit_table), ("families.json", families_table),
                     ("cli_cache.json", cli_cache_table),
                     ("lgssm_em.json", lgssm_em_table), ("scaling.json", scaling_table), ("float32.json", float32_table),
                     ("batched_cpu.json", lambda d: batched_table(d, "CPU"))):
        d = _load(name)
        if d is not None:
            parts.append(fn(d))
    return "\n\n".join(p for p in parts if p)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--parallel", action="store_true", help="print the sequential vs parallel table (not in the README)")
    parser.add_argument("--first-use", action="store_true", help="print the first-use table against a baseline commit")
    args = parser.parse_args()
    if args.parallel:
        print(parallel_table(_load("parallel.json")))
        return
    if args.first_use:
        print(first_use_table(_load("first_use.json")))
        return
    text = render()
    if not args.write:
        print(text)
        return
    path = os.path.join(HERE, "README.md")
    with open(path) as f:
        readme = f.read()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in readme:
        readme = readme[: readme.index(BEGIN)] + block + readme[readme.index(END) + len(END):]
    else:
        readme = readme.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(readme)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
