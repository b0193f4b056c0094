"""Console page render times with 100 runs and 10,000 erasure-ledger rows (issue: pages <= 200 ms).

Builds a runs folder of 100 federated runs (config, state with 20 rounds of per-site metrics, a
per-site privacy ledger in each) and one run whose erasure ledger holds 10,000 hash-chained rows
(2,000 requests x 5 events, written in one transaction by ``ErasureLedger.append_many``), then
times every page in-process (Starlette's TestClient: the app's own work, no network) for an
officer and a site user. The console's per-process caches are emptied before each user, so the
first request of each page is a cold read ("first ms", the cost a page pays once per change of
its files; the console also warms the ledgers in a background thread at start-up, which this
in-process client does not run) and the median is the steady state. Each median is also given as
a ratio to the same user's run-list page in the same run, a baseline that shows how loaded the
machine was. Writes benchmarks/results/console.json and .md.

    .venv/bin/python benchmarks/console.py [--runs 100] [--rows 10000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

warnings.filterwarnings("ignore")

from privseg.audit.ledger import ErasureLedger  # noqa: E402
from privseg.console import cache, create_app  # noqa: E402
from privseg.console.accounts import Accounts  # noqa: E402
from privseg.data.cohort import Cohort, Subject, assign_splits  # noqa: E402
from privseg.erasure import LEDGER  # noqa: E402
from privseg.federated import RunState, sites_from_cohort  # noqa: E402
from privseg.federated.assemble import fl_config  # noqa: E402
from privseg.privacy.accountant import StepEvent  # noqa: E402
from privseg.privacy.budget import BudgetLedger, ledger_path  # noqa: E402
from privseg.privacy.spec import DPConfig  # noqa: E402
from privseg.train import TrainConfig  # noqa: E402

SITES = ("H1", "H2", "H3")
OUT = Path(__file__).parent / "results"


def cohort(root: Path, per_site: int = 8) -> Path:
    subjects = []
    for s, site in enumerate(SITES):
        for k in range(per_site):
            sid = f"S{s}{k:02d}"
            img = np.random.default_rng(k).normal(size=(4, 4, 4)).astype(np.float32)
            for kind, arr in (("images", img), ("labels", (img > 0).astype(np.uint8))):
                (root / kind).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / kind / f"{sid}.nii.gz"))
            subjects.append(Subject(id=sid, site=site, images=(str(root / "images" / f"{sid}.nii.gz"),),
                                    label=str(root / "labels" / f"{sid}.nii.gz"), modality="T1"))
    Cohort(subjects=assign_splits(subjects, test_fraction=0.25, seed=0), classes=["background", "fg"],
           channels=["T1"], name="bench", root=root).save()
    return root


def run(root: Path, name: str, cohort_root: Path, rounds: int = 20) -> Path:
    tc = TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), device="cpu", in_channels=1, num_classes=2)
    cfg = fl_config(sites=sites_from_cohort(cohort_root), train=tc, name=name, rounds=rounds, local_steps=1,
                    dp=DPConfig(unit="patient", epsilon=8.0, delta=1e-3))
    d = root / name
    d.mkdir(parents=True)
    cfg.save(d)
    st = RunState(d)
    st.data.update({"name": name, "sites": list(SITES)})
    for r in range(1, rounds + 1):
        st.rounds.append({"round": r, "participants": list(SITES), "failed": [], "applied": True,
                          "eval": {"sites": {s: {"mean-dice": 0.5 + r / 100 + i / 50} for i, s in enumerate(SITES)},
                                   "overall": {"site-mean-dice": 0.5 + r / 100}}})
    st.data["rounds_done"] = rounds
    st.data["last_checkpoint"] = f"checkpoints/global_r{rounds:04d}.pt"
    st.set_status("finished")
    for s in SITES:
        led = BudgetLedger(ledger_path(d, s))
        led.set_budget(s, 8.0, 1e-3)
        for r in range(1, rounds + 1):
            led.commit_round(s, r, [StepEvent(q=0.25, sigma=1.1, steps=5)])
    return d


def big_ledger(run_dir: Path, rows: int) -> str:
    """``rows`` hash-chained entries (requests of 5 events each), written by the ledger in one
    transaction; returns one request ID of H2."""
    events = ("requested", "local_unlearned", "repaired", "verified", "completed")
    some, entries = None, []
    for i in range(rows // len(events)):
        rid, site = f"ER-{i:012x}", SITES[i % 3]
        some = some or (rid if site == "H2" else None)
        for ev in events:
            body = {"run": run_dir.name, "kind": "patient", "site": site, "subjects": [f"S{i % 3}00"],
                    "reason": "GDPR art. 17", "requested_by": "bench"} if ev == "requested" else (
                {"passed": True, "checks": {"mia_auc": {"value": 0.5, "max": 0.55, "ok": True}},
                 "before": {"mia_auc": 0.9, "retain_dice": 0.8, "test_dice": 0.7},
                 "after": {"mia_auc": 0.5, "retain_dice": 0.79, "test_dice": 0.7}} if ev == "verified"
                else {"model": {"path": "checkpoints/x.pt", "sha256": "0" * 64}, "removed": [], "seconds": 1.0,
                      "rounds": [21], "until_round": 21})
            entries.append((rid, ev, body))
    ErasureLedger(run_dir / LEDGER).append_many(entries)
    return some


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    from starlette.testclient import TestClient

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        croot = cohort(Path(tmp) / "cohort")
        root = Path(tmp) / "runs"
        first = run(root, "run000", croot)
        for i in range(1, args.runs):  # copies of the first (its privacy ledgers are slow to write)
            d = root / f"run{i:03d}"
            shutil.copytree(first, d)
            cfg = json.loads((d / "fl_config.json").read_text())
            (d / "fl_config.json").write_text(json.dumps({**cfg, "name": d.name}))
        rid = big_ledger(root / "run000", args.rows)
        acc = Accounts(root)
        acc.add_user("dpo", "officer", "benchmark-officer")
        acc.add_user("h2", "site", "benchmark-site-h2", site="H2")
        build_s = time.perf_counter() - t0
        pages = ["/runs", "/requests", "/runs/run000", "/runs/run000/budget", "/runs/run000/patients",
                 "/runs/run000/requests", "/runs/run000/requests?page=20", f"/runs/run000/requests/{rid}",
                 "/runs/run000/ledger",
                 "/runs/run000/ledger?page=50", f"/runs/run000/requests/{rid}/certificate.json"]
        results = []
        load = [os.getloadavg()[0]]
        for user, password in (("dpo", "benchmark-officer"), ("h2", "benchmark-site-h2")):
            cache.clear()  # each user's first request of a page reads its files cold
            c = TestClient(create_app(root, jobs=False))
            page = c.get("/login").text
            tok = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            assert c.post("/login", data={"csrf": tok, "username": user, "password": password},
                          follow_redirects=False).status_code == 303
            for url in pages:
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    r = c.get(url)
                    times.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, (user, url, r.status_code)
                results.append({"user": user, "page": url, "median_ms": statistics.median(times),
                                "max_ms": max(times), "first_ms": times[0], "bytes": len(r.content)})
                print(f"{user:4s} {url:55s} median {statistics.median(times):7.1f} ms  max {max(times):7.1f} ms  "
                      f"first {times[0]:7.1f} ms")
            base = next(r["median_ms"] for r in results if r["user"] == user and r["page"] == "/runs")
            for r in results:
                if r["user"] == user:
                    r["ratio_to_runs"] = r["median_ms"] / base
        load.append(os.getloadavg()[0])
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
               "load_average_1min": {"start": round(load[0], 2), "end": round(load[1], 2)}}
    command = "python benchmarks/console.py " + " ".join(sys.argv[1:])
    worst = max(r["median_ms"] for r in results)
    out = {"command": command.strip(), "machine": machine, "runs": args.runs, "ledger_rows": args.rows,
           "repeat": args.repeat, "build_s": build_s, "worst_median_ms": worst, "target_ms": 200,
           "meets_target": worst <= 200, "pages": results}
    OUT.mkdir(exist_ok=True)
    (OUT / "console.json").write_text(json.dumps(out, indent=2))
    lines = ["# Console page render times", "",
             f"Command: `{out['command']}`  ", f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python "
             f"{machine['python']}, OMP_NUM_THREADS={machine['OMP_NUM_THREADS']} (shared with other jobs; 1-minute "
             f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)  ",
             f"Data: {args.runs} federated runs (20 rounds, 3 sites, a privacy ledger per site), one erasure ledger "
             f"of {args.rows} rows; in-process requests (no network), median of {args.repeat}; first: the first "
             "request of the page after the caches were emptied (cold read); × /runs: median over the same user's "
             "run-list median.", "",
             "| user | page | median ms | × /runs | first ms | max ms | bytes |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['user']} | `{r['page']}` | {r['median_ms']:.1f} | {r['ratio_to_runs']:.2f} | "
              f"{r['first_ms']:.1f} | {r['max_ms']:.1f} | {r['bytes']} |" for r in results]
    lines += ["", f"Worst median: {worst:.1f} ms against the 200 ms target "
              f"({'met' if worst <= 200 else 'NOT met'})."]
    (OUT / "console.md").write_text("\n".join(lines) + "\n")
    print(f"worst median {worst:.1f} ms; wrote {OUT / 'console.json'} and .md")


if __name__ == "__main__":
    main()
