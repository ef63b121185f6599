"""APFL, IFCA and LG-FedAvg against NumPy transcriptions of the papers; per-client evaluation.

Every local step is full-batch (each of a client's ``S`` batches is its whole data), so the
NumPy transcription of each paper's update rule is exact up to float32 rounding.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn, population

import fedjax_lab as fl
import fedjax_lab.algorithms.apfl
import fedjax_lab.algorithms.ifca
import fedjax_lab.algorithms.partial
from fedjax_lab import experiment as exp_lib
from fedjax_lab.personalization import (
    cluster_choices,
    evaluate_own_models,
    personal_models,
)

apfl_lib = sys.modules["fedjax_lab.algorithms.apfl"]
ifca_lib = sys.modules["fedjax_lab.algorithms.ifca"]
partial_lib = sys.modules["fedjax_lab.algorithms.partial"]

KEY = jax.random.key(0)
D = 3


def _lsq_loss(p, batch, key):
    del key
    r = batch["x"] @ p - batch["y"]
    return jnp.sum(batch["mask"] * r * r) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def _lsq_grad(p, x, y):
    return 2.0 * x.T @ (x @ p - y) / x.shape[0]


def _full_batch_cohort(xs, ys, ids, steps):
    """Client c's whole data as each of its ``steps`` batches: ``[C, S, n, ...]``."""
    x = np.stack([np.broadcast_to(a, (steps,) + a.shape) for a in xs]).astype(np.float32)
    y = np.stack([np.broadcast_to(a, (steps,) + a.shape) for a in ys]).astype(np.float32)
    weights = np.array([a.shape[0] for a in xs], np.float32)
    return fl.Cohort({"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.ones(y.shape)},
                     jnp.asarray(weights), jnp.asarray(ids, jnp.int32))


def _data(num_clients, n=5, seed=0, thetas=None):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, D)) for _ in range(num_clients)]
    if thetas is None:
        ys = [rng.normal(size=n) for _ in range(num_clients)]
    else:
        ys = [x @ thetas[i] + 0.01 * rng.normal(size=n) for i, x in enumerate(xs)]
    return xs, ys


# ----------------------------------------------------------------------------- APFL


def test_apfl_matches_numpy_transcription():
    steps, eta, eta_a, alpha0, rounds = 3, 0.1, 0.5, 0.3, 2
    xs, ys = _data(3)
    ids = [3, 0, 2]  # of a population of 4: client 1 never trains
    ch = _full_batch_cohort(xs, ys, ids, steps)
    alg = apfl_lib.apfl(_lsq_loss, optax.sgd(eta), alpha=alpha0, alpha_learning_rate=eta_a)
    w0 = np.array([0.1, -0.2, 0.3])
    state = alg.init(jnp.asarray(w0, jnp.float32), num_clients=4)
    for r in range(rounds):
        state, _ = fl.run_round(alg, state, ch, jax.random.key(r))

    w = w0.copy()
    v = {i: w0.copy() for i in range(4)}
    a = {i: alpha0 for i in range(4)}
    alphas_seen = []
    for _ in range(rounds):
        finals, sizes = [], []
        for c, i in enumerate(ids):
            wi, vi, ai = w.copy(), v[i], a[i]
            for _ in range(steps):
                mixed = ai * vi + (1 - ai) * wi
                g = _lsq_grad(mixed, xs[c], ys[c])
                new_w = wi - eta * _lsq_grad(wi, xs[c], ys[c])
                new_v = vi - eta * ai * g
                ai = float(np.clip(ai - eta_a * (vi - wi) @ g, 0.0, 1.0))
                wi, vi = new_w, new_v
                alphas_seen.append(ai)
            v[i], a[i] = vi, ai
            finals.append(wi)
            sizes.append(xs[c].shape[0])
        p = np.array(sizes) / np.sum(sizes)
        w = w - p @ (w - np.array(finals))
    assert len(set(np.round(alphas_seen, 6))) > 3  # α really moves
    np.testing.assert_allclose(np.asarray(state.params), w, rtol=1e-4, atol=1e-6)
    cs = state.client_states
    np.testing.assert_allclose(np.asarray(cs.local), np.stack([v[i] for i in range(4)]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cs.alpha), [a[i] for i in range(4)], rtol=1e-4,
                               atol=1e-6)
    mixed = np.stack([a[i] * v[i] + (1 - a[i]) * w for i in range(4)])
    np.testing.assert_allclose(np.asarray(apfl_lib.personal_params(state)), mixed, rtol=1e-4,
                               atol=1e-6)


