"""Client-update building blocks: one masked local loop, and local optax training on it.

A client is written for ONE client; a client map (:mod:`fedjax_lab.maps`) makes the cohort.
Every algorithm's local work runs through :func:`local_loop` (directly, or through
:func:`local_training`), so padding steps behave the same everywhere: a step whose mask is all
zero changes nothing, neither the params nor the optimiser's state nor any summed statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab._types import Batch, LossFn, Params, PRNGKey, PyTree

__all__ = [
    "Correction",
    "LocalResult",
    "Regularizer",
    "StepFn",
    "dynamic_regularizer",
    "local_loop",
    "local_training",
    "proximal",
    "step_budget",
]

Regularizer = Callable[[Params, Params], jax.Array]
"""``regularizer(params, anchor) -> scalar`` added to the loss of every local step; ``anchor`` is
the model the client started from (the server params)."""

Correction = Callable[[PyTree, Params, Batch, PRNGKey], tuple[PyTree, PyTree]]
"""``correction(grads, params, batch, key) -> (direction, stat)``: what the optimiser is fed
instead of the raw mini-batch gradient ``grads`` (a drift correction, a local momentum mix, a
variance-reduced gradient), and a pytree ``stat`` that :func:`local_training` sums over the real
steps (``()`` when nothing needs summing)."""

StepFn = Callable[[Params, PyTree, Batch, PRNGKey], tuple[Params, PyTree, jax.Array, PyTree]]
"""``step(params, opt_state, batch, key) -> (params, opt_state, data_loss, stat)`` of
:func:`local_loop`."""


class LocalResult(NamedTuple):
    """What :func:`local_training` returns for one client.

    Attributes:
      params: the client's params after its local steps.
      metrics: dict of scalar sums: ``loss_sum`` (the data loss, without any regulariser, summed
        over real examples, each step's mean loss times its number of real examples),
        ``num_examples`` (real examples seen) and ``num_steps`` (steps that had at least one).
      stats: the sum over the real steps of the correction's ``stat`` (``()`` without one).
      opt_state: the local optimiser's state after the last real step.
    """

    params: Params
    metrics: dict[str, jax.Array]
    stats: PyTree = ()
    opt_state: PyTree = ()


def local_loop(
    step: StepFn,
    params: Params,
    opt_state: PyTree,
    batches: Batch,
    key: PRNGKey,
    *,
    stats_init: PyTree = (),
    step_counts: jax.Array | None = None,
    unroll: int | bool = 1,
    skip_empty_steps: bool = True,
) -> LocalResult:
    """Runs ``step`` over ``S`` masked batches as one ``lax.scan``: the loop every client uses.

    ``batches`` holds ``S`` steps of ``B`` examples (``[S, B, ...]`` leaves and ``mask``
    ``f32[S, B]``); step ``s`` gets batch ``s`` and ``split(key, S)[s]``. A REAL step (at least
    one unmasked example) returns new params and optimiser state, its data loss and a ``stat``
    that is added to the running sum (started at ``stats_init``); an all-padding step changes
    none of them.

    Args:
      step: ``step(params, opt_state, batch, key) -> (params, opt_state, data_loss, stat)``.
      params: the starting params.
      opt_state: the starting state of whatever optimiser ``step`` applies (``()`` for none).
      batches: the client's ``[S, B, ...]`` batches with ``mask``.
      key: PRNG key of the client's local work.
      stats_init: zeros of ``stat``'s tree (``()`` when ``step`` returns ``()``).
      step_counts: ``f32[S]``, the real examples of each step (default: the mask's sum per
        step); a step is real when its count is positive, and the metrics count these.
      unroll: passed to ``lax.scan``; ``True`` unrolls every local step. On XLA:CPU a
        convolution inside a loop body can be much slower than unrolled.
      skip_empty_steps: ``True``: an all-padding step is skipped by ``lax.cond`` (free under a
        sequential map; under ``vmap`` both branches run and one is selected). ``False``: the
        step is computed and its result discarded with ``where``. Same result either way.

    Returns:
      A :class:`LocalResult` (``metrics``: ``loss_sum``, ``num_examples``, ``num_steps``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def step(p, s, batch, k):  # one gradient step on sum((p - x)^2), counts steps
      ...     return p - 0.5 * jnp.mean(p - batch["x"]), s, jnp.float32(0), jnp.float32(1)
      >>> batches = {"x": jnp.ones((3, 2)), "mask": jnp.array([[1., 1.], [0., 0.], [1., 0.]])}
      >>> out = local_loop(step, jnp.float32(0), (), batches, jax.random.key(0),
      ...                  stats_init=jnp.float32(0))
      >>> float(out.params), float(out.stats), float(out.metrics["num_steps"])
      (0.75, 2.0, 2.0)
    """
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    if step_counts is None:
        step_counts = jnp.sum(batches["mask"], axis=1)

    def body(carry, xs):
        params, opt_state, acc = carry
        batch, step_key, count = xs

        def apply(args):
            params, opt_state, acc = args
            params, opt_state, loss, stat = step(params, opt_state, batch, step_key)
            return params, opt_state, jax.tree.map(jnp.add, acc, stat), jnp.asarray(loss)

        def skip(args):
            params, opt_state, acc = args
            return params, opt_state, acc, 0.0 * count  # a zero that varies like the data

        if skip_empty_steps:
            new_params, new_opt_state, new_acc, loss = jax.lax.cond(
                count > 0, apply, skip, (params, opt_state, acc)
            )
        else:
            new_params, new_opt_state, new_acc, loss = apply((params, opt_state, acc))
            keep = count > 0
            new_params = optax.tree.where(keep, new_params, params)
            new_opt_state = optax.tree.where(keep, new_opt_state, opt_state)
            new_acc = optax.tree.where(keep, new_acc, acc)
            loss = jnp.where(keep, loss, 0.0)
        loss_sum = loss.astype(jnp.float32) * count
        return (new_params, new_opt_state, new_acc), (loss_sum, count)

    (params, opt_state, acc), (loss_sums, counts) = jax.lax.scan(
        body,
        (params, opt_state, stats_init),
        (batches, jax.random.split(key, num_steps), step_counts),
        unroll=unroll,
    )
    metrics = {
        "loss_sum": jnp.sum(loss_sums),
        "num_examples": jnp.sum(counts),
        "num_steps": jnp.sum(counts > 0).astype(jnp.float32),
    }
    return LocalResult(params, metrics, acc, opt_state)


def _check_loss_and_optimizer(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(params, batch, key), got {loss_fn!r}."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer: expected an optax.GradientTransformation (e.g. optax.sgd(0.1)), "
            f"got {type(optimizer).__name__}."
        )


def local_training(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    unroll: int | bool = 1,
    regularizer: Regularizer | None = None,
    correction: Correction | None = None,
    skip_empty_steps: bool = True,
) -> Callable[..., LocalResult]:
    """Builds ``train(params, batches, key, opt_state=None) -> LocalResult``: local optax training.

    Every real step ``s`` of :func:`local_loop` computes the mini-batch gradient
    ``g = ∇(loss_fn + regularizer)(y, batch_s, key_s)``, turns it into the direction
    ``d = correction(g, y, batch_s, key_s)[0]`` (``d = g`` without a correction) and applies
    ``optimizer`` to ``d``. The optimiser's state starts at ``optimizer.init(params)`` unless
    ``opt_state`` is given, and counts only real steps. The three hooks cover the local terms of
    the drift-correcting family:

    * a proximal or dynamic regulariser (FedProx :func:`proximal`, FedDyn
      :func:`dynamic_regularizer`) changes the objective;
    * a gradient correction (SCAFFOLD ``g + c - c_i``, Mime's SVRG direction, FedAvg-M's
      ``β g + (1 - β) m``) changes the direction, and its ``stat`` (e.g. the raw gradient) is
      summed over the real steps into ``LocalResult.stats``;
    * local momentum is an optax transformation in front of the optimiser
      (``optax.chain(optax.trace(ρ), optimizer)``, FedNova's momentum variant).

    Stateful models (BatchNorm): when ``loss_fn`` has a ``with_state(params, batch, key) ->
    (loss, new_state)`` attribute (``fl.models.classification_loss`` of a model with
    :attr:`~fedjax_lab.models.Model.train_apply`), the params are the variables dict
    ``{"params": ..., "batch_stats": ...}``; each real step takes the gradient of the loss,
    zeroes its entries for the collections in ``new_state`` (so no optimiser transformation,
    weight decay included, touches them), steps the params with the optimiser and then
    replaces those collections by ``new_state``, the statistics of that step's forward pass.
    Padding steps change nothing, statistics included. A loss without ``with_state`` (every
    stateless model) runs exactly as before; so does any algorithm that calls ``loss_fn``
    directly (outside this loop), which then sees the statistics as constants.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar``, the mean loss over the batch's real
        examples.
      optimizer: any optax transformation (the client optimiser).
      unroll: ``lax.scan`` unroll of the local steps (see :func:`local_loop`).
      regularizer: optional ``regularizer(params, anchor) -> scalar`` added to the loss;
        ``anchor`` is the starting params.
      correction: optional ``correction(g, params, batch, key) -> (direction, stat)``.
      skip_empty_steps: see :func:`local_loop`; the result is the same either way.

    Returns:
      The ``train`` function. Its ``max_steps`` (an int or a traced scalar, e.g. a client's
      :func:`fedjax_lab.kit.per_client` budget) caps the local work: only the first
      ``max_steps`` steps may be real (see :func:`step_budget`); ``None``: no cap.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (p * b["x"] - 1.0) ** 2) / b["mask"].sum()
      >>> train = local_training(loss, optax.sgd(0.1))
      >>> batches = {"x": jnp.ones((3, 2)), "mask": jnp.array([[1., 1.], [1., 1.], [0., 0.]])}
      >>> out = train(jnp.array(0.0), batches, jax.random.key(0))
      >>> round(float(out.params), 3), int(out.metrics["num_steps"])
      (0.36, 2)
    """
    _check_loss_and_optimizer(loss_fn, optimizer)
    state_fn = getattr(loss_fn, "with_state", None)

    if state_fn is None:
        def objective(params, batch, key, anchor):
            data_loss = loss_fn(params, batch, key)
            total = data_loss if regularizer is None else data_loss + regularizer(params, anchor)
            return total, data_loss
    else:  # a stateful model: the aux also carries the updated non-trainable collections
        def objective(params, batch, key, anchor):
            data_loss, new_state = state_fn(params, batch, key)
            total = data_loss if regularizer is None else data_loss + regularizer(params, anchor)
            return total, (data_loss, new_state)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def grad_fn(params, batch, key, anchor):
        """``((total, data_loss), grads, new_state)``; ``new_state`` is ``None`` if stateless."""
        if state_fn is None:
            (total, data_loss), grads = value_and_grad(params, batch, key, anchor)
            return (total, data_loss), grads, None
        (total, (data_loss, new_state)), grads = value_and_grad(params, batch, key, anchor)
        _check_state(params, new_state)
        return (total, data_loss), _without_state_grads(grads, new_state), new_state

    def train(
        params: Params,
        batches: Batch,
        key: PRNGKey,
        opt_state: PyTree = None,
        *,
        max_steps: jax.Array | int | None = None,
    ) -> LocalResult:
        anchor = params
        first = jax.tree.map(lambda a: a[0], batches)
        loss_shape = jax.eval_shape(loss_fn, params, first, key).shape  # trace time only
        if loss_shape != ():
            raise ValueError(
                "loss_fn: must return a scalar (the mean loss over the batch's real examples), "
                f"got an array of shape {loss_shape}."
            )
        if correction is None:
            stats_init = ()
        else:
            grads_shape = jax.eval_shape(lambda p: grad_fn(p, first, key, anchor)[1], params)
            stat_shape = jax.eval_shape(
                lambda g, p: correction(g, p, first, key)[1], grads_shape, params
            )
            stats_init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stat_shape)

        def step(params, opt_state, batch, step_key):
            (_, data_loss), grads, new_state = grad_fn(params, batch, step_key, anchor)
            stat = ()
            if correction is not None:
                grads, stat = correction(grads, params, batch, step_key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if new_state is not None:  # the statistics of this step's forward pass
                new_params = {**new_params, **new_state}
            return new_params, opt_state, data_loss, stat

        start = optimizer.init(params) if opt_state is None else opt_state
        return local_loop(
            step, params, start, batches, key, stats_init=stats_init, unroll=unroll,
            skip_empty_steps=skip_empty_steps, step_counts=step_budget(batches, max_steps),
        )

    return train


def _check_state(params: Params, new_state: PyTree) -> None:
    if not (isinstance(new_state, dict) and isinstance(params, dict)
            and all(k in params and k != "params" for k in new_state)):
        have = sorted(params) if isinstance(params, dict) else type(params).__name__
        got = sorted(new_state) if isinstance(new_state, dict) else type(new_state).__name__
        raise ValueError(
            f"loss_fn: its with_state returns the collections {got}, which must be entries "
            f"(other than 'params') of the params dict; the params have {have}. A stateful "
            "model's params are its variables {'params': ..., 'batch_stats': ...}."
        )


def _without_state_grads(grads: PyTree, new_state: dict) -> PyTree:
    """The gradient with zeros for the non-trainable collections (they are replaced, not
    stepped, so no optimiser transformation such as weight decay ever moves them)."""
    return {k: jax.tree.map(jnp.zeros_like, g) if k in new_state else g
            for k, g in grads.items()}


def step_budget(batches: Batch, max_steps: jax.Array | int | None) -> jax.Array | None:
    """The ``step_counts`` of :func:`local_loop` when at most the first ``max_steps`` steps run.

    A step at index ``>= max_steps`` counts 0 examples (skipped, as padding is); ``None`` gives
    ``None`` (the mask decides alone).

    Example:
      >>> import jax.numpy as jnp
      >>> step_budget({"mask": jnp.ones((4, 2))}, 3).tolist()
      [2.0, 2.0, 2.0, 0.0]
    """
    if max_steps is None:
        return None
    counts = jnp.sum(batches["mask"], axis=1)
    within = jnp.arange(counts.shape[0]) < jnp.asarray(max_steps)
    return jnp.where(within, counts, jnp.zeros_like(counts))


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


def dynamic_regularizer(alpha: float | jax.Array, linear: PyTree) -> Regularizer:
    """FedDyn's dynamic regulariser ``-<g_i, w> + (alpha / 2) * ||w - w_server||^2``.

    ``linear`` is the client's ``g_i`` (its last local gradient, kept as per-client state).

    Args:
      alpha: the coefficient ``α > 0``.
      linear: the linear term's pytree ``g_i`` (same tree as the params).

    Returns:
      A regulariser for :func:`local_training`.

    References:
      Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021.

    Example:
      >>> import jax.numpy as jnp
      >>> reg = dynamic_regularizer(2.0, {"w": jnp.array([1.0, 0.0])})
      >>> float(reg({"w": jnp.array([1.0, 2.0])}, {"w": jnp.zeros(2)}))  # -1 + 5
      4.0
    """

    def regularizer(params: PyTree, anchor: PyTree) -> jax.Array:
        diff = optax.tree.sub(params, anchor)
        return -optax.tree.vdot(linear, params) + 0.5 * alpha * optax.tree.vdot(diff, diff)

    return regularizer
