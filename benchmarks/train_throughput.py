"""Benchmark (issue 3): privseg's training step versus a plain hand-written MONAI loop,
and Dice after a fixed budget on the embedded cohort.

    python benchmarks/train_throughput.py [--quick] [--steps 400] [--cohort PATH]

Writes benchmarks/results/train_throughput.json (keys ``ratio_vs_monai_loop``, ``dice``)
and a .md table. Targets: ratio >= 1.0; mean foreground Dice >= 0.85 on held-out
subjects of the same sites.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from privseg.data.formats import read_cohort
from privseg.data.synth import synth_cohort
from privseg.data.transforms import load_preprocessed
from privseg.train import TrainConfig, Trainer, evaluate_subjects, summarise, train_steps
from privseg.train.loop import make_optimizer
from privseg.utils import seed_everything, versions, write_json

RESULTS = Path(__file__).parent / "results"


def monai_loop_stepper(items, cfg: TrainConfig):
    """The loop a user would write by hand with MONAI: in-memory items, SpatialPadd +
    RandCropByPosNegLabeld, DataLoader, DiceCELoss, AdamW. Returns a function doing one step."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    seed_everything(cfg.seed)
    model = cfg.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    tf = Compose([SpatialPadd(keys=["image", "label"], spatial_size=cfg.patch_size),
                  RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=cfg.patch_size,
                                         pos=1, neg=1, num_samples=cfg.patches_per_subject)])
    data = [{"image": i["image"].as_tensor(), "label": i["label"].as_tensor()} for i in items]
    loader = DataLoader(Dataset(data, tf), batch_size=cfg.subjects_per_step, shuffle=True, num_workers=0,
                        drop_last=True)
    batches = iter(())
    model.train()

    def step() -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        opt.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["label"])
        loss.backward()
        opt.step()

    return step


def privseg_stepper(items, cfg: TrainConfig):
    """privseg's own loop (``train_steps``), one step per call."""
    seed_everything(cfg.seed)
    model = cfg.build_model()
    opt = make_optimizer(model, cfg)
    counter = iter(range(10**9))

    def step() -> None:
        k = next(counter)
        train_steps(model, opt, items, cfg, start=k, stop=k + 1)

    return step


def compare_throughput(items, cfg: TrainConfig, steps: int, warmup: int = 2) -> tuple[float, float]:
    """Voxels/second of both loops. The two alternate step by step and the median step time
    is used, so load from other processes hits both alike."""
    steppers = {"privseg": privseg_stepper(items, cfg), "monai": monai_loop_stepper(items, cfg)}
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    voxels = cfg.subjects_per_step * cfg.patches_per_subject * int(np.prod(cfg.patch_size))
    return voxels / float(np.median(times["privseg"])), voxels / float(np.median(times["monai"]))


def run_throughput(train_items, cohort, patch, timing_steps: int) -> dict:
    """Part 1: both loops on the CPU, same model, batch (2 subjects x 2 patches) and patch size."""
    cfg = TrainConfig.for_cohort(cohort, model="unet", patch_size=patch, device="cpu")
    privseg_vps, monai_vps = compare_throughput(train_items, cfg, timing_steps)
    ratio = privseg_vps / monai_vps
    print(f"throughput: privseg {privseg_vps:,.0f} vox/s, MONAI loop {monai_vps:,.0f} vox/s, ratio {ratio:.3f}")
    return {"ratio_vs_monai_loop": ratio, "voxels_per_s": {"privseg": privseg_vps, "monai_loop": monai_vps},
            "timing_steps": timing_steps, "device": "cpu", "threads": torch.get_num_threads()}


def run_dice(train_items, test_items, cohort, patch, models: list[str], steps: int, device: str) -> dict:
    """Part 2: mean foreground Dice on held-out subjects after a fixed budget, per model."""
    per_model = {}
    for name in models:
        cfg = TrainConfig.for_cohort(cohort, model=name, patch_size=patch, steps=steps,
                                     checkpoint_every=steps, device=device, lr=2e-3)
        t0 = time.perf_counter()
        result = Trainer(cohort, cfg, RESULTS.parent / "runs" / f"throughput_{name}").fit(resume=False,
                                                                                          items=train_items)
        seconds = time.perf_counter() - t0
        summary = summarise(evaluate_subjects(result["model"], test_items, patch, cohort.num_classes))
        per_model[name] = {"steps": steps, "train_seconds": seconds, "test": summary,
                           "params": sum(p.numel() for p in result["model"].parameters())}
        print(f"{name}: {steps} steps in {seconds:.0f} s -> test mean Dice {summary['overall']['mean_dice']:.4f} "
              f"(per class {[round(x, 4) for x in summary['overall']['dice']]})")
    best = max(per_model, key=lambda m: per_model[m]["test"]["overall"]["mean_dice"])
    return {"dice": per_model[best]["test"]["overall"]["mean_dice"], "best_model": best, "models": per_model,
            "device": device, "threads": torch.get_num_threads()}


