"""The API reference builds with warnings as errors and documents every public name.

The site is built once (``sphinx-build -W -b html docs OUT`` in a subprocess, this checkout first
on ``PYTHONPATH``); its ``objects.inv`` must hold every name of ``fedjax_lab.__all__`` and of
each public subpackage's ``__all__`` (a re-export counts when the same object is documented in
the module it comes from; a module counts when it has its own page), and the algorithm table
must hold one row per registry entry with every hyper-parameter of the factory's signature.
"""

from __future__ import annotations

import html
import importlib
import inspect
import os
import posixpath
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from sphinx.util.inventory import InventoryFile

import fedjax_lab as fl

ROOT = Path(__file__).resolve().parents[1]
BUILD_BUDGET_S = 120  # ~20 s on a quiet 2-core machine
PUBLIC = [
    "fedjax_lab",
    *(f"fedjax_lab.{m}" for m in (
        "algorithms", "aggregators", "server", "maps", "client", "data", "models", "metrics",
        "privacy", "robust", "attacks", "compression", "sweep", "checkpoint", "distributed",
        "personalization", "tree", "experiment", "cli", "plots",
    )),
    "fedjax_lab.data.datasets",
    "fedjax_lab.data.partition",
]
LEFT_OUT_OF_TABLE = ("loss_fn", "client_optimizer", "unroll", "name")


def _public_modules() -> list[ModuleType]:
    """PUBLIC plus every module reachable through an ``__all__`` (e.g. ``data.sampling``)."""
    seen: dict[str, ModuleType] = {}
    todo = [importlib.import_module(m) for m in PUBLIC]
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen[module.__name__] = module
        todo += [getattr(module, n) for n in module.__all__
                 if inspect.ismodule(getattr(module, n))]
    return list(seen.values())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, dict[str, dict[str, object]], float]:
    out = tmp_path_factory.mktemp("docs_html")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr[-6000:]}"
    with open(out / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    return out, inventory, seconds


def _documented(inventory) -> tuple[set[str], set[str]]:
    names = {name for role, items in inventory.items() if role.startswith("py:") for name in items}
    return names, set(inventory.get("py:module", {}))


def test_docs_build_with_warnings_as_errors_in_budget(site):
    out, inventory, seconds = site
    assert (out / "index.html").exists() and (out / "algorithms.html").exists()
    assert "fedjax_lab.algorithms" in inventory["py:module"]
    assert seconds < BUILD_BUDGET_S, f"docs build took {seconds:.0f} s"


def test_every_public_name_is_documented(site):
    _, inventory, _ = site
    names, modules = _documented(inventory)
    homes = {m.__name__: m for m in _public_modules()}
    assert {"fedjax_lab.data.sampling", "fedjax_lab.data.participation"} <= set(homes)
    missing = []
    for modname, module in homes.items():
        assert modname in modules, f"no page for {modname}"
        for name in module.__all__:
            obj = getattr(module, name)
            if f"{modname}.{name}" in names:
                continue
            if inspect.ismodule(obj) and obj.__name__ in modules:
                continue
            if any(name in h.__all__ and getattr(h, name) is obj and f"{hn}.{name}" in names
                   for hn, h in homes.items() if hn != modname):
                continue  # a re-export, documented where it comes from
            missing.append(f"{modname}.{name}")
    assert not missing, f"public names missing from the API reference: {missing}"


def _table_rows(page: str) -> dict[str, str]:
    table = page[page.index("<table"):page.index("</table>")]
    rows = {}
    for row in re.findall(r"<tr.*?</tr>", table, re.S)[1:]:
        text = html.unescape(re.sub(r"<[^>]+>", " ", row))
        rows[text.split()[0]] = text
    return rows


def test_algorithm_table_is_the_registry(site):
    out, _, _ = site
    rows = _table_rows((out / "algorithms.html").read_text())
    assert set(rows) == set(fl.algorithms.REGISTRY)
    for name, factory in fl.algorithms.REGISTRY.items():
        for p in inspect.signature(factory).parameters.values():
            if p.name in LEFT_OUT_OF_TABLE:
                continue
            if p.kind is p.VAR_KEYWORD:
                assert f"**{p.name}" in rows[name] and "see" in rows[name], name
            elif p.default is p.empty:
                assert f"{p.name} (required)" in rows[name], (name, p.name)
            else:
                assert f"{p.name}={p.default!r}" in rows[name], (name, p.name, rows[name])
    assert "McMahan" in rows["fedavg"] and "AISTATS 2017" in rows["fedavg"]
    assert "ICML 2020" in rows["scaffold"]


def test_license_and_project_urls_agree():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text()
    assert project["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    urls = project["urls"]
    assert set(urls) == {"Homepage", "Repository", "Documentation", "Issues"}
    assert all(u.startswith(urls["Repository"]) for u in urls.values()), urls
    make = (ROOT / "notebooks" / "_make.py").read_text()
    assert "fedjax-lab/fedjax_lab" not in make  # the address comes from pyproject only
    first_code = next(c for c in _notebook_cells("01_quickstart") if c["cell_type"] == "code")
    assert f"git+{urls['Repository']}" in "".join(first_code["source"])


def _notebook_cells(name: str) -> list[dict]:
    import json

    return json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
