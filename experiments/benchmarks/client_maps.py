"""Benchmark: seconds per round of each client map on the default experiment's model.

FedAvg on digits (100 clients, Dirichlet 0.5), the MLP 64 of the default experiment, batch 10,
one local epoch, cohorts of 10 and 100 clients. Every map runs the same rounds (same key); the
benchmark reports compile seconds, seconds per round after compilation (median of repeats of a
scan of rounds) and examples/s, and checks that every map ends at the same params as
``sequential()``. ``--devices N`` splits the host into N XLA devices (one per core) so that
``sharded`` runs clients on every core; it must be given before JAX starts, so this script sets
``XLA_FLAGS`` itself.

Usage::

    python experiments/benchmarks/client_maps.py [--devices 2] [--quick] [--out client_maps.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="host devices (cores) for sharded")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    parser.add_argument("--out", default="client_maps.json")
    args = parser.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
    import jax
    import numpy as np
    import optax

    import fedjax_lab as fl

    train, _ = fl.datasets.load("digits", num_clients=100, partition="dirichlet", alpha=0.5)
    model = fl.models.mlp((8, 8, 1), hidden=(64,), num_classes=10)
    alg = fl.algorithms.fed_avg(fl.models.classification_loss(model), optax.sgd(0.1))
    params = model.init(jax.random.key(0))
    rounds, repeats = (5, 2) if args.quick else (20, 3)
    maps = {
        "vmap": fl.maps.vmap(),
        "sequential": fl.maps.sequential(),
        "chunked(10)": fl.maps.chunked(10),
        "auto": fl.maps.auto(),
    }
    if jax.local_device_count() > 1:
        maps["sharded(sequential)"] = fl.maps.sharded(fl.maps.sequential())
        maps["sharded(vmap)"] = fl.maps.sharded(fl.maps.vmap())
    results = []
    for cohort in (10, 100):
        reference = None
        for name, client_map in maps.items():
            kw = dict(num_rounds=rounds, cohort_size=cohort, batch_size=10, client_map=client_map)
            state0 = alg.init(params)
            start = time.perf_counter()
            state, hist = fl.run_rounds(alg, state0, train, jax.random.key(1), **kw)
            jax.block_until_ready(state)
            first = time.perf_counter() - start
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                state, hist = fl.run_rounds(alg, state0, train, jax.random.key(1), **kw)
                jax.block_until_ready(state)
                times.append(time.perf_counter() - start)
            per_round = statistics.median(times) / rounds
            examples = float(np.sum(hist["num_examples"])) / rounds
            leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
            if reference is None:
                reference = leaves
            err = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, reference, strict=True))
            row = {
                "map": name,
                "chosen": fl.maps.choose(cohort).name if name == "auto" else name,
                "cohort": cohort,
                "compile_s": first - per_round * rounds,
                "s_per_round": per_round,
                "examples_per_s": examples / per_round,
                "max_param_diff_vs_first": err,
            }
            results.append(row)
            print(f"cohort {cohort:>4} {name:<22} {per_round * 1e3:8.1f} ms/round "
                  f"{row['examples_per_s']:>10.0f} ex/s  compile {row['compile_s']:5.1f} s  "
                  f"|Δparams| {err:.1e}", flush=True)
    out = {
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "devices": jax.local_device_count(),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
