"""FLTrust from a config: aggregator = {name = "fltrust", ...} builds its root set from a seeded
sample of the training data and equals the Python construction bit for bit."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab import experiment as exp_lib
from tests._problems import assert_trees_equal, population

ROOT = Path(__file__).resolve().parents[1]
TOML = """
[data]
name = "digits"
num_clients = 8
[model]
name = "logistic_regression"
[training]
rounds = 2
cohort_size = 4
batch_size = 8
local_steps = 2
client_map = "sequential"
[evaluation]
every = 2
[checkpoint]
every = 2
[[algorithms]]
name = "fedavg"
label = "fltrust_ipm"
client_learning_rate = 0.1
[algorithms.aggregator]
name = "fltrust"
root_examples = 20
root_batch_size = 5
root_steps = 3
root_learning_rate = 0.05
root_seed = 2
[algorithms.attack]
name = "ipm"
epsilon = 10.0
fraction = 0.25
num_clients = 8
seed = 0
"""


def test_fltrust_from_toml_equals_the_python_construction(tmp_path):
    path = tmp_path / "fltrust.toml"
    path.write_text(TOML)
    exp = exp_lib.build(exp_lib.load_config(path))
    alg = fl.algorithms.fed_avg(exp.loss_fn, optax.sgd(0.1))
    alg = fl.algorithms.with_attack(alg, fl.attacks.ipm(epsilon=10.0), fraction=0.25,
                                    num_clients=8, seed=0)
    root = fl.robust.fltrust_root_batches(exp.train, 20, 5, num_steps=3, seed=2)
    alg = fl.algorithms.with_aggregator(alg, fl.robust.fltrust(
        fl.robust.fltrust_root_update(exp.loss_fn, root, learning_rate=0.05)))
    params = exp.model.init(jax.random.key(0))
    kw = dict(num_rounds=2, cohort_size=4, batch_size=8, local_steps=2,
              client_map=fl.maps.sequential())
    built = exp.algorithms["fltrust_ipm"]
    key = jax.random.key(7)
    got, hist = fl.run_rounds(built, built.init(params, num_clients=8), exp.train, key, **kw)
    want, _ = fl.run_rounds(alg, alg.init(params, num_clients=8), exp.train, key, **kw)
    assert_trees_equal(got.params, want.params)
    assert_trees_equal(got.aggregator_state, want.aggregator_state)  # the server update g_0
    assert np.all(np.asarray(hist["round_skipped"]) == 0)
    assert np.any(np.asarray(hist["malicious_clients"]) > 0)  # the attack is on
    # the default root learning rate is the entry's client_learning_rate
    text = TOML.replace("root_learning_rate = 0.05\n", "").replace(
        "client_learning_rate = 0.1", "client_learning_rate = 0.3")
    path.write_text(text)
    default = exp_lib.build(exp_lib.load_config(path)).algorithms["fltrust_ipm"]
    agg = fl.robust.fltrust(fl.robust.fltrust_root_update(exp.loss_fn, root, learning_rate=0.3))
    g0 = agg.refresh(agg.init(params), params, key)
    assert_trees_equal(default.aggregator.refresh(default.aggregator.init(params), params, key),
                       g0)


def test_the_shipped_fltrust_config_builds_fltrust_on_the_training_data():
    exp = exp_lib.build(exp_lib.load_config(ROOT / "experiments/configs/robust_fltrust_ipm.toml"))
    alg = exp.algorithms["fltrust_ipm"]
    assert alg.aggregator.refresh is not None and alg.collude is not None
    params = exp.model.init(jax.random.key(0))
    root = fl.robust.fltrust_root_batches(exp.train, 100, 10, seed=0)
    ref = fl.robust.fltrust(fl.robust.fltrust_root_update(exp.loss_fn, root, learning_rate=0.1))
    key = jax.random.key(1)
    assert_trees_equal(alg.aggregator.refresh((), params, key), ref.refresh((), params, key))
    assert exp.algorithms["mean_ipm"].aggregator.refresh is None


def test_root_batches_are_a_seeded_sample_of_the_training_examples():
    data = population(sizes=(6, 9, 5, 10))  # 30 examples
    x = np.asarray(data.examples["x"])
    one = fl.robust.fltrust_root_batches(data, 12, 5, seed=3)
    assert one["x"].shape == (3, 5, x.shape[1]) and one["y"].shape == (3, 5)
    assert one["mask"].tolist() == [[1.0] * 5, [1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0]]
    real = one["x"].reshape(-1, x.shape[1])[one["mask"].ravel() > 0]
    rows = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in real]
    assert len(set(rows)) == 12  # distinct training examples, each once
    ys = one["y"].ravel()[one["mask"].ravel() > 0]
    np.testing.assert_array_equal(ys, np.asarray(data.examples["y"])[rows])
    again = fl.robust.fltrust_root_batches(data, 12, 5, seed=3)
    assert all(np.array_equal(one[k], again[k]) for k in one)
    other = fl.robust.fltrust_root_batches(data, 12, 5, seed=4)
    assert not np.array_equal(one["x"], other["x"])
    # num_steps past one pass: every position real, the same 12 examples in fresh epochs
    many = fl.robust.fltrust_root_batches(data, 12, 5, num_steps=6, seed=3)
    assert many["mask"].sum() == 30
    used = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in many["x"].reshape(30, -1)]
    assert set(used) == set(rows)
    counts = np.bincount(used, minlength=30)[sorted(rows)]
    assert counts.min() >= 2 and counts.max() <= 3  # 2.5 epochs: each example 2 or 3 times


@pytest.mark.parametrize("line, bad, match", [
    ("root_seed = 2", "root_size = 10", r"aggregator.root_size: unknown key; allowed: "
     r"'root_batch_size', 'root_examples', 'root_learning_rate', 'root_seed', 'root_steps'"),
    ("root_examples = 20", "root_examples = 5000",
     r"aggregator.root_examples: 5000 is more than the \d+ training examples"),
    ("root_learning_rate = 0.05", "root_learning_rate = 0.0",
     r"aggregator.root_learning_rate: must be a finite number > 0"),
    ("root_steps = 3", "root_steps = 0", r"aggregator.root_steps: must be >= 1"),
    ("root_seed = 2", "root_seed = 1.5", r"aggregator.root_seed: expected int"),
])
def test_a_bad_fltrust_table_is_refused_naming_the_key(tmp_path, line, bad, match):
    path = tmp_path / "bad.toml"
    path.write_text(TOML.replace(line, bad))
    with pytest.raises(exp_lib.ConfigError, match=match):
        exp_lib.build(exp_lib.load_config(path))


def test_bad_root_sets_are_refused_naming_the_argument():
    data = population(sizes=(3, 4))
    with pytest.raises(ValueError, match="num_examples: the root set is drawn from the 7 "
                                         "training examples without replacement; got 8"):
        fl.robust.fltrust_root_batches(data, 8, 2)
    with pytest.raises(ValueError, match="batch_size: expected a whole number >= 1"):
        fl.robust.fltrust_root_batches(data, 4, 0)
    with pytest.raises(TypeError, match="data: expected the training data"):
        fl.robust.fltrust_root_batches({"x": np.ones(3)}, 2, 1)
    with pytest.raises(exp_lib.ConfigError, match=r"aggregator.name: got 'fltrst'; allowed: "
                                                  r".*'fltrust'"):
        exp_lib.validate({"algorithms": [{"name": "fedavg",
                                          "aggregator": {"name": "fltrst"}}]})
