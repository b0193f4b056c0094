"""`privseg unlearn` (central) writes the same ledger entries and certificate as a federated erasure."""

from __future__ import annotations

import json
import re

import pytest

from conftest import make_tiny_cohort
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.errors import ConfigError
from privseg.train import TrainConfig
from privseg.train.loop import Trainer
from privseg.unlearn.central import CENTRAL_SITE, erase_central

SIZE = 16
LOOSE = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}


@pytest.fixture(scope="module")
def central(tmp_path_factory):
    root = tmp_path_factory.mktemp("central")
    cohort = make_tiny_cohort(root / "tiny", sites=1, per_site=6, size=SIZE)
    tc = TrainConfig(model="unet_tiny", patch_size=(SIZE,) * 3, steps=3, checkpoint_every=3, device="cpu",
                     subjects_per_step=2, patches_per_subject=1, in_channels=1, num_classes=3)
    Trainer(cohort, tc, root / "run").fit()
    return cohort, root / "run"


def test_central_erasure_is_in_the_ledger_with_a_certificate_and_never_applied_twice(central, tmp_path):
    cohort, run = central
    forget = [s.id for s in cohort.select("train")][:1]
    res, rid, ledger_path, ver, cert = erase_central(
        run / "last.pt", cohort, forget, "noisy_label", epochs=1, out_dir=tmp_path / "u", thresholds=LOOSE,
        reason="GDPR art. 17", requested_by="site lead", approved_by="DPO", mia_views=1, device="cpu",
        certificate_dir=tmp_path / "cert")
    assert ledger_path == run / "erasure" / "ledger.db" and ver["passed"]
    ledger = ErasureLedger(ledger_path, create=False)
    events = [e["event"] for e in ledger.entries(rid)]
    assert events == ["requested", "local_unlearned", "verified", "completed"]
    assert ledger.verify()[0]
    req = ledger.entries(rid)[0]["body"]
    assert req["site"] == CENTRAL_SITE and req["subjects"] == forget and req["approved_by"] == "DPO"
    done = ledger.events(rid)["completed"]["body"]
    assert done["superseded_kept"] == ["last.pt"] and done["removed"] == []
    # the certificate: the request, who approved it, what ran; no reference models -> it says so
    c = json.loads(cert[0].read_text())["certificate"]
    assert c["status"] == "COMPLETED" and c["kind"] == "patient" and c["approved_by"] == "DPO"
    assert c["method"] == "noisy_label" and c["settings"]["local_steps"] == res.report["steps_run"]
    assert c["membership"]["available"] is False and "privseg audit references" in c["membership"]["reason"]
    assert "PASS" not in cert[1].read_text().split("Per-patient membership test")[-1].split("</section>")[0]
    # the same patient from the same model again: refused before anything runs or is written
    n = len(ledger.entries(rid))
    with pytest.raises(ConfigError, match="never applied twice"):
        erase_central(run / "last.pt", cohort, forget, "scrub", epochs=1, out_dir=tmp_path / "u2")
    assert len(ErasureLedger(ledger_path, create=False).entries(rid)) == n and not (tmp_path / "u2").exists()


def test_unlearn_command_records_and_reports_the_request(central, tmp_path, capsys):
    cohort, run = central
    forget = [s.id for s in cohort.select("train")][1]
    code = cli_main(["unlearn", "--checkpoint", str(run / "last.pt"), "--cohort", str(cohort.root), "--forget",
                     forget, "--out", str(tmp_path / "u"), "--epochs", "1", "--device", "cpu",
                     "--certificate", str(tmp_path / "cert"), "--approved-by", "DPO"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ledger:" in out and "certificate:" in out
    rid = re.search(r"ER-[0-9a-f]{12}", out).group(0)
    assert (tmp_path / "cert" / f"{rid}.json").exists()
    events = [e["event"] for e in ErasureLedger(run / "erasure" / "ledger.db", create=False).entries(rid)]
    assert events[:3] == ["requested", "local_unlearned", "verified"]
    # calibrated target without the run's reference models: exit 2 naming the command, nothing written
    code = cli_main(["unlearn", "--checkpoint", str(run / "last.pt"), "--cohort", str(cohort.root), "--forget",
                     [s.id for s in cohort.select("train")][2], "--out", str(tmp_path / "u3"), "--target",
                     "calibrated", "-q"])
    assert code == 2 and not (tmp_path / "u3").exists()
    assert "privseg audit references" in capsys.readouterr().err
