"""Checkpoints: bit-exact round trips, keep/latest, refusals, corruption and a killed writer."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import init_params, loss_fn

import fedjax_lab as fl
from fedjax_lab import checkpoint

NUM_CLIENTS = 10


def _bits(x) -> np.ndarray:
    """The raw bytes of a leaf (typed keys by their key data): equal bits, not equal values."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.frombuffer(np.ascontiguousarray(np.asarray(x)).tobytes(), np.uint8)


def _assert_bit_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert isinstance(y, jax.Array)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _run_state(seed: int = 0) -> dict:
    """A realistic full run state: FedAdam server state with non-trivial optimiser moments,
    per-client state ``[num_clients, ...]``, the run's typed key and a metrics history."""
    alg = fl.algorithms.fed_adam(loss_fn, server_learning_rate=0.05)
    state = alg.init(init_params(seed))
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x + 3,
        state,
    )
    w = np.asarray(noisy.params["w"]).copy()
    w[0, 0], w[0, 1] = -0.0, np.nan  # signed zero and NaN must survive bit for bit
    client_states = {
        "control": jnp.asarray(rng.normal(size=(NUM_CLIENTS, 4, 3)), jnp.float32),
        "participation": jnp.arange(NUM_CLIENTS, dtype=jnp.int32),
    }
    state = noisy._replace(
        params={**noisy.params, "w": jnp.asarray(w)},
        round=jnp.int32(7),
        client_states=client_states,
    )
    return {
        "state": state,
        "key": jax.random.fold_in(jax.random.key(seed), 7),
        "round": jnp.int32(7),
        "history": {
            "train_loss": jnp.asarray(rng.normal(size=7), jnp.float32),
            "num_examples": jnp.arange(7, dtype=jnp.int32),
            "mixed": jnp.ones((7, 2), jnp.bfloat16),
        },
    }


METADATA = {"label": "fedadam", "config": {"rounds": 20, "lr": 0.05}, "rows": [{"loss": 1.5}]}


def test_round_trip_of_a_full_run_state_is_bit_identical(tmp_path):
    tree = _run_state()
    checkpoint.save(tmp_path, 7, tree, metadata=METADATA)
    # `like` as abstract shapes, and as a freshly initialised state (the resume path).
    for like in (jax.eval_shape(lambda: tree), _run_state(seed=1)):
        back, meta, step = checkpoint.restore(tmp_path, like)
        assert step == 7 and meta == METADATA
        _assert_bit_identical(tree, back)
        assert isinstance(back["state"], fl.ServerState)
        assert back["state"].round.dtype == jnp.int32
        assert back["key"].dtype == tree["key"].dtype  # typed key, re-wrapped
        assert jax.random.key_impl(back["key"]) == jax.random.key_impl(tree["key"])
        assert checkpoint.params_sha256(back) == checkpoint.params_sha256(tree)
    # The restored key draws the same numbers.
    np.testing.assert_array_equal(
        jax.random.normal(back["key"], (3,)), jax.random.normal(tree["key"], (3,))
    )


def test_round_trip_of_edge_leaves(tmp_path):
    tree = {"empty": (), "none": None, "zero_size": jnp.zeros((0, 3)), "scalar": 2.5,
            "keys": jax.random.split(jax.random.key(1), 4), "u8": np.arange(5, dtype=np.uint8)}
    checkpoint.save(tmp_path, 0, tree)
    back, meta, step = checkpoint.restore(tmp_path, tree)
    assert (meta, step) == ({}, 0)
    _assert_bit_identical(jax.tree.map(jnp.asarray, tree), back)
    checkpoint.save(tmp_path, 1, {})
    assert checkpoint.restore(tmp_path, {}) == ({}, {}, 1)


