"""A model as a pure ``(init, apply)`` pair, Flax adapters, and the engine's losses/metrics."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab._types import Batch, LossFn, Params, PRNGKey
from fedjax_lab.data._federated import FederatedData


class ModelSpec(NamedTuple):
    """What a model was built for, so data can be checked against it before anything compiles.

    Attributes:
      input_shape: shape of one example ``x`` (``None``: any, e.g. sequences of any length).
      num_classes: number of output classes; labels must be integers in ``[0, num_classes)``.
      input_vocab: for token-id inputs, the number of ids: ``x`` must hold integers in
        ``[0, input_vocab)`` (an embedding would silently clamp the others). ``None`` for
        real-valued inputs.
      sequence: labels are per position, ``y`` shaped like ``x`` (``[N, T]``), rather than one
        class per example (``y`` ``[N]``).
    """

    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    input_vocab: int | None = None
    sequence: bool = False


class Model(NamedTuple):
    """A model as two pure functions; the engine only ever sees the params pytree.

    A STATEFUL model (one with BatchNorm) also carries non-trainable collections: its params
    are the Flax variables dict ``{"params": trainable, "batch_stats": running statistics}``
    and ``train_apply`` is set. Everything else sees that dict as ordinary params (the
    aggregators average it, checkpoints save it); only the local loop treats it specially,
    through the loss's ``with_state`` (see :func:`classification_loss` and
    :func:`fedjax_lab.client.local_training`): gradients step the ``"params"`` entry and the
    other collections are replaced by the ones the training-mode forward pass returns.

    Attributes:
      init: ``init(key) -> params``, a pytree of arrays.
      apply: ``apply(params, x, *, key=None, train=False) -> logits`` for ONE batch ``x``
        (``[B, ...]``, no client axis: a client map adds that). ``key`` feeds stochastic layers
        (dropout) and is used only when ``train=True``. A stateful model's ``apply`` uses the
        running statistics with ``train=False`` (evaluation) and discards the updated ones
        with ``train=True``.
      spec: what the model expects of the data (:class:`ModelSpec`), set by the zoo's
        factories and read by :func:`check_data`; ``None`` when unknown (then
        :func:`check_data` finds the number of classes by tracing ``apply`` once).
      features: ``features(params, x, *, key=None, train=False) -> f32[B, d]``, the
        representation (penultimate-layer features: the input of the output layer) that
        representation-level methods such as MOON contrast; ``None`` when the model does not
        expose one. :func:`from_flax` sets it; a Linen module provides it by calling
        ``self.sow("intermediates", "features", h)`` on ``h`` (the zoo's MLP, CNN and ResNet
        do), and calling it on a module that sows nothing raises ``ValueError``.
      train_apply: ``None`` for a stateless model (every model without BatchNorm). For a
        stateful one, ``train_apply(params, x, *, key=None, mask=None) -> (logits,
        new_state)``: the training-mode forward pass, ``new_state`` the updated
        non-trainable collections (``{"batch_stats": ...}``); ``mask`` (``f32[B]``, 1 = real
        example) keeps padding examples out of the batch statistics when the module's
        ``__call__`` takes a ``mask`` argument (see :func:`from_flax`).
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[..., jax.Array]
    spec: ModelSpec | None = None
    features: Callable[..., jax.Array] | None = None
    train_apply: Callable[..., tuple[jax.Array, dict[str, Any]]] | None = None


def _mode_kwarg(fn: Callable) -> str | None:
    """Which keyword a Flax ``__call__`` takes for train/eval mode, if any."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return None
    for name in ("train", "deterministic"):
        if name in params:
            return name
    return None


def _mode_kwargs(name: str | None, train: bool) -> dict[str, bool]:
    if name == "train":
        return {"train": train}
    if name == "deterministic":
        return {"deterministic": not train}
    return {}


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def _check_state_params(params: Any, collections: Sequence[str]) -> None:
    """A stateful model's params must be its variables dict (trace time only)."""
    if not (isinstance(params, dict) and "params" in params
            and all(c in params for c in collections)):
        have = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"params: this model carries the non-trainable collections {list(collections)} "
            "(BatchNorm statistics), so its params are the dict {'params': ..., "
            + ", ".join(f"{c!r}: ..." for c in collections)
            + f"}} that model.init(key) returns; got {have}."
        )


