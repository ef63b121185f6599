"""Leave-one-out and Monte-Carlo Shapley values of 100 FedAvg clients, one planted useless.

Data: scikit-learn's digits (``fl.data.datasets.load_digits``), 100 clients by a Dirichlet
(``alpha``) label partition; every client's held-out split, pooled, is the validation set. The
planted client (the one of median size, lowest index) gets uniformly random labels: its data
carries no signal. Model: multinomial logistic regression; algorithm: FedAvg (local SGD),
full participation of each coalition for ``rounds`` rounds. Utility: the validation accuracy
of the final model (``fl.valuation.validation_fn(..., metric="accuracy")``; ``--metric
negative_loss``: minus the validation cross-entropy).

Every coalition (leave-one-out's ``N + 2``, the ``P (N - 1) + 2`` prefixes of ``P`` random
orderings) is evaluated by ``fl.valuation.utility``: the whole training run vmapped over
``chunk`` participation masks, one compiled program.

    PYTHONPATH=. python3 experiments/valuation/shapley_100.py            # writes results.json
    PYTHONPATH=. python3 experiments/valuation/shapley_100.py --smoke --out /tmp/shapley.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import fedjax_lab as fl

FULL = dict(num_clients=100, rounds=10, permutations=300, chunk=64)
SMOKE = dict(num_clients=10, rounds=2, permutations=4, chunk=16)


def build(num_clients: int, alpha: float, seed: int):
    """The population with its planted client, and the validation data."""
    train, test = fl.data.datasets.load_digits(num_clients=num_clients, partition="dirichlet",
                                               alpha=alpha, seed=seed)
    sizes = np.asarray(train.client_sizes)
    planted = int(np.flatnonzero(sizes == np.sort(sizes)[len(sizes) // 2])[0])
    y = np.array(train.examples["y"])
    start, stop = int(train.offsets[planted]), int(train.offsets[planted + 1])
    y[start:stop] = np.random.default_rng(seed).integers(0, 10, stop - start)
    examples = dict(train.examples, y=y.astype(np.int32))
    return fl.FederatedData.from_offsets(examples, train.offsets), test, planted


def summary(valuation, planted: int) -> dict:
    v = np.asarray(valuation.values)
    others = np.delete(v, planted)
    order = np.argsort(v)  # ascending: rank 1 is the lowest value
    return {
        "planted_value": float(v[planted]),
        "planted_stderr": float(valuation.stderr[planted]),
        "planted_rank_from_lowest": int(np.flatnonzero(order == planted)[0]) + 1,
        "others_mean": float(others.mean()),
        "others_min": float(others.min()),
        "others_max": float(others.max()),
        "others_fraction_positive": float(np.mean(others > 0)),
        "num_evaluations": int(valuation.num_evaluations),
        "utility_all": valuation.utility_all,
        "utility_empty": valuation.utility_empty,
        "sum_of_values": float(v.sum()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick version")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--client-lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", default="accuracy", choices=["negative_loss", "accuracy"])
    parser.add_argument("--rounds", type=int, help="override the rounds of the run")
    parser.add_argument("--permutations", type=int, help="override the number of orderings")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    for name in ("rounds", "permutations"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)

    train, test, planted = build(cfg["num_clients"], args.alpha, args.seed)
    model = fl.models.logistic_regression((8, 8, 1), 10)
    alg = fl.algorithms.fed_avg(fl.models.classification_loss(model),
                                client_learning_rate=args.client_lr)
    state = alg.init(model.init(jax.random.key(args.seed)))
    val_fn = fl.valuation.validation_fn(fl.models.classification_metrics(model), test,
                                        metric=args.metric)
    utility = fl.valuation.utility(alg, state, train, val_fn, jax.random.key(args.seed + 1),
                                   num_rounds=cfg["rounds"], batch_size=args.batch_size,
                                   chunk_size=cfg["chunk"])
    n = train.num_clients

    start = time.perf_counter()
    utility(np.zeros((1, n), np.float32))  # compiles the chunk program
    compile_s = time.perf_counter() - start

    timings = {}
    start = time.perf_counter()
    loo = fl.valuation.leave_one_out(utility, n)
    timings["leave_one_out"] = time.perf_counter() - start
    start = time.perf_counter()
    shapley = fl.valuation.monte_carlo_shapley(utility, n, jax.random.key(args.seed + 2),
                                               num_permutations=cfg["permutations"])
    timings["monte_carlo_shapley"] = time.perf_counter() - start

    results = {
        "setup": {
            **cfg,
            "dataset": "digits", "partition": "dirichlet", "alpha": args.alpha,
            "model": "logistic_regression", "algorithm": "fedavg",
            "client_learning_rate": args.client_lr, "batch_size": args.batch_size,
            "epochs": 1, "participation": "full participation of each coalition",
            "utility": {"negative_loss": "minus the validation cross-entropy",
                        "accuracy": "the validation accuracy"}[args.metric]
            + " (pooled held-out splits)",
            "planted_client": planted,
            "planted_client_size": int(train.client_sizes[planted]),
            "planted_corruption": "uniformly random labels",
            "client_sizes_min_median_max": [int(np.min(train.client_sizes)),
                                            float(np.median(train.client_sizes)),
                                            int(np.max(train.client_sizes))],
            "seed": args.seed,
        },
        "machine": {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "jax": jax.__version__},
        "compile_s": compile_s,
    }
    for name, valuation in (("leave_one_out", loo), ("monte_carlo_shapley", shapley)):
        row = summary(valuation, planted)
        row["wall_s"] = timings[name]
        row["evaluations_per_s"] = row["num_evaluations"] / timings[name]
        results[name] = row
    results["values"] = {"leave_one_out": loo.values.tolist(),
                         "monte_carlo_shapley": shapley.values.tolist(),
                         "monte_carlo_shapley_stderr": shapley.stderr.tolist()}

    for name in ("leave_one_out", "monte_carlo_shapley"):
        r = results[name]
        print(f"{name:20s} planted #{planted}: {r['planted_value']:+.5f} "
              f"(±{r['planted_stderr']:.5f}), rank {r['planted_rank_from_lowest']} of {n} from "
              f"the lowest; others mean {r['others_mean']:+.5f} min {r['others_min']:+.5f} max "
              f"{r['others_max']:+.5f}; {r['num_evaluations']} evaluations in {r['wall_s']:.1f} "
              f"s ({r['evaluations_per_s']:.1f}/s)")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
