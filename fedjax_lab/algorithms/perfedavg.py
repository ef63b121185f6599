"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020): FedAvg of a MAML objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import server as server_lib
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
from fedjax_lab.aggregators import weighted_mean
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.fedavg import _client_optimizer

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
    alpha: float = 0.01,
    server_learning_rate: float = 1.0,
    *,
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
    if not alpha >= 0:
        raise ValueError(f"alpha: the adaptation step α must be >= 0, got {alpha!r}.")
    client_optimizer = _client_optimizer(client_optimizer)
    server_optimizer = server_lib.fed_sgd(server_learning_rate)
    aggregator = weighted_mean()
    grad_fn = jax.value_and_grad(loss_fn)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        batches = client.batches
        num_steps, b = batches["mask"].shape
        if b < 2:
            raise ValueError(
                f"batch_size: Per-FedAvg splits each batch into two halves; need >= 2, got {b}."
            )

        def step(carry, xs):
            w, opt_state = carry
            batch, k = xs
            d, d2 = _half(batch, 0), _half(batch, 1)
            k1, k2 = jax.random.split(k)
            count, count2 = jnp.sum(d["mask"]), jnp.sum(d2["mask"])

            def apply(args):
                w, opt_state = args
                loss, g = grad_fn(w, d, k1)
                w_adapted = optax.tree.add_scale(w, -alpha, g)
                _, g2 = grad_fn(w_adapted, d2, k2)
                updates, opt_state = client_optimizer.update(g2, opt_state, w)
                return optax.apply_updates(w, updates), opt_state, loss

            def skip(args):
                w, opt_state = args
                return w, opt_state, 0.0 * count

            w, opt_state, loss = jax.lax.cond(count2 > 0, apply, skip, (w, opt_state))
            real = (count2 > 0).astype(jnp.float32)
            return (w, opt_state), (loss.astype(jnp.float32) * count * real,
                                    (count + count2) * real)

        w0 = state.params
        (w, _), (loss_sums, counts) = jax.lax.scan(
            step, (w0, client_optimizer.init(w0)), (batches, jax.random.split(key, num_steps)),
            unroll=unroll,
        )
        n_adapt = jnp.sum(jnp.sum(batches["mask"][:, : b // 2], axis=1) * (counts > 0))
        metrics = {
            "loss_sum": jnp.sum(loss_sums) / jnp.maximum(n_adapt, 1.0) * jnp.sum(counts),
            "num_examples": jnp.sum(counts),
            "num_steps": jnp.sum(counts > 0).astype(jnp.float32),
        }
        return ClientOutput(optax.tree.sub(w0, w), client.weight, metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        updates, opt_state = server_optimizer.update(aggregate, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name)
