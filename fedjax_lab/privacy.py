"""User-level differential privacy: clipped, noised aggregation and its privacy accounting.

DP-FedAvg (McMahan et al. 2018) makes each round a Gaussian mechanism over *clients*: every
participating client's update is clipped to L2 norm ``C``, the server adds Gaussian noise of
standard deviation ``z * C`` to the SUM of the clipped updates and divides by a fixed
denominator (the expected number of clients a round), so one client changes the sum by at most
``C`` whatever the others send. The aggregators here are :class:`~fedjax_lab.Aggregator`\\ s with
``reduce="sum"``: ``prepare`` clips inside the client map (streams, ``psum`` across devices),
``finalize`` adds the noise from the round's aggregator key (so a run is reproducible, and each
round draws fresh noise). :func:`epsilon` and :func:`noise_multiplier_for` account for the
privacy spent, with ``dp_accounting``.

DP-FTRL (Kairouz et al. 2021) needs no sampling assumption: :func:`tree_aggregator` releases the
noisy PREFIX sums ``Σ_{s<=t} Σ_i Δ̃_i^s`` of the clipped updates, with tree-aggregated noise
(:func:`tree_prefix_noise`: each node of a binary tree over the rounds gets its own Gaussian
noise, drawn once; the prefix at round ``t`` adds the at most ``ceil(log2(t+1))`` nodes of
``t``'s binary decomposition). :func:`ftrl_epsilon` accounts for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import tree as tree_lib
from fedjax_lab._types import Aggregator, PRNGKey, PyTree

if TYPE_CHECKING:  # dp-accounting is imported when an accountant first runs
    import dp_accounting

__all__ = [
    "DPAggregatorState",
    "TreeAggregatorState",
    "best_epsilon",
    "clip_per_layer",
    "dp_aggregator",
    "epsilon",
    "ftrl_epsilon",
    "gaussian_sum_noise",
    "layer_clip_norms",
    "noise_multiplier_for",
    "tree_aggregator",
    "tree_prefix_noise",
    "tree_sensitivity",
]


class DPAggregatorState(NamedTuple):
    """State of :func:`dp_aggregator`.

    Attributes:
      clip_norm: ``f32`` scalar, the clip norm ``C`` used in the next round (constant unless
        adaptive clipping is on).
    """

    clip_norm: jax.Array


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}.")
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be finite and {bound}, got {value!r}.")


def layer_clip_norms(
    params: PyTree, clip_norm: float | jax.Array, layer_budget: str | Sequence[float] = "equal"
) -> list[jax.Array]:
    """Splits a total clip norm ``C`` into per-leaf norms ``C_l`` with ``Σ_l C_l² = C²``.

    So a tree whose every leaf ``l`` is clipped to ``C_l`` has global norm ``<= C`` and the
    Gaussian mechanism's sensitivity stays ``C``.

    Args:
      params: a pytree like the updates (only its leaves' sizes are used).
      clip_norm: the total clip norm ``C``.
      layer_budget: ``"equal"`` (``C_l = C / sqrt(L)``), ``"size"`` (``C_l² ∝`` the leaf's number
        of entries) or a sequence of ``L`` non-negative shares (normalised to sum 1) in
        ``jax.tree.leaves`` order; ``C_l = C * sqrt(share_l)``.

    Returns:
      A list of ``L`` scalar clip norms in leaf order.

    Example:
      >>> import jax.numpy as jnp
      >>> [round(float(c), 4) for c in layer_clip_norms({"a": jnp.zeros(3), "b": jnp.zeros(1)},
      ...                                               2.0, "size")]
      [1.7321, 1.0]
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params: the update tree has no leaves to clip.")
    if isinstance(layer_budget, str):
        if layer_budget == "equal":
            shares = np.ones(len(leaves))
        elif layer_budget == "size":
            shares = np.array([float(np.size(x)) for x in leaves])
        else:
            raise ValueError(
                f"layer_budget: expected 'equal', 'size' or a sequence of shares, "
                f"got {layer_budget!r}."
            )
    else:
        shares = np.asarray(layer_budget, np.float64)
        if shares.shape != (len(leaves),) or np.any(shares < 0) or not np.sum(shares) > 0:
            raise ValueError(
                f"layer_budget: need {len(leaves)} non-negative shares (one per leaf, in "
                f"jax.tree.leaves order) with a positive sum, got {layer_budget!r}."
            )
    shares = shares / np.sum(shares)
    return [jnp.asarray(clip_norm, jnp.float32) * jnp.float32(np.sqrt(s)) for s in shares]


def clip_per_layer(tree: PyTree, clip_norms: Sequence[jax.Array]) -> PyTree:
    """Clips every leaf ``l`` to L2 norm ``clip_norms[l]``: ``x_l * min(1, C_l / ||x_l||)``.

    Example:
      >>> import jax.numpy as jnp
      >>> clip_per_layer({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, [1.0, 1.0])["a"]
      Array([0.6, 0.8], dtype=float32)
    """
    leaves, treedef = jax.tree.flatten(tree)
    if len(leaves) != len(clip_norms):
        raise ValueError(
            f"clip_norms: need one clip norm per leaf ({len(leaves)}), got {len(clip_norms)}."
        )
    clipped = [tree_lib.clip_by_global_norm(x, c) for x, c in zip(leaves, clip_norms, strict=True)]
    return jax.tree.unflatten(treedef, clipped)


def gaussian_sum_noise(tree: PyTree, stddev: jax.Array, key: PRNGKey) -> PyTree:
    """Independent ``N(0, stddev²)`` noise shaped like ``tree`` (one key split per leaf).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> noise = gaussian_sum_noise({"w": jnp.zeros(3)}, 2.0, jax.random.key(0))
      >>> noise["w"].shape
      (3,)
    """
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [
        jnp.asarray(stddev, x.dtype) * jax.random.normal(k, jnp.shape(x), x.dtype)
        for x, k in zip(leaves, keys[: len(leaves)], strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def dp_aggregator(
    noise_multiplier: float,
    clip_norm: float,
    *,
    expected_cohort_size: float | None = None,
    per_layer: bool = False,
    layer_budget: str | Sequence[float] = "equal",
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
) -> Aggregator:
    """Clip each client's update, sum, add Gaussian noise ``N(0, (z C)²)``, divide by a constant.

    Update rule (round t, clip ``C_t``, cohort of ``n`` slots, participants ``P`` = clients of
    weight > 0; every participant counts with weight 1):

    * client i: ``Δ̃_i = Δ_i * min(1, C_t / ||Δ_i||)`` (flat), or per leaf ``l`` with
      ``C_{t,l} = C_t sqrt(share_l)``, ``Σ_l C_{t,l}² = C_t²`` (``per_layer=True``);
    * server: ``Δ = (Σ_{i∈P} Δ̃_i + N(0, (z_Δ C_t)² I)) / m`` with the fixed denominator
      ``m = expected_cohort_size`` (default: the number of cohort slots ``n``, padding
      included, which is public; NOT the number of participants, which is private).
    * adaptive clipping (Andrew et al. 2021, ``adaptive=True``): participants also report
      ``b_i = 1[||Δ_i|| <= C_t]``; ``b̄ = (Σ b_i + N(0, σ_b²)) / m`` and
      ``C_{t+1} = C_t exp(-η_C (b̄ - γ))`` (``γ = target_quantile``, ``η_C =
      clip_learning_rate``). The update noise is then ``z_Δ = (z^-2 - (2 σ_b)^-2)^-1/2`` so
      that both releases together cost what one Gaussian mechanism of multiplier ``z`` costs
      (``σ_b`` defaults to ``m / 20`` as in the paper). Without adaptive clipping ``z_Δ = z``.

    The noise comes from the aggregator key of the round (``finalize``'s ``key``), so the same
    run key repeats the same noise and each round draws new noise. ``total_weight`` is ``m``
    (positive): a round in which nobody took part still releases noise, as DP requires.
    Clip norm 0 sends zeros; ``noise_multiplier=0`` gives clipping without noise.

    Args:
      noise_multiplier: ``z >= 0``, noise standard deviation in units of the clip norm; a
        (traced) ``f32`` array is accepted too (a noise axis of :func:`fedjax_lab.run_sweep`),
        and is then not checked here (nor ``2 σ_b > z``): the caller checks it on the host.
      clip_norm: ``C > 0`` (initial value when adaptive).
      expected_cohort_size: the fixed denominator ``m``; ``None`` uses the cohort size.
      per_layer: clip every leaf separately (budgets from ``layer_budget``).
      layer_budget: see :func:`layer_clip_norms`.
      adaptive: adapt ``C`` toward the ``target_quantile`` of the update norms.
      target_quantile: ``γ`` in ``(0, 1)``.
      clip_learning_rate: ``η_C > 0``.
      clipped_count_stddev: ``σ_b``; ``None`` means ``m / 20`` (needs ``expected_cohort_size``
        to be known at build time; otherwise 0.05 per cohort slot).

    Returns:
      An :class:`~fedjax_lab.Aggregator` (``reduce="sum"``) with state
      :class:`DPAggregatorState`.

    References:
      McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
      Models", ICLR 2018. Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
      with Adaptive Clipping", NeurIPS 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = dp_aggregator(noise_multiplier=0.0, clip_norm=1.0, expected_cohort_size=2)
      >>> state = agg.init({"w": jnp.zeros(2)})
      >>> parts = [agg.prepare({"w": jnp.array(u)}, jnp.array(1.0), state)
      ...          for u in ([3.0, 4.0], [0.1, 0.0])]
      >>> summed = jax.tree.map(lambda a, b: a + b, *parts)
      >>> mean, total, state = agg.finalize(summed, state, jax.random.key(0))
      >>> [round(v, 3) for v in mean["w"].tolist()], float(total)
      ([0.35, 0.4], 2.0)
    """
    traced_z = isinstance(noise_multiplier, jax.Array)  # a sweep axis: checked by the sweep
    if not traced_z:
        _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clip_norm", clip_norm, allow_zero=True)
    if expected_cohort_size is not None:
        _check_positive("expected_cohort_size", expected_cohort_size)
    if adaptive:
        if not 0.0 < target_quantile < 1.0:
            raise ValueError(f"target_quantile: must lie in (0, 1), got {target_quantile!r}.")
        _check_positive("clip_learning_rate", clip_learning_rate)
        if clipped_count_stddev is not None:
            _check_positive("clipped_count_stddev", clipped_count_stddev)
        if not clip_norm > 0:
            raise ValueError("clip_norm: adaptive clipping needs an initial clip_norm > 0.")

    def count_stddev(denominator):
        if clipped_count_stddev is not None:
            return jnp.float32(clipped_count_stddev)
        return denominator / 20.0

    def update_noise_multiplier(sigma_b):
        if traced_z:
            z = jnp.asarray(noise_multiplier, jnp.float32)
            if not adaptive:
                return z
            inv = z**-2 - (2.0 * sigma_b) ** -2.0
            z_update = jnp.where(inv > 0, jax.lax.rsqrt(jnp.maximum(inv, 1e-30)), jnp.inf)
            return jnp.where(z == 0, jnp.float32(0.0), z_update)
        if not adaptive or noise_multiplier == 0:
            return jnp.float32(noise_multiplier)
        inv = noise_multiplier**-2 - (2.0 * sigma_b) ** -2.0
        # inv <= 0: the count query alone spends the whole budget (checked on the host when
        # possible, see below); no noise budget is left for the update, so use infinite noise.
        return jnp.where(inv > 0, jax.lax.rsqrt(jnp.maximum(inv, 1e-30)), jnp.inf)

    if adaptive and not traced_z and noise_multiplier > 0:
        if clipped_count_stddev is not None:
            sigma_b = clipped_count_stddev
        elif expected_cohort_size is not None:
            sigma_b = expected_cohort_size / 20.0
        else:
            sigma_b = None
        if sigma_b is not None and not 2.0 * sigma_b > noise_multiplier:
            raise ValueError(
                f"clipped_count_stddev: adaptive clipping needs 2 * clipped_count_stddev > "
                f"noise_multiplier ({noise_multiplier}), got sigma_b = {sigma_b}; raise it or "
                "lower the noise multiplier."
            )

    def init(params: PyTree) -> DPAggregatorState:
        if per_layer:
            layer_clip_norms(params, clip_norm, layer_budget)  # validates the budget now
        return DPAggregatorState(clip_norm=jnp.asarray(clip_norm, jnp.float32))

    def prepare(update: PyTree, weight: jax.Array, state: DPAggregatorState):
        c = state.clip_norm
        if per_layer:
            clipped = clip_per_layer(update, layer_clip_norms(update, c, layer_budget))
        else:
            clipped = tree_lib.clip_by_global_norm(update, c)
        took_part = (jnp.asarray(weight) > 0).astype(jnp.float32)
        unclipped = (tree_lib.global_norm(update) <= c).astype(jnp.float32) * took_part
        return (optax.tree.scale(took_part, clipped), took_part, unclipped, jnp.float32(1.0))

    def finalize(contribution, state: DPAggregatorState, key: PRNGKey):
        total, participants, unclipped, slots = contribution
        del participants  # private: never used in the release
        denominator = (
            jnp.float32(expected_cohort_size) if expected_cohort_size is not None else slots
        )
        k_update, k_count = jax.random.split(key)
        sigma_b = count_stddev(denominator)
        z = update_noise_multiplier(sigma_b)
        noise = gaussian_sum_noise(total, z * state.clip_norm, k_update)
        aggregate = jax.tree.map(lambda s, n: (s + n) / denominator, total, noise)
        new_state = state
        if adaptive:
            noisy = unclipped + sigma_b * jax.random.normal(k_count, ())
            fraction = noisy / denominator
            new_clip = state.clip_norm * jnp.exp(-clip_learning_rate * (fraction - target_quantile))
            new_state = DPAggregatorState(clip_norm=new_clip)
        return aggregate, denominator, new_state

    return Aggregator(init, prepare, finalize, reduce="sum")


# ------------------------------------------------------------------- tree aggregation (DP-FTRL)


class TreeAggregatorState(NamedTuple):
    """State of :func:`tree_aggregator`.

    Attributes:
      clip_norm: ``f32`` scalar, the clip norm ``C``.
      step: ``i32`` scalar, the number of prefix sums released so far (``t``).
      cumulative_sum: the exact (noise-free) sum ``S_t = Σ_{s<=t} Σ_i Δ̃_i^s``, shaped like the
        params; only its noisy version ever leaves the aggregator.
      tree_key: the raw key data of the tree's noise key (the aggregator key of round 1; zeros
        before it). Node ``(h, j)`` draws its noise from
        ``fold_in(fold_in(tree_key, h), j)``, so no node noise is stored.
    """

    clip_norm: jax.Array
    step: jax.Array
    cumulative_sum: PyTree
    tree_key: jax.Array


def _bit_length(t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.int32)
    return jnp.int32(32) - jax.lax.clz(t)


def tree_prefix_noise(template: PyTree, step: jax.Array | int, key: PRNGKey,
                      stddev: float | jax.Array) -> PyTree:
    """The tree-aggregation noise of the prefix sum of steps ``1..t``: a sum of node noises.

    The binary tree over steps ``1, 2, ...`` has at level ``h`` the nodes ``(h, j)`` covering
    steps ``[j 2^h + 1, (j + 1) 2^h]``, each with noise ``N_{h,j} ~ N(0, stddev² I)`` drawn once
    from ``fold_in(fold_in(key, h), j)`` (:func:`gaussian_sum_noise`). The prefix ``[1, t]`` is
    the disjoint union of the nodes ``(h, (t >> h) - 1)`` for the set bits ``h`` of ``t``, so its
    noise is ``Σ_{h: bit h of t} N_{h, (t>>h)-1}`` (added in increasing ``h``), of variance
    ``popcount(t) stddev² <= ceil(log2(t + 1)) stddev²``. ``t = 0`` gives zeros. Jittable (a
    loop over the ``bit_length(t)`` levels), nothing stored between steps.

    Args:
      template: a pytree like the sums (leaves' shapes and dtypes are used).
      step: ``t >= 0`` (an ``i32`` scalar, may be traced).
      key: the tree's key (the same for every step of one tree).
      stddev: the noise standard deviation of one node.

    Returns:
      A pytree like ``template``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> k, w = jax.random.key(0), {"w": jnp.zeros(2)}
      >>> node = lambda h, j: gaussian_sum_noise(w, 1.0, jax.random.fold_in(
      ...     jax.random.fold_in(k, h), j))["w"]
      >>> # 6 = 0b110: the nodes [5, 6] (level 1, j = 2) and [1, 4] (level 2, j = 0)
      >>> bool(jnp.allclose(tree_prefix_noise(w, 6, k, 1.0)["w"], node(1, 2) + node(2, 0)))
      True
    """
    t = jnp.asarray(step, jnp.int32)
    zeros = jax.tree.map(jnp.zeros_like, template)

    def level(h, acc):
        def add(acc):
            node_key = jax.random.fold_in(jax.random.fold_in(key, h), (t >> h) - 1)
            noise = gaussian_sum_noise(template, stddev, node_key)
            return jax.tree.map(jnp.add, acc, noise)

        return jax.lax.cond(((t >> h) & 1) == 1, add, lambda acc: acc, acc)

    return jax.lax.fori_loop(0, _bit_length(t), level, zeros)


def _key_data(key: PRNGKey) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def tree_aggregator(
    noise_multiplier: float,
    clip_norm: float,
    *,
    expected_cohort_size: float | None = None,
) -> Aggregator:
    """Clipped updates summed over the cohort AND over the rounds; tree-aggregated noise.

    Update rule (round ``t = 1, 2, ...``, clip ``C``, denominator ``m``): client i sends
    ``Δ̃_i^t = Δ_i^t min(1, C / ||Δ_i^t||)`` (weight 1 for every participant, as in
    :func:`dp_aggregator`); the aggregator keeps ``S_t = S_{t-1} + Σ_i Δ̃_i^t`` and releases the
    noisy prefix sum ``s̃_t / m = (S_t + T_t) / m`` with ``T_t`` = :func:`tree_prefix_noise`
    of ``t`` at node standard deviation ``z C`` (``m`` = ``expected_cohort_size``, default the
    number of cohort slots). Every node of the tree is one Gaussian mechanism of sensitivity
    ``C``; a client's contribution to round ``t`` enters the ``ceil(log2(T+1))`` nodes above
    leaf ``t`` (see :func:`ftrl_epsilon`). The tree key is round 1's aggregator key.

    The aggregate is the noisy prefix sum, not a per-round mean: it is the input of DP-FTRL's
    server (:func:`fedjax_lab.algorithms.dp_ftrl`), not of a FedOpt step.

    Args:
      noise_multiplier: ``z >= 0``, node noise in units of ``C``.
      clip_norm: ``C >= 0``.
      expected_cohort_size: ``m``; ``None`` uses the cohort size.

    Returns:
      An :class:`~fedjax_lab.Aggregator` (``reduce="sum"``) with state
      :class:`TreeAggregatorState`.

    References:
      Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning
      without Sampling or Shuffling", ICML 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = tree_aggregator(0.0, 1.0, expected_cohort_size=2)
      >>> state = agg.init({"w": jnp.zeros(2)})
      >>> for u in ([3.0, 4.0], [0.1, 0.0]):  # one client a round
      ...     part = agg.prepare({"w": jnp.array(u)}, jnp.array(1.0), state)
      ...     prefix, total, state = agg.finalize(part, state, jax.random.key(0))
      >>> [round(v, 3) for v in prefix["w"].tolist()], int(state.step)
      ([0.35, 0.4], 2)
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clip_norm", clip_norm, allow_zero=True)
    if expected_cohort_size is not None:
        _check_positive("expected_cohort_size", expected_cohort_size)
    clip = dp_aggregator(0.0, clip_norm, expected_cohort_size=expected_cohort_size)

    def init(params: PyTree) -> TreeAggregatorState:
        return TreeAggregatorState(
            clip_norm=jnp.asarray(clip_norm, jnp.float32),
            step=jnp.zeros((), jnp.int32),
            cumulative_sum=jax.tree.map(jnp.zeros_like, params),
            tree_key=jnp.zeros_like(jax.random.key_data(jax.random.key(0))),
        )

    def prepare(update: PyTree, weight: jax.Array, state: TreeAggregatorState):
        return clip.prepare(update, weight, DPAggregatorState(clip_norm=state.clip_norm))

    def finalize(contribution, state: TreeAggregatorState, key: PRNGKey):
        total, participants, _, slots = contribution
        del participants  # private: never used in the release
        denominator = (
            jnp.float32(expected_cohort_size) if expected_cohort_size is not None else slots
        )
        data = _key_data(key)
        if data.shape != state.tree_key.shape:
            raise ValueError(
                f"key: tree_aggregator stores the tree key as {state.tree_key.shape} key data "
                f"(the default PRNG); this run's keys have key data of shape {data.shape}."
            )
        tree_key = jnp.where(state.step == 0, data.astype(state.tree_key.dtype), state.tree_key)
        step = state.step + 1
        cumulative = jax.tree.map(jnp.add, state.cumulative_sum, total)
        noise = tree_prefix_noise(
            cumulative, step, jax.random.wrap_key_data(tree_key),
            jnp.float32(noise_multiplier) * state.clip_norm,
        )
        prefix = jax.tree.map(lambda s, n: (s + n) / denominator, cumulative, noise)
        new_state = TreeAggregatorState(state.clip_norm, step, cumulative, tree_key)
        return prefix, denominator, new_state

    return Aggregator(init, prepare, finalize, reduce="sum")


def tree_sensitivity(rounds: int, max_participations: int = 1) -> float:
    """The L2 sensitivity, in units of ``C``, of the whole tree of ``rounds`` leaves.

    The tree has ``L = ceil(log2(rounds + 1))`` levels. A client taking part in at most ``k``
    rounds adds at most ``C`` to each of its leaves; a level-``h`` node covers ``2^h`` leaves, so
    it holds at most ``min(k, 2^h)`` of them and ``Σ_nodes ||change||² <= C² Σ_{h<L} k
    min(k, 2^h)``; ``k = 1`` gives ``sqrt(L)`` (Kairouz et al. 2021), ``k > 1`` at most
    ``k sqrt(L)``.

    Example:
      >>> round(tree_sensitivity(7) ** 2, 6), round(tree_sensitivity(7, 2) ** 2, 6)
      (3.0, 10.0)
    """
    if not isinstance(rounds, (int, np.integer)) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds: need a whole number >= 1, got {rounds!r}.")
    k = max_participations
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= rounds:
        raise ValueError(
            f"max_participations: need a whole number in [1, rounds = {rounds}], got {k!r}."
        )
    levels = math.ceil(math.log2(rounds + 1))
    return math.sqrt(sum(k * min(k, 2**h) for h in range(levels)))


def ftrl_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    *,
    max_participations: int = 1,
    accountant: str = "best",
) -> float:
    """The ``ε`` of ``(ε, δ)``-DP of ``rounds`` rounds of DP-FTRL (tree aggregation, one tree).

    No sampling is assumed: each client may take part in any ``k = max_participations`` rounds.
    The release of all the tree's nodes is one Gaussian mechanism of noise ``z C`` and
    sensitivity ``Δ C`` (:func:`tree_sensitivity`); neighbours add or remove one client (its
    updates replaced by zeros, dp-accounting's ``REPLACE_SPECIAL``):

    * ``accountant="rdp"``: for ``k = 1`` dp-accounting's own tree mechanism,
      ``SingleEpochTreeAggregationDpEvent(z, rounds)`` (RDP ``α ceil(log2(T+1)) / (2 z²)``,
      Kairouz et al. 2021, appendix D); for ``k > 1``, the same RDP curve ``α Δ² / (2 z²)``
      through ``GaussianDpEvent(z / Δ)``;
    * ``accountant="exact"``: the whole release is ONE Gaussian mechanism of multiplier
      ``z / Δ``, whose exact ``ε`` is dp-accounting's analytic formula
      (``get_epsilon_gaussian``, Balle & Wang 2018); ``"pld"`` is taken to mean this too (a
      PLD accountant of that Gaussian converges to it, slowly for small ``z / Δ``);
    * ``accountant="best"`` (default): the smaller of ``"rdp"`` and ``"exact"`` (both valid).

    The paper's closed form, ``ρ = Δ² / (2 z²)``-zCDP and ``ε <= ρ + 2 sqrt(ρ log(1/δ))``, is
    an upper bound on all three.

    Args:
      noise_multiplier: ``z >= 0`` (``0`` gives ``inf``).
      rounds: ``T >= 1``, the number of released prefix sums.
      delta: target ``δ`` in ``(0, 1)``.
      max_participations: ``k`` in ``[1, T]``.
      accountant: ``"rdp"``, ``"exact"`` (or ``"pld"``, the same) or ``"best"``.

    Returns:
      ``ε`` as a float.

    References:
      Kairouz et al., "Practical and Private (Deep) Learning without Sampling or Shuffling",
      ICML 2021.

    Example:
      >>> round(ftrl_epsilon(10.0, 1000, 1e-5, accountant="rdp"), 2)
      1.31
    """
    return _ftrl_best(noise_multiplier, rounds, delta, max_participations, accountant)[0]


def _ftrl_best(noise_multiplier, rounds, delta, max_participations, accountant):
    """``(ε, accountant name)`` of :func:`ftrl_epsilon`."""
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    sensitivity = tree_sensitivity(rounds, max_participations)
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta: need a probability in (0, 1), e.g. 1e-5, got {delta!r}.")
    if accountant not in ("rdp", "pld", "exact", "best"):
        raise ValueError(
            f"accountant: expected 'rdp', 'exact', 'pld' or 'best', got {accountant!r}."
        )
    if noise_multiplier == 0:
        return math.inf, "rdp" if accountant == "rdp" else "exact"
    import dp_accounting

    found = []
    if accountant in ("rdp", "best"):
        acc = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        )
        if max_participations == 1:
            acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, rounds))
        else:
            acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier / sensitivity))
        found.append((float(acc.get_epsilon(delta)), "rdp"))
    if accountant in ("exact", "pld", "best"):
        eps = dp_accounting.get_epsilon_gaussian(noise_multiplier / sensitivity, delta)
        found.append((float(eps), "exact"))
    return min(found)


# --------------------------------------------------------------------------------- accounting

_ACCOUNTANTS = ("rdp", "pld")
_SAMPLINGS = ("poisson", "uniform")


def _dp_event(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    sampling: str,
    num_clients: int | None,
) -> dp_accounting.DpEvent:
    import dp_accounting

    if sampling == "poisson":
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        one_round = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    else:
        # Fixed-size cohorts are accounted under replace-one neighbours, where dp-accounting's
        # noise multiplier is relative to the replace-one sensitivity: replacing one client's
        # clipped update (norm <= C) by another moves the sum by up to 2C, so sigma = z C is
        # a multiplier of z / 2 on that sensitivity.
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        sample_size = int(round(sampling_rate * num_clients))
        one_round = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, sample_size, gaussian
        )
    return dp_accounting.SelfComposedDpEvent(one_round, rounds)


def _make_accountant(accountant: str, sampling: str):
    import dp_accounting

    if accountant == "rdp":
        relation = (
            dp_accounting.NeighboringRelation.REPLACE_ONE
            if sampling == "uniform"
            else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        return lambda: dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    return lambda: dp_accounting.pld.PLDAccountant()


def _check_accounting_args(sampling_rate, rounds, delta, accountant, sampling, num_clients):
    if not isinstance(sampling_rate, (int, float)) or not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate: need a fraction in (0, 1], got {sampling_rate!r}.")
    if not isinstance(rounds, (int, np.integer)) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds: need a whole number >= 1, got {rounds!r}.")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta: need a probability in (0, 1), e.g. 1e-5, got {delta!r}.")
    if accountant not in _ACCOUNTANTS + ("best",):
        raise ValueError(f"accountant: expected 'rdp', 'pld' or 'best', got {accountant!r}.")
    if sampling not in _SAMPLINGS:
        raise ValueError(f"sampling: expected 'poisson' or 'uniform', got {sampling!r}.")
    if sampling == "uniform":
        if accountant == "pld":
            raise ValueError(
                "accountant: sampling='uniform' (fixed-size cohorts without replacement) is "
                "accounted only by accountant='rdp' (replace-one neighbours)."
            )
        if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(
                "num_clients: sampling='uniform' needs the population size (a whole number "
                f">= 1), got {num_clients!r}."
            )
        if int(round(sampling_rate * num_clients)) < 1:
            raise ValueError(
                f"sampling_rate: sampling_rate * num_clients must round to >= 1 client, got "
                f"{sampling_rate} * {num_clients}."
            )


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    *,
    accountant: str = "best",
    sampling: str = "poisson",
    num_clients: int | None = None,
) -> float:
    """The ``ε`` of ``(ε, δ)``-DP spent by ``rounds`` rounds of DP-FedAvg (user level).

    Each round is a sampled Gaussian mechanism of noise multiplier ``z`` over clients:
    ``sampling="poisson"`` (each client joins with probability ``q = sampling_rate``,
    add-or-remove-one neighbours; McMahan et al. 2018) or ``"uniform"`` (a fixed cohort of
    ``round(q N)`` of ``N = num_clients`` clients without replacement, replace-one neighbours,
    RDP only; replacing one client moves the clipped sum by up to ``2C``, so the accountant is
    given ``z / 2``). The rounds compose (``SelfComposedDpEvent``) under the RDP or PLD accountant,
    or, with ``accountant="best"`` (the default), under each accountant that applies (both for
    Poisson sampling, RDP alone for ``"uniform"``), keeping the smallest ``ε`` (each is a valid
    bound; PLD is usually the tighter, e.g. ``z = 0.5``, ``q = 0.2``, 300 rounds, ``δ = 1e-3``:
    RDP 203, PLD 96).

    Args:
      noise_multiplier: ``z > 0`` (``0`` gives ``inf``).
      sampling_rate: ``q`` in ``(0, 1]``.
      rounds: number of rounds ``>= 1``.
      delta: target ``δ`` in ``(0, 1)``.
      accountant: ``"rdp"`` (Mironov 2017), ``"pld"`` (privacy loss distributions, usually
        tighter) or ``"best"`` (the smaller of those that apply).
      sampling: ``"poisson"`` or ``"uniform"``.
      num_clients: population size, needed for ``sampling="uniform"``.

    Returns:
      ``ε`` as a float.

    References:
      McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018;
      Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
      2019.

    Example:
      >>> round(epsilon(1.0, 0.01, 1000, 1e-5, accountant="rdp"), 2)
      2.1
      >>> round(epsilon(1.0, 0.01, 100, 1e-5), 2)  # PLD: 0.72 < RDP: 1.21
      0.72
    """
    return best_epsilon(noise_multiplier, sampling_rate, rounds, delta, accountant=accountant,
                        sampling=sampling, num_clients=num_clients)[0]


def best_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    *,
    accountant: str = "best",
    sampling: str = "poisson",
    num_clients: int | None = None,
) -> tuple[float, str]:
    """:func:`epsilon` and the name of the accountant that gave it (``"rdp"`` or ``"pld"``).

    With ``accountant="best"``: the smallest ``ε`` over the accountants that apply to
    ``sampling`` (PLD does not account for ``"uniform"``), and which one it was.

    Example:
      >>> eps, name = best_epsilon(1.0, 0.01, 100, 1e-5)
      >>> round(eps, 2), name
      (0.72, 'pld')
      >>> best_epsilon(1.0, 0.02, 100, 1e-5, sampling="uniform", num_clients=1000)[1]
      'rdp'
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_accounting_args(sampling_rate, rounds, delta, accountant, sampling, num_clients)
    if accountant == "best":
        names = ("rdp",) if sampling == "uniform" else ("rdp", "pld")
    else:
        names = (accountant,)
    if noise_multiplier == 0:
        return math.inf, names[0]
    found = []
    for name in names:
        acc = _make_accountant(name, sampling)()
        acc.compose(_dp_event(noise_multiplier, sampling_rate, rounds, sampling, num_clients))
        found.append((float(acc.get_epsilon(delta)), name))
    return min(found)


def noise_multiplier_for(
    target_epsilon: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    *,
    accountant: str = "rdp",
    sampling: str = "poisson",
    num_clients: int | None = None,
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier ``z`` whose :func:`epsilon` is at most ``target_epsilon``.

    Found with ``dp_accounting.calibrate_dp_mechanism`` (Brent's method on ``z``), to within
    ``tol``; the arguments mean what they mean in :func:`epsilon`.

    Returns:
      ``z`` as a float (``epsilon(z, ...) <= target_epsilon``).

    Example:
      >>> z = noise_multiplier_for(2.0, 0.01, 1000, 1e-5)
      >>> round(z, 2), epsilon(z, 0.01, 1000, 1e-5) <= 2.0
      (1.02, True)
    """
    _check_positive("target_epsilon", target_epsilon)
    if accountant == "best":
        raise ValueError("accountant: noise_multiplier_for calibrates one accountant; give "
                         "'rdp' or 'pld'.")
    _check_accounting_args(sampling_rate, rounds, delta, accountant, sampling, num_clients)
    make = _make_accountant(accountant, sampling)
    import dp_accounting

    def event(z):
        return _dp_event(z, sampling_rate, rounds, sampling, num_clients)

    if accountant == "rdp":
        bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    else:
        # PLD is slow (and huge) for tiny noise: bracket it with the RDP answer, which is an
        # upper bound (PLD accounting is tighter), halving the lower end until it is too noisy.
        upper = noise_multiplier_for(
            target_epsilon, sampling_rate, rounds, delta, accountant="rdp",
            sampling=sampling, num_clients=num_clients, tol=tol,
        )
        lower = 0.5 * upper
        while lower > 1e-2 and epsilon(
            lower, sampling_rate, rounds, delta, accountant="pld", sampling=sampling,
            num_clients=num_clients,
        ) <= target_epsilon:
            upper, lower = lower, 0.5 * lower
        bracket = dp_accounting.ExplicitBracketInterval(lower, upper)
    z = dp_accounting.calibrate_dp_mechanism(
        make, event, target_epsilon, delta, bracket_interval=bracket, tol=tol
    )
    return float(z)
