"""privseg.federated.dp_mod: the ClientApp mod that keeps a DP site's error text at the site.
(Through a real ClientApp: tests/system/test_dp_guarantee.py, a DP site's error.)"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from privseg.errors import BudgetExceededError, DataError, SiteFailure
from privseg.federated.dp_mod import SITE_ERROR_LOG, withhold_errors_mod
from privseg.privacy import DPConfig

SECRET = "patient S017 has a 4.2 cm lesion"  # stands for any figure an error message may quote


@pytest.fixture(autouse=True)
def flower_ids():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _run(tmp_path, config: dict, exc: Exception) -> str:
    def train(msg, context):  # the ClientApp's train handler: its errors leave as SiteFailure
        raise SiteFailure("H1", exc) from exc

    mod = withhold_errors_mod(lambda msg, context: tmp_path / "H1")
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 3, **config})}), dst_node_id=0,
                  message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(SiteFailure) as err:
        mod(msg, ctx, train)
    assert SiteFailure.site_in(str(err.value)) == "H1" and err.value.__cause__ is exc
    return str(err.value)


def test_under_dp_only_the_class_leaves_and_the_site_keeps_the_text(tmp_path):
    sent = _run(tmp_path, DPConfig(unit="site").to_run_config(), DataError("/data/h1", SECRET))
    assert "DataError" in sent and "withheld" in sent and SECRET not in sent
    kept = (tmp_path / "H1" / SITE_ERROR_LOG).read_text()
    assert SECRET in kept and "round 3: DataError" in kept


def test_without_dp_and_for_a_budget_refusal_the_error_leaves_whole(tmp_path):
    assert SECRET in _run(tmp_path, {}, ValueError(SECRET))
    refusal = "site H1 needs epsilon 9.1 (budget 8)"  # ledger figures only: the server stops the run on it
    assert refusal in _run(tmp_path, DPConfig().to_run_config(), BudgetExceededError(refusal))
    assert not (tmp_path / "H1" / SITE_ERROR_LOG).exists()
