"""fedjax_lab: federated learning on JAX, a round (and many rounds) as one XLA program.

>>> import fedjax_lab as fl
>>> {"fedavg", "fedadam", "fedyogi", "fedprox"} <= set(fl.algorithms.REGISTRY)
True
"""

from fedjax_lab import (
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
    maps,
    metrics,
    models,
    personalization,
    plots,
    privacy,
    robust,
    server,
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
from fedjax_lab.sweep import grid, sweep

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
    "server",
    "sweep",
    "tree",
]
