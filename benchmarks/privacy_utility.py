"""Benchmark (issue 26): how close patient-level DP training gets to non-private Dice, by cohort size, as cells.

    OMP_NUM_THREADS=1 python benchmarks/privacy_utility.py [--resume] [--cells a,b] [--list] [--summary] [--smoke]

Three tasks, 3 sites each, federated (privseg's Flower ServerApp/ClientApp, in-process round loop):
``mri3d`` (3 T1 scanners), ``ct3d`` (the same anatomy, CT at every site), ``derm2d`` (2D
dermoscopy, three cameras). Each task has one cohort: a fixed test set of ``test`` patients a
site, and the first ``n`` of its training patients train (n = 12, 25, 50, 100 for mri3d; 12 and
100 for the others). Arms, per (task, n, epsilon in {3, 8}, seed in {0, 1, 2}), delta 1e-5:

* ``np``: non-private, from the seeded initialisation;
* ``np_warm``: non-private from the public warm start;
* ``old``: the old DP default: fixed clip C = 1, 2 patients x 2 patches per step, q = 2/n, no
  plan, no EMA (``DPConfig(clip="fixed", clip_norm=1, plan="none", aug_mult=2, ema=0)``);
* ``recipe``: the new recipe from scratch: the step planner (``plan="auto"`` with the declared
  cohort size n and the epoch budget), augmentation multiplicity K, the normalising clip, the
  EMA served;
* ``warm``: the recipe from the public warm start (``TrainConfig.init``), fine-tuning
  ``WARM_TRAINABLE``.

Every arm trains the same number of steps (rounds x local steps); the non-private arms take the
batch the recipe's plan expects (q n patients x K patches), so no arm sees more data per step.
Learning rate: every arm alike searches ``--lr`` over ``LR_FACTORS`` x its base rate on seed 0
and keeps the best (with, for the non-private arms, last iterate or EMA, whichever is better:
the DP recipe arms serve the EMA, the old default the last iterate); seeds 1 and 2 run at the
choice. The choice is made on the test Dice of seed 0 for every arm alike (no separate
validation split at 12 patients a site). The public warm start: ``privseg train --public`` on
the embedded public cohort (:mod:`privseg.data.synth.public`: other seeds, other scanners, its
own raters), one per task; ``public_alone`` is its Dice on each site before any fine-tuning.

Compute (measured before the start on the shared 2-core machine, one torch thread, mri3d at 50
steps and 10 epochs: public start 118 s with the cohort; n = 12: np 72 s, old 69 s, recipe 122 s,
warm 95 s; n = 100: np 205 s, recipe 375 s). At the grid's 10 rounds x 10 steps and 20 epochs, measured
at n = 12: np 52 s, np_warm 60 s, old 76 s, recipe 112 s, warm 105 s; the n = 100 DP cells about 6x that.
451 cells (lr factors 9 and 27 added after the first cells), about 27 h at one process (13.5 h at two),
mri3d about half of it; the headline cells (first) about 6 h.

After the grid (appended last, so no earlier cell changed place or meaning), the **clip cells**:
the recipe with ``clip`` ``fixed`` and ``adaptive`` (``normalise`` is the recipe itself) at n = 12,
epsilon 8, every task, 3 seeds, at the lr the recipe chose on seed 0; ``clip_rule_choice`` picks the
rule with the best mean Dice over the tasks on seeds 1-2 (seed 0 chose normalise's lr).

After them (appended last too), the **LoRA cells** (issue 26, item 5: "LoRA if it pays"):
``warm_lora``, the warm arm fine-tuning rank-``LORA_RANK`` adapters on every convolution
(``--trainable lora``, :mod:`privseg.models.lora`; weights, biases and norms frozen) instead of every
weight, at n = 12, epsilon 8, every task, with the same budget, plan, clip and EMA as ``warm``, the
lr searched on seed 0 like every arm, then seeds 1-2 (21 cells, about the warm arm's time each).
Its ratio is against ``np_warm`` like the warm arm's; ``lora`` in the JSON gives it per task beside
its Dice minus the warm arm's (``--trainable all``).

Ratios: recipe / np and warm / np_warm (the non-private run of the same initialisation and
budget), means over seeds. Keys of results/privacy_utility.json as issue 26 lists them, computed
from whatever cells are done: ``key_basis`` (and ``ratio_basis`` for the indexed ratios) says
``complete`` or PARTIAL with the seeds and lr-search runs each rests on; ``met`` judges complete
keys only; ``partial`` gives done/total and the command to resume. ``--summary`` re-merges the
cells done (with this file's merge) without running any, beside a running grid.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall shared cores

import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import cells  # noqa: E402

BENCH = "privacy_utility"
VERSION = "privacy-utility-2"
TASKS = ("mri3d", "ct3d", "derm2d")
SIZES = {"mri3d": (12, 25, 50, 100), "ct3d": (12, 100), "derm2d": (12, 100)}
EPS = (8.0, 3.0)
SEEDS = (0, 1, 2)
DELTA = 1e-5
NP_ARMS = ("np", "np_warm")
DP_ARMS = ("old", "recipe", "warm")
LORA_ARM = "warm_lora"  # the LoRA cells' arm (appended after the clip cells)
WARM = {"np_warm", "warm", LORA_ARM}
LR_FACTORS = (1 / 3, 1.0, 3.0, 9.0, 27.0)  # 9 and 27 added: the recipe's first seed-0 cells peaked at the edge
RECIPE_CLIP = "normalise"  # Bu et al. 2023: no clip norm to tune
# the clip-rule comparison (appended after the grid): the recipe with each rule at n 12, epsilon 8, at the lr
# the recipe (normalise) chose on seed 0; normalise's own cells are the grid's recipe cells
CLIP_RULES = ("normalise", "fixed", "adaptive")
CLIP_N, CLIP_EPS = 12, 8.0
WARM_TRAINABLE = "all"
LORA_TRAINABLE, LORA_N, LORA_EPS = "lora", 12, 8.0
LORA_RANK = 4  # privseg's default rank (privseg.models.lora.LORA_RANK) when the cells were added; each cell names it
TARGETS = {"best_over_nonprivate_eps8_n12_3d": 0.85, "best_over_nonprivate_eps8_n100": 0.95,
           "best_over_nonprivate_eps3_n100": 0.90, "best_over_nonprivate_eps8_n12_derm2d": 0.95,
           "recipe_minus_old_default_eps8_n12": 0.15, "warm_gain_over_public_alone_eps8_n12": 0.0}
RESUME = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_utility.py --resume"
FIGURE = f"{BENCH}_ratio_vs_n.png"  # in benchmarks/results, beside the .md that shows it

FULL = {"rounds": 10, "local_steps": 10, "model": "unet_tiny", "patch3d": 16, "patch2d": 32, "lr": 5e-3,
        "test": 8, "size3d": 32, "size2d": 64, "epochs": 20.0, "aug_mult": 4, "ema": 0.99,
        "public_subjects": 40, "public_steps": 300, "sizes": SIZES}
SMOKE = {"rounds": 2, "local_steps": 2, "model": "unet_tiny", "patch3d": 16, "patch2d": 32, "lr": 5e-3,
         "test": 2, "size3d": 24, "size2d": 32, "epochs": 2.0, "aug_mult": 2, "ema": 0.9,
         "public_subjects": 3, "public_steps": 4, "sizes": {"mri3d": (12,), "ct3d": (12,), "derm2d": (12,)}}


def _lr_tag(f: float) -> str:
    return {1 / 3: "lo", 1.0: "mid", 3.0: "hi", 9.0: "vhi", 27.0: "vvhi"}[f]


def _factor(tag: str) -> float:
    return next(f for f in LR_FACTORS if _lr_tag(f) == tag)


def _name(task, n, arm, eps, lr, seed) -> str:
    return "-".join([task, f"n{n}", arm] + ([f"eps{eps:g}"] if eps else []) + [f"lr{lr}", f"seed{seed}"])


def make_cells(s: dict) -> list[cells.Cell]:
    """Public models first; then the headline (every task at n = 12 and mri3d at n = 100, epsilon 8,
    every arm, 3 seeds), then epsilon 3 there, then the other sizes. Within a group, seed 0's lr
    search before seeds 1-2 (which read its choice)."""
    sizes = s["sizes"]
    out = [cells.Cell(f"public-{t}", {"task": t, "kind": "public", **s}, cost=2.0) for t in TASKS]
    head = [(t, 12) for t in TASKS if 12 in sizes[t]] + [("mri3d", 100)] * (100 in sizes["mri3d"])
    rest = [(t, n) for t in TASKS for n in sizes[t] if (t, n) not in head]

    def group(pairs, eps_list, with_np):
        arms = [(a, None) for a in NP_ARMS if with_np] + [(a, e) for e in eps_list for a in DP_ARMS]
        for seeds, lrs in (((0,), [_lr_tag(f) for f in LR_FACTORS]), ((1, 2), ["best"])):
            for t, n in pairs:
                for arm, eps in arms:
                    for seed in seeds:
                        for lr in lrs:
                            # the old default takes 2 patients a step at any n; the others' batch grows with n
                            cost = 1.0 if arm == "old" else (n / 12) * (1.0 if arm in NP_ARMS else 2.0)
                            out.append(cells.Cell(_name(t, n, arm, eps, lr, seed),
                                                  {"task": t, "n": n, "arm": arm, "epsilon": eps, "lr_pick": lr,
                                                   "seed": seed, "kind": "run", **s}, cost=cost))

    group(head, [8.0], True)
    group(head, [3.0], False)
    group(rest, list(EPS), True)
    # appended last, so that no earlier cell changes place or meaning: the recipe with the other clip rules
    for t in TASKS:
        if CLIP_N not in sizes[t]:
            continue
        for rule in CLIP_RULES[1:]:
            for seed in SEEDS:
                out.append(cells.Cell(_clip_name(t, rule, seed),
                                      {"task": t, "n": CLIP_N, "arm": "recipe", "epsilon": CLIP_EPS, "lr_pick": "best",
                                       "seed": seed, "clip": rule, "kind": "clip", **s}, cost=2.0))
    # appended after them: the warm start fine-tuning LoRA adapters, seed 0's lr search then seeds 1-2
    for seeds, lrs in (((0,), [_lr_tag(f) for f in LR_FACTORS]), ((1, 2), ["best"])):
        for t in (t for t in TASKS if LORA_N in sizes[t]):
            for seed in seeds:
                for lr in lrs:
                    out.append(cells.Cell(_name(t, LORA_N, LORA_ARM, LORA_EPS, lr, seed),
                                          {"task": t, "n": LORA_N, "arm": LORA_ARM, "epsilon": LORA_EPS, "lr_pick": lr,
                                           "seed": seed, "kind": "run", "trainable": LORA_TRAINABLE,
                                           "lora_rank": LORA_RANK, **s}, cost=2.0))
    return out


def _clip_name(task: str, rule: str, seed: int) -> str:
    return f"{task}-n{CLIP_N}-recipe-clip{rule}-eps{CLIP_EPS:g}-lrbest-seed{seed}"


# -- cohorts and the public model ------------------------------------------------------

def _full_cohort(task: str, s: dict, shared: Path):
    from privseg.data import synth
    from privseg.data.cohort import MANIFEST_NAME, Cohort

    n_max = max(s["sizes"][task])
    per_site = n_max + s["test"]
    root = shared / f"{task}-{per_site}-{s['size3d']}-{s['size2d']}"
    if (root / MANIFEST_NAME).exists():
        return Cohort.from_manifest(root / MANIFEST_NAME)
    frac = s["test"] / per_site
    if task == "mri3d":
        return synth.synth_cohort(root, sites=3, subjects=per_site, size=s["size3d"], seed=0, test_fraction=frac)
    if task == "ct3d":
        return synth.synth_cohort(root, sites=3, subjects=per_site, size=s["size3d"], seed=1, test_fraction=frac,
                                  profiles=["CT"] * 3)
    return synth.synth_cohort_2d(root, sites=3, subjects=per_site, size=s["size2d"], kind="dermoscopy", seed=2,
                                 test_fraction=frac)


def _cohort(task: str, n: int, s: dict, shared: Path):
    """The task's cohort with the first ``n`` training patients of each site (the test set fixed)."""
    from dataclasses import replace

    from privseg.data.cohort import MANIFEST_NAME, Cohort

    full = _full_cohort(task, s, shared)
    path = shared / f"{task}-n{n}" / MANIFEST_NAME
    if path.exists():
        return Cohort.from_manifest(path)
    keep, count = [], {}
    for subj in sorted(full.subjects, key=lambda x: x.id):
        if subj.split == "train":
            count[subj.site] = count.get(subj.site, 0) + 1
            if count[subj.site] > n:
                continue
        keep.append(subj)
    if min(count.values()) < n:
        raise RuntimeError(f"{task}: a site has only {min(count.values())} training patients, {n} wanted")
    sub = replace(full, subjects=keep, root=full.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    sub.save(path)
    return Cohort.from_manifest(path)


def _kind(task: str) -> str:
    return {"mri3d": "volume", "ct3d": "ct", "derm2d": "dermoscopy"}[task]


def _base_config(cohort, p: dict, **kw):
    from privseg.cohorts import train_config

    patch = p["patch3d"] if cohort.spatial_dims == 3 else p["patch2d"]
    return train_config(cohort, patch=patch, model=p["model"], device="cpu", **kw)


def _public_path(shared: Path, task: str) -> Path:
    return shared / f"public-{task}" / "last.pt"


def run_public(cell: cells.Cell, shared: Path) -> dict:
    """The public warm start of a task and its Dice on each site's test patients (``public_alone``)."""
    from privseg.train.inference import evaluate_checkpoint
    from privseg.train.warm_start import train_public

    p = cell.params
    cohort = _cohort(p["task"], min(p["sizes"][p["task"]]), p, shared)
    size = p["size3d"] if cohort.spatial_dims == 3 else p["size2d"]
    cfg = _base_config(cohort, p, steps=p["public_steps"], lr=p["lr"], seed=0, subjects_per_step=4,
                       patches_per_subject=2)
    out = _public_path(shared, p["task"]).parent
    shutil.rmtree(out, ignore_errors=True)
    ckpt = train_public(_kind(p["task"]), out, cfg, subjects=p["public_subjects"], size=size,
                        seed=TASKS.index(p["task"]))
    ev = evaluate_checkpoint(ckpt, cohort, "test")["summary"]
    return {"public_alone": {s: m["mean_dice"] for s, m in ev["sites"].items()},
            "dice": float(np.mean([m["mean_dice"] for m in ev["sites"].values()]))}


# -- one training run --------------------------------------------------------------------

def _variants(arm: str) -> tuple[str, ...]:
    """Which served model an arm may pick: DP recipe arms serve the EMA, the old default the last
    iterate; the non-private arms the better of the two (chosen on seed 0 with the lr)."""
    return {"np": ("last", "ema"), "np_warm": ("last", "ema"), "old": ("last",)}.get(arm, ("ema",))


def _pick(cells_dir: Path, p: dict) -> tuple[float, str]:
    """Seed 0's best (lr factor, served variant) for this arm."""
    best = None
    for f in LR_FACTORS:
        m = cells.metrics_of(cells_dir, _name(p["task"], p["n"], p["arm"], p["epsilon"], _lr_tag(f), 0))
        for v in _variants(p["arm"]):
            if best is None or m[f"dice_{v}"] > best[0]:
                best = (m[f"dice_{v}"], f, v)
    return best[1], best[2]


def _plan_batch(p: dict) -> tuple[int, float]:
    """(steps, the recipe's expected patients per step q n) -- the batch every arm but ``old`` takes."""
    from privseg.privacy.plan import plan_training

    steps = p["rounds"] * p["local_steps"]
    tp = plan_training(8.0, DELTA, p["n"], steps=steps, epochs=p["epochs"])
    return steps, tp.expected_batch


def _configs(cohort, p: dict, lr: float, shared: Path):
    from privseg.privacy import DPConfig

    steps, batch = _plan_batch(p)
    arm = p["arm"]
    init = str(_public_path(shared, p["task"])) if arm in WARM else None
    kw = {"steps": steps, "lr": lr, "seed": p["seed"], "init": init,
          "trainable": p.get("trainable", WARM_TRAINABLE if arm in WARM else "all")}
    if "lora_rank" in p:  # the LoRA cells
        kw["lora_rank"] = p["lora_rank"]
    dp = None
    if arm == "old":
        kw.update(subjects_per_step=2, patches_per_subject=2)
        dp = DPConfig(epsilon=p["epsilon"], delta=DELTA, clip="fixed", clip_norm=1.0, plan="none", aug_mult=2, ema=0,
                      erasure_reserve=0)  # as it was before issue 26 (and 27's reserve)
    elif arm in ("recipe", "warm", LORA_ARM):
        kw.update(subjects_per_step=max(1, round(batch)), patches_per_subject=p["aug_mult"])
        dp = DPConfig(epsilon=p["epsilon"], delta=DELTA, clip=p.get("clip", RECIPE_CLIP), plan="auto",
                      cohort_size=p["n"], epochs=p["epochs"], aug_mult=p["aug_mult"], ema=p["ema"])
    else:  # non-private: the recipe's batch, so every arm sees the same data per step
        kw.update(subjects_per_step=max(1, round(batch)), patches_per_subject=p["aug_mult"])
    return _base_config(cohort, p, **kw), dp


def _served(state, p: dict, run_dir: Path) -> dict:
    """Checkpoints of the last iterate and of the EMA (the server's, or computed post hoc)."""
    from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, training_weights
    from privseg.train.ema import write_ema_checkpoint

    last_path = state.checkpoint_path(p["rounds"])
    payload = load_checkpoint(last_path)
    if "ema" in payload:  # the server serves the EMA: "model" is it, "train_model" the last iterate
        model = model_from_checkpoint(payload, last_path)
        model.load_state_dict(training_weights(payload))
        out = {"ema": last_path, "last": save_checkpoint(run_dir / "last_iterate.pt", model, config=payload["config"],
                                                        step=payload["step"])}
        return out
    paths = [state.checkpoint_path(r) for r in range(p["rounds"] + 1)]
    ema = write_ema_checkpoint(paths, run_dir / "global_ema.pt", p["ema"], steps_each=p["local_steps"])
    return {"last": last_path, "ema": ema}


def run_train(cell: cells.Cell, work: Path, shared: Path, cells_dir: Path) -> dict:
    import torch

    from privseg.federated import sites_from_cohort
    from privseg.federated.assemble import fl_config
    from privseg.federated.runstate import RunState
    from privseg.federated.simulation import simulate_inprocess
    from privseg.privacy import BudgetLedger, find_ledgers
    from privseg.privacy.plan import plan_for
    from privseg.train.inference import evaluate_checkpoint
    from privseg.train.warm_start import write_start

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    p = cell.params
    if p["arm"] in WARM and not _public_path(shared, p["task"]).exists():
        raise RuntimeError(f"{cell.name}: the public model of {p['task']} is missing; run --cells public-{p['task']}")
    factor, variants = ((_factor(p["lr_pick"]), _variants(p["arm"]))
                        if p["lr_pick"] != "best" else (lambda fv: (fv[0], (fv[1],)))(_pick(cells_dir, p)))
    cohort = _cohort(p["task"], p["n"], p, shared)
    tc, dp = _configs(cohort, p, p["lr"] * factor, shared)
    sites = sites_from_cohort(cohort.root)
    cfg = fl_config(sites=sites, train=tc, name="u", rounds=p["rounds"], local_steps=p["local_steps"],
                    eval_every=p["rounds"], dp=dp)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted cell starts again (its budget is fresh too)
    if tc.init:  # round 0 is the warm start (the server starts from round 0's checkpoint when there is one)
        write_start(tc, RunState(run_dir).checkpoint_path(0))
    state = simulate_inprocess(cfg, run_dir)
    if len(state.rounds) != p["rounds"]:
        raise RuntimeError(f"{cell.name}: stopped after {len(state.rounds)} of {p['rounds']} rounds")
    out = {"lr_factor": factor, "lr": tc.lr, "variant": variants[0] if p["lr_pick"] == "best" else None,
           "counts": {s.id: len([x for x in cohort.subjects if x.site == s.id and x.split == "train"]) for s in sites}}
    for v, path in _served(state, p, run_dir).items():
        ev = evaluate_checkpoint(path, cohort, "test")["summary"]
        out[f"site_dice_{v}"] = {s: m["mean_dice"] for s, m in ev["sites"].items()}
        out[f"dice_{v}"] = float(np.mean(list(out[f"site_dice_{v}"].values())))
    out["dice"] = max(out[f"dice_{v}"] for v in variants)
    if dp is not None:  # the DP result counts only under secret-key noise with every release accounted
        rows = [r for path in find_ledgers(run_dir) for r in BudgetLedger(path).status()]
        out["private"] = all(r["private"] for r in rows)
        out["epsilon_ledger"] = {r["site"]: r["epsilon_spent"] for r in rows}
        out["clip"] = dp.clip
        if dp.plan == "auto":
            out["plan"] = plan_for(dp, sites[0].id, tc.steps, tc.lr, local_steps=p["local_steps"]).to_dict()
    shutil.rmtree(run_dir, ignore_errors=True)  # weights and ledgers are not kept
    return out


def run_cell(cell: cells.Cell, work: Path, shared: Path, cells_dir: Path) -> dict:
    if cell.params["kind"] == "public":
        return run_public(cell, shared)
    return run_train(cell, work, shared, cells_dir)  # kind "run" or "clip" (the recipe with another clip rule)


# -- merge ------------------------------------------------------------------------------

def _means(done: dict) -> dict:
    """(task, n, arm, eps) -> Dice over the seeds done so far at the chosen lr (seed 0: the best run of its
    lr search so far), with what it rests on: ``seeds`` done, ``lr_searched`` (of ``len(LR_FACTORS)``), the
    seed-0 ``lr_factor`` and ``complete`` (the lr search and every seed done)."""
    by: dict = {}
    for rec in done.values():
        p, m = rec["params"], rec["metrics"]
        if p["kind"] != "run":
            continue
        cur = by.setdefault((p["task"], p["n"], p["arm"], p["epsilon"]), {"seeds": {}, "lr": {}})
        if p["lr_pick"] == "best":
            cur["seeds"][p["seed"]] = m["dice"]
        else:
            cur["lr"][_factor(p["lr_pick"])] = m["dice"]
    out = {}
    for key, r in by.items():
        if not r["lr"]:  # seeds 1-2 run only after seed 0's search: not reached here
            continue
        factor = max(r["lr"], key=r["lr"].get)
        seeds = {0: r["lr"][factor], **r["seeds"]}
        vals = list(seeds.values())
        out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": len(vals),
                    "by_seed": {str(k): v for k, v in sorted(seeds.items())},
                    "lr_searched": len(r["lr"]), "lr_factor": factor,
                    "complete": len(r["lr"]) == len(LR_FACTORS) and len(vals) == len(SEEDS)}
    return out


