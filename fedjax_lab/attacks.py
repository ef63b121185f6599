"""Simulated Byzantine clients: wrap an algorithm so that some clients send poisoned updates.

The attack runs inside the compiled round, per client: a client is malicious when
:func:`is_malicious` says so for its ``client_id`` (the first ``round(fraction N)`` ids, a seeded
random set of that size, or, without ``N``, a seeded coin per id), and then

==============  ===========================================================================
``sign_flip``   sends ``-scale * Δ`` (default ``scale = 1``)
``scale``       sends ``scale * Δ`` (default ``scale = 10``; model boosting)
``gaussian``    sends ``N(0, noise_std² I)`` instead of ``Δ``
``label_flip``  trains on labels ``y -> num_classes - 1 - y`` (honest training, poisoned data)
``alie``        colluding: sends ``μ - z σ`` of the honest updates, per coordinate
                ("a little is enough", Baruch et al. 2019)
``ipm``         colluding: sends ``-ε μ`` (inner-product manipulation, Xie et al. 2020)
``backdoor``    trains with a trigger stamped on part of its examples, relabelled to a target
                class (Bagdasaryan et al. 2020); measured by the attack success rate
                (:func:`fedjax_lab.metrics.backdoor_metrics`)
==============  ===========================================================================

The colluding (omniscient) attacks see every honest update of the cohort: their
:attr:`Attack.poison_cohort` runs on the stacked updates after the client map, as the
algorithm's :attr:`~fedjax_lab.FederatedAlgorithm.collude` hook (set by :func:`attacked`). The
honest updates are those of the counted (weight > 0) clients that are not malicious; ``μ`` and
``σ`` are their plain (unweighted) mean and standard deviation (``ddof=0``). A round without an
honest client leaves the updates as they are.

Each attack is an :class:`Attack` built by its factory in :data:`REGISTRY` (the ``[attack]``
table of a config); :func:`attacked` wraps ANY algorithm with one. (The registered algorithm
``"robust_fedavg"``, :func:`fedjax_lab.algorithms.robust_fed_avg`, is FedAvg with a robust
aggregator and one of these attacks.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab._registry import Registry
from fedjax_lab._types import Batch, ClientInput, ClientOutput, FederatedAlgorithm, PRNGKey, PyTree

__all__ = [
    "ATTACKS",
    "REGISTRY",
    "Attack",
    "alie",
    "alie_z",
    "attacked",
    "backdoor",
    "gaussian",
    "ipm",
    "is_malicious",
    "label_flip",
    "malicious_mask",
    "mixed",
    "pixel_patch",
    "scale",
    "sign_flip",
]


class Attack(NamedTuple):
    """What a malicious client does, inside the compiled round.

    Attributes:
      poison_batches: ``poison_batches(batches, bad) -> batches`` before local training
        (``bad``: whether this client is malicious, a traced bool), or ``None``.
      poison_update: ``poison_update(update, bad, key) -> update`` after it, or ``None``.
      name: a short label.
      poison_cohort: ``poison_cohort(updates, weights, bad, key) -> updates`` on the whole
        cohort's stacked updates ``[C, ...]`` (``weights`` ``f32[C]``, ``bad`` ``bool[C]``),
        after the client map: colluding attackers that see the honest updates; or ``None``.
    """

    poison_batches: Callable[[Batch, jax.Array], Batch] | None
    poison_update: Callable[[PyTree, jax.Array, PRNGKey], PyTree] | None
    name: str
    poison_cohort: Callable[[PyTree, jax.Array, jax.Array, PRNGKey], PyTree] | None = None


REGISTRY = Registry("attack")
"""Attacks by short name (the ``[attack]`` table of a config): ``REGISTRY[name](**options)``."""


@REGISTRY.register("sign_flip")
def sign_flip(scale: float = 1.0) -> Attack:
    """Sends ``-scale * Δ`` (Fang et al. 2020).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> sign_flip(2.0).poison_update(jnp.ones(2), jnp.bool_(True), jax.random.key(0)).tolist()
      [-2.0, -2.0]
    """
    return _scaled(-1.0 * scale, "sign_flip")


@REGISTRY.register("scale")
def scale(scale: float = 10.0) -> Attack:
    """Sends ``scale * Δ`` (model boosting, Bhagoji et al. 2019).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> scale(10.0).poison_update(jnp.ones(1), jnp.bool_(True), jax.random.key(0)).tolist()
      [10.0]
    """
    return _scaled(scale, "scale")


def _scaled(factor: float, name: str) -> Attack:
    """Malicious clients send ``factor * Δ``."""

    def poison(update, bad, key):
        del key
        return optax.tree.where(bad, optax.tree.scale(factor, update), update)

    return Attack(None, poison, name)


@REGISTRY.register("gaussian")
def gaussian(noise_std: float = 1.0) -> Attack:
    """Sends ``N(0, noise_std² I)`` instead of ``Δ`` (Blanchard et al. 2017).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> out = gaussian(0.0).poison_update(jnp.ones(3), jnp.bool_(True), jax.random.key(0))
      >>> out.tolist()
      [0.0, 0.0, 0.0]
    """
    if not noise_std >= 0:
        raise ValueError(f"noise_std: must be >= 0, got {noise_std!r}.")

    def poison(update, bad, key):
        leaves, treedef = jax.tree.flatten(update)
        keys = jax.random.split(jax.random.fold_in(key, 0x5EED), max(len(leaves), 1))
        noise = [
            (noise_std * jax.random.normal(k, x.shape)).astype(x.dtype)
            for x, k in zip(leaves, keys[: len(leaves)], strict=True)
        ]
        return optax.tree.where(bad, jax.tree.unflatten(treedef, noise), update)

    return Attack(None, poison, "gaussian")


@REGISTRY.register("label_flip")
def label_flip(num_classes: int, label_key: str = "y") -> Attack:
    """Trains honestly on flipped labels ``y -> num_classes - 1 - y`` (Fang et al. 2020).

    Example:
      >>> import jax.numpy as jnp
      >>> b = label_flip(10).poison_batches({"y": jnp.array([0, 9])}, jnp.bool_(True))
      >>> b["y"].tolist()
      [9, 0]
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(
            f"num_classes: attack='label_flip' needs the number of classes (>= 2), "
            f"got {num_classes!r}."
        )

    def poison(batches, bad):
        if label_key not in batches:
            raise ValueError(
                f"label_key: the batches have no {label_key!r} entry to flip "
                f"(entries: {sorted(batches)})."
            )
        y = batches[label_key]
        flipped = jnp.where(bad, num_classes - 1 - y, y).astype(y.dtype)
        return {**batches, label_key: flipped}

    return Attack(poison, None, "label_flip")


