"""Client maps: turn ONE client function into a cohort, reducing as they go.

A :class:`~fedjax_lab.ClientMap` has ``apply(fn, shared, xs) -> (summed, stacked)``:
``fn(shared, x) -> (to_sum, to_stack)`` runs for every client slice ``x`` of ``xs`` (leading
axis ``C``); ``to_sum`` is added over the cohort and ``to_stack`` comes back ``[C, ...]``. All
maps give the same result up to float summation order:

================  ==============================================================================
``vmap()``        every client at once (batched matmuls): the fast path on GPU/TPU.
``sequential()``  a ``lax.scan`` over clients with a running sum: one client's memory; the fast
                  path on CPU.
``chunked(n)``    a scan over chunks of ``n`` vmapped clients, running sum: memory bounded by
                  ``n`` clients whatever the cohort.
``sharded(m)``    ``shard_map`` over a 1-D mesh of all devices (every process's, under
                  ``jax.distributed``), map ``m`` on each device, ``psum`` of the sums.
``auto()``        picks one of the above per backend, device count, cohort and model size, from
                  measurements on GPU/TPU when given (see :func:`choose`).
================  ==============================================================================

Factories are cached, so ``chunked(8) is chunked(8)`` and a jitted round is not recompiled for
an equal map.

Several processes (``fl.distributed.initialize``, one program on every host): the mesh
of ``sharded`` spans every process's devices, host inputs (NumPy or single-device arrays) must
hold the same values on every process and are taken as replicated, and every output of the map
is replicated, so each process can read it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lab._types import ClientMap, PyTree

__all__ = [
    "ClientMap",
    "auto",
    "choose",
    "chunked",
    "resolve",
    "sequential",
    "sharded",
    "state_sharding",
    "use_measurements",
    "vmap",
]

_AXIS = "clients"


def _cohort_size(xs: PyTree) -> int:
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("xs: the per-client inputs are empty; need at least one array.")
    return int(leaves[0].shape[0])


def _sum0(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), tree)


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _with_tail(head, tail):
    """Combines the ``(summed, stacked)`` of a cohort's head with those of its tail."""
    if head is None:
        return tail
    summed = _add(head[0], tail[0])
    stacked = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head[1], tail[1])
    return summed, stacked


def _zeros_varying_like(shapes: PyTree, xs: PyTree) -> PyTree:
    """Zeros of ``shapes`` that vary over the same mesh axes as the data ``xs``.

    Inside ``shard_map`` the per-client data is device-varying; a running sum started from
    plain zeros would be device-invariant and no longer type-match the loop carry. Casting the
    zeros to the data's varying axes keeps ``check_vma`` on.
    """
    aval = jax.typeof(jax.tree.leaves(xs)[0])
    if hasattr(aval, "vma"):
        axes = tuple(aval.vma)
    else:  # jax >= 0.10 names it manual_axis_type.varying
        axes = tuple(getattr(getattr(aval, "manual_axis_type", None), "varying", ()))

    def zeros(sd):
        z = jnp.zeros(sd.shape, sd.dtype)
        return jax.lax.pcast(z, axes, to="varying") if axes else z

    return jax.tree.map(zeros, shapes)


@functools.cache
def vmap() -> ClientMap:
    """All clients at once with ``jax.vmap``; sums with one reduction.

    Memory grows with the cohort (every client's activations and params at once). On GPU/TPU
    the fast path; on XLA:CPU diverging per-client params turn matmuls into batched matmuls,
    measured ~1.6x slower than :func:`sequential` for an MLP (2-core CPU, jax 0.10.2).

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda shared, x: (x * shared, x)
      >>> s, t = vmap().apply(fn, 2.0, jnp.arange(4.0))
      >>> float(s), t.tolist()
      (12.0, [0.0, 1.0, 2.0, 3.0])
    """

    def apply(fn: Callable, shared: PyTree, xs: PyTree) -> tuple[PyTree, PyTree]:
        summed, stacked = jax.vmap(fn, in_axes=(None, 0))(shared, xs)
        return _sum0(summed), stacked

    return ClientMap(apply, "vmap()")


