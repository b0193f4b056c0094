"""Sites (hospitals) of a federation and where each one's data lives.

A site is a cohort path plus, when that cohort holds several sites (the embedded cohort),
which of them. Images never leave the site: the server only ever sees a site's ID, its
subject counts and its model updates. Two ways to describe a federation:

* one multi-site cohort (``--cohort data/cohort``): every site of the cohort is a site of
  the federation (``sites_from_cohort``);
* one folder per site in any supported format (``--site H1=/data/h1 --site H2=/data/h2``
  or ``--sites-root /data`` whose sub-folders are the sites): ``sites_from_folders``.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privseg.data.cohort import Cohort, Subject, apply_splits, read_splits
from privseg.data.formats import read_cohort
from privseg.data.transforms import load_preprocessed
from privseg.errors import ConfigError, DataError
from privseg.utils import check_id


@dataclass(frozen=True)
class SiteSpec:
    """One site: its ID in the federation, the cohort holding its data, the site name
    inside that cohort (``None``: every subject of the cohort belongs to this site), and the
    subjects erased at this site (``exclude``: never used again for training or evaluation), and
    a split file pinning its subjects' splits (``splits``: ``splits_final.json`` shape or CSV)."""

    id: str
    cohort: str
    cohort_site: str | None = None
    exclude: tuple[str, ...] = ()
    splits: str | None = None

    def __post_init__(self) -> None:
        check_id(self.id, "site ID")
        object.__setattr__(self, "exclude", tuple(sorted(set(self.exclude))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SiteSpec:
        try:
            return cls(id=d["id"], cohort=d["cohort"], cohort_site=d.get("cohort_site"),
                       exclude=tuple(d.get("exclude") or ()), splits=d.get("splits") or None)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed site entry {d!r} ({exc})") from None


def read_site_cohort(cohort_path: str | Path) -> Cohort:
    return read_cohort(cohort_path)


def site_subjects(cohort: Cohort, spec: SiteSpec, split: str | None = None) -> list[Subject]:
    """The site's subjects of one split (all splits with ``None``), erased subjects left out; with
    ``spec.splits``, the splits are the ones the file pins (every subject of the site in it)."""
    if spec.cohort_site is not None and spec.cohort_site not in cohort.sites:
        raise ConfigError(f"site {spec.id}: cohort {spec.cohort} has no site {spec.cohort_site!r} "
                          f"(sites: {', '.join(cohort.sites) or 'none'})")
    subjects = cohort.select(None, spec.cohort_site)
    if spec.splits:
        subjects = apply_splits(cohort.with_subjects(subjects), _pinned(spec.splits), site=spec.id).subjects
    erased = set(spec.exclude)
    return [s for s in subjects if (split is None or s.split == split) and s.id not in erased]


def _pinned(path: str):
    """A split file, read once per process (per path and modification time)."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime if Path(path).exists() else None)
    if key not in _PINNED:
        _PINNED[key] = read_splits(path)
    return _PINNED[key]


_PINNED: dict = {}


def sites_from_cohort(cohort_path: str | Path, only: Sequence[str] | None = None) -> list[SiteSpec]:
    """Every site of one multi-site cohort (or the ``only`` ones), in sorted order."""
    cohort = read_site_cohort(cohort_path)
    path = str(Path(cohort_path).resolve())
    names = cohort.sites
    if only:
        unknown = [s for s in only if s not in names]
        if unknown:
            raise ConfigError(f"--sites: {', '.join(unknown)} not in cohort {cohort_path} "
                              f"(sites: {', '.join(names)})")
        names = [s for s in names if s in set(only)]
    if not names:
        raise DataError(cohort_path, "cohort has no subjects, so no sites")
    return [SiteSpec(id=s, cohort=path, cohort_site=s) for s in names]


def sites_from_folders(folders: dict[str, str | Path] | Iterable[str]) -> list[SiteSpec]:
    """One site per folder. ``folders`` maps site ID to folder, or is a list of
    ``"ID=PATH"`` strings (a bare ``PATH`` takes the folder name as its ID)."""
    if not isinstance(folders, dict):
        parsed: dict[str, str] = {}
        for item in folders:
            name, sep, path = str(item).partition("=")
            if not sep:
                name, path = Path(item).resolve().name, str(item)
            if name in parsed:
                raise ConfigError(f"--site {item}: site ID {name!r} given twice")
            parsed[name] = path
        folders = parsed
    specs = []
    for name, path in folders.items():
        p = Path(path)
        if not p.exists():
            raise DataError(p, f"folder of site {name} not found")
        specs.append(SiteSpec(id=name, cohort=str(p.resolve()), cohort_site=None))
    if not specs:
        raise ConfigError("no sites given")
    return specs


def sites_from_root(root: str | Path) -> list[SiteSpec]:
    """Each visible sub-folder of ``root`` is one site, named after the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "sites root folder not found")
    subs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subs:
        raise DataError(root, "has no sub-folders (one folder per site expected)")
    return sites_from_folders({d.name: d for d in subs})


def check_sites(sites: Sequence[SiteSpec], min_train: int = 1) -> dict:
    """Read every site's cohort and check the federation is consistent: unique IDs, every
    site has training subjects, the same classes, channels and dimensionality everywhere.
    Returns what the model needs: ``{"classes", "channels", "spatial_dims", "counts"}``.
    (Run where the data is visible: in a real deployment each site checks its own.)"""
    if not sites:
        raise ConfigError("the federation has no sites")
    ids = [s.id for s in sites]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"site IDs given more than once: {', '.join(dup)}")
    ref: tuple[str, Cohort] | None = None
    counts: dict[str, dict[str, int]] = {}
    cache: dict[str, Cohort] = {}
    for spec in sites:
        cohort = cache.get(spec.cohort) or read_site_cohort(spec.cohort)
        cache[spec.cohort] = cohort
        subjects = site_subjects(cohort, spec)
        n = {split: sum(1 for s in subjects if s.split == split) for split in ("train", "val", "test")}
        counts[spec.id] = n
        if n["train"] < min_train:
            raise DataError(spec.cohort, f"site {spec.id} has no training subjects"
                            + (f" ({len(subjects)} subjects in other splits)" if subjects else ""))
        if ref is None:
            ref = (spec.id, cohort)
            continue
        rid, rc = ref
        if cohort.num_classes != rc.num_classes:
            raise DataError(spec.cohort, f"site {spec.id} has {cohort.num_classes} classes "
                            f"({', '.join(cohort.classes)}) but site {rid} has {rc.num_classes} "
                            f"({', '.join(rc.classes)}); every site must label the same classes")
        if len(cohort.channels) != len(rc.channels):
            raise DataError(spec.cohort, f"site {spec.id} has {len(cohort.channels)} image channels but site "
                            f"{rid} has {len(rc.channels)}")
        if cohort.spatial_dims != rc.spatial_dims:
            raise DataError(spec.cohort, f"site {spec.id} is {cohort.spatial_dims}D but site {rid} is "
                            f"{rc.spatial_dims}D")
    assert ref is not None
    return {"classes": list(ref[1].classes), "channels": list(ref[1].channels),
            "spatial_dims": ref[1].spatial_dims, "counts": counts}


# Preprocessed subjects per (cohort, site, split, spacing), least recently used dropped first,
# so a simulation worker serving many sites holds only a few in memory.
_CACHE: OrderedDict[tuple, list[dict]] = OrderedDict()
_COHORTS: dict[str, Any] = {}


def cached_cohort(path: str):
    """The cohort at ``path``, read once per process."""
    if path not in _COHORTS:
        _COHORTS[path] = read_site_cohort(path)
    return _COHORTS[path]


def site_items(spec: SiteSpec, split: str, spacing, capacity: int = 8) -> list[dict]:
    """The site's preprocessed subjects of one split, cached (LRU of ``capacity`` entries)."""
    key = (spec.cohort, spec.cohort_site, spec.exclude, split, tuple(spacing) if spacing else None)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    cohort = cached_cohort(spec.cohort)
    items = load_preprocessed(site_subjects(cohort, spec, split), cohort, spacing)
    _CACHE[key] = items
    while len(_CACHE) > max(1, capacity):
        _CACHE.popitem(last=False)
    return items


def site_seed(site_id: str) -> int:
    """A stable per-site offset for the training seed (the same on every machine)."""
    return zlib.crc32(site_id.encode()) % 1_000_003
