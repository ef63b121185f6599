"""FedAvg and FedOpt: local optax training, weighted mean, a server optax step.

FedOpt (Reddi et al., ICLR 2021, Algorithm 1) generalises FedAvg (McMahan et al., AISTATS 2017):
each client trains locally from the server model ``x`` and sends ``Δ_i = x - x_i``; the server
feeds the weighted mean ``g = Σ p_i Δ_i`` (a pseudo-gradient) to an unmodified optax optimiser.
FedAvg is the special case ``server_optimizer = fed_sgd(1.0)``: ``x <- x - g = Σ p_i x_i``.

A stateful model's BatchNorm statistics are part of its params (``{"params", "batch_stats"}``,
see :class:`fedjax_lab.models.Model`): each client's local training updates them, and FedAvg
sets the server's to the weighted mean ``Σ p_i s_i`` of the clients' (plain FedAvg over a
BatchNorm model); any other server optimiser moves them by the mean delta like every other
entry. :func:`fedjax_lab.algorithms.fed_bn` keeps them on the clients instead.
"""

from __future__ import annotations

import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab import kit
from fedjax_lab import server as server_lib
from fedjax_lab._types import (
    Aggregator,
    ClientInput,
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    Params,
    PRNGKey,
    ServerState,
)
from fedjax_lab.algorithms._registry import register
from fedjax_lab.client import Regularizer, proximal

__all__ = ["fed_adagrad", "fed_adam", "fed_avg", "fed_avgm", "fed_opt", "fed_yogi"]


@register("fedopt")
def fed_opt(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    *,
    server_learning_rate: float = 1.0,
    client_learning_rate: float | kit.PerClient | None = None,
    max_local_steps: int | kit.PerClient | kit.BudgetSampler | None = None,
    aggregator: Aggregator | None = None,
    regularizer: Regularizer | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fed_opt",
) -> FederatedAlgorithm:
    """FedOpt: local training with ``client_optimizer``, ``server_optimizer`` on the mean delta.

    Update rule (round t, cohort S):

    * client i: ``x_i = LocalTrain(x_t)`` over its batches; sends ``Δ_i = x_t - x_i`` and its
      weight ``w_i`` (examples held, from the cohort);
    * server: ``g_t = Σ w_i Δ_i / Σ w_i``; ``x_{t+1} = x_t + server_optimizer(g_t)``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: optax client optimiser (``None``: ``optax.sgd(0.1)``).
      server_optimizer: optax transformation fed the pseudo-gradient (see
        :mod:`fedjax_lab.server`); ``None``: ``fl.server.fed_sgd(server_learning_rate)``.
      server_learning_rate: the FedSGD rate when ``server_optimizer`` is ``None``.
      client_learning_rate: instead of ``client_optimizer``: plain local SGD at this rate
        (``> 0``), or at a per-client rate (:func:`fedjax_lab.kit.per_client`, each ``>= 0``;
        a client of rate 0 sends a zero delta).
      max_local_steps: optional cap on each client's real local steps (``>= 0``; a whole
        number, a :func:`fedjax_lab.kit.per_client` budget, or a
        :class:`~fedjax_lab.kit.BudgetSampler` drawing each client's budget each round, e.g.
        :func:`fedjax_lab.kit.straggler_budget`); ``None``: no cap.
      aggregator: how client deltas are combined (default
        :func:`fedjax_lab.aggregators.weighted_mean`).
      regularizer: optional local regulariser ``(params, server_params) -> scalar``.
      unroll: ``lax.scan`` unroll of the local steps (``True`` = fully unrolled).
      skip_empty_steps: see :func:`fedjax_lab.client.local_training`.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`.

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

    Example:
      >>> import jax.numpy as jnp, optax, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fl.algorithms.fed_opt(loss, optax.sgd(0.1), fl.server.fed_adam(0.01))
      >>> state = alg.init(jnp.zeros(3))
      >>> int(state.round)
      0
    """
    return fed_opt_core(
        loss_fn, client_optimizer, server_optimizer, server_learning_rate=server_learning_rate,
        client_learning_rate=client_learning_rate, max_local_steps=max_local_steps,
        aggregator=aggregator, regularizer=regularizer, unroll=unroll,
        skip_empty_steps=skip_empty_steps, name=name,
    )


