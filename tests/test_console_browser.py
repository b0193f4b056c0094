"""The console in a real browser: Playwright for Python driving Debian's Chromium (no browser
download). A site user files a request, the officer approves it, the erasure runs for real and
completes live, the certificate downloads and says what happened, the ledger verifies; a site
user cannot open another site's run or request. A screenshot of each page is saved under the
test's tmp folder (or ``$PRIVSEG_SCREENSHOTS``).

Locally the test skips, saying why, when Chromium or Playwright is missing; with ``CI=true`` it
fails instead (CI installs Chromium with apt).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from privseg.console import create_app
from privseg.console.store import Store
from test_console_kit import LOOSE, PASSWORDS, train_ids, trained_root

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (pip install -r requirements.txt)"
    else:
        missing = None if CHROMIUM else "no Chromium found (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run under CI=true: {missing}")
        pytest.skip(f"browser test skipped: {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path_factory, tmp_path):
    _need_browser()
    import uvicorn

    root, cohort = trained_root(tmp_path_factory, tmp_path)
    app = create_app(root)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    end = time.time() + 30
    while not srv.started and time.time() < end:
        time.sleep(0.05)
    assert srv.started, "the console did not start"
    yield f"http://127.0.0.1:{port}", root, cohort
    srv.should_exit = True
    t.join(timeout=15)
    app.state.console.runner.stop(kill_workers=True)


def test_file_approve_erase_certificate_and_site_isolation_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, root, cohort = server
    shots = Path(os.environ.get("PRIVSEG_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    patient = train_ids(cohort, "H2")[0]
    h1_patient = train_ids(cohort, "H1")[0]
    from privseg.console.erasure import request_id

    h1_rid = request_id(root / "fed", "patient", "H1", [h1_patient])
    Store(root).file("fed", h1_rid, "patient", "H1", [h1_patient], "H1's own request", "h1 (site H1)")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            ctx = browser.new_context(accept_downloads=True)
            page = ctx.new_page()

            def shot(name):
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

            def log_in(user):
                page.goto(f"{base}/login")
                page.fill("input[name=username]", user)
                page.fill("input[name=password]", PASSWORDS[user])
                page.click("button[type=submit]")
                expect(page.locator("header .who")).to_contain_text(user)

            def log_out():
                page.click("header button")
                expect(page.locator("input[name=username]")).to_be_visible()

            # -- a site user: its own run and patients; nothing of another site
            log_in("h2")
            shot("01-runs-site-user")
            assert page.locator("#runs a").all_inner_texts() == ["fed"]
            for url, secret in (("/runs/other", "H1"), ("/runs/other/patients", "H1"),
                                (f"/runs/fed/requests/{h1_rid}", h1_patient),
                                (f"/runs/fed/requests/{h1_rid}/status", h1_patient)):
                resp = page.goto(base + url)
                assert resp.status == 403, url
                body = page.content()
                assert secret not in body and h1_rid not in body and "H1's own request" not in body
            shot("02-forbidden-other-site")
            page.goto(f"{base}/runs/fed")
            shot("03-run-detail-site-user")
            assert page.locator("svg.chart").count() == 1
            page.goto(f"{base}/runs/fed/patients")
            assert h1_patient not in page.content()
            page.check(f"input[name=subject][value={patient}]")
            page.fill("#file-form input[name=reason]", "GDPR art. 17 <b>request</b>")
            shot("04-patients-file-request")
            page.click("#file-button")
            expect(page.locator("#job-state")).to_have_text("filed")
            expect(page.locator("#reason")).to_have_text("GDPR art. 17 <b>request</b>")  # shown as text
            rid = page.url.rsplit("/", 1)[1]
            shot("05-request-filed")
            log_out()

            # -- the officer approves; the erasure runs and its stages update live
            log_in("dpo")
            page.goto(f"{base}/requests")
            shot("06-officer-inbox")
            page.click(f"text={rid}")
            page.fill("input[name=epochs]", "2")
            page.fill("input[name=repair_rounds]", "0")
            for k, v in LOOSE.items():
                page.fill(f"input[name={k}]", v)
            shot("07-approve-form")
            page.click("#approve-button")
            expect(page.locator("#job-state")).not_to_have_text("filed")
            shot("08-job-running")
            expect(page.locator("#job-state")).to_have_text("completed", timeout=240_000)
            expect(page.locator("#stages li.done")).to_have_count(4)  # 0 repair rounds: "repaired" gets no tick
            expect(page.locator("#stages li.skipped[data-stage=repaired]")).to_have_count(1)
            expect(page.locator("#checks")).to_contain_text("PASS")
            shot("09-job-completed")

            with page.expect_download() as dl:
                page.click("#cert-json")
            cert = json.loads(Path(dl.value.path()).read_text())
            with page.expect_download() as dl:
                page.click("#cert-html")
            cert_html = Path(dl.value.path()).read_text()
            c = cert["certificate"]
            assert cert["chain_intact"] and c["status"] == "COMPLETED" and c["request"] == rid
            assert c["subjects"] == [patient] and c["site"] == "H2" and c["reason"] == "GDPR art. 17 <b>request</b>"
            assert c["requested_by"] == "h2 (site H2)" and c["approved_by"] == "dpo (officer)"
            assert "<th>Approved by</th><td>dpo (officer)</td>" in cert_html
            assert [e["event"] for e in c["events"]] == ["requested", "local_unlearned", "repaired", "verified",
                                                         "completed"]
            assert rid in cert_html and "COMPLETED" in cert_html and "<script" not in cert_html
            assert "&lt;b&gt;request&lt;/b&gt;" in cert_html

            page.goto(f"{base}/runs/fed/ledger")
            expect(page.locator("#ledger-result")).to_contain_text("INTACT")
            shot("10-ledger-verified")
            page.goto(f"{base}/runs/fed/budget")
            shot("11-budget")
            page.goto(f"{base}/runs/fed/patients?site=H2")
            expect(page.locator("#patients")).to_contain_text(f"erased ({rid})")
            shot("12-patients-after")
            log_out()
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 12
    print(f"screenshots: {shots}")
