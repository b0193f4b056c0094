"""Plain NIfTI folders: images and labels paired by name, optionally per site folder."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

from privseg.data.cohort import Cohort, Subject
from privseg.data.formats.common import (
    class_names,
    classes_from_labels,
    finish_cohort,
    nifti_stem,
    note_problem,
    require_dir,
    site_folders,
    visible,
)
from privseg.data.formats.msd import msd_labels
from privseg.data.formats.pairing import check_orphan_image_dir, image_ids, pair_by_name, pair_dirs
from privseg.errors import DataError
from privseg.utils import read_json

NIFTI_IMAGE_DIRS = ("images", "imgs")
NIFTI_LABEL_DIRS = ("labels", "masks", "segmentations")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")


def _nifti_files(folder: Path, pattern: str = "*") -> list[tuple[str, Path]]:
    out = []
    for f in visible(folder):
        stem = nifti_stem(f.name)
        if stem is not None and f.is_file() and fnmatch(f.name, pattern):
            out.append((stem, f))
    return out


def _has_nifti_layout(folder: Path) -> bool:
    dirs = pair_dirs(folder, NIFTI_IMAGE_DIRS, NIFTI_LABEL_DIRS)
    return bool(_nifti_files(dirs[0] if dirs else folder))


def is_nifti_folder(root: Path) -> bool:
    """Whether ``root``, or a site folder in it, holds NIfTI images (in an image folder, or loose)."""
    return bool(site_folders(root, _has_nifti_layout))


def read_nifti_folder(
    root: str | Path,
    classes: Sequence[str] | int | None = None,
    image_glob: str = "*.nii*",
    label_suffixes: Sequence[str] = LABEL_SUFFIXES,
    modality: str = "MR",
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.25,
) -> Cohort:
    """Single-channel NIfTI images and labels paired by name, in one of two arrangements:
    ``images/<id>.nii.gz`` + ``labels/<id>.nii.gz`` (also ``masks/``, ``segmentations/``, and
    label names with a suffix), or one folder of ``<id>.nii.gz`` + ``<id>_seg.nii.gz`` (any of
    ``label_suffixes``). Either may sit one level down in site folders (``<root>/<site>/``).

    ``classes`` (names, or a count; ``--classes`` on the command line) may be declared, or a
    ``dataset.json`` holding only ``"labels"`` (MSD's shape) may declare them. Otherwise they
    are background + class1..max over the values of every label file (read once per process),
    which must be contiguous: a file holding 0 and 17 only is refused, naming it, since only
    declared classes can say what 17 means. Multi-channel data fits the nnU-Net layout
    (``read_msd``) better."""
    root = require_dir(root)
    check_orphan_image_dir(root, NIFTI_IMAGE_DIRS, NIFTI_LABEL_DIRS)
    sites = site_folders(root, _has_nifti_layout)
    if not sites:
        raise DataError(
            root,
            "no NIfTI images found (looked for images/ + labels/, or <id>.nii.gz + <id>_seg.nii.gz, also per site)",
        )
    suffixes = tuple(label_suffixes)
    subjects = []
    for site, folder in sites:
        dirs = pair_dirs(folder, NIFTI_IMAGE_DIRS, NIFTI_LABEL_DIRS)
        if dirs is not None:
            image_files = _nifti_files(dirs[0], image_glob)
            label_files = _nifti_files(dirs[1])
            pair_suffixes = suffixes + ("",)
        else:
            image_files, label_files = [], []
            for stem, f in _nifti_files(folder):
                if any(stem.endswith(s) and len(stem) > len(s) for s in suffixes):
                    label_files.append((stem, f))
                elif fnmatch(f.name, image_glob):
                    image_files.append((stem, f))
            pair_suffixes = suffixes
        images = image_ids(image_files)
        if not images:
            note_problem(DataError(dirs[0] if dirs else folder, f"no NIfTI images matching {image_glob}"))
            continue
        pairs = pair_by_name(images, label_files, pair_suffixes, "label")
        for sid, image in images.items():
            if sid in pairs:
                subjects.append(Subject(id=sid, site=site, images=(str(image),), label=str(pairs[sid]),
                                        modality=modality))
    if not subjects:
        raise DataError(root, "no NIfTI image with a label could be read")
    info: dict = {"classes_inferred": classes is None}
    if classes is not None:
        names = class_names(classes)
    elif (root / "dataset.json").is_file():  # a dataset.json holding only "labels" declares them
        ds = read_json(root / "dataset.json", "dataset.json")
        names, label_map = msd_labels(ds.get("labels") if isinstance(ds, dict) else None, root / "dataset.json")
        info["classes_inferred"] = False
        if label_map is not None:
            info["label_map"] = label_map
    else:
        names = classes_from_labels([Path(s.label) for s in subjects if s.label])
    return finish_cohort(
        subjects,
        root,
        classes=names,
        channels=["image"],
        fmt="nifti",
        info=info,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
