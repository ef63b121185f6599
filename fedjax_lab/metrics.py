"""Per-client evaluation in one compiled program, the distribution view of fairness, and
error bars over seeds (:func:`mean_ci95`: mean ± the Student-t 95% confidence interval).

A backdoor's attack success rate (:func:`backdoor_metrics`) is one more pair of sums of the
evaluation: wherever an evaluation's sums hold ``backdoor_hits`` and ``backdoor_count``
(:func:`evaluate`, the in-run evaluation of :func:`fedjax_lab.run_rounds` as
``eval_attack_success_rate``) the rate ``attack_success_rate = Σ hits / Σ count`` comes with
them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab._types import Batch, Params
from fedjax_lab.data._federated import FederatedData
from fedjax_lab.models._core import check_data

__all__ = ["backdoor_metrics", "evaluate", "mean_ci95", "summarize"]

EvalFn = Callable[[Params, Batch], dict[str, jax.Array]]


@functools.partial(jax.jit, static_argnames=("eval_fn", "num_clients"))
def _per_client_sums(eval_fn, params, batches, owners, *, num_clients):
    """Scans ``[K, B]`` batches; per-example sums are added into their client's slot."""

    def per_example(x):
        one = jax.tree.map(lambda a: a[None], x)  # a batch of one example
        return eval_fn(params, one)

    def body(acc, xs):
        batch, owner = xs
        sums = jax.vmap(per_example)(batch)
        acc = {
            k: acc[k] + jax.ops.segment_sum(v, owner, num_segments=num_clients + 1)
            for k, v in sums.items()
        }
        return acc, None

    first = jax.tree.map(lambda a: a[0, :1], batches)
    shapes = jax.eval_shape(eval_fn, params, first)
    zeros = {k: jnp.zeros((num_clients + 1,), s.dtype) for k, s in shapes.items()}
    acc, _ = jax.lax.scan(body, zeros, (batches, owners))
    return {k: v[:num_clients] for k, v in acc.items()}  # slot num_clients holds the padding


