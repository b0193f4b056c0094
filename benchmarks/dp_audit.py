"""Empirical privacy audit of patient-level DP-SGD: a lower bound on ε that must sit below the
accounted ε, and that must catch noise an attacker can regenerate.

Design (white-box gradient canary, after Nasr et al., "Adversary Instantiation: Lower Bounds
for Differentially Private Machine Learning", IEEE S&P 2021; one observed update per trial as in
their strongest threat model, and the Clopper--Pearson conversion of Jagielski et al. 2020):

* a site of ``n`` ordinary patients, plus -- in the "in" world -- a canary patient; one DP step
  of privseg's :class:`~privseg.privacy.PatientDPSGD` with the real model, sampler and noise;
* the attacker knows everything public: the initial model, the other patients, the run's seed,
  the code. It computes the canary's clipped gradient ``g_c`` on the initial model and scores a
  trial by the projection of the observed update on ``-g_c``. It also *tries to regenerate the
  noise* from the public seed (:meth:`NoiseSource.reproducible`) and subtracts it first: that is
  exactly what the audited code allowed (noise seeded by the public config);
* many trials per world; every threshold's (TPR, FPR) with 95 % Clopper--Pearson bounds gives
  ``ε ≥ log((TPR_lo - δ) / FPR_hi)``; the best threshold is the lower bound.

Two arms, same attack: ``secret`` (privseg's default, the key in the site's state) must give a
lower bound below the accounted ε; ``public-seed`` (noise derived from the seed, the audited
behaviour, still available as ``reproducible_noise`` for tests) must give one above it.

    python benchmarks/dp_audit.py [--trials 400] [--epsilon 1]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(s_in: np.ndarray, s_out: np.ndarray, delta: float) -> float:
    """Best over thresholds of the one-sided bound on ε from (TPR, FPR) with 95 % CP intervals."""
    best = 0.0
    for t in np.unique(np.concatenate([s_in, s_out])):
        tpr_lo, _ = clopper_pearson(int((s_in >= t).sum()), len(s_in))
        _, fpr_hi = clopper_pearson(int((s_out >= t).sum()), len(s_out))
        if tpr_lo - delta > 0 and fpr_hi > 0:
            best = max(best, math.log((tpr_lo - delta) / fpr_hi))
    return best


def run(trials: int, eps_target: float, delta: float, n: int = 4, quiet: bool = False) -> dict:
    from privseg.models import build_model
    from privseg.privacy import NoiseSource, PatientDPSGD, StepEvent, calibrate_sigma, epsilon
    from privseg.privacy.grad_sample import clipped_sum_loop
    from privseg.train.losses import SegLoss

    torch.set_num_threads(1)
    q, steps, clip, lr = 1.0, 1, 1.0, 1.0
    sigma = calibrate_sigma(eps_target, delta, q, steps)
    accounted = epsilon([StepEvent(q, sigma, steps)], delta)
    g = torch.Generator().manual_seed(0)
    side = 16
    normal = []
    for i in range(n):
        img = torch.randn(1, side, side, generator=g)
        normal.append({"image": img, "label": (img > 0).long(), "patient": f"P{i}"})
    cimg = torch.randn(1, side, side, generator=g)
    canary = {"image": cimg, "label": (cimg <= 0).long(), "patient": "CANARY"}  # labels only memorisation fits
    torch.manual_seed(0)
    init = build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2).state_dict()
    loss_fn = SegLoss()

    class Cfg:
        patch_size, patches_per_subject, seed, subjects_per_step = (side, side), 2, 0, n

    def model():
        m = build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2)
        m.load_state_dict(init)
        return m

    # the attacker's direction: the canary's clipped gradient at the initial model (white box)
    m0 = model()
    x = torch.stack([cimg, cimg])
    y = torch.stack([canary["label"], canary["label"]])
    gc, _, _ = clipped_sum_loop(m0, loss_fn, x, y, torch.tensor([0, 0]), clip)
    direction = torch.cat([t.reshape(-1) for t in gc])
    direction = direction / direction.norm()
    names = [k for k, p in m0.named_parameters() if p.requires_grad]
    w0 = torch.cat([init[k].reshape(-1).double() for k in names])

    def trial(with_canary: bool, seed: int, arm: str) -> float:
        items = normal + [canary] if with_canary else list(normal)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            noise = NoiseSource.reproducible(seed) if arm == "public-seed" else NoiseSource.ephemeral()
            guess = NoiseSource.reproducible(seed)  # what the public config lets anyone regenerate
        m = model()
        eng = PatientDPSGD(q=q, n_subjects=len(items), multipliers=[sigma] * steps, clip_norm=clip, noise=noise,
                           expected_batch=n)  # a public divisor: the update does not reveal the world's n
        eng.train_steps(m, torch.optim.SGD(m.parameters(), lr=lr), items, Cfg(), 0, steps)
        w1 = torch.cat([p.detach().reshape(-1).double() for p in m.parameters()])
        grad_est = (w0 - w1) * n / lr  # = clipped sum + noise * sigma * C (n: the public divisor)
        grad_est = grad_est - guess.gaussian("gradient", 0, grad_est.numel()) * sigma * clip
        return float(grad_est.float() @ direction)

    out = {"trials_per_world": trials, "accounted_epsilon": accounted, "target_epsilon": eps_target, "delta": delta,
           "noise_multiplier": sigma, "q": q, "steps": steps, "patients": n, "arms": {}}
    for arm in ("secret", "public-seed"):
        t0 = time.perf_counter()
        s_in = np.array([trial(True, 10_000 + s, arm) for s in range(trials)])
        s_out = np.array([trial(False, 20_000 + s, arm) for s in range(trials)])
        lb = epsilon_lower_bound(s_in, s_out, delta)
        out["arms"][arm] = {"empirical_epsilon_lower_bound": lb, "below_accounted": bool(lb <= accounted),
                            "score_in_mean": float(s_in.mean()), "score_out_mean": float(s_out.mean()),
                            "score_out_std": float(s_out.std()), "seconds": time.perf_counter() - t0}
        if not quiet:
            print(f"audit [{arm}]: accounted eps {accounted:.2f}, empirical lower bound {lb:.2f} "
                  f"({trials}+{trials} trials, {time.perf_counter() - t0:.0f} s)", flush=True)
    out["holds"] = out["arms"]["secret"]["below_accounted"]
    out["leak_caught"] = not out["arms"]["public-seed"]["below_accounted"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, default=RESULTS / "dp_audit.json")
    a = ap.parse_args(argv)
    import privseg

    res = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
           "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} torch thread(s)",
           "privseg": getattr(privseg, "__version__", "?"), "torch": torch.__version__,
           "cells": [run(a.trials, e, a.delta) for e in a.epsilon]}
    res["holds"] = all(c["holds"] for c in res["cells"])
    res["leak_caught"] = all(c["leak_caught"] for c in res["cells"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    md = [f"# DP audit\n\n`{res['command']}` — {res['machine']}, torch {res['torch']}\n",
          "| accounted ε | arm | empirical ε lower bound | below accounted |", "|---|---|---|---|"]
    for c in res["cells"]:
        for arm, r in c["arms"].items():
            md.append(f"| {c['accounted_epsilon']:.2f} | {arm} | {r['empirical_epsilon_lower_bound']:.2f} | "
                      f"{r['below_accounted']} |")
    md.append(f"\nGuarantee holds (secret key): {res['holds']}. Leak caught (noise from the public seed): "
              f"{res['leak_caught']}. {c['trials_per_world']} trials per world, one DP step, q = 1, "
              f"{c['patients']} patients + canary.")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps({"holds": res["holds"], "leak_caught": res["leak_caught"]}))
    return 0 if res["holds"] and res["leak_caught"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
