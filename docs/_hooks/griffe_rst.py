"""Griffe extension: the reStructuredText of ssmjax's docstrings, as Markdown for mkdocstrings.

The docstrings are written for ``help()`` and doctest, in Google style with Sphinx roles. The site
renders Markdown, so each role becomes a cross-reference that autorefs must resolve: with mkdocs'
``--strict``, a role naming an object that the site does not document fails the build.

* ``:class:`X```, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:`` -> ``[`X`][path]``, ``X``
  looked up the way a reader would: in the enclosing class, the module, then the ``ssmjax`` namespace
  (a private helper that exists is named without a link; names from jax, equinox, numpy and the
  builtins are named without a link, since no inventory is fetched at build time);
* ``:math:`x``` -> ``$x$``, and a ``.. math::`` directive -> a ``$$`` display block;
* ``:ref:`text <label>``` -> the text (labels are Sphinx's; the site links pages instead);
* ``{args}`` placeholders, which a module fills in at import from its constant ``ARGS_DOC``, filled;
* ``Example:`` -> ``Examples:`` (griffe's section for ``>>>`` examples); ``a, b: text`` in an
  argument section -> one entry per name;
* a paragraph ending in ``::`` (a literal block follows) -> ``:``.
"""

from __future__ import annotations

import ast
import re
import textwrap

import griffe

_ROLE = re.compile(r":(class|func|meth|attr|data|mod|obj|exc):`(~?)([^`<]*?)(?:\s*<([^>]+)>)?`")
_MATH = re.compile(r":math:`([^`]+)`")
_REF = re.compile(r":ref:`([^`<]*?)\s*<[^>]+>`")

logger = griffe.get_logger("griffe_rst")
_EXTERNAL = {"jax", "equinox", "numpy", "np", "optax", "scipy", "sklearn", "hmmlearn", "ValueError", "TypeError",
             "KeyError", "RuntimeError", "FloatingPointError", "NotImplementedError", "dict", "list", "tuple"}


class _Found(str):
    """The path that documents an object (a ``str``), with the object's ``name``."""

    name: str
    documented: bool  # modules all are (the internals pages); other objects when public


def _lookup(root: griffe.Module, path: str) -> _Found | None:
    """Where the object at dotted ``path`` under ``root`` is documented, or None.

    Re-exports are followed to the defining module; a class's inherited member is documented
    under that class (``inherited_members``), so its path stays the class's."""
    parts = path.split(".")
    if parts[0] != root.name:
        return None
    obj, where = root, root.path
    for part in parts[1:]:
        try:
            member = obj.all_members[part] if obj.is_class else obj.members[part]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        inherited = obj.is_class and part not in obj.members
        if member.is_alias and not inherited:
            try:
                member = member.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
            where = member.path
        else:
            where = f"{where}.{part}"
        obj = member
    found = _Found(where)
    found.name = parts[-1]
    found.documented = obj.is_module or not found.name.startswith("_")
    return found


def _candidates(obj, name: str):
    name = name.lstrip(".")
    if name.startswith("ssmjax."):
        yield name
        return
    scope = obj
    while scope is not None:  # the enclosing class(es), then the module, then the packages above it
        yield f"{scope.path}.{name}"
        scope = scope.parent
    yield f"ssmjax.{name}"
    yield f"ssmjax.estimators.{name}"


class RstToMarkdown(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != "ssmjax":
            return
        self._root = pkg
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self._convert(obj, _fill_templates(obj, obj.docstring.value))

    def _convert(self, obj, text: str) -> str:
        text = re.sub(r"^(\s*)Example:[ \t]*$", r"\1Examples:", text, flags=re.M)  # griffe's examples section
        text = _grouped_parameters(text)
        text = _math_blocks(text)
        text = _MATH.sub(lambda m: f"${m.group(1).strip()}$", text)
        text = _REF.sub(lambda m: m.group(1), text)
        text = _ROLE.sub(lambda m: self._link(obj, m), text)
        return re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)

    def _link(self, obj, match: re.Match) -> str:
        role, short, title, target = match.groups()
        name = (target or title).strip()
        if name.split(".")[0] in _EXTERNAL:  # no inventory is fetched at build time: named, not linked
            return f"`{name}{'()' if role in ('func', 'meth') else ''}`"
        for path in _candidates(obj, name):
            found = _lookup(self._root, path)
            if found is not None and not found.documented:
                return f"`{name}`"  # it exists; private helpers are not documented, so named, not linked
            if found is not None:
                shown = title.strip() if target else (name.rsplit(".", 1)[-1] if short else name)
                suffix = "()" if role in ("func", "meth") and not target else ""
                return f"[`{shown}{suffix}`][{found}]"
        logger.warning(f"{obj.path}: the docstring's :{role}:`{name}` names no object of ssmjax")
        return f"`{name}`"


def _fill_templates(obj, text: str) -> str:
    """The ``{name}`` placeholders that a module fills in at import (``__doc__.replace``), filled from
    the module's string constant ``NAME_DOC`` (statically: griffe reads the source, it does not import)."""
    for field in set(re.findall(r"\{(\w+)\}", text)):
        constant = obj.module.members.get(f"{field.upper()}_DOC")
        if constant is None:
            continue
        if constant.is_alias:
            constant = constant.final_target
        # the constant is indented for a raw docstring in a function body; griffe's are dedented
        value = textwrap.indent(textwrap.dedent(ast.literal_eval(str(constant.value))), "    ")
        text = text.replace("{" + field + "}", value)
    return text


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes|Other Parameters):[ \t]*$")
_GROUPED = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+)(\s*\([^)]*\))?:(.*)$")


def _grouped_parameters(text: str) -> str:
    """``a, b: text`` in an argument section -> one entry per name (griffe reads one name per entry)."""
    lines = text.splitlines()
    out, i, section = [], 0, None
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if _SECTION.match(line):
            section = indent
        elif line.strip() and section is not None and indent <= section:
            section = None
        grouped = _GROUPED.match(line) if section is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        lead, names, kind, rest = grouped.groups()
        body = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(lead)):
            body.append(lines[i])
            i += 1
        for name in re.split(r",\s*", names):
            out += [f"{lead}{name}{kind or ''}:{rest}"] + body
    return "\n".join(out)


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        match = re.match(r"^(\s*)\.\. math::\s*(.*)$", lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, first = match.groups()
        body = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        math = textwrap.dedent("\n".join(body)).strip("\n")
        out += [indent + "$$"] + [indent + line for line in math.splitlines()] + [indent + "$$", ""]
    return "\n".join(out)
