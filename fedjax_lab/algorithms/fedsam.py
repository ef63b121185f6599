"""FedSAM (Qu et al., ICML 2022; Caldarola et al., ECCV 2022): sharpness-aware local steps.

Each local step is a SAM step, ``w <- w - η ∇L(w + ρ g/‖g‖)`` with ``g = ∇L(w)`` on the same
mini-batch: the client descends the loss at the worst point of a ``ρ``-ball, which flattens the
local minima that FedAvg averages. It is FedAvg with the kit's gradient-correction hook
replacing the mini-batch gradient by the SAM gradient.
"""

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

__all__ = ["fed_sam", "sam_correction"]


def sam_correction(loss_fn: LossFn, rho: float | jax.Array) -> kit.Correction:
    """The SAM gradient as a :func:`fedjax_lab.kit.local_training` correction.

    ``correction(g, w, batch, key) = (∇L(w + ρ g / ‖g‖; batch, key), ())`` with ``‖g‖`` the
    global norm of the step's gradient (a zero gradient is not perturbed).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w, b, k: jnp.sum(w ** 4)
      >>> g = jnp.array([4.0, 0.0])  # ∇L at w = (1, 0)
      >>> d, _ = sam_correction(loss, 0.5)(g, jnp.array([1.0, 0.0]), {}, jax.random.key(0))
      >>> d.tolist()  # ∇L at (1.5, 0)
      [13.5, 0.0]
    """
    grad_fn = jax.grad(loss_fn)

    def correction(grads, params, batch, key):
        norm = optax.tree.norm(grads)
        scale = rho / jnp.where(norm > 0, norm, 1.0)
        perturbed = optax.tree.add(params, optax.tree.scale(scale, grads))
        return grad_fn(perturbed, batch, key), ()

    return correction


@register("fedsam")
def fed_sam(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    rho: float = 0.05,
    client_learning_rate: float | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedsam",
) -> FederatedAlgorithm:
    """FedSAM: FedAvg whose local optimiser takes sharpness-aware (SAM) steps.

    Each REAL local step on batch ``b`` (padding steps are skipped): ``g = ∇L(w; b)``,
    ``ŵ = w + ρ g / ‖g‖`` (``‖·‖`` the global L2 norm), then the client optimiser is applied
    to ``∇L(ŵ; b)`` (plain SGD: ``w <- w - η ∇L(ŵ; b)``). The client sends ``w_t - w``; the
    server applies ``server_optimizer`` to the weighted mean (default FedSGD at 1: averaging).
    ``ρ = 0`` is FedAvg exactly. Each step costs two gradients.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``), fed the SAM
        gradient.
      rho: the neighbourhood radius ``ρ >= 0`` (Caldarola et al. use 0.02-0.1 on CIFAR).
      client_learning_rate: instead of ``client_optimizer``: plain SGD at this rate.
      server_optimizer: the server optimiser (default ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: the FedSGD rate (1.0: averaging).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    References:
      Qu, Li, Duan, Liu, Tang & Lu, "Generalized Federated Learning via Sharpness Aware
      Minimization", ICML 2022; Caldarola, Caputo & Ciccone, "Improving Generalization in
      Federated Learning by Seeking Flat Minima", ECCV 2022.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fl.algorithms.fed_sam(loss, optax.sgd(0.1), rho=0.0)
      >>> cohort = fl.Cohort({"x": jnp.ones((3, 1, 4, 2)), "y": jnp.ones((3, 1, 4)),
      ...                     "mask": jnp.ones((3, 1, 4))}, jnp.ones(3), jnp.arange(3))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(2)), cohort, jax.random.key(0))
      >>> [round(v, 4) for v in state.params.tolist()]  # rho = 0: FedAvg
      [0.2, 0.2]
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("rho", rho, allow_zero=True, hint=" (the SAM radius ρ)")
    optimizer = kit.client_optimizer(client_optimizer, client_learning_rate)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    train = kit.local_training(loss_fn, optimizer, unroll=unroll,
                               correction=sam_correction(loss_fn, rho))

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        kit.check_num_clients(num_clients)
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        result = train(state.params, client.batches, key)
        return ClientOutput(kit.client_delta(state.params, result.params), client.weight,
                            result.metrics, ())

    server_update = kit.server_step(server_optimizer)
    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))
