"""Figures for papers: training curves, accuracy over rounds, per-client accuracy, sweeps.

Every ``*_figures``/``*_figure`` function builds :class:`matplotlib.figure.Figure` objects (Agg
canvas, no pyplot state, nothing shown) and the ``write_*`` functions save them as PNG. Titles
name the dataset, the partition and the cohort; legends carry each run's hyper-parameters.

``results`` is what ``fedjax-lab run`` collects per run label: ``{"summary": {...}, "history":
[row, ...], "client_accuracy": array}`` where each history row has ``round`` and
``train_loss`` and, every ``evaluation.every`` rounds, ``test_accuracy`` (pooled over all test
examples); ``summary`` has the final evaluation (``rounds``, ``test_accuracy``,
``client_accuracy_mean``). An optional ``"initial_eval"`` (the dict of
:func:`fedjax_lab.metrics.evaluate` on the initial parameters) adds the round-0 point.

A run of several seeds (``training.seeds > 1``) has ``history`` the mean over seeds, summary
metrics as ``{"mean", "ci95", ...}`` (:func:`fedjax_lab.metrics.mean_ci95`) and
``"seed_histories"`` (one history per seed): its curves are the mean with a shaded band, the
95% confidence interval over the seeds at each round (and ``initial_evals``, one a seed, give
the band at round 0).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "EXPERIMENT_PLOTS",
    "experiment_figures",
    "sweep_figure",
    "title_context",
    "write_experiment_plots",
    "write_sweep_plot",
]

EXPERIMENT_PLOTS = ("train_loss.png", "accuracy.png", "client_accuracy.png")
_SHORT = {"client_learning_rate": "η_c", "server_learning_rate": "η_s"}
_DPI = 110


def _figure(size: tuple[float, float] = (6.4, 4.2)) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def title_context(config: Mapping[str, Any]) -> str:
    """``"dataset · partition · cohort"`` of an experiment config, for titles.

    Example:
      >>> title_context({"data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5,
      ...                   "num_clients": 100}, "training": {"cohort_size": 10}})
      'digits · Dirichlet(α=0.5) · cohort 10 of 100 clients'
    """
    data = config.get("data", {})
    name = data.get("name", "?")
    if data.get("task"):
        name = f"{name}/{data['task']}"
    partition = data.get("partition")
    if partition == "dirichlet":
        part = f"Dirichlet(α={_num(data['alpha'])})" if "alpha" in data else "Dirichlet"
    elif partition == "shards":
        spc = data.get("shards_per_client")
        part = f"shards ({spc} per client)" if spc is not None else "shards"
    elif partition == "iid":
        part = "IID"
    elif partition is None:
        part = "natural partition"
    else:
        part = str(partition).replace("_", " ")
    cohort = config.get("training", {}).get("cohort_size")
    who = f"cohort {cohort}" if cohort is not None else "cohort ?"
    if data.get("num_clients"):
        who += f" of {data['num_clients']} clients"
    return f"{name} · {part} · {who}"


def _legend_labels(results: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, str]:
    specs = {a.get("label", a["name"]): a for a in config.get("algorithms", [])}
    out = {}
    for label in results:
        spec = specs.get(label, {})
        hps = [f"{_SHORT.get(k, k)}={_num(v)}" for k, v in spec.items()
               if k not in ("name", "label") and not isinstance(v, (dict, list))]
        out[label] = f"{label} ({', '.join(hps)})" if hps else label
    return out


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average; non-finite values are skipped (held)."""
    out = np.empty_like(values, dtype=float)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = avg / norm if norm > 0 else np.nan
    return out


def _mean(v: Any) -> Any:
    """A summary value: a number, or the ``mean`` of a multi-seed ``{"mean", "ci95"}``."""
    return v.get("mean") if isinstance(v, Mapping) else v


