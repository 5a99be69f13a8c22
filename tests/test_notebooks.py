"""Execute every worked notebook in ``notebooks/`` at small sizes and fail on any cell error.

Each notebook reads ``SSMJAX_NOTEBOOK_SMALL`` and shrinks its data and iteration
counts when it is set, so the whole set runs in a few minutes on two CPU cores.
Needs ``nbclient``, ``nbformat`` and ``ipykernel`` (in the ``test`` extra); the test
skips with a reason when they are missing.

Kernel: ``kernel_name="python3"``. jupyter_client resolves it without any
``python -m ipykernel install``: the kernelspec that the ipykernel wheel ships (under
``sys.prefix/share/jupyter``), or failing that ipykernel's built-in spec, both start
``python -m ipykernel_launcher`` and jupyter_client replaces a bare ``python`` with
``sys.executable`` -- so the kernel is this interpreter (this venv) in either case.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")

    # The kernel is a child process: it inherits this environment.
    monkeypatch.setenv("SSMJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:  # the message holds the cell and the traceback
        pytest.fail(f"{path.name}: a cell raised\n{err}", pytrace=False)


def test_notebooks_found() -> None:
    assert len(NOTEBOOKS) >= 4, f"expected the worked notebooks in {ROOT / 'notebooks'}, found {NOTEBOOKS}"
    assert sys.executable  # the kernel is started from this interpreter
