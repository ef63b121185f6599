"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct the clients' drift."""

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

__all__ = ["scaffold"]


@register("scaffold")
def scaffold(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    client_learning_rate: float | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "scaffold",
) -> FederatedAlgorithm:
    """SCAFFOLD with option II control variates (Karimireddy et al. 2020, Algorithm 1).

    Server state: model ``x`` and control variate ``c`` (``state.extra``); client ``i`` keeps
    ``c_i`` (``state.client_states``, zeros at init, so ``c = mean_i c_i`` holds throughout).
    Round ``t``, cohort ``S`` of a population of ``N``:

    * client ``i``: ``y <- x``; each REAL local step (an all-padding step is skipped)
      ``y <- y - η_l (g_i(y) - c_i + c)`` with ``g_i(y)`` the mini-batch gradient; after its
      ``K_i`` real steps (option II)
      ``c_i+ = c_i - c + (x - y) / (K_i η_l)``, which for SGD is exactly the mean of the
      ``K_i`` mini-batch gradients ``(1/K_i) Σ_k g_i(y_k)`` -- computed in that form, so
      ``η_l`` need not be known; ``K_i = 0`` leaves ``c_i`` unchanged. Sends
      ``Δx_i = x - y`` and ``Δc_i = c_i+ - c_i``;
    * server: ``x <- x - η_g Σ p_i Δx_i`` (or ``server_optimizer`` on ``Σ p_i Δx_i``;
      ``p_i ∝`` cohort weight; the paper's uniform
      ``1/|S|`` is ``weighting="uniform"``) and ``c <- c + (1/N) Σ_{i∈S} Δc_i``
      (= ``c + (|S|/N) mean_S Δc_i``).

    With zero control variates and one local step the first round is FedAvg. The paper's local
    solver is plain SGD (the default, ``optax.sgd(client_learning_rate)``). Another optax
    ``client_optimizer`` (momentum, Adam) is applied to the corrected gradient
    ``g - c_i + c`` and ``c_i+`` stays the mean raw gradient: a common generalisation, not in
    the paper (there ``(x - y)/(K η_l)`` no longer equals it).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: local optimiser; ``None`` gives plain SGD with ``client_learning_rate``.
      client_learning_rate: ``η_l`` of the default SGD (``None``: 0.1); give either this or
        ``client_optimizer``, not both.
      server_optimizer: the server optimiser on the mean ``Δx_i`` (default
        ``fl.server.fed_sgd(server_learning_rate)``, the paper's step).
      server_learning_rate: ``η_g`` (the paper uses 1).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``.
      Its client update is the pair ``(Δx_i, Δc_i)``.

    References:
      Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled
      Averaging for Federated Learning", ICML 2020, Algorithm 1 (option II).

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.scaffold import scaffold
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = scaffold(loss, client_learning_rate=0.1)
      >>> state = alg.init(jnp.zeros(2), num_clients=3)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 2, 2, 2)), "y": jnp.ones((1, 2, 2)),
      ...                     "mask": jnp.ones((1, 2, 2))}, jnp.ones(1), jnp.array([1]))
      >>> state, _ = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> [round(v, 3) for v in state.client_states[:, 0].tolist()]  # c_1 moved, c_0, c_2 not
      [0.0, -1.6, 0.0]
      >>> round(float(state.extra[0]), 3)  # c = mean_i c_i
      -0.533
    """
    kit.check_loss_fn(loss_fn)
    optimizer = kit.client_optimizer(client_optimizer, client_learning_rate)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.mean_and_sum()

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        return kit.server_state(
            params, server_optimizer, aggregator,
            client_states=() if n is None else kit.zeros_per_client(params, n),
            extra=optax.tree.zeros_like(params),  # c
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)
        x, c, c_i = state.params, state.extra, client.state
        correction = optax.tree.sub(c, c_i)
        # Local steps follow g - c_i + c; the raw gradients g are summed for c_i+.
        train = kit.local_training(
            loss_fn, optimizer, unroll=unroll,
            correction=lambda g, *_: (optax.tree.add(g, correction), g),
        )
        result = train(x, client.batches, key)
        k_real = result.metrics["num_steps"]
        new_c_i = optax.tree.where(
            k_real > 0, optax.tree.scale(1.0 / jnp.maximum(k_real, 1.0), result.stats), c_i
        )
        delta_c = optax.tree.sub(new_c_i, c_i)
        update = (kit.client_delta(x, result.params), delta_c)
        return ClientOutput(update, client.weight, result.metrics, new_c_i)

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        mean_delta, sum_delta_c = aggregate
        n = kit.population_size(state.client_states)
        c = optax.tree.add(state.extra, optax.tree.scale(1.0 / n, sum_delta_c))
        return kit.apply_server_optimizer(state, server_optimizer, mean_delta)._replace(extra=c)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
