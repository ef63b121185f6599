"""FedAU (Wang & Ji): FedAvg with aggregation weights estimated online from participation.

Clients that take part rarely are under-represented by FedAvg; if client ``i`` participates with
unknown probability ``p_i``, weighting its update by ``ω_i ≈ 1/p_i`` makes the aggregate an
unbiased estimate of the full-participation average. FedAU estimates ``1/p_i`` as the mean
interval between the client's participations, with intervals cut off at ``K`` rounds.
"""

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

__all__ = ["FedAUClientState", "fed_au", "interval_estimate"]


class FedAUClientState(NamedTuple):
    """Per-client participation statistics of FedAU (stacked ``[N]`` in ``client_states``).

    Attributes:
      last: ``i32`` the round at which the client's last interval ended (``-1`` at the start).
      mean: ``f32`` ``S_i``, the running mean of the completed intervals (the weight ``ω_i``).
      count: ``f32`` ``M_i``, how many intervals the mean holds.
    """

    last: jax.Array
    mean: jax.Array
    count: jax.Array


def interval_estimate(
    stats: FedAUClientState, round: jax.Array, cutoff: int
) -> FedAUClientState:
    """Updates one client's statistics when it participates in ``round`` (FedAU, Algorithm 2).

    The paper's online estimator keeps a counter ``R_i`` that grows by one each round; when the
    client participates, or when ``R_i`` reaches the cutoff ``K``, the interval ``R_i`` is added to
    the running mean ``S_i <- (M_i S_i + R_i) / (M_i + 1)``, ``M_i <- M_i + 1`` and ``R_i <- 0``.
    Here the cut-off intervals of an absent client are added lazily at its next participation:
    after a gap ``g = round - last`` the mean receives ``m = floor((g - 1) / K)`` intervals of
    length ``K`` and one of length ``g - m K`` — exactly the paper's sequence of updates.

    Args:
      stats: the client's :class:`FedAUClientState`.
      round: the current round ``t`` (it participates in it).
      cutoff: ``K >= 1``.

    Returns:
      The new statistics; ``mean`` is the weight ``ω_i`` used in round ``t``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = FedAUClientState(jnp.array(-1), jnp.array(0.0), jnp.array(0.0))
      >>> s = interval_estimate(s, jnp.array(3), 50)   # first participation in round 3
      >>> s = interval_estimate(s, jnp.array(5), 50)   # next one 2 rounds later
      >>> float(s.mean), float(s.count)
      (3.0, 2.0)
    """
    gap = (jnp.asarray(round, jnp.int32) - stats.last).astype(jnp.int32)
    full = jnp.maximum(gap - 1, 0) // cutoff
    rest = (gap - full * cutoff).astype(jnp.float32)
    full = full.astype(jnp.float32)
    count = stats.count + full + 1.0
    mean = (stats.count * stats.mean + full * cutoff + rest) / count
    return FedAUClientState(jnp.asarray(round, jnp.int32), mean, count)


@register("fedau")
def fed_au(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    cutoff: int = 50,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedau",
) -> FederatedAlgorithm:
    """FedAU: FedAvg whose aggregation weights are online estimates of ``1/p_i``.

    Update rule (round ``t``, participating set ``S_t``, population of ``N`` clients):

    * client ``i ∈ S_t``: local training from ``x_t`` gives ``x_i``; ``Δ_i = x_t - x_i``; its
      participation statistics are updated (:func:`interval_estimate`, cutoff ``K``) and
      ``ω_i = S_i``, the mean interval between its participations (``≈ 1/p_i``);
    * server: ``x_{t+1} = x_t - γ (1/N) Σ_{i ∈ S_t} ω_i Δ_i``.

    The objective is the uniform mean ``(1/N) Σ_i F_i`` of the paper: the cohort weight (examples
    held) only says whether a slot is a real participant (weight > 0); a padding slot (weight 0,
    e.g. from :func:`fedjax_lab.data.participation.bernoulli`) keeps its statistics unchanged. The
    paper's setting is "every available client participates": use a participation sampler with
    ``cohort_size = N``. Requires ``alg.init(params, num_clients=N)``.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      cutoff: ``K``, the longest interval counted (paper: 50); bounds ``ω_i <= K``.
      server_optimizer: the server optimiser on ``(1/N) Σ ω_i Δ_i`` (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ`` (1.0 in the paper's analysis form).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; ``state.client_states`` is a
      :class:`FedAUClientState` of ``[N]`` arrays.

    References:
      Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
      Federated Averaging", ICLR 2024 (arXiv:2306.03401), Algorithms 1 and 2.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.fedau import fed_au
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fed_au(loss, cutoff=10)
      >>> state = alg.init(jnp.zeros(2), num_clients=4)
      >>> cohort = fl.Cohort({"x": jnp.ones((2, 1, 3, 2)), "y": jnp.ones((2, 1, 3)),
      ...                     "mask": jnp.ones((2, 1, 3))}, jnp.ones(2), jnp.array([0, 3]))
      >>> state, _ = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> state.client_states.mean.tolist()   # both first seen in round 0: interval 1
      [1.0, 0.0, 0.0, 1.0]
    """
    kit.check_loss_fn(loss_fn)
    kit.check_count("cutoff", cutoff)
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_sum()
    train = kit.local_training(loss_fn, client_optimizer, unroll=unroll)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        stats = () if n is None else FedAUClientState(
            jnp.full((n,), -1, jnp.int32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32),
        )
        return kit.server_state(params, server_optimizer, aggregator, client_states=stats)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)
        result = train(state.params, client.batches, key)
        delta = kit.client_delta(state.params, result.params)
        present = client.weight > 0
        new_stats = interval_estimate(client.state, state.round, cutoff)
        stats = optax.tree.where(present, new_stats, client.state)
        omega = jnp.where(present, new_stats.mean, 0.0)
        metrics = dict(result.metrics, fedau_weight_sum=omega)
        return ClientOutput(delta, omega, metrics, stats)

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        n = kit.population_size(state.client_states)
        return kit.apply_server_optimizer(state, server_optimizer,
                                          optax.tree.scale(1.0 / n, aggregate))

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
