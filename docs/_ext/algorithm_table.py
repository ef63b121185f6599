"""The ``algorithm-table`` directive: one row per entry of ``fedjax_lab.algorithms.REGISTRY``.

Everything in a row is read from the registered factory when the docs are built, so the table
cannot drift from the code: the name, the public function it is (found by identity among the
documented modules), the first line of its docstring, the paper (first entry of the docstring's
``References`` section) and the hyper-parameters with their defaults (``inspect.signature``).
A ``**kwargs`` parameter is listed as "see" the function its ``Args`` entry names, else
:func:`fedjax_lab.algorithms.fed_opt`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

# Not hyper-parameters: the problem, the local optimiser, and execution/labelling knobs.
_LEFT_OUT = ("loss_fn", "client_optimizer", "unroll", "name")
_SEARCHED = ("fedjax_lab.algorithms", "fedjax_lab.attacks", "fedjax_lab.compression")
_DEFAULT_KWARGS_TARGET = "fedjax_lab.algorithms.fed_opt"


def public_name(factory: Callable[..., Any]) -> str | None:
    """The documented ``module.name`` of ``factory``, or ``None`` if no ``__all__`` lists it."""
    for modname in _SEARCHED:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            if getattr(module, name, None) is factory:
                return f"{modname}.{name}"
    return None


def paper(doc: str) -> str:
    """The first entry (first paragraph) of a Google-style ``References:`` section, or ``""``."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() in ("References:", "Reference:"):
            entry = []
            for body in lines[i + 1 :]:
                if not body.strip():
                    if entry:
                        break
                    continue
                if not body.startswith((" ", "\t")):
                    break  # the next section
                entry.append(body.strip())
            return " ".join(entry)
    return ""


def kwargs_target(doc: str) -> str:
    """The function a docstring says its ``**kwargs`` are passed to (default: ``fed_opt``)."""
    match = re.search(r"\*\*\w+:.*?:func:`~?([\w.]+)`", doc)
    if not match:
        return _DEFAULT_KWARGS_TARGET
    target = match.group(1)
    return target if "." in target else f"fedjax_lab.algorithms.{target}"


def hyper_parameters(factory: Callable[..., Any]) -> list[str]:
    """reST snippets ``name=default`` (or ``name`` when required) of a factory's signature."""
    doc = inspect.getdoc(factory) or ""
    out = []
    for p in inspect.signature(factory).parameters.values():
        if p.name in _LEFT_OUT:
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(f"``**{p.name}``: see :func:`{kwargs_target(doc)}`")
        elif p.kind is p.VAR_POSITIONAL:
            out.append(f"``*{p.name}``")
        elif p.default is p.empty:
            out.append(f"``{p.name}`` (required)")
        else:
            out.append(f"``{p.name}={p.default!r}``")
    return out


def _cell(text: str) -> str:
    return text.replace("\n", " ").strip() or "—"


def table_rst(registry: dict[str, Callable[..., Any]]) -> list[str]:
    """The ``list-table`` of a registry, as reST lines."""
    rows = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 12 16 30 22 20",
        "",
        "   * - name",
        "     - factory",
        "     - summary",
        "     - paper",
        "     - hyper-parameters (defaults)",
    ]
    for name in sorted(registry):
        factory = registry[name]
        doc = inspect.getdoc(factory) or ""
        where = public_name(factory)
        ref = f":func:`{where}`" if where else f"``{factory.__module__}.{factory.__qualname__}``"
        summary = doc.split("\n\n")[0]
        hps = hyper_parameters(factory)
        rows += [
            f"   * - ``{name}``",
            f"     - {ref}",
            f"     - {_cell(summary)}",
            f"     - {_cell(paper(doc))}",
        ]
        if hps:
            rows.append(f"     - * {hps[0]}")
            rows += [f"       * {h}" for h in hps[1:]]
        else:
            rows.append("     - —")
    return rows


class AlgorithmTable(SphinxDirective):
    """``.. algorithm-table::`` renders :func:`table_rst` of the live registry."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from fedjax_lab.algorithms import REGISTRY

        container = nodes.container()
        lines = table_rst(REGISTRY)
        self.state.nested_parse(StringList(lines, source="<algorithm-table>"), 0, container)
        return container.children


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("algorithm-table", AlgorithmTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
