"""The privacy officer's console: roles on every endpoint, sessions, CSRF, throttling, bad input,
path tricks, escaping, fuzzed request endpoints (all on crafted run folders: no training)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from console_kit import PASSWORDS, crafted_fixtures, crafted_root, login, run_lock_held, token_of, train_ids
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.console import create_app
from privseg.console.accounts import MAX_FAILURES_USER, Accounts
from privseg.console.store import Store


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    return crafted_root(tmp_path_factory.mktemp("console"))


template, fresh = crafted_fixtures("console-template")


def client_for(root, user=None, **kw):
    c = TestClient(create_app(root, jobs=False, **kw))
    if user:
        assert login(c, user).status_code == 303
    return c


def csrf(c, url="/runs"):
    return token_of(c.get(url).text)


def ledger_rows(root, run="fed"):
    return len(ErasureLedger(root / run / "erasure" / "ledger.db").entries())


# -- the role matrix ------------------------------------------------------------------------

ROLES = ("dpo", "h2", "viewer")
# endpoint -> expected status per role (officer, site H2, viewer)
GETS = {
    "/runs": (200, 200, 200),
    "/requests": (200, 200, 200),
    "/runs/fed": (200, 200, 200),
    "/runs/other": (200, 403, 200),
    "/runs/fed/report": (200, 403, 200),
    "/runs/other/report": (404, 403, 404),
    "/runs/fed/budget": (200, 200, 200),
    "/runs/other/budget": (200, 403, 200),
    "/runs/fed/patients": (200, 200, 403),
    "/runs/fed/patients?site=H1": (200, 200, 403),  # the site user gets its own site, whatever it asks
    "/runs/other/patients": (200, 403, 403),
    "/runs/fed/requests": (200, 200, 200),
    "/runs/other/requests": (200, 403, 200),
    "/runs/fed/requests/{h2}": (200, 200, 200),
    "/runs/fed/requests/{h2}/status": (200, 200, 200),
    "/runs/fed/requests/{h1}": (200, 403, 200),
    "/runs/fed/requests/{h1}/status": (200, 403, 200),
    "/runs/fed/requests/ER-cli0000000h1": (200, 403, 200),
    "/runs/fed/requests/ER-cli0000000h1/certificate.json": (200, 403, 200),
    "/runs/fed/requests/ER-cli0000000h1/certificate.html": (200, 403, 200),
    "/runs/fed/requests/{h2}/certificate.json": (409, 409, 409),  # not started: no ledger entry yet
    "/runs/fed/requests/ER-000000000000": (404, 403, 404),
    "/runs/fed/ledger": (200, 200, 200),
    "/runs/other/ledger": (200, 403, 200),
    "/runs/nosuchrun": (404, 403, 404),
}


def _file(c, root, cohort, site, subject, reason="GDPR art. 17", kind="patient"):
    data = {"csrf": csrf(c), "kind": kind, "site": site, "reason": reason}
    if subject:
        data["subject"] = subject
    return c.post("/runs/fed/requests", data=data, follow_redirects=False)


def test_role_matrix_every_endpoint(fresh):
    root, cohort = fresh
    h1, h2 = train_ids(cohort, "H1"), train_ids(cohort, "H2")
    store = Store(root)
    from privseg.console.erasure import request_id

    rid = {"h1": request_id(root / "fed", "patient", "H1", [h1[1]]),
           "h2": request_id(root / "fed", "patient", "H2", [h2[1]])}
    store.file("fed", rid["h1"], "patient", "H1", [h1[1]], "r1", "h1 (site H1)")
    store.file("fed", rid["h2"], "patient", "H2", [h2[1]], "r2", "h2 (site H2)")
    for i, user in enumerate(ROLES):
        c = client_for(root, user)
        for url, expected in GETS.items():
            r = c.get(url.format(**rid), follow_redirects=False)
            assert r.status_code == expected[i], (user, url, r.status_code, r.text[-300:])
            if r.status_code == 403:  # nothing of the other site leaks into the refusal
                for secret in (rid["h1"], h1[1], "H1", "other", "ER-cli0000000h1", "every site's patients"):
                    assert secret not in r.text, (user, url, secret)
            assert r.headers["x-frame-options"] == "DENY" and "content-security-policy" in r.headers
        # filing: officer and site user may (each its own patient), a viewer may not
        subject = {"dpo": h2[2], "h2": h2[0], "viewer": h2[3]}[user]
        before = len(store.list("fed"))
        r = _file(c, root, cohort, "H2", subject)
        assert r.status_code == (303, 303, 403)[i], (user, r.text[-300:])
        assert len(store.list("fed")) == before + (r.status_code == 303)
        # deciding: officer only
        for action, data in (("reject", {"note": "no basis"}), ("approve", {"repair_rounds": "0"})):
            target = rid["h1"] if action == "reject" else rid["h2"]
            state = store.get("fed", target)["state"]
            r = c.post(f"/runs/fed/requests/{target}/{action}", data={"csrf": csrf(c), **data},
                       follow_redirects=False)
            if user == "dpo":
                assert r.status_code == 303, r.text[-300:]
                assert store.get("fed", target)["state"] == ("rejected" if action == "reject" else "queued")
                assert store.get("fed", target)["decided_by"] == "dpo (officer)"
            else:
                assert r.status_code == 403 and store.get("fed", target)["state"] == state
        assert c.post("/logout", data={"csrf": csrf(c)}, follow_redirects=False).status_code == 303
        assert c.get("/runs", follow_redirects=False).status_code == 303  # logged out for real


def test_site_user_sees_only_its_site(crafted):
    root, cohort = crafted
    c = client_for(root, "h2")
    runs = c.get("/runs").text
    assert "/runs/fed" in runs and "/runs/other" not in runs
    budget = c.get("/runs/fed/budget").text
    assert "<td>H2</td>" in budget and "<td>H1</td>" not in budget and "<td>H3</td>" not in budget
    pats = c.get("/runs/fed/patients").text
    assert all(p in pats for p in train_ids(cohort, "H2"))
    assert not any(p in pats for p in train_ids(cohort, "H1") + train_ids(cohort, "H3"))
    detail = c.get("/runs/fed").text
    assert "H2:" in detail and "H1:" not in detail and "H3:" not in detail
    ledger = c.get("/runs/fed/ledger").text
    assert "INTACT" in ledger and "ER-cli0000000h1" not in ledger
    inbox = c.get("/requests").text
    assert "ER-cli0000000h1" not in inbox
    officer = client_for(root, "dpo")
    assert "ER-cli0000000h1" in officer.get("/runs/fed/ledger").text
    assert "ER-cli0000000h1" in officer.get("/requests").text


def test_run_page_shows_the_model_each_site_serves(fresh):
    root, _ = fresh
    assert 'id="served"' not in client_for(root, "dpo").get("/runs/fed").text  # not personalised yet
    (root / "fed" / "personalisation.json").write_text(json.dumps({
        "global_round": 2, "methods": ["finetune", "local"], "sites": {
            "H1": {"val_dice": {"global": 0.5, "finetune": 0.6, "local": 0.7}, "serves": "local",
                   "test_dice": {"global": 0.51, "finetune": 0.62, "local": 0.73}},
            "H2": {"val_dice": {"global": 0.8, "finetune": 0.7, "local": 0.6}, "serves": "global",
                   "test_dice": {"global": 0.81, "finetune": 0.72, "local": 0.64}}}}))
    page = client_for(root, "dpo").get("/runs/fed").text
    table = page.split('id="served"')[1].split("</table>")[0]
    assert "global Dice" in table and "personalised (finetune) Dice" in table and "local-only Dice" in table
    h1 = table.split("<td>H1</td>")[1].split("</tr>")[0]
    assert "0.510" in h1 and "0.620" in h1 and "0.730" in h1 and '"serves">local-only<' in h1
    assert '"serves">global<' in table.split("<td>H2</td>")[1].split("</tr>")[0]
    own = client_for(root, "h2").get("/runs/fed").text.split('id="served"')[1].split("</table>")[0]
    assert "<td>H2</td>" in own and "<td>H1</td>" not in own  # a site user sees its own site's row


def test_an_erasure_of_a_personalised_run_shows_its_personalised_stage():
    from privseg.console.erasure_pages import stages

    done = [{"event": e, "body": {"rounds": [4]}} for e in ("requested", "local_unlearned", "repaired", "verified")]
    assert [s for s, _ in stages("patient", done)] == ["requested", "local_unlearned", "repaired", "verified",
                                                      "completed"]  # a run without personalised models
    begun = [*done, {"event": "started", "body": {"stage": "personalised"}}]
    assert stages("patient", begun)[-2:] == [("personalised", "todo"), ("completed", "todo")]
    assert stages("site", [*begun, {"event": "personalised", "body": {}}])[-2:] == [("personalised", "done"),
                                                                                   ("completed", "todo")]


def test_budget_page_shows_spend_refusals_and_warnings(crafted):
    root, _ = crafted
    page = client_for(root, "dpo").get("/runs/fed/budget").text
    assert page.count("<svg") == 3 and "budget 1" in page
    assert "budget exhausted" in page or "of the budget spent" in page  # H3's budget is 1: far overspent
    assert "1e-03" in page or "0.001" in page
    assert "without differential privacy" in client_for(root, "dpo").get("/runs/other/budget").text


# -- sessions, CSRF, throttling ---------------------------------------------------------------

def test_cookies_are_signed_httponly_samesite_and_forgeries_fail(crafted):
    root, _ = crafted
    c = TestClient(create_app(root, jobs=False))
    r = login(c, "dpo")
    cookie = r.headers["set-cookie"]
    assert "privseg_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie
    value = c.cookies.get("privseg_session")
    forged = TestClient(create_app(root, jobs=False))
    forged.cookies.set("privseg_session", value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))
    assert forged.get("/runs", follow_redirects=False).status_code == 303
    secure = TestClient(create_app(root, jobs=False, secure=True), base_url="https://testserver")
    assert "Secure" in login(secure, "dpo").headers["set-cookie"]


def test_csrf_missing_forged_or_foreign_writes_nothing(fresh):
    root, cohort = fresh
    h2 = train_ids(cohort, "H2")
    store = Store(root)
    c, other = client_for(root, "h2"), client_for(root, "dpo")
    base = {"kind": "patient", "site": "H2", "subject": h2[0], "reason": "r"}
    for token in (None, "", "forged-token", csrf(other)):
        data = dict(base, **({} if token is None else {"csrf": token}))
        r = c.post("/runs/fed/requests", data=data, follow_redirects=False)
        assert r.status_code == 403 and "security token" in r.text
    assert store.list("fed") == []
    # the login form has its own token (a cross-site login is refused)
    fresh_client = TestClient(create_app(root, jobs=False))
    r = fresh_client.post("/login", data={"csrf": "x", "username": "dpo", "password": PASSWORDS["dpo"]},
                          follow_redirects=False)
    assert r.status_code == 403 and "privseg_session" not in r.headers.get("set-cookie", "")
    # a JSON or multipart body is not a form of ours
    r = c.post("/runs/fed/requests", content=json.dumps(base), headers={"content-type": "application/json"})
    assert r.status_code == 415 and store.list("fed") == []


def test_expired_session_redirects_and_writes_nothing(fresh):
    root, cohort = fresh
    c = TestClient(create_app(root, jobs=False, idle_minutes=0.5 / 60))  # half a second idle
    assert login(c, "h2").status_code == 303
    token = csrf(c)
    time.sleep(0.8)
    r = c.get("/runs/fed", follow_redirects=False)
    assert r.status_code == 303 and "expired=1" in r.headers["location"]
    r = c.post("/runs/fed/requests", data={"csrf": token, "kind": "patient", "site": "H2",
                                           "subject": train_ids(cohort, "H2")[0], "reason": "r"})
    assert r.status_code == 401 and "expired" in r.text and Store(root).list() == []
    assert "expired" in c.get("/login?expired=1").text


def test_login_throttling_and_no_user_enumeration(fresh):
    root, _ = fresh
    c = TestClient(create_app(root, jobs=False))
    wrong_user = login(c, "nobody", "whatever-password")
    wrong_pass = login(c, "dpo", "whatever-password")
    assert wrong_user.status_code == wrong_pass.status_code == 401
    assert "Wrong user name or password" in wrong_user.text and "Wrong user name or password" in wrong_pass.text
    for _ in range(MAX_FAILURES_USER - 1):
        assert login(c, "dpo", "still-wrong-password").status_code == 401
    r = login(c, "dpo")  # the right password, but too late
    assert r.status_code == 429 and "Too many failed attempts" in r.text and "privseg_session" not in c.cookies
    assert login(c, "h2").status_code == 303  # another account from the same client still works


def test_removed_user_is_logged_out_at_once(fresh):
    root, _ = fresh
    c = client_for(root, "viewer")
    assert c.get("/runs").status_code == 200
    Accounts(root).remove_user("viewer")
    assert c.get("/runs", follow_redirects=False).status_code == 303


# -- bad input ------------------------------------------------------------------------------

def test_bad_requests_are_clear_and_write_nothing(fresh):
    root, cohort = fresh
    store = Store(root)
    h1, h2 = train_ids(cohort, "H1"), train_ids(cohort, "H2")
    site, dpo = client_for(root, "h2"), client_for(root, "dpo")
    rows = ledger_rows(root)
    cases = [
        (site, "H2", "P-unknown", "patient", 400, "not a training patient of site H2"),
        (site, "H2", h1[0], "patient", 400, "not a training patient of site H2"),  # a patient of another site
        (site, "H1", h1[0], "patient", 403, "Forbidden"),  # another site's request
        (site, "H2", None, "site", 403, "Forbidden"),  # a whole site: officer only
        (dpo, "H9", None, "site", 400, "Unknown site"),
        (dpo, "H2", "../../etc/passwd", "patient", 400, "not safe"),
        (dpo, "H2", None, "patient", 400, "Choose the patient"),
        (dpo, "H2", h2[0], "nonsense", 400, "Unknown kind"),
    ]
    for c, s, subject, kind, status, text in cases:
        r = _file(c, root, cohort, s, subject, kind=kind)
        assert r.status_code == status and text in r.text, (s, subject, kind, r.status_code, r.text[-400:])
    r = site.post("/runs/fed/requests", data={"csrf": csrf(site), "kind": "patient", "site": "H2", "subject": h2[0],
                                              "reason": ""})
    assert r.status_code == 400 and "reason" in r.text
    assert store.list() == [] and ledger_rows(root) == rows
    # the same request twice: one record, then a clear 409
    assert _file(site, root, cohort, "H2", h2[0]).status_code == 303
    r = _file(site, root, cohort, "H2", h2[0])
    assert r.status_code == 409 and "already filed" in r.text and len(store.list()) == 1
    # a patient already erased (per the ledger) cannot be requested again
    led = ErasureLedger(root / "fed" / "erasure" / "ledger.db")
    for ev in ("requested", "completed"):
        led.append("ER-done00000000", ev, {"run": "fed", "kind": "patient", "site": "H2", "subjects": [h2[1]],
                                           "model": {"path": "x", "sha256": "0"}, "removed": []})
    r = _file(site, root, cohort, "H2", h2[1])
    assert r.status_code == 400 and "already erased" in r.text and len(store.list()) == 1
    assert "erased (ER-done00000000)" in site.get("/runs/fed/patients").text
    # a request of a rejected request may be filed again; an approval re-checks the patient
    rid = store.list()[0]["id"]
    assert dpo.post(f"/runs/fed/requests/{rid}/reject", data={"csrf": csrf(dpo), "note": ""}).status_code == 400
    r = dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": csrf(dpo), "epochs": "-3"})
    assert r.status_code == 400 and "epochs" in r.text and store.get("fed", rid)["state"] == "filed"
    r = dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": csrf(dpo), "method": "no_such_method"})
    assert r.status_code == 400 and store.get("fed", rid)["state"] == "filed"


def test_request_while_training_holds_the_run_is_refused(fresh):
    root, cohort = fresh
    with run_lock_held(root / "fed", "training run fed (pid {pid})"):
        c = client_for(root, "h2")
        r = _file(c, root, cohort, "H2", train_ids(cohort, "H2")[0])
        assert r.status_code == 409 and "busy" in r.text and "training run fed" in r.text
        assert Store(root).list() == []
    assert _file(c, root, cohort, "H2", train_ids(cohort, "H2")[0]).status_code == 303


def test_oversized_forms_are_refused(fresh):
    root, cohort = fresh
    c = client_for(root, "h2")
    h2 = train_ids(cohort, "H2")
    r = c.post("/runs/fed/requests", data={"csrf": csrf(c), "kind": "patient", "site": "H2", "subject": h2[0],
                                           "reason": "x" * 2001})
    assert r.status_code == 413 and "too long" in r.text
    r = c.post("/runs/fed/requests", data={"csrf": csrf(c), "kind": "patient", "site": "H2", "subject": h2[0],
                                           "reason": "r", "pad": "y" * 40_000})
    assert r.status_code == 413 and "too large" in r.text
    big = login(TestClient(create_app(root, jobs=False)), "dpo", "p" * 5000)
    assert big.status_code == 413
    assert Store(root).list() == []


@pytest.mark.parametrize("url", ["/runs/..%2F..%2Fetc", "/runs/%2e%2e", "/runs/..", "/runs/fed%00",
                                 "/runs/.console", "/runs/fed%2F..%2F..%2Fetc/patients", "/runs/out",
                                 "/runs/%2Fetc%2Fpasswd", "/static/..%2Fapp.py", "/static/../app.py",
                                 "/runs/fed/requests/..%2F..%2Fx/certificate.json"])
def test_path_tricks_reach_nothing(crafted, tmp_path, url):
    root, _ = crafted
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "fl_config.json").write_text("{}")
    (outside / "state.json").write_text("{}")
    link = root / "out"
    if not link.exists():
        link.symlink_to(outside)  # a link out of the root is not a run
    for user, ok in (("dpo", (303, 400, 403, 404)), ("h2", (303, 400, 403, 404))):
        r = client_for(root, user).get(url, follow_redirects=False)
        # "/runs/.." is "/" once the client normalises it: the landing page, nothing outside
        assert r.status_code in ok or (r.status_code == 200 and r.url.path == "/"), (user, url, r.status_code)
        assert "secret.key" not in r.text and "import" not in r.text


def test_rendered_text_is_escaped(fresh):
    root, cohort = fresh
    c = client_for(root, "h2")
    evil = "<script>alert('x')</script>"
    r = _file(c, root, cohort, "H2", evil)
    assert r.status_code == 400 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text
    r = _file(c, root, cohort, "H2", train_ids(cohort, "H2")[0], reason=evil)
    assert r.status_code == 303
    page = c.get(r.headers["location"]).text
    assert evil not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "&lt;script&gt;" in client_for(root, "dpo").get("/requests").text


# -- property tests of the request endpoints --------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.one_of(st.sampled_from(["patient", "site"]), _text),
       site=st.one_of(st.sampled_from(["H1", "H2", "H3", ""]), _text),
       subjects=st.lists(st.one_of(st.sampled_from(["S100", "S101", "S102", "S000", "S200"]), _text), max_size=3),
       reason=st.one_of(_text, st.just("")), good_token=st.booleans())
def test_fuzzed_filing_never_errors_and_writes_only_valid_requests(crafted, kind, site, subjects, reason,
                                                                   good_token):
    root, cohort = crafted
    c = _fuzz_client(root)
    store = Store(root)
    before = {r["id"] for r in store.list("fed")}
    data = [("csrf", csrf(c) if good_token else "nope"), ("kind", kind), ("site", site), ("reason", reason)]
    data += [("subject", s) for s in subjects]
    r = c.post("/runs/fed/requests", content=urlencode(data), follow_redirects=False,
               headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code in (303, 400, 403, 409, 413), r.text[-300:]
    after = store.list("fed")
    new = [x for x in after if x["id"] not in before]
    if r.status_code == 303:
        assert good_token and kind == "patient" and site == "H2" and reason.strip()
        assert len(new) == 1 and set(new[0]["subjects"]) <= set(train_ids(cohort, "H2"))
        store.reject("fed", new[0]["id"], "test", "reset")  # may be filed again by a later example
    else:
        assert new == []
    assert ledger_rows(root) == 1  # filing never touches the ledger


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(["method", "epochs", "repair_rounds", "max_mia_auc",
                                               "min_retain_dice_ratio", "min_test_dice_ratio", "note"]),
                              st.one_of(_text, st.integers(-5, 2000).map(str),
                                        st.floats(allow_nan=True).map(str)), max_size=7))
def test_fuzzed_approval_settings_are_checked(crafted, fields):
    root, cohort = crafted
    store = Store(root)
    from privseg.console.erasure import request_id

    subject = train_ids(cohort, "H3")[0]
    rid = request_id(root / "fed", "patient", "H3", [subject])
    cur = store.get("fed", rid)
    if cur is None or cur["state"] != "filed":
        store.file("fed", rid, "patient", "H3", [subject], "fuzz", "dpo (officer)")
    c = _fuzz_client(root, "dpo")
    r = c.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": csrf(c), **fields}, follow_redirects=False)
    assert r.status_code in (303, 400, 409, 413), r.text[-300:]
    rec = store.get("fed", rid)
    if r.status_code == 409:  # valid settings the budgets cannot pay for (H3 is overspent): not approved
        assert rec["state"] == "filed" and "cannot pay for this erasure" in r.text
    if r.status_code == 303:
        assert rec["state"] == "queued"
        s = rec["settings"]
        assert 1 <= s.get("epochs", 1) <= 1000 and 0 <= s.get("repair_rounds", 0) <= 100
        assert all(0 <= v <= 1 for v in s.get("thresholds", {}).values())
        from privseg.console.db import opened  # a queued request stays queued: file it anew next time

        with opened(root) as con:
            con.execute("DELETE FROM requests WHERE id=?", (rid,))
    else:
        assert rec["state"] == "filed"


_CLIENTS: dict = {}


def _fuzz_client(root, user="h2"):
    key = (str(root), user)
    if key not in _CLIENTS:
        _CLIENTS[key] = client_for(root, user)
    return _CLIENTS[key]


# -- jobs: one per run, restart reconciles from the ledger --------------------------------------

def test_a_job_found_completed_in_the_ledger_is_reported_not_rerun(fresh):
    """A console restarted while a worker runs adopts it; when the worker is gone and the ledger
    shows the request completed, the job is reported completed and nothing runs again."""
    from privseg.console.jobs import JobRunner

    root, cohort = fresh
    store = Store(root)
    subject = train_ids(cohort, "H2")[0]
    from privseg.console.erasure import request_id

    rid = request_id(root / "fed", "patient", "H2", [subject])
    store.file("fed", rid, "patient", "H2", [subject], "r", "h2 (site H2)")
    store.approve("fed", rid, "dpo (officer)", {})
    store.start("fed", rid, pid=0)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "privseg.console.worker", rid])
    try:
        store.set_pid("fed", rid, fake.pid)
        runner = JobRunner(root)
        runner.tick()
        assert store.get("fed", rid)["state"] == "running"  # adopted: still running, nothing started
        led = ErasureLedger(root / "fed" / "erasure" / "ledger.db")
        for ev in ("requested", "local_unlearned", "repaired", "verified", "completed"):
            led.append(rid, ev, {"run": "fed", "kind": "patient", "site": "H2", "subjects": [subject],
                                 "model": {"path": "x", "sha256": "0"}, "removed": []})
    finally:
        fake.kill()
        fake.wait()
    runner.tick()
    rec = store.get("fed", rid)
    assert rec["state"] == "completed" and "ledger" in rec["message"] and rec["attempts"] == 1
    # a queued job of a run with a running job waits for it (one job per run)
    ids = {}
    for k in (1, 2):
        p = train_ids(cohort, "H2")[k]
        ids[k] = request_id(root / "fed", "patient", "H2", [p])
        store.file("fed", ids[k], "patient", "H2", [p], "r", "h2")
        store.approve("fed", ids[k], "dpo (officer)", {})
    other, third = ids[1], ids[2]
    store.start("fed", other, pid=0)
    blocker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "privseg.console.worker", other])
    try:
        store.set_pid("fed", other, blocker.pid)
        runner.tick()
        assert store.get("fed", third)["state"] == "queued"
    finally:
        blocker.kill()
        blocker.wait()


def test_cli_add_user_prompts_and_refuses_bad_accounts(tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli_main(["console", "add-user", "alice", "--role", "site", "--site", "H2", "--runs", str(tmp_path),
                     "--password-stdin"]) == 0
    assert Accounts(tmp_path).get("alice").site == "H2"
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli_main(["console", "add-user", "bob", "--role", "officer", "--runs", str(tmp_path),
                     "--password-stdin"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli_main(["console", "add-user", "carol", "--role", "site", "--runs", str(tmp_path),
                     "--password-stdin"]) == 2  # a site user needs --site
    assert cli_main(["console", "add-user", "dave", "--role", "officer", "--runs", str(tmp_path),
                     "--password", "x"]) == 2  # no password option in argv at all
    assert "needs --site" in capsys.readouterr().err
    assert [u.name for u in Accounts(tmp_path).users()] == ["alice"]
    assert "a-long-password" not in (tmp_path / ".console" / "console.db").read_bytes().decode(errors="replace")


def test_approval_left_empty_takes_the_methods_own_defaults():
    from privseg.console.erasure import _request, clean_settings

    settings = clean_settings({"method": "reference_teacher", "repair_rounds": ""})
    assert "repair_rounds" not in settings
    req = _request("patient", "H1", ["H1S01"], settings=settings)
    assert (req.method, req.target, req.repair_rounds) == ("reference_teacher", "calibrated", 0)
    assert _request("patient", "H1", ["H1S01"], settings=clean_settings({"repair_rounds": ""})).repair_rounds == 1
    assert _request("patient", "H1", ["H1S01"], settings=clean_settings({"repair_rounds": "3"})).repair_rounds == 3
