"""Server optimisers == plain NumPy transcriptions of their papers, under jit, vmap and scan."""

from __future__ import annotations

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab import server

ROUNDS = 25
SHAPES = {"b": (5,), "w": (3, 4)}
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _problem(seed: int, rounds: int = ROUNDS):
    """Float32 start params and ``rounds`` random pseudo-gradients of varying scale."""
    rng = np.random.default_rng(seed)
    x0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    gs = []
    for _ in range(rounds):
        scale = rng.uniform(0.05, 3.0)  # varying scale: Yogi's sign(v - Δ²) takes both signs
        gs.append({k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()})
    return x0, gs


# ------------------------------------------------------------------ NumPy transcriptions (f64)
def _f64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def numpy_reddi(kind, x0, gs, lr, b1, b2, tau):
    """Reddi et al. (2021), Algorithm 2, round by round; returns the params after each round."""
    x = _f64(x0)
    delta = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    out = []
    for t, g in enumerate(gs):
        eta = lr(t) if callable(lr) else lr
        for k in x:
            mean_client_delta = -np.float64(1.0) * g[k]  # Δ = mean_i(x_i) - x = -g
            delta[k] = b1 * delta[k] + (1 - b1) * mean_client_delta  # line 10
            d2 = delta[k] ** 2
            if kind == "adagrad":
                v[k] = v[k] + d2
            elif kind == "yogi":
                v[k] = v[k] - (1 - b2) * d2 * np.sign(v[k] - d2)
            elif kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d2
            else:
                raise AssertionError(kind)
            x[k] = x[k] + eta * delta[k] / (np.sqrt(v[k]) + tau)  # line 14
        out.append({k: val.copy() for k, val in x.items()})
    return out


def numpy_fedadagrad_no_momentum(x0, gs, lr, tau):
    """Reddi's FedAdagrad as stated (no momentum): v += Δ², x += lr Δ / (sqrt(v) + tau)."""
    x = _f64(x0)
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    out = []
    for g in gs:
        for k in x:
            d = -np.asarray(g[k], np.float64)
            v[k] += d * d
            x[k] += lr * d / (np.sqrt(v[k]) + tau)
        out.append({k: val.copy() for k, val in x.items()})
    return out


def numpy_bias_corrected(kind, x0, gs, lr, b1, b2, tau):
    """Kingma & Ba's Adam / Zaheer et al.'s Yogi with bias correction, in the gradient sign."""
    x = _f64(x0)
    m = {k: np.zeros_like(val) for k, val in x.items()}
    v0 = 0.0 if kind == "adam" else 1e-6
    v = {k: np.full_like(val, v0) for k, val in x.items()}
    out = []
    for t, g in enumerate(gs, start=1):
        for k in x:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            if kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * gk**2
            else:
                v[k] = v[k] - (1 - b2) * gk**2 * np.sign(v[k] - gk**2)
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            x[k] = x[k] - lr * m_hat / (np.sqrt(v_hat) + tau)
        out.append({k: val.copy() for k, val in x.items()})
    return out


def numpy_avgm(x0, gs, lr, momentum):
    """Hsu et al. (2019): m = momentum m + g; x -= lr m."""
    x = _f64(x0)
    m = {k: np.zeros_like(val) for k, val in x.items()}
    out = []
    for g in gs:
        for k in x:
            m[k] = momentum * m[k] + g[k]
            x[k] = x[k] - lr * m[k]
        out.append({k: val.copy() for k, val in x.items()})
    return out


def numpy_sgd(x0, gs, lr):
    x = _f64(x0)
    out = []
    for g in gs:
        x = {k: x[k] - lr * g[k] for k in x}
        out.append(dict(x))
    return out


# ------------------------------------------------------------------------------- JAX drivers
def run_jit_steps(opt, x0, gs):
    """Applies ``opt`` round by round with a jitted step; returns params after each round."""

    @jax.jit
    def step(x, state, g):
        updates, state = opt.update(g, state, x)
        return optax.apply_updates(x, updates), state

    x = jax.tree.map(jnp.asarray, x0)
    state = jax.jit(opt.init)(x)
    out = []
    for g in gs:
        x, state = step(x, state, g)
        out.append(x)
    return out, state


