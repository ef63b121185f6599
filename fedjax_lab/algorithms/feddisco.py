"""FedDisco (Ye et al., ICML 2023): aggregation weights from data size and label discrepancy.

A client whose label distribution is far from the global one pulls the model towards its own
classes; FedDisco lowers its aggregation weight by its discrepancy ``d_k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import kit
from fedjax_lab._types import (
    Aggregator,
    ClientInput,
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    Params,
    PRNGKey,
    ServerState,
)
from fedjax_lab.algorithms._registry import register

__all__ = ["disco_weights", "discrepancy", "discrepancy_aggregator", "fed_disco", "label_histogram"]

_METRICS = ("l2", "kl")


def label_histogram(batches: dict[str, jax.Array], num_classes: int, label_key: str = "y"):
    """Counts of each label among a client's real examples (``mask`` honoured).

    Args:
      batches: ``[S, B]`` batches with integer labels ``batches[label_key]`` (``[S, B]``, or
        ``[S, B, T]`` for sequences: every position counts) and ``mask`` ``[S, B]``.
      num_classes: number of classes ``K`` (static).
      label_key: where the labels are.

    Returns:
      ``f32[K]`` label counts.

    Example:
      >>> import jax.numpy as jnp
      >>> b = {"y": jnp.array([[0, 2], [2, 1]]), "mask": jnp.array([[1.0, 1.0], [1.0, 0.0]])}
      >>> label_histogram(b, 3).tolist()
      [1.0, 0.0, 2.0]
    """
    y = batches[label_key]
    mask = batches["mask"]
    # Sequence labels ([S, B, T]): every position of a real example counts.
    m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - mask.ndim)), y.shape)
    return jnp.sum(jax.nn.one_hot(y.reshape(-1), num_classes) * m.reshape(-1)[:, None], axis=0)


def discrepancy(counts: jax.Array, target: jax.Array, metric: str = "l2") -> jax.Array:
    """Discrepancy ``d`` between a label histogram (normalised) and the target distribution.

    ``l2``: ``||D - T||_2``; ``kl``: ``KL(D || T) = Σ_c D_c log(D_c / T_c)`` (``0 log 0 = 0``).
    A client without real examples gets ``d = 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(discrepancy(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]))), 4)
      0.7071
    """
    total = jnp.sum(counts)
    dist = counts / jnp.maximum(total, 1e-12)
    if metric == "l2":
        d = jnp.sqrt(jnp.sum((dist - target) ** 2))
    elif metric == "kl":
        safe = jnp.where(dist > 0, dist, 1.0)
        d = jnp.sum(jnp.where(dist > 0, dist * jnp.log(safe / target), 0.0))
    else:
        raise ValueError(f"metric: expected one of {_METRICS}, got {metric!r}.")
    return jnp.where(total > 0, d, 0.0)


def disco_weights(sizes: jax.Array, d: jax.Array, a: float, b: float) -> jax.Array:
    """FedDisco's unnormalised scores ``ReLU(n_k / N - a d_k + b)`` (0 where ``n_k = 0``).

    ``N = Σ_k n_k`` over the cohort; the aggregation weights are the scores over their sum.

    Example:
      >>> import jax.numpy as jnp
      >>> w = disco_weights(jnp.array([1.0, 3.0, 0.0]), jnp.array([0.0, 1.0, 0.0]), 0.5, 0.1)
      >>> [round(v, 4) for v in w.tolist()]
      [0.35, 0.35, 0.0]
    """
    sizes = jnp.asarray(sizes, jnp.float32)
    total = jnp.maximum(jnp.sum(sizes), 1e-12)
    score = jax.nn.relu(sizes / total - a * d + b)
    return jnp.where(sizes > 0, score, 0.0)


def discrepancy_aggregator(a: float, b: float) -> Aggregator:
    """Stacks ``(Δ_k, d_k)`` with ``n_k`` and returns ``Σ p_k Δ_k`` with FedDisco's ``p_k``.

    ``p_k = s_k / Σ s_k``, ``s_k = ReLU(n_k/N - a d_k + b)``. When every score is 0 (possible
    with ``b <= 0``) the weights fall back to ``n_k / N`` (FedAvg); a cohort with no real client
    has total weight 0 and the round is skipped.
    """

    def prepare(update, weight):
        return update, jnp.asarray(weight, jnp.float32)

    def finalize(stacked):
        (deltas, d), sizes = stacked
        score = disco_weights(sizes, d, a, b)
        s_total = jnp.sum(score)
        n_total = jnp.sum(sizes)
        w = jnp.where(s_total > 0, score / jnp.where(s_total > 0, s_total, 1.0),
                      sizes / jnp.where(n_total > 0, n_total, 1.0))
        agg = jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), deltas)
        total = jnp.where(s_total > 0, s_total, n_total)
        return agg, total

    return kit.stateless_aggregator(prepare, finalize, reduce="stack")


@register("feddisco")
def fed_disco(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    num_classes: int | None = None,
    a: float = 0.5,
    b: float = 0.1,
    metric: str = "l2",
    target: jax.Array | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    label_key: str = "y",
    unroll: int | bool = 1,
    name: str = "feddisco",
) -> FederatedAlgorithm:
    """FedDisco: FedAvg with discrepancy-aware aggregation weights.

    Update rule (round ``t``, cohort ``S``):

    * client ``k``: local training from ``x_t`` gives ``x_k``; it sends ``Δ_k = x_t - x_k``, its
      size ``n_k`` (the cohort weight) and ``d_k = dist(D_k, T)``, the discrepancy between its
      label distribution ``D_k`` (counted from its batches' labels and masks) and the target ``T``
      (uniform by default, as in the paper: the global test distribution is balanced);
    * server: ``p_k = ReLU(n_k/N - a d_k + b) / Σ_{m∈S} ReLU(n_m/N - a d_m + b)`` with
      ``N = Σ_{m∈S} n_m``, and ``x_{t+1} = x_t - γ Σ_k p_k Δ_k``.

    The histogram counts the examples the client walked this round: with ``epochs = 1`` exactly
    its data, otherwise proportional to it.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      num_classes: number of classes (required).
      a: discrepancy coefficient ``a >= 0`` (paper: 0.5).
      b: offset ``b`` (paper: 0.1).
      metric: ``"l2"`` (paper default) or ``"kl"``.
      target: optional ``[num_classes]`` target label distribution (default uniform).
      server_optimizer: the server optimiser on the re-weighted mean delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ`` (1.0: the new model is ``Σ p_k x_k``).
      label_key: the batch key holding integer labels.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`.

    References:
      Ye et al., "FedDisco: Federated Learning with Discrepancy-Aware Collaboration", ICML 2023.

    Example:
      >>> import jax.numpy as jnp
      >>> from fedjax_lab.algorithms.feddisco import fed_disco
      >>> alg = fed_disco(lambda p, b, k: jnp.sum(p ** 2), num_classes=10)
      >>> alg.name, alg.aggregator.reduce
      ('feddisco', 'stack')
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"num_classes: FedDisco needs the number of classes (a whole number >= 1) to count "
            f"label histograms, got {num_classes!r}."
        )
    if metric not in _METRICS:
        raise ValueError(f"metric: expected one of {_METRICS}, got {metric!r}.")
    if not a >= 0:
        raise ValueError(f"a: the discrepancy coefficient must be >= 0, got {a!r}.")
    if target is None:
        tgt = jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
    else:
        tgt = jnp.asarray(target, jnp.float32)
        if tgt.shape != (num_classes,) or not bool(jnp.all(tgt > 0)):
            raise ValueError(
                f"target: expected {num_classes} positive class probabilities, got shape "
                f"{tgt.shape}."
            )
        tgt = tgt / jnp.sum(tgt)
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = discrepancy_aggregator(float(a), float(b))
    train = kit.local_training(loss_fn, client_optimizer, unroll=unroll)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        if label_key not in client.batches:
            raise ValueError(
                f"label_key: the batches hold no {label_key!r} labels (keys: "
                f"{sorted(client.batches)}); pass label_key= to fed_disco."
            )
        result = train(state.params, client.batches, key)
        delta = kit.client_delta(state.params, result.params)
        counts = label_histogram(client.batches, num_classes, label_key)
        d = discrepancy(counts, tgt, metric)
        metrics = dict(result.metrics, discrepancy_sum=d)
        return ClientOutput((delta, d), client.weight, metrics, ())

    server_update = kit.server_step(server_optimizer)
    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
