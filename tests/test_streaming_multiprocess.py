"""Host-streamed data across two processes (jax.distributed, CPU Gloo): each loads its share.

``run_rounds(..., data_on="host")`` with :func:`fedjax_lab.maps.sharded` over the devices of
two processes (one CPU device each), the population a memory map: every round each process
gathers on the host only the rows of the cohort clients its own device trains, plus the
clients past the mesh (``C % D``, run replicated, loaded by both). The ids each process
gathered (``_streaming.loaded_clients``) must partition the sharded part of every cohort, and
the final params must be bit-identical to ONE process of two host devices with the examples
on the device (the same per-device programs; one device would round the cohort sum
differently). The launch helpers are those of ``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _problems import population
from test_multiprocess import _env, _finish, _free_port

import fedjax_lab as fl
from fedjax_lab import _streaming

SIZES = (3, 5, 4, 7, 2, 6, 5, 4, 3, 8, 6, 2)
COHORT = 5  # over 2 devices: positions 0-1 on device 0, 2-3 on device 1, 4 outside the mesh

WORKER = textwrap.dedent(
    """
    import json, sys
    out, memmap, tests = sys.argv[1], sys.argv[2], sys.argv[3]
    multi = sys.argv[4:]
    sys.path.insert(0, tests)
    from fedjax_lab import distributed
    if multi:
        distributed.initialize(multi[0], num_processes=2, process_id=int(multi[1]))
    import jax, numpy as np, optax
    from _problems import init_params, loss_fn
    import fedjax_lab as fl
    from fedjax_lab import _streaming
    from fedjax_lab import checkpoint as ckpt
    data = fl.data.load_memmap(memmap)
    distributed.check_same_everywhere(data, name="train_data")
    alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3))
    res = {"process": jax.process_index(), "processes": jax.process_count(),
           "devices": jax.device_count()}
    for where in ("host",) if multi else ("host", "device"):
        state, hist = fl.run_rounds(
            alg, distributed.replicate(alg.init(init_params())), data, jax.random.key(7),
            num_rounds=3, cohort_size=COHORT, batch_size=3, client_map=fl.maps.sharded(),
            data_on=where)
        res[where] = {"sha": ckpt.params_sha256(state.params),
                      "loss": np.asarray(hist["train_loss"]).tolist(),
                      "ids": np.asarray(hist["client_ids"]).tolist()}
        if where == "host":
            res["loaded"] = [x.tolist() for x in _streaming.loaded_clients]
    with open(out, "w") as f:
        json.dump(res, f)
    """
).replace("COHORT", str(COHORT))


def _launch(tmp_path: Path, name: str, args: list[str], host_devices: int):
    out, log = tmp_path / f"{name}.json", open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py"), str(out), str(tmp_path / "pop"),
         str(Path(__file__).parent), *args],
        env=_env(host_devices), stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return name, proc, out, log


def test_two_processes_load_only_their_clients_and_equal_device_data(tmp_path):
    fl.data.save_memmap(population(sizes=SIZES), tmp_path / "pop")
    (tmp_path / "worker.py").write_text(WORKER)
    address = f"localhost:{_free_port()}"
    out = _finish(tmp_path, [
        _launch(tmp_path, "process0", [address, "0"], host_devices=1),
        _launch(tmp_path, "process1", [address, "1"], host_devices=1),
        _launch(tmp_path, "single", [], host_devices=2),
    ])  # fmt: skip
    single, p0, p1 = out["single"], out["process0"], out["process1"]
    assert (single["processes"], single["devices"]) == (1, 2)
    assert [(p["process"], p["processes"], p["devices"]) for p in (p0, p1)] == [(0, 2, 2),
                                                                              (1, 2, 2)]
    # One process loads every client of the cohort; the streamed run equals device data.
    assert single["loaded"] == single["host"]["ids"]
    assert single["host"] == single["device"]
    ids = np.asarray(single["device"]["ids"])
    for p in (p0, p1):  # the same cohorts on every process (shared keys)
        assert p["host"]["ids"] == single["device"]["ids"]
    # Each process gathered its device's block of the head and the client past the mesh.
    for r in range(ids.shape[0]):
        assert p0["loaded"][r] == [*ids[r, 0:2], ids[r, 4]]
        assert p1["loaded"][r] == [*ids[r, 2:4], ids[r, 4]]
        heads = [set(p["loaded"][r][:2]) for p in (p0, p1)]
        assert not heads[0] & heads[1] and heads[0] | heads[1] == set(ids[r, :4])
    print("params_sha256 2 processes (host data):", p0["host"]["sha"],
          "1 process x 2 devices (device data):", single["device"]["sha"])
    assert p0["host"] == p1["host"] == single["device"], "streamed over 2 processes differs"


def test_process_positions_partition_the_head_on_a_fake_two_process_mesh():
    for owners in ([0, 0, 1, 1], [0, 1, 0, 1], [1, 0], [0, 0, 0, 1]):
        d = len(owners)
        for cohort in (d, 2 * d, 2 * d + 1, 3 * d + d - 1):
            head = (cohort // d) * d
            got = [_streaming.process_positions(owners, head, cohort, p) for p in (0, 1)]
            tail = list(range(head, cohort))
            heads = [g[g < head] for g in got]
            assert all(g[g >= head].tolist() == tail for g in got)  # every process: the tail
            assert sorted(np.concatenate(heads).tolist()) == list(range(head))  # a partition
            assert not set(heads[0].tolist()) & set(heads[1].tolist())
            block = head // d
            for p, h in zip((0, 1), heads, strict=True):  # exactly its devices' blocks
                mine = [i for i in range(head) if owners[i // block] == p]
                assert h.tolist() == mine
    with pytest.raises(ValueError, match="cannot be split evenly"):
        _streaming.process_positions([0, 1], 3, 4, 0)


def test_rows_placed_from_positions_equal_rows_placed_whole():
    """One process: the gather of the positions a process would own, re-assembled, is exact."""
    data = population(sizes=SIZES)
    ids = np.array([3, 0, 9, 11, 5])
    whole = _streaming.cohort_rows(data.examples, data.offsets, ids, 8)
    for owners, p in (([0, 1], 0), ([0, 1], 1), ([1, 0], 0)):
        pos = _streaming.process_positions(owners, 4, 5, p)
        part = _streaming.cohort_rows(data.examples, data.offsets, ids[pos], 8)
        for k in whole:
            np.testing.assert_array_equal(part[k], whole[k][pos])
    placement = (5, None, None)
    assert _streaming.local_positions(placement, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="single process places every row"):
        _streaming.place_rows(whole, placement, positions=np.array([0, 1]))


CLI_CONFIG = """
name = "two processes, host data"
[data]
name = "digits"
num_clients = 20
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = [16]
[training]
rounds = 2
cohort_size = 5
batch_size = 10
client_map = "sharded"
data_on = "{data_on}"
[evaluation]
every = 2
[checkpoint]
every = 2
keep = 2
[[algorithms]]
name = "fedavg"
client_learning_rate = 0.1
"""


def test_cli_two_processes_with_host_data_equal_one_process_with_device_data(tmp_path):
    from test_multiprocess_cli import _launch as launch_cli
    from test_multiprocess_cli import _sha, _two, _wait

    host, device = tmp_path / "host", tmp_path / "device"
    for d, where in ((host, "host"), (device, "device")):
        d.mkdir()
        (d / "cfg.toml").write_text(CLI_CONFIG.format(data_on=where))
    streamed = _two(host, "run", host / "out")
    single = [launch_cli(device, "single", ["--out", str(device / "out"), "--devices", "2"])]
    _wait(host, streamed)
    _wait(device, single)
    summary = json.loads((host / "out" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["runs"]["fedavg"]["execution"]["devices"] == 2
    print("params_sha256 CLI 2 processes (data_on=host):", _sha(host / "out"),
          "1 process x 2 devices (data_on=device):", _sha(device / "out"))
    assert _sha(host / "out") == _sha(device / "out")


def test_data_on_config_is_checked():
    from fedjax_lab import experiment

    assert experiment.validate({"training": {"data_on": "host"}})["training"]["data_on"] == "host"
    with pytest.raises(experiment.ConfigError, match="training.data_on: got 'disk'"):
        experiment.validate({"training": {"data_on": "disk"}})
    with pytest.raises(experiment.ConfigError, match="seeds = 2 runs"):
        experiment.validate({"training": {"data_on": "host", "seeds": 2}})
    assert "data_on: str = 'device'; allowed: 'device', 'host'" in experiment.reference()
