"""Template anatomy: the MNI152 2009c templates inside the ``nilearn`` wheel, cropped to the brain
and resampled to the cohort's grid with partial volumes, plus the sampler every subject's warp uses.

Nothing is downloaded (docs/architecture.md, principle 4); the result is cached per grid size.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from privseg.errors import DataError

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_BRAIN_THRESHOLD = 0.2  # nilearn.datasets.load_mni152_brain_mask's default threshold on the [0, 1] T1 template
_BASE_MARGIN_MM = 6  # background kept around the intracranial bounding box
_ICV_SIGMA_MM, _ICV_THRESHOLD = 2.0, 0.15  # brain mask -> intracranial mask (adds the outer CSF layer)


@dataclass(frozen=True)
class TemplateBase:
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
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DataError("nilearn", "is not installed; the embedded cohort needs the MNI152 templates inside it")
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = {k: folder / name for k, name in _TEMPLATE_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        imgs = {k: nib.load(str(p)) for k, p in paths.items()}
    else:
        from nilearn import datasets  # why: only when the packaged files moved; importing it takes seconds

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
def template_base(size: int) -> TemplateBase:
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
    return TemplateBase(
        probs=small, near_csf=near, table=np.ascontiguousarray(table, dtype=np.float32), air=air.ravel(),
        spacing=spacing, affine=affine, ventricles=ventricles, ventricle_radius_mm=vrad,
        wm_sites=np.argwhere(wm_core).astype(np.float32), deep_sites=np.argwhere(deep).astype(np.float32),
    )


def trilinear(base: TemplateBase, pos: np.ndarray) -> np.ndarray:
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
