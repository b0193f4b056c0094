"""Fuzzing kit for the readers and the CLI: tiny valid datasets in every supported layout, the
ways a file from a hospital export can be broken, and the checks every broken input must pass.

A *case* is a valid dataset (one of :data:`FORMATS`) with one mutation applied to one file
(:data:`MUTATIONS`), or a manifest / dataset.json with one field replaced by an arbitrary JSON
value, or a command line with an unsafe ID or a bad path. The oracle (:func:`check_reader`,
:func:`check_cli`): reading ends in a :class:`~privseg.errors.PrivsegError` whose message names
the broken file (or argument) and the kind of problem; through ``privseg.cli.main`` the exit
code is 2, nothing on stdout or stderr is a traceback, and nothing is written where the command
would write its output. Mutations are drawn by hypothesis (``tests/system/test_fuzz.py``); every case
tried is counted in :mod:`reliability_log`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from privseg.errors import PrivsegError

SIZE = 16
FORMATS = ("manifest", "msd", "nnunet", "mrbrains18", "nifti", "image2d")
NIFTI_FORMATS = ("manifest", "msd", "nnunet", "mrbrains18", "nifti")

# NIfTI-1 header offsets (bytes)
DIM, DATATYPE, BITPIX, PIXDIM, VOX_OFFSET, SCL_SLOPE = 40, 70, 72, 76, 108, 112
QFORM_CODE, SFORM_CODE, SROW_X = 252, 254, 280


# -- valid datasets --------------------------------------------------------------------------

@dataclass
class Dataset:
    root: Path
    fmt: str
    num_classes: int
    subjects: list = field(default_factory=list)  # privseg Subjects as read back (absolute paths)
    targets: list[int] | None = None  # indices of the subjects a mutation may damage (None: any)

    def subject(self, k: int):
        return self.subjects[k % len(self.subjects)]


def _blob(rng: np.random.Generator, shape: tuple[int, ...], top: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.2, 0.2, size=len(shape)).reshape(-1, *([1] * len(shape)))
    r = np.sqrt((((grid - centre) / 0.7) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    for k in range(1, top + 1):  # nested shells: class k inside radius 1 - (k-1)/top
        label[r < 1.0 - (k - 1) / (top + 0.5)] = k
    image = label.astype(np.float32) + rng.normal(0, 0.1, shape).astype(np.float32)
    return image, label


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine)
    nib.save(img, str(path))
    return path


def build_dataset(fmt: str, root: Path, seed: int = 0) -> Dataset:
    """A tiny valid dataset (2 sites or 1, 4 subjects, 16^3 or 16^2) in layout ``fmt``."""
    from privseg.data.cohort import Cohort, Subject, assign_splits
    from privseg.data.formats import read_cohort

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shape = (SIZE,) * 3
    ids = [f"case{k:03d}" for k in range(4)]
    if fmt == "manifest":
        subjects = []
        for k, sid in enumerate(ids):
            img, lab = _blob(rng, shape, 2)
            i = write_nifti(root / "images" / f"{sid}.nii.gz", img)
            la = write_nifti(root / "labels" / f"{sid}.nii.gz", lab)
            subjects.append(Subject(id=sid, site=f"H{k % 2 + 1}", images=(str(i),), label=str(la), modality="T1"))
        Cohort(subjects=assign_splits(subjects, test_fraction=0.5, seed=0), classes=["background", "organ", "core"],
               channels=["T1"], name="fuzz", root=root).save()
    elif fmt == "msd":
        training = []
        for sid in ids:
            img, lab = _blob(rng, shape, 2)
            img4 = np.stack([img, img * 0.5 + rng.normal(0, 0.1, shape).astype(np.float32)], axis=-1)
            write_nifti(root / "imagesTr" / f"{sid}.nii.gz", img4.astype(np.float32))
            write_nifti(root / "labelsTr" / f"{sid}.nii.gz", lab)
            training.append({"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"})
        (root / "dataset.json").write_text(json.dumps({
            "name": "Fuzz", "modality": {"0": "T1", "1": "T2"},
            "labels": {"0": "background", "1": "organ", "2": "core"},
            "numTraining": len(ids), "training": training}))
    elif fmt == "nnunet":
        for sid in ids:
            img, lab = _blob(rng, shape, 2)
            write_nifti(root / "imagesTr" / f"{sid}_0000.nii.gz", img * 100)
            write_nifti(root / "labelsTr" / f"{sid}.nii.gz", lab)
        (root / "dataset.json").write_text(json.dumps({
            "name": "Fuzz", "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "core": 2},
            "numTraining": len(ids), "file_ending": ".nii.gz"}))
    elif fmt == "mrbrains18":
        for k in range(4):
            img, lab = _blob(rng, shape, 3)
            d = root / str(k + 1)
            for name in ("reg_T1", "reg_IR", "FLAIR"):
                write_nifti(d / "pre" / f"{name}.nii.gz", img + rng.normal(0, 0.05, shape).astype(np.float32))
            write_nifti(d / "segm.nii.gz", lab)
    elif fmt == "nifti":
        for sid in ids:
            img, lab = _blob(rng, shape, 2)
            write_nifti(root / "images" / f"{sid}.nii.gz", img)
            write_nifti(root / "labels" / f"{sid}.nii.gz", lab)
    elif fmt == "image2d":
        for sid in ids:
            img, lab = _blob(rng, (SIZE, SIZE), 1)
            rgb = np.clip(np.stack([img, 1 - img, img * 0.5], -1) * 120 + 60, 0, 255).astype(np.uint8)
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb, "RGB").save(root / "images" / f"{sid}.png")
            Image.fromarray((lab * 255).astype(np.uint8), "L").save(root / "masks" / f"{sid}_segmentation.png")
    else:  # pragma: no cover
        raise ValueError(fmt)
    cohort = read_cohort(root)
    return Dataset(root, fmt, cohort.num_classes, list(cohort.subjects))


_TEMPLATES: dict[str, Path] = {}


def fresh_dataset(fmt: str, where: Path, template_root: Path) -> Dataset:
    """A copy of the (cached) valid dataset of layout ``fmt`` under ``where``."""
    from privseg.data.formats import read_cohort

    if fmt not in _TEMPLATES or not _TEMPLATES[fmt].exists():
        _TEMPLATES[fmt] = build_dataset(fmt, template_root / fmt).root
    dst = where / fmt
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(_TEMPLATES[fmt], dst)
    cohort = read_cohort(dst)
    return Dataset(dst, fmt, cohort.num_classes, list(cohort.subjects))


# -- NIfTI byte-level helpers ---------------------------------------------------------------

def nifti_bytes(path: Path) -> bytearray:
    raw = path.read_bytes()
    return bytearray(gzip.decompress(raw) if path.name.endswith(".gz") else raw)


def write_raw(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))


def patch_header(path: Path, edits: list[tuple[int, str, tuple]]) -> None:
    raw = nifti_bytes(path)
    for offset, fmt, values in edits:
        struct.pack_into(fmt, raw, offset, *values)
    write_raw(path, raw)


def load_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.ascontiguousarray(np.asarray(img.dataobj)), img.affine  # C order: flat edits write through


# -- mutations ---------------------------------------------------------------------------------
# Each mutation: (draw, dataset) -> Expect. ``draw`` is hypothesis' data.draw; ``st`` strategies.

@dataclass
class Expect:
    files: set[str]  # file names (any of them) the message must contain
    words: tuple[str, ...]  # the message must contain one of these (the problem)
    subject: str = ""  # the mutated subject


Mutation = Callable[..., Expect]
MUTATIONS: dict[str, tuple[tuple[str, ...], Mutation]] = {}


def mutation(*formats: str):
    def wrap(fn: Mutation) -> Mutation:
        MUTATIONS[fn.__name__] = (formats or FORMATS, fn)
        return fn
    return wrap


def _pick(draw, ds: Dataset, st, which: str = "any", avoid_first: bool = False):
    allowed = ds.targets if ds.targets is not None else list(range(len(ds.subjects)))
    allowed = [k for k in allowed if not (avoid_first and k == 0)] or list(range(1, len(ds.subjects)))
    s = ds.subjects[draw(st.sampled_from(allowed))]
    if which == "label":
        return s, Path(s.label)
    if which == "image":
        return s, Path(draw(st.sampled_from(s.images)))
    return s, Path(draw(st.sampled_from([*s.images, s.label])))


def _spatial(ds: Dataset) -> int:
    return 2 if ds.fmt == "image2d" else 3


# file-level damage (every format) ---------------------------------------------------------------

@mutation()
def truncate(draw, ds, st):
    s, path = _pick(draw, ds, st)
    raw = path.read_bytes()
    frac = draw(st.floats(0.0, 0.97))
    path.write_bytes(raw[: int(len(raw) * frac)])
    return Expect({path.name}, ("truncated", "corrupt", "cannot read", "empty"), s.id)


@mutation()
def corrupt_bytes(draw, ds, st):
    """Overwrite bytes inside the compressed stream (past the gzip header) or the PNG data."""
    s, path = _pick(draw, ds, st)
    raw = bytearray(path.read_bytes())
    start = 10 if path.name.endswith(".gz") else 8
    n = draw(st.integers(1, 8))
    for _ in range(n):
        i = draw(st.integers(start, len(raw) - 9))
        raw[i] = (raw[i] + draw(st.integers(1, 255))) % 256
    path.write_bytes(bytes(raw))
    return Expect({path.name}, ("truncated", "corrupt", "cannot read", "CRC", "checksum"), s.id)


@mutation()
def garbage(draw, ds, st):
    s, path = _pick(draw, ds, st)
    path.write_bytes(draw(st.binary(min_size=0, max_size=700)))
    return Expect({path.name}, ("truncated", "corrupt", "cannot read", "empty"), s.id)


@mutation()
def missing_file(draw, ds, st):
    s, path = _pick(draw, ds, st)
    path.unlink()
    # a layout reader may see the orphan partner instead of the missing file: either is named
    partners = {Path(p).name for p in (*s.images, s.label)}
    return Expect(partners | {path.name, s.id}, ("not found", "missing", "no matching", "has no"), s.id)


# NIfTI headers -------------------------------------------------------------------------------------

@mutation(*NIFTI_FORMATS)
def bad_spacing(draw, ds, st):
    s, path = _pick(draw, ds, st)
    axis = draw(st.integers(1, 3))
    value = draw(st.sampled_from([0.0, -0.0, float("nan"), float("inf")]) | st.floats(-1e6, -1e-6))
    patch_header(path, [(PIXDIM + 4 * axis, "<f", (value,))])
    return Expect({path.name}, ("spacing",), s.id)


@mutation(*NIFTI_FORMATS)
def singular_affine(draw, ds, st):
    s, path = _pick(draw, ds, st)
    kind = draw(st.sampled_from(["zero_row", "zero_all", "repeat_row", "nan", "inf"]))
    arr, aff = load_array(path)
    rows = np.asarray(aff[:3], dtype=np.float32).copy()
    if kind == "zero_row":
        rows[draw(st.integers(0, 2)), :3] = 0
    elif kind == "zero_all":
        rows[:, :3] = 0
    elif kind == "repeat_row":
        rows[2, :3] = rows[0, :3]
    else:
        rows[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = np.nan if kind == "nan" else np.inf
    patch_header(path, [(SROW_X, "<12f", tuple(float(x) for x in rows.ravel())), (SFORM_CODE, "<h", (2,)),
                        (QFORM_CODE, "<h", (0,))])
    return Expect({path.name}, ("affine",), s.id)


@mutation(*NIFTI_FORMATS)
def huge_declared_size(draw, ds, st):
    s, path = _pick(draw, ds, st)
    raw = nifti_bytes(path)
    ndim = struct.unpack_from("<h", raw, DIM)[0]
    dims = [draw(st.integers(1, 32767)) for _ in range(ndim)]
    if np.prod(dims, dtype=np.float64) <= SIZE ** 3 * 2:  # must differ from the stored data
        dims[0] = 32767
    struct.pack_into("<h", raw, DIM + 2, dims[0])
    for i, d in enumerate(dims[1:], start=2):
        struct.pack_into("<h", raw, DIM + 2 * i, d)
    write_raw(path, raw)
    return Expect({path.name}, ("declared size", "truncated", "corrupt", "cannot read", "expected a"), s.id)


@mutation(*NIFTI_FORMATS)
def bad_dim_count(draw, ds, st):
    s, path = _pick(draw, ds, st)
    value = draw(st.sampled_from([0, -1, 8, 9, 100, -32768]))
    patch_header(path, [(DIM, "<h", (value,))])
    return Expect({path.name}, ("cannot read", "expected a", "empty", "corrupt"), s.id)


@mutation(*NIFTI_FORMATS)
def negative_dim(draw, ds, st):
    s, path = _pick(draw, ds, st)
    axis = draw(st.integers(1, 3))
    patch_header(path, [(DIM + 2 * axis, "<h", (draw(st.integers(-32768, 0)),))])
    return Expect({path.name}, ("cannot read", "empty", "expected a", "corrupt", "truncated"), s.id)


@mutation(*NIFTI_FORMATS)
def bad_datatype(draw, ds, st):
    s, path = _pick(draw, ds, st)
    code = draw(st.sampled_from([0, 1, 3, 5, 7, 9, 13, 1793, 2304, 9999, -1]))
    patch_header(path, [(DATATYPE, "<h", (code,))])
    return Expect({path.name}, ("cannot read", "voxel type", "truncated", "corrupt"), s.id)


@mutation(*NIFTI_FORMATS)
def bad_vox_offset(draw, ds, st):
    s, path = _pick(draw, ds, st)
    value = draw(st.sampled_from([1e9, 1e30, float("inf"), float("nan")]) | st.floats(1e6, 1e12))
    patch_header(path, [(VOX_OFFSET, "<f", (value,))])
    return Expect({path.name}, ("cannot read", "truncated", "corrupt"), s.id)


@mutation(*NIFTI_FORMATS)
def bad_scaling(draw, ds, st):
    s, path = _pick(draw, ds, st, "image")
    field = draw(st.sampled_from([SCL_SLOPE, SCL_SLOPE + 4]))  # scl_slope or scl_inter
    patch_header(path, [(field, "<f", (draw(st.sampled_from([float("inf"), -float("inf")])),))])
    return Expect({path.name}, ("scaling", "slope", "intercept"), s.id)


# NIfTI arrays --------------------------------------------------------------------------------------

def _rewrite(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    path.unlink()
    write_nifti(path, arr, affine)


@mutation(*NIFTI_FORMATS)
def too_few_dims(draw, ds, st):
    s, path = _pick(draw, ds, st)
    arr, aff = load_array(path)
    keep = draw(st.integers(1, 2))
    arr = arr[(slice(None),) * keep + (0,) * (arr.ndim - keep)]
    _rewrite(path, np.ascontiguousarray(arr), aff)
    return Expect({path.name}, ("expected a", "channels", "does not match", "geometry", "constant"), s.id)


@mutation(*NIFTI_FORMATS)
def too_many_dims(draw, ds, st):
    s, path = _pick(draw, ds, st)
    arr, aff = load_array(path)
    extra = draw(st.integers(2, 3))
    if ds.fmt == "msd" and str(path) in s.images and draw(st.booleans()):
        arr = np.concatenate([arr] + [arr[..., :1]] * (extra - 1), axis=-1)  # 4D with too many channels
    else:
        arr = np.stack([arr] * extra, axis=-1)
    _rewrite(path, np.ascontiguousarray(arr), aff)
    return Expect({path.name}, ("expected a", "channels", "does not match"), s.id)


@mutation(*NIFTI_FORMATS)
def shape_mismatch(draw, ds, st):
    s, path = _pick(draw, ds, st, "label", avoid_first=ds.fmt == "nifti")  # nifti infers classes from #1
    arr, aff = load_array(path)
    axis = draw(st.integers(0, 2))
    n = draw(st.integers(1, SIZE - 1))
    arr = np.take(arr, range(n), axis=axis) if draw(st.booleans()) else np.concatenate(
        [arr, np.take(arr, range(n), axis=axis)], axis=axis)
    _rewrite(path, np.ascontiguousarray(arr), aff)
    return Expect({path.name}, ("shape", "geometry"), s.id)


@mutation(*NIFTI_FORMATS)
def affine_mismatch(draw, ds, st):
    s, path = _pick(draw, ds, st, "label")
    arr, aff = load_array(path)
    aff = aff.copy()
    if draw(st.booleans()):
        aff[draw(st.integers(0, 2)), 3] += draw(st.floats(0.01, 500)) * draw(st.sampled_from([-1, 1]))
    else:
        axis = draw(st.integers(0, 2))
        aff[axis, axis] *= draw(st.floats(1.01, 4))  # another voxel size on one axis
    _rewrite(path, arr, aff)
    return Expect({path.name}, ("affine", "geometry"), s.id)


@mutation(*NIFTI_FORMATS)
def channel_geometry(draw, ds, st):
    """A second channel file (or the MSD 4D file's partner) on another grid."""
    s, path = _pick(draw, ds, st, "image")
    arr, aff = load_array(path)
    if len(s.images) > 1:
        arr = arr[: SIZE - draw(st.integers(1, 4))]
        expect = ("geometry", "shape")
    else:
        aff = aff.copy()
        aff[0, 3] += 10.0
        expect = ("affine", "geometry")
    _rewrite(path, np.ascontiguousarray(arr), aff)
    return Expect({path.name, Path(s.label).name, *(Path(p).name for p in s.images)}, expect, s.id)


@mutation(*NIFTI_FORMATS)
def nonfinite_voxels(draw, ds, st):
    s, path = _pick(draw, ds, st, "image")
    arr, aff = load_array(path)
    arr = arr.astype(draw(st.sampled_from([np.float32, np.float64])))
    flat = arr.reshape(-1)
    for _ in range(draw(st.integers(1, 20))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    _rewrite(path, arr, aff)
    return Expect({path.name}, ("NaN/Inf",), s.id)


@mutation(*NIFTI_FORMATS)
def constant_image(draw, ds, st):
    s, path = _pick(draw, ds, st, "image")
    arr, aff = load_array(path)
    value = draw(st.floats(-1e6, 1e6, allow_nan=False))
    if arr.ndim == 4 and draw(st.booleans()):  # one constant channel of an MSD 4D file
        arr = arr.copy()
        arr[..., draw(st.integers(0, arr.shape[-1] - 1))] = value
    else:
        arr = np.full(arr.shape, value, np.float32)
    _rewrite(path, arr.astype(np.float32), aff)
    return Expect({path.name}, ("constant",), s.id)


@mutation(*NIFTI_FORMATS)
def label_out_of_range(draw, ds, st):
    # the plain NIfTI folder infers its classes from the union of its labels: a value one past
    # the top is a new (contiguous) class there, so damage with values that leave a gap
    s, path = _pick(draw, ds, st, "label", avoid_first=ds.fmt == "nifti")
    arr, aff = load_array(path)
    arr = arr.astype(np.int32)
    flat = arr.reshape(-1)
    top = ds.num_classes
    if ds.fmt == "mrbrains18":
        top = 11  # the 11 published labels are accepted (merged into tissues)
    bad = draw(st.integers(-100000, -1) | st.integers(top + (ds.fmt == "nifti"), 100000))
    for _ in range(draw(st.integers(1, 5))):
        flat[draw(st.integers(0, flat.size - 1))] = bad
    _rewrite(path, arr, aff)
    return Expect({path.name}, ("outside", "cannot infer", "label values"), s.id)


@mutation(*NIFTI_FORMATS)
def label_not_integer(draw, ds, st):
    s, path = _pick(draw, ds, st, "label")
    arr, aff = load_array(path)
    arr = arr.astype(np.float32)
    flat = arr.reshape(-1)
    flat[draw(st.integers(0, flat.size - 1))] = draw(
        st.sampled_from([np.nan, np.inf, 0.5, 1.25, -0.001]) | st.floats(0.01, 0.99))
    _rewrite(path, arr, aff)
    return Expect({path.name}, ("non-integer", "NaN/Inf"), s.id)


@mutation(*NIFTI_FORMATS, "image2d")
def empty_mask(draw, ds, st):
    s, path = _pick(draw, ds, st, "label")
    if ds.fmt == "image2d":
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8), "L").save(path)
    else:
        arr, aff = load_array(path)
        _rewrite(path, np.zeros(arr.shape, arr.dtype), aff)
    return Expect({path.name}, ("no foreground", "all background"), s.id)


