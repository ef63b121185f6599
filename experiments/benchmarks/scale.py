"""Benchmark: seconds per round and peak memory from 10 to 10,000 clients a round, 1k to 1M clients.

Synthetic population in the flat layout (``fl.FederatedData``): client ``i`` holds ``n_i``
examples, ``n_i`` uniform in ``1..8``; an example is 64 standard-normal features (an 8x8
image, the size of ``load_digits``) and a random label in ``0..9``. Model: the MLP
64-200-200-10 (``fl.models.mlp((8, 8), (200, 200), 10)``, 55,210 params), FedAvg with client
SGD (lr 0.1), batch 4, one local epoch (so ``S = 2`` local steps; a client holding 1..4
examples does one real step, the other is masked), ``fl.run_rounds`` (sampling, batch gather,
clients and server step, every round in one ``lax.scan``).

Two sweeps, every point in its own subprocess so that ``ru_maxrss`` is that point's peak
resident memory:

* cohort sweep: 10, 100, 1,000 and 10,000 clients a round from a population of 100,000 clients,
  under ``chunked(50)``, ``sequential()`` and ``vmap()`` (``vmap`` up to 1,000 clients: at
  10,000 every client's params, gradients and activations at once would need several GB);
* population sweep: 1k, 10k, 100k and 1M clients at 100 clients a round (``sequential()``),
  plus the cost of the cohort sampler alone (a jitted ``fl.data.sampling.sample_clients`` on that
  population; also the size-weighted one) as a fraction of the round.

Each point reports compile seconds (lowering + XLA compile of the whole scan), seconds per round
(median over repeats of a scan of rounds, divided by its rounds), examples/s (real examples),
peak RSS (MiB), the RSS before compiling (interpreter + JAX + data), the data bytes, the bytes of
the cohort's gathered ``[C, S, B, ...]`` batches, and XLA's own count of the compiled
program's temporary buffers (``memory_analysis().temp_size_in_bytes``), which is what grows with
the cohort net of the data and of the runtime.

The data is generated on the host in chunks into a 64-byte aligned NumPy buffer and handed to
JAX with ``jax.device_put`` which, on the CPU backend, aliases such a buffer instead of copying
it; so the data is resident once. (On this CPU-only machine the "device" is the host; there is no
separate device memory to overflow.)

A third sweep, streaming: the same population and model at 100 clients a round under
``sequential()``, with the data on the device (``data_on="device"``, one scan) against
host-streamed data (``data_on="host"``: examples in host NumPy arrays, or memory-mapped ``.npy``
files written by ``fl.data.save_memmap``, each round's cohort gathered and transferred by a
background thread while the previous round runs). Each row reports seconds per round, the
device bytes held by data (the flat examples on the device; for host streaming the measured
peak of the cohorts placed on the device at once, at most two), and for host streaming the
serial baseline (gather, transfer and round one after another, ``_streaming.without_prefetch``)
with the overlap ratio ``s/round with prefetch / s/round serial`` (< 1: the prefetch hides
the gather and the transfer).

Usage::

    python experiments/benchmarks/scale.py [--quick] [--out scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

FEATURES = (8, 8)
HIDDEN = (200, 200)
MAX_CLIENT_SIZE = 8
BATCH = 4
CHUNK = 50
POPULATION = 100_000
COHORTS = (10, 100, 1_000, 10_000)
POPULATIONS = (1_000, 10_000, 100_000, 1_000_000)
FIXED_COHORT = 100
VMAP_MAX = 1_000
STREAM_POPULATION = 100_000
STREAM_STORAGE = ("device", "host", "memmap")  # where the examples are during the run


def _rss_mib() -> float:
    """Peak resident memory of this process so far (since the last :func:`_reset_peak`), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) from ``/proc/self/status``, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    """Returns freed heap to the OS and restarts the peak-RSS count (Linux >= 4.0)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64):
    """An uninitialised NumPy array whose buffer starts on an ``align``-byte boundary."""
    import numpy as np

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _population(num_clients: int, seed: int = 0, on_device: bool = True):
    """Synthetic flat population, resident once (see the module docstring).

    ``on_device=False`` keeps the examples in host NumPy arrays (for ``data_on="host"``).
    """
    import jax
    import numpy as np

    import fedjax_lab as fl

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, MAX_CLIENT_SIZE + 1, size=num_clients)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    x = _aligned_empty((total, *FEATURES), np.float32)
    y = _aligned_empty((total,), np.int32)
    step = 1 << 18
    for lo in range(0, total, step):
        hi = min(total, lo + step)
        rng.standard_normal(out=x[lo:hi], dtype=np.float32)
        y[lo:hi] = rng.integers(0, 10, size=hi - lo, dtype=np.int32)
    examples = {"x": jax.device_put(x), "y": jax.device_put(y)} if on_device else {"x": x, "y": y}
    data_bytes = x.nbytes + y.nbytes + offsets.nbytes
    return fl.FederatedData.from_offsets(examples, offsets), data_bytes


def _median_call_s(fn, key, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(key))
    times = []
    for i in range(repeats):
        k = jax.random.fold_in(key, i)
        start = time.perf_counter()
        jax.block_until_ready(fn(k))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_point(spec: dict) -> dict:
    """One measurement, meant to run alone in a fresh process."""
    import jax
    import numpy as np
    import optax

    import fedjax_lab as fl

    rss_start = _rss_mib()
    data, data_bytes = _population(spec["population"])
    model = fl.models.mlp(FEATURES, HIDDEN, 10)
    alg = fl.algorithms.fed_avg(fl.models.classification_loss(model), optax.sgd(0.1))
    params = model.init(jax.random.key(0))
    maps = {
        "chunked": fl.maps.chunked(CHUNK),
        "sequential": fl.maps.sequential(),
        "vmap": fl.maps.vmap(),
    }
    client_map = maps[spec["map"]]
    cohort, rounds = spec["cohort"], spec["rounds"]
    offsets = data.offsets

    def scan(state, examples, key):
        # fl.run_rounds inside one more jit, so that the whole scan can be compiled ahead of
        # time and XLA's memory analysis of exactly that program read back.
        population = fl.FederatedData(examples, offsets)
        return fl.run_rounds(
            alg,
            state,
            population,
            key,
            num_rounds=rounds,
            cohort_size=cohort,
            batch_size=BATCH,
            epochs=1,
            client_map=client_map,
        )

    state = alg.init(params)
    key = jax.random.key(1)
    rss_data = _status_mib("VmRSS")
    start = time.perf_counter()
    compiled = jax.jit(scan).lower(state, data.examples, key).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    temp_bytes = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
    peak_until_compiled = _rss_mib()
    reset = _reset_peak()
    rss_compiled = _status_mib("VmRSS")

    state, hist = compiled(state, data.examples, key)  # warm-up (first run allocates)
    jax.block_until_ready(state)
    times, examples = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        state, hist = compiled(state, data.examples, key)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        examples.append(float(np.sum(hist["num_examples"])))
    rounds_peak = _status_mib("VmHWM") if reset else float("nan")
    s_round = statistics.median(times) / rounds
    ex_round = statistics.mean(examples) / rounds
    if not np.all(np.isfinite(np.asarray(hist["train_loss"]))):
        raise RuntimeError(f"non-finite training loss at {spec}")

    n = data.num_clients
    uniform = jax.jit(lambda k: fl.data.sampling.sample_clients(k, n, cohort))
    probs = jax.device_put(data.client_sizes.astype(np.float32))
    weighted = jax.jit(lambda k: fl.data.sampling.sample_clients(k, n, cohort, probs))
    sample_s = _median_call_s(uniform, jax.random.key(2), 21)
    weighted_s = _median_call_s(weighted, jax.random.key(3), 11)
    ids = np.asarray(uniform(jax.random.key(4)))
    if len(np.unique(ids)) != cohort or ids.min() < 0 or ids.max() >= n:
        raise RuntimeError(f"sampler returned bad ids at {spec}")

    steps = fl.data.sampling.num_local_steps(MAX_CLIENT_SIZE, BATCH, local_steps=None, epochs=1)
    slot_bytes = int(np.prod(FEATURES)) * 4 + 4 + 4  # x f32, y i32, mask f32
    return {
        **spec,
        "num_examples": data.num_examples,
        "local_steps": steps,
        "compile_s": compile_s,
        "s_per_round": s_round,
        "examples_per_s": ex_round / s_round,
        "examples_per_round": ex_round,
        "sample_s": sample_s,
        "sample_fraction": sample_s / s_round,
        "weighted_sample_s": weighted_s,
        "data_mib": data_bytes / 2**20,
        "cohort_batch_mib": cohort * steps * BATCH * slot_bytes / 2**20,
        "xla_temp_mib": temp_bytes / 2**20 if temp_bytes >= 0 else None,
        "rss_start_mib": rss_start,
        "rss_with_data_mib": rss_data,
        "rss_after_compile_mib": rss_compiled,
        "rounds_peak_rss_mib": rounds_peak,
        "rounds_rss_growth_mib": rounds_peak - rss_compiled,
        "peak_rss_mib": max(peak_until_compiled, rounds_peak),
        "repeat_s": times,
    }


def run_stream_point(spec: dict) -> dict:
    """One streaming row: data on the device, or streamed from host memory or a memory map."""
    import tempfile

    import jax
    import numpy as np
    import optax

    import fedjax_lab as fl
    from fedjax_lab import _streaming

    storage = spec["storage"]
    data, data_bytes = _population(spec["population"], on_device=storage == "device")
    tmp = None
    if storage == "memmap":
        tmp = tempfile.TemporaryDirectory()
        data = fl.data.load_memmap(fl.data.save_memmap(data, tmp.name))
    model = fl.models.mlp(FEATURES, HIDDEN, 10)
    alg = fl.algorithms.fed_avg(fl.models.classification_loss(model), optax.sgd(0.1))
    state0 = alg.init(model.init(jax.random.key(0)))
    data_on = "device" if storage == "device" else "host"
    rounds = spec["rounds"]

    def run(key):
        start = time.perf_counter()
        state, hist = fl.run_rounds(
            alg, state0, data, key, num_rounds=rounds, cohort_size=spec["cohort"],
            batch_size=BATCH, epochs=1, client_map=fl.maps.sequential(), data_on=data_on,
        )
        jax.block_until_ready((state, hist))
        if not np.all(np.isfinite(np.asarray(hist["train_loss"]))):
            raise RuntimeError(f"non-finite training loss at {spec}")
        return (time.perf_counter() - start) / rounds, state

    start = time.perf_counter()
    _, ref = run(jax.random.key(1))  # warm-up: compiles
    first_s = time.perf_counter() - start
    out = {**spec, "data_on": data_on, "first_call_s": first_s}
    if data_on == "device":
        times = [run(jax.random.key(1))[0] for _ in range(spec["repeats"])]
        out["device_data_bytes"] = int(sum(v.nbytes for v in data.examples.values()))
    else:
        # Prefetched and serial runs alternate, so a change in the machine's load hits both.
        times, serial, stats = [], [], []
        for _ in range(spec["repeats"]):
            times.append(run(jax.random.key(1))[0])
            stats.append(dict(_streaming.last_run))
            with _streaming.without_prefetch():
                serial.append(run(jax.random.key(1)))
        out["device_data_bytes"] = int(max(st["peak_device_bytes"] for st in stats))
        for name in ("gather", "transfer", "wait"):
            out[f"{name}_s_per_round"] = statistics.median(st[f"{name}_s"] for st in stats) / rounds
        out["serial_s_per_round"] = statistics.median(t for t, _ in serial)
        out["repeat_serial_s_per_round"] = [t for t, _ in serial]
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(serial[0][1]), jax.tree.leaves(ref), strict=True)
        )
        out["serial_equals_prefetch"] = bool(same)
    out["s_per_round"] = statistics.median(times)
    out["repeat_s_per_round"] = times
    if data_on == "host":
        out["overlap_ratio"] = out["s_per_round"] / out["serial_s_per_round"]
    width = int(np.max(data.client_sizes))
    out["cohort_device_bytes"] = spec["cohort"] * width * (int(np.prod(FEATURES)) * 4 + 4)
    out["data_mib"] = data_bytes / 2**20
    out["num_examples"] = data.num_examples
    if tmp is not None:
        tmp.cleanup()
    return out


def _stream_specs(quick: bool) -> list[dict]:
    pop = 10_000 if quick else STREAM_POPULATION
    rounds, repeats = (3, 1) if quick else (20, 5)
    return [
        {"sweep": "streaming", "population": pop, "cohort": FIXED_COHORT, "map": "sequential",
         "storage": storage, "rounds": rounds, "repeats": repeats}
        for storage in STREAM_STORAGE
    ]


def _specs(quick: bool) -> list[dict]:
    def rounds_for(cohort: int) -> tuple[int, int]:
        """(rounds in the timed scan, timed repeats), after one untimed warm-up run."""
        if quick:
            return (1, 1) if cohort >= 1_000 else (5, 2)
        if cohort >= 10_000:
            return (1, 3)
        if cohort >= 1_000:
            return (3, 3)
        return (20, 3)

    specs = []
    for cohort in COHORTS:
        for map_name in ("chunked", "sequential", "vmap"):
            if map_name == "vmap" and cohort > VMAP_MAX:
                continue
            r, k = rounds_for(cohort)
            specs.append(
                {
                    "sweep": "cohort",
                    "population": POPULATION,
                    "cohort": cohort,
                    "map": map_name,
                    "rounds": r,
                    "repeats": k,
                }
            )
    for pop in POPULATIONS:
        if pop == POPULATION:
            continue  # the cohort sweep's sequential point at 100 clients a round is this one
        if quick and pop > 100_000:
            continue
        r, k = rounds_for(FIXED_COHORT)
        specs.append(
            {
                "sweep": "population",
                "population": pop,
                "cohort": FIXED_COHORT,
                "map": "sequential",
                "rounds": r,
                "repeats": k,
            }
        )
    return specs + _stream_specs(quick)


def _run_subprocess(spec: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": (proc.stderr or proc.stdout)[-2000:]}
    return {**json.loads(lines[-1]), "process_wall_s": wall}


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _map_label(r: dict) -> str:
    return f"chunked({CHUNK})" if r["map"] == "chunked" else f"{r['map']}()"


def tables(results: list[dict]) -> str:
    """Markdown tables of the sweeps."""
    ok = [r for r in results if "error" not in r and r.get("sweep") != "streaming"]
    cohort_rows = sorted(
        (r for r in ok if r["population"] == POPULATION), key=lambda r: (r["cohort"], r["map"])
    )
    data_mib = cohort_rows[0]["data_mib"] if cohort_rows else float("nan")
    out = [
        f"### Cohort sweep (population {POPULATION:,} clients, data {data_mib:.0f} MiB)",
        "",
        "| clients/round | map | compile s | s/round | examples/s | peak RSS MiB "
        "| RSS with data MiB | rounds' RSS growth MiB | XLA temp MiB | cohort batches MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in cohort_rows:
        out.append(
            f"| {r['cohort']:,} | {_map_label(r)} | {r['compile_s']:.1f} | {r['s_per_round']:.4f}"
            f" | {r['examples_per_s']:,.0f} | {r['peak_rss_mib']:,.0f}"
            f" | {r['rss_with_data_mib']:,.0f} | {r['rounds_rss_growth_mib']:,.1f}"
            f" | {_fmt(r['xla_temp_mib'], '.1f')} | {r['cohort_batch_mib']:.1f} |"
        )
    pop_rows = sorted(
        (r for r in ok if r["cohort"] == FIXED_COHORT and r["map"] == "sequential"),
        key=lambda r: r["population"],
    )
    out += [
        "",
        f"### Population sweep ({FIXED_COHORT} clients a round, sequential())",
        "",
        "| population | data MiB | s/round | peak RSS MiB | peak RSS − data MiB "
        "| uniform sampler ms | sampler / round | size-weighted sampler ms | weighted / round |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in pop_rows:
        out.append(
            f"| {r['population']:,} | {r['data_mib']:,.1f} | {r['s_per_round']:.4f}"
            f" | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - r['data_mib']:,.0f}"
            f" | {r['sample_s'] * 1e3:.3f} | {r['sample_fraction']:.1%}"
            f" | {r['weighted_sample_s'] * 1e3:.2f}"
            f" | {r['weighted_sample_s'] / r['s_per_round']:.1%} |"
        )
    out += stream_table(results)
    failed = [r for r in results if "error" in r]
    if failed:
        out += ["", "Failed points:"]
        for r in failed:
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            out.append(f"- {_map_label(r)} C={r['cohort']} N={r['population']}: {last}")
    return "\n".join(out)


def stream_table(results: list[dict]) -> list[str]:
    """The streaming sweep's Markdown table (lines; empty without streaming rows)."""
    rows = [r for r in results if "error" not in r and r.get("sweep") == "streaming"]
    if not rows:
        return []
    r0 = rows[0]
    out = [
        "",
        f"### Streaming ({r0['population']:,} clients, data {r0['data_mib']:.0f} MiB, "
        f"{r0['cohort']} clients a round, sequential())",
        "",
        "| data | s/round | device bytes held by data | serial s/round | overlap ratio "
        "| gather ms/round | transfer ms/round | waited ms/round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        label = {"device": "device (one scan)", "host": "host, NumPy",
                 "memmap": "host, memory map"}[r["storage"]]
        if r["data_on"] == "device":
            extra = " — | — | — | — | — |"
        else:
            extra = (
                f" {r['serial_s_per_round']:.4f} | {r['overlap_ratio']:.2f}"
                f" | {r['gather_s_per_round'] * 1e3:.2f} | {r['transfer_s_per_round'] * 1e3:.2f}"
                f" | {r['wait_s_per_round'] * 1e3:.2f} |"
            )
        out.append(f"| {label} | {r['s_per_round']:.4f} | {r['device_data_bytes']:,} |{extra}")
    return out


