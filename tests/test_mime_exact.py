"""Exact Mime: this round's control variate from the engine's pre-pass over the same cohort.

Checked against a NumPy transcription of Karimireddy et al.'s Algorithm 1 on tiny least
squares with full-batch local steps, under every client map, and through the config path.
"""

from __future__ import annotations

import pathlib

import _problems as P
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lab as fl
from fedjax_lab import experiment
from fedjax_lab.algorithms.mime import mime, mime_lite

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, LR, BETA, ETA_G, STEPS = 3, 0.1, 0.5, 0.8, 3
SIZES = (2, 4, 3, 5, 1)  # a population of 5 clients of unequal sizes
KEY = jax.random.key(0)


def lsq_loss(params, batch, key):
    del key
    r = batch["x"] @ params - batch["y"]
    return jnp.sum(batch["mask"] * r * r) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def _client_data(seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, D)), rng.normal(size=n)) for n in SIZES]


DATA = _client_data()
X0 = np.random.default_rng(1).normal(size=D)


def full_batch_cohort(ids):
    """Every local step is the client's whole data (padded to the largest client, masked)."""
    b = max(SIZES)
    x = np.zeros((len(ids), STEPS, b, D), np.float32)
    y = np.zeros((len(ids), STEPS, b), np.float32)
    m = np.zeros((len(ids), STEPS, b), np.float32)
    for j, i in enumerate(ids):
        n = SIZES[i]
        x[j, :, :n], y[j, :, :n], m[j, :, :n] = DATA[i][0], DATA[i][1], 1.0
    weights = np.array([SIZES[i] for i in ids], np.float32)
    batches = {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(m)}
    return fl.Cohort(batches, jnp.asarray(weights), jnp.asarray(ids, jnp.int32))


COHORTS = [[0, 2, 4], [1, 3, 0, 2], [4, 3, 1]]


def grad(i, w):
    """``∇f_i(w)`` of client i's mean squared error, in float64."""
    x, y = DATA[i]
    return 2.0 * x.T @ (x @ w - y) / len(y)


def numpy_mime(cohorts, *, lr=LR, beta=BETA, eta_g=ETA_G, steps=STEPS):
    """Algorithm 1 of the Mime paper, SGD with momentum as the base optimiser, weighted means.

    c = Σ p_i ∇f_i(x); clients: y <- y - lr ((1 - β)(∇f_i(y) - ∇f_i(x) + c) + β m), m frozen;
    server: m <- (1 - β) c + β m; x <- x - η_g Σ p_i (x - y_i).
    """
    x, m = X0.copy(), np.zeros(D)
    out = []
    for ids in cohorts:
        p = np.array([SIZES[i] for i in ids], np.float64)
        p = p / p.sum()
        c = sum(pi * grad(i, x) for pi, i in zip(p, ids, strict=True))
        deltas = []
        for i in ids:
            y = x.copy()
            for _ in range(steps):
                d = grad(i, y) - grad(i, x) + c
                y = y - lr * ((1 - beta) * d + beta * m)
            deltas.append(x - y)
        m = (1 - beta) * c + beta * m
        x = x - eta_g * sum(pi * dl for pi, dl in zip(p, deltas, strict=True))
        out.append((x.copy(), m.copy(), c.copy()))
    return out


MIME = mime(lsq_loss, optax.sgd(LR), server_learning_rate=ETA_G, momentum=BETA)


def run_mime(alg, cohorts, client_map=None):
    state = alg.init(jnp.asarray(X0, jnp.float32))
    states = []
    for ids in cohorts:
        state, metrics = fl.run_round(alg, state, full_batch_cohort(ids), KEY,
                                      client_map=client_map or fl.maps.sequential())
        assert float(metrics["round_skipped"]) == 0.0
        states.append(state)
    return states


def test_mime_is_algorithm_1_of_the_paper():
    for state, (x, m, c) in zip(run_mime(MIME, COHORTS), numpy_mime(COHORTS), strict=True):
        np.testing.assert_allclose(np.asarray(state.params), x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.extra.statistics[0].ema), m, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.extra.control_variate), c, atol=1e-5)
        assert bool(state.extra.measured)
    # The lagged one-pass Mime is a different algorithm: it moves elsewhere.
    lagged = mime(lsq_loss, optax.sgd(LR), server_learning_rate=ETA_G, momentum=BETA,
                  lagged=True)
    assert MIME.pre_pass is not None and lagged.pre_pass is None
    gap = np.abs(np.asarray(run_mime(lagged, COHORTS)[-1].params) - numpy_mime(COHORTS)[-1][0])
    assert gap.max() > 1e-3


