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

The code is split by concern: :mod:`.template` (the MNI152 anatomy), :mod:`.fields` (smooth random
fields, seeded streams), :mod:`.anatomy` (each subject's shape and rater), :mod:`.scanner` (site
profiles and image formation), :mod:`.dermoscopy`, :mod:`.writers` (files, staging, manifest) and
:mod:`.builders` (the cohorts, including the power federation).
"""

from privseg.data.synth.anatomy import LESION_CLASS, LESION_KINDS, TISSUE_CLASSES, SynthSubject, render_subject
from privseg.data.synth.builders import (
    KINDS_2D,
    LAYOUTS,
    MRBRAINS_FILES,
    POWER_MIA,
    POWER_MIN_NEVER_SEEN,
    POWER_MIN_TRAIN,
    POWER_SIZE,
    POWER_SUBJECTS,
    POWER_TEST_FRACTION,
    POWER_TRAINING,
    power_cohort,
    synth_cohort,
    synth_cohort_2d,
    synth_cohort_nd,
)
from privseg.data.synth.dermoscopy import render_dermoscopy
from privseg.data.synth.params import SynthParams
from privseg.data.synth.scanner import (
    CAMERA_PROFILES,
    MODALITIES,
    SCANNER_PROFILES,
    CameraProfile,
    ScannerProfile,
    default_profiles,
)
from privseg.data.synth.writers import FORMAT_VERSION, GENERATOR

__all__ = [
    "CAMERA_PROFILES", "FORMAT_VERSION", "GENERATOR", "KINDS_2D", "LAYOUTS", "LESION_CLASS", "LESION_KINDS",
    "MODALITIES", "MRBRAINS_FILES", "POWER_MIA", "POWER_MIN_NEVER_SEEN", "POWER_MIN_TRAIN", "POWER_SIZE",
    "POWER_SUBJECTS", "POWER_TEST_FRACTION", "POWER_TRAINING", "SCANNER_PROFILES", "TISSUE_CLASSES",
    "CameraProfile", "ScannerProfile", "SynthParams", "SynthSubject", "default_profiles", "power_cohort",
    "render_dermoscopy", "render_subject", "synth_cohort", "synth_cohort_2d", "synth_cohort_nd",
]
