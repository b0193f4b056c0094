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
2. utility: the study's comparison, as resumable cells in ``benchmarks/privacy_utility.py``
   (3 tasks x 3 sites, non-private / fixed clip (C = 1 and a grid of 4) / adaptive clip, ε 1, 3, 8).
3. accounting: privseg's ε vs Google dp-accounting for the same (q, sigma, steps) sequence.
4. audit: the cells of ``benchmarks/dp_audit.py`` (white-box Dirac gradient canary; secret-key,
   public-seed and reused noise) -> empirical ε lower bound (:func:`privseg.audit.epsilon.empirical_epsilon`:
   Gaussian DP and Clopper-Pearson, 95 %), compared with the booked and the exact ε.
5. flower: Flower 1.41's adaptive-clipping update rule (counts clipped) vs Andrew et al. (counts unclipped).
6. clipwalk: how far adaptive clipping's estimate wanders with 2 patients per step (the utility setting).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


# -- 1. speed ---------------------------------------------------------------------------

def bench_speed(cases: list[tuple[str, int]], reps: int = 5) -> dict:
    """DP step / non-private step, every per-subject method, median of ``reps`` after a warm-up.
    Each method gets its own copy of the model (Opacus's hooks stay on the model they wrap)."""
    import copy

    from privseg.models import build_model
    from privseg.privacy import PatientDPSGD, SampledBatch
    from privseg.privacy.grad_sample import GRAD_METHODS
    from privseg.privacy.noise import NoiseSource
    from privseg.train.loop import standard_step
    from privseg.train.losses import SegLoss

    methods = sorted(GRAD_METHODS, key=lambda m: m == "opacus")  # opacus last

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows = []
    for name, side in cases:
        torch.manual_seed(0)
        model = build_model(name, in_channels=1, num_classes=4, spatial_dims=3, norm="group")
        loss_fn = SegLoss()
        x = torch.randn(4, 1, side, side, side)
        y = torch.randint(0, 4, (4, 1, side, side, side))
        owner = torch.tensor([0, 0, 1, 1])
        base_model = copy.deepcopy(model)
        opt = torch.optim.SGD(base_model.parameters(), lr=1e-4)
        base = timed(lambda: standard_step(base_model, opt, loss_fn, x, y, owner))  # noqa: B023
        n_params = sum(p.numel() for p in model.parameters())
        noise = NoiseSource.ephemeral()
        row = {"model": name, "patch": side, "batch": "2 subjects x 2 patches", "params": n_params,
               "nonprivate_s": base,
               "noise_draw_s": timed(lambda: noise.gaussian("gradient", 0, n_params, torch.float32))}  # noqa: B023
        for method in methods:
            m = copy.deepcopy(model)
            m_opt = torch.optim.SGD(m.parameters(), lr=1e-4)
            eng = PatientDPSGD(q=0.5, n_subjects=4, multipliers=[1.0] * 1000, clip_norm=1.0, clip_rule="adaptive",
                               method=method)
            try:
                # the baseline's tensors as this step's sample (q = 1 here): the same compute, timed alone
                t = timed(lambda: eng.step(m, m_opt, loss_fn,  # noqa: B023
                                           SampledBatch(id(eng), eng.step_no, x, y, owner, 2)))  # noqa: B023
                row[f"{method}_s"], row[f"{method}_ratio"] = t, t / base
                # the per-patient clipped gradients alone (no noise, no optimiser step)
                row[f"{method}_grad_ratio"] = timed(lambda: GRAD_METHODS[method](  # noqa: B023
                    m, loss_fn, x, y, owner, 1.0)) / base  # noqa: B023
            except Exception as exc:  # noqa: BLE001 - report, don't die
                row[f"{method}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"speed {name} {side}^3: non-private {base:.3f} s, noise draw {row['noise_draw_s']:.3f} s; "
              + ", ".join(f"{m} {row.get(f'{m}_ratio', float('nan')):.2f}x" for m in methods), flush=True)
    best = {f"{r['model']}_{r['patch']}": min(r.get(f"{m}_ratio", math.inf) for m in methods) for r in rows}
    return {"rows": rows, "methods": methods, "best_ratio": best, "dp_step_ratio": max(best.values()),
            "reps": reps, "threads": torch.get_num_threads()}


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
    from privseg.federated.dp_strategy import flower_adaptive_clip_trace
    from privseg.privacy import QuantileClipper

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


