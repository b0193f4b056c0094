"""The 2D dermoscopy-like task: an RGB skin photograph with one irregular pigmented lesion, taken
by the site's :class:`CameraProfile`, and the outline a rater drew around it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from privseg.data.synth.anatomy import SynthSubject
from privseg.data.synth.fields import Grid, subject_rng
from privseg.data.synth.params import SynthParams
from privseg.data.synth.scanner import CAMERA_PROFILES, CameraProfile
from privseg.errors import ConfigError


def render_dermoscopy(
    size: int, profile: str | CameraProfile, seed: int = 0, site_index: int = 0, subject_index: int = 0,
    params: SynthParams | None = None,
) -> SynthSubject:
    """One dermoscopy-like RGB image (uint8, H x W x 3) with one irregular pigmented lesion.
    The mask is the outline a rater drew: smoother than the true border, a little generous or tight."""
    cam = CAMERA_PROFILES.get(profile) if isinstance(profile, str) else profile
    if cam is None:
        raise ConfigError(f"unknown camera profile {profile!r} (known: {', '.join(CAMERA_PROFILES)})")
    params = params or SynthParams()
    rng = subject_rng(seed, site_index, subject_index, stream=7)
    grid = Grid(size, [np.arange(size), np.arange(size), np.zeros(1)])

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
