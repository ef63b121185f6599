"""Mime and MimeLite (Karimireddy et al., NeurIPS 2021): clients mimic the server optimiser.

The base optimiser's statistics (momentum, Adam moments) live on the server; clients apply the
base optimiser's step with those statistics FROZEN, and the server updates them with the mean
full-batch gradient at the server model. Mime adds an SVRG-style control variate ``c``, the
cohort's mean full-batch gradient at the server model measured in a pre-pass over the same cohort
before local training (:attr:`fedjax_lab.FederatedAlgorithm.pre_pass`), as in the paper's
Algorithm 1.
"""

from __future__ import annotations

from typing import NamedTuple

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

__all__ = ["MimeState", "base_optimizer", "full_batch_gradient", "mime", "mime_lite"]


class MimeState(NamedTuple):
    """Mime's server state beside the model (``state.extra``).

    Attributes:
      statistics: the base optimiser's state ``s`` (momentum, Adam moments), updated on the
        server and frozen during local steps.
      control_variate: Mime's ``c`` (``()`` for MimeLite).
      measured: whether ``c`` has been measured yet (``()`` for MimeLite).
    """

    statistics: PyTree
    control_variate: PyTree = ()
    measured: PyTree = ()


def base_optimizer(
    client_optimizer: optax.GradientTransformation | None, momentum: float
) -> optax.GradientTransformation:
    """The optimiser Mime mimics: ``optax.ema(β)`` (no debias) then ``client_optimizer``.

    With ``optax.sgd(lr)`` this is SGD with the paper's momentum
    ``m <- (1 - β) g + β m;  x <- x - lr m`` (``β = momentum``); ``momentum=0`` is
    ``client_optimizer`` alone (pass ``optax.adam(lr)`` with ``momentum=0`` for Mime-Adam).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = base_optimizer(optax.sgd(1.0), 0.9)
      >>> u, _ = opt.update(jnp.ones(1), opt.init(jnp.zeros(1)))
      >>> [round(v, 3) for v in u.tolist()]
      [-0.1]
    """
    kit.check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
    optimizer = kit.client_optimizer(client_optimizer)
    if isinstance(momentum, (int, float)) and momentum == 0:
        return optimizer
    return optax.chain(optax.ema(decay=momentum, debias=False), optimizer)


def full_batch_gradient(loss_fn: LossFn, params: Params, batches: PyTree, key: PRNGKey) -> PyTree:
    """``∇f_i(x)``: the example-weighted mean of ``∇ loss_fn(x, batch_s)`` over the real steps.

    Each step's mean-loss gradient times its number of real examples, summed over the steps
    (all-padding steps skipped) and divided by the examples seen. With ``epochs=E`` every
    example of the client is seen ``E`` times, so this is exactly the full-batch gradient at
    ``params``; with ``local_steps`` it is the mean over the positions walked.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] * p - 1.0) ** 2) / b["mask"].sum()
      >>> batches = {"x": jnp.array([[1.0, 2.0], [3.0, 0.0]]),
      ...            "mask": jnp.array([[1.0, 1.0], [1.0, 0.0]])}
      >>> float(full_batch_gradient(loss, jnp.float32(0.0), batches, jax.random.key(0)))
      -4.0
    """
    grad_fn = jax.grad(loss_fn)

    def step(p, opt_state, batch, k):
        g = grad_fn(params, batch, k)
        return p, opt_state, jnp.float32(0.0), optax.tree.scale(jnp.sum(batch["mask"]), g)

    result = kit.local_loop(step, params, (), batches, key,
                            stats_init=optax.tree.zeros_like(params))
    return optax.tree.scale(1.0 / jnp.maximum(result.metrics["num_examples"], 1.0), result.stats)