def bench_clip_walk(trials: int = 200) -> dict:
    """How far private adaptive clipping's estimate wanders in the utility benchmark's setting: a
    site of 12 patients, 2 per step (Poisson), 200 steps (20 rounds x 10 local steps), the noise
    multiplier privseg plans for each epsilon, default ``sigma_b``, ``eta = 0.2``; norms log-normal
    with median 1 (so the right answer is C = 1). Andrew et al.'s setting has ``sigma_b / m = 1/20``;
    with 2 patients per step the count's noise is larger than the count itself."""
    from privseg.privacy.clipping import QuantileClipper, default_sigma_b
    from privseg.privacy.plan import make_plan
    from privseg.privacy.spec import DPConfig

    rows = []
    for eps in (1.0, 3.0, 8.0):
        z = max(make_plan(DPConfig(epsilon=eps, delta=1e-5, clip="adaptive"), "H1", 12, 2, 200).multipliers)
        m = 2.0
        sigma_b = default_sigma_b(m, z)
        rng = np.random.default_rng(0)
        finals = []
        for _ in range(trials):
            clipper = QuantileClipper(clip=1.0, target_quantile=0.5, lr=0.2, expected_m=m, sigma_b=sigma_b)
            for _ in range(200):
                norms = np.exp(rng.normal(0.0, 0.3, rng.binomial(12, 2 / 12)))
                clipper.update(torch.tensor(norms), draw=float(rng.normal()))
            finals.append(math.log(clipper.clip))
        q10, q90 = np.quantile(finals, [0.1, 0.9])
        rows.append({"epsilon": eps, "noise_multiplier": z, "sigma_b": sigma_b, "expected_m": m,
                     "count_noise_over_m": sigma_b / m, "log_clip_sd": float(np.std(finals)),
                     "clip_p10": math.exp(q10), "clip_p90": math.exp(q90)})
        print(f"adaptive clip walk eps {eps:g}: z {z:.2f}, sigma_b/m {sigma_b / m:.2f}, C after 200 steps "
              f"10-90 % {math.exp(q10):.3g}-{math.exp(q90):.3g} (right answer 1)", flush=True)
    return {"rows": rows, "trials": trials, "steps": 200, "true_clip": 1.0}


# -- 4. audit ---------------------------------------------------------------------------

def bench_audit(trials: int) -> dict:
    """The empirical audit's cells of ``benchmarks/dp_audit.py`` (white-box Dirac gradient canary on
    the real site path; secret key, public seed, noise reused by a resume) at accounted ε = 1 and 4,
    ``trials`` per world and arm; ``dp_audit.py`` alone also measures the reply timing."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dp_audit

    cells = [dp_audit.cell(eps, trials, trials, quiet=True) for eps in (1.0, 4.0)]
    leaks = ("public-seed", "reuse-old-path")
    return {"cells": cells, "holds": all(c["holds"] for c in cells),
            "leak_caught": all(c["arms"][arm]["exceeds_booked"] for c in cells for arm in leaks)}


# -- 2. utility ---------------------------------------------------------------------------

def bench_utility(argv: list[str]) -> dict:
    """The study's comparison runs as resumable cells in ``benchmarks/privacy_utility.py``; this
    part runs (or resumes) it and quotes its headline keys."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import privacy_utility

    privacy_utility.main(argv)
    path = RESULTS / "privacy_utility.json"
    merged = __import__("json").loads(path.read_text()) if path.exists() else {}
    keys = ("adaptive_minus_fixed", "adaptive_minus_best_fixed", "adaptive_over_nonprivate_eps8",
            "cells_done", "cells_total")
    return {"results": str(path.relative_to(RESULTS.parent.parent)), **{k: merged.get(k) for k in keys}}


