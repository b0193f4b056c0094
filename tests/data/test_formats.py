"""Readers for published layouts, on tiny fake datasets written here: each layout is read,
every subject loads, and shapes, channels and classes come out as the format defines them."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from privseg.data import formats
from privseg.data.cohort import MANIFEST_NAME, Cohort
from privseg.data.formats import (
    MRBRAINS18_TISSUE_MAP,
    TISSUE_CLASSES,
    read_cohort,
    read_image_folder_2d,
    read_mrbrains18,
    read_msd,
    read_nifti_folder,
    register_format,
)
from privseg.data.transforms import load_subject
from privseg.errors import ConfigError, DataError

SHAPE = (8, 8, 8)


def nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def image(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def label(seed: int, top: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A label holding every value 0..top (so class inference sees them all)."""
    lab = np.random.default_rng(seed).integers(0, top + 1, size=shape).astype(np.uint8)
    lab.flat[: top + 1] = np.arange(top + 1)
    return lab


def load_all(cohort: Cohort) -> list:
    return [load_subject(s, cohort) for s in cohort.subjects]


# -- MRBrainS18 -------------------------------------------------------------------


def make_mrbrains18(root: Path, ids: tuple[str, ...] = ("1", "4", "5", "7"), top: int = 10) -> Path:
    for k, sid in enumerate(ids):
        for name in ("reg_T1", "reg_IR", "FLAIR"):
            nii(root / sid / "pre" / f"{name}.nii.gz", image(10 * k + len(name)))
        nii(root / sid / "segm.nii.gz", label(k, top))
    return root


def test_mrbrains18_merges_eleven_labels_into_tissues(tmp_path: Path) -> None:
    root = make_mrbrains18(tmp_path / "mrb")
    cohort = read_mrbrains18(root)
    assert cohort.format == "mrbrains18" and cohort.root == root.resolve()
    assert cohort.classes == TISSUE_CLASSES and cohort.channels == ["T1", "IR", "FLAIR"]
    assert [s.id for s in cohort.subjects] == ["1", "4", "5", "7"]
    assert {s.split for s in cohort.subjects} == {"train", "test"}
    assert all(Path(p).is_absolute() for s in cohort.subjects for p in s.images)
    raw = np.asarray(nib.load(cohort.subjects[0].label).dataobj)
    data = load_subject(cohort.subjects[0], cohort)
    assert tuple(data.image.shape) == (3, *SHAPE)
    expected = np.vectorize(MRBRAINS18_TISSUE_MAP.get)(raw)
    assert np.array_equal(data.label[0].numpy(), expected)
    assert set(np.unique(expected)) == {0, 1, 2, 3}
    # GM = cortical GM + basal ganglia, WM = WM + lesions, CSF = CSF + ventricles, the rest background
    assert [MRBRAINS18_TISSUE_MAP[v] for v in range(11)] == [0, 2, 2, 3, 3, 1, 1, 0, 0, 0, 0]


def test_mrbrains18_keeps_eleven_labels_without_merging(tmp_path: Path) -> None:
    cohort = read_mrbrains18(make_mrbrains18(tmp_path / "mrb"), merge_tissues=False)
    assert cohort.num_classes == 11 and "label_map" not in cohort.info
    data = load_subject(cohort.subjects[1], cohort)
    assert int(data.label.max()) == 10


def test_mrbrains18_uses_present_channels_and_detects_merged_labels(tmp_path: Path) -> None:
    """privseg's synthetic cohort writes this layout with T1 and FLAIR only, labels 0..3."""
    root = tmp_path / "synth"
    for k, sid in enumerate(("s01", "s02", "s03")):
        nii(root / sid / "pre" / "reg_T1.nii.gz", image(k))
        nii(root / sid / "pre" / "FLAIR.nii.gz", image(k + 50))
        nii(root / sid / "segm.nii.gz", label(k, 3))
    cohort = read_mrbrains18(root)
    assert cohort.channels == ["T1", "FLAIR"] and cohort.classes == TISSUE_CLASSES
    assert "label_map" not in cohort.info and cohort.info["label_scheme"] == "tissues"
    data = load_subject(cohort.subjects[2], cohort)
    assert tuple(data.image.shape) == (2, *SHAPE)
    assert np.array_equal(data.label[0].numpy(), label(2, 3))