def test_params_sha256_matches_a_hashlib_transcription_and_sees_every_bit():
    tree = {"b": jnp.arange(3, dtype=jnp.int32), "w": jnp.ones((2, 2), jnp.float32)}
    h = hashlib.sha256(b"fedjax_lab.checkpoint/1|2 leaves;")
    for x in (np.arange(3, dtype=np.int32), np.ones((2, 2), np.float32)):  # tree order: b, w
        h.update(f"{x.dtype.str}|{x.dtype.name}|{x.shape};".encode() + x.tobytes())
    digest = checkpoint.params_sha256(tree)
    assert digest == h.hexdigest()
    flipped = np.ones((2, 2), np.float32)
    flipped.view(np.uint32)[1, 1] ^= 1  # one bit of one leaf
    variants = [
        {**tree, "w": jnp.asarray(flipped)},
        {**tree, "w": jnp.ones((4,), jnp.float32)},  # same bytes, other shape
        {**tree, "b": jnp.arange(3, dtype=jnp.uint32)},  # same bytes, other dtype
        [tree["w"], tree["b"]],  # other order
    ]
    assert len({digest, *map(checkpoint.params_sha256, variants)}) == 1 + len(variants)
    assert checkpoint.params_sha256(jnp.zeros(2)) != checkpoint.params_sha256(-jnp.zeros(2))


def test_latest_step_and_keep(tmp_path):
    assert checkpoint.latest_step(tmp_path) is None
    assert checkpoint.latest_step(tmp_path / "missing") is None
    for s in (0, 1, 2, 5, 9):
        checkpoint.save(tmp_path, s, {"x": jnp.full(3, s)}, metadata={"s": s}, keep=2)
        assert checkpoint.latest_step(tmp_path) == s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "9"]
    back, meta, step = checkpoint.restore(tmp_path, {"x": jnp.zeros(3, jnp.int32)}, step=5)
    assert (back["x"].tolist(), meta, step) == ([5, 5, 5], {"s": 5}, 5)
    assert checkpoint.restore(tmp_path, {"x": jnp.zeros(3, jnp.int32)})[2] == 9
    with pytest.raises(ValueError, match=r"step: 2 is not a complete checkpoint"):
        checkpoint.restore(tmp_path, {"x": jnp.zeros(3, jnp.int32)}, step=2)


def test_saving_an_existing_or_older_step_raises_and_keeps_the_old_one(tmp_path):
    like = {"x": jnp.zeros(2)}
    checkpoint.save(tmp_path, 4, {"x": jnp.ones(2)}, metadata={"v": 1})
    with pytest.raises(ValueError, match=r"step: 4 is already saved"):
        checkpoint.save(tmp_path, 4, {"x": jnp.full(2, 9.0)}, metadata={"v": 2})
    with pytest.raises(ValueError, match=r"step: 3 is older than the newest step 4"):
        checkpoint.save(tmp_path, 3, {"x": jnp.full(2, 9.0)})
    back, meta, _ = checkpoint.restore(tmp_path, like)
    assert back["x"].tolist() == [1.0, 1.0] and meta == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step": -1}, ValueError, r"step: expected a non-negative int"),
        ({"step": 1.0}, ValueError, r"step: expected a non-negative int"),
        ({"keep": 0}, ValueError, r"keep: expected an int >= 1"),
        ({"metadata": {"a": np.ones(2)}}, ValueError, r"metadata: must be JSON-serialisable"),
        ({"metadata": [1]}, ValueError, r"metadata: expected a JSON-serialisable dict"),
        ({"tree": {"name": "fedavg"}}, TypeError, r"leaf \['name'\]: expected an array"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, error, match):
    args = {"step": 1, "tree": {"x": jnp.ones(2)}, **kwargs}
    with pytest.raises(error, match=match):
        checkpoint.save(tmp_path, args.pop("step"), args.pop("tree"), **args)
    assert checkpoint.latest_step(tmp_path) is None  # nothing was written