def write_md(res: dict, path: Path) -> None:
    lines = ["# Privacy benchmark (issue #6)", "", f"Last command: `{res['command']}` (each part keeps the result of "
             "the last command that ran it)", ""]
    for k in ("dp_step_ratio", "adaptive_minus_fixed", "adaptive_over_nonprivate_eps8", "accountant_rel_error"):
        lines.append(f"- **{k}**: {res.get(k)}")
    if "speed" in res:
        sp = res["speed"]
        methods = sp.get("methods", ["loop", "vmap", "opacus"])
        lines += ["", f"## Speed (s per step, median of {sp.get('reps', 3)}; ratio to non-private; "
                  f"{sp.get('threads')} threads)", "",
                  "| model | patch | non-private | noise draw | " + " | ".join(methods) + " |",
                  "|---|---|---|---|" + "---|" * len(methods)]
        if sp.get("command"):
            lines[-2:-2] = [f"Command: `{sp['command']}`", ""]
        for r in sp["rows"]:
            cells = [f"{r[f'{m}_s']:.3f} ({r[f'{m}_ratio']:.2f}x; gradients {r.get(f'{m}_grad_ratio', math.nan):.2f}x)"
                     if f"{m}_s" in r else r.get(f"{m}_error", "-")[:40] for m in methods]
            noise = f"{r['noise_draw_s']:.3f}" if "noise_draw_s" in r else "-"
            lines.append(f"| {r['model']} | {r['patch']}^3 | {r['nonprivate_s']:.3f} | {noise} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Each cell: the whole DP step (clipped per-patient gradients, noise, optimiser step); in "
                  "brackets its ratio and that of the clipped per-patient gradients alone. The noise draw (a "
                  "secret-key ChaCha20 Gaussian for every parameter) is timed alone in its column; the step "
                  "draws it on a background thread while the gradients are computed."]
    if "utility" in res:
        u = res["utility"]
        lines += ["", "## Utility", "", f"Resumable cells: `{u['results']}` ({u.get('cells_done')}/"
                  f"{u.get('cells_total')} cells)."]
    if "accounting" in res:
        lines += ["", "## Accounting vs dp-accounting", "", "| case | delta | privseg | dp-accounting | rel. error |",
                  "|---|---|---|---|---|"]
        for r in res["accounting"]["rows"]:
            lines.append(f"| {r['case']} | {r['delta']:g} | {r['privseg_eps']:.6f} | {r['dp_accounting_eps']:.6f} | "
                         f"{r['rel_error']:.1e} |")
    if "audit" in res:
        a = res["audit"]
        lines += ["", "## Empirical audit (benchmarks/dp_audit.py)", ""]
        for c in a.get("cells", []):
            arms = ", ".join(f"{arm} -> lower bound {r['lower_bound']:.2f} (booked {r['booked_epsilon']:.2f})"
                             for arm, r in c["arms"].items())
            lines += [f"- accounted ε = {c['accounted_epsilon']:.2f} (exact {c['exact_epsilon_pld']:.2f}): {arms} "
                      f"({c['trials_per_world']} trials per world)"]
    if "clipwalk" in res:
        lines += ["", "## Adaptive clipping with 2 patients per step (the utility benchmark's setting)", "",
                  f"{res['clipwalk']['trials']} simulated sites, {res['clipwalk']['steps']} steps, norms with median 1 "
                  "(the right clip is 1), privseg's planned noise multiplier and default sigma_b, eta 0.2. Andrew "
                  "et al. have sigma_b/m = 0.05.", "",
                  "| ε | z | sigma_b / m | C after 200 steps, 10-90 % |", "|---|---|---|---|"]
        for r in res["clipwalk"]["rows"]:
            lines.append(f"| {r['epsilon']:g} | {r['noise_multiplier']:.2f} | {r['count_noise_over_m']:.2f} | "
                         f"{r['clip_p10']:.3g} - {r['clip_p90']:.3g} |")
    if "flower" in res:
        f = res["flower"]
        lines += ["", "## Flower's adaptive clipping rule", "", f"true median {f['true_median']:.3f}; Flower rule "
                  f"(counts clipped) C → {f['flower_clip_after_200']:.3g}; privseg (counts unclipped) C → "
                  f"{f['privseg_clip_after_200']:.3g}"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="speed,accounting,flower,clipwalk,audit,utility")
    ap.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    ap.add_argument("--speed-cases", default=None, metavar="MODEL:SIDE,...",
                    help="speed part cases (default resnet10:32,resnet10:64,unet:32,unet:64; --quick the 32s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    parts = set(args.parts.split(","))
    from privseg.utils import versions, write_json

    # parts not run this time keep their last result
    res: dict = __import__("json").loads(args.out.read_text()) if args.out.exists() else {}
    res.update({"command": " ".join(["python benchmarks/privacy.py", *(argv or sys.argv[1:])]), "quick": args.quick,
                "versions": versions(), "cpu_threads": torch.get_num_threads()})
    if "speed" in parts:
        spec = args.speed_cases or ("resnet10:32,unet:32" if args.quick else "resnet10:32,resnet10:64,unet:32,unet:64")
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in spec.split(",")]
        res["speed"] = {**bench_speed(cases, reps=5), "command": res["command"]}
        res["dp_step_ratio"] = res["speed"]["dp_step_ratio"]
    if "accounting" in parts:
        res["accounting"] = bench_accounting()
        res["accountant_rel_error"] = res["accounting"]["accountant_rel_error"]
    if "flower" in parts:
        res["flower"] = bench_flower()
    if "clipwalk" in parts:
        res["clipwalk"] = bench_clip_walk()
    if "audit" in parts:
        res["audit"] = bench_audit(100 if args.quick else 400)
    if "utility" in parts:
        res["utility"] = bench_utility(["--smoke"] if args.quick else [])
        res.update({k: res["utility"][k] for k in ("adaptive_minus_fixed", "adaptive_over_nonprivate_eps8")})
    write_json(args.out, res)
    write_md(res, args.out.with_suffix(".md"))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
