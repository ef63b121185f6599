"""Client-drift algorithms: SCAFFOLD, FedDyn, FedNova, Mime/MimeLite, FedAvg-M.

Each is checked against a NumPy transcription of its paper's update rule (tiny least squares),
against FedAvg where the paper says it reduces to it, and under every client map.
"""

from __future__ import annotations

import pathlib

import _problems as P
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab import experiment
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.feddyn import fed_dyn
from fedjax_lab.algorithms.fednova import fed_nova
from fedjax_lab.algorithms.mime import mime, mime_lite
from fedjax_lab.algorithms.momentum import fed_avg_momentum
from fedjax_lab.algorithms.scaffold import scaffold

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("scaffold", "feddyn", "fednova", "mime", "mimelite", "fedavg_momentum")
STATEFUL = ("scaffold", "feddyn")
LR = 0.1
SEQ = fl.maps.sequential()

# ---------------------------------------------------------------- least squares, in NumPy too
D = 3


def lsq_loss(params, batch, key):
    del key
    r = batch["x"] @ params - batch["y"]
    return jnp.sum(batch["mask"] * r * r) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def np_grad(w, x, y, m):
    r = (x @ w - y) * m
    return 2.0 * x.T @ r / max(m.sum(), 1.0)


def lsq_cohort(ids, masks, seed):
    """A cohort of ``len(ids)`` clients; ``masks`` f32[C, S, B] (whole zero steps allowed)."""
    rng = np.random.default_rng(seed)
    masks = np.asarray(masks, np.float32)
    c, s, b = masks.shape
    x = rng.normal(size=(c, s, b, D)).astype(np.float32)
    y = rng.normal(size=(c, s, b)).astype(np.float32)
    weights = rng.uniform(1.0, 3.0, size=c).astype(np.float32)
    batches = {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(masks)}
    return fl.Cohort(batches, jnp.asarray(weights), jnp.asarray(ids, jnp.int32))


def np_cohort(cohort):
    b = {k: np.asarray(v, np.float64) for k, v in cohort.batches.items()}
    return b, np.asarray(cohort.weights, np.float64), np.asarray(cohort.client_ids)


# Three rounds over a population of 5: different cohorts, unequal and zero local work.
FULL = np.ones((3, 2))
TWO = np.array([[1, 1], [0, 0], [1, 0]])  # 2 real steps, an empty step in the middle
NONE = np.zeros((3, 2))  # a client with no real step at all
ROUNDS = [
    lsq_cohort([0, 2, 4], [FULL, TWO, FULL], seed=1),
    lsq_cohort([2, 3, 1], [TWO, FULL, NONE], seed=2),
    lsq_cohort([4, 0, 2], [FULL, FULL, TWO], seed=3),
]
N = 5
X0 = jnp.asarray(np.random.default_rng(0).normal(size=D).astype(np.float32))
KEY = jax.random.key(0)


# Shared algorithm objects: a jitted round compiles once per (algorithm, shapes).
FEDAVG = fl.algorithms.fed_avg(lsq_loss, optax.sgd(LR))
SCAFFOLD = scaffold(lsq_loss, client_learning_rate=LR)
NOVA = fed_nova(lsq_loss, optax.sgd(LR))
MIME_BETA = 0.5
# The one-pass Mime (c from the previous round), which np_mime below transcribes; the exact
# Mime (this round's c, from the engine's pre-pass) is tested in test_mime_exact.py.
MIME = mime(lsq_loss, optax.sgd(LR), server_learning_rate=0.8, momentum=MIME_BETA,
            lagged=True)
ONE_STEP = np.array([[1, 1], [0, 0], [0, 0]])  # one real step of the client's 2 examples


def run_jax(alg, rounds=ROUNDS, num_clients=None):
    state = alg.init(X0, num_clients=num_clients)
    states = []
    for cohort in rounds:
        state, _ = fl.run_round(alg, state, cohort, KEY, client_map=SEQ)
        states.append(state)
    return states


def real_steps(b, j):
    for s in range(b["mask"].shape[1]):
        m = b["mask"][j, s]
        if m.sum() > 0:
            yield b["x"][j, s], b["y"][j, s], m


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ SCAFFOLD


