"""fedjax-lab: configs fail early, runs write their files, a killed run resumes exactly."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_lab import checkpoint as ckpt
from fedjax_lab import cli
from fedjax_lab import experiment as exp_lib

TINY = """
name = "tiny"
[data]
name = "digits"
num_clients = 20
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = [16]
[training]
rounds = {rounds}
cohort_size = 4
batch_size = 10
client_map = "sequential"
[evaluation]
every = 2
[checkpoint]
every = 2
keep = 2
[[algorithms]]
name = "fedadam"
client_learning_rate = 0.1
server_learning_rate = 0.03
"""


def _write(tmp_path: Path, rounds: int, extra: str = "") -> Path:
    path = tmp_path / f"tiny_{rounds}.toml"
    path.write_text(TINY.format(rounds=rounds) + extra)
    return path


@pytest.mark.parametrize(
    "config, match",
    [
        ({"trainng": {}}, "trainng: unknown section"),
        ({"training": {"rounds": 0}}, "training.rounds: must be >= 1"),
        ({"training": {"cohort_size": "ten"}}, "training.cohort_size: expected int"),
        ({"training": {"client_map": "gpu"}}, "training.client_map: got 'gpu'; allowed: 'auto'"),
        ({"data": {"name": "cifar"}}, "data.name: got 'cifar'; allowed: 'digits'"),
        ({"data": {"name": "digits", "alhpa": 1.0}}, "data.alhpa: not an option of dataset"),
        ({"data": {"partition": "random"}}, "data.partition: got 'random'"),
        ({"model": {"name": "mlp", "hiden": [3]}}, "model.hiden: not an option of model 'mlp'"),
        ({"algorithms": [{"name": "fedsomething"}]}, "algorithms\\[0\\].name: got 'fedsomething'"),
        ({"algorithms": [{"name": "fedavg", "client_learning_rate": -1.0}]},
         "algorithms\\[0\\].client_learning_rate: must be > 0"),
        ({"algorithms": [{"name": "fedavg", "client_learning_rate": float("inf")}]},
         "algorithms\\[0\\].client_learning_rate: must be finite, got inf"),
        ({"algorithms": [{"name": "fedavg", "client_optimizer": "lamb"}]},
         "client_optimizer: got 'lamb'"),
        ({"checkpoint": {"every": 3}, "evaluation": {"every": 2}},
         "checkpoint.every: must be a multiple of evaluation.every"),
        ({"data": {"name": "tff_h5", "train_path": "a.h5"}}, "data.task: required"),
    ],
)
def test_invalid_configs_name_the_key(config, match):
    with pytest.raises(exp_lib.ConfigError, match=match):
        exp_lib.validate(config)


def test_bad_hyper_parameter_is_caught_before_compiling(tmp_path, capsys):
    path = _write(tmp_path, 2, "").read_text().replace(
        "server_learning_rate = 0.03", "server_learning_rate = -0.03"
    )
    cfg_path = tmp_path / "bad.toml"
    cfg_path.write_text(path)
    start = time.perf_counter()
    code = cli.main(["run", str(cfg_path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err
    assert time.perf_counter() - start < 20  # data loading only, no XLA compile
    assert not (tmp_path / "out" / "fedadam" / "metrics.jsonl").exists()
    assert cli.main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fedjax_lab.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.mark.slow
def test_run_writes_metrics_summary_and_plots_and_refuses_to_overwrite(tmp_path):
    cfg = _write(tmp_path, 4)
    out = tmp_path / "run"
    res = _run(["run", str(cfg), "--out", str(out), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fedadam" in res.stdout and "test acc" in res.stdout
    lines = (out / "fedadam" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all("test_accuracy" in r for r in rows if r["round"] % 2 == 0)
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["fedadam"]
    assert len(run["params_sha256"]) == 64 and run["rounds"] == 4
    assert 0.0 <= run["test_accuracy"] <= 1.0
    assert summary["environment"]["jax"] and summary["config"]["training"]["rounds"] == 4
    for png in ("accuracy.png", "train_loss.png", "client_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _run(["run", str(cfg), "--out", str(out), "--no-progress"])
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_params(tmp_path):
    """SIGKILL mid-run, --resume, and the final params hash equals an uninterrupted run's."""
    rounds = 12
    cfg = _write(tmp_path, rounds)
    ref = tmp_path / "ref"
    res = _run(["run", str(cfg), "--out", str(ref), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    want = json.loads((ref / "summary.json").read_text())["runs"]["fedadam"]["params_sha256"]

    out = tmp_path / "killed"
    ckpts = out / "fedadam" / "checkpoints"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedjax_lab.cli", "run", str(cfg), "--out", str(out),
         "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.time() + 180
    from fedjax_lab import checkpoint as ckpt

    while time.time() < deadline and proc.poll() is None:
        step = ckpt.latest_step(ckpts) if ckpts.exists() else None
        if step is not None and step >= 4:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed; make it longer"
    step = ckpt.latest_step(ckpts)
    assert step is not None and step < rounds

    res = _run(["run", str(cfg), "--out", str(out), "--resume", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())["runs"]["fedadam"]["params_sha256"]
    assert got == want
    lines = (out / "fedadam" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))


def test_sweep_command_writes_csv_and_heatmap(tmp_path):
    cfg = _write(tmp_path, 3, """
[sweep]
algorithm = "fedadam"
client_learning_rate = [0.05, 0.1]
server_learning_rate = [0.01, 0.03]
seeds = [0, 1]
""")
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(cfg), "--out", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {float(r["client_learning_rate"]) for r in rows} == {0.05, 0.1}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def _err(capsys, argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _strict_json(path: Path):
    def refuse(token):
        raise AssertionError(f"{path}: bare {token} token (not strict JSON)")

    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    return json.loads(text, parse_constant=refuse)


def test_unusable_out_and_input_files_are_errors_not_tracebacks(tmp_path, capsys):
    """--out a file, an unwritable place, a deeply nested LEAF file or TOML: rc 2, one line."""
    cfg = str(_write(tmp_path, 2))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([cfg, "--out", str(a_file)], rf"--out: {a_file} is a file, not a directory"),
        ([cfg, "--out", str(a_file / "sub")], r"--out: cannot create the directory .*a_file/sub"),
        ([cfg, "--out", "/sys/fedjax_out"], r"--out: cannot create the directory /sys/fedjax_out "
                                            r"\(Operation not permitted\); choose a location"),
        ([cfg, "--out", "/sys"], r"--out: cannot write in /sys \(Permission denied\); choose a "
                                 r"writable directory"),
    ]
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "all_data.json").write_text("[" * 100_000 + "]" * 100_000)
    leaf_cfg = tmp_path / "leaf.toml"
    leaf_cfg.write_text(f'[data]\nname = "leaf"\ntrain_path = "{deep}"\ntest_path = "{deep}"\n')
    cases.append(([str(leaf_cfg), "--out", str(tmp_path / "o")],
                  r"deep/all_data\.json: JSON nested too deeply"))
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("a = " + "[" * 100_000 + "]" * 100_000)
    cases.append(([str(deep_toml), "--out", str(tmp_path / "o")],
                  r"config: '.*deep\.toml' is nested too deeply"))
    for args, match in cases:
        code, err = _err(capsys, ["run", *args, "--no-progress"])
        assert code == 2, (args, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith("fedjax-lab: error: ") and "Traceback" not in err, err
        assert re.search(match, line), (match, line)
    assert a_file.read_text() == "x"
    code, err = _err(capsys, ["sweep", cfg, "--out", str(a_file)])
    assert code == 2 and "--out: " in err and "is a file" in err


def test_rows_of_rounds_without_clients_are_null_never_zero():
    nan = float("nan")
    hist = {"train_loss": [0.5, nan, 0.0], "num_examples": [10, 0, 0],
            "dropped_clients": [0, 4, 4], "round_skipped": [0, 1, 1],
            "update_norm": [1.0, 0.0, nan], "eval_accuracy": [nan, 0.3, nan],
            "eval_loss": [nan, 1.0, nan]}
    rows = cli._rows({k: np.asarray(v) for k, v in hist.items()}, 4)
    assert [r["round"] for r in rows] == [5, 6, 7]
    assert [r["train_loss"] for r in rows] == [0.5, None, None]  # NaN or no example -> null
    assert rows[2]["update_norm"] is None and rows[1]["test_accuracy"] == 0.3
    text = cli._json(rows)
    assert "NaN" not in text and json.loads(text) == rows
    assert cli._json({"a": math.inf, "b": [nan, 1.0]}) == '{"a": null, "b": [null, 1.0]}'
    assert cli._ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10" and cli._ranges([]) == ""


def test_a_run_where_no_client_trains_warns_and_reports_null(tmp_path, capsys):
    text = _write(tmp_path, 2).read_text().replace("client_learning_rate = 0.1",
                                                   "client_learning_rate = 1e30")
    cfg = tmp_path / "diverge.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    code = cli.main(["run", str(cfg), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 0, err
    assert "no client" in captured.out.splitlines()[2]  # the table's train loss column
    assert "warning: fedadam: no client trained in round(s) 1-2 of 2" in err
    rows = _strict_json(out / "fedadam" / "metrics.jsonl")
    assert [(r["train_loss"], r["num_examples"]) for r in rows] == [(None, 0.0), (None, 0.0)]
    for summary in (_strict_json(out / "summary.json")["runs"]["fedadam"],
                    _strict_json(out / "fedadam" / "summary.json")):
        assert summary["final_train_loss"] is None
        assert summary["rounds_no_client_trained"] == "1-2"


@pytest.mark.slow
def test_resume_extends_names_config_keys_and_falls_back_past_a_corrupt_step(tmp_path, capsys):
    """A finished 4-round run extended to 6 equals a 6-round run; a forged newest step is left
    in place and the run resumes from the older one, saying so; refusals name what differs."""
    cfg4, cfg6 = _write(tmp_path, 4), _write(tmp_path, 6)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _err(capsys, ["run", str(cfg6), "--out", str(ref), "--no-progress"])[0] == 0
    want = _strict_json(ref / "summary.json")["runs"]["fedadam"]["params_sha256"]
    want_rows = _strict_json(ref / "fedadam" / "metrics.jsonl")
    assert _err(capsys, ["run", str(cfg4), "--out", str(run), "--no-progress"])[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)

    changed = tmp_path / "changed.toml"
    changed.write_text(cfg6.read_text().replace("server_learning_rate = 0.03",
                                                "server_learning_rate = 0.05"))
    code, err = _err(capsys, ["run", str(changed), "--out", str(run), "--resume"])
    assert code == 2 and ("different config (algorithms[0].server_learning_rate: checkpoint "
                          "0.03, now 0.05)") in err
    code, err = _err(capsys, ["run", str(cfg4), "--out", str(run), "--resume", "--rounds", "3"])
    assert code == 2 and "--rounds: the checkpoint" in err and "at round 4, past" in err
    code, err = _err(capsys, ["run", str(cfg4), "--out", str(run), "--resume", "--rounds", "6",
                              "--no-progress"])
    assert code == 0, err
    assert _strict_json(run / "summary.json")["runs"]["fedadam"]["params_sha256"] == want
    assert _strict_json(run / "fedadam" / "metrics.jsonl") == want_rows

    # The newest step of the copy gets a forged accuracy in a still-valid manifest.
    manifest = copy / "fedadam" / "checkpoints" / "4" / "manifest" / "metadata"
    data = json.loads(manifest.read_text())
    data["metadata"]["history"][-1]["test_accuracy"] = 0.99
    manifest.write_text(json.dumps(data))
    forged = manifest.read_bytes()
    code, err = _err(capsys, ["run", str(cfg6), "--out", str(copy), "--resume-from", "4"])
    assert code == 2 and "--resume-from: checkpoint" in err and "4 is corrupt (the manifest" in err
    code, err = _err(capsys, ["run", str(cfg6), "--out", str(copy), "--resume", "--no-progress"])
    assert code == 0, err
    assert "warning: checkpoint" in err and "4 is corrupt (the manifest's SHA-256 differs" in err
    assert "trying the older step 2" in err and "resuming from round 2" in err
    for noise in ("pybind", "TensorStore", "restore(..."):
        assert noise not in err
    assert manifest.read_bytes() == forged  # left in place
    assert _strict_json(copy / "summary.json")["runs"]["fedadam"]["params_sha256"] == want
    rows = _strict_json(copy / "fedadam" / "metrics.jsonl")
    assert rows == want_rows and all(r.get("test_accuracy") != 0.99 for r in rows)
    assert ckpt.complete_steps(copy / "fedadam" / "checkpoints") == [4, 6]


_TWO_DEVICE_RUN = """
import sys
from fedjax_lab import cli
sys.exit(cli.main(["run", sys.argv[1], "--out", sys.argv[2], "--no-progress"]))
"""


@pytest.mark.slow
def test_resume_on_another_device_count_is_refused_or_continued_explicitly(tmp_path, capsys):
    """client_map = "auto" shards over 2 devices; resuming that on 1 device is refused naming
    both setups (before anything compiles), and continues only under --allow-device-change."""
    from _problems import run_on_host_devices

    auto = TINY.replace('client_map = "sequential"', 'client_map = "auto"')
    cfg2, cfg4 = tmp_path / "auto2.toml", tmp_path / "auto4.toml"
    cfg2.write_text(auto.format(rounds=2))
    cfg4.write_text(auto.format(rounds=4))
    out = tmp_path / "run"
    run_on_host_devices(_TWO_DEVICE_RUN, tmp_path, 2, str(cfg2), str(out))
    import jax

    assert jax.device_count() == 1
    start = time.perf_counter()
    code, err = _err(capsys, ["run", str(cfg4), "--out", str(out), "--resume"])
    assert code == 2
    assert ("was written with client map sharded(sequential(), all devices) on 2 cpu device(s)"
            "; this process would continue with client map sequential() on 1 cpu device(s)"
            ) in err and "--allow-device-change" in err
    assert time.perf_counter() - start < 20  # refused before training
    code, err = _err(capsys, ["run", str(cfg4), "--out", str(out), "--resume",
                              "--allow-device-change", "--no-progress"])
    assert code == 0, err
    assert "(--allow-device-change). The result will differ in float rounding" in err
    summary = _strict_json(out / "summary.json")["runs"]["fedadam"]
    assert summary["rounds"] == 4
    assert summary["device_changes"] == [{
        "round": 2,
        "from": {"client_map": "sharded(sequential(), all devices)", "backend": "cpu",
                 "devices": 2},
        "to": {"client_map": "sequential()", "backend": "cpu", "devices": 1},
    }]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 240):
    return subprocess.run([sys.executable, "-m", "fedjax_lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or dict(os.environ))


def test_help_and_version_answer_without_loading_jax():
    from fedjax_lab import __version__

    res = _cli(["--help"])
    assert res.returncode == 0, res.stderr
    assert "usage: fedjax-lab" in res.stdout and "fedjax-lab run --out runs/default" in res.stdout
    assert "``" not in res.stdout  # plain text, no reST markup
    res = _cli(["run", "--help"])
    assert res.returncode == 0 and "--devices N" in res.stdout and "--resume" in res.stdout
    assert "example:" in res.stdout and "``" not in res.stdout
    res = _cli(["--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"fedjax-lab {__version__}"
    res = _cli(["run"])  # argparse names the missing argument
    assert res.returncode == 2 and "--out" in res.stderr
    code = ("import sys, fedjax_lab, fedjax_lab.cli; fedjax_lab.__version__; "
            "fedjax_lab.cli._parser(); "
            "print(sorted(m for m in ('jax', 'numpy', 'fedjax_lab.experiment') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


def test_lazy_package_keeps_every_public_name():
    import fedjax_lab as fl

    assert set(fl.__all__) <= set(dir(fl))
    for name in fl.__all__:
        assert getattr(fl, name) is not None, name
    assert fl.run_sweep is fl.sweep.sweep and fl.FederatedData is fl.data.FederatedData
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fl.nope  # noqa: B018


@pytest.mark.parametrize(
    "requested, environ, want_line, want_flags",
    [
        (None, {}, "devices: 2 CPU devices (one per core; --devices 1 to disable)",
         "--xla_force_host_platform_device_count=2"),
        (1, {}, "devices: 1 CPU device (--devices 1)", None),
        (3, {}, "devices: 3 CPU devices (--devices)", "--xla_force_host_platform_device_count=3"),
        (None, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
         "XLA_FLAGS sets the device count, left as it is",
         "--xla_force_host_platform_device_count=4"),
        (None, {"XLA_FLAGS": "--xla_backend_optimization_level=0"}, "devices: 2 CPU devices",
         "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"),
        (1, {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=4"},
         "devices: 1 CPU device (--devices 1)", "--a=1"),
        (None, {"JAX_PLATFORMS": "cuda"}, "not splitting the host CPU (JAX_PLATFORMS=cuda", None),
        (None, {"JAX_PLATFORMS": "cpu"}, "devices: 2 CPU devices",
         "--xla_force_host_platform_device_count=2"),
    ],
)
def test_cli_chooses_one_device_per_core_unless_told(requested, environ, want_line, want_flags):
    line = cli._choose_devices(requested, environ, cores=2)
    assert want_line in line, line
    assert environ.get("XLA_FLAGS") == want_flags
    with pytest.raises(ValueError, match="--devices: need a whole number >= 1"):
        cli._choose_devices(0, {}, cores=2)


_DEVICES_SHOWN = """
import sys
from fedjax_lab import cli
code = cli.main(sys.argv[1:])
import jax
print("jax devices:", jax.device_count())
sys.exit(code)
"""


@pytest.mark.slow
def test_run_uses_the_chosen_devices_and_resumes_with_the_default(tmp_path):
    """In a subprocess (JAX not loaded yet): the default splits the host; --devices 1 and a
    preset XLA_FLAGS are honoured; a run on the default devices resumes on the default."""
    script = tmp_path / "devices.py"
    script.write_text(_DEVICES_SHOWN)
    auto = TINY.replace('client_map = "sequential"', 'client_map = "auto"')
    cfg2, cfg4 = tmp_path / "a2.toml", tmp_path / "a4.toml"
    cfg2.write_text(auto.format(rounds=2))
    cfg4.write_text(auto.format(rounds=4))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cores = cli._physical_cores()

    def run(*args, **extra):
        res = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                             text=True, timeout=300, env={**env, **extra})
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    out = tmp_path / "run"
    res = run("run", str(cfg2), "--out", str(out), "--no-progress")
    assert f"jax devices: {cores}" in res.stdout
    if cores > 1:
        assert f"devices: {cores} CPU devices (one per core" in res.stderr
    res = run("run", str(cfg4), "--out", str(out), "--resume", "--no-progress")
    assert "resuming from round 2" in res.stderr and f"jax devices: {cores}" in res.stdout
    summary = json.loads((out / "fedadam" / "summary.json").read_text())
    assert summary["rounds"] == 4 and "device_changes" not in summary
    res = run("run", str(cfg2), "--out", str(tmp_path / "one"), "--no-progress", "--devices", "1")
    assert "jax devices: 1" in res.stdout and "devices: 1 CPU device (--devices 1)" in res.stderr
    res = run("run", str(cfg2), "--out", str(tmp_path / "three"), "--no-progress",
              XLA_FLAGS="--xla_force_host_platform_device_count=3")
    assert "jax devices: 3" in res.stdout
    assert "XLA_FLAGS sets the device count, left as it is" in res.stderr


def test_config_reference_lists_every_section_key_and_algorithm(capsys):
    import inspect

    import fedjax_lab as fl

    assert cli.main(["config", "--reference"]) == 0
    text = capsys.readouterr().out
    for section in ("[data]", "[model]", "[sampler]", "[training]", "[evaluation]",
                    "[checkpoint]", "[privacy]", "[[algorithms]]", "[sweep]",
                    *(f"[algorithms.{part}]" for part in exp_lib.PARTS)):
        assert f"\n{section}" in text, section
    for section, spec in (("training", exp_lib._TRAINING), ("evaluation", exp_lib._EVALUATION),
                          ("checkpoint", exp_lib._CHECKPOINT), ("privacy", exp_lib._PRIVACY)):
        block = text.split(f"\n[{section}]\n")[1].split("\n\n")[0]
        for key, (kind, _) in spec.items():
            assert f"  {key}: {kind.__name__}" in block, (section, key)
    assert "client_map: str = 'auto'; allowed: 'auto', 'chunked'" in text
    for name in fl.algorithms.REGISTRY:
        assert f"    {name}: " in text, name
    for name in (*fl.aggregators.REGISTRY, *fl.attacks.REGISTRY, *fl.compression.REGISTRY,
                 *fl.server.REGISTRY, *exp_lib._MODELS, *exp_lib._SAMPLERS,
                 *fl.data.datasets.DATASETS):
        assert f"name = {name!r}" in text, name
    assert "``" not in text and ":func:" not in text  # plain text
    assert cli.main(["config", "--reference", "--algorithm", "fedprox"]) == 0
    one = capsys.readouterr().out
    assert one.startswith("[[algorithms]] name = 'fedprox'") and "mu: float = 0.01" in one
    params = inspect.signature(fl.algorithms.REGISTRY["fedprox"]).parameters
    for key in set(params) - {"loss_fn", "client_optimizer", "name"}:
        assert f"      {key}: " in one, key
    assert "fedadam" not in one
    code, err = _err(capsys, ["config", "--reference", "--algorithm", "fedprx"])
    assert code == 2 and "--algorithm: got 'fedprx'; allowed: 'apfl', 'ditto'" in err


def test_config_init_writes_a_loadable_starter_for_every_algorithm(tmp_path, capsys):
    import fedjax_lab as fl

    for name in sorted(fl.algorithms.REGISTRY):
        path = tmp_path / f"{name}.toml"
        assert cli.main(["config", "--init", name, "--out", str(path)]) == 0, name
        assert f"fedjax-lab run {path}" in capsys.readouterr().err
        cfg = exp_lib.load_config(path)
        assert [a["name"] for a in cfg["algorithms"]] == [name]
        assert path.read_text().startswith(f"# fedjax-lab starter config: {name}")
    assert cli.main(["config", "--init", "fedprox"]) == 0
    assert "# mu = 0.01" in capsys.readouterr().out
    again = ["config", "--init", "fedprox", "--out", str(tmp_path / "fedprox.toml")]
    code, err = _err(capsys, again)
    assert code == 2 and "already exists" in err
    code, err = _err(capsys, ["config", "--init", "nope"])
    assert code == 2 and "--init: got 'nope'; allowed:" in err


SWEEPS = sorted(
    (Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("sweep_*.toml"))


def test_shipped_sweep_configs_validate_and_one_runs_via_the_cli(tmp_path):
    names = {p.stem for p in SWEEPS}
    assert {"sweep_fedadam", "sweep_fedavg_client_lr", "sweep_fedprox_mu"} <= names
    axes = set()
    for path in SWEEPS:
        cfg = exp_lib.load_config(path)
        table = dict(cfg["sweep"])
        alg, seeds = table.pop("algorithm"), table.pop("seeds")
        assert seeds and table, path
        base = next(a for a in cfg["algorithms"] if a["name"] == alg)
        for i in range(max(len(v) for v in table.values())):  # every value is accepted
            probe = {**base, **{k: v[min(i, len(v) - 1)] for k, v in table.items()}}
            exp_lib.validate({**cfg, "algorithms": [probe]})
        axes |= set(table)
    assert {"client_learning_rate", "server_learning_rate", "mu"} <= axes
    out = tmp_path / "sweep"
    path = next(p for p in SWEEPS if p.stem == "sweep_fedprox_mu")
    assert cli.main(["sweep", str(path), "--out", str(out), "--rounds", "2"]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {float(r["mu"]) for r in rows} == {0.0, 0.001, 0.01, 0.1}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
