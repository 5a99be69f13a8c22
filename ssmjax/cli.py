"""The ``ssmjax`` console script.

``ssmjax demo`` fits models to the two bundled real data sets and prints what
it found:

* earthquake counts 1900-2006: Poisson HMMs with 2 and 3 states fitted by EM
  from quantile starting values -- rates, transition matrices, log-likelihoods,
  AIC/BIC, and the Viterbi-decoded regimes;
* Nile flow 1871-1970: the local-level model fitted by EM with a diffuse-like
  initial covariance -- both variances, and the smoothed level with a 90 % band;

and writes PNG plots of both into an output folder it names (when matplotlib is
installed: ``pip install "ssmjax[plot]"``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

DEFAULT_OUTPUT = "ssmjax-demo-output"


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
        start = ssmjax.HMM.from_data(jax.random.key(0), y, k, "poisson")
        fitted, lls, info = ssmjax.fit_em(start, y, max_iters=500, tol=1e-10, return_info=True)
        order = np.argsort(np.asarray(fitted.emissions.rates[:, 0]))
        loglik = float(fitted.marginal_loglik(y[0]))
        num_params = (k - 1) + k * (k - 1) + k  # initial, transitions, rates
        results.append(dict(
            num_states=k,
            model=fitted,
            order=order,
            rates=np.asarray(fitted.emissions.rates[:, 0])[order],
            transition_matrix=np.asarray(fitted.transition_matrix)[np.ix_(order, order)],
            loglik=loglik,
            aic=-2 * loglik + 2 * num_params,
            bic=-2 * loglik + np.log(len(counts)) * num_params,
            iterations=info.num_iters,
            path=np.argsort(order)[np.asarray(fitted.most_likely_states(y[0]))],
            smoothed=np.asarray(fitted.smoother(y[0]).smoothed_probs)[:, order],
        ))
    return results


def fit_nile_local_level(flow: np.ndarray):
    """EM fit of the local-level model (random walk plus noise) with a diffuse-like prior."""
    import jax.numpy as jnp

    import ssmjax

    y = jnp.asarray(flow, jnp.float64)[:, None]
    start = ssmjax.LGSSM(
        initial_mean=jnp.zeros(1), initial_cov=jnp.full((1, 1), 1e7),
        transition_matrix=jnp.ones((1, 1)), transition_cov=jnp.full((1, 1), float(np.var(flow)) / 10),
        emission_matrix=jnp.ones((1, 1)), emission_cov=jnp.full((1, 1), float(np.var(flow))),
    )
    frozen = ("initial_mean", "initial_cov", "transition_matrix", "emission_matrix")
    fitted, lls, info = ssmjax.fit_em(start, y[None], max_iters=2000, tol=1e-10, frozen=frozen,
                                      return_info=True)
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
                    nile_fit["level"] + z * nile_fit["level_sd"], color="C0", alpha=0.25, label="90 % band")
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
    best = min(eq_fit, key=lambda r: r["bic"])
    p(f"   BIC prefers {best['num_states']} states.")
    two = eq_fit[0]
    p("   Decoded regimes of the 2-state model (Viterbi):")
    for first, last, state in _regime_runs(quakes.years, two["path"]):
        span = f"{first}-{last}" if first != last else f"{first}"
        p(f"     {span:>9}  {'high' if state == 1 else 'low '} ({two['rates'][state]:.1f} per year)")
    p("")
    p(f"2. Nile flow at Aswan, {nile.years[0]}-{nile.years[-1]} (T = {len(nile.values)})")
    p(f"   source: {nile.source}")
    nile_fit = fit_nile_local_level(nile.values)
    p(f"   Local-level model (EM, {nile_fit['iterations']} iterations, initial variance 1e7):")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssmjax`` console script."""
    parser = argparse.ArgumentParser(
        prog="ssmjax", description="Exact, fast, differentiable state-space models in JAX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="fit HMMs to earthquake counts and a local-level model to the Nile")
    demo.add_argument("--output", default=DEFAULT_OUTPUT, help=f"folder for the plots (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(output_dir=args.output)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