def test_manifest_wins_over_layout_detection(tmp_path: Path) -> None:
    root = make_mrbrains18(tmp_path / "mrb")
    cohort = read_mrbrains18(root, seed=3)
    cohort.save()
    again = read_cohort(root)
    assert [(s.id, s.split, s.images) for s in again.subjects] == [(s.id, s.split, s.images) for s in cohort.subjects]
    assert read_cohort(root / MANIFEST_NAME).classes == TISSUE_CLASSES
    # the label map went through JSON (string keys) and still applies
    assert again.info["label_map"] == {str(k): v for k, v in MRBRAINS18_TISSUE_MAP.items()}
    assert int(load_subject(again.subjects[0], again).label.max()) == 3


def test_mrbrains18_missing_channel_names_the_file(tmp_path: Path) -> None:
    root = make_mrbrains18(tmp_path / "mrb")
    (root / "5" / "pre" / "FLAIR.nii.gz").unlink()
    with pytest.raises(DataError, match=r"5/pre/FLAIR\.nii\.gz.*FLAIR channel missing"):
        read_mrbrains18(root)


def test_mrbrains18_missing_label_names_the_file(tmp_path: Path) -> None:
    root = make_mrbrains18(tmp_path / "mrb")
    (root / "4" / "segm.nii.gz").unlink()
    with pytest.raises(DataError, match=r"4/segm\.nii\.gz.*label missing"):
        read_mrbrains18(root)


def test_mrbrains18_unsafe_folder_name(tmp_path: Path) -> None:
    root = make_mrbrains18(tmp_path / "mrb", ids=("1", "a..b"))
    with pytest.raises(DataError, match=r"a\.\.b.*not safe"):
        read_mrbrains18(root)


# -- MSD / nnU-Net ------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_msd(root: Path, n: int = 4, sites: bool = False) -> Path:
    """MSD original: multi-modal cases are one 4D NIfTI, channels last; macOS debris included."""
    training = []
    for k in range(n):
        case = f"BRATS_{k:03d}"
        nii(root / "imagesTr" / f"{case}.nii.gz", image(k, (*SHAPE, 2)))
        nii(root / "labelsTr" / f"{case}.nii.gz", label(k, 3))
        entry = {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        if sites:
            entry["site"] = f"hosp{k % 2}"
        training.append(entry)
    (root / "imagesTr" / "._BRATS_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    write_json(
        root / "dataset.json",
        {
            "name": "BrainTumour",
            "modality": {"0": "FLAIR", "1": "T1w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": n,
            "training": training,
            "test": [],
        },
    )
    return root


def test_msd_original_splits_4d_images_into_channels(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "Task01_BrainTumour", sites=True)
    cohort = read_msd(root)
    assert cohort.name == "BrainTumour" and cohort.format == "msd"
    assert cohort.channels == ["FLAIR", "T1w"] and cohort.num_classes == 4
    assert cohort.info["channels_in_file"] is True and cohort.sites == ["hosp0", "hosp1"]
    assert all(len(s.images) == 1 and s.modality == "MR" for s in cohort.subjects)
    data = load_subject(cohort.subjects[1], cohort)
    assert tuple(data.image.shape) == (2, *SHAPE) and tuple(data.label.shape) == (1, *SHAPE)
    assert np.allclose(data.image[1].numpy(), image(1, (*SHAPE, 2))[..., 1])
    assert tuple(data.source.array.shape) == SHAPE


def test_msd_ct_modality_and_site_pattern(tmp_path: Path) -> None:
    root = tmp_path / "Task09_Spleen"
    training = []
    for case in ("hospA_001", "hospA_002", "hospB_003"):
        nii(root / "imagesTr" / f"{case}.nii.gz", image(len(training)) * 1000 - 500)
        nii(root / "labelsTr" / f"{case}.nii.gz", label(len(training), 1))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    write_json(
        root / "dataset.json",
        {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}, "training": training},
    )
    cohort = read_msd(root, site_pattern=r"^(\w+?)_")
    assert cohort.sites == ["hospA", "hospB"] and "channels_in_file" not in cohort.info
    assert all(s.modality == "CT" for s in cohort.subjects)
    assert tuple(load_subject(cohort.subject("hospB_003"), cohort).image.shape) == (1, *SHAPE)
    with pytest.raises(DataError, match=r"hospA_001.*does not match site_pattern"):
        read_msd(root, site_pattern=r"^(site\d)_")


def make_nnunet_v2(root: Path, cases: tuple[str, ...] = ("kid_001", "kid_002", "kid_003")) -> Path:
    for k, case in enumerate(cases):
        nii(root / "imagesTr" / f"{case}_0000.nii.gz", image(k))
        nii(root / "imagesTr" / f"{case}_0001.nii.gz", image(k + 20))
        nii(root / "labelsTr" / f"{case}.nii.gz", label(k, 2))
    write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "T1", "1": "T2"},
            "labels": {"background": 0, "kidney": 1, "tumor": 2},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
        },
    )
    return root


