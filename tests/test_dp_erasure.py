"""Erasure from a DP run keeps the privacy promise: every step after the run is DP and booked in
the site's ledger, the certificate and `privacy status` state the ledger's ε, and an erasure the
budgets cannot pay for is refused before any training step (and before any file is written)."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_cohort
from privseg.audit.certificate import summarise
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.errors import BudgetExceededError, ConfigError
from privseg.federated import FLConfig, check_sites, sites_from_cohort
from privseg.federated.simulation import simulate_inprocess
from privseg.privacy import BudgetLedger, DPConfig
from privseg.train import TrainConfig
from privseg.unlearn.federated import LEDGER, ErasureRequest, erase

LOOSE = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}


def _dp_run(root, dp: DPConfig, rounds: int = 2):
    cohort = make_tiny_cohort(root / "c", sites=2, per_site=4, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=1, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                     steps=rounds)
    run = root / "run"
    state = simulate_inprocess(FLConfig(name="dpe", sites=sites, train=tc, rounds=rounds, local_steps=1,
                                        eval_every=0, keep_updates=True, privacy=dp), run)
    assert state.status == "finished"
    return cohort, run


def test_patient_erasure_from_a_dp_run_is_dp_and_booked(tmp_path, capsys):
    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    cohort, run = _dp_run(tmp_path, dp)
    patient = cohort.select("train", "H1")[0].id
    ledger = BudgetLedger(run / "sites" / "H1" / "privacy.sqlite")
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
    dp = DPConfig(epsilon=4.0, delta=1e-3, clip="fixed", sampling_rate=0.5)  # calibrated: all spent by round 2
    cohort, run = _dp_run(tmp_path, dp)
    patient = cohort.select("train", "H1")[0].id
    ledger = BudgetLedger(run / "sites" / "H1" / "privacy.sqlite")
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
