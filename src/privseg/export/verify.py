"""Checking an export after the fact, and running it without MONAI's runner.

:func:`verify_export` says whether an export's statement still holds: every file it lists has the
SHA-256 it had at export (a changed byte in ``models/model.pt`` fails, naming the file), the run
still serves the model that was exported, and the privacy statement recomputed from the run's
ledgers now equals the one written at export. :func:`predict_export` segments an image with the
exported network and privseg's preprocessing, writing the label map as ``privseg predict`` does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from privseg.audit.ledger import canonical, file_sha256
from privseg.data.cohort import Cohort, Subject
from privseg.data.transforms import load_subject, preprocess
from privseg.errors import CheckpointError, ConfigError, DataError, PrivsegError
from privseg.export.formats import FORMATS
from privseg.export.source import cohorts_of, served_model
from privseg.export.statement import statement
from privseg.train.inference import predict_probs, predict_subject, write_mask_2d, write_prediction


def manifest_path(out: Path) -> Path | None:
    """The manifest of an export folder (None when the folder is no export)."""
    for name in dict.fromkeys(f.manifest for f in FORMATS.values()):
        if (out / name).is_file():
            return out / name
    return None


def read_manifest(export_dir: str | Path) -> tuple[Path, dict]:
    """(path, content) of an export's manifest; a DataError naming the folder when there is none."""
    d = Path(export_dir)
    path = manifest_path(d) if d.is_dir() else None
    if path is None:
        raise DataError(d, "not a privseg export (no configs/metadata.json or export.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(path, f"unreadable export manifest ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("privseg"), dict) or "privacy" not in data:
        raise DataError(path, "not a privseg export manifest (no 'privseg' record or 'privacy' statement)")
    record, stated = data["privseg"], data["privacy"]
    shapes = {"privseg.files": isinstance(record.get("files"), dict) and all(
                  isinstance(k, str) and isinstance(v, str) for k, v in record["files"].items()),
              "privseg.network": record.get("network") in record.get("files", {}),
              "privseg.config": isinstance(record.get("config"), dict),
              "privacy.model": isinstance(stated, dict) and isinstance(stated.get("model"), dict)}
    bad = [k for k, ok in shapes.items() if not ok]
    if bad:
        raise DataError(path, f"malformed export manifest (field {', '.join(bad)})")
    return path, data


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest as read back from its file, without this digest itself: an edit of the
    manifest after export (its statement, preprocessing or file list) changes it."""
    rest = {**manifest, "privseg": {k: v for k, v in manifest["privseg"].items() if k != "manifest_sha256"}}
    return hashlib.sha256(canonical(rest).encode()).hexdigest()


def changed_files(export_dir: Path, record: dict) -> list[str]:
    """One problem per listed file that is missing or whose SHA-256 differs from the export's."""
    problems = []
    for rel, digest in sorted((record.get("files") or {}).items()):
        p = export_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing (listed in the export)")
        elif file_sha256(p) != digest:
            problems.append(f"{p}: changed since export (SHA-256 {file_sha256(p)[:16]}..., exported "
                            f"{digest[:16]}...)")
    return problems


def _differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(old, float) and isinstance(new, float) and abs(old - new) <= 1e-12 * max(1.0, abs(old)):
        return []
    return [] if old == new else [f"{where}: {json.dumps(old, default=str)[:120]} at export, now "
                                  f"{json.dumps(new, default=str)[:120]}"]