def test_apfl_checks_alpha():
    with pytest.raises(ValueError, match="alpha"):
        apfl_lib.apfl(_lsq_loss, alpha=1.5)
    with pytest.raises(ValueError, match="alpha_learning_rate"):
        apfl_lib.apfl(_lsq_loss, alpha_learning_rate=-0.1)


# ----------------------------------------------------------------------------- IFCA


def _numpy_ifca(models, xs, ys, ids, choices_prev, steps, eta, rounds):
    models = [m.copy() for m in models]
    choices = dict(choices_prev)
    history = []
    for _ in range(rounds):
        picked, trained = [], []
        for c in range(len(ids)):
            losses = [np.mean((xs[c] @ m - ys[c]) ** 2) for m in models]
            j = int(np.argmin(losses))
            theta = models[j].copy()
            for _ in range(steps):
                theta = theta - eta * _lsq_grad(theta, xs[c], ys[c])
            picked.append(j)
            trained.append(theta)
            choices[ids[c]] = j
        sizes = np.array([x.shape[0] for x in xs], np.float64)
        for j in range(len(models)):
            members = [c for c in range(len(ids)) if picked[c] == j]
            if members:  # a cluster nobody chose keeps its params
                wts = sizes[members] / sizes[members].sum()
                models[j] = models[j] - wts @ np.stack([models[j] - trained[c] for c in members])
        history.append(picked)
    return models, choices, history


def test_ifca_matches_numpy_transcription():
    steps, eta, k, rounds = 2, 0.1, 3, 2
    theta = np.array([1.0, -2.0, 0.5])
    xs, ys = _data(4, thetas=[theta, theta, -theta, -theta], seed=1)
    ids = [0, 2, 4, 5]
    ch = _full_batch_cohort(xs, ys, ids, steps)
    alg = ifca_lib.ifca(_lsq_loss, optax.sgd(eta), num_clusters=k, init_scale=1.0, init_seed=3)
    state = alg.init(jnp.zeros(D), num_clients=6)
    models0 = np.asarray(ifca_lib.cluster_models(state), np.float64)
    metrics = []
    for r in range(rounds):
        state, m = fl.run_round(alg, state, ch, jax.random.key(r))
        metrics.append(m)
    models, choices, history = _numpy_ifca(list(models0), xs, ys, ids, {}, steps, eta, rounds)
    assert any(len(set(h)) < k for h in history)  # some cluster was empty: it kept its params
    np.testing.assert_allclose(np.asarray(ifca_lib.cluster_models(state)), np.stack(models),
                               rtol=1e-4, atol=1e-5)
    want = [choices.get(i, -1) for i in range(6)]
    np.testing.assert_array_equal(np.asarray(state.client_states), want)
    for m, picked in zip(metrics, history, strict=True):
        for j in range(k):
            assert float(m[f"cluster_{j}_clients"]) == picked.count(j)
    sizes = np.array([x.shape[0] for x in xs])
    shares = np.array([sizes[np.array(history[-1]) == j].sum() for j in range(k)]) / sizes.sum()
    average = shares @ np.stack(models)
    np.testing.assert_allclose(np.asarray(state.params), average, rtol=1e-4, atol=1e-5)
    own = np.asarray(ifca_lib.personal_params(state))
    for i in range(6):
        np.testing.assert_allclose(own[i], models[want[i]] if want[i] >= 0 else average,
                                   rtol=1e-4, atol=1e-5)


def test_ifca_recovers_two_planted_clusters():
    theta = np.array([2.0, -1.0, 1.0])
    planted = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(12, D)) for _ in planted]
    ys = [x @ (theta if g == 0 else -theta) + 0.05 * rng.normal(size=12)
          for x, g in zip(xs, planted, strict=True)]
    ch = _full_batch_cohort(xs, ys, np.arange(8), steps=3)
    alg = ifca_lib.ifca(_lsq_loss, optax.sgd(0.1), num_clusters=2, init_scale=1.0, init_seed=0)
    state = alg.init(jnp.zeros(D), num_clients=8)
    counts = []
    for r in range(10):
        state, m = fl.run_round(alg, state, ch, jax.random.key(r))
        counts.append(float(m["cluster_0_clients"] + m["cluster_1_clients"]))
    got = np.asarray(state.client_states)
    assert set(got.tolist()) == {0, 1}
    assert np.array_equal(got, planted) or np.array_equal(got, 1 - planted)
    models = np.asarray(ifca_lib.cluster_models(state))
    first = theta if got[0] == planted[0] else -theta
    np.testing.assert_allclose(models[0], first, atol=0.1)
    np.testing.assert_allclose(models[1], -first, atol=0.1)
    assert counts == [8.0] * 10