def run_scan(opt, x0, gs_stacked):
    """All rounds as one ``lax.scan``; returns the final params."""

    def body(carry, g):
        x, state = carry
        updates, state = opt.update(g, state, x)
        return (optax.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(body, (x0, opt.init(x0)), gs_stacked)
    return x


def assert_trajectories_close(got, want, rtol=RTOL, atol=ATOL):
    assert len(got) == len(want) == ROUNDS
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == set(w)
        for k in w:
            assert g[k].dtype == jnp.float32, (r, k, g[k].dtype)
            np.testing.assert_allclose(
                np.asarray(g[k]), w[k], rtol=rtol, atol=atol, err_msg=f"round {r}, leaf {k}"
            )


HPARAM_SETS = [
    dict(lr=0.1, b1=0.9, b2=0.99, tau=1e-3),  # the defaults (Reddi's tau)
    dict(lr=0.03, b1=0.5, b2=0.8, tau=0.05),  # every value distinct: catches swapped arguments
]
STATE_CLS = {"adam": server.FedAdamState, "yogi": server.FedYogiState}


# ---------------------------------------------------------------------- equivalence to papers
@pytest.mark.parametrize("hp", HPARAM_SETS)
@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_reddi_form_matches_transcription(kind, hp):
    factory = {"adam": server.fed_adam, "yogi": server.fed_yogi}[kind]
    opt = factory(hp["lr"], hp["b1"], hp["b2"], hp["tau"])
    x0, gs = _problem(1)
    got, state = run_jit_steps(opt, x0, gs)
    assert_trajectories_close(got, numpy_reddi(kind, x0, gs, **hp))
    assert isinstance(state, STATE_CLS[kind])
    assert int(state.count) == ROUNDS


@pytest.mark.parametrize("hp", HPARAM_SETS)
@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_bias_corrected_form_matches_transcription(kind, hp):
    factory = {"adam": server.fed_adam, "yogi": server.fed_yogi}[kind]
    opt = factory(
        learning_rate=hp["lr"], b1=hp["b1"], b2=hp["b2"], tau=hp["tau"], bias_correction=True
    )
    x0, gs = _problem(2)
    got, state = run_jit_steps(opt, x0, gs)
    assert_trajectories_close(got, numpy_bias_corrected(kind, x0, gs, **hp))
    assert isinstance(state, STATE_CLS[kind])


def test_yogi_initial_v_is_documented_constant():
    assert server.YOGI_INITIAL_V == 1e-6  # the transcription above hard-codes 1e-6
    state = server.fed_yogi(0.1, bias_correction=True).init({"a": jnp.zeros(3)})
    np.testing.assert_array_equal(state.v["a"], np.full(3, 1e-6, np.float32))
    state = server.fed_yogi(0.1, tau=0.01).init({"a": jnp.zeros(3)})  # Reddi: v_{-1} = tau²
    np.testing.assert_allclose(state.v["a"], np.full(3, 1e-4), rtol=1e-6)


@pytest.mark.parametrize("hp", HPARAM_SETS)
def test_adagrad_with_momentum_matches_transcription(hp):
    opt = server.fed_adagrad(hp["lr"], b1=hp["b1"], tau=hp["tau"])
    x0, gs = _problem(3)
    got, state = run_jit_steps(opt, x0, gs)
    assert_trajectories_close(got, numpy_reddi("adagrad", x0, gs, **hp))
    assert isinstance(state, server.FedAdagradState)


def test_adagrad_b1_zero_is_reddi_fedadagrad():
    x0, gs = _problem(4)
    got, _ = run_jit_steps(server.fed_adagrad(0.1, tau=1e-3), x0, gs)  # default b1 = 0
    assert_trajectories_close(got, numpy_fedadagrad_no_momentum(x0, gs, lr=0.1, tau=1e-3))


def test_bias_corrected_adam_equals_optax_adam():
    x0, gs = _problem(5)
    got, _ = run_jit_steps(server.fed_adam(0.05, 0.7, 0.9, 1e-2, bias_correction=True), x0, gs)
    want, _ = run_jit_steps(optax.adam(0.05, b1=0.7, b2=0.9, eps=1e-2), x0, gs)
    assert_trajectories_close(got, [jax.tree.map(np.asarray, w) for w in want], rtol=1e-6)


def test_bias_corrected_yogi_equals_optax_yogi_with_zero_first_moment():
    # optax.yogi starts m at 1e-6 too; ours starts it at 0 (documented). Otherwise identical.
    x0, gs = _problem(6)
    got, _ = run_jit_steps(server.fed_yogi(0.05, 0.7, 0.9, 1e-2, bias_correction=True), x0, gs)
    ref = optax.yogi(0.05, b1=0.7, b2=0.9, eps=1e-2)
    x = jax.tree.map(jnp.asarray, x0)
    state = ref.init(x)
    state = (state[0]._replace(mu=jax.tree.map(jnp.zeros_like, x)),) + tuple(state[1:])
    want = []
    for g in gs:
        updates, state = ref.update(g, state, x)
        x = optax.apply_updates(x, updates)
        want.append(jax.tree.map(np.asarray, x))
    assert_trajectories_close(got, want, rtol=1e-6)


def test_avgm_matches_transcription():
    x0, gs = _problem(7)
    got, _ = run_jit_steps(server.fed_avgm(0.3, momentum=0.7), x0, gs)
    assert_trajectories_close(got, numpy_avgm(x0, gs, lr=0.3, momentum=0.7))
    got, _ = run_jit_steps(server.fed_avgm(0.3), x0, gs)  # default momentum 0.9
    assert_trajectories_close(got, numpy_avgm(x0, gs, lr=0.3, momentum=0.9))


def test_sgd_matches_transcription():
    x0, gs = _problem(8)
    got, _ = run_jit_steps(server.fed_sgd(0.3), x0, gs)
    assert_trajectories_close(got, numpy_sgd(x0, gs, lr=0.3))


def test_fed_sgd_one_is_fedavg_exactly():
    x0, gs = _problem(9, rounds=1)
    (x1,), _ = run_jit_steps(server.fed_sgd(1.0), x0, gs)
    for k in x0:
        np.testing.assert_array_equal(np.asarray(x1[k]), x0[k] - gs[0][k])  # float32, bit-exact
    # and so the server lands exactly on the mean client params when g = x - mean
    mean = {k: x0[k] + np.float32(0.25) for k in x0}
    g = {k: x0[k] - mean[k] for k in x0}
    (x1,), _ = run_jit_steps(server.fed_sgd(1.0), x0, [g])
    for k in x0:
        np.testing.assert_array_equal(np.asarray(x1[k]), x0[k] - g[k])


def test_learning_rate_schedule_uses_count_from_zero():
    sched = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.9)
    x0, gs = _problem(10)
    got, _ = run_jit_steps(server.fed_adam(sched, 0.8, 0.95, 1e-2), x0, gs)
    want = numpy_reddi("adam", x0, gs, lr=lambda t: 0.1 * 0.9**t, b1=0.8, b2=0.95, tau=1e-2)
    assert_trajectories_close(got, want)


