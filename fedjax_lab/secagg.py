"""Secure aggregation, simulated faithfully: the server learns only the sum of the survivors.

The protocol of Bonawitz et al. (2017), simplified as SecAgg+ simulations do, runs inside the
compiled round (an :class:`~fedjax_lab.Aggregator` with ``cohort_aware=True``, so every
``prepare`` knows its slot, the cohort's client ids and the round's aggregator key):

1. **Fixed-point encoding** (client). Each coordinate is clipped to ``[-c, c]`` and scaled to
   an integer of ``bits`` bits, ``q = R(clip(u, -c, c) · S)`` with ``S = (2^(bits-1) - 1) / c``
   (so ``|q| <= 2^(bits-1) - 1``). ``R`` is stochastic rounding, ``floor(x + U[0, 1))``
   (unbiased; error ``< 1/S`` a coordinate), from a per-slot key, or deterministic rounding to
   the nearest integer (error ``<= 1/(2S)``). Weights: with ``max_weight=None`` every client
   of weight > 0 counts 1 (the uniform mean of the survivors); with ``max_weight=W`` the
   weight is rounded to an integer ``ŵ`` in ``[0, W]`` (FedAvg's example counts are
   integers; a larger weight counts ``W``), the client encodes ``ŵ · q`` and ``ŵ`` itself, and
   both are summed securely.
2. **Pairwise masks** (client). For every pair of slots ``i < j`` the pair key
   ``k_ij = fold_in(fold_in(k, min(id_i, id_j)), max(id_i, id_j))`` comes from the round key
   and the two CLIENT IDS (the stand-in for their Diffie-Hellman agreement), and
   ``m_ij = PRG(k_ij)`` (``jax.random.bits`` over the flattened ``(ŵ q, ŵ)``) is uniform over
   ``Z_M``, ``M = 2^modulus_bits``. Client ``i`` sends
   ``y_i = x_i + Σ_{j>i} m_ij - Σ_{j<i} m_ij (mod M)``, in ``uint32`` arithmetic (its
   wrap-around is the modulus; ``M < 2^32`` reduces with a bit mask). Self-masks (the
   protocol's ``b_u``, against a client whose message arrives after it was declared dropped)
   are omitted: here the dropout set is fixed before the server unmasks.
3. **Dropout after masking.** A slot drops, having masked, when its weight is 0 (a padding
   slot, a non-finite update) or, with ``dropout_rate``, with that probability from a per-slot
   key. Only the survivors ``A`` send ``y_i``; the server learns who sent.
4. **Unmasking** (server). ``Σ_{i∈A} y_i`` still holds the masks between survivors and dropped
   peers; the server rebuilds them (the protocol reconstructs the dropped peers' pair secrets
   from Shamir shares held by the survivors; the simulation recomputes the pair keys) and
   subtracts them: ``Σ_{i∈A} x_i (mod M)``, read as a signed integer and divided by ``S`` and
   by ``Σ_{i∈A} ŵ_i``. It EQUALS the plain integer sum of the quantised updates (the overflow
   check below makes the signed reading exact), so :func:`secure_aggregator` gives bit for
   bit what :func:`quantised_aggregator` (the same encoding and dropout, no masks) gives.

A simulation: every key derives from the run key, so this checks the arithmetic of the
protocol (exact sums, cancelling masks, what one message looks like), not its cryptography.

Overflow: the sum must be read back unambiguously, ``C · W · (2^(bits-1) - 1) < 2^(modulus_bits
- 1)`` for cohorts of up to ``C = max_cohort_size`` slots (checked when the aggregator is built
and the cohort size again when the round is traced; :func:`max_bits` gives the largest
``bits``).

Cost: each client draws ``C`` pseudo-random vectors at once (``O(C · P)`` work and memory for
``P`` parameters, ``O(C² · P)`` for the cohort), the server up to ``O(C² · P)`` more to rebuild
the masks between survivors and dropped peers (a scan over the survivors, skipped when nobody
dropped); fine for simulated cohorts of tens of clients. The contributions are summed
(``reduce="sum"``), so any client map streams them.

References:
  Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
  Aggregation for Privacy-Preserving Machine Learning", CCS 2017. Bell, Bonawitz, Gascón,
  Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
  CCS 2020 (SecAgg+).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lab import kit
from fedjax_lab._types import Aggregator, PRNGKey, PyTree

__all__ = [
    "error_bound",
    "mask",
    "max_bits",
    "quantise",
    "quantised_aggregator",
    "secure_aggregator",
    "unmask",
]

_MASK_SALT = 0x4D41534B  # "MASK": the pair keys
_ROUNDING_SALT = 0x524E4447  # "RNDG": the stochastic rounding of each slot
_DROP_SALT = 0x44524F50  # "DROP": which slots drop after masking
_ROUNDINGS = ("stochastic", "deterministic")


# ----------------------------------------------------------------------------- checks


def _check_modulus_bits(modulus_bits: Any) -> int:
    if isinstance(modulus_bits, bool) or not isinstance(modulus_bits, int) or not (
        2 <= modulus_bits <= 32
    ):
        raise ValueError(
            f"modulus_bits: need a whole number in [2, 32] (the modulus 2^modulus_bits lives in "
            f"uint32 arithmetic), got {modulus_bits!r}."
        )
    return modulus_bits


def max_bits(cohort_size: int, *, modulus_bits: int = 32, max_weight: int | None = None) -> int:
    """The largest ``bits`` whose sum over ``cohort_size`` clients cannot overflow ``Z_M``.

    The largest ``b`` with ``C · W · (2^(b-1) - 1) < 2^(modulus_bits - 1)`` (``W = max_weight``,
    1 for ``None``); 0 when not even ``b = 2`` fits.

    Example:
      >>> max_bits(10), max_bits(10, max_weight=100), max_bits(10, modulus_bits=16)
      (28, 22, 12)
    """
    c = kit.check_count("cohort_size", cohort_size)
    m = _check_modulus_bits(modulus_bits)
    w = 1 if max_weight is None else kit.check_count("max_weight", max_weight)
    best = 0
    for b in range(2, m + 1):
        if c * w * (2 ** (b - 1) - 1) < 2 ** (m - 1):
            best = b
    return best


def _check(clip_range, bits, modulus_bits, max_cohort_size, max_weight, dropout_rate, rounding):
    kit.check_positive("clip_range", clip_range, hint=" Each coordinate is clipped to "
                       "[-clip_range, clip_range] before encoding; give a positive bound.")
    if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)):
        raise ValueError(f"clip_range: expected a number, got {clip_range!r}.")
    m = _check_modulus_bits(modulus_bits)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= m:
        raise ValueError(f"bits: need a whole number in [2, modulus_bits={m}], got {bits!r}.")
    c = kit.check_count("max_cohort_size", max_cohort_size)
    w = 1 if max_weight is None else kit.check_count("max_weight", max_weight)
    if c * w * (2 ** (bits - 1) - 1) >= 2 ** (m - 1):
        best = max_bits(c, modulus_bits=m, max_weight=max_weight)
        raise ValueError(
            f"bits: {bits} bits for up to {c} clients of weight up to {w} overflow the modulus "
            f"2^{m}: the sum needs max_cohort_size * max_weight * (2^(bits-1) - 1) = "
            f"{c * w * (2 ** (bits - 1) - 1)} < 2^{m - 1}; use bits <= {best}, a larger "
            "modulus_bits, a smaller max_cohort_size or max_weight."
        )
    kit.check_in_range("dropout_rate", dropout_rate, 0.0, 1.0, high_open=True)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding: expected 'stochastic' or 'deterministic', got {rounding!r}.")
    return float(clip_range), m, c, w


# ----------------------------------------------------------------------------- encoding


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantise(
    update: PyTree,
    key: PRNGKey,
    *,
    clip_range: float,
    bits: int = 16,
    rounding: str = "stochastic",
) -> PyTree:
    """Fixed-point encoding: ``q = R(clip(u, -c, c) · S)``, ``int32``, ``S = (2^(bits-1)-1)/c``.

    ``R`` is ``floor(x + U[0, 1))`` (``"stochastic"``, unbiased, one uniform per coordinate
    from ``fold_in(key, leaf)``) or round-to-nearest (``"deterministic"``, ``key`` unused).
    ``q / S`` is the value the sum carries; ``|q| <= 2^(bits-1) - 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q = quantise({"w": jnp.array([0.5, -2.0, 0.26])}, jax.random.key(0), clip_range=1.0,
      ...              bits=3, rounding="deterministic")
      >>> q["w"].tolist()   # S = 3: 1.5 -> 2, clipped -3, 0.78 -> 1
      [2, -3, 1]
    """
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding: expected 'stochastic' or 'deterministic', got {rounding!r}.")
    q_max = float(_levels(bits))
    scale = q_max / clip_range
    leaves, treedef = jax.tree.flatten(update)
    out = []
    for i, leaf in enumerate(leaves):
        x = jnp.clip(jnp.asarray(leaf, jnp.float32) * scale, -q_max, q_max)
        if rounding == "stochastic":
            u = jax.random.uniform(jax.random.fold_in(key, i), x.shape, jnp.float32)
            r = jnp.clip(jnp.floor(x + u), -q_max, q_max)
        else:
            r = jnp.round(x)
        out.append(r.astype(jnp.int32))
    return jax.tree.unflatten(treedef, out)


def _to_residue(x: jax.Array, modulus_bits: int) -> jax.Array:
    """A signed integer as its residue in ``Z_M`` (two's complement, then the low bits)."""
    u = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.int32), jnp.uint32)
    return _reduce(u, modulus_bits)


