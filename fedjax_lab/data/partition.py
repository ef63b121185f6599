"""Partitioners: split a centralised dataset over simulated clients.

A *partition* is a ``list`` of ``num_clients`` arrays of example indices (``int64``), one per
client, each sorted ascending. Every partitioner here is deterministic given its keyword-only
``seed`` (it draws from ``np.random.default_rng(seed)``), runs on the host in NumPy, and puts
every example in exactly one client (except :func:`shards` with ``drop_remainder=True``, which
leaves out the few examples that do not fill a shard, and :func:`pathological` with fewer
clients than classes, which leaves out the classes no client drew). :func:`feature_noise` is
not a partitioner: it perturbs the inputs of a partition's clients.
:meth:`fedjax_lab.data.FederatedData.from_client_indices` turns a partition into a dataset::

    partition = fl.partition.dirichlet(labels, num_clients=100, alpha=0.3, seed=0)
    data = fl.data.FederatedData.from_client_indices({"x": x, "y": labels}, partition)

| partitioner | skew |
| --- | --- |
| :func:`iid` | none: a random split into equal sizes |
| :func:`dirichlet` | label skew, tuned by ``alpha`` (Hsu et al. 2019; Yurochkin et al. 2019) |
| :func:`shards` | pathological label skew: a few label-sorted shards each (McMahan et al. 2017) |
| :func:`pathological` | exactly ``k`` classes per client (NIID-Bench's ``#C=k``, Li et al. 2022) |
| :func:`inner_dirichlet` | sizes fixed, each client's label mix Dirichlet (Hsu et al. 2019) |
| :func:`quantity_skew` | client sizes log-normal or power-law, labels iid |
| :func:`size_skew` | client sizes growing linearly, quadratically or exponentially, labels iid |
| :func:`feature_noise` | feature skew: client ``i``'s inputs plus noise of std ``sigma i / C`` |
| :func:`by_key` | the natural split by writer / speaker / user id |
| :func:`held_out_clients` | splits a *population* into training and unseen clients |

Bad input raises ``ValueError`` naming the argument and what to change (``TypeError`` only
when :func:`held_out_clients` is not given a ``FederatedData``).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from fedjax_lab.data._federated import FederatedData

__all__ = [
    "by_key",
    "by_key_names",
    "dirichlet",
    "feature_noise",
    "held_out_clients",
    "iid",
    "inner_dirichlet",
    "pathological",
    "quantity_skew",
    "shards",
    "size_skew",
]

Partition = list[np.ndarray]


# --------------------------------------------------------------------------- iid
def iid(num_examples: int, num_clients: int, *, seed: int = 0) -> Partition:
    """Splits ``num_examples`` examples uniformly at random into ``num_clients`` clients.

    Rule: shuffle ``0 .. num_examples - 1`` and cut the permutation into ``num_clients``
    consecutive pieces whose sizes differ by at most one (the first
    ``num_examples % num_clients`` clients hold one example more).

    Args:
      num_examples: number of examples ``N`` (indices ``0 .. N - 1``).
      num_clients: number of clients, ``1 <= num_clients <= num_examples``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays, together a permutation of
      ``arange(num_examples)``.

    Example:
      >>> import fedjax_lab as fl
      >>> part = fl.data.partition.iid(10, 3, seed=0)
      >>> [len(p) for p in part]
      [4, 3, 3]
      >>> sorted(int(i) for p in part for i in p) == list(range(10))
      True
    """
    n = _check_int(num_examples, "num_examples", minimum=1)
    c = _check_num_clients(num_clients, n)
    rng = _rng(seed)
    sizes = np.full(c, n // c, dtype=np.int64)
    sizes[: n % c] += 1
    return _fill_iid(rng, sizes)


# --------------------------------------------------------------------------- dirichlet
def dirichlet(
    labels: Any,
    num_clients: int,
    alpha: float,
    *,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> Partition:
    r"""Label-skewed split: each class is divided over clients in Dirichlet proportions.

    Algorithm (one *try*), for each distinct label ``k`` in ascending order, with ``n_k``
    examples of that label:

    1. draw ``p_k ~ Dir(alpha * 1_C)`` over the ``C = num_clients`` clients;
    2. shuffle the indices of class ``k`` and cut them at the points
       ``round(n_k * (p_k1 + ... + p_kj))`` for ``j = 1 .. C - 1``; client ``j`` gets the
       ``j``-th piece, so it holds ``round(n_k c_j) - round(n_k c_{j-1})`` examples of class
       ``k`` (``c_j = p_k1 + ... + p_kj``, ``c_0 = 0``, ``c_C = 1``; the pieces add up to
       ``n_k``, and rounding, unlike truncation, favours neither the first nor the last client).

    If some client ends with fewer than ``min_size`` examples in total, the whole try is
    re-drawn (continuing the same random stream, so the result stays a function of ``seed``),
    at most ``max_tries`` times; then a ``ValueError`` says what to change.

    Each client's label histogram is therefore close to the global one for large ``alpha``
    (``alpha -> inf`` is a stratified iid split), while small ``alpha`` (say ``<= 0.1``) gives
    each class to one or two clients, so a client holds only a few classes. The class-wise
    draw over clients used here is the common "Dirichlet label skew" of Yurochkin et al. (2019)
    and Li et al. (2022, NIID-Bench); Hsu et al. (2019) instead draw each client's class mix
    ``q ~ Dir(alpha * prior)``. Both send a client's label mix from uniform (large ``alpha``)
    to one class (``alpha -> 0``); this one leaves client sizes random too.

    Args:
      labels: 1-D integer array-like, one label per example (any integers; they need not be
        ``0 .. K - 1``).
      num_clients: number of clients ``C``.
      alpha: concentration ``> 0`` of the symmetric Dirichlet.
      seed: seed of ``np.random.default_rng``.
      min_size: least number of examples every client must hold (``0`` allows empty clients);
        ``num_clients * min_size <= len(labels)``.
      max_tries: how many times to re-draw before giving up.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays, together a permutation of
      ``arange(len(labels))``.

    References:
      Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
      Visual Classification", 2019 (arXiv:1909.06335).
      Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural Networks",
      ICML 2019. Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An
      Experimental Study", ICDE 2022.

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> labels = np.repeat(np.arange(10), 100)            # 10 classes, 100 examples each
      >>> part = fl.data.partition.dirichlet(labels, 10, alpha=0.05, seed=0, min_size=5)
      >>> len(part), sum(len(p) for p in part), min(len(p) for p in part) >= 5
      (10, 1000, True)
      >>> def skew(part):  # mean total-variation distance of client label mixes to the global
      ...     data = fl.data.FederatedData.from_client_indices({"y": labels}, part)
      ...     return data.label_skew("y")
      >>> skew(part) > 0.5, skew(fl.data.partition.dirichlet(labels, 10, alpha=1e4)) < 0.1
      (True, True)
    """
    y = _check_labels(labels, "labels")
    n = y.size
    c = _check_num_clients(num_clients, n)
    a = _check_positive_float(alpha, "alpha")
    m = _check_min_size(min_size, c, n)
    tries = _check_int(max_tries, "max_tries", minimum=1)
    rng = _rng(seed)

    classes, inverse = np.unique(y, return_inverse=True)
    by_class = np.argsort(inverse, kind="stable")
    class_sizes = np.bincount(inverse, minlength=classes.size)
    class_starts = np.concatenate([[0], np.cumsum(class_sizes)])
    owner = np.empty(n, dtype=np.int64)
    smallest = 0
    for _ in range(tries):
        for k, n_k in enumerate(class_sizes):
            members = rng.permutation(by_class[class_starts[k] : class_starts[k + 1]])
            p = rng.dirichlet(np.full(c, a))
            owner[members] = np.repeat(np.arange(c), _cut_counts(p, int(n_k)))
        sizes = np.bincount(owner, minlength=c)
        smallest = int(sizes.min())
        if smallest >= m:
            return _group(owner, c)
    raise ValueError(
        f"min_size: after max_tries={tries} draws some client still held fewer than "
        f"min_size={m} examples (smallest: {smallest}) with alpha={a}, num_clients={c} and "
        f"{n} examples; raise alpha, lower min_size or num_clients, or raise max_tries."
    )


# --------------------------------------------------------------------------- shards
def shards(
    labels: Any,
    num_clients: int,
    shards_per_client: int = 2,
    *,
    seed: int = 0,
    drop_remainder: bool = False,
) -> Partition:
    """Pathological non-iid split of McMahan et al. (2017): a few label-sorted shards each.

    Rule: order the examples by label (ties in random order), cut that order into
    ``S = num_clients * shards_per_client`` consecutive shards of ``N / S`` examples, and
    give each client ``shards_per_client`` shards chosen uniformly at random without
    replacement. A shard holds one label unless it straddles a class boundary, so when every
    class size is a multiple of ``N / S`` each client sees at most ``shards_per_client``
    labels (in general at most ``shards_per_client`` plus the boundaries its shards cross).
    All clients hold the same number of examples. The FedAvg paper uses MNIST's 60,000
    examples, 100 clients and 2 shards of 300 each.

    Args:
      labels: 1-D integer array-like, one label per example.
      num_clients: number of clients.
      shards_per_client: shards per client (``>= 1``).
      seed: seed of ``np.random.default_rng``.
      drop_remainder: when ``len(labels)`` is not a multiple of ``S``, leave out
        ``len(labels) % S`` randomly chosen examples instead of raising.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays of ``N // S * shards_per_client``
      examples each, pairwise disjoint.

    References:
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
      Deep Networks from Decentralized Data", AISTATS 2017, Section 3.

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> labels = np.repeat(np.arange(5), 4)                # 5 classes of 4 examples
      >>> part = fl.data.partition.shards(labels, 5, shards_per_client=2, seed=0)
      >>> [len(p) for p in part]
      [4, 4, 4, 4, 4]
      >>> all(len(np.unique(labels[p])) <= 2 for p in part)
      True
    """
    y = _check_labels(labels, "labels")
    n = y.size
    c = _check_int(num_clients, "num_clients", minimum=1)
    s = _check_int(shards_per_client, "shards_per_client", minimum=1)
    num_shards = c * s
    if num_shards > n:
        raise ValueError(
            f"num_clients: {c} clients x shards_per_client={s} = {num_shards} shards, more than "
            f"the {n} examples; use fewer clients or fewer shards per client."
        )
    remainder = n % num_shards
    if remainder and not drop_remainder:
        raise ValueError(
            f"shards_per_client: {n} examples cannot be cut into num_clients * "
            f"shards_per_client = {c} * {s} = {num_shards} equal shards ({remainder} left "
            "over); choose num_clients and shards_per_client whose product divides the number "
            f"of examples, drop {remainder} examples first, or pass drop_remainder=True."
        )
    rng = _rng(seed)
    kept = rng.permutation(n)[: n - remainder]
    order = kept[np.argsort(y[kept], kind="stable")]  # by label, ties in random order
    shard_size = order.size // num_shards
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.repeat(np.arange(c), s)
    owner = np.full(n, -1, dtype=np.int64)
    owner[order] = np.repeat(client_of_shard, shard_size)
    return _group(owner, c)


# --------------------------------------------------------------------------- quantity skew
def quantity_skew(
    num_examples: int,
    num_clients: int,
    *,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    min_size: int = 1,
    seed: int = 0,
) -> Partition:
    """Size-skewed split: client sizes drawn from a heavy-tailed law, examples iid.

    Rule: draw a weight per client,

    * ``"lognormal"``: ``w_i = exp(sigma * z_i)``, ``z_i ~ N(0, 1)``;
    * ``"powerlaw"``: Pareto with tail index ``exponent``, ``P(w_i > x) = x**-exponent`` for
      ``x >= 1`` (density ``∝ x**-(exponent + 1)``; smaller ``exponent``, heavier tail);

    then give client ``i`` ``min_size + r_i`` examples, where the ``r_i`` split the remaining
    ``R = num_examples - num_clients * min_size`` in proportion to ``w`` (largest-remainder
    rounding, so the sizes sum to ``num_examples`` exactly), and fill the clients from one
    random permutation of the examples.
    ``sigma -> 0`` (or ``exponent -> inf``) approaches equal sizes.

    Args:
      num_examples: number of examples ``N``.
      num_clients: number of clients.
      distribution: ``"lognormal"`` or ``"powerlaw"``.
      sigma: log-normal spread (``>= 0``), used by ``"lognormal"``.
      exponent: Pareto tail index (``> 0``), used by ``"powerlaw"``.
      min_size: least number of examples per client; ``num_clients * min_size <= N``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays, together a permutation of
      ``arange(num_examples)``.

    References:
      Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study",
      ICDE 2022 (quantity skew). Log-normal sizes as in LEAF (Caldas et al., 2018) statistics.

    Example:
      >>> import fedjax_lab as fl
      >>> part = fl.data.partition.quantity_skew(1000, 5, sigma=1.0, min_size=10, seed=0)
      >>> sizes = [len(p) for p in part]
      >>> len(sizes), sum(sizes), min(sizes) >= 10
      (5, 1000, True)
    """
    n = _check_int(num_examples, "num_examples", minimum=1)
    c = _check_num_clients(num_clients, n)
    m = _check_min_size(min_size, c, n)
    rng = _rng(seed)
    if distribution == "lognormal":
        sig = _check_float(sigma, "sigma")
        if sig < 0:
            raise ValueError(f"sigma: the log-normal spread must be >= 0, got {sig}.")
        w = np.exp(sig * rng.standard_normal(c))
    elif distribution == "powerlaw":
        e = _check_positive_float(exponent, "exponent")
        w = rng.pareto(e, size=c) + 1.0
    else:
        raise ValueError(
            f"distribution: expected 'lognormal' or 'powerlaw', got {distribution!r}."
        )
    sizes = m + _largest_remainder(w, n - c * m)
    return _fill_iid(rng, sizes)


# --------------------------------------------------------------------------- k classes each
def pathological(
    labels: Any, num_clients: int, classes_per_client: int = 2, *, seed: int = 0
) -> Partition:
    """Each client holds exactly ``classes_per_client`` classes (NIID-Bench's ``#C=k``).

    Rule: with ``K`` distinct labels in ascending order, client ``i`` takes class ``i mod K``
    first (so every class has a holder when ``num_clients >= K``), then ``k - 1`` further
    distinct classes drawn uniformly at random from the rest. Each class's examples are then
    shuffled and cut into as many near-equal pieces as the class has holders (sizes differ by
    at most one), one piece per holder. A class no client drew (only possible when
    ``num_clients < K``) is left out of the partition.

    Unlike :func:`shards`, which cuts a label-sorted order and so may give a client a shard
    that straddles two classes, every client here sees exactly ``k`` labels (when each of its
    classes has at least as many examples as holders).

    Args:
      labels: 1-D integer array-like, one label per example.
      num_clients: number of clients.
      classes_per_client: ``k``, the classes of each client, ``1 <= k <= K``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays, pairwise disjoint.

    References:
      Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study",
      ICDE 2022 (the ``#C=k`` label-quantity skew).

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> labels = np.repeat(np.arange(4), 6)                # 4 classes of 6 examples
      >>> part = fl.data.partition.pathological(labels, 4, classes_per_client=2, seed=0)
      >>> [len(np.unique(labels[p])) for p in part]
      [2, 2, 2, 2]
    """
    y = _check_labels(labels, "labels")
    c = _check_int(num_clients, "num_clients", minimum=1)
    classes = np.unique(y)
    k = _check_int(classes_per_client, "classes_per_client", minimum=1)
    if k > classes.size:
        raise ValueError(
            f"classes_per_client: {k} is more than the {classes.size} classes in labels; use "
            f"at most {classes.size}."
        )
    rng = _rng(seed)
    holders: list[list[int]] = [[] for _ in classes]
    for i in range(c):
        first = i % classes.size
        others = np.delete(np.arange(classes.size), first)
        for j in (first, *rng.choice(others, size=k - 1, replace=False).tolist()):
            holders[j].append(i)
    owner = np.full(y.size, -1, dtype=np.int64)
    for j, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == cls))
        if holders[j]:
            sizes = _largest_remainder(np.ones(len(holders[j])), idx.size)
            owner[idx] = np.repeat(np.asarray(holders[j], np.int64), sizes)
    return _group(owner, c)


# --------------------------------------------------------------------------- inner dirichlet
def inner_dirichlet(
    labels: Any,
    num_clients: int,
    alpha: float,
    *,
    sizes: Any = None,
    seed: int = 0,
) -> Partition:
    r"""Client sizes fixed, each client's label mix drawn from a Dirichlet (Hsu et al. 2019).

    Rule: client ``i`` gets ``sizes[i]`` examples (default: equal sizes, as :func:`iid`) and a
    class mix ``q_i ~ Dir(alpha * prior)``, ``prior`` the global label frequencies. Examples
    are then dealt one at a time: a client that still has room, chosen uniformly at random,
    draws a class from ``q_i`` renormalised over the classes with examples left, and takes a
    random remaining example of that class. Every client ends with exactly ``sizes[i]``
    examples; its label mix is ``q_i`` until classes run out (large ``alpha``: close to the
    global mix; small: one or two classes).

    :func:`dirichlet` instead splits each class over clients, so sizes there are random too.

    Args:
      labels: 1-D integer array-like, one label per example.
      num_clients: number of clients ``C``.
      alpha: Dirichlet concentration, ``> 0``.
      sizes: ``C`` non-negative client sizes summing to ``len(labels)`` (default equal).
      seed: seed of ``np.random.default_rng``.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays, together a permutation of
      ``arange(len(labels))``, of the given sizes.

    References:
      Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
      Visual Classification", 2019.

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> labels = np.repeat(np.arange(5), 20)
      >>> part = fl.data.partition.inner_dirichlet(labels, 4, 0.1, sizes=[10, 20, 30, 40])
      >>> [len(p) for p in part]
      [10, 20, 30, 40]
    """
    y = _check_labels(labels, "labels")
    n = y.size
    c = _check_num_clients(num_clients, n)
    a = _check_positive_float(alpha, "alpha")
    if sizes is None:
        want = np.full(c, n // c, dtype=np.int64)
        want[: n % c] += 1
    else:
        want = np.asarray(sizes)
        if (
            want.shape != (c,)
            or want.dtype.kind not in "iu"
            or np.any(want < 0)
            or int(want.sum()) != n
        ):
            raise ValueError(
                f"sizes: need {c} non-negative integers (one per client) summing to the {n} "
                f"examples; got {sizes!r}."
            )
        want = want.astype(np.int64)
    rng = _rng(seed)
    classes, y_idx = np.unique(y, return_inverse=True)
    prior = np.bincount(y_idx) / n
    mix = rng.dirichlet(a * prior, size=c)
    pools = [list(rng.permutation(np.flatnonzero(y_idx == j))) for j in range(classes.size)]
    left = np.array([len(p) for p in pools], dtype=np.float64)
    room = want.copy()
    owner = np.empty(n, dtype=np.int64)
    open_clients = [i for i in range(c) if room[i] > 0]
    while open_clients:
        pos = int(rng.integers(len(open_clients)))
        i = open_clients[pos]
        p = mix[i] * (left > 0)
        if p.sum() <= 0:  # its classes ran out: any class with examples left
            p = (left > 0).astype(np.float64)
        j = int(rng.choice(classes.size, p=p / p.sum()))
        owner[pools[j].pop()] = i
        left[j] -= 1
        room[i] -= 1
        if room[i] == 0:
            open_clients[pos] = open_clients[-1]
            open_clients.pop()
    return _group(owner, c)


# --------------------------------------------------------------------------- size skew
SIZE_SKEWS = ("linear", "square", "exponential")


def size_skew(
    num_examples: int,
    num_clients: int,
    kind: str = "linear",
    *,
    ratio: float = 100.0,
    min_size: int = 1,
    seed: int = 0,
) -> Partition:
    """Client sizes that grow linearly, quadratically or exponentially; labels iid.

    Rule: client weights ``w_r`` by rank ``r = 0 .. C - 1``: ``"linear"`` ``r + 1``,
    ``"square"`` ``(r + 1)**2``, ``"exponential"`` ``ratio**(r / (C - 1))`` (the largest
    client ``ratio`` times the smallest's weight). The ranks are a random permutation of the
    clients (client 0 is not always the smallest). Sizes are ``min_size`` plus the rest of
    the examples in proportion to ``w`` (largest-remainder rounding, so they sum exactly), and
    the clients are filled from one random permutation of the examples.

    Args:
      num_examples: number of examples ``N``.
      num_clients: number of clients ``C``.
      kind: ``"linear"``, ``"square"`` or ``"exponential"``.
      ratio: largest-to-smallest weight of ``"exponential"`` (``>= 1``).
      min_size: least number of examples per client; ``C * min_size <= N``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      A list of ``num_clients`` sorted ``int64`` index arrays, together a permutation of
      ``arange(num_examples)``.

    Example:
      >>> import fedjax_lab as fl
      >>> part = fl.data.partition.size_skew(100, 4, "linear", min_size=0, seed=0)
      >>> sorted(len(p) for p in part)
      [10, 20, 30, 40]
    """
    n = _check_int(num_examples, "num_examples", minimum=1)
    c = _check_num_clients(num_clients, n)
    m = _check_min_size(min_size, c, n)
    rank = np.arange(c, dtype=np.float64)
    if kind == "linear":
        w = rank + 1
    elif kind == "square":
        w = (rank + 1) ** 2
    elif kind == "exponential":
        r = _check_float(ratio, "ratio")
        if r < 1:
            raise ValueError(f"ratio: the largest-to-smallest weight must be >= 1, got {r}.")
        w = r ** (rank / max(c - 1, 1))
    else:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, SIZE_SKEWS))}, got {kind!r}.")
    rng = _rng(seed)
    sizes = np.empty(c, dtype=np.int64)
    sizes[rng.permutation(c)] = m + _largest_remainder(w, n - c * m)
    return _fill_iid(rng, sizes)


# --------------------------------------------------------------------------- feature skew
def feature_noise(x: Any, partition: Partition, sigma: float, *, seed: int = 0) -> np.ndarray:
    """Feature-distribution skew: client ``i`` of ``C`` sees its inputs plus noise of std
    ``sigma * i / C`` (NIID-Bench's noise-based feature imbalance).

    Returns a float copy of ``x`` in which every example of client ``i`` has independent
    Gaussian noise ``N(0, (sigma * i / C)**2)`` added to each feature; client 0 keeps its
    inputs exactly, and the noise grows linearly with the client index. Examples no client
    holds are returned unchanged. Combine with any partitioner (typically :func:`iid`, so that
    features are the only skew).

    Args:
      x: inputs ``[N, ...]`` (real-valued).
      partition: a partition of ``range(N)`` (a list of index arrays).
      sigma: noise scale of the last client, ``>= 0``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      ``x + noise`` with the dtype of ``x`` (``float32`` for integer ``x``).

    References:
      Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study",
      ICDE 2022 (noise-based feature imbalance).

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> x = np.zeros((6, 2), np.float32)
      >>> part = fl.data.partition.iid(6, 3, seed=0)
      >>> noisy = fl.data.partition.feature_noise(x, part, sigma=1.0)
      >>> bool(np.all(noisy[part[0]] == 0)), bool(np.all(noisy[part[2]] != 0))
      (True, True)
    """
    arr = np.asarray(x)
    if arr.ndim < 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"x: need a real-valued array [N, ...], got dtype {arr.dtype}.")
    s = _check_float(sigma, "sigma")
    if s < 0:
        raise ValueError(f"sigma: the noise scale must be >= 0, got {s}.")
    if not isinstance(partition, (list, tuple)) or not partition:
        raise ValueError("partition: need a non-empty list of index arrays, one per client.")
    out = arr.astype(arr.dtype if arr.dtype.kind == "f" else np.float32, copy=True)
    rng = _rng(seed)
    c = len(partition)
    for i, idx in enumerate(partition):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= out.shape[0]):
            raise ValueError(
                f"partition: client {i} holds an index outside [0, {out.shape[0]}) (x has "
                f"{out.shape[0]} examples)."
            )
        if i and idx.size:
            noise = rng.standard_normal((idx.size, *out.shape[1:])) * (s * i / c)
            out[idx] = out[idx] + noise.astype(out.dtype)
    return out


# --------------------------------------------------------------------------- natural split
def by_key(keys: Any) -> Partition:
    """Natural partition: one client per distinct key (writer, speaker, user id, ...).

    Clients are ordered by sorted key; client ``i`` holds every example whose key is the
    ``i``-th smallest distinct key. Use :func:`by_key_names` to get the keys too.

    Args:
      keys: 1-D array-like of integers or strings (``str`` or ``bytes``), one per example.

    Returns:
      A list of sorted ``int64`` index arrays, one per distinct key, together a permutation
      of ``arange(len(keys))``.

    Example:
      >>> import fedjax_lab as fl
      >>> [p.tolist() for p in fl.data.partition.by_key(["bob", "ann", "bob", "cy"])]
      [[1], [0, 2], [3]]
    """
    return by_key_names(keys)[0]


def by_key_names(keys: Any) -> tuple[Partition, np.ndarray]:
    """Like :func:`by_key`, and also returns each client's key.

    Args:
      keys: 1-D array-like of integers or strings (``str`` or ``bytes``), one per example.

    Returns:
      ``(partition, names)``: ``partition`` as in :func:`by_key`; ``names`` the distinct keys
      in sorted order (a NumPy array, ``names[i]`` the key of client ``i``). For
      ``FederatedData.client_names`` pass ``tuple(str(k) for k in names)``.

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> keys = np.array([7, 3, 7, 7])
      >>> part, names = fl.data.partition.by_key_names(keys)
      >>> names.tolist(), [p.tolist() for p in part]
      ([3, 7], [[1], [0, 2, 3]])
    """
    k = np.asarray(keys)
    if k.ndim != 1 or k.size == 0:
        raise ValueError(
            f"keys: need a non-empty 1-D array with one key per example, got shape {k.shape}."
        )
    if k.dtype.kind not in "iuUSO":
        raise ValueError(
            f"keys: need integer or string keys, got dtype {k.dtype}; convert float or other "
            "keys to integers or strings first."
        )
    try:
        names, inverse = np.unique(k, return_inverse=True)
    except TypeError as err:  # object arrays mixing types that cannot be ordered
        raise ValueError(
            f"keys: keys must be mutually comparable (all ints or all strings): {err}"
        ) from None
    inverse = inverse.reshape(-1).astype(np.int64)
    return _group(inverse, names.size), names


# --------------------------------------------------------------------------- held-out clients
def held_out_clients(
    data: FederatedData, fraction: float, *, seed: int = 0
) -> tuple[FederatedData, FederatedData]:
    """Splits a population by clients into training clients and unseen held-out clients.

    Rule: hold out ``h = floor(fraction * num_clients + 1/2)`` clients (``fraction *
    num_clients`` rounded half up), chosen uniformly at random without replacement; the
    others train. Both parts keep the clients in their
    original order (and their ``client_names``). This is the "unseen clients" evaluation of
    generalisation studies, as opposed to held-out examples of training clients.

    Args:
      data: the population, a :class:`fedjax_lab.data.FederatedData`.
      fraction: share of clients to hold out, in ``(0, 1)``; it must leave at least one
        client on each side.
      seed: seed of ``np.random.default_rng``.

    Returns:
      ``(train, held_out)``, two ``FederatedData`` whose clients are disjoint and together
      all of ``data``'s clients.

    References:
      Yuan, Morningstar, Ning, Singhal, "What Do We Mean by Generalization in Federated
      Learning?", ICLR 2022 (participation gap: held-out clients).

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> data = fl.data.FederatedData.from_offsets({"y": np.arange(10)}, [0, 2, 5, 6, 10])
      >>> train, test = fl.data.partition.held_out_clients(data, 0.25, seed=0)
      >>> train.num_clients, test.num_clients, train.num_examples + test.num_examples
      (3, 1, 10)
    """
    if not isinstance(data, FederatedData):
        raise TypeError(
            f"data: expected a fedjax_lab.data.FederatedData, got {type(data).__name__}."
        )
    f = _check_float(fraction, "fraction")
    if not 0.0 < f < 1.0:
        raise ValueError(f"fraction: the share of held-out clients must lie in (0, 1), got {f}.")
    c = data.num_clients
    h = int(np.floor(f * c + 0.5))
    if not 1 <= h <= c - 1:
        raise ValueError(
            f"fraction: {f} of {c} clients rounds to {h} held-out clients; both sides need at "
            "least one client, so choose a fraction between "
            f"{0.5 / c:.3g} and {1 - 0.5 / c:.3g} (or use more clients)."
        )
    rng = _rng(seed)
    perm = rng.permutation(c)
    held = np.sort(perm[:h])
    train = np.sort(perm[h:])
    return data.select_clients(train), data.select_clients(held)


# --------------------------------------------------------------------------- helpers
def _fill_iid(rng: np.random.Generator, sizes: np.ndarray) -> Partition:
    """Clients of the given sizes filled from one random permutation of the examples."""
    n, c = int(sizes.sum()), sizes.size
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.repeat(np.arange(c), sizes)
    return _group(owner, c)


def _group(owner: np.ndarray, num_clients: int) -> Partition:
    """Index arrays of the examples of each client; ``owner[i] < 0`` leaves example ``i`` out."""
    idx = np.flatnonzero(owner >= 0)
    own = owner[idx]
    order = idx[np.argsort(own, kind="stable")]  # stable: ascending within a client
    counts = np.bincount(own, minlength=num_clients)
    return [a.astype(np.int64) for a in np.split(order, np.cumsum(counts)[:-1])]


def _cut_counts(p: np.ndarray, n: int) -> np.ndarray:
    """Sizes of the pieces when ``n`` items are cut at ``round(n * cumsum(p))``."""
    cuts = np.clip(np.rint(np.cumsum(p)[:-1] * n), 0, n).astype(np.int64)
    cuts = np.maximum.accumulate(cuts)
    return np.diff(np.concatenate([[0], cuts, [n]]))


def _largest_remainder(w: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers proportional to ``w`` that sum to ``total`` exactly."""
    q = w / w.sum() * total
    base = np.floor(q).astype(np.int64)
    short = total - int(base.sum())
    base[np.argsort(-(q - base), kind="stable")[:short]] += 1
    return base


def _rng(seed: Any) -> np.random.Generator:
    s = _check_int(seed, "seed", minimum=0)
    return np.random.default_rng(s)


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected an integer, got the bool {value}.")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name}: expected an integer, got {value!r} ({type(value).__name__})."
        ) from None
    if v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}.")
    return int(v)


def _check_float(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name}: expected a real number, got {value!r}.")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}.")
    return v


def _check_positive_float(value: Any, name: str) -> float:
    v = _check_float(value, name)
    if v <= 0:
        raise ValueError(f"{name}: must be > 0, got {v}.")
    return v


def _check_num_clients(num_clients: Any, num_examples: int) -> int:
    c = _check_int(num_clients, "num_clients", minimum=1)
    if c > num_examples:
        raise ValueError(
            f"num_clients: {c} clients cannot each hold an example of only {num_examples}; "
            "use at most as many clients as examples."
        )
    return c


def _check_min_size(min_size: Any, num_clients: int, num_examples: int) -> int:
    m = _check_int(min_size, "min_size", minimum=0)
    if m * num_clients > num_examples:
        raise ValueError(
            f"min_size: {num_clients} clients x min_size={m} = {m * num_clients} examples, more "
            f"than the {num_examples} there are; lower min_size or num_clients "
            f"(min_size <= {num_examples // num_clients})."
        )
    return m


def _check_labels(labels: Any, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(
            f"{name}: need a 1-D array of integer class labels, got shape {y.shape}"
            + ("; pass labels.argmax(-1) for one-hot labels." if y.ndim == 2 else ".")
        )
    if y.size == 0:
        raise ValueError(f"{name}: need at least one label, got an empty array.")
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{name}: need integer class labels, got dtype {y.dtype}; convert with "
            "labels.astype(np.int64) (or np.unique(labels, return_inverse=True)[1])."
        )
    return y
