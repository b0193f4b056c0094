"""Readers for published dataset layouts; each returns a :class:`Cohort`.

Supported layouts (docs/architecture.md, principle 4 — real data formats first):

- ``mrbrains18``: ``<root>/<id>/pre/{reg_T1,reg_IR,FLAIR}.nii.gz`` + ``<root>/<id>/segm.nii.gz``.
- ``msd``: Medical Segmentation Decathlon and nnU-Net raw (v1 and v2): ``dataset.json``,
  ``imagesTr/``, ``labelsTr/``.
- ``image2d``: 2D photographs (dermoscopy style): ``images/<id>.png|jpg`` + ``masks/<id>.png``.
- ``nifti``: a plain folder of NIfTI images and labels paired by name.

Every reader returns absolute paths with ``root`` set, and assigns patient-level splits
with :func:`assign_splits` (none of these layouts defines a labelled test split), unless a
split file pins them (``read_cohort(path, splits=FILE)``). A subject's patient is its own
ID unless the layout says otherwise (an MSD/nnU-Net ``training`` entry's ``"patient"``
field, a manifest's ``patient_id``, a split file's ``patient`` column): case names that
merely share a prefix are not taken as one patient, since no layout promises that. The
readers only look at names and, where the format leaves the classes open, at the label
files; voxel-level validation happens in :func:`privseg.data.transforms.load_subject`,
which names the file of any problem. A new format is one function decorated with
:func:`register_format`; :func:`read_cohort` detects the layout of a folder. The layouts
shipped here have one module each (``msd``, ``mrbrains18``, ``image2d``, ``nifti``; shared
helpers in ``common`` and ``pairing``) and are registered at the end of this module.

Under :func:`collect_problems` the readers note a problem with one subject and go on with
the others, so ``privseg data check`` can list every problem at once.

Subject IDs come from file or folder names and are checked, never rewritten: the ID is
the handle of an erasure request, so silently "fixing" it would make "forget patient X"
miss patient X. Hidden entries (``.DS_Store``, the ``._*`` AppleDouble files that ship
inside the MSD tarballs) and ``__MACOSX`` folders are ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privseg.data.cohort import MANIFEST_NAME, Cohort, apply_splits
from privseg.data.formats.common import (
    CLASSES_HINT,
    DEFAULT_SITE,
    NIFTI_SUFFIXES,
    class_names,
    collect_problems,
    visible,
)
from privseg.data.formats.image2d import (
    IMAGE_DIRS,
    LOSSY_SUFFIXES,
    MASK_DIRS,
    MASK_SUFFIXES,
    is_image2d,
    read_image_folder_2d,
)
from privseg.data.formats.mrbrains18 import (
    MRBRAINS18_CHANNELS,
    MRBRAINS18_CLASSES,
    MRBRAINS18_LABEL,
    MRBRAINS18_TISSUE_MAP,
    TISSUE_CLASSES,
    is_mrbrains18,
    is_mrbrains18_subject,
    read_mrbrains18,
)
from privseg.data.formats.msd import LABELS_ONLY_KEYS, is_msd, read_msd
from privseg.data.formats.nifti import (
    LABEL_SUFFIXES,
    NIFTI_IMAGE_DIRS,
    NIFTI_LABEL_DIRS,
    is_nifti_folder,
    read_nifti_folder,
)
from privseg.errors import ConfigError, DataError
from privseg.utils import registrar

Reader = Callable[..., Cohort]


@dataclass(frozen=True)
class _Detector:
    name: str
    detect: Callable[[Path], bool]
    looks_for: str


# The registry lives here, not in a submodule: callers (and tests) replace ``privseg.data.formats.FORMATS``
# and ``_DETECTORS``, so the code that reads them must look them up in this module.
FORMATS: dict[str, Reader] = {}
_DETECTORS: list[_Detector] = []


def register_format(
    name: str, detect: Callable[[Path], bool] | None = None, looks_for: str = "", before: str | None = "nifti"
) -> Callable[[Reader], Reader]:
    """Register ``reader(root, **options) -> Cohort`` under ``name``. With ``detect``
    (root -> bool) :func:`read_cohort` can pick it for a folder automatically. Detection tries
    formats in order, so a new one goes ``before`` the generic plain-NIfTI fallback by default
    (which would otherwise claim any folder holding a .nii.gz); ``before=None`` appends."""

    def wrap(reader: Reader) -> Reader:
        registrar(FORMATS, name, kind="format")(reader)
        if detect is not None:
            det = _Detector(name, detect, looks_for or name)
            names = [d.name for d in _DETECTORS]
            _DETECTORS.insert(names.index(before) if before in names else len(names), det)
        return reader

    return wrap


def read_cohort(path: str | Path, fmt: str = "auto", *, splits: str | Path | None = None,
                **options: object) -> Cohort:
    """Read a cohort from a manifest file, a folder holding ``cohort.json``, or a folder in
    one of the registered layouts; with ``splits`` (a split file, see
    :func:`privseg.data.cohort.read_splits`) the splits are the file's.

    In ``auto`` mode a manifest wins over layout detection: privseg wrote it, and it already
    says what the labels mean and which subject is in which split. ``options`` go to the
    format reader and are ignored for a manifest, except ``classes``, which must then agree
    with the manifest's."""
    cohort = _read_cohort(Path(path), fmt, options)
    return apply_splits(cohort, splits) if splits is not None else cohort


