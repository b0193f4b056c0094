"""Benchmark (issue 4): the study's unlearning table on the power cohort, as resumable cells.

    OMP_NUM_THREADS=1 python benchmarks/unlearning.py [--resume] [--cells a,b] [--list] [--smoke]

Setting: the embedded power cohort (:func:`privseg.data.synth.power_cohort`: 3 sites x 16
patients at 24^3; 36 training, 12 never seen) and one pooled model trained as
:data:`privseg.data.synth.POWER_TRAINING` says (``unet``, group norm, whole-volume patch, 2
patients per step, lr 3e-3, 2,000 steps), as ``benchmarks/power_check.py`` trains it: it
memorises (membership AUC 0.968 with the Dice of the un-augmented volume, ``POWER_MIA``).

Cells, per seed s of the first three seeds whose original has membership power (every cell of
one seed comes before the next seed's, so a partial run already answers the question on one
seed; a seed without power keeps only its original cell, reported, and the next seed replaces it):

1. ``original-seed{s}``: trains the original (training seed s) and runs
   :func:`privseg.audit.mia.power_check_model` (all training vs all never-seen patients, and the
   null control). It chooses the forget set: the 2 training patients the original memorises most
   (highest Dice above the mean Dice of the never-seen patients of their own site, so an easy
   site does not pass for memorisation) and 2 others at random (seeded by s). Without power
   every forgetting result would be vacuous: the seed's later cells do not run.
2. ``retrain-seed{s}``: the same training without the forget set (``strategy="retrain"``): the
   gold standard, and the time every strategy is compared with.
3. ``{strategy}[+fd]-zero-e{20,50}-seed{s}``: the study's strategies (the six approximate ones of
   the registry's "study's strategies" section; retrain, the seventh, is cell 2), each with and
   without ``fix_decoder``, at the study's 20 and 50 epochs with ``--target zero``; the field
   baselines (``neggrad_plus``, ``scrub``, ``salun``) at the same budgets without it.
4. ``{strategy}-unseen-e50-seed{s}``: all nine with ``--target unseen`` (stop once the forget
   patients look never seen; at most 50 epochs, checked every 2 epochs). The power cohort has
   no val split, so the stopping rule compares with the same 12 never-seen patients the
   membership AUC below uses: read the unseen rows' uncalibrated AUC as optimistic and the
   retrain-calibrated numbers as the check.

Per cell (unlearned model vs the retrain of the same seed): ``time_ratio`` = CPU seconds of the
unlearning (from the call to the start of the evaluation: stopping checks count, evaluation does
not) / CPU seconds of the retrain, so a shared machine does not inflate either (wall-clock ratio
beside it); ``retain_dice_ratio``; ``forget_dice_delta`` = |forget Dice - retrain's forget
Dice|; ``test_dice_ratio``; ``mia_auc``: membership AUC of the forget patients vs the 12
never-seen ones (``POWER_MIA``: Dice, one un-augmented view); ``mia_auc_calibrated``: the same
with each patient's score minus the retrain's score (the retrain trained on neither group);
``mia_calibrated_pass_rate``: the share of forget patients whose calibrated score is not above
every never-seen patient's (:func:`privseg.audit.pvalues.empirical_p_value`: p = (1 + #never-seen
scoring at least as high) / 13 >= 0.1). The engine's own membership AUC (loss statistic) is kept as ``mia_auc_loss``.

Trade-off (the study's "retain/forget trade-off", made comparable to the gold standard):
``trade_off = min(retain_dice_ratio, 1) - forget_dice_delta``, per seed, then mean over seeds.
1 means the model segments the retained and the forgotten patients exactly as the retrain does;
keeping retain Dice and driving forget Dice far below the retrain's (the study's Dice gap)
scores lower, since a forget patient segmented worse than any unseen one is itself a membership
signal. The study's Dice gap (retain - forget) is in the table too.

Keys (``unlearning.json``): ``best``: among all (strategy, fix_decoder, target, epochs) rows
with mean ``retain_dice_ratio >= 0.98``, the highest mean ``trade_off`` (ties: lower time
ratio); when no row reaches 0.98, the highest ``trade_off`` of all, with ``meets_retain`` false.
It gives ``time_ratio``, ``retain_dice_ratio``, ``forget_dice_delta``, ``mia_auc``,
``mia_calibrated_pass_rate`` (and the rest of its row). ``mia_auc_original``: forget set vs
never-seen, original model (mean over seeds; half the set was chosen as the most memorised, so
the random half is given separately); ``mia_auc_all_train`` and ``mia_null_control``: the power
checks; ``table``: a row per configuration with mean, std and values over seeds;
``study_finding``: "Noisy Label gives the best retain/forget trade-off" holds at an epoch budget
when a noisy_label row (with or without fix_decoder) has the highest mean trade-off among the
study's strategies at ``--target zero``; it holds when it holds at 20 and at 50 epochs.
Targets: time ratio <= 0.05, retain Dice ratio >= 0.98, |delta forget Dice| <= 0.03, membership
AUC <= 0.55, calibrated pass rate 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import cells  # noqa: E402

BENCH = "unlearning"
VERSION = "unlearning-power-1"  # bump when a change makes old cells incomparable
STUDY = ("noisy_label", "retain_label", "max_loss", "random_encoder", "learn_others", "learn_noise")
FIELD = ("neggrad_plus", "scrub", "salun")
N_SEEDS = 3  # seeds with a powered original that the table needs
# Seeds are taken in order from these. A seed whose original fails the power check keeps its
# original cell (reported, with its numbers) and is replaced by the next seed: the check looks only
# at the original, never at an unlearning result, so the replacement cannot favour a strategy. At
# 12 never-seen patients the null control (6 vs 6, |AUC - 0.5| <= 0.1) fails by chance alone about
# half the time (its ``null_pass_rate``), so a replaced seed is expected.
CANDIDATE_SEEDS = tuple(range(8))
# the smoke run checks the pipeline (every kind of cell once), not the strategies (tests/ do)
SMOKE = {"seeds": (0,), "study": ("noisy_label", "retain_label"), "field": ("scrub",)}
P_PASS = 0.1  # a forget patient passes the calibrated test at p >= 0.1, as privseg's calibrated target
TARGETS = {"time_ratio": ("<=", 0.05), "retain_dice_ratio": (">=", 0.98), "forget_dice_delta": ("<=", 0.03),
           "mia_auc": ("<=", 0.55), "mia_calibrated_pass_rate": (">=", 1.0)}


def settings(smoke: bool) -> dict:
    from privseg.data.synth import POWER_MIA, POWER_SIZE, POWER_SUBJECTS, POWER_TRAINING

    full = {"sites": 3, "subjects": POWER_SUBJECTS, "size": POWER_SIZE, "cohort_seed": 0,
            **{k: POWER_TRAINING[k] for k in ("model", "lr", "steps", "subjects_per_step", "patches_per_subject")},
            "mia_statistic": POWER_MIA["statistic"], "mia_views": POWER_MIA["views"],
            "n_memorised": 2, "n_random": 2, "zero_epochs": [20, 50], "unseen_epochs": 50, "check_every": 4,
            "smoke": False}
    if not smoke:
        return full
    # the pipeline only: far too small to memorise or to pass the power check's size rules
    return {**full, "sites": 2, "subjects": 6, "model": "unet_tiny", "steps": 4, "n_memorised": 1, "n_random": 1,
            "zero_epochs": [1, 2], "unseen_epochs": 2, "check_every": 1, "smoke": True}


def _label(strategy: str, fd: bool) -> str:
    return strategy + ("+fd" if fd else "")


# relative costs: a 2,000-step training is 1; an unlearning step about 1/2,000 (twice that for the
# strategies that add a retain batch), an evaluation about 60 steps' worth, and with --target unseen
# (assumed to stop halfway) a stopping check about 4 steps' worth every 2 epochs
_DOUBLE = {"noisy_label", "neggrad_plus", "scrub", "salun"}


def _strategy_cell(base: dict, name: str, fd: bool, target: str, epochs: int) -> cells.Cell:
    steps = epochs * 2 * (2 if name in _DOUBLE else 1)
    cost = 60 + (steps / 2 + epochs if target == "unseen" else steps)
    return cells.Cell(f"{_label(name, fd)}-{target}-e{epochs}-seed{base['seed']}",
                      {**base, "strategy": name, "fix_decoder": fd, "target": target, "epochs": epochs},
                      cost=cost / base["steps"])


def unpowered(cells_dir: Path | None, seed: int) -> bool:
    """Whether the original of ``seed`` ran and failed the power check."""
    path = None if cells_dir is None else Path(cells_dir) / f"original-seed{seed}.json"
    return bool(path and path.is_file() and not cells.metrics_of(cells_dir, f"original-seed{seed}")["power"]["passed"])


def seeds_to_run(s: dict, cells_dir: Path | None, n: int = N_SEEDS,
                 candidates=CANDIDATE_SEEDS) -> tuple[list[int], list[int]]:
    """(the seeds whose cells run, the seeds before them replaced for an original without power);
    a smoke run keeps its seeds whatever the check says."""
    run, replaced = [], []
    for seed in candidates:
        if len(run) == n:
            break
        (replaced if not s["smoke"] and unpowered(cells_dir, seed) else run).append(seed)
    return run, replaced


def make_cells(s: dict, seeds=None, study=STUDY, field=FIELD, cells_dir: Path | None = None) -> list[cells.Cell]:
    """Per seed: the original, the retrain, then the zero grid at the smallest budget, the unseen
    target, the larger budgets (the cheap rows of a seed first). Without ``seeds``: the first
    :data:`N_SEEDS` seeds whose original has power (or has not run yet), after the original cells
    of the seeds replaced for having none."""
    out = []
    if seeds is None:
        seeds, replaced = seeds_to_run(s, cells_dir)
        out += [cells.Cell(f"original-seed{seed}", {**s, "seed": seed}, cost=1.05) for seed in replaced]
    grid = [(n, fd) for fd in (False, True) for n in study] + [(n, False) for n in field]
    for seed in seeds:
        base = {**s, "seed": seed}
        out += [cells.Cell(f"original-seed{seed}", base, cost=1.05), cells.Cell(f"retrain-seed{seed}", base, cost=1.0)]
        first, *rest = s["zero_epochs"]
        out += [_strategy_cell(base, n, fd, "zero", first) for n, fd in grid]
        out += [_strategy_cell(base, n, False, "unseen", s["unseen_epochs"]) for n in (*study, *field)]
        out += [_strategy_cell(base, n, fd, "zero", e) for e in rest for n, fd in grid]
    return out


# -- shared state of a seed ---------------------------------------------------------------------

_ITEMS: dict[str, dict] = {}  # preprocessed patients by ID, shared by the cells of one process


def _cohort(s: dict, shared: Path):
    from privseg.data.cohort import MANIFEST_NAME, Cohort
    from privseg.data.synth import power_cohort

    manifest = shared / "cohort" / MANIFEST_NAME
    if not manifest.exists():
        return power_cohort(manifest.parent, sites=s["sites"], subjects=s["subjects"], size=s["size"],
                            seed=s["cohort_seed"], check=not s["smoke"])
    return Cohort.from_manifest(manifest)


def _items(cohort, ids: list[str]) -> list[dict]:
    from privseg.data.transforms import load_preprocessed

    need = [cohort.subject(i) for i in ids if i not in _ITEMS]
    for subj, item in zip(need, load_preprocessed(need, cohort, None), strict=True):
        _ITEMS[subj.id] = item
    return [_ITEMS[i] for i in ids]


def _split(cohort) -> tuple[list[str], list[str]]:
    return [x.id for x in cohort.select("train")], [x.id for x in cohort.select("test")]


def _seed_dir(shared: Path, seed: int) -> Path:
    return shared / f"seed{seed}"


def _checkpoint(path: Path, cell: str) -> Path:
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (the work folder was cleaned?); rerun: --no-resume --cells {cell}")
    return path


def _powered(s: dict, cells_dir: Path) -> dict:
    """The original cell's record of this seed; refuses when its model has no membership power."""
    name = f"original-seed{s['seed']}"
    rec = cells.metrics_of(cells_dir, name)
    power = rec["power"]
    if not power["passed"]:
        if s["smoke"]:
            print(f"  (smoke: {name} has no membership power; going on anyway)", flush=True)
        else:
            raise RuntimeError(
                f"seed {s['seed']}: the original model has no membership power (AUC all training vs never-seen "
                f"{power.get('member_auc', math.nan):.3f}, null control {power.get('null_auc', math.nan):.3f}: "
                f"{'; '.join(power['problems'])}); every forgetting result of this seed would be vacuous, so its "
                f"cells refuse to run. Fix privseg.data.synth.POWER_TRAINING, then: --no-resume --cells {name}")
    return rec