def _print_point(r: dict) -> None:
    if r.get("sweep") == "streaming":
        extra = (
            "" if r["data_on"] == "device"
            else f"  serial {r['serial_s_per_round'] * 1e3:8.2f} ms  overlap "
            f"{r['overlap_ratio']:.2f}"
        )
        print(
            f"N={r['population']:>9,} C={r['cohort']:>6,} stream {r['storage']:<7} "
            f"{r['s_per_round'] * 1e3:9.2f} ms/round  device data "
            f"{r['device_data_bytes']:>12,} B{extra}  ({r['process_wall_s']:.0f} s)",
            flush=True,
        )
        return
    print(
        f"N={r['population']:>9,} C={r['cohort']:>6,} {r['map']:<10} "
        f"compile {r['compile_s']:5.1f} s  {r['s_per_round'] * 1e3:9.2f} ms/round "
        f"{r['examples_per_s']:>9,.0f} ex/s  peak {r['peak_rss_mib']:7,.0f} MiB  "
        f"sampler {r['sample_fraction']:6.1%}  ({r['process_wall_s']:.0f} s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, population <= 100k")
    parser.add_argument("--out", default="scale.json")
    parser.add_argument(
        "--sweeps", default="cohort,population,streaming",
        help="comma-separated sweeps to run; the other sweeps' rows already in --out are kept",
    )
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: one point, JSON spec
    args = parser.parse_args()
    if args.point:
        spec = json.loads(args.point)
        point = run_stream_point if spec.get("sweep") == "streaming" else run_point
        print(json.dumps(point(spec)), flush=True)
        return
    sweeps = set(args.sweeps.split(","))
    unknown = sweeps - {"cohort", "population", "streaming"}
    if unknown:
        parser.error(f"--sweeps: unknown sweep(s) {sorted(unknown)}")
    kept = []
    if sweeps != {"cohort", "population", "streaming"} and os.path.exists(args.out):
        with open(args.out) as f:
            kept = [r for r in json.load(f)["results"] if r.get("sweep") not in sweeps]
    results = []
    total = time.perf_counter()
    for spec in [s for s in _specs(args.quick) if s["sweep"] in sweeps]:
        r = _run_subprocess(spec, timeout_s=600)
        results.append(r)
        if "error" in r:
            print(f"{spec}: FAILED\n{r['error']}", flush=True)
        else:
            _print_point(r)
    import jax

    out = {
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "setup": {
            "features": list(FEATURES),
            "hidden": list(HIDDEN),
            "max_client_size": MAX_CLIENT_SIZE,
            "batch_size": BATCH,
            "chunk": CHUNK,
        },
        "total_s": time.perf_counter() - total,
        "results": kept + results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print()
    print(tables(kept + results))


if __name__ == "__main__":
    main()
