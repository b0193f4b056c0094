"""End-to-end demo on the embedded cohort (run by `make demo`).

Builds a small multi-site cohort from the MNI152 template shipped in nilearn,
trains a small 3D U-Net, evaluates it on held-out subjects, and writes one
prediction as NIfTI. Everything goes to demo_out/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from privseg.cli import main

OUT = Path("demo_out")


def run(*args: str) -> None:
    print(f"\n$ privseg {' '.join(args)}", flush=True)
    code = main(list(args))
    if code != 0:
        sys.exit(code)


def _first_test_subject(cohort: Path) -> str:
    from privseg.data.formats import read_cohort

    return read_cohort(cohort).select("test")[0].id


if __name__ == "__main__":
    t0 = time.perf_counter()
    cohort = OUT / "cohort"
    if not (cohort / "cohort.json").exists():
        run("data", "synth", "--out", str(cohort), "--sites", "3", "--subjects", "6", "--size", "48", "--seed", "0")
    run("data", "info", str(cohort))
    run("train", "--cohort", str(cohort), "--out", str(OUT / "central"), "--model", "unet", "--steps", "150",
        "--patch", "48", "--seed", "0")
    run("evaluate", "--checkpoint", str(OUT / "central" / "last.pt"), "--cohort", str(cohort), "--split", "test",
        "--json", str(OUT / "central" / "evaluation.json"))
    run("predict", "--checkpoint", str(OUT / "central" / "last.pt"), "--cohort", str(cohort), "--subject",
        _first_test_subject(cohort), "--out", str(OUT / "central" / "prediction.nii.gz"))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {OUT}/")
