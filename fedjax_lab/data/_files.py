"""Readers of the standard federated benchmark files: TFF's h5 files and LEAF's JSON.

Nothing here unpickles: h5py reads plain HDF5 datasets and ``json`` builds only lists, dicts,
strings and numbers.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedjax_lab.data import _shakespeare
from fedjax_lab.data._federated import FederatedData

TFF_TASKS = ("emnist", "emnist_digits", "shakespeare", "cifar100", "stackoverflow")
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
    "stackoverflow": ("tokens",),
}


def _child(grp: Any, name: str, path: str, key: str) -> Any:
    """``grp[name]``, refusing anything that could read outside ``path``.

    Only hard links are followed (soft and external links are refused), and a dataset must keep
    its bytes in this file: external raw storage and virtual datasets are refused too.
    """
    h5py = _import_h5py()
    link = grp.get(name, getlink=True)
    if link is None:
        raise KeyError(name)
    if not isinstance(link, h5py.HardLink):
        kind = type(link).__name__
        target = ""
        if isinstance(link, h5py.ExternalLink):
            target = f" to {link.filename!r}:{link.path}"
        elif isinstance(link, h5py.SoftLink):
            target = f" to {link.path}"
        raise ValueError(
            f"{path}: '{key}' is an HDF5 {kind}{target}; only hard links are read, so the "
            "data stays inside this file. Copy the target into the file (e.g. h5py's "
            "Group.copy) and rewrite it with plain groups and datasets."
        )
    obj = grp[name]
    if isinstance(obj, h5py.Dataset):
        if obj.is_virtual:
            raise ValueError(
                f"{path}: '{key}' is a virtual dataset (it maps other files' data); only "
                "datasets stored in this file are read. Rewrite it as a plain dataset."
            )
        if obj.id.get_create_plist().get_external_count() > 0:
            raise ValueError(
                f"{path}: '{key}' keeps its bytes in external raw storage (another file); only "
                "datasets stored in this file are read. Rewrite it as a plain dataset."
            )
    return obj


def _examples(f: Any, path: str) -> Any:
    h5py = _import_h5py()
    if "examples" not in f:
        raise ValueError(
            f"{path}: missing the group 'examples'; a TFF h5 file holds "
            "'examples/<client_id>/<feature>'."
        )
    grp = _child(f, "examples", path, "examples")
    if not isinstance(grp, h5py.Group):
        raise ValueError(
            f"{path}: 'examples' is a dataset; a TFF h5 file holds "
            "'examples/<client_id>/<feature>'."
        )
    return grp


def _read(f: Any, path: str, cid: str, feature: str, task: str) -> np.ndarray:
    h5py = _import_h5py()
    key = f"examples/{cid}/{feature}"
    grp = _child(_examples(f, path), cid, path, f"examples/{cid}")
    if not isinstance(grp, h5py.Group):
        raise ValueError(f"{path}: 'examples/{cid}' is a dataset; expected a group of features.")
    if feature not in grp:
        raise ValueError(
            f"{path}: missing '{key}'; task {task!r} expects the features "
            f"{list(_FEATURES[task])} in every client group, this one holds {sorted(grp.keys())}."
        )
    ds = _child(grp, feature, path, key)
    if not isinstance(ds, h5py.Dataset):
        raise ValueError(f"{path}: '{key}' is a group; expected a dataset.")
    return ds[()]


def _int32(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` as int32, refusing values that int32 cannot hold (they would wrap silently)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise ValueError(f"{where}: expected whole-number labels; got {arr.dtype} values.")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{where}: expected integer labels; got dtype {arr.dtype}.")
    info = np.iinfo(np.int32)
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            bad = (hi if hi > info.max else lo).item()
            raise ValueError(
                f"{where}: the value {bad!r} does not fit int32 (range {info.min}..{info.max}); "
                "labels must be class indices, fix the file."
            )
    return arr.astype(np.int32)


def _float32(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` as float32, refusing finite values that overflow to infinity."""
    arr = np.asarray(arr)
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    if arr.dtype.kind in "iuf" and arr.size:
        overflow = np.isinf(out) & ~np.isinf(arr)
        if overflow.any():
            raise ValueError(
                f"{where}: the value {arr[overflow].flat[0].item()!r} does not fit float32 "
                f"(largest {np.finfo(np.float32).max:.4g}); fix the file."
            )
    return out


