"""Participation samplers, FedAU and FedDisco (participation- and data-aware aggregation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import assert_trees_close, cohort, init_params, loss_fn, population

import fedjax_lab as fl
from fedjax_lab.algorithms.fedau import FedAUClientState, fed_au, interval_estimate
from fedjax_lab.algorithms.feddisco import (
    disco_weights,
    discrepancy,
    discrepancy_aggregator,
    fed_disco,
    label_histogram,
)
from fedjax_lab.data import participation as part

# ----------------------------------------------------------------------------- helpers


@functools.partial(jax.jit, static_argnames=("sampler", "num_rounds", "cohort_size", "n"))
def _simulate(sampler, key, *, num_rounds, cohort_size, n):
    """Runs the sampler alone for many rounds; per round the 0/1 participation of each client."""
    sizes = jnp.ones((n,), jnp.int32)
    state0 = sampler.init(sizes)

    def body(state, r):
        ids, avail, state = sampler.sample(state, jax.random.fold_in(key, r), r, cohort_size, sizes)
        took_part = jax.ops.segment_sum(avail, ids, num_segments=n)
        return state, (took_part, ids, avail)

    return jax.lax.scan(body, state0, jnp.arange(num_rounds))


def _participation(sampler, n, rounds, cohort_size=None, seed=0):
    _, (took, ids, avail) = _simulate(
        sampler, jax.random.key(seed), num_rounds=rounds, cohort_size=cohort_size or n, n=n
    )
    return np.asarray(took), np.asarray(ids), np.asarray(avail)


# ----------------------------------------------------------------------------- samplers


def test_bernoulli_rates_match_probabilities():
    probs = np.array([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    took, ids, avail = _participation(part.bernoulli(probs), 6, 3000)
    np.testing.assert_allclose(took.mean(0), probs, atol=0.035)
    assert set(np.unique(took)) <= {0.0, 1.0}
    # real slots come first, and every slot holds a distinct client
    assert np.all(np.diff(avail, axis=1) <= 0)
    assert all(len(set(row)) == len(row) for row in ids)


def test_bernoulli_small_cohort_pads_only_when_short():
    probs = np.full(10, 0.3)
    took, _, avail = _participation(part.bernoulli(probs), 10, 500, cohort_size=4, seed=1)
    # the number of real slots is min(4, #available): never more than 4, sometimes fewer
    real = avail.sum(1)
    assert real.max() == 4 and real.min() < 4
    np.testing.assert_array_equal(took.sum(1), real)


def test_markov_stationary_rate_and_autocorrelation():
    a, b = 0.2, 0.3
    took, _, _ = _participation(part.markov(a, b), 300, 400, seed=2)
    pi = b / (a + b)
    assert abs(took.mean() - pi) < 0.02
    assert abs(took[0].mean() - pi) < 0.09  # stationary from the first round
    prev, nxt = took[:-1].ravel(), took[1:].ravel()
    np.testing.assert_allclose(np.mean(nxt[prev == 1] == 0), a, atol=0.015)  # on -> off
    np.testing.assert_allclose(np.mean(nxt[prev == 0] == 1), b, atol=0.015)  # off -> on
    x = took - took.mean()
    rho = np.sum(x[:-1] * x[1:]) / np.sum(x * x)
    np.testing.assert_allclose(rho, 1 - a - b, atol=0.03)


def test_markov_per_client_probabilities():
    a = np.array([0.5, 0.1, 0.9])
    b = np.array([0.5, 0.9, 0.1])
    took, _, _ = _participation(part.markov(a, b), 3, 4000, seed=3)
    np.testing.assert_allclose(took.mean(0), b / (a + b), atol=0.05)


def test_dropout_forever_clients_never_return():
    p = 0.1
    took, _, avail = _participation(part.dropout_forever(p), 500, 20, seed=4)
    # a client absent once is absent for good
    gone = np.cumsum(1 - took, axis=0) > 0
    assert not np.any(took[gone] == 1)
    for r in (0, 5, 15):
        np.testing.assert_allclose(took[r].mean(), (1 - p) ** r, atol=0.07)
    assert avail[0].sum() == 500


def test_weighted_frequencies():
    probs = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
    took, _, avail = _participation(part.weighted(probs), 5, 4000, cohort_size=1, seed=5)
    np.testing.assert_allclose(took.mean(0), probs / probs.sum(), atol=0.025)
    assert np.all(avail == 1.0)
    assert took[:, 3].sum() == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: part.bernoulli([0.5, 1.5]), "probs"),
        (lambda: part.markov(0.0, 0.0), "p_on_to_off"),
        (lambda: part.dropout_forever(-0.1), "p_leave"),
        (lambda: part.weighted([0.0, 0.0]), "probs"),
    ],
)
def test_bad_probabilities_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_length_raises_at_init():
    with pytest.raises(ValueError, match="probs"):
        part.bernoulli([0.5, 0.5]).init(jnp.ones(3, jnp.int32))


_DATA = population()
_FEDAVG = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))


@pytest.mark.parametrize(
    "sampler",
    [
        part.bernoulli(np.linspace(0.2, 1.0, 10)),
        part.markov(0.3, 0.3),
        part.dropout_forever(0.5),
        part.weighted(np.arange(1.0, 11.0)),
    ],
    ids=["bernoulli", "markov", "dropout_forever", "weighted"],
)
def test_run_rounds_with_each_sampler(sampler):
    state, hist = fl.run_rounds(
        _FEDAVG,
        _FEDAVG.init(init_params()),
        _DATA,
        jax.random.key(0),
        num_rounds=6,
        cohort_size=4,
        batch_size=4,
        local_steps=1,
        sampler=sampler,
        client_map=fl.maps.sequential(),
    )
    assert int(state.round) == 6
    avail = np.asarray(hist["available_clients"])
    assert np.all((avail >= 0) & (avail <= 4))
    # a round without available clients is skipped; rounds with some are applied
    np.testing.assert_array_equal(np.asarray(hist["round_skipped"]), (avail == 0).astype(float))
    assert np.all(np.isfinite(jax.tree.leaves(state.params)[0]))
    if sampler.name.startswith("markov"):
        assert bool(state.sampler_state.started)


def test_dropout_forever_everyone_leaves_then_rounds_skip():
    state, hist = fl.run_rounds(
        _FEDAVG,
        _FEDAVG.init(init_params()),
        _DATA,
        jax.random.key(0),
        num_rounds=3,
        cohort_size=4,
        batch_size=4,
        local_steps=1,
        sampler=part.dropout_forever(1.0),
        client_map=fl.maps.sequential(),
    )
    np.testing.assert_array_equal(np.asarray(hist["round_skipped"]), [0.0, 1.0, 1.0])
    assert not bool(np.any(state.sampler_state))


# ----------------------------------------------------------------------------- FedAU


def _fedau_reference(participation: np.ndarray, cutoff: int) -> np.ndarray:
    """NumPy transcription of FedAU's Algorithm 2; the weight ω of each participation (else 0)."""
    rounds, n = participation.shape
    m, r, s = np.zeros(n), np.zeros(n), np.zeros(n)
    omega = np.zeros((rounds, n))
    for t in range(rounds):
        for i in range(n):
            r[i] += 1
            if participation[t, i] or r[i] == cutoff:
                s[i] = r[i] if m[i] == 0 else (m[i] * s[i] + r[i]) / (m[i] + 1)
                m[i] += 1
                r[i] = 0
            if participation[t, i]:
                omega[t, i] = s[i]
    return omega


