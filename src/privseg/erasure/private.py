"""Erasure from a run trained with patient-level DP: every step it takes is DP and paid for.

After a DP run, whatever touches a site's patients -- the local unlearning at the erasing site,
the repair rounds at every site, FedEraser's calibration rounds, a retrain -- runs under that
site's DP engine (its original noise plan, a fresh secret key) and is booked in the site's own
ledger (``<run>/sites/<site>/privacy.sqlite``), so the ε that ``privseg privacy status`` and the
certificate print is the ε of everything the server saw, the served model included. The local
unlearning is DP fine-tuning on the site's retained patients (the erased patient excluded): a
non-private unlearning pass would release a model outside the ledger.

:func:`erasure_cost` prices the planned work per site before anything runs (:func:`dp_steps`: the
steps a request takes); :func:`require_budget` refuses an erasure the budgets cannot pay for, with
the figures and the options.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from privseg.erasure.request import SITE_ERASERS, ErasureRequest
from privseg.errors import BudgetExceededError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.sites import site_items, site_seed
from privseg.privacy import DPConfig, NoiseSource, make_private, patient_groups, site_plan
from privseg.privacy.accountant import StepEvent, epsilon
from privseg.privacy.budget import BudgetLedger, ledger_path
from privseg.train.checkpoint import load_checkpoint, save_checkpoint
from privseg.train.loop import make_optimizer
from privseg.utils import pick_device


def dp_of(cfg: FLConfig) -> DPConfig | None:
    """The run's patient-level DP settings, or None (no DP, or client-level DP)."""
    return cfg.privacy if cfg.privacy is not None and cfg.privacy.unit == "patient" else None


def site_ledger(run_dir: Path, site: str) -> BudgetLedger:
    return BudgetLedger(ledger_path(run_dir, site))


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
                     "epsilon_budget": budget, "delta": delta,
                     # a site that takes no step spends nothing, whatever it spent before
                     "fits": steps <= 0 or after <= budget * (1 + 1e-6) + 1e-9})
    return rows


def local_dp_steps(cfg: FLConfig, req: ErasureRequest) -> int:
    """The DP fine-tuning steps of a patient erasure's local stage (``epochs`` x the local steps)."""
    return cfg.local_steps * max(1, int(req.epochs or 1))


def dp_steps(cfg: FLConfig, state: RunState, req: ErasureRequest) -> dict[str, int]:
    """The DP steps each site would take for ``req`` (what the budgets must pay for)."""
    if req.kind == "patient":
        steps = {s.id: req.repair_rounds * cfg.local_steps for s in cfg.sites}
        steps[req.site] += local_dp_steps(cfg, req)
        return steps
    steps = SITE_ERASERS[req.method].dp_steps(cfg, state, req)
    return {s.id: steps for s in cfg.sites if s.id != req.site} if steps else {}


def price(run_dir: Path, req: ErasureRequest, cfg: FLConfig | None = None,
          state: RunState | None = None) -> list[dict]:
    """:func:`erasure_cost` of the request ``req``: the DP steps each site would take for it (as the
    erasure takes them) and what they cost; empty when the run is not patient-level DP or has not
    trained (nothing is spent). ``cfg``, ``state``: the run's, when the caller has them loaded."""
    cfg = FLConfig.load(run_dir) if cfg is None else cfg
    if dp_of(cfg) is None:
        return []
    state = RunState.load(run_dir) if state is None else state
    return erasure_cost(run_dir, cfg, dp_steps(cfg, state, req)) if state.rounds_done >= 1 else []


def _variants(cfg: FLConfig, state: RunState, req: ErasureRequest) -> list[dict]:
    """Cheaper settings of ``req`` that its erasure runs with as given (a DP patient erasure: fewer
    repair rounds, one epoch of local steps; a site: another method the run can use, as the
    method's ``usable`` says)."""
    if req.kind == "patient":
        out = [{"repair_rounds": k} for k in range(req.repair_rounds - 1, -1, -1)]
        if (req.epochs or 1) > 1:
            out += [{"epochs": 1}] + [{"epochs": 1, "repair_rounds": k} for k in range(req.repair_rounds - 1, -1, -1)]
        return out
    return [{"method": m} for m in sorted(SITE_ERASERS) if m != req.method
            and getattr(SITE_ERASERS[m], "usable", lambda *_: False)(cfg, state, req.site)]


