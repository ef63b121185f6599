"""Partial model sharing: FedPer (Arivazhagan et al. 2019), FedRep (Collins et al. 2021),
LG-FedAvg (Liang et al. 2020) and FedBN (Li et al. 2021).

The model is split into *global* leaves (the shared body / representation), averaged by the
server, and *local* leaves (the personal head), which stay on their client in
``state.client_states`` and never leave it. Which leaves are global is a pytree of booleans
shaped like the params (``True`` = global), given directly, computed by a function of the
params, chosen by path names (``local_keys``), or by default: the last top-level entry of the
params (the output layer of the zoo's MLP/CNN, e.g. ``Dense_1``) is local. LG-FedAvg is the
opposite split (``local="body"``): the local representation layers stay on their client and the
head is averaged. FedBN is FedPer with the BatchNorm layers (their scale/bias and their
running statistics) as the local part (:func:`batch_norm_mask`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

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

__all__ = [
    "batch_norm_mask",
    "fed_bn",
    "fed_per",
    "fed_rep",
    "lg_fed_avg",
    "merge",
    "personal_params",
    "resolve_global_mask",
    "split",
]

MaskSpec = PyTree | Callable[[Params], PyTree] | None


def _natural_key(name: Any):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def _default_head(params: Params) -> PyTree:
    node, path = params, []
    while isinstance(node, dict) and len(node) == 1:  # e.g. {"params": {...}}
        (k,) = node
        path.append(k)
        node = node[k]
    if isinstance(node, dict) and len(node) > 1:
        # Flax names layers by kind (Dense_0, Embed_0, OptimizedLSTMCell_0 ...), so the output
        # layer is the last Dense one when there is one, else the last entry.
        dense = [k for k in node if str(k).startswith("Dense")]
        head = max(dense or list(node), key=_natural_key)
    elif isinstance(node, (list, tuple)) and len(node) > 1:
        head = len(node) - 1
    else:
        raise ValueError(
            "global_mask: cannot guess the head of these params (no top-level entries to split); "
            "pass global_mask= (a pytree of booleans, True = global) or local_keys=."
        )
    target = tuple(path) + (head,)

    def is_global(kp, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in kp)
        return keys[: len(target)] != target

    return jax.tree_util.tree_map_with_path(is_global, params)


def resolve_global_mask(
    params: Params,
    global_mask: MaskSpec = None,
    local_keys: str | Sequence[str] | None = None,
    *,
    local: str = "head",
) -> PyTree:
    """The pytree of booleans (``True`` = global/shared leaf) for ``params``.

    Args:
      params: the model params.
      global_mask: a pytree of booleans shaped like ``params``, or a function
        ``params -> such a pytree``, or ``None``.
      local_keys: alternatively, path substrings: a leaf whose path (``jax.tree_util.keystr``)
        contains one of them is local. With neither, the head is local: the last top-level
        ``Dense*`` entry (natural order), or the last top-level entry when none is ``Dense``.
      local: which side of that default split is local: ``"head"`` (FedRep/FedPer) or
        ``"body"`` (LG-FedAvg: the head is global, every other leaf local). Only used when
        neither ``global_mask`` nor ``local_keys`` is given.

    Returns:
      The mask pytree (Python bools).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
      >>> resolve_global_mask(p)
      {'Dense_0': {'kernel': True}, 'Dense_1': {'kernel': False}}
      >>> resolve_global_mask(p, local_keys="Dense_0")["Dense_0"]
      {'kernel': False}
      >>> resolve_global_mask(p, local="body")
      {'Dense_0': {'kernel': False}, 'Dense_1': {'kernel': True}}
    """
    if local not in ("head", "body"):
        raise ValueError(f"local: expected 'head' or 'body', got {local!r}.")
    if global_mask is not None and local_keys is not None:
        raise ValueError("global_mask, local_keys: give one of them, not both.")
    if local_keys is not None:
        keys = (local_keys,) if isinstance(local_keys, str) else tuple(local_keys)
        mask = jax.tree_util.tree_map_with_path(
            lambda kp, _: not any(k in jax.tree_util.keystr(kp) for k in keys), params
        )
    elif global_mask is None:
        mask = _default_head(params)
        if local == "body":
            mask = jax.tree.map(lambda m: not m, mask)
    elif callable(global_mask):
        mask = global_mask(params)
    else:
        mask = global_mask
    try:
        flags = jax.tree.leaves(jax.tree.map(lambda _, m: bool(m), params, mask))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"global_mask: must be a pytree of booleans with the structure of the params ({e})."
        ) from e
    if all(flags):
        raise ValueError(
            "global_mask: every leaf is global, so nothing is personal; mark the head local "
            "(False) or use fl.algorithms.fed_avg."
        )
    if not any(flags):
        raise ValueError(
            "global_mask: no leaf is global, so nothing is shared; mark the body True."
        )
    return jax.tree.map(lambda _, m: bool(m), params, mask)


def split(params: Params, mask: PyTree) -> tuple[list, list]:
    """``(global_leaves, local_leaves)`` of ``params`` in flatten order."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(mask)
    glob = [x for x, m in zip(leaves, flags, strict=True) if m]
    loc = [x for x, m in zip(leaves, flags, strict=True) if not m]
    return glob, loc


