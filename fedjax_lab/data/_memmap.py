"""A federated dataset as plain ``.npy`` files, opened as memory maps (no pickle).

For populations larger than RAM, streamed by ``fl.run_rounds(..., data_on="host")``: the
examples are read from disk only as each round's cohort needs them. The directory holds
``offsets.npy``, one ``examples.<name>.npy`` per feature and ``federated.json`` (the feature
names, the number of clients, the client names if any). Everything is read with
``np.load(..., allow_pickle=False)`` and ``json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np

from fedjax_lab.data._federated import FederatedData

_MANIFEST = "federated.json"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def save_memmap(data: FederatedData, directory: str | os.PathLike) -> pathlib.Path:
    """Writes ``data`` to ``directory`` as ``.npy`` files for :func:`load_memmap`.

    Each feature array is written with ``np.save(..., allow_pickle=False)``, one at a time
    (a memory-mapped or JAX array is converted feature by feature). Existing files of the same
    names are overwritten.

    Args:
      data: the dataset.
      directory: where to write (created if missing).

    Returns:
      The directory as a ``pathlib.Path``.

    Example:
      >>> import tempfile, numpy as np, fedjax_lab as fl
      >>> data = fl.data.FederatedData.from_client_arrays(
      ...     [{"x": np.ones((3, 2), "f4"), "y": np.arange(3)}, {"x": np.zeros((1, 2), "f4"),
      ...      "y": np.arange(1)}])
      >>> back = fl.data.load_memmap(fl.data.save_memmap(data, tempfile.mkdtemp()))
      >>> back.client_sizes.tolist(), type(back.examples["x"]).__name__
      ([3, 1], 'memmap')
    """
    if not isinstance(data, FederatedData):
        raise TypeError(f"data: expected a fl.data.FederatedData, got {type(data).__name__}.")
    for name in data.examples:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"data: the feature name {name!r} cannot be a file name; use letters, digits, "
                "'_', '-' and '.' (e.g. rename it to 'x')."
            )
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, v in data.examples.items():
        arr = np.asarray(v)
        if arr.dtype.hasobject:
            raise ValueError(
                f"data: examples[{name!r}] has dtype object, which .npy stores only by pickling; "
                "convert it to a numeric array first."
            )
        np.save(out / f"examples.{name}.npy", arr, allow_pickle=False)
    np.save(out / "offsets.npy", np.asarray(data.offsets, np.int64), allow_pickle=False)
    manifest = {
        "format": "fedjax_lab.memmap/1",
        "features": list(data.examples),
        "num_clients": data.num_clients,
        "client_names": None if data.client_names is None else list(data.client_names),
    }
    (out / _MANIFEST).write_text(json.dumps(manifest))
    return out


def load_memmap(directory: str | os.PathLike) -> FederatedData:
    """Opens a dataset written by :func:`save_memmap`, its examples as read-only memory maps.

    Nothing is read beyond the offsets and the file headers until examples are indexed, so a
    population larger than RAM opens at once; pass it to ``fl.run_rounds(..., data_on="host")``
    to stream each round's cohort from disk.

    Args:
      directory: a directory written by :func:`save_memmap`.

    Returns:
      A :class:`FederatedData` whose examples are ``numpy.memmap`` arrays (``mode="r"``).

    Example:
      >>> import tempfile, numpy as np, fedjax_lab as fl
      >>> d = fl.data.save_memmap(fl.data.FederatedData.from_client_arrays(
      ...     [{"x": np.arange(4.0)}, {"x": np.arange(2.0)}]), tempfile.mkdtemp())
      >>> fl.data.load_memmap(d).client(1)["x"].tolist()
      [0.0, 1.0]
    """
    root = pathlib.Path(directory)
    path = root / _MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"directory: {root} holds no {_MANIFEST}; write the dataset with "
            "fl.data.save_memmap(data, directory) first."
        )
    manifest = json.loads(path.read_text())
    features = manifest.get("features")
    if not isinstance(features, list) or not all(
        isinstance(n, str) and _NAME.match(n) for n in features
    ):
        raise ValueError(f"directory: {path} lists no valid feature names ({features!r}).")
    offsets = np.load(root / "offsets.npy", allow_pickle=False)
    examples = {
        n: np.load(root / f"examples.{n}.npy", mmap_mode="r", allow_pickle=False)
        for n in features
    }
    data = FederatedData.from_offsets(examples, offsets, manifest.get("client_names"))
    if data.num_clients != manifest.get("num_clients"):
        raise ValueError(
            f"directory: {path} says {manifest.get('num_clients')} clients, offsets.npy holds "
            f"{data.num_clients}; write the dataset again with fl.data.save_memmap."
        )
    return data