def budget_options(run_dir: Path, req: ErasureRequest, rows: list[dict] | None = None, cfg: FLConfig | None = None,
                   state: RunState | None = None) -> list[dict]:
    """What lets an unaffordable request go through, each tried against the budgets: the cheaper
    settings of :func:`_variants` that every site can pay for (the first of each kind: the most
    repair rounds that fit), then raising each short site's budget to what the request needs.
    Each option: ``{"text", "settings"}`` (request settings to change) or ``{"text", "budget":
    {site: epsilon}}`` (``privseg privacy budget``, a decision recorded in the site's ledger)."""
    cfg = FLConfig.load(run_dir) if cfg is None else cfg
    state = RunState.load(run_dir) if state is None else state
    rows = price(run_dir, req, cfg, state) if rows is None else rows
    short = [r for r in rows if not r["fits"]]
    if not short:
        return []
    out, seen = [], set()
    for change in _variants(cfg, state, req):
        kind = tuple(sorted(change))
        if kind in seen:
            continue
        cost = price(run_dir, replace(req, **change), cfg, state)
        if cost and all(r["fits"] for r in cost):
            seen.add(kind)
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in change.items())
            worst = max((r for r in cost if r["steps"] > 0), key=lambda r: r["epsilon_after"] / r["epsilon_budget"])
            out.append({"text": f"{flags} (then site {worst['site']} reaches epsilon {worst['epsilon_after']:.3g} "
                                f"of {worst['epsilon_budget']:g})", "settings": change})
    need = {r["site"]: math.ceil(r["epsilon_after"] * 100) / 100 for r in short}  # rounded up: it fits
    cmds = "; ".join(f"privseg privacy budget RUN --site {site} --epsilon {eps:g}" for site, eps in need.items())
    out.append({"text": f"raise the budget ({cmds}; a decision recorded in the site's ledger)", "budget": need})
    return out


def require_budget(run_dir: Path, cfg: FLConfig, steps_by_site: dict[str, int], what: str,
                   req: ErasureRequest | None = None, state: RunState | None = None) -> list[dict]:
    """Raise :class:`BudgetExceededError` -- before any compute -- when a site cannot pay; the
    message lists the options of :func:`budget_options` for ``req`` (each one that exists and fits)."""
    rows = erasure_cost(run_dir, cfg, steps_by_site)
    short = [r for r in rows if not r["fits"]]
    if short:
        lines = "; ".join(f"site {r['site']} needs epsilon {r['epsilon_after']:.3g} for {r['steps']} DP step(s) "
                          f"(spent {r['epsilon_spent']:.3g} of its budget {r['epsilon_budget']:g}, "
                          f"{max(0.0, r['epsilon_budget'] - r['epsilon_spent']):.3g} left)" for r in short)
        options = [o["text"] for o in budget_options(run_dir, req, rows, cfg, state)] if req is not None else []
        raise BudgetExceededError(f"{what} refused before any training: {lines}. Options: " + (
            "; or ".join(options) if options else "raise that site's budget (privseg privacy budget RUN --site SITE "
                                                  "--epsilon E, a decision recorded in its ledger)"))
    return rows


def check_budget(run_dir: Path, cfg: FLConfig, state: RunState, req: ErasureRequest) -> None:
    """A new request on a patient-level DP run: refused before any file or compute when a site's
    budget cannot pay for the DP steps it would take (:func:`require_budget`)."""
    if dp_of(cfg) is not None and state.rounds_done >= 1:
        require_budget(run_dir, cfg, dp_steps(cfg, state, req), f"erasure of {req.kind} at site {req.site}", req,
                       state)


def dp_local_finetune(run_dir: Path, cfg: FLConfig, site: str, exclude: tuple[str, ...], source: Path,
                      out_dir: Path, steps: int, scope: str) -> tuple[Path, dict]:
    """``steps`` DP-SGD steps on the site's retained patients from ``source``, booked in the site's
    ledger under ``scope``; returns (checkpoint, info)."""
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