@mutation(*NIFTI_FORMATS)
def wrong_dtype(draw, ds, st):
    s, path = _pick(draw, ds, st)
    arr, aff = load_array(path)
    kind = draw(st.sampled_from(["complex64", "complex128", "rgb"]))
    if kind == "rgb":
        rgb = np.zeros(arr.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["R"] = np.clip(arr[..., 0] if arr.ndim == 4 else arr, 0, 255)
        out = rgb
    else:
        out = (arr + 1j).astype(kind)
    path.unlink()
    nib.save(nib.Nifti1Image(out, aff), str(path))
    return Expect({path.name}, ("voxel type", "cannot read"), s.id)


@mutation("msd", "nnunet", "mrbrains18")
def missing_channel(draw, ds, st):
    s, path = _pick(draw, ds, st, "image")
    if ds.fmt == "msd":  # 2 channels in one 4D file -> keep one
        arr, aff = load_array(path)
        _rewrite(path, np.ascontiguousarray(arr[..., :1]), aff)
        return Expect({path.name}, ("channels",), s.id)
    path.unlink()
    return Expect({path.name, s.id, Path(s.label).name}, ("not found", "missing", "has no image"), s.id)


# 2D images --------------------------------------------------------------------------------------------

@mutation("image2d")
def mask_values(draw, ds, st):
    s, path = _pick(draw, ds, st, "label", avoid_first=True)
    arr = np.asarray(Image.open(path)).copy()
    bad = draw(st.integers(2, 254))
    for _ in range(draw(st.integers(1, 5))):
        arr[draw(st.integers(0, SIZE - 1)), draw(st.integers(0, SIZE - 1))] = bad
    Image.fromarray(arr, "L").save(path)
    return Expect({path.name}, ("outside",), s.id)


@mutation("image2d")
def mask_size(draw, ds, st):
    s, path = _pick(draw, ds, st, "label")
    arr = np.asarray(Image.open(path))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if (h, w) == arr.shape:
        h += 1
    Image.fromarray(np.resize(arr, (h, w)), "L").save(path)
    return Expect({path.name}, ("shape",), s.id)


@mutation("image2d")
def image_constant_2d(draw, ds, st):
    s, path = _pick(draw, ds, st, "image")
    value = draw(st.integers(0, 255))
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8), "RGB").save(path)
    return Expect({path.name}, ("constant",), s.id)


