"""The console as a product (issue 27, items 5 and 6 and the console bullets), on crafted run
folders (no training): the landing page's counts per role, an erasure priced before it is
approved (refused when a budget cannot pay, with options that work), the method chosen among
the run's valid ones, approvals and retries as separate decisions, the budget chart drawn by
release with each part of the run on its own line and the budget's history, and the model each
run serves now."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from console_kit import crafted_root, login, token_of, train_ids
from privseg.console import create_app, runs
from privseg.console.erasure import request_id
from privseg.console.store import Store
from privseg.privacy.accountant import StepEvent
from privseg.privacy.budget import BudgetLedger


@pytest.fixture
def crafted(tmp_path):
    return crafted_root(tmp_path)


def client(root, user) -> TestClient:
    c = TestClient(create_app(root, jobs=False))
    assert login(c, user).status_code == 303
    return c


def _count(html: str, key: str) -> int:
    return int(re.search(rf'id="{key}-count">(\d+)<', html).group(1))


def _file(root, cohort, site, k=0):
    subject = train_ids(cohort, site)[k]
    rid = request_id(root / "fed", "patient", site, [subject])
    Store(root).file("fed", rid, "patient", site, [subject], "GDPR art. 17", f"{site.lower()} (site {site})")
    return rid


def test_landing_page_counts_what_needs_attention_per_role(crafted):
    root, cohort = crafted
    store = Store(root)
    _file(root, cohort, "H2", 0)
    _file(root, cohort, "H1", 0)
    failed = _file(root, cohort, "H2", 1)
    store.approve("fed", failed, "dpo (officer)", {"repair_rounds": 0})
    store.start("fed", failed, pid=0)
    store.finish("fed", failed, "failed", "BudgetExceededError: crafted")
    # officer and viewer: every site; H3's budget (1) is far overspent, H1 and H2 are not
    for user in ("dpo", "viewer"):
        home = client(root, user).get("/").text
        assert (_count(home, "pending"), _count(home, "failed"), _count(home, "budget")) == (2, 1, 1), user
        assert "H3" in home.split('id="list-budgets"')[1] and failed in home.split('id="list-failed"')[1]
    # a site user: its own site's requests only, no other site's budget
    home = client(root, "h2").get("/").text
    assert (_count(home, "pending"), _count(home, "failed"), _count(home, "budget")) == (1, 1, 0)
    assert "H1" not in home.split('id="attention"')[1].split("Runs and the model")[0]
    # the model each run serves now, on the landing page and the run page
    assert "checkpoints/global_r0003.pt" in home and "trained model of round 3" in home
    assert "checkpoints/global_r0003.pt" in client(root, "dpo").get("/runs/fed").text


def test_an_erasure_is_priced_before_it_is_approved(crafted):
    root, cohort = crafted
    rid = _file(root, cohort, "H2")
    dpo = client(root, "dpo")
    page = dpo.get(f"/runs/fed/requests/{rid}").text
    price = page.split('id="price"')[1].split("</table>")[0]
    assert "H3" in price and "over the budget" in price  # H3 would pay for its repair round: it cannot
    assert "cannot be approved" in page and 'id="explain-price"' in page
    assert "--repair-rounds 0" in page and "privseg privacy budget RUN --site H3" in page
    # approving as filed is refused; nothing changes
    r = dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": token_of(page)}, follow_redirects=False)
    assert r.status_code == 409 and "cannot pay for this erasure" in r.text
    assert Store(root).get("fed", rid)["state"] == "filed"
    # the option it offers (a button with its settings) goes through
    form = r.text.split('class="inline option-form"')[1].split("</form>")[0]
    fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', form))
    assert fields["repair_rounds"] == "0"
    r = dpo.post(f"/runs/fed/requests/{rid}/approve", data=fields, follow_redirects=False)
    assert r.status_code == 303 and Store(root).get("fed", rid)["state"] == "queued"
    # a site user sees its own site's price only
    other = _file(root, cohort, "H2", 2)
    page = client(root, "h2").get(f"/runs/fed/requests/{other}").text
    assert "<td>H2</td>" in page.split('id="price"')[1] and "<td>H3</td>" not in page


def test_the_method_is_a_choice_among_the_runs_valid_methods(crafted):
    root, cohort = crafted
    rid = _file(root, cohort, "H2")
    dpo = client(root, "dpo")
    page = dpo.get(f"/runs/fed/requests/{rid}").text
    options = re.findall(r"<option value=\"([^\"]*)\"[^>]*>([^<]+)<", page)
    assert [label.split(" ")[0] for _, label in options] == ["dp_finetune"]  # a DP run: the DP method only
    r = dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": token_of(page), "method": "scrub",
                                                             "repair_rounds": "0"})
    assert r.status_code == 400 and "not one this run can use" in r.text
    # a run without DP and without reference models: the unlearning strategies, the erasure's default first
    subject = train_ids(cohort, "H1")[0]
    rid = request_id(root / "other", "patient", "H1", [subject])
    Store(root).file("other", rid, "patient", "H1", [subject], "GDPR art. 17", "h1 (site H1)")
    page = dpo.get(f"/runs/other/requests/{rid}").text
    values = dict(re.findall(r"<option value=\"([^\"]*)\"[^>]*>([^<]+)<", page))
    assert "scrub" in values and "default" in values["scrub"] and "reference_teacher" not in values
    assert 'id="price"' not in page  # no DP: nothing to price


def test_approvals_and_retries_are_separate_decisions(crafted):
    root, cohort = crafted
    store = Store(root)
    rid = _file(root, cohort, "H2")
    dpo = client(root, "dpo")
    token = token_of(dpo.get("/runs").text)
    assert dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": token, "repair_rounds": "0", "note": "ok"},
                    follow_redirects=False).status_code == 303
    store.start("fed", rid, pid=0)
    store.finish("fed", rid, "verification-failed", "verification failed: crafted")
    assert dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": token, "repair_rounds": "0", "epochs": "2",
                                                                "note": "more epochs"},
                    follow_redirects=False).status_code == 303
    decisions = store.decisions("fed", rid)
    assert [d["action"] for d in decisions] == ["approved", "retried"]
    assert decisions[0]["settings"] == {"repair_rounds": 0} and decisions[1]["settings"]["epochs"] == 2
    shown = dpo.get(f"/runs/fed/requests/{rid}").text.split('id="decisions"')[1].split("</td>")[0]
    assert "approved by dpo (officer)" in shown and "retried by dpo (officer)" in shown and "more epochs" in shown


def test_budget_chart_draws_each_part_of_the_run_and_the_budgets_history(crafted):
    root, _ = crafted
    d = root / "fed"
    led = BudgetLedger(d / "sites" / "H2" / "privacy.sqlite")
    # an erasure after round 3: its local stage (its own scope, "round 1") and a repair round 4
    led.commit_round("H2", 1, [StepEvent(q=0.5, sigma=1.3, steps=2)], scope="erasure/ER-abc/local")
    led.set_budget("H2", 30.0, 1e-3, reason="changed by privseg privacy budget from 20")
    led.commit_round("H2", 4, [StepEvent(q=0.5, sigma=1.3, steps=5)])
    st = runs.summary(d)
    state = dict(st["state"], rounds=[*st["state"]["rounds"], {"round": 4, "erasure": "ER-abc", "participants": []}])
    from privseg.console.accounts import User

    row = next(r for r in runs.budgets(d, {**st, "state": state}, User("dpo", "officer", None)) if r["site"] == "H2")
    pts = row["points"]
    assert [p["group"] for p in pts] == ["training"] * 3 + ["erasure ER-abc"] * 2
    assert [p["n"] for p in pts] == [1, 2, 3, 4, 5]  # by booking order: the erasure's "round 1" comes after
    eps = [p["epsilon"] for p in pts]
    assert eps == sorted(eps)  # never goes backwards
    assert [h["epsilon"] for h in row["history"]] == [20.0, 30.0]
    assert runs.budget_steps(row["history"], pts) == [(0.5, 20.0), (4.5, 30.0)]
    page = client(root, "dpo").get("/runs/fed/budget").text
    chart = re.search(r"aria-label='ε spent by site H2'.*?</svg>", page, re.S).group(0)
    assert "data-series='erasure ER-abc'" in chart and "data-series='training'" in chart
    assert "changed by privseg privacy budget from 20" in page and 'id="explain-epsilon"' in page
    # the legend sits under the plot, clear of the budget label at its right
    label_y = float(re.search(r"<text x='[\d.]+' y='([\d.]+)'[^>]*fill='#b00020'>budget 30", chart).group(1))
    height = float(re.search(r"height='(\d+)' role='img' aria-label='ε spent by site H2'", page).group(1))
    legend_y = [float(y) for y in re.findall(r"<rect x='[\d.]+' y='([\d.]+)' width='10'", chart)]
    assert legend_y and min(legend_y) > 240 - 34 > label_y and max(legend_y) < height


def test_a_request_that_cannot_be_priced_says_why_and_is_not_approved(crafted):
    import sqlite3

    root, cohort = crafted
    con = sqlite3.connect(root / "fed" / "sites" / "H3" / "privacy.sqlite")
    with con:
        con.execute("DELETE FROM plans")  # a ledger without its plan: the erasure would refuse too
    con.close()
    rid = _file(root, cohort, "H2")
    dpo = client(root, "dpo")
    page = dpo.get(f"/runs/fed/requests/{rid}")
    assert page.status_code == 200 and "cannot be priced" in page.text and "no DP plan" in page.text
    r = dpo.post(f"/runs/fed/requests/{rid}/approve", data={"csrf": token_of(page.text), "repair_rounds": "0"})
    assert r.status_code == 409 and Store(root).get("fed", rid)["state"] == "filed"
