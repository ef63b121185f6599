"""FedBuff: zero delay is FedAvg; delayed clients start from the right stale version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn

import fedjax_lab as fl
from fedjax_lab.algorithms import fedbuff


@pytest.mark.parametrize("hp", [{"delay": "none"}, {"delay": "uniform", "max_delay": 1}])
def test_zero_delay_equals_fedavg(hp):
    buff = fedbuff.fed_buff(loss_fn, optax.sgd(0.1), server_learning_rate=0.7, **hp)
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1), server_learning_rate=0.7)
    s1, s2 = buff.init(init_params()), ref.init(init_params())
    c = cohort()
    for _ in range(3):
        s1, m1 = fl.run_round(buff, s1, c, jax.random.key(0), client_map=fl.maps.sequential())
        s2, _ = fl.run_round(ref, s2, c, jax.random.key(0), client_map=fl.maps.sequential())
        assert float(m1["staleness_sum"]) == 0.0
    assert_trees_close(s1.params, s2.params, rtol=1e-6, atol=1e-7)
    assert int(s1.extra.version) == 3


def test_clients_start_from_the_right_stale_version():
    """Loss 0.5||p||^2 and one SGD step of 0.1: the update is 0.1 s(d) * start."""
    d_max = 4
    alg = fedbuff.fed_buff(lambda p, b, k: 0.5 * jnp.sum(p ** 2), optax.sgd(0.1),
                           max_delay=d_max, delay="uniform")
    state = alg.init(jnp.zeros(2))
    version = 2  # versions 0, 1, 2 exist; delay 3 must fall back to version 0
    tags = jnp.array([10.0, 1.0, 2.0, 99.0])  # slot j holds version j (slot 3: unused)
    state = state._replace(extra=fedbuff.FedBuffState(
        tags[:, None] * jnp.ones((d_max, 2)), jnp.int32(version)))
    batches = {"x": jnp.zeros((1, 1)), "mask": jnp.ones((1, 1))}
    client = fl.ClientInput(batches, jnp.float32(1.0), jnp.int32(0), ())
    keys = jax.random.split(jax.random.key(0), 64)
    outs = jax.vmap(lambda k: alg.client_update(state, client, k))(keys)
    delays = np.array([int(fedbuff.sample_delay(jax.random.fold_in(k, 1), "uniform", d_max))
                       for k in keys])
    assert set(delays) == {0, 1, 2, 3}
    start = np.array([tags[max(version - d, 0)] for d in delays])
    effective = np.array([version - max(version - d, 0) for d in delays])
    expected = 0.1 * start / np.sqrt(1.0 + effective)
    np.testing.assert_allclose(np.asarray(outs.update[:, 0]), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(outs.metrics["staleness_sum"]), effective)


def test_ring_buffer_holds_the_last_versions():
    alg = fedbuff.fed_buff(loss_fn, optax.sgd(0.1), max_delay=3, delay="geometric",
                           delay_p=0.5)
    state = alg.init(init_params())
    history = [state.params]
    for _ in range(4):
        state, _ = fl.run_round(alg, state, cohort(), jax.random.key(1),
                                client_map=fl.maps.sequential())
        history.append(state.params)
    assert int(state.extra.version) == 4
    for v in (2, 3, 4):
        assert_trees_close(jax.tree.map(lambda a, v=v: a[v % 3], state.extra.versions),
                           history[v], rtol=0, atol=0)


def test_delays_follow_their_distribution():
    keys = jax.random.split(jax.random.key(5), 4000)
    geo = jax.vmap(lambda k: fedbuff.sample_delay(k, "geometric", 50, 0.4))(keys)
    assert float(jnp.mean(geo == 0)) == pytest.approx(0.4, abs=0.03)
    uni = jax.vmap(lambda k: fedbuff.sample_delay(k, "uniform", 4))(keys)
    assert set(np.unique(np.asarray(uni))) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="delay"):
        fedbuff.fed_buff(loss_fn, delay="poisson")


def test_sequential_equals_vmap():
    alg = fedbuff.fed_buff(loss_fn, optax.sgd(0.1), max_delay=3, delay="uniform")
    results = []
    for m in (fl.maps.sequential(), fl.maps.vmap()):
        state = alg.init(init_params())
        for _ in range(2):
            state, metrics = fl.run_round(alg, state, cohort(), jax.random.key(3), client_map=m)
        results.append((state, metrics))
    assert_trees_close(results[0][0].params, results[1][0].params, rtol=1e-5, atol=1e-6)
    assert_trees_close(results[0][0].extra, results[1][0].extra, rtol=1e-5, atol=1e-6)
    assert float(results[0][1]["staleness_sum"]) == float(results[1][1]["staleness_sum"])
