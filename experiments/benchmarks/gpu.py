"""GPU benchmark: every client map, four models, cohorts 10 to 10,000, float32 and bfloat16.

One script, sized to finish in under 8 minutes on one H200 (``--budget-s``, default 420 s, is
checked before every case; a case that would not fit is recorded as skipped, never guessed).
For logistic regression (784->62), the MLP 784-200-200-62, the EMNIST CNN (1.2M params) and
the Shakespeare char-LSTM, at cohorts of 10, 100, 1,000 and 10,000 clients, it measures one
FedAvg round (local SGD, aggregation and the server step: one compiled program, the cohort
already on the device) under ``vmap``, ``chunked(n)`` and ``sequential``:

* examples/s and achieved FLOP/s (XLA's FLOP count of one local step, analytic for the
  LSTM whose recurrence XLA counts once), and the fraction of this device's matmul peak in
  the same dtype;
* the compile seconds and the program's peak device memory (XLA's memory analysis of the
  compiled round: arguments + outputs + temporaries - aliased), and the process's
  ``peak_bytes_in_use`` where the device reports it;
* the same in bfloat16 (the model zoo's ``dtype="bfloat16"``: float32 master params,
  bfloat16 matmuls and convolutions) for the two batched maps;
* the per-batch Python loop over clients (one jitted step per batch, as FedJAX and most
  PyTorch simulators run a round), timed on 10 clients: its cost per client is constant;
* ``fl.maps.auto()``'s choice for each case and the map measured fastest.

The JSON holds ``auto_table``, the rows :func:`fedjax_lab.maps.use_measurements` reads, so
``auto()`` picks from these measurements on this GPU
(``FEDJAX_LAB_MAP_MEASUREMENTS=gpu.json`` or ``fl.maps.use_measurements("gpu.json")``).

``--cpu-smoke`` runs the same code on tiny models and cohorts on the CPU in seconds (the
tests run it); its numbers mean nothing.

Usage::

    python experiments/benchmarks/gpu.py [--out gpu.json] [--budget-s 420]
    python experiments/benchmarks/gpu.py --cpu-smoke --out /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MODELS = ("logreg", "mlp", "cnn", "lstm")
COHORTS = (10, 100, 1000, 10_000)
LOOP_CLIENTS = 10


def _suite():
    """The benchmark suite's shared pieces (data, FLOP counts, the Python loop, the peak)."""
    spec = importlib.util.spec_from_file_location("fedjax_lab_bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu.json", help="JSON output path")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting cases after")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    return ap.parse_args(argv)


