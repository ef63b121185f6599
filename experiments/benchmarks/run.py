"""Benchmark suite: FedAvg rounds vs a per-batch Python loop, as a fraction of the matmul peak.

One command measures, on this machine and in one run:

1. the dense float32 matmul peak (GFLOP/s): the best of one large matmul on one device and one
   matmul per device at once, over a few sizes;
2. for each case (model, cohort): FedAvg rounds run by ``fl.run_rounds`` with the client map
   ``fl.maps.auto()`` picks (a scan of rounds; sampling, batching, local training, aggregation
   and the server step in one program), reporting examples/s, achieved GFLOP/s (XLA's FLOP
   count of one local step, forward + backward + optimiser, or an analytic count where the step
   holds a loop XLA's count sees once), the fraction of the peak and the compile seconds;
3. the same round as a Python loop over clients and their batches calling ONE jitted local step
   per batch (FedJAX's default backend; most PyTorch simulators), same model, data, convolution
   formulation, batch and optimiser, with NumPy batches sliced on the host; ``vs_python_loop``
   is our examples/s over the loop's. On large cohorts the loop is timed on its first 100
   clients (its cost per client is constant; ``loop_clients_timed`` says how many). The loop
   is timed twice, on the split host and in a child process on an unsplit one (where XLA gives
   its one device every core), and the faster is the baseline (``merge_one_device``).

Cases: logistic regression 784->10, the MLP 784-200-200-10 and the EMNIST CNN (batch 20,
10 local steps, cohorts of 10 / 100 / 1,000), the Shakespeare char-LSTM (batch 4, 80
characters, 10 local steps, cohorts 10 / 100), and the pfl-research CIFAR-10 setting (1,000
clients of 50 examples, 50 a round, one epoch at batch 10, a small CNN). At cohort 100 of the
MLP (10 of the CNN) every client map is timed too (``maps``), so the choice of ``auto()`` is checked
against the alternatives, and (when the host is split into several devices) a child process
times the same cases on one device (``split_host``).

The host is split into one XLA device per core (``--devices``, default: all cores) before JAX
starts, so ``auto()`` can put clients on every core with ``sharded``.

Usage::

    python experiments/benchmarks/run.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

LOOP_CLIENTS_TIMED = 100


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="cohorts 10 and 100, fewer repeats")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script runs")
    ap.add_argument("--out", default="results.json", help="JSON output path")
    ap.add_argument(
        "--devices", type=int, default=None, help="XLA host devices (default: CPU cores)"
    )
    ap.add_argument("--cases", default="", help="comma-separated case names to run (default all)")
    ap.add_argument("--no-maps", action="store_true", help="skip timing every client map")
    ap.add_argument("--no-split", action="store_true", help="skip the one-device child run")
    ap.add_argument(
        "--loop-only",
        action="store_true",
        help="time only the Python loop (and the engine where every map is timed)",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    devices = args.devices or os.cpu_count() or 1
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        )
    import jax

    results = {
        "machine": _machine(jax),
        "settings": {"quick": args.quick, "smoke": args.smoke, "devices": jax.device_count()},
    }
    print(f"machine: {results['machine']}", flush=True)
    peak = matmul_peak(jax, small=args.smoke)
    results["matmul_peak_gflops"] = peak["gflops"]
    results["matmul_peak"] = peak
    print(f"matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['best']})", flush=True)

    wanted = {c for c in args.cases.split(",") if c}
    cases = []
    for spec in case_specs(quick=args.quick, smoke=args.smoke):
        if wanted and spec["name"] not in wanted:
            continue
        row = run_case(
            jax,
            spec,
            peak["gflops"],
            all_maps=spec["all_maps"] and not args.no_maps,
            loop_only=args.loop_only and not spec["all_maps"],
        )
        cases.append(row)
        if "examples_per_s" in row:
            _print_row(row)
        results["cases"] = cases
        _write(args.out, results)
    results["cases"] = cases
    if args.loop_only:  # the one-device child: its parent merges these rows
        return results
    if jax.device_count() > 1 and not args.no_split and not args.smoke:
        results["split_host"] = merge_one_device(cases, _one_device_child(args, cases))
    results["targets"] = check_targets(cases)
    _write(args.out, results)
    print("\n" + table(results), flush=True)
    return results


# ----------------------------------------------------------------------------- the machine


def _machine(jax) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def _median_time(fn, repeats: int, budget_s: float = 2.0) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:  # a slow call is timed once
            break
    return statistics.median(times)


def matmul_peak(jax, small: bool = False) -> dict:
    """Dense float32 matmul GFLOP/s: one matmul on one device, and one per device at once."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sizes = (256, 512) if small else (512, 1024, 2048)
    devs = jax.devices()
    mesh = Mesh(np.array(devs), ("d",))
    per_device = NamedSharding(mesh, PartitionSpec("d"))
    rows = []
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        one = jax.jit(lambda a, b: a @ b)
        one(a, b).block_until_ready()
        t = _median_time(lambda: one(a, b).block_until_ready(), 7)  # noqa: B023
        rows.append({"n": n, "layout": "one device", "gflops": 2 * n**3 / t / 1e9})
        if len(devs) > 1:
            d = len(devs)
            ab = jax.device_put(jnp.broadcast_to(a, (d, n, n)), per_device)
            bb = jax.device_put(jnp.broadcast_to(b, (d, n, n)), per_device)
            many = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b))
            many(ab, bb).block_until_ready()
            t = _median_time(lambda: many(ab, bb).block_until_ready(), 7)  # noqa: B023
            rows.append({"n": n, "layout": f"{d} devices", "gflops": d * 2 * n**3 / t / 1e9})
    best = max(rows, key=lambda r: r["gflops"])
    return {"gflops": best["gflops"], "best": f"n={best['n']}, {best['layout']}", "all": rows}


