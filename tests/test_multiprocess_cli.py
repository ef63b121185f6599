"""``fedjax-lab run`` across two processes (jax.distributed, CPU Gloo): killed, resumed, exact.

Two local processes of one CPU device each run a tiny config (8 rounds, a checkpoint every 2)
with ``client_map = "sharded"``: each round's clients are split over both processes' devices.
Process 0 alone writes (metrics, checkpoints, summary, plots) into the shared ``--out``; both
are SIGKILLed once a checkpoint exists and relaunched with ``--resume``: both read process 0's
checkpoint and continue from the same round. The final ``params_sha256`` must equal the
uninterrupted two-process run's, and that of ONE process of two host devices (the same
per-device programs; a psum of two values is order-free). One process of ONE device is not
compared: summing the cohort on one device rounds differently from two partial sums.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_lab import checkpoint as ckpt
from fedjax_lab import cli

CONFIG = """
name = "two processes"
[data]
name = "digits"
num_clients = 20
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = [16]
[training]
rounds = 8
cohort_size = 4
batch_size = 10
client_map = "sharded"
[evaluation]
every = 2
[checkpoint]
every = 2
keep = 4
[[algorithms]]
name = "fedavg"
client_learning_rate = 0.1
"""
TIMEOUT_S = 240
OUTPUTS = {"summary.json", "accuracy.png", "train_loss.png", "client_accuracy.png", "fedavg"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # --devices decides
    for name in ("FEDJAX_LAB_COORDINATOR", "FEDJAX_LAB_NUM_PROCESSES", "FEDJAX_LAB_PROCESS_ID"):
        env.pop(name, None)
    return env


def _launch(tmp_path: Path, name: str, args: list[str]) -> tuple[str, subprocess.Popen]:
    log = open(tmp_path / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "fedjax_lab.cli", "run", str(tmp_path / "cfg.toml"), *args,
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc._log = log  # closed by _wait
    return name, proc


def _two(tmp_path: Path, name: str, out: Path, extra: list[str] = ()) -> list:
    port = _free_port()
    return [
        _launch(tmp_path, f"{name}{i}", ["--out", str(out), "--devices", "1",
                                         f"--coordinator=localhost:{port}",
                                         "--num-processes=2", f"--process-id={i}", *extra])
        for i in (0, 1)
    ]  # fmt: skip


def _wait(tmp_path: Path, runs: list) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    failed = []
    for name, proc in runs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, other in runs:
                other.kill()
            proc.wait()
            failed.append(f"{name}: timed out")
        proc._log.close()
        if proc.returncode != 0:
            failed.append(f"{name}: exit code {proc.returncode}")
    if failed:
        logs = "\n".join(f"----- {n} -----\n{(tmp_path / f'{n}.log').read_text()[-3000:]}"
                         for n, _ in runs)  # fmt: skip
        pytest.fail("; ".join(failed) + "\n" + logs)


def _sha(out: Path) -> str:
    return json.loads((out / "summary.json").read_text())["runs"]["fedavg"]["params_sha256"]


def test_two_processes_killed_and_resumed_equal_uninterrupted_runs(tmp_path):
    (tmp_path / "cfg.toml").write_text(CONFIG)
    whole, single, killed = tmp_path / "whole", tmp_path / "single", tmp_path / "killed"
    reference = _two(tmp_path, "whole", whole)
    reference.append(_launch(tmp_path, "single", ["--out", str(single), "--devices", "2"]))
    victims = _two(tmp_path, "killed", killed)
    ckpts = killed / "fedavg" / "checkpoints"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and all(p.poll() is None for _, p in victims):
        if ckpts.is_dir() and ckpt.complete_steps(ckpts):
            break
        time.sleep(0.02)
    alive = all(p.poll() is None for _, p in victims)
    for _, proc in victims:
        proc.send_signal(signal.SIGKILL)
    for _, proc in victims:
        proc.wait()
        proc._log.close()
    assert alive, "the run ended before a checkpoint was written and it could be killed"
    step = ckpt.latest_step(ckpts)
    assert step is not None and step < 8, f"killed after the last checkpoint (step {step})"

    resumed = _two(tmp_path, "resumed", killed, ["--resume"])
    _wait(tmp_path, reference + resumed)

    # Every process resumed from the same round: the checkpoint process 0 wrote.
    said = [(tmp_path / f"resumed{i}.log").read_text() for i in (0, 1)]
    rounds = [sorted(set(_resumed_from(text))) for text in said]
    assert rounds[0] == rounds[1] and len(rounds[0]) == 1, rounds
    assert 2 <= rounds[0][0] < 8
    # Process 0 wrote the results; process 1 printed and wrote nothing of its own.
    for out in (whole, killed):
        assert {p.name for p in out.iterdir()} == OUTPUTS
    assert "test acc" in (tmp_path / "whole0.log").read_text()
    assert "test acc" not in (tmp_path / "whole1.log").read_text()
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["runs"]["fedavg"]["execution"]["devices"] == 2
    rows = [json.loads(x) for x in (killed / "fedavg" / "metrics.jsonl").read_text().split("\n")
            if x]  # fmt: skip
    assert [r["round"] for r in rows] == list(range(1, 9))

    sha = _sha(whole)
    print("params_sha256 two processes:", sha, "one process x 2 devices:", _sha(single))
    assert _sha(killed) == sha, "killed and resumed differs from the uninterrupted 2-process run"
    assert _sha(single) == sha, "2 processes x 1 device differ from 1 process x 2 devices"


def _resumed_from(text: str) -> list[int]:
    import re

    return [int(m) for m in re.findall(r"resuming from round (\d+)", text)]


@pytest.mark.parametrize(
    "args, env, match",
    [
        (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], {},
         "--process-id: must be in 0 .. --num-processes - 1 = 1, got 2"),
        (["--coordinator", "localhost:1234", "--num-processes", "2"], {},
         "--process-id: needed with --coordinator, --num-processes"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], {},
         "--coordinator: expected HOST:PORT"),
        (["--coordinator", "localhost:1234", "--num-processes", "0", "--process-id", "0"], {},
         "--num-processes: need a whole number >= 1"),
        (["--coordinator", "localhost:1234", "--num-processes", "2"],
         {"FEDJAX_LAB_PROCESS_ID": "one"}, "--process-id: \\$FEDJAX_LAB_PROCESS_ID = 'one'"),
    ],
)  # fmt: skip
def test_bad_process_flags_are_refused_before_jax_starts(tmp_path, capsys, monkeypatch, args,
                                                         env, match):  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert cli.main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "fedjax-lab: error:" in err
    assert __import__("re").search(match, err), err
    assert not out.exists()  # refused before anything was written


def test_process_flags_from_the_environment():
    env = {"FEDJAX_LAB_COORDINATOR": "10.0.0.1:999", "FEDJAX_LAB_NUM_PROCESSES": "4",
           "FEDJAX_LAB_PROCESS_ID": "3"}  # fmt: skip
    assert cli._processes(None, None, None, env) == ("10.0.0.1:999", 4, 3)
    assert cli._processes(None, None, 0, env) == ("10.0.0.1:999", 4, 0)  # a flag wins
    assert cli._processes(None, None, None, {}) is None
