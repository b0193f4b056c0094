"""2D photographs (dermoscopy style): ``images/<id>.png|jpg`` + ``masks/<id>.png``, optionally per site folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privseg.data.cohort import Cohort, Subject
from privseg.data.formats.common import (
    class_names,
    finish_cohort,
    image_stem,
    note_problem,
    require_dir,
    site_folders,
    visible,
)
from privseg.data.formats.pairing import check_orphan_image_dir, image_ids, pair_by_name, pair_dirs
from privseg.data.validate import read_volume
from privseg.errors import ConfigError, DataError

IMAGE_DIRS = ("images",)
MASK_DIRS = ("masks", "labels")
MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_label", "")  # ISIC names masks <id>_segmentation.png
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _has_2d_layout(folder: Path) -> bool:
    dirs = pair_dirs(folder, IMAGE_DIRS, MASK_DIRS)
    return dirs is not None and any(image_stem(f.name) for f in visible(dirs[0]))


def is_image2d(root: Path) -> bool:
    """Whether ``root``, or a site folder in it, holds an image folder with images and a mask folder beside it."""
    return bool(site_folders(root, _has_2d_layout))


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
    root = require_dir(root)
    check_orphan_image_dir(root, IMAGE_DIRS, MASK_DIRS)
    sites = site_folders(root, _has_2d_layout)
    if not sites:
        raise DataError(root, "no images/ + masks/ folders with 2D images found (nor in site subfolders)")
    subjects = []
    for site, folder in sites:
        dirs = pair_dirs(folder, IMAGE_DIRS, MASK_DIRS)
        assert dirs is not None
        images = image_ids([(stem, f) for f in visible(dirs[0]) if (stem := image_stem(f.name)) and f.is_file()])
        masks = []
        for f in visible(dirs[1]):
            stem = image_stem(f.name)
            if stem is None or not f.is_file():
                continue
            if f.name.lower().endswith(LOSSY_SUFFIXES):
                note_problem(DataError(f, "mask is JPEG (lossy): its edges hold values no class has; "
                                       "save masks as PNG"))
                continue
            masks.append((stem, f))
        if not images:
            note_problem(DataError(dirs[0], "no 2D images found"))
            continue
        pairs = pair_by_name(images, masks, MASK_SUFFIXES, "mask")
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
        names = ["background", "foreground"] if classes is None else class_names(classes)
        if len(names) != 2:
            raise ConfigError(f"masks are binary 0/255 ({first_mask}) but classes has {len(names)} entries")
    elif classes is not None:
        names = class_names(classes)
    else:
        if int(values.max()) >= 255:
            raise DataError(first_mask, f"mask values {values[:8].tolist()} are neither 0/255 nor class indices")
        names = ["background"] + [f"class{k}" for k in range(1, int(values.max()) + 1)]
    return finish_cohort(
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


