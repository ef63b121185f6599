"""Paper plots: titles and legends say what was run; the edge cases still draw something."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from fedjax_lab import plots

CONFIG = {
    "data": {"name": "digits", "num_clients": 100, "partition": "dirichlet", "alpha": 0.5},
    "training": {"cohort_size": 10},
    "algorithms": [
        {"name": "fedavg", "client_learning_rate": 0.1},
        {"name": "fedadam", "client_learning_rate": 0.1, "server_learning_rate": 0.03},
    ],
}
TITLE = "digits · Dirichlet(α=0.5) · cohort 10 of 100 clients"
LEGEND = {"fedavg": "fedavg (η_c=0.1)", "fedadam": "fedadam (η_c=0.1, η_s=0.03)"}
PLOT_DIR = os.environ.get("FEDJAX_LAB_PLOT_DIR")  # set it to keep the PNGs for a look


def _results(rounds: int = 60, every: int | None = 10, initial: bool = True):
    rng = np.random.default_rng(0)
    out = {}
    for k, label in enumerate(("fedavg", "fedadam")):
        history = []
        for r in range(1, rounds + 1):
            row = {"round": r, "train_loss": 2.0 / (1 + 0.1 * r * (k + 1)) + rng.uniform(0, 0.3)}
            if every is not None and r % every == 0:
                row["test_accuracy"] = 0.9 - 0.8 / (1 + 0.05 * r * (k + 1))
            history.append(row)
        res = {
            "history": history,
            "summary": {"rounds": rounds, "test_accuracy": 0.85 + 0.05 * k,
                        "client_accuracy_mean": 0.8 + 0.05 * k},
            "client_accuracy": np.clip(rng.normal(0.8 + 0.05 * k, 0.1, size=40 + 20 * k), 0, 1),
        }
        if initial:
            res["initial_eval"] = {"accuracy": 0.1, "accuracy_client_mean": 0.11}
        out[label] = res
    return out


def _out(tmp_path, sub: str = ""):
    out = os.path.join(PLOT_DIR or str(tmp_path), sub)
    os.makedirs(out, exist_ok=True)
    return out


def _labels(fig):
    return fig.axes[0].get_legend().get_texts()


def test_experiment_plots_are_pngs_with_titles_and_legends(tmp_path):
    out = _out(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither ours nor matplotlib's
        written = plots.write_experiment_plots(out, _results(), CONFIG)
        figs = plots.experiment_figures(_results(), CONFIG)
    assert written == ["train_loss.png", "accuracy.png", "client_accuracy.png"]
    for name in written:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert TITLE in figs[name].axes[0].get_title(), name
    loss = [t.get_text() for t in _labels(figs["train_loss.png"])]
    assert loss == [LEGEND["fedavg"], LEGEND["fedadam"]]
    ax = figs["train_loss.png"].axes[0]
    assert len(ax.lines) == 4  # raw and EMA per run
    raw, ema = ax.lines[0].get_ydata(), ax.lines[1].get_ydata()
    assert np.std(np.diff(ema)) < np.std(np.diff(raw))  # smoothed
    assert "EMA" in ax.get_ylabel()
    acc = figs["accuracy.png"].axes[0]
    assert "pooled" in acc.get_ylabel() and "mean over clients" in acc.get_ylabel()
    first = acc.lines[0]
    assert first.get_xdata()[0] == 0 and first.get_ydata()[0] == pytest.approx(0.1)
    assert list(first.get_xdata()) == [0, 10, 20, 30, 40, 50, 60]
    ecdf = [t.get_text() for t in _labels(figs["client_accuracy.png"])]
    assert ecdf == [f"{LEGEND['fedavg']} (n=40)", f"{LEGEND['fedadam']} (n=60)"]
    steps = figs["client_accuracy.png"].axes[0].lines[0].get_ydata()
    assert steps[0] == 0 and steps[-1] == 1 and np.all(np.diff(steps) >= 0)


def test_no_round_zero_when_not_given():
    figs = plots.experiment_figures(_results(initial=False), CONFIG)
    assert figs["accuracy.png"].axes[0].lines[0].get_xdata()[0] == 10


def test_no_evaluation_inside_the_rounds_warns_and_draws_the_final_point(tmp_path):
    out = _out(tmp_path, "noeval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = plots.write_experiment_plots(out, _results(rounds=5, every=None, initial=False),
                                               CONFIG)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # ours only: no matplotlib warning
    assert "no periodic evaluation fell inside the 5 rounds" in messages[0]
    assert issubclass(caught[0].category, UserWarning)
    assert "accuracy.png" in written
    with pytest.warns(UserWarning, match="evaluation.every"):
        figs = plots.experiment_figures(_results(rounds=5, every=None, initial=False), CONFIG)
    ax = figs["accuracy.png"].axes[0]
    assert list(ax.lines[0].get_xdata()) == [5]
    assert ax.get_xlim()[0] < 0  # the axis spans the rounds run, not a sliver around round 5
    assert ax.lines[0].get_ydata()[0] == pytest.approx(0.85)


def _sweep_rows(names):
    rows = []
    for lr in (0.01, 0.03, 0.1, 0.3):
        for slr in ((0.5, 1.0) if len(names) > 1 else (None,)):
            for seed in (0, 1, 2):
                row = {"client_learning_rate": lr, "seed": seed,
                       "test_accuracy": 0.6 + 0.2 * np.log10(lr / 0.01) / 1.5 + 0.01 * seed}
                if slr is not None:
                    row["server_learning_rate"] = slr
                rows.append(row)
    return rows


def test_one_dimensional_sweep_is_a_line(tmp_path):
    path = os.path.join(_out(tmp_path), "sweep_1d.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.write_sweep_plot(path, _sweep_rows(["client_learning_rate"]),
                               ["client_learning_rate"], "fedavg", config=CONFIG)
        fig = plots.sweep_figure(_sweep_rows(["client_learning_rate"]),
                                 ["client_learning_rate"], "fedavg", config=CONFIG)
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    ax = fig.axes[0]
    assert not ax.images and len(fig.axes) == 1  # no heat map, no colour bar
    mean = next(line for line in ax.lines if line.get_label().startswith("mean"))
    assert list(mean.get_xdata()) == [0.01, 0.03, 0.1, 0.3]
    assert mean.get_ydata()[0] == pytest.approx(0.61)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "client_learning_rate"
    assert ax.get_title() == f"fedavg: final test accuracy (mean over seeds)\n{TITLE}"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "min–max over seeds", "mean over 3 seed(s)"]


def test_two_dimensional_sweep_is_a_heat_map(tmp_path):
    path = os.path.join(_out(tmp_path), "sweep_2d.png")
    names = ["client_learning_rate", "server_learning_rate"]
    plots.write_sweep_plot(path, _sweep_rows(names), names, "fedavg", config=CONFIG)
    fig = plots.sweep_figure(_sweep_rows(names), names, "fedavg")
    ax = fig.axes[0]
    assert ax.images and ax.images[0].get_array().shape == (4, 2)
    assert ax.get_xlabel() == "server_learning_rate"