def _band(seed_rows: Sequence[Sequence[Mapping[str, Any]]], key: str,
          transform: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds and the 95% CI band (mean ± ci95 over seeds) of ``key`` where every seed has it."""
    from fedjax_lab.metrics import mean_ci95

    rounds, lo, hi = [], [], []
    columns = []
    for rows in seed_rows:
        pts = {int(r["round"]): r[key] for r in rows if r.get(key) is not None}
        columns.append(pts)
    if transform is not None:  # e.g. the EMA of each seed's curve, as drawn
        columns = [dict(zip(c, transform(np.asarray(list(c.values()), float)), strict=True))
                   for c in columns]
    for r in sorted(set.intersection(*(set(c) for c in columns)) if columns else ()):
        m = mean_ci95([c[r] for c in columns])
        if m["ci95"] is not None:
            rounds.append(r)
            lo.append(m["mean"] - m["ci95"])
            hi.append(m["mean"] + m["ci95"])
    return np.asarray(rounds, float), np.asarray(lo), np.asarray(hi)


def _accuracy_points(res: Mapping[str, Any]) -> tuple[list[tuple[int, float]], list[tuple]]:
    """Pooled ``(round, accuracy)`` points and client-mean points of one run, round order."""
    pooled = {int(r["round"]): float(r["test_accuracy"])
              for r in res.get("history", []) if "test_accuracy" in r}
    mean = {}
    init = res.get("initial_eval")
    if init is not None:
        pooled[0] = float(init["accuracy"])
        if "accuracy_client_mean" in init:
            mean[0] = float(init["accuracy_client_mean"])
    s = res.get("summary", {})
    if _mean(s.get("test_accuracy")) is not None and s.get("rounds") is not None:
        pooled[int(s["rounds"])] = float(_mean(s["test_accuracy"]))  # the final evaluation
        if _mean(s.get("client_accuracy_mean")) is not None:
            mean[int(s["rounds"])] = float(_mean(s["client_accuracy_mean"]))
    return sorted(pooled.items()), sorted(mean.items())


def experiment_figures(
    results: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    *,
    smoothing: float = 0.9,
) -> dict[str, Figure]:
    """The three figures of a run, keyed by file name (see :data:`EXPERIMENT_PLOTS`).

    ``train_loss.png``: the cohort-mean training loss per round, raw (faint) and smoothed with
    a bias-corrected EMA of weight ``smoothing``. ``accuracy.png``: pooled test accuracy at
    every evaluation, the round-0 point when ``results[label]["initial_eval"]`` is given and the
    final evaluation; hollow markers are the client-mean accuracy. If no periodic evaluation
    fell inside the rounds run, a :class:`UserWarning` says so and the final evaluation is still
    drawn. ``client_accuracy.png``: the ECDF of per-client accuracy of the final model, with the
    number of clients ``n`` per run.

    Args:
      results: per run label, ``summary``, ``history`` and ``client_accuracy`` (module doc).
      config: the experiment config (``data``, ``training.cohort_size``, ``algorithms``).
      smoothing: EMA weight in ``[0, 1)`` for the training loss.

    Returns:
      ``{"train_loss.png": Figure, "accuracy.png": Figure, "client_accuracy.png": Figure}``.

    Example:
      >>> res = {"fedavg": {"history": [{"round": r, "train_loss": 1 / r} for r in (1, 2, 3)],
      ...                   "summary": {"rounds": 3, "test_accuracy": 0.8,
      ...                               "client_accuracy_mean": 0.7},
      ...                   "client_accuracy": [0.6, 0.8]}}
      >>> cfg = {"data": {"name": "digits", "partition": "iid"}, "training": {"cohort_size": 2},
      ...        "algorithms": [{"name": "fedavg", "client_learning_rate": 0.1}]}
      >>> import warnings
      >>> with warnings.catch_warnings(record=True):
      ...     figs = experiment_figures(res, cfg)
      >>> sorted(figs)
      ['accuracy.png', 'client_accuracy.png', 'train_loss.png']
      >>> figs["client_accuracy.png"].axes[0].get_legend_handles_labels()[1]
      ['fedavg (η_c=0.1) (n=2)']
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: need 0 <= smoothing < 1, got {smoothing!r}.")
    where = title_context(config)
    names = _legend_labels(results, config)
    colors = {label: f"C{i % 10}" for i, label in enumerate(results)}
    figs: dict[str, Figure] = {}

    fig = _figure()
    ax = fig.add_subplot()
    for label, res in results.items():
        pts = [(r["round"], r["train_loss"]) for r in res.get("history", [])
               if r.get("train_loss") is not None]
        if not pts:
            continue
        rounds, loss = (np.asarray(v, dtype=float) for v in zip(*pts, strict=True))
        ax.plot(rounds, loss, color=colors[label], alpha=0.25, lw=0.8)
        ax.plot(rounds, _ema(loss, smoothing), color=colors[label], lw=1.8, label=names[label])
        if res.get("seed_histories"):
            x, lo, hi = _band(res["seed_histories"], "train_loss",
                              lambda v: _ema(v, smoothing))
            ax.fill_between(x, lo, hi, color=colors[label], alpha=0.2, lw=0)
    ax.set_xlabel("round")
    ax.set_ylabel(f"train loss (cohort mean; EMA {smoothing:g}, raw faint)")
    drawn = np.concatenate([line.get_ydata() for line in ax.lines] or [np.zeros(0)])
    drawn = drawn[np.isfinite(drawn)]
    if drawn.size and drawn.min() > 0:
        ax.set_yscale("log")
    ax.set_title(f"training loss\n{where}", fontsize=10)
    _finish(ax, fig)
    figs["train_loss.png"] = fig

    fig = _figure()
    ax = fig.add_subplot()
    periodic = banded = False
    for label, res in results.items():
        pooled, mean = _accuracy_points(res)
        periodic |= any("test_accuracy" in r for r in res.get("history", []))
        if pooled:
            ax.plot(*zip(*pooled, strict=True), color=colors[label], marker="o", ms=4,
                    label=names[label])
        if res.get("seed_histories"):
            x, lo, hi = _accuracy_band(res)
            ax.fill_between(x, lo, hi, color=colors[label], alpha=0.2, lw=0)
            banded = True
        if mean:
            ax.plot(*zip(*mean, strict=True), color=colors[label], marker="o", ms=7,
                    ls="none", mfc="none")
    if not periodic:
        total = max((int(r.get("summary", {}).get("rounds", 0)) for r in results.values()),
                    default=0)
        warnings.warn(
            f"accuracy.png: no periodic evaluation fell inside the {total} rounds run "
            "(evaluation.every is larger than the number of rounds); the plot shows only the "
            "final evaluation (and round 0 when given). Lower evaluation.every for a curve.",
            UserWarning,
            stacklevel=2,
        )
        if total > 0:
            ax.set_xlim(-0.05 * total, 1.05 * total)
        ax.text(0.02, 0.03, "no periodic evaluation in the rounds run: final evaluation only",
                transform=ax.transAxes, fontsize=8, color="0.35")
    if any(_accuracy_points(r)[1] for r in results.values()):
        ax.plot([], [], color="0.4", marker="o", ms=7, ls="none", mfc="none",
                label="client mean (each client counts once)")
    if banded:
        ax.fill_between([], [], [], color="0.4", alpha=0.2, lw=0,
                        label="95% CI over seeds (line: mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy, pooled over all test examples\n(hollow: mean over clients)")
    ax.set_title(f"test accuracy\n{where}", fontsize=10)
    _finish(ax, fig)
    figs["accuracy.png"] = fig

    fig = _figure()
    ax = fig.add_subplot()
    for label, res in results.items():
        acc = np.sort(np.asarray(res.get("client_accuracy", []), dtype=float))
        acc = acc[np.isfinite(acc)]
        n = acc.size
        if n:
            ax.step(np.concatenate([[acc[0]], acc]), np.arange(n + 1) / n, where="post",
                    color=colors[label], label=f"{names[label]} (n={n})")
        else:
            ax.plot([], [], color=colors[label], label=f"{names[label]} (n=0)")
    ax.set_xlabel("per-client test accuracy (final model)")
    ax.set_ylabel("fraction of clients ≤ accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"per-client accuracy (ECDF)\n{where}", fontsize=10)
    _finish(ax, fig)
    figs["client_accuracy.png"] = fig
    return figs


def _accuracy_band(res: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The accuracy band of a multi-seed run: each seed's evaluations, round 0, the final one."""
    s = res.get("summary", {})
    per_seed = [list(h) for h in res["seed_histories"]]
    final = s.get("test_accuracy")
    if isinstance(final, Mapping) and s.get("rounds") is not None:
        for rows, v in zip(per_seed, final.get("per_seed", []), strict=False):
            rows.append({"round": int(s["rounds"]), "test_accuracy": v})
    for rows, e in zip(per_seed, res.get("initial_evals") or [], strict=False):
        rows.insert(0, {"round": 0, "test_accuracy": float(e["accuracy"])})
    return _band(per_seed, "test_accuracy")


def _finish(ax: Any, fig: Figure) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    fig.tight_layout()


def write_experiment_plots(
    out: str | os.PathLike,
    results: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
) -> list[str]:
    """Saves :func:`experiment_figures` into ``out`` as PNG; returns the file names.

    Example:
      >>> import tempfile, warnings
      >>> res = {"fedavg": {"history": [{"round": 1, "train_loss": 1.0, "test_accuracy": 0.5}],
      ...                   "summary": {"rounds": 1, "test_accuracy": 0.5},
      ...                   "client_accuracy": [0.5]}}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_experiment_plots(d, res, {"data": {"name": "digits"}})
      ['train_loss.png', 'accuracy.png', 'client_accuracy.png']
    """
    figs = experiment_figures(results, config)
    out = Path(out)
    for name in EXPERIMENT_PLOTS:
        figs[name].savefig(out / name, dpi=_DPI)
    return list(EXPERIMENT_PLOTS)


def sweep_figure(
    rows: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    title: str,
    *,
    config: Mapping[str, Any] | None = None,
) -> Figure:
    """Final test accuracy of a sweep (mean over seeds) against its hyper-parameters.

    One swept hyper-parameter: a line of the mean with the seeds' spread (min to max) and each
    seed as a faint point (log x axis when the values are positive and span 10x or more). Two
    or more: a heat map over the first two (mean over seeds and any others).

    Args:
      rows: one dict per run with the swept ``names``, ``seed`` and ``test_accuracy``.
      names: the swept hyper-parameters, in ``[sweep]`` order.
      title: the algorithm (or any) title.
      config: the experiment config; when given, the title's second line is
        :func:`title_context` (dataset, partition, cohort).

    Returns:
      The figure.

    Example:
      >>> rows = [{"client_learning_rate": lr, "seed": s, "test_accuracy": 0.5 + lr + s / 100}
      ...         for lr in (0.01, 0.1, 0.3) for s in (0, 1)]
      >>> fig = sweep_figure(rows, ["client_learning_rate"], "fedavg")
      >>> line = fig.axes[0].lines[-1]  # the mean; the seeds are points below it
      >>> [round(float(y), 3) for y in line.get_ydata()]
      [0.515, 0.605, 0.805]
    """
    if not names:
        raise ValueError("names: need at least one swept hyper-parameter.")
    fig = _figure((6.4, 4.2))
    ax = fig.add_subplot()
    if len(names) == 1:
        (name,) = names
        xs = sorted({r[name] for r in rows})
        per_x = [np.asarray([r["test_accuracy"] for r in rows if r[name] == x], float)
                 for x in xs]
        means = np.asarray([v.mean() for v in per_x])
        ax.fill_between(xs, [v.min() for v in per_x], [v.max() for v in per_x], alpha=0.2,
                        color="C0", label="min–max over seeds")
        for x, v in zip(xs, per_x, strict=True):
            ax.plot([x] * v.size, v, "o", color="C0", alpha=0.35, ms=3)
        ax.plot(xs, means, "o-", color="C0", lw=1.8, label=f"mean over {per_x[0].size} seed(s)")
        best = int(np.argmax(means))
        ax.annotate(f"best {means[best]:.3f}", (xs[best], means[best]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        if all(x > 0 for x in xs) and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("final test accuracy (pooled)")
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ys = sorted({r[names[0]] for r in rows})
        xs = sorted({r[names[1]] for r in rows})
        acc = np.full((len(ys), len(xs)), np.nan)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                vals = [r["test_accuracy"] for r in rows if r[names[0]] == y and r[names[1]] == x]
                acc[i, j] = np.mean(vals) if vals else np.nan
        fig.set_size_inches(1.2 * len(xs) + 3.5, 0.8 * len(ys) + 2.2)
        im = ax.imshow(acc, cmap="viridis", origin="lower", aspect="auto")
        for i in range(len(ys)):
            for j in range(len(xs)):
                if math.isfinite(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.3f}", ha="center", va="center", color="w",
                            fontsize=9)
        ax.set_yticks(range(len(ys)), [_num(y) for y in ys])
        ax.set_xticks(range(len(xs)), [_num(x) for x in xs])
        ax.set_ylabel(names[0])
        ax.set_xlabel(names[1])
        fig.colorbar(im, ax=ax, label="final test accuracy (pooled)")
    rest = f"; mean over {', '.join(names[2:])}" if len(names) > 2 else ""
    where = f"\n{title_context(config)}" if config is not None else ""
    ax.set_title(f"{title}: final test accuracy (mean over seeds{rest}){where}", fontsize=10)
    fig.tight_layout()
    return fig


def write_sweep_plot(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    title: str,
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Saves :func:`sweep_figure` (same arguments) as a PNG at ``path``.

    Example:
      >>> import os, tempfile
      >>> rows = [{"lr": lr, "seed": 0, "test_accuracy": lr} for lr in (0.1, 0.2)]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_sweep_plot(os.path.join(d, "sweep.png"), rows, ["lr"], "fedavg")
      ...     os.path.getsize(os.path.join(d, "sweep.png")) > 0
      True
    """
    sweep_figure(rows, names, title, config=config).savefig(path, dpi=_DPI)
