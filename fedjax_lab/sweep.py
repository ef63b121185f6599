"""Hyper-parameter and seed grids compiled as ONE program.

The whole training run (:func:`fedjax_lab.run_rounds`'s scan over rounds) is mapped over the
configurations: the algorithm is rebuilt inside the trace from traced hyper-parameters (optax
takes array learning rates, as ``optax.inject_hyperparams`` does), so a grid of K configurations
× S seeds compiles once instead of K × S times.

:func:`run_seeds` is the same idea for one configuration run from given states: the seed is a
vmapped axis of every state leaf and of the run key, so S seeds of a run advance together in
one program (what ``fedjax-lab run`` does with ``training.seeds = S``, block after block,
with a checkpoint of all seeds between blocks).
"""

from __future__ import annotations

import csv
import functools
import itertools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import _scan
from fedjax_lab import maps as maps_lib
from fedjax_lab._types import (
    ClientMap,
    ClientSampler,
    FederatedAlgorithm,
    Params,
    PRNGKey,
    ServerState,
)
from fedjax_lab.data._federated import FederatedData
from fedjax_lab.plots import write_sweep_plot

__all__ = ["grid", "run_seeds", "run_sweep_config", "stack_seeds", "sweep"]


def grid(**axes: Sequence[float]) -> list[dict[str, float]]:
    """The cartesian product of named value lists, as a list of dicts (first name slowest).

    Example:
      >>> grid(lr=[0.1, 0.3], mu=[0.0])
      [{'lr': 0.1, 'mu': 0.0}, {'lr': 0.3, 'mu': 0.0}]
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"{name}: need a non-empty list of values, got {values!r}.")
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]


@functools.partial(
    jax.jit,
    static_argnames=("make_algorithm", "init_params", "client_map", "config_map", "static"),
)
def _sweep_program(hparams, seeds, arrays, *, make_algorithm, init_params, client_map,
                   config_map, static):
    static = dict(static)
    num_clients = arrays["offsets"].shape[0] - 1

    def one(args):
        hp, seed = args
        alg = make_algorithm(**hp)
        init_key, run_key = jax.random.split(jax.random.key(seed))
        state = alg.init(init_params(init_key), num_clients=num_clients)
        state = _scan.init_sampler_state(state, static["sampler"], arrays["offsets"])
        state, hist = _scan.scan_rounds(alg, client_map, state, key=run_key, **arrays, **static)
        return hist

    if config_map == "vmap":
        return jax.vmap(one)((hparams, seeds))
    return jax.lax.map(one, (hparams, seeds))


def sweep(
    make_algorithm: Callable[..., FederatedAlgorithm],
    configs: Sequence[Mapping[str, float]],
    init_params: Callable[[PRNGKey], Params],
    train_data: FederatedData,
    *,
    seeds: Sequence[int] = (0,),
    num_rounds: int,
    cohort_size: int,
    batch_size: int,
    local_steps: int | None = None,
    epochs: int = 1,
    client_map: ClientMap | None = None,
    sampler: ClientSampler | None = None,
    eval_fn: Callable | None = None,
    eval_data: FederatedData | None = None,
    eval_batch_size: int = 256,
    config_map: str = "auto",
) -> list[dict[str, Any]]:
    """Runs every configuration × seed as one compiled program; returns a table of rows.

    ``make_algorithm(**hp)`` receives each configuration's hyper-parameters as traced ``f32``
    scalars and returns the algorithm (e.g. ``fl.algorithms.fed_adam(loss_fn,
    optax.sgd(hp["client_lr"]), server_learning_rate=hp["server_lr"])``). Run ``i`` uses the
    seed to draw its initial params and its run key exactly as a single run would, so a row
    equals :func:`fedjax_lab.run_rounds` of that configuration (to float tolerance).

    Args:
      make_algorithm: builds the algorithm from keyword hyper-parameters. Must be hashable
        (a module-level function or a ``functools.partial`` of one that is kept): the program
        is cached on it.
      configs: the configurations, e.g. :func:`grid` (``lr=[...], mu=[...]``); every one has
        the same names.
      init_params: ``init_params(key) -> params`` (e.g. ``model.init``).
      train_data: the population.
      seeds: seeds; every configuration runs once per seed.
      num_rounds, cohort_size, batch_size, local_steps, epochs, client_map, sampler: as in
        :func:`fedjax_lab.run_rounds`.
      eval_fn, eval_data, eval_batch_size: final evaluation (after the last round).
      config_map: ``"vmap"`` (all configurations at once: GPU/TPU), ``"map"`` (one after the
        other inside the program: CPU) or ``"auto"`` (``"map"`` on CPU, else ``"vmap"``).

    Returns:
      One dict per (configuration, seed): the hyper-parameters, ``seed``, ``final_train_loss``
      (mean over the last 10% of rounds) and, with ``eval_fn``, ``test_accuracy`` and
      ``test_loss`` after the last round.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax, fedjax_lab as fl
      >>> rng = np.random.default_rng(0)
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": rng.normal(size=(4, 2)).astype("f4"), "y": np.ones(4, "f4")}] * 3)
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / 4
      >>> make = functools.partial(_example_alg, loss)
      >>> rows = fl.run_sweep(make, grid(lr=[0.01, 0.1]), lambda k: jnp.zeros(2), data,
      ...                 num_rounds=3, cohort_size=2, batch_size=2)
      >>> [r["lr"] for r in rows], rows[0]["final_train_loss"] > rows[1]["final_train_loss"]
      ([0.01, 0.1], True)
    """
    if not configs:
        raise ValueError("configs: need at least one configuration, e.g. fl.grid(lr=[...]).")
    names = list(configs[0])
    for i, c in enumerate(configs):
        if list(c) != names:
            raise ValueError(f"configs[{i}]: has names {list(c)}, but configs[0] has {names}.")
    if not seeds:
        raise ValueError("seeds: need at least one seed.")
    if config_map not in ("auto", "vmap", "map"):
        raise ValueError(f"config_map: expected 'auto', 'vmap' or 'map', got {config_map!r}.")
    if config_map == "auto":
        config_map = "map" if jax.default_backend() == "cpu" else "vmap"
    try:
        hash(make_algorithm)
        hash(init_params)
    except TypeError as e:
        raise TypeError("make_algorithm, init_params: must be hashable callables.") from e
    arrays, static = _scan.prepare_run(
        train_data,
        num_rounds=num_rounds,
        cohort_size=cohort_size,
        batch_size=batch_size,
        local_steps=local_steps,
        epochs=epochs,
        weighting="num_examples",
        sampler=sampler,
        eval_fn=eval_fn,
        eval_data=eval_data,
        eval_every=num_rounds,
        eval_batch_size=eval_batch_size,
    )
    runs = [(c, s) for c in configs for s in seeds]
    hparams = {n: jnp.asarray([float(c[n]) for c, _ in runs], jnp.float32) for n in names}
    seed_arr = jnp.asarray([int(s) for _, s in runs], jnp.uint32)
    hist = _sweep_program(
        hparams, seed_arr, arrays,
        make_algorithm=make_algorithm,
        init_params=init_params,
        client_map=maps_lib.resolve(client_map),
        config_map=config_map,
        static=tuple(sorted(static.items())),
    )
    hist = jax.device_get(hist)
    tail = max(1, num_rounds // 10)
    rows = []
    for i, (c, s) in enumerate(runs):
        row: dict[str, Any] = {**{n: float(c[n]) for n in names}, "seed": int(s)}
        row["final_train_loss"] = float(np.mean(hist["train_loss"][i, -tail:]))
        if eval_fn is not None:
            row["test_accuracy"] = float(hist["eval_accuracy"][i, -1])
            row["test_loss"] = float(hist["eval_loss"][i, -1])
        rows.append(row)
    return rows


@functools.partial(jax.jit, static_argnames=("alg", "client_map", "seed_map", "static"))
def _seeds_program(states, keys, arrays, *, alg, client_map, seed_map, static):
    static = dict(static)

    def one(state, key):
        return _scan.scan_rounds(alg, client_map, state, key=key, **arrays, **static)

    if seed_map == "vmap":
        return jax.vmap(one)(states, keys)
    return jax.lax.map(lambda a: one(*a), (states, keys))


def stack_seeds(trees: Sequence[Any]) -> Any:
    """Stacks per-seed pytrees (states, typed PRNG keys) along a new leading seed axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> keys = stack_seeds([jax.random.key(0), jax.random.key(1)])
      >>> keys.shape, stack_seeds([{"w": jnp.zeros(2)}] * 3)["w"].shape
      ((2,), (3, 2))
    """
    if not trees:
        raise ValueError("trees: need at least one pytree (one per seed).")

    def stack(*xs):
        if jax.dtypes.issubdtype(xs[0].dtype, jax.dtypes.prng_key):
            data = jnp.stack([jax.random.key_data(x) for x in xs])
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(xs[0]))
        return jnp.stack([jnp.asarray(x) for x in xs])

    return jax.tree.map(stack, *trees)


def run_seeds(
    alg: FederatedAlgorithm,
    states: ServerState,
    train_data: FederatedData,
    keys: PRNGKey,
    *,
    num_rounds: int,
    cohort_size: int,
    batch_size: int,
    local_steps: int | None = None,
    epochs: int = 1,
    client_map: ClientMap | None = None,
    weighting: str = "num_examples",
    sampler: ClientSampler | None = None,
    eval_fn: Callable | None = None,
    eval_data: FederatedData | None = None,
    eval_every: int = 1,
    eval_batch_size: int = 256,
    max_update_norm: float | None = None,
    seed_map: str = "vmap",
) -> tuple[ServerState, dict[str, jax.Array]]:
    """:func:`fedjax_lab.run_rounds` for S seeds at once, as ONE compiled program.

    ``states`` and ``keys`` carry a leading seed axis (:func:`stack_seeds` of S states from
    ``alg.init`` and S run keys); seed ``i`` runs exactly the rounds ``run_rounds(alg,
    states[i], train_data, keys[i], ...)`` would (same sampling, batches and keys), so its
    results equal that run's to float rounding: ``jax.vmap`` batches the seeds' matrix products,
    which XLA may sum in another order. Like ``run_rounds``, 10 rounds then 10 more equal 20 at
    once.

    Args:
      alg, train_data, num_rounds, ..., max_update_norm: as in :func:`fedjax_lab.run_rounds`.
      states: the seeds' server states stacked on a leading ``[S]`` axis.
      keys: the seeds' run keys, ``[S]`` (typed PRNG keys).
      seed_map: ``"vmap"`` (every seed in each step of the program: batched products, the
        fast choice for small models) or ``"map"`` (the seeds one after the other inside the
        program).

    Returns:
      ``(states, history)``: both with the leading ``[S]`` axis (history leaves
      ``[S, num_rounds, ...]``).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_lab as fl
      >>> rng = np.random.default_rng(0)
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": rng.normal(size=(4, 2)).astype("f4"), "y": np.ones(4, "f4")}] * 3)
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / 4
      >>> alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.1))
      >>> states = stack_seeds([alg.init(jnp.full(2, float(s))) for s in range(4)])
      >>> keys = stack_seeds([jax.random.key(s) for s in range(4)])
      >>> states, hist = run_seeds(alg, states, data, keys, num_rounds=3, cohort_size=2,
      ...                          batch_size=2)
      >>> states.params.shape, hist["train_loss"].shape, states.round.tolist()
      ((4, 2), (4, 3), [3, 3, 3, 3])
    """
    from fedjax_lab import rounds as rounds_lib

    rounds_lib._check_algorithm(alg)
    rounds_lib._check_state(states)
    if seed_map not in ("vmap", "map"):
        raise ValueError(f"seed_map: expected 'vmap' or 'map', got {seed_map!r}.")
    key_ok = isinstance(keys, jax.Array) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if not key_ok or keys.ndim != 1:
        raise TypeError(
            f"keys: expected typed PRNG keys with one seed axis [S], e.g. "
            f"stack_seeds([jax.random.key(s) for s in seeds]), got {keys!r}."
        )
    num_seeds = int(keys.shape[0])
    for leaf in jax.tree.leaves(states):
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != num_seeds:
            raise ValueError(
                f"states: every leaf needs the leading seed axis [{num_seeds}] of keys, found a "
                f"leaf of shape {np.shape(leaf)}; stack the seeds' states with stack_seeds."
            )
    arrays, static = _scan.prepare_run(
        train_data,
        num_rounds=num_rounds,
        cohort_size=cohort_size,
        batch_size=batch_size,
        local_steps=local_steps,
        epochs=epochs,
        weighting=weighting,
        sampler=sampler,
        eval_fn=eval_fn,
        eval_data=eval_data,
        eval_every=eval_every,
        eval_batch_size=eval_batch_size,
    )
    if alg.check_data is not None:
        alg.check_data(train_data)
    static["max_update_norm"] = rounds_lib._check_max_update_norm(max_update_norm)
    if not jax.tree.leaves(states.sampler_state):  # every seed starts the sampler alike
        one = _scan.init_sampler_state(
            jax.tree.map(lambda x: x[0], states), static["sampler"], arrays["offsets"]
        )
        states = states._replace(sampler_state=stack_seeds([one.sampler_state] * num_seeds))
    client_map = maps_lib.resolve(client_map)
    placement = maps_lib.state_sharding(client_map, static["cohort_size"])
    if placement is not None:
        arrays = jax.device_put(arrays, placement)
        states = rounds_lib._place_state(states, placement)
    return _seeds_program(
        states, keys, arrays, alg=alg, client_map=client_map, seed_map=seed_map,
        static=tuple(sorted(static.items())),
    )


def _example_alg(loss_fn, lr):
    import optax

    from fedjax_lab.algorithms import fed_avg

    return fed_avg(loss_fn, client_optimizer=optax.sgd(lr))


# ------------------------------------------------------------------------------ the CLI side


class _ConfigAlgorithm:
    """``make_algorithm`` for a config's ``[sweep]``: hashable by the spec it was built from."""

    def __init__(self, spec: dict[str, Any], loss_fn: Callable):
        self.spec, self.loss_fn = spec, loss_fn
        self._key = (repr(sorted(spec.items())), id(loss_fn))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ConfigAlgorithm) and other._key == self._key

    def __call__(self, **hp: jax.Array) -> FederatedAlgorithm:
        from fedjax_lab.experiment import build_algorithm

        return build_algorithm({**self.spec, **hp}, self.loss_fn)


