"""The console works per patient: a patient's scans are listed together, a request for a patient
(by its ID or one of its scans) names every scan of it with the ID the erasure itself uses, and
a site still sees and files only for its own patients. The approver is a field of its own in the
ledger and on the certificate; old ledgers, which have none, still read."""

from __future__ import annotations

import dataclasses
import json

import pytest
from starlette.testclient import TestClient

from conftest import make_tiny_cohort
from console_kit import add_users, craft_run, login, token_of
from privseg.audit.certificate import render_html, summarise
from privseg.audit.ledger import ErasureLedger
from privseg.console import create_app
from privseg.console.store import Store
from privseg.data.cohort import Cohort
from privseg.erasure import ErasureRequest, whole_patients
from privseg.federated import FLConfig


@pytest.fixture
def multi(tmp_path):
    """A run whose patients have two scans each: per site and split, scans paired as P<site><split><k>."""
    cohort = make_tiny_cohort(tmp_path / "cohort", sites=3, per_site=6, size=8)
    subjects, count = [], {}
    for s in cohort.subjects:
        k = count[(s.site, s.split)] = count.get((s.site, s.split), -1) + 1
        subjects.append(dataclasses.replace(s, patient_id=f"P{s.site}{s.split[:2]}{k // 2}"))
    Cohort(subjects=subjects, classes=cohort.classes, channels=cohort.channels, name=cohort.name,
           root=cohort.root).save()
    root = tmp_path / "runs"
    root.mkdir()
    craft_run(root, "fed", cohort.root, dp=True)
    add_users(root)
    return root, {s.id: s for s in subjects}


def _client(root, user):
    c = TestClient(create_app(root, jobs=False))
    assert login(c, user).status_code == 303
    return c


def _file(c, subject, site="H2"):
    tok = token_of(c.get("/runs/fed/patients").text)
    return c.post("/runs/fed/requests", data={"csrf": tok, "kind": "patient", "site": site, "subject": subject,
                                              "reason": "GDPR art. 17"}, follow_redirects=False)


def test_patient_list_groups_scans_and_a_site_files_for_a_whole_patient(multi):
    root, subjects = multi
    h2_train = [s for s in subjects.values() if s.site == "H2" and s.split == "train"]
    patient = h2_train[0].patient_id
    scans = sorted(s.id for s in h2_train if s.patient_id == patient)
    assert len(scans) == 2
    site = _client(root, "h2")
    page = site.get("/runs/fed/patients").text
    # one checkbox per patient (its ID), its scans listed beside it; no other site's patient or scan
    assert f'name="subject" value="{patient}"' in page and page.count('name="subject"') == 2
    for sid in scans:
        assert f'value="{sid}"' not in page and sid in page
    assert not any(s.id in page or s.patient_id in page for s in subjects.values() if s.site != "H2")

    r = _file(site, patient)
    assert r.status_code == 303, r.text[-400:]
    rid = r.headers["location"].rsplit("/", 1)[1]
    rec = Store(root).get("fed", rid)
    assert sorted(rec["subjects"]) == scans and rec["filed_by"] == "h2 (site H2)"
    # the console's ID is the one the erasure will record: it expands the request the same way
    cfg = FLConfig.load(root / "fed")
    assert rid == whole_patients(cfg, ErasureRequest(kind="patient", site="H2", subjects=(patient,))).request_id(
        cfg.name)
    # the patient is now pending as a whole: no checkbox; naming either of its scans is the same request
    page = site.get("/runs/fed/patients").text
    assert f'value="{patient}"' not in page and f"request {rid} open" in page
    r = _file(site, scans[1])
    assert r.status_code == 409 and "already filed" in r.text