# ----------------------------------------------------------------------------- the cases


def case_specs(*, quick: bool, smoke: bool) -> list[dict]:
    """Every case: model, data shapes, local work, cohort, rounds a timed call."""
    cohorts = (10, 100) if quick or smoke else (10, 100, 1000)
    specs = []
    dense = [("logreg", 1.0), ("mlp", 0.12), ("cnn", 0.004)]  # rough relative speed
    for model, speed in dense:
        for c in cohorts:
            examples_a_round = c * 10 * 20
            rounds = max(1, min(50, int(400_000 * speed / examples_a_round)))
            specs.append(
                dict(
                    name=f"{model}_c{c}",
                    model=model,
                    cohort=c,
                    population=max(c, 100),
                    client_size=200,
                    steps=10,
                    batch=20,
                    rounds=rounds,
                    # Every client map is timed for the MLP at 100 clients and the CNN at 10
                    # (vmap over per-client conv kernels is a grouped convolution on XLA:CPU,
                    # ~20x slower: 100 clients of it would take many minutes).
                    all_maps=(c == 100 and model == "mlp") or (c == 10 and model == "cnn"),
                )
            )
    for c in (10,) if quick or smoke else (10, 100):
        specs.append(
            dict(
                name=f"lstm_c{c}",
                model="lstm",
                cohort=c,
                population=max(c, 100),
                client_size=40,
                steps=10,
                batch=4,
                rounds=1,
                all_maps=False,
            )
        )
    specs.append(
        dict(
            name="pfl_cifar10_c50",
            model="cifar_cnn",
            cohort=50,
            population=1000,
            client_size=50,
            steps=5,
            batch=10,
            rounds=1,
            all_maps=False,
        )
    )
    if smoke:
        specs = [s for s in specs if s["cohort"] == 10 and s["model"] in ("logreg", "mlp")]
        for s in specs:
            s.update(rounds=2, population=12, all_maps=True)
    return specs


