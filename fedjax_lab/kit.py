"""The kit for writing federated algorithms: the parts every algorithm in ``fl.algorithms`` uses.

An algorithm is a :class:`~fedjax_lab.FederatedAlgorithm`, a bundle of four pure functions
(``init``, ``client_update``, ``aggregator``, ``server_update``), and most of each one is shared
with its neighbours. This module holds those shared parts, in the optax manner (a new method is a
composition of existing pieces, as ``optax.adam`` is a ``chain``):

=================================  ==============================================================
client side                        :func:`local_training` (the masked local loop with hooks for a
                                   regulariser and a gradient correction), :func:`local_loop`,
                                   :func:`proximal`, :func:`dynamic_regularizer`, :func:`frozen`,
                                   :func:`client_optimizer`, :func:`client_delta`,
                                   :func:`step_budget`,
                                   :func:`data_check`
server side                        :func:`server_state`, :func:`server_optimizer`,
                                   :func:`apply_server_optimizer`, :func:`server_step`
per-client state                   :func:`zeros_per_client`, :func:`copies_per_client`,
                                   :func:`population_size`, :func:`require_client_state`,
                                   :func:`gather_clients`, :func:`scatter_clients`
aggregators                        :func:`stateless_aggregator`; ready-made ones in
                                   :mod:`fedjax_lab.aggregators` (``weighted_mean``,
                                   ``mean_and_sum``, ``weighted_sum``)
per-client hyper-parameters        :class:`PerClient`, :func:`per_client`, :func:`for_client`,
                                   :func:`is_per_client`, :func:`check_per_client`,
                                   :func:`check_step_budget`,
                                   :func:`client_optimizer_or_rates`
heterogeneous compute              :class:`BudgetSampler` (a ``max_local_steps`` drawn per client
                                   per round): :func:`straggler_budget` (FedProx),
                                   :func:`uniform_budget`, :func:`speed_budget` with
                                   :func:`lognormal_speeds`; :func:`client_budget`,
                                   :func:`budget_metrics`, :data:`BUDGET_SAMPLERS`
argument checks                    :func:`check_loss_fn`, :func:`check_count`,
                                   :func:`check_positive`, :func:`check_in_range`,
                                   :func:`check_num_clients`
=================================  ==============================================================

A hyper-parameter given as :func:`per_client` (one value per client of the population, or a
function of each client's size) is gathered for the cohort by client index inside
``client_update`` (:func:`for_client` on ``client.client_id``), so the value travels with its
client through every client map (``vmap``, ``chunked``, ``sequential``, ``sharded``).

Every check raises before anything compiles, naming the argument and what it accepts; a traced
value (a swept hyper-parameter) is not checked.

Example (FedAvg from the kit; ``fl.algorithms.fed_avg`` is the same thing):

  >>> import jax, jax.numpy as jnp, optax, fedjax_lab as fl
  >>> from fedjax_lab import kit
  >>> def my_fed_avg(loss_fn, client_optimizer=None, *, server_learning_rate=1.0):
  ...     train = kit.local_training(loss_fn, kit.client_optimizer(client_optimizer))
  ...     server_opt = kit.server_optimizer(None, server_learning_rate)
  ...     aggregator = fl.aggregators.weighted_mean()
  ...     def init(params, num_clients=None):
  ...         return kit.server_state(params, server_opt, aggregator)
  ...     def client_update(state, client, key):
  ...         result = train(state.params, client.batches, key)
  ...         return fl.ClientOutput(kit.client_delta(state.params, result.params),
  ...                                client.weight, result.metrics)
  ...     return fl.FederatedAlgorithm(init, client_update, aggregator,
  ...                                  kit.server_step(server_opt), "my_fedavg")
  >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (b["x"] @ p - b["y"]) ** 2) / b["mask"].sum()
  >>> alg = my_fed_avg(loss, optax.sgd(0.1))
  >>> cohort = fl.Cohort({"x": jnp.ones((3, 1, 4, 2)), "y": jnp.ones((3, 1, 4)),
  ...                     "mask": jnp.ones((3, 1, 4))}, jnp.ones(3), jnp.arange(3))
  >>> state, _ = fl.run_round(alg, alg.init(jnp.zeros(2)), cohort, jax.random.key(0))
  >>> [round(v, 4) for v in state.params.tolist()]
  [0.2, 0.2]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import server as server_lib
from fedjax_lab._types import (
    Aggregator,
    Params,
    PRNGKey,
    PyTree,
    ServerState,
)
from fedjax_lab.client import (
    Correction,
    LocalResult,
    Regularizer,
    StepFn,
    dynamic_regularizer,
    local_loop,
    local_training,
    proximal,
    step_budget,
)
from fedjax_lab.data import _validate

__all__ = [
    "BUDGET_SALT",
    "BUDGET_SAMPLERS",
    "DEFAULT_CLIENT_LEARNING_RATE",
    "BudgetSampler",
    "Correction",
    "LocalResult",
    "PerClient",
    "Regularizer",
    "StepFn",
    "apply_server_optimizer",
    "budget_metrics",
    "check_count",
    "check_in_range",
    "check_loss_fn",
    "check_num_clients",
    "check_per_client",
    "check_positive",
    "check_step_budget",
    "client_budget",
    "client_delta",
    "data_check",
    "client_optimizer",
    "client_optimizer_or_rates",
    "copies_per_client",
    "dynamic_regularizer",
    "for_client",
    "frozen",
    "gather_clients",
    "is_per_client",
    "local_loop",
    "local_training",
    "lognormal_speeds",
    "per_client",
    "population_size",
    "proximal",
    "require_client_state",
    "scatter_clients",
    "server_optimizer",
    "server_state",
    "server_step",
    "speed_budget",
    "stateless_aggregator",
    "step_budget",
    "straggler_budget",
    "uniform_budget",
    "zeros_per_client",
]

DEFAULT_CLIENT_LEARNING_RATE = 0.1
"""The learning rate of the default client optimiser ``optax.sgd(0.1)``."""


# ------------------------------------------------------------------------------ argument checks


def _concrete(value: Any) -> float | None:
    """``value`` as a Python float when it is a concrete real number, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        try:
            return float(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return None  # a traced value (a swept hyper-parameter): not checked
    return None


def check_loss_fn(loss_fn: Any) -> None:
    """``loss_fn`` must be a callable ``loss_fn(params, batch, key) -> scalar``.

    Example:
      >>> try:
      ...     check_loss_fn(3)
      ... except TypeError as e:
      ...     print(e)
      loss_fn: expected a callable loss_fn(params, batch, key), got 3.
    """
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(params, batch, key), got {loss_fn!r}."
        )


