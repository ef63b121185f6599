"""Size-weighted sampling by binary search (``size_weighted(method="search")``).

Successive sampling (each next client drawn with probability proportional to its weight among
those not yet drawn) computed two ways must be ONE distribution: the prefix-sum search with
rejected duplicates against Gumbel top-k and against the closed-form Plackett-Luce law.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_lab as fl
from fedjax_lab.data import sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS = np.array([1, 2, 3, 5, 8, 13])  # N = 6, unequal
DRAWS = 20_000
ALPHA = 1e-3  # significance of every chi-square test below (fixed seeds: deterministic)


def _search_draws(weights, cohort_size, num_draws, seed):
    cum = sampling.cumulative_weights(jnp.asarray(weights))
    keys = jax.random.split(jax.random.key(seed), num_draws)
    fn = jax.jit(jax.vmap(lambda k: sampling.sample_cumulative(k, cum, cohort_size)))
    return np.asarray(fn(keys))


def _gumbel_draws(weights, cohort_size, num_draws, seed):
    probs = jnp.asarray(weights, jnp.float32)
    keys = jax.random.split(jax.random.key(seed), num_draws)
    fn = jax.jit(jax.vmap(lambda k: sampling.sample_clients(k, len(weights), cohort_size, probs)))
    return np.asarray(fn(keys))


def _plackett_luce_pair(w, i, j):
    """P(first = i, second = j) of successive sampling with weights ``w``."""
    total = w.sum()
    return w[i] / total * w[j] / (total - w[i])


ORDERED = list(itertools.permutations(range(len(WEIGHTS)), 2))
UNORDERED = list(itertools.combinations(range(len(WEIGHTS)), 2))


def _ordered_counts(draws):
    index = {p: k for k, p in enumerate(ORDERED)}
    return np.bincount([index[tuple(r)] for r in draws.tolist()], minlength=len(ORDERED))


def _unordered_counts(draws):
    index = {p: k for k, p in enumerate(UNORDERED)}
    return np.bincount([index[tuple(sorted(r))] for r in draws.tolist()],
                       minlength=len(UNORDERED))


def test_search_matches_the_closed_form_and_the_gumbel_sampler():
    search = _search_draws(WEIGHTS, 2, DRAWS, seed=0)
    gumbel = _gumbel_draws(WEIGHTS, 2, DRAWS, seed=1)
    w = WEIGHTS.astype(np.float64)
    # Goodness of fit of every ORDERED pair (29 dof) to the Plackett-Luce probabilities.
    expected = np.array([_plackett_luce_pair(w, i, j) for i, j in ORDERED]) * DRAWS
    for draws in (search, gumbel):
        p = stats.chisquare(_ordered_counts(draws), expected).pvalue
        assert p > ALPHA, p
    # Homogeneity of the two samplers' unordered-pair frequencies (2 x 15 table, 14 dof).
    table = np.stack([_unordered_counts(search), _unordered_counts(gumbel)])
    assert stats.chi2_contingency(table).pvalue > ALPHA
    # The test has power: the same draws are far from a uniform choice of pairs.
    uniform = np.full(len(UNORDERED), DRAWS / len(UNORDERED))
    assert stats.chisquare(_unordered_counts(search), uniform).pvalue < 1e-12


def test_never_duplicates_and_never_a_zero_weight_client():
    weights = np.array([0, 4, 0, 1, 0, 7, 2, 0])  # 4 positive clients
    draws = _search_draws(weights, 4, 500, seed=2)
    for row in draws.tolist():
        assert sorted(row) == [1, 3, 5, 6]
    # Three of the positive clients: each position over clients of positive weight only.
    draws = _search_draws(weights, 3, 500, seed=3)
    assert set(draws.ravel().tolist()) <= {1, 3, 5, 6}
    assert all(len(set(r)) == 3 for r in draws.tolist())


def test_one_heavy_client_forces_many_rejected_draws_and_stays_exact():
    # Client 0 holds 97.6% of the weight: after it is drawn almost every draw repeats it.
    weights = np.array([200, 1, 1, 1, 1, 1])
    draws = _search_draws(weights, 3, 1000, seed=4)
    assert all(len(set(r)) == 3 for r in draws.tolist())
    assert np.mean(draws[:, 0] == 0) > 0.95  # the heavy client comes first
    # The rest are equally likely at every position after the first.
    tail = draws[draws[:, 0] == 0][:, 1:]
    counts = np.bincount(tail.ravel(), minlength=6)[1:]
    assert stats.chisquare(counts).pvalue > ALPHA


def test_large_population_distinct_in_range_and_size_biased():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=1_000_000)
    draws = _search_draws(sizes, 100, 8, seed=5)
    assert draws.shape == (8, 100) and draws.dtype == np.int32
    assert draws.min() >= 0 and draws.max() < sizes.size
    assert all(len(set(r)) == 100 for r in draws.tolist())
    # Size-biased: the mean size of a drawn client is E[n^2] / E[n] = 5.67, not 4.5.
    assert abs(sizes[draws].mean() - 51 / 9) < 0.3


def test_size_weighted_methods():
    small = jnp.asarray(np.arange(1, 11), jnp.int32)
    key = jax.random.key(7)
    # Below SEARCH_MIN_CLIENTS "auto" is the Gumbel sampler it always was, bit for bit.
    auto, gumbel = sampling.size_weighted(), sampling.size_weighted("gumbel")
    assert auto.init(small) == () and gumbel.init(small) == ()
    want = sampling.sample_clients(key, 10, 3, small)
    for s in (auto, gumbel):
        np.testing.assert_array_equal(s.sample((), key, 0, 3, small)[0], want)
    # "search" keeps the prefix sums as its state, unchanged by sampling.
    search = sampling.size_weighted("search")
    state = search.init(small)
    ids, avail, new_state = search.sample(state, key, 0, 3, small)
    np.testing.assert_array_equal(new_state, np.concatenate([[0], np.cumsum(small)]))
    np.testing.assert_array_equal(ids, sampling.sample_cumulative(key, state, 3))
    assert avail.tolist() == [1.0] * 3
    # From SEARCH_MIN_CLIENTS on "auto" searches.
    big = jnp.ones(sampling.SEARCH_MIN_CLIENTS, jnp.int32)
    assert auto.init(big).shape == (sampling.SEARCH_MIN_CLIENTS + 1,)
    assert sampling.size_weighted() is sampling.size_weighted("auto")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="method"):
        sampling.size_weighted("tree")
    with pytest.raises(TypeError, match="weights"):
        sampling.cumulative_weights(jnp.ones(3))
    with pytest.raises(ValueError, match="weights"):
        sampling.cumulative_weights(jnp.array([1, -1, 2]))
    with pytest.raises(ValueError, match="2\\^31"):
        sampling.cumulative_weights(np.full(3, 2**30, np.int32))
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.sample_cumulative(jax.random.key(0), jnp.array([0, 1, 2]), 3)


def test_run_rounds_with_the_search_sampler():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, size=40)
    x = rng.normal(size=(int(sizes.sum()), 3)).astype(np.float32)
    data = fl.data.FederatedData.from_client_arrays(
        [{"x": a, "y": (a[:, 0] > 0).astype(np.int32)} for a in np.split(x, np.cumsum(sizes)[:-1])]
    )
    model = fl.models.logistic_regression((3,), 2)
    alg = fl.algorithms.fed_avg(fl.models.classification_loss(model), optax.sgd(0.1))
    sampler = sampling.size_weighted("search")
    state, hist = fl.run_rounds(alg, alg.init(model.init(jax.random.key(0))), data,
                                jax.random.key(1), num_rounds=3, cohort_size=5, batch_size=2,
                                sampler=sampler, client_map=fl.maps.sequential())
    ids = np.asarray(hist["client_ids"])
    assert ids.shape == (3, 5) and all(len(set(r)) == 5 for r in ids.tolist())
    np.testing.assert_array_equal(state.sampler_state, np.concatenate([[0], np.cumsum(sizes)]))
    # Round r's cohort is sample_cumulative on round r's sampling key, as the engine derives it.
    from fedjax_lab._scan import data_key

    for r in range(3):
        k_sample, _ = jax.random.split(data_key(jax.random.key(1), jnp.int32(r)))
        want = sampling.sample_cumulative(k_sample, state.sampler_state, 5)
        np.testing.assert_array_equal(ids[r], want)


def test_benchmark_smoke_writes_the_shares(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_sampling", ROOT / "experiments/benchmarks/sampling.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "sampling.json"
    module.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["smoke"] and result["round_s"] > 0
    assert set(result["samplers"]) == {"gumbel", "search"}
    for r in result["samplers"].values():
        for field in ("call_s", "per_round_in_scan_s", "run_rounds_s_per_round", "share"):
            assert r[field] > 0, field
        assert r["share"] == pytest.approx(r["per_round_in_scan_s"] / r["run_rounds_s_per_round"])