def _mime_family(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None,
    momentum: float,
    server_optimizer: optax.GradientTransformation | None,
    server_learning_rate: float,
    *,
    control_variate: bool,
    lagged: bool = False,
    unroll: int | bool,
    name: str,
) -> FederatedAlgorithm:
    kit.check_loss_fn(loss_fn)
    kit.check_positive("server_learning_rate", server_learning_rate)
    if not isinstance(lagged, bool):
        raise TypeError(f"lagged: expected True or False, got {lagged!r}.")
    base = base_optimizer(client_optimizer, momentum)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    grad_fn = jax.grad(loss_fn)
    exact = control_variate and not lagged  # this round's c, from the engine's pre-pass

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        del num_clients
        extra = MimeState(base.init(params))
        if control_variate:
            extra = extra._replace(control_variate=optax.tree.zeros_like(params),
                                   measured=jnp.zeros((), jnp.bool_))
        return kit.server_state(params, server_optimizer, aggregator, extra=extra)

    def pre_pass(state: ServerState, client: ClientInput, key: PRNGKey) -> PyTree:
        return full_batch_gradient(loss_fn, state.params, client.batches, key)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        x, extra = state.params, state.extra

        def correction(g_y, y, batch, k):
            g_x = grad_fn(x, batch, k)
            direction = g_y
            if exact:
                return optax.tree.add(optax.tree.sub(g_y, g_x), client.pre_pass), ()
            if control_variate:
                svrg = optax.tree.add(optax.tree.sub(g_y, g_x), extra.control_variate)
                direction = optax.tree.where(extra.measured, svrg, g_y)
            return direction, optax.tree.scale(jnp.sum(batch["mask"]), g_x)

        train = kit.local_training(loss_fn, kit.frozen(base, extra.statistics), unroll=unroll,
                                   correction=correction)
        result = train(x, client.batches, key)
        delta = kit.client_delta(x, result.params)
        if exact:
            return ClientOutput(delta, client.weight, result.metrics, ())
        full_grad = optax.tree.scale(
            1.0 / jnp.maximum(result.metrics["num_examples"], 1.0), result.stats
        )
        return ClientOutput((delta, full_grad), client.weight, result.metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        mean_delta, mean_grad = aggregate  # exact: (Σ p_i Δ_i, c) with c from the pre-pass
        _, statistics = base.update(mean_grad, state.extra.statistics, state.params)
        extra = state.extra._replace(statistics=statistics)
        if control_variate:
            extra = extra._replace(control_variate=mean_grad, measured=jnp.ones((), jnp.bool_))
        state = kit.apply_server_optimizer(state, server_optimizer, mean_delta)
        return state._replace(extra=extra)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn),
                              pre_pass=pre_pass if exact else None)


_RULE = """
    Server state: model ``x`` and the base optimiser's statistics ``s``
    (``state.extra.statistics``, a :class:`MimeState`;
    for the default momentum ``s = m``). Round ``t``, cohort weights ``p_i``:

    * client ``i``: ``y <- x``; each REAL local step (all-padding steps are skipped), with
      mini-batch ``ζ``: {direction}; ``y <- y + U(d, s)`` where ``U`` is the base
      optimiser's update with ``s`` FROZEN (default: ``U(d, m) = -η ((1 - β) d + β m)``). It
      also sums ``∇f_i(x; ζ)`` over its real examples: the full-batch gradient ``∇f_i(x)``
      (exact for ``epochs=1``; with more epochs or ``local_steps`` an example-weighted mean
      over the batches it saw). Sends ``(x - y, ∇f_i(x))``;
    * server: ``x <- x - η_g Σ p_i (x - y_i)``; ``ḡ = Σ p_i ∇f_i(x)``; ``s <- V(ḡ, s)``, the
      base optimiser's state update (default ``m <- (1 - β) ḡ + β m``){server_extra}.
"""


@register("mimelite")
def mime_lite(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    momentum: float = 0.9,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "mimelite",
) -> FederatedAlgorithm:
    """MimeLite: local steps use the server's frozen optimiser statistics, no control variate.

    {rule}
    With ``momentum=0`` and SGD the base optimiser has no statistics and MimeLite is FedAvg with the
    same client learning rate.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: the base optimiser's update without the momentum (default
        ``optax.sgd(0.1)``); see :func:`base_optimizer`.
      momentum: ``β ∈ [0, 1)``, the momentum of the base optimiser (paper default 0.9).
      server_optimizer: the server optimiser on the averaged client delta (default
        ``fl.server.fed_sgd(server_learning_rate)``, the paper's step).
      server_learning_rate: ``η_g`` on the averaged client delta (the paper uses 1).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` (no per-client state). Its client update is
      ``(x - y_i, ∇f_i(x))``.

    References:
      Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich & Suresh, "Breaking the centralized
      barrier for cross-device federated learning" (arXiv: "Mime: Mimicking Centralized
      Stochastic Algorithms in Federated Learning"), NeurIPS 2021, Algorithm 1.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.mime import mime_lite
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = mime_lite(loss, optax.sgd(0.1), momentum=0.5)
      >>> cohort = fl.Cohort({{"x": jnp.ones((1, 1, 2, 1)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}}, jnp.ones(1), jnp.arange(1))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(1)), cohort, jax.random.key(0))
      >>> round(float(state.params[0]), 3), round(float(state.extra.statistics[0].ema[0]), 3)
      (0.1, -1.0)
    """
    return _mime_family(loss_fn, client_optimizer, momentum, server_optimizer,
                        server_learning_rate, control_variate=False, unroll=unroll, name=name)