def check_count(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as a whole number ``>= minimum``; bools are not counts. Returns it as an int.

    The library's one count check (the data loaders use it too).

    Args:
      name: the argument's name (for the message).
      value: the value given.
      minimum: the smallest allowed count.
      optional: ``None`` is allowed (and returned).

    Example:
      >>> check_count("inner_steps", 5)
      5
      >>> try:
      ...     check_count("cohort_size", True)
      ... except ValueError as e:
      ...     print(e)
      cohort_size: expected a whole number >= 1, got the bool True; pass an int.
    """
    if value is None and optional:
        return None
    return _validate.check_count(value, name, minimum=minimum)


def check_positive(name: str, value: Any, *, allow_zero: bool = False, hint: str = "") -> None:
    """A concrete ``value`` must be a finite number ``> 0`` (``>= 0`` with ``allow_zero``).

    Traced values (sweeps) and optax schedules (callables) pass unchecked.

    Example:
      >>> try:
      ...     check_positive("server_learning_rate", -1.0)
      ... except ValueError as e:
      ...     print(e)
      server_learning_rate: must be a finite number > 0, got -1.0.
    """
    if callable(value):
        return
    if isinstance(value, PerClient):
        _check_per_client_values(name, value, allow_zero=allow_zero, hint=hint)
        return
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r}.")
    v = _concrete(value)
    if v is None:
        if isinstance(value, (str, list, tuple, dict)) or value is None:
            raise ValueError(f"{name}: expected a number, got {value!r}.")
        return
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: must be a finite number {bound}, got {value!r}.{hint}")


def check_in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """A concrete ``value`` must lie in the interval from ``low`` to ``high``.

    ``low_open`` / ``high_open`` exclude the end points. Traced values pass unchecked.

    Example:
      >>> try:
      ...     check_in_range("momentum", 1.0, 0.0, 1.0, high_open=True)
      ... except ValueError as e:
      ...     print(e)
      momentum: must lie in [0.0, 1.0), got 1.0.
    """
    if isinstance(value, bool) or isinstance(value, (str, list, tuple, dict)) or value is None:
        raise ValueError(f"{name}: expected a number, got {value!r}.")
    v = _concrete(value)
    if v is None:
        return
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: must lie in {interval}, got {value!r}.{hint}")


def check_num_clients(num_clients: Any) -> int | None:
    """``num_clients`` of ``alg.init`` as an int ``>= 1``; ``None`` stays ``None``.

    ``None`` is what shape-only inits pass (``jax.eval_shape(alg.init, params)``).

    Example:
      >>> check_num_clients(100), check_num_clients(None)
      (100, None)
    """
    return check_count("num_clients", num_clients, 1, optional=True)


def _check_optimizer(name: str, opt: Any, example: str) -> None:
    if not isinstance(opt, optax.GradientTransformation):
        raise TypeError(
            f"{name}: expected an optax.GradientTransformation such as {example}, "
            f"got {type(opt).__name__}."
        )


# --------------------------------------------------------------------------------- client side


def client_optimizer(
    optimizer: optax.GradientTransformation | None,
    learning_rate: float | None = None,
) -> optax.GradientTransformation:
    """The client optimiser: ``optimizer``, or plain SGD at ``learning_rate`` (default 0.1).

    Give at most one of the two.

    Example:
      >>> import optax
      >>> isinstance(client_optimizer(None, 0.05), optax.GradientTransformation)
      True
    """
    if optimizer is not None and learning_rate is not None:
        raise ValueError(
            "client_learning_rate: give either client_optimizer or client_learning_rate "
            "(plain SGD with that rate), not both."
        )
    if learning_rate is not None:
        check_positive("client_learning_rate", learning_rate)
        return optax.sgd(learning_rate)
    if optimizer is None:
        return optax.sgd(DEFAULT_CLIENT_LEARNING_RATE)
    _check_optimizer("client_optimizer", optimizer, "optax.sgd(0.1)")
    _check_descends(optimizer)
    return optimizer


def client_optimizer_or_rates(
    optimizer: optax.GradientTransformation | None,
    learning_rate: Any = None,
) -> optax.GradientTransformation | None:
    """:func:`client_optimizer`, or ``None`` when ``learning_rate`` is a :class:`PerClient`.

    A per-client rate means plain SGD at each client's own rate (the builder makes it inside
    ``client_update``), so an ``optimizer`` beside it is refused, and the rates are checked.

    Example:
      >>> client_optimizer_or_rates(None, per_client([0.1, 0.2])) is None
      True
    """
    if not isinstance(learning_rate, PerClient):
        return client_optimizer(optimizer, learning_rate)
    if optimizer is not None:
        raise ValueError(
            "client_learning_rate: give either client_optimizer or a per-client "
            "client_learning_rate (plain SGD at each client's rate), not both."
        )
    check_positive("client_learning_rate", learning_rate, allow_zero=True)
    return None


def _check_descends(optimizer: optax.GradientTransformation) -> None:
    """Its first step on a scalar parameter with gradient 1 must be finite and not uphill.

    That reads the sign and finiteness of the learning rate inside any optax chain (a negative
    rate ascends, a NaN one drops every client every round). Optimisers that cannot take a
    scalar, and traced hyper-parameters (sweeps), are not checked.
    """
    try:
        with jax.ensure_compile_time_eval():
            zero = jnp.zeros((), jnp.float32)
            step, _ = optimizer.update(jnp.ones((), jnp.float32), optimizer.init(zero), zero)
            step = float(step)
    except Exception:  # noqa: BLE001 - a probe only: anything it cannot run is not checked
        return
    if not math.isfinite(step):
        raise ValueError(
            f"client_optimizer: its first step on a unit gradient is {step} (not finite): is "
            "its learning rate NaN or inf? Every client would be dropped every round; use a "
            "finite rate such as optax.sgd(0.1)."
        )
    if step > 0:
        raise ValueError(
            f"client_optimizer: its first step on a unit gradient is +{step:g}: it ascends "
            "the loss (a negative learning rate?). Use a positive rate such as optax.sgd(0.1)."
        )


def data_check(loss_fn: Any, **hyper_parameters: Any) -> Callable[[Any], Any] | None:
    """The data check a loss function carries (``loss_fn.check_data``), or ``None``.

    The model zoo's losses (``fl.models.classification_loss(model)``) know their model and check
    a :class:`~fedjax_lab.data.FederatedData` against it; pass this to
    ``FederatedAlgorithm(..., check_data=kit.data_check(loss_fn))`` so that
    :func:`fedjax_lab.run_rounds` refuses unfit data before compiling. Hyper-parameters given
    by keyword that are :class:`PerClient` (or a :class:`BudgetSampler` reading per-client
    speeds) are checked too: one value per client of the data (:func:`check_per_client`);
    scalars are ignored.

    Example:
      >>> data_check(lambda p, b, k: 0.0) is None
      True
      >>> data_check(lambda p, b, k: 0.0, mu=per_client([0.1, 0.2])) is None
      False
    """
    check = getattr(loss_fn, "check_data", None)
    per = {k: v for k, v in hyper_parameters.items()
           if isinstance(v, PerClient)
           or (isinstance(v, BudgetSampler) and isinstance(v.speeds, PerClient))}
    if not per:
        return check

    def check_data(train_data: Any) -> None:
        check_per_client(train_data.num_clients, **per)
        if check is not None:
            check(train_data)

    return check_data


def frozen(
    optimizer: optax.GradientTransformation, state: PyTree
) -> optax.GradientTransformation:
    """``optimizer`` applied with its state FROZEN at ``state`` (the new state is dropped).

    Local steps that mimic a server optimiser (Mime) use the server's momentum or moments
    without updating them; the frozen transformation itself keeps no state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> base = optax.chain(optax.ema(0.5, debias=False), optax.sgd(1.0))
      >>> opt = frozen(base, base.init(jnp.zeros(1)))
      >>> [float(opt.update(jnp.ones(1), opt.init(jnp.zeros(1)))[0][0]) for _ in range(2)]
      [-0.5, -0.5]
    """

    def init(params: Params) -> tuple:
        del params
        return ()

    def update(updates, opt_state, params=None):
        return optimizer.update(updates, state, params)[0], opt_state

    return optax.GradientTransformation(init, update)


def client_delta(server_params: Params, client_params: Params) -> Params:
    """The model delta a client sends: ``server_params - client_params`` (a pseudo-gradient).

    Example:
      >>> import jax.numpy as jnp
      >>> client_delta(jnp.array([1.0, 1.0]), jnp.array([0.5, 2.0])).tolist()
      [0.5, -1.0]
    """
    return optax.tree.sub(server_params, client_params)


# ---------------------------------------------------------------- per-client hyper-parameters


class PerClient(NamedTuple):
    """A hyper-parameter with one value per client of the population (build it with
    :func:`per_client`); a pytree, so a swept (traced) vector works too.

    Attributes:
      values: ``float[N]``, client ``i``'s value at index ``i`` (the population's order, as in
        :class:`~fedjax_lab.data.FederatedData`).
    """

    values: jax.Array


def per_client(values: Any, client_sizes: Any = None) -> PerClient:
    """A per-client hyper-parameter: an array over the population or a function of client size.

    Algorithm builders that take it (``fed_avg``/``fed_opt``'s ``client_learning_rate`` and
    ``max_local_steps``, ``fed_prox``'s ``mu``, ``ditto``'s ``lam``) gather client ``i``'s value
    inside ``client_update`` from the cohort's client ids (:func:`for_client`).

    Args:
      values: ``N`` numbers, one per client; or a function ``f(sizes) -> N numbers`` evaluated
        here, once, on the population's example counts (a float64 NumPy array), e.g.
        ``lambda n: 0.1 * n / n.mean()``.
      client_sizes: with a function only: the population's example counts
        (``train_data.client_sizes``) or the :class:`~fedjax_lab.data.FederatedData` itself.

    Returns:
      A :class:`PerClient` (values in the default float dtype).

    Example:
      >>> import numpy as np
      >>> per_client([0.1, 0.0, 0.2]).values.tolist() == [np.float32(v) for v in (0.1, 0, 0.2)]
      True
      >>> per_client(lambda n: n / n.max(), client_sizes=[2, 4, 8]).values.tolist()
      [0.25, 0.5, 1.0]
    """
    if isinstance(values, PerClient):
        values = values.values
    if callable(values):
        if client_sizes is None:
            raise ValueError(
                "client_sizes: a per-client hyper-parameter given as a function of client size "
                "needs the population's sizes: "
                "per_client(fn, client_sizes=train_data.client_sizes)."
            )
        sizes = np.asarray(getattr(client_sizes, "client_sizes", client_sizes), np.float64)
        if sizes.ndim != 1 or sizes.size == 0:
            raise ValueError(
                f"client_sizes: expected one example count per client (1-D), got shape "
                f"{sizes.shape}."
            )
        values = values(sizes)
    elif client_sizes is not None:
        raise ValueError(
            "client_sizes: only for values given as a function of client size; an array "
            "already has one value per client."
        )
    dtype = jnp.result_type(float)
    if isinstance(values, jax.core.Tracer):  # a swept vector: only its shape is checked
        arr = jnp.asarray(values, dtype)
    else:
        try:
            host = np.asarray(values, np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"per_client: expected numbers, one per client, got {values!r}.") from e
        if host.ndim != 1 or host.size == 0:
            raise ValueError(
                f"per_client: expected one value per client (a non-empty 1-D array), got shape "
                f"{host.shape}."
            )
        if not np.all(np.isfinite(host)):
            bad = int(np.flatnonzero(~np.isfinite(host))[0])
            raise ValueError(
                f"per_client: every value must be finite; client {bad} has {host[bad]}."
            )
        arr = jnp.asarray(host, dtype)
    if arr.ndim != 1:
        raise ValueError(
            f"per_client: expected a 1-D array (one value per client), got {arr.shape}."
        )
    return PerClient(arr)


def is_per_client(*values: Any) -> bool:
    """Whether any of ``values`` is a :class:`PerClient`.

    Example:
      >>> is_per_client(0.1, per_client([1.0, 2.0])), is_per_client(0.1, None)
      (True, False)
    """
    return any(isinstance(v, PerClient) for v in values)


def for_client(value: Any, client_id: jax.Array) -> Any:
    """Client ``client_id``'s value of ``value``: every :class:`PerClient` in the pytree ``value``
    becomes its entry ``values[client_id]``; anything else is returned unchanged.

    Called inside ``client_update`` with ``client.client_id``, so it runs under every client
    map. An id outside the population reads NaN (the client's update is then not finite and
    the round drops it); :func:`check_per_client` refuses a wrong length before compiling.

    Example:
      >>> import jax.numpy as jnp
      >>> lr, mu = for_client((per_client([0.5, 0.25]), 0.1), jnp.int32(1))
      >>> float(lr), mu
      (0.25, 0.1)
    """

    def pick(v):
        if isinstance(v, PerClient):
            return jnp.take(v.values, client_id, mode="fill", fill_value=jnp.nan)
        return v

    return jax.tree.map(pick, value, is_leaf=lambda x: isinstance(x, PerClient))


def check_per_client(num_clients: int | None, **hyper_parameters: Any) -> None:
    """Every :class:`PerClient` among ``hyper_parameters`` must have ``num_clients`` values.

    ``num_clients=None`` (a shape-only init) checks nothing; scalars pass.

    Example:
      >>> try:
      ...     check_per_client(3, mu=per_client([0.1, 0.2]))
      ... except ValueError as e:
      ...     print(e)  # doctest: +ELLIPSIS
      mu: per_client gives 2 values, but the population has 3 clients; ...
    """
    if num_clients is None:
        return
    for name, value in hyper_parameters.items():
        if isinstance(value, BudgetSampler) and isinstance(value.speeds, PerClient):
            name, value = f"{name} (its speeds)", value.speeds
        if isinstance(value, PerClient) and value.values.shape[0] != num_clients:
            raise ValueError(
                f"{name}: per_client gives {value.values.shape[0]} values, but the population "
                f"has {num_clients} clients; give one value per client "
                "(len(values) == train_data.num_clients)."
            )


def _check_per_client_values(name: str, value: PerClient, *, allow_zero: bool, hint: str) -> None:
    if isinstance(value.values, jax.core.Tracer):
        return  # swept: not checked
    host = np.asarray(value.values, np.float64)
    bad = ~np.isfinite(host) | (host < 0) | ((host == 0) & (not allow_zero))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name}: every per-client value must be a finite number {bound}; client {i} has "
            f"{host[i]:g}.{hint}"
        )


def check_step_budget(name: str, value: Any) -> None:
    """A local-step budget: ``None`` (no cap), a whole number ``>= 0``, a :class:`PerClient`
    of whole numbers ``>= 0`` (a client of budget 0 does no local step) or a
    :class:`BudgetSampler` (a budget drawn each round, see :func:`straggler_budget`).

    Example:
      >>> check_step_budget("max_local_steps", per_client([2, 0, 5]))
      >>> try:
      ...     check_step_budget("max_local_steps", per_client([2, 1.5]))
      ... except ValueError as e:
      ...     print(e)
      max_local_steps: every per-client budget must be a whole number >= 0; client 1 has 1.5.
    """
    if value is None or isinstance(value, BudgetSampler):
        return  # a sampler's factory checked its own arguments
    if isinstance(value, PerClient):
        if isinstance(value.values, jax.core.Tracer):
            return
        host = np.asarray(value.values, np.float64)
        bad = (host < 0) | (host != np.round(host))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name}: every per-client budget must be a whole number >= 0; client {i} has "
                f"{host[i]:g}."
            )
        return
    if isinstance(value, float):
        raise ValueError(f"{name}: expected a whole number >= 0 or None, got {value!r}.")
    check_count(name, value, 0)


# ------------------------------------------------------------------ sampled local-step budgets


BUDGET_SALT = 0x42554447  # "BUDG"
"""A sampled budget is drawn from ``fold_in(client_key, BUDGET_SALT)``: a key of its own, so the
client's training keys (``split(client_key, S)`` in :func:`local_loop`) are unchanged."""