def write_results(parts: dict, cohort) -> dict:
    """Merge the parts run now into the results file, so each part can be re-run on its own
    (e.g. the Dice part where a GPU is lent, the throughput part on the 2-core CPU machine).
    Every part records its own command, device and library versions."""
    path = RESULTS / "train_throughput.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = dict(old.get("parts", {}))
    merged.update(parts)
    out: dict = {"parts": merged, "classes": cohort.classes,
                 "targets": {"ratio_vs_monai_loop": ">= 1.0", "dice": ">= 0.85"}}
    if "throughput" in merged:
        out["ratio_vs_monai_loop"] = merged["throughput"]["ratio_vs_monai_loop"]
    if "dice" in merged:
        out["dice"], out["best_model"] = merged["dice"]["dice"], merged["dice"]["best_model"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    lines = ["# Training throughput and Dice (issue 3)", "", "| measure | value | target | device | command |",
             "|---|---|---|---|---|"]
    if "throughput" in merged:
        t = merged["throughput"]
        lines.append(f"| privseg / MONAI loop throughput (unet, 2x2 patches of 64^3) | {t['ratio_vs_monai_loop']:.3f} "
                     f"| >= 1.0 | {t['device']}, {t['threads']} threads | `{t['command']}` |")
    if "dice" in merged:
        d = merged["dice"]
        lines.append(f"| best held-out mean Dice ({d['best_model']}) | {d['dice']:.4f} | >= 0.85 | {d['device']} "
                     f"| `{d['command']}` |")
        lines += ["", "| model | params | steps | train s | test mean Dice | per-class Dice |",
                  "|---|---|---|---|---|---|"]
        for name, m in d["models"].items():
            o = m["test"]["overall"]
            per_class = ", ".join(f"{c}={v:.3f}" for c, v in zip(cohort.classes[1:], o["dice"], strict=True))
            lines.append(f"| {name} | {m['params']:,} | {m['steps']} | {m['train_seconds']:.0f} | "
                         f"{o['mean_dice']:.4f} | {per_class} |")
    (RESULTS / "train_throughput.md").write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, help="Cohort path (default: build the embedded 3-site 64^3 cohort).")
    ap.add_argument("--quick", action="store_true", help="Few steps: a smoke run in a couple of minutes.")
    ap.add_argument("--steps", type=int, default=600, help="Training budget per model for the Dice part.")
    ap.add_argument("--models", default="unet,resnet10")
    ap.add_argument("--timing-steps", type=int, default=15)
    ap.add_argument("--parts", default="throughput,dice", help="Which parts to run: throughput, dice or both.")
    args = ap.parse_args()
    steps = 40 if args.quick else args.steps
    timing_steps = 4 if args.quick else args.timing_steps
    cohort_path = args.cohort or RESULTS.parent / "data" / "cohort64"
    if args.cohort is None and not (cohort_path / "cohort.json").exists():
        synth_cohort(cohort_path, sites=3, subjects=8, size=64, seed=0)
    cohort = read_cohort(cohort_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    patch = (64,) * cohort.spatial_dims if cohort.spatial_dims == 3 else (128, 128)
    train_items = load_preprocessed(cohort.select("train"), cohort)
    command = "python " + " ".join(sys.argv)
    common = {"command": command, "cohort": str(cohort_path), "quick": args.quick, "versions": versions()}
    parts = {}
    wanted = set(args.parts.split(","))
    if "throughput" in wanted:
        parts["throughput"] = {**run_throughput(train_items, cohort, patch, timing_steps), **common}
    if "dice" in wanted:
        test_items = load_preprocessed(cohort.select("test"), cohort)
        parts["dice"] = {**run_dice(train_items, test_items, cohort, patch, args.models.split(","), steps, device),
                         **common}
    out = write_results(parts, cohort)
    print(json.dumps({k: out.get(k) for k in ("ratio_vs_monai_loop", "dice", "best_model")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
