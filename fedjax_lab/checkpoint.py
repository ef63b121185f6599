"""Atomic checkpoints and exact resume of a federated run (orbax-checkpoint, no pickle).

A checkpoint step is a directory ``DIR/<step>/`` written by orbax's ``CheckpointManager``:
orbax writes it under a temporary name (``<step>.orbax-checkpoint-tmp-<time>``) and renames it
only once every file is on disk, so a process killed at any point (even ``SIGKILL``) leaves the
previous steps intact and :func:`latest_step` never sees a half-written one.

A step holds two items:

* ``arrays``: the tree's leaves as a flat dict ``{"000000": leaf, ...}`` (tensorstore/zarr in
  an OCDBT store). Typed PRNG keys (``jax.random.key``) are stored as their ``key_data``
  (``uint32``) and re-wrapped on restore, so the caller gets the same typed key back.
* ``manifest``: JSON with every leaf's path, shape, dtype and key implementation, a SHA-256 of
  the stored bytes (:func:`params_sha256`), the caller's JSON ``metadata``, and
  ``manifest_sha256``: a SHA-256 of all the rest of the manifest (canonical JSON), so an edited
  metadata value, leaf entry or array digest is reported as corruption too.

:func:`restore` checks the caller's ``like`` tree against the manifest before reading any array
(``"mismatched checkpoint"`` naming the first differing leaf), and after reading checks the bytes
against the stored digest, so a garbled file is reported as corrupt
(:class:`CorruptCheckpoint`), never silently loaded. The digests detect damage and edits; they
are not a signature (whoever can write the files can also rewrite the digests).
Nothing is unpickled: orbax reads zarr/OCDBT data and JSON.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> from fedjax_lab import checkpoint
  >>> d = tempfile.mkdtemp()
  >>> tree = {"w": jnp.arange(3.0), "round": jnp.int32(4), "key": jax.random.key(0)}
  >>> checkpoint.save(d, 4, tree, metadata={"history": [0.5, 0.25]})
  >>> checkpoint.latest_step(d)
  4
  >>> back, meta, step = checkpoint.restore(d, tree)
  >>> back["w"].tolist(), int(back["round"]), meta["history"], step
  ([0.0, 1.0, 2.0], 4, [0.5, 0.25], 4)
  >>> bool(jnp.all(jax.random.key_data(back["key"]) == jax.random.key_data(tree["key"])))
  True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_lab._types import PyTree

__all__ = ["CorruptCheckpoint", "complete_steps", "latest_step", "params_sha256", "restore",
           "save"]

_ARRAYS, _MANIFEST = "arrays", "manifest"
_FORMAT = "fedjax_lab.checkpoint/1"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class CorruptCheckpoint(ValueError):
    """A checkpoint step that cannot be read back intact; it is left untouched on disk.

    Attributes:
      directory: the checkpoint folder.
      step: the corrupt step.
      reason: one line saying what is wrong (no library internals).
    """

    def __init__(self, directory: Path, step: int, reason: str):
        self.directory, self.step, self.reason = directory, step, reason
        super().__init__(
            f"checkpoint {directory}/{step} is corrupt ({reason}); it was left in place. "
            f"Restore an older step with restore(..., step=...) (complete steps: "
            f"{_complete_steps(directory)})."
        )


def _manifest_sha256(manifest: dict) -> str:
    """SHA-256 of the manifest without its own digest, as canonical JSON (sorted keys)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _directory(directory: str | os.PathLike) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"directory: expected a str or os.PathLike path, got {type(directory).__name__}."
        )
    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"directory: {path} is a file, not a directory; pass the checkpoint folder."
        )
    return path


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _as_array(x: Any, path: str) -> Any:
    """A leaf as a jax.Array / ShapeDtypeStruct; Python and NumPy values via ``jnp.asarray``."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return x
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise TypeError(
            f"leaf {path}: expected an array or a number, got {type(x).__name__}; put "
            "strings and other JSON values in `metadata`."
        ) from e


def _describe(leaf: Any) -> dict[str, Any]:
    """Shape and dtype of a leaf as the manifest writes them (``key<fry>`` for typed keys)."""
    return {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}


def _flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) or "<root>" for p, _ in with_path]
    leaves = [_as_array(x, p) for p, (_, x) in zip(paths, with_path, strict=True)]
    return paths, leaves, treedef


def params_sha256(tree: PyTree) -> str:
    """SHA-256 hex digest of a pytree's leaves, to compare two runs bit for bit.

    The digest covers, for every leaf in tree order, its dtype, its shape and its raw bytes
    (C order), plus the number of leaves; typed PRNG keys contribute their ``key_data``. Leaf
    paths (dict keys, field names) are NOT hashed: two trees with the same leaves in the same
    order hash the same. ``-0.0`` and ``0.0``, or two NaN payloads, hash differently.

    Args:
      tree: a pytree of arrays (jax or NumPy) or numbers.

    Returns:
      A 64-character lowercase hex string.

    Example:
      >>> import jax.numpy as jnp
      >>> a = params_sha256({"w": jnp.zeros(2), "b": jnp.ones(())})
      >>> a == params_sha256({"w": jnp.zeros(2), "b": jnp.ones(())}), len(a)
      (True, 64)
      >>> a == params_sha256({"w": jnp.zeros(2, jnp.int32), "b": jnp.ones(())})
      False
    """
    leaves = jax.tree.leaves(tree)
    leaves = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    h = hashlib.sha256(f"{_FORMAT}|{len(leaves)} leaves;".encode())
    for arr in jax.device_get(leaves):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}|{arr.dtype.name}|{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _this_process() -> ocp.options.MultiprocessingOptions:
    """Orbax options under which this process reads or writes a checkpoint on its own.

    Under ``jax.distributed`` (several processes) orbax would otherwise wait at barriers for
    every process to take part; fedjax_lab writes from process 0 only (every array is fully
    replicated, so process 0 holds it all) and every process reads the same files itself.
    """
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _manager(path: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,  # save() returns only once the step is renamed
        cleanup_tmp_directories=True,  # the writer removes a killed writer's leftovers
        multiprocessing_options=_this_process(),
        create=jax.process_count() == 1,  # several processes: save() creates it first
    )
    return ocp.CheckpointManager(path, options=options, item_names=(_ARRAYS, _MANIFEST))


def _complete_steps(path: Path) -> list[int]:
    if not path.is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(path))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Every COMPLETE step in ``directory``, oldest first (``[]`` when there is none).

    Example:
      >>> import tempfile
      >>> complete_steps(tempfile.mkdtemp())
      []
    """
    return _complete_steps(_directory(directory))


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest COMPLETE step in ``directory``, or ``None`` when there is none.

    Orbax temporary directories (a write in progress or killed mid-way) are ignored. A
    directory that does not exist holds no step (``None``).

    Args:
      directory: the checkpoint folder given to :func:`save`.

    Returns:
      The largest finalised step, or ``None``.

    Example:
      >>> import tempfile
      >>> latest_step(tempfile.mkdtemp()) is None
      True
    """
    steps = _complete_steps(_directory(directory))
    return steps[-1] if steps else None


def save(
    directory: str | os.PathLike,
    step: int,
    tree: PyTree,
    *,
    metadata: dict | None = None,
    keep: int = 3,
) -> None:
    """Atomically writes ``tree`` (and JSON ``metadata``) as checkpoint ``step``.

    The step is written to an orbax temporary directory and renamed to ``directory/<step>``
    only when complete; this function returns after that rename (synchronous). Then only the
    newest ``keep`` steps are kept (older ones are deleted) and leftover temporary directories
    of killed writers are removed. Existing steps are never overwritten.

    Args:
      directory: checkpoint folder (created if missing).
      step: non-negative int, larger than every step already saved in ``directory``.
      tree: a pytree of arrays: ``jax.Array`` (typed PRNG keys included, stored as their key
        data), NumPy arrays or numbers (converted with ``jnp.asarray``). Empty containers
        (``()``, ``{}``, ``None``) are fine; they are rebuilt from ``like`` on restore.
      metadata: a JSON-serialisable dict (config, metrics history as lists, ...).
      keep: how many of the newest steps to keep, ``>= 1``.

    Raises:
      ValueError: bad ``step``/``keep``/``directory``/``metadata``, or ``step`` already
        saved or older than the newest saved step (nothing is written).
      TypeError: a leaf that is not an array or a number.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> for s in (1, 2, 3):
      ...     save(d, s, {"x": jnp.full(2, s)}, keep=2)
      >>> latest_step(d), sorted(p.name for p in __import__("pathlib").Path(d).iterdir())
      (3, ['2', '3'])
    """
    path = _directory(directory)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}.")
    step = int(step)
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1 (steps to keep), got {keep!r}.")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata: expected a JSON-serialisable dict, got {type(metadata)}.")
    try:
        metadata = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"metadata: must be JSON-serialisable ({e}); convert arrays with .tolist() or "
            "put them in the tree."
        ) from e
    steps = _complete_steps(path)
    if step in steps:
        raise ValueError(
            f"step: {step} is already saved in {path}; checkpoints are never overwritten. "
            "Save a new step or use another directory."
        )
    if steps and step < steps[-1]:
        raise ValueError(
            f"step: {step} is older than the newest step {steps[-1]} already saved in {path}; "
            "save a newer step or use another directory."
        )

    paths, leaves, _ = _flatten(tree)
    stored = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
    if jax.process_count() > 1:  # this process alone writes: host copies of replicated arrays
        stored = [np.asarray(x) for x in stored]
    manifest = {
        "format": _FORMAT,
        "leaves": [
            {
                "path": p,
                **_describe(x),
                "key_impl": str(jax.random.key_impl(x)) if _is_key(x) else None,
            }
            for p, x in zip(paths, leaves, strict=True)
        ],
        "sha256": params_sha256(stored),
        "metadata": metadata,
    }
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    # orbax cannot store zero-size arrays; the manifest's shape and dtype rebuild them.
    arrays = {f"{i:06d}": x for i, x in enumerate(stored) if x.size}
    items = {_MANIFEST: ocp.args.JsonSave(manifest)}
    if arrays:
        items[_ARRAYS] = ocp.args.StandardSave(arrays)
    path.mkdir(parents=True, exist_ok=True)
    with _manager(path, keep) as manager:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()


def _check_like(path: Path, step: int, manifest: dict, paths: list[str], like: list) -> None:
    """Raises ``ValueError("mismatched checkpoint ...")`` at the first leaf that differs."""
    saved = manifest["leaves"]
    where = f"{path}/{step}"
    for i, (entry, p, x) in enumerate(zip(saved, paths, like, strict=False)):
        want = _describe(x)
        got = {k: entry[k] for k in ("shape", "dtype")}
        if entry["path"] != p:
            raise ValueError(
                f"mismatched checkpoint {where}: leaf #{i} is {entry['path']} in the checkpoint "
                f"but {p} in `like` (different tree structure)."
            )
        if got != want:
            raise ValueError(
                f"mismatched checkpoint {where}: leaf {p} is {got['dtype']}{tuple(got['shape'])} "
                f"in the checkpoint but {want['dtype']}{tuple(want['shape'])} in `like`."
            )
    if len(saved) != len(paths):
        n = min(len(saved), len(paths))
        extra = (saved[n]["path"] + " (only in the checkpoint)" if len(saved) > n
                 else paths[n] + " (only in `like`)")
        raise ValueError(
            f"mismatched checkpoint {where}: it holds {len(saved)} leaves but `like` has "
            f"{len(paths)}; first unmatched leaf {extra}."
        )


def _root_message(e: BaseException) -> str:
    """The innermost error's message, on one line, without TensorStore's spec dump."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    msg = str(e)
    for noise in ("See full TensorStore details", "[source locations=", " [tensorstore_spec="):
        msg = msg.split(noise)[0]
    msg = " ".join(msg.split()).rstrip(" .;:")
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _corrupt(path: Path, step: int, why: str) -> CorruptCheckpoint:
    why = " ".join(why.split())  # one line; the full error stays chained as __cause__
    why = why if len(why) <= 300 else why[:297] + "..."
    return CorruptCheckpoint(path, step, why)


