"""Shared fixtures: tiny cohorts written as real NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from privseg.data.cohort import Cohort, Subject, assign_splits

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def make_blob_subject(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'organ' (class 1) with a core (class 2) inside; intensity follows the labels."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    centre = rng.uniform(-0.15, 0.15, size=3)[:, None, None, None]
    radii = rng.uniform(0.45, 0.65, size=3)[:, None, None, None]
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(0))
    label = np.zeros((size,) * 3, np.uint8)
    label[r < 1.0] = 1
    label[r < 0.5] = 2
    image = np.choose(label, [0.0, 1.0, 2.0]).astype(np.float32) + rng.normal(0, 0.1, label.shape).astype(np.float32)
    return image, label


def volume_items(n: int, size: int = 12, seed: int = 0) -> list[dict]:
    """``n`` tiny in-memory patients (``image``, ``label`` in {0, 1, 2}, ``patient`` P000...): the items a
    DP engine or a site's private trainer takes, without files."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = (rng.random((1, size, size, size)) > 0.7).astype(np.float32) * rng.integers(1, 3)
        image = (label + rng.normal(0, 0.3, label.shape)).astype(np.float32)
        out.append({"image": torch.from_numpy(image), "label": torch.from_numpy(label), "patient": f"P{i:03d}"})
    return out


def make_tiny_cohort(root: Path, sites: int = 2, per_site: int = 3, size: int = 20, seed: int = 0, *,
                     val_fraction: float = 0.0, test_fraction: float = 0.34, name: str = "tiny",
                     relabel=None) -> Cohort:
    """Blob subjects at ``sites`` sites, split by ``assign_splits``; ``relabel(site_index, label)``
    may change a site's labels (e.g. a site whose raters label the other way round)."""
    rng = np.random.default_rng(seed)
    subjects = []
    for s in range(sites):
        for k in range(per_site):
            sid = f"S{s}{k:02d}"
            image, label = make_blob_subject(rng, size)
            if relabel is not None:
                label = relabel(s, label)
            img = write_nifti(root / "images" / f"{sid}.nii.gz", image)
            lab = write_nifti(root / "labels" / f"{sid}.nii.gz", label)
            subjects.append(Subject(id=sid, site=f"H{s + 1}", images=(str(img),), label=str(lab), modality="T1"))
    cohort = Cohort(subjects=assign_splits(subjects, val_fraction=val_fraction, test_fraction=test_fraction,
                                           seed=seed),
                    classes=["background", "organ", "core"], channels=["T1"], name=name, root=root)
    cohort.save()
    return cohort


def tiny_fl_config(cohort: Cohort, *, lr: float, subjects_per_step: int = 2, patch: int = 16, **fl):
    """An FLConfig of ``unet_tiny`` on ``cohort``'s sites (no evaluation rounds); ``fl`` sets the rest."""
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.train import TrainConfig

    info = check_sites(sites_from_cohort(cohort.root))
    tc = TrainConfig(model="unet_tiny", patch_size=(patch,) * 3, lr=lr, device="cpu",
                     subjects_per_step=subjects_per_step, patches_per_subject=1, in_channels=len(info["channels"]),
                     num_classes=len(info["classes"]))
    return FLConfig(**{"sites": sites_from_cohort(cohort.root), "train": tc, "eval_every": 0, **fl})


def tiny_federation(root: Path, *, name: str, rounds: int, local_steps: int, per_site: int, size: int,
                    subjects_per_step: int, patch: int = 16, run: str = "original") -> tuple[Cohort, Path]:
    """A 3-site tiny cohort under ``root`` and a finished in-process FedAvg run on it that keeps
    every site's update (what erasure and reference-model tests start from)."""
    from privseg.federated.simulation import simulate_inprocess

    cohort = make_tiny_cohort(root / "tiny", sites=3, per_site=per_site, size=size)
    cfg = tiny_fl_config(cohort, lr=5e-3, subjects_per_step=subjects_per_step, patch=patch, name=name, rounds=rounds,
                         local_steps=local_steps, keep_updates=True)
    simulate_inprocess(cfg, root / run)
    return cohort, root / run



def tiny_central_run(cohort: Cohort, out: Path, steps: int, **settings) -> Path:
    """``steps`` steps of central training of unet_tiny on ``cohort`` (16³ patches, CPU, one checkpoint at
    the end) into ``out``; ``settings``: other TrainConfig fields. Returns the run's last.pt."""
    from privseg.train import TrainConfig, Trainer

    cfg = TrainConfig.for_cohort(cohort, model="unet_tiny", patch_size=(16, 16, 16), steps=steps,
                                 checkpoint_every=steps, device="cpu", **settings)
    Trainer(cohort, cfg, out).fit(resume=False)
    return out / "last.pt"

# verification thresholds that pass any erasure (tests of the mechanics, not of the evidence)
LOOSE = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}


def tiny_dp_run(root: Path, dp, rounds: int = 2) -> tuple[Cohort, Path]:
    """A finished 2-site in-process run under the privacy settings ``dp`` (one step a round)."""
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.simulation import simulate_inprocess
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(root / "c", sites=2, per_site=4, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=1, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                     steps=rounds)
    state = simulate_inprocess(FLConfig(name="dpe", sites=sites, train=tc, rounds=rounds, local_steps=1,
                                        eval_every=0, keep_updates=True, privacy=dp), root / "run")
    assert state.status == "finished"
    return cohort, root / "run"


def val_cohort(root: Path, sites: int = 3, per_site: int = 5, size: int = 16) -> Cohort:
    """A tiny cohort whose sites have train, validation and test patients (the guard needs val)."""
    return make_tiny_cohort(root, sites, per_site, size, val_fraction=0.2, test_fraction=0.2, name="pv")


def small_fl_config(cohort: Cohort, **kw):
    """One round of two local steps that keeps every update (personalisation and erasure tests)."""
    return tiny_fl_config(cohort, lr=1e-2, **{"name": "pe", "rounds": 1, "local_steps": 2, "keep_updates": True, **kw})


@pytest.fixture
def tiny_cohort(tmp_path: Path) -> Cohort:
    return make_tiny_cohort(tmp_path / "tiny")
