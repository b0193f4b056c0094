"""A real (tiny) erasure approved in the console, its worker killed mid-job and the console
restarted: the job resumes from the erasure ledger and every stage is applied exactly once."""

from __future__ import annotations

import os
import signal
import time

from starlette.testclient import TestClient

from console_kit import LOOSE, login, run_lock_held, token_of, train_ids, trained_root
from privseg.audit.ledger import ErasureLedger
from privseg.console import create_app
from privseg.console.store import Store
from privseg.federated import RunState


def _wait(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_restart_during_a_job_resumes_from_the_ledger_and_applies_nothing_twice(tmp_path_factory, tmp_path):
    root, cohort = trained_root(tmp_path_factory, tmp_path)
    patient = train_ids(cohort, "H2")[0]
    ledger_file = root / "fed" / "erasure" / "ledger.db"
    rounds_before = RunState.load(root / "fed").rounds_done

    site = TestClient(create_app(root, jobs=False))
    assert login(site, "h2").status_code == 303
    page = site.get("/runs/fed/patients")
    r = site.post("/runs/fed/requests", data={"csrf": token_of(page.text), "kind": "patient", "site": "H2",
                                              "subject": patient, "reason": "GDPR art. 17"}, follow_redirects=False)
    assert r.status_code == 303
    rid = r.headers["location"].rsplit("/", 1)[1]

    first = create_app(root)  # the console with its job runner
    with TestClient(first) as officer:
        assert login(officer, "dpo").status_code == 303
        page = officer.get(f"/runs/fed/requests/{rid}")
        r = officer.post(f"/runs/fed/requests/{rid}/approve", data={
            "csrf": token_of(page.text), "epochs": "2", "repair_rounds": "1", **LOOSE}, follow_redirects=False)
        assert r.status_code == 303
        # the worker gets as far as the local unlearning; then the machine "restarts"
        _wait(lambda: ledger_file.exists() and any(e["event"] == "local_unlearned"
                                                   for e in ErasureLedger(ledger_file).entries(rid)),
              240, "the local unlearning stage")
        pid = Store(root).get("fed", rid)["pid"]
        assert pid and Store(root).get("fed", rid)["state"] == "running"
        first.state.console.runner.stop()
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 30,
          "the killed worker")
    killed_at = [e["event"] for e in ErasureLedger(ledger_file).entries(rid)]
    assert "completed" not in killed_at

    second = create_app(root)  # the console again: reconciles the dead job and resumes it
    with TestClient(second) as officer:
        assert login(officer, "dpo").status_code == 303
        rec = _wait(lambda: (x := Store(root).get("fed", rid))["state"] not in ("queued", "running") and x,
                    300, "the resumed job")
        assert rec["state"] == "completed", rec
        assert rec["attempts"] == 2
        page = officer.get(f"/runs/fed/requests/{rid}").text
        assert "completed" in page and "PASS" in page and "certificate.json" in page
        cert = officer.get(f"/runs/fed/requests/{rid}/certificate.json").json()
    events = [e["event"] for e in ErasureLedger(ledger_file).entries(rid)]
    for ev in ("requested", "local_unlearned", "repaired", "completed"):
        assert events.count(ev) == 1, events  # nothing applied twice
    assert events[:len([e for e in killed_at if e != "failed"])] == [e for e in killed_at if e != "failed"]
    assert RunState.load(root / "fed").rounds_done == rounds_before + 1  # one repair round, not two
    assert cert["chain_intact"] and cert["certificate"]["status"] == "COMPLETED"
    # requester and approver, each authenticated, each in its own field of the ledger's request
    assert cert["certificate"]["requested_by"] == "h2 (site H2)"
    assert cert["certificate"]["approved_by"] == "dpo (officer)"
    requested = next(e for e in cert["entries"] if e["event"] == "requested")["body"]
    assert (requested["requested_by"], requested["approved_by"]) == ("h2 (site H2)", "dpo (officer)")
    assert ErasureLedger(ledger_file).verify() == (True, [])


def test_a_job_on_a_run_another_process_holds_waits_in_the_queue(tmp_path_factory, tmp_path):
    """The erasure takes the run's lock itself (the worker no longer does): a run held by training
    in another process sends the job back to the queue, nothing written to the run."""

    from privseg.console import erasure
    from privseg.console.worker import BUSY, run_job

    root, cohort = trained_root(tmp_path_factory, tmp_path)
    patient = train_ids(cohort, "H2")[0]
    store = Store(root)
    rid = erasure.request_id(root / "fed", "patient", "H2", [patient])
    store.file("fed", rid, "patient", "H2", [patient], "GDPR art. 17", "h2")
    store.approve("fed", rid, "dpo", {"thresholds": LOOSE})
    store.start("fed", rid, os.getpid())
    with run_lock_held(root / "fed", "a federated training run (test)"):
        assert run_job(root, "fed", rid) == BUSY
    rec = store.get("fed", rid)
    assert rec["state"] == "queued" and "busy" in rec["message"] and "training run (test)" in rec["message"]
    assert not (root / "fed" / "erasure").exists()
