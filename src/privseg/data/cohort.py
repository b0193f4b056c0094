"""Subjects, cohorts and patient-level splits.

The patient is the unit: a subject is one image (or volume) with its label, and a patient
may have several (follow-up scans, several lesions). A split assigns whole patients, never
one of a patient's files to training and another to test, and never patches. A subject
without a patient ID is its own patient (one file = one patient). A cohort is stored as a
JSON manifest (``cohort.json``) next to its files, with paths relative to it.

Splits can be pinned from a file (:func:`read_splits`, :func:`apply_splits`) and the split a
run used is written beside it (:func:`write_splits`, ``splits.csv``, which pins it again).
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from privseg.errors import ConfigError, DataError
from privseg.utils import atomic_path, check_id, read_json, write_json

MANIFEST_NAME = "cohort.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Subject:
    """One image (or volume) of one patient: images (one path per channel), a label map,
    where it came from, and whose it is (``patient_id``, default: the subject ID)."""

    id: str
    site: str
    images: tuple[str, ...]
    label: str | None
    modality: str = "MR"
    spacing: tuple[float, ...] | None = None
    split: str = "train"
    patient_id: str | None = None

    def __post_init__(self) -> None:
        check_id(self.id, "subject ID")
        check_id(self.site, "site ID")
        if self.patient_id is None:  # no patient ID in the data: one file = one patient
            object.__setattr__(self, "patient_id", self.id)
        check_id(self.patient_id, f"patient ID of subject {self.id}")
        if self.split not in SPLITS:
            raise ConfigError(f"subject {self.id}: split {self.split!r} is not one of {SPLITS}")
        if not self.images:
            raise ConfigError(f"subject {self.id}: no image channels")


@dataclass
class Cohort:
    """Subjects plus what their labels mean. Paths are absolute once loaded."""

    subjects: list[Subject]
    classes: list[str]
    channels: list[str]
    spatial_dims: int = 3
    name: str = "cohort"
    format: str = "nifti"
    root: Path | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.subjects:
            if s.id in seen:
                raise DataError(self.root or self.name, f"duplicate subject ID {s.id!r}")
            seen.add(s.id)
            # A 2D RGB file carries several channels in one file; NIfTI has one file per channel,
            # except the MSD layout, whose 4D files hold every channel (info["channels_in_file"]).
            files = 1 if self.info.get("channels_in_file") else len(self.channels)
            if self.spatial_dims == 3 and len(s.images) != files:
                raise DataError(
                    s.images[0],
                    f"subject {s.id} has {len(s.images)} image files, cohort expects {files} "
                    f"(channels {', '.join(self.channels)})",
                )
        # A patient with one scan in training and another in test would be scored as unseen
        # while the model trained on them: the split must keep each patient on one side.
        split_of: dict[str, Subject] = {}
        for s in self.subjects:
            other = split_of.setdefault(s.patient_id, s)
            if other.split != s.split:
                raise DataError(self.root or self.name,
                                f"patient {s.patient_id!r} is in two splits: subject {other.id} in {other.split}, "
                                f"subject {s.id} in {s.split} (a patient's subjects must share one split)")
        if len(self.classes) < 2:
            raise ConfigError(f"cohort {self.name}: needs background plus at least one class")
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"cohort {self.name}: spatial_dims must be 2 or 3")

    # -- look-ups -----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sites(self) -> list[str]:
        return sorted({s.site for s in self.subjects})

    def subject(self, subject_id: str) -> Subject:
        for s in self.subjects:
            if s.id == subject_id:
                return s
        raise ConfigError(f"unknown subject ID {subject_id!r} (cohort {self.name} has {len(self.subjects)} subjects)")

    # -- patients -------------------------------------------------------------
    @property
    def has_patient_ids(self) -> bool:
        """False when every subject is its own patient (no patient IDs in the data)."""
        return any(s.patient_id != s.id for s in self.subjects)

    def patient_of(self, subject_id: str) -> str:
        return self.subject(subject_id).patient_id  # type: ignore[return-value]

    def patients(self, split: str | None = None, site: str | None = None) -> dict[str, list[Subject]]:
        """Patient ID -> that patient's subjects (of one split and/or site), in manifest order.
        Patient IDs are cohort-wide: the same ID at two sites is one patient."""
        out: dict[str, list[Subject]] = {}
        for s in self.select(split, site):
            out.setdefault(s.patient_id, []).append(s)  # type: ignore[arg-type]
        return out

    def patient_subjects(self, patient_id: str) -> list[Subject]:
        """Every subject of one patient; ConfigError if the cohort has none."""
        subs = [s for s in self.subjects if s.patient_id == patient_id]
        if not subs:
            raise ConfigError(f"unknown patient ID {patient_id!r} (cohort {self.name} has "
                              f"{len({s.patient_id for s in self.subjects})} patients)")
        return subs

    def select(self, split: str | None = None, site: str | None = None) -> list[Subject]:
        """Subjects of one split and/or site, in manifest order."""
        if split is not None and split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {SPLITS}")
        if site is not None and site not in self.sites:
            raise ConfigError(f"unknown site ID {site!r} (sites: {', '.join(self.sites)})")
        return [s for s in self.subjects if (split is None or s.split == split) and (site is None or s.site == site)]

    def forget_split(self, forget_ids: Iterable[str]) -> tuple[list[Subject], list[Subject]]:
        """(retain, forget) among training subjects. Forget IDs must be training subjects,
        and at least one training subject must remain."""
        ids = [i.strip() for i in forget_ids if i.strip()]
        if not ids:
            raise ConfigError("forget request is empty: name at least one subject ID")
        train = {s.id: s for s in self.select("train")}
        for i in ids:
            check_id(i, "subject ID")
            if i not in train:
                where = "is not a training subject" if any(s.id == i for s in self.subjects) else "is unknown"
                raise ConfigError(f"forget ID {i!r} {where} in cohort {self.name}")
        forget = [train[i] for i in dict.fromkeys(ids)]
        retain = [s for s in train.values() if s.id not in set(ids)]
        if not retain:
            raise ConfigError("forget request names every training subject: nothing left to retain")
        return retain, forget

    def with_subjects(self, subjects: Sequence[Subject]) -> Cohort:
        return replace(self, subjects=list(subjects))

    # -- persistence --------------------------------------------------------
    def to_dict(self, relative_to: Path | None = None) -> dict:
        def rel(p: str | None) -> str | None:
            if p is None or relative_to is None:
                return p
            try:
                return str(Path(p).resolve().relative_to(relative_to.resolve()))
            except ValueError:
                return str(p)

        subjects = []
        for s in self.subjects:
            d = asdict(s)
            d["images"] = [rel(p) for p in s.images]
            d["label"] = rel(s.label)
            d["spacing"] = list(s.spacing) if s.spacing else None
            subjects.append(d)
        return {
            "name": self.name,
            "format": self.format,
            "spatial_dims": self.spatial_dims,
            "classes": self.classes,
            "channels": self.channels,
            "info": self.info,
            "subjects": subjects,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write the manifest (atomically); default ``<root>/cohort.json``."""
        if path is None:
            if self.root is None:
                raise ConfigError("cohort has no root folder: give a manifest path")
            path = self.root / MANIFEST_NAME
        path = Path(path)
        write_json(path, self.to_dict(relative_to=path.parent))
        return path

    @classmethod
    def from_manifest(cls, path: str | Path) -> Cohort:
        """Read a manifest; every missing field, wrong type or unsafe value is a DataError naming it."""
        path = Path(path)
        raw = read_json(path, "manifest")

        def bad(what: str) -> DataError:
            return DataError(path, f"manifest is missing or has a malformed field ({what})")

        if not isinstance(raw, dict):
            raise DataError(path, f"manifest must be a JSON object, not {type(raw).__name__}")
        for key in ("subjects", "classes", "channels"):
            if key not in raw:
                raise bad(f"'{key}' is missing")
        if not isinstance(raw["subjects"], list):
            raise bad("'subjects' must be a list")
        for key in ("classes", "channels"):
            if not isinstance(raw[key], list) or not all(isinstance(c, str) for c in raw[key]):
                raise bad(f"'{key}' must be a list of names")
        info = raw.get("info", {})
        if info is None:
            info = {}
        if not isinstance(info, dict):
            raise bad("'info' must be an object")
        dims = raw.get("spatial_dims", 3)
        if isinstance(dims, bool) or dims not in (2, 3):
            raise bad(f"'spatial_dims' must be 2 or 3 (got {dims!r})")
        for key in ("name", "format"):
            if key in raw and not isinstance(raw[key], str):
                raise bad(f"'{key}' must be a string")
        root = path.parent.resolve()
        subjects = []
        for k, d in enumerate(raw["subjects"]):
            where = f"subjects[{k}]"
            if not isinstance(d, dict):
                raise bad(f"{where} must be an object")
            for key in ("id", "site", "images"):
                if key not in d:
                    raise bad(f"{where}.{key} is missing")
            for key in ("id", "site", "modality", "split"):
                if key in d and not isinstance(d[key], str):
                    raise bad(f"{where}.{key} must be a string")
            # patient_id is optional: manifests written before it existed have none (one file = one patient)
            if d.get("patient_id") is not None and not isinstance(d["patient_id"], str):
                raise bad(f"{where}.patient_id must be a string or null")
            images = d["images"]
            if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
                raise bad(f"{where}.images must be a non-empty list of paths")
            label = d.get("label")
            if label is not None and (not isinstance(label, str) or not label):
                raise bad(f"{where}.label must be a path or null")
            spacing = d.get("spacing")
            if spacing is not None and (not isinstance(spacing, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                    for x in spacing)):
                raise bad(f"{where}.spacing must be null or a list of positive numbers")
            try:
                subjects.append(
                    Subject(
                        id=d["id"],
                        site=d["site"],
                        images=tuple(str(root / p) for p in images),
                        label=str(root / label) if label else None,
                        modality=d.get("modality", "MR"),
                        spacing=tuple(float(x) for x in spacing) if spacing else None,
                        split=d.get("split", "train"),
                        patient_id=d.get("patient_id"),
                    )
                )
            except ConfigError as exc:
                raise DataError(path, f"{exc} ({where})") from None
        try:
            return cls(
                subjects=subjects,
                classes=list(raw["classes"]),
                channels=list(raw["channels"]),
                spatial_dims=int(dims),
                name=raw.get("name", root.name),
                format=raw.get("format", "nifti"),
                root=root,
                info=info,
            )
        except ConfigError as exc:
            raise DataError(path, str(exc)) from None
        except DataError as exc:
            if exc.path != str(root):  # a problem with one image file: that file is named already
                raise
            raise DataError(path, exc.problem) from None


