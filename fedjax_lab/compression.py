"""Compressed client updates: sparsification, quantisation and error feedback.

A :class:`Compressor` maps an update (any pytree, flattened to one vector ``v`` of ``d``
entries) to its compressed version, dense again (the simulation keeps shapes fixed), and says
how many bits it costs on the wire. :func:`compressed` wraps any algorithm so that its clients
send compressed updates, optionally with error feedback whose memory is per-client state, and
reports ``bits_sent`` in the round's metrics.

==================  ======================================================  =====================
compressor          rule                                                     bits
==================  ======================================================  =====================
:func:`identity`    ``v``                                                    ``32 d``
:func:`top_k`       the ``k`` entries of largest magnitude, rest zero         ``k (32 + ⌈log2 d⌉)``
:func:`random_k`    ``k`` uniformly random entries (× ``d/k`` if unbiased)   ``32 k`` (shared seed)
:func:`qsgd`        stochastic rounding of ``|v_j|/||v||`` to ``s`` levels    ``32 + d (b + 1)``
==================  ======================================================  =====================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_lab import kit
from fedjax_lab import tree as tree_lib
from fedjax_lab._registry import Registry
from fedjax_lab._types import (
    ClientInput,
    ClientOutput,
    FederatedAlgorithm,
    Params,
    PRNGKey,
    PyTree,
    ServerState,
)

__all__ = [
    "REGISTRY",
    "Compressor",
    "compressed",
    "identity",
    "qsgd",
    "random_k",
    "top_k",
]


REGISTRY = Registry("compressor")
"""Compressors by short name (the ``[compression]`` table of a config)."""


class Compressor(NamedTuple):
    """A compression operator on pytrees.

    Attributes:
      compress: ``compress(tree, key) -> tree`` (same structure, dense).
      bits: ``bits(tree) -> int``: bits to send a compressed tree of this shape (static).
      name: a short label.
    """

    compress: Callable[[PyTree, PRNGKey], PyTree]
    bits: Callable[[PyTree], int]
    name: str


def _size(tree: PyTree) -> int:
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def _on_vector(fn: Callable[[jax.Array, PRNGKey], jax.Array]):
    def compress(tree: PyTree, key: PRNGKey) -> PyTree:
        flat, unravel = ravel_pytree(tree)
        if flat.size == 0:
            return tree
        return unravel(fn(flat, key).astype(flat.dtype))

    return compress


def _count(d: int, fraction: float | None, k: int | None) -> int:
    if k is not None:
        return max(1, min(int(k), d))
    return max(1, min(d, math.ceil(fraction * d)))


def _check_fraction_k(fraction, k):
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: need a whole number of entries >= 1, got {k!r}.")
    elif not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction: the kept fraction must lie in (0, 1], got {fraction!r}.")


@REGISTRY.register("identity")
def identity() -> Compressor:
    """No compression; costs 32 bits an entry.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> identity().bits({"w": jnp.zeros(3)})
      96
    """
    return Compressor(lambda tree, key: tree, lambda tree: 32 * _size(tree), "identity")


@REGISTRY.register("top_k")
def top_k(fraction: float = 0.01, *, k: int | None = None) -> Compressor:
    """Keeps the ``k`` entries of largest magnitude of the whole (flattened) update.

    ``C(v)_j = v_j`` if ``|v_j|`` is among the ``k`` largest, else 0 (ties broken by position,
    exactly ``k`` kept). Biased but contractive: ``||C(v) - v||² <= (1 - k/d) ||v||²``.

    Args:
      fraction: kept fraction of the ``d`` entries (``k = ceil(fraction d)``, at least 1).
      k: the number of entries kept (overrides ``fraction``; capped at ``d``).

    Returns:
      A :class:`Compressor` costing ``k (32 + ceil(log2 d))`` bits (values and indices).

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> top_k(k=2).compress({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, jax.random.key(0))["w"]
      Array([ 0., -3.,  2.,  0.], dtype=float32)
    """
    _check_fraction_k(fraction, k)

    def keep(v, key):
        del key
        n = _count(v.size, fraction, k)
        _, idx = jax.lax.top_k(jnp.abs(v), n)
        return jnp.zeros_like(v).at[idx].set(v[idx])

    def bits(tree):
        d = _size(tree)
        return _count(d, fraction, k) * (32 + max(1, math.ceil(math.log2(max(d, 2)))))

    return Compressor(_on_vector(keep), bits, f"top_k({k if k is not None else fraction})")


@REGISTRY.register("random_k")
def random_k(
    fraction: float = 0.01, *, k: int | None = None, unbiased: bool = False
) -> Compressor:
    """Keeps ``k`` entries chosen uniformly at random without replacement.

    ``C(v)_j = v_j [j ∈ S]`` (``unbiased=True``: ``(d/k) v_j [j ∈ S]``, so ``E[C(v)] = v``).
    The indices come from the key, which the server can share, so only values are sent.

    Args:
      fraction: kept fraction (``k = ceil(fraction d)``).
      k: the number of entries kept (overrides ``fraction``).
      unbiased: scale by ``d/k``.

    Returns:
      A :class:`Compressor` costing ``32 k`` bits.

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> out = random_k(k=2).compress({"w": jnp.arange(1.0, 6.0)}, jax.random.key(0))
      >>> int(jnp.sum(out["w"] != 0))
      2
    """
    _check_fraction_k(fraction, k)

    def keep(v, key):
        n = _count(v.size, fraction, k)
        idx = jax.random.choice(key, v.size, (n,), replace=False)
        scale = v.size / n if unbiased else 1.0
        return jnp.zeros_like(v).at[idx].set(scale * v[idx])

    def bits(tree):
        return 32 * _count(_size(tree), fraction, k)

    return Compressor(_on_vector(keep), bits, f"random_k({k if k is not None else fraction})")


@REGISTRY.register("qsgd")
def qsgd(bits: int = 4) -> Compressor:
    """QSGD stochastic uniform quantisation with ``b`` bits per entry (plus a sign bit).

    With ``s = 2^b - 1`` levels and ``r_j = s |v_j| / ||v||``:
    ``Q(v)_j = ||v|| sign(v_j) ξ_j / s``, ``ξ_j = ⌊r_j⌋ + 1`` with probability
    ``r_j - ⌊r_j⌋``, else ``⌊r_j⌋``. Unbiased, ``E[Q(v)] = v``; a zero vector stays zero.

    Args:
      bits: ``b >= 1`` bits for the level of each entry.

    Returns:
      A :class:`Compressor` costing ``32 + d (b + 1)`` bits (the norm, then level and sign).

    References:
      Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
      Quantization and Encoding", NeurIPS 2017.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q = qsgd(bits=1).compress({"w": jnp.array([3.0, -4.0])}, jax.random.key(0))["w"]
      >>> set(abs(x) for x in q.tolist()) <= {0.0, 5.0}   # 1 bit: 0 or the norm, signed
      True
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 31:
        raise ValueError(f"bits: need a whole number of bits in [1, 31], got {bits!r}.")
    s = float(2**bits - 1)

    def quantise(v, key):
        v = v.astype(jnp.float32)
        norm = jnp.linalg.norm(v)
        safe = jnp.where(norm > 0, norm, 1.0)
        r = s * jnp.abs(v) / safe
        low = jnp.floor(r)
        level = low + (jax.random.uniform(key, v.shape) < (r - low)).astype(jnp.float32)
        return jnp.where(norm > 0, jnp.sign(v) * norm * level / s, 0.0)

    return Compressor(
        _on_vector(quantise), lambda tree: 32 + _size(tree) * (bits + 1), f"qsgd({bits})"
    )


_ERROR_FEEDBACK = (None, "none", "ef", "ef21")


def compressed(
    alg: FederatedAlgorithm,
    compressor: Compressor,
    *,
    error_feedback: str | None = None,
    num_clients: int | None = None,
) -> FederatedAlgorithm:
    """``alg`` whose clients send compressed updates, with optional error feedback.

    Client i computes its update ``Δ_i`` with ``alg.client_update`` and sends

    * ``error_feedback=None``: ``C(Δ_i)``;
    * ``"ef"`` (Seide et al. 2014; Stich et al. 2018), memory ``e_i`` (zeros at first):
      sends ``c_i = C(Δ_i + e_i)``, keeps ``e_i <- Δ_i + e_i - c_i``;
    * ``"ef21"`` (Richtárik et al. 2021), state ``g_i`` (zeros at first): sends
      ``c_i = C(Δ_i - g_i)``, sets ``g_i <- g_i + c_i``. The server mirrors ``g_i`` (it is
      built from sent messages only), so the aggregator receives ``g_i + c_i``.

    The wrapped aggregator and server step are ``alg``'s. The memory is per-client state
    ``[num_clients, ...]`` (shaped like the params: the update must have the params' tree),
    combined with ``alg``'s own as ``client_states = (alg_states, memory)``; a client of
    weight 0 keeps its memory. Metrics gain ``bits_sent``: the bits of every sent message
    (clients of weight > 0), summed over the cohort.

    Args:
      alg: the algorithm whose updates are compressed.
      compressor: a :class:`Compressor` (:func:`top_k`, :func:`random_k`, :func:`qsgd`, ...).
      error_feedback: ``None``/``"none"``, ``"ef"`` or ``"ef21"``.
      num_clients: population size used when ``init`` is called without one (error feedback
        needs it).

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` named ``f"{alg.name}+{compressor.name}"``.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = compressed(fl.algorithms.fed_avg(lambda p, b, k: jnp.sum(p ** 2)), top_k(0.1),
      ...                  error_feedback="ef")
      >>> alg.init(jnp.zeros(3), num_clients=5).client_states[1].shape
      (5, 3)
    """
    if not isinstance(alg, FederatedAlgorithm):
        raise TypeError(f"alg: expected a fl.FederatedAlgorithm, got {type(alg).__name__}.")
    if not isinstance(compressor, Compressor):
        raise TypeError(
            f"compressor: expected a Compressor such as top_k(0.01), got {compressor!r}."
        )
    if error_feedback not in _ERROR_FEEDBACK:
        raise ValueError(
            f"error_feedback: expected None, 'none', 'ef' or 'ef21', got {error_feedback!r}."
        )
    ef = None if error_feedback in (None, "none") else error_feedback
    kit.check_count("num_clients", num_clients, optional=True)
    if ef is not None and not alg.update_is_delta:
        raise ValueError(
            f"error_feedback: the memory is shaped like the params, but {alg.name}'s clients send "
            "more than the model delta; use error_feedback=None for this algorithm."
        )

    default_num_clients = num_clients

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = num_clients if num_clients is not None else default_num_clients
        inner = alg.init(params, n)
        if ef is None:
            return inner
        # only shape checks build a state without a population size
        memory = kit.zeros_per_client(params, n) if n is not None else ()
        return inner._replace(client_states=(inner.client_states, memory))

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        ckey = jax.random.fold_in(key, 0xC0)
        if ef is None:
            out = alg.client_update(state, client, key)
            sent = compressor.compress(out.update, ckey)
            took_part = (jnp.asarray(out.weight) > 0).astype(jnp.float32)
            metrics = dict(out.metrics)
            metrics["bits_sent"] = took_part * compressor.bits(out.update)
            return out._replace(update=sent, metrics=metrics)
        if not (isinstance(client.state, tuple) and len(client.state) == 2) or not jax.tree.leaves(
            client.state[1]
        ):
            raise ValueError(
                "num_clients: error feedback keeps a memory per client; build the state with "
                "alg.init(params, num_clients=N) (or give compressed(..., num_clients=N))."
            )
        inner_state, memory = client.state
        inner_server = state._replace(client_states=state.client_states[0])
        out = alg.client_update(inner_server, client._replace(state=inner_state), key)
        problem = tree_lib.structure_mismatch(memory, out.update)
        if problem:
            raise ValueError(
                f"error_feedback: the memory is shaped like the params, but {alg.name}'s update "
                f"is not ({problem}); use error_feedback=None for this algorithm."
            )
        if ef == "ef":
            corrected = optax.tree.add(out.update, memory)
            message = compressor.compress(corrected, ckey)
            new_memory = optax.tree.sub(corrected, message)
            sent = message
        else:  # ef21
            message = compressor.compress(optax.tree.sub(out.update, memory), ckey)
            new_memory = optax.tree.add(memory, message)
            sent = new_memory
        took_part = jnp.asarray(out.weight) > 0
        new_memory = optax.tree.where(took_part, new_memory, memory)
        metrics = dict(out.metrics)
        metrics["bits_sent"] = took_part.astype(jnp.float32) * compressor.bits(message)
        return ClientOutput(sent, out.weight, metrics, (out.state, new_memory))

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        if ef is None:
            return alg.server_update(state, aggregate, key)
        inner_states, memory = state.client_states
        new = alg.server_update(state._replace(client_states=inner_states), aggregate, key)
        return new._replace(client_states=(new.client_states, memory))

    pre_pass = None
    if alg.pre_pass is not None:  # the pre-pass is not compressed; it sees the inner state

        def pre_pass(state: ServerState, client: ClientInput, key: PRNGKey) -> PyTree:
            if ef is None:
                return alg.pre_pass(state, client, key)
            inner_server = state._replace(client_states=state.client_states[0])
            return alg.pre_pass(inner_server, client._replace(state=client.state[0]), key)

    return FederatedAlgorithm(
        init, client_update, alg.aggregator, server_update, f"{alg.name}+{compressor.name}",
        alg.update_is_delta, alg.check_data, pre_pass, alg.collude,
    )
