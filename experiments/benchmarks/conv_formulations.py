"""Benchmark: convolution formulations x local-training loop structures.

The EMNIST CNN (28x28x1, 62 classes; conv 3x3x32, conv 3x3x64, pool, dense 128), batch 20,
10 local SGD steps per client, 8 clients. For each convolution formulation of
``fedjax_lab.models.conv2d`` and each way of running the clients' local training:

* ``python_loop``:  a Python loop over clients and batches around a jitted one-batch step
  (FedJAX's structure);
* ``scan_map``:     one jitted program, ``lax.scan`` over steps (unroll=1) under ``lax.map``
  over clients (the engine's CPU structure);
* ``unrolled_map``: the same with the scan fully unrolled;
* ``scan_vmap``:    ``lax.scan`` over steps under ``jax.vmap`` over clients (the GPU structure);

it reports examples/s (median of timed repeats after a warm-up) and compile seconds, prints a
table and writes JSON. Every structure starts every client from the same params; the benchmark
also checks that each structure's averaged client params match the Python loop's.

Usage::

    python experiments/benchmarks/conv_formulations.py [--quick] [--out conv_formulations.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lab.models as fm

MODES = ("python_loop", "scan_map", "unrolled_map", "scan_vmap")


def _make_data(num_clients: int, steps: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((num_clients, steps, batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 62, (num_clients, steps, batch)).astype(np.int32)
    mask = np.ones((num_clients, steps, batch), np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(mask)}


def _builders(formulation: str, learning_rate: float):
    model = fm.cnn((28, 28, 1), 62, conv=formulation)
    loss_fn = fm.classification_loss(model)
    opt = optax.sgd(learning_rate)
    key = jax.random.key(0)

    def step(carry, batch):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def client(params, batches, unroll):
        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), batches, unroll=unroll)
        return p

    def mean_over_clients(stacked):
        return jax.tree.map(lambda a: jnp.mean(a, axis=0), stacked)

    def scan_map(params, batches):
        return mean_over_clients(jax.lax.map(lambda b: client(params, b, 1), batches))

    def unrolled_map(params, batches):
        return mean_over_clients(jax.lax.map(lambda b: client(params, b, True), batches))

    def scan_vmap(params, batches):
        return mean_over_clients(jax.vmap(lambda b: client(params, b, 1))(batches))

    one_step = jax.jit(lambda carry, batch: step(carry, batch)[0])
    return (
        model,
        opt,
        one_step,
        {"scan_map": scan_map, "unrolled_map": unrolled_map, "scan_vmap": scan_vmap},
    )


def _python_loop(one_step, opt, params, batch_list):
    finals = []
    for client_batches in batch_list:
        carry = (params, opt.init(params))
        for b in client_batches:
            carry = one_step(carry, b)
        finals.append(carry[0])
    out = jax.tree.map(lambda *a: sum(a) / len(a), *finals)
    return jax.block_until_ready(out)


def _time(fn, repeats: int, slow_s: float) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        if times[-1] > slow_s:  # one long repeat is enough for a slow path
            break
    return times


def run(
    num_clients: int, steps: int, batch: int, repeats: int, formulations, modes, slow_s: float
) -> list[dict]:
    data = _make_data(num_clients, steps, batch)
    batch_list = [
        [jax.tree.map(lambda a, c=c, s=s: a[c, s], data) for s in range(steps)]
        for c in range(num_clients)
    ]
    n_examples = num_clients * steps * batch
    rows = []
    for form in formulations:
        model, opt, one_step, programs = _builders(form, 0.05)
        params = model.init(jax.random.key(1))
        reference = None
        for mode in modes:
            if mode == "python_loop":
                t0 = time.perf_counter()
                jax.block_until_ready(one_step((params, opt.init(params)), batch_list[0][0]))
                compile_s = time.perf_counter() - t0
                call = lambda: _python_loop(one_step, opt, params, batch_list)  # noqa: B023
            else:
                t0 = time.perf_counter()
                compiled = jax.jit(programs[mode]).lower(params, data).compile()
                compile_s = time.perf_counter() - t0
                call = lambda: compiled(params, data)  # noqa: B023
            t0 = time.perf_counter()
            out = jax.block_until_ready(call())  # warm-up
            warm_s = time.perf_counter() - t0
            times = [warm_s] if warm_s > slow_s else _time(call, repeats, slow_s)
            if reference is None:
                reference = out
            diff = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference), strict=True)
            )
            med = statistics.median(times)
            rows.append(
                {
                    "formulation": form,
                    "mode": mode,
                    "examples_per_s": n_examples / med,
                    "median_s": med,
                    "times_s": times,
                    "compile_s": compile_s,
                    "max_abs_diff_vs_first_mode": diff,
                }
            )
            print(
                f"  {form:14s} {mode:13s} {n_examples / med:9.0f} ex/s  median {med:7.3f} s  "
                f"compile {compile_s:6.2f} s  |dparams| {diff:.1e}",
                flush=True,
            )
    return rows


def _table(rows: list[dict], formulations, modes) -> str:
    head = f"{'formulation':14s}" + "".join(f"{m:>14s}" for m in modes)
    lines = ["examples/s (compile s)", head, "-" * len(head)]
    by = {(r["formulation"], r["mode"]): r for r in rows}
    for f in formulations:
        cells = []
        for m in modes:
            r = by.get((f, m))
            cells.append(f"{r['examples_per_s']:7.0f} ({r['compile_s']:4.1f})" if r else "-")
        lines.append(f"{f:14s}" + "".join(f"{c:>14s}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 clients x 3 steps, 2 repeats")
    ap.add_argument("--out", default="conv_formulations.json", help="JSON output path")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--formulations", default=",".join(fm.CONV_FORMULATIONS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--slow-s",
        type=float,
        default=20.0,
        help="a cell whose warm-up call takes longer is timed once",
    )
    args = ap.parse_args(argv)
    clients = args.clients or (2 if args.quick else 8)
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 3)
    forms = [f for f in args.formulations.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r}; choose from {MODES}.")
    config = {
        "clients": clients,
        "steps": steps,
        "batch": args.batch,
        "repeats": repeats,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "machine": platform.machine(),
        "model": "EMNIST CNN conv3x3x32-conv3x3x64-pool-dense128-dense62 (VALID)",
    }
    print(json.dumps(config), flush=True)
    rows = run(clients, steps, args.batch, repeats, forms, modes, args.slow_s)
    print()
    print(_table(rows, forms, modes))
    with open(args.out, "w") as f:
        json.dump({"config": config, "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
