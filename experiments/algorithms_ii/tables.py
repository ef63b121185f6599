"""Algorithms II tables: heterogeneity, robustness under attack, DP accuracy vs epsilon, bits.

One command measures four tables on scikit-learn's digits (offline) and writes every number
and setting to JSON:

  (h) heterogeneity: final test accuracy of FedAvg, FedProx, FedAdam and SCAFFOLD on Dirichlet
                   label-skew splits of the same examples, one column per ``alpha``;
  (a) attacks:     final test accuracy of each robust aggregator (``robust_fedavg``) under each
                   attack of ``fl.attacks`` at 10% and 30% malicious clients;
  (b) dp:          DP-FedAvg accuracy against the (epsilon, delta) of ``fl.privacy`` accounting,
                   fixed and adaptive clipping, over a population of 1,000 clients;
  (c) compression: accuracy against the uplink bits of ``fl.compression`` (top-k, random-k,
                   QSGD), with and without error feedback (classic memory, EF21).

Every run of a table uses the same data, model, rounds and seeds. Two runners compute the
same tables (``--runner``):

* ``loop`` (the per-cell script): one :func:`fedjax_lab.sweep` program per cell, its seeds
  the program's rows: in (h) one per (method, ``alpha``); in (a) one per (aggregator,
  fraction, attack kind), where no-attack, sign-flip and scaling are the ``"scale"`` attack
  with a traced factor ``s`` (``s = 1`` is no attack, ``s = -1`` is exactly ``sign_flip``,
  ``s = 10`` the default ``scale`` attack); in (b) one per (clipping, noise multiplier).
* ``axes`` (the default): the sweep axes of :mod:`fedjax_lab.sweep` make each table a few
  programs: in (h) one per method over ``alpha`` x seed (:func:`fedjax_lab.sweep.dirichlet_axis`:
  the partitions stacked, every client padded to the largest); in (a) the malicious set is a
  per-row mask (:func:`fedjax_lab.sweep.malicious_axis`) and the five attacks are the traced
  coefficients of :func:`fedjax_lab.attacks.mixed`, so each aggregator is one program over
  attack x fraction x seed (one per fraction for the rules whose shapes depend on it: trimmed
  mean, Krum, Multi-Krum); in (b) the noise multiplier is traced (one program per clipping
  mode) and each row's epsilon comes from the sweep's :class:`fedjax_lab.sweep.DPAccounting`.
  Table (c) has no axis to trace (each compressor is its own program) and runs as in ``loop``.
* ``both``: ``loop`` then ``axes`` for (h), (a) and (b), in one process; writes the ``axes``
  tables with, per table, the wall-time ratio and the largest per-seed accuracy difference
  between the two (``loop_vs_axes``).

Usage::

  python experiments/algorithms_ii/tables.py [--smoke] [--runner loop|axes|both] \\
      [--only heterogeneity|attacks|dp|compression] --out experiments/algorithms_ii/results.json

``--smoke`` runs a few rounds of a reduced grid (a test of the script, not a result);
``--aggregators mean,median,krum`` runs table (a) for those aggregators only and writes it as
``attacks_subset`` (next to a full ``attacks``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fedjax_lab as fl

TABLES = ("heterogeneity", "attacks", "dp", "compression")
RUNNER_CHOICES = ("loop", "axes", "both")

# Display names of the robust aggregators (``robust_fedavg``'s ``aggregator`` argument).
AGGREGATORS = {
    "mean": "weighted mean (FedAvg)",
    "median": "coordinate-wise median",
    "trimmed_mean": "trimmed mean",
    "krum": "Krum",
    "multi_krum": "Multi-Krum",
    "geometric_median": "geometric median (RFA)",
    "centered_clipping": "centered clipping",
}
# Attacks as table columns: name -> (the fl.attacks attack run, its scale). The first three
# are one program: the "scale" attack with a traced factor (None: settings["scale_factor"]).
ATTACKS = {
    "none": ("scale", 1.0),
    "sign_flip": ("scale", -1.0),
    "scale": ("scale", None),
    "gaussian": ("gaussian", None),
    "label_flip": ("label_flip", None),
}
ATTACK_TITLES = {
    "none": "none",
    "sign_flip": "sign-flip",
    "scale": "scaled x10",
    "gaussian": "Gaussian",
    "label_flip": "label-flip",
}

FULL: dict[str, Any] = {
    "seeds": [0, 1],
    "model": {"name": "mlp", "hidden": [64]},
    "client_learning_rate": 0.1,
    "batch_size": 10,
    "epochs": 1,
    "heterogeneity": {
        # digits pooled, 20% held out (the test set of every column), the rest split over
        # num_clients by partition.dirichlet(alpha) for each alpha.
        "data": {"name": "digits", "num_clients": 100, "test_fraction": 0.2},
        "alphas": [0.1, 0.5, 1.0, 100.0],
        "methods": ["fedavg", "fedprox", "fedadam", "scaffold"],
        "fedprox_mu": 0.1,
        "fedadam_server_learning_rate": 0.01,
        "partition_seed": 0,
        "min_size": 1,
        "rounds": 100,
        "cohort_size": 10,
    },
    "attacks": {
        "data": {"name": "digits", "num_clients": 100, "partition": "dirichlet", "alpha": 1.0},
        "rounds": 150,
        "cohort_size": 20,
        "fractions": [0.1, 0.3],
        "aggregators": list(AGGREGATORS),
        "attacks": list(ATTACKS),
        "attack_seed": 0,
        "gaussian_noise_std": 1.0,
        "scale_factor": 10.0,
        "gm_iters": 10,
        "cc_tau": 0.1,
        "cc_iters": 1,
    },
    "dp": {
        "data": {"name": "digits", "num_clients": 1000, "partition": "iid"},
        "rounds": 200,
        "sampling_rate": 0.1,
        "cohort_slots": 150,
        "clipping": ["none", "fixed", "adaptive"],  # "none": FedAvg without DP, for reference
        "noise_multipliers": [0.0, 1.0, 2.0, 4.0, 8.0],
        "fixed_clip_norm": 0.3,
        "adaptive_initial_clip_norm": 0.1,
        "target_quantile": 0.5,
        "clip_learning_rate": 0.2,
        "delta_exponent": 1.1,
    },
    "compression": {
        "data": {"name": "digits", "num_clients": 100, "partition": "dirichlet", "alpha": 1.0},
        "rounds": 150,
        "cohort_size": 20,
        # (compressor, argument, error feedback)
        "rows": [
            ["identity", None, "none"],
            ["top_k", 0.01, "none"],
            ["top_k", 0.01, "ef"],
            ["top_k", 0.01, "ef21"],
            ["top_k", 0.1, "none"],
            ["top_k", 0.1, "ef"],
            ["top_k", 0.1, "ef21"],
            ["random_k", 0.1, "none"],
            ["random_k", 0.1, "ef"],
            ["random_k", 0.1, "ef21"],
            ["qsgd", 1, "none"],
            ["qsgd", 1, "ef21"],
            ["qsgd", 2, "none"],
            ["qsgd", 4, "none"],
            ["qsgd", 8, "none"],
        ],
    },
}

SMOKE: dict[str, Any] = {
    **FULL,
    "seeds": [0],
    "model": {"name": "mlp", "hidden": [16]},
    "heterogeneity": {
        **FULL["heterogeneity"],
        "data": {"name": "digits", "num_clients": 20, "test_fraction": 0.2},
        "alphas": [0.1, 100.0],
        "methods": ["scaffold"],  # per-client state through the data axis; fedavg is simpler
        "rounds": 3,
        "cohort_size": 5,
    },
    "attacks": {
        **FULL["attacks"],
        "data": {"name": "digits", "num_clients": 20, "partition": "iid"},
        "rounds": 3,
        "cohort_size": 10,
        "fractions": [0.3],
        "aggregators": ["median"],
        "attacks": ["none", "sign_flip", "scale"],
    },
    "dp": {
        **FULL["dp"],
        "data": {"name": "digits", "num_clients": 100, "partition": "iid"},
        "rounds": 3,
        "cohort_slots": 20,
        "clipping": ["adaptive"],
        "noise_multipliers": [0.5],
    },
    "compression": {
        **FULL["compression"],
        "data": {"name": "digits", "num_clients": 20, "partition": "iid"},
        "rounds": 3,
        "cohort_size": 5,
        "rows": [["top_k", 0.1, "ef21"]],
    },
}


# ----------------------------------------------------------------------------- algorithm makers
# Module-level functions, bound with functools.partial: fl.run_sweep caches its program on them.


METHODS = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam",
           "scaffold": "SCAFFOLD"}


def make_method(loss_fn: Callable, method: str, settings: tuple) -> fl.FederatedAlgorithm:
    """Table (h)'s algorithms: client SGD, and the method's own server rule."""
    s = dict(settings)
    opt = optax.sgd(s["client_learning_rate"])
    if method == "fedavg":
        return fl.algorithms.fed_avg(loss_fn, client_optimizer=opt)
    if method == "fedprox":
        return fl.algorithms.fed_prox(loss_fn, client_optimizer=opt, mu=s["fedprox_mu"])
    if method == "fedadam":
        return fl.algorithms.fed_adam(loss_fn, client_optimizer=opt,
                                      server_learning_rate=s["fedadam_server_learning_rate"])
    if method == "scaffold":
        return fl.algorithms.scaffold(loss_fn, client_optimizer=opt)
    raise ValueError(f"heterogeneity.methods: got {method!r}; allowed: {list(METHODS)}.")


def make_robust(
    loss_fn: Callable,
    aggregator: str,
    attack: str,
    fraction: float,
    settings: tuple,
    **hp: Any,
) -> fl.FederatedAlgorithm:
    """``robust_fedavg`` with ``aggregator`` under ``attack``; ``hp["scale"]`` may be traced."""
    s = dict(settings)
    cohort = s["cohort_size"]
    f = max(1, round(fraction * cohort))  # Byzantine clients a cohort is expected to hold
    return fl.algorithms.REGISTRY["robust_fedavg"](
        loss_fn,
        client_optimizer=optax.sgd(s["client_learning_rate"]),
        aggregator=aggregator,
        trim_fraction=fraction,
        f=f,
        m=cohort - f,
        gm_iters=s["gm_iters"],
        tau=s["cc_tau"],
        cc_iters=s["cc_iters"],
        attack=attack,
        attack_fraction=fraction,
        attack_num_clients=s["num_clients"],
        attack_seed=s["attack_seed"],
        attack_scale=hp.get("scale"),
        attack_noise_std=s["gaussian_noise_std"],
        num_classes=10,
    )


# The attacks as coefficients (scale, noise, flip) of fl.attacks.mixed (None: scale_factor).
MIXED = {
    "none": (1.0, 0.0, 0.0),
    "sign_flip": (-1.0, 0.0, 0.0),
    "scale": (None, 0.0, 0.0),
    "gaussian": (1.0, 1.0, 0.0),
    "label_flip": (1.0, 0.0, 1.0),
}
# Rules whose shapes depend on the malicious fraction (trim count, Krum's f and m).
FRACTION_SHAPED = ("trimmed_mean", "krum", "multi_krum")


def make_robust_axes(
    loss_fn: Callable,
    aggregator: str,
    fraction: float,
    settings: tuple,
    *,
    scale: Any,
    noise: Any,
    flip: Any,
    malicious: Any,
    malicious_fraction: Any,
) -> fl.FederatedAlgorithm:
    """``robust_fedavg`` under ``fl.attacks.mixed``: attack and malicious set traced per row.

    ``fraction`` sets the rule's own settings (as :func:`make_robust`); who is malicious is the
    row's ``malicious`` mask (of ``malicious_fraction``).
    """
    del malicious_fraction
    s = dict(settings)
    cohort = s["cohort_size"]
    f = max(1, round(fraction * cohort))
    return fl.algorithms.REGISTRY["robust_fedavg"](
        loss_fn,
        client_optimizer=optax.sgd(s["client_learning_rate"]),
        aggregator=aggregator,
        trim_fraction=fraction,
        f=f,
        m=cohort - f,
        gm_iters=s["gm_iters"],
        tau=s["cc_tau"],
        cc_iters=s["cc_iters"],
        attack=fl.attacks.mixed(scale, noise, flip, noise_std=s["gaussian_noise_std"],
                                num_classes=10),
        attack_malicious=malicious,
    )


def make_dp_axes(
    loss_fn: Callable, adaptive: bool, settings: tuple, *, noise_multiplier: Any
) -> fl.FederatedAlgorithm:
    """:func:`make_dp` with a traced noise multiplier (the sweep's noise axis)."""
    return make_dp(loss_fn, noise_multiplier, adaptive, settings)


def make_dp(
    loss_fn: Callable,
    noise_multiplier: float | None,
    adaptive: bool,
    settings: tuple,
) -> fl.FederatedAlgorithm:
    """DP-FedAvg (``noise_multiplier=None``: plain FedAvg, no clipping, for reference)."""
    s = dict(settings)
    opt = optax.sgd(s["client_learning_rate"])
    if noise_multiplier is None:
        return fl.algorithms.fed_avg(loss_fn, client_optimizer=opt)
    return fl.algorithms.dp_fed_avg(
        loss_fn,
        client_optimizer=opt,
        noise_multiplier=noise_multiplier,
        clip_norm=s["adaptive_initial_clip_norm"] if adaptive else s["fixed_clip_norm"],
        expected_cohort_size=s["expected_cohort_size"],
        adaptive_clipping=adaptive,
        target_quantile=s["target_quantile"],
        clip_learning_rate=s["clip_learning_rate"],
    )


def compressor_from(name: str, arg: float | int | None) -> fl.compression.Compressor:
    """A compressor of ``fl.compression`` from its name and argument (fraction or bits)."""
    if name == "identity":
        return fl.compression.identity()
    if name == "top_k":
        return fl.compression.top_k(arg)
    if name == "random_k":
        return fl.compression.random_k(arg)
    if name == "qsgd":
        return fl.compression.qsgd(int(arg))
    raise ValueError(f"compressor: got {name!r}; allowed: 'identity', 'top_k', 'random_k', 'qsgd'.")


def make_compressed(
    loss_fn: Callable, name: str, arg: float | int | None, error_feedback: str, settings: tuple
) -> fl.FederatedAlgorithm:
    """FedAvg whose clients send ``compressor_from(name, arg)`` messages."""
    s = dict(settings)
    base = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(s["client_learning_rate"]))
    return fl.compression.compressed(
        base,
        compressor_from(name, arg),
        error_feedback=error_feedback,
        num_clients=s["num_clients"],
    )


