"""Federated algorithms, one file per family; every one registered in :data:`REGISTRY`.

``REGISTRY[name](loss_fn, client_optimizer=..., **hparams)`` builds an algorithm by short name
("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox"); every other
hyper-parameter has the paper's default.
"""

from fedjax_lab.algorithms._registry import REGISTRY, register
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.algorithms.dp_fedavg import dp_fed_avg
from fedjax_lab.algorithms.fedau import fed_au
from fedjax_lab.algorithms.fedavg import fed_adagrad, fed_adam, fed_avg, fed_avgm, fed_opt, fed_yogi
from fedjax_lab.algorithms.fedbuff import fed_buff
from fedjax_lab.algorithms.feddisco import fed_disco
from fedjax_lab.algorithms.feddyn import fed_dyn
from fedjax_lab.algorithms.fednova import fed_nova
from fedjax_lab.algorithms.fedprox import fed_prox
from fedjax_lab.algorithms.mime import mime, mime_lite
from fedjax_lab.algorithms.momentum import fed_avg_momentum
from fedjax_lab.algorithms.partial import fed_per, fed_rep
from fedjax_lab.algorithms.perfedavg import per_fedavg
from fedjax_lab.algorithms.pfedme import pfedme
from fedjax_lab.algorithms.qffl import q_fedavg
from fedjax_lab.algorithms.scaffold import scaffold

__all__ = [
    "REGISTRY",
    "ditto",
    "dp_fed_avg",
    "fed_avg_momentum",
    "fed_buff",
    "fed_dyn",
    "fed_nova",
    "mime",
    "mime_lite",
    "scaffold",
    "fed_au",
    "fed_disco",
    "fed_per",
    "fed_rep",
    "per_fedavg",
    "pfedme",
    "q_fedavg",
    "fed_adagrad",
    "fed_adam",
    "fed_avg",
    "fed_avgm",
    "fed_opt",
    "fed_prox",
    "fed_yogi",
    "register",
]
