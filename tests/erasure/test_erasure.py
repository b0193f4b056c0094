"""Erasure requests in a federation: patient and site erasure, ledger, certificate, crashes.

One tiny federated run (3 sites x 4 subjects, 3 rounds, unet_tiny, 16^3) is trained once per
module; every test erases from its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reliability_log as rlog
from conftest import tiny_federation
from privseg.audit.certificate import write_certificate
from privseg.audit.ledger import GENESIS, ErasureLedger
from privseg.cli import main as cli_main
from privseg.erasure import LEDGER, ErasureRequest, erase
from privseg.errors import ConfigError
from privseg.federated import FLConfig, RunState
from privseg.federated.runstate import hold_run
from privseg.federated.simulation import run_rounds
from privseg.federated.sites import read_site_cohort, site_subjects

LOOSE = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}
ROUNDS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_federation(tmp_path_factory.mktemp("erase"), name="fed", rounds=ROUNDS, local_steps=1, per_site=4,
                           size=20, subjects_per_step=2)


@pytest.fixture
def run(trained, tmp_path):
    cohort, original = trained
    d = tmp_path / "fed"
    shutil.copytree(original, d)
    return cohort, d


def train_ids(cohort, site):
    return [s.id for s in cohort.select("train", site)]


def patient_request(cohort, **kw):
    base = dict(kind="patient", site="H2", subjects=(train_ids(cohort, "H2")[0],), reason="GDPR art. 17",
                requested_by="dpo@h2", epochs=2, thresholds=LOOSE)
    base.update(kw)
    return ErasureRequest(**base)


def events(run_dir, rid=None):
    """The stages' end events (each stage's ``started`` entry left out)."""
    return [e["event"] for e in ErasureLedger(run_dir / LEDGER).entries(rid) if e["event"] != "started"]


# -- patient -------------------------------------------------------------------------------

def test_patient_erasure_end_to_end(run, tmp_path):
    cohort, d = run
    req = patient_request(cohort)
    subject = req.subjects[0]
    (d / "export").mkdir()
    (d / "export" / "model.onnx").write_bytes(b"an export of the model before the erasure")
    res = erase(d, req)
    assert res.status == "completed" and res.passed
    assert events(d, res.request_id) == ["requested", "local_unlearned", "repaired", "verified", "completed"]
    # written ahead: each stage is recorded when it starts, then when it ends
    entries = ErasureLedger(d / LEDGER).entries(res.request_id)
    assert [(e["event"], e["body"].get("stage")) for e in entries][1:] == [
        ("started", "local_unlearned"), ("local_unlearned", None), ("started", "repaired"), ("repaired", None),
        ("started", "verified"), ("verified", None), ("started", "completed"), ("completed", None)]
    # the site never uses the patient again; the repair round is part of the run and serves the model
    cfg, state = FLConfig.load(d), RunState.load(d)
    assert cfg.site("H2").exclude == (subject,)
    spec = cfg.site("H2")
    assert subject not in [s.id for s in site_subjects(read_site_cohort(spec.cohort), spec)]
    assert state.rounds_done == ROUNDS + 1 and state.rounds[-1]["erasure"] == res.request_id
    assert res.model == state.last_checkpoint and res.model.is_file()
    # everything derived from the rounds that saw the patient is gone, the data-free initial model stays
    assert (d / "checkpoints" / "global_r0000.pt").is_file()
    for r in range(1, ROUNDS + 1):
        assert not state.checkpoint_path(r).exists()
        assert not (d / "updates" / f"r{r:04d}").exists()
    done = ErasureLedger(d / LEDGER).events(res.request_id)["completed"]["body"]
    assert len(done["removed"]) >= 2 * ROUNDS and all(len(a["sha256"]) == 64 for a in done["removed"])
    # every copy of the patient's influence is accounted for: deleted, or kept with the reason
    fate = {c["path"]: (c["what"], c["fate"]) for c in done["copies"]}
    assert {a["path"] for a in done["removed"]} <= set(fate)
    assert fate["checkpoints/global_r0001.pt"] == ("global checkpoint", "deleted")
    assert fate["export/model.onnx"] == ("export", "kept")
    assert "checkpoints/global_r0000.pt" not in fate and str(res.model.relative_to(d)) not in fate
    ver = res.verification
    assert set(ver["before"]) >= {"mia_auc", "retain_dice", "test_dice"} and ver["members"] == {"H2": [subject]}
    assert all(subject not in ids for ids in ver["nonmembers"].values())
    # the same request again is applied once
    again = erase(d, req)
    once = again.status == "already-completed" and events(d).count("completed") == 1 \
        and RunState.load(d).rounds_done == ROUNDS + 1
    rlog.record("invariant", "erasure:same-request-applied-once", once)
    assert once
    # a later round of the run trains without the patient and continues from the erased model
    state = run_rounds(d, rounds=ROUNDS + 2)
    assert state.rounds_done == ROUNDS + 2 and "erasure" not in state.rounds[-1]
    # the certificate
    j, h = write_certificate(d / LEDGER, res.request_id, tmp_path / "cert")
    cert = json.loads(j.read_text())
    assert cert["chain_intact"] and cert["certificate"]["status"] == "COMPLETED"
    assert cert["certificate"]["subjects"] == [subject] and cert["certificate"]["reason"] == "GDPR art. 17"
    page = h.read_text()
    assert res.request_id in page and "COMPLETED" in page and "http" not in page and "<script" not in page
    first = page.split("<h2>Request</h2>")[0]  # the copies come first, the one still holding the patient named
    assert "from federated run fed" in first and "export/model.onnx" in first and "global_r0001.pt" in first
    assert [e["event"] for e in cert["certificate"]["events"]] == events(d, res.request_id)
    assert ErasureLedger(d / LEDGER).verify() == (True, [])


def test_the_run_is_read_once_and_the_cli_shows_the_verification_as_it_goes(run, capsys, monkeypatch):
    """One erasure reads the run's config and state once (privseg.erasure.federated.erase passes them
    down); `privseg erase` prints the verification's passes within its stage, -q only why it stopped."""
    cohort, d = run
    reads = []

    def counted(cls, name):
        load = getattr(cls, name).__func__

        def wrapper(klass, path, *a, **k):
            caller = sys._getframe(1).f_globals["__name__"]
            if caller.startswith("privseg.erasure") and Path(path).resolve() == d.resolve():
                reads.append((cls.__name__, caller))
            return load(klass, path, *a, **k)
        monkeypatch.setattr(cls, name, classmethod(wrapper))

    counted(FLConfig, "load")
    counted(RunState, "load")
    subject = train_ids(cohort, "H2")[0]
    argv = ["erase", "--run", str(d), "--site", "H2", "--subject", subject, "--epochs", "1", "--max-mia-auc", "-1"]
    capsys.readouterr()
    assert cli_main(argv) == 1
    assert reads == [("FLConfig", "privseg.erasure.federated"), ("RunState", "privseg.erasure.federated")], reads
    err = capsys.readouterr().err
    for line in ("local_unlearned:", "repaired:", "verified:", "loading the erased patients: ",
                 "model before the erasure: membership test: scoring the model", "model after the erasure: Dice on "
                 "the test patients", "verification failed"):
        assert line in err, (line, err)
    # again with another repair round: verified anew, under -q only the stop reason is printed
    assert cli_main([*argv, "--repair-rounds", "2", "-q"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("verification failed") and "scoring" not in err and "repaired" not in err
    assert events(d).count("verified") == 2


def test_failed_verification_keeps_the_request_open_and_a_retry_completes_it(run, capsys):
    cohort, d = run
    strict = patient_request(cohort, thresholds={"max_mia_auc": -1.0})
    res = erase(d, strict)
    assert res.status == "verification-failed" and not res.passed
    assert (d / "checkpoints" / "global_r0001.pt").is_file()  # nothing deleted before the evidence passes
    assert "mia_auc" in res.verification["failed_checks"][0]
    # the CLI on the same request: verified again, still failing; exit 1 and advice that fits the failed check
    capsys.readouterr()
    assert cli_main(["erase", "--run", str(d), "--site", "H2", "--subject", strict.subjects[0], "--epochs", "2",
                     "--max-mia-auc", "-1", "-q"]) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "verification failed" in err and "fewer --repair-rounds" in err and "more --repair-rounds" not in err
    # the same request, with more repair rounds and the default thresholds relaxed: resumes, completes once
    retry = erase(d, patient_request(cohort, repair_rounds=2))
    assert retry.request_id == res.request_id and retry.status == "completed"
    ev = events(d, res.request_id)
    assert ev.count("requested") == 1 and ev.count("local_unlearned") == 1 and ev.count("completed") == 1
    assert ev.count("repaired") == 2 and RunState.load(d).rounds_done == ROUNDS + 2


def test_a_site_left_out_of_a_repair_round_is_in_the_record_and_the_certificate(run, tmp_path, monkeypatch):
    import privseg.federated.client_app as client_app

    cohort, d = run
    default = client_app.site_step_fn

    def failing_at_h3(tc, cfg, spec, state_dir):
        if spec.id == "H3":
            raise RuntimeError("disk full at H3")
        return default(tc, cfg, spec, state_dir)

    monkeypatch.setattr(client_app, "site_step_fn", failing_at_h3)
    res = erase(d, patient_request(cohort))
    repaired = next(e["body"] for e in res.entries if e["event"] == "repaired")
    # named by its site ID even in the first round of the server run that repairs (privseg.errors.SiteFailure)
    (failed,) = repaired["failed_sites"]
    assert (failed["round"], failed["site"]) == (ROUNDS + 1, "H3") and "disk full at H3" in failed["reason"]
    _, h = write_certificate(d / LEDGER, res.request_id, tmp_path / "cert")
    page = h.read_text()
    assert "Site left out of a repair round" in page and f"H3 in round {ROUNDS + 1}: " in page


def test_a_failed_site_is_named_through_each_flower_transport():
    """Deployment reports the ClientApp's exception itself; Ray's simulation wraps it in a
    ClientAppException and keeps only its message: the site is read from either reason."""
    from flwr.clientapp.client_app import ClientAppException

    from privseg.errors import SiteFailure

    exc = SiteFailure("H3", RuntimeError("disk full"))
    for wrapped in (exc, ClientAppException(str(exc))):
        assert SiteFailure.site_in(str(type(wrapped)) + ":<'" + str(wrapped) + "'>") == "H3"
    assert SiteFailure.site_in("<class 'RuntimeError'>:<'scanner archive offline'>") is None


def test_retry_advice_follows_the_failed_checks():
    """Repair rounds restore Dice and bring the patient back (the erasure benchmark measured it), so
    a failed membership check never gets "more repair rounds" as advice."""
    from privseg.erasure.verification import retry_advice

    def verification(*failed: str) -> dict:
        return {"checks": {"test_dice_ratio": {"ok": True}, "membership_calibrated_info": {"ok": None},
                           **{name: {"ok": False} for name in failed}}}

    dice = retry_advice(verification("retain_dice_ratio"))
    assert dice.startswith("more --repair-rounds")
    for failed in (verification("membership_calibrated"), verification("mia_auc")):
        assert "more --repair-rounds" not in retry_advice(failed) and "fewer --repair-rounds" in retry_advice(failed)
    both = retry_advice(verification("retain_dice_ratio", "membership_calibrated"))
    assert both.startswith("another --method") and "bring the patient back" in both


def test_bad_requests_are_clear_errors_and_record_nothing(run, capsys):
    cohort, d = run
    h2 = train_ids(cohort, "H2")
    test_subject = cohort.select("test", "H2")[0].id
    cases = [
        (["--run", str(d.parent / "nope"), "--site", "H2", "--subject", h2[0]], "not a federated run"),
        (["--run", str(d), "--site", "H9", "--subject", h2[0]], "unknown site"),
        (["--run", str(d), "--site", "H2", "--subject", "S999"], "is unknown"),
        (["--run", str(d), "--site", "H2", "--subject", test_subject], "not a training subject"),
        (["--run", str(d), "--site", "H2", "--subject", "../etc"], "--subject"),
        (["--run", str(d), "--site", "H2"], "--subject"),
        (["--run", str(d), "--site", "H2", "--subject", h2[0], "--whole-site"], "not both"),
        (["--run", str(d), "--site", "H2", "--whole-site", "--method", "scrub"], "a site erasure uses one of"),
        (["--run", str(d), "--site", "H2", "--subject", ",".join(h2)], "every training subject"),
        (["--run", str(d), "--site", "H2", "--subject", h2[0], "--method", "nope"], "unknown"),
    ]
    for argv, needle in cases:
        assert cli_main(["erase", *argv, "-q"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert not (d / LEDGER).exists() or events(d) == []
    # a subject already erased, named in a different request
    erase(d, patient_request(cohort, subjects=(h2[0],)))
    assert cli_main(["erase", "--run", str(d), "--site", "H2", "--subject", f"{h2[0]},{h2[1]}", "-q"]) == 2
    assert "already erased" in capsys.readouterr().err
    # a request while a training run holds the model
    with hold_run(d, "a federated training run (test)"):
        code = subprocess.run([sys.executable, "-m", "privseg", "erase", "--run", str(d), "--site", "H1",
                               "--subject", train_ids(cohort, "H1")[0], "-q"], capture_output=True, text=True)
    assert code.returncode == 2 and "busy" in code.stderr and "Traceback" not in code.stderr
    assert cli_main(["erase", "certificate", "ER-000000000000", "--run", str(d)]) == 2


# -- site ----------------------------------------------------------------------------------

def test_site_erasure_with_federaser_and_retrain(run, trained, tmp_path):
    cohort, d = run
    res = erase(d, ErasureRequest(kind="site", site="H3", reason="consent withdrawn", thresholds=LOOSE))
    assert res.status == "completed"
    assert events(d, res.request_id) == ["requested", "site_removed", "verified", "completed"]
    removed = ErasureLedger(d / LEDGER).events(res.request_id)["site_removed"]["body"]
    assert removed["method"] == "federaser" and removed["calibrated"] >= 2  # two remaining sites per round
    cfg, state = FLConfig.load(d), RunState.load(d)
    assert cfg.site_ids == ["H1", "H2"] and cfg.extra["withdrawn_sites"] == ["H3"]
    assert state.rounds_done == ROUNDS + 1 and state.rounds[-1]["erasure"] == res.request_id
    assert not (d / "sites" / "H3").exists() and not list((d / "updates").rglob("*.pt"))
    assert res.verification["members"] == {"H3": train_ids(cohort, "H3")}
    assert cli_main(["erase", "--run", str(d), "--site", "H3", "--whole-site", "-q"]) == 0  # the same request
    assert events(d).count("completed") == 1 and RunState.load(d).rounds_done == ROUNDS + 1
    run_rounds(d, rounds=ROUNDS + 2)  # the federation goes on with two sites
    assert RunState.load(d).rounds[-1]["participants"] == ["H1", "H2"]
    # without stored updates FedEraser cannot work: a clear error, then --method retrain does it
    d2 = tmp_path / "noupd"
    shutil.copytree(trained[1], d2)
    shutil.rmtree(d2 / "updates")
    assert cli_main(["erase", "--run", str(d2), "--site", "H1", "--whole-site", "-q"]) == 2
    res2 = erase(d2, ErasureRequest(kind="site", site="H1", method="retrain", thresholds=LOOSE))
    assert res2.status == "completed"
    ev = events(d2, res2.request_id)
    assert ev == ["requested", "failed", "site_removed", "verified", "completed"]


# -- crashes -------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    from privseg.audit.ledger import ErasureLedger
    from privseg.erasure import ErasureRequest, erase
    run, subject, point = sys.argv[1], sys.argv[2], sys.argv[3]
    original = ErasureLedger.append
    def append(self, request, event, body):
        if event == point:  # the stage's work is done and written, its ledger entry is not
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, request, event, body)
    ErasureLedger.append = append
    erase(run, ErasureRequest(kind="patient", site="H2", subjects=(subject,), epochs=2,
                              thresholds={"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0,
                                          "min_test_dice_ratio": 0.0}))
""")


def test_killed_at_every_stage_the_request_finishes_exactly_once(trained, tmp_path):
    cohort, original = trained
    subject = train_ids(cohort, "H2")[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for point in ("requested", "local_unlearned", "repaired", "verified", "completed"):
        d = tmp_path / point
        shutil.copytree(original, d)
        p = subprocess.run([sys.executable, "-c", CHILD, str(d), subject, point], capture_output=True, text=True,
                           env=env, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        ledger = ErasureLedger(d / LEDGER)
        assert ledger.verify()[0]
        assert point not in [e["event"] for e in ledger.entries()]
        res = erase(d, patient_request(cohort, subjects=(subject,)))
        ev = events(d, res.request_id)
        state = RunState.load(d)
        ok = (res.status == "completed" and ev == ["requested", "local_unlearned", "repaired", "verified", "completed"]
              and state.rounds_done == ROUNDS + 1  # the repair round ran once
              and FLConfig.load(d).site("H2").exclude == (subject,) and ledger.verify() == (True, []))
        rlog.record("fault", f"kill-9:erasure-before-{point}", ok, f"{res.status} {ev} {state.rounds_done}")
        assert ok, (point, res.status, ev, state.rounds_done)


# -- ledger --------------------------------------------------------------------------------

def test_ledger_is_append_only_and_tampering_is_detected(tmp_path, capsys):
    path = tmp_path / "run" / "erasure" / "ledger.db"
    (tmp_path / "run" / "fl_config.json").parent.mkdir(parents=True)
    led = ErasureLedger(path)
    led.append("ER-a", "requested", {"kind": "patient", "site": "H1", "subjects": ["S1"], "nan": float("nan")})
    led.append("ER-a", "completed", {"model": {"path": "m.pt", "sha256": "0" * 64}})
    assert led.verify() == (True, []) and led.entries()[0]["prev_hash"] == GENESIS
    con = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE entries SET body = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM entries WHERE seq = 2")
    assert cli_main(["ledger", "verify", str(tmp_path / "run")]) == 0
    # someone with the file drops the guard and rewrites history: the chain says so
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("UPDATE entries SET body = ? WHERE seq = 1", (json.dumps({"kind": "patient", "subjects": ["S2"]}),))
    con.commit()
    con.close()
    ok, problems = led.verify()
    assert not ok and "row 1" in problems[0]
    capsys.readouterr()
    assert cli_main(["ledger", "verify", str(path)]) == 1
    assert "BROKEN" in capsys.readouterr().out
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 10)
    assert cli_main(["ledger", "verify", str(bad)]) == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["ER-a", "ER-b", "ER-c"]),
                              st.sampled_from(["requested", "local_unlearned", "verified", "completed"]),
                              st.booleans()), min_size=1, max_size=12))
def test_chain_verifies_after_any_interleaving_of_requests_and_crashes(tmp_path_factory, ops):
    """Appends from several requests, some of them crashing inside the transaction: the chain
    always verifies and holds exactly the appends that returned."""
    led = ErasureLedger(tmp_path_factory.mktemp("chain") / "ledger.db")
    done = []
    for rid, event, crash in ops:
        if crash:
            con_cls = sqlite3.Connection

            class Crashing(con_cls):
                def execute(self, sql, *a):
                    if sql.startswith("INSERT"):
                        raise OSError("simulated crash mid-append")
                    return super().execute(sql, *a)

            orig = led._connect
            led._connect = lambda: sqlite3.connect(led.path, timeout=30, isolation_level=None, factory=Crashing)
            with pytest.raises(OSError):
                led.append(rid, event, {"x": len(done)})
            led._connect = orig
        else:
            led.append(rid, event, {"x": len(done)})
            done.append((rid, event))
    held = led.verify() == (True, []) and [(e["request"], e["event"]) for e in led.entries()] == done
    rlog.record("invariant", "erasure-ledger:chain-after-interleaved-crashes", held)
    assert held


def test_erasure_request_ids_are_stable_and_settings_do_not_change_them():
    a = ErasureRequest(kind="patient", site="H1", subjects=("S2", "S1"), reason="x", epochs=3)
    b = ErasureRequest(kind="patient", site="H1", subjects=("S1", "S2"), reason="y", repair_rounds=4)
    assert a.request_id("run") == b.request_id("run") != a.request_id("other")
    with pytest.raises(ConfigError, match="threshold"):
        ErasureRequest(kind="patient", site="H1", subjects=("S1",), thresholds={"max_auc": 1})


def test_verification_against_a_federated_retrain_is_calibrated_by_it(run, tmp_path):
    from privseg.federated.retrain import federated_retrain

    cohort, d = run
    req = patient_request(cohort)
    ref, seconds = federated_retrain(d, tmp_path / "retrain", exclude={"H2": list(req.subjects)})
    assert seconds > 0 and FLConfig.load(tmp_path / "retrain").site("H2").exclude == req.subjects
    res = erase(d, req, reference=ref)
    ver = res.verification
    assert {"before", "after", "retrain"} <= set(ver) and "mia_auc_calibrated" in ver["after"]
    assert "mia_auc_calibrated" in ver["checks"] and ver["checks"]["retain_dice_ratio"]["vs"] == "retrain"
    assert 0.0 <= ver["distance_to_retrain"] and ver["retrain"]["checkpoint"] == str(ref)
