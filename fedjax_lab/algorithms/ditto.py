"""Ditto (Li et al., ICML 2021): a FedAvg global model plus a regularised personal model each."""

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

__all__ = ["ditto", "personal_params"]


def personal_params(state: ServerState) -> PyTree:
    """Ditto's personal models ``v_i``, leaves ``[num_clients, ...]`` (for evaluation)."""
    return state.client_states


@register("ditto")
def ditto(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    lam: float = 0.1,  # or a kit.PerClient
    personal_optimizer: optax.GradientTransformation | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    client_learning_rate: float | kit.PerClient | None = None,
    max_local_steps: int | kit.PerClient | kit.BudgetSampler | None = None,
    unroll: int | bool = 1,
    name: str = "ditto",
) -> FederatedAlgorithm:
    """Ditto: FedAvg for the global model ``w``; each client also keeps a personal model ``v_k``.

    Update rule (round ``t``, client ``k`` of the cohort, its ``S`` local batches):

    * global part (FedAvg): ``w_k = LocalTrain(w_t)`` on ``F_k`` with ``client_optimizer``;
      sends ``Δ_k = w_t - w_k``; server ``w_{t+1} = w_t - γ Σ p_k Δ_k`` (``p_k ∝`` cohort weight);
    * personal part: over the same ``S`` batches,
      ``v_k <- v_k - η_p (∇F_k(v_k) + λ (v_k - w_t))``, i.e. ``personal_optimizer`` on
      ``F_k(v) + (λ/2) ||v - w_t||²``, anchored at the round's global model ``w_t``.
      ``v_k`` lives in ``state.client_states`` (initialised to the initial global model) and never
      leaves the client. ``λ = 0`` gives local training only; large ``λ`` pulls ``v_k`` to ``w``
      (keep ``η_p λ < 2`` with SGD for the step to be stable).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax optimiser of the global part (default ``optax.sgd(0.1)``).
      lam: ``λ >= 0`` (the paper tunes it in {0.05, 0.1, 0.2, 0.5, 1, 2}), or one per client
        (:func:`fedjax_lab.kit.per_client`).
      personal_optimizer: optax optimiser of the personal part (default: ``client_optimizer``).
      server_optimizer: the server optimiser of the global model (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ`` (1.0: FedAvg).
      client_learning_rate: instead of ``client_optimizer``: SGD at this rate, scalar or per
        client (:func:`fedjax_lab.kit.per_client`); the personal part uses it too unless
        ``personal_optimizer`` is given.
      max_local_steps: cap on each client's real local steps (both parts), a whole number,
        per client, or sampled each round (:class:`~fedjax_lab.kit.BudgetSampler`; one draw
        serves both parts).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``.

    References:
      Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through
      Personalization", ICML 2021, Algorithm 1.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.ditto import ditto
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = ditto(loss, optax.sgd(0.1), lam=1.0)
      >>> state = alg.init(jnp.zeros(2), num_clients=3)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 2)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.array([2]))
      >>> state, _ = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> [round(v, 3) for v in state.client_states[:, 0].tolist()]  # only client 2's moved
      [0.0, 0.0, 0.2]
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("lam", lam, allow_zero=True, hint=" (the regularisation λ)")
    client_optimizer = kit.client_optimizer_or_rates(client_optimizer, client_learning_rate)
    lr_per_client = client_optimizer is None
    kit.check_step_budget("max_local_steps", max_local_steps)
    personal_given = personal_optimizer is not None
    if personal_given:
        personal_optimizer = kit.client_optimizer(personal_optimizer)
    elif not lr_per_client:
        personal_optimizer = client_optimizer
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    train = None if lr_per_client else kit.local_training(loss_fn, client_optimizer, unroll=unroll)
    per_client = {"lam": lam, "client_learning_rate": client_learning_rate,
                  "max_local_steps": max_local_steps}

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        kit.check_per_client(n, **per_client)
        personal = () if n is None else kit.copies_per_client(params, n)
        return kit.server_state(params, server_optimizer, aggregator, client_states=personal)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)
        w = state.params
        lam_i, lr = kit.for_client((lam, client_learning_rate), client.client_id)
        steps = kit.client_budget(max_local_steps, client.client_id, key)
        if lr_per_client:
            global_train = kit.local_training(loss_fn, optax.sgd(lr), unroll=unroll)
            personal_opt = personal_optimizer if personal_given else optax.sgd(lr)
        else:
            global_train, personal_opt = train, personal_optimizer
        result = global_train(w, client.batches, key, max_steps=steps)

        def personal_loss(v, batch, k):
            diff = optax.tree.sub(v, w)
            return loss_fn(v, batch, k) + 0.5 * lam_i * optax.tree.vdot(diff, diff)

        personal = kit.local_training(personal_loss, personal_opt, unroll=unroll)
        # all-masked (or over-budget) steps: v unchanged
        v = personal(client.state, client.batches, key, max_steps=steps).params
        metrics = {**result.metrics, **kit.budget_metrics(max_local_steps, steps, client.weight)}
        return ClientOutput(kit.client_delta(w, result.params), client.weight, metrics, v)

    server_update = kit.server_step(server_optimizer)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn, **per_client))
