"""Readers that validate. Every problem becomes a :class:`DataError` naming the file.

Checks: missing/unreadable/truncated files, wrong dimensionality, absurd headers
(zero or negative spacing, singular affine, huge declared sizes, infinite intensity scaling),
NaN/Inf (also after the cast to float32), empty volumes, image/label shape or affine mismatch,
label values outside the classes.

Integrity: a ``.nii.gz`` is decompressed to its end once before it is parsed, so gzip's CRC
catches a corrupted byte anywhere in the file (nibabel alone stops reading after the voxel data
it needs, so a flipped byte inside the compressed stream would otherwise load as silently wrong
voxels); a PNG's chunk CRCs are checked the same way. Uncompressed ``.nii`` and JPEG files carry
no checksum: corruption inside their voxel data cannot be detected.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from PIL import Image, UnidentifiedImageError

from privseg.errors import DataError

MAX_VOXELS = 512**3  # refuse headers that declare absurd sizes before reading them
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Volume:
    """A validated array plus the geometry needed to write results back."""

    array: np.ndarray  # float32 image or int64 label, spatial dims only (2D or 3D)
    affine: np.ndarray  # 4x4 voxel-to-world (identity-like for 2D images)
    path: str
    header: object | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(x) for x in np.linalg.norm(self.affine[:3, : self.array.ndim], axis=0))


def is_2d_image(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_2D_SUFFIXES)


def read_volume(path: str | Path, spatial_dims: int = 3, is_label: bool = False, channels_last: bool = False) -> Volume:
    """Read a NIfTI (3D) or 2D image file and validate it.

    ``channels_last`` accepts one extra trailing axis holding channels (the MSD layout
    stores a multi-modal case as one 4D NIfTI); the array then keeps that axis last."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a file")
    if is_2d_image(path):
        return _read_2d(path, is_label)
    return _read_nifti(path, spatial_dims, is_label, channels_last)


