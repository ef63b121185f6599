"""DP-FTRL (Kairouz et al., ICML 2021): user-level DP without any sampling assumption.

Clients train locally and send clipped deltas, as in DP-FedAvg; the server does not noise each
round's sum but the running sum over rounds, with tree-aggregated noise
(:func:`fedjax_lab.privacy.tree_aggregator`), and sets the model from it in the FTRL form
``x_t = x_0 - η v_t``, ``v_t = γ v_{t-1} + s̃_t / m`` (the server optimiser applied to the noisy
prefix sum, its step taken from ``x_0``). The privacy holds whichever clients take
part each round (no Poisson sampling or shuffling needed); account for it with
:func:`fedjax_lab.privacy.ftrl_epsilon`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax

from fedjax_lab import kit, privacy
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
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.fedavg import fed_avg

__all__ = ["FTRLServerState", "dp_ftrl"]


class FTRLServerState(NamedTuple):
    """DP-FTRL's server state (``ServerState.extra``; ``v_t`` is the server optimiser's state).

    Attributes:
      init_params: ``x_0``, the model every FTRL step starts from.
    """

    init_params: Params


@register("dp_ftrl")
def dp_ftrl(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
    expected_cohort_size: float | None = None,
    max_participations: int | None = None,
    unroll: int | bool = 1,
    name: str = "dp_ftrl",
) -> FederatedAlgorithm:
    """DP-FTRL: clipped client deltas, a noisy prefix sum over rounds, an FTRL server step.

    Update rule (round ``t = 1, 2, ...``, clip ``C``, noise multiplier ``z``, denominator ``m``,
    server rate ``η``, momentum ``γ``):

    * client i: local training from ``x_{t-1}``; ``Δ_i = x_{t-1} - x_i``; clipped
      ``Δ̃_i = Δ_i min(1, C / ||Δ_i||)``; every participant has weight 1;
    * tree: ``s̃_t = Σ_{s<=t} Σ_i Δ̃_i^s + T_t``, with ``T_t`` the sum of the noises
      ``N(0, (z C)² I)`` of the at most ``ceil(log2(t+1))`` binary-tree nodes that make up the
      prefix ``[1, t]`` (each node's noise drawn once,
      :func:`fedjax_lab.privacy.tree_prefix_noise`);
    * server (FTRL form): ``v_t = γ v_{t-1} + s̃_t / m``, ``x_t = x_0 - η v_t``. With
      ``γ = 0`` this is ``x_t = argmin_x <s̃_t / m, x> + ||x - x_0||² / (2 η)``; ``γ > 0`` is
      the paper's DP-FTRLM (momentum on the noisy prefix sums; post-processing, so the privacy
      is the same). It is the server optimiser ``fl.server.fed_avgm(η, γ)`` (``fed_sgd(η)``
      for ``γ = 0``) fed ``s̃_t / m``, its update added to ``x_0``: ``x_t = x_0 + u_t``. Another
      ``server_optimizer`` is used the same way (still post-processing).

    ``max_participations = k`` enforces the participation bound the accounting needs: each
    client keeps a count of the rounds it took part in (per-client state) and, from its
    ``k``-th on, sends nothing (weight 0); :func:`fedjax_lab.experiment.privacy_spent` then
    accounts for ``k`` participations instead of one in every round.

    Without noise (``z = 0``) and momentum this is exactly clipped FedAvg with the server step
    ``x_t = x_{t-1} - η Σ_i Δ̃_i / m`` (a telescoping sum). ``m`` is ``expected_cohort_size``
    (default: the number of cohort slots).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      noise_multiplier: ``z >= 0``, the noise of each tree node in units of ``C``.
      clip_norm: ``C >= 0``.
      server_optimizer: the map from ``s̃_t / m`` to ``x_t - x_0`` (default ``fed_sgd(η)``,
        or ``fed_avgm(η, γ)`` with ``server_momentum``); give it or ``server_momentum``.
      server_learning_rate: ``η > 0`` (``1/λ`` of the paper's regulariser).
      server_momentum: ``γ`` in ``[0, 1)`` (paper: 0.9 for DP-FTRLM).
      expected_cohort_size: the fixed denominator ``m`` (``None``: the cohort size).
      max_participations: ``k >= 1``: no client contributes to more than ``k`` rounds (needs
        ``alg.init(params, num_clients=N)``); ``None``: no bound.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; the tree lives in ``state.aggregator_state``
      (:class:`fedjax_lab.privacy.TreeAggregatorState`), ``x_0`` in ``state.extra``
      (:class:`FTRLServerState`), ``v_t`` in ``state.opt_state``. Its clients send the delta,
      but its aggregate is a prefix sum, so it does not compose with ``with_aggregator`` /
      ``with_privacy``.

    References:
      Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning
      without Sampling or Shuffling", ICML 2021.

    Example:
      >>> import jax.numpy as jnp
      >>> alg = dp_ftrl(lambda p, b, k: jnp.sum(p ** 2), noise_multiplier=0.5, clip_norm=0.1)
      >>> state = alg.init(jnp.ones(2))
      >>> alg.name, int(state.aggregator_state.step), state.extra.init_params.tolist()
      ('dp_ftrl', 0, [1.0, 1.0])
    """
    kit.check_positive("server_learning_rate", server_learning_rate)
    kit.check_count("max_participations", max_participations, 1, optional=True)
    kit.check_in_range("server_momentum", server_momentum, 0.0, 1.0, high_open=True)
    if server_optimizer is not None and server_momentum > 0:
        raise ValueError(
            "server_momentum: give either server_optimizer or server_momentum, not both."
        )
    if server_optimizer is None and server_momentum > 0:
        server_optimizer = server_lib.fed_avgm(server_learning_rate, momentum=server_momentum)
    server_opt = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = privacy.tree_aggregator(
        noise_multiplier, clip_norm, expected_cohort_size=expected_cohort_size
    )
    base = fed_avg(loss_fn, client_optimizer, aggregator=aggregator, unroll=unroll, name=name)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        counts = () if max_participations is None or n is None else jnp.zeros(n, jnp.int32)
        return kit.server_state(params, server_opt, aggregator, client_states=counts,
                                extra=FTRLServerState(init_params=params))

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        out = base.client_update(state, client, key)
        if max_participations is None:
            return out
        kit.require_client_state(client.state, name)
        weight = jnp.where(client.state < max_participations, out.weight, 0.0)
        took_part = (jnp.asarray(weight) > 0).astype(jnp.int32)
        return out._replace(weight=weight, state=client.state + took_part)

    def server_update(state: ServerState, prefix: PyTree, key: PRNGKey) -> ServerState:
        del key
        updates, opt_state = server_opt.update(prefix, state.opt_state, state.params)
        params = optax.apply_updates(state.extra.init_params, updates)
        return state._replace(params=params, opt_state=opt_state)

    return base._replace(init=init, client_update=client_update, server_update=server_update,
                         update_is_delta=False)