def fed_opt_core(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None,
    server_optimizer: optax.GradientTransformation | None,
    *,
    server_learning_rate: float,
    client_learning_rate: float | kit.PerClient | None,
    max_local_steps: int | kit.PerClient | kit.BudgetSampler | None,
    aggregator: Aggregator | None,
    regularizer: Regularizer | None,
    unroll: int | bool,
    skip_empty_steps: bool,
    name: str,
    mu: float | kit.PerClient | None = None,
) -> FederatedAlgorithm:
    """:func:`fed_opt`, and FedProx's proximal ``mu`` (scalar or per client) when given."""
    kit.check_loss_fn(loss_fn)
    client_optimizer = kit.client_optimizer_or_rates(client_optimizer, client_learning_rate)
    lr_per_client = client_optimizer is None
    kit.check_step_budget("max_local_steps", max_local_steps)
    if mu is not None:
        if regularizer is not None:
            raise ValueError("mu: give either mu (the proximal term) or a regularizer, not both.")
        if isinstance(mu, kit.PerClient):
            kit.check_positive("mu", mu, allow_zero=True, hint=" (the proximal coefficient)")
        else:
            regularizer = proximal(mu)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregator if aggregator is not None else aggregators_lib.weighted_mean()
    per_client = {"client_learning_rate": client_learning_rate,
                  "max_local_steps": max_local_steps, "mu": mu}
    options = dict(unroll=unroll, skip_empty_steps=skip_empty_steps)
    if lr_per_client or isinstance(mu, kit.PerClient):
        train = None  # built per client, from its own rate and mu
    else:
        train = kit.local_training(loss_fn, client_optimizer, regularizer=regularizer, **options)

    def client_train(client_id):
        if train is not None:
            return train
        lr, mu_i = kit.for_client((client_learning_rate, mu), client_id)
        opt = optax.sgd(lr) if lr_per_client else client_optimizer
        reg = proximal(mu_i) if isinstance(mu, kit.PerClient) else regularizer
        return kit.local_training(loss_fn, opt, regularizer=reg, **options)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        kit.check_per_client(kit.check_num_clients(num_clients), **per_client)
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        steps = kit.client_budget(max_local_steps, client.client_id, key)
        result = client_train(client.client_id)(state.params, client.batches, key,
                                                max_steps=steps)
        metrics = {**result.metrics, **kit.budget_metrics(max_local_steps, steps, client.weight)}
        return ClientOutput(kit.client_delta(state.params, result.params), client.weight,
                            metrics, ())

    server_update = kit.server_step(server_optimizer)
    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn, **per_client))


@register("fedavg")
def fed_avg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    client_learning_rate: float | kit.PerClient | None = None,
    max_local_steps: int | kit.PerClient | kit.BudgetSampler | None = None,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fedavg",
) -> FederatedAlgorithm:
    """FedAvg (McMahan et al. 2017): local SGD, then ``x <- x - η_g Σ p_i (x - x_i)``.

    With ``server_learning_rate = η_g = 1`` the new model is the weighted average of the client
    models. Any other server optimiser may take the mean delta (that is :func:`fed_opt`).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_optimizer: the server optimiser (default ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``η_g`` (1.0 = plain averaging).
      client_learning_rate: instead of ``client_optimizer``: local SGD at this rate, or at a
        per-client rate (:func:`fedjax_lab.kit.per_client`), as in :func:`fed_opt`.
      max_local_steps: cap on each client's real local steps (a whole number, per client, or
        sampled each round: :class:`~fedjax_lab.kit.BudgetSampler`).
      aggregator: how client deltas are combined (default weighted mean).
      unroll: ``lax.scan`` unroll of the local steps.
      skip_empty_steps: see :func:`fedjax_lab.client.local_loop`.
      name: a label for logs and tables.

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = fl.algorithms.fed_avg(lambda p, b, k: jnp.sum(p ** 2))
      >>> alg.name
      'fedavg'
      >>> lrs = fl.kit.per_client([0.1, 0.0, 0.3])  # client 1 does not move
      >>> fl.algorithms.fed_avg(lambda p, b, k: jnp.sum(p ** 2), client_learning_rate=lrs).name
      'fedavg'
    """
    return fed_opt(
        loss_fn, client_optimizer, server_optimizer, server_learning_rate=server_learning_rate,
        client_learning_rate=client_learning_rate, max_local_steps=max_local_steps,
        aggregator=aggregator, unroll=unroll, skip_empty_steps=skip_empty_steps, name=name,
    )


def _fedopt_with(server_optimizer, loss_fn, client_optimizer, aggregator, unroll,
                 skip_empty_steps, name) -> FederatedAlgorithm:
    return fed_opt(loss_fn, client_optimizer, server_optimizer, aggregator=aggregator,
                   unroll=unroll, skip_empty_steps=skip_empty_steps, name=name)


@register("fedadam")
def fed_adam(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    server_learning_rate: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    bias_correction: bool = False,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fedadam",
) -> FederatedAlgorithm:
    """FedAdam (Reddi et al. 2021): FedOpt with :func:`fedjax_lab.server.fed_adam`.

    Reddi form (Algorithm 2): ``Δ_t = b1 Δ_{t-1} + (1 - b1) mean_i Δ_i``,
    ``v_t = b2 v_{t-1} + (1 - b2) Δ_t²`` (``v_{-1} = τ²``), ``x <- x + η Δ_t / (√v_t + τ)``;
    ``bias_correction=True`` gives the optax/Keras form.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_learning_rate: the server optimiser's ``lr`` (``η`` of the paper).
      b1: ``β₁``, the momentum of the mean delta.
      b2: ``β₂``, the decay of the second moment.
      tau: ``τ``, the adaptivity (it also sets ``v_{-1} = τ²``).
      bias_correction: the optax/Keras form instead of the paper's.
      aggregator: how client deltas are combined (default weighted mean).
      unroll: ``lax.scan`` unroll of the local steps.
      skip_empty_steps: see :func:`fedjax_lab.client.local_loop`.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`: :func:`fed_opt` with this server optimiser
      (it fixes the server optimiser; for another one use :func:`fed_opt` or ``fed_avg``'s
      ``server_optimizer``).

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

    Example:
      >>> import jax.numpy as jnp
      >>> fed_adam(lambda p, b, k: jnp.sum(p ** 2), server_learning_rate=0.03).name
      'fedadam'
    """
    server = server_lib.fed_adam(server_learning_rate, b1, b2, tau,
                                 bias_correction=bias_correction)
    return _fedopt_with(server, loss_fn, client_optimizer, aggregator, unroll, skip_empty_steps,
                        name)


