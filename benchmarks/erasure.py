"""Benchmark (issue 14): erasing patients and a site from a federation that memorises, verified per patient.

    OMP_NUM_THREADS=1 python benchmarks/erasure.py [--resume] [--cells a,b] [--list] [--smoke]

The federation is the embedded power cohort (:func:`privseg.data.synth.power_cohort`: 3 sites x 16
patients at 24^3, 36 training and 12 never seen) trained with FedAvg the way
:data:`privseg.data.synth.POWER_TRAINING` trains a pooled model that memorises (4-level U-Net,
whole-volume patches, 2 patients per step, lr 3e-3), here 120 rounds x 16 local steps at every
site. FedAvg moves each patient's contribution by a third of its site's update (3 sites), so a
federation needs about three times the pooled preset's 2,000 steps to memorise as much: measured
at 40 rounds (1,920 site steps), membership AUC 0.600 (null 0.611) with FedAvg and 0.465 (null
0.306) with FedAvgM at server learning rate 3 -- no power either way. Every site's update is kept
(FedEraser needs them). Cells, each written to ``benchmarks/runs/erasure/cells/`` when done:

1. ``original``: trains the run; the membership power check of its model (all training vs all
   never-seen patients, Dice of the un-augmented volume, and the null control between two
   halves of the never-seen patients). Without power every later result would be vacuous, so
   the later cells refuse to run on an original that failed it.
2. ``references-2`` .. ``references-8``: the run's reference models
   (:func:`privseg.audit.reference.ensure_references`), two per cell (complementary halves).
3. ``calibrated-original``: the per-patient calibrated test (offline LiRA) of the original model;
   it chooses the erased patients: the 4 most memorised training patients (highest calibrated
   statistic) and 4 others at random (seeded).
4. ``patient-m1`` .. ``m4`` and ``patient-r1`` .. ``r4``: a federated retrain without the patient
   (the gold standard), then ``privseg.erasure.federated.erase`` of the patient on a copy of the
   run with the study's Noisy Label (local unlearning at its site, stopped by the calibrated test,
   then one repair round with every site), verified against that retrain and the reference models:
   the baseline rows.
   ``patient-teacher-m1`` .. ``r4``: the same patients erased with privseg's setting,
   ``reference_teacher`` stopped by the calibrated test and no repair round, against the same
   retrain (reused). The ``patient_*`` keys are this setting's.
5. ``site-retrain`` and ``site-<setting>``: a federated retrain without site H2, and its erasure
   with FedEraser at the paper's setting (calibrate every 2nd round at half the local steps) and
   with privseg's settings.

Times are CPU seconds of this process for the training rounds (verification excluded), so a
shared machine does not inflate them; wall-clock beside them. Keys (``erasure.json``, each also in
``claims`` with its target and met / missed / pending, the cells it waits for named):
``patient_time_ratio``, ``patient_retain_dice_ratio``, ``patient_test_dice_ratio``,
``patient_calibrated_pass_rate`` (the memorised and random patients also separately), the same with
two references (``patient_*_2ref``), ``calibrated_tpr_at_1pct_fpr_2ref`` and ``calibrated_auc_2ref``
(the RMIA-style test with one complementary pair, original model, members vs never-seen),
``readiness_ratio`` (the pair's measured CPU / the original training's) and
``amortised_cost_per_request`` (1, 10, 100 requests), ``site_time_ratio``, ``site_test_dice_ratio``,
``site_calibrated_pass_rate`` (the erased site's training patients not flagged by the calibrated test
after the erasure; ``site_mia_auc_after`` their group AUC against the site's never-seen patients, with
``site_null_band``), ``site_retain_dice_ratio`` (reported, with ``site_memorisation``: the retrain's
and the erased model's retain vs test Dice), ``mia_auc_original``, ``mia_auc_all_train``,
``mia_null_control``. Targets (issue 30): patient erasure <= 0.05 of a retrain's time with retain
and test Dice >= 0.98 of the retrain's and the calibrated test passing, with 8 and with 2
references; TPR >= 0.9 at 1 % FPR with 2 references; readiness <= 2 trainings; site erasure test
Dice >= 0.98 of the retrain's, calibrated pass rate >= 0.9 with the group AUC inside the null band,
at <= 0.25 of its time (retain Dice reported: the retrain memorises its retain patients).

Only ``cells/*.json`` are kept in git: on a fresh checkout the original run, its references and the
retrains are gone, and a cell that needs them rebuilds them first (the original is checked against
its recorded per-patient scores; see :func:`_ensure_original`). A ``patient-2ref-*`` cell on a rebuilt
original that reproduced the recorded one exactly takes its patient's retrain from the
``patient-teacher-*`` cell instead of retraining (:func:`_recorded_retrain`; stamped ``retrain_from``).
Measured on the recorded cells (CPU seconds, one thread): the original 1,430, a reference 1,080 to
1,400 (a pair 2,680), a patient's retrain 1,070 to 1,260, an erasure with its verification about 100.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import cells  # noqa: E402

BENCH = "erasure"
VERSION = "erasure-power-1"  # bump when a change makes old cells incomparable
FULL = {"sites": 3, "subjects": 16, "size": 24, "rounds": 120, "local_steps": 16, "model": "unet", "lr": 3e-3,
        "strategy": "fedavg", "server_learning_rate": 1.0,
        "subjects_per_step": 2, "seed": 0, "references": 8, "mia_statistic": "dice", "mia_views": 1,
        "n_memorised": 4, "n_random": 4, "site": "H2"}
# 12 patients a site: 3 never seen at each, the fewest the 2-reference stopping rule scores (RMIA's population)
SMOKE = {"sites": 2, "subjects": 12, "size": 24, "rounds": 2, "local_steps": 2, "model": "unet_tiny", "lr": 3e-3,
         "strategy": "fedavg", "server_learning_rate": 1.0,
         "subjects_per_step": 2, "seed": 0, "references": 4, "mia_statistic": "dice", "mia_views": 1,
         "n_memorised": 1, "n_random": 1, "site": "H2"}
# How a patient is erased: local unlearning at the site, stopped as soon as the calibrated test no
# longer tells the patient from patients nobody trained on, then repair rounds with every site.
PATIENT = {"method": "noisy_label", "target": "calibrated", "epochs": 20, "repair_rounds": 1}
# privseg's setting: the patient distilled toward a reference model that never saw it. Repair
# rounds bring a memorised patient back (benchmarks/results/erasure_repair_sweep.md), so none. The
# budget is privseg's default for the calibrated target (50 epochs; the stopping rule decides): at
# the study's 20, 3 of the 8 patients used the whole budget and stayed flagged (commit history).
TEACHER = {"method": "reference_teacher", "target": "calibrated", "epochs": 50, "repair_rounds": 0}
# the same with one complementary pair of references (issue 30): the readiness a federation can afford
TEACHER_2REF = {**TEACHER, "references_kept": 2}
# one pair trained for a fraction of the original's rounds (issue 30: does the test keep its power?)
SHORT_SCHEDULES = (0.5, 0.25)
# Site erasures: FedEraser at the paper's setting (Liu et al. 2021: every 2nd round, half the local
# steps, no repair) is the baseline row; the others are privseg's settings. FedRecover (Cao et al.
# 2023) at the paper's schedule scaled to 120 rounds: 2 warm-up, every 10th and the 3 last rounds
# exact (16 of 120), the others estimated by the server; ``params`` go to the request as they are
# (the FedEraser fields are ignored by it, kept so every setting has the same keys).
SITE_SETTINGS = {"federaser-paper": {"method": "federaser", "calibration_interval": 2, "calibration_ratio": 0.5,
                                     "repair_rounds": 0},
                 "federaser-i4-r4": {"method": "federaser", "calibration_interval": 4, "calibration_ratio": 0.5,
                                     "repair_rounds": 4},
                 "fedrecover": {"method": "fedrecover", "calibration_interval": 2, "calibration_ratio": 0.5,
                                "repair_rounds": 0, "params": {"warmup": 2, "correction": 10, "final": 3,
                                                               "buffer": 2}},
                 # the measured gap (retain 0.867 at 19 exact rounds, time 0.145) spent on exact final rounds,
                 # where a retrain memorises its patients: 12 instead of 3, within the 0.25 time budget
                 "fedrecover-final12": {"method": "fedrecover", "calibration_interval": 2, "calibration_ratio": 0.5,
                                        "repair_rounds": 0, "params": {"warmup": 2, "correction": 10, "final": 12,
                                                                       "buffer": 2}}}
TARGETS = {"patient_time_ratio": ("<=", 0.05), "patient_retain_dice_ratio": (">=", 0.98),
           "patient_test_dice_ratio": (">=", 0.98), "patient_calibrated_pass_rate": (">=", 1.0),
           # the site target restated (issue 30): as good as the retrain on new patients, no trace of the
           # site's patients, in a quarter of its time; retain Dice is reported (REPORTED), not a target
           "site_test_dice_ratio": (">=", 0.98), "site_calibrated_pass_rate": (">=", 0.9),
           "site_time_ratio": ("<=", 0.25), "readiness_ratio": ("<=", 2.0),
           "patient_calibrated_pass_rate_2ref": (">=", 1.0), "patient_retain_dice_ratio_2ref": (">=", 0.98),
           "patient_time_ratio_2ref": ("<=", 0.05),
           "calibrated_tpr_at_1pct_fpr_2ref": (">=", 0.9)}
# figures stated beside the targets, without one of their own
REPORTED = ("site_retain_dice_ratio", "site_mia_auc_after", "calibrated_auc_2ref",
            *(f"{k}_s{f}" for f in SHORT_SCHEDULES for k in ("calibrated_tpr_at_1pct_fpr_2ref", "calibrated_auc_2ref",
                                                             "readiness_ratio")))
# the cells each claim is computed from (a claim without them is pending)
FROM_CELLS = {**{k: "patient-teacher-*" for k in TARGETS if k.startswith("patient_") and not k.endswith("_2ref")},
              **{k: "site-retrain, site-*" for k in (*TARGETS, *REPORTED) if k.startswith("site_")},
              **{k: "patient-2ref-*" for k in TARGETS if k.startswith("patient_") and k.endswith("_2ref")},
              "readiness_ratio": "original, references-2",
              **{k: "calibrated-original-2ref" for k in ("calibrated_tpr_at_1pct_fpr_2ref", "calibrated_auc_2ref")},
              **{k: f"short-{k.rsplit('_s', 1)[1]}-2ref" for k in REPORTED if "_s0." in k}}


def make_cells(s: dict) -> list[cells.Cell]:
    out = [cells.Cell("original", dict(s), cost=1.0)]
    out += [cells.Cell(f"references-{n}", {**s, "n": n}, cost=1.0) for n in range(2, s["references"] + 1, 2)]
    out.append(cells.Cell("calibrated-original", dict(s), cost=0.05))
    # the same test with one complementary pair (references 0 and 1): the RMIA-style test (issue 30)
    out.append(cells.Cell("calibrated-original-2ref", dict(s), cost=0.05))
    out += [cells.Cell(f"short-{f}-2ref", {**s, "schedule": f}, cost=2 * f) for f in SHORT_SCHEDULES]
    slots = [f"m{k}" for k in range(1, s["n_memorised"] + 1)] + [f"r{k}" for k in range(1, s["n_random"] + 1)]
    site = [cells.Cell("site-retrain", dict(s), cost=0.7)] + [
        cells.Cell(f"site-{name}", {**s, **setting}, cost=0.3) for name, setting in SITE_SETTINGS.items()]
    patients = [cells.Cell(f"patient-{slot}", {**s, **PATIENT, "slot": slot}, cost=1.1) for slot in slots]
    teacher = [cells.Cell(f"patient-teacher-{slot}", {**s, **TEACHER, "slot": slot}, cost=0.1) for slot in slots]
    teacher += [cells.Cell(f"patient-2ref-{slot}", {**s, **TEACHER_2REF, "slot": slot}, cost=0.1) for slot in slots]
    # the first memorised and the first random patient, then the site, then the others: a partial
    # run already answers every question once
    return out + patients[:1] + patients[s["n_memorised"]:s["n_memorised"] + 1] + site + [
        c for c in patients if c not in (patients[0], patients[s["n_memorised"]])] + teacher


# -- the original run -------------------------------------------------------------------------

def _cohort(s: dict, shared: Path):
    from privseg.data.cohort import MANIFEST_NAME, Cohort
    from privseg.data.synth import power_cohort

    root = shared / "cohort"
    if (root / MANIFEST_NAME).exists():
        return Cohort.from_manifest(root / MANIFEST_NAME)
    return power_cohort(root, sites=s["sites"], subjects=s["subjects"], size=s["size"], seed=0,
                        check=s["subjects"] >= 16)


def _fl_config(s: dict, cohort):
    from privseg.data.transforms import load_preprocessed, whole_volume_patch
    from privseg.federated import check_sites, sites_from_cohort
    from privseg.federated.assemble import fl_config
    from privseg.train import TrainConfig

    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    items = load_preprocessed(cohort.subjects, cohort, None)
    # whole-volume patches: training sees every patient exactly as the membership test scores it
    volume = whole_volume_patch(items)
    tc = TrainConfig(model=s["model"], norm="group", patch_size=volume, subjects_per_step=s["subjects_per_step"],
                     patches_per_subject=1, lr=s["lr"], seed=s["seed"], device="cpu",
                     steps=s["rounds"] * s["local_steps"], in_channels=len(info["channels"]),
                     num_classes=len(info["classes"]))
    return fl_config(sites=sites, train=tc, name="original", rounds=s["rounds"], local_steps=s["local_steps"],
                     eval_every=0, keep_updates=True, strategy=s["strategy"],
                     strategy_params={} if s["strategy"] == "fedavg" else
                     {"server_learning_rate": s["server_learning_rate"]})


def _original(shared: Path) -> Path:
    from privseg.federated import RunState

    run = shared / "original"
    if not (run / "state.json").exists() or RunState.load(run).status != "finished":
        raise RuntimeError(f"{run}: the original run is missing or unfinished; rerun the cell: "
                           f"--no-resume --cells original")
    return run


def original_cell(s: dict, shared: Path) -> dict:
    import time

    from privseg.audit.mia import PowerCheckError, power_check_model
    from privseg.data.transforms import load_preprocessed
    from privseg.federated import RunState
    from privseg.federated.retrain import round_seconds
    from privseg.federated.simulation import run_rounds
    from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint

    cohort = _cohort(s, shared)
    cfg = _fl_config(s, cohort)
    run = shared / "original"
    if (run / "state.json").exists() and RunState.load(run).status == "finished":
        state = RunState.load(run)
    else:
        if not (run / "fl_config.json").exists():
            cfg.save(run)
        t0 = time.perf_counter()
        state = run_rounds(run, "in-process", on_round=lambda e: print(
            f"  original round {e['round']}/{s['rounds']} {time.perf_counter() - t0:.0f} s", flush=True))
    wall, cpu = round_seconds(state)
    ckpt = state.last_checkpoint
    payload = load_checkpoint(ckpt)
    model = model_from_checkpoint(payload, ckpt).eval()
    tc = payload["config"]
    train = load_preprocessed(cohort.select("train"), cohort, None)
    never = load_preprocessed(cohort.select("test") + cohort.select("val"), cohort, None)
    try:
        power = power_check_model(model, train, never, tc["patch_size"], tc["num_classes"],
                                  statistic=s["mia_statistic"], views=s["mia_views"], seed=s["seed"],
                                  raise_on_fail=False, **({} if s["subjects"] >= 16 else
                                                          {"min_members": 1, "min_nonmembers": 2}))
    except PowerCheckError as exc:  # too few patients (smoke): recorded, not fatal
        power = {**exc.result, "passed": False, "error": str(exc)}
    keep = ("member_auc", "member_ci", "member_p", "null_auc", "null_sd", "null_pass_rate", "passed", "problems",
            "member_scores", "nonmember_scores")
    return {"rounds": state.rounds_done, "wall_s": wall, "cpu_s": cpu, "n_train": len(train),
            "n_never_seen": len(never), "volume": list(tc["patch_size"]),
            "power": {k: power.get(k) for k in keep}}


def _ensure_original(s: dict, shared: Path, cells_dir: Path) -> dict | None:
    """The original run on disk for a cell that builds on it; None when it is the run the ``original`` cell
    recorded. Only ``cells/*.json`` are kept in git, so on a fresh checkout the run is retrained with the
    cell's setting (seeded, one thread: the same model is expected) and its per-patient membership scores
    are compared with the recorded ones. The comparison is returned and stamped on every cell computed on
    the rebuilt run (``original_rebuilt``): a difference is stated, not hidden; a rebuilt model without
    membership power is refused."""
    from privseg.federated import RunState
    from privseg.utils import read_json, write_json

    run, mark = shared / "original", shared / "original-rebuilt.json"
    info = read_json(mark, "rebuild record") if mark.is_file() else None
    if info is None and (run / "state.json").exists() and RunState.load(run).status == "finished":
        return None
    if info is None or info.get("status") != "checked":
        write_json(mark, {"status": "rebuilding"})  # a rebuild interrupted before its check is checked again
        print("  the original run is not on disk (only cells/*.json are kept): retraining it", flush=True)
        recorded = cells.metrics_of(cells_dir, "original")["power"]
        again = original_cell(s, shared)
        pw = again["power"]
        diff = max(abs(pw[g][p] - recorded[g][p]) for g in ("member_scores", "nonmember_scores") for p in recorded[g])
        info = {"status": "checked", "max_score_difference": diff, "reproduced": diff <= 1e-6,
                "member_auc": pw["member_auc"], "null_auc": pw["null_auc"], "power_passed": pw["passed"],
                "cpu_s": again["cpu_s"], "wall_s": again["wall_s"]}
        write_json(mark, info)
    # the refusal is about memorisation (membership AUC); the null control between two halves of 12
    # never-seen patients fails by chance about half the time (null_pass_rate), so it is stated, not gated
    if info["member_auc"] < 0.75 and s["subjects"] >= 16:
        raise RuntimeError(f"the rebuilt original has no membership power (AUC {info['member_auc']:.3f}); "
                           f"see {mark}")
    return info


def _require_power(cells_dir: Path, smoke: bool) -> None:
    power = cells.metrics_of(cells_dir, "original")["power"]
    if not power["passed"] and not smoke:
        raise RuntimeError(f"the original model has no membership power (AUC {power['member_auc']:.3f}, null "
                           f"{power['null_auc']:.3f}): every forgetting result would be vacuous; fix the "
                           "training preset first")


def references_cell(s: dict, n: int, shared: Path) -> dict:
    from privseg.audit.reference import ensure_references

    run = _original(shared)
    refs = ensure_references(run, n, seed=s["seed"], on_reference=lambda k, what: print(
        f"  reference {k}: {what}", flush=True))
    index = json.loads((run / "audit" / "references" / "index.json").read_text())
    return {"n": n, "trained": refs.trained, "reused": refs.reused,
            "seconds": {k: v.get("seconds") for k, v in index["references"].items()},
            "cpu_s": {k: v.get("cpu_s") for k, v in index["references"].items()}}


def calibrated_cell(s: dict, shared: Path, two: bool = False) -> dict:
    from privseg.audit.reference import load_references, pair, run_membership

    run = _original(shared)
    refs = pair(load_references(run)) if two else None
    tests = {stat: run_membership(run, views=s["mia_views"], seed=s["seed"], statistic=stat, references=refs)
             for stat in ("dice", "loss")}
    if two:  # the erasures' choice of patients stays the 8-reference cell's
        return {"population": {stat: t["population"] for stat, t in tests.items()},
                "test": {stat: t["test"] for stat, t in tests.items()}, "n_references": 2,
                "statistic": s["mia_statistic"],
                "compute_ratio": tests["loss"]["references"]["compute_ratio"]}
    test = tests[s["mia_statistic"]]
    pts = test["patients"]
    train = sorted(p for p in pts if p not in set(cells.metrics_of(shared.parent.parent / "cells", "original")["power"]
                                                    ["nonmember_scores"]))
    memorised = sorted(train, key=lambda p: -pts[p]["t"])[:s["n_memorised"]]
    rng = np.random.default_rng(s["seed"])
    rest = [p for p in train if p not in memorised]
    random_ = [str(x) for x in rng.choice(rest, size=s["n_random"], replace=False)]
    choice = {f"m{k + 1}": p for k, p in enumerate(memorised)} | {f"r{k + 1}": p for k, p in enumerate(random_)}
    return {"choice": choice, "statistic": s["mia_statistic"],
            "population": {stat: t["population"] for stat, t in tests.items()},
            "patients": {p: {k: pts[p][k] for k in ("t", "p", "flagged", "n_out", "n_in", "log_lr", "dice", "loss")}
                         for p in pts},
            "shift": test["shift"], "sd": test["sd"], "n_references": test["n_references"]}


def short_cell(s: dict, shared: Path) -> dict:
    """The RMIA-style test of the original model with one complementary pair trained for ``schedule`` of the
    original's rounds. A run keeps one reference set, so the pair lives in a copy of the original without the
    site updates (the references start from its round-0 model; the copy serves the same final model)."""
    from privseg.audit.reference import ensure_references, run_membership

    run = shared.parent / f"short-{s['schedule']}" / "run"
    if not (run / "state.json").exists():
        shutil.copytree(_original(shared), run, ignore=shutil.ignore_patterns(".lock", "updates", "audit", "erasure"))
    refs = ensure_references(run, 2, seed=s["seed"], schedule=s["schedule"], on_reference=lambda k, what: print(
        f"  reference {k} ({s['schedule']} of the schedule): {what}", flush=True))
    tests = {stat: run_membership(run, views=s["mia_views"], seed=s["seed"], statistic=stat, references=refs)
             for stat in ("dice", "loss")}
    index = json.loads((run / "audit" / "references" / "index.json").read_text())
    cpu = {k: v.get("cpu_s") for k, v in index["references"].items()}
    original_cpu = cells.metrics_of(shared.parent.parent / "cells", "original")["cpu_s"]
    return {"schedule": s["schedule"], "rounds": index["rounds"], "cpu_s": cpu,
            "readiness_ratio": sum(cpu.values()) / original_cpu, "compute_ratio": refs.summary()["compute_ratio"],
            "statistic": s["mia_statistic"], "population": {stat: t["population"] for stat, t in tests.items()},
            "test": {stat: t["test"] for stat, t in tests.items()}}


# -- erasures ---------------------------------------------------------------------------------

def _site_of(shared: Path, pid: str) -> str:
    from privseg.federated import FLConfig
    from privseg.federated.sites import read_site_cohort, site_subjects

    cfg = FLConfig.load(_original(shared))
    for spec in cfg.sites:
        if pid in {x.id for x in site_subjects(read_site_cohort(spec.cohort), spec, "train")}:
            return spec.id
    raise RuntimeError(f"patient {pid} trains at no site of the original run")


def _retrain(shared: Path, out: Path, **kw) -> tuple[Path, float, float]:
    """A federated retrain into ``out`` (reused when it finished before); (checkpoint, wall, CPU)."""
    from privseg.federated import RunState
    from privseg.federated.retrain import federated_retrain, round_seconds

    run = _original(shared)
    if not ((out / "state.json").exists() and RunState.load(out).status == "finished"):
        shutil.rmtree(out, ignore_errors=True)  # interrupted: start again (a retrain is the gold standard)
        federated_retrain(run, out, **kw, on_round=lambda e: print(
            f"  {out.name} round {e['round']}", flush=True) if e["round"] % 10 == 0 else None)
    state = RunState.load(out)
    wall, cpu = round_seconds(state)
    return state.last_checkpoint, wall, cpu


def _copy_of_original(shared: Path, to: Path) -> Path:
    if (to / "erasure" / "ledger.db").exists():
        return to  # erase() finishes (or reads) the request recorded there
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(_original(shared), to, ignore=shutil.ignore_patterns(".lock"))
    return to


def _drop_copy(run: Path) -> None:
    """Delete a copy of the original once its results are read: each is 2.5 GB (every site update is
    kept), and a few left behind fill the disk."""
    shutil.rmtree(run)


def _verdict(result, retrain_cpu: float, retrain_wall: float | None, recorded: dict | None = None) -> dict:
    """A cell's figures from an erasure's verification against its retrain: the retrain scored by the
    verification, or (``recorded``, :func:`_recorded_retrain`) as an earlier cell recorded it, with the
    status then judged here against those figures (the erasure's own was judged against the model before)."""
    v = result.verification
    base = v["retrain"] if recorded is None else {k: recorded[f"retrain_{k}"] for k in ("mia_auc", "retain_dice",
                                                                                         "test_dice")}
    cal = v.get("calibrated", {})
    check = cal.get("check", {}) if cal.get("available") else {}
    out = {"status": result.status, "failed_checks": v.get("failed_checks"),
           "time_ratio": float(v["cpu_s_erasure"]) / retrain_cpu,
           "wall_time_ratio": float(v["seconds_erasure"]) / retrain_wall if retrain_wall else None,
           "erasure_cpu_s": float(v["cpu_s_erasure"]), "retrain_cpu_s": retrain_cpu,
           "retain_dice_ratio": v["after"]["retain_dice"] / base["retain_dice"],
           "test_dice_ratio": v["after"]["test_dice"] / base["test_dice"],
           "calibrated": check.get("result", "not run" if not cal else f"unavailable: {cal.get('reason')}"),
           "calibrated_subjects": check.get("subjects"),
           **{f"{m}_{k}": (base if m == "retrain" else v[m]).get(k) for m in ("before", "after", "retrain")
              for k in ("mia_auc", "retain_dice", "test_dice")}}
    if recorded is not None:
        failed = [f"{k} {out[k]:.3f} < 0.98" for k in ("retain_dice_ratio", "test_dice_ratio") if out[k] < 0.98]
        failed += ["membership_calibrated"] if out["calibrated"] == "fail" else []
        out.update({"erase_status": result.status, "status": "verification-failed" if failed else "completed",
                    "failed_checks": failed, "retrain_from": recorded["from"],
                    # the model before the erasure scored as the recorded cell scored it: the same original
                    "before_matches_recorded": all(abs(v["before"][f"{k}_dice"] - recorded[f"before_{k}_dice"])
                                                   <= 1e-9 for k in ("retain", "test"))})
    return out


def _recorded_retrain(s: dict, shared: Path, pid: str) -> dict | None:
    """The patient's retrain as its ``patient-teacher-<slot>`` cell recorded it, for a 2-reference cell whose
    retrain is not on disk and whose original was rebuilt and reproduced the recorded one exactly: the same
    seeded retrain of the same original gives the same model, so its figures stand in for 20 minutes of CPU
    per patient (stamped ``retrain_from``). None otherwise: the cell retrains."""
    from privseg.federated import RunState
    from privseg.utils import read_json

    retrain = shared.parent / f"patient-{s['slot']}" / "retrain"
    mark, cell = shared / "original-rebuilt.json", shared.parent.parent / "cells" / f"patient-teacher-{s['slot']}.json"
    if (not s.get("references_kept") or not cell.is_file() or not mark.is_file()
            or not read_json(mark, "rebuild record").get("reproduced")
            or ((retrain / "state.json").exists() and RunState.load(retrain).status == "finished")):
        return None
    m = json.loads(cell.read_text())["metrics"]
    if m["patient"] != pid:
        return None
    return {"from": cell.stem, **{k: m[k] for k in ("retrain_cpu_s", "retrain_mia_auc", "retrain_retain_dice",
                                                    "retrain_test_dice", "before_retain_dice", "before_test_dice")}}


def patient_cell(s: dict, work: Path, shared: Path) -> dict:
    from privseg.erasure import ErasureRequest, erase

    cells_dir = shared.parent.parent / "cells"
    _require_power(cells_dir, s["subjects"] < 16)
    pid = cells.metrics_of(cells_dir, "calibrated-original")["choice"][s["slot"]]
    site = _site_of(shared, pid)
    # one retrain per patient, shared by every setting that erases it (or its recorded figures: _recorded_retrain)
    recorded = _recorded_retrain(s, shared, pid)
    ckpt, r_wall, r_cpu = ((None, None, recorded["retrain_cpu_s"]) if recorded else
                           _retrain(shared, shared.parent / f"patient-{s['slot']}" / "retrain", exclude={site: [pid]}))
    run = _copy_of_original(shared, work / "run")
    if s.get("references_kept"):  # the others' checkpoints gone: the run keeps only the first pair(s)
        for k in range(s["references_kept"], s["references"]):
            (run / "audit" / "references" / str(k) / "model.pt").unlink(missing_ok=True)
    res = erase(run, ErasureRequest(kind="patient", site=site, subjects=(pid,), reason="benchmark",
                                    method=s["method"], target=s["target"], epochs=s["epochs"],
                                    repair_rounds=s["repair_rounds"],
                                    thresholds={"min_retain_dice_ratio": 0.98, "min_test_dice_ratio": 0.98},
                                    statistic=s["mia_statistic"]),
                reference=ckpt, mia_views=s["mia_views"],
                on_stage=lambda stage, msg: print(f"  {stage}: {msg}", flush=True))
    local = next(e["body"] for e in res.entries if e["event"] == "local_unlearned")
    out = {"patient": pid, "site": site, "slot": s["slot"], "method": s["method"],
           **_verdict(res, r_cpu, r_wall, recorded),
           "local_steps_run": local.get("steps_run"), "local_cpu_s": local.get("cpu_s"),
           "stopped_early": local.get("stopped_early"), "local_checks": local.get("checks")}
    _drop_copy(run)
    return out


def site_retrain_cell(s: dict, work: Path, shared: Path) -> dict:
    _require_power(shared.parent.parent / "cells", s["subjects"] < 16)
    ckpt, wall, cpu = _retrain(shared, work / "retrain", drop_site=s["site"])
    return {"checkpoint": str(ckpt), "wall_s": wall, "cpu_s": cpu}


def site_cell(s: dict, work: Path, shared: Path) -> dict:
    from privseg.erasure import ErasureRequest, erase

    retrain = shared.parent / "site-retrain" / "retrain"
    ckpt, r_wall, r_cpu = _retrain(shared, retrain, drop_site=s["site"])
    run = _copy_of_original(shared, work / "run")
    res = erase(run, ErasureRequest(kind="site", site=s["site"], reason="benchmark", method=s["method"],
                                    calibration_interval=s["calibration_interval"],
                                    calibration_ratio=s["calibration_ratio"], repair_rounds=s["repair_rounds"],
                                    params=s.get("params", {}), statistic=s["mia_statistic"]),
                reference=ckpt, mia_views=s["mia_views"],
                on_stage=lambda stage, msg: print(f"  {stage}: {msg}", flush=True))
    removed = next(e["body"] for e in reversed(res.entries) if e["event"] == "site_removed")
    _drop_copy(run)
    return {"site": s["site"], **{k: s[k] for k in ("method", "calibration_interval", "calibration_ratio",
                                                    "repair_rounds")}, "params": s.get("params", {}),
            **{k: removed[k] for k in ("exact_rounds", "estimated_rounds", "extra_exact_rounds") if k in removed},
            **_verdict(res, r_cpu, r_wall)}


def run_cell(cell: cells.Cell, work: Path, shared: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = cell.params
    if cell.name == "original":
        return original_cell(s, shared)
    rebuilt = _ensure_original(s, shared, shared.parent.parent / "cells")
    metrics = _run_on_original(cell, work, shared)
    return {**metrics, "original_rebuilt": rebuilt} if rebuilt else metrics


def _run_on_original(cell: cells.Cell, work: Path, shared: Path) -> dict:
    s = cell.params
    if cell.name != "site-retrain" and not cell.name.startswith(("references-", "short-")):
        from privseg.audit.reference import ensure_references

        # the calibrated test's references (kept with the run; trained again on a fresh checkout): one
        # complementary pair for the 2-reference cells, the full set for the others
        two = cell.name.endswith("-2ref") or cell.name.startswith("patient-2ref-")
        ensure_references(_original(shared), 2 if two else s["references"], seed=s["seed"],
                          on_reference=lambda k, what: print(f"  reference {k}: {what}", flush=True))
    if cell.name.startswith("references-"):
        _require_power(shared.parent.parent / "cells", s["subjects"] < 16)
        return references_cell(s, s["n"], shared)
    if cell.name.startswith("calibrated-original"):
        return calibrated_cell(s, shared, two=cell.name.endswith("-2ref"))
    if cell.name.startswith("short-"):
        return short_cell(s, shared)
    if cell.name.startswith("patient-"):
        return patient_cell(s, work, shared)
    if cell.name == "site-retrain":
        return site_retrain_cell(s, work, shared)
    return site_cell(s, work, shared)


# -- summary ----------------------------------------------------------------------------------

def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _group(rows: list[dict]) -> dict:
    powered = [r for r in rows if r["calibrated"] in ("pass", "fail")]
    return {"n": len(rows), "time_ratio": _mean(r["time_ratio"] for r in rows),
            "time_ratio_max": max((r["time_ratio"] for r in rows), default=None),
            "retain_dice_ratio": _mean(r["retain_dice_ratio"] for r in rows),
            "retain_dice_ratio_min": min((r["retain_dice_ratio"] for r in rows), default=None),
            "test_dice_ratio": _mean(r["test_dice_ratio"] for r in rows),
            "calibrated_pass_rate": (sum(r["calibrated"] == "pass" for r in powered) / len(powered)
                                     if powered else None),
            "n_powered": len(powered), "completed": sum(r["status"] == "completed" for r in rows)}


def _patient_rows(m: dict) -> tuple[list[dict], list[dict]]:
    """The patient cells' metrics: (privseg's reference_teacher rows, the Noisy Label baseline rows)."""
    teacher = [v for k, v in m.items() if k.startswith("patient-teacher-")]
    baseline = [v for k, v in m.items() if k.startswith("patient-") and not k.startswith(("patient-teacher-",
                                                                                          "patient-2ref-"))]
    return teacher, baseline


def _groups(rows: list[dict]) -> dict:
    return {"memorised": _group([r for r in rows if r["slot"].startswith("m")]),
            "random": _group([r for r in rows if r["slot"].startswith("r")]), "all": _group(rows)}


def _site_evidence(v: dict, never_seen: list[str]) -> dict:
    """The restated site target's evidence in a site cell (issue 30): the per-patient calibrated test on the
    erased site's training patients after the erasure (the pass rate: not flagged, p >= alpha), their group
    membership AUC against the site's never-seen patients (the verification's groups) with the band chance
    alone spans at those sizes (0.5 +- 1.96 Mann-Whitney sd: wide at 12 vs 4, so the per-patient test is the
    evidence), and the memorisation the retain Dice ratio reflects (retain vs test Dice, retrain and erased
    model)."""
    from privseg.audit.mia import null_auc_sd

    subj = v.get("calibrated_subjects") or []
    # the site's val/test patients; the power cohort's IDs start with their site's (H2S04)
    n_never = sum(p.startswith(v["site"]) for p in never_seen)
    sd = null_auc_sd(len(subj), n_never) if subj and n_never else None
    band = [0.5 - 1.96 * sd, 0.5 + 1.96 * sd] if sd else None
    rate = sum(r["indistinguishable_after"] for r in subj) / len(subj) if subj else None
    in_band = None if band is None else bool(band[0] <= v["after_mia_auc"] <= band[1])
    memo = {f"{who}_{k}": v[f"{who}_{k}_dice"] for who in ("retrain", "after") for k in ("retain", "test")}
    memo.update({f"{who}_gap": memo[f"{who}_retain"] - memo[f"{who}_test"] for who in ("retrain", "after")})
    return {"calibrated_pass_rate": rate, "n_site_patients": len(subj),
            "n_flagged_before": sum(r["flagged_before"] for r in subj), "n_never_seen_at_site": n_never,
            "mia_auc_after": v["after_mia_auc"], "null_band": band, "auc_in_null_band": in_band,
            "memorisation": memo,
            "meets_quality": bool(v["test_dice_ratio"] >= TARGETS["site_test_dice_ratio"][1] and rate is not None
                                  and rate >= TARGETS["site_calibrated_pass_rate"][1] and in_band)}


def merge(done: dict) -> dict:
    m = {k: v["metrics"] for k, v in done.items()}
    out: dict = {}
    if "original" in m:
        pw = m["original"]["power"]
        out.update({"mia_auc_all_train": pw["member_auc"], "mia_null_control": pw["null_auc"],
                    "power_passed": pw["passed"], "original_cpu_s": m["original"]["cpu_s"]})
        if "calibrated-original" in m:
            chosen = set(m["calibrated-original"]["choice"].values())
            from privseg.audit.mia import auc

            out["mia_auc_original"] = auc([pw["member_scores"][p] for p in chosen if p in pw["member_scores"]],
                                          list(pw["nonmember_scores"].values()))
    if "calibrated-original" in m:
        out["calibrated_population"] = m["calibrated-original"]["population"]
    if "calibrated-original-2ref" in m:
        two = m["calibrated-original-2ref"]
        pop = two["population"]
        out.update({"calibrated_population_2ref": pop, "calibrated_test_2ref": two["test"],
                    "calibrated_tpr_at_1pct_fpr_2ref": pop[two["statistic"]].get("tpr"),
                    "calibrated_auc_2ref": pop[two["statistic"]].get("auc")})
    rebuilt = {k: v["original_rebuilt"] for k, v in m.items() if v.get("original_rebuilt")}
    if rebuilt:
        out["original_rebuilt"] = {**next(iter(rebuilt.values())), "cells": sorted(rebuilt)}
    for f in SHORT_SCHEDULES:
        if f"short-{f}-2ref" in m:
            c = m[f"short-{f}-2ref"]
            pop = c["population"][c["statistic"]]
            out.update({f"calibrated_tpr_at_1pct_fpr_2ref_s{f}": pop.get("tpr"), f"calibrated_auc_2ref_s{f}":
                        pop.get("auc"), f"readiness_ratio_s{f}": c["readiness_ratio"]})
    # readiness: the reference models' measured CPU time over the original's (one pair, and the full set)
    refcells = sorted((k for k in m if k.startswith("references-")), key=lambda k: int(k.split("-")[1]))
    if "original" in m and refcells:
        cpu = {int(k): v for c in refcells for k, v in m[c]["cpu_s"].items() if v is not None}
        orig = m["original"]["cpu_s"]
        out["readiness_ratio_by_n"] = {str(n): sum(cpu[k] for k in range(n)) / orig
                                       for n in range(2, max(cpu) + 2, 2) if all(k in cpu for k in range(n))}
        out["readiness_ratio"] = out["readiness_ratio_by_n"].get("2")
    rows, baseline = _patient_rows(m)
    groups = _groups(rows)
    out["patient_groups"] = groups
    out["patient_baseline_groups"] = _groups(baseline)
    two = [v for k, v in m.items() if k.startswith("patient-2ref-")]
    if two:
        a2 = _groups(two)["all"]
        out["patient_groups_2ref"] = _groups(two)
        out.update({"patient_time_ratio_2ref": a2["time_ratio"], "patient_retain_dice_ratio_2ref":
                    a2["retain_dice_ratio"], "patient_calibrated_pass_rate_2ref": a2["calibrated_pass_rate"]})
    if rows:
        a = groups["all"]
        out.update({"patient_time_ratio": a["time_ratio"], "patient_retain_dice_ratio": a["retain_dice_ratio"],
                    "patient_test_dice_ratio": a["test_dice_ratio"],
                    "patient_calibrated_pass_rate": a["calibrated_pass_rate"]})
    never = list(m["original"]["power"]["nonmember_scores"]) if "original" in m else []
    sites = {k[len("site-"):]: {**v, **_site_evidence(v, never)} for k, v in m.items()
             if k.startswith("site-") and k != "site-retrain"}
    out["site_settings"] = sites
    if sites:
        # headline: the fastest privseg setting that meets the restated target's quality (test Dice, no trace
        # of the site's patients), else the best test Dice
        ok = [(n, v) for n, v in sites.items() if n != "federaser-paper" and v["meets_quality"]]
        name, best = (min(ok, key=lambda x: x[1]["time_ratio"]) if ok else
                      max(sites.items(), key=lambda x: x[1]["test_dice_ratio"]))
        out.update({"site_setting": name, **{f"site_{k}": best[k] for k in (
            "time_ratio", "test_dice_ratio", "calibrated_pass_rate", "retain_dice_ratio", "mia_auc_after",
            "null_band", "auc_in_null_band", "memorisation")}})
    own = out.get("patient_time_ratio_2ref", out.get("patient_time_ratio"))
    if out.get("readiness_ratio") is not None and own is not None:
        from privseg.audit.reference import amortised

        # the pair's measured cost shared by N requests, plus each request's own (reference_teacher's time
        # ratio: with the pair once its cells ran, with the 8 references until then)
        out["amortised_cost_per_request"] = amortised(out["readiness_ratio"], own)
        out["amortised_request_cost_from"] = ("patient-2ref-*" if "patient_time_ratio_2ref" in out
                                              else "patient-teacher-* (8 references; the 2-reference cells pending)")
    out["targets"] = {k: list(v) for k, v in TARGETS.items()}
    out["met"] = {k: (None if out.get(k) is None else
                      (out[k] <= t if op == "<=" else out[k] >= t)) for k, (op, t) in TARGETS.items()}
    # every claim in one place: value, target, and met / missed / pending (with the cells it waits for);
    # a pass rate over patients none of whom the test flagged before the erasure has no value: no power
    no_power = {f"patient_calibrated_pass_rate{sfx}" for sfx, g in (("", groups), ("_2ref", out.get(
        "patient_groups_2ref"))) if g and g["all"]["n"] and not g["all"]["n_powered"]}
    out["claims"] = {k: {"value": out.get(k), "target": list(TARGETS[k]) if k in TARGETS else None,
                         "status": ("no power: no erased patient was flagged before the erasure" if k in no_power
                                    else "pending" if out.get(k) is None else "reported" if k not in TARGETS else
                                    "met" if out["met"][k] else "missed"),
                         **({"waiting_for": FROM_CELLS[k]} if out.get(k) is None and k not in no_power else {})}
                     for k in (*TARGETS, *REPORTED)}
    return out


def _f(v, nd=3) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _patient_table(title: str, rows: list[dict], groups: dict) -> list[str]:
    if not rows:
        return []
    lines = ["", f"## {title}", "", "| slot | patient | site | local steps | time / retrain | retain Dice / "
             "retrain's | test Dice / retrain's | calibrated p before -> after | result | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["slot"]):
        subj = (r.get("calibrated_subjects") or [{}])[0]
        lines.append(f"| {r['slot']} | {r['patient']} | {r['site']} | {r['local_steps_run']} | "
                     f"{r['time_ratio']:.3f} | {r['retain_dice_ratio']:.3f} | {r['test_dice_ratio']:.3f} | "
                     f"{_f(subj.get('p_before'))} -> {_f(subj.get('p_after'))} | {r['calibrated']} | "
                     f"{r['status']} |")
    lines += ["", "| group | n | time ratio (mean / max) | retain Dice ratio (mean / min) | test Dice ratio | "
              "calibrated pass rate (powered) |", "|---|---|---|---|---|---|"]
    for g, v in groups.items():
        lines.append(f"| {g} | {v['n']} | {_f(v['time_ratio'])} / {_f(v['time_ratio_max'])} | "
                     f"{_f(v['retain_dice_ratio'])} / {_f(v['retain_dice_ratio_min'])} | "
                     f"{_f(v['test_dice_ratio'])} | {_f(v['calibrated_pass_rate'])} ({v['n_powered']}) |")
    return lines


def render(out: dict, done: dict) -> list[str]:
    m = {k: v["metrics"] for k, v in done.items()}
    p = done["original"]["params"] if "original" in done else FULL
    lines = [f"Embedded power federation: {p['sites']} sites x {p['subjects']} patients at {p['size']}^3, "
             f"{p['strategy']} {p['rounds']} rounds x {p['local_steps']} local steps, model {p['model']} on whole "
             "volumes; erasure times are CPU seconds of the training rounds against a federated retrain's "
             "(verification excluded).", ""]
    if "mia_auc_all_train" in out:
        lines += [f"Memorisation of the original model: membership AUC all training vs all never-seen "
                  f"**{out['mia_auc_all_train']:.3f}**, null control {out['mia_null_control']:.3f}; power check "
                  f"{'passed' if out['power_passed'] else 'FAILED'}. Erased patients vs never-seen (original "
                  f"model): {_f(out.get('mia_auc_original'))}.", ""]
    tests = [(f"{m['calibrated-original']['n_references']} references", m["calibrated-original"])
             if "calibrated-original" in m else None,
             ("2 references (one complementary pair)", m.get("calibrated-original-2ref")),
             *((f"2 references trained for {f} of the rounds", m.get(f"short-{f}-2ref")) for f in SHORT_SCHEDULES)]
    for what, cell in [t for t in tests if t and t[1]]:
        for stat, pop in cell["population"].items():
            lines.append(f"Calibrated test of the original ({stat}, {what}): AUC {_f(pop.get('auc'))}, TPR "
                         f"{_f(pop.get('tpr'))} at FPR {_f(pop.get('achieved_fpr'))}, members flagged "
                         f"{pop.get('flagged_members')}/{pop.get('n_members')}, never-seen flagged "
                         f"{pop.get('flagged_nonmembers')}/{pop.get('n_nonmembers')}"
                         + (f"; readiness {cell['readiness_ratio']:.2f} x the original's CPU time"
                            if "readiness_ratio" in cell else "") + ".")
    if any(t and t[1] for t in tests):
        lines.append("")
    if out.get("original_rebuilt"):
        r = out["original_rebuilt"]
        lines += [f"Cells {', '.join(r['cells'])} ran on the original retrained from scratch (only the cell files "
                  f"are kept): its per-patient scores differ from the recorded ones by at most "
                  f"{r['max_score_difference']:.2g} ({'reproduced' if r['reproduced'] else 'NOT reproduced'}); "
                  f"membership AUC {r['member_auc']:.3f}.",
                  ""]
    if out.get("readiness_ratio_by_n"):
        lines.append("Readiness (reference models' CPU time / the original training's): "
                     + ", ".join(f"{n} references {v:.2f}" for n, v in out["readiness_ratio_by_n"].items())
                     + ("; per request with one pair and reference_teacher: "
                        + ", ".join(f"{v:.3f} over {n}" for n, v in out["amortised_cost_per_request"].items())
                        + f" (a request's own time from {out['amortised_request_cost_from']})"
                        if out.get("amortised_cost_per_request") else "") + ".")
        lines.append("")
    lines += ["| claim | value | target | status |", "|---|---|---|---|"]
    for k, c in out["claims"].items():
        target = " ".join(map(str, c["target"])) if c["target"] else "(reported)"
        status = f"pending ({c['waiting_for']} not run)" if c["status"] == "pending" else c["status"]
        lines.append(f"| {k} | {_f(c['value'])} | {target} | {status} |")
    teacher, baseline = _patient_rows(m)
    lines += _patient_table("Patients: privseg's setting, reference_teacher, no repair round", teacher,
                            out["patient_groups"])
    two = [v for k, v in m.items() if k.startswith("patient-2ref-")]
    lines += _patient_table("Patients: reference_teacher with one complementary pair of references (2)", two,
                            out.get("patient_groups_2ref", {}))
    if any(r.get("retrain_from") for r in two):
        lines += ["", "Retrains not recomputed for " + ", ".join(r["slot"] for r in two if r.get("retrain_from"))
                  + ": the original was rebuilt and reproduced the recorded one exactly, so each patient's seeded "
                  "retrain is the one its `patient-teacher-*` cell recorded (its CPU time and Dice are used); the "
                  "model before the erasure scored as recorded: "
                  + ("yes" if all(r.get("before_matches_recorded") for r in two if r.get("retrain_from")) else "NO")
                  + "."]
    lines += _patient_table("Patients: the study's Noisy Label with one repair round (baseline)", baseline,
                            out["patient_baseline_groups"])
    if out["site_settings"]:
        lines += ["", "## Site", "", "Target restated (issue 30): test Dice >= 0.98 of the retrain's, the erased "
                  "site's training patients not flagged by the calibrated test (pass rate >= 0.9) with their "
                  "membership AUC against the site's never-seen patients inside the band chance alone spans, "
                  "at <= 0.25 of the retrain's time. Retain Dice is reported: the retrain memorises its retain "
                  "patients.", "",
                  "| setting | interval | ratio | repair rounds | time / retrain | retain Dice / retrain's | test "
                  "Dice / retrain's | calibrated pass (site patients) | AUC after [null band] | meets restated "
                  "target | status (old thresholds) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, v in out["site_settings"].items():
            if v.get("params"):  # a method with settings of its own (fedrecover: its exact rounds too)
                counts = (f"; {v['exact_rounds']} exact, {v['estimated_rounds']} estimated"
                          if "exact_rounds" in v else "")
                n += " (" + ", ".join(f"{k}={x}" for k, x in v["params"].items()) + counts + ")"
            lines.append(f"| {n} | {v['calibration_interval']} | {v['calibration_ratio']} | {v['repair_rounds']} | "
                         f"{v['time_ratio']:.3f} | {v['retain_dice_ratio']:.3f} | {v['test_dice_ratio']:.3f} | "
                         f"{_f(v['calibrated_pass_rate'])} ({v['n_site_patients']}) | {_f(v['mia_auc_after'])} "
                         f"[{', '.join(_f(b) for b in v['null_band'] or [])}] | "
                         f"{'yes' if v['meets_quality'] and v['time_ratio'] <= TARGETS['site_time_ratio'][1] else 'no'}"
                         f" | {v['status']} |")
        mem = out["site_memorisation"]
        lines += ["", f"Memorisation behind the retain Dice ratio ({out['site_setting']}): the retrain's retain Dice "
                  f"{mem['retrain_retain']:.3f} against its test Dice {mem['retrain_test']:.3f} (gap "
                  f"{mem['retrain_gap']:.3f}); the erased model's {mem['after_retain']:.3f} against "
                  f"{mem['after_test']:.3f} (gap {mem['after_gap']:.3f})."]
    return lines


def side_study() -> tuple[Path, Path]:
    """What a side study of this benchmark starts with (one torch thread, quiet logs): the runs folder
    of the benchmark (``cells/``, ``work/``) and the shared folder of its full setting (the original run)."""
    import torch

    from privseg.runs import silence_known_noise

    torch.set_num_threads(1)
    silence_known_noise()
    return cells.BENCH_DIR / "runs" / BENCH, cells.shared_dir(cells.parse("", BENCH, []), BENCH, FULL)


def main(argv: list[str] | None = None) -> int:
    args = cells.parse(__doc__, BENCH, argv)
    setting = SMOKE if args.smoke else FULL
    # the cohort and the original run belong to one training setting: another setting, another folder
    shared = cells.shared_dir(args, BENCH, setting)
    return cells.run(BENCH, VERSION, make_cells(setting),
                     lambda c, w: run_cell(c, w, shared), merge, render, args, argv)


if __name__ == "__main__":
    sys.exit(main())