def evaluate(
    eval_fn: EvalFn,
    params: Params,
    data: FederatedData,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Loss and accuracy of ``params`` on every client of ``data``, in one compiled program.

    ``data`` is first checked on the host against what ``eval_fn`` declares
    (:func:`fedjax_lab.models.check_data`: keys, example shape, labels in range), so bad data
    raises ``ValueError`` before anything compiles; the check is cached per dataset.

    The examples are scanned in batches of ``batch_size`` (memory stays bounded whatever the
    population); each example's sums (``eval_fn`` on a batch of one, vmapped over the batch)
    are added into its client's slot with a segment sum.

    Args:
      eval_fn: ``eval_fn(params, batch) -> dict`` of SUMS over the batch's real examples with
        ``loss_sum``, ``num_correct`` and ``num_examples`` (e.g.
        ``fl.models.classification_metrics(model)``).
      params: the model parameters.
      data: the clients to evaluate.
      batch_size: examples per scanned batch, ``>= 1``.

    Returns:
      The dict of :func:`summarize`: per-client NumPy arrays ``client_loss``,
      ``client_accuracy``, ``client_num_examples`` (``[num_clients]``) and floats ``loss`` and
      ``accuracy`` (example-weighted over all examples), ``accuracy_client_mean`` (each client
      counts once), ``accuracy_p10/p50/p90`` and ``accuracy_std`` over clients.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, fedjax_lab as fl
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> data = fl.FederatedData.from_client_arrays([
      ...     {"x": np.ones((3, 2), "f4"), "y": np.zeros(3, "i4")},
      ...     {"x": -np.ones((2, 2), "f4"), "y": np.ones(2, "i4")}])
      >>> params = model.init(jax.random.key(0))
      >>> out = fl.evaluate(fl.models.classification_metrics(model), params, data)
      >>> out["client_num_examples"].tolist()
      [3.0, 2.0]
    """
    if not isinstance(data, FederatedData):
        raise TypeError(f"data: expected a fl.FederatedData, got {type(data).__name__}.")
    if (
        isinstance(batch_size, (bool, np.bool_))
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            f"batch_size: need a whole number >= 1 (an int, not a bool), got {batch_size!r}."
        )
    n, c = data.num_examples, data.num_clients
    if n == 0:
        raise ValueError("data: holds no examples; nothing to evaluate.")
    check_data(eval_fn, data)
    k = -(-n // batch_size)
    pad = k * batch_size - n
    owners = np.repeat(np.arange(c), data.client_sizes)
    owners = np.concatenate([owners, np.full(pad, c)]).reshape(k, batch_size).astype(np.int32)
    batches = {}
    for name, v in data.examples.items():
        v = np.asarray(v)
        v = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
        batches[name] = v.reshape((k, batch_size) + v.shape[1:])
    batches["mask"] = (np.arange(k * batch_size) < n).astype(np.float32).reshape(k, batch_size)
    sums = _per_client_sums(eval_fn, params, batches, owners, num_clients=c)
    sums = {name: np.asarray(v) for name, v in sums.items()}
    return summarize(sums)


def backdoor_metrics(
    model: Any,
    target_label: int,
    trigger: Callable[[jax.Array], jax.Array] | None = None,
    *,
    feature_key: str = "x",
    label_key: str = "y",
) -> EvalFn:
    """Classification sums plus a backdoor's attack success rate (ASR), in one ``eval_fn``.

    On top of :func:`fedjax_lab.models.classification_metrics` (on the clean inputs), over the
    batch's real examples whose label is NOT ``target_label``:
    ``backdoor_count`` = how many there are, ``backdoor_hits`` = how many the model classifies
    as ``target_label`` once ``trigger`` is stamped on them. ``attack_success_rate =
    Σ hits / Σ count`` (:func:`summarize` and the in-run evaluation add it).

    Args:
      model: a classifier (:class:`fedjax_lab.models.Model`: ``apply(params, x, train=False)``
        gives logits ``[B, num_classes]``).
      target_label: the backdoor's target class (as in :func:`fedjax_lab.attacks.backdoor`).
      trigger: ``trigger(x) -> x`` on one example, the attack's; ``None``:
        :func:`fedjax_lab.attacks.pixel_patch` ``()`` (the attack's default).
      feature_key, label_key: the batch entries of the inputs and labels.

    Returns:
      ``eval_fn(params, batch) -> {"loss_sum", "num_correct", "num_examples",
      "backdoor_hits", "backdoor_count"}`` (f32 sums).

    References:
      Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, fedjax_lab as fl
      >>> model = fl.models.logistic_regression((2,), 2)
      >>> params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0)))
      >>> data = fl.FederatedData.from_client_arrays([
      ...     {"x": np.zeros((3, 2), "f4"), "y": np.array([0, 1, 1], "i4")}])
      >>> out = fl.evaluate(backdoor_metrics(model, target_label=0), params, data)
      >>> out["attack_success_rate"]   # zero logits: argmax is class 0 = the target
      1.0
    """
    from fedjax_lab.attacks import pixel_patch
    from fedjax_lab.models import classification_metrics

    if not isinstance(target_label, (int, np.integer)) or isinstance(target_label, bool) or (
        target_label < 0
    ):
        raise ValueError(f"target_label: need a class index >= 0, got {target_label!r}.")
    trigger = pixel_patch() if trigger is None else trigger
    if not callable(trigger):
        raise TypeError(f"trigger: expected trigger(x) -> x on one example, got {trigger!r}.")
    clean = classification_metrics(model)

    def eval_fn(params: Params, batch: Batch) -> dict[str, jax.Array]:
        out = dict(clean(params, batch))
        y = batch[label_key]
        w = batch["mask"].astype(jnp.float32) * (y != target_label).astype(jnp.float32)
        logits = model.apply(params, jax.vmap(trigger)(batch[feature_key]), train=False)
        hit = (jnp.argmax(logits, axis=-1) == target_label).astype(jnp.float32)
        out["backdoor_hits"] = jnp.sum(hit * w)
        out["backdoor_count"] = jnp.sum(w)
        return out

    if hasattr(clean, "check_data"):
        eval_fn.check_data = clean.check_data
    return eval_fn


def summarize(sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-client means and the distribution of per-client accuracy from per-client SUMS.

    Clients with no real examples are left out of the client statistics.

    Example:
      >>> import numpy as np
      >>> s = summarize({"loss_sum": np.array([1.0, 3.0]), "num_correct": np.array([1.0, 1.0]),
      ...                "num_examples": np.array([1.0, 3.0])})
      >>> round(s["accuracy"], 2), round(s["accuracy_client_mean"], 3)
      (0.5, 0.667)
    """
    count = np.asarray(sums["num_examples"], np.float64)
    has = count > 0
    safe = np.where(has, count, 1.0)
    out: dict[str, Any] = {"client_num_examples": count, "num_examples": float(count.sum())}
    total = max(float(count.sum()), 1.0)
    if "loss_sum" in sums:
        out["client_loss"] = np.asarray(sums["loss_sum"]) / safe
        out["loss"] = float(np.sum(sums["loss_sum"]) / total)
    if "num_correct" in sums:
        acc = np.asarray(sums["num_correct"]) / safe
        out["client_accuracy"] = acc
        real = acc[has]
        out["accuracy"] = float(np.sum(sums["num_correct"]) / total)
        out["accuracy_client_mean"] = float(real.mean()) if real.size else float("nan")
        out["accuracy_std"] = float(real.std()) if real.size else float("nan")
        for q in (10, 50, 90):
            out[f"accuracy_p{q}"] = float(np.percentile(real, q)) if real.size else float("nan")
    if "backdoor_hits" in sums and "backdoor_count" in sums:
        count = float(np.sum(sums["backdoor_count"]))
        hits = float(np.sum(sums["backdoor_hits"]))
        out["attack_success_rate"] = hits / count if count > 0 else float("nan")
    return out