class _Clock:
    """CPU and wall seconds from construction to the engine's first ``on_evaluate`` call (the
    end of the unlearning, stopping checks included; the evaluation excluded)."""

    def __init__(self) -> None:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        self.cpu = self.wall = None

    def __call__(self, done: int, total: int) -> None:
        if self.cpu is None:
            self.cpu, self.wall = time.process_time() - self.cpu0, time.perf_counter() - self.wall0


def _membership(model, forget: list[dict], never: list[dict], cfg, s: dict, reference: dict | None = None) -> dict:
    """Membership of the forget patients vs the never-seen ones (``POWER_MIA``); with ``reference``
    (the retrain's rows) also calibrated: each score minus the retrain's, and a p-value per patient."""
    from privseg.audit.mia import audit_items
    from privseg.audit.pvalues import pass_rate, per_patient_p_values

    kw = {"statistic": s["mia_statistic"], "views": s["mia_views"], "seed": s["seed"], "n_boot": 1000}
    raw = audit_items(model, forget, never, cfg.patch_size, cfg.num_classes, **kw)
    slim = {g: [{k: r[k] for k in ("id", "loss", "dice")} for r in rows]
            for g, rows in (("members", raw.members), ("nonmembers", raw.nonmembers))}
    out = {"auc": raw.auc, "ci": [raw.ci_low, raw.ci_high], "rows": slim}
    if reference is not None:
        cal = audit_items(model, forget, never, cfg.patch_size, cfg.num_classes, **kw,
                          reference_rows=[(reference["members"], reference["nonmembers"])],
                          member_rows=raw.members, nonmember_rows=raw.nonmembers)
        patients = per_patient_p_values({r["id"]: r["score"] for r in cal.members},
                                        [r["score"] for r in cal.nonmembers], P_PASS)
        out.update({"auc_calibrated": cal.auc, "ci_calibrated": [cal.ci_low, cal.ci_high], "patients": patients,
                    "calibrated_pass_rate": pass_rate(patients)})
    return out


