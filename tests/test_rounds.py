"""The engine: client maps agree, FedAvg == centralised GD, masks, retracing, determinism."""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import (
    assert_trees_close,
    assert_trees_equal,
    cohort,
    init_params,
    loss_fn,
    population,
    run_on_host_devices,
)

import fedjax_lab as fl

FEDAVG = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3))
FEDADAM = fl.algorithms.fed_adam(
    loss_fn, client_optimizer=optax.sgd(0.3), server_learning_rate=0.05
)
DATA = population()
KEY = jax.random.key(42)


def _run(alg, client_map, num_rounds=3, **kw):
    kw.setdefault("cohort_size", 7)
    kw.setdefault("batch_size", 3)
    return fl.run_rounds(
        alg, alg.init(init_params()), DATA, KEY, num_rounds=num_rounds, client_map=client_map, **kw
    )


@pytest.mark.parametrize("alg", [FEDAVG, FEDADAM], ids=["fedavg", "fedadam"])
def test_client_maps_agree(alg):
    ref_state, ref_hist = _run(alg, fl.maps.sequential())
    for client_map in [fl.maps.vmap(), fl.maps.chunked(3), fl.maps.auto()]:
        state, hist = _run(alg, client_map)
        assert_trees_close(state.params, ref_state.params)
        assert_trees_close(state.opt_state, ref_state.opt_state)
        np.testing.assert_allclose(hist["train_loss"], ref_hist["train_loss"], rtol=1e-5)
        np.testing.assert_array_equal(hist["client_ids"], ref_hist["client_ids"])
    # The run actually trained: the loss moved and the params changed.
    assert not np.allclose(jax.tree.leaves(ref_state.params)[0], jax.tree.leaves(init_params())[0])


def test_sharded_map_agrees_on_four_host_devices(tmp_path):
    """shard_map over 4 forced CPU devices, cohort of 10 (not divisible by 4), vs sequential."""
    script = textwrap.dedent(
        """
        import json, sys
        import jax, numpy as np, optax
        sys.path.insert(0, sys.argv[1])
        from _problems import init_params, loss_fn, population
        import fedjax_lab as fl
        assert jax.local_device_count() == 4, jax.devices()
        data = population()
        out = {}
        for name, alg in [
            ("fedavg", fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3))),
            ("fedadam", fl.algorithms.fed_adam(loss_fn, client_optimizer=optax.sgd(0.3),
                                               server_learning_rate=0.05)),
        ]:
            for map_name, m in [("sequential", fl.maps.sequential()),
                                ("sharded_seq", fl.maps.sharded(fl.maps.sequential())),
                                ("sharded_vmap", fl.maps.sharded(fl.maps.vmap())),
                                ("auto", fl.maps.auto())]:
                state, hist = fl.run_rounds(alg, alg.init(init_params()), data, jax.random.key(42),
                                            num_rounds=3, cohort_size=10, batch_size=3,
                                            client_map=m)
                out[name + "/" + map_name] = [np.asarray(l).tolist()
                                              for l in jax.tree.leaves(state.params)]
        out["auto_choice"] = fl.maps.choose(10).name
        print(json.dumps(out))
        """
    )
    stdout = run_on_host_devices(script, tmp_path, 4, os.path.dirname(__file__))
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["auto_choice"].startswith("sharded(sequential()")
    for alg in ("fedavg", "fedadam"):
        ref = out[f"{alg}/sequential"]
        for m in ("sharded_seq", "sharded_vmap", "auto"):
            for a, b in zip(out[f"{alg}/{m}"], ref, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fedavg_one_full_batch_step_is_centralised_gradient_descent():
    """Equal client sizes, one full-batch local SGD step, fed_sgd(1) == GD on the union."""
    n, lr = 6, 0.5
    data = population(sizes=(n,) * 5, seed=3)
    alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(lr), server_learning_rate=1.0)
    params = init_params(1)
    state, _ = fl.run_rounds(
        alg, alg.init(params), data, KEY, num_rounds=1, cohort_size=5, batch_size=n,
        local_steps=1, client_map=fl.maps.sequential(),
    )
    union = dict(data.examples, mask=np.ones(data.num_examples, np.float32))
    grads = jax.grad(loss_fn)(params, union, None)
    expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    assert_trees_close(state.params, expected, rtol=1e-5, atol=1e-6)


