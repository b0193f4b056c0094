"""``export_model``: the model a run serves, written as a MONAI bundle, a TorchScript file or an ONNX
file, each with the model card and a manifest (the bundle's ``configs/metadata.json``, else
``export.json``) holding the privacy statement, the preprocessing, and the SHA-256 of every file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from privseg.audit.ledger import file_sha256
from privseg.data.transforms import ct_window
from privseg.errors import ConfigError
from privseg.export import bundle as bundle_mod
from privseg.export.card import markdown, to_html
from privseg.export.formats import FORMATS
from privseg.export.source import check_pending, cohorts_of, served_model
from privseg.export.statement import evaluation, statement
from privseg.export.verify import manifest_digest, manifest_path
from privseg.federated.config import FLConfig
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.train.inference import check_fits
from privseg.utils import versions, write_json


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out}: folder is not empty; choose another, or replace the export in it "
                              "with --force")
        if manifest_path(out) is None:  # --force replaces an export, never a folder of other files
            raise ConfigError(f"--out {out}: folder is not empty and holds no privseg export, so --force does not "
                              "replace it; choose an empty folder")


def _model(payload: dict, checkpoint: Path) -> torch.nn.Module:
    try:
        return model_from_checkpoint(payload, checkpoint).eval()
    except ConfigError as exc:  # the registry does not know the network (weights that do not fit: CheckpointError)
        raise ConfigError(f"{checkpoint}: network {payload['config'].get('model')!r} is not supported for export "
                          f"({exc})") from None


def _modality(cohorts, config: dict, window, chosen: str | None) -> str:
    """The modality whose preprocessing the export records: the sites' one, or ``chosen`` where sites
    with differently preprocessed modalities trained the model."""
    mods = sorted({s.modality for _, _, subjects in cohorts for s in subjects})
    if chosen is not None:
        return chosen
    pipelines = {m: bundle_mod.preprocessing(m, config, window) for m in mods}
    if len({repr(p) for p in pipelines.values()}) > 1:
        raise ConfigError(f"the model trained on modalities {', '.join(mods)}, which privseg preprocesses "
                          "differently; an export records one: give it with --modality")
    return mods[0]


def _label_values(cohort) -> list[int]:
    """The label value written for each class (a 2D dataset's own mask values, e.g. 0/255)."""
    values = list(range(cohort.num_classes))
    label_map = cohort.info.get("label_map") or {}
    inverse = {int(v): int(k) for k, v in label_map.items()}
    return [inverse.get(c, c) for c in values] if len(inverse) == len(label_map) else values


def _training(served, config: dict) -> dict:
    """The training settings the card lists (a federated run's strategy and rounds too)."""
    out = {"kind": served.kind} | {k: config.get(k) for k in ("model", "norm", "patch_size", "subjects_per_step",
                                                                "patches_per_subject", "lr", "spacing", "seed")}
    if served.kind == "federated" and served.run_dir is not None:
        fl = FLConfig.load(served.run_dir)
        return out | {"strategy": fl.strategy, "rounds": served.round, "local steps per round": fl.local_steps}
    return out | {"steps": config.get("steps")}


def _write_files(tmp: Path, fmt: str, payload: dict, model: torch.nn.Module, prep: dict) -> None:
    """The format's network and its own files (``prep``: the preprocessing the export records)."""
    form = FORMATS[fmt]
    (tmp / form.network).parent.mkdir(parents=True, exist_ok=True)
    form.write_network(model, payload["config"], tmp / form.network)
    if form.own_files is not None:
        form.own_files(tmp, payload, prep)


def export_model(source: str | Path, fmt: str, out: str | Path, *, cohort: str | Path | None = None,
                 modality: str | None = None, allow_pending: bool = False, force: bool = False,
                 evaluate: bool = True) -> dict:
    """Export the model ``source`` (a run folder or a checkpoint) serves as ``fmt`` into ``out``;
    returns the manifest. Refused: a model with open or failed erasure requests (unless
    ``allow_pending``), a non-empty ``out`` (unless ``force`` and it holds an earlier export)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    _prepare_out(out, force)
    served = served_model(source)
    check_pending(served, allow_pending)
    payload = load_checkpoint(served.checkpoint)
    config = payload["config"]
    model = _model(payload, served.checkpoint)
    cohorts = cohorts_of(served, cohort)
    first = cohorts[0][1]
    check_fits(config, first, served.checkpoint)  # channels and classes, as predict checks them
    window = ct_window(first)
    modality = _modality(cohorts, config, window, modality)
    stmt = statement(served, cohorts)
    ev = evaluation(served.checkpoint, cohorts) if evaluate else {"n": 0, "note": "not evaluated at export"}
    exported_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"format": fmt, "source": str(Path(source).resolve()), "kind": served.kind,
              "cohort": str(Path(cohort).resolve()) if cohort else None, "allow_pending": allow_pending,
              "exported_at": exported_at, "privseg_version": versions().get("privseg"), "config": config,
              "modality": modality, "ct_window": list(window), "channels": first.channels, "classes": first.classes,
              "label_map": first.info.get("label_map"), "network": FORMATS[fmt].network, "evaluation": ev}
    card_meta = {"name": f"privseg {config['model']} ({config['spatial_dims']}D)", "exported_at": exported_at,
                 "privseg_version": record["privseg_version"] or "(source tree)",
                 "training": _training(served, config) | {"modality": modality, "classes": ", ".join(first.classes)}}
    md = markdown(stmt, ev, card_meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's folder is private; the export is a folder like any other
    try:
        _write_files(tmp, fmt, payload, model, {"modality": modality, "window": window, "labels": _label_values(first)})
        card = tmp / FORMATS[fmt].card
        card.parent.mkdir(parents=True, exist_ok=True)
        card.write_text(md)
        card.with_name("model_card.html").write_text(to_html(md, card_meta["name"]))
        record["files"] = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = bundle_mod.metadata(config, version="1.0.0", classes=first.classes, channels=first.channels,
                                       modality=modality, ct_window=window, statement=stmt, record=record)
        path = tmp / FORMATS[fmt].manifest
        write_json(path, manifest)
        manifest = json.loads(path.read_text())  # the digest is of what a reader reads back
        manifest["privseg"]["manifest_sha256"] = manifest_digest(manifest)
        write_json(path, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest
