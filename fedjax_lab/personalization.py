"""Personalised evaluation: each client's own model on each client's own test data.

Federated personalisation is judged per client: client ``i``'s model (fine-tuned from the global
one, a personal model kept by Ditto / pFedMe / FedRep / FedPer, APFL's mixture
``α_i v_i + (1 - α_i) w``, LG-FedAvg's own representation with the global head, or the cluster
model IFCA's client chose) is evaluated on client ``i``'s test examples, and the distribution of
those accuracies (mean, 10th percentile) is reported next to the global model's.
:func:`personal_models` builds each client's own model from the server state of any of those
algorithms, and :func:`evaluate_own_models` evaluates it. The evaluations run as ONE compiled
program, clients mapped by a :class:`~fedjax_lab.ClientMap` (default
:func:`fedjax_lab.maps.sequential`, bounded memory).

``train_data`` and ``test_data`` must hold the same clients in the same order (client ``i`` of
one is client ``i`` of the other), as the loaders of :mod:`fedjax_lab.data.datasets` return them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import kit
from fedjax_lab import maps as maps_lib
from fedjax_lab._types import Batch, ClientMap, LossFn, Params, PRNGKey, PyTree
from fedjax_lab.client import local_training
from fedjax_lab.data import sampling
from fedjax_lab.data._federated import FederatedData
from fedjax_lab.metrics import summarize

__all__ = [
    "PERSONALIZED_ALGORITHMS",
    "cluster_choices",
    "evaluate_own_models",
    "evaluate_personalized",
    "fine_tune_evaluate",
    "personal_models",
    "stack_clients",
]

PERSONALIZED_ALGORITHMS = (
    "apfl", "ditto", "fedbn", "fedper", "fedrep", "ifca", "lg_fedavg", "pfedme",
)
"""The registered algorithms whose clients have their own model (:func:`personal_models`)."""

EvalFn = Callable[[Params, Batch], dict[str, jax.Array]]


def stack_clients(params: PyTree, num_clients: int) -> PyTree:
    """``params`` repeated for every client: leaves ``[num_clients, ...]`` (personal models).

    The same as :func:`fedjax_lab.kit.copies_per_client`.

    Example:
      >>> import jax.numpy as jnp
      >>> stack_clients({"w": jnp.ones(2)}, 3)["w"].shape
      (3, 2)
    """
    return kit.copies_per_client(params, num_clients)


def _test_batches(examples, offsets, cid, *, num_batches: int, batch_size: int) -> Batch:
    """Client ``cid``'s examples as ``[T, Bt]`` batches with a mask (padding past its size)."""
    start, size = offsets[cid], offsets[cid + 1] - offsets[cid]
    pos = jnp.arange(num_batches * batch_size, dtype=jnp.int32)
    total = jax.tree.leaves(examples)[0].shape[0]
    idx = jnp.minimum(start + pos, total - 1)
    shape = (num_batches, batch_size)
    batch = {k: v[idx].reshape(shape + v.shape[1:]) for k, v in examples.items()}
    batch["mask"] = (pos < size).astype(jnp.float32).reshape(num_batches, batch_size)
    return batch


def _eval_sums(eval_fn: EvalFn, params: Params, batches: Batch) -> dict[str, jax.Array]:
    first = jax.tree.map(lambda a: a[0], batches)
    shapes = jax.eval_shape(eval_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, batch):
        return jax.tree.map(jnp.add, acc, eval_fn(params, batch)), None

    return jax.lax.scan(body, zeros, batches)[0]


@functools.partial(
    jax.jit,
    static_argnames=("eval_fn", "client_map", "num_batches", "batch_size", "train", "num_steps",
                     "train_batch", "max_client_size"),
)
def _run(
    eval_fn,
    client_map,
    global_params,
    personal,
    test_examples,
    test_offsets,
    train_examples,
    train_offsets,
    key,
    *,
    num_batches,
    batch_size,
    train,
    num_steps,
    train_batch,
    max_client_size,
):
    n = test_offsets.shape[0] - 1
    ids = jnp.arange(n, dtype=jnp.int32)
    keys = jax.random.split(key, n)

    def one(shared, x):
        gparams = shared
        cid, ckey, own = x
        test = _test_batches(
            test_examples, test_offsets, cid, num_batches=num_batches, batch_size=batch_size
        )
        if train is not None:
            k_idx, k_train = jax.random.split(ckey)
            sizes = train_offsets[1:] - train_offsets[:-1]
            idx, mask = sampling.batch_indices(
                k_idx, train_offsets[cid], sizes[cid], num_steps=num_steps,
                batch_size=train_batch, max_client_size=max_client_size, epochs=None,
            )
            batches = {k: v[idx] for k, v in train_examples.items()}
            batches["mask"] = mask
            own = train(gparams, batches, k_train).params
        return (), (_eval_sums(eval_fn, gparams, test), _eval_sums(eval_fn, own, test))

    xs = (ids, keys, personal if personal is not None else ids)
    _, (g_sums, p_sums) = client_map.apply(one, global_params, xs)
    return g_sums, p_sums