class BudgetSampler(NamedTuple):
    """A local-step budget drawn for each cohort client, each round, inside the compiled round.

    Give it wherever a builder takes ``max_local_steps`` (``fed_avg``, ``fed_opt``,
    ``fed_prox``, ``ditto``): heterogeneous compute (stragglers, slow devices, FedProx's
    variable local work) as a budget that masks the steps beyond it exactly as padding is
    masked (:func:`step_budget`). The draw is a pure function of the client's key of the round
    (see :func:`client_budget`), so a run is reproducible, resumes bit for bit, and every client
    of a vmapped cohort runs the same program (only the mask differs).

    Attributes:
      draw: ``draw(key, client_id) -> int32 budget >= 0`` for one client; ``key`` is
        ``fold_in(client_key, BUDGET_SALT)``.
      name: the budget model (``"straggler"``, ``"uniform"``, ``"speed"``, or your own).
      speeds: the :class:`PerClient` speeds a ``"speed"`` sampler reads (their length is
        checked against the population), else ``None``.

    Example (a budget model of your own: 1 or 3 steps, at random):
      >>> import jax, jax.numpy as jnp
      >>> odd = BudgetSampler(lambda k, i: 1 + 2 * jax.random.bernoulli(k).astype(jnp.int32),
      ...                     "one_or_three")
      >>> int(client_budget(odd, jnp.int32(0), jax.random.key(0))) in (1, 3)
      True
    """

    draw: Callable[[PRNGKey, jax.Array], jax.Array]
    name: str = "custom"
    speeds: PerClient | None = None


