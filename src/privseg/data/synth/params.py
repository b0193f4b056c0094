"""The amplitudes of subject-to-subject variation in the embedded cohort (:class:`SynthParams`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from privseg.errors import ConfigError


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
