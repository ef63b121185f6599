"""Robustness breadth: the attacks that break naive robust rules, against eight aggregators.

One command measures the final test accuracy of FedAvg with each aggregator (columns: mean,
coordinate-wise median, trimmed mean, Krum, geometric median, centered clipping, Bulyan,
FLTrust) under each attack (rows: none, ALIE, IPM at a small and a large ε, a pixel-pattern
backdoor, whose row also gives the attack success rate) on scikit-learn's digits (offline),
and writes every number and setting to ``--out``:

  python experiments/robustness/table.py [--smoke] --out experiments/robustness/results.json

Each (aggregator, attack) cell is one :func:`fedjax_lab.run_sweep` over the seeds (one compiled
program). FLTrust's server holds a root set of ``root_examples`` clean training examples drawn
once (seeded) and trains on it each round as a client would. ``--smoke`` runs a few rounds of a
reduced grid (a test of the script, not a result).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fedjax_lab as fl

AGGREGATORS = {
    "mean": "mean",
    "median": "median",
    "trimmed_mean": "trimmed mean",
    "krum": "Krum",
    "geometric_median": "geometric median",
    "centered_clipping": "centered clipping",
    "bulyan": "Bulyan",
    "fltrust": "FLTrust",
}
# Rows: name -> (attack factory name, its options).
ATTACKS = {
    "none": ("none", {}),
    "alie": ("alie", {}),
    "ipm_0.1": ("ipm", {"epsilon": 0.1}),
    "ipm_10": ("ipm", {"epsilon": 10.0}),
    "backdoor": ("backdoor", {}),
}
ATTACK_TITLES = {
    "none": "none",
    "alie": "ALIE (paper's z)",
    "ipm_0.1": "IPM ε=0.1",
    "ipm_10": "IPM ε=10",
    "backdoor": "backdoor",
}

FULL: dict[str, Any] = {
    "seeds": [0, 1],
    "model": {"name": "mlp", "hidden": [64]},
    "data": {"name": "digits", "num_clients": 50, "partition": "iid"},
    "rounds": 60,
    "cohort_size": 20,
    "fraction": 0.2,  # malicious clients of the population (a fixed seeded set)
    "attack_seed": 0,
    "client_learning_rate": 0.1,
    "batch_size": 10,
    "epochs": 1,
    "aggregators": list(AGGREGATORS),
    "attacks": list(ATTACKS),
    "gm_iters": 10,
    "cc_tau": 0.1,
    "root_examples": 100,
    "root_batch_size": 10,
    "backdoor": {"target_label": 0, "patch_size": 2, "patch_value": 1.0,
                 "poison_fraction": 0.5},
}

SMOKE: dict[str, Any] = {
    **FULL,
    "seeds": [0],
    "rounds": 3,
    "aggregators": ["mean", "bulyan", "fltrust"],
    "attacks": ["alie", "backdoor"],
}


class _Root:
    """The FLTrust root batches, hashable by identity (``fl.run_sweep`` caches on the maker)."""

    def __init__(self, batches: dict[str, np.ndarray]):
        self.batches = batches


def aggregator_from(name: str, f: int, s: dict[str, Any], loss_fn: Callable,
                    root: _Root) -> fl.Aggregator:
    """The column's aggregator; ``f`` the Byzantine clients a cohort is expected to hold."""
    if name == "fltrust":
        return fl.robust.fltrust(fl.robust.fltrust_root_update(
            loss_fn, root.batches, learning_rate=s["client_learning_rate"]))
    options = {
        "trimmed_mean": {"trim_fraction": s["fraction"]},
        "krum": {"f": f},
        "bulyan": {"f": f},
        "geometric_median": {"iters": s["gm_iters"]},
        "centered_clipping": {"tau": s["cc_tau"]},
    }.get(name, {})
    return fl.aggregators.from_name(name, **options)


def make_robust(loss_fn: Callable, aggregator: str, attack: str, settings: tuple,
                root: _Root, num_clients: int) -> fl.FederatedAlgorithm:
    """FedAvg with ``aggregator`` under ``attack`` (a row of :data:`ATTACKS`)."""
    s = dict(settings)
    f = max(1, round(s["fraction"] * s["cohort_size"]))
    alg = fl.algorithms.fed_avg(loss_fn, optax.sgd(s["client_learning_rate"]))
    alg = fl.algorithms.with_aggregator(alg, aggregator_from(aggregator, f, s, loss_fn, root))
    kind, options = ATTACKS[attack]
    if kind == "none":
        return alg
    if kind == "backdoor":
        options = dict(s["backdoor"])  # a tuple of pairs in the frozen settings
    return fl.attacks.attacked(alg, fl.attacks.REGISTRY[kind](**options),
                               fraction=s["fraction"], num_clients=num_clients,
                               seed=s["attack_seed"])