def test_padded_client_and_padded_step_change_nothing():
    alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.adam(0.1))
    state0 = alg.init(init_params())
    base = cohort(num_clients=3, steps=2, batch=3)
    ref, _ = fl.run_round(alg, state0, base, KEY, client_map=fl.maps.sequential())

    # A fourth client that is all padding, with weight 0.
    b = base.batches
    padded = fl.Cohort(
        {k: jnp.concatenate([v, jnp.zeros_like(v[:1])]) for k, v in b.items()},
        jnp.concatenate([base.weights, jnp.zeros(1)]),
        jnp.arange(4, dtype=jnp.int32),
    )
    out, metrics = fl.run_round(alg, state0, padded, KEY, client_map=fl.maps.sequential())
    assert_trees_close(out.params, ref.params, rtol=1e-6, atol=1e-7)
    assert float(metrics["num_examples"]) == 18.0

    # An extra all-padding local step for every client (adam's step count must not move).
    extra = fl.Cohort(
        {k: jnp.concatenate([v, jnp.zeros_like(v[:, :1])], axis=1) for k, v in b.items()},
        base.weights,
        base.client_ids,
    )
    for skip in (True, False):
        alg2 = fl.algorithms.fed_avg(
            loss_fn, client_optimizer=optax.adam(0.1), skip_empty_steps=skip
        )
        out2, m2 = fl.run_round(alg2, state0, extra, KEY, client_map=fl.maps.sequential())
        assert_trees_close(out2.params, ref.params, rtol=1e-6, atol=1e-7)
        assert float(m2["num_steps"]) == 6.0


def test_round_two_does_not_retrace():
    traces = []

    def counting_loss(params, batch, key):
        traces.append(1)
        return loss_fn(params, batch, key)

    alg = fl.algorithms.fed_avg(counting_loss, client_optimizer=optax.sgd(0.1))
    state = alg.init(init_params())
    state, _ = fl.run_round(alg, state, cohort(seed=1), KEY, client_map=fl.maps.sequential())
    after_first = len(traces)
    assert after_first > 0
    for seed in (2, 3):
        state, _ = fl.run_round(alg, state, cohort(seed=seed), KEY, client_map=fl.maps.sequential())
    assert len(traces) == after_first
    # run_rounds: a second block of rounds reuses the compiled program too.
    state, _ = fl.run_rounds(alg, state, DATA, KEY, num_rounds=2, cohort_size=3, batch_size=2,
                             client_map=fl.maps.sequential())
    after_block = len(traces)
    state, _ = fl.run_rounds(alg, state, DATA, KEY, num_rounds=2, cohort_size=3, batch_size=2,
                             client_map=fl.maps.sequential())
    assert len(traces) == after_block


def test_same_key_same_result_and_blocks_equal_one_run():
    s1, h1 = _run(FEDAVG, fl.maps.sequential(), num_rounds=4)
    s2, h2 = _run(FEDAVG, fl.maps.sequential(), num_rounds=4)
    assert_trees_equal(s1, s2)
    # 2 rounds + 2 rounds == 4 rounds, bit for bit (all randomness is fold_in(key, round)).
    half, _ = _run(FEDAVG, fl.maps.sequential(), num_rounds=2)
    rest, h_rest = fl.run_rounds(FEDAVG, half, DATA, KEY, num_rounds=2, cohort_size=7,
                                 batch_size=3, client_map=fl.maps.sequential())
    assert_trees_equal(rest.params, s1.params)
    np.testing.assert_array_equal(h_rest["client_ids"], h1["client_ids"][2:])
    assert int(rest.round) == 4


