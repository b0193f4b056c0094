"""Benchmark (issue 6, the study's comparison): utility of patient-level DP in a federation, as cells.

    OMP_NUM_THREADS=1 python benchmarks/privacy_utility.py [--resume] [--cells a,b] [--list] [--smoke]

(``benchmarks/privacy.py --parts utility`` is this benchmark.) Three tasks, 3 sites each,
federated (privseg's Flower ServerApp/ClientApp, in-process round loop): ``mri3d`` (the embedded
power cohort, T1/T1/T1-5mm scanners), ``ct3d`` (the same anatomy, CT at every site), ``derm2d``
(2D dermoscopy, three cameras). Arms, each at epsilon in {1, 3, 8}, delta 1e-5, 3 seeds:

* ``nonprivate``;
* ``fixed`` clip at C in {0.1, 0.3, 1, 3}: C = 1 is the common default; the best C in hindsight
  (highest mean Dice over seeds, per task and epsilon) is the second fixed arm (Andrew et al. 2021
  compare against it);
* ``adaptive`` clip (private quantile tracking, Andrew et al. 2021), starting at C = 1.

Dice = mean over sites of the mean foreground Dice on each site's held-out patients; mean +- std
over seeds. Keys: ``adaptive_minus_fixed`` (per epsilon: mean over tasks of adaptive - fixed C=1,
Dice points; the headline is epsilon 3 against the default C = 1), ``adaptive_minus_best_fixed``
(per epsilon), ``adaptive_over_nonprivate_eps8`` (mean over tasks of adaptive / non-private at
epsilon 8). Targets: >= +0.05 at epsilon 3; >= 0.95; within 0.02 of the best fixed C.
Writes results/privacy_utility.{json,md} and privacy_utility_dice_vs_eps.png (one panel per task).
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
VERSION = "privacy-utility-1"
TASKS = ("mri3d", "ct3d", "derm2d")
EPS = (1.0, 3.0, 8.0)
CLIPS = (0.1, 0.3, 1.0, 3.0)  # the fixed-clip grid; 1.0 is the default arm
DEFAULT_C = 1.0
SEEDS = (0, 1, 2)
DELTA = 1e-5

FULL = {"rounds": 20, "local_steps": 10, "model": "unet_tiny", "patch3d": 24, "patch2d": 48, "lr": 5e-3,
        "subjects": 16, "size3d": 32, "size2d": 64}
SMOKE = {"rounds": 2, "local_steps": 2, "model": "unet_tiny", "patch3d": 16, "patch2d": 32, "lr": 5e-3,
         "subjects": 4, "size3d": 24, "size2d": 32}


def _name(task: str, arm: str, eps: float | None, clip: float | None, seed: int) -> str:
    parts = [task, arm] + ([f"C{clip:g}"] if clip is not None else []) + ([f"eps{eps:g}"] if eps else [])
    return "-".join(parts + [f"seed{seed}"])


def make_cells(s: dict) -> list[cells.Cell]:
    """Ordered so the headline (epsilon 3, adaptive vs C = 1) lands first, the grid's other C last."""
    out = []

    def add(task, arm, eps, clip, seed, cost):
        out.append(cells.Cell(_name(task, arm, eps, clip, seed),
                              {"task": task, "arm": arm, "epsilon": eps, "clip": clip, "seed": seed, **s}, cost=cost))

    for seed in SEEDS:
        for task in TASKS:
            add(task, "nonprivate", None, None, seed, 1.0)
    for eps in (3.0, 8.0, 1.0):
        for seed in SEEDS:
            for task in TASKS:
                add(task, "adaptive", eps, None, seed, 2.0)  # per-patient gradients: about twice a plain step
                add(task, "fixed", eps, DEFAULT_C, seed, 2.0)
    for eps in (3.0, 8.0, 1.0):
        for clip in CLIPS:
            if clip != DEFAULT_C:
                for seed in SEEDS:
                    for task in TASKS:
                        add(task, "fixed", eps, clip, seed, 2.0)
    return out


def _cohort(task: str, s: dict, shared: Path):
    from privseg.data import synth
    from privseg.data.cohort import MANIFEST_NAME, Cohort

    root = shared / f"{task}-{s['subjects']}-{s['size3d']}-{s['size2d']}"
    if (root / MANIFEST_NAME).exists():
        return Cohort.from_manifest(root / MANIFEST_NAME)
    full = s["subjects"] >= 16
    if task == "mri3d":
        return synth.power_cohort(root, sites=3, subjects=s["subjects"], size=s["size3d"], seed=0, check=full)
    if task == "ct3d":
        return synth.power_cohort(root, sites=3, subjects=s["subjects"], size=s["size3d"], seed=1, check=full,
                                  profiles=["CT"] * 3)
    return synth.synth_cohort_2d(root, sites=3, subjects=s["subjects"], size=s["size2d"], kind="dermoscopy", seed=2,
                                 test_fraction=synth.POWER_TEST_FRACTION)