@functools.cache
def sequential() -> ClientMap:
    """One client after another in a ``lax.scan`` with a running sum (a ``lax.map`` that reduces).

    Memory is one client's; on XLA:CPU it is the fast path for dense models.

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda shared, x: (x * shared, x)
      >>> s, t = sequential().apply(fn, 2.0, jnp.arange(4.0))
      >>> float(s), t.tolist()
      (12.0, [0.0, 1.0, 2.0, 3.0])
    """

    def apply(fn: Callable, shared: PyTree, xs: PyTree) -> tuple[PyTree, PyTree]:
        x0 = jax.tree.map(lambda a: a[0], xs)
        sum_shapes = jax.eval_shape(fn, shared, x0)[0]

        def body(acc, x):
            to_sum, to_stack = fn(shared, x)
            return _add(acc, to_sum), to_stack

        return jax.lax.scan(body, _zeros_varying_like(sum_shapes, xs), xs)

    return ClientMap(apply, "sequential()")


@functools.cache
def chunked(size: int) -> ClientMap:
    """A ``lax.scan`` over chunks of ``size`` vmapped clients, summing as it goes.

    Peak memory is that of ``size`` clients whatever the cohort: the cohort's sum is a running
    sum. A cohort not divisible by ``size`` runs its last ``C % size`` clients as one more vmapped
    chunk. ``chunked(1)`` behaves like :func:`sequential`, ``chunked(C)`` like :func:`vmap`.

    Args:
      size: clients per chunk, ``>= 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda shared, x: (x * shared, x)
      >>> s, t = chunked(3).apply(fn, 2.0, jnp.arange(5.0))
      >>> float(s), t.tolist()
      (20.0, [0.0, 1.0, 2.0, 3.0, 4.0])
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: chunked(size) needs a whole number of clients >= 1, got {size!r}.")
    size = int(size)
    inner = vmap()

    def apply(fn: Callable, shared: PyTree, xs: PyTree) -> tuple[PyTree, PyTree]:
        c = _cohort_size(xs)
        n_chunks, rest = divmod(c, size)
        head = jax.tree.map(lambda a: a[: n_chunks * size], xs)
        tail = jax.tree.map(lambda a: a[n_chunks * size :], xs)
        summed, stacked = None, None
        if n_chunks:
            chunks = jax.tree.map(lambda a: a.reshape((n_chunks, size) + a.shape[1:]), head)
            c0 = jax.tree.map(lambda a: a[0], chunks)
            sum_shapes = jax.eval_shape(lambda sh, x: inner.apply(fn, sh, x), shared, c0)[0]

            def body(acc, chunk):
                to_sum, to_stack = inner.apply(fn, shared, chunk)
                return _add(acc, to_sum), to_stack

            summed, stacked = jax.lax.scan(body, _zeros_varying_like(sum_shapes, xs), chunks)
            stacked = jax.tree.map(lambda a: a.reshape((n_chunks * size,) + a.shape[2:]), stacked)
        head_out = None if summed is None else (summed, stacked)
        return _with_tail(head_out, inner.apply(fn, shared, tail)) if rest else head_out

    return ClientMap(apply, f"chunked({size})")


@functools.cache
def _sharded(inner: ClientMap, devices: tuple | None) -> ClientMap:
    def apply(fn: Callable, shared: PyTree, xs: PyTree) -> tuple[PyTree, PyTree]:
        # jax.devices() is every process's devices (the local ones in a single process).
        devs = list(devices) if devices is not None else jax.devices()
        n_dev = len(devs)
        c = _cohort_size(xs)
        if n_dev == 1:
            return inner.apply(fn, shared, xs)
        main = (c // n_dev) * n_dev
        mesh = Mesh(np.array(devs), (_AXIS,))

        def per_device(shared, xs_local):
            # The server state arrives replicated; every device trains its own clients from
            # it, and the sums are combined by the one psum below.
            to_sum, to_stack = inner.apply(fn, shared, xs_local)
            return jax.lax.psum(to_sum, _AXIS), to_stack

        summed, stacked = None, None
        if main:
            head = jax.tree.map(lambda a: a[:main], xs)
            summed, stacked = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(PartitionSpec(), PartitionSpec(_AXIS)),
                out_specs=(PartitionSpec(), PartitionSpec(_AXIS)),
                # Client code is arbitrary user code: a model whose scan starts from a constant
                # carry (flax's nn.RNN, any hand-written recurrence) would fail shard_map's
                # varying-axes type check once its inputs vary per device. The client function
                # runs per device as written and the sums meet in one explicit psum, so the
                # check buys nothing here.
                check_vma=False,
            )(shared, head)
            if any(d.process_index != jax.process_index() for d in devs):
                # Across processes a clients-sharded output would be readable only in parts on
                # each process; replicate it (the engine gathers it anyway: robust aggregators,
                # per-client state tables).
                stacked = jax.lax.with_sharding_constraint(stacked, _replicated(devs))
        head_out = None if summed is None else (summed, stacked)
        if main < c:
            tail = jax.tree.map(lambda a: a[main:], xs)
            return _with_tail(head_out, inner.apply(fn, shared, tail))
        return head_out

    names = "all devices" if devices is None else f"{len(devices)} devices"
    client_map = ClientMap(apply, f"sharded({inner.name}, {names})")
    _SHARDED_DEVICES[client_map] = devices
    return client_map


_SHARDED_DEVICES: dict[ClientMap, tuple | None] = {}  # each sharded map -> its devices


def state_sharding(client_map: ClientMap, cohort_size: int) -> NamedSharding | None:
    """Where a round's server state lives when ``client_map`` runs ``cohort_size`` clients.

    A sharded round returns its server state replicated over the mesh; a state placed there
    before the first round keeps every later round on the same compiled program (a state on
    one device would make round 2 recompile for the new placement). ``None`` for maps that
    run on one device.

    Example:
      >>> state_sharding(sequential(), 10) is None
      True
    """
    if client_map is auto():
        client_map = choose(cohort_size)
    if client_map not in _SHARDED_DEVICES:
        return None
    devices = _SHARDED_DEVICES[client_map]
    devs = list(devices) if devices is not None else jax.devices()
    if len(devs) < 2 or cohort_size < len(devs):
        return None
    return _replicated(devs)


def _replicated(devices: Sequence) -> NamedSharding:
    """Every value whole on each of ``devices`` (the mesh ``sharded`` builds over them)."""
    return NamedSharding(Mesh(np.array(list(devices)), (_AXIS,)), PartitionSpec())


def sharded(inner: ClientMap | None = None, devices: Sequence | None = None) -> ClientMap:
    """Clients split across devices with ``shard_map``; each device runs ``inner``; ``psum``.

    The cohort's first ``D * (C // D)`` clients are split evenly over the ``D`` devices of a
    1-D mesh (axis ``"clients"``); the sums are combined with one ``psum`` and the stacked
    outputs come back sharded over the clients. The remaining ``C % D`` clients (if any) run
    with ``inner`` outside the mesh. On one device it is just ``inner``.

    On a CPU host, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX starts)
    makes N host devices, one per core: measured ~2x throughput on 2 cores.

    Several processes (after :func:`fedjax_lab.distributed.initialize`, the same program on
    every process): the mesh holds every process's devices, in ``jax.devices()`` order, so the
    clients are split across hosts and the ``psum`` crosses them. Host inputs (NumPy or
    single-device arrays) must be the same on every process (same data, same seed); JAX takes
    them as replicated. Every output is replicated, the stacked ones included (gathered over
    the processes), so each process can read the new server state. Two processes of one CPU
    device each give bit-identical results to one process of two devices (tested).

    Args:
      inner: the map each device runs over its clients (default :func:`sequential` on CPU,
        :func:`vmap` elsewhere).
      devices: the devices to use (default ``jax.devices()``, read at trace time: all local
        devices in a single process, every process's devices under ``jax.distributed``).

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda shared, x: (x * shared, x)
      >>> s, t = sharded(sequential()).apply(fn, 2.0, jnp.arange(5.0))
      >>> float(s), t.tolist()
      (20.0, [0.0, 1.0, 2.0, 3.0, 4.0])
    """
    if inner is None:
        inner = sequential() if jax.default_backend() == "cpu" else vmap()
    if not isinstance(inner, ClientMap):
        raise TypeError(
            f"inner: expected a ClientMap such as fl.maps.sequential(), got {type(inner).__name__}."
        )
    return _sharded(inner, None if devices is None else tuple(devices))


def choose(
    cohort_size: int,
    backend: str | None = None,
    num_devices: int | None = None,
    *,
    num_params: int | None = None,
) -> ClientMap:
    """The map :func:`auto` uses for a cohort of ``cohort_size`` clients, and why.

    * CPU: :func:`sequential` (per-client matmuls stay plain matmuls; ``vmap`` over diverging
      params was measured ~1.6x slower on these machines), wrapped in :func:`sharded` when
      there are several devices (one device per core doubled throughput).
    * GPU/TPU with measurements (:func:`use_measurements`, written by
      ``experiments/benchmarks/gpu.py``): the map measured fastest at the nearest measured
      case, nearest in ``log(cohort_size)`` and, when ``num_params`` is known (``auto()``
      reads it off the params it is given), ``log(num_params)``; rows of this device kind
      are preferred over rows of another.
    * GPU/TPU without measurements: :func:`vmap` (batched matmuls fill the accelerator) up to
      1,024 clients a round, :func:`chunked` of 256 above that so activation memory stays
      bounded.

    Either is wrapped in :func:`sharded` when there are several devices. ``num_devices``
    defaults to ``jax.device_count()``: every process's devices, so several processes of one
    device each are sharded too.

    Example:
      >>> choose(100, backend="cpu", num_devices=1).name
      'sequential()'
      >>> choose(5000, backend="gpu", num_devices=1).name
      'chunked(256)'
    """
    backend = backend or jax.default_backend()
    num_devices = num_devices or jax.device_count()
    if backend == "cpu":
        inner = sequential()
    else:
        inner = _measured(backend, cohort_size, num_params)
        if inner is None:
            inner = vmap() if cohort_size <= 1024 else chunked(256)
    if num_devices > 1 and cohort_size >= num_devices:
        return sharded(inner)
    return inner


# Rows {"backend", "device_kind", "cohort", "num_params", "best"} that choose() reads.
_MEASUREMENTS: list[dict] = []


def use_measurements(source: str | Sequence[dict] | None) -> int:
    """Makes :func:`choose` (and so :func:`auto`) pick maps from measured throughput.

    ``source`` is the JSON file ``experiments/benchmarks/gpu.py`` writes (its ``"auto_table"``
    rows), the rows themselves, or ``None`` to forget every row and go back to the fixed
    rule. Each row is ``{"backend", "device_kind", "cohort", "num_params", "best"}``, where
    ``best`` names the fastest map (``"vmap()"``, ``"sequential()"``, ``"chunked(n)"``).
    The environment variable ``FEDJAX_LAB_MAP_MEASUREMENTS`` (a path) is read the same way
    when this module is imported. A choice is made when a round is traced: call this before
    the first round of a run.

    Returns:
      The number of rows now in use.

    Example:
      >>> rows = [{"backend": "gpu", "device_kind": "any", "cohort": 100,
      ...          "num_params": 1000, "best": "chunked(25)"}]
      >>> use_measurements(rows)
      1
      >>> choose(120, backend="gpu", num_devices=1).name
      'chunked(25)'
      >>> use_measurements(None)
      0
    """
    if source is None:
        _MEASUREMENTS.clear()
        return 0
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        import json

        with open(source) as f:
            loaded = json.load(f)
        rows = loaded.get("auto_table") if isinstance(loaded, dict) else loaded
        if rows is None:
            raise ValueError(
                f"source: {source!s} has no 'auto_table'; pass the JSON file that "
                "experiments/benchmarks/gpu.py writes."
            )
    else:
        rows = list(source)
    checked = []
    for i, row in enumerate(rows):
        missing = {"backend", "cohort", "best"} - set(row)
        if missing:
            raise ValueError(
                f"source: row {i} lacks {sorted(missing)}; each row needs backend, cohort, "
                "best (and optionally device_kind, num_params)."
            )
        _parse_map(row["best"])  # fails early on an unknown name
        checked.append(dict(row))
    _MEASUREMENTS[:] = checked
    return len(_MEASUREMENTS)


def _parse_map(name: str) -> ClientMap:
    import re

    if name in ("vmap", "vmap()"):
        return vmap()
    if name in ("sequential", "sequential()"):
        return sequential()
    m = re.fullmatch(r"chunked\((\d+)\)", name)
    if m:
        return chunked(int(m.group(1)))
    raise ValueError(
        f"best: unknown map {name!r}; expected 'vmap()', 'sequential()' or 'chunked(n)'."
    )


def _measured(backend: str, cohort_size: int, num_params: int | None) -> ClientMap | None:
    rows = [r for r in _MEASUREMENTS if r["backend"] == backend]
    if not rows:
        return None
    try:
        kind = jax.devices(backend)[0].device_kind
    except RuntimeError:  # the backend is not present here: any measured kind will do
        kind = None
    same_kind = [r for r in rows if r.get("device_kind") == kind]
    rows = same_kind or rows

    def distance(row):
        d = abs(np.log(max(row["cohort"], 1)) - np.log(max(cohort_size, 1)))
        if num_params and row.get("num_params"):
            d += abs(np.log(row["num_params"]) - np.log(num_params))
        return d

    best = min(rows, key=distance)
    return _parse_map(best["best"])


def _num_params(shared: PyTree) -> int | None:
    """The model size read off the round's shared input (the server state's params)."""
    first = shared[0] if isinstance(shared, tuple) and shared else shared
    params = getattr(first, "params", None)
    if params is None:
        return None
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


@functools.cache
def auto() -> ClientMap:
    """Chooses the map at trace time from the backend, device count, cohort and model size.

    See :func:`choose` for the rule and the measurements behind it.

    Example:
      >>> import jax.numpy as jnp
      >>> s, _ = auto().apply(lambda shared, x: (x, ()), None, jnp.ones(3))
      >>> float(s)
      3.0
    """

    def apply(fn: Callable, shared: PyTree, xs: PyTree) -> tuple[PyTree, PyTree]:
        chosen = choose(_cohort_size(xs), num_params=_num_params(shared))
        return chosen.apply(fn, shared, xs)

    return ClientMap(apply, "auto()")


def resolve(client_map: ClientMap | None) -> ClientMap:
    """``client_map``, checked; ``None`` becomes :func:`auto`.

    Example:
      >>> resolve(None).name.startswith("auto")
      True
    """
    if client_map is None:
        return auto()
    if not isinstance(client_map, ClientMap):
        raise TypeError(
            f"client_map: expected a fl.ClientMap such as fl.maps.auto(), "
            f"got {type(client_map).__name__}."
        )
    return client_map


if os.environ.get("FEDJAX_LAB_MAP_MEASUREMENTS"):
    use_measurements(os.environ["FEDJAX_LAB_MAP_MEASUREMENTS"])
