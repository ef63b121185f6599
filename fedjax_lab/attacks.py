"""Simulated Byzantine clients: wrap an algorithm so that some clients send poisoned updates.

The attack runs inside the compiled round, per client: a client is malicious when
:func:`is_malicious` says so for its ``client_id`` (the first ``round(fraction N)`` ids, a seeded
random set of that size, or, without ``N``, a seeded coin per id), and then

==============  ===========================================================================
``sign_flip``   sends ``-scale * Δ`` (default ``scale = 1``)
``scale``       sends ``scale * Δ`` (default ``scale = 10``; model boosting)
``gaussian``    sends ``N(0, noise_std² I)`` instead of ``Δ``
``label_flip``  trains on labels ``y -> num_classes - 1 - y`` (honest training, poisoned data)
==============  ===========================================================================

:func:`robust_fed_avg` (registered as ``"robust_fedavg"``) is FedAvg with a robust aggregator
chosen by name and, optionally, under one of these attacks: the robustness experiment in one
config entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import robust
from fedjax_lab._types import ClientInput, ClientOutput, FederatedAlgorithm, LossFn, PRNGKey
from fedjax_lab.algorithms._registry import register

__all__ = ["ATTACKS", "attacked", "is_malicious", "robust_fed_avg"]

ATTACKS = ("gaussian", "label_flip", "none", "scale", "sign_flip")


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
    attack: str,
    *,
    fraction: float = 0.3,
    num_clients: int | None = None,
    seed: int | None = None,
    scale: float | None = None,
    noise_std: float = 1.0,
    num_classes: int | None = None,
    label_key: str = "y",
) -> FederatedAlgorithm:
    """``alg`` with its malicious clients (see :func:`is_malicious`) running ``attack``.

    Honest clients run ``alg.client_update`` unchanged. The attacked update replaces every leaf
    of the update tree. Metrics gain ``malicious_clients`` (malicious clients of weight > 0
    in the cohort). Everything else (init, aggregator, server step) is ``alg``'s.

    Args:
      alg: the algorithm to attack.
      attack: one of :data:`ATTACKS` (``"none"`` returns ``alg`` itself).
      fraction: fraction of malicious clients in ``[0, 1]``.
      num_clients: population size (see :func:`is_malicious`).
      seed: seed of the malicious set (see :func:`is_malicious`).
      scale: ``sign_flip``: sends ``-scale Δ`` (default 1); ``scale``: sends ``scale Δ``
        (default 10).
      noise_std: standard deviation of the ``gaussian`` attack.
      num_classes: number of classes, required by ``label_flip``.
      label_key: the batch entry holding integer labels (``label_flip``).

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm` named ``f"{alg.name}+{attack}"``.

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
    if attack not in ATTACKS:
        raise ValueError(
            f"attack: got {attack!r}; allowed: {', '.join(repr(a) for a in ATTACKS)}."
        )
    is_malicious(jnp.zeros((), jnp.int32), fraction=fraction, num_clients=num_clients, seed=seed)
    if attack == "none":
        return alg
    if attack == "label_flip" and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(
            f"num_classes: attack='label_flip' needs the number of classes (>= 2), "
            f"got {num_classes!r}."
        )
    if not noise_std >= 0:
        raise ValueError(f"noise_std: must be >= 0, got {noise_std!r}.")
    factor = {"sign_flip": -1.0 * (1.0 if scale is None else scale),
              "scale": 10.0 if scale is None else scale}.get(attack, 1.0)

    def client_update(state, client: ClientInput, key: PRNGKey) -> ClientOutput:
        bad = is_malicious(
            client.client_id, fraction=fraction, num_clients=num_clients, seed=seed
        )
        if attack == "label_flip":
            if label_key not in client.batches:
                raise ValueError(
                    f"label_key: the batches have no {label_key!r} entry to flip "
                    f"(entries: {sorted(client.batches)})."
                )
            y = client.batches[label_key]
            flipped = jnp.where(bad, num_classes - 1 - y, y).astype(y.dtype)
            client = client._replace(batches={**client.batches, label_key: flipped})
        out = alg.client_update(state, client, key)
        update = out.update
        if attack in ("sign_flip", "scale"):
            update = optax.tree.where(bad, optax.tree.scale(factor, update), update)
        elif attack == "gaussian":
            leaves, treedef = jax.tree.flatten(update)
            keys = jax.random.split(jax.random.fold_in(key, 0x5EED), max(len(leaves), 1))
            noise = [
                (noise_std * jax.random.normal(k, x.shape)).astype(x.dtype)
                for x, k in zip(leaves, keys[: len(leaves)], strict=True)
            ]
            update = optax.tree.where(bad, jax.tree.unflatten(treedef, noise), update)
        metrics = dict(out.metrics)
        took_part = jnp.asarray(out.weight) > 0
        metrics["malicious_clients"] = (bad & took_part).astype(jnp.float32)
        return out._replace(update=update, metrics=metrics)

    return alg._replace(client_update=client_update, name=f"{alg.name}+{attack}")


@register("robust_fedavg")
def robust_fed_avg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    aggregator: str = "median",
    server_learning_rate: float = 1.0,
    *,
    beta: float = 0.1,
    f: int = 1,
    m: int | None = None,
    gm_iters: int = 10,
    nu: float = 1e-6,
    tau: float = 1.0,
    cc_iters: int = 1,
    attack: str = "none",
    attack_fraction: float = 0.0,
    attack_num_clients: int | None = None,
    attack_seed: int | None = None,
    attack_scale: float | None = None,
    attack_noise_std: float = 1.0,
    num_classes: int | None = None,
    **kwargs,
) -> FederatedAlgorithm:
    """FedAvg whose aggregate is a robust rule chosen by name, optionally under attack.

    ``x_{t+1} = x_t - η_g Agg({Δ_i})`` with ``Agg`` = :func:`fedjax_lab.robust.from_name`
    (``aggregator`` in ``"mean"``, ``"median"``, ``"trimmed_mean"``, ``"krum"``,
    ``"multi_krum"``, ``"geometric_median"``, ``"centered_clipping"``), and the clients of
    :func:`attacked` (``attack``, ``attack_fraction``, ...) poisoned.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``).
      aggregator: the rule's short name.
      server_learning_rate: ``η_g``.
      beta, f, m, gm_iters, nu, tau, cc_iters: the rules' hyper-parameters (see
        :mod:`fedjax_lab.robust`).
      attack, attack_fraction, attack_num_clients, attack_seed, attack_scale,
        attack_noise_std, num_classes: passed to :func:`attacked` as ``attack``, ``fraction``,
        ``num_clients``, ``seed``, ``scale``, ``noise_std``, ``num_classes``.
      **kwargs: passed to :func:`fedjax_lab.algorithms.fed_opt`.

    Example:
      >>> import jax.numpy as jnp
      >>> alg = robust_fed_avg(lambda p, b, k: jnp.sum(p ** 2), aggregator="trimmed_mean",
      ...                      attack="sign_flip", attack_fraction=0.2)
      >>> alg.name, alg.aggregator.reduce
      ('robust_fedavg+sign_flip', 'stack')
    """
    from fedjax_lab import server as server_lib
    from fedjax_lab.algorithms.fedavg import fed_opt

    agg = robust.from_name(
        aggregator, beta=beta, f=f, m=m, gm_iters=gm_iters, nu=nu, tau=tau, cc_iters=cc_iters
    )
    name = kwargs.pop("name", None)
    alg = fed_opt(
        loss_fn, client_optimizer, server_lib.fed_sgd(server_learning_rate), aggregator=agg,
        name="robust_fedavg", **kwargs,
    )
    alg = attacked(
        alg,
        attack,
        fraction=attack_fraction,
        num_clients=attack_num_clients,
        seed=attack_seed,
        scale=attack_scale,
        noise_std=attack_noise_std,
        num_classes=num_classes,
    )
    return alg if name is None else alg._replace(name=name)
