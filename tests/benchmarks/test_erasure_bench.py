"""benchmarks/erasure.py's summary (issue 30): the restated site target computed from a site cell's
per-patient calibrated test, and every claim met / missed / pending with the cells it waits for. Built
on the benchmark's committed cell files, changed where a case needs it; nothing is trained."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import erasure  # noqa: E402
from privseg.audit.mia import null_auc_sd  # noqa: E402

CELLS = REPO / "benchmarks" / "runs" / "erasure" / "cells"


@pytest.fixture
def done() -> dict:
    needed = ["original", "references-2", "site-retrain", "site-fedrecover-final12", "site-fedrecover",
              "patient-teacher-m1", "patient-teacher-r1"]
    if not all((CELLS / f"{n}.json").is_file() for n in needed):
        pytest.skip("the erasure benchmark's cell files are not in this checkout")
    return {n: json.loads((CELLS / f"{n}.json").read_text()) for n in needed}


def test_the_site_target_is_judged_on_the_erased_sites_patients(done):
    out = erasure.merge(done)
    final12 = out["site_settings"]["fedrecover-final12"]
    subj = done["site-fedrecover-final12"]["metrics"]["calibrated_subjects"]
    assert final12["n_site_patients"] == len(subj) == 12 and final12["n_never_seen_at_site"] == 4
    sd = null_auc_sd(12, 4)
    assert final12["null_band"] == pytest.approx([0.5 - 1.96 * sd, 0.5 + 1.96 * sd])
    # the faster setting misses the test Dice target, so the headline is the one that meets the quality
    assert out["site_setting"] == "fedrecover-final12" and not out["site_settings"]["fedrecover"]["meets_quality"]
    assert out["claims"]["site_retain_dice_ratio"]["status"] == "reported"
    mem = out["site_memorisation"]
    assert mem["retrain_gap"] == pytest.approx(mem["retrain_retain"] - mem["retrain_test"]) and mem["retrain_gap"] > 0
    # two of the site's patients still flagged after the erasure: 10/12 passes < 0.9, the target is missed
    worse = copy.deepcopy(done)
    for r in worse["site-fedrecover-final12"]["metrics"]["calibrated_subjects"][:2]:
        r["indistinguishable_after"] = False
    out = erasure.merge(worse)
    assert out["site_settings"]["fedrecover-final12"]["calibrated_pass_rate"] == pytest.approx(10 / 12)
    assert out["claims"]["site_calibrated_pass_rate"]["status"] == "missed"
    # a group AUC outside the band fails the quality too, whatever the per-patient test says
    worse["site-fedrecover-final12"]["metrics"]["calibrated_subjects"] = subj
    worse["site-fedrecover-final12"]["metrics"]["after_mia_auc"] = 0.95
    assert not erasure.merge(worse)["site_settings"]["fedrecover-final12"]["meets_quality"]


def test_claims_without_their_cells_are_pending_and_name_them(done):
    out = erasure.merge(done)
    claims = out["claims"]
    assert set(claims) == set(erasure.TARGETS) | set(erasure.REPORTED)
    assert claims["calibrated_tpr_at_1pct_fpr_2ref"] == {"value": None, "target": [">=", 0.9], "status": "pending",
                                                         "waiting_for": "calibrated-original-2ref"}
    assert claims["patient_time_ratio_2ref"]["waiting_for"] == "patient-2ref-*"
    assert claims["calibrated_auc_2ref_s0.5"]["waiting_for"] == "short-0.5-2ref"
    # the readiness of one pair is measured (its CPU time over the original's) and amortised over requests
    cpu = done["references-2"]["metrics"]["cpu_s"]
    assert out["readiness_ratio"] == pytest.approx((cpu["0"] + cpu["1"]) / done["original"]["metrics"]["cpu_s"])
    assert claims["readiness_ratio"]["status"] == ("met" if out["readiness_ratio"] <= 2.0 else "missed")
    assert out["amortised_cost_per_request"]["100"] < out["amortised_cost_per_request"]["1"]
    md = "\n".join(erasure.render(out, done))
    assert "pending (calibrated-original-2ref not run)" in md and "Memorisation behind the retain Dice" in md
