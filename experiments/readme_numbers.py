"""Runs the commands the README shows and rewrites its numbers, so they never drift.

    python experiments/readme_numbers.py            # default experiment + the 20-line example
    python experiments/readme_numbers.py --tests    # also times both test tiers (~30 min)
    python experiments/readme_numbers.py --check    # exit 1 if README.md would change

It runs ``fedjax-lab run --out <tmp>`` (the default experiment, as the README's first command
does), executes the README's "In 20 lines" code block, and rewrites the text between the
``<!-- readme-numbers:NAME -->`` and ``<!-- /readme-numbers:NAME -->`` markers: the accuracy
table with the run's wall time and devices (``default``), the example's printed line
(``example``) and, with ``--tests``, the durations of ``pytest -m "not slow" -n 2`` and of the
full suite (``tests``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROWS = [
    ("fedavg", "FedAvg (client SGD 0.1, server 1.0)"),
    ("fedadam", "FedAdam (server lr 0.03, τ 1e-3)"),
    ("fedyogi", "FedYogi (server lr 0.03, τ 1e-3)"),
]


def _replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(
        rf"(<!-- readme-numbers:{name} -->\n).*?(<!-- /readme-numbers:{name} -->)", re.S
    )
    if not pattern.search(text):
        raise SystemExit(f"README.md: no <!-- readme-numbers:{name} --> block to rewrite")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def _default_run(keep: str | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or tmp
        start = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "fedjax_lab.cli", "run", "--out", out, "--no-progress"],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )
        wall = time.perf_counter() - start
        summary = json.loads((Path(out) / "summary.json").read_text())
    devices = len(summary["environment"]["devices"])
    lines = [
        f"Measured by `python experiments/readme_numbers.py` (it runs `fedjax-lab run --out "
        f"DIR`): {wall:.0f} s in all, compiles included, on {devices} CPU device(s) "
        f"({summary['environment']['device_kind']}).",
        "",
        "| algorithm | test accuracy | 10th-percentile client | client mean | final train loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, label in ROWS:
        r = summary["runs"][key]
        lines.append(f"| {label} | {r['test_accuracy']:.3f} | {r['client_accuracy_p10']:.3f} | "
                     f"{r['client_accuracy_mean']:.3f} | {r['final_train_loss']:.3f} |")
    print(res.stderr.splitlines()[0] if res.stderr else "", file=sys.stderr)
    return "\n".join(lines)


def _example(text: str) -> str:
    block = re.search(r"## In 20 lines\n\n```python\n(.*?)```", text, re.S)
    if not block:
        raise SystemExit("README.md: no '## In 20 lines' python block")
    res = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return "It prints (one XLA device):\n\n```\n" + res.stdout.strip() + "\n```"


def _tests() -> str:
    out = []
    for label, args in [("quick tier", ["-m", "not slow"]), ("full suite", [])]:
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", *args],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "no output"
        out.append(f"- {label}: {wall / 60:.1f} min ({tail.strip('= ')})")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", action="store_true", help="also time both test tiers")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md would change")
    parser.add_argument("--keep", metavar="DIR", help="run the default experiment into DIR and "
                        "keep it (plots, metrics); DIR must not hold a run")
    args = parser.parse_args()
    text = README.read_text()
    new = _replace(text, "default", _default_run(args.keep))
    new = _replace(new, "example", _example(new))
    if args.tests:
        new = _replace(new, "tests", _tests())
    if args.check:
        return int(new != text)
    README.write_text(new)
    print("README.md rewritten" if new != text else "README.md unchanged")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
