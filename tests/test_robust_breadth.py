"""Bulyan, FLTrust, colluding attacks (ALIE, IPM) and the backdoor vs NumPy transcriptions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn
from scipy import stats

import fedjax_lab as fl
from fedjax_lab import attacks, robust

SHAPES = {"a": (3, 2), "b": (4,)}


def _stack(seed, c):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(c,) + s).astype(np.float32) for k, s in SHAPES.items()}


def _flat(ups):
    return np.concatenate([ups[k].reshape(ups[k].shape[0], -1) for k in sorted(ups)], axis=1)


def _unflat(v):
    out, i = {}, 0
    for k in sorted(SHAPES):
        n = int(np.prod(SHAPES[k]))
        out[k] = v[i:i + n].reshape(SHAPES[k])
        i += n
    return out


# ------------------------------------------------------------------------------------ Bulyan


def np_bulyan(x, f):
    """El Mhamdi et al. 2018, Algorithm 1, written plainly (float64)."""
    x = x.astype(np.float64)
    n = len(x)
    theta, beta = n - 2 * f, n - 4 * f
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    remaining, selected = list(range(n)), []
    for _ in range(theta):  # Krum on the remaining set, theta times
        nn = max(len(remaining) - f - 2, 1)
        scores = [np.sort([d[i, j] for j in remaining if j != i])[:nn].sum() for i in remaining]
        best = remaining[int(np.argmin(scores))]
        selected.append(best)
        remaining.remove(best)
    s = x[sorted(selected)]
    med = np.median(s, axis=0)
    closest = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(s, closest, axis=0).mean(axis=0)


def _finalize(agg, ups, weights):
    state = agg.init(jax.tree.map(lambda a: jnp.zeros(a.shape[1:]), ups))
    return jax.jit(agg.finalize)(jax.tree.map(jnp.asarray, (ups, weights)), state,
                                 jax.random.key(0))


@pytest.mark.parametrize("f, c", [(1, 7), (2, 11)])
def test_bulyan_matches_numpy_and_ignores_padding(f, c):
    agg = robust.bulyan(f)
    for seed in range(3):
        ups = _stack(seed, c)
        ups["a"][seed] *= 40.0  # an outlier
        w = np.random.default_rng(seed).uniform(0.5, 2.0, size=c).astype(np.float32)
        out, total, _ = _finalize(agg, ups, w)
        assert_trees_close(out, _unflat(np_bulyan(_flat(ups), f)), rtol=1e-5, atol=1e-6)
        assert float(total) == pytest.approx(w.sum(), rel=1e-6)
    # zero-weight slots (huge values, interleaved; the real clients keep their order: Krum's
    # ties, exact when r - f - 2 = 1, break by slot) change nothing
    rng = np.random.default_rng(7)
    real = np.sort(rng.choice(c + 3, size=c, replace=False))
    padded = {k: (1e3 * rng.normal(size=(c + 3,) + v.shape[1:])).astype(np.float32)
              for k, v in ups.items()}
    for k in padded:
        padded[k][real] = ups[k]
    pw = np.zeros(c + 3, np.float32)
    pw[real] = w
    out2, total2, _ = _finalize(agg, padded, pw)
    assert_trees_close(out2, out, rtol=1e-6, atol=1e-7)
    assert float(total2) == float(total)


def test_bulyan_bounded_under_f_attackers_and_refuses_small_cohorts():
    f, c = 2, 11
    ups = _stack(3, c)
    for k in ups:  # f colluding attackers far away in the same direction
        ups[k][:f] = 1e4
    out, _, _ = _finalize(robust.bulyan(f), ups, np.ones(c, np.float32))
    honest = _flat(ups)[f:]
    got = _flat(jax.tree.map(lambda a: np.asarray(a)[None], out))[0]
    assert np.all(got >= honest.min(0)) and np.all(got <= honest.max(0))
    with pytest.raises(ValueError, match=r"4f \+ 3 = 11"):
        _finalize(robust.bulyan(2), _stack(0, 10), np.ones(10, np.float32))
    with pytest.raises(ValueError, match="f"):
        robust.bulyan(-1)
    out, total, _ = _finalize(robust.bulyan(1), _stack(0, 7), np.zeros(7, np.float32))
    assert float(total) == 0.0 and all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))


# ------------------------------------------------------------------------------------ FLTrust


def np_fltrust(x, w, g0):
    """Cao et al. 2021, Algorithm 2 (aggregation), written plainly (float64)."""
    x, g0 = x.astype(np.float64), g0.astype(np.float64)
    total, trust = np.zeros_like(g0), 0.0
    for u, wi in zip(x, w, strict=True):
        if wi <= 0:
            continue
        ts = max(0.0, float(u @ g0) / (np.linalg.norm(u) * np.linalg.norm(g0)))
        total += ts * (np.linalg.norm(g0) / np.linalg.norm(u)) * u
        trust += ts
    return total / trust


def test_fltrust_matches_numpy_and_masks_padding():
    c = 8
    g0 = _stack(9, 1)
    g0 = {k: v[0] for k, v in g0.items()}
    agg = robust.fltrust(lambda params, key: g0)
    state = agg.refresh(agg.init(jax.tree.map(jnp.zeros_like, g0)), g0, jax.random.key(0))
    assert_trees_close(state, g0)
    for seed in range(3):
        ups = _stack(seed, c)
        for k in ups:  # two updates against the root direction: trust 0
            ups[k][:2] = -3.0 * g0[k]
        w = np.random.default_rng(seed).uniform(0.5, 2.0, size=c).astype(np.float32)
        w[-1] = 0.0  # a padding slot
        ups["a"][-1] = 1e3 * g0["a"]
        parts = jax.vmap(agg.prepare, in_axes=(0, 0, None))(
            jax.tree.map(jnp.asarray, ups), jnp.asarray(w), state)
        summed = jax.tree.map(lambda a: jnp.sum(a, axis=0), parts)
        out, total, new_state = agg.finalize(summed, state, jax.random.key(0))
        g0_flat = _flat({k: v[None] for k, v in g0.items()})[0]
        assert_trees_close(out, _unflat(np_fltrust(_flat(ups), w, g0_flat)), rtol=1e-5,
                           atol=1e-6)
        assert float(total) == pytest.approx(w.sum(), rel=1e-6)
        assert_trees_close(new_state, g0)
    # nobody trusted: zeros and a skipped round
    neg = {k: -np.abs(np.broadcast_to(g0[k], (c,) + g0[k].shape)) * np.sign(g0[k])
           for k in g0}
    parts = jax.vmap(agg.prepare, in_axes=(0, 0, None))(neg, jnp.ones(c), state)
    out, total, _ = agg.finalize(jax.tree.map(lambda a: jnp.sum(a, axis=0), parts), state,
                                 jax.random.key(0))
    assert float(total) == 0.0 and all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))


def test_fltrust_root_update_runs_at_the_current_params_each_round():
    rng = np.random.default_rng(0)
    root = {"x": rng.normal(size=(2, 5, 4)).astype(np.float32),
            "y": rng.integers(0, 3, size=(2, 5)).astype(np.int32)}
    root_fn = robust.fltrust_root_update(loss_fn, root, learning_rate=0.2)

    def np_root(params):  # two SGD steps by hand (jax.grad of the same loss)
        p = params
        for s in range(2):
            batch = {"x": root["x"][s], "y": root["y"][s], "mask": np.ones(5, np.float32)}
            g = jax.grad(loss_fn)(p, batch, None)
            p = jax.tree.map(lambda a, b: a - 0.2 * b, p, g)
        return jax.tree.map(jnp.subtract, params, p)

    alg = fl.algorithms.with_aggregator(fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1)),
                                        robust.fltrust(root_fn))
    state = alg.init(init_params())
    for _ in range(2):
        before = state.params
        state, metrics = fl.run_round(alg, state, cohort(), jax.random.key(1),
                                      client_map=fl.maps.sequential())
        assert_trees_close(state.aggregator_state, np_root(before), rtol=1e-5, atol=1e-6)
        assert float(metrics["round_skipped"]) == 0.0
    with pytest.raises(TypeError, match="root_update_fn"):
        robust.fltrust("data")


# --------------------------------------------------------------------------- ALIE and IPM


def _cohort_case(seed=0, c=10):
    ups = _stack(seed, c)
    w = np.random.default_rng(seed).uniform(0.5, 2.0, size=c).astype(np.float32)
    w[-1] = 0.0  # a padding slot (also "malicious": it must not be written)
    bad = np.zeros(c, bool)
    bad[[0, 3, c - 1]] = True
    return ups, w, bad


def test_alie_and_ipm_send_exactly_the_formula():
    ups, w, bad = _cohort_case()
    x = _flat(ups).astype(np.float64)
    honest = (w > 0) & ~bad
    mu, sigma = x[honest].mean(0), x[honest].std(0)
    n, f = int((w > 0).sum()), int(((w > 0) & bad).sum())
    z_paper = stats.norm.ppf((n - (np.floor(n / 2 + 1) - f)) / n)
    assert float(attacks.alie_z(n, f)) == pytest.approx(z_paper, rel=1e-5)
    key = jax.random.key(0)
    for attack, sent in [(attacks.alie(1.5), mu - 1.5 * sigma),
                         (attacks.alie(), mu - z_paper * sigma),
                         (attacks.ipm(0.7), -0.7 * mu)]:
        out = attack.poison_cohort(jax.tree.map(jnp.asarray, ups), jnp.asarray(w),
                                   jnp.asarray(bad), key)
        expected = x.copy()
        expected[bad & (w > 0)] = sent
        np.testing.assert_allclose(_flat(jax.tree.map(np.asarray, out)), expected, rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        attacks.ipm(-1.0)
    with pytest.raises(ValueError, match="z"):
        attacks.alie(float("nan"))


def _honest_updates(base, state, c, key):
    keys = jax.random.split(jax.random.split(jax.random.fold_in(key, state.round), 3)[0],
                            c.weights.shape[0])
    out = []
    for i in range(c.weights.shape[0]):
        batches = {k: v[i] for k, v in c.batches.items()}
        client = fl.ClientInput(batches, c.weights[i], jnp.int32(i), ())
        out.append(base.client_update(state, client, keys[i]).update)
    return out


def test_ipm_in_a_round_turns_the_mean_against_the_true_mean():
    base = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    c = cohort(num_clients=4)
    key = jax.random.key(3)
    state = base.init(init_params())
    ups = np.stack([_flat({k: np.asarray(u[k]).reshape(1, -1) for k in u})[0]
                    for u in _honest_updates(base, state, c, key)])
    true_mean = ups[1:].mean(0)
    eps = 4.0  # one malicious of four: 1 * 4 > 3 honest
    alg = attacks.attacked(base, "ipm", fraction=0.25, num_clients=4, scale=eps)
    assert alg.collude is not None and alg.name == "fedavg+ipm"
    new, metrics = fl.run_round(alg, state, c, key, client_map=fl.maps.vmap())
    sent = np.concatenate([ups[:0], (-eps * true_mean)[None], ups[1:]])
    aggregate = sent.mean(0)  # equal cohort weights
    got = _flat({k: (np.asarray(state.params[k]) - np.asarray(new.params[k])).reshape(1, -1)
                 for k in state.params})[0]
    np.testing.assert_allclose(got, aggregate, rtol=1e-4, atol=1e-6)
    assert float(got @ true_mean) < 0 < float(ups.mean(0) @ true_mean)
    assert float(metrics["malicious_clients"]) == 1.0


def test_colluding_attacks_from_a_config_with_bulyan():
    from fedjax_lab import experiment

    spec = {"name": "fedavg", "attack": {"name": "alie", "fraction": 0.2, "num_clients": 7},
            "aggregator": {"name": "bulyan", "f": 1}}
    alg = experiment.build_algorithm(spec, loss_fn)
    assert alg.collude is not None and alg.aggregator.reduce == "stack"
    state, metrics = fl.run_round(alg, alg.init(init_params()), cohort(num_clients=7),
                                  jax.random.key(0), client_map=fl.maps.sequential())
    assert float(metrics["malicious_clients"]) == 1.0 and float(metrics["round_skipped"]) == 0.0


# ---------------------------------------------------------------------------------- backdoor


def test_backdoor_stamps_relabels_exactly_and_asr_matches_a_hand_count():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 4, 3, 3, 1)).astype(np.float32)  # [S, B, H, W, C]
    y = rng.integers(0, 3, size=(2, 4)).astype(np.int32)
    atk = attacks.backdoor(target_label=2, patch_size=2, patch_value=5.0, poison_fraction=0.5)
    out = atk.poison_batches({"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.bool_(True))
    ex, ey = x.copy(), y.copy()
    ex[:, :2, -2:, -2:, :] = 5.0
    ey[:, :2] = 2
    np.testing.assert_array_equal(np.asarray(out["x"]), ex)
    np.testing.assert_array_equal(np.asarray(out["y"]), ey)
    clean = atk.poison_batches({"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.bool_(False))
    np.testing.assert_array_equal(np.asarray(clean["x"]), x)
    np.testing.assert_array_equal(np.asarray(clean["y"]), y)

    model = fl.models.logistic_regression((3, 3, 1), 3)
    params = model.init(jax.random.key(1))
    n = 40
    tx = rng.uniform(size=(n, 3, 3, 1)).astype(np.float32)
    ty = rng.integers(0, 3, size=n).astype(np.int32)
    data = fl.FederatedData.from_client_arrays([{"x": tx[:25], "y": ty[:25]},
                                                {"x": tx[25:], "y": ty[25:]}])
    res = fl.evaluate(fl.metrics.backdoor_metrics(
        model, 2, attacks.pixel_patch(2, 0.7)), params, data, batch_size=16)
    stamped = tx.copy()
    stamped[:, -2:, -2:, :] = 0.7
    pred = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(stamped), train=False), -1))
    hand = np.sum((pred == 2) & (ty != 2)) / np.sum(ty != 2)
    assert 0 < hand < 1 and res["attack_success_rate"] == pytest.approx(hand)
    clean_pred = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(tx), train=False), -1))
    assert res["accuracy"] == pytest.approx(np.mean(clean_pred == ty))
    with pytest.raises(ValueError, match="poison_fraction"):
        attacks.backdoor(poison_fraction=1.5)


def test_robustness_table_smoke_writes_the_backdoor_row(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "robustness" / "table.py"
    spec = importlib.util.spec_from_file_location("robustness_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    monkeypatch.setattr(table, "SMOKE", {**table.SMOKE, "rounds": 2, "seeds": [0],
                                         "aggregators": ["fltrust"], "attacks": ["backdoor"]})
    out = tmp_path / "r.json"
    table.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    (cell,) = res["results"]
    assert (cell["aggregator"], cell["attack"], res["mode"]) == ("fltrust", "backdoor", "smoke")
    assert 0.0 <= cell["test_accuracy"] <= 1.0 and 0.0 <= cell["attack_success_rate"] <= 1.0
    assert "| backdoor (attack success rate) |" in table.markdown(res, res["settings"])