def test_a_scan_names_its_patient_and_other_sites_patients_are_refused(multi):
    root, subjects = multi
    store = Store(root)
    h2_train = [s for s in subjects.values() if s.site == "H2" and s.split == "train"]
    h1_train = [s for s in subjects.values() if s.site == "H1" and s.split == "train"]
    h2_test = next(s for s in subjects.values() if s.site == "H2" and s.split == "test")
    site = _client(root, "h2")
    for name, status, text in ((h1_train[0].patient_id, 400, "not a training patient of site H2"),
                               (h1_train[0].id, 400, "not a training patient of site H2"),
                               (h2_test.patient_id, 400, "not a training patient of site H2"),
                               ("P-nobody", 400, "not a training patient of site H2")):
        r = _file(site, name)
        assert r.status_code == status and text in r.text, (name, r.status_code, r.text[-300:])
    r = _file(site, h1_train[0].patient_id, site="H1")  # another site's request: forbidden outright
    assert r.status_code == 403 and h1_train[0].patient_id not in r.text
    assert store.list() == []
    # one scan of a patient: the request names both scans of that patient
    scan = h2_train[0]
    r = _file(site, scan.id)
    assert r.status_code == 303
    rec = store.list()[0]
    assert sorted(rec["subjects"]) == sorted(s.id for s in h2_train if s.patient_id == scan.patient_id)
    # the other patient is the last one left: naming it too would erase the site's every patient
    other = next(s.patient_id for s in h2_train if s.patient_id != scan.patient_id)
    tok = token_of(site.get("/runs/fed/patients").text)
    r = site.post("/runs/fed/requests", data={"csrf": tok, "kind": "patient", "site": "H2", "reason": "x",
                                              "subject": [scan.patient_id, other]})
    assert r.status_code == 400 and "every remaining training patient" in r.text and len(store.list()) == 1


def test_erased_scans_mark_their_patient_erased(multi):
    root, subjects = multi
    h2_train = [s for s in subjects.values() if s.site == "H2" and s.split == "train"]
    patient = h2_train[0].patient_id
    scans = [s.id for s in h2_train if s.patient_id == patient]
    led = ErasureLedger(root / "fed" / "erasure" / "ledger.db")
    for ev in ("requested", "completed"):
        led.append("ER-done00000000", ev, {"run": "fed", "kind": "patient", "site": "H2", "subjects": scans,
                                           "model": {"path": "x", "sha256": "0"}, "removed": []})
    site = _client(root, "h2")
    page = site.get("/runs/fed/patients").text
    assert "erased (ER-done00000000)" in page and f'value="{patient}"' not in page
    r = _file(site, scans[1])
    assert r.status_code == 400 and "already erased" in r.text and Store(root).list() == []


def test_the_approver_is_its_own_field_in_ledger_and_certificate_and_old_ledgers_read(multi):
    root, _ = multi
    req = ErasureRequest(kind="patient", site="H2", subjects=("S101",), requested_by="h2 (site H2)",
                         approved_by="dpo (officer)")
    # the approver is recorded, and it does not change which request this is
    assert req.to_dict()["approved_by"] == "dpo (officer)"
    assert req.request_id("fed") == ErasureRequest(kind="patient", site="H2", subjects=("S101",)).request_id("fed")
    led = ErasureLedger(root / "fed" / "erasure" / "ledger.db")
    new = led.append("ER-new000000000", "requested", {"run": "fed", **req.to_dict()})
    old = led.append("ER-old000000000", "requested", {"run": "fed", "kind": "patient", "site": "H2",
                                                      "subjects": ["S102"], "requested_by": "someone; approved by x"})
    s_new, s_old = summarise([new]), summarise([old])
    assert s_new["approved_by"] == "dpo (officer)" and s_new["requested_by"] == "h2 (site H2)"
    assert s_old["approved_by"] is None and s_old["requested_by"] == "someone; approved by x"
    assert "<th>Approved by</th><td>dpo (officer)</td>" in render_html(s_new, True, [], "ledger.db")
    assert "<th>Approved by</th><td>not recorded in the ledger</td>" in render_html(s_old, True, [], "ledger.db")
    dpo = _client(root, "dpo")
    cert = dpo.get("/runs/fed/requests/ER-new000000000/certificate.json").json()
    assert cert["certificate"]["approved_by"] == "dpo (officer)"
    assert json.loads(dpo.get("/runs/fed/requests/ER-old000000000/certificate.json").text)[
        "certificate"]["approved_by"] is None
