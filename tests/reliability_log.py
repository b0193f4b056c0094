"""Counts of the reliability suite: fuzz cases tried/passed, faults injected/survived,
invariant checks run/held. The tests record here; ``benchmarks/reliability.py`` runs them under
pytest in-process and reads the totals (and, per kind, which cases failed)."""

from __future__ import annotations

from collections import Counter, defaultdict

KINDS = ("fuzz", "fault", "invariant")
tried: Counter = Counter()
passed: Counter = Counter()
by_name: dict[str, Counter] = defaultdict(Counter)
failures: dict[str, list[str]] = defaultdict(list)


def record(kind: str, name: str, ok: bool, detail: str = "") -> bool:
    """Count one case of ``kind`` (fuzz, fault or invariant); returns ``ok``."""
    if kind not in KINDS:
        raise ValueError(kind)
    tried[kind] += 1
    by_name[f"{kind}:{name}"]["tried"] += 1
    if ok:
        passed[kind] += 1
        by_name[f"{kind}:{name}"]["passed"] += 1
    elif len(failures[kind]) < 50:
        failures[kind].append(f"{name}: {detail[:600]}")
    return ok


def reset() -> None:
    tried.clear()
    passed.clear()
    by_name.clear()
    failures.clear()


def summary() -> dict:
    return {"tried": dict(tried), "passed": dict(passed),
            "by_name": {k: dict(v) for k, v in sorted(by_name.items())},
            "failures": {k: list(v) for k, v in failures.items()}}
