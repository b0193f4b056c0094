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
:func:`register_format`; :func:`read_cohort` detects the layout of a folder.

Under :func:`collect_problems` the readers note a problem with one subject and go on with
the others, so ``privseg data check`` can list every problem at once.

Subject IDs come from file or folder names and are checked, never rewritten: the ID is
the handle of an erasure request, so silently "fixing" it would make "forget patient X"
miss patient X. Hidden entries (``.DS_Store``, the ``._*`` AppleDouble files that ship
inside the MSD tarballs) and ``__MACOSX`` folders are ignored.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from privseg.data.cohort import MANIFEST_NAME, Cohort, Subject, apply_splits, assign_splits
from privseg.data.validate import IMAGE_2D_SUFFIXES, read_volume
from privseg.errors import ConfigError, DataError
from privseg.utils import check_id, read_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_SITE = "site1"

# -- registry ---------------------------------------------------------------

Reader = Callable[..., Cohort]


@dataclass(frozen=True)
class _Detector:
    name: str
    detect: Callable[[Path], bool]
    looks_for: str


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
        if name in FORMATS:
            raise ConfigError(f"format {name!r} is already registered")
        FORMATS[name] = reader
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
            hint = _layout_hint(path.parent)
            raise DataError(path, f"is a file but not a cohort manifest ({MANIFEST_NAME}); give the dataset folder"
                            + (f" ({hint})" if hint else ""))
        return _manifest(path, options)
    if fmt != "auto":
        return _call(FORMATS[fmt], fmt, path, options)
    if (path / MANIFEST_NAME).is_file():
        return _manifest(path / MANIFEST_NAME, options)
    if _is_mrbrains18_subject(path):  # its segm.nii.gz would otherwise pass for a plain NIfTI folder
        raise DataError(path, _layout_hint(path))
    for det in _DETECTORS:
        if det.detect(path):
            return _call(FORMATS[det.name], det.name, path, options)
    looked = [f"{MANIFEST_NAME}"] + [f"{d.name}: {d.looks_for}" for d in _DETECTORS]
    hint = _layout_hint(path)
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
    if classes is not None and _class_names(classes) != cohort.classes:  # type: ignore[arg-type]
        raise ConfigError(f"--classes {','.join(_class_names(classes))} differs from the classes of "  # type: ignore[arg-type]
                          f"{path} ({','.join(cohort.classes)}); the manifest already declares them")
    return cohort


def _layout_hint(path: Path) -> str:
    """Name the folder to give when a known layout sits one or two levels further down (an
    archive extracted into a folder of its own, MRBrainS18's ``training/``) or up (a subject folder)."""
    if not path.is_dir():
        return ""
    if _is_mrbrains18_subject(path):
        return f"this looks like one MRBrainS18 subject folder: give its parent {path.parent}"
    found = []
    for sub in _visible(path)[:50]:
        if not sub.is_dir():
            continue
        for d in [sub] + [x for x in _visible(sub)[:50] if x.is_dir()]:
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


# -- shared helpers -----------------------------------------------------------


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    return root.resolve()


