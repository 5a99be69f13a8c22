"""Docs that run: the ```` ```python ```` blocks of README.md and of each page of the documentation
site (``docs/``, content tabs included), in order, one script per page in a fresh interpreter
(``JAX_PLATFORMS=cpu``, JAX's default float32), so each block may use only what the blocks before
it and itself define. Tracebacks point at the page's own line numbers. ``bash`` and ``text``
blocks are not run; a block starting ``# requires: module`` runs where that module is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGE_TIMEOUT_S = 600


DOC_PAGES = [README] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first_line, source)`` of each ```` ```python ```` block of a Markdown page, in order (1-based
    lines). Blocks inside content tabs are indented; they are dedented. A block whose first line is
    ``# requires: module`` is left out where that module is not installed."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```[ \t]*$", text, flags=re.S | re.M):
        source = textwrap.dedent(match.group(2))
        needs = re.match(r"#\s*requires:\s*([\w.]+)", source.lstrip())
        if needs and importlib.util.find_spec(needs.group(1)) is None:
            continue
        blocks.append((text.count("\n", 0, match.start(2)) + 1, source))
    return blocks


# Runs the blocks in one namespace; each is compiled against its page with its own line numbers.
_PAGE_DRIVER = """\
import json, sys
path, blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
for first_line, source in blocks:
    exec(compile("\\n" * (first_line - 1) + source, path, "exec"), namespace)
"""


@pytest.mark.parametrize("page", [p for p in DOC_PAGES if p == README or python_blocks(p)],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_python_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = python_blocks(page)
    if page == README:
        assert len(blocks) >= 3, f"expected the README's Python examples, found {len(blocks)} ```python blocks"
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([str(page), blocks]), encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PAGE_DRIVER, str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    if proc.returncode != 0:
        name = page.relative_to(ROOT)
        pytest.fail(f"{name}'s python blocks failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}", pytrace=False)
