"""Personalisation under patient-level DP (privseg.federated.private.PersonalDP): every method's
training steps are DP steps booked in the site's ledger under their own scope, the ε stays within
the budget, and a budget that cannot pay is refused before any step (exit 2 on the command line)."""

from __future__ import annotations

import pytest

from conftest import small_fl_config, val_cohort
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.erasure import LEDGER, ErasureRequest, erase
from privseg.errors import BudgetExceededError
from privseg.federated.personalise import personalise, read_personalisation
from privseg.federated.simulation import simulate_inprocess
from privseg.privacy import BudgetLedger, DPConfig


def dp_run(root, dp: DPConfig):
    cohort = val_cohort(root / "c", sites=2)
    cfg = small_fl_config(cohort, rounds=2, local_steps=1, privacy=dp)
    cfg.train.subjects_per_step, cfg.train.steps = 1, 2
    assert simulate_inprocess(cfg, root / "run").status == "finished"
    return cohort, root / "run"


def test_dp_personalisation_books_its_steps_in_each_site_ledger(tmp_path):
    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    _, run = dp_run(tmp_path, dp)
    ledgers = {s: BudgetLedger(run / "sites" / s / "privacy.sqlite") for s in ("H1", "H2")}
    before = {s: (len(ledger.rounds(s)), ledger.spent(s)) for s, ledger in ledgers.items()}
    res = personalise(run, methods=["finetune", "local"], epochs=2)
    assert read_personalisation(run)["sites"].keys() == {"H1", "H2"}
    for site, ledger in ledgers.items():
        rec = res["sites"][site]
        rows = ledger.rounds(site)[before[site][0]:]
        by_scope = {}
        for r in rows:
            by_scope.setdefault(r["scope"], []).append(r)
        # one release per fine-tuning epoch run and one for the local-only model, each under its own scope
        assert set(by_scope) == {"personalise/r2/finetune", "personalise/r2/local"}
        assert len(by_scope["personalise/r2/finetune"]) == rec["methods"]["finetune"]["epochs_run"]
        booked = {scope: sum(r["steps"] for r in rs) for scope, rs in by_scope.items()}
        assert booked["personalise/r2/finetune"] == rec["methods"]["finetune"]["steps"]
        # an epoch is 1 / q steps of the public plan (q 0.5), not n / batch (3 training patients, 1 a step:
        # 3), so the steps and the epsilon booked do not reveal how many patients the site has
        assert rec["methods"]["finetune"]["steps_per_epoch"] == 2
        assert booked["personalise/r2/local"] == rec["methods"]["local"]["steps"] == 2  # 2 rounds x 1 local step
        assert all(r["round"] == 2 for r in rows)  # named by the global model's round
        spent = ledger.spent(site)
        assert before[site][1] < spent <= 100.0 and rec["dp"]["epsilon_after"] == pytest.approx(spent)
        assert ledger.verify() == []
    # asked again, the first epoch has exactly the same inputs (model, optimiser, patients, steps, scope): the
    # same release, drawn from the same bound noise, booked once; a different request is a new release
    n, spent = len(ledgers["H1"].rounds("H1")), ledgers["H1"].spent("H1")
    personalise(run, methods=["finetune"], epochs=1)
    assert len(ledgers["H1"].rounds("H1")) == n and ledgers["H1"].spent("H1") == spent
    personalise(run, methods=["local"], epochs=1)
    assert len(ledgers["H1"].rounds("H1")) == n  # the local-only model's release too
    (run / "checkpoints" / "global_r0000.pt").write_bytes((run / "checkpoints" / "global_r0001.pt").read_bytes())
    personalise(run, methods=["local"], epochs=1)  # another starting model: another release, paid for
    assert len(ledgers["H1"].rounds("H1")) == n + 1 and ledgers["H1"].spent("H1") > spent


