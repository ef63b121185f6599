"""FedBABU (Oh, Kim & Yun, ICLR 2022): train the body only, fine-tune the head per client.

During federated training the head (the output layer) stays FROZEN at its random
initialisation: clients update the body alone and the server averages bodies. At evaluation
each client fine-tunes the global model on its own data
(:func:`fedjax_lab.personalization.fine_tune_evaluate`; the paper fine-tunes the whole model
for a few epochs). Freezing the head removes the head's bias towards each client's frequent
classes from training, so the averaged body learns a representation that personalises well.

Why FedBABU rather than FedDC for this library: its evaluation protocol is the personalisation
evaluation the library already has (``fine_tune_evaluate``), and its body/head split is the one
FedRep/FedPer use (:func:`fedjax_lab.algorithms.partial.resolve_global_mask`), so it adds a
representation-level baseline that none of the drift-correction methods covers; FedDC's
per-client drift variable plus gradient correction largely overlaps SCAFFOLD and FedDyn,
which are already here.
"""

from __future__ import annotations

from collections.abc import Sequence

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
from fedjax_lab.algorithms.partial import resolve_global_mask

__all__ = ["body_only", "fed_babu"]


def body_only(
    optimizer: optax.GradientTransformation, body_mask: PyTree
) -> optax.GradientTransformation:
    """``optimizer`` on the body leaves (``True`` in ``body_mask``); the head's update is 0.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = body_only(optax.sgd(1.0), {"body": True, "head": False})
      >>> p = {"body": jnp.ones(1), "head": jnp.ones(1)}
      >>> u, _ = opt.update({"body": jnp.ones(1), "head": jnp.ones(1)}, opt.init(p), p)
      >>> u["body"].tolist(), u["head"].tolist()
      ([-1.0], [0.0])
    """
    labels = jax.tree.map(lambda m: "body" if m else "head", body_mask)
    return optax.multi_transform({"body": optimizer, "head": optax.set_to_zero()}, labels)


@register("fedbabu")
def fed_babu(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    head_keys: str | Sequence[str] | None = None,
    body_mask: PyTree | None = None,
    client_learning_rate: float | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedbabu",
) -> FederatedAlgorithm:
    """FedBABU: FedAvg on the body; the head keeps its initial (random) weights.

    Update rule (round ``t``, model ``(φ_t, h_0)``): each client runs its local steps with the
    client optimiser on the body only, ``φ <- φ - η ∇_φ L(φ, h_0; b)`` (the head's update is
    exactly zero, :func:`body_only`), and sends ``(φ_t - φ, 0)``; the server applies
    ``server_optimizer`` to the weighted mean (default FedSGD at 1: ``φ_{t+1}`` is the average
    of the bodies, ``h`` stays ``h_0``). Personalised accuracy: fine-tune the final global
    model per client, ``fl.personalization.fine_tune_evaluate(loss_fn, eval_fn,
    optax.sgd(lr), state.params, train, test, steps=..., batch_size=...)``.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``), applied to the
        body (the paper: SGD with momentum 0.9).
      head_keys: path substrings of the head leaves (e.g. ``"Dense_1"``); default: the last
        top-level ``Dense*`` entry (see :func:`fedjax_lab.algorithms.partial.resolve_global_mask`).
      body_mask: alternatively, a pytree of booleans shaped like the params (``True`` = body),
        or a function of the params giving one.
      client_learning_rate: instead of ``client_optimizer``: plain SGD at this rate.
      server_optimizer: the server optimiser (default ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: the FedSGD rate (1.0: averaging).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    References:
      Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image
      Classification", ICLR 2022.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum((b["x"] @ p["body"] * p["head"] - b["y"]) ** 2)
      >>> alg = fl.algorithms.fed_babu(loss, optax.sgd(0.1), head_keys="head")
      >>> p0 = {"body": jnp.ones(2), "head": jnp.array(0.5)}
      >>> cohort = fl.Cohort({"x": jnp.ones((2, 1, 3, 2)), "y": jnp.zeros((2, 1, 3)),
      ...                     "mask": jnp.ones((2, 1, 3))}, jnp.ones(2), jnp.arange(2))
      >>> state, _ = fl.run_round(alg, alg.init(p0), cohort, jax.random.key(0))
      >>> float(state.params["head"]), state.params["body"].tolist() != [1.0, 1.0]
      (0.5, True)
    """
    kit.check_loss_fn(loss_fn)
    optimizer = kit.client_optimizer(client_optimizer, client_learning_rate)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()

    def mask_of(params: Params) -> PyTree:
        return resolve_global_mask(params, body_mask, head_keys)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        kit.check_num_clients(num_clients)
        mask_of(params)  # refuses a mask that freezes everything or nothing, before compiling
        return kit.server_state(params, server_optimizer, aggregator)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        mask = mask_of(state.params)
        train = kit.local_training(loss_fn, body_only(optimizer, mask), unroll=unroll)
        result = train(state.params, client.batches, key)
        delta = kit.client_delta(state.params, result.params)
        delta = jax.tree.map(lambda d, m: d if m else jnp.zeros_like(d), delta, mask)
        return ClientOutput(delta, client.weight, result.metrics, ())

    server_update = kit.server_step(server_optimizer)
    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))
