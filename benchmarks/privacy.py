"""Benchmark for issue #6: DP step speed, utility vs epsilon, accounting check, empirical audit.

    python benchmarks/privacy.py --quick                 # minutes on 2 CPUs
    python benchmarks/privacy.py --parts speed,accounting,audit,flower
    python benchmarks/privacy.py                          # everything, full sizes (hours)

Writes benchmarks/results/privacy.json (top-level: dp_step_ratio, adaptive_minus_fixed,
adaptive_over_nonprivate_eps8, accountant_rel_error, plus full tables) and privacy.md,
and benchmarks/results/privacy_dice_vs_eps.png when the utility part ran.

1. speed: DP step time / non-private step time, same model, same batch (2 subjects x 2
   patches), per-subject gradients by ``loop`` / ``vmap`` / ``opacus``; unet (3D) and resnet10
   (group norm); CPU.
2. utility: 3 tasks (3D MRI embedded cohort, 3D CT-like cohort, 2D dermoscopy), 3 sites each,
   federated (in-process Flower round loop, privseg's ServerApp/ClientApp) non-private vs
   patient-level DP with fixed clip vs adaptive clip, at each epsilon; mean Dice over sites on
   held-out subjects; mean +- std over seeds.
3. accounting: privseg's ε vs Google dp-accounting for the same (q, sigma, steps) sequence.
4. audit: canary patients + a loss-threshold membership test over many DP trainings ->
   empirical ε lower bound (Clopper-Pearson, 95 %), compared with the accounted ε.
5. flower: Flower 1.41's adaptive-clipping update rule (counts clipped) vs Andrew et al. (counts unclipped).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


# -- 1. speed ---------------------------------------------------------------------------

def bench_speed(quick: bool) -> dict:
    from privseg.models import build_model
    from privseg.privacy import PatientDPSGD, SampledBatch
    from privseg.train.loop import standard_step
    from privseg.train.losses import SegLoss

    side = 32 if quick else 64
    reps = 3 if quick else 5
    rows = []
    for name in ("unet", "resnet10"):
        torch.manual_seed(0)
        model = build_model(name, in_channels=1, num_classes=4, spatial_dims=3, norm="group")
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        loss_fn = SegLoss()
        x = torch.randn(4, 1, side, side, side)
        y = torch.randint(0, 4, (4, 1, side, side, side))
        owner = torch.tensor([0, 0, 1, 1])

        def timed(fn):
            fn()  # warm-up
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        base = timed(lambda: standard_step(model, opt, loss_fn, x, y, owner))  # noqa: B023
        row = {"model": name, "patch": side, "batch": "2 subjects x 2 patches", "nonprivate_s": base}
        for method in ("loop", "vmap", "opacus"):
            eng = PatientDPSGD(q=0.5, n_subjects=4, multipliers=[1.0] * 1000, clip_norm=1.0, adaptive=True,
                               method=method)
            try:
                # the baseline's tensors as this step's sample (q = 1 here): the same compute, timed alone
                t = timed(lambda: eng.step(model, opt, loss_fn,  # noqa: B023
                                           SampledBatch(id(eng), eng.step_no, x, y, owner, 2)))  # noqa: B023
                row[f"{method}_s"], row[f"{method}_ratio"] = t, t / base
            except Exception as exc:  # noqa: BLE001 - report, don't die
                row[f"{method}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"speed {name} {side}^3: non-private {base:.3f} s; " + ", ".join(
            f"{m} {row.get(f'{m}_ratio', float('nan')):.2f}x" for m in ("loop", "vmap", "opacus")), flush=True)
    best = max(min(r.get(f"{m}_ratio", math.inf) for m in ("loop", "vmap", "opacus")) for r in rows)
    return {"rows": rows, "dp_step_ratio": best, "threads": torch.get_num_threads()}


# -- 3. accounting ----------------------------------------------------------------------

def bench_accounting() -> dict:
    from privseg.privacy import StepEvent, epsilon, epsilon_dp_accounting, schedule_multipliers
    from privseg.privacy.accountant import calibrate_sigma, events_for

    cases = {
        "constant q=0.1 z=1.1 T=500": [StepEvent(0.1, 1.1, 500)],
        "decay schedule q=0.2 (10 levels) T=200": events_for(0.2, schedule_multipliers(1.5, 200, "decay")),
        "mixed rounds q=0.05/0.1/1.0": [StepEvent(0.05, 1.2, 100), StepEvent(0.1, 0.9, 40), StepEvent(1.0, 4.0, 3)],
        "calibrated eps=8 q=0.25 T=100": [StepEvent(0.25, calibrate_sigma(8, 1e-5, 0.25, 100), 100)],
    }
    rows, worst = [], 0.0
    for label, ev in cases.items():
        for delta in (1e-5, 1e-3):
            a, b = epsilon(ev, delta), epsilon_dp_accounting(ev, delta)
            rel = abs(a - b) / b
            worst = max(worst, rel)
            rows.append({"case": label, "delta": delta, "privseg_eps": a, "dp_accounting_eps": b, "rel_error": rel})
    print(f"accounting: worst relative error vs dp-accounting {worst:.2e}", flush=True)
    return {"rows": rows, "accountant_rel_error": worst}


# -- 5. Flower's adaptive clipping rule --------------------------------------------------

def bench_flower() -> dict:
    from privseg.privacy import QuantileClipper
    from privseg.privacy.client_dp import flower_adaptive_clip_trace

    rng = np.random.default_rng(0)
    norms = rng.lognormal(0.0, 0.5, size=10000)
    median = float(np.median(norms))
    flwr = flower_adaptive_clip_trace(norms, rounds=200, clip=1.0)
    ours = QuantileClipper(clip=1.0, target_quantile=0.5, lr=0.2, expected_m=10, sigma_b=0.5,
                           generator=torch.Generator().manual_seed(0))
    for _ in range(200):
        ours.update(rng.choice(norms, 10))
    out = {"true_median": median, "flower_clip_after_200": flwr[-1], "privseg_clip_after_200": ours.clip,
           "flower_counts": "clipped (norm_bit = scaling_factor < 1)", "privseg_counts": "unclipped"}
    print(f"flower adaptive rule: C -> {flwr[-1]:.3g} (true median {median:.3g}); privseg: C -> {ours.clip:.3g}",
          flush=True)
    return out


# -- 4. audit ---------------------------------------------------------------------------

def bench_audit(quick: bool) -> dict:
    """The empirical audit (white-box gradient canary; secret-key vs public-seed noise): see
    ``benchmarks/dp_audit.py``, which this part runs at accounted ε = 1 and 4."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dp_audit

    cells = [dp_audit.run(100 if quick else 400, eps, 1e-5) for eps in (1.0, 4.0)]
    return {"cells": cells, "holds": all(c["holds"] for c in cells),
            "leak_caught": all(c["leak_caught"] for c in cells)}