def _verify_gzip(path: Path) -> None:
    """Decompress to the end so the gzip CRC and length trailer are checked."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return  # not gzip at all: nibabel says it cannot read it
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(path, f"file is truncated or corrupt ({type(exc).__name__}: {exc})") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _verify_png(path: Path) -> None:
    """Walk the PNG chunks: signature, every chunk's CRC, IHDR first, IEND present."""
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return  # not a PNG despite its name: the decoder will say so
    pos, first = len(PNG_SIGNATURE), True
    while True:
        if pos + 12 > len(data):
            raise DataError(path, "file is truncated or corrupt (PNG ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise DataError(path, f"file is truncated or corrupt (PNG chunk {kind!r} runs past the end of the file)")
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            raise DataError(path, f"file is truncated or corrupt (CRC mismatch in PNG chunk {kind!r})")
        if first and kind != b"IHDR":
            raise DataError(path, "file is truncated or corrupt (PNG does not start with IHDR)")
        first = False
        pos = end
        if kind == b"IEND":
            return


def _read_nifti(path: Path, spatial_dims: int, is_label: bool, channels_last: bool = False) -> Volume:
    # nibabel logs the header repairs it makes ("pixdim[1,2,3] should be positive ...") straight to
    # stderr; privseg reports the problem itself, in one line, so mute that logger meanwhile
    nib_log = logging.getLogger("nibabel.global")
    muted = nib_log.disabled
    nib_log.disabled = True
    try:
        return _read_nifti_quiet(path, spatial_dims, is_label, channels_last)
    finally:
        nib_log.disabled = muted


def _read_nifti_quiet(path: Path, spatial_dims: int, is_label: bool, channels_last: bool) -> Volume:
    if path.name.lower().endswith(".gz"):
        _verify_gzip(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers
        raise DataError(path, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in img.shape)
    if any(s <= 0 for s in shape) or not shape:
        raise DataError(path, f"empty volume (shape {shape})")
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise DataError(path, f"declared size {shape} is larger than {MAX_VOXELS} voxels")
    # Trailing singleton dimensions (x, y, z, 1) are common in exports; real extra ones are not.
    while len(shape) > spatial_dims and shape[-1] == 1:
        shape = shape[:-1]
    if channels_last and len(shape) == spatial_dims:  # a single-channel file: keep the channel axis
        shape = shape + (1,)
    expected = spatial_dims + 1 if channels_last else spatial_dims
    if len(shape) != expected:
        what = f"{spatial_dims}D volume with channels last" if channels_last else f"{spatial_dims}D volume"
        raise DataError(path, f"expected a {what}, got shape {tuple(img.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    raw = _stored_header(img)
    zooms = tuple(float(z) for z in raw.get_zooms())[:spatial_dims]
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise DataError(path, f"voxel spacing {tuple(float(z) for z in zooms)} must be positive")
    # nibabel writes NaN for "no scaling" and quietly ignores an infinite slope; refuse the latter
    for field in ("scl_slope", "scl_inter"):
        try:
            value = float(raw[field])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isinf(value):
            raise DataError(path, f"intensity scaling {field}={value} is not finite")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, "affine is singular or not finite")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise DataError(path, f"unsupported voxel type {dtype}")
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise DataError(path, f"file is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return Volume(_check_values(data, path, is_label), affine, str(path), img.header)


def _stored_header(img: object) -> object:
    """The header as the file stores it. nibabel's loader quietly replaces zero pixdims by 1
    and negative ones by their absolute value, which would hide a broken header from the
    spacing check; so re-read the header without those fixes."""
    header = img.header  # type: ignore[attr-defined]
    try:
        file_map = img.file_map  # type: ignore[attr-defined]
        holder = file_map.get("header") or file_map["image"]  # NIfTI pairs keep the header in .hdr
        with ImageOpener(holder.filename) as f:
            header = type(header).from_fileobj(f, check=False)
    except Exception:  # a header nibabel already parsed once; fall back to its fixed copy
        pass
    return header


def _read_2d(path: Path, is_label: bool) -> Volume:
    if path.name.lower().endswith(".png"):
        _verify_png(path)
    try:
        with Image.open(path) as im:
            im.load()
            if is_label:
                im = im.convert("L") if im.mode not in ("L", "P", "I", "I;16", "1") else im
                data = np.asarray(im)
            else:
                # 16/32-bit grey keeps its values (converting to "L" would clip them at 255)
                data = np.asarray(im.convert("L") if im.mode in ("1", "P") else im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"cannot read as an image ({exc})") from None
    if data.size == 0:
        raise DataError(path, "empty image")
    if data.ndim == 3 and not is_label:  # H x W x RGB: keep channels last for now
        # Alpha is not a colour channel: RGBA keeps R, G, B; grey + alpha keeps the grey.
        data = data[..., :3] if data.shape[-1] == 4 else data[..., 0] if data.shape[-1] == 2 else data
    affine = np.eye(4)
    return Volume(_check_values(np.asarray(data), path, is_label), affine, str(path))


def _check_values(data: np.ndarray, path: Path, is_label: bool) -> np.ndarray:
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DataError(path, f"contains {bad} NaN/Inf voxels")
    if is_label:
        if data.dtype.kind == "f" and not np.all(data == np.round(data)):
            raise DataError(path, "label map has non-integer values")
        return data.astype(np.int64)
    if not is_label and np.ptp(data) == 0:
        raise DataError(path, "image is constant (empty or blank)")
    out = data.astype(np.float32)
    if out.dtype != data.dtype and not np.all(np.isfinite(out)):
        raise DataError(path, f"voxel values up to {float(np.abs(data).max()):.3g} do not fit in float32")
    return out


def check_label_values(label: Volume, num_classes: int, hint: Callable[[int], str] | None = None) -> None:
    """Refuse label values outside 0..num_classes-1; ``hint(top)`` (the largest value found)
    says how to declare classes that would hold them."""
    values = np.unique(label.array)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        top = int(values.max())
        raise DataError(
            label.path, f"label values {bad[:5].tolist()} are outside the declared classes 0..{num_classes - 1}"
            + (f"; {hint(top)}" if hint and bad.min() >= 0 else "")
        )


def check_pair(image: Volume, label: Volume, atol: float = 1e-3) -> None:
    """Image and label must share shape and (for NIfTI) the voxel-to-world affine."""
    if image.array.shape[: label.array.ndim] != label.array.shape:
        raise DataError(
            label.path, f"label shape {label.array.shape} does not match image shape {image.array.shape} ({image.path})"
        )
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise DataError(label.path, f"label affine differs from the image affine ({image.path})")
