"""The ``ssmjax`` console script.

``ssmjax demo`` runs exact HMM inference on the bundled earthquake counts
(1900-2006) under a two-state Poisson model whose rates are set from the data's
quantiles, and prints the log-likelihood, the smoothed regime probabilities and
the Viterbi-decoded regimes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def _regime_runs(years: np.ndarray, path: np.ndarray) -> list[tuple[int, int, int]]:
    """Collapse a decoded path into (first_year, last_year, state) runs."""
    runs = []
    start = 0
    for t in range(1, len(path) + 1):
        if t == len(path) or path[t] != path[start]:
            runs.append((int(years[start]), int(years[t - 1]), int(path[start])))
            start = t
    return runs


def quantile_poisson_hmm(counts: np.ndarray, num_states: int, stay_prob: float = 0.9):
    """A K-state Poisson HMM set from the data: rates at the (k+1/2)/K quantiles.

    Returns ``(initial_probs, transition_matrix, rates)`` as float64 numpy arrays:
    uniform initial distribution, ``stay_prob`` on the diagonal and the rest
    spread evenly off the diagonal.
    """
    levels = (np.arange(num_states) + 0.5) / num_states
    rates = np.quantile(np.asarray(counts, dtype=np.float64), levels)
    off = (1.0 - stay_prob) / max(num_states - 1, 1)
    transition = np.full((num_states, num_states), off)
    np.fill_diagonal(transition, stay_prob if num_states > 1 else 1.0)
    initial = np.full(num_states, 1.0 / num_states)
    return initial, transition, rates


def poisson_log_likelihoods(counts: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """(T, K) log p(y_t | z_t = k) for Poisson emissions."""
    from jax.scipy.stats import poisson

    counts = np.asarray(counts)[:, None]
    return np.asarray(poisson.logpmf(counts, np.asarray(rates)[None, :]))


def run_demo(out=None) -> dict:
    """Run the demo and print its report to ``out`` (default stdout).

    Returns a dict with the numbers printed (used by the tests).
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import ssmjax
    from ssmjax.datasets import load_earthquakes

    out = out or sys.stdout
    data = load_earthquakes()
    counts = data.values
    initial, transition, rates = quantile_poisson_hmm(counts, num_states=2)
    log_likelihoods = jnp.asarray(poisson_log_likelihoods(counts, rates))
    initial, transition = jnp.asarray(initial), jnp.asarray(transition)

    posterior = ssmjax.hmm_smoother(initial, transition, log_likelihoods)
    path, path_log_prob = ssmjax.hmm_viterbi(initial, transition, log_likelihoods)
    path = np.asarray(path)
    high = np.asarray(posterior.smoothed_probs[:, 1])

    p = lambda *a: print(*a, file=out)  # noqa: E731
    p("ssmjax demo: hidden Markov model inference on real data")
    p(f"Data: annual counts of major (M7+) earthquakes, {data.years[0]}-{data.years[-1]} "
      f"(T = {len(counts)}; {data.source}).")
    p("Model: 2-state Poisson HMM set from the data's quantiles (not fitted):")
    p(f"  rates            = [{rates[0]:.2f}, {rates[1]:.2f}]  (25% and 75% quantiles)")
    p(f"  transition_matrix = [[{transition[0, 0]:.2f}, {transition[0, 1]:.2f}], "
      f"[{transition[1, 0]:.2f}, {transition[1, 1]:.2f}]]")
    p(f"Log-likelihood log p(y_1:T) = {float(posterior.marginal_loglik):.4f}")
    p(f"Viterbi path log-probability log p(z*, y) = {float(path_log_prob):.4f}")
    p("Decoded regimes (Viterbi):")
    for first, last, state in _regime_runs(data.years, path):
        label = "high" if state == 1 else "low "
        span = f"{first}-{last}" if first != last else f"{first}"
        p(f"  {span:>9}  {label} (rate {rates[state]:.1f}/yr)  "
          f"mean p(high | all data) = {high[first - data.years[0]: last - data.years[0] + 1].mean():.2f}")
    p(f"Years more likely high than low (smoothed): {int((high > 0.5).sum())} of {len(counts)}")
    return {
        "marginal_loglik": float(posterior.marginal_loglik),
        "path": path,
        "path_log_prob": float(path_log_prob),
        "rates": rates,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssmjax`` console script."""
    parser = argparse.ArgumentParser(
        prog="ssmjax", description="Exact, fast, differentiable state-space models in JAX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="HMM inference on the bundled earthquake counts")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo()
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
