"""Host-streamed federated data for :func:`fedjax_lab.run_rounds` (``data_on="host"``).

The population's examples stay in host memory (NumPy arrays, or a ``numpy.memmap`` opened by
:func:`fedjax_lab.data.load_memmap` for data larger than RAM). Every round's cohort is drawn
first, with the same keys and sampler as the device scan (:func:`fedjax_lab._scan.cohorts_on_host`);
then a background thread gathers each cohort's rows on the host (:func:`cohort_rows`) and
transfers them (``jax.device_put``, with the cohort sharding under a sharded client map) while
the previous round runs. At most two cohorts sit on the device (:class:`Prefetcher`), so device
memory does not grow with the population.

Under ``jax.distributed`` (a sharded map over every process's devices) each process gathers
only the rows of the cohort clients its own devices train (:func:`process_positions`), plus
the ``C % D`` clients past the mesh, which every process loads (they run replicated); its
devices receive their blocks and the global array is assembled from the processes' parts
(``jax.make_array_from_single_device_arrays``). With a memory map a process thus reads only
those clients' examples from disk; ``loaded_clients`` records the ids it gathered.

Each round is one jitted program (:func:`fedjax_lab._scan.train_round` with ``streamed=True``,
or the host-state round); each client indexes its own rows with the same shuffled positions
the device path uses on the flat examples, so the batches, and the results, are the same.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_lab import maps as maps_lib
from fedjax_lab._scan import _STATIC, cohorts_on_host, train_round

_PREFETCH = {"on": True}  # off only for the serial baseline of the benchmark (without_prefetch)
last_run: dict[str, float] = {}  # statistics of the latest streamed run (benchmark, tests)
# The client ids this process gathered on the host, one array a round, of the latest streamed
# run (under jax.distributed: only those of its devices' clients, and the tail).
loaded_clients: list[np.ndarray] = []


def cohort_rows(
    examples: dict[str, np.ndarray], offsets: np.ndarray, ids: np.ndarray, width: int
) -> dict[str, np.ndarray]:
    """Host: each cohort client's examples as ``[C, width, ...]`` arrays (zeros past its size).

    Row ``j`` holds client ``ids[j]``'s examples ``offsets[i]:offsets[i + 1]`` from position 0;
    ``width`` is the population's largest client, so every client fits. Reads only those rows
    (a memory map reads them from disk).

    Example:
      >>> import numpy as np
      >>> rows = cohort_rows({"x": np.arange(6.0)}, np.array([0, 4, 6]), np.array([1, 0]), 4)
      >>> rows["x"].tolist()
      [[4.0, 5.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]]
    """
    offsets = np.asarray(offsets, np.int64)
    ids = np.asarray(ids, np.int64)
    starts = offsets[ids]
    sizes = offsets[ids + 1] - starts
    pos = np.arange(width, dtype=np.int64)
    idx = starts[:, None] + np.minimum(pos[None, :], np.maximum(sizes[:, None] - 1, 0))
    pad = pos[None, :] >= sizes[:, None]
    out = {}
    for name, v in examples.items():
        rows = np.asarray(v[idx.reshape(-1)]).reshape(idx.shape + np.shape(v)[1:])
        rows[pad] = 0
        out[name] = rows
    return out


def cohort_placement(client_map: Any, cohort_size: int) -> tuple[int, Any, Any]:
    """Where a cohort's rows go: ``(head, head_sharding, tail_sharding)``.

    Under a sharded map over ``D`` devices the first ``head = D * (C // D)`` clients' rows are
    split over the mesh's ``"clients"`` axis (each device receives only its clients' rows, as the
    map splits them) and the ``C % D`` others, which the map runs outside the mesh, are
    replicated. Otherwise ``head = C`` and both shardings are ``None`` (the default device).
    Under ``jax.distributed`` the mesh spans every process's devices: see
    :func:`process_positions` for the rows each process loads.

    Example:
      >>> import fedjax_lab as fl
      >>> cohort_placement(fl.maps.sequential(), 5)
      (5, None, None)
    """
    replicated = maps_lib.state_sharding(client_map, cohort_size)
    if replicated is None:
        return cohort_size, None, None
    mesh = replicated.mesh
    head = (cohort_size // mesh.size) * mesh.size
    return head, NamedSharding(mesh, PartitionSpec(maps_lib._AXIS)), replicated


def process_positions(
    owners: Sequence[int], head: int, cohort_size: int, process: int
) -> np.ndarray:
    """The cohort positions (``0 .. C - 1``) whose rows process ``process`` loads.

    ``owners[d]`` is the process of the ``d``-th device of the 1-D mesh; the head (the first
    ``head`` positions) is split into ``len(owners)`` equal blocks in mesh order, as
    ``PartitionSpec("clients")`` splits it, so a process loads the blocks of its own devices
    only. The tail (positions ``head .. C - 1``, the clients the sharded map runs outside the
    mesh, replicated) is loaded by every process. Across processes the head positions form a
    partition of ``0 .. head - 1``.

    Example (4 devices, two per process, a cohort of 10: 8 split, 2 outside the mesh):
      >>> process_positions([0, 0, 1, 1], 8, 10, 1).tolist()
      [4, 5, 6, 7, 8, 9]
      >>> process_positions([0, 1, 0, 1], 8, 10, 0).tolist()
      [0, 1, 4, 5, 8, 9]
    """
    owners = np.asarray(list(owners), np.int64)
    if owners.size == 0 or head % owners.size:
        raise ValueError(
            f"head: {head} clients cannot be split evenly over {owners.size} mesh devices."
        )
    block = head // owners.size
    mine = np.repeat(owners == process, block)
    return np.concatenate([np.flatnonzero(mine), np.arange(head, cohort_size)]).astype(np.int64)


def local_positions(placement: tuple[int, Any, Any], cohort_size: int) -> np.ndarray:
    """The cohort positions whose rows THIS process loads under ``placement``.

    Every position in a single process (or without a sharded map); under ``jax.distributed``
    those of :func:`process_positions` for this process's devices of the mesh.

    Example:
      >>> local_positions((5, None, None), 5).tolist()
      [0, 1, 2, 3, 4]
    """
    head, head_sharding, _ = placement
    if head_sharding is None or head_sharding.is_fully_addressable:
        return np.arange(cohort_size, dtype=np.int64)
    owners = [d.process_index for d in head_sharding.mesh.devices.flat]
    return process_positions(owners, head, cohort_size, jax.process_index())


def place_rows(
    rows: dict[str, np.ndarray], placement: tuple[int, Any, Any],
    positions: np.ndarray | None = None,
) -> tuple:
    """Transfers a cohort's host rows to the device(s): ``(head,)`` or ``(head, tail)`` parts.

    ``positions``: the cohort positions ``rows`` holds (:func:`local_positions`; default all
    ``C``). Under ``jax.distributed`` a process holds only its devices' head rows and the
    tail: each of its devices receives its block and the global head array is assembled with
    ``jax.make_array_from_single_device_arrays``, the tail is replicated from every process's
    own copy.
    """
    head, head_sharding, tail_sharding = placement
    n = int(np.shape(next(iter(rows.values())))[0])
    if positions is None or head_sharding is None or head_sharding.is_fully_addressable:
        if positions is not None and not np.array_equal(positions, np.arange(n)):
            raise ValueError("positions: a single process places every row of the cohort.")
        parts = [jax.device_put({k: v[:head] for k, v in rows.items()}, head_sharding)]
        if head < n:
            parts.append(jax.device_put({k: v[head:] for k, v in rows.items()}, tail_sharding))
        return tuple(parts)
    positions = np.asarray(positions, np.int64)
    local_head = int(np.sum(positions < head))
    head_part = {k: _assembled(v[:local_head], positions[:local_head], head, head_sharding)
                 for k, v in rows.items()}  # fmt: skip
    parts = [head_part]
    if local_head < n:
        tail = {k: v[local_head:] for k, v in rows.items()}
        parts.append(jax.device_put(tail, tail_sharding))
    return tuple(parts)


def _assembled(local: np.ndarray, positions: np.ndarray, head: int, sharding: Any) -> jax.Array:
    """The global ``[head, ...]`` array whose addressable blocks are this process's rows."""
    shape = (head,) + tuple(np.shape(local)[1:])
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        want = np.arange(head)[index[0]]
        at = np.searchsorted(positions, want)
        if at.size and (at[-1] >= positions.size or not np.array_equal(positions[at], want)):
            raise RuntimeError(f"place_rows: device {device} needs cohort rows {want.tolist()} "
                               f"this process did not load ({positions.tolist()}).")
        arrays.append(jax.device_put(local[at], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def joined(parts: tuple) -> dict[str, jax.Array]:
    """Traced: the cohort's rows from the parts :func:`place_rows` made."""
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def _nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Loads item ``t`` (host) and places it (device) in a background thread, ahead of use.

    ``load(t)`` builds item ``t`` on the host, ``place(item)`` transfers it; at most ``slots``
    placed items exist at once: the thread waits for a free slot before transferring, and
    :meth:`used` frees the slot of the item before the one just used once the computation that
    read it has finished (blocking on its outputs) and deletes its device buffers. An exception
    in the thread is re-raised by :meth:`get`; leaving the ``with`` block (normally, on an
    exception or on ``KeyboardInterrupt``) stops the thread and joins it.

    Example:
      >>> with Prefetcher(lambda t: np.full(2, t), jax.device_put, 3) as feed:
      ...     got = []
      ...     for t in range(3):
      ...         x = feed.get(t)
      ...         y = x + 1
      ...         feed.used(x, y)
      ...         got.append(y.tolist())
      >>> got
      [[1, 1], [2, 2], [3, 3]]
    """

    def __init__(
        self,
        load: Callable[[int], Any],
        place: Callable[[Any], Any],
        count: int,
        *,
        slots: int = 2,
        background: bool | None = None,
    ):
        self._load, self._place, self._count = load, place, int(count)
        self._background = _PREFETCH["on"] if background is None else bool(background)
        self._queue: queue.Queue = queue.Queue(maxsize=slots)
        self._slots = threading.Semaphore(slots)
        self._stop = threading.Event()
        self._pending: deque = deque()
        self._thread: threading.Thread | None = None
        self.live_bytes = self.peak_bytes = 0
        self.load_s = self.place_s = self.wait_s = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> Prefetcher:
        if self._background:
            self._thread = threading.Thread(target=self._work, name="fedjax_lab-prefetch",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _produce(self, t: int) -> Any:
        start = time.perf_counter()
        item = self._load(t)
        mid = time.perf_counter()
        while not self._slots.acquire(timeout=0.05):
            if self._stop.is_set():
                return None
        slot = time.perf_counter()
        placed = self._place(item)
        jax.block_until_ready(placed)
        end = time.perf_counter()
        with self._lock:
            self.load_s += mid - start
            self.place_s += end - slot
            self.live_bytes += _nbytes(placed)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return placed

    def _work(self) -> None:
        try:
            for t in range(self._count):
                if self._stop.is_set():
                    return
                placed = self._produce(t)
                if placed is None:
                    return
                self._put((t, placed))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by get()
            self._put(_Failure(e))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self, t: int) -> Any:
        """Item ``t`` on the device (waits for the thread; re-raises its exception)."""
        if not self._background:  # serially: after the rounds before it, then gather, place
            jax.block_until_ready([outputs for _, outputs in self._pending])
            return self._produce(t)
        start = time.perf_counter()
        while True:
            try:
                got = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread stopped without an item") from None
        self.wait_s += time.perf_counter() - start
        if isinstance(got, _Failure):
            raise got.error
        index, placed = got
        if index != t:
            raise RuntimeError(f"prefetch: asked for item {t}, the thread made item {index}.")
        return placed

    def used(self, placed: Any, outputs: Any) -> None:
        """``placed`` was read by the computation that returns ``outputs`` (dispatched).

        Frees the previous item once its computation has finished, so the thread can transfer
        the next while this one runs.
        """
        self._pending.append((placed, outputs))
        while len(self._pending) > 1:
            self._free(*self._pending.popleft())

    def _free(self, placed: Any, outputs: Any) -> None:
        jax.block_until_ready(outputs)
        size = _nbytes(placed)
        for x in jax.tree.leaves(placed):
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
        with self._lock:
            self.live_bytes -= size
        self._slots.release()

    def close(self) -> None:
        """Stops the thread (it may be waiting for a slot or the queue) and joins it.

        Also records this run's statistics in ``last_run``: the peak device bytes of placed
        items, and the seconds spent loading, placing and waiting for items.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self._pending:
            placed, outputs = self._pending.popleft()
            try:
                self._free(placed, outputs)
            except Exception:  # noqa: BLE001 - the run's own error (if any) is what matters
                pass
        last_run.clear()
        last_run.update(peak_device_bytes=float(self.peak_bytes), gather_s=self.load_s,
                        transfer_s=self.place_s, wait_s=self.wait_s)


@contextlib.contextmanager
def without_prefetch() -> Iterator[None]:
    """Streamed runs gather and transfer each cohort in the caller's thread, serially.

    Round ``t + 1``'s cohort is gathered and transferred only once round ``t`` has finished:
    the baseline of the overlap measurement in ``experiments/benchmarks/scale.py``.
    """
    _PREFETCH["on"] = False
    try:
        yield
    finally:
        _PREFETCH["on"] = True


def _stream_round_impl(alg, client_map, state, parts, ids, available, offsets, key,
                       eval_batches, **static):
    return train_round(alg, client_map, state, joined(parts), offsets, ids, available, key,
                       eval_batches, streamed=True, **static)


_ROUND_STATIC = ("alg", "client_map") + tuple(
    k for k in _STATIC if k not in ("num_rounds", "cohort_size", "sampler")
)
_stream_round_jit = jax.jit(_stream_round_impl, static_argnames=_ROUND_STATIC)
_stream_round_jit_donated = jax.jit(
    _stream_round_impl, static_argnames=_ROUND_STATIC, donate_argnames=("state",)
)


def opener(examples: dict[str, np.ndarray], offsets: np.ndarray, width: int,
           placement: tuple) -> Callable[[np.ndarray], Prefetcher]:
    """``open(ids_host)``: the :class:`Prefetcher` of every round's cohort rows.

    Each round this process gathers only the rows of :func:`local_positions` (all of them in a
    single process) and records their client ids in ``loaded_clients``.
    """

    def open_(ids_host: np.ndarray) -> Prefetcher:
        positions = local_positions(placement, int(ids_host.shape[1]))
        everything = positions.size == ids_host.shape[1]
        loaded_clients.clear()

        def load(t: int) -> dict[str, np.ndarray]:
            ids = ids_host[t][positions]
            loaded_clients.append(np.array(ids))
            return cohort_rows(examples, offsets, ids, width)

        return Prefetcher(
            load,
            functools.partial(place_rows, placement=placement,
                              positions=None if everything else positions),
            ids_host.shape[0],
        )

    return open_


def run_rounds_streamed(alg, client_map, state, key, arrays, static, donate, stream):
    """The streamed loop with the population's client states (if any) on the device.

    ``stream`` is :func:`opener`'s ``open``: ``stream(ids_host)`` gives the cohorts' feed.
    """
    sampler_state, ids_host, available_host = cohorts_on_host(state, key, arrays, static)
    feed = stream(ids_host)
    round_fn = _stream_round_jit_donated if donate else _stream_round_jit
    kw = {k: static[k] for k in _ROUND_STATIC[2:]}
    core = state._replace(sampler_state=())
    history = []
    with feed:
        for t in range(ids_host.shape[0]):
            parts = feed.get(t)
            core, metrics = round_fn(
                alg, client_map, core, parts, ids_host[t], available_host[t],
                arrays["offsets"], key, arrays["eval_batches"], **kw,
            )
            feed.used(parts, metrics)
            history.append(metrics)
    # Stacked on the host: jnp.stack would compile a program for every num_rounds.
    history = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *jax.device_get(history))
    return core._replace(sampler_state=sampler_state), history
