"""FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term to their loss."""

from __future__ import annotations

import optax

from fedjax_lab import server as server_lib
from fedjax_lab._types import FederatedAlgorithm, LossFn
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.fedavg import fed_opt
from fedjax_lab.client import proximal

__all__ = ["fed_prox"]


@register("fedprox")
def fed_prox(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    mu: float = 0.01,
    server_optimizer: optax.GradientTransformation | None = None,
    **kwargs,
) -> FederatedAlgorithm:
    """FedProx: each client minimises ``F_i(w) + (mu / 2) * ||w - w_t||^2`` from ``w_t``.

    The proximal term keeps local models near the server model ``w_t`` under heterogeneous data
    and unequal local work; with ``mu = 0`` it is exactly FedAvg. The server step is
    ``server_optimizer`` on the mean delta (default ``fed_sgd(1.0)``, plain averaging).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      mu: proximal coefficient ``>= 0`` (the paper tunes it in {0.001, 0.01, 0.1, 1}).
      server_optimizer: server optimiser (default :func:`fedjax_lab.server.fed_sgd` of 1.0).
      **kwargs: passed to :func:`fedjax_lab.algorithms.fed_opt`.

    References:
      Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = fl.algorithms.fed_prox(lambda p, b, k: jnp.sum(p ** 2), mu=0.1)
      >>> alg.name
      'fedprox'
    """
    kwargs.setdefault("name", "fedprox")
    server_optimizer = server_optimizer if server_optimizer is not None else server_lib.fed_sgd(1.0)
    return fed_opt(
        loss_fn, client_optimizer, server_optimizer, regularizer=proximal(mu), **kwargs
    )