def _check(cond: bool, path: str, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{path}: '{key}' should be {expected}; got {got}.")


def _tff_client(
    f: Any, path: str, cid: str, task: str, seq_len: int, words: WordVocab | None = None,
    max_sentences: int | None = None,
) -> dict[str, np.ndarray]:
    k = f"examples/{cid}"
    if task == "stackoverflow":
        tokens = _tokens(f, path, cid)
        if max_sentences is not None:
            tokens = tokens[:max_sentences]
        assert words is not None
        x, y = encode_sentences(tokens, words, seq_len)
        return {"x": x, "y": y}
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
        out = {"x": _float32(pixels, f"{path}: '{k}/pixels'")[..., None],
               "y": _int32(label, f"{path}: '{k}/label'")}
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
        "y": _int32(label, f"{path}: '{k}/label'"),
        "y_coarse": _int32(coarse, f"{path}: '{k}/coarse_label'"),
    }


def _open_tff(path: str | os.PathLike, name: str = "path") -> str:
    h5py = _import_h5py()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {path!r} is not a file; give the path of a TFF .h5 file.")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file; expected one of TFF's .h5 dataset files.")
    return path


def _client_ids(f: Any, path: str) -> list[str]:
    ids = sorted(_examples(f, path).keys())
    if not ids:
        raise ValueError(f"{path}: the group 'examples' holds no clients.")
    return ids


def read_tff_h5(
    path: str | os.PathLike,
    task: str,
    seq_len: int,
    *,
    vocab_size: int = 10000,
    vocab_path: str | os.PathLike | None = None,
    max_sentences: int | None = None,
) -> FederatedData:
    """See :func:`fedjax_lab.data.datasets.load_tff_h5`."""
    if task not in TFF_TASKS:
        raise ValueError(f"task: unknown TFF task {task!r}; choose one of {list(TFF_TASKS)}.")
    h5py = _import_h5py()
    path = _open_tff(path)
    words = None
    if task == "stackoverflow":
        words = word_vocab(path if vocab_path is None else vocab_path, vocab_size)
    with h5py.File(path, "r") as f:
        ids = _client_ids(f, path)
        clients, names = [], []
        for cid in ids:
            c = _tff_client(f, path, cid, task, seq_len, words, max_sentences)
            if len(c["y"]):  # clients left without examples are dropped
                clients.append(c)
                names.append(cid)
    if not clients:
        raise ValueError(f"{path}: no client holds an example for task {task!r}.")
    data = FederatedData.from_client_arrays(clients)
    return data._replace(client_names=tuple(names))


