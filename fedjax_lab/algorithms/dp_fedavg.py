"""DP-FedAvg (McMahan et al., ICLR 2018): FedAvg with user-level differential privacy.

Each round's client deltas are clipped and summed, Gaussian noise is added to the sum and the
result divided by a fixed denominator (:func:`fedjax_lab.privacy.dp_aggregator`); the server then
takes an ordinary FedOpt step. Account for the privacy spent with
:func:`fedjax_lab.privacy.epsilon`.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

from fedjax_lab import kit
from fedjax_lab import server as server_lib
from fedjax_lab._types import FederatedAlgorithm, LossFn
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.composed import with_privacy
from fedjax_lab.algorithms.fedavg import fed_avg

__all__ = ["dp_fed_avg"]


@register("dp_fedavg")
def dp_fed_avg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
    expected_cohort_size: float | None = None,
    per_layer: bool = False,
    layer_budget: str | Sequence[float] = "equal",
    adaptive_clipping: bool = False,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
    unroll: int | bool = 1,
    name: str = "dp_fedavg",
) -> FederatedAlgorithm:
    """DP-FedAvg: clipped client deltas, Gaussian noise on their sum, a fixed denominator.

    Update rule (round t, clip ``C``, noise multiplier ``z``, denominator ``m``):

    * client i: local training from ``x_t``; ``Δ_i = x_t - x_i``; clipped
      ``Δ̃_i = Δ_i min(1, C / ||Δ_i||)`` (or per layer, see
      :func:`fedjax_lab.privacy.dp_aggregator`); every participant has weight 1;
    * server: ``g_t = (Σ_i Δ̃_i + N(0, (z C)² I)) / m``; ``x_{t+1} = x_t - η_g g_t`` (with
      ``server_momentum`` β > 0: heavy-ball momentum on ``g_t``, FedAvgM, as in the paper).

    ``m`` is ``expected_cohort_size`` (for Poisson sampling ``q N``) or, by default, the
    cohort size. With ``adaptive_clipping=True`` the clip norm follows the ``target_quantile``
    of the update norms (Andrew et al. 2021), privately.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      noise_multiplier: ``z >= 0`` (paper: about 1).
      clip_norm: ``C > 0`` (the initial value when adaptive).
      server_optimizer: the server optimiser on the noisy mean (default FedSGD at
        ``server_learning_rate``, with ``server_momentum``); give it or ``server_momentum``.
      server_learning_rate: ``η_g`` (paper: 1.0).
      server_momentum: ``β`` of server momentum (0: plain FedAvg; the paper also uses 0.9).
      expected_cohort_size: the fixed denominator ``m`` (``None``: the cohort size).
      per_layer: clip each leaf separately with budget ``layer_budget``.
      layer_budget: ``"equal"``, ``"size"`` or per-leaf shares.
      adaptive_clipping: adapt ``C`` geometrically toward ``target_quantile``.
      target_quantile: ``γ`` (paper: 0.5).
      clip_learning_rate: ``η_C`` (paper: 0.2).
      clipped_count_stddev: ``σ_b`` (paper: ``m / 20``).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; the clip norm lives in
      ``state.aggregator_state.clip_norm``.

    References:
      McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
      Models", ICLR 2018. Andrew et al., "Differentially Private Learning with Adaptive
      Clipping", NeurIPS 2021.

    Example:
      >>> import jax.numpy as jnp
      >>> alg = dp_fed_avg(lambda p, b, k: jnp.sum(p ** 2), noise_multiplier=0.5, clip_norm=0.1)
      >>> alg.name, round(float(alg.init(jnp.zeros(2)).aggregator_state.clip_norm), 4)
      ('dp_fedavg', 0.1)
    """
    kit.check_in_range("server_momentum", server_momentum, 0.0, 1.0, high_open=True)
    if server_optimizer is not None and server_momentum > 0:
        raise ValueError(
            "server_momentum: give either server_optimizer or server_momentum, not both."
        )
    if server_optimizer is None and server_momentum > 0:
        server_optimizer = server_lib.fed_avgm(server_learning_rate, momentum=server_momentum)
    alg = fed_avg(loss_fn, client_optimizer, server_optimizer=server_optimizer,
                  server_learning_rate=server_learning_rate, unroll=unroll, name=name)
    return with_privacy(
        alg,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        expected_cohort_size=expected_cohort_size,
        per_layer=per_layer,
        layer_budget=layer_budget,
        adaptive_clipping=adaptive_clipping,
        target_quantile=target_quantile,
        clip_learning_rate=clip_learning_rate,
        clipped_count_stddev=clipped_count_stddev,
    )
