"""Docs that run: every ``>>>`` example in the package's docstrings (the pages' Python blocks:
``test_docs_pages.py``).

Doctests: one test per module of ``ssmjax/`` whose source holds a ``>>>`` prompt, run with the
standard library's ``doctest`` (``ELLIPSIS | NORMALIZE_WHITESPACE``) under this run's settings
(float64, from conftest.py). Each docstring starts from an empty namespace, so an example has to
import what it uses, as a reader copying it would. Modules are found from the files, not with
``pkgutil.walk_packages``, so a directory without an ``__init__.py`` is not missed. Every ``>>>``
prompt in a file must belong to an example that doctest found and ran, so a docstring that doctest cannot see (a wrapper with another ``__module__``, an
example outside a docstring) fails here instead of being skipped in silence.

The examples also check the public signatures: they run through copies of the public entry points
that beartype and jaxtyping check (:mod:`signatures`), and every entry point must be reached.
"""

from __future__ import annotations

import collections
import doctest
import importlib
import inspect
import io
from pathlib import Path

import pytest

import signatures

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssmjax"
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


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


