"""The console's per-process caches show exactly what a fresh read shows: the erasure ledger's
chain check (incremental, yet any change to an earlier row is found), the budgets (ε recomputed
when the privacy ledger changes), the certificate (the same as ``write_certificate``); and the
long lists are paginated."""

from __future__ import annotations

import json
import re
import sqlite3

from starlette.testclient import TestClient

from console_kit import crafted_fixtures, login
from privseg.audit.certificate import write_certificate
from privseg.audit.ledger import ErasureLedger
from privseg.console import cache, create_app
from privseg.privacy.accountant import StepEvent
from privseg.privacy.budget import BudgetLedger

template, fresh = crafted_fixtures("console-cache")


def _client(root, user):
    c = TestClient(create_app(root, jobs=False))
    assert login(c, user).status_code == 303
    return c


def _requests(led: ErasureLedger, n: int, site_of=lambda i: "H2") -> list[str]:
    rids = []
    for i in range(n):
        rid = f"ER-bulk{i:08d}"
        led.append(rid, "requested", {"run": "fed", "kind": "patient", "site": site_of(i), "subjects": [f"X{i}"]})
        rids.append(rid)
    return rids


def test_ledger_check_is_incremental_and_finds_a_changed_earlier_row(fresh):
    root, _ = fresh
    path = root / "fed" / "erasure" / "ledger.db"
    led = ErasureLedger(path)
    _requests(led, 3)
    dpo = _client(root, "dpo")
    page = dpo.get("/runs/fed/ledger").text
    assert "Hash chain INTACT: all 4 entries checked: 4 hashed now" in page
    assert "all 4 entries checked: 0 hashed now" in dpo.get("/runs/fed/ledger").text  # nothing changed
    led.append("ER-bulk00000000", "failed", {"error": "x"})
    assert "all 5 entries checked: 1 hashed now" in dpo.get("/runs/fed/ledger").text
    # an earlier row rewritten behind the ledger's back (its append-only trigger dropped): found at
    # once, with the same problems as a full check, although the last row did not change
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("UPDATE entries SET body = replace(body, 'X1', 'X9') WHERE seq = 3")
    con.close()
    ok, problems = led.verify()
    assert not ok and problems
    page = dpo.get("/runs/fed/ledger").text
    assert "Hash chain BROKEN" in page and all(p in page for p in problems)
    assert cache.ledger_view(path).problems == problems
    # the site user learns that the chain is broken, not which rows
    site = _client(root, "h2").get("/runs/fed/ledger").text
    assert "BROKEN" in site and f"{len(problems)} problem(s) found" in site and "row 3" not in site


def test_a_replaced_ledger_file_is_checked_from_the_first_row(fresh):
    root, _ = fresh
    path = root / "fed" / "erasure" / "ledger.db"
    dpo = _client(root, "dpo")
    assert "INTACT" in dpo.get("/runs/fed/ledger").text
    other = root / "other-ledger.db"
    _requests(ErasureLedger(other), 3)
    # another ledger's rows in its place (restored from elsewhere): longer, and its first row differs
    with sqlite3.connect(other) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    view = cache.ledger_view(path)
    assert view.n == 3 and view.checked_new == 3 and set(view.requests) == {f"ER-bulk{i:08d}" for i in range(3)}
    assert view.ok and view.head == ErasureLedger(path).head


def test_budget_follows_the_privacy_ledger_exactly(fresh):
    root, _ = fresh
    led = BudgetLedger(root / "fed" / "sites" / "H2" / "privacy.sqlite")
    dpo = _client(root, "dpo")

    def shown() -> tuple[str, str]:
        m = re.search(r"<tr[^>]*><td>H2</td><td>([^<]+)</td><td>[^<]+</td><td>[^<]+</td><td>[^<]+</td>\s*"
                      r"<td class=\"reserve\">[^<]*</td>\s*<td>(\d+)</td>", dpo.get("/runs/fed/budget").text)
        return m.group(1), m.group(2)

    assert shown() == (f"{led.spent('H2'):.3f}", "3")
    assert shown() == (f"{led.spent('H2'):.3f}", "3")  # from the cache: the same
    before = led.spent("H2")
    led.commit_round("H2", 4, [StepEvent(q=0.5, sigma=1.3, steps=5)])
    assert led.spent("H2") > before
    assert shown() == (f"{led.spent('H2'):.3f}", "4")
    led.set_budget("H2", 100.0, 1e-5)  # a new δ changes ε for the same events
    assert shown() == (f"{led.spent('H2'):.3f}", "4")


def test_console_certificate_is_the_one_write_certificate_writes(fresh, tmp_path):
    root, _ = fresh
    path = root / "fed" / "erasure" / "ledger.db"
    dpo = _client(root, "dpo")
    j, h = write_certificate(path, "ER-cli0000000h1", tmp_path)
    assert dpo.get("/runs/fed/requests/ER-cli0000000h1/certificate.json").json() == json.loads(j.read_text())
    assert dpo.get("/runs/fed/requests/ER-cli0000000h1/certificate.html").text == h.read_text()


def test_request_lists_and_ledger_are_paginated(fresh):
    root, _ = fresh
    led = ErasureLedger(root / "fed" / "erasure" / "ledger.db")
    rids = _requests(led, 120, site_of=lambda i: "H2" if i % 2 else "H1")
    dpo, site = _client(root, "dpo"), _client(root, "h2")
    # the run's requests: 121 (120 + the crafted one) in 3 pages of at most 50, each request once
    seen = []
    for n in (1, 2, 3):
        page = dpo.get(f"/runs/fed/requests?page={n}").text
        seen += re.findall(r">(ER-[a-z0-9]+)</a>", page)
        assert f"page {n} of 3" in page and ('rel="next"' in page) == (n < 3) and ('rel="prev"' in page) == (n > 1)
    assert len(seen) == 121 and set(seen) == set(rids) | {"ER-cli0000000h1"}
    assert "page 3 of 3" in dpo.get("/runs/fed/requests?page=99").text  # past the end: the last page
    assert "page 1 of 3" in dpo.get("/runs/fed/requests?page=x").text
    # the site user: its 60 requests in 2 pages, nothing of H1
    mine = [r for i, r in enumerate(rids) if i % 2]
    seen = []
    for n in (1, 2):
        page = site.get(f"/requests?page={n}").text
        seen += re.findall(r">(ER-[a-z0-9]+)</a>", page)
    assert sorted(seen) == sorted(mine) and "page 2 of 2" in page
    # the ledger, newest first, 50 a page; the site's pages hold only its rows
    page = dpo.get("/runs/fed/ledger").text
    assert "121 entries, newest first; page 1 of 3" in page
    assert re.findall(r"<tr><td>(\d+)</td>", page)[:2] == ["121", "120"]
    page = site.get("/runs/fed/ledger?page=2").text
    assert "60 entries of site H2&#39;s requests" in page and "page 2 of 2" in page
    got = re.findall(r">(ER-[a-z0-9]+)</a>", page)
    assert len(got) == 10 and set(got) <= set(mine)
