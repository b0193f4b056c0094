"""The embedded default cohort: a multi-site brain cohort built from the real MNI152 anatomy.

With no data given, privseg builds its cohort from the MNI152 2009c (nonlinear, symmetric)
T1, grey-matter and white-matter templates that ship inside the ``nilearn`` wheel, so nothing
is downloaded (docs/architecture.md, principle 4). Classes follow the MRBrainS 3-tissue scheme:
background, CSF, GM, WM (plus ``lesion`` on request).

The cohort must make membership visible (docs/architecture.md, "The embedded cohort must make membership
visible"): subjects that are smooth warps of one template with labels that follow the image
exactly teach a network the rule and nothing about any patient. So every subject gets

* **subject-unique anatomy** that the image shows: head-size scaling, a smooth elastic warp,
  an atrophy score that enlarges the ventricles (radial warp) and thins the cortex (GM
  probability moved to CSF at the CSF border), and optionally white-matter-hyperintensity-like
  blobs or a tumour-like blob with mass effect;
* **label perturbations the image does not show** (simulated rater variability): in smooth random
  patches (a quarter of the volume) the label map is read from the probability maps after an extra
  smooth displacement of ~0.7 voxel that the image does not get (the rater drew the outline a voxel
  off there), and everywhere a weak smooth per-class preference field tips ambiguous partial-volume
  voxels. Only memorising a patient reproduces these. The amplitudes are :class:`SynthParams` fields;
  at 64^3 the defaults relabel about 4-6 % of brain voxels (nearly all at tissue boundaries; more on
  coarser grids, where more voxels are boundary voxels).

Measured once (GPU, a 16-32-64-128 GroupNorm 3D U-Net, whole 64^3 volumes, no augmentation, default
3 sites x 8 subjects, 18 train / 6 held out): mean foreground Dice on held-out subjects 0.88 (CSF
0.83, GM 0.90, WM 0.92; 0.91 with the rater noise switched off), and a loss-based membership test
separating training from held-out subjects with AUC 0.98 after 1000 steps.

Each site (hospital) has its own :class:`ScannerProfile` (domain shift): tissue contrast for
T1, T2, FLAIR or CT, scanner gain, a smooth multiplicative bias field, Rician (MR) or Gaussian
(CT) noise, and a point-spread function (in-plane blur and slice thickness). The image is the
partial-volume mix of tissue intensities over the warped probability maps, times the bias field,
blurred by the PSF, plus noise; the label comes from the same warped maps, so the two stay aligned.

Everything is deterministic by seed (each subject draws from its own ``(seed, site, subject)``
stream) and written atomically: the cohort is built in a temporary sibling folder and renamed
into place, so an interrupted run leaves nothing half-written. 2D variants write PNGs: axial
slices of the same subjects, or a dermoscopy-like task with one irregular pigmented lesion.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from privseg.data.cohort import MANIFEST_NAME, Cohort, Subject, assign_splits
from privseg.errors import ConfigError, DataError
from privseg.utils import atomic_path

GENERATOR = "privseg.data.synth"
FORMAT_VERSION = 1
TISSUE_CLASSES = ("background", "CSF", "GM", "WM")
LESION_CLASS = "lesion"
LESION_KINDS = ("wmh", "tumour")
LAYOUTS = ("msd", "mrbrains")
KINDS_2D = ("slices", "dermoscopy")
MODALITIES = ("T1", "T2", "FLAIR", "CT")
# MRBrainS18 stores the registered scans under <id>/pre/; T2 and CT do not occur there, so they get analogous names.
MRBRAINS_FILES = {
    "T1": "pre/reg_T1.nii.gz", "FLAIR": "pre/FLAIR.nii.gz", "T2": "pre/reg_T2.nii.gz", "CT": "pre/CT.nii.gz",
}
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_BRAIN_THRESHOLD = 0.2  # nilearn.datasets.load_mni152_brain_mask's default threshold on the [0, 1] T1 template
_BASE_MARGIN_MM = 6  # background kept around the intracranial bounding box
_ICV_SIGMA_MM, _ICV_THRESHOLD = 2.0, 0.15  # brain mask -> intracranial mask (adds the outer CSF layer)


# --------------------------------------------------------------------------- profiles and parameters
@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner turns tissue into intensities (the site's domain shift).

    ``intensities`` are the tissue values for background, CSF, GM, WM and lesion: relative units
    for MR (multiplied by ``gain``), Hounsfield units for CT. ``noise`` is the Rician noise level as a
    fraction of the brightest tissue for MR, or the Gaussian noise sd in HU for CT. ``bias`` is the sd
    of the log of the smooth multiplicative bias field (MR only). ``slice_mm`` and ``inplane_fwhm_mm``
    are the PSF's full widths at half maximum through and within the slice.
    """

    name: str
    modality: str
    intensities: tuple[float, float, float, float, float]
    gain: float
    bias: float
    noise: float
    slice_mm: float
    inplane_fwhm_mm: float
    description: str

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(f"scanner profile {self.name!r}: modality {self.modality!r} is not one of {MODALITIES}")
        if len(self.intensities) != 5 or self.gain <= 0 or self.bias < 0 or self.noise < 0:
            raise ConfigError(f"scanner profile {self.name!r}: needs 5 intensities, gain > 0, bias and noise >= 0")

    @property
    def is_ct(self) -> bool:
        return self.modality == "CT"


@dataclass(frozen=True)
class CameraProfile:
    """A dermoscopy site's camera: colour cast, gain, vignetting, optics blur, sensor noise, hair."""

    name: str
    cast: tuple[float, float, float]
    gain: float
    vignette: float
    circular_field: bool
    blur_px: float  # at 128 px; scaled with the image size
    noise: float  # sd in 8-bit units
    hairs: float  # expected number of hairs per image
    description: str


SCANNER_PROFILES: dict[str, ScannerProfile] = {
    p.name: p
    for p in (
        ScannerProfile("T1-3T", "T1", (0.0, 0.25, 0.60, 1.00, 0.42), 900.0, 0.12, 0.025, 1.0, 0.0,
                       "3 T T1-weighted 3D gradient echo, 1 mm isotropic, mild bias"),
        ScannerProfile("T1-1.5T", "T1", (0.0, 0.36, 0.72, 1.00, 0.52), 320.0, 0.22, 0.045, 1.5, 3.0,
                       "1.5 T T1-weighted, lower GM/WM contrast, stronger bias and noise"),
        ScannerProfile("T1-5mm", "T1", (0.0, 0.20, 0.55, 1.00, 0.38), 2400.0, 0.16, 0.035, 5.0, 0.5,
                       "clinical T1-weighted 2D spin echo with 5 mm slices"),
        ScannerProfile("T2-3T", "T2", (0.0, 1.00, 0.58, 0.42, 0.85), 1500.0, 0.12, 0.03, 3.0, 0.0,
                       "3 T T2-weighted turbo spin echo, CSF bright"),
        ScannerProfile("FLAIR-3T", "FLAIR", (0.0, 0.10, 0.62, 0.46, 1.00), 700.0, 0.15, 0.035, 3.0, 0.5,
                       "3 T FLAIR, CSF suppressed, lesions bright"),
        ScannerProfile("CT", "CT", (-1000.0, 8.0, 40.0, 28.0, 18.0), 1.0, 0.0, 4.0, 5.0, 0.5,
                       "non-contrast head CT in HU (air background, no skull)"),
    )
}

