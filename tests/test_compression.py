"""Compressors, error feedback identities and bits accounting."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn

import fedjax_lab as fl
from fedjax_lab import compression as comp

D = 15  # entries of the _problems params (4 x 3 + 3)


def test_top_k_keeps_exactly_the_k_largest():
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
    flat = np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"])])
    for k in (1, 5, 27):
        out = comp.top_k(k=k).compress(tree, jax.random.key(0))
        got = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])
        top = np.argsort(-np.abs(flat))[:k]
        expected = np.zeros_like(flat)
        expected[top] = flat[top]
        np.testing.assert_array_equal(got, expected)
        assert int(np.sum(got != 0)) == k


def test_random_k_count_and_unbiasedness():
    x = {"w": jnp.arange(1.0, 11.0)}
    rk = comp.random_k(k=3, unbiased=True)
    outs = jax.vmap(lambda k: rk.compress(x, k)["w"])(jax.random.split(jax.random.key(1), 20000))
    assert bool(jnp.all(jnp.sum(outs != 0, axis=1) == 3))
    np.testing.assert_allclose(jnp.mean(outs, 0), x["w"], rtol=0.06)


@pytest.mark.parametrize("bits", [1, 3])
def test_qsgd_is_unbiased_and_on_its_lattice(bits):
    x = {"w": jnp.array([0.3, -1.2, 2.0, 0.0, -0.05]), "b": jnp.array([[0.7]])}
    q = comp.qsgd(bits)
    outs = jax.vmap(lambda k: q.compress(x, k))(jax.random.split(jax.random.key(2), 40000))
    norm = float(optax.tree.norm(x))
    s = 2**bits - 1
    for name in x:
        mean = np.asarray(jnp.mean(outs[name], 0))
        se = norm / s / np.sqrt(40000)  # each entry's std is at most norm / s
        np.testing.assert_allclose(mean, np.asarray(x[name]), atol=5 * se)
        levels = np.asarray(jnp.abs(outs[name])) * s / norm
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
        assert levels.max() <= s + 1e-4
    zero = q.compress({"w": jnp.zeros(3)}, jax.random.key(0))["w"]
    assert bool(jnp.all(zero == 0))


def test_bits_formulas():
    tree = {"w": jnp.zeros((10, 10))}
    assert comp.identity().bits(tree) == 3200
    assert comp.top_k(0.05).bits(tree) == 5 * (32 + 7)
    assert comp.random_k(k=4).bits(tree) == 128
    assert comp.qsgd(4).bits(tree) == 32 + 100 * 5


BASE = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))


def _client(c, i, state):
    b = jax.tree.map(lambda a: a[i], c.batches)
    return fl.ClientInput(b, c.weights[i], jnp.int32(i), state)


@pytest.mark.parametrize("ef", ["ef", "ef21"])
def test_error_feedback_memory_identity(ef):
    alg = comp.compressed(BASE, comp.top_k(k=4), error_feedback=ef)
    state = alg.init(init_params(), num_clients=4)
    c = cohort(num_clients=4)
    old = jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), init_params())
    key = jax.random.key(3)
    delta = BASE.client_update(state._replace(client_states=()), _client(c, 0, ()), key).update
    out = alg.client_update(state, _client(c, 0, ((), old)), key)
    new = out.state[1]
    if ef == "ef":  # sent + new memory == update + old memory; sent is 4-sparse
        assert_trees_close(optax.tree.add(out.update, new), optax.tree.add(delta, old))
        assert sum(int(jnp.sum(x != 0)) for x in jax.tree.leaves(out.update)) == 4
    else:  # g_new = g_old + C(Δ - g_old), and the server receives g_new
        message = optax.tree.sub(new, old)
        assert_trees_close(out.update, new)
        assert sum(int(jnp.sum(jnp.abs(x) > 1e-9)) for x in jax.tree.leaves(message)) <= 4
        expected = comp.top_k(k=4).compress(optax.tree.sub(delta, old), key)
        assert_trees_close(message, expected)
    assert float(out.metrics["bits_sent"]) == 4 * (32 + math.ceil(math.log2(D)))
    # a zero-weight client keeps its memory and sends no bits
    idle = alg.client_update(state, _client(c, 0, ((), old))._replace(weight=jnp.float32(0)), key)
    assert_trees_close(idle.state[1], old)
    assert float(idle.metrics["bits_sent"]) == 0.0


def test_bits_sent_summed_over_participating_clients_and_memory_scattered():
    alg = fl.algorithms.fed_avg_topk(loss_fn, optax.sgd(0.1), fraction=0.2)
    state = alg.init(init_params(), num_clients=6)
    c = cohort(num_clients=4)
    c = c._replace(weights=c.weights.at[2].set(0.0), client_ids=jnp.array([5, 1, 3, 0]))
    state, metrics = fl.run_round(alg, state, c, jax.random.key(0),
                                  client_map=fl.maps.sequential())
    k = math.ceil(0.2 * D)
    assert float(metrics["bits_sent"]) == 3 * k * (32 + math.ceil(math.log2(D)))
    memory = state.client_states[1]
    memory_norms = [float(optax.tree.norm(jax.tree.map(lambda a, i=i: a[i], memory)))
                    for i in range(6)]
    assert all(memory_norms[i] > 0 for i in (5, 1, 0))
    assert all(memory_norms[i] == 0 for i in (2, 3, 4))
    q = fl.algorithms.fed_avg_qsgd(loss_fn, optax.sgd(0.1), bits=2)
    _, qm = fl.run_round(q, q.init(init_params()), c, jax.random.key(0),
                         client_map=fl.maps.sequential())
    assert float(qm["bits_sent"]) == 3 * (32 + D * 3)


def test_error_feedback_without_population_is_a_clear_error():
    alg = comp.compressed(BASE, comp.top_k(k=2), error_feedback="ef")
    with pytest.raises(ValueError, match="num_clients"):
        fl.run_round(alg, alg.init(init_params()), cohort(), jax.random.key(0),
                     client_map=fl.maps.sequential())


@pytest.mark.parametrize("make", [
    lambda: fl.algorithms.fed_avg_topk(loss_fn, optax.sgd(0.1), fraction=0.3, num_clients=4),
    lambda: fl.algorithms.fed_avg_qsgd(loss_fn, optax.sgd(0.1), bits=2),
    lambda: comp.compressed(BASE, comp.random_k(0.5), error_feedback="ef21", num_clients=4),
], ids=["topk_ef", "qsgd", "randk_ef21"])
def test_sequential_equals_vmap(make):
    alg = make()
    results = []
    for m in (fl.maps.sequential(), fl.maps.vmap()):
        state = alg.init(init_params())
        for _ in range(2):
            state, _ = fl.run_round(alg, state, cohort(), jax.random.key(4), client_map=m)
        results.append(state)
    assert_trees_close(results[0].params, results[1].params, rtol=1e-5, atol=1e-6)
    assert_trees_close(results[0].client_states, results[1].client_states, rtol=1e-5, atol=1e-6)
