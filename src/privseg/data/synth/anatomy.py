"""Subject anatomy: each subject's own shape and the label its simulated rater drew.

Every subject gets subject-unique anatomy that the image shows (head-size scaling, a smooth
elastic warp, ventricle enlargement and cortical thinning with atrophy, optional white-matter
lesions or a tumour with mass effect) and label perturbations the image does not show (the
rater's displaced outline in smooth patches and a weak per-class preference); see the package
docstring of :mod:`privseg.data.synth` for why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privseg.data.synth.fields import Grid, control_points, normal_quantile, rotation_matrix, subject_rng
from privseg.data.synth.params import SynthParams
from privseg.data.synth.scanner import ScannerProfile, draw_scan, form_image, resolve_profile
from privseg.data.synth.template import TemplateBase, template_base, trilinear
from privseg.errors import ConfigError

TISSUE_CLASSES = ("background", "CSF", "GM", "WM")
LESION_CLASS = "lesion"
LESION_KINDS = ("wmh", "tumour")


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


def resolve_lesion_kind(lesions: bool | str) -> str | None:
    """The lesion kind a ``lesions`` option asks for: None, "wmh" (True) or a name in LESION_KINDS."""
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


@dataclass(frozen=True)
class _AnatomyDraws:
    """One subject's random anatomy and rater choices. All are drawn up front, in a fixed order and
    with shapes independent of the grid, so a slice shows exactly the anatomy of the corresponding volume."""

    atrophy: float
    scale: np.ndarray
    angles: np.ndarray
    shift_vox: np.ndarray
    elastic: np.ndarray
    vent: float
    thin: float
    thin_ctrl: np.ndarray
    rough_ctrl: np.ndarray
    les_centres: np.ndarray
    les_radii: np.ndarray
    patch_ctrl: np.ndarray
    shift_ctrl: np.ndarray
    bias_lab_ctrl: np.ndarray


def _draw_anatomy(rng: np.random.Generator, size: int, base: TemplateBase, params: SynthParams, kind: str | None,
                  n_cls: int) -> _AnatomyDraws:
    sp = np.array(base.spacing)
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
    gp = control_points(size, params.rater_patch_spacing_vox)
    patch_ctrl = rng.standard_normal((1, gp, gp, gp))
    gs = control_points(size, params.rater_shift_spacing_vox)
    shift_ctrl = params.rater_shift_vox * rng.standard_normal((3, gs, gs, gs))
    gb = control_points(size, params.rater_bias_spacing_vox)
    bias_lab_ctrl = params.rater_bias * rng.standard_normal((n_cls, gb, gb, gb))
    return _AnatomyDraws(atrophy, scale, angles, shift_vox, elastic, vent, thin, thin_ctrl, rough_ctrl, les_centres,
                         les_radii, patch_ctrl, shift_ctrl, bias_lab_ctrl)


def _output_grid(size: int, slice_index: int | None) -> Grid:
    if slice_index is None:
        return Grid(size, [np.arange(size)] * 3)
    if not 0 <= slice_index < size:
        raise ConfigError(f"slice_index {slice_index} is outside 0..{size - 1}")
    return Grid(size, [np.arange(size), np.arange(size), np.array([slice_index])])


def _warp(grid: Grid, base: TemplateBase, d: _AnatomyDraws, params: SynthParams,
          kind: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each output voxel samples the template: affine about the centre (in mm), then elastic,
    then the ventricles' radial expansion, then a tumour's mass effect. Returns the sample positions,
    the positions lesions are drawn at (before the mass effect) and the lesion-border roughness."""
    size, sp = grid.size, np.array(base.spacing)
    n_pts = int(np.prod(grid.shape))
    centre = np.full(3, (size - 1) / 2.0)
    mat = rotation_matrix(d.angles) @ np.diag(1 / d.scale)
    x = grid.mesh()
    off_mm = [(x[k] - centre[k]) * sp[k] for k in range(3)]
    pos = grid.field(d.elastic).reshape(3, n_pts)
    for k in range(3):
        lin = sum(mat[k, j] * off_mm[j] for j in range(3)) / sp[k] + centre[k] + d.shift_vox[k]
        pos[k] += np.broadcast_to(lin, grid.shape).reshape(-1).astype(np.float32)
    rel2 = sum(((pos[k] - base.ventricles[k]) * sp[k] / base.ventricle_radius_mm[k]) ** 2 for k in range(3))
    shrink = 1 - d.vent * np.exp(-0.5 * rel2)
    for k in range(3):
        pos[k] = base.ventricles[k] + (pos[k] - base.ventricles[k]) * shrink
    rough = grid.field(d.rough_ctrl).reshape(n_pts)
    lesion_pos = pos.copy()
    if kind == "tumour":  # mass effect: tissue around the tumour is pushed outward
        c, r = d.les_centres[0], d.les_radii[0]
        d2 = sum(((pos[k] - c[k]) * sp[k]) ** 2 for k in range(3))
        push = 1 - params.tumour_mass_effect * np.exp(-0.5 * d2 / (1.5 * r) ** 2)
        for k in range(3):
            pos[k] = c[k] + (pos[k] - c[k]) * push
    return pos, lesion_pos, rough


