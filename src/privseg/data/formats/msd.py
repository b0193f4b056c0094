"""Medical Segmentation Decathlon and nnU-Net raw (v1 and v2): ``dataset.json``, ``imagesTr/``,
``labelsTr/``."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from privseg.data.cohort import Cohort, Subject
from privseg.data.formats.common import (
    DEFAULT_SITE,
    NIFTI_SUFFIXES,
    checked_id,
    finish_cohort,
    note_problem,
    problems_noted,
    require_dir,
    strip_suffix,
    visible,
)
from privseg.data.validate import IMAGE_2D_SUFFIXES
from privseg.errors import ConfigError, DataError
from privseg.utils import read_json

LABELS_ONLY_KEYS = {"labels", "name", "description"}  # a dataset.json that only declares a NIfTI folder's classes


def is_msd(root: Path) -> bool:
    """Whether ``root`` holds an MSD / nnU-Net ``dataset.json`` (not one that only names another layout's
    labels); an unreadable one counts, so that the MSD reader says what is wrong with it."""
    path = root / "dataset.json"
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return True  # the MSD reader says what is wrong with it
    return not (isinstance(raw, dict) and "labels" in raw and set(raw) <= LABELS_ONLY_KEYS)


def msd_labels(raw: object, where: Path) -> tuple[list[str], dict[int, int] | None]:
    """Classes from ``labels``: MSD writes {"0": "background", ...}, nnU-Net v2 writes
    {"background": 0, ...}, or regions {"whole_tumor": [1, 2, 3]} whose integers are trained
    here as plain classes (named ``label<k>`` unless a key names that integer alone).
    Non-contiguous values are mapped to 0..n-1 at load time."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(where, "'labels' must be a non-empty mapping")
    names: dict[int, str] = {}
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw):  # MSD / nnU-Net v1
            names = {int(k): str(v) for k, v in raw.items()}
        else:  # nnU-Net v2
            regions: set[int] = set()
            for name, value in raw.items():
                if isinstance(value, list):
                    regions.update(int(v) for v in value)
                else:
                    names[int(value)] = str(name)
            for v in sorted(regions - set(names)):
                names[v] = f"label{v}"
    except (TypeError, ValueError):
        raise DataError(where, f"'labels' values must be integers (got {raw!r})") from None
    values = sorted(names)
    if values[0] != 0:
        raise DataError(where, f"'labels' must start at 0 (background) with no negative values, got {values}")
    label_map = None if values == list(range(len(values))) else {v: i for i, v in enumerate(values)}
    return [names[v] for v in values], label_map


def _msd_modality(channels: list[str]) -> str:
    """nnU-Net treats a channel named CT with a CT window; photographs are 'rgb_to_0_1'."""
    upper = [c.upper() for c in channels]
    if "CT" in upper:
        return "CT"
    if all(c == "RGB_TO_0_1" for c in upper):
        return "RGB"
    return "MR"