def np_scaffold(rounds, lr, eta_g):
    x, c, cs = np.asarray(X0, np.float64), np.zeros(D), np.zeros((N, D))
    out = []
    for cohort in rounds:
        b, w, ids = np_cohort(cohort)
        dys, dcs = [], []
        for j, i in enumerate(ids):
            y, k = x.copy(), 0
            for xb, yb, m in real_steps(b, j):
                y = y - lr * (np_grad(y, xb, yb, m) - cs[i] + c)
                k += 1
            new_ci = cs[i] - c + (x - y) / (k * lr) if k > 0 else cs[i]  # option II
            dys.append(y - x)
            dcs.append(new_ci - cs[i])
            cs[i] = new_ci
        x = x + eta_g * np.average(dys, axis=0, weights=w)
        c = c + np.sum(dcs, axis=0) / N  # = (|S|/N) mean(Δc)
        out.append((x.copy(), c.copy(), cs.copy()))
    return out


def test_scaffold_matches_numpy_option_ii_over_three_rounds():
    for state, (x, c, cs) in zip(run_jax(SCAFFOLD, num_clients=N), np_scaffold(ROUNDS, LR, 1.0),
                                 strict=True):
        close(state.params, x)
        close(state.extra, c)
        close(state.client_states, cs)
        close(state.extra, np.mean(cs, axis=0))  # c = mean_i c_i is kept


def test_scaffold_one_step_zero_control_variates_is_fedavg():
    one = [lsq_cohort([0, 1, 2], [ONE_STEP] * 3, seed=4)]
    got = run_jax(SCAFFOLD, one, num_clients=N)[0]
    P.assert_trees_close(got.params, run_jax(FEDAVG, one)[0].params)
    assert float(jnp.abs(got.extra).max()) > 0  # while c itself moved


def test_scaffold_needs_num_clients_and_one_learning_rate():
    alg = SCAFFOLD
    with pytest.raises(ValueError, match="num_clients"):
        fl.run_round(alg, alg.init(X0), ROUNDS[0], KEY, client_map=SEQ)
    with pytest.raises(ValueError, match="client_learning_rate"):
        scaffold(lsq_loss, optax.sgd(0.1), client_learning_rate=0.1)
    with pytest.raises(ValueError, match="num_clients"):
        alg.init(X0, num_clients=0)


# -------------------------------------------------------------------------------------- FedDyn


def np_feddyn(rounds, lr, alpha):
    x, h, gs = np.asarray(X0, np.float64), np.zeros(D), np.zeros((N, D))
    out = []
    for cohort in rounds:
        b, w, ids = np_cohort(cohort)
        models = []
        for j, i in enumerate(ids):
            y = x.copy()
            for xb, yb, m in real_steps(b, j):
                y = y - lr * (np_grad(y, xb, yb, m) - gs[i] + alpha * (y - x))
            gs[i] = gs[i] - alpha * (y - x)
            models.append(y)
        h = h - alpha / N * np.sum([y - x for y in models], axis=0)
        x = np.average(models, axis=0, weights=w) - h / alpha
        out.append((x.copy(), h.copy(), gs.copy()))
    return out


def test_feddyn_matches_numpy_over_three_rounds():
    alg = fed_dyn(lsq_loss, optax.sgd(LR), alpha=0.3)
    for state, (x, h, gs) in zip(run_jax(alg, num_clients=N), np_feddyn(ROUNDS, LR, 0.3),
                                 strict=True):
        close(state.params, x)
        close(state.extra, h)
        close(state.client_states, gs)
        close(state.extra, np.mean(gs, axis=0))  # h = mean_i g_i is kept


# ------------------------------------------------------------------------------------- FedNova


