"""Sweep axes beyond scalar hyper-parameters: each row equals the corresponding single run.

Tolerance: rows equal :func:`fl.run_rounds` to ``rtol=1e-5`` (the sweep traces the configuration
values, so XLA may fuse a multiply differently: observed differences are ~1 ulp), the same
tolerance as ``test_sweep.py``; the malicious masks and the mixed attack are checked exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import NUM_CLASSES, NUM_FEATURES, init_params, loss_fn

import fedjax_lab as fl

RNG = np.random.default_rng(0)
EXAMPLES = {
    "x": RNG.normal(size=(60, NUM_FEATURES)).astype(np.float32),
    "y": RNG.integers(0, NUM_CLASSES, size=60).astype(np.int32),
}
KW = dict(num_rounds=3, cohort_size=3, batch_size=4, client_map=fl.maps.sequential())


def init(key):
    del key
    return init_params()


def make_fedavg(lr):
    return fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(lr))


def single(alg, data, seed, **kw):
    init_key, run_key = jax.random.split(jax.random.key(seed))
    state = alg.init(init(init_key), num_clients=data.num_clients)
    return fl.run_rounds(alg, state, data, run_key, **{**KW, **kw})[1]


def test_dirichlet_axis_rows_equal_runs_on_each_partition():
    axis = fl.sweep.dirichlet_axis(EXAMPLES, 6, [0.1, 100.0], min_size=2, seed=1)
    sizes = [d.client_sizes.max() for d in axis.data]
    assert sizes[0] != sizes[1]  # the partitions really are padded to a common client size
    rows = fl.run_sweep(make_fedavg, fl.grid(lr=[0.1, 0.5]), init, axis, seeds=(0, 3), **KW)
    assert [(r["lr"], r["alpha"], r["seed"]) for r in rows[:4]] == [
        (0.1, 0.1, 0), (0.1, 0.1, 3), (0.1, 100.0, 0), (0.1, 100.0, 3)]
    algs = {lr: make_fedavg(lr) for lr in (0.1, 0.5)}  # one compile per (lr, population)
    for r in rows[1::2]:
        data = axis.data[axis.values.index(r["alpha"])]
        hist = single(algs[r["lr"]], data, r["seed"])
        np.testing.assert_allclose(r["final_train_loss"], float(hist["train_loss"][-1]),
                                   rtol=1e-5)
    assert len({round(r["final_train_loss"], 5) for r in rows}) == len(rows)


def make_attacked(scale, malicious_fraction, malicious, noise, flip):
    del malicious_fraction  # reported in the rows; the mask says who is malicious
    alg = fl.algorithms.robust_fed_avg(
        loss_fn, optax.sgd(0.3), aggregator="mean",
        attack=fl.attacks.mixed(scale, noise, flip, num_classes=NUM_CLASSES),
        attack_malicious=malicious,
    )
    return alg


def test_malicious_fraction_axis_and_mixed_attack_rows_equal_named_attacks():
    data = fl.FederatedData.from_client_indices(
        EXAMPLES, fl.partition.iid(60, 6, seed=0))
    attacks = [("sign_flip", dict(scale=-1.0, noise=0.0, flip=0.0)),
               ("gaussian", dict(scale=1.0, noise=1.0, flip=0.0)),
               ("label_flip", dict(scale=1.0, noise=0.0, flip=1.0))]
    configs = fl.grid(fl.sweep.malicious_axis([0.0, 0.5], 6, seed=2), [a for _, a in attacks])
    rows = fl.run_sweep(make_attacked, configs, init, data, seeds=(0,), **KW)
    assert len(rows) == 6 and "malicious" not in rows[0]
    assert [r["malicious_fraction"] for r in rows] == [0.0] * 3 + [0.5] * 3
    for (f, (name, _)), r in zip([(f, a) for f in (0.0, 0.5) for a in attacks], rows,
                                 strict=True):
        if f == 0.0 and name != "sign_flip":
            continue  # without malicious clients every attack is the honest run: one check
        alg = fl.algorithms.robust_fed_avg(
            loss_fn, optax.sgd(0.3), aggregator="mean", attack=name, attack_fraction=f,
            attack_num_clients=6, attack_seed=2, num_classes=NUM_CLASSES)
        hist = single(alg, data, 0)
        np.testing.assert_allclose(r["final_train_loss"], float(hist["train_loss"][-1]),
                                   rtol=1e-5)
    # the fraction matters: 50% malicious differs from none for every attack
    assert all(abs(rows[i]["final_train_loss"] - rows[i + 3]["final_train_loss"]) > 1e-4
               for i in range(3))


def test_malicious_mask_is_is_malicious_and_mixed_attack_is_exact():
    ids = jnp.arange(10)
    for f, seed in [(0.3, 0), (0.5, None), (0.0, 4), (1.0, 1)]:
        np.testing.assert_array_equal(
            fl.attacks.malicious_mask(f, 10, seed),
            fl.attacks.is_malicious(ids, fraction=f, num_clients=10, seed=seed))
    u = {"w": jnp.asarray(RNG.normal(size=(5,)), jnp.float32)}
    key, bad = jax.random.key(3), jnp.bool_(True)
    for named, coef in [(fl.attacks.sign_flip(), (-1.0, 0.0)), (fl.attacks.scale(), (10.0, 0.0)),
                        (fl.attacks.gaussian(), (1.0, 1.0))]:
        got = jax.jit(lambda s, z: fl.attacks.mixed(s, z).poison_update(u, bad, key))(*coef)
        np.testing.assert_array_equal(got["w"], named.poison_update(u, bad, key)["w"])


def make_dp(noise_multiplier):
    return fl.algorithms.dp_fed_avg(loss_fn, optax.sgd(0.3), noise_multiplier=noise_multiplier,
                                    clip_norm=0.5, expected_cohort_size=3.0,
                                    adaptive_clipping=True, clipped_count_stddev=3.0)


def test_noise_axis_rows_equal_single_runs_and_report_epsilon():
    data = fl.FederatedData.from_client_indices(EXAMPLES, fl.partition.iid(60, 6, seed=0))
    acc = fl.sweep.DPAccounting(sampling_rate=0.5, delta=1e-3, accountants=("rdp", "pld"))
    rows = fl.run_sweep(make_dp, fl.grid(noise_multiplier=[0.0, 1.0, 2.0]), init, data,
                        dp_accounting=acc, **KW)
    assert rows[0]["epsilon_rdp"] == float("inf")
    for r in rows[:2]:
        hist = single(make_dp(r["noise_multiplier"]), data, 0)
        np.testing.assert_allclose(r["final_train_loss"], float(hist["train_loss"][-1]),
                                   rtol=1e-5)
    for r in rows:
        for a in ("rdp", "pld"):
            assert r[f"epsilon_{a}"] == fl.privacy.epsilon(r["noise_multiplier"], 0.5, 3, 1e-3,
                                                           accountant=a)
    assert rows[1]["final_train_loss"] != rows[2]["final_train_loss"]  # the noise is traced
    assert rows[1]["epsilon_rdp"] > rows[2]["epsilon_rdp"] > 0


def test_axes_reject_bad_values():
    data = fl.FederatedData.from_client_indices(EXAMPLES, fl.partition.iid(60, 6, seed=0))
    with pytest.raises(ValueError, match="alphas"):
        fl.sweep.dirichlet_axis(EXAMPLES, 6, [0.1, -1.0])
    with pytest.raises(ValueError, match="alphas"):
        fl.sweep.dirichlet_axis(EXAMPLES, 6, [])
    with pytest.raises(ValueError, match="label_key"):
        fl.sweep.dirichlet_axis(EXAMPLES, 6, [1.0], label_key="label")
    other = fl.FederatedData.from_client_indices(EXAMPLES, fl.partition.iid(60, 5, seed=0))
    with pytest.raises(ValueError, match="clients"):
        fl.sweep.data_axis("alpha", {1.0: data, 2.0: other})
    with pytest.raises(ValueError, match="fractions"):
        fl.sweep.malicious_axis([0.1, 1.5], 6)
    with pytest.raises(ValueError, match="positional axis"):
        fl.grid({"a": 1})
    sweep = functools.partial(fl.run_sweep, init_params=init, train_data=data, **KW)
    acc = fl.sweep.DPAccounting(0.5, 1e-3)
    with pytest.raises(ValueError, match="noise multiplier"):
        sweep(make_dp, fl.grid(noise_multiplier=[-1.0]), dp_accounting=acc)
    with pytest.raises(ValueError, match="no 'noise_multiplier'"):
        sweep(make_fedavg, fl.grid(lr=[0.1]), dp_accounting=acc)
    with pytest.raises(ValueError, match="delta"):
        sweep(make_dp, fl.grid(noise_multiplier=[1.0]),
              dp_accounting=fl.sweep.DPAccounting(0.5, 2.0))
    masks = [{"m": np.zeros(6, bool)}, {"m": np.zeros(5, bool)}]
    with pytest.raises(ValueError, match="shape"):
        sweep(lambda m: make_fedavg(0.1), masks)
    with pytest.raises(ValueError, match="number or an array"):
        sweep(make_fedavg, [{"lr": "fast"}])
    axis = fl.sweep.dirichlet_axis(EXAMPLES, 6, [1.0], name="lr")
    with pytest.raises(ValueError, match="data axis name"):
        fl.run_sweep(make_fedavg, fl.grid(lr=[0.1]), init, axis, **KW)
    with pytest.raises(ValueError, match="malicious"):
        fl.attacks.attacked(make_fedavg(0.1), "sign_flip", malicious=np.zeros((2, 3), bool))
