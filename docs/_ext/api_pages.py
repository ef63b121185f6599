"""Directives that build the API pages from each module's ``__all__``.

``.. public-module:: fedjax_lab.tree`` documents every name of that module's ``__all__``:
functions and classes through ``automodule``, and data (``REGISTRY``, constants) through one
``autodata`` each, since ``automodule`` skips module data that has no ``#:`` doc comment.

``.. top-level-api::`` does the same for ``fedjax_lab`` itself, except for re-exports: a name
that a documented subpackage also exports (the same object, e.g. ``fl.FederatedData`` is
``fl.data.FederatedData``) is documented there once and linked from a list here, so no object is
described twice (which would also make short cross-references ambiguous). The documented
subpackages are the pages under ``docs/api/``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

_API = Path(__file__).resolve().parents[1] / "api"
_SHORT_VALUE = 80  # longer values (REGISTRY, DEFAULT_CONFIG) are not printed


def home_modules() -> list[str]:
    """The documented subpackages: one page ``docs/api/<module>.rst`` each."""
    return sorted(p.stem for p in _API.glob("*.rst") if p.stem != "fedjax_lab")


def home_of(name: str, homes: list[str]) -> str | None:
    """The first module of ``homes`` whose ``__all__`` exports ``fedjax_lab.<name>`` itself."""
    import fedjax_lab

    obj = getattr(fedjax_lab, name)
    for modname in homes:
        module = importlib.import_module(modname)
        if name in getattr(module, "__all__", ()) and getattr(module, name) is obj:
            return modname
    return None


def _is_data(obj: Any) -> bool:
    return not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj))


def _role(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "mod"
    if inspect.isclass(obj):
        return "class"
    return "data" if _is_data(obj) else "func"


def module_rst(modname: str, names: list[str]) -> list[str]:
    """``automodule`` of the non-data ``names``, then one ``autodata`` per data name."""
    module = importlib.import_module(modname)
    data = [n for n in names if _is_data(getattr(module, n))]
    lines = [f".. automodule:: {modname}"]
    members = [n for n in names if n not in data and not inspect.ismodule(getattr(module, n))]
    lines += [f"   :members: {', '.join(members)}" if members else "   :no-members:"]
    lines += ["   :undoc-members:", ""]
    for name in data:
        lines += [f".. autodata:: {modname}.{name}"]
        if len(repr(getattr(module, name))) > _SHORT_VALUE:
            lines += ["   :no-value:"]
        lines += [""]
    return lines


class _Generated(SphinxDirective):
    def _parse(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<{self.name}>"), 0, container)
        return container.children


class PublicModule(_Generated):
    """``.. public-module:: MODULE``: every name of ``MODULE.__all__``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        return self._parse(module_rst(modname, list(importlib.import_module(modname).__all__)))


class TopLevelApi(_Generated):
    """``fedjax_lab``'s own names, then ``fl.<name>`` -> home for subpackages and re-exports."""

    def run(self) -> list[nodes.Node]:
        import fedjax_lab

        homes = home_modules()
        own, links = [], []
        for name in fedjax_lab.__all__:
            obj = getattr(fedjax_lab, name)
            home = None if inspect.ismodule(obj) else home_of(name, homes)
            if inspect.ismodule(obj):
                links.append(f"* ``fl.{name}``: :mod:`{obj.__name__}`")
            elif home is not None:
                links.append(f"* ``fl.{name}``: :{_role(obj)}:`{home}.{name}`")
            else:
                own.append(name)
        lines = module_rst("fedjax_lab", own)
        lines += ["Subpackages, and names documented in the subpackage they come from:", ""]
        return self._parse(lines + links)


def _drop_type_docstring(app: Any, what: str, name: str, obj: Any, options: Any,
                         lines: list[str]) -> None:
    """Module data without a doc comment would show its type's docstring (``dict()`` -> ...)."""
    own = inspect.getdoc(type(obj))
    if what == "data" and own and "\n".join(lines).strip() == inspect.cleandoc(own).strip():
        lines.clear()


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _drop_type_docstring)
    app.add_directive("public-module", PublicModule)
    app.add_directive("top-level-api", TopLevelApi)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
