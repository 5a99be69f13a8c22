"""The console script's PNG plots (when matplotlib is installed).

Figures are drawn on matplotlib's Agg canvas directly: pyplot is never imported, and with it
go its backend selection and figure managers, which a one-shot command has no use for.
"""

from __future__ import annotations

import os

import numpy as np

Z90 = 1.6448536269514722  # 90 % two-sided normal quantile


def preload() -> None:
    """Import what the plots draw with; ``ssmjax._cli_programs.run`` runs it while XLA loads a program."""
    import importlib

    try:
        for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
            importlib.import_module(name)
    except ImportError:
        pass


def _figure(**kwargs):
    """A matplotlib Figure on an Agg canvas, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def fit_plot(path, model, centres, smoothed, y, lengths, data) -> bool:
    """The first sequence with each state's mean (HMM) and its posterior; False without matplotlib.

    ``centres``: (K, D) state means or rates, or None; ``smoothed`` as ``ssmjax._cli_fit.posterior_arrays``.
    """
    fig = _figure(figsize=(9, 5))
    if fig is None:
        return False
    import ssmjax

    n = int(lengths[0])
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    steps = np.arange(n)
    obs = np.asarray(y[0, :n]).reshape(n, -1)
    ax1.plot(steps, obs[:, 0], ".", color="0.4", label=f"{data.columns[0]} (sequence {data.ids[0]})")
    ax1.set_ylabel(data.columns[0])
    ax1.set_title(f"{type(model).__name__} on {os.path.basename(str(data.path))}: sequence {data.ids[0]}")
    if isinstance(model, ssmjax.HMM):
        if centres is not None:  # each state's mean of the plotted column, in the state's colour below
            for k, level in enumerate(np.asarray(centres)[:, 0]):
                ax1.axhline(level, color=f"C{k}", lw=1, ls="--", label=f"state {k} mean" if k < 4 else None)
        probs = smoothed[0][0, :n]
        ax2.stackplot(steps, probs.T, labels=[f"state {i}" for i in range(probs.shape[1])], alpha=0.8)
        ax2.set_ylabel("p(state | data)")
        ax2.set_ylim(0, 1)
    else:
        means, sds = smoothed[0][0, :n], smoothed[1][0, :n]
        for i in range(means.shape[1]):
            ax2.plot(means[:, i], label=f"x_{i}")
            ax2.fill_between(steps, means[:, i] - 1.645 * sds[:, i], means[:, i] + 1.645 * sds[:, i], alpha=0.2)
        ax2.set_ylabel("smoothed state (90 %)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8, loc="upper right")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def demo_plots(out_dir, quakes, eq_fit, nile, nile_fit) -> list[str]:
    """``ssmjax demo``'s two plots in ``out_dir``; their paths (none without matplotlib)."""
    fig = _figure(figsize=(9, 5.5))
    if fig is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []

    two = eq_fit[0]
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
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
    written.append(path)

    fig = _figure(figsize=(9, 4))
    ax = fig.subplots()
    level, level_sd = nile_fit["level"], nile_fit["level_sd"]
    ax.plot(nile.years, nile.values, "o", ms=3, color="0.4", label="annual flow")
    ax.plot(nile.years, level, color="C0", lw=2, label="smoothed level")
    ax.fill_between(nile.years, level - Z90 * level_sd, level + Z90 * level_sd, color="C0", alpha=0.35,
                    label="90 % band of the level")
    # where a year's flow falls given the level: the level's uncertainty plus the observation noise
    flow_sd = np.sqrt(level_sd ** 2 + nile_fit["emission_var"])
    ax.fill_between(nile.years, level - Z90 * flow_sd, level + Z90 * flow_sd, color="C0",
                    alpha=0.1, label="90 % band of the flow")
    ax.set_xlabel("year")
    ax.set_ylabel("flow (10^8 m^3)")
    ax.set_title("Nile at Aswan: local-level model fitted by EM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "nile_local_level.png")
    fig.savefig(path, dpi=120)
    written.append(path)
    return written
