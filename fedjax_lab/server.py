"""Server optimisers: optax transformations fed the pseudo-gradient.

Every factory here returns an :class:`optax.GradientTransformation` that is fed the
pseudo-gradient ``g = x - mean_i(x_i)`` (server params minus the mean client params, the same sign
as a gradient) and returns updates applied with ``optax.apply_updates(x, updates)``. The mean client
delta of Reddi et al. is ``Δ = -g`` (it points downhill).

Two forms of the adaptive optimisers:

* **Reddi form** (default, ``bias_correction=False``): Algorithm 2 of Reddi et al. (2021), the
  momentum folded into ``Δ_t`` and the second moment taken of that momentum, ``v_{-1} = tau²``,
  no bias correction.
* **optax/Keras form** (``bias_correction=True``, Adam and Yogi only): moments of the raw
  pseudo-gradient, bias-corrected, as in :func:`optax.adam` (Kingma & Ba, 2015) and Yogi (Zaheer
  et al., 2018).

``fed_sgd`` and ``fed_avgm`` are :func:`optax.sgd` with the paper's arguments.

All hyper-parameters may be traced arrays (``optax.inject_hyperparams`` and sweeps that ``vmap``
over them work); learning rates may also be optax schedules (callables of the step count, the
count starting at 0). States are NamedTuples (pytrees) whose leaves keep the params' dtypes.

References:
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295.
  Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019, https://arxiv.org/abs/1909.06335.
  Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab._registry import Registry

__all__ = [
    "REGISTRY",
    "FedAdagradState",
    "FedAdamState",
    "FedYogiState",
    "YOGI_INITIAL_V",
    "fed_adagrad",
    "fed_adam",
    "fed_avgm",
    "fed_sgd",
    "fed_yogi",
    "per_layer",
]

YOGI_INITIAL_V = 1e-6
"""Initial second moment ``v_0`` of :func:`fed_yogi` with ``bias_correction=True``.

The small positive constant of Zaheer et al. (2018) and of :func:`optax.scale_by_yogi`'s
``initial_accumulator_value``. (The Reddi form starts from ``v_{-1} = tau²`` instead.)
"""

Hyper = float | jax.Array
"""A hyper-parameter: a Python number or a (possibly traced) scalar array."""


class FedAdamState(NamedTuple):
    """State of :func:`fed_adam`.

    Attributes:
      count: ``i32`` scalar, number of updates applied so far.
      delta: first moment, in the mean-client-delta sign (``Δ = -g``, points downhill). In the
        bias-corrected form it is ``-m`` with ``m`` the (uncorrected) Adam moment of ``g``.
      v: second moment (uncorrected).
    """

    count: jax.Array
    delta: optax.Updates
    v: optax.Updates


class FedYogiState(NamedTuple):
    """State of :func:`fed_yogi` (fields as :class:`FedAdamState`)."""

    count: jax.Array
    delta: optax.Updates
    v: optax.Updates


class FedAdagradState(NamedTuple):
    """State of :func:`fed_adagrad` (fields as :class:`FedAdamState`; ``v`` is the running sum)."""

    count: jax.Array
    delta: optax.Updates
    v: optax.Updates


# --------------------------------------------------------------------------------- validation
def _concrete(name: str, value: object) -> np.ndarray | None:
    """``value`` as a float64 array, or ``None`` when it cannot be checked (a jax tracer)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}.") from err
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{name}: expected a real number or a real scalar array, got "
            f"{type(value).__name__} {value!r}."
        )
    return arr.astype(np.float64)


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
    if callable(learning_rate):  # an optax schedule, evaluated inside the update
        return
    arr = _concrete("learning_rate", learning_rate)
    if arr is not None and not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(
            f"learning_rate: must be a positive finite number (or an optax schedule), got "
            f"{learning_rate!r}."
        )


def _check_unit_interval(name: str, value: Hyper) -> None:
    arr = _concrete(name, value)
    if arr is not None and not np.all((arr >= 0) & (arr < 1)):
        raise ValueError(f"{name}: must lie in [0, 1), got {value!r}.")


def _check_tau(tau: Hyper) -> None:
    arr = _concrete("tau", tau)
    if arr is not None and not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(
            f"tau: must be a positive finite number (the adaptivity/stability constant, e.g. "
            f"1e-3), got {tau!r}."
        )


# ---------------------------------------------------------------------------- second moments
def _adam_v(v: jax.Array, d2: jax.Array, b2: Hyper) -> jax.Array:
    return b2 * v + (1 - b2) * d2


def _yogi_v(v: jax.Array, d2: jax.Array, b2: Hyper) -> jax.Array:
    return v - (1 - b2) * d2 * jnp.sign(v - d2)


