"""Federated LoRA (FedIT / FedEx-LoRA) and the char transformer, checked against NumPy.

Tiny problem: a 1-layer transformer (vocab 20, 8 positions, width 16, 2 heads), 3 clients of
4 synthetic windows each, 2 full-batch local SGD steps. The clients' trained adapters are
recomputed here by hand (``jax.grad`` of the loss in the adapters, plain gradient steps), and
the server's aggregation, the FedEx-LoRA residual and FedAdam are written out in NumPy.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab import experiment as exp_lib

V, T, C, S, B = 20, 8, 3, 2, 4
RANK, ALPHA, LR, TARGET = 2, 4.0, 0.5, "attention|dense"
SCALE = ALPHA / RANK
WEIGHTS = np.array([3.0, 1.0, 2.0], np.float32)
CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "lora_shakespeare.toml"


@pytest.fixture(scope="module")
def problem():
    model = fl.models.char_transformer(vocab_size=V, max_len=T, d_model=16, num_heads=2,
                                       num_layers=1, mlp_dim=32)
    params = jax.jit(model.init)(jax.random.key(0))
    loss = fl.models.classification_loss(model, pad_id=0)
    rng = np.random.default_rng(0)
    x = rng.integers(1, V, size=(C, B, T)).astype(np.int32)
    y = rng.integers(1, V, size=(C, B, T)).astype(np.int32)
    # full-batch local steps: every step of a client sees all of its 4 windows
    batches = {"x": np.repeat(x[:, None], S, 1), "y": np.repeat(y[:, None], S, 1),
               "mask": np.ones((C, S, B), np.float32)}
    cohort = fl.Cohort(jax.tree.map(jnp.asarray, batches), jnp.asarray(WEIGHTS),
                       jnp.arange(C, dtype=jnp.int32))
    return model, params, loss, cohort, (x, y), jax.jit(model.apply)


def make(loss, **kw):
    return fl.algorithms.fed_lora(loss, optax.sgd(LR), rank=RANK, alpha=ALPHA, target=TARGET,
                                  **kw)


@pytest.fixture(scope="module")
def separate(problem):
    _, params, loss, cohort, _, _ = problem
    alg = make(loss)
    state0 = alg.init(params)
    states = [state0]
    for _ in range(3):
        states.append(fl.run_round(alg, states[-1], cohort, jax.random.key(1),
                                   client_map=fl.maps.sequential())[0])
    return alg, states


@pytest.fixture(scope="module")
def client_adapters(problem, separate):
    """Each client's adapters after S plain gradient steps from the server's (by hand)."""
    model, params, loss, _, (x, y), _ = problem
    start = separate[1][0].extra.adapters

    @jax.jit
    def step(ad, xb, yb):
        def f(a):
            merged = fl.models.lora_merge(params, a, rank=RANK, alpha=ALPHA, target=TARGET)
            return loss(merged, {"x": xb, "y": yb, "mask": jnp.ones(B)}, jax.random.key(0))

        return jax.tree.map(lambda p, g: p - LR * g, ad, jax.grad(f)(ad))

    out = []
    for i in range(C):
        ad = start
        for _ in range(S):
            ad = step(ad, x[i], y[i])
        out.append(jax.tree.map(np.asarray, ad))
    return out


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _kernels(params):
    mask = fl.models.lora_mask(params, TARGET)
    return [np.asarray(x, np.float64)
            for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]


def test_transformer_is_causal(problem):
    _, params, _, _, (x, _), apply = problem
    changed = x[0].copy()
    changed[:, 5] = (changed[:, 5] % (V - 1)) + 1  # a different token at position 5
    a, b = np.asarray(apply(params, x[0])), np.asarray(apply(params, changed))
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4  # the change is seen from position 5 on


def test_transformer_options_are_checked():
    with pytest.raises(ValueError, match="num_heads: must divide d_model=16"):
        fl.models.char_transformer(d_model=16, num_heads=3)
    with pytest.raises(ValueError, match="mlp_dim"):
        fl.models.char_transformer(mlp_dim=0)
    model = fl.models.char_transformer(vocab_size=V, max_len=4, d_model=8, num_heads=2,
                                       num_layers=1, mlp_dim=8)
    with pytest.raises(ValueError, match="max_len=4 .* build it with max_len >= 6"):
        jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0)),
                                           jnp.zeros((1, 6), jnp.int32)))


def test_zero_b_init_gives_the_base_model_output(problem, separate):
    model, params, _, _, (x, _), apply = problem
    lora = fl.models.lora_model(model, rank=RANK, alpha=ALPHA, target=TARGET,
                                base_params=params)
    lp = lora.init(jax.random.key(3))
    assert all(float(jnp.abs(ad["b"]).max()) == 0.0 for ad in lp["lora"])
    assert all(float(jnp.abs(ad["a"]).max()) > 0.0 for ad in lp["lora"])
    merged = fl.models.lora_merge(lp["base"], lp["lora"], rank=RANK, alpha=ALPHA, target=TARGET)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # W + s A 0 = W exactly
    np.testing.assert_allclose(np.asarray(jax.jit(lora.apply)(lp, x[0])),
                               np.asarray(apply(params, x[0])), rtol=0, atol=1e-6)
    # the algorithm's global model at round 0 is the base itself
    for a, b in zip(jax.tree.leaves(separate[1][0].params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_separate_never_moves_the_frozen_base(problem, separate):
    _, params, _, _, _, _ = problem
    _, states = separate
    mask = jax.tree.leaves(fl.models.lora_mask(params, TARGET))
    assert sum(mask) == 6  # query, key, value, out, dense_in, dense_out
    w0 = _kernels(params)
    for st in states[1:]:
        for a, b in zip(st.extra.base, w0, strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float64), b)  # bit for bit
        for a, b, m in zip(jax.tree.leaves(st.params), jax.tree.leaves(params), mask,
                           strict=True):
            if not m:  # embeddings, positions, LayerNorms, biases, head: frozen
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [np.abs(a - b).max() for a, b in zip(_kernels(states[-1].params), w0, strict=True)]
    assert min(moved) > 0  # every adapted kernel of the global model did move


def test_uplink_is_the_adapters_only(problem, separate, client_adapters):
    _, params, _, cohort, _, _ = problem
    alg, states = separate
    state = states[0]
    client = fl.ClientInput(jax.tree.map(lambda a: a[0], cohort.batches), cohort.weights[0],
                            jnp.int32(0), ())
    out = jax.eval_shape(alg.client_update, state, client, jax.random.key(2))
    # the uplink pytree is a tuple of {"a": [d_in, r], "b": [r, d_out]}: nothing else travels
    shapes = [(d["a"].shape, d["b"].shape) for d in out.update]
    assert shapes == [((k.shape[0], RANK), (RANK, k.shape[1])) for k in _kernels(params)]
    bits = fl.algorithms.lora_uplink_bits(params, rank=RANK, target=TARGET)
    sizes = sum(np.size(x) for x in jax.tree.leaves(client_adapters[0]))
    assert bits["lora_bits"] == 32 * sizes == 32 * sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(out.update))
    assert bits["full_bits"] == 32 * fl.models.num_params(params)
    assert bits["ratio"] < 0.25
    # a round's bits_sent: each of the C clients sent exactly its adapters
    _, metrics = fl.run_round(alg, state, cohort, jax.random.key(1),
                              client_map=fl.maps.sequential())
    assert float(metrics["bits_sent"]) == C * bits["lora_bits"]
    # a client's trained model differs from the server's at the adapted kernels only
    client_model = fl.models.lora_merge(params, jax.tree.map(jnp.asarray, client_adapters[0]),
                                        rank=RANK, alpha=ALPHA, target=TARGET)
    mask = jax.tree.leaves(fl.models.lora_mask(params, TARGET))
    for a, b, m in zip(jax.tree.leaves(client_model), jax.tree.leaves(state.params), mask,
                       strict=True):
        changed = np.abs(np.asarray(a) - np.asarray(b)).max()
        assert (changed > 0) if m else (changed == 0)


def _mean(trees, weights):
    p = weights / weights.sum()
    return jax.tree.map(lambda *xs: sum(pi * x for pi, x in zip(p, xs, strict=True)), *trees)


def test_separate_is_the_mean_of_a_and_the_mean_of_b(problem, separate, client_adapters):
    _, params, _, _, _, _ = problem
    state = separate[1][1]
    mean = _mean(_np(client_adapters), WEIGHTS.astype(np.float64))
    for got, want in zip(state.extra.adapters, mean, strict=True):
        np.testing.assert_allclose(np.asarray(got["a"]), want["a"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got["b"]), want["b"], rtol=1e-5, atol=1e-6)
    for got, w0, ad in zip(_kernels(state.params), _kernels(params), mean, strict=True):
        np.testing.assert_allclose(got, w0 + SCALE * ad["a"] @ ad["b"], rtol=1e-5, atol=1e-6)


def test_exact_global_model_is_the_average_client_model(problem, client_adapters):
    _, params, loss, cohort, _, _ = problem
    alg = make(loss, aggregation="exact")
    state, _ = fl.run_round(alg, alg.init(params), cohort, jax.random.key(1),
                            client_map=fl.maps.sequential())
    p = WEIGHTS.astype(np.float64) / WEIGHTS.sum()
    w0s = _kernels(params)
    clients = _np(client_adapters)
    for k, (got, w0) in enumerate(zip(_kernels(state.params), w0s, strict=True)):
        average = sum(pi * (w0 + SCALE * c[k]["a"] @ c[k]["b"])
                      for pi, c in zip(p, clients, strict=True))
        np.testing.assert_allclose(got, average, rtol=1e-5, atol=1e-6)
        a, b = (np.asarray(state.extra.adapters[k][f], np.float64) for f in ("a", "b"))
        np.testing.assert_allclose(np.asarray(state.extra.base[k]) + SCALE * a @ b, average,
                                   rtol=1e-5, atol=1e-6)
        # the factors' average misses the residual that moved the base
        residual = sum(pi * c[k]["a"] @ c[k]["b"] for pi, c in zip(p, clients, strict=True)) \
            - a @ b
        np.testing.assert_allclose(np.asarray(state.extra.base[k]) - w0, SCALE * residual,
                                   rtol=1e-4, atol=1e-7)
        assert np.abs(residual).max() > 1e-6  # separate averaging would not be exact here


def test_fedadam_over_adapters_is_numpy_adam(problem, client_adapters):
    """FedAdam on the adapters (with the exact rule: the residual still moves the base)."""
    _, params, loss, _, _, _ = problem
    lr, b1, b2, tau = 0.03, 0.9, 0.99, 1e-3
    alg = make(loss, aggregation="exact", server_optimizer=fl.server.fed_adam(lr, b1, b2, tau))
    state0 = alg.init(params)
    # the server half of a round (the client half is the one checked above): the algorithm's
    # own aggregator and server step on the clients' deltas A - A_i, B - B_i
    deltas = [optax.tree.sub(state0.extra.adapters, jax.tree.map(jnp.asarray, c))
              for c in client_adapters]

    @jax.jit
    def server_half(state, deltas, weights):
        agg = alg.aggregator
        parts = [agg.prepare(d, w, state.aggregator_state)
                 for d, w in zip(deltas, weights, strict=True)]
        summed = jax.tree.map(lambda *xs: sum(xs), *parts)
        aggregate, _, _ = agg.finalize(summed, state.aggregator_state, jax.random.key(0))
        return alg.server_update(state, aggregate, jax.random.key(0))

    state = server_half(state0, deltas, list(jnp.asarray(WEIGHTS)))
    start = _np(state0.extra.adapters)
    p = WEIGHTS.astype(np.float64)
    # Reddi et al. Algorithm 2, one step: Δ = mean_i(x_i - x), m = (1-b1)Δ, v = b2τ² + (1-b2)m²
    delta = jax.tree.map(lambda m, x: m - x, _mean(_np(client_adapters), p), start)
    m = jax.tree.map(lambda d: (1 - b1) * d, delta)
    v = jax.tree.map(lambda mm: b2 * tau**2 + (1 - b2) * mm**2, m)
    want = jax.tree.map(lambda x, mm, vv: x + lr * mm / (np.sqrt(vv) + tau), start, m, v)
    for got, w in zip(jax.tree.leaves(state.extra.adapters), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, atol=1e-6)
    # the optimiser's state covers the adapters only
    assert jax.tree.structure(state.opt_state.v) == jax.tree.structure(state0.extra.adapters)
    # base: W0 + s (Σ p A_i B_i - (Σ p A_i)(Σ p B_i)), whatever the server optimiser
    mean = _mean(_np(client_adapters), p)
    q = p / p.sum()
    for k, (got, w0) in enumerate(zip(state.extra.base, _kernels(params), strict=True)):
        products = sum(qi * c[k]["a"] @ c[k]["b"]
                       for qi, c in zip(q, _np(client_adapters), strict=True))
        residual = products - mean[k]["a"] @ mean[k]["b"]
        np.testing.assert_allclose(np.asarray(got, np.float64) - w0, SCALE * residual,
                                   rtol=1e-4, atol=1e-7)
    with_base = [np.asarray(b, np.float64) + SCALE * w["a"] @ w["b"]
                 for b, w in zip(state.extra.base, want, strict=True)]
    for got, w in zip(_kernels(state.params), with_base, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_argument_and_the_fix(problem):
    _, params, loss, _, _, _ = problem
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"rank: .* got .*; use e\.g\. rank=4"):
            fl.algorithms.fed_lora(loss, rank=rank)
    alg = fl.algorithms.fed_lora(loss, target="conv")
    with pytest.raises(ValueError, match=r"target: 'conv' matches no 2-D weight .*"
                                         r"\['block_0'\]\['attention'\]\['key'\]\['kernel'\]"
                                         r".*target=None"):
        alg.init(params)
    with pytest.raises(ValueError, match="target: '\\(' is not a regular expression"):
        fl.algorithms.fed_lora(loss, target="(")
    with pytest.raises(ValueError, match="aggregation: expected 'separate' .* or 'exact'"):
        fl.algorithms.fed_lora(loss, aggregation="mean")
    with pytest.raises(ValueError, match="alpha: .* finite number > 0"):
        fl.algorithms.fed_lora(loss, alpha=-1.0)
    with pytest.raises(ValueError, match="adapters: target 'attention' selects 4 kernels"):
        fl.models.lora_merge(params, (), rank=2, target="attention")


def test_shakespeare_config_builds_a_transformer_and_both_lora_rules():
    cfg = exp_lib.load_config(CONFIG)
    assert cfg["model"]["name"] == "char_transformer"
    names = [a["name"] for a in cfg["algorithms"]]
    assert "fedlora" in names and "fedavg" in names
    cfg["data"]["min_lines"] = 600  # the 24 largest roles: a quick build
    experiment = exp_lib.build(cfg)
    params = jax.eval_shape(experiment.model.init, jax.random.key(0))
    assert params["pos_embed"].shape[0] == experiment.train.examples["x"].shape[1]
    rules = set()
    for spec in cfg["algorithms"]:
        alg = experiment.algorithms[spec.get("label", spec["name"])]
        state = jax.eval_shape(lambda a=alg: a.init(experiment.model.init(jax.random.key(0))))
        if spec["name"] == "fedlora":
            rules.add(spec.get("aggregation", "separate"))
            assert len(state.extra.adapters) == 4 * cfg["model"]["num_layers"] + 2 * cfg[
                "model"]["num_layers"]
    assert rules == {"separate", "exact"}
    bad = exp_lib.load_config(CONFIG)
    bad["algorithms"][1]["rank"] = 0
    with pytest.raises(exp_lib.ConfigError, match="rank"):
        exp_lib.validate(bad)
