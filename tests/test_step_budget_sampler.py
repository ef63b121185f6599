"""Sampled local-step budgets (fl.kit.BudgetSampler): drawn inside the compiled round from each
client's key of the round, equal to a host re-draw from the same keys, exactly the fixed-budget
run, distributed as documented, and configurable from TOML with errors naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_lab as fl
from fedjax_lab import kit
from tests._problems import assert_trees_equal, cohort, init_params, loss_fn, population

DATA = population()  # 10 clients of 2..8 examples
N = DATA.num_clients
E = 5  # the full local work, in steps
KEY = jax.random.key(11)
SPEEDS = [1.0, 0.8, 0.6, 0.45, 0.3, 1.0, 0.7, 0.5, 0.25, 0.9]
SAMPLERS = {
    "straggler": lambda: kit.straggler_budget(0.5, E),
    "uniform": lambda: kit.uniform_budget(1, E),
    "speed": lambda: kit.speed_budget(SPEEDS, E, jitter=0.4),
}


# ------------------------------------------------------------------ the host re-draw (NumPy)


def host_client_keys(key, round_, cohort_size):
    """The keys the round hands its clients: split(split(fold_in(key, r), 3)[0], C)."""
    k_clients = jax.random.split(jax.random.fold_in(key, round_), 3)[0]
    return jax.random.split(k_clients, cohort_size)


def host_budget(name, client_key, client_id):
    """The documented draw, from the raw random numbers, in NumPy."""
    k = jax.random.fold_in(client_key, kit.BUDGET_SALT)
    if name == "straggler":
        k_s, k_b = jax.random.split(k)
        u = float(jax.random.uniform(k_s))
        partial = int(jax.random.randint(k_b, (), 1, E + 1))
        return partial if u < 0.5 else E
    if name == "uniform":
        return int(jax.random.randint(k, (), 1, E + 1))
    z = np.float32(jax.random.normal(k, (), jnp.float32))
    j = np.float32(0.4)
    factor = np.exp(j * z - np.float32(0.5) * j * j, dtype=np.float32)
    steps = np.floor(np.float32(E) * np.float32(SPEEDS[client_id]) * factor)
    return int(np.clip(steps, 0, E))


def _fedprox(max_local_steps):
    return fl.algorithms.fed_prox(loss_fn, optax.sgd(0.3), mu=0.1,
                                  max_local_steps=max_local_steps)


def kind_of(client_id):
    """The budget model of a client of MIXED: clients 0-3 straggle, 4-6 uniform, 7-9 speed."""
    return "straggler" if client_id < 4 else "uniform" if client_id < 7 else "speed"


def _mixed() -> kit.BudgetSampler:
    """The three models in one sampler (one compiled program checks them all), by client id."""
    parts = {name: make() for name, make in SAMPLERS.items()}

    def draw(key, client_id):
        budgets = [parts[name].draw(key, client_id) for name in ("straggler", "uniform", "speed")]
        return jnp.where(client_id < 4, budgets[0],
                         jnp.where(client_id < 7, budgets[1], budgets[2]))

    return kit.BudgetSampler(draw, "mixed", parts["speed"].speeds)


# ----------------------------------------------------------------------- drawn in the round


STRAGGLERS = _fedprox(SAMPLERS["straggler"]())
MIXED = _fedprox(_mixed())
ROUNDS = 60
ONE_CLIENT = dict(cohort_size=1, batch_size=2, local_steps=E, client_map=fl.maps.sequential())


@pytest.fixture(scope="module")
def mixed_run():
    """(state, history) of 60 rounds of one client each (every local step real) under MIXED."""
    return fl.run_rounds(MIXED, MIXED.init(init_params()), DATA, KEY, num_rounds=ROUNDS,
                         **ONE_CLIENT)


def test_the_budgets_drawn_in_the_round_equal_a_host_redraw(mixed_run):
    # One client a round and local_steps = E real steps: the client's budget is both its
    # reported budget and its real steps, round by round.
    _, hist = mixed_run
    ids = np.asarray(hist["client_ids"])[:, 0]
    want = [host_budget(kind_of(int(ids[r])), host_client_keys(KEY, r, 1)[0], int(ids[r]))
            for r in range(ROUNDS)]
    np.testing.assert_array_equal(np.asarray(hist["local_step_budget"]), want)
    np.testing.assert_array_equal(np.asarray(hist["num_steps"]), want)
    np.testing.assert_array_equal(np.asarray(hist["budget_clients"]), np.ones(ROUNDS))
    for name in SAMPLERS:  # each model drawn several times, with varying budgets
        drawn = [w for w, i in zip(want, ids, strict=True) if kind_of(int(i)) == name]
        assert len(drawn) >= 8 and len(set(drawn)) >= 2, (name, drawn)


def test_a_sampled_run_resumes_exactly(mixed_run):
    full, _ = mixed_run  # the draws depend on (key, round) only
    half, _ = fl.run_rounds(MIXED, MIXED.init(init_params()), DATA, KEY,
                            num_rounds=ROUNDS // 2, **ONE_CLIENT)
    half, _ = fl.run_rounds(MIXED, half, DATA, KEY, num_rounds=ROUNDS // 2, **ONE_CLIENT)
    assert_trees_equal(full.params, half.params)


COHORT = cohort(num_clients=4, steps=E, batch=3, seed=2)  # ids 0..3, every step real


def test_a_sampled_budget_ends_exactly_where_the_fixed_budget_ends():
    # A vmapped cohort: its sampled budgets against the host re-draw from the keys the round
    # hands its 4 slots, given as fixed per-client budgets (client i's budget b_i).
    budgets = [host_budget("straggler", k, 0) for k in host_client_keys(KEY, 0, 4)]
    assert len(set(budgets)) > 1 and min(budgets) < E, budgets
    x0 = init_params()
    sampled = STRAGGLERS
    got, metrics = fl.run_round(sampled, sampled.init(x0), COHORT, KEY,
                                client_map=fl.maps.vmap())
    fixed = _fedprox(kit.per_client(budgets))
    want, _ = fl.run_round(fixed, fixed.init(x0), COHORT, KEY, client_map=fl.maps.vmap())
    assert_trees_equal(got.params, want.params)
    assert float(metrics["num_steps"]) == float(metrics["local_step_budget"]) == sum(budgets)
    assert float(metrics["budget_clients"]) == 4.0


def test_no_straggler_is_the_uncapped_run_bit_for_bit():
    # The budget's key is a fold of the client's key: the training keys are untouched.
    x0 = init_params()
    none, plain = _fedprox(kit.straggler_budget(0.0, E)), _fedprox(None)
    got, metrics = fl.run_round(none, none.init(x0), COHORT, KEY, client_map=fl.maps.vmap())
    want, _ = fl.run_round(plain, plain.init(x0), COHORT, KEY, client_map=fl.maps.vmap())
    assert_trees_equal(got.params, want.params)
    assert float(metrics["local_step_budget"]) == 4 * E


# ------------------------------------------------------------------------------ distributions


DRAWN = {  # the samplers of the distribution checks
    "straggler": kit.straggler_budget(0.3, E),
    "uniform": kit.uniform_budget(2, 6),
    "speed": kit.speed_budget([0.6], E, jitter=0.4),
    "speed_fixed": kit.speed_budget([1.0, 0.5, 0.19], E),
}


@pytest.fixture(scope="module")
def draws():
    """``[400, 10]`` budgets of each of DRAWN (400 cohorts of 10; client id 0, 2 for
    "speed_fixed"), from independent keys: one compiled program."""

    @jax.jit
    def run(keys):
        def each(sampler, client_id):
            return jax.vmap(lambda k: kit.client_budget(sampler, jnp.int32(client_id), k))(keys)

        return {name: each(s, 2 if name == "speed_fixed" else 0) for name, s in DRAWN.items()}

    out = run(jax.random.split(jax.random.key(5), 4000))
    return {k: np.asarray(v).reshape(400, 10) for k, v in out.items()}


def _chisquare_pvalue(counts, pmf):
    """Chi-square of ``counts`` against ``pmf``, cells of < 5 expected counts pooled."""
    expected = pmf * counts.sum()
    keep = expected >= 5
    o, x = counts[keep], expected[keep]
    if not keep.all():
        o, x = np.append(o, counts[~keep].sum()), np.append(x, expected[~keep].sum())
    return stats.chisquare(o, x * o.sum() / x.sum()).pvalue


def test_straggler_budgets_and_counts_follow_the_model(draws):
    p, c = 0.3, 10
    b = draws["straggler"]
    # budgets: P(E) = 1 - p + p/E, P(k) = p/E for k < E
    assert b.min() >= 1 and b.max() <= E
    pmf = np.full(E, p / E)
    pmf[-1] += 1 - p
    assert _chisquare_pvalue(np.bincount(b.ravel(), minlength=E + 1)[1:], pmf) > 1e-3
    # a cohort's clients that did less than E: Binomial(C, p (E - 1) / E)
    short = np.bincount(np.sum(b < E, axis=1), minlength=c + 1)
    assert _chisquare_pvalue(short, stats.binom.pmf(np.arange(c + 1), c, p * (E - 1) / E)) > 1e-3
    assert abs(b.mean() - (E - p * (E - 1) / 2)) < 0.1
    # a wrong model fails the same test: every straggler at one step
    wrong = np.full(E, 0.0)
    wrong[0], wrong[-1] = p, 1 - p
    assert _chisquare_pvalue(np.bincount(b.ravel(), minlength=E + 1)[1:], wrong + 1e-9) < 1e-6


def test_uniform_and_speed_budgets_follow_the_model(draws):
    b = draws["uniform"]
    counts = np.bincount(b.ravel(), minlength=7)
    assert counts[:2].sum() == 0 and counts.size == 7
    assert _chisquare_pvalue(counts[2:], np.full(5, 0.2)) > 1e-3
    # speed 0.6, jitter 0.4: budget >= k  <=>  z >= (log(k / (E s)) + j^2 / 2) / j
    s, j = 0.6, 0.4
    b = draws["speed"]
    edges = np.array([(np.log(k / (E * s)) + j * j / 2) / j for k in range(1, E + 1)])
    at_least = np.concatenate([[1.0], stats.norm.sf(edges), [0.0]])  # P(b >= k), k = 0..E+1
    pmf = at_least[:-1] - at_least[1:]
    pmf[E] = at_least[E]
    assert _chisquare_pvalue(np.bincount(b.ravel(), minlength=E + 1), pmf) > 1e-3
    # no jitter: the same floor(E s_i) every round
    assert np.all(draws["speed_fixed"] == 0)  # floor(5 * 0.19) every round


def test_lognormal_speeds_are_relative_to_the_fastest_client():
    z = np.random.default_rng(4).standard_normal(N)
    got = kit.lognormal_speeds(N, 0.7, seed=4).values
    np.testing.assert_allclose(np.asarray(got), np.exp(0.7 * (z - z.max())), rtol=1e-6)
    assert float(got.max()) == 1.0
    np.testing.assert_array_equal(kit.lognormal_speeds(3, 0.0).values, np.ones(3))


# ---------------------------------------------------------------------------------- errors


def test_bad_budget_samplers_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"fraction: must lie in \[0.0, 1.0\], got 1.5"):
        kit.straggler_budget(1.5, E)
    with pytest.raises(ValueError, match="max_steps: expected a whole number >= 1, got 0"):
        kit.straggler_budget(0.5, 0)
    with pytest.raises(ValueError, match="high: must be >= low = 3, got 2"):
        kit.uniform_budget(3, 2)
    with pytest.raises(ValueError, match="low: expected a whole number >= 0"):
        kit.uniform_budget(-1, 2)
    with pytest.raises(ValueError, match="speeds: every per-client value .* client 1 has -1"):
        kit.speed_budget([1.0, -1.0], E)
    with pytest.raises(ValueError, match="jitter: must be a finite number >= 0"):
        kit.speed_budget([1.0], E, jitter=-0.1)
    with pytest.raises(ValueError, match="sigma: must be a finite number >= 0"):
        kit.lognormal_speeds(3, -1.0)
    alg = _fedprox(kit.speed_budget([1.0, 0.5], E))
    with pytest.raises(ValueError, match=r"max_local_steps \(its speeds\): per_client gives 2 "
                                         "values, but the population has 10 clients"):
        alg.init(init_params(), num_clients=N)
    with pytest.raises(ValueError, match=r"max_local_steps \(its speeds\): per_client gives 2"):
        fl.run_rounds(alg, alg.init(init_params()), DATA, KEY, num_rounds=1, cohort_size=2,
                      batch_size=2, local_steps=E)


# ------------------------------------------------------------------------------------ TOML


TOML = """
[data]
name = "digits"
num_clients = 8
[model]
name = "logistic_regression"
[training]
rounds = 2
cohort_size = 4
batch_size = 8
local_steps = 4
client_map = "sequential"
[evaluation]
every = 2
[checkpoint]
every = 2
[[algorithms]]
name = "fedprox"
mu = 0.01
max_local_steps = {sample = "straggler", fraction = 0.5, max_steps = 4}
"""


def test_fedprox_with_stragglers_runs_from_toml(tmp_path):
    from fedjax_lab import cli
    from fedjax_lab import experiment as exp_lib

    path = tmp_path / "stragglers.toml"
    path.write_text(TOML)
    exp = exp_lib.build(exp_lib.load_config(path))
    want = fl.algorithms.fed_prox(exp.loss_fn, optax.sgd(0.1), mu=0.01,
                                  max_local_steps=kit.straggler_budget(0.5, 4))
    state = want.init(exp.model.init(jax.random.key(0)), num_clients=exp.train.num_clients)
    kw = dict(num_rounds=2, cohort_size=4, batch_size=8, local_steps=4,
              client_map=exp.client_map)
    built = exp.algorithms["fedprox"]
    got, hist = fl.run_rounds(built, built.init(state.params, num_clients=8), exp.train, KEY,
                              **kw)
    ref, _ = fl.run_rounds(want, state, exp.train, KEY, **kw)
    assert_trees_equal(got.params, ref.params)
    # the CLI's metrics.jsonl rows: the cohort's mean budget and mean steps taken
    rows = cli._rows(hist, 0)
    for row, budget, steps in zip(rows, hist["local_step_budget"], hist["num_steps"],
                                  strict=True):
        assert row["mean_local_step_budget"] == float(budget) / 4
        assert row["mean_local_steps"] == float(steps) / 4 == row["mean_local_step_budget"]
        assert 1.0 <= row["mean_local_step_budget"] <= 4.0
    plain = {k: v for k, v in hist.items() if k not in kit.budget_metrics(
        kit.uniform_budget(1, 1), 1, jnp.float32(1.0))}
    assert "mean_local_step_budget" not in cli._rows(plain, 0)[0]  # only with a sampler
    # the speed form, lognormal speeds sized to the data, and given speeds
    for table in ('{sample = "speed", max_steps = 4, sigma = 0.5, seed = 3}',
                  '{sample = "speed", max_steps = 4, speeds = [1, 1, 0.5, 0.5, 1, 1, 1, 0.2]}',
                  '{sample = "uniform", low = 0, high = 4}'):
        path.write_text(TOML.replace(
            '{sample = "straggler", fraction = 0.5, max_steps = 4}', table))
        built = exp_lib.build(exp_lib.load_config(path)).algorithms["fedprox"]
        built.init(state.params, num_clients=8)  # the speeds fit the population
    lognormal = exp_lib._budget_sampler("x", {"sample": "speed", "max_steps": 4, "sigma": 0.5,
                                              "seed": 3}, exp.train.client_sizes)
    np.testing.assert_array_equal(lognormal.speeds.values,
                                  kit.lognormal_speeds(8, 0.5, seed=3).values)


@pytest.mark.parametrize("table, match", [
    ('{sample = "fast"}', r"max_local_steps.sample: got 'fast'; allowed: 'speed', "
                          r"'straggler', 'uniform'"),
    ('{sample = "straggler", max_steps = 4}', r"max_local_steps.fraction: required by "
                                              r"sample = 'straggler'"),
    ('{sample = "straggler", fraction = 0.5, max_steps = 4, low = 1}',
     r"max_local_steps.low: not an option of sample = 'straggler'"),
    ('{sample = "straggler", fraction = 2.0, max_steps = 4}',
     r"max_local_steps.fraction: must lie in \[0.0, 1.0\], got 2.0"),
    ('{sample = "uniform", low = 3, high = 1}', r"max_local_steps.high: must be >= low"),
    ('{sample = "speed", max_steps = 4}', "needs either speeds = .* or sigma"),
    ('{sample = "speed", max_steps = 4, speeds = [1.0], sigma = 1.0}', "not both"),
    ('{sample = "speed", max_steps = 4, speeds = [1.0, 0.5]}',
     "max_local_steps.speeds: 2 values, but the training data has 8 clients"),
    ('{sample = "speed", max_steps = 4, sigma = -1.0}', r"max_local_steps.sigma: must be >= 0"),
])
def test_a_bad_sampled_budget_table_is_refused_naming_the_key(tmp_path, table, match):
    from fedjax_lab import experiment as exp_lib

    path = tmp_path / "bad.toml"
    path.write_text(TOML.replace('{sample = "straggler", fraction = 0.5, max_steps = 4}', table))
    with pytest.raises(exp_lib.ConfigError, match=match):
        exp_lib.build(exp_lib.load_config(path))
