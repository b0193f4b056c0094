"""CLI: bad input is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

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
