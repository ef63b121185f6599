"""DP-FTRL: tree-aggregated noise equals its NumPy transcription, noise 0 is clipped FedAvg, the
update is the paper's, and its epsilon is dp-accounting's tree mechanism / a hand computation."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

import fedjax_lab as fl
from fedjax_lab import experiment as exp_lib
from fedjax_lab import privacy

D, CLIENTS, EXAMPLES = 3, 4, 5


def _loss(params, batch, key):
    del key
    err = batch["x"] @ params - batch["y"]
    return jnp.sum(batch["mask"] * err**2) / jnp.maximum(batch["mask"].sum(), 1.0)


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(CLIENTS, EXAMPLES, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + rng.normal(size=(CLIENTS, EXAMPLES))).astype(np.float32)
    return x, y


def _cohort(x, y, steps: int) -> fl.Cohort:
    """Full-batch local steps: the client's whole data, ``steps`` times."""
    rep = lambda a: jnp.repeat(jnp.asarray(a)[:, None], steps, axis=1)  # noqa: E731
    batches = {"x": rep(x), "y": rep(y), "mask": jnp.ones((CLIENTS, steps, EXAMPLES))}
    return fl.Cohort(batches, jnp.ones(CLIENTS), jnp.arange(CLIENTS))


def _run(alg, rounds: int, key, steps: int = 2, seed: int = 0):
    x, y = _problem(seed)
    state = alg.init(jnp.zeros(D))
    history = []
    for _ in range(rounds):
        state, _ = fl.run_round(alg, state, _cohort(x, y, steps), key)
        history.append(np.asarray(state.params))
    return state, history


def _node(template, key, h: int, j: int, stddev: float):
    node_key = jax.random.fold_in(jax.random.fold_in(key, h), j)
    return privacy.gaussian_sum_noise(template, stddev, node_key)


def _numpy_prefix_noise(template, t: int, key, stddev: float):
    """The prefix [1, t] as the disjoint dyadic nodes of t's binary decomposition."""
    total = np.zeros(np.shape(template), np.float64)
    covered = []
    for h in range(t.bit_length()):
        if (t >> h) & 1:
            j = (t >> h) - 1
            covered.append(range(j * 2**h + 1, (j + 1) * 2**h + 1))
            total += np.asarray(_node(template, key, h, j, stddev), np.float64)
    steps = sorted(s for r in covered for s in r)
    assert steps == list(range(1, t + 1))  # the nodes tile [1, t] exactly once
    return total


def test_prefix_noise_is_the_sum_of_the_nodes_of_the_binary_decomposition():
    key, template = jax.random.key(3), jnp.zeros(7)
    noise = jax.jit(privacy.tree_prefix_noise)
    for t in [0, *range(1, 20), 64, 1000]:
        got = np.asarray(noise(template, jnp.int32(t), key, jnp.float32(1.5)))
        np.testing.assert_allclose(got, _numpy_prefix_noise(template, t, key, 1.5), atol=1e-5)
    # Each node is drawn once: steps 5 and 6 share node [1, 4], so T_6 - T_5 = N[5,6] - N[5].
    t5, t6 = (np.asarray(noise(template, jnp.int32(t), key, 1.0)) for t in (5, 6))
    want = np.asarray(_node(template, key, 1, 2, 1.0)) - np.asarray(_node(template, key, 0, 4, 1.0))
    np.testing.assert_allclose(t6 - t5, want, atol=1e-5)


def test_prefix_noise_variance_is_at_most_log_levels_sigma_squared():
    sigma = 2.0
    keys = jax.random.split(jax.random.key(0), 64)
    template = jnp.zeros(4096)
    draw = jax.jit(jax.vmap(privacy.tree_prefix_noise, in_axes=(None, None, 0, None)))
    for t in [1, 2, 3, 5, 7, 8, 12, 15, 16]:
        samples = np.asarray(draw(template, jnp.int32(t), keys, sigma), np.float64)
        var = samples.var()
        assert var == pytest.approx(bin(t).count("1") * sigma**2, rel=0.03), t
        assert var <= math.ceil(math.log2(t + 1)) * sigma**2 * 1.03, t
        assert abs(samples.mean()) < 0.05 * sigma