CAMERA_PROFILES: dict[str, CameraProfile] = {
    p.name: p
    for p in (
        CameraProfile("polarised", (1.0, 1.0, 1.0), 1.0, 0.15, False, 0.6, 2.0, 1.0,
                      "non-contact polarised dermoscope"),
        CameraProfile("contact", (1.06, 0.97, 0.90), 0.92, 0.35, True, 1.0, 3.0, 0.5,
                      "contact dermoscope with immersion fluid: warm cast, circular field"),
        CameraProfile("smartphone", (0.95, 1.0, 1.07), 1.08, 0.10, False, 1.6, 5.0, 2.0,
                      "smartphone clip-on lens: cool cast, soft focus, noisy"),
    )
}

# Three T1 scanners by default: the sites differ in gain, contrast, bias, noise and slice thickness
# (enough domain shift to matter) while one model can still reach the Dice the benchmarks target.
_DEFAULT_ORDER = ("T1-3T", "T1-1.5T", "T1-5mm", "T2-3T", "FLAIR-3T", "CT")
_DEFAULT_CAMERAS = ("polarised", "contact", "smartphone")


def default_profiles(n_sites: int, kind: str = "volume") -> list[str]:
    """Profile names for ``n_sites`` sites, cycling through the list when there are more sites.
    ``kind="dermoscopy"`` gives camera profiles instead of scanner profiles; ``kind="slices"`` skips CT."""
    if n_sites < 1:
        raise ConfigError(f"sites must be at least 1, got {n_sites}")
    if kind == "dermoscopy":
        order = _DEFAULT_CAMERAS
    elif kind == "slices":  # 8-bit PNG slices cannot hold Hounsfield units
        order = tuple(n for n in _DEFAULT_ORDER if not SCANNER_PROFILES[n].is_ct)
    else:
        order = _DEFAULT_ORDER
    return [order[k % len(order)] for k in range(n_sites)]


