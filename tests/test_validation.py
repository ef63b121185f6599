"""Dataset validation at the boundary: bad labels, shapes, keys and counts fail on the host.

Every check here runs before anything compiles: :func:`compiles` counts XLA compilations with
``jax.monitoring`` and the bad-data tests assert that none happened.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab import experiment
from fedjax_lab.data import _validate, datasets, partition, sampling

_EVENT = "/jax/core/compile/backend_compile_duration"
_COUNTS: list[list[int]] = []


def _on_event(event, duration, **kw):
    if event == _EVENT and _COUNTS:
        _COUNTS[-1][0] += 1


@pytest.fixture(scope="module", autouse=True)
def _listener():
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    yield
    jax.monitoring.unregister_event_duration_listener(_on_event)


@contextlib.contextmanager
def compiles():
    """Counts the XLA programs compiled inside the block: ``with compiles() as n: ...; n[0]``."""
    _COUNTS.append([0])
    try:
        yield _COUNTS[-1]
    finally:
        _COUNTS.pop()


MODEL = fl.models.mlp((8, 8, 1), hidden=(4,), num_classes=10)
LOSS = fl.models.classification_loss(MODEL)
METRICS = fl.models.classification_metrics(MODEL)


def digits_like(y, x=None, sizes=(3, 3, 2)):
    """Three clients (3, 3, 2 examples) of 8x8x1 images with labels ``y``."""
    y = np.asarray(y)
    x = np.zeros((len(y), 8, 8, 1), np.float32) if x is None else x
    return fl.FederatedData.from_offsets({"x": x, "y": y}, np.cumsum([0, *sizes]))


GOOD_Y = np.array([0, 1, 2, 3, 4, 5, 6, 9], np.int32)


def check_fails(data, *patterns, fn=LOSS):
    with compiles() as n, pytest.raises(ValueError) as info:
        fl.models.check_data(fn, data)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, msg
    assert n[0] == 0, "the check compiled something"
    return msg


def test_compile_counter_sees_compiles():
    with compiles() as n:
        jax.jit(lambda a: a * 3 + 1)(jnp.arange(5.0)).block_until_ready()
    assert n[0] >= 1


def test_labels_shifted_by_num_classes():
    msg = check_fails(digits_like(GOOD_Y + 10), "examples['y']: client 0", "out-of-range label 10",
                      "8 of 8 labels are bad", "[0, 10)", "num_classes >= 20")
    assert "its example 0" in msg


def test_negative_label():
    y = GOOD_Y.copy()
    y[4] = -1  # client 1, its example 1
    check_fails(digits_like(y), "client 1 holds the negative label -1", "its example 1",
                "drop or remap negative labels")


def test_non_integral_float_label():
    y = GOOD_Y.astype(np.float32)
    y[6] = 2.7  # client 2, its example 0
    check_fails(digits_like(y), "client 2 holds the non-integral label 2.7", "whole numbers")


def test_nan_label_is_non_integral():
    y = GOOD_Y.astype(np.float64)
    y[0] = np.nan
    check_fails(digits_like(y), "client 0 holds the non-integral label nan")


def test_one_client_with_label_99_is_named():
    y = GOOD_Y.copy()
    y[7] = 99  # the last client, its second example
    names = ("alice", "bob", "carol")
    data = digits_like(y)._replace(client_names=names)
    check_fails(data, "client 2 ('carol') holds the out-of-range label 99", "its example 1",
                "1 of 8 labels", "num_classes >= 100")


def test_integral_float_and_int_labels_pass_and_return_the_data():
    for y in (GOOD_Y, GOOD_Y.astype(np.float32), GOOD_Y.astype(np.int64)):
        data = digits_like(y)
        with compiles() as n:
            assert fl.models.check_data(LOSS, data) is data
            assert data.check_labels(10) is data
        assert n[0] == 0


def test_wrong_width_flat_x_for_8x8x1_mlp():
    x = np.zeros((8, 63), np.float32)
    check_fails(digits_like(GOOD_Y, x), "examples['x']: one example has shape (63,)",
                "built for (8, 8, 1) (64 values)", "flattened (64,)", "input_shape=(63,)")


def test_flat_and_squeezed_x_pass_channels_first_fails():
    for shape in ((64,), (8, 8)):
        data = digits_like(GOOD_Y, np.zeros((8, *shape), np.float32))
        assert fl.models.check_data(LOSS, data) is data
    check_fails(digits_like(GOOD_Y, np.zeros((8, 1, 8, 8), np.float32)), "shape (1, 8, 8)")
    flat_model = fl.models.classification_loss(fl.models.mlp((64,), hidden=(4,)))
    images = digits_like(GOOD_Y)
    assert fl.models.check_data(flat_model, images) is images  # a flat model flattens
    check_fails(digits_like(GOOD_Y, np.zeros((8, 9, 7), np.float32)), "shape (9, 7)",
                fn=flat_model)


def test_missing_y_lists_present_keys():
    data = fl.FederatedData.from_offsets(
        {"x": np.zeros((8, 64), np.float32), "label": GOOD_Y}, [0, 4, 8])
    msg = check_fails(data, "missing the key 'y' needed by classification_loss",
                      "['label', 'x']")
    assert "KeyError" not in msg
    check_fails(data, "needed by classification_metrics", fn=METRICS)


def test_one_hot_labels_refused_with_the_fix():
    data = digits_like(np.eye(10, dtype=np.int32)[GOOD_Y])
    check_fails(data, "examples['y']: need one integer class per example", "y.argmax(-1)")


def test_token_ids_and_labels_of_a_sequence_model():
    lm = fl.models.char_lstm(vocab_size=7, embed=2, hidden=3, num_layers=1)
    loss = fl.models.classification_loss(lm, pad_id=0)
    x = np.array([[1, 2, 3], [4, 5, 6]])
    ok = fl.FederatedData.from_offsets({"x": x, "y": x % 7}, [0, 1, 2])
    assert fl.models.check_data(loss, ok) is ok
    bad_x = fl.FederatedData.from_offsets({"x": x + 1, "y": x}, [0, 1, 2])
    check_fails(bad_x, "examples['x']: client 1 holds the out-of-range token id 7",
                "vocab_size >= 8", fn=loss)
    bad_y = fl.FederatedData.from_offsets({"x": x, "y": x[:, :2]}, [0, 1, 2])
    check_fails(bad_y, "y must have the shape of x (2, 3)", fn=loss)


def test_model_without_spec_reads_num_classes_from_a_trace():
    import flax.linen as nn

    model = fl.models.from_flax(nn.Dense(3), jnp.zeros((1, 4)))
    assert model.spec is None
    data = fl.FederatedData.from_offsets(
        {"x": np.zeros((3, 4), np.float32), "y": np.array([0, 2, 5])}, [0, 2, 3])
    check_fails(data, "client 1 holds the out-of-range label 5", "[0, 3)",
                fn=fl.models.classification_metrics(model))


def test_hand_written_loss_declares_nothing():
    data = digits_like(GOOD_Y + 10)
    assert fl.models.check_data(lambda p, b, k: 0.0, data) is data
    with pytest.raises(TypeError, match="data: expected a fl.FederatedData"):
        fl.models.check_data(LOSS, {"x": 1})


def test_valid_data_is_scanned_once(monkeypatch):
    calls = []
    scan = _validate._scan_ints
    monkeypatch.setattr(_validate, "_scan_ints", lambda *a: calls.append(1) or scan(*a))
    data = digits_like(GOOD_Y.copy())
    for _ in range(3):  # three rounds' worth of checks, from the loss and the metrics
        fl.models.check_data(LOSS, data)
        METRICS.check_data(data)
    assert len(calls) == 1
    data.check_labels(10)  # the same verdict: no new scan
    assert len(calls) == 1
    fresh = digits_like(GOOD_Y.copy())  # another label array is scanned again
    fl.models.check_data(LOSS, fresh)
    assert len(calls) == 2
    data.check_labels(20)  # another bound is another question
    assert len(calls) == 3


def test_failed_check_is_not_cached():
    data = digits_like(GOOD_Y + 10)
    for _ in range(2):
        with pytest.raises(ValueError, match="out-of-range label 10"):
            data.check_labels(10)


def test_evaluate_refuses_bad_labels_before_compiling():
    params = MODEL.init(jax.random.key(0))
    y = GOOD_Y.copy()
    y[7] = 99
    with compiles() as n, pytest.raises(ValueError, match="client 2 holds the out-of-range"):
        fl.evaluate(METRICS, params, digits_like(y))
    assert n[0] == 0
    with pytest.raises(ValueError, match="batch_size: .* not a bool"):
        fl.evaluate(METRICS, params, digits_like(GOOD_Y), batch_size=True)


def _patched_build(monkeypatch, train, test, **model):
    monkeypatch.setattr(experiment, "_load_data", lambda cfg: (train, test))
    cfg = {"model": {"name": "mlp", "hidden": [4], **model},
           "algorithms": [{"name": "fedavg"}], "training": {"cohort_size": 2}}
    # The config checks probe the client optimiser with a few eager scalar ops, compiled once
    # per process; run them first so the count below sees only what the data check costs
    # (alone, this test used to count those two; after other tests they were cached).
    experiment.validate(cfg)
    with compiles() as n, pytest.raises(experiment.ConfigError) as info:
        experiment.build(cfg)
    assert n[0] == 0
    return str(info.value)


def test_experiment_build_refuses_bad_labels(monkeypatch):
    good = digits_like(GOOD_Y)
    y = GOOD_Y.copy()
    y[7] = 99
    msg = _patched_build(monkeypatch, digits_like(y), good, num_classes=10)
    assert msg.startswith("data (train): examples['y']: client 2 holds the out-of-range label 99")
    msg = _patched_build(monkeypatch, good, digits_like(y))  # num_classes inferred as 100
    assert "model.num_classes: not set, so inferred as the largest label + 1 = 100" in msg
    assert "client 2 of the test split" in msg
    y = GOOD_Y.copy()
    y[0] = -1
    msg = _patched_build(monkeypatch, digits_like(y), good)
    assert "data (train): examples['y']: client 0 holds the negative label -1" in msg
    data = fl.FederatedData.from_offsets({"x": good.examples["x"], "label": GOOD_Y}, [0, 8])
    msg = _patched_build(monkeypatch, data, good)
    assert "data (train): examples: missing the key 'y'" in msg and "['label', 'x']" in msg


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: sampling.sample_clients(jax.random.key(0), 10, True), "cohort_size"),
        (lambda: sampling.distinct_uniform(jax.random.key(0), True, 1), "num_clients"),
        (lambda: sampling._check_population(digits_like(GOOD_Y), True), "cohort_size"),
        (lambda: datasets.load_synthetic(num_clients=True), "num_clients"),
        (lambda: datasets.load_synthetic(num_clients=3, num_classes=np.True_), "num_classes"),
        (lambda: datasets.load_digits(num_clients=True), "num_clients"),
        (lambda: partition.iid(10, True), "num_clients"),
        (lambda: _validate.check_count(np.True_, "seq_len"), "seq_len"),
        (lambda: fl.models.mlp((4,), num_classes=True), "num_classes"),
        (lambda: fl.models.mlp((4,), hidden=(8, True)), "hidden"),
        (lambda: fl.models.mlp((True, 4)), "input_shape"),
        (lambda: fl.models.cnn((8, 8, 1), features=(True,)), "features"),
        (lambda: fl.models.char_lstm(vocab_size=True), "vocab_size"),
        (lambda: fl.models.word_lstm(hidden=np.True_), "hidden"),
        (lambda: fl.models.resnet(True), "num_classes"),
        (lambda: digits_like(GOOD_Y).check_labels(True), "num_classes"),
    ],
)
def test_bools_are_not_counts(call, name):
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{name}: "), msg
    assert "bool" in msg, msg


def test_counts_still_accept_ints_and_integral_floats():
    assert _validate.check_count(np.int64(4), "num_clients") == 4
    assert _validate.check_count(3.0, "num_clients") == 3
    with pytest.raises(ValueError, match=r"num_clients: expected a whole number >= 1, got 2.5"):
        _validate.check_count(2.5, "num_clients")
    assert fl.models.mlp((4,), hidden=(np.int64(3),), num_classes=2).spec.num_classes == 2
