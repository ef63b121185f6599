"""Robust aggregators against NumPy transcriptions; padding invariance; resistance to attacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn

import fedjax_lab as fl
from fedjax_lab import attacks, robust

C, SHAPES = 9, {"a": (3, 2), "b": (4,)}


def _stack(seed=0, c=C):
    rng = np.random.default_rng(seed)
    ups = {k: rng.normal(size=(c,) + s).astype(np.float32) for k, s in SHAPES.items()}
    ups["a"][1] *= 30.0  # an outlier
    return ups


def _flat(ups):
    return np.concatenate([ups[k].reshape(ups[k].shape[0], -1) for k in sorted(ups)], axis=1)


def _unflat(v):
    out, i = {}, 0
    for k in sorted(SHAPES):
        n = int(np.prod(SHAPES[k]))
        out[k] = v[i:i + n].reshape(SHAPES[k])
        i += n
    return out


# ---------------------------------------------------------------- NumPy transcriptions


def np_median(x, w):
    return np.median(x, axis=0)


def np_trimmed(x, w, beta):
    t = int(np.floor(beta * len(x)))
    s = np.sort(x, axis=0)
    return s[t:len(x) - t].mean(axis=0)


def np_multi_krum(x, w, f, m):
    n = len(x)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    nn = max(n - f - 2, 1)
    scores = [np.sort(np.delete(d[i], i))[:nn].sum() for i in range(n)]
    best = np.argsort(scores, kind="stable")[:m]
    return x[best].mean(axis=0)


def np_geomed(x, w, iters, nu=1e-6):
    z = (w[:, None] * x).sum(0) / w.sum()
    for _ in range(iters):
        beta = w / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        z = (beta[:, None] * x).sum(0) / beta.sum()
    return z


def np_cclip(x, w, tau, iters, v0):
    v = v0.copy()
    for _ in range(iters):
        diff = x - v
        nrm = np.linalg.norm(diff, axis=1)
        scale = np.minimum(1.0, tau / np.where(nrm > 0, nrm, 1.0))
        v = v + (scale[:, None] * diff).mean(0)
    return v


CASES = [
    ("median", robust.coordinate_median(), np_median),
    ("trimmed", robust.trimmed_mean(0.2), lambda x, w: np_trimmed(x, w, 0.2)),
    ("krum", robust.krum(2), lambda x, w: np_multi_krum(x, w, 2, 1)),
    ("multi_krum", robust.multi_krum(2, 3), lambda x, w: np_multi_krum(x, w, 2, 3)),
    ("geomed", robust.geometric_median(8), lambda x, w: np_geomed(x, w, 8)),
    ("cclip", robust.centered_clipping(1.5, 3),
     lambda x, w: np_cclip(x, w, 1.5, 3, np.zeros(x.shape[1]))),
]


def _finalize(agg, ups, weights):
    state = agg.init(jax.tree.map(lambda a: jnp.zeros(a.shape[1:]), ups))
    contributions = jax.tree.map(jnp.asarray, (ups, weights))
    return agg.finalize(contributions, state, jax.random.key(0))


@pytest.mark.parametrize("name, agg, ref", CASES, ids=[c[0] for c in CASES])
def test_matches_numpy_reference(name, agg, ref):
    for seed in range(3):
        ups = _stack(seed)
        w = np.random.default_rng(seed).uniform(0.5, 2.0, size=C).astype(np.float32)
        out, total, _ = _finalize(agg, ups, w)
        expected = _unflat(ref(_flat(ups), w))
        assert_trees_close(out, expected, rtol=2e-4, atol=2e-5)
        assert float(total) == pytest.approx(w.sum(), rel=1e-6)


@pytest.mark.parametrize("name, agg, ref", CASES, ids=[c[0] for c in CASES])
def test_padded_clients_change_nothing(name, agg, ref):
    ups = _stack(1)
    w = np.ones(C, np.float32)
    base, total, _ = _finalize(agg, ups, w)
    rng = np.random.default_rng(5)
    padded = {k: np.concatenate([v, 1e3 * rng.normal(size=(4,) + v.shape[1:])]).astype(np.float32)
              for k, v in ups.items()}
    order = rng.permutation(C + 4)  # padding slots interleaved with the real clients
    padded = {k: v[order] for k, v in padded.items()}
    pw = np.concatenate([w, np.zeros(4, np.float32)])[order]
    out, total2, _ = _finalize(agg, padded, pw)
    assert_trees_close(out, base, rtol=1e-5, atol=1e-6)
    assert float(total2) == float(total)


@pytest.mark.parametrize("name, agg, ref", CASES, ids=[c[0] for c in CASES])
def test_all_zero_weight_cohort_is_skipped(name, agg, ref):
    out, total, _ = _finalize(agg, _stack(2), np.zeros(C, np.float32))
    assert float(total) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_centered_clipping_keeps_its_centre_in_state():
    agg = robust.centered_clipping(1.0, 2)
    ups = _stack(3)
    out, _, state = _finalize(agg, ups, np.ones(C, np.float32))
    assert_trees_close(state, out)
    # the next round starts from that centre
    out2, _, _ = agg.finalize(jax.tree.map(jnp.asarray, (ups, np.ones(C, np.float32))), state,
                              jax.random.key(0))
    expected = np_cclip(_flat(ups), None, 1.0, 2, _flat(jax.tree.map(lambda a: a[None], state))[0])
    assert_trees_close(out2, _unflat(expected), rtol=1e-4, atol=1e-5)


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="trim_fraction"):
        robust.trimmed_mean(0.5)
    with pytest.raises(ValueError, match="f"):
        robust.krum(-1)
    with pytest.raises(ValueError, match="aggregator"):
        fl.aggregators.from_name("mode")
    with pytest.raises(ValueError, match="attack"):
        attacks.attacked(fl.algorithms.fed_avg(loss_fn), "evil")
    with pytest.raises(ValueError, match="num_classes"):
        attacks.attacked(fl.algorithms.fed_avg(loss_fn), "label_flip")


# ----------------------------------------------------------------------------- attacks


def test_attacks_act_only_on_malicious_clients():
    base = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    state = base.init(init_params())
    c = cohort(num_clients=4)

    def client(i, batches=None):
        b = jax.tree.map(lambda a: a[i], c.batches) if batches is None else batches
        return fl.ClientInput(b, c.weights[i], jnp.int32(i), ())

    key = jax.random.key(0)
    honest = [base.client_update(state, client(i), key).update for i in range(2)]
    flip = attacks.attacked(base, "sign_flip", fraction=0.1, num_clients=10, scale=3.0)
    assert_trees_close(flip.client_update(state, client(0), key).update,
                       optax.tree.scale(-3.0, honest[0]))
    assert_trees_close(flip.client_update(state, client(1), key).update, honest[1])
    labels = attacks.attacked(base, "label_flip", fraction=0.1, num_clients=10, num_classes=3)
    b0 = jax.tree.map(lambda a: a[0], c.batches)
    flipped = {**b0, "y": 2 - b0["y"]}
    assert_trees_close(labels.client_update(state, client(0), key).update,
                       base.client_update(state, client(0, flipped), key).update)
    assert_trees_close(labels.client_update(state, client(1), key).update, honest[1])
    noisy = attacks.attacked(base, "gaussian", fraction=0.1, num_clients=10, noise_std=5.0)
    out = noisy.client_update(state, client(0), key)
    assert float(optax.tree.norm(out.update)) > 10 * float(optax.tree.norm(honest[0]))
    assert float(out.metrics["malicious_clients"]) == 1.0


def test_seeded_malicious_sets():
    ids = jnp.arange(1000)
    seeded = attacks.is_malicious(ids, fraction=0.3, num_clients=1000, seed=4)
    assert int(seeded.sum()) == 300 and not bool(jnp.all(seeded[:300]))
    coins = attacks.is_malicious(ids, fraction=0.3, seed=4)
    assert 240 < int(coins.sum()) < 360
    assert bool(jnp.all(coins == attacks.is_malicious(ids, fraction=0.3, seed=4)))


def _toy_round(aggregator, **hp):
    """10 clients fit x -> target; clients 0-2 (30%) send -4x their update."""
    alg = fl.algorithms.robust_fed_avg(
        lambda p, b, k: 0.5 * jnp.sum(b["mask"][:, None] * (p[None, :] - b["x"]) ** 2)
        / jnp.sum(b["mask"]),
        optax.sgd(0.5), aggregator=aggregator, attack="sign_flip", attack_fraction=0.3,
        attack_num_clients=10, attack_scale=4.0, **hp)
    rng = np.random.default_rng(0)
    x = (np.ones((10, 1, 4, 2)) + 0.1 * rng.normal(size=(10, 1, 4, 2))).astype(np.float32)
    c = fl.Cohort({"x": jnp.asarray(x), "mask": jnp.ones((10, 1, 4))}, jnp.ones(10),
                  jnp.arange(10, dtype=jnp.int32))
    state = alg.init(jnp.zeros(2))
    for _ in range(15):
        state, metrics = fl.run_round(alg, state, c, jax.random.key(0),
                                      client_map=fl.maps.sequential())
    assert float(metrics["malicious_clients"]) == 3.0
    return float(jnp.linalg.norm(state.params - 1.0))


def test_robust_rules_resist_thirty_percent_sign_flippers():
    assert _toy_round("mean") > 1.0  # the plain mean is driven away from the optimum
    for name, hp in [("median", {}), ("trimmed_mean", {"trim_fraction": 0.3}), ("krum", {"f": 3}),
                     ("multi_krum", {"f": 3, "m": 5})]:
        assert _toy_round(name, **hp) < 0.1, name


@pytest.mark.parametrize("aggregator, attack", [("median", "label_flip"),
                                                ("geometric_median", "gaussian"),
                                                ("centered_clipping", "sign_flip")])
def test_sequential_equals_vmap(aggregator, attack):
    alg = fl.algorithms.robust_fed_avg(loss_fn, optax.sgd(0.1), aggregator=aggregator,
                                       attack=attack, attack_fraction=0.25,
                                       attack_num_clients=4, num_classes=3)
    results = []
    for m in (fl.maps.sequential(), fl.maps.vmap()):
        state = alg.init(init_params())
        for _ in range(2):
            state, _ = fl.run_round(alg, state, cohort(), jax.random.key(2), client_map=m)
        results.append(state)
    assert_trees_close(results[0].params, results[1].params, rtol=1e-5, atol=1e-6)
    assert_trees_close(results[0].aggregator_state, results[1].aggregator_state)
