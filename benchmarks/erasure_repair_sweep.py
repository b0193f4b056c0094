"""Patient erasure on the power federation: how many repair rounds, and which local unlearning?

A side study of ``benchmarks/erasure.py`` (issue 14, item 2), run on its patient ``m1`` (the most
memorised training patient by the calibrated test) once that cell is done: its federated retrain
and the trained original are reused, each setting erases the patient from a fresh copy of the
original run (``privseg.erasure.federated.erase`` with ``--target calibrated``), and the
verification compares with the retrain. The question: does a setting exist that keeps retain and
test Dice >= 0.98 of the retrain's while the calibrated test no longer flags the patient
(p >= 0.05), at <= 0.05 of the retrain's CPU time?

Writes ``benchmarks/results/erasure_repair_sweep.json`` and ``.md``. One torch thread; about
2 min per setting.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/erasure_repair_sweep.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cells  # noqa: E402
import erasure  # noqa: E402

# (local unlearning strategy, repair rounds): the benchmark's setting is noisy_label with 1
SETTINGS = [("noisy_label", 1), ("noisy_label", 2), ("noisy_label", 3), ("noisy_label", 4), ("scrub", 0),
            ("scrub", 1)]
SLOT = "m1"


def run_setting(shared: Path, cell: dict, retrain: Path, method: str, repair: int, work: Path) -> dict:
    from privseg.erasure import ErasureRequest, erase

    run = erasure._copy_of_original(shared, work / "run")
    res = erase(run, ErasureRequest(kind="patient", site=cell["site"], subjects=(cell["patient"],),
                                    reason="repair sweep", method=method, target="calibrated",
                                    epochs=erasure.PATIENT["epochs"], repair_rounds=repair,
                                    thresholds={"min_retain_dice_ratio": 0.98, "min_test_dice_ratio": 0.98},
                                    statistic=erasure.FULL["mia_statistic"]),
                reference=retrain, mia_views=erasure.FULL["mia_views"])
    v = erasure._verdict(res, cell["retrain_cpu_s"], 1.0)
    local = next(e["body"] for e in res.entries if e["event"] == "local_unlearned")
    subject = (v["calibrated_subjects"] or [{}])[0]
    erasure._drop_copy(run)
    return {"method": method, "repair_rounds": repair, "local_steps": local.get("steps_run"),
            "stopped_early": local.get("stopped_early"), "local_check": (local.get("checks") or [None])[-1],
            **{k: v[k] for k in ("status", "failed_checks", "time_ratio", "retain_dice_ratio", "test_dice_ratio",
                                 "calibrated", "after_retain_dice", "retrain_retain_dice")},
            "p_before": subject.get("p_before"), "p_after": subject.get("p_after")}


def main() -> int:
    from privseg.federated import RunState

    runs, shared = erasure.side_study()
    cell = cells.metrics_of(runs / "cells", f"patient-{SLOT}")
    retrain = RunState.load(runs / "work" / f"patient-{SLOT}" / "retrain").last_checkpoint
    work = runs / "work" / "_repair-sweep"
    rows = []
    for method, repair in SETTINGS:
        t0 = time.perf_counter()
        rows.append(run_setting(shared, cell, retrain, method, repair, work / f"{method}-r{repair}"))
        r = rows[-1]
        print(f"{method} r{repair}: retain {r['retain_dice_ratio']:.3f}, test {r['test_dice_ratio']:.3f}, p after "
              f"{r['p_after']:.2g}, time {r['time_ratio']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {"benchmark": "erasure_repair_sweep", "patient": cell["patient"], "site": cell["site"], "slot": SLOT,
           "retrain_cpu_s": cell["retrain_cpu_s"], "machine": cells.machine(), "rows": rows,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    md = ["# Patient erasure: local unlearning and repair rounds (erasure benchmark, patient m1)", "",
          f"Patient {cell['patient']} (site {cell['site']}), `--target calibrated`, at most "
          f"{erasure.PATIENT['epochs']} epochs; its federated retrain as the reference; machine {out['machine']}.",
          "", "| local unlearning | repair rounds | local steps | time / retrain | retain Dice / retrain's | "
          "test Dice / retrain's | calibrated p before -> after | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['repair_rounds']} | {r['local_steps']} | {r['time_ratio']:.3f} | "
                  f"{r['retain_dice_ratio']:.3f} | {r['test_dice_ratio']:.3f} | {r['p_before']:.2g} -> "
                  f"{r['p_after']:.2g} | {r['status']}: {'; '.join(r['failed_checks'] or []) or 'all checks pass'} |")
    cells.write_study("erasure_repair_sweep", out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
