"""Experiment configs: a TOML file (or dict) names data, model, algorithms and the schedule.

A config is checked completely — every key, type and allowed value — before any data is loaded or
anything compiles, and an invalid one raises :class:`ConfigError` naming the key and what it
accepts. :func:`build` turns a valid config into the data, model and algorithms of a run.
An optional ``[privacy]`` table (``delta``, ``accountant``) says how :func:`privacy_spent`
accounts the ``dp_fedavg`` and ``dp_ftrl`` runs.

The default experiment (``fedjax-lab run`` with no config) is :data:`DEFAULT_CONFIG`: digits over
100 clients with Dirichlet(0.5) label skew, a small MLP, 10 clients a round, FedAvg against
FedAdam and FedYogi.

Example:
  >>> cfg = validate({"algorithms": [{"name": "fedadam", "server_learning_rate": 0.03}]})
  >>> cfg["data"]["name"], cfg["training"]["cohort_size"], cfg["algorithms"][0]["name"]
  ('digits', 10, 'fedadam')
  >>> try:
  ...     validate({"training": {"client_map": "fast"}})
  ... except ConfigError as e:
  ...     print(e)
  training.client_map: got 'fast'; allowed: 'auto', 'chunked', 'sequential', 'sharded', 'vmap'.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import sys
from typing import Any, NamedTuple

import numpy as np
import optax

from fedjax_lab import maps as maps_lib
from fedjax_lab import models as models_lib
from fedjax_lab._types import ClientMap, ClientSampler, FederatedAlgorithm, LossFn
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.data import datasets as datasets_lib
from fedjax_lab.data import participation as participation_lib
from fedjax_lab.data import sampling as sampling_lib
from fedjax_lab.data._federated import FederatedData

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BUDGET_TABLES",
    "DEFAULT_CONFIG",
    "DEFAULT_DELTA",
    "FLTRUST",
    "FLTRUST_TABLE",
    "ConfigError",
    "Experiment",
    "build",
    "load_config",
    "privacy_spent",
    "reference",
    "starter_config",
    "validate",
]


class ConfigError(ValueError):
    """An invalid experiment config; the message names the key and the allowed values."""


DEFAULT_CONFIG: dict[str, Any] = {
    "name": "digits: FedAvg vs FedAdam vs FedYogi",
    "data": {
        "name": "digits",
        "num_clients": 100,
        "partition": "dirichlet",
        "alpha": 0.5,
        "seed": 0,
    },
    "model": {"name": "mlp", "hidden": [64]},
    "training": {
        "rounds": 300,
        "cohort_size": 10,
        "batch_size": 10,
        "epochs": 1,
        "client_map": "auto",
        "seed": 1,
    },
    "evaluation": {"every": 25, "batch_size": 256},
    "checkpoint": {"every": 50, "keep": 2},
    "algorithms": [
        {"name": "fedavg", "client_learning_rate": 0.1},
        {"name": "fedadam", "client_learning_rate": 0.1, "server_learning_rate": 0.03},
        {"name": "fedyogi", "client_learning_rate": 0.1, "server_learning_rate": 0.03},
    ],
}

_FILE_DATASETS = ("tff_h5", "leaf")
_MODELS = {
    "logistic_regression": models_lib.logistic_regression,
    "mlp": models_lib.mlp,
    "cnn": models_lib.cnn,
    "char_lstm": models_lib.char_lstm,
    "char_transformer": models_lib.char_transformer,
    "resnet": models_lib.resnet,
    "word_lstm": models_lib.word_lstm,
}
_MAPS = ("auto", "chunked", "sequential", "sharded", "vmap")
_SAMPLERS = {
    "uniform": sampling_lib.uniform,
    "size_weighted": sampling_lib.size_weighted,
    "bernoulli": participation_lib.bernoulli,
    "markov": participation_lib.markov,
    "dropout_forever": participation_lib.dropout_forever,
    "weighted": participation_lib.weighted,
}
_CLIENT_OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam, "adagrad": optax.adagrad}
_SECTIONS = {
    "name": str,
    "data": dict,
    "model": dict,
    "training": dict,
    "evaluation": dict,
    "checkpoint": dict,
    "sampler": dict,
    "privacy": dict,
    "algorithms": list,
    "sweep": dict,
}
_TRAINING = {
    "rounds": (int, 1),
    "cohort_size": (int, 1),
    "batch_size": (int, 1),
    "epochs": (int, 1),
    "local_steps": (int, 1),
    "client_map": (str, None),
    "chunk_size": (int, 1),
    "weighting": (str, None),
    "seed": (int, 0),
    "seeds": (int, 1),
    "max_update_norm": (float, None),
    "data_on": (str, None),
}
_DATA_ON = ("device", "host")
_EVALUATION = {
    "every": (int, 1),
    "batch_size": (int, 1),
    "personalized": (bool, None),
    "fine_tune_steps": (int, 0),
    "fine_tune_learning_rate": (float, 0.0),
    "fine_tune_batch_size": (int, 1),
}
_CHECKPOINT = {"every": (int, 1), "keep": (int, 1)}
_PRIVACY = {"delta": (float, None), "accountant": (str, None)}
_ACCOUNTANTS = ("best", "pld", "rdp")
DEFAULT_DELTA = 1e-5
"""The ``δ`` of the ``(ε, δ)`` reported for DP runs when ``[privacy]`` gives no ``delta``."""


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in sorted(values))


def _check_number(where: str, value: Any, kind: type, minimum: Any) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value!r}.")


def _check_section(name: str, section: dict, spec: dict) -> None:
    for key, value in section.items():
        if key not in spec:
            raise ConfigError(f"{name}.{key}: unknown key; allowed: {_allowed(spec)}.")
        kind, minimum = spec[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{key}: expected true or false, got {value!r}.")
        elif kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{name}.{key}: expected a string, got {value!r}.")
        else:
            _check_number(f"{name}.{key}", value, kind, minimum)


def _merge(default: dict, given: dict) -> dict:
    out = copy.deepcopy(default)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # a different dataset or model starts from no options rather than the default's
            if key in ("data", "model") and value.get("name", out[key].get("name")) != out[key].get(
                "name"
            ):
                out[key] = copy.deepcopy(value)
            else:
                out[key].update(copy.deepcopy(value))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _factory_params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


PARTS = ("aggregator", "attack", "compression", "privacy", "server_optimizer")
"""The tables an ``[[algorithms]]`` entry may hold to compose parts with its algorithm:
``[algorithms.aggregator]`` (:data:`fedjax_lab.aggregators.REGISTRY`), ``[algorithms.attack]``
(:data:`fedjax_lab.attacks.REGISTRY`, plus ``fraction``, ``num_clients``, ``seed``),
``[algorithms.compression]`` (:data:`fedjax_lab.compression.REGISTRY`, plus
``error_feedback``, ``num_clients``), ``[algorithms.privacy]`` (the options of
:func:`fedjax_lab.algorithms.with_privacy`) and ``[algorithms.server_optimizer]``
(:data:`fedjax_lab.server.REGISTRY`, plus ``rules``: a list of tables ``{match, name, ...}``
giving the leaves whose path matches the regular expression ``match`` their own optimiser)."""

_ATTACK_SELECTION = ("fraction", "num_clients", "seed")
_COMPRESSION_OWN = ("error_feedback", "num_clients")


def _is_part(key: str, value: Any) -> bool:
    """A part table (``[algorithms.aggregator]``); a plain value is the factory's own argument."""
    return key in PARTS and isinstance(value, dict)


def _shape_only_loss(params, batch, key):  # stands in for the model's loss while validating
    del params, batch, key
    return 0.0


def _part_table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table with a 'name', got {value!r}.")
    if "name" not in value:
        raise ConfigError(f"{where}.name: required (which one to use).")
    return value


