"""Personalisation table: APFL, IFCA and LG-FedAvg against FedAvg on digits (Dirichlet 0.1).

For every method, the same data, model, rounds and seeds; two numbers per run:

* ``global_accuracy``: the accuracy of ``state.params`` over all test examples (for IFCA, which
  has no single global model, the cluster models averaged by their latest shares);
* ``personal_accuracy_mean``: the mean over clients of each client's test accuracy on ITS OWN
  model (:func:`fedjax_lab.personalization.evaluate_own_models`: APFL's ``α_i v_i + (1-α_i) w``,
  IFCA's cluster of lowest loss on the client's training data, LG-FedAvg's own representation
  with the global head); for FedAvg, its global model on each client.

Usage::

  python experiments/personalization/table.py --out experiments/personalization/results.json

``--smoke`` runs 2 rounds (a test of the script, not a result).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from typing import Any

import jax
import numpy as np
import optax

import fedjax_lab as fl
from fedjax_lab.personalization import evaluate_own_models

SETTINGS = {
    "dataset": "digits",
    "num_clients": 50,
    "partition": "dirichlet",
    "alpha": 0.1,
    "data_seed": 0,
    "model": "mlp hidden=(32,)",
    "rounds": 100,
    "cohort_size": 10,
    "batch_size": 10,
    "epochs": 1,
    "client_learning_rate": 0.1,
    "seeds": [0, 1],
}

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "apfl": ("apfl", {"alpha": 0.25, "alpha_learning_rate": 0.1}),
    "ifca_k2": ("ifca", {"num_clusters": 2, "init_scale": 0.1}),
    "ifca_k3": ("ifca", {"num_clusters": 3, "init_scale": 0.1}),
    "lg_fedavg": ("lg_fedavg", {"local_keys": "Dense_0"}),
}


def run(name: str, settings: dict[str, Any], train, test, model) -> dict[str, Any]:
    algorithm, hp = METHODS[name]
    loss = fl.models.classification_loss(model)
    eval_fn = fl.models.classification_metrics(model)
    alg = fl.algorithms.REGISTRY[algorithm](
        loss, optax.sgd(settings["client_learning_rate"]), **hp)
    rows = []
    for seed in settings["seeds"]:
        key = jax.random.key(seed)
        state = alg.init(model.init(jax.random.fold_in(key, 1)), num_clients=train.num_clients)
        start = time.perf_counter()
        state, _ = fl.run_rounds(alg, state, train, key, num_rounds=settings["rounds"],
                                 cohort_size=settings["cohort_size"],
                                 batch_size=settings["batch_size"], epochs=settings["epochs"],
                                 client_map=fl.maps.sequential())
        jax.block_until_ready(state.params)
        seconds = time.perf_counter() - start
        glob = fl.evaluate(eval_fn, state.params, test)
        if algorithm == "fedavg":
            personal = glob["accuracy_client_mean"]
        else:
            options = {k: v for k, v in hp.items() if k == "local_keys"}
            if algorithm == "ifca":
                options["choose_on"] = train
            out = evaluate_own_models(eval_fn, algorithm, state, test, **options)
            personal = out["personalized_accuracy_mean"]
        row = {"seed": seed, "global_accuracy": float(glob["accuracy"]),
               "global_accuracy_client_mean": float(glob["accuracy_client_mean"]),
               "personal_accuracy_mean": float(personal), "train_seconds": round(seconds, 2)}
        if algorithm == "ifca":
            models = importlib.import_module("fedjax_lab.algorithms.ifca").cluster_models(state)
            choices = fl.personalization.cluster_choices(eval_fn, models, train)
            row["cluster_sizes"] = np.bincount(choices, minlength=hp["num_clusters"]).tolist()
        rows.append(row)
        print(name, row, flush=True)
    summary = {k: float(np.mean([r[k] for r in rows]))
               for k in ("global_accuracy", "global_accuracy_client_mean",
                         "personal_accuracy_mean")}
    return {"algorithm": algorithm, "hyper_parameters": hp, "runs": rows, "mean": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="2 rounds, 1 seed")
    args = parser.parse_args()
    settings = dict(SETTINGS)
    if args.smoke:
        settings.update(rounds=2, seeds=[0])
    train, test = fl.datasets.load(settings["dataset"], num_clients=settings["num_clients"],
                                   partition=settings["partition"], alpha=settings["alpha"],
                                   seed=settings["data_seed"])
    model = fl.models.mlp((8, 8, 1), hidden=(32,), num_classes=10)
    results = {name: run(name, settings, train, test, model) for name in METHODS}
    print(f"\n{'method':<11} {'global acc':>10} {'personal acc (client mean)':>27}")
    for name, r in results.items():
        m = r["mean"]
        print(f"{name:<11} {m['global_accuracy']:>10.3f} {m['personal_accuracy_mean']:>27.3f}")
    if args.out:
        doc = {"settings": settings, "results": results,
               "environment": {"jax": jax.__version__, "python": platform.python_version(),
                               "backend": jax.default_backend()}}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