@mutation("image2d")
def image_mode_2d(draw, ds, st):
    """A grey (or 16-bit) photo among colour ones: the channel count differs from the cohort's."""
    s, path = _pick(draw, ds, st, "image", avoid_first=True)
    arr = np.asarray(Image.open(path).convert("L"))
    if draw(st.booleans()):
        Image.fromarray(arr.astype(np.uint16) * 200).save(path)
    else:
        Image.fromarray(arr, "L").save(path)
    return Expect({path.name}, ("channels",), s.id)


def mutation_names(fmt: str) -> list[str]:
    return sorted(name for name, (formats, _) in MUTATIONS.items() if fmt in formats)


# -- JSON documents: one field replaced by anything --------------------------------------------------

def json_values(st):
    leaves = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
              | st.text(max_size=12))
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=3)
                        | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)


def json_paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a JSON document (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:2]):
            out += json_paths(v, prefix + (i,))
    return out


def set_path(doc, path: tuple, value, delete: bool = False):
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    if delete:
        if isinstance(cur, dict):
            cur.pop(path[-1], None)
        else:
            cur.pop(path[-1])
    else:
        cur[path[-1]] = value
    return doc


# -- oracles ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    detail: str


def read_and_load(root: Path) -> None:
    """What ``privseg data check`` does: read the layout, then load and validate every subject."""
    from privseg.data.formats import read_cohort
    from privseg.data.transforms import load_subject

    cohort = read_cohort(root)
    for s in cohort.subjects:
        load_subject(s, cohort)


