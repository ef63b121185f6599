"""Benchmark: S seeds of one run as ONE compiled program vs the same S runs one by one.

FedAdam on the shipped digits data (100 clients, Dirichlet 0.5, the MLP 64-64-10, client SGD
0.1, server Adam 0.01, cohort 10, batch 10, one epoch, 30 rounds), 16 seeds:

* ``one_by_one``: seed ``s`` is ``fl.run_rounds(alg, alg.init(init(k0)), train, k1, ...)`` with
  ``k0, k1 = split(key(s))`` (what ``fedjax-lab run`` does with one seed); the 16 calls share
  one program (the second call compiles nothing), so the loop pays one compile;
* ``one_program``: ``fl.sweep.run_seeds`` on the 16 states and keys stacked by
  ``fl.sweep.stack_seeds`` (what ``fedjax-lab run`` does with ``training.seeds = 16``), with
  ``seed_map="vmap"`` (the seeds batched in every step) and ``seed_map="map"`` (the seeds one
  after the other inside the program).

Each way is timed "including compile" (its first call, after ``jax.clear_caches()``) and
"steady state" (the fastest of 3 further calls, the one least disturbed on a shared machine).
The final parameters of every seed are compared with its one-by-one run:
``params_sha256`` (``fl.checkpoint.params_sha256``) and the largest absolute difference.
``seed_map="map"`` runs each seed's one-seed computation inside a loop of the program;
``seed_map="vmap"`` batches the seeds' matrix products, which XLA may sum in another order, so
``run_seeds`` promises equality to float rounding only; the script reports, per seed, whether
the bits agree and the largest difference (in ``seeds.json``: ``identity``).

Usage::

    python experiments/benchmarks/seeds.py [--smoke] [--out experiments/benchmarks/seeds.json]

``--smoke`` (4 seeds, 2 rounds, an 8-unit MLP, one repeat) checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _settings(smoke: bool) -> dict:
    if smoke:
        return {"seeds": 4, "rounds": 2, "hidden": (8,), "repeats": 1}
    return {"seeds": 16, "rounds": 30, "hidden": (64,), "repeats": 3}


COHORT = 10
BATCH = 10
CLIENT_LR = 0.1
SERVER_LR = 0.01


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script runs")
    ap.add_argument("--out", default="seeds.json")
    args = ap.parse_args(argv)
    import jax
    import numpy as np
    import optax

    import fedjax_lab as fl
    from fedjax_lab.checkpoint import params_sha256

    cfg = _settings(args.smoke)
    total = time.perf_counter()
    train, _ = fl.datasets.load("digits", num_clients=100, partition="dirichlet", alpha=0.5,
                                seed=0)
    model = fl.models.mlp((8, 8, 1), hidden=cfg["hidden"], num_classes=10)
    alg = fl.algorithms.fed_adam(fl.models.classification_loss(model),
                                 client_optimizer=optax.sgd(CLIENT_LR),
                                 server_learning_rate=SERVER_LR)
    seeds = list(range(cfg["seeds"]))
    states, keys = [], []
    for s in seeds:
        init_key, run_key = jax.random.split(jax.random.key(s))
        states.append(alg.init(model.init(init_key), num_clients=train.num_clients))
        keys.append(run_key)
    kw = dict(num_rounds=cfg["rounds"], cohort_size=COHORT, batch_size=BATCH, epochs=1)

    def one_by_one():
        finals = []
        for state, key in zip(states, keys, strict=True):
            final, _ = fl.run_rounds(alg, state, train, key, **kw)
            finals.append(final.params)
        return jax.block_until_ready(finals)

    stacked_states, stacked_keys = fl.sweep.stack_seeds(states), fl.sweep.stack_seeds(keys)

    def one_program(seed_map):
        def run():
            final, _ = fl.sweep.run_seeds(alg, stacked_states, train, stacked_keys,
                                          seed_map=seed_map, **kw)
            return jax.block_until_ready(final.params)

        return run

    ways = {"one_by_one": one_by_one, "one_program_vmap": one_program("vmap"),
            "one_program_map": one_program("map")}
    timing, params = {}, {}
    for name, fn in ways.items():
        jax.clear_caches()
        first_s, params[name] = _timed(fn)
        steady = min(_timed(fn)[0] for _ in range(cfg["repeats"]))
        timing[name] = {"including_compile_s": first_s, "steady_state_s": steady}
        print(f"{name:>17}: {first_s:6.2f} s including compile, {steady:6.2f} s steady state",
              flush=True)

    reference = [params_sha256(p) for p in params["one_by_one"]]
    identity = {}
    for name in ("one_program_vmap", "one_program_map"):
        per_seed = []
        for i, s in enumerate(seeds):
            mine = jax.tree.map(lambda x, i=i: x[i], params[name])
            diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
                jax.tree.leaves(mine), jax.tree.leaves(params["one_by_one"][i]), strict=True))
            per_seed.append({"seed": s, "params_sha256": params_sha256(mine),
                             "identical": params_sha256(mine) == reference[i],
                             "max_abs_diff": diff})
        identity[name] = {
            "identical_seeds": sum(r["identical"] for r in per_seed),
            "max_abs_diff": max(r["max_abs_diff"] for r in per_seed),
            "per_seed": per_seed,
        }
        print(f"{name:>17}: {identity[name]['identical_seeds']}/{len(seeds)} seeds bit-identical "
              f"to the one-by-one runs, max |diff| {identity[name]['max_abs_diff']:.3g}",
              flush=True)

    ratios = {}
    for name in ("one_program_vmap", "one_program_map"):
        ratios[name] = {
            k: timing["one_by_one"][k] / timing[name][k]
            for k in ("including_compile_s", "steady_state_s")
        }
        print(f"one by one / {name}: {ratios[name]['including_compile_s']:.2f}x including "
              f"compile, {ratios[name]['steady_state_s']:.2f}x steady state", flush=True)
    result = {
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "settings": {"smoke": args.smoke, "data": "digits, 100 clients, dirichlet 0.5",
                     "algorithm": "fed_adam", "client_lr": CLIENT_LR, "server_lr": SERVER_LR,
                     "hidden": list(cfg["hidden"]), "seeds": len(seeds), "rounds": cfg["rounds"],
                     "cohort": COHORT, "batch_size": BATCH, "repeats": cfg["repeats"]},
        "timing": timing,
        "speedup": ratios,
        "identity": identity,
        "params_sha256_one_by_one": reference,
        "total_s": time.perf_counter() - total,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
