"""Client-participation models: samplers whose clients are not always there.

Every sampler is a :class:`~fedjax_lab.ClientSampler` (pure ``init``/``sample``; any state lives in
``ServerState.sampler_state`` and is checkpointed with it). Each round ``r`` a sampler decides
which clients are *available*, then draws the cohort (``cohort_size`` distinct clients, uniformly)
from the available ones. When fewer than ``cohort_size`` clients are available the extra slots
are padding: ``available = 0`` (weight 0, mask 0). Padding slots still carry distinct client ids
(of unavailable clients); an algorithm with per-client state must leave the state of a client of
weight 0 unchanged (the algorithms of this library do).

==========================  =================================================================
``bernoulli(probs)``         client ``i`` available with probability ``p_i``, independently
                             each round (Wang & Ji 2023's "Bernoulli participation").
``markov(p_off, p_on)``      two-state Markov chain per client (on -> off with ``p_on_to_off``,
                             off -> on with ``p_off_to_on``), started from its stationary law.
``dropout_forever(p)``       each present client leaves for good with probability ``p`` after
                             each round.
``weighted(probs)``          every client available; cohort drawn without replacement with
                             probabilities ``∝ probs`` (Gumbel top-k).
==========================  =================================================================

Example:
  >>> import jax, jax.numpy as jnp
  >>> s = bernoulli(jnp.array([1.0, 0.0, 1.0]))
  >>> sizes = jnp.ones(3, jnp.int32)
  >>> ids, avail, _ = s.sample(s.init(sizes), jax.random.key(0), 0, 3, sizes)
  >>> sorted(ids[:2].tolist()), avail.tolist()
  ([0, 2], [1.0, 1.0, 0.0])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab._types import ClientSampler, PRNGKey

__all__ = [
    "MarkovState",
    "bernoulli",
    "cohort_from_available",
    "dropout_forever",
    "markov",
    "weighted",
]


def cohort_from_available(
    key: PRNGKey, available: jax.Array, cohort_size: int
) -> tuple[jax.Array, jax.Array]:
    """Draws ``cohort_size`` distinct clients uniformly from those with ``available[i]``.

    Gumbel top-k on ``G_i + log(available_i)``: available clients come first (in random order),
    then unavailable ones, which become padding slots.

    Args:
      key: PRNG key.
      available: ``bool[N]`` (or 0/1) availability of each client this round.
      cohort_size: ``C <= N`` (static).

    Returns:
      ``(client_ids i32[C], slot_available f32[C])``; slot ``j`` is real iff
      ``j < sum(available)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ids, ok = cohort_from_available(jax.random.key(0), jnp.array([0, 1, 0, 0]), 2)
      >>> int(ids[0]), ok.tolist()
      (1, [1.0, 0.0])
    """
    available = jnp.asarray(available).astype(bool)
    g = jax.random.gumbel(key, available.shape)
    score = jnp.where(available, g, g - 1e9)  # unavailable strictly after every available one
    ids = jax.lax.top_k(score, cohort_size)[1].astype(jnp.int32)
    n_avail = jnp.sum(available.astype(jnp.int32))
    slot_ok = (jnp.arange(cohort_size) < n_avail).astype(jnp.float32)
    return ids, slot_ok


def _probabilities(value: Any, name: str, *, allow_scalar: bool = True) -> np.ndarray:
    """Host check: a probability (or vector of them) in [0, 1]."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1 or (arr.ndim == 0 and not allow_scalar):
        raise ValueError(
            f"{name}: expected {'a probability or ' if allow_scalar else ''}a 1-D array of one "
            f"probability per client, got shape {arr.shape}."
        )
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name}: every probability must lie in [0, 1], got {value!r}.")
    return arr


def _check_length(arr: np.ndarray, client_sizes: jax.Array, name: str) -> None:
    n = int(np.shape(client_sizes)[0])
    if arr.ndim == 1 and arr.shape[0] != n:
        raise ValueError(
            f"{name}: has {arr.shape[0]} entries but the population has {n} clients; give one "
            "per client (or a scalar for all)."
        )