def check_reader(fn: Callable[[], object], expect: Expect | None, may_succeed: bool = False) -> Outcome:
    """``fn`` must raise a PrivsegError naming one of ``expect.files`` and one of ``expect.words``
    (``may_succeed``: or return normally, for mutations that can leave a valid input)."""
    try:
        fn()
    except PrivsegError as exc:
        msg = str(exc)
        if expect is None:
            return Outcome(True, msg)
        if not any(f in msg for f in expect.files):
            return Outcome(False, f"message does not name any of {sorted(expect.files)}: {msg}")
        if not any(w.lower() in msg.lower() for w in expect.words):
            return Outcome(False, f"message does not say {expect.words}: {msg}")
        return Outcome(True, msg)
    except Exception as exc:  # noqa: BLE001 - the finding
        return Outcome(False, f"{type(exc).__name__} escaped: {exc}\n{traceback.format_exc(limit=-4)}")
    if may_succeed:
        return Outcome(True, "accepted (valid input)")
    return Outcome(False, "accepted a broken input")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``privseg.cli.main(argv)`` with stdout and stderr captured."""
    from privseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # pragma: no cover - main() returns codes
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaped exception is the finding
            err.write(traceback.format_exc())
            code = -1
    return code, out.getvalue(), err.getvalue()


def check_cli(argv: list[str], names: set[str], words: tuple[str, ...] = (), outputs: tuple[Path, ...] = ()) -> Outcome:
    code, out, err = run_cli(argv)
    text = out + err
    if code != 2:
        return Outcome(False, f"exit code {code} (expected 2) for {argv}:\n{text[-1500:]}")
    if "Traceback" in text:
        return Outcome(False, f"traceback in the output of {argv}:\n{text[-1500:]}")
    lines = [ln for ln in err.splitlines() if ln.startswith("privseg: error:") or ln.startswith("Error")
             or "Invalid value" in ln or "Usage:" in ln]
    if not lines:
        return Outcome(False, f"no error line on stderr for {argv}:\n{text[-1500:]}")
    if names and not any(n in err for n in names):
        return Outcome(False, f"stderr does not name any of {sorted(names)}:\n{err[-1500:]}")
    if words and not any(w.lower() in err.lower() for w in words):
        return Outcome(False, f"stderr does not say {words}:\n{err[-1500:]}")
    written = [str(p) for p in outputs if p.exists()]
    if written:
        return Outcome(False, f"wrote {written} although the command failed")
    return Outcome(True, err.strip().splitlines()[-1] if err.strip() else "")


# -- checkpoints ---------------------------------------------------------------------------------------

class Exploit:
    """Pickled, it runs ``open(marker, "w")`` when unpickled by a full unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


