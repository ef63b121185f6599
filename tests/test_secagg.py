"""Secure aggregation: the survivors' sum is exact, a client's message is noise, masks cancel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import assert_trees_equal, init_params, loss_fn, population
from scipy import stats

import fedjax_lab as fl
from fedjax_lab import secagg

KEY = jax.random.key(3)
IDS = jnp.array([17, 4, 230, 9, 61, 5], jnp.int32)  # client ids, not slots


def _values(rng, c, bits):
    """Stacked int32 updates at the extremes of ``bits`` bits, a tree of two leaves."""
    q = 2 ** (bits - 1) - 1
    a = rng.integers(-q, q + 1, size=(c, 40))
    a[0, :4] = [q, -q, q, -q]
    return {"a": jnp.asarray(a, jnp.int32),
            "b": jnp.asarray(rng.integers(-q, q + 1, size=(c, 3, 2)), jnp.int32)}


def test_unmasked_sum_of_survivors_is_the_plain_integer_sum_bit_for_bit():
    modulus_bits, bits = 32, 29  # the smaller modulus: the aggregator test below
    rng = np.random.default_rng(0)
    c = IDS.shape[0]
    assert c * (2 ** (bits - 1) - 1) < 2 ** (modulus_bits - 1)  # the overflow bound holds
    x = _values(rng, c, bits)
    y = secagg.mask(x, IDS, KEY, modulus_bits=modulus_bits)
    for sent in ([1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 0], [0] * 6):
        sent = np.array(sent, bool)
        survivors = jax.tree.map(
            lambda v, sent=sent: jnp.sum(
                jnp.where(sent.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0),
                axis=0, dtype=jnp.uint32), y)
        got = secagg.unmask(survivors, jnp.asarray(sent), IDS, KEY, modulus_bits=modulus_bits)
        for k in x:
            want = np.asarray(x[k], np.int64)[sent].sum(axis=0)  # exact, no modulus
            assert got[k].dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got[k], np.int64), want)
    # the masked rows alone are far from the values: without unmasking the sum is garbage
    wrong = jnp.sum(y["a"][:3], axis=0, dtype=jnp.uint32)
    assert not np.array_equal(np.asarray(secagg.unmask(wrong, jnp.ones(6, bool), IDS, KEY,
                                                       modulus_bits=modulus_bits)),
                              np.asarray(x["a"][:3]).sum(0))


def _aggregate(agg, updates, weights, key=KEY):
    """prepare on every slot (vmapped, as the vmap client map runs it), summed, finalize."""
    c = weights.shape[0]

    @jax.jit
    def run(updates, weights):
        parts = jax.vmap(lambda u, w, s: agg.prepare(u, w, (), (s, IDS[:c], key)))(
            updates, weights, jnp.arange(c))
        summed = jax.tree.map(lambda p: jnp.sum(p, axis=0), parts)
        return agg.finalize(summed, (), key), parts

    return run(updates, weights)


def test_secure_aggregate_equals_the_plain_quantised_aggregate_with_dropout_and_padding():
    rng = np.random.default_rng(1)
    updates = {"w": jnp.asarray(rng.normal(size=(6, 30)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
    weights = jnp.array([3.0, 0.0, 7.0, 5.0, 2.0, 9.0])  # slot 1 is padding
    kw = dict(bits=12, modulus_bits=20, max_cohort_size=6, max_weight=9)
    for rate in (0.5,):  # no dropout: the compiled-round test below
        (s_mean, s_w, _), _ = _aggregate(secagg.secure_aggregator(2.0, dropout_rate=rate, **kw),
                                         updates, weights)
        (q_mean, q_w, _), (q_vals, q_ws) = _aggregate(
            secagg.quantised_aggregator(2.0, dropout_rate=rate, **kw), updates, weights)
        assert_trees_equal(s_mean, q_mean)
        assert float(s_w) == float(q_w) == float(jnp.sum(q_ws))
        # the aggregate decodes the exact integer sum (summed in int64 by NumPy): the float
        # error of decoding is far below the 0.5 that would round to another integer
        scale = (2 ** 11 - 1) / 2.0
        for k in updates:
            want = np.asarray(q_vals[k], np.int64).sum(0)
            back = np.asarray(s_mean[k], np.float64) * scale * float(q_w)
            assert np.abs(back - want).max() < 0.05
            np.testing.assert_array_equal(np.round(back).astype(np.int64), want)
        assert 0 < float(s_w) < 26.0  # some dropped after masking, the sum still exact


def test_the_servers_view_of_one_client_is_uniform_noise():
    c, p = 4, 32768
    ramp = jnp.linspace(-1.0, 1.0, p)  # a very structured update
    update = {"w": ramp}
    agg = secagg.secure_aggregator(1.0, bits=16, max_cohort_size=c)
    view, sent, _ = jax.jit(lambda u: agg.prepare(u, jnp.float32(1.0), (),
                                                  (jnp.int32(2), IDS[:c], KEY)))(update)
    assert int(sent[2]) == 1
    y = np.asarray(view[0]["w"], np.uint64)
    # what prepare sends is row 2 of mask() of the cohort's encoded (ŵ q, ŵ), ŵ = 1
    q = secagg.quantise(update, jax.random.fold_in(jax.random.fold_in(KEY, 0x524E4447), 2),
                        clip_range=1.0, bits=16)
    rows = ({"w": jnp.stack([q["w"]] * c)}, jnp.ones((c,), jnp.int32))
    np.testing.assert_array_equal(y, np.asarray(secagg.mask(rows, IDS[:c], KEY)[0]["w"][2]))
    top = (y >> np.uint64(24)).astype(np.int64)  # the top 8 bits: 256 bins, 128 expected each
    chi2, pvalue = stats.chisquare(np.bincount(top, minlength=256))
    assert pvalue > 1e-3, (chi2, pvalue)
    low = (y & np.uint64(0xFF)).astype(np.int64)
    assert stats.chisquare(np.bincount(low, minlength=256)).pvalue > 1e-3
    corr = np.corrcoef(y.astype(np.float64), np.asarray(ramp, np.float64))[0, 1]
    assert abs(corr) < 4.0 / np.sqrt(p), corr
    # the same statistics on the unmasked encoding fail: the test can tell structure apart
    plain = np.asarray(q["w"]).astype(np.int64) & 0xFFFFFFFF
    assert stats.chisquare(np.bincount(plain >> 24, minlength=256)).pvalue < 1e-10
    assert np.corrcoef(plain.astype(np.float64), np.asarray(ramp))[0, 1] ** 2 > 0.5


def test_pairwise_masks_cancel_over_the_cohort():
    modulus_bits = 13  # 2^32: the masks of the sum test above cancel, or it would fail
    zeros = {"a": jnp.zeros((6, 500), jnp.int32), "b": jnp.zeros((6,), jnp.int32)}
    masks = secagg.mask(zeros, IDS, KEY, modulus_bits=modulus_bits)
    for leaf in jax.tree.leaves(masks):
        total = np.asarray(leaf, np.uint64).sum(axis=0) % np.uint64(2 ** modulus_bits)
        np.testing.assert_array_equal(total, 0)
        assert np.asarray(leaf).max() < 2 ** modulus_bits
    a = np.asarray(masks["a"])
    assert (a != 0).mean() > 0.99 and len(np.unique(a)) > 2000  # each mask is itself noise
    # per PAIR of client ids, not per slot: the same two clients in swapped slots share the
    # pair mask (the sign follows the slot order)
    two = secagg.mask({"a": jnp.zeros((2, 500), jnp.int32)}, IDS[:2], KEY)["a"]
    two_swapped = secagg.mask({"a": jnp.zeros((2, 500), jnp.int32)}, IDS[1::-1], KEY)["a"]
    np.testing.assert_array_equal(np.asarray(two[0]), np.asarray(two_swapped[0]))
    assert not np.array_equal(np.asarray(two[0]), np.asarray(
        secagg.mask({"a": jnp.zeros((2, 500), jnp.int32)}, IDS[2:4], KEY)["a"][0]))


def _fedavg(aggregator=None):
    alg = fl.algorithms.fed_avg(loss_fn, client_learning_rate=0.3)
    return alg if aggregator is None else fl.algorithms.with_aggregator(alg, aggregator)


def _run(alg, num_rounds):
    return fl.run_rounds(alg, alg.init(init_params()), population(), jax.random.key(5),
                         num_rounds=num_rounds, cohort_size=4, batch_size=3,
                         client_map=fl.maps.sequential())


def test_compiled_round_is_within_the_quantisation_bound_of_fedavg():
    kw = dict(bits=8, max_cohort_size=4, max_weight=8)  # 8: the largest client of population()
    plain, plain_hist = _run(_fedavg(), 1)
    secure, hist = _run(_fedavg(secagg.secure_aggregator(1.0, **kw)), 1)
    # one round from the same params, nothing clipped (|Δ_i| < 1): |x_s - x| <= η_g / S
    bound = secagg.error_bound(1.0, 8)  # 1/127, stochastic rounding
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(secure.params), jax.tree.leaves(plain.params), strict=True))
    assert 0 < diff <= bound * (1 + 1e-4) + 1e-6, (diff, bound)
    step = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(plain.params), jax.tree.leaves(init_params()), strict=True))
    assert step > 10 * bound and step < 1.0  # the round moved far more than the error
    assert float(hist["total_weight"][0]) == float(plain_hist["total_weight"][0]) > 0


def test_compiled_rounds_with_dropout_equal_quantised_fedavg_bit_for_bit():
    kw = dict(bits=10, max_cohort_size=4, max_weight=8, dropout_rate=0.4)
    secure, hist = _run(_fedavg(secagg.secure_aggregator(1.0, **kw)), 2)
    quant, q_hist = _run(_fedavg(secagg.quantised_aggregator(1.0, **kw)), 2)
    assert_trees_equal(secure.params, quant.params)
    weights = np.asarray(hist["total_weight"])
    np.testing.assert_array_equal(weights, np.asarray(q_hist["total_weight"]))
    assert np.asarray(hist["num_examples"]).sum() > weights.sum()  # some trained, then dropped
    assert not np.any(np.asarray(hist["round_skipped"]))


def test_bad_arguments_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="clip_range"):
        secagg.secure_aggregator(0.0)
    with pytest.raises(ValueError, match="clip_range"):
        secagg.secure_aggregator(-1.0)
    with pytest.raises(ValueError, match=r"bits: 28 bits .* overflow .* use bits <= 25"):
        secagg.secure_aggregator(1.0, bits=28, max_cohort_size=100)
    assert secagg.max_bits(100) == 25
    secagg.secure_aggregator(1.0, bits=25, max_cohort_size=100)  # just fits
    with pytest.raises(ValueError, match="use bits <= 10"):
        secagg.secure_aggregator(1.0, bits=12, modulus_bits=16, max_cohort_size=10, max_weight=5)
    with pytest.raises(ValueError, match="bits: need a whole number in"):
        secagg.secure_aggregator(1.0, bits=20, modulus_bits=16)
    with pytest.raises(ValueError, match="modulus_bits"):
        secagg.secure_aggregator(1.0, modulus_bits=64)
    with pytest.raises(ValueError, match="dropout_rate"):
        secagg.secure_aggregator(1.0, dropout_rate=1.0)
    with pytest.raises(ValueError, match="rounding"):
        secagg.quantised_aggregator(1.0, rounding="up")
    with pytest.raises(ValueError, match="max_weight"):
        secagg.secure_aggregator(1.0, max_weight=0)
    # a cohort larger than the bound was built for is refused when the round is traced
    agg = secagg.secure_aggregator(1.0, bits=8, max_cohort_size=3)
    with pytest.raises(ValueError, match="max_cohort_size: the round's cohort has 4 slots"):
        _run(_fedavg(agg), 1)
    # and from a config, by name
    agg = fl.aggregators.from_name("secure_mean", clip_range=0.5, bits=8)
    assert agg.cohort_aware and agg.reduce == "sum"