def _reduce(u: jax.Array, modulus_bits: int) -> jax.Array:
    u = jnp.asarray(u).astype(jnp.uint32)  # a sum accumulated in uint64 (x64) wraps mod 2^32
    if modulus_bits == 32:
        return u
    return u & jnp.uint32(2**modulus_bits - 1)


def _to_signed(u: jax.Array, modulus_bits: int) -> jax.Array:
    """A residue of ``Z_M`` as the signed integer in ``[-M/2, M/2)`` (sign extension)."""
    shift = jnp.uint32(32 - modulus_bits)
    signed = jax.lax.bitcast_convert_type(_reduce(u, modulus_bits) << shift, jnp.int32)
    return jax.lax.shift_right_arithmetic(signed, jnp.int32(32 - modulus_bits))


# ----------------------------------------------------------------------------- masks


def _pair_key(base: PRNGKey, id_a: jax.Array, id_b: jax.Array) -> PRNGKey:
    lo, hi = jnp.minimum(id_a, id_b), jnp.maximum(id_a, id_b)
    return jax.random.fold_in(jax.random.fold_in(base, lo), hi)


def _prg(pair_key: PRNGKey, size: int, modulus_bits: int) -> jax.Array:
    return _reduce(jax.random.bits(pair_key, (size,), jnp.uint32), modulus_bits)