# ------------------------------------------------------------------------ pytrees and dtypes
FACTORIES = {
    "adam": (server.fed_adam, dict(b1=0.8, b2=0.95, tau=1e-2), {}),
    "adam_bc": (server.fed_adam, dict(b1=0.8, b2=0.95, tau=1e-2), {"bias_correction": True}),
    "yogi": (server.fed_yogi, dict(b1=0.8, b2=0.95, tau=1e-2), {}),
    "yogi_bc": (server.fed_yogi, dict(b1=0.8, b2=0.95, tau=1e-2), {"bias_correction": True}),
    "adagrad": (server.fed_adagrad, dict(b1=0.5, tau=1e-2), {}),
    "avgm": (server.fed_avgm, dict(momentum=0.7), {}),
    "sgd": (server.fed_sgd, {}, {}),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_and_updates_keep_param_dtypes(name, dtype):
    factory, hp, flags = FACTORIES[name]
    opt = factory(0.1, **hp, **flags)
    x = {"b": jnp.ones(5, dtype), "w": jnp.ones((3, 4), dtype)}
    state = opt.init(x)
    updates, state2 = opt.update(jax.tree.map(lambda p: 0.5 * p, x), state, x)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == dtype
    # the state's structure and dtypes are stable across a step (what lax.scan needs)
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape


# ------------------------------------------------------- inject_hyperparams, vmap and scan sweeps
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inject_hyperparams_vmapped_sweep_equals_separate_runs(name):
    factory, hp, flags = FACTORIES[name]
    x0, gs = _problem(11)
    x0 = jax.tree.map(jnp.asarray, x0)
    gs_stacked = jax.tree.map(lambda *a: jnp.stack(a), *gs)
    lrs = (0.1, 0.02)
    # a second, different value of every other hyper-parameter, traced too
    hp2 = {k: (v, v * 0.5) for k, v in hp.items()}

    @jax.jit
    @jax.vmap
    def sweep(lr, hparams):
        opt = optax.inject_hyperparams(factory)(learning_rate=lr, **hparams, **flags)
        return run_scan(opt, x0, gs_stacked)

    swept = sweep(
        jnp.asarray(lrs, jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in hp2.items()}
    )
    for i, lr in enumerate(lrs):
        opt = factory(lr, **{k: v[i] for k, v in hp2.items()}, **flags)
        single = jax.jit(lambda o=opt: run_scan(o, x0, gs_stacked))()
        for k in SHAPES:
            np.testing.assert_allclose(swept[k][i], single[k], rtol=RTOL, atol=ATOL)
    # the two runs really differ (the sweep did not broadcast one setting)
    assert not np.allclose(swept["w"][0], swept["w"][1])


def test_inject_hyperparams_still_validates_concrete_values():
    x = {"a": jnp.zeros(2)}
    opt = optax.inject_hyperparams(server.fed_adam)(learning_rate=0.1, bias_correction=True)
    state = opt.init(x)  # concrete arrays: checked and accepted
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        optax.inject_hyperparams(server.fed_adam)(learning_rate=-0.1).init(x)
    with pytest.raises(ValueError, match="b2"):
        optax.inject_hyperparams(server.fed_yogi)(learning_rate=0.1, b2=1.0).init(x)


# ----------------------------------------------------------------------------------- validation
NAN, INF = math.nan, math.inf
BAD = [
    (lambda: server.fed_adam(0.0), "learning_rate"),
    (lambda: server.fed_adam(-0.1), "learning_rate"),
    (lambda: server.fed_yogi(NAN), "learning_rate"),
    (lambda: server.fed_adagrad(INF), "learning_rate"),
    (lambda: server.fed_sgd(0.0), "learning_rate"),
    (lambda: server.fed_sgd(jnp.asarray(-1.0)), "learning_rate"),
    (lambda: server.fed_avgm(-1.0), "learning_rate"),
    (lambda: server.fed_adam(0.1, b1=1.0), r"b1: must lie in \[0, 1\)"),
    (lambda: server.fed_adam(0.1, b1=-0.1), "b1"),
    (lambda: server.fed_yogi(0.1, b2=1.0), r"b2: must lie in \[0, 1\)"),
    (lambda: server.fed_yogi(0.1, 0.9, 1.5, bias_correction=True), "b2"),
    (lambda: server.fed_adagrad(0.1, b1=1.0), "b1"),
    (lambda: server.fed_adam(0.1, tau=0.0), "tau: must be a positive"),
    (lambda: server.fed_yogi(0.1, tau=-1e-3), "tau"),
    (lambda: server.fed_adagrad(0.1, tau=INF), "tau"),
    (lambda: server.fed_avgm(0.1, momentum=1.0), r"momentum: must lie in \[0, 1\)"),
    (lambda: server.fed_avgm(0.1, momentum=-0.5), "momentum"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_invalid_hyperparameters_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_non_numeric_hyperparameters_raise_type_error():
    with pytest.raises(TypeError, match="learning_rate"):
        server.fed_sgd(True)
    with pytest.raises(TypeError, match="b1"):
        server.fed_adam(0.1, b1="0.9")
    with pytest.raises(TypeError, match="tau"):
        server.fed_adagrad(0.1, tau=1e-3 + 0j)


def test_edge_values_are_accepted():
    server.fed_adam(0.1, b1=0.0, b2=0.0)  # 0 is inside [0, 1)
    server.fed_avgm(0.1, momentum=0.0)
    server.fed_sgd(optax.constant_schedule(1.0))  # schedules are not checked


def test_public_names():
    assert set(server.__all__) >= {"fed_adam", "fed_yogi", "fed_adagrad", "fed_avgm", "fed_sgd"}
    for name in server.__all__:
        assert hasattr(server, name)


def test_doctests():
    result = doctest.testmod(server, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0