def bernoulli(probs: Any) -> ClientSampler:
    """Independent (Bernoulli) availability: client ``i`` is there with probability ``p_i``.

    Each round ``A_i ~ Bernoulli(p_i)`` independently of everything else; the cohort is
    ``min(C, |A|)`` clients drawn uniformly from ``A = {i : A_i = 1}``, the remaining slots are
    padding. With ``cohort_size = N`` every available client takes part, so client ``i``
    participates with probability exactly ``p_i`` (the setting of FedAU). Stateless.

    Args:
      probs: ``[N]`` availability probabilities in ``[0, 1]`` (or one scalar for all clients).

    Returns:
      A :class:`~fedjax_lab.ClientSampler`.

    References:
      Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
      Federated Averaging", ICLR 2024 (arXiv:2306.03401).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = bernoulli(0.5)
      >>> sizes = jnp.ones(4, jnp.int32)
      >>> ids, avail, _ = s.sample(s.init(sizes), jax.random.key(1), 0, 2, sizes)
      >>> ids.shape, avail.shape
      ((2,), (2,))
    """
    p = _probabilities(probs, "probs")

    def init(client_sizes: jax.Array) -> tuple:
        _check_length(p, client_sizes, "probs")
        return ()

    def sample(state, key, round, cohort_size, client_sizes):
        del round
        _check_length(p, client_sizes, "probs")
        n = client_sizes.shape[0]
        k_avail, k_pick = jax.random.split(key)
        pj = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n,))
        avail = jax.random.uniform(k_avail, (n,)) < pj
        ids, ok = cohort_from_available(k_pick, avail, cohort_size)
        return ids, ok, state

    return ClientSampler(init, sample, f"bernoulli({_describe(p)})")


class MarkovState(NamedTuple):
    """State of :func:`markov`: ``on`` (``bool[N]``, available now) and ``started`` (``bool``:
    False until the first round draws the stationary start)."""

    on: jax.Array
    started: jax.Array


def markov(p_on_to_off: Any, p_off_to_on: Any) -> ClientSampler:
    """Markovian availability: each client is a two-state (on/off) Markov chain.

    Between consecutive rounds an available client becomes unavailable with probability
    ``a = p_on_to_off`` and an unavailable one comes back with probability ``b = p_off_to_on``.
    The first round draws each state from the stationary law ``P(on) = b / (a + b)`` using the
    run's key (so ``init`` needs none). Availability is then stationary with lag-1
    autocorrelation ``1 - a - b``. The cohort is drawn uniformly from the available clients as in
    :func:`bernoulli`. State: :class:`MarkovState`.

    Args:
      p_on_to_off: ``a`` in ``[0, 1]``, a scalar or one per client.
      p_off_to_on: ``b`` in ``[0, 1]``, a scalar or one per client; ``a + b > 0`` everywhere.

    Returns:
      A :class:`~fedjax_lab.ClientSampler`.

    References:
      Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
      Federated Averaging", ICLR 2024 (Markovian participation).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = markov(0.1, 0.3)
      >>> sizes = jnp.ones(5, jnp.int32)
      >>> state = s.init(sizes)
      >>> ids, avail, state = s.sample(state, jax.random.key(0), 0, 5, sizes)
      >>> bool(state.started), int(state.on.sum()) == int(avail.sum())
      (True, True)
    """
    a = _probabilities(p_on_to_off, "p_on_to_off")
    b = _probabilities(p_off_to_on, "p_off_to_on")
    if np.any(np.broadcast_arrays(a, b)[0] + np.broadcast_arrays(a, b)[1] <= 0):
        raise ValueError(
            "p_on_to_off, p_off_to_on: their sum must be > 0 for every client (a chain that never "
            "moves has no stationary start); use a constant availability instead."
        )

    def init(client_sizes: jax.Array) -> MarkovState:
        _check_length(a, client_sizes, "p_on_to_off")
        _check_length(b, client_sizes, "p_off_to_on")
        n = int(np.shape(client_sizes)[0])
        return MarkovState(jnp.zeros((n,), bool), jnp.zeros((), bool))

    def sample(state, key, round, cohort_size, client_sizes):
        del round
        n = client_sizes.shape[0]
        aj = jnp.broadcast_to(jnp.asarray(a, jnp.float32), (n,))
        bj = jnp.broadcast_to(jnp.asarray(b, jnp.float32), (n,))
        k_start, k_step, k_pick = jax.random.split(key, 3)
        stationary = jax.random.uniform(k_start, (n,)) < bj / (aj + bj)
        u = jax.random.uniform(k_step, (n,))
        stepped = jnp.where(state.on, u >= aj, u < bj)
        on = jnp.where(state.started, stepped, stationary)
        ids, ok = cohort_from_available(k_pick, on, cohort_size)
        return ids, ok, MarkovState(on, jnp.ones((), bool))

    return ClientSampler(init, sample, f"markov({_describe(a)}, {_describe(b)})")


