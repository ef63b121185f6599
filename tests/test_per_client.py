"""Per-client hyper-parameters (fl.kit.per_client): equal values are the scalar run, bit for bit;
unequal values act on their own client, under every client map and inside a sweep."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab import kit
from tests._problems import assert_trees_close, cohort, init_params, loss_fn, population

DATA = population()  # 10 clients of 2..8 examples
N = DATA.num_clients
RUN = dict(num_rounds=2, cohort_size=4, batch_size=3)
KEY = jax.random.key(3)


def _run(alg, **kw):
    state = alg.init(init_params(), num_clients=N)
    return fl.run_rounds(alg, state, DATA, KEY, **{**RUN, **kw})


def _pc(value):
    return kit.per_client([value] * N)


# (name, scalar algorithm, the same with that hyper-parameter given per client)
EQUAL_CASES = {
    "client_learning_rate": (
        lambda: fl.algorithms.fed_avg(loss_fn, client_learning_rate=0.3),
        lambda: fl.algorithms.fed_avg(loss_fn, client_learning_rate=_pc(0.3)),
    ),
    "max_local_steps": (
        lambda: fl.algorithms.fed_avg(loss_fn, optax.sgd(0.3), max_local_steps=1),
        lambda: fl.algorithms.fed_avg(loss_fn, optax.sgd(0.3), max_local_steps=_pc(1)),
    ),
    "mu": (
        lambda: fl.algorithms.fed_prox(loss_fn, optax.sgd(0.3), mu=0.7),
        lambda: fl.algorithms.fed_prox(loss_fn, optax.sgd(0.3), mu=_pc(0.7)),
    ),
    "lam": (
        lambda: fl.algorithms.ditto(loss_fn, optax.sgd(0.3), lam=0.7),
        lambda: fl.algorithms.ditto(loss_fn, optax.sgd(0.3), lam=_pc(0.7)),
    ),
}


@pytest.mark.parametrize("name", list(EQUAL_CASES))
def test_equal_per_client_values_reproduce_the_scalar_run_bit_for_bit(name):
    scalar, per = (make() for make in EQUAL_CASES[name])
    s1, h1 = _run(scalar)
    s2, h2 = _run(per)
    for a, b in zip(jax.tree.leaves((s1.params, s1.client_states)),
                    jax.tree.leaves((s2.params, s2.client_states)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), name
    assert np.array_equal(h1["train_loss"], h2["train_loss"])
    if name == "max_local_steps":  # a budget of one step: one real step per client (not 3)
        assert np.all(h2["num_steps"] == RUN["cohort_size"])


def test_a_client_of_rate_zero_or_budget_zero_sends_an_unchanged_model():
    c = cohort(num_clients=2)
    x0 = init_params()
    lr = kit.per_client([0.0, 0.3])
    zero_lr = fl.algorithms.fed_avg(loss_fn, client_learning_rate=lr)
    zero_budget = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.3),
                                        max_local_steps=kit.per_client([0, 5]))
    # the reference: client 1 alone, scalar rate 0.3 (its model is x0 - Δ1)
    alone = fl.Cohort(jax.tree.map(lambda a: a[1:], c.batches), c.weights[1:], c.client_ids[1:])
    scalar = fl.algorithms.fed_avg(loss_fn, client_learning_rate=0.3)
    x1, _ = fl.run_round(scalar, scalar.init(x0), alone, KEY)
    share = float(c.weights[1] / c.weights.sum())
    want = jax.tree.map(lambda x, y: x - share * (x - y), x0, x1.params)
    for alg in (zero_lr, zero_budget):
        got, _ = fl.run_round(alg, alg.init(x0), c, KEY)
        assert_trees_close(got.params, want)
    # both slots client 0 (rate 0): nothing moves, exactly
    state, _ = fl.run_round(zero_lr, zero_lr.init(x0), c._replace(client_ids=jnp.zeros(2, "i4")),
                            KEY)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                    jax.tree.leaves(x0), strict=True))


def test_per_client_lambda_travels_with_its_client_under_every_client_map():
    lams = np.array([0.0, 3.0] * (N // 2))
    c = cohort(num_clients=4, steps=3)  # every local step on the same batch: full-batch GD
    c = c._replace(batches=jax.tree.map(lambda a: jnp.repeat(a[:, :1], 3, axis=1), c.batches))
    alg = fl.algorithms.ditto(loss_fn, optax.sgd(0.3), lam=kit.per_client(lams))
    x0 = init_params()
    results = {}
    for client_map in (fl.maps.vmap(), fl.maps.sequential(), fl.maps.chunked(3),
                       fl.maps.sharded()):
        state, _ = fl.run_round(alg, alg.init(x0, num_clients=N), c, KEY, client_map=client_map)
        results[client_map.name] = state.client_states
    first = next(iter(results.values()))
    for v in results.values():
        assert_trees_close(v, first)
    # client i's personal model is the scalar-λ_i run's; the larger λ keeps each client's
    # personal model nearer the global model it started from
    dist = {}
    for lam in (0.0, 3.0):
        scalar = fl.algorithms.ditto(loss_fn, optax.sgd(0.3), lam=lam)
        state, _ = fl.run_round(scalar, scalar.init(x0, num_clients=N), c, KEY)
        rows = np.flatnonzero(lams[:4] == lam)
        assert_trees_close(jax.tree.map(lambda a, rows=rows: a[rows], first),
                           jax.tree.map(lambda a, rows=rows: a[rows], state.client_states))
        dist[lam] = sum(np.sum((np.asarray(v[:4]) - np.asarray(w)) ** 2, axis=tuple(
            range(1, v.ndim))) for v, w in zip(jax.tree.leaves(state.client_states),
                                               jax.tree.leaves(x0), strict=True))
    assert np.all(dist[3.0] < dist[0.0])


def test_a_function_of_client_size_is_evaluated_on_the_populations_sizes():
    sizes = np.asarray(DATA.client_sizes, np.float64)
    got = kit.per_client(lambda n: 0.1 * n / n.max(), client_sizes=DATA)
    np.testing.assert_array_equal(got.values, jnp.asarray(0.1 * sizes / sizes.max(), jnp.float32))
    assert kit.per_client(lambda n: n, client_sizes=DATA.client_sizes).values.shape == (N,)


def _make(sizes, lr_large):
    lrs = jnp.where(jnp.asarray(sizes) > 4, lr_large, 0.05)
    return fl.algorithms.fed_avg(loss_fn, client_learning_rate=kit.per_client(lrs))


def test_a_sweep_over_a_per_client_rate_equals_single_runs():
    make = functools.partial(_make, tuple(int(n) for n in DATA.client_sizes))
    rows = fl.run_sweep(make, fl.grid(lr_large=[0.05, 0.5]), lambda k: init_params(), DATA,
                        config_map="map", **RUN)
    for row in rows:
        alg = make(row["lr_large"])
        init_key, run_key = jax.random.split(jax.random.key(row["seed"]))
        _, hist = fl.run_rounds(alg, alg.init(init_params()), DATA, run_key, **RUN)
        np.testing.assert_allclose(row["final_train_loss"], float(hist["train_loss"][-1]),
                                   rtol=1e-5)
    assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]


def test_bad_per_client_values_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"client_learning_rate: per_client gives 3 values, but "
                                         r"the population has 10 clients"):
        fl.run_rounds(fl.algorithms.fed_avg(loss_fn, client_learning_rate=kit.per_client(
            [0.1, 0.1, 0.1])), fl.algorithms.fed_avg(loss_fn).init(init_params()), DATA, KEY,
            **RUN)
    with pytest.raises(ValueError, match="mu: per_client gives 2 values"):
        fl.algorithms.fed_prox(loss_fn, mu=kit.per_client([0.1, 0.2])).init(init_params(), 10)
    with pytest.raises(ValueError, match="lam: per_client gives 2 values"):
        fl.algorithms.ditto(loss_fn, lam=kit.per_client([0.1, 0.2])).init(init_params(), 10)
    with pytest.raises(ValueError, match="client_learning_rate: every per-client value must be "
                                         "a finite number >= 0; client 1 has -0.1"):
        fl.algorithms.fed_avg(loss_fn, client_learning_rate=kit.per_client([0.1, -0.1]))
    with pytest.raises(ValueError, match="mu: every per-client value .* client 0 has -1"):
        fl.algorithms.fed_prox(loss_fn, mu=kit.per_client([-1.0, 0.0]))
    with pytest.raises(ValueError, match="lam: every per-client value"):
        fl.algorithms.ditto(loss_fn, lam=kit.per_client([1.0, -2.0]))
    with pytest.raises(ValueError, match="max_local_steps: every per-client budget must be a "
                                         "whole number >= 0; client 0 has -1"):
        fl.algorithms.fed_avg(loss_fn, max_local_steps=kit.per_client([-1, 2]))
    with pytest.raises(ValueError, match="max_local_steps: expected a whole number"):
        fl.algorithms.fed_avg(loss_fn, max_local_steps=2.5)
    with pytest.raises(ValueError, match="either client_optimizer or a per-client"):
        fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1), client_learning_rate=_pc(0.1))
    with pytest.raises(ValueError, match="client_sizes=train_data.client_sizes"):
        kit.per_client(lambda n: n)
    with pytest.raises(ValueError, match="one value per client"):
        kit.per_client(np.ones((2, 2)))
    with pytest.raises(ValueError, match="client 1 has nan"):
        kit.per_client([0.1, float("nan")])


TOML = """
[data]
name = "digits"
num_clients = 8
[model]
name = "logistic_regression"
[training]
rounds = 1
cohort_size = 3
batch_size = 8
local_steps = 2
[[algorithms]]
name = "fedprox"
mu = {per_client = "size", scale = 0.5, power = 1.0}
client_learning_rate = {per_client = "size", scale = 0.1, power = 0.5}
max_local_steps = {per_client = [2, 1, 0, 2, 1, 0, 2, 1]}
"""


def test_a_config_gives_hyper_parameters_per_client(tmp_path):
    from fedjax_lab import experiment as exp_lib

    path = tmp_path / "pc.toml"
    path.write_text(TOML)
    exp = exp_lib.build(exp_lib.load_config(path))
    sizes = np.asarray(exp.train.client_sizes, np.float64)
    want = fl.algorithms.fed_prox(
        exp.loss_fn,
        mu=kit.per_client(0.5 * sizes / sizes.mean()),
        client_learning_rate=kit.per_client(0.1 * (sizes / sizes.mean()) ** 0.5),
        max_local_steps=kit.per_client([2, 1, 0, 2, 1, 0, 2, 1]),
    )
    params = exp.model.init(jax.random.key(0))
    kw = dict(num_rounds=1, cohort_size=3, batch_size=8, local_steps=2)
    got, _ = fl.run_rounds(exp.algorithms["fedprox"], exp.algorithms["fedprox"].init(params),
                           exp.train, KEY, **kw)
    ref, _ = fl.run_rounds(want, want.init(params), exp.train, KEY, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got.params),
                                                    jax.tree.leaves(ref.params), strict=True))
    for bad, match in [
        ('mu = {per_client = "sizes"}', r"mu.per_client: expected 'size'"),
        ("mu = {per_client = [0.1, 0.2]}", "2 values, but the training data has 8 clients"),
        ("mu = {per_client = [0.1], scale = 2.0}", "scale and power go with"),
        ("mu = {per_client = [-0.1, 0, 0, 0, 0, 0, 0, 0]}", "client 0 has -0.1"),
    ]:
        text = TOML.replace('mu = {per_client = "size", scale = 0.5, power = 1.0}', bad)
        path.write_text(text)
        with pytest.raises(exp_lib.ConfigError, match=match):
            exp_lib.build(exp_lib.load_config(path))