def client_budget(max_local_steps: Any, client_id: jax.Array, key: PRNGKey) -> Any:
    """One client's local-step budget this round: what ``local_training``'s ``max_steps`` takes.

    * ``None`` or a whole number: returned unchanged (no cap, or the same cap for every client);
    * a :class:`PerClient`: the client's entry (:func:`for_client`);
    * a :class:`BudgetSampler`: ``sampler.draw(fold_in(key, BUDGET_SALT), client_id)``, where
      ``key`` is the key the round hands the client (``client_update``'s ``key``).

    Args:
      max_local_steps: the builder's ``max_local_steps``.
      client_id: ``client.client_id``.
      key: the client's key of the round.

    Returns:
      The budget (``None``, an int or an int32 scalar).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> client_budget(per_client([4, 2]), jnp.int32(1), jax.random.key(0)).tolist()
      2.0
      >>> b = client_budget(uniform_budget(2, 5), jnp.int32(0), jax.random.key(0))
      >>> 2 <= int(b) <= 5
      True
    """
    if isinstance(max_local_steps, BudgetSampler):
        return max_local_steps.draw(jax.random.fold_in(key, BUDGET_SALT), client_id)
    return for_client(max_local_steps, client_id)


def budget_metrics(max_local_steps: Any, budget: Any, weight: jax.Array) -> dict[str, jax.Array]:
    """The round metrics of a sampled budget: ``{}`` unless ``max_local_steps`` is a sampler.

    With a :class:`BudgetSampler` a counted client (``weight > 0``; padding slots add 0)
    reports ``local_step_budget`` (its budget) and ``budget_clients`` (1); summed over the
    cohort, ``local_step_budget / budget_clients`` is the cohort's mean budget and
    ``num_steps / budget_clients`` the mean of the steps actually taken (fewer where a client's
    data or the round's ``local_steps`` ran out first). ``fedjax-lab run`` writes both
    (``mean_local_step_budget``, ``mean_local_steps``) to ``metrics.jsonl``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = budget_metrics(uniform_budget(1, 3), jnp.int32(2), jnp.float32(5.0))
      >>> {k: float(v) for k, v in m.items()}
      {'local_step_budget': 2.0, 'budget_clients': 1.0}
      >>> budget_metrics(4, 4, jnp.float32(5.0))
      {}
    """
    if not isinstance(max_local_steps, BudgetSampler):
        return {}
    counted = jnp.asarray(weight) > 0
    return {
        "local_step_budget": jnp.where(counted, jnp.asarray(budget, jnp.float32), 0.0),
        "budget_clients": counted.astype(jnp.float32),
    }


