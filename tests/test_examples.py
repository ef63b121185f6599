"""The example configs per dataset run (short versions; the command line runs the long ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedjax_lab import cli
from fedjax_lab import experiment as exp_lib

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_every_config_validates_and_names_a_registered_algorithm():
    paths = sorted(CONFIGS.glob("*.toml"))
    assert len(paths) >= 8
    for path in paths:
        cfg = exp_lib.load_config(path)
        assert cfg["algorithms"], path


@pytest.mark.parametrize("name", ["mnist_cnn_fedavg", "shakespeare_lstm_fedadam"])
def test_dataset_example_runs_short(name, tmp_path):
    cfg = exp_lib.load_config(CONFIGS / f"{name}.toml")
    cfg["training"].update(rounds=2, cohort_size=2)
    cfg["training"]["local_steps"] = 2
    cfg["evaluation"]["every"] = 2
    cfg["checkpoint"]["every"] = 2
    if name.startswith("shakespeare"):  # the 24 largest roles: 1,907 test windows, not 11,258
        cfg["data"]["min_lines"] = 600
    summary = cli.run_experiment(cfg, tmp_path, progress=False)
    (label, run), = summary["runs"].items()
    assert run["rounds"] == 2 and 0.0 <= run["test_accuracy"] <= 1.0
    rows = (tmp_path / label / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["num_examples"] > 0
