"""FedAvg-M (Cheng, Huang, Wu & Yuan, ICLR 2024): FedAvg whose local steps carry momentum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab._types import (
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
from fedjax_lab.algorithms.fedavg import _client_optimizer
from fedjax_lab.algorithms.scaffold import _check_loss_fn, _check_rate, _local_loop

__all__ = ["fed_avg_momentum"]


@register("fedavg_momentum")
def fed_avg_momentum(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    beta: float = 0.1,
    *,
    unroll: int | bool = 1,
    name: str = "fedavg_momentum",
) -> FederatedAlgorithm:
    """FedAvg-M: every local step mixes the fresh gradient with the round's global momentum.

    The server keeps the momentum ``g`` (``state.extra``, ``g^0 = 0``). Round ``r``, cohort
    weights ``p_i``, local learning rate ``η`` (of ``client_optimizer``, plain SGD in the
    paper):

    * client ``i``: ``y <- x``; each REAL local step ``k`` (all-padding steps are skipped)
      ``d_k = β ∇F_i(y; ξ_k) + (1 - β) g``, ``y <- y - η d_k``; after ``K_i`` real steps it
      sends ``x - y`` and ``ĝ_i = (1/K_i) Σ_k d_k`` (``= (x - y)/(η K_i)`` for SGD; a client
      with no real step sends ``g``);
    * server: ``g <- Σ p_i ĝ_i`` and ``x <- x - η_g Σ p_i (x - y_i)``.

    The paper writes the server step as ``x <- x - γ g^{r+1}`` with
    ``g^{r+1} = (1/(ηNK)) Σ_i (x - y_i)``; for equal ``K`` that is the step above with
    ``γ = η_g η K``, so ``server_learning_rate`` is ``γ`` in units of ``ηK`` (1 = a FedAvg
    step). ``β = 1`` is FedAvg exactly (``g`` is then unused); smaller ``β`` is more momentum.
    This is the paper's EMA convention (``β`` weights the NEW gradient), the opposite of
    optax's ``trace(decay)``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: local optimiser applied to ``d_k`` (default ``optax.sgd(0.1)``).
      server_learning_rate: ``η_g`` on the averaged client delta (``γ / (ηK)``; default 1).
      beta: ``β ∈ (0, 1]``, the weight of the fresh gradient (our default 0.1: momentum 0.9
        in the usual convention; the paper tunes ``β``).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` (no per-client state). Its client update is
      ``(x - y_i, ĝ_i)``.

    References:
      Cheng, Huang, Wu & Yuan, "Momentum Benefits Non-IID Federated Learning Simply and
      Provably", ICLR 2024 (arXiv:2306.16504), Algorithm 1 (FedAvg-M).

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.momentum import fed_avg_momentum
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fed_avg_momentum(loss, optax.sgd(0.1), beta=0.5)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 1)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.arange(1))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(1)), cohort, jax.random.key(0))
      >>> round(float(state.params[0]), 3), round(float(state.extra[0]), 3)  # d = 0.5 * -2
      (0.1, -1.0)
    """
    _check_loss_fn(loss_fn)
    _check_rate("server_learning_rate", server_learning_rate)
    if isinstance(beta, (int, float)) and not 0.0 < beta <= 1.0:
        raise ValueError(
            f"beta: the gradient weight β must be in (0, 1] (1 = FedAvg), got {beta!r}."
        )
    optimizer = _client_optimizer(client_optimizer)
    aggregator = aggregators_lib.weighted_mean()
    grad_fn = jax.value_and_grad(loss_fn)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return ServerState(
            params=params,
            opt_state=(),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
            extra=optax.tree.zeros_like(params),
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        x, g = state.params, state.extra

        def step(y, opt_state, batch, k):
            loss, grad = grad_fn(y, batch, k)
            d = optax.tree.add(optax.tree.scale(beta, grad), optax.tree.scale(1.0 - beta, g))
            updates, opt_state = optimizer.update(d, opt_state, y)
            return optax.apply_updates(y, updates), opt_state, loss, d

        y, _, d_sum, metrics = _local_loop(
            step, x, optimizer.init(x), client.batches, key, optax.tree.zeros_like(x),
            unroll=unroll,
        )
        k_real = metrics["num_steps"]
        g_i = optax.tree.where(
            k_real > 0, optax.tree.scale(1.0 / jnp.maximum(k_real, 1.0), d_sum), g
        )
        return ClientOutput((optax.tree.sub(x, y), g_i), client.weight, metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        mean_delta, g = aggregate
        params = optax.tree.sub(state.params, optax.tree.scale(server_learning_rate, mean_delta))
        return state._replace(params=params, extra=g)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name)
