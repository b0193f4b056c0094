"""Every way a data file or a cohort can be wrong ends in a DataError or ConfigError whose
message names the file (or ID) and says what is wrong, never in a traceback from deep
inside nibabel or a silently wrong array."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from privseg.data.cohort import Cohort, Subject
from privseg.data.transforms import load_subject, remap_labels
from privseg.data.validate import MAX_VOXELS, check_label_values, check_pair, read_volume
from privseg.errors import ConfigError, DataError

SHAPE = (8, 8, 8)


def nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def label(seed: int = 0, top: int = 1, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top + 1, size=shape).astype(np.uint8)


def patched_header(path: Path, edits: list[tuple[int, str, tuple]]) -> Path:
    """Write a valid NIfTI, then overwrite header fields as bytes: nibabel refuses (or
    quietly repairs) such headers when it writes them, but files in the wild have them."""
    img = nib.Nifti1Image(image(), np.eye(4))
    img.set_sform(np.eye(4), 1)
    img.set_qform(np.eye(4), 1)
    raw = bytearray(img.to_bytes())
    for offset, fmt, values in edits:
        struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def cohort_of(subjects: list[Subject], classes: int = 2, channels: int = 1, **kw) -> Cohort:
    return Cohort(
        subjects=subjects,
        classes=["background"] + [f"c{k}" for k in range(1, classes)],
        channels=[f"ch{k}" for k in range(channels)],
        **kw,
    )


def subject(sid: str, images: list[Path], lab: Path | None, site: str = "site1", split: str = "train") -> Subject:
    return Subject(
        id=sid, site=site, images=tuple(str(p) for p in images), label=str(lab) if lab else None, split=split
    )


# -- files ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ghost\.nii\.gz: file not found"):
        read_volume(tmp_path / "ghost.nii.gz")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(DataError, match=r"dir\.nii\.gz: is not a file"):
        read_volume(tmp_path / "dir.nii.gz")


@pytest.mark.parametrize("name", ["noise.nii.gz", "noise.nii"])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(600))
    with pytest.raises(DataError, match=rf"{name}: cannot read as NIfTI"):
        read_volume(path)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    full = nii(tmp_path / f"full_{name}", image())
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{name}: file is truncated or corrupt"):
        read_volume(tmp_path / name)


def test_unreadable_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(os.urandom(300))
    with pytest.raises(DataError, match=r"photo\.png: cannot read as an image"):
        read_volume(path, spatial_dims=2)


def test_rgba_photo_keeps_colour(tmp_path: Path) -> None:
    """Alpha is dropped, not averaged into grey."""
    rgba = np.random.default_rng(0).integers(0, 256, size=(6, 5, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    vol = read_volume(tmp_path / "a.png", spatial_dims=2)
    assert vol.array.shape == (6, 5, 3) and np.array_equal(vol.array, rgba[..., :3])


# -- values ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels(tmp_path: Path, bad: float) -> None:
    arr = image()
    arr[1, 2, 3] = bad
    arr[4, 4, 4] = bad
    path = nii(tmp_path / "scan.nii.gz", arr)
    with pytest.raises(DataError, match=r"scan\.nii\.gz: contains 2 NaN/Inf voxels"):
        read_volume(path)


def test_constant_image(tmp_path: Path) -> None:
    path = nii(tmp_path / "blank.nii.gz", np.full(SHAPE, 7.0, np.float32))
    with pytest.raises(DataError, match=r"blank\.nii\.gz: image is constant"):
        read_volume(path)


def test_non_integer_label(tmp_path: Path) -> None:
    lab = label().astype(np.float32)
    lab[0, 0, 0] = 0.5
    path = nii(tmp_path / "soft_seg.nii.gz", lab)
    with pytest.raises(DataError, match=r"soft_seg\.nii\.gz: label map has non-integer values"):
        read_volume(path, is_label=True)


@pytest.mark.parametrize("bad", [2, 9, -1])
def test_label_values_outside_classes(tmp_path: Path, bad: int) -> None:
    lab = label().astype(np.int16)
    lab[3, 3, 3] = bad
    vol = read_volume(nii(tmp_path / "seg.nii.gz", lab), is_label=True)
    with pytest.raises(
        DataError, match=rf"seg\.nii\.gz: label values \[{bad}\] are outside the declared classes 0\.\.1"
    ):
        check_label_values(vol, num_classes=2)


def test_unsupported_voxel_type(tmp_path: Path) -> None:
    path = nii(tmp_path / "complex.nii.gz", (image() + 1j).astype(np.complex64))
    with pytest.raises(DataError, match=r"complex\.nii\.gz: unsupported voxel type"):
        read_volume(path)


# -- headers -----------------------------------------------------------------------------

PIXDIM, DIM, SROW_Z, QFORM_CODE = 76, 40, 312, 252


@pytest.mark.parametrize(("axis", "value"), [(1, 0.0), (2, -1.5)])
def test_zero_or_negative_spacing(tmp_path: Path, axis: int, value: float) -> None:
    path = patched_header(tmp_path / "flat.nii.gz", [(PIXDIM + 4 * axis, "<f", (value,))])
    with pytest.raises(DataError, match=r"flat\.nii\.gz: voxel spacing .* must be positive"):
        read_volume(path)


def test_singular_affine(tmp_path: Path) -> None:
    path = patched_header(tmp_path / "squashed.nii.gz", [(SROW_Z, "<4f", (0, 0, 0, 0)), (QFORM_CODE, "<h", (0,))])
    with pytest.raises(DataError, match=r"squashed\.nii\.gz: affine is singular"):
        read_volume(path)


def test_absurd_declared_size(tmp_path: Path) -> None:
    path = patched_header(tmp_path / "huge.nii.gz", [(DIM, "<8h", (3, 4096, 4096, 4096, 1, 1, 1, 1))])
    with pytest.raises(DataError, match=rf"huge\.nii\.gz: declared size .* larger than {MAX_VOXELS} voxels"):
        read_volume(path)


def test_4d_where_3d_expected(tmp_path: Path) -> None:
    path = nii(tmp_path / "multi.nii.gz", image(shape=(*SHAPE, 2)))
    with pytest.raises(DataError, match=r"multi\.nii\.gz: expected a 3D volume, got shape \(8, 8, 8, 2\)"):
        read_volume(path)
    assert read_volume(path, channels_last=True).array.shape == (*SHAPE, 2)


def test_trailing_singleton_axis_is_accepted(tmp_path: Path) -> None:
    path = nii(tmp_path / "export.nii.gz", image(shape=(*SHAPE, 1)))
    assert read_volume(path).array.shape == SHAPE
    assert read_volume(path, channels_last=True).array.shape == (*SHAPE, 1)


def test_channels_last_refuses_5d(tmp_path: Path) -> None:
    path = nii(tmp_path / "five.nii.gz", image(shape=(4, 4, 4, 2, 2)))
    with pytest.raises(DataError, match=r"five\.nii\.gz: expected a 3D volume with channels last"):
        read_volume(path, channels_last=True)


# -- image/label pairs ---------------------------------------------------------------------


def test_shape_mismatch(tmp_path: Path) -> None:
    img = read_volume(nii(tmp_path / "t1.nii.gz", image()))
    lab = read_volume(nii(tmp_path / "small_seg.nii.gz", label(shape=(8, 8, 7))), is_label=True)
    with pytest.raises(DataError, match=r"small_seg\.nii\.gz: label shape \(8, 8, 7\) does not match .*t1\.nii\.gz"):
        check_pair(img, lab)


def test_affine_mismatch(tmp_path: Path) -> None:
    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    img = read_volume(nii(tmp_path / "t1.nii.gz", image()))
    lab = read_volume(nii(tmp_path / "moved_seg.nii.gz", label(), shifted), is_label=True)
    with pytest.raises(DataError, match=r"moved_seg\.nii\.gz: label affine differs .*t1\.nii\.gz"):
        check_pair(img, lab)


def test_load_subject_reports_each_problem_with_the_file(tmp_path: Path) -> None:
    t1 = nii(tmp_path / "s1_t1.nii.gz", image(1))
    t2 = nii(tmp_path / "s1_t2.nii.gz", image(2, shape=(8, 8, 6)))
    ok = nii(tmp_path / "s1_seg.nii.gz", label())
    cohort = cohort_of([subject("s1", [t1, t2], ok)], channels=2)
    with pytest.raises(DataError, match=r"s1_t2\.nii\.gz: channel geometry differs from .*s1_t1\.nii\.gz"):
        load_subject(cohort.subjects[0], cohort)
    wrong = nii(tmp_path / "s2_seg.nii.gz", label(shape=(8, 7, 8)))
    cohort = cohort_of([subject("s2", [t1], wrong)])
    with pytest.raises(DataError, match=r"s2_seg\.nii\.gz: label shape"):
        load_subject(cohort.subjects[0], cohort)
    three = nii(tmp_path / "s3_seg.nii.gz", label(top=2))
    cohort = cohort_of([subject("s3", [t1], three)])
    with pytest.raises(DataError, match=r"s3_seg\.nii\.gz: label values \[2\] are outside"):
        load_subject(cohort.subjects[0], cohort)


def test_load_subject_4d_constant_channel(tmp_path: Path) -> None:
    arr = image(shape=(*SHAPE, 2))
    arr[..., 1] = 3.0
    case = nii(tmp_path / "case.nii.gz", arr)
    cohort = cohort_of([subject("case", [case], None)], channels=2, info={"channels_in_file": True})
    with pytest.raises(DataError, match=r"case\.nii\.gz: channel 1 of the 4D image is constant"):
        load_subject(cohort.subjects[0], cohort)


def test_label_map_applies_and_rejects_nonsense(tmp_path: Path) -> None:
    lab = np.array([0, 255, 7, 255])
    assert remap_labels(lab, {"255": 1}).tolist() == [0, 1, 7, 1]
    with pytest.raises(ConfigError, match=r"label_map .* integer"):
        remap_labels(lab, {"white": "one"})


# -- cohorts and IDs -------------------------------------------------------------------------


def two_sites(tmp_path: Path) -> Cohort:
    img = nii(tmp_path / "img.nii.gz", image())
    lab = nii(tmp_path / "lab.nii.gz", label())
    subjects = [
        subject("p1", [img], lab, "hospA"),
        subject("p2", [img], lab, "hospA"),
        subject("p3", [img], lab, "hospB"),
        subject("p4", [img], lab, "hospB", split="test"),
    ]
    return cohort_of(subjects, name="demo")


def test_duplicate_subject_ids(tmp_path: Path) -> None:
    img = nii(tmp_path / "img.nii.gz", image())
    with pytest.raises(DataError, match=r"duplicate subject ID 'p1'"):
        cohort_of([subject("p1", [img], None), subject("p1", [img], None, site="other")])


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "", ".hidden", "x" * 200, "with space"])
def test_unsafe_subject_ids(bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"subject ID {bad!r} is not safe")):
        Subject(id=bad, site="site1", images=("x.nii.gz",), label=None)


@pytest.mark.parametrize("bad", ["../x", "a/b"])
def test_unsafe_site_ids(bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"site ID {bad!r} is not safe")):
        Subject(id="p1", site=bad, images=("x.nii.gz",), label=None)


def test_subject_without_images_or_with_bad_split() -> None:
    with pytest.raises(ConfigError, match=r"subject p1: no image channels"):
        Subject(id="p1", site="s", images=(), label=None)
    with pytest.raises(ConfigError, match=r"subject p1: split 'holdout' is not one of"):
        Subject(id="p1", site="s", images=("x",), label=None, split="holdout")


def test_channel_count_mismatch(tmp_path: Path) -> None:
    img = nii(tmp_path / "only_t1.nii.gz", image())
    with pytest.raises(DataError, match=r"only_t1\.nii\.gz: subject p1 has 1 image files, cohort expects 2"):
        cohort_of([subject("p1", [img], None)], channels=2)


def test_unknown_subject_and_site(tmp_path: Path) -> None:
    cohort = two_sites(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown subject ID 'p9'"):
        cohort.subject("p9")
    with pytest.raises(ConfigError, match=r"unknown site ID 'hospZ' \(sites: hospA, hospB\)"):
        cohort.select(site="hospZ")
    with pytest.raises(ConfigError, match=r"split 'dev' is not one of"):
        cohort.select(split="dev")
    assert [s.id for s in cohort.select("train", "hospB")] == ["p3"]


def test_forget_split_errors(tmp_path: Path) -> None:
    cohort = two_sites(tmp_path)
    with pytest.raises(ConfigError, match=r"forget request is empty"):
        cohort.forget_split([])
    with pytest.raises(ConfigError, match=r"forget request is empty"):
        cohort.forget_split(["  ", ""])
    with pytest.raises(ConfigError, match=r"forget ID 'p9' is unknown"):
        cohort.forget_split(["p1", "p9"])
    with pytest.raises(ConfigError, match=r"forget ID 'p4' is not a training subject"):
        cohort.forget_split(["p4"])
    with pytest.raises(ConfigError, match=r"'\.\./p1' is not safe"):
        cohort.forget_split(["../p1"])
    with pytest.raises(ConfigError, match=r"names every training subject"):
        cohort.forget_split(["p1", "p2", "p3"])
    retain, forget = cohort.forget_split(["p2", "p2"])
    assert [s.id for s in retain] == ["p1", "p3"] and [s.id for s in forget] == ["p2"]


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cohort\.json: manifest not found"):
        Cohort.from_manifest(tmp_path / "cohort.json")
    (tmp_path / "cohort.json").write_text("{broken")
    with pytest.raises(DataError, match=r"cohort\.json: manifest is not valid JSON"):
        Cohort.from_manifest(tmp_path / "cohort.json")
    (tmp_path / "cohort.json").write_text(json.dumps({"classes": ["bg", "x"], "channels": ["c"]}))
    with pytest.raises(DataError, match=r"cohort\.json: manifest is missing or has a malformed field"):
        Cohort.from_manifest(tmp_path / "cohort.json")
    bad = {"classes": ["bg", "x"], "channels": ["c"], "subjects": [{"id": "../x", "site": "s", "images": ["a"]}]}
    (tmp_path / "cohort.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"cohort\.json: subject ID '\.\./x' is not safe"):
        Cohort.from_manifest(tmp_path / "cohort.json")
