"""The ``fedjax-lab`` command: run an experiment config, show progress, write results and plots.

``fedjax-lab run [CONFIG] --out DIR [--rounds N] [--resume]`` runs every ``[[algorithms]]`` entry
of CONFIG (the default experiment when CONFIG is omitted) as compiled blocks of
``evaluation.every`` rounds (one ``lax.scan`` each). Between blocks a progress bar shows the
round, train loss, latest test accuracy, rounds/s and ETA. It writes, per algorithm,
``DIR/<label>/metrics.jsonl`` (one line a round; with a sampled ``max_local_steps``, see
:class:`fedjax_lab.kit.BudgetSampler`, each line adds the cohort's ``mean_local_step_budget``
and ``mean_local_steps`` actually taken) and ``DIR/<label>/checkpoints/``, and for the
whole run ``DIR/summary.json`` (config, versions, device, wall time, final metrics and
``params_sha256`` per algorithm; a ``dp_fedavg`` or ``dp_ftrl`` run adds the privacy spent:
``epsilon`` (of the sampler actually used), ``delta``, ``accountant``, ``sampling``,
``sampling_rate``, ``noise_multiplier``, ``epsilon_poisson`` (the Poisson approximation), see
:func:`fedjax_lab.experiment.privacy_spent`, also printed) and the plots ``accuracy.png``,
``train_loss.png`` and ``client_accuracy.png``. ``--resume`` continues every run from its last
good checkpoint and ends bit-identical to a run never interrupted; ``--resume --rounds N`` with
N larger than a finished run's rounds extends it, ending identical to a run of N rounds.

Resuming checks, before anything compiles, that the checkpoint was written by the same config
(the refusal names the keys that differ; ``training.rounds`` may grow) and on the same
execution setup: the resolved client map, backend and device count are recorded in every
checkpoint, and a different one (e.g. ``client_map = "auto"`` sharded over 2 devices, resumed on
1) is refused unless ``--allow-device-change`` is given, which continues and says the result
will differ from an uninterrupted run in float rounding. A corrupt newest checkpoint is left in
place and the run falls back to the newest intact step, saying so; ``--resume-from STEP``
resumes from a chosen step. A round in which no client trained (every sampled client dropped)
has ``train_loss: null`` in ``metrics.jsonl`` and the CLI warns naming those rounds; every JSON
file written is strict JSON (no ``NaN`` tokens). Every error the CLI foresees (bad config,
unusable ``--out``, bad data files, refused resume) prints ``fedjax-lab: error: ...`` naming
the argument or path and the fix, and exits with status 2.

``fedjax-lab sweep CONFIG --out DIR`` runs the config's ``[sweep]`` grid as one compiled program
and writes ``sweep.csv`` and ``sweep.png`` (see :func:`fedjax_lab.sweep.sweep`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

# Nothing heavy at module level: --help, --version and argument errors answer without loading
# JAX. The commands import it, after choosing the host devices (see choose_devices).
if TYPE_CHECKING:
    from fedjax_lab import experiment as exp_lib

__all__ = ["main", "run_experiment"]

_ROW_KEYS = ("train_loss", "num_examples", "dropped_clients", "round_skipped", "update_norm")
_SKIP_REASONS = ("skipped_non_finite_update", "skipped_update_norm",
                 "skipped_non_finite_server_state")
_BUDGET_KEYS = ("local_step_budget", "budget_clients", "num_steps")  # sampled budgets only
_HIST_KEYS = (*_ROW_KEYS, *_SKIP_REASONS, *_BUDGET_KEYS, "eval_accuracy",
              "eval_loss")  # what _rows reads


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _environment() -> dict[str, Any]:
    import jax

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


def _finite(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _rows(hist: dict[str, Any], first_round: int) -> list[dict[str, Any]]:
    """Per-round JSON rows from a block's history (one host transfer per block).

    Non-finite values become ``None`` (JSON ``null``). A round in which no client trained
    (``num_examples == 0``: every sampled client was dropped) has ``train_loss`` ``None``
    whatever the engine reported for it, never ``0.0``.
    """
    import numpy as np

    hist = _host({k: v for k, v in hist.items() if k in _HIST_KEYS})
    n = len(hist["train_loss"])
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"round": first_round + i + 1}
        for k in _ROW_KEYS:
            row[k] = _finite(hist[k][i])
        if not row["num_examples"]:
            row["train_loss"] = None
        for k in _SKIP_REASONS:  # why a guarded round was refused (only when it was)
            if k in hist and hist[k][i] > 0:
                row["skip_reason"] = k[len("skipped_"):]
        if "local_step_budget" in hist:  # a sampled max_local_steps (fl.kit.BudgetSampler)
            clients = float(hist["budget_clients"][i])
            for name, k in (("mean_local_step_budget", "local_step_budget"),
                            ("mean_local_steps", "num_steps")):
                row[name] = float(hist[k][i]) / clients if clients > 0 else None
        for k in ("eval_accuracy", "eval_loss"):
            if k in hist and np.isfinite(hist[k][i]):
                row["test_" + k[5:]] = float(hist[k][i])
        rows.append(row)
    return rows


def _host(tree: Any) -> Any:
    """NumPy copies of a tree's arrays, also of arrays spread over several processes' devices.

    A replicated array is read from this process's copy; another one (e.g. per-client values
    split over a multi-process mesh) is gathered from every process, which all call this.
    """
    import jax
    import numpy as np

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def _json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (non-finite floats as ``null``, never a bare ``NaN``/``Infinity`` token)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _ranges(rounds: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts: list[str] = []
    start = prev = None
    for r in [*rounds, None]:
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = r
    return ", ".join(parts)


def _execution(experiment: exp_lib.Experiment) -> dict[str, Any]:
    """The setup the rounds run on: what decides their float rounding besides the config."""
    import jax

    from fedjax_lab import maps as maps_lib

    client_map = experiment.client_map
    if client_map is maps_lib.auto():
        client_map = maps_lib.choose(experiment.config["training"]["cohort_size"])
    return {"client_map": client_map.name, "backend": jax.default_backend(),
            "devices": jax.device_count()}


def _same_execution(saved: dict[str, Any] | None, now: dict[str, Any]) -> bool:
    if not isinstance(saved, dict):
        return False
    keys = ["client_map", "backend"]
    if str(now["client_map"]).startswith("sharded(") or str(
        saved.get("client_map", "")
    ).startswith("sharded("):
        keys.append("devices")
    return all(saved.get(k) == now[k] for k in keys)


def _describe_execution(e: dict[str, Any] | None) -> str:
    if not isinstance(e, dict):
        return "an unrecorded setup"
    return f"client map {e.get('client_map')} on {e.get('devices')} {e.get('backend')} device(s)"


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


_MISSING = object()


def _config_diff(saved: Any, now: Any) -> list[str]:
    """The keys whose values differ, as ``"key: checkpoint A, now B"`` (``training.rounds``
    excluded: a run may be extended)."""
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if key == "training.rounds":
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            show = [("(unset)" if v is _MISSING else json.dumps(v)) for v in (va, vb)]
            out.append(f"{key}: checkpoint {show[0]}, now {show[1]}")
    return out


def _uncommitted(tree: Any) -> Any:
    """The same bits as arrays not committed to a device, like a fresh run's state.

    A restored array is committed to the device it was read onto; next to the engine's
    replicated params on several devices, jit would refuse it ("incompatible devices").
    """
    import jax
    import jax.numpy as jnp
    import numpy as np


    def one(x: Any) -> Any:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jnp.asarray(np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jnp.asarray(np.asarray(x))

    return jax.tree.map(one, tree)


def _warn(msg: str) -> None:
    print(f"fedjax-lab: warning: {msg}", file=sys.stderr)


def _seeds(cfg: dict[str, Any]) -> list[int]:
    """The run's seeds: ``training.seed`` and, with ``training.seeds = S``, the next S - 1."""
    training = cfg["training"]
    return [training["seed"] + i for i in range(training.get("seeds", 1))]


