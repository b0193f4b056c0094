"""Erasure from a run trained with patient-level DP: every step it takes is DP and paid for.

After a DP run, whatever touches a site's patients -- the local unlearning at the erasing site,
the repair rounds at every site, FedEraser's calibration rounds, a retrain -- runs under that
site's DP engine (its original noise plan, a fresh secret key) and is booked in the site's own
ledger (``<run>/sites/<site>/privacy.sqlite``), so the ε that ``privseg privacy status`` and the
certificate print is the ε of everything the server saw, the served model included. The local
unlearning is DP fine-tuning on the site's retained patients (the erased patient excluded): a
non-private unlearning pass would release a model outside the ledger.

:func:`erasure_cost` prices the planned work per site before anything runs; :func:`require_budget`
refuses an erasure the budgets cannot pay for, with the figures and the options.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from privseg.errors import BudgetExceededError
from privseg.federated.config import FLConfig
from privseg.privacy import DPConfig, NoiseSource, make_private, patient_groups, site_plan
from privseg.privacy.accountant import StepEvent, epsilon
from privseg.privacy.budget import BudgetLedger


def dp_of(cfg: FLConfig) -> DPConfig | None:
    """The run's patient-level DP settings, or None (no DP, or client-level DP)."""
    return cfg.privacy if cfg.privacy is not None and cfg.privacy.unit == "patient" else None


def site_ledger(run_dir: Path, site: str) -> BudgetLedger:
    return BudgetLedger(Path(run_dir) / "sites" / site / "privacy.sqlite")


def _events(ledger: BudgetLedger, site: str, steps: int) -> list[StepEvent]:
    plan = site_plan(ledger, site)
    return [StepEvent(plan.q, plan.multipliers[-1], int(steps))] if steps > 0 else []


def erasure_cost(run_dir: Path, cfg: FLConfig, steps_by_site: dict[str, int]) -> list[dict]:
    """Per site: ε spent, ε after the planned DP steps, the budget, and whether it fits."""
    rows = []
    for site, steps in steps_by_site.items():
        ledger = site_ledger(run_dir, site)
        budget, delta = ledger.budget(site)
        before = ledger.spent(site)
        after = epsilon(ledger.events(site) + _events(ledger, site, steps), delta)
        rows.append({"site": site, "steps": int(steps), "epsilon_spent": before, "epsilon_after": after,
                     "epsilon_budget": budget, "delta": delta, "fits": after <= budget * (1 + 1e-6) + 1e-9})
    return rows


def require_budget(run_dir: Path, cfg: FLConfig, steps_by_site: dict[str, int], what: str) -> list[dict]:
    """Raise :class:`BudgetExceededError` -- before any compute -- when a site cannot pay."""
    rows = erasure_cost(run_dir, cfg, steps_by_site)
    short = [r for r in rows if not r["fits"]]
    if short:
        lines = "; ".join(f"site {r['site']} needs epsilon {r['epsilon_after']:.3g} for {r['steps']} DP step(s) "
                          f"(spent {r['epsilon_spent']:.3g} of its budget {r['epsilon_budget']:g}, "
                          f"{max(0.0, r['epsilon_budget'] - r['epsilon_spent']):.3g} left)" for r in short)
        raise BudgetExceededError(
            f"{what} refused before any training: {lines}. Options: raise that site's budget "
            f"(privseg privacy budget RUN --site SITE --epsilon E, a decision recorded in its ledger), plan fewer "
            "DP steps (--repair-rounds 0, --local-steps), or erase by retrain from the checkpoint before the "
            "patient joined (--method retrain for a site): it spends as the original rounds did")
    return rows


def dp_local_finetune(run_dir: Path, cfg: FLConfig, site: str, exclude: tuple[str, ...], source: Path,
                      out_dir: Path, steps: int, scope: str) -> tuple[Path, dict]:
    """``steps`` DP-SGD steps on the site's retained patients from ``source``, booked in the site's
    ledger under ``scope``; returns (checkpoint, info)."""
    from privseg.federated.sites import site_items, site_seed
    from privseg.train.checkpoint import load_checkpoint, save_checkpoint
    from privseg.train.loop import make_optimizer
    from privseg.utils import pick_device

    dp = dp_of(cfg)
    spec = replace(cfg.site(site), exclude=tuple(dict.fromkeys((*cfg.site(site).exclude, *exclude))))
    tc = cfg.train
    items = site_items(spec, "train", tc.spacing)
    noise = (NoiseSource.reproducible(tc.seed + site_seed(site) + 7919) if dp.reproducible_noise
             else NoiseSource.for_state_dir(out_dir))  # fresh key: never the noise of a released round
    # the site's original plan (a site with a plan keeps it), booked under the erasure's scope
    private = make_private(replace(dp, ledger_scope=scope), site=site, items=items, ledger=site_ledger(run_dir, site),
                           noise=noise, subjects_per_step=tc.subjects_per_step, total_steps=tc.steps)
    model = tc.build_model().to(pick_device(tc.device))
    model.load_state_dict(load_checkpoint(source)["model"])
    private.train_round(model, make_optimizer(model, tc), items, replace(tc, seed=tc.seed + site_seed(site)),
                        1, 0, steps)
    eps = private.epsilon
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "unlearned.pt"
    save_checkpoint(ckpt, model, config=tc.to_dict(), step=steps,
                    extra={"train_subjects": [], "erasure": {"site": site, "excluded": list(exclude)}})
    return ckpt, {"strategy": "dp_finetune", "steps_run": steps, "epsilon_after": eps, "scope": scope,
                  "retain_patients_at_site": len(patient_groups(items))}
