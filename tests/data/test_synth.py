"""The embedded cohort: deterministic, aligned, site-specific, loadable, refusing to clobber, and
with label noise that only memorising a patient can reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from privseg.data.cohort import MANIFEST_NAME, Cohort
from privseg.data.synth import (
    SCANNER_PROFILES,
    SynthParams,
    default_profiles,
    render_subject,
    synth_cohort,
    synth_cohort_2d,
)
from privseg.data.transforms import load_subject
from privseg.errors import ConfigError

SIZE = 24  # voxels per side: enough anatomy for every class, fast enough for the suite


@pytest.fixture(scope="module")
def msd(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return synth_cohort(tmp_path_factory.mktemp("synth") / "msd", sites=2, subjects=3, size=SIZE, seed=1)


@pytest.fixture(scope="module")
def mrbrains(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return synth_cohort(tmp_path_factory.mktemp("synth") / "mrb", sites=2, subjects=3, size=SIZE, seed=1,
                        layout="mrbrains", lesions=True, profiles=["FLAIR-3T", "CT"])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_cohort_different_seed_differs(msd: Cohort, tmp_path: Path) -> None:
    again = synth_cohort(tmp_path / "again", sites=2, subjects=3, size=SIZE, seed=1)
    assert _files(msd.root) == _files(again.root)  # byte-identical files, manifest included
    a = render_subject(SIZE, "T1-3T", seed=1, site_index=0, subject_index=0)
    b = render_subject(SIZE, "T1-3T", seed=2, site_index=0, subject_index=0)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.label, b.label)
    c = render_subject(SIZE, "T1-3T", seed=1, site_index=0, subject_index=1)
    assert not np.array_equal(a.label, c.label)  # subjects of one site differ too


def test_labels_in_range_and_every_class_in_every_subject(msd: Cohort, mrbrains: Cohort) -> None:
    assert msd.classes == ["background", "CSF", "GM", "WM"]
    assert mrbrains.classes == ["background", "CSF", "GM", "WM", "lesion"]
    for cohort in (msd, mrbrains):
        for s in cohort.subjects:
            img = nib.load(s.label)
            assert img.get_data_dtype() == np.uint8
            values = set(np.unique(np.asarray(img.dataobj)).tolist())
            assert values == set(range(cohort.num_classes)), (s.id, values)


def test_image_and_label_stay_aligned_through_the_deformation() -> None:
    prof = SCANNER_PROFILES["T1-3T"]
    for j in range(2):
        s = render_subject(32, prof, seed=5, site_index=0, subject_index=j)
        means = [float(s.image[s.label == c].mean()) for c in range(4)]
        assert means[3] > means[2] > means[1] > means[0]  # T1: WM > GM > CSF > air
        expected = np.asarray(prof.intensities)[s.label]
        assert np.corrcoef(s.image.ravel(), expected.ravel())[0, 1] > 0.85


def test_sites_have_their_own_scanner(msd: Cohort) -> None:
    stats = {}
    for site in msd.sites:
        vals = []
        for s in msd.select(site=site):
            image = np.asarray(nib.load(s.images[0]).dataobj)
            label = np.asarray(nib.load(s.label).dataobj)
            vals.append([image[label == c].mean() for c in (1, 2, 3)])
        stats[site] = np.mean(vals, axis=0)
    h1, h2 = stats["H1"], stats["H2"]
    assert abs(h1[2] / h2[2] - 1) > 0.5  # scanner gain differs a lot
    assert np.abs(h1 / h1[2] - h2 / h2[2]).max() > 0.03  # and so does the tissue contrast
    assert msd.info["profiles"]["H1"]["name"] != msd.info["profiles"]["H2"]["name"]


def test_files_load_in_both_layouts(msd: Cohort, mrbrains: Cohort) -> None:
    dataset = json.loads((msd.root / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}
    assert len(dataset["training"]) == 6
    assert (msd.root / "imagesTr" / "H1S01_0000.nii.gz").is_file()
    assert (msd.root / "labelsTr" / "H1S01.nii.gz").is_file()
    assert (mrbrains.root / "H1S01" / "pre" / "FLAIR.nii.gz").is_file()
    assert (mrbrains.root / "H2S01" / "pre" / "CT.nii.gz").is_file()
    assert (mrbrains.root / "H1S01" / "segm.nii.gz").is_file()
    for cohort, fmt in ((msd, "msd"), (mrbrains, "mrbrains")):
        assert cohort.format == fmt
        assert Cohort.from_manifest(cohort.root / MANIFEST_NAME).subjects == cohort.subjects
        for s in cohort.subjects:
            data = load_subject(s, cohort)
            assert tuple(data.image.shape) == (1, SIZE, SIZE, SIZE)
            assert np.allclose(np.diag(data.affine)[:3], s.spacing)
    assert {s.modality for s in mrbrains.subjects} == {"FLAIR", "CT"}
    ct = next(s for s in mrbrains.subjects if s.modality == "CT")
    assert float(load_subject(ct, mrbrains).image.min()) < -500  # CT is stored in HU


def test_splits_are_per_subject_and_every_site_trains(tmp_path: Path) -> None:
    cohort = synth_cohort(tmp_path / "c", sites=2, subjects=4, size=SIZE, seed=3, test_fraction=0.25,
                          val_fraction=0.25)
    ids = [s.id for s in cohort.subjects]
    assert len(ids) == len(set(ids)) == 8
    for site in cohort.sites:
        splits = [s.split for s in cohort.select(site=site)]
        assert splits.count("train") == 2 and splits.count("val") == 1 and splits.count("test") == 1


def test_refuses_a_foreign_folder_but_replaces_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        synth_cohort(foreign, sites=1, subjects=2, size=SIZE)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    own = tmp_path / "own"
    synth_cohort(own, sites=1, subjects=2, size=SIZE, layout="mrbrains")
    synth_cohort(own, sites=1, subjects=2, size=SIZE, layout="msd")  # regenerating its own cohort is fine
    assert not (own / "H1S01").exists()  # the old layout is gone, not mixed in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind
    (own / "extra.txt").write_text("user file")
    with pytest.raises(ConfigError):
        synth_cohort(own, sites=1, subjects=2, size=SIZE)
    assert (own / "extra.txt").read_text() == "user file"


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile"):
        synth_cohort(tmp_path / "a", sites=1, subjects=2, size=SIZE, profiles=["MRI-9T"])
    with pytest.raises(ConfigError, match="one per site"):
        synth_cohort(tmp_path / "b", sites=2, subjects=2, size=SIZE, profiles=["T1-3T"])
    with pytest.raises(ConfigError, match="layout"):
        synth_cohort(tmp_path / "c", sites=1, subjects=2, size=SIZE, layout="bids")
    with pytest.raises(ConfigError, match="CT"):
        synth_cohort_2d(tmp_path / "d", sites=1, subjects=2, size=32, profiles=["CT"])
    assert not any(tmp_path.iterdir())
    assert default_profiles(7)[:3] == ["T1-3T", "T1-1.5T", "T1-5mm"] and len(default_profiles(7)) == 7


@pytest.mark.parametrize("kind", ["slices", "dermoscopy"])
def test_2d_cohorts_write_readable_pngs(tmp_path: Path, kind: str) -> None:
    calls: list[tuple[int, int]] = []
    cohort = synth_cohort_2d(tmp_path / kind, sites=2, subjects=2, size=32, seed=2, kind=kind,
                             progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (4, 4) and len(calls) == 4
    assert cohort.spatial_dims == 2
    for s in cohort.subjects:
        with Image.open(s.images[0]) as im:
            assert im.size == (32, 32)
            assert im.mode == ("RGB" if kind == "dermoscopy" else "L")
        mask = np.asarray(Image.open(s.label))
        assert mask.shape == (32, 32) and mask.max() < cohort.num_classes
        assert len(np.unique(mask)) == cohort.num_classes  # every class appears
        data = load_subject(s, cohort)
        assert tuple(data.image.shape) == (len(cohort.channels), 32, 32)
    if kind == "dermoscopy":
        assert cohort.classes == ["background", "lesion"] and cohort.channels == ["R", "G", "B"]
        assert {s.modality for s in cohort.subjects} == {"RGB"}
    else:
        assert cohort.classes == ["background", "CSF", "GM", "WM"]


def test_rater_noise_touches_a_small_share_of_brain_voxels() -> None:
    shares = []
    for j in range(3):
        s = render_subject(32, "T1-3T", seed=0, site_index=1, subject_index=j)
        brain = (s.label > 0) | (s.clean_label > 0)
        shares.append(float((s.label != s.clean_label)[brain].mean()))
    assert 0.01 <= np.mean(shares) <= 0.10 and max(shares) < 0.15, shares
    quiet = SynthParams(rater_shift_vox=0.0, rater_bias=0.0)
    s = render_subject(32, "T1-3T", seed=0, site_index=1, subject_index=0, params=quiet)
    assert np.array_equal(s.label, s.clean_label)  # without the rater, labels follow the image exactly


def test_subjects_differ_in_anatomy_not_only_in_noise() -> None:
    a = render_subject(32, "T1-3T", seed=0, site_index=0, subject_index=0)
    b = render_subject(32, "T1-3T", seed=0, site_index=0, subject_index=1)
    assert a.anatomy["atrophy"] != b.anatomy["atrophy"]
    assert (a.clean_label != b.clean_label)[(a.clean_label > 0) | (b.clean_label > 0)].mean() > 0.2
    t = render_subject(32, "FLAIR-3T", seed=0, site_index=0, subject_index=0, lesions="tumour")
    assert (t.label == 4).sum() > 10 and t.image[t.label == 4].mean() > t.image[t.label == 3].mean()
