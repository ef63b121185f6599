"""Cohort sampling at scale: distinct, uniform, and independent of the population's size."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.data import sampling


def _draws(num_clients: int, cohort_size: int, num_draws: int, seed: int = 0) -> np.ndarray:
    keys = jax.random.split(jax.random.key(seed), num_draws)
    fn = jax.jit(jax.vmap(lambda k: sampling.sample_clients(k, num_clients, cohort_size)))
    return np.asarray(fn(keys))


def _chi2(counts: np.ndarray) -> tuple[float, int]:
    expected = counts.sum() / counts.size
    return float(np.sum((counts - expected) ** 2 / expected)), counts.size - 1


def _assert_uniform(counts: np.ndarray) -> None:
    stat, dof = _chi2(np.asarray(counts, np.float64))
    # mean dof, sd sqrt(2 dof): 6 sd is far beyond chance (p < 1e-6) yet catches any real skew.
    assert stat < dof + 6 * np.sqrt(2 * dof), (stat, dof)


@pytest.mark.parametrize(
    "num_clients,cohort_size",
    [(1, 1), (12, 3), (10, 3), (1_000_000, 100)],  # 10, 3: Gumbel path (4 * C > N)
)
def test_ids_are_distinct_and_in_range(num_clients, cohort_size):
    ids = _draws(num_clients, cohort_size, 8)
    assert ids.shape == (8, cohort_size) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < num_clients
    for row in ids:
        assert len(set(row.tolist())) == cohort_size


def test_every_subset_equally_likely():
    # 8 clients, 2 a round, 4*C = N: the redraw path at its densest. Each of the 28 subsets
    # should come up 1/28 of the time, each client at each position 1/8 of the time.
    draws = _draws(8, 2, 6000, seed=1)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(8), 2))}
    counts = np.zeros(len(subsets))
    for row in draws:
        counts[subsets[tuple(sorted(row.tolist()))]] += 1
    _assert_uniform(counts)
    for position in range(2):
        _assert_uniform(np.bincount(draws[:, position], minlength=8))


def test_client_frequencies_uniform_in_a_large_population():
    draws = _draws(200, 20, 2000, seed=2)
    _assert_uniform(np.bincount(draws.ravel(), minlength=200))
    # Ids that differ only in high bits are as likely as neighbours (no bias toward low ids).
    draws = _draws(1 << 30, 50, 400, seed=3)
    assert len(np.unique(draws)) > 0.99 * draws.size
    assert abs(np.mean(draws >= 1 << 29) - 0.5) < 0.02


def test_cost_does_not_depend_on_the_population():
    # An O(N) sampler would allocate gigabytes for N = 2^31 - 1 and fail or crawl.
    big = jax.jit(lambda k: sampling.sample_clients(k, (1 << 31) - 1, 100))
    jaxpr = jax.make_jaxpr(lambda k: sampling.sample_clients(k, (1 << 31) - 1, 100))(
        jax.random.key(0)
    )
    largest = max(
        (int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars),
        default=0,
    )
    assert largest <= 100
    ids = np.asarray(big(jax.random.key(0)))
    assert len(set(ids.tolist())) == 100


def test_pure_function_of_the_key():
    f = jax.jit(lambda k: sampling.sample_clients(k, 1_000_000, 100))
    a, b = f(jax.random.key(5)), f(jax.random.key(5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, f(jax.random.key(6)))
    np.testing.assert_array_equal(a, sampling.distinct_uniform(jax.random.key(5), 1_000_000, 100))


def test_weighted_path_never_picks_zero_weight_clients():
    probs = jnp.array([0.0, 1.0, 0.0, 2.0, 1.0, 0.0])
    keys = jax.random.split(jax.random.key(0), 50)
    ids = np.asarray(jax.vmap(lambda k: sampling.sample_clients(k, 6, 2, probs))(keys))
    assert set(ids.ravel().tolist()) <= {1, 3, 4}


@pytest.mark.parametrize("cohort_size", [0, 11])
def test_bad_cohort_size_is_a_value_error(cohort_size):
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.sample_clients(jax.random.key(0), 10, cohort_size)
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.distinct_uniform(jax.random.key(0), 10, cohort_size)


def test_build_cohort_is_plan_then_client_batches():
    # Streaming a cohort client by client (plan_cohort + client_batches inside the map) must
    # give exactly the batches of the up-front gather.
    rng = np.random.default_rng(0)
    sizes = np.array([3, 1, 5, 2, 4])
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]))
    examples = {"x": jnp.asarray(rng.normal(size=(15, 2)), jnp.float32), "y": jnp.arange(15)}
    ids, available = jnp.array([4, 1, 2]), jnp.array([1.0, 0.0, 1.0])
    static = dict(num_steps=2, batch_size=3, max_client_size=5, epochs=1)
    key = jax.random.key(3)
    cohort = sampling.build_cohort(key, examples, offsets, ids, available, **static)
    plan, weights = sampling.plan_cohort(key, offsets, ids, available)
    np.testing.assert_array_equal(weights, cohort.weights)
    np.testing.assert_array_equal(weights, [4.0, 0.0, 5.0])
    for i in range(3):
        row = jax.tree.map(lambda a, i=i: a[i], plan)
        one = sampling.client_batches(**row, examples=examples, **static)
        for name in ("x", "y", "mask"):
            np.testing.assert_array_equal(one[name], cohort.batches[name][i])
    # Client 4 holds examples 11..14 and walks them once: each exactly once, 2 padding slots.
    real = np.asarray(cohort.batches["y"][0])[np.asarray(cohort.batches["mask"][0]) > 0]
    assert sorted(real.tolist()) == [11, 12, 13, 14]
    assert float(cohort.batches["mask"][1].sum()) == 0.0