def merge(params: Params, local: Sequence[jax.Array], mask: PyTree) -> Params:
    """``params`` with its local leaves replaced by ``local`` (in flatten order).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
      >>> merge(p, [jnp.ones(1)], {"a": True, "b": False})["b"].tolist()
      [1.0]
    """
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(mask)
    it = iter(local)
    out = [x if m else next(it) for x, m in zip(leaves, flags, strict=True)]
    return jax.tree.unflatten(treedef, out)


def personal_params(
    state: ServerState,
    global_mask: MaskSpec = None,
    local_keys: str | Sequence[str] | None = None,
    *,
    local: str = "head",
) -> PyTree:
    """Each client's personal model: the global leaves with its own local ones, ``[N, ...]``.

    Pass the same ``global_mask``/``local_keys`` as to :func:`fed_rep`/:func:`fed_per`, and
    ``local="body"`` for :func:`lg_fed_avg` (its local representation with the global head).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"body": jnp.ones(3), "head": jnp.zeros(2)}
      >>> alg = lg_fed_avg(lambda q, b, k: jnp.sum(q["body"] ** 2), local_keys="body")
      >>> personal_params(alg.init(p, num_clients=4), local_keys="body")["body"].shape
      (4, 3)
    """
    mask = resolve_global_mask(state.params, global_mask, local_keys, local=local)
    local = list(state.client_states)
    n = local[0].shape[0]
    glob, _ = split(state.params, mask)
    stacked_glob = [jnp.broadcast_to(g, (n,) + g.shape) for g in glob]
    leaves, treedef = jax.tree.flatten(state.params)
    flags = jax.tree.leaves(mask)
    gi, li = iter(stacked_glob), iter(local)
    return jax.tree.unflatten(treedef, [next(gi) if m else next(li) for m in flags])


def _partial(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None,
    *,
    global_mask: MaskSpec,
    local_keys: str | Sequence[str] | None,
    head_epochs: int | None,
    body_epochs: int,
    server_optimizer: optax.GradientTransformation | None,
    server_learning_rate: float,
    unroll: int | bool,
    name: str,
    local: str = "head",
    all_global_ok: bool = False,
) -> FederatedAlgorithm:
    kit.check_loss_fn(loss_fn)
    kit.check_count("head_epochs", head_epochs, optional=True)
    kit.check_count("body_epochs", body_epochs)
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()
    joint = kit.local_training(loss_fn, client_optimizer, unroll=unroll)

    def mask_of(params: Params) -> PyTree:
        if all_global_ok:  # FedBN on a model without BatchNorm: nothing local, i.e. FedAvg
            return global_mask(params)
        return resolve_global_mask(params, global_mask, local_keys, local=local)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        mask = mask_of(params)
        _, loc = split(params, mask)
        heads = () if n is None or not loc else tuple(kit.copies_per_client(tuple(loc), n))
        return kit.server_state(params, server_optimizer, aggregator, client_states=heads)

    def repeat(batches, times):
        return batches if times == 1 else jax.tree.map(
            lambda a: jnp.concatenate([a] * times, axis=0), batches
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        mask = mask_of(state.params)
        if not all(jax.tree.leaves(mask)):
            kit.require_client_state(client.state, name)
        w = state.params
        own = list(client.state)
        if head_epochs is None:  # FedPer: body and head trained together
            result = joint(merge(w, own, mask), repeat(client.batches, body_epochs), key)
            trained = result.params
            metrics = result.metrics
            new_local = split(trained, mask)[1]
        else:  # FedRep: head first (body frozen), then body (head frozen)
            k_head, k_body = jax.random.split(key)
            glob0, _ = split(w, mask)

            def head_loss(loc, batch, k):
                return loss_fn(merge(w, loc, mask), batch, k)

            head = kit.local_training(head_loss, client_optimizer, unroll=unroll)
            new_local = head(own, repeat(client.batches, head_epochs), k_head).params

            def body_loss(glob, batch, k):
                full = merge(_replace_global(w, glob, mask), new_local, mask)
                return loss_fn(full, batch, k)

            body = kit.local_training(body_loss, client_optimizer, unroll=unroll)
            result = body(glob0, repeat(client.batches, body_epochs), k_body)
            trained = merge(_replace_global(w, result.params, mask), new_local, mask)
            metrics = result.metrics
        delta = optax.tree.sub(w, trained)
        delta = jax.tree.map(lambda d, m: d if m else jnp.zeros_like(d), delta, mask)
        return ClientOutput(delta, client.weight, metrics, tuple(new_local))

    server_update = kit.server_step(server_optimizer)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))