def _check_registry(registry, where: str, table: dict, extra: tuple[str, ...] = ()) -> None:
    options = {k: v for k, v in table.items() if k != "name" and k not in extra}
    try:
        registry.check(table["name"], options, where=where)
    except ValueError as e:
        msg = str(e)
        if extra and "not an option" in msg:
            msg = msg[:-1] + f" (and {_allowed(extra)})."
        raise ConfigError(msg) from e


def _check_parts(where: str, alg: dict[str, Any], params: dict[str, Any]) -> None:
    """Checks every part table of one ``[[algorithms]]`` entry (keys and names only)."""
    from fedjax_lab import aggregators as aggregators_lib
    from fedjax_lab import attacks as attacks_lib
    from fedjax_lab import compression as compression_lib
    from fedjax_lab import server as server_lib
    from fedjax_lab.algorithms import with_privacy

    alg = {k: v for k, v in alg.items() if not (k in PARTS and not _is_part(k, v))}
    if "aggregator" in alg and "privacy" in alg:
        raise ConfigError(
            f"{where}: give [aggregator] or [privacy], not both (differential privacy is an "
            "aggregator of its own: clipping and noise on the sum)."
        )
    if "aggregator" in alg:
        w = f"{where}.aggregator"
        table = _part_table(w, alg["aggregator"])
        if table["name"] not in (*aggregators_lib.REGISTRY, FLTRUST):
            raise ConfigError(f"{w}.name: got {table['name']!r}; allowed: "
                              f"{_allowed((*aggregators_lib.REGISTRY, FLTRUST))}.")
        if table["name"] != FLTRUST:  # FLTrust's table: checked when it is built
            _check_registry(aggregators_lib.REGISTRY, w, table)
    if "attack" in alg:
        w = f"{where}.attack"
        _check_registry(attacks_lib.REGISTRY, w, _part_table(w, alg["attack"]),
                        _ATTACK_SELECTION)
    if "compression" in alg:
        w = f"{where}.compression"
        _check_registry(compression_lib.REGISTRY, w, _part_table(w, alg["compression"]),
                        _COMPRESSION_OWN)
    if "privacy" in alg:
        w = f"{where}.privacy"
        table = alg["privacy"]
        if not isinstance(table, dict):
            raise ConfigError(f"{w}: expected a table, got {table!r}.")
        allowed = set(inspect.signature(with_privacy).parameters) - {"alg"}
        for key in table:
            if key not in allowed:
                raise ConfigError(f"{w}.{key}: unknown key; allowed: {_allowed(allowed)}.")
    if "server_optimizer" in alg:
        w = f"{where}.server_optimizer"
        if "server_optimizer" not in params:
            raise ConfigError(
                f"{w}: {alg['name']!r} fixes its own server optimiser; use name = 'fedopt' "
                "(or 'fedavg') with this [server_optimizer] table instead."
            )
        table = _part_table(w, alg["server_optimizer"])
        _check_registry(server_lib.REGISTRY, w, table, ("rules",))
        rules = table.get("rules", [])
        if not isinstance(rules, list):
            raise ConfigError(f"{w}.rules: expected a list of tables, got {rules!r}.")
        for i, rule in enumerate(rules):
            wr = f"{w}.rules[{i}]"
            rule = _part_table(wr, rule)
            if not isinstance(rule.get("match"), str):
                raise ConfigError(
                    f"{wr}.match: required, a regular expression over the leaf path "
                    "(e.g. 'Dense_0')."
                )
            _check_registry(server_lib.REGISTRY, wr, rule, ("match",))


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Checks a config and fills in defaults from :data:`DEFAULT_CONFIG`; returns the full config.

    Raises:
      ConfigError: naming the first bad key and the values it allows.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"config: expected a table (dict), got {type(config).__name__}.")
    for key in config:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section; allowed: {_allowed(_SECTIONS)}.")
        if not isinstance(config[key], _SECTIONS[key]):
            raise ConfigError(
                f"{key}: expected a {_SECTIONS[key].__name__}, got {type(config[key]).__name__}."
            )
    cfg = _merge(DEFAULT_CONFIG, config)

    data = cfg["data"]
    names = tuple(datasets_lib.DATASETS) + _FILE_DATASETS
    if data.get("name") not in names:
        raise ConfigError(f"data.name: got {data.get('name')!r}; allowed: {_allowed(names)}.")
    if data["name"] in datasets_lib.DATASETS:
        params = _factory_params(datasets_lib.DATASETS[data["name"]])
        for key in data:
            if key != "name" and key not in params:
                raise ConfigError(
                    f"data.{key}: not an option of dataset {data['name']!r}; allowed: "
                    f"{_allowed(k for k in params if k != 'name')}."
                )
        if "partition" in data and data["partition"] not in datasets_lib.PARTITIONS:
            raise ConfigError(
                f"data.partition: got {data['partition']!r}; allowed: "
                f"{_allowed(datasets_lib.PARTITIONS)}."
            )
    else:
        required = {"train_path", "test_path"} | ({"task"} if data["name"] == "tff_h5" else set())
        allowed = required | {"name", "seq_len"}
        if data.get("task") == "stackoverflow":
            allowed |= {"vocab_size", "vocab_path", "max_sentences_per_client"}
        for key in data:
            if key not in allowed:
                raise ConfigError(f"data.{key}: unknown key; allowed: {_allowed(allowed)}.")
        for key in sorted(required - set(data)):
            raise ConfigError(f"data.{key}: required for data.name = {data['name']!r}.")
        if data["name"] == "tff_h5" and data["task"] not in datasets_lib.TFF_TASKS:
            raise ConfigError(
                f"data.task: got {data['task']!r}; allowed: {_allowed(datasets_lib.TFF_TASKS)}."
            )

    model = cfg["model"]
    if model.get("name") not in _MODELS:
        raise ConfigError(f"model.name: got {model.get('name')!r}; allowed: {_allowed(_MODELS)}.")
    params = _factory_params(_MODELS[model["name"]])
    for key in model:
        if key != "name" and key not in params:
            raise ConfigError(
                f"model.{key}: not an option of model {model['name']!r}; allowed: "
                f"{_allowed(params)}."
            )

    _check_section("training", cfg["training"], _TRAINING)
    training = cfg["training"]
    if training["client_map"] not in _MAPS:
        raise ConfigError(
            f"training.client_map: got {training['client_map']!r}; allowed: {_allowed(_MAPS)}."
        )
    if training.get("weighting", "num_examples") not in ("num_examples", "uniform"):
        raise ConfigError(
            f"training.weighting: got {training['weighting']!r}; allowed: 'num_examples', "
            "'uniform'."
        )
    if "max_update_norm" in training and not 0 < training["max_update_norm"] < math.inf:
        raise ConfigError(
            f"training.max_update_norm: need a finite number > 0 (a round whose aggregate is "
            f"longer is refused), got {training['max_update_norm']!r}."
        )
    if training.get("data_on", "device") not in _DATA_ON:
        raise ConfigError(
            f"training.data_on: got {training['data_on']!r}; allowed: {_allowed(_DATA_ON)} "
            "(where the training examples live: moved to the device, or streamed from host "
            "memory one cohort a round)."
        )
    if training.get("data_on") == "host" and training.get("seeds", 1) > 1:
        raise ConfigError(
            "training.data_on: 'host' streams one run's cohorts from a Python loop; the "
            f"seeds = {training['seeds']} runs of one compiled program need data_on = "
            "'device' (or run one seed at a time)."
        )
    sampler = cfg.get("sampler") or {"name": "uniform"}
    if sampler.get("name") not in _SAMPLERS:
        raise ConfigError(
            f"sampler.name: got {sampler.get('name')!r}; allowed: {_allowed(_SAMPLERS)}."
        )
    params = _factory_params(_SAMPLERS[sampler["name"]])
    for key in sampler:
        if key != "name" and key not in params:
            raise ConfigError(
                f"sampler.{key}: not an option of sampler {sampler['name']!r}; allowed: "
                f"{_allowed(params)}."
            )
    missing = [k for k, p in params.items()
               if p.default is inspect.Parameter.empty and k not in sampler]
    if missing:
        raise ConfigError(f"sampler.{missing[0]}: required by sampler {sampler['name']!r}.")
    _check_section("evaluation", cfg["evaluation"], _EVALUATION)
    _check_section("checkpoint", cfg["checkpoint"], _CHECKPOINT)
    _check_privacy(cfg.get("privacy") or {})
    if cfg["checkpoint"]["every"] % cfg["evaluation"]["every"]:
        raise ConfigError(
            f"checkpoint.every: must be a multiple of evaluation.every "
            f"({cfg['evaluation']['every']}), got {cfg['checkpoint']['every']}: checkpoints are "
            "written between compiled blocks of evaluation.every rounds."
        )

    algs = cfg["algorithms"]
    if not algs:
        raise ConfigError("algorithms: need at least one [[algorithms]] table.")
    seen = set()
    for i, alg in enumerate(algs):
        where = f"algorithms[{i}]"
        if not isinstance(alg, dict):
            raise ConfigError(f"{where}: expected a table, got {alg!r}.")
        if alg.get("name") not in REGISTRY:
            raise ConfigError(
                f"{where}.name: got {alg.get('name')!r}; allowed: {_allowed(REGISTRY)}."
            )
        label = alg.get("label", alg["name"])
        if label in seen:
            raise ConfigError(f"{where}.label: {label!r} appears twice; give each run a label.")
        seen.add(label)
        opt = alg.get("client_optimizer", "sgd")
        if opt not in _CLIENT_OPTIMIZERS:
            raise ConfigError(
                f"{where}.client_optimizer: got {opt!r}; allowed: {_allowed(_CLIENT_OPTIMIZERS)}."
            )
        lr = alg.get("client_learning_rate", 0.1)
        if _is_per_client_table(lr):
            lr = 0.1  # checked with the factory's own hyper-parameters below
        _check_number(f"{where}.client_learning_rate", lr, float, None)
        if not lr > 0:
            raise ConfigError(f"{where}.client_learning_rate: must be > 0, got {lr!r}.")
        if not math.isfinite(lr):
            raise ConfigError(
                f"{where}.client_learning_rate: must be finite, got {lr!r}; every client's "
                "update would be non-finite and dropped. Use e.g. 0.1."
            )
        params = REGISTRY.options(alg["name"], skip=("loss_fn", "client_optimizer"))
        own = {"name", "label", "client_optimizer", "client_learning_rate"}
        for key, value in alg.items():
            if key in own or _is_part(key, value):
                continue
            if key in params:
                if key in PARTS and not isinstance(value, (str, int, float, bool)):
                    raise ConfigError(f"{where}.{key}: expected a table with a 'name'.")
                continue
            raise ConfigError(
                f"{where}.{key}: not a hyper-parameter of {alg['name']!r}; allowed: "
                f"{_allowed(set(params) | own | set(PARTS))}."
            )
        _check_parts(where, alg, params)
        try:  # every factory checks its own hyper-parameters: before any data loads
            build_algorithm(alg, _shape_only_loss)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} ({alg['name']}): {e}") from e
    return cfg