# ----------------------------------------------------------------------------------- the runs


def _problem(settings: dict[str, Any], data: dict[str, Any]):
    options = {k: v for k, v in data.items() if k != "name"}
    train, test = fl.datasets.load(data["name"], seed=0, **options)
    model = fl.models.mlp(
        tuple(train.examples["x"].shape[1:]),
        hidden=tuple(settings["model"]["hidden"]),
        num_classes=10,
    )
    return train, test, model


def _sweep(make, configs, train, test, model, settings, table, **kw) -> list[dict[str, Any]]:
    start = time.perf_counter()
    rows = fl.run_sweep(
        make,
        configs,
        model.init,
        train,
        seeds=settings["seeds"],
        num_rounds=table["rounds"],
        batch_size=settings["batch_size"],
        epochs=settings["epochs"],
        eval_fn=fl.models.classification_metrics(model),
        eval_data=test,
        **kw,
    )
    print(f"  {time.perf_counter() - start:6.1f} s  {len(rows)} run(s)", file=sys.stderr)
    return rows


def _summary(accs: Sequence[float]) -> dict[str, Any]:
    return {"test_accuracy": float(np.mean(accs)), "per_seed": [float(a) for a in accs]}


def _heterogeneity_problem(settings: dict[str, Any]):
    """The pooled train examples split per alpha (a data axis), the held-out test set, model."""
    t = settings["heterogeneity"]
    d = t["data"]
    pooled, test = fl.datasets.load(d["name"], num_clients=1, partition="iid",
                                    test_fraction=d["test_fraction"], seed=0)
    examples = {k: np.asarray(v) for k, v in pooled.examples.items()}
    axis = fl.sweep.dirichlet_axis(examples, d["num_clients"], t["alphas"],
                                   seed=t["partition_seed"], min_size=t["min_size"])
    model = fl.models.mlp(tuple(examples["x"].shape[1:]),
                          hidden=tuple(settings["model"]["hidden"]), num_classes=10)
    fixed = {
        "client_learning_rate": settings["client_learning_rate"],
        "fedprox_mu": t["fedprox_mu"],
        "fedadam_server_learning_rate": t["fedadam_server_learning_rate"],
    }
    return axis, test, model, tuple(sorted(fixed.items()))


