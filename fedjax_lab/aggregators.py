"""Aggregators: a cohort of client updates becomes one update.

An :class:`~fedjax_lab.Aggregator` comes in two halves so that a client map can stream it:
``prepare`` runs once per client inside the map, and its contributions are summed over the cohort
(``reduce="sum"``; memory does not grow with the cohort, across devices it is one ``psum``) or
stacked (``reduce="stack"``, for rules that need every update at once); ``finalize`` turns them into
the aggregate. Every aggregator handles an all-zero-weight cohort: its total weight is 0 and the
round is skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab._types import Aggregator, PyTree
from fedjax_lab.robust import (
    centered_clipping,
    coordinate_median,
    geometric_median,
    krum,
    multi_krum,
    trimmed_mean,
)

__all__ = [
    "Aggregator",
    "centered_clipping",
    "coordinate_median",
    "geometric_median",
    "krum",
    "multi_krum",
    "trimmed_mean",
    "weighted_mean",
]


def weighted_mean() -> Aggregator:
    """The weighted mean of the client updates, streamed as a running sum.

    ``aggregate = sum_i w_i u_i / sum_i w_i``. With FedAvg's weights (examples held) and
    ``u_i = x - x_i`` this is the pseudo-gradient ``x - sum_i p_i x_i``. When every weight is 0
    the aggregate is zeros and the total weight 0 (the round is skipped).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="sum"``.

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = weighted_mean()
      >>> pairs = [(1.0, 1.0), (3.0, 3.0)]
      >>> parts = [agg.prepare({"w": jnp.array(u)}, jnp.array(w), ()) for u, w in pairs]
      >>> summed = jax.tree.map(lambda a, b: a + b, *parts)
      >>> mean, total, _ = agg.finalize(summed, (), jax.random.key(0))
      >>> float(mean["w"]), float(total)
      (2.5, 4.0)
    """

    def init(params: PyTree) -> tuple:
        del params
        return ()

    def prepare(update: PyTree, weight: jax.Array, state: tuple) -> tuple[PyTree, jax.Array]:
        del state
        weight = jnp.asarray(weight, jnp.float32)
        return optax.tree.scale(weight, update), weight

    def finalize(contribution, state, key):
        del key
        total_update, total_weight = contribution
        safe = jnp.where(total_weight > 0, total_weight, 1.0)
        return optax.tree.scale(1.0 / safe, total_update), total_weight, state

    return Aggregator(init, prepare, finalize, reduce="sum")
