"""Federated algorithms, one file per family; every one registered in :data:`REGISTRY`.

``REGISTRY[name](loss_fn, client_optimizer=..., **hparams)`` builds an algorithm by short name
("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox"); every other
hyper-parameter has the paper's default.
"""

from fedjax_lab.algorithms._registry import REGISTRY, register
from fedjax_lab.algorithms.fedavg import fed_adagrad, fed_adam, fed_avg, fed_avgm, fed_opt, fed_yogi
from fedjax_lab.algorithms.fedprox import fed_prox

__all__ = [
    "REGISTRY",
    "fed_adagrad",
    "fed_adam",
    "fed_avg",
    "fed_avgm",
    "fed_opt",
    "fed_prox",
    "fed_yogi",
    "register",
]