# -- cells --------------------------------------------------------------------------------------

def _choose_forget(s: dict, cohort, power: dict) -> dict:
    site = {x.id: x.site for x in cohort.subjects}
    members, never = power["member_scores"], power["nonmember_scores"]
    by_site: dict[str, list[float]] = {}
    for p, v in never.items():
        by_site.setdefault(site[p], []).append(v)
    overall = float(np.mean(list(never.values())))
    excess = {p: v - (float(np.mean(by_site[site[p]])) if site[p] in by_site else overall)
              for p, v in members.items()}
    memorised = sorted(members, key=lambda p: (-excess[p], p))[:s["n_memorised"]]
    rest = sorted(p for p in members if p not in memorised)
    rng = np.random.default_rng((s["seed"], 4))  # seeded: the same forget set on every rerun
    random_ = sorted(str(x) for x in rng.choice(rest, size=s["n_random"], replace=False))
    return {"forget": memorised + random_, "memorised": memorised, "random": random_,
            "excess": {p: excess[p] for p in memorised + random_}}


def original_cell(s: dict, shared: Path) -> dict:
    from privseg.audit.mia import power_check_model
    from privseg.data.transforms import whole_volume_patch
    from privseg.train import TrainConfig, save_checkpoint, train_steps
    from privseg.train.loop import make_optimizer
    from privseg.utils import seed_everything

    cohort = _cohort(s, shared)
    train_ids, never_ids = _split(cohort)
    train, never = _items(cohort, train_ids), _items(cohort, never_ids)
    # whole-volume patches: training sees every patient exactly as the membership test scores it
    volume = whole_volume_patch(train + never)
    cfg = TrainConfig(model=s["model"], norm="group", patch_size=volume, subjects_per_step=s["subjects_per_step"],
                      patches_per_subject=s["patches_per_subject"], lr=s["lr"], steps=s["steps"], seed=s["seed"],
                      device="cpu", in_channels=len(cohort.channels), num_classes=cohort.num_classes)
    seed_everything(cfg.seed)
    model = cfg.build_model()
    opt = make_optimizer(model, cfg)
    clock = _Clock()
    losses = train_steps(model, opt, train, cfg, on_step=lambda k, loss: print(
        f"  original step {k}/{cfg.steps} loss {loss:.4f}", flush=True) if k % 250 == 0 else None)
    clock(0, 0)
    ckpt = _seed_dir(shared, s["seed"]) / "original.pt"
    save_checkpoint(ckpt, model, config=cfg.to_dict(), step=cfg.steps,
                    extra={"train_subjects": train_ids, "cohort": cohort.name})
    model.eval()
    small = {} if not s["smoke"] else {"min_members": 1, "min_nonmembers": 2}
    power = power_check_model(model, train, never, volume, cfg.num_classes, statistic=s["mia_statistic"],
                              views=s["mia_views"], seed=s["seed"], raise_on_fail=False, **small)
    keep = ("member_auc", "member_ci", "member_p", "null_auc", "null_sd", "null_pass_rate", "passed", "problems",
            "member_scores", "nonmember_scores")
    power = {k: power.get(k) for k in keep}
    choice = _choose_forget(s, cohort, power)
    print(f"  original: membership AUC {power['member_auc']:.3f}, null {power['null_auc']:.3f}, "
          f"passed {power['passed']}; forget {choice['forget']} (memorised {choice['memorised']})", flush=True)
    return {"checkpoint": str(ckpt), "cpu_s": clock.cpu, "wall_s": clock.wall, "volume": list(volume),
            "n_train": len(train_ids), "n_never_seen": len(never_ids), "train_loss_last50": float(
                np.mean(losses[-50:])), "power": power, **choice}


