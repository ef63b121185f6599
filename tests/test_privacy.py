"""DP-FedAvg: clipping bounds, noise calibration, accounting, reproducibility, adaptive clipping."""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn

import fedjax_lab as fl
from fedjax_lab import privacy
from fedjax_lab.algorithms.dp_fedavg import dp_fed_avg


def _updates(n=20, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.01, 100.0, n)
    return [
        {"w": jnp.asarray(s * rng.normal(size=(4, 3)), jnp.float32),
         "b": jnp.asarray(s * rng.normal(size=(3,)), jnp.float32)}
        for s in scales
    ]


def _norm(tree):
    return float(optax.tree.norm(tree))


def test_flat_clipping_bounds_every_update():
    agg = privacy.dp_aggregator(0.0, 1.5)
    state = agg.init(_updates()[0])
    for u in _updates():
        clipped, took_part, unclipped, slot = agg.prepare(u, jnp.float32(2.0), state)
        assert _norm(clipped) <= 1.5 * (1 + 1e-5)
        if _norm(u) <= 1.5:  # small updates pass unchanged
            assert_trees_close(clipped, u)
            assert float(unclipped) == 1.0
        else:  # large ones are scaled down, direction kept
            assert _norm(clipped) == pytest.approx(1.5, rel=1e-5)
            assert float(unclipped) == 0.0
        assert float(took_part) == 1.0 and float(slot) == 1.0
    # a zero-weight (padding) client contributes nothing and is not counted
    clipped, took_part, unclipped, _ = agg.prepare(_updates()[5], jnp.float32(0.0), state)
    assert _norm(clipped) == 0.0 and float(took_part) == 0.0 and float(unclipped) == 0.0


@pytest.mark.parametrize("budget", ["equal", "size", [3.0, 1.0]])
def test_per_layer_clipping_bounds_every_leaf(budget):
    agg = privacy.dp_aggregator(0.0, 2.0, per_layer=True, layer_budget=budget)
    template = _updates()[0]
    state = agg.init(template)
    limits = privacy.layer_clip_norms(template, 2.0, budget)
    assert sum(float(c) ** 2 for c in limits) == pytest.approx(4.0, rel=1e-5)
    for u in _updates():
        clipped = agg.prepare(u, jnp.float32(1.0), state)[0]
        for leaf, orig, c in zip(jax.tree.leaves(clipped), jax.tree.leaves(u), limits,
                                 strict=True):
            assert float(jnp.linalg.norm(leaf)) <= float(c) * (1 + 1e-5)
            if float(jnp.linalg.norm(orig)) <= float(c):
                np.testing.assert_allclose(leaf, orig, rtol=1e-6)
        assert _norm(clipped) <= 2.0 * (1 + 1e-5)


def test_bad_layer_budget_is_rejected():
    with pytest.raises(ValueError, match="layer_budget"):
        privacy.dp_aggregator(1.0, 1.0, per_layer=True, layer_budget=[1.0]).init(_updates()[0])


@pytest.mark.parametrize("denominator", [None, 8.0])
def test_noise_std_matches_z_times_c_over_denominator(denominator):
    z, c, slots = 1.3, 0.7, 5.0
    agg = privacy.dp_aggregator(z, c, expected_cohort_size=denominator)
    params = {"w": jnp.zeros((400,))}
    state = agg.init(params)
    summed = ({"w": jnp.zeros((400,))}, jnp.float32(3.0), jnp.float32(0.0), jnp.float32(slots))
    keys = jax.random.split(jax.random.key(3), 200)
    out = jax.vmap(lambda k: agg.finalize(summed, state, k)[0]["w"])(keys)
    m = slots if denominator is None else denominator
    expected = z * c / m
    # 80,000 draws: the sample std is within ~0.5% of the truth; 2% is a safe margin
    assert float(jnp.std(out)) == pytest.approx(expected, rel=0.02)
    assert abs(float(jnp.mean(out))) < 4 * expected / np.sqrt(out.size)
    _, total, _ = agg.finalize(summed, state, keys[0])
    assert float(total) == m


def test_fixed_denominator_sum_without_noise():
    agg = privacy.dp_aggregator(0.0, 1.0, expected_cohort_size=4)
    state = agg.init({"w": jnp.zeros(2)})
    ups = [jnp.array([3.0, 4.0]), jnp.array([0.3, 0.4]), jnp.array([10.0, 0.0])]
    parts = [agg.prepare({"w": u}, jnp.float32(w), state) for u, w in zip(ups, [1, 1, 0],
                                                                          strict=True)]
    summed = jax.tree.map(lambda *a: sum(a), *parts)
    mean, total, _ = agg.finalize(summed, state, jax.random.key(0))
    np.testing.assert_allclose(mean["w"], (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 4,
                               rtol=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_direct_dp_accounting(accountant):
    z, q, rounds, delta = 1.1, 0.02, 500, 1e-6
    acc = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
           else dp_accounting.pld.PLDAccountant())
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    assert privacy.epsilon(z, q, rounds, delta, accountant=accountant) == pytest.approx(
        acc.get_epsilon(delta), rel=1e-12)


def test_epsilon_uniform_sampling_uses_replace_one_rdp():
    # Replace-one sensitivity of a sum of updates clipped to C is 2C, and dp-accounting's
    # noise multiplier is sigma over that sensitivity: z = 1 (sigma = C) is 0.5 there.
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            1000, 20, dp_accounting.GaussianDpEvent(0.5)), 100))
    got = privacy.epsilon(1.0, 0.02, 100, 1e-5, sampling="uniform", num_clients=1000)
    assert got == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="accountant"):
        privacy.epsilon(1.0, 0.02, 100, 1e-5, sampling="uniform", accountant="pld",
                        num_clients=1000)
    with pytest.raises(ValueError, match="num_clients"):
        privacy.epsilon(1.0, 0.02, 100, 1e-5, sampling="uniform")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_multiplier_for_round_trips(accountant):
    q, rounds, delta, target = 0.05, 50, 1e-5, 3.0
    z = privacy.noise_multiplier_for(target, q, rounds, delta, accountant=accountant, tol=1e-3)
    eps = privacy.epsilon(z, q, rounds, delta, accountant=accountant)
    assert eps <= target * (1 + 1e-6)
    assert eps == pytest.approx(target, rel=0.01)
    assert privacy.epsilon(0.97 * z, q, rounds, delta, accountant=accountant) > target