CHECKPOINT_MUTATIONS = ("truncate", "garbage", "empty", "directory", "missing", "exploit", "exploit_legacy",
                        "not_privseg", "wrong_shapes", "missing_keys", "wrong_classes", "bad_config", "bad_model")


def mutate_checkpoint(draw, st, good: Path, dst: Path, marker: Path) -> tuple[str, tuple[str, ...]]:
    """Write a broken version of checkpoint ``good`` to ``dst``; returns (kind, words the error should say)."""
    import pickle

    import torch

    kind = draw(st.sampled_from(CHECKPOINT_MUTATIONS))
    raw = good.read_bytes()
    payload = torch.load(good, map_location="cpu", weights_only=True)
    if kind == "truncate":
        dst.write_bytes(raw[: int(len(raw) * draw(st.floats(0.0, 0.99)))])
        return kind, ("not a readable", "refused", "truncated", "corrupt")
    if kind == "garbage":
        dst.write_bytes(draw(st.binary(min_size=1, max_size=2000)))
        return kind, ("not a readable", "refused", "not a privseg")
    if kind == "empty":
        dst.write_bytes(b"")
        return kind, ("not a readable", "refused")
    if kind == "directory":
        dst.mkdir()
        return kind, ("not found", "not a file", "is a directory")
    if kind == "missing":
        return kind, ("not found",)
    if kind == "exploit":
        payload["extra"] = {"x": Exploit(str(marker))}
        torch.save(payload, dst)
        return kind, ("refused",)
    if kind == "exploit_legacy":
        dst.write_bytes(pickle.dumps({"format": payload["format"], "x": Exploit(str(marker))}))
        return kind, ("refused", "not a readable")
    if kind == "not_privseg":
        torch.save({"state_dict": payload["model"]}, dst)
        return kind, ("not a privseg checkpoint",)
    model = dict(payload["model"])
    if kind == "wrong_shapes":
        key = draw(st.sampled_from(sorted(model)))
        model[key] = torch.zeros(tuple(s + 1 for s in model[key].shape) or (2,))
        payload["model"] = model
    elif kind == "missing_keys":
        for key in draw(st.lists(st.sampled_from(sorted(model)), min_size=1, max_size=3, unique=True)):
            model.pop(key)
        payload["model"] = model
    elif kind == "wrong_classes":
        payload["config"] = dict(payload["config"], num_classes=payload["config"]["num_classes"] + draw(
            st.integers(1, 5)))
    elif kind == "bad_config":
        cfg = dict(payload["config"])
        key = draw(st.sampled_from(sorted(cfg)))
        if draw(st.booleans()):
            cfg.pop(key)
        else:
            cfg[key] = draw(st.none() | st.text(max_size=5) | st.integers(-3, 3) | st.lists(st.integers(), max_size=2))
        payload["config"] = cfg if draw(st.booleans()) else draw(st.sampled_from([None, [], "x", 3]))
    elif kind == "bad_model":
        payload["model"] = draw(st.sampled_from([None, [], "weights", 3, {"a": 1}]))
    torch.save(payload, dst)
    return kind, ("checkpoint", "do not fit", "model has", "config", "weights")
