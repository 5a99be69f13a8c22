"""The documentation site (mkdocs.yml, docs/): it builds in strict mode, and what it shows is complete.

``mkdocs build --strict`` fails on any warning: a docstring's cross-reference (a ``:func:`` role)
naming an object the site does not document, a link to a missing page, a docstring whose
parameters do not match the signature. The site's Python blocks run in ``test_docs.py``.
Needs the ``docs`` extra (part of ``test``).
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ssmjax
import ssmjax.estimators

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _make_internals():
    spec = importlib.util.spec_from_file_location("make_internals", DOCS / "_hooks" / "make_internals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        warnings = "\n".join(line for line in proc.stderr.splitlines() if "WARNING" in line or "Error" in line)
        pytest.fail(f"mkdocs build --strict failed (exit {proc.returncode}):\n{warnings or proc.stderr[-6000:]}")
    return out


def _text_outside_code(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"<(pre|code)\b.*?</\1>", " ", text, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def test_no_restructuredtext_survives(site: Path) -> None:
    # the docstrings' Sphinx roles, math directives and {args} templates are all converted
    leftovers = re.compile(r":(class|func|meth|attr|mod|data|math|ref):`|\.\. math::|\{args\}")
    bad = {}
    for page in site.rglob("*.html"):
        found = leftovers.findall(_text_outside_code(page))
        if found:
            bad[str(page.relative_to(site))] = sorted(set(found))
    assert not bad, f"reStructuredText left in the rendered pages: {bad}"


def _public_names() -> list[str]:
    names = [f"ssmjax.{n}" for n, v in vars(ssmjax).items()
             if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))]
    names += [f"ssmjax.estimators.{n}" for n, v in vars(ssmjax.estimators).items()
              if not n.startswith("_") and inspect.isclass(v)]
    names += [f"ssmjax.datasets.{n}" for n in ("load_earthquakes", "load_nile", "load_us_gdp_growth")]
    return names


def test_every_public_object_has_a_reference_entry(site: Path) -> None:
    anchors = set()
    for page in (site / "api").rglob("*.html"):
        anchors |= set(re.findall(r'id="(ssmjax\.[\w.]+)"', page.read_text(encoding="utf-8")))
    missing = [name for name in _public_names() if name not in anchors]
    assert len(_public_names()) > 70  # not vacuous
    assert not missing, f"public objects without an entry in the API reference (docs/api/*.md): {missing}"


def test_notebooks_render_with_their_outputs(site: Path) -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        page = site / "notebooks" / nb.stem / "index.html"
        assert page.exists(), f"{nb.name} is not on the site (add it to mkdocs.yml's nav)"
        text = page.read_text(encoding="utf-8")
        assert "<img" in text or "data:image/png" in text, f"{nb.name}: rendered without its figures"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
             if "_hooks" not in p.parts and p.parts[-2:] != ("notebooks", "README.md")]
    pages += [f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")]
    missing = [p for p in pages if f": {p}" not in nav]
    assert not missing, f"pages not listed in mkdocs.yml's nav: {missing}"


def test_internals_pages_list_every_module() -> None:
    # docs/internals/*.md are generated: run `python docs/_hooks/make_internals.py` after adding a module
    for slug, text in _make_internals().pages().items():
        page = DOCS / "internals" / f"{slug}.md"
        assert page.read_text(encoding="utf-8") == text, f"{page} is out of date: python docs/_hooks/make_internals.py"
