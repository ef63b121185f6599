"""Fault table: every registered algorithm with one poisoned client, on federated digits.

Client 0 (of 20, all in every round) multiplies its update by NaN in round 0, inf in round 2
and 1e25 in round 4; 30 rounds in all, with ``max_update_norm`` guarding finite blow-ups. For
each algorithm: whether every floating-point leaf of the final server state is finite, the
rounds in which client 0 was dropped, the rounds the guard refused (and why), and the final
test accuracy next to the same run without the poisoned client.

    python experiments/faults/table.py --out experiments/faults/results.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lab as fl

FAULTS = {0: jnp.nan, 2: jnp.inf, 4: 1e25}
REQUIRED = {"feddisco": {"num_classes": 10}, "qffl": {"lipschitz": 10.0}}
ROUNDS, MAX_UPDATE_NORM = 30, 100.0


def poisoned(alg: fl.FederatedAlgorithm) -> fl.FederatedAlgorithm:
    rounds = jnp.asarray(list(FAULTS), jnp.int32)
    factors = jnp.asarray(list(FAULTS.values()), jnp.float32)

    def client_update(state, client, key):
        out = alg.client_update(state, client, key)
        hit = (client.client_id == 0) & (rounds == state.round)
        factor = jnp.where(jnp.any(hit), jnp.sum(jnp.where(hit, factors, 0.0)), 1.0)
        return out._replace(update=jax.tree.map(lambda u: (u * factor).astype(u.dtype),
                                                out.update))

    return alg._replace(client_update=client_update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows to this JSON file")
    parser.add_argument("--names", nargs="*", help="only these registered algorithms")
    args = parser.parse_args()
    train, test = fl.datasets.load("digits", num_clients=20, partition="dirichlet", alpha=0.5)
    model = fl.models.mlp((8, 8, 1), hidden=(32,), num_classes=10)
    loss, metrics = fl.models.classification_loss(model), fl.models.classification_metrics(model)
    rows = []
    for name, factory in sorted(fl.algorithms.REGISTRY.items()):
        if args.names and name not in args.names:
            continue
        out = {"algorithm": name}
        for label, wrap in (("poisoned", poisoned), ("clean", lambda a: a)):
            alg = wrap(factory(loss, optax.sgd(0.1), **REQUIRED.get(name, {})))
            state = alg.init(model.init(jax.random.key(0)), num_clients=train.num_clients)
            state, hist = fl.run_rounds(alg, state, train, jax.random.key(1), num_rounds=ROUNDS,
                                        cohort_size=train.num_clients, batch_size=10,
                                        client_map=fl.maps.sequential(),
                                        max_update_norm=MAX_UPDATE_NORM)
            hist = jax.device_get(hist)
            acc = float(fl.evaluate(metrics, state.params, test)["accuracy"])
            out[f"{label}_accuracy"] = acc
            if label == "poisoned":
                leaves = [x for x in jax.tree.leaves(state)
                          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
                out["state_finite"] = all(bool(np.all(np.isfinite(np.asarray(x))))
                                          for x in leaves)
                out["client_dropped_in"] = [int(t) for t in np.flatnonzero(
                    hist["dropped_clients"])]
                out["refused"] = {
                    reason: [int(t) for t in np.flatnonzero(hist[f"skipped_{reason}"])]
                    for reason in ("non_finite_update", "update_norm", "non_finite_server_state")
                    if hist[f"skipped_{reason}"].any()
                }
        rows.append(out)
        print(f"| {name} | {out['state_finite']} | {out['client_dropped_in']} | "
              f"{out['refused'] or '-'} | {out['poisoned_accuracy']:.3f} | "
              f"{out['clean_accuracy']:.3f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": ROUNDS, "max_update_norm": MAX_UPDATE_NORM, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