def test_interval_estimate_matches_algorithm_2():
    rng = np.random.default_rng(0)
    rounds, n, k = 60, 5, 4
    q = rng.random((rounds, n)) < np.array([0.05, 0.2, 0.5, 0.9, 0.3])
    expected = _fedau_reference(q, k)

    def body(stats, xs):
        t, on = xs
        new = jax.vmap(lambda s: interval_estimate(s, t, k))(stats)
        stats = jax.tree.map(lambda a, b: jnp.where(on, a, b), new, stats)
        return stats, jnp.where(on, new.mean, 0.0)

    stats0 = FedAUClientState(jnp.full(n, -1), jnp.zeros(n), jnp.zeros(n))
    _, got = jax.lax.scan(body, stats0, (jnp.arange(rounds), jnp.asarray(q)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_fedau_weights_converge_to_inverse_participation():
    n = 10
    probs = np.array([0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0])
    alg = fed_au(loss_fn, optax.sgd(0.05), cutoff=50)
    state, hist = fl.run_rounds(
        alg,
        alg.init(init_params(), num_clients=n),
        _DATA,
        jax.random.key(1),
        num_rounds=800,
        cohort_size=n,
        batch_size=2,
        local_steps=1,
        sampler=part.bernoulli(probs),
        weighting="uniform",
        client_map=fl.maps.sequential(),
    )
    omega = np.asarray(state.client_states.mean)
    np.testing.assert_allclose(omega, 1.0 / probs, rtol=0.15)
    # ... and equal, participation by participation, to the paper's Algorithm 2
    ids, avail = np.asarray(hist["client_ids"]), np.asarray(hist["available_clients"])
    q = np.zeros((800, n), bool)
    for t in range(800):
        q[t, ids[t, : int(avail[t])]] = True
    ref = _fedau_reference(q, 50)
    last = np.array([ref[np.flatnonzero(q[:, i])[-1], i] for i in range(n)])
    np.testing.assert_allclose(omega, last, rtol=1e-5)


def test_fedau_first_round_is_scaled_fedavg():
    """Round 0: every ω = 1, so x - (1/N) Σ Δ_i = FedAvg (equal weights) with server lr C/N."""
    c, n = 4, 10
    ch = cohort(num_clients=c)
    alg = fed_au(loss_fn, optax.sgd(0.1))
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1), server_learning_rate=c / n)
    got, _ = fl.run_round(alg, alg.init(init_params(), num_clients=n), ch, jax.random.key(0))
    want, _ = fl.run_round(ref, ref.init(init_params()), ch, jax.random.key(0))
    assert_trees_close(got.params, want.params)
    np.testing.assert_array_equal(np.asarray(got.client_states.mean), [1.0] * c + [0.0] * (n - c))