def _visible(folder: Path) -> list[Path]:
    """Entries of a folder, sorted, without hidden files and macOS archive debris."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX")


def _strip_suffix(name: str, suffixes: Iterable[str]) -> str | None:
    for suf in suffixes:
        if name.lower().endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return None


def _nifti_stem(name: str) -> str | None:
    return _strip_suffix(name, NIFTI_SUFFIXES)


def _image_stem(name: str) -> str | None:
    return _strip_suffix(name, IMAGE_2D_SUFFIXES)


# -- every problem, not just the first (privseg data check) ------------------------------

_PROBLEMS: ContextVar[list[DataError] | None] = ContextVar("privseg_read_problems", default=None)


@contextmanager
def collect_problems() -> Iterator[list[DataError]]:
    """Within this block readers note a problem with one subject (or one file) in the yielded
    list and skip it instead of raising, so a check can list them all; a problem that leaves
    nothing to read (no dataset.json, no subjects) still raises."""
    problems: list[DataError] = []
    token = _PROBLEMS.set(problems)
    try:
        yield problems
    finally:
        _PROBLEMS.reset(token)


def _note(exc: DataError) -> None:
    """Raise ``exc``, or under :func:`collect_problems` record it so the caller can skip the subject."""
    problems = _PROBLEMS.get()
    if problems is None:
        raise exc
    problems.append(exc)


def _noted() -> int:
    problems = _PROBLEMS.get()
    return 0 if problems is None else len(problems)


def _checked_id(value: str, where: object, what: str = "subject ID") -> str:
    """check_id, but as a DataError naming the file the ID came from."""
    try:
        return check_id(value, what)
    except ConfigError as exc:
        raise DataError(where, str(exc)) from None


def _unique(subjects: list[Subject]) -> list[Subject]:
    """Subjects with a first-seen ID; a repeated ID is a problem naming its file."""
    seen: dict[str, str] = {}
    out = []
    for s in subjects:
        if s.id in seen:
            _note(DataError(s.images[0], f"duplicate subject ID {s.id!r} (also from {seen[s.id]})"))
            continue
        seen[s.id] = s.images[0]
        out.append(s)
    return out


def _finish(
    subjects: list[Subject],
    root: Path,
    *,
    classes: list[str],
    channels: list[str],
    fmt: str,
    spatial_dims: int = 3,
    name: str | None = None,
    info: dict | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.25,
) -> Cohort:
    subjects = _unique(subjects)
    if not subjects:
        raise DataError(root, f"no subjects found in the {fmt} layout")
    subjects = assign_splits(subjects, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    try:
        return Cohort(
            subjects=subjects,
            classes=classes,
            channels=channels,
            spatial_dims=spatial_dims,
            name=name or root.name,
            format=fmt,
            root=root,
            info=info or {},
        )
    except ConfigError as exc:
        raise DataError(root, str(exc)) from None


def _site_folders(root: Path, has_layout: Callable[[Path], bool]) -> list[tuple[str, Path]]:
    """The root itself when it holds the layout (one site), else its subfolders that do,
    each a site named after the folder."""
    if has_layout(root):
        return [(DEFAULT_SITE, root)]
    out = []
    for d in _visible(root):
        if d.is_dir() and has_layout(d):
            try:
                out.append((_checked_id(d.name, d, "site ID"), d))
            except DataError as exc:
                _note(exc)
    return out


CLASSES_HINT = "declare the classes with --classes background,NAME,... (one name per label value 0, 1, 2, ...)"
_LABEL_VALUES: dict[tuple[str, int, int], tuple[int, ...]] = {}  # (path, mtime, size) -> values, per process


def _label_values(path: Path) -> tuple[int, ...]:
    """The distinct values of one label file, cached while the file is unchanged (every
    command that reads the cohort infers its classes again)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _LABEL_VALUES:
        array = read_volume(path, spatial_dims=_dims_of(path), is_label=True).array
        _LABEL_VALUES[key] = tuple(int(v) for v in np.unique(array))
    return _LABEL_VALUES[key]


def _classes_from_labels(labels: Sequence[Path]) -> list[str]:
    """Infer classes as 0..max over the union of every label file's values, so the answer
    does not depend on which file sorts first. The values must be contiguous: a gap means
    the files use codes (e.g. 0 and 17) that only declared classes can give a meaning; the
    error names the first file holding a value past the gap."""
    seen: dict[int, Path] = {}
    for path in labels:
        try:
            values = _label_values(path)
        except DataError as exc:
            _note(exc)  # under data check: listed here, and the other files still inform the classes
            continue
        for v in values:
            seen.setdefault(v, path)
    if not seen:
        raise DataError(labels[0], f"no readable label file: cannot infer the classes; {CLASSES_HINT}")
    values = sorted(seen)
    if values[0] < 0:
        raise DataError(seen[values[0]], f"label values include {values[0]} (negative): cannot infer the classes")
    top = values[-1]
    if top == 0:
        what = "label is" if len(labels) == 1 else f"all {len(labels)} labels are"
        raise DataError(labels[0], f"{what} all background: cannot infer the classes; {CLASSES_HINT}")
    if top > 255:
        raise DataError(seen[top], f"label values go up to {top}: cannot infer the classes; {CLASSES_HINT}")
    gap = next((k for k in range(top + 1) if k not in seen), None)
    if gap is not None:
        past = min((v for v in values if v > gap), key=lambda v: str(seen[v]))
        raise DataError(seen[past], f"holds label value {past} but no label file holds {gap}: label values "
                        f"{values} are not contiguous 0..{len(values) - 1}, so the classes cannot be inferred; "
                        f"{CLASSES_HINT}")
    return ["background"] + [f"class{k}" for k in range(1, top + 1)]