def _root_batches(train: fl.FederatedData, s: dict[str, Any]) -> _Root:
    rng = np.random.default_rng(1234)
    idx = rng.choice(train.num_examples, size=s["root_examples"], replace=False)
    b = s["root_batch_size"]
    steps = s["root_examples"] // b
    return _Root({k: np.asarray(v)[idx[: steps * b]].reshape((steps, b) + v.shape[1:])
                  for k, v in train.examples.items()})


def run(s: dict[str, Any]) -> dict[str, Any]:
    """Every (aggregator, attack) cell: final test accuracy (and the backdoor's ASR)."""
    options = {k: v for k, v in s["data"].items() if k != "name"}
    train, test = fl.datasets.load(s["data"]["name"], seed=0, **options)
    model = fl.models.mlp(tuple(train.examples["x"].shape[1:]),
                          hidden=tuple(s["model"]["hidden"]), num_classes=10)
    loss = fl.models.classification_loss(model)
    root = _root_batches(train, s)
    frozen = tuple(sorted((k, v) for k, v in s.items()
                          if k in ("fraction", "cohort_size", "client_learning_rate", "gm_iters",
                                   "cc_tau", "attack_seed")))
    frozen += (("backdoor", tuple(sorted(s["backdoor"].items()))),)
    bd = s["backdoor"]
    backdoor_eval = fl.metrics.backdoor_metrics(
        model, bd["target_label"], fl.attacks.pixel_patch(bd["patch_size"], bd["patch_value"]))
    clean_eval = fl.models.classification_metrics(model)
    results = []
    for attack in s["attacks"]:
        for agg in s["aggregators"]:
            start = time.perf_counter()
            make = functools.partial(make_robust, loss, agg, attack, frozen, root,
                                     train.num_clients)
            rows = fl.run_sweep(
                make, [{}], model.init, train, seeds=s["seeds"], num_rounds=s["rounds"],
                cohort_size=s["cohort_size"], batch_size=s["batch_size"], epochs=s["epochs"],
                eval_fn=backdoor_eval if attack == "backdoor" else clean_eval, eval_data=test,
            )
            accs = [r["test_accuracy"] for r in rows]
            cell = {"aggregator": agg, "attack": attack,
                    "test_accuracy": float(np.mean(accs)), "per_seed": accs}
            if attack == "backdoor":
                asr = [r["attack_success_rate"] for r in rows]
                cell.update(attack_success_rate=float(np.mean(asr)), asr_per_seed=asr)
            results.append(cell)
            print(f"  {attack:9s} {agg:18s} acc {cell['test_accuracy']:.3f}"
                  + (f"  ASR {cell['attack_success_rate']:.3f}" if attack == "backdoor" else "")
                  + f"  ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return {"results": results, "num_clients": train.num_clients,
            "num_test_examples": test.num_examples}


def markdown(table: dict[str, Any], s: dict[str, Any]) -> str:
    """One row per attack (the backdoor's accuracy and ASR), one column per aggregator."""
    cells = {(r["aggregator"], r["attack"]): r for r in table["results"]}
    aggs = s["aggregators"]
    lines = ["| attack | " + " | ".join(AGGREGATORS[a] for a in aggs) + " |",
             "|" + " --- |" * (len(aggs) + 1)]
    for attack in s["attacks"]:
        lines.append(f"| {ATTACK_TITLES[attack]}"
                     + (" (accuracy)" if attack == "backdoor" else "") + " | "
                     + " | ".join(f"{cells[(a, attack)]['test_accuracy']:.3f}" for a in aggs)
                     + " |")
        if attack == "backdoor":
            lines.append("| backdoor (attack success rate) | " + " | ".join(
                f"{cells[(a, attack)]['attack_success_rate']:.3f}" for a in aggs) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the table, prints it as markdown and writes ``--out``; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few rounds of a reduced grid")
    p.add_argument("--out", required=True, help="JSON file for every number and setting")
    args = p.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    table = run(s)
    out = {
        "mode": "smoke" if args.smoke else "full",
        "settings": s,
        **table,
        "wall_time_s": time.perf_counter() - start,
        "environment": {
            "fedjax_lab": fl.__version__, "jax": jax.__version__,
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{markdown(table, s)}\n\n({out['wall_time_s']:.0f} s) wrote {path}", flush=True)
    return out


if __name__ == "__main__":
    main()
