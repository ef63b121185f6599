"""IFCA (Ghosh, Chung, Yin & Ramchandran, NeurIPS 2020): k cluster models, each client picks one.

The server state holds ``k`` models stacked ``[k, ...]`` in ``state.extra.models``; every sampled
client evaluates all ``k`` on its round's data, trains the one of lowest loss and sends the
delta of that cluster only; the server averages each cluster over the clients that chose it.
IFCA has no single global model: ``state.params`` is the average of the cluster models weighted
by the share of cohort weight that chose each in the latest applied round,
``Σ_j s_j θ_j`` (the initial ``params`` before any round), so that everything that evaluates
``state.params`` keeps working; the clients' own models are :func:`personal_params` (and
:func:`fedjax_lab.personalization.evaluate_own_models`).
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

__all__ = ["IFCAExtra", "cluster_models", "ifca", "init_cluster_models", "personal_params"]


class IFCAExtra(NamedTuple):
    """IFCA's server state beyond ``params`` (``state.extra``).

    Attributes:
      models: the ``k`` cluster models, leaves ``[k, ...]``.
    """

    models: Params


def init_cluster_models(params: Params, num_clusters: int, init_scale: float,
                        init_seed: int) -> Params:
    """The ``k`` initial cluster models: ``params`` for cluster 0, and for cluster ``c >= 1``
    ``params + init_scale · N(0, I)`` drawn from ``fold_in(key(init_seed), c)``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = init_cluster_models(jnp.zeros(2), 3, 0.1, 0)
      >>> m.shape, m[0].tolist()
      ((3, 2), [0.0, 0.0])
    """
    leaves, treedef = jax.tree.flatten(params)
    base = jax.random.key(init_seed)
    out = []
    for i, leaf in enumerate(leaves):
        leaf = jnp.asarray(leaf)
        rows = [leaf]
        for c in range(1, num_clusters):
            k = jax.random.fold_in(jax.random.fold_in(base, c), i)
            noise = jax.random.normal(k, leaf.shape, jnp.result_type(float))
            rows.append((leaf + init_scale * noise).astype(leaf.dtype))
        out.append(jnp.stack(rows))
    return jax.tree.unflatten(treedef, out)


def cluster_models(state: ServerState) -> Params:
    """The ``k`` cluster models of an IFCA state, leaves ``[k, ...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> alg = ifca(lambda p, b, k: jnp.sum(p ** 2), num_clusters=3)
      >>> cluster_models(alg.init(jnp.zeros(2))).shape
      (3, 2)
    """
    if not isinstance(state.extra, IFCAExtra):
        raise ValueError("state: not an IFCA state (its extra holds no cluster models); build "
                         "it with fl.algorithms.ifca(...).init(params, num_clients=N).")
    return state.extra.models


def personal_params(state: ServerState, choices: jax.Array | None = None) -> PyTree:
    """Each client's chosen cluster model, leaves ``[N, ...]``.

    Args:
      state: an IFCA server state.
      choices: ``i32[N]`` the cluster of each client; default ``state.client_states`` (the
        cluster each client chose when it last trained; ``-1``, never sampled, gets
        ``state.params``). :func:`fedjax_lab.personalization.cluster_choices` picks them by
        lowest loss on each client's data instead (the paper's rule).

    Example:
      >>> import jax.numpy as jnp
      >>> alg = ifca(lambda p, b, k: jnp.sum(p ** 2), num_clusters=2)
      >>> personal_params(alg.init(jnp.zeros(2), num_clients=3)).shape
      (3, 2)
    """
    models = cluster_models(state)
    if choices is None:
        kit.require_client_state(state.client_states, "ifca")
        choices = state.client_states
    choices = jnp.asarray(choices, jnp.int32)
    k = jax.tree.leaves(models)[0].shape[0]

    def pick(m, p):
        chosen = m[jnp.clip(choices, 0, k - 1)]
        never = (choices < 0).reshape((-1,) + (1,) * p.ndim)
        return jnp.where(never, jnp.broadcast_to(p, chosen.shape), chosen)

    return jax.tree.map(pick, models, state.params)


def _onehot_scale(onehot: jax.Array, tree: PyTree) -> PyTree:
    """``tree`` (one model) placed in row ``argmax(onehot)`` of a ``[k, ...]`` zero stack."""
    return jax.tree.map(lambda x: onehot.reshape((-1,) + (1,) * x.ndim) * x[None], tree)


@register("ifca")
def ifca(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    num_clusters: int = 2,
    init_scale: float = 0.1,
    init_seed: int = 0,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "ifca",
) -> FederatedAlgorithm:
    """IFCA, model-averaging variant: ``k`` cluster models; each client trains the best one.

    Update rule (round ``t``, cluster models ``θ_1 .. θ_k``; client ``i`` of the cohort with
    its round's batches ``D_i``):

    * choice: ``j_i = argmin_j F_i(θ_j)``, ``F_i`` the mean loss over all real examples of
      ``D_i`` (ties: the lowest index);
    * local training: ``θ̃_i = LocalTrain(θ_{j_i})`` on ``D_i`` with ``client_optimizer``;
    * server, per cluster ``j``: with ``S_j = {i : j_i = j}``,
      ``θ_j <- θ_j - γ Σ_{i∈S_j} p_i (θ_j - θ̃_i) / Σ_{i∈S_j} p_i`` (``p_i`` the cohort weight;
      ``γ = 1`` is the paper's average of the ``θ̃_i``; equal weights, or
      ``weighting="uniform"``, give its plain mean). A cluster no client chose keeps its
      params exactly.

    A client's update is the pair ``(onehot(j_i) ⊗ Δ_i, onehot(j_i))`` (so
    ``update_is_delta=False``); the round's metrics add ``cluster_<j>_clients``, the number of
    cohort clients that chose cluster ``j``, and ``state.client_states`` (with ``num_clients``)
    holds each client's latest choice (``-1``: never sampled). ``state.params`` becomes
    ``Σ_j s_j θ_j`` with ``s_j = Σ_{i∈S_j} p_i / Σ_i p_i`` (see the module docstring).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      num_clusters: ``k >= 1``.
      init_scale: the spread of the initial models around ``params`` (see
        :func:`init_cluster_models`; the paper initialises them at random), ``>= 0``.
      init_seed: the seed of that spread.
      server_optimizer: the server optimiser, applied to the stacked models with the
        per-cluster mean delta as pseudo-gradient (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ``.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; the models are ``state.extra.models``
      (:func:`cluster_models`).

    References:
      Ghosh, Chung, Yin & Ramchandran, "An Efficient Framework for Clustered Federated
      Learning", NeurIPS 2020, Algorithm 2 (model averaging).

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> from fedjax_lab.algorithms.ifca import ifca
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = ifca(loss, optax.sgd(0.1), num_clusters=2, init_scale=1.0)
      >>> x = jnp.ones((2, 1, 2, 2))
      >>> y = jnp.stack([jnp.full((1, 2), 3.0), jnp.full((1, 2), -3.0)])  # two planted groups
      >>> cohort = fl.Cohort({"x": x, "y": y, "mask": jnp.ones((2, 1, 2))}, jnp.ones(2),
      ...                    jnp.arange(2))
      >>> state, m = fl.run_round(alg, alg.init(jnp.zeros(2), num_clients=2), cohort,
      ...                         jax.random.key(0))
      >>> state.client_states.tolist(), float(m["cluster_0_clients"])  # one client each
      ([0, 1], 1.0)
    """
    kit.check_loss_fn(loss_fn)
    k = kit.check_count("num_clusters", num_clusters)
    kit.check_positive("init_scale", init_scale, allow_zero=True)
    if isinstance(init_seed, bool) or not isinstance(init_seed, int):
        raise TypeError(f"init_seed: expected an int, got {init_seed!r}.")
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    train = kit.local_training(loss_fn, client_optimizer, unroll=unroll)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        models = init_cluster_models(params, k, init_scale, init_seed)
        choices = () if n is None else jnp.full((n,), -1, jnp.int32)
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(models),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
            client_states=choices,
            extra=IFCAExtra(models),
        )

    def mean_loss(params, batches, key):
        counts = jnp.sum(batches["mask"], axis=1)
        keys = jax.random.split(key, counts.shape[0])
        losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batches, keys)
        losses = jnp.where(counts > 0, losses, 0.0)
        return jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        models = state.extra.models
        k_choose, k_train = jax.random.split(key)
        losses = jax.vmap(mean_loss, in_axes=(0, None, None))(models, client.batches, k_choose)
        choice = jnp.argmin(losses).astype(jnp.int32)
        start = jax.tree.map(lambda m: m[choice], models)
        result = train(start, client.batches, k_train)
        onehot = jax.nn.one_hot(choice, k, dtype=jnp.result_type(float))
        delta = kit.client_delta(start, result.params)
        update = (_onehot_scale(onehot, delta), onehot)
        real = (jnp.asarray(client.weight) > 0).astype(jnp.float32)
        metrics = dict(result.metrics)
        for j in range(k):
            metrics[f"cluster_{j}_clients"] = real * (choice == j).astype(jnp.float32)
        new_state = choice if jax.tree.leaves(client.state) else ()
        return ClientOutput(update, client.weight, metrics, new_state)

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        deltas, shares = aggregate
        chosen = shares > 0
        safe = jnp.where(chosen, shares, 1.0)

        def per_cluster(d):
            shape = (-1,) + (1,) * (d.ndim - 1)
            return jnp.where(chosen.reshape(shape), d / safe.reshape(shape), 0.0).astype(d.dtype)

        grads = jax.tree.map(per_cluster, deltas)
        models = state.extra.models
        updates, opt_state = server_optimizer.update(grads, state.opt_state, models)
        moved = optax.apply_updates(models, updates)
        models = jax.tree.map(
            lambda new, old: jnp.where(chosen.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
            moved, models,
        )
        frac = shares / jnp.maximum(jnp.sum(shares), 1e-30)
        params = jax.tree.map(lambda m: jnp.tensordot(frac.astype(m.dtype), m, axes=1), models)
        return state._replace(params=params, opt_state=opt_state, extra=IFCAExtra(models))

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))