def restore(
    directory: str | os.PathLike,
    like: PyTree,
    *,
    step: int | None = None,
) -> tuple[PyTree, dict, int]:
    """Reads checkpoint ``step`` (the newest complete one by default) into ``like``'s structure.

    Args:
      directory: the checkpoint folder given to :func:`save`.
      like: a pytree with the expected structure whose leaves are arrays or
        ``jax.ShapeDtypeStruct`` (e.g. the freshly initialised state, or
        ``jax.eval_shape`` of it). Leaf paths, shapes and dtypes must match the checkpoint;
        a ``jax.Array`` leaf's sharding is used for the restored array.
      step: which step to read; ``None`` for the newest complete one.

    Returns:
      ``(tree, metadata, step)``: ``tree`` has ``like``'s structure with ``jax.Array`` leaves
      of the saved dtypes (typed PRNG keys re-wrapped), bit-identical to what was saved.

    Raises:
      ValueError: no checkpoint / no such step; ``"mismatched checkpoint"`` naming the first
        leaf whose path, shape or dtype differs from ``like``.
      CorruptCheckpoint: (a ``ValueError``) ``"... is corrupt"`` when a file of the step is
        truncated or garbled, or the manifest (metadata included) was edited; the step is left
        untouched on disk.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> d = tempfile.mkdtemp()
      >>> save(d, 7, {"x": jnp.arange(2)}, metadata={"note": "hi"})
      >>> restore(d, {"x": jnp.zeros(2, jnp.int32)})
      ({'x': Array([0, 1], dtype=int32)}, {'note': 'hi'}, 7)
      >>> restore(d, {"x": jnp.zeros(3, jnp.int32)})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ValueError: mismatched checkpoint ... is int32(2,) in the checkpoint but int32(3,) in `like`.
    """
    path = _directory(directory)
    steps = _complete_steps(path)
    if not steps:
        raise ValueError(f"directory: {path} holds no complete checkpoint to restore.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step: {step} is not a complete checkpoint in {path}; found {steps}.")

    paths, like_leaves, treedef = _flatten(like)
    step_dir = path / str(step)
    # A bare Checkpointer reads the step directory and writes nothing.
    from orbax.checkpoint._src.handlers.composite_checkpoint_handler import CompositeOptions

    handler = ocp.CompositeCheckpointHandler(
        composite_options=CompositeOptions(multiprocessing_options=_this_process())
    )
    with ocp.Checkpointer(handler, multiprocessing_options=_this_process()) as reader:
        try:
            manifest = reader.restore(
                step_dir, args=ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()})
            )[_MANIFEST]
            if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
                raise ValueError(f"manifest is not a {_FORMAT} manifest")
            saved = manifest["leaves"]
            for entry in saved:  # every field the checks below read
                _ = entry["path"], tuple(entry["shape"]), entry["dtype"], entry["key_impl"]
            _ = str(manifest["sha256"]), dict(manifest["metadata"])
        except Exception as e:  # noqa: BLE001 - any failure to read the manifest is corruption
            raise _corrupt(path, step, f"unreadable manifest: {_root_message(e)}") from e
        if "manifest_sha256" not in manifest:
            raise _corrupt(path, step, "the manifest carries no manifest_sha256 (written by an "
                                       "older fedjax_lab, or edited)")
        if manifest["manifest_sha256"] != _manifest_sha256(manifest):
            raise _corrupt(path, step, "the manifest's SHA-256 differs from the one saved: its "
                                       "metadata, leaf list or array digest was changed")
        _check_like(path, step, manifest, paths, like_leaves)

        default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        wanted = []  # what each stored leaf must be: key data (uint32) for typed keys
        for entry, x in zip(saved, like_leaves, strict=True):
            if entry["key_impl"] is not None:
                shape = jax.eval_shape(jax.random.key_data, x).shape
                wanted.append(jax.ShapeDtypeStruct(shape, jnp.uint32, sharding=default_sharding))
            else:
                sharding = getattr(x, "sharding", None) or default_sharding
                wanted.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))
        abstract = {f"{i:06d}": w for i, w in enumerate(wanted) if w.size}
        try:
            arrays = {}
            if abstract:
                arrays = reader.restore(
                    step_dir,
                    args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(abstract)}),
                )[_ARRAYS]
            stored = [
                arrays[f"{i:06d}"] if w.size else jax.device_put(jnp.zeros(w.shape, w.dtype),
                                                                 w.sharding)
                for i, w in enumerate(wanted)
            ]
        except Exception as e:  # noqa: BLE001 - tensorstore/zarr errors on garbled data
            raise _corrupt(path, step, f"unreadable arrays: {_root_message(e)}") from e

    for arr, want in zip(stored, wanted, strict=True):
        if arr.shape != want.shape or arr.dtype != want.dtype:
            raise _corrupt(path, step, f"an array came back as {arr.dtype}{arr.shape}")
    if params_sha256(stored) != manifest["sha256"]:
        raise _corrupt(path, step, "the arrays' SHA-256 differs from the one saved")

    leaves = [
        jax.random.wrap_key_data(x, impl=entry["key_impl"]) if entry["key_impl"] else x
        for x, entry in zip(stored, saved, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves), manifest["metadata"], step
