"""Client valuation: leave-one-out and Shapley values of the clients of a federated run.

A coalition ``S`` of the ``N`` clients is a participation mask ``m ∈ {0, 1}^N``; its utility
``U(S)`` is a validation metric (higher is better, e.g. accuracy or minus the loss) of the model
that ``num_rounds`` rounds of an algorithm train when only the clients of ``S`` take part.
:func:`utility` builds ``U`` on the library's own scan over rounds
(:func:`fedjax_lab.run_rounds`'s): the mask is the state of a client sampler
(:func:`coalition`) whose cohort slots outside ``S`` are padding (``available = 0``: weight 0
and batch mask 0, so they take no part in the aggregate and change nothing), and a batch of
masks is ONE jitted program, the run ``jax.vmap``-ped (or ``lax.map``-ped) over the masks,
evaluated chunk after chunk. Every coalition runs with the same key (common random numbers), so
``U`` is a deterministic function of the mask, and the empty coalition is defined: every round
finds no client and is skipped by the round's guard, so ``U(∅)`` is the metric of the initial
model.

Two participation rules (``cohort_size``):

* ``None`` (default): full participation of the coalition, every client of ``S`` trains every
  round (FedAvg over ``S``);
* ``C``: the base sampler (default uniform) draws ``C`` clients each round, the same draws for
  every coalition, and the members of ``S`` among them train (the cohort intersected with
  ``S``; a round with no member is skipped).

The values, from ``U``:

* leave-one-out (:func:`leave_one_out`): ``LOO_i = U(N) - U(N \\ {i})``, ``N + 2``
  evaluations;
* Shapley (Shapley 1953; data Shapley, Ghorbani & Zou 2019, and its federated use, e.g. Wang
  et al. 2020): ``φ_i = Σ_{S ∌ i} |S|! (N-|S|-1)! / N! · (U(S ∪ {i}) - U(S))``, the mean over
  all orderings of the clients of ``i``'s marginal contribution to the clients before it;
  :func:`exact_shapley` enumerates the ``2^N`` coalitions (small ``N``),
  :func:`monte_carlo_shapley` samples ``P`` orderings (Castro, Gómez & Tejada 2009): each one's
  ``N + 1`` prefixes are evaluated, each client's marginals averaged, with a standard error per
  client. Every ordering's marginals add up to ``U(N) - U(∅)``, so the estimate keeps the
  efficiency property ``Σ_i φ_i = U(N) - U(∅)`` exactly (to float rounding) for any ``P``.

The estimators take any ``utility_fn(masks f32[M, N]) -> [M]`` (a :class:`Utility`, or a
hand-written game), and evaluate each distinct mask once.

Example (an additive game: every value is the client's own worth):

  >>> import numpy as np, jax
  >>> worth = np.array([3.0, 1.0, -1.0])
  >>> game = lambda masks: masks @ worth
  >>> exact_shapley(game, 3).values.tolist()
  [3.0, 1.0, -1.0]
  >>> mc = monte_carlo_shapley(game, 3, jax.random.key(0), num_permutations=5)
  >>> mc.values.tolist(), mc.stderr.tolist()
  ([3.0, 1.0, -1.0], [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import _scan, kit
from fedjax_lab import maps as maps_lib
from fedjax_lab._types import (
    ClientMap,
    ClientSampler,
    FederatedAlgorithm,
    Params,
    PRNGKey,
    PyTree,
    ServerState,
)
from fedjax_lab.data import sampling
from fedjax_lab.data._federated import FederatedData

__all__ = [
    "MAX_EXACT_CLIENTS",
    "Utility",
    "Valuation",
    "coalition",
    "coalition_state",
    "exact_shapley",
    "leave_one_out",
    "monte_carlo_shapley",
    "utility",
    "validation_fn",
]

MAX_EXACT_CLIENTS = 20
"""The most clients :func:`exact_shapley` enumerates (``2^20`` coalitions)."""

UtilityFn = Callable[[np.ndarray], Any]


class Valuation(NamedTuple):
    """The values of the clients.

    Attributes:
      values: ``f64[N]`` each client's value (LOO or Shapley).
      stderr: ``f64[N]`` the standard error of each value: 0 for the exact methods, the
        standard error of the mean of the sampled marginals for Monte-Carlo Shapley (NaN with
        one permutation).
      num_evaluations: the number of distinct coalitions evaluated.
      utility_all: ``U`` of the whole population.
      utility_empty: ``U(∅)`` (the initial model).
      method: ``"leave_one_out"``, ``"exact_shapley"`` or ``"monte_carlo_shapley"``.
    """

    values: np.ndarray
    stderr: np.ndarray
    num_evaluations: int
    utility_all: float
    utility_empty: float
    method: str


# ------------------------------------------------------------------------------ the sampler


def coalition_state(mask: Any, base_state: PyTree = ()) -> tuple[jax.Array, PyTree]:
    """The :func:`coalition` sampler's state for the coalition ``mask`` (``{0, 1}^N``).

    Put it into a server state (``state._replace(sampler_state=coalition_state(mask))``) to
    run that coalition with :func:`fedjax_lab.run_rounds`; ``base_state`` is the base
    sampler's state (``base.init(client_sizes)``; ``()`` for stateless samplers).

    Example:
      >>> coalition_state([1, 0, 1])[0].tolist()
      [1.0, 0.0, 1.0]
    """
    return jnp.asarray(mask, jnp.float32), base_state


def coalition(base: ClientSampler | None = None) -> ClientSampler:
    """A client sampler whose state is a coalition mask: only its members take part.

    The state is :func:`coalition_state` ``(mask, base_state)`` (``init`` gives every client:
    a mask of ones). With ``base=None`` the cohort is the whole population in client order
    (``cohort_size`` must be ``N``) and ``available = mask``: full participation of the
    coalition. With a base sampler (e.g. :func:`fedjax_lab.data.sampling.uniform`) the base
    draws the cohort as it would alone (same keys, same draws whatever the mask) and
    ``available`` is the base's availability times ``mask[ids]``: the cohort intersected with
    the coalition. Slots outside the coalition are padding (weight 0, batch mask 0).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = coalition()
      >>> sizes = jnp.ones(3, jnp.int32)
      >>> ids, avail, _ = s.sample(coalition_state([1, 0, 1]), jax.random.key(0), 0, 3, sizes)
      >>> ids.tolist(), avail.tolist()
      ([0, 1, 2], [1.0, 0.0, 1.0])
    """
    if base is not None and not isinstance(base, ClientSampler):
        raise TypeError(
            f"base: expected a fl.ClientSampler such as fl.data.sampling.uniform(), or None, "
            f"got {type(base).__name__}."
        )
    return _coalition(base)


@functools.cache  # one sampler per base: the compiled programs that take it are reused
def _coalition(base: ClientSampler | None) -> ClientSampler:
    def init(client_sizes: jax.Array) -> tuple[jax.Array, PyTree]:
        base_state = () if base is None else base.init(client_sizes)
        return coalition_state(jnp.ones(client_sizes.shape, jnp.float32), base_state)

    def sample(state, key, round, cohort_size, client_sizes):
        mask, base_state = state
        n = client_sizes.shape[0]
        if base is None:
            if cohort_size != n:
                raise ValueError(
                    f"cohort_size: the coalition sampler without a base sampler runs the whole "
                    f"population (cohort_size = {n}), got {cohort_size}; give a base sampler "
                    "for smaller cohorts."
                )
            return jnp.arange(n, dtype=jnp.int32), jnp.asarray(mask, jnp.float32), state
        ids, available, base_state = base.sample(base_state, key, round, cohort_size,
                                                 client_sizes)
        available = jnp.asarray(available, jnp.float32) * jnp.asarray(mask, jnp.float32)[ids]
        return ids, available, (mask, base_state)

    name = "coalition()" if base is None else f"coalition({base.name})"
    return ClientSampler(init, sample, name)


# ------------------------------------------------------------------------------ the utility


def validation_fn(
    eval_fn: Callable[[Params, dict[str, jax.Array]], dict[str, jax.Array]],
    eval_data: FederatedData,
    *,
    metric: str = "accuracy",
    batch_size: int = 256,
) -> Callable[[Params], jax.Array]:
    """``val_fn(params) -> scalar``: a metric of ``eval_fn`` over all of ``eval_data`` (pooled).

    ``metric`` is ``"accuracy"`` or ``"negative_loss"`` (``-loss``: a utility is higher when
    better). The data is checked against ``eval_fn`` on the host
    (:func:`fedjax_lab.models.check_data`) and moved to the device once.

    Example:
      >>> import jax.numpy as jnp, numpy as np, fedjax_lab as fl
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": np.ones((4, 2), "f4"), "y": np.zeros(4, "i4")}])
      >>> val = validation_fn(fl.models.classification_metrics(model), data)
      >>> float(val(model.init(jax.random.key(0)))) in (0.0, 1.0)
      True
    """
    if not callable(eval_fn):
        raise TypeError(f"eval_fn: expected a callable eval_fn(params, batch) -> dict of sums, "
                        f"got {eval_fn!r}.")
    if not isinstance(eval_data, FederatedData):
        raise TypeError(f"eval_data: expected a fl.data.FederatedData, got "
                        f"{type(eval_data).__name__}.")
    if metric not in ("accuracy", "negative_loss"):
        raise ValueError(f"metric: expected 'accuracy' or 'negative_loss', got {metric!r}.")
    kit.check_count("batch_size", batch_size)
    from fedjax_lab.models import check_data

    check_data(eval_fn, eval_data)
    batches = {k: jnp.asarray(v)
               for k, v in _scan.flat_batches(eval_data.examples, int(batch_size)).items()}

    def val_fn(params: Params) -> jax.Array:
        sums = _scan.eval_sums(eval_fn, params, batches)
        return sums["accuracy"] if metric == "accuracy" else -sums["loss"]

    return val_fn


class Utility:
    """``U(masks f32[M, N]) -> f64[M]``: the utilities of a batch of coalitions.

    Built by :func:`utility`. The masks are evaluated ``chunk_size`` at a time by one compiled
    program (the last chunk padded with empty coalitions, so every call reuses it).

    Attributes:
      num_clients: ``N``.
      chunk_size: masks a compiled call evaluates.
      num_evaluations: coalitions evaluated so far by this utility (padding not counted).
    """

    def __init__(self, run_chunk: Callable[[jax.Array], jax.Array], num_clients: int,
                 chunk_size: int):
        self._run_chunk = run_chunk
        self.num_clients = num_clients
        self.chunk_size = chunk_size
        self.num_evaluations = 0

    def __call__(self, masks: Any) -> np.ndarray:
        masks = _check_masks(masks, self.num_clients)
        m = masks.shape[0]
        pad = (-m) % self.chunk_size
        padded = np.concatenate([masks, np.zeros((pad, self.num_clients), np.float32)])
        out = [np.asarray(self._run_chunk(jnp.asarray(padded[i:i + self.chunk_size])))
               for i in range(0, padded.shape[0], self.chunk_size)]
        self.num_evaluations += m
        return np.concatenate(out)[:m].astype(np.float64) if out else np.zeros(0)

    def __repr__(self) -> str:
        return f"Utility(num_clients={self.num_clients}, chunk_size={self.chunk_size})"


def _check_masks(masks: Any, num_clients: int) -> np.ndarray:
    """``masks`` as ``f32[M, num_clients]`` of zeros and ones, or a clear ``ValueError``."""
    arr = np.asarray(masks)
    if arr.ndim != 2 or arr.shape[1] != num_clients:
        raise ValueError(
            f"masks: expected shape [M, {num_clients}] (one row of 0/1 per coalition of the "
            f"{num_clients} clients), got {arr.shape}."
        )
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"masks: expected 0/1 numbers or booleans, got dtype {arr.dtype}.")
    arr = arr.astype(np.float32)
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("masks: every entry must be 0 (out of the coalition) or 1 (in it).")
    return arr


@functools.partial(
    jax.jit, static_argnames=("alg", "client_map", "val_fn", "mask_map", "static")
)
def _utilities(masks, state, key, arrays, *, alg, client_map, val_fn, mask_map, static):
    static = dict(static)
    base_state = state.sampler_state

    def one(mask):
        run_state = state._replace(sampler_state=coalition_state(mask, base_state))
        final, _ = _scan.scan_rounds(alg, client_map, run_state, key=key, **arrays, **static)
        return jnp.asarray(val_fn(final.params), jnp.float32)

    if mask_map == "vmap":
        return jax.vmap(one)(masks)
    return jax.lax.map(one, masks)


def utility(
    alg: FederatedAlgorithm,
    state: ServerState,
    train_data: FederatedData,
    val_fn: Callable[[Params], jax.Array],
    key: PRNGKey,
    *,
    num_rounds: int,
    batch_size: int,
    local_steps: int | None = None,
    epochs: int = 1,
    cohort_size: int | None = None,
    sampler: ClientSampler | None = None,
    client_map: ClientMap | None = None,
    weighting: str = "num_examples",
    max_update_norm: float | None = None,
    chunk_size: int = 32,
    mask_map: str = "vmap",
) -> Utility:
    """The utility of coalitions of ``train_data``'s clients: ``val_fn`` of the trained model.

    ``U(mask)`` is ``val_fn(params)`` after :func:`fedjax_lab.run_rounds` ``(alg, state,
    train_data, key, ...)`` run with the :func:`coalition` sampler holding ``mask``: with
    ``cohort_size=None`` every member trains every round (full participation of the
    coalition), with ``cohort_size=C`` the base ``sampler`` (default uniform) draws ``C``
    clients a round and its members among them train. All coalitions share ``key``, so equal
    masks give equal utilities, and ``U(zeros) = val_fn(state.params)`` (every round skipped:
    no client). A batch of masks runs as one program, the whole run mapped over ``chunk_size``
    masks (``mask_map="vmap"``: batched, the fast choice for small models; ``"map"``: one
    mask after the other inside the program, less memory).

    Args:
      alg: the algorithm.
      state: the initial server state (``alg.init(params, num_clients=N)``).
      train_data: the ``N`` clients.
      val_fn: ``val_fn(params) -> scalar``, higher is better (e.g. :func:`validation_fn`).
      key: the run key shared by every coalition.
      num_rounds, batch_size, local_steps, epochs, client_map, weighting, max_update_norm: as
        in :func:`fedjax_lab.run_rounds`.
      cohort_size: ``None`` (full participation of the coalition) or clients drawn a round.
      sampler: the base sampler for ``cohort_size`` (default
        :func:`fedjax_lab.data.sampling.uniform`); only with ``cohort_size``.
      chunk_size: masks per compiled call, ``>= 1``.
      mask_map: ``"vmap"`` or ``"map"``.

    Returns:
      A :class:`Utility`: ``U(masks f32[M, N]) -> f64[M]``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, fedjax_lab as fl
      >>> rng = np.random.default_rng(0)
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": rng.normal(size=(4, 2)).astype("f4"), "y": np.ones(4, "f4")}] * 3)
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / 4
      >>> alg = fl.algorithms.fed_avg(loss, client_learning_rate=0.1)
      >>> val = lambda p: -jnp.mean((data.examples["x"] @ p - 1.0) ** 2)
      >>> u = utility(alg, alg.init(jnp.zeros(2)), data, val, jax.random.key(0),
      ...             num_rounds=2, batch_size=2, chunk_size=4)
      >>> values = u(np.array([[0, 0, 0], [1, 1, 1]]))
      >>> bool(values[1] > values[0]), u.num_evaluations
      (True, 2)
    """
    from fedjax_lab import rounds as rounds_lib

    rounds_lib._check_algorithm(alg)
    rounds_lib._check_state(state)
    rounds_lib._check_key(key)
    if not callable(val_fn):
        raise TypeError(f"val_fn: expected a callable val_fn(params) -> scalar, got {val_fn!r}.")
    if not isinstance(train_data, FederatedData):
        raise TypeError(
            f"train_data: expected a fl.data.FederatedData, got {type(train_data).__name__}."
        )
    chunk_size = kit.check_count("chunk_size", chunk_size)
    if mask_map not in ("vmap", "map"):
        raise ValueError(f"mask_map: expected 'vmap' or 'map', got {mask_map!r}.")
    num_clients = int(train_data.num_clients)
    if cohort_size is None:
        if sampler is not None:
            raise ValueError(
                "sampler: a base sampler draws cohorts of cohort_size clients; give cohort_size "
                "too (cohort_size=None is full participation of each coalition)."
            )
        cohort = num_clients
    else:
        cohort = cohort_size
    if jax.tree.leaves(state.sampler_state):
        raise ValueError(
            "state: its sampler_state is already set; pass the initial state of alg.init(...) "
            "(the coalition sampler sets the sampler state of every coalition)."
        )
    arrays, static = _scan.prepare_run(
        train_data,
        num_rounds=num_rounds,
        cohort_size=cohort,
        batch_size=batch_size,
        local_steps=local_steps,
        epochs=epochs,
        weighting=weighting,
        sampler=None,
        eval_fn=None,
        eval_data=None,
        eval_every=1,
        eval_batch_size=1,
    )
    if alg.check_data is not None:
        alg.check_data(train_data)
    rounds_lib._check_population_size(state, num_clients)
    base = None if cohort_size is None else (sampling.uniform() if sampler is None else sampler)
    static["sampler"] = coalition(base)
    static["max_update_norm"] = rounds_lib._check_max_update_norm(max_update_norm)
    shape = jax.eval_shape(val_fn, state.params)
    if not hasattr(shape, "shape") or shape.shape != ():
        raise ValueError(
            f"val_fn: must return a scalar (the utility of a model), got {shape!r}."
        )
    sizes = jnp.diff(arrays["offsets"])
    base_state = () if base is None else base.init(sizes)
    state = state._replace(sampler_state=base_state)
    client_map = maps_lib.resolve(client_map)
    frozen = tuple(sorted(static.items()))

    def run_chunk(masks: jax.Array) -> jax.Array:
        return _utilities(masks, state, key, arrays, alg=alg, client_map=client_map,
                          val_fn=val_fn, mask_map=mask_map, static=frozen)

    return Utility(run_chunk, num_clients, chunk_size)


# ------------------------------------------------------------------------------ the values


def _check_utility(utility_fn: Any, num_clients: Any) -> int:
    if not callable(utility_fn):
        raise TypeError(
            f"utility_fn: expected a callable utility_fn(masks f32[M, N]) -> [M] (e.g. "
            f"fl.valuation.utility(...)), got {utility_fn!r}."
        )
    if isinstance(num_clients, float):
        raise ValueError(f"num_clients: expected a whole number >= 1, got {num_clients!r}.")
    n = kit.check_count("num_clients", num_clients)
    own = getattr(utility_fn, "num_clients", None)
    if own is not None and own != n:
        raise ValueError(
            f"num_clients: the utility values coalitions of {own} clients, got num_clients={n}."
        )
    return n


def _evaluate(utility_fn: UtilityFn, masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Utilities of ``masks`` (each distinct mask evaluated once) and how many were distinct."""
    unique, inverse = np.unique(masks.astype(np.uint8), axis=0, return_inverse=True)
    values = np.asarray(utility_fn(unique.astype(np.float32)), np.float64)
    if values.shape != (unique.shape[0],):
        raise ValueError(
            f"utility_fn: returned shape {values.shape} for {unique.shape[0]} masks; it must "
            "return one utility per mask."
        )
    return values[np.reshape(inverse, -1)], int(unique.shape[0])


