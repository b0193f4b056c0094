"""Subjects, cohorts and subject-level splits.

The patient is the unit (DESIGN.md, principle 1): a split assigns whole subjects,
never patches, and a forget request names subjects. A cohort is stored as a JSON
manifest (``cohort.json``) next to its files, with paths relative to it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from privseg.errors import ConfigError, DataError
from privseg.utils import check_id, read_json, write_json

MANIFEST_NAME = "cohort.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Subject:
    """One patient: images (one path per channel), a label map, and where it came from."""

    id: str
    site: str
    images: tuple[str, ...]
    label: str | None
    modality: str = "MR"
    spacing: tuple[float, ...] | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        check_id(self.id, "subject ID")
        check_id(self.site, "site ID")
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


def assign_splits(
    subjects: Sequence[Subject], val_fraction: float = 0.0, test_fraction: float = 0.25, seed: int = 0
) -> list[Subject]:
    """Give each subject a split, stratified by site, deterministically by seed.
    Each site keeps at least one training subject."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError("val and test fractions must be in [0, 1) and sum to less than 1")
    rng = random.Random(seed)
    out: dict[str, Subject] = {}
    by_site: dict[str, list[Subject]] = {}
    for s in subjects:
        by_site.setdefault(s.site, []).append(s)
    for site_subjects in by_site.values():
        order = sorted(site_subjects, key=lambda s: s.id)
        rng.shuffle(order)
        n = len(order)
        n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
        n_val = min(int(round(n * val_fraction)), max(n - 1 - n_test, 0))
        for k, s in enumerate(order):
            split = "test" if k < n_test else "val" if k < n_test + n_val else "train"
            out[s.id] = replace(s, split=split)
    return [out[s.id] for s in subjects]
