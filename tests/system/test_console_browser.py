"""The console in a real browser: Playwright for Python driving Debian's Chromium (no browser
download). A site user files a request, the officer approves it, the erasure runs for real and
completes live, the certificate downloads and says what happened, the ledger verifies; a site
user cannot open another site's run or request. Each role lands on its page of what needs
attention (the counts checked); on a DP run the officer sees the erasure priced, the DP method
as the only choice, an unaffordable approval refused with its options, and the offered option
carried out. A full-page screenshot of each role's pages is saved under the test's tmp folder
(or ``$PRIVSEG_SCREENSHOTS``).

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

from console_kit import LOOSE, PASSWORDS, train_ids, trained_dp_run, trained_root
from privseg.console import create_app
from privseg.console.runs import BUDGET_WARN
from privseg.console.store import Store
from privseg.privacy.budget import BudgetLedger

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
    shutil.copytree(trained_dp_run(tmp_path_factory), root / "dpfed")
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


def _near_end(run, site: str | None = None) -> int:
    """Sites of a DP run (or ``site`` only) whose budget is near its end, as the landing page counts them."""
    rows = [r for p in sorted((run / "sites").glob("*/privacy.sqlite")) for r in BudgetLedger(p).status()
            if site in (None, r["site"])]
    return sum(1 for r in rows if r["epsilon_spent"] >= BUDGET_WARN * r["epsilon_budget"]
               or (r["epsilon_with_reserve"] or 0) > r["epsilon_budget"] * (1 + 1e-6))


def test_file_approve_erase_certificate_and_site_isolation_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, root, cohort = server
    shots = Path(os.environ.get("PRIVSEG_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    patient = train_ids(cohort, "H2")[0]
    h1_patient = train_ids(cohort, "H1")[0]
    from privseg.console.erasure import patients, request_id

    h1_rid = request_id(root / "fed", "patient", "H1", [h1_patient])
    Store(root).file("fed", h1_rid, "patient", "H1", [h1_patient], "H1's own request", "h1 (site H1)")
    dp_patient = patients(root / "dpfed", "H1")[0]["id"]
    dp_rid = request_id(root / "dpfed", "patient", "H1", [dp_patient])
    Store(root).file("dpfed", dp_rid, "patient", "H1", [dp_patient], "GDPR art. 17", "h1 (site H1)")
    near_end = _near_end(root / "dpfed")

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

            def counts():
                return [int(page.locator(f"#{k}-count").inner_text()) for k in ("pending", "active", "failed",
                                                                                    "budget")]

            # -- a site user: lands on its own page of what needs attention; its own runs and patients only
            log_in("h2")
            assert counts() == [0, 0, 0, _near_end(root / "dpfed", "H2")]  # H1's requests are not its business
            shot("01-home-site-user")
            page.goto(f"{base}/runs")
            shot("02-runs-site-user")
            assert sorted(page.locator("#runs a[href^='/runs/']:not([href$='/report'])").all_inner_texts()) == [
                "dpfed", "fed"]
            for url, secret in (("/runs/other", "H1"), ("/runs/other/patients", "H1"),
                                (f"/runs/fed/requests/{h1_rid}", h1_patient),
                                (f"/runs/fed/requests/{h1_rid}/status", h1_patient)):
                resp = page.goto(base + url)
                assert resp.status == 403, url
                body = page.content()
                assert secret not in body and h1_rid not in body and "H1's own request" not in body
            shot("03-forbidden-other-site")
            page.goto(f"{base}/runs/fed")
            shot("04-run-detail-site-user")
            assert page.locator("svg.chart").count() == 1
            expect(page.locator("#serves")).to_contain_text("global_r0003.pt")
            page.goto(f"{base}/runs/fed/patients")
            assert h1_patient not in page.content()
            page.check(f"input[name=subject][value={patient}]")
            page.fill("#file-form input[name=reason]", "GDPR art. 17 <b>request</b>")
            shot("05-patients-file-request")
            page.click("#file-button")
            expect(page.locator("#job-state")).to_have_text("filed")
            expect(page.locator("#reason")).to_have_text("GDPR art. 17 <b>request</b>")  # shown as text
            rid = page.url.rsplit("/", 1)[1]
            shot("06-request-filed")
            page.goto(f"{base}/")
            assert counts() == [1, 0, 0, _near_end(root / "dpfed", "H2")]
            log_out()

            # -- the officer lands on what needs a decision, approves; the erasure runs and updates live
            log_in("dpo")
            assert counts() == [3, 0, 0, near_end]
            shot("07-home-officer")
            page.goto(f"{base}/requests")
            shot("08-officer-inbox")
            page.click(f"text={rid}")
            assert page.locator("#method option").count() > 1 and page.locator("#price").count() == 0  # no DP
            page.fill("input[name=epochs]", "2")
            page.fill("input[name=repair_rounds]", "0")
            for k, v in LOOSE.items():
                page.fill(f"input[name={k}]", v)
            shot("09-approve-form")
            page.click("#approve-button")
            expect(page.locator("#job-state")).not_to_have_text("filed")
            shot("10-job-running")
            expect(page.locator("#job-state")).to_have_text("completed", timeout=240_000)
            expect(page.locator("#stages li.done")).to_have_count(4)  # 0 repair rounds: "repaired" gets no tick
            expect(page.locator("#stages li.skipped[data-stage=repaired]")).to_have_count(1)
            expect(page.locator("#checks")).to_contain_text("PASS")
            expect(page.locator("#decisions")).to_contain_text("approved by dpo (officer)")
            expect(page.locator("#explain-auc")).to_be_visible()
            shot("11-job-completed")

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
            shot("12-ledger-verified")
            page.goto(f"{base}/runs/fed/patients?site=H2")
            expect(page.locator("#patients")).to_contain_text(f"erased ({rid})")
            shot("13-patients-after")

            # -- a DP run: the erasure is priced; the DP method is the only choice; unaffordable: refused
            page.goto(f"{base}/runs/dpfed/requests/{dp_rid}")
            expect(page.locator("#price")).to_contain_text("over the budget")
            expect(page.locator("#price-verdict")).to_contain_text("cannot be approved")
            assert page.locator("#method option").all_inner_texts() == ["dp_finetune (default)"]
            expect(page.locator("#options")).to_contain_text("--repair-rounds 0")
            expect(page.locator("#options")).to_contain_text("privseg privacy budget")
            for k, v in LOOSE.items():
                page.fill(f"input[name={k}]", v)
            shot("14-priced-request-dp")
            page.click("#approve-button")
            expect(page.locator("#refused")).to_contain_text("cannot pay for this erasure")
            assert Store(root).get("dpfed", dp_rid)["state"] == "filed"
            shot("15-approval-refused-with-options")
            page.click("#options button.option")  # the option it offers: no repair round
            expect(page.locator("#job-state")).not_to_have_text("filed")
            expect(page.locator("#job-state")).to_have_text("completed", timeout=240_000)
            expect(page.locator("#decisions")).to_contain_text("repair_rounds=0")
            shot("16-dp-erasure-completed")
            page.goto(f"{base}/runs/dpfed/budget")
            expect(page.locator("#explain-epsilon")).to_be_visible()
            expect(page.locator("#releases-H1")).to_contain_text(f"erasure {dp_rid}")
            expect(page.locator("#history-H1")).to_contain_text("budget set by the training plan")
            shot("17-budget-dp-officer")
            log_out()

            # -- a viewer: reads everything, decides nothing
            log_in("viewer")
            assert counts() == [1, 0, 0, _near_end(root / "dpfed")]  # H1's own request on fed is still filed
            shot("18-home-viewer")
            page.goto(f"{base}/runs")
            shot("19-runs-viewer")
            page.goto(f"{base}/runs/fed/requests/{h1_rid}")
            assert page.locator("#approve-form").count() == 0
            shot("20-request-viewer")
            page.goto(f"{base}/runs/fed/budget")
            shot("21-budget-viewer")
            log_out()
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 21
    print(f"screenshots: {shots}")