def _heterogeneity_table(t, axis, test, cells) -> dict[str, Any]:
    results = [
        {"method": m, "alpha": a,
         "max_client_size": int(np.max(axis.data[axis.values.index(float(a))].client_sizes)),
         **cells[(m, float(a))]}
        for m in t["methods"] for a in t["alphas"]
    ]
    return {"settings": {**t, "num_train_examples": axis.data[0].num_examples,
                         "num_test_examples": test.num_examples}, "results": results}


def run_heterogeneity(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (h), per cell: one program per (method, alpha), over the seeds."""
    t = settings["heterogeneity"]
    axis, test, model, frozen = _heterogeneity_problem(settings)
    loss = fl.models.classification_loss(model)
    cells = {}
    for method in t["methods"]:
        make = functools.partial(make_method, loss, method, frozen)
        for alpha, train in zip(axis.values, axis.data, strict=True):
            print(f"heterogeneity: {method}, alpha {alpha:g}", file=sys.stderr)
            rows = _sweep(make, [{}], train, test, model, settings, t,
                          cohort_size=t["cohort_size"])
            cells[(method, alpha)] = _summary([r["test_accuracy"] for r in rows])
    return _heterogeneity_table(t, axis, test, cells)


def run_heterogeneity_axes(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (h) on the data axis: one program per method over alpha x seed."""
    t = settings["heterogeneity"]
    axis, test, model, frozen = _heterogeneity_problem(settings)
    loss = fl.models.classification_loss(model)
    cells = {}
    for method in t["methods"]:
        print(f"heterogeneity (axes): {method}, alphas {list(axis.values)}", file=sys.stderr)
        make = functools.partial(make_method, loss, method, frozen)
        rows = _sweep(make, [{}], axis, test, model, settings, t, cohort_size=t["cohort_size"])
        for alpha in axis.values:
            mine = [r for r in rows if r["alpha"] == alpha]
            assert [r["seed"] for r in mine] == list(settings["seeds"])
            cells[(method, alpha)] = _summary([r["test_accuracy"] for r in mine])
    return _heterogeneity_table(t, axis, test, cells)


def _attack_settings(settings: dict[str, Any], train) -> tuple:
    t = settings["attacks"]
    fixed = {
        "cohort_size": t["cohort_size"],
        "num_clients": train.num_clients,
        "client_learning_rate": settings["client_learning_rate"],
        "gm_iters": t["gm_iters"],
        "cc_tau": t["cc_tau"],
        "cc_iters": t["cc_iters"],
        "attack_seed": t["attack_seed"],
        "gaussian_noise_std": t["gaussian_noise_std"],
    }
    return tuple(sorted(fixed.items()))


def run_attacks_axes(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (a) on the sweep axes: one program per aggregator (per fraction where shaped)."""
    t = settings["attacks"]
    train, test, model = _problem(settings, t["data"])
    loss = fl.models.classification_loss(model)
    frozen = _attack_settings(settings, train)
    coefs = []
    for attack in t["attacks"]:
        sc, noise, flip = MIXED[attack]
        coefs.append({"scale": t["scale_factor"] if sc is None else sc, "noise": noise,
                      "flip": flip})
    per = len(settings["seeds"])
    cells: dict[tuple, dict[str, Any]] = {}
    for agg in t["aggregators"]:
        groups = [[f] for f in t["fractions"]] if agg in FRACTION_SHAPED else [t["fractions"]]
        for fractions in groups:
            print(f"attacks (axes): {agg}, {fractions} malicious, {t['attacks']}",
                  file=sys.stderr)
            make = functools.partial(make_robust_axes, loss, agg, fractions[0], frozen)
            configs = fl.grid(
                fl.sweep.malicious_axis(fractions, train.num_clients, seed=t["attack_seed"]),
                coefs,
            )
            rows = _sweep(make, configs, train, test, model, settings, t,
                          cohort_size=t["cohort_size"])
            combos = [(f, a) for f in fractions for a in t["attacks"]]
            for i, (frac, attack) in enumerate(combos):
                accs = [r["test_accuracy"] for r in rows[i * per : (i + 1) * per]]
                assert all(r["malicious_fraction"] == frac for r in rows[i * per:(i + 1) * per])
                cells[(agg, frac, attack)] = {
                    "aggregator": agg,
                    "attack": attack,
                    "fraction": frac,
                    "attack_scale": coefs[t["attacks"].index(attack)]["scale"]
                    if attack in ("none", "sign_flip", "scale") else None,
                    "krum_f": max(1, round(frac * t["cohort_size"])),
                    **_summary(accs),
                }
    ordered = [cells[(a, f, k)] for a in t["aggregators"] for f in t["fractions"]
               for k in t["attacks"]]
    return {"settings": {**t, "num_clients": train.num_clients}, "results": ordered}


def run_attacks(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (a): final test accuracy, aggregator x attack x malicious fraction."""
    t = settings["attacks"]
    train, test, model = _problem(settings, t["data"])
    loss = fl.models.classification_loss(model)
    fixed = {
        "cohort_size": t["cohort_size"],
        "num_clients": train.num_clients,
        "client_learning_rate": settings["client_learning_rate"],
        "gm_iters": t["gm_iters"],
        "cc_tau": t["cc_tau"],
        "cc_iters": t["cc_iters"],
        "attack_seed": t["attack_seed"],
        "gaussian_noise_std": t["gaussian_noise_std"],
    }
    frozen = tuple(sorted(fixed.items()))
    results: dict[str, dict[str, Any]] = {}
    for agg in t["aggregators"]:
        for frac in t["fractions"]:
            groups: dict[str, list[tuple[str, float | None]]] = {}
            for attack in t["attacks"]:
                kind, scale = ATTACKS[attack]
                if kind == "scale" and scale is None:
                    scale = t["scale_factor"]
                groups.setdefault(kind, []).append((attack, scale))
            for kind, members in groups.items():
                print(
                    f"attacks: {agg}, {frac:.0%} malicious, {[m for m, _ in members]}",
                    file=sys.stderr,
                )
                make = functools.partial(make_robust, loss, agg, kind, frac, frozen)
                configs = [{"scale": s} for _, s in members] if kind == "scale" else [{}]
                rows = _sweep(
                    make, configs, train, test, model, settings, t, cohort_size=t["cohort_size"]
                )
                per = len(settings["seeds"])  # sweep rows: configurations x seeds, seeds fastest
                for i, (attack, scale) in enumerate(members):
                    accs = [r["test_accuracy"] for r in rows[i * per : (i + 1) * per]]
                    results[f"{agg}|{attack}|{frac}"] = {
                        "aggregator": agg,
                        "attack": attack,
                        "fraction": frac,
                        "attack_scale": scale,
                        "krum_f": max(1, round(frac * t["cohort_size"])),
                        **_summary(accs),
                    }
    return {"settings": {**t, "num_clients": train.num_clients}, "results": list(results.values())}


def run_dp(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (b): DP-FedAvg accuracy against epsilon (Poisson sampling, RDP and PLD)."""
    t = settings["dp"]
    train, test, model = _problem(settings, t["data"])
    loss = fl.models.classification_loss(model)
    n = train.num_clients
    q = t["sampling_rate"]
    delta = float(n ** -t["delta_exponent"])
    fixed = {
        "client_learning_rate": settings["client_learning_rate"],
        "expected_cohort_size": q * n,
        "fixed_clip_norm": t["fixed_clip_norm"],
        "adaptive_initial_clip_norm": t["adaptive_initial_clip_norm"],
        "target_quantile": t["target_quantile"],
        "clip_learning_rate": t["clip_learning_rate"],
    }
    frozen = tuple(sorted(fixed.items()))
    # Poisson sampling: each client joins a round with probability q; the cohort has room for
    # every available client but in a vanishingly rare round (P[Binomial(n, q) > slots]).
    sampler = fl.data.participation.bernoulli(q)
    overflow = _binomial_tail(n, q, t["cohort_slots"])
    runs: list[tuple[str, float | None]] = [("none", None)] if "none" in t["clipping"] else []
    runs += [(c, z) for c in t["clipping"] if c != "none" for z in t["noise_multipliers"]]
    results = []
    for clipping, z in runs:
        print(f"dp: clipping {clipping}, noise multiplier {z}", file=sys.stderr)
        make = functools.partial(make_dp, loss, z, clipping == "adaptive", frozen)
        rows = _sweep(
            make,
            [{}],
            train,
            test,
            model,
            settings,
            t,
            cohort_size=t["cohort_slots"],
            sampler=sampler,
        )
        row: dict[str, Any] = {"clipping": clipping, "noise_multiplier": z}
        if z is not None:
            row["update_noise_multiplier"] = _update_noise(z, clipping, q * n)
            for acc in ("rdp", "pld"):
                eps = fl.privacy.epsilon(z, q, t["rounds"], delta, accountant=acc)
                row[f"epsilon_{acc}"] = None if eps == float("inf") else eps
        results.append({**row, **_summary([r["test_accuracy"] for r in rows])})
    return {
        "settings": {
            **t,
            "num_clients": n,
            "num_train_examples": train.num_examples,
            "expected_cohort_size": q * n,
            "delta": delta,
            "sampling": "poisson (bernoulli sampler, every available client in the cohort)",
            "p_cohort_overflow_per_round": overflow,
        },
        "results": results,
    }


def run_dp_axes(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (b) on the noise axis: one program per clipping mode, epsilon from the sweep."""
    t = settings["dp"]
    train, test, model = _problem(settings, t["data"])
    loss = fl.models.classification_loss(model)
    n = train.num_clients
    q = t["sampling_rate"]
    delta = float(n ** -t["delta_exponent"])
    fixed = {
        "client_learning_rate": settings["client_learning_rate"],
        "expected_cohort_size": q * n,
        "fixed_clip_norm": t["fixed_clip_norm"],
        "adaptive_initial_clip_norm": t["adaptive_initial_clip_norm"],
        "target_quantile": t["target_quantile"],
        "clip_learning_rate": t["clip_learning_rate"],
    }
    frozen = tuple(sorted(fixed.items()))
    sampler = fl.data.participation.bernoulli(q)
    overflow = _binomial_tail(n, q, t["cohort_slots"])
    accounting = fl.sweep.DPAccounting(q, delta, accountants=("rdp", "pld"))
    sweep_kw = dict(cohort_size=t["cohort_slots"], sampler=sampler)
    results = []
    if "none" in t["clipping"]:
        print("dp (axes): clipping none", file=sys.stderr)
        make = functools.partial(make_dp, loss, None, False, frozen)
        rows = _sweep(make, [{}], train, test, model, settings, t, **sweep_kw)
        results.append({"clipping": "none", "noise_multiplier": None,
                        **_summary([r["test_accuracy"] for r in rows])})
    per = len(settings["seeds"])
    for clipping in [c for c in t["clipping"] if c != "none"]:
        zs = t["noise_multipliers"]
        if clipping == "adaptive" and not all(2.0 * q * n / 20.0 > z for z in zs):
            raise ValueError("dp.noise_multipliers: adaptive clipping needs 2 sigma_b > z.")
        print(f"dp (axes): clipping {clipping}, noise multipliers {zs}", file=sys.stderr)
        make = functools.partial(make_dp_axes, loss, clipping == "adaptive", frozen)
        rows = _sweep(make, fl.grid(noise_multiplier=zs), train, test, model, settings, t,
                      dp_accounting=accounting, **sweep_kw)
        for i, z in enumerate(zs):
            mine = rows[i * per : (i + 1) * per]
            row: dict[str, Any] = {"clipping": clipping, "noise_multiplier": z,
                                   "update_noise_multiplier": _update_noise(z, clipping, q * n)}
            for acc in ("rdp", "pld"):
                eps = mine[0][f"epsilon_{acc}"]
                row[f"epsilon_{acc}"] = None if eps == float("inf") else eps
            results.append({**row, **_summary([r["test_accuracy"] for r in mine])})
    return {
        "settings": {
            **t,
            "num_clients": n,
            "num_train_examples": train.num_examples,
            "expected_cohort_size": q * n,
            "delta": delta,
            "sampling": "poisson (bernoulli sampler, every available client in the cohort)",
            "p_cohort_overflow_per_round": overflow,
        },
        "results": results,
    }


def _update_noise(z: float, clipping: str, expected_cohort_size: float) -> float | None:
    """The noise multiplier on the update sum; ``None`` when infinite.

    With adaptive clipping the clipped-count release (noise ``σ_b = m / 20``) shares the budget:
    ``z_Δ = (z^-2 - (2 σ_b)^-2)^-1/2`` (Andrew et al. 2021; ``fl.privacy.dp_aggregator``).
    """
    if clipping != "adaptive" or z == 0:
        return z
    inv = z**-2 - (2.0 * expected_cohort_size / 20.0) ** -2
    return inv**-0.5 if inv > 0 else None


def _binomial_tail(n: int, q: float, k: int) -> float:
    """``P[Binomial(n, q) > k]``, from the log pmf (no SciPy needed)."""
    from math import lgamma, log

    total = 0.0
    for j in range(k + 1, n + 1):
        total += np.exp(
            lgamma(n + 1) - lgamma(j + 1) - lgamma(n - j + 1) + j * log(q) + (n - j) * log(1 - q)
        )
    return float(total)


def run_compression(settings: dict[str, Any]) -> dict[str, Any]:
    """Table (c): accuracy against uplink bits per client and per round."""
    t = settings["compression"]
    train, test, model = _problem(settings, t["data"])
    loss = fl.models.classification_loss(model)
    fixed = {
        "client_learning_rate": settings["client_learning_rate"],
        "num_clients": train.num_clients,
    }
    frozen = tuple(sorted(fixed.items()))
    params = model.init(jax.random.key(0))
    d = fl.models.num_params(params)
    if int(np.min(train.client_sizes)) == 0:  # bits_per_round counts every cohort member
        raise ValueError("compression.data: every client needs training data for these tables.")
    results = []
    for name, arg, ef in t["rows"]:
        print(f"compression: {name}({arg}), error feedback {ef}", file=sys.stderr)
        make = functools.partial(make_compressed, loss, name, arg, ef, frozen)
        rows = _sweep(make, [{}], train, test, model, settings, t, cohort_size=t["cohort_size"])
        bits = compressor_from(name, arg).bits(params)
        results.append(
            {
                "compressor": name,
                "argument": arg,
                "error_feedback": ef,
                "bits_per_client": int(bits),
                "bits_per_round": int(bits * t["cohort_size"]),
                "compression_ratio": 32 * d / bits,
                **_summary([r["test_accuracy"] for r in rows]),
            }
        )
    return {
        "settings": {**t, "num_clients": train.num_clients, "num_params": d},
        "results": results,
    }


# ------------------------------------------------------------------------------------ tables


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "inf" if x is None else format(x, spec)


def heterogeneity_markdown(table: dict[str, Any]) -> str:
    """Markdown: one row per method, one column per Dirichlet alpha."""
    s = table["settings"]
    cells = {(r["method"], r["alpha"]): r for r in table["results"]}
    lines = ["| method | " + " | ".join(f"alpha = {a:g}" for a in s["alphas"]) + " |",
             "|" + " --- |" * (len(s["alphas"]) + 1)]
    for m in s["methods"]:
        vals = [_fmt(cells[(m, a)]["test_accuracy"]) for a in s["alphas"]]
        lines.append(f"| {METHODS[m]} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def attacks_markdown(table: dict[str, Any]) -> str:
    """Markdown: one row per aggregator, one column per (malicious fraction, attack)."""
    s = table["settings"]
    cells = {(r["aggregator"], r["attack"], r["fraction"]): r for r in table["results"]}
    cols = [(f, a) for f in s["fractions"] for a in s["attacks"]]
    head = "| aggregator | " + " | ".join(f"{ATTACK_TITLES[a]} @{f:.0%}" for f, a in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 1)]
    for agg in s["aggregators"]:
        vals = [_fmt(cells[(agg, a, f)]["test_accuracy"]) for f, a in cols]
        lines.append(f"| {AGGREGATORS[agg]} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def dp_markdown(table: dict[str, Any]) -> str:
    """Markdown: one row per (clipping, noise multiplier) with its epsilon and accuracy."""
    lines = [
        "| clipping | noise multiplier z | update noise z_Δ | epsilon (RDP) | epsilon (PLD) | "
        "test accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table["results"]:
        if r["noise_multiplier"] is None:
            lines.append(f"| none (FedAvg) | - | - | - | - | {r['test_accuracy']:.3f} |")
            continue
        lines.append(
            f"| {r['clipping']} | {r['noise_multiplier']:g} | "
            f"{_fmt(r['update_noise_multiplier'], '.3g')} | {_fmt(r['epsilon_rdp'], '.3g')} | "
            f"{_fmt(r['epsilon_pld'], '.3g')} | {r['test_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def compression_markdown(table: dict[str, Any]) -> str:
    """Markdown: one row per (compressor, error feedback) with its uplink bits and accuracy."""
    lines = [
        "| compressor | error feedback | bits / client / round | bits / round | ratio | "
        "test accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table["results"]:
        name = (
            r["compressor"]
            if r["argument"] is None
            else (
                f"{r['compressor']}({r['argument']:g})"
                if r["compressor"] != "qsgd"
                else f"qsgd({r['argument']} bits)"
            )
        )
        lines.append(
            f"| {name} | {r['error_feedback']} | {r['bits_per_client']:,} | "
            f"{r['bits_per_round']:,} | {r['compression_ratio']:.1f}x | "
            f"{r['test_accuracy']:.3f} |"
        )
    return "\n".join(lines)


RUNNERS = {"heterogeneity": run_heterogeneity, "attacks": run_attacks, "dp": run_dp,
           "compression": run_compression}
AXES_RUNNERS = {"heterogeneity": run_heterogeneity_axes, "attacks": run_attacks_axes,
                "dp": run_dp_axes, "compression": run_compression}
MARKDOWN = {"heterogeneity": heterogeneity_markdown, "attacks": attacks_markdown,
            "dp": dp_markdown, "compression": compression_markdown}


def _environment() -> dict[str, Any]:
    return {
        "fedjax_lab": fl.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(dev) for dev in jax.devices()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _timed(runner: Callable, settings: dict[str, Any]) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    table = runner(settings)
    table["wall_time_s"] = time.perf_counter() - start
    table["cpu_time_s"] = time.process_time() - cpu  # this process, all its threads
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the tables, prints them as markdown and writes ``--out``; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few rounds of a reduced grid")
    p.add_argument("--only", choices=TABLES, help="run one table (merged into an existing --out)")
    p.add_argument("--out", required=True, help="JSON file for every number and setting")
    p.add_argument("--runner", choices=RUNNER_CHOICES, default="axes",
                   help="loop: one program per cell; axes (default): the sweep axes; both: "
                   "loop then axes, with the wall-time ratio and the differences")
    p.add_argument("--aggregators", help="table (a) for these aggregators only (comma-separated"
                   "), written as 'attacks_subset' next to the full table")
    args = p.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.aggregators:
        aggs = args.aggregators.split(",")
        unknown = [a for a in aggs if a not in AGGREGATORS]
        if unknown:
            p.error(f"--aggregators: unknown {unknown}; choose from {list(AGGREGATORS)}")
        settings = {**settings, "attacks": {**settings["attacks"], "aggregators": aggs}}
    mode = "smoke" if args.smoke else "full"
    out = Path(args.out)
    results: dict[str, Any] = {}
    if args.only and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("mode") == mode:
            results = previous
    common = {
        k: settings[k] for k in ("seeds", "model", "client_learning_rate", "batch_size", "epochs")
    }
    results.update({"mode": mode, "common": common, "environment": _environment()})
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in [args.only] if args.only else TABLES:
        if args.runner == "both" and RUNNERS[name] is not AXES_RUNNERS[name]:
            loop = _timed(RUNNERS[name], settings)
            print(f"\n### {name}, loop ({loop['wall_time_s']:.0f} s)\n\n"
                  f"{MARKDOWN[name](loop)}\n", flush=True)
            table = _timed(AXES_RUNNERS[name], settings)
            table["loop_vs_axes"] = compare(loop, table)
        else:
            runners = RUNNERS if args.runner == "loop" else AXES_RUNNERS
            table = _timed(runners[name], settings)
        table["runner"] = (
            "loop" if args.runner == "loop" or RUNNERS[name] is AXES_RUNNERS[name] else "axes"
        )
        key = "attacks_subset" if name == "attacks" and args.aggregators else name
        results[key] = table
        print(
            f"\n### {name} ({table['wall_time_s']:.0f} s)\n\n{MARKDOWN[name](table)}\n", flush=True
        )
        if "loop_vs_axes" in table:
            c = table["loop_vs_axes"]
            print(f"{name}: loop {c['loop_wall_time_s']:.1f} s, axes {c['axes_wall_time_s']:.1f} "
                  f"s: {c['speedup']:.2f}x; {c['identical_runs']}/{c['runs']} runs of equal "
                  f"accuracy, largest difference {c['max_abs_accuracy_difference']:.4f}",
                  flush=True)
        results["loop_vs_axes"] = summarize(results)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after every table
    if results["loop_vs_axes"]["tables"]:
        c = results["loop_vs_axes"]
        print(f"all compared tables: loop {c['loop_wall_time_s']:.1f} s, axes "
              f"{c['axes_wall_time_s']:.1f} s: {c['speedup']:.2f}x")
    print(f"wrote {out}")
    return results


_VALUES = ("test_accuracy", "per_seed")


def compare(loop: dict[str, Any], axes: dict[str, Any]) -> dict[str, Any]:
    """One table by both runners: the same cells and settings; wall times, accuracy differences.

    Every field of a row but the accuracies (epsilon, bits, cell names) must be equal.
    """
    if loop["settings"] != axes["settings"] or len(loop["results"]) != len(axes["results"]):
        raise RuntimeError("loop and axes runners built different tables")
    diffs = []
    for a, b in zip(loop["results"], axes["results"], strict=True):
        same = {k: v for k, v in a.items() if k not in _VALUES}
        if same != {k: v for k, v in b.items() if k not in _VALUES}:
            raise RuntimeError(f"loop and axes rows differ beyond the accuracy: {a} vs {b}")
        diffs += [abs(x - y) for x, y in zip(a["per_seed"], b["per_seed"], strict=True)]
    return {
        "loop_wall_time_s": loop["wall_time_s"],
        "axes_wall_time_s": axes["wall_time_s"],
        "speedup": loop["wall_time_s"] / axes["wall_time_s"],
        "loop_cpu_time_s": loop["cpu_time_s"],
        "axes_cpu_time_s": axes["cpu_time_s"],
        "max_abs_accuracy_difference": max(diffs),
        "identical_runs": int(sum(d == 0 for d in diffs)),
        "runs": len(diffs),
        "loop_results": loop["results"],
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The compared tables' totals: loop and axes wall time, their ratio, the worst difference.

    Example:
      >>> c = {"loop_wall_time_s": 6.0, "axes_wall_time_s": 2.0, "max_abs_accuracy_difference": 0}
      >>> summarize({"dp": {"loop_vs_axes": c}, "mode": "full"})["speedup"]
      3.0
    """
    tables = {n: t["loop_vs_axes"] for n, t in results.items()
              if isinstance(t, dict) and "loop_vs_axes" in t}
    out: dict[str, Any] = {"tables": sorted(tables)}
    if tables:
        loop = sum(c["loop_wall_time_s"] for c in tables.values())
        axes = sum(c["axes_wall_time_s"] for c in tables.values())
        out.update(loop_wall_time_s=loop, axes_wall_time_s=axes, speedup=loop / axes,
                   max_abs_accuracy_difference=max(c["max_abs_accuracy_difference"]
                                                   for c in tables.values()))
    return out


if __name__ == "__main__":
    main()
