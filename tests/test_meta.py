"""fl.meta: gradients of a 3-round federated run's validation loss w.r.t. its hyper-parameters
agree with central finite differences (float64), rounds are checkpointed, FedLAW's learned
weights lower the validation loss and down-weight a corrupted client."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl

ROOT = Path(__file__).resolve().parents[1]
R, C, S, B, D = 3, 3, 2, 4, 3


def loss_fn(p, b, k):
    del k
    return jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / jnp.maximum(b["mask"].sum(), 1.0)


def make(server_lr, client_lr):
    return fl.algorithms.fed_avg(loss_fn, client_learning_rate=client_lr,
                                 server_learning_rate=server_lr)


def problem(label_noise=(0.1, 0.1, 0.1)):
    """Least squares: 3 clients around one true model, 3 rounds of fixed cohorts (x64 arrays
    when called under jax.enable_x64)."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=D)
    x = rng.normal(size=(R, C, S, B, D))
    noise = np.asarray(label_noise)[None, :, None, None] * rng.normal(size=(R, C, S, B))
    y = x @ w_true + noise
    cohorts = fl.Cohort({"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.ones((R, C, S, B))},
                        jnp.ones((R, C)), jnp.tile(jnp.arange(C, dtype=jnp.int32), (R, 1)))
    xv = jnp.asarray(rng.normal(size=(16, D)))
    yv = xv @ jnp.asarray(w_true)
    return cohorts, lambda p: jnp.mean((xv @ p - yv) ** 2)


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def run_losses(x64):
    cohorts, val = problem()
    kw = dict(key=jax.random.key(0))
    return (fl.meta.unrolled_loss(make, jnp.zeros(D), cohorts, val, **kw),
            fl.meta.unrolled_loss(make, jnp.zeros(D), cohorts, val, remat=False, **kw))


HP = {"server_lr": 0.8, "client_lr": 0.1, "aggregation_weights": [1.0, 2.0, 3.0]}


def _hp():
    return {k: jnp.asarray(v, jnp.float64) for k, v in HP.items()}


def test_gradients_match_central_finite_differences_in_float64(run_losses):
    loss, _ = run_losses
    hp = _hp()
    grads = jax.grad(loss)(hp)
    eps = 1e-5
    errors = []
    for name in hp:
        for i in np.ndindex(np.shape(hp[name])):
            def at(d, name=name, i=i):
                return float(loss({**hp, name: hp[name].at[i].add(d)}))

            fd = (at(eps) - at(-eps)) / (2 * eps)
            exact = float(grads[name][i])
            assert abs(exact) > 1e-5  # a gradient that is really there
            errors.append(abs(fd - exact) / abs(exact))
    print(f"max relative error of grad vs central differences: {max(errors):.2e}")
    assert max(errors) < 1e-6, errors


def test_rounds_are_checkpointed_and_remat_changes_no_gradient(run_losses):
    loss, plain = run_losses
    hp = _hp()
    g1, g2 = jax.grad(loss)(hp), jax.grad(plain)(hp)
    for name in hp:
        np.testing.assert_allclose(g1[name], g2[name], rtol=1e-12)
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(hp))
    assert "remat" not in str(jax.make_jaxpr(jax.grad(plain))(hp))
    # the value is FedAvg's run: the same rounds through fl.run_round
    cohorts, val = problem()
    alg = make(0.8, 0.1)
    state = alg.init(jnp.zeros(D))
    for r in range(R):
        cohort = jax.tree.map(lambda a, r=r: a[r], cohorts)
        state, _ = fl.run_round(alg, state, cohort._replace(weights=hp["aggregation_weights"]),
                                jax.random.key(0))
    np.testing.assert_allclose(float(loss(hp)), float(val(state.params)), rtol=1e-10)


def test_fedlaw_down_weights_the_corrupted_client_and_lowers_the_validation_loss():
    cohorts, val = problem(label_noise=(0.0, 0.0, 5.0))  # client 2's labels are noise
    out = fl.meta.fedlaw_weights(make, jnp.zeros(D), cohorts, val, key=jax.random.key(0),
                                 hparams={"server_lr": 1.0, "client_lr": 0.1}, steps=40)
    assert float(out.losses[-1]) < 0.5 * float(out.losses[0])
    np.testing.assert_allclose(float(jnp.sum(out.weights)), 1.0, rtol=1e-6)
    assert float(out.weights[2]) < min(float(out.weights[0]), float(out.weights[1]))
    assert float(out.shrink) > 0


def test_bad_meta_arguments_are_refused():
    cohorts, val = problem()
    with pytest.raises(ValueError, match="num_rounds=R"):
        fl.meta.unrolled_loss(make, jnp.zeros(D), jax.tree.map(lambda a: a[0], cohorts), val,
                              key=jax.random.key(0))
    with pytest.raises(TypeError, match="typed PRNG key"):
        fl.meta.unrolled_loss(make, jnp.zeros(D), cohorts, val, key=0)
    loss = fl.meta.unrolled_loss(make, jnp.zeros(D), cohorts, val, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"aggregation_weights: .* shape \(3,\)"):
        loss({"server_lr": 1.0, "client_lr": 0.1, "aggregation_weights": jnp.ones(2)})
    with pytest.raises(ValueError, match="hparams: .*'shrink'"):
        fl.meta.fedlaw_weights(make, jnp.zeros(D), cohorts, val, key=jax.random.key(0),
                               hparams={"shrink": 1.0})


def test_tune_server_lr_smoke_writes_both_results(tmp_path):
    out = tmp_path / "tune.json"
    path = ROOT / "experiments" / "meta" / "tune_server_lr.py"
    spec = importlib.util.spec_from_file_location("tune_server_lr", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out", str(out)])
    got = json.loads(out.read_text())
    for method in ("gradient", "grid"):
        assert got[method]["run_evaluations"] >= 1
        assert np.isfinite(got[method]["final_val_loss"]) and got[method]["server_lr"] > 0
    assert got["gradient"]["final_val_loss"] <= got["initial"]["final_val_loss"]
