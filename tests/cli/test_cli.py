"""CLI: bad input is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from dataclasses import fields

import nibabel as nib
import numpy as np

from privseg.cli import main


def test_data_info_and_check_on_a_valid_cohort(tiny_cohort, capsys):
    assert main(["data", "info", str(tiny_cohort.root)]) == 0
    assert "H1" in capsys.readouterr().out
    assert main(["data", "check", str(tiny_cohort.root), "--quiet"]) == 0


def test_data_check_names_the_broken_file(tiny_cohort, capsys):
    broken = tiny_cohort.subjects[1].images[0]
    arr = np.asarray(nib.load(broken).dataobj).astype(np.float32)
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, nib.load(broken).affine), broken)
    assert main(["data", "check", str(tiny_cohort.root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and tiny_cohort.subjects[1].id in err


def test_missing_cohort_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", "--cohort", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert not (tmp_path / "run").exists()


def test_train_evaluate_predict_end_to_end(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--cohort", str(tiny_cohort.root), "--out", str(run), "--model", "unet_tiny",
                 "--steps", "2", "--patch", "16", "--quiet", "--device", "cpu"]) == 0
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--cohort", str(tiny_cohort.root),
                 "--json", str(out_json), "--quiet"]) == 0
    result = json.loads(out_json.read_text())
    assert result["summary"]["overall"]["n"] == len(tiny_cohort.select("test"))
    pred = tmp_path / "p.nii.gz"
    sid = tiny_cohort.select("test")[0].id
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--cohort", str(tiny_cohort.root),
                 "--subject", sid, "--out", str(pred)]) == 0
    assert pred.exists()
    # Unknown and unsafe subject IDs: exit 2, no file written.
    for bad in ("S999", "../etc"):
        target = tmp_path / f"bad_{len(bad)}.nii.gz"
        assert main(["predict", "--checkpoint", str(run / "last.pt"), "--cohort", str(tiny_cohort.root),
                     "--subject", bad, "--out", str(target)]) == 2
        assert not target.exists()
    capsys.readouterr()


def test_corrupt_checkpoint_exits_2(tiny_cohort, tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"\x00" * 100)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--cohort", str(tiny_cohort.root), "--quiet"]) == 2
    assert "c.pt" in capsys.readouterr().err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "privseg", "data", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing" in proc.stderr


def _loose_nifti(root, values_by_id):
    for k, (sid, values) in enumerate(values_by_id.items()):
        rng = np.random.default_rng(k)
        nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), str(root / f"{sid}.nii.gz"))
        if values is not None:
            lab = np.zeros((8, 8, 8), np.uint8)
            for j, v in enumerate(values):
                lab[j] = v
            nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / f"{sid}_seg.nii.gz"))


def test_data_check_lists_every_problem_of_a_loose_file_folder(tmp_path, capsys):
    root = tmp_path / "loose"
    root.mkdir()
    _loose_nifti(root, {"p1": (0, 1), "p2": None, "p3": (0, 1)})
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(root / "p9_seg.nii.gz"))
    (root / "p3.nii.gz").write_bytes(b"not a nifti")
    assert main(["data", "check", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    for what in ("p2.nii.gz: image has no label", "p9_seg.nii.gz: label has no matching image", "p3.nii.gz"):
        assert what in err
    assert "3 problem(s) found" in err


def test_classes_from_the_command_line(tmp_path, capsys):
    root = tmp_path / "odd"
    root.mkdir()
    _loose_nifti(root, {"a1": (0, 2), "b1": (0, 2)})  # values 0 and 2: no file holds 1
    assert main(["data", "info", str(root)]) == 2
    err = capsys.readouterr().err
    assert "a1_seg.nii.gz: holds label value 2" in err and "--classes background," in err and "classes=[" not in err
    assert main(["data", "info", str(root), "--classes", "background,edge,lesion"]) == 0
    assert "['background', 'edge', 'lesion']" in capsys.readouterr().out
    assert main(["data", "check", str(root), "--classes", "background,edge,lesion", "--quiet"]) == 0
    for bad in ("lesion", "background,,lesion", "background,lesion,lesion"):
        assert main(["data", "info", str(root), "--classes", bad]) == 2
        assert "--classes" in capsys.readouterr().err


def test_config_options_take_default_and_help_from_the_config():
    """An option that sets a config field is made from it: one default and one help text (with the
    names of the field's registry, read from it)."""
    from privseg.cli.erase import REQUEST
    from privseg.cli.fl import FEDERATION
    from privseg.cli.ui import DP, ERASURE, STEPS, TRAINING
    from privseg.erasure.request import ErasureRequest
    from privseg.federated import FLConfig
    from privseg.privacy.spec import DPConfig
    from privseg.train import TrainConfig
    from privseg.utils import one_of

    groups = ((TRAINING, TrainConfig, {}), (STEPS, TrainConfig, {}), (FEDERATION, FLConfig, {"mu": "proximal_mu"}),
              (DP, DPConfig, {"dp": "unit", "dp_method": "method"}), (ERASURE, ErasureRequest, {}),
              (REQUEST, ErasureRequest, {}))
    made = 0
    for group, config, rename in groups:
        field = {f.name: f for f in fields(config)}
        for p in inspect.signature(group).parameters.values():
            f = field.get(rename.get(p.name, p.name))
            if f is not None:
                assert p.default.default == f.default and p.default.min == f.metadata["min"], (config, p.name)
                names = f.metadata["choices"]
                assert p.default.help == f.metadata["help"] + (f" {one_of(names)}" if names is not None else ""), \
                    (config, p.name)
                made += 1
    assert made == 46  # each option of these groups that sets a config field (--lora-rank the latest)


HELP_OF_TOYS = '''
from privseg.erasure import site_eraser
from privseg.federated.personalise import register as personalisation
from privseg.federated.strategies import fl_strategy
from privseg.models.registry import register_model
from privseg.privacy.clipping import clip_rule
from privseg.privacy.grad_sample import per_subject
from privseg.unlearn.strategies import register as unlearning

def toy():
    "A toy entry."

for register in (register_model, clip_rule, per_subject, fl_strategy, unlearning, site_eraser):
    register("toyentry")(toy)
personalisation("toyentry", file="toy.pt")(toy)

from privseg.cli import main  # the command line is built now, with the toys registered

for command in ("train", "privacy train", "fl run", "fl personalise", "unlearn", "erase"):
    print("=== " + command, flush=True)
    main([*command.split(), "--help"])
'''


def test_help_lists_the_names_the_registries_hold():
    """A name registered before the command line is built shows in the help of every option that
    takes one of that kind (the help lists the registries, never a copy of their names)."""
    proc = subprocess.run([sys.executable, "-c", HELP_OF_TOYS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    helps = dict(part.split("\n", 1) for part in proc.stdout.split("=== ")[1:])
    # model; model, clip rule, gradient method; the same and the FL strategy; personalisation method;
    # unlearning strategy; the erasure's patient and site methods
    counts = {"train": 1, "privacy train": 3, "fl run": 4, "fl personalise": 1, "unlearn": 1, "erase": 2}
    assert {command: text.count("toyentry") for command, text in helps.items()} == counts


def _hinted_classes(err: str) -> str:
    import re

    found = re.search(r"--classes (\S+) \(rename", err)
    assert found, err
    return found.group(1)


def test_the_classes_hint_works_when_followed_and_broken_subjects_are_not_counted(tmp_path, capsys):
    """Issue 27 (9): `--classes background,NAME` on labels holding 0..2 led to another error, and
    the summary counted the subjects that failed as read."""
    root = tmp_path / "odd"
    root.mkdir()
    _loose_nifti(root, {"a1": (0, 2), "b1": (0, 2), "c1": (0, 1)})
    assert main(["data", "check", str(root), "--classes", "background,lesion", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "label values [2] are outside the declared classes 0..1" in err
    assert "1 subject(s) could be read" in err  # c1 only; a1 and b1 failed
    hinted = _hinted_classes(err)
    assert hinted == "background,lesion,class2"  # keeps the names given
    assert main(["data", "check", str(root), "--classes", hinted, "--quiet"]) == 0
    # inferred classes with a gap (no file holds 1): the hint names every value up to the largest
    gap = tmp_path / "gap"
    gap.mkdir()
    _loose_nifti(gap, {"a1": (0, 2), "b1": (0, 2)})
    assert main(["data", "info", str(gap)]) == 2
    hinted = _hinted_classes(capsys.readouterr().err)
    assert main(["data", "check", str(gap), "--classes", hinted, "--quiet"]) == 0


def test_an_unknown_command_is_suggested_once(capsys):
    assert main(["dat"]) == 2
    assert main(["fl", "rn"]) == 2
    err = capsys.readouterr().err
    assert err.count("Did you mean 'data'?") == 1 and err.count("Did you mean 'run'?") == 1


def test_a_fresh_training_run_does_not_say_resumed(tiny_cohort, tmp_path, capsys):
    args = ["train", "--cohort", str(tiny_cohort.root), "--out", str(tmp_path / "run"), "--model", "unet_tiny",
            "--patch", "16", "--device", "cpu"]
    assert main([*args, "--steps", "1"]) == 0
    assert "resumed" not in capsys.readouterr().out  # was "resumed from step 0"
    assert main([*args, "--steps", "2"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out


def test_long_audits_report_progress_in_plain_lines_when_redirected(tiny_cohort, tmp_path, capsys):
    """Issue 27 (7): `audit references`, `audit membership` (and `report`) printed nothing for minutes. Under
    capsys stderr is not a terminal: plain lines per phase, no ANSI codes; --quiet: nothing."""
    run, cohort = tmp_path / "run", str(tiny_cohort.root)
    assert main(["train", "--cohort", cohort, "--out", str(run), "--model", "unet_tiny", "--steps", "2", "--patch",
                 "16", "--device", "cpu", "--quiet"]) == 0
    assert main(["audit", "references", "--run", str(run), "--n", "4", "--cohort", cohort]) == 0
    err = capsys.readouterr().err
    for k in range(4):
        assert f"reference model {k}: 0/2" in err and f"reference model {k}: 2/2" in err
    assert main(["audit", "membership", "--run", str(run), "--cohort", cohort, "--views", "1"]) == 0
    err = capsys.readouterr().err
    n = len(tiny_cohort.subjects)
    for phase in ("loading patients", "scoring the model", "scoring reference model 1/4",
                  "scoring reference model 4/4"):
        assert f"{phase}: 0/{n}" in err and f"{phase}: {n}/{n}" in err, phase
    assert "\x1b" not in err
    assert main(["audit", "membership", "--run", str(run), "--cohort", cohort, "--views", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    train, test = (",".join(s.id for s in tiny_cohort.select(split)) for split in ("train", "test"))
    assert main(["audit", "mia", "--checkpoint", str(run / "last.pt"), "--cohort", cohort, "--members", train,
                 "--non-members", test, "--views", "1"]) == 0
    err, scored = capsys.readouterr().err, len(tiny_cohort.select("train")) + len(tiny_cohort.select("test"))
    assert f"loading subjects: {scored}/{scored}" in err and f"scoring the model: {scored}/{scored}" in err
    # a report evaluates the model (with HD95) first: that too shows progress
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--cohort", cohort]) == 0
    n_test = len(tiny_cohort.select("test"))
    assert f"evaluating for the report: {n_test}/{n_test}" in capsys.readouterr().err


def test_fl_run_piped_has_no_flower_info_lines_nor_colour_codes(tiny_cohort, tmp_path):
    """Issue 27 (10): Flower's INFO lines (with ANSI colours) came through `fl run`, --quiet too."""
    args = [sys.executable, "-m", "privseg", "fl", "run", "--cohort", str(tiny_cohort.root), "--in-process",
            "--runs", str(tmp_path / "runs"), "--name", "f", "--local-steps", "1", "--patch", "16", "--model",
            "unet_tiny", "--eval-every", "0"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*args, "--rounds", "1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "fl in-process: 1/1" in proc.stderr  # privseg's own progress, as plain lines
    assert "INFO" not in proc.stderr and "\x1b" not in proc.stderr + proc.stdout
    proc = subprocess.run([*args, "--rounds", "2", "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


def _ct_cohort(root, offset: float = 0.0):
    """A tiny head-CT-like cohort in HU: air around two tissues a few HU apart (as grey and white
    matter are), ``offset`` added to every voxel (an export that dropped the rescale intercept)."""
    from conftest import write_nifti
    from privseg.data.cohort import Cohort, Subject, assign_splits

    rng = np.random.default_rng(0)
    subjects = []
    for k in range(4):
        label = np.zeros((16, 16, 16), np.uint8)
        label[3:13, 3:13, 3:13] = 1
        label[6:10, 6:10, 6:10] = 2
        image = np.choose(label, [-1000.0, 28.0, 38.0]) + rng.normal(0, 3, label.shape) + offset
        sid = f"C{k:02d}"
        img = write_nifti(root / "images" / f"{sid}.nii.gz", image.astype(np.float32))
        lab = write_nifti(root / "labels" / f"{sid}.nii.gz", label)
        subjects.append(Subject(id=sid, site="H1", images=(str(img),), label=str(lab), modality="CT"))
    cohort = Cohort(subjects=assign_splits(subjects, test_fraction=0.25, seed=0), classes=["background", "GM", "WM"],
                    channels=["CT"], name="ct", root=root)
    cohort.save()
    return cohort


def test_a_ct_window_that_hides_the_foreground_is_warned_about_with_one_that_holds_it(tmp_path, capsys):
    """Issue 27 (8): head CT under the default soft-tissue window trained to Dice 0.03, silently."""
    import re

    cohort = str(_ct_cohort(tmp_path / "ct").root)
    args = ["train", "--cohort", cohort, "--model", "unet_tiny", "--steps", "1", "--patch", "16", "--device", "cpu",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err  # said even under --quiet
    assert "privseg: warning:" in err and "CT window -200,300" in err and "almost no contrast" in err
    window = re.search(r"--ct-window (-?\d+,-?\d+)", err).group(1)
    lo, hi = (float(x) for x in window.split(","))
    assert lo < 28 and 38 < hi and hi - lo <= 200  # holds both tissues, and far narrower than 500 HU
    assert main([*args, "--out", str(tmp_path / "b"), "--ct-window", window]) == 0
    assert "warning" not in capsys.readouterr().err  # the window suggested holds them
    shifted = str(_ct_cohort(tmp_path / "raw", offset=1024.0).root)
    assert main([*args[:2], shifted, *args[3:], "--out", str(tmp_path / "c")]) == 0
    assert "100% of the foreground voxels of the training labels" in capsys.readouterr().err
    # under DP the window is a public setting: no window read off the patients is suggested
    assert main(["privacy", "train", "--cohort", cohort, "--out", str(tmp_path / "dp"), "--model", "unet_tiny",
                 "--steps", "1", "--patch", "16", "--device", "cpu", "--epsilon", "8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "almost no contrast" in err and "Under differential privacy the window is a public setting" in err
    assert "would hold them" not in err and "0,80 for brain" in err


def test_fl_run_checks_the_ct_window_of_each_site_it_can_read(tmp_path):
    from privseg.cohorts import site_window_warnings
    from privseg.federated import sites_from_cohort

    sites = sites_from_cohort(_ct_cohort(tmp_path / "ct").root)
    [warning] = site_window_warnings(sites, private=False)
    assert warning.startswith("site H1: ") and '"ct_window": [' in warning and "would hold them" in warning
    [warning] = site_window_warnings(sites, private=True)
    assert warning.startswith("site H1: ") and "public setting" in warning and "would hold them" not in warning