def _basis(*ms: dict | None) -> str:
    """What a figure computed from the means ``ms`` rests on, in words: ``complete``, ``missing`` (none of
    them), or PARTIAL with the fewest seeds and lr-search runs among them and how many are not there yet."""
    got = [m for m in ms if m is not None]
    if not got:
        return "missing"
    if len(got) == len(ms) and all(m["complete"] for m in got):
        return "complete"
    lack = len(ms) - len(got)
    return (f"PARTIAL: {min(m['seeds'] for m in got)} of {len(SEEDS)} seeds, lr search "
            f"{min(m['lr_searched'] for m in got)}/{len(LR_FACTORS)}" + (f", {lack} of {len(ms)} arm-means missing"
                                                                        if lack else ""))


def clip_rule_choice(done: dict, means: dict) -> dict:
    """The clip rule the benchmark picks for the recipe (issue 26, item 4): mean Dice at n = CLIP_N, epsilon
    CLIP_EPS over the tasks, each rule at the lr the recipe (normalise) chose on seed 0. The pick is made on
    seeds 1-2 (normalise's lr was chosen on its own seed 0, which would favour it); 3-seed means beside."""
    per: dict = {t: {r: {} for r in CLIP_RULES} for t in TASKS}
    for rec in done.values():
        p = rec["params"]
        if p["kind"] == "clip":
            per[p["task"]][p["clip"]][p["seed"]] = rec["metrics"]["dice"]
    for t in TASKS:  # normalise is the recipe itself: the grid's cells
        m = means.get((t, CLIP_N, "recipe", CLIP_EPS))
        if m is not None and m["lr_searched"] == len(LR_FACTORS):
            per[t]["normalise"] = {int(s): v for s, v in m["by_seed"].items()}
    table = {t: {r: {"seed_0": d.get(0),  # the same seed and lr for every rule (normalise's lr chosen on it)
                     "mean_3_seeds": float(np.mean(list(d.values()))) if len(d) == len(SEEDS) else None,
                     "mean_seeds_1_2": float(np.mean([d[s] for s in SEEDS[1:]])) if all(s in d for s in SEEDS[1:])
                     else None, "seeds": sorted(d)} for r, d in rules.items()} for t, rules in per.items()}
    held_out = {r: [table[t][r]["mean_seeds_1_2"] for t in TASKS] for r in CLIP_RULES}
    means_12 = {r: float(np.mean(v)) if all(x is not None for x in v) else None for r, v in held_out.items()}
    complete = all(v is not None for v in means_12.values())
    return {"best": max(means_12, key=means_12.get) if complete else None, "complete": complete,
            "mean_over_tasks_seeds_1_2": means_12, "per_task": table,
            "basis": f"recipe at n {CLIP_N}, epsilon {CLIP_EPS:g}, the 3 tasks, the lr the recipe chose on seed 0; "
                     "picked on seeds 1-2 (held out from the lr choice)"}


