"""FedLC (Zhang et al., ICML 2022): logit calibration against label-distribution skew.

Client ``c`` trains on the cross-entropy of CALIBRATED logits: class ``y``'s logit is lowered
by ``τ n_{c,y}^{-1/4}``, where ``n_{c,y}`` is the number of the client's examples of class
``y``, so rare local classes are penalised more and the local model is not pushed to predict
only its frequent classes:

``L_cal = -log( e^{f_y - τ n_{c,y}^{-1/4}} / Σ_{y'} e^{f_{y'} - τ n_{c,y'}^{-1/4}} )``.

A class the client does not hold (``n_{c,y'} = 0``, calibration ``+∞``) drops out of its
softmax. The server is FedAvg's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab import kit
from fedjax_lab._types import (
    Batch,
    ClientInput,
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    Params,
    PRNGKey,
    ServerState,
)
from fedjax_lab.algorithms._registry import register

__all__ = ["calibrated_loss", "fed_lc", "label_counts"]

LogitsFn = Callable[[Params, Batch, PRNGKey], jax.Array]


def label_counts(train_data: Any, num_classes: int) -> np.ndarray:
    """``f32[N, C]``: each client's number of training examples of each class.

    Pass it as ``fed_lc(..., label_counts=label_counts(train_data, C))`` for the counts of the
    whole client dataset whatever the round's batches hold.

    Example:
      >>> import numpy as np, fedjax_lab as fl
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": np.zeros((3, 1), "f4"), "y": np.array([0, 0, 2])},
      ...      {"x": np.zeros((1, 1), "f4"), "y": np.array([1])}])
      >>> label_counts(data, 3).tolist()
      [[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    num_classes = kit.check_count("num_classes", num_classes)
    y = np.asarray(train_data.examples["y"]).astype(np.int64)
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(
            f"train_data: labels must be one integer in [0, {num_classes}) per example."
        )
    offsets = np.asarray(train_data.offsets)
    client = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    out = np.zeros((len(offsets) - 1, num_classes), np.float32)
    np.add.at(out, (client, y), 1.0)
    return out


def calibrated_loss(logits_fn: LogitsFn, tau: float | jax.Array) -> Callable[..., jax.Array]:
    """``loss(params, batch, key, counts)``: the masked mean of FedLC's calibrated CE.

    ``counts`` ``f32[C]`` are the client's label counts; classes with count 0 are left out of
    the softmax.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = calibrated_loss(lambda p, b, k: b["x"] * p, 1.0)
      >>> batch = {"x": jnp.zeros((1, 2)), "y": jnp.array([0]), "mask": jnp.ones(1)}
      >>> round(float(loss(1.0, batch, None, jnp.array([1.0, 16.0]))), 4)  # log(1 + e^{1/2})
      0.9741
    """

    def loss(params, batch, key, counts):
        logits = logits_fn(params, batch, key)
        present = counts > 0
        shift = tau * jnp.where(present, counts, 1.0) ** -0.25
        cal = logits - jnp.broadcast_to(shift, logits.shape)
        y = jnp.asarray(batch["y"]).astype(jnp.int32)
        lse = jax.nn.logsumexp(cal, axis=-1, where=jnp.broadcast_to(present, cal.shape))
        ce = lse - jnp.take_along_axis(cal, y[:, None], axis=-1)[:, 0]
        m = jnp.asarray(batch["mask"], ce.dtype)
        return jnp.sum(jnp.where(m > 0, ce * m, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)

    return loss


def _logits_of(loss_fn: LossFn, logits_fn: LogitsFn | None) -> LogitsFn | None:
    if logits_fn is not None:
        if not callable(logits_fn):
            raise TypeError(
                f"logits_fn: expected a callable logits_fn(params, batch, key) -> f32[B, C], "
                f"got {logits_fn!r}."
            )
        return logits_fn
    model = getattr(loss_fn, "model", None)
    if model is None:
        return None
    spec = getattr(model, "spec", None)
    if spec is not None and spec.sequence:
        raise ValueError(
            "loss_fn: FedLC calibrates one class per example; this model predicts a label per "
            "position (a sequence model). Use a classification model."
        )
    return lambda params, batch, key: model.apply(params, batch["x"], key=key, train=True)


@register("fedlc")
def fed_lc(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    tau: float = 1.0,
    label_counts: Any = None,
    logits_fn: LogitsFn | None = None,
    client_learning_rate: float | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedlc",
) -> FederatedAlgorithm:
    """FedLC: FedAvg whose clients minimise the cross-entropy of calibrated logits.

    Client ``c`` with label counts ``n_{c,y}``: each REAL local step (padding skipped) applies
    the client optimiser to ``∇ L_cal``, ``L_cal`` the masked mean over the batch of
    ``-log(e^{f_y - τ n_{c,y}^{-1/4}} / Σ_{y': n_{c,y'} > 0} e^{f_{y'} - τ n_{c,y'}^{-1/4}})``
    (``f`` the model's logits; a class the client holds no example of drops out, its
    calibration being ``+∞``). The client sends ``w_t - w``; the server applies
    ``server_optimizer`` to the weighted mean. Evaluation uses the uncalibrated logits.

    The label counts are, by default, computed inside ``client_update`` from the round's
    batches and masks (``n_{c,y} = Σ mask · [y = y]`` over all the client's local steps): with
    one epoch over its data (the usual config) they are exactly the client dataset's counts;
    with ``E`` epochs every count is ``E`` times it, and with a step cap or sampled steps they
    count what the client trains on this round. ``label_counts=`` (``f32[N, C]``, e.g.
    :func:`label_counts` of the training data) instead gives every client its dataset's
    counts, gathered by client id.

    Args:
      loss_fn: the model's loss, ``fl.models.classification_loss(model)``: FedLC reads the
        model from it (``loss_fn.model``) and replaces the loss by the calibrated one. A loss
        that carries no model needs ``logits_fn``; without either the local loss stays
        ``loss_fn`` (plain FedAvg, with a warning when traced).
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      tau: the calibration strength ``τ >= 0`` (the paper tunes it; ``τ = 0`` is the plain
        cross-entropy over the client's classes).
      label_counts: ``None`` (counts from the round's batches) or ``f32[N, C]``, one row per
        client of the population.
      logits_fn: ``logits_fn(params, batch, key) -> f32[B, C]``; default: the model of
        ``loss_fn`` in training mode.
      client_learning_rate: instead of ``client_optimizer``: plain SGD at this rate.
      server_optimizer: the server optimiser (default ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: the FedSGD rate (1.0: averaging).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    References:
      Zhang, Li, Li, Shao, Wu & Jiang, "Federated Learning with Label Distribution Skew via
      Logits Calibration", ICML 2022.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> model = fl.models.logistic_regression((2,), 3)
      >>> alg = fl.algorithms.fed_lc(fl.models.classification_loss(model), optax.sgd(0.1))
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 2)), "y": jnp.array([[[0, 2]]]),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.array([0]))
      >>> p0 = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0)))
      >>> state, _ = fl.run_round(alg, alg.init(p0), cohort, jax.random.key(0))
      >>> float(state.params["Dense_0"]["bias"][1])  # class 1 is absent: left alone
      0.0
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("tau", tau, allow_zero=True, hint=" (the calibration strength τ)")
    logits = _logits_of(loss_fn, logits_fn)
    counts_table = None
    if label_counts is not None:
        host = np.asarray(label_counts, np.float32)
        if host.ndim != 2 or host.size == 0 or not np.all(np.isfinite(host)) or np.any(host < 0):
            raise ValueError(
                f"label_counts: expected finite counts >= 0 shaped [num_clients, num_classes] "
                f"(fl.algorithms.fedlc.label_counts(train_data, C)), got shape {host.shape}."
            )
        counts_table = jnp.asarray(host)
    optimizer = kit.client_optimizer(client_optimizer, client_learning_rate)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    cal_loss = None if logits is None else calibrated_loss(logits, tau)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        if counts_table is not None and n is not None and counts_table.shape[0] != n:
            raise ValueError(
                f"label_counts: {counts_table.shape[0]} rows, but the population has {n} "
                "clients; give one row per client."
            )
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        if cal_loss is None:
            warnings.warn(
                "fed_lc: loss_fn carries no model (it is not fl.models.classification_loss) "
                "and no logits_fn was given, so the logits cannot be calibrated: the local "
                "loss is loss_fn (FedAvg).", stacklevel=2,
            )
            local_loss = loss_fn
        else:
            if counts_table is not None:
                counts = jnp.take(counts_table, client.client_id, axis=0)
            else:
                first = jax.tree.map(lambda a: a[0], client.batches)
                num_classes = jax.eval_shape(logits, state.params, first, key).shape[-1]
                y = jnp.asarray(client.batches["y"]).astype(jnp.int32)
                onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
                counts = jnp.sum(onehot * client.batches["mask"][..., None], axis=(0, 1))

            def local_loss(params, batch, k):
                return cal_loss(params, batch, k, counts)

        train = kit.local_training(local_loss, optimizer, unroll=unroll)
        result = train(state.params, client.batches, key)
        return ClientOutput(kit.client_delta(state.params, result.params), client.weight,
                            result.metrics, ())

    server_update = kit.server_step(server_optimizer)
    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))
