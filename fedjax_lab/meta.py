"""Differentiable federated learning: a whole run's validation loss as a function of its
continuous hyper-parameters, with ``jax.grad`` through every round.

With fixed cohorts and a fixed key, ``R`` rounds of an algorithm are a deterministic, smooth map
``h -> x_R(h)`` of the continuous hyper-parameters ``h`` (the server and client learning rates,
the aggregation weights, ...). :func:`unrolled_loss` builds ``L(h) = eval_loss(x_R(h))`` as a
``lax.scan`` over the library's own traced round (:func:`fedjax_lab.run_round`'s, guard
included) with ``jax.checkpoint`` around each round, so the backward pass stores only the
``R`` server states between rounds and recomputes each round's local steps (memory
``O(R · |state| + one round)`` instead of ``O(R · local steps · |params|)``).

Two hyper-parameters are the run's own and are not passed to ``make_algorithm``:

* ``aggregation_weights`` (``f32[C]``): replaces every round's cohort weights (the weighted
  mean normalises them: ``x <- x - η Σ_i w_i Δ_i / Σ_i w_i``);
* ``shrink`` (``γ``): multiplies the global model after every server step, ``x <- γ x``.

Together they are FedLAW's learnable aggregation (Li, Lin, Shang & Wu, "Revisiting Weighted
Aggregation in Federated Learning with Neural Networks", ICML 2023): the global model is
``γ Σ_i λ_i x_i`` with ``λ = softmax(θ)`` on the simplex and a global shrinking factor ``γ``,
both learned by gradient descent on a proxy (validation) set; :func:`fedlaw_weights` does
that. With ``num_rounds=1`` and the round's cohort it is the paper's server-side step; over
``R`` rounds it learns one ``(γ, λ)`` for the whole unrolled run (fixed cohorts: each client
keeps its slot).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import maps as maps_lib
from fedjax_lab._round import round_body
from fedjax_lab._types import ClientMap, Cohort, FederatedAlgorithm, Params, PRNGKey

__all__ = ["FedLAWResult", "fedlaw_weights", "unrolled_loss"]

_OWN = ("aggregation_weights", "shrink")


def _check_inputs(make_algorithm, cohorts, eval_loss, key, num_rounds) -> int:
    if not callable(make_algorithm):
        raise TypeError(
            "make_algorithm: expected a callable make_algorithm(**hparams) -> FederatedAlgorithm, "
            f"got {make_algorithm!r}."
        )
    if not callable(eval_loss):
        raise TypeError(f"eval_loss: expected a callable eval_loss(params) -> scalar, got "
                        f"{eval_loss!r}.")
    if not isinstance(cohorts, Cohort):
        raise TypeError(f"cohorts: expected a fl.Cohort, got {type(cohorts).__name__}.")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key: expected a typed PRNG key such as jax.random.key(0).")
    weights_ndim = np.ndim(cohorts.weights)
    if num_rounds is None:
        if weights_ndim != 2:
            raise ValueError(
                "cohorts: without num_rounds, give one cohort per round stacked on a leading "
                f"[R] axis (weights [R, C]); got weights of shape {np.shape(cohorts.weights)}. "
                "Or pass one cohort and num_rounds=R to reuse it every round."
            )
        return int(np.shape(cohorts.weights)[1])
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds: expected a whole number >= 1 or None, got {num_rounds!r}.")
    if weights_ndim != 1:
        raise ValueError(
            f"cohorts: with num_rounds, give ONE cohort (weights [C]); got weights of shape "
            f"{np.shape(cohorts.weights)}."
        )
    return int(np.shape(cohorts.weights)[0])


def unrolled_loss(
    make_algorithm: Callable[..., FederatedAlgorithm],
    init_params: Params,
    cohorts: Cohort,
    eval_loss: Callable[[Params], jax.Array],
    *,
    key: PRNGKey,
    num_rounds: int | None = None,
    num_clients: int | None = None,
    client_map: ClientMap | None = None,
    remat: bool = True,
) -> Callable[[Mapping[str, Any]], jax.Array]:
    """Builds ``L(hparams) = eval_loss(params after R rounds)``, jitted and differentiable.

    Round ``r`` runs exactly :func:`fedjax_lab.run_round`'s traced round of
    ``make_algorithm(**hparams)`` on cohort ``r`` with ``key`` (the round number is folded in),
    starting from ``alg.init(init_params)``; the rounds are one ``lax.scan``, each round under
    ``jax.checkpoint`` when ``remat`` (same values and gradients, less memory).

    Args:
      make_algorithm: ``make_algorithm(**hparams) -> FederatedAlgorithm`` from (traced)
        hyper-parameters, e.g. ``lambda server_lr, client_lr: fl.algorithms.fed_avg(loss,
        client_learning_rate=client_lr, server_learning_rate=server_lr)``.
      init_params: the initial global model.
      cohorts: one :class:`~fedjax_lab.Cohort` per round stacked on a leading ``[R]`` axis, or
        one cohort reused every round with ``num_rounds``.
      eval_loss: ``eval_loss(params) -> scalar``, the validation (proxy) loss.
      key: the run's PRNG key (fixed: the loss is a deterministic function of ``hparams``).
      num_rounds: rounds when ``cohorts`` is a single cohort (``None``: ``cohorts``' ``R``).
      num_clients: passed to ``alg.init`` (algorithms with per-client state).
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.auto`).
      remat: ``jax.checkpoint`` each round (memory of the backward pass bounded by ``R``
        server states plus one round).

    Returns:
      ``L(hparams) -> scalar``: ``hparams`` maps names to floats/arrays; ``aggregation_weights``
      (``[C]``) and ``shrink`` are the run's own (see the module docstring), the rest go to
      ``make_algorithm``.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> make = lambda server_lr, client_lr: fl.algorithms.fed_avg(
      ...     loss, client_learning_rate=client_lr, server_learning_rate=server_lr)
      >>> cohort = fl.Cohort({"x": jnp.ones((2, 1, 3, 2)), "y": jnp.ones((2, 1, 3)),
      ...                     "mask": jnp.ones((2, 1, 3))}, jnp.ones(2), jnp.arange(2))
      >>> val = lambda p: jnp.sum(p - 0.5) ** 2
      >>> L = unrolled_loss(make, jnp.zeros(2), cohort, val, key=jax.random.key(0), num_rounds=3)
      >>> g = jax.grad(L)({"server_lr": 1.0, "client_lr": 0.1})
      >>> bool(g["server_lr"] < 0), bool(g["client_lr"] < 0)  # larger rates: nearer 0.5
      (True, True)
    """
    cohort_size = _check_inputs(make_algorithm, cohorts, eval_loss, key, num_rounds)
    if not isinstance(remat, bool):
        raise TypeError(f"remat: expected True or False, got {remat!r}.")
    client_map = maps_lib.resolve(client_map)

    def loss(hparams: Mapping[str, Any]) -> jax.Array:
        if not isinstance(hparams, Mapping):
            raise TypeError(f"hparams: expected a dict of hyper-parameters, got {hparams!r}.")
        hp = dict(hparams)
        weights = hp.pop("aggregation_weights", None)
        shrink = hp.pop("shrink", None)
        if weights is not None and jnp.shape(weights) != (cohort_size,):
            raise ValueError(
                f"aggregation_weights: expected one weight per cohort slot, shape "
                f"({cohort_size},), got {jnp.shape(weights)}."
            )
        alg = make_algorithm(**hp)
        state = alg.init(init_params, num_clients=num_clients)

        def one_round(state, cohort):
            if weights is not None:
                cohort = cohort._replace(weights=weights)
            state, _ = round_body(alg, client_map, state, cohort, key)
            if shrink is not None:
                state = state._replace(params=jax.tree.map(lambda p: shrink * p, state.params))
            return state, None

        body = jax.checkpoint(one_round) if remat else one_round
        if num_rounds is None:
            state, _ = jax.lax.scan(body, state, cohorts)
        else:
            state, _ = jax.lax.scan(lambda s, _: body(s, cohorts), state, None, length=num_rounds)
        return eval_loss(state.params)

    return jax.jit(loss)


class FedLAWResult(NamedTuple):
    """What :func:`fedlaw_weights` learned.

    Attributes:
      shrink: ``γ > 0``, the global shrinking factor.
      weights: ``λ = softmax(θ)``, ``[C]`` aggregation weights on the simplex.
      losses: the validation loss before each optimisation step and after the last
        (``[steps + 1]``).
    """

    shrink: jax.Array
    weights: jax.Array
    losses: jax.Array


def fedlaw_weights(
    make_algorithm: Callable[..., FederatedAlgorithm],
    init_params: Params,
    cohorts: Cohort,
    eval_loss: Callable[[Params], jax.Array],
    *,
    key: PRNGKey,
    hparams: Mapping[str, Any] | None = None,
    num_rounds: int | None = None,
    steps: int = 50,
    learning_rate: float = 0.1,
    learn_shrink: bool = True,
    client_map: ClientMap | None = None,
    remat: bool = True,
) -> FedLAWResult:
    """FedLAW: learns the shrinking factor ``γ`` and client weights ``λ`` on the validation loss.

    Minimises ``L(γ, λ) = eval_loss(x_R)`` where every round aggregates as
    ``x <- γ (x - η Σ_i λ_i Δ_i)`` (``η`` the server rate; ``η = 1``: ``γ Σ_i λ_i x_i``, the
    paper's ``γ``-scaled weighted average), by ``steps`` Adam steps on ``(log γ, θ)``,
    ``λ = softmax(θ)``, from ``γ = 1`` and uniform ``λ`` (plain averaging). The whole
    optimisation is one compiled program.

    Args:
      make_algorithm, init_params, cohorts, eval_loss, key, num_rounds, client_map, remat: as
        in :func:`unrolled_loss`.
      hparams: the other (fixed) hyper-parameters passed to ``make_algorithm``.
      steps: optimisation steps, ``>= 1``.
      learning_rate: Adam's rate on ``(log γ, θ)``, ``> 0``.
      learn_shrink: ``False`` keeps ``γ = 1`` (weights only).

    Returns:
      A :class:`FedLAWResult`.

    References:
      Li, Lin, Shang & Wu, "Revisiting Weighted Aggregation in Federated Learning with Neural
      Networks", ICML 2023.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> make = lambda: fl.algorithms.fed_avg(loss, client_learning_rate=0.2)
      >>> y = jnp.array([1.0, 1.0, -3.0])[:, None, None] * jnp.ones((3, 1, 4))  # client 2 is off
      >>> cohort = fl.Cohort({"x": jnp.ones((3, 1, 4, 1)), "y": y, "mask": jnp.ones((3, 1, 4))},
      ...                    jnp.ones(3), jnp.arange(3))
      >>> val = lambda p: jnp.sum((p - 1.0) ** 2)
      >>> out = fedlaw_weights(make, jnp.zeros(1), cohort, val, key=jax.random.key(0),
      ...                      num_rounds=2, steps=30, learn_shrink=False)
      >>> bool(out.losses[-1] < out.losses[0]), bool(out.weights[2] < out.weights[0])
      (True, True)
    """
    steps = int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a whole number >= 1, got {steps!r}.")
    if isinstance(learning_rate, bool) or not (
        isinstance(learning_rate, (int, float)) and 0 < learning_rate < float("inf")
    ):
        raise ValueError(f"learning_rate: expected a finite number > 0, got {learning_rate!r}.")
    hparams = dict(hparams or {})
    clash = [k for k in _OWN if k in hparams]
    if clash:
        raise ValueError(f"hparams: {clash} are what fedlaw_weights learns; leave them out.")
    loss = unrolled_loss(make_algorithm, init_params, cohorts, eval_loss, key=key,
                         num_rounds=num_rounds, client_map=client_map, remat=remat)
    cohort_size = int(np.shape(cohorts.weights)[-1])
    dtype = jnp.result_type(float)

    def objective(z):
        log_gamma, theta = z
        gamma = jnp.exp(log_gamma) if learn_shrink else jnp.ones((), dtype)
        return loss({**hparams, "aggregation_weights": jax.nn.softmax(theta), "shrink": gamma})

    opt = optax.adam(learning_rate)

    @jax.jit
    def optimise(z):
        def step(carry, _):
            z, opt_state = carry
            value, grads = jax.value_and_grad(objective)(z)
            updates, opt_state = opt.update(grads, opt_state, z)
            return (optax.apply_updates(z, updates), opt_state), value

        (z, _), values = jax.lax.scan(step, (z, opt.init(z)), None, length=steps)
        return z, jnp.concatenate([values, objective(z)[None]])

    z, losses = optimise((jnp.zeros((), dtype), jnp.zeros((cohort_size,), dtype)))
    gamma = jnp.exp(z[0]) if learn_shrink else jnp.ones((), dtype)
    return FedLAWResult(gamma, jax.nn.softmax(z[1]), losses)