def np_fednova(rounds, lr, rho, eta_g=1.0):
    x = np.asarray(X0, np.float64)
    out = []
    for cohort in rounds:
        b, w, ids = np_cohort(cohort)
        p = w / w.sum()
        ds, a_s = [], []
        for j in range(len(ids)):
            y, mom, tau = x.copy(), np.zeros(D), 0
            for xb, yb, m in real_steps(b, j):
                mom = rho * mom + np_grad(y, xb, yb, m)
                y = y - lr * mom
                tau += 1
            a = tau if rho == 0 else (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
            ds.append((x - y) / a if a > 0 else np.zeros(D))
            a_s.append(a)
        tau_eff = np.dot(p, a_s)
        x = x - eta_g * tau_eff * np.sum(p[:, None] * np.asarray(ds), axis=0)
        out.append(x.copy())
    return out


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_fednova_matches_formula_with_unequal_local_work(rho):
    alg = NOVA if rho == 0 else fed_nova(lsq_loss, optax.sgd(LR), local_momentum=rho)
    for state, x in zip(run_jax(alg), np_fednova(ROUNDS, LR, rho), strict=True):
        close(state.params, x)


def test_fednova_is_fedavg_with_equal_work_and_differs_otherwise():
    nova, avg = NOVA, FEDAVG
    equal = [lsq_cohort([0, 1, 2], [FULL, FULL, FULL], seed=5)]
    P.assert_trees_close(run_jax(nova, equal)[0].params, run_jax(avg, equal)[0].params,
                         rtol=1e-6)
    unequal = ROUNDS[:1]
    diff = np.abs(np.asarray(run_jax(nova, unequal)[0].params)
                  - np.asarray(run_jax(avg, unequal)[0].params))
    assert diff.max() > 1e-3


# ---------------------------------------------------------------------------- Mime, MimeLite


def np_mime(rounds, lr, beta, control_variate, eta_g=1.0):
    x, m_, c, has_c = np.asarray(X0, np.float64), np.zeros(D), np.zeros(D), False
    out = []
    for cohort in rounds:
        b, w, ids = np_cohort(cohort)
        deltas, grads = [], []
        for j in range(len(ids)):
            y, gsum, n = x.copy(), np.zeros(D), 0.0
            for xb, yb, m in real_steps(b, j):
                gy, gx = np_grad(y, xb, yb, m), np_grad(x, xb, yb, m)
                d = gy - gx + c if (control_variate and has_c) else gy
                y = y - lr * ((1 - beta) * d + beta * m_)  # frozen server momentum
                gsum, n = gsum + m.sum() * gx, n + m.sum()
            deltas.append(x - y)
            grads.append(gsum / max(n, 1.0))
        gbar = np.average(grads, axis=0, weights=w)
        x = x - eta_g * np.average(deltas, axis=0, weights=w)
        m_ = (1 - beta) * gbar + beta * m_
        c, has_c = gbar, True
        out.append((x.copy(), m_.copy(), c.copy()))
    return out


@pytest.mark.parametrize("control_variate", [False, True], ids=["mimelite", "mime"])
def test_mime_matches_numpy_over_three_rounds(control_variate):
    if control_variate:
        alg = MIME
    else:
        alg = mime_lite(lsq_loss, optax.sgd(LR), server_learning_rate=0.8, momentum=MIME_BETA)
    want = np_mime(ROUNDS, LR, MIME_BETA, control_variate, eta_g=0.8)
    for state, (x, m_, c) in zip(run_jax(alg), want, strict=True):
        close(state.params, x)
        close(state.extra.statistics[0].ema, m_)
        if control_variate:
            close(state.extra.control_variate, c)


def test_mimelite_without_momentum_is_fedavg():
    lite = mime_lite(lsq_loss, optax.sgd(LR), momentum=0.0)
    for a, b in zip(run_jax(lite, ROUNDS[:2]), run_jax(FEDAVG, ROUNDS[:2]), strict=True):
        P.assert_trees_close(a.params, b.params)


def test_mime_first_local_step_follows_the_control_variate_not_the_client():
    """One full-batch local step: ``∇f_i(x) - ∇f_i(x) + c = c`` whatever client i's data is.

    So every client moves by the same ``-η((1 - β) c + β m)`` (server momentum ``m`` frozen).
    """
    one_step = [ROUNDS[0], lsq_cohort([1, 3, 4], [ONE_STEP] * 3, seed=9)]
    first, second = run_jax(MIME, one_step)
    pair = (first.extra.control_variate, first.extra.statistics[0].ema)
    c, m = (np.asarray(a, np.float64) for a in pair)
    step = LR * ((1 - MIME_BETA) * c + MIME_BETA * m)
    close(second.params, np.asarray(first.params, np.float64) - 0.8 * step)


# ------------------------------------------------------------------------------------ FedAvg-M


def np_fedavg_m(rounds, lr, beta, eta_g=1.0):
    x, g = np.asarray(X0, np.float64), np.zeros(D)
    out = []
    for cohort in rounds:
        b, w, ids = np_cohort(cohort)
        deltas, gs = [], []
        for j in range(len(ids)):
            y, dsum, k = x.copy(), np.zeros(D), 0
            for xb, yb, m in real_steps(b, j):
                d = beta * np_grad(y, xb, yb, m) + (1 - beta) * g
                y, dsum, k = y - lr * d, dsum + d, k + 1
            deltas.append(x - y)
            gs.append(dsum / k if k else g)
        x = x - eta_g * np.average(deltas, axis=0, weights=w)
        g = np.average(gs, axis=0, weights=w)
        out.append((x.copy(), g.copy()))
    return out


def test_fedavg_momentum_matches_numpy_over_three_rounds():
    alg = fed_avg_momentum(lsq_loss, optax.sgd(LR), server_learning_rate=0.9, gradient_weight=0.3)
    for state, (x, g) in zip(run_jax(alg), np_fedavg_m(ROUNDS, LR, 0.3, 0.9), strict=True):
        close(state.params, x)
        close(state.extra, g)


def test_fedavg_momentum_with_beta_one_is_fedavg():
    fm = fed_avg_momentum(lsq_loss, optax.sgd(LR), gradient_weight=1.0)
    for a, b in zip(run_jax(fm, ROUNDS[:2]), run_jax(FEDAVG, ROUNDS[:2]), strict=True):
        P.assert_trees_close(a.params, b.params)


# ---------------------------------------------------- every client map, per-client state, registry

POP = P.population()
ALGS = {name: REGISTRY[name](P.loss_fn, client_optimizer=optax.sgd(0.2)) for name in NAMES}
_RUNS: dict = {}


def run_two_rounds(name, client_map):
    key = (name, client_map.name)
    if key not in _RUNS:
        alg = ALGS[name]
        state = alg.init(P.init_params(), num_clients=POP.num_clients)
        _RUNS[key] = fl.run_rounds(alg, state, POP, jax.random.key(3), num_rounds=2,
                                   cohort_size=4, batch_size=3, client_map=client_map)
    return _RUNS[key]


MAPS = {
    "vmap": fl.maps.vmap,
    "chunked3": lambda: fl.maps.chunked(3),
}
# sharded (a real 2-device mesh) is covered for every algorithm by tests/test_registry_maps.py.


@pytest.mark.parametrize("map_name", ["vmap", "chunked3"])
@pytest.mark.parametrize("name", NAMES)
def test_every_client_map_gives_the_same_result(name, map_name):
    client_map = MAPS[map_name]()
    want, want_hist = run_two_rounds(name, SEQ)
    got, got_hist = run_two_rounds(name, client_map)
    P.assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_hist["train_loss"], want_hist["train_loss"], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(want_hist["train_loss"])))


