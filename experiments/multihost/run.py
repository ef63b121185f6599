"""FedAvg sharded over every device of every process: one host, many GPUs, or many hosts.

The same program runs on every process. Each one loads the same data (same seed; checked), builds
the same model and algorithm, and calls ``fl.run_rounds`` with ``fl.maps.sharded()``: each
round's clients are split over all devices of all processes and their updates summed with one
``psum``; the new server state is replicated, so every process holds it. Process 0 prints and
writes the results.

Usage::

    # one process, all local devices (a multi-GPU node; on CPU --host-devices N splits the host)
    python experiments/multihost/run.py --out result.json

    # two processes on this machine (CPU, Gloo collectives), one command per process
    python experiments/multihost/run.py --coordinator localhost:12345 --num-processes 2 \\
        --process-id 0 &
    python experiments/multihost/run.py --coordinator localhost:12345 --num-processes 2 \\
        --process-id 1

    # TPU pod slice / Slurm / Open MPI: JAX detects coordinator, count and id
    python experiments/multihost/run.py --distributed

See ``README.md`` next to this file for the cluster command lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("processes")
    g.add_argument("--coordinator", help="host:port of process 0 (several processes)")
    g.add_argument("--num-processes", type=int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run whose settings JAX detects (TPU, Slurm, Open MPI)",
    )
    g.add_argument(
        "--host-devices", type=int, default=0, help="CPU only: split this host into N devices"
    )
    d = p.add_argument_group("experiment")
    d.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    d.add_argument("--num-clients", type=int, default=100)
    d.add_argument(
        "--hidden", type=int, nargs="*", default=[64], help="MLP hidden widths (none: linear)"
    )
    d.add_argument("--rounds", type=int, default=100)
    d.add_argument(
        "--rounds-per-call",
        type=int,
        default=0,
        help="rounds per compiled run_rounds call (progress between calls); 0: all",
    )
    d.add_argument("--cohort-size", type=int, default=20)
    d.add_argument("--batch-size", type=int, default=10)
    d.add_argument("--client-lr", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="JSON file for the results (written by process 0)")
    args = p.parse_args(argv)
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and None in explicit:
        p.error("--coordinator, --num-processes and --process-id go together (or --distributed).")
    if args.rounds_per_call < 0 or args.rounds < 1:
        p.error("--rounds must be >= 1 and --rounds-per-call >= 0.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the experiment; returns (on every process) the results process 0 writes."""
    args = parse_args(argv)
    if args.host_devices > 1:  # must be set before JAX starts its CPU backend
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.host_devices}"
        )
    import jax

    from fedjax_lab import distributed

    if args.coordinator is not None:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        distributed.initialize()

    import numpy as np
    import optax

    import fedjax_lab as fl

    t0 = time.perf_counter()
    if args.dataset == "digits":
        train, test = fl.datasets.load_digits(num_clients=args.num_clients, seed=args.seed)
    else:
        train, test = fl.datasets.load_synthetic(num_clients=args.num_clients, seed=args.seed)
    distributed.check_same_everywhere(train, name="train_data")
    num_classes = int(max(train.examples["y"].max(), test.examples["y"].max())) + 1
    model = fl.models.mlp(train.examples["x"].shape[1:], tuple(args.hidden), num_classes)
    alg = fl.algorithms.fed_avg(
        fl.models.classification_loss(model), client_optimizer=optax.sgd(args.client_lr)
    )
    key = jax.random.key(args.seed)
    # Replicated from the start, the layout every sharded round returns: one compile, not two.
    params = jax.jit(model.init)(jax.random.fold_in(key, 0))  # one compile, not one an op
    state = distributed.replicate(alg.init(params))
    client_map = fl.maps.sharded()

    per_call = args.rounds_per_call or args.rounds
    losses = []
    while int(state.round) < args.rounds:
        n = min(per_call, args.rounds - int(state.round))
        state, hist = fl.run_rounds(
            alg,
            state,
            train,
            jax.random.fold_in(key, 1),
            num_rounds=n,
            cohort_size=args.cohort_size,
            batch_size=args.batch_size,
            client_map=client_map,
        )
        losses += np.asarray(hist["train_loss"]).tolist()
        if distributed.is_main_process():
            print(f"round {int(state.round)}: train loss {losses[-1]:.4f}", flush=True)
    evals = fl.evaluate(fl.models.classification_metrics(model), state.params, test)
    result = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "devices_holding_params": len(jax.tree.leaves(state.params)[0].sharding.device_set),
        "client_map": client_map.name,
        "rounds": int(state.round),
        "train_loss": losses,
        "test_accuracy": float(evals["accuracy"]),
        "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
        "seconds": time.perf_counter() - t0,
    }
    if distributed.is_main_process():
        print(
            f"{result['process_count']} process(es), {result['device_count']} device(s): "
            f"test accuracy {result['test_accuracy']:.3f} after {result['rounds']} rounds, "
            f"{result['seconds']:.1f} s",
            flush=True,
        )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