def _round_of(state: Any) -> int:
    """The rounds a state has run (every seed of a stacked state stands at the same round)."""
    import numpy as np

    return int(np.asarray(state.round).reshape(-1)[0])


def _is_writer() -> bool:
    """Whether this process writes files: process 0 of a multi-process run (or the only one)."""
    import jax

    return jax.process_index() == 0


def _barrier(name: str) -> None:
    """Every process waits here for the others (nothing to wait for with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fedjax_lab:{name}")


class _Start(NamedTuple):
    state: Any
    run_key: Any
    history: list[dict[str, Any]]
    device_changes: list[dict[str, Any]]


def _start(
    experiment: exp_lib.Experiment,
    label: str,
    out: Path,
    *,
    resume: bool,
    resume_from: int | None,
    allow_device_change: bool,
) -> _Start:
    """The state a run starts from: fresh, or restored and checked (config, setup, rounds).

    Runs before anything compiles, for every algorithm of the config, so a refused resume of
    the last one does not cost the training of the first ones.
    """
    import jax

    from fedjax_lab import checkpoint as ckpt

    cfg = experiment.config
    alg = experiment.algorithms[label]
    run_dir = out / _slug(label)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    training = cfg["training"]
    seeds = _seeds(cfg)
    states, keys = [], []
    for seed in seeds:
        init_key, run_key = jax.random.split(jax.random.key(seed))
        states.append(alg.init(experiment.model.init(init_key),
                               num_clients=experiment.train.num_clients))
        keys.append(run_key)
    if len(seeds) == 1:
        state, run_key = states[0], keys[0]
    else:  # one leading seed axis: the seeds run as one program (fl.sweep.run_seeds)
        from fedjax_lab.sweep import stack_seeds

        state, run_key = stack_seeds(states), stack_seeds(keys)
    steps = ckpt.complete_steps(ckpt_dir) if ckpt_dir.is_dir() else []
    if not resume:
        if steps or metrics_path.exists():
            raise ValueError(
                f"--out: {run_dir} already holds a run; pass --resume to continue it or choose "
                "another --out (nothing was overwritten)."
            )
        return _Start(state, run_key, [], [])
    if not steps:
        if resume_from is not None:
            raise ValueError(
                f"--resume-from: {ckpt_dir} holds no complete checkpoint; drop --resume-from to "
                "start afresh, or point --out at the run to continue."
            )
        return _Start(state, run_key, [], [])
    if resume_from is not None and resume_from not in steps:
        raise ValueError(
            f"--resume-from: step {resume_from} is not a complete checkpoint in {ckpt_dir}; "
            f"complete steps: {steps}."
        )
    candidates = [resume_from] if resume_from is not None else list(reversed(steps))
    like = {"state": state, "key": run_key}
    restored = None
    for step in candidates:
        try:
            restored = ckpt.restore(ckpt_dir, like, step=step)
            break
        except ckpt.CorruptCheckpoint as e:
            older = [s for s in steps if s < step]
            if resume_from is not None:
                raise ValueError(
                    f"--resume-from: checkpoint {ckpt_dir}/{step} is corrupt ({e.reason}); it "
                    f"was left in place. Choose another step (complete steps: {steps})."
                ) from None
            _warn(
                f"checkpoint {ckpt_dir}/{step} is corrupt ({e.reason}); it was left in place"
                + (f"; trying the older step {older[-1]}." if older else ".")
            )
    if restored is None:
        raise ValueError(
            f"--resume: every checkpoint in {ckpt_dir} is corrupt (steps {steps}, left in "
            "place); choose another --out to start afresh."
        )
    tree, meta, step = restored
    tree = _uncommitted(tree)
    if meta.get("label") != label or meta.get("config") != _jsonable(cfg):
        diff = _config_diff(meta.get("config"), _jsonable(cfg))
        if meta.get("label") != label:
            diff.insert(0, f"label: checkpoint {meta.get('label')!r}, now {label!r}")
        if diff:
            raise ValueError(
                f"--resume: the checkpoint in {ckpt_dir} was written by a different config ("
                + "; ".join(diff) + "); resume with the same config or choose another --out."
            )
    done = _round_of(tree["state"])
    if done > training["rounds"]:
        raise ValueError(
            f"--rounds: the checkpoint {ckpt_dir}/{step} is at round {done}, past "
            f"training.rounds = {training['rounds']}; pass --rounds {done} or more, or choose "
            "another --out."
        )
    now = _execution(experiment)
    saved = meta.get("execution")
    changes = list(meta.get("device_changes", []))
    if not _same_execution(saved, now):
        what = (f"the checkpoint {ckpt_dir}/{step} was written with {_describe_execution(saved)}"
                f"; this process would continue with {_describe_execution(now)}")
        if not allow_device_change:
            raise ValueError(
                f"--resume: {what}. The result would match neither an uninterrupted run on the "
                "first setup nor one on the second. Resume on the same devices (e.g. the same "
                "XLA_FLAGS / CUDA_VISIBLE_DEVICES), or pass --allow-device-change to continue "
                "anyway."
            )
        _warn(
            f"{label}: {what} (--allow-device-change). The result will differ in float rounding "
            "from an uninterrupted run on either setup."
        )
        changes.append({"round": done, "from": saved, "to": now})
    if step != steps[-1]:
        print(f"fedjax-lab: {label}: resuming from round {done} (checkpoint {ckpt_dir}/{step}); "
              f"the newer step(s) {[s for s in steps if s > step]} are left as they are and "
              "not overwritten.", file=sys.stderr)
    else:
        print(f"fedjax-lab: {label}: resuming from round {done} (checkpoint {ckpt_dir}/{step}).",
              file=sys.stderr)
    return _Start(tree["state"], tree["key"], list(meta["history"]), changes)


def _seed_rows(history: list, seeds: list[int]) -> list[dict[str, Any]]:
    """``metrics.jsonl`` lines: the run's rows, or each seed's (round by round, with ``seed``)."""
    if len(seeds) == 1:
        return list(history)
    return [{"round": rows[i]["round"], "seed": seed, **rows[i]}
            for i in range(len(history[0])) for seed, rows in zip(seeds, history, strict=True)]


def _mean_history(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round, the mean over seeds of ``train_loss`` and ``test_accuracy`` (finite ones)."""
    import numpy as np

    out = []
    for rows in zip(*histories, strict=True):
        row: dict[str, Any] = {"round": rows[0]["round"]}
        for k in ("train_loss", "test_accuracy", "test_loss"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                row[k] = float(np.mean(vals))
            elif k == "train_loss":
                row[k] = None
        out.append(row)
    return out


_SEED_METRICS = ("test_accuracy", "test_loss", "client_accuracy_mean", "client_accuracy_p10",
                 "client_accuracy_p50", "client_accuracy_p90", "client_accuracy_std",
                 "final_train_loss")


def _final_metrics(final: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "client_accuracy_mean": final["accuracy_client_mean"],
        "client_accuracy_p10": final["accuracy_p10"],
        "client_accuracy_p50": final["accuracy_p50"],
        "client_accuracy_p90": final["accuracy_p90"],
        "client_accuracy_std": final["accuracy_std"],
        "final_train_loss": history[-1]["train_loss"] if history else None,
    }


_PERSONAL_METRICS = ("personalized_accuracy_mean", "personalized_accuracy_p10",
                     "fine_tuned_accuracy_mean", "fine_tuned_accuracy_p10")


def _personal_metrics(
    experiment: exp_lib.Experiment, spec: dict[str, Any], state: Any, seed: int, *, warn: bool
) -> dict[str, Any]:
    """The final model(s) evaluated per client: on its own model and/or after fine-tuning.

    ``evaluation.personalized`` (default on): for an algorithm whose clients keep their own
    model (:data:`fedjax_lab.personalization.PERSONALIZED_ALGORITHMS`), each test client on its
    own model (IFCA: the cluster of lowest loss on its training data). ``fine_tune_steps > 0``:
    the final global model fine-tuned on each client's training data, then tested. Both need
    the test split's client ``i`` to be the training split's client ``i``.
    """
    import jax
    import optax

    from fedjax_lab import personalization as pers

    evaluation = experiment.config["evaluation"]
    train, test = experiment.train, experiment.test
    name = spec["name"]
    personal = evaluation.get("personalized", True) and name in pers.PERSONALIZED_ALGORITHMS
    steps = evaluation.get("fine_tune_steps", 0)
    if name == "fedbn" and not state.client_states:
        personal = False  # a model without BatchNorm: FedBN is FedAvg, no own model
    if not (personal or steps):
        return {}
    if train.num_clients != test.num_clients:
        if warn:
            _warn(f"{spec.get('label', name)}: no per-client evaluation: the test split has "
                  f"{test.num_clients} clients, the training split {train.num_clients}; client "
                  "i's model is tested on test client i.")
        return {}
    out: dict[str, Any] = {}
    batch = evaluation["batch_size"]
    if personal:
        options = {k: spec[k] for k in ("local_keys", "global_mask") if k in spec}
        res = pers.evaluate_own_models(
            experiment.eval_fn, name, state, test, batch_size=batch,
            choose_on=train if name == "ifca" else None, **options,
        )
        out["personalized_accuracy_mean"] = res["personalized_accuracy_mean"]
        out["personalized_accuracy_p10"] = res["personalized_accuracy_p10"]
    if steps:
        res = pers.fine_tune_evaluate(
            experiment.loss_fn, experiment.eval_fn,
            optax.sgd(evaluation.get("fine_tune_learning_rate", 0.1)), state.params, train, test,
            steps=steps, batch_size=evaluation.get("fine_tune_batch_size", 10),
            key=jax.random.key(seed), eval_batch_size=batch,
        )
        out["fine_tuned_accuracy_mean"] = res["personalized_accuracy_mean"]
        out["fine_tuned_accuracy_p10"] = res["personalized_accuracy_p10"]
    return {k: float(v) for k, v in out.items()}


def _warn_rounds(name: str, history: list[dict[str, Any]], *, warn: bool = True) -> str:
    """Warns about refused and idle rounds of one run (or seed); returns the idle ranges."""
    for reason in ("non_finite_update", "update_norm", "non_finite_server_state"):
        refused = [r["round"] for r in history if r.get("skip_reason") == reason]
        if refused and warn:
            _warn(
                f"{name}: round(s) {_ranges(refused)} were refused by the guarded server step "
                f"({reason}): the aggregate or the new server state was not finite (or above "
                "max_update_norm), so the state was kept as it was before those rounds."
            )
    idle = [r["round"] for r in history if r.get("train_loss") is None]
    if idle and warn:
        _warn(
            f"{name}: no client trained in round(s) {_ranges(idle)} of {len(history)}: every "
            "sampled client was dropped (its update was not finite, e.g. a learning rate too "
            "large) or held no example; train_loss is null there and the model did not change."
        )
    return _ranges(idle)


def _run_one(
    experiment: exp_lib.Experiment,
    label: str,
    out: Path,
    start: _Start,
    *,
    progress: bool,
) -> dict[str, Any]:
    """Runs one algorithm of the experiment from ``start`` with checkpoints; returns its summary.

    With ``training.seeds = S > 1`` the S seeds advance together, one compiled program a block
    (:func:`fedjax_lab.sweep.run_seeds`), and the final metrics are mean ± 95% CI over them.
    Under ``jax.distributed`` every process runs the same blocks and only process 0 writes
    (metrics, checkpoints, summaries); the others wait for each checkpoint to be on disk.
    """
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from fedjax_lab import checkpoint as ckpt
    from fedjax_lab import experiment as exp_lib
    from fedjax_lab import metrics as metrics_lib
    from fedjax_lab.rounds import run_rounds
    from fedjax_lab.sweep import run_seeds

    cfg = experiment.config
    training, evaluation, checkpointing = cfg["training"], cfg["evaluation"], cfg["checkpoint"]
    alg = experiment.algorithms[label]
    run_dir = out / _slug(label)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    total = training["rounds"]
    block = evaluation["every"]
    seeds = _seeds(cfg)
    multi = len(seeds) > 1
    writer = _is_writer()
    state, run_key, history = start.state, start.run_key, list(start.history)
    if multi:
        history = [list(h) for h in history] if history else [[] for _ in seeds]
    execution = _execution(experiment)

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(metrics_path, "w") as f:  # what the checkpoint holds; later lines were lost
            f.writelines(_json(row) + "\n" for row in _seed_rows(history, seeds))

    done = _round_of(state)
    existing = ckpt.complete_steps(ckpt_dir) if ckpt_dir.is_dir() else []
    start_wall = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc=label, unit="round",
               disable=not progress or not writer, dynamic_ncols=True, file=sys.stderr)
    shown = _mean_history(history) if multi else history
    last_acc = next((r["test_accuracy"] for r in reversed(shown) if "test_accuracy" in r), None)
    while done < total:
        # Blocks end on multiples of `block`, as in a run never interrupted (an extended run
        # that had ended mid-block realigns).
        n = min(block - done % block, total - done)
        run = run_seeds if multi else run_rounds
        state, hist = run(
            alg, state, experiment.train, run_key,
            num_rounds=n,
            cohort_size=training["cohort_size"],
            batch_size=training["batch_size"],
            local_steps=training.get("local_steps"),
            epochs=training["epochs"],
            client_map=experiment.client_map,
            weighting=training.get("weighting", "num_examples"),
            sampler=experiment.sampler,
            max_update_norm=training.get("max_update_norm"),
            eval_fn=experiment.eval_fn,
            eval_data=experiment.test,
            eval_every=block,
            eval_batch_size=evaluation["batch_size"],
            **({} if multi else {"data_on": training.get("data_on", "device")}),
        )
        if multi:
            hist = _host({k: v for k, v in hist.items() if k in _HIST_KEYS})
            new = [_rows(jax.tree.map(lambda x, i=i: x[i], hist), done) for i in range(len(seeds))]
            for h, rows in zip(history, new, strict=True):
                h.extend(rows)
            rows = _mean_history(new)
            lines = _seed_rows(new, seeds)
        else:
            rows = lines = _rows(hist, done)
            history.extend(rows)
        done += n
        if writer:
            with open(metrics_path, "a") as f:
                f.writelines(_json(row) + "\n" for row in lines)
        last_acc = rows[-1].get("test_accuracy", last_acc)
        loss = rows[-1]["train_loss"]
        postfix = {"loss": "no client" if loss is None else f"{loss:.4f}"}
        if last_acc is not None:
            postfix["test_acc"] = f"{last_acc:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(n)
        if done % checkpointing["every"] == 0 or done == total:
            if existing and done <= existing[-1]:
                continue  # a step kept from before (e.g. a corrupt one): never overwritten
            if writer:
                ckpt.save(
                    ckpt_dir, done, {"state": state, "key": run_key},
                    metadata={"label": label, "config": _jsonable(cfg), "history": history,
                              "execution": execution, "device_changes": start.device_changes},
                    keep=checkpointing["keep"],
                )
            _barrier(f"{label}:checkpoint:{done}")  # no process runs ahead of the files
    bar.close()
    wall = time.perf_counter() - start_wall

    per_seed_state = ([jax.tree.map(lambda x, i=i: x[i], state) for i in range(len(seeds))]
                      if multi else [state])
    per_seed_history = history if multi else [history]
    spec = next(a for a in cfg["algorithms"] if a.get("label", a["name"]) == label)
    finals, metrics, idles = [], [], []
    for seed, st, hist_rows in zip(seeds, per_seed_state, per_seed_history, strict=True):
        final = metrics_lib.evaluate(
            experiment.eval_fn, st.params, experiment.test, batch_size=evaluation["batch_size"]
        )
        finals.append(final)
        metrics.append({**_final_metrics(final, hist_rows),
                        **_personal_metrics(experiment, spec, st, seed, warn=writer)})
        idles.append(_warn_rounds(f"{label} (seed {seed})" if multi else label, hist_rows,
                                  warn=writer))
    hashes = [ckpt.params_sha256(st.params) for st in per_seed_state]
    summary: dict[str, Any] = {
        "label": label,
        "algorithm": alg.name,
        "rounds": done,
        "wall_time_s": wall,
    }
    if multi:
        summary["seeds"] = seeds
        summary.update({k: metrics_lib.mean_ci95([m[k] for m in metrics])
                        for k in (*_SEED_METRICS, *_PERSONAL_METRICS) if k in metrics[0]})
        summary["rounds_no_client_trained"] = [i or None for i in idles]
        summary["params_sha256"] = hashes
    else:
        summary.update(metrics[0])
        summary["rounds_no_client_trained"] = idles[0] or None
        summary["params_sha256"] = hashes[0]
    summary["execution"] = execution
    if start.device_changes:
        summary["device_changes"] = start.device_changes
    spent = exp_lib.privacy_spent(cfg, spec, done, experiment.train.num_clients)
    if spent is not None:
        summary.update(spent)
        for key in ("epsilon", "epsilon_poisson"):
            if summary.get(key) == float("inf"):
                summary[key] = None  # JSON has no infinity; noise_multiplier 0 says why
    client_acc = np.stack([f["client_accuracy"] for f in finals], axis=-1)  # [clients, seeds]
    if writer:
        np.savetxt(run_dir / "client_accuracy.txt", client_acc if multi else client_acc[:, 0],
                   fmt="%.6f")
        (run_dir / "summary.json").write_text(_json(summary, indent=2) + "\n")
    initial = []
    for seed in seeds:  # the round-0 point of the accuracy plot
        init_key, _ = jax.random.split(jax.random.key(seed))
        initial.append(metrics_lib.evaluate(
            experiment.eval_fn, experiment.model.init(init_key), experiment.test,
            batch_size=evaluation["batch_size"],
        ))
    if not multi:
        return {"summary": summary, "history": history,
                "client_accuracy": finals[0]["client_accuracy"], "initial_eval": initial[0]}
    return {
        "summary": summary,
        "history": _mean_history(history),
        "seed_histories": history,
        "client_accuracy": client_acc.mean(axis=-1),  # each client's mean over the seeds
        "initial_eval": {k: float(np.mean([e[k] for e in initial]))
                         for k in ("accuracy", "accuracy_client_mean")},
        "initial_evals": initial,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _pm(m: dict[str, Any]) -> str:
    """``{"mean": .8123, "ci95": .0041}`` -> ``"0.8123 ± 0.0041"`` (no interval: the mean)."""
    if m["mean"] is None:
        return "no client"
    return f"{m['mean']:.4f}" + ("" if m["ci95"] is None else f" ± {m['ci95']:.4f}")


def _seeds_table(results: dict[str, dict[str, Any]]) -> list[str]:
    head = (f"{'algorithm':<14}{'seeds':>6}{'test acc':>19}{'client p10':>19}"
            f"{'client mean':>19}{'train loss':>19}{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for label, res in results.items():
        s = res["summary"]
        if "seeds" not in s:
            cells = [{"mean": s[k], "ci95": None} for k in (
                "test_accuracy", "client_accuracy_p10", "client_accuracy_mean",
                "final_train_loss")]
            n = 1
        else:
            cells = [s[k] for k in ("test_accuracy", "client_accuracy_p10",
                                    "client_accuracy_mean", "final_train_loss")]
            n = len(s["seeds"])
        lines.append(f"{label:<14}{n:>6}" + "".join(f"{_pm(c):>19}" for c in cells)
                     + f"{s['wall_time_s']:>8.1f}")
    lines.append("(mean ± half-width of the 95% confidence interval over the seeds, Student t)")
    return lines


def _table(results: dict[str, dict[str, Any]]) -> str:
    if any("seeds" in res["summary"] for res in results.values()):
        return "\n".join(_seeds_table(results) + _privacy_lines(results))
    head = (f"{'algorithm':<14}{'test acc':>9}{'client p10':>11}{'client mean':>12}"
            f"{'train loss':>11}{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for label, res in results.items():
        s = res["summary"]
        loss = s["final_train_loss"]
        loss = "no client" if loss is None else f"{loss:.4f}"
        lines.append(
            f"{label:<14}{s['test_accuracy']:>9.4f}{s['client_accuracy_p10']:>11.4f}"
            f"{s['client_accuracy_mean']:>12.4f}{loss:>11}{s['wall_time_s']:>8.1f}"
        )
    return "\n".join(lines + _personal_lines(results) + _privacy_lines(results))


def _personal_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for label, res in results.items():
        s = res["summary"]
        parts = [f"{what} {s[key]:.4f}" for key, what in (
            ("personalized_accuracy_mean", "own-model client mean accuracy"),
            ("fine_tuned_accuracy_mean", "fine-tuned client mean accuracy"),
        ) if isinstance(s.get(key), float)]
        if parts:
            lines.append(f"{label}: " + ", ".join(parts))
    return lines


def _privacy_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for label, res in results.items():
        s = res["summary"]
        if "noise_multiplier" not in s:
            continue
        if s["sampling"] is None:
            lines.append(f"{label}: no epsilon: {s['sampling_note']}")
            continue
        eps = "inf (noise_multiplier 0: no privacy)" if s["epsilon"] is None else (
            f"{s['epsilon']:.4g}"
        )
        if s["sampling"] == "none":  # DP-FTRL: no sampling assumption
            how = f"no sampling assumed, {s['accountant'].upper()} accountant; {s['sampling_note']}"
        else:
            how = (f"sampling rate {s['sampling_rate']:g}, {s['sampling']} sampling, "
                   f"{s['accountant'].upper()} accountant")
            if s["sampling"] != "poisson" and s["epsilon"] is not None:
                how += (f"; Poisson approximation: epsilon_poisson = "
                        f"{s['epsilon_poisson']:.4g} ({s['accountant_poisson'].upper()})")
            how += f"; {s['sampling_note']}"
        lines.append(
            f"{label}: epsilon = {eps} at delta = {s['delta']:g} after {s['rounds']} rounds "
            f"(noise_multiplier {s['noise_multiplier']:g}, {how})"
        )
    return lines


def _prepare_out(out: str | os.PathLike) -> Path:
    """``out`` as a directory this process can write, or a ``ConfigError`` naming it."""
    from fedjax_lab import experiment as exp_lib

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise exp_lib.ConfigError(
            f"--out: {path} is a file, not a directory; give a new or existing directory."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise exp_lib.ConfigError(
            f"--out: cannot create the directory {path} ({e.strerror or e}); choose a location "
            "you can write to."
        ) from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise exp_lib.ConfigError(
            f"--out: cannot write in {path} ({e.strerror or e}); choose a writable directory "
            "or fix its permissions."
        ) from None
    return path


def run_experiment(
    config: dict[str, Any] | None,
    out: str | os.PathLike,
    *,
    rounds: int | None = None,
    seeds: int | None = None,
    resume: bool = False,
    resume_from: int | None = None,
    allow_device_change: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs a config (``None``: the default experiment) into ``out``; returns the summary dict.

    ``seeds`` (``--seeds N``) overrides ``training.seeds``: N > 1 runs the seeds
    ``training.seed .. training.seed + N - 1`` as one compiled program and reports every final
    metric as ``{"mean", "ci95", "n", "per_seed"}`` (:func:`fedjax_lab.metrics.mean_ci95`).
    ``resume_from`` (a checkpoint step, implies ``resume``) resumes from that step instead of
    the newest intact one; ``allow_device_change`` continues a checkpoint written on another
    execution setup (client map, backend, device count) instead of refusing it.

    Under ``jax.distributed`` (initialised first, e.g. by ``fedjax-lab run --coordinator``)
    every process calls this with the same arguments; process 0 alone writes into ``out`` and
    the others read its checkpoints, so ``out`` must be one directory every process sees (a
    shared filesystem). Every process returns the same summary.

    Example (not run here: it trains):
      ``fl.cli.run_experiment(None, "runs/default", seeds=8)``
    """
    import jax

    from fedjax_lab import distributed
    from fedjax_lab import experiment as exp_lib
    from fedjax_lab import plots as plots_lib

    cfg = exp_lib.validate(config or {})
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise exp_lib.ConfigError(f"--rounds: need a whole number >= 1, got {rounds!r}.")
        cfg["training"]["rounds"] = rounds
        cfg = exp_lib.validate(cfg)
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise exp_lib.ConfigError(
                f"--seeds: need a whole number >= 1 (how many seeds to run), got {seeds!r}."
            )
        if seeds > 1 or "seeds" in cfg["training"]:  # 1 left unset keeps the config as it was
            cfg["training"]["seeds"] = seeds
    if resume_from is not None:
        if isinstance(resume_from, bool) or not isinstance(resume_from, int) or resume_from < 0:
            raise exp_lib.ConfigError(
                f"--resume-from: need a checkpoint step (a whole number >= 0), got "
                f"{resume_from!r}."
            )
        resume = True
    writer = _is_writer()
    out = _prepare_out(out) if writer else Path(out)  # the others write nothing
    experiment = exp_lib.build(cfg)
    if jax.process_count() > 1:
        distributed.check_same_everywhere(experiment.train, name="train_data")
    if writer:
        print(f"fedjax-lab: {cfg['name']}", file=sys.stderr)
        print(experiment.train.describe(), file=sys.stderr)
        procs = (f", {jax.process_count()} processes ({jax.device_count()} devices in all)"
                 if jax.process_count() > 1 else "")
        print(f"client map: {experiment.client_map.name} on {jax.default_backend()} "
              f"({jax.local_device_count()} device(s){procs})", file=sys.stderr)
    starts = {
        label: _start(experiment, label, out, resume=resume, resume_from=resume_from,
                      allow_device_change=allow_device_change)
        for label in experiment.algorithms
    }
    _barrier("started")  # every process has checked --out before process 0 writes into it
    start = time.perf_counter()
    results = {
        label: _run_one(experiment, label, out, starts[label], progress=progress)
        for label in experiment.algorithms
    }
    summary = {
        "config": cfg,
        "environment": _environment(),
        "wall_time_s": time.perf_counter() - start,
        "runs": {label: res["summary"] for label, res in results.items()},
        "plots": list(plots_lib.EXPERIMENT_PLOTS),
    }
    if jax.process_count() > 1:
        summary["processes"] = jax.process_count()
    if writer:
        summary["plots"] = plots_lib.write_experiment_plots(out, results, cfg)
        (out / "summary.json").write_text(_json(summary, indent=2) + "\n")
        print(_table(results))
        print(f"\nwrote {out}/summary.json, metrics.jsonl per run, {', '.join(summary['plots'])}")
    _barrier("written")  # no process exits (or reads the results) before process 0 wrote them
    return summary


_DESCRIPTION = """\
Federated learning on JAX: run an experiment config, show progress, write metrics, checkpoints
and plots.

examples:
  fedjax-lab run --out runs/default                 # the default experiment (digits, 300 rounds)
  fedjax-lab run experiments/configs/fedprox.toml --out runs/fedprox
  fedjax-lab run CONFIG --out DIR --resume          # continue an interrupted run
  fedjax-lab sweep experiments/configs/sweep_fedadam.toml --out runs/sweep
"""

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "jax_plugins", "libtpu")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads of one core count once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _accelerator(environ: dict[str, str]) -> str | None:
    """Why JAX may find an accelerator (checked without importing JAX), or ``None``."""
    import importlib.util

    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms not in ("", "cpu"):
        return f"JAX_PLATFORMS={environ['JAX_PLATFORMS']}"
    if platforms == "cpu":
        return None
    for name in _ACCELERATOR_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            return f"the {name} package is installed"
    return None


def _choose_devices(
    requested: int | None,
    environ: dict[str, str],
    *,
    cores: int | None = None,
    jax_loaded: bool = False,
) -> str:
    """Sets ``XLA_FLAGS`` in ``environ`` to split a CPU-only host into XLA devices; says what.

    By default a CPU-only host gets one XLA device per physical core (``cores``, default
    counted from this process's CPU affinity). ``XLA_FLAGS`` already set, an accelerator that
    may be present (``JAX_PLATFORMS`` other than ``cpu``, or a CUDA/ROCm/TPU plugin installed),
    or JAX already loaded (the count is fixed when JAX starts) leave everything as it is.
    ``requested`` (``--devices N``) asks for N devices; 1 is no split. Returns the line the CLI
    prints on stderr.

    Example:
      >>> env = {}
      >>> _choose_devices(None, env, cores=2)
      'devices: 2 CPU devices (one per core; --devices 1 to disable)'
      >>> env["XLA_FLAGS"]
      '--xla_force_host_platform_device_count=2'
      >>> _choose_devices(None, {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}, cores=2)
      'devices: XLA_FLAGS is set, left as it is (--devices N to choose)'
    """
    if requested is not None and (isinstance(requested, bool) or requested < 1):
        raise ValueError(f"--devices: need a whole number >= 1, got {requested!r}.")
    if jax_loaded:
        return "devices: JAX is already loaded in this process; using the devices it has"
    flags = environ.get("XLA_FLAGS", "")
    if requested is None:
        if flags.strip():
            return "devices: XLA_FLAGS is set, left as it is (--devices N to choose)"
        why = _accelerator(environ)
        if why is not None:
            return f"devices: not splitting the host CPU ({why}; an accelerator may be present)"
        requested = cores if cores is not None else _physical_cores()
        if requested == 1:
            return "devices: 1 CPU device (one core)"
        how = "one per core; --devices 1 to disable"
    else:
        how = "--devices"
    kept = [f for f in flags.split() if not f.startswith(_DEVICE_FLAG)]
    if requested > 1:
        kept.append(f"{_DEVICE_FLAG}={requested}")
    if kept:
        environ["XLA_FLAGS"] = " ".join(kept)
    else:
        environ.pop("XLA_FLAGS", None)
    if requested == 1:
        return "devices: 1 CPU device (--devices 1)"
    return f"devices: {requested} CPU devices ({how})"


_ENV_COORDINATOR = "FEDJAX_LAB_COORDINATOR"
_ENV_NUM_PROCESSES = "FEDJAX_LAB_NUM_PROCESSES"
_ENV_PROCESS_ID = "FEDJAX_LAB_PROCESS_ID"


def _processes(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    environ: dict[str, str],
) -> tuple[str, int, int] | None:
    """The ``jax.distributed`` settings of ``fedjax-lab run``, checked; ``None``: one process.

    Each of ``--coordinator``, ``--num-processes`` and ``--process-id`` falls back on its
    environment variable (``FEDJAX_LAB_COORDINATOR``, ``FEDJAX_LAB_NUM_PROCESSES``,
    ``FEDJAX_LAB_PROCESS_ID``); give all three or none. Checked before JAX loads.

    Example:
      >>> _processes("localhost:1234", 2, None, {"FEDJAX_LAB_PROCESS_ID": "1"})
      ('localhost:1234', 2, 1)
      >>> _processes(None, None, None, {}) is None
      True
      >>> _processes("localhost:1234", 2, 2, {})
      Traceback (most recent call last):
      ValueError: --process-id: must be in 0 .. --num-processes - 1 = 1, got 2.
    """
    values: dict[str, Any] = {}
    for flag, env, value in (("--coordinator", _ENV_COORDINATOR, coordinator),
                             ("--num-processes", _ENV_NUM_PROCESSES, num_processes),
                             ("--process-id", _ENV_PROCESS_ID, process_id)):
        if value is None and environ.get(env, "").strip():
            value = environ[env].strip()
            if flag != "--coordinator":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(
                        f"{flag}: ${env} = {environ[env]!r} is not a whole number."
                    ) from None
        values[flag] = value
    given = [f for f, v in values.items() if v is not None]
    if not given:
        return None
    if len(given) < 3:
        missing = [f for f in values if values[f] is None]
        raise ValueError(
            f"{', '.join(missing)}: needed with {', '.join(given)}: a multi-process run takes "
            "--coordinator HOST:PORT, --num-processes N and --process-id I on every process "
            f"(or ${_ENV_COORDINATOR}, ${_ENV_NUM_PROCESSES}, ${_ENV_PROCESS_ID})."
        )
    address, n, i = values["--coordinator"], values["--num-processes"], values["--process-id"]
    if not re.match(r"^\[?[A-Za-z0-9_.:\-]+\]?:[0-9]{1,5}$", address):
        raise ValueError(
            f"--coordinator: expected HOST:PORT of process 0 (e.g. 10.0.0.1:12345), got "
            f"{address!r}."
        )
    if isinstance(n, bool) or n < 1:
        raise ValueError(f"--num-processes: need a whole number >= 1, got {n!r}.")
    if isinstance(i, bool) or not 0 <= i < n:
        raise ValueError(f"--process-id: must be in 0 .. --num-processes - 1 = {n - 1}, got {i!r}.")
    return address, n, i


def _parser() -> argparse.ArgumentParser:
    from fedjax_lab import __version__

    p = argparse.ArgumentParser(
        prog="fedjax-lab", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fedjax-lab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    devices = argparse.ArgumentParser(add_help=False)
    devices.add_argument(
        "--devices", type=int, metavar="N",
        help="XLA devices to split a CPU-only host into (default: one per physical core, "
             "unless XLA_FLAGS is set or an accelerator may be present; 1: no split)")
    r = sub.add_parser(
        "run", parents=[devices], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run an experiment config (default: the digits experiment of the README)",
        description="Run every [[algorithms]] entry of CONFIG (the default experiment when "
                    "omitted) and write DIR/summary.json, DIR/<label>/metrics.jsonl, "
                    "checkpoints and plots.",
        epilog="example:\n  fedjax-lab run experiments/configs/fedadam.toml --out runs/fedadam "
               "--rounds 50")
    r.add_argument("config", nargs="?", help="TOML config (omit for the default experiment)")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory")
    r.add_argument("--rounds", type=int, help="override training.rounds")
    r.add_argument("--seeds", type=int, metavar="N",
                   help="override training.seeds: run N seeds as one compiled program and "
                        "report mean ± 95%% CI")
    r.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint (a corrupt newer one is left "
                        "in place and reported); with --rounds N larger, extend a finished run")
    r.add_argument("--resume-from", type=int, metavar="STEP",
                   help="resume from checkpoint STEP (implies --resume)")
    r.add_argument("--allow-device-change", action="store_true",
                   help="resume a checkpoint written with another client map or device count "
                        "(the result then differs from an uninterrupted run in float rounding)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = r.add_argument_group(
        "several processes (jax.distributed; process 0 writes, --out on a shared filesystem)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"address of process 0 (default: ${_ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help=f"how many processes take part (default: ${_ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, metavar="I",
                   help=f"this process's index, 0 .. N-1 (default: ${_ENV_PROCESS_ID})")
    s = sub.add_parser(
        "sweep", parents=[devices], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the config's [sweep] grid as one compiled program",
        description="Run every configuration x seed of the config's [sweep] table as one "
                    "compiled program; write DIR/sweep.csv and DIR/sweep.png.",
        epilog="example:\n  fedjax-lab sweep experiments/configs/sweep_fedadam.toml "
               "--out runs/sweep")
    s.add_argument("config", help="TOML config with a [sweep] table")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory")
    s.add_argument("--rounds", type=int, help="override training.rounds")
    c = sub.add_parser(
        "config", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print the config reference, or write a starter config for an algorithm",
        description="Print every config section and key with its type, default and allowed "
                    "values (--reference), or a commented starter config (--init NAME).",
        epilog="examples:\n  fedjax-lab config --reference\n"
               "  fedjax-lab config --reference --algorithm fedprox\n"
               "  fedjax-lab config --init fedprox --out fedprox.toml\n"
               "  fedjax-lab run fedprox.toml --out runs/fedprox")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--reference", action="store_true",
                      help="print every section and key (type, default, allowed values)")
    what.add_argument("--init", metavar="NAME",
                      help="print a commented starter config running algorithm NAME")
    c.add_argument("--algorithm", metavar="NAME",
                   help="with --reference: only this algorithm's entry")
    c.add_argument("--out", metavar="FILE", help="with --init: write the config to FILE")
    return p


def _config_command(args: argparse.Namespace) -> None:
    from fedjax_lab import experiment as exp_lib

    if args.reference:
        if args.out is not None:
            raise ValueError("--out: only with --init (the reference prints to stdout).")
        print(exp_lib.reference(args.algorithm), end="")
        return
    if args.algorithm is not None:
        raise ValueError(f"--algorithm: only with --reference; use --init {args.algorithm}.")
    text = exp_lib.starter_config(args.init)
    if args.out is None:
        print(text, end="")
        return
    path = Path(args.out)
    if path.exists():
        raise ValueError(f"--out: {path} already exists; choose another file (nothing was "
                         "overwritten).")
    path.write_text(text)
    print(f"wrote {path}; run it with: fedjax-lab run {path} --out runs/{args.init}",
          file=sys.stderr)


def _load(path: str | None) -> dict[str, Any] | None:
    from fedjax_lab import experiment as exp_lib

    if path is None:
        return None
    try:
        return exp_lib.load_config(path)
    except RecursionError:
        raise exp_lib.ConfigError(
            f"config: {path!r} is nested too deeply to read; a config needs a few levels at "
            "most. Fix the file."
        ) from None
    except IsADirectoryError:
        raise exp_lib.ConfigError(f"config: {path!r} is a directory; give a TOML file.") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedjax-lab`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            _config_command(args)
            return 0
        processes = None
        if args.command == "run":
            processes = _processes(args.coordinator, args.num_processes, args.process_id,
                                   os.environ)
        print(_choose_devices(args.devices, os.environ, jax_loaded="jax" in sys.modules),
              file=sys.stderr)
        if processes is not None:  # before anything else touches JAX
            from fedjax_lab import distributed

            distributed.initialize(*processes)
            print(f"processes: {processes[2]} of {processes[1]} (coordinator {processes[0]})",
                  file=sys.stderr)
        if args.command == "run":
            run_experiment(_load(args.config), args.out, rounds=args.rounds, seeds=args.seeds,
                           resume=args.resume, resume_from=args.resume_from,
                           allow_device_change=args.allow_device_change,
                           progress=not args.no_progress)
        else:
            from fedjax_lab.sweep import run_sweep_config

            config = _load(args.config)
            _prepare_out(args.out)
            run_sweep_config(config, args.out, rounds=args.rounds)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        print(f"fedjax-lab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the run reads or writes; the messages above name most
        where = e.filename or "a file"
        print(f"fedjax-lab: error: {where}: {e.strerror or e}; check that the path exists and "
              "that you may read (inputs) or write (--out) it.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
