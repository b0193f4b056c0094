"""Loading and preprocessing with MONAI transforms, and patch sampling.

``load_subject`` reads and validates a subject's files; ``preprocess`` reorients to
RAS, resamples to a target spacing, crops to the foreground and normalises the
intensities per modality (z-score inside the foreground for MR, an intensity window
for CT, [0, 1] for photographs); ``PatchSampler`` draws training patches.

The CT window is the task's (:func:`ct_window`): ``info["ct_window"]`` of the cohort (a
manifest's ``info``, or set from the command line's ``--ct-window``), else ``"ct_window"`` in
the dataset's own ``dataset.json``, else :data:`CT_WINDOW`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    FgBgToIndices,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from privseg.data.cohort import MANIFEST_NAME, Cohort, Subject
from privseg.data.formats.common import classes_hint
from privseg.data.validate import Volume, check_label_values, check_pair, read_volume
from privseg.errors import ConfigError, DataError

CT_WINDOW = (-200.0, 300.0)  # default soft-tissue window in HU; a task with another contrast declares its own


def parse_ct_window(value: object, where: str) -> tuple[float, float]:
    """``"LO,HI"`` or ``[LO, HI]`` (HU) -> (lo, hi); ConfigError naming ``where`` otherwise."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(parts, (str, bytes)) or len(parts) != 2:  # type: ignore[arg-type]
            raise ValueError
        lo, hi = (float(x) for x in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"{where} {value!r}: give the CT window as two numbers in HU, LO,HI "
                          "(e.g. -1000,1000 for the whole head, 0,80 for brain)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"{where} {value!r}: the window needs finite LO < HI (got {lo:g}, {hi:g})")
    return lo, hi


@lru_cache(maxsize=64)
def _dataset_json_window(path: str, mtime_ns: int) -> tuple[float, float] | None:
    """``ct_window`` of a dataset.json, read once per file version (load_subject runs per subject)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the format reader reports an unreadable dataset.json
    if not isinstance(raw, dict) or raw.get("ct_window") is None:
        return None
    try:
        return parse_ct_window(raw["ct_window"], "ct_window")
    except ConfigError as exc:
        raise DataError(path, str(exc)) from None


def ct_window(cohort: Cohort) -> tuple[float, float]:
    """The CT intensity window (HU) of a cohort's task, mapped to [0, 1] with clipping."""
    declared = cohort.info.get("ct_window")
    if declared is not None:
        try:
            return parse_ct_window(declared, "ct_window")
        except ConfigError as exc:
            raise DataError(cohort.root or cohort.name, f"cohort info {exc}") from None
    if cohort.root is not None:
        ds = Path(cohort.root) / "dataset.json"
        if ds.is_file():
            found = _dataset_json_window(str(ds), ds.stat().st_mtime_ns)
            if found is not None:
                return found
    return CT_WINDOW


@dataclass
class SubjectData:
    """A loaded subject: channel-first image and label, plus the reference geometry."""

    subject: Subject
    image: torch.Tensor  # (C, *spatial) float32
    label: torch.Tensor | None  # (1, *spatial) int64
    affine: np.ndarray  # 4x4 of the (preprocessed) grid
    source: Volume  # first image channel as read, for writing predictions back
    ct_window: tuple[float, float] = CT_WINDOW  # the task's, applied by preprocess to CT subjects


def load_subject(subject: Subject, cohort: Cohort) -> SubjectData:
    """Read and validate all channels and the label of one subject.

    A label map with no foreground voxel is refused (DataError naming the file): in a
    segmentation task an all-background label is almost always an empty or failed export, and
    training on it silently teaches "nothing is there". Where structure-free subjects are real
    (e.g. lesion-free scans), ``cohort.info["allow_empty_labels"] = True`` accepts them.

    Two cohort ``info`` entries written by the format readers apply here:
    ``channels_in_file`` (MSD: one 4D NIfTI per case, channels on the last axis) and
    ``label_map`` (raw label value -> class index, e.g. MRBrainS18's 11 labels merged to
    tissues, or 255 -> 1 for binary masks); values absent from the map are kept as they
    are, so anything unexpected still fails the class check with the file's name."""
    dims = cohort.spatial_dims
    in_file = bool(cohort.info.get("channels_in_file"))
    channels: list[np.ndarray] = []
    first: Volume | None = None
    for path in subject.images:
        vol = read_volume(path, spatial_dims=dims, channels_last=in_file)
        arr = vol.array
        if in_file:
            for k in range(arr.shape[-1]):
                if np.ptp(arr[..., k]) == 0:
                    raise DataError(path, f"channel {k} of the 4D image is constant (empty or blank)")
            channels.extend(np.moveaxis(arr, -1, 0))
            vol = Volume(arr[..., 0], vol.affine, vol.path, vol.header)
        elif dims == 2 and arr.ndim == 3:  # H x W x RGB
            channels.extend(np.moveaxis(arr, -1, 0).astype(np.float32))
        else:
            channels.append(arr)
        if first is None:
            first = vol
        elif vol.array.shape[:dims] != first.array.shape[:dims] or not np.allclose(vol.affine, first.affine, atol=1e-3):
            raise DataError(path, f"channel geometry differs from {first.path}")
    assert first is not None
    if len(channels) != len(cohort.channels):
        raise DataError(subject.images[0], f"has {len(channels)} channels, cohort declares {len(cohort.channels)}")
    image = np.stack(channels)
    label = None
    if subject.label is not None:
        lab = read_volume(subject.label, spatial_dims=dims, is_label=True)
        label_map = cohort.info.get("label_map")
        if label_map:
            try:
                remapped = remap_labels(lab.array, label_map)
            except ConfigError as exc:
                raise DataError(cohort.root or cohort.name, str(exc)) from None
            lab = Volume(remapped, lab.affine, lab.path, lab.header)
        check_pair(Volume(image[0], first.affine, first.path), lab)
        check_label_values(lab, cohort.num_classes, _classes_hint(cohort))
        if not cohort.info.get("allow_empty_labels") and not np.any(lab.array):
            raise DataError(lab.path, f"label map of subject {subject.id} has no foreground voxels (all background): "
                            "an empty or failed export? If subjects without any structure are real in this task, "
                            'set "allow_empty_labels": true in the cohort manifest\'s info')
        label = torch.from_numpy(lab.array[None])
    return SubjectData(subject, torch.from_numpy(image), label, first.affine, first, ct_window(cohort))


def _classes_hint(cohort: Cohort):
    """How to declare classes that hold a label value past the cohort's (``hint(top)``), where the
    classes come from: the manifest or dataset.json that declares them, else ``--classes`` (the
    readers of plain NIfTI and 2D image folders take it); None where the layout fixes them."""
    root = Path(cohort.root) if cohort.root is not None else None
    for name in (MANIFEST_NAME, "dataset.json"):
        if root is not None and (root / name).is_file():
            return lambda top: f"the classes are declared in {root / name}: give one per label value 0..{top} there"
    if cohort.format in ("nifti", "image2d"):
        return lambda top: classes_hint(top, cohort.classes)
    return None


def remap_labels(array: np.ndarray, label_map: dict) -> np.ndarray:
    """Map raw label values to class indices. Keys may be strings (a manifest is JSON);
    values not in the map are left unchanged."""
    try:
        pairs = [(int(k), int(v)) for k, v in label_map.items()]
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"cohort info label_map {label_map!r} must map integer labels to integer classes") from None
    out = array.copy()
    for src, dst in pairs:
        out[array == src] = dst
    return out


