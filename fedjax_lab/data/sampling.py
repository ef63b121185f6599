"""On-device cohort sampling and batch-index building for the flat layout.

Everything here is a pure, jittable function of a PRNG key, so a round's cohort and batches are
built inside the compiled round with no host round-trip.

Weighted sampling without replacement comes two ways, with the same distribution (successive
sampling: each next client drawn with probability proportional to its weight among those not yet
drawn, the Plackett-Luce order):

* :func:`sample_clients` with ``probs``: Gumbel top-k over all ``N`` clients, ``O(N)`` a round;
* :func:`cumulative_weights` once (``O(N)``) then :func:`sample_cumulative` every round,
  ``O(C log N)`` expected: binary searches in the prefix sums, duplicates rejected.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab._types import ClientSampler, Cohort, PRNGKey, PyTree
from fedjax_lab.data._federated import FederatedData
from fedjax_lab.data._validate import check_count

__all__ = [
    "batch_indices",
    "build_cohort",
    "client_batches",
    "distinct_uniform",
    "num_local_steps",
    "plan_cohort",
    "cumulative_weights",
    "sample_clients",
    "sample_cumulative",
    "size_weighted",
    "uniform",
]


def sample_clients(
    key: PRNGKey, num_clients: int, cohort_size: int, probs: jax.Array | None = None
) -> jax.Array:
    """Samples ``cohort_size`` distinct clients, uniformly or with probabilities ``probs``.

    * Uniform (``probs`` None) and ``4 * C <= N``: :func:`distinct_uniform`, ``O(C log C)``
      expected work whatever the population (a million clients cost what ten thousand do).
    * Uniform and ``4 * C > N``: the Gumbel-top-k below with equal weights, ``O(N) = O(C)``.
    * Weighted: Gumbel-top-k, ``top_k(log p_i + G_i)`` with i.i.d. Gumbel noise ``G_i`` is a
      sample without replacement in which each next client is drawn with probability
      proportional to ``p_i`` among those not yet drawn. It costs ``O(N)`` a round (measured
      ~14 ms for N = 10^6 on one core of the CPU machines here; see
      ``experiments/benchmarks/README_scale.md``).

    Args:
      key: PRNG key.
      num_clients: population size ``N`` (a Python int; shapes depend on it).
      cohort_size: number of distinct clients ``1 <= C <= N`` (a Python int).
      probs: optional ``f32[N]`` non-negative sampling weights (need not sum to 1).

    Returns:
      ``i32[C]`` client indices, all different.

    Raises:
      ValueError: ``cohort_size`` outside ``[1, num_clients]``.

    Example:
      >>> import jax
      >>> ids = sample_clients(jax.random.key(0), 10, 4)
      >>> len(set(ids.tolist())), bool(ids.max() < 10)
      (4, True)
      >>> big = sample_clients(jax.random.key(0), 1_000_000, 100)
      >>> len(set(big.tolist())), bool(big.max() < 1_000_000)
      (100, True)
    """
    num_clients = check_count(num_clients, "num_clients")
    cohort_size = check_count(cohort_size, "cohort_size")
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(
            f"cohort_size: need 1 <= cohort_size <= num_clients ({num_clients}), got {cohort_size}."
        )
    if probs is None and 4 * cohort_size <= num_clients:
        return distinct_uniform(key, num_clients, cohort_size)
    g = jax.random.gumbel(key, (num_clients,))
    if probs is not None:
        g = g + jnp.log(jnp.asarray(probs, jnp.float32))
    return jax.lax.top_k(g, cohort_size)[1].astype(jnp.int32)


def _repeated(ids: jax.Array) -> jax.Array:
    """``bool[C]``: True where ``ids[j]`` occurs more than once in ``ids`` (every copy).

    One single-operand sort and a binary search: on XLA:CPU a one-array ``jnp.sort`` takes a
    fast path (0.4 ms for 10^4 ids here) that a sort carrying positions along misses (4 ms).
    """
    c = ids.shape[0]
    ordered = jnp.sort(ids)
    first = jnp.searchsorted(ordered, ids, side="left", method="scan")
    after = ordered[jnp.minimum(first + 1, c - 1)]
    return (first + 1 < c) & (after == ids)


def distinct_uniform(key: PRNGKey, num_clients: int, cohort_size: int) -> jax.Array:
    """``C`` distinct clients uniformly from ``N``, in ``O(C log C)`` expected work for ``C << N``.

    Draws ``C`` ids with replacement, then, until all differ, redraws every copy of every id that
    occurs more than once (``jax.lax.while_loop``; the draw of pass ``t`` uses
    ``fold_in(key, t)``). Nothing in this procedure looks at what an id is, only at which ids
    are equal, so its output distribution is unchanged by any relabelling of the ``N`` clients;
    relabellings reach every ordered tuple of ``C`` distinct ids from any other, so the output
    is an exactly uniform ordered sample without replacement (up to the uniformity of
    ``jax.random.randint``). Each pass costs one sort of ``C`` ids. A redrawn id hits one of the
    others with probability ``< C / N`` and then both are redrawn, so with ``C <= N / 4`` the
    expected number of repeated ids at least halves each pass: ``O(log C)`` passes expected
    (measured: none after the first draw, usually, for ``C = 100, N = 10^6``; 2-3 for
    ``C = 10^4``). It never builds an array of size ``N``.

    Prefer :func:`sample_clients`, which uses this when ``4 * C <= N`` (as ``C`` nears ``N``
    the redraws would collide ever more often; there Gumbel-top-k's ``O(N)`` is ``O(C)``).

    Args:
      key: PRNG key.
      num_clients: population size ``N`` (a Python int).
      cohort_size: number of distinct clients ``1 <= C <= N`` (a Python int).

    Returns:
      ``i32[C]`` distinct client indices in ``[0, N)``.

    Example:
      >>> import jax
      >>> ids = distinct_uniform(jax.random.key(1), 1_000_000, 5)
      >>> ids.shape, len(set(ids.tolist()))
      ((5,), 5)
    """
    num_clients = check_count(num_clients, "num_clients")
    cohort_size = check_count(cohort_size, "cohort_size")
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(
            f"cohort_size: need 1 <= cohort_size <= num_clients ({num_clients}), got {cohort_size}."
        )

    def draw(t):
        k = jax.random.fold_in(key, t)
        return jax.random.randint(k, (cohort_size,), 0, num_clients, dtype=jnp.int32)

    def cond(carry):
        return jnp.any(carry[2])

    def body(carry):
        t, ids, repeat = carry
        ids = jnp.where(repeat, draw(t), ids)
        return t + 1, ids, _repeated(ids)

    ids = draw(0)
    _, ids, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), ids, _repeated(ids)))
    return ids


@functools.cache
def uniform() -> ClientSampler:
    """Each round, ``C`` distinct clients uniformly at random (every client always available).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = uniform()
      >>> sizes = jnp.ones(5, jnp.int32)
      >>> ids, avail, _ = s.sample(s.init(sizes), jax.random.key(0), 0, 3, sizes)
      >>> ids.shape, avail.tolist()
      ((3,), [1.0, 1.0, 1.0])
    """

    def init(client_sizes: jax.Array) -> tuple:
        del client_sizes
        return ()

    def sample(state, key, round, cohort_size, client_sizes):
        del round
        ids = sample_clients(key, client_sizes.shape[0], cohort_size)
        return ids, jnp.ones((cohort_size,), jnp.float32), state

    return ClientSampler(init, sample, "uniform()")


def cumulative_weights(weights: jax.Array) -> jax.Array:
    """``[0, w_0, w_0 + w_1, ..., Σ w]``: the prefix sums :func:`sample_cumulative` searches.

    One ``cumsum``, ``O(N)``, once per run (a sampler's ``init``). Integer weights, so that the
    draws are exact: client ``i`` owns the ``w_i`` integers ``[P_i, P_{i+1})``.

    Args:
      weights: ``int[N]`` non-negative weights (e.g. client sizes) summing to less than
        ``2^31``.

    Returns:
      ``i32[N + 1]``.

    Raises:
      TypeError: ``weights`` not a 1-D integer array.
      ValueError: negative weights, or a sum of ``2^31`` or more (checked when concrete).

    Example:
      >>> import jax.numpy as jnp
      >>> cumulative_weights(jnp.array([1, 0, 3])).tolist()
      [0, 1, 1, 4]
    """
    weights = jnp.asarray(weights)
    if not jnp.issubdtype(weights.dtype, jnp.integer) or weights.ndim != 1:
        raise TypeError(
            f"weights: expected a 1-D integer array (client sizes), got {weights.dtype}"
            f"{list(weights.shape)}; for float weights use sample_clients(..., probs)."
        )
    if not isinstance(weights, jax.core.Tracer):
        w = np.asarray(weights, np.int64)
        if w.size and (w.min() < 0 or w.sum() >= 2**31):
            raise ValueError(
                "weights: need non-negative integers summing to less than 2^31 (int32 prefix "
                f"sums), got min {w.min()} and sum {w.sum()}; use method='gumbel' instead."
            )
    zero = jnp.zeros((1,), jnp.int32)
    return jnp.concatenate([zero, jnp.cumsum(weights.astype(jnp.int32))])


def _first_occurrences(seq: jax.Array, valid: jax.Array, cohort_size: int, sentinel: int):
    """The first ``C`` distinct values of ``seq`` (in order of first appearance) and their count.

    ``valid`` False marks slots to ignore. One stable two-operand sort of ``len(seq)`` values.
    """
    m = seq.shape[0]
    vals = jnp.where(valid, seq, sentinel)
    pos = jnp.arange(m, dtype=jnp.int32)
    sorted_vals, sorted_pos = jax.lax.sort((vals, pos), num_keys=1, is_stable=True)
    head = jnp.concatenate([jnp.ones((1,), jnp.bool_), sorted_vals[1:] != sorted_vals[:-1]])
    first = jnp.zeros((m,), jnp.bool_).at[sorted_pos].set(head & (sorted_vals != sentinel))
    rank = jnp.cumsum(first) - 1
    slot = jnp.where(first & (rank < cohort_size), rank, cohort_size)
    ids = jnp.full((cohort_size,), sentinel, jnp.int32).at[slot].set(seq, mode="drop")
    return ids, jnp.minimum(jnp.sum(first), cohort_size).astype(jnp.int32)


def sample_cumulative(key: PRNGKey, cumulative: jax.Array, cohort_size: int) -> jax.Array:
    """``C`` distinct clients by successive sampling in ``O(C log N)`` expected work.

    Successive sampling draws each next client with probability ``w_i / Σ_{j not drawn} w_j``
    among the clients not drawn yet: the Plackett-Luce order, the distribution of Gumbel top-k
    on ``log w`` (:func:`sample_clients` with ``probs``), whose ``O(N)`` Gumbel draw and
    ``top_k`` this replaces; the draws for a given key differ.

    How: an i.i.d. stream of draws WITH replacement, each ``u`` uniform in ``[0, Σ w)`` and the
    client ``i`` with ``P_i <= u < P_{i+1}`` (a binary search, ``jnp.searchsorted``, in the
    prefix sums of :func:`cumulative_weights`), kept at its FIRST occurrence; the first ``C``
    distinct clients of the stream, in order, are the sample. Exact: given the clients seen so
    far, the next new one is the next draw outside them, distributed as ``w`` restricted to the
    rest (a duplicate is a rejected draw). The stream comes in blocks of ``C`` draws
    (``fold_in(key, t)`` for block ``t``, a ``jax.lax.while_loop`` until ``C`` are distinct);
    each block costs ``C`` binary searches and one sort of ``2C`` ids. A draw repeats an
    earlier client with probability ``<= C max_i w_i / Σ w`` (``~10^-4`` for 100 clients out of a
    million of similar sizes: one block, almost always); only when a few clients hold most of
    the weight do rejections pile up (expected blocks grow like ``1 / (1 - drawn weight)``).
    A client of weight 0 owns no integer and is never drawn; at least ``C`` clients must have
    positive weight (otherwise the loop would not end).

    Args:
      key: PRNG key.
      cumulative: ``i32[N + 1]`` from :func:`cumulative_weights`.
      cohort_size: ``C`` (a Python int, ``1 <= C <= N``).

    Returns:
      ``i32[C]`` distinct client indices, in draw order.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cum = cumulative_weights(jnp.array([5, 0, 1, 0, 3]))
      >>> sorted(sample_cumulative(jax.random.key(0), cum, 3).tolist())
      [0, 2, 4]
    """
    cumulative = jnp.asarray(cumulative, jnp.int32)
    num_clients = cumulative.shape[0] - 1
    cohort_size = check_count(cohort_size, "cohort_size")
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(
            f"cohort_size: need 1 <= cohort_size <= num_clients ({num_clients}), got {cohort_size}."
        )
    total = jnp.maximum(cumulative[-1], 1)

    def draw(t):
        u = jax.random.randint(jax.random.fold_in(key, t), (cohort_size,), 0, total, jnp.int32)
        ids = jnp.searchsorted(cumulative, u, side="right", method="scan") - 1
        return ids.astype(jnp.int32)

    def merge(ids, count, new):
        # The stream so far: the ``count`` distinct ids found, then the new block.
        slot = jnp.arange(2 * cohort_size)
        valid = (slot < count) | (slot >= cohort_size)
        return _first_occurrences(jnp.concatenate([ids, new]), valid, cohort_size, num_clients)

    def cond(carry):
        return carry[2] < cohort_size

    def body(carry):
        t, ids, count = carry
        ids, count = merge(ids, count, draw(t))
        return t + 1, ids, count

    ids, count = _first_occurrences(
        draw(0), jnp.ones((cohort_size,), jnp.bool_), cohort_size, num_clients
    )
    _, ids, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), ids, count))
    return ids


_METHODS = ("auto", "gumbel", "search")
SEARCH_MIN_CLIENTS = 1 << 14
"""``size_weighted(method="auto")`` searches prefix sums from this many clients on."""


def size_weighted(method: str = "auto") -> ClientSampler:
    """Each round, ``C`` distinct clients drawn with probability proportional to their size.

    Sequential sampling without replacement; pair it with ``weighting="uniform"`` for an
    unbiased mean of the client updates (McMahan et al. 2017's alternative scheme, Li et al.
    2020 "On the convergence of FedAvg on non-iid data"). Two exact implementations of the
    same distribution, whose draws for a given key differ:

    * ``"gumbel"``: Gumbel top-k on ``log n_i`` (:func:`sample_clients`), ``O(N)`` a round
      (a third of a 100-client round of a small MLP at N = 10^6 on the CPU machines here);
    * ``"search"``: :func:`sample_cumulative`, binary searches in the prefix sums of the sizes
      (built once by ``init``: the sampler's state, ``i32[N + 1]``), ``O(C log N)`` expected
      (under 1% of that round; ``experiments/benchmarks/sampling.py``);
    * ``"auto"`` (default): ``"gumbel"`` below :data:`SEARCH_MIN_CLIENTS` clients (where it
      costs about as little, and runs draw exactly what they always drew), ``"search"`` from
      there on.

    Args:
      method: ``"auto"``, ``"gumbel"`` or ``"search"``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = size_weighted("search")
      >>> sizes = jnp.array([5, 1, 1, 1, 1])
      >>> ids, avail, state = s.sample(s.init(sizes), jax.random.key(0), 0, 2, sizes)
      >>> len(set(ids.tolist())), avail.tolist(), state.tolist()
      (2, [1.0, 1.0], [0, 5, 6, 7, 8, 9])
    """
    if method not in _METHODS:
        choices = ", ".join(map(repr, _METHODS))
        raise ValueError(f"method: expected one of {choices}, got {method!r}.")
    return _size_weighted(method)


@functools.cache
def _size_weighted(method: str) -> ClientSampler:
    def searches(num_clients: int) -> bool:
        return method == "search" or (method == "auto" and num_clients >= SEARCH_MIN_CLIENTS)

    def init(client_sizes: jax.Array) -> PyTree:
        return cumulative_weights(client_sizes) if searches(client_sizes.shape[0]) else ()

    def sample(state, key, round, cohort_size, client_sizes):
        del round
        num_clients = client_sizes.shape[0]
        if searches(num_clients):
            ids = sample_cumulative(key, state, cohort_size)
        else:
            ids = sample_clients(key, num_clients, cohort_size, client_sizes)
        return ids, jnp.ones((cohort_size,), jnp.float32), state

    name = "size_weighted()" if method == "auto" else f"size_weighted({method!r})"
    return ClientSampler(init, sample, name)


def num_local_steps(
    max_client_size: int, batch_size: int, *, local_steps: int | None, epochs: int
) -> int:
    """The static number of local steps ``S`` of a round: fixed, or enough for ``epochs``."""
    if local_steps is not None:
        return int(local_steps)
    return max(1, math.ceil(max_client_size * epochs / batch_size))


def batch_indices(
    key: PRNGKey,
    offset: jax.Array,
    size: jax.Array,
    *,
    num_steps: int,
    batch_size: int,
    max_client_size: int,
    epochs: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Example indices ``[S, B]`` and mask for ONE client's local steps.

    The client's examples ``offset .. offset + size - 1`` are walked in a fresh random order
    each epoch, the epochs concatenated and cut into ``S`` batches of ``B``. With ``epochs=E``
    positions past ``E * size`` are padding (mask 0): clients holding less data do fewer real
    steps. With ``epochs=None`` (fixed local steps) as many epochs are walked as the ``S * B``
    positions need and every position is real.

    Each epoch's order is one sort of ``S * B + max_client_size`` random keys (epoch number
    first, a uniform draw second), so shapes stay static whatever the client's size.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> idx, mask = batch_indices(jax.random.key(0), jnp.array(10), jnp.array(3),
      ...                           num_steps=2, batch_size=2, max_client_size=3, epochs=1)
      >>> sorted(idx.ravel()[:3].tolist()), mask.tolist()
      ([10, 11, 12], [[1.0, 1.0], [1.0, 0.0]])
    """
    positions = num_steps * batch_size
    length = positions + max_client_size
    q = jnp.arange(length, dtype=jnp.int32)
    size = jnp.maximum(jnp.asarray(size, jnp.int32), 1)
    epoch, within = q // size, q % size
    if epochs is None:
        needed = (positions + size - 1) // size
        real = jnp.ones((positions,), jnp.float32)
    else:
        needed = jnp.asarray(epochs, jnp.int32)
        real = (jnp.arange(positions) < epochs * size).astype(jnp.float32)
    big = jnp.iinfo(jnp.int32).max
    epoch_key = jnp.where(epoch < needed, epoch, big)
    draw = jax.random.uniform(key, (length,))
    _, _, order = jax.lax.sort((epoch_key, draw, q), num_keys=2)
    idx = jnp.asarray(offset, jnp.int32) + within[order[:positions]]
    return idx.reshape(num_steps, batch_size), real.reshape(num_steps, batch_size)


def plan_cohort(
    key: PRNGKey,
    offsets: jax.Array,
    client_ids: jax.Array,
    available: jax.Array | None = None,
    *,
    weighting: str = "num_examples",
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The ``[C]``-sized part of a cohort: what each client needs to gather its own batches.

    ``build_cohort = plan_cohort`` then :func:`client_batches` for every client. A round that
    calls :func:`client_batches` inside its client map instead of gathering the whole cohort
    first holds only the batches of the clients being trained at that moment (one for
    ``sequential()``, ``n`` for ``chunked(n)``), so its memory does not grow with ``C``.

    Args:
      key: PRNG key of this round's batches (split into one key per client).
      offsets: ``[num_clients + 1]`` client boundaries.
      client_ids: ``i32[C]`` the cohort.
      available: optional ``f32[C]``; 0 turns a slot into padding (mask 0, weight 0).
      weighting: ``"num_examples"`` (weight = examples held) or ``"uniform"`` (weight 1).

    Returns:
      ``(plan, weights)``: ``plan`` maps ``"key"``, ``"offset"``, ``"size"``, ``"available"`` to
      ``[C]`` arrays (one row per client, the arguments of :func:`client_batches`);
      ``weights`` is ``f32[C]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> plan, w = plan_cohort(jax.random.key(0), jnp.array([0, 3, 4, 9]), jnp.array([2, 0]))
      >>> plan["offset"].tolist(), plan["size"].tolist(), w.tolist()
      ([4, 0], [5, 3], [5.0, 3.0])
    """
    offsets = jnp.asarray(offsets, jnp.int32)
    ids = jnp.asarray(client_ids, jnp.int32)
    cohort_size = ids.shape[0]
    sizes = offsets[ids + 1] - offsets[ids]
    if weighting == "num_examples":
        weights = sizes.astype(jnp.float32)
    elif weighting == "uniform":
        weights = jnp.ones((cohort_size,), jnp.float32)
    else:
        raise ValueError(f"weighting: expected 'num_examples' or 'uniform', got {weighting!r}.")
    if available is None:
        available = jnp.ones((cohort_size,), jnp.float32)
    available = jnp.asarray(available, jnp.float32)
    plan = {
        "key": jax.random.split(key, cohort_size),
        "offset": offsets[ids],
        "size": sizes,
        "available": available,
    }
    return plan, weights * available


def client_batches(
    key: PRNGKey,
    offset: jax.Array,
    size: jax.Array,
    available: jax.Array,
    examples: dict[str, jax.Array],
    *,
    num_steps: int,
    batch_size: int,
    max_client_size: int,
    epochs: int | None,
) -> dict[str, jax.Array]:
    """ONE client's ``[S, B]`` batches gathered from the flat examples, with their mask.

    Called with one row of :func:`plan_cohort`'s plan (``**row``) it gives exactly that
    client's slice of :func:`build_cohort`'s batches.

    Args:
      key, offset, size: the client's batch key and range of examples (see :func:`batch_indices`).
      available: ``f32[]``; 0 makes every position padding (mask 0).
      examples: flat example arrays ``[N_examples, ...]``.
      num_steps, batch_size, max_client_size, epochs: static shapes (see :func:`batch_indices`).

    Returns:
      A dict of ``[S, B, ...]`` arrays, one per feature, and ``"mask"`` ``f32[S, B]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ex = {"x": jnp.arange(6.0)}
      >>> b = client_batches(jax.random.key(0), 4, 2, 1.0, ex, num_steps=1, batch_size=3,
      ...                    max_client_size=3, epochs=1)
      >>> sorted(b["x"][0, :2].tolist()), b["mask"].tolist()
      ([4.0, 5.0], [[1.0, 1.0, 0.0]])
    """
    idx, mask = batch_indices(
        key,
        offset,
        size,
        num_steps=num_steps,
        batch_size=batch_size,
        max_client_size=max_client_size,
        epochs=epochs,
    )
    batches = {name: jnp.asarray(v)[idx] for name, v in examples.items()}
    batches["mask"] = mask * jnp.asarray(available, jnp.float32)
    return batches


def build_cohort(
    key: PRNGKey,
    examples: dict[str, jax.Array],
    offsets: jax.Array,
    client_ids: jax.Array,
    available: jax.Array | None = None,
    *,
    num_steps: int,
    batch_size: int,
    max_client_size: int,
    epochs: int | None,
    weighting: str = "num_examples",
) -> Cohort:
    """Gathers the ``[C, S, B]`` batches of the clients ``client_ids`` from the flat examples.

    Jittable; the cohort's clients come from a :class:`~fedjax_lab.ClientSampler`. It is
    :func:`plan_cohort` followed by :func:`client_batches` for every client, so it holds the
    whole cohort's batches at once (``C * S * B`` examples); see :func:`plan_cohort` for the
    streaming alternative.

    Args:
      key: PRNG key of this round's batches.
      examples: flat example arrays ``[N_examples, ...]``.
      offsets: ``[num_clients + 1]`` client boundaries.
      client_ids: ``i32[C]`` the cohort.
      available: optional ``f32[C]``; 0 turns a slot into padding (mask 0, weight 0).
      num_steps, batch_size, max_client_size, epochs: static shapes (see :func:`batch_indices`).
      weighting: ``"num_examples"`` (a client's weight is the number of examples it holds) or
        ``"uniform"`` (weight 1).

    Returns:
      A :class:`~fedjax_lab.Cohort`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> c = build_cohort(jax.random.key(0), {"x": jnp.arange(6.0)}, jnp.array([0, 4, 6]),
      ...                  jnp.array([1]), num_steps=1, batch_size=3, max_client_size=4,
      ...                  epochs=1)
      >>> c.batches["x"].shape, c.batches["mask"].tolist(), c.weights.tolist()
      ((1, 1, 3), [[[1.0, 1.0, 0.0]]], [2.0])
    """
    plan, weights = plan_cohort(key, offsets, client_ids, available, weighting=weighting)
    batches = jax.vmap(
        lambda row: client_batches(
            **row,
            examples=examples,
            num_steps=num_steps,
            batch_size=batch_size,
            max_client_size=max_client_size,
            epochs=epochs,
        )
    )(plan)
    return Cohort(batches, weights, jnp.asarray(client_ids, jnp.int32))


def _check_population(data: FederatedData, cohort_size: int) -> None:
    """Host-side checks of a population before anything compiles."""
    sizes = np.asarray(data.client_sizes)
    if np.any(sizes <= 0):
        empty = np.flatnonzero(sizes <= 0)[:5].tolist()
        raise ValueError(
            f"train_data: clients {empty} hold no examples; drop empty clients (e.g. "
            "data.select_clients(np.flatnonzero(data.client_sizes > 0))) before training."
        )
    if (
        isinstance(cohort_size, (bool, np.bool_))
        or not isinstance(cohort_size, (int, np.integer))
        or cohort_size < 1
    ):
        raise ValueError(
            f"cohort_size: need a whole number >= 1 (an int, not a bool), got {cohort_size!r}."
        )
    if cohort_size > data.num_clients:
        raise ValueError(
            f"cohort_size: {cohort_size} clients a round is more than the population holds "
            f"({data.num_clients}); use cohort_size <= {data.num_clients}."
        )
