"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020): FedAvg of a MAML objective."""

from __future__ import annotations

import jax
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
    ServerState,
)
from fedjax_lab.algorithms._registry import register

__all__ = ["per_fedavg"]


def _half(batch: dict[str, jax.Array], which: int) -> dict[str, jax.Array]:
    b = batch["mask"].shape[0]
    h = b // 2
    sl = slice(0, h) if which == 0 else slice(h, 2 * h)
    return {k: v[sl] for k, v in batch.items()}


@register("perfedavg")
def per_fedavg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    alpha: float = 0.01,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "perfedavg",
) -> FederatedAlgorithm:
    """Per-FedAvg, first-order (FO) variant: local MAML steps, FedAvg on the server.

    The objective is ``F(w) = (1/n) Σ_i f_i(w - α ∇f_i(w))``: a model that is good after one
    local gradient step of size ``α``. Each local step splits its batch of ``B`` examples into
    two halves ``D`` (first ``B//2``) and ``D'`` (next ``B//2``); with ``client_optimizer`` of
    rate ``β`` (SGD):

    * ``w' = w - α ∇f_i(w; D)``   (adaptation step);
    * ``w <- w - β ∇f_i(w'; D')``  (first-order meta step: the Hessian term is dropped).

    A step whose ``D'`` has no real example changes nothing. The server averages:
    ``x_{t+1} = x_t - γ Σ p_i (x_t - w_i)``. With ``α = 0`` this is FedAvg with rate ``β`` on the
    ``D'`` halves. Personalise at test time with
    :func:`fedjax_lab.personalization.fine_tune_evaluate` (``optax.sgd(α)``, ``steps=1``).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: the ``β`` (meta) optimiser (default ``optax.sgd(0.1)``).
      alpha: adaptation step size ``α >= 0``.
      server_optimizer: the server optimiser on the mean delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ`` (1.0: FedAvg).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` (batch size must be ``>= 2``).

    References:
      Fallah, Mokhtari & Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees:
      A Model-Agnostic Meta-Learning Approach", NeurIPS 2020 (Per-FedAvg (FO)).

    Example:
      >>> import jax.numpy as jnp
      >>> from fedjax_lab.algorithms.perfedavg import per_fedavg
      >>> alg = per_fedavg(lambda p, b, k: jnp.sum(p ** 2), alpha=0.05)
      >>> alg.name
      'perfedavg'
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("alpha", alpha, allow_zero=True, hint=" (the adaptation step α)")
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    grad_fn = jax.value_and_grad(loss_fn)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        batches = client.batches
        b = batches["mask"].shape[1]
        if b < 2:
            raise ValueError(
                f"batch_size: Per-FedAvg splits each batch into two halves; need >= 2, got {b}."
            )

        def step(w, opt_state, batch, k):  # a step is real when its D' half has an example
            d, d2 = _half(batch, 0), _half(batch, 1)
            k1, k2 = jax.random.split(k)
            loss, g = grad_fn(w, d, k1)
            w_adapted = optax.tree.add_scale(w, -alpha, g)
            _, g2 = grad_fn(w_adapted, d2, k2)
            updates, opt_state = client_optimizer.update(g2, opt_state, w)
            loss_on_d = loss.astype(jnp.float32) * jnp.sum(d["mask"])  # summed as a stat
            return optax.apply_updates(w, updates), opt_state, loss, loss_on_d

        halves = batches["mask"][:, : b // 2], batches["mask"][:, b // 2 : 2 * (b // 2)]
        adapt_counts, meta_counts = (jnp.sum(h, axis=1) for h in halves)
        w0 = state.params
        result = kit.local_loop(step, w0, client_optimizer.init(w0), batches, key,
                                stats_init=jnp.zeros((), jnp.float32), step_counts=meta_counts,
                                unroll=unroll)
        # The loss reported is the one on the D halves, over both halves' examples.
        real = (meta_counts > 0).astype(jnp.float32)
        counts = (adapt_counts + meta_counts) * real
        n_adapt = jnp.sum(adapt_counts * real)
        metrics = {
            "loss_sum": result.stats / jnp.maximum(n_adapt, 1.0) * jnp.sum(counts),
            "num_examples": jnp.sum(counts),
            "num_steps": result.metrics["num_steps"],
        }
        return ClientOutput(kit.client_delta(w0, result.params), client.weight, metrics, ())

    server_update = kit.server_step(server_optimizer)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))
