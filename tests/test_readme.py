"""The README's example block runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    section = text.split("## In 20 lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert 0.5 < acc <= 1.0  # 100 rounds of FedAdam on digits learn something real


def test_readme_shows_exactly_the_ci_test_command():
    text = README.read_text()
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    command = 'python3 -m pip install -e ".[test]" && python3 -m pytest -n 2 --dist loadfile -q'
    assert command in text
    assert command in ci
