"""Benchmark: the size-weighted cohort sampler's share of a round at 1M clients, Gumbel vs search.

``fl.data.sampling.size_weighted`` draws ``C`` distinct clients with probability proportional to
their sizes (successive sampling) in two exact ways: ``method="gumbel"`` (Gumbel top-k over
all ``N`` clients, ``O(N)`` a round) and ``method="search"`` (binary searches in the prefix sums
of the sizes, built once, duplicates rejected: ``O(C log N)`` expected). This script measures,
at ``N = 1,000,000`` clients and ``C = 100``:

* each sampler alone: one jitted ``sampler.sample`` call and, as the
  engine runs it, per round inside a ``lax.scan`` of rounds that carries the sampler's state;
* a 100-client round of a small model: scale.py's setup (client ``i`` holds 1..8 examples of
  64 features and a label in 0..9; the MLP 64-200-200-10, FedAvg, client SGD 0.1, batch 4,
  one epoch, ``sequential()``), seconds per round of ``fl.run_rounds`` (a scan of 20 rounds)
  with the uniform sampler, and end to end with each size-weighted one;
* ``share``: the sampler's in-scan time over the seconds per round of ``run_rounds`` with that
  sampler (the target is < 10%); ``share_of_uniform_round`` divides by the uniform-sampler
  round instead. (A size-weighted cohort holds more examples than a uniform one: size-biased
  clients hold 5.7 examples on average, not 4.5, and do more real local steps, so its rounds
  are longer whatever the sampler.)

Every time is the fastest of several repeats (the one least disturbed by other processes on a
shared machine), after a warm-up call that compiles.

Usage::

    python experiments/benchmarks/sampling.py [--smoke] [--out sampling.json]

``--smoke`` (2,000 clients, an 8-unit MLP, 2 rounds) checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

FEATURES = (8, 8)
MAX_CLIENT_SIZE = 8
BATCH = 4
COHORT = 100


def _settings(smoke: bool) -> dict:
    if smoke:
        return {"population": 2_000, "hidden": (8,), "rounds": 2, "repeats": 1, "calls": 3}
    return {"population": 1_000_000, "hidden": (200, 200), "rounds": 20, "repeats": 5,
            "calls": 51}


def _population(num_clients: int, seed: int = 0):
    """Synthetic flat population (scale.py's): client ``i`` holds 1..8 examples."""
    import jax
    import numpy as np

    import fedjax_lab as fl

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, MAX_CLIENT_SIZE + 1, size=num_clients)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    x = rng.standard_normal((total, *FEATURES), dtype=np.float32)
    y = rng.integers(0, 10, size=total, dtype=np.int32)
    examples = {"x": jax.device_put(x), "y": jax.device_put(y)}
    return fl.FederatedData.from_offsets(examples, offsets)


def _best_s(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls: on a shared machine the least disturbed one."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def time_sampler(sampler, sizes, *, cohort: int, rounds: int, calls: int) -> dict:
    """One jitted ``sample`` call, and per round inside a scan carrying the state (seconds)."""
    import jax
    import numpy as np

    state = sampler.init(sizes)
    one = jax.jit(lambda s, k: sampler.sample(s, k, 0, cohort, sizes)[0])

    def scan(s, key):
        def body(s, r):
            ids, _, s = sampler.sample(s, jax.random.fold_in(key, r), r, cohort, sizes)
            return s, ids

        return jax.lax.scan(body, s, np.arange(rounds))

    many = jax.jit(scan)
    ids = np.asarray(one(state, jax.random.key(0)))
    if len(np.unique(ids)) != cohort or ids.min() < 0 or ids.max() >= sizes.shape[0]:
        raise RuntimeError(f"{sampler.name} returned bad ids")
    jax.block_until_ready(many(state, jax.random.key(0)))
    call_s = _best_s(lambda i: jax.block_until_ready(one(state, jax.random.key(i))), calls)
    scan_s = _best_s(lambda i: jax.block_until_ready(many(state, jax.random.key(i))), 5)
    return {"call_s": call_s, "per_round_in_scan_s": scan_s / rounds}


def time_rounds(data, sampler, *, hidden, rounds: int, repeats: int) -> float:
    """Seconds per round of ``fl.run_rounds`` (the best of repeats of a scan of ``rounds``)."""
    import jax
    import numpy as np
    import optax

    import fedjax_lab as fl

    model = fl.models.mlp(FEATURES, hidden, 10)
    alg = fl.algorithms.fed_avg(fl.models.classification_loss(model), optax.sgd(0.1))
    state0 = alg.init(model.init(jax.random.key(0)))

    def run(i):
        state, hist = fl.run_rounds(
            alg, state0, data, jax.random.key(i), num_rounds=rounds, cohort_size=COHORT,
            batch_size=BATCH, epochs=1, client_map=fl.maps.sequential(), sampler=sampler,
        )
        jax.block_until_ready(state)
        return hist

    hist = run(0)  # compile and warm up
    if not np.all(np.isfinite(np.asarray(hist["train_loss"]))):
        raise RuntimeError("non-finite training loss")
    return _best_s(run, repeats) / rounds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script runs")
    ap.add_argument("--out", default="sampling.json")
    args = ap.parse_args(argv)
    import jax
    import numpy as np

    import fedjax_lab as fl

    cfg = _settings(args.smoke)
    total = time.perf_counter()
    data = _population(cfg["population"])
    sizes = jax.device_put(np.asarray(data.client_sizes, np.int32))
    samplers = {
        "gumbel": fl.data.sampling.size_weighted("gumbel"),
        "search": fl.data.sampling.size_weighted("search"),
    }
    rounds = {"uniform": time_rounds(data, fl.data.sampling.uniform(), hidden=cfg["hidden"],
                                     rounds=cfg["rounds"], repeats=cfg["repeats"])}
    out_samplers = {}
    for name, sampler in samplers.items():
        t = time_sampler(sampler, sizes, cohort=COHORT, rounds=cfg["rounds"], calls=cfg["calls"])
        rounds[name] = time_rounds(data, sampler, hidden=cfg["hidden"], rounds=cfg["rounds"],
                                   repeats=cfg["repeats"])
        out_samplers[name] = {
            **t,
            "run_rounds_s_per_round": rounds[name],
            "share": t["per_round_in_scan_s"] / rounds[name],
            "share_of_uniform_round": t["per_round_in_scan_s"] / rounds["uniform"],
        }
        print(f"{name:>7}: {t['call_s'] * 1e3:7.3f} ms a call, "
              f"{t['per_round_in_scan_s'] * 1e3:7.3f} ms a round in a scan; run_rounds with it "
              f"{rounds[name] * 1e3:.2f} ms/round: share {out_samplers[name]['share']:6.1%} "
              f"(uniform-sampler round {rounds['uniform'] * 1e3:.2f} ms)", flush=True)
    result = {
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "settings": {"smoke": args.smoke, "population": cfg["population"], "cohort": COHORT,
                     "features": list(FEATURES), "hidden": list(cfg["hidden"]),
                     "max_client_size": MAX_CLIENT_SIZE, "batch_size": BATCH,
                     "rounds_per_scan": cfg["rounds"], "repeats": cfg["repeats"]},
        "round_s": rounds["uniform"],
        "samplers": out_samplers,
        "total_s": time.perf_counter() - total,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
