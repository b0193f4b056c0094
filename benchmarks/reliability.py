"""Reliability and security benchmark (issue 9): fuzzed inputs, injected faults, invariants.

    python benchmarks/reliability.py                 # the suite as CI runs it (~5 min on 2 CPUs)
    python benchmarks/reliability.py --quick         # without the slow SuperNode-kill deployment
    python benchmarks/reliability.py --scale 10 --random   # 10x the fuzz examples, fresh draws

Runs the fault, fuzz, ledger-invariant, guard and erasure suites of tests/ (see ``FILES``)
(erasure kills and ledger invariants) under pytest
in this process; the tests count every case in ``tests/reliability_log.py``. Prints one table
(inputs fuzzed / passed, faults injected / survived, invariant checks run / held) and writes
benchmarks/results/reliability.json (keys fuzz_tried, fuzz_passed, faults_injected,
faults_survived, invariants_run, invariants_held, details) and reliability.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
RESULTS = ROOT / "benchmarks" / "results"
FILES = ("system/test_fuzz.py", "system/test_faults.py", "privacy/test_ledger_invariants.py",
         "federated/test_guard_security.py", "erasure/test_erasure.py")


class Outcomes:
    """pytest plugin: each test's outcome and duration."""

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
            entry["seconds"] += report.duration
            if report.outcome != "passed":
                entry["outcome"] = report.outcome


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["PRIVSEG_FUZZ_SCALE"] = str(args.scale)
    if args.random:
        os.environ["PRIVSEG_FUZZ_RANDOM"] = "1"
    sys.path.insert(0, str(TESTS))
    import pytest

    import reliability_log as rlog

    rlog.reset()
    plugin = Outcomes()
    argv = [str(TESTS / f) for f in FILES] + ["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    if args.quick:
        argv += ["-m", "not slow"]
    t0 = time.perf_counter()
    code = pytest.main(argv, plugins=[plugin])
    seconds = time.perf_counter() - t0
    s = rlog.summary()
    tried, passed = s["tried"], s["passed"]
    tests = plugin.tests
    slow = sorted(((v["seconds"], k) for k in tests for v in [tests[k]]), reverse=True)[:8]
    from privseg.utils import versions

    return {
        "fuzz_tried": tried.get("fuzz", 0), "fuzz_passed": passed.get("fuzz", 0),
        "faults_injected": tried.get("fault", 0), "faults_survived": passed.get("fault", 0),
        "invariants_run": tried.get("invariant", 0), "invariants_held": passed.get("invariant", 0),
        "details": {
            "pytest_exit_code": int(code), "seconds": round(seconds, 1),
            "tests_passed": sum(v["outcome"] == "passed" for v in tests.values()),
            "tests_failed": sorted(k for k, v in tests.items() if v["outcome"] == "failed"),
            "tests_skipped": sorted(k for k, v in tests.items() if v["outcome"] == "skipped"),
            "slowest_tests": [{"test": k, "seconds": round(t, 1)} for t, k in slow],
            "cases": s["by_name"], "failures": s["failures"],
            "command": " ".join([Path(sys.executable).name, "benchmarks/reliability.py", *sys.argv[1:]]),
            "settings": {"quick": args.quick, "scale": args.scale, "random": args.random},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "versions": versions(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    }


def _group(by_name: dict, kind: str) -> list[tuple[str, int, int]]:
    """Cases per family (the part of the name before the second ':')."""
    out: dict[str, list[int]] = {}
    for name, c in by_name.items():
        k, _, rest = name.partition(":")
        if k != kind:
            continue
        fam = ":".join(rest.split(":")[:2]) if kind == "fuzz" else rest
        acc = out.setdefault(fam, [0, 0])
        acc[0] += c.get("tried", 0)
        acc[1] += c.get("passed", 0)
    return [(f, t, p) for f, (t, p) in sorted(out.items())]


def table(res: dict) -> str:
    rows = [("inputs fuzzed", res["fuzz_tried"], "passed", res["fuzz_passed"]),
            ("faults injected", res["faults_injected"], "survived", res["faults_survived"]),
            ("invariant checks run", res["invariants_run"], "held", res["invariants_held"])]
    lines = ["| what | count | outcome | count |", "|---|---:|---|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def write_md(res: dict, path: Path) -> None:
    d = res["details"]
    parts = ["# Reliability and security (issue 9)", "",
             f"`{d['command']}` -- {d['date']}, {d['machine']['cpus']} CPUs, {d['seconds']:.0f} s, "
             f"pytest exit code {d['pytest_exit_code']} ({d['tests_passed']} tests passed, "
             f"{len(d['tests_failed'])} failed, {len(d['tests_skipped'])} skipped).", "", table(res), ""]
    for kind, title in (("fuzz", "Fuzz cases by family (reader:format / cli:command / json / ...)"),
                        ("fault", "Faults"), ("invariant", "Invariant checks")):
        parts += [f"## {title}", "", "| family | tried | passed |", "|---|---:|---:|"]
        parts += [f"| {f} | {t} | {p} |" for f, t, p in _group(d["cases"], kind)]
        parts.append("")
    if any(d["failures"].values()):
        parts += ["## Failures", ""] + [f"- {k}: {x}" for k, v in d["failures"].items() for x in v] + [""]
    parts += ["## Slowest tests", "", "| test | seconds |", "|---|---:|"]
    parts += [f"| `{x['test']}` | {x['seconds']} |" for x in d["slowest_tests"]]
    path.write_text("\n".join(parts) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="leave out tests marked slow (the deployment kill)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the fuzz examples per test")
    ap.add_argument("--random", action="store_true", help="fresh random examples instead of the fixed ones")
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = ap.parse_args()
    res = run(args)
    print()
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    write_md(res, args.out.with_suffix(".md"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    ok = (res["fuzz_tried"] == res["fuzz_passed"] and res["faults_injected"] == res["faults_survived"]
          and res["invariants_run"] == res["invariants_held"] and res["details"]["pytest_exit_code"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