def run_cell(cell: cells.Cell, work: Path, shared: Path) -> dict:
    import torch

    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.simulation import simulate_inprocess
    from privseg.privacy import DPConfig
    from privseg.train import TrainConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the runner reports progress per cell
    p = cell.params
    cohort = _cohort(p["task"], p, shared)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    dims = info["spatial_dims"]
    patch = p["patch3d"] if dims == 3 else p["patch2d"]
    extra = {}
    if p["arm"] != "nonprivate":
        extra["dp"] = DPConfig(epsilon=p["epsilon"], delta=DELTA, clip=p["arm"],
                               clip_norm=p["clip"] if p["arm"] == "fixed" else DEFAULT_C).to_dict()
    tc = TrainConfig(model=p["model"], patch_size=(patch,) * dims, device="cpu", seed=p["seed"], subjects_per_step=2,
                     patches_per_subject=2, lr=p["lr"], steps=p["rounds"] * p["local_steps"],
                     in_channels=len(info["channels"]), num_classes=len(info["classes"]), spatial_dims=dims,
                     extra=extra)
    cfg = FLConfig(name="u", sites=sites, train=tc, rounds=p["rounds"], local_steps=p["local_steps"],
                   eval_every=p["rounds"])
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted cell starts again (its budget is fresh too)
    state = simulate_inprocess(cfg, run_dir)
    last = state.rounds[-1]
    if len(state.rounds) != p["rounds"] or "eval" not in last:
        raise RuntimeError(f"{cell.name}: stopped after {len(state.rounds)} of {p['rounds']} rounds "
                           f"(status {getattr(state, 'status', '?')})")
    out = {"dice": float(last["eval"]["overall"]["site-mean-dice"]),
           "site_dice": {s: m["mean-dice"] for s, m in last["eval"]["sites"].items()},
           "epsilon_spent": {s: m.get("dp-epsilon") for s, m in last["train"].items()},
           "counts": info["counts"]}
    if extra:  # the DP result counts only under secret-key noise with every release accounted
        from privseg.privacy import BudgetLedger, find_ledgers

        out["private"] = all(r["private"] for path in find_ledgers(run_dir) for r in BudgetLedger(path).status())
        out["epsilon_ledger"] = {r["site"]: r["epsilon_spent"] for path in find_ledgers(run_dir)
                                 for r in BudgetLedger(path).status()}
    shutil.rmtree(run_dir, ignore_errors=True)  # weights and ledgers are not kept
    return out


# -- merge ------------------------------------------------------------------------------

def _arm_rows(done: dict) -> dict:
    """(task, arm key, eps) -> {"mean", "std", "seeds"}; arm key is nonprivate / adaptive / fixed@C."""
    groups: dict = {}
    for rec in done.values():
        p = rec["params"]
        key = p["arm"] if p["arm"] != "fixed" else f"fixed@{p['clip']:g}"
        groups.setdefault((p["task"], key, p["epsilon"]), []).append(rec["metrics"]["dice"])
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v)} for k, v in groups.items()}


