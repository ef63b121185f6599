"""Client-update building blocks: local optax training as one ``lax.scan`` over local steps.

A client is written for ONE client; a client map (:mod:`fedjax_lab.maps`) makes the cohort.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab._types import Batch, LossFn, Params, PRNGKey, PyTree

__all__ = ["LocalResult", "Regularizer", "local_training", "proximal"]

Regularizer = Callable[[Params, Params], jax.Array]
"""``regularizer(params, anchor) -> scalar`` added to the loss of every local step; ``anchor`` is
the model the client started from (the server params)."""


class LocalResult(NamedTuple):
    """What :func:`local_training` returns for one client.

    Attributes:
      params: the client's params after its local steps.
      metrics: dict of scalar sums: ``loss_sum`` (the data loss, without any regulariser, summed
        over real examples, each step's mean loss times its number of real examples),
        ``num_examples`` (real examples seen) and ``num_steps`` (steps that had at least one).
    """

    params: Params
    metrics: dict[str, jax.Array]


def local_training(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    unroll: int | bool = 1,
    regularizer: Regularizer | None = None,
    skip_empty_steps: bool = True,
) -> Callable[[Params, Batch, PRNGKey], LocalResult]:
    """Builds ``train(params, batches, key) -> LocalResult``: local optax training of one client.

    ``batches`` holds ``S`` steps of ``B`` examples (``[S, B, ...]`` leaves and ``mask``
    ``f32[S, B]``). Step ``s`` computes ``g = grad(loss_fn + regularizer)(params, batch_s,
    split(key, S)[s])`` and applies ``optimizer``; a fresh optimiser state is made from the
    starting params (``optimizer.init``). A step whose mask is all zero leaves params AND
    optimiser state untouched (so an optimiser's step counter counts only real steps).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar``, the mean loss over the batch's real
        examples.
      optimizer: any optax transformation (the client optimiser).
      unroll: passed to ``lax.scan``: ``True`` unrolls every local step. On XLA:CPU a
        convolution inside a loop body can be far slower than unrolled (DESIGN §5).
      regularizer: optional ``regularizer(params, anchor) -> scalar`` added to the loss
        (e.g. :func:`proximal` for FedProx); ``anchor`` is the starting params.
      skip_empty_steps: with ``True`` an all-padding step is skipped by ``lax.cond`` (it costs
        nothing under a sequential map; under ``vmap`` both branches run and are selected).
        With ``False`` the step is computed and its result discarded with ``where``; the
        result is the same either way.

    Returns:
      The ``train`` function.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (p * b["x"] - 1.0) ** 2) / b["mask"].sum()
      >>> train = local_training(loss, optax.sgd(0.1))
      >>> batches = {"x": jnp.ones((3, 2)), "mask": jnp.array([[1., 1.], [1., 1.], [0., 0.]])}
      >>> out = train(jnp.array(0.0), batches, jax.random.key(0))
      >>> round(float(out.params), 3), int(out.metrics["num_steps"])
      (0.36, 2)
    """
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(params, batch, key), got {loss_fn!r}."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer: expected an optax.GradientTransformation (e.g. optax.sgd(0.1)), "
            f"got {type(optimizer).__name__}."
        )

    def objective(params, batch, key, anchor):
        data_loss = loss_fn(params, batch, key)
        total = data_loss if regularizer is None else data_loss + regularizer(params, anchor)
        return total, data_loss

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train(params: Params, batches: Batch, key: PRNGKey) -> LocalResult:
        anchor = params
        num_steps = jax.tree.leaves(batches)[0].shape[0]
        first = jax.tree.map(lambda a: a[0], batches)
        loss_shape = jax.eval_shape(loss_fn, params, first, key).shape  # trace time only
        if loss_shape != ():
            raise ValueError(
                "loss_fn: must return a scalar (the mean loss over the batch's real examples), "
                f"got an array of shape {loss_shape}."
            )

        def step(carry, xs):
            params, opt_state = carry
            batch, step_key = xs
            count = jnp.sum(batch["mask"])

            def apply(args):
                params, opt_state = args
                (_, data_loss), grads = grad_fn(params, batch, step_key, anchor)
                updates, new_opt_state = optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), new_opt_state, data_loss

            def skip(args):
                params, opt_state = args
                return params, opt_state, 0.0 * count  # zero that varies like the data

            if skip_empty_steps:
                new_params, new_opt_state, data_loss = jax.lax.cond(
                    count > 0, apply, skip, (params, opt_state)
                )
            else:
                new_params, new_opt_state, data_loss = apply((params, opt_state))
                keep = count > 0
                new_params = optax.tree.where(keep, new_params, params)
                new_opt_state = optax.tree.where(keep, new_opt_state, opt_state)
                data_loss = jnp.where(keep, data_loss, 0.0)
            loss_sum = data_loss.astype(jnp.float32) * count
            return (new_params, new_opt_state), (loss_sum, count)

        (params, _), (loss_sums, counts) = jax.lax.scan(
            step,
            (params, optimizer.init(params)),
            (batches, jax.random.split(key, num_steps)),
            unroll=unroll,
        )
        metrics = {
            "loss_sum": jnp.sum(loss_sums),
            "num_examples": jnp.sum(counts),
            "num_steps": jnp.sum(counts > 0).astype(jnp.float32),
        }
        return LocalResult(params, metrics)

    return train


def proximal(mu: float | jax.Array) -> Regularizer:
    """The FedProx proximal term ``(mu / 2) * ||w - w_server||^2``.

    Args:
      mu: the proximal coefficient ``mu >= 0``; ``mu = 0`` adds exactly nothing.

    Returns:
      A regulariser for :func:`local_training`.

    References:
      Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

    Example:
      >>> import jax.numpy as jnp
      >>> float(proximal(2.0)({"w": jnp.array([1.0, 2.0])}, {"w": jnp.zeros(2)}))
      5.0
    """
    if isinstance(mu, (int, float)) and not mu >= 0:
        raise ValueError(f"mu: the proximal coefficient must be >= 0, got {mu}.")

    def regularizer(params: PyTree, anchor: PyTree) -> jax.Array:
        diff = optax.tree.sub(params, jax.lax.stop_gradient(anchor))
        return 0.5 * mu * optax.tree.vdot(diff, diff)

    return regularizer