def _adagrad_v(v: jax.Array, d2: jax.Array, b2: Hyper) -> jax.Array:
    del b2
    return v + d2


_SecondMoment = Callable[[jax.Array, jax.Array, Hyper], jax.Array]


def _lr_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> Hyper:
    return learning_rate(count) if callable(learning_rate) else learning_rate


# ------------------------------------------------------------------------------- the two forms
def _reddi(
    state_cls: type,
    second_moment: _SecondMoment,
    learning_rate: optax.ScalarOrSchedule,
    b1: Hyper,
    b2: Hyper,
    tau: Hyper,
) -> optax.GradientTransformation:
    """Reddi et al. (2021), Algorithm 2, for the given second-moment rule."""

    def init_fn(params: optax.Params) -> NamedTuple:
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            delta=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.zeros_like(p) + jnp.asarray(tau**2, p.dtype), params),
        )

    def update_fn(updates, state, params=None):
        del params
        lr = _lr_at(learning_rate, state.count)
        delta = jax.tree.map(
            lambda g, d: (b1 * d - (1 - b1) * g).astype(d.dtype), updates, state.delta
        )
        v = jax.tree.map(
            lambda d, v: second_moment(v, jnp.square(d), b2).astype(v.dtype), delta, state.v
        )
        new_updates = jax.tree.map(
            lambda g, d, v: (lr * d / (jnp.sqrt(v) + tau)).astype(g.dtype), updates, delta, v
        )
        return new_updates, state_cls(count=optax.safe_increment(state.count), delta=delta, v=v)

    return optax.GradientTransformation(init_fn, update_fn)


def _bias_corrected(
    state_cls: type,
    second_moment: _SecondMoment,
    v0: float,
    learning_rate: optax.ScalarOrSchedule,
    b1: Hyper,
    b2: Hyper,
    tau: Hyper,
) -> optax.GradientTransformation:
    """The optax/Keras form: moments of the raw ``g``, bias-corrected, ``tau`` outside the root."""

    def init_fn(params: optax.Params) -> NamedTuple:
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            delta=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.full_like(p, v0), params),
        )

    def update_fn(updates, state, params=None):
        del params
        lr = _lr_at(learning_rate, state.count)
        t = optax.safe_increment(state.count)
        delta = jax.tree.map(  # delta = -m,  m = b1 m + (1 - b1) g
            lambda g, d: (b1 * d - (1 - b1) * g).astype(d.dtype), updates, state.delta
        )
        v = jax.tree.map(
            lambda g, v: second_moment(v, jnp.square(g), b2).astype(v.dtype), updates, state.v
        )
        c1 = 1 - b1**t
        c2 = 1 - b2**t
        new_updates = jax.tree.map(
            lambda g, d, v: (lr * (d / c1) / (jnp.sqrt(v / c2) + tau)).astype(g.dtype),
            updates,
            delta,
            v,
        )
        return new_updates, state_cls(count=t, delta=delta, v=v)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------- factories
def fed_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.99,
    tau: Hyper = 1e-3,
    *,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    r"""FedAdam: Adam on the server, fed the pseudo-gradient ``g = x - mean_i(x_i)``.

    Reddi form (default, Reddi et al. 2021, Algorithm 2), with ``Δ = -g``::

        Δ_t = b1 Δ_{t-1} + (1 - b1) Δ                Δ_{-1} = 0
        v_t = b2 v_{t-1} + (1 - b2) Δ_t²             v_{-1} = tau²
        x  <- x + lr Δ_t / (sqrt(v_t) + tau)         (no bias correction)

    optax/Keras form (``bias_correction=True``; equals ``optax.adam(lr, b1, b2, eps=tau)``)::

        m_t = b1 m_{t-1} + (1 - b1) g,   v_t = b2 v_{t-1} + (1 - b2) g²,   m_0 = v_0 = 0
        x  <- x - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + tau)   t = 1, 2, ...

    Args:
      learning_rate: server learning rate ``lr`` > 0, or an optax schedule of the step count.
      b1: first-moment (momentum) decay in [0, 1).
      b2: second-moment decay in [0, 1).
      tau: adaptivity constant > 0 (Adam's epsilon, outside the square root).
      bias_correction: keyword-only; ``True`` selects the optax/Keras form.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`FedAdamState`.

    Raises:
      ValueError: a concrete hyper-parameter outside its range (traced values are not checked).

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = fed_adam(0.1, b1=0.0, b2=0.0, tau=1e-3)
      >>> x = {"w": jnp.array([1.0, -2.0])}
      >>> g = {"w": jnp.array([0.5, -0.5])}     # x - mean client params
      >>> updates, state = opt.update(g, opt.init(x))
      >>> [round(v, 4) for v in optax.apply_updates(x, updates)["w"].tolist()]  # moves ~lr
      [0.9002, -1.9002]
    """
    _check_learning_rate(learning_rate)
    _check_unit_interval("b1", b1)
    _check_unit_interval("b2", b2)
    _check_tau(tau)
    if bias_correction:
        return _bias_corrected(FedAdamState, _adam_v, 0.0, learning_rate, b1, b2, tau)
    return _reddi(FedAdamState, _adam_v, learning_rate, b1, b2, tau)


