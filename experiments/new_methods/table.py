"""Every method added by the baselines issue against FedAvg, one config each, one script.

Each row is one TOML file of ``experiments/new_methods/configs`` run by the library's own
experiment runner (:func:`fedjax_lab.cli.run_experiment`, exactly what ``fedjax-lab run
CONFIG`` does); the numbers are read back from each run's ``summary.json``. The digits configs
share their data (scikit-learn's digits, offline, 50 clients, Dirichlet(0.1) label skew),
model (MLP 64-32-10; the BatchNorm rows add one BatchNorm layer), rounds (100 of 10 clients),
local work (one epoch of batch 10 at SGD 0.1) and seed; the Shakespeare configs share theirs
(the embedded Shakespeare plays, char-level next-token prediction).

Columns (every accuracy is on the test split):

* ``pooled``: the final global model, all test examples pooled;
* ``client mean``: the mean over clients of each client's accuracy on its own test examples;
* ``own model``: the same, each client on its own model (personalised methods only:
  ``evaluation.personalized``);
* ``fine-tuned``: the final global model fine-tuned 10 SGD steps on each client's own
  training data, then tested (``evaluation.fine_tune_steps``; FedBABU's intended evaluation);
* ``note``: ε for the private rows, uplink bits for the adapter rows.

Usage::

  python experiments/new_methods/table.py [--smoke] [--only NAME ...] \\
      --out experiments/new_methods/results.json

``--smoke`` runs 2 rounds of each (a test of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import jax

import fedjax_lab as fl

CONFIGS = Path(__file__).with_name("configs")

ROWS: dict[str, str] = {
    "fedavg": "digits",
    "fedavg_bn": "digits",
    "fedbn": "digits",
    "moon": "digits",
    "fedsam": "digits",
    "fedlc": "digits",
    "fedbabu": "digits",
    "apfl": "digits",
    "ifca": "digits",
    "lg_fedavg": "digits",
    "bulyan": "digits",
    "fltrust": "digits",
    "secure_fedavg": "digits",
    "dp_ftrl": "digits",
    "fedprox_stragglers": "digits",
    "shakespeare_fedavg": "shakespeare",
    "shakespeare_lora_fedavg": "shakespeare",
    "shakespeare_lora_fedadam": "shakespeare",
}
"""Row name (= ``configs/<name>.toml``) -> its task, in table order; a task's first row is
its baseline. Add a method: write its config beside the others and add its name here."""

_FIELDS = ("test_accuracy", "client_accuracy_mean", "personalized_accuracy_mean",
           "fine_tuned_accuracy_mean", "final_train_loss", "wall_time_s", "epsilon",
           "epsilon_poisson", "uplink_bits_per_client", "full_uplink_bits_per_client",
           "params_sha256")


def run_row(name: str, runs: Path, rounds: int | None) -> dict[str, Any]:
    """Runs ``configs/<name>.toml`` into ``runs/<name>``; returns its row."""
    cfg = fl.experiment.load_config(CONFIGS / f"{name}.toml")
    result = fl.cli.run_experiment(cfg, runs / name, rounds=rounds, progress=False)
    (summary,) = result["runs"].values()
    row = {"name": name, "task": ROWS[name], "title": cfg["name"], "rounds": summary["rounds"]}
    row.update({k: summary[k] for k in _FIELDS if summary.get(k) is not None})
    (spec,) = cfg["algorithms"]
    if ROWS[name] == "shakespeare":
        row.update(uplink_bits(cfg, spec))
    return row


def uplink_bits(cfg: dict[str, Any], spec: dict[str, Any]) -> dict[str, int]:
    """What one client sends a round: the adapters for ``fedlora``, else the whole model (32
    bits a float, :func:`fedjax_lab.algorithms.lora_uplink_bits`)."""
    model = fl.experiment.build({**cfg, "algorithms": [{"name": "fedavg"}]}).model
    params = jax.eval_shape(model.init, jax.random.key(0))
    bits = fl.algorithms.lora_uplink_bits(params, rank=spec.get("rank", 4),
                                          target=spec.get("target"))
    sent = bits["lora_bits"] if spec["name"] == "fedlora" else bits["full_bits"]
    return {"uplink_bits_per_client": int(sent),
            "full_uplink_bits_per_client": int(bits["full_bits"])}


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "–"


def _note(row: dict[str, Any]) -> str:
    if "epsilon" in row:
        return f"ε = {row['epsilon']:.3g} (δ = 1e-3)"
    if "uplink_bits_per_client" in row:
        ratio = row["uplink_bits_per_client"] / row["full_uplink_bits_per_client"]
        return f"uplink {row['uplink_bits_per_client']:,} bits/client/round ({ratio:.1%} of full)"
    return ""


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown, one section per task."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"**{task}**", "",
                  "| method | pooled | client mean | own model | fine-tuned | train s | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["task"] == task):
            lines.append(
                f"| {r['title']} | {_cell(r, 'test_accuracy')} | "
                f"{_cell(r, 'client_accuracy_mean')} | {_cell(r, 'personalized_accuracy_mean')} "
                f"| {_cell(r, 'fine_tuned_accuracy_mean')} | {r['wall_time_s']:.1f} | "
                f"{_note(r)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--runs", type=Path, default=None,
                        help="where the runs go (default: a temporary directory)")
    parser.add_argument("--only", nargs="*", default=None, help="a subset of the rows")
    parser.add_argument("--smoke", action="store_true", help="2 rounds: a test of the script")
    args = parser.parse_args(argv)
    names = [n for n in ROWS if (CONFIGS / f"{n}.toml").exists()]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"--only: no config for {unknown}; choose from {names}")
        names = [n for n in names if n in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        rows = []
        for name in names:
            rows.append(run_row(name, runs, 2 if args.smoke else None))
            print(f"{name}: {rows[-1]}", flush=True)
    out = {
        "rows": rows,
        "command": "python experiments/new_methods/table.py" + (" --smoke" if args.smoke else ""),
        "platform": {"python": platform.python_version(), "jax": jax.__version__,
                     "backend": jax.default_backend(), "devices": jax.device_count()},
        "smoke": args.smoke,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(rows))
    return out


if __name__ == "__main__":
    main()
