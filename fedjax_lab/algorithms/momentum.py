"""FedAvg-M (Cheng, Huang, Wu & Yuan, ICLR 2024): FedAvg whose local steps carry momentum."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab import kit
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

__all__ = ["fed_avg_momentum"]


@register("fedavg_momentum")
def fed_avg_momentum(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    gradient_weight: float = 0.1,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
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
    step). ``β = gradient_weight = 1`` is FedAvg exactly (``g`` is then unused); smaller
    ``β`` is more momentum.
    This is the paper's EMA convention (``β`` weights the NEW gradient), the opposite of
    optax's ``trace(decay)``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: local optimiser applied to ``d_k`` (default ``optax.sgd(0.1)``).
      gradient_weight: ``β ∈ (0, 1]``, the weight of the fresh gradient (our default 0.1:
        momentum 0.9 in the usual convention; the paper tunes ``β``).
      server_optimizer: the server optimiser on the averaged client delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``η_g`` on the averaged client delta (``γ / (ηK)``; default 1).
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
      >>> alg = fed_avg_momentum(loss, optax.sgd(0.1), gradient_weight=0.5)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 1)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.arange(1))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(1)), cohort, jax.random.key(0))
      >>> round(float(state.params[0]), 3), round(float(state.extra[0]), 3)  # d = 0.5 * -2
      (0.1, -1.0)
    """
    kit.check_loss_fn(loss_fn)
    kit.check_in_range("gradient_weight", gradient_weight, 0.0, 1.0, low_open=True,
                       hint=" (the weight β of the fresh gradient; 1 = FedAvg)")
    beta = gradient_weight
    optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return kit.server_state(params, server_optimizer, aggregator,
                                extra=optax.tree.zeros_like(params))  # g

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        x, g = state.params, state.extra

        def mix(grad, *_):  # d_k = β ∇F_i(y) + (1 - β) g, summed over the real steps
            d = optax.tree.add(optax.tree.scale(beta, grad), optax.tree.scale(1.0 - beta, g))
            return d, d

        train = kit.local_training(loss_fn, optimizer, unroll=unroll, correction=mix)
        result = train(x, client.batches, key)
        k_real = result.metrics["num_steps"]
        g_i = optax.tree.where(
            k_real > 0, optax.tree.scale(1.0 / jnp.maximum(k_real, 1.0), result.stats), g
        )
        update = (kit.client_delta(x, result.params), g_i)
        return ClientOutput(update, client.weight, result.metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        mean_delta, g = aggregate
        return kit.apply_server_optimizer(state, server_optimizer, mean_delta)._replace(extra=g)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