def straggler_budget(fraction: float, max_steps: int) -> BudgetSampler:
    """FedProx's stragglers: a fraction of the cohort does less local work, drawn each round.

    Each cohort client, each round, independently: with probability ``fraction`` (``p``) it is
    a straggler and its budget is drawn uniformly from ``{1, ..., max_steps}``; otherwise it
    does the full ``max_steps`` (``E``). So a cohort of ``C`` holds ``Binomial(C, p)``
    stragglers (``p C`` on average) and the mean budget is ``E - p (E - 1) / 2``. The draw, with
    ``k = fold_in(client_key, BUDGET_SALT)`` and ``k_s, k_b = split(k)``:
    ``straggler = uniform(k_s) < p``, ``budget = randint(k_b, 1, E + 1) if straggler else E``.

    The budget counts local steps (mini-batches). The paper counts ``E`` in local epochs; with
    a fixed ``local_steps = E`` per round (``run_rounds(..., local_steps=E)``) a step is the
    unit of work, and ``E`` epochs of a client with ``n`` examples are ``E ceil(n / B)`` steps.
    A budget above the round's steps (or the client's real steps) simply does not bind.

    Args:
      fraction: ``p`` in ``[0, 1]`` (the paper uses 0, 0.5 and 0.9).
      max_steps: ``E >= 1``, the full local work.

    Returns:
      A :class:`BudgetSampler` for ``max_local_steps``.

    References:
      Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous
      Networks", MLSys 2020, Section 5.2 (systems heterogeneity).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = straggler_budget(0.5, 10)
      >>> keys = jax.random.split(jax.random.key(0), 8)  # 8 rounds' keys of client 0
      >>> b = [int(client_budget(s, jnp.int32(0), k)) for k in keys]
      >>> all(1 <= x <= 10 for x in b), s.name
      (True, 'straggler')
    """
    check_in_range("fraction", fraction, 0.0, 1.0, hint=" (the share of stragglers)")
    e = check_count("max_steps", max_steps, 1)

    def draw(key: PRNGKey, client_id: jax.Array) -> jax.Array:
        del client_id
        k_straggler, k_steps = jax.random.split(key)
        straggler = jax.random.uniform(k_straggler) < fraction
        partial = jax.random.randint(k_steps, (), 1, e + 1, dtype=jnp.int32)
        return jnp.where(straggler, partial, jnp.int32(e))

    return BudgetSampler(draw, "straggler")


