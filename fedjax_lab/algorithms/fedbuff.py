"""FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation, simulated.

Asynchrony is simulated inside the compiled round: the server keeps the last ``D`` model
versions in a ring buffer (``state.extra``); every client of the round draws a delay ``d`` and
trains from the version ``d`` updates old (version 0 when there are not that many yet). The
round's ``K`` = cohort-size arrivals form the buffer that the server applies at once, each
update discounted by its staleness.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import aggregators as aggregators_lib
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

__all__ = ["DELAYS", "FedBuffState", "fed_buff", "sample_delay", "staleness_weight"]

DELAYS = ("geometric", "none", "uniform")


class FedBuffState(NamedTuple):
    """FedBuff's server state in ``ServerState.extra``.

    Attributes:
      versions: the ring buffer, every leaf ``[D, ...]``: model version ``v`` sits in slot
        ``v % D`` (at the start every slot holds version 0).
      version: ``i32`` number of server updates applied so far (the current version; a
        skipped round does not count).
    """

    versions: PyTree
    version: jax.Array


def sample_delay(key: PRNGKey, delay: str, max_delay: int, delay_p: float = 0.5) -> jax.Array:
    """Draws one client's delay ``d ∈ {0, ..., max_delay - 1}`` (``i32``).

    ``"uniform"``: uniform over that range; ``"geometric"``: ``P(d = k) ∝ p (1 - p)^k``,
    truncated (the tail mass goes to ``max_delay - 1``); ``"none"``: always 0.

    Example:
      >>> import jax
      >>> int(sample_delay(jax.random.key(0), "none", 4))
      0
    """
    if delay == "none":
        return jnp.zeros((), jnp.int32)
    if delay == "uniform":
        return jax.random.randint(key, (), 0, max_delay, jnp.int32)
    u = jax.random.uniform(key, (), minval=1e-12, maxval=1.0)
    d = jnp.floor(jnp.log(u) / jnp.log1p(-delay_p))
    return jnp.minimum(d, max_delay - 1).astype(jnp.int32)


def staleness_weight(d: jax.Array) -> jax.Array:
    """FedBuff's staleness discount ``s(d) = 1 / sqrt(1 + d)``.

    Example:
      >>> float(staleness_weight(3))
      0.5
    """
    return jax.lax.rsqrt(1.0 + jnp.asarray(d, jnp.float32))


@register("fedbuff")
def fed_buff(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    max_delay: int = 5,
    delay: str = "uniform",
    delay_p: float = 0.5,
    staleness: str = "sqrt",
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
    unroll: int | bool = 1,
    name: str = "fedbuff",
) -> FederatedAlgorithm:
    """FedBuff: clients train from stale versions; the server applies the discounted buffer.

    Update rule (server at version ``t``, ring buffer of versions ``x_{t-D+1..t}``; a round's
    cohort of ``K`` clients is the buffer of ``K`` arrivals):

    * client i: delay ``d_i ~ delay`` on ``{0..D-1}``; start ``y_i = x_{max(t - d_i, 0)}``
      (effective delay ``d_i' = t - max(t - d_i, 0)``); local training gives ``y_i'``; sends
      ``u_i = s(d_i') (y_i - y_i')`` with ``s(d) = 1/sqrt(1 + d)`` (``staleness="sqrt"``) or
      ``s = 1`` (``"constant"``);
    * server: ``g = Σ_i w_i u_i / Σ_i w_i`` (the weighted mean; with uniform weights,
      ``weighting="uniform"`` in :func:`fedjax_lab.run_rounds`, this is the paper's
      ``Σ_i s(d_i) Δ_i / K``); ``x_{t+1} = x_t - η_g g`` (or ``server_optimizer`` on ``g``);
      ``x_{t+1}`` enters the buffer as version ``t + 1``.

    With ``delay="none"`` (or ``max_delay=1``) it is exactly FedAvg. Metrics gain
    ``staleness_sum`` (``Σ d_i'`` over clients of weight > 0).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      server_learning_rate: ``η_g`` (with the default plain server step).
      max_delay: ``D >= 1``, versions kept; delays lie in ``{0..D-1}``.
      delay: ``"uniform"``, ``"geometric"`` or ``"none"`` (see :func:`sample_delay`).
      delay_p: ``p`` of the geometric delay, in ``(0, 1]``.
      staleness: ``"sqrt"`` (``1/sqrt(1+d)``, the paper's) or ``"constant"``.
      server_optimizer: optax transformation on ``g`` (default ``fed_sgd(server_learning_rate)``).
      aggregator: default :func:`fedjax_lab.aggregators.weighted_mean`.
      unroll: ``lax.scan`` unroll of local steps.
      name: a label.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` whose ``state.extra`` is a
      :class:`FedBuffState`.

    References:
      Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.

    Example:
      >>> import jax.numpy as jnp
      >>> alg = fed_buff(lambda p, b, k: jnp.sum(p ** 2), max_delay=3)
      >>> state = alg.init(jnp.zeros(2))
      >>> state.extra.versions.shape, int(state.extra.version)
      ((3, 2), 0)
    """
    kit.check_loss_fn(loss_fn)
    kit.check_count("max_delay", max_delay)
    if delay not in DELAYS:
        raise ValueError(f"delay: got {delay!r}; allowed: {', '.join(map(repr, DELAYS))}.")
    kit.check_in_range("delay_p", delay_p, 0.0, 1.0, low_open=True,
                       hint=" (the geometric parameter)")
    if staleness not in ("sqrt", "constant"):
        raise ValueError(f"staleness: expected 'sqrt' or 'constant', got {staleness!r}.")
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregator if aggregator is not None else aggregators_lib.weighted_mean()
    train = kit.local_training(loss_fn, client_optimizer, unroll=unroll)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        versions = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * max_delay), params)
        return kit.server_state(params, server_optimizer, aggregator,
                                extra=FedBuffState(versions, jnp.zeros((), jnp.int32)))

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        buf: FedBuffState = state.extra
        d = sample_delay(jax.random.fold_in(key, 1), delay, max_delay, delay_p)
        start_version = jnp.maximum(buf.version - d, 0)
        effective = buf.version - start_version
        slot = start_version % max_delay
        start = jax.tree.map(
            lambda v: jax.lax.dynamic_index_in_dim(v, slot, 0, keepdims=False), buf.versions
        )
        result = train(start, client.batches, key)
        s = staleness_weight(effective) if staleness == "sqrt" else jnp.float32(1.0)
        update = jax.tree.map(lambda a, b: (s * (a - b)).astype(a.dtype), start, result.params)
        metrics = dict(result.metrics)
        took_part = (jnp.asarray(client.weight) > 0).astype(jnp.float32)
        metrics["staleness_sum"] = took_part * effective.astype(jnp.float32)
        return ClientOutput(update, client.weight, metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        state = kit.apply_server_optimizer(state, server_optimizer, aggregate)
        params = state.params
        buf: FedBuffState = state.extra
        version = buf.version + 1
        slot = version % max_delay
        versions = jax.tree.map(
            lambda v, p: jax.lax.dynamic_update_index_in_dim(v, p.astype(v.dtype), slot, 0),
            buf.versions,
            params,
        )
        return state._replace(extra=FedBuffState(versions, version))

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))
