"""Hyper-parameter, data, attack, noise and seed grids compiled as ONE program.

The whole training run (:func:`fedjax_lab.run_rounds`'s scan over rounds) is mapped over the
configurations: the algorithm is rebuilt inside the trace from traced hyper-parameters (optax
takes array learning rates, as ``optax.inject_hyperparams`` does), so a grid of K configurations
× S seeds compiles once instead of K × S times.

Axes beyond scalar hyper-parameters:

* **data** (:func:`dirichlet_axis`, :func:`data_axis`): several partitions of the same examples
  into the same number of clients (e.g. one per Dirichlet ``α``). They are stacked: the flat
  examples ``[A, n, ...]`` and offsets ``[A, N + 1]``, every client padded to the largest client
  of any partition (the batch builder's static ``max_client_size``; the extra steps are all
  padding and change nothing), so a method × α × seed grid is one program.
* **malicious set** (:func:`malicious_axis`): which clients are malicious as a ``bool[N]`` mask
  per row (``fl.attacks.attacked(..., malicious=mask)``), so a fraction axis is traced; with
  :func:`fedjax_lab.attacks.mixed` the attacks themselves are traced coefficients too.
* **DP noise** (:class:`DPAccounting`): a ``noise_multiplier`` configuration value (traced into
  :func:`fedjax_lab.privacy.dp_aggregator`), each row reporting the ``ε`` that
  :func:`fedjax_lab.privacy.epsilon` accounts for its ``z``.

Configuration values are numbers (traced as ``f32`` scalars) or arrays (stacked with their
dtype, e.g. the malicious masks); array values are passed to ``make_algorithm`` but not copied
into the rows.

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
from typing import Any, NamedTuple

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

__all__ = [
    "DPAccounting",
    "DataAxis",
    "data_axis",
    "dirichlet_axis",
    "grid",
    "malicious_axis",
    "run_seeds",
    "run_sweep_config",
    "stack_seeds",
    "sweep",
]


def grid(*joint: Sequence[Mapping[str, Any]], **axes: Sequence[Any]) -> list[dict[str, Any]]:
    """The cartesian product of value lists, as a list of dicts (first axis slowest).

    A keyword axis is one name's values; a positional axis is a list of dicts whose entries
    vary together (e.g. :func:`malicious_axis`: a fraction and its mask). Positional axes come
    first (slowest).

    Example:
      >>> grid(lr=[0.1, 0.3], mu=[0.0])
      [{'lr': 0.1, 'mu': 0.0}, {'lr': 0.3, 'mu': 0.0}]
      >>> grid([{"a": 1, "b": 2}, {"a": 3, "b": 4}], lr=[0.1])
      [{'a': 1, 'b': 2, 'lr': 0.1}, {'a': 3, 'b': 4, 'lr': 0.1}]
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"{name}: need a non-empty list of values, got {values!r}.")
    for i, entries in enumerate(joint):
        if (
            isinstance(entries, (str, bytes, Mapping))
            or not isinstance(entries, Sequence)
            or not entries
            or not all(isinstance(e, Mapping) for e in entries)
        ):
            raise ValueError(
                f"grid: positional axis {i} must be a non-empty list of dicts (e.g. "
                f"fl.sweep.malicious_axis(...)), got {entries!r}."
            )
    names = list(axes)
    out = []
    for combo in itertools.product(*joint, *axes.values()):
        row: dict[str, Any] = {}
        for entries in combo[: len(joint)]:
            row.update(entries)
        row.update(zip(names, combo[len(joint):], strict=True))
        out.append(row)
    return out


class DataAxis(NamedTuple):
    """Populations of the same clients' count and features, as one axis of a sweep.

    Attributes:
      name: the row key of the axis (e.g. ``"alpha"``).
      values: one number per population (reported in the rows).
      data: the populations (:class:`~fedjax_lab.data.FederatedData`), in the order of
        ``values``.
    """

    name: str
    values: tuple[float, ...]
    data: tuple[FederatedData, ...]


