"""Representation and drift baselines: MOON, FedSAM, FedLC, FedBABU.

Each is checked against a NumPy transcription of its paper's update rule on a tiny problem
with full-batch local steps (every local step sees the client's whole dataset, so the
comparison is exact up to float32 rounding), and against FedAvg where the paper says it
reduces to it. Three rounds over a population of 3; every client participates twice, so
per-client state (MOON's previous local model) is exercised.
"""

from __future__ import annotations

import pathlib

import _problems as P
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lab as fl
from fedjax_lab import experiment
from fedjax_lab.algorithms.fedlc import label_counts
from fedjax_lab.algorithms.moon import representation_of

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("moon", "fedsam", "fedlc", "fedbabu")
LR = 0.3
STEPS = 2  # full-batch local steps per round
SIZES = (3, 4, 2)  # client dataset sizes; batches are padded to B = 4
B = 4
D, C = 3, 3
COHORTS = ([0, 1], [1, 2], [2, 0])
KEY = jax.random.key(0)


def _client_data(seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i, n in enumerate(SIZES):
        xs.append(rng.normal(size=(n, D)))
        y = rng.integers(0, C, size=n)
        if i == 2:
            y[:] = [0, 2]  # client 2 holds no example of class 1
        ys.append(y)
    return xs, ys


XS, YS = _client_data()


def cohort(ids, regression=False):
    """Client ``ids``' full datasets, padded to ``B``, repeated for ``STEPS`` steps."""
    x = np.zeros((len(ids), STEPS, B, D), np.float32)
    y = np.zeros((len(ids), STEPS, B), np.float32 if regression else np.int32)
    m = np.zeros((len(ids), STEPS, B), np.float32)
    for j, i in enumerate(ids):
        n = SIZES[i]
        x[j, :, :n] = XS[i]
        y[j, :, :n] = XS[i].sum(1) if regression else YS[i]
        m[j, :, :n] = 1.0
    weights = np.array([SIZES[i] for i in ids], np.float32)
    return fl.Cohort({"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(m)},
                     jnp.asarray(weights), jnp.asarray(ids, jnp.int32))


def run(alg, params, regression=False):
    state = alg.init(params, num_clients=len(SIZES))
    for ids in COHORTS:
        state, metrics = fl.run_round(alg, state, cohort(ids, regression), KEY)
        assert float(metrics["round_skipped"]) == 0.0
    return state


def np_rounds(params, client_step, init_client_state=None):
    """FedAvg's server (weighted mean of the client models) around ``client_step``.

    ``client_step(w, i, state_i) -> w`` is one full-batch local step of client ``i``; the
    client's state after its steps is its final local model (MOON's previous model).
    """
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    states = {} if init_client_state is None else dict(init_client_state)
    for ids in COHORTS:
        models, weights = [], []
        for i in ids:
            local = {k: v.copy() for k, v in w.items()}
            for _ in range(STEPS):
                local = client_step(local, w, i, states.get(i))
            states[i] = local
            models.append(local)
            weights.append(SIZES[i])
        p = np.asarray(weights, np.float64) / sum(weights)
        w = {k: sum(pi * mdl[k] for pi, mdl in zip(p, models, strict=True)) for k in w}
    return w


def assert_close(state_params, expected, rtol=2e-5, atol=2e-6):
    flat_got = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(state_params)[0]}
    for name, v in expected.items():
        np.testing.assert_allclose(flat_got[name], v, rtol=rtol, atol=atol, err_msg=name)


def softmax_grad(logits, y, present=None):
    """d mean CE / d logits over one client's real examples (classes outside ``present``
    dropped from the softmax)."""
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z) if present is None else np.exp(z) * present[None, :]
    p = e / e.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p / len(y)


# ------------------------------------------------------------------------------------- MOON

H = 2  # representation width of the linear "representation" model z = x W


def moon_loss(params, batch, key):
    del key
    logits = (batch["x"] @ params["w"]) @ params["v"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    m = batch["mask"]
    return jnp.sum(m * ce) / jnp.maximum(jnp.sum(m), 1.0)


def moon_rep(params, batch):
    return batch["x"] @ params["w"]


def np_cos(z, a):
    den = np.sqrt(np.maximum((z * z).sum(1) * (a * a).sum(1), 1e-16))
    c = (z * a).sum(1) / den
    return c, a / den[:, None] - c[:, None] * z / (z * z).sum(1)[:, None]


def np_moon_step(mu, tau):
    """``mu``: one weight per client (or a scalar for all)."""

    def step(local, glob, i, prev):
        x, y = XS[i], YS[i]
        prev = glob if prev is None else prev  # first participation: the global model
        z = x @ local["w"]
        dlog = softmax_grad(z @ local["v"], y)
        dv = z.T @ dlog
        dz = dlog @ local["v"].T
        c_g, dc_g = np_cos(z, x @ glob["w"])
        c_p, dc_p = np_cos(z, x @ prev["w"])
        sig_g = 1.0 / (1.0 + np.exp((c_p - c_g) / tau))
        dz_con = ((sig_g - 1.0)[:, None] * dc_g + (1.0 - sig_g)[:, None] * dc_p) / tau
        dz = dz + np.broadcast_to(mu, (len(SIZES),))[i] * dz_con / len(y)
        return {"w": local["w"] - LR * x.T @ dz, "v": local["v"] - LR * dv}

    return step


def moon_params():
    rng = np.random.default_rng(7)
    return {"w": jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(H, C)), jnp.float32)}


