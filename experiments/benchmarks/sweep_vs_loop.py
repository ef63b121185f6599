"""Benchmark: a hyper-parameter grid as ONE compiled program vs the same runs one by one.

FedAdam on digits (100 clients, Dirichlet 0.5, MLP 64), a client-lr x server-lr grid. One by
one, each configuration builds its algorithm from Python floats, so every run compiles its own
program (what a Python loop over configurations costs); ``fl.run_sweep`` compiles once for the whole
grid. Both include compilation and the final evaluation, and the benchmark checks that both give
the same final accuracies.

Usage::

    python experiments/benchmarks/sweep_vs_loop.py [--quick] [--out sweep_vs_loop.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np
import optax

import fedjax_lab as fl

TRAIN, TEST = fl.datasets.load("digits", num_clients=100, partition="dirichlet", alpha=0.5)
MODEL = fl.models.mlp((8, 8, 1), hidden=(64,), num_classes=10)
LOSS = fl.models.classification_loss(MODEL)
EVAL = fl.models.classification_metrics(MODEL)


def make_fedadam(client_lr, server_lr):
    return fl.algorithms.fed_adam(LOSS, client_optimizer=optax.sgd(client_lr),
                                  server_learning_rate=server_lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2x2 grid and 20 rounds")
    parser.add_argument("--out", default="sweep_vs_loop.json")
    args = parser.parse_args()
    rounds = 20 if args.quick else 100
    client_lrs = [0.05, 0.1] if args.quick else [0.03, 0.1, 0.3]
    server_lrs = [0.01, 0.03] if args.quick else [0.003, 0.01, 0.03]
    configs = fl.grid(client_lr=client_lrs, server_lr=server_lrs)
    kw = dict(num_rounds=rounds, cohort_size=10, batch_size=10)

    start = time.perf_counter()
    rows = fl.run_sweep(make_fedadam, configs, MODEL.init, TRAIN, seeds=(0,), eval_fn=EVAL,
                    eval_data=TEST, **kw)
    sweep_s = time.perf_counter() - start

    start = time.perf_counter()
    single = []
    for c in configs:
        alg = make_fedadam(c["client_lr"], c["server_lr"])
        init_key, run_key = jax.random.split(jax.random.key(0))
        state, _ = fl.run_rounds(alg, alg.init(MODEL.init(init_key)), TRAIN, run_key, **kw)
        single.append(fl.evaluate(EVAL, state.params, TEST)["accuracy"])
    loop_s = time.perf_counter() - start

    diff = float(np.max(np.abs(np.array(single) - [r["test_accuracy"] for r in rows])))
    result = {
        "machine": platform.platform(),
        "backend": jax.default_backend(),
        "configurations": len(configs),
        "rounds": rounds,
        "sweep_s": sweep_s,
        "one_by_one_s": loop_s,
        "speedup": loop_s / sweep_s,
        "max_accuracy_difference": diff,
        "rows": rows,
    }
    print(f"{len(configs)} configurations x {rounds} rounds: sweep {sweep_s:.1f} s, "
          f"one by one {loop_s:.1f} s -> {loop_s / sweep_s:.2f}x "
          f"(max |accuracy difference| {diff:.2g})")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