def verify_export(export_dir: str | Path, run: str | Path | None = None) -> dict:
    """``{"ok", "problems", "checked"}`` for an export (see the module docstring). ``run``: the run
    folder when it moved since the export (default: the source recorded, a run or a checkpoint)."""
    d = Path(export_dir)
    path, manifest = read_manifest(d)
    record, stated = manifest["privseg"], manifest["privacy"]
    problems = changed_files(d, record)
    if record.get("manifest_sha256") != manifest_digest(manifest):
        problems.append(f"{path}: changed since export (its content no longer matches its recorded SHA-256)")
    checked = [f"{len(record.get('files') or {})} file hashes and the manifest's"]
    exported = stated["model"]
    if not exported.get("run") and not run:
        checked.append("no run: the statement (a bare checkpoint's) was not recomputed")
        return {"ok": not problems, "problems": problems, "checked": checked, "manifest": str(path)}
    try:
        served = served_model(Path(run) if run else Path(str(record.get("source"))))  # the run, or the checkpoint
    except (DataError, CheckpointError) as exc:
        return {"ok": False, "problems": [*problems, f"the run cannot be read: {exc}"], "checked": checked,
                "manifest": str(path)}
    ignore = {"model"}  # compared below; the run folder may have moved
    try:
        cohorts = cohorts_of(served, record.get("cohort"))
    except PrivsegError as exc:  # the data is not on this machine: the ledgers still are
        cohorts, ignore = [], {"model", "sites"}
        checked.append(f"patients per site not rechecked (the cohorts cannot be read: {exc})")
    now = statement(served, cohorts)
    checked.append(f"privacy statement recomputed from {served.run_dir}")
    if now["model"]["sha256"] != exported.get("sha256"):
        problems.append(f"{served.run_dir}: the run now serves {now['model']['path']} (SHA-256 "
                        f"{now['model']['sha256'][:16]}...), not the exported model ({exported.get('path')}, "
                        f"{str(exported.get('sha256'))[:16]}...)")
    problems += [f"{path}: privacy statement no longer holds: {p}"
                 for p in _differences({k: v for k, v in stated.items() if k not in ignore},
                                       {k: v for k, v in now.items() if k not in ignore})]
    return {"ok": not problems, "problems": problems, "checked": checked, "manifest": str(path)}


def _network(d: Path, record: dict):
    """The exported network, after checking its file (and the bundle's weights) against the export."""
    form = FORMATS.get(record.get("format"))
    if form is None:
        raise DataError(f"{d}: the manifest names export format {record.get('format')!r}, not one of "
                        f"{', '.join(FORMATS)}")
    wanted = [record["network"], *([form.weights] if form.weights else [])]
    bad = [p for p in changed_files(d, {"files": {k: v for k, v in record["files"].items() if k in wanted}})]
    if bad:
        raise CheckpointError("; ".join(bad))
    if form.read_network is None:
        return None  # privseg runs the format's weights (the bundle's models/model.pt) with its own network code
    return form.read_network(d / record["network"])


def export_cohort(record: dict, images: list[str | Path]):
    """A one-subject cohort for ``images`` (one file per channel), described as the export records it."""
    config = record["config"]
    info = {"ct_window": record["ct_window"], **({"label_map": record["label_map"]} if record["label_map"] else {})}
    subject = Subject(id="image", site="export", images=tuple(str(Path(i)) for i in images), label=None,
                      modality=record["modality"], split="test")
    return Cohort(subjects=[subject], classes=record["classes"], channels=record["channels"],
                  spatial_dims=int(config["spatial_dims"]), name="export", info=info)


def predict_export(export_dir: str | Path, images: list[str | Path], out: str | Path) -> Path:
    """Segment ``images`` (one file per channel) with an export and write the label map as
    ``privseg predict`` does (NIfTI in the input's space, or a PNG mask)."""
    d = Path(export_dir)
    path, manifest = read_manifest(d)
    record = manifest["privseg"]
    if record.get("manifest_sha256") != manifest_digest(manifest):  # it says how to preprocess: trust it unedited
        raise CheckpointError(f"{path}: changed since export (its content no longer matches its recorded SHA-256)")
    if not images:
        raise ConfigError("--image: give the image to segment (one file per channel)")
    cohort = export_cohort(record, images)
    network = _network(d, record)
    if network is None:
        return predict_subject(d / FORMATS[record["format"]].weights, cohort, "image", out)
    config = record["config"]
    data = load_subject(cohort.subjects[0], cohort)
    item = preprocess(data, config.get("spacing"))
    probs = predict_probs(network, item["image"], config["patch_size"], device=torch.device("cpu"))
    if cohort.spatial_dims == 2:
        return write_mask_2d(probs, data.source, out, cohort.info.get("label_map"))
    return write_prediction(item, probs, data.source, out)
