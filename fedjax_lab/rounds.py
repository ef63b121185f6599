"""Rounds: one round is one jitted XLA program; many rounds are one ``lax.scan``.

The public entry points. The traced round lives in :mod:`fedjax_lab._round`, the device scan
in :mod:`fedjax_lab._scan`, the host-state loop in :mod:`fedjax_lab._host_rounds` and the
host-streamed data loop in :mod:`fedjax_lab._streaming`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import _streaming
from fedjax_lab import maps as maps_lib
from fedjax_lab import tree as tree_lib
from fedjax_lab._host_rounds import run_rounds_host
from fedjax_lab._round import round_body
from fedjax_lab._scan import (
    EvalFn,
    _run_rounds_jit,
    _run_rounds_jit_donated,
    init_sampler_state,
    prepare_run,
)
from fedjax_lab._types import (
    ClientMap,
    ClientSampler,
    Cohort,
    FederatedAlgorithm,
    PRNGKey,
    ServerState,
)
from fedjax_lab.data._federated import FederatedData

__all__ = ["client_state_bytes", "run_round", "run_rounds"]


@functools.partial(jax.jit, static_argnames=("alg", "client_map", "max_update_norm"))
def _run_round_jit(alg, client_map, state, cohort, key, max_update_norm=None):
    return round_body(alg, client_map, state, cohort, key, max_update_norm=max_update_norm)


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


def _check_key(key: Any) -> None:
    ok = isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not ok:
        raise TypeError(f"key: expected a PRNG key such as jax.random.key(0), got {key!r}.")


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
    max_update_norm: float | None = None,
) -> tuple[ServerState, dict[str, jax.Array]]:
    """Runs one round as one jitted program: clients, aggregation and server step.

    Every client of the cohort runs ``alg.client_update`` (mapped by ``client_map``); a client
    whose update is not finite is dropped (weight 0) and counted in
    ``metrics["dropped_clients"]``; the aggregator combines the rest; ``alg.server_update``
    applies the aggregate.

    The guard: the round is applied only when a client counted, the aggregate is finite (and
    its global norm at most ``max_update_norm``, when given) and every floating-point leaf of
    the new server state is finite: params, the server optimiser's moments, the aggregator's
    state, ``extra`` and the per-client states written this round. Otherwise the server state
    stays exactly as it was, except that ``round`` counts on, and the metrics say why
    (``skipped_no_client``, ``skipped_non_finite_update``, ``skipped_update_norm``,
    ``skipped_non_finite_server_state``). A finite but huge update (one client's delta scaled
    by 1e25) would otherwise turn FedAdam's second moment into inf and freeze those coordinates
    for good; ``max_update_norm`` also refuses finite blow-ups that stay representable.
    Randomness: ``fold_in(key, state.round)``, so the same key gives the same result.

    Args:
      alg: the algorithm (e.g. ``fl.algorithms.fed_avg(loss_fn)``).
      state: the server state from ``alg.init(params)`` or a previous round.
      cohort: this round's data (:class:`~fedjax_lab.Cohort`).
      key: PRNG key (the same for every round: the round number is folded in).
      client_map: how clients are mapped (default :func:`fedjax_lab.maps.auto`).
      max_update_norm: optional bound on the aggregate's global norm (``None``: no bound).

    Returns:
      ``(new_state, metrics)``; metrics include ``train_loss`` (mean over the cohort's real
      examples; NaN when no client trained), ``num_examples``, ``dropped_clients``,
      ``total_weight``, ``round_skipped`` with its reason (``skipped_*``) and ``update_norm``.

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
    client_map = maps_lib.resolve(client_map)
    placement = maps_lib.state_sharding(client_map, int(np.shape(cohort.weights)[0]))
    state = _place_state(state, placement)
    return _run_round_jit(alg, client_map, state, cohort, key,
                          max_update_norm=_check_max_update_norm(max_update_norm))


