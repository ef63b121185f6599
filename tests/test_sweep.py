"""A sweep compiled as one program equals the same configurations run one by one."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from _problems import init_params, loss_fn, population

import fedjax_lab as fl

DATA = population()


def make_fedadam(client_lr, server_lr):
    return fl.algorithms.fed_adam(loss_fn, client_optimizer=optax.sgd(client_lr),
                                  server_learning_rate=server_lr)


def init(key):
    """Initial params drawn from the run's init key (so seeds give different starts)."""
    base = init_params()
    keys = jax.random.split(key, len(jax.tree.leaves(base)))
    shapes = [x.shape for x in jax.tree.leaves(base)]
    leaves = [0.1 * jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(base), leaves)


@pytest.mark.parametrize("config_map", ["map", "vmap"])
def test_sweep_rows_equal_single_runs(config_map):
    configs = fl.grid(client_lr=[0.1, 0.3], server_lr=[0.01, 0.05])
    kw = dict(num_rounds=3, cohort_size=4, batch_size=3)
    rows = fl.run_sweep(make_fedadam, configs, init, DATA, seeds=(0, 7), config_map=config_map,
                    client_map=fl.maps.sequential(), **kw)
    assert len(rows) == 8
    for row in rows[::3]:
        alg = make_fedadam(row["client_lr"], row["server_lr"])
        init_key, run_key = jax.random.split(jax.random.key(row["seed"]))
        _, hist = fl.run_rounds(alg, alg.init(init(init_key)), DATA, run_key,
                                client_map=fl.maps.sequential(), **kw)
        np.testing.assert_allclose(row["final_train_loss"], float(hist["train_loss"][-1]),
                                   rtol=1e-5)
    # the configurations really differ
    assert len({round(r["final_train_loss"], 6) for r in rows}) > 4


def test_sweep_rejects_bad_input():
    with pytest.raises(ValueError, match="configs"):
        fl.run_sweep(make_fedadam, [], init, DATA, num_rounds=1, cohort_size=2, batch_size=2)
    with pytest.raises(ValueError, match="lr"):
        fl.grid(lr=[])
    with pytest.raises(ValueError, match="config_map"):
        fl.run_sweep(make_fedadam, fl.grid(client_lr=[0.1], server_lr=[0.1]), init, DATA,
                 num_rounds=1, cohort_size=2, batch_size=2, config_map="pmap")

    class Unhashable:
        __hash__ = None

        def __call__(self, **hp):
            return make_fedadam(**hp)

    with pytest.raises(TypeError, match="hashable"):
        fl.run_sweep(Unhashable(), fl.grid(client_lr=[0.1], server_lr=[0.1]), init, DATA,
                 num_rounds=1, cohort_size=2, batch_size=2)
