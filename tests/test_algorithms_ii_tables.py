"""experiments/algorithms_ii/tables.py: the smoke run writes all three tables, and its numbers
(epsilon, bits, the traced-scale attacks) equal independent computations."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "algorithms_ii" / "tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("algorithms_ii_tables", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_smoke_run_writes_three_tables_with_independently_checked_numbers(tables, tmp_path, capsys):
    out = tmp_path / "results.json"
    returned = tables.main(["--smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["mode"] == "smoke" and res["attacks"] == json.loads(json.dumps(returned["attacks"]))
    for title in (
        "### attacks",
        "### dp",
        "### compression",
        "| coordinate-wise median |",
        "| adaptive | 0.5 |",
        "| top_k(0.1) | ef21 |",
    ):
        assert title in printed

    attacks = res["attacks"]
    assert [r["attack"] for r in attacks["results"]] == ["none", "sign_flip", "scale"]
    assert [r["attack_scale"] for r in attacks["results"]] == [1.0, -1.0, 10.0]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in attacks["results"])

    dp = res["dp"]
    (row,) = dp["results"]
    s = dp["settings"]
    assert s["delta"] == pytest.approx(s["num_clients"] ** -1.1)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            s["sampling_rate"], dp_accounting.GaussianDpEvent(row["noise_multiplier"])
        ),
        s["rounds"],
    )
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(event)
    assert row["epsilon_rdp"] == pytest.approx(rdp.get_epsilon(s["delta"]), rel=1e-9)
    assert row["epsilon_pld"] == pytest.approx(pld.get_epsilon(s["delta"]), rel=1e-9)
    assert s["p_cohort_overflow_per_round"] < 1e-3  # the cohort holds every sampled client
    # The update noise the table reports is the one the adaptive DP aggregator adds.
    m = s["expected_cohort_size"]
    agg = fl.privacy.dp_aggregator(
        row["noise_multiplier"], 1.0, expected_cohort_size=m, adaptive=True
    )
    zeros = {"w": jnp.zeros(200_000)}
    state = agg.init(zeros)
    noisy, _, _ = agg.finalize(
        agg.prepare(zeros, jnp.float32(1.0), state), state, jax.random.key(0)
    )
    assert float(jnp.std(noisy["w"])) * m == pytest.approx(row["update_noise_multiplier"], rel=0.01)

    comp = res["compression"]
    (row,) = comp["results"]
    d = comp["settings"]["num_params"]
    assert d == 8 * 8 * 16 + 16 + 16 * 10 + 10  # the smoke MLP 64-16-10
    k = math.ceil(0.1 * d)
    assert row["bits_per_client"] == k * (32 + math.ceil(math.log2(d)))  # values + indices
    assert row["bits_per_round"] == row["bits_per_client"] * comp["settings"]["cohort_size"]
    assert row["compression_ratio"] == pytest.approx(32 * d / row["bits_per_client"])


def _loss(params, batch, key):
    del key
    err = (batch["x"] @ params - batch["y"].astype(jnp.float32)) ** 2
    return jnp.sum(batch["mask"] * err) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def test_traced_scale_attack_is_sign_flip_and_no_attack(tables):
    """The table runs none / sign-flip / x10 as one program: attack 'scale' with factor s."""
    n = 10
    settings = tuple(
        sorted(
            {
                "cohort_size": 5,
                "num_clients": n,
                "client_learning_rate": 0.1,
                "gm_iters": 3,
                "cc_tau": 0.1,
                "cc_iters": 1,
                "attack_seed": 0,
                "gaussian_noise_std": 1.0,
            }.items()
        )
    )
    rng = np.random.default_rng(0)
    batches = {
        "x": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, size=(2, 3)), jnp.int32),
        "mask": jnp.ones((2, 3), jnp.float32),
    }
    params = jnp.asarray(rng.normal(size=4), jnp.float32)

    def updates(alg):
        state = alg.init(params, num_clients=n)
        return [
            alg.client_update(
                state,
                fl.ClientInput(batches, jnp.float32(1.0), jnp.int32(i), ()),
                jax.random.key(i),
            ).update
            for i in range(n)
        ]

    registry = fl.algorithms.REGISTRY["robust_fedavg"]
    common = {
        "aggregator": "median",
        "attack_fraction": 0.3,
        "attack_num_clients": n,
        "attack_seed": 0,
        "num_classes": 10,
    }
    honest = updates(registry(_loss, attack="none", **common))
    flipped = updates(registry(_loss, attack="sign_flip", **common))
    as_flip = updates(tables.make_robust(_loss, "median", "scale", 0.3, settings, scale=-1.0))
    as_none = updates(tables.make_robust(_loss, "median", "scale", 0.3, settings, scale=1.0))
    bad = fl.attacks.is_malicious(jnp.arange(n), fraction=0.3, num_clients=n, seed=0)
    assert int(jnp.sum(bad)) == 3
    for i in range(n):
        np.testing.assert_array_equal(as_flip[i], flipped[i])
        np.testing.assert_array_equal(as_none[i], honest[i])
        np.testing.assert_array_equal(flipped[i], -honest[i] if bad[i] else honest[i])
    assert float(jnp.linalg.norm(honest[int(jnp.argmax(bad))])) > 0  # the flip changed something


def test_loop_vs_axes_comparison_reports_ratio_and_differences(tables):
    """``--runner both``'s bookkeeping: equal cells and settings, the ratio, the differences."""
    settings = {"alphas": [0.1, 1.0]}

    def table(wall, accs):
        rows = [{"method": "fedavg", "alpha": a, "test_accuracy": float(np.mean(acc)),
                 "per_seed": acc} for a, acc in zip(settings["alphas"], accs, strict=True)]
        return {"settings": settings, "results": rows, "wall_time_s": wall, "cpu_time_s": wall}

    loop = table(30.0, [[0.5, 0.6], [0.7, 0.8]])
    axes = table(10.0, [[0.5, 0.6], [0.7, 0.75]])
    c = tables.compare(loop, axes)
    assert c["speedup"] == 3.0 and c["runs"] == 4 and c["identical_runs"] == 3
    assert c["max_abs_accuracy_difference"] == pytest.approx(0.05)
    assert c["loop_results"] == loop["results"]
    total = tables.summarize({"heterogeneity": {**axes, "loop_vs_axes": c}, "dp": {}})
    assert total["tables"] == ["heterogeneity"] and total["speedup"] == 3.0
    assert tables.summarize({"dp": {}}) == {"tables": []}
    other = table(10.0, [[0.5, 0.6], [0.7, 0.8]])
    other["results"][1]["alpha"] = 100.0  # a different cell: not the same table
    with pytest.raises(RuntimeError, match="differ beyond the accuracy"):
        tables.compare(loop, other)
    with pytest.raises(RuntimeError, match="different tables"):
        tables.compare(loop, {**axes, "settings": {"alphas": [0.1]}})