@dataclass(frozen=True)
class SynthParams:
    """Amplitudes of everything that makes subjects differ. Anatomy is in mm (resolution independent);
    rater variability is in voxels, because raters label at the resolution they see."""

    # anatomy: visible in the image
    scale_sd: float = 0.04  # relative head-size scaling per axis
    rotation_deg: float = 3.0  # sd of the rotation about each axis
    shift_mm: float = 3.0  # sd of the translation per axis
    elastic_mm: float = 3.0  # sd of the smooth elastic displacement at the control points
    elastic_grid: int = 6  # control points per axis of the elastic warp
    ventricle_max: float = 0.35  # largest radial expansion around the ventricles (at full atrophy)
    thinning_max: float = 0.35  # largest fraction of GM probability moved to CSF at the CSF border
    wmh_count: tuple[int, int] = (2, 6)  # white-matter-hyperintensity blobs per subject (inclusive)
    wmh_radius_mm: tuple[float, float] = (3.0, 7.0)
    tumour_radius_mm: tuple[float, float] = (10.0, 20.0)
    tumour_mass_effect: float = 0.35  # radial push of the tissue around a tumour
    # rater variability: in the label only
    rater_patch_fraction: float = 0.25  # share of the volume where the rater's outline is displaced
    rater_patch_spacing_vox: float = 10.0  # control-point spacing of the patch field
    rater_shift_vox: float = 0.7  # sd of that label-only smooth displacement, voxels
    rater_shift_spacing_vox: float = 6.0  # its control-point spacing
    rater_bias: float = 0.03  # sd of the smooth per-class preference added to the probabilities everywhere
    rater_bias_spacing_vox: float = 8.0
    # intensity variation between scans of one site
    tissue_jitter: float = 0.03  # relative sd of each tissue intensity per scan
    gain_jitter: float = 0.05
    # dermoscopy rater: offset and smooth wobble of the drawn outline, in units of the lesion radius
    derm_rater_offset: float = 0.03
    derm_rater_wobble: float = 0.04

    def __post_init__(self) -> None:
        for name in ("scale_sd", "rotation_deg", "shift_mm", "elastic_mm", "ventricle_max", "thinning_max",
                     "tumour_mass_effect", "rater_shift_vox", "rater_bias", "tissue_jitter", "gain_jitter",
                     "derm_rater_offset", "derm_rater_wobble"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"SynthParams.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.ventricle_max >= 0.9 or self.thinning_max > 1 or self.tumour_mass_effect >= 0.9:
            raise ConfigError("SynthParams: ventricle_max and tumour_mass_effect must be < 0.9, thinning_max <= 1")
        if not 0 <= self.rater_patch_fraction <= 1:
            raise ConfigError(f"SynthParams.rater_patch_fraction must be in [0, 1], got {self.rater_patch_fraction}")
        spacings = (self.rater_shift_spacing_vox, self.rater_bias_spacing_vox, self.rater_patch_spacing_vox)
        if self.elastic_grid < 2 or min(spacings) <= 0:
            raise ConfigError("SynthParams: elastic_grid must be >= 2 and control-point spacings > 0")
        if not 0 <= self.wmh_count[0] <= self.wmh_count[1] or self.wmh_count[1] < 1:
            raise ConfigError(f"SynthParams.wmh_count must be (lo, hi) with 0 <= lo <= hi, hi >= 1: {self.wmh_count}")


# --------------------------------------------------------------------------- template anatomy
@dataclass(frozen=True)
class _Base:
    """Template probability maps on the size^3 grid, plus where things are. Built once per size."""

    probs: np.ndarray  # (4, s, s, s) float32: background, CSF, GM, WM; sums to 1
    near_csf: np.ndarray  # (s, s, s) in [0, 1]: how close a voxel is to CSF (where cortex thins)
    table: np.ndarray  # (5, s+2, s+2, s+2): probs and near_csf, padded with air
    air: np.ndarray  # flat bool over the padded grid: the cell starting at this voxel is pure air
    spacing: tuple[float, float, float]  # mm
    affine: np.ndarray  # 4x4 RAS, MNI millimetres
    ventricles: np.ndarray  # (3,) centre in voxels
    ventricle_radius_mm: np.ndarray  # (3,)
    wm_sites: np.ndarray  # (n, 3) deep white-matter voxels: candidate lesion centres
    deep_sites: np.ndarray  # (n, 3) deep brain voxels: candidate tumour centres

    @property
    def size(self) -> int:
        return int(self.probs.shape[1])


def _template_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM, WM (each scaled to [0, 1]) and the 1 mm affine, from nilearn's package data.

    Reading the packaged files with nibabel avoids importing ``nilearn.datasets`` (seconds of
    imports); if a future nilearn moves them, its own loaders read the same package data offline."""
    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DataError("nilearn", "is not installed; the embedded cohort needs the MNI152 templates inside it")
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = {k: folder / name for k, name in _TEMPLATE_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        imgs = {k: nib.load(str(p)) for k, p in paths.items()}
    else:
        from nilearn import datasets

        imgs = {"t1": datasets.load_mni152_template(resolution=1), "gm": datasets.load_mni152_gm_template(resolution=1),
                "wm": datasets.load_mni152_wm_template(resolution=1)}
    arrays = []
    for k in ("t1", "gm", "wm"):
        a = np.asarray(imgs[k].dataobj, dtype=np.float32)
        top = float(a.max())
        if not np.isfinite(top) or top <= 0:
            raise DataError(paths[k], "MNI152 template is empty or not finite")
        arrays.append(a / top)
    return arrays[0], arrays[1], arrays[2], np.asarray(imgs["t1"].affine, dtype=np.float64)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not connected to the border (the dark ventricles) becomes brain. One labelling
    pass: far faster than ``ndimage.binary_fill_holes``' iterated dilation on a 1 mm volume."""
    lab, _ = ndimage.label(~mask)
    faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
    border = np.unique(np.concatenate([f.ravel() for f in faces]))
    keep = np.zeros(int(lab.max()) + 1, bool)
    keep[border] = True
    keep[0] = False
    return ~keep[lab]


def _block_mean(a: np.ndarray, b: int) -> np.ndarray:
    if b == 1:
        return a
    s = a.shape
    return a.reshape(s[0] // b, b, s[1] // b, b, s[2] // b, b).mean(axis=(1, 3, 5), dtype=np.float32)


@lru_cache(maxsize=3)
def _base(size: int) -> _Base:
    """Crop the templates to the brain, derive CSF, resample to size^3 with partial volumes."""
    t1, gm, wm, affine1 = _template_arrays()
    vox_mm = np.abs(np.diag(affine1)[:3])
    brain0 = t1 > _BRAIN_THRESHOLD
    margin = np.round(_BASE_MARGIN_MM / vox_mm).astype(int)
    lo, hi = np.zeros(3, int), np.zeros(3, int)
    for k in range(3):
        hit = np.flatnonzero(brain0.any(axis=tuple(j for j in range(3) if j != k)))
        lo[k], hi[k] = hit[0] - margin[k], hit[-1] + margin[k] + 1
    factor = (hi - lo) / size
    block = max(1, int(min(factor) // 2) * 2) if min(factor) >= 2 else 1  # cheap exact 2x2x2 averaging first
    hi = lo + -(-(hi - lo) // block) * block  # extend so each axis divides into blocks
    src = tuple(slice(max(lo[k], 0), min(hi[k], t1.shape[k])) for k in range(3))
    pad = [(max(0, -lo[k]), max(0, hi[k] - t1.shape[k])) for k in range(3)]
    t1c, gmc, wmc = (np.pad(a[src], pad) for a in (t1, gm, wm))
    # Intracranial volume: the brain (nilearn's threshold) grown by ~2 mm so the subarachnoid CSF
    # around it counts as CSF, as in MRBrainS; enclosed dark ventricles are filled in.
    grown = ndimage.gaussian_filter((t1c > _BRAIN_THRESHOLD).astype(np.float32), _ICV_SIGMA_MM / vox_mm)
    mask = _fill_holes(grown > _ICV_THRESHOLD)
    gmc, wmc = np.clip(gmc, 0, 1), np.clip(wmc, 0, 1)
    over = np.maximum(gmc + wmc, 1.0)
    gmc, wmc = gmc / over, wmc / over
    csfc = np.clip(mask.astype(np.float32) - gmc - wmc, 0, 1)

    extent = (hi - lo) / block
    rest = extent / size  # remaining downsampling: smooth first so each voxel holds its partial volumes
    sigma = [0.42 * f if f > 1 else 0.0 for f in rest]
    tissue = np.stack([
        ndimage.zoom(ndimage.gaussian_filter(_block_mean(m, block), sigma), size / extent, order=1, mode="nearest",
                     grid_mode=True)
        for m in (csfc, gmc, wmc)
    ]).astype(np.float32)
    tissue = np.clip(tissue, 0, 1)
    tissue /= np.maximum(tissue.sum(0, keepdims=True), 1.0)
    small = np.concatenate([1 - tissue.sum(0, keepdims=True), tissue]).astype(np.float32)

    spacing = tuple(float(f * v) for f, v in zip((hi - lo) / size, vox_mm, strict=True))
    origin_mm = affine1[:3, :3] @ lo + affine1[:3, 3] + 0.5 * (np.array(spacing) - vox_mm)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin_mm

    near = np.clip(ndimage.gaussian_filter(small[1], 1.0) / 0.25, 0, 1).astype(np.float32)

    grid = np.indices(small.shape[1:]).reshape(3, -1).T.astype(np.float32)
    frac = grid / (size - 1)
    central = np.all((frac > [0.3, 0.3, 0.35]) & (frac < [0.7, 0.7, 0.75]), axis=1)
    vent = central & (small[1].ravel() > 0.5)
    if vent.sum() < 3:  # tiny grids: fall back to the brain centre
        vent = central
    vpts = grid[vent]
    ventricles = vpts.mean(0)
    vrad = np.maximum(2.0 * vpts.std(0) * np.array(spacing), 8.0)
    wm_core = small[3] > 0.8
    if wm_core.sum() < 1:
        wm_core = small[3] >= small[3].max() * 0.9
    depth = ndimage.distance_transform_edt(small[0] < 0.05, sampling=spacing)
    above = np.arange(size)[None, None, :] > ventricles[2] - 0.1 * size  # supratentorial, like most gliomas
    deep = (depth > 0.2 * depth.max()) & (small[1] < 0.5) & above
    if deep.sum() < 1:
        deep = depth >= depth.max()
    # Padded by one voxel of air for the sampler (outside the grid is air); ``air`` marks cells whose
    # eight corners are all pure air, where sampling can be skipped.
    table = np.concatenate([small, near[None]])
    table = np.stack([np.pad(m, 1, constant_values=1.0 if c == 0 else 0.0) for c, m in enumerate(table)])
    pure = (table[0] >= 1 - 1e-3) & np.all(table[1:] <= 1e-3, axis=0)  # "air" to within 0.1 %
    air = ndimage.minimum_filter(pure.view(np.uint8), size=2, origin=-1, mode="nearest").astype(bool)
    return _Base(
        probs=small, near_csf=near, table=np.ascontiguousarray(table, dtype=np.float32), air=air.ravel(),
        spacing=spacing, affine=affine, ventricles=ventricles, ventricle_radius_mm=vrad,
        wm_sites=np.argwhere(wm_core).astype(np.float32), deep_sites=np.argwhere(deep).astype(np.float32),
    )


def _trilinear(base: _Base, pos: np.ndarray) -> np.ndarray:
    """Trilinear samples of the base channels (probabilities, near-CSF) at ``pos`` (3, N) in voxel
    coordinates; returns (C, N). Points whose cell is pure air skip the arithmetic, and one index
    computation serves all channels: several times faster than ``map_coordinates`` per channel."""
    table = base.table  # (C, X+2, Y+2, Z+2), padded with air
    n_ch, dims = table.shape[0], table.shape[1:]
    idx, frac = [], []
    for k in range(3):
        q = np.clip(pos[k] + 1.0, 0.0, dims[k] - 1.0001)
        i = q.astype(np.int64)  # q >= 0, so truncation is floor
        idx.append(i)
        frac.append((q - i).astype(np.float32))
    corner = (idx[0] * dims[1] + idx[1]) * dims[2] + idx[2]
    out = np.zeros((n_ch, pos.shape[1]), np.float32)
    out[0] = 1.0
    live = np.flatnonzero(~np.take(base.air, corner))
    if live.size == 0:
        return out
    corner = corner[live]
    fx, fy, fz = (f[live] for f in frac)
    flat = table.reshape(n_ch, -1)
    acc = np.zeros((n_ch, live.size), np.float32)
    for dx in (0, 1):
        wx = fx if dx else 1 - fx
        for dy in (0, 1):
            wxy = wx * (fy if dy else 1 - fy)
            for dz in (0, 1):
                w = wxy * (fz if dz else 1 - fz)
                at = corner + ((dx * dims[1] + dy) * dims[2] + dz)
                for c in range(n_ch):
                    acc[c] += w * np.take(flat[c], at)
    out[:, live] = acc
    return out


# --------------------------------------------------------------------------- smooth random fields
def _axis_weights(coords: np.ndarray, size: int, n_ctrl: int) -> np.ndarray:
    """Cubic-spline weights (len(coords), n_ctrl) mapping control points spread over [0, size-1]
    to the given coordinates. A field is then a tensor product: cheap on any product grid."""
    u = np.asarray(coords, np.float64) / max(size - 1, 1) * (n_ctrl - 1)
    if n_ctrl < 4:
        return np.stack([np.interp(u, np.arange(n_ctrl), row) for row in np.eye(n_ctrl)], axis=1)
    return CubicSpline(np.arange(n_ctrl), np.eye(n_ctrl), bc_type="natural")(u)


def _n_ctrl(size: int, spacing_vox: float) -> int:
    return max(4, int(math.ceil((size - 1) / spacing_vox)) + 1)


class _Grid:
    """A product grid of output voxel coordinates: the full volume, or one axial slice of it."""

    def __init__(self, size: int, axes: Sequence[np.ndarray]):
        self.size = size
        self.axes = [np.asarray(a, np.float64) for a in axes]
        self.shape = tuple(len(a) for a in self.axes)
        self._weights: dict[tuple[int, int], np.ndarray] = {}

    def field(self, ctrl: np.ndarray) -> np.ndarray:
        """Evaluate control-point noise (..., gx, gy, gz) on the grid as a tensor product of spline weights."""
        gs = ctrl.shape[-3:]
        wx, wy, wz = (self._weight(k, g) for k, g in enumerate(gs))
        lead = ctrl.shape[:-3]
        flat = ctrl.reshape((-1,) + gs).astype(np.float64)
        out = np.einsum("nabc,ia->nibc", flat, wx)
        out = np.einsum("nibc,jb->nijc", out, wy)
        out = out @ wz.T  # the one large contraction; float64 keeps it reproducible to float32 precision
        return out.reshape(lead + self.shape).astype(np.float32)

    def _weight(self, axis: int, n_ctrl: int) -> np.ndarray:
        if (axis, n_ctrl) not in self._weights:
            self._weights[(axis, n_ctrl)] = _axis_weights(self.axes[axis], self.size, n_ctrl)
        return self._weights[(axis, n_ctrl)]

    def mesh(self) -> list[np.ndarray]:
        return [a.reshape([-1 if k == j else 1 for k in range(3)]) for j, a in enumerate(self.axes)]


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SynthSubject:
    """Arrays of one synthetic subject. ``clean_label`` is the argmax of the probability maps the
    image was made from: the label a perfect image-only model would give. ``label`` is what the
    simulated rater drew; where they differ, only memorising the patient helps."""

    image: np.ndarray  # float32 (x, y, z) or (x, y) for a slice
    label: np.ndarray  # uint8
    clean_label: np.ndarray  # uint8
    affine: np.ndarray
    spacing: tuple[float, ...]
    anatomy: dict = field(default_factory=dict)


def _subject_rng(seed: int, site: int, subject: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, site, subject, stream]))


def _lesion_kind(lesions: bool | str) -> str | None:
    if lesions is False or lesions is None:
        return None
    if lesions is True:
        return "wmh"
    if isinstance(lesions, str) and lesions.lower() in LESION_KINDS:
        return lesions.lower()
    if isinstance(lesions, str) and lesions.lower() in ("tumor",):
        return "tumour"
    raise ConfigError(f"lesions={lesions!r}: use False, True (white-matter lesions), 'wmh' or 'tumour'")


def _blobs(pos: np.ndarray, centres: np.ndarray, radii_mm: np.ndarray, spacing: np.ndarray,
           rough: np.ndarray) -> np.ndarray:
    """Soft union of irregular spheres at points (3, N): 1 inside, 0 outside, with a one-voxel
    partial-volume ramp at the edge; ``rough`` (N,) wrinkles the radius."""
    out = np.zeros(pos.shape[1:], np.float32)
    ramp = float(np.mean(spacing))
    for c, r in zip(centres, radii_mm, strict=True):
        d = np.sqrt(sum(((pos[k] - c[k]) * spacing[k]) ** 2 for k in range(3)))
        inside = np.clip((r * (1 + 0.3 * rough) - d) / ramp + 0.5, 0, 1)
        np.maximum(out, inside, out=out)
    return out


def render_subject(
    size: int,
    profile: str | ScannerProfile,
    seed: int = 0,
    site_index: int = 0,
    subject_index: int = 0,
    *,
    lesions: bool | str = False,
    params: SynthParams | None = None,
    slice_index: int | None = None,
) -> SynthSubject:
    """Make one subject in memory (the file writers call this). ``slice_index`` renders only that
    axial slice, with the same anatomy as the full volume except the through-plane blur."""
    prof = _profile(profile)
    params = params or SynthParams()
    kind = _lesion_kind(lesions)
    base = _base(size)
    sp = np.array(base.spacing)
    rng = _subject_rng(seed, site_index, subject_index)
    n_cls = 5 if kind else 4

    # All random draws happen here, in a fixed order and with shapes independent of the grid,
    # so a slice shows exactly the anatomy of the corresponding volume.
    atrophy = float(rng.uniform(0, 1))
    scale = 1 + params.scale_sd * rng.standard_normal(3)
    angles = params.rotation_deg * rng.standard_normal(3)
    shift_vox = params.shift_mm * rng.standard_normal(3) / sp
    g = params.elastic_grid
    elastic = (params.elastic_mm * rng.standard_normal((3, g, g, g))) / sp[:, None, None, None]
    vent = params.ventricle_max * float(np.clip(atrophy + 0.15 * rng.standard_normal(), 0, 1))
    thin = params.thinning_max * float(np.clip(atrophy + 0.15 * rng.standard_normal(), 0, 1))
    thin_ctrl = rng.standard_normal((1, 4, 4, 4))
    rough_ctrl = rng.standard_normal((1, 6, 6, 6))
    if kind == "wmh":
        n_les = max(1, int(rng.integers(params.wmh_count[0], params.wmh_count[1] + 1)))
        les_centres = base.wm_sites[rng.integers(0, len(base.wm_sites), n_les)] + rng.uniform(-0.5, 0.5, (n_les, 3))
        les_radii = rng.uniform(*params.wmh_radius_mm, n_les)
    elif kind == "tumour":
        les_centres = base.deep_sites[rng.integers(0, len(base.deep_sites), 1)].astype(np.float64)
        les_radii = rng.uniform(*params.tumour_radius_mm, 1)
    else:
        les_centres, les_radii = np.zeros((0, 3)), np.zeros(0)
    gp = _n_ctrl(size, params.rater_patch_spacing_vox)
    patch_ctrl = rng.standard_normal((1, gp, gp, gp))
    gs = _n_ctrl(size, params.rater_shift_spacing_vox)
    shift_ctrl = params.rater_shift_vox * rng.standard_normal((3, gs, gs, gs))
    gb = _n_ctrl(size, params.rater_bias_spacing_vox)
    bias_lab_ctrl = params.rater_bias * rng.standard_normal((n_cls, gb, gb, gb))
    mu = np.array(prof.intensities[:n_cls], np.float64)
    if not prof.is_ct:
        mu = mu * (1 + params.tissue_jitter * rng.standard_normal(n_cls))
        gain = prof.gain * (1 + params.gain_jitter * rng.standard_normal())
    else:  # CT is calibrated: small HU offsets only
        mu = mu + np.r_[0.0, params.tissue_jitter * 30 * rng.standard_normal(n_cls - 1)]
        gain = 1.0
    bias_ctrl = prof.bias * rng.standard_normal((1, 4, 4, 4))
    noise_rng = _subject_rng(seed, site_index, subject_index, stream=1)

    if slice_index is None:
        grid = _Grid(size, [np.arange(size)] * 3)
    else:
        if not 0 <= slice_index < size:
            raise ConfigError(f"slice_index {slice_index} is outside 0..{size - 1}")
        grid = _Grid(size, [np.arange(size), np.arange(size), np.array([slice_index])])
    n_pts = int(np.prod(grid.shape))

    # Warp: affine about the centre (in mm), then elastic, then the ventricles' radial expansion.
    centre = np.full(3, (size - 1) / 2.0)
    mat = _rotation(angles) @ np.diag(1 / scale)
    x = grid.mesh()
    off_mm = [(x[k] - centre[k]) * sp[k] for k in range(3)]
    pos = grid.field(elastic).reshape(3, n_pts)
    for k in range(3):
        lin = sum(mat[k, j] * off_mm[j] for j in range(3)) / sp[k] + centre[k] + shift_vox[k]
        pos[k] += np.broadcast_to(lin, grid.shape).reshape(-1).astype(np.float32)
    rel2 = sum(((pos[k] - base.ventricles[k]) * sp[k] / base.ventricle_radius_mm[k]) ** 2 for k in range(3))
    shrink = 1 - vent * np.exp(-0.5 * rel2)
    for k in range(3):
        pos[k] = base.ventricles[k] + (pos[k] - base.ventricles[k]) * shrink
    rough = grid.field(rough_ctrl).reshape(n_pts)
    lesion_pos = pos.copy()
    if kind == "tumour":  # mass effect: tissue around the tumour is pushed outward
        c, r = les_centres[0], les_radii[0]
        d2 = sum(((pos[k] - c[k]) * sp[k]) ** 2 for k in range(3))
        push = 1 - params.tumour_mass_effect * np.exp(-0.5 * d2 / (1.5 * r) ** 2)
        for k in range(3):
            pos[k] = c[k] + (pos[k] - c[k]) * push

    # Rater: inside smooth random patches the outline is drawn displaced by up to ~rater_shift_vox.
    thr = float(_normal_quantile(1 - params.rater_patch_fraction)) if params.rater_patch_fraction > 0 else np.inf
    patch = np.clip((grid.field(patch_ctrl).reshape(n_pts) - thr) / 0.4, 0, 1)
    active = np.flatnonzero(patch > 0)
    dshift = grid.field(shift_ctrl).reshape(3, n_pts)[:, active] * patch[active]

    sampled = _trilinear(base, pos)
    p_img, near = sampled[:4], sampled[4]
    p_lab = p_img.copy()
    if active.size:
        p_lab[:, active] = _trilinear(base, pos[:, active] + dshift)[:4]

    # Cortical thinning: part of the GM probability next to CSF becomes CSF (same in image and label).
    thin_w = thin * np.clip(1 + 0.5 * grid.field(thin_ctrl).reshape(n_pts), 0, 2) * near
    for p in (p_img, p_lab):
        moved = thin_w * p[2]
        p[2] -= moved
        p[1] += moved

    if kind:
        cand = np.flatnonzero((p_img[3] > 1e-3) | (p_lab[3] > 1e-3)) if kind == "wmh" else np.arange(n_pts)
        blob_img = np.zeros(n_pts, np.float32)
        blob_img[cand] = _blobs(lesion_pos[:, cand], les_centres, les_radii, sp, rough[cand])
        blob_lab = blob_img.copy()
        if active.size:
            blob_lab[active] = _blobs(lesion_pos[:, active] + dshift, les_centres, les_radii, sp, rough[active])
        maps = []
        for p, blob in ((p_img, blob_img), (p_lab, blob_lab)):
            if kind == "wmh":
                les = blob * p[3]
                p[3] -= les
            else:
                les = blob * (1 - p[0])
                p[1:] *= 1 - blob
            maps.append(np.concatenate([p, les[None]]))
        p_img, p_lab = maps

    clean = np.argmax(p_img, axis=0).astype(np.uint8).reshape(grid.shape)
    p_lab += grid.field(bias_lab_ctrl).reshape(n_cls, n_pts)
    label = np.argmax(p_lab, axis=0).astype(np.uint8).reshape(grid.shape)

    # Image: partial-volume mix, bias field, PSF, noise.
    img = (mu.astype(np.float32) @ p_img).reshape(grid.shape)
    if not prof.is_ct:
        img = img * np.float32(gain) * np.exp(grid.field(bias_ctrl)[0])
    fwhm = np.array([prof.inplane_fwhm_mm, prof.inplane_fwhm_mm, prof.slice_mm])
    extra = np.sqrt(np.clip(fwhm**2 - sp**2, 0, None)) / 2.3548 / sp
    if slice_index is not None:
        extra[2] = 0.0  # one slice has no neighbours to blur with
    if np.any(extra > 0.05):
        img = ndimage.gaussian_filter(img, np.where(extra > 0.05, extra, 0.0), mode="nearest")
    n1 = noise_rng.standard_normal(img.shape, dtype=np.float32)
    if prof.is_ct:
        img = img + np.float32(prof.noise) * n1
    else:
        n2 = noise_rng.standard_normal(img.shape, dtype=np.float32)
        sigma = np.float32(prof.noise * gain * max(prof.intensities[:4]))
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    img = img.astype(np.float32)
    if slice_index is not None:
        img, label, clean = img[:, :, 0], label[:, :, 0], clean[:, :, 0]
    anatomy = {"atrophy": round(atrophy, 4), "ventricle_expansion": round(vent, 4), "cortical_thinning": round(thin, 4),
               "scale": [round(float(v), 4) for v in scale], "lesions": int(len(les_radii))}
    return SynthSubject(img, label, clean, base.affine.copy(), tuple(base.spacing), anatomy)


def _normal_quantile(q: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(min(max(q, 1e-9), 1 - 1e-9)))


def _profile(profile: str | ScannerProfile) -> ScannerProfile:
    if isinstance(profile, ScannerProfile):
        return profile
    if profile not in SCANNER_PROFILES:
        raise ConfigError(f"unknown scanner profile {profile!r} (known: {', '.join(SCANNER_PROFILES)})")
    return SCANNER_PROFILES[profile]


# --------------------------------------------------------------------------- dermoscopy
def render_dermoscopy(
    size: int, profile: str | CameraProfile, seed: int = 0, site_index: int = 0, subject_index: int = 0,
    params: SynthParams | None = None,
) -> SynthSubject:
    """One dermoscopy-like RGB image (uint8, H x W x 3) with one irregular pigmented lesion.
    The mask is the outline a rater drew: smoother than the true border, a little generous or tight."""
    from PIL import Image, ImageDraw

    cam = CAMERA_PROFILES.get(profile) if isinstance(profile, str) else profile
    if cam is None:
        raise ConfigError(f"unknown camera profile {profile!r} (known: {', '.join(CAMERA_PROFILES)})")
    params = params or SynthParams()
    rng = _subject_rng(seed, site_index, subject_index, stream=7)
    grid = _Grid(size, [np.arange(size), np.arange(size), np.zeros(1)])

    tone = rng.uniform(0, 1)
    skin = (1 - tone) * np.array([238.0, 204.0, 184.0]) + tone * np.array([186.0, 134.0, 104.0])
    # Skin varies mostly in brightness (shading, erythema is a small red shift), not in hue.
    shade = grid.field(rng.standard_normal((2, 5, 5, 4)))[..., 0]
    skin_var = 8.0 * shade[0][..., None] + 5.0 * shade[1][..., None] * np.array([1.0, -0.4, -0.4])
    centre = 0.5 + 0.06 * rng.standard_normal(2)
    radius = rng.uniform(0.14, 0.3)
    harmonics = [(k, rng.normal(0, 0.10 / k**0.7), rng.uniform(0, 2 * np.pi)) for k in range(2, 8)]
    rough = grid.field(rng.standard_normal((1, 9, 9, 4)))[0, ..., 0]
    light = np.array([172.0, 118.0, 82.0]) + rng.normal(0, 8, 3)
    dark = np.array([88.0, 56.0, 40.0]) + rng.normal(0, 6, 3)
    pigment = grid.field(rng.standard_normal((1, 6, 6, 4)))[0, ..., 0]
    n_glob = int(rng.integers(0, 12))
    globules = [(rng.uniform(-0.7, 0.7, 2), rng.uniform(0.6, 1.8)) for _ in range(n_glob)]
    edge_px = rng.uniform(1.5, 4.0)
    opacity = rng.uniform(0.8, 1.0)
    n_hair = int(rng.poisson(cam.hairs))
    hairs = [(rng.uniform(0, size, 6), rng.integers(1, 3)) for _ in range(n_hair)]
    rater_offset = params.derm_rater_offset * rng.standard_normal()
    rater_wobble = grid.field(params.derm_rater_wobble * rng.standard_normal((1, 7, 7, 4)))[0, ..., 0]
    fine = rng.standard_normal((size, size, 3)).astype(np.float32)
    sensor = rng.standard_normal((size, size, 3)).astype(np.float32)

    yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    dy, dx = yy - centre[0], xx - centre[1]
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    r_theta = radius * (1 + sum(a * np.cos(k * theta + ph) for k, a, ph in harmonics))
    r_theta = np.maximum(r_theta, 0.3 * radius)
    f_true = (r_theta * (1 + 0.06 * rough) - rho) / radius  # signed distance in radii, > 0 inside
    f_rater = (r_theta * (1 + 0.06 * 0.3 * rough) - rho) / radius + rater_offset + rater_wobble
    alpha = np.clip(f_true * radius * size / edge_px + 0.5, 0, 1) * opacity

    t = np.clip(0.45 + 0.3 * pigment + 0.6 * np.clip(f_true, 0, 1), 0, 1)
    lesion_rgb = (1 - t)[..., None] * light + t[..., None] * dark
    for (gx, gy), gr in globules:
        gpos = centre + 0.6 * radius * np.array([gy, gx])
        d2 = ((yy - gpos[0]) ** 2 + (xx - gpos[1]) ** 2) * size**2
        lesion_rgb = lesion_rgb * (1 - 0.5 * np.exp(-0.5 * d2 / gr**2) * (f_true > 0))[..., None]
    skin_rgb = skin + skin_var + 3.0 * ndimage.gaussian_filter(fine, (0.7, 0.7, 0))
    img = (1 - alpha)[..., None] * skin_rgb + alpha[..., None] * lesion_rgb

    if hairs:
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for pts, width in hairs:
            p0, p1, p2 = pts[0:2], pts[2:4], pts[4:6]
            ts = np.linspace(0, 1, 24)[:, None]
            curve = (1 - ts) ** 2 * p0 + 2 * (1 - ts) * ts * p1 + ts**2 * p2
            draw.line([tuple(map(float, q)) for q in curve], fill=255, width=int(width))
        hair = np.asarray(canvas, np.float32)[..., None] / 255.0 * 0.75
        img = img * (1 - hair) + np.array([45.0, 32.0, 26.0]) * hair

    rr = np.hypot(yy - 0.5, xx - 0.5) / 0.5
    img = img * np.array(cam.cast) * cam.gain * (1 - cam.vignette * np.clip(rr, 0, 1.5) ** 2)[..., None]
    if cam.circular_field:
        img = img * np.clip((1.02 - rr) / 0.04, 0, 1)[..., None]
    blur = cam.blur_px * size / 128
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    img = np.clip(np.round(img + cam.noise * sensor), 0, 255).astype(np.uint8)
    label = (f_rater > 0).astype(np.uint8)
    clean = (f_true > 0).astype(np.uint8)
    if cam.circular_field:  # nothing is visible, or labelled, outside the dermoscope's field
        label[rr > 1.0] = 0
        clean[rr > 1.0] = 0
    return SynthSubject(img, label, clean, np.eye(4), (1.0, 1.0), {"radius": round(float(radius), 4)})


# --------------------------------------------------------------------------- writing
def _nifti_bytes(array: np.ndarray, affine: np.ndarray, is_label: bool) -> bytes:
    """Gzipped NIfTI-1 with mtime 0, so the same arrays give byte-identical files."""
    import nibabel as nib

    data = array.astype(np.uint8 if is_label else np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if is_label:
        img.header["cal_min"], img.header["cal_max"] = 0, int(data.max())
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)  # noise barely compresses: be fast


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _is_previous_cohort(folder: Path) -> bool:
    """True when every file in ``folder`` belongs to a cohort this module wrote: replacing it loses nothing."""
    manifest = folder / MANIFEST_NAME
    try:
        raw = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(raw, dict) or not isinstance(raw.get("info"), dict) or raw["info"].get("generator") != GENERATOR:
        return False
    known = {MANIFEST_NAME, "dataset.json"}
    for s in raw.get("subjects", []):
        if isinstance(s, dict):
            known.update(str(p) for p in s.get("images", []) if isinstance(p, str))
            if isinstance(s.get("label"), str):
                known.add(s["label"])
    for path in folder.rglob("*"):
        if path.is_file() or path.is_symlink():
            if str(path.relative_to(folder)) not in known:
                return False
    return True


def _check_out(out: Path) -> Path:
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_cohort(out):
        raise ConfigError(
            f"--out {out}: folder is not empty and is not a cohort privseg generated; "
            "choose an empty or new folder (nothing was written)"
        )
    return out


class _Staging:
    """Build the cohort in a hidden sibling folder, then swap it in, so ``out`` is either the old
    cohort or the complete new one, never a mixture."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        trash = None
        if self.out.is_dir():
            if any(self.out.iterdir()):
                trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
                os.rmdir(trash)
                os.rename(self.out, trash)
            else:
                os.rmdir(self.out)
        try:
            os.rename(self.tmp, self.out)
        except OSError:
            if trash is not None:
                os.rename(trash, self.out)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _check_counts(sites: int, subjects: int, test_fraction: float, val_fraction: float) -> None:
    if not isinstance(sites, int) or sites < 1 or sites > 99:
        raise ConfigError(f"sites must be an integer in 1..99, got {sites!r}")
    if not isinstance(subjects, int) or subjects < 1 or subjects > 999:
        raise ConfigError(f"subjects (per site) must be an integer in 1..999, got {subjects!r}")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError("val and test fractions must be in [0, 1) and sum to less than 1")


def _ids(site: int, subjects: int) -> list[str]:
    width = max(2, len(str(subjects)))
    return [f"H{site + 1}S{j + 1:0{width}d}" for j in range(subjects)]


def _resolve_profiles(profiles: Sequence[str] | None, sites: int, kind: str) -> list[str]:
    names = list(profiles) if profiles is not None else default_profiles(sites, kind)
    if len(names) != sites:
        raise ConfigError(f"profiles: {len(names)} given for {sites} sites; give one per site")
    table = CAMERA_PROFILES if kind == "dermoscopy" else SCANNER_PROFILES
    for n in names:
        if n not in table:
            raise ConfigError(f"unknown {'camera' if kind == 'dermoscopy' else 'scanner'} profile {n!r} "
                              f"(known: {', '.join(table)})")
    return names


def synth_cohort(
    out: str | Path,
    *,
    sites: int = 3,
    subjects: int = 8,
    size: int = 64,
    seed: int = 0,
    layout: str = "msd",
    lesions: bool | str = False,
    profiles: Sequence[str] | None = None,
    test_fraction: float = 0.25,
    val_fraction: float = 0.0,
    params: SynthParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Cohort:
    """Write the embedded multi-site 3D cohort into ``out`` and return it (manifest ``cohort.json``).

    ``subjects`` is per site; ``profiles`` names one :data:`SCANNER_PROFILES` entry per site;
    ``lesions`` adds a ``lesion`` class (True or "wmh": white-matter-hyperintensity-like blobs;
    "tumour": one tumour-like blob with mass effect). ``layout`` is "msd" (``dataset.json``,
    ``imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz``; every subject is labelled and listed
    under "training", the split lives in the manifest) or "mrbrains" (``<id>/pre/reg_T1.nii.gz``,
    ``<id>/segm.nii.gz``)."""
    _check_counts(sites, subjects, test_fraction, val_fraction)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {LAYOUTS}")
    if not isinstance(size, int) or not 16 <= size <= 256:
        raise ConfigError(f"size must be an integer in 16..256, got {size!r}")
    kind = _lesion_kind(lesions)
    names = _resolve_profiles(profiles, sites, "volume")
    params = params or SynthParams()
    out = _check_out(Path(out))
    classes = list(TISSUE_CLASSES) + ([LESION_CLASS] if kind else [])
    mods = {SCANNER_PROFILES[n].modality for n in names}
    channel = mods.pop() if len(mods) == 1 else "image"
    total = sites * subjects

    with _Staging(out) as root:
        rows: list[Subject] = []
        for si, name in enumerate(names):
            prof = SCANNER_PROFILES[name]
            for j, sid in enumerate(_ids(si, subjects)):
                subj = render_subject(size, prof, seed, si, j, lesions=kind or False, params=params)
                if layout == "msd":
                    img_rel, lab_rel = f"imagesTr/{sid}_0000.nii.gz", f"labelsTr/{sid}.nii.gz"
                else:
                    img_rel, lab_rel = f"{sid}/{MRBRAINS_FILES[prof.modality]}", f"{sid}/segm.nii.gz"
                _write(root / img_rel, _nifti_bytes(subj.image, subj.affine, False))
                _write(root / lab_rel, _nifti_bytes(subj.label, subj.affine, True))
                rows.append(Subject(id=sid, site=f"H{si + 1}", images=(str(root / img_rel),), label=str(root / lab_rel),
                                    modality=prof.modality, spacing=subj.spacing))
                if progress is not None:
                    progress(len(rows), total)
        rows = assign_splits(rows, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        if layout == "msd":
            dataset = {
                "name": "privseg-synth",
                "description": "Synthetic multi-site brain cohort from the MNI152 2009c templates (privseg)",
                "tensorImageSize": "3D",
                "reference": "MNI ICBM152 2009c nonlinear symmetric, via nilearn",
                "licence": "see the MNI ICBM152 template licence",
                "modality": {"0": channel},
                "channel_names": {"0": channel},
                "labels": {str(k): c for k, c in enumerate(classes)},
                "numTraining": len(rows),
                "numTest": 0,
                "file_ending": ".nii.gz",
                "training": [
                    {"image": f"./imagesTr/{s.id}.nii.gz", "label": f"./labelsTr/{s.id}.nii.gz"} for s in rows
                ],
                "test": [],
                "privseg": {"sites": {s.id: s.site for s in rows}, "modalities": {s.id: s.modality for s in rows}},
            }
            _write(root / "dataset.json", (json.dumps(dataset, indent=2) + "\n").encode())
        info = {
            "generator": GENERATOR,
            "format_version": FORMAT_VERSION,
            "template": "MNI ICBM152 2009c nonlinear symmetric (nilearn package data)",
            "seed": seed,
            "size": size,
            "spacing_mm": list(_base(size).spacing),
            "layout": layout,
            "lesions": kind,
            "profiles": {f"H{k + 1}": asdict(SCANNER_PROFILES[n]) for k, n in enumerate(names)},
            "params": asdict(params),
        }
        Cohort(subjects=rows, classes=classes, channels=[channel], spatial_dims=3, name="privseg-synth",
               format=layout, root=root, info=info).save()
    return Cohort.from_manifest(out / MANIFEST_NAME)


def synth_cohort_2d(
    out: str | Path,
    *,
    sites: int = 3,
    subjects: int = 8,
    size: int = 128,
    seed: int = 0,
    kind: str = "slices",
    lesions: bool | str = False,
    profiles: Sequence[str] | None = None,
    test_fraction: float = 0.25,
    val_fraction: float = 0.0,
    params: SynthParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Cohort:
    """Write a 2D cohort of PNGs: ``images/<id>.png`` and ``masks/<id>.png`` (class index per pixel).

    "slices": one axial slice (through the ventricles, a few slices up or down) of each synthetic
    brain, 8-bit grey, classes as in 3D; PNGs hold no negative values, so CT profiles are refused.
    "dermoscopy": an RGB skin image with one irregular pigmented lesion; classes background/lesion,
    profiles name :data:`CAMERA_PROFILES`."""
    _check_counts(sites, subjects, test_fraction, val_fraction)
    if kind not in KINDS_2D:
        raise ConfigError(f"kind {kind!r} is not one of {KINDS_2D}")
    if not isinstance(size, int) or not 32 <= size <= 512 or (kind == "slices" and size > 256):
        raise ConfigError(f"size must be an integer in 32..512 (slices: ..256), got {size!r}")
    names = _resolve_profiles(profiles, sites, kind)
    params = params or SynthParams()
    lesion_kind = _lesion_kind(lesions) if kind == "slices" else None
    if kind == "slices" and any(SCANNER_PROFILES[n].is_ct for n in names):
        raise ConfigError("2D slices are 8-bit PNGs and cannot hold CT Hounsfield units: use MR profiles")
    out = _check_out(Path(out))
    if kind == "dermoscopy":
        classes, channels = ["background", "lesion"], ["R", "G", "B"]
    else:
        classes = list(TISSUE_CLASSES) + ([LESION_CLASS] if lesion_kind else [])
        mods = {SCANNER_PROFILES[n].modality for n in names}
        channels = [mods.pop() if len(mods) == 1 else "image"]
    total = sites * subjects

    with _Staging(out) as root:
        rows: list[Subject] = []
        spacing: tuple[float, ...] | None = None
        for si, name in enumerate(names):
            for j, sid in enumerate(_ids(si, subjects)):
                if kind == "dermoscopy":
                    subj = render_dermoscopy(size, name, seed, si, j, params)
                    pixels, modality, spacing = subj.image, "RGB", None
                else:
                    prof = SCANNER_PROFILES[name]
                    base = _base(size)
                    jitter = _subject_rng(seed, si, j, stream=3).integers(-max(1, size // 20), max(1, size // 20) + 1)
                    z = int(np.clip(round(float(base.ventricles[2]) + size * 0.04 + jitter), 0, size - 1))
                    subj = render_subject(size, prof, seed, si, j, lesions=lesion_kind or False, params=params,
                                          slice_index=z)
                    # Fixed per-site window (no per-image stretch), as a scanner's export would do.
                    top = prof.gain * max(prof.intensities[:4]) * 1.15
                    pixels = np.clip(np.round(subj.image / top * 255), 0, 255).astype(np.uint8)
                    modality, spacing = prof.modality, (subj.spacing[1], subj.spacing[0])
                    pixels = np.ascontiguousarray(np.rot90(pixels))  # x right, y (anterior) up, as viewers show it
                    subj.label = np.ascontiguousarray(np.rot90(subj.label))
                img_rel, lab_rel = f"images/{sid}.png", f"masks/{sid}.png"
                _write(root / img_rel, _png_bytes(pixels))
                _write(root / lab_rel, _png_bytes(subj.label))
                rows.append(Subject(id=sid, site=f"H{si + 1}", images=(str(root / img_rel),), label=str(root / lab_rel),
                                    modality=modality, spacing=spacing))
                if progress is not None:
                    progress(len(rows), total)
        rows = assign_splits(rows, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        table = CAMERA_PROFILES if kind == "dermoscopy" else SCANNER_PROFILES
        info = {
            "generator": GENERATOR,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "seed": seed,
            "size": size,
            "lesions": lesion_kind,
            "profiles": {f"H{k + 1}": asdict(table[n]) for k, n in enumerate(names)},
            "params": asdict(params),
        }
        if kind == "slices":
            info["template"] = "MNI ICBM152 2009c nonlinear symmetric (nilearn package data)"
        Cohort(subjects=rows, classes=classes, channels=channels, spatial_dims=2, name=f"privseg-synth-{kind}",
               format="image2d", root=root, info=info).save()
    return Cohort.from_manifest(out / MANIFEST_NAME)


# --------------------------------------------------------------------------- a federation with power
# Membership and forgetting results need enough patients on both sides of the test: with 6-9 training
# patients a membership AUC moves in steps of 0.1 or more and one patient decides a result. The embedded
# cohort is cheap per subject, so the power federation uses more, smaller subjects.
POWER_SUBJECTS = 16  # patients per site
POWER_SIZE = 24  # volume side, voxels: at 24 a patient is 28^3 after preprocessing, so POWER_TRAINING
# visits each one ~110 times in 2000 steps, enough to memorise (at 32: 36^3, 2.5x the cost per step)
POWER_TEST_FRACTION = 0.25  # never-seen patients per site: 4 of 16
POWER_MIN_TRAIN, POWER_MIN_NEVER_SEEN = 24, 12
# How to train a pooled model on the power cohort so that it memorises (benchmarks/power_check.py
# measures it; benchmarks/results/power_check.md). Random 24^3 patches of unet_tiny do not memorise
# (membership AUC ~0.47 after 1000 steps at 32^3): a patient's voxels land at a new patch position every
# step and the tiny net keeps learning what generalises. Whole-volume patches (patch = the preprocessed
# volume, one per patient per step) of the 4-level unet show every patient exactly as the membership
# test scores it; measured AUC 0.65 / 0.74 / 0.87 / 0.97 after 800 / 1200 / 1600 / 2000 steps (~21 min
# on one loaded CPU thread). Fewer steps do not pass. ``patch_size`` None = the whole volume.
POWER_TRAINING = {"model": "unet", "patch_size": None, "patches_per_subject": 1, "subjects_per_step": 2,
                  "lr": 3e-3, "steps": 2000}
# The membership score for the power check: Dice of the un-augmented volume (views=1). Training uses
# no flips or intensity jitter, so augmented views score an input the model never saw and wash the
# members' advantage out; Dice (argmax) is less dominated by how hard a patient is than the mean loss.
# Measured after 2000 steps: Dice 0.97 (views=1) vs 0.69 (views=2); loss 0.77 vs 0.55.
POWER_MIA = {"statistic": "dice", "views": 1}


def power_cohort(out: str | Path, *, sites: int = 3, subjects: int = POWER_SUBJECTS, size: int = POWER_SIZE,
                 seed: int = 0, profiles: Sequence[str] | None = None, check: bool = True, **kw) -> Cohort:
    """The embedded federation sized for membership, unlearning and federated benchmarks: ``sites`` x 16
    patients at 24^3 with a quarter of each site never seen (3 sites: 36 training, 12 never-seen).
    The same cohort from the CLI: ``privseg data synth --sites 3 --subjects 16 --size 24`` (the default
    test fraction is 0.25). ``check`` refuses a setting with fewer than 24 training or 12 never-seen
    patients (the sizes the power checks of :mod:`privseg.audit.mia` are defined for)."""
    if check:
        n_test = min(int(round(subjects * POWER_TEST_FRACTION)), subjects - 1) * sites
        n_train = subjects * sites - n_test
        if n_train < POWER_MIN_TRAIN or n_test < POWER_MIN_NEVER_SEEN:
            raise ConfigError(f"power cohort: {sites} sites x {subjects} patients give {n_train} training and "
                              f"{n_test} never-seen patients; at least {POWER_MIN_TRAIN} and {POWER_MIN_NEVER_SEEN} "
                              "are needed for the membership test to have power")
    if not 24 <= size <= 32 and check:
        raise ConfigError(f"power cohort: size {size} outside 24..32 (more, smaller subjects is the point)")
    return synth_cohort(out, sites=sites, subjects=subjects, size=size, seed=seed, profiles=profiles,
                        test_fraction=POWER_TEST_FRACTION, **kw)
