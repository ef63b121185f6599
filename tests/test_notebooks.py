"""The tutorial notebooks run top to bottom (tiny settings) and print sensible numbers.

Each notebook is executed in a fresh ``python3`` kernel by ``nbclient`` with
``FEDJAX_LAB_SMOKE=1`` (few rounds, small grids) and a temporary working directory. The
committed ``.ipynb`` files must be clean (no outputs) and match ``notebooks/_make.py``.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import ipykernel  # noqa: F401  (the test extra installs all three; missing one = failure)
import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart", "02_custom_algorithm", "03_sweeps", "04_stateful_algorithm",
         "05_compiled_simulator"]
CELL_TIMEOUT_S = 300

NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def _load_make():
    spec = importlib.util.spec_from_file_location("_make_notebooks", NOTEBOOKS / "_make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def _num_images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        for out in cell.get("outputs", [])
    )


def _numbers(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern.replace("{N}", NUMBER), text)]


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel inherits this process's environment.
    monkeypatch.setenv("FEDJAX_LAB_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JAX_NUMPY_RANK_PROMOTION", "raise")  # as tests/conftest.py does
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        out for cell in nb.cells for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    return nb


def _check_01(nb, text: str) -> None:
    accs = dict(re.findall(r"(FedAvg|FedAdam): .*final test accuracy " + NUMBER, text))
    assert set(accs) == {"FedAvg", "FedAdam"}, text
    for name, value in accs.items():
        assert 0.0 <= float(value) <= 1.0, (name, value)
    assert float(accs["FedAdam"]) > 0.2  # 20 rounds learn something (chance is 0.1)
    assert "label skew" in text  # train.describe() printed
    rows = re.findall(r"^(FedAvg|FedAdam)\s+" + r"\s+".join([NUMBER] * 4) + r"\s*$", text, re.M)
    assert len(rows) == 2, text
    for _, acc, p10, p50, mean in rows:
        values = [float(v) for v in (acc, p10, p50, mean)]
        assert all(0.0 <= v <= 1.0 for v in values), values
        assert float(p10) <= float(p50)
    assert _num_images(nb) >= 2  # curves and the per-client histogram


def _check_02(nb, text: str) -> None:
    assert "trimmed mean: 2.5 (expected 2.5)" in text
    accs = {k: float(v) for k, v in
            re.findall(r"^(.+?)\s+final test accuracy " + NUMBER, text, re.M)}
    assert sorted(accs) == ["FedAvg", "FedAvg, attacked", "clip + trimmed mean",
                            "clip + trimmed mean, attacked"], text
    assert all(0.0 <= v <= 1.0 for v in accs.values()), accs
    # The notebook's point: the attack wrecks FedAvg, the trimmed mean resists it.
    assert accs["FedAvg, attacked"] < accs["clip + trimmed mean, attacked"], accs
    m = re.search(r"run_round on a hand-made cohort: round (\d+), train loss " + NUMBER, text)
    assert m and int(m.group(1)) == 1 and math.isfinite(float(m.group(2))), text
    (diff,) = _numbers(r"max \|auto\(\) - vmap\(\)\| over the new params: {N}", text)
    assert diff < 1e-4
    assert _num_images(nb) >= 1


def _check_03(nb, text: str) -> None:
    table = re.findall(r"^\s*" + r"\s+".join([NUMBER] * 5) + r"\s*$", text, re.M)
    assert len(table) == 4, text  # 2 configurations x 2 seeds in smoke mode
    assert all(0.0 <= float(row[4]) <= 1.0 for row in table), table
    (best,) = _numbers(r"final test accuracy {N} \(mean over 2 seeds\)", text)
    assert 0.0 <= best <= 1.0
    (speedup,) = _numbers(r"sweep speed-up: {N}x", text)
    assert speedup > 0
    (gap,) = _numbers(r"max \|sweep - one by one\| test accuracy: {N}", text)
    assert gap < 1e-3  # the sweep's rows equal single runs
    assert _num_images(nb) >= 1


def _check_04(nb, text: str) -> None:
    (diff,) = _numbers(r"over params and control variates: {N}", text)
    assert diff < 1e-5, text  # the kit-built SCAFFOLD is the library's SCAFFOLD
    assert "a misspelt key is refused: algorithms[0].aggregator.tua" in text, text
    accs = dict(re.findall(r"^(my_scaffold|fedadam_clipped): final test accuracy " + NUMBER,
                           text, re.M))
    assert set(accs) == {"my_scaffold", "fedadam_clipped"}, text
    assert all(0.0 <= float(v) <= 1.0 for v in accs.values()), accs
    cell = next(c.source for c in nb.cells if "def my_scaffold(" in c.source)
    assert len(cell.splitlines()) <= 40  # a stateful algorithm in one short cell


def _check_05(nb, text: str) -> None:
    mean, half = re.findall(
        r"final test accuracy " + NUMBER + " ± " + NUMBER + r" \(95% CI over 4 seeds\)", text)[0]
    assert 0.0 <= float(mean) <= 1.0 and 0.0 < float(half) < 1.0, text
    assert "equal per-client rates == the scalar run, bit for bit: True" in text, text
    grad, fd = re.findall(r"autodiff " + NUMBER + r", finite differences " + NUMBER, text)[0]
    assert abs(float(grad) - float(fd)) <= 0.05 * abs(float(fd)) + 1e-6, (grad, fd)
    (tuned,) = _numbers(r"gradient descent: server_lr {N}", text)
    assert tuned > 0
    alphas = re.findall(r"^\s*(0\.05|100)\s+" + NUMBER + r"\s*$", text, re.M)
    assert [a for a, _ in alphas] == ["0.05", "100"], text
    assert all(0.0 <= float(acc) <= 1.0 for _, acc in alphas)
    ranks = re.findall(r"planted client [-+.\d]+, rank (\d+) of 20", text)
    assert len(ranks) == 2 and all(1 <= int(r) <= 20 for r in ranks), text
    (gap,) = _numbers(r"sum of Shapley values - \(U\(all\) - U\(empty\)\) = {N}", text)
    assert abs(gap) < 1e-9  # the permutation estimator is exactly efficient
    assert _num_images(nb) >= 1  # the error-band plot


CHECKS = {"01_quickstart": _check_01, "02_custom_algorithm": _check_02, "03_sweeps": _check_03,
          "04_stateful_algorithm": _check_04,
          "05_compiled_simulator": _check_05}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = _execute(name, tmp_path, monkeypatch)
    CHECKS[name](nb, _text_outputs(nb))


def test_notebooks_are_clean_and_generated():
    make = _load_make()
    assert sorted(make.NOTEBOOKS) == NAMES
    for name in NAMES:
        committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(committed)
        for cell in committed.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.id)
        built = make.build(name)
        assert [(c.cell_type, c.source) for c in committed.cells] == [
            (c.cell_type, c.source) for c in built.cells
        ], f"{name}.ipynb is out of date: run `python notebooks/_make.py`"
        first_code = next(c.source for c in committed.cells if c.cell_type == "code")
        assert "import fedjax_lab" in first_code
        assert f"git+{make.REPO_URL}" in first_code
        assert any("FEDJAX_LAB_SMOKE" in c.source for c in committed.cells)