def _split(flat: jax.Array, shapes: list) -> list:
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[start:start + n].reshape(shape))
        start += n
    return out


def _slot_mask(base, slot, client_ids, shapes, modulus_bits, peers=None) -> list:
    """``Σ_{j≠slot} ±m_{slot,j}`` (``+`` for ``j > slot``), over the peers ``j`` with
    ``peers[j]`` (all by default). One PRG stream per pair over the flattened leaves, drawn for
    all ``C`` peers at once (memory ``O(C · P)``)."""
    size = sum(math.prod(s) for s in shapes)
    my_id = client_ids[slot]
    masks = jax.vmap(lambda j_id: _prg(_pair_key(base, my_id, j_id), size, modulus_bits))(
        client_ids)
    j = jnp.arange(client_ids.shape[0], dtype=jnp.int32)
    on = jnp.ones(j.shape, jnp.bool_) if peers is None else peers
    plus = ((j > slot) & on).astype(jnp.uint32)[:, None]
    minus = ((j < slot) & on).astype(jnp.uint32)[:, None]
    total = jnp.sum(plus * masks, axis=0, dtype=jnp.uint32) - jnp.sum(
        minus * masks, axis=0, dtype=jnp.uint32)
    return _split(_reduce(total, modulus_bits), shapes)


def _shapes(leaves: list) -> list:
    return [tuple(jnp.shape(x)) for x in leaves]


def mask(values: PyTree, client_ids: jax.Array, key: PRNGKey, *, modulus_bits: int = 32) -> PyTree:
    """What the server sees of each client: ``y_i = x_i + Σ_{j>i} m_ij - Σ_{j<i} m_ij (mod M)``.

    ``values`` are the clients' integers stacked ``[C, ...]`` (``int32``, e.g. from
    :func:`quantise`), ``client_ids`` ``i32[C]``; the pair masks ``m_ij`` come from ``key`` and
    the two client ids exactly as in :func:`secure_aggregator` (whose ``prepare`` computes one
    row of this). Returns ``uint32[C, ...]`` residues: over all ``C`` clients they sum to
    ``Σ_i x_i (mod M)``, the masks cancel.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[1, -2], [3, 4], [5, 6]], jnp.int32)
      >>> y = mask(x, jnp.array([7, 3, 9]), jax.random.key(0))
      >>> [int(v) for v in jnp.sum(y, axis=0, dtype=jnp.uint32).view(jnp.int32)]
      [9, 8]
    """
    return _mask(values, jnp.asarray(client_ids, jnp.int32), key, _check_modulus_bits(modulus_bits))