def test_accounting_input_errors():
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon(1.0, 0.1, 10, 2.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.epsilon(1.0, 0.0, 10, 1e-5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy.epsilon(-1.0, 0.1, 10, 1e-5)
    assert privacy.epsilon(0.0, 0.1, 10, 1e-5) == float("inf")


_ALG = dp_fed_avg(loss_fn, optax.sgd(0.1), noise_multiplier=1.0, clip_norm=0.05)


def test_same_key_same_noise_new_round_new_noise():
    state = _ALG.init(init_params())
    c, key = cohort(), jax.random.key(7)
    a, _ = fl.run_round(_ALG, state, c, key, client_map=fl.maps.sequential())
    b, _ = fl.run_round(_ALG, state, c, key, client_map=fl.maps.sequential())
    assert_trees_close(a.params, b.params, rtol=0, atol=0)
    later = state._replace(round=jnp.int32(1))
    d, _ = fl.run_round(_ALG, later, c, key, client_map=fl.maps.sequential())
    diff = optax.tree.norm(optax.tree.sub(a.params, d.params))
    assert float(diff) > 1e-3  # the clipped signal is identical; only the noise differs


def test_dp_fedavg_without_noise_or_clipping_is_uniform_fedavg():
    c = cohort()
    dp = dp_fed_avg(loss_fn, optax.sgd(0.1), noise_multiplier=0.0, clip_norm=1e6)
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    s1, s2 = dp.init(init_params()), ref.init(init_params())
    for _ in range(2):
        s1, _ = fl.run_round(dp, s1, c, jax.random.key(0), client_map=fl.maps.sequential())
        s2, _ = fl.run_round(ref, s2, c, jax.random.key(0), client_map=fl.maps.sequential())
    assert_trees_close(s1.params, s2.params)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sequential_equals_vmap(adaptive):
    alg = dp_fed_avg(loss_fn, optax.sgd(0.1), noise_multiplier=0.5, clip_norm=0.05,
                     per_layer=adaptive, adaptive_clipping=adaptive, clipped_count_stddev=1.0)
    results = []
    for m in (fl.maps.sequential(), fl.maps.vmap()):
        state = alg.init(init_params())
        for _ in range(2):
            state, _ = fl.run_round(alg, state, cohort(), jax.random.key(1), client_map=m)
        results.append(state)
    assert_trees_close(results[0].params, results[1].params, rtol=1e-5, atol=1e-6)
    assert_trees_close(results[0].aggregator_state, results[1].aggregator_state)


@pytest.mark.parametrize("start, quantile", [(0.05, 0.3), (20.0, 0.7)])
def test_adaptive_clipping_moves_c_toward_the_quantile(start, quantile):
    norms = np.linspace(0.1, 2.0, 20)  # the target quantile of these norms
    target = float(np.quantile(norms, quantile))
    agg = privacy.dp_aggregator(0.0, start, adaptive=True, target_quantile=quantile,
                                clip_learning_rate=0.2, clipped_count_stddev=0.01)
    ups = [{"w": jnp.array([n, 0.0], jnp.float32)} for n in norms]
    state = agg.init(ups[0])
    prepare = jax.jit(lambda s: jax.tree.map(
        lambda *a: sum(a), *[agg.prepare(u, jnp.float32(1.0), s) for u in ups]))
    finalize = jax.jit(agg.finalize)
    history = [float(state.clip_norm)]
    for t in range(150):
        _, _, state = finalize(prepare(state), state, jax.random.key(t))
        history.append(float(state.clip_norm))
    gaps = np.abs(np.log(np.array(history) / target))
    assert gaps[-1] < 0.15 and gaps[-1] < 0.2 * gaps[0]
    assert (history[10] > start) == (start < target)  # moved the right way from the start


def test_uniform_sampling_of_everyone_is_the_gaussian_mechanism_on_twice_the_clip():
    """q = 1 (every client every round): no amplification; replace-one sensitivity of the clipped
    sum is 2C, so z = 2 (sigma = 2C) must cost what a plain Gaussian of multiplier 1 costs."""
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 10))
    got = privacy.epsilon(2.0, 1.0, 10, 1e-5, sampling="uniform", num_clients=50)
    assert got == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


def test_noise_multiplier_for_uniform_sampling_meets_its_target():
    z = privacy.noise_multiplier_for(2.0, 0.02, 100, 1e-5, sampling="uniform", num_clients=1000)
    eps = privacy.epsilon(z, 0.02, 100, 1e-5, sampling="uniform", num_clients=1000)
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=0.02)
