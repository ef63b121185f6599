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
    "clip_per_layer",
    "dp_aggregator",
    "epsilon",
    "gaussian_sum_noise",
    "layer_clip_norms",
    "noise_multiplier_for",
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
    if accountant not in _ACCOUNTANTS:
        raise ValueError(f"accountant: expected 'rdp' or 'pld', got {accountant!r}.")
    if sampling not in _SAMPLINGS:
        raise ValueError(f"sampling: expected 'poisson' or 'uniform', got {sampling!r}.")
    if sampling == "uniform":
        if accountant != "rdp":
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
    accountant: str = "rdp",
    sampling: str = "poisson",
    num_clients: int | None = None,
) -> float:
    """The ``ε`` of ``(ε, δ)``-DP spent by ``rounds`` rounds of DP-FedAvg (user level).

    Each round is a sampled Gaussian mechanism of noise multiplier ``z`` over clients:
    ``sampling="poisson"`` (each client joins with probability ``q = sampling_rate``,
    add-or-remove-one neighbours; McMahan et al. 2018) or ``"uniform"`` (a fixed cohort of
    ``round(q N)`` of ``N = num_clients`` clients without replacement, replace-one neighbours,
    RDP only; replacing one client moves the clipped sum by up to ``2C``, so the accountant is
    given ``z / 2``). The rounds compose (``SelfComposedDpEvent``) under the RDP or PLD accountant.

    Args:
      noise_multiplier: ``z > 0`` (``0`` gives ``inf``).
      sampling_rate: ``q`` in ``(0, 1]``.
      rounds: number of rounds ``>= 1``.
      delta: target ``δ`` in ``(0, 1)``.
      accountant: ``"rdp"`` (Mironov 2017) or ``"pld"`` (privacy loss distributions, tighter).
      sampling: ``"poisson"`` or ``"uniform"``.
      num_clients: population size, needed for ``sampling="uniform"``.

    Returns:
      ``ε`` as a float.

    References:
      McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018;
      Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
      2019.

    Example:
      >>> round(epsilon(1.0, 0.01, 1000, 1e-5), 2)
      2.1
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_accounting_args(sampling_rate, rounds, delta, accountant, sampling, num_clients)
    if noise_multiplier == 0:
        return math.inf
    acc = _make_accountant(accountant, sampling)()
    acc.compose(_dp_event(noise_multiplier, sampling_rate, rounds, sampling, num_clients))
    return float(acc.get_epsilon(delta))


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