def retrain_cell(s: dict, shared: Path, cells_dir: Path) -> dict:
    from privseg.train import TrainConfig, load_checkpoint, model_from_checkpoint
    from privseg.unlearn import unlearn

    orig = _powered(s, cells_dir)
    cohort = _cohort(s, shared)
    train_ids, never_ids = _split(cohort)
    forget_items, never_items = _items(cohort, orig["forget"]), _items(cohort, never_ids)
    _items(cohort, train_ids)
    folder = _seed_dir(shared, s["seed"])
    (folder / "eval_cache.json").unlink(missing_ok=True)  # it held the previous retrain's scores
    ckpt = _checkpoint(folder / "original.pt", f"original-seed{s['seed']}")
    clock = _Clock()
    res = unlearn(ckpt, cohort, orig["forget"], "retrain", out_dir=folder / "retrain", seed=s["seed"], items=_ITEMS,
                  device="cpu", evaluate=True, mia_views=s["mia_views"], on_evaluate=clock,
                  on_step=lambda k, n, loss: print(f"  retrain step {k}/{s['steps']}", flush=True)
                  if k % 250 == 0 else None)
    payload = load_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(payload["config"])
    original = model_from_checkpoint(payload, ckpt).eval()
    mine = _membership(res.model, forget_items, never_items, cfg, s)
    before = _membership(original, forget_items, never_items, cfg, s, reference=mine["rows"])
    u = res.report["unlearned"]
    return {"forget": orig["forget"], "cpu_s": clock.cpu, "wall_s": res.report["seconds"],
            "steps": res.report["steps_run"], "retain_dice": u["retain"]["dice"], "forget_dice": u["forget"]["dice"],
            "test_dice": u["test"]["dice"], "dice_gap": u["dice_gap"], "mia_auc": mine["auc"],
            "mia_ci": mine["ci"], "rows": mine["rows"], "mia_auc_loss": u["mia"]["auc"],
            "original": {"retain_dice": res.report["original"]["retain"]["dice"],
                         "forget_dice": res.report["original"]["forget"]["dice"],
                         "test_dice": res.report["original"]["test"]["dice"],
                         "dice_gap": res.report["original"]["dice_gap"], "mia_auc": before["auc"],
                         "mia_auc_calibrated": before["auc_calibrated"],
                         "mia_calibrated_pass_rate": before["calibrated_pass_rate"],
                         "patients": before["patients"]}}