@functools.partial(jax.jit, static_argnums=3)
def _mask(values: PyTree, client_ids: jax.Array, key: PRNGKey, m: int) -> PyTree:
    leaves, treedef = jax.tree.flatten(values)
    c = client_ids.shape[0]
    shapes = [tuple(jnp.shape(x))[1:] for x in leaves]
    base = jax.random.fold_in(key, _MASK_SALT)

    def one(slot, rows):
        masks = _slot_mask(base, slot, client_ids, shapes, m)
        return [_reduce(_to_residue(r, m) + k, m) for r, k in zip(rows, masks, strict=True)]

    out = jax.vmap(one)(jnp.arange(c, dtype=jnp.int32), leaves)
    return jax.tree.unflatten(treedef, out)


def _recovery(base, sent, client_ids, shapes, modulus_bits) -> list:
    """``Σ_{i sent} Σ_{j dropped} ±m_ij``: what the survivors' masks leave in their sum."""
    c = client_ids.shape[0]
    dropped = ~sent

    zeros = [jnp.zeros(s, jnp.uint32) for s in shapes]

    def body(acc, i):
        part = jax.lax.cond(
            sent[i], lambda: _slot_mask(base, i, client_ids, shapes, modulus_bits, peers=dropped),
            lambda: zeros)
        return [a + p for a, p in zip(acc, part, strict=True)], None

    def rebuild():
        return jax.lax.scan(body, zeros, jnp.arange(c, dtype=jnp.int32))[0]

    return jax.lax.cond(jnp.any(dropped), rebuild, lambda: zeros)


def unmask(
    masked_sum: PyTree,
    sent: jax.Array,
    client_ids: jax.Array,
    key: PRNGKey,
    *,
    modulus_bits: int = 32,
) -> PyTree:
    """The server's unmasking: the survivors' sum ``Σ_{i∈A} y_i`` -> ``Σ_{i∈A} x_i``, signed.

    ``masked_sum`` is the (wrapping ``uint32``) sum of the rows of :func:`mask` whose ``sent``
    (``bool[C]``) is true; the masks between each survivor and each dropped peer are rebuilt
    from ``key`` and the client ids and subtracted, and the residue is read as an ``int32`` in
    ``[-M/2, M/2)``. Exact whenever the true sum lies in that range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[1, -2], [3, 4], [5, 6]], jnp.int32)
      >>> ids, key = jnp.array([7, 3, 9]), jax.random.key(0)
      >>> sent = jnp.array([True, False, True])          # client 3 dropped after masking
      >>> y = mask(x, ids, key)
      >>> survivors = jnp.sum(jnp.where(sent[:, None], y, 0), axis=0, dtype=jnp.uint32)
      >>> unmask(survivors, sent, ids, key).tolist()
      [6, 4]
    """
    return _unmask(masked_sum, jnp.asarray(sent, jnp.bool_), jnp.asarray(client_ids, jnp.int32),
                   key, _check_modulus_bits(modulus_bits))


@functools.partial(jax.jit, static_argnums=4)
def _unmask(masked_sum, sent, client_ids, key, m: int) -> PyTree:
    leaves, treedef = jax.tree.flatten(masked_sum)
    base = jax.random.fold_in(key, _MASK_SALT)
    rec = _recovery(base, sent, client_ids, _shapes(leaves), m)
    out = [_to_signed(_reduce(s, m) - r, m) for s, r in zip(leaves, rec, strict=True)]
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- aggregators


