"""No waste: round 2+ never compiles again, and a donated state is reused in place."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from _problems import (
    assert_trees_equal,
    cohort,
    init_params,
    loss_fn,
    population,
    run_on_host_devices,
)

import fedjax_lab as fl

DATA = population()  # 10 clients
KEY = jax.random.key(11)
SEQ = fl.maps.sequential()
ALG = fl.algorithms.REGISTRY["scaffold"](loss_fn)  # per-client state: the hardest case
RUN = dict(num_rounds=3, cohort_size=4, batch_size=3, client_map=SEQ)

_COMPILES: list[list[str]] = []


def _on_event(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration" and _COMPILES:
        _COMPILES[-1].append(kw.get("fun_name", "?"))


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def compiles():
    """Collects the names of the XLA programs compiled inside the block."""
    _COMPILES.append([])
    try:
        yield _COMPILES[-1]
    finally:
        _COMPILES.pop()


def _state():
    return ALG.init(init_params(), num_clients=DATA.num_clients)


def test_run_round_compiles_once():
    state = _state()
    with compiles() as first:
        state, _ = fl.run_round(ALG, state, cohort(seed=1), KEY, client_map=SEQ)
    assert first.count("jit(_run_round_jit)") == 1, first
    with compiles() as later:
        for seed in (2, 3):
            state, _ = fl.run_round(ALG, state, cohort(seed=seed), KEY, client_map=SEQ)
        jax.block_until_ready(state)
    assert later == []


def test_run_rounds_second_call_compiles_nothing():
    for where in ("device", "host"):
        with compiles() as first:
            state, _ = fl.run_rounds(ALG, _state(), DATA, KEY, client_states_on=where, **RUN)
        program = "jit(scan_rounds)" if where == "device" else "jit(_host_round_impl)"
        # Host storage: one program for all 3 rounds (numpy rows, device rows alike).
        assert first.count(program) == 1, (where, first)
        with compiles() as later:
            state, hist = fl.run_rounds(ALG, state, DATA, KEY, client_states_on=where, **RUN)
            jax.block_until_ready((state, hist))
        assert later == [], where
        assert int(state.round) == 6


def test_donated_state_gives_the_same_result_and_is_consumed():
    for where in ("device", "host"):
        ref, ref_hist = fl.run_rounds(ALG, _state(), DATA, KEY, client_states_on=where, **RUN)
        state = _state()
        # One buffer twice in the state (here: c = params) must not break donation.
        state = state._replace(extra=state.params)
        ref_alias, _ = fl.run_rounds(ALG, state, DATA, KEY, client_states_on=where, **RUN)
        got_alias, _ = fl.run_rounds(
            ALG, state, DATA, KEY, client_states_on=where, donate_state=True, **RUN
        )
        assert_trees_equal(got_alias, ref_alias)

        state = _state()
        got, hist = fl.run_rounds(
            ALG, state, DATA, KEY, client_states_on=where, donate_state=True, **RUN
        )
        assert_trees_equal(got, ref)
        assert_trees_equal(hist, ref_hist)
        # The CPU backend honours donation: the params and optimiser buffers are gone.
        assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
        cs_deleted = [x.is_deleted() for x in jax.tree.leaves(state.client_states)]
        # On the device the client states are donated too; on the host they were copied out.
        assert all(cs_deleted) if where == "device" else not any(cs_deleted)
        # A donated run continues without compiling again.
        with compiles() as later:
            got, _ = fl.run_rounds(
                ALG, got, DATA, KEY, client_states_on=where, donate_state=True, **RUN
            )
            jax.block_until_ready(got)
        assert later == [], where
        assert int(got.round) == 6 and np.all(np.isfinite(np.asarray(got.params["w"])))


_SHARDED_SCRIPT = """
import os
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # count real compiles, not cache loads
import jax, jax.numpy as jnp, numpy as np, optax, fedjax_lab as fl
count = [0]
EVENT = "/jax/core/compile/backend_compile_duration"
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: count.__setitem__(0, count[0] + (e == EVENT)))
rng = np.random.default_rng(0)
data = fl.FederatedData.from_client_arrays(
    [{"x": rng.normal(size=(8, 3)).astype("f4"), "y": np.ones(8, "f4")} for _ in range(6)])
loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.05))
state = alg.init(jnp.zeros(3))
seen = []
for _ in range(3):
    state, _ = fl.run_rounds(alg, state, data, jax.random.key(0), num_rounds=2, cohort_size=4,
                             batch_size=2)
    jax.block_until_ready(state)
    seen.append(count[0])
print("MAP", fl.maps.choose(4).name)
print("COMPILES", seen)
"""


def test_sharded_auto_map_does_not_recompile_round_two(tmp_path):
    """On 2 host devices auto() shards; the state a sharded round returns is replicated over the
    mesh, and a fresh state is placed there first, so the second call compiles nothing."""
    import json

    stdout = run_on_host_devices(_SHARDED_SCRIPT, tmp_path, 2)
    lines = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert lines["MAP"].startswith("sharded(")
    first, second, third = json.loads(lines["COMPILES"])
    assert first > 0 and second == first and third == first, lines["COMPILES"]