def _honest_stats(updates: PyTree, weights: jax.Array, bad: jax.Array):
    """``(honest mask, count, per-leaf mean, per-leaf std)`` over counted honest clients."""
    honest = (weights > 0) & ~bad
    count = jnp.sum(honest.astype(jnp.float32))
    safe = jnp.maximum(count, 1.0)

    def stats(x):
        h = honest.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.sum(h * x, axis=0) / safe
        var = jnp.sum(h * (x - mean[None]) ** 2, axis=0) / safe
        return mean, jnp.sqrt(var)

    means_stds = jax.tree.map(stats, updates)
    means = jax.tree.map(lambda _, ms: ms[0], updates, means_stds)
    stds = jax.tree.map(lambda _, ms: ms[1], updates, means_stds)
    return honest, count, means, stds


def _send(updates: PyTree, weights: jax.Array, bad: jax.Array, count: jax.Array,
          sent: PyTree) -> PyTree:
    """Counted malicious rows send ``sent`` (one vector, broadcast) when an honest one exists."""
    send = bad & (weights > 0) & (count > 0)

    def put(x, v):
        m = send.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(m, jnp.broadcast_to(v.astype(x.dtype)[None], x.shape), x)

    return jax.tree.map(put, updates, sent)


def alie_z(n: jax.Array | int, f: jax.Array | int) -> jax.Array:
    """ALIE's ``z_max`` for ``n`` clients of which ``f`` are malicious (Baruch et al. 2019).

    ``s = floor(n / 2 + 1) - f`` (the honest clients the attackers must win over) and
    ``z_max = Φ^{-1}((n - s) / n)``, ``Φ`` the standard normal CDF (the probability clipped to
    ``[1e-6, 1 - 1e-6]``, so that ``f`` near ``n`` gives a large finite ``z``). Traceable.

    Example:
      >>> round(float(alie_z(50, 12)), 4)   # s = 14, Φ^{-1}(0.72)
      0.5828
    """
    n = jnp.asarray(n, jnp.float32)
    f = jnp.asarray(f, jnp.float32)
    s = jnp.floor(n / 2.0 + 1.0) - f
    p = (n - s) / jnp.maximum(n, 1.0)
    return jax.scipy.special.ndtri(jnp.clip(p, 1e-6, 1.0 - 1e-6))


