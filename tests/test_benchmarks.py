"""The benchmark suite's baseline is honest, and the suite runs end to end (tiny shapes)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

import fedjax_lab as fl

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_run", ROOT / "experiments/benchmarks/run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_loop_computes_the_engines_round(bench):
    """The per-batch Python loop the suite compares against trains exactly the engine's round."""
    spec = dict(model="logreg", population=6, client_size=30, steps=3, batch=5, cohort=4)
    model, kind, lr = bench._model(spec)
    loss_fn = fl.models.classification_loss(model)
    opt = optax.sgd(lr)
    params = model.init(jax.random.key(0))
    data = bench._data(spec, "logreg", kind)
    batches, cohort = bench.loop_cohort(jax, data, spec, 4)
    timing, loop_params = bench.python_loop(jax, loss_fn, opt, params, batches, cohort.weights)
    alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=opt)
    state, _ = fl.run_round(
        alg, alg.init(params), cohort, jax.random.key(3), client_map=fl.maps.sequential()
    )
    assert timing["clients"] == 4 and timing["examples_per_s"] > 0
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True)
    )
    assert moved > 1e-3  # the round did train
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(loop_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_suite_writes_every_field(bench, tmp_path):
    out = tmp_path / "results.json"
    bench.main(["--smoke", "--no-maps", "--no-split", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["matmul_peak_gflops"] > 0
    assert {c["name"] for c in results["cases"]} == {"logreg_c10", "mlp_c10"}
    for case in results["cases"]:
        for field in ("examples_per_s", "fraction_of_peak", "vs_python_loop", "compile_s"):
            assert case[field] >= 0, (case["name"], field)
        # Achieved FLOP/s above the measured matmul peak would mean a wrong FLOP count.
        assert 0 < case["fraction_of_peak"] < 1.5
        assert case["auto_picks"] == fl.maps.choose(case["cohort"]).name
    assert "| logreg_c10 |" in bench.table(results)


def test_the_loop_baseline_is_the_faster_of_both_hosts(bench):
    cases = [
        {
            "name": "a",
            "examples_per_s": 300.0,
            "python_loop_examples_per_s": 100.0,
            "python_loop_fraction_of_peak": 0.1,
            "vs_python_loop": 3.0,
        },
        {
            "name": "b",
            "examples_per_s": 300.0,
            "python_loop_examples_per_s": 150.0,
            "python_loop_fraction_of_peak": 0.2,
            "vs_python_loop": 2.0,
        },
    ]
    child = [
        {"name": "a", "python_loop_examples_per_s": 200.0, "examples_per_s": 120.0},
        {"name": "b", "python_loop_examples_per_s": 50.0},
    ]
    split = bench.merge_one_device(cases, child)
    assert cases[0]["python_loop_examples_per_s"] == 200.0 and cases[0]["vs_python_loop"] == 1.5
    assert cases[0]["python_loop_fraction_of_peak"] == pytest.approx(0.2)
    assert cases[1]["python_loop_examples_per_s"] == 150.0 and cases[1]["vs_python_loop"] == 2.0
    assert cases[1]["python_loop_one_device_examples_per_s"] == 50.0
    assert split == [{"name": "a", "one_device": 120.0, "split": 300.0}]


def test_scale_streaming_rows_report_device_bytes_and_overlap():
    """The scale benchmark's data_on rows, tiny: device bytes, s/round, the serial baseline."""
    spec = importlib.util.spec_from_file_location(
        "bench_scale", ROOT / "experiments/benchmarks/scale.py"
    )
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    scale.HIDDEN = (16,)  # smoke size: the rows' fields, not the numbers
    base = {"sweep": "streaming", "population": 300, "cohort": 10, "map": "sequential",
            "rounds": 2, "repeats": 1}
    rows = [scale.run_stream_point(dict(base, storage=s)) for s in ("device", "memmap")]
    device, memmap = rows
    assert device["data_on"] == "device" and memmap["data_on"] == "host"
    # On the device: every example (64 f32 features + an i32 label); streamed: <= 2 cohorts.
    assert device["device_data_bytes"] == device["num_examples"] * (64 * 4 + 4)
    assert 0 < memmap["device_data_bytes"] <= 2 * memmap["cohort_device_bytes"]
    assert memmap["device_data_bytes"] < device["device_data_bytes"]
    for r in rows:
        assert r["s_per_round"] > 0
    for field in ("serial_s_per_round", "gather_s_per_round", "transfer_s_per_round"):
        assert memmap[field] > 0, field
    assert memmap["overlap_ratio"] == memmap["s_per_round"] / memmap["serial_s_per_round"]
    assert memmap["serial_equals_prefetch"] is True
    table = "\n".join(scale.stream_table(rows))
    assert "| device (one scan) |" in table and "| host, memory map |" in table


def test_seeds_benchmark_smoke_reports_ratios_and_identity(tmp_path):
    """experiments/benchmarks/seeds.py, tiny: every timing, both ratios, per-seed identity."""
    spec = importlib.util.spec_from_file_location(
        "bench_seeds", ROOT / "experiments/benchmarks/seeds.py"
    )
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    out = tmp_path / "seeds.json"
    seeds.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["smoke"] and result["settings"]["seeds"] == 4
    for way in ("one_by_one", "one_program_vmap", "one_program_map"):
        for field in ("including_compile_s", "steady_state_s"):
            assert result["timing"][way][field] > 0, (way, field)
    for way in ("one_program_vmap", "one_program_map"):
        for field in ("including_compile_s", "steady_state_s"):
            assert result["speedup"][way][field] == pytest.approx(
                result["timing"]["one_by_one"][field] / result["timing"][way][field])
        rows = result["identity"][way]["per_seed"]
        assert [r["seed"] for r in rows] == [0, 1, 2, 3]
        for r, want in zip(rows, result["params_sha256_one_by_one"], strict=True):
            assert r["identical"] == (r["params_sha256"] == want)
            assert r["identical"] == (r["max_abs_diff"] == 0.0)
    # seed_map="map" runs each seed's own one-seed computation: bit for bit the same.
    assert result["identity"]["one_program_map"]["identical_seeds"] == 4
    assert len(set(result["params_sha256_one_by_one"])) == 4  # the seeds really differ
