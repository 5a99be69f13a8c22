"""Docs that run: every ``>>>`` example in the package's docstrings, and the Python blocks of every page.

Doctests: one test per module of ``ssmjax/`` whose source holds a ``>>>`` prompt, run with the
standard library's ``doctest`` (``ELLIPSIS | NORMALIZE_WHITESPACE``) under this run's settings
(float64, from conftest.py). Each docstring starts from an empty namespace, so an example has to
import what it uses, as a reader copying it would. Modules are found from the files, not with
``pkgutil.walk_packages``, so a directory without an ``__init__.py`` is not missed. Every ``>>>`` prompt in a file must belong to an example that doctest
found and ran, so a docstring that doctest cannot see (a wrapper with another ``__module__``, an
example outside a docstring) fails here instead of being skipped in silence.

The examples also check the public signatures: they run through copies of the public entry points
that beartype and jaxtyping check (:mod:`signatures`), and every entry point must be reached.

Pages: the ```` ```python ```` blocks of README.md and of each page of the documentation site
(``docs/``, content tabs included), in order, run as one script per page in a fresh interpreter
(``JAX_PLATFORMS=cpu``, JAX's default float32), so each block may use only what the blocks before
it and itself define. Tracebacks point at the page's own line numbers. ``bash`` and ``text``
blocks are not run; a block starting ``# requires: module`` runs where that module is installed.
"""

from __future__ import annotations

import collections
import doctest
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import signatures

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssmjax"
README = ROOT / "README.md"
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PAGE_TIMEOUT_S = 600


def _prompts(path: Path) -> int:
    return sum(line.lstrip().startswith(">>>") for line in path.read_text(encoding="utf-8").splitlines())


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if _prompts(p)}


class _Finder(doctest.DocTestFinder):
    """Line numbers of decorated functions (the jaxtyping hook wraps them) from the function itself."""

    def _find_lineno(self, obj, source_lines):
        return super()._find_lineno(inspect.unwrap(obj) if inspect.isfunction(obj) else obj, source_lines)


# calls of each public entry point through its checked copy, over this file's doctests
_CHECKED_CALLS: collections.Counter[str] = collections.Counter()
_DOCTESTS_RUN: set[str] = set()


@pytest.mark.parametrize("name", sorted(MODULE_FILES))
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    tests = _Finder().find(module, name, globs={})
    found = sum(len(t.examples) for t in tests)
    prompts = _prompts(MODULE_FILES[name])
    assert found == prompts, (
        f"{MODULE_FILES[name]} has {prompts} '>>>' prompts but doctest finds {found} examples in "
        f"{name}'s docstrings: an example doctest cannot find (outside a docstring, or on an object it "
        "does not attribute to this module) would never run"
    )
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = io.StringIO()
    with signatures.checking() as calls:
        for test in tests:
            runner.run(test, out=report.write)
    _CHECKED_CALLS.update(calls)
    if runner.failures:
        pytest.fail(
            f"{runner.failures} of {runner.tries} doctest examples failed in {name}:\n{report.getvalue()}",
            pytrace=False,
        )
    _DOCTESTS_RUN.add(name)


def test_public_signatures_annotated() -> None:
    missing = signatures.missing_annotations()
    assert not missing, f"public parameters or returns without a type annotation: {missing}"


def test_public_signatures_checked_by_examples() -> None:
    # runs after every test_doctests case of this file (pytest keeps the file's order)
    if _DOCTESTS_RUN != set(MODULE_FILES):
        pytest.skip("needs every module's doctests to have run in this process")
    assert _CHECKED_CALLS, "no public entry point is exempt from the jaxtyping hook; nothing was checked"
    unreached = sorted(name for name, count in _CHECKED_CALLS.items() if count == 0)
    assert not unreached, (
        "public entry points whose annotations no documented example checked (give each an example, "
        f"or call it from one): {unreached}"
    )


def test_doctest_modules_found() -> None:
    # the examples live in (at least) these modules; an empty parametrization would pass vacuously
    expected = {"ssmjax._hmm.inference", "ssmjax._hmm.model", "ssmjax._lgssm.inference", "ssmjax._fit.em"}
    assert expected <= set(MODULE_FILES), f"doctest modules found: {sorted(MODULE_FILES)}"


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