def uniform_budget(low: int, high: int) -> BudgetSampler:
    """Each cohort client's budget drawn uniformly from ``{low, ..., high}`` each round.

    ``budget = randint(fold_in(client_key, BUDGET_SALT), low, high + 1)``: e.g. FedNova's
    experiments draw each client's local work per round uniformly from a range. ``low = 0``
    lets a client do nothing (its delta is zero but it keeps its weight).

    Args:
      low: the smallest budget, ``>= 0``.
      high: the largest budget, ``>= low``.

    Returns:
      A :class:`BudgetSampler` for ``max_local_steps``.

    References:
      Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in
      Heterogeneous Federated Optimization", NeurIPS 2020 (FedNova).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> int(client_budget(uniform_budget(3, 3), jnp.int32(0), jax.random.key(1)))
      3
    """
    lo = check_count("low", low, 0)
    hi = check_count("high", high, 0)
    if hi < lo:
        raise ValueError(f"high: must be >= low = {lo}, got {hi}.")

    def draw(key: PRNGKey, client_id: jax.Array) -> jax.Array:
        del client_id
        return jax.random.randint(key, (), lo, hi + 1, dtype=jnp.int32)

    return BudgetSampler(draw, "uniform")


def speed_budget(speeds: Any, max_steps: int, *, jitter: float = 0.0) -> BudgetSampler:
    """Fixed per-client compute speeds: a client does what its speed allows before a deadline.

    Client ``i`` has a fixed relative speed ``s_i`` (``1``: the reference device, which does
    ``max_steps`` in the round's time). Each round its budget is

    ``budget_i = clip(floor(max_steps * s_i * exp(jitter * z - jitter² / 2)), 0, max_steps)``,

    ``z ~ N(0, 1)`` drawn from ``fold_in(client_key, BUDGET_SALT)`` (a lognormal slow-down or
    speed-up of mean 1 for that round; ``jitter = 0``: the same budget every round), computed
    in float32. A client whose speed gives less than one step does none that round (its delta
    is zero but it keeps its weight). :func:`lognormal_speeds` draws a population's speeds.

    Args:
      speeds: one speed ``>= 0`` per client of the population (a :class:`PerClient`, or numbers
        turned into one).
      max_steps: the steps of a speed-1 client, ``>= 1``.
      jitter: the lognormal round-to-round variation ``>= 0`` (the standard deviation of
        ``log``-speed).

    Returns:
      A :class:`BudgetSampler` for ``max_local_steps`` (its ``speeds`` are checked against the
      population at ``alg.init(params, num_clients)`` and before ``run_rounds`` compiles).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = speed_budget([1.0, 0.5, 0.05], 10)
      >>> [int(client_budget(s, jnp.int32(i), jax.random.key(0))) for i in range(3)]
      [10, 5, 0]
    """
    speeds = per_client(speeds)
    check_positive("speeds", speeds, allow_zero=True, hint=" (a relative compute speed)")
    e = check_count("max_steps", max_steps, 1)
    check_positive("jitter", jitter, allow_zero=True)

    def draw(key: PRNGKey, client_id: jax.Array) -> jax.Array:
        s = for_client(speeds, client_id).astype(jnp.float32)
        z = jax.random.normal(key, (), jnp.float32)
        factor = jnp.exp(jitter * z - 0.5 * jitter * jitter).astype(jnp.float32)
        steps = jnp.floor(jnp.float32(e) * s * factor)
        return jnp.clip(steps, 0, e).astype(jnp.int32)

    return BudgetSampler(draw, "speed", speeds)