def leave_one_out(utility_fn: UtilityFn, num_clients: int) -> Valuation:
    """Leave-one-out values ``LOO_i = U(all) - U(all without i)``.

    ``N + 2`` coalitions: the whole population, each one left out, and the empty one (for
    :attr:`Valuation.utility_empty`).

    Example:
      >>> import numpy as np
      >>> game = lambda m: np.minimum(m.sum(axis=1), 2.0)  # any two clients suffice
      >>> leave_one_out(game, 3).values.tolist()
      [0.0, 0.0, 0.0]
    """
    n = _check_utility(utility_fn, num_clients)
    masks = np.concatenate([np.ones((1, n)), 1.0 - np.eye(n), np.zeros((1, n))])
    u, count = _evaluate(utility_fn, masks)
    values = u[0] - u[1:n + 1]
    return Valuation(values, np.zeros(n), count, float(u[0]), float(u[-1]), "leave_one_out")


def exact_shapley(utility_fn: UtilityFn, num_clients: int) -> Valuation:
    """Shapley values by enumerating all ``2^N`` coalitions (``N <= MAX_EXACT_CLIENTS``).

    ``φ_i = Σ_{S ∌ i} |S|! (N-|S|-1)! / N! · (U(S ∪ {i}) - U(S))``.

    Example:
      >>> import numpy as np
      >>> game = lambda m: np.minimum(m.sum(axis=1), 2.0)
      >>> [round(v, 6) for v in exact_shapley(game, 3).values.tolist()]
      [0.666667, 0.666667, 0.666667]
    """
    n = _check_utility(utility_fn, num_clients)
    if n > MAX_EXACT_CLIENTS:
        raise ValueError(
            f"num_clients: exact Shapley enumerates 2^N coalitions, at most "
            f"N = {MAX_EXACT_CLIENTS}; got {n}. Use monte_carlo_shapley for more clients."
        )
    codes = np.arange(2 ** n)
    masks = ((codes[:, None] >> np.arange(n)) & 1).astype(np.float32)
    u, count = _evaluate(utility_fn, masks)
    sizes = masks.sum(axis=1).astype(int)
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                       for s in range(n)])
    values = np.zeros(n)
    for i in range(n):
        without = codes[(codes >> i) & 1 == 0]
        values[i] = np.sum(weight[sizes[without]] * (u[without | (1 << i)] - u[without]))
    return Valuation(values, np.zeros(n), count, float(u[-1]), float(u[0]), "exact_shapley")


