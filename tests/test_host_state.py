"""Host-resident per-client state (``run_rounds(client_states_on="host")``) == device storage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import assert_trees_close, init_params, loss_fn, population

import fedjax_lab as fl
from fedjax_lab import _host_state
from fedjax_lab.rounds import client_state_bytes

DATA = population()  # 10 clients
KEY = jax.random.key(7)
SEQ = fl.maps.sequential()


def _eval_fn(params, batch):
    logits = batch["x"] @ params["w"] + params["b"][None, :]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]
    return {"loss_sum": jnp.sum(nll * batch["mask"]), "num_examples": jnp.sum(batch["mask"])}


CASES = {
    # SCAFFOLD reads N = client_states.shape[0] in its server update; a Markov sampler has
    # state and leaves padding slots (available 0) whose client state must not move.
    "scaffold_markov": dict(
        alg="scaffold", sampler=fl.data.participation.markov(0.3, 0.5), eval_fn=None
    ),
    # Ditto's personal models; evaluation inside the run.
    "ditto_eval": dict(alg="ditto", sampler=None, eval_fn=_eval_fn),
}


def _run(case, state, num_rounds, where):
    eval_kw = (
        {} if case["eval_fn"] is None else dict(eval_fn=_eval_fn, eval_data=DATA, eval_every=2)
    )
    return fl.run_rounds(
        fl.algorithms.REGISTRY[case["alg"]](loss_fn),
        state,
        DATA,
        KEY,
        num_rounds=num_rounds,
        cohort_size=6,  # 6 + 6 > 10: consecutive cohorts always share clients
        batch_size=3,
        client_map=SEQ,
        sampler=case["sampler"],
        client_states_on=where,
        **eval_kw,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_host_storage_equals_device_storage(name):
    case = CASES[name]
    alg = fl.algorithms.REGISTRY[case["alg"]](loss_fn)
    state0 = alg.init(init_params(), num_clients=DATA.num_clients)
    before = [np.array(x) for x in jax.tree.leaves(state0.client_states)]

    dev_state, dev_hist = _run(case, state0, 4, "device")
    # Host: 3 rounds, then 1 more from the returned (NumPy) state == 4 rounds on the device.
    half, h1 = _run(case, state0, 3, "host")
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(half.client_states))
    host_state, h2 = _run(case, half, 1, "host")
    host_hist = {k: np.concatenate([np.asarray(h1[k]), np.asarray(h2[k])]) for k in h1}

    assert_trees_close(host_state, dev_state, rtol=1e-6, atol=1e-7)
    assert int(host_state.round) == 4
    assert sorted(host_hist) == sorted(dev_hist)
    for k, v in dev_hist.items():
        assert host_hist[k].shape == v.shape, k
        np.testing.assert_allclose(host_hist[k], np.asarray(v), rtol=1e-6, atol=1e-7, err_msg=k)
    # The run did touch per-client state, with clients in consecutive cohorts.
    ids = np.asarray(dev_hist["client_ids"])
    assert any(set(ids[t]) & set(ids[t + 1]) for t in range(3))
    moved = [
        not np.allclose(a, np.asarray(b))
        for a, b in zip(before, jax.tree.leaves(dev_state.client_states), strict=True)
    ]
    assert any(moved)
    # The caller's state was not written to.
    for a, b in zip(before, jax.tree.leaves(state0.client_states), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    if case["sampler"] is not None:
        assert np.asarray(dev_hist["available_clients"]).min() < 6  # padding slots happened
    if case["eval_fn"] is not None:
        assert np.isnan(host_hist["eval_loss"][0]) and np.isfinite(host_hist["eval_loss"][1])


def test_algorithm_reading_population_values_is_refused_on_host():
    base = fl.algorithms.REGISTRY["scaffold"](loss_fn)

    def server_update(state, aggregate, key):  # reads every client's control variate
        new = base.server_update(state, aggregate, key)
        c = jax.tree.map(lambda a: jnp.mean(a, axis=0), state.client_states)
        return new._replace(extra=c)

    alg = base._replace(server_update=server_update, name="reads_all")
    state = alg.init(init_params(), num_clients=DATA.num_clients)
    with pytest.raises(ValueError, match="client_states_on='device'"):
        fl.run_rounds(
            alg,
            state,
            DATA,
            KEY,
            num_rounds=1,
            cohort_size=2,
            batch_size=3,
            client_map=SEQ,
            client_states_on="host",
        )


def test_bad_arguments_are_refused_before_compiling():
    alg = fl.algorithms.REGISTRY["scaffold"](loss_fn)
    state = alg.init(init_params(), num_clients=DATA.num_clients)
    kw = dict(num_rounds=1, cohort_size=2, batch_size=3)
    with pytest.raises(ValueError, match="client_states_on"):
        fl.run_rounds(alg, state, DATA, KEY, client_states_on="gpu", **kw)
    with pytest.raises(TypeError, match="donate_state"):
        fl.run_rounds(alg, state, DATA, KEY, donate_state="yes", **kw)
    wrong = alg.init(init_params(), num_clients=DATA.num_clients + 1)
    for where in ("device", "host"):
        with pytest.raises(ValueError, match="num_clients=10"):
            fl.run_rounds(alg, wrong, DATA, KEY, client_states_on=where, **kw)


def test_client_state_bytes_is_clients_times_one_client():
    alg = fl.algorithms.REGISTRY["ditto"](loss_fn)
    one = fl.tree.nbytes(init_params())  # Ditto keeps one personal model per client
    assert one == (4 * 3 + 3) * 4
    state = alg.init(init_params(), num_clients=10)
    assert client_state_bytes(state) == 10 * one
    shapes = jax.eval_shape(lambda p: alg.init(p, num_clients=10**6), init_params())
    assert client_state_bytes(shapes) == 10**6 * one
    host = state._replace(client_states=jax.tree.map(np.asarray, state.client_states))
    assert client_state_bytes(host) == 10 * one
    assert client_state_bytes(fl.algorithms.REGISTRY["fedavg"](loss_fn).init(init_params())) == 0


def test_patch_rows_takes_the_previous_rounds_new_rows():
    rows = {"a": jnp.arange(4.0)[:, None] * jnp.ones((4, 2))}
    prev = {"a": 100.0 + jnp.arange(4.0)[:, None] * jnp.ones((4, 2))}
    got = _host_state.patch_rows(rows, jnp.array([5, 2, 9, 7]), jnp.array([7, 1, 5, -1]), prev)
    np.testing.assert_array_equal(got["a"][:, 0], [102.0, 1.0, 2.0, 100.0])


def test_pipelined_rounds_sees_every_update_like_a_sequential_loop():
    """The one-round-ahead gather + device-side patch == gather/update/scatter in order."""
    rng = np.random.default_rng(0)
    n, c, r = 7, 4, 30
    ids = np.stack([rng.choice(n, c, replace=False) for _ in range(r)]).astype(np.int32)
    ref = np.arange(n, dtype=np.float64)[:, None] * np.ones((1, 2))
    for t in range(r):  # the plain loop: each cohort's rows get +t+1 and a *2
        ref[ids[t]] = (ref[ids[t]] + t + 1) * 2

    def dispatch(t, rows, prev_ids, prev_rows):
        (row,), (prev,) = rows, prev_rows
        hit = ids[t][:, None] == prev_ids[None, :]
        row = np.where(hit.any(1)[:, None], np.asarray(prev)[hit.argmax(1)], row)
        return [(row + t + 1) * 2], {"t": t}

    store = [np.arange(n, dtype=np.float64)[:, None] * np.ones((1, 2))]
    history = _host_state.pipelined_rounds(store, ids, dispatch)
    np.testing.assert_array_equal(store[0], ref)
    assert [h["t"] for h in history] == list(range(r))