def lognormal_speeds(num_clients: int, sigma: float, *, seed: int = 0) -> PerClient:
    """Fixed lognormal compute speeds for a population, relative to its fastest client.

    ``z_i ~ N(0, 1)`` from ``numpy.random.default_rng(seed)``; ``s_i = exp(sigma (z_i - max_j
    z_j))``, so the fastest client has speed 1 and the others ``exp(-sigma Δz)`` of it
    (``sigma = 0``: all 1). For :func:`speed_budget`.

    Args:
      num_clients: ``N >= 1``.
      sigma: the standard deviation of log-speed, ``>= 0``.
      seed: the NumPy seed (the speeds are fixed for the run).

    Returns:
      A :class:`PerClient` of ``N`` speeds in ``(0, 1]``.

    Example:
      >>> s = lognormal_speeds(5, 1.0, seed=0).values
      >>> float(s.max()), bool((s > 0).all())
      (1.0, True)
    """
    n = check_count("num_clients", num_clients, 1)
    check_positive("sigma", sigma, allow_zero=True)
    seed = check_count("seed", seed, 0)
    z = np.random.default_rng(seed).standard_normal(n)
    return per_client(np.exp(sigma * (z - z.max())))


BUDGET_SAMPLERS: dict[str, Callable[..., BudgetSampler]] = {
    "straggler": straggler_budget,
    "uniform": uniform_budget,
    "speed": speed_budget,
}
"""The budget models by name (``max_local_steps = {sample = NAME, ...}`` in a config)."""


# --------------------------------------------------------------------------------- server side


def server_optimizer(
    optimizer: optax.GradientTransformation | None,
    learning_rate: optax.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformation:
    """The server optimiser: ``optimizer``, or FedSGD ``x <- x - learning_rate * g`` by default.

    ``fl.server.fed_sgd(1.0)`` is plain averaging: ``x <- x - Σ p_i (x - x_i) = Σ p_i x_i``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = server_optimizer(None, 0.5)
      >>> u, _ = opt.update(jnp.array([2.0]), opt.init(jnp.zeros(1)))
      >>> u.tolist()
      [-1.0]
    """
    if optimizer is None:
        return server_lib.fed_sgd(learning_rate)
    _check_optimizer("server_optimizer", optimizer, "fl.server.fed_adam(1e-2)")
    return optimizer


def server_state(
    params: Params,
    server_optimizer: optax.GradientTransformation | None,
    aggregator: Aggregator,
    *,
    client_states: PyTree = (),
    extra: PyTree = (),
) -> ServerState:
    """The state of round 0: ``params``, the optimiser's and aggregator's initial states.

    Args:
      params: the initial global model.
      server_optimizer: the server optimiser (``None``: no optimiser state, ``opt_state=()``).
      aggregator: the algorithm's aggregator (its ``init(params)`` is the aggregator state).
      client_states: per-client state ``[num_clients, ...]`` (see :func:`zeros_per_client`).
      extra: algorithm-specific server state.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> s = server_state(jnp.zeros(2), fl.server.fed_sgd(1.0), fl.aggregators.weighted_mean())
      >>> int(s.round), s.client_states
      (0, ())
    """
    return ServerState(
        params=params,
        opt_state=() if server_optimizer is None else server_optimizer.init(params),
        round=jnp.zeros((), jnp.int32),
        aggregator_state=aggregator.init(params),
        client_states=client_states,
        extra=extra,
    )


def apply_server_optimizer(
    state: ServerState, server_optimizer: optax.GradientTransformation, pseudo_gradient: PyTree
) -> ServerState:
    """``state`` with ``params`` and ``opt_state`` moved by one server-optimiser step.

    ``updates, opt_state = server_optimizer.update(g, state.opt_state, state.params)``;
    ``params <- optax.apply_updates(params, updates)``.

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> opt = fl.server.fed_sgd(1.0)
      >>> s = server_state(jnp.ones(2), opt, fl.aggregators.weighted_mean())
      >>> apply_server_optimizer(s, opt, jnp.array([0.5, -1.0])).params.tolist()
      [0.5, 2.0]
    """
    updates, opt_state = server_optimizer.update(pseudo_gradient, state.opt_state, state.params)
    return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def server_step(
    server_optimizer: optax.GradientTransformation,
) -> Callable[[ServerState, PyTree, PRNGKey], ServerState]:
    """The FedOpt ``server_update``: the aggregate is the pseudo-gradient of ``server_optimizer``.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> opt = fl.server.fed_sgd(1.0)
      >>> s = server_state(jnp.ones(1), opt, fl.aggregators.weighted_mean())
      >>> server_step(opt)(s, jnp.array([0.25]), jax.random.key(0)).params.tolist()
      [0.75]
    """

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        return apply_server_optimizer(state, server_optimizer, aggregate)

    return server_update


# ---------------------------------------------------------------------------- per-client state


def zeros_per_client(template: PyTree, num_clients: int) -> PyTree:
    """Zeros shaped like ``template`` for every client: leaves ``[num_clients, ...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> zeros_per_client({"w": jnp.ones(3)}, 4)["w"].shape
      (4, 3)
    """
    return jax.tree.map(
        lambda a: jnp.zeros((num_clients,) + jnp.shape(a), jnp.result_type(a)), template
    )


def copies_per_client(template: PyTree, num_clients: int) -> PyTree:
    """``template`` repeated for every client: leaves ``[num_clients, ...]`` (personal models).

    Example:
      >>> import jax.numpy as jnp
      >>> copies_per_client({"w": jnp.ones(2)}, 3)["w"].shape
      (3, 2)
    """
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + jnp.shape(a)), template)