def _replace_global(params: Params, glob: Sequence[jax.Array], mask: PyTree) -> Params:
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(mask)
    it = iter(glob)
    return jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, flags,
                                                                           strict=True)])


@register("fedrep")
def fed_rep(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    head_epochs: int = 10,
    body_epochs: int = 1,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    global_mask: MaskSpec = None,
    local_keys: str | Sequence[str] | None = None,
    unroll: int | bool = 1,
    name: str = "fedrep",
) -> FederatedAlgorithm:
    """FedRep: a shared representation (global leaves) and a personal head (local leaves).

    Update rule (round ``t``; client ``i`` with head ``h_i`` from ``client_states``, body
    ``φ_t`` from the server; its ``S`` local batches):

    * head phase: ``head_epochs`` passes over the batches updating only ``h_i`` (body frozen):
      ``h_i <- h_i - η ∇_h f_i(φ_t, h_i)``;
    * body phase: ``body_epochs`` passes updating only the body (new head frozen):
      ``φ_i <- φ_i - η ∇_φ f_i(φ_i, h_i)`` from ``φ_i = φ_t``;
    * server: ``φ_{t+1} = φ_t - γ Σ p_i (φ_t - φ_i)``; the head leaves of the server params are
      never averaged (their delta is 0, so with the default SGD server they never change).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``); a fresh state each
        phase.
      head_epochs: passes of the head phase (paper: 10).
      body_epochs: passes of the body phase (paper: 1).
      server_optimizer: the server optimiser on the mean body delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ`` (1.0: average of the bodies).
      global_mask: which leaves are global (see :func:`resolve_global_mask`).
      local_keys: alternatively, path substrings of the local leaves (e.g. ``"Dense_1"``).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``;
      ``state.client_states`` is the tuple of local leaves (flatten order), each ``[N, ...]``.

    References:
      Collins, Hassani, Mokhtari & Shakkottai, "Exploiting Shared Representations for
      Personalized Federated Learning", ICML 2021, Algorithm 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from fedjax_lab.algorithms.partial import fed_rep
      >>> p = {"body": jnp.ones(3), "head": jnp.zeros(2)}
      >>> alg = fed_rep(lambda q, b, k: jnp.sum(q["body"] ** 2), local_keys="head")
      >>> [x.shape for x in alg.init(p, num_clients=5).client_states]
      [(5, 2)]
    """
    return _partial(
        loss_fn, client_optimizer, global_mask=global_mask, local_keys=local_keys,
        head_epochs=head_epochs, body_epochs=body_epochs,
        server_optimizer=server_optimizer, server_learning_rate=server_learning_rate,
        unroll=unroll, name=name,
    )


@register("fedper")
def fed_per(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    epochs: int = 1,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    global_mask: MaskSpec = None,
    local_keys: str | Sequence[str] | None = None,
    unroll: int | bool = 1,
    name: str = "fedper",
) -> FederatedAlgorithm:
    """FedPer: FedAvg on the base layers, personal (never shared) head layers.

    Update rule: client ``i`` trains the whole model ``(φ_t, h_i)`` jointly with
    ``client_optimizer`` for ``epochs`` passes over its batches, keeps its new head ``h_i`` in
    ``client_states`` and sends only the body delta ``φ_t - φ_i``; the server averages the bodies
    ``φ_{t+1} = φ_t - γ Σ p_i (φ_t - φ_i)``; head leaves of the server params never change.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      epochs: passes over the client's batches.
      server_optimizer: the server optimiser on the mean body delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ``.
      global_mask: which leaves are global (see :func:`resolve_global_mask`).
      local_keys: alternatively, path substrings of the local leaves.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``.

    References:
      Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization
      Layers", arXiv:1912.00818, 2019.

    Example:
      >>> import jax.numpy as jnp
      >>> from fedjax_lab.algorithms.partial import fed_per
      >>> alg = fed_per(lambda q, b, k: jnp.sum(q["w"] ** 2), local_keys="head")
      >>> alg.name
      'fedper'
    """
    return _partial(
        loss_fn, client_optimizer, global_mask=global_mask, local_keys=local_keys,
        head_epochs=None, body_epochs=epochs,
        server_optimizer=server_optimizer, server_learning_rate=server_learning_rate,
        unroll=unroll, name=name,
    )