@register("mime")
def mime(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    momentum: float = 0.9,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    lagged: bool = False,
    unroll: int | bool = 1,
    name: str = "mime",
) -> FederatedAlgorithm:
    """Mime: MimeLite plus the SVRG control variate ``∇f_i(y; ζ) - ∇f_i(x; ζ) + c``.

    Karimireddy et al.'s Algorithm 1, with ``c`` measured at the CURRENT server model by the
    round's own cohort (an extra communication step before local training: the engine's
    pre-pass, :attr:`fedjax_lab.FederatedAlgorithm.pre_pass`, inside the same compiled round).
    Server state: model ``x`` and the base optimiser's statistics ``s``
    (``state.extra.statistics``, a :class:`MimeState`; for the default momentum ``s = m``).
    Round ``t``, cohort ``S`` with weights ``p_i`` (normalised, ``Σ p_i = 1``):

    * pre-pass: every client ``i ∈ S`` computes its full-batch gradient ``∇f_i(x)`` (the
      example-weighted mean over the batches of the round, exact for ``epochs=E``; see
      :func:`full_batch_gradient`); ``c = Σ p_i ∇f_i(x)``;
    * client ``i``: ``y <- x``; each REAL local step (all-padding steps are skipped), with
      mini-batch ``ζ``: ``d = ∇f_i(y; ζ) - ∇f_i(x; ζ) + c``; ``y <- y + U(d, s)`` where ``U`` is
      the base optimiser's update with ``s`` FROZEN (default:
      ``U(d, m) = -η ((1 - β) d + β m)``). Sends ``x - y``;
    * server: ``s <- V(c, s)``, the base optimiser's state update with the same mean gradient
      (default ``m <- (1 - β) c + β m``); ``x <- x - η_g Σ p_i (x - y_i)`` (the paper:
      ``η_g = 1``, ``x <- Σ p_i y_i``). ``state.extra.control_variate`` keeps this round's
      ``c`` (``measured`` turns true).

    ``lagged=True`` is the one-pass approximation this library used before the pre-pass: no
    extra step; ``c`` is the ``ḡ = Σ p_i ∇f_i(x)`` of the PREVIOUS applied round (measured at
    the previous server model by the previous cohort, each client summing ``∇f_i(x; ζ)`` over
    its local steps and sending ``(x - y, ∇f_i(x))``), MimeLite's steps until a first round
    has been applied, and ``s <- V(ḡ, s)``, ``c <- ḡ`` after the round.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: the base optimiser's update without the momentum (default
        ``optax.sgd(0.1)``); see :func:`base_optimizer`.
      momentum: ``β ∈ [0, 1)``, the momentum of the base optimiser (paper default 0.9).
      server_optimizer: the server optimiser on the averaged client delta (default
        ``fl.server.fed_sgd(server_learning_rate)``, the paper's step).
      server_learning_rate: ``η_g`` on the averaged client delta (the paper uses 1).
      lagged: use the previous round's ``c`` instead of a pre-pass (see above).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` (no per-client state; a pre-pass of one
      gradient a step, then 2 gradients a local step). ``update_is_delta`` is False: the
      clients also send their full-batch gradients, which another aggregator or differential
      privacy would not cover.

    References:
      Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich & Suresh, "Breaking the centralized
      barrier for cross-device federated learning" (arXiv: "Mime: Mimicking Centralized
      Stochastic Algorithms in Federated Learning"), NeurIPS 2021, Algorithm 1.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.mime import mime
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = mime(loss, optax.sgd(0.1), momentum=0.0)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 1, 2, 1)), "y": jnp.ones((1, 1, 2)),
      ...                     "mask": jnp.ones((1, 1, 2))}, jnp.ones(1), jnp.arange(1))
      >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(1)), cohort, jax.random.key(0))
      >>> float(state.extra.control_variate[0]), round(float(state.params[0]), 3)  # c = ∇f(x_0)
      (-2.0, 0.2)
    """
    return _mime_family(loss_fn, client_optimizer, momentum, server_optimizer,
                        server_learning_rate, control_variate=True, lagged=lagged,
                        unroll=unroll, name=name)


if mime_lite.__doc__:  # None under python -OO
    mime_lite.__doc__ = mime_lite.__doc__.format(
        rule=_RULE.format(direction="``d = ∇f_i(y; ζ)``", server_extra=""))