def _encoder(clip_range, bits, max_cohort_size, max_weight, dropout_rate, rounding):
    """The client's half shared by both aggregators: ``(ŵ q, ŵ, sent)`` of one slot."""

    def encode(update, weight, cohort):
        slot, client_ids, key = cohort
        c = client_ids.shape[0]
        if c > max_cohort_size:
            raise ValueError(
                f"max_cohort_size: the round's cohort has {c} slots but the aggregator was built "
                f"for at most {max_cohort_size} (its overflow bound); build it with "
                f"max_cohort_size >= {c}."
            )
        weight = jnp.asarray(weight, jnp.float32)
        if max_weight is None:
            w = (weight > 0).astype(jnp.int32)
        else:
            w = jnp.clip(jnp.round(weight), 0, max_weight).astype(jnp.int32)
        sent = w > 0
        if dropout_rate > 0:
            k_drop = jax.random.fold_in(jax.random.fold_in(key, _DROP_SALT), slot)
            sent = sent & ~jax.random.bernoulli(k_drop, dropout_rate)
        w = jnp.where(sent, w, 0)
        k_round = jax.random.fold_in(jax.random.fold_in(key, _ROUNDING_SALT), slot)
        q = quantise(update, k_round, clip_range=clip_range, bits=bits, rounding=rounding)
        return jax.tree.map(lambda v: w * v, q), w, sent

    return encode


def _decode(int_sum: PyTree, weight_sum: jax.Array, scale: float):
    safe = jnp.maximum(weight_sum, 1).astype(jnp.float32)
    aggregate = jax.tree.map(lambda s: s.astype(jnp.float32) / jnp.float32(scale) / safe, int_sum)
    return aggregate, weight_sum.astype(jnp.float32)


def _no_state(params: PyTree) -> tuple:
    del params
    return ()


def secure_aggregator(
    clip_range: float,
    *,
    bits: int = 16,
    modulus_bits: int = 32,
    max_cohort_size: int = 100,
    max_weight: int | None = None,
    dropout_rate: float = 0.0,
    rounding: str = "stochastic",
) -> Aggregator:
    """The weighted mean of the survivors' quantised updates, by secure aggregation.

    Each client encodes its update (clip to ``[-clip_range, clip_range]``, ``bits`` bits),
    multiplies by its integer weight, masks ``(ŵ q, ŵ)`` with the pairwise masks of its cohort
    (``mod 2^modulus_bits``) and, unless it drops, sends the masked vector; the server sums,
    rebuilds the masks of the dropped peers, and decodes ``Σ ŵ_i q_i / (S Σ ŵ_i)`` (see the
    module docstring for the protocol). The result equals :func:`quantised_aggregator`'s bit
    for bit; against the plain weighted mean its error is below ``1/S`` per coordinate
    (``1/(2S)`` deterministic; ``S = (2^(bits-1)-1)/clip_range``) when nothing is clipped and
    nobody drops.

    Args:
      clip_range: ``c > 0``: every coordinate is clipped to ``[-c, c]``.
      bits: bits of each encoded coordinate, ``2 <= bits <= modulus_bits``.
      modulus_bits: ``M = 2^modulus_bits``, in ``[2, 32]``.
      max_cohort_size: the largest cohort (slots) the overflow bound must cover.
      max_weight: ``None``: each client of weight > 0 counts 1; an int ``W``: weights rounded
        to integers and capped at ``W`` (FedAvg's example counts: give the largest client).
      dropout_rate: the probability that a client drops after masking (from the round key).
      rounding: ``"stochastic"`` (unbiased) or ``"deterministic"`` (round to nearest).

    Returns:
      An :class:`~fedjax_lab.Aggregator` (``reduce="sum"``, ``cohort_aware=True``); use it with
      :func:`fedjax_lab.algorithms.with_aggregator` or as ``[aggregator] name =
      "secure_mean"``.

    Raises:
      ValueError: ``clip_range <= 0``, ``bits`` outside ``[2, modulus_bits]`` or too many for
        the modulus given ``max_cohort_size`` and ``max_weight`` (overflow), a bad
        ``dropout_rate`` or ``rounding``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = secure_aggregator(1.0, bits=8, max_cohort_size=3, rounding="deterministic")
      >>> ids, key = jnp.array([4, 0, 2]), jax.random.key(0)
      >>> parts = [agg.prepare({"w": jnp.array([u])}, jnp.float32(1), (), (i, ids, key))
      ...          for i, u in enumerate([0.5, -0.25, 1.0])]
      >>> summed = jax.tree.map(lambda *p: jnp.sum(jnp.stack(p), axis=0), *parts)
      >>> mean, total, _ = agg.finalize(summed, (), key)
      >>> round(float(mean["w"][0]), 4), float(total)  # (64 - 32 + 127) / 127 / 3
      (0.4173, 3.0)
    """
    c_range, m, c_max, _ = _check(clip_range, bits, modulus_bits, max_cohort_size, max_weight,
                                  dropout_rate, rounding)
    encode = _encoder(c_range, bits, c_max, max_weight, dropout_rate, rounding)
    scale = _levels(bits) / c_range

    def prepare(update, weight, state, cohort):
        del state
        slot, client_ids, key = cohort
        client_ids = jnp.asarray(client_ids, jnp.int32)
        values, w, sent = encode(update, weight, (slot, client_ids, key))
        leaves, treedef = jax.tree.flatten((values, w))
        base = jax.random.fold_in(key, _MASK_SALT)
        masks = _slot_mask(base, slot, client_ids, _shapes(leaves), m)
        on = sent.astype(jnp.uint32)  # a dropped client masked, but sends nothing
        masked = [on * _reduce(_to_residue(v, m) + k, m) for v, k in zip(leaves, masks,
                                                                         strict=True)]
        c = client_ids.shape[0]
        here = jnp.arange(c, dtype=jnp.int32) == slot
        # the server knows whom it asked and who answered: one-hot rows summed over the cohort
        return (jax.tree.unflatten(treedef, masked), (here & sent).astype(jnp.int32),
                jnp.where(here, client_ids[slot], 0))

    def finalize(contribution, state, key):
        masked_sum, sent, client_ids = contribution
        int_sum, weight_sum = unmask(masked_sum, sent > 0, client_ids, key, modulus_bits=m)
        aggregate, total_weight = _decode(int_sum, weight_sum, scale)
        return aggregate, total_weight, state

    return Aggregator(_no_state, prepare, finalize, reduce="sum", cohort_aware=True)


