"""Run tracking as the reports read it. The tracker lives in :mod:`privseg.train.tracking`
(the Trainer writes ``run.json`` and ``metrics.jsonl`` itself, and train sits below report);
this module keeps the names where readers of runs have always found them."""

from privseg.train.tracking import (
    KINDS,
    METRICS_FILE,
    RUN_FILE,
    TB_DIR,
    RunTracker,
    describe_run,
    find_runs,
    read_metrics,
    read_run,
)

__all__ = ["KINDS", "METRICS_FILE", "RUN_FILE", "TB_DIR", "RunTracker", "describe_run", "find_runs", "read_metrics",
           "read_run"]
