"""privacy.budget's ledger paths: the one place that spells where a run's or a site's privacy
ledger lives, and the listing every reader (status, reports, the console) goes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from privseg.errors import DataError
from privseg.privacy.budget import BudgetLedger, find_ledgers, ledger_path, ledgers_in


def test_a_run_and_its_sites_have_one_ledger_path_each(tmp_path):
    assert ledger_path(tmp_path) == tmp_path / "privacy.sqlite"
    assert ledger_path(tmp_path, "H2") == tmp_path / "sites" / "H2" / "privacy.sqlite"
    assert ledger_path(str(tmp_path), "H2") == ledger_path(Path(tmp_path), "H2")


def test_the_ledgers_of_a_run_are_found_where_ledger_path_puts_them(tmp_path):
    with pytest.raises(DataError, match="no privacy ledger"):
        find_ledgers(tmp_path)
    assert ledgers_in(tmp_path) == []
    for site in ("H2", "H1"):
        BudgetLedger(ledger_path(tmp_path, site)).set_budget(site, 3.0, 1e-5)
    (tmp_path / "sites" / "H3").mkdir()  # a site folder without a ledger
    (tmp_path / "sites" / "H1" / "notes.sqlite").write_text("")  # not a ledger
    found = [ledger_path(tmp_path, "H1"), ledger_path(tmp_path, "H2")]
    assert ledgers_in(tmp_path) == find_ledgers(tmp_path) == found
    BudgetLedger(ledger_path(tmp_path)).set_budget("server", 2.0, 1e-5)
    assert find_ledgers(tmp_path) == sorted([ledger_path(tmp_path), *found])
    assert find_ledgers(ledger_path(tmp_path, "H1")) == [ledger_path(tmp_path, "H1")]  # the file itself