def _check_privacy(privacy: dict[str, Any]) -> None:
    _check_section("privacy", privacy, _PRIVACY)
    delta = privacy.get("delta", DEFAULT_DELTA)
    if not 0.0 < delta < 1.0:
        raise ConfigError(
            f"privacy.delta: need a probability in (0, 1), e.g. 1e-5 (well below "
            f"1 / num_clients), got {delta!r}."
        )
    accountant = privacy.get("accountant", "best")
    if accountant not in _ACCOUNTANTS:
        raise ConfigError(
            f"privacy.accountant: got {accountant!r}; allowed: {_allowed(_ACCOUNTANTS)}."
        )


def _sampling_rate(cfg: dict[str, Any], num_clients: int) -> tuple[float | None, str]:
    """``(q, how)``: the per-round participation probability the accountant uses.

    ``q`` is ``None`` when the sampler has no privacy-amplification analysis here.
    """
    sampler = cfg.get("sampler") or {"name": "uniform"}
    if sampler["name"] == "uniform":
        q = min(1.0, cfg["training"]["cohort_size"] / num_clients)
        return q, (
            "cohort_size / num_clients; the uniform sampler draws fixed-size cohorts, "
            "accounted as Poisson sampling (the usual approximation, McMahan et al. 2018)"
        )
    if sampler["name"] == "bernoulli":
        # Poisson sampling with rate p_i, exact while the cohort holds every available client;
        # a round with more available clients than cohort slots keeps a subset that depends on
        # the others, which this accounting does not cover: its probability is reported.
        from scipy.stats import binom

        q = float(np.max(np.asarray(sampler["probs"], np.float64)))
        overflow = float(binom.sf(cfg["training"]["cohort_size"], num_clients, q))
        return q, (
            "max_i probs[i] of the bernoulli sampler (Poisson sampling); exact in rounds where "
            f"the cohort holds every available client: P[more available than cohort_size] <= "
            f"{overflow:.2g} a round"
        )
    return None, (
        f"sampler {sampler['name']!r} has no privacy-amplification analysis here; no epsilon "
        "is reported (use the 'uniform' or 'bernoulli' sampler)"
    )


def _noise_multiplier(spec: dict[str, Any]) -> float:
    if "privacy" in spec:
        from fedjax_lab.algorithms import with_privacy

        return float(spec["privacy"].get(
            "noise_multiplier", _factory_params(with_privacy)["noise_multiplier"].default
        ))
    return float(spec.get(
        "noise_multiplier", _factory_params(REGISTRY[spec["name"]])["noise_multiplier"].default
    ))


def _is_private(spec: dict[str, Any]) -> bool:
    return spec["name"] in _PRIVATE_ALGORITHMS or "privacy" in spec


_PRIVATE_ALGORITHMS = ("dp_fedavg", "dp_ftrl")