def data_axis(name: str, populations: Mapping[float, FederatedData]) -> DataAxis:
    """A data axis from ``{value: population}``; pass it to :func:`sweep` as ``train_data``.

    Every population needs the same number of clients and the same features (keys, dtypes
    and per-example shapes); the number of examples and each client's size may differ.

    Example:
      >>> import numpy as np, fedjax_lab as fl
      >>> x = {"x": np.ones((6, 2), "f4"), "y": np.zeros(6, "f4")}
      >>> axis = data_axis("split", {0: fl.FederatedData.from_offsets(x, [0, 3, 6]),
      ...                            1: fl.FederatedData.from_offsets(x, [0, 1, 6])})
      >>> axis.name, axis.values
      ('split', (0.0, 1.0))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: need a non-empty string, got {name!r}.")
    if not isinstance(populations, Mapping) or not populations:
        raise ValueError(
            f"populations: need a non-empty dict {{value: FederatedData}}, got {populations!r}."
        )
    values, datas = [], []
    for value, data in populations.items():
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise ValueError(f"populations: the keys must be numbers, got {value!r}.")
        if not isinstance(data, FederatedData):
            raise TypeError(
                f"populations[{value!r}]: expected a fl.data.FederatedData, "
                f"got {type(data).__name__}."
            )
        values.append(float(value))
        datas.append(data)
    first = datas[0]
    spec = {k: (np.asarray(v).dtype, np.shape(v)[1:]) for k, v in first.examples.items()}
    for value, data in zip(values, datas, strict=True):
        if data.num_clients != first.num_clients:
            raise ValueError(
                f"populations[{value:g}]: has {data.num_clients} clients, but "
                f"populations[{values[0]:g}] has {first.num_clients}; a data axis keeps the "
                "number of clients fixed."
            )
        got = {k: (np.asarray(v).dtype, np.shape(v)[1:]) for k, v in data.examples.items()}
        if got != spec:
            raise ValueError(
                f"populations[{value:g}]: features {got} differ from "
                f"populations[{values[0]:g}]'s {spec}; every population needs the same "
                "features."
            )
    return DataAxis(name, tuple(values), tuple(datas))


def dirichlet_axis(
    examples: Mapping[str, Any],
    num_clients: int,
    alphas: Sequence[float],
    *,
    label_key: str = "y",
    seed: int = 0,
    min_size: int = 1,
    name: str = "alpha",
) -> DataAxis:
    """One :func:`fedjax_lab.partition.dirichlet` split of the same examples per ``α``.

    Population ``α`` is ``FederatedData.from_client_indices(examples, dirichlet(examples[
    label_key], num_clients, α, seed=seed, min_size=min_size))``, exactly what a single run on
    that ``α`` would build.

    Example:
      >>> import numpy as np
      >>> ex = {"x": np.ones((40, 2), "f4"), "y": np.repeat(np.arange(4), 10)}
      >>> axis = dirichlet_axis(ex, 4, [0.1, 100.0])
      >>> axis.values, [d.num_examples for d in axis.data]
      ((0.1, 100.0), [40, 40])
    """
    from fedjax_lab.data import partition

    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or not alphas:
        raise ValueError(f"alphas: need a non-empty list of concentrations > 0, got {alphas!r}.")
    if len(set(float(a) for a in alphas)) != len(alphas):
        raise ValueError(f"alphas: the values must differ, got {list(alphas)}.")
    if label_key not in examples:
        raise ValueError(
            f"label_key: examples have no {label_key!r} entry (entries: {sorted(examples)})."
        )
    labels = np.asarray(examples[label_key])
    pops = {}
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)) or (
            not 0 < float(a) < float("inf")
        ):
            raise ValueError(f"alphas: every concentration must be a number > 0, got {a!r}.")
        part = partition.dirichlet(labels, num_clients, float(a), seed=seed, min_size=min_size)
        pops[float(a)] = FederatedData.from_client_indices(examples, part)
    return data_axis(name, pops)


def malicious_axis(
    fractions: Sequence[float],
    num_clients: int,
    *,
    seed: int | None = None,
    name: str = "malicious_fraction",
) -> list[dict[str, Any]]:
    """One configuration entry per malicious fraction: ``{name: f, "malicious": bool[N] mask}``.

    The mask is :func:`fedjax_lab.attacks.malicious_mask` ``(f, num_clients, seed)``, the set
    that ``attacked(..., fraction=f, num_clients=N, seed=seed)`` attacks with; pass it on as
    ``attacked(..., malicious=hp["malicious"])``. Combine with other axes by :func:`grid`
    (a positional axis).

    Example:
      >>> [(c["malicious_fraction"], c["malicious"].tolist()) for c in malicious_axis([0, .5], 2)]
      [(0.0, [False, False]), (0.5, [True, False])]
    """
    from fedjax_lab import attacks

    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or (
        not fractions
    ):
        raise ValueError(f"fractions: need a non-empty list of fractions in [0, 1], got "
                         f"{fractions!r}.")
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or (
            not 0.0 <= float(f) <= 1.0
        ):
            raise ValueError(f"fractions: every fraction must lie in [0, 1], got {f!r}.")
        out.append({name: float(f), "malicious": attacks.malicious_mask(float(f), num_clients,
                                                                          seed)})
    return out


class DPAccounting(NamedTuple):
    """Per-row privacy accounting of a sweep over DP-FedAvg's noise multiplier.

    Each row gets ``epsilon_<accountant>`` = :func:`fedjax_lab.privacy.epsilon` of its
    configuration's ``noise_key`` value, ``sampling_rate``, the sweep's ``num_rounds`` and
    ``delta`` (``inf`` for ``z = 0``).

    Example:
      >>> DPAccounting(0.1, 1e-5).accountants
      ('rdp',)
    """

    sampling_rate: float
    delta: float
    accountants: tuple[str, ...] = ("rdp",)
    noise_key: str = "noise_multiplier"
    sampling: str = "poisson"
    num_clients: int | None = None


@functools.partial(
    jax.jit,
    static_argnames=("make_algorithm", "init_params", "client_map", "config_map", "static"),
)
def _sweep_program(hparams, seeds, arrays, data_index=None, *, make_algorithm, init_params,
                   client_map, config_map, static):
    static = dict(static)
    num_clients = arrays["offsets"].shape[-1] - 1

    def one(args):
        hp, seed, d = args
        run_arrays = arrays
        if d is not None:  # a data axis: this row's population of the stacked ones
            run_arrays = dict(
                arrays,
                examples={k: v[d] for k, v in arrays["examples"].items()},
                offsets=arrays["offsets"][d],
            )
        alg = make_algorithm(**hp)
        init_key, run_key = jax.random.split(jax.random.key(seed))
        state = alg.init(init_params(init_key), num_clients=num_clients)
        state = _scan.init_sampler_state(state, static["sampler"], run_arrays["offsets"])
        state, hist = _scan.scan_rounds(alg, client_map, state, key=run_key, **run_arrays,
                                        **static)
        return hist

    if config_map == "vmap":
        return jax.vmap(one)((hparams, seeds, data_index))
    return jax.lax.map(one, (hparams, seeds, data_index))


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return True  # as before: float(True) == 1.0
    if isinstance(v, (int, float, np.integer, np.floating)):
        return True
    return isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0


def _stack_values(configs: Sequence[Mapping[str, Any]], names: list[str]):
    """``{name: stacked values}`` and the names whose values are arrays (not in the rows)."""
    stacked, array_names = {}, []
    for n in names:
        vals = [c[n] for c in configs]
        if all(_is_number(v) for v in vals):
            stacked[n] = vals
            continue
        bad = next((i for i, v in enumerate(vals) if not isinstance(v, (np.ndarray, jax.Array))),
                   None)
        if bad is not None:
            raise ValueError(
                f"configs[{bad}][{n!r}]: need a number or an array (the same kind in every "
                f"configuration), got {type(vals[bad]).__name__}."
            )
        spec = (np.shape(vals[0]), np.asarray(vals[0]).dtype)
        for i, v in enumerate(vals):
            if (np.shape(v), np.asarray(v).dtype) != spec:
                raise ValueError(
                    f"configs[{i}][{n!r}]: shape {np.shape(v)} dtype {np.asarray(v).dtype}, but "
                    f"configs[0] has shape {spec[0]} dtype {spec[1]}; array values are stacked."
                )
        stacked[n] = vals
        array_names.append(n)
    return stacked, array_names


def _check_accounting(accounting: Any, configs, names, num_rounds) -> None:
    from fedjax_lab import privacy

    if not isinstance(accounting, DPAccounting):
        raise TypeError(
            f"dp_accounting: expected a fl.sweep.DPAccounting(sampling_rate, delta), "
            f"got {type(accounting).__name__}."
        )
    if accounting.noise_key not in names:
        raise ValueError(
            f"dp_accounting: the configurations have no {accounting.noise_key!r} value to "
            f"account for (names: {names}); sweep it, e.g. fl.grid(noise_multiplier=[...])."
        )
    if isinstance(accounting.accountants, str) or not accounting.accountants:
        raise ValueError(
            f"dp_accounting.accountants: need a non-empty tuple such as ('rdp', 'pld'), got "
            f"{accounting.accountants!r}."
        )
    for i, c in enumerate(configs):
        z = c[accounting.noise_key]
        if not _is_number(z) or isinstance(z, bool) or not 0 <= float(z) < float("inf"):
            raise ValueError(
                f"configs[{i}][{accounting.noise_key!r}]: a noise multiplier must be a finite "
                f"number >= 0, got {z!r}."
            )
    for acc in accounting.accountants:
        privacy._check_accounting_args(accounting.sampling_rate, num_rounds, accounting.delta,
                                       acc, accounting.sampling, accounting.num_clients)


def _prepare_data_axis(axis: DataAxis, **prepare_kw) -> tuple[dict, dict]:
    """Checks every population as a single run would; stacks them padded to common shapes."""
    if not axis.data or len(axis.data) != len(axis.values):
        raise ValueError("train_data: a DataAxis needs one population per value; build it with "
                         "fl.sweep.data_axis or fl.sweep.dirichlet_axis.")
    data_axis(axis.name, dict(zip(axis.values, axis.data, strict=True)))  # same clients, features
    prepared = [_scan.prepare_run(d, **prepare_kw) for d in axis.data]
    widest = max(range(len(prepared)), key=lambda i: prepared[i][1]["max_client_size"])
    arrays, static = prepared[widest]
    total = max(d.num_examples for d in axis.data)
    examples = {}
    for k in axis.data[0].examples:
        parts = []
        for d in axis.data:
            v = np.asarray(d.examples[k])
            parts.append(np.concatenate([v, np.zeros((total - len(v),) + v.shape[1:], v.dtype)]))
        examples[k] = jnp.asarray(np.stack(parts))
    offsets = jnp.asarray(np.stack([np.asarray(d.offsets) for d in axis.data]), jnp.int32)
    return {**arrays, "examples": examples, "offsets": offsets}, static


def sweep(
    make_algorithm: Callable[..., FederatedAlgorithm],
    configs: Sequence[Mapping[str, float]],
    init_params: Callable[[PRNGKey], Params],
    train_data: FederatedData | DataAxis,
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
    dp_accounting: DPAccounting | None = None,
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
        the same names. Values are numbers or arrays (see the module docstring).
      init_params: ``init_params(key) -> params`` (e.g. ``model.init``).
      train_data: the population, or a :class:`DataAxis` of populations (every configuration
        then runs on each; its rows carry the axis value under the axis name).
      seeds: seeds; every configuration (and population) runs once per seed.
      num_rounds, cohort_size, batch_size, local_steps, epochs, client_map, sampler: as in
        :func:`fedjax_lab.run_rounds`.
      eval_fn, eval_data, eval_batch_size: final evaluation (after the last round).
      config_map: ``"vmap"`` (all configurations at once: GPU/TPU), ``"map"`` (one after the
        other inside the program: CPU) or ``"auto"`` (``"map"`` on CPU, else ``"vmap"``).
      dp_accounting: optional :class:`DPAccounting`: each row gets the ``ε`` of its noise
        multiplier (checked, with the accounting arguments, before anything compiles).

    Returns:
      One dict per (configuration, population, seed), seeds fastest: the numeric
      hyper-parameters, the data axis value (with a :class:`DataAxis`), ``seed``,
      ``final_train_loss`` (mean over the last 10% of rounds), with ``eval_fn``
      ``test_accuracy`` and ``test_loss`` after the last round (and ``attack_success_rate``
      when ``eval_fn`` is :func:`fedjax_lab.metrics.backdoor_metrics`), and with ``dp_accounting``
      ``epsilon_<accountant>`` per accountant.

    A row equals :func:`fedjax_lab.run_rounds` of its configuration on its population: a
    population padded to a wider one's ``max_client_size`` draws the same batches (JAX's
    counter-based random bits: a longer draw starts with the shorter one) and its extra local
    steps are all padding, which :func:`fedjax_lab.client.local_loop` skips.

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
    stacked, array_names = _stack_values(configs, names)
    if dp_accounting is not None:
        _check_accounting(dp_accounting, configs, names, num_rounds)
    prepare_kw = dict(
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
    axis = train_data if isinstance(train_data, DataAxis) else None
    if axis is not None:
        if axis.name in names or axis.name == "seed":
            raise ValueError(
                f"train_data: the data axis name {axis.name!r} is also a configuration name (or "
                "'seed'); rename one."
            )
        arrays, static = _prepare_data_axis(axis, **prepare_kw)
        data_ids: list[int | None] = list(range(len(axis.values)))
    else:
        arrays, static = _scan.prepare_run(train_data, **prepare_kw)
        data_ids = [None]
    runs = [(i, d, s) for i in range(len(configs)) for d in data_ids for s in seeds]
    hparams = {}
    for n in names:
        if n in array_names:
            hparams[n] = jnp.stack([jnp.asarray(stacked[n][i]) for i, _, _ in runs])
        else:
            hparams[n] = jnp.asarray([float(stacked[n][i]) for i, _, _ in runs], jnp.float32)
    seed_arr = jnp.asarray([int(s) for _, _, s in runs], jnp.uint32)
    data_index = None if axis is None else jnp.asarray([d for _, d, _ in runs], jnp.int32)
    hist = _sweep_program(
        hparams, seed_arr, arrays, data_index,
        make_algorithm=make_algorithm,
        init_params=init_params,
        client_map=maps_lib.resolve(client_map),
        config_map=config_map,
        static=tuple(sorted(static.items())),
    )
    hist = jax.device_get(hist)
    tail = max(1, num_rounds // 10)
    epsilons: dict[tuple[str, float], float] = {}
    rows = []
    for i, (ci, d, s) in enumerate(runs):
        c = configs[ci]
        row: dict[str, Any] = {n: float(c[n]) for n in names if n not in array_names}
        if axis is not None:
            row[axis.name] = axis.values[d]
        row["seed"] = int(s)
        row["final_train_loss"] = float(np.mean(hist["train_loss"][i, -tail:]))
        if eval_fn is not None:
            row["test_accuracy"] = float(hist["eval_accuracy"][i, -1])
            row["test_loss"] = float(hist["eval_loss"][i, -1])
            if "eval_attack_success_rate" in hist:  # fl.metrics.backdoor_metrics
                row["attack_success_rate"] = float(hist["eval_attack_success_rate"][i, -1])
        if dp_accounting is not None:
            z = float(c[dp_accounting.noise_key])
            for acc in dp_accounting.accountants:
                if (acc, z) not in epsilons:
                    epsilons[(acc, z)] = _epsilon(dp_accounting, z, acc, num_rounds)
                row[f"epsilon_{acc}"] = epsilons[(acc, z)]
        rows.append(row)
    return rows


def _epsilon(accounting: DPAccounting, z: float, accountant: str, num_rounds: int) -> float:
    from fedjax_lab import privacy

    return privacy.epsilon(z, accounting.sampling_rate, num_rounds, accounting.delta,
                           accountant=accountant, sampling=accounting.sampling,
                           num_clients=accounting.num_clients)


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
    seed_map: str = "auto",
) -> tuple[ServerState, dict[str, jax.Array]]:
    """:func:`fedjax_lab.run_rounds` for S seeds at once, as ONE compiled program.

    ``states`` and ``keys`` carry a leading seed axis (:func:`stack_seeds` of S states from
    ``alg.init`` and S run keys); seed ``i`` runs exactly the rounds ``run_rounds(alg,
    states[i], train_data, keys[i], ...)`` would (same sampling, batches and keys), so its
    results equal that run's bit for bit with ``seed_map="map"`` and to float rounding with
    ``"vmap"`` (it batches the seeds' matrix products, which XLA may sum in another order).
    Like ``run_rounds``, 10 rounds then 10 more equal 20 at once.

    Args:
      alg, train_data, num_rounds, ..., max_update_norm: as in :func:`fedjax_lab.run_rounds`.
      states: the seeds' server states stacked on a leading ``[S]`` axis.
      keys: the seeds' run keys, ``[S]`` (typed PRNG keys).
      seed_map: ``"vmap"`` (every seed in each step of the program: batched products, the
        choice for accelerators), ``"map"`` (the seeds one after the other inside the program:
        bit-identical to single runs) or ``"auto"``: ``"map"`` on CPU, where it measured faster
        (16 seeds of a digits MLP: 1.39x the one-by-one loop at steady state against vmap's
        1.03x, ``experiments/benchmarks/seeds.py``), ``"vmap"`` on GPU/TPU.

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
    if seed_map not in ("vmap", "map", "auto"):
        raise ValueError(f"seed_map: expected 'vmap', 'map' or 'auto', got {seed_map!r}.")
    if seed_map == "auto":
        seed_map = "map" if jax.default_backend() == "cpu" else "vmap"
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

    def __init__(self, spec: dict[str, Any], loss_fn: Callable, client_sizes: tuple = (),
                 train_data: Any = None):
        self.spec, self.loss_fn, self.client_sizes = spec, loss_fn, client_sizes
        self.train_data = train_data  # FLTrust's root set is drawn from it
        self._key = (repr(sorted(spec.items())), id(loss_fn), client_sizes, id(train_data))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ConfigAlgorithm) and other._key == self._key

    def __call__(self, **hp: jax.Array) -> FederatedAlgorithm:
        from fedjax_lab.experiment import build_algorithm

        return build_algorithm({**self.spec, **hp}, self.loss_fn,
                               client_sizes=self.client_sizes or None,
                               train_data=self.train_data)


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
        _ConfigAlgorithm(base, experiment.loss_fn,
                         tuple(int(n) for n in experiment.train.client_sizes),
                         experiment.train),
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