def _dims_of(path: Path) -> int:
    return 2 if _image_stem(path.name) is not None else 3


def _class_names(classes: Sequence[str] | int) -> list[str]:
    if isinstance(classes, int):
        return ["background"] + [f"class{k}" for k in range(1, classes)]
    return [str(c) for c in classes]


# -- Medical Segmentation Decathlon / nnU-Net raw --------------------------------


LABELS_ONLY_KEYS = {"labels", "name", "description"}  # a dataset.json that only declares a NIfTI folder's classes


def _is_msd(root: Path) -> bool:
    path = root / "dataset.json"
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return True  # the MSD reader says what is wrong with it
    return not (isinstance(raw, dict) and "labels" in raw and set(raw) <= LABELS_ONLY_KEYS)


def _msd_labels(raw: object, where: Path) -> tuple[list[str], dict[int, int] | None]:
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


@register_format("msd", _is_msd, "dataset.json with imagesTr/ and labelsTr/")
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
    root = _require_dir(root)
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
    classes, label_map = _msd_labels(ds["labels"], ds_path)
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
            return _checked_id(str(entry["site"]), ds_path, f"site of case {case}")
        if pattern is not None:
            m = pattern.search(case)
            if not m or not m.group(1):
                raise DataError(where, f"case name {case!r} does not match site_pattern {site_pattern!r}")
            return _checked_id(m.group(1), where, "site ID")
        return DEFAULT_SITE

    modality = _msd_modality(channels)
    before = _noted()
    if isinstance(ds.get("training"), list) and ds["training"]:
        subjects, in_file = _msd_listed(root, ds_path, ds["training"], channels, ending, modality, site_of)
    else:
        subjects, in_file = _msd_scanned(root, channels, ending, modality, site_of), False
    n_declared = ds.get("numTraining")
    # a case skipped for another (already listed) problem would make this count misleading
    if isinstance(n_declared, int) and n_declared != len(subjects) and _noted() == before:
        raise DataError(ds_path, f"numTraining is {n_declared} but {len(subjects)} training cases were found")
    if not subjects:
        raise DataError(ds_path, "no training case could be read")
    info: dict = {"layout": "msd" if "modality" in ds and "channel_names" not in ds else "nnunet_v2"}
    if in_file:
        info["channels_in_file"] = True
    if label_map is not None:
        info["label_map"] = label_map
    return _finish(
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
            _note(exc)
    in_file = kinds == {True} and len(channels) > 1
    return subjects, in_file


def _msd_entry(root: Path, ds_path: Path, k: int, entry: object, channels: list[str], ending: str, modality: str,
               site_of: Callable[[str, dict, Path], str], kinds: set[bool]) -> Subject:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DataError(ds_path, f"training entry {k} must have 'image' and 'label'")
    image = _inside(root, entry["image"], ds_path, f"training entry {k} image")
    label = _inside(root, entry["label"], ds_path, f"training entry {k} label")
    case = _strip_suffix(image.name, (ending.lower(),) + NIFTI_SUFFIXES)
    if case is None:
        raise DataError(image, f"does not end in {ending}")
    case = _checked_id(case, image)
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
        patient_id=None if patient is None else _checked_id(str(patient), ds_path, f"patient of case {case}"),
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
    for f in _visible(images_dir):
        stem = _strip_suffix(f.name, (ending.lower(),))
        if stem is None or not f.is_file():
            continue
        m = _CHANNEL_FILE.match(stem)
        if not m:
            _note(DataError(f, f"does not follow the nnU-Net naming <case>_XXXX{ending}"))
            continue
        chan = int(m["chan"])
        if chan >= len(channels):
            _note(DataError(f, f"channel {chan} is not declared in dataset.json ({len(channels)} channels)"))
            continue
        try:
            case = _checked_id(m["case"], f)
        except DataError as exc:
            _note(exc)
            continue
        cases.setdefault(case, {})[chan] = f
    if not cases:
        raise DataError(images_dir, f"no <case>_0000{ending} images found")
    subjects = []
    for case, files in sorted(cases.items()):
        absent = [c for c in range(len(channels)) if c not in files]
        for c in absent:
            missing = images_dir / f"{case}_{c:04d}{ending}"
            _note(DataError(missing, f"channel {c} ({channels[c]}) of case {case} not found"))
        label = labels_dir / f"{case}{ending}"
        if not label.is_file():
            _note(DataError(label, f"label of case {case} not found"))
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
    for f in _visible(labels_dir):
        stem = _strip_suffix(f.name, (ending.lower(),))
        if stem is not None and stem not in cases:
            _note(DataError(f, f"label has no image {stem}_0000{ending} in imagesTr/"))
    return subjects


# -- MRBrainS18 ---------------------------------------------------------------

MRBRAINS18_CHANNELS = {"T1": "pre/reg_T1.nii.gz", "IR": "pre/reg_IR.nii.gz", "FLAIR": "pre/FLAIR.nii.gz"}
MRBRAINS18_LABEL = "segm.nii.gz"
MRBRAINS18_CLASSES = [
    "background",
    "cortical_gray_matter",
    "basal_ganglia",
    "white_matter",
    "white_matter_lesions",
    "cerebrospinal_fluid",
    "ventricles",
    "cerebellum",
    "brainstem",
    "infarction",
    "other",
]
TISSUE_CLASSES = ["background", "CSF", "GM", "WM"]
# The MRBrainS13-style 3-tissue scheme, which MRBrainS18 also evaluates:
#   GM  = cortical GM (1) + basal ganglia (2)
#   WM  = white matter (3) + white-matter lesions (4) — lesions lie inside WM and were WM in MRBrainS13
#   CSF = extracerebral CSF (5) + ventricles (6)
# Cerebellum (7) and brainstem (8) are excluded from the 3-tissue evaluation, as in MRBrainS13
# (their GM and WM are not delineated separately, so they cannot be split into tissues), and
# infarction (9) and "other" lesions (10) are pathology, not a tissue class; all four become
# background. The loss then trains them as "not one of the three tissues", which is what the
# 3-class task scores (privseg's losses have no ignore label); merge_tissues=False keeps all 11.
MRBRAINS18_TISSUE_MAP = {0: 0, 1: 2, 2: 2, 3: 3, 4: 3, 5: 1, 6: 1, 7: 0, 8: 0, 9: 0, 10: 0}


def _has_mrbrains18(root: Path) -> bool:
    return any(d.is_dir() and any((d / rel).is_file() for rel in MRBRAINS18_CHANNELS.values()) for d in _visible(root))


def _is_mrbrains18_subject(folder: Path) -> bool:
    return any((folder / rel).is_file() for rel in MRBRAINS18_CHANNELS.values())


def _is_mrbrains18(root: Path) -> bool:
    # the release archive unpacks to <root>/training/<id>/...: accept its root too
    return _has_mrbrains18(root) or _has_mrbrains18(root / "training")


@register_format("mrbrains18", _is_mrbrains18,
                 "<id>/pre/reg_T1.nii.gz (or reg_IR, FLAIR) + <id>/segm.nii.gz, also under training/")
def read_mrbrains18(
    root: str | Path,
    merge_tissues: bool = True,
    labels: str = "auto",
    site: str = DEFAULT_SITE,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.25,
) -> Cohort:
    """MRBrainS18 training data (7 subjects from one 3T scanner, hence one site by default).

    ``labels`` says what ``segm.nii.gz`` holds: ``"mrbrains18"`` (the 11 published labels),
    ``"tissues"`` (already background/CSF/GM/WM, as privseg's synthetic cohort writes it), or
    ``"auto"``: read the first subject's label and take it as tissues when its largest value
    is at most 3 — a real MRBrainS18 segmentation always contains cerebellum and brainstem
    (7, 8). With ``merge_tissues`` the 11 labels are mapped to tissues at load time
    (``info["label_map"]``, see ``MRBRAINS18_TISSUE_MAP`` for the mapping and why).
    Channels are T1, IR, FLAIR as present; every subject must have the same ones. ``root`` may
    also be the release's root, which holds the subject folders in ``training/``."""
    root = _require_dir(root)
    if labels not in ("auto", "mrbrains18", "tissues"):
        raise ConfigError(f"labels={labels!r}: choose auto, mrbrains18 or tissues")
    site = _checked_id(site, root, "site ID")
    given = root
    if not _has_mrbrains18(root) and _has_mrbrains18(root / "training"):
        root = root / "training"
    folders = [d for d in _visible(root) if d.is_dir() and ((d / "pre").is_dir() or (d / MRBRAINS18_LABEL).exists())]
    if not folders:
        hint = f" ({_layout_hint(root)})" if _layout_hint(root) else ""
        raise DataError(root, f"no MRBrainS18 subject folders (<id>/pre/ and <id>/segm.nii.gz) found{hint}")
    present = [c for c, rel in MRBRAINS18_CHANNELS.items() if any((d / rel).is_file() for d in folders)]
    if not present:
        raise DataError(root, f"no subject has any of {', '.join(MRBRAINS18_CHANNELS.values())}")
    subjects = []
    for d in folders:
        try:
            subjects.append(_mrbrains18_subject(d, present, site))
        except DataError as exc:
            _note(exc)
    if not subjects:
        raise DataError(root, "no MRBrainS18 subject could be read")
    scheme = labels
    if scheme == "auto":
        top = int(read_volume(subjects[0].label, is_label=True).array.max())
        scheme = "tissues" if top <= len(TISSUE_CLASSES) - 1 else "mrbrains18"
    info: dict = {"label_scheme": scheme}
    if scheme == "tissues":
        classes = list(TISSUE_CLASSES)
    elif merge_tissues:
        classes = list(TISSUE_CLASSES)
        info.update(label_scheme="mrbrains18->tissues", label_map=dict(MRBRAINS18_TISSUE_MAP))
    else:
        classes = list(MRBRAINS18_CLASSES)
    return _finish(
        subjects,
        root,
        classes=classes,
        channels=present,
        fmt="mrbrains18",
        name=given.name,
        info=info,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def _mrbrains18_subject(d: Path, present: list[str], site: str) -> Subject:
    sid = _checked_id(d.name, d)
    images = []
    for chan in present:
        path = d / MRBRAINS18_CHANNELS[chan]
        if not path.is_file():
            raise DataError(
                path,
                f"{chan} channel missing for subject {sid} (other subjects have it; all need the same channels)",
            )
        images.append(str(path))
    label = d / MRBRAINS18_LABEL
    if not label.is_file():
        raise DataError(label, f"label missing for subject {sid}")
    return Subject(id=sid, site=site, images=tuple(images), label=str(label), modality="MR")


# -- 2D image folders (dermoscopy style) -----------------------------------------

IMAGE_DIRS = ("images",)
MASK_DIRS = ("masks", "labels")
MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_label", "")  # ISIC names masks <id>_segmentation.png
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _pair_dirs(folder: Path, image_dirs: Sequence[str], label_dirs: Sequence[str]) -> tuple[Path, Path] | None:
    for i in image_dirs:
        for m in label_dirs:
            if (folder / i).is_dir() and (folder / m).is_dir():
                return folder / i, folder / m
    return None


def _orphan_image_dir(root: Path, image_dirs: Sequence[str], label_dirs: Sequence[str]) -> None:
    """An image folder without its label folder (at the root or in a site folder) is a
    half-copied dataset; say so instead of "unknown layout" or silently skipping a site."""
    has_pair = _pair_dirs(root, image_dirs, label_dirs) is not None
    for folder in [root] + ([] if has_pair else [d for d in _visible(root) if d.is_dir()]):
        for name in image_dirs:
            if (folder / name).is_dir() and not any((folder / m).is_dir() for m in label_dirs):
                raise DataError(
                    folder / name, f"has no sibling label folder ({' or '.join(d + '/' for d in label_dirs)})"
                )


def _has_2d_layout(folder: Path) -> bool:
    dirs = _pair_dirs(folder, IMAGE_DIRS, MASK_DIRS)
    return dirs is not None and any(_image_stem(f.name) for f in _visible(dirs[0]))


def _is_image2d(root: Path) -> bool:
    return bool(_site_folders(root, _has_2d_layout))


def _pair_by_name(
    images: dict[str, Path], labels: list[tuple[str, Path]], suffixes: Sequence[str], label_what: str
) -> dict[str, Path]:
    """Match label stems to image IDs, allowing ``<id><suffix>``. Returns ID -> label path;
    a label matching no image, two labels for one image, or an image without a label is a
    DataError naming the file (noted, under collect_problems: that image is then left out)."""
    out: dict[str, Path] = {}
    for stem, path in labels:
        try:
            _pair_one(images, stem, path, suffixes, label_what, out)
        except DataError as exc:
            _note(exc)
    for key, image in images.items():
        if key not in out:
            _note(DataError(image, f"image has no {label_what} (looked for {key}{{{','.join(suffixes)}}})"))
    return out


def _image_ids(files: Iterable[tuple[str, Path]]) -> dict[str, Path]:
    """Subject ID -> image file; an unsafe or repeated ID is a problem naming the file."""
    images: dict[str, Path] = {}
    for stem, f in files:
        try:
            sid = _checked_id(stem, f)
            if sid in images:
                raise DataError(f, f"duplicate subject ID {sid!r} (also {images[sid].name})")
            images[sid] = f
        except DataError as exc:
            _note(exc)
    return images


def _pair_one(images: dict[str, Path], stem: str, path: Path, suffixes: Sequence[str], label_what: str,
              out: dict[str, Path]) -> None:
    key = stem if stem in images else None
    if key is None:
        for suf in suffixes:
            if suf and stem.endswith(suf) and stem[: -len(suf)] in images:
                key = stem[: -len(suf)]
                break
    if key is None:
        raise DataError(path, f"{label_what} has no matching image")
    if key in out:
        raise DataError(path, f"second {label_what} for image {key} (also {out[key].name})")
    out[key] = path


@register_format("image2d", _is_image2d, "images/ + masks/ (or labels/) with .png/.jpg, optionally per site folder")
def read_image_folder_2d(
    root: str | Path,
    classes: Sequence[str] | int | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.25,
) -> Cohort:
    """2D photographs: ``images/<id>.png|jpg|...`` + ``masks/<id>[_segmentation|_mask|_seg].png``,
    optionally one level down in site folders (``<root>/<site>/images``).

    Channels are ``R, G, B`` for colour photographs and ``gray`` for grey ones, decided by the
    first image. The mask scheme is decided by the first mask: values within {0, 255} are a
    binary mask (the usual export) and 255 is mapped to class 1 at load time
    (``info["label_map"] = {255: 1}``); otherwise the values are class indices, 0..max, unless
    ``classes`` says more. Masks must be lossless (PNG, BMP, TIFF): JPEG smears the edges
    into values no class has."""
    root = _require_dir(root)
    _orphan_image_dir(root, IMAGE_DIRS, MASK_DIRS)
    sites = _site_folders(root, _has_2d_layout)
    if not sites:
        raise DataError(root, "no images/ + masks/ folders with 2D images found (nor in site subfolders)")
    subjects = []
    for site, folder in sites:
        dirs = _pair_dirs(folder, IMAGE_DIRS, MASK_DIRS)
        assert dirs is not None
        images = _image_ids([(stem, f) for f in _visible(dirs[0]) if (stem := _image_stem(f.name)) and f.is_file()])
        masks = []
        for f in _visible(dirs[1]):
            stem = _image_stem(f.name)
            if stem is None or not f.is_file():
                continue
            if f.name.lower().endswith(LOSSY_SUFFIXES):
                _note(DataError(f, "mask is JPEG (lossy): its edges hold values no class has; save masks as PNG"))
                continue
            masks.append((stem, f))
        if not images:
            _note(DataError(dirs[0], "no 2D images found"))
            continue
        pairs = _pair_by_name(images, masks, MASK_SUFFIXES, "mask")
        for sid, image in images.items():
            if sid in pairs:
                subjects.append(Subject(id=sid, site=site, images=(str(image),), label=str(pairs[sid]),
                                        modality="RGB"))
    if not subjects:
        raise DataError(root, "no 2D image with a mask could be read")
    first_image = read_volume(subjects[0].images[0], spatial_dims=2)
    channels = ["R", "G", "B"] if first_image.array.ndim == 3 else ["gray"]
    first_mask = subjects[0].label
    values = np.unique(read_volume(first_mask, spatial_dims=2, is_label=True).array)
    info: dict = {}
    if set(values.tolist()) <= {0, 255}:
        info["label_map"] = {255: 1}
        names = ["background", "foreground"] if classes is None else _class_names(classes)
        if len(names) != 2:
            raise ConfigError(f"masks are binary 0/255 ({first_mask}) but classes has {len(names)} entries")
    elif classes is not None:
        names = _class_names(classes)
    else:
        if int(values.max()) >= 255:
            raise DataError(first_mask, f"mask values {values[:8].tolist()} are neither 0/255 nor class indices")
        names = ["background"] + [f"class{k}" for k in range(1, int(values.max()) + 1)]
    return _finish(
        subjects,
        root,
        classes=names,
        channels=channels,
        fmt="image2d",
        spatial_dims=2,
        info=info,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


# -- plain NIfTI folders ---------------------------------------------------------

NIFTI_IMAGE_DIRS = ("images", "imgs")
NIFTI_LABEL_DIRS = ("labels", "masks", "segmentations")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")


def _nifti_files(folder: Path, pattern: str = "*") -> list[tuple[str, Path]]:
    out = []
    for f in _visible(folder):
        stem = _nifti_stem(f.name)
        if stem is not None and f.is_file() and fnmatch(f.name, pattern):
            out.append((stem, f))
    return out


def _has_nifti_layout(folder: Path) -> bool:
    dirs = _pair_dirs(folder, NIFTI_IMAGE_DIRS, NIFTI_LABEL_DIRS)
    return bool(_nifti_files(dirs[0] if dirs else folder))


def _is_nifti_folder(root: Path) -> bool:
    return bool(_site_folders(root, _has_nifti_layout))


@register_format(
    "nifti", _is_nifti_folder, "images/ + labels/ NIfTI, or <id>.nii.gz + <id>_seg.nii.gz, optionally per site folder"
)
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
    root = _require_dir(root)
    _orphan_image_dir(root, NIFTI_IMAGE_DIRS, NIFTI_LABEL_DIRS)
    sites = _site_folders(root, _has_nifti_layout)
    if not sites:
        raise DataError(
            root,
            "no NIfTI images found (looked for images/ + labels/, or <id>.nii.gz + <id>_seg.nii.gz, also per site)",
        )
    suffixes = tuple(label_suffixes)
    subjects = []
    for site, folder in sites:
        dirs = _pair_dirs(folder, NIFTI_IMAGE_DIRS, NIFTI_LABEL_DIRS)
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
        images = _image_ids(image_files)
        if not images:
            _note(DataError(dirs[0] if dirs else folder, f"no NIfTI images matching {image_glob}"))
            continue
        pairs = _pair_by_name(images, label_files, pair_suffixes, "label")
        for sid, image in images.items():
            if sid in pairs:
                subjects.append(Subject(id=sid, site=site, images=(str(image),), label=str(pairs[sid]),
                                        modality=modality))
    if not subjects:
        raise DataError(root, "no NIfTI image with a label could be read")
    info: dict = {"classes_inferred": classes is None}
    if classes is not None:
        names = _class_names(classes)
    elif (root / "dataset.json").is_file():  # a dataset.json holding only "labels" declares them
        ds = read_json(root / "dataset.json", "dataset.json")
        names, label_map = _msd_labels(ds.get("labels") if isinstance(ds, dict) else None, root / "dataset.json")
        info["classes_inferred"] = False
        if label_map is not None:
            info["label_map"] = label_map
    else:
        names = _classes_from_labels([Path(s.label) for s in subjects if s.label])
    return _finish(
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