def _chunk(cohort: int) -> int:
    return 256 if cohort > 2560 else max(1, cohort // 10)


def _model(name: str, dtype: str, smoke: bool):
    import fedjax_lab as fl

    if name == "logreg":
        return fl.models.logistic_regression((784,), 62, dtype=dtype)
    if name == "mlp":
        return fl.models.mlp((784,), (16,) if smoke else (200, 200), 62, dtype=dtype)
    if name == "cnn":
        if smoke:
            return fl.models.cnn((28, 28, 1), 62, features=(2, 4), dense=8, dtype=dtype)
        return fl.models.cnn((28, 28, 1), 62, dtype=dtype)
    if name == "lstm":
        hidden = 8 if smoke else 256
        return fl.models.char_lstm(90, hidden=hidden, num_layers=2, dtype=dtype)
    raise ValueError(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}.")


def _lstm_flops(batch: int, hidden: int, embed: int = 8, vocab: int = 90, t: int = 80) -> float:
    fwd = 2 * batch * t * (4 * (embed + hidden) * hidden + 4 * 2 * hidden * hidden + hidden * vocab)
    return 3.0 * fwd  # backward = 2x forward


def _peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _process_peak(jax) -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _matmul_peak(jax, dtype: str, smoke: bool) -> float:
    import jax.numpy as jnp

    n = 256 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run(argv=None) -> dict:
    args = _parse(argv)
    if args.cpu_smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import fedjax_lab as fl
    from fedjax_lab import rounds

    suite = _suite()
    start = time.perf_counter()
    smoke = args.cpu_smoke
    models = [m for m in args.models.split(",") if m]
    for m in models:
        _model(m, "float32", True)  # a bad name fails here, before anything is timed
    cohorts = (2,) if smoke else COHORTS
    steps, image_batch, text_batch = (1, 4, 2) if smoke else (5, 20, 4)
    machine = suite._machine(jax)
    peaks = {d: _matmul_peak(jax, d, smoke) for d in ("float32", "bfloat16")}
    print(f"machine: {machine}\nmatmul peak GFLOP/s: {peaks}", flush=True)
    results = {
        "machine": machine,
        "settings": {"smoke": smoke, "local_steps": steps, "budget_s": args.budget_s},
        "matmul_peak_gflops": peaks,
        "cases": [],
        "python_loop": [],
        "auto": [],
        "auto_table": [],
    }
    last_run_s: dict[tuple, float] = {}  # (model, dtype, map kind) -> seconds at the last cohort

    for name in models:
        batch = text_batch if name == "lstm" else image_batch
        model32 = _model(name, "float32", smoke)
        params = model32.init(jax.random.key(0))
        num_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
        opt = optax.sgd(0.05)
        for cohort in cohorts:
            spec = dict(model=name, population=cohort, client_size=steps * batch, steps=steps,
                        batch=batch)
            data = suite._data(spec, "mlp" if name == "logreg" else name,
                               "text" if name == "lstm" else "image")
            if name in ("logreg", "mlp"):  # the suite's image data has 10 classes: 62 here
                y = np.random.default_rng(1).integers(0, 62, data.num_examples).astype(np.int32)
                data = data._replace(examples={**data.examples, "y": y})
            np_batches, cohort_obj = suite.loop_cohort(jax, data, spec, cohort)
            examples = float(np.asarray(cohort_obj.batches["mask"]).sum())
            best_here = None
            for dtype in ("float32", "bfloat16"):
                model = model32 if dtype == "float32" else _model(name, dtype, smoke)
                loss_fn = fl.models.classification_loss(model)
                alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=opt)
                first = {k: jnp.asarray(v[0, 0]) for k, v in np_batches.items()}
                if name == "lstm":
                    hidden = 8 if smoke else 256
                    step_flops = _lstm_flops(batch, hidden)
                else:
                    step_flops, _ = suite._step_flops(jax, loss_fn, opt, params, first,
                                                      {"model": name, "batch": batch})
                flops_round = step_flops * steps * cohort
                maps = [fl.maps.vmap(), fl.maps.chunked(_chunk(cohort))]
                if smoke and dtype != "float32":
                    maps = maps[:1]
                if dtype == "float32":
                    maps.append(fl.maps.sequential())
                    if cohort == cohorts[0]:
                        loop = _python_loop(suite, jax, loss_fn, opt, params, np_batches,
                                            cohort_obj.weights)
                        loop.update(model=name, dtype=dtype)
                        loop["gflops"] = loop["examples_per_s"] * step_flops / batch / 1e9
                        results["python_loop"].append(loop)
                        print(f"{name:7s} Python loop {loop['examples_per_s']:12.0f} ex/s",
                              flush=True)
                for cmap in maps:
                    kind = cmap.name.split("(")[0]
                    row = dict(model=name, dtype=dtype, cohort=cohort, map=cmap.name,
                               num_params=num_params, status="ok")
                    guess = last_run_s.get((name, dtype, kind))
                    elapsed = time.perf_counter() - start
                    estimate = 5 * 10 * guess if guess is not None else 0.0
                    if elapsed + estimate > args.budget_s:
                        row["status"] = f"skipped: {elapsed:.0f} s used, ~{estimate:.0f} s more"
                        results["cases"].append(row)
                        continue
                    try:
                        row.update(_time_round(jax, rounds, alg, cmap, params, cohort_obj))
                    except Exception as e:  # noqa: BLE001 - recorded, the next case runs
                        if not _is_oom(e):
                            raise
                        row["status"] = "out of device memory"
                        results["cases"].append(row)
                        continue
                    last_run_s[(name, dtype, kind)] = row["s_per_round"]
                    row["examples_per_s"] = examples / row["s_per_round"]
                    row["gflops"] = flops_round / row["s_per_round"] / 1e9
                    row["fraction_of_peak"] = row["gflops"] / peaks[dtype]
                    row["process_peak_bytes"] = _process_peak(jax)
                    results["cases"].append(row)
                    if dtype == "float32" and (
                        best_here is None or row["examples_per_s"] > best_here["examples_per_s"]
                    ):
                        best_here = row
                    print(f"{name:7s} {dtype:8s} c={cohort:<6d} {cmap.name:14s} "
                          f"{row['examples_per_s']:12.0f} ex/s {row['gflops']:9.1f} GFLOP/s "
                          f"compile {row['compile_s']:5.1f} s  peak "
                          f"{(row['peak_bytes'] or 0) / 2**20:8.1f} MiB", flush=True)
                suite._write(args.out, results)
            chosen = fl.maps.choose(cohort, num_params=num_params).name
            best = best_here["map"] if best_here else None
            results["auto"].append(dict(model=name, cohort=cohort, auto_choice=chosen,
                                        fastest_measured=best))
            if best is not None:
                results["auto_table"].append(dict(
                    backend=machine["backend"], device_kind=machine["device"], cohort=cohort,
                    num_params=num_params, best=best))
    results["wall_s"] = time.perf_counter() - start
    suite._write(args.out, results)
    print("\n" + table(results), flush=True)
    return results


