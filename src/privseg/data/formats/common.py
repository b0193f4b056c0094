"""Helpers every layout reader shares: folder listing and name stems, subject-ID checks, the
problem collection behind ``privseg data check`` (:func:`collect_problems`), class inference
from label files, and :func:`finish_cohort`, which turns a reader's subjects into a :class:`Cohort`."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from privseg.data.cohort import Cohort, Subject, assign_splits
from privseg.data.validate import IMAGE_2D_SUFFIXES, read_volume
from privseg.errors import ConfigError, DataError
from privseg.utils import check_id

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_SITE = "site1"


def require_dir(root: str | Path) -> Path:
    """``root`` as an absolute path; a DataError naming it when it is missing or not a folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    return root.resolve()


def visible(folder: Path) -> list[Path]:
    """Entries of a folder, sorted, without hidden files and macOS archive debris."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX")


def strip_suffix(name: str, suffixes: Iterable[str]) -> str | None:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive), else None."""
    for suf in suffixes:
        if name.lower().endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return None


def nifti_stem(name: str) -> str | None:
    """A NIfTI file name without .nii.gz / .nii, else None."""
    return strip_suffix(name, NIFTI_SUFFIXES)


def image_stem(name: str) -> str | None:
    """A 2D image file name without its suffix, else None."""
    return strip_suffix(name, IMAGE_2D_SUFFIXES)


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


def note_problem(exc: DataError) -> None:
    """Raise ``exc``, or under :func:`collect_problems` record it so the caller can skip the subject."""
    problems = _PROBLEMS.get()
    if problems is None:
        raise exc
    problems.append(exc)


def problems_noted() -> int:
    """How many problems :func:`note_problem` has recorded in the current :func:`collect_problems` block."""
    problems = _PROBLEMS.get()
    return 0 if problems is None else len(problems)


def checked_id(value: str, where: object, what: str = "subject ID") -> str:
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
            note_problem(DataError(s.images[0], f"duplicate subject ID {s.id!r} (also from {seen[s.id]})"))
            continue
        seen[s.id] = s.images[0]
        out.append(s)
    return out


def finish_cohort(
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


def site_folders(root: Path, has_layout: Callable[[Path], bool]) -> list[tuple[str, Path]]:
    """The root itself when it holds the layout (one site), else its subfolders that do,
    each a site named after the folder."""
    if has_layout(root):
        return [(DEFAULT_SITE, root)]
    out = []
    for d in visible(root):
        if d.is_dir() and has_layout(d):
            try:
                out.append((checked_id(d.name, d, "site ID"), d))
            except DataError as exc:
                note_problem(exc)
    return out


CLASSES_HINT = "declare the classes with --classes background,NAME,... (one name per label value 0, 1, 2, ...)"


def classes_hint(top: int, names: Sequence[str] = ()) -> str:
    """A ``--classes`` value that reads label values 0..``top`` as given: the ``names`` declared so
    far, then ``classK`` for each value they leave out (a hint the user can paste as it is)."""
    full = [*names[: top + 1], *[f"class{k}" for k in range(len(names[: top + 1]), top + 1)]]
    full[0] = full[0] if names else "background"
    return (f"declare one class per label value 0..{top}: --classes {shlex.quote(','.join(full))} "
            "(rename the classes as you like)")
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


def classes_from_labels(labels: Sequence[Path]) -> list[str]:
    """Infer classes as 0..max over the union of every label file's values, so the answer
    does not depend on which file sorts first. The values must be contiguous: a gap means
    the files use codes (e.g. 0 and 17) that only declared classes can give a meaning; the
    error names the first file holding a value past the gap."""
    seen: dict[int, Path] = {}
    for path in labels:
        try:
            values = _label_values(path)
        except DataError as exc:
            note_problem(exc)  # under data check: listed here, and the other files still inform the classes
            continue
        for v in values:
            seen.setdefault(v, path)
    if not seen:  # each unreadable file is its own problem; declaring classes would not read them
        raise DataError(labels[0], "no readable label file: cannot infer the classes")
    values = sorted(seen)
    if values[0] < 0:
        raise DataError(seen[values[0]], f"label values include {values[0]} (negative): cannot infer the classes")
    top = values[-1]
    if top == 0:
        what = "label is" if len(labels) == 1 else f"all {len(labels)} labels are"
        # declared classes would not help: a subject without foreground is refused when it is loaded
        raise DataError(labels[0], f"{what} all background: cannot infer the classes, and there is nothing to "
                        "segment (an empty or failed export?)")
    if top > 255:  # codes rather than class indices (no task has hundreds of classes)
        named = ", ".join(f'"{v}": "{"background" if v == 0 else f"class{v}"}"' for v in values[:8])
        raise DataError(seen[top], f"label values go up to {top}: cannot infer the classes; these look like codes: "
                        "name each value in a dataset.json in the dataset folder, e.g. "
                        f'{{"labels": {{{named}{", ..." if len(values) > 8 else ""}}}}} (values are mapped to '
                        "classes 0, 1, 2, ... in that order)")
    gap = next((k for k in range(top + 1) if k not in seen), None)
    if gap is not None:
        past = min((v for v in values if v > gap), key=lambda v: str(seen[v]))
        raise DataError(seen[past], f"holds label value {past} but no label file holds {gap}: label values "
                        f"{values} are not contiguous 0..{len(values) - 1}, so the classes cannot be inferred; "
                        f"{classes_hint(top)}")
    return ["background"] + [f"class{k}" for k in range(1, top + 1)]


def _dims_of(path: Path) -> int:
    return 2 if image_stem(path.name) is not None else 3


def class_names(classes: Sequence[str] | int) -> list[str]:
    """Declared class names, or for a count K: background, class1 ... class(K-1)."""
    if isinstance(classes, int):
        return ["background"] + [f"class{k}" for k in range(1, classes)]
    return [str(c) for c in classes]

