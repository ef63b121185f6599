"""The traced round: clients mapped, their outputs aggregated, the server step, the guard.

Internal: :func:`fedjax_lab.run_round` and :func:`fedjax_lab.run_rounds` (device scan and
host-state loop alike) trace :func:`round_core` once per compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import kit
from fedjax_lab import tree as tree_lib
from fedjax_lab._types import (
    ClientInput,
    ClientMap,
    Cohort,
    FederatedAlgorithm,
    PRNGKey,
    PyTree,
    ServerState,
)


def round_core(
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
    max_update_norm: float | None = None,
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

    With ``alg.pre_pass`` the client map runs twice over the same cohort: first the pre-pass
    (each client's ``alg.pre_pass`` at the server state, gathered the same way), whose mean
    weighted by the cohort weights every ``client_update`` then sees as ``client.pre_pass``
    and ``server_update`` as ``aggregate = (aggregate, pre_pass_mean)``. Its keys come from
    ``fold_in(round_key, PRE_PASS_SALT)``, so the other keys of the round are unchanged.

    With ``alg.aggregator.refresh`` the aggregator's state is first refreshed at the current
    server params (``fold_in(round_key, REFRESH_SALT)``). With ``alg.collude`` the client map
    stacks the raw ``(update, weight)`` rows, ``collude`` rewrites the updates
    (``fold_in(round_key, COLLUDE_SALT)``), and ``aggregator.prepare`` runs on each row after.
    With ``alg.aggregator.cohort_aware`` each ``prepare`` also gets ``(slot, client_ids,
    k_agg)``: its slot, the cohort's client ids and the key ``finalize`` gets.

    The guard: the round is applied only when some client counted (``total_weight > 0``), the
    aggregate is finite (and, with ``max_update_norm``, its global norm is at most that), and
    every floating-point leaf of the new server state (params, optimiser and aggregator
    states, ``extra``, the cohort's new per-client states) is finite. Otherwise the state stays
    as it was (``round`` counts on) and the metrics say why: ``skipped_no_client``,
    ``skipped_non_finite_update``, ``skipped_update_norm``, ``skipped_non_finite_server_state``
    (1 for the first reason that applies, in that order).
    """
    alg_state = state if client_view is None else state._replace(client_states=client_view)
    check_state_matches(alg, alg_state)  # at trace time: once per compile, before XLA runs
    round_key = jax.random.fold_in(key, state.round)
    k_clients, k_agg, k_server = jax.random.split(round_key, 3)
    c = cohort.weights.shape[0]
    client_keys = jax.random.split(k_clients, c)
    has_client_state = bool(jax.tree.leaves(cohort_states))
    stack = alg.aggregator.reduce == "stack"
    collude = alg.collude is not None
    cohort_aware = alg.aggregator.cohort_aware
    agg_state_in = state.aggregator_state
    if alg.aggregator.refresh is not None:  # server-side work at the current params (FLTrust)
        agg_state_in = alg.aggregator.refresh(
            agg_state_in, state.params, jax.random.fold_in(round_key, REFRESH_SALT)
        )
    pre = ()
    if alg.pre_pass is not None:
        pre = _pre_pass(alg, client_map, state, cohort, cohort_states, round_key,
                        client_view=client_view, gather=gather, gather_data=gather_data)

    def prepare(update, weight, agg_state, slot, cohort_view):
        if cohort_aware:  # (slot, client_ids, k_agg): secure aggregation's pairwise masks
            return alg.aggregator.prepare(update, weight, agg_state, (slot, *cohort_view))
        return alg.aggregator.prepare(update, weight, agg_state)

    def one_client(shared, x):
        server_state, agg_state, data, cohort_view = shared
        if client_view is not None:
            server_state = server_state._replace(client_states=client_view)
        batches, weight_in, client_id, client_state, ckey, slot = x
        if gather is not None:
            batches = gather(batches, data)
        out = alg.client_update(
            server_state, ClientInput(batches, weight_in, client_id, client_state, pre), ckey
        )
        finite = tree_lib.all_finite(out.update)
        # f32 (f64 kept under jax_enable_x64: differentiable runs in double precision)
        weight = jnp.asarray(out.weight)
        weight = weight.astype(jnp.promote_types(weight.dtype, jnp.float32))
        weight = jnp.where(finite, weight, 0.0)
        update = optax.tree.where(finite, out.update, optax.tree.zeros_like(out.update))
        if collude:  # the raw updates, stacked: the colluders rewrite them after the map
            contribution = (update, weight)
        else:
            contribution = prepare(update, weight, agg_state, slot, cohort_view)
        metrics = {k: jnp.where(finite, v, 0.0) for k, v in out.metrics.items()}
        metrics["dropped_clients"] = 1.0 - finite.astype(jnp.float32)
        # A dropped client, or a padding slot (cohort weight 0), keeps its old per-client state.
        keep_new = finite & (jnp.asarray(weight_in) > 0)
        new_state = optax.tree.where(keep_new, out.state, client_state) if has_client_state else ()
        to_sum = ((), metrics) if stack or collude else (contribution, metrics)
        to_stack = (contribution if stack or collude else (), new_state)
        return to_sum, to_stack

    slots = jnp.arange(c, dtype=jnp.int32) if cohort_aware else ()
    cohort_view = (cohort.client_ids, k_agg) if cohort_aware else ()
    xs = (cohort.batches, cohort.weights, cohort.client_ids, cohort_states, client_keys, slots)
    shared = (state, agg_state_in, gather_data, cohort_view)
    (summed, metrics), (stacked, new_cohort_states) = client_map.apply(one_client, shared, xs)
    contributions = stacked if stack else summed
    if collude:
        updates, weights = stacked
        updates = alg.collude(updates, weights, cohort.client_ids,
                              jax.random.fold_in(round_key, COLLUDE_SALT))
        contributions = jax.vmap(
            lambda u, w, slot: prepare(u, w, agg_state_in, slot, cohort_view)
        )(updates, weights, slots if cohort_aware else jnp.zeros((c,), jnp.int32))
        if not stack:
            contributions = jax.tree.map(lambda x: jnp.sum(x, axis=0), contributions)
    aggregate, total_weight, agg_state = alg.aggregator.finalize(
        contributions, agg_state_in, k_agg
    )
    handed = aggregate if alg.pre_pass is None else (aggregate, pre)
    new_state = alg.server_update(alg_state, handed, k_server)
    new_state = new_state._replace(aggregator_state=agg_state)
    # The guard: a round in which no client counted, or whose aggregate or new server state is
    # not finite, changes nothing (the per-client states included: the where runs on the
    # cohort's rows, not on [N, ...]).
    some_client = total_weight > 0
    norm = tree_lib.global_norm(aggregate)
    finite_update = _all_finite(aggregate)
    norm_ok = jnp.bool_(True) if max_update_norm is None else norm <= max_update_norm
    finite_state = _all_finite(
        (new_state._replace(client_states=(), round=state.round), new_cohort_states)
    )
    applied = some_client & finite_update & norm_ok & finite_state
    reasons = {
        "skipped_no_client": ~some_client,
        "skipped_non_finite_update": some_client & ~finite_update,
        "skipped_update_norm": some_client & finite_update & ~norm_ok,
        "skipped_non_finite_server_state": some_client & finite_update & norm_ok & ~finite_state,
    }
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
    if "loss_sum" in metrics:  # NaN when no client trained: there is no loss to report
        out["train_loss"] = jnp.where(
            num_examples > 0, metrics["loss_sum"] / jnp.maximum(num_examples, 1.0), jnp.nan
        )
    out["total_weight"] = total_weight
    out["round_skipped"] = 1.0 - applied.astype(jnp.float32)
    out.update({k: v.astype(jnp.float32) for k, v in reasons.items()})
    out["update_norm"] = jnp.where(applied, norm, 0.0)
    return new_state, new_cohort_states, out