def _python_loop(suite, jax, loss_fn, opt, params, np_batches, weights) -> dict:
    k = min(LOOP_CLIENTS, np_batches["mask"].shape[0])
    batches = {key: v[:k] for key, v in np_batches.items()}
    timing, _ = suite.python_loop(jax, loss_fn, opt, params, batches, weights[:k])
    return {"examples_per_s": timing["examples_per_s"], "clients_timed": timing["clients"],
            "compile_s": timing["compile_s"]}


def _time_round(jax, rounds, alg, cmap, params, cohort) -> dict:
    """Compile one round for this map, then time it (median of three, the cohort on device)."""
    state = alg.init(params)
    key = jax.random.key(3)
    t0 = time.perf_counter()
    compiled = rounds._run_round_jit.lower(alg, cmap, state, cohort, key).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, cohort, key))  # warm: allocations, autotuning
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, cohort, key))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"compile_s": compile_s, "s_per_round": times[1], "peak_bytes": _peak_bytes(compiled)}


def table(results: dict) -> str:
    """The Markdown table the README records."""
    loops = {r["model"]: r["examples_per_s"] for r in results["python_loop"]}
    lines = [
        "| model | cohort | dtype | map | examples/s | GFLOP/s | of peak | vs Python loop "
        "| compile s | peak MiB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["cases"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['cohort']} | {r['dtype']} | {r['map']} | "
                         f"{r['status']} | | | | | |")
            continue
        loop = loops.get(r["model"])
        vs = f"{r['examples_per_s'] / loop:.1f}x" if loop else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['cohort']} | {r['dtype']} | {r['map']} | "
            f"{r['examples_per_s']:,.0f} | {r['gflops']:,.1f} | {r['fraction_of_peak']:.1%} | "
            f"{vs} | {r['compile_s']:.1f} | {peak} |"
        )
    lines += ["", "| model | cohort | auto() picks | fastest measured |"]
    lines += ["| --- | ---: | --- | --- |"]
    for a in results["auto"]:
        lines.append(f"| {a['model']} | {a['cohort']} | {a['auto_choice']} | "
                     f"{a['fastest_measured']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    sys.exit(main())
