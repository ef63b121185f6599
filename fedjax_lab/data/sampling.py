"""On-device cohort sampling and batch-index building for the flat layout (DESIGN §4).

Everything here is a pure, jittable function of a PRNG key, so a round's cohort and batches are
built inside the compiled round with no host round-trip.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab._types import ClientSampler, Cohort, PRNGKey
from fedjax_lab.data._federated import FederatedData

__all__ = [
    "batch_indices",
    "build_cohort",
    "num_local_steps",
    "sample_clients",
    "size_weighted",
    "uniform",
]


def sample_clients(
    key: PRNGKey, num_clients: int, cohort_size: int, probs: jax.Array | None = None
) -> jax.Array:
    """Samples ``cohort_size`` distinct clients, uniformly or with probabilities ``probs``.

    Uses the Gumbel-top-k trick: ``top_k(log p_i + G_i)`` with i.i.d. Gumbel noise ``G_i`` is
    a sample without replacement (uniform when ``probs`` is None). It costs ``O(num_clients)``
    per round, so it stays cheap for populations of a million clients.

    Args:
      key: PRNG key.
      num_clients: population size ``N``.
      cohort_size: number of distinct clients ``C <= N``.
      probs: optional ``f32[N]`` non-negative sampling weights (need not sum to 1).

    Returns:
      ``i32[C]`` client indices.

    Example:
      >>> import jax
      >>> ids = sample_clients(jax.random.key(0), 10, 4)
      >>> len(set(ids.tolist())), bool(ids.max() < 10)
      (4, True)
    """
    g = jax.random.gumbel(key, (num_clients,))
    if probs is not None:
        g = g + jnp.log(jnp.asarray(probs, jnp.float32))
    return jax.lax.top_k(g, cohort_size)[1].astype(jnp.int32)


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


@functools.cache
def size_weighted() -> ClientSampler:
    """Each round, ``C`` distinct clients drawn with probability proportional to their size.

    Sequential sampling without replacement (Gumbel top-k on ``log n_i``); pair it with
    ``weighting="uniform"`` for an unbiased mean of the client updates (McMahan et al. 2017's
    alternative scheme, Li et al. 2020 "On the convergence of FedAvg on non-iid data").
    """

    def init(client_sizes: jax.Array) -> tuple:
        del client_sizes
        return ()

    def sample(state, key, round, cohort_size, client_sizes):
        del round
        ids = sample_clients(key, client_sizes.shape[0], cohort_size, client_sizes)
        return ids, jnp.ones((cohort_size,), jnp.float32), state

    return ClientSampler(init, sample, "size_weighted()")


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

    Jittable; the cohort's clients come from a :class:`~fedjax_lab.ClientSampler`.

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
    """
    offsets = jnp.asarray(offsets, jnp.int32)
    sizes = offsets[1:] - offsets[:-1]
    ids = jnp.asarray(client_ids, jnp.int32)
    cohort_size = ids.shape[0]
    keys = jax.random.split(key, cohort_size)
    idx, mask = jax.vmap(
        lambda k, o, n: batch_indices(
            k,
            o,
            n,
            num_steps=num_steps,
            batch_size=batch_size,
            max_client_size=max_client_size,
            epochs=epochs,
        )
    )(keys, offsets[ids], sizes[ids])
    batches = {name: jnp.asarray(v)[idx] for name, v in examples.items()}
    if weighting == "num_examples":
        weights = sizes[ids].astype(jnp.float32)
    elif weighting == "uniform":
        weights = jnp.ones((cohort_size,), jnp.float32)
    else:
        raise ValueError(f"weighting: expected 'num_examples' or 'uniform', got {weighting!r}.")
    if available is not None:
        available = jnp.asarray(available, jnp.float32)
        mask = mask * available[:, None, None]
        weights = weights * available
    batches["mask"] = mask
    return Cohort(batches, weights, ids)


def _check_population(data: FederatedData, cohort_size: int) -> None:
    """Host-side checks of a population before anything compiles."""
    sizes = np.asarray(data.client_sizes)
    if np.any(sizes <= 0):
        empty = np.flatnonzero(sizes <= 0)[:5].tolist()
        raise ValueError(
            f"train_data: clients {empty} hold no examples; drop empty clients (e.g. "
            "data.select_clients(np.flatnonzero(data.client_sizes > 0))) before training."
        )
    if not isinstance(cohort_size, (int, np.integer)) or cohort_size < 1:
        raise ValueError(f"cohort_size: need a whole number >= 1, got {cohort_size!r}.")
    if cohort_size > data.num_clients:
        raise ValueError(
            f"cohort_size: {cohort_size} clients a round is more than the population holds "
            f"({data.num_clients}); use cohort_size <= {data.num_clients}."
        )