def _model(spec):
    import fedjax_lab as fl

    m = spec["model"]
    if m == "logreg":
        return fl.models.logistic_regression((784,), 10), "image", 0.1
    if m == "mlp":
        return fl.models.mlp((784,), (200, 200), 10), "image", 0.1
    if m == "cnn":
        return fl.models.cnn((28, 28, 1), 62), "image", 0.05
    if m == "cifar_cnn":
        return fl.models.cnn((32, 32, 3), 10, features=(32, 64), dense=128), "image", 0.05
    if m == "lstm":
        return fl.models.char_lstm(vocab_size=90), "text", 0.5
    raise ValueError(f"unknown model {m!r}")


def _data(spec, model_name, kind):
    """Synthetic examples in the flat layout, every client ``client_size`` of them."""
    import numpy as np

    import fedjax_lab as fl

    rng = np.random.default_rng(0)
    n = spec["population"] * spec["client_size"]
    if kind == "text":
        x = rng.integers(1, 90, (n, 80)).astype(np.int32)
        y = np.concatenate([x[:, 1:], rng.integers(1, 90, (n, 1)).astype(np.int32)], axis=1)
    else:
        shape = {"logreg": (784,), "mlp": (784,), "cnn": (28, 28, 1), "cifar_cnn": (32, 32, 3)}
        x = rng.random((n,) + shape[model_name], dtype=np.float32)
        classes = 62 if model_name == "cnn" else 10
        y = rng.integers(0, classes, n).astype(np.int32)
    offsets = np.arange(spec["population"] + 1) * spec["client_size"]
    return fl.FederatedData.from_offsets({"x": x, "y": y}, offsets)


def _step_flops(jax, loss_fn, opt, params, batch, spec) -> tuple[float, str]:
    """FLOPs of one local step (forward + backward + optimiser) and where the count comes from."""
    if spec["model"] == "lstm":
        # The recurrence is a lax.scan: XLA's cost analysis counts a loop body once. Count it:
        # per token and layer, 4 gates x (input + hidden) x hidden multiply-adds; the output
        # layer hidden x vocab; backward = 2x forward.
        b, t, h, e, v = spec["batch"], 80, 256, 8, 90
        fwd = 2 * b * t * (4 * (e + h) * h + 4 * (h + h) * h + h * v)
        return 3.0 * fwd, "analytic (LSTM)"
    step = _one_step(jax, loss_fn, opt)
    cost = step.lower(params, opt.init(params), batch).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]), "XLA cost analysis"


def _one_step(jax, loss_fn, opt):
    import optax

    key = jax.random.key(0)

    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step)


