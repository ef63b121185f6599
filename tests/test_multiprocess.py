"""The same experiment across two processes (jax.distributed, CPU Gloo) equals one process.

Runs ``experiments/multihost/run.py`` (through ``tests/_multiprocess_worker.py``) three times
at once: two processes of one CPU device each, joined by ``fl.distributed.initialize`` on a
free localhost port, and one process of two forced host devices. ``fl.maps.sharded()`` splits
each round's 5 clients over the 2 devices (2 + 2, and 1 outside the mesh), across processes in
the first case. FedAvg of a linear model on a small synthetic population, 4 rounds in two
``run_rounds`` calls (the second continues from the replicated state). The final params, every
round's loss and the test accuracy must be bit-identical on every process and equal to the
single process's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
RUN_ARGS = [
    "--dataset", "synthetic", "--num-clients", "20", "--hidden", "--rounds", "4",
    "--rounds-per-call", "2", "--cohort-size", "5", "--batch-size", "10", "--seed", "3",
]  # fmt: skip
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(host_devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if host_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={host_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _launch(tmp_path: Path, name: str, extra: list[str], host_devices: int):
    out = tmp_path / f"{name}.json"
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *RUN_ARGS, *extra],
        env=_env(host_devices), stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return name, proc, out, log


def _finish(tmp_path: Path, runs) -> dict[str, dict]:
    """Waits for every run (killing all on timeout); fails with the logs of those that failed."""
    deadline = time.monotonic() + TIMEOUT_S
    failed = []
    for name, proc, _, log in runs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, other, _, _ in runs:
                if other.poll() is None:
                    other.kill()
            proc.wait()
            failed.append(f"{name}: timed out after {TIMEOUT_S} s")
        log.close()
        if proc.returncode != 0 and not failed:
            failed.append(f"{name}: exit code {proc.returncode}")
    if failed:
        logs = "\n".join(
            f"----- {name} -----\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
            for name, *_ in runs
        )
        pytest.fail("; ".join(failed) + "\n" + logs)
    return {name: json.loads(out.read_text()) for name, _, out, _ in runs}


def test_two_processes_equal_one_process_of_two_devices(tmp_path):
    port = _free_port()
    multi = [f"--coordinator=localhost:{port}", "--num-processes=2"]
    runs = [
        _launch(tmp_path, "process0", [*multi, "--process-id=0"], host_devices=1),
        _launch(tmp_path, "process1", [*multi, "--process-id=1"], host_devices=1),
        _launch(tmp_path, "single", [], host_devices=2),
    ]
    out = _finish(tmp_path, runs)
    single = out["single"]
    assert (single["process_count"], single["device_count"]) == (1, 2)
    assert single["mismatch_detected"] is False  # one process: nothing to compare
    for i in (0, 1):
        got = out[f"process{i}"]
        assert got["process_index"] == i
        assert (got["process_count"], got["device_count"], got["local_device_count"]) == (2, 2, 1)
        # The state lives on both processes' devices: the rounds really ran across processes
        # (a mesh of local devices only would have run each process alone, on one device).
        assert got["devices_holding_params"] == 2
        assert got["client_map"] == single["client_map"]
        assert "processes [1] hold different values" in got["mismatch_detected"]
        # A client map's sums and per-client (stacked) outputs come back whole on each process.
        assert got["map_outputs"] == single["map_outputs"] == [20.0, [0.0, 1.0, 4.0, 9.0, 16.0]]
        assert got["rounds"] == single["rounds"] == 4
        # Bit-identical: same per-device programs, and a psum of two values is order-free.
        assert got["params"] == single["params"], f"process {i}: params differ"
        assert got["train_loss"] == single["train_loss"], f"process {i}: losses differ"
        assert got["test_accuracy"] == single["test_accuracy"]


def test_initialize_rejects_bad_arguments_before_connecting():
    from fedjax_lab import distributed

    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.initialize("localhost", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("localhost:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.initialize("localhost:1234", num_processes=0, process_id=0)