def _batch_norm_keys(local_keys: Any) -> tuple[str, ...]:
    if isinstance(local_keys, str):
        keys = (local_keys,)
    elif isinstance(local_keys, (list, tuple)):
        keys = tuple(local_keys)
    else:
        keys = ()
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(
            f"local_keys: expected a non-empty path substring such as 'BatchNorm' (or a list of "
            f"them), got {local_keys!r}."
        )
    return keys


def batch_norm_mask(
    params: Params, local_keys: str | Sequence[str] = "BatchNorm", *, strict: bool = True
) -> PyTree:
    """FedBN's split: ``False`` (local) for the BatchNorm layers, ``True`` (global) elsewhere.

    A leaf is local when it belongs to a non-trainable collection of a stateful model's
    variables (any top-level entry other than ``"params"``, e.g. ``batch_stats``: the running
    mean and variance) or when its path (``jax.tree_util.keystr``) contains one of
    ``local_keys`` (Flax Linen names BatchNorm layers ``BatchNorm_0``, ``BatchNorm_1``, ..., so
    the default also catches their ``scale`` and ``bias``).

    Args:
      params: the model params (for a stateful model the dict ``{"params", "batch_stats"}``).
      local_keys: path substrings of the BatchNorm layers' trainable leaves.
      strict: raise ``ValueError`` when no leaf is local (no BatchNorm found); ``False``:
        return the all-``True`` mask.

    Returns:
      The mask pytree (Python bools), for ``global_mask=`` of :func:`personal_params`.

    Example:
      >>> import jax, fedjax_lab as fl
      >>> model = fl.models.mlp((4,), hidden=(3,), num_classes=2, batch_norm=True)
      >>> mask = batch_norm_mask(model.init(jax.random.key(0)))
      >>> mask["batch_stats"]["BatchNorm_0"]["mean"], mask["params"]["BatchNorm_0"]["scale"]
      (False, False)
      >>> mask["params"]["Dense_0"]["kernel"]
      True
    """
    keys = _batch_norm_keys(local_keys)
    stateful = isinstance(params, dict) and "params" in params and len(params) > 1

    def is_global(kp, _):
        top = getattr(kp[0], "key", None) if kp else None
        if stateful and top != "params":
            return False
        return not any(k in jax.tree_util.keystr(kp) for k in keys)

    mask = jax.tree_util.tree_map_with_path(is_global, params)
    if strict and all(jax.tree.leaves(mask)):
        raise ValueError(
            f"params: FedBN found no BatchNorm layer (no non-trainable collection such as "
            f"batch_stats, no path containing {list(keys)}); build the model with BatchNorm "
            "(e.g. fl.models.mlp(..., batch_norm=True)), pass local_keys= naming its "
            "BatchNorm layers, or use fedavg."
        )
    return mask


