"""End-to-end demo on the embedded cohort (run by `make demo`).

Builds a small multi-site cohort from the MNI152 template shipped in nilearn,
trains a small 3D U-Net, evaluates it on held-out subjects and writes one
prediction as NIfTI; trains the same task federated across the three sites
(Flower simulation, FedBN), then again with patient-level DP (the default recipe) and a
stricter budget at one hospital (printing epsilon per site); erases one patient
from the central model and audits it; ends with an erasure request in a federated run
(a patient erased at one hospital, verified, recorded in the hash-chained ledger) and its
certificate; and takes the DP model to the clinic: exported as a MONAI bundle with its model card,
run by MONAI's own bundle runner on held-out volumes, checked with `privseg export verify`.
Everything goes to demo_out/.
"""

from __future__ import annotations

import shutil
import subprocess
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


def _test_subjects(cohort: Path) -> list[str]:
    from privseg.data.formats import read_cohort

    return [s.id for s in read_cohort(cohort).select("test")]


def _train_subjects(cohort: Path) -> list[str]:
    from privseg.data.formats import read_cohort

    return [s.id for s in read_cohort(cohort).select("train")]


if __name__ == "__main__":
    t0 = time.perf_counter()
    cohort = OUT / "cohort"
    # a fresh start but for the embedded cohort (slow to build): the erasure ledgers of a previous
    # demo would otherwise refuse to erase the same patients from the same models again
    for old in (OUT.iterdir() if OUT.is_dir() else ()):
        if old.name != "cohort":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if not (cohort / "cohort.json").exists():
        run("data", "synth", "--out", str(cohort), "--sites", "3", "--subjects", "6", "--size", "48", "--seed", "0")
    run("data", "info", str(cohort))
    run("train", "--cohort", str(cohort), "--out", str(OUT / "central"), "--model", "unet", "--steps", "150",
        "--patch", "32", "--seed", "0")
    run("evaluate", "--checkpoint", str(OUT / "central" / "last.pt"), "--cohort", str(cohort), "--split", "test",
        "--json", str(OUT / "central" / "evaluation.json"))
    run("predict", "--checkpoint", str(OUT / "central" / "last.pt"), "--cohort", str(cohort), "--subject",
        _test_subjects(cohort)[0], "--out", str(OUT / "central" / "prediction.nii.gz"))
    train_ids = _train_subjects(cohort)
    common = ["--cohort", str(cohort), "--runs", str(OUT / "runs"), "--model", "unet_tiny", "--patch", "32",
              "--local-steps", "5", "--quiet"]
    run("fl", "run", *common, "--name", "fedbn", "--rounds", "3", "--strategy", "fedbn")
    run("fl", "status", "fedbn", "--runs", str(OUT / "runs"))
    run("fl", "run", *common, "--name", "dp", "--rounds", "3", "--dp", "patient", "--epsilon", "8",
        "--delta", "1e-3", "--site-budget", "H2=4", "--in-process")
    run("privacy", "status", str(OUT / "runs" / "dp"))
    run("unlearn", "--checkpoint", str(OUT / "central" / "last.pt"), "--cohort", str(cohort), "--forget",
        train_ids[0], "--strategy", "noisy_label", "--target", "unseen", "--out", str(OUT / "unlearn"), "--quiet")
    run("audit", "mia", "--checkpoint", str(OUT / "unlearn" / "unlearned.pt"), "--cohort", str(cohort),
        "--members", train_ids[0], "--non-members", ",".join(_test_subjects(cohort)))
    run("report", str(OUT / "central"), "--out", str(OUT / "central" / "report.html"))  # prints its path
    # Erasure: a patient of H2 asks to be forgotten by the federated model.
    run("fl", "run", *common, "--name", "fed", "--rounds", "4", "--keep-updates", "--in-process")
    fed = str(OUT / "runs" / "fed")
    from privseg.data.formats import read_cohort

    patient = read_cohort(cohort).select("train", "H2")[0].id
    erase = ["erase", "--run", fed, "--site", "H2", "--subject", patient, "--reason", "GDPR art. 17",
             "--requested-by", "demo privacy officer", "--epochs", "10"]
    print(f"\n$ privseg {' '.join(erase)}", flush=True)
    if main(erase) not in (0, 1):  # 1: done, but the evidence missed a threshold (the certificate says which)
        sys.exit(2)
    from privseg.audit.ledger import ErasureLedger

    request = ErasureLedger(OUT / "runs" / "fed" / "erasure" / "ledger.db").requests()[-1]["request"]
    run("erase", "certificate", request, "--run", fed)
    run("ledger", "verify", fed)
    # The DP model goes to the clinic: a MONAI bundle (model card with the ledgers' epsilon per site),
    # run by MONAI's own runner on held-out volumes, as a hospital without privseg would run it.
    bundle, clinic = OUT / "bundle", OUT / "clinic"
    run("export", str(OUT / "runs" / "dp"), "--format", "monai-bundle", "--out", str(bundle))
    clinic.mkdir()
    for sid in _test_subjects(cohort)[:2]:
        shutil.copy(read_cohort(cohort).subject(sid).images[0], clinic / f"{sid}.nii.gz")
    runner = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
              "--dataset_dir", "../clinic", "--output_dir", "../clinic_seg"]
    print(f"\n$ cd {bundle} && python {' '.join(runner)}", flush=True)
    subprocess.run([sys.executable, *runner], cwd=bundle, check=True)
    print("segmentations:", ", ".join(sorted(p.name for p in (OUT / "clinic_seg").iterdir())))
    run("export", "verify", str(bundle))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {OUT}/")
