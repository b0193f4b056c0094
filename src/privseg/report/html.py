"""One self-contained HTML report of a run or a result file.

:func:`build_report` reads what a run folder (or result JSON) holds and renders every
section it has data for; a section without data is left out, so new kinds of runs
(erasures) only need to drop their files into the folder. Images are embedded as
base64 PNG, the style sheet is inline, there is no script and no external reference:
the file opens offline. Every figure is also written as a PNG into
``<report stem>_files/`` beside the report.

What is read (all optional except what identifies the run):

* central training (``Trainer``): ``last.pt``, ``metrics.jsonl``, ``run.json``
  (cohort path, config), ``evaluation.json`` (``privseg evaluate --json``);
* federated (``privseg fl run``): ``fl_config.json``, ``state.json`` (per-round, per-site
  train loss, evaluation Dice, ``dp-epsilon``), ``checkpoints/``, ``privacy.sqlite`` and
  ``sites/*/privacy.sqlite`` (per-site ε ledgers);
* unlearning (``privseg unlearn``): ``report.json`` + ``unlearned.pt``; the original
  checkpoint named in the report; a retrained reference found beside it (a sibling
  folder whose ``unlearned.pt`` was made by ``retrain`` for the same forget request);
* results: an evaluation JSON, an unlearning report JSON, the unlearning benchmark JSON;
* erasure (``privseg erase``): ``erasure/ledger.db`` and the certificates beside it.

Nothing is written unless everything succeeded; the HTML is written atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import sqlite3
import warnings
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privseg.audit.certificate import summarise
from privseg.audit.ledger import ErasureLedger
from privseg.audit.mia import subject_statistics
from privseg.data.formats import read_cohort
from privseg.data.transforms import load_preprocessed
from privseg.errors import ConfigError, DataError, PrivsegError
from privseg.privacy.budget import BudgetLedger, ledgers_in
from privseg.report import figures as F
from privseg.report.served import served_view
from privseg.report.text import rounds_text
from privseg.report.tracking import read_metrics, read_run
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.train.inference import evaluate_checkpoint, predict_probs
from privseg.utils import atomic_path, check_id

MAX_OVERLAY_SUBJECTS = 3
MAX_TABLE_ROWS = 200

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:1200px;margin:0 auto;padding:16px 28px 40px}
header{background:#1f2d3d;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:0;color:#c8d3de;font-size:13px}
nav{font-size:13px;margin:10px 0} nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:18px 0;padding:12px 20px 18px}
h2{font-size:18px;margin:6px 0 10px;border-bottom:1px solid #eee;padding-bottom:6px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}
th,td{border:1px solid #dde2e8;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#eef2f6} td.l,th.l{text-align:left} tr.sum td{font-weight:600;background:#f8fafc}
figure{margin:8px 0 14px} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555;margin-top:3px} .note{font-size:12px;color:#666}
.kv td:first-child{text-align:left;color:#555} .kv td{text-align:left}
pre{background:#f4f4f4;padding:8px;font-size:11.5px;overflow-x:auto;max-height:400px}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start} .row h3{margin-top:0}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:middle}
"""

SECTION_TITLES = {
    "summary": "Run", "cohort": "Cohort", "training": "Training curves", "metrics": "Segmentation metrics",
    "overlays": "Prediction vs ground truth", "privacy": "Differential privacy", "unlearning": "Unlearning",
    "study": "Unlearning study table", "erasure": "Erasure: ledger and certificate",
    "personalisation": "Model served per site",
}


# -- what the path is --------------------------------------------------------------------
@dataclass
class Source:
    path: Path
    kind: str  # train | federated | unlearn | evaluation | benchmark | checkpoint
    run_dir: Path | None = None
    checkpoint: Path | None = None
    data: dict = field(default_factory=dict)  # the JSON that identified it (state / report / result)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None


