"""Fault injection: one poisoned client per registered algorithm, and SIGKILLs during a run.

Every algorithm of ``fl.algorithms.REGISTRY`` runs 8 rounds over a population of 10 clients
(all of them each round) in which client 0 sends a NaN update in round 0, an inf update in
round 2 and an update scaled by 1e25 in round 4 (one compile per algorithm). The guarded server
step must keep every leaf of the server state finite, drop the non-finite clients (the round
still applies the others), refuse the finite blow-up with ``max_update_norm`` and keep learning.
A second test kills a CLI run with SIGKILL at 8 random points; resumed each time, it ends with
the uninterrupted run's ``params_sha256``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import init_params, loss_fn, population

import fedjax_lab as fl

DATA = population()
REQUIRED = {"feddisco": {"num_classes": 3}, "qffl": {"lipschitz": 10.0}}
FAULTS = {0: jnp.nan, 2: jnp.inf, 4: 1e25}  # round -> what client 0's update is multiplied by
ROUNDS = 8
MAX_UPDATE_NORM = 1e4


def _fault_script():
    path = Path(__file__).resolve().parents[1] / "experiments" / "faults" / "table.py"
    spec = importlib.util.spec_from_file_location("faults_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The poisoning of experiments/faults/table.py: client 0 x FAULTS[round] in those rounds.
_TABLE = _fault_script()
poisoned = _TABLE.poisoned
assert _TABLE.FAULTS == FAULTS  # the table and these tests inject the same faults


def population_loss(params) -> float:
    batch = {k: jnp.asarray(v) for k, v in DATA.examples.items()}
    batch["mask"] = jnp.ones(len(batch["y"]), jnp.float32)
    return float(loss_fn(params, batch, None))


def fault_run(name: str) -> dict:
    """Runs the poisoned algorithm ``name``; returns what the checks and the table need."""
    factory = fl.algorithms.REGISTRY[name]
    alg = poisoned(factory(loss_fn, client_optimizer=optax.sgd(0.1), **REQUIRED.get(name, {})))
    state = alg.init(init_params(), num_clients=DATA.num_clients)
    state, hist = fl.run_rounds(alg, state, DATA, jax.random.key(3), num_rounds=ROUNDS,
                                cohort_size=DATA.num_clients, batch_size=2, local_steps=2,
                                client_map=fl.maps.sequential(),
                                max_update_norm=MAX_UPDATE_NORM)
    hist = jax.device_get(hist)
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return {
        "finite": all(bool(np.all(np.isfinite(x))) for x in leaves),
        "dropped": hist["dropped_clients"].tolist(),
        "skipped": hist["round_skipped"].tolist(),
        "norm_skipped": hist["skipped_update_norm"].tolist(),
        "update_norm": hist["update_norm"].tolist(),
        "loss_before": population_loss(init_params()),
        "loss_after": population_loss(state.params),
    }


@pytest.mark.parametrize("name", sorted(fl.algorithms.REGISTRY))
def test_one_poisoned_client_leaves_the_state_finite_and_training_going(name):
    r = fault_run(name)
    assert r["finite"], name
    for t in (0, 2):  # NaN and inf: client 0 dropped, the other nine applied
        assert r["dropped"][t] == 1.0 and r["skipped"][t] == 0.0, (name, t, r)
    # 1e25: dropped when the update overflows, refused by max_update_norm, or absorbed by the
    # aggregation itself (DP clipping, a robust rule): whatever was applied stays bounded.
    assert r["dropped"][4] == 1.0 or r["norm_skipped"][4] == 1.0 or (
        r["update_norm"][4] <= MAX_UPDATE_NORM), (name, r)
    assert sum(r["skipped"]) <= 1.0, (name, r)  # only the blown-up round, if any
    assert np.isfinite(r["loss_after"]) and r["loss_after"] < r["loss_before"], (name, r)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "scaffold", "feddyn"])
def test_finite_blow_up_never_freezes_the_server_state(name):
    """The report: one client x1e25 in round 0 set FedAdam's v to inf for good.

    Without ``max_update_norm`` the guard refuses the round whose new state is not finite (or,
    for the others, the state stays finite), so later rounds move every coordinate an
    unpoisoned run moves.
    """
    factory = fl.algorithms.REGISTRY[name]
    make = lambda: factory(loss_fn, client_optimizer=optax.sgd(0.1))  # noqa: E731

    def run(alg, rounds):
        state = alg.init(init_params(), num_clients=DATA.num_clients)
        return fl.run_rounds(alg, state, DATA, jax.random.key(3), num_rounds=rounds,
                             cohort_size=DATA.num_clients, batch_size=2, local_steps=2,
                             client_map=fl.maps.sequential())

    def only_round0(alg):
        def client_update(state, client, key):
            out = alg.client_update(state, client, key)
            f = jnp.where((client.client_id == 0) & (state.round == 0), 1e25, 1.0)
            return out._replace(update=jax.tree.map(lambda u: u * f, out.update))

        return alg._replace(client_update=client_update)

    bad = only_round0(make())
    s1, _ = run(bad, 1)
    s10, hist = run(bad, 10)
    for x in jax.tree.leaves(s10):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(x))), name
    moved = [np.asarray(a) != np.asarray(b)
             for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s10.params),
                             strict=True)]
    clean1, _ = run(make(), 1)
    clean10, _ = run(make(), 10)
    moved_clean = [np.asarray(a) != np.asarray(b)
                   for a, b in zip(jax.tree.leaves(clean1.params),
                                   jax.tree.leaves(clean10.params), strict=True)]
    assert sum(int(m.sum()) for m in moved) == sum(int(m.sum()) for m in moved_clean), name
    if name in ("fedadam", "fedyogi"):  # v would have become inf: the round was refused
        assert float(hist["skipped_non_finite_server_state"][0]) == 1.0
        assert float(hist["round_skipped"][1:].sum()) == 0.0


KILL_CONFIG = """
[data]
name = "digits"
num_clients = 20
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = [16]
[training]
rounds = 60
cohort_size = 5
batch_size = 10
client_map = "sequential"
[evaluation]
every = 2
[checkpoint]
every = 2
keep = 2
[[algorithms]]
name = "fedadam"
server_learning_rate = 0.03
"""


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "fedjax_lab.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _sha(out) -> str:
    summary = json.loads((out / "summary.json").read_text())
    return summary["runs"]["fedadam"]["params_sha256"]


def test_eight_sigkills_resume_to_the_uninterrupted_result(tmp_path):
    cfg = tmp_path / "kill.toml"
    cfg.write_text(KILL_CONFIG)
    ref = tmp_path / "ref"
    assert _cli(["run", str(cfg), "--out", str(ref), "--no-progress"]).wait(600) == 0
    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = 0
    for _attempt in range(30):
        args = ["run", str(cfg), "--out", str(out), "--no-progress"]
        if (out / "fedadam").exists():
            args.append("--resume")
        proc = _cli(args)
        if kills < 8:
            time.sleep(float(rng.uniform(4.0, 12.0)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(60)
                kills += 1
                continue
        rc = proc.wait(600)
        assert rc == 0, proc.stderr.read()[-2000:]
        if (out / "summary.json").exists() and kills >= 8:
            break
    assert kills == 8
    assert _sha(out) == _sha(ref)


@pytest.mark.parametrize("kwargs, message", [
    ({"cohort_size": True}, "cohort_size: expected a whole number >= 1, got the bool True"),
    ({"local_steps": True}, "local_steps: expected a whole number >= 1, got the bool True"),
    ({"num_rounds": 2.0}, "num_rounds: expected a whole number >= 1, got 2.0"),
    ({"max_update_norm": 0.0}, "max_update_norm: need a finite number > 0"),
    ({"max_update_norm": float("inf")}, "max_update_norm: need a finite number > 0"),
])
def test_counts_and_guards_are_checked_before_anything_runs(kwargs, message):
    alg = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    run = {**dict(num_rounds=1, cohort_size=2, batch_size=2), **kwargs}
    with pytest.raises(ValueError) as e:
        fl.run_rounds(alg, alg.init(init_params()), DATA, jax.random.key(0), **run)
    assert message in str(e.value)


@pytest.mark.parametrize("optimizer, message", [
    (optax.sgd(-0.1), "it ascends the loss"),
    (optax.adam(-1e-3), "it ascends the loss"),
    (optax.sgd(float("nan")), "not finite"),
    (optax.chain(optax.clip(1.0), optax.sgd(float("inf"))), "not finite"),
])
def test_a_client_optimiser_that_ascends_or_is_not_finite_is_refused(optimizer, message):
    for name in ("fedavg", "scaffold", "ditto", "mime"):
        with pytest.raises(ValueError, match=f"client_optimizer: .*{message}"):
            fl.algorithms.REGISTRY[name](loss_fn, optimizer)
    fl.algorithms.fed_avg(loss_fn, optax.sgd(0.0))  # a zero rate is legal (warm-up from 0)
