"""Benchmark (issues 13 and 14): does a pooled model on the power cohort memorise?

    OMP_NUM_THREADS=1 python benchmarks/power_check.py [--steps N] [--eval-at a,b] [--seed S] [--smoke]

Builds :func:`privseg.data.synth.power_cohort` (3 sites x 16 patients: 36 training, 12 never
seen), trains one pooled model on all training patients as :data:`privseg.data.synth.POWER_TRAINING`
says, and runs :func:`privseg.audit.mia.power_check_model` at the steps in ``--eval-at``: the
membership AUC of all training vs all never-seen patients (must be >= 0.75) with its bootstrap 95 %
CI and permutation p-value, and the null control (two seeded random halves of the never-seen
patients, must be within 0.1 of 0.5). Both statistics (Dice, loss) and both view counts (1: the
volume as trained; 2: plus a flipped, jittered view) are reported; the check's verdict uses
:data:`privseg.data.synth.POWER_MIA`. Writes ``benchmarks/results/power_check.json`` and ``.md``
(``--smoke``: a tiny run into a temporary folder, only to test the pipeline).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: spinning OpenMP threads stall others

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import cells  # noqa: E402

VERSION = "power-check-1"
RESULTS = cells.BENCH_DIR / "results"


def _check(model, train, never, patch, num_classes, statistic: str, views: int, seed: int) -> dict:
    from privseg.audit.mia import power_check_model

    res = power_check_model(model, train, never, patch, num_classes, statistic=statistic, views=views, seed=seed,
                            raise_on_fail=False)
    keep = ("member_auc", "member_ci", "member_p", "null_auc", "null_ci", "null_sd", "null_pass_rate", "passed",
            "problems", "n_members", "n_nonmembers")
    out = {k: res[k] for k in keep}
    out["member_mean"] = sum(res["member_scores"].values()) / len(res["member_scores"])
    out["nonmember_mean"] = sum(res["nonmember_scores"].values()) / len(res["nonmember_scores"])
    out["member_scores"], out["nonmember_scores"] = res["member_scores"], res["nonmember_scores"]
    return out


def run(args, argv) -> dict:
    import torch

    from privseg.data.synth import POWER_MIA, POWER_TRAINING, power_cohort
    from privseg.data.transforms import load_preprocessed, whole_volume_patch
    from privseg.train import TrainConfig, train_steps
    from privseg.train.loop import make_optimizer
    from privseg.utils import seed_everything

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="power_check_"))
    if args.smoke:  # the pipeline only: far too small to memorise or to pass the size rules
        cohort = power_cohort(work / "cohort", sites=2, subjects=4, size=24, seed=args.cohort_seed, check=False)
    else:
        cohort = power_cohort(work / "cohort", seed=args.cohort_seed)
    train = load_preprocessed(cohort.select("train"), cohort, None)
    never = load_preprocessed(cohort.select("test"), cohort, None)
    tr = POWER_TRAINING
    # patch_size None: the whole preprocessed volume, so training sees each patient as the test scores it
    patch = tr["patch_size"] or whole_volume_patch(train + never)
    steps = args.steps or tr["steps"]
    cfg = TrainConfig(model=args.model or tr["model"], norm="group", patch_size=patch,
                      subjects_per_step=tr["subjects_per_step"], patches_per_subject=tr["patches_per_subject"],
                      lr=tr["lr"], steps=steps, seed=args.seed, device="cpu", in_channels=len(cohort.channels),
                      num_classes=cohort.num_classes)
    eval_at = sorted({int(x) for x in args.eval_at.split(",") if x} | {steps}) if args.eval_at else [steps]
    eval_at = [s for s in eval_at if 0 < s <= steps]
    seed_everything(cfg.seed)
    model = cfg.build_model()
    opt = make_optimizer(model, cfg)
    trajectory, step, train_s, last_loss = [], 0, 0.0, None
    for stop in eval_at:
        t0 = time.perf_counter()
        losses = train_steps(model, opt, train, replace(cfg, steps=steps), start=step, stop=stop)
        train_s += time.perf_counter() - t0
        step, last_loss = stop, sum(losses[-50:]) / len(losses[-50:])
        t0 = time.perf_counter()
        at = {"step": step, "train_s": round(train_s, 1), "train_loss_last50": last_loss, "checks": {}}
        combos = [(POWER_MIA["statistic"], POWER_MIA["views"])]
        if step == steps:  # the other statistic and the augmented view, for the record
            combos += [(s, v) for s in ("dice", "loss") for v in (1, 2) if (s, v) != combos[0]]
        for statistic, views in combos:
            at["checks"][f"{statistic}-views{views}"] = _check(model, train, never, patch, cfg.num_classes,
                                                               statistic, views, args.seed)
        at["score_s"] = round(time.perf_counter() - t0, 1)
        main = at["checks"][f"{POWER_MIA['statistic']}-views{POWER_MIA['views']}"]
        print(f"step {step}: train loss {last_loss:.4f}, AUC {main['member_auc']:.3f} "
              f"[{main['member_ci'][0]:.3f}, {main['member_ci'][1]:.3f}], null {main['null_auc']:.3f} "
              f"({train_s:.0f}s training)", flush=True)
        trajectory.append(at)
    final = trajectory[-1]["checks"][f"{POWER_MIA['statistic']}-views{POWER_MIA['views']}"]
    return {"benchmark": "power_check", "version": VERSION, "command": cells.command(argv),
            "machine": cells.machine(), "versions": cells.versions(VERSION), "updated": time.strftime("%Y-%m-%d %H:%M"),
            "cohort": {"sites": len(cohort.sites), "size": cohort.info.get("size"), "seed": args.cohort_seed,
                       "n_train": len(train), "n_never_seen": len(never), "volume": list(patch)},
            "training": {**{k: v for k, v in cfg.to_dict().items() if k != "extra"}, "pooled": True},
            "mia": dict(POWER_MIA), "steps": steps, "seconds": round(time.perf_counter() - t_all, 1),
            "passed": final["passed"], "member_auc": final["member_auc"], "member_ci": final["member_ci"],
            "member_p": final["member_p"], "null_auc": final["null_auc"], "null_sd": final["null_sd"],
            "null_pass_rate": final["null_pass_rate"],
            "trajectory": trajectory, "smoke": bool(args.smoke)}


def render(r: dict) -> str:
    lines = ["# Membership power of the power cohort", "",
             f"Command: `{r['command']}`", "", f"Machine: {r['machine']}", "",
             f"Updated {r['updated']}; {r['seconds']:.0f} s in all.", "",
             f"Cohort: {r['cohort']['sites']} sites, {r['cohort']['n_train']} training / "
             f"{r['cohort']['n_never_seen']} never-seen patients at {r['cohort']['size']}^3 "
             f"(preprocessed {'x'.join(map(str, r['cohort']['volume']))}). Training (pooled): "
             f"{r['training']['model']}, patch {'x'.join(map(str, r['training']['patch_size']))}, "
             f"{r['training']['subjects_per_step']} patients x {r['training']['patches_per_subject']} patch per step, "
             f"lr {r['training']['lr']}, {r['steps']} steps, seed {r['training']['seed']}.", "",
             f"**Verdict ({r['mia']['statistic']}, views={r['mia']['views']}): "
             f"{'PASS' if r['passed'] else 'FAIL'}** — membership AUC (all training vs all never-seen) "
             f"{r['member_auc']:.3f} (95 % CI {r['member_ci'][0]:.3f}–{r['member_ci'][1]:.3f}, permutation "
             f"p {r['member_p']:.4f}; needs >= 0.75); null control {r['null_auc']:.3f} (needs |AUC - 0.5| <= 0.1; "
             f"chance sd at {r['cohort']['n_never_seen'] // 2} vs {(r['cohort']['n_never_seen'] + 1) // 2}: "
             f"{r['null_sd']:.3f}).", "",
             f"The null control is a coin toss at this size: among 200 other random halvings of the same "
             f"never-seen scores, {100 * r['null_pass_rate']:.0f} % land within 0.1 of 0.5. Read a failed null "
             "control against that rate and the sd, not as leakage. How the preset was found: "
             "`benchmarks/results/power_check_notes.md`.", "",
             "| step | training s | statistic | views | AUC | 95 % CI | p | null AUC | member mean | never-seen mean |",
             "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for at in r["trajectory"]:
        for key, c in at["checks"].items():
            stat, views = key.split("-views")
            lines.append(f"| {at['step']} | {at['train_s']:.0f} | {stat} | {views} | {c['member_auc']:.3f} | "
                         f"{c['member_ci'][0]:.3f}–{c['member_ci'][1]:.3f} | {c['member_p']:.4f} | "
                         f"{c['null_auc']:.3f} | {c['member_mean']:.4f} | {c['nonmember_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default POWER_TRAINING['steps'])")
    ap.add_argument("--eval-at", default="", help="comma-separated steps at which to run the check too")
    ap.add_argument("--model", default=None, help="model (default POWER_TRAINING['model'])")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--cohort-seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny run into a temporary folder (pipeline test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or 2
    r = run(args, argv)
    out = Path(tempfile.mkdtemp(prefix="power_check_out_")) if args.smoke else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    from privseg.utils import write_json

    write_json(out / "power_check.json", r)
    (out / "power_check.md").write_text(render(r))
    print(f"wrote {out / 'power_check.json'} and .md; passed={r['passed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