def strategy_cell(s: dict, shared: Path, cells_dir: Path) -> dict:
    from privseg.train import TrainConfig, load_checkpoint
    from privseg.unlearn import unlearn
    from privseg.utils import write_json

    orig = _powered(s, cells_dir)
    rt = cells.metrics_of(cells_dir, f"retrain-seed{s['seed']}")
    cohort = _cohort(s, shared)
    train_ids, never_ids = _split(cohort)
    forget_items, never_items = _items(cohort, orig["forget"]), _items(cohort, never_ids)
    _items(cohort, train_ids)
    folder = _seed_dir(shared, s["seed"])
    ckpt = _checkpoint(folder / "original.pt", f"original-seed{s['seed']}")
    retrain = _checkpoint(folder / "retrain" / "unlearned.pt", f"retrain-seed{s['seed']}")
    # the original's and the retrain's evaluation are the same for every cell of a seed: the
    # first cell computes them, the others read them
    cache_path = folder / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    clock = _Clock()
    res = unlearn(ckpt, cohort, orig["forget"], s["strategy"], fix_decoder=s["fix_decoder"], epochs=s["epochs"],
                  target=s["target"], seed=s["seed"], retrain_checkpoint=retrain, items=_ITEMS, device="cpu",
                  mia_views=s["mia_views"], check_every=s["check_every"], original_metrics=cache.get("original"),
                  retrain_metrics=cache.get("retrain"), on_evaluate=clock)
    r = res.report
    if not cache:
        write_json(cache_path, {"original": r["original"], "retrain": r["retrain"]})
    cfg = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
    m = _membership(res.model, forget_items, never_items, cfg, s, reference=rt["rows"])
    u, ret = r["unlearned"], r["retrain"]
    delta = r["forget_dice_distance_to_retrain"]
    out = {"forget": orig["forget"], "steps": r["steps_run"], "stopped_early": r["stopped_early"],
           "n_checks": len(r["checks"]), "checks": r["checks"],  # the stopping rule's log: why it (did not) stop
           "utility_floor": r.get("utility_floor"), "cpu_s": clock.cpu, "wall_s": r["seconds"],
           "time_ratio": clock.cpu / rt["cpu_s"], "wall_time_ratio": r["seconds"] / rt["wall_s"],
           **{f"{g}_{k}": u[g][k] for g in ("retain", "forget", "test") for k in ("dice", "mae")},
           "dice_gap": u["dice_gap"], "mae_gap": u["mae_gap"],
           "retain_dice_ratio": r["retain_dice_ratio"], "forget_dice_delta": delta,
           "forget_dice_minus_retrain": u["forget"]["dice"] - ret["forget"]["dice"],
           "test_dice_ratio": u["test"]["dice"] / ret["test"]["dice"],
           "trade_off": min(r["retain_dice_ratio"], 1.0) - delta,
           "mia_auc": m["auc"], "mia_ci": m["ci"], "mia_auc_calibrated": m["auc_calibrated"],
           "mia_calibrated_pass_rate": m["calibrated_pass_rate"], "patients": m["patients"],
           "mia_auc_loss": u["mia"]["auc"], "mia_auc_loss_calibrated": u["mia"].get("auc_calibrated")}
    print(f"  {_label(s['strategy'], s['fix_decoder'])} {s['target']} e{s['epochs']}: steps {out['steps']}, "
          f"retain ratio {out['retain_dice_ratio']:.3f}, |dforget| {delta:.3f}, trade-off {out['trade_off']:.3f}, "
          f"MIA {out['mia_auc']:.2f} (cal. {out['mia_auc_calibrated']:.2f}), time ratio {out['time_ratio']:.3f}",
          flush=True)
    return out