def assign_splits(
    subjects: Sequence[Subject], val_fraction: float = 0.0, test_fraction: float = 0.25, seed: int = 0
) -> list[Subject]:
    """Give each patient a split, stratified by site, deterministically by seed; all of a
    patient's subjects get the same one. Fractions count patients, and each site keeps at
    least one training patient. With one subject per patient this is a per-subject split."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError("val and test fractions must be in [0, 1) and sum to less than 1")
    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    by_site: dict[str, list[str]] = {}  # a patient counts at the site of their first subject
    for s in subjects:
        if s.patient_id not in split_of:
            split_of[s.patient_id] = "train"  # type: ignore[index]
            by_site.setdefault(s.site, []).append(s.patient_id)  # type: ignore[arg-type]
    for patients in by_site.values():
        order = sorted(patients)
        rng.shuffle(order)
        n = len(order)
        n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
        n_val = min(int(round(n * val_fraction)), max(n - 1 - n_test, 0))
        for k, p in enumerate(order):
            split_of[p] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return [replace(s, split=split_of[s.patient_id]) for s in subjects]  # type: ignore[index]


# -- pinned splits ------------------------------------------------------------------------

SPLITS_FILE = "splits.csv"  # written beside every run; read_splits pins it again


@dataclass(frozen=True)
class PinnedSplits:
    """A split read from a file: (site or None, subject ID) -> split, and -> patient where the
    file has one. The site is part of the key because a folder of site folders may reuse a
    case name at two hospitals."""

    path: str
    split: dict[tuple[str | None, str], str]
    patient: dict[tuple[str | None, str], str] = field(default_factory=dict)


def read_splits(path: str | Path, fold: int = 0) -> PinnedSplits:
    """Read a split file. Two shapes:

    - JSON as nnU-Net writes ``splits_final.json``: a list of folds ``[{"train": [...], "val": [...]}, ...]``
      (``fold`` picks one), or one such object, which may also have ``"test"``;
    - CSV with a header naming ``id`` and ``split`` columns, optionally ``site`` and ``patient``.

    Every problem (unsafe or repeated ID, unknown split name, a subject in two splits) is a
    DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "split file not found")
    if path.suffix.lower() == ".json":
        return _read_splits_json(path, fold)
    if path.suffix.lower() in (".csv", ".txt"):
        return _read_splits_csv(path)
    raise DataError(path, "split file must be .json (nnU-Net splits_final.json) or .csv (id,site,split)")


