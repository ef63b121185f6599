"""MOON (Li, He & Song, CVPR 2021): model-contrastive federated learning.

Each client adds a contrastive term on representations to its loss: the representation ``z``
of the local model is pulled towards ``z_glob`` (the round's global model on the same input)
and pushed away from ``z_prev`` (the client's previous local model, kept as per-client state):

``ℓ_con = -log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) )``

with ``sim`` the cosine similarity, and the local objective ``CE + μ ℓ_con``. The
representation is the model's penultimate-layer features (:attr:`fedjax_lab.models.Model.features`,
which the zoo's MLP/CNN/ResNet expose, read from ``loss_fn.model`` of a
:func:`fedjax_lab.models.classification_loss`), or any ``representation(params, batch)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

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

__all__ = ["contrastive_loss", "moon", "representation_of"]

Representation = Callable[[Params, Batch], jax.Array]


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity along the last axis, ``a·b / max(‖a‖‖b‖, 1e-8)`` (as PyTorch's).

    The floor is taken under the square root, so a zero vector (a padded example) has a finite
    gradient.
    """
    sq = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.sqrt(jnp.maximum(sq, 1e-16))


def contrastive_loss(
    z: jax.Array, z_glob: jax.Array, z_prev: jax.Array, temperature: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """MOON's model-contrastive loss, averaged over the real examples.

    Per example ``-log(e^{s_g/τ} / (e^{s_g/τ} + e^{s_p/τ}))`` with ``s_g = sim(z, z_glob)`` and
    ``s_p = sim(z, z_prev)`` (cosine similarity); the mean is over ``mask`` (``f32[B]``) for
    representations ``[B, d]``, and a single vector ``[d]`` gives that one term.

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[1.0, 0.0]])
      >>> round(float(contrastive_loss(z, z, z, 0.5)), 4)  # z_glob = z_prev: log 2
      0.6931
    """
    s_g = _cosine(z, z_glob) / temperature
    s_p = _cosine(z, z_prev) / temperature
    per = jnp.logaddexp(s_g, s_p) - s_g
    if per.ndim == 0 or mask is None:
        return jnp.mean(per)
    m = jnp.asarray(mask, per.dtype).reshape(per.shape)
    return jnp.sum(jnp.where(m > 0, m * per, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def _flat_params(params: Params, batch: Batch) -> jax.Array:
    del batch
    return ravel_pytree(params)[0]


def representation_of(loss_fn: LossFn, representation: Representation | None = None
                      ) -> Representation:
    """The representation MOON contrasts: ``representation``, else the loss's model features.

    A :func:`fedjax_lab.models.classification_loss` carries its model; when that model has
    ``features`` the representation is ``model.features(params, batch["x"])`` (evaluation
    mode). A loss that carries no model (a hand-written ``loss_fn``) falls back to the
    flattened parameter vector (a weight-space contrast, one term per step): pass
    ``representation=`` for feature-level MOON with such a loss.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> model = fl.models.mlp((4,), hidden=(8,), num_classes=3)
      >>> rep = representation_of(fl.models.classification_loss(model))
      >>> rep(model.init(jax.random.key(0)), {"x": jnp.ones((2, 4))}).shape
      (2, 8)
    """
    if representation is not None:
        if not callable(representation):
            raise TypeError(
                f"representation: expected a callable representation(params, batch) -> "
                f"f32[B, d], got {representation!r}."
            )
        return representation
    model = getattr(loss_fn, "model", None)
    features = getattr(model, "features", None)
    if features is None:
        return _flat_params
    return lambda params, batch: features(params, batch["x"])


@register("moon")
def moon(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    mu: float = 1.0,  # or a kit.PerClient
    temperature: float = 0.5,
    representation: Representation | None = None,
    client_learning_rate: float | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "moon",
) -> FederatedAlgorithm:
    """MOON: FedAvg whose clients add a model-contrastive term ``μ ℓ_con`` to their loss.

    Round ``t``, global model ``w_t``; client ``i`` keeps its previous local model ``w_i^prev``
    (``state.client_states``). Each REAL local step (padding steps are skipped) on batch ``b``:
    ``w <- w - η (∇CE(w; b) + μ ∇_w ℓ_con(w; b))`` with
    ``ℓ_con = mean_b -log(e^{sim(z, z_g)/τ} / (e^{sim(z, z_g)/τ} + e^{sim(z, z_p)/τ}))``,
    ``z = R(w; b)``, ``z_g = R(w_t; b)``, ``z_p = R(w_i^prev; b)`` (``R`` the representation,
    ``z_g`` and ``z_p`` constants). The contrastive gradient is added by the kit's gradient
    correction hook, so the reported training loss is the data loss only. After its steps the
    client stores its local model as ``w_i^prev`` and sends ``w_t - w``; the server applies
    ``server_optimizer`` to the weighted mean (default FedSGD at 1: the average).

    The first time client ``i`` participates it has no previous model; ``w_i^prev`` is then
    the round's global model ``w_t`` (a per-client flag in the state), as in the authors' code,
    so ``z_p = z_g``, ``ℓ_con = log 2`` and its gradient is zero: that round is FedAvg.
    ``μ = 0`` is FedAvg in every round.

    Args:
      loss_fn: mean loss over real examples (the cross-entropy), e.g.
        ``fl.models.classification_loss(model)``.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      mu: ``μ >= 0``, the weight of the contrastive term (paper: 5 on CIFAR-10, 1 on
        CIFAR-100 / Tiny-ImageNet), or one per client (:func:`fedjax_lab.kit.per_client`).
      temperature: ``τ > 0`` (paper: 0.5).
      representation: ``representation(params, batch) -> f32[B, d]``; default: the features
        of the loss's model (see :func:`representation_of`; the paper's projection head is part
        of the model when wanted: sow its output as the features).
      client_learning_rate: instead of ``client_optimizer``: plain SGD at this rate.
      server_optimizer: the server optimiser (default ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: the FedSGD rate (1.0: averaging).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``;
      ``state.client_states`` is ``(previous_local_models, participated)`` with leaves
      ``[N, ...]`` and ``f32[N]``.

    References:
      Li, He & Song, "Model-Contrastive Federated Learning", CVPR 2021.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> model = fl.models.mlp((2,), hidden=(4,), num_classes=2)
      >>> alg = fl.algorithms.moon(fl.models.classification_loss(model), optax.sgd(0.1), mu=1.0)
      >>> state = alg.init(model.init(jax.random.key(0)), num_clients=3)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 2)), "y": jnp.array([[[0, 1]]]),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.array([2]))
      >>> state, _ = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> state.client_states[1].tolist()  # client 2 now has a previous local model
      [0.0, 0.0, 1.0]
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("mu", mu, allow_zero=True, hint=" (the contrastive weight μ)")
    kit.check_positive("temperature", temperature, hint=" (the temperature τ)")
    rep = representation_of(loss_fn, representation)
    optimizer = kit.client_optimizer(client_optimizer, client_learning_rate)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        kit.check_per_client(n, mu=mu)
        states = () if n is None else (kit.copies_per_client(params, n), jnp.zeros(n))
        return kit.server_state(params, server_optimizer, aggregator, client_states=states)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)
        w_glob = state.params
        prev_own, participated = client.state
        w_prev = optax.tree.where(participated > 0, prev_own, w_glob)
        mu_i = kit.for_client(mu, client.client_id)

        def con(params, batch):
            z_g = jax.lax.stop_gradient(rep(w_glob, batch))
            z_p = jax.lax.stop_gradient(rep(w_prev, batch))
            return contrastive_loss(rep(params, batch), z_g, z_p, temperature, batch["mask"])

        con_grad = jax.grad(con)

        def correction(grads, params, batch, step_key):
            del step_key
            return optax.tree.add(grads, optax.tree.scale(mu_i, con_grad(params, batch))), ()

        train = kit.local_training(loss_fn, optimizer, unroll=unroll, correction=correction)
        result = train(w_glob, client.batches, key)
        new_state = (result.params, jnp.ones_like(participated))
        return ClientOutput(kit.client_delta(w_glob, result.params), client.weight,
                            result.metrics, new_state)

    server_update = kit.server_step(server_optimizer)
    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn, mu=mu))