def merge(done: dict) -> dict:
    rows = _arm_rows(done)

    def full(task, key, eps):
        r = rows.get((task, key, eps))
        return r["mean"] if r and r["seeds"] == len(SEEDS) else None

    best_fixed, a_minus_f, a_minus_best = {}, {}, {}
    for eps in EPS:
        diffs, diffs_best = [], []
        for task in TASKS:
            grid = {c: full(task, f"fixed@{c:g}", eps) for c in CLIPS}
            if all(v is not None for v in grid.values()):
                c = max(grid, key=grid.get)
                best_fixed[f"{task}@{eps:g}"] = {"clip": c, "dice": grid[c]}
            a, f = full(task, "adaptive", eps), grid[DEFAULT_C]
            if a is not None and f is not None:
                diffs.append(a - f)
            if a is not None and f"{task}@{eps:g}" in best_fixed:
                diffs_best.append(a - best_fixed[f"{task}@{eps:g}"]["dice"])
        # a mean over tasks only once every task has all its seeds: never a partial mean
        a_minus_f[f"{eps:g}"] = float(np.mean(diffs)) if len(diffs) == len(TASKS) else None
        a_minus_best[f"{eps:g}"] = float(np.mean(diffs_best)) if len(diffs_best) == len(TASKS) else None
    ratios = []
    for task in TASKS:
        a, n = full(task, "adaptive", 8.0), full(task, "nonprivate", None)
        if a is not None and n:
            ratios.append(a / n)
    over = float(np.mean(ratios)) if len(ratios) == len(TASKS) else None
    head = a_minus_f["3"]
    return {
        "adaptive_minus_fixed": a_minus_f, "adaptive_minus_fixed_eps3": head,
        "adaptive_minus_best_fixed": a_minus_best, "adaptive_over_nonprivate_eps8": over,
        "headline": "adaptive_minus_fixed at epsilon 3 against the default fixed clip C = 1; the best C in "
                    "hindsight (grid " + ", ".join(f"{c:g}" for c in CLIPS) + ") is adaptive_minus_best_fixed",
        "targets": {"adaptive_minus_fixed_eps3": 0.05, "adaptive_over_nonprivate_eps8": 0.95,
                    "abs_adaptive_minus_best_fixed": 0.02},
        "met": {"adaptive_minus_fixed_eps3": None if head is None else head >= 0.05,
                "adaptive_over_nonprivate_eps8": None if over is None else over >= 0.95,
                "abs_adaptive_minus_best_fixed": {e: None if v is None else abs(v) <= 0.02
                                                  for e, v in a_minus_best.items()}},
        "best_fixed": best_fixed, "delta": DELTA,
        "rows": [{"task": t, "arm": k, "epsilon": e, **v} for (t, k, e), v in sorted(
            rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))],
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in out["rows"])]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rs = [r for r in out["rows"] if r["task"] == task]
        for key, label in (("adaptive", "adaptive clip"), (f"fixed@{DEFAULT_C:g}", f"fixed C={DEFAULT_C:g}")):
            pts = sorted((r["epsilon"], r["mean"], r["std"]) for r in rs if r["arm"] == key)
            if pts:
                e, m, s = zip(*pts, strict=True)
                ax.errorbar(e, m, yerr=s, marker="o", capsize=3, label=label)
        best = sorted((float(k.split("@")[1]), v["dice"]) for k, v in out["best_fixed"].items()
                      if k.startswith(task + "@"))
        if best:
            ax.plot(*zip(*best, strict=True), "s--", label="fixed, best C in hindsight")
        for r in rs:
            if r["arm"] == "nonprivate":
                ax.axhline(r["mean"], color="k", ls="--", label="non-private")
        ax.set_xscale("log")
        ax.set_xticks(EPS, [f"{e:g}" for e in EPS])  # plain 1, 3, 8 (no overlapping 10^x labels)
        ax.minorticks_off()
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_ylabel("mean Dice (held-out)")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: dict, done: dict, results: Path | None = None) -> list[str]:
    def f(v, pct=False):
        return "-" if v is None else (f"{v:.3f}" if pct else f"{v:+.3f}")

    md = [f"Headline: {out['headline']}.", "",
          "| key | " + " | ".join(f"eps {e:g}" for e in EPS) + " |", "|---|" + "---|" * len(EPS),
          "| adaptive_minus_fixed (C=1) | " + " | ".join(f(out["adaptive_minus_fixed"][f"{e:g}"]) for e in EPS) + " |",
          "| adaptive_minus_best_fixed | " + " | ".join(f(out["adaptive_minus_best_fixed"][f"{e:g}"]) for e in EPS)
          + " |", "", f"adaptive_over_nonprivate_eps8: {f(out['adaptive_over_nonprivate_eps8'], True)} "
          "(target >= 0.95); targets: adaptive - fixed >= +0.05 at eps 3, |adaptive - best fixed| <= 0.02. "
          "A mean over tasks is given only once every task has all its seeds.", "",
          "| task | arm | epsilon | seeds | Dice (mean ± std) |", "|---|---|---|---|---|"]
    for r in out["rows"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
        md.append(f"| {r['task']} | {r['arm']} | {eps} | {r['seeds']} | {r['mean']:.3f} ± {r['std']:.3f} |")
    if results is not None:
        plot(out, results / f"{BENCH}_dice_vs_eps.png")
        md += ["", f"![Dice vs epsilon]({BENCH}_dice_vs_eps.png)"]
    return md


def main(argv: list[str] | None = None) -> int:
    args = cells.parse(__doc__, BENCH, argv)
    setting = SMOKE if args.smoke else FULL
    shared = cells.shared_dir(args, BENCH)
    results = args.results
    return cells.run(BENCH, VERSION, make_cells(setting), lambda c, w: run_cell(c, w, shared), merge,
                     lambda o, d: render(o, d, results), args, argv)


if __name__ == "__main__":
    sys.exit(main())