def _split_id(value: object, path: Path, what: str = "subject ID") -> str:
    try:
        return check_id(value, what)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise DataError(path, str(exc)) from None


def _read_splits_json(path: Path, fold: int) -> PinnedSplits:
    raw = read_json(path, "split file")
    if isinstance(raw, list):
        if not raw:
            raise DataError(path, "holds an empty list of folds")
        if not 0 <= fold < len(raw):
            raise DataError(path, f"has folds 0..{len(raw) - 1}, not fold {fold}")
        raw = raw[fold]
    if not isinstance(raw, dict):
        raise DataError(path, 'must hold {"train": [...], "val": [...]} or a list of such folds')
    unknown = sorted(set(raw) - set(SPLITS))
    if unknown:
        raise DataError(path, f"unknown split name(s) {unknown}: use {', '.join(SPLITS)}")
    split: dict[tuple[str | None, str], str] = {}
    for name, ids in raw.items():
        if not isinstance(ids, list):
            raise DataError(path, f"'{name}' must be a list of subject IDs")
        for i in ids:
            key = (None, _split_id(i, path))
            if key in split:
                raise DataError(path, f"subject {key[1]!r} is in two splits ({split[key]} and {name})")
            split[key] = name
    return PinnedSplits(str(path), split)


def _read_splits_csv(path: Path) -> PinnedSplits:
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read the split file ({exc})") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(path, "split file is empty (expected a header id,site,split)")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("id", "split") if c not in header]
    if missing:
        raise DataError(path, f"header {rows[0]} has no {' or '.join(missing)} column "
                        "(expected id,site,split[,patient])")
    col = {name: header.index(name) for name in ("id", "split", "site", "patient") if name in header}
    out = PinnedSplits(str(path), {})
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(path, f"line {line} has {len(row)} fields, the header {len(header)}")
        cell = {name: row[k].strip() for name, k in col.items()}
        sid = _split_id(cell["id"], path, f"subject ID on line {line}")
        site = _split_id(cell["site"], path, f"site ID on line {line}") if cell.get("site") else None
        if cell["split"] not in SPLITS:
            raise DataError(path, f"line {line}: split {cell['split']!r} is not one of {', '.join(SPLITS)}")
        key = (site, sid)
        if key in out.split or (None, sid) in out.split or (site is None and any(k[1] == sid for k in out.split)):
            raise DataError(path, f"line {line}: subject {sid!r} is listed twice")
        out.split[key] = cell["split"]
        if cell.get("patient"):
            out.patient[key] = _split_id(cell["patient"], path, f"patient ID on line {line}")
    if not out.split:
        raise DataError(path, "split file lists no subjects")
    return out


