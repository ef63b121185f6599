"""fedjax-lab run reports the privacy a DP-FedAvg run spent, equal to dp_accounting's own answer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest

from fedjax_lab import cli
from fedjax_lab import experiment as exp_lib

NUM_CLIENTS, COHORT, ROUNDS, DELTA = 20, 4, 3, 1e-3

TINY_DP = f"""
name = "tiny dp"
[data]
name = "digits"
num_clients = {NUM_CLIENTS}
partition = "iid"
[model]
name = "mlp"
hidden = [8]
[training]
rounds = {ROUNDS}
cohort_size = {COHORT}
batch_size = 16
client_map = "sequential"
[evaluation]
every = {ROUNDS}
[checkpoint]
every = {ROUNDS}
[privacy]
delta = {DELTA}
[[algorithms]]
name = "dp_fedavg"
label = "dp_fixed"
noise_multiplier = 0.9
clip_norm = 0.5
expected_cohort_size = {COHORT}
[[algorithms]]
name = "dp_fedavg"
label = "dp_clip_only"
noise_multiplier = 0.0
clip_norm = 0.5
"""


def _poisson_event(z: float, q: float, rounds: int) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(z)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, gaussian), rounds
    )


def _rdp_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    acc.compose(_poisson_event(z, q, rounds))
    return acc.get_epsilon(delta)


def _pld_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(_poisson_event(z, q, rounds))
    return acc.get_epsilon(delta)


def _fixed_size_epsilon(z: float, cohort: int, n: int, rounds: int, delta: float) -> float:
    """Fixed-size cohorts without replacement: replace-one RDP, sensitivity 2C (z / 2)."""
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    one = dp_accounting.SampledWithoutReplacementDpEvent(
        n, cohort, dp_accounting.GaussianDpEvent(z / 2))
    acc.compose(dp_accounting.SelfComposedDpEvent(one, rounds))
    return acc.get_epsilon(delta)


def test_run_writes_and_prints_the_epsilon_dp_accounting_computes(tmp_path: Path, capsys):
    cfg = tmp_path / "dp.toml"
    cfg.write_text(TINY_DP)
    out = tmp_path / "out"
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    runs = json.loads((out / "summary.json").read_text())["runs"]
    q = COHORT / NUM_CLIENTS
    fixed = runs["dp_fixed"]
    # epsilon: the sampler actually used (fixed-size cohorts without replacement, RDP).
    want = _fixed_size_epsilon(0.9, COHORT, NUM_CLIENTS, ROUNDS, DELTA)
    assert fixed["epsilon"] == pytest.approx(want, rel=1e-9)
    assert 0 < fixed["epsilon"] < math.inf
    assert (fixed["delta"], fixed["accountant"], fixed["sampling"], fixed["neighbouring"]) == (
        DELTA, "rdp", "fixed_size_without_replacement", "replace_one")
    assert (fixed["noise_multiplier"], fixed["sampling_rate"], fixed["rounds"]) == (0.9, q, ROUNDS)
    # epsilon_poisson: the Poisson approximation, the tighter of RDP and PLD by default.
    rdp, pld = _rdp_epsilon(0.9, q, ROUNDS, DELTA), _pld_epsilon(0.9, q, ROUNDS, DELTA)
    assert fixed["epsilon_poisson"] == pytest.approx(min(rdp, pld), rel=1e-9)
    assert fixed["accountant_poisson"] == ("pld" if pld < rdp else "rdp")
    per_run = json.loads((out / "dp_fixed" / "summary.json").read_text())
    assert per_run["epsilon"] == fixed["epsilon"]
    # No noise: no guarantee, written as null (JSON has no infinity) and printed as inf.
    assert runs["dp_clip_only"]["epsilon"] is None
    assert runs["dp_clip_only"]["epsilon_poisson"] is None
    assert runs["dp_clip_only"]["noise_multiplier"] == 0.0
    assert f"dp_fixed: epsilon = {fixed['epsilon']:.4g} at delta = 0.001" in printed
    assert f"epsilon_poisson = {fixed['epsilon_poisson']:.4g}" in printed
    assert "dp_clip_only: epsilon = inf" in printed


def _cfg(**privacy) -> dict:
    return exp_lib.validate(
        {
            "algorithms": [{"name": "dp_fedavg", "noise_multiplier": 1.3}],
            "privacy": privacy,
            "training": {"cohort_size": 10},
        }
    )


def test_pld_accountant_and_bernoulli_sampler_match_dp_accounting():
    cfg = _cfg(delta=1e-5, accountant="pld")
    spent = exp_lib.privacy_spent(cfg, cfg["algorithms"][0], rounds=50, num_clients=200)
    assert spent["sampling_rate"] == 10 / 200
    assert spent["epsilon_poisson"] == pytest.approx(_pld_epsilon(1.3, 0.05, 50, 1e-5), rel=1e-9)
    assert spent["accountant_poisson"] == "pld"
    # PLD is tighter than RDP for the same event.
    assert spent["epsilon_poisson"] < _rdp_epsilon(1.3, 0.05, 50, 1e-5)
    # PLD does not account for fixed-size cohorts: the actual sampler's epsilon is RDP's.
    assert spent["epsilon"] == pytest.approx(_fixed_size_epsilon(1.3, 10, 200, 50, 1e-5),
                                             rel=1e-9)
    assert spent["accountant"] == "rdp"
    forced = _cfg(delta=1e-5, accountant="rdp")
    spent = exp_lib.privacy_spent(forced, forced["algorithms"][0], rounds=50, num_clients=200)
    assert spent["epsilon_poisson"] == pytest.approx(_rdp_epsilon(1.3, 0.05, 50, 1e-5), rel=1e-9)
    assert spent["accountant_poisson"] == "rdp"

    bern = exp_lib.validate(
        {
            "algorithms": [{"name": "dp_fedavg", "noise_multiplier": 1.3}],
            "sampler": {"name": "bernoulli", "probs": [0.02, 0.07, 0.03]},
        }
    )
    spent = exp_lib.privacy_spent(bern, bern["algorithms"][0], rounds=50, num_clients=3)
    assert spent["sampling_rate"] == 0.07 and spent["delta"] == exp_lib.DEFAULT_DELTA
    # Bernoulli participation is Poisson sampling: the actual sampler's epsilon is Poisson's,
    # by default the smaller of RDP and PLD.
    rdp, pld = _rdp_epsilon(1.3, 0.07, 50, 1e-5), _pld_epsilon(1.3, 0.07, 50, 1e-5)
    assert spent["epsilon"] == pytest.approx(min(rdp, pld), rel=1e-9)
    assert spent["epsilon"] == spent["epsilon_poisson"] and spent["sampling"] == "poisson"
    assert spent["accountant"] == ("pld" if pld < rdp else "rdp")

    other = exp_lib.validate(
        {
            "algorithms": [{"name": "dp_fedavg"}, {"name": "fedavg"}],
            "sampler": {"name": "dropout_forever", "p_leave": 0.1},
        }
    )
    spent = exp_lib.privacy_spent(other, other["algorithms"][0], rounds=5, num_clients=100)
    assert spent["epsilon"] is None and "dropout_forever" in spent["sampling_note"]
    assert exp_lib.privacy_spent(other, other["algorithms"][1], rounds=5, num_clients=100) is None


@pytest.mark.parametrize(
    "privacy, match",
    [
        ({"delta": 0.0}, r"privacy.delta: need a probability in \(0, 1\)"),
        ({"delta": 1.5}, r"privacy.delta: need a probability in \(0, 1\)"),
        ({"delta": "1e-5"}, "privacy.delta: expected float"),
        ({"delta": True}, "privacy.delta: expected float"),
        ({"delt": 1e-5}, "privacy.delt: unknown key; allowed: 'accountant', 'delta'"),
        ({"accountant": "moments"},
         "privacy.accountant: got 'moments'; allowed: 'best', 'pld', 'rdp'"),
    ],
)
def test_bad_privacy_section_names_the_key(privacy, match):
    with pytest.raises(exp_lib.ConfigError, match=match):
        _cfg(**privacy)


def test_delta_not_below_one_over_n_fails_before_compiling(tmp_path: Path, capsys):
    cfg = tmp_path / "dp.toml"
    cfg.write_text(TINY_DP.replace(f"delta = {DELTA}", "delta = 0.05"))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "privacy.delta: 0.05 is not below 1 / num_clients = 1/20" in err
    assert not (tmp_path / "out" / "dp_fixed").exists()
