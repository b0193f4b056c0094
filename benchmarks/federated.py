"""Benchmark (issue 5): federated training across sites with scanner shift, as resumable cells.

    OMP_NUM_THREADS=1 python benchmarks/federated.py [--resume] [--cells a,b] [--list] [--smoke]

Cohort: the embedded power federation (:func:`privseg.data.synth.power_cohort`: 16 patients per
site at 32^3, 12 of them training and 4 never seen per site), 3 and 5 sites, each its own
scanner profile (T1 3T, T1 1.5T, T1 5 mm slices, T2, FLAIR). Per number of sites and seed:

* ``local``: each site trains alone for rounds x local_steps steps; Dice on its own held-out patients;
* ``pooled``: one model on every site's training patients with the federation's total compute
  (sites x rounds x local_steps steps); also the membership power check of that model
  (all training vs all never-seen patients, and the null control);
* ``fedavg`` / ``fedprox`` (mu 0.01) / ``fedbn``: Flower's Ray simulation, rounds x local_steps;
  Dice of the final global model (FedBN: with each site's own normalisation layers).
* ``fedavg+pers`` / ``fedbn+pers`` (issue 29): the same federation with ``VAL_PATIENTS`` of each
  site's training patients moved to a validation split (pinned split file), then
  :func:`privseg.federated.personalise.personalise`: ``finetune`` (at most ``pers_epochs``
  epochs, stopped on validation) and ``local`` (local-only, rounds x local_steps steps: the same
  budget as every arm), and the per-site guard serving the best of global / finetune / local on
  validation. The cell records each candidate's and the served model's test Dice per site, so the
  local-only baseline of the gain keys has exactly the training patients of the personalised model.
* ``fedavg+all`` / ``fedbn+all``: the same federation again (same seed, split and settings), then
  ``finetune``, ``ditto`` (lambda ``ditto_lambda``) and ``head`` (FedRep-style per-site decoder),
  and the guard over global / finetune / ditto / head / local. The local-only candidate (its
  validation and test Dice) is read from the ``+pers`` cell of the same sites and seed: that model
  depends only on the seed's initial model, the split and the seed, not on the federation, so it
  is not trained twice (the ``+pers`` cell must be done first; it comes first in the cell list).
  The cell also keeps the ``+pers`` cell's global test Dice beside its own, a check that the
  federation ran the same.

Step budget (the same for every arm): each site's data is trained on for rounds x local_steps =
200 steps of 2 patients x 2 patches (local-only, each site in a federation; pooled: sites x 200
steps on the pooled patients). Personalisation adds to the federation's 200, per site and
method (finetune, ditto, head), at most pers_epochs x ceil(10 training patients / 2) = 15 steps,
stopped earlier by validation: at most 7.5 % more than the federation each.

Dice = mean foreground Dice on each site's held-out (test) patients; mean +- std over seeds.
``overhead`` = Flower orchestration / local compute: (wall time of rounds 2..R) / (local
train + eval + data-loading time of those rounds, timed inside the ClientApps) - 1, median over
the federated cells; the Ray start-up (simulation wall time before round 2 minus round 1's local
compute) is reported beside it. ``many-<n>`` cells run n tiny sites for the peak memory of the
whole process tree (driver + Ray). Non-DP only.

Top-level keys: ``gap_to_pooled`` (pooled mean Dice - best federated strategy's mean Dice, Dice
points, the larger of the 3- and 5-site gaps), ``overhead``, ``ray_startup_s``, ``sites_100_ok``,
``sites_100_peak_rss_mb``. Targets: gap <= 0.03; overhead <= 0.10; 100 sites without OOM.
Personalisation keys (issue 29), for the best complete personalised arm (highest mean served Dice
over both federations; ``personalisation_partial`` when no arm is complete yet and the keys come
from the cells there are), each also given by arm: ``min_site_gain_over_local`` (worst site's served Dice minus
its local-only Dice, mean over seeds, over both federations; target >= 0.0),
``gap_to_pooled_personalised`` (pooled mean minus the arm's mean served Dice, worst of 3 and 5
sites; target <= 0.01), ``mean_gain_over_local`` (5 sites, mean served minus mean local-only;
target >= 0.03); per site and arm, Dice mean +- std in ``table`` (rows ``<arm>``: served,
``<arm>:<candidate>``: each candidate).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make torch far slower when other processes share the
# cores; passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import cells  # noqa: E402

VERSION = "federated-2"  # bump when a change makes old cells incomparable
SITES = (3, 5)
METHODS = ("local", "pooled", "fedavg", "fedprox", "fedbn", "fedavg+pers", "fedbn+pers", "fedbn+all", "fedavg+all")
STRATEGIES = ("fedavg", "fedprox", "fedbn")
# <strategy>+<kind>: that federation, then these personalisation methods and the guard (``+all`` adds
# the ``+pers`` cell's local-only candidate; module docstring)
ARM_METHODS = {"pers": ("finetune", "local"), "all": ("finetune", "ditto", "head")}
PERSONALISED = tuple(m for m in METHODS if "+" in m)
VAL_PATIENTS = 2  # of each site's training patients, the validation split the guard chooses on
SEEDS = (0, 1, 2)
MANY = (20, 100)

# The real setting, and a smoke setting that only checks the pipeline end to end (never merged
# into benchmarks/results: --smoke writes to a temporary folder).
FULL = {"rounds": 20, "local_steps": 10, "model": "unet_tiny", "patch": 24, "lr": 3e-3, "mu": 0.01,
        "size": 32, "subjects": 16, "many_rounds": 2, "mia_views": 2, "pers_epochs": 3, "ditto_lambda": 100.0}
SMOKE = {"rounds": 2, "local_steps": 2, "model": "unet_tiny", "patch": 16, "lr": 3e-3, "mu": 0.01,
         "size": 24, "subjects": 6, "many_rounds": 1, "mia_views": 1, "pers_epochs": 1, "ditto_lambda": 100.0}
PERS_ONLY = {"pers_epochs": PERSONALISED, "ditto_lambda": tuple(m for m in METHODS if m.endswith("+all"))}


# -- memory of the whole process tree (driver + Ray) -----------------------------------

def _tree_rss_mb(root: int) -> float:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as fh:
                rss[int(d)] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total / 2**20


class PeakMemory:
    """Samples the RSS of this process and all its descendants (Ray's raylet, GCS, workers)."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mb(os.getpid()))
            self._stop.wait(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _tree_rss_mb(os.getpid()))


# -- cells ------------------------------------------------------------------------------

def make_cells(s: dict) -> list[cells.Cell]:
    out = []
    for n in SITES:
        for seed in SEEDS:
            for m in METHODS:
                # relative cost: every method trains sites x rounds x local steps; Ray adds start-up
                own = {k: v for k, v in s.items() if m in PERS_ONLY.get(k, (m,))}  # old cells stay valid
                out.append(cells.Cell(f"s{n}-{m}-seed{seed}", {"sites": n, "method": m, "seed": seed, **own},
                                      cost=n * (1.3 if m in STRATEGIES else 2.5 if m.endswith("+pers")
                                                else 1.6 if m in PERSONALISED else 1.0)))
    for n in MANY:
        out.append(cells.Cell(f"many-{n}", {"many": n, "rounds": s["many_rounds"]}, cost=n / 10))
    return out


def _cohort(n_sites: int, s: dict, shared: Path):
    """The cohort of an n-site setting, built once and reused by every cell (deterministic)."""
    from privseg.data.cohort import MANIFEST_NAME, Cohort
    from privseg.data.synth import power_cohort

    root = shared / f"cohort-s{n_sites}-{s['size']}-{s['subjects']}"
    if (root / MANIFEST_NAME).exists():
        return Cohort.from_manifest(root / MANIFEST_NAME)
    return power_cohort(root, sites=n_sites, subjects=s["subjects"], size=s["size"], seed=0,
                        check=s["subjects"] >= 16)


def _train_config(p: dict, info: dict):
    from privseg.train import TrainConfig

    return TrainConfig(model=p["model"], norm="group", patch_size=(p["patch"],) * 3, subjects_per_step=2,
                       patches_per_subject=2, lr=p["lr"], seed=p["seed"], device="cpu",
                       in_channels=len(info["channels"]), num_classes=len(info["classes"]))


def _train_eval(cohort, subjects, cfg, steps: int, eval_sites: list[str]):
    from privseg.data.transforms import load_preprocessed
    from privseg.train import evaluate_subjects, summarise, train_steps
    from privseg.train.loop import make_optimizer
    from privseg.utils import seed_everything

    seed_everything(cfg.seed)
    model = cfg.build_model()
    opt = make_optimizer(model, cfg)
    items = load_preprocessed(subjects, cohort, cfg.spacing)
    t0 = time.perf_counter()
    train_steps(model, opt, items, replace(cfg, steps=steps), start=0, stop=steps)
    train_s = time.perf_counter() - t0
    dice = {}
    for site in eval_sites:
        test = load_preprocessed(cohort.select("test", site), cohort, cfg.spacing)
        dice[site] = summarise(evaluate_subjects(model, test, cfg.patch_size, cfg.num_classes))["overall"]["mean_dice"]
    return model, items, dice, train_s


def run_cell(cell: cells.Cell, work: Path, shared: Path, cells_dir: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    p = cell.params
    if "many" in p:
        return many_sites(p["many"], p["rounds"], work)
    from privseg.federated import check_sites, sites_from_cohort

    cohort = _cohort(p["sites"], p, shared)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = _train_config(p, info)
    steps = p["rounds"] * p["local_steps"]
    m = p["method"]
    if m == "local":
        dice, train_s = {}, 0.0
        for site in cohort.sites:
            _, _, d, t = _train_eval(cohort, cohort.select("train", site), tc, steps, [site])
            dice.update(d)
            train_s += t
        return {"dice": dice, "train_s": train_s, "counts": info["counts"]}
    if m == "pooled":
        model, items, dice, train_s = _train_eval(cohort, cohort.select("train"), tc, steps * len(cohort.sites),
                                                  cohort.sites)
        return {"dice": dice, "train_s": train_s, "counts": info["counts"],
                "membership": _power(model, items, cohort, tc, p)}
    if m in PERSONALISED:
        return personalised_cell(cohort, sites, info, tc, p, work, cells_dir)
    from privseg.federated.assemble import fl_config
    from privseg.federated.simulation import simulate

    cfg = fl_config(sites=sites, train=tc, name=f"{m}{p['sites']}", strategy=m, rounds=p["rounds"],
                    local_steps=p["local_steps"], proximal_mu=p["mu"], eval_every=p["rounds"])
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a cell interrupted mid-way starts again from scratch
    t0 = time.perf_counter()
    state = simulate(cfg, run_dir, cpus_per_client=1, ray_cpus=1)
    wall = time.perf_counter() - t0
    rounds = state.rounds
    if len(rounds) != p["rounds"]:
        raise RuntimeError(f"{cell.name}: {len(rounds)} of {p['rounds']} rounds finished")

    def compute(entry) -> float:
        c = sum(x["compute-s"] + x["load-s"] for x in entry["train"].values())
        if entry.get("eval"):
            c += sum(x["compute-s"] + x["load-s"] for x in entry["eval"]["sites"].values())
        return c

    later_wall = sum(e["wall_s"] for e in rounds[1:])
    later_compute = sum(compute(e) for e in rounds[1:])
    startup = wall - later_wall - compute(rounds[0])
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights are not kept
    return {"dice": {s: x["mean-dice"] for s, x in rounds[-1]["eval"]["sites"].items()}, "wall_s": wall,
            "local_compute_s": sum(compute(e) for e in rounds), "overhead": later_wall / later_compute - 1,
            "ray_startup_s": startup, "counts": info["counts"]}


def with_val_split(cohort, sites, out_dir: Path, n_val: int) -> list:
    """The sites with a pinned split moving ``n_val`` of each site's training patients (the first by ID) to val."""
    from privseg.data.cohort import write_splits

    moved = {sid for site in cohort.sites for sid in sorted(s.id for s in cohort.select("train", site))[:n_val]}
    subjects = [replace(s, split="val") if s.id in moved else s for s in cohort.subjects]
    path = write_splits(cohort, out_dir, subjects)
    return [replace(spec, splits=str(path)) for spec in sites]


def personalised_cell(cohort, sites, info, tc, p: dict, work: Path, cells_dir: Path) -> dict:
    """A federation with a validation split, then personalisation and the per-site guard."""
    from privseg.federated.assemble import fl_config
    from privseg.federated.personalise import choose, personalise
    from privseg.federated.simulation import simulate

    shutil.rmtree(work, ignore_errors=True)  # a cell interrupted mid-way starts again from scratch
    work.mkdir(parents=True)
    strategy, kind = p["method"].split("+")
    cfg = fl_config(sites=with_val_split(cohort, sites, work, VAL_PATIENTS), train=tc,
                    name=f"{p['method']}{p['sites']}".replace("+", "-"), strategy=strategy, rounds=p["rounds"],
                    local_steps=p["local_steps"], proximal_mu=p["mu"], eval_every=0)
    t0 = time.perf_counter()
    simulate(cfg, work / "run", cpus_per_client=1, ray_cpus=1)
    fl_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = personalise(work / "run", methods=ARM_METHODS[kind], epochs=p["pers_epochs"],
                      ditto_lambda=p.get("ditto_lambda", 0.0))["sites"]
    pers_s = time.perf_counter() - t0
    shutil.rmtree(work / "run", ignore_errors=True)  # weights are not kept
    val = {s: r["val_dice"] for s, r in res.items()}
    test = {s: r["test_dice"] for s, r in res.items()}
    serves = {s: r["serves"] for s, r in res.items()}
    extra = {}
    if kind == "all":  # the local-only candidate of the +pers cell (the same model: module docstring)
        pers = cells.metrics_of(cells_dir, f"s{p['sites']}-{strategy}+pers-seed{p['seed']}")
        for s in res:
            val[s]["local"], test[s]["local"] = pers["val_dice"][s]["local"], pers["candidates"][s]["local"]
            serves[s] = choose(val[s])
        extra["pers_cell_global"] = {s: pers["candidates"][s]["global"] for s in res}
    return {"dice": {s: test[s][serves[s]] for s in res}, "candidates": test, "serves": serves, "val_dice": val,
            **{m: {s: r["methods"][m] for s, r in res.items()} for m in ARM_METHODS[kind] if m != "local"},
            "fl_s": fl_s, "personalise_s": pers_s, "counts": info["counts"], **extra}


def _power(model, train_items, cohort, tc, p: dict) -> dict:
    """Membership AUC of all training vs all never-seen patients and the null control."""
    from privseg.audit.mia import PowerCheckError, power_check_model
    from privseg.data.transforms import load_preprocessed

    never = load_preprocessed(cohort.select("test"), cohort, tc.spacing)
    try:
        return power_check_model(model, train_items, never, tc.patch_size, tc.num_classes, views=p["mia_views"],
                                 seed=p["seed"], min_members=1, min_nonmembers=2)
    except PowerCheckError as exc:  # recorded, not fatal: the Dice of this cell still counts
        return {**exc.result, "error": str(exc)}


def many_sites(n: int, rounds: int, work: Path) -> dict:
    from privseg.data.synth import synth_cohort
    from privseg.federated import SiteSpec
    from privseg.federated.assemble import fl_config
    from privseg.federated.simulation import simulate
    from privseg.train import TrainConfig

    # the embedded cohort has at most 99 sites, so bigger federations combine several cohorts
    sites, left, part = [], n, 0
    shutil.rmtree(work, ignore_errors=True)
    while left > 0:
        k = min(50, left)
        cohort = synth_cohort(work / f"many{n}_{part}", sites=k, subjects=2, size=16, seed=part, test_fraction=0.0)
        sites += [SiteSpec(id=f"P{part}{s}", cohort=str(cohort.root), cohort_site=s) for s in cohort.sites]
        left, part = left - k, part + 1
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), subjects_per_step=1, patches_per_subject=2,
                     device="cpu", in_channels=1, num_classes=cohort.num_classes)
    cfg = fl_config(sites=sites, train=tc, name=f"many{n}", strategy="fedavg", rounds=rounds, local_steps=1,
                    eval_every=0, cache_sites=2)
    t0 = time.perf_counter()
    ok, error = True, None
    with PeakMemory() as mem:
        try:
            state = simulate(cfg, work / "run", cpus_per_client=1, ray_cpus=1)
            ok = state.rounds_done == rounds and all(len(e["participants"]) == n for e in state.rounds)
        except Exception as exc:  # noqa: BLE001 - recorded in the result
            ok, error = False, f"{type(exc).__name__}: {exc}"
    shutil.rmtree(work, ignore_errors=True)
    return {"sites": n, "rounds": rounds, "ok": ok, "error": error, "peak_rss_mb": mem.peak,
            "seconds": time.perf_counter() - t0}