def test_nnunet_v2_channel_files(tmp_path: Path) -> None:
    cohort = read_msd(make_nnunet_v2(tmp_path / "Dataset001_Kidney"))
    assert cohort.info["layout"] == "nnunet_v2" and cohort.classes == ["background", "kidney", "tumor"]
    assert cohort.channels == ["T1", "T2"] and [s.id for s in cohort.subjects] == ["kid_001", "kid_002", "kid_003"]
    assert cohort.subjects[0].images[1].endswith("kid_001_0001.nii.gz")
    data = load_subject(cohort.subjects[0], cohort)
    assert tuple(data.image.shape) == (2, *SHAPE)
    assert np.allclose(data.image[1].numpy(), image(20))


def test_nnunet_v2_missing_channel_and_orphans(tmp_path: Path) -> None:
    root = make_nnunet_v2(tmp_path / "ds")
    (root / "imagesTr" / "kid_002_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"kid_002_0001\.nii\.gz.*channel 1 \(T2\).*not found"):
        read_msd(root)
    root = make_nnunet_v2(tmp_path / "ds2")
    (root / "labelsTr" / "kid_003.nii.gz").unlink()
    with pytest.raises(DataError, match=r"kid_003\.nii\.gz.*label of case kid_003 not found"):
        read_msd(root)
    root = make_nnunet_v2(tmp_path / "ds3")
    nii(root / "labelsTr" / "kid_009.nii.gz", label(9, 2))
    with pytest.raises(DataError, match=r"kid_009\.nii\.gz.*has no image"):
        read_msd(root)


def test_nnunet_v2_non_contiguous_labels_are_remapped(tmp_path: Path) -> None:
    root = make_nnunet_v2(tmp_path / "ds", cases=("a_1", "a_2"))
    for k, case in enumerate(("a_1", "a_2")):
        nii(root / "labelsTr" / f"{case}.nii.gz", label(k, 1) * 4)  # values 0 and 4
    ds = json.loads((root / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "tumor": 4}
    write_json(root / "dataset.json", ds)
    cohort = read_msd(root)
    assert cohort.classes == ["background", "tumor"] and cohort.info["label_map"] == {0: 0, 4: 1}
    assert set(np.unique(load_subject(cohort.subjects[0], cohort).label.numpy())) == {0, 1}


def test_nnunet_v1_listed_cases_with_channel_files(tmp_path: Path) -> None:
    root = make_nnunet_v2(tmp_path / "Task500")
    cases = ("kid_001", "kid_002", "kid_003")
    write_json(
        root / "dataset.json",
        {
            "modality": {"0": "T1", "1": "T2"},
            "labels": {"0": "background", "1": "kidney", "2": "tumor"},
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        },
    )
    cohort = read_msd(root)
    assert "channels_in_file" not in cohort.info and all(len(s.images) == 2 for s in cohort.subjects)
    assert tuple(load_subject(cohort.subjects[2], cohort).image.shape) == (2, *SHAPE)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"site": "../x"}, r"dataset\.json.*'\.\./x' is not safe"),
        ({"site": "a/b"}, r"dataset\.json.*'a/b' is not safe"),
        ({"image": "../../outside.nii.gz"}, r"dataset\.json.*points outside the dataset folder"),
        ({"label": "./labelsTr/nothere.nii.gz"}, r"nothere\.nii\.gz.*label of case BRATS_000 not found"),
        ({"image": "./imagesTr/nothere.nii.gz"}, r"nothere\.nii\.gz.*image of case nothere not found"),
    ],
)
def test_msd_bad_training_entries(tmp_path: Path, change: dict, pattern: str) -> None:
    root = make_msd(tmp_path / "msd")
    ds = json.loads((root / "dataset.json").read_text())
    ds["training"][0].update(change)
    write_json(root / "dataset.json", ds)
    with pytest.raises(DataError, match=pattern):
        read_msd(root)


