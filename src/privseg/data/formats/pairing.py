"""Pairing images with labels by name, for the folder layouts (2D image folders, plain NIfTI)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from privseg.data.formats.common import checked_id, note_problem, visible
from privseg.errors import DataError


def pair_dirs(folder: Path, image_dirs: Sequence[str], label_dirs: Sequence[str]) -> tuple[Path, Path] | None:
    """The first (image folder, label folder) pair present in ``folder``, else None."""
    for i in image_dirs:
        for m in label_dirs:
            if (folder / i).is_dir() and (folder / m).is_dir():
                return folder / i, folder / m
    return None


def check_orphan_image_dir(root: Path, image_dirs: Sequence[str], label_dirs: Sequence[str]) -> None:
    """An image folder without its label folder (at the root or in a site folder) is a
    half-copied dataset; say so instead of "unknown layout" or silently skipping a site."""
    has_pair = pair_dirs(root, image_dirs, label_dirs) is not None
    for folder in [root] + ([] if has_pair else [d for d in visible(root) if d.is_dir()]):
        for name in image_dirs:
            if (folder / name).is_dir() and not any((folder / m).is_dir() for m in label_dirs):
                raise DataError(
                    folder / name, f"has no sibling label folder ({' or '.join(d + '/' for d in label_dirs)})"
                )



def pair_by_name(
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
            note_problem(exc)
    for key, image in images.items():
        if key not in out:
            note_problem(DataError(image, f"image has no {label_what} (looked for {key}{{{','.join(suffixes)}}})"))
    return out


def image_ids(files: Iterable[tuple[str, Path]]) -> dict[str, Path]:
    """Subject ID -> image file; an unsafe or repeated ID is a problem naming the file."""
    images: dict[str, Path] = {}
    for stem, f in files:
        try:
            sid = checked_id(stem, f)
            if sid in images:
                raise DataError(f, f"duplicate subject ID {sid!r} (also {images[sid].name})")
            images[sid] = f
        except DataError as exc:
            note_problem(exc)
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

