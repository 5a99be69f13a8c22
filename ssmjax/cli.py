"""The ``ssmjax`` console script.

Commands: ``ssmjax demo`` (the main job), ``ssmjax fit {hmm,lgssm} DATA``,
``ssmjax decode MODEL DATA`` and ``ssmjax smooth MODEL DATA``.

``ssmjax demo`` fits models to the two bundled real data sets and prints what
it found:

* earthquake counts 1900-2006: Poisson HMMs with 2 and 3 states fitted by EM
  from quantile starting values -- rates, transition matrices, log-likelihoods,
  AIC/BIC, and the Viterbi-decoded regimes;
* Nile flow 1871-1970: the local-level model fitted by EM with an exact diffuse
  initial level -- both variances, and the smoothed level with a 90 % band;

and writes PNG plots of both into an output folder it names (when matplotlib is
installed: ``pip install "ssmjax[plot]"``).

Compiled programs are kept in JAX's persistent compilation cache, in the user's cache
folder (``platformdirs.user_cache_dir("ssmjax")``, or ``$SSMJAX_CACHE_DIR``), so a
repeated call skips XLA compilation, most of a small job's time. ``--no-cache`` or
``SSMJAX_NO_CACHE=1`` turns it off.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

DEFAULT_OUTPUT = "ssmjax-demo-output"


def compilation_cache_dir() -> str:
    """Where the console script keeps compiled programs: ``$SSMJAX_CACHE_DIR`` or the user's cache folder."""
    from platformdirs import user_cache_dir

    return os.environ.get("SSMJAX_CACHE_DIR") or os.path.join(user_cache_dir("ssmjax"), "xla")


def _use_compilation_cache(enabled: bool) -> None:
    """Turn on JAX's persistent compilation cache for this process (every program, however quick to compile:
    the small ones are what a short command is made of)."""
    if not enabled or os.environ.get("SSMJAX_NO_CACHE", "") not in ("", "0"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _regime_runs(years: np.ndarray, path: np.ndarray) -> list[tuple[int, int, int]]:
    """Collapse a decoded path into (first_year, last_year, state) runs."""
    runs = []
    start = 0
    for t in range(1, len(path) + 1):
        if t == len(path) or path[t] != path[start]:
            runs.append((int(years[start]), int(years[t - 1]), int(path[start])))
            start = t
    return runs


def _fmt_matrix(m: np.ndarray) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:.3f}" for v in row) + "]" for row in m) + "]"


def fit_earthquake_hmms(counts: np.ndarray, state_counts=(2, 3)):
    """EM fits of Poisson HMMs with quantile starting values; returns a list of dicts."""
    import jax
    import jax.numpy as jnp

    import ssmjax

    y = jnp.asarray(counts, jnp.float64)[None, :, None]
    results = []
    for k in state_counts:
        start = ssmjax.HMM.from_data(y, k, "poisson", key=jax.random.key(0))
        fitted, lls, info = ssmjax.fit_em(start, y, max_iters=500, tol=1e-10)
        order = np.argsort(np.asarray(fitted.emissions.rates[:, 0]))
        loglik = float(fitted.marginal_loglik(y[0]))
        results.append(dict(
            num_states=k,
            model=fitted,
            order=order,
            rates=np.asarray(fitted.emissions.rates[:, 0])[order],
            transition_matrix=np.asarray(fitted.transition_matrix)[np.ix_(order, order)],
            loglik=loglik,
            aic=fitted.aic(y),
            bic=fitted.bic(y),
            iterations=info.num_iters,
            path=np.argsort(order)[np.asarray(fitted.viterbi(y[0]))],
            smoothed=np.asarray(fitted.smoother(y[0]).smoothed_probs)[:, order],
        ))
    return results


