"""A tqdm progress bar fed from inside a compiled loop.

The compiled loop calls :func:`report` through :func:`jax.debug.callback`; the
bar lives on the host in a module-level slot, so turning progress on does not
change what is traced beyond the callback itself, and a second call with equal
shapes reuses the compiled loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

_BAR = None


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str, metric: str) -> Iterator[None]:
    """Open a tqdm bar for the duration of a fit (no-op when ``enabled`` is false)."""
    global _BAR
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    _BAR = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True)
    _BAR.metric = metric  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _BAR.close()
        _BAR = None


def _host_report(step, value) -> None:
    bar = _BAR
    if bar is None:
        return
    step = int(np.max(np.asarray(step)))
    value = np.asarray(value)
    shown = float(np.max(value)) if value.ndim else float(value)
    bar.n = min(step + 1, bar.total)
    bar.set_postfix({bar.metric: f"{shown:.6g}"}, refresh=False)
    bar.refresh()


def report(enabled: bool, step: jax.Array, value: jax.Array) -> None:
    """Send ``(step, value)`` to the host bar from traced code (nothing when disabled)."""
    if enabled:
        jax.debug.callback(_host_report, step, value)
