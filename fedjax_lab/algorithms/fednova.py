"""FedNova (Wang et al., NeurIPS 2020): normalised averaging for unequal local work."""

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
    PyTree,
    ServerState,
)
from fedjax_lab.algorithms._registry import register

__all__ = ["fed_nova", "normalizing_constant"]


def normalizing_constant(num_steps: jax.Array, momentum: float = 0.0) -> jax.Array:
    """``||a_i||_1`` of FedNova for ``τ_i`` local steps of SGD with heavy-ball momentum ``ρ``.

    ``ρ = 0``: ``τ_i``. ``0 < ρ < 1``: ``(τ_i - ρ (1 - ρ^τ_i) / (1 - ρ)) / (1 - ρ)``, the sum
    over steps of ``(1 - ρ^k) / (1 - ρ)``, ``k = 1..τ_i`` (each gradient's total weight in
    ``x - y_i`` divided by the learning rate).

    Example:
      >>> float(normalizing_constant(jnp.array(3.0))), float(normalizing_constant(3.0, 0.5))
      (3.0, 4.25)
    """
    tau = jnp.asarray(num_steps, jnp.float32)
    if isinstance(momentum, (int, float)) and momentum == 0:
        return tau
    rho = momentum  # may be a traced value (sweeps); rho = 0 also gives tau here
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


@register("fednova")
def fed_nova(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    local_momentum: float = 0.0,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fednova",
) -> FederatedAlgorithm:
    """FedNova: each client's update is divided by its local work before averaging.

    Round ``t``, cohort weights ``p_i`` (normalised), server model ``x``:

    * client ``i``: ``τ_i`` REAL local steps (all-padding steps are skipped and not counted) of
      ``client_optimizer`` from ``x`` give ``y_i``; it sends the normalised update
      ``d_i = (x - y_i) / a_i`` and ``a_i = ||a_i||_1`` (``a_i = τ_i`` for plain SGD; with
      heavy-ball momentum ``ρ``: ``a_i = (τ_i - ρ(1 - ρ^τ_i)/(1 - ρ)) / (1 - ρ)``, see
      :func:`normalizing_constant`; ``a_i = 0`` sends ``d_i = 0``);
    * server: ``τ_eff = Σ p_i a_i`` and ``x <- x - η_g τ_eff Σ p_i d_i``.

    When every client does the same work (``local_steps=K`` in ``run_rounds``) this is FedAvg:
    ``τ_eff Σ p_i d_i = Σ p_i (x - y_i)``. With ``epochs`` and unequal client sizes it removes
    the objective inconsistency of FedAvg (clients with more steps no longer dominate).

    ``local_momentum = ρ > 0`` puts ``optax.trace(ρ)`` in front of ``client_optimizer``: with the
    default ``optax.sgd(lr)`` that is the paper's local SGD with momentum
    ``m <- ρ m + g; y <- y - lr m`` (one buffer a client, reset each round). Proximal (FedProx)
    local solvers, whose ``a_i`` the paper also gives, are not covered here.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: local optimiser (default ``optax.sgd(0.1)``); must be (momentum) SGD
        for the normalisation to be the paper's.
      local_momentum: ``ρ ∈ [0, 1)`` of the local momentum (the paper's experiments use 0.9 for its
        momentum variant; default 0 = vanilla SGD).
      server_optimizer: the server optimiser on ``τ_eff Σ p_i d_i`` (default
        ``fl.server.fed_sgd(server_learning_rate)``, the paper's step).
      server_learning_rate: ``η_g`` (the paper uses 1).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` (no per-client state).

    References:
      Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in
      Heterogeneous Federated Optimization", NeurIPS 2020.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.fednova import fed_nova
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fed_nova(loss, optax.sgd(0.1))
      >>> mask = jnp.array([[[1.0], [1.0]], [[1.0], [0.0]]])  # client 0: 2 steps, client 1: 1
      >>> cohort = fl.Cohort({"x": jnp.ones((2, 2, 1, 1)), "y": jnp.ones((2, 2, 1)),
      ...                     "mask": mask}, jnp.ones(2), jnp.arange(2))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(1)), cohort, jax.random.key(0))
      >>> round(float(state.params[0]), 4)  # 1.5 * (0.36/2 + 0.2/1) / 2; FedAvg: 0.28
      0.285
    """
    kit.check_loss_fn(loss_fn)
    kit.check_in_range("local_momentum", local_momentum, 0.0, 1.0, high_open=True)
    optimizer = kit.client_optimizer(client_optimizer)
    if not (isinstance(local_momentum, (int, float)) and local_momentum == 0):
        optimizer = optax.chain(optax.trace(decay=local_momentum), optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    train = kit.local_training(loss_fn, optimizer, unroll=unroll)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        result = train(state.params, client.batches, key)
        a_i = normalizing_constant(result.metrics["num_steps"], local_momentum)
        delta = kit.client_delta(state.params, result.params)
        d_i = optax.tree.scale(1.0 / jnp.maximum(a_i, 1e-12), delta)
        return ClientOutput((d_i, a_i), client.weight, result.metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        mean_d, tau_eff = aggregate
        return kit.apply_server_optimizer(state, server_optimizer,
                                          optax.tree.scale(tau_eff, mean_d))

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