def dropout_forever(p_leave: float) -> ClientSampler:
    """Clients that leave and never come back.

    Every client is present in round 0. After each round every present client leaves for good
    with probability ``p_leave``, so client ``i`` is present in round ``r`` with probability
    ``(1 - p_leave) ** r``. The cohort is drawn uniformly from the present clients; once fewer
    than ``cohort_size`` remain the rest of the cohort is padding, and when none remains the
    round is skipped. State: ``bool[N]`` present.

    Args:
      p_leave: per-round probability in ``[0, 1]`` that a present client leaves.

    Returns:
      A :class:`~fedjax_lab.ClientSampler`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = dropout_forever(1.0)
      >>> sizes = jnp.ones(3, jnp.int32)
      >>> _, avail0, state = s.sample(s.init(sizes), jax.random.key(0), 0, 2, sizes)
      >>> _, avail1, state = s.sample(state, jax.random.key(1), 1, 2, sizes)
      >>> avail0.tolist(), avail1.tolist()
      ([1.0, 1.0], [0.0, 0.0])
    """
    p = _probabilities(p_leave, "p_leave")
    if p.ndim != 0:
        raise ValueError(f"p_leave: expected one probability, got shape {p.shape}.")
    p = float(p)

    def init(client_sizes: jax.Array) -> jax.Array:
        return jnp.ones((int(np.shape(client_sizes)[0]),), bool)

    def sample(state, key, round, cohort_size, client_sizes):
        del round, client_sizes
        k_pick, k_leave = jax.random.split(key)
        ids, ok = cohort_from_available(k_pick, state, cohort_size)
        stays = jax.random.uniform(k_leave, state.shape) >= p
        return ids, ok, state & stays

    return ClientSampler(init, sample, f"dropout_forever({p:g})")


def weighted(probs: Any) -> ClientSampler:
    """Non-uniform sampling: ``C`` distinct clients drawn with probabilities ``∝ probs``.

    Sequential sampling without replacement (Gumbel top-k on ``log probs``): the first slot is
    client ``i`` with probability ``probs_i / sum(probs)``, and so on among the rest. Every
    client is always available (no padding). A client of probability 0 is drawn only when fewer
    than ``C`` clients have positive probability. Stateless.

    Args:
      probs: ``[N]`` non-negative weights, not all zero (need not sum to 1).

    Returns:
      A :class:`~fedjax_lab.ClientSampler`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = weighted(jnp.array([0.0, 0.0, 1.0]))
      >>> sizes = jnp.ones(3, jnp.int32)
      >>> ids, avail, _ = s.sample(s.init(sizes), jax.random.key(0), 0, 1, sizes)
      >>> ids.tolist(), avail.tolist()
      ([2], [1.0])
    """
    w = np.asarray(probs, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            "probs: expected a 1-D array of non-negative, finite weights (one per client, not all "
            f"zero), got {probs!r}."
        )
    logw = np.where(w > 0, np.log(np.where(w > 0, w, 1.0)), -1e9).astype(np.float32)

    def init(client_sizes: jax.Array) -> tuple:
        _check_length(w, client_sizes, "probs")
        return ()

    def sample(state, key, round, cohort_size, client_sizes):
        del round
        _check_length(w, client_sizes, "probs")
        g = jax.random.gumbel(key, (client_sizes.shape[0],)) + jnp.asarray(logw)
        ids = jax.lax.top_k(g, cohort_size)[1].astype(jnp.int32)
        return ids, jnp.ones((cohort_size,), jnp.float32), state

    return ClientSampler(init, sample, f"weighted({_describe(w)})")


def _describe(arr: np.ndarray) -> str:
    return f"{float(arr):g}" if arr.ndim == 0 else f"[{arr.shape[0]} clients]"
