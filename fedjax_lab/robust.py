"""Byzantine-robust aggregators: rules that need every client's update at once.

Each is an :class:`~fedjax_lab.Aggregator` with ``reduce="stack"``: ``prepare`` passes the update
and its weight through, the client map stacks them ``[C, ...]`` and ``finalize`` applies the rule.
A client of weight 0 (a padding slot, a dropped or unavailable client) is masked out: the result
is exactly the result without it. When no client has positive weight the aggregate is zeros and
the total weight 0 (the round is skipped). Unless said otherwise the rules treat every counted
client alike (weights only mask); ``total_weight`` is the sum of the counted weights.

=========================  ======================================================================
:func:`coordinate_median`  per-coordinate median (Yin et al. 2018)
:func:`trimmed_mean`       per-coordinate mean without ``trim_fraction`` at each end
:func:`krum`               the update closest to its ``n - f - 2`` neighbours (Blanchard 2017);
                           Multi-Krum averages the ``m`` best
:func:`geometric_median`   smoothed Weiszfeld iterations, weighted (RFA, Pillutla et al. 2022)
:func:`centered_clipping`  clip around the last aggregate and re-centre (Karimireddy et al. 2021)
:func:`bulyan`             ``n - 2f`` updates chosen by iterated Krum, then per coordinate the mean
                           of the ``n - 4f`` closest to their median (El Mhamdi et al. 2018)
:func:`fltrust`            each update rescaled to the norm of a server update on clean root
                           data, weighted by ReLU(cosine) with it (Cao et al. 2021); its root
                           data: :func:`fltrust_root_batches`, its update
                           :func:`fltrust_root_update`
=========================  ======================================================================

FLTrust needs the server's own update at the round's current params: it computes it in the
aggregator's ``refresh`` (:attr:`fedjax_lab.Aggregator.refresh`, called by the round once,
before the client map, with the server params) and keeps it as its state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab._types import Aggregator, Batch, LossFn, Params, PRNGKey, PyTree

__all__ = [
    "bulyan",
    "centered_clipping",
    "coordinate_median",
    "fltrust",
    "fltrust_root_batches",
    "fltrust_root_update",
    "geometric_median",
    "krum",
    "multi_krum",
    "trimmed_mean",
]


def _prepare(update: PyTree, weight: jax.Array, state: PyTree):
    del state
    return update, jnp.asarray(weight, jnp.float32)


def _no_state(params: PyTree) -> tuple:
    del params
    return ()


def _mask_of(weights: jax.Array) -> jax.Array:
    return weights > 0


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0], -1))


def _sorted_valid(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Sorts ``[C, D]`` along clients with the masked-out clients moved to the end (+inf)."""
    return jnp.sort(jnp.where(mask[:, None], x, jnp.inf), axis=0)


def _pick(sorted_x: jax.Array, index: jax.Array) -> jax.Array:
    index = jnp.clip(index, 0, sorted_x.shape[0] - 1)
    return jax.lax.dynamic_index_in_dim(sorted_x, index, axis=0, keepdims=False)


