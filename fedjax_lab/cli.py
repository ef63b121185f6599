"""The ``fedjax-lab`` command: run an experiment config, show progress, write results and plots.

``fedjax-lab run [CONFIG] --out DIR [--rounds N] [--resume]`` runs every ``[[algorithms]]`` entry
of CONFIG (the default experiment when CONFIG is omitted) as compiled blocks of
``evaluation.every`` rounds (one ``lax.scan`` each). Between blocks a progress bar shows the
round, train loss, latest test accuracy, rounds/s and ETA. It writes, per algorithm,
``DIR/<label>/metrics.jsonl`` (one line a round) and ``DIR/<label>/checkpoints/``, and for the
whole run ``DIR/summary.json`` (config, versions, device, wall time, final metrics and
``params_sha256`` per algorithm; a ``dp_fedavg`` run adds the privacy spent: ``epsilon``,
``delta``, ``accountant``, ``sampling``, ``sampling_rate``, ``noise_multiplier``, see
:func:`fedjax_lab.experiment.privacy_spent`, also printed) and the plots ``accuracy.png``,
``train_loss.png`` and ``client_accuracy.png``. ``--resume`` continues every run from its last
good checkpoint and ends bit-identical to a run never interrupted.

``fedjax-lab sweep CONFIG --out DIR`` runs the config's ``[sweep]`` grid as one compiled program
and writes ``sweep.csv`` and ``sweep.png`` (see :func:`fedjax_lab.sweep.sweep`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_lab import checkpoint as ckpt
from fedjax_lab import experiment as exp_lib
from fedjax_lab import metrics as metrics_lib
from fedjax_lab import plots as plots_lib
from fedjax_lab.rounds import run_rounds

__all__ = ["main", "run_experiment"]

_ROW_KEYS = ("train_loss", "num_examples", "dropped_clients", "round_skipped", "update_norm")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _environment() -> dict[str, Any]:
    from fedjax_lab import __version__

    return {
        "fedjax_lab": __version__,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "platform": platform.platform(),
    }


def _rows(hist: dict[str, Any], first_round: int) -> list[dict[str, Any]]:
    """Per-round JSON rows from a block's history (one host transfer per block)."""
    hist = jax.device_get(hist)
    n = len(hist["train_loss"])
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"round": first_round + i + 1}
        for k in _ROW_KEYS:
            row[k] = float(hist[k][i])
        for k in ("eval_accuracy", "eval_loss"):
            if k in hist and np.isfinite(hist[k][i]):
                row["test_" + k[5:]] = float(hist[k][i])
        rows.append(row)
    return rows


