"""The new-methods table: its configs are one fair comparison, and the script runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fedjax_lab import experiment as exp_lib

ROOT = Path(__file__).resolve().parents[1] / "experiments" / "new_methods"


def _script():
    spec = importlib.util.spec_from_file_location("new_methods_table", ROOT / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_validates_and_each_task_shares_its_setup():
    table = _script()
    files = sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))
    assert set(files) <= set(table.ROWS), "a config the table does not list"
    shared: dict[str, dict] = {}
    for name in files:
        cfg = exp_lib.validate(exp_lib.load_config(ROOT / "configs" / f"{name}.toml"))
        assert [a.get("label", a["name"]) for a in cfg["algorithms"]] == [name]
        model = {k: v for k, v in cfg["model"].items() if k != "batch_norm"}
        setup = {"data": cfg["data"], "model": model,
                 "training": {k: v for k, v in cfg["training"].items() if k != "weighting"},
                 "evaluation": cfg["evaluation"]}
        first = shared.setdefault(table.ROWS[name], setup)
        assert setup == first, f"{name}: not the setup of the other {table.ROWS[name]} rows"
    assert shared["digits"]["data"]["alpha"] == 0.1


def test_script_runs_a_row_and_reads_its_summary(tmp_path):
    out = tmp_path / "results.json"
    result = _script().main(["--smoke", "--only", "fedbn", "--out", str(out),
                             "--runs", str(tmp_path / "runs")])
    (row,) = result["rows"]
    summary = json.loads((tmp_path / "runs" / "fedbn" / "summary.json").read_text())["runs"]
    assert row["test_accuracy"] == summary["fedbn"]["test_accuracy"]
    assert row["personalized_accuracy_mean"] == summary["fedbn"]["personalized_accuracy_mean"]
    assert 0.0 <= row["fine_tuned_accuracy_mean"] <= 1.0 and row["rounds"] == 2
    assert json.loads(out.read_text())["rows"] == result["rows"]