def read_msd(
    root: str | Path,
    site_pattern: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.25,
) -> Cohort:
    """MSD (``modality`` + ``training`` list, a multi-modal case is one 4D NIfTI with channels
    last), nnU-Net v1 (same JSON, files split into ``<case>_XXXX``) and nnU-Net v2
    (``channel_names``, ``file_ending``, cases found by listing ``imagesTr``).

    The site of a case is the training entry's ``"site"`` field if present, else the first
    group of ``site_pattern`` matched against the case name (e.g. ``r"^(\\w+?)_"``), else
    ``site1``. Its patient is the entry's ``"patient"`` field if present (a privseg extension:
    neither format records patients), else the case itself. Only labelled training cases are
    read; ``imagesTs`` has no labels."""
    root = require_dir(root)
    ds_path = root / "dataset.json"
    ds = read_json(ds_path, "dataset.json (an MSD / nnU-Net dataset needs it)")
    if not isinstance(ds, dict):
        raise DataError(ds_path, "must hold a JSON object")
    chan_raw = ds.get("channel_names", ds.get("modality"))
    if not isinstance(chan_raw, dict) or not chan_raw:
        raise DataError(ds_path, "has neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD) as a mapping")
    try:
        chan_items = sorted((int(k), str(v)) for k, v in chan_raw.items())
    except ValueError:
        raise DataError(ds_path, f"channel keys must be '0', '1', ... (got {list(chan_raw)})") from None
    if [k for k, _ in chan_items] != list(range(len(chan_items))):
        raise DataError(ds_path, f"channel keys must be 0..n-1 (got {[k for k, _ in chan_items]})")
    channels = [name for _, name in chan_items]
    if "labels" not in ds:
        raise DataError(ds_path, "has no 'labels'")
    classes, label_map = msd_labels(ds["labels"], ds_path)
    ending = str(ds.get("file_ending", ".nii.gz"))
    if ending.lower() not in NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES:
        raise DataError(ds_path, f"file_ending {ending!r} is not supported (NIfTI or a 2D image type)")
    spatial_dims = 2 if ending.lower() in IMAGE_2D_SUFFIXES else 3
    pattern = None
    if site_pattern is not None:
        try:
            pattern = re.compile(site_pattern)
        except re.error as exc:
            raise ConfigError(f"site_pattern {site_pattern!r} is not a regular expression ({exc})") from None
        if pattern.groups < 1:
            raise ConfigError(f"site_pattern {site_pattern!r} needs a group, e.g. r'^(\\w+?)_'")

    def site_of(case: str, entry: dict, where: Path) -> str:
        if "site" in entry:
            return checked_id(str(entry["site"]), ds_path, f"site of case {case}")
        if pattern is not None:
            m = pattern.search(case)
            if not m or not m.group(1):
                raise DataError(where, f"case name {case!r} does not match site_pattern {site_pattern!r}")
            return checked_id(m.group(1), where, "site ID")
        return DEFAULT_SITE

    modality = _msd_modality(channels)
    before = problems_noted()
    if isinstance(ds.get("training"), list) and ds["training"]:
        subjects, in_file = _msd_listed(root, ds_path, ds["training"], channels, ending, modality, site_of)
    else:
        subjects, in_file = _msd_scanned(root, channels, ending, modality, site_of), False
    n_declared = ds.get("numTraining")
    # a case skipped for another (already listed) problem would make this count misleading
    if isinstance(n_declared, int) and n_declared != len(subjects) and problems_noted() == before:
        raise DataError(ds_path, f"numTraining is {n_declared} but {len(subjects)} training cases were found")
    if not subjects:
        raise DataError(ds_path, "no training case could be read")
    info: dict = {"layout": "msd" if "modality" in ds and "channel_names" not in ds else "nnunet_v2"}
    if in_file:
        info["channels_in_file"] = True
    if label_map is not None:
        info["label_map"] = label_map
    return finish_cohort(
        subjects,
        root,
        classes=classes,
        channels=channels,
        fmt="msd",
        spatial_dims=spatial_dims,
        name=str(ds.get("name") or root.name),
        info=info,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def _inside(root: Path, rel: object, where: Path, what: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DataError(where, f"{what} must be a relative path string (got {rel!r})")
    # Lexical check, not resolve(): nnU-Net raw folders often hold symlinks to the real files.
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root):
        raise DataError(where, f"{what} {rel!r} points outside the dataset folder")
    return path


def _msd_listed(
    root: Path,
    ds_path: Path,
    entries: list,
    channels: list[str],
    ending: str,
    modality: str,
    site_of: Callable[[str, dict, Path], str],
) -> tuple[list[Subject], bool]:
    """Cases from the ``training`` list. A listed image that exists is one file (4D when there
    are several channels, MSD); one that does not is looked for as ``<case>_XXXX`` (nnU-Net v1)."""
    subjects: list[Subject] = []
    kinds: set[bool] = set()
    for k, entry in enumerate(entries):
        try:
            subjects.append(_msd_entry(root, ds_path, k, entry, channels, ending, modality, site_of, kinds))
        except DataError as exc:
            note_problem(exc)
    in_file = kinds == {True} and len(channels) > 1
    return subjects, in_file


def _msd_entry(root: Path, ds_path: Path, k: int, entry: object, channels: list[str], ending: str, modality: str,
               site_of: Callable[[str, dict, Path], str], kinds: set[bool]) -> Subject:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DataError(ds_path, f"training entry {k} must have 'image' and 'label'")
    image = _inside(root, entry["image"], ds_path, f"training entry {k} image")
    label = _inside(root, entry["label"], ds_path, f"training entry {k} label")
    case = strip_suffix(image.name, (ending.lower(),) + NIFTI_SUFFIXES)
    if case is None:
        raise DataError(image, f"does not end in {ending}")
    case = checked_id(case, image)
    if image.is_file():
        files = [image]
        kinds.add(True)
    else:
        files = [image.with_name(f"{case}_{c:04d}{ending}") for c in range(len(channels))]
        if not files[0].is_file():
            raise DataError(image, f"image of case {case} not found (nor per-channel {files[0].name})")
        for c, f in enumerate(files):
            if not f.is_file():
                raise DataError(f, f"channel {c} ({channels[c]}) of case {case} not found")
        kinds.add(False)
    if len(kinds) > 1:
        raise DataError(files[0], "mixes single-file cases with per-channel <case>_XXXX files")
    if not label.is_file():
        raise DataError(label, f"label of case {case} not found")
    patient = entry.get("patient")
    return Subject(
        id=case,
        site=site_of(case, entry, image),
        images=tuple(str(f) for f in files),
        label=str(label),
        modality=modality,
        patient_id=None if patient is None else checked_id(str(patient), ds_path, f"patient of case {case}"),
    )


_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")


def _msd_scanned(
    root: Path, channels: list[str], ending: str, modality: str, site_of: Callable[[str, dict, Path], str]
) -> list[Subject]:
    """nnU-Net v2: cases are the ``imagesTr/<case>_XXXX<ending>`` files; every case needs
    every channel and ``labelsTr/<case><ending>``, and every label needs a case."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(images_dir, "not found (dataset.json has no 'training' list, so cases come from imagesTr/)")
    cases: dict[str, dict[int, Path]] = {}
    for f in visible(images_dir):
        stem = strip_suffix(f.name, (ending.lower(),))
        if stem is None or not f.is_file():
            continue
        m = _CHANNEL_FILE.match(stem)
        if not m:
            note_problem(DataError(f, f"does not follow the nnU-Net naming <case>_XXXX{ending}"))
            continue
        chan = int(m["chan"])
        if chan >= len(channels):
            note_problem(DataError(f, f"channel {chan} is not declared in dataset.json ({len(channels)} channels)"))
            continue
        try:
            case = checked_id(m["case"], f)
        except DataError as exc:
            note_problem(exc)
            continue
        cases.setdefault(case, {})[chan] = f
    if not cases:
        raise DataError(images_dir, f"no <case>_0000{ending} images found")
    subjects = []
    for case, files in sorted(cases.items()):
        absent = [c for c in range(len(channels)) if c not in files]
        for c in absent:
            missing = images_dir / f"{case}_{c:04d}{ending}"
            note_problem(DataError(missing, f"channel {c} ({channels[c]}) of case {case} not found"))
        label = labels_dir / f"{case}{ending}"
        if not label.is_file():
            note_problem(DataError(label, f"label of case {case} not found"))
            continue
        if absent:
            continue
        first = files[0]
        subjects.append(
            Subject(
                id=case,
                site=site_of(case, {}, first),
                images=tuple(str(files[c]) for c in range(len(channels))),
                label=str(label),
                modality=modality,
            )
        )
    for f in visible(labels_dir):
        stem = strip_suffix(f.name, (ending.lower(),))
        if stem is not None and stem not in cases:
            note_problem(DataError(f, f"label has no image {stem}_0000{ending} in imagesTr/"))
    return subjects

