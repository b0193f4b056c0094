"""Erasure from a DP run keeps the privacy promise: every step after the run is DP and booked in
the site's ledger, the certificate and `privacy status` state the ledger's ε, and an erasure the
budgets cannot pay for is refused before any training step (and before any file is written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import LOOSE, tiny_dp_run
from privseg.audit.certificate import summarise
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.erasure import LEDGER, ErasureRequest, erase
from privseg.errors import BudgetExceededError, ConfigError
from privseg.federated import FLConfig
from privseg.privacy import BudgetLedger, DPConfig
from privseg.privacy.budget import ledger_path


def _dp_run_at_h1(tmp_path, dp) -> tuple[Path, str, BudgetLedger]:
    """A finished 2-site DP run (conftest.tiny_dp_run), a training patient of site H1 and H1's privacy ledger."""
    cohort, run = tiny_dp_run(tmp_path, dp)
    return run, cohort.select("train", "H1")[0].id, BudgetLedger(ledger_path(run, "H1"))


def test_patient_erasure_from_a_dp_run_is_dp_and_booked(tmp_path, capsys):
    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    run, patient, ledger = _dp_run_at_h1(tmp_path, dp)
    before = ledger.spent("H1")
    res = erase(run, ErasureRequest(kind="patient", site="H1", subjects=(patient,), reason="GDPR art. 17",
                                    thresholds=LOOSE, repair_rounds=1))
    assert res.status == "completed"
    scopes = {(r["scope"], r["round"]) for r in ledger.rounds("H1")}
    assert (f"erasure/{res.request_id}/local", 1) in scopes and ("", 3) in scopes  # local stage + repair round
    spent = ledger.spent("H1")
    assert spent > before
    s = summarise(ErasureLedger(run / LEDGER).entries(res.request_id))
    assert s["method"] == "dp_finetune"  # what ran, not the request's default strategy
    assert s["settings"]["repair_rounds"] == 1 and s["settings"]["local_steps"] == 1
    assert s["dp"]["epsilon"] == pytest.approx(spent) and s["dp"]["private"] is True
    assert cli_main(["privacy", "status", str(run), "--json"]) == 0
    rows = {r["site"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["H1"]["epsilon_spent"] == pytest.approx(spent)


def test_unaffordable_erasure_is_refused_before_any_training(tmp_path, capsys):
    # calibrated without an erasure reserve: all spent by round 2
    dp = DPConfig(epsilon=4.0, delta=1e-3, clip="fixed", sampling_rate=0.5, erasure_reserve=0)
    run, patient, ledger = _dp_run_at_h1(tmp_path, dp)
    rows_before = ledger.rounds("H1")
    with pytest.raises(ConfigError, match="unknown"):  # a bad request: refused before the ledger file exists
        erase(run, ErasureRequest(kind="patient", site="H1", subjects=("NOPE",), thresholds=LOOSE))
    assert not (run / LEDGER).exists()
    with pytest.raises(BudgetExceededError, match="refused before any training") as info:
        erase(run, ErasureRequest(kind="patient", site="H1", subjects=(patient,), thresholds=LOOSE))
    assert "needs epsilon" in str(info.value) and "left" in str(info.value) and "budget" in str(info.value)
    assert ledger.rounds("H1") == rows_before
    assert not (run / LEDGER).exists() and not (run / "erasure").exists()
    # the officer raises the budget (recorded in the ledger); the same request then goes through
    assert cli_main(["privacy", "budget", str(run), "--site", "H1", "--epsilon", "40"]) == 0
    assert cli_main(["privacy", "budget", str(run), "--site", "H2", "--epsilon", "40"]) == 0
    assert cli_main(["privacy", "budget", str(run), "--site", "H1", "--epsilon", "1"]) == 2  # below what is spent
    capsys.readouterr()
    assert cli_main(["erase", "--run", str(run), "--site", "H1", "--subject", patient, "--reason", "GDPR art. 17",
                     "--requested-by", "h1 lead", "--approved-by", "dpo", "--max-mia-auc", "1",
                     "--min-retain-dice-ratio", "0", "--min-test-dice-ratio", "0", "--quiet"]) == 0
    entries = ErasureLedger(run / LEDGER).entries()
    s = summarise([e for e in entries if e["request"] == entries[-1]["request"]])
    assert s["status"] == "COMPLETED" and s["approved_by"] == "dpo" and s["requested_by"] == "h1 lead"
    assert ledger.spent("H1") <= 40.0


def test_default_dp_run_keeps_a_reserve_that_pays_for_one_patient_erasure(tmp_path, capsys):
    """Issue 27, item 4: with the default budget and erasure reserve, training leaves room for one
    patient erasure with the default method; training past the plan may not eat into it."""
    from privseg.erasure.private import dp_steps
    from privseg.federated.runstate import RunState
    from privseg.federated.simulation import run_rounds
    from privseg.privacy.spec import dp_default

    dp = DPConfig(delta=1e-3, clip="fixed")  # the default budget (epsilon 8), plan and reserve
    cohort, run = tiny_dp_run(tmp_path, dp, rounds=3)
    cfg = FLConfig.load(run)
    patient = cohort.select("train", "H1")[0].id
    # the reserve is what one default patient erasure costs at the site that erases (each fact once)
    need = dp_steps(cfg, RunState.load(run), ErasureRequest(kind="patient", site="H1", subjects=(patient,)))
    assert max(need.values()) == dp_default("erasure_reserve") * cfg.local_steps
    ledgers = {s: BudgetLedger(run / "sites" / s / "privacy.sqlite") for s in ("H1", "H2")}
    for site, ledger in ledgers.items():
        row = next(r for r in ledger.status() if r["site"] == site)
        assert row["reserve_steps"] == 2 and row["epsilon_spent"] < 8.0
        assert row["epsilon_with_reserve"] == pytest.approx(8.0, rel=1e-3)  # training + reserve spend the budget
    assert cli_main(["privacy", "status", str(run)]) == 0
    assert "erasure reserve of 2 DP step(s)" in capsys.readouterr().out
    # training past the plan would eat into the reserve: refused
    state = run_rounds(run, "in-process", rounds=4)
    assert state.status == "budget-exhausted" and "erasure reserve" in state.data["stop_reason"]
    spent = {s: ledger.spent(s) for s, ledger in ledgers.items()}
    # the erasure spends from the reserve, without a budget raise
    res = erase(run, ErasureRequest(kind="patient", site="H1", subjects=(patient,), thresholds=LOOSE))
    assert res.status == "completed"
    for site, ledger in ledgers.items():
        assert spent[site] < ledger.spent(site) <= 8.0 * (1 + 1e-6)
        assert [h["reason"] for h in ledger.budget_history(site)] == ["plan"]  # never raised


def test_erasure_reserve_is_calibrated_into_the_plan():
    from privseg.privacy.accountant import epsilon
    from privseg.privacy.plan import make_plan, plan_for

    dp = DPConfig(delta=1e-3, clip="fixed", noise_schedule="decay")
    plain = make_plan(DPConfig(delta=1e-3, clip="fixed", noise_schedule="decay", erasure_reserve=0), "H1", 40, 2, 30,
                      local_steps=10)
    kept = make_plan(dp, "H1", 40, 2, 30, local_steps=10)
    assert plain.reserve == [] and kept.reserve_events()[0].steps == 20
    assert kept.base_sigma > plain.base_sigma  # more noise: the budget pays for training and the reserve
    assert epsilon(kept.events(0, 30) + kept.reserve_events(), 1e-3) == pytest.approx(8.0, rel=1e-3)
    assert "erasure reserve: 20 step(s)" in plan_for(dp, "H1", 30, local_steps=10).describe()
    assert make_plan(dp, "H1", 40, 2, 30).reserve == []  # no rounds (a central run): no reserve


def test_every_option_the_refusal_suggests_exists_and_goes_through(tmp_path):
    """Issue 27, item 5: the refusal's advice names only options that exist and fit (no
    --local-steps, no --method retrain that would be refused too); each one, applied to a copy of
    the run, lets the same erasure complete."""
    import shutil
    from dataclasses import replace

    from privseg.erasure.private import budget_options
    from privseg.privacy.budget import change_budget

    dp = DPConfig(delta=1e-3, clip="fixed", erasure_reserve=1)  # room for 1 DP step: the default needs 2 at H1
    cohort, run = tiny_dp_run(tmp_path, dp)
    patient = cohort.select("train", "H1")[0].id
    req = ErasureRequest(kind="patient", site="H1", subjects=(patient,), thresholds=LOOSE)
    with pytest.raises(BudgetExceededError) as info:
        erase(run, req)
    advice = str(info.value)
    assert "--local-steps" not in advice and "--method retrain" not in advice
    options = budget_options(run, req)
    assert [o.get("settings") for o in options] == [{"repair_rounds": 0}, None]
    assert all(o["text"].split(" (")[0] in advice for o in options)
    for i, option in enumerate(options):
        copy = tmp_path / f"option{i}"
        shutil.copytree(run, copy)
        if "budget" in option:
            for site, eps in option["budget"].items():
                change_budget(copy, site, eps)
        res = erase(copy, replace(req, **option.get("settings", {})))
        assert res.status == "completed", option
