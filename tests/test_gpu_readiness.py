"""Mixed precision in the model zoo, measured map choice for accelerators, the GPU benchmark."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMALL = {
    "mlp": (lambda **kw: fl.models.mlp((4,), (8,), 3, **kw), jnp.ones((2, 4))),
    "cnn": (
        lambda **kw: fl.models.cnn((6, 6, 1), 3, features=(2,), dense=4, **kw),
        jnp.linspace(0, 1, 72).reshape(2, 6, 6, 1),
    ),
    "char_lstm": (
        lambda **kw: fl.models.char_lstm(5, 2, 4, 1, **kw),
        jnp.array([[1, 2, 3], [4, 0, 1]], jnp.int32),
    ),
    "char_transformer": (
        lambda **kw: fl.models.char_transformer(5, 3, d_model=4, num_heads=2, num_layers=1,
                                                mlp_dim=8, **kw),
        jnp.array([[1, 2, 3], [4, 0, 1]], jnp.int32),
    ),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_float32_option_is_exactly_the_plain_model(name):
    make, x = SMALL[name]
    plain, f32 = make(), make(dtype="float32")
    p = plain.init(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(f32.init(jax.random.key(0))), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(plain.apply(p, x)), np.asarray(f32.apply(p, x)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bfloat16_computes_in_bf16_with_float32_params_logits_and_grads(name):
    make, x = SMALL[name]
    f32, bf16 = make(), make(dtype="bfloat16")
    p = f32.init(jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16.init(jax.random.key(0))))
    logits = bf16.apply(p, x)
    assert logits.dtype == jnp.float32
    jaxpr = str(jax.make_jaxpr(lambda p: bf16.apply(p, x))(p))
    assert "bf16" in jaxpr and "bf16" not in str(jax.make_jaxpr(lambda p: f32.apply(p, x))(p))
    ref = np.asarray(f32.apply(p, x))
    scale = np.max(np.abs(ref)) + 1e-3
    assert np.max(np.abs(np.asarray(logits) - ref)) / scale < 0.05  # bf16 has 8 mantissa bits
    grads = jax.grad(lambda p: jnp.sum(bf16.apply(p, x) ** 2))(p)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_fedavg_over_a_bf16_model_keeps_float32_master_params_and_tracks_float32():
    def run(dtype):
        model = fl.models.mlp((4,), (8,), 3, dtype=dtype)
        loss = fl.models.classification_loss(model)
        alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.5))
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 6, 4)), jnp.float32)
        y = (x.sum(-1) > 0).astype(jnp.int32)
        cohort = fl.Cohort({"x": x, "y": y, "mask": jnp.ones((3, 2, 6))}, jnp.ones(3),
                           jnp.arange(3))
        state = alg.init(model.init(jax.random.key(0)))
        losses = []
        for _ in range(4):
            state, m = fl.run_round(alg, state, cohort, jax.random.key(1))
            losses.append(float(m["train_loss"]))
        return state, losses

    s32, l32 = run("float32")
    s16, l16 = run("bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(s16.params))
    assert l16[-1] < l16[0]
    np.testing.assert_allclose(l16, l32, rtol=0.05)


def test_bad_dtype_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"dtype: expected one of 'float32', 'bfloat16'"):
        fl.models.mlp((4,), dtype="int8")
    with pytest.raises(ValueError, match="dtype"):
        fl.models.cnn(dtype="float64")


def test_a_config_can_ask_for_bfloat16():
    cfg = fl.experiment.validate({"model": {"name": "mlp", "hidden": [8], "dtype": "bfloat16"}})
    assert cfg["model"]["dtype"] == "bfloat16"


@pytest.fixture
def measurements():
    yield fl.maps.use_measurements
    fl.maps.use_measurements(None)


def test_measured_choice_takes_the_nearest_case_on_accelerators_only(measurements):
    rows = [
        {"backend": "gpu", "device_kind": "X", "cohort": 10, "num_params": 1_000, "best": "vmap"},
        {"backend": "gpu", "device_kind": "X", "cohort": 10_000, "num_params": 1_000,
         "best": "chunked(128)"},
        {"backend": "gpu", "device_kind": "X", "cohort": 10_000, "num_params": 1_000_000,
         "best": "sequential()"},
    ]
    assert measurements(rows) == 3
    assert fl.maps.choose(20, backend="gpu", num_devices=1).name == "vmap()"
    assert fl.maps.choose(8000, backend="gpu", num_devices=1, num_params=900).name == (
        "chunked(128)"
    )
    assert fl.maps.choose(8000, backend="gpu", num_devices=1, num_params=2_000_000).name == (
        "sequential()"
    )
    assert fl.maps.choose(8000, backend="gpu", num_devices=2).name.startswith("sharded(")
    assert fl.maps.choose(8000, backend="cpu", num_devices=1).name == "sequential()"
    assert measurements(None) == 0
    assert fl.maps.choose(8000, backend="gpu", num_devices=1).name == "chunked(256)"


def test_measurements_load_from_the_benchmark_json_and_bad_rows_are_refused(
    measurements, tmp_path
):
    path = tmp_path / "gpu.json"
    table = [{"backend": "gpu", "cohort": 100, "num_params": 10, "best": "chunked(7)"}]
    path.write_text(json.dumps({"auto_table": table}))
    assert measurements(str(path)) == 1
    assert fl.maps.choose(100, backend="gpu", num_devices=1).name == "chunked(7)"
    with pytest.raises(ValueError, match="unknown map 'pmap'"):
        measurements([{"backend": "gpu", "cohort": 1, "best": "pmap"}])
    with pytest.raises(ValueError, match=r"row 0 lacks \['best'\]"):
        measurements([{"backend": "gpu", "cohort": 1}])
    (tmp_path / "other.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(ValueError, match="auto_table"):
        measurements(str(tmp_path / "other.json"))


def test_auto_reads_the_model_size_off_the_server_state(measurements, monkeypatch):
    seen = []
    real = fl.maps.choose

    def spy(cohort_size, backend=None, num_devices=None, *, num_params=None):
        seen.append((cohort_size, num_params))
        return real(cohort_size, backend, num_devices, num_params=num_params)

    monkeypatch.setattr(fl.maps, "choose", spy)
    loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2)
    alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.1))
    cohort = fl.Cohort({"x": jnp.ones((3, 1, 2, 5)), "y": jnp.ones((3, 1, 2)),
                        "mask": jnp.ones((3, 1, 2))}, jnp.ones(3), jnp.arange(3))
    fl.run_round(alg, alg.init(jnp.zeros(5)), cohort, jax.random.key(0),
                 client_map=fl.maps.auto())
    assert (3, 5) in seen  # the traced call saw the 5 params (state_sharding asks without)


def test_gpu_benchmark_cpu_smoke_writes_every_field(tmp_path):
    path = ROOT / "experiments/benchmarks/gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    results = bench.run(["--cpu-smoke", "--out", str(out), "--models", "logreg,mlp"])
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(results["cases"]))
    assert results["matmul_peak_gflops"]["float32"] > 0
    ok = [r for r in results["cases"] if r["status"] == "ok"]
    assert {(r["model"], r["dtype"]) for r in ok} == {
        (m, d) for m in ("logreg", "mlp") for d in ("float32", "bfloat16")
    }
    assert {r["map"] for r in ok if r["dtype"] == "float32"} == {
        "vmap()", "chunked(1)", "sequential()"
    }
    for r in ok:
        assert r["examples_per_s"] > 0 and r["gflops"] > 0 and r["compile_s"] > 0
        assert r["peak_bytes"] is None or r["peak_bytes"] > 0
    assert [r["model"] for r in results["python_loop"]] == ["logreg", "mlp"]
    assert all(a["fastest_measured"] in {r["map"] for r in ok} for a in results["auto"])
    assert fl.maps.use_measurements(str(out)) == 2
    fl.maps.use_measurements(None)
    assert "| mlp | 2 | float32 | vmap() |" in bench.table(results)
