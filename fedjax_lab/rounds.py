"""Rounds: one round is one jitted XLA program; many rounds are one ``lax.scan``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import _host_state
from fedjax_lab import maps as maps_lib
from fedjax_lab import tree as tree_lib
from fedjax_lab._types import (
    ClientInput,
    ClientMap,
    ClientSampler,
    Cohort,
    FederatedAlgorithm,
    PRNGKey,
    PyTree,
    ServerState,
)
from fedjax_lab.data import sampling
from fedjax_lab.data._federated import FederatedData

__all__ = ["client_state_bytes", "run_round", "run_rounds"]

EvalFn = Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]]


def _round_core(
    alg: FederatedAlgorithm,
    client_map: ClientMap,
    state: ServerState,
    cohort: Cohort,
    cohort_states: PyTree,
    key: PRNGKey,
    *,
    client_view: PyTree = None,
    gather: Callable[[PyTree, PyTree], PyTree] | None = None,
    gather_data: PyTree = (),
) -> tuple[ServerState, PyTree, dict[str, jax.Array]]:
    """One round, traced, on the cohort's per-client states ``cohort_states`` (``[C, ...]``).

    Returns ``(new_state, new_cohort_states, metrics)``; ``new_state.client_states`` is
    ``state.client_states`` untouched (the caller writes ``new_cohort_states`` back). With
    ``client_view`` (host-resident storage) ``state.client_states`` is ``()`` and the algorithm
    sees ``client_view`` (shape-only placeholders) in its place.

    With ``gather``, ``cohort.batches`` holds each client's plan (a few ``[C]`` numbers, see
    :func:`~fedjax_lab.data.sampling.plan_cohort`) and every client gathers its own batches
    inside the client map, ``gather(plan_row, gather_data)``: the cohort's batches are never
    all in memory at once (``sequential`` holds one client's, ``chunked(n)`` n clients'), and
    each client's examples are gathered right before it trains on them.
    """
    alg_state = state if client_view is None else state._replace(client_states=client_view)
    _check_state_matches(alg, alg_state)  # at trace time: once per compile, before XLA runs
    round_key = jax.random.fold_in(key, state.round)
    k_clients, k_agg, k_server = jax.random.split(round_key, 3)
    c = cohort.weights.shape[0]
    client_keys = jax.random.split(k_clients, c)
    has_client_state = bool(jax.tree.leaves(cohort_states))
    stack = alg.aggregator.reduce == "stack"

    def one_client(shared, x):
        server_state, agg_state, data = shared
        if client_view is not None:
            server_state = server_state._replace(client_states=client_view)
        batches, weight_in, client_id, client_state, ckey = x
        if gather is not None:
            batches = gather(batches, data)
        out = alg.client_update(
            server_state, ClientInput(batches, weight_in, client_id, client_state), ckey
        )
        finite = tree_lib.all_finite(out.update)
        weight = jnp.where(finite, jnp.asarray(out.weight, jnp.float32), 0.0)
        update = optax.tree.where(finite, out.update, optax.tree.zeros_like(out.update))
        contribution = alg.aggregator.prepare(update, weight, agg_state)
        metrics = {k: jnp.where(finite, v, 0.0) for k, v in out.metrics.items()}
        metrics["dropped_clients"] = 1.0 - finite.astype(jnp.float32)
        # A dropped client, or a padding slot (cohort weight 0), keeps its old per-client state.
        keep_new = finite & (jnp.asarray(weight_in) > 0)
        new_state = optax.tree.where(keep_new, out.state, client_state) if has_client_state else ()
        to_sum = ((), metrics) if stack else (contribution, metrics)
        to_stack = (contribution if stack else (), new_state)
        return to_sum, to_stack

    xs = (cohort.batches, cohort.weights, cohort.client_ids, cohort_states, client_keys)
    shared = (state, state.aggregator_state, gather_data)
    (summed, metrics), (stacked, new_cohort_states) = client_map.apply(one_client, shared, xs)
    contributions = stacked if stack else summed
    aggregate, total_weight, agg_state = alg.aggregator.finalize(
        contributions, state.aggregator_state, k_agg
    )
    new_state = alg.server_update(alg_state, aggregate, k_server)
    new_state = new_state._replace(aggregator_state=agg_state)
    # A round in which no client counted, or whose result is not finite, changes nothing
    # (the per-client states included: the where runs on the cohort's rows, not on [N, ...]).
    applied = (total_weight > 0) & tree_lib.all_finite(new_state.params)
    new_state = optax.tree.where(
        applied, new_state._replace(client_states=()), state._replace(client_states=())
    )
    new_state = new_state._replace(round=state.round + 1, client_states=state.client_states)
    if has_client_state:
        new_cohort_states = jax.tree.map(
            lambda new, old: jax.lax.convert_element_type(jnp.where(applied, new, old), old.dtype),
            new_cohort_states,
            cohort_states,
        )
    else:
        new_cohort_states = ()

    num_examples = metrics.get("num_examples", jnp.zeros(()))
    out = dict(metrics)
    if "loss_sum" in metrics:
        out["train_loss"] = metrics["loss_sum"] / jnp.maximum(num_examples, 1.0)
    out["total_weight"] = total_weight
    out["round_skipped"] = 1.0 - applied.astype(jnp.float32)
    out["update_norm"] = tree_lib.global_norm(aggregate) * applied
    return new_state, new_cohort_states, out


def _round_body(
    alg: FederatedAlgorithm,
    client_map: ClientMap,
    state: ServerState,
    cohort: Cohort,
    key: PRNGKey,
    **gathering: Any,
) -> tuple[ServerState, dict[str, jax.Array]]:
    """One round, traced, with the population's client states on the device.

    The cohort's rows are gathered from ``state.client_states`` (``[N, ...]``), updated by
    :func:`_round_core` and scattered back (in place inside a scan or with a donated state).
    """
    has_client_state = bool(jax.tree.leaves(state.client_states))
    ids = cohort.client_ids
    cohort_states = jax.tree.map(lambda a: a[ids], state.client_states) if has_client_state else ()
    new_state, new_cohort_states, metrics = _round_core(
        alg, client_map, state, cohort, cohort_states, key, **gathering
    )
    if has_client_state:
        new_state = new_state._replace(
            client_states=jax.tree.map(
                lambda a, s: a.at[ids].set(s), state.client_states, new_cohort_states
            )
        )
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("alg", "client_map"))
def _run_round_jit(alg, client_map, state, cohort, key):
    return _round_body(alg, client_map, state, cohort, key)


def _check_algorithm(alg: Any) -> None:
    if not isinstance(alg, FederatedAlgorithm):
        raise TypeError(
            f"alg: expected a fl.FederatedAlgorithm (e.g. fl.algorithms.fed_avg(loss_fn)), "
            f"got {type(alg).__name__}."
        )


def _check_state(state: Any) -> None:
    if not isinstance(state, ServerState):
        raise TypeError(
            f"state: expected the fl.ServerState returned by alg.init(params), "
            f"got {type(state).__name__}."
        )


def _check_state_matches(alg: FederatedAlgorithm, state: ServerState) -> None:
    """The state must be what ``alg.init(state.params)`` builds (same trees, shapes, dtypes)."""
    leaves = jax.tree.leaves(state.client_states)
    num_clients = leaves[0].shape[0] if leaves else None
    expected = jax.eval_shape(lambda p: alg.init(p, num_clients=num_clients), state.params)
    for field in ("opt_state", "aggregator_state"):
        problem = tree_lib.structure_mismatch(getattr(expected, field), getattr(state, field))
        if problem:
            raise ValueError(
                f"state: its {field} does not fit this algorithm and these params ({problem}); "
                "build the state with alg.init(params) of the same algorithm."
            )


def _check_key(key: Any) -> None:
    ok = isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not ok:
        raise TypeError(f"key: expected a PRNG key such as jax.random.key(0), got {key!r}.")


def _resolve_map(client_map: ClientMap | None) -> ClientMap:
    if client_map is None:
        return maps_lib.auto()
    if not isinstance(client_map, ClientMap):
        raise TypeError(
            f"client_map: expected a fl.ClientMap such as fl.maps.auto(), "
            f"got {type(client_map).__name__}."
        )
    return client_map


def _check_cohort(cohort: Any) -> None:
    if not isinstance(cohort, Cohort):
        raise TypeError(f"cohort: expected a fl.Cohort, got {type(cohort).__name__}.")
    if "mask" not in cohort.batches:
        raise ValueError('cohort: batches["mask"] (f32[C, S, B], 1 = real example) is missing.')
    mask_shape = np.shape(cohort.batches["mask"])
    if len(mask_shape) != 3:
        raise ValueError(
            f'cohort: batches["mask"] must have shape [C clients, S steps, B batch], '
            f"got {mask_shape}."
        )
    for name, v in cohort.batches.items():
        if np.shape(v)[:3] != mask_shape:
            raise ValueError(
                f"cohort: batches[{name!r}] has leading axes {np.shape(v)[:3]}, but the mask has "
                f"{mask_shape}; every array needs the same [C, S, B] leading axes."
            )
    c = mask_shape[0]
    if np.shape(cohort.weights) != (c,) or np.shape(cohort.client_ids) != (c,):
        raise ValueError(
            f"cohort: weights and client_ids need shape ({c},) (one per client); got "
            f"{np.shape(cohort.weights)} and {np.shape(cohort.client_ids)}."
        )


def run_round(
    alg: FederatedAlgorithm,
    state: ServerState,
    cohort: Cohort,
    key: PRNGKey,
    *,
    client_map: ClientMap | None = None,
) -> tuple[ServerState, dict[str, jax.Array]]:
    """Runs one round as one jitted program: clients, aggregation and server step.

    Every client of the cohort runs ``alg.client_update`` (mapped by ``client_map``); a client
    whose update is not finite is dropped (weight 0) and counted in
    ``metrics["dropped_clients"]``; the aggregator combines the rest; ``alg.server_update``
    applies the aggregate. A round where every weight is 0 (or whose new params would not be
    finite) is skipped: the server state stays exactly as it was, except that ``round`` counts
    on. Randomness: ``fold_in(key, state.round)``, so the same key gives the same result.

    Args:
      alg: the algorithm (e.g. ``fl.algorithms.fed_avg(loss_fn)``).
      state: the server state from ``alg.init(params)`` or a previous round.
      cohort: this round's data (:class:`~fedjax_lab.Cohort`).
      key: PRNG key (the same for every round: the round number is folded in).
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.auto`).

    Returns:
      ``(new_state, metrics)``; metrics include ``train_loss`` (mean over the cohort's real
      examples), ``num_examples``, ``dropped_clients``, ``total_weight``, ``round_skipped`` and
      ``update_norm``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.1))
      >>> state = alg.init(jnp.zeros(2))
      >>> cohort = fl.Cohort({"x": jnp.ones((3, 1, 4, 2)), "y": jnp.ones((3, 1, 4)),
      ...                     "mask": jnp.ones((3, 1, 4))}, jnp.ones(3), jnp.arange(3))
      >>> state, metrics = fl.run_round(alg, state, cohort, jax.random.key(0))
      >>> [round(v, 4) for v in state.params.tolist()], int(state.round)
      ([0.2, 0.2], 1)
    """
    _check_algorithm(alg)
    _check_state(state)
    _check_cohort(cohort)
    _check_key(key)
    client_map = _resolve_map(client_map)
    placement = maps_lib.state_sharding(client_map, int(np.shape(cohort.weights)[0]))
    state = _place_state(state, placement)
    return _run_round_jit(alg, client_map, state, cohort, key)


# ------------------------------------------------------------------------------- many rounds


_STATIC = (
    "num_rounds",
    "cohort_size",
    "num_steps",
    "batch_size",
    "max_client_size",
    "epochs",
    "weighting",
    "sampler",
    "eval_fn",
    "eval_every",
)


def _round_cohort(
    key, round_, examples, offsets, ids, available, *, weighting, **shapes
) -> tuple[Cohort, dict[str, Any]]:
    """Round ``round_``'s cohort as a plan, and how each client gathers its batches from it.

    The batches are those of :func:`~fedjax_lab.data.sampling.build_cohort` with ``k_batches``
    of ``fold_in(fold_in(key, round_), 1)``; each client gathers its own inside the client map
    (``_round_core``'s ``gather``), so the whole cohort's batches never sit in memory at once.
    Returns the cohort (its ``batches`` the ``[C]`` plan) and ``_round_core``'s gathering
    arguments.
    """
    _, k_batches = jax.random.split(_data_key(key, round_))
    plan, weights = sampling.plan_cohort(k_batches, offsets, ids, available, weighting=weighting)
    gather = functools.partial(_gather_client, **shapes)
    cohort = Cohort(plan, weights, jnp.asarray(ids, jnp.int32))
    return cohort, {"gather": gather, "gather_data": examples}


def _gather_client(row, examples, **shapes):
    return sampling.client_batches(**row, examples=examples, **shapes)


def _data_key(key: PRNGKey, round_: jax.Array) -> PRNGKey:
    """The key of round ``round_``'s data choices (split into the sampler's and the batches')."""
    return jax.random.fold_in(jax.random.fold_in(key, round_), 1)


def _with_eval(metrics, params, round_, eval_fn, eval_every, eval_batches):
    """Adds ``eval_*`` (NaN on rounds that are not due) to a round's metrics."""
    if eval_fn is None:
        return metrics
    due = (round_ % eval_every) == 0
    shapes = jax.eval_shape(lambda p, b: _eval_sums(eval_fn, p, b), params, eval_batches)
    nan = jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    evals = jax.lax.cond(due, lambda p: _eval_sums(eval_fn, p, eval_batches), lambda p: nan, params)
    return dict(metrics, **{f"eval_{k}": v for k, v in evals.items()})


def _run_rounds_impl(
    alg,
    client_map,
    state,
    examples,
    offsets,
    key,
    eval_batches,
    *,
    num_rounds,
    cohort_size,
    num_steps,
    batch_size,
    max_client_size,
    epochs,
    weighting,
    sampler,
    eval_fn,
    eval_every,
):
    sizes = offsets[1:] - offsets[:-1]
    build = dict(
        num_steps=num_steps,
        batch_size=batch_size,
        max_client_size=max_client_size,
        epochs=epochs,
        weighting=weighting,
    )

    def one_round(state, _):
        k_sample, _ = jax.random.split(_data_key(key, state.round))
        ids, available, sampler_state = sampler.sample(
            state.sampler_state, k_sample, state.round, cohort_size, sizes
        )
        state = state._replace(sampler_state=sampler_state)
        cohort, gathering = _round_cohort(
            key, state.round, examples, offsets, ids, available, **build
        )
        state, metrics = _round_body(alg, client_map, state, cohort, key, **gathering)
        metrics["client_ids"] = cohort.client_ids
        metrics["available_clients"] = jnp.sum(available)
        metrics = _with_eval(metrics, state.params, state.round, eval_fn, eval_every, eval_batches)
        return state, metrics

    return jax.lax.scan(one_round, state, None, length=num_rounds)


_run_rounds_jit = jax.jit(_run_rounds_impl, static_argnames=("alg", "client_map") + _STATIC)
_run_rounds_jit_donated = jax.jit(
    _run_rounds_impl, static_argnames=("alg", "client_map") + _STATIC, donate_argnames=("state",)
)


# ------------------------------------------------------------ host-resident per-client state


@functools.partial(jax.jit, static_argnames=("sampler", "num_rounds", "cohort_size"))
def _sample_cohorts(sampler_state, key, first_round, offsets, *, sampler, num_rounds, cohort_size):
    """Every round's cohort up front: the sampler's draws do not depend on training."""
    sizes = offsets[1:] - offsets[:-1]

    def step(sampler_state, t):
        r = first_round + t
        k_sample, _ = jax.random.split(_data_key(key, r))
        ids, available, sampler_state = sampler.sample(
            sampler_state, k_sample, r, cohort_size, sizes
        )
        return sampler_state, (ids.astype(jnp.int32), jnp.asarray(available, jnp.float32))

    return jax.lax.scan(step, sampler_state, jnp.arange(num_rounds, dtype=jnp.int32))


def _host_round_impl(
    alg,
    client_map,
    state,
    rows,
    ids,
    available,
    prev_ids,
    prev_rows,
    examples,
    offsets,
    key,
    eval_batches,
    *,
    population,
    num_steps,
    batch_size,
    max_client_size,
    epochs,
    weighting,
    eval_fn,
    eval_every,
):
    """One round with host-resident client states: the cohort's ``rows`` in, new rows out."""
    cohort, gathering = _round_cohort(
        key,
        state.round,
        examples,
        offsets,
        ids,
        available,
        num_steps=num_steps,
        batch_size=batch_size,
        max_client_size=max_client_size,
        epochs=epochs,
        weighting=weighting,
    )
    cohort_states = _host_state.patch_rows(rows, ids, prev_ids, prev_rows)
    view = _host_state.population_view(population)
    state, new_rows, metrics = _round_core(
        alg, client_map, state, cohort, cohort_states, key, client_view=view, **gathering
    )
    metrics["client_ids"] = cohort.client_ids
    metrics["available_clients"] = jnp.sum(available)
    metrics = _with_eval(metrics, state.params, state.round, eval_fn, eval_every, eval_batches)
    return state, new_rows, metrics


_HOST_STATIC = (
    "alg",
    "client_map",
    "population",
    "num_steps",
    "batch_size",
    "max_client_size",
    "epochs",
    "weighting",
    "eval_fn",
    "eval_every",
)
_host_round_jit = jax.jit(_host_round_impl, static_argnames=_HOST_STATIC)
_host_round_jit_donated = jax.jit(
    _host_round_impl, static_argnames=_HOST_STATIC, donate_argnames=("state",)
)


def _run_rounds_host(alg, client_map, state, key, arrays, static, donate):
    """The host-storage loop: cohorts drawn up front, then one jitted round per round."""
    store, treedef = _host_state.to_host(state.client_states)
    population = _host_state.population_spec(state.client_states)
    sampler_state, (ids, available) = _sample_cohorts(
        state.sampler_state,
        key,
        jnp.asarray(state.round, jnp.int32),
        arrays["offsets"],
        sampler=static["sampler"],
        num_rounds=static["num_rounds"],
        cohort_size=static["cohort_size"],
    )
    ids_host, available_host = np.asarray(ids), np.asarray(available)
    core = state._replace(client_states=(), sampler_state=())
    round_fn = _host_round_jit_donated if donate else _host_round_jit
    kw = {k: static[k] for k in _HOST_STATIC[3:]}
    carry = {"state": core}

    def dispatch(t, rows, prev_ids, prev_rows):
        try:
            new_core, new_rows, metrics = round_fn(
                alg,
                client_map,
                carry["state"],
                jax.tree.unflatten(treedef, rows),
                ids_host[t],
                available_host[t],
                prev_ids,
                jax.tree.unflatten(treedef, list(prev_rows)),
                arrays["examples"],
                arrays["offsets"],
                key,
                arrays["eval_batches"],
                population=population,
                **kw,
            )
        except (TypeError, ValueError) as e:
            hint = _host_state.explain(e)
            if hint is None:
                raise
            raise hint from e
        carry["state"] = new_core
        return jax.tree.leaves(new_rows), metrics

    history = _host_state.pipelined_rounds(store, ids_host, dispatch)
    # Stacked on the host: jnp.stack would compile a program for every num_rounds.
    history = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *jax.device_get(history))
    final = carry["state"]._replace(
        client_states=jax.tree.unflatten(treedef, store), sampler_state=sampler_state
    )
    return final, history


def _eval_sums(eval_fn: EvalFn, params: PyTree, batches: dict[str, jax.Array]):
    """Sums ``eval_fn`` over ``[K, B]`` batches with a scan, then derives means."""

    def body(acc, batch):
        return jax.tree.map(jnp.add, acc, eval_fn(params, batch)), None

    first = jax.tree.map(lambda a: a[0], batches)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(eval_fn, params, first)
    )
    sums, _ = jax.lax.scan(body, zeros, batches)
    out = dict(sums)
    n = jnp.maximum(sums.get("num_examples", 1.0), 1.0)
    if "loss_sum" in sums:
        out["loss"] = sums["loss_sum"] / n
    if "num_correct" in sums:
        out["accuracy"] = sums["num_correct"] / n
    return out


def _flat_batches(examples: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Host: all examples as ``[K, B, ...]`` batches with a mask (last batch padded)."""
    n = int(np.shape(next(iter(examples.values())))[0])
    k = max(1, -(-n // batch_size))
    pad = k * batch_size - n
    out = {}
    for name, v in examples.items():
        v = np.asarray(v)
        v = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
        out[name] = v.reshape((k, batch_size) + v.shape[1:])
    out["mask"] = (np.arange(k * batch_size) < n).astype(np.float32).reshape(k, batch_size)
    return out


def run_rounds(
    alg: FederatedAlgorithm,
    state: ServerState,
    train_data: FederatedData,
    key: PRNGKey,
    *,
    num_rounds: int,
    cohort_size: int,
    batch_size: int,
    local_steps: int | None = None,
    epochs: int = 1,
    client_map: ClientMap | None = None,
    weighting: str = "num_examples",
    sampler: ClientSampler | None = None,
    eval_fn: EvalFn | None = None,
    eval_data: FederatedData | None = None,
    eval_every: int = 1,
    eval_batch_size: int = 256,
    client_states_on: str = "device",
    donate_state: bool = False,
) -> tuple[ServerState, dict[str, jax.Array]]:
    """Runs ``num_rounds`` rounds as ONE ``lax.scan``: sampling, batching, training, server step.

    Round ``r`` (``r = state.round``) samples ``cohort_size`` distinct clients uniformly on device
    from ``fold_in(fold_in(key, r), 1)``, builds each one's ``[S, B]`` batch indices from its
    range of the flat examples (a fresh shuffle each epoch) and gathers them; then it is exactly
    :func:`run_round` with ``key``. Local work is either ``epochs`` passes over each client's data
    (``S = ceil(max_client_size * epochs / B)``; a client holding less data does fewer real
    steps, the rest are masked and move nothing) or a fixed ``local_steps`` (every step real,
    cycling through the client's data). Because everything depends on ``(key, state.round)``,
    running 10 rounds then 10 more equals running 20 at once.

    Args:
      alg: the algorithm.
      state: the server state (its ``round`` says where the run stands).
      train_data: the population (:class:`~fedjax_lab.data.FederatedData`); moved to the device.
      key: PRNG key of the whole run.
      num_rounds: rounds to run, ``>= 1``.
      cohort_size: clients a round, ``1 <= cohort_size <= num_clients``.
      batch_size: examples a local step, ``>= 1``.
      local_steps: fixed local steps per client (overrides ``epochs``), or ``None``.
      epochs: local passes over each client's data when ``local_steps`` is None, ``>= 1``.
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.auto`).
      weighting: ``"num_examples"`` (a client's weight is the number of examples it holds) or
        ``"uniform"``.
      sampler: how each round's cohort is chosen (a :class:`~fedjax_lab.ClientSampler`; default
        :func:`fedjax_lab.data.sampling.uniform`). A stateful sampler's state lives in
        ``state.sampler_state`` (initialised here on first use) and is checkpointed with it.
      eval_fn: optional ``eval_fn(params, batch) -> dict of sums`` (``loss_sum``, ``num_correct``,
        ``num_examples``, e.g. ``fl.models.classification_metrics(model)``), run on
        ``eval_data`` inside the scan after every ``eval_every``-th round; other rounds report NaN.
      eval_data: the data ``eval_fn`` runs on (all its examples, pooled).
      eval_every: evaluation cadence in rounds, ``>= 1``.
      eval_batch_size: batch size of that evaluation.
      client_states_on: where the population's per-client state (``state.client_states``,
        leaves ``[num_clients, ...]``) lives during the run. ``"device"`` (default): on the
        device, inside the scan; each round gathers the cohort's rows and scatters them back.
        ``"host"``: in NumPy arrays on the host, for populations whose state does not fit the
        device; see "Memory" below. No effect for algorithms without per-client state.
      donate_state: donate ``state``'s device buffers to the run (``jax.jit`` buffer
        donation), so a long run updates the params, optimiser and client states in place
        instead of holding two copies. ``state``'s arrays are deleted by the call (reading them
        afterwards raises); use the returned state. Supported by the CPU, GPU and TPU backends.
        Under a sharded map a state not yet on the mesh is first copied there (that copy is
        what is donated); pass the state a previous call returned to donate without a copy.

    Returns:
      ``(final_state, history)``: ``history`` maps each metric of :func:`run_round` (plus
      ``client_ids`` and ``eval_*``) to an array with a leading ``[num_rounds]`` axis. With
      ``client_states_on="host"`` the final state's ``client_states`` are NumPy arrays.

    Memory:
      Per-client state costs ``num_clients x`` (one client's state) bytes, e.g. SCAFFOLD's
      control variates or Ditto's personal models are one copy of the params per client:
      a 1M-parameter f32 model over 10^5 clients is 400 GB. :func:`client_state_bytes` gives
      the figure for a state (``jax.eval_shape(alg.init, ...)`` gives it without allocating).
      On the device that is held once (the scan updates it in place; twice at the call
      boundary unless ``donate_state=True``). With ``client_states_on="host"`` the device holds
      only a few cohorts' rows (this round's in and out, the previous round's out) and the
      host holds the population once (a fresh NumPy copy of ``state.client_states``, so the
      caller's arrays stay valid). Build a
      state too large for the device on the host, e.g.
      ``with jax.default_device(jax.devices("cpu")[0]): state = alg.init(params, num_clients=N)``.

    Host storage, exactly: all ``num_rounds`` cohorts are drawn first (the sampler's draws do
    not depend on training; same keys as the device path), then each round is one jitted
    program fed the cohort's rows, whose new rows the host writes back; the host gathers round
    ``t + 1``'s rows while round ``t`` runs (JAX's asynchronous dispatch), and rows that round
    ``t`` is still updating are taken from its output on the device. Results equal the device
    path's to float rounding (a round compiled alone may fuse differently from one inside the
    scan). Inside the round the population's state is visible only as shapes (enough for
    ``N = leaf.shape[0]``); an algorithm that reads other clients' state values raises a
    ``ValueError`` and needs ``"device"``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, fedjax_lab as fl
      >>> rng = np.random.default_rng(0)
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": rng.normal(size=(n, 2)).astype("f4"), "y": np.ones(n, "f4")}
      ...      for n in (3, 5, 4)])
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
      >>> alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.05))
      >>> state, hist = fl.run_rounds(alg, alg.init(jnp.zeros(2)), data, jax.random.key(0),
      ...                             num_rounds=5, cohort_size=2, batch_size=2)
      >>> hist["train_loss"].shape, int(state.round)
      ((5,), 5)
    """
    _check_algorithm(alg)
    _check_state(state)
    _check_key(key)
    arrays, static = _prepare_run(
        train_data,
        num_rounds=num_rounds,
        cohort_size=cohort_size,
        batch_size=batch_size,
        local_steps=local_steps,
        epochs=epochs,
        weighting=weighting,
        sampler=sampler,
        eval_fn=eval_fn,
        eval_data=eval_data,
        eval_every=eval_every,
        eval_batch_size=eval_batch_size,
    )
    if client_states_on not in ("device", "host"):
        raise ValueError(
            f"client_states_on: expected 'device' or 'host', got {client_states_on!r}."
        )
    if not isinstance(donate_state, bool):
        raise TypeError(f"donate_state: expected True or False, got {donate_state!r}.")
    _check_population_size(state, train_data.num_clients)
    state = init_sampler_state(state, static["sampler"], arrays["offsets"])
    client_map = _resolve_map(client_map)
    placement = maps_lib.state_sharding(client_map, static["cohort_size"])
    if placement is not None:
        # Clients gather their batches inside the map: a sharded map reads the examples on
        # every device, so they go there once per call here, not inside the program.
        arrays = jax.device_put(arrays, placement)
        if client_states_on == "host":  # the population's states stay where they are
            placed = _place_state(state._replace(client_states=()), placement)
            state = placed._replace(client_states=state.client_states)
        else:
            state = _place_state(state, placement)
    if donate_state:
        state = _unaliased(state)
    if client_states_on == "host" and jax.tree.leaves(state.client_states):
        return _run_rounds_host(alg, client_map, state, key, arrays, static, donate_state)
    run = _run_rounds_jit_donated if donate_state else _run_rounds_jit
    return run(alg, client_map, state, key=key, **arrays, **static)


def _place_state(state: ServerState, placement: Any) -> ServerState:
    """Puts the state where a round returns it (replicated over a sharded map's mesh).

    A state on one device given to a sharded round comes back replicated over the mesh, and the
    next call would compile again for the new placement; placing it first avoids that.
    ``placement`` is :func:`fedjax_lab.maps.state_sharding` of the map and cohort (or None).
    """
    if placement is None:
        return state
    return jax.tree.map(
        lambda x: jax.device_put(x, placement) if isinstance(x, jax.Array) else x, state
    )


def client_state_bytes(state: ServerState) -> int:
    """Bytes that ``state.client_states`` (the whole population's per-client state) takes.

    That is ``num_clients x`` one client's state; divide by ``num_clients`` for one client.
    Works on a real state, on NumPy (host-resident) client states and on the shapes of
    ``jax.eval_shape(alg.init, ...)`` (nothing allocated), so a run can be sized first.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> from fedjax_lab.rounds import client_state_bytes
      >>> loss = lambda p, b, k: jnp.mean((b["x"] @ p) ** 2)
      >>> alg = fl.algorithms.scaffold(loss)
      >>> shapes = jax.eval_shape(lambda p: alg.init(p, num_clients=1000), jnp.zeros(10))
      >>> client_state_bytes(shapes)  # 1000 clients x 10 f32 control variates
      40000
    """
    _check_state(state)
    return tree_lib.nbytes(state.client_states)


def _check_population_size(state: ServerState, num_clients: int) -> None:
    """Every ``client_states`` leaf needs a leading ``[num_clients]`` axis (before compiling)."""
    for leaf in jax.tree.leaves(state.client_states):
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != num_clients:
            raise ValueError(
                f"state: client_states has a leaf of shape {np.shape(leaf)}, but train_data has "
                f"{num_clients} clients; build the state with alg.init(params, "
                f"num_clients={num_clients})."
            )


def _unaliased(state: ServerState) -> ServerState:
    """A donated state must not hold one buffer twice: later occurrences become copies."""
    seen: set[int] = set()

    def fresh(x):
        if isinstance(x, jax.Array) and id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return jax.tree.map(fresh, state)


def init_sampler_state(state: ServerState, sampler: ClientSampler, offsets: Any) -> ServerState:
    """Gives ``state`` the sampler's initial state when it holds none yet (host, once)."""
    if jax.tree.leaves(state.sampler_state):
        return state
    sizes = jnp.diff(jnp.asarray(offsets, jnp.int32))
    return state._replace(sampler_state=sampler.init(sizes))


def _prepare_run(
    train_data: FederatedData,
    *,
    num_rounds: int,
    cohort_size: int,
    batch_size: int,
    local_steps: int | None,
    epochs: int,
    weighting: str,
    sampler: ClientSampler | None,
    eval_fn: EvalFn | None,
    eval_data: FederatedData | None,
    eval_every: int,
    eval_batch_size: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Host side of :func:`run_rounds`: checks every argument, moves the data to the device.

    Returns the array arguments and the static arguments of :func:`_run_rounds_impl`.
    """
    if not isinstance(train_data, FederatedData):
        raise TypeError(
            f"train_data: expected a fl.data.FederatedData, got {type(train_data).__name__}; "
            "build one with FederatedData.from_client_arrays(...)."
        )
    for name, value in [
        ("num_rounds", num_rounds),
        ("batch_size", batch_size),
        ("epochs", epochs),
        ("eval_every", eval_every),
        ("eval_batch_size", eval_batch_size),
    ]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: need a whole number >= 1, got {value!r}.")
    if local_steps is not None and (
        not isinstance(local_steps, (int, np.integer)) or local_steps < 1
    ):
        raise ValueError(f"local_steps: need a whole number >= 1 or None, got {local_steps!r}.")
    if weighting not in ("num_examples", "uniform"):
        raise ValueError(f"weighting: expected 'num_examples' or 'uniform', got {weighting!r}.")
    if sampler is not None and not isinstance(sampler, ClientSampler):
        raise TypeError(
            f"sampler: expected a fl.ClientSampler such as fl.data.sampling.uniform(), "
            f"got {type(sampler).__name__}."
        )
    sampling._check_population(train_data, cohort_size)
    if (eval_fn is None) != (eval_data is None):
        raise ValueError("eval_fn, eval_data: give both to evaluate during training, or neither.")

    max_client_size = int(np.max(train_data.client_sizes))
    num_steps = sampling.num_local_steps(
        max_client_size, batch_size, local_steps=local_steps, epochs=epochs
    )
    examples = {k: jnp.asarray(v) for k, v in train_data.examples.items()}
    offsets = jnp.asarray(train_data.offsets, jnp.int32)
    eval_batches = (
        {k: jnp.asarray(v) for k, v in _flat_batches(eval_data.examples, eval_batch_size).items()}
        if eval_data is not None
        else None
    )
    arrays = {"examples": examples, "offsets": offsets, "eval_batches": eval_batches}
    static = dict(
        num_rounds=int(num_rounds),
        cohort_size=int(cohort_size),
        num_steps=num_steps,
        batch_size=int(batch_size),
        max_client_size=max_client_size,
        epochs=None if local_steps is not None else int(epochs),
        weighting=weighting,
        sampler=sampling.uniform() if sampler is None else sampler,
        eval_fn=eval_fn,
        eval_every=int(eval_every),
    )
    return arrays, static
