"""Federated algorithms, one file per family; every one registered in :data:`REGISTRY`.

``REGISTRY[name](loss_fn, client_optimizer=None, **hparams)`` builds an algorithm by its short
name; every factory takes ``loss_fn`` and ``client_optimizer`` and then keyword-only arguments,
among them ``server_optimizer`` (default FedSGD at ``server_learning_rate``; the FedOpt family
``fedadam``/``fedyogi``/``fedadagrad``/``fedavgm`` fixes its own), ``unroll`` and ``name``.

=====================  ===========================================================================
family                 registered names
=====================  ===========================================================================
FedAvg / FedOpt        ``fedavg``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedavgm``,
                       ``fedprox``
client drift           ``scaffold``, ``feddyn``, ``fednova``, ``mime``, ``mimelite``,
                       ``fedavg_momentum``, ``fedsam``
representation,        ``moon`` (model-contrastive), ``fedlc`` (logit calibration),
label skew             ``fedbabu`` (body only, head frozen; fine-tune to personalise)
participation          ``fedau``, ``feddisco``, ``fedbuff``
personalisation        ``ditto``, ``pfedme``, ``fedrep``, ``fedper``, ``perfedavg``, ``apfl``,
                       ``lg_fedavg``, ``fedbn`` (BatchNorm layers kept local)
parameter-efficient    ``fedlora`` (FedIT / FedEx-LoRA: low-rank adapters over a frozen base)
fine-tuning
clustering             ``ifca``
fairness               ``qffl``
privacy, robustness,   ``dp_fedavg``, ``robust_fedavg``, ``fedavg_topk``, ``fedavg_qsgd`` (FedAvg
compression            composed with :func:`with_privacy`, :func:`with_aggregator`,
                       :func:`with_attack`, :func:`with_compression`, which wrap any algorithm);
                       ``dp_ftrl`` (tree-aggregated noise, no sampling assumption)
=====================  ===========================================================================

New algorithms are written from :mod:`fedjax_lab.kit`; see notebook 04.

>>> import fedjax_lab as fl
>>> len(fl.algorithms.REGISTRY) >= 25
True
"""

from fedjax_lab.algorithms._registry import REGISTRY, register
from fedjax_lab.algorithms.apfl import apfl
from fedjax_lab.algorithms.composed import (
    fed_avg_qsgd,
    fed_avg_topk,
    robust_fed_avg,
    with_aggregator,
    with_attack,
    with_compression,
    with_privacy,
)
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.algorithms.dp_fedavg import dp_fed_avg
from fedjax_lab.algorithms.dp_ftrl import FTRLServerState, dp_ftrl
from fedjax_lab.algorithms.fedau import fed_au
from fedjax_lab.algorithms.fedavg import fed_adagrad, fed_adam, fed_avg, fed_avgm, fed_opt, fed_yogi
from fedjax_lab.algorithms.fedbabu import fed_babu
from fedjax_lab.algorithms.fedbuff import fed_buff
from fedjax_lab.algorithms.feddisco import fed_disco
from fedjax_lab.algorithms.feddyn import fed_dyn
from fedjax_lab.algorithms.fedlc import fed_lc
from fedjax_lab.algorithms.fedlora import AGGREGATIONS, LoRAState, fed_lora, lora_uplink_bits
from fedjax_lab.algorithms.fednova import fed_nova
from fedjax_lab.algorithms.fedprox import fed_prox
from fedjax_lab.algorithms.fedsam import fed_sam
from fedjax_lab.algorithms.ifca import ifca
from fedjax_lab.algorithms.mime import mime, mime_lite
from fedjax_lab.algorithms.momentum import fed_avg_momentum
from fedjax_lab.algorithms.moon import moon
from fedjax_lab.algorithms.partial import batch_norm_mask, fed_bn, fed_per, fed_rep, lg_fed_avg
from fedjax_lab.algorithms.perfedavg import per_fedavg
from fedjax_lab.algorithms.pfedme import pfedme
from fedjax_lab.algorithms.qffl import q_fedavg
from fedjax_lab.algorithms.scaffold import scaffold

__all__ = [
    "AGGREGATIONS",
    "REGISTRY",
    "LoRAState",
    "FTRLServerState",
    "apfl",
    "batch_norm_mask",
    "ditto",
    "dp_fed_avg",
    "dp_ftrl",
    "fed_adagrad",
    "fed_adam",
    "fed_au",
    "fed_avg",
    "fed_avg_momentum",
    "fed_avg_qsgd",
    "fed_avg_topk",
    "fed_avgm",
    "fed_babu",
    "fed_bn",
    "fed_buff",
    "fed_disco",
    "fed_dyn",
    "fed_lc",
    "fed_lora",
    "fed_nova",
    "fed_opt",
    "fed_per",
    "fed_prox",
    "fed_rep",
    "fed_sam",
    "fed_yogi",
    "ifca",
    "lg_fed_avg",
    "lora_uplink_bits",
    "mime",
    "mime_lite",
    "moon",
    "per_fedavg",
    "pfedme",
    "q_fedavg",
    "register",
    "robust_fed_avg",
    "scaffold",
    "with_aggregator",
    "with_attack",
    "with_compression",
    "with_privacy",
]