# -- merge and report -------------------------------------------------------------------

def _ms(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def merge(done: dict) -> dict:
    table: dict = {}
    for n in SITES:
        for m in METHODS:
            recs = [done[f"s{n}-{m}-seed{s}"]["metrics"] for s in SEEDS if f"s{n}-{m}-seed{s}" in done]
            if not recs:
                continue
            sites = sorted(recs[0]["dice"])
            row = {"seeds": len(recs), "sites": {}}
            for site in sites:
                mean, std = _ms([r["dice"][site] for r in recs])
                row["sites"][site] = {"mean": mean, "std": std}
            row["mean_dice"], row["mean_dice_std"] = _ms([np.mean(list(r["dice"].values())) for r in recs])
            if m in STRATEGIES:
                row["overhead"] = float(np.median([r["overhead"] for r in recs]))
                row["ray_startup_s"] = float(np.median([r["ray_startup_s"] for r in recs]))
            if m == "pooled":
                row["membership"] = [r.get("membership") for r in recs]
            table.setdefault(str(n), {})[m] = row
            if m in PERSONALISED:  # each candidate of the guard as a row of its own, and what each site serves
                row["serves"] = {site: [r["serves"][site] for r in recs] for site in sites}
                for cand in recs[0]["candidates"][sites[0]]:
                    table[str(n)][f"{m}:{cand}"] = {
                        "seeds": len(recs), "sites": {site: dict(zip(("mean", "std"), _ms(
                            [r["candidates"][site][cand] for r in recs]), strict=True)) for site in sites},
                        **dict(zip(("mean_dice", "mean_dice_std"), _ms(
                            [np.mean([r["candidates"][x][cand] for x in sites]) for r in recs]), strict=True))}
    out: dict = {"table": table}
    gaps, best = {}, {}
    for n, rows in table.items():
        fed = {m: rows[m]["mean_dice"] for m in STRATEGIES if m in rows and rows[m]["seeds"] == len(SEEDS)}
        if "pooled" in rows and rows["pooled"]["seeds"] == len(SEEDS) and len(fed) == len(STRATEGIES):
            best[n] = max(fed, key=fed.get)
            gaps[n] = rows["pooled"]["mean_dice"] - fed[best[n]]
    fed_recs = [r["metrics"] for k, r in done.items() if any(f"-{m}-" in k for m in STRATEGIES)]
    many = {k: r["metrics"] for k, r in done.items() if k.startswith("many-")}
    out["gap_to_pooled"] = max(gaps.values()) if len(gaps) == len(SITES) else None
    out["gap_by_sites"], out["best_strategy"] = gaps, best
    out["overhead"] = float(np.median([r["overhead"] for r in fed_recs])) if fed_recs else None
    out["ray_startup_s"] = float(np.median([r["ray_startup_s"] for r in fed_recs])) if fed_recs else None
    hundred = many.get("many-100")
    out["sites_100_ok"] = hundred["ok"] if hundred else None
    out["sites_100_peak_rss_mb"] = hundred["peak_rss_mb"] if hundred else None
    out["many_sites"] = many
    power = [x for n in table for x in table[n].get("pooled", {}).get("membership", []) if x]
    if power:  # every JSON that reports a membership AUC carries the power check and its null control
        out["membership_power"] = {"member_auc": [x["member_auc"] for x in power],
                                   "null_auc": [x["null_auc"] for x in power],
                                   "passed": [x["passed"] for x in power]}
    out.update(personalisation_keys(table))
    out["targets"] = {"gap_to_pooled": 0.03, "overhead": 0.10, "sites_100_ok": True, "min_site_gain_over_local": 0.0,
                      "gap_to_pooled_personalised": 0.01, "mean_gain_over_local": 0.03}
    out["overhead_definition"] = ("wall time of rounds 2..R / in-client train+eval+load time of those rounds - 1 "
                                  "(Ray simulation, 1 CPU); ray_startup_s = wall before round 2 - round 1's compute")
    return out


def personalisation_keys(table: dict) -> dict:
    """Issue 29's keys per personalised arm and for the best of them. An arm is complete with every
    seed at 3 and 5 sites; an incomplete one gets its keys from the cells there are, marked
    ``partial`` (with the seeds per number of sites), and the top-level keys come from a partial
    arm only when no arm is complete (``personalisation_partial``)."""
    by_arm: dict = {}
    for arm in PERSONALISED:
        rows = {n: table[str(n)] for n in SITES if arm in table.get(str(n), {}) and "pooled" in table[str(n)]}
        if not rows:
            continue
        gains = {f"{n}:{site}": r[arm]["sites"][site]["mean"] - r[f"{arm}:local"]["sites"][site]["mean"]
                 for n, r in rows.items() for site in r[arm]["sites"]}
        five = rows.get(SITES[-1])
        seeds = {str(n): r[arm]["seeds"] for n, r in rows.items()}
        by_arm[arm] = {"min_site_gain_over_local": min(gains.values()), "gain_by_site": gains,
                       "gap_to_pooled_personalised": max(r["pooled"]["mean_dice"] - r[arm]["mean_dice"]
                                                         for r in rows.values()),
                       "mean_gain_over_local": five[arm]["mean_dice"] - five[f"{arm}:local"]["mean_dice"]
                       if five else None,
                       "mean_served_dice": float(np.mean([r[arm]["mean_dice"] for r in rows.values()])),
                       "seeds": seeds,
                       "partial": len(seeds) < len(SITES) or any(k < len(SEEDS) for k in seeds.values())}
    complete = [a for a in by_arm if not by_arm[a]["partial"]]
    pool = complete or list(by_arm)
    best = max(pool, key=lambda a: by_arm[a]["mean_served_dice"]) if pool else None
    keys = ("min_site_gain_over_local", "gap_to_pooled_personalised", "mean_gain_over_local")
    return {**{k: by_arm[best][k] if best else None for k in keys}, "best_personalised_arm": best,
            "personalisation_partial": bool(best and by_arm[best]["partial"]), "personalisation_by_arm": by_arm}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:+.3f}"