def run_sweep_config(
    config: dict[str, Any], out: str | os.PathLike, *, rounds: int | None = None
) -> list[dict[str, Any]]:
    """Runs a config's ``[sweep]`` table; writes ``sweep.csv`` and ``sweep.png`` into ``out``.

    ``[sweep]`` holds ``algorithm`` (a registry name), ``seeds`` (list) and one list of values
    per hyper-parameter to sweep (e.g. ``client_learning_rate``, ``server_learning_rate``);
    other keys of the first ``[[algorithms]]`` entry with that name are kept fixed.
    """
    from fedjax_lab import experiment as exp_lib

    cfg = exp_lib.validate(config)
    table = dict(cfg.get("sweep") or {})
    if not table:
        raise exp_lib.ConfigError("sweep: the config needs a [sweep] table to sweep over.")
    algorithm = table.pop("algorithm", cfg["algorithms"][0]["name"])
    seeds = table.pop("seeds", [cfg["training"]["seed"]])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise exp_lib.ConfigError(f"sweep.seeds: need a list of whole numbers, got {seeds!r}.")
    if not table:
        raise exp_lib.ConfigError("sweep: name at least one hyper-parameter with a list of values.")
    for name, values in table.items():
        if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise exp_lib.ConfigError(f"sweep.{name}: need a list of numbers, got {values!r}.")
    base = next((a for a in cfg["algorithms"] if a["name"] == algorithm), {"name": algorithm})
    base = {k: v for k, v in base.items() if k not in table}
    probe = {**base, **{k: v[0] for k, v in table.items()}}
    exp_lib.validate({**config, "algorithms": [probe]})  # names and values check out
    if rounds is not None:
        cfg["training"]["rounds"] = rounds
    experiment = exp_lib.build({**cfg, "algorithms": [probe]})
    training = cfg["training"]
    rows = sweep(
        _ConfigAlgorithm(base, experiment.loss_fn),
        grid(**table),
        experiment.model.init,
        experiment.train,
        seeds=seeds,
        num_rounds=training["rounds"],
        cohort_size=training["cohort_size"],
        batch_size=training["batch_size"],
        local_steps=training.get("local_steps"),
        epochs=training["epochs"],
        client_map=experiment.client_map,
        sampler=experiment.sampler,
        eval_fn=experiment.eval_fn,
        eval_data=experiment.test,
        eval_batch_size=cfg["evaluation"]["batch_size"],
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_sweep_plot(out / "sweep.png", rows, list(table), algorithm, config=cfg)
    best = max(rows, key=lambda r: r["test_accuracy"])
    print(f"{len(rows)} runs ({len(rows) // len(seeds)} configurations x {len(seeds)} seeds); "
          f"best test accuracy {best['test_accuracy']:.4f} at "
          + ", ".join(f"{k}={best[k]:g}" for k in table), file=sys.stderr)
    print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
    return rows
