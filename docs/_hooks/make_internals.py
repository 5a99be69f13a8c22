"""Write docs/internals/*.md: every internal module of ssmjax, with the members it defines itself.

Run from the repository root after adding or removing a module: ``python docs/_hooks/make_internals.py``.
A test checks that the pages name every module (tests/test_docs_site.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = {"ssmjax", "ssmjax.estimators", "ssmjax.datasets", "ssmjax.examples", "ssmjax.cli"}
PAGES = {
    "hmm": ("HMM internals", lambda m: m.startswith("ssmjax._hmm")),
    "lgssm": ("LGSSM internals", lambda m: m.startswith("ssmjax._lgssm")),
    "common": ("Shared internals", lambda m: not m.startswith(("ssmjax._hmm", "ssmjax._lgssm"))),
}
INTRO = (
    "How the algorithms are computed: numerics, padding, custom gradients and the strategies. These "
    "modules are internal: their names start with an underscore and may change between releases. Their "
    "notes are the reference for what the public functions compute and why."
)


def modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "ssmjax").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [m for m in names if m not in PUBLIC]


def defined_members(module: str) -> list[str]:
    """Public names the module defines (not imports), in source order."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in dict.fromkeys(names) if not n.startswith("_") and n != "logger"]


def page(title: str, mods: list[str]) -> str:
    out = [f"# {title}", "", INTRO, ""]
    for m in mods:
        members = defined_members(m)
        out += [f"::: {m}", "    options:", "      show_if_no_docstring: true", "      inherited_members: false"]
        out += [f"      members: [{', '.join(members)}]" if members else "      members: false", ""]
    return "\n".join(out)


def pages() -> dict[str, str]:
    mods = modules()
    return {slug: page(title, [m for m in mods if pick(m)]) for slug, (title, pick) in PAGES.items()}


if __name__ == "__main__":
    for slug, text in pages().items():
        (ROOT / "docs" / "internals" / f"{slug}.md").write_text(text, encoding="utf-8")
