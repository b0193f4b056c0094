"""What a new user tripped over (issue 17, sections 4 and 5): overlays at the voxels' proportions,
class names in `fl status`, 2D predictions as PNG masks, a per-task CT window, --spacing, no empty
erasure ledger after a refusal, no stray progress line before a data error, plain progress lines
when stderr is redirected, third-party warnings handled, and an `unlearn` that shows its
evaluation and the small-sample membership warning."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import make_blob_subject, make_tiny_cohort, tiny_central_run, write_nifti
from privseg.cli import main
from privseg.data.formats import read_cohort
from privseg.train import TrainConfig, Trainer
from privseg.train.checkpoint import load_checkpoint

TRAIN = ["--model", "unet_tiny", "--patch", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 3D cohort (voxels 1.5 x 1.5 x 2 mm, one 16^3 patch each) and a model trained on it for two steps."""
    root = tmp_path_factory.mktemp("newcomer")
    cohort = make_tiny_cohort(root / "tiny", per_site=2, size=16)  # 2 train, 2 test: the CPU tests stay short
    return root, cohort, tiny_central_run(cohort, root / "central", steps=2)


@pytest.fixture(scope="module")
def fl_run(tiny):
    """A one-round federated run of the tiny cohort (sites H1, H2), without an erasure ledger."""
    root, cohort, _ = tiny
    runs = root / "runs"
    assert main(["fl", "run", "--cohort", str(cohort.root), "--runs", str(runs), "--name", "fl", "--rounds", "1",
                 "--local-steps", "1", "--in-process", "-q", *TRAIN]) == 0
    return runs / "fl"


# -- 4. overlays keep the voxel proportions ----------------------------------------------------------
def test_overlays_draw_thick_slices_at_their_true_height():
    from privseg.report import figures as F

    rng = np.random.default_rng(0)
    image = rng.normal(size=(24, 24, 8)).astype(np.float32)
    label = np.zeros(image.shape, int)
    label[8:16, 8:16, 2:6] = 1
    fig = F.overlays(image, label, label, ["background", "lesion"], "3 mm slices", spacing=(1.0, 1.0, 3.0))
    aspects = [ax.get_aspect() for ax in fig.axes[:3]]
    assert aspects == [1.0, 3.0, 3.0]  # axial, coronal (x by z), sagittal (y by z)
    fig = F.side_by_side(image, label, {"model": label}, ["background", "lesion"], "t", spacing=(0.5, 1.0, 3.0))
    assert [fig.axes[0].get_aspect(), fig.axes[2].get_aspect()] == [2.0, 6.0]  # row-major: axial, then coronal


def test_report_overlays_use_the_image_spacing(tiny, tmp_path, monkeypatch):
    from privseg.report import build_report
    from privseg.report import figures as F

    root, cohort, _ = tiny
    seen = []
    original = F.overlays

    def spy(*args, **kw):
        fig = original(*args, **kw)
        seen.append([ax.get_aspect() for ax in fig.axes[:3]])
        return fig

    monkeypatch.setattr(F, "overlays", spy)
    build_report(root / "central", tmp_path / "r.html", cohort=cohort.root, evaluate=False)
    assert seen and all(a == pytest.approx([1.0, 2.0 / 1.5, 2.0 / 1.5]) for a in seen)  # the cohort's 1.5/1.5/2 mm


# -- 4. fl status names the classes ----------------------------------------------------------------
def test_fl_status_names_the_classes(fl_run, capsys):
    capsys.readouterr()
    assert main(["fl", "status", str(fl_run)]) == 0
    text = capsys.readouterr().out
    assert "Dice organ" in text and "Dice core" in text and "Dice c1" not in text


# -- 5. predict on a 2D cohort --------------------------------------------------------------------
def make_2d_folder(root: Path, n: int = 6) -> Path:
    """A 2D image folder (images/ + masks/), masks stored as 0/255 like ISIC's."""
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:40, :48]
    for k in range(n):
        cy, cx, r = rng.integers(14, 26), rng.integers(14, 34), rng.integers(6, 11)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        img = np.clip(60 + 120 * mask + rng.normal(0, 10, mask.shape), 0, 255).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"case{k}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"case{k}.png")
    return root


