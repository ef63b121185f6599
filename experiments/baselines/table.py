"""Representation and drift baselines against FedAvg on label-skewed digits.

Every method of :data:`METHODS` (a name -> builder table: add a row to add a method) runs the
same rounds, cohort size, local work, model, data and seed on scikit-learn's digits (offline),
split over clients with a Dirichlet(``alpha``) label skew. For each it records

* the final global model's test accuracy (all test examples pooled), and
* the personalised accuracy after fine-tuning the final model on each client's own training
  data (``fl.personalization.fine_tune_evaluate``: the evaluation FedBABU is designed for),
  the mean over clients of each client's test accuracy.

Usage::

  python experiments/baselines/table.py [--smoke] [--rounds 100] \\
      --out experiments/baselines/results.json

It writes the JSON (settings, one row per method, timings) and prints the Markdown table.
``--smoke`` runs 2 rounds (a test of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fedjax_lab as fl

SETTINGS: dict[str, Any] = {
    "data": {"name": "digits", "num_clients": 50, "partition": "dirichlet", "alpha": 0.1,
             "seed": 0},
    "model": {"name": "mlp", "hidden": [32]},
    "rounds": 100,
    "cohort_size": 10,
    "batch_size": 10,
    "epochs": 1,
    "client_learning_rate": 0.1,
    "seed": 1,
    "fine_tune": {"steps": 10, "batch_size": 10, "learning_rate": 0.1},
}

Builder = Callable[[Any, float], fl.FederatedAlgorithm]
"""``builder(loss_fn, client_learning_rate) -> FederatedAlgorithm``."""

METHODS: dict[str, tuple[str, Builder]] = {
    "fedavg": ("FedAvg", lambda loss, lr: fl.algorithms.fed_avg(loss, optax.sgd(lr))),
    "moon": ("MOON (mu=1, tau=0.5)",
             lambda loss, lr: fl.algorithms.moon(loss, optax.sgd(lr), mu=1.0, temperature=0.5)),
    "fedsam": ("FedSAM (rho=0.05)",
               lambda loss, lr: fl.algorithms.fed_sam(loss, optax.sgd(lr), rho=0.05)),
    "fedlc": ("FedLC (tau=1)", lambda loss, lr: fl.algorithms.fed_lc(loss, optax.sgd(lr), tau=1.0)),
    "fedbabu": ("FedBABU (head frozen)",
                lambda loss, lr: fl.algorithms.fed_babu(loss, optax.sgd(lr), head_keys="Dense_1")),
}
"""Rows of the table: name -> (title, builder). FedAvg first: the baseline."""


def run_method(name: str, settings: dict[str, Any], train, test, model) -> dict[str, Any]:
    """Trains method ``name`` and evaluates it; returns its row of the table."""
    title, build = METHODS[name]
    loss_fn = fl.models.classification_loss(model)
    eval_fn = fl.models.classification_metrics(model)
    alg = build(loss_fn, settings["client_learning_rate"])
    params = model.init(jax.random.key(settings["seed"]))
    state = alg.init(params, num_clients=train.num_clients)
    start = time.perf_counter()
    state, hist = fl.run_rounds(
        alg, state, train, jax.random.key(settings["seed"]), num_rounds=settings["rounds"],
        cohort_size=settings["cohort_size"], batch_size=settings["batch_size"],
        epochs=settings["epochs"], client_map=fl.maps.vmap(),
    )
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    glob = fl.metrics.evaluate(eval_fn, state.params, test)
    ft = settings["fine_tune"]
    tuned = fl.personalization.fine_tune_evaluate(
        loss_fn, eval_fn, optax.sgd(ft["learning_rate"]), state.params, train, test,
        steps=ft["steps"], batch_size=ft["batch_size"], key=jax.random.key(settings["seed"]),
    )
    return {
        "name": name,
        "title": title,
        "test_accuracy": float(glob["accuracy"]),
        "test_accuracy_client_mean": float(glob["accuracy_client_mean"]),
        "fine_tuned_accuracy_client_mean": float(tuned["personalized_accuracy_mean"]),
        "final_train_loss": float(np.asarray(hist["train_loss"])[-1]),
        "train_seconds": round(seconds, 2),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown, one line per method."""
    lines = ["| method | test accuracy (pooled) | test accuracy (client mean) | "
             "fine-tuned accuracy (client mean) | train s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['title']} | {r['test_accuracy']:.4f} | "
                     f"{r['test_accuracy_client_mean']:.4f} | "
                     f"{r['fine_tuned_accuracy_client_mean']:.4f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--rounds", type=int, default=SETTINGS["rounds"])
    parser.add_argument("--only", nargs="*", choices=sorted(METHODS), default=None)
    parser.add_argument("--smoke", action="store_true", help="2 rounds: a test of the script")
    args = parser.parse_args(argv)
    settings = json.loads(json.dumps(SETTINGS))
    settings["rounds"] = 2 if args.smoke else args.rounds
    train, test = fl.datasets.load(**settings["data"])
    model = fl.models.mlp(train.examples["x"].shape[1:], hidden=tuple(settings["model"]["hidden"]),
                          num_classes=10)
    names = args.only or list(METHODS)
    rows = []
    for name in names:
        rows.append(run_method(name, settings, train, test, model))
        print(f"{name}: {rows[-1]}", flush=True)
    out = {
        "settings": settings,
        "rows": rows,
        "command": "python experiments/baselines/table.py" + (" --smoke" if args.smoke else ""),
        "platform": {"python": platform.python_version(), "jax": jax.__version__,
                     "backend": jax.default_backend(), "cpus": jax.device_count()},
        "smoke": args.smoke,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(rows))
    return out


if __name__ == "__main__":
    main()
