"""Property tests of the partitioners in fedjax_lab.data.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lab.data import FederatedData
from fedjax_lab.data import partition as P

SEEDS = [0, 1, 7]


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, num_classes, size=n)


def _assert_partition(part, num_clients: int, num_examples: int) -> None:
    """Every example in exactly one client; int64, 1-D and sorted within each client."""
    assert isinstance(part, list) and len(part) == num_clients
    for p in part:
        assert isinstance(p, np.ndarray) and p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)
    flat = np.sort(np.concatenate(part))
    np.testing.assert_array_equal(flat, np.arange(num_examples))


def _mean_tv(labels: np.ndarray, part) -> float:
    """Mean total-variation distance of client label histograms to the global histogram."""
    k = int(labels.max()) + 1
    glob = np.bincount(labels, minlength=k) / labels.size
    tvs = [
        0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum()
        for p in part
        if len(p)
    ]
    return float(np.mean(tvs))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- iid
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,c", [(1, 1), (10, 3), (100, 100), (1001, 7), (5000, 64)])
def test_iid_covers_and_balances(n, c, seed):
    part = P.iid(n, c, seed=seed)
    _assert_partition(part, c, n)
    sizes = np.array([len(p) for p in part])
    assert sizes.max() - sizes.min() <= 1


def test_iid_deterministic_and_shuffled():
    assert _same(P.iid(100, 4, seed=3), P.iid(100, 4, seed=3))
    assert not _same(P.iid(100, 4, seed=3), P.iid(100, 4, seed=4))
    # Shuffled: the first client is not simply the first quarter of the examples.
    assert not np.array_equal(P.iid(100, 4, seed=0)[0], np.arange(25))


def test_iid_label_mix_is_global():
    labels = _labels(20_000, 10, 0)
    assert _mean_tv(labels, P.iid(labels.size, 20, seed=0)) < 0.05


# --------------------------------------------------------------------------- dirichlet
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "n,k,c,alpha,min_size",
    [(200, 3, 5, 0.5, 1), (2000, 10, 20, 0.1, 10), (1000, 10, 10, 100.0, 50), (50, 2, 50, 1e4, 1)],
)
def test_dirichlet_covers_and_honours_min_size(n, k, c, alpha, min_size, seed):
    labels = _labels(n, k, seed)
    part = P.dirichlet(labels, c, alpha, seed=seed, min_size=min_size)
    _assert_partition(part, c, n)
    assert min(len(p) for p in part) >= min_size


def test_dirichlet_min_size_zero_allows_empty_clients():
    labels = _labels(100, 2, 0)
    part = P.dirichlet(labels, 30, 0.01, seed=0, min_size=0)
    _assert_partition(part, 30, 100)
    assert min(len(p) for p in part) == 0


def test_dirichlet_deterministic():
    labels = _labels(1000, 10, 0)
    a = P.dirichlet(labels, 10, 0.3, seed=5)
    assert _same(a, P.dirichlet(labels, 10, 0.3, seed=5))
    assert not _same(a, P.dirichlet(labels, 10, 0.3, seed=6))


@pytest.mark.parametrize("seed", SEEDS)
def test_dirichlet_alpha_controls_label_skew(seed):
    labels = _labels(10_000, 10, seed)
    near_iid = P.dirichlet(labels, 20, 1e4, seed=seed)
    skewed = P.dirichlet(labels, 20, 0.05, seed=seed)
    tv_iid, tv_skew = _mean_tv(labels, near_iid), _mean_tv(labels, skewed)
    assert tv_iid < 0.1, tv_iid
    assert tv_skew > 0.5, tv_skew
    # Small alpha: a client holds only a few classes (on average > 95% of its data lies in
    # its 3 largest classes); near-iid clients hold all 10 (3 classes ~ 30% of the data).
    def top3_share(part):
        return np.mean([np.sort(np.bincount(labels[p], minlength=10))[-3:].sum() / len(p)
                        for p in part])
    assert top3_share(skewed) > 0.95
    assert top3_share(near_iid) < 0.35
    # Agrees with FederatedData's own label-skew summary.
    data = FederatedData.from_client_indices({"y": labels}, skewed)
    assert data.label_skew("y") == pytest.approx(tv_skew)


def test_dirichlet_per_class_split_is_proportional():
    """Large alpha: each class is split into (nearly) equal pieces, one per client."""
    labels = np.repeat(np.arange(5), 400)
    part = P.dirichlet(labels, 8, 1e6, seed=0)
    counts = np.stack([np.bincount(labels[p], minlength=5) for p in part])
    np.testing.assert_array_equal(counts.sum(0), [400] * 5)
    assert np.abs(counts - 50).max() <= 1


def test_dirichlet_tiny_alpha_gives_whole_classes():
    """alpha -> 0: each class goes (almost) whole to one client; no client position collects
    stray examples (truncating the cut points would hand the last client ~1 of every class)."""
    labels = np.repeat(np.arange(10), 100)
    partial_cells, last_client_classes = 0, 0
    for seed in range(10):
        part = P.dirichlet(labels, 10, 1e-3, seed=seed, min_size=0)
        counts = np.stack([np.bincount(labels[p], minlength=10) for p in part])
        partial_cells += int(((counts > 0) & (counts < 100)).sum())
        last_client_classes += int((counts[-1] > 0).sum())
    assert partial_cells <= 0.05 * 10 * 100  # out of 10 seeds x 10 clients x 10 classes
    assert last_client_classes <= 30  # ~10 expected (1 class per client per seed), not 100


def test_dirichlet_any_integer_labels():
    labels = np.array([-3, 10, 10, 7, -3, 7, 7, 10], dtype=np.int32)
    part = P.dirichlet(labels, 2, 1.0, seed=0)
    _assert_partition(part, 2, labels.size)


def test_dirichlet_gives_up_with_clear_error():
    labels = np.zeros(20, dtype=np.int64)  # one class, 20 examples, 20 clients of >= 1 each
    with pytest.raises(ValueError, match="max_tries"):
        P.dirichlet(labels, 20, 0.01, seed=0, min_size=1, max_tries=3)


# --------------------------------------------------------------------------- shards
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k,per_class,c,s", [(10, 60, 100, 2), (10, 60, 30, 2), (4, 12, 4, 3)])
def test_shards_aligned_classes(k, per_class, c, s, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(k), per_class))
    assert per_class % (labels.size // (c * s)) == 0  # classes fill whole shards
    part = P.shards(labels, c, s, seed=seed)
    _assert_partition(part, c, labels.size)
    sizes = {len(p) for p in part}
    assert sizes == {labels.size // c}
    for p in part:
        assert len(np.unique(labels[p])) <= s


@pytest.mark.parametrize("seed", SEEDS)
def test_shards_unaligned_classes(seed):
    labels = _labels(1200, 10, seed)  # class sizes not multiples of the shard size 6
    part = P.shards(labels, 100, 2, seed=seed)
    _assert_partition(part, 100, labels.size)
    assert {len(p) for p in part} == {12}
    # Each shard is a contiguous run of the label-sorted order, so it spans a label interval;
    # a client's labels lie in at most 2 such intervals.
    for p in part:
        assert len(np.unique(labels[p])) <= 4
    assert _mean_tv(labels, part) > 0.6


def test_shards_drop_remainder():
    labels = _labels(1003, 10, 0)
    with pytest.raises(ValueError, match="shards_per_client"):
        P.shards(labels, 10, 2)
    part = P.shards(labels, 10, 2, seed=0, drop_remainder=True)
    flat = np.concatenate(part)
    assert flat.size == 1000 and np.unique(flat).size == 1000
    assert {len(p) for p in part} == {100}


def test_shards_deterministic():
    labels = _labels(600, 10, 0)
    assert _same(P.shards(labels, 10, seed=2), P.shards(labels, 10, seed=2))
    assert not _same(P.shards(labels, 10, seed=2), P.shards(labels, 10, seed=3))


# --------------------------------------------------------------------------- quantity skew
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dist", ["lognormal", "powerlaw"])
@pytest.mark.parametrize("n,c,min_size", [(10, 10, 1), (1000, 37, 5), (20_000, 200, 20)])
def test_quantity_skew_covers_and_sizes(n, c, min_size, dist, seed):
    part = P.quantity_skew(n, c, distribution=dist, min_size=min_size, seed=seed)
    _assert_partition(part, c, n)
    assert min(len(p) for p in part) >= min_size


def _max_over_median(**kw) -> float:
    sizes = np.array([len(p) for p in P.quantity_skew(100_000, 200, **kw)])
    return sizes.max() / np.median(sizes)


@pytest.mark.parametrize("seed", SEEDS)
def test_quantity_skew_is_skewed(seed):
    assert _max_over_median(sigma=0.05, seed=seed) < 1.3
    assert _max_over_median(sigma=2.0, seed=seed) > 20
    assert _max_over_median(distribution="powerlaw", exponent=100.0, seed=seed) < 1.3
    assert _max_over_median(distribution="powerlaw", exponent=1.0, seed=seed) > 10


def test_quantity_skew_matches_its_rule():
    """Sizes = min_size + largest-remainder split of the rest in proportion to the weights."""
    n, c, m, sigma, seed = 5000, 13, 7, 1.3, 4
    rng = np.random.default_rng(seed)
    w = np.exp(sigma * rng.standard_normal(c))
    expect = m + w / w.sum() * (n - c * m)
    sizes = np.array([len(p) for p in P.quantity_skew(n, c, sigma=sigma, min_size=m, seed=seed)])
    assert np.abs(sizes - expect).max() < 1
    assert _same(
        P.quantity_skew(n, c, sigma=sigma, seed=seed), P.quantity_skew(n, c, sigma=sigma, seed=seed)
    )


# --------------------------------------------------------------------------- by_key
def test_by_key_groups_exactly():
    rng = np.random.default_rng(0)
    keys = rng.choice(np.array(["zed", "amy", "bo", "cy", "d"]), size=300)
    part, names = P.by_key_names(keys)
    assert names.tolist() == sorted(set(keys.tolist()))
    _assert_partition(part, len(names), keys.size)
    for name, p in zip(names, part, strict=True):
        np.testing.assert_array_equal(p, np.flatnonzero(keys == name))
    assert _same(P.by_key(keys), part)


@pytest.mark.parametrize(
    "keys",
    [np.array([5, -1, 5, 3, 3, 5]), [b"w1", b"w0", b"w1"], ["b", "a"], np.array([1, 2], object)],
)
def test_by_key_key_types(keys):
    part, names = P.by_key_names(keys)
    keys = np.asarray(keys)
    assert list(names) == sorted(set(keys.tolist()))
    for name, p in zip(names, part, strict=True):
        assert np.all(keys[p] == name) and len(p) == np.sum(keys == name)
    _assert_partition(part, len(names), keys.size)


def test_by_key_feeds_federated_data():
    keys = np.array([2, 0, 2, 1, 0])
    part, names = P.by_key_names(keys)
    data = FederatedData.from_client_indices({"k": keys}, part)
    data = data._replace(client_names=tuple(str(k) for k in names))
    assert data.client_sizes.tolist() == [2, 1, 2]
    for i in range(data.num_clients):
        assert set(data.client(i)["k"].tolist()) == {int(data.client_names[i])}


# --------------------------------------------------------------------------- held_out_clients
def _population(num_clients: int, seed: int) -> FederatedData:
    sizes = np.random.default_rng(seed).integers(1, 6, size=num_clients)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.repeat(np.arange(num_clients), sizes)
    return FederatedData.from_offsets(
        {"owner": owner, "x": np.arange(owner.size)}, offsets, [f"c{i}" for i in range(num_clients)]
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_clients,fraction", [(2, 0.5), (10, 0.2), (101, 0.1), (50, 0.9)])
def test_held_out_clients_disjoint_split(num_clients, fraction, seed):
    data = _population(num_clients, seed)
    train, held = P.held_out_clients(data, fraction, seed=seed)
    assert held.num_clients == round(fraction * num_clients)
    assert train.num_clients + held.num_clients == num_clients
    tn, hn = set(train.client_names), set(held.client_names)
    assert not tn & hn and tn | hn == set(data.client_names)
    assert train.num_examples + held.num_examples == data.num_examples
    for part in (train, held):
        ids = [int(n[1:]) for n in part.client_names]
        assert ids == sorted(ids)  # original order kept
        for i, cid in enumerate(ids):  # each client carries its own examples
            np.testing.assert_array_equal(part.client(i)["x"], data.client(cid)["x"])


def test_held_out_clients_deterministic():
    data = _population(40, 0)
    names = lambda s: P.held_out_clients(data, 0.25, seed=s)[1].client_names
    assert names(1) == names(1) and names(1) != names(2)


# --------------------------------------------------------------------------- bad input
LABELS = np.repeat(np.arange(4), 5)  # 20 examples


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: P.iid(10, 11), "num_clients"),
        (lambda: P.iid(10, 0), "num_clients"),
        (lambda: P.iid(0, 1), "num_examples"),
        (lambda: P.iid(10.0, 2), "num_examples"),
        (lambda: P.iid(10, 2, seed=-1), "seed"),
        (lambda: P.iid(10, 2, seed=None), "seed"),
        (lambda: P.dirichlet(LABELS, 21, 1.0), "num_clients"),
        (lambda: P.dirichlet(LABELS, 4, 0.0), "alpha"),
        (lambda: P.dirichlet(LABELS, 4, -1.0), "alpha"),
        (lambda: P.dirichlet(LABELS, 4, float("nan")), "alpha"),
        (lambda: P.dirichlet(LABELS, 4, 1.0, min_size=6), "min_size"),
        (lambda: P.dirichlet(LABELS, 4, 1.0, min_size=-1), "min_size"),
        (lambda: P.dirichlet(LABELS, 4, 1.0, max_tries=0), "max_tries"),
        (lambda: P.dirichlet(LABELS.astype(float), 4, 1.0), "labels"),
        (lambda: P.dirichlet(LABELS.reshape(4, 5), 2, 1.0), "labels"),
        (lambda: P.dirichlet(np.eye(4, dtype=int), 2, 1.0), "labels"),
        (lambda: P.dirichlet([], 1, 1.0), "labels"),
        (lambda: P.shards(LABELS, 3, 2), "shards_per_client"),
        (lambda: P.shards(LABELS, 11, 2), "num_clients"),
        (lambda: P.shards(LABELS, 2, 0), "shards_per_client"),
        (lambda: P.shards(["a", "b"], 1, 1), "labels"),
        (lambda: P.quantity_skew(10, 4, min_size=3), "min_size"),
        (lambda: P.quantity_skew(10, 11), "num_clients"),
        (lambda: P.quantity_skew(10, 2, sigma=-1.0), "sigma"),
        (lambda: P.quantity_skew(10, 2, distribution="powerlaw", exponent=0.0), "exponent"),
        (lambda: P.quantity_skew(10, 2, distribution="zipf"), "distribution"),
        (lambda: P.by_key(np.array([0.5, 1.5])), "keys"),
        (lambda: P.by_key(np.zeros((2, 2), int)), "keys"),
        (lambda: P.by_key([]), "keys"),
        (lambda: P.by_key(np.array([1, "a"], object)), "keys"),
        (lambda: P.held_out_clients(_population(5, 0), 0.0), "fraction"),
        (lambda: P.held_out_clients(_population(5, 0), 1.0), "fraction"),
        (lambda: P.held_out_clients(_population(5, 0), 0.05), "fraction"),
        (lambda: P.held_out_clients(_population(5, 0), 0.95), "fraction"),
        (lambda: P.held_out_clients(_population(1, 0), 0.5), "fraction"),
    ],
)
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


def test_held_out_clients_needs_federated_data():
    with pytest.raises(TypeError, match="data"):
        P.held_out_clients({"x": np.zeros(3)}, 0.5)


# --------------------------------------------------------------------------- pathological
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k,c", [(1, 10), (2, 10), (3, 25), (10, 7)])
def test_pathological_gives_exactly_k_classes_and_covers(k, c, seed):
    labels = _labels(2000, 10, seed)
    part = P.pathological(labels, c, classes_per_client=k, seed=seed)
    if c >= 10:
        _assert_partition(part, c, labels.size)
    assert [len(np.unique(labels[p])) for p in part] == [k] * c
    for cls in range(10):  # a class's holders share it near-equally (sizes differ by <= 1)
        pieces = [np.sum(labels[p] == cls) for p in part if np.any(labels[p] == cls)]
        if pieces:
            assert max(pieces) - min(pieces) <= 1


def test_pathological_with_fewer_clients_than_classes_leaves_out_undrawn_classes():
    labels = np.repeat(np.arange(10), 10)
    part = P.pathological(labels, 3, classes_per_client=2, seed=0)
    held = np.concatenate(part)
    assert len(np.unique(held)) == held.size  # disjoint
    drawn = set(np.unique(labels[held]).tolist())
    assert {0, 1, 2} <= drawn and len(drawn) <= 6
    assert np.all(np.isin(labels[np.setdiff1d(np.arange(100), held)], sorted(drawn), invert=True))
    assert _same(part, P.pathological(labels, 3, classes_per_client=2, seed=0))


# --------------------------------------------------------------------------- inner dirichlet
@pytest.mark.parametrize("seed", SEEDS)
def test_inner_dirichlet_keeps_sizes_and_alpha_controls_skew(seed):
    labels = _labels(3000, 10, seed)
    sizes = np.random.default_rng(seed).multinomial(3000, np.ones(30) / 30)
    skewed = P.inner_dirichlet(labels, 30, 0.05, sizes=sizes, seed=seed)
    mixed = P.inner_dirichlet(labels, 30, 100.0, sizes=sizes, seed=seed)
    for part in (skewed, mixed):
        _assert_partition(part, 30, labels.size)
        assert [len(p) for p in part] == sizes.tolist()
    iid_tv = _mean_tv(labels, P.iid(labels.size, 30, seed=seed))  # sampling noise of ~100
    assert _mean_tv(labels, skewed) > 0.5 > 1.5 * iid_tv > _mean_tv(labels, mixed)
    equal = P.inner_dirichlet(labels, 7, 1.0, seed=seed)
    assert max(len(p) for p in equal) - min(len(p) for p in equal) <= 1
    assert _same(equal, P.inner_dirichlet(labels, 7, 1.0, seed=seed))


def test_inner_dirichlet_follows_each_clients_drawn_mix():
    """With classes plentiful, a client's label counts follow its Dirichlet draw: chi-square."""
    labels = np.repeat(np.arange(4), 5000)
    part = P.inner_dirichlet(labels, 4, 2.0, sizes=[500, 500, 500, 18500], seed=3)
    mix = np.random.default_rng(3).dirichlet(2.0 * np.full(4, 0.25), size=4)  # same stream
    for i in range(3):  # the small clients never exhaust a class
        counts = np.bincount(labels[part[i]], minlength=4)
        expected = 500 * mix[i]
        keep = expected > 5
        chi2 = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
        assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001