_STATE_COLLECTIONS: dict[tuple, list[str]] = {}


def _flax_state_collections(module: Any, example_input: Any, mode: str | None) -> list[str]:
    """The variable collections of ``module`` besides ``"params"``, read off a shape-only trace
    (cached per module and input shape: the zoo builds the same modules many times)."""
    key = (module, np.shape(example_input), str(np.asarray(example_input).dtype), mode)
    try:
        hit = _STATE_COLLECTIONS.get(key)
    except TypeError:  # an unhashable module: not cached
        key, hit = None, None
    if hit is None:
        hit = _trace_state_collections(module, example_input, mode)
        if key is not None:
            _STATE_COLLECTIONS[key] = hit
    return list(hit)


def _trace_state_collections(module: Any, example_input: Any, mode: str | None) -> list[str]:
    def variables():
        k = jax.random.key(0)
        return module.init({"params": k, "dropout": k}, example_input, **_mode_kwargs(mode, False))

    try:
        shapes = jax.eval_shape(variables)
    except Exception:  # noqa: BLE001 - the module's own error is raised by init, as before
        return []
    return sorted(k for k in shapes if k != "params")


def from_flax(module: Any, example_input: Any, *, spec: ModelSpec | None = None) -> Model:
    """Wraps a Flax Linen module as a :class:`Model`.

    ``init(key)`` runs ``module.init`` on ``example_input`` (a ``[B, ...]`` array; only its shape
    and dtype matter) and returns the ``"params"`` collection. ``apply`` runs ``module.apply``
    with ``rngs={"dropout": key}`` when a key is given. If ``module.__call__`` takes ``train`` it
    gets ``train=train``; if it takes ``deterministic`` it gets ``deterministic=not train``.

    Stateful modules (BatchNorm's mutable ``batch_stats`` collection, or any collection besides
    ``"params"``) must take ``train`` (or ``deterministic``), e.g. ``nn.BatchNorm(
    use_running_average=not train)``. Then ``init`` returns the whole variables dict
    ``{"params": ..., "batch_stats": ...}``, ``apply(..., train=False)`` normalises with the
    running statistics (evaluation) and :attr:`Model.train_apply` runs the module in training
    mode with the collections mutable, returning ``(logits, {"batch_stats": new})``; if
    ``module.__call__`` takes ``mask``, ``train_apply`` passes it the real-example mask
    (``bool[B]``; the module reshapes it for its BatchNorm input, e.g. ``mask[:, None]``, and
    passes it as ``nn.BatchNorm(...)(x, mask=...)``) so padding stays out of the batch
    statistics. Whether the module is
    stateful is read off one shape-only trace of ``module.init`` here (no compile).
    A stateful module without a ``train``/``deterministic`` argument is refused by ``init``.

    ``features(params, x, *, key=None, train=False)`` runs the same forward pass and returns
    what the module sowed as ``self.sow("intermediates", "features", h)`` (its representation,
    read by MOON); a module that sows nothing makes it raise ``ValueError``. Sowing changes
    nothing else: ``apply`` never collects intermediates.

    Args:
      module: a ``flax.linen.Module`` instance.
      example_input: an example batch ``[B, ...]`` for shape inference.
      spec: what the model expects of the data, for :func:`check_data` (optional).

    Returns:
      A :class:`Model` (``train_apply`` set when the module is stateful).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> model = from_flax(nn.Dense(3), jnp.zeros((1, 4)))
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jnp.ones((2, 4))).shape
      (2, 3)
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool = False):
      ...         return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))
      >>> bn = from_flax(Net(), jnp.zeros((1, 4)))
      >>> variables = bn.init(jax.random.key(0))
      >>> sorted(variables), bn.train_apply is not None
      (['batch_stats', 'params'], True)
      >>> logits, new = bn.train_apply(variables, jnp.arange(8.0).reshape(2, 4))
      >>> [round(m, 4) for m in new["batch_stats"]["BatchNorm_0"]["mean"].tolist()]  # 0.01 * mean
      [0.02, 0.03, 0.04, 0.05]
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module: expected a flax.linen.Module instance, got {type(module).__name__}; for a "
            "Flax NNX module use from_nnx."
        )
    mode = _mode_kwarg(type(module).__call__)
    state = _flax_state_collections(module, example_input, mode) if mode is not None else []
    takes_mask = _takes(type(module).__call__, "mask")

    def init(key: PRNGKey) -> Params:
        pkey, dkey = jax.random.split(key)
        variables = module.init(
            {"params": pkey, "dropout": dkey}, example_input, **_mode_kwargs(mode, False)
        )
        extra = sorted(k for k in variables if k != "params")
        if extra and not state:
            raise ValueError(
                f"module: has variable collections {extra} besides 'params' (e.g. BatchNorm's "
                "batch_stats) but its __call__ takes no `train` (or `deterministic`) argument, "
                "so it cannot switch between batch and running statistics; add `train: bool = "
                "False` and use nn.BatchNorm(use_running_average=not train), or use GroupNorm "
                "or LayerNorm."
            )
        if not state:
            return variables.get("params", {})
        return {"params": variables.get("params", {}), **{k: variables[k] for k in state}}

    def train_apply(
        params: Params, x: jax.Array, *, key: PRNGKey | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        _check_state_params(params, state)
        rngs = {"dropout": key} if key is not None else None
        kwargs = _mode_kwargs(mode, True)
        if mask is not None and takes_mask:
            kwargs["mask"] = jnp.asarray(mask) > 0
        logits, new = module.apply(params, x, rngs=rngs, mutable=list(state), **kwargs)
        return logits, {k: new[k] for k in state}

    def apply(
        params: Params, x: jax.Array, *, key: PRNGKey | None = None, train: bool = False
    ) -> jax.Array:
        rngs = {"dropout": key} if key is not None else None
        if not state:
            return module.apply({"params": params}, x, rngs=rngs, **_mode_kwargs(mode, train))
        if train:
            return train_apply(params, x, key=key)[0]
        _check_state_params(params, state)
        return module.apply(params, x, rngs=rngs, **_mode_kwargs(mode, False))

    def features(
        params: Params, x: jax.Array, *, key: PRNGKey | None = None, train: bool = False
    ) -> jax.Array:
        rngs = {"dropout": key} if key is not None else None
        variables = params if state else {"params": params}
        _, sown = module.apply(variables, x, rngs=rngs, mutable=["intermediates"],
                               **_mode_kwargs(mode, False if state else train))
        found = sown.get("intermediates", {}).get("features")
        if not found:
            raise ValueError(
                f"model: the module {type(module).__name__} exposes no representation; call "
                'self.sow("intermediates", "features", h) on its penultimate features h in '
                "__call__ (as the zoo's mlp, cnn and resnet do), or pass representation= to "
                "the algorithm."
            )
        return found[-1]

    return Model(init=init, apply=apply, spec=spec, features=features,
                 train_apply=train_apply if state else None)


def from_nnx(module: Any) -> Model:
    """Wraps a Flax NNX module, or a factory ``make(rngs) -> module``, as a :class:`Model`.

    The module is split once with ``nnx.split(module, nnx.Param, nnx.BatchStat, ...)``:
    ``params`` is the ``nnx.Param`` state as a pure pytree (an ``nnx.State``) and everything
    else (RNG streams, constants) stays fixed. ``apply`` rebuilds the module with ``nnx.merge``
    on copies of both, sets train/eval mode (``module.train()`` / ``module.eval()``), in training
    reseeds every RNG stream of the module (``dropout``, ...) from ``key`` (``fold_in(key, i)``
    for the i-th stream name in sorted order) and calls it; nothing leaks out, so ``apply`` is
    pure.

    A module with ``nnx.BatchNorm`` (``nnx.BatchStat`` variables) is stateful: ``params`` is
    ``{"params": Param state, "batch_stats": BatchStat state}``, ``apply(..., train=False)``
    uses the running statistics and :attr:`Model.train_apply` returns ``(logits,
    {"batch_stats": the statistics after the training-mode call})``; if the module's
    ``__call__`` takes ``mask``, it gets the real-example mask ``bool[B]``, as in
    :func:`from_flax`.

    With a factory, ``init(key)`` builds a fresh module from ``nnx.Rngs(key)``; with an instance,
    ``init`` returns the instance's own parameters whatever the key (build it from the seed
    you want, or pass a factory).

    Args:
      module: an ``nnx.Module`` instance, or a callable ``make(rngs: nnx.Rngs) -> nnx.Module``.

    Returns:
      A :class:`Model`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> model = from_nnx(lambda rngs: nnx.Linear(4, 3, rngs=rngs))
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jnp.ones((2, 4))).shape
      (2, 3)
      >>> bn = from_nnx(lambda rngs: nnx.BatchNorm(4, rngs=rngs))
      >>> _, new = bn.train_apply(bn.init(jax.random.key(0)), jnp.arange(8.0).reshape(2, 4))
      >>> [round(m, 4) for m in new["batch_stats"]["mean"][...].tolist()]  # 0.01 * batch mean
      [0.02, 0.03, 0.04, 0.05]
    """
    from flax import nnx

    if isinstance(module, nnx.Module):
        factory = None
        built = module
    elif callable(module):
        factory = module
        built = factory(nnx.Rngs(0))
        if not isinstance(built, nnx.Module):
            raise TypeError(
                f"module: the factory returned {type(built).__name__}, expected an nnx.Module."
            )
    else:
        raise TypeError(
            f"module: expected an nnx.Module or a factory make(rngs) -> nnx.Module, got "
            f"{type(module).__name__}; for a Flax Linen module use from_flax."
        )
    graphdef, params0, stats0, rest = nnx.split(built, nnx.Param, nnx.BatchStat, ...)
    stateful = bool(jax.tree.leaves(stats0))
    takes_mask = _takes(type(built).__call__, "mask")

    def as_params(params, stats):
        return {"params": params, "batch_stats": stats} if stateful else params

    def init(key: PRNGKey) -> Params:
        if factory is None:
            return as_params(params0, stats0)
        _, params, stats, _ = nnx.split(factory(nnx.Rngs(key)), nnx.Param, nnx.BatchStat, ...)
        return as_params(params, stats)

    rng_keys = nnx.state(nnx.merge(graphdef, params0, stats0, rest), nnx.RngKey)
    is_var = lambda v: isinstance(v, nnx.Variable)
    streams = sorted({v.tag for v in jax.tree.leaves(rng_keys, is_leaf=is_var)})

    def run(params, x, key, train, mask=None):
        # Fresh Variable containers: the call may advance RNG counts, never in `rest`.
        copy = lambda tree: jax.tree.map(lambda a: a, tree)
        if stateful:
            _check_state_params(params, ["batch_stats"])
            m = nnx.merge(graphdef, copy(params["params"]), copy(params["batch_stats"]),
                          copy(rest))
        else:
            m = nnx.merge(graphdef, copy(params), copy(stats0), copy(rest))
        if train:
            m.train()
            if key is not None and streams:
                nnx.reseed(m, **{t: jax.random.fold_in(key, i) for i, t in enumerate(streams)})
        else:
            m.eval()
        if mask is not None and takes_mask:
            out = m(x, mask=jnp.asarray(mask) > 0)
        else:
            out = m(x)
        return out, m

    def apply(
        params: Params, x: jax.Array, *, key: PRNGKey | None = None, train: bool = False
    ) -> jax.Array:
        return run(params, x, key, train)[0]

    def train_apply(
        params: Params, x: jax.Array, *, key: PRNGKey | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        out, m = run(params, x, key, True, mask)
        return out, {"batch_stats": nnx.state(m, nnx.BatchStat)}

    return Model(init=init, apply=apply, train_apply=train_apply if stateful else None)


# ------------------------------------------------------------------ data checks

# (id(apply), example shape, dtype) -> (weak reference to apply, number of classes)
_TRACED_CLASSES: dict[tuple, tuple[weakref.ref, int]] = {}


def _traced_num_classes(model: Model, x: Any) -> int:
    """The last logits axis of ``model`` on one example of ``x``: a trace, never a compile."""
    one = np.asarray(x[:1])
    key = (id(model.apply), one.shape, str(one.dtype))
    hit = _TRACED_CLASSES.get(key)
    if hit is not None and hit[0]() is model.apply:
        return hit[1]

    def logits(x1):  # everything inside the trace: abstract values only, nothing runs
        return model.apply(model.init(jax.random.key(0)), x1)

    try:
        out = jax.eval_shape(logits, jax.ShapeDtypeStruct(one.shape, one.dtype))
    except Exception as e:  # the model's own error, re-raised with what was fed to it
        raise ValueError(
            f"examples['x']: the model cannot read one example of shape {one.shape[1:]} "
            f"(dtype {one.dtype}): {type(e).__name__}: {e}"
        ) from e
    n = int(out.shape[-1])
    try:
        ref = weakref.ref(model.apply, lambda _, key=key: _TRACED_CLASSES.pop(key, None))
        _TRACED_CLASSES[key] = (ref, n)
    except TypeError:  # pragma: no cover - apply is not weak-referenceable
        pass
    return n


def _check_model_data(
    model: Model, data: FederatedData, *, pad_id: int | None, needed_by: str
) -> FederatedData:
    data.check_keys(["x", "y"], needed_by=needed_by)
    spec = model.spec if model.spec is not None else ModelSpec()
    x, y = data.examples["x"], data.examples["y"]
    if spec.input_shape is not None:
        data.check_example_shape("x", spec.input_shape)
    if spec.input_vocab is not None:
        from fedjax_lab.data import _validate

        _validate.check_int_values(
            x, spec.input_vocab, name="examples['x']", what="token id", offsets=data.offsets,
            client_names=data.client_names, bound_name="vocab_size",
        )
    if spec.sequence:
        if np.shape(y) != np.shape(x):
            raise ValueError(
                f"examples['y']: the model predicts one label per input position, so y must "
                f"have the shape of x {np.shape(x)}; got {np.shape(y)}."
            )
    elif np.ndim(y) != 1:
        raise ValueError(
            f"examples['y']: need one integer class per example (shape [num_examples]), got "
            f"shape {np.shape(y)}"
            + ("; pass y.argmax(-1) for one-hot labels." if np.ndim(y) == 2 else ".")
        )
    num_classes = spec.num_classes
    if num_classes is None:
        num_classes = _traced_num_classes(model, x)
    data.check_labels(num_classes, "y", ignore=pad_id)
    return data


def check_data(
    model_or_fn: Model | Callable[..., Any], data: FederatedData, *, pad_id: int | None = None
) -> FederatedData:
    """Checks ``data`` against a model, loss or metrics function, on the host, before compiling.

    This is the one call to make before anything is compiled on ``data``. It raises
    ``ValueError`` with the first problem found, naming the client, the value and the fix:

    * a key the loss reads (``"x"``, ``"y"``) is missing (the message lists the keys present);
    * one example of ``x`` does not have the shape the model was built for (the flattened
      shape is accepted, see :meth:`FederatedData.check_example_shape`);
    * token-id inputs (the LSTMs) outside ``[0, vocab_size)``;
    * labels that are not integers in ``[0, num_classes)``: out of range, negative or
      non-integral (:meth:`FederatedData.check_labels`; integral floats such as ``3.0`` and
      bools are accepted, the loss casts them exactly). Labels equal to ``pad_id`` are allowed.

    ``model_or_fn`` may be a :class:`Model`, or a function returned by
    :func:`classification_loss` / :func:`classification_metrics` (they carry a
    ``.check_data(data)`` attribute that knows their model and ``pad_id``). A function without
    that attribute (a hand-written loss), or any object whose ``check_data`` is ``None``,
    declares nothing to check: ``data`` is returned as is.
    For a model without a :class:`ModelSpec` the number of classes is read off one
    ``jax.eval_shape`` trace of ``apply`` (no compile).

    Costs ``O(num_examples)`` once: label and token scans are cached per array object, so a
    second call on the same data costs a lookup.

    Args:
      model_or_fn: a :class:`Model`, or a loss or metrics function built from one.
      data: the dataset to check.
      pad_id: for a :class:`Model`, the label value that marks padding (allowed anywhere).

    Returns:
      ``data`` itself, when it passes.

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> model = fl.models.mlp((8, 8, 1), hidden=(4,), num_classes=10)
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": np.zeros((2, 64), "f4"), "y": np.array([0, 9])},
      ...      {"x": np.zeros((1, 64), "f4"), "y": np.array([99])}])
      >>> try:
      ...     fl.models.check_data(fl.models.classification_loss(model), data)
      ... except ValueError as e:
      ...     print(e)  # doctest: +ELLIPSIS
      examples['y']: client 1 holds the out-of-range label 99 (its example 0; 1 of 3 labels...
    """
    if not isinstance(data, FederatedData):
        raise TypeError(
            f"data: expected a fl.FederatedData, got {type(data).__name__}; build one with "
            "FederatedData.from_client_arrays(...)."
        )
    if isinstance(model_or_fn, Model):
        return _check_model_data(model_or_fn, data, pad_id=pad_id, needed_by="the model")
    hook = getattr(model_or_fn, "check_data", None)
    if hook is None:  # a plain function, or an object whose check_data slot is empty
        if not (callable(model_or_fn) or hasattr(model_or_fn, "check_data")):
            raise TypeError(
                f"model_or_fn: expected a fl.models.Model or a loss/metrics function, got "
                f"{type(model_or_fn).__name__}."
            )
        return data
    return hook(data)


# ------------------------------------------------------------------ losses and metrics


def _weights_and_labels(batch: Batch, logits: jax.Array, pad_id: int | None):
    """Per-position weights (mask, times ``y != pad_id``) and safe integer labels."""
    y = jnp.asarray(batch["y"])
    if "mask" not in batch:
        raise ValueError('batch: missing "mask" (f32[B], 1 = real example, 0 = padding).')
    if logits.shape[:-1] != y.shape:
        raise ValueError(
            f"batch['y']: shape {y.shape} does not match the logits' leading dims "
            f"{logits.shape[:-1]} (logits are [B, ..., num_classes], labels [B, ...])."
        )
    mask = jnp.asarray(batch["mask"], logits.dtype)
    w = mask.reshape(mask.shape + (1,) * (y.ndim - mask.ndim))
    w = jnp.broadcast_to(w, y.shape)
    if pad_id is not None:
        w = w * (y != pad_id).astype(w.dtype)
    y_safe = jnp.where(w > 0, y, 0).astype(jnp.int32)
    return w, y_safe


def classification_loss(model: Model, *, pad_id: int | None = None) -> LossFn:
    """Masked softmax cross-entropy: the engine's ``loss_fn(params, batch, key) -> scalar``.

    ``loss = sum_p w_p * CE(logits_p, y_p) / sum_p w_p`` over positions ``p`` (examples, or
    ``(example, time)`` pairs for sequence logits ``[B, T, V]`` with labels ``[B, T]``), where
    ``w_p = mask[b]`` times ``(y_p != pad_id)`` when ``pad_id`` is given. Padding never
    contributes; its labels may be anything. An all-zero mask gives loss 0 and a zero
    gradient (never NaN). The model runs with ``train=True`` and the given key (dropout).

    Args:
      model: a :class:`Model` whose ``apply`` returns logits ``[B, ..., num_classes]``.
      pad_id: label id that marks padded positions inside real sequences (``None``: none).

    Returns:
      ``loss_fn(params, batch, key) -> f32[]``; ``batch`` holds ``"x"``, ``"y"``, ``"mask"``.
      ``loss_fn.check_data(data)`` checks a :class:`~fedjax_lab.data.FederatedData` against
      the model and ``pad_id`` on the host (see :func:`check_data`); call it before compiling.
      ``loss_fn.model`` and ``loss_fn.pad_id`` are the arguments, for algorithms that need the
      model's logits or features (``fl.algorithms.fed_lc``, ``fl.algorithms.moon``).
      For a stateful model (:attr:`Model.train_apply` set, e.g. BatchNorm) the loss also has
      ``loss_fn.with_state(params, batch, key) -> (loss, new_state)``, the same loss and the
      updated non-trainable collections (batch statistics over the real examples of
      ``batch``), which :func:`fedjax_lab.client.local_training` threads through the local
      steps; ``loss_fn(...)`` itself returns the loss only.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fedjax_lab.models import logistic_regression
      >>> model = logistic_regression((4,), 3)
      >>> loss_fn = classification_loss(model)
      >>> batch = {"x": jnp.ones((2, 4)), "y": jnp.array([0, 2]), "mask": jnp.array([1., 0.])}
      >>> params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0)))
      >>> round(float(loss_fn(params, batch, jax.random.key(1))), 4)  # log(3)
      1.0986
    """

    def mean_ce(logits: jax.Array, batch: Batch) -> jax.Array:
        w, y = _weights_and_labels(batch, logits, pad_id)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        total = jnp.sum(w)
        safe_total = jnp.where(total > 0, total, 1.0)
        return jnp.sum(jnp.where(w > 0, ce * w, 0.0)) / safe_total

    def with_state(params: Params, batch: Batch, key: PRNGKey) -> tuple[jax.Array, Any]:
        if "mask" not in batch:
            raise ValueError('batch: missing "mask" (f32[B], 1 = real example, 0 = padding).')
        logits, new_state = model.train_apply(params, batch["x"], key=key, mask=batch["mask"])
        return mean_ce(logits, batch), new_state

    def loss_fn(params: Params, batch: Batch, key: PRNGKey) -> jax.Array:
        if model.train_apply is not None:
            return with_state(params, batch, key)[0]
        return mean_ce(model.apply(params, batch["x"], key=key, train=True), batch)

    if model.train_apply is not None:
        loss_fn.with_state = with_state
    loss_fn.check_data = functools.partial(
        _check_model_data, model, pad_id=pad_id, needed_by="classification_loss"
    )
    loss_fn.model = model  # read by algorithms that need logits or features (FedLC, MOON)
    loss_fn.pad_id = pad_id
    return loss_fn


def classification_metrics(
    model: Model, *, pad_id: int | None = None
) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    """Masked evaluation SUMS, mergeable across batches and clients by adding them.

    Over real positions ``p`` (weights ``w_p`` as in :func:`classification_loss`):
    ``loss_sum = sum_p w_p CE_p``, ``num_correct = sum_p w_p [argmax logits_p == y_p]``,
    ``num_examples = sum_p w_p`` (real positions for sequence models). Accuracy is
    ``num_correct / num_examples``. The model runs with ``train=False`` (a stateful model
    normalises with its running statistics, :attr:`Model.train_apply`).

    Args:
      model: a :class:`Model` whose ``apply`` returns logits ``[B, ..., num_classes]``.
      pad_id: label id that marks padded positions (``None``: none).

    Returns:
      ``eval_fn(params, batch) -> {"loss_sum", "num_correct", "num_examples"}`` (f32 scalars).
      ``eval_fn.check_data(data)`` checks a dataset against the model (see :func:`check_data`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fedjax_lab.models import logistic_regression
      >>> model = logistic_regression((4,), 3)
      >>> eval_fn = classification_metrics(model)
      >>> batch = {"x": jnp.ones((2, 4)), "y": jnp.array([0, 2]), "mask": jnp.array([1., 0.])}
      >>> m = eval_fn(model.init(jax.random.key(0)), batch)
      >>> float(m["num_examples"])
      1.0
    """

    def eval_fn(params: Params, batch: Batch) -> dict[str, jax.Array]:
        logits = model.apply(params, batch["x"], train=False)
        w, y = _weights_and_labels(batch, logits, pad_id)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(w.dtype)
        return {
            "loss_sum": jnp.sum(jnp.where(w > 0, ce * w, 0.0)),
            "num_correct": jnp.sum(correct * w),
            "num_examples": jnp.sum(w),
        }

    eval_fn.check_data = functools.partial(
        _check_model_data, model, pad_id=pad_id, needed_by="classification_metrics"
    )
    return eval_fn