def test_predict_on_a_2d_cohort_writes_a_png_mask(tmp_path, capsys):
    from PIL import Image

    data = make_2d_folder(tmp_path / "isic")
    run = tmp_path / "run2d"
    assert main(["train", "--cohort", str(data), "--out", str(run), "--steps", "1", "-q", *TRAIN]) == 0
    sid = read_cohort(data).subjects[0].id
    out = tmp_path / "pred.png"
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--cohort", str(data), "--subject", sid,
                 "--out", str(out)]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (40, 48) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}  # the dataset's own mask values, not class indices
    # a NIfTI name for a 2D prediction is refused before anything is written
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--cohort", str(data), "--subject", sid,
                 "--out", str(tmp_path / "p.nii.gz")]) == 2
    assert not (tmp_path / "p.nii.gz").exists()
    capsys.readouterr()
    assert main(["predict", "--help"]) == 0
    assert ".png" in capsys.readouterr().out


# -- 5. CT window per task ------------------------------------------------------------------------
def make_ct_msd(root: Path, window: list | None = None, n: int = 4) -> Path:
    """An MSD-layout CT task in HU (air 0, organ ~40, core ~60), optionally declaring ct_window."""
    rng = np.random.default_rng(2)
    training = []
    for k in range(n):
        _, label = make_blob_subject(rng, 16)
        hu = np.choose(label, [0.0, 40.0, 60.0]) + rng.normal(0, 5, label.shape)
        write_nifti(root / "imagesTr" / f"ct_{k:03d}.nii.gz", hu.astype(np.int16), np.eye(4))
        write_nifti(root / "labelsTr" / f"ct_{k:03d}.nii.gz", label, np.eye(4))
        training.append({"image": f"./imagesTr/ct_{k:03d}.nii.gz", "label": f"./labelsTr/ct_{k:03d}.nii.gz"})
    ds = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ", "2": "core"}, "training": training}
    if window is not None:
        ds["ct_window"] = window
    (root / "dataset.json").write_text(json.dumps(ds))
    return root