def test_noise_zero_dp_ftrl_is_clipped_fedavg_with_an_sgd_server():
    key = jax.random.key(1)
    for lr in (0.5,):
        ftrl = fl.algorithms.dp_ftrl(_loss, noise_multiplier=0.0, clip_norm=0.3,
                                     server_learning_rate=lr, expected_cohort_size=3)
        avg = fl.algorithms.dp_fed_avg(_loss, noise_multiplier=0.0, clip_norm=0.3,
                                       server_learning_rate=lr, expected_cohort_size=3)
        _, h_ftrl = _run(ftrl, 6, key)
        _, h_avg = _run(avg, 6, key)
        np.testing.assert_allclose(np.stack(h_ftrl), np.stack(h_avg), rtol=1e-5, atol=1e-6)
        assert not np.allclose(h_ftrl[0], h_ftrl[-1])  # it trained


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_update_equals_a_numpy_transcription_of_the_paper(momentum):
    z, clip, lr, client_lr, steps, m, rounds = 0.7, 0.4, 0.8, 0.1, 3, 4.0, 7
    alg = fl.algorithms.dp_ftrl(
        _loss, optax.sgd(client_lr), noise_multiplier=z, clip_norm=clip,
        server_learning_rate=lr, server_momentum=momentum, expected_cohort_size=m,
    )
    key = jax.random.key(5)
    state, history = _run(alg, rounds, key, steps=steps)
    # The tree key is round 1's aggregator key (run_round: split(fold_in(key, round), 3)[1]).
    tree_key = jax.random.split(jax.random.fold_in(key, 0), 3)[1]

    x, y = (a.astype(np.float64) for a in _problem())
    x0 = np.zeros(D)
    params, total, velocity = x0.copy(), np.zeros(D), np.zeros(D)
    for t in range(1, rounds + 1):
        for i in range(CLIENTS):  # local full-batch gradient descent on the mean squared error
            w = params.copy()
            for _ in range(steps):
                w -= client_lr * 2.0 / EXAMPLES * x[i].T @ (x[i] @ w - y[i])
            delta = params - w
            total += delta * min(1.0, clip / np.linalg.norm(delta))
        noisy = total + _numpy_prefix_noise(jnp.zeros(D), t, tree_key, z * clip)
        velocity = momentum * velocity + noisy / m
        params = x0 - lr * velocity  # argmin <s_t, x> + ||x - x0||^2 / (2 lr), with momentum
        np.testing.assert_allclose(history[t - 1], params, rtol=2e-4, atol=2e-5)
    assert int(state.aggregator_state.step) == rounds
    np.testing.assert_allclose(np.asarray(state.aggregator_state.cumulative_sum), total,
                               rtol=2e-4, atol=2e-5)


def test_bad_arguments_are_refused_before_anything_compiles():
    with pytest.raises(ValueError, match="noise_multiplier"):
        fl.algorithms.dp_ftrl(_loss, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="server_momentum"):
        fl.algorithms.dp_ftrl(_loss, server_momentum=1.0)
    with pytest.raises(ValueError, match="server_momentum: give either"):
        fl.algorithms.dp_ftrl(_loss, server_momentum=0.9, server_optimizer=optax.sgd(1.0))
    with pytest.raises(ValueError, match="max_participations"):
        privacy.ftrl_epsilon(1.0, 10, 1e-5, max_participations=11)
    with pytest.raises(ValueError, match="accountant"):
        privacy.ftrl_epsilon(1.0, 10, 1e-5, accountant="moments")
    # Its aggregate is a prefix sum: another aggregator cannot take over.
    with pytest.raises(ValueError):
        fl.algorithms.with_privacy(fl.algorithms.dp_ftrl(_loss))
    assert fl.algorithms.REGISTRY["dp_ftrl"] is fl.algorithms.dp_ftrl


def test_ftrl_epsilon_is_dp_accountings_tree_mechanism_and_the_hand_computation():
    z, rounds, delta = 8.0, 1000, 1e-5
    levels = math.ceil(math.log2(rounds + 1))  # 10
    assert privacy.tree_sensitivity(rounds) == pytest.approx(math.sqrt(levels))
    # RDP of the tree: alpha * L / (2 z^2), converted as dp-accounting converts it.
    orders = np.asarray(dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, float)
    orders = orders[orders > 1]
    rdp = orders * levels / (2 * z**2)
    hand = np.min(rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1))
    got_rdp = privacy.ftrl_epsilon(z, rounds, delta, accountant="rdp")
    assert got_rdp == pytest.approx(hand, rel=1e-9)
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, rounds))
    assert got_rdp == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    # The paper's closed form: rho-zCDP, rho = L / (2 z^2), eps <= rho + 2 sqrt(rho log(1/delta)).
    rho = levels / (2 * z**2)
    closed = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert got_rdp <= closed
    # Exact: the Gaussian mechanism of mu = sqrt(L) / z, whose delta(eps) is known
    # (Balle & Wang 2018): delta = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu).
    mu = math.sqrt(levels) / z
    exact_delta = lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu)  # noqa: E731
    exact = brentq(lambda e: exact_delta(e) - delta, 1e-6, 50, xtol=1e-12)
    got_exact = privacy.ftrl_epsilon(z, rounds, delta, accountant="exact")
    assert got_exact == pytest.approx(exact, rel=1e-6)
    assert privacy.ftrl_epsilon(z, rounds, delta, accountant="pld") == got_exact
    # dp-accounting's PLD accountant of the same Gaussian agrees (pessimistically).
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(levels)))
    assert exact <= acc.get_epsilon(delta) <= exact * 1.01
    assert got_exact < got_rdp  # exact is tighter here, and "best" takes it
    assert privacy.ftrl_epsilon(z, rounds, delta) == got_exact
    # k participations in one tree: sensitivity^2 = sum_h k min(k, 2^h) <= k^2 L.
    k = 3
    sens2 = sum(k * min(k, 2**h) for h in range(levels))
    assert privacy.tree_sensitivity(rounds, k) ** 2 == pytest.approx(sens2)
    assert sens2 < k**2 * levels
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(sens2)))
    got = privacy.ftrl_epsilon(z, rounds, delta, max_participations=k, accountant="rdp")
    assert got == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    assert got > got_rdp
    assert privacy.ftrl_epsilon(0.0, rounds, delta) == math.inf


