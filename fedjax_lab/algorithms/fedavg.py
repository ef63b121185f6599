"""FedAvg and FedOpt: local optax training, weighted mean, a server optax step.

FedOpt (Reddi et al., ICLR 2021, Algorithm 1) generalises FedAvg (McMahan et al., AISTATS 2017):
each client trains locally from the server model ``x`` and sends ``Δ_i = x - x_i``; the server
feeds the weighted mean ``g = Σ p_i Δ_i`` (a pseudo-gradient) to an unmodified optax optimiser.
FedAvg is the special case ``server_optimizer = fed_sgd(1.0)``: ``x <- x - g = Σ p_i x_i``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab import server as server_lib
from fedjax_lab._types import (
    Aggregator,
    ClientInput,
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    Params,
    PRNGKey,
    PyTree,
    ServerState,
)
from fedjax_lab.algorithms._registry import register
from fedjax_lab.client import Regularizer, local_training

__all__ = ["fed_adagrad", "fed_adam", "fed_avg", "fed_avgm", "fed_opt", "fed_yogi"]

DEFAULT_CLIENT_LEARNING_RATE = 0.1


def _client_optimizer(client_optimizer: optax.GradientTransformation | None):
    if client_optimizer is None:
        return optax.sgd(DEFAULT_CLIENT_LEARNING_RATE)
    if not isinstance(client_optimizer, optax.GradientTransformation):
        raise TypeError(
            "client_optimizer: expected an optax.GradientTransformation such as optax.sgd(0.1), "
            f"got {type(client_optimizer).__name__}."
        )
    return client_optimizer


def fed_opt(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None,
    server_optimizer: optax.GradientTransformation,
    *,
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
        :mod:`fedjax_lab.server`).
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
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(params, batch, key), got {loss_fn!r}."
        )
    client_optimizer = _client_optimizer(client_optimizer)
    if not isinstance(server_optimizer, optax.GradientTransformation):
        raise TypeError(
            "server_optimizer: expected an optax.GradientTransformation such as "
            f"fl.server.fed_adam(1e-2), got {type(server_optimizer).__name__}."
        )
    aggregator = aggregator if aggregator is not None else aggregators_lib.weighted_mean()
    train = local_training(
        loss_fn,
        client_optimizer,
        unroll=unroll,
        regularizer=regularizer,
        skip_empty_steps=skip_empty_steps,
    )

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        result = train(state.params, client.batches, key)
        delta = optax.tree.sub(state.params, result.params)
        return ClientOutput(delta, client.weight, result.metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        updates, opt_state = server_optimizer.update(aggregate, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name)


@register("fedavg")
def fed_avg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    **kwargs,
) -> FederatedAlgorithm:
    """FedAvg (McMahan et al. 2017): local SGD, then ``x <- x - server_lr * Σ p_i (x - x_i)``.

    With ``server_learning_rate=1`` the new model is the weighted average of the client models.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_learning_rate: step on the averaged delta (1.0 = plain averaging).
      **kwargs: passed to :func:`fed_opt` (``unroll``, ``aggregator``, ...).

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = fl.algorithms.fed_avg(lambda p, b, k: jnp.sum(p ** 2))
      >>> alg.name
      'fedavg'
    """
    kwargs.setdefault("name", "fedavg")
    return fed_opt(loss_fn, client_optimizer, server_lib.fed_sgd(server_learning_rate), **kwargs)


def _adaptive(tag: str, make):
    def factory(
        loss_fn: LossFn,
        client_optimizer: optax.GradientTransformation | None = None,
        server_learning_rate: float = 1e-2,
        **hparams,
    ) -> FederatedAlgorithm:
        opt_keys = {"b1", "b2", "tau", "bias_correction", "momentum"}
        server_hp = {k: hparams.pop(k) for k in list(hparams) if k in opt_keys}
        hparams.setdefault("name", tag)
        server_optimizer = make(server_learning_rate, **server_hp)
        return fed_opt(loss_fn, client_optimizer, server_optimizer, **hparams)

    return factory


fed_adam = register("fedadam")(_adaptive("fedadam", server_lib.fed_adam))
fed_adam.__doc__ = """FedAdam (Reddi et al. 2021): FedOpt with :func:`fedjax_lab.server.fed_adam`.

    ``fed_adam(loss_fn, client_optimizer=None, server_learning_rate=1e-2, *, b1=0.9, b2=0.99,
    tau=1e-3, bias_correction=False, **fed_opt_kwargs)``.
    """
fed_yogi = register("fedyogi")(_adaptive("fedyogi", server_lib.fed_yogi))
fed_yogi.__doc__ = """FedYogi (Reddi et al. 2021): FedOpt with :func:`fedjax_lab.server.fed_yogi`.

    ``fed_yogi(loss_fn, client_optimizer=None, server_learning_rate=1e-2, *, b1=0.9, b2=0.99,
    tau=1e-3, bias_correction=False, **fed_opt_kwargs)``.
    """
fed_adagrad = register("fedadagrad")(_adaptive("fedadagrad", server_lib.fed_adagrad))
fed_adagrad.__doc__ = """FedAdagrad (Reddi et al. 2021): FedOpt with ``fl.server.fed_adagrad``.

    ``fed_adagrad(loss_fn, client_optimizer=None, server_learning_rate=1e-2, *, b1=0.0,
    tau=1e-3, **fed_opt_kwargs)``.
    """
fed_avgm = register("fedavgm")(_adaptive("fedavgm", server_lib.fed_avgm))
fed_avgm.__doc__ = """FedAvgM (Hsu et al. 2019): FedOpt with server momentum ``fl.server.fed_avgm``.

    ``fed_avgm(loss_fn, client_optimizer=None, server_learning_rate=1e-2, *, momentum=0.9,
    **fed_opt_kwargs)``; the usual setting is ``server_learning_rate=1.0, momentum=0.9``.
    """