def test_a_budget_that_cannot_pay_is_refused_before_any_step(tmp_path, capsys):
    # calibrated to the budget with no reserve: the two rounds spent it all
    dp = DPConfig(epsilon=4.0, delta=1e-3, clip="fixed", sampling_rate=0.5, erasure_reserve=0)
    _, run = dp_run(tmp_path, dp)
    ledgers = {s: BudgetLedger(run / "sites" / s / "privacy.sqlite") for s in ("H1", "H2")}
    rows = {s: ledger.rounds(s) for s, ledger in ledgers.items()}
    with pytest.raises(BudgetExceededError, match="refused before any training step") as info:
        personalise(run, methods=["finetune"], epochs=1)
    assert "site H1 needs epsilon" in str(info.value) and "privseg privacy budget" in str(info.value)
    assert {s: ledger.rounds(s) for s, ledger in ledgers.items()} == rows
    assert not (run / "personalisation.json").exists() and not list(run.glob("sites/*/personal.pt"))
    capsys.readouterr()
    assert cli_main(["fl", "personalise", str(run), "--method", "finetune", "--epochs", "1"]) == 2
    assert "refused before any training step" in capsys.readouterr().err
    # the officer raises the budget (a decision in the ledger): then it runs, within the new budget
    for s in ("H1", "H2"):
        assert cli_main(["privacy", "budget", str(run), "--site", s, "--epsilon", "40"]) == 0
    personalise(run, methods=["finetune"], epochs=1)
    assert all(4.0 < ledger.spent(s) <= 40.0 for s, ledger in ledgers.items())


def test_an_erasure_redoes_the_personalised_models_with_booked_dp_steps(tmp_path):
    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    cohort, run = dp_run(tmp_path, dp)
    personalise(run, methods=["finetune"], epochs=1)
    patient = cohort.select("train", "H1")[0].id
    res = erase(run, ErasureRequest(kind="patient", site="H1", subjects=(patient,), repair_rounds=1,
                                    thresholds={"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0,
                                                "min_test_dice_ratio": 0.0}))
    assert res.status == "completed"
    for site in ("H1", "H2"):  # both fine-tuned models came from the global model that saw the patient
        ledger = BudgetLedger(run / "sites" / site / "privacy.sqlite")
        redo = ledger.rounds(site, scope=f"erasure/{res.request_id}/personalise/finetune")
        assert redo and sum(r["steps"] for r in redo) == read_personalisation(run)["sites"][site]["methods"][
            "finetune"]["steps"]
        assert ledger.spent(site) <= 100.0 and ledger.verify() == []
    done = ErasureLedger(run / LEDGER).events(res.request_id)["completed"]["body"]
    assert {(c["model"], c.get("site"), c["fate"]) for c in done["covered"]} == {
        ("global", None, "erased"), ("finetune", "H1", "retrained"), ("finetune", "H2", "retrained")}


def test_a_site_whose_budget_cannot_pay_for_the_redo_serves_the_erased_global_model(tmp_path, capsys):
    from privseg.erasure.private import price

    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    cohort, run = dp_run(tmp_path, dp)
    personalise(run, methods=["finetune"], epochs=1)
    req = ErasureRequest(kind="patient", site="H1", subjects=(cohort.select("train", "H1")[0].id,), repair_rounds=1,
                         thresholds={"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0})
    # the officer sets H1's budget to what the erasure itself needs: nothing is left for the redo there
    need = {r["site"]: r["epsilon_after"] for r in price(run, req)}
    assert cli_main(["privacy", "budget", str(run), "--site", "H1", "--epsilon", f"{need['H1'] + 1e-4:.6f}"]) == 0
    capsys.readouterr()
    res = erase(run, req)
    assert res.status == "completed"
    after = read_personalisation(run)["sites"]
    assert after["H1"]["serves"] == "global" and "refused before any training step" in after["H1"]["fallback"]
    assert not (run / "sites" / "H1" / "personal.pt").exists()
    assert not BudgetLedger(run / "sites" / "H1" / "privacy.sqlite").rounds(
        "H1", scope=f"erasure/{res.request_id}/personalise/finetune")  # no step was taken at H1
    assert (run / "sites" / "H2" / "personal.pt").is_file() and "fallback" not in after["H2"]  # H2 could pay
    covered = {(c["model"], c.get("site")): c["fate"]
               for c in ErasureLedger(run / LEDGER).events(res.request_id)["completed"]["body"]["covered"]}
    assert covered[("finetune", "H1")] == "deleted" and covered[("finetune", "H2")] == "retrained"


def test_personalisation_leaves_the_erasure_reserve(tmp_path):
    # calibrated so that the two rounds and the default erasure reserve compose to the budget: the rounds
    # left room, but only the reserve's, which personalisation must not spend
    dp = DPConfig(epsilon=4.0, delta=1e-3, clip="fixed", sampling_rate=0.5)
    _, run = dp_run(tmp_path, dp)
    ledger = BudgetLedger(run / "sites" / "H1" / "privacy.sqlite")
    assert ledger.spent("H1") < 4.0 * 0.99  # there is room left ...
    with pytest.raises(BudgetExceededError, match="with the erasure reserve it keeps"):
        personalise(run, methods=["finetune"], epochs=1)  # ... but it is the reserve's