def _read_cohort(path: Path, fmt: str, options: dict) -> Cohort:
    if not path.exists():
        raise DataError(path, "not found")
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
    if path.is_file():
        if path.name == "dataset.json" and fmt in ("auto", "msd"):
            return _call(FORMATS["msd"], "msd", path.parent, options)
        if fmt != "auto":
            raise DataError(path, f"is a file; format {fmt} reads a folder")
        if path.suffix.lower() != ".json":
            hint = layout_hint(path.parent)
            raise DataError(path, f"is a file but not a cohort manifest ({MANIFEST_NAME}); give the dataset folder"
                            + (f" ({hint})" if hint else ""))
        return _manifest(path, options)
    if fmt != "auto":
        return _call(FORMATS[fmt], fmt, path, options)
    if (path / MANIFEST_NAME).is_file():
        return _manifest(path / MANIFEST_NAME, options)
    if is_mrbrains18_subject(path):  # its segm.nii.gz would otherwise pass for a plain NIfTI folder
        raise DataError(path, layout_hint(path))
    for det in _DETECTORS:
        if det.detect(path):
            return _call(FORMATS[det.name], det.name, path, options)
    looked = [f"{MANIFEST_NAME}"] + [f"{d.name}: {d.looks_for}" for d in _DETECTORS]
    hint = layout_hint(path)
    raise DataError(path, "unknown dataset layout; looked for " + "; ".join(looked) + (f". {hint}" if hint else ""))


def is_known_layout(path: str | Path) -> bool:
    """Whether :func:`read_cohort` in auto mode would pick a reader for ``path`` (without reading it)."""
    path = Path(path)
    if path.is_file():
        return True
    return path.is_dir() and ((path / MANIFEST_NAME).is_file() or any(d.detect(path) for d in _DETECTORS))


def _manifest(path: Path, options: dict) -> Cohort:
    cohort = Cohort.from_manifest(path)
    classes = options.get("classes")
    if classes is not None and class_names(classes) != cohort.classes:  # type: ignore[arg-type]
        raise ConfigError(f"--classes {','.join(class_names(classes))} differs from the classes of "  # type: ignore[arg-type]
                          f"{path} ({','.join(cohort.classes)}); the manifest already declares them")
    return cohort


def layout_hint(path: Path) -> str:
    """Name the folder to give when a known layout sits one or two levels further down (an
    archive extracted into a folder of its own, MRBrainS18's ``training/``) or up (a subject folder)."""
    if not path.is_dir():
        return ""
    if is_mrbrains18_subject(path):
        return f"this looks like one MRBrainS18 subject folder: give its parent {path.parent}"
    found = []
    for sub in visible(path)[:50]:
        if not sub.is_dir():
            continue
        for d in [sub] + [x for x in visible(sub)[:50] if x.is_dir()]:
            name = next((det.name for det in _DETECTORS if det.name != "nifti" and det.detect(d)), None)
            if name:
                found.append(f"{d} ({name})")
                break
    return ("found a known layout further down: give " + " or ".join(found[:3])) if found else ""


def _call(reader: Reader, name: str, root: Path, options: dict) -> Cohort:
    """Bind options first so a misspelt option is a ConfigError, not a TypeError from deep inside."""
    if "classes" in options and "classes" not in inspect.signature(reader).parameters:
        raise ConfigError(f"--classes: the {name} layout declares its classes itself ({root}); "
                          "--classes is for plain NIfTI and 2D image folders")
    try:
        inspect.signature(reader).bind(root, **options)
    except TypeError as exc:
        raise ConfigError(f"format {name}: {exc}") from None
    return reader(root, **options)



# Registration order is detection order: the specific layouts first, the generic plain-NIfTI folder
# last (it would otherwise claim any folder holding a .nii.gz).
register_format("msd", is_msd, "dataset.json with imagesTr/ and labelsTr/")(read_msd)
register_format("mrbrains18", is_mrbrains18,
                "<id>/pre/reg_T1.nii.gz (or reg_IR, FLAIR) + <id>/segm.nii.gz, also under training/")(read_mrbrains18)
register_format("image2d", is_image2d,
                "images/ + masks/ (or labels/) with .png/.jpg, optionally per site folder")(read_image_folder_2d)
register_format(
    "nifti", is_nifti_folder, "images/ + labels/ NIfTI, or <id>.nii.gz + <id>_seg.nii.gz, optionally per site folder"
)(read_nifti_folder)

__all__ = [
    "CLASSES_HINT", "DEFAULT_SITE", "FORMATS", "IMAGE_DIRS", "LABELS_ONLY_KEYS", "LABEL_SUFFIXES", "LOSSY_SUFFIXES",
    "MASK_DIRS", "MASK_SUFFIXES", "MRBRAINS18_CHANNELS", "MRBRAINS18_CLASSES", "MRBRAINS18_LABEL",
    "MRBRAINS18_TISSUE_MAP", "NIFTI_IMAGE_DIRS", "NIFTI_LABEL_DIRS", "NIFTI_SUFFIXES", "TISSUE_CLASSES", "Reader",
    "collect_problems", "is_known_layout", "read_cohort", "read_image_folder_2d", "read_mrbrains18", "read_msd",
    "read_nifti_folder", "register_format",
]
