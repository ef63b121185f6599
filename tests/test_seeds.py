"""Seeds as one program: each seed of ``fl.sweep.run_seeds`` (and of ``training.seeds``) equals
its single run, and the summary reports mean ± 95% CI over them.

``seed_map="map"`` runs each seed's own one-seed computation inside the program, so it is
compared bit for bit; ``"vmap"`` batches the seeds' matrix products (XLA may sum them in another
order) and is compared to float rounding, as the sweep tests do.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, assert_trees_equal, init_params, loss_fn, population

import fedjax_lab as fl
from fedjax_lab import checkpoint as ckpt
from fedjax_lab import cli

DATA = population()
ALG = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3))
RUN = dict(cohort_size=4, batch_size=3, client_map=fl.maps.sequential())
SEEDS = (0, 1, 2)


def _start(seed):
    return ALG.init(init_params(seed)), jax.random.key(100 + seed)


@pytest.fixture(scope="module")
def singles():
    return [fl.run_rounds(ALG, _start(s)[0], DATA, _start(s)[1], num_rounds=4, **RUN)
            for s in SEEDS]


def _stacked():
    starts = [_start(s) for s in SEEDS]
    return (fl.sweep.stack_seeds([s for s, _ in starts]),
            fl.sweep.stack_seeds([k for _, k in starts]))


@pytest.mark.parametrize("seed_map", ["map", "vmap"])
def test_each_seed_equals_its_single_run(singles, seed_map):
    states, keys = _stacked()
    got, hist = fl.sweep.run_seeds(ALG, states, DATA, keys, num_rounds=4, seed_map=seed_map,
                                   **RUN)
    compare = assert_trees_equal if seed_map == "map" else assert_trees_close
    for i, (state, single_hist) in enumerate(singles):
        compare(jax.tree.map(lambda x, i=i: x[i], got.params), state.params)
        compare(hist["train_loss"][i], single_hist["train_loss"])
        np.testing.assert_array_equal(hist["client_ids"][i], single_hist["client_ids"])
    # Different seeds really are different runs.
    assert len({float(np.asarray(h["train_loss"])[-1]) for _, h in singles}) == len(SEEDS)


def test_two_blocks_equal_one(singles):
    states, keys = _stacked()
    mid, _ = fl.sweep.run_seeds(ALG, states, DATA, keys, num_rounds=2, seed_map="map", **RUN)
    end, _ = fl.sweep.run_seeds(ALG, mid, DATA, keys, num_rounds=2, seed_map="map", **RUN)
    for i, (state, _) in enumerate(singles):
        assert_trees_equal(jax.tree.map(lambda x, i=i: x[i], end.params), state.params)


def test_bad_seed_arguments_are_refused():
    states, keys = _stacked()
    with pytest.raises(ValueError, match="seed_map: expected 'vmap', 'map' or 'auto'"):
        fl.sweep.run_seeds(ALG, states, DATA, keys, num_rounds=1, seed_map="pmap", **RUN)
    with pytest.raises(TypeError, match="keys: expected typed PRNG keys"):
        fl.sweep.run_seeds(ALG, states, DATA, np.zeros(3), num_rounds=1, **RUN)


CONFIG = {
    "name": "seeds",
    "data": {"name": "digits", "num_clients": 12, "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [8]},
    "training": {"rounds": 4, "cohort_size": 3, "batch_size": 10, "client_map": "sequential",
                 "seed": 5},
    "evaluation": {"every": 2},
    "checkpoint": {"every": 2, "keep": 2},
    "algorithms": [{"name": "fedavg", "client_learning_rate": 0.1}],
}


def test_cli_seeds_report_mean_ci95_and_equal_single_runs(tmp_path):
    """``seeds = 3``: one run of three seeds; seed 6's params equal the single run seed = 6."""
    many = cli.run_experiment(CONFIG, tmp_path / "many", progress=False, seeds=3)
    s = many["runs"]["fedavg"]
    assert s["seeds"] == [5, 6, 7]
    acc = s["test_accuracy"]
    assert acc["n"] == 3 and len(acc["per_seed"]) == 3
    np.testing.assert_allclose(acc["mean"], np.mean(acc["per_seed"]), rtol=1e-12)
    t = 4.302652729749464  # Student's t_{0.975, 2}
    np.testing.assert_allclose(acc["ci95"], t * np.std(acc["per_seed"], ddof=1) / np.sqrt(3),
                               rtol=1e-9)
    assert len(set(s["params_sha256"])) == 3
    written = json.loads((tmp_path / "many" / "fedavg" / "summary.json").read_text())
    assert written["params_sha256"] == s["params_sha256"]

    one = cli.run_experiment({**CONFIG, "training": {**CONFIG["training"], "seed": 6}},
                             tmp_path / "one", progress=False)
    single = one["runs"]["fedavg"]
    assert single["params_sha256"] == s["params_sha256"][1]
    assert single["test_accuracy"] == acc["per_seed"][1]

    # The seeds' checkpoint is one stacked state: its params hash per seed as the summary's.
    step = ckpt.latest_step(tmp_path / "many" / "fedavg" / "checkpoints")
    assert step == 4