def lora_arm(means: dict) -> dict:
    """The LoRA cells against the warm arm (issue 26, item 5): per task at n = LORA_N, epsilon LORA_EPS, the
    LoRA arm's Dice, its ratio to np_warm (as the warm arm's) and its Dice minus the warm arm's (``--trainable
    all``), with what they rest on; ``pays`` (mean difference over the tasks > 0) only when all are complete."""
    per = {}
    for t in TASKS:
        lo, warm, base = (means.get((t, LORA_N, a, e)) for a, e in ((LORA_ARM, LORA_EPS), ("warm", LORA_EPS),
                                                                    ("np_warm", None)))
        per[t] = {"dice": lo["mean"] if lo else None,
                  "over_nonprivate": lo["mean"] / base["mean"] if lo and base and base["mean"] else None,
                  "warm_dice": warm["mean"] if warm else None,
                  "minus_warm": lo["mean"] - warm["mean"] if lo and warm else None, "basis": _basis(lo, warm, base)}
    diffs = [v["minus_warm"] for v in per.values()]
    mean_diff = float(np.mean(diffs)) if all(d is not None for d in diffs) else None
    complete = all(v["basis"] == "complete" for v in per.values())
    return {"arm": LORA_ARM, "trainable": LORA_TRAINABLE, "rank": LORA_RANK, "n": LORA_N, "epsilon": LORA_EPS,
            "per_task": per, "mean_minus_warm": mean_diff, "pays": mean_diff > 0 if complete else None}


