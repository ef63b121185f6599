"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct the clients' drift.

Also holds the small pieces the other client-drift algorithms of this family share (FedDyn,
Mime, FedAvg-M): a masked local-step loop that sums per-step statistics, a per-client-state
check, and an aggregator that returns a weighted mean AND a plain sum of the client updates.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import server as server_lib
from fedjax_lab._types import (
    Aggregator,
    Batch,
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
from fedjax_lab.algorithms.fedavg import _client_optimizer

__all__ = ["scaffold"]

# ----------------------------------------------------------------------------- shared helpers


def _check_loss_fn(loss_fn: LossFn) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(params, batch, key), got {loss_fn!r}."
        )


def _check_num_clients(num_clients: int | None) -> int | None:
    """``num_clients`` as an int ``>= 1``; ``None`` stays ``None`` (shape-only inits)."""
    if num_clients is None:
        return None
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients: need a whole number >= 1, got {num_clients!r}.")
    return int(num_clients)


def _require_client_state(client_state: PyTree, name: str) -> None:
    """Trace-time check that the server state was built with ``num_clients``."""
    if not jax.tree.leaves(client_state):
        raise ValueError(
            f"num_clients: {name} keeps per-client state; build the state with "
            "alg.init(params, num_clients=train_data.num_clients)."
        )


def _population_size(client_states: PyTree) -> int:
    """``N``: the leading axis of the stacked per-client state (static at trace time)."""
    return int(jax.tree.leaves(client_states)[0].shape[0])


def _zeros_for_clients(params: Params, num_clients: int) -> PyTree:
    return jax.tree.map(lambda a: jnp.zeros((num_clients,) + jnp.shape(a), jnp.result_type(a)),
                        params)


def _check_rate(name: str, value) -> None:
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}.")


StepFn = Callable[[Params, PyTree, Batch, PRNGKey], tuple[Params, PyTree, jax.Array, PyTree]]


def _local_loop(
    step: StepFn,
    params: Params,
    opt_state: PyTree,
    batches: Batch,
    key: PRNGKey,
    stat_zeros: PyTree,
    *,
    unroll: int | bool = 1,
) -> tuple[Params, PyTree, PyTree, dict[str, jax.Array]]:
    """Runs ``step`` over the ``[S, B]`` batches as one ``lax.scan``, skipping all-masked steps.

    ``step(params, opt_state, batch, key) -> (params, opt_state, data_loss, stat)``; ``stat`` is
    summed over the REAL steps (those with at least one unmasked example); an all-masked step
    changes nothing. Returns ``(params, opt_state, stat_sum, metrics)`` with the metrics of
    :func:`fedjax_lab.client.local_training` (``loss_sum``, ``num_examples``, ``num_steps``).
    """
    num_steps = jax.tree.leaves(batches)[0].shape[0]

    def body(carry, xs):
        y, s, acc = carry
        batch, step_key = xs
        count = jnp.sum(batch["mask"])

        def apply(args):
            y, s, acc = args
            y, s, loss, stat = step(y, s, batch, step_key)
            return y, s, jax.tree.map(jnp.add, acc, stat), jnp.asarray(loss, jnp.float32)

        def skip(args):
            y, s, acc = args
            return y, s, acc, 0.0 * count

        y, s, acc, loss = jax.lax.cond(count > 0, apply, skip, (y, s, acc))
        return (y, s, acc), (loss * count, count)

    (params, opt_state, acc), (loss_sums, counts) = jax.lax.scan(
        body, (params, opt_state, stat_zeros), (batches, jax.random.split(key, num_steps)),
        unroll=unroll,
    )
    metrics = {
        "loss_sum": jnp.sum(loss_sums),
        "num_examples": jnp.sum(counts),
        "num_steps": jnp.sum(counts > 0).astype(jnp.float32),
    }
    return params, opt_state, acc, metrics


def _mean_and_sum() -> Aggregator:
    """Client update ``(u, v)`` -> ``(Σ w_i u_i / Σ w_i, Σ_i v_i)``: a weighted mean and a sum.

    The sum is over every client the engine kept (weights do not enter it): it carries the
    change of per-client state (``Δc_i`` of SCAFFOLD, ``θ_i - θ`` of FedDyn) into a server
    average over the whole population, which must count exactly the clients whose state
    changed. A dropped client's update is zeroed by the engine and its state kept, so both
    stay consistent.
    """

    def init(params: PyTree) -> tuple:
        del params
        return ()

    def prepare(update, weight, state):
        del state
        u, v = update
        weight = jnp.asarray(weight, jnp.float32)
        return optax.tree.scale(weight, u), v, weight

    def finalize(contribution, state, key):
        del key
        total_u, total_v, total_weight = contribution
        safe = jnp.where(total_weight > 0, total_weight, 1.0)
        return (optax.tree.scale(1.0 / safe, total_u), total_v), total_weight, state

    return Aggregator(init, prepare, finalize, reduce="sum")


# ----------------------------------------------------------------------------------- SCAFFOLD