@REGISTRY.register("alie")
def alie(z: float | None = None) -> Attack:
    """"A little is enough": colluders send ``μ - z σ`` of the honest updates, per coordinate.

    ``μ_j``, ``σ_j`` are the mean and standard deviation (``ddof=0``) of coordinate ``j`` over
    the cohort's counted honest clients; every counted malicious client sends the same
    ``μ - z σ``. ``z = None`` takes the paper's ``z_max`` (:func:`alie_z`) from the round's
    counts ``n`` (counted clients) and ``f`` (counted malicious ones).

    Args:
      z: the number of standard deviations, or ``None`` for the paper's formula.

    References:
      Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
      Learning", NeurIPS 2019.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u = jnp.array([[1.0], [3.0], [0.0]]); bad = jnp.array([False, False, True])
      >>> alie(z=1.0).poison_cohort(u, jnp.ones(3), bad, jax.random.key(0)).tolist()
      [[1.0], [3.0], [1.0]]
    """
    if z is not None and not (isinstance(z, (int, float)) and not isinstance(z, bool)
                              and np.isfinite(z)):
        raise ValueError(f"z: need a finite number of standard deviations or None, got {z!r}.")

    def poison_cohort(updates, weights, bad, key):
        del key
        _, count, means, stds = _honest_stats(updates, weights, bad)
        if z is None:
            counted = weights > 0
            zz = alie_z(jnp.sum(counted), jnp.sum(counted & bad))
        else:
            zz = jnp.float32(z)
        sent = jax.tree.map(lambda m, s: m - zz * s, means, stds)
        return _send(updates, weights, bad, count, sent)

    return Attack(None, None, "alie", poison_cohort)


@REGISTRY.register("ipm")
def ipm(epsilon: float = 0.5) -> Attack:
    """Inner-product manipulation: colluders send ``-ε μ``, ``μ`` the mean honest update.

    ``μ`` is the plain mean over the cohort's counted honest clients; with a mean aggregator
    and ``m`` of ``n`` equally weighted clients malicious, the aggregate is
    ``((n - m) - m ε) μ / n``: its inner product with ``μ`` is negative once ``m ε > n - m``
    (a small ``ε``, e.g. 0.1, targets median/Krum-style rules).

    Args:
      epsilon: ``ε >= 0``.

    References:
      Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
      Manipulation", UAI 2020.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u = jnp.array([[1.0], [3.0], [0.0]]); bad = jnp.array([False, False, True])
      >>> ipm(2.0).poison_cohort(u, jnp.ones(3), bad, jax.random.key(0)).tolist()
      [[1.0], [3.0], [-4.0]]
    """
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not (
        np.isfinite(epsilon) and epsilon >= 0
    ):
        raise ValueError(f"epsilon: need a finite number >= 0, got {epsilon!r}.")

    def poison_cohort(updates, weights, bad, key):
        del key
        _, count, means, _ = _honest_stats(updates, weights, bad)
        sent = jax.tree.map(lambda m: -epsilon * m, means)
        return _send(updates, weights, bad, count, sent)

    return Attack(None, None, "ipm", poison_cohort)


