"""Stateful models (BatchNorm): statistics through local training, FedAvg, FedBN and evaluation.

Every expected value is computed independently: by NumPy from the params (a hand forward pass,
the BatchNorm update rule ``s <- 0.99 s + 0.01 batch_stat``), or by running the same local
training outside the round and averaging it with NumPy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_lab as fl
from fedjax_lab.algorithms import partial as partial_lib

KEY = jax.random.key(0)
MOMENTUM, EPS = 0.99, 1e-5  # flax.linen.BatchNorm's defaults, used by fl.models.mlp
LR = 0.1


def _model():
    return fl.models.mlp((3,), hidden=(4,), num_classes=2, batch_norm=True)


# One model, loss and jitted local training shared by the tests, always fed [2 steps, 5] client
# batches, so that each program compiles once for the whole file.
MODEL = _model()
LOSS = fl.models.classification_loss(MODEL)
TRAIN = jax.jit(fl.kit.local_training(LOSS, optax.sgd(LR)))
STEPS, BATCH = 2, 5
V0 = jax.jit(MODEL.init)(KEY)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _hidden_pre_bn(params, x):
    p = params["params"]["Dense_0"]
    return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(
        p["bias"], np.float64
    )


def _hand_eval_logits(variables, x):
    """The BatchNorm MLP in evaluation mode, by NumPy: normalised by the running statistics."""
    p, s = variables["params"], variables["batch_stats"]["BatchNorm_0"]
    h = _hidden_pre_bn(variables, x)
    bn = p["BatchNorm_0"]
    h = (h - np.asarray(s["mean"])) / np.sqrt(np.asarray(s["var"]) + EPS)
    h = np.maximum(h * np.asarray(bn["scale"]) + np.asarray(bn["bias"]), 0.0)
    return h @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(p["Dense_1"]["bias"])


def _hand_stats(stats, h, real=None):
    """One BatchNorm update of the running statistics from pre-BN activations ``h`` [B, F]."""
    h = h if real is None else h[np.asarray(real) > 0]
    mean, var = h.mean(0), h.var(0)
    return (MOMENTUM * np.asarray(stats["mean"]) + (1 - MOMENTUM) * mean,
            MOMENTUM * np.asarray(stats["var"]) + (1 - MOMENTUM) * var)


def _batches(num_clients, steps, batch, seed=0):
    rng = np.random.default_rng(seed)
    # Each client's features have their own shift and scale (the non-IID features FedBN targets).
    shift = rng.normal(size=(num_clients, 1, 1, 3)) * 2.0
    scale = rng.uniform(0.5, 2.0, size=(num_clients, 1, 1, 3))
    x = rng.normal(size=(num_clients, steps, batch, 3)) * scale + shift
    y = rng.integers(0, 2, size=(num_clients, steps, batch))
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32),
            "mask": jnp.ones((num_clients, steps, batch), jnp.float32)}


def _client(batches, i):
    return jax.tree.map(lambda a: a[i], batches)


def test_local_training_threads_the_statistics_and_steps_only_the_trainable_params():
    loss = LOSS
    assert callable(loss.with_state)
    v0 = V0
    b = _client(_batches(1, STEPS, BATCH), 0)
    # Weight decay would move the statistics if they were stepped: they must be replaced.
    opt = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(LR))
    train = jax.jit(fl.kit.local_training(loss, opt))
    one = train(v0, b, KEY, max_steps=jnp.int32(1)).params  # only the first step runs
    # Step 1 by hand: the statistics of batch 0 under v0; trainable params: one SGD step on the
    # plain loss's gradient (+ decay); nothing else changes.
    want_mean, want_var = _hand_stats(v0["batch_stats"]["BatchNorm_0"],
                                      _hidden_pre_bn(v0, b["x"][0]))
    got = one["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["var"], want_var, rtol=1e-5, atol=1e-7)
    g = jax.jit(jax.grad(lambda p: loss({**v0, "params": p}, jax.tree.map(lambda a: a[0], b),
                                        KEY)))(v0["params"])
    want_params = jax.tree.map(lambda p, d: p - LR * (d + 0.5 * p), v0["params"], g)
    for a, w in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
    # Step 2 starts from step 1's statistics and normalises with step 2's batch (new params).
    two = train(v0, b, KEY, max_steps=jnp.int32(2)).params
    want_mean, want_var = _hand_stats(one["batch_stats"]["BatchNorm_0"],
                                      _hidden_pre_bn(one, b["x"][1]))
    got = two["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], want_var, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["mean"], v0["batch_stats"]["BatchNorm_0"]["mean"])


def test_padding_stays_out_of_the_batch_statistics():
    v0 = V0
    b = _client(_batches(1, STEPS, BATCH), 0)
    real = np.array([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0] * BATCH], np.float32)  # step 2: empty
    padded = dict(b, mask=jnp.asarray(real), x=b["x"].at[0, 2].set(1e3))  # a wild pad row
    out = TRAIN(v0, padded, KEY).params
    want_mean, want_var = _hand_stats(v0["batch_stats"]["BatchNorm_0"],
                                      _hidden_pre_bn(v0, padded["x"][0]), real[0])
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], want_mean, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], want_var, rtol=1e-5,
                               atol=1e-7)


def test_evaluation_uses_the_running_statistics():
    model = MODEL
    v = jax.tree.map(jnp.copy, V0)
    rng = np.random.default_rng(3)
    v["batch_stats"]["BatchNorm_0"] = {"mean": jnp.asarray(rng.normal(size=4), jnp.float32),
                                       "var": jnp.asarray(rng.uniform(0.5, 3, 4), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 1, 0, 1, 0])
    want = _hand_eval_logits(v, x)
    np.testing.assert_allclose(jax.jit(model.apply)(v, x), want, rtol=1e-5, atol=1e-5)
    train_logits = jax.jit(lambda v, x: model.apply(v, x, train=True))(v, x)  # batch stats
    assert not np.allclose(train_logits, want, atol=1e-3)
    m = jax.jit(fl.models.classification_metrics(model))(v, {"x": x, "y": y,
                                                             "mask": jnp.ones(6)})
    shifted = want - want.max(-1, keepdims=True)
    ce = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(6), np.asarray(y)]
    np.testing.assert_allclose(float(m["loss_sum"]), ce.sum(), rtol=1e-5)
    assert float(m["num_correct"]) == float(np.sum(want.argmax(-1) == np.asarray(y)))


def test_fedavg_new_statistics_are_the_weighted_mean_of_the_clients():
    v0 = V0
    batches = _batches(3, STEPS, BATCH)
    weights = jnp.array([1.0, 2.0, 5.0])
    alg = fl.algorithms.fed_avg(LOSS, optax.sgd(LR))
    state, _ = fl.run_round(alg, alg.init(v0), fl.Cohort(batches, weights, jnp.arange(3)),
                            jax.random.key(1))
    # No dropout: the key plays no part in the clients' training.
    clients = [_np(TRAIN(v0, _client(batches, i), KEY).params) for i in range(3)]
    p = np.asarray(weights) / float(weights.sum())
    stats = [c["batch_stats"]["BatchNorm_0"]["mean"] for c in clients]
    assert not np.allclose(stats[0], stats[1])  # the clients really differ
    want = jax.tree.map(lambda *xs: sum(pi * x for pi, x in zip(p, xs, strict=True)), *clients)
    for got, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)


def test_fedbn_keeps_batch_norm_on_the_clients_and_averages_the_rest():
    model = MODEL
    v0 = V0
    mask = fl.algorithms.batch_norm_mask(v0)
    assert sorted(jax.tree_util.keystr(k) for k, m in
                  jax.tree_util.tree_leaves_with_path(mask) if not m) == [
        "['batch_stats']['BatchNorm_0']['mean']", "['batch_stats']['BatchNorm_0']['var']",
        "['params']['BatchNorm_0']['bias']", "['params']['BatchNorm_0']['scale']"]
    alg = fl.algorithms.fed_bn(LOSS, optax.sgd(LR))
    batches = _batches(3, STEPS, BATCH, seed=1)
    ids, weights = jnp.array([0, 2, 3]), jnp.array([3.0, 1.0, 2.0])
    state = alg.init(v0, num_clients=4)
    for rnd in range(2):  # round 2 starts each client from its own BatchNorm state
        start = [partial_lib.merge(state.params, [np.asarray(s[c]) for s in state.client_states],
                                   mask) for c in np.asarray(ids)]
        clients = [_np(TRAIN(start[i], _client(batches, i), KEY).params) for i in range(3)]
        before = state
        state, _ = fl.run_round(alg, state, fl.Cohort(batches, weights, ids),
                                jax.random.key(rnd))
        glob_new, loc_new = partial_lib.split(state.params, mask)
        glob_v0, loc_v0 = partial_lib.split(v0, mask)
        for a, b in zip(loc_new, loc_v0, strict=True):  # the server's BN entries never move
            np.testing.assert_array_equal(a, b)
        p = np.asarray(weights) / float(weights.sum())
        for j, g in enumerate(glob_new):  # non-BN: the weighted mean of the clients' results
            want = sum(pi * partial_lib.split(c, mask)[0][j] for pi, c in zip(p, clients,
                                                                               strict=True))
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
        for i, c in enumerate(np.asarray(ids)):  # each client's BN state: its own training
            for s, w in zip(state.client_states, partial_lib.split(clients[i], mask)[1],
                            strict=True):
                np.testing.assert_allclose(s[c], w, rtol=1e-5, atol=1e-6)
        for s, s_before in zip(state.client_states, before.client_states, strict=True):
            np.testing.assert_array_equal(s[1], s_before[1])  # client 1 sat out
    # Per-client models: the global body with each client's own BatchNorm layers.
    personal = partial_lib.personal_params(state, global_mask=fl.algorithms.batch_norm_mask)
    mean = personal["batch_stats"]["BatchNorm_0"]["mean"]
    np.testing.assert_array_equal(mean[2], state.client_states[0][2])
    assert not np.allclose(mean[0], mean[2])
    x = batches["x"][1, 0]
    np.testing.assert_allclose(jax.jit(model.apply)(jax.tree.map(lambda a: a[2], personal), x),
                               _hand_eval_logits(jax.tree.map(lambda a: a[2], personal), x),
                               rtol=1e-5, atol=1e-5)


def test_fedbn_without_batch_norm_is_fedavg_and_bad_inputs_are_refused():
    model = fl.models.mlp((3,), hidden=(4,), num_classes=2)
    assert model.train_apply is None
    loss = fl.models.classification_loss(model)
    assert not hasattr(loss, "with_state")
    params = jax.jit(model.init)(KEY)
    batches = _batches(2, 1, 2)
    cohort = fl.Cohort(batches, jnp.array([1.0, 3.0]), jnp.arange(2))
    bn, avg = fl.algorithms.fed_bn(loss, optax.sgd(LR)), fl.algorithms.fed_avg(loss, optax.sgd(LR))
    s_bn, _ = fl.run_round(bn, bn.init(params, num_clients=2), cohort, KEY)
    s_avg, _ = fl.run_round(avg, avg.init(params), cohort, KEY)
    assert s_bn.client_states == ()
    for a, b in zip(jax.tree.leaves(s_bn.params), jax.tree.leaves(s_avg.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        fl.algorithms.batch_norm_mask(params)
    with pytest.raises(ValueError, match="local_keys"):
        fl.algorithms.fed_bn(loss, local_keys=3)
    with pytest.raises(ValueError, match="batch_norm"):
        fl.models.mlp((3,), hidden=(), batch_norm=True)
    with pytest.raises(TypeError, match="batch_norm"):
        fl.models.mlp((3,), batch_norm="yes")
    v = MODEL.init(KEY)
    with pytest.raises(ValueError, match=r"model\.init"):
        MODEL.apply(v["params"], jnp.ones((2, 3)))


class _LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(3)(x))
        return nn.Dense(2)(nn.relu(x))


class _NNXBN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, momentum=0.9, rngs=rngs)
        self.l2 = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


@pytest.mark.parametrize("make", [lambda: fl.models.from_flax(_LinenBN(), jnp.zeros((1, 3))),
                                  lambda: fl.models.from_nnx(_NNXBN)], ids=["linen", "nnx"])
def test_from_flax_and_from_nnx_carry_batch_norm_statistics(make):
    model = make()
    assert model.train_apply is not None
    v0 = jax.jit(model.init)(KEY)
    assert sorted(v0) == ["batch_stats", "params"]
    b = _client(_batches(1, 1, 6, seed=4), 0)
    loss = fl.models.classification_loss(model)
    out = jax.jit(fl.kit.local_training(loss, optax.sgd(LR)))(v0, b, KEY).params
    # The statistics after one step are 0.9 * initial + 0.1 * the batch's, computed here by
    # running the pre-BN layer by hand on the initial params.
    # Leaves sort as BatchNorm (bias, scale), first dense (bias, kernel), last dense, in both.
    def get(params, name, i):
        hits = [np.asarray(a) for k, a in jax.tree_util.tree_leaves_with_path(params)
                if name in jax.tree_util.keystr(k)]
        return hits[i]

    h = np.asarray(b["x"][0], np.float64) @ get(v0["params"], "kernel", 0) + get(
        v0["params"], "bias", 1)
    stats = sorted(jax.tree_util.tree_leaves_with_path(out["batch_stats"]),
                   key=lambda kv: jax.tree_util.keystr(kv[0]))
    (_, mean), (_, var) = stats  # "mean" sorts before "var"
    np.testing.assert_allclose(mean, 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, 0.9 + 0.1 * h.var(0), rtol=1e-5, atol=1e-6)
    # Evaluation normalises with those running statistics: equal to a hand apply.
    x = b["x"][0]
    p = out["params"]
    hh = np.asarray(x) @ get(p, "kernel", 0) + get(p, "bias", 1)
    hh = (hh - np.asarray(mean)) / np.sqrt(np.asarray(var) + EPS)
    hh = np.maximum(hh * get(p, "scale", 0) + get(p, "bias", 0), 0)
    want = hh @ get(p, "kernel", 1) + get(p, "bias", 2)
    np.testing.assert_allclose(jax.jit(model.apply)(out, x), want, rtol=1e-4, atol=1e-5)