def _check_max_update_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
        0 < float(value) < float("inf")
    ):
        raise ValueError(
            f"max_update_norm: need a finite number > 0 (or None for no bound), got {value!r}."
        )
    return float(value)


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
    max_update_norm: float | None = None,
    data_on: str = "device",
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
      max_update_norm: optional bound on each round's aggregate norm; a round above it is
        skipped (see the guard of :func:`run_round`, which every round runs).
      data_on: where the training examples live during the run. ``"device"`` (default): moved
        to the device once, every round inside one scan. ``"host"``: they stay in host memory
        (NumPy arrays, or the memory map of :func:`fedjax_lab.data.load_memmap` for data larger
        than RAM) and each round's cohort is streamed to the device; see "Host-streamed data".

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

    Host-streamed data (``data_on="host"``): all ``num_rounds`` cohorts are drawn first (same
    keys and sampler as the scan); a background thread gathers each cohort's examples on the
    host, ``[C, max_client_size, ...]`` (each client's own examples, zero-padded to the
    largest client), and ``jax.device_put``s them (split over the devices with the cohort under
    :func:`fedjax_lab.maps.sharded`, each device receiving only its clients' rows) while the
    previous round runs; each round is then one jitted program. At most two cohorts are on the
    device at once, whatever the population; the offsets (``num_clients + 1`` ints) and
    ``eval_data`` still go to the device. The batches are the same values as on the device, so
    the same key gives the same result (bit for bit, measured on CPU). Combines with
    ``client_states_on="host"``, ``donate_state`` and every sampler; it cannot run inside
    ``jax.jit``/``jax.vmap`` (the rounds are a Python loop). Under ``jax.distributed`` with
    :func:`fedjax_lab.maps.sharded` over every process's devices, each process gathers on the
    host only the rows of the cohort clients its own devices train (and of the ``C % D``
    clients past the mesh, which every process loads: they run replicated), so with a memory
    map a process reads only its clients' examples; the global cohort array is assembled from
    the processes' parts (``jax.make_array_from_single_device_arrays``). Every process must
    hold the same dataset (same offsets; the draws are the same everywhere). Results equal the
    device path's on the same devices (bit for bit, 2 processes of 1 CPU device tested).

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
      >>> streamed, _ = fl.run_rounds(alg, alg.init(jnp.zeros(2)), data, jax.random.key(0),
      ...                             num_rounds=5, cohort_size=2, batch_size=2, data_on="host")
      >>> bool(jnp.array_equal(streamed.params, state.params))
      True
    """
    _check_algorithm(alg)
    _check_state(state)
    _check_key(key)
    _check_data_on(data_on, train_data, state, key)
    arrays, static = prepare_run(
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
        data_on=data_on,
    )
    if client_states_on not in ("device", "host"):
        raise ValueError(
            f"client_states_on: expected 'device' or 'host', got {client_states_on!r}."
        )
    if not isinstance(donate_state, bool):
        raise TypeError(f"donate_state: expected True or False, got {donate_state!r}.")
    if alg.check_data is not None:  # labels, feature shapes and keys against the model
        alg.check_data(train_data)
    _check_population_size(state, train_data.num_clients)
    static["max_update_norm"] = _check_max_update_norm(max_update_norm)
    state = init_sampler_state(state, static["sampler"], arrays["offsets"])
    client_map = maps_lib.resolve(client_map)
    placement = maps_lib.state_sharding(client_map, static["cohort_size"])
    if placement is not None:
        # Clients gather their batches inside the map: a sharded map reads the examples on
        # every device, so they go there once per call here, not inside the program.
        if data_on == "host":  # the examples stay on the host; each cohort's rows stream
            arrays = dict(jax.device_put(dict(arrays, examples={}), placement),
                          examples=arrays["examples"])
        else:
            arrays = jax.device_put(arrays, placement)
        if client_states_on == "host":  # the population's states stay where they are
            placed = _place_state(state._replace(client_states=()), placement)
            state = placed._replace(client_states=state.client_states)
        else:
            state = _place_state(state, placement)
    if donate_state:
        state = _unaliased(state)
    stream = None
    if data_on == "host":
        stream = _streaming.opener(
            arrays["examples"], np.asarray(train_data.offsets), static["max_client_size"],
            _streaming.cohort_placement(client_map, static["cohort_size"]),
        )
    if client_states_on == "host" and jax.tree.leaves(state.client_states):
        return run_rounds_host(alg, client_map, state, key, arrays, static, donate_state,
                               stream=stream)
    if data_on == "host":
        return _streaming.run_rounds_streamed(
            alg, client_map, state, key, arrays, static, donate_state, stream
        )
    run = _run_rounds_jit_donated if donate_state else _run_rounds_jit
    return run(alg, client_map, state, key=key, **arrays, **static)


def _check_data_on(data_on: Any, train_data: Any, state: ServerState, key: Any) -> None:
    """``data_on`` is ``"device"`` or ``"host"``; host streaming runs eagerly (not traced)."""
    if data_on not in ("device", "host"):
        raise ValueError(
            f"data_on: expected 'device' (examples moved to the device, one scan) or 'host' "
            f"(examples stay on the host, each cohort streamed), got {data_on!r}."
        )
    if data_on != "host":
        return
    traced = [
        x for x in jax.tree.leaves((getattr(train_data, "examples", None), state, key))
        if isinstance(x, jax.core.Tracer)
    ]
    if traced:
        raise ValueError(
            "data_on='host' runs the rounds from a Python loop (one jitted round each, the "
            "cohorts streamed by a thread), so run_rounds cannot be traced inside jax.jit, "
            "jax.vmap or another transformation; call it outside, or use data_on='device'."
        )


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