# ----------------------------------------------------------------------------- LG-FedAvg


def test_lg_fedavg_matches_numpy_transcription():
    """Dense_0 (the representation W) stays local, Dense_1 (the head h) is averaged."""
    steps, eta, rounds, hdim = 2, 0.05, 2, 2
    xs, ys = _data(3, seed=2)
    ids = [1, 3, 0]
    ch = _full_batch_cohort(xs, ys, ids, steps)

    def loss(p, batch, key):
        del key
        r = batch["x"] @ p["Dense_0"] @ p["Dense_1"] - batch["y"]
        return jnp.sum(batch["mask"] * r * r) / jnp.sum(batch["mask"])

    rng = np.random.default_rng(5)
    w0, h0 = rng.normal(size=(D, hdim)), rng.normal(size=hdim)
    alg = partial_lib.lg_fed_avg(loss, optax.sgd(eta))
    state = alg.init({"Dense_0": jnp.asarray(w0, jnp.float32),
                      "Dense_1": jnp.asarray(h0, jnp.float32)}, num_clients=4)
    for r in range(rounds):
        state, _ = fl.run_round(alg, state, ch, jax.random.key(r))

    h = h0.copy()
    reps = {i: w0.copy() for i in range(4)}
    for _ in range(rounds):
        heads, sizes = [], []
        for c, i in enumerate(ids):
            w, hi, n = reps[i], h.copy(), xs[c].shape[0]
            for _ in range(steps):
                res = xs[c] @ w @ hi - ys[c]
                g_h = 2.0 / n * w.T @ xs[c].T @ res
                g_w = 2.0 / n * np.outer(xs[c].T @ res, hi)
                w, hi = w - eta * g_w, hi - eta * g_h
            reps[i] = w
            heads.append(hi)
            sizes.append(n)
        p = np.array(sizes) / np.sum(sizes)
        h = h - p @ (h - np.array(heads))
    np.testing.assert_allclose(np.asarray(state.params["Dense_1"]), h, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.params["Dense_0"]), w0.astype(np.float32))
    (local,) = state.client_states
    np.testing.assert_allclose(np.asarray(local), np.stack([reps[i] for i in range(4)]),
                               rtol=1e-4, atol=1e-6)
    own = partial_lib.personal_params(state, local="body")
    np.testing.assert_allclose(np.asarray(own["Dense_0"]), np.asarray(local))
    np.testing.assert_allclose(np.asarray(own["Dense_1"][2]), h, rtol=1e-4, atol=1e-6)


def test_lg_fedavg_split_is_the_opposite_of_fedper():
    p = {"Dense_0": {"kernel": jnp.ones((2, 3))}, "Dense_1": {"kernel": jnp.ones((3, 2))}}
    per = partial_lib.resolve_global_mask(p)
    lg = partial_lib.resolve_global_mask(p, local="body")
    assert jax.tree.map(lambda a, b: a != b, per, lg) == jax.tree.map(lambda _: True, per)
    with pytest.raises(ValueError, match="local"):
        partial_lib.resolve_global_mask(p, local="tail")


# ----------------------------------------------------------------------------- evaluation