def render(out: dict, done: dict) -> list[str]:
    p = next(iter(done.values()))["params"]
    md = []
    if "rounds" in p:
        md += [f"{p['rounds']} rounds x {p['local_steps']} local steps, model {p['model']}, patch {p['patch']}^3, "
               f"embedded power cohort {p['size']}^3 with {p['subjects']} patients per site (a quarter held out); "
               "Dice = mean foreground Dice on each site's held-out patients, mean ± std over seeds; "
               "Flower Ray simulation with 1 CPU, one torch thread.", ""]
    md += [f"**gap_to_pooled** {_fmt(out['gap_to_pooled'])} (target <= 0.03; by sites: "
           + ", ".join(f"{n}: {g:+.3f} ({out['best_strategy'][n]})" for n, g in out["gap_by_sites"].items()) + "); "
           f"**overhead** {_fmt(out['overhead'])} (target <= 0.10) beside a Ray start-up of "
           + ("-" if out["ray_startup_s"] is None else f"{out['ray_startup_s']:.0f} s")
           + f"; **sites_100_ok** {out['sites_100_ok']}"
           + ("" if out["sites_100_peak_rss_mb"] is None else f" (peak {out['sites_100_peak_rss_mb']:.0f} MiB)"), "",
           f"Personalisation (best arm {out.get('best_personalised_arm')}): **min_site_gain_over_local** "
           f"{_fmt(out.get('min_site_gain_over_local'))} (target >= 0.0); **gap_to_pooled_personalised** "
           f"{_fmt(out.get('gap_to_pooled_personalised'))} (target <= 0.01); **mean_gain_over_local** (5 sites) "
           f"{_fmt(out.get('mean_gain_over_local'))} (target >= 0.03); step budget: rounds x local steps per site "
           "for every arm (local-only included), plus at most pers_epochs epochs per site for each of finetune, "
           "ditto and head (stopped on validation). Rows `<arm>`: the model each site serves; `<arm>:<candidate>`: "
           "each candidate of the guard.", ""]
    if out.get("personalisation_partial"):
        md.append("**Partial**: no personalised arm has every seed at 3 and 5 sites yet; the keys above are from "
                  "the cells there are.")
    for arm, k in out.get("personalisation_by_arm", {}).items():
        md.append(f"- {arm}{' (partial: seeds ' + str(k['seeds']) + ')' if k['partial'] else ''}: "
                  f"min_site_gain_over_local {_fmt(k['min_site_gain_over_local'])}, gap_to_pooled_personalised "
                  f"{_fmt(k['gap_to_pooled_personalised'])}, mean_gain_over_local (5 sites) "
                  f"{_fmt(k['mean_gain_over_local'])}, mean served Dice {k['mean_served_dice']:.3f}")
    md.append("")
    for n, rows in out["table"].items():
        sites = sorted({s for r in rows.values() for s in r["sites"]})
        md += [f"## {n} sites", "", "| method | seeds | " + " | ".join(sites) + " | mean | overhead | Ray start-up s |",
               "|---|---|" + "---|" * (len(sites) + 3)]
        for m, r in rows.items():
            cells_ = [f"{r['sites'][s]['mean']:.3f} ± {r['sites'][s]['std']:.3f}" if s in r["sites"] else "-"
                      for s in sites]
            oh = f"{r['overhead']:+.1%}" if "overhead" in r else ""
            st = f"{r['ray_startup_s']:.0f}" if "ray_startup_s" in r else ""
            md.append(f"| {m} | {r['seeds']} | " + " | ".join(cells_)
                      + f" | {r['mean_dice']:.3f} ± {r['mean_dice_std']:.3f} | {oh} | {st} |")
        md.append("")
    if "membership_power" in out:
        mp = out["membership_power"]
        md += ["Membership power of the pooled models (all training vs all never-seen patients; null control = "
               "two random halves of the never-seen): member AUC "
               + ", ".join(f"{a:.3f}" for a in mp["member_auc"]) + "; null AUC "
               + ", ".join(f"{a:.3f}" for a in mp["null_auc"]) + "; passed " + ", ".join(map(str, mp["passed"])), ""]
    if out["many_sites"]:
        md += ["## Many small sites (memory)", "", "| sites | rounds | ok | peak RSS MiB (driver + Ray) | seconds |",
               "|---|---|---|---|---|"]
        md += [f"| {m['sites']} | {m['rounds']} | {m['ok']} | {m['peak_rss_mb']:.0f} | {m['seconds']:.0f} |"
               for m in out["many_sites"].values()]
    return md


def main(argv: list[str] | None = None) -> int:
    args = cells.parse(__doc__, "federated", argv)
    setting = SMOKE if args.smoke else FULL
    shared = cells.shared_dir(args, "federated")
    cell_list = make_cells(setting)
    cells_dir = args.runs / "federated" / "cells"
    if args.smoke:  # the 100-site memory cell is a real measurement, not a smoke check
        cell_list = [c for c in cell_list if c.name != "many-100"]
    return cells.run("federated", VERSION, cell_list, lambda c, w: run_cell(c, w, shared, cells_dir), merge, render,
                     args, argv)


if __name__ == "__main__":
    sys.exit(main())
