"""Low-rank adapters (LoRA, Hu et al. 2021) on the 2-D weights of any params pytree.

A targeted kernel ``W`` (``[d_in, d_out]``, used as ``y = x @ W`` by Flax's ``Dense``) gets two
factors ``A`` (``[d_in, r]``) and ``B`` (``[r, d_out]``) and the model runs with

    ``W' = W + (alpha / r) · A @ B``.

``A`` starts ``N(0, 1/d_in)``, ``B`` at zeros, so ``W' = W`` until ``B`` moves (the paper's
convention, written for ``x @ W``: the factor that touches the input is random, the other is
zero). ``alpha = None`` means ``alpha = r`` (scale 1; the paper sets ``alpha`` to the first
``r`` tried and does not tune it). Which kernels are targeted is a regular expression searched
in each leaf's path (``jax.tree_util.keystr``, e.g. ``"['block_0']['attention']['query']
['kernel']"``, the convention of :func:`fedjax_lab.server.per_layer`); only 2-D floating-point
leaves qualify, and ``target=None`` takes every one of them. The adapters are a tuple of
``{"a": A, "b": B}``, one per targeted leaf, in the params' flatten order.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lab._types import Params, PRNGKey, PyTree
from fedjax_lab.data import _validate
from fedjax_lab.models._core import Model

__all__ = ["lora_init", "lora_mask", "lora_merge", "lora_model", "lora_scale"]


def _regex(target: str | None) -> re.Pattern | None:
    if target is None:
        return None
    if not isinstance(target, str):
        raise TypeError(
            f"target: expected a regular expression over leaf paths (a str, e.g. 'attention') "
            f"or None (every 2-D weight), got {type(target).__name__}."
        )
    try:
        return re.compile(target)
    except re.error as e:
        raise ValueError(f"target: {target!r} is not a regular expression ({e}).") from e


def _check_rank(rank: Any) -> int:
    try:
        return _validate.check_count(rank, "rank")
    except ValueError:
        raise ValueError(
            f"rank: the adapters' rank r (A is d_in x r, B is r x d_out) must be a whole "
            f"number >= 1, got {rank!r}; use e.g. rank=4."
        ) from None


def lora_scale(rank: int, alpha: float | None = None) -> float:
    """The factor ``s = alpha / r`` of ``W + s · A @ B`` (``alpha=None``: ``alpha = r``, s = 1).

    Example:
      >>> lora_scale(4, 8.0), lora_scale(4)
      (2.0, 1.0)
    """
    rank = _check_rank(rank)
    if alpha is None:
        return 1.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
        math.isfinite(alpha) and alpha > 0
    ):
        raise ValueError(
            f"alpha: the LoRA scale numerator (s = alpha / rank) must be a finite number > 0, "
            f"got {alpha!r}; use e.g. alpha=2 * rank, or None for alpha = rank."
        )
    return float(alpha) / rank


def lora_mask(params: Params, target: str | None = None) -> PyTree:
    """Which leaves of ``params`` get an adapter: a pytree of bools shaped like ``params``.

    A leaf is targeted when it is a 2-D floating-point array and ``target`` (a regular
    expression) is found in its path ``jax.tree_util.keystr(path)``; ``target=None`` takes every
    2-D floating-point leaf (Dense kernels, and embedding tables).

    Raises:
      ValueError: when no leaf is targeted, listing the 2-D leaves there are.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"attn": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
      ...      "head": {"kernel": jnp.ones((4, 2))}}
      >>> lora_mask(p, "attn")
      {'attn': {'bias': False, 'kernel': True}, 'head': {'kernel': False}}
    """
    regex = _regex(target)

    def pick(path, leaf) -> bool:
        if jnp.ndim(leaf) != 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return False
        return regex is None or regex.search(jax.tree_util.keystr(path)) is not None

    mask = jax.tree_util.tree_map_with_path(pick, params)
    if not any(jax.tree.leaves(mask)):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        weights = [jax.tree_util.keystr(p) for p, x in flat if jnp.ndim(x) == 2]
        shown = ", ".join(weights[:8]) + (", ..." if len(weights) > 8 else "")
        raise ValueError(
            f"target: {target!r} matches no 2-D weight of the params (their 2-D leaves: "
            f"{shown or 'none'}); give a regular expression found in one of those paths, e.g. "
            "'attention' or 'kernel', or target=None for all of them."
        )
    return mask


def _targets(params: Params, mask: PyTree) -> list[jax.Array]:
    return [x for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m]


def lora_init(
    params: Params, key: PRNGKey, *, rank: int, target: str | None = None
) -> tuple[dict[str, jax.Array], ...]:
    """Fresh adapters for the targeted kernels: ``A ~ N(0, 1/d_in)`` ``[d_in, r]``, ``B = 0``.

    Args:
      params: the (frozen) base params.
      key: PRNG key of the ``A`` factors (one ``fold_in`` per targeted leaf).
      rank: ``r >= 1``. A rank at or above ``min(d_in, d_out)`` is allowed but no longer
        low-rank (it sends at least as many numbers as the kernel itself).
      target: regular expression over leaf paths (see :func:`lora_mask`); ``None``: every 2-D
        weight.

    Returns:
      A tuple of ``{"a": A, "b": B}``, one per targeted leaf in flatten order, in its dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lora_init({"w": jnp.ones((5, 3))}, jax.random.key(0), rank=2)
      >>> ad[0]["a"].shape, ad[0]["b"].shape, float(jnp.abs(ad[0]["b"]).sum())
      ((5, 2), (2, 3), 0.0)
    """
    rank = _check_rank(rank)
    out = []
    for i, w in enumerate(_targets(params, lora_mask(params, target))):
        d_in, d_out = jnp.shape(w)
        dtype = jnp.result_type(w)
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), dtype) / math.sqrt(d_in)
        out.append({"a": a, "b": jnp.zeros((rank, d_out), dtype)})
    return tuple(out)


def lora_merge(
    params: Params,
    adapters: tuple[dict[str, jax.Array], ...],
    *,
    rank: int,
    alpha: float | None = None,
    target: str | None = None,
) -> Params:
    """``params`` with every targeted kernel ``W`` replaced by ``W + (alpha / r) · A @ B``.

    Differentiable in ``adapters`` (and ``params``); the other leaves pass through unchanged.
    ``rank`` and ``target`` must be those the adapters were made with (:func:`lora_init`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> ad = ({"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))},)
      >>> lora_merge(p, ad, rank=1, alpha=0.5)["w"].tolist()
      [[0.5, 0.5], [0.5, 0.5]]
    """
    s = lora_scale(rank, alpha)
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(lora_mask(params, target))
    if not isinstance(adapters, (tuple, list)) or len(adapters) != sum(flags):
        got = len(adapters) if isinstance(adapters, (tuple, list)) else type(adapters).__name__
        raise ValueError(
            f"adapters: target {target!r} selects {sum(flags)} kernels of these params, but "
            f"got {got} adapters; make them with lora_init(params, key, rank=..., target=...) "
            "with the same target."
        )
    it = iter(adapters)

    def merged(w: jax.Array) -> jax.Array:
        ad = next(it)
        return w + (s * (ad["a"] @ ad["b"])).astype(w.dtype)

    out = [merged(x) if m else x for x, m in zip(leaves, flags, strict=True)]
    return jax.tree.unflatten(treedef, out)


def lora_model(
    model: Model,
    *,
    rank: int,
    alpha: float | None = None,
    target: str | None = None,
    base_params: Params | None = None,
) -> Model:
    """``model`` with low-rank adapters: its params are ``{"base": ..., "lora": adapters}``.

    ``apply(params, x, ...) = model.apply(lora_merge(params["base"], params["lora"]), x, ...)``.
    ``init(key)`` builds the base with ``model.init`` (or takes ``base_params``, e.g. a
    pretrained model) and fresh adapters (:func:`lora_init`, ``B = 0``), so the initial output
    is the base model's. To train only the adapters, differentiate with respect to
    ``params["lora"]`` (the federated version is :func:`fedjax_lab.algorithms.fed_lora`).

    Args:
      model: the base :class:`Model`.
      rank: adapter rank ``r >= 1``.
      alpha: scale numerator (``s = alpha / r``; ``None``: ``alpha = r``).
      target: regular expression over leaf paths (see :func:`lora_mask`).
      base_params: fixed base params for ``init`` (checked against ``target`` here).

    Returns:
      A :class:`Model` (same ``spec``; no ``features``/``train_apply``: the base's statistics,
      if any, are frozen with it).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fedjax_lab.models import mlp
      >>> base = mlp((4,), hidden=(8,), num_classes=3)
      >>> lora = lora_model(base, rank=2, target="Dense_0")
      >>> params = lora.init(jax.random.key(0))
      >>> [ad["a"].shape for ad in params["lora"]]
      [(4, 2)]
      >>> x = jnp.ones((2, 4))
      >>> bool(jnp.all(lora.apply(params, x) == base.apply(params["base"], x)))
      True
    """
    if not isinstance(model, Model):
        raise TypeError(f"model: expected a fl.models.Model, got {type(model).__name__}.")
    lora_scale(rank, alpha)  # checks rank and alpha
    _regex(target)
    if base_params is not None:
        lora_mask(base_params, target)

    def init(key: PRNGKey) -> Params:
        k_base, k_lora = jax.random.split(key)
        base = model.init(k_base) if base_params is None else base_params
        return {"base": base, "lora": lora_init(base, k_lora, rank=rank, target=target)}

    def apply(params: Params, x: jax.Array, **kwargs: Any) -> jax.Array:
        merged = lora_merge(params["base"], params["lora"], rank=rank, alpha=alpha,
                            target=target)
        return model.apply(merged, x, **kwargs)

    return Model(init=init, apply=apply, spec=model.spec)