def fed_yogi(
    learning_rate: optax.ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.99,
    tau: Hyper = 1e-3,
    *,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    r"""FedYogi: Yogi on the server, fed the pseudo-gradient ``g = x - mean_i(x_i)``.

    Reddi form (default, Reddi et al. 2021, Algorithm 2), with ``Δ = -g``::

        Δ_t = b1 Δ_{t-1} + (1 - b1) Δ                            Δ_{-1} = 0
        v_t = v_{t-1} - (1 - b2) Δ_t² sign(v_{t-1} - Δ_t²)        v_{-1} = tau²
        x  <- x + lr Δ_t / (sqrt(v_t) + tau)                     (no bias correction)

    optax/Keras form (``bias_correction=True``, Zaheer et al. 2018 with Adam's bias correction)::

        m_t = b1 m_{t-1} + (1 - b1) g                            m_0 = 0
        v_t = v_{t-1} - (1 - b2) g² sign(v_{t-1} - g²)            v_0 = YOGI_INITIAL_V = 1e-6
        x  <- x - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + tau)   t = 1, 2, ...

    ``v_0 = 1e-6`` is the small positive constant of Zaheer et al. and optax's
    ``initial_accumulator_value``; unlike :func:`optax.yogi` (which also starts ``m`` at 1e-6)
    the first moment starts at 0. ``v`` stays >= 0 whenever ``v_0`` >= 0.

    Args:
      learning_rate: server learning rate ``lr`` > 0, or an optax schedule of the step count.
      b1: first-moment (momentum) decay in [0, 1).
      b2: second-moment decay in [0, 1).
      tau: adaptivity constant > 0 (outside the square root).
      bias_correction: keyword-only; ``True`` selects the optax/Keras form.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`FedYogiState`.

    Raises:
      ValueError: a concrete hyper-parameter outside its range (traced values are not checked).

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).
      Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = fed_yogi(0.1, bias_correction=True)
      >>> x = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -0.5])}, opt.init(x))
      >>> [round(v, 3) for v in optax.apply_updates(x, updates)["w"].tolist()]
      [0.9, -1.9]
    """
    _check_learning_rate(learning_rate)
    _check_unit_interval("b1", b1)
    _check_unit_interval("b2", b2)
    _check_tau(tau)
    if bias_correction:
        return _bias_corrected(FedYogiState, _yogi_v, YOGI_INITIAL_V, learning_rate, b1, b2, tau)
    return _reddi(FedYogiState, _yogi_v, learning_rate, b1, b2, tau)


def fed_adagrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: Hyper = 0.0,
    tau: Hyper = 1e-3,
) -> optax.GradientTransformation:
    r"""FedAdagrad: Adagrad on the server (Reddi et al. 2021, Algorithm 2), ``Δ = -g``::

        Δ_t = b1 Δ_{t-1} + (1 - b1) Δ                Δ_{-1} = 0
        v_t = v_{t-1} + Δ_t²                         v_{-1} = tau²
        x  <- x + lr Δ_t / (sqrt(v_t) + tau)

    With the default ``b1 = 0``, ``Δ_t = -g`` (Reddi's FedAdagrad without momentum). There is no
    bias-corrected form.

    Args:
      learning_rate: server learning rate ``lr`` > 0, or an optax schedule of the step count.
      b1: momentum decay in [0, 1).
      tau: adaptivity constant > 0.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`FedAdagradState`.

    Raises:
      ValueError: a concrete hyper-parameter outside its range (traced values are not checked).

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).
      Duchi, Hazan & Singer, "Adaptive Subgradient Methods", JMLR 2011.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = fed_adagrad(0.1, tau=1e-3)
      >>> x = jnp.array([1.0, -2.0])
      >>> updates, state = opt.update(jnp.array([0.5, -0.5]), opt.init(x))
      >>> [round(v, 4) for v in optax.apply_updates(x, updates).tolist()]
      [0.9002, -1.9002]
    """
    _check_learning_rate(learning_rate)
    _check_unit_interval("b1", b1)
    _check_tau(tau)
    return _reddi(FedAdagradState, _adagrad_v, learning_rate, b1, 0.0, tau)