def merge(done: dict, total: int | None = None) -> dict:
    """The summary of the cells done so far: every key of issue 26, computed from what exists, with
    ``key_basis`` saying what each rests on (``complete`` or PARTIAL with seeds and lr search) and
    ``met`` given only for complete keys. ``total``: the cells of the whole grid (for ``partial``)."""
    means = _means(done)
    sizes = {t: sorted({k[1] for k in means if k[0] == t}) for t in TASKS}

    def mean(t, n, arm, e):
        return means.get((t, n, arm, e))

    def ratio(t, n, arm, e):
        """(Dice / non-private Dice of the same initialisation, the two means) or (None, ...)."""
        d, base = mean(t, n, arm, e), mean(t, n, "np_warm" if arm in ("warm", LORA_ARM) else "np", None)
        return (d["mean"] / base["mean"] if d and base and base["mean"] else None), (d, base)

    rec_over, warm_over, ratio_basis = {}, {}, {}
    for t in TASKS:
        for n in sizes[t]:
            for e in EPS:
                for arm, table in (("recipe", rec_over), ("warm", warm_over)):
                    v, ms = ratio(t, n, arm, e)
                    table.setdefault(t, {}).setdefault(str(n), {})[f"{e:g}"] = v
                    ratio_basis.setdefault(arm, {}).setdefault(t, {}).setdefault(str(n), {})[f"{e:g}"] = _basis(*ms)

    def best(t, n, e):
        """The better of the two new arms' ratios, with the means it rests on."""
        got = [(v, ms) for v, ms in (ratio(t, n, "recipe", e), ratio(t, n, "warm", e)) if v is not None]
        if not got:
            return None, [None]
        v = max(x[0] for x in got)
        missing = [None] * (2 - len(got))
        return v, [m for x in got for m in x[1]] + missing

    def min_over(tasks, n, e):
        got = [best(t, n, e) for t in tasks]
        vals = [v for v, _ in got if v is not None]
        return (min(vals) if vals else None), [m for _, ms in got for m in ms]

    def mean_over_tasks(diff):
        got = [diff(t) for t in TASKS]
        vals = [v for v, _ in got if v is not None]
        return (float(np.mean(vals)) if vals else None), [m for _, ms in got for m in ms]

    public = {r["params"]["task"]: r["metrics"]["public_alone"] for r in done.values()
              if r["params"]["kind"] == "public"}

    def recipe_minus_old(t):
        a, b = mean(t, 12, "recipe", 8.0), mean(t, 12, "old", 8.0)
        return (a["mean"] - b["mean"] if a and b else None), [a, b]

    def warm_gain(t):
        a = mean(t, 12, "warm", 8.0)
        ok = a is not None and t in public
        return (a["mean"] - float(np.mean(list(public[t].values()))) if ok else None), [a if t in public else None]

    found = {
        "best_over_nonprivate_eps8_n12_3d": min_over(("mri3d", "ct3d"), 12, 8.0),
        "best_over_nonprivate_eps8_n100": min_over(TASKS, 100, 8.0),
        "best_over_nonprivate_eps3_n100": min_over(TASKS, 100, 3.0),
        "best_over_nonprivate_eps8_n12_derm2d": best("derm2d", 12, 8.0),
        "recipe_minus_old_default_eps8_n12": mean_over_tasks(recipe_minus_old),
        "warm_gain_over_public_alone_eps8_n12": mean_over_tasks(warm_gain),
    }
    keys = {k: v for k, (v, _) in found.items()}
    basis = {k: _basis(*ms) if v is not None else "missing" for k, (v, ms) in found.items()}
    is_complete = total is not None and len(done) == total
    return {
        **keys, "key_basis": basis, "recipe_over_nonprivate": rec_over, "warm_over_nonprivate": warm_over,
        "ratio_basis": ratio_basis, "public_alone": public, "targets": TARGETS,
        "met": {k: (v > TARGETS[k] if k.startswith("warm_gain") else v >= TARGETS[k]) if basis[k] == "complete"
                else None for k, v in keys.items()},
        "clip_rule_choice": clip_rule_choice(done, means), "lora": lora_arm(means),
        "partial": False if is_complete else {"done": len(done), "total": total, "resume": RESUME},
        "resume": RESUME, "delta": DELTA, "recipe_clip": RECIPE_CLIP, "warm_trainable": WARM_TRAINABLE,
        "lr_factors": list(LR_FACTORS), "base_lr": FULL["lr"],
        "rows": [{"task": t, "n": n, "arm": a, "epsilon": e, **v} for (t, n, a, e), v in sorted(
            means.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0))],
    }


