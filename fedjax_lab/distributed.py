"""Several processes, one program: JAX's multi-controller runtime for federated simulations.

The same script runs on every process (one per host, or one per accelerator). After
:func:`initialize`, ``jax.devices()`` lists every process's devices, :func:`fedjax_lab.maps.sharded`
splits each round's clients over all of them and sums with one ``psum`` across hosts, and the
new server state comes back replicated, readable on every process. There is no RPC layer of
our own: the coordinator only introduces the processes to each other; collectives
are XLA's (NCCL on GPU, ICI/DCN on TPU, Gloo on CPU).

What each process must do (the contract JAX's multi-controller mode relies on):

* call :func:`initialize` before any other JAX call;
* load the same data and build the same model, algorithm and key (same seeds): host values
  passed to a jitted round are taken as replicated, so they must be equal everywhere;
  :func:`check_same_everywhere` verifies it cheaply (a hash per process);
* run the same calls in the same order (every process takes part in every program);
* write files (checkpoints, metrics) from one process only: :func:`is_main_process`.

Example (one process; with ``num_processes > 1`` every process runs the same lines):
  >>> import jax.numpy as jnp, fedjax_lab as fl
  >>> fl.distributed.is_main_process()
  True
  >>> fl.distributed.check_same_everywhere({"x": jnp.arange(3)}, name="data")
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import jax
import numpy as np

from fedjax_lab import maps as maps_lib
from fedjax_lab._types import PyTree

__all__ = ["check_same_everywhere", "initialize", "is_main_process", "replicate"]

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:\-]+\]?:[0-9]{1,5}$")


def _check_whole(name: str, value, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        none = " (or None)" if allow_none else ""
        raise ValueError(f"{name}: need a whole number >= {minimum}{none}, got {value!r}.")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it first, before anything else touches JAX, with the same ``coordinator_address`` and
    ``num_processes`` on every process and ``process_id`` ``0 .. num_processes - 1`` (process
    0 hosts the coordinator at that address). Left as ``None``, they are detected from the
    environment where JAX knows how (Cloud TPU pod slices, Slurm, Open MPI, Kubernetes; the
    address also from ``JAX_COORDINATOR_ADDRESS``). Under Slurm and Open MPI on GPUs JAX then
    gives each process one GPU (its local rank): launch one process per GPU. On CPU the
    cross-process collectives need an implementation: Gloo is set here when none is configured
    (jax 0.10.2 defaults to Gloo already). Calling it again in an initialized process does
    nothing.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable from every process.
      num_processes: how many processes take part, ``>= 1``.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: restrict this process to these local accelerators (e.g. one GPU per
        process); default all of them.
      initialization_timeout: seconds to wait for every process to join.

    Raises:
      ValueError: a malformed address or out-of-range process numbers (before connecting).
      RuntimeError: from JAX, when JAX has already run something in this process.

    Example (two processes on one machine, each runs its own line)::

      fl.distributed.initialize("localhost:12345", num_processes=2, process_id=0)
      fl.distributed.initialize("localhost:12345", num_processes=2, process_id=1)
    """
    if coordinator_address is not None and (
        not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address)
    ):
        raise ValueError(
            f"coordinator_address: expected 'host:port' of process 0 (e.g. '10.0.0.1:12345'), "
            f"got {coordinator_address!r}."
        )
    _check_whole("num_processes", num_processes, 1)
    _check_whole("process_id", process_id, 0)
    _check_whole("initialization_timeout", initialization_timeout, 1, allow_none=False)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"process_id: must be in 0 .. num_processes - 1 = {num_processes - 1}, "
            f"got {process_id}."
        )
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=None if num_processes is None else int(num_processes),
            process_id=None if process_id is None else int(process_id),
            local_device_ids=None if local_device_ids is None else list(local_device_ids),
            initialization_timeout=int(initialization_timeout),
        )
    except ValueError as e:
        if None in (coordinator_address, num_processes, process_id):
            raise ValueError(
                f"{e} No cluster JAX can read (Cloud TPU, Slurm, Open MPI, Kubernetes) was "
                "detected: give coordinator_address, num_processes and process_id."
            ) from e
        raise


def is_main_process() -> bool:
    """Whether this is process 0: the one that writes checkpoints, metrics and logs.

    Example:
      >>> import fedjax_lab as fl
      >>> fl.distributed.is_main_process()  # a single process is process 0
      True
    """
    return jax.process_index() == 0


def _fingerprint(tree: PyTree) -> np.ndarray:
    """SHA-256 of every leaf's shape, dtype and bytes, as ``uint32[8]``."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree.flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes() if a.dtype != object else repr(a).encode())
    return np.frombuffer(h.digest(), dtype=np.uint32).copy()


def check_same_everywhere(tree: PyTree, *, name: str = "tree") -> None:
    """Raises unless every process holds exactly the same host values ``tree``.

    JAX's multi-controller mode takes host values passed to a jitted program as replicated and
    cannot tell when processes disagree (a different seed, a different file): the run would
    silently mix them. This compares a SHA-256 of the leaves (shapes, dtypes, bytes) across
    processes: one tiny all-gather, whatever the size of ``tree``. One process: nothing to
    compare. Every process must call it (it is a collective).

    Args:
      tree: host values (NumPy arrays, fully addressable JAX arrays, a
        :class:`~fedjax_lab.FederatedData`, ...).
      name: what ``tree`` is, for the error message.

    Raises:
      ValueError: naming ``name`` and the processes that differ from process 0.

    Example:
      >>> import numpy as np, fedjax_lab as fl
      >>> fl.distributed.check_same_everywhere(np.ones(3), name="train_data")
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = np.asarray(multihost_utils.process_allgather(_fingerprint(tree)))
    differ = [i for i in range(digests.shape[0]) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise ValueError(
            f"{name}: processes {differ} hold different values than process 0; every process "
            "must load the same data and use the same seeds (multi-controller JAX takes host "
            "values as replicated)."
        )


def replicate(tree: PyTree, devices: Sequence | None = None) -> PyTree:
    """Places ``tree`` replicated on every device (of every process), as a sharded round returns it.

    A round under :func:`fedjax_lab.maps.sharded` returns the server state replicated over the
    mesh of ``devices``. Placing the initial state that way too makes the first call of
    :func:`fedjax_lab.run_rounds` see the same input layout as every later one, so the program
    compiles once instead of twice (a fresh ``alg.init`` state is on one device only). Across
    processes every process must pass the same values (checked by JAX only in debug mode).

    Args:
      tree: host or device values (e.g. the state from ``alg.init(params)``).
      devices: the mesh devices; default ``jax.devices()``, like ``sharded()``.

    Returns:
      ``tree`` with every leaf a ``jax.Array`` replicated on ``devices``.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> x = fl.distributed.replicate({"w": jnp.ones(2)})["w"]
      >>> x.sharding.is_fully_replicated, len(x.sharding.device_set) == jax.device_count()
      (True, True)
    """
    devs = jax.devices() if devices is None else list(devices)
    return jax.device_put(tree, maps_lib._replicated(devs))