def test_moon_equals_the_numpy_transcription_with_previous_local_models():
    mu, tau = np.array([2.0, 0.5, 3.0]), 0.5  # per client (a scalar is the same for all)
    alg = fl.algorithms.moon(moon_loss, optax.sgd(LR), mu=fl.kit.per_client(mu),
                             temperature=tau, representation=moon_rep)
    state = run(alg, moon_params())
    assert_close(state.params, np_rounds(moon_params(), np_moon_step(mu, tau)),
                 rtol=1e-4, atol=1e-5)
    prev, participated = state.client_states
    assert participated.tolist() == [1.0, 1.0, 1.0]
    # the contrastive term mattered: FedAvg (mu = 0) ends elsewhere
    fedavg = np_rounds(moon_params(), np_moon_step(0.0, tau))
    assert np.max(np.abs(np.asarray(state.params["w"]) - fedavg["w"])) > 1e-3


def test_moon_representation_is_the_zoo_models_features_and_bad_options_are_refused():
    model = fl.models.mlp((D,), hidden=(4,), num_classes=C)
    params = model.init(jax.random.key(1))
    x = jnp.asarray(XS[0], jnp.float32)
    hidden = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None, :])
    np.testing.assert_allclose(model.features(params, x), hidden, rtol=1e-6)
    rep = representation_of(fl.models.classification_loss(model))
    np.testing.assert_allclose(rep(params, {"x": x}), hidden, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        fl.algorithms.moon(moon_loss, temperature=0.0)
    import flax.linen as nn

    dense = fl.models.from_flax(nn.Dense(2), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="sow"):  # a module that exposes no representation
        dense.features(dense.init(KEY), jnp.ones((1, 3)))


# ----------------------------------------------------------------------------------- FedSAM


def lsq_loss(params, batch, key):
    del key
    r = batch["x"] @ params["w"] - batch["y"]
    m = batch["mask"]
    return jnp.sum(m * r * r) / jnp.maximum(jnp.sum(m), 1.0)


def np_sam_step(rho):
    def grad(w, i):
        x, y = XS[i], XS[i].sum(1)
        return 2.0 * x.T @ (x @ w - y) / len(y)

    def step(local, glob, i, prev):
        g = grad(local["w"], i)
        return {"w": local["w"] - LR * grad(local["w"] + rho * g / np.linalg.norm(g), i)}

    return step


W0 = {"w": jnp.asarray([0.5, -1.0, 0.25], jnp.float32)}
FEDAVG_LSQ = fl.algorithms.fed_avg(lsq_loss, optax.sgd(LR))


def test_fedsam_equals_the_numpy_transcription_and_rho_zero_is_fedavg_bit_for_bit():
    rho = 0.2
    state = run(fl.algorithms.fed_sam(lsq_loss, optax.sgd(LR), rho=rho), W0, regression=True)
    expected = np_rounds(W0, np_sam_step(rho))
    assert_close(state.params, expected)
    assert np.max(np.abs(expected["w"] - np_rounds(W0, np_sam_step(0.0))["w"])) > 1e-3
    sam0 = run(fl.algorithms.fed_sam(lsq_loss, optax.sgd(LR), rho=0.0), W0, regression=True)
    P.assert_trees_equal(sam0.params, run(FEDAVG_LSQ, W0, regression=True).params)
    with pytest.raises(ValueError, match="rho"):
        fl.algorithms.fed_sam(lsq_loss, rho=-0.1)


# ------------------------------------------------------------------------------------ FedLC

LOGREG = fl.models.logistic_regression((D,), C)
LOGREG_LOSS = fl.models.classification_loss(LOGREG)


def np_lc_step(tau, passes=1):
    """``passes``: how many times the round's batches hold each example (the default counts
    are read off the batches; ``label_counts=`` gives the dataset's, ``passes=1``)."""

    def step(local, glob, i, prev):
        x, y = XS[i], YS[i]
        counts = passes * np.bincount(y, minlength=C).astype(np.float64)
        present = (counts > 0).astype(np.float64)
        shift = tau * np.where(counts > 0, counts, 1.0) ** -0.25
        logits = x @ local["Dense_0/kernel"] + local["Dense_0/bias"] - shift
        dlog = softmax_grad(logits, y, present)
        return {"Dense_0/kernel": local["Dense_0/kernel"] - LR * x.T @ dlog,
                "Dense_0/bias": local["Dense_0/bias"] - LR * dlog.sum(0)}

    return step


def flat(params):
    return {f"Dense_0/{k}": v for k, v in params["Dense_0"].items()}


def test_fedlc_equals_the_numpy_transcription_with_counts_from_batches_or_data():
    tau = 1.5
    params = LOGREG.init(jax.random.key(2))
    # counts from the round's batches: STEPS full-batch steps hold each example STEPS times
    state = run(fl.algorithms.fed_lc(LOGREG_LOSS, optax.sgd(LR), tau=tau), params)
    assert_close(state.params, np_rounds(flat(params), np_lc_step(tau, passes=STEPS)))
    # label counts given from the data: the client datasets' counts
    data = fl.FederatedData.from_client_arrays(
        [{"x": XS[i].astype(np.float32), "y": YS[i]} for i in range(len(SIZES))])
    table = label_counts(data, C)
    assert table[2, 1] == 0.0 and table.sum() == sum(SIZES)
    given = run(fl.algorithms.fed_lc(LOGREG_LOSS, optax.sgd(LR), tau=tau, label_counts=table),
                params)
    expected = np_rounds(flat(params), np_lc_step(tau))
    assert_close(given.params, expected)
    # the calibration mattered: tau = 0 (plain CE over each client's classes) ends elsewhere
    plain = np_rounds(flat(params), np_lc_step(0.0))
    assert np.max(np.abs(plain["Dense_0/bias"] - expected["Dense_0/bias"])) > 1e-3
    with pytest.raises(ValueError, match="label_counts"):
        fl.algorithms.fed_lc(LOGREG_LOSS, label_counts=np.ones(3))
    with pytest.raises(ValueError, match="label_counts: 3 rows"):
        fl.algorithms.fed_lc(LOGREG_LOSS, label_counts=table).init(params, num_clients=5)


def test_fedlc_without_a_model_warns_when_traced():
    alg = fl.algorithms.fed_lc(P.loss_fn, optax.sgd(0.1))  # builds silently (configs validate)
    c = P.cohort(1, 1, 3)
    client = fl.ClientInput(jax.tree.map(lambda a: a[0], c.batches), c.weights[0],
                            c.client_ids[0], ())
    with pytest.warns(UserWarning, match="cannot be calibrated"):
        out = jax.eval_shape(alg.client_update, alg.init(P.init_params()), client, KEY)
    assert jax.tree.structure(out.update) == jax.tree.structure(P.init_params())


# ---------------------------------------------------------------------------------- FedBABU

MLP = fl.models.mlp((D,), hidden=(4,), num_classes=C)
MLP_LOSS = fl.models.classification_loss(MLP)


def np_babu_step(local, glob, i, prev):
    x, y = XS[i], YS[i]
    pre = x @ local["Dense_0/kernel"] + local["Dense_0/bias"]
    h = np.maximum(pre, 0.0)
    dlog = softmax_grad(h @ local["Dense_1/kernel"] + local["Dense_1/bias"], y)
    dpre = (dlog @ local["Dense_1/kernel"].T) * (pre > 0)
    out = dict(local)
    out["Dense_0/kernel"] = local["Dense_0/kernel"] - LR * x.T @ dpre
    out["Dense_0/bias"] = local["Dense_0/bias"] - LR * dpre.sum(0)
    return out  # the head (Dense_1) is frozen


def test_fedbabu_trains_the_body_only_as_the_numpy_transcription():
    params = MLP.init(jax.random.key(3))
    flat_p = {f"{layer}/{k}": v for layer, d in params.items() for k, v in d.items()}
    state = run(fl.algorithms.fed_babu(MLP_LOSS, optax.sgd(LR)), params)
    assert_close(state.params, np_rounds(flat_p, np_babu_step), rtol=1e-4, atol=1e-5)
    P.assert_trees_equal(state.params["Dense_1"], params["Dense_1"])  # head: its init, exactly
    assert np.max(np.abs(np.asarray(state.params["Dense_0"]["kernel"])
                         - np.asarray(params["Dense_0"]["kernel"]))) > 1e-3
    with pytest.raises(ValueError, match="global_mask"):
        fl.algorithms.fed_babu(MLP_LOSS, head_keys="Dense").init(params)  # all frozen


# ----------------------------------------------------------------------------- registry, TOML


@pytest.mark.parametrize("name", NAMES)
def test_example_config_loads_and_builds_with_the_model_loss(name):
    cfg = experiment.load_config(ROOT / "experiments" / "configs" / f"{name}.toml")
    specs = [s for s in cfg["algorithms"] if s["name"] == name]
    assert specs
    for spec in specs:
        alg = experiment.build_algorithm(spec, MLP_LOSS)
        assert isinstance(alg, fl.FederatedAlgorithm) and alg.name == spec.get("label", name)