# ------------------------------------------------------------------------ Stack Overflow words
class WordVocab:
    """A word vocabulary in TFF's Stack Overflow layout (``V = vocab_size``, one OOV bucket).

    Ids: ``0`` pad, ``1..V`` the words in order (most frequent first), ``V + 1`` OOV,
    ``V + 2`` BOS, ``V + 3`` EOS; ``size = V + 4`` symbols. The layout follows the requested
    ``vocab_size`` even when the source holds fewer words (those ids are then never used), so
    the model's output size never depends on the file.
    """

    __slots__ = ("words", "vocab_size", "index")

    def __init__(self, words: Sequence[str], vocab_size: int):
        self.words = tuple(words)
        self.vocab_size = int(vocab_size)
        if len(self.words) > self.vocab_size:
            raise ValueError(
                f"words: {len(self.words)} words exceed vocab_size={self.vocab_size}."
            )
        self.index = {w: i + 1 for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("words: the vocabulary lists a word twice.")

    pad_id = 0

    @property
    def oov_id(self) -> int:
        return self.vocab_size + 1

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 2

    @property
    def eos_id(self) -> int:
        return self.vocab_size + 3

    @property
    def size(self) -> int:
        return self.vocab_size + 4

    def __repr__(self) -> str:
        return f"WordVocab({len(self.words)} words, vocab_size={self.vocab_size})"


def _as_text(s: Any) -> str:
    return s.decode("utf-8", errors="replace") if isinstance(s, bytes | np.bytes_) else str(s)


def _tokens(f: Any, path: str, cid: str) -> np.ndarray:
    tokens = _read(f, path, cid, "tokens", "stackoverflow")
    key = f"examples/{cid}/tokens"
    _check(tokens.ndim == 1, path, key, "a 1-D array of byte strings (one sentence each)",
           f"shape {tokens.shape}")
    _check(tokens.dtype.kind in "OSU", path, key, "byte strings (one sentence each)",
           f"dtype {tokens.dtype}")
    return tokens


def encode_sentences(
    sentences: Iterable[Any], vocab: WordVocab, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sentences -> ``(x, y)`` ``int32[n, seq_len]`` exactly as TFF's Stack Overflow NWP task."""
    rows = []
    eos, bos, oov, index = vocab.eos_id, vocab.bos_id, vocab.oov_id, vocab.index
    for s in sentences:
        words = _as_text(s).split()[:seq_len]
        ids = [index.get(w, oov) for w in words]
        if len(ids) < seq_len:
            ids.append(eos)
        rows.append([bos, *ids] + [0] * (seq_len - len(ids)))
    seq = np.asarray(rows, np.int32).reshape(len(rows), seq_len + 1)
    return seq[:, :-1].copy(), seq[:, 1:].copy()


def _count_words(path: str) -> collections.Counter:
    h5py = _import_h5py()
    counts: collections.Counter = collections.Counter()
    with h5py.File(path, "r") as f:
        for cid in _client_ids(f, path):
            for s in _tokens(f, path, cid):
                counts.update(_as_text(s).split())
    return counts


@functools.lru_cache(maxsize=4)
def _h5_vocab(path: str, mtime_ns: int, size: int, vocab_size: int) -> tuple[str, ...]:
    del mtime_ns, size  # cache keys: a rewritten file is counted again
    counts = _count_words(path)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(w for w, _ in ranked[:vocab_size])


def _text_vocab(path: str, vocab_size: int) -> tuple[str, ...]:
    words: list[str] = []
    seen: set[str] = set()
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"vocab_path: cannot read {path!r} ({e}).") from e
    with fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
                raise ValueError(
                    f"{path}:{lineno}: expected 'word' or 'word count' (TFF's "
                    f"stackoverflow.word_count), got {line.rstrip()!r}."
                )
            if fields[0] in seen:
                raise ValueError(f"{path}:{lineno}: the word {fields[0]!r} is listed twice.")
            seen.add(fields[0])
            words.append(fields[0])
            if len(words) == vocab_size:
                break
    if not words:
        raise ValueError(f"vocab_path: {path!r} lists no word.")
    return tuple(words)


def word_vocab(source: str | os.PathLike, vocab_size: int = 10000) -> WordVocab:
    """See :func:`fedjax_lab.data.datasets.stackoverflow_vocab`."""
    if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"vocab_size: must be a positive integer; got {vocab_size!r}.")
    vocab_size = int(vocab_size)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(
            f"vocab_path: {path!r} is not a file; give a word list, TFF's "
            "stackoverflow.word_count or the Stack Overflow train .h5."
        )
    if _import_h5py().is_hdf5(path):
        st = os.stat(path)
        words = _h5_vocab(os.path.abspath(path), st.st_mtime_ns, st.st_size, vocab_size)
        if not words:
            raise ValueError(f"vocab_path: {path!r} holds no word in any 'tokens' dataset.")
    else:
        words = _text_vocab(path, vocab_size)
    return WordVocab(words, vocab_size)


# ------------------------------------------------------------------------------------- LEAF
def _leaf_file(path: pathlib.Path) -> dict[str, tuple[list, list]]:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a LEAF data file.") from e
    except RecursionError:
        raise ValueError(
            f"{path}: JSON nested too deeply to read (Python's recursion limit); a LEAF file "
            "nests 4 levels (user_data -> user -> x -> example). Fix or remove the file."
        ) from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e}).") from e
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
        xs = np.asarray(x, dtype=np.float64)
        ys = np.asarray(y)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{where}: 'x' should be numbers of one shape ({e}).") from e
    xs = _float32(xs, f"{where}: 'x'")
    if ys.dtype.kind == "O" and ys.ndim == 1 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in y
    ):
        big = max(y, key=abs)
        raise ValueError(
            f"{where}: 'y' holds {big!r}, which does not fit int32; labels must be class "
            "indices, fix the file."
        )
    if ys.dtype.kind not in "iuf" or ys.ndim != 1:
        raise ValueError(f"{where}: 'y' should be one number per example; got {ys.dtype}.")
    if ys.dtype.kind in "iu" or (np.all(np.isfinite(ys)) and np.all(ys == np.round(ys))):
        ys = _int32(ys, f"{where}: 'y'")
    else:
        ys = _float32(ys, f"{where}: 'y'")
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
