"""The few types the whole library is built from.

Every one is a ``NamedTuple``: a pytree that ``jit``, ``vmap`` and ``lax.scan`` carry as they are,
and an interface that is a bundle of pure functions built by a factory (the optax pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
Params = PyTree
PRNGKey = jax.Array
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, PRNGKey], jax.Array]
"""``loss_fn(params, batch, key) -> scalar``: the MEAN loss over the batch's unmasked examples.

``batch`` is a dict of arrays with a leading batch axis ``[B, ...]`` and always carries
``batch["mask"]`` (``f32[B]``, 1 for a real example, 0 for padding).
"""


class Cohort(NamedTuple):
    """The data handed to one round.

    Attributes:
      batches: dict of arrays with leading axes ``[C clients, S steps, B batch]``;
        ``batches["mask"]`` (``f32[C, S, B]``) is 1 for a real example and 0 for padding.
      weights: ``f32[C]`` aggregation weight of each client (by default the number of examples
        it holds). A client of weight 0 takes no part in the aggregate.
      client_ids: ``i32[C]`` the clients' indices in the population (gathers per-client state).
    """

    batches: Batch
    weights: jax.Array
    client_ids: jax.Array


class ClientInput(NamedTuple):
    """What one client function sees of its cohort: one slice of a :class:`Cohort`.

    Attributes:
      batches: dict of arrays ``[S, B, ...]`` with ``batches["mask"]`` ``f32[S, B]``.
      weight: scalar aggregation weight from the cohort.
      client_id: scalar index of the client in the population.
      state: this client's per-client state (``()`` for algorithms without any).
      pre_pass: this round's aggregated pre-pass, the same for every client of the cohort
        (see :attr:`FederatedAlgorithm.pre_pass`; ``()`` for algorithms without one).
    """

    batches: Batch
    weight: jax.Array
    client_id: jax.Array
    state: PyTree
    pre_pass: PyTree = ()


class ClientOutput(NamedTuple):
    """What one client sends back.

    Attributes:
      update: the model delta ``server_params - client_params`` (same tree as the params).
      weight: scalar aggregation weight (0 drops the client from the aggregate).
      metrics: dict of scalar SUMS over the client's real examples (``loss_sum``,
        ``num_examples``, ...); the round adds them over the cohort.
      state: the client's new per-client state (``()`` when the algorithm keeps none).
    """

    update: PyTree
    weight: jax.Array
    metrics: dict[str, jax.Array]
    state: PyTree = ()


class ServerState(NamedTuple):
    """Everything the server carries from one round to the next; a pytree.

    Attributes:
      params: the global model parameters.
      opt_state: the server optimiser's state (an optax state).
      round: ``i32`` scalar, the number of rounds applied so far. Every random choice of round
        ``r`` comes from ``jax.random.fold_in(key, r)``, so a resumed run repeats exactly.
      aggregator_state: the aggregator's state (``()`` for stateless aggregators).
      client_states: per-client state stacked over the whole population
        (``[num_clients, ...]`` leaves), or ``()`` when the algorithm keeps none.
      extra: algorithm-specific server state (``()`` when there is none).
      sampler_state: the client sampler's state (e.g. each client's availability in a Markov
        chain), set by :func:`fedjax_lab.run_rounds`; ``()`` for stateless samplers.
    """

    params: Params
    opt_state: PyTree
    round: jax.Array
    aggregator_state: PyTree = ()
    client_states: PyTree = ()
    extra: PyTree = ()
    sampler_state: PyTree = ()


class Aggregator(NamedTuple):
    """Turns the cohort's client outputs into one update, in two halves.

    ``prepare`` runs inside the client map, once per client; what it returns is either SUMMED
    over the cohort (``reduce="sum"``: streaming, the cohort never has to be stacked, and
    across devices it is a ``psum``) or STACKED ``[C, ...]`` (``reduce="stack"``: robust rules
    that need every update at once). ``finalize`` turns that into the aggregate.

    Attributes:
      init: ``init(params) -> state``.
      prepare: ``prepare(update, weight, state) -> contribution`` for one client.
      finalize: ``finalize(contributions, state, key) -> (aggregate, total_weight, state)``;
        ``total_weight`` of 0 means no client counted and the round is skipped.
      reduce: ``"sum"`` or ``"stack"``.
      refresh: ``refresh(state, params, key) -> state`` (or ``None``, the default: nothing).
        Server-side work at the round's CURRENT server params, before the client map: the
        round calls it once and hands the state it returns to every ``prepare`` and to
        ``finalize``. FLTrust (:func:`fedjax_lab.robust.fltrust`) computes its root-data
        update here. Its keys come from their own ``fold_in`` of the round key, so the
        round's other keys are unchanged.
      cohort_aware: ``False`` (the default): ``prepare`` is called as above. ``True``: the
        round calls ``prepare(update, weight, state, cohort)`` with ``cohort = (slot,
        client_ids, key)``: this client's slot in the cohort (``i32`` scalar), every slot's
        client id (``i32[C]``) and the round's aggregator key (the very key ``finalize``
        gets). Secure aggregation (:func:`fedjax_lab.secagg.secure_aggregator`) derives its
        pairwise masks from it; the round's other keys are unchanged.
    """

    init: Callable[[Params], PyTree]
    prepare: Callable[..., PyTree]
    finalize: Callable[[PyTree, PyTree, PRNGKey], tuple[PyTree, jax.Array, PyTree]]
    reduce: str = "sum"
    refresh: Callable[[PyTree, Params, PRNGKey], PyTree] | None = None
    cohort_aware: bool = False


class FederatedAlgorithm(NamedTuple):
    """An algorithm: a bundle of pure functions, composed by :func:`fedjax_lab.run_round`.

    Attributes:
      init: ``init(params, num_clients=None) -> ServerState``. ``num_clients`` is needed only by
        algorithms with per-client state.
      client_update: ``client_update(server_state, client: ClientInput, key) -> ClientOutput``,
        written for ONE client; a client map makes the cohort.
      aggregator: how client outputs become one update (:class:`Aggregator`).
      server_update: ``server_update(server_state, aggregate, key) -> ServerState``: applies
        the aggregate (the pseudo-gradient for FedOpt) to the server state. With a
        ``pre_pass``, ``aggregate`` is the pair ``(aggregate, pre_pass_mean)``.
      name: a short human-readable name.
      update_is_delta: whether the client update is the plain model delta (a tree shaped like
        the params, aggregated as one), so that another aggregator, differential privacy or
        error-feedback compression may take over its aggregation (see
        :func:`fedjax_lab.algorithms.with_aggregator`). ``False`` for algorithms whose clients
        send more than the delta (SCAFFOLD's ``(Δx, Δc)``, FedNova's ``(d, a)``, ...).
      check_data: ``check_data(train_data)`` raises a clear error when the data does not fit
        the loss (labels out of range, wrong feature shape, a missing key);
        :func:`fedjax_lab.run_rounds` calls it on the host before compiling. ``None``: nothing
        to check (a hand-written loss).
      pre_pass: ``pre_pass(server_state, client: ClientInput, key) -> PyTree`` (or ``None``,
        the default: no pre-pass, the round is as it always was). A first pass over the SAME
        cohort, before local training and inside the same compiled round (under every client
        map): each client computes it at the server state (e.g. its full-batch gradient at the
        server params), the round takes the mean weighted by the cohort weights (a client
        whose output is not finite, or a padding slot, counts 0; no weight at all gives
        zeros), and hands that mean to every ``client_update`` as ``client.pre_pass`` and to
        ``server_update`` as the second half of its ``aggregate``. Mime's control variate
        ``c`` (:func:`fedjax_lab.algorithms.mime`) is one.
      collude: ``collude(updates, weights, client_ids, key) -> updates`` (or ``None``, the
        default). A cohort-level rewrite of the client updates between the client map and the
        aggregator, for simulated COLLUDING (omniscient) attackers that see every honest
        update of the cohort (:func:`fedjax_lab.attacks.alie`,
        :func:`fedjax_lab.attacks.ipm`): ``updates`` are stacked ``[C, ...]``, ``weights``
        ``f32[C]`` (0 for padding and dropped clients), ``client_ids`` ``i32[C]``. With it the
        round stacks the raw updates (memory ``O(C · params)`` even for a summing
        aggregator), applies ``collude``, then ``aggregator.prepare`` to each row (summed or
        stacked as ``aggregator.reduce`` says) and ``finalize``.
    """

    init: Callable[..., ServerState]
    client_update: Callable[[ServerState, ClientInput, PRNGKey], ClientOutput]
    aggregator: Aggregator
    server_update: Callable[[ServerState, PyTree, PRNGKey], ServerState]
    name: str = "federated_algorithm"
    update_is_delta: bool = True
    check_data: Callable[[Any], Any] | None = None
    pre_pass: Callable[[ServerState, ClientInput, PRNGKey], PyTree] | None = None
    collude: Callable[[PyTree, jax.Array, jax.Array, PRNGKey], PyTree] | None = None


class ClientSampler(NamedTuple):
    """Chooses each round's cohort inside the compiled round; may carry state across rounds.

    Attributes:
      init: ``init(client_sizes: i32[N]) -> state`` (``()`` for a stateless sampler).
      sample: ``sample(state, key, round, cohort_size, client_sizes) -> (client_ids,
        available, state)``: ``client_ids`` ``i32[C]`` and ``available`` ``f32[C]`` (0 marks a
        slot that found no available client: it becomes padding, weight 0 and mask 0).
        ``cohort_size`` is static; ``client_sizes`` is ``i32[N]``.
      name: what the sampler does.
    """

    init: Callable[[jax.Array], PyTree]
    sample: Callable[..., tuple[jax.Array, jax.Array, PyTree]]
    name: str


class ClientMap(NamedTuple):
    """Maps ONE client function over a cohort and reduces what it returns.

    ``apply(fn, shared, xs) -> (summed, stacked)``: ``fn(shared, x) -> (to_sum, to_stack)`` is
    called for every client slice ``x`` of ``xs`` (leading axis ``C``); ``to_sum`` is added
    over the clients, ``to_stack`` comes back stacked ``[C, ...]``. ``shared`` is the same
    for every client (the server state).

    Attributes:
      apply: the mapping function.
      name: what the map does, e.g. ``"chunked(64)"``.
    """

    apply: Callable[[Callable, PyTree, PyTree], tuple[PyTree, PyTree]]
    name: str