def test_a_directory_that_is_a_file_raises(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a checkpoint")
    for call in (lambda: checkpoint.save(f, 1, {"x": jnp.ones(1)}),
                 lambda: checkpoint.restore(f, {"x": jnp.ones(1)}),
                 lambda: checkpoint.latest_step(f)):
        with pytest.raises(ValueError, match=r"directory: .* is a file"):
            call()
    with pytest.raises(ValueError, match=r"directory: .* holds no complete checkpoint"):
        checkpoint.restore(tmp_path / "empty", {"x": jnp.ones(1)})


@pytest.mark.parametrize(
    "like, match",
    [
        ({"a": {"w": jnp.zeros((2, 4))}, "k": jax.random.key(0)},
         r"leaf \['a'\]\['w'\] is float32\(2, 3\) in the checkpoint but float32\(2, 4\)"),
        ({"a": {"w": jnp.zeros((2, 3), jnp.bfloat16)}, "k": jax.random.key(0)},
         r"leaf \['a'\]\['w'\] is float32\(2, 3\) in the checkpoint but bfloat16\(2, 3\)"),
        ({"a": {"w": jnp.zeros((2, 3))}, "k": jax.random.key_data(jax.random.key(0))},
         r"leaf \['k'\] is key<fry>\(\) in the checkpoint but uint32\(2,\)"),
        ({"a": {"v": jnp.zeros((2, 3))}, "k": jax.random.key(0)},
         r"leaf #0 is \['a'\]\['w'\] in the checkpoint but \['a'\]\['v'\] in `like`"),
        ({"a": {"w": jnp.zeros((2, 3))}},
         r"holds 2 leaves but `like` has 1; first unmatched leaf \['k'\] \(only in the checkp"),
        ({"a": {"w": jnp.zeros((2, 3))}, "k": jax.random.key(0), "z": jnp.zeros(1)},
         r"holds 2 leaves but `like` has 3; first unmatched leaf \['z'\] \(only in `like`\)"),
    ],
    ids=["shape", "dtype", "key-vs-raw", "renamed", "missing", "extra"],
)
def test_mismatched_like_names_the_leaf(tmp_path, like, match):
    checkpoint.save(tmp_path, 1, {"a": {"w": jnp.ones((2, 3))}, "k": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"mismatched checkpoint .*" + match):
        checkpoint.restore(tmp_path, like)


def _largest_file(root: Path) -> Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble(p: Path) -> None:  # same length, bytes in the middle flipped
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0x5A for b in data[mid : mid + 64])
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "target, damage",
    [("arrays", _truncate), ("arrays", _garble), ("manifest", _garble),
     ("manifest", lambda p: p.write_text("{not json")),
     ("manifest", lambda p: p.write_text('{"format": "fedjax_lab.checkpoint/1"}'))],
    ids=["truncated-data", "garbled-data", "garbled-manifest", "manifest-not-json",
         "manifest-incomplete"],
)
def test_a_corrupt_checkpoint_raises_and_is_left_in_place(tmp_path, target, damage):
    tree = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)}
    checkpoint.save(tmp_path, 1, jax.tree.map(jnp.zeros_like, tree))
    checkpoint.save(tmp_path, 2, tree)
    victim = _largest_file(tmp_path / "2" / target)
    damage(victim)
    damaged = victim.read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint .*2 is corrupt \(.*\); it was left in pl"):
        checkpoint.restore(tmp_path, tree)
    assert victim.read_bytes() == damaged  # neither deleted nor rewritten
    assert checkpoint.latest_step(tmp_path) == 2
    back, _, step = checkpoint.restore(tmp_path, tree, step=1)  # the older step still reads
    assert step == 1 and not back["w"].any()


def test_a_truncated_array_file_is_reported_without_library_internals(tmp_path):
    tree = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)}
    checkpoint.save(tmp_path, 3, tree)
    _truncate(_largest_file(tmp_path / "3" / "arrays"))
    with pytest.raises(checkpoint.CorruptCheckpoint) as info:
        checkpoint.restore(tmp_path, tree)
    msg = str(info.value)
    assert info.value.step == 3 and "unreadable arrays" in info.value.reason
    assert "\n" not in msg and len(msg) < 600
    for noise in ("pybind", "TensorStore details", "bound method", "'driver'"):
        assert noise not in msg


