"""Reliability: bad input fails early and clearly; NaN clients and empty cohorts poison nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_equal, cohort, init_params, loss_fn, population

import fedjax_lab as fl

ALG = fl.algorithms.fed_adam(loss_fn, client_optimizer=optax.sgd(0.3), server_learning_rate=0.1)
KEY = jax.random.key(0)


def test_nan_client_is_dropped_and_counted():
    state0 = ALG.init(init_params())
    base = cohort(num_clients=4)
    x = base.batches["x"].at[2, 0, 0, 0].set(jnp.nan)
    poisoned = base._replace(batches=dict(base.batches, x=x))
    without = base._replace(weights=base.weights.at[2].set(0.0))
    for client_map in (fl.maps.sequential(), fl.maps.vmap()):
        state, metrics = fl.run_round(ALG, state0, poisoned, KEY, client_map=client_map)
        assert float(metrics["dropped_clients"]) == 1.0
        assert bool(fl.tree.all_finite(state))
        ref, _ = fl.run_round(ALG, state0, without, KEY, client_map=client_map)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert np.isfinite(float(metrics["train_loss"]))


def test_all_zero_weights_skip_the_round_and_keep_the_whole_state():
    state0 = ALG.init(init_params())
    state1, _ = fl.run_round(ALG, state0, cohort(seed=5), KEY)  # non-trivial optimiser state
    zero = cohort(seed=6)._replace(weights=jnp.zeros(4))
    state2, metrics = fl.run_round(ALG, state1, zero, KEY)
    assert float(metrics["round_skipped"]) == 1.0
    assert_trees_equal(state2.params, state1.params)
    assert_trees_equal(state2.opt_state, state1.opt_state)
    assert int(state2.round) == int(state1.round) + 1
    assert bool(fl.tree.all_finite(state2))


def test_every_client_nan_skips_the_round():
    state0 = ALG.init(init_params())
    base = cohort()
    bad = base._replace(batches=dict(base.batches, x=jnp.full_like(base.batches["x"], jnp.nan)))
    state, metrics = fl.run_round(ALG, state0, bad, KEY)
    assert float(metrics["dropped_clients"]) == 4.0
    assert float(metrics["round_skipped"]) == 1.0
    assert_trees_equal(state.params, state0.params)


DATA = population()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cohort_size=11), "cohort_size"),
        (dict(cohort_size=0), "cohort_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-2), "batch_size"),
        (dict(num_rounds=0), "num_rounds"),
        (dict(epochs=0), "epochs"),
        (dict(local_steps=0), "local_steps"),
        (dict(weighting="size"), "weighting"),
    ],
)
def test_run_rounds_rejects_bad_arguments(kwargs, match):
    args = dict(num_rounds=1, cohort_size=2, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fl.run_rounds(ALG, ALG.init(init_params()), DATA, KEY, **args)


def test_empty_clients_are_rejected():
    data = fl.FederatedData.from_offsets(DATA.examples, [0, 5, 5, DATA.num_examples])
    with pytest.raises(ValueError, match="train_data: clients \\[1\\] hold no examples"):
        fl.run_rounds(ALG, ALG.init(init_params()), data, KEY, num_rounds=1, cohort_size=2,
                      batch_size=2)


@pytest.mark.parametrize("factory", [fl.server.fed_adam, fl.server.fed_yogi,
                                     fl.server.fed_adagrad, fl.server.fed_avgm,
                                     fl.server.fed_sgd])
@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_non_positive_server_learning_rates_are_rejected(factory, lr):
    with pytest.raises(ValueError, match="learning_rate"):
        factory(lr)


def test_mismatched_pytrees_and_types_are_rejected():
    state = ALG.init(init_params())
    other = fl.algorithms.fed_avg(loss_fn).init(init_params())  # sgd state, not adam's
    with pytest.raises(ValueError, match="state"):
        fl.run_round(ALG, other, cohort(), KEY)
    wrong_shape = state._replace(params={"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="state"):
        fl.run_round(ALG, wrong_shape, cohort(), KEY)
    c = cohort()
    with pytest.raises(ValueError, match="cohort"):
        fl.run_round(ALG, state, c._replace(weights=jnp.ones(3)), KEY)
    with pytest.raises(ValueError, match="mask"):
        fl.run_round(ALG, state, c._replace(batches={"x": c.batches["x"]}), KEY)
    with pytest.raises(TypeError, match="key"):
        fl.run_round(ALG, state, c, 0)
    with pytest.raises(TypeError, match="client_map"):
        fl.run_round(ALG, state, c, KEY, client_map="vmap")
    with pytest.raises(TypeError, match="client_optimizer"):
        fl.algorithms.fed_avg(loss_fn, client_optimizer=0.1)
    with pytest.raises(ValueError, match="size"):
        fl.maps.chunked(0)


def test_loss_fn_that_is_not_scalar_is_rejected_before_compiling():
    bad = fl.algorithms.fed_avg(lambda p, b, k: b["x"] @ p["w"], client_optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="loss_fn"):
        fl.run_round(bad, bad.init(init_params()), cohort(), KEY)