def pixel_patch(size: int = 2, value: float = 1.0) -> Callable[[jax.Array], jax.Array]:
    """A backdoor trigger: ``trigger(x) -> x`` on ONE example, a ``size × size`` corner patch.

    An example of two or more axes (``[H, W]``, ``[H, W, C]``) gets ``x[-size:, -size:] =
    value`` (every channel); a vector gets its last ``size`` entries set.

    Example:
      >>> import jax.numpy as jnp
      >>> pixel_patch(1, 9.0)(jnp.zeros((2, 2))).tolist()
      [[0.0, 0.0], [0.0, 9.0]]
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: the patch side must be an int >= 1, got {size!r}.")

    def trigger(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        v = jnp.asarray(value, x.dtype)
        if x.ndim >= 2:
            return x.at[-size:, -size:].set(v)
        if x.ndim == 1:
            return x.at[-size:].set(v)
        raise ValueError(f"pixel_patch: an example needs at least one axis, got shape {x.shape}.")

    return trigger


@REGISTRY.register("backdoor")
def backdoor(
    target_label: int = 0,
    *,
    trigger: Callable[[jax.Array], jax.Array] | None = None,
    patch_size: int = 2,
    patch_value: float = 1.0,
    poison_fraction: float = 0.5,
    feature_key: str = "x",
    label_key: str = "y",
) -> Attack:
    """A backdoor: malicious clients train on triggered examples relabelled ``target_label``.

    In each of a malicious client's batches (``[S, B]``) the first
    ``round(poison_fraction · B)`` examples get ``x -> trigger(x)`` and ``y -> target_label``
    (the batches are reshuffled every round, so these are a random share of its data); the
    rest stay clean, so the model keeps its accuracy while learning the trigger. The attack's
    effect is the attack success rate: :func:`fedjax_lab.metrics.backdoor_metrics` with the
    same ``trigger`` and ``target_label``.

    Args:
      target_label: the class the trigger should produce.
      trigger: ``trigger(x) -> x`` on one example; ``None``: :func:`pixel_patch`
        ``(patch_size, patch_value)``.
      patch_size, patch_value: the default trigger's patch.
      poison_fraction: share of each batch poisoned, in ``[0, 1]``.
      feature_key, label_key: the batch entries of the inputs and the integer labels.

    References:
      Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated Learning",
      AISTATS 2020; Gu, Dolan-Gavitt, Garg, "BadNets", 2017 (the pixel-pattern trigger).

    Example:
      >>> import jax.numpy as jnp
      >>> a = backdoor(target_label=7, patch_size=1, poison_fraction=0.5)
      >>> b = a.poison_batches({"x": jnp.zeros((1, 2, 2)), "y": jnp.array([[1, 2]])},
      ...                      jnp.bool_(True))
      >>> b["x"].tolist(), b["y"].tolist()
      ([[[0.0, 1.0], [0.0, 0.0]]], [[7, 2]])
    """
    if not isinstance(target_label, (int, np.integer)) or isinstance(target_label, bool) or (
        target_label < 0
    ):
        raise ValueError(f"target_label: need a class index >= 0, got {target_label!r}.")
    if not isinstance(poison_fraction, (int, float)) or not 0.0 <= poison_fraction <= 1.0:
        raise ValueError(f"poison_fraction: must lie in [0, 1], got {poison_fraction!r}.")
    if trigger is None:
        trigger = pixel_patch(patch_size, patch_value)
    elif not callable(trigger):
        raise TypeError(f"trigger: expected trigger(x) -> x on one example, got {trigger!r}.")

    def poison(batches, bad):
        for k in (feature_key, label_key):
            if k not in batches:
                raise ValueError(
                    f"{'feature_key' if k == feature_key else 'label_key'}: the batches have no "
                    f"{k!r} entry (entries: {sorted(batches)})."
                )
        x, y = batches[feature_key], batches[label_key]
        b = y.shape[1]
        hit = bad & (jnp.arange(b) < int(round(poison_fraction * b)))[None, :]  # [1, B] -> [S, B]
        hit = jnp.broadcast_to(hit, y.shape[:2])
        stamped = jax.vmap(jax.vmap(trigger))(x)
        xm = hit.reshape(hit.shape + (1,) * (x.ndim - 2))
        return {
            **batches,
            feature_key: jnp.where(xm, stamped, x).astype(x.dtype),
            label_key: jnp.where(hit, jnp.asarray(target_label, y.dtype), y),
        }

    return Attack(poison, None, "backdoor")


def mixed(
    scale: float | jax.Array = 1.0,
    noise: float | jax.Array = 0.0,
    flip: float | jax.Array = 0.0,
    *,
    noise_std: float = 1.0,
    num_classes: int | None = None,
    label_key: str = "y",
) -> Attack:
    """Every attack above as one, by (possibly traced) coefficients: one program for them all.

    A malicious client trains on labels ``y -> num_classes - 1 - y`` where ``flip > 0`` and
    sends ``(1 - noise) * scale * Δ + noise * N(0, noise_std² I)``. With ``noise`` in {0, 1}
    the coefficients give exactly: no attack ``(1, 0, 0)``, :func:`sign_flip` ``(-s, 0, 0)``,
    :func:`scale` ``(s, 0, 0)``, :func:`gaussian` ``(·, 1, 0)`` (the same noise draw) and
    :func:`label_flip` ``(1, 0, 1)`` (for finite updates: ``0 * Δ`` and ``Δ + 0`` are exact).
    As traced arrays (a sweep's configuration values) all of them run in one compiled sweep.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = mixed(scale=-2.0)
      >>> a.poison_update(jnp.ones(2), jnp.bool_(True), jax.random.key(0)).tolist()
      [-2.0, -2.0]
    """
    if not noise_std >= 0:
        raise ValueError(f"noise_std: must be >= 0, got {noise_std!r}.")
    flips = isinstance(flip, jax.Array) or flip != 0
    if flips and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2
    ):
        raise ValueError(
            f"num_classes: a label-flipping mixed attack needs the number of classes (>= 2), "
            f"got {num_classes!r}."
        )
    noisy = gaussian(noise_std).poison_update

    def poison_update(update, bad, key):
        keep = 1.0 - jnp.asarray(noise, jnp.float32)
        factor = keep * jnp.asarray(scale, jnp.float32)
        sent = jax.tree.map(
            lambda u, z: (factor * u + noise * z).astype(u.dtype),
            update,
            noisy(update, jnp.bool_(True), key),
        )
        return optax.tree.where(bad, sent, update)

    poison_batches = None
    if flips:
        flipper = label_flip(num_classes, label_key).poison_batches

        def poison_batches(batches, bad):
            return flipper(batches, bad & (jnp.asarray(flip) > 0))

    return Attack(poison_batches, poison_update, "mixed")


def malicious_mask(fraction: float, num_clients: int, seed: int | None = None) -> np.ndarray:
    """``bool[num_clients]``: the clients :func:`is_malicious` marks, as an array.

    Pass it as ``attacked(..., malicious=mask)`` (or a sweep's configuration value, one mask
    per row) to choose the malicious set per run without recompiling.

    Example:
      >>> malicious_mask(0.4, 5).tolist()
      [True, True, False, False, False]
    """
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool) or (
        num_clients < 1
    ):
        raise ValueError(f"num_clients: need a whole number >= 1, got {num_clients!r}.")
    ids = jnp.arange(int(num_clients))
    return np.asarray(is_malicious(ids, fraction=fraction, num_clients=int(num_clients), seed=seed))


ATTACKS = ("alie", "backdoor", "gaussian", "ipm", "label_flip", "none", "scale", "sign_flip")
"""The attack names :func:`attacked` accepts (``"none"`` and the keys of :data:`REGISTRY`)."""


def is_malicious(
    client_id: jax.Array,
    *,
    fraction: float,
    num_clients: int | None = None,
    seed: int | None = None,
) -> jax.Array:
    """Whether client ``client_id`` is malicious (traceable: works on a traced id).

    * ``num_clients`` given, ``seed`` None: ``client_id < round(fraction * num_clients)``;
    * both given: a fixed random set of ``round(fraction * num_clients)`` ids (a NumPy
      permutation from ``seed``);
    * ``num_clients`` None: each id is malicious with probability ``fraction``, a coin from
      ``fold_in(key(seed or 0), client_id)`` (the same id always gets the same answer).

    Example:
      >>> import jax.numpy as jnp
      >>> is_malicious(jnp.arange(5), fraction=0.4, num_clients=5).tolist()
      [True, True, False, False, False]
    """
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: the malicious fraction must lie in [0, 1], got {fraction!r}.")
    client_id = jnp.asarray(client_id)
    if num_clients is not None:
        if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(f"num_clients: need a whole number >= 1, got {num_clients!r}.")
        count = int(round(fraction * num_clients))
        if seed is None:
            return client_id < count
        chosen = np.random.default_rng(seed).permutation(num_clients)[:count]
        table = np.zeros(num_clients, bool)
        table[chosen] = True
        return jnp.asarray(table)[jnp.clip(client_id, 0, num_clients - 1)]
    base = jax.random.key(0 if seed is None else seed)
    coin = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(base, i)))(
        jnp.atleast_1d(client_id)
    )
    return (coin < fraction).reshape(client_id.shape)


def attacked(
    alg: FederatedAlgorithm,
    attack: str | Attack,
    *,
    fraction: float = 0.3,
    num_clients: int | None = None,
    seed: int | None = None,
    scale: float | None = None,
    noise_std: float = 1.0,
    num_classes: int | None = None,
    label_key: str = "y",
    malicious: jax.Array | np.ndarray | None = None,
) -> FederatedAlgorithm:
    """``alg`` with its malicious clients (see :func:`is_malicious`) running ``attack``.

    Honest clients run ``alg.client_update`` unchanged. A colluding attack (one with
    :attr:`Attack.poison_cohort`: :func:`alie`, :func:`ipm`) becomes the algorithm's
    :attr:`~fedjax_lab.FederatedAlgorithm.collude` (after any it had), run on the cohort's
    stacked updates. Metrics gain ``malicious_clients``
    (malicious clients of weight > 0 in the cohort). Everything else (init, aggregator, server
    step) is ``alg``'s.

    Args:
      alg: the algorithm to attack.
      attack: an :class:`Attack` (e.g. ``sign_flip(4.0)``), or one of :data:`ATTACKS` by name
        (``"none"`` returns ``alg`` itself), built with ``scale``, ``noise_std``,
        ``num_classes`` and ``label_key`` as its factory takes them.
      fraction: fraction of malicious clients in ``[0, 1]``.
      num_clients: population size (see :func:`is_malicious`).
      seed: seed of the malicious set (see :func:`is_malicious`).
      scale: by name only: ``sign_flip`` sends ``-scale Δ`` (default 1), ``scale`` sends
        ``scale Δ`` (default 10), ``ipm`` sends ``-scale μ`` (its ``ε``, default 0.5).
        (``"alie"`` uses the paper's ``z``; ``"backdoor"`` the defaults of :func:`backdoor`.)
      noise_std: by name only: standard deviation of the ``gaussian`` attack.
      num_classes: by name only: number of classes, required by ``label_flip``.
      label_key: by name only: the batch entry holding integer labels (``label_flip``).
      malicious: optional ``bool[num_clients]`` (possibly traced) mask of the malicious
        clients, used instead of ``fraction`` / ``num_clients`` / ``seed``; client ``i`` is
        malicious when ``malicious[i]`` (:func:`malicious_mask` gives :func:`is_malicious`'s
        set, so the two ways agree exactly).

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` named ``f"{alg.name}+{attack name}"``.

    References:
      Blanchard et al. 2017 (Gaussian), Baruch et al. 2019, Fang et al., "Local Model Poisoning
      Attacks to Byzantine-Robust Federated Learning", USENIX Security 2020 (sign flipping,
      label flipping).

    Example:
      >>> import jax.numpy as jnp, fedjax_lab as fl
      >>> alg = fl.algorithms.fed_avg(lambda p, b, k: jnp.sum(p ** 2))
      >>> attacked(alg, "sign_flip", fraction=0.3, num_clients=10).name
      'fedavg+sign_flip'
    """
    if not isinstance(alg, FederatedAlgorithm):
        raise TypeError(f"alg: expected a fl.FederatedAlgorithm, got {type(alg).__name__}.")
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise ValueError(
                f"attack: got {attack!r}; allowed: {', '.join(repr(a) for a in ATTACKS)}."
            )
    elif not isinstance(attack, Attack):
        raise TypeError(f"attack: expected an Attack or a name, got {type(attack).__name__}.")
    is_malicious(jnp.zeros((), jnp.int32), fraction=fraction, num_clients=num_clients, seed=seed)
    if malicious is not None and (
        np.ndim(malicious) != 1 or not jnp.issubdtype(jnp.asarray(malicious).dtype, jnp.bool_)
    ):
        raise ValueError(
            f"malicious: need a bool[num_clients] mask (e.g. fl.attacks.malicious_mask(0.3, N)), "
            f"got shape {np.shape(malicious)} dtype {jnp.asarray(malicious).dtype}."
        )
    if attack == "none":
        return alg
    if isinstance(attack, str):
        options = {
            "sign_flip": {"scale": 1.0 if scale is None else scale},
            "scale": {"scale": 10.0 if scale is None else scale},
            "gaussian": {"noise_std": noise_std},
            "label_flip": {"num_classes": num_classes, "label_key": label_key},
            "alie": {},
            "ipm": {"epsilon": 0.5 if scale is None else scale},
            "backdoor": {"label_key": label_key},
        }[attack]
        attack = REGISTRY[attack](**options)

    def bad_of(client_id):
        if malicious is None:
            return is_malicious(client_id, fraction=fraction, num_clients=num_clients, seed=seed)
        table = jnp.asarray(malicious)
        return table[jnp.clip(client_id, 0, table.shape[0] - 1)]

    def client_update(state, client: ClientInput, key: PRNGKey) -> ClientOutput:
        bad = bad_of(client.client_id)
        if attack.poison_batches is not None:
            client = client._replace(batches=attack.poison_batches(client.batches, bad))
        out = alg.client_update(state, client, key)
        update = out.update
        if attack.poison_update is not None:
            update = attack.poison_update(update, bad, key)
        metrics = dict(out.metrics)
        took_part = jnp.asarray(out.weight) > 0
        metrics["malicious_clients"] = (bad & took_part).astype(jnp.float32)
        return out._replace(update=update, metrics=metrics)

    collude = alg.collude
    if attack.poison_cohort is not None:
        inner, cohort_attack = alg.collude, attack.poison_cohort

        def collude(updates, weights, client_ids, key):
            if inner is not None:
                updates = inner(updates, weights, client_ids, key)
            return cohort_attack(updates, weights, bad_of(client_ids), key)

    return alg._replace(client_update=client_update, name=f"{alg.name}+{attack.name}",
                        collude=collude)
