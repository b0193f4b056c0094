"""Reports a person would rather look at: one self-contained HTML file per run, figures
(matplotlib, Agg) and run tracking (run.json, metrics.jsonl, TensorBoard events).

``build_report(path, out_html, subjects=None)`` is the entry point; see :mod:`privseg.report.html`.
"""

from __future__ import annotations

from privseg.report.html import build_report, identify
from privseg.report.tracking import RunTracker, describe_run, find_runs, read_metrics, read_run

__all__ = ["RunTracker", "build_report", "describe_run", "find_runs", "identify", "read_metrics", "read_run"]
