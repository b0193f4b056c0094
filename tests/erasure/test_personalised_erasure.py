"""An erasure covers every model a site serves (privseg.erasure.personalised): the personalised
models are redone from the erased global model without the patient, or deleted, and the
certificate says which models the erasure covered.

One tiny federated run (3 sites x 5 subjects: 3 train, 1 val, 1 test; 1 round) personalised
once per module (finetune for 1 epoch, local-only); every test erases from its own copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import LOOSE, small_fl_config, val_cohort
from privseg.audit.certificate import write_certificate
from privseg.audit.ledger import ErasureLedger, file_sha256
from privseg.erasure import LEDGER, ErasureRequest, erase
from privseg.federated.personalise import personalise, read_personalisation
from privseg.federated.simulation import simulate_inprocess
from privseg.train import load_checkpoint


@pytest.fixture(scope="module")
def personalised(tmp_path_factory):
    root = tmp_path_factory.mktemp("perase")
    cohort = val_cohort(root / "c")
    simulate_inprocess(small_fl_config(cohort), root / "run")
    personalise(root / "run", methods=["finetune", "local"], epochs=1)
    return cohort, root / "run"


@pytest.fixture
def run(personalised, tmp_path):
    cohort, original = personalised
    shutil.copytree(original, tmp_path / "run")
    return cohort, tmp_path / "run"


def hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): file_sha256(p) for p in sorted((d / "sites").rglob("*.pt"))
            if p.name in ("personal.pt", "local.pt")}


def test_patient_erasure_redoes_the_personalised_models_and_the_certificate_names_them(run, tmp_path):
    cohort, d = run
    patient = [s.id for s in cohort.select("train", "H2")][0]
    before = hashes(d)
    res = erase(d, ErasureRequest(kind="patient", site="H2", subjects=(patient,), epochs=1, thresholds=LOOSE))
    assert res.status == "completed"
    entries = ErasureLedger(d / LEDGER).entries(res.request_id)
    assert [e["event"] for e in entries if e["event"] != "started"] == [
        "requested", "local_unlearned", "repaired", "verified", "personalised", "completed"]
    # every model derived from the old global model, and H2's own local model, was trained again;
    # the other sites' local-only models never saw the patient: kept, byte for byte
    after = hashes(d)
    for rel in ("sites/H1/personal.pt", "sites/H2/personal.pt", "sites/H3/personal.pt", "sites/H2/local.pt"):
        assert after[rel] != before[rel], rel
    assert after["sites/H1/local.pt"] == before["sites/H1/local.pt"]
    assert after["sites/H3/local.pt"] == before["sites/H3/local.pt"]
    # ... on the retained patients only, from the erased global model
    state_round = json.loads((d / "state.json").read_text())["rounds"][-1]["round"]
    for rel in ("sites/H2/personal.pt", "sites/H2/local.pt"):
        extra = load_checkpoint(d / rel)["extra"]
        assert patient not in extra["train_subjects"] and extra["personalisation"]["global_round"] == state_round
    # personalisation.json: chosen again by the guard against the erased global model
    res_json = read_personalisation(d)
    assert res_json["erasure"] == res.request_id and res_json["global_round"] == state_round
    assert res_json["methods"] == ["finetune", "local"] and res_json["epochs"] == 1  # the recorded settings
    for rec in res_json["sites"].values():
        assert rec["checkpoints"]["global"] == str(res.model.relative_to(d))
        assert rec["val_dice"][rec["serves"]] == max(rec["val_dice"].values())
        assert set(rec["test_dice"]) == {"global", "finetune", "local"}
    assert res_json["sites"]["H1"]["kept"] == ["local"] and res_json["sites"]["H2"]["kept"] == []
    # the completed entry: the models covered, and the stale personalised copies as retrained (old hashes)
    done = ErasureLedger(d / LEDGER).events(res.request_id)["completed"]["body"]
    covered = {(c["model"], c.get("site")): c["fate"] for c in done["covered"]}
    assert covered == {("global", None): "erased", ("finetune", "H1"): "retrained", ("finetune", "H2"): "retrained",
                       ("finetune", "H3"): "retrained", ("local", "H2"): "retrained"}
    fate = {c["path"]: c for c in done["copies"]}
    assert fate["sites/H2/personal.pt"]["fate"] == "retrained"
    assert fate["sites/H2/personal.pt"]["sha256"] == before["sites/H2/personal.pt"]
    assert "sites/H1/local.pt" not in fate  # never held the patient: not a copy
    assert not [c for c in done["copies"] if c["fate"] == "kept" and c["path"].startswith("sites/")]
    assert done["serves"] == {s: r["serves"] for s, r in res_json["sites"].items()}
    j, h = write_certificate(d / LEDGER, res.request_id, tmp_path / "cert")
    cert = json.loads(j.read_text())["certificate"]
    assert not [c for c in cert["copies_remaining"] if c["path"].startswith("sites/")]
    page = h.read_text()
    assert "Models the erasure covered" in page and "personalised model (finetune) at site H2: retrained" in page
    assert "personalised model (local) at site H2: retrained" in page


def test_site_erasure_deletes_its_models_and_a_site_that_cannot_be_redone_serves_the_global_model(run, tmp_path):
    cohort, d = run
    # a method this version no longer has: the sites cannot be personalised again with the recorded methods
    res_json = read_personalisation(d)
    res_json["methods"].append("retired")
    for site, rec in res_json["sites"].items():
        shutil.copy(d / rec["checkpoints"]["finetune"], d / "sites" / site / "retired.pt")
        rec["checkpoints"]["retired"] = f"sites/{site}/retired.pt"
    (d / "personalisation.json").write_text(json.dumps(res_json))
    before = hashes(d)
    res = erase(d, ErasureRequest(kind="site", site="H3", method="retrain", thresholds=LOOSE))
    assert res.status == "completed"
    assert not (d / "sites" / "H3").exists()
    after = read_personalisation(d)
    assert set(after["sites"]) == {"H1", "H2"}  # the erased site left it
    for site in ("H1", "H2"):
        rec = after["sites"][site]
        assert rec["serves"] == "global" and "retired" in rec["fallback"] and "not registered" in rec["fallback"]
        assert not (d / "sites" / site / "personal.pt").exists() and not (d / "sites" / site / "retired.pt").exists()
        assert (d / "sites" / site / "local.pt").is_file()  # trained on the site's own patients only: kept
        assert rec["val_dice"]["global"] is not None
        global_model = load_checkpoint(d / rec["checkpoints"]["global"])
        assert torch.equal(next(iter(global_model["model"].values())),
                           next(iter(load_checkpoint(res.model)["model"].values())))
    done = ErasureLedger(d / LEDGER).events(res.request_id)["completed"]["body"]
    covered = {(c["model"], c.get("site")): c["fate"] for c in done["covered"]}
    assert covered[("finetune", "H3")] == covered[("local", "H3")] == "deleted"
    assert covered[("finetune", "H1")] == covered[("retired", "H2")] == "deleted"
    fate = {c["path"]: c for c in done["copies"]}
    assert fate["sites/H3/personal.pt"]["sha256"] == before["sites/H3/personal.pt"]
    assert "erased with the site" in fate["sites/H3/local.pt"]["reason"]
    assert not [c for c in done["copies"] if c["fate"] == "kept" and c["path"].startswith("sites/")]
    page = write_certificate(d / LEDGER, res.request_id, tmp_path / "cert")[1].read_text()
    assert "personalised model (finetune) at site H3: deleted" in page and "site H1: global" in page
