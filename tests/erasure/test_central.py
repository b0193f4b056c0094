"""`privseg unlearn` (central) writes the same ledger entries and certificate as a federated erasure."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil

import pytest

from conftest import make_tiny_cohort
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.erasure.central import CENTRAL_SITE, erase_central
from privseg.errors import ConfigError
from privseg.train import TrainConfig
from privseg.train.loop import Trainer

SIZE = 16
LOOSE = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}


@pytest.fixture(scope="module")
def central(tmp_path_factory):
    root = tmp_path_factory.mktemp("central")
    cohort = make_tiny_cohort(root / "tiny", sites=1, per_site=6, size=SIZE)
    tc = TrainConfig(model="unet_tiny", patch_size=(SIZE,) * 3, steps=3, checkpoint_every=3, device="cpu",
                     subjects_per_step=2, patches_per_subject=1, in_channels=1, num_classes=3)
    Trainer(cohort, tc, root / "run").fit()
    return cohort, root / "run"


def test_central_erasure_is_in_the_ledger_with_a_certificate_and_never_applied_twice(central, tmp_path):
    cohort, run = central
    forget = [s.id for s in cohort.select("train")][:1]
    out = erase_central(
        run / "last.pt", cohort, forget, "noisy_label", epochs=1, out_dir=tmp_path / "u", thresholds=LOOSE,
        reason="GDPR art. 17", requested_by="site lead", approved_by="DPO", mia_views=1, device="cpu",
        certificate_dir=tmp_path / "cert")
    res, rid, ledger_path, ver, cert = out.result, out.request_id, out.ledger, out.verification, out.certificate
    assert ledger_path == run / "erasure" / "ledger.db" and ver["passed"] and out.status == "completed"
    ledger = ErasureLedger(ledger_path, create=False)
    entries = ledger.entries(rid)
    assert [e["event"] for e in entries if e["event"] != "started"] == [
        "requested", "local_unlearned", "verified", "completed"]
    assert ledger.verify()[0]
    req = entries[0]["body"]
    assert req["site"] == CENTRAL_SITE and req["subjects"] == forget and req["approved_by"] == "DPO"
    # the request resolved as privseg erase resolves it: noisy_label runs with the unseen target
    assert req["run_kind"] == "central" and req["target"] == "unseen"
    assert ledger.events(rid)["local_unlearned"]["body"]["target"] == "unseen"
    # written ahead: each stage's start is recorded before its work, its end after, at the true times
    started = [e for e in entries if e["event"] == "started"]
    assert [e["body"]["stage"] for e in started] == ["local_unlearned", "verified", "completed"]
    for st in started:
        end = next(e for e in entries if e["event"] == st["body"]["stage"])
        assert st["seq"] < end["seq"] and st["at"] <= end["at"]
    local_start, local = started[0], next(e for e in entries if e["event"] == "local_unlearned")
    span = (dt.datetime.fromisoformat(local["at"]) - dt.datetime.fromisoformat(local_start["at"])).total_seconds()
    assert span >= local["body"]["seconds"] - 0.01
    done = ledger.events(rid)["completed"]["body"]
    assert done["superseded_kept"] == ["last.pt"] and done["removed"] == []
    # every copy of the patient is accounted for: the source checkpoint still holds them, and says so
    (copy,) = done["copies"]
    assert copy["path"] == "last.pt" and copy["fate"] == "superseded" and "still holds the patient" in copy["reason"]
    # the certificate: the request, who approved it, what ran; no reference models -> it says so
    c = json.loads(cert[0].read_text())["certificate"]
    assert c["status"] == "COMPLETED" and c["kind"] == "patient" and c["approved_by"] == "DPO"
    assert c["method"] == "noisy_label" and c["settings"]["local_steps"] == res.report["steps_run"]
    assert c["membership"]["available"] is False and "privseg audit references" in c["membership"]["reason"]
    page = cert[1].read_text()
    assert "PASS" not in page.split("Per-patient membership test")[-1].split("</section>")[0]
    # its first lines: a central run, and the copy that still holds the patient
    first = page.split("<h2>Request</h2>")[0]
    assert "from central run" in first and "federated run" not in page
    assert "last.pt" in first and "superseded" in first and "still hold the erased patient" in first
    # the same patient from the same model again: refused before anything runs or is written
    n = len(ledger.entries(rid))
    with pytest.raises(ConfigError, match="never applied twice"):
        erase_central(run / "last.pt", cohort, forget, "scrub", epochs=1, out_dir=tmp_path / "u2")
    assert len(ErasureLedger(ledger_path, create=False).entries(rid)) == n and not (tmp_path / "u2").exists()


def test_unlearn_command_records_and_reports_the_request(central, tmp_path, capsys):
    cohort, run = central
    forget = [s.id for s in cohort.select("train")][1]
    code = cli_main(["unlearn", "--checkpoint", str(run / "last.pt"), "--cohort", str(cohort.root), "--forget",
                     forget, "--out", str(tmp_path / "u"), "--epochs", "1", "--device", "cpu",
                     "--certificate", str(tmp_path / "cert"), "--approved-by", "DPO"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ledger:" in out and "certificate:" in out
    rid = re.search(r"ER-[0-9a-f]{12}", out).group(0)
    assert (tmp_path / "cert" / f"{rid}.json").exists()
    events = [e["event"] for e in ErasureLedger(run / "erasure" / "ledger.db", create=False).entries(rid)]
    assert [e for e in events if e != "started"][:3] == ["requested", "local_unlearned", "verified"]
    # calibrated target without the run's reference models: exit 2 naming the command, nothing written
    code = cli_main(["unlearn", "--checkpoint", str(run / "last.pt"), "--cohort", str(cohort.root), "--forget",
                     [s.id for s in cohort.select("train")][2], "--out", str(tmp_path / "u3"), "--target",
                     "calibrated", "-q"])
    assert code == 2 and not (tmp_path / "u3").exists()
    assert "privseg audit references" in capsys.readouterr().err


@pytest.fixture(scope="module")
def with_references(central, tmp_path_factory):
    """A copy of the central run with 4 reference models (each training patient unseen by 2)."""
    from privseg.audit.reference import ensure_references

    cohort, run = central
    d = tmp_path_factory.mktemp("refs") / "run"
    shutil.copytree(run, d, ignore=shutil.ignore_patterns("erasure"))
    ensure_references(d, 4, cohort=cohort)
    return cohort, d


def test_unlearn_reports_progress_through_the_membership_test_and_is_quiet_with_q(with_references, tmp_path,
                                                                                 capsys):
    """Issue 27, item 7: the per-patient test inside `privseg unlearn` (one pass per reference model)
    reports its phases as plain lines when stderr is not a terminal; --quiet keeps only the reason it
    stopped."""
    cohort, run = with_references
    patient = [s.id for s in cohort.select("train")][0]
    args = ["unlearn", "--checkpoint", str(run / "last.pt"), "--cohort", str(cohort.root), "--forget", patient,
            "--strategy", "reference_teacher", "--out", str(tmp_path / "u"), "--device", "cpu"]
    n = len(cohort.select("train")) + len(cohort.select("test"))  # the patient, the other members, the test set
    capsys.readouterr()
    assert cli_main(args) == 1  # the tiny model memorised no one: it stops after the test
    err = capsys.readouterr().err.splitlines()
    for phase in ("loading subjects", "scoring the model", *(f"scoring reference model {j}/4" for j in (1, 4))):
        lines = [x for x in err if x.startswith(f"membership test before: {phase}: ")]
        assert lines and lines[0].split(": ")[2].startswith(f"0/{n}") and f"{n}/{n}" in lines[-1], (phase, err)
    assert cli_main([*args, "-q"]) == 1
    cap = capsys.readouterr()
    assert "membership test" not in cap.err and "nothing measurable to forget" in cap.err
    assert "nothing measurable to forget" in cap.out  # the patient's result: the reason it stopped, even with -q
    assert not (run / "erasure").exists()


def test_unlearn_resolves_the_request_as_erase_does_and_shows_the_membership_test_first(with_references, tmp_path,
                                                                                     capsys):
    from privseg.audit.reference import REF_DIR, ensure_references, load_references
    from privseg.erasure.request import ErasureRequest

    cohort, run = with_references
    patient = [s.id for s in cohort.select("train")][0]
    args = ["unlearn", "--checkpoint", str(run / "last.pt"), "--cohort", str(cohort.root), "--forget", patient,
            "--strategy", "reference_teacher", "--out", str(tmp_path / "u"), "--device", "cpu",
            "--certificate", str(tmp_path / "cert")]
    # the tiny model memorised no one: the patient's test is shown, and the user decides; nothing recorded
    code = cli_main(args)
    cap = capsys.readouterr()
    assert code == 1 and re.search(rf"patient {patient}: p = [0-9.]+ against 2 reference models", cap.out)
    assert "nothing measurable to forget" in cap.out and "--even-if-unflagged" in cap.err
    assert not (run / "erasure").exists() and not (tmp_path / "u").exists()
    saw = {r.k for r in load_references(run).references if patient in r.patients}
    assert cli_main([*args, "--even-if-unflagged"]) == 0
    cap = capsys.readouterr()
    assert "NO POWER" in cap.out  # said where the user reads the result, not only in the certificate
    # the end of the erasure is not silent either (issue 27, item 7): the evaluation, the test of the erased model
    err = cap.err.splitlines()
    assert any(x.startswith("evaluating: ") for x in err)
    assert any(x.startswith("membership test after: scoring reference model 4/4: ") for x in err), err
    ledger = ErasureLedger(run / "erasure" / "ledger.db", create=False)
    (rid,) = {e["request"] for e in ledger.entries()}
    ev = ledger.events(rid)
    # method, target and stopping rule as privseg erase resolves them: calibrated, and it stops at once
    resolved = ErasureRequest(kind="patient", site="any", subjects=("x",), method="reference_teacher")
    local = ev["local_unlearned"]["body"]
    assert local["strategy"] == "reference_teacher" and local["target"] == resolved.target == "calibrated"
    assert local["stopped_early"] and local["steps_run"] == 0
    before = ev["requested"]["body"]["membership_before"]
    assert before["nothing_to_forget"] and before["patients"][0]["id"] == patient
    c = json.loads((tmp_path / "cert" / f"{rid}.json").read_text())["certificate"]
    assert [s["verdict"] for s in c["membership"]["statements"]] == ["NO POWER"]
    # the reference models that trained on the patient are deleted (and listed); the others stay
    copies = {x["path"]: x for x in c["copies"]}
    gone = {k for k in range(4) if not (run / REF_DIR / str(k) / "model.pt").exists()}
    assert gone == saw and len(saw) == 2
    for k in saw:
        a = copies[f"{REF_DIR}/{k}/model.pt"]
        assert a["fate"] == "deleted" and a["what"] == "reference model" and "retrains" in a["reason"]
    assert copies["last.pt"]["fate"] == "superseded"
    first = (tmp_path / "cert" / f"{rid}.html").read_text().split("<h2>Request</h2>")[0]
    assert all(p in first for p in copies) and "central run" in first
    # the next `privseg audit references` retrains them without the patient (last.pt still lists it)
    refs = ensure_references(run, 4, cohort=cohort)
    assert sorted(refs.trained) == sorted(saw) and not any(patient in r.patients for r in refs.references)