_ORDERING_BLOCK = 256


@functools.partial(jax.jit, static_argnums=2)
def _orderings(key: PRNGKey, start: jax.Array, n: int) -> jax.Array:
    """Orderings ``start .. start + 255``; ordering ``q`` is ``permutation(fold_in(key, q))``."""
    q = start + jnp.arange(_ORDERING_BLOCK, dtype=jnp.int32)
    return jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n))(q)


def monte_carlo_shapley(
    utility_fn: UtilityFn,
    num_clients: int,
    key: PRNGKey,
    num_permutations: int,
) -> Valuation:
    """Shapley values estimated from ``num_permutations`` random orderings of the clients.

    Ordering ``q`` is ``jax.random.permutation(fold_in(key, q), N)`` (so a larger ``P`` with
    the same key extends the same sample); each ordering ``π`` gives ``N + 1`` prefix coalitions
    ``∅, {π_1}, {π_1, π_2}, ..., all``; client ``π_k``'s marginal is
    ``U(π_1..π_k) - U(π_1..π_{k-1})``. The value is the mean of a client's ``P`` marginals
    and ``stderr`` its standard error ``std / sqrt(P)`` (NaN for ``P = 1``). The empty and full
    coalitions are shared by every ordering and every distinct prefix is evaluated once, so
    at most ``P (N - 1) + 2`` coalitions are (fewer when prefixes repeat). Every ordering's
    marginals add up to ``U(all) - U(∅)``, hence so do the values (efficiency).

    Args:
      utility_fn: ``utility_fn(masks f32[M, N]) -> [M]`` (e.g. :func:`utility`).
      num_clients: ``N``.
      key: PRNG key of the orderings.
      num_permutations: ``P >= 1``.

    Example:
      >>> import jax, numpy as np
      >>> game = lambda m: np.minimum(m.sum(axis=1), 2.0)
      >>> v = monte_carlo_shapley(game, 3, jax.random.key(0), num_permutations=200)
      >>> round(float(v.values.sum()), 6), bool(np.all(np.abs(v.values - 2 / 3) < 0.2))
      (2.0, True)
    """
    n = _check_utility(utility_fn, num_clients)
    from fedjax_lab import rounds as rounds_lib

    rounds_lib._check_key(key)
    if isinstance(num_permutations, float):
        raise ValueError(
            f"num_permutations: expected a whole number >= 1, got {num_permutations!r}."
        )
    p = kit.check_count("num_permutations", num_permutations)
    perms = np.concatenate([np.asarray(_orderings(key, jnp.int32(start), n))
                            for start in range(0, p, _ORDERING_BLOCK)])[:p]
    rank = np.argsort(perms, axis=1)  # rank[q, i]: position of client i in ordering q
    sizes = np.arange(1, n)  # the interior prefixes; the empty and full ones are shared
    interior = (rank[:, None, :] < sizes[None, :, None]).reshape(-1, n)
    masks = np.concatenate([np.zeros((1, n), bool), np.ones((1, n), bool), interior])
    u, count = _evaluate(utility_fn, masks)
    empty, full = u[0], u[1]
    prefix = np.concatenate(
        [np.full((p, 1), empty), u[2:].reshape(p, n - 1), np.full((p, 1), full)], axis=1
    )
    steps = np.diff(prefix, axis=1)  # steps[q, k]: marginal of perms[q, k]
    marginals = np.take_along_axis(steps, rank, axis=1)  # [P, N] by client
    values = marginals.mean(axis=0)
    stderr = (marginals.std(axis=0, ddof=1) / math.sqrt(p)) if p > 1 else np.full(n, np.nan)
    return Valuation(values, stderr, count, float(full), float(empty), "monte_carlo_shapley")
