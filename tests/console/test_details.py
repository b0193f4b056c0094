"""Console details a privacy officer reads (issue 27, item 10): who filed a command-line request,
rounds beyond the training plan, a repair stage that ran no round, and `console add-user`'s site
check and wording. All on crafted run folders (no training)."""

from __future__ import annotations

import io
import re

import pytest
from starlette.testclient import TestClient

from console_kit import crafted_root, login
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.console import create_app
from privseg.console.accounts import Accounts
from privseg.federated import RunState

CLI_REQUEST = "ER-cli0000000h1"  # filed on the command line by "shell user" (crafted_root)


@pytest.fixture
def crafted(tmp_path):
    return crafted_root(tmp_path)


def officer(root) -> TestClient:
    c = TestClient(create_app(root, jobs=False))
    assert login(c, "dpo").status_code == 303
    return c


def test_a_command_line_request_shows_who_asked_for_it(crafted):
    root, _ = crafted
    c = officer(root)
    inbox = c.get("/requests").text
    row = next(r for r in inbox.split("<tr>") if CLI_REQUEST in r)
    assert "shell user (command line)" in row  # its --requested-by, not just "command line"
    page = c.get(f"/runs/fed/requests/{CLI_REQUEST}").text
    assert re.search(r'id="requested-by">shell user \(command line\)<', page)


def test_erasure_rounds_are_not_counted_against_the_training_plan(crafted):
    root, _ = crafted
    d = root / "other"  # 3 of 4 planned rounds done; then an erasure adds two repair rounds
    st = RunState.load(d)
    ids = st.data["sites"]
    for r in (4, 5):
        st.record_round({"round": r, "participants": ids, "failed": [], "applied": True, "erasure": CLI_REQUEST},
                        d / "checkpoints" / "global_r0003.pt")
    c = officer(root)
    cell = re.search(r'<td class="rounds">([^<]*)</td>', c.get("/runs/other").text).group(1)
    assert cell == "3 of 4 training rounds + 2 erasure rounds"  # was "5 done of 4 planned"
    assert "3 of 4 training rounds + 2 erasure rounds" in c.get("/runs").text


def test_a_repair_stage_without_rounds_gets_no_tick(crafted):
    root, _ = crafted
    ledger = ErasureLedger(root / "fed" / "erasure" / "ledger.db")
    ledger.append(CLI_REQUEST, "local_unlearned", {"seconds": 1.0})
    ledger.append(CLI_REQUEST, "repaired", {"rounds": [], "until_round": 3, "seconds": 0.0})
    page = officer(root).get(f"/runs/fed/requests/{CLI_REQUEST}").text
    stages = {stage: how for how, stage in re.findall(r'<li class="(\w+)" data-stage="(\w+)">', page)}
    assert stages == {"requested": "done", "local_unlearned": "done", "repaired": "skipped", "verified": "todo",
                      "completed": "todo"}
    assert "repaired ✓" not in page and "repaired (no repair round run)" in page


def test_add_user_refuses_a_site_no_run_has_and_says_what_the_user_is(crafted, monkeypatch, capsys):
    root, _ = crafted
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli_main(["console", "add-user", "zed", "--role", "site", "--site", "H9", "--runs", str(root),
                     "--password-stdin"]) == 2
    err = capsys.readouterr().err
    assert "--site H9" in err and "H1, H2, H3" in err
    assert Accounts(root).get("zed") is None
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli_main(["console", "add-user", "zed", "--role", "site", "--site", "H3", "--runs", str(root),
                     "--password-stdin"]) == 0
    assert capsys.readouterr().out.strip() == "user zed: site user of H3"  # was "site of site H3"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli_main(["console", "add-user", "yan", "--role", "viewer", "--site", "H1", "--runs", str(root),
                     "--password-stdin"]) == 0
    assert capsys.readouterr().out.strip() == "user yan: viewer of site H1"
