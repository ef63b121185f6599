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

from fedjax_lab import kit
from fedjax_lab._registry import Registry
from fedjax_lab._types import Aggregator, PyTree
from fedjax_lab.robust import (
    bulyan,
    centered_clipping,
    coordinate_median,
    fltrust,
    geometric_median,
    krum,
    multi_krum,
    trimmed_mean,
)
from fedjax_lab.secagg import secure_aggregator

__all__ = [
    "REGISTRY",
    "Aggregator",
    "bulyan",
    "centered_clipping",
    "coordinate_median",
    "fltrust",
    "geometric_median",
    "from_name",
    "krum",
    "mean_and_sum",
    "multi_krum",
    "trimmed_mean",
    "weighted_mean",
    "weighted_sum",
]

REGISTRY = Registry("aggregator")
"""Aggregators by short name (the ``[aggregator]`` table of a config): ``REGISTRY[name](**hp)``."""


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
        weight = jnp.asarray(weight)  # f32 (f64 kept under jax_enable_x64)
        weight = weight.astype(jnp.promote_types(weight.dtype, jnp.float32))
        return optax.tree.scale(weight, update), weight

    def finalize(contribution, state, key):
        del key
        total_update, total_weight = contribution
        safe = jnp.where(total_weight > 0, total_weight, 1.0)
        return optax.tree.scale(1.0 / safe, total_update), total_weight, state

    return Aggregator(init, prepare, finalize, reduce="sum")


def mean_and_sum() -> Aggregator:
    """Client update ``(u, v)`` -> ``(Σ w_i u_i / Σ w_i, Σ_i v_i)``: a weighted mean and a sum.

    The sum runs over every client the engine kept (weights do not enter it): it carries the
    change of per-client state (``Δc_i`` of SCAFFOLD, ``θ_i - θ`` of FedDyn) into a server
    average over the whole population, which must count exactly the clients whose state
    changed. A dropped client's update is zeroed by the engine and its state kept, so both
    stay consistent.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = mean_and_sum()
      >>> parts = [agg.prepare((jnp.array(u), jnp.array(v)), jnp.array(w), ())
      ...          for u, v, w in [(1.0, 1.0, 1.0), (3.0, 1.0, 3.0)]]
      >>> (mean, total_v), weight, _ = agg.finalize(jax.tree.map(jnp.add, *parts), (),
      ...                                           jax.random.key(0))
      >>> float(mean), float(total_v), float(weight)
      (2.5, 2.0, 4.0)
    """

    def prepare(update, weight):
        u, v = update
        weight = jnp.asarray(weight, jnp.float32)
        return optax.tree.scale(weight, u), v, weight

    def finalize(contribution):
        total_u, total_v, total_weight = contribution
        safe = jnp.where(total_weight > 0, total_weight, 1.0)
        return (optax.tree.scale(1.0 / safe, total_u), total_v), total_weight

    return kit.stateless_aggregator(prepare, finalize, reduce="sum")


def weighted_sum() -> Aggregator:
    """``Σ_i w_i u_i``, not normalised (FedAU divides by the population size itself).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = weighted_sum()
      >>> parts = [agg.prepare(jnp.array(u), jnp.array(w), ()) for u, w in [(1.0, 2.0), (3.0, 1.0)]]
      >>> total, weight, _ = agg.finalize(jax.tree.map(jnp.add, *parts), (), jax.random.key(0))
      >>> float(total), float(weight)
      (5.0, 3.0)
    """

    def prepare(update, weight):
        weight = jnp.asarray(weight, jnp.float32)
        return optax.tree.scale(weight, update), weight

    return kit.stateless_aggregator(prepare, lambda contribution: contribution, reduce="sum")


REGISTRY.register("mean")(weighted_mean)
REGISTRY.register("median")(coordinate_median)
REGISTRY.register("trimmed_mean")(trimmed_mean)
REGISTRY.register("krum")(krum)
REGISTRY.register("multi_krum")(multi_krum)
REGISTRY.register("geometric_median")(geometric_median)
REGISTRY.register("centered_clipping")(centered_clipping)
REGISTRY.register("bulyan")(bulyan)
REGISTRY.register("secure_mean")(secure_aggregator)


def from_name(name: str, **hparams) -> Aggregator:
    """Builds the aggregator registered as ``name`` with its hyper-parameters (for configs).

    Every keyword is checked against the factory's signature first.

    Example:
      >>> from_name("trimmed_mean", trim_fraction=0.2).reduce
      'stack'
      >>> try:
      ...     from_name("trimmed_mean", beta=0.2)
      ... except ValueError as e:
      ...     print(e)
      aggregator.beta: not an option of aggregator 'trimmed_mean'; allowed: 'trim_fraction'.
    """
    return REGISTRY.build(name, hparams, where="aggregator")