def _rater_shift(grid: Grid, d: _AnatomyDraws, params: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """Rater: inside smooth random patches the outline is drawn displaced by up to ~rater_shift_vox.
    Returns the voxels inside a patch and their displacement (3, n_active)."""
    n_pts = int(np.prod(grid.shape))
    thr = float(normal_quantile(1 - params.rater_patch_fraction)) if params.rater_patch_fraction > 0 else np.inf
    patch = np.clip((grid.field(d.patch_ctrl).reshape(n_pts) - thr) / 0.4, 0, 1)
    active = np.flatnonzero(patch > 0)
    dshift = grid.field(d.shift_ctrl).reshape(3, n_pts)[:, active] * patch[active]
    return active, dshift


def _tissue_maps(grid: Grid, base: TemplateBase, d: _AnatomyDraws, pos: np.ndarray, active: np.ndarray,
                 dshift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tissue probabilities (4, N) the image is made from and those the rater labelled from."""
    n_pts = int(np.prod(grid.shape))
    sampled = trilinear(base, pos)
    p_img, near = sampled[:4], sampled[4]
    p_lab = p_img.copy()
    if active.size:
        p_lab[:, active] = trilinear(base, pos[:, active] + dshift)[:4]
    # Cortical thinning: part of the GM probability next to CSF becomes CSF (same in image and label).
    thin_w = d.thin * np.clip(1 + 0.5 * grid.field(d.thin_ctrl).reshape(n_pts), 0, 2) * near
    for p in (p_img, p_lab):
        moved = thin_w * p[2]
        p[2] -= moved
        p[1] += moved
    return p_img, p_lab


def _add_lesions(kind: str, d: _AnatomyDraws, sp: np.ndarray, p_img: np.ndarray, p_lab: np.ndarray,
                 lesion_pos: np.ndarray, rough: np.ndarray, active: np.ndarray,
                 dshift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append the lesion class: white-matter lesions replace WM, a tumour replaces all tissue."""
    n_pts = p_img.shape[1]
    cand = np.flatnonzero((p_img[3] > 1e-3) | (p_lab[3] > 1e-3)) if kind == "wmh" else np.arange(n_pts)
    blob_img = np.zeros(n_pts, np.float32)
    blob_img[cand] = _blobs(lesion_pos[:, cand], d.les_centres, d.les_radii, sp, rough[cand])
    blob_lab = blob_img.copy()
    if active.size:
        blob_lab[active] = _blobs(lesion_pos[:, active] + dshift, d.les_centres, d.les_radii, sp, rough[active])
    maps = []
    for p, blob in ((p_img, blob_img), (p_lab, blob_lab)):
        if kind == "wmh":
            les = blob * p[3]
            p[3] -= les
        else:
            les = blob * (1 - p[0])
            p[1:] *= 1 - blob
        maps.append(np.concatenate([p, les[None]]))
    return maps[0], maps[1]


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
    prof = resolve_profile(profile)
    params = params or SynthParams()
    kind = resolve_lesion_kind(lesions)
    base = template_base(size)
    sp = np.array(base.spacing)
    rng = subject_rng(seed, site_index, subject_index)
    n_cls = 5 if kind else 4
    d = _draw_anatomy(rng, size, base, params, kind, n_cls)
    scan = draw_scan(rng, prof, params, n_cls)
    noise_rng = subject_rng(seed, site_index, subject_index, stream=1)

    grid = _output_grid(size, slice_index)
    n_pts = int(np.prod(grid.shape))
    pos, lesion_pos, rough = _warp(grid, base, d, params, kind)
    active, dshift = _rater_shift(grid, d, params)
    p_img, p_lab = _tissue_maps(grid, base, d, pos, active, dshift)
    if kind:
        p_img, p_lab = _add_lesions(kind, d, sp, p_img, p_lab, lesion_pos, rough, active, dshift)

    clean = np.argmax(p_img, axis=0).astype(np.uint8).reshape(grid.shape)
    p_lab += grid.field(d.bias_lab_ctrl).reshape(n_cls, n_pts)
    label = np.argmax(p_lab, axis=0).astype(np.uint8).reshape(grid.shape)
    img = form_image(grid, p_img, prof, scan, sp, noise_rng, one_slice=slice_index is not None)
    if slice_index is not None:
        img, label, clean = img[:, :, 0], label[:, :, 0], clean[:, :, 0]
    anatomy = {"atrophy": round(d.atrophy, 4), "ventricle_expansion": round(d.vent, 4),
               "cortical_thinning": round(d.thin, 4), "scale": [round(float(v), 4) for v in d.scale],
               "lesions": int(len(d.les_radii))}
    return SynthSubject(img, label, clean, base.affine.copy(), tuple(base.spacing), anatomy)
