"""Host-resident per-client state for :func:`fedjax_lab.run_rounds` (``client_states_on="host"``).

The population's per-client state (``ServerState.client_states``, leaves ``[N, ...]``) stays in
NumPy arrays on the host; only the cohort's rows (``[C, ...]``) travel to the device each round.
Inside the compiled round an algorithm sees the population through :class:`HostResident`
placeholders: their ``shape`` and ``dtype`` (so ``N = leaf.shape[0]`` works, as SCAFFOLD and
FedDyn use it) but no values; reading a value is an error, never a silent zero.

The loop is pipelined with JAX's asynchronous dispatch: while round ``t`` runs on the device,
the host writes back round ``t - 1``'s rows and gathers round ``t + 1``'s. Rows of round
``t + 1``'s clients that round ``t`` is still updating are replaced on the device by round
``t``'s output (:func:`patch_rows`), so every round sees exactly the state the device path
would give it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab._types import PyTree

_HINT = (
    "client_states_on='host': inside the round the population's client_states are shapes "
    "only (HostResident placeholders); this algorithm reads other clients' states, so run it "
    "with client_states_on='device'."
)


class HostResident:
    """Stands for one ``[N, ...]`` leaf of host-resident client states inside the round.

    It has ``shape``, ``dtype``, ``ndim`` and ``size``; converting it to an array or indexing it
    raises a ``ValueError`` (the values live on the host, outside the compiled program).
    """

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        return f"HostResident(shape={self.shape}, dtype={self.dtype})"

    def _refuse(self, *args, **kwargs):
        raise ValueError(_HINT)

    __jax_array__ = __array__ = __getitem__ = _refuse


def population_spec(client_states: PyTree) -> tuple:
    """A hashable description of ``client_states`` (tree structure, each leaf's shape, dtype)."""
    leaves, treedef = jax.tree.flatten(client_states)
    return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype).str) for x in leaves)


def population_view(spec: tuple) -> PyTree:
    """The :class:`HostResident` placeholders of a :func:`population_spec`."""
    treedef, leaves = spec
    return jax.tree.unflatten(treedef, [HostResident(s, d) for s, d in leaves])


def explain(error: Exception) -> ValueError | None:
    """The host-storage error for an exception raised while tracing a host-state round, or None.

    ``None`` when ``error`` did not come from reading a :class:`HostResident` placeholder.
    """
    text = str(error)
    if _HINT in text:
        return None
    if "HostResident" in text or "__jax_array__" in text:
        return ValueError(f"{_HINT} (JAX: {text})")
    return None


def patch_rows(rows: PyTree, ids: jax.Array, prev_ids: jax.Array, prev_rows: PyTree) -> PyTree:
    """Traced: ``rows[j]`` replaced by ``prev_rows[k]`` where ``ids[j] == prev_ids[k]``.

    ``rows`` were gathered on the host before the previous round (``prev_ids``) had written its
    new rows ``prev_rows`` back; this brings the clients of both cohorts up to date (the last
    matching ``k`` wins, as NumPy's scatter does). ``prev_ids`` of ``-1`` match nothing.
    """
    c = prev_ids.shape[0]
    eq = ids[:, None] == prev_ids[None, :]  # [C, C]
    hit = jnp.any(eq, axis=1)
    last = (c - 1) - jnp.argmax(eq[:, ::-1], axis=1)

    def patch(r, p):
        h = hit.reshape((-1,) + (1,) * (r.ndim - 1))
        return jnp.where(h, p[last], r)

    return jax.tree.map(patch, rows, prev_rows)


def to_host(client_states: PyTree) -> tuple[list[np.ndarray], Any]:
    """Copies every leaf into a fresh, writable NumPy array (the caller's arrays stay valid)."""
    leaves, treedef = jax.tree.flatten(client_states)
    return [np.array(x, copy=True) for x in leaves], treedef


def pipelined_rounds(
    store: Sequence[np.ndarray],
    ids: np.ndarray,
    dispatch: Callable[[int, list[np.ndarray], np.ndarray, list[Any]], tuple[list[Any], Any]],
) -> list[Any]:
    """Runs ``len(ids)`` rounds against the host ``store``, one round ahead of the write-back.

    Args:
      store: the population's leaves ``[N, ...]`` (NumPy, updated in place).
      ids: ``int[R, C]`` every round's cohort.
      dispatch: ``dispatch(t, rows, prev_ids, prev_rows) -> (new_rows, metrics)`` launches round
        ``t`` (asynchronously) on the cohort's gathered ``rows``; ``prev_ids``/``prev_rows`` are
        the previous round's cohort and its (possibly not yet computed) new rows.

    Returns:
      The per-round ``metrics`` in order.
    """
    c = ids.shape[1]
    prev_ids = np.full((c,), -1, np.int32)
    prev_rows: list[Any] = [np.zeros((c,) + leaf.shape[1:], leaf.dtype) for leaf in store]
    pending: deque = deque()
    history = []
    for t in range(ids.shape[0]):
        if len(pending) == 2:  # round t - 2 is done (round t - 1 consumed its rows)
            _write_back(store, *pending.popleft())
        rows = [leaf[ids[t]] for leaf in store]  # round t - 1's clients are patched on device
        new_rows, metrics = dispatch(t, rows, prev_ids, prev_rows)
        pending.append((ids[t], new_rows))
        prev_ids, prev_rows = ids[t], new_rows
        history.append(metrics)
    while pending:
        _write_back(store, *pending.popleft())
    return history


def _write_back(store: Sequence[np.ndarray], ids: np.ndarray, rows: Sequence[Any]) -> None:
    for leaf, r in zip(store, rows, strict=True):
        leaf[ids] = np.asarray(r)