def coordinate_median() -> Aggregator:
    """The coordinate-wise median of the counted clients' updates.

    ``aggregate[j] = median_{i : w_i > 0} u_i[j]`` (the mean of the two middle values for an
    even count).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="stack"``.

    References:
      Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
      Statistical Rates", ICML 2018.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = coordinate_median()
      >>> stacked = ({"w": jnp.array([[1.0], [9.0], [2.0], [5.0]])}, jnp.array([1., 1., 1., 0.]))
      >>> float(agg.finalize(stacked, (), jax.random.key(0))[0]["w"][0])
      2.0
    """

    def finalize(contributions, state, key: PRNGKey):
        del key
        updates, weights = contributions
        mask = _mask_of(weights)
        k = jnp.sum(mask.astype(jnp.int32))

        def median(x):
            s = _sorted_valid(_flat(x), mask)
            mid = 0.5 * (_pick(s, (k - 1) // 2) + _pick(s, k // 2))
            return jnp.where(k > 0, mid, 0.0).reshape(x.shape[1:]).astype(x.dtype)

        return jax.tree.map(median, updates), jnp.sum(weights * mask), state

    return Aggregator(_no_state, _prepare, finalize, reduce="stack")


def trimmed_mean(trim_fraction: float = 0.1) -> Aggregator:
    """The coordinate-wise ``β``-trimmed mean of the counted clients' updates.

    With ``k`` counted clients and ``t = floor(β k)``, each coordinate drops its ``t``
    smallest and ``t`` largest values and averages the ``k - 2t`` left.

    Args:
      trim_fraction: ``β``, the fraction trimmed at EACH end, ``0 <= β < 0.5`` (0 gives the
        plain mean).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="stack"``.

    References:
      Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
      Statistical Rates", ICML 2018.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = trimmed_mean(trim_fraction=0.25)
      >>> stacked = ({"w": jnp.array([[1.0], [100.0], [2.0], [3.0]])}, jnp.ones(4))
      >>> float(agg.finalize(stacked, (), jax.random.key(0))[0]["w"][0])
      2.5
    """
    if not isinstance(trim_fraction, (int, float)) or not 0.0 <= trim_fraction < 0.5:
        raise ValueError(
            f"trim_fraction: the fraction trimmed at each end must lie in [0, 0.5), "
            f"got {trim_fraction}."
        )
    beta = trim_fraction

    def finalize(contributions, state, key: PRNGKey):
        del key
        updates, weights = contributions
        mask = _mask_of(weights)
        k = jnp.sum(mask.astype(jnp.int32))
        t = jnp.floor(beta * k.astype(jnp.float32)).astype(jnp.int32)
        c = weights.shape[0]
        rank = jnp.arange(c)
        keep = ((rank >= t) & (rank < k - t)).astype(jnp.float32)
        kept = jnp.maximum(jnp.sum(keep), 1.0)

        def tmean(x):
            s = _sorted_valid(_flat(x).astype(jnp.float32), mask)
            s = jnp.where(keep[:, None] > 0, s, 0.0)
            return (jnp.sum(s, axis=0) / kept).reshape(x.shape[1:]).astype(x.dtype)

        return jax.tree.map(tmean, updates), jnp.sum(weights * mask), state

    return Aggregator(_no_state, _prepare, finalize, reduce="stack")


def _pairwise_sq_dists(updates: PyTree) -> jax.Array:
    """``D[i, j] = ||u_i - u_j||²`` over all leaves together."""
    total = 0.0
    for x in jax.tree.leaves(updates):
        f = _flat(x).astype(jnp.float32)
        sq = jnp.sum(f * f, axis=1)
        total = total + sq[:, None] + sq[None, :] - 2.0 * (f @ f.T)
    return jnp.maximum(total, 0.0)


def multi_krum(f: int = 1, m: int | None = None) -> Aggregator:
    """Multi-Krum: the mean of the ``m`` updates with the lowest Krum scores (``m=1``: Krum).

    With ``k`` counted clients, client i's score is the sum of squared distances to its
    ``max(k - f - 2, 1)`` nearest other counted clients; the ``min(m, k)`` lowest-scoring
    updates are averaged (uniformly).

    Args:
      f: the number of Byzantine clients tolerated, ``>= 0``.
      m: how many updates to average, ``>= 1``; ``None`` means ``1`` (Krum).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="stack"``.

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
      Tolerant Gradient Descent", NeurIPS 2017.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = multi_krum(f=1, m=2)
      >>> u = {"w": jnp.array([[0.0], [0.1], [0.2], [50.0]])}
      >>> round(float(agg.finalize((u, jnp.ones(4)), (), jax.random.key(0))[0]["w"][0]), 3)
      0.05
    """
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ValueError(f"f: the number of Byzantine clients must be an int >= 0, got {f!r}.")
    m = 1 if m is None else m
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m: the number of updates averaged must be an int >= 1, got {m!r}.")

    def finalize(contributions, state, key: PRNGKey):
        del key
        updates, weights = contributions
        mask = _mask_of(weights)
        c = weights.shape[0]
        k = jnp.sum(mask.astype(jnp.int32))
        d = _pairwise_sq_dists(updates)
        valid_pair = mask[None, :] & ~jnp.eye(c, dtype=bool)
        d = jnp.where(valid_pair, d, jnp.inf)
        nearest = jnp.sort(d, axis=1)
        num_neighbors = jnp.maximum(k - f - 2, 1)
        take = jnp.arange(c)[None, :] < num_neighbors
        scores = jnp.sum(jnp.where(take & jnp.isfinite(nearest), nearest, 0.0), axis=1)
        scores = jnp.where(mask, scores, jnp.inf)
        order = jnp.argsort(scores)
        rank = jnp.zeros((c,), jnp.int32).at[order].set(jnp.arange(c, dtype=jnp.int32))
        selected = (mask & (rank < jnp.minimum(m, k))).astype(jnp.float32)
        count = jnp.maximum(jnp.sum(selected), 1.0)

        def mean(x):
            sel = selected.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            return jnp.sum(sel * x, axis=0) / count.astype(x.dtype)

        return jax.tree.map(mean, updates), jnp.sum(weights * mask), state

    return Aggregator(_no_state, _prepare, finalize, reduce="stack")


def krum(f: int = 1) -> Aggregator:
    """Krum: the single update with the lowest Krum score; :func:`multi_krum` with ``m=1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u = {"w": jnp.array([[0.0], [0.1], [0.2], [0.3], [50.0]])}
      >>> round(float(krum(f=1).finalize((u, jnp.ones(5)), (), jax.random.key(0))[0]["w"][0]), 3)
      0.1
    """
    return multi_krum(f, 1)


def _weighted_average(updates: PyTree, alpha: jax.Array) -> PyTree:
    total = jnp.sum(alpha)
    safe = jnp.where(total > 0, total, 1.0)

    def avg(x):
        a = alpha.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
        return (jnp.sum(a * x.astype(jnp.float32), axis=0) / safe).astype(x.dtype)

    return jax.tree.map(avg, updates)


def _distances(updates: PyTree, center: PyTree) -> jax.Array:
    sq = 0.0
    for x, z in zip(jax.tree.leaves(updates), jax.tree.leaves(center), strict=True):
        diff = _flat(x).astype(jnp.float32) - z.reshape((1, -1)).astype(jnp.float32)
        sq = sq + jnp.sum(diff * diff, axis=1)
    return jnp.sqrt(sq)


def geometric_median(iters: int = 10, nu: float = 1e-6) -> Aggregator:
    """The weighted geometric median by ``iters`` smoothed Weiszfeld steps (RFA).

    ``z_0 = Σ w_i u_i / Σ w_i``;
    ``z_{s+1} = Σ β_i u_i / Σ β_i`` with ``β_i = w_i / max(nu, ||z_s - u_i||)``: a fixed number
    of steps (one compiled loop) approximating ``argmin_z Σ w_i ||z - u_i||``.

    Args:
      iters: Weiszfeld iterations, ``>= 0`` (0 gives the weighted mean).
      nu: smoothing ``> 0`` (guards against dividing by a zero distance).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="stack"``.

    References:
      Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u = {"w": jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])}
      >>> z = geometric_median(iters=50).finalize((u, jnp.ones(4)), (), jax.random.key(0))[0]
      >>> [round(v, 2) for v in z["w"].tolist()]   # the mean would be [25.25, 25.25]
      [0.5, 0.5]
    """
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters: need a whole number of Weiszfeld iterations >= 0, got {iters!r}.")
    if not nu > 0:
        raise ValueError(f"nu: the smoothing must be > 0, got {nu!r}.")

    def finalize(contributions, state, key: PRNGKey):
        del key
        updates, weights = contributions
        w = jnp.where(_mask_of(weights), weights, 0.0)

        def step(_, z):
            beta = w / jnp.maximum(nu, _distances(updates, z))
            return _weighted_average(updates, beta)

        z = jax.lax.fori_loop(0, iters, step, _weighted_average(updates, w))
        return z, jnp.sum(w), state

    return Aggregator(_no_state, _prepare, finalize, reduce="stack")


def centered_clipping(tau: float = 1.0, iters: int = 1) -> Aggregator:
    """Centred clipping: clip every update around the last aggregate, then average.

    ``v_0`` = the previous round's aggregate (zeros at first, kept in the aggregator state);
    ``v_{l+1} = v_l + (1/k) Σ_{i counted} (u_i - v_l) min(1, tau / ||u_i - v_l||)``, for
    ``l < iters``; the aggregate and the new state are ``v_iters``.

    Args:
      tau: clipping radius ``> 0``.
      iters: clipping iterations, ``>= 1`` (the paper finds 1 enough with momentum).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="stack"`` whose state is the last
      aggregate (a pytree like the params).

    References:
      Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
      ICML 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = centered_clipping(tau=1.0, iters=3)
      >>> state = agg.init({"w": jnp.zeros(1)})
      >>> u = {"w": jnp.array([[0.5], [0.7], [1000.0]])}
      >>> v, total, state = agg.finalize((u, jnp.ones(3)), state, jax.random.key(0))
      >>> bool(v["w"][0] < 2.0), bool(jnp.all(state["w"] == v["w"]))
      (True, True)
    """
    if not tau > 0:
        raise ValueError(f"tau: the clipping radius must be > 0, got {tau!r}.")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters: need a whole number >= 1, got {iters!r}.")

    def init(params: PyTree) -> PyTree:
        return optax.tree.zeros_like(params)

    def finalize(contributions, state, key: PRNGKey):
        del key
        updates, weights = contributions
        mask = _mask_of(weights).astype(jnp.float32)
        k = jnp.sum(mask)

        def step(_, v):
            dist = _distances(updates, v)
            scale = mask * jnp.minimum(1.0, tau / jnp.where(dist > 0, dist, 1.0))

            def move(x, c):
                s = scale.reshape((-1,) + (1,) * (x.ndim - 1))
                diff = x.astype(jnp.float32) - c[None].astype(jnp.float32)
                mean = jnp.sum(s * diff, axis=0) / jnp.maximum(k, 1.0)
                return (c + mean).astype(c.dtype)

            return jax.tree.map(move, updates, v)

        v = jax.lax.fori_loop(0, iters, step, state)
        v = optax.tree.where(k > 0, v, state)
        return v, jnp.sum(weights * (mask > 0)), v

    return Aggregator(init, _prepare, finalize, reduce="stack")


def _check_f(f) -> None:
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ValueError(f"f: the number of Byzantine clients must be an int >= 0, got {f!r}.")


def bulyan(f: int = 1) -> Aggregator:
    """Bulyan: iterated Krum selects ``θ = n - 2f`` updates, then a coordinate-wise trimmed mean.

    With ``n`` counted clients (weight > 0):

    1. Selection: ``θ = n - 2f`` times, apply Krum to the updates not selected yet (``R``,
       score = the sum of squared distances to the ``max(|R| - f - 2, 1)`` nearest others of
       ``R``) and move the lowest-scoring one (the first on ties) into the selection ``S``.
    2. Aggregation: per coordinate ``j``, with ``m_j`` the median of ``{u_j : u in S}``, the
       mean of the ``β = θ - 2f`` values of ``S`` closest to ``m_j``.

    The paper's guarantee needs ``n >= 4f + 3``: a cohort of fewer slots (``C``, static) is
    refused when the round is traced. Under padding or dropped clients the count ``n`` is the
    round's counted clients (traced); the rule then uses ``θ = max(n - 2f, 1)`` and
    ``β = max(θ - 2f, 1)`` (so it still gives an aggregate when ``n < 4f + 3``, without the
    guarantee; with ``n = 1`` it is that update). Clients count alike (weights only mask).

    Args:
      f: the number of Byzantine clients tolerated, ``>= 0``.

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="stack"``.

    References:
      El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
      Byzantium", ICML 2018.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u = {"w": jnp.array([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [90.0]])}
      >>> round(float(bulyan(f=1).finalize((u, jnp.ones(7)), (), jax.random.key(0))[0]["w"][0]), 3)
      0.2
    """
    _check_f(f)

    def finalize(contributions, state, key: PRNGKey):
        del key
        updates, weights = contributions
        c = weights.shape[0]
        if c < 4 * f + 3:
            raise ValueError(
                f"f: Bulyan tolerates f Byzantine clients among n >= 4f + 3 = {4 * f + 3}; this "
                f"cohort has {c} slots. Use a cohort_size >= {4 * f + 3} or f <= {(c - 3) // 4}."
            )
        mask = _mask_of(weights)
        k = jnp.sum(mask.astype(jnp.int32))
        theta = jnp.maximum(k - 2 * f, 1)
        beta = jnp.maximum(theta - 2 * f, 1)
        d = _pairwise_sq_dists(updates)
        d = 0.5 * (d + d.T)  # exactly symmetric: a Krum tie (r - f - 2 = 1) breaks by index
        others = ~jnp.eye(c, dtype=bool)
        slots = jnp.arange(c)

        def select(i, carry):
            remaining, selected = carry
            r = jnp.sum(remaining.astype(jnp.int32))
            dd = jnp.where(remaining[None, :] & others, d, jnp.inf)
            nearest = jnp.sort(dd, axis=1)
            take = slots[None, :] < jnp.maximum(r - f - 2, 1)
            scores = jnp.sum(jnp.where(take & jnp.isfinite(nearest), nearest, 0.0), axis=1)
            best = jnp.argmin(jnp.where(remaining, scores, jnp.inf))
            pick = (slots == best) & remaining & (i < theta)
            return remaining & ~pick, selected | pick

        _, selected = jax.lax.fori_loop(0, c, select, (mask, jnp.zeros((c,), bool)))

        def coordinate(x):
            flat = _flat(x).astype(jnp.float32)
            s = _sorted_valid(flat, selected)
            med = 0.5 * (_pick(s, (theta - 1) // 2) + _pick(s, theta // 2))
            dist = jnp.where(selected[:, None], jnp.abs(flat - med[None]), jnp.inf)
            order = jnp.argsort(dist, axis=0, stable=True)
            closest = jnp.take_along_axis(flat, order, axis=0)
            keep = slots[:, None] < beta
            mean = jnp.sum(jnp.where(keep, closest, 0.0), axis=0) / beta.astype(jnp.float32)
            return jnp.where(k > 0, mean, 0.0).reshape(x.shape[1:]).astype(x.dtype)

        return jax.tree.map(coordinate, updates), jnp.sum(weights * mask), state

    return Aggregator(_no_state, _prepare, finalize, reduce="stack")


def _dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(
        (jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)),
        jnp.float32(0.0),
    )


def fltrust(root_update_fn: Callable[[Params, PRNGKey], PyTree]) -> Aggregator:
    """FLTrust: trust each update by its direction relative to a server update on clean data.

    Each round the server computes its own update ``g_0 = root_update_fn(params, key)`` at the
    round's current params (on its small clean root dataset: :func:`fltrust_root_update`);
    then for each counted client ``i`` (weight > 0)

    ``TS_i = ReLU(<g_i, g_0> / (||g_i|| ||g_0||))``, ``ḡ_i = (||g_0|| / ||g_i||) g_i``,
    ``aggregate = Σ_i TS_i ḡ_i / Σ_i TS_i``.

    The server update is computed in :attr:`~fedjax_lab.Aggregator.refresh` (the round calls it
    with the current params) and kept as the aggregator's state (a pytree like the params).
    The rule is streamed (``reduce="sum"``): ``prepare`` scores and rescales each update
    against ``g_0``. A zero update (or a zero ``g_0``) gets trust 0. When no client has
    positive trust the aggregate is zeros and the total weight 0 (the round is skipped);
    otherwise the total weight is the sum of the counted clients' weights.

    It needs the server's data: in Python, ``fl.algorithms.with_aggregator(alg,
    fl.robust.fltrust(fl.robust.fltrust_root_update(loss_fn, root_batches)))`` with, e.g.,
    ``root_batches = fl.robust.fltrust_root_batches(train_data, 100, 10)``; in a config, the
    table ``aggregator = {name = "fltrust", root_examples = 100, ...}`` builds exactly that
    from the training data (see :func:`fltrust_root_batches`).

    Args:
      root_update_fn: ``root_update_fn(params, key) -> update``, a tree like the params with
        the clients' sign convention (``params - trained params``).

    Returns:
      An :class:`~fedjax_lab.Aggregator` with ``reduce="sum"`` and a ``refresh``.

    References:
      Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
      Bootstrapping", NDSS 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> agg = fltrust(lambda params, key: {"w": jnp.array([1.0, 0.0])})
      >>> g0 = agg.refresh(agg.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)}, jax.random.key(0))
      >>> rows = [([3.0, 0.0], 1.0), ([-5.0, 1.0], 1.0), ([1.0, 1.0], 1.0)]
      >>> parts = [agg.prepare({"w": jnp.array(u)}, jnp.float32(w), g0) for u, w in rows]
      >>> summed = jax.tree.map(lambda *xs: sum(xs), *parts)
      >>> out, total, _ = agg.finalize(summed, g0, jax.random.key(0))
      >>> [round(v, 4) for v in out["w"].tolist()], float(total)  # the flipped one trusted 0
      ([0.8787, 0.2929], 3.0)
    """
    if not callable(root_update_fn):
        raise TypeError(
            "root_update_fn: expected root_update_fn(params, key) -> update (e.g. "
            f"fl.robust.fltrust_root_update(loss_fn, root_batches)), got "
            f"{type(root_update_fn).__name__}."
        )

    def init(params: PyTree) -> PyTree:
        return optax.tree.zeros_like(params)

    def refresh(state: PyTree, params: PyTree, key: PRNGKey) -> PyTree:
        del state
        g0 = root_update_fn(params, key)
        return jax.tree.map(lambda g, p: jnp.asarray(g).astype(p.dtype), g0, params)

    def prepare(update: PyTree, weight: jax.Array, g0: PyTree):
        weight = jnp.asarray(weight, jnp.float32)
        counted = weight > 0
        norm_i = jnp.sqrt(_dot(update, update))
        norm_0 = jnp.sqrt(_dot(g0, g0))
        ok = counted & (norm_i > 0) & (norm_0 > 0)
        safe = jnp.where(ok, norm_i * norm_0, 1.0)
        trust = jnp.where(ok, jax.nn.relu(_dot(update, g0) / safe), 0.0)
        factor = trust * norm_0 / jnp.where(ok, norm_i, 1.0)
        scaled = jax.tree.map(lambda u: factor * u.astype(jnp.float32), update)
        return scaled, trust, jnp.where(counted, weight, 0.0)

    def finalize(contributions, state, key: PRNGKey):
        del key
        total, trust, weight = contributions
        some = trust > 0
        safe = jnp.where(some, trust, 1.0)
        aggregate = jax.tree.map(
            lambda t, p: jnp.where(some, t / safe, 0.0).astype(p.dtype), total, state
        )
        return aggregate, jnp.where(some, weight, 0.0), state

    return Aggregator(init, prepare, finalize, reduce="sum", refresh=refresh)


def fltrust_root_update(
    loss_fn: LossFn, root_batches: Batch, learning_rate: float = 0.1
) -> Callable[[Params, PRNGKey], PyTree]:
    """The FLTrust server update: plain SGD over the root batches, as a client would train.

    ``p_0 = params``; ``p_{s+1} = p_s - lr ∇ loss_fn(p_s, batch_s, fold_in(key, s))`` for each
    of the ``S`` batches of ``root_batches`` (leaves ``[S, B, ...]``; a ``"mask"`` entry of
    ones is added when missing); the update is ``params - p_S``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar`` (e.g. ``fl.models.classification_loss``).
      root_batches: the server's root data as ``S`` batches (leading axes ``[S, B]``).
      learning_rate: the SGD step size ``> 0``.

    Returns:
      ``root_update_fn(params, key) -> update`` for :func:`fltrust`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, b, k: jnp.sum(b["mask"] * (p - b["x"]) ** 2) / jnp.sum(b["mask"])
      >>> fn = fltrust_root_update(loss, {"x": jnp.full((1, 2), 1.0)}, learning_rate=0.25)
      >>> float(fn(jnp.float32(0.0), jax.random.key(0)))   # one step: 0 - 0.25 * (-2)
      -0.5
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected loss_fn(params, batch, key), got {loss_fn!r}.")
    if not isinstance(root_batches, dict) or not root_batches:
        raise TypeError("root_batches: expected a dict of [S, B, ...] arrays (the root data).")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: must be > 0, got {learning_rate!r}.")
    batches = {k: jnp.asarray(v) for k, v in root_batches.items()}
    first = next(iter(batches.values()))
    if first.ndim < 2:
        raise ValueError(
            f"root_batches: leaves need leading axes [S, B], got shape {first.shape}."
        )
    if "mask" not in batches:
        batches["mask"] = jnp.ones(first.shape[:2], jnp.float32)

    def root_update_fn(params: Params, key: PRNGKey) -> PyTree:
        def step(p, xs):
            batch, s = xs
            g = jax.grad(loss_fn)(p, batch, jax.random.fold_in(key, s))
            return jax.tree.map(lambda a, b: a - learning_rate * b, p, g), None

        steps = jnp.arange(first.shape[0])
        trained, _ = jax.lax.scan(step, params, (batches, steps))
        return jax.tree.map(jnp.subtract, params, trained)

    return root_update_fn


def fltrust_root_batches(
    data, num_examples: int = 100, batch_size: int = 10, *, num_steps: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """FLTrust's root dataset: a fixed, seeded sample of the training examples, as batches.

    ``num_examples`` distinct examples are drawn uniformly, without replacement, from all the
    examples of ``data`` (the union of the clients' data: the FLTrust paper's root dataset, a
    small clean sample of the training distribution), with ``numpy.random.default_rng(seed)``.
    They are NOT held out: the clients keep training on their own copies, as in the paper's
    setting where the server collects its root data itself. The batches walk the sample in
    epochs, each a fresh permutation from the same generator, cut into ``num_steps`` batches
    of ``batch_size`` examples; ``num_steps=None`` is one pass (``ceil(num_examples /
    batch_size)`` batches, the last one's missing examples padding: ``mask`` 0). The batches
    are fixed for the run (the server trains on the same ones every round).

    Args:
      data: the training data (a :class:`~fedjax_lab.data.FederatedData`).
      num_examples: the root set's size ``>= 1`` (the paper: 100), at most the examples held.
      batch_size: examples a root step ``>= 1``.
      num_steps: root SGD steps ``>= 1`` (``None``: one pass over the root set).
      seed: the NumPy seed ``>= 0``.

    Returns:
      A dict of ``[S, B, ...]`` arrays, one per example key of ``data``, plus ``mask``
      ``f32[S, B]``: the ``root_batches`` of :func:`fltrust_root_update`.

    References:
      Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
      Bootstrapping", NDSS 2021 (Section 5: the root dataset sampled from the training data).

    Example:
      >>> import numpy as np, fedjax_lab as fl
      >>> data = fl.FederatedData.from_client_arrays(
      ...     [{"x": np.arange(4.0), "y": np.zeros(4, np.int32)}, {"x": np.arange(3.0),
      ...      "y": np.ones(3, np.int32)}])
      >>> root = fltrust_root_batches(data, 5, 2)
      >>> root["x"].shape, root["mask"].tolist()
      ((3, 2), [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
      >>> fltrust_root_batches(data, 5, 2, num_steps=4)["mask"].sum()  # two epochs, all real
      np.float32(8.0)
    """
    from fedjax_lab.data import _validate

    total = int(getattr(data, "num_examples", 0) or 0)
    if not hasattr(data, "examples") or total == 0:
        raise TypeError(
            "data: expected the training data (a fl.FederatedData holding examples), got "
            f"{type(data).__name__}."
        )
    n = _validate.check_count(num_examples, "num_examples")
    b = _validate.check_count(batch_size, "batch_size")
    if num_steps is not None:
        num_steps = _validate.check_count(num_steps, "num_steps")
    seed = _validate.check_count(seed, "seed", minimum=0)
    if n > total:
        raise ValueError(
            f"num_examples: the root set is drawn from the {total} training examples without "
            f"replacement; got {n}, use <= {total}."
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(total, size=n, replace=False)
    steps = -(-n // b) if num_steps is None else num_steps
    positions = steps * b
    if num_steps is None:
        order = chosen[rng.permutation(n)]
        real = np.arange(positions) < n
        order = np.concatenate([order, np.full(positions - n, order[0])])
    else:
        epochs = -(-positions // n)
        order = np.concatenate([chosen[rng.permutation(n)] for _ in range(epochs)])[:positions]
        real = np.ones(positions, bool)
    out = {k: np.asarray(v)[order].reshape((steps, b) + np.shape(v)[1:])
           for k, v in data.examples.items() if k != "mask"}
    out["mask"] = real.astype(np.float32).reshape(steps, b)
    return out
