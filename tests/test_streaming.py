"""Host-streamed data (``run_rounds(data_on="host")``) == device-resident data, bit for bit."""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import init_params, loss_fn, population, run_on_host_devices

import fedjax_lab as fl
from fedjax_lab import _streaming

DATA = population()  # 10 clients of 2..8 examples
KEY = jax.random.key(5)
SEQ = fl.maps.sequential()


def _eval_fn(params, batch):
    logits = batch["x"] @ params["w"] + params["b"][None, :]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]
    return {"loss_sum": jnp.sum(nll * batch["mask"]), "num_examples": jnp.sum(batch["mask"])}


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=True)


def _run(alg, state, data, **kw):
    kw = dict(num_rounds=4, cohort_size=6, batch_size=3, client_map=SEQ, **kw)
    return fl.run_rounds(alg, state, data, KEY, **kw)


def test_fedavg_streamed_from_a_memmap_equals_device_data(tmp_path):
    alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3))
    state0 = alg.init(init_params())
    on_disk = fl.data.load_memmap(fl.data.save_memmap(DATA, tmp_path / "pop"))
    assert all(isinstance(v, np.memmap) for v in on_disk.examples.values())
    dev, dev_hist = _run(alg, state0, DATA, epochs=2)
    host, host_hist = _run(alg, state0, on_disk, data_on="host", epochs=2)
    _assert_bitwise_equal((host, host_hist), (dev, dev_hist))
    assert not np.array_equal(np.asarray(dev.params["w"]), np.asarray(state0.params["w"]))
    # Two cohorts at most were on the device: 6 clients x 8 rows x (4 f32 + 1 i32) each.
    cohort_bytes = 6 * int(DATA.client_sizes.max()) * (4 * 4 + 4)
    assert 0 < _streaming.last_run["peak_device_bytes"] <= 2 * cohort_bytes


def test_scaffold_with_a_markov_sampler_streamed_equals_device_data():
    """Per-client state on the device or on the host, padding slots (available 0), eval."""
    alg = fl.algorithms.REGISTRY["scaffold"](loss_fn)
    state0 = alg.init(init_params(), num_clients=DATA.num_clients)
    kw = dict(sampler=fl.data.participation.markov(0.3, 0.5), eval_fn=_eval_fn, eval_data=DATA,
              eval_every=2)
    dev, dev_hist = _run(alg, state0, DATA, **kw)
    for states_on in ("device", "host"):
        host, host_hist = _run(alg, state0, DATA, data_on="host", client_states_on=states_on, **kw)
        if states_on == "host":
            assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host.client_states))
        _assert_bitwise_equal((host, host_hist), (dev, dev_hist))
    assert np.asarray(dev_hist["available_clients"]).min() < 6  # padding slots happened
    assert np.isnan(host_hist["eval_loss"][0]) and np.isfinite(host_hist["eval_loss"][1])
    moved = [not np.allclose(np.asarray(a), 0.0) for a in jax.tree.leaves(dev.client_states)]
    assert any(moved)


def test_memmap_round_trip_keeps_every_array_and_name(tmp_path):
    data = fl.data.FederatedData.from_offsets(
        {"x": np.arange(12, dtype=np.float32).reshape(6, 2), "y": np.arange(6, dtype=np.int64)},
        [0, 1, 4, 6], client_names=["a", "b", "c"],
    )
    back = fl.data.load_memmap(fl.data.save_memmap(data, tmp_path / "d"))
    assert back.client_names == ("a", "b", "c")
    np.testing.assert_array_equal(back.offsets, data.offsets)
    for k, v in data.examples.items():
        assert back.examples[k].dtype == v.dtype and not back.examples[k].flags.writeable
        np.testing.assert_array_equal(back.examples[k], v)
    with pytest.raises(FileNotFoundError, match="save_memmap"):
        fl.data.load_memmap(tmp_path / "missing")
    with pytest.raises(ValueError, match="feature name"):
        fl.data.save_memmap(fl.data.FederatedData({"a/b": np.ones(2)}, np.array([0, 2])),
                            tmp_path / "e")
    with pytest.raises(ValueError, match="dtype object"):
        fl.data.save_memmap(
            fl.data.FederatedData({"x": np.array([{}, {}], dtype=object)}, np.array([0, 2])),
            tmp_path / "f",
        )


def test_cohort_rows_are_each_clients_own_examples_zero_padded():
    ids = np.array([3, 0, 9])
    rows = _streaming.cohort_rows(DATA.examples, DATA.offsets, ids, 8)
    for j, i in enumerate(ids):
        own = DATA.client(int(i))
        n = len(own["y"])
        np.testing.assert_array_equal(rows["x"][j, :n], own["x"])
        np.testing.assert_array_equal(rows["y"][j, :n], own["y"])
        assert not rows["x"][j, n:].any() and not rows["y"][j, n:].any()


