"""Run tracking: every run writes its config, versions, metrics and artefacts into its folder.

::

    <run>/run.json        kind, name, created/updated, status, config, versions, cohort,
                          final metrics, artefacts (rewritten atomically)
    <run>/metrics.jsonl   one JSON object per step/round: {"step": n, "loss": ..., ...}
    <run>/tb/             TensorBoard event files (when the ``tensorboard`` package is
                          installed), so curves can be watched live:
                          ``tensorboard --logdir runs/``

``metrics.jsonl`` keeps the Trainer's historical format (``{"step", "loss"}`` per line),
so older readers keep working. Lines are appended as the run goes; :meth:`RunTracker.
write_history` rewrites the whole file atomically (the Trainer does it at every
checkpoint, so after a crash and resume the file matches the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from privseg.errors import DataError
from privseg.utils import SITES_DIR, atomic_path, versions, write_json

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
KINDS = ("train", "federated", "unlearn", "erasure", "audit", "benchmark")


def _clean(v: Any) -> Any:
    """JSON-safe scalar: NaN/inf become None, numpy/torch scalars become floats."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunTracker:
    """Writes ``run.json``, ``metrics.jsonl`` (and TensorBoard events) for one run folder.

    Safe to construct on an existing folder: ``run.json`` is read and extended (a resumed
    run keeps its creation date)."""

    def __init__(self, run_dir: str | os.PathLike, kind: str = "train", name: str | None = None,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.data = read_run(self.run_dir) or {}
        now = time.time()
        self.data.setdefault("created", now)
        self.data.update({"kind": kind, "name": name or self.run_dir.name, "status": "running", "updated": now})
        self.data.setdefault("artifacts", {})
        self._tb = None
        self._tb_wanted = tensorboard
        self._save()

    # -- files -------------------------------------------------------------------------
    @property
    def run_path(self) -> Path:
        return self.run_dir / RUN_FILE

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def _save(self) -> None:
        self.data["updated"] = time.time()
        write_json(self.run_path, self.data)

    def _writer(self):
        if self._tb is None and self._tb_wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter  # why: optional (pip extra), and seconds to import
            except ImportError:  # tensorboard not installed: JSON only
                self._tb_wanted = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR))
        return self._tb

    # -- API ---------------------------------------------------------------------------
    def log_config(self, config: dict, **context: Any) -> None:
        """Store the run's config (plus context such as the cohort path) and library versions."""
        self.data["config"] = config
        self.data["versions"] = versions()
        self.data.update(context)
        self._save()

    def log_metrics(self, step: int, metrics: dict[str, Any], *, write_line: bool = True) -> None:
        """Record metrics of one step/round: a line in metrics.jsonl and TensorBoard scalars."""
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if write_line:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        w = self._writer()
        if w is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    w.add_scalar(k, v, int(step))
            w.flush()
        self.data["last_metrics"] = row

    def write_history(self, rows: Iterable[dict]) -> None:
        """Rewrite metrics.jsonl atomically with ``rows`` (one JSON object per line)."""
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows))

    def log_artifact(self, path: str | os.PathLike, name: str | None = None, kind: str = "file") -> None:
        """Register a file the run produced (stored relative to the run folder when inside it)."""
        p = Path(path)
        try:
            rel = str(p.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            rel = str(p)
        self.data["artifacts"][name or p.name] = {"path": rel, "kind": kind}
        self._save()

    def finish(self, status: str = "finished", final: dict[str, Any] | None = None, **extra: Any) -> None:
        """Mark the run done and store its final metrics."""
        if final:
            self.data["final"] = {k: _clean(v) for k, v in final.items()}
        self.data.update(extra)
        self.data["status"] = status
        self._save()
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_run(run_dir: str | os.PathLike) -> dict | None:
    """``run.json`` of a folder, or None when absent or unreadable."""
    p = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``metrics.jsonl`` (unreadable lines skipped)."""
    p = Path(run_dir) / METRICS_FILE
    rows = []
    try:
        lines = p.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


# -- finding past runs ---------------------------------------------------------------------------
def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def describe_run(run_dir: str | os.PathLike) -> dict | None:
    """Name, kind, date, status, key metric, config and final metrics of a run folder, or
    None when the folder is not a run (train: run.json or last.pt; federated: state.json;
    unlearn: report.json with a forget request)."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    if (d / "state.json").is_file() and (d / "fl_config.json").is_file():
        st = _load(d / "state.json") or {}
        cfg = _load(d / "fl_config.json") or {}
        metric = None
        final: dict[str, Any] = {"rounds_done": st.get("rounds_done")}
        for e in reversed(st.get("rounds", [])):
            ov = (e.get("eval") or {}).get("overall") or {}
            if ov.get("site-mean-dice") is not None:
                metric = ov["site-mean-dice"]
                final.update({"round": e.get("round"), "site_mean_dice": metric,
                              "sites": {s: m.get("mean-dice") for s, m in (e["eval"].get("sites") or {}).items()}})
                break
        eps = {s: m.get("dp-epsilon") for e in st.get("rounds", [])[-1:] for s, m in (e.get("train") or {}).items()
               if m.get("dp-epsilon") is not None}
        if eps:
            final["dp_epsilon"] = eps
        return {"path": str(d), "name": st.get("name") or d.name, "kind": "federated",
                "date": st.get("created") or _mtime(d / "state.json"), "status": st.get("status"),
                "metric_name": "site-mean Dice", "metric": metric, "config": cfg, "final": final}
    rep = _load(d / "report.json") if (d / "report.json").is_file() else None
    if rep and "request" in rep and "strategy" in rep:
        u = rep.get("unlearned") or {}
        final = {"forget_dice": (u.get("forget") or {}).get("dice"), "retain_dice": (u.get("retain") or {}).get("dice"),
                 "test_dice": (u.get("test") or {}).get("dice"), "dice_gap": u.get("dice_gap"),
                 "mae_gap": u.get("mae_gap"), "mia_auc": rep.get("mia_auc"), "seconds": rep.get("seconds")}
        cfg = {"strategy": rep.get("strategy"), "fix_decoder": rep.get("fix_decoder"), "target": rep.get("target"),
               "epochs": rep.get("epochs"), "params": rep.get("params"), "forget": rep["request"].get("forget"),
               "checkpoint": rep["request"].get("checkpoint"), "seed": rep.get("seed")}
        return {"path": str(d), "name": d.name, "kind": "unlearn", "date": _mtime(d / "report.json"),
                "status": "finished", "metric_name": "forget Dice", "metric": final["forget_dice"], "config": cfg,
                "final": final}
    run = read_run(d)
    if run is None and not (d / "last.pt").is_file():
        return None
    run = run or {}
    final = dict(run.get("final") or {})
    metric_name, metric = "final loss", final.get("loss")
    if metric is None:
        rows = [r for r in read_metrics(d) if "loss" in r]
        metric = rows[-1]["loss"] if rows else None
        if rows:
            final.setdefault("loss", metric)
            final.setdefault("steps", rows[-1].get("step"))
    ev = _load(d / "evaluation.json") if (d / "evaluation.json").is_file() else None
    if ev and isinstance(ev.get("summary"), dict):
        o = ev["summary"].get("overall") or {}
        final["eval_split"] = ev.get("split")
        final["eval_mean_dice"] = o.get("mean_dice")
        final["eval_mae"] = o.get("mae")
        if o.get("mean_dice") is not None:
            metric_name, metric = f"{ev.get('split', 'test')} Dice", o["mean_dice"]
    return {"path": str(d), "name": run.get("name") or d.name, "kind": run.get("kind", "train"),
            "date": run.get("created") or _mtime(d / "last.pt"), "status": run.get("status", "unknown"),
            "metric_name": metric_name, "metric": metric, "config": run.get("config") or {}, "final": final,
            "cohort": run.get("cohort_path")}


def find_runs(root: str | os.PathLike = "runs", max_depth: int = 3, kind: str | None = None) -> list[dict]:
    """Every run folder under ``root`` (``root`` itself included), newest first; with ``kind``, only
    the runs of that kind (train, federated or unlearn)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "runs folder not found")
    found: list[dict] = []

    def walk(d: Path, depth: int) -> None:
        info = describe_run(d)
        if info is not None:
            found.append(info)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            if c.name not in (TB_DIR, "checkpoints", "updates", SITES_DIR):
                walk(c, depth + 1)

    walk(root, 0)
    return sorted((r for r in found if kind is None or r["kind"] == kind), key=lambda r: -(r.get("date") or 0))