# -- 2. utility ---------------------------------------------------------------------------

def _make_task(task: str, root: Path, quick: bool):
    from privseg.data import synth

    if task == "mri3d":
        return synth.synth_cohort(root / task, sites=3, subjects=6 if quick else 10, size=32 if quick else 64,
                                  seed=0, test_fraction=0.34)
    if task == "ct3d":
        return synth.synth_cohort(root / task, sites=3, subjects=6 if quick else 10, size=32 if quick else 64,
                                  seed=1, profiles=["CT"] * 3, test_fraction=0.34)
    return synth.synth_cohort_2d(root / task, sites=3, subjects=6 if quick else 12, kind="dermoscopy", seed=2,
                                 test_fraction=0.34)


def _fl_dice(cohort, method: str, eps: float | None, seed: int, run_dir: Path, quick: bool) -> tuple[float, dict]:
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.simulation import simulate_inprocess
    from privseg.privacy import DPConfig
    from privseg.train import TrainConfig

    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    dims = info["spatial_dims"]
    rounds, local = (4, 5) if quick else (20, 10)
    patch = (16 if quick else 32) if dims == 3 else (32 if quick else 64)
    extra = {}
    if method != "nonprivate":
        extra["dp"] = DPConfig(epsilon=eps, delta=1e-3, clip="fixed" if method == "fixed" else "adaptive",
                               clip_norm=1.0, sampling_rate=0.5).to_dict()
    tc = TrainConfig(model="unet_tiny" if quick else "unet", patch_size=(patch,) * dims, device="cpu", seed=seed,
                     subjects_per_step=2, patches_per_subject=2, lr=5e-3, steps=rounds * local,
                     in_channels=len(info["channels"]), num_classes=len(info["classes"]), spatial_dims=dims,
                     extra=extra)
    cfg = FLConfig(name="u", sites=sites, train=tc, rounds=rounds, local_steps=local, eval_every=rounds)
    state = simulate_inprocess(cfg, run_dir)
    last = state.rounds[-1]
    eps_spent = {s: m.get("dp-epsilon") for s, m in last["train"].items()}
    return float(last["eval"]["overall"]["site-mean-dice"]), eps_spent