@register("fedyogi")
def fed_yogi(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    server_learning_rate: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    bias_correction: bool = False,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fedyogi",
) -> FederatedAlgorithm:
    """FedYogi (Reddi et al. 2021): FedOpt with :func:`fedjax_lab.server.fed_yogi`.

    As FedAdam, with Yogi's second moment ``v_t = v_{t-1} - (1 - b2) Δ_t² sign(v_{t-1} - Δ_t²)``.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_learning_rate: the server optimiser's ``lr`` (``η`` of the paper).
      b1: ``β₁``, the momentum of the mean delta.
      b2: ``β₂``, the rate of the second moment.
      tau: ``τ``, the adaptivity (it also sets ``v_{-1} = τ²``).
      bias_correction: the optax/Keras form instead of the paper's.
      aggregator: how client deltas are combined (default weighted mean).
      unroll: ``lax.scan`` unroll of the local steps.
      skip_empty_steps: see :func:`fedjax_lab.client.local_loop`.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`: :func:`fed_opt` with this server optimiser
      (it fixes the server optimiser; for another one use :func:`fed_opt` or ``fed_avg``'s
      ``server_optimizer``).

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

    Example:
      >>> import jax.numpy as jnp
      >>> fed_yogi(lambda p, b, k: jnp.sum(p ** 2)).name
      'fedyogi'
    """
    server = server_lib.fed_yogi(server_learning_rate, b1, b2, tau,
                                 bias_correction=bias_correction)
    return _fedopt_with(server, loss_fn, client_optimizer, aggregator, unroll, skip_empty_steps,
                        name)


@register("fedadagrad")
def fed_adagrad(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    server_learning_rate: float = 1e-2,
    b1: float = 0.0,
    tau: float = 1e-3,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fedadagrad",
) -> FederatedAlgorithm:
    """FedAdagrad (Reddi et al. 2021): FedOpt with :func:`fedjax_lab.server.fed_adagrad`.

    ``v_t = v_{t-1} + Δ_t²`` (``v_{-1} = τ²``), ``x <- x + η Δ_t / (√v_t + τ)``.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_learning_rate: the server optimiser's ``lr`` (``η`` of the paper).
      b1: ``β₁``, the momentum of the mean delta (the paper's Adagrad uses 0).
      tau: ``τ``, the adaptivity.
      aggregator: how client deltas are combined (default weighted mean).
      unroll: ``lax.scan`` unroll of the local steps.
      skip_empty_steps: see :func:`fedjax_lab.client.local_loop`.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`: :func:`fed_opt` with this server optimiser
      (it fixes the server optimiser; for another one use :func:`fed_opt` or ``fed_avg``'s
      ``server_optimizer``).

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

    Example:
      >>> import jax.numpy as jnp
      >>> fed_adagrad(lambda p, b, k: jnp.sum(p ** 2)).name
      'fedadagrad'
    """
    server = server_lib.fed_adagrad(server_learning_rate, b1, tau)
    return _fedopt_with(server, loss_fn, client_optimizer, aggregator, unroll, skip_empty_steps,
                        name)


@register("fedavgm")
def fed_avgm(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    server_learning_rate: float = 1e-2,
    momentum: float = 0.9,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
    name: str = "fedavgm",
) -> FederatedAlgorithm:
    """FedAvgM (Hsu et al. 2019): FedOpt with server momentum :func:`fedjax_lab.server.fed_avgm`.

    ``m <- β m + mean_i Δ_i``, ``x <- x - η m``; the usual setting is
    ``server_learning_rate=1.0, momentum=0.9``.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_learning_rate: the server optimiser's ``lr`` (``η`` of the paper).
      momentum: ``β``, the server momentum.
      aggregator: how client deltas are combined (default weighted mean).
      unroll: ``lax.scan`` unroll of the local steps.
      skip_empty_steps: see :func:`fedjax_lab.client.local_loop`.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`: :func:`fed_opt` with this server optimiser
      (it fixes the server optimiser; for another one use :func:`fed_opt` or ``fed_avg``'s
      ``server_optimizer``).

    References:
      Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
      Visual Classification", 2019.

    Example:
      >>> import jax.numpy as jnp
      >>> fed_avgm(lambda p, b, k: jnp.sum(p ** 2), server_learning_rate=1.0).name
      'fedavgm'
    """
    server = server_lib.fed_avgm(server_learning_rate, momentum=momentum)
    return _fedopt_with(server, loss_fn, client_optimizer, aggregator, unroll, skip_empty_steps,
                        name)