def privacy_spent(
    config: dict[str, Any], spec: dict[str, Any], rounds: int, num_clients: int
) -> dict[str, Any] | None:
    """The ``(ε, δ)`` a private ``[[algorithms]]`` entry of a config has spent after ``rounds``.

    Private entries: ``dp_fedavg``, ``dp_ftrl`` and any entry with a ``[privacy]`` table.

    ``δ`` and the accountant come from ``[privacy]`` (defaults :data:`DEFAULT_DELTA` and
    ``"best"``: the smallest ``ε`` of the accountants that apply, see
    :func:`fedjax_lab.privacy.best_epsilon`; ``"rdp"`` or ``"pld"`` force one); ``z`` is the
    entry's ``noise_multiplier`` (with adaptive clipping it covers the update and the
    clipped-count noise together). ``noise_multiplier = 0`` gives ``epsilon = inf``.

    DP-FedAvg (a sampled Gaussian mechanism each round, composed over the rounds):

    * ``uniform`` sampler: the cohorts are fixed-size, drawn without replacement. ``epsilon``
      is the ``ε`` of THAT sampler (``sampling = "fixed_size_without_replacement"``,
      replace-one neighbours, RDP: the only accountant of it in dp-accounting,
      ``fl.privacy.epsilon(..., sampling="uniform")``); ``epsilon_poisson`` is the usual
      Poisson approximation (``q = cohort_size / num_clients``, add-or-remove-one neighbours,
      McMahan et al. 2018) under the configured accountant (``accountant_poisson``).
    * ``bernoulli`` sampler: Poisson sampling with ``q = max(probs)``, exact while the cohort
      holds every available client: ``epsilon = epsilon_poisson``.
    * other samplers: ``epsilon = None``.

    DP-FTRL (:func:`fedjax_lab.privacy.ftrl_epsilon`): no sampling assumption
    (``sampling = "none"``); without the entry's ``max_participations`` (which the algorithm
    enforces) a client may be drawn in every round, so the tree's sensitivity is that of
    ``rounds`` participations, whatever the sampler.

    Args:
      config: a validated config (:func:`validate`).
      spec: one of its ``[[algorithms]]`` entries.
      rounds: rounds run.
      num_clients: the population size ``N``.

    Returns:
      ``None`` unless ``spec`` is private; else a dict with ``epsilon``, ``delta``,
      ``accountant``, ``sampling``, ``neighbouring``, ``sampling_rate``, ``noise_multiplier``,
      ``rounds``, ``sampling_note`` and, for DP-FedAvg with a known sampler,
      ``epsilon_poisson`` and ``accountant_poisson`` (for DP-FTRL ``max_participations``).

    Example:
      >>> cfg = validate({"algorithms": [{"name": "dp_fedavg", "noise_multiplier": 1.0}],
      ...                 "privacy": {"delta": 1e-4}})
      >>> spent = privacy_spent(cfg, cfg["algorithms"][0], rounds=100, num_clients=100)
      >>> round(spent["epsilon"], 2), spent["sampling"], spent["accountant"]
      (81.63, 'fixed_size_without_replacement', 'rdp')
      >>> round(spent["epsilon_poisson"], 2), spent["accountant_poisson"]
      (5.97, 'pld')
    """
    if not _is_private(spec):
        return None
    from fedjax_lab import privacy as privacy_lib

    privacy = config.get("privacy") or {}
    delta = float(privacy.get("delta", DEFAULT_DELTA))
    accountant = privacy.get("accountant", "best")
    z = _noise_multiplier(spec)
    q, note = _sampling_rate(config, num_clients)
    out = {"delta": delta, "noise_multiplier": z, "rounds": int(rounds)}
    if spec["name"] == "dp_ftrl" and "privacy" not in spec:
        cap = spec.get("max_participations")
        k = int(rounds) if cap is None else min(int(cap), int(rounds))
        eps, name = privacy_lib._ftrl_best(z, int(rounds), delta, k, accountant)
        return {
            "epsilon": eps, **out, "accountant": name, "sampling": "none",
            "neighbouring": "add_or_remove_one", "sampling_rate": q,
            "max_participations": k,
            "sampling_note": (
                "DP-FTRL assumes no sampling (tree aggregation, Kairouz et al. 2021): "
                + (f"every client may take part in all {k} rounds" if cap is None else
                   f"max_participations = {cap} caps each client's rounds")
            ),
        }
    uniform = (config.get("sampler") or {"name": "uniform"})["name"] == "uniform"
    if q is None:
        return {"epsilon": None, **out, "accountant": None, "sampling": None,
                "neighbouring": None, "sampling_rate": None, "sampling_note": note}
    if q == 0.0:  # nobody ever takes part
        poisson, poisson_name = 0.0, accountant
    else:
        poisson, poisson_name = privacy_lib.best_epsilon(z, q, int(rounds), delta,
                                                         accountant=accountant)
    spent = {"epsilon": poisson, **out, "accountant": poisson_name, "sampling": "poisson",
             "neighbouring": "add_or_remove_one", "sampling_rate": q,
             "epsilon_poisson": poisson, "accountant_poisson": poisson_name,
             "sampling_note": note}
    if uniform:
        cohort = int(round(q * num_clients))
        if q == 0.0:
            actual, name = 0.0, "rdp"
        else:
            actual, name = privacy_lib.best_epsilon(
                z, cohort / num_clients, int(rounds), delta,
                accountant="rdp" if accountant == "pld" else accountant,
                sampling="uniform", num_clients=int(num_clients),
            )
        spent.update(epsilon=actual, accountant=name, sampling="fixed_size_without_replacement",
                     neighbouring="replace_one")
        spent["sampling_note"] = (
            f"epsilon: fixed-size cohorts of {cohort} of {num_clients} clients without "
            "replacement (the uniform sampler), replace-one neighbours, RDP (the only "
            "accountant for it); epsilon_poisson: the Poisson approximation at q = "
            "cohort_size / num_clients, add-or-remove-one neighbours (McMahan et al. 2018)"
        )
    return spent


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Reads a TOML config (``None``: the default experiment) and validates it."""
    if path is None:
        return validate({})
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config: no such file {os.fspath(path)!r}.") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {os.fspath(path)!r} is not valid TOML: {e}.") from e
    return validate(raw)


class Experiment(NamedTuple):
    """What :func:`build` makes of a config."""

    config: dict[str, Any]
    train: FederatedData
    test: FederatedData
    model: models_lib.Model
    loss_fn: LossFn
    eval_fn: Any
    algorithms: dict[str, FederatedAlgorithm]
    client_map: ClientMap
    sampler: ClientSampler


def _load_data(data: dict[str, Any]) -> tuple[FederatedData, FederatedData]:
    if data["name"] in datasets_lib.DATASETS:
        options = {k: v for k, v in data.items() if k != "name"}
        return datasets_lib.load(data["name"], **options)
    extra = {"seq_len": data["seq_len"]} if "seq_len" in data else {}
    if data["name"] == "leaf":
        return datasets_lib.load_leaf(data["train_path"]), datasets_lib.load_leaf(data["test_path"])
    train_extra = dict(extra)
    if data["task"] == "stackoverflow":
        # One vocabulary for both splits: counted on the train file unless a word list is given.
        extra["vocab_path"] = data.get("vocab_path", data["train_path"])
        extra["vocab_size"] = data.get("vocab_size", 10000)
        train_extra = dict(extra)
        if "max_sentences_per_client" in data:
            train_extra["max_sentences_per_client"] = data["max_sentences_per_client"]
    train = datasets_lib.load_tff_h5(data["train_path"], data["task"], **train_extra)
    test = datasets_lib.load_tff_h5(data["test_path"], data["task"], **extra)
    return train, test


def _text_task(data: dict[str, Any]) -> tuple[int, int] | None:
    """``(vocab_size, pad_id)`` of a next-token task, ``None`` for classification."""
    if data["name"] == "shakespeare" or data.get("task") == "shakespeare":
        return datasets_lib.SHAKESPEARE_VOCAB_SIZE, datasets_lib.SHAKESPEARE_PAD_ID
    if data.get("task") == "stackoverflow":
        return data.get("vocab_size", 10000) + 4, datasets_lib.STACKOVERFLOW_PAD_ID
    return None


def _server_optimizer_from(table: dict[str, Any]):
    from fedjax_lab import server as server_lib

    def make(t: dict[str, Any]):
        return server_lib.REGISTRY[t["name"]](
            **{k: v for k, v in t.items() if k not in ("name", "rules", "match")}
        )

    rules = table.get("rules", [])
    if not rules:
        return make(table)
    return server_lib.per_layer([(r["match"], make(r)) for r in rules], make(table))


def _built_part(registry, table: dict[str, Any], extra: tuple[str, ...]) -> tuple[Any, dict]:
    """``registry[name](**options)`` of a part table, and its ``extra`` keys (for the wrapper)."""
    options = {k: v for k, v in table.items() if k != "name" and k not in extra}
    return registry[table["name"]](**options), {k: table[k] for k in extra if k in table}


PER_CLIENT_KEYS = ("client_learning_rate", "max_local_steps", "mu", "lam")
"""Hyper-parameters a config may give per client (where the algorithm takes them, e.g.
``fedavg``/``fedprox``/``ditto``), as a table: ``mu = {per_client = [0.0, 0.1, ...]}`` (one
value per client of the training data) or ``client_learning_rate = {per_client = "size",
scale = 0.1, power = 0.5}`` (client ``i``'s value ``scale * (n_i / mean_j n_j) ** power`` of
its example count ``n_i``; ``max_local_steps`` rounds it to a whole number). A per-client
``client_learning_rate`` is plain SGD (``client_optimizer = "sgd"``).