def test_bad_data_on_and_incompatible_uses_are_refused_before_compiling():
    alg = fl.algorithms.fed_avg(loss_fn)
    state = alg.init(init_params())
    with pytest.raises(ValueError, match="data_on: expected 'device'.*'host'.*got 'gpu'"):
        _run(alg, state, DATA, data_on="gpu")

    def traced(params):
        return _run(alg, alg.init(params), DATA, data_on="host")[0].params

    with pytest.raises(ValueError, match="data_on='host'.*jax.jit"):
        jax.jit(traced)(init_params())


def test_prefetch_thread_error_is_raised_in_the_caller_and_the_thread_stops():
    def load(t):
        if t == 1:
            raise OSError("disk gone at item 1")
        return np.full(3, t, np.float32)

    feed = _streaming.Prefetcher(load, jax.device_put, 4)
    with pytest.raises(OSError, match="disk gone at item 1"):
        with feed:
            x = feed.get(0)
            feed.used(x, x + 1)
            feed.get(1)
    assert feed._thread is None
    assert not [t for t in threading.enumerate() if t.name == "fedjax_lab-prefetch"]


def test_prefetch_holds_at_most_two_items_and_stops_on_early_exit():
    loaded = []

    def load(t):
        loaded.append(t)
        return np.full(1000, t, np.float32)

    with _streaming.Prefetcher(load, jax.device_put, 50) as feed:
        for t in range(3):
            x = feed.get(t)
            time.sleep(0.05)  # the thread has time to run ahead, if it could
            feed.used(x, x * 2)
        assert feed.live_bytes <= 2 * 4000
    assert feed.peak_bytes == 2 * 4000  # the next item was transferred during each round
    assert max(loaded) <= 5  # it stopped early: bounded look-ahead, no run to the end
    assert not [t for t in threading.enumerate() if t.name == "fedjax_lab-prefetch"]
    with pytest.raises(KeyboardInterrupt):
        with _streaming.Prefetcher(load, jax.device_put, 50) as feed:
            feed.get(0)
            raise KeyboardInterrupt
    assert feed._thread is None
    assert not [t for t in threading.enumerate() if t.name == "fedjax_lab-prefetch"]


def test_streamed_runs_on_four_host_devices_equal_device_data(tmp_path):
    """sharded map over 4 CPU devices, cohort of 10 (8 split over the mesh + 2 outside)."""
    script = textwrap.dedent(
        """
        import json, sys
        import jax, numpy as np, optax
        sys.path.insert(0, sys.argv[1])
        from _problems import init_params, loss_fn, population
        import fedjax_lab as fl
        from fedjax_lab import _streaming
        assert jax.local_device_count() == 4, jax.devices()
        data = population(sizes=(3, 5, 4, 7, 2, 6, 5, 4, 3, 8, 6, 2))
        m = fl.maps.sharded(fl.maps.sequential())
        place = _streaming.cohort_placement(m, 10)
        parts = _streaming.place_rows(_streaming.cohort_rows(
            data.examples, data.offsets, np.arange(10), 8), place)
        shards = sorted((s.device.id, s.data.shape) for s in parts[0]["x"].addressable_shards)
        out = {"head": place[0], "shards": [[d, list(s)] for d, s in shards],
               "tail_shape": list(parts[1]["x"].shape), "equal": {}}
        for name, states_on in [("fedavg", "device"), ("scaffold", "host")]:
            alg = fl.algorithms.REGISTRY[name](loss_fn)
            s0 = alg.init(init_params(), num_clients=data.num_clients)
            runs = [fl.run_rounds(alg, s0, data, jax.random.key(3), num_rounds=2,
                                  cohort_size=10, batch_size=3, client_map=m,
                                  client_states_on=states_on, data_on=where)
                    for where in ("device", "host")]
            (a, ha), (b, hb) = runs
            leaves = list(zip(jax.tree.leaves((a, ha)), jax.tree.leaves((b, hb))))
            out["equal"][name] = all(np.array_equal(np.asarray(x), np.asarray(y),
                                                    equal_nan=True) for x, y in leaves)
        print(json.dumps(out))
        """
    )
    stdout = run_on_host_devices(script, tmp_path, 4, os.path.dirname(__file__))
    out = json.loads(stdout.strip().splitlines()[-1])
    # Each device received only its 2 clients' rows; the 2 clients past the mesh ride along.
    assert out["head"] == 8
    assert out["shards"] == [[d, [2, 8, 4]] for d in range(4)]
    assert out["tail_shape"] == [2, 8, 4]
    assert out["equal"] == {"fedavg": True, "scaffold": True}, out
