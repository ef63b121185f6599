"""The host-state path of :func:`fedjax_lab.run_rounds` (``client_states_on="host"``).

Every round's cohort is drawn first (the sampler does not depend on training), then each round
is one jitted program fed the cohort's rows of the host-resident per-client state
(:mod:`fedjax_lab._host_state`), pipelined with JAX's asynchronous dispatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import _host_state, _streaming
from fedjax_lab._round import round_core
from fedjax_lab._scan import cohorts_on_host, round_cohort, with_eval


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
    max_update_norm=None,
    streamed=False,
):
    """One round with host-resident client states: the cohort's ``rows`` in, new rows out.

    ``streamed``: ``examples`` are the parts of the cohort's own rows (host-streamed data,
    :mod:`fedjax_lab._streaming`) instead of the population's flat examples.
    """
    cohort, gathering = round_cohort(
        key,
        state.round,
        _streaming.joined(examples) if streamed else examples,
        offsets,
        ids,
        available,
        streamed=streamed,
        num_steps=num_steps,
        batch_size=batch_size,
        max_client_size=max_client_size,
        epochs=epochs,
        weighting=weighting,
    )
    cohort_states = _host_state.patch_rows(rows, ids, prev_ids, prev_rows)
    view = _host_state.population_view(population)
    state, new_rows, metrics = round_core(
        alg, client_map, state, cohort, cohort_states, key, client_view=view,
        max_update_norm=max_update_norm, **gathering
    )
    metrics["client_ids"] = cohort.client_ids
    metrics["available_clients"] = jnp.sum(available)
    metrics = with_eval(metrics, state.params, state.round, eval_fn, eval_every, eval_batches)
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
    "max_update_norm",
    "streamed",
)


_host_round_jit = jax.jit(_host_round_impl, static_argnames=_HOST_STATIC)


_host_round_jit_donated = jax.jit(
    _host_round_impl, static_argnames=_HOST_STATIC, donate_argnames=("state",)
)


def run_rounds_host(alg, client_map, state, key, arrays, static, donate, stream=None):
    """The host-storage loop: cohorts drawn up front, then one jitted round per round.

    ``stream``: with host-streamed data, ``stream(ids_host)`` opens the
    :class:`~fedjax_lab._streaming.Prefetcher` of every round's cohort rows; else ``None``.
    """
    store, treedef = _host_state.to_host(state.client_states)
    population = _host_state.population_spec(state.client_states)
    sampler_state, ids_host, available_host = cohorts_on_host(state, key, arrays, static)
    core = state._replace(client_states=(), sampler_state=())
    round_fn = _host_round_jit_donated if donate else _host_round_jit
    kw = {k: static[k] for k in _HOST_STATIC[3:-1]}
    carry = {"state": core}
    feed = None if stream is None else stream(ids_host)

    def dispatch(t, rows, prev_ids, prev_rows):
        examples = arrays["examples"] if feed is None else feed.get(t)
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
                examples,
                arrays["offsets"],
                key,
                arrays["eval_batches"],
                population=population,
                streamed=feed is not None,
                **kw,
            )
        except (TypeError, ValueError) as e:
            hint = _host_state.explain(e)
            if hint is None:
                raise
            raise hint from e
        carry["state"] = new_core
        if feed is not None:
            feed.used(examples, metrics)
        return jax.tree.leaves(new_rows), metrics

    if feed is None:
        history = _host_state.pipelined_rounds(store, ids_host, dispatch)
    else:
        with feed:
            history = _host_state.pipelined_rounds(store, ids_host, dispatch)
    # Stacked on the host: jnp.stack would compile a program for every num_rounds.
    history = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *jax.device_get(history))
    final = carry["state"]._replace(
        client_states=jax.tree.unflatten(treedef, store), sampler_state=sampler_state
    )
    return final, history
