"""q-FFL / q-FedAvg (Li, Sanjabi, Beirami & Smith, ICLR 2020): fair resource allocation.

q-FFL minimises ``f_q(w) = Σ_k p_k F_k(w)^{q+1} / (q + 1)``: the larger ``q``, the more the
objective weighs clients with a high loss, so the accuracy distribution across clients gets more
uniform (``q = 0`` is the usual FedAvg objective). q-FedAvg solves it with local SGD and a
step size taken from a Lipschitz estimate ``L = 1 / lr``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import kit
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

__all__ = ["q_fedavg", "qffl_aggregator", "qffl_terms"]

_MIN_LOSS = 1e-10


def qffl_terms(
    loss: jax.Array, delta: PyTree, q: float, lipschitz: float
) -> tuple[PyTree, jax.Array]:
    """One client's q-FedAvg terms ``(Δ_k, h_k)`` (the paper's Algorithm 2, lines 6-7).

    With ``ΔW_k = L (w_t - w̄_k)`` (``delta = w_t - w̄_k``) and ``F = F_k(w_t)``:

    * ``Δ_k = F^q ΔW_k``
    * ``h_k = q F^{q-1} ||ΔW_k||² + L F^q``

    ``F`` is floored at ``1e-10`` so ``F^{q-1}`` stays finite.

    Example:
      >>> import jax.numpy as jnp
      >>> d, h = qffl_terms(jnp.array(2.0), jnp.array([0.1, 0.0]), q=1.0, lipschitz=10.0)
      >>> [round(v, 4) for v in d.tolist()], round(float(h), 4)
      ([2.0, 0.0], 21.0)
    """
    f = jnp.maximum(jnp.asarray(loss, jnp.float32), _MIN_LOSS)
    dw = optax.tree.scale(lipschitz, delta)
    fq = jnp.power(f, q)
    h = q * jnp.power(f, q - 1.0) * optax.tree.vdot(dw, dw) + lipschitz * fq
    return optax.tree.scale(fq, dw), h


def qffl_aggregator() -> Aggregator:
    """``Σ_k Δ_k / Σ_k h_k`` over the clients of positive weight; total weight ``Σ h_k``."""

    def prepare(update, weight):
        on = (jnp.asarray(weight) > 0).astype(jnp.float32)
        d, h = update
        return optax.tree.scale(on, d), on * h

    def finalize(contribution):
        d_sum, h_sum = contribution
        safe = jnp.where(h_sum > 0, h_sum, 1.0)
        return optax.tree.scale(1.0 / safe, d_sum), h_sum

    return kit.stateless_aggregator(prepare, finalize, reduce="sum")


@register("qffl")
def q_fedavg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    q: float = 1.0,
    lipschitz: float | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "qffl",
) -> FederatedAlgorithm:
    """q-FedAvg: FedAvg re-weighted by each client's loss to the power ``q``.

    Update rule (round ``t``, cohort ``S``):

    * client ``k``: ``F_k(w_t)``, its mean loss over the round's batches at the server model;
      local training from ``w_t`` gives ``w̄_k``; ``ΔW_k = L (w_t - w̄_k)``;
      sends ``Δ_k = F_k^q ΔW_k`` and ``h_k = q F_k^{q-1} ||ΔW_k||² + L F_k^q``;
    * server: ``w_{t+1} = w_t - Σ_{k∈S} Δ_k / Σ_{k∈S} h_k`` (the pseudo-gradient
      ``Σ Δ_k / Σ h_k`` fed to ``server_optimizer``, by default ``fed_sgd(1.0)``: this step).

    ``q = 0`` gives ``w_{t+1} = mean_k w̄_k``: FedAvg with uniform weights. Clients count
    uniformly (the paper samples clients in proportion to their size instead:
    :func:`fedjax_lab.data.sampling.size_weighted`); the cohort weight only marks real clients.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      q: fairness parameter ``q >= 0`` (the paper uses values in {0.001, ..., 15}).
      lipschitz: ``L``; the paper sets ``L = 1 / lr`` (the client learning rate). Default: 10,
        which matches only the default ``sgd(0.1)``; pass it with any other client optimiser.
      server_optimizer: the server optimiser on ``Σ Δ_k / Σ h_k`` (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: the FedSGD rate (1.0: the paper's step).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`.

    References:
      Li, Sanjabi, Beirami & Smith, "Fair Resource Allocation in Federated Learning",
      ICLR 2020, Algorithm 2 (q-FedAvg).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from fedjax_lab.algorithms.qffl import q_fedavg
      >>> alg = q_fedavg(lambda p, b, k: jnp.sum(p ** 2), optax.sgd(0.05), q=2.0, lipschitz=20.0)
      >>> alg.name
      'qffl'
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("q", q, allow_zero=True, hint=" (the fairness parameter)")
    if lipschitz is None:
        if client_optimizer is not None:
            raise ValueError(
                "lipschitz: q-FedAvg needs L = 1 / (client learning rate); pass lipschitz= "
                "with a custom client_optimizer (e.g. lipschitz=10.0 for optax.sgd(0.1))."
            )
        lipschitz = 1.0 / kit.DEFAULT_CLIENT_LEARNING_RATE
    kit.check_positive("lipschitz", lipschitz, hint=" (L = 1 / client learning rate)")
    lipschitz = float(lipschitz)
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = qffl_aggregator()
    train = kit.local_training(loss_fn, client_optimizer, unroll=unroll)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        w = state.params
        batches = client.batches
        counts = jnp.sum(batches["mask"], axis=1)
        num_steps = counts.shape[0]
        k_loss, k_train = jax.random.split(key)

        def start_loss(_, xs):
            batch, k = xs
            return None, loss_fn(w, batch, k)

        _, losses = jax.lax.scan(start_loss, None, (batches, jax.random.split(k_loss, num_steps)))
        losses = jnp.where(counts > 0, losses, 0.0)
        f = jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)
        result = train(w, batches, k_train)
        d, h = qffl_terms(f, optax.tree.sub(w, result.params), q, lipschitz)
        metrics = dict(result.metrics, start_loss_sum=f)
        return ClientOutput((d, h), client.weight, metrics, ())

    server_update = kit.server_step(server_optimizer)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