def population_size(client_states: PyTree) -> int:
    """``N``: the leading axis of the stacked per-client state (static at trace time).

    Example:
      >>> import jax.numpy as jnp
      >>> population_size({"c": jnp.zeros((7, 2))})
      7
    """
    leaves = jax.tree.leaves(client_states)
    if not leaves:
        raise ValueError(
            "client_states: this state holds no per-client state; build it with "
            "alg.init(params, num_clients=train_data.num_clients)."
        )
    return int(leaves[0].shape[0])


def require_client_state(client_state: PyTree, name: str) -> None:
    """Trace-time check that the server state was built with ``num_clients``.

    Example:
      >>> try:
      ...     require_client_state((), "scaffold")
      ... except ValueError as e:
      ...     print(e)  # doctest: +ELLIPSIS
      num_clients: scaffold keeps per-client state; build the state with alg.init(...
    """
    if not jax.tree.leaves(client_state):
        raise ValueError(
            f"num_clients: {name} keeps per-client state; build the state with "
            "alg.init(params, num_clients=train_data.num_clients)."
        )


def gather_clients(client_states: PyTree, client_ids: jax.Array) -> PyTree:
    """The rows of ``client_ids`` from a stacked per-client state: leaves ``[C, ...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> gather_clients({"c": jnp.arange(5.0)}, jnp.array([3, 1]))["c"].tolist()
      [3.0, 1.0]
    """
    return jax.tree.map(lambda a: a[client_ids], client_states)


def scatter_clients(client_states: PyTree, client_ids: jax.Array, rows: PyTree) -> PyTree:
    """``client_states`` with the rows of ``client_ids`` replaced by ``rows`` (``[C, ...]``).

    Example:
      >>> import jax.numpy as jnp
      >>> s = scatter_clients({"c": jnp.zeros(4)}, jnp.array([2]), {"c": jnp.array([9.0])})
      >>> s["c"].tolist()
      [0.0, 0.0, 9.0, 0.0]
    """
    return jax.tree.map(lambda a, r: a.at[client_ids].set(r), client_states, rows)


# -------------------------------------------------------------------------------- aggregators


def stateless_aggregator(
    prepare: Callable[[PyTree, jax.Array], PyTree],
    finalize: Callable[[PyTree], tuple[PyTree, jax.Array]],
    *,
    reduce: str = "sum",
) -> Aggregator:
    """An :class:`~fedjax_lab.Aggregator` that keeps no state and needs no key.

    Args:
      prepare: ``prepare(update, weight) -> contribution`` for one client (inside the map).
      finalize: ``finalize(contributions) -> (aggregate, total_weight)``; the contributions
        are summed over the cohort (``reduce="sum"``) or stacked ``[C, ...]``
        (``reduce="stack"``). A ``total_weight`` of 0 skips the round.
      reduce: ``"sum"`` or ``"stack"``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> plain_sum = stateless_aggregator(lambda u, w: (u, w), lambda c: c)
      >>> parts = [plain_sum.prepare(jnp.array(v), jnp.float32(1), ()) for v in (1.0, 2.0)]
      >>> summed = jax.tree.map(jnp.add, *parts)
      >>> [float(x) for x in plain_sum.finalize(summed, (), jax.random.key(0))[:2]]
      [3.0, 2.0]
    """
    if reduce not in ("sum", "stack"):
        raise ValueError(f"reduce: expected 'sum' or 'stack', got {reduce!r}.")

    def init(params: PyTree) -> tuple:
        del params
        return ()

    def prepare_fn(update: PyTree, weight: jax.Array, state: PyTree) -> PyTree:
        del state
        return prepare(update, weight)

    def finalize_fn(contributions: PyTree, state: PyTree, key: PRNGKey):
        del key
        aggregate, total_weight = finalize(contributions)
        return aggregate, total_weight, state

    return Aggregator(init, prepare_fn, finalize_fn, reduce=reduce)