def _edit_manifest(step_dir: Path, edit) -> None:
    """Rewrites the manifest as valid JSON with ``edit`` applied (the digests left alone)."""
    f = step_dir / "manifest" / "metadata"
    manifest = json.loads(f.read_text())
    edit(manifest)
    f.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda m: m["metadata"]["rows"][0].update(loss=0.01), "manifest's SHA-256 differs"),
        (lambda m: m["metadata"]["config"].update(lr=0.5), "manifest's SHA-256 differs"),
        (lambda m: m["metadata"].update(extra=1), "manifest's SHA-256 differs"),
        (lambda m: m["leaves"][0].update(path="['v']"), "manifest's SHA-256 differs"),
        (lambda m: m.pop("manifest_sha256"), "manifest carries no manifest_sha256"),
    ],
    ids=["forged-history", "forged-config", "added-key", "renamed-leaf", "digest-removed"],
)
def test_an_edited_manifest_is_corrupt(tmp_path, edit, reason):
    """The digest covers the whole manifest: metadata edits in still-valid JSON are caught."""
    tree = {"w": jnp.arange(4.0)}
    checkpoint.save(tmp_path, 1, tree, metadata=METADATA)
    checkpoint.save(tmp_path, 2, tree, metadata=METADATA)
    _edit_manifest(tmp_path / "2", edit)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"2 is corrupt \((the )?" + reason):
        checkpoint.restore(tmp_path, tree)
    assert checkpoint.complete_steps(tmp_path) == [1, 2]  # left in place
    assert checkpoint.restore(tmp_path, tree, step=1)[1] == METADATA


_WRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp, numpy as np
    from fedjax_lab import checkpoint
    directory, mb = sys.argv[1], int(sys.argv[2])
    checkpoint.save(directory, 1, {"w": jnp.arange(16.0)}, metadata={"step": 1})
    x = np.random.default_rng(0).standard_normal((16, mb * 2**20 // 64), dtype=np.float32)
    big = {"w": jnp.arange(16.0), "big": [jnp.asarray(row) for row in x]}
    print("saving step 2", flush=True)
    checkpoint.save(directory, 2, big, metadata={"step": 2})
    print("done", flush=True)
    """
)


def test_a_writer_killed_mid_save_leaves_the_last_good_step(tmp_path):
    """SIGKILL a real process while orbax writes step 2: step 1 survives, step 2 is invisible."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    for attempt, mb in enumerate((128, 256, 512)):
        directory = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), str(mb)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        try:
            assert proc.stdout.readline().strip() == "saving step 2"
            deadline = time.monotonic() + 30
            while not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir()):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)  # the write of step 2 is under way
        finally:
            proc.kill()
            proc.wait()
        if checkpoint.latest_step(directory) == 1:
            break  # killed mid-write (else step 2 finished just before the kill: retry bigger)
    else:
        pytest.fail("the writer always finished step 2 before it could be killed")
    leftovers = [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and sorted(p.name for p in directory.iterdir() if p not in leftovers) == ["1"]

    like = {"w": jnp.zeros(16)}
    back, meta, step = checkpoint.restore(directory, like)
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(back["w"], np.arange(16.0, dtype=np.float32))
    assert all(p.exists() for p in leftovers)  # restore touches nothing

    # The resumed run saves step 2 again; the killed writer's leftovers are cleaned up.
    checkpoint.save(directory, 2, {"w": jnp.ones(16)}, metadata={"step": 2})
    assert checkpoint.latest_step(directory) == 2
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
    assert checkpoint.restore(directory, like)[0]["w"].tolist() == [1.0] * 16


def test_nothing_is_pickled(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    tree = {"w": jnp.ones((2, 2)), "k": jax.random.key(0)}
    checkpoint.save(tmp_path, 3, tree, metadata={"a": [1, 2]})
    back, meta, _ = checkpoint.restore(tmp_path, tree)
    _assert_bit_identical(tree, back)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not any(p.suffix in {".pkl", ".pickle", ".npy"} for p in files)
    assert json.loads((tmp_path / "3" / "manifest" / "metadata").read_text())["metadata"] == meta