@register("scaffold")
def scaffold(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    client_learning_rate: float | None = None,
    server_learning_rate: float = 1.0,
    *,
    unroll: int | bool = 1,
    name: str = "scaffold",
) -> FederatedAlgorithm:
    """SCAFFOLD with option II control variates (Karimireddy et al. 2020, Algorithm 1).

    Server state: model ``x`` and control variate ``c`` (``state.extra``); client ``i`` keeps
    ``c_i`` (``state.client_states``, zeros at init, so ``c = mean_i c_i`` holds throughout).
    Round ``t``, cohort ``S`` of a population of ``N``:

    * client ``i``: ``y <- x``; each REAL local step (an all-padding step is skipped)
      ``y <- y - η_l (g_i(y) - c_i + c)`` with ``g_i(y)`` the mini-batch gradient; after its
      ``K_i`` real steps (option II)
      ``c_i+ = c_i - c + (x - y) / (K_i η_l)``, which for SGD is exactly the mean of the
      ``K_i`` mini-batch gradients ``(1/K_i) Σ_k g_i(y_k)`` -- computed in that form, so
      ``η_l`` need not be known; ``K_i = 0`` leaves ``c_i`` unchanged. Sends
      ``Δx_i = x - y`` and ``Δc_i = c_i+ - c_i``;
    * server: ``x <- x - η_g Σ p_i Δx_i`` (``p_i ∝`` cohort weight; the paper's uniform
      ``1/|S|`` is ``weighting="uniform"``) and ``c <- c + (1/N) Σ_{i∈S} Δc_i``
      (= ``c + (|S|/N) mean_S Δc_i``).

    With zero control variates and one local step the first round is FedAvg. The paper's local
    solver is plain SGD (the default, ``optax.sgd(client_learning_rate)``). Another optax
    ``client_optimizer`` (momentum, Adam) is applied to the corrected gradient
    ``g - c_i + c`` and ``c_i+`` stays the mean raw gradient: a common generalisation, not in
    the paper (there ``(x - y)/(K η_l)`` no longer equals it).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` mean loss over real examples.
      client_optimizer: local optimiser; ``None`` gives plain SGD with ``client_learning_rate``.
      client_learning_rate: ``η_l`` of the default SGD (``None``: 0.1); give either this or
        ``client_optimizer``, not both.
      server_learning_rate: ``η_g`` (the paper uses 1).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``.
      Its client update is the pair ``(Δx_i, Δc_i)``.

    References:
      Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled
      Averaging for Federated Learning", ICML 2020, Algorithm 1 (option II).

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.scaffold import scaffold
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = scaffold(loss, client_learning_rate=0.1)
      >>> state = alg.init(jnp.zeros(2), num_clients=3)
      >>> cohort = fl.Cohort({"x": jnp.ones((1, 2, 2, 2)), "y": jnp.ones((1, 2, 2)),
      ...                     "mask": jnp.ones((1, 2, 2))}, jnp.ones(1), jnp.array([1]))
      >>> state, _ = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> [round(v, 3) for v in state.client_states[:, 0].tolist()]  # c_1 moved, c_0, c_2 not
      [0.0, -1.6, 0.0]
      >>> round(float(state.extra[0]), 3)  # c = mean_i c_i
      -0.533
    """
    _check_loss_fn(loss_fn)
    if client_optimizer is not None and client_learning_rate is not None:
        raise ValueError(
            "client_learning_rate: give either client_optimizer or client_learning_rate "
            "(plain SGD with that rate), not both."
        )
    if client_learning_rate is not None:
        _check_rate("client_learning_rate", client_learning_rate)
        client_optimizer = optax.sgd(client_learning_rate)
    optimizer = _client_optimizer(client_optimizer)
    server_optimizer = server_lib.fed_sgd(server_learning_rate)
    aggregator = _mean_and_sum()
    grad_fn = jax.value_and_grad(loss_fn)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = _check_num_clients(num_clients)
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
            client_states=() if n is None else _zeros_for_clients(params, n),
            extra=optax.tree.zeros_like(params),
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        _require_client_state(client.state, name)
        x, c, c_i = state.params, state.extra, client.state
        correction = optax.tree.sub(c, c_i)

        def step(y, opt_state, batch, k):
            loss, g = grad_fn(y, batch, k)
            updates, opt_state = optimizer.update(optax.tree.add(g, correction), opt_state, y)
            return optax.apply_updates(y, updates), opt_state, loss, g

        y, _, grad_sum, metrics = _local_loop(
            step, x, optimizer.init(x), client.batches, key, optax.tree.zeros_like(x),
            unroll=unroll,
        )
        k_real = metrics["num_steps"]
        new_c_i = optax.tree.where(
            k_real > 0, optax.tree.scale(1.0 / jnp.maximum(k_real, 1.0), grad_sum), c_i
        )
        delta_c = optax.tree.sub(new_c_i, c_i)
        return ClientOutput((optax.tree.sub(x, y), delta_c), client.weight, metrics, new_c_i)

    def server_update(state: ServerState, aggregate: PyTree, key: PyTree) -> ServerState:
        del key
        mean_delta, sum_delta_c = aggregate
        updates, opt_state = server_optimizer.update(mean_delta, state.opt_state, state.params)
        n = _population_size(state.client_states)
        c = optax.tree.add(state.extra, optax.tree.scale(1.0 / n, sum_delta_c))
        return state._replace(
            params=optax.apply_updates(state.params, updates), opt_state=opt_state, extra=c
        )

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name)
