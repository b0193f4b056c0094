"""Site profiles: how each hospital's scanner (or dermoscopy camera) turns tissue into pixels.

A :class:`ScannerProfile` is the site's domain shift: tissue contrast for T1, T2, FLAIR or CT,
scanner gain, a smooth multiplicative bias field, Rician (MR) or Gaussian (CT) noise, and a
point-spread function (in-plane blur and slice thickness). :func:`form_image` applies it to a
subject's partial-volume tissue maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from privseg.data.synth.fields import Grid
from privseg.data.synth.params import SynthParams
from privseg.errors import ConfigError

MODALITIES = ("T1", "T2", "FLAIR", "CT")


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
        # public data (privseg.data.synth.public): scanners no site has, as an open dataset's differ from a
        # hospital's -- other field strength, contrast, resolution and calibration
        ScannerProfile("public-T1-7T", "T1", (0.0, 0.30, 0.66, 1.00, 0.45), 1200.0, 0.28, 0.02, 0.8, 0.0,
                       "open-data 7 T T1-weighted MPRAGE: high contrast, strong bias"),
        ScannerProfile("public-T1-1T", "T1", (0.0, 0.42, 0.76, 1.00, 0.56), 150.0, 0.10, 0.06, 2.0, 1.5,
                       "open-data 1 T T1-weighted: low GM/WM contrast, noisy"),
        ScannerProfile("public-CT-thin", "CT", (-1000.0, 12.0, 44.0, 31.0, 22.0), 1.0, 0.0, 7.0, 1.25, 1.0,
                       "open-data thin-slice head CT of another vendor: other HU calibration, noisier"),
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
        CameraProfile("public-archive", (1.05, 1.0, 0.93), 0.95, 0.25, True, 0.8, 4.0, 1.5,
                      "open-data archive of scanned dermoscopy slides: yellowed cast, circular field"),
        CameraProfile("public-atlas", (0.97, 1.02, 1.03), 1.04, 0.05, False, 1.2, 2.5, 0.3,
                      "open-data teaching atlas: even light, few hairs"),
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


def resolve_profile(profile: str | ScannerProfile) -> ScannerProfile:
    """A scanner profile, or the one of :data:`SCANNER_PROFILES` named ``profile``."""
    if isinstance(profile, ScannerProfile):
        return profile
    if profile not in SCANNER_PROFILES:
        raise ConfigError(f"unknown scanner profile {profile!r} (known: {', '.join(SCANNER_PROFILES)})")
    return SCANNER_PROFILES[profile]


@dataclass(frozen=True)
class _ScanDraws:
    """One scan's random intensity settings: tissue means, gain and the bias field's control points."""

    mu: np.ndarray
    gain: float
    bias_ctrl: np.ndarray


def draw_scan(rng: np.random.Generator, prof: ScannerProfile, params: SynthParams, n_cls: int) -> _ScanDraws:
    """Draw after the anatomy, from the same stream: the order of draws is part of the cohort's seed."""
    mu = np.array(prof.intensities[:n_cls], np.float64)
    if not prof.is_ct:
        mu = mu * (1 + params.tissue_jitter * rng.standard_normal(n_cls))
        gain = prof.gain * (1 + params.gain_jitter * rng.standard_normal())
    else:  # CT is calibrated: small HU offsets only
        mu = mu + np.r_[0.0, params.tissue_jitter * 30 * rng.standard_normal(n_cls - 1)]
        gain = 1.0
    bias_ctrl = prof.bias * rng.standard_normal((1, 4, 4, 4))
    return _ScanDraws(mu, gain, bias_ctrl)


def form_image(grid: Grid, p_img: np.ndarray, prof: ScannerProfile, scan: _ScanDraws, sp: np.ndarray,
                noise_rng: np.random.Generator, one_slice: bool) -> np.ndarray:
    """Image: partial-volume mix, bias field, PSF, noise."""
    img = (scan.mu.astype(np.float32) @ p_img).reshape(grid.shape)
    if not prof.is_ct:
        img = img * np.float32(scan.gain) * np.exp(grid.field(scan.bias_ctrl)[0])
    fwhm = np.array([prof.inplane_fwhm_mm, prof.inplane_fwhm_mm, prof.slice_mm])
    extra = np.sqrt(np.clip(fwhm**2 - sp**2, 0, None)) / 2.3548 / sp
    if one_slice:
        extra[2] = 0.0  # one slice has no neighbours to blur with
    if np.any(extra > 0.05):
        img = ndimage.gaussian_filter(img, np.where(extra > 0.05, extra, 0.0), mode="nearest")
    n1 = noise_rng.standard_normal(img.shape, dtype=np.float32)
    if prof.is_ct:
        img = img + np.float32(prof.noise) * n1
    else:
        n2 = noise_rng.standard_normal(img.shape, dtype=np.float32)
        sigma = np.float32(prof.noise * scan.gain * max(prof.intensities[:4]))
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return img.astype(np.float32)