def test_fedau_padding_slots_keep_their_statistics():
    ch = cohort(num_clients=3)
    ch = ch._replace(weights=jnp.array([6.0, 0.0, 6.0]))
    alg = fed_au(loss_fn)
    state, _ = fl.run_round(alg, alg.init(init_params(), num_clients=3), ch, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(state.client_states.last), [0, -1, 0])
    np.testing.assert_array_equal(np.asarray(state.client_states.count), [1.0, 0.0, 1.0])


def test_fedau_requires_num_clients():
    alg = fed_au(loss_fn)
    state = alg.init(init_params())
    with pytest.raises(ValueError, match="num_clients"):
        fl.run_round(alg, state, cohort(), jax.random.key(0))
    with pytest.raises(ValueError, match="cutoff"):
        fed_au(loss_fn, cutoff=0)


# ----------------------------------------------------------------------------- FedDisco


def test_disco_weight_formula_matches_numpy():
    rng = np.random.default_rng(0)
    k = 5
    counts = rng.integers(0, 20, size=(6, k)).astype(np.float32)
    counts[2] = 0.0  # a client without data
    sizes = counts.sum(1)
    target = np.full(k, 1.0 / k)
    dist = counts / np.maximum(sizes[:, None], 1e-12)
    d_l2 = np.where(sizes > 0, np.linalg.norm(dist - target, axis=1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(dist > 0, dist * np.log(dist / target), 0.0)
    d_kl = np.where(sizes > 0, terms.sum(1), 0.0)
    got_l2 = jax.vmap(lambda c: discrepancy(c, jnp.asarray(target), "l2"))(jnp.asarray(counts))
    got_kl = jax.vmap(lambda c: discrepancy(c, jnp.asarray(target), "kl"))(jnp.asarray(counts))
    np.testing.assert_allclose(np.asarray(got_l2), d_l2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_kl), d_kl, rtol=1e-5, atol=1e-6)
    a, b = 0.5, 0.1
    score = np.maximum(sizes / sizes.sum() - a * d_l2 + b, 0.0) * (sizes > 0)
    np.testing.assert_allclose(np.asarray(disco_weights(sizes, d_l2, a, b)), score, rtol=1e-5)
    # the aggregator normalises the scores and mixes the stacked deltas with them
    deltas = rng.normal(size=(6, 3)).astype(np.float32)
    agg = discrepancy_aggregator(a, b)
    out, total, _ = agg.finalize(
        ((jnp.asarray(deltas), jnp.asarray(d_l2)), jnp.asarray(sizes)), (), jax.random.key(0)
    )
    np.testing.assert_allclose(
        np.asarray(out), (score / score.sum()) @ deltas, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(float(total), score.sum(), rtol=1e-5)


def test_label_histogram_honours_mask():
    ch = cohort(num_clients=1, steps=3, batch=4)
    mask = np.asarray(ch.batches["mask"][0]).copy()
    mask[2] = 0.0
    b = {"y": ch.batches["y"][0], "mask": jnp.asarray(mask)}
    y = np.asarray(ch.batches["y"][0])[:2].ravel()
    np.testing.assert_array_equal(np.asarray(label_histogram(b, 3)), np.bincount(y, minlength=3))


def test_feddisco_with_a_b_zero_is_fedavg():
    ch = cohort(num_clients=4)
    ch = ch._replace(weights=jnp.array([6.0, 2.0, 4.0, 1.0]))
    alg = fed_disco(loss_fn, optax.sgd(0.1), num_classes=3, a=0.0, b=0.0)
    ref = fl.algorithms.fed_avg(loss_fn, optax.sgd(0.1))
    got, _ = fl.run_round(alg, alg.init(init_params()), ch, jax.random.key(0))
    want, _ = fl.run_round(ref, ref.init(init_params()), ch, jax.random.key(0))
    assert_trees_close(got.params, want.params)


def test_feddisco_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        fed_disco(loss_fn)


# ----------------------------------------------------------------------------- maps agree


@pytest.mark.parametrize(
    "make, per_client",
    [
        (lambda: fed_au(loss_fn, optax.sgd(0.1), cutoff=3), True),
        (lambda: fed_disco(loss_fn, optax.sgd(0.1), num_classes=3), False),
    ],
    ids=["fedau", "feddisco"],
)
def test_sequential_equals_vmap(make, per_client):
    alg = make()
    ch = cohort(num_clients=3)
    ch = ch._replace(client_ids=jnp.array([4, 1, 2], jnp.int32))
    outs = []
    for cmap in (fl.maps.sequential(), fl.maps.vmap()):
        state = alg.init(init_params(), num_clients=6) if per_client else alg.init(init_params())
        for r in range(2):
            state, _ = fl.run_round(alg, state, ch, jax.random.key(r), client_map=cmap)
        outs.append(state)
    assert_trees_close(outs[0].params, outs[1].params)
    assert_trees_close(outs[0].client_states, outs[1].client_states)


def test_feddisco_histogram_counts_every_position_of_sequence_labels():
    """Sequence labels [S, B, T]: a real example counts each of its T labels; padding none."""
    y = jnp.array([[[0, 1, 1], [2, 2, 2]]])  # S=1, B=2, T=3
    counts = label_histogram({"y": y, "mask": jnp.array([[1.0, 0.0]])}, 3)
    np.testing.assert_array_equal(np.asarray(counts), [1.0, 2.0, 0.0])