def quantised_aggregator(
    clip_range: float,
    *,
    bits: int = 16,
    modulus_bits: int = 32,
    max_cohort_size: int = 100,
    max_weight: int | None = None,
    dropout_rate: float = 0.0,
    rounding: str = "stochastic",
) -> Aggregator:
    """The reference for :func:`secure_aggregator`: the same encoding and dropout, no masks.

    Each client's ``(ŵ q, ŵ)`` (same keys, same dropped slots) is summed as plain ``int32``
    and decoded the same way, so the two aggregators give the same aggregate bit for bit; the
    arguments (and their checks) are :func:`secure_aggregator`'s.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = quantised_aggregator(1.0, bits=8, max_cohort_size=3, rounding="deterministic")
      >>> ids, key = jnp.array([4, 0, 2]), jax.random.key(0)
      >>> parts = [agg.prepare({"w": jnp.array([u])}, jnp.float32(1), (), (i, ids, key))
      ...          for i, u in enumerate([0.5, -0.25, 1.0])]
      >>> summed = jax.tree.map(lambda *p: jnp.sum(jnp.stack(p), axis=0), *parts)
      >>> round(float(agg.finalize(summed, (), key)[0]["w"][0]), 4)
      0.4173
    """
    c_range, _, c_max, _ = _check(clip_range, bits, modulus_bits, max_cohort_size, max_weight,
                                  dropout_rate, rounding)
    encode = _encoder(c_range, bits, c_max, max_weight, dropout_rate, rounding)
    scale = _levels(bits) / c_range

    def prepare(update, weight, state, cohort):
        del state
        values, w, _ = encode(update, weight, cohort)
        return values, w

    def finalize(contribution, state, key):
        del key
        int_sum, weight_sum = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.int32),
                                           contribution)
        aggregate, total_weight = _decode(int_sum, weight_sum, scale)
        return aggregate, total_weight, state

    return Aggregator(_no_state, prepare, finalize, reduce="sum", cohort_aware=True)


def error_bound(clip_range: float, bits: int, rounding: str = "stochastic") -> float:
    """The largest quantisation error of the aggregate, per coordinate: ``1/S`` or ``1/(2S)``.

    With ``S = (2^(bits-1) - 1) / clip_range``: stochastic rounding moves each coordinate of
    each client by less than ``1/S``, round-to-nearest by at most ``1/(2S)``, and a weighted
    mean of errors is bounded by the same. Holds when no coordinate is clipped and the
    survivors are the plain mean's clients (no dropout); the float decoding adds a relative
    ``2^-24``.

    Example:
      >>> error_bound(1.0, 8), error_bound(1.0, 8, "deterministic")
      (0.007874015748031496, 0.003937007874015748)
    """
    _check(clip_range, bits, 32, 1, None, 0.0, rounding)
    step = float(clip_range) / _levels(bits)
    return step if rounding == "stochastic" else step / 2

