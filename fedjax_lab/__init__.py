"""fedjax_lab: federated learning on JAX, a round (and many rounds) as one XLA program.

>>> import fedjax_lab as fl
>>> {"fedavg", "fedadam", "fedyogi", "fedprox"} <= set(fl.algorithms.REGISTRY)
True
"""

from fedjax_lab import (
    aggregators,
    algorithms,
    attacks,
    client,
    compression,
    data,
    distributed,
    kit,
    maps,
    metrics,
    models,
    personalization,
    plots,
    privacy,
    robust,
    server,
    sweep,
    tree,
)
from fedjax_lab._types import (
    Aggregator,
    ClientInput,
    ClientMap,
    ClientOutput,
    ClientSampler,
    Cohort,
    FederatedAlgorithm,
    ServerState,
)
from fedjax_lab.data import FederatedData, datasets, partition
from fedjax_lab.metrics import evaluate
from fedjax_lab.rounds import client_state_bytes, run_round, run_rounds
from fedjax_lab.sweep import grid
from fedjax_lab.sweep import sweep as run_sweep

_LAZY = ("checkpoint", "cli", "experiment")  # orbax-checkpoint and the CLI load on first use


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"fedjax_lab.{name}")
    raise AttributeError(f"module 'fedjax_lab' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ClientInput",
    "ClientMap",
    "ClientOutput",
    "ClientSampler",
    "Cohort",
    "FederatedAlgorithm",
    "FederatedData",
    "ServerState",
    "aggregators",
    "algorithms",
    "attacks",
    "checkpoint",
    "cli",
    "client_state_bytes",
    "client",
    "compression",
    "data",
    "datasets",
    "distributed",
    "evaluate",
    "experiment",
    "grid",
    "kit",
    "maps",
    "metrics",
    "models",
    "partition",
    "personalization",
    "plots",
    "privacy",
    "robust",
    "run_round",
    "run_rounds",
    "run_sweep",
    "server",
    "sweep",
    "tree",
]