def fed_avgm(
    learning_rate: optax.ScalarOrSchedule, momentum: Hyper = 0.9
) -> optax.GradientTransformation:
    r"""FedAvgM: server momentum (Hsu et al. 2019), fed ``g = x - mean_i(x_i)``::

        m_t = momentum m_{t-1} + g                   m_{-1} = 0
        x  <- x - lr m_t

    This is ``optax.sgd(learning_rate, momentum=momentum)`` (heavy ball, no Nesterov); its state
    is optax's ``(TraceState(trace=m), EmptyState())``.

    Args:
      learning_rate: server learning rate ``lr`` > 0, or an optax schedule of the step count.
      momentum: momentum decay in [0, 1); 0 gives :func:`fed_sgd`.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: a concrete hyper-parameter outside its range (traced values are not checked).

    References:
      Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
      Visual Classification", 2019 (FedAvgM).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = fed_avgm(1.0, momentum=0.5)
      >>> x, g = jnp.array([1.0]), jnp.array([0.5])
      >>> state = opt.init(x)
      >>> u, state = opt.update(g, state); x = optax.apply_updates(x, u)   # m = 0.5
      >>> u, state = opt.update(g, state); x = optax.apply_updates(x, u)   # m = 0.75
      >>> x.tolist()
      [-0.25]
    """
    _check_learning_rate(learning_rate)
    _check_unit_interval("momentum", momentum)
    return optax.sgd(learning_rate, momentum=momentum)


def fed_sgd(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    r"""Plain server SGD on the pseudo-gradient ``g = x - mean_i(x_i)``::

        x <- x - lr g

    ``fed_sgd(1.0)`` sets the server params to the mean client params: plain FedAvg
    (McMahan et al. 2017). This is ``optax.sgd(learning_rate)``.

    Args:
      learning_rate: server learning rate ``lr`` > 0, or an optax schedule of the step count.

    Returns:
      An ``optax.GradientTransformation`` (stateless apart from a schedule's count).

    Raises:
      ValueError: a concrete non-positive or non-finite ``learning_rate``.

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = fed_sgd(1.0)
      >>> x, client_mean = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
      >>> u, _ = opt.update(x - client_mean, opt.init(x))
      >>> optax.apply_updates(x, u).tolist()
      [0.5, 3.0]
    """
    _check_learning_rate(learning_rate)
    return optax.sgd(learning_rate)


REGISTRY = Registry("server optimizer")
"""Server optimisers by short name (a config's ``[server_optimizer]`` table): the federated
ones of this module and the plain optax ones (``sgd``, ``adam``, ``adamw``, ``adagrad``,
``yogi``, ``rmsprop``, fed the pseudo-gradient unchanged)."""

for _name, _factory in [
    ("fed_sgd", fed_sgd),
    ("fed_adam", fed_adam),
    ("fed_yogi", fed_yogi),
    ("fed_adagrad", fed_adagrad),
    ("fed_avgm", fed_avgm),
    ("sgd", optax.sgd),
    ("adam", optax.adam),
    ("adamw", optax.adamw),
    ("adagrad", optax.adagrad),
    ("yogi", optax.yogi),
    ("rmsprop", optax.rmsprop),
]:
    REGISTRY.register(_name)(_factory)


def per_layer(
    rules: list[tuple[str, optax.GradientTransformation]],
    default: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """Per-layer server optimisers (``optax.partition``): the first rule whose pattern matches.

    Each leaf's path (``jax.tree_util.keystr``, e.g. ``"['params']['Dense_1']['kernel']"``) is
    searched with each rule's regular expression in order; a leaf no rule matches gets
    ``default``.

    Args:
      rules: ``(pattern, transformation)`` pairs.
      default: the transformation of the other leaves.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = per_layer([("bias", fed_sgd(1.0))], fed_sgd(0.5))
      >>> p = {"bias": jnp.ones(1), "kernel": jnp.ones(1)}
      >>> u, _ = opt.update({"bias": jnp.ones(1), "kernel": jnp.ones(1)}, opt.init(p), p)
      >>> float(u["bias"][0]), float(u["kernel"][0])
      (-1.0, -0.5)
    """
    import re

    compiled = []
    for i, (pattern, transform) in enumerate(rules):
        try:
            compiled.append((re.compile(pattern), f"rule{i}"))
        except re.error as e:
            raise ValueError(
                f"rules[{i}].match: {pattern!r} is not a regular expression ({e})."
            ) from e
        if not isinstance(transform, optax.GradientTransformation):
            raise TypeError(f"rules[{i}]: expected an optax.GradientTransformation.")
    transforms = {label: t for (_, label), (_, t) in zip(compiled, rules, strict=True)}
    transforms["default"] = default

    def label_of(path, _leaf):
        key = jax.tree_util.keystr(path)
        for regex, label in compiled:
            if regex.search(key):
                return label
        return "default"

    def labels(params):
        return jax.tree_util.tree_map_with_path(label_of, params)

    return optax.partition(transforms, labels)