def mean_ci95(values: Any) -> dict[str, Any]:
    """Mean and 95% confidence half-width of independent runs (e.g. one a seed).

    The half-width is Student's ``t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof=1``): the interval ``mean ± ci95`` covers the true mean of the runs'
    distribution 95% of the time when the runs are independent and roughly normal. With one
    value there is no interval (``ci95`` is ``None``). ``None`` and non-finite values (a run in
    which no client trained) are left out of ``mean`` and ``ci95`` and kept in ``per_seed``.

    Args:
      values: one number per run (a sequence; ``None`` allowed).

    Returns:
      ``{"mean": float | None, "ci95": float | None, "n": int, "per_seed": [values]}`` where
      ``n`` counts the finite values.

    Example:
      >>> r = mean_ci95([0.80, 0.82, 0.84])
      >>> round(r["mean"], 4), round(r["ci95"], 4), r["n"]  # t_{0.975,2} = 4.3027
      (0.82, 0.0497, 3)
      >>> mean_ci95([0.5])["ci95"] is None
      True
    """
    from scipy import stats

    per_seed = [None if v is None else float(v) for v in values]
    if not per_seed:
        raise ValueError("values: need at least one value (one per seed).")
    finite = np.asarray([v for v in per_seed if v is not None and np.isfinite(v)], np.float64)
    n = int(finite.size)
    mean = float(finite.mean()) if n else None
    ci95 = None
    if n > 1:
        ci95 = float(stats.t.ppf(0.975, n - 1) * finite.std(ddof=1) / np.sqrt(n))
    return {"mean": mean, "ci95": ci95, "n": n, "per_seed": per_seed}