def test_msd_bad_dataset_json(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json.*not valid JSON"):
        read_msd(root)
    write_json(root / "dataset.json", {"labels": {"0": "background", "1": "x"}})
    with pytest.raises(DataError, match=r"dataset\.json.*channel_names"):
        read_msd(root)
    write_json(root / "dataset.json", {"modality": {"0": "MR"}, "labels": {"1": "x", "2": "y"}})
    with pytest.raises(DataError, match=r"dataset\.json.*start at 0"):
        read_msd(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"dataset\.json.*not found"):
        read_msd(root)


# -- plain NIfTI folders ---------------------------------------------------------------


def test_nifti_folder_images_and_labels_dirs(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for k in range(3):
        nii(root / "images" / f"case{k}.nii.gz", image(k))
        nii(root / "labels" / f"case{k}.nii.gz", label(k, 2))
    cohort = read_nifti_folder(root)
    assert cohort.classes == ["background", "class1", "class2"] and cohort.channels == ["image"]
    assert cohort.sites == ["site1"] and cohort.info["classes_inferred"] is True
    data = load_subject(cohort.subjects[0], cohort)
    assert tuple(data.image.shape) == (1, *SHAPE) and int(data.label.max()) == 2
    named = read_nifti_folder(root, classes=["bg", "liver", "tumour"])
    assert named.classes == ["bg", "liver", "tumour"]


def test_nifti_folder_flat_pairing_with_site_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    nii(root / "hospA" / "p1.nii.gz", image(1))
    nii(root / "hospA" / "p1_seg.nii.gz", label(1, 1))
    nii(root / "hospA" / "p2.nii", image(2))
    nii(root / "hospA" / "p2_label.nii.gz", label(2, 1))
    nii(root / "hospB" / "p3.nii.gz", image(3))
    nii(root / "hospB" / "p3_seg.nii.gz", label(3, 1))
    cohort = read_nifti_folder(root)
    assert cohort.sites == ["hospA", "hospB"] and cohort.num_classes == 2
    assert {s.id: s.site for s in cohort.subjects} == {"p1": "hospA", "p2": "hospA", "p3": "hospB"}
    assert all(d.label is not None for d in load_all(cohort))


def test_nifti_folder_pairing_errors(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    nii(root / "p1.nii.gz", image(1))
    nii(root / "p1_seg.nii.gz", label(1, 1))
    nii(root / "p2.nii.gz", image(2))
    with pytest.raises(DataError, match=r"p2\.nii\.gz.*image has no label"):
        read_nifti_folder(root)
    (root / "p2.nii.gz").unlink()
    nii(root / "p9_seg.nii.gz", label(9, 1))
    with pytest.raises(DataError, match=r"p9_seg\.nii\.gz.*label has no matching image"):
        read_nifti_folder(root)
    other = tmp_path / "dirs"
    nii(other / "images" / "x.nii.gz", image(1))
    with pytest.raises(DataError, match=r"images.*no sibling label folder"):
        read_nifti_folder(other)


def test_nifti_folder_duplicate_id_across_sites(tmp_path: Path) -> None:
    root = tmp_path / "dup"
    for site in ("hospA", "hospB"):
        nii(root / site / "p1.nii.gz", image(1))
        nii(root / site / "p1_seg.nii.gz", label(1, 1))
    with pytest.raises(DataError, match=r"hospB/p1\.nii\.gz.*duplicate subject ID 'p1'"):
        read_nifti_folder(root)


def test_nifti_folder_unsafe_id_and_all_background(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    nii(root / "bad id.nii.gz", image(1))
    nii(root / "bad id_seg.nii.gz", label(1, 1))
    with pytest.raises(DataError, match=r"bad id\.nii\.gz.*'bad id' is not safe"):
        read_nifti_folder(root)
    root = tmp_path / "blank"
    nii(root / "p1.nii.gz", image(1))
    nii(root / "p1_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DataError, match=r"p1_seg\.nii\.gz.*all background.*classes"):
        read_nifti_folder(root)


# -- 2D image folders -------------------------------------------------------------------


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(12, 10, 3)).astype(np.uint8)


def mask(seed: int, values: tuple[int, ...] = (0, 255)) -> np.ndarray:
    out = np.random.default_rng(seed).choice(values, size=(12, 10)).astype(np.uint8)
    out.flat[: len(values)] = values
    return out


def test_image_folder_2d_binary_masks(tmp_path: Path) -> None:
    root = tmp_path / "derm"
    png(root / "images" / "ISIC_0001.jpg", rgb(1))
    png(root / "masks" / "ISIC_0001_segmentation.png", mask(1))
    png(root / "images" / "ISIC_0002.png", rgb(2))
    png(root / "masks" / "ISIC_0002.png", mask(2))
    cohort = read_image_folder_2d(root)
    assert cohort.spatial_dims == 2 and cohort.channels == ["R", "G", "B"]
    assert cohort.classes == ["background", "foreground"] and cohort.info["label_map"] == {255: 1}
    assert all(s.modality == "RGB" for s in cohort.subjects)
    for data in load_all(cohort):
        assert tuple(data.image.shape) == (3, 12, 10) and tuple(data.label.shape) == (1, 12, 10)
        assert set(np.unique(data.label.numpy())) == {0, 1}


def test_image_folder_2d_gray_multiclass_with_sites(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    for k, site in enumerate(("clinicA", "clinicA", "clinicB")):
        gray = np.random.default_rng(k).integers(0, 256, size=(12, 10)).astype(np.uint8)
        png(root / site / "images" / f"img{k}.png", gray)
        png(root / site / "masks" / f"img{k}.png", mask(k, (0, 1, 2)))
    cohort = read_image_folder_2d(root)
    assert cohort.channels == ["gray"] and cohort.num_classes == 3 and cohort.sites == ["clinicA", "clinicB"]
    data = load_subject(cohort.subjects[2], cohort)
    assert tuple(data.image.shape) == (1, 12, 10) and int(data.label.max()) == 2


def test_image_folder_2d_errors(tmp_path: Path) -> None:
    root = tmp_path / "derm"
    png(root / "images" / "a.png", rgb(1))
    png(root / "images" / "b.png", rgb(2))
    png(root / "masks" / "a.png", mask(1))
    with pytest.raises(DataError, match=r"b\.png.*image has no mask"):
        read_image_folder_2d(root)
    png(root / "masks" / "b.png", mask(2))
    png(root / "images" / "b.jpg", rgb(2))
    with pytest.raises(DataError, match=r"b\.png.*duplicate subject ID 'b'"):
        read_image_folder_2d(root)
    (root / "images" / "b.jpg").unlink()
    png(root / "masks" / "c.png", mask(3))
    with pytest.raises(DataError, match=r"c\.png.*mask has no matching image"):
        read_image_folder_2d(root)
    (root / "masks" / "c.png").unlink()
    png(root / "masks" / "b.png", mask(2, (0, 128, 255)))
    png(root / "masks" / "a.png", mask(1, (0, 128, 255)))
    with pytest.raises(DataError, match=r"a\.png.*neither 0/255 nor class indices"):
        read_image_folder_2d(root)
    png(root / "masks" / "a.jpg", rgb(1))
    with pytest.raises(DataError, match=r"a\.jpg.*lossy"):
        read_image_folder_2d(root)


# -- read_cohort and the registry -------------------------------------------------------


def test_read_cohort_detects_each_layout(tmp_path: Path) -> None:
    make_mrbrains18(tmp_path / "mrb")
    make_msd(tmp_path / "msd")
    png(tmp_path / "derm" / "images" / "a.png", rgb(1))
    png(tmp_path / "derm" / "masks" / "a.png", mask(1))
    nii(tmp_path / "plain" / "p1.nii.gz", image(1))
    nii(tmp_path / "plain" / "p1_seg.nii.gz", label(1, 1))
    assert read_cohort(tmp_path / "mrb").format == "mrbrains18"
    assert read_cohort(tmp_path / "msd").format == "msd"
    assert read_cohort(tmp_path / "msd" / "dataset.json").format == "msd"
    assert read_cohort(tmp_path / "derm").format == "image2d"
    assert read_cohort(tmp_path / "plain", classes=2).format == "nifti"
    assert read_cohort(tmp_path / "plain", fmt="nifti").num_classes == 2
    assert read_cohort(tmp_path / "mrb", seed=5, test_fraction=0.5).select("test")


def test_read_cohort_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*not found"):
        read_cohort(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*unknown dataset layout.*cohort\.json.*dataset\.json.*reg_T1"):
        read_cohort(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"other.*unknown dataset layout"):
        read_cohort(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"unknown format 'dicom'"):
        read_cohort(tmp_path / "other", fmt="dicom")
    make_msd(tmp_path / "msd")
    with pytest.raises(ConfigError, match=r"format msd.*unexpected keyword argument 'clases'"):
        read_cohort(tmp_path / "msd", clases=3)


@pytest.mark.parametrize("reader", [read_mrbrains18, read_msd, read_nifti_folder, read_image_folder_2d])
def test_every_reader_refuses_missing_and_empty_roots(tmp_path: Path, reader) -> None:
    with pytest.raises(DataError, match=r"missing.*not found"):
        reader(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*(not found|no )"):
        reader(tmp_path / "empty")


def test_register_format_adds_a_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new format is one decorated function, detected before the generic NIfTI fallback."""
    monkeypatch.setattr(formats, "FORMATS", dict(formats.FORMATS))
    monkeypatch.setattr(formats, "_DETECTORS", list(formats._DETECTORS))

    @register_format("single", lambda root: (root / "vol.nii.gz").is_file(), "vol.nii.gz + vol_seg.nii.gz")
    def read_single(root: Path) -> Cohort:
        cohort = read_nifti_folder(root, classes=["background", "organ"])
        cohort.format = "single"
        return cohort

    root = tmp_path / "single"
    nii(root / "vol.nii.gz", image(1))
    nii(root / "vol_seg.nii.gz", label(1, 1))
    cohort = read_cohort(root)
    assert cohort.format == "single" and cohort.classes == ["background", "organ"]
    assert formats.FORMATS["single"] is read_single
    with pytest.raises(ConfigError, match="already registered"):
        register_format("single")(read_nifti_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"single: vol\.nii\.gz"):
        read_cohort(tmp_path / "empty")


def test_msd_accepts_symlinks_to_files_elsewhere(tmp_path: Path) -> None:
    """nnU-Net raw folders often link to the real files; only the listed path must stay inside."""
    store = tmp_path / "store"
    root = make_msd(tmp_path / "msd", n=2)
    for sub in ("imagesTr", "labelsTr"):
        target = store / sub / "BRATS_000.nii.gz"
        target.parent.mkdir(parents=True)
        (root / sub / "BRATS_000.nii.gz").rename(target)
        (root / sub / "BRATS_000.nii.gz").symlink_to(target)
    cohort = read_msd(root)
    assert tuple(load_subject(cohort.subject("BRATS_000"), cohort).image.shape) == (2, *SHAPE)


def test_small_option_errors(tmp_path: Path) -> None:
    root = make_mrbrains18(tmp_path / "mrb", ids=("1", "2"))
    with pytest.raises(ConfigError, match=r"labels='seg'"):
        read_mrbrains18(root, labels="seg")
    assert read_mrbrains18(root, labels="tissues").info["label_scheme"] == "tissues"
    with pytest.raises(DataError, match=r"segm\.nii\.gz: is a file but not a cohort manifest"):
        read_cohort(root / "1" / "segm.nii.gz")
    derm = tmp_path / "derm"
    png(derm / "images" / "a.png", rgb(1))
    with pytest.raises(DataError, match=r"images: has no sibling label folder \(masks/ or labels/\)"):
        read_image_folder_2d(derm)
    png(derm / "masks" / "a.png", mask(1))
    with pytest.raises(ConfigError, match=r"binary 0/255 .*a\.png.*3 entries"):
        read_image_folder_2d(derm, classes=3)


# -- what a new user tripped over (issue: release roots, classes, every problem) ------------------


def test_mrbrains18_release_root_with_training_folder(tmp_path: Path) -> None:
    release = tmp_path / "mrbrains18"
    make_mrbrains18(release / "training", ids=("1", "070"))
    for cohort in (read_cohort(release), read_mrbrains18(release)):
        assert cohort.format == "mrbrains18" and sorted(s.id for s in cohort.subjects) == ["070", "1"]
        assert cohort.name == "mrbrains18"
    # one level too far up, or one subject folder: the error names the folder to give
    with pytest.raises(DataError, match=rf"unknown dataset layout.*give {release} \(mrbrains18\)"):
        read_cohort(tmp_path)
    with pytest.raises(DataError, match=rf"one MRBrainS18 subject folder: give its parent {release / 'training'}"):
        read_cohort(release / "training" / "1")


def test_nifti_classes_come_from_every_label_not_the_first(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for k, top in enumerate((1, 2, 1)):
        nii(root / f"p{k}.nii.gz", image(k))
        nii(root / f"p{k}_seg.nii.gz", label(k, top))
    assert read_nifti_folder(root).classes == ["background", "class1", "class2"]  # p1 holds 2, p0 does not
    # a file with value 17 that sorts first: refused naming it, not an 18-class task
    odd = np.zeros(SHAPE, np.uint8)
    odd[:2] = 17
    nii(root / "a0.nii.gz", image(9))
    nii(root / "a0_seg.nii.gz", odd)
    with pytest.raises(DataError, match=r"a0_seg\.nii\.gz: holds label value 17 but no label file holds 3.*"
                                        r"--classes background,"):
        read_cohort(root)
    (root / "a0_seg.nii.gz").rename(root / "z0_seg.nii.gz")  # sorting last changes nothing
    (root / "a0.nii.gz").rename(root / "z0.nii.gz")
    with pytest.raises(DataError, match=r"z0_seg\.nii\.gz: holds label value 17"):
        read_cohort(root)
    declared = read_cohort(root, classes=[f"c{k}" for k in range(18)])
    assert declared.num_classes == 18 and declared.info["classes_inferred"] is False


def test_a_labels_only_dataset_json_declares_a_nifti_folders_classes(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for k in range(2):
        nii(root / f"p{k}.nii.gz", image(k))
        lab = np.zeros(SHAPE, np.uint8)
        lab[:3] = 17
        nii(root / f"p{k}_seg.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "17": "lesion"}}))
    cohort = read_cohort(root)
    assert cohort.format == "nifti" and cohort.classes == ["background", "lesion"]
    assert int(load_subject(cohort.subjects[0], cohort).label.max()) == 1  # 17 -> class 1
    with pytest.raises(ConfigError, match=r"--classes: the msd layout declares its classes itself"):
        read_cohort(make_msd(tmp_path / "msd"), classes=["background", "x"])


def test_collect_problems_lists_every_problem_of_a_layout(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    nii(root / "p1.nii.gz", image(1))
    nii(root / "p1_seg.nii.gz", label(1, 1))
    nii(root / "p2.nii.gz", image(2))  # no label
    nii(root / "p9_seg.nii.gz", label(9, 1))  # no image
    nii(root / "bad id.nii.gz", image(3))
    with formats.collect_problems() as problems:
        cohort = read_cohort(root)
    assert [s.id for s in cohort.subjects] == ["p1"]
    text = "\n".join(str(p) for p in problems)
    assert "p9_seg.nii.gz: label has no matching image" in text and "p2.nii.gz: image has no label" in text
    assert "'bad id' is not safe" in text and len(problems) == 3
    msd = make_msd(tmp_path / "msd", n=3)
    (msd / "labelsTr" / "BRATS_001.nii.gz").unlink()
    (msd / "imagesTr" / "BRATS_002.nii.gz").unlink()
    with formats.collect_problems() as problems:
        assert [s.id for s in read_cohort(msd).subjects] == ["BRATS_000"]
    assert len(problems) == 2 and "numTraining" not in "".join(map(str, problems))
