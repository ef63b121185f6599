"""The algorithm kit and configs that compose parts: equivalences, uniform signatures, checks."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_equal, cohort, init_params, loss_fn

import fedjax_lab as fl
from fedjax_lab import experiment as exp_lib
from fedjax_lab import kit

ROOT = Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)
FEDOPT_FAMILY = {"fedadam", "fedyogi", "fedadagrad", "fedavgm"}  # fix their server optimiser


def test_local_training_correction_and_regulariser_match_a_hand_written_loop():
    """g + shift fed to SGD, the raw g summed, a proximal term: one NumPy-free manual scan."""
    c = cohort(num_clients=1, steps=3, batch=2)
    batches = jax.tree.map(lambda a: a[0], c.batches)
    batches["mask"] = batches["mask"].at[1].set(0.0)  # a padding step changes nothing
    shift = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), init_params())
    mu, lr = 0.3, 0.1
    train = kit.local_training(
        loss_fn, optax.sgd(lr), regularizer=kit.proximal(mu),
        correction=lambda g, *_: (optax.tree.add(g, shift), g),
    )
    got = train(init_params(), batches, KEY)

    x0, y, total = init_params(), init_params(), jax.tree.map(jnp.zeros_like, init_params())
    for s in (0, 2):
        b = jax.tree.map(lambda a, s=s: a[s], batches)
        g = jax.grad(lambda p, b=b: loss_fn(p, b, None) + kit.proximal(mu)(p, x0))(y)
        total = optax.tree.add(total, g)
        y = jax.tree.map(lambda p, gi, si: p - lr * (gi + si), y, g, shift)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got.stats), jax.tree.leaves(total), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(got.metrics["num_steps"]) == 2.0


def test_stateless_aggregator_is_the_weighted_mean_when_written_as_one():
    mean = kit.stateless_aggregator(
        lambda u, w: (optax.tree.scale(w, u), w),
        lambda c: (optax.tree.scale(1.0 / c[1], c[0]), c[1]),
    )
    alg_a = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    alg_b = fl.algorithms.with_aggregator(alg_a, mean)
    c = cohort(num_clients=4)
    sa, _ = fl.run_round(alg_a, alg_a.init(init_params()), c, KEY)
    sb, _ = fl.run_round(alg_b, alg_b.init(init_params()), c, KEY)
    assert_trees_equal(sa.params, sb.params)


def test_every_algorithm_has_the_uniform_signature():
    for name, factory in fl.algorithms.REGISTRY.items():
        params = list(inspect.signature(factory).parameters.values())
        assert [p.name for p in params[:2]] == ["loss_fn", "client_optimizer"], name
        rest = params[3:] if name == "fedopt" else params[2:]  # fed_opt(loss, opt, server_opt)
        assert all(p.kind is p.KEYWORD_ONLY for p in rest), name
        assert not any(p.kind is p.VAR_KEYWORD for p in params), name  # typos are caught
        names = {p.name for p in params}
        if name not in FEDOPT_FAMILY:
            assert {"server_optimizer", "server_learning_rate"} <= names, name
        assert "beta" not in names, name  # roles, not symbols: the docstring gives the symbol


def test_no_algorithm_file_imports_another_ones_private_names():
    for path in (ROOT / "fedjax_lab" / "algorithms").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "fedjax_lab.algorithms."
            ) and node.module != "fedjax_lab.algorithms._registry":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, (path.name, node.module, private)


def test_import_does_not_load_the_cli_orbax_or_dp_accounting():
    code = ("import sys, fedjax_lab; print(sorted(m for m in ('orbax', 'dp_accounting', "
            "'fedjax_lab.cli', 'fedjax_lab.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


def test_fl_sweep_is_the_module_and_its_advice_works():
    assert fl.sweep.grid is fl.grid and fl.run_sweep is fl.sweep.sweep
    with pytest.raises(ValueError, match=r"fl\.grid\(lr="):
        fl.run_sweep(lambda **h: None, [], init_params, None, num_rounds=1, cohort_size=1,
                     batch_size=1)


def test_with_aggregator_refuses_algorithms_that_send_more_than_the_delta():
    with pytest.raises(ValueError, match="aggregator: scaffold's clients send more"):
        fl.algorithms.with_aggregator(fl.algorithms.scaffold(loss_fn),
                                      fl.aggregators.trimmed_mean())
    with pytest.raises(ValueError, match="error_feedback"):
        fl.algorithms.with_compression(fl.algorithms.fed_nova(loss_fn),
                                       fl.compression.top_k(0.1), error_feedback="ef")


def test_composed_config_equals_the_combinators_applied_by_hand():
    spec = {"name": "fedadam", "label": "x", "server_learning_rate": 0.03,
            "client_learning_rate": 0.1,
            "aggregator": {"name": "trimmed_mean", "trim_fraction": 0.25},
            "attack": {"name": "sign_flip", "scale": 4.0, "fraction": 0.25, "num_clients": 10},
            "compression": {"name": "top_k", "fraction": 0.5, "error_feedback": "ef"}}
    built = exp_lib.build_algorithm(spec, loss_fn)
    by_hand = fl.algorithms.fed_adam(loss_fn, optax.sgd(0.1), server_learning_rate=0.03)
    by_hand = fl.algorithms.with_attack(by_hand, fl.attacks.sign_flip(4.0), fraction=0.25,
                                        num_clients=10)
    by_hand = fl.algorithms.with_compression(by_hand, fl.compression.top_k(0.5),
                                             error_feedback="ef")
    by_hand = fl.algorithms.with_aggregator(by_hand, fl.aggregators.trimmed_mean(0.25))
    c = cohort(num_clients=4)
    results = []
    for alg in (built, by_hand):
        state = alg.init(init_params(), num_clients=10)
        for _ in range(2):
            state, metrics = fl.run_round(alg, state, c, KEY)
        results.append((state, metrics))
    assert_trees_equal(results[0][0].params, results[1][0].params)
    assert_trees_equal(results[0][0].client_states, results[1][0].client_states)
    assert float(results[0][1]["malicious_clients"]) == 2.0  # round(0.25 * 10): ids 0, 1
    assert float(results[0][1]["bits_sent"]) > 0
    assert built.aggregator.reduce == "stack" and built.name == "x"


def test_per_layer_server_optimiser_from_a_config():
    spec = {"name": "fedopt", "client_learning_rate": 0.1,
            "server_optimizer": {"name": "fed_sgd", "learning_rate": 0.0,
                                 "rules": [{"match": "'b'", "name": "fed_sgd",
                                            "learning_rate": 1.0}]}}
    with pytest.raises(exp_lib.ConfigError, match="learning_rate"):  # 0 is not a rate
        exp_lib.validate({"algorithms": [spec]})
    spec["server_optimizer"]["learning_rate"] = 1e-30  # the kernel 'w' barely moves
    alg = exp_lib.build_algorithm(spec, loss_fn)
    state, _ = fl.run_round(alg, alg.init(init_params()), cohort(), KEY)
    np.testing.assert_allclose(state.params["w"], init_params()["w"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(state.params["b"] - init_params()["b"]))) > 1e-4


@pytest.mark.parametrize("section, table, message", [
    ("aggregator", {"name": "trimmed_mean", "beta": 0.1},
     "algorithms[0].aggregator.beta: not an option of aggregator 'trimmed_mean'; allowed: "
     "'trim_fraction'"),
    ("aggregator", {"name": "mode"}, "algorithms[0].aggregator.name: got 'mode'; allowed:"),
    ("attack", {"name": "sign_flip", "fracton": 0.1},
     "algorithms[0].attack.fracton: not an option of attack 'sign_flip'"),
    ("compression", {"name": "top_k", "k_frac": 0.1},
     "algorithms[0].compression.k_frac: not an option of compressor 'top_k'"),
    ("privacy", {"noise": 1.0}, "algorithms[0].privacy.noise: unknown key; allowed:"),
    ("server_optimizer", {"name": "fed_adam", "learning_rate": 0.1, "beta1": 0.9},
     "algorithms[0].server_optimizer.beta1: not an option of server optimizer 'fed_adam'"),
    ("server_optimizer", {"name": "fed_sgd", "learning_rate": 1.0,
                          "rules": [{"name": "sgd", "learning_rate": 1.0}]},
     "algorithms[0].server_optimizer.rules[0].match: required"),
])
def test_every_misspelt_part_key_is_refused_before_data_loads(section, table, message,
                                                              monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(exp_lib, "_load_data", no_data)
    with pytest.raises(exp_lib.ConfigError) as e:
        exp_lib.build({"algorithms": [{"name": "fedavg", section: table}]})
    assert message in str(e.value)


def test_misspelt_algorithm_keys_are_refused_for_every_algorithm():
    for name in fl.algorithms.REGISTRY:
        with pytest.raises(exp_lib.ConfigError, match=rf"algorithms\[0\]\.serverlr: not a "
                                                      rf"hyper-parameter of '{name}'"):
            exp_lib.validate({"algorithms": [{"name": name, "serverlr": 1.0}]})


def test_server_optimizer_table_on_an_algorithm_that_fixes_its_own():
    with pytest.raises(exp_lib.ConfigError, match="fixes its own server optimiser"):
        exp_lib.validate({"algorithms": [{"name": "fedadam", "server_optimizer":
                                          {"name": "sgd", "learning_rate": 1.0}}]})
