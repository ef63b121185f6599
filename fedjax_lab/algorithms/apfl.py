"""APFL (Deng, Kamani & Mahdavi 2020): each client mixes a local model with the global one."""

from __future__ import annotations

from typing import NamedTuple

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

__all__ = ["APFLClientState", "apfl", "mix", "personal_params"]


class APFLClientState(NamedTuple):
    """One client's APFL state (stacked ``[N, ...]`` in ``state.client_states``).

    Attributes:
      local: the local model ``v_i`` (a tree like the params).
      alpha: the mixing weight ``α_i`` in ``[0, 1]`` (a scalar per client).
    """

    local: Params
    alpha: jax.Array


def mix(alpha: jax.Array, local: Params, global_params: Params) -> Params:
    """The personalised model ``α v + (1 - α) w`` of ONE client (``alpha`` a scalar).

    Example:
      >>> import jax.numpy as jnp
      >>> mix(jnp.float32(0.25), jnp.array([4.0]), jnp.array([0.0])).tolist()
      [1.0]
    """
    return jax.tree.map(lambda v, w: alpha * v + (1.0 - alpha) * w, local, global_params)


def personal_params(state: ServerState) -> PyTree:
    """Every client's personalised model ``α_i v_i + (1 - α_i) w``, leaves ``[N, ...]``.

    ``w`` is the current global model ``state.params``.

    Example:
      >>> import jax.numpy as jnp
      >>> alg = apfl(lambda p, b, k: jnp.sum(p ** 2), alpha=0.5)
      >>> personal_params(alg.init(jnp.ones(2), num_clients=3)).shape
      (3, 2)
    """
    kit.require_client_state(state.client_states, "apfl")
    return jax.vmap(mix, in_axes=(0, 0, None))(
        state.client_states.alpha, state.client_states.local, state.params
    )


@register("apfl")
def apfl(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    alpha: float = 0.25,
    alpha_learning_rate: float = 0.1,
    personal_optimizer: optax.GradientTransformation | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "apfl",
) -> FederatedAlgorithm:
    """APFL: adaptive personalised FL; client ``i`` learns a local ``v_i`` and a mix ``α_i``.

    Update rule (round ``t``; client ``i`` starts from ``w = w_t`` and its own ``(v_i, α_i)``
    from ``state.client_states``; at every real local step on batch ``ξ``, with
    ``v̄ = α_i v_i + (1 - α_i) w`` computed from the values BEFORE the step):

    * global copy: ``w <- w - η ∇f_i(w; ξ)`` (``client_optimizer``);
    * local model: ``v_i <- v_i - η ∇_v f_i(v̄; ξ) = v_i - η α_i ∇f_i(v̄; ξ)``
      (``personal_optimizer``, default the client optimiser);
    * mixing weight: ``α_i <- clip(α_i - η_α ∇_α f_i(v̄; ξ), 0, 1)`` with
      ``∇_α f_i(v̄) = <v_i - w, ∇f_i(v̄)>`` (``η_α = alpha_learning_rate``; 0 keeps ``α``
      fixed);
    * server: ``w_{t+1} = w_t - γ Σ p_i (w_t - w_i)`` (``p_i ∝`` cohort weight; ``γ = 1`` is
      FedAvg of the global copies).

    Client ``i``'s personalised model is ``α_i v_i + (1 - α_i) w`` (:func:`personal_params`);
    ``v_i`` starts at the initial global model and ``α_i`` at ``alpha``. An all-padding step
    changes nothing.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax optimiser of the global copy (default ``optax.sgd(0.1)``).
      alpha: the initial mixing weight ``α_i`` of every client, in ``[0, 1]`` (paper: 0.25).
      alpha_learning_rate: ``η_α >= 0``, the SGD rate of ``α`` (0: a fixed ``α``).
      personal_optimizer: optax optimiser of ``v_i`` (default: ``client_optimizer``; a fresh
        state every round).
      server_optimizer: the server optimiser of the global model (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ``.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``;
      ``state.client_states`` is an :class:`APFLClientState` with leaves ``[N, ...]``.

    References:
      Deng, Kamani & Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461,
      2020, Algorithm 1.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.apfl import apfl
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = apfl(loss, optax.sgd(0.1), alpha=0.5)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 2)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.array([1]))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(2), num_clients=2), cohort,
      ...                         jax.random.key(0))
      >>> state.client_states.local[:, 0].tolist()  # v <- v - η α ∇f(v̄) on client 1 only
      [0.0, 0.10000000149011612]
    """
    kit.check_loss_fn(loss_fn)
    kit.check_in_range("alpha", alpha, 0.0, 1.0, hint=" (the initial mixing weight α)")
    kit.check_positive("alpha_learning_rate", alpha_learning_rate, allow_zero=True,
                       hint=" (0 keeps α fixed)")
    client_optimizer = kit.client_optimizer(client_optimizer)
    personal_optimizer = (client_optimizer if personal_optimizer is None
                          else kit.client_optimizer(personal_optimizer))
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    grad = jax.grad(loss_fn)
    value_and_grad = jax.value_and_grad(loss_fn)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        per_client = () if n is None else APFLClientState(
            kit.copies_per_client(params, n),
            jnp.full((n,), alpha, jnp.result_type(float)),
        )
        return kit.server_state(params, server_optimizer, aggregator, client_states=per_client)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)

        def step(w, carry, batch, k):  # carry: (w's optimiser state, v, v's optimiser state, α)
            w_opt, v, v_opt, a = carry
            loss, g_w = value_and_grad(w, batch, k)
            mixed = mix(a, v, w)
            g_mixed = grad(mixed, batch, k)
            g_v = optax.tree.scale(a, g_mixed)
            g_a = optax.tree.vdot(optax.tree.sub(v, w), g_mixed)
            w_updates, w_opt = client_optimizer.update(g_w, w_opt, w)
            v_updates, v_opt = personal_optimizer.update(g_v, v_opt, v)
            a = jnp.clip(a - alpha_learning_rate * g_a, 0.0, 1.0).astype(a.dtype)
            new_w = optax.apply_updates(w, w_updates)
            return new_w, (w_opt, optax.apply_updates(v, v_updates), v_opt, a), loss, ()

        w0 = state.params
        v0, a0 = client.state
        carry = (client_optimizer.init(w0), v0, personal_optimizer.init(v0), a0)
        result = kit.local_loop(step, w0, carry, client.batches, key, unroll=unroll)
        _, v, _, a = result.opt_state
        return ClientOutput(kit.client_delta(w0, result.params), client.weight, result.metrics,
                            APFLClientState(v, a))

    server_update = kit.server_step(server_optimizer)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))