def apply_splits(cohort: Cohort, pinned: PinnedSplits | str | Path, site: str | None = None) -> Cohort:
    """A copy of ``cohort`` with the file's splits (and patient IDs, where it has them).

    The file must give a split to every subject and name no other subject. With ``site``
    (a federation's site ID, which may differ from the cohort's own site names), only the
    file's rows of that site (and rows without a site) apply. A patient left on two sides is a
    DataError naming the file; the cohort is not changed."""
    if not isinstance(pinned, PinnedSplits):
        pinned = read_splits(pinned)
    path = pinned.path
    rows = {k: v for k, v in pinned.split.items() if site is None or k[0] in (None, site)}
    used: set[tuple[str | None, str]] = set()
    subjects, missing = [], []
    for s in cohort.subjects:
        key = next((k for k in ((site or s.site, s.id), (None, s.id)) if k in rows), None)
        if key is None:
            missing.append(s.id)
            continue
        used.add(key)
        patient = pinned.patient.get(key, s.patient_id)
        if s.patient_id not in (s.id, patient):
            raise DataError(path, f"gives subject {s.id} patient {patient!r}, the data says {s.patient_id!r}")
        subjects.append(replace(s, split=rows[key], patient_id=patient))
    unknown = [k for k in rows if k not in used]
    if unknown:
        where = {s.id: s.site for s in cohort.subjects}
        moved = [k for k in unknown if k[1] in where]
        if moved:
            k = moved[0]
            raise DataError(path, f"puts subject {k[1]} at site {k[0]}, the cohort has it at {where[k[1]]}")
        raise DataError(path, f"names {len(unknown)} subject(s) not in cohort {cohort.name}: "
                        f"{_listing([k[1] for k in unknown])}")
    if missing:
        raise DataError(path, f"gives no split for {len(missing)} subject(s) of cohort {cohort.name}: "
                        f"{_listing(missing)}")
    try:
        return replace(cohort, subjects=subjects, info={**cohort.info, "pinned_splits": path})
    except (ConfigError, DataError) as exc:
        raise DataError(path, getattr(exc, "problem", str(exc))) from None


def _listing(ids: Sequence[str], limit: int = 8) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def write_splits(cohort: Cohort, run_dir: str | Path, subjects: Sequence[Subject] | None = None) -> Path:
    """Write ``run_dir/splits.csv`` (id,site,split,patient) for the run's subjects (default: the
    whole cohort), atomically, so the split a run used can be seen and pinned again."""
    path = Path(run_dir) / SPLITS_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "site", "split", "patient"])
            for s in cohort.subjects if subjects is None else subjects:
                w.writerow([s.id, s.site, s.split, s.patient_id])
    return path