def fit_nile_local_level(flow: np.ndarray):
    """EM fit of the local-level model (random walk plus noise) with an exact diffuse initial level."""
    import jax.numpy as jnp

    import ssmjax

    y = jnp.asarray(flow, jnp.float64)[:, None]
    start = ssmjax.LGSSM(
        initial_mean=jnp.zeros(1), initial_cov=jnp.ones((1, 1)), diffuse=True,
        transition_matrix=jnp.ones((1, 1)), transition_cov=jnp.full((1, 1), float(np.var(flow)) / 10),
        emission_matrix=jnp.ones((1, 1)), emission_cov=jnp.full((1, 1), float(np.var(flow))),
    )
    frozen = ("transition_matrix", "emission_matrix")
    fitted, lls, info = ssmjax.fit_em(start, y[None], max_iters=2000, tol=1e-10, frozen=frozen)
    post = fitted.smoother(y)
    return dict(
        model=fitted,
        emission_var=float(fitted.emission_cov[0, 0]),
        level_var=float(fitted.transition_cov[0, 0]),
        loglik=float(post.marginal_loglik),
        iterations=info.num_iters,
        level=np.asarray(post.smoothed_means[:, 0]),
        level_sd=np.sqrt(np.asarray(post.smoothed_covs[:, 0, 0])),
    )