def preprocess_transform(
    modality: str, spatial_dims: int = 3, spacing: Sequence[float] | None = None, crop_foreground: bool = True,
    ct_window: Sequence[float] = CT_WINDOW,
) -> Compose:
    """The deterministic part of the pipeline, the same at training and inference."""
    keys = ["image", "label"]
    steps: list = []
    if spatial_dims == 3:
        steps.append(Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")),
                                  allow_missing_keys=True))
        if spacing is not None:
            steps.append(
                Spacingd(keys=keys, pixdim=tuple(spacing), mode=("bilinear", "nearest"), allow_missing_keys=True)
            )
    if crop_foreground and spatial_dims == 3:
        steps.append(CropForegroundd(keys=keys, source_key="image", margin=2, allow_missing_keys=True))
    mod = modality.upper()
    if mod == "CT":
        steps.append(
            ScaleIntensityRanged(keys="image", a_min=float(ct_window[0]), a_max=float(ct_window[1]), b_min=0.0,
                                 b_max=1.0, clip=True)
        )
    elif mod in ("RGB", "PHOTO", "DERMOSCOPY"):
        steps.append(ScaleIntensityd(keys="image", channel_wise=True))
    else:
        steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    return Compose(steps)


def preprocess(data: SubjectData, spacing: Sequence[float] | None = None, crop_foreground: bool = True) -> dict:
    """Apply :func:`preprocess_transform`; returns a dict of MetaTensors plus the subject's
    ``id``, ``site`` and ``patient``."""
    dims = data.image.ndim - 1
    affine = torch.as_tensor(data.affine, dtype=torch.float64)
    item = {"image": MetaTensor(data.image.float(), affine=affine)}
    if data.label is not None:
        item["label"] = MetaTensor(data.label, affine=affine)
    transform = preprocess_transform(data.subject.modality, dims, spacing, crop_foreground, data.ct_window)
    out = transform(item)
    out["id"] = data.subject.id
    out["site"] = data.subject.site
    out["patient"] = data.subject.patient_id  # the DP and erasure unit; several items may share one
    out["transform"] = transform  # kept so predictions can be mapped back with transform.inverse
    return out