def _report(g_sums, p_sums) -> dict[str, Any]:
    g = summarize({k: np.asarray(v) for k, v in g_sums.items()})
    p = summarize({k: np.asarray(v) for k, v in p_sums.items()})
    out: dict[str, Any] = {"global": g, "personalized": p}
    for tag, s in (("global", g), ("personalized", p)):
        if "accuracy_client_mean" in s:
            out[f"{tag}_accuracy_mean"] = s["accuracy_client_mean"]
            out[f"{tag}_accuracy_p10"] = s["accuracy_p10"]
    return out


def _check_data(data: Any, name: str) -> FederatedData:
    if not isinstance(data, FederatedData):
        raise TypeError(f"{name}: expected a fl.FederatedData, got {type(data).__name__}.")
    if data.num_examples == 0:
        raise ValueError(f"{name}: holds no examples.")
    return data


def _check_positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: need a whole number >= 1, got {value!r}.")
    return int(value)


def _device(data: FederatedData):
    return (
        {k: jnp.asarray(v) for k, v in data.examples.items()},
        jnp.asarray(data.offsets, jnp.int32),
    )


def evaluate_personalized(
    eval_fn: EvalFn,
    global_params: Params,
    personal_params: PyTree,
    test_data: FederatedData,
    *,
    batch_size: int = 256,
    client_map: ClientMap | None = None,
) -> dict[str, Any]:
    """Global-model and personal-model accuracy of every client on its own test data.

    Client ``i``'s test examples are evaluated with the global params and with its personal
    params ``personal_params[i]`` (e.g. ``state.client_states`` of Ditto,
    :func:`fedjax_lab.algorithms.pfedme.personal_params`, or
    :func:`fedjax_lab.algorithms.partial.personal_params` for FedRep/FedPer).

    Args:
      eval_fn: ``eval_fn(params, batch) -> dict`` of sums (``loss_sum``, ``num_correct``,
        ``num_examples``), e.g. ``fl.models.classification_metrics(model)``.
      global_params: the global model.
      personal_params: the personal models, leaves ``[num_clients, ...]``.
      test_data: the clients' test data (client ``i`` = personal model ``i``).
      batch_size: test examples per evaluation step (per client), ``>= 1``.
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.sequential`).

    Returns:
      ``{"global": ..., "personalized": ...}`` each the dict of
      :func:`fedjax_lab.metrics.summarize` (``client_accuracy``, ``accuracy_p10``, ...), plus
      ``global_accuracy_mean``, ``global_accuracy_p10``, ``personalized_accuracy_mean`` and
      ``personalized_accuracy_p10`` (client means: each client counts once).

    Example:
      >>> import jax, numpy as np, fedjax_lab as fl
      >>> from fedjax_lab.personalization import evaluate_personalized, stack_clients
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> test = fl.FederatedData.from_client_arrays([
      ...     {"x": np.ones((3, 2), "f4"), "y": np.zeros(3, "i4")},
      ...     {"x": np.ones((2, 2), "f4"), "y": np.ones(2, "i4")}])
      >>> p = model.init(jax.random.key(0))
      >>> out = evaluate_personalized(fl.models.classification_metrics(model), p,
      ...                             stack_clients(p, 2), test)
      >>> out["global_accuracy_mean"] == out["personalized_accuracy_mean"]
      True
    """
    test_data = _check_data(test_data, "test_data")
    batch_size = _check_positive_int(batch_size, "batch_size")
    n = test_data.num_clients
    for leaf in jax.tree.leaves(personal_params):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
            raise ValueError(
                f"personal_params: every leaf needs a leading axis of {n} (one model per client "
                f"of test_data), got shape {jnp.shape(leaf)}."
            )
    bt = min(batch_size, int(np.max(test_data.client_sizes)))
    bt = max(bt, 1)
    num_batches = max(1, -(-int(np.max(test_data.client_sizes)) // bt))
    ex, off = _device(test_data)
    cmap = maps_lib.sequential() if client_map is None else client_map
    g, p = _run(
        eval_fn, cmap, global_params, personal_params, ex, off, None, None, jax.random.key(0),
        num_batches=num_batches, batch_size=bt, train=None, num_steps=0, train_batch=0,
        max_client_size=0,
    )
    return _report(g, p)


def fine_tune_evaluate(
    loss_fn: LossFn,
    eval_fn: EvalFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    train_data: FederatedData,
    test_data: FederatedData,
    *,
    steps: int,
    batch_size: int,
    key: PRNGKey | None = None,
    eval_batch_size: int = 256,
    client_map: ClientMap | None = None,
) -> dict[str, Any]:
    """Local fine-tuning evaluation: ``steps`` local steps from ``params`` per client, then test.

    For every client ``i``: ``θ_i = LocalTrain(params; train_data_i, steps, batch_size)`` with
    ``optimizer`` (a fresh shuffle of its examples, cycling as needed, every step real), then
    ``θ_i`` and ``params`` are evaluated on ``test_data_i``. With ``optax.sgd(α)`` and
    ``steps=1`` this is Per-FedAvg's one-step adaptation. ``steps`` need not be large; fine-tuned
    models are never written back anywhere.

    Args:
      loss_fn: ``loss_fn(params, batch, key)`` mean loss over real examples.
      eval_fn: evaluation sums (see :func:`evaluate_personalized`).
      optimizer: the fine-tuning optax optimiser.
      params: the global model.
      train_data: the clients' training data (client ``i`` fine-tunes on its own).
      test_data: the same clients' test data.
      steps: local steps per client, ``>= 1``.
      batch_size: examples per local step, ``>= 1``.
      key: PRNG key of the shuffles (default ``jax.random.key(0)``).
      eval_batch_size: test examples per evaluation step.
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.sequential`).

    Returns:
      The dict of :func:`evaluate_personalized` where ``personalized`` is the fine-tuned models.

    Example:
      >>> import jax, optax, numpy as np, fedjax_lab as fl
      >>> from fedjax_lab.personalization import fine_tune_evaluate
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> data = fl.FederatedData.from_client_arrays([
      ...     {"x": np.ones((4, 2), "f4"), "y": np.zeros(4, "i4")},
      ...     {"x": np.ones((4, 2), "f4"), "y": np.ones(4, "i4")}])
      >>> out = fine_tune_evaluate(fl.models.classification_loss(model),
      ...                          fl.models.classification_metrics(model), optax.sgd(1.0),
      ...                          model.init(jax.random.key(0)), data, data, steps=5,
      ...                          batch_size=2)
      >>> out["personalized_accuracy_mean"]
      1.0
    """
    train_data = _check_data(train_data, "train_data")
    test_data = _check_data(test_data, "test_data")
    if train_data.num_clients != test_data.num_clients:
        raise ValueError(
            f"train_data, test_data: must hold the same clients; got {train_data.num_clients} "
            f"and {test_data.num_clients} clients."
        )
    if np.any(train_data.client_sizes <= 0):
        raise ValueError("train_data: every client needs at least one training example.")
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    eval_batch_size = _check_positive_int(eval_batch_size, "eval_batch_size")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer: expected an optax.GradientTransformation such as optax.sgd(0.01), got "
            f"{type(optimizer).__name__}."
        )
    train = _cached_training(loss_fn, optimizer)
    max_test = int(np.max(test_data.client_sizes))
    bt = max(1, min(eval_batch_size, max_test))
    num_batches = max(1, -(-max_test // bt))
    tex, toff = _device(test_data)
    rex, roff = _device(train_data)
    cmap = maps_lib.sequential() if client_map is None else client_map
    key = jax.random.key(0) if key is None else key
    g, p = _run(
        eval_fn, cmap, params, None, tex, toff, rex, roff, key,
        num_batches=num_batches, batch_size=bt, train=train, num_steps=steps,
        train_batch=batch_size, max_client_size=int(np.max(train_data.client_sizes)),
    )
    return _report(g, p)


@functools.cache
def _cached_training(loss_fn, optimizer):
    """One ``local_training`` per (loss, optimiser), so repeated calls do not recompile."""
    return local_training(loss_fn, optimizer)


@functools.partial(jax.jit, static_argnames=("eval_fn", "client_map", "num_batches", "batch_size"))
def _cluster_sums(eval_fn, client_map, models, examples, offsets, *, num_batches, batch_size):
    n = offsets.shape[0] - 1

    def one(shared, cid):
        batches = _test_batches(examples, offsets, cid, num_batches=num_batches,
                                batch_size=batch_size)
        return (), jax.vmap(lambda m: _eval_sums(eval_fn, m, batches))(shared)

    _, sums = client_map.apply(one, models, jnp.arange(n, dtype=jnp.int32))
    return sums


def cluster_choices(
    eval_fn: EvalFn,
    cluster_params: PyTree,
    data: FederatedData,
    *,
    batch_size: int = 256,
    client_map: ClientMap | None = None,
) -> np.ndarray:
    """The cluster of lowest mean loss on each client's ``data`` (IFCA's rule), ``i32[N]``.

    Client ``i`` gets ``argmin_j loss_sum_ij / num_examples_i`` over the ``k`` models
    ``cluster_params`` (leaves ``[k, ...]``, e.g.
    :func:`fedjax_lab.algorithms.ifca.cluster_models`); ties go to the lowest index.

    Args:
      eval_fn: evaluation sums with ``loss_sum`` and ``num_examples`` (see
        :func:`evaluate_personalized`).
      cluster_params: the ``k`` models, leaves ``[k, ...]``.
      data: the clients' data (usually their training data).
      batch_size: examples per evaluation step.
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.sequential`).

    Returns:
      One cluster index per client of ``data``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, fedjax_lab as fl
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> data = fl.FederatedData.from_client_arrays([
      ...     {"x": np.ones((3, 2), "f4"), "y": np.zeros(3, "i4")},
      ...     {"x": np.ones((2, 2), "f4"), "y": np.ones(2, "i4")}])
      >>> models = {"Dense_0": {"kernel": jnp.zeros((2, 2, 2)),  # two models: [k, ...]
      ...                       "bias": jnp.array([[5.0, 0.0], [0.0, 5.0]])}}
      >>> cluster_choices(fl.models.classification_metrics(model), models, data).tolist()
      [0, 1]
    """
    data = _check_data(data, "data")
    batch_size = _check_positive_int(batch_size, "batch_size")
    for key in ("loss_sum", "num_examples"):
        shapes = jax.eval_shape(
            eval_fn, jax.tree.map(lambda a: a[0], cluster_params),
            {k: jnp.asarray(v[:1]) for k, v in data.examples.items()} | {"mask": jnp.ones(1)},
        )
        if key not in shapes:
            raise ValueError(f"eval_fn: must return {key!r} (e.g. fl.models."
                             "classification_metrics(model)); got keys {sorted(shapes)}.")
    max_size = max(1, int(np.max(data.client_sizes)))
    bt = max(1, min(batch_size, max_size))
    ex, off = _device(data)
    cmap = maps_lib.sequential() if client_map is None else client_map
    sums = _cluster_sums(eval_fn, cmap, cluster_params, ex, off,
                         num_batches=-(-max_size // bt), batch_size=bt)
    loss = np.asarray(sums["loss_sum"]) / np.maximum(np.asarray(sums["num_examples"]), 1.0)
    return np.argmin(loss, axis=1).astype(np.int32)


def personal_models(algorithm: str, state: Any, **options: Any) -> PyTree:
    """Every client's own model from a server state of ``algorithm``, leaves ``[N, ...]``.

    =============================  ===========================================================
    ``algorithm``                  client ``i``'s model
    =============================  ===========================================================
    ``"ditto"``, ``"pfedme"``      its personal model (``state.client_states``)
    ``"fedrep"``, ``"fedper"``     the global body with its own head (options: ``global_mask``
                                   or ``local_keys``, as given to the algorithm)
    ``"lg_fedavg"``                its own representation with the global head (same options)
    ``"fedbn"``                    the global model with its own BatchNorm layers and
                                   statistics (option ``local_keys``, as given to the algorithm)
    ``"apfl"``                     ``α_i v_i + (1 - α_i) w``
    ``"ifca"``                     the cluster model it chose (option ``choices``, ``i32[N]``;
                                   default its latest choice, see
                                   :func:`fedjax_lab.algorithms.ifca.personal_params`)
    =============================  ===========================================================

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = fl.algorithms.apfl(lambda p, b, k: jnp.sum(p ** 2), alpha=0.5)
      >>> personal_models("apfl", alg.init(jnp.ones(2), num_clients=3)).shape
      (3, 2)
    """
    if algorithm not in PERSONALIZED_ALGORITHMS:
        raise ValueError(
            f"algorithm: got {algorithm!r}; allowed: {', '.join(PERSONALIZED_ALGORITHMS)} (the "
            "others have one global model: evaluate state.params, or fine_tune_evaluate)."
        )
    allowed = {"fedrep": ("global_mask", "local_keys"), "fedper": ("global_mask", "local_keys"),
               "lg_fedavg": ("global_mask", "local_keys"), "ifca": ("choices",),
               "fedbn": ("local_keys",)}
    extra = sorted(set(options) - set(allowed.get(algorithm, ())))
    if extra:
        raise ValueError(
            f"{extra[0]}: not an option of {algorithm!r}; allowed: "
            f"{', '.join(allowed.get(algorithm, ())) or 'none'}."
        )
    # the package re-exports the factories under the module names: take the modules themselves
    partial_lib = _algorithm_module("partial")
    if algorithm in ("fedrep", "fedper"):
        return partial_lib.personal_params(state, **options)
    if algorithm == "lg_fedavg":
        return partial_lib.personal_params(state, local="body", **options)
    if algorithm == "fedbn":
        if not state.client_states:
            raise ValueError(
                "state: this FedBN state keeps no client state (its model has no BatchNorm "
                "layer), so every client's model is the global one: evaluate state.params."
            )
        mask = partial_lib.batch_norm_mask(state.params, options.get("local_keys", "BatchNorm"),
                                           strict=False)
        return partial_lib.personal_params(state, global_mask=mask)
    if algorithm in ("ifca", "apfl"):
        return _algorithm_module(algorithm).personal_params(state, **options)
    kit.require_client_state(state.client_states, algorithm)
    return _algorithm_module(algorithm).personal_params(state)


def _algorithm_module(name: str):
    import importlib

    return importlib.import_module(f"fedjax_lab.algorithms.{name}")


def evaluate_own_models(
    eval_fn: EvalFn,
    algorithm: str,
    state: Any,
    test_data: FederatedData,
    *,
    choose_on: FederatedData | None = None,
    batch_size: int = 256,
    client_map: ClientMap | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Each client evaluated on ITS OWN model (:func:`personal_models`) and on the global one.

    The global model is ``state.params`` (for IFCA: the cluster models averaged by their
    latest shares). For ``"ifca"`` with ``choose_on`` (e.g. the training data), each client's
    cluster is the one of lowest loss on its own ``choose_on`` examples
    (:func:`cluster_choices`, the paper's
    inference rule) instead of its latest choice.

    Args:
      eval_fn: evaluation sums (see :func:`evaluate_personalized`).
      algorithm: the registered name (one of :data:`PERSONALIZED_ALGORITHMS`).
      state: the algorithm's server state, built with ``num_clients = test_data.num_clients``.
      test_data: the clients' test data (client ``i`` = model ``i``).
      choose_on: IFCA only: the data the clusters are chosen on.
      batch_size: test examples per evaluation step.
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.sequential`).
      **options: passed to :func:`personal_models`.

    Returns:
      The dict of :func:`evaluate_personalized` (``personalized`` = the clients' own models).

    Example:
      >>> import jax, numpy as np, fedjax_lab as fl
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> test = fl.FederatedData.from_client_arrays([
      ...     {"x": np.ones((3, 2), "f4"), "y": np.zeros(3, "i4")},
      ...     {"x": np.ones((2, 2), "f4"), "y": np.ones(2, "i4")}])
      >>> alg = fl.algorithms.apfl(fl.models.classification_loss(model))
      >>> state = alg.init(model.init(jax.random.key(0)), num_clients=2)
      >>> out = evaluate_own_models(fl.models.classification_metrics(model), "apfl", state, test)
      >>> out["global_accuracy_mean"] == out["personalized_accuracy_mean"]  # v_i = w at start
      True
    """
    if choose_on is not None:
        if algorithm != "ifca":
            raise ValueError(f"choose_on: only for 'ifca' (picks each client's cluster), not "
                             f"{algorithm!r}.")
        if "choices" in options:
            raise ValueError("choose_on, choices: give one of them, not both.")
        models = _algorithm_module("ifca").cluster_models(state)
        options["choices"] = cluster_choices(eval_fn, models, choose_on,
                                             batch_size=batch_size, client_map=client_map)
    personal = personal_models(algorithm, state, **options)
    return evaluate_personalized(eval_fn, state.params, personal, test_data,
                                 batch_size=batch_size, client_map=client_map)
