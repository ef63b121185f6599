"""Readers of the standard federated benchmark files: TFF's h5 files and LEAF's JSON.

Nothing here unpickles: h5py reads plain HDF5 datasets and ``json`` builds only lists, dicts,
strings and numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from fedjax_lab.data import _shakespeare
from fedjax_lab.data._federated import FederatedData

TFF_TASKS = ("emnist", "emnist_digits", "shakespeare", "cifar100")
_INSTALL = "pip install 'fedjax_lab[datasets]'"


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"Reading TFF h5 files needs h5py: {_INSTALL} (or pip install h5py)."
        ) from e
    return h5py


# ------------------------------------------------------------------------------------- TFF h5
_FEATURES = {
    "emnist": ("pixels", "label"),
    "emnist_digits": ("pixels", "label"),
    "shakespeare": ("snippets",),
    "cifar100": ("image", "label", "coarse_label"),
}


def _read(f: Any, path: str, cid: str, feature: str, task: str) -> np.ndarray:
    h5py = _import_h5py()
    key = f"examples/{cid}/{feature}"
    grp = f["examples"][cid]
    if not isinstance(grp, h5py.Group):
        raise ValueError(f"{path}: 'examples/{cid}' is a dataset; expected a group of features.")
    if feature not in grp:
        raise ValueError(
            f"{path}: missing '{key}'; task {task!r} expects the features "
            f"{list(_FEATURES[task])} in every client group, this one holds {sorted(grp.keys())}."
        )
    ds = grp[feature]
    if not isinstance(ds, h5py.Dataset):
        raise ValueError(f"{path}: '{key}' is a group; expected a dataset.")
    return ds[()]


def _check(cond: bool, path: str, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{path}: '{key}' should be {expected}; got {got}.")


def _tff_client(f: Any, path: str, cid: str, task: str, seq_len: int) -> dict[str, np.ndarray]:
    k = f"examples/{cid}"
    if task == "shakespeare":
        snippets = _read(f, path, cid, "snippets", task)
        _check(snippets.ndim == 1, path, f"{k}/snippets", "a 1-D array of byte strings",
               f"shape {snippets.shape}")
        _check(snippets.dtype.kind in "OSU", path, f"{k}/snippets", "byte strings",
               f"dtype {snippets.dtype}")
        x, y = _shakespeare.snippets_to_sequences(list(snippets), seq_len)
        return {"x": x, "y": y}
    if task in ("emnist", "emnist_digits"):
        pixels = _read(f, path, cid, "pixels", task)
        label = _read(f, path, cid, "label", task)
        _check(pixels.ndim == 3 and pixels.shape[1:] == (28, 28), path, f"{k}/pixels",
               "float32 [n, 28, 28]", f"shape {pixels.shape}")
        _check(label.ndim == 1 and len(label) == len(pixels), path, f"{k}/label",
               f"int [n] with n = {len(pixels)} (the rows of 'pixels')", f"shape {label.shape}")
        out = {"x": pixels.astype(np.float32)[..., None], "y": label.astype(np.int32)}
        if task == "emnist_digits":
            keep = out["y"] < 10
            out = {key: v[keep] for key, v in out.items()}
        return out
    # cifar100
    image = _read(f, path, cid, "image", task)
    label = _read(f, path, cid, "label", task)
    coarse = _read(f, path, cid, "coarse_label", task)
    _check(image.ndim == 4 and image.shape[1:] == (32, 32, 3), path, f"{k}/image",
           "uint8 [n, 32, 32, 3]", f"shape {image.shape}")
    for name, arr in (("label", label), ("coarse_label", coarse)):
        _check(arr.ndim == 1 and len(arr) == len(image), path, f"{k}/{name}",
               f"int [n] with n = {len(image)} (the rows of 'image')", f"shape {arr.shape}")
    return {
        "x": image.astype(np.float32) / np.float32(255.0),
        "y": label.astype(np.int32),
        "y_coarse": coarse.astype(np.int32),
    }


def read_tff_h5(path: str | os.PathLike, task: str, seq_len: int) -> FederatedData:
    """See :func:`fedjax_lab.data.datasets.load_tff_h5`."""
    if task not in TFF_TASKS:
        raise ValueError(f"task: unknown TFF task {task!r}; choose one of {list(TFF_TASKS)}.")
    h5py = _import_h5py()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file; give the path of a TFF .h5 file.")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file; expected one of TFF's .h5 dataset files.")
    with h5py.File(path, "r") as f:
        if "examples" not in f or not isinstance(f["examples"], h5py.Group):
            raise ValueError(
                f"{path}: missing the group 'examples'; a TFF h5 file holds "
                "'examples/<client_id>/<feature>'."
            )
        ids = sorted(f["examples"].keys())
        if not ids:
            raise ValueError(f"{path}: the group 'examples' holds no clients.")
        clients, names = [], []
        for cid in ids:
            c = _tff_client(f, path, cid, task, seq_len)
            if len(c["y"]):  # clients left without examples are dropped
                clients.append(c)
                names.append(cid)
    if not clients:
        raise ValueError(f"{path}: no client holds an example for task {task!r}.")
    data = FederatedData.from_client_arrays(clients)
    return data._replace(client_names=tuple(names))


# ------------------------------------------------------------------------------------- LEAF
def _leaf_file(path: pathlib.Path) -> dict[str, tuple[list, list]]:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a LEAF data file.") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top level is {type(obj).__name__}; expected a JSON object.")
    for key in ("users", "num_samples", "user_data"):
        if key not in obj:
            raise ValueError(
                f"{path}: missing key '{key}'; a LEAF file holds 'users', 'num_samples' and "
                "'user_data'."
            )
    users, counts, data = obj["users"], obj["num_samples"], obj["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise ValueError(
            f"{path}: 'users' and 'num_samples' should be lists of the same length; got "
            f"{len(users) if isinstance(users, list) else users!r} users and "
            f"{len(counts) if isinstance(counts, list) else counts!r} counts."
        )
    if not isinstance(data, dict):
        raise ValueError(f"{path}: 'user_data' should be an object mapping user -> data.")
    out = {}
    for user, n in zip(users, counts, strict=True):
        d = data.get(user)
        if not isinstance(d, dict) or "x" not in d or "y" not in d:
            raise ValueError(
                f"{path}: 'user_data[{user!r}]' should exist with keys 'x' and 'y'; got "
                f"{sorted(d) if isinstance(d, dict) else d!r}."
            )
        x, y = d["x"], d["y"]
        if not isinstance(x, list) or not isinstance(y, list) or not len(x) == len(y) == n:
            raise ValueError(
                f"{path}: 'user_data[{user!r}]' should hold num_samples = {n} entries in 'x' "
                f"and 'y'; got {len(x)} and {len(y)}."
            )
        out[str(user)] = (x, y)
    return out


def _leaf_arrays(user: str, files: list[str], x: list, y: list, x_shape: Any) -> dict:
    where = f"{', '.join(files)}: user {user!r}"
    if x and isinstance(x[0], str):  # LEAF Shakespeare: 80-char strings -> next char
        if not all(isinstance(s, str) for s in x) or len({len(s) for s in x}) != 1:
            raise ValueError(f"{where}: 'x' mixes strings of different lengths or types.")
        if not all(isinstance(c, str) and len(c) == 1 for c in y):
            raise ValueError(f"{where}: 'y' should hold single characters, as 'x' holds text.")
        xs = np.stack([_shakespeare.encode(s) for s in x]).astype(np.int32)
        return {"x": xs, "y": _shakespeare.encode("".join(y)).astype(np.int32)}
    try:
        xs = np.asarray(x, dtype=np.float32)
        ys = np.asarray(y)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: 'x' should be numbers of one shape ({e}).") from e
    if ys.dtype.kind not in "iuf" or ys.ndim != 1:
        raise ValueError(f"{where}: 'y' should be one number per example; got {ys.dtype}.")
    if ys.dtype.kind == "f" and np.all(ys == np.round(ys)):
        ys = ys.astype(np.int64)
    ys = ys.astype(np.int32) if ys.dtype.kind in "iu" else ys.astype(np.float32)
    if x_shape is not None and len(xs):
        try:
            xs = xs.reshape((len(xs), *x_shape))
        except ValueError as e:
            raise ValueError(
                f"x_shape: cannot reshape {where} 'x' of shape {xs.shape[1:]} to {x_shape}."
            ) from e
    return {"x": xs, "y": ys}


def read_leaf(directory: str | os.PathLike, x_shape: Any) -> FederatedData:
    """See :func:`fedjax_lab.data.datasets.load_leaf`."""
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise ValueError(f"directory: {str(root)!r} is not a directory of LEAF *.json files.")
    paths = sorted(root.glob("*.json"))
    if not paths:
        raise ValueError(f"directory: {str(root)!r} holds no *.json file.")
    merged: dict[str, tuple[list, list, list[str]]] = {}
    for p in paths:
        for user, (x, y) in _leaf_file(p).items():
            xs, ys, files = merged.setdefault(user, ([], [], []))
            xs.extend(x)
            ys.extend(y)
            files.append(str(p))
    names = sorted(u for u in merged if merged[u][0])
    if not names:
        raise ValueError(f"directory: the files in {str(root)!r} hold no example.")
    clients = [_leaf_arrays(u, merged[u][2], merged[u][0], merged[u][1], x_shape) for u in names]
    kinds = {(c["x"].dtype, c["x"].shape[1:], c["y"].dtype) for c in clients}
    if len(kinds) != 1:
        raise ValueError(
            f"directory: users in {str(root)!r} disagree on the example format "
            f"(dtype, shape of x, dtype of y): {sorted(map(str, kinds))}."
        )
    return FederatedData.from_client_arrays(clients)._replace(client_names=tuple(names))