def _json_kind(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if "request" in data and "strategy" in data:
        return "unlearn"
    if "subjects" in data and "summary" in data and "classes" in data:
        return "evaluation"
    if data.get("benchmark") and isinstance(data.get("summary"), list):
        return "benchmark"
    if "rounds" in data and "rounds_done" in data:
        return "federated"
    return None


def identify(path: str | os.PathLike) -> Source:
    """What ``path`` is; a :class:`DataError` naming it when it is none of the known kinds."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such run folder or result file")
    if p.is_dir():
        if (p / "state.json").is_file() and (p / "fl_config.json").is_file():
            return Source(p, "federated", p, data=_read_json(p / "state.json"))
        if (p / "report.json").is_file():
            data = _read_json(p / "report.json")
            if _json_kind(data) == "unlearn":
                ck = p / "unlearned.pt"
                return Source(p, "unlearn", p, ck if ck.is_file() else None, data)
        if (p / "last.pt").is_file():
            return Source(p, "train", p, p / "last.pt")
        run = read_run(p)
        if run and run.get("kind") == "train" and (p / "metrics.jsonl").is_file():
            return Source(p, "train", p)
        raise DataError(p, "not a privseg run folder (no last.pt, state.json + fl_config.json, or report.json)")
    if p.suffix == ".pt":
        if p.name == "last.pt":
            return Source(p, "train", p.parent, p)
        if p.name == "unlearned.pt" and (p.parent / "report.json").is_file():
            return Source(p.parent, "unlearn", p.parent, p, _read_json(p.parent / "report.json"))
        return Source(p, "checkpoint", p.parent, p)
    if p.suffix == ".json":
        data = _read_json(p)
        kind = _json_kind(data)
        if kind == "federated":
            return Source(p, kind, p.parent, data=data)
        if kind == "unlearn":
            ck = Path(data.get("output") or p.parent / "unlearned.pt")
            return Source(p, kind, p.parent, ck if ck.is_file() else None, data)
        if kind == "evaluation":
            ck = Path(data.get("checkpoint") or "")
            return Source(p, kind, p.parent, ck if ck.is_file() else None, data)
        if kind == "benchmark":
            return Source(p, kind, None, data=data)
        raise DataError(p, "JSON is not a privseg result (evaluation, unlearning report, benchmark or run state)")
    raise DataError(p, "not a run folder, checkpoint (.pt) or result JSON")


# -- helpers -----------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞"
        if v != 0 and (abs(v) < 10 ** -(digits - 1) or abs(v) >= 1e4):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)[:300]
    return str(v)


def table(cols: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1, sum_rows: int = 0,
          cls: str = "") -> str:
    """HTML table; the first ``left`` columns are left-aligned; the last ``sum_rows`` rows bold."""
    out = [f'<table class="{cls}"><tr>' + "".join(
        f'<th class="{"l" if i < left else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(cols)) + "</tr>"]
    shown = list(rows)[:MAX_TABLE_ROWS]
    for k, r in enumerate(shown):
        tr = ' class="sum"' if k >= len(shown) - sum_rows else ""
        out.append(f"<tr{tr}>" + "".join(
            f'<td class="{"l" if i < left else ""}">{html.escape(_fmt(v))}</td>' for i, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    if len(rows) > MAX_TABLE_ROWS:
        out.append(f'<p class="note">{len(rows) - MAX_TABLE_ROWS} more rows not shown.</p>')
    return "".join(out)


def kv_table(d: dict) -> str:
    return table(["key", "value"], [[k, v] for k, v in d.items()], left=2, cls="kv")


def _when(ts: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OSError):
        return "–"


class Builder:
    """Collects sections and figures in memory; :meth:`write` puts them on disk."""

    def __init__(self, stem: str):
        self.stem = stem
        self.sections: list[tuple[str, str, str]] = []
        self.figs: dict[str, bytes] = {}

    def fig(self, name: str, fig, caption: str) -> str:
        data = F.png_bytes(fig)
        self.figs[f"{name}.png"] = data
        b64 = base64.b64encode(data).decode()
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def add(self, sid: str, body: str, title: str | None = None) -> None:
        if body.strip():
            self.sections.append((sid, title or SECTION_TITLES.get(sid, sid), body))

    def render(self, title: str, subtitle: str) -> str:
        nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in self.sections)
        body = "".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>{b}</section>' for sid, t, b in self.sections)
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
                f"<main><nav>{nav}</nav>{body}</main></body></html>")

    def write(self, out_html: Path, page: str) -> Path:
        fig_dir = out_html.parent / f"{self.stem}_files"
        for name, data in self.figs.items():
            with atomic_path(fig_dir / name) as tmp:
                tmp.write_bytes(data)
        with atomic_path(out_html) as tmp:
            tmp.write_text(page, encoding="utf-8")
        return out_html


# -- cohort discovery ---------------------------------------------------------------------
def _try_cohort(path: Any):
    if not path:
        return None
    try:
        return read_cohort(path)
    except (PrivsegError, OSError):
        return None


def _checkpoint_meta(path: Path | None) -> dict:
    if path is None or not Path(path).is_file():
        return {}
    try:
        return load_checkpoint(path)
    except PrivsegError:
        return {}


def find_cohort(src: Source, explicit: str | os.PathLike | None = None):
    """The cohort a run used: explicit path, run.json, fl_config.json, the original run of an
    unlearning report, or a sibling folder holding a manifest of the same cohort name."""
    if explicit:
        return read_cohort(explicit)  # a bad explicit path is the caller's error
    candidates: list[Any] = []
    name = None
    if src.run_dir is not None:
        run = read_run(src.run_dir) or {}
        candidates.append(run.get("cohort_path"))
        name = run.get("cohort")
        fl = src.run_dir / "fl_config.json"
        if fl.is_file():
            try:
                candidates += [s.get("cohort") for s in _read_json(fl).get("sites", [])]
            except DataError:
                pass
    if src.kind == "unlearn":
        orig = Path(src.data.get("request", {}).get("checkpoint", ""))
        if orig.is_file():
            candidates.append((read_run(orig.parent) or {}).get("cohort_path"))
        name = name or src.data.get("request", {}).get("cohort")
    if src.kind == "evaluation" and src.checkpoint is not None:
        candidates.append((read_run(src.checkpoint.parent) or {}).get("cohort_path"))
    for c in candidates:
        cohort = _try_cohort(c)
        if cohort is not None:
            return cohort
    if name is None and src.checkpoint is not None:
        name = _checkpoint_meta(src.checkpoint).get("extra", {}).get("cohort")
    if name and src.run_dir is not None:
        for base in (src.run_dir.parent, src.run_dir.parent.parent):
            for manifest in sorted(base.glob("*/cohort.json"))[:50]:
                try:
                    if json.loads(manifest.read_text()).get("name") == name:
                        cohort = _try_cohort(manifest)
                        if cohort is not None:
                            return cohort
                except (OSError, ValueError):
                    continue
    return None


# -- volumes and predictions ------------------------------------------------------------------
def _items(cohort, ids: Sequence[str], spacing=None) -> dict[str, dict]:
    subs = [cohort.subject(i) for i in ids]
    return {s.id: it for s, it in zip(subs, load_preprocessed(subs, cohort, spacing), strict=True)}


def _arr(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().float().numpy())


def _model(path: Path):
    payload = load_checkpoint(path)
    return payload["config"], model_from_checkpoint(payload, path).eval()


def _predict(model, cfg: dict, item: dict) -> np.ndarray:
    return predict_probs(model, item["image"], cfg["patch_size"]).argmax(0).numpy()


# -- sections ---------------------------------------------------------------------------------
def _summary_section(b: Builder, src: Source, ckpt_meta: dict) -> None:
    run = read_run(src.run_dir) if src.run_dir else None
    info: dict[str, Any] = {"source": str(src.path), "kind": src.kind}
    if run:
        info.update({"name": run.get("name"), "status": run.get("status"), "created": _when(run.get("created")),
                     "updated": _when(run.get("updated"))})
        if run.get("seconds") is not None:
            info["wall time (s)"] = run.get("seconds")
    if src.kind == "federated":
        d = src.data
        info.update({"name": d.get("name"), "status": d.get("status"), "strategy": d.get("strategy"),
                     "rounds": rounds_text(d.get("rounds") or [], int(d.get("rounds_done") or 0),
                                           d.get("rounds_planned")),
                     "created": _when(d.get("created")), "updated": _when(d.get("updated"))})
    body = '<div class="row"><div><h3>Run</h3>' + kv_table(info) + "</div>"
    config = (run or {}).get("config") or ckpt_meta.get("config")
    if src.kind == "federated" and src.run_dir is not None:
        try:
            fl = _read_json(src.run_dir / "fl_config.json")
            config = {**{k: v for k, v in fl.items() if k not in ("train", "sites")}, **(fl.get("train") or {})}
        except DataError:
            pass
    dp_record = (ckpt_meta.get("extra") or {}).get("dp")  # central DP training's record of its spec
    if config and dp_record and "privacy" not in config:
        config = {**config, "privacy": dp_record}
    if config:
        body += "<div><h3>Configuration</h3>" + kv_table(
            {k: v for k, v in config.items() if v not in (None, {}, [])}) + "</div>"
    vers = (run or {}).get("versions") or ckpt_meta.get("versions") or src.data.get("versions")
    if vers:
        body += "<div><h3>Versions</h3>" + kv_table(vers) + "</div>"
    b.add("summary", body + "</div>")


def _cohort_section(b: Builder, cohort, sites_in_run: Sequence[str] | None = None) -> None:
    sites = list(sites_in_run or cohort.sites)
    profiles = (cohort.info or {}).get("profiles") or {}
    rows = []
    for s in sites:
        subs = [x for x in cohort.subjects if x.site == s]
        prof = profiles.get(s) or {}
        colour = "#" + "".join(f"{int(255 * c):02x}" for c in F.site_colour(s, sites)[:3])
        rows.append((colour, [s, prof.get("name", "–"), prof.get("description") or ", ".join(
            sorted({x.modality for x in subs})), *[sum(x.split == sp for x in subs) for sp in ("train", "val", "test")],
            len(subs)]))
    cols = ["site", "scanner profile", "description", "train", "val", "test", "total"]
    tbl = table(cols, [r for _, r in rows], left=3)
    for colour, r in rows:  # colour swatch per site, the same colour as in the figures
        tbl = tbl.replace(f'<td class="l">{html.escape(r[0])}</td>',
                          f'<td class="l"><span class="swatch" style="background:{colour}"></span>'
                          f'{html.escape(r[0])}</td>', 1)
    meta = {"name": cohort.name, "format": cohort.format, "dimensions": f"{cohort.spatial_dims}D",
            "classes": ", ".join(cohort.classes), "channels": ", ".join(cohort.channels),
            "subjects": len(cohort.subjects)}
    for k in ("template", "size", "spacing_mm", "lesions", "seed"):
        if k in (cohort.info or {}):
            meta[k] = cohort.info[k]
    body = ('<div class="row"><div><h3>Manifest</h3>' + kv_table(meta) + "</div><div><h3>Sites and splits</h3>"
            + tbl + "</div></div>")
    if profiles:
        keys = sorted({k for p in profiles.values() for k in p if k not in ("name", "description")})
        body += "<h3>Scanner profiles (cohort.info)</h3>" + table(
            ["site", "profile", *keys], [[s, profiles[s].get("name"), *[profiles[s].get(k) for k in keys]]
                                         for s in sites if s in profiles], left=2)
    examples = []
    for s in sites:
        subs = [x for x in cohort.subjects if x.site == s and x.label]
        if not subs:
            continue
        try:
            it = _items(cohort, [subs[0].id])[subs[0].id]
        except PrivsegError:
            continue
        examples.append({"site": s, "id": subs[0].id, "image": _arr(it["image"][0]),
                         "label": _arr(it["label"][0]).astype(int), "spacing": F.voxel_spacing(it["image"])})
    if examples:
        body += b.fig("cohort_examples", F.cohort_examples(examples, cohort.classes),
                      "One subject per site after preprocessing (RAS, foreground crop, intensity normalisation); "
                      "ground-truth labels in colour.")
    b.add("cohort", body)


def _finite_mean(vals: Sequence[float]) -> float:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else float("nan")


def _eval_tables(b: Builder, result: dict, note: str = "") -> str:
    classes = result["classes"][1:]
    rows = result["subjects"]
    has_hd = any("hd95" in r for r in rows)
    hd_cols = [f"HD95 {c} (mm)" for c in classes] if has_hd else []

    def hd(r):
        return list(r.get("hd95", [None] * len(classes))) if has_hd else []

    site_rows = []
    for site, s in result["summary"]["sites"].items():
        rs = [r for r in rows if r["site"] == site]
        hdm = [_finite_mean([r["hd95"][c] for r in rs if "hd95" in r]) for c in range(len(classes))] if has_hd else []
        site_rows.append([site, s["n"], *s.get("dice", []), s["mean_dice"], s["mae"], *hdm])
    o = result["summary"]["overall"]
    site_rows.append(["all", o["n"], *o.get("dice", []), o["mean_dice"], o["mae"], *([None] * len(hd_cols))])
    dice_cols = [f"Dice {c}" for c in classes]
    body = (f'<p class="note">Split: {html.escape(str(result.get("split")))}. Dice 0–1 (higher is better); MAE = '
            "mean |softmax − one-hot| over voxels and foreground classes (0–1, lower is better); HD95 in mm. "
            f"{html.escape(note)}</p>")
    body += "<h3>Per site</h3>" + table(["site", "n", *dice_cols, "mean Dice", "MAE", *hd_cols], site_rows, 1, 1)
    body += "<h3>Per subject</h3>" + table(
        ["subject", "site", *dice_cols, "mean Dice", "MAE", *hd_cols],
        [[r["id"], r["site"], *r["dice"], r["mean_dice"], r["mae"], *hd(r)] for r in rows], left=2)
    if rows:
        body += b.fig("dice_by_site", F.metric_by_site(rows, result["classes"]),
                      "Dice per site: bars = site mean per class, dots = each subject's mean foreground Dice.")
    return body


def _overlay_section(b: Builder, cohort, ckpt: Path, subjects: Sequence[str] | None) -> None:
    cfg, model = _model(ckpt)
    if subjects:
        ids = list(subjects)
    else:
        test = cohort.select("test") or cohort.select("val") or cohort.subjects
        per_site: dict[str, str] = {}
        for s in test:
            if s.label:
                per_site.setdefault(s.site, s.id)
        ids = list(per_site.values())[:MAX_OVERLAY_SUBJECTS]
    items = _items(cohort, ids, cfg.get("spacing"))
    body = (f'<p class="note">Model: {html.escape(str(ckpt))}. Top row: ground truth; bottom row: prediction '
            "filled, ground truth as outline. Slices through the ground truth's centre of mass.</p>")
    for sid in ids:
        it = items[sid]
        pred = _predict(model, cfg, it)
        label = _arr(it["label"][0]).astype(int) if "label" in it else None
        s = cohort.subject(sid)
        body += b.fig(f"overlay_{sid}", F.overlays(_arr(it["image"][0]), label, pred, cohort.classes,
                                                   f"{sid} (site {s.site}, {s.split})",
                                                   spacing=F.voxel_spacing(it["image"])),
                      f"Subject {sid}: prediction vs ground truth, axial / coronal / sagittal.")
    b.add("overlays", body)


def _ledger_rows(run_dir: Path) -> tuple[dict[str, list[dict]], dict[str, tuple[float, float]]]:
    """Per-site ε rows and budgets from privacy.sqlite ledgers (read-only)."""
    rounds: dict[str, list[dict]] = {}
    budgets: dict[str, tuple[float, float]] = {}
    for db in ledgers_in(run_dir):
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                for site, eps, delta in con.execute("SELECT site, epsilon, delta FROM budgets"):
                    budgets[site] = (float(eps), float(delta))
                for site, r, eps, delta in con.execute("SELECT site, round, epsilon, delta FROM rounds ORDER BY round"):
                    rounds.setdefault(site, []).append({"round": int(r), "epsilon": float(eps), "delta": float(delta)})
        except sqlite3.Error:
            continue
    return rounds, budgets


def _ledger_status(run_dir: Path) -> dict[str, dict]:
    """Per site: the ledger's ε and whether it is a guarantee (secret-key noise throughout)."""
    out: dict[str, dict] = {}
    for db in ledgers_in(run_dir):
        try:
            for row in BudgetLedger(db).status():
                out[row["site"]] = row
        except PrivsegError:
            continue
    return out


def _privacy_section(b: Builder, src: Source) -> None:
    eps: dict[str, list[tuple[float, float]]] = {}
    delta = None
    state_rounds = src.data.get("rounds", []) if src.kind == "federated" else []
    for e in state_rounds:
        for site, m in (e.get("train") or {}).items():
            if m.get("dp-epsilon") is not None:
                eps.setdefault(site, []).append((e["round"], float(m["dp-epsilon"])))
                delta = m.get("dp-delta", delta)
    ledger, budgets = _ledger_rows(src.run_dir) if src.run_dir else ({}, {})
    for site, rows in ledger.items():
        if site not in eps:
            eps[site] = [(r["round"], r["epsilon"]) for r in rows]
            delta = delta or (rows[-1]["delta"] if rows else None)
    if not eps:
        return
    eps = dict(sorted(eps.items()))
    body = b.fig("epsilon_per_round", F.epsilon_per_round(eps, {s: v[0] for s, v in budgets.items()}, delta),
                 "ε spent per site after each round (patient-level accounting; dotted: the site's budget).")
    dice_eps: dict[str, list[tuple[float, float]]] = {}
    for e in state_rounds:
        for site, m in ((e.get("eval") or {}).get("sites") or {}).items():
            spent = dict(eps.get(site, [])).get(e["round"])
            if spent is not None and m.get("mean-dice") is not None:
                dice_eps.setdefault(site, []).append((spent, float(m["mean-dice"])))
    if dice_eps:
        body += b.fig("dice_vs_epsilon", F.dice_vs_epsilon(dict(sorted(dice_eps.items())), delta),
                      "Each site's evaluation Dice against the ε it had spent by that round.")
    status = _ledger_status(src.run_dir) if src.run_dir else {}
    rows = []
    for site, pts in eps.items():
        bud = budgets.get(site)
        st = status.get(site)  # the ledger's total (erasure runs included) is the statement, not the last round
        spent = st["epsilon_spent"] if st else pts[-1][1]
        rows.append([site, len(pts), spent, bud[0] if bud else None, (bud[0] - spent) if bud else None,
                     delta if delta is not None else (bud[1] if bud else None),
                     st["guarantee"] if st else "NOT PRIVATE: no ledger for this site"])
    body += "<h3>Per-site budget</h3>" + table(["site", "rounds", "ε spent", "ε budget", "ε remaining", "δ",
                                                "guarantee"], rows)
    b.add("privacy", body)


def _find_retrain(src: Source, forget: Sequence[str], original: str | None) -> Path | None:
    if src.run_dir is None:
        return None
    for cand in sorted(src.run_dir.parent.glob("*/unlearned.pt"))[:50]:
        if src.checkpoint is not None and cand.resolve() == src.checkpoint.resolve():
            continue
        un = _checkpoint_meta(cand).get("extra", {}).get("unlearn", {})
        if un.get("strategy") == "retrain" and set(un.get("forgotten", [])) == set(forget):
            if original is None or Path(un.get("source", "")).resolve() == Path(original).resolve():
                return cand
    return None


def _unlearn_section(b: Builder, src: Source, cohort, subjects: Sequence[str] | None) -> None:
    r = src.data
    req = r.get("request", {})
    forget = list(req.get("forget", []))
    models = {k: r[k] for k in ("original", "unlearned", "retrain") if isinstance(r.get(k), dict)}
    info = {"strategy": r.get("strategy"), "fix decoder": r.get("fix_decoder"), "target": r.get("target"),
            "forgotten subjects": ", ".join(forget), "retain subjects": len(req.get("retain", [])),
            "test subjects": len(req.get("test", [])), "epochs": r.get("epochs"), "steps run": r.get("steps_run"),
            "stopped early": r.get("stopped_early"), "strategy time (s)": r.get("seconds"),
            "speed-up over retrain": r.get("speedup"),
            "|forget Dice − retrain's|": r.get("forget_dice_distance_to_retrain"),
            "retain Dice / retrain's": r.get("retain_dice_ratio"), "original checkpoint": req.get("checkpoint")}
    body = kv_table({k: v for k, v in info.items() if v is not None})
    if models:
        cols = ["model", "retain Dice", "forget Dice", "test Dice", "retain MAE", "forget MAE", "Dice gap",
                "MAE gap", "MIA AUC", "AUC 95% CI"]
        rows = [[n, m["retain"]["dice"], m["forget"]["dice"], m["test"]["dice"], m["retain"]["mae"],
                 m["forget"]["mae"], m.get("dice_gap"), m.get("mae_gap"), (m.get("mia") or {}).get("auc"),
                 (m.get("mia") or {}).get("ci")] for n, m in models.items()]
        for key, label in (("vs_original", "unlearned − original"), ("vs_retrain", "unlearned − retrain")):
            d = r.get(key)
            if d:
                rows.append([label, d.get("retain_dice"), d.get("forget_dice"), d.get("test_dice"),
                             d.get("retain_mae"), d.get("forget_mae"), d.get("dice_gap"), d.get("mae_gap"), None,
                             None])
        body += ("<h3>The study's table</h3><p class=\"note\">Dice gap = Dice<sub>retain</sub> − Dice<sub>forget"
                 "</sub>; MAE gap = MAE<sub>forget</sub> − MAE<sub>retain</sub>. The gold standard is the "
                 "retrained model: forget Dice near retrain's, not near 0; MIA AUC near 0.5.</p>")
        body += table(cols, rows, sum_rows=sum(1 for k in ("vs_original", "vs_retrain") if r.get(k)))
        body += b.fig("unlearn_groups", F.study_bars(models), "Mean Dice of retain, forget and unseen test "
                      "subjects under each model.")
        per = {}
        for n, m in models.items():
            for s in m["forget"].get("subjects", []):
                per.setdefault(s["id"], {})[n] = s["dice"]
        if per:
            body += "<h3>Forgotten subjects</h3>" + table(["subject", *[f"Dice {n}" for n in models]],
                                                          [[i, *[v.get(n) for n in models]] for i, v in per.items()])
    if r.get("checks"):
        body += b.fig("forgetting_curve", F.forgetting_curve(r["checks"]),
                      "Forget subjects' Dice, unseen subjects' Dice and membership AUC at each check.")
    # Figures that need the volumes and the models.
    orig = Path(req.get("checkpoint", "")) if req.get("checkpoint") else None
    ckpts = {"original": orig if orig and orig.is_file() else None, "unlearned": src.checkpoint,
             "retrain": _find_retrain(src, forget, req.get("checkpoint"))}
    ckpts = {k: v for k, v in ckpts.items() if v is not None}
    if cohort is not None and ckpts and forget:
        loaded = {k: _model(v) for k, v in ckpts.items()}
        cfg = next(iter(loaded.values()))[0]
        show = [s for s in (subjects or []) if s in forget] or forget[:1]
        members = [i for i in req.get("retain", [])]
        nonmembers = [i for i in req.get("test", [])]
        items = _items(cohort, list(dict.fromkeys([*show, *forget, *members, *nonmembers])), cfg.get("spacing"))
        for sid in show:
            it = items[sid]
            preds = {k: _predict(m, c, it) for k, (c, m) in loaded.items()}
            body += b.fig(f"forgotten_{sid}", F.side_by_side(
                _arr(it["image"][0]), _arr(it["label"][0]).astype(int) if "label" in it else None, preds,
                cohort.classes, f"Forgotten subject {sid}: before / after / retrain",
                spacing=F.voxel_spacing(it["image"])),
                f"Forgotten subject {sid} under each model (outline: ground truth).")
        scores = {}
        for k, (c, m) in loaded.items():
            groups = {"members": members, "non-members": nonmembers, "forgotten": forget}
            scores[k] = {g: [row["loss"] for row in subject_statistics(m, [items[i] for i in ids], c["patch_size"],
                                                                       c["num_classes"], views=1)]
                         for g, ids in groups.items() if ids}
        body += b.fig("mia_scores", F.mia_distributions(scores, "mean voxel cross-entropy (nats)"),
                      "Membership statistic per subject: members = retain (trained on), non-members = test "
                      "(never trained on), forgotten = the erased subjects. Forgotten subjects should look like "
                      "non-members after unlearning, as under the retrained model.")
    elif cohort is None:
        body += '<p class="note">Cohort not found: images, side-by-side and MIA distributions omitted ' \
                "(give --cohort).</p>"
    b.add("unlearning", body)


def _study_section(b: Builder, data: dict) -> None:
    keys = ["retain_dice", "forget_dice", "test_dice", "retain_mae", "forget_mae", "dice_gap", "mae_gap", "mia_auc",
            "time_ratio"]
    rows = []
    for s in data.get("summary", []):
        rows.append([s.get("strategy"), s.get("fix_decoder"), s.get("target"), s.get("epochs"), s.get("n"),
                     *[(s.get(k) or {}).get("mean") if isinstance(s.get(k), dict) else s.get(k) for k in keys]])
    body = table(["strategy", "fix decoder", "target", "epochs", "n", *keys], rows, left=3)
    if data.get("best"):
        body += "<h3>Best</h3>" + kv_table(data["best"])
    if data.get("study_finding"):
        body += "<h3>Study finding</h3>" + kv_table(data["study_finding"])
    b.add("study", body)


def _erasure_section(b: Builder, run_dir: Path | None) -> None:
    """Erasure requests of a federated run (``erasure/ledger.db``): chain status, one row per
    request with its verification evidence, and where its certificate is."""
    if run_dir is None or not (run_dir / "erasure" / "ledger.db").is_file():
        return
    path = run_dir / "erasure" / "ledger.db"
    try:
        ledger = ErasureLedger(path, create=False)
        ok, problems = ledger.verify()
        reqs = [summarise(ledger.entries(r["request"])) for r in ledger.requests()]
    except PrivsegError as exc:
        b.add("erasure", f"<p>Erasure ledger unreadable: {html.escape(str(exc))}</p>")
        return
    rows = []
    for s in reqs:
        v = s["verification"] or {}
        ev = {k: v.get(k) or {} for k in ("before", "after", "retrain")}
        cert = run_dir / "erasure" / f"{s['request']}.html"
        rows.append([s["request"], s["kind"], s["site"], ", ".join(s["subjects"]) or "all", s["status"],
                     {True: "pass", False: "FAIL"}.get(v.get("passed"), "-"),
                     ev["before"].get("mia_auc"), ev["after"].get("mia_auc"), ev["retrain"].get("mia_auc"),
                     ev["before"].get("retain_dice"), ev["after"].get("retain_dice"),
                     str(cert.relative_to(run_dir)) if cert.is_file() else "privseg erase certificate"])
    body = (f"<p>Ledger <code>{html.escape(str(path))}</code>: hash chain "
            f"{'intact' if ok else 'BROKEN: ' + html.escape('; '.join(problems))}, {len(reqs)} request(s).</p>"
            + table(["request", "kind", "site", "subjects", "status", "verification", "MIA before", "MIA after",
                     "MIA retrain", "retain Dice before", "retain Dice after", "certificate"], rows, left=6))
    b.add("erasure", body)


def _personalisation_section(b: Builder, run_dir: Path | None) -> None:
    """Per site: test Dice of the global, personalised and local-only models and the model it
    serves (``personalisation.json``; :mod:`privseg.report.served`)."""
    view = served_view(run_dir) if run_dir is not None else None
    if not view:
        return
    rows = [[r["site"], *(r["dice"][m] for m, _ in view["columns"]), r["serves_label"], r["val_dice"], r["note"]]
            for r in view["rows"]]
    after = f", personalised again after erasure {view['erasure']}" if view.get("erasure") else ""
    b.add("personalisation", f"<p>Each site serves the model that is best on its own validation patients; the "
          f"figures are test Dice (global round {view['global_round']}{html.escape(after)}).</p>"
          + table(["site", *(f"{lab} Dice" for _, lab in view["columns"]), "serves", "its validation Dice", "note"],
                  rows))


# -- the report -------------------------------------------------------------------------------
def _federated_curves(b: Builder, src: Source) -> str:
    """A federated run's loss and Dice per site and round, and the table of rounds."""
    body = ""
    rounds = src.data.get("rounds", [])
    loss = {}
    dice = {}
    overall = []
    for e in rounds:
        for site, m in (e.get("train") or {}).items():
            if m.get("train-loss") is not None:
                loss.setdefault(site, []).append((e["round"], float(m["train-loss"])))
        ev = e.get("eval") or {}
        for site, m in (ev.get("sites") or {}).items():
            if m.get("mean-dice") is not None and m.get("num-examples", 1):
                dice.setdefault(site, []).append((e["round"], float(m["mean-dice"])))
        if (ev.get("overall") or {}).get("site-mean-dice") is not None:
            overall.append((e["round"], float(ev["overall"]["site-mean-dice"])))
    if loss:
        body += b.fig("loss_per_site", F.loss_curve([], dict(sorted(loss.items())), "federated round"),
                      "Mean local training loss of each site per round.")
    if dice:
        body += b.fig("dice_per_round", F.dice_per_round(dict(sorted(dice.items())), overall),
                      "Mean foreground Dice on each site's evaluation subjects after each round.")
        rows = [[e["round"], *[((e.get("eval") or {}).get("sites") or {}).get(s, {}).get("mean-dice")
                               for s in sorted(dice)], len(e.get("failed") or []), e.get("applied")]
                for e in rounds]
        body += "<h3>Rounds</h3>" + table(["round", *[f"Dice {s}" for s in sorted(dice)], "failed sites",
                                            "applied"], rows)
    return body


def _training_section(b: Builder, src: Source, ckpt_meta: dict) -> None:
    """Training curves: loss per step of a training run, or per site and round of a federated one."""
    body = ""
    if src.kind == "train" and src.run_dir is not None:
        hist = [h for h in read_metrics(src.run_dir) if "loss" in h] or ckpt_meta.get("extra", {}).get("history", [])
        if hist:
            body += b.fig("loss", F.loss_curve(hist), "Training loss per step (patch batches).")
    if src.kind == "federated":
        body += _federated_curves(b, src)
    b.add("training", body)


def _evaluated_checkpoint(src: Source) -> tuple[Path | None, str]:
    """(the checkpoint the metrics and overlays are of, a note on it): a federated run's last
    global model, otherwise the source's own checkpoint."""
    eval_ckpt, note = src.checkpoint, ""
    if src.kind == "federated" and src.run_dir is not None:
        last = src.data.get("last_checkpoint")
        eval_ckpt = src.run_dir / last if last and (src.run_dir / last).is_file() else None
        if src.data.get("strategy") == "fedbn":
            note = "Global model without the sites' own normalisation layers (FedBN keeps those at the sites)."
    return eval_ckpt, note


def _metrics_section(b: Builder, src: Source, coh, eval_ckpt: Path | None, note: str, evaluate: bool,
                     on_evaluate=None) -> None:
    """Segmentation metrics: the evaluation the source is or has beside it, recomputed with HD95
    on the cohort's test (or validation) split when ``evaluate`` and it has none
    (``on_evaluate(done, total)`` after each subject)."""
    result = None
    if src.kind == "evaluation":
        result = src.data
    elif src.run_dir is not None and (src.run_dir / "evaluation.json").is_file():
        try:
            cand = _read_json(src.run_dir / "evaluation.json")
            result = cand if _json_kind(cand) == "evaluation" else None
        except DataError:
            result = None
    needs_hd = result is None or not any("hd95" in r for r in result.get("subjects", []))
    if (evaluate and needs_hd and coh is not None and eval_ckpt is not None and src.kind != "unlearn"
            and (coh.select("test") or result is None)):
        split = "test" if coh.select("test") else "val" if coh.select("val") else None
        if split:
            with warnings.catch_warnings():  # MONAI warns on classes absent from a prediction (HD95 = NaN)
                warnings.simplefilter("ignore")
                result = evaluate_checkpoint(eval_ckpt, coh, split, with_hd95=True, on_subject=on_evaluate)
    if result is not None:
        b.add("metrics", _eval_tables(b, result, note))


def build_report(path: str | os.PathLike, out_html: str | os.PathLike, subjects: Sequence[str] | None = None,
                 cohort: str | os.PathLike | None = None, evaluate: bool = True,
                 on_evaluate: Callable[[int, int], None] | None = None) -> Path:
    """Write one self-contained HTML report of the run or result at ``path`` to ``out_html``
    (figures also as PNG in ``<stem>_files/`` beside it); returns ``out_html``.

    ``subjects``: subject IDs for the overlays (default: the first test subject of each site,
    at most three); ``cohort``: the cohort folder or manifest when the run does not record
    it; ``evaluate``: compute a per-subject evaluation (with HD95) of the run's checkpoint
    when no evaluation JSON with HD95 is in the run folder, calling ``on_evaluate(done, total)``
    after each subject (the slow part of a report)."""
    src = identify(path)
    out_html = Path(out_html)
    if out_html.exists() and out_html.is_dir():
        raise ConfigError(f"--out {out_html}: is a folder; give a file name such as report.html")
    if subjects:
        subjects = [check_id(s, "subject ID") for s in subjects]
    coh = find_cohort(src, cohort)
    if subjects and coh is not None:
        for s in subjects:
            coh.subject(s)  # ConfigError naming an unknown ID, before anything is written
    b = Builder(out_html.stem)
    ckpt_meta = _checkpoint_meta(src.checkpoint) if src.kind in ("train", "checkpoint") else {}
    _summary_section(b, src, ckpt_meta)

    sites_in_run = None
    if src.kind == "federated":
        sites_in_run = src.data.get("sites") or None
    if coh is not None:
        _cohort_section(b, coh, [s for s in sites_in_run if s in coh.sites] if sites_in_run else None)

    _training_section(b, src, ckpt_meta)
    eval_ckpt, note = _evaluated_checkpoint(src)
    _metrics_section(b, src, coh, eval_ckpt, note, evaluate, on_evaluate)

    if coh is not None and eval_ckpt is not None and src.kind != "unlearn":
        _overlay_section(b, coh, eval_ckpt, subjects)
    _privacy_section(b, src)
    if src.kind == "federated":
        _personalisation_section(b, src.run_dir)
    if src.kind == "unlearn":
        _unlearn_section(b, src, coh, subjects)
    if src.kind == "benchmark":
        _study_section(b, src.data)
    _erasure_section(b, src.run_dir)
    if coh is None and src.kind in ("train", "federated", "checkpoint", "evaluation"):
        b.sections.insert(1, ("cohort", "Cohort", '<p class="note">Cohort not found (the run does not record '
                              "it): cohort, overlays and recomputed metrics omitted. Give --cohort.</p>"))
    name = (read_run(src.run_dir) or {}).get("name") if src.run_dir else None
    title = f"privseg report: {name or src.data.get('name') or src.path.name}"
    subtitle = f"{src.kind} · {src.path} · generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    return b.write(out_html, b.render(title, subtitle))
