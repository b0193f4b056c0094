"""Building embedded cohorts: the multi-site 3D cohort (:func:`synth_cohort`), its 2D variants
(:func:`synth_cohort_2d`), and the federation sized for membership tests (:func:`power_cohort`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from privseg.data.cohort import Cohort, Subject
from privseg.data.synth.anatomy import LESION_CLASS, TISSUE_CLASSES, render_subject, resolve_lesion_kind
from privseg.data.synth.dermoscopy import render_dermoscopy
from privseg.data.synth.fields import subject_rng
from privseg.data.synth.params import SynthParams
from privseg.data.synth.reserved import check_site_cohort
from privseg.data.synth.scanner import CAMERA_PROFILES, SCANNER_PROFILES, ScannerProfile, default_profiles
from privseg.data.synth.template import template_base
from privseg.data.synth.writers import (
    FORMAT_VERSION,
    GENERATOR,
    check_out,
    msd_dataset_json,
    nifti_bytes,
    png_bytes,
    write_cohort,
    write_file,
    write_subject_files,
)
from privseg.errors import ConfigError

LAYOUTS = ("msd", "mrbrains")
KINDS_2D = ("slices", "dermoscopy")
# MRBrainS18 stores the registered scans under <id>/pre/; T2 and CT do not occur there, so they get analogous names.
MRBRAINS_FILES = {
    "T1": "pre/reg_T1.nii.gz", "FLAIR": "pre/FLAIR.nii.gz", "T2": "pre/reg_T2.nii.gz", "CT": "pre/CT.nii.gz",
}


def _check_counts(sites: int, subjects: int, test_fraction: float, val_fraction: float) -> None:
    if not isinstance(sites, int) or sites < 1 or sites > 99:
        raise ConfigError(f"sites must be an integer in 1..99, got {sites!r}")
    if not isinstance(subjects, int) or subjects < 1 or subjects > 999:
        raise ConfigError(f"subjects (per site) must be an integer in 1..999, got {subjects!r}")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError("val and test fractions must be in [0, 1) and sum to less than 1")


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
    out: str | Path, *, sites: int = 3, subjects: int = 8, size: int = 64, seed: int = 0, layout: str = "msd",
    lesions: bool | str = False, profiles: Sequence[str] | None = None, test_fraction: float = 0.25,
    val_fraction: float = 0.0, params: SynthParams | None = None, progress: Callable[[int, int], None] | None = None,
    public: bool = False,
) -> Cohort:
    """Write the embedded multi-site 3D cohort into ``out`` and return it (manifest ``cohort.json``).

    ``subjects`` is per site; ``profiles`` names one :data:`SCANNER_PROFILES` entry per site;
    ``lesions`` adds a ``lesion`` class (True or "wmh": white-matter-hyperintensity-like blobs;
    "tumour": one tumour-like blob with mass effect). ``layout`` is "msd" (``dataset.json``,
    ``imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz``; every subject is labelled and listed
    under "training", the split lives in the manifest) or "mrbrains" (``<id>/pre/reg_T1.nii.gz``,
    ``<id>/segm.nii.gz``). ``public`` is for :func:`privseg.data.synth.public.public_cohort` only: without
    it, public seeds and scanners are refused."""
    _check_counts(sites, subjects, test_fraction, val_fraction)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {LAYOUTS}")
    if not isinstance(size, int) or not 16 <= size <= 256:
        raise ConfigError(f"size must be an integer in 16..256, got {size!r}")
    kind = resolve_lesion_kind(lesions)
    names = _resolve_profiles(profiles, sites, "volume")
    if not public:  # a site cohort: no public seed or scanner (privseg.data.synth.public)
        check_site_cohort(seed, names)
    params = params or SynthParams()
    out = check_out(Path(out))
    classes = list(TISSUE_CLASSES) + ([LESION_CLASS] if kind else [])
    mods = {SCANNER_PROFILES[n].modality for n in names}
    channel = mods.pop() if len(mods) == 1 else "image"

    def write_subject(root: Path, si: int, name: str, j: int, sid: str) -> Subject:
        prof = SCANNER_PROFILES[name]
        subj = render_subject(size, prof, seed, si, j, lesions=kind or False, params=params)
        if layout == "msd":
            img_rel, lab_rel = f"imagesTr/{sid}_0000.nii.gz", f"labelsTr/{sid}.nii.gz"
        else:
            img_rel, lab_rel = f"{sid}/{MRBRAINS_FILES[prof.modality]}", f"{sid}/segm.nii.gz"
        return write_subject_files(root, sid, si, img_rel, lab_rel, nifti_bytes(subj.image, subj.affine, False),
                                   nifti_bytes(subj.label, subj.affine, True), prof.modality, subj.spacing)

    def manifest(root: Path, rows: list[Subject]) -> Cohort:
        if layout == "msd":
            write_file(root / "dataset.json", msd_dataset_json(rows, classes, channel))
        info = {
            "generator": GENERATOR,
            "format_version": FORMAT_VERSION,
            "template": "MNI ICBM152 2009c nonlinear symmetric (nilearn package data)",
            "seed": seed,
            "size": size,
            "spacing_mm": list(template_base(size).spacing),
            "layout": layout,
            "lesions": kind,
            "profiles": {f"H{k + 1}": asdict(SCANNER_PROFILES[n]) for k, n in enumerate(names)},
            "params": asdict(params),
        }
        return Cohort(subjects=rows, classes=classes, channels=[channel], spatial_dims=3, name="privseg-synth",
                      format=layout, root=root, info=info)

    return write_cohort(out, names, subjects, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                        progress=progress, write_subject=write_subject, manifest=manifest,
                        id_prefix="P" if public else "H")


def _slice_png(size: int, prof: ScannerProfile, seed: int, si: int, j: int, lesions: bool | str,
               params: SynthParams) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One axial slice (through the ventricles, a few slices up or down) as 8-bit pixels, its label and
    its in-plane spacing, oriented x right, y (anterior) up, as viewers show it."""
    base = template_base(size)
    jitter = subject_rng(seed, si, j, stream=3).integers(-max(1, size // 20), max(1, size // 20) + 1)
    z = int(np.clip(round(float(base.ventricles[2]) + size * 0.04 + jitter), 0, size - 1))
    subj = render_subject(size, prof, seed, si, j, lesions=lesions, params=params, slice_index=z)
    # Fixed per-site window (no per-image stretch), as a scanner's export would do.
    top = prof.gain * max(prof.intensities[:4]) * 1.15
    pixels = np.clip(np.round(subj.image / top * 255), 0, 255).astype(np.uint8)
    spacing = (subj.spacing[1], subj.spacing[0])
    pixels = np.ascontiguousarray(np.rot90(pixels))  # x right, y (anterior) up, as viewers show it
    label = np.ascontiguousarray(np.rot90(subj.label))
    return pixels, label, spacing


def synth_cohort_nd(out: str | Path, dims: int, *, kind: str, size: int, layout: str, lesions: bool | str,
                    **common) -> Cohort:
    """`privseg data synth`'s cohort: with ``dims`` 2, a 2D one of ``kind`` (:func:`synth_cohort_2d`, its
    own image size, no lesions); else the 3D one (:func:`synth_cohort`). ``common``: sites, subjects,
    seed, progress and the rest both take."""
    if dims == 2:
        return synth_cohort_2d(out, kind=kind, **common)
    return synth_cohort(out, size=size, layout=layout, lesions=lesions, **common)


def synth_cohort_2d(
    out: str | Path, *, sites: int = 3, subjects: int = 8, size: int = 128, seed: int = 0, kind: str = "slices",
    lesions: bool | str = False, profiles: Sequence[str] | None = None, test_fraction: float = 0.25,
    val_fraction: float = 0.0, params: SynthParams | None = None, progress: Callable[[int, int], None] | None = None,
    public: bool = False,
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
    if not public:
        check_site_cohort(seed, names)
    params = params or SynthParams()
    lesion_kind = resolve_lesion_kind(lesions) if kind == "slices" else None
    if kind == "slices" and any(SCANNER_PROFILES[n].is_ct for n in names):
        raise ConfigError("2D slices are 8-bit PNGs and cannot hold CT Hounsfield units: use MR profiles")
    out = check_out(Path(out))
    if kind == "dermoscopy":
        classes, channels = ["background", "lesion"], ["R", "G", "B"]
    else:
        classes = list(TISSUE_CLASSES) + ([LESION_CLASS] if lesion_kind else [])
        mods = {SCANNER_PROFILES[n].modality for n in names}
        channels = [mods.pop() if len(mods) == 1 else "image"]

    def write_subject(root: Path, si: int, name: str, j: int, sid: str) -> Subject:
        if kind == "dermoscopy":
            subj = render_dermoscopy(size, name, seed, si, j, params)
            pixels, label, modality, spacing = subj.image, subj.label, "RGB", None
        else:
            prof = SCANNER_PROFILES[name]
            pixels, label, spacing = _slice_png(size, prof, seed, si, j, lesion_kind or False, params)
            modality = prof.modality
        return write_subject_files(root, sid, si, f"images/{sid}.png", f"masks/{sid}.png", png_bytes(pixels),
                                   png_bytes(label), modality, spacing)

    def manifest(root: Path, rows: list[Subject]) -> Cohort:
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
        return Cohort(subjects=rows, classes=classes, channels=channels, spatial_dims=2, name=f"privseg-synth-{kind}",
                      format="image2d", root=root, info=info)

    return write_cohort(out, names, subjects, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                        progress=progress, write_subject=write_subject, manifest=manifest,
                        id_prefix="P" if public else "H")


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