def test_epochs_walk_each_client_once_and_local_steps_are_fixed():
    # epochs=1: every sampled client contributes exactly its own number of examples.
    _, hist = _run(FEDAVG, fl.maps.sequential(), num_rounds=3, epochs=1)
    sizes = DATA.client_sizes
    for r in range(3):
        ids = np.asarray(hist["client_ids"][r])
        assert len(set(ids.tolist())) == 7
        assert float(hist["num_examples"][r]) == float(sizes[ids].sum())
        assert float(hist["total_weight"][r]) == float(sizes[ids].sum())
    # epochs=2 doubles it; fixed local steps give steps * batch real examples per client.
    _, hist2 = _run(FEDAVG, fl.maps.sequential(), num_rounds=1, epochs=2)
    ids = np.asarray(hist2["client_ids"][0])
    assert float(hist2["num_examples"][0]) == 2.0 * sizes[ids].sum()
    _, hist3 = _run(FEDAVG, fl.maps.sequential(), num_rounds=1, local_steps=4)
    assert float(hist3["num_examples"][0]) == 7 * 4 * 3


def test_batch_indices_cover_each_client_once_per_epoch():
    from fedjax_lab.data.sampling import batch_indices

    for size in (1, 3, 5, 8):
        idx, mask = batch_indices(jax.random.key(size), jnp.array(100), jnp.array(size),
                                  num_steps=6, batch_size=3, max_client_size=8, epochs=2)
        real = np.asarray(idx).ravel()[np.asarray(mask).ravel() > 0]
        assert len(real) == 2 * size
        for e in range(2):
            assert sorted(real[e * size:(e + 1) * size].tolist()) == list(range(100, 100 + size))
        fixed, fmask = batch_indices(jax.random.key(0), jnp.array(0), jnp.array(size),
                                     num_steps=6, batch_size=3, max_client_size=8, epochs=None)
        assert np.all(np.asarray(fmask) == 1)
        assert set(np.asarray(fixed).ravel().tolist()) <= set(range(size))


def test_unroll_gives_the_same_result():
    unrolled = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3), unroll=True)
    s1, _ = _run(FEDAVG, fl.maps.sequential(), num_rounds=2)
    s2, _ = _run(unrolled, fl.maps.sequential(), num_rounds=2)
    assert_trees_close(s1.params, s2.params, rtol=1e-6, atol=1e-7)


def test_fedprox_with_zero_mu_is_fedavg_exactly_and_mu_pulls_towards_server():
    prox0 = fl.algorithms.fed_prox(loss_fn, client_optimizer=optax.sgd(0.3), mu=0.0)
    s_avg, _ = _run(FEDAVG, fl.maps.sequential(), num_rounds=2)
    s_prox, _ = _run(prox0, fl.maps.sequential(), num_rounds=2)
    assert_trees_equal(s_avg.params, s_prox.params)
    # A large mu keeps the client models (hence the new server model) closer to the start.
    prox = fl.algorithms.fed_prox(loss_fn, client_optimizer=optax.sgd(0.3), mu=2.0)
    s_far, _ = _run(prox, fl.maps.sequential(), num_rounds=1)
    s_near, _ = _run(FEDAVG, fl.maps.sequential(), num_rounds=1)
    start = init_params()
    dist = lambda s: float(fl.tree.global_norm(optax.tree.sub(s.params, start)))
    assert dist(s_far) < dist(s_near)


def test_registry_builds_and_runs_every_algorithm():
    assert {"fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox"} <= set(
        fl.algorithms.REGISTRY
    )
    c = cohort(num_clients=2, steps=1, batch=3)
    # Hyper-parameters that cannot be defaulted: FedDisco's label count, and q-FFL's Lipschitz
    # estimate 1/lr, which cannot be read back from an arbitrary optax client optimiser.
    required = {"feddisco": {"num_classes": 3}, "qffl": {"lipschitz": 10.0}}
    for name, factory in fl.algorithms.REGISTRY.items():
        alg = factory(loss_fn, client_optimizer=optax.sgd(0.1), **required.get(name, {}))
        state0 = alg.init(init_params(), num_clients=4)
        state, metrics = fl.run_round(alg, state0, c, KEY, client_map=fl.maps.vmap())
        assert int(state.round) == 1, name
        assert float(metrics["round_skipped"]) == 0.0, name
        assert np.isfinite(float(metrics["train_loss"])), name
