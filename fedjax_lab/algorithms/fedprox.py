"""FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term to their loss."""

from __future__ import annotations

import optax

from fedjax_lab import kit
from fedjax_lab._types import Aggregator, FederatedAlgorithm, LossFn
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.fedavg import fed_opt_core

__all__ = ["fed_prox"]


@register("fedprox")
def fed_prox(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    mu: float = 0.01,  # or a kit.PerClient
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    client_learning_rate: float | kit.PerClient | None = None,
    max_local_steps: int | kit.PerClient | kit.BudgetSampler | None = None,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fedprox",
) -> FederatedAlgorithm:
    """FedProx: each client minimises ``F_i(w) + (mu / 2) * ||w - w_t||^2`` from ``w_t``.

    The proximal term keeps local models near the server model ``w_t`` under heterogeneous data
    and unequal local work; with ``mu = 0`` it is exactly FedAvg. The server step is
    ``server_optimizer`` on the mean delta (default ``fed_sgd(server_learning_rate)``, plain
    averaging at 1.0).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      mu: proximal coefficient ``μ >= 0`` (the paper tunes it in {0.001, 0.01, 0.1, 1}), or one
        per client (:func:`fedjax_lab.kit.per_client`).
      server_optimizer: server optimiser (default :func:`fedjax_lab.server.fed_sgd`).
      server_learning_rate: the FedSGD rate when ``server_optimizer`` is ``None``.
      client_learning_rate: instead of ``client_optimizer``: local SGD at this rate (scalar or
        per client), as in :func:`~fedjax_lab.algorithms.fed_opt`.
      max_local_steps: cap on each client's real local steps (a whole number or per client),
        or FedProx's unequal local work drawn each round: ``kit.straggler_budget(p, E)`` (a
        fraction ``p`` of the cohort does ``U{1..E}`` steps, the rest ``E``; the paper's
        systems-heterogeneity experiments), or another :class:`~fedjax_lab.kit.BudgetSampler`.
      aggregator: how client deltas are combined (default weighted mean).
      unroll: ``lax.scan`` unroll of the local steps.
      skip_empty_steps: see :func:`fedjax_lab.client.local_loop`.
      name: a label for logs and tables.

    References:
      Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = fl.algorithms.fed_prox(lambda p, b, k: jnp.sum(p ** 2), mu=0.1)
      >>> alg.name
      'fedprox'
      >>> stragglers = fl.kit.straggler_budget(0.5, 20)  # half the cohort does U{1..20} steps
      >>> fl.algorithms.fed_prox(lambda p, b, k: jnp.sum(p ** 2), max_local_steps=stragglers).name
      'fedprox'
    """
    return fed_opt_core(
        loss_fn, client_optimizer, server_optimizer, server_learning_rate=server_learning_rate,
        client_learning_rate=client_learning_rate, max_local_steps=max_local_steps,
        aggregator=aggregator, regularizer=None, mu=mu, unroll=unroll,
        skip_empty_steps=skip_empty_steps, name=name,
    )