def run_cell(cell: cells.Cell, work: Path, shared: Path, cells_dir: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if cell.name.startswith("original-"):
        return original_cell(cell.params, shared)
    if cell.name.startswith("retrain-"):
        return retrain_cell(cell.params, shared, cells_dir)
    return strategy_cell(cell.params, shared, cells_dir)


# -- summary ------------------------------------------------------------------------------------

METRICS = ("steps", "time_ratio", "wall_time_ratio", "retain_dice", "forget_dice", "test_dice", "dice_gap",
           "retain_dice_ratio", "forget_dice_delta", "forget_dice_minus_retrain", "test_dice_ratio", "trade_off",
           "mia_auc", "mia_auc_calibrated", "mia_calibrated_pass_rate", "mia_auc_loss")


def _stats(values) -> dict:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def _key(p: dict) -> tuple:
    return (p["strategy"], p["fix_decoder"], p["target"], p["epochs"])


def _row_label(r: dict) -> str:
    return f"{_label(r['strategy'], r['fix_decoder'])} {r['target']} e{r['epochs']}"


def merge(done: dict) -> dict:
    from privseg.audit.mia import auc

    originals = {v["params"]["seed"]: v for k, v in done.items() if k.startswith("original-")}
    # a seed replaced for an original without power counts nowhere but in its own report line
    replaced = {seed: {k: v["metrics"]["power"][k] for k in ("member_auc", "null_auc", "null_sd", "null_pass_rate",
                                                             "problems")}
                for seed, v in originals.items() if not v["params"]["smoke"] and not v["metrics"]["power"]["passed"]}
    orig = {seed: v["metrics"] for seed, v in originals.items() if seed not in replaced}
    ret = {v["params"]["seed"]: v["metrics"] for k, v in done.items() if k.startswith("retrain-")}
    out: dict = {"seeds_done": sorted(orig), "seeds_replaced": replaced}
    if orig:
        def forget_auc(m: dict, which: str) -> float:
            scores = m["power"]["member_scores"]
            return auc([scores[p] for p in m[which]], list(m["power"]["nonmember_scores"].values()))

        out.update({
            "mia_auc_all_train": _stats(m["power"]["member_auc"] for m in orig.values())["mean"],
            "mia_null_control": _stats(m["power"]["null_auc"] for m in orig.values())["mean"],
            "mia_auc_original": _stats(forget_auc(m, "forget") for m in orig.values())["mean"],
            "mia_auc_original_memorised": _stats(forget_auc(m, "memorised") for m in orig.values())["mean"],
            "mia_auc_original_random": _stats(forget_auc(m, "random") for m in orig.values())["mean"],
            "power": {s: {k: m["power"][k] for k in ("member_auc", "member_ci", "null_auc", "passed")}
                      | {"forget": m["forget"], "memorised": m["memorised"]} for s, m in orig.items()}})
    groups: dict = {}
    for k, v in done.items():
        if not (k.startswith("original-") or k.startswith("retrain-")):
            groups.setdefault(_key(v["params"]), []).append(v["metrics"])
    table = []
    if ret:
        table.append({"strategy": "original", "fix_decoder": False, "target": "-", "epochs": None,
                      **{m: _stats(r["original"].get(m) for r in ret.values())
                         for m in ("retain_dice", "forget_dice", "test_dice", "dice_gap", "mia_auc",
                                   "mia_auc_calibrated", "mia_calibrated_pass_rate")}})
        table.append({"strategy": "retrain", "fix_decoder": False, "target": "exact", "epochs": None,
                      **{m: _stats(r.get(m) for r in ret.values())
                         for m in ("steps", "retain_dice", "forget_dice", "test_dice", "dice_gap", "mia_auc",
                                   "mia_auc_loss")},
                      "cpu_s": _stats(r["cpu_s"] for r in ret.values())})
    for (n, fd, t, e), rows in groups.items():
        table.append({"strategy": n, "fix_decoder": fd, "target": t, "epochs": e,
                      **{m: _stats(r.get(m) for r in rows) for m in METRICS}})
    out["table"] = table
    runs = [r for r in table if r["strategy"] not in ("original", "retrain")]
    out["best"] = pick_best(runs)
    out["study_finding"] = study_finding(runs)
    b = out["best"] or {}
    out["targets"] = {k: list(v) for k, v in TARGETS.items()}
    out["met"] = {k: (None if b.get(k) is None else (b[k] <= t if op == "<=" else b[k] >= t))
                  for k, (op, t) in TARGETS.items()}
    return out


def pick_best(rows: list[dict]) -> dict | None:
    rows = [r for r in rows if r["trade_off"]["mean"] is not None]
    if not rows:
        return None
    ok = [r for r in rows if r["retain_dice_ratio"]["mean"] >= TARGETS["retain_dice_ratio"][1]]
    row = max(ok or rows, key=lambda r: (r["trade_off"]["mean"], -r["time_ratio"]["mean"]))
    return {"configuration": _row_label(row), "strategy": row["strategy"], "fix_decoder": row["fix_decoder"],
            "target": row["target"], "epochs": row["epochs"], "meets_retain": bool(ok), "seeds": row["trade_off"]["n"],
            **{m: row[m]["mean"] for m in ("time_ratio", "retain_dice_ratio", "forget_dice_delta", "test_dice_ratio",
                                           "trade_off", "mia_auc", "mia_auc_calibrated", "mia_calibrated_pass_rate",
                                           "steps")},
            "std": {m: row[m]["std"] for m in ("time_ratio", "retain_dice_ratio", "forget_dice_delta", "trade_off",
                                               "mia_auc")}}


def study_finding(rows: list[dict]) -> dict:
    out: dict = {"claim": "Noisy Label gives the best retain/forget trade-off",
                 "measure": "trade_off = min(retain_dice_ratio, 1) - forget_dice_delta (mean over seeds), among "
                            "the study's strategies with --target zero, per epoch budget", "by_epochs": {}}
    budgets = sorted({r["epochs"] for r in rows if r["target"] == "zero"})
    for e in budgets:
        cand = [r for r in rows if r["target"] == "zero" and r["epochs"] == e and r["strategy"] in STUDY
                and r["trade_off"]["mean"] is not None]
        if not cand:
            continue
        rank = sorted(cand, key=lambda r: -r["trade_off"]["mean"])
        nl = next((r for r in rank if r["strategy"] == "noisy_label"), None)
        other = next((r for r in rank if r["strategy"] != "noisy_label"), None)
        field = [r for r in rows if r["target"] == "zero" and r["epochs"] == e and r["strategy"] in FIELD
                 and r["trade_off"]["mean"] is not None]
        by_gap = max(cand, key=lambda r: r["dice_gap"]["mean"])

        def brief(r):
            return None if r is None else {"configuration": _row_label(r), "trade_off": r["trade_off"]["mean"],
                                           "std": r["trade_off"]["std"], "seeds": r["trade_off"]["n"],
                                           "retain_dice_ratio": r["retain_dice_ratio"]["mean"],
                                           "forget_dice_delta": r["forget_dice_delta"]["mean"]}

        out["by_epochs"][str(e)] = {
            "holds": rank[0]["strategy"] == "noisy_label", "best": brief(rank[0]), "noisy_label": brief(nl),
            "best_other": brief(other),
            "best_field_baseline": brief(max(field, key=lambda r: r["trade_off"]["mean"]) if field else None),
            "best_by_dice_gap": {"configuration": _row_label(by_gap), "dice_gap": by_gap["dice_gap"]["mean"]},
            "ranking": [[_row_label(r), r["trade_off"]["mean"], r["trade_off"]["std"]] for r in rank]}
    verdicts = [v["holds"] for v in out["by_epochs"].values()]
    out["holds"] = bool(verdicts) and all(verdicts)
    return out


def _f(v, nd: int = 3) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _ms(st: dict | None, nd: int = 3) -> str:
    if not st or st.get("mean") is None:
        return "-"
    return f"{st['mean']:.{nd}f} ± {st['std']:.{nd}f}"


def render(out: dict, done: dict) -> list[str]:
    p = next(iter(done.values()))["params"]
    lines = [f"Embedded power cohort: {p['sites']} sites x {p['subjects']} patients at {p['size']}^3; pooled "
             f"`{p['model']}` on whole volumes, {p['subjects_per_step']} patients per step, lr {p['lr']}, "
             f"{p['steps']} steps; forget sets of {p['n_memorised']} most memorised + {p['n_random']} random "
             f"training patients per seed; seeds done {out.get('seeds_done')}. Mean ± std over seeds. Time ratios "
             "are CPU seconds of the unlearning (stopping checks included) over the retrain's.", ""]
    if "mia_auc_all_train" in out:
        lines += [f"Membership power of the originals ({p['mia_statistic']}, {p['mia_views']} view): all training vs "
                  f"all never-seen **{out['mia_auc_all_train']:.3f}**, null control {out['mia_null_control']:.3f}; "
                  "per seed: " + "; ".join(
                      f"seed {s}: {v['member_auc']:.3f} (null {v['null_auc']:.3f}, "
                      f"{'passed' if v['passed'] else 'FAILED'}; forget {', '.join(v['forget'])})"
                      for s, v in out["power"].items())
                  + f". Forget set vs never-seen, original model: {out['mia_auc_original']:.3f} (memorised half "
                  f"{out['mia_auc_original_memorised']:.3f}, random half {out['mia_auc_original_random']:.3f}).", ""]
    for seed, v in (out.get("seeds_replaced") or {}).items():
        lines += [f"Seed {seed} replaced by the next seed: its original has no membership power by the check "
                  f"(all training vs never-seen {v['member_auc']:.3f}; null control {v['null_auc']:.3f}, chance sd "
                  f"{v['null_sd']:.3f}; a random halving of these never-seen scores passes the null tolerance "
                  f"{v['null_pass_rate']:.0%} of the time). Its cells did not run.", ""]
    b = out.get("best")
    if b:
        how = ("retain Dice ratio >= 0.98, highest trade-off" if b["meets_retain"] else
               "no row keeps retain Dice >= 0.98 of the retrain: highest trade-off of all")
        lines += [f"**Best** ({how}): "
                  f"**{b['configuration']}** (seeds: {b['seeds']}) — time ratio {b['time_ratio']:.3f}, retain Dice "
                  f"ratio {b['retain_dice_ratio']:.3f}, |Δ forget Dice| {b['forget_dice_delta']:.3f}, trade-off "
                  f"{b['trade_off']:.3f}, membership AUC {_f(b['mia_auc'])} (calibrated {_f(b['mia_auc_calibrated'])}"
                  f", pass rate {_f(b['mia_calibrated_pass_rate'])}).", "",
                  "| claim | best | target | met |", "|---|---|---|---|"]
        for k, (op, t) in TARGETS.items():
            met = out["met"].get(k)
            lines.append(f"| {k} | {_f(b.get(k))} | {op} {t} | {'-' if met is None else ('yes' if met else 'no')} |")
        lines.append("")
    f = out.get("study_finding") or {}
    if f.get("by_epochs"):
        lines.append(f"**Study's finding** ({f['claim']}; {f['measure']}): "
                     f"**{'holds' if f['holds'] else 'does not hold'}**.")
        for e, v in f["by_epochs"].items():
            nl, best, other = v["noisy_label"], v["best"], v["best_other"]
            fb = v["best_field_baseline"]
            lines.append(f"- {e} epochs: {'holds' if v['holds'] else 'does not hold'} — best {best['configuration']} "
                         f"{best['trade_off']:.3f} ± {best['std']:.3f}; best noisy_label row "
                         + (f"{nl['configuration']} {nl['trade_off']:.3f} ± {nl['std']:.3f}" if nl else "not run")
                         + (f"; best other {other['configuration']} {other['trade_off']:.3f} ± {other['std']:.3f}"
                            if other else "")
                         + (f"; best field baseline {fb['configuration']} {fb['trade_off']:.3f} ± {fb['std']:.3f}"
                            if fb else "")
                         + f"; by the study's Dice gap: {v['best_by_dice_gap']['configuration']} "
                         f"({v['best_by_dice_gap']['dice_gap']:.3f}).")
        lines.append("")
    lines += ["| strategy | fix dec. | target | epochs | seeds | steps | retain Dice | forget Dice | test Dice | "
              "Dice gap | retain / retrain | \\|Δ forget Dice\\| | test / retrain | trade-off | MIA AUC | "
              "MIA AUC cal. | cal. pass rate | time / retrain |", "|" + "---|" * 18]
    for r in out.get("table", []):
        n = max((v["n"] for v in r.values() if isinstance(v, dict) and "n" in v), default=0)
        lines.append("| " + " | ".join([
            r["strategy"], "✓" if r["fix_decoder"] else "", r["target"], str(r["epochs"] or ""), str(n),
            _ms(r.get("steps"), 0), *[_ms(r.get(m)) for m in (
                "retain_dice", "forget_dice", "test_dice", "dice_gap", "retain_dice_ratio", "forget_dice_delta",
                "test_dice_ratio", "trade_off", "mia_auc", "mia_auc_calibrated", "mia_calibrated_pass_rate",
                "time_ratio")]]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = cells.parse(__doc__, BENCH, argv)
    setting = settings(args.smoke)
    # the cohort and the trained models belong to one setting: another setting, another folder
    shared = cells.shared_dir(args, BENCH, setting)
    cells_dir = args.runs / BENCH / "cells"
    smoke = (SMOKE["seeds"], SMOKE["study"], SMOKE["field"]) if args.smoke else ()
    while True:  # an original without power replaces its seed: list the cells again and go on
        cell_list = make_cells(setting, *smoke, cells_dir=cells_dir)
        code = cells.run(BENCH, VERSION, cell_list, lambda c, w: run_cell(c, w, shared, cells_dir), merge, render,
                         args, argv)
        if code or args.list or [c.name for c in make_cells(setting, *smoke, cells_dir=cells_dir)] == [
                c.name for c in cell_list]:
            return code


if __name__ == "__main__":
    sys.exit(main())