def plot(out: dict, path: Path) -> bool:
    """The figure of issue 26: Dice ratio (DP arm / non-private of the same start) against training patients
    per site, one line per arm and epsilon, a panel per task; hollow markers rest on PARTIAL cells. Returns
    whether anything was drawn (no file otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.2), squeeze=False)
    drawn = False
    for ax, task in zip(axes[0], TASKS, strict=True):
        for key, arm in (("recipe_over_nonprivate", "recipe"), ("warm_over_nonprivate", "warm")):
            for e in EPS:
                pts = sorted((int(n), v[f"{e:g}"], out["ratio_basis"][arm][task][n][f"{e:g}"] == "complete")
                             for n, v in out[key].get(task, {}).items() if v[f"{e:g}"] is not None)
                if not pts:
                    continue
                xs, ys, full = zip(*pts, strict=True)
                line = ax.plot(xs, ys, ls="-" if arm == "recipe" else "--", label=f"{arm}, eps {e:g}")[0]
                for x, y, f in pts:
                    ax.plot([x], [y], marker="o", color=line.get_color(), mfc=line.get_color() if f else "none")
                drawn = True
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training patients per site")
        ax.set_ylabel("Dice / non-private Dice")
        ax.set_title(task + ("" if out.get("partial") is False else " (PARTIAL)"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if drawn:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def render(out: dict, done: dict, results: Path | None = None) -> list[str]:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    part = out["partial"]
    status = "complete" if part is False else (f"PARTIAL ({part['done']}/{part['total']} cells): resume with "
                                               f"`{RESUME}`")
    md = [f"Status: {status}. Every key is computed from the cells done so far; `basis` says what it rests on "
          "(complete: the lr search and 3 seeds of every cell it needs; PARTIAL: seeds and lr-search runs done; "
          "a seed-0 figure is the best of its lr search so far, chosen on the same test Dice, so it flatters). "
          "A target is judged only on complete keys.", "",
          "| key | measured | target | basis |", "|---|---|---|---|"]
    for k, t in TARGETS.items():
        md.append(f"| {k} | {f(out.get(k))} | {'>' if k.startswith('warm_gain') else '>='} {t:g} | "
                  f"{out['key_basis'][k]} |")
    alone = "; ".join(f"{t}: " + ", ".join(f"{s} {v:.3f}" for s, v in d.items())
                      for t, d in out["public_alone"].items())
    md += ["", f"public_alone (the public warm start's Dice on each site, before fine-tuning): {alone or '-'}", "",
           "Dice ratio to non-private (recipe / np, warm / np_warm), by task, patients per site and epsilon:", "",
           "| task | n/site | epsilon | recipe_over_nonprivate | warm_over_nonprivate | basis (recipe; warm) |",
           "|---|---|---|---|---|---|"]
    for t, by_n in out["recipe_over_nonprivate"].items():
        for n, by_e in by_n.items():
            for e, v in by_e.items():
                w = out["warm_over_nonprivate"][t][n][e]
                if v is None and w is None:
                    continue
                b = out["ratio_basis"]
                md.append(f"| {t} | {n} | {e} | {f(v)} | {f(w)} | {b['recipe'][t][n][e]}; {b['warm'][t][n][e]} |")
    clip = out["clip_rule_choice"]
    md += ["", f"clip_rule_choice: **{clip['best'] or '- (cells missing)'}** ({clip['basis']}).", "",
           "| task | " + " | ".join(f"{r}: seed 0 / seeds 1-2 / 3 seeds" for r in CLIP_RULES) + " |",
           "|---|" + "---|" * len(CLIP_RULES)]
    for t, rules in clip["per_task"].items():
        md.append(f"| {t} | " + " | ".join(f"{f(v['seed_0'])} / {f(v['mean_seeds_1_2'])} / {f(v['mean_3_seeds'])}"
                                           for v in rules.values()) + " |")
    md += ["| mean over tasks | " + " | ".join(f"- / {f(v)} / -" for v in clip["mean_over_tasks_seeds_1_2"].values())
           + " |", "", f"Base lr {out['base_lr']:g}, searched x {', '.join(f'{x:.3g}' for x in out['lr_factors'])} "
           "on seed 0 (the DP arms' optimiser runs at it x the plan's lr scale).", "",
           "| task | n/site | arm | epsilon | Dice (mean ± std over seeds) | seeds | lr factor (searched) |",
           "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
        md.append(f"| {r['task']} | {r['n']} | {r['arm']} | {eps} | {r['mean']:.3f} ± {r['std']:.3f} | {r['seeds']} "
                  f"| {r['lr_factor']:.3g} ({r['lr_searched']}/{len(LR_FACTORS)}) |")
    lo = out["lora"]
    md += ["", f"LoRA (`{lo['arm']}`: the public warm start fine-tuning rank-{lo['rank']} adapters on every "
           f"convolution, `--trainable {lo['trainable']}`, n {lo['n']}, epsilon {lo['epsilon']:g}; ratio against "
           f"np_warm as the warm arm's). Pays (mean over tasks of LoRA minus warm > 0): "
           f"{'- (not complete)' if lo['pays'] is None else lo['pays']}.", "",
           "| task | LoRA Dice | LoRA / np_warm | warm (all) Dice | LoRA minus warm | basis (LoRA, warm, np_warm) |",
           "|---|---|---|---|---|---|"]
    md += [f"| {t} | {f(v['dice'])} | {f(v['over_nonprivate'])} | {f(v['warm_dice'])} | {f(v['minus_warm'])} | "
           f"{v['basis']} |" for t, v in lo["per_task"].items() if v["dice"] is not None]
    if results is not None and plot(out, results / FIGURE):
        md += ["", f"![Dice ratio vs patients per site]({FIGURE})", "",
               f"`{FIGURE}`: Dice ratio against training patients per site, one line per arm and epsilon; hollow "
               "markers rest on PARTIAL cells."]
    return md


def main(argv: list[str] | None = None) -> int:
    args = cells.parse(__doc__, BENCH, argv)
    setting = SMOKE if args.smoke else FULL
    shared = cells.shared_dir(args, BENCH)
    results, cells_dir = args.results, args.runs / BENCH / "cells"
    grid = make_cells(setting)
    return cells.run(BENCH, VERSION, grid, lambda c, w: run_cell(c, w, shared, cells_dir),
                     lambda d: merge(d, len(grid)), lambda o, d: render(o, d, results), args, argv)


if __name__ == "__main__":
    sys.exit(main())