def _run_one(
    experiment: exp_lib.Experiment,
    label: str,
    out: Path,
    *,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    """Runs one algorithm of the experiment with checkpoints; returns its summary."""
    from tqdm.auto import tqdm

    cfg = experiment.config
    training, evaluation, checkpointing = cfg["training"], cfg["evaluation"], cfg["checkpoint"]
    alg = experiment.algorithms[label]
    run_dir = out / _slug(label)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    total = training["rounds"]
    block = evaluation["every"]

    init_key, run_key = jax.random.split(jax.random.key(training["seed"]))
    state = alg.init(experiment.model.init(init_key), num_clients=experiment.train.num_clients)
    history: list[dict[str, Any]] = []
    existing = ckpt.latest_step(ckpt_dir) if ckpt_dir.exists() else None
    if resume and existing is not None:
        tree, meta, _ = ckpt.restore(ckpt_dir, {"state": state, "key": run_key})
        state, run_key = tree["state"], tree["key"]
        history = meta["history"]
        if meta.get("label") != label or meta.get("config") != _jsonable(cfg):
            raise ValueError(
                f"--resume: the checkpoint in {ckpt_dir} was written by a different config; "
                "resume with the same config or choose another --out."
            )
    elif not resume and (existing is not None or metrics_path.exists()):
        raise ValueError(
            f"--out: {run_dir} already holds a run; pass --resume to continue it or choose "
            "another --out (nothing was overwritten)."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(metrics_path, "w") as f:  # what the checkpoint holds; later lines were lost
        f.writelines(json.dumps(row) + "\n" for row in history)

    done = int(state.round)
    start_wall = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc=label, unit="round", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    last_acc = next((r["test_accuracy"] for r in reversed(history) if "test_accuracy" in r),
                    None)
    while done < total:
        n = min(block, total - done)
        state, hist = run_rounds(
            alg, state, experiment.train, run_key,
            num_rounds=n,
            cohort_size=training["cohort_size"],
            batch_size=training["batch_size"],
            local_steps=training.get("local_steps"),
            epochs=training["epochs"],
            client_map=experiment.client_map,
            weighting=training.get("weighting", "num_examples"),
            sampler=experiment.sampler,
            eval_fn=experiment.eval_fn,
            eval_data=experiment.test,
            eval_every=block,
            eval_batch_size=evaluation["batch_size"],
        )
        rows = _rows(hist, done)
        done += n
        history.extend(rows)
        with open(metrics_path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        last_acc = rows[-1].get("test_accuracy", last_acc)
        postfix = {"loss": f"{rows[-1]['train_loss']:.4f}"}
        if last_acc is not None:
            postfix["test_acc"] = f"{last_acc:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(n)
        if done % checkpointing["every"] == 0 or done == total:
            ckpt.save(
                ckpt_dir, done, {"state": state, "key": run_key},
                metadata={"label": label, "config": _jsonable(cfg), "history": history},
                keep=checkpointing["keep"],
            )
    bar.close()
    wall = time.perf_counter() - start_wall

    final = metrics_lib.evaluate(
        experiment.eval_fn, state.params, experiment.test, batch_size=evaluation["batch_size"]
    )
    summary = {
        "label": label,
        "algorithm": alg.name,
        "rounds": int(state.round),
        "wall_time_s": wall,
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "client_accuracy_mean": final["accuracy_client_mean"],
        "client_accuracy_p10": final["accuracy_p10"],
        "client_accuracy_p50": final["accuracy_p50"],
        "client_accuracy_p90": final["accuracy_p90"],
        "client_accuracy_std": final["accuracy_std"],
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "params_sha256": ckpt.params_sha256(state.params),
    }
    spec = next(a for a in cfg["algorithms"] if a.get("label", a["name"]) == label)
    spent = exp_lib.privacy_spent(cfg, spec, int(state.round), experiment.train.num_clients)
    if spent is not None:
        summary.update(spent)
        if summary["epsilon"] == float("inf"):
            summary["epsilon"] = None  # JSON has no infinity; noise_multiplier 0 says why
    np.savetxt(run_dir / "client_accuracy.txt", final["client_accuracy"], fmt="%.6f")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"summary": summary, "history": history, "client_accuracy": final["client_accuracy"]}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = (f"{'algorithm':<14}{'test acc':>9}{'client p10':>11}{'client mean':>12}"
            f"{'train loss':>11}{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for label, res in results.items():
        s = res["summary"]
        loss = s["final_train_loss"] if s["final_train_loss"] is not None else float("nan")
        lines.append(
            f"{label:<14}{s['test_accuracy']:>9.4f}{s['client_accuracy_p10']:>11.4f}"
            f"{s['client_accuracy_mean']:>12.4f}{loss:>11.4f}{s['wall_time_s']:>8.1f}"
        )
    for label, res in results.items():
        s = res["summary"]
        if "noise_multiplier" not in s:
            continue
        if s["sampling_rate"] is None:
            lines.append(f"{label}: no epsilon: {s['sampling_note']}")
            continue
        eps = "inf (noise_multiplier 0: no privacy)" if s["epsilon"] is None else (
            f"{s['epsilon']:.4g}"
        )
        lines.append(
            f"{label}: epsilon = {eps} at delta = {s['delta']:g} after {s['rounds']} rounds "
            f"(noise_multiplier {s['noise_multiplier']:g}, sampling rate {s['sampling_rate']:g}, "
            f"{s['accountant'].upper()} accountant; q = {s['sampling_note']})"
        )
    return "\n".join(lines)


def run_experiment(
    config: dict[str, Any] | None,
    out: str | os.PathLike,
    *,
    rounds: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs a config (``None``: the default experiment) into ``out``; returns the summary dict.

    Example (not run here: it trains):
      ``fl.cli.run_experiment(None, "runs/default")``
    """
    cfg = exp_lib.validate(config or {})
    if rounds is not None:
        if not isinstance(rounds, int) or rounds < 1:
            raise exp_lib.ConfigError(f"--rounds: need a whole number >= 1, got {rounds!r}.")
        cfg["training"]["rounds"] = rounds
        cfg = exp_lib.validate(cfg)
    experiment = exp_lib.build(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fedjax-lab: {cfg['name']}", file=sys.stderr)
    print(experiment.train.describe(), file=sys.stderr)
    print(f"client map: {experiment.client_map.name} on {jax.default_backend()} "
          f"({jax.local_device_count()} device(s))", file=sys.stderr)
    start = time.perf_counter()
    results = {
        label: _run_one(experiment, label, out, resume=resume, progress=progress)
        for label in experiment.algorithms
    }
    plots = plots_lib.write_experiment_plots(out, results, cfg)
    summary = {
        "config": cfg,
        "environment": _environment(),
        "wall_time_s": time.perf_counter() - start,
        "runs": {label: res["summary"] for label, res in results.items()},
        "plots": plots,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(_table(results))
    print(f"\nwrote {out}/summary.json, metrics.jsonl per run, {', '.join(plots)}")
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedjax-lab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment config (default: the README experiment)")
    r.add_argument("config", nargs="?", help="TOML config (omit for the default experiment)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--rounds", type=int, help="override training.rounds")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("sweep", help="run the config's [sweep] grid as one compiled program")
    s.add_argument("config", help="TOML config with a [sweep] table")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--rounds", type=int, help="override training.rounds")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedjax-lab`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            config = exp_lib.load_config(args.config) if args.config else None
            run_experiment(config, args.out, rounds=args.rounds, resume=args.resume,
                           progress=not args.no_progress)
        else:
            from fedjax_lab.sweep import run_sweep_config

            config = exp_lib.load_config(args.config)
            run_sweep_config(config, args.out, rounds=args.rounds)
    except (exp_lib.ConfigError, ValueError, TypeError) as e:
        print(f"fedjax-lab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
