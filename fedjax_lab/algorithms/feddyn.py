"""FedDyn (Acar et al., ICLR 2021): dynamic regularisation aligns local and global optima."""

from __future__ import annotations

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

__all__ = ["fed_dyn"]


@register("feddyn")
def fed_dyn(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    alpha: float = 0.01,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "feddyn",
) -> FederatedAlgorithm:
    """FedDyn: each client minimises a dynamically regularised loss (Acar et al. 2021, Alg. 1).

    Client ``i`` keeps ``g_i`` (``state.client_states``, zeros at init), the gradient
    ``∇L_i(θ_i^{t-1})`` of its last local model; the server keeps ``h`` (``state.extra``,
    zeros). Round ``t``, cohort ``S`` of a population of ``N``, server model ``θ^{t-1}``:

    * client ``i``: ``θ_i^t ≈ argmin_θ L_i(θ) - <g_i, θ> + (α/2) ||θ - θ^{t-1}||²`` by local
      training with ``client_optimizer`` from ``θ^{t-1}`` (all-padding steps skipped); then
      ``g_i <- g_i - α (θ_i^t - θ^{t-1})``; sends ``θ^{t-1} - θ_i^t``;
    * server: ``h <- h - α (1/N) Σ_{i∈S} (θ_i^t - θ^{t-1})`` and
      ``θ^t = Σ p_i θ_i^t - h / α``.

    ``p_i ∝`` the cohort weight (the paper's ``1/|S|`` is ``weighting="uniform"``; the authors'
    code weights by data size, our default). ``h = mean_i g_i`` holds throughout because both
    start at zero and the ``h`` sum counts exactly the clients whose ``g_i`` changed.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: local optimiser (default ``optax.sgd(0.1)``, as in the paper's SGD).
      server_optimizer: takes the mean delta ``Σ p_i (θ^{t-1} - θ_i^t)`` in place of plain
        averaging (default ``fl.server.fed_sgd(server_learning_rate)``; at 1.0 it gives
        ``Σ p_i θ_i^t``, the paper's step); ``h / α`` is subtracted after it.
      server_learning_rate: the FedSGD rate when ``server_optimizer`` is ``None``.
      alpha: ``α > 0`` (the paper tunes ``α ∈ {0.1, 0.01, 0.001}``; 0.01 is its usual choice).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``.

    References:
      Acar, Zhao, Matas, Mattina, Whatmough & Saligrama, "Federated Learning Based on Dynamic
      Regularization", ICLR 2021, Algorithm 1.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.feddyn import fed_dyn
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fed_dyn(loss, optax.sgd(0.1), alpha=0.1)
      >>> state = alg.init(jnp.zeros(2), num_clients=2)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 2)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.array([0]))
      >>> state, _ = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> [round(v, 3) for v in state.client_states[:, 0].tolist()]  # g_0 moved, g_1 not
      [-0.02, 0.0]
      >>> round(float(state.params[0]), 3)  # mean θ_i - h/α = 0.2 + 0.1
      0.3
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("alpha", alpha, hint=" (the FedDyn coefficient α; the paper uses 0.01)")
    optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.mean_and_sum()

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        return kit.server_state(
            params, server_optimizer, aggregator,
            client_states=() if n is None else kit.zeros_per_client(params, n),  # g_i
            extra=optax.tree.zeros_like(params),  # h
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)
        theta, g_i = state.params, client.state
        regularizer = kit.dynamic_regularizer(alpha, g_i)
        train = kit.local_training(loss_fn, optimizer, unroll=unroll, regularizer=regularizer)
        result = train(theta, client.batches, key)
        delta = kit.client_delta(theta, result.params)  # θ^{t-1} - θ_i^t
        new_g_i = optax.tree.add(g_i, optax.tree.scale(alpha, delta))
        return ClientOutput((delta, delta), client.weight, result.metrics, new_g_i)

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        mean_delta, sum_delta = aggregate
        n = kit.population_size(state.client_states)
        h = optax.tree.add(state.extra, optax.tree.scale(alpha / n, sum_delta))
        averaged = kit.apply_server_optimizer(state, server_optimizer, mean_delta)
        params = optax.tree.sub(averaged.params, optax.tree.scale(1.0 / alpha, h))
        return averaged._replace(params=params, extra=h)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