@pytest.mark.parametrize("name", NAMES)
def test_client_states_change_only_for_sampled_clients(name):
    state, hist = run_two_rounds(name, SEQ)
    assert int(state.round) == 2
    if name not in STATEFUL:
        assert state.client_states == ()
        return
    sampled = set(np.asarray(hist["client_ids"]).ravel().tolist())
    norms = np.sqrt(sum(np.sum(np.asarray(leaf) ** 2, axis=tuple(range(1, leaf.ndim)))
                        for leaf in jax.tree.leaves(state.client_states)))
    for i in range(POP.num_clients):
        assert (norms[i] > 0) == (i in sampled), (i, sampled, norms)


def test_registry_names_and_bad_hyperparameters():
    assert set(NAMES) <= set(REGISTRY)
    with pytest.raises(ValueError, match="alpha"):
        fed_dyn(lsq_loss, alpha=0.0)
    with pytest.raises(ValueError, match="momentum"):
        fed_nova(lsq_loss, local_momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        mime(lsq_loss, momentum=1.0)
    with pytest.raises(ValueError, match="gradient_weight"):
        fed_avg_momentum(lsq_loss, gradient_weight=0.0)
    with pytest.raises(TypeError, match="loss_fn"):
        scaffold(None)


@pytest.mark.parametrize("name", NAMES)
def test_example_config_loads_and_builds(name):
    cfg = experiment.load_config(ROOT / "experiments" / "configs" / f"{name}.toml")
    specs = [s for s in cfg["algorithms"] if s["name"] == name]
    assert specs
    for spec in specs:
        alg = experiment.build_algorithm(spec, P.loss_fn)
        assert isinstance(alg, fl.FederatedAlgorithm)