def test_first_local_step_follows_this_rounds_control_variate():
    """One full-batch step: ``∇f_i(x) - ∇f_i(x) + c = c`` whatever client i's data is.

    So in round 1 already (no earlier round to lag behind) every client moves by
    ``-η((1 - β) c + β m)`` with ``m = 0`` and c this round's mean gradient.
    """
    alg = mime(lsq_loss, optax.sgd(LR), server_learning_rate=ETA_G, momentum=BETA)
    state = alg.init(jnp.asarray(X0, jnp.float32))
    cohort = full_batch_cohort([0, 3, 1])
    one = cohort._replace(batches={k: v[:, :1] for k, v in cohort.batches.items()})
    new, _ = fl.run_round(alg, state, one, KEY, client_map=fl.maps.sequential())
    c = np.asarray(new.extra.control_variate, np.float64)
    np.testing.assert_allclose(c, numpy_mime([[0, 3, 1]], steps=1)[0][2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.params), X0 - ETA_G * LR * (1 - BETA) * c,
                               atol=1e-6)


def test_every_client_map_gives_the_same_mime():
    # run_rounds: clients gather their batches inside the map, in the pre-pass too.
    data = P.population(sizes=(3, 5, 4, 7, 2, 6))
    alg = mime(P.loss_fn, optax.sgd(0.1), momentum=0.9)
    state0 = alg.init(P.init_params())
    run = dict(num_rounds=2, cohort_size=5, batch_size=2, epochs=1)
    maps = [fl.maps.sequential(), fl.maps.vmap(), fl.maps.chunked(2),
            fl.maps.sharded(fl.maps.vmap())]
    finals = [fl.run_rounds(alg, state0, data, KEY, client_map=m, **run)[0] for m in maps]
    for other in finals[1:]:
        P.assert_trees_close(finals[0].params, other.params, rtol=1e-5, atol=1e-6)
        P.assert_trees_close(finals[0].extra, other.extra, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), finals[0].params,
                         state0.params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    # A padding slot (weight 0) and a zero-weight client count in neither pass.
    cohort = full_batch_cohort([0, 2, 4])
    padded = cohort._replace(weights=cohort.weights.at[2].set(0.0))
    lone = full_batch_cohort([0, 2])
    a, _ = fl.run_round(MIME, MIME.init(jnp.asarray(X0, jnp.float32)), padded, KEY)
    b, _ = fl.run_round(MIME, MIME.init(jnp.asarray(X0, jnp.float32)), lone, KEY)
    P.assert_trees_close(a.params, b.params)
    P.assert_trees_close(a.extra.control_variate, b.extra.control_variate)


def test_config_path_builds_exact_and_lagged_mime():
    loss = P.loss_fn
    built = experiment.build_algorithm({"name": "mime", "momentum": 0.9}, loss)
    assert built.pre_pass is not None and built.name == "mime"
    lagged = experiment.build_algorithm({"name": "mime", "lagged": True}, loss)
    assert lagged.pre_pass is None
    assert experiment.build_algorithm({"name": "mimelite"}, loss).pre_pass is None
    config = experiment.load_config(ROOT / "experiments/configs/mime.toml")
    spec = next(a for a in config["algorithms"] if a["name"] == "mime")
    assert experiment.build_algorithm(spec, loss).pre_pass is not None
    # MimeLite has no pre-pass and keeps its one-pass update (delta, full-batch gradient).
    lite = mime_lite(lsq_loss, optax.sgd(LR), momentum=BETA)
    out = lite.client_update(lite.init(jnp.asarray(X0, jnp.float32)),
                             fl.ClientInput(jax.tree.map(lambda v: v[0],
                                                         full_batch_cohort([1]).batches),
                                            jnp.float32(1.0), jnp.int32(1), ()), KEY)
    np.testing.assert_allclose(np.asarray(out.update[1]), grad(1, X0), rtol=1e-5, atol=1e-5)
