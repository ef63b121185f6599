"""Reddi et al. (2021) reproduction recipes, the Stack Overflow reader and the word LSTM."""

from __future__ import annotations

import collections
import copy
import json
import math
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import experiment as exp_lib
from fedjax_lab.data import datasets as D
from fedjax_lab.models import classification_loss, classification_metrics, num_params
from fedjax_lab.models.text import word_lstm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES = Path(__file__).resolve().parents[1] / "experiments" / "reddi"
NAMES = [
    "emnist62_cnn_fedadam",
    "emnist62_cnn_fedyogi",
    "emnist62_cnn_fedavg",
    "shakespeare_lstm_fedadam",
    "stackoverflow_nwp_fedadam",
    "cifar100_resnet_fedadam",
]

# The authors' "best hyperparameters" tables (log10 client lr, log10 server lr, log10 tau).
PAPER = {
    "emnist62_cnn_fedadam": (-1.5, -2.5, -4),
    "emnist62_cnn_fedyogi": (-1.5, -2.5, -4),
    "emnist62_cnn_fedavg": (-1.0, 0.0, None),
    "shakespeare_lstm_fedadam": (0.0, -2.0, -3),
    "stackoverflow_nwp_fedadam": (-0.5, -2.0, -5),
    "cifar100_resnet_fedadam": (-1.5, 0.0, -1),
}
# (clients per round, batch size, rounds, task)
SCHEDULE = {
    "emnist62_cnn_fedadam": (10, 20, 1500, "emnist"),
    "emnist62_cnn_fedyogi": (10, 20, 1500, "emnist"),
    "emnist62_cnn_fedavg": (10, 20, 1500, "emnist"),
    "shakespeare_lstm_fedadam": (10, 4, 1200, "shakespeare"),
    "stackoverflow_nwp_fedadam": (50, 16, 1500, "stackoverflow"),
    "cifar100_resnet_fedadam": (10, 20, 4000, "cifar100"),
}


