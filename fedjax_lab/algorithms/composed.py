"""Combinators: an algorithm with another aggregator, DP, attackers or compression.

Each takes a :class:`~fedjax_lab.FederatedAlgorithm` and returns one, so parts compose with any
algorithm that fits them (the ``[aggregator]``, ``[privacy]``, ``[attack]`` and ``[compression]``
tables of a config apply them in that spirit):

=================================  =============================================================
:func:`with_aggregator`            replaces the aggregation (robust rules, any ``Aggregator``)
:func:`with_privacy`               DP-FedAvg's clipping and Gaussian noise as the aggregation
:func:`with_attack`                malicious clients (:func:`fedjax_lab.attacks.attacked`)
:func:`with_compression`           compressed uplink with optional error feedback
                                   (:func:`fedjax_lab.compression.compressed`)
=================================  =============================================================

Replacing the aggregation needs an algorithm whose clients send the plain model delta
(``alg.update_is_delta``); SCAFFOLD, FedNova and the others that send more are refused with a
message before anything runs. Attacks and compression without error feedback wrap any
algorithm.

The registered ``robust_fedavg``, ``fedavg_topk`` and ``fedavg_qsgd`` are FedAvg composed this
way (kept for their configs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab import attacks as attacks_lib
from fedjax_lab import compression as compression_lib
from fedjax_lab import privacy
from fedjax_lab._types import Aggregator, FederatedAlgorithm, LossFn, Params, ServerState
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.fedavg import fed_avg

__all__ = [
    "fed_avg_qsgd",
    "fed_avg_topk",
    "robust_fed_avg",
    "with_aggregator",
    "with_attack",
    "with_compression",
    "with_privacy",
]

with_attack = attacks_lib.attacked
with_compression = compression_lib.compressed


def with_aggregator(alg: FederatedAlgorithm, aggregator: Aggregator) -> FederatedAlgorithm:
    """``alg`` whose cohort of model deltas is combined by ``aggregator`` instead.

    The aggregator's state replaces ``alg``'s in ``state.aggregator_state``; the client and
    server steps are ``alg``'s.

    Args:
      alg: an algorithm whose clients send the model delta (``alg.update_is_delta``).
      aggregator: any :class:`~fedjax_lab.Aggregator` (e.g. ``fl.aggregators.trimmed_mean()``).

    Returns:
      The :class:`~fedjax_lab.FederatedAlgorithm`, named as ``alg``.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum(p ** 2)
      >>> alg = with_aggregator(fl.algorithms.fed_adam(loss), fl.aggregators.trimmed_mean(0.2))
      >>> alg.aggregator.reduce
      'stack'
      >>> try:
      ...     with_aggregator(fl.algorithms.scaffold(loss), fl.aggregators.coordinate_median())
      ... except ValueError as e:
      ...     print(str(e)[:60])
      aggregator: scaffold's clients send more than the model delt
    """
    if not isinstance(alg, FederatedAlgorithm):
        raise TypeError(f"alg: expected a fl.FederatedAlgorithm, got {type(alg).__name__}.")
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator: expected a fl.Aggregator such as fl.aggregators.trimmed_mean(), "
            f"got {type(aggregator).__name__}."
        )
    if not alg.update_is_delta:
        raise ValueError(
            f"aggregator: {alg.name}'s clients send more than the model delta, so its "
            "aggregation is part of the algorithm; another aggregator (a robust rule, DP) "
            "applies only to algorithms whose clients send the delta (fedavg, fedopt, fedprox, "
            "ditto, fedrep, ...)."
        )

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        return alg.init(params, num_clients)._replace(aggregator_state=aggregator.init(params))

    return alg._replace(init=init, aggregator=aggregator)


def with_privacy(
    alg: FederatedAlgorithm,
    *,
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    expected_cohort_size: float | None = None,
    per_layer: bool = False,
    layer_budget: str | Sequence[float] = "equal",
    adaptive_clipping: bool = False,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
) -> FederatedAlgorithm:
    """``alg`` with user-level DP: clipped deltas, Gaussian noise on their sum, a fixed denominator.

    The aggregation becomes :func:`fedjax_lab.privacy.dp_aggregator` (see it for the rule and
    every argument); ``alg``'s server optimiser then takes the noisy mean. Account the privacy
    spent with :func:`fedjax_lab.privacy.epsilon`.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = with_privacy(fl.algorithms.fed_avg(lambda p, b, k: jnp.sum(p ** 2)),
      ...                    noise_multiplier=0.5, clip_norm=0.1)
      >>> round(float(alg.init(jnp.zeros(2)).aggregator_state.clip_norm), 4)
      0.1
    """
    aggregator = privacy.dp_aggregator(
        noise_multiplier,
        clip_norm,
        expected_cohort_size=expected_cohort_size,
        per_layer=per_layer,
        layer_budget=layer_budget,
        adaptive=adaptive_clipping,
        target_quantile=target_quantile,
        clip_learning_rate=clip_learning_rate,
        clipped_count_stddev=clipped_count_stddev,
    )
    return with_aggregator(alg, aggregator)


@register("robust_fedavg")
def robust_fed_avg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    aggregator: str = "median",
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    trim_fraction: float = 0.1,
    f: int = 1,
    m: int | None = None,
    gm_iters: int = 10,
    nu: float = 1e-6,
    tau: float = 1.0,
    cc_iters: int = 1,
    attack: str = "none",
    attack_fraction: float = 0.0,
    attack_num_clients: int | None = None,
    attack_seed: int | None = None,
    attack_scale: float | None = None,
    attack_noise_std: float = 1.0,
    num_classes: int | None = None,
    unroll: int | bool = 1,
    name: str | None = None,
    attack_malicious: Any = None,
) -> FederatedAlgorithm:
    """FedAvg whose aggregate is a robust rule chosen by name, optionally under attack.

    ``x_{t+1} = x_t - η_g Agg({Δ_i})``: :func:`with_attack` of :func:`with_aggregator` of
    FedAvg, in one flat table (a config can also write ``name = "fedavg"`` with ``[aggregator]``
    and ``[attack]`` tables, which is the same thing for any algorithm). ``aggregator`` is a
    name of :data:`fedjax_lab.aggregators.REGISTRY`; ``trim_fraction`` (trimmed mean), ``f``,
    ``m`` (Krum; ``f`` also Bulyan), ``gm_iters``, ``nu`` (geometric median), ``tau``,
    ``cc_iters`` (centered clipping) are its hyper-parameters; ``attack*`` and ``num_classes`` go to
    :func:`fedjax_lab.attacks.attacked` (``attack`` may also be an ``fl.attacks.Attack``, e.g.
    :func:`fedjax_lab.attacks.mixed`; ``attack_malicious`` is its ``malicious`` mask).

    Example:
      >>> import jax.numpy as jnp
      >>> alg = robust_fed_avg(lambda p, b, k: jnp.sum(p ** 2), aggregator="trimmed_mean",
      ...                      attack="sign_flip", attack_fraction=0.2)
      >>> alg.name, alg.aggregator.reduce
      ('robust_fedavg+sign_flip', 'stack')
    """
    rule_options = {
        "trimmed_mean": {"trim_fraction": trim_fraction},
        "krum": {"f": f},
        "multi_krum": {"f": f, "m": m},
        "geometric_median": {"iters": gm_iters, "nu": nu},
        "centered_clipping": {"tau": tau, "iters": cc_iters},
        "bulyan": {"f": f},
    }.get(aggregator, {})
    agg = aggregators_lib.from_name(aggregator, **rule_options)
    alg = fed_avg(loss_fn, client_optimizer, server_optimizer=server_optimizer,
                  server_learning_rate=server_learning_rate, unroll=unroll,
                  name="robust_fedavg")
    alg = with_aggregator(alg, agg)
    alg = attacks_lib.attacked(
        alg,
        attack,
        fraction=attack_fraction,
        num_clients=attack_num_clients,
        seed=attack_seed,
        scale=attack_scale,
        noise_std=attack_noise_std,
        num_classes=num_classes,
        malicious=attack_malicious,
    )
    return alg if name is None else alg._replace(name=name)


@register("fedavg_topk")
def fed_avg_topk(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    fraction: float = 0.01,
    error_feedback: str | None = "ef",
    num_clients: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedavg_topk",
) -> FederatedAlgorithm:
    """FedAvg whose clients send the top-``fraction`` entries of their delta, with EF memory.

    ``with_compression(fed_avg(...), top_k(fraction), error_feedback=...)``; see
    :func:`fedjax_lab.compression.compressed`. Error feedback needs the population size:
    ``alg.init(params, num_clients=N)`` (or ``num_clients=N`` here).

    Example:
      >>> import jax.numpy as jnp
      >>> fed_avg_topk(lambda p, b, k: jnp.sum(p ** 2), fraction=0.1).name
      'fedavg_topk'
    """
    return _compressed_fed_avg(loss_fn, client_optimizer, compression_lib.top_k(fraction),
                               error_feedback, num_clients, server_optimizer,
                               server_learning_rate, unroll, name)


@register("fedavg_qsgd")
def fed_avg_qsgd(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    bits: int = 4,
    error_feedback: str | None = None,
    num_clients: int | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedavg_qsgd",
) -> FederatedAlgorithm:
    """FedAvg whose clients send QSGD-quantised deltas (``bits`` per entry, unbiased).

    ``with_compression(fed_avg(...), qsgd(bits), error_feedback=...)``; see
    :func:`fedjax_lab.compression.compressed`.

    Example:
      >>> import jax.numpy as jnp
      >>> fed_avg_qsgd(lambda p, b, k: jnp.sum(p ** 2), bits=2).name
      'fedavg_qsgd'
    """
    return _compressed_fed_avg(loss_fn, client_optimizer, compression_lib.qsgd(bits),
                               error_feedback, num_clients, server_optimizer,
                               server_learning_rate, unroll, name)


def _compressed_fed_avg(loss_fn, client_optimizer, compressor, error_feedback, num_clients,
                        server_optimizer, server_learning_rate, unroll, name):
    base = fed_avg(loss_fn, client_optimizer, server_optimizer=server_optimizer,
                   server_learning_rate=server_learning_rate, unroll=unroll)
    alg = compression_lib.compressed(base, compressor, error_feedback=error_feedback,
                                     num_clients=num_clients)
    return alg._replace(name=name)
