"""Writing the embedded cohort to disk: byte-reproducible NIfTI and PNG files, the MSD
``dataset.json``, and the ``cohort.json`` manifest, all built in a temporary sibling folder and
renamed into place, so an interrupted run leaves nothing half-written and a rerun may only
replace a cohort this package wrote."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from privseg.data.cohort import MANIFEST_NAME, Cohort, Subject, assign_splits
from privseg.errors import ConfigError
from privseg.utils import atomic_path

# Recorded in every manifest; a folder is only replaced when its manifest names this generator.
# The value is the historical module path, kept so cohorts written before the split stay replaceable.
GENERATOR = "privseg.data.synth"
FORMAT_VERSION = 1


def nifti_bytes(array: np.ndarray, affine: np.ndarray, is_label: bool) -> bytes:
    """Gzipped NIfTI-1 with mtime 0, so the same arrays give byte-identical files."""
    data = array.astype(np.uint8 if is_label else np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if is_label:
        img.header["cal_min"], img.header["cal_max"] = 0, int(data.max())
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)  # noise barely compresses: be fast


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` as PNG bytes, unoptimised (fast, and the same bytes for the same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _is_previous_cohort(folder: Path) -> bool:
    """True when every file in ``folder`` belongs to a cohort this module wrote: replacing it loses nothing."""
    manifest = folder / MANIFEST_NAME
    try:
        raw = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(raw, dict) or not isinstance(raw.get("info"), dict) or raw["info"].get("generator") != GENERATOR:
        return False
    known = {MANIFEST_NAME, "dataset.json"}
    for s in raw.get("subjects", []):
        if isinstance(s, dict):
            known.update(str(p) for p in s.get("images", []) if isinstance(p, str))
            if isinstance(s.get("label"), str):
                known.add(s["label"])
    for path in folder.rglob("*"):
        if path.is_file() or path.is_symlink():
            if str(path.relative_to(folder)) not in known:
                return False
    return True


def check_out(out: Path) -> Path:
    """The output folder, resolved; refused when it is a file or holds anything but a cohort this module wrote."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_cohort(out):
        raise ConfigError(
            f"--out {out}: folder is not empty and is not a cohort privseg generated; "
            "choose an empty or new folder (nothing was written)"
        )
    return out


class _Staging:
    """Build the cohort in a hidden sibling folder, then swap it in, so ``out`` is either the old
    cohort or the complete new one, never a mixture."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        trash = None
        if self.out.is_dir():
            if any(self.out.iterdir()):
                trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
                os.rmdir(trash)
                os.rename(self.out, trash)
            else:
                os.rmdir(self.out)
        try:
            os.rename(self.tmp, self.out)
        except OSError:
            if trash is not None:
                os.rename(trash, self.out)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _ids(site: int, subjects: int, prefix: str = "H") -> list[str]:
    """Subject IDs: H1S01 ... for a hospital's patients, P1S01 ... for public data's."""
    width = max(2, len(str(subjects)))
    return [f"{prefix}{site + 1}S{j + 1:0{width}d}" for j in range(subjects)]


def write_subject_files(root: Path, sid: str, site_index: int, img_rel: str, lab_rel: str, image: bytes, label: bytes,
                   modality: str, spacing: tuple[float, ...] | None) -> Subject:
    """Write one subject's image and label files under ``root`` and return its manifest row."""
    write_file(root / img_rel, image)
    write_file(root / lab_rel, label)
    return Subject(id=sid, site=f"H{site_index + 1}", images=(str(root / img_rel),), label=str(root / lab_rel),
                   modality=modality, spacing=spacing)


def msd_dataset_json(rows: Sequence[Subject], classes: Sequence[str], channel: str) -> bytes:
    """The MSD ``dataset.json``: every subject is labelled and listed under "training"; the split
    lives in the manifest."""
    dataset = {
        "name": "privseg-synth",
        "description": "Synthetic multi-site brain cohort from the MNI152 2009c templates (privseg)",
        "tensorImageSize": "3D",
        "reference": "MNI ICBM152 2009c nonlinear symmetric, via nilearn",
        "licence": "see the MNI ICBM152 template licence",
        "modality": {"0": channel},
        "channel_names": {"0": channel},
        "labels": {str(k): c for k, c in enumerate(classes)},
        "numTraining": len(rows),
        "numTest": 0,
        "file_ending": ".nii.gz",
        "training": [
            {"image": f"./imagesTr/{s.id}.nii.gz", "label": f"./labelsTr/{s.id}.nii.gz"} for s in rows
        ],
        "test": [],
        "privseg": {"sites": {s.id: s.site for s in rows}, "modalities": {s.id: s.modality for s in rows}},
    }
    return (json.dumps(dataset, indent=2) + "\n").encode()


def write_cohort(
    out: Path,
    names: Sequence[str],
    subjects: int,
    *,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    progress: Callable[[int, int], None] | None,
    write_subject: Callable[[Path, int, str, int, str], Subject],
    manifest: Callable[[Path, list[Subject]], Cohort],
    id_prefix: str = "H",
) -> Cohort:
    """The steps every embedded cohort shares: stage, write each site's subjects (``write_subject(root,
    site_index, profile_name, subject_index, subject_id)``), assign patient-level splits, save the
    manifest ``manifest(root, rows)`` builds, swap the folder into ``out`` and read it back."""
    total = len(names) * subjects
    with _Staging(out) as root:
        rows: list[Subject] = []
        for si, name in enumerate(names):
            for j, sid in enumerate(_ids(si, subjects, id_prefix)):
                rows.append(write_subject(root, si, name, j, sid))
                if progress is not None:
                    progress(len(rows), total)
        rows = assign_splits(rows, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        manifest(root, rows).save()
    return Cohort.from_manifest(out / MANIFEST_NAME)
