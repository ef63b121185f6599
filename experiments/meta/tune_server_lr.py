"""Tunes FedAvg's server learning rate by gradient descent through the whole run (fl.meta), and
compares it with a grid search over the same rate given the same number of run evaluations.

Problem: federated least squares, ``num_clients`` clients whose true models scatter around a
common one (heterogeneous data), full participation with fixed cohorts and keys, local SGD.
The objective is the validation loss (held-out examples of the common model) after
``rounds`` rounds: ``L(η_g) = val(x_R(η_g))``, a deterministic smooth function of ``η_g``.

* gradient: ``steps`` Adam steps on ``log η_g`` from ``η_g = 1`` (plain FedAvg), each one
  value-and-gradient of ``L`` (one run forward and backward), then ``L`` at the result;
* grid: ``steps + 1`` log-spaced values of ``η_g`` in ``[grid_low, grid_high]`` (the same number
  of run evaluations, forward only).

    PYTHONPATH=. python3 experiments/meta/tune_server_lr.py            # writes results.json
    PYTHONPATH=. python3 experiments/meta/tune_server_lr.py --smoke --out /tmp/tune.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lab as fl

FULL = dict(num_clients=8, rounds=10, local_steps=5, batch_size=8, dim=5, steps=20)
SMOKE = dict(num_clients=3, rounds=3, local_steps=2, batch_size=4, dim=3, steps=3)
CLIENT_LR = 0.05


def loss_fn(p, b, k):
    del k
    return jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / jnp.maximum(b["mask"].sum(), 1.0)


def make_algorithm(server_lr):
    return fl.algorithms.fed_avg(loss_fn, client_learning_rate=CLIENT_LR,
                                 server_learning_rate=server_lr)


def build_problem(num_clients, rounds, local_steps, batch_size, dim, seed=0):
    """Fixed cohorts ``[R, C, S, B]`` of heterogeneous least squares and the validation loss."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    w_clients = w + 0.5 * rng.normal(size=(num_clients, dim))
    x = rng.normal(size=(rounds, num_clients, local_steps, batch_size, dim)).astype(np.float32)
    y = np.einsum("rcsbd,cd->rcsb", x, w_clients) + 0.1 * rng.normal(size=x.shape[:-1])
    cohorts = fl.Cohort(
        {"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.float32),
         "mask": jnp.ones(x.shape[:-1], jnp.float32)},
        jnp.ones((rounds, num_clients), jnp.float32),
        jnp.tile(jnp.arange(num_clients, dtype=jnp.int32), (rounds, 1)),
    )
    xv = jnp.asarray(rng.normal(size=(256, dim)), jnp.float32)
    yv = xv @ jnp.asarray(w, jnp.float32)
    return cohorts, lambda p: jnp.mean((xv @ p - yv) ** 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick version")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--grid-low", type=float, default=0.1)
    parser.add_argument("--grid-high", type=float, default=10.0)
    parser.add_argument("--adam-lr", type=float, default=0.3, help="Adam's rate on log η_g")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    steps = cfg.pop("steps")
    cohorts, val = build_problem(**cfg)
    dim = cfg["dim"]
    loss = fl.meta.unrolled_loss(make_algorithm, jnp.zeros(dim, jnp.float32), cohorts, val,
                                 key=jax.random.key(0))

    def of_log_lr(u):
        return loss({"server_lr": jnp.exp(u)})

    value_and_grad = jax.jit(jax.value_and_grad(of_log_lr))
    t0 = time.perf_counter()
    opt = optax.adam(args.adam_lr)
    u = jnp.zeros((), jnp.float32)  # η_g = 1: plain FedAvg
    opt_state = opt.init(u)
    trajectory = []
    for _ in range(steps):
        value, grad = value_and_grad(u)
        trajectory.append({"server_lr": float(jnp.exp(u)), "val_loss": float(value),
                           "grad_log_lr": float(grad)})
        updates, opt_state = opt.update(grad, opt_state, u)
        u = optax.apply_updates(u, updates)
    tuned_lr, tuned_loss = float(jnp.exp(u)), float(of_log_lr(u))
    t_grad = time.perf_counter() - t0

    t0 = time.perf_counter()
    grid = np.geomspace(args.grid_low, args.grid_high, steps + 1)
    grid_losses = [float(loss({"server_lr": jnp.float32(lr)})) for lr in grid]
    t_grid = time.perf_counter() - t0
    best = int(np.nanargmin(grid_losses))
    grid_losses = [v if math.isfinite(v) else None for v in grid_losses]  # a diverged run
    result = {
        "problem": {**cfg, "client_lr": CLIENT_LR, "full_participation": True},
        "initial": {"server_lr": 1.0, "final_val_loss": trajectory[0]["val_loss"]},
        "gradient": {
            "server_lr": tuned_lr, "final_val_loss": tuned_loss,
            "run_evaluations": steps + 1, "backward_passes": steps, "adam_steps": steps,
            "adam_lr_on_log_lr": args.adam_lr, "seconds": t_grad, "trajectory": trajectory,
        },
        "grid": {
            "server_lr": float(grid[best]), "final_val_loss": grid_losses[best],
            "run_evaluations": len(grid), "seconds": t_grid,
            "points": [{"server_lr": float(lr), "val_loss": v}
                       for lr, v in zip(grid, grid_losses, strict=True)],
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"initial  server_lr=1.000  val_loss={result['initial']['final_val_loss']:.5f}")
    print(f"gradient server_lr={tuned_lr:.3f}  val_loss={tuned_loss:.5f}  "
          f"({steps + 1} run evaluations, {steps} backward passes)")
    print(f"grid     server_lr={grid[best]:.3f}  val_loss={grid_losses[best]:.5f}  "
          f"({len(grid)} run evaluations over [{args.grid_low:g}, {args.grid_high:g}])")
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