def _plots(out_dir, quakes, eq_fit, nile, nile_fit) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []

    two = eq_fit[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1.4))
    ax1.bar(quakes.years, quakes.values, color="0.75", label="M7+ earthquakes per year")
    ax1.step(quakes.years, two["rates"][two["path"]], where="mid", color="C3", lw=2,
             label="Viterbi regime rate (2-state HMM)")
    ax1.set_ylabel("count")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.fill_between(quakes.years, two["smoothed"][:, 1], step="mid", color="C3", alpha=0.5)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("p(high | all)")
    ax2.set_xlabel("year")
    fig.suptitle("Earthquake counts: posterior regime probabilities and Viterbi path")
    fig.tight_layout()
    path = os.path.join(out_dir, "earthquakes_hmm.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    z = 1.6448536269514722  # 90 % two-sided normal quantile
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(nile.years, nile.values, "o", ms=3, color="0.4", label="annual flow")
    ax.plot(nile.years, nile_fit["level"], color="C0", lw=2, label="smoothed level")
    ax.fill_between(nile.years, nile_fit["level"] - z * nile_fit["level_sd"],
                    nile_fit["level"] + z * nile_fit["level_sd"], color="C0", alpha=0.35,
                    label="90 % band of the level")
    # where a year's flow falls given the level: the level's uncertainty plus the observation noise
    flow_sd = np.sqrt(nile_fit["level_sd"] ** 2 + nile_fit["emission_var"])
    ax.fill_between(nile.years, nile_fit["level"] - z * flow_sd, nile_fit["level"] + z * flow_sd, color="C0",
                    alpha=0.1, label="90 % band of the flow")
    ax.set_xlabel("year")
    ax.set_ylabel("flow (10^8 m^3)")
    ax.set_title("Nile at Aswan: local-level model fitted by EM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "nile_local_level.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def run_demo(out=None, output_dir: str = DEFAULT_OUTPUT) -> dict:
    """Run the demo, print its report to ``out`` (default stdout), write plots to ``output_dir``.

    Returns the fitted results (used by the tests).
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    from ssmjax.datasets import load_earthquakes, load_nile

    out = out or sys.stdout
    p = lambda *a: print(*a, file=out)  # noqa: E731
    quakes, nile = load_earthquakes(), load_nile()

    p("ssmjax demo: exact inference and EM on two real data sets")
    p("")
    p(f"1. Major (M7+) earthquakes per year, {quakes.years[0]}-{quakes.years[-1]} (T = {len(quakes.values)})")
    p(f"   source: {quakes.source}")
    eq_fit = fit_earthquake_hmms(quakes.values)
    for r in eq_fit:
        p(f"   Poisson HMM, {r['num_states']} states (EM, {r['iterations']} iterations):")
        p(f"     rates             = [{', '.join(f'{v:.2f}' for v in r['rates'])}]")
        p(f"     transition_matrix = {_fmt_matrix(r['transition_matrix'])}")
        p(f"     log-likelihood    = {r['loglik']:.3f}   AIC = {r['aic']:.2f}   BIC = {r['bic']:.2f}")
    by_bic = min(eq_fit, key=lambda r: r["bic"])["num_states"]
    by_aic = min(eq_fit, key=lambda r: r["aic"])["num_states"]
    if by_bic == by_aic:
        p(f"   BIC and AIC both prefer {by_bic} states.")
    else:  # BIC's heavier penalty on parameters favours the smaller model on 107 years
        p(f"   BIC prefers {by_bic} states, AIC {by_aic}: BIC charges more per parameter on so short a series.")
    two = eq_fit[0]
    p("   Decoded regimes of the 2-state model (Viterbi):")
    for first, last, state in _regime_runs(quakes.years, two["path"]):
        span = f"{first}-{last}" if first != last else f"{first}"
        p(f"     {span:>9}  {'high' if state == 1 else 'low '} ({two['rates'][state]:.1f} per year)")
    p("")
    p(f"2. Nile flow at Aswan, {nile.years[0]}-{nile.years[-1]} (T = {len(nile.values)})")
    p(f"   source: {nile.source}")
    nile_fit = fit_nile_local_level(nile.values)
    p(f"   Local-level model (EM, {nile_fit['iterations']} iterations; the initial level has a flat prior,")
    p("   handled exactly: the exact diffuse likelihood of Durbin & Koopman):")
    p(f"     observation variance sigma^2_eps = {nile_fit['emission_var']:.1f}   (Durbin & Koopman: 15099)")
    p(f"     level variance       sigma^2_eta = {nile_fit['level_var']:.1f}   (Durbin & Koopman: 1469.1)")
    p(f"     log-likelihood = {nile_fit['loglik']:.3f}")
    written = _plots(output_dir, quakes, eq_fit, nile, nile_fit)
    p("")
    if written:
        p(f"Plots written to {os.path.abspath(output_dir)}/:")
        for path in written:
            p(f"   {os.path.basename(path)}")
    else:
        p('Plots skipped: matplotlib is not installed (pip install "ssmjax[plot]").')
    return {"earthquakes": eq_fit, "nile": nile_fit, "plots": written}


# ----------------------------------------------------------------------------- fit / decode / smooth
HMM_EMISSIONS = ("poisson", "gaussian", "gaussian-diag", "categorical")


def _prepare_hmm_data(data, emissions_type):
    from ._cli_data import require_complete, require_counts

    what = f"an HMM with {emissions_type} emissions"
    require_complete(data, what)
    if emissions_type in ("poisson", "categorical"):
        require_counts(data, what, categorical=emissions_type == "categorical")
    mask = np.arange(data.values.shape[1])[None, :] < data.lengths[:, None]
    values = np.where(mask[..., None], data.values, 0.0)
    if emissions_type == "categorical":
        if values.shape[-1] != 1:
            raise _data_error(f"{data.path}: categorical emissions need exactly one column; got {data.columns}")
        return values[..., 0].astype(np.int64)
    return values


def _data_error(msg):
    from ._cli_data import DataError

    return DataError(msg)


def _stack(models):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    arrays = [eqx.filter(m, eqx.is_array) for m in models]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *arrays)
    return eqx.combine(stacked, eqx.filter(models[0], eqx.is_array, inverse=True))


def _initial_hmms(key, y, lengths, num_states, emissions_type, restarts):
    import jax
    import jax.numpy as jnp

    import ssmjax

    kind = {"gaussian-diag": "gaussian_diag"}.get(emissions_type, emissions_type)
    models = []
    for r, k in enumerate(jax.random.split(key, restarts)):
        m = ssmjax.HMM.from_data(y, num_states, kind, lengths=lengths, key=k)
        if r:  # later restarts: random transitions, and jittered Poisson rates (their start is deterministic)
            m = ssmjax.HMM.random(num_states, m.emissions, key=k)
            if kind == "poisson":
                jitter = jnp.exp(0.3 * jax.random.normal(jax.random.fold_in(k, 1), m.emissions.log_rates.shape))
                m = ssmjax.HMM(initial_probs=m.initial_probs, transition_matrix=m.transition_matrix,
                               emissions=ssmjax.PoissonEmissions(rates=m.emissions.rates * jitter))
        models.append(m)
    return models


def _initial_lgssms(key, y, lengths, state_dim, restarts):
    import jax
    import jax.numpy as jnp

    import ssmjax

    mask = np.arange(y.shape[1])[None, :] < lengths[:, None]
    pooled = y[mask]
    pooled = pooled[~np.isnan(pooled).any(axis=1)]
    if pooled.shape[0] < 2:
        raise _data_error("too few fully observed steps to initialise an LGSSM (need at least 2)")
    mean = pooled.mean(0)
    _, s, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    dy = y.shape[2]
    basis = np.zeros((dy, state_dim))
    r = min(state_dim, vt.shape[0])
    basis[:, :r] = vt[:r].T * (s[:r] / np.sqrt(pooled.shape[0]))[None, :]
    var = np.maximum(pooled.var(0), 1e-6)
    models = []
    for i, k in enumerate(jax.random.split(key, restarts)):
        c = basis + (0.1 * np.sqrt(var.mean()) * np.asarray(jax.random.normal(k, basis.shape)) if i else 0.0)
        models.append(ssmjax.LGSSM(
            initial_mean=jnp.zeros(state_dim), initial_cov=jnp.eye(state_dim),
            transition_matrix=0.9 * jnp.eye(state_dim), transition_cov=0.1 * jnp.eye(state_dim),
            emission_matrix=jnp.asarray(c), emission_cov=jnp.diag(jnp.asarray(0.5 * var)),
            emission_offset=jnp.asarray(mean),
        ))
    return models


def _fit(models, y, lengths, args):
    import jax
    import optax

    import ssmjax

    if args.method == "em":
        if len(models) > 1:
            best, scores, _ = ssmjax.fit_em_restarts(_stack(models), y, lengths=lengths, max_iters=args.iters,
                                                     tol=args.tol, progress=args.progress)
            return best, float(np.max(np.asarray(scores))), f"EM, best of {len(models)} restarts"
        fitted, lls, info = ssmjax.fit_em(models[0], y, lengths=lengths, max_iters=args.iters, tol=args.tol,
                                          progress=args.progress)
        return fitted, None, f"EM, {info.num_iters} iterations ({info.status})"
    best, best_ll = None, -np.inf
    for r, m in enumerate(models):
        fitted, _ = ssmjax.fit_sgd(m, y, optax.adam(args.learning_rate), lengths=lengths, num_steps=args.iters,
                                   key=jax.random.key(args.seed + r), progress=args.progress)
        ll = _total_loglik(fitted, y, lengths)
        if ll > best_ll:
            best, best_ll = fitted, ll
    return best, best_ll, f"SGD (adam, lr {args.learning_rate}), {args.iters} steps, best of {len(models)}"


def _total_loglik(model, y, lengths):
    import jax.numpy as jnp

    return float(model.log_likelihood(jnp.asarray(y), lengths=jnp.asarray(lengths)))


def _smoothed(model, y, lengths, decode: bool, checked: bool):
    """Every sequence's posterior in one compiled call (padded, ``length=`` per sequence): for an HMM
    the state probabilities (B, T, K) and Viterbi paths (or None), for an LGSSM the smoothed means and
    standard deviations (B, T, Dx)."""
    import jax
    import jax.numpy as jnp

    import ssmjax

    from . import _checks

    y, lengths = jnp.asarray(y), jnp.asarray(lengths)
    # A model just fitted to data checked on the host (``checked``) needs no in-program checks; without
    # them the programs hold no host callback, and the persistent cache can keep them.
    with _checks.value_checks(not checked and _checks.value_checks_enabled()):
        if isinstance(model, ssmjax.HMM):
            probs = jax.jit(jax.vmap(lambda s, n: model.smoother(s, length=n).smoothed_probs))(y, lengths)
            paths = jax.jit(jax.vmap(lambda s, n: model.viterbi(s, length=n)))(y, lengths) if decode else None
            return np.asarray(probs), None if paths is None else np.asarray(paths)
        post = jax.jit(jax.vmap(lambda s, n: model.smoother(s, length=n)))(y, lengths)
    return np.asarray(post.smoothed_means), np.sqrt(np.diagonal(np.asarray(post.smoothed_covs), axis1=-2, axis2=-1))


def _posteriors(model, smoothed, lengths, data, decode: bool):
    """Rows of the per-step posterior CSV and the header (``smoothed`` from :func:`_smoothed`)."""
    import ssmjax

    rows = []
    if isinstance(model, ssmjax.HMM):
        probs, paths = smoothed
        header = ["sequence", "step"] + (["viterbi_state"] if decode else []) + [f"p_state_{i}" for i in range(model.num_states)]
        for b, n in enumerate(lengths):
            for t in range(int(n)):
                rows.append([data.ids[b], t] + ([int(paths[b, t])] if decode else []) + [f"{p:.6g}" for p in probs[b, t]])
        return header, rows
    means, sds = smoothed
    dx = model.state_dim
    header = ["sequence", "step"] + [f"mean_{i}" for i in range(dx)] + [f"sd_{i}" for i in range(dx)]
    for b, n in enumerate(lengths):
        for t in range(int(n)):
            rows.append([data.ids[b], t] + [f"{v:.6g}" for v in means[b, t]] + [f"{v:.6g}" for v in sds[b, t]])
    return header, rows


def _plot(path, model, smoothed, y, lengths, data):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import ssmjax

    n = int(lengths[0])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    obs = np.asarray(y[0, :n]).reshape(n, -1)
    ax1.plot(np.arange(n), obs[:, 0], ".", color="0.4", label=f"{data.columns[0]} (sequence {data.ids[0]})")
    ax1.set_ylabel(data.columns[0])
    ax1.set_title(f"{type(model).__name__} on {os.path.basename(str(data.path))}: sequence {data.ids[0]}")
    if isinstance(model, ssmjax.HMM):
        centre = next((getattr(model.emissions, n) for n in ("means", "rates") if hasattr(model.emissions, n)), None)
        if centre is not None:  # each state's mean of the plotted column, in the state's colour below
            for k, level in enumerate(np.asarray(centre)[:, 0]):
                ax1.axhline(level, color=f"C{k}", lw=1, ls="--", label=f"state {k} mean" if k < 4 else None)
        probs = smoothed[0][0, :n]
        ax2.stackplot(np.arange(n), probs.T, labels=[f"state {i}" for i in range(probs.shape[1])], alpha=0.8)
        ax2.set_ylabel("p(state | data)")
        ax2.set_ylim(0, 1)
    else:
        means, sds = smoothed[0][0, :n], smoothed[1][0, :n]
        for i in range(means.shape[1]):
            ax2.plot(means[:, i], label=f"x_{i}")
            ax2.fill_between(np.arange(n), means[:, i] - 1.645 * sds[:, i], means[:, i] + 1.645 * sds[:, i], alpha=0.2)
        ax2.set_ylabel("smoothed state (90 %)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8, loc="upper right")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write_outputs(output_dir, model, header, rows, plot_args, out):
    """Write model/posteriors/plot to a temporary folder, then move them into place."""
    import csv as _csv
    import shutil
    import tempfile

    import ssmjax

    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".ssmjax-staging-")
    try:
        names = []
        if model is not None:
            ssmjax.save(os.path.join(staging, "model.eqx"), model, metadata={"columns": list(plot_args[-1].columns)})
            names.append("model.eqx")
        with open(os.path.join(staging, "posteriors.csv"), "w", newline="") as f:
            w = _csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        names.append("posteriors.csv")
        if _plot(os.path.join(staging, "plot.png"), *plot_args):
            names.append("plot.png")
        os.makedirs(output_dir, exist_ok=True)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Wrote {', '.join(names)} to {os.path.abspath(output_dir)}/", file=out)


def _describe_model(model, out, columns=None):
    """Print every fitted parameter (emission rows and columns named after the data's columns)."""
    import ssmjax

    def show(name, value, note=""):
        value = np.asarray(value)
        text = _fmt_matrix(value) if value.ndim == 2 else str(np.round(value, 4).tolist())
        print(f"  {name:<21} = {text}{note}", file=out)

    named = f"  (columns {', '.join(columns)})" if columns else ""
    if isinstance(model, ssmjax.HMM):
        show("initial_probs", model.initial_probs)
        show("transition_matrix", model.transition_matrix)
        em = model.emissions
        for name in ("rates", "probs", "means", "variances", "covs"):
            value = getattr(em, name, None)
            if value is None or (name == "variances" and hasattr(em, "chol_covs")):
                continue  # a full covariance is printed whole below
            value = np.asarray(value)
            if value.ndim == 3:  # per state: one matrix each
                for k in range(value.shape[0]):
                    show(f"emissions.{name}[{k}]", value[k], named if k == 0 else "")
            else:
                show(f"emissions.{name}", value, named)
        return
    for name in model.parameter_names():
        note = named if name.startswith("emission") and name != "emission_cov" else ""
        show(name, getattr(model, name), note)


def _check_output(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise _data_error(f"--output {path}: a file of that name exists; give a folder (new or existing)")


def cmd_fit(args, out) -> int:
    _check_output(args.output)
    import jax

    jax.config.update("jax_enable_x64", True)
    from ._cli_data import read_data

    data = read_data(args.data, columns=args.columns, id_column=args.id_column)
    key = jax.random.key(args.seed)
    if args.model == "hmm":
        y = _prepare_hmm_data(data, args.emissions)
        models = _initial_hmms(key, y, data.lengths, args.states, args.emissions, args.restarts)
    else:
        y = data.values
        models = _initial_lgssms(key, y, data.lengths, args.state_dim, args.restarts)
    fitted, _, how = _fit(models, y, data.lengths, args)
    ll = _total_loglik(fitted, y, data.lengths)
    print(f"Fitted {'an HMM' if args.model == 'hmm' else 'an LGSSM'} to {len(data.ids)} sequence(s), "
          f"{int(data.lengths.sum())} steps, columns {data.columns}: {how}", file=out)
    _describe_model(fitted, out, data.columns)
    print(f"  {'log-likelihood':<21} = {ll:.4f}", file=out)
    smoothed = _smoothed(fitted, y, data.lengths, decode=args.model == "hmm", checked=True)
    header, rows = _posteriors(fitted, smoothed, data.lengths, data, decode=args.model == "hmm")
    _write_outputs(args.output, fitted, header, rows, (fitted, smoothed, y, data.lengths, data), out)
    return 0


def cmd_apply(args, out, decode: bool) -> int:
    _check_output(args.output)
    import jax

    jax.config.update("jax_enable_x64", True)
    import ssmjax

    from ._cli_data import DataError, read_data

    try:
        model = ssmjax.load(args.model_file)
        trained = ssmjax.load_metadata(args.model_file).get("columns")
    except (OSError, ValueError) as err:
        raise DataError(f"{args.model_file}: cannot load a model ({err})") from None
    # a CSV is read by the column names the model was fitted on, unless --columns says otherwise
    is_csv = os.path.splitext(str(args.data))[1].lower() in (".csv", ".txt")
    by_name = trained if args.columns is None and is_csv else args.columns
    try:
        data = read_data(args.data, columns=by_name, id_column=args.id_column)
    except DataError as err:
        if by_name is trained and trained is not None:
            raise DataError(f"{err} (the model was fitted on columns {trained}; choose others with --columns)") from None
        raise
    if isinstance(model, ssmjax.HMM):
        kind = type(model.emissions).__name__.replace("Emissions", "").lower()
        y = _prepare_hmm_data(data, kind if kind in HMM_EMISSIONS else "gaussian")
        shape = tuple(model.emissions.emission_shape)
        got = y.shape[2:]
        if got != shape:
            raise DataError(f"{data.path}: the model expects emissions of shape {shape} per step; the file gives {got}")
    elif isinstance(model, ssmjax.LGSSM):
        if decode:
            raise DataError(f"{args.model_file}: decode (Viterbi) applies to HMMs; use `ssmjax smooth` for an LGSSM")
        y = data.values
        if y.shape[2] != model.emission_dim:
            raise DataError(f"{data.path}: the model expects {model.emission_dim} emission column(s); "
                            f"the file gives {y.shape[2]} ({data.columns})")
    else:
        raise DataError(f"{args.model_file}: holds a {type(model).__name__}, not an HMM or LGSSM")
    ll = _total_loglik(model, y, data.lengths)
    print(f"Applied the model in {args.model_file} to {len(data.ids)} sequence(s): log-likelihood {ll:.4f}", file=out)
    smoothed = _smoothed(model, y, data.lengths, decode=decode, checked=False)
    header, rows = _posteriors(model, smoothed, data.lengths, data, decode=decode)
    _write_outputs(args.output, None, header, rows, (model, smoothed, y, data.lengths, data), out)
    return 0


def _add_data_options(p):
    p.add_argument("data", help="a .csv (header row; one row per step) or .npy ((T,), (T, D) or (B, T, D)) file")
    p.add_argument("--columns", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=None,
                   # "%(default).0s" prints nothing; it stops the formatter appending "(default: None)"
                   help="comma-separated emission columns of a CSV (default: all but the id column)%(default).0s")
    p.add_argument("--id-column", default="sequence", help="CSV column naming the sequence of each row")


def main(argv: Sequence[str] | None = None, out=None) -> int:
    """Entry point of the ``ssmjax`` console script. Returns the exit code."""
    from ._cli_data import DataError

    out = out or sys.stdout
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ssmjax", description="Exact, fast, differentiable state-space models in JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ssmjax {__version__}")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                        help="keep compiled programs in the persistent compilation cache "
                        "($SSMJAX_CACHE_DIR or the user's cache folder; SSMJAX_NO_CACHE=1 also turns it off)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    demo = sub.add_parser("demo", help="fit HMMs to earthquake counts and a local-level model to the Nile",
                          formatter_class=defaults)
    demo.add_argument("--output", default=DEFAULT_OUTPUT, help=f"folder for the plots (default {DEFAULT_OUTPUT})")

    fit = sub.add_parser("fit", help="fit an HMM or an LGSSM to your data", formatter_class=defaults)
    fit.add_argument("model", choices=("hmm", "lgssm"),
                     help="hmm: a hidden Markov model; lgssm: a linear-Gaussian state-space model")
    _add_data_options(fit)
    fit.add_argument("--states", type=int, default=2, help="HMM: number of hidden states K")
    fit.add_argument("--emissions", choices=HMM_EMISSIONS, default="gaussian", help="HMM emission family")
    fit.add_argument("--state-dim", type=int, default=1, help="LGSSM: latent dimension Dx")
    fit.add_argument("--method", choices=("em", "sgd"), default="em",
                     help="em: expectation-maximisation; sgd: gradient descent on the log-likelihood (optax adam)")
    fit.add_argument("--iters", type=int, default=200, help="EM iterations / SGD steps")
    fit.add_argument("--tol", type=float, default=1e-7, help="EM relative-improvement tolerance")
    fit.add_argument("--learning-rate", type=float, default=0.02, help="SGD (adam) learning rate")
    fit.add_argument("--restarts", type=int, default=1, help="fit from this many starts and keep the best")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                     help="show a progress bar (default: when stderr is a terminal)")
    fit.add_argument("--output", default="ssmjax-fit-output", help="folder for model.eqx, posteriors.csv, plot.png")

    for name, text in (("decode", "Viterbi paths and posteriors of new data under a saved HMM"),
                       ("smooth", "smoothed posteriors of new data under a saved HMM or LGSSM")):
        p = sub.add_parser(name, help=text, formatter_class=defaults)
        p.add_argument("model_file", help="a model written by `ssmjax fit` or ssmjax.save")
        _add_data_options(p)
        p.add_argument("--output", default=f"ssmjax-{name}-output", help="folder for posteriors.csv and plot.png")

    args = parser.parse_args(argv)
    _use_compilation_cache(args.cache)
    try:
        if args.command == "demo":
            _check_output(args.output)
            run_demo(out=out, output_dir=args.output)
            return 0
        if args.command == "fit":
            for flag in ("states", "state_dim", "iters", "restarts"):
                if getattr(args, flag) < 1:
                    raise DataError(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
            return cmd_fit(args, out)
        if args.command in ("decode", "smooth"):
            return cmd_apply(args, out, decode=args.command == "decode")
    except DataError as err:
        print(f"ssmjax: error: {err}", file=sys.stderr)
        return 2
    parser.print_help(out)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
