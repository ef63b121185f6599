"""fedjax_lab: federated learning on JAX, a round (and many rounds) as one XLA program.

Every submodule and public name loads on first use (PEP 562), so ``import fedjax_lab`` itself
imports nothing heavy: JAX loads with the first name that needs it (e.g. ``fl.algorithms``),
and the ``fedjax-lab`` command answers ``--help`` without loading JAX at all.

>>> import fedjax_lab as fl
>>> {"fedavg", "fedadam", "fedyogi", "fedprox"} <= set(fl.algorithms.REGISTRY)
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Submodules, loaded by ``fl.<name>`` (orbax-checkpoint, the CLI and the rest on first use).
_SUBMODULES = (
    "aggregators", "algorithms", "attacks", "checkpoint", "cli", "client", "compression", "data",
    "distributed", "experiment", "kit", "maps", "meta", "metrics", "models", "personalization",
    "plots", "privacy", "robust", "secagg", "server", "sweep", "tree", "valuation",
)
# Public names defined in a submodule: name -> (module, attribute).
_NAMES = {
    **{n: ("fedjax_lab._types", n) for n in (
        "Aggregator", "ClientInput", "ClientMap", "ClientOutput", "ClientSampler", "Cohort",
        "FederatedAlgorithm", "ServerState",
    )},
    "FederatedData": ("fedjax_lab.data", "FederatedData"),
    "datasets": ("fedjax_lab.data", "datasets"),
    "partition": ("fedjax_lab.data", "partition"),
    "evaluate": ("fedjax_lab.metrics", "evaluate"),
    "client_state_bytes": ("fedjax_lab.rounds", "client_state_bytes"),
    "run_round": ("fedjax_lab.rounds", "run_round"),
    "run_rounds": ("fedjax_lab.rounds", "run_rounds"),
    "grid": ("fedjax_lab.sweep", "grid"),
    "run_sweep": ("fedjax_lab.sweep", "sweep"),
}

__all__ = sorted([*_SUBMODULES, *_NAMES], key=lambda n: (n[0].islower(), n.lower()))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"fedjax_lab.{name}")
    elif name in _NAMES:
        module, attr = _NAMES[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'fedjax_lab' has no attribute {name!r}")
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what linters and type checkers see; at run time the names load lazily
    from fedjax_lab import (  # noqa: F401
        aggregators,
        algorithms,
        attacks,
        checkpoint,
        cli,
        client,
        compression,
        data,
        distributed,
        experiment,
        kit,
        maps,
        meta,
        metrics,
        models,
        personalization,
        plots,
        privacy,
        robust,
        secagg,
        server,
        sweep,
        tree,
        valuation,
    )
    from fedjax_lab._types import (  # noqa: F401
        Aggregator,
        ClientInput,
        ClientMap,
        ClientOutput,
        ClientSampler,
        Cohort,
        FederatedAlgorithm,
        ServerState,
    )
    from fedjax_lab.data import FederatedData, datasets, partition  # noqa: F401
    from fedjax_lab.metrics import evaluate  # noqa: F401
    from fedjax_lab.rounds import client_state_bytes, run_round, run_rounds  # noqa: F401
    from fedjax_lab.sweep import grid  # noqa: F401
    from fedjax_lab.sweep import sweep as run_sweep  # noqa: F401