def test_a_dp_ftrl_config_reports_the_tree_epsilon_with_no_sampling_assumption():
    cfg = exp_lib.validate({
        "algorithms": [{"name": "dp_ftrl", "noise_multiplier": 30.0}],
        "privacy": {"delta": 1e-3}, "training": {"cohort_size": 10},
    })
    spent = exp_lib.privacy_spent(cfg, cfg["algorithms"][0], rounds=12, num_clients=100)
    # Any client may be drawn in all 12 rounds: k = 12 participations in the one tree.
    want = min(privacy.ftrl_epsilon(30.0, 12, 1e-3, max_participations=12, accountant=a)
               for a in ("rdp", "exact"))
    assert spent["epsilon"] == want and spent["max_participations"] == 12
    assert spent["sampling"] == "none" and spent["accountant"] in ("rdp", "exact")
    assert spent["epsilon"] > privacy.ftrl_epsilon(30.0, 12, 1e-3)  # more than one participation
    rdp = exp_lib.validate({**cfg, "privacy": {"delta": 1e-3, "accountant": "rdp"}})
    assert exp_lib.privacy_spent(rdp, rdp["algorithms"][0], 12, 100)["epsilon"] == (
        privacy.ftrl_epsilon(30.0, 12, 1e-3, max_participations=12, accountant="rdp"))


def test_max_participations_is_enforced_and_accounted():
    key = jax.random.key(2)
    capped = fl.algorithms.dp_ftrl(_loss, noise_multiplier=0.0, clip_norm=0.3,
                                   server_learning_rate=0.5, max_participations=2)
    free = fl.algorithms.dp_ftrl(_loss, noise_multiplier=0.0, clip_norm=0.3,
                                 server_learning_rate=0.5)
    x, y = _problem()
    state_c, state_f = capped.init(jnp.zeros(D), num_clients=CLIENTS), free.init(jnp.zeros(D))
    seen = []
    for _ in range(4):  # the same cohort every round: everyone hits the cap after round 2
        state_c, _ = fl.run_round(capped, state_c, _cohort(x, y, 2), key)
        state_f, _ = fl.run_round(free, state_f, _cohort(x, y, 2), key)
        seen.append((np.asarray(state_c.params), np.asarray(state_f.params)))
    np.testing.assert_array_equal(seen[1][0], seen[1][1])  # rounds 1-2: the same
    np.testing.assert_array_equal(seen[3][0], seen[1][0])  # then nothing is added
    assert not np.allclose(seen[3][1], seen[1][1])
    assert np.asarray(state_c.client_states).tolist() == [2] * CLIENTS
    with pytest.raises(ValueError, match="num_clients"):
        fl.run_round(capped, capped.init(jnp.zeros(D)), _cohort(x, y, 1), key)
    with pytest.raises(ValueError, match="max_participations"):
        fl.algorithms.dp_ftrl(_loss, max_participations=0)
    cfg = exp_lib.validate({"algorithms": [{"name": "dp_ftrl", "noise_multiplier": 30.0,
                                            "max_participations": 3}],
                            "privacy": {"delta": 1e-3}})
    spent = exp_lib.privacy_spent(cfg, cfg["algorithms"][0], rounds=12, num_clients=100)
    assert spent["max_participations"] == 3
    assert spent["epsilon"] == privacy.ftrl_epsilon(30.0, 12, 1e-3, max_participations=3)