def load_preprocessed(
    subjects: Sequence[Subject], cohort: Cohort, spacing: Sequence[float] | None = None
) -> list[dict]:
    """Load, validate and preprocess subjects; the result is small enough to keep in memory."""
    return [preprocess(load_subject(s, cohort), spacing) for s in subjects]


def whole_volume_patch(items: Sequence[dict]) -> tuple[int, ...]:
    """The smallest patch that holds every preprocessed item whole (the largest extent along each
    spatial axis): training on it sees each patient exactly as a membership test scores it, which
    is what a ``patch_size`` of None means in :data:`privseg.data.synth.POWER_TRAINING`."""
    if not items:
        raise ConfigError("a whole-volume patch needs at least one preprocessed item")
    dims = {it["image"].ndim - 1 for it in items}
    if len(dims) != 1:
        raise ConfigError(f"items of different dimensionality ({', '.join(map(str, sorted(dims)))}D) have no "
                          "common patch")
    return tuple(max(int(it["image"].shape[d + 1]) for it in items) for d in range(dims.pop()))


class PatchSampler:
    """Draws ``patches_per_subject`` patches from each chosen subject, half of them
    centred on foreground, so the batch is grouped by subject (the DP unit).

    The padded volume and its foreground/background voxel indices are computed once per
    subject and kept in the item: MONAI's crop would otherwise search the whole label
    for foreground at every draw."""

    def __init__(self, patch_size: Sequence[int], patches_per_subject: int, seed: int = 0):
        self.patch_size = tuple(int(p) for p in patch_size)
        self.patches_per_subject = patches_per_subject
        self.pad = SpatialPadd(keys=["image", "label"], spatial_size=self.patch_size)
        self.crop = RandCropByPosNegLabeld(
            keys=["image", "label"],
            label_key="label",
            spatial_size=self.patch_size,
            pos=1,
            neg=1,
            num_samples=patches_per_subject,
            allow_smaller=True,
            fg_indices_key="fg",
            bg_indices_key="bg",
        )
        self.crop.set_random_state(seed)
        self._cache_key = f"_patch_cache_{'x'.join(map(str, self.patch_size))}"

    def _prepared(self, item: dict) -> dict:
        cached = item.get(self._cache_key)
        if cached is None:
            padded = self.pad({"image": _plain(item["image"]), "label": _plain(item["label"])})
            image, label = _plain(padded["image"]), _plain(padded["label"])
            fg, bg = FgBgToIndices()(label)
            cached = item[self._cache_key] = {"image": image, "label": label, "fg": fg, "bg": bg}
        return cached

    def sample(self, items: Sequence[dict], seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns images (N, C, *patch), labels (N, 1, *patch) and the subject index of each patch.
        A ``seed`` makes the draw a pure function of it, so a resumed run repeats exactly."""
        if seed is not None:
            self.crop.set_random_state(seed % 2**32)
        images, labels, owner = [], [], []
        for k, item in enumerate(items):
            for patch in self.crop(dict(self._prepared(item))):
                images.append(_plain(patch["image"]))
                labels.append(_plain(patch["label"]))
                owner.append(k)
        return torch.stack(images), torch.stack(labels), torch.tensor(owner)


def _plain(x) -> torch.Tensor:
    """A MetaTensor's data without its metadata (cheaper to crop and stack)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