def run_case(jax, spec: dict, peak_gflops: float, all_maps: bool, loop_only: bool = False) -> dict:
    import jax.numpy as jnp
    import optax

    import fedjax_lab as fl

    model, kind, lr = _model(spec)
    loss_fn = fl.models.classification_loss(model)
    opt = optax.sgd(lr)
    alg = fl.algorithms.fed_avg(loss_fn, client_optimizer=opt)
    params = model.init(jax.random.key(0))
    data = _data(spec, spec["model"], kind)
    examples = {k: jnp.asarray(v) for k, v in data.examples.items()}
    if fl.maps.state_sharding(fl.maps.auto(), spec["cohort"]) is not None:
        # A sharded map reads the examples on every device; run_rounds puts them there once
        # per call unless they are there already. The timed calls reuse one placement, as a
        # run of many calls would.
        examples = fl.distributed.replicate(examples)
    device_data = data._replace(examples=examples)
    b, s, c = spec["batch"], spec["steps"], spec["cohort"]
    first_batch = {k: v[:b] for k, v in device_data.examples.items()}
    first_batch["mask"] = jnp.ones((b,), jnp.float32)
    step_flops, flop_source = _step_flops(jax, loss_fn, opt, params, first_batch, spec)
    flops_per_example = step_flops / b
    examples_a_round = c * s * b

    def ours(client_map):
        state = alg.init(params)
        kw = dict(
            num_rounds=spec["rounds"],
            cohort_size=c,
            batch_size=b,
            local_steps=s,
            client_map=client_map,
        )
        key = jax.random.key(1)
        t0 = time.perf_counter()
        state, _ = fl.run_rounds(alg, state, device_data, key, **kw)
        jax.block_until_ready(state.params)
        first = time.perf_counter() - t0
        holder = [state]

        def again():
            new, _ = fl.run_rounds(alg, holder[0], device_data, key, **kw)
            holder[0] = jax.block_until_ready(new)

        per_call = _median_time(again, 3, budget_s=20.0)
        rate = examples_a_round * spec["rounds"] / per_call
        return {
            "map": client_map.name,
            "examples_per_s": rate,
            "s_per_round": per_call / spec["rounds"],
            "compile_s": max(0.0, first - per_call),
        }

    row = dict(spec)
    row["flops_per_example"] = flops_per_example
    row["flop_count"] = flop_source
    if loop_only:
        batches, cohort = loop_cohort(jax, device_data, spec, min(c, LOOP_CLIENTS_TIMED))
        loop, _ = python_loop(jax, loss_fn, opt, params, batches, cohort.weights)
        row["python_loop_examples_per_s"] = loop["examples_per_s"]
        row["loop_clients_timed"] = loop["clients"]
        print(f"{row['name']:18s} Python loop {loop['examples_per_s']:10.0f} ex/s", flush=True)
        return row
    auto = fl.maps.auto()
    row["auto_picks"] = fl.maps.choose(c).name
    best = ours(auto)
    row.update(
        examples_per_s=best["examples_per_s"],
        s_per_round=best["s_per_round"],
        compile_s=best["compile_s"],
    )
    if all_maps:
        maps = [fl.maps.sequential(), fl.maps.vmap(), fl.maps.chunked(10)]
        if jax.device_count() > 1:
            maps += [fl.maps.sharded(fl.maps.sequential()), fl.maps.sharded(fl.maps.vmap())]
        row["maps"] = [ours(m) for m in maps]
    else:
        row["maps"] = []

    batches, cohort = loop_cohort(jax, device_data, spec, min(c, LOOP_CLIENTS_TIMED))
    loop, _ = python_loop(jax, loss_fn, opt, params, batches, cohort.weights)
    row["python_loop_examples_per_s"] = loop["examples_per_s"]
    row["loop_clients_timed"] = loop["clients"]
    row["loop_compile_s"] = loop["compile_s"]
    row["vs_python_loop"] = row["examples_per_s"] / loop["examples_per_s"]
    row["achieved_gflops"] = row["examples_per_s"] * flops_per_example / 1e9
    row["fraction_of_peak"] = row["achieved_gflops"] / peak_gflops
    ceiling = step_ceiling(jax, loss_fn, opt, params, first_batch)
    row["step_ceiling_gflops"] = ceiling * flops_per_example * b / 1e9 * jax.device_count()
    row["fraction_of_step_ceiling"] = row["achieved_gflops"] / row["step_ceiling_gflops"]
    row["python_loop_fraction_of_peak"] = (
        loop["examples_per_s"] * flops_per_example / 1e9 / peak_gflops
    )
    return row


def step_ceiling(jax, loss_fn, opt, params, batch, steps: int = 50) -> float:
    """Local steps a second of each device running only this step, back to back, all at once.

    The same step on the same batch inside a ``fori_loop``, replicated so that every device
    runs it at the same time (as a sharded round keeps every core busy): no sampling,
    gathering, aggregation or dispatch. Times the number of devices it is the ceiling of any
    client map for this model and batch size on this machine; the ratio to it shows what the
    engine's round costs beyond the step itself (``fraction_of_step_ceiling``), the ratio of it
    to the matmul peak what the step's own shapes allow.
    """
    import fedjax_lab as fl

    step = _one_step(jax, loss_fn, opt)
    params, batch = fl.distributed.replicate((params, batch))

    @jax.jit
    def many(params, batch):
        def body(_, carry):
            return step(*carry, batch)

        return jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))

    jax.block_until_ready(many(params, batch))
    seconds = _median_time(lambda: jax.block_until_ready(many(params, batch)), 3, budget_s=5.0)
    return steps / seconds


