"""Every algorithm of issue #5 on label-skewed digits and on Shakespeare, one budget for all.

Each algorithm is built from ``fl.algorithms.REGISTRY`` with the same client optimiser (plain
SGD at the dataset's rate, unless its hyper-parameters below say otherwise) and trained with
``fl.run_rounds`` (all rounds one ``lax.scan``) under the same seeds, rounds, cohort size, local
work, batch size, client map (one ``fl.maps.auto()``) and participation sampler. Then every
client's test data is evaluated with the final global model (``fl.evaluate``) and, for the
personalised algorithms, with each client's own model (``fl.personalization``):

* Ditto, pFedMe: the personal models kept in ``state.client_states``;
* FedRep, FedPer: the shared body with each client's own head
  (``fedjax_lab.algorithms.partial.personal_params``);
* Per-FedAvg: one local SGD step of size ``alpha`` from the global model
  (``fl.personalization.fine_tune_evaluate``, the paper's evaluation); FedAvg gets the same
  one-step fine-tuning as a reference.

Participation: every algorithm sees the same ``fl.data.participation.bernoulli(p)`` sampler;
client ``i`` is available with its own probability ``p_i`` each round (on digits ``p_i`` grows
with the share of the client's labels in 0-4, so participation is correlated with the data; on
Shakespeare ``p_i`` is drawn uniformly), and the cohort is ``cohort_size`` clients drawn from the
available ones (fewer if fewer are available: padding slots). FedAU is built for this setting.

Usage::

    python experiments/algorithms_i/compare.py [--smoke] --out experiments/algorithms_i/results.json

prints one markdown table per dataset and writes every number plus the settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

import fedjax_lab as fl
from fedjax_lab.algorithms.partial import personal_params as partial_personal_params

ALGORITHMS = (
    "fedavg",
    "scaffold",
    "feddyn",
    "fednova",
    "mime",
    "mimelite",
    "fedavg_momentum",
    "fedau",
    "feddisco",
    "ditto",
    "pfedme",
    "fedrep",
    "fedper",
    "perfedavg",
    "qffl",
)
NEEDS_CLIENT_STATE = ("scaffold", "feddyn", "fedau", "ditto", "pfedme", "fedrep", "fedper")
PERSONALISED = ("ditto", "pfedme", "fedrep", "fedper", "perfedavg")

# Algorithms left out of a dataset, with the reason (printed in the table and the JSON).
EXCLUDED: dict[str, dict[str, str]] = {}

DATASETS = ("digits", "shakespeare")

# Hyper-parameters every dataset uses (from experiments/configs/*.toml); the rest per dataset.
SHARED_HPARAMS: dict[str, dict[str, Any]] = {
    "scaffold": {"server_learning_rate": 1.0},
    "feddyn": {"alpha": 0.01},
    "fednova": {"server_learning_rate": 1.0},
    "mime": {"momentum": 0.9},
    "mimelite": {"momentum": 0.9},
    "fedavg_momentum": {"gradient_weight": 0.1},
    "fedau": {"cutoff": 50},
    "ditto": {"lam": 0.1},
}


def settings(smoke: bool) -> dict[str, dict[str, Any]]:
    """The experiment settings per dataset (``smoke``: a tiny budget for the tests)."""
    digits = {
        "load": {"num_clients": 100, "partition": "dirichlet", "alpha": 0.1, "seed": 0},
        "model": {"name": "mlp", "hidden": [64]},
        "client_learning_rate": 0.1,
        "rounds": 150,
        "cohort_size": 10,
        "batch_size": 10,
        "epochs": 1,
        "local_steps": None,
        "sampler": {"name": "bernoulli", "p_min": 0.1, "p_max": 0.5, "rule": "label_share_0_4"},
        "head": "Dense_1",
        "eval_curve_points": 5,
        "hparams": {
            **SHARED_HPARAMS,
            "feddisco": {"num_classes": 10, "a": 0.5, "b": 0.1},
            # paper: lam 15, K 5, personal lr 0.09, eta 0.005; eta raised to 0.05
            # (eta * lam = 0.75 < 1) so w moves at a rate comparable to the others' in 150 rounds
            "pfedme": {
                "lam": 15.0,
                "inner_steps": 5,
                "personal_learning_rate": 0.09,
                "client_learning_rate": 0.05,
            },
            "fedrep": {"head_epochs": 10, "body_epochs": 1},
            "fedper": {},
            "perfedavg": {"alpha": 0.01},
            "qffl": {"q": 1.0},  # lipschitz = 1 / client learning rate (set below)
        },
    }
    shakespeare = {
        "load": {"min_lines": 400, "seq_len": 40},
        "model": {"name": "char_lstm", "embed": 8, "hidden": 64, "num_layers": 1},
        "client_learning_rate": 1.0,
        "rounds": 40,
        "cohort_size": 10,
        "batch_size": 8,
        "epochs": 1,
        "local_steps": 10,
        "sampler": {"name": "bernoulli", "p_min": 0.1, "p_max": 0.5, "rule": "uniform_random"},
        "head": "Dense_0",
        "eval_curve_points": 3,
        "hparams": {
            **SHARED_HPARAMS,
            "feddisco": {"num_classes": fl.datasets.SHAKESPEARE_VOCAB_SIZE, "a": 0.5, "b": 0.1},
            # lam 15 with eta <= 1/lam would train w ~20x slower than lr 1.0; a smaller lam keeps
            # eta * lam = 0.75 and the inner step lr_p * lam = 0.75 while eta = 0.5
            "pfedme": {
                "lam": 1.5,
                "inner_steps": 5,
                "personal_learning_rate": 0.5,
                "client_learning_rate": 0.5,
            },
            "fedrep": {"head_epochs": 5, "body_epochs": 1},
            "fedper": {},
            "perfedavg": {"alpha": 0.1},
            "qffl": {"q": 1.0},
        },
    }
    if smoke:
        digits.update(
            load={"num_clients": 20, "partition": "dirichlet", "alpha": 0.1, "seed": 0},
            model={"name": "mlp", "hidden": [16]},
            rounds=3,
            cohort_size=4,
            eval_curve_points=1,
        )
        digits["hparams"]["fedrep"] = {"head_epochs": 2, "body_epochs": 1}
        shakespeare.update(
            load={"min_lines": 700, "seq_len": 8},
            model={"name": "char_lstm", "embed": 4, "hidden": 8, "num_layers": 1},
            rounds=2,
            cohort_size=3,
            batch_size=4,
            local_steps=2,
            eval_curve_points=1,
        )
        shakespeare["hparams"]["fedrep"] = {"head_epochs": 2, "body_epochs": 1}
    return {"digits": digits, "shakespeare": shakespeare}


SEEDS = {"model_init": 0, "training": 1, "sampler_probs": 2, "fine_tune": 3}


def _model(cfg: dict[str, Any], train: fl.FederatedData):
    spec = dict(cfg["model"])
    name = spec.pop("name")
    if name == "mlp":
        return fl.models.mlp(
            train.examples["x"].shape[1:], hidden=tuple(spec["hidden"]), num_classes=10
        ), None
    vocab = fl.datasets.SHAKESPEARE_VOCAB_SIZE
    return fl.models.char_lstm(vocab_size=vocab, **spec), fl.datasets.SHAKESPEARE_PAD_ID


def _participation_probs(cfg: dict[str, Any], train: fl.FederatedData) -> np.ndarray:
    lo, hi = cfg["sampler"]["p_min"], cfg["sampler"]["p_max"]
    if cfg["sampler"]["rule"] == "label_share_0_4":
        owners = np.repeat(np.arange(train.num_clients), train.client_sizes)
        low = np.bincount(
            owners,
            weights=(np.asarray(train.examples["y"]) < 5).astype(float),
            minlength=train.num_clients,
        )
        share = low / np.maximum(train.client_sizes, 1)
        return (lo + (hi - lo) * share).astype(np.float32)
    rng = np.random.default_rng(SEEDS["sampler_probs"])
    return rng.uniform(lo, hi, train.num_clients).astype(np.float32)


def _build(name: str, loss_fn, cfg: dict[str, Any]):
    hp = dict(cfg["hparams"].get(name, {}))
    lr = hp.pop("client_learning_rate", cfg["client_learning_rate"])
    if name == "qffl":
        hp["lipschitz"] = 1.0 / lr
    if name in ("fedrep", "fedper"):
        hp["local_keys"] = cfg["head"]
    return fl.algorithms.REGISTRY[name](loss_fn, client_optimizer=optax.sgd(lr), **hp), lr


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _summary(s: dict[str, Any]) -> dict[str, Any]:
    """Mean / p10 / variance of per-client accuracy (clients with test examples only)."""
    has = np.asarray(s["client_num_examples"]) > 0
    acc = np.asarray(s["client_accuracy"])[has]
    return {
        "mean": _finite(s["accuracy_client_mean"]),
        "p10": _finite(s["accuracy_p10"]),
        "p50": _finite(s["accuracy_p50"]),
        "variance": _finite(np.var(acc)) if acc.size else None,
        "std": _finite(s["accuracy_std"]),
        "pooled": _finite(s["accuracy"]),
        "min": _finite(acc.min()) if acc.size else None,
        "num_clients": int(acc.size),
        "client_accuracy": [float(a) for a in acc],
    }


def run_dataset(
    dataset: str, cfg: dict[str, Any], algorithms: list[str], client_map: fl.ClientMap, log=print
) -> dict[str, Any]:
    """Trains and evaluates every algorithm on one dataset; returns its JSON section."""
    train, test = fl.datasets.load(dataset, **cfg["load"])
    model, pad_id = _model(cfg, train)
    loss_fn = fl.models.classification_loss(model, pad_id=pad_id)
    eval_fn = fl.models.classification_metrics(model, pad_id=pad_id)
    params0 = model.init(jax.random.key(SEEDS["model_init"]))
    probs = _participation_probs(cfg, train)
    sampler = fl.data.participation.bernoulli(probs)
    key = jax.random.key(SEEDS["training"])
    rounds = cfg["rounds"]
    eval_every = max(1, rounds // cfg["eval_curve_points"])
    section: dict[str, Any] = {
        "settings": {k: v for k, v in cfg.items() if k not in ("sampler",)}
        | {
            "num_clients": train.num_clients,
            "train_examples": train.num_examples,
            "test_examples": test.num_examples,
            "clients_without_test_examples": int(np.sum(test.client_sizes == 0)),
            "client_train_sizes": {
                "min": int(train.client_sizes.min()),
                "median": float(np.median(train.client_sizes)),
                "max": int(train.client_sizes.max()),
            },
            "sampler": cfg["sampler"]
            | {"probs": [float(p) for p in probs], "mean_available": float(probs.sum())},
            "model_params": int(fl.models.num_params(params0)),
            "weighting": "num_examples",
            "client_map": "fl.maps.auto() (one instance for every run)",
            "seeds": SEEDS,
        },
        "results": {},
    }
    ft_alpha = cfg["hparams"]["perfedavg"]["alpha"]
    for name in algorithms:
        if name in EXCLUDED.get(dataset, {}):
            section["results"][name] = {"status": "excluded", "reason": EXCLUDED[dataset][name]}
            log(f"[{dataset}] {name}: excluded")
            continue
        alg, lr = _build(name, loss_fn, cfg)
        num_clients = train.num_clients if name in NEEDS_CLIENT_STATE else None
        state = alg.init(params0, num_clients=num_clients)
        t0 = time.perf_counter()
        state, hist = fl.run_rounds(
            alg,
            state,
            train,
            key,
            num_rounds=rounds,
            cohort_size=cfg["cohort_size"],
            batch_size=cfg["batch_size"],
            local_steps=cfg["local_steps"],
            epochs=cfg["epochs"],
            client_map=client_map,
            sampler=sampler,
            eval_fn=eval_fn,
            eval_data=test,
            eval_every=eval_every,
            eval_batch_size=512,
        )
        jax.block_until_ready(state.params)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        glob = _summary(fl.evaluate(eval_fn, state.params, test, batch_size=512))
        personal = None
        protocol = None
        if name in ("ditto", "pfedme"):
            out = fl.personalization.evaluate_personalized(
                eval_fn,
                state.params,
                state.client_states,
                test,
                batch_size=512,
                client_map=client_map,
            )
            personal, protocol = out["personalized"], "state.client_states (personal models)"
        elif name in ("fedrep", "fedper"):
            pers = partial_personal_params(state, local_keys=cfg["head"])
            out = fl.personalization.evaluate_personalized(
                eval_fn, state.params, pers, test, batch_size=512, client_map=client_map
            )
            personal, protocol = out["personalized"], "global body + own head"
        elif name in ("perfedavg", "fedavg"):
            out = fl.personalization.fine_tune_evaluate(
                loss_fn,
                eval_fn,
                optax.sgd(ft_alpha),
                state.params,
                train,
                test,
                steps=1,
                batch_size=cfg["batch_size"],
                key=jax.random.key(SEEDS["fine_tune"]),
                eval_batch_size=512,
                client_map=client_map,
            )
            personal = out["personalized"]
            protocol = f"one local SGD step of size alpha={ft_alpha} from the global model"
        eval_s = time.perf_counter() - t0
        curve = np.asarray(hist["eval_accuracy"])
        done = np.nonzero(np.isfinite(curve))[0]
        losses = np.asarray(hist["train_loss"])
        row = {
            "status": "ok",
            "client_learning_rate": lr,
            "hparams": {k: v for k, v in cfg["hparams"].get(name, {}).items()}
            | ({"lipschitz": 1.0 / lr} if name == "qffl" else {})
            | ({"local_keys": cfg["head"]} if name in ("fedrep", "fedper") else {}),
            "global": glob,
            "personalized": None if personal is None else _summary(personal),
            "personalized_protocol": protocol,
            "pooled_accuracy_curve": {str(int(r) + 1): _finite(curve[r]) for r in done},
            "train_loss_last_5_rounds": _finite(np.mean(losses[-5:])),
            "rounds_skipped": int(np.sum(np.asarray(hist["round_skipped"]))),
            "dropped_clients": int(np.sum(np.asarray(hist["dropped_clients"]))),
            "mean_available_clients": float(np.mean(np.asarray(hist["available_clients"]))),
            "seconds_compile_and_train": round(train_s, 2),
            "seconds_evaluation": round(eval_s, 2),
        }
        if name in PERSONALISED or name == "fedavg":
            # slot j of a round is a real participant iff j < (clients available that round);
            # padding slots carry ids of unavailable clients and are not counted
            ids = np.asarray(hist["client_ids"])
            real = np.arange(ids.shape[1])[None, :] < np.asarray(hist["available_clients"])[:, None]
            counts = np.bincount(ids[real], minlength=train.num_clients)
            row["clients_never_sampled"] = int(np.sum(counts == 0))
            row["participations_per_client"] = {
                "min": int(counts.min()),
                "median": float(np.median(counts)),
                "max": int(counts.max()),
            }
        section["results"][name] = row
        p = row["personalized"]
        log(
            f"[{dataset}] {name}: global mean {glob['mean']:.3f} p10 {glob['p10']:.3f}"
            + ("" if p is None else f" | personal mean {p['mean']:.3f} p10 {p['p10']:.3f}")
            + f" | {train_s:.1f}s train, {eval_s:.1f}s eval"
        )
    return section


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_var(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def markdown(results: dict[str, Any]) -> str:
    """One markdown table per dataset."""
    lines = []
    for dataset, section in results["datasets"].items():
        st = section["settings"]
        lines.append(
            f"### {dataset}: {st['num_clients']} clients, {st['rounds']} rounds, cohort "
            f"{st['cohort_size']}, batch {st['batch_size']}, "
            + (
                f"{st['local_steps']} local steps"
                if st["local_steps"]
                else f"{st['epochs']} local epoch(s)"
            )
        )
        lines.append("")
        lines.append(
            "| algorithm | global mean | global p10 | global var | personal mean | personal p10 "
            "| personal var | compile+train s | eval s |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, row in section["results"].items():
            if row["status"] != "ok":
                lines.append(f"| {name} | excluded: see README | | | | | | | |")
                continue
            g, p = row["global"], row["personalized"] or {}
            lines.append(
                f"| {name} | {_fmt(g['mean'])} | {_fmt(g['p10'])} | {_fmt_var(g['variance'])} "
                f"| {_fmt(p.get('mean'))} | {_fmt(p.get('p10'))} | {_fmt_var(p.get('variance'))} "
                f"| {row['seconds_compile_and_train']:.1f} | {row['seconds_evaluation']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns (and writes to ``--out``) the results dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget (tests)")
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help="comma-separated subset of: " + ",".join(ALGORITHMS),
    )
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help="comma-separated subset of: " + ",".join(DATASETS),
    )
    args = parser.parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    datasets = [d for d in args.datasets.split(",") if d]
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad:
        raise ValueError(f"--algorithms: unknown {bad}; choose from {list(ALGORITHMS)}.")
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"--datasets: unknown {bad}; choose from {list(DATASETS)}.")
    cfgs = settings(args.smoke)
    client_map = fl.maps.auto()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "smoke": bool(args.smoke),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "algorithms": algorithms,
        "datasets": {},
    }
    for dataset in datasets:
        results["datasets"][dataset] = run_dataset(dataset, cfgs[dataset], algorithms, client_map)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown(results)
    results["markdown"] = table
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
