"""Read-only views of the federated run folders under the console's root (found through
:mod:`privseg.console.folders`), cut to what one user may see. Pages read the JSON files directly
(no model is built), so listing a hundred runs stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from privseg.console.accounts import User
from privseg.console.cache import budget_status, run_summary
from privseg.console.folders import read_dict, run_dirs, run_sites
from privseg.errors import PrivsegError
from privseg.federated.config import FLConfig
from privseg.privacy.budget import find_ledgers
from privseg.report.text import rounds_text

BUDGET_WARN = 0.8  # warn when a site has spent this share of its ε budget


def can_see_run(user: User, cfg: dict) -> bool:
    if user.site is None:
        return True
    current, withdrawn = run_sites(cfg)
    return user.site in current or user.site in withdrawn


def summary(d: Path) -> dict:
    """The run's summary (shared, read-only: pages must not modify it), re-read when its files change."""
    return run_summary(d, _summary)


def _privacy(cfg: dict):
    """The run's typed privacy spec (``FLConfig.privacy``, an old config's ``train.extra["dp"]``
    included); None without DP or when the config does not load."""
    try:
        return FLConfig.from_dict(cfg).privacy
    except (PrivsegError, TypeError, ValueError, AttributeError):
        return None


def _summary(d: Path) -> dict:
    cfg, st = read_dict(d / "fl_config.json"), read_dict(d / "state.json")
    sites, withdrawn = run_sites(cfg)
    dice = None
    for e in reversed(st.get("rounds", [])):
        ov = (e.get("eval") or {}).get("overall") or {}
        if ov.get("site-mean-dice") is not None:
            dice = ov["site-mean-dice"]
            break
    dp = _privacy(cfg)
    return {"serves": serving(st), "name": d.name, "cfg": cfg, "state": st, "sites": sites, "withdrawn": withdrawn,
            "rounds_done": int(st.get("rounds_done", 0)), "rounds_planned": cfg.get("rounds"),
            "rounds_text": rounds_text(st.get("rounds", []), int(st.get("rounds_done", 0)), cfg.get("rounds")),
            "status": st.get("status", "new"), "strategy": cfg.get("strategy"), "dp": dp.unit if dp else None,
            "created": st.get("created"), "dice": dice, "has_report": (d / "report.html").is_file()}


def serving(st: dict) -> dict | None:
    """The model the run serves now (its last checkpoint) and what made it: the training round, or
    the erasure whose repair round, site removal or unlearned model it is."""
    path = st.get("last_checkpoint")
    if not path:
        return None
    rounds = st.get("rounds") or []
    last = rounds[-1] if rounds else {}
    restart = st.get("restart_from") or {}
    erasure = last.get("erasure") or (restart.get("request") if restart.get("checkpoint") == path else None)
    return {"path": path, "round": int(st.get("rounds_done", 0)), "erasure": erasure}


def list_runs(root: Path, user: User) -> list[dict]:
    out = []
    for d in run_dirs(root):
        s = summary(d)
        if can_see_run(user, s["cfg"]):
            out.append(s)
    return sorted(out, key=lambda s: -(s["created"] or 0))


def rounds_view(s: dict, user: User) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """Per round: what this user may see; and each visible site's Dice curve [(round, dice)]."""
    rows, curves = [], {}
    for e in s["state"].get("rounds", []):
        parts = [p for p in e.get("participants", [])]
        sites_eval = (e.get("eval") or {}).get("sites") or {}
        dice = {site: m.get("mean-dice") for site, m in sites_eval.items() if user.sees_site(site)}
        for site, v in dice.items():
            if isinstance(v, int | float):
                curves.setdefault(site, []).append((int(e["round"]), float(v)))
        failed = [f for f in e.get("failed", []) if user.sees_site(str(f.get("site")))]
        rows.append({"round": e.get("round"), "n_participants": len(parts),
                     "participants": [p for p in parts if user.sees_site(p)],
                     "failed": failed, "applied": e.get("applied"), "erasure": e.get("erasure"),
                     "note": e.get("note"), "dice": dice,
                     "mean_dice": ((e.get("eval") or {}).get("overall") or {}).get("site-mean-dice")})
    return rows, curves


def budgets(d: Path, s: dict, user: User) -> list[dict]:
    """Per visible site: ε budget, spent, δ, ε after each booked round, refused rounds, warning."""
    try:
        paths = find_ledgers(d)
    except PrivsegError:
        return []
    refusals: dict[str, list[dict]] = {}
    for e in s["state"].get("rounds", []):
        for f in e.get("failed", []):
            if "BudgetExceededError" in str(f.get("reason", "")):
                refusals.setdefault(str(f.get("site")), []).append({"round": e.get("round"), "reason": f["reason"]})
    if s["status"] == "budget-exhausted":
        # the run stopped before its next round: every site refused it
        nxt = s["rounds_done"] + 1
        for site in s["sites"]:
            if not any(r["round"] == nxt for r in refusals.get(site, [])):
                refusals.setdefault(site, []).append({"round": nxt, "reason": s["state"].get("stop_reason", "")})
    out = []
    for path in paths:
        try:
            rows = budget_status(path)  # exact ε (the accountant over every event), once per ledger change
        except PrivsegError:
            continue
        for row in rows:
            if not user.sees_site(row["site"]):
                continue
            share = row["epsilon_spent"] / row["epsilon_budget"] if row["epsilon_budget"] else 1.0
            out.append({**row, "refused": refusals.get(row["site"], []), "share": share,
                        "points": releases(row["booked"], repair_rounds(s)),
                        "warning": "budget exhausted" if share >= 1 - 1e-9 else (
                            f"{share:.0%} of the budget spent" if share >= BUDGET_WARN else None)})
    return sorted(out, key=lambda r: r["site"])


def budget_steps(history: list[dict], points: list[dict]) -> list[tuple[float, float]]:
    """The budget as it stood along the releases: each decision (plan, raise) from the release
    after it was taken, as [(x, epsilon)] for :func:`privseg.console.svg.line_chart`'s ``steps``."""
    return [(sum(1 for p in points if (p["time"] or 0) < h["time"]) + 0.5, float(h["epsilon"])) for h in history]


def repair_rounds(s: dict) -> dict[int, str]:
    """Round -> erasure request of each round an erasure added to the run (repair, site removal)."""
    return {int(e["round"]): str(e["erasure"]) for e in s["state"].get("rounds", []) if e.get("erasure")}


TRAINING = "training"


def releases(booked: list[dict], erasure_rounds: dict[int, str]) -> list[dict]:
    """The site's booked releases in booking order, each with the part of the run it belongs to
    (``group``): ``training``, or ``erasure ER-…`` for an erasure's own scope (``erasure/ER-…/local``,
    its retrain or calibration) and for the repair rounds it added to the run; ``what`` names it
    ("round 3", "ER-…/local round 1"). ε after each is the accountant's over every release before
    it, so it never goes down."""
    out = []
    for i, r in enumerate(booked):
        scope, rnd = r.get("scope") or "", int(r["round"])
        if scope:
            parts = scope.split("/")
            group = f"erasure {parts[1]}" if parts[0] == "erasure" and len(parts) > 1 else scope
            what = f"{scope} round {rnd}"
        elif rnd in erasure_rounds:
            group, what = f"erasure {erasure_rounds[rnd]}", f"round {rnd} (repair)"
        else:
            group, what = TRAINING, f"round {rnd}"
        out.append({"n": i + 1, "epsilon": float(r["epsilon"]), "group": group, "what": what, "time": r.get("time"),
                    "steps": r.get("steps")})
    return out
