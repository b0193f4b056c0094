"""benchmarks/power_check.py: the membership power of the power cohort's training preset, end to end
on a tiny cohort (the pipeline only; the real run's numbers are in benchmarks/results/power_check.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import power_check  # noqa: E402
from privseg.data.synth import POWER_MIA, POWER_TRAINING  # noqa: E402


@pytest.mark.slow
def test_smoke_run_reports_auc_ci_null_and_the_command(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = argparse.Namespace(steps=3, eval_at="1,2", model="unet_tiny", seed=0, cohort_seed=0, smoke=True)
    r = power_check.run(args, ["--smoke", "--steps", "3", "--eval-at", "1,2", "--model", "unet_tiny"])
    assert [t["step"] for t in r["trajectory"]] == [1, 2, 3]
    # every check point scores the preset's statistic; the last one also the others, for the record
    verdict = f"{POWER_MIA['statistic']}-views{POWER_MIA['views']}"
    assert all(list(t["checks"])[0] == verdict for t in r["trajectory"])
    assert set(r["trajectory"][-1]["checks"]) == {"dice-views1", "dice-views2", "loss-views1", "loss-views2"}
    assert r["member_auc"] == r["trajectory"][-1]["checks"][verdict]["member_auc"]
    assert r["member_ci"][0] <= r["member_auc"] <= r["member_ci"][1] and 0 <= r["null_auc"] <= 1
    # whole-volume patches: training sees every patient exactly as the membership test scores it
    assert POWER_TRAINING["patch_size"] is None and r["training"]["patch_size"] == r["cohort"]["volume"]
    assert r["passed"] is False  # 6 training patients and 3 steps cannot pass the power check
    md = power_check.render(r)
    assert "--smoke" in md and "Machine:" in md and "FAIL" in md and "null control" in md