@register("fedbn")
def fed_bn(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    epochs: int = 1,
    local_keys: str | Sequence[str] = "BatchNorm",
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "fedbn",
) -> FederatedAlgorithm:
    """FedBN: FedAvg on everything but the BatchNorm layers, which stay local to each client.

    Update rule (round ``t``; client ``i`` keeps its BatchNorm scale/bias ``β_i`` and running
    statistics ``s_i`` in ``client_states``, initialised from the global model):

    * client ``i`` trains ``(φ_t, β_i, s_i)`` for ``epochs`` passes over its batches with
      ``client_optimizer`` (the statistics follow each step's batch, see
      :func:`fedjax_lab.client.local_training`), keeps its new ``β_i, s_i`` and sends only the
      non-BatchNorm delta ``φ_t - φ_i``;
    * server: ``φ_{t+1} = φ_t - γ Σ p_i (φ_t - φ_i)``; the server's BatchNorm entries never
      change (their delta is 0).

    Evaluate each client with its own BatchNorm layers: ``personal_params(state,
    global_mask=batch_norm_mask)`` (:func:`personal_params`) feeds
    :func:`fedjax_lab.personalization.evaluate_personalized`. Plain FedAvg on the same model
    averages the statistics instead (weighted by the clients' weights). On a model without
    BatchNorm (nothing matches :func:`batch_norm_mask`) nothing is local and FedBN is FedAvg
    (no per-client state).

    Args:
      loss_fn: mean loss over real examples; for the statistics to be trained, the loss of a
        stateful model (``fl.models.classification_loss(model)`` of a BatchNorm model).
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      epochs: passes over the client's batches.
      local_keys: path substrings of the BatchNorm layers' trainable leaves (see
        :func:`batch_norm_mask`); the non-trainable collections are always local.
      server_optimizer: the server optimiser on the mean non-BatchNorm delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ``.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``;
      ``state.client_states`` is the tuple of BatchNorm leaves (flatten order), each
      ``[N, ...]``.

    References:
      Li, Jiang, Zhang, Kamp & Dou, "FedBN: Federated Learning on Non-IID Features via Local
      Batch Normalization", ICLR 2021.

    Example:
      >>> import jax, fedjax_lab as fl
      >>> model = fl.models.mlp((4,), hidden=(3,), num_classes=2, batch_norm=True)
      >>> alg = fed_bn(fl.models.classification_loss(model))
      >>> state = alg.init(model.init(jax.random.key(0)), num_clients=5)
      >>> [x.shape for x in state.client_states]  # mean, var, bias, scale
      [(5, 3), (5, 3), (5, 3), (5, 3)]
    """
    keys = _batch_norm_keys(local_keys)  # refused before anything is traced
    return _partial(
        loss_fn, client_optimizer, global_mask=lambda p: batch_norm_mask(p, keys, strict=False),
        local_keys=None, head_epochs=None, body_epochs=epochs,
        server_optimizer=server_optimizer, server_learning_rate=server_learning_rate,
        unroll=unroll, name=name, all_global_ok=True,
    )


@register("lg_fedavg")
def lg_fed_avg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    epochs: int = 1,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    global_mask: MaskSpec = None,
    local_keys: str | Sequence[str] | None = None,
    unroll: int | bool = 1,
    name: str = "lg_fedavg",
) -> FederatedAlgorithm:
    """LG-FedAvg: local representation layers per client, global (averaged) head layers.

    The opposite split of FedPer/FedRep: by default the head (the last ``Dense*`` entry) is
    global and every other leaf (the representation ``θ^l_i``) is local. Update rule (round
    ``t``; client ``i`` with its local layers ``θ^l_i`` from ``client_states``, the global
    layers ``θ^g_t`` from the server): the whole model ``(θ^l_i, θ^g_t)`` is trained jointly
    with ``client_optimizer`` for ``epochs`` passes over the client's batches; the client
    keeps its new ``θ^l_i`` and sends only ``θ^g_t - θ^g_i``; the server averages the global
    layers ``θ^g_{t+1} = θ^g_t - γ Σ p_i (θ^g_t - θ^g_i)`` (``p_i ∝`` cohort weight). Local
    leaves of the server params never change. Client ``i``'s model is its own representation
    with the global head (:func:`personal_params` with ``local="body"``).

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      epochs: passes over the client's batches.
      server_optimizer: the server optimiser on the mean global-layer delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: ``γ``.
      global_mask: which leaves are global (see :func:`resolve_global_mask`; ``True`` =
        averaged).
      local_keys: alternatively, path substrings of the local leaves (e.g. ``"Dense_0"``).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``;
      ``state.client_states`` is the tuple of local leaves (flatten order), each ``[N, ...]``.

    References:
      Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov & Morency, "Think Locally, Act
      Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523,
      2020, Algorithm 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from fedjax_lab.algorithms.partial import lg_fed_avg
      >>> p = {"Dense_0": {"kernel": jnp.ones((2, 3))}, "Dense_1": {"kernel": jnp.ones((3, 2))}}
      >>> alg = lg_fed_avg(lambda q, b, k: 0.0)
      >>> [x.shape for x in alg.init(p, num_clients=5).client_states]  # Dense_0 stays local
      [(5, 2, 3)]
    """
    return _partial(
        loss_fn, client_optimizer, global_mask=global_mask, local_keys=local_keys,
        head_epochs=None, body_epochs=epochs,
        server_optimizer=server_optimizer, server_learning_rate=server_learning_rate,
        unroll=unroll, name=name, local="body",
    )
