"""Every copy of an erased patient's influence, and what became of it.

An erasure is only as complete as its weakest copy: a checkpoint, a stored update, a site's local
state, a reference model, a personalised model or an export written before the erasure from a
model that saw the patient still holds the patient after the served model has forgotten them.
:func:`account` lists each such file in a run folder with its fate, for the ``completed`` entry
of the erasure ledger and the first lines of the certificate:

- ``deleted``: removed by the erasure (its SHA-256 recorded before the deletion);
- ``superseded``: replaced by the erased model but still present, with the reason it was kept;
- ``kept``: still present, with the reason (e.g. a file privseg did not write for this run's
  erasures: an export or a copy someone made);
- ``retrained``: rebuilt without the patient.

What counts as a copy is decided by the file, not by a list of known layouts: every model file
(:data:`MODEL_FILES`) in the run folder written before the request was recorded, except those
known never to have seen the patient (the data-free initial model, reference models that trained
without them) and those the erasure itself wrote.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from pathlib import Path

from privseg.audit.ledger import file_sha256
from privseg.utils import SITES_DIR

MODEL_FILES = (".pt", ".pth", ".ts", ".onnx", ".safetensors", ".ckpt")
FATES = ("deleted", "superseded", "kept", "retrained")
_KINDS = (("audit/references", "reference model"), ("checkpoints", "global checkpoint"),
          ("updates", "stored update"), ("erasure", "unlearned model of an earlier attempt"))
REFERENCE_NOTE = "trained on the patient; `privseg audit references` retrains it without them"


def kind_of(rel_path: str) -> str:
    """What a run-folder file is, from where it lies (for the certificate's reader)."""
    parts = Path(rel_path).parts
    low = rel_path.lower()
    if "export" in low or "bundle" in low or Path(rel_path).suffix in (".onnx", ".ts"):
        return "export"
    if parts and parts[0] == SITES_DIR:
        return "personalised model" if "personal" in low else "site state"
    for prefix, name in _KINDS:
        if rel_path.startswith(prefix + "/"):
            return name + ("'s scores" if Path(rel_path).name == "scores.json" else "")
    return "checkpoint"


def copy_entry(rel_path: str, sha256: str | None, fate: str, reason: str = "") -> dict:
    return {"path": rel_path, "sha256": sha256, "what": kind_of(rel_path), "fate": fate, "reason": reason}


def _before(path: Path, since: str) -> bool:
    t = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    return t < dt.datetime.fromisoformat(since)


def model_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).rglob("*") if p.is_file() and p.suffix in MODEL_FILES)


def account(run_dir: str | Path, since: str, *, deleted: Sequence[dict] = (), superseded: Sequence[dict] = (),
            never_saw: Iterable[str | Path] = (), written: Iterable[str | Path] = (),
            notes: dict[str, str] | None = None, personal: Sequence[dict] = ()) -> list[dict]:
    """The copies of one erasure in ``run_dir``: ``deleted`` and ``superseded`` (``{"path",
    "sha256"[, "reason"]}``, paths relative to the run folder) with those fates, then every other
    model file written before ``since`` (the ISO time the request was recorded) as ``kept``, except
    ``never_saw`` (files that never held the patient) and ``written`` (the erasure's own output).
    ``notes``: the reason shown for a deleted path (default by kind). ``personal``: the
    personalised models the erasure redid or deleted (entries of :func:`copy_entry`'s fields, from
    :mod:`privseg.erasure.personalised`), listed as given."""
    run_dir = Path(run_dir)
    notes = notes or {}
    out = [copy_entry(a["path"], a.get("sha256"), "deleted", notes.get(a["path"], a.get("reason", "")))
           for a in deleted]
    out += [copy_entry(a["path"], a.get("sha256"), "superseded", a.get("reason", "")) for a in superseded]
    out += [{**copy_entry(a["path"], a.get("sha256"), a["fate"], a.get("reason", "")),
             **({"what": a["what"]} if a.get("what") else {})} for a in personal]
    listed = {a["path"] for a in out}
    skip = {_rel(run_dir, p) for p in (*never_saw, *written)}
    for p in model_files(run_dir):
        rel = _rel(run_dir, p)
        if rel in listed or rel in skip or not _before(p, since):
            continue
        out.append(copy_entry(rel, file_sha256(p), "kept", "written before the erasure from training that saw "
                              "the patient, and not deleted by it: delete it, or make it again from the erased model"))
    for a in out:
        if a["fate"] == "deleted" and not a["reason"]:
            a["reason"] = (REFERENCE_NOTE if a["what"].startswith("reference model")
                           else "superseded by the erased model")
    return out


def remaining(copies: Sequence[dict]) -> list[dict]:
    """The copies that still hold the patient (not deleted, not retrained)."""
    return [c for c in copies if c["fate"] in ("superseded", "kept")]


def _rel(run_dir: Path, p: str | Path) -> str:
    p = Path(p)
    if not p.is_absolute():
        return str(p)
    p = p.resolve()
    return str(p.relative_to(run_dir.resolve())) if p.is_relative_to(run_dir.resolve()) else str(p)
