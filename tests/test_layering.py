"""The package's modules form layers: no import cycle, counting imports inside functions too.

An import placed inside a function to dodge a cycle hides the cycle from Python but not from this
test, which reads every module's source (``ast``) and builds the graph of imports between ssmjax's
own modules.
"""

from __future__ import annotations

import ast
import pathlib

import ssmjax

ROOT = pathlib.Path(ssmjax.__file__).resolve().parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """ssmjax modules imported anywhere in ``path`` (package ``__init__`` files resolve to the package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def _graph():
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def _cycle(graph):
    """One import cycle as a list of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "ssmjax":  # the package's re-exports import everything; nothing imports them back
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_lgssm_modules_form_layers():
    graph = {k: v for k, v in _graph().items() if k.startswith("ssmjax._lgssm")}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_package_modules_form_layers():
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