def loop_cohort(jax, data, spec, num_clients: int) -> tuple[dict, object]:
    """The loop's clients and batches: the engine's own cohort of round 0, as NumPy arrays."""
    import jax.numpy as jnp
    import numpy as np

    from fedjax_lab.data import sampling

    key = jax.random.key(2)
    ids = sampling.sample_clients(key, data.num_clients, num_clients)
    cohort = jax.jit(
        lambda k, ex, off, ids: sampling.build_cohort(
            k,
            ex,
            off,
            ids,
            jnp.ones(ids.shape, jnp.float32),
            num_steps=spec["steps"],
            batch_size=spec["batch"],
            max_client_size=spec["client_size"],
            epochs=None,
            weighting="num_examples",
        )
    )(key, data.examples, jnp.asarray(data.offsets, jnp.int32), ids)
    batches = {k: np.asarray(v) for k, v in cohort.batches.items()}
    return batches, cohort


def python_loop(jax, loss_fn, opt, params, batches: dict, weights) -> tuple[dict, object]:
    """A round as FedJAX runs it: Python loops over clients and batches, one jitted step each.

    Same model, loss, optimiser and batches as the engine's round: each client starts from the
    server params and walks its ``[S, B]`` batches (NumPy slices of the host arrays, sent to the
    device by the jitted call); its params are accumulated with a jitted weighted sum and the
    server applies the weighted mean (FedAvg, server learning rate 1). Returns the timing and
    the new params (checked against the engine's round in the tests).
    """
    import jax.numpy as jnp
    import numpy as np

    step = _one_step(jax, loss_fn, opt)
    accumulate = jax.jit(lambda acc, p, w: jax.tree.map(lambda a, x: a + w * x, acc, p))
    finish = jax.jit(lambda acc, total: jax.tree.map(lambda a: a / total, acc))
    weights = np.asarray(weights, np.float32)
    num_clients, num_steps = batches["mask"].shape[:2]

    def one_round():
        acc = jax.tree.map(jnp.zeros_like, params)
        for c in range(num_clients):
            p, o = params, opt.init(params)
            for t in range(num_steps):
                p, o = step(p, o, {k: v[c, t] for k, v in batches.items()})
            acc = accumulate(acc, p, weights[c])
        return jax.block_until_ready(finish(acc, float(weights.sum())))

    t0 = time.perf_counter()
    one_round()
    first = time.perf_counter() - t0
    per_round = _median_time(one_round, 3, budget_s=20.0)
    rate = batches["mask"].size / per_round
    timing = {
        "examples_per_s": rate,
        "clients": num_clients,
        "compile_s": max(0.0, first - per_round),
    }
    return timing, one_round()


# ----------------------------------------------------------------------------- reporting


TARGETS = {
    # (model, minimum cohort): minimum vs_python_loop; the fraction-of-peak target is 0.5.
    "logreg": 10.0,
    "mlp": 2.0,
    "cnn": 1.5,
}


def check_targets(cases: list[dict]) -> list[dict]:
    out = []
    for row in cases:
        m = row["model"]
        if m in TARGETS and row["cohort"] >= 100:
            out.append(
                {
                    "case": row["name"],
                    "target": f"vs_python_loop >= {TARGETS[m]}",
                    "value": row["vs_python_loop"],
                    "met": row["vs_python_loop"] >= TARGETS[m],
                }
            )
        if m in ("mlp", "cnn") and row["cohort"] >= 100:
            out.append(
                {
                    "case": row["name"],
                    "target": "fraction_of_peak >= 0.5",
                    "value": row["fraction_of_peak"],
                    "met": row["fraction_of_peak"] >= 0.5,
                }
            )
    return out


