"""Personalised evaluation, Ditto, pFedMe, FedRep/FedPer, Per-FedAvg and q-FFL."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn, population

import fedjax_lab as fl
import fedjax_lab.algorithms.ditto
import fedjax_lab.algorithms.partial
import fedjax_lab.algorithms.pfedme
from fedjax_lab.algorithms.perfedavg import per_fedavg
from fedjax_lab.algorithms.qffl import q_fedavg, qffl_terms
from fedjax_lab.personalization import evaluate_personalized, fine_tune_evaluate, stack_clients

# The package re-exports functions under the module names, so take the modules themselves.
ditto_lib = sys.modules["fedjax_lab.algorithms.ditto"]
partial_lib = sys.modules["fedjax_lab.algorithms.partial"]
pfedme_lib = sys.modules["fedjax_lab.algorithms.pfedme"]

KEY = jax.random.key(0)
MODEL = fl.models.logistic_regression((4,), 3)
EVAL_FN = fl.models.classification_metrics(MODEL)
MODEL_LOSS = fl.models.classification_loss(MODEL)


def _params_distance(a, b):
    return float(optax.tree.norm(optax.tree.sub(a, b)))


# ----------------------------------------------------------------------------- evaluation


def test_fine_tune_evaluate_equals_full_batch_gd_per_client():
    n, steps, lr = 6, 3, 0.5
    train = population(sizes=(n,) * 5, seed=1)
    test = population(sizes=(4, 2, 5, 3, 1), seed=2)
    params = MODEL.init(jax.random.key(3))
    out = fine_tune_evaluate(
        MODEL_LOSS, EVAL_FN, optax.sgd(lr), params, train, test, steps=steps, batch_size=n
    )
    grad = jax.jit(jax.grad(MODEL_LOSS))
    for i in range(5):
        batch = dict(train.client(i), mask=jnp.ones(n))
        p = params
        for _ in range(steps):  # a batch of the client's whole data = full-batch GD
            p = optax.apply_updates(p, jax.tree.map(lambda g: -lr * g, grad(p, batch, KEY)))
        ref = fl.evaluate(EVAL_FN, p, test.select_clients([i]))
        glob = fl.evaluate(EVAL_FN, params, test.select_clients([i]))
        np.testing.assert_allclose(
            out["personalized"]["client_loss"][i], ref["client_loss"][0], rtol=1e-4
        )
        np.testing.assert_allclose(
            out["global"]["client_loss"][i], glob["client_loss"][0], rtol=1e-4
        )
    acc = out["personalized"]["client_accuracy"]
    assert out["personalized_accuracy_mean"] == pytest.approx(acc.mean())
    assert out["personalized_accuracy_p10"] == pytest.approx(np.percentile(acc, 10))


def test_evaluate_personalized_matches_per_client_evaluate():
    test = population(sizes=(4, 7, 1, 3), seed=4)
    params = MODEL.init(jax.random.key(0))
    personal = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(1), 4))
    out = evaluate_personalized(EVAL_FN, params, personal, test, batch_size=3)
    for i in range(4):
        ref = fl.evaluate(
            EVAL_FN, jax.tree.map(lambda a, i=i: a[i], personal), test.select_clients([i])
        )
        np.testing.assert_allclose(
            out["personalized"]["client_loss"][i], ref["client_loss"][0], rtol=1e-5
        )
    same = evaluate_personalized(EVAL_FN, params, stack_clients(params, 4), test)
    np.testing.assert_allclose(
        same["global"]["client_loss"], same["personalized"]["client_loss"], rtol=1e-6
    )
    with pytest.raises(ValueError, match="personal_params"):
        evaluate_personalized(EVAL_FN, params, stack_clients(params, 3), test)


# ----------------------------------------------------------------------------- Ditto


def _one_client_rounds(alg, rounds=2, num_clients=3, client=1, steps=3):
    ch = cohort(num_clients=1, steps=steps)
    ch = ch._replace(client_ids=jnp.array([client], jnp.int32))
    state = alg.init(init_params(), num_clients=num_clients)
    for _ in range(rounds):
        state, _ = fl.run_round(alg, state, ch, KEY, client_map=fl.maps.sequential())
    return state


def test_ditto_global_model_is_fedavg():
    ch = cohort(num_clients=3)
    alg = ditto_lib.ditto(loss_fn, optax.sgd(0.1), lam=0.5)
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    got, _ = fl.run_round(alg, alg.init(init_params(), num_clients=5), ch, KEY)
    want, _ = fl.run_round(ref, ref.init(init_params()), ch, KEY)
    assert_trees_close(got.params, want.params)
    # clients 3 and 4 did not take part: their personal models are untouched
    untouched = jax.tree.map(lambda a: a[3:], got.client_states)
    assert_trees_close(untouched, stack_clients(init_params(), 2))


def test_ditto_lambda_pulls_personal_to_global():
    def dist(lam):
        alg = ditto_lib.ditto(loss_fn, optax.sgd(0.1), lam=lam, personal_optimizer=optax.sgd(0.02))
        ch = cohort(num_clients=3, steps=4)
        state = alg.init(init_params(), num_clients=3)
        for _ in range(3):
            anchor = state.params  # the personal models are pulled to the round's start model
            state, _ = fl.run_round(alg, state, ch, KEY, client_map=fl.maps.sequential())
        v = ditto_lib.personal_params(state)
        return float(
            np.mean(
                [_params_distance(jax.tree.map(lambda a, i=i: a[i], v), anchor) for i in range(3)]
            )
        )

    d0, d5, d50 = dist(0.0), dist(5.0), dist(50.0)  # η_p λ = 1 at λ = 50
    assert d50 < d5 < d0
    assert d50 < 0.2 * d0 and d50 < 0.05  # fixed point: ||v - w|| ≈ ||∇F(v)|| / λ


def test_ditto_lambda_zero_is_local_training():
    # one client, server lr 1: the new global model IS that client's FedAvg model; with λ = 0 and
    # the same start, batches and optimiser, its personal model after round 1 is the same.
    alg = ditto_lib.ditto(loss_fn, optax.sgd(0.1), lam=0.0)
    state = _one_client_rounds(alg, rounds=1)
    assert_trees_close(jax.tree.map(lambda a: a[1], state.client_states), state.params)


# ----------------------------------------------------------------------------- pFedMe


def _lsq_loss(p, batch, key):
    del key
    r = batch["x"] @ p - batch["y"]
    return jnp.sum(batch["mask"] * r * r) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def _lsq_grad(p, x, y):
    return 2.0 * x.T @ (x @ p - y) / x.shape[0]


def test_pfedme_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    c, s, b, d = 3, 2, 4, 3
    x = rng.normal(size=(c, s, b, d)).astype(np.float32)
    y = rng.normal(size=(c, s, b)).astype(np.float32)
    weights = np.array([4.0, 8.0, 2.0], np.float32)
    ch = fl.Cohort(
        {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.ones((c, s, b))},
        jnp.asarray(weights),
        jnp.arange(c, dtype=jnp.int32),
    )
    lam, k, plr, eta, beta = 2.0, 3, 0.05, 0.1, 1.5
    alg = pfedme_lib.pfedme(
        _lsq_loss, optax.sgd(eta), lam=lam, inner_steps=k, personal_learning_rate=plr,
        server_learning_rate=beta,
    )
    w0 = np.array([0.1, -0.2, 0.3], np.float32)
    state, _ = fl.run_round(alg, alg.init(jnp.asarray(w0), num_clients=c), ch, KEY)
    deltas, thetas = [], []
    for i in range(c):
        w = w0.astype(np.float64)
        for step in range(s):
            theta = w.copy()
            for _ in range(k):
                theta = theta - plr * (_lsq_grad(theta, x[i, step], y[i, step]) + lam * (theta - w))
            w = w - eta * lam * (w - theta)
        deltas.append(w0 - w)
        thetas.append(theta)
    p = weights / weights.sum()
    np.testing.assert_allclose(
        np.asarray(state.params), w0 - beta * (p @ np.array(deltas)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(pfedme_lib.personal_params(state)), np.array(thetas), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------- FedRep / FedPer


@pytest.mark.parametrize("make", [partial_lib.fed_rep, partial_lib.fed_per], ids=["rep", "per"])
def test_local_leaves_are_never_averaged(make):
    alg = make(loss_fn, optax.sgd(0.1), local_keys="b")
    ch = cohort(num_clients=3)._replace(client_ids=jnp.array([0, 2, 4], jnp.int32))
    p0 = init_params()
    state = alg.init(p0, num_clients=6)
    for r in range(2):
        state, _ = fl.run_round(alg, state, ch, jax.random.key(r))
    np.testing.assert_array_equal(np.asarray(state.params["b"]), np.asarray(p0["b"]))
    assert _params_distance(state.params["w"], p0["w"]) > 1e-3
    (heads,) = state.client_states
    moved = np.abs(np.asarray(heads) - np.asarray(p0["b"])[None, :]).sum(1) > 1e-6
    np.testing.assert_array_equal(moved, [True, False, True, False, True, False])
    personal = partial_lib.personal_params(state, local_keys="b")
    np.testing.assert_array_equal(np.asarray(personal["b"]), np.asarray(heads))
    np.testing.assert_array_equal(np.asarray(personal["w"][5]), np.asarray(state.params["w"]))


def test_fedrep_head_phase_leaves_body_to_body_phase():
    """FedRep = head phase (body frozen), then body phase from the new head (loss ignores keys)."""
    from fedjax_lab.client import local_training

    ch = cohort(num_clients=1)
    p0 = init_params()
    alg = partial_lib.fed_rep(loss_fn, optax.sgd(0.1), head_epochs=2, local_keys="b")
    state, _ = fl.run_round(alg, alg.init(p0, num_clients=1), ch, KEY)
    batches = jax.tree.map(lambda a: a[0], ch.batches)
    twice = jax.tree.map(lambda a: jnp.concatenate([a, a]), batches)
    head = local_training(lambda b_, bt, k: loss_fn({"w": p0["w"], "b": b_}, bt, k), optax.sgd(0.1))
    new_b = head(p0["b"], twice, KEY).params
    body = local_training(lambda w_, bt, k: loss_fn({"w": w_, "b": new_b}, bt, k), optax.sgd(0.1))
    new_w = body(p0["w"], batches, KEY).params
    np.testing.assert_allclose(
        np.asarray(state.client_states[0][0]), np.asarray(new_b), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(state.params["w"]), np.asarray(new_w), rtol=1e-5, atol=1e-6
    )


def test_partial_mask_validation():
    with pytest.raises(ValueError, match="global_mask"):
        partial_lib.fed_rep(loss_fn).init({"w": jnp.ones(2)}, num_clients=2)
    with pytest.raises(ValueError, match="global_mask"):
        partial_lib.resolve_global_mask(init_params(), {"w": True, "b": True})
    mask = partial_lib.resolve_global_mask({"Dense_2": 0, "Dense_10": 0, "Dense_1": 0})
    assert mask == {"Dense_1": True, "Dense_2": True, "Dense_10": False}


# ----------------------------------------------------------------------------- Per-FedAvg


def test_perfedavg_alpha_zero_is_fedavg_on_second_halves():
    ch = cohort(num_clients=3, steps=2, batch=4)
    alg = per_fedavg(loss_fn, optax.sgd(0.2), alpha=0.0)
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.2))
    halves = ch._replace(batches=jax.tree.map(lambda a: a[:, :, 2:], ch.batches))
    got, _ = fl.run_round(alg, alg.init(init_params()), ch, KEY)
    want, _ = fl.run_round(ref, ref.init(init_params()), halves, KEY)
    assert_trees_close(got.params, want.params)


def test_perfedavg_alpha_changes_the_update():
    ch = cohort(num_clients=2, steps=2, batch=4)
    a0 = per_fedavg(loss_fn, optax.sgd(0.2), alpha=0.0)
    a1 = per_fedavg(loss_fn, optax.sgd(0.2), alpha=0.5)
    s0, _ = fl.run_round(a0, a0.init(init_params()), ch, KEY)
    s1, _ = fl.run_round(a1, a1.init(init_params()), ch, KEY)
    assert _params_distance(s0.params, s1.params) > 1e-4


# ----------------------------------------------------------------------------- q-FFL


def test_qffl_terms_match_numpy():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=5).astype(np.float32)
    for f, q, lip in [(0.7, 0.0, 10.0), (2.3, 1.0, 10.0), (0.4, 5.0, 20.0)]:
        d, h = qffl_terms(jnp.asarray(f), jnp.asarray(delta), q, lip)
        dw = lip * delta
        np.testing.assert_allclose(np.asarray(d), f**q * dw, rtol=1e-5)
        np.testing.assert_allclose(float(h), q * f ** (q - 1) * dw @ dw + lip * f**q, rtol=1e-5)


def test_qffl_q_zero_is_uniform_fedavg():
    ch = cohort(num_clients=4)  # equal weights: FedAvg's weighted mean is the uniform mean
    alg = q_fedavg(loss_fn, optax.sgd(0.1), q=0.0, lipschitz=10.0)
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    got, _ = fl.run_round(alg, alg.init(init_params()), ch, KEY)
    want, _ = fl.run_round(ref, ref.init(init_params()), ch, KEY)
    assert_trees_close(got.params, want.params, rtol=1e-4, atol=1e-6)


def test_qffl_larger_q_helps_the_worst_clients():
    """8 clients share one labelling, 2 have the opposite one: larger q lowers the worst loss."""
    rng = np.random.default_rng(0)
    clients = []
    for i in range(10):
        x = rng.normal(size=(20, 4)).astype(np.float32)
        s = (x[:, 0] > 0).astype(np.int32)
        y = s if i < 8 else 1 - s
        clients.append({"x": x, "y": y.astype(np.int32)})
    data = fl.FederatedData.from_client_arrays(clients)
    model = fl.models.logistic_regression((4,), 2)
    lossf, evalf = fl.models.classification_loss(model), fl.models.classification_metrics(model)
    worst = {}
    for q in (0.0, 5.0):
        alg = q_fedavg(lossf, optax.sgd(0.1), q=q, lipschitz=10.0)
        state, _ = fl.run_rounds(
            alg,
            alg.init(model.init(KEY)),
            data,
            KEY,
            num_rounds=30,
            cohort_size=10,
            batch_size=10,
            client_map=fl.maps.sequential(),
        )
        worst[q] = float(np.max(fl.evaluate(evalf, state.params, data)["client_loss"]))
    assert worst[5.0] < worst[0.0] - 0.02


def test_qffl_needs_lipschitz_with_custom_optimizer():
    with pytest.raises(ValueError, match="lipschitz"):
        q_fedavg(loss_fn, optax.sgd(0.05))


# ----------------------------------------------------------------------------- maps agree


_ALGS = {
    "ditto": (lambda: ditto_lib.ditto(loss_fn, optax.sgd(0.1), lam=0.5), True),
    "pfedme": (lambda: pfedme_lib.pfedme(loss_fn, optax.sgd(0.02), inner_steps=2), True),
    "fedrep": (
        lambda: partial_lib.fed_rep(loss_fn, optax.sgd(0.1), head_epochs=2, local_keys="b"),
        True,
    ),
    "fedper": (lambda: partial_lib.fed_per(loss_fn, optax.sgd(0.1), local_keys="b"), True),
    "perfedavg": (lambda: per_fedavg(loss_fn, optax.sgd(0.1), alpha=0.05), False),
    "qffl": (lambda: q_fedavg(loss_fn, optax.sgd(0.1), q=1.0, lipschitz=10.0), False),
}


@pytest.mark.parametrize("name", sorted(_ALGS))
def test_sequential_equals_vmap(name):
    make, per_client = _ALGS[name]
    alg = make()
    ch = cohort(num_clients=3, batch=4)._replace(client_ids=jnp.array([4, 1, 2], jnp.int32))
    outs = []
    for cmap in (fl.maps.sequential(), fl.maps.vmap()):
        state = alg.init(init_params(), num_clients=6) if per_client else alg.init(init_params())
        for r in range(2):
            state, _ = fl.run_round(alg, state, ch, jax.random.key(r), client_map=cmap)
        outs.append(state)
    assert_trees_close(outs[0].params, outs[1].params, rtol=1e-4, atol=1e-6)
    assert_trees_close(outs[0].client_states, outs[1].client_states, rtol=1e-4, atol=1e-6)
    assert int(outs[0].round) == 2


def test_registry_names():
    import fedjax_lab.algorithms.fedau  # noqa: F401
    import fedjax_lab.algorithms.feddisco  # noqa: F401
    from fedjax_lab.algorithms._registry import REGISTRY

    for name in ("fedau", "feddisco", "ditto", "pfedme", "fedrep", "fedper", "perfedavg", "qffl"):
        assert name in REGISTRY


def test_default_head_is_the_output_layer_of_a_char_lstm():
    """Flax sorts top-level names; the head is the last Dense entry, not the LSTM cell."""
    model = fl.models.char_lstm(vocab_size=5, embed=2, hidden=3, num_layers=1)
    mask = partial_lib.resolve_global_mask(model.init(jax.random.key(0)))
    assert not any(jax.tree.leaves(mask["Dense_0"]))
    assert all(jax.tree.leaves(mask["OptimizedLSTMCell_0"])) and all(
        jax.tree.leaves(mask["Embed_0"])
    )