PRE_PASS_SALT = 0x50524550  # "PREP": the pre-pass's keys, apart from the round's other keys
REFRESH_SALT = 0x52465348  # "RFSH": the aggregator's refresh key
COLLUDE_SALT = 0x434F4C4C  # "COLL": the colluding attackers' key


def _pre_pass(
    alg: FederatedAlgorithm,
    client_map: ClientMap,
    state: ServerState,
    cohort: Cohort,
    cohort_states: PyTree,
    round_key: PRNGKey,
    *,
    client_view: PyTree,
    gather: Callable[[PyTree, PyTree], PyTree] | None,
    gather_data: PyTree,
) -> PyTree:
    """The cohort-weighted mean of ``alg.pre_pass`` over the cohort (one more client map)."""
    c = cohort.weights.shape[0]
    keys = jax.random.split(jax.random.fold_in(round_key, PRE_PASS_SALT), c)

    def one_client(shared, x):
        server_state, data = shared
        if client_view is not None:
            server_state = server_state._replace(client_states=client_view)
        batches, weight_in, client_id, client_state, pkey = x
        if gather is not None:
            batches = gather(batches, data)
        value = alg.pre_pass(
            server_state, ClientInput(batches, weight_in, client_id, client_state), pkey
        )
        finite = tree_lib.all_finite(value)
        weight = jnp.where(finite, jnp.asarray(weight_in, jnp.float32), 0.0)
        weighted = jax.tree.map(lambda v: jnp.where(finite, weight * v, 0.0), value)
        return (weighted, weight), ()

    xs = (cohort.batches, cohort.weights, cohort.client_ids, cohort_states, keys)
    (total, weight), _ = client_map.apply(one_client, (state, gather_data), xs)
    return jax.tree.map(
        lambda t: jnp.where(weight > 0, t / jnp.maximum(weight, 1e-30), 0.0).astype(t.dtype),
        total,
    )


def _all_finite(tree: PyTree) -> jax.Array:
    """Every element of every floating-point leaf is finite (integer, bool and key leaves pass)."""
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def round_body(
    alg: FederatedAlgorithm,
    client_map: ClientMap,
    state: ServerState,
    cohort: Cohort,
    key: PRNGKey,
    **gathering: Any,
) -> tuple[ServerState, dict[str, jax.Array]]:
    """One round, traced, with the population's client states on the device.

    The cohort's rows are gathered from ``state.client_states`` (``[N, ...]``), updated by
    :func:`round_core` and scattered back (in place inside a scan or with a donated state).
    """
    has_client_state = bool(jax.tree.leaves(state.client_states))
    ids = cohort.client_ids
    cohort_states = kit.gather_clients(state.client_states, ids) if has_client_state else ()
    new_state, new_cohort_states, metrics = round_core(
        alg, client_map, state, cohort, cohort_states, key, **gathering
    )
    if has_client_state:
        new_state = new_state._replace(
            client_states=kit.scatter_clients(state.client_states, ids, new_cohort_states)
        )
    return new_state, metrics


def check_state_matches(alg: FederatedAlgorithm, state: ServerState) -> None:
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