def _print_row(r: dict) -> None:
    print(
        f"{r['name']:18s} {r['auto_picks']:40s} {r['examples_per_s']:11.0f} ex/s "
        f"{r['fraction_of_peak']:6.1%} of peak  loop {r['python_loop_examples_per_s']:10.0f} ex/s "
        f"x{r['vs_python_loop']:5.2f}  compile {r['compile_s']:5.1f} s",
        flush=True,
    )
    for m in r["maps"]:
        print(f"    {m['map']:40s} {m['examples_per_s']:11.0f} ex/s", flush=True)


def table(results: dict) -> str:
    peak = results["matmul_peak_gflops"]
    lines = [
        f"matmul peak {peak:.0f} GFLOP/s on {results['machine']['cpu']} "
        f"({results['machine']['num_devices']} XLA devices)",
        "",
        "| case | map (auto) | examples/s | GFLOP/s | of peak | of step ceiling "
        "| Python loop ex/s | vs loop | compile s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["cases"]:
        lines.append(
            f"| {r['name']} | {r['auto_picks']} | {r['examples_per_s']:,.0f} | "
            f"{r['achieved_gflops']:.1f} | {r['fraction_of_peak']:.0%} | "
            f"{r.get('fraction_of_step_ceiling', float('nan')):.0%} | "
            f"{r['python_loop_examples_per_s']:,.0f} | {r['vs_python_loop']:.2f}x | "
            f"{r['compile_s']:.1f} |"
        )
    if results.get("targets"):
        lines += ["", "| target | case | value | met |", "| --- | --- | ---: | --- |"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['case']} | {t['value']:.2f} | {t['met']} |")
    maps = [(r["name"], m) for r in results["cases"] for m in r["maps"]]
    if maps:
        lines += ["", "| case | client map | examples/s |", "| --- | --- | ---: |"]
        lines += [f"| {n} | {m['map']} | {m['examples_per_s']:,.0f} |" for n, m in maps]
    split = results.get("split_host")
    if split:
        lines += [
            "",
            "| case | 1 device ex/s | split host ex/s | gain |",
            "| --- | ---: | ---: | ---: |",
        ]
        for row in split:
            lines.append(
                f"| {row['name']} | {row['one_device']:,.0f} | {row['split']:,.0f} | "
                f"{row['split'] / row['one_device']:.2f}x |"
            )
    return "\n".join(lines)


def _write(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(tmp, path)


def merge_one_device(cases: list[dict], child: list[dict]) -> list[dict]:
    """Takes the Python loop at its best: split host or one device, whichever is faster.

    Splitting the host into one XLA device per core lets the engine put clients on every core,
    but it also takes the intra-op threads from a single device: a Python loop of jitted steps
    (which runs on one device) is faster on an unsplit host. Each case's baseline is the faster
    of the two; both are kept. Returns the engine's own split-vs-one-device comparison for the
    cases the child timed the engine on.
    """
    by_name = {r["name"]: r for r in child}
    split = []
    for row in cases:
        other = by_name.get(row["name"])
        if other is None:
            continue
        here = row["python_loop_examples_per_s"]
        there = other["python_loop_examples_per_s"]
        row["python_loop_split_host_examples_per_s"] = here
        row["python_loop_one_device_examples_per_s"] = there
        best = max(here, there)
        scale = best / here
        row["python_loop_examples_per_s"] = best
        row["python_loop_fraction_of_peak"] *= scale
        row["vs_python_loop"] = row["examples_per_s"] / best
        if "examples_per_s" in other:
            split.append(
                {
                    "name": row["name"],
                    "one_device": other["examples_per_s"],
                    "split": row["examples_per_s"],
                }
            )
    return split


def _one_device_child(args, cases: list[dict]) -> list[dict]:
    """The same cases in a child process whose host is ONE XLA device (no split): the Python
    loop of every case, and the engine where every map is timed."""
    if not cases:
        return []
    out = args.out + ".one_device.json"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--devices",
        "1",
        "--no-maps",
        "--no-split",
        "--loop-only",
        "--cases",
        ",".join(c["name"] for c in cases),
        "--out",
        out,
    ] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        child = json.load(f)
    os.remove(out)
    return child["cases"]


if __name__ == "__main__":
    main()