def _scaled(cohort, sid: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw HU, preprocessed image) of one subject, without the foreground crop."""
    from privseg.data.transforms import load_subject, preprocess

    data = load_subject(cohort.subject(sid), cohort)
    return data.image[0].numpy(), np.asarray(preprocess(data, crop_foreground=False)["image"][0])


def test_ct_window_comes_from_dataset_json_or_manifest_and_defaults_unchanged(tmp_path):
    from dataclasses import replace

    from privseg.data.transforms import CT_WINDOW, ct_window

    plain = read_cohort(make_ct_msd(tmp_path / "plain"))
    assert ct_window(plain) == CT_WINDOW == (-200.0, 300.0)
    raw, img = _scaled(plain, plain.subjects[0].id)
    assert np.allclose(img, np.clip((raw + 200) / 500, 0, 1), atol=1e-5)  # the default, unchanged

    brain = read_cohort(make_ct_msd(tmp_path / "brain", window=[0, 80]))
    raw, img = _scaled(brain, brain.subjects[0].id)
    assert np.allclose(img, np.clip(raw / 80, 0, 1), atol=1e-5)
    assert img[raw >= 60].mean() - img[(raw > 30) & (raw < 50)].mean() > 0.15  # organ and core now apart

    manifest = replace(plain, info={**plain.info, "ct_window": [-100, 100]})  # a manifest's info field
    raw, img = _scaled(manifest, plain.subjects[0].id)
    assert np.allclose(img, np.clip((raw + 100) / 200, 0, 1), atol=1e-5)

    bad = read_cohort(make_ct_msd(tmp_path / "bad", window=[80, 0]))
    with pytest.raises(Exception, match="LO < HI"):
        _scaled(bad, bad.subjects[0].id)


def test_ct_window_from_the_cli_is_recorded_and_reused(tmp_path, capsys):
    data = make_ct_msd(tmp_path / "ct")
    run = tmp_path / "run"
    assert main(["train", "--cohort", str(data), "--out", str(run), "--steps", "1", "--ct-window=0,80", "-q",
                 *TRAIN]) == 0
    assert load_checkpoint(run / "last.pt")["config"]["extra"]["ct_window"] == [0.0, 80.0]
    ev = tmp_path / "ev.json"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--cohort", str(data), "--json", str(ev),
                 "-q"]) == 0
    capsys.readouterr()
    # a window that contradicts the model's is refused, naming both
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--cohort", str(data),
                 "--ct-window=-200,300", "-q"]) == 2
    assert "0,80" in capsys.readouterr().err
    assert main(["train", "--cohort", str(data), "--out", str(tmp_path / "r2"), "--ct-window", "80", "-q"]) == 2
    assert "LO,HI" in capsys.readouterr().err


def test_spacing_from_the_cli(tiny, tmp_path, capsys):
    _, cohort, _ = tiny
    run = tmp_path / "iso"
    assert main(["train", "--cohort", str(cohort.root), "--out", str(run), "--steps", "1", "--spacing", "2",
                 "-q", *TRAIN]) == 0
    assert load_checkpoint(run / "last.pt")["config"]["spacing"] == [2.0, 2.0, 2.0]
    capsys.readouterr()
    assert main(["train", "--cohort", str(cohort.root), "--out", str(tmp_path / "bad"), "--spacing", "1,0,1",
                 "-q", *TRAIN]) == 2
    assert "--spacing" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# -- 5. a refused erasure leaves no ledger -----------------------------------------------------------
def test_refused_erasure_leaves_no_empty_ledger(fl_run, capsys):
    assert not (fl_run / "erasure").exists()
    assert main(["erase", "--run", str(fl_run), "--site", "H1", "--subject", "NOPE", "-q"]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert not (fl_run / "erasure" / "ledger.db").exists() and not (fl_run / "erasure").exists()


# -- 5. progress output ---------------------------------------------------------------------------
def test_no_progress_line_before_a_data_error(tiny, tmp_path, capsys):
    _, cohort, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(cohort.root, broken)
    victim = next(s for s in cohort.subjects if s.split == "train")
    (broken / "images" / f"{victim.id}.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    manifest = json.loads((broken / "cohort.json").read_text())
    (broken / "cohort.json").write_text(json.dumps(manifest).replace(str(cohort.root), str(broken)))
    capsys.readouterr()
    assert main(["train", "--cohort", str(broken), "--out", str(tmp_path / "run"), "--steps", "2", *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("privseg: error:") and victim.id in err[0]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tiny, tmp_path, capsys):
    _, cohort, _ = tiny
    capsys.readouterr()
    assert main(["train", "--cohort", str(cohort.root), "--out", str(tmp_path / "run"), "--steps", "3",
                 *TRAIN]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("training:")]
    assert [x.split()[1] for x in lines] == ["1/3", "2/3", "3/3"] and "loss" in lines[-1]
    assert "━" not in err and "\x1b[" not in err  # no bar frames, no control codes


def test_plain_progress_reports_phases_and_the_last_state(monkeypatch, capsys):
    from privseg.report import text

    monkeypatch.setattr(text, "PLAIN_EVERY_S", 1e9)
    with text.progress("work", 100) as update:
        for k in range(1, 56):
            update(k, f"item {k}")
        update(0, total=4, description="checking")
        update(1)
    err = capsys.readouterr().err.splitlines()
    work = [x for x in err if x.startswith("work:")]
    assert [x.split()[1] for x in work] == [f"{k}/100" for k in (1, 10, 20, 30, 40, 50, 55)]  # tenths, then last
    assert [x.split()[1] for x in err if x.startswith("checking:")] == ["0/4", "1/4"]


# -- 5. third-party warnings --------------------------------------------------------------------------
def test_predict_raises_no_monai_warning(tiny, tmp_path):
    _, cohort, ckpt = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", "--checkpoint", str(ckpt), "--cohort", str(cohort.root), "--subject",
                     cohort.subjects[0].id, "--out", str(tmp_path / "p.nii.gz")]) == 0
    monai = [w for w in caught if "monai" in w.filename]
    assert not monai, [str(w.message) for w in monai]
    assert nib.load(tmp_path / "p.nii.gz").shape == (16, 16, 16)


def test_flower_deprecation_and_ray_tip_are_silenced():
    from privseg.runs import silence_known_noise

    flwr = logging.getLogger("flwr")
    msg = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed in a future "
           "version of Flower. Please use `flwr run` in the CLI instead to run your simulation.")
    with warnings.catch_warnings(record=True) as caught:
        silence_known_noise()
        warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices "
                      "env var if num_gpus=0 or num_gpus=None (default).", FutureWarning, stacklevel=1)
        warnings.warn("another future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another future change"]  # only the known tip is dropped
    assert not flwr.filter(flwr.makeRecord("flwr", logging.WARNING, __file__, 1, msg, None, None))
    skipped = "fraction_evaluate is set to 0.0. Federated evaluation will be skipped."
    assert not flwr.filter(flwr.makeRecord("flwr", logging.WARNING, __file__, 1, skipped, None, None))
    assert flwr.filter(flwr.makeRecord("flwr", logging.WARNING, __file__, 1, "a site failed", None, None))


# -- 5. unlearn: evaluation shown, membership warning printed, reference model run once ------------------
def test_unlearn_shows_evaluation_progress_and_the_small_sample_warning(tiny, tmp_path, capsys):
    _, cohort, ckpt = tiny
    forget = next(s.id for s in cohort.subjects if s.split == "train")
    capsys.readouterr()
    assert main(["unlearn", "--checkpoint", str(ckpt), "--cohort", str(cohort.root), "--forget", forget,
                 "--out", str(tmp_path / "u"), "--epochs", "1", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    evaluating = [x for x in cap.err.splitlines() if x.startswith("evaluating:")]
    n = len(cohort.select("train")) + len(cohort.select("test"))
    total = 2 * (n + 1 + len(cohort.select("test")))  # original and unlearned: groups, then forget + test
    assert evaluating and evaluating[-1].split()[1] == f"{total}/{total}"
    ci_row = next(x for x in cap.out.splitlines() if "MIA 95 % CI" in x)
    assert ci_row.count("*") == 2  # original and unlearned: the CI marked, the warning printed under the table
    assert "only 1 member(s) vs" in cap.out and "not informative" in " ".join(cap.out.split())
    report = json.loads((tmp_path / "u" / "report.json").read_text())
    assert report["unlearned"]["mia"]["warning"]


def test_unlearn_runs_the_retrained_model_once_per_subject(tiny, tmp_path, monkeypatch):
    from privseg.audit import mia
    from privseg.unlearn import unlearn

    _, cohort, ckpt = tiny
    forget = next(s.id for s in cohort.subjects if s.split == "train")
    retain = [s for s in cohort.select("train") if s.id != forget]
    cfg = TrainConfig.for_cohort(cohort, model="unet_tiny", patch_size=(16, 16, 16), steps=1, device="cpu")
    Trainer(cohort, cfg, tmp_path / "retrain", subjects=retain).fit()
    passes: dict[int, int] = {}
    stats = mia.subject_statistics

    def counting(model, items, *a, **k):
        passes[id(model)] = passes.get(id(model), 0) + len(items)
        return stats(model, items, *a, **k)

    monkeypatch.setattr(mia, "subject_statistics", counting)
    seen = []
    res = unlearn(ckpt, cohort, forget, "noisy_label", epochs=1, device="cpu", mia_views=1,
                  retrain_checkpoint=tmp_path / "retrain" / "last.pt", on_evaluate=lambda d, t: seen.append((d, t)))
    n_mia = 1 + len(cohort.select("test"))
    # three models, each scored once on forget + test; the retrain rows are reused as the reference
    assert sorted(passes.values()) == [n_mia, n_mia, n_mia]
    assert "auc_calibrated" in res.report["original"]["mia"] and "auc_calibrated" in res.report["unlearned"]["mia"]
    done = [d for d, _ in seen]
    assert done[0] == 0 and done[-1] == seen[-1][1] and done == sorted(done)  # from 0 to the total, never back
    assert torch.isfinite(torch.tensor(res.report["mia_auc"]["retrain"]))


def test_fl_run_pins_splits_from_a_file_and_writes_them_at_each_site(tiny_cohort, tmp_path, capsys):
    import csv

    from privseg.cli import main

    rows = []
    for site in tiny_cohort.sites:
        subs = [s for s in tiny_cohort.subjects if s.site == site]
        for k, s in enumerate(subs):  # the first subject of each site goes to test, the rest to train
            rows.append([s.id, site, "test" if k == 0 else "train"])
    pinned = tmp_path / "pinned.csv"
    with open(pinned, "w", newline="") as f:
        csv.writer(f).writerows([["id", "site", "split"], *rows])
    args = ["fl", "run", "--cohort", str(tiny_cohort.root), "--runs", str(tmp_path / "runs"), "--name", "pin",
            "--model", "unet_tiny", "--patch", "16", "--rounds", "1", "--local-steps", "1", "--in-process",
            "--eval-every", "0", "--quiet", "--splits", str(pinned)]
    assert main(args) == 0
    for site in tiny_cohort.sites:
        with open(tmp_path / "runs" / "pin" / "sites" / site / "splits.csv") as f:
            written = {r["id"]: r["split"] for r in csv.DictReader(f)}
        assert written == {r[0]: r[2] for r in rows if r[1] == site}
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([["id", "site", "split"], *rows[1:]])  # one subject missing
    capsys.readouterr()
    assert main([*args[:-1], str(bad), "--name", "pin2"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "runs" / "pin2").exists()