``max_local_steps`` may also be drawn for each cohort client each round (heterogeneous compute,
:class:`fedjax_lab.kit.BudgetSampler`), a table with ``sample`` (:data:`BUDGET_TABLES`):
``{sample = "straggler", fraction = 0.5, max_steps = 20}`` (FedProx's stragglers,
:func:`~fedjax_lab.kit.straggler_budget`), ``{sample = "uniform", low = 1, high = 20}``
(:func:`~fedjax_lab.kit.uniform_budget`) or ``{sample = "speed", max_steps = 20, speeds =
[one per client], jitter = 0.0}`` / ``{sample = "speed", max_steps = 20, sigma = 1.0, seed =
0}`` (fixed per-client speeds, given or lognormal, :func:`~fedjax_lab.kit.speed_budget` and
:func:`~fedjax_lab.kit.lognormal_speeds`)."""

BUDGET_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "straggler": (("fraction", "max_steps"), ()),
    "uniform": (("low", "high"), ()),
    "speed": (("max_steps",), ("speeds", "sigma", "seed", "jitter")),
}
"""``sample`` -> (required keys, optional keys) of a sampled ``max_local_steps`` table; a
``"speed"`` table gives ``speeds`` (one per client) or ``sigma`` (and ``seed``), not both."""


def _is_budget_table(value: Any) -> bool:
    return isinstance(value, dict) and "sample" in value


def _budget_sampler(where: str, value: dict[str, Any], client_sizes: Any) -> Any:
    """A config's sampled ``max_local_steps`` table as a :class:`~fedjax_lab.kit.BudgetSampler`.

    ``client_sizes`` ``None`` (validating, no data yet) checks the table and its values only.
    """
    from fedjax_lab import kit

    kind = value["sample"]
    if kind not in BUDGET_TABLES:
        raise ConfigError(f"{where}.sample: got {kind!r}; allowed: {_allowed(BUDGET_TABLES)}.")
    required, optional = BUDGET_TABLES[kind]
    options = {k: v for k, v in value.items() if k != "sample"}
    for key in options:
        if key not in required + optional:
            raise ConfigError(f"{where}.{key}: not an option of sample = {kind!r}; allowed: "
                              f"{_allowed(('sample', *required, *optional))}.")
    for key in required:
        if key not in options:
            raise ConfigError(f"{where}.{key}: required by sample = {kind!r}.")
    if kind == "speed":
        if ("speeds" in options) == ("sigma" in options):
            raise ConfigError(
                f"{where}: sample = 'speed' needs either speeds = [one speed per client] or "
                "sigma = s (lognormal speeds, with an optional seed), not both."
            )
        if "sigma" in options:
            sigma, seed = options.pop("sigma"), options.pop("seed", 0)
            _check_number(f"{where}.sigma", sigma, float, 0)
            _check_number(f"{where}.seed", seed, int, 0)
            n = 1 if client_sizes is None else len(client_sizes)
            options["speeds"] = kit.lognormal_speeds(n, sigma, seed=seed)
        else:
            if "seed" in options:
                raise ConfigError(f"{where}.seed: goes with sigma (lognormal speeds) only.")
            speeds = options["speeds"]
            if not isinstance(speeds, list):
                raise ConfigError(f"{where}.speeds: expected a list of numbers (one per "
                                  f"client), got {speeds!r}.")
            for i, v in enumerate(speeds):
                _check_number(f"{where}.speeds[{i}]", v, float, 0)
            if client_sizes is not None and len(speeds) != len(client_sizes):
                raise ConfigError(
                    f"{where}.speeds: {len(speeds)} values, but the training data has "
                    f"{len(client_sizes)} clients; give one speed per client."
                )
    try:
        return kit.BUDGET_SAMPLERS[kind](**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.{e}") from e


def _is_per_client_table(value: Any) -> bool:
    return isinstance(value, dict) and "per_client" in value


def _per_client(where: str, value: Any, client_sizes: Any, *, whole: bool = False) -> Any:
    """A config's per-client table as a :class:`~fedjax_lab.kit.PerClient`; others unchanged.

    ``client_sizes`` ``None`` (validating, no data yet) checks the table and its values only.
    """
    from fedjax_lab import kit

    if not _is_per_client_table(value):
        return value
    spec = value["per_client"]
    extra = sorted(set(value) - {"per_client", "scale", "power"})
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown key; allowed: 'per_client', 'power', "
                          "'scale'.")
    if isinstance(spec, list):
        if set(value) != {"per_client"}:
            raise ConfigError(f"{where}: scale and power go with per_client = 'size' only.")
        for i, v in enumerate(spec):
            _check_number(f"{where}.per_client[{i}]", v, float, None)
        if client_sizes is not None and len(spec) != len(client_sizes):
            raise ConfigError(
                f"{where}.per_client: {len(spec)} values, but the training data has "
                f"{len(client_sizes)} clients; give one value per client."
            )
        return kit.per_client(spec)
    if spec != "size":
        raise ConfigError(
            f"{where}.per_client: expected 'size' (a function of each client's example count) "
            f"or a list of numbers (one per client), got {spec!r}."
        )
    scale, power = value.get("scale", 1.0), value.get("power", 1.0)
    _check_number(f"{where}.scale", scale, float, None)
    _check_number(f"{where}.power", power, float, None)

    def of_size(n):
        v = scale * (n / n.mean()) ** power
        return np.rint(v) if whole else v

    return kit.per_client(of_size, client_sizes=[1] if client_sizes is None else client_sizes)


FLTRUST = "fltrust"
"""The ``[algorithms.aggregator]`` name of FLTrust (:func:`fedjax_lab.robust.fltrust`), built
from the training data rather than from :data:`fedjax_lab.aggregators.REGISTRY`."""

FLTRUST_TABLE = {
    "root_examples": (int, 1),
    "root_batch_size": (int, 1),
    "root_steps": (int, 1),
    "root_learning_rate": (float, None),
    "root_seed": (int, 0),
}
"""The options of ``aggregator = {name = "fltrust", ...}`` (besides ``name``): the root set's
size (default 100, the paper's), its batch size (default 10), the server's SGD steps on it each
round (default one pass), their rate (default the entry's ``client_learning_rate``: the server
trains as a client would) and the seed of the sample. The root set is
:func:`fedjax_lab.robust.fltrust_root_batches` of the training data: a seeded uniform sample of
the training examples (the clients' own data), so it is not held out from the clients."""

_FLTRUST_DEFAULTS = {"root_examples": 100, "root_batch_size": 10, "root_steps": None,
                     "root_seed": 0}


def _fltrust_from(where: str, table: dict[str, Any], spec: dict[str, Any], loss_fn: LossFn,
                  train_data: FederatedData | None):
    """FLTrust from its config table; ``train_data`` ``None`` (validating) checks it only."""
    from fedjax_lab import robust

    options = {**_FLTRUST_DEFAULTS, **{k: v for k, v in table.items() if k != "name"}}
    _check_section(where, {k: v for k, v in options.items() if v is not None}, FLTRUST_TABLE)
    lr = options.get("root_learning_rate", spec.get("client_learning_rate", 0.1))
    if _is_per_client_table(lr):
        raise ConfigError(f"{where}.root_learning_rate: required when client_learning_rate is "
                          "per client (the server's root update is SGD at one rate).")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"{where}.root_learning_rate: must be a finite number > 0, got {lr!r}.")
    if train_data is None:  # validating: no data yet, the options are checked
        return robust.fltrust(lambda params, key: params)
    if options["root_examples"] > train_data.num_examples:
        raise ConfigError(
            f"{where}.root_examples: {options['root_examples']} is more than the "
            f"{train_data.num_examples} training examples the root set is drawn from; use <= "
            f"{train_data.num_examples}."
        )
    batches = robust.fltrust_root_batches(
        train_data, options["root_examples"], options["root_batch_size"],
        num_steps=options["root_steps"], seed=options["root_seed"],
    )
    return robust.fltrust(robust.fltrust_root_update(loss_fn, batches, learning_rate=lr))


def build_algorithm(
    spec: dict[str, Any], loss_fn: LossFn, client_sizes: Any = None,
    train_data: FederatedData | None = None,
) -> FederatedAlgorithm:
    """Builds one ``[[algorithms]]`` entry: its registered factory, then its part tables.

    ``client_sizes`` (the training data's example counts) resolves per-client tables
    (:data:`PER_CLIENT_KEYS`); without it they are checked but not sized to the population.
    ``train_data`` (the training data) is what an ``aggregator = {name = "fltrust"}`` table
    draws its root set from (:data:`FLTRUST_TABLE`); without it that table is checked only
    (the aggregator built stands in for shapes, it is not FLTrust's). Given alone, it also
    gives ``client_sizes``.

    The parts wrap the algorithm in this order: ``server_optimizer`` (an argument of the
    factory), ``attack`` (:func:`fedjax_lab.algorithms.with_attack`), ``compression``
    (:func:`~fedjax_lab.algorithms.with_compression`), then ``aggregator``
    (:func:`~fedjax_lab.algorithms.with_aggregator`) or ``privacy``
    (:func:`~fedjax_lab.algorithms.with_privacy`). The algorithm is named by its ``label``.

    Example:
      >>> import jax.numpy as jnp
      >>> spec = {"name": "fedadam", "label": "robust", "server_learning_rate": 0.03,
      ...         "aggregator": {"name": "trimmed_mean", "trim_fraction": 0.1},
      ...         "attack": {"name": "sign_flip", "fraction": 0.1, "num_clients": 100},
      ...         "compression": {"name": "top_k", "fraction": 0.1, "error_feedback": "ef"}}
      >>> alg = build_algorithm(spec, lambda p, b, k: jnp.sum(p ** 2))
      >>> alg.name, alg.aggregator.reduce, alg.init(jnp.zeros(3), 100).client_states[1].shape
      ('robust', 'stack', (100, 3))
    """
    from fedjax_lab import aggregators as aggregators_lib
    from fedjax_lab import algorithms as algorithms_lib
    from fedjax_lab import attacks as attacks_lib
    from fedjax_lab import compression as compression_lib

    own = ("name", "label", "client_optimizer", "client_learning_rate")
    hp = {k: v for k, v in spec.items() if k not in own and not _is_part(k, v)}
    spec = {k: v for k, v in spec.items() if k in own or _is_part(k, v)}
    label = spec.get("label", spec["name"])
    if client_sizes is None and train_data is not None:
        client_sizes = train_data.client_sizes
    for key in PER_CLIENT_KEYS:
        if key == "max_local_steps" and _is_budget_table(hp.get(key)):
            hp[key] = _budget_sampler(f"{label}.{key}", hp[key], client_sizes)
        elif key in hp:
            hp[key] = _per_client(f"{label}.{key}", hp[key], client_sizes,
                                  whole=key == "max_local_steps")
    make_opt = _CLIENT_OPTIMIZERS[spec.get("client_optimizer", "sgd")]
    lr = spec.get("client_learning_rate", 0.1)
    if _is_per_client_table(lr):
        if spec.get("client_optimizer", "sgd") != "sgd":
            raise ConfigError(f"{label}.client_learning_rate: a per-client rate is plain SGD; "
                              "use client_optimizer = 'sgd'.")
        if "client_learning_rate" not in REGISTRY.options(spec["name"]):
            raise ConfigError(f"{label}.client_learning_rate: {spec['name']!r} takes no "
                              "per-client rate; give a number.")
        hp["client_learning_rate"] = _per_client(f"{label}.client_learning_rate", lr,
                                                 client_sizes)
        client_optimizer = None
    else:
        client_optimizer = make_opt(lr)
    if "server_optimizer" in spec:
        hp["server_optimizer"] = _server_optimizer_from(spec["server_optimizer"])
    if "name" in REGISTRY.options(spec["name"]):
        hp.setdefault("name", label)
    alg = REGISTRY[spec["name"]](loss_fn, client_optimizer=client_optimizer, **hp)
    if "attack" in spec:
        attack, selection = _built_part(attacks_lib.REGISTRY, spec["attack"], _ATTACK_SELECTION)
        alg = algorithms_lib.with_attack(alg, attack, **selection)
    if "compression" in spec:
        compressor, own_opts = _built_part(compression_lib.REGISTRY, spec["compression"],
                                           _COMPRESSION_OWN)
        alg = algorithms_lib.with_compression(alg, compressor, **own_opts)
    if "aggregator" in spec:
        table = spec["aggregator"]
        if table["name"] == FLTRUST:
            aggregator = _fltrust_from(f"{label}.aggregator", table, spec, loss_fn, train_data)
        else:
            aggregator = aggregators_lib.from_name(
                table["name"], **{k: v for k, v in table.items() if k != "name"})
        alg = algorithms_lib.with_aggregator(alg, aggregator)
    if "privacy" in spec:
        alg = algorithms_lib.with_privacy(alg, **spec["privacy"])
    return alg._replace(name=label)


def client_map_from(training: dict[str, Any]) -> ClientMap:
    """The client map a ``[training]`` table names."""
    name = training["client_map"]
    if name == "chunked":
        return maps_lib.chunked(training.get("chunk_size", 32))
    if name == "sharded":
        return maps_lib.sharded()
    return getattr(maps_lib, name)()


def _check_inferred_classes(train: FederatedData, test: FederatedData, num_classes: int) -> None:
    """Refuses an inferred ``num_classes`` that most classes never reach (a stray label)."""
    y = np.concatenate([np.asarray(train.examples["y"]).ravel(),
                        np.asarray(test.examples["y"]).ravel()])
    present = np.unique(y)
    if num_classes >= 4 and present.size * 2 < num_classes:
        top = int(present[-1])
        in_train = bool(np.any(np.asarray(train.examples["y"]) == top))
        holder, split = (train, "train") if in_train else (test, "test")
        row = int(np.argmax(np.asarray(holder.examples["y"]).ravel() == top))
        client = int(np.searchsorted(holder.offsets, row, side="right") - 1)
        raise ConfigError(
            f"model.num_classes: not set, so inferred as the largest label + 1 = {num_classes}, "
            f"but only {present.size} distinct labels occur (the largest, {top}, is held by "
            f"client {client} of the {split} split); fix that label, or set model.num_classes "
            "explicitly if the classes really are that sparse."
        )


def build(config: dict[str, Any]) -> Experiment:
    """Loads the data and builds the model, loss, metrics, algorithms and client map.

    Hyper-parameters are checked here too (each factory validates its own), and both data
    splits against the model (:func:`fedjax_lab.models.check_data`: the keys the loss reads,
    the example shape, labels integers in ``[0, num_classes)``), still before anything
    compiles. When ``model.num_classes`` is not set it is inferred as the largest label + 1,
    and refused when fewer than half of those classes occur (one stray label such as 99 would
    otherwise silently widen the model).
    """
    cfg = validate(config)
    train, test = _load_data(cfg["data"])
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "name"}
    name = cfg["model"]["name"]
    pad_id = None
    text = _text_task(cfg["data"])
    for split, d in (("train", train), ("test", test)):
        try:
            d.check_keys(["x", "y"], needed_by=f"the model ({split} split)")
        except ValueError as e:
            raise ConfigError(f"data ({split}): {e}") from e
    inferred = False
    if text is not None:
        vocab_size, pad_id = text
        model_cfg.setdefault("vocab_size", vocab_size)
        if "max_len" in _factory_params(_MODELS[name]):  # learned positions: the window length
            model_cfg.setdefault("max_len", int(train.examples["x"].shape[1]))
    else:
        input_shape = tuple(train.examples["x"].shape[1:])
        num_classes = int(max(np.max(train.examples["y"]), np.max(test.examples["y"]))) + 1
        inferred = "num_classes" not in model_cfg
        model_cfg.setdefault("num_classes", max(num_classes, 1))
        model_cfg.setdefault("input_shape", input_shape)
    model = _MODELS[name](**model_cfg)
    loss_fn = models_lib.classification_loss(model, pad_id=pad_id)
    eval_fn = models_lib.classification_metrics(model, pad_id=pad_id)
    for split, d in (("train", train), ("test", test)):
        try:
            loss_fn.check_data(d)
        except ValueError as e:
            raise ConfigError(f"data ({split}): {e}") from e
    if inferred:
        _check_inferred_classes(train, test, model_cfg["num_classes"])
    algorithms = {}
    for spec in cfg["algorithms"]:
        try:
            algorithms[spec.get("label", spec["name"])] = build_algorithm(
                spec, loss_fn, client_sizes=train.client_sizes, train_data=train
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algorithms ({spec['name']}): {e}") from e
    if cfg["training"]["cohort_size"] > train.num_clients:
        raise ConfigError(
            f"training.cohort_size: {cfg['training']['cohort_size']} is more than the "
            f"{train.num_clients} clients of the data; use <= {train.num_clients}."
        )
    delta = (cfg.get("privacy") or {}).get("delta", DEFAULT_DELTA)
    private = any(_is_private(spec) for spec in cfg["algorithms"])
    if private and not (
        delta < 1.0 / train.num_clients
    ):
        raise ConfigError(
            f"privacy.delta: {delta!r} is not below 1 / num_clients = 1/{train.num_clients}; "
            "such a delta allows one client's data to leak outright. Use e.g. 1e-5 or "
            "num_clients ** -1.1."
        )
    sampler_cfg = dict(cfg.get("sampler") or {"name": "uniform"})
    try:
        sampler = _SAMPLERS[sampler_cfg.pop("name")](**sampler_cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler: {e}") from e
    return Experiment(cfg, train, test, model, loss_fn, eval_fn, algorithms,
                      client_map_from(cfg["training"]), sampler)


# ------------------------------------------------------------------ the config reference


_OWN_KEYS = ("name", "label", "client_optimizer", "client_learning_rate")
_PART_HINT = {
    "server_optimizer": "an [algorithms.server_optimizer] table",
    "aggregator": "an [algorithms.aggregator] table",
}
_FILE_DATASET_KEYS = {
    "tff_h5": ("train_path: str (required)", "test_path: str (required)",
               f"task: str (required); allowed: {_allowed(datasets_lib.TFF_TASKS)}",
               "seq_len: int", "vocab_size: int (task 'stackoverflow')",
               "vocab_path: str (task 'stackoverflow')",
               "max_sentences_per_client: int (task 'stackoverflow')"),
    "leaf": ("train_path: str (required)", "test_path: str (required)", "seq_len: int"),
}
_SPEC_ALLOWED = {
    ("training", "client_map"): _MAPS,
    ("training", "weighting"): ("num_examples", "uniform"),
    ("training", "data_on"): _DATA_ON,
    ("privacy", "accountant"): _ACCOUNTANTS,
}
_SPEC_DEFAULTS = {
    ("training", "weighting"): "num_examples",
    ("training", "seeds"): 1,
    ("training", "data_on"): "device",
    ("privacy", "delta"): DEFAULT_DELTA,
    ("privacy", "accountant"): "best",
    ("evaluation", "personalized"): True,
    ("evaluation", "fine_tune_steps"): 0,
    ("evaluation", "fine_tune_learning_rate"): 0.1,
    ("evaluation", "fine_tune_batch_size"): 10,
}


def _plain(text: str) -> str:
    """Docstring text without reST markup: ``x`` -> x, :func:`~a.b` -> a.b."""
    import re

    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _summary(factory) -> str:
    doc = inspect.getdoc(factory) or ""
    return _plain(" ".join(doc.split("\n\n")[0].split()))


def _param_line(name: str, p: inspect.Parameter, hint: str = "") -> str:
    kind = p.annotation if p.annotation is not inspect.Parameter.empty else ""
    if isinstance(kind, type):
        kind = kind.__name__
    line = f"{name}: {kind}" if kind else name
    line += " (required)" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
    return line + (f"  ({hint})" if hint else "")


def _factory_lines(factory, skip: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> list[str]:
    params = [(k, p) for k, p in inspect.signature(factory).parameters.items()
              if k not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [_param_line(k, p) for k, p in params] + list(extra) or ["(no options)"]


def _spec_lines(section: str, spec: dict) -> list[str]:
    defaults = DEFAULT_CONFIG.get(section, {})
    out = []
    for key, (kind, minimum) in spec.items():
        line = f"{key}: {kind.__name__}"
        default = defaults.get(key, _SPEC_DEFAULTS.get((section, key), _MISSING_DEFAULT))
        line += " (unset)" if default is _MISSING_DEFAULT else f" = {default!r}"
        if minimum is not None:
            line += f"; >= {minimum}"
        if (section, key) in _SPEC_ALLOWED:
            line += f"; allowed: {_allowed(_SPEC_ALLOWED[section, key])}"
        out.append(line)
    return out


_MISSING_DEFAULT = object()


def _algorithm_lines(name: str) -> list[str]:
    factory = REGISTRY[name]
    lines = [f"{name}: {_summary(factory)}"]
    for key, p in REGISTRY.options(name, skip=("loss_fn", "client_optimizer")).items():
        if key in _OWN_KEYS and key not in PER_CLIENT_KEYS:
            continue
        hint = _PART_HINT.get(key, "")
        if key in PER_CLIENT_KEYS:
            hint = ("or per client: {per_client = [one value per client]} or "
                    "{per_client = 'size', scale = s, power = p}")
        if key == "max_local_steps":
            hint += ("; or drawn each round: {sample = 'straggler', fraction = p, max_steps = "
                     "E}, {sample = 'uniform', low = a, high = b}, {sample = 'speed', "
                     "max_steps = E, speeds = [one per client] or sigma = s, seed = 0, "
                     "jitter = 0.0}")
        lines.append("    " + _param_line(key, p, hint))
    return lines


def _registry_block(title: str, registry, extra: tuple[str, ...] = ()) -> list[str]:
    lines = [title]
    for name in sorted(registry):
        opts = [_param_line(k, p) for k, p in registry.options(name).items()]
        lines.append(f"  name = {name!r}: " + ("; ".join(opts + list(extra)) or "(no options)"))
    return lines


def reference(algorithm: str | None = None) -> str:
    """Every section and key a config accepts, with type, default and allowed values.

    Read from the code itself, so it cannot drift from :func:`validate`: datasets, models,
    samplers, algorithms and part tables from their registries and factory signatures, the
    ``[training]``, ``[evaluation]``, ``[checkpoint]`` and ``[privacy]`` keys from the specs
    :func:`validate` checks against. With ``algorithm``, only that algorithm's entry (its
    docstring summary and hyper-parameters). ``fedjax-lab config --reference`` prints it.

    Example:
      >>> print(reference("fedprox").splitlines()[0])
      [[algorithms]] name = 'fedprox'
      >>> "mu: float = 0.01" in reference("fedprox")
      True
    """
    common = [
        "  name: str (required); allowed: " + _allowed(REGISTRY),
        "  label: str = name (the run's name in outputs; unique per config)",
        f"  client_optimizer: str = 'sgd'; allowed: {_allowed(_CLIENT_OPTIMIZERS)}",
        "  client_learning_rate: float = 0.1; > 0",
        f"  part tables: {', '.join(f'[algorithms.{k}]' for k in PARTS)} (see below)",
    ]
    if algorithm is not None:
        if algorithm not in REGISTRY:
            raise ConfigError(f"--algorithm: got {algorithm!r}; allowed: {_allowed(REGISTRY)}.")
        return "\n".join([f"[[algorithms]] name = {algorithm!r}", *common[1:4],
                          *("  " + line for line in _algorithm_lines(algorithm))]) + "\n"
    from fedjax_lab import aggregators as aggregators_lib
    from fedjax_lab import attacks as attacks_lib
    from fedjax_lab import compression as compression_lib
    from fedjax_lab import server as server_lib
    from fedjax_lab.algorithms import with_privacy

    out = ["fedjax-lab config reference: every section and key (type = default; allowed).", ""]
    out.append(f"name: str = {DEFAULT_CONFIG['name']!r}")
    out += ["", "[data]",
            f"  name: str = {DEFAULT_CONFIG['data']['name']!r}; allowed: "
            + _allowed(tuple(datasets_lib.DATASETS) + _FILE_DATASETS)]
    for name in sorted(datasets_lib.DATASETS):
        out.append(f"  name = {name!r}:")
        out += ["    " + line for line in _factory_lines(datasets_lib.DATASETS[name])]
    out.append(f"  partition: allowed: {_allowed(datasets_lib.PARTITIONS)}")
    for name, keys in _FILE_DATASET_KEYS.items():
        out.append(f"  name = {name!r}:")
        out += ["    " + k for k in keys]
    out += ["", "[model]",
            f"  name: str = {DEFAULT_CONFIG['model']['name']!r}; allowed: {_allowed(_MODELS)}",
            "  (input_shape, num_classes, vocab_size, max_len: inferred from the data when not "
            "set)"]
    for name in sorted(_MODELS):
        out.append(f"  name = {name!r}:")
        out += ["    " + line for line in _factory_lines(_MODELS[name])]
    out += ["", "[sampler]", f"  name: str = 'uniform'; allowed: {_allowed(_SAMPLERS)}"]
    for name in sorted(_SAMPLERS):
        out.append(f"  name = {name!r}:")
        out += ["    " + line for line in _factory_lines(_SAMPLERS[name])]
    for section, spec in (("training", _TRAINING), ("evaluation", _EVALUATION),
                          ("checkpoint", _CHECKPOINT), ("privacy", _PRIVACY)):
        out += ["", f"[{section}]", *("  " + line for line in _spec_lines(section, spec))]
        if section == "training":
            out.append("  (seeds = S > 1: the seeds seed, seed + 1, ..., seed + S - 1 run as one "
                       "compiled program; final metrics as mean ± 95% CI)")
            out.append("  (data_on = 'host', fedjax-lab run: the examples stay in host memory and "
                       "each round's cohort is streamed to the device; under several processes "
                       "each loads only the clients of its own devices)")
        if section == "evaluation":
            out.append("  (personalized: for the algorithms whose clients keep their own model "
                       "(apfl, ditto, fedbn, fedper, fedrep, ifca, lg_fedavg, pfedme) the summary "
                       "adds personalized_accuracy_mean, each test client on its own model; "
                       "fine_tune_steps > 0: every algorithm's summary adds "
                       "fine_tuned_accuracy_mean, the final model fine-tuned that many SGD steps "
                       "on each client's own training data, then tested on its own test data)")
        if section == "checkpoint":
            out.append("  (checkpoint.every must be a multiple of evaluation.every)")
    out += ["", "[[algorithms]] (one table per run)", *common, "  hyper-parameters by name:"]
    for name in sorted(REGISTRY):
        out += ["    " + line for line in _algorithm_lines(name)]
    out += ["", *_registry_block("[algorithms.aggregator]", aggregators_lib.REGISTRY),
            f"  name = {FLTRUST!r}: root_examples: int = 100; root_batch_size: int = 10; "
            "root_steps: int = one pass over the root set; root_learning_rate: float = the "
            "entry's client_learning_rate; root_seed: int = 0  (FLTrust; its root set is a "
            "seeded sample of the training examples, not held out from the clients)"]
    out += ["", *_registry_block("[algorithms.attack]", attacks_lib.REGISTRY,
                                 tuple(f"{k} (selection)" for k in _ATTACK_SELECTION))]
    out += ["", *_registry_block("[algorithms.compression]", compression_lib.REGISTRY,
                                 _COMPRESSION_OWN)]
    out += ["", "[algorithms.privacy] (not with [algorithms.aggregator])"]
    out += ["  " + line for line in _factory_lines(with_privacy, skip=("alg",))]
    out += ["", *_registry_block("[algorithms.server_optimizer]", server_lib.REGISTRY),
            "  rules: list of tables {match = 'regex over the leaf path', name = ..., ...}"]
    out += ["", "[sweep] (fedjax-lab sweep)",
            "  algorithm: str = the first [[algorithms]] entry's name",
            "  seeds: list of int = [training.seed]",
            "  <hyper-parameter>: list of numbers, one axis each (client_learning_rate, a "
            "numeric hyper-parameter of the algorithm, e.g. server_learning_rate or mu)"]
    return "\n".join(out) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _tomlable(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_tomlable(v) for v in value)
    return isinstance(value, (bool, int, float, str)) and not (
        isinstance(value, float) and not math.isfinite(value))


# Hyper-parameters without a usable default on the default experiment (digits: 10 classes,
# client learning rate 0.1); the starter config sets them. The test of starter_config loads the
# config of every registered algorithm, so a new one that needs an entry here is noticed.
_STARTER_VALUES = {
    "feddisco": {"num_classes": (10, "the digits data has 10 classes")},
    "qffl": {"lipschitz": (10.0, "1 / client_learning_rate")},
}


def starter_config(algorithm: str) -> str:
    """A commented starter TOML config running ``algorithm`` on the default experiment.

    Every hyper-parameter of the algorithm is listed with its default (commented out), and
    the text loads with :func:`load_config` as it is. ``fedjax-lab config --init NAME`` prints
    it (or writes it with ``--out FILE``).

    Example:
      >>> text = starter_config("fedprox")
      >>> "# mu = 0.01" in text
      True
      >>> validate(tomllib.loads(text))["algorithms"][0]["name"]
      'fedprox'
    """
    if algorithm not in REGISTRY:
        raise ConfigError(f"--init: got {algorithm!r}; allowed: {_allowed(REGISTRY)}.")
    d = DEFAULT_CONFIG
    lines = [
        f"# fedjax-lab starter config: {algorithm} on the default experiment.",
        f"# {algorithm}: {_summary(REGISTRY[algorithm])}",
        f"# Run it:    fedjax-lab run THIS.toml --out runs/{algorithm}",
        "# Every key: fedjax-lab config --reference",
        "",
        f"name = {_toml(algorithm + ' on ' + d['data']['name'])}",
        "",
        "[data]",
        "# name: " + _allowed(tuple(datasets_lib.DATASETS) + _FILE_DATASETS),
        *(f"{k} = {_toml(v)}" for k, v in d["data"].items()),
        "",
        "[model]",
        "# name: " + _allowed(_MODELS),
        *(f"{k} = {_toml(v)}" for k, v in d["model"].items()),
        "",
        "[training]",
        "# client_map: " + _allowed(_MAPS),
        *(f"{k} = {_toml(v)}" for k, v in d["training"].items()),
        "",
        "[evaluation]",
        *(f"{k} = {_toml(v)}" for k, v in d["evaluation"].items()),
        "",
        "[checkpoint]",
        *(f"{k} = {_toml(v)}" for k, v in d["checkpoint"].items()),
        "",
    ]
    if algorithm in _PRIVATE_ALGORITHMS:
        lines += ["[privacy]", f"delta = {_toml(DEFAULT_DELTA)}",
                  '# accountant: "best" (the smallest epsilon of those that apply), "pld", "rdp"',
                  'accountant = "best"', ""]
    lines += [
        "[[algorithms]]",
        f"name = {_toml(algorithm)}",
        "# client_optimizer: " + _allowed(_CLIENT_OPTIMIZERS),
        'client_optimizer = "sgd"',
        "client_learning_rate = 0.1",
        "# hyper-parameters, at their defaults (uncomment to change):",
    ]
    for key, p in REGISTRY.options(algorithm, skip=("loss_fn", "client_optimizer")).items():
        if key in _OWN_KEYS:
            continue
        kind = p.annotation if isinstance(p.annotation, str) else ""
        if key in _STARTER_VALUES.get(algorithm, {}):
            value, why = _STARTER_VALUES[algorithm][key]
            lines.append(f"{key} = {_toml(value)}  # needed here: {why}")
        elif p.default is not inspect.Parameter.empty and _tomlable(p.default):
            lines.append(f"# {key} = {_toml(p.default)}" + (f"  # {kind}" if kind else ""))
        elif key in _PART_HINT:
            lines.append(f"# {key}: default none; give {_PART_HINT[key]}")
        else:
            lines.append(f"# {key}: {kind or 'value'} (default: none)")
    return "\n".join(lines) + "\n"
