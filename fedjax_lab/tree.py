"""Pytree helpers that ``optax.tree`` and ``jax.tree`` lack: client-axis reductions and checks.

Everything else (add, sub, scale, norm, where, zeros_like) is used straight from ``optax.tree``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab._types import PyTree

__all__ = [
    "all_finite",
    "clip_by_global_norm",
    "global_norm",
    "nbytes",
    "structure_mismatch",
    "weighted_mean",
]


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Weighted mean over the leading (client) axis of every leaf.

    ``sum_i w_i x_i / sum_i w_i``; when every weight is 0 the result is all zeros (not NaN).

    Args:
      stacked: a pytree whose leaves have a leading client axis ``[C, ...]``.
      weights: ``f32[C]`` non-negative weights.

    Returns:
      A pytree like one client's slice.

    Example:
      >>> import jax.numpy as jnp
      >>> weighted_mean({"w": jnp.array([[1.0], [3.0]])}, jnp.array([1.0, 3.0]))["w"].tolist()
      [2.5]
    """
    weights = jnp.asarray(weights)
    total = jnp.sum(weights)
    safe = jnp.where(total > 0, total, 1.0)

    def mean(x):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.sum(w * x, axis=0) / safe.astype(x.dtype)

    return jax.tree.map(mean, stacked)


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves together (``optax.tree.norm``), 0 for an empty tree."""
    return optax.tree.norm(tree)


def clip_by_global_norm(tree: PyTree, max_norm: float | jax.Array) -> PyTree:
    """Scales ``tree`` so that its global L2 norm is at most ``max_norm``.

    ``x * min(1, max_norm / ||x||)``. A zero tree stays zero; ``max_norm=inf`` leaves it as is;
    ``max_norm=0`` gives zeros.

    Example:
      >>> import jax.numpy as jnp
      >>> clip_by_global_norm({"w": jnp.array([3.0, 4.0])}, 1.0)["w"].tolist()
      [0.6000000238418579, 0.800000011920929]
    """
    norm = global_norm(tree)
    scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree.map(lambda x: x * scale.astype(x.dtype), tree)


def all_finite(tree: PyTree) -> jax.Array:
    """``True`` when every element of every leaf is finite (an empty tree is finite).

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([jnp.nan])}))
      False
    """
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def nbytes(tree: PyTree) -> int:
    """Bytes the leaves of ``tree`` hold: ``sum(size * itemsize)``, 0 for an empty tree.

    Leaves may be JAX or NumPy arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> nbytes({"w": jnp.zeros((10, 3)), "c": np.zeros(4, np.int8)})
      124
    """
    return sum(
        int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def structure_mismatch(expected: PyTree, got: PyTree) -> str | None:
    """Says how two pytrees differ in structure, shapes or dtypes, or ``None`` when they agree.

    Used to reject mismatched inputs with a readable message before anything compiles.
    """
    s1, s2 = jax.tree.structure(expected), jax.tree.structure(got)
    if s1 != s2:
        return f"tree structure {s2} does not match the expected {s1}"
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, a), b in zip(paths, jax.tree.leaves(got), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            name = jax.tree_util.keystr(path)
            return f"leaf {name} has shape {jnp.shape(b)}, expected {jnp.shape(a)}"
    return None