def bench_utility(quick: bool, seeds: int, eps_list: list[float], tasks: list[str]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in tasks:
            cohort = _make_task(task, root, quick)
            configs = [("nonprivate", None)] + [(m, e) for e in eps_list for m in ("fixed", "adaptive")]
            for method, eps in configs:
                dices, spent = [], []
                for s in range(seeds):
                    t0 = time.perf_counter()
                    d, e = _fl_dice(cohort, method, eps, s, root / f"{task}-{method}-{eps}-{s}", quick)
                    dices.append(d)
                    spent.append(e)
                    print(f"utility {task} {method} eps={eps} seed={s}: Dice {d:.3f} "
                          f"({time.perf_counter() - t0:.0f} s)",
                          flush=True)
                rows.append({"task": task, "method": method, "epsilon": eps, "dice_mean": float(np.mean(dices)),
                             "dice_std": float(np.std(dices)), "dices": dices, "epsilon_spent": spent})
    return {"rows": rows}


def _summaries(util: dict) -> dict:
    out = {}
    rows = util["rows"]

    def mean_of(method, eps):
        v = [r["dice_mean"] for r in rows if r["method"] == method and r["epsilon"] == eps]
        return float(np.mean(v)) if v else None

    a8, f8, n = mean_of("adaptive", 8.0), mean_of("fixed", 8.0), mean_of("nonprivate", None)
    out["adaptive_minus_fixed"] = (a8 - f8) if a8 is not None and f8 is not None else None
    out["adaptive_over_nonprivate_eps8"] = (a8 / n) if a8 is not None and n else None
    return out


def plot(util: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in util["rows"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        rs = [r for r in util["rows"] if r["task"] == task]
        for method in ("fixed", "adaptive"):
            pts = sorted((r["epsilon"], r["dice_mean"], r["dice_std"]) for r in rs if r["method"] == method)
            if pts:
                e, m, s = zip(*pts, strict=True)
                ax.errorbar(e, m, yerr=s, marker="o", capsize=3, label=f"DP {method} clip")
        for r in rs:
            if r["method"] == "nonprivate":
                ax.axhline(r["dice_mean"], color="k", ls="--", label="non-private")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon")
        ax.set_ylabel("mean Dice")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_md(res: dict, path: Path) -> None:
    lines = ["# Privacy benchmark (issue #6)", "", f"Command: `{res['command']}`", ""]
    for k in ("dp_step_ratio", "adaptive_minus_fixed", "adaptive_over_nonprivate_eps8", "accountant_rel_error"):
        lines.append(f"- **{k}**: {res.get(k)}")
    if "speed" in res:
        lines += ["", "## Speed (s per step; ratio to non-private)", "",
                  "| model | patch | non-private | loop | vmap | opacus |", "|---|---|---|---|---|---|"]
        for r in res["speed"]["rows"]:
            cells = [f"{r[f'{m}_s']:.3f} ({r[f'{m}_ratio']:.2f}x)" if f"{m}_s" in r else r.get(f"{m}_error", "-")[:40]
                     for m in ("loop", "vmap", "opacus")]
            lines.append(f"| {r['model']} | {r['patch']}^3 | {r['nonprivate_s']:.3f} | " + " | ".join(cells) + " |")
    if "utility" in res:
        lines += ["", "## Utility (mean Dice over sites, held-out subjects; mean ± std over seeds)", "",
                  "| task | method | epsilon | Dice |", "|---|---|---|---|"]
        for r in res["utility"]["rows"]:
            lines.append(f"| {r['task']} | {r['method']} | {r['epsilon'] or '-'} | {r['dice_mean']:.3f} ± "
                         f"{r['dice_std']:.3f} |")
    if "accounting" in res:
        lines += ["", "## Accounting vs dp-accounting", "", "| case | delta | privseg | dp-accounting | rel. error |",
                  "|---|---|---|---|---|"]
        for r in res["accounting"]["rows"]:
            lines.append(f"| {r['case']} | {r['delta']:g} | {r['privseg_eps']:.6f} | {r['dp_accounting_eps']:.6f} | "
                         f"{r['rel_error']:.1e} |")
    if "audit" in res:
        a = res["audit"]
        lines += ["", "## Empirical audit (benchmarks/dp_audit.py)", ""]
        for c in a["cells"]:
            lines += [f"- accounted ε = {c['accounted_epsilon']:.2f}: " + ", ".join(
                f"{arm} noise -> lower bound {r['empirical_epsilon_lower_bound']:.2f}" for arm, r in c["arms"].items())
                + f" ({c['trials_per_world']} trials per world)"]
    if "flower" in res:
        f = res["flower"]
        lines += ["", "## Flower's adaptive clipping rule", "", f"true median {f['true_median']:.3f}; Flower rule "
                  f"(counts clipped) C → {f['flower_clip_after_200']:.3g}; privseg (counts unclipped) C → "
                  f"{f['privseg_clip_after_200']:.3g}"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="speed,accounting,flower,audit,utility")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--eps", default=None, help="comma-separated epsilons (default 1,3,8)")
    ap.add_argument("--tasks", default="mri3d,ct3d,derm2d")
    ap.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    parts = set(args.parts.split(","))
    from privseg.utils import versions, write_json

    res: dict = {"command": " ".join(["python benchmarks/privacy.py", *(argv or sys.argv[1:])]), "quick": args.quick,
                 "versions": versions(), "cpu_threads": torch.get_num_threads()}
    if "speed" in parts:
        res["speed"] = bench_speed(args.quick)
        res["dp_step_ratio"] = res["speed"]["dp_step_ratio"]
    if "accounting" in parts:
        res["accounting"] = bench_accounting()
        res["accountant_rel_error"] = res["accounting"]["accountant_rel_error"]
    if "flower" in parts:
        res["flower"] = bench_flower()
    if "audit" in parts:
        res["audit"] = bench_audit(args.quick)
    if "utility" in parts:
        eps_list = [float(e) for e in (args.eps or "1,3,8").split(",")]
        seeds = args.seeds or (1 if args.quick else 3)
        res["utility"] = bench_utility(args.quick, seeds, eps_list, args.tasks.split(","))
        res.update(_summaries(res["utility"]))
        plot(res["utility"], args.out.with_name("privacy_dice_vs_eps.png"))
        res["utility"]["note"] = ("federated (in-process Flower round loop: privseg ServerApp/ClientApp, no Ray); "
                                  "delta=1e-3 (< 1/n for the small synthetic sites), q=0.5")
    write_json(args.out, res)
    write_md(res, args.out.with_suffix(".md"))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
