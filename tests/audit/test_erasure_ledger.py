"""The erasure ledger's writes (privseg.audit.ledger.ErasureLedger): one event, or many in one transaction."""

from __future__ import annotations

import pytest

from privseg.audit.ledger import GENESIS, ErasureLedger
from privseg.errors import ConfigError


def test_many_events_chain_like_single_appends(tmp_path):
    led = ErasureLedger(tmp_path / "ledger.db")
    first = led.append("ER-1", "requested", {"subjects": ["P1"]})
    rows = led.append_many([("ER-1", "started", {"stage": "local_unlearned"}),
                            ("ER-2", "requested", {"subjects": ["P2"]})])
    assert first["prev_hash"] == GENESIS and first["seq"] == 1
    assert [r["seq"] for r in rows] == [2, 3]
    assert rows[0]["prev_hash"] == first["hash"] and rows[1]["prev_hash"] == rows[0]["hash"]
    assert led.verify() == (True, [])
    assert [(e["request"], e["event"]) for e in led.entries()] == [
        ("ER-1", "requested"), ("ER-1", "started"), ("ER-2", "requested")]
    assert led.append_many([]) == [] and led.head == rows[1]["hash"]


def test_many_events_are_all_or_none(tmp_path):
    led = ErasureLedger(tmp_path / "ledger.db")
    led.append("ER-1", "requested", {})
    with pytest.raises(ConfigError, match="'nonsense'"):
        led.append_many([("ER-1", "started", {}), ("ER-1", "nonsense", {})])
    with pytest.raises(TypeError):  # the second body is not JSON: the first is not written either
        led.append_many([("ER-1", "started", {}), ("ER-1", "verified", {"value": object()})])
    assert len(led.entries()) == 1 and led.verify() == (True, [])