def _recipe(name: str) -> dict:
    with open(RECIPES / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates_with_the_papers_settings(name):
    raw = _recipe(name)
    model = raw["model"]
    if model["name"] == "word_lstm" and "word_lstm" not in exp_lib._MODELS:
        # Until the CLI registers word_lstm: its options must be word_lstm's, the rest validates.
        import inspect

        allowed = set(inspect.signature(word_lstm).parameters)
        assert set(model) - {"name"} <= allowed
        probe = copy.deepcopy(raw)
        probe["model"] = {"name": "char_lstm"}
        cfg = exp_lib.validate(probe)
    else:
        cfg = exp_lib.validate(raw)
        assert cfg["model"]["name"] == model["name"]
    cohort, batch, rounds, task = SCHEDULE[name]
    t = cfg["training"]
    assert (t["cohort_size"], t["batch_size"], t["rounds"], t["epochs"]) == (
        cohort, batch, rounds, 1
    )
    assert "local_steps" not in t and t["seed"] == 1
    assert cfg["data"]["name"] == "tff_h5" and cfg["data"]["task"] == task
    assert cfg["data"]["train_path"].startswith("/path/to/")
    (alg,) = cfg["algorithms"]
    client, server, tau = PAPER[name]
    assert alg.get("client_optimizer", "sgd") == "sgd"
    assert math.isclose(math.log10(alg["client_learning_rate"]), client, abs_tol=1e-9)
    assert math.isclose(math.log10(alg["server_learning_rate"]), server, abs_tol=1e-9)
    if tau is None:
        assert "tau" not in alg
    else:
        assert math.isclose(math.log10(alg["tau"]), tau, abs_tol=1e-9)


def test_readme_names_every_recipe():
    text = (RECIPES / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.toml" in text
    assert "fedjax-lab run experiments/reddi/emnist62_cnn_fedadam.toml --out runs/emnist" in text


def _write_emnist(path: Path, sizes: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for cid, n in sizes.items():
            f[f"examples/{cid}/pixels"] = rng.random((n, 28, 28), dtype=np.float32)
            f[f"examples/{cid}/label"] = rng.integers(0, 62, n).astype(np.int32)


def test_emnist_recipe_runs_end_to_end_on_a_tiny_tff_file(tmp_path):
    from fedjax_lab import cli

    sizes = {f"f{i:04d}_00": n for i, n in enumerate([7, 12, 5, 9])}
    _write_emnist(tmp_path / "train.h5", sizes, 0)
    _write_emnist(tmp_path / "test.h5", {k: 3 for k in sizes}, 1)
    cfg = _recipe("emnist62_cnn_fedadam")
    cfg["data"].update(train_path=str(tmp_path / "train.h5"), test_path=str(tmp_path / "test.h5"))
    cfg["model"].update(features=[2, 4], dense=8)  # tiny: the compile dominates
    cfg["training"].update(rounds=2, cohort_size=2, batch_size=4, client_map="sequential")
    cfg["evaluation"] = {"every": 2, "batch_size": 16}
    cfg["checkpoint"] = {"every": 2, "keep": 1}
    summary = cli.run_experiment(cfg, tmp_path / "run", progress=False)
    run = summary["runs"]["fedadam"]
    assert run["rounds"] == 2 and np.isfinite(run["test_loss"])
    assert 0.0 <= run["test_accuracy"] <= 1.0
    rows = [json.loads(r) for r in (tmp_path / "run" / "fedadam" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and r["num_examples"] > 0 for r in rows)
    tau = summary["config"]["algorithms"][0]["tau"]
    assert tau == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- stack overflow
SO_TRAIN = {
    "00000012": [b"how to sort a list in python", b"sort a list", b""],
    "00000003": [b"python list comprehension", b"a b c d e f g h i j k l"],
    "00000100": [],  # no sentence: dropped
    "00000007": [b"the list is empty"],
}
SO_TEST = {"00000001": [b"sort the list in python", b"zebra list"]}


def _write_so(path: Path, clients: dict[str, list[bytes]]) -> None:
    with h5py.File(path, "w") as f:
        for cid, sentences in clients.items():
            f.create_dataset(
                f"examples/{cid}/tokens", data=np.array(sentences, dtype=object),
                dtype=h5py.string_dtype("ascii"), shape=(len(sentences),),
            )
            f.create_dataset(
                f"examples/{cid}/tags", data=np.array([b"python"] * len(sentences), object),
                dtype=h5py.string_dtype("ascii"), shape=(len(sentences),),
            )
            f[f"examples/{cid}/score"] = np.arange(len(sentences), dtype=np.int64)


def _reference(sentences, words, vocab_size, seq_len):
    """TFF's to_ids + split, transcribed independently: ids, +BOS/EOS, pad to L+1, shift."""
    index = {w: i + 1 for i, w in enumerate(words)}
    oov, bos, eos = vocab_size + 1, vocab_size + 2, vocab_size + 3
    out = np.zeros((len(sentences), seq_len + 1), np.int64)
    for r, s in enumerate(sentences):
        toks = [index.get(w, oov) for w in s.decode().split(" ") if w][:seq_len]
        full = np.array([bos, *toks, *([eos] if len(toks) < seq_len else [])])
        out[r, : len(full)] = full
    return out[:, :seq_len], out[:, 1:]


@pytest.fixture(scope="module")
def so_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("so")
    _write_so(d / "train.h5", SO_TRAIN)
    _write_so(d / "test.h5", SO_TEST)
    return d


def test_stackoverflow_vocab_counts_the_train_file(so_files):
    counts = collections.Counter(
        w for ss in SO_TRAIN.values() for s in ss for w in s.decode().split()
    )
    want = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:6]
    vocab = D.stackoverflow_vocab(so_files / "train.h5", vocab_size=6)
    assert list(vocab.words) == want == ["list", "a", "python", "sort", "b", "c"]
    assert (vocab.oov_id, vocab.bos_id, vocab.eos_id, vocab.size) == (7, 8, 9, 10)


@pytest.mark.parametrize("seq_len", [4, 20])
def test_stackoverflow_encoding_matches_tff_and_round_trips(so_files, seq_len):
    V = 6
    data = D.load_tff_h5(so_files / "train.h5", "stackoverflow", seq_len=seq_len, vocab_size=V)
    vocab = D.stackoverflow_vocab(so_files / "train.h5", vocab_size=V)
    assert data.client_names == ("00000003", "00000007", "00000012")  # sorted, empty dropped
    assert data.client_sizes.tolist() == [2, 1, 3]
    for i, cid in enumerate(data.client_names):
        c = data.client(i)
        x, y = _reference(SO_TRAIN[cid], vocab.words, V, seq_len)
        np.testing.assert_array_equal(c["x"], x)
        np.testing.assert_array_equal(c["y"], y)
        assert c["x"].dtype == np.int32 and c["x"].shape[1:] == (seq_len,)
        np.testing.assert_array_equal(c["x"][:, 1:], c["y"][:, :-1])  # y is x shifted
    # Round trip: a sentence of in-vocabulary words decodes back; unknown words become OOV.
    x, y = D.encode_words(["sort a list", "python is a list"], vocab, seq_len=seq_len)
    assert D.decode_words(y[0], vocab) == "sort a list"
    assert D.decode_words(x[1], vocab) == " ".join(["python", "<oov>", "a", "list"][: seq_len - 1])
    assert x[0, 0] == vocab.bos_id and y[0, 3] == (vocab.eos_id if seq_len > 3 else 1)


def test_stackoverflow_truncation_and_empty_sentence():
    vocab = D.WordVocab(["a", "b"], vocab_size=10)  # oov 11, bos 12, eos 13
    x, y = D.encode_words(["a b a b a", "", "b"], vocab, seq_len=3)
    assert x.tolist() == [[12, 1, 2], [12, 13, 0], [12, 2, 13]]
    assert y.tolist() == [[1, 2, 1], [13, 0, 0], [2, 13, 0]]  # no EOS after a cut sentence


def test_stackoverflow_test_file_shares_the_train_vocabulary(so_files, tmp_path):
    V = 5
    train_vocab = D.stackoverflow_vocab(so_files / "train.h5", V)
    test = D.load_tff_h5(so_files / "test.h5", "stackoverflow", vocab_size=V,
                         vocab_path=so_files / "train.h5")
    x, y = _reference(SO_TEST["00000001"], train_vocab.words, V, 20)
    np.testing.assert_array_equal(test.examples["x"], x)
    assert test.examples["x"].shape == (2, 20)  # default seq_len 20
    # Both text formats give the same ids; a short list keeps the V-based special ids.
    (tmp_path / "words.txt").write_text("\n".join(train_vocab.words) + "\n")
    counts = "".join(f"{w} {100 - i}\n" for i, w in enumerate(train_vocab.words))
    (tmp_path / "word_count").write_text(counts + "zebra 1\n")
    for vp in ("words.txt", "word_count"):
        got = D.load_tff_h5(so_files / "test.h5", "stackoverflow", vocab_size=V,
                            vocab_path=tmp_path / vp)
        np.testing.assert_array_equal(got.examples["y"], test.examples["y"])
    short = D.load_tff_h5(so_files / "test.h5", "stackoverflow", vocab_size=V,
                          vocab_path=tmp_path / "word_count", max_sentences_per_client=1)
    assert short.num_examples == 1
    wide = D.load_tff_h5(so_files / "test.h5", "stackoverflow", vocab_size=50,
                         vocab_path=tmp_path / "word_count")  # only 6 words listed
    assert wide.examples["x"][0, 0] == 52 and wide.examples["y"][1, 0] == 6  # bos, "zebra"


def test_stackoverflow_malformed_inputs_raise(so_files, tmp_path):
    with h5py.File(tmp_path / "no_tokens.h5", "w") as f:
        f["examples/u1/title"] = np.array([b"x"], object)
    with pytest.raises(ValueError, match="missing 'examples/u1/tokens'"):
        D.load_tff_h5(tmp_path / "no_tokens.h5", "stackoverflow")
    with h5py.File(tmp_path / "numeric.h5", "w") as f:
        f["examples/u1/tokens"] = np.arange(3.0)
    with pytest.raises(ValueError, match="tokens' should be byte strings"):
        D.load_tff_h5(tmp_path / "numeric.h5", "stackoverflow", vocab_path=tmp_path / "numeric.h5")
    with h5py.File(tmp_path / "matrix.h5", "w") as f:
        f.create_dataset("examples/u1/tokens", data=np.array([[b"a"]], object),
                         dtype=h5py.string_dtype("ascii"))
    with pytest.raises(ValueError, match="1-D array"):
        D.load_tff_h5(tmp_path / "matrix.h5", "stackoverflow")
    (tmp_path / "bad.txt").write_text("the 10\nof many words\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'word' or 'word count'"):
        D.stackoverflow_vocab(tmp_path / "bad.txt")
    (tmp_path / "dup.txt").write_text("the\nof\nthe\n")
    with pytest.raises(ValueError, match="listed twice"):
        D.stackoverflow_vocab(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no word"):
        D.stackoverflow_vocab(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="vocab_path: .* is not a file"):
        D.load_tff_h5(so_files / "train.h5", "stackoverflow", vocab_path=tmp_path / "nope")
    with pytest.raises(ValueError, match="vocab_size: must be a positive integer"):
        D.stackoverflow_vocab(so_files / "train.h5", vocab_size=0)
    with pytest.raises(ValueError, match="only for task 'stackoverflow'"):
        D.load_tff_h5(so_files / "train.h5", "emnist", vocab_path=tmp_path / "dup.txt")
    with pytest.raises(ValueError, match="max_sentences_per_client"):
        D.load_tff_h5(so_files / "train.h5", "stackoverflow", max_sentences_per_client=0)
    with pytest.raises(TypeError, match="vocab: expected a WordVocab"):
        D.encode_words(["a"], ["a"])
    assert "stackoverflow" in D.TFF_TASKS


# ----------------------------------------------------------------------------- word LSTM
def test_word_lstm_has_the_papers_size_and_layers():
    shapes = jax.eval_shape(word_lstm().init, jax.random.key(0))
    v, e, h, d = 10004, 96, 670, 96
    want = v * e + 4 * (e * h + h * h + h) + (h * d + d) + (d * v + v)
    assert num_params(shapes) == want == 4_050_748
    assert shapes["Dense_1"]["kernel"].shape == (d, v)
    with pytest.raises(ValueError, match="hidden: must be a positive integer"):
        word_lstm(hidden=0)


def test_word_lstm_trains_on_stackoverflow_windows(so_files):
    V = 6
    train = D.load_tff_h5(so_files / "train.h5", "stackoverflow", seq_len=8, vocab_size=V)
    model = word_lstm(vocab_size=V + 4, embed=8, hidden=16, dense=8)
    loss_fn = classification_loss(model, pad_id=D.STACKOVERFLOW_PAD_ID)
    eval_fn = classification_metrics(model, pad_id=D.STACKOVERFLOW_PAD_ID)
    params = model.init(jax.random.key(0))
    # Padding positions do not count: real target positions = nonzero y.
    batch = {k: jnp.asarray(v) for k, v in train.examples.items()}
    batch["mask"] = jnp.ones(len(batch["y"]))
    m = eval_fn(params, batch)
    assert float(m["num_examples"]) == float(np.count_nonzero(train.examples["y"]))
    step = jax.jit(jax.value_and_grad(loss_fn))
    key = jax.random.key(1)
    losses = []
    for _ in range(5):  # a few full-batch SGD steps: the padded windows are learnable
        loss, grads = step(params, batch, key)
        params = jax.tree.map(lambda p, g: p - 1.0 * g, params, grads)
        losses.append(float(loss))
    after = eval_fn(params, batch)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(after["loss_sum"]) < float(m["loss_sum"])
    # The mean loss is the metrics' sum over real positions divided by their count.
    np.testing.assert_allclose(losses[0], float(m["loss_sum"] / m["num_examples"]), rtol=1e-5)
