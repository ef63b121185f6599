"""Many rounds as one ``lax.scan`` on the device: sampling, batching, the round, evaluation.

Internal: :func:`prepare_run` checks a run's arguments on the host and moves its data to the
device; :func:`scan_rounds` is the traced scan that :func:`fedjax_lab.run_rounds` jits and
:func:`fedjax_lab.sweep.sweep` maps over configurations (the one entry point both use).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import kit
from fedjax_lab._round import round_body
from fedjax_lab._types import ClientSampler, Cohort, PRNGKey, PyTree, ServerState
from fedjax_lab.data import sampling
from fedjax_lab.data._federated import FederatedData

EvalFn = Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]]


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
    "max_update_norm",
)


def round_cohort(
    key, round_, examples, offsets, ids, available, *, weighting, streamed=False, **shapes
) -> tuple[Cohort, dict[str, Any]]:
    """Round ``round_``'s cohort as a plan, and how each client gathers its batches from it.

    The batches are those of :func:`~fedjax_lab.data.sampling.build_cohort` with ``k_batches``
    of ``fold_in(fold_in(key, round_), 1)``; each client gathers its own inside the client map
    (``_round_core``'s ``gather``), so the whole cohort's batches never sit in memory at once.
    Returns the cohort (its ``batches`` the ``[C]`` plan) and ``_round_core``'s gathering
    arguments.

    ``streamed``: ``examples`` are not the population's flat examples but the cohort's own
    rows, ``[C, max_client_size, ...]`` (client ``j``'s examples from row 0, see
    :func:`fedjax_lab._streaming.cohort_rows`); they join the plan, so a sharded map hands each
    device only its clients' rows, and each client indexes its rows with the same shuffled
    positions, so the batches are the same values.
    """
    _, k_batches = jax.random.split(data_key(key, round_))
    plan, weights = sampling.plan_cohort(k_batches, offsets, ids, available, weighting=weighting)
    cohort_ids = jnp.asarray(ids, jnp.int32)
    if streamed:
        plan = dict(plan, rows=examples)
        gather = functools.partial(_gather_own_rows, **shapes)
        return Cohort(plan, weights, cohort_ids), {"gather": gather, "gather_data": ()}
    gather = functools.partial(_gather_client, **shapes)
    cohort = Cohort(plan, weights, cohort_ids)
    return cohort, {"gather": gather, "gather_data": examples}


def _gather_client(row, examples, **shapes):
    return sampling.client_batches(**row, examples=examples, **shapes)


def _gather_own_rows(row, _, **shapes):
    """A streamed client's batches from its own rows (its first example at row 0)."""
    return sampling.client_batches(
        row["key"], 0, row["size"], row["available"], row["rows"], **shapes
    )


def data_key(key: PRNGKey, round_: jax.Array) -> PRNGKey:
    """The key of round ``round_``'s data choices (split into the sampler's and the batches')."""
    return jax.random.fold_in(jax.random.fold_in(key, round_), 1)


def with_eval(metrics, params, round_, eval_fn, eval_every, eval_batches):
    """Adds ``eval_*`` (NaN on rounds that are not due) to a round's metrics."""
    if eval_fn is None:
        return metrics
    due = (round_ % eval_every) == 0
    shapes = jax.eval_shape(lambda p, b: eval_sums(eval_fn, p, b), params, eval_batches)
    nan = jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    evals = jax.lax.cond(due, lambda p: eval_sums(eval_fn, p, eval_batches), lambda p: nan, params)
    return dict(metrics, **{f"eval_{k}": v for k, v in evals.items()})


def eval_sums(eval_fn: EvalFn, params: PyTree, batches: dict[str, jax.Array]):
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
    if "backdoor_hits" in sums and "backdoor_count" in sums:  # fl.metrics.backdoor_metrics
        count = sums["backdoor_count"]
        out["attack_success_rate"] = jnp.where(
            count > 0, sums["backdoor_hits"] / jnp.maximum(count, 1.0), jnp.nan
        )
    return out


def scan_rounds(
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
    max_update_norm=None,
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
        k_sample, _ = jax.random.split(data_key(key, state.round))
        ids, available, sampler_state = sampler.sample(
            state.sampler_state, k_sample, state.round, cohort_size, sizes
        )
        state = state._replace(sampler_state=sampler_state)
        return train_round(
            alg, client_map, state, examples, offsets, ids, available, key, eval_batches,
            eval_fn=eval_fn, eval_every=eval_every, max_update_norm=max_update_norm, **build
        )

    return jax.lax.scan(one_round, state, None, length=num_rounds)


def train_round(
    alg, client_map, state, examples, offsets, ids, available, key, eval_batches, *,
    eval_fn, eval_every, max_update_norm=None, streamed=False, **build,
):
    """One round on the cohort ``ids`` (population client states on the device), traced.

    The body of :func:`scan_rounds` after sampling, and the whole of one streamed round
    (``streamed``: ``examples`` are the cohort's rows, see :func:`round_cohort`).
    """
    cohort, gathering = round_cohort(
        key, state.round, examples, offsets, ids, available, streamed=streamed, **build
    )
    state, metrics = round_body(alg, client_map, state, cohort, key,
                                max_update_norm=max_update_norm, **gathering)
    metrics["client_ids"] = cohort.client_ids
    metrics["available_clients"] = jnp.sum(available)
    metrics = with_eval(metrics, state.params, state.round, eval_fn, eval_every, eval_batches)
    return state, metrics


@functools.partial(jax.jit, static_argnames=("sampler", "num_rounds", "cohort_size"))
def sample_cohorts(sampler_state, key, first_round, offsets, *, sampler, num_rounds, cohort_size):
    """Every round's cohort up front (the sampler's draws do not depend on training).

    The same draws as :func:`scan_rounds` makes round by round (same keys, same sampler).
    Returns ``(final_sampler_state, (ids i32[R, C], available f32[R, C]))``.
    """
    sizes = offsets[1:] - offsets[:-1]

    def step(sampler_state, t):
        r = first_round + t
        k_sample, _ = jax.random.split(data_key(key, r))
        ids, available, sampler_state = sampler.sample(
            sampler_state, k_sample, r, cohort_size, sizes
        )
        return sampler_state, (ids.astype(jnp.int32), jnp.asarray(available, jnp.float32))

    return jax.lax.scan(step, sampler_state, jnp.arange(num_rounds, dtype=jnp.int32))


def cohorts_on_host(state, key, arrays, static) -> tuple[Any, np.ndarray, np.ndarray]:
    """:func:`sample_cohorts` for a run's state and static options, the draws as NumPy.

    Returns ``(final_sampler_state, ids i32[R, C], available f32[R, C])``; the host loops
    (host client state, host-streamed data) draw every round's cohort with it up front.
    """
    sampler_state, (ids, available) = sample_cohorts(
        state.sampler_state,
        key,
        jnp.asarray(state.round, jnp.int32),
        arrays["offsets"],
        sampler=static["sampler"],
        num_rounds=static["num_rounds"],
        cohort_size=static["cohort_size"],
    )
    return sampler_state, np.asarray(ids), np.asarray(available)


_run_rounds_jit = jax.jit(scan_rounds, static_argnames=("alg", "client_map") + _STATIC)


_run_rounds_jit_donated = jax.jit(
    scan_rounds, static_argnames=("alg", "client_map") + _STATIC, donate_argnames=("state",)
)


def init_sampler_state(state: ServerState, sampler: ClientSampler, offsets: Any) -> ServerState:
    """Gives ``state`` the sampler's initial state when it holds none yet (host, once)."""
    if jax.tree.leaves(state.sampler_state):
        return state
    sizes = jnp.diff(jnp.asarray(offsets, jnp.int32))
    return state._replace(sampler_state=sampler.init(sizes))


def flat_batches(examples: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
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


def prepare_run(
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
    data_on: str = "device",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Host side of :func:`run_rounds`: checks every argument, moves the data to the device.

    Returns the array arguments and the static arguments of :func:`scan_rounds`. With
    ``data_on="host"`` the training examples stay host arrays (NumPy views, a memory map
    stays a memory map: nothing is read here).
    """
    if not isinstance(train_data, FederatedData):
        raise TypeError(
            f"train_data: expected a fl.data.FederatedData, got {type(train_data).__name__}; "
            "build one with FederatedData.from_client_arrays(...)."
        )
    for name, value in [
        ("num_rounds", num_rounds),
        ("cohort_size", cohort_size),
        ("batch_size", batch_size),
        ("epochs", epochs),
        ("eval_every", eval_every),
        ("eval_batch_size", eval_batch_size),
    ]:
        if isinstance(value, float):  # counts are whole numbers: 2.0 is a typo too
            raise ValueError(f"{name}: expected a whole number >= 1, got {value!r}.")
        kit.check_count(name, value)
    if isinstance(local_steps, float):
        raise ValueError(f"local_steps: expected a whole number >= 1 or None, got {local_steps!r}.")
    kit.check_count("local_steps", local_steps, optional=True)
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
    if eval_fn is not None:
        from fedjax_lab.models import check_data

        check_data(eval_fn, eval_data)

    max_client_size = int(np.max(train_data.client_sizes))
    num_steps = sampling.num_local_steps(
        max_client_size, batch_size, local_steps=local_steps, epochs=epochs
    )
    if data_on == "host":
        examples = {k: np.asarray(v) for k, v in train_data.examples.items()}
    else:
        examples = {k: jnp.asarray(v) for k, v in train_data.examples.items()}
    offsets = jnp.asarray(train_data.offsets, jnp.int32)
    eval_batches = (
        {k: jnp.asarray(v) for k, v in flat_batches(eval_data.examples, eval_batch_size).items()}
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
