"""fl.valuation: coalition utilities as one vmapped program, leave-one-out and Shapley values.

A tiny federated least-squares problem: five clients share one true model, except client 4
(the planted useless one) whose labels are pure noise. The utility is minus the validation
MSE after a few FedAvg rounds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lab as fl
from fedjax_lab import valuation

ROOT = Path(__file__).resolve().parents[1]
N, DIM, ROUNDS, BATCH, PLANTED = 5, 3, 3, 4, 4


def _loss(p, b, k):
    del k
    return jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / jnp.maximum(b["mask"].sum(), 1.0)


def _problem(garbage_client: int | None = None):
    rng = np.random.default_rng(0)
    w = rng.normal(size=DIM)
    clients = []
    for i in range(N):
        x = rng.normal(size=(8, DIM)).astype("f4")
        y = x @ w + 0.1 * rng.normal(size=8)
        if i == PLANTED:
            y = 3.0 * rng.normal(size=8)  # labels unrelated to x
        if i == garbage_client:
            x, y = np.full_like(x, 1e3), np.full_like(y, -1e3)
        clients.append({"x": x, "y": y.astype("f4")})
    xv = rng.normal(size=(64, DIM)).astype("f4")
    yv = jnp.asarray(xv @ w, jnp.float32)
    xv = jnp.asarray(xv)

    def val_fn(p):
        return -jnp.mean((xv @ p - yv) ** 2)

    return fl.FederatedData.from_client_arrays(clients), val_fn


ALG = fl.algorithms.fed_avg(_loss, client_learning_rate=0.1)
STATE = ALG.init(jnp.zeros(DIM))
KEY = jax.random.key(3)


def _utility(data, val_fn, **kw):
    kw = {"num_rounds": ROUNDS, "batch_size": BATCH, "chunk_size": 32, **kw}
    return valuation.utility(ALG, STATE, data, val_fn, KEY, **kw)


@pytest.fixture(scope="module")
def problem():
    data, val_fn = _problem()
    u = _utility(data, val_fn)
    exact = valuation.exact_shapley(u, N)  # all 32 coalitions: one compiled call
    return data, val_fn, u, exact


def _table_game(utility_fn, n):
    """The utility of every coalition, looked up (no training) from the 2^n evaluated ones."""
    codes = np.arange(2 ** n)
    table = utility_fn(((codes[:, None] >> np.arange(n)) & 1).astype("f4"))

    def game(masks):
        return table[(np.asarray(masks).astype(int) << np.arange(n)).sum(axis=1)]

    return game


def test_planted_useless_client_gets_the_lowest_values(problem):
    data, val_fn, u, exact = problem
    loo = valuation.leave_one_out(u, N)
    mc = valuation.monte_carlo_shapley(u, N, jax.random.key(0), num_permutations=40)
    for v in (exact, loo, mc):
        values = np.asarray(v.values)
        assert np.argmin(values) == PLANTED, (v.method, values)
        assert values[PLANTED] < 0, (v.method, values)
        assert np.all(np.delete(values, PLANTED) > 0), (v.method, values)
    assert loo.num_evaluations == N + 2
    assert exact.num_evaluations == 2 ** N
    assert mc.num_evaluations <= 2 ** N  # repeated prefixes are evaluated once


def test_empty_coalition_is_the_initial_model_and_efficiency_holds(problem):
    _, val_fn, u, exact = problem
    assert exact.utility_empty == pytest.approx(float(val_fn(STATE.params)), abs=1e-6)
    assert exact.utility_all > exact.utility_empty  # training on the population helps
    gain = exact.utility_all - exact.utility_empty
    for p in (1, 3, 17):
        mc = valuation.monte_carlo_shapley(u, N, jax.random.key(p), num_permutations=p)
        assert mc.utility_all == exact.utility_all and mc.utility_empty == exact.utility_empty
        assert mc.values.sum() == pytest.approx(gain, rel=1e-12, abs=1e-12)
    assert exact.values.sum() == pytest.approx(gain, rel=1e-9)


def test_monte_carlo_converges_to_exact_shapley(problem):
    _, _, u, exact = problem
    game = _table_game(u, N)
    few = valuation.monte_carlo_shapley(game, N, jax.random.key(1), num_permutations=200)
    many = valuation.monte_carlo_shapley(game, N, jax.random.key(2), num_permutations=4000)
    error = np.abs(many.values - exact.values)
    assert np.all(error <= 4 * many.stderr + 1e-9), (many.values, exact.values, many.stderr)
    assert error.max() < 0.05 * np.abs(exact.values).max()
    # the standard error falls as 1/sqrt(P): 20x the permutations, ~4.5x smaller
    ratio = few.stderr / many.stderr
    assert np.all((ratio > 3) & (ratio < 7)), ratio


def test_games_with_known_values():
    worth = np.array([2.0, -1.0, 0.5, 0.0])
    additive = lambda m: 7.0 + m @ worth  # noqa: E731
    for v in (valuation.exact_shapley(additive, 4), valuation.leave_one_out(additive, 4),
              valuation.monte_carlo_shapley(additive, 4, jax.random.key(0), 9)):
        np.testing.assert_allclose(v.values, worth, atol=1e-12)
    # symmetric: U = 1 when at least 2 of 3 clients take part; each is worth 1/3 by symmetry
    majority = lambda m: (m.sum(axis=1) >= 2).astype(float)  # noqa: E731
    np.testing.assert_allclose(valuation.exact_shapley(majority, 3).values, [1 / 3] * 3)
    assert valuation.leave_one_out(majority, 3).values.tolist() == [0.0, 0.0, 0.0]


def test_vmapped_utilities_equal_one_coalition_at_a_time(problem):
    data, val_fn, u, _ = problem
    masks = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 0]], "f4")
    batched = u(masks)
    one_at_a_time = []
    for mask in masks:
        state = STATE._replace(sampler_state=valuation.coalition_state(mask))
        final, hist = fl.run_rounds(ALG, state, data, KEY, num_rounds=ROUNDS, cohort_size=N,
                                    batch_size=BATCH, sampler=valuation.coalition())
        assert np.all(np.asarray(hist["client_ids"]) == np.arange(N))
        one_at_a_time.append(float(val_fn(final.params)))
    np.testing.assert_allclose(batched, one_at_a_time, rtol=1e-5, atol=1e-6)
    mapped = _utility(data, val_fn, chunk_size=3, mask_map="map")(masks)  # 2 chunks, padded
    np.testing.assert_allclose(mapped, one_at_a_time, rtol=1e-5, atol=1e-6)


def test_clients_outside_the_coalition_change_nothing(problem):
    data, val_fn, u, _ = problem
    garbage, _ = _problem(garbage_client=2)
    masks = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], "f4")
    plain, spoiled = u(masks), _utility(garbage, val_fn)(masks)
    assert spoiled[0] == pytest.approx(plain[0], abs=1e-6)  # client 2 is out: no effect
    assert abs(spoiled[1] - plain[1]) > 1.0  # client 2 in: its garbage counts


def test_cohort_intersected_with_the_coalition(problem):
    data, val_fn, _, _ = problem
    u = _utility(data, val_fn, cohort_size=2, chunk_size=2)
    full, empty = u(np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], "f4"))
    final, _ = fl.run_rounds(ALG, STATE, data, KEY, num_rounds=ROUNDS, cohort_size=2,
                             batch_size=BATCH)  # the default uniform sampler, same key
    assert full == pytest.approx(float(val_fn(final.params)), rel=1e-5)
    assert empty == pytest.approx(float(val_fn(STATE.params)), abs=1e-6)


def test_bad_arguments_raise_before_compiling(problem):
    data, val_fn, u, _ = problem
    game = lambda m: m.sum(axis=1)  # noqa: E731
    with pytest.raises(ValueError, match="num_permutations"):
        valuation.monte_carlo_shapley(game, 3, jax.random.key(0), num_permutations=0)
    with pytest.raises(ValueError, match="masks: expected shape"):
        u(np.ones((2, N + 1)))
    with pytest.raises(ValueError, match="masks: expected shape"):
        u(np.ones(N))
    with pytest.raises(ValueError, match="0 .out of the coalition"):
        u(np.full((1, N), 0.5))
    with pytest.raises(ValueError, match="num_clients: the utility values coalitions of 5"):
        valuation.leave_one_out(u, 4)
    with pytest.raises(ValueError, match="at most"):
        valuation.exact_shapley(game, valuation.MAX_EXACT_CLIENTS + 1)
    with pytest.raises(ValueError, match="one utility per mask"):
        valuation.leave_one_out(lambda m: np.zeros(1), 3)
    with pytest.raises(TypeError, match="utility_fn"):
        valuation.leave_one_out("u", 3)
    with pytest.raises(ValueError, match="chunk_size"):
        _utility(data, val_fn, chunk_size=0)
    with pytest.raises(ValueError, match="mask_map"):
        _utility(data, val_fn, mask_map="pmap")
    with pytest.raises(ValueError, match="give cohort_size"):
        _utility(data, val_fn, sampler=fl.data.sampling.uniform())
    with pytest.raises(ValueError, match="val_fn: must return a scalar"):
        _utility(data, lambda p: p)
    with pytest.raises(TypeError, match="base"):
        valuation.coalition("uniform")


def test_shapley_100_experiment_smoke(tmp_path):
    out = tmp_path / "shapley.json"
    path = ROOT / "experiments" / "valuation" / "shapley_100.py"
    spec = importlib.util.spec_from_file_location("shapley_100", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out", str(out)])
    got = json.loads(out.read_text())
    n = got["setup"]["num_clients"]
    for method in ("leave_one_out", "monte_carlo_shapley"):
        row = got[method]
        assert 1 <= row["planted_rank_from_lowest"] <= n and row["num_evaluations"] >= 1
        assert len(got["values"][method]) == n
    mc = got["monte_carlo_shapley"]
    assert mc["sum_of_values"] == pytest.approx(mc["utility_all"] - mc["utility_empty"], abs=1e-9)
    assert got["leave_one_out"]["num_evaluations"] == n + 2
