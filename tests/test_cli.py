"""fedjax-lab: configs fail early, runs write their files, a killed run resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_lab import cli
from fedjax_lab import experiment as exp_lib

TINY = """
name = "tiny"
[data]
name = "digits"
num_clients = 20
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = [16]
[training]
rounds = {rounds}
cohort_size = 4
batch_size = 10
client_map = "sequential"
[evaluation]
every = 2
[checkpoint]
every = 2
keep = 2
[[algorithms]]
name = "fedadam"
client_learning_rate = 0.1
server_learning_rate = 0.03
"""


def _write(tmp_path: Path, rounds: int, extra: str = "") -> Path:
    path = tmp_path / f"tiny_{rounds}.toml"
    path.write_text(TINY.format(rounds=rounds) + extra)
    return path


@pytest.mark.parametrize(
    "config, match",
    [
        ({"trainng": {}}, "trainng: unknown section"),
        ({"training": {"rounds": 0}}, "training.rounds: must be >= 1"),
        ({"training": {"cohort_size": "ten"}}, "training.cohort_size: expected int"),
        ({"training": {"client_map": "gpu"}}, "training.client_map: got 'gpu'; allowed: 'auto'"),
        ({"data": {"name": "cifar"}}, "data.name: got 'cifar'; allowed: 'digits'"),
        ({"data": {"name": "digits", "alhpa": 1.0}}, "data.alhpa: not an option of dataset"),
        ({"data": {"partition": "random"}}, "data.partition: got 'random'"),
        ({"model": {"name": "mlp", "hiden": [3]}}, "model.hiden: not an option of model 'mlp'"),
        ({"algorithms": [{"name": "fedsomething"}]}, "algorithms\\[0\\].name: got 'fedsomething'"),
        ({"algorithms": [{"name": "fedavg", "client_learning_rate": -1.0}]},
         "algorithms\\[0\\].client_learning_rate: must be > 0"),
        ({"algorithms": [{"name": "fedavg", "client_optimizer": "lamb"}]},
         "client_optimizer: got 'lamb'"),
        ({"checkpoint": {"every": 3}, "evaluation": {"every": 2}},
         "checkpoint.every: must be a multiple of evaluation.every"),
        ({"data": {"name": "tff_h5", "train_path": "a.h5"}}, "data.task: required"),
    ],
)
def test_invalid_configs_name_the_key(config, match):
    with pytest.raises(exp_lib.ConfigError, match=match):
        exp_lib.validate(config)


def test_bad_hyper_parameter_is_caught_before_compiling(tmp_path, capsys):
    path = _write(tmp_path, 2, "").read_text().replace(
        "server_learning_rate = 0.03", "server_learning_rate = -0.03"
    )
    cfg_path = tmp_path / "bad.toml"
    cfg_path.write_text(path)
    start = time.perf_counter()
    code = cli.main(["run", str(cfg_path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err
    assert time.perf_counter() - start < 20  # data loading only, no XLA compile
    assert not (tmp_path / "out" / "fedadam" / "metrics.jsonl").exists()
    assert cli.main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fedjax_lab.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_run_writes_metrics_summary_and_plots_and_refuses_to_overwrite(tmp_path):
    cfg = _write(tmp_path, 4)
    out = tmp_path / "run"
    res = _run(["run", str(cfg), "--out", str(out), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fedadam" in res.stdout and "test acc" in res.stdout
    lines = (out / "fedadam" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all("test_accuracy" in r for r in rows if r["round"] % 2 == 0)
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["fedadam"]
    assert len(run["params_sha256"]) == 64 and run["rounds"] == 4
    assert 0.0 <= run["test_accuracy"] <= 1.0
    assert summary["environment"]["jax"] and summary["config"]["training"]["rounds"] == 4
    for png in ("accuracy.png", "train_loss.png", "client_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _run(["run", str(cfg), "--out", str(out), "--no-progress"])
    assert again.returncode == 2 and "--resume" in again.stderr


def test_killed_run_resumes_to_the_same_params(tmp_path):
    """SIGKILL mid-run, --resume, and the final params hash equals an uninterrupted run's."""
    rounds = 12
    cfg = _write(tmp_path, rounds)
    ref = tmp_path / "ref"
    res = _run(["run", str(cfg), "--out", str(ref), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    want = json.loads((ref / "summary.json").read_text())["runs"]["fedadam"]["params_sha256"]

    out = tmp_path / "killed"
    ckpts = out / "fedadam" / "checkpoints"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedjax_lab.cli", "run", str(cfg), "--out", str(out),
         "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.time() + 180
    from fedjax_lab import checkpoint as ckpt

    while time.time() < deadline and proc.poll() is None:
        step = ckpt.latest_step(ckpts) if ckpts.exists() else None
        if step is not None and step >= 4:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed; make it longer"
    step = ckpt.latest_step(ckpts)
    assert step is not None and step < rounds

    res = _run(["run", str(cfg), "--out", str(out), "--resume", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())["runs"]["fedadam"]["params_sha256"]
    assert got == want
    lines = (out / "fedadam" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))


def test_sweep_command_writes_csv_and_heatmap(tmp_path):
    cfg = _write(tmp_path, 3, """
[sweep]
algorithm = "fedadam"
client_learning_rate = [0.05, 0.1]
server_learning_rate = [0.01, 0.03]
seeds = [0, 1]
""")
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(cfg), "--out", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {float(r["client_learning_rate"]) for r in rows} == {0.05, 0.1}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