# --------------------------------------------------------------------------- size skew
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["linear", "square", "exponential"])
def test_size_skew_follows_its_weights(kind, seed):
    n, c = 10_000, 8
    part = P.size_skew(n, c, kind, ratio=64.0, min_size=0, seed=seed)
    _assert_partition(part, c, n)
    sizes = np.sort([len(p) for p in part])
    r = np.arange(1, c + 1, dtype=float)
    w = {"linear": r, "square": r**2, "exponential": 64.0 ** ((r - 1) / (c - 1))}[kind]
    np.testing.assert_allclose(sizes, n * w / w.sum(), atol=1.0)
    assert _same(part, P.size_skew(n, c, kind, ratio=64.0, min_size=0, seed=seed))
    assert not _same(part, P.size_skew(n, c, kind, ratio=64.0, min_size=0, seed=seed + 1))


def test_size_skew_min_size_and_label_mix_stay_iid():
    labels = _labels(5000, 5, 0)
    part = P.size_skew(5000, 10, "square", min_size=50, seed=0)
    assert min(len(p) for p in part) >= 50
    assert _mean_tv(labels, [p for p in part if len(p) > 400]) < 0.1


# --------------------------------------------------------------------------- feature noise
def test_feature_noise_grows_linearly_with_the_client_index():
    x = np.ones((8000, 3), np.float32)
    part = P.iid(8000, 4, seed=0)
    noisy = P.feature_noise(x, part, sigma=2.0, seed=1)
    assert noisy.dtype == np.float32 and noisy.shape == x.shape
    np.testing.assert_array_equal(noisy[part[0]], x[part[0]])
    for i in (1, 2, 3):
        err = noisy[part[i]] - 1.0
        assert abs(float(err.mean())) < 0.05
        np.testing.assert_allclose(float(err.std()), 2.0 * i / 4, rtol=0.05)
    np.testing.assert_array_equal(noisy, P.feature_noise(x, part, sigma=2.0, seed=1))
    np.testing.assert_array_equal(x, 1.0)  # the input is not modified


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: P.pathological(LABELS, 4, 5), "classes_per_client"),
        (lambda: P.pathological(LABELS, 0, 1), "num_clients"),
        (lambda: P.inner_dirichlet(LABELS, 4, 0.0), "alpha"),
        (lambda: P.inner_dirichlet(LABELS, 4, 1.0, sizes=[5, 5, 5]), "sizes"),
        (lambda: P.inner_dirichlet(LABELS, 2, 1.0, sizes=[15, 6]), "sizes"),
        (lambda: P.size_skew(20, 4, "cubic"), "kind"),
        (lambda: P.size_skew(20, 4, "exponential", ratio=0.5), "ratio"),
        (lambda: P.size_skew(20, 4, min_size=6), "min_size"),
        (lambda: P.feature_noise(np.zeros((4, 2)), [np.arange(4)], -1.0), "sigma"),
        (lambda: P.feature_noise(np.zeros((4, 2)), [np.arange(5)], 1.0), "partition"),
        (lambda: P.feature_noise(np.array(["a"]), [np.arange(1)], 1.0), "x"),
    ],
)
def test_new_partitioners_name_the_bad_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