def _two_layer_loss(p, batch, key):
    """Masked mean cross-entropy of ``x @ Dense_0 @ Dense_1`` (plain jnp: cheap to trace)."""
    del key
    logp = jax.nn.log_softmax(batch["x"] @ p["Dense_0"] @ p["Dense_1"])
    nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
    return jnp.sum(nll * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def _two_layer_eval(p, batch):
    n = jnp.sum(batch["mask"])
    return {"loss_sum": _two_layer_loss(p, batch, None) * n, "num_examples": n}


def _two_layer_params(seed=0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return {"Dense_0": jax.random.normal(k0, (4, 3)), "Dense_1": jax.random.normal(k1, (3, 3))}


@jax.jit
def _hand_loss(params, x, y):
    return _two_layer_loss(params, {"x": x, "y": y, "mask": jnp.ones(y.shape)}, None)


def _client_loss(params, data, i):
    """Client ``i``'s mean loss under ``params``, computed by hand."""
    c = data.client(i)
    return float(_hand_loss(params, jnp.asarray(c["x"]), jnp.asarray(c["y"])))


def _own_model_by_hand(name, state, i):
    take = lambda t: jax.tree.map(lambda a: a[i], t)  # noqa: E731
    if name == "apfl":
        cs = state.client_states
        a = cs.alpha[i]
        return jax.tree.map(lambda v, w: a * v + (1 - a) * w, take(cs.local), state.params)
    if name == "ifca":
        j = int(state.client_states[i])
        if j < 0:  # never sampled
            return state.params
        return jax.tree.map(lambda m: m[j], ifca_lib.cluster_models(state))
    return {"Dense_0": state.client_states[0][i], "Dense_1": state.params["Dense_1"]}


@pytest.mark.parametrize("name", ["apfl", "ifca", "lg_fedavg"])
def test_each_client_is_reported_on_its_own_model(name):
    alg = fl.algorithms.REGISTRY[name](_two_layer_loss, optax.sgd(0.3))
    state = alg.init(_two_layer_params(), num_clients=6)
    ch = cohort(num_clients=4, steps=2, batch=3)._replace(
        client_ids=jnp.array([0, 1, 3, 4], jnp.int32))  # of 6: clients 2 and 5 never train
    for r in range(2):
        state, _ = fl.run_round(alg, state, ch, jax.random.key(r), client_map=fl.maps.sequential())
    test = population(sizes=(3,) * 6, seed=2)
    out = evaluate_own_models(_two_layer_eval, name, state, test, batch_size=2)
    for i in range(6):
        np.testing.assert_allclose(out["personalized"]["client_loss"][i],
                                   _client_loss(_own_model_by_hand(name, state, i), test, i),
                                   rtol=1e-5)
        np.testing.assert_allclose(out["global"]["client_loss"][i],
                                   _client_loss(state.params, test, i), rtol=1e-5)
    trained = [0, 1, 3, 4]
    assert not np.allclose(out["personalized"]["client_loss"][trained],
                           out["global"]["client_loss"][trained])


def test_ifca_choose_on_picks_the_lowest_loss_cluster_of_each_client():
    data = population(sizes=(3,) * 6, seed=3)
    models = jax.vmap(_two_layer_params)(jnp.arange(3))
    got = cluster_choices(_two_layer_eval, models, data, batch_size=2)
    for i in range(6):
        losses = [_client_loss(jax.tree.map(lambda m, j=j: m[j], models), data, i)
                  for j in range(3)]
        assert got[i] == int(np.argmin(losses))
    assert len(set(got.tolist())) > 1
    alg = fl.algorithms.ifca(_two_layer_loss, num_clusters=3)
    state = alg.init(_two_layer_params(), num_clients=6)._replace(
        extra=ifca_lib.IFCAExtra(models))
    own = personal_models("ifca", state, choices=got)
    assert_trees_close(own, jax.tree.map(lambda m: m[got], models))
    test = population(sizes=(3,) * 6, seed=2)
    out = evaluate_own_models(_two_layer_eval, "ifca", state, test, choose_on=data, batch_size=2)
    for i in range(6):
        mine = _client_loss(jax.tree.map(lambda m, i=i: m[got[i]], models), test, i)
        np.testing.assert_allclose(out["personalized"]["client_loss"][i], mine, rtol=1e-5)


def test_personal_models_refuses_what_it_cannot_build():
    alg = fl.algorithms.fed_avg(loss_fn)
    with pytest.raises(ValueError, match="algorithm"):
        personal_models("fedavg", alg.init(init_params()))
    with pytest.raises(ValueError, match="choices: not an option"):
        personal_models("apfl", None, choices=[0])
    with pytest.raises(ValueError, match="choose_on"):
        evaluate_own_models(None, "apfl", None, population(), choose_on=population())


# ----------------------------------------------------------------------------- registry, TOML


def test_new_methods_are_registered_and_build_from_their_configs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for name, config in (("apfl", "apfl"), ("ifca", "ifca"), ("lg_fedavg", "lg_fedavg")):
        assert name in fl.algorithms.REGISTRY
        cfg = exp_lib.load_config(root / f"{config}.toml")
        specs = [a for a in cfg["algorithms"] if a["name"] == name]
        assert specs, config
        alg = exp_lib.build_algorithm(specs[0], _two_layer_loss)
        state = alg.init(_two_layer_params(), num_clients=3)
        assert jax.tree.leaves(state.client_states), name
    spec = {"name": "ifca", "num_clusters": 4}
    alg = exp_lib.build_algorithm(spec, _two_layer_loss)
    models = ifca_lib.cluster_models(alg.init(_two_layer_params()))
    assert jax.tree.leaves(models)[0].shape[0] == 4
    with pytest.raises(exp_lib.ConfigError, match="num_clusters"):
        exp_lib.validate({"algorithms": [{"name": "ifca", "num_clusters": 0}]})


# ------------------------------------------------------- per-client evaluation in the CLI


def _tiny_experiment(**evaluation):
    cfg = {"data": {"name": "digits", "num_clients": 6, "partition": "dirichlet", "alpha": 0.5,
                    "seed": 0},
           "model": {"name": "mlp", "hidden": [8], "batch_norm": True},
           "training": {"rounds": 1, "cohort_size": 2},
           "evaluation": {"every": 1, **evaluation}, "checkpoint": {"every": 1},
           "algorithms": [{"name": "lg_fedavg", "local_keys": "Dense_0"}, {"name": "fedbn"}]}
    return exp_lib.build(cfg)


def _by_hand_mean_accuracy(ex, models):
    accs = []
    test = ex.test
    for i in range(test.num_clients):
        lo, hi = int(test.offsets[i]), int(test.offsets[i + 1])
        own = jax.tree.map(lambda m, i=i: m[i], models)
        logits = ex.model.apply(own, jnp.asarray(test.examples["x"][lo:hi]))
        accs.append(np.mean(np.argmax(np.asarray(logits), -1) == test.examples["y"][lo:hi]))
    return float(np.mean(accs))


def test_cli_reports_each_client_on_its_own_model():
    from fedjax_lab import cli

    ex = _tiny_experiment(fine_tune_steps=2)
    params = ex.model.init(jax.random.key(0))
    for label in ("lg_fedavg", "fedbn"):
        spec = next(a for a in ex.config["algorithms"] if a["name"] == label)
        state = ex.algorithms[label].init(params, num_clients=ex.train.num_clients)
        noise = iter(jax.random.split(jax.random.key(1), len(state.client_states)))
        state = state._replace(client_states=tuple(
            c + 0.5 * jax.random.normal(next(noise), c.shape) for c in state.client_states))
        got = cli._personal_metrics(ex, spec, state, seed=1, warn=False)
        own = personal_models(label, state, **({"local_keys": "Dense_0"}
                                               if label == "lg_fedavg" else {}))
        assert got["personalized_accuracy_mean"] == pytest.approx(
            _by_hand_mean_accuracy(ex, own), abs=1e-6)
        tuned = fl.personalization.fine_tune_evaluate(
            ex.loss_fn, ex.eval_fn, optax.sgd(0.1), state.params, ex.train, ex.test, steps=2,
            batch_size=10, key=jax.random.key(1))
        assert got["fine_tuned_accuracy_mean"] == pytest.approx(
            float(tuned["personalized_accuracy_mean"]), abs=1e-6)
    # FedBN's own model: the global Dense layers, the client's own BatchNorm entries
    mask = partial_lib.batch_norm_mask(state.params)
    for m, g, o in zip(jax.tree.leaves(mask), jax.tree.leaves(state.params),
                       jax.tree.leaves(own), strict=True):
        if m:
            np.testing.assert_array_equal(np.asarray(o), np.broadcast_to(g, o.shape))
    np.testing.assert_array_equal(np.asarray(own["batch_stats"]["BatchNorm_0"]["mean"]),
                                  np.asarray(state.client_states[0]))


def test_cli_per_client_evaluation_options_are_checked():
    with pytest.raises(exp_lib.ConfigError, match="evaluation.personalized: expected true"):
        exp_lib.validate({"evaluation": {"personalized": 1}})
    with pytest.raises(exp_lib.ConfigError, match="evaluation.fine_tune_steps: must be >= 0"):
        exp_lib.validate({"evaluation": {"fine_tune_steps": -1}})
    assert "fine_tuned_accuracy_mean" in exp_lib.reference()
