"""The privacy statement of an exported model, read from its run's ledgers and nothing else.

- **DP**: ε and δ per site as :func:`privseg.privacy.budget.budget_status` computes them from each
  site's ledger (the figures ``privseg privacy status`` prints), with whether they are a guarantee
  (secret-key noise) or bookkeeping; a run without a privacy ledger is "not private", and says why.
- **Erasures**: every request in the run's erasure ledger, as its certificate states it
  (:func:`privseg.audit.certificate.summarise`): ID, patients, status, verification result and the
  hash of the request's last ledger entry (the hash the certificate prints), plus the chain check.
- **Data**: sites and the patients per site whose data trained the model (erased ones left out).

:func:`statement` is deterministic for a run that has not changed, so ``export verify``
recomputes it and compares it with the one written at export.
"""

from __future__ import annotations

import json
from pathlib import Path

from privseg.audit.certificate import summarise as certificate_summary
from privseg.audit.ledger import ErasureLedger, file_sha256
from privseg.erasure.request import LEDGER
from privseg.errors import PrivsegError
from privseg.privacy.budget import budget_status, find_ledgers
from privseg.train.inference import evaluate_checkpoint
from privseg.train.inference import summarise as dice_summary

NOT_PRIVATE_NO_LEDGER = "NOT PRIVATE: trained without differential privacy (the run has no privacy ledger)"


def _dp_unit(served) -> str | None:
    """The DP unit the run was trained with, as its config records it (central DP is per patient)."""
    if served.run_dir is None:
        return None
    cfg = served.run_dir / "fl_config.json"
    if cfg.is_file():
        raw = json.loads(cfg.read_text()).get("privacy") or {}
        return raw.get("unit")
    return "patient"


def dp_statement(served) -> dict:
    """ε, δ per site from the run's privacy ledgers (``privacy status``), or why there is none."""
    try:
        ledgers = find_ledgers(served.run_dir) if served.run_dir is not None else []
    except PrivsegError:
        ledgers = []
    if not ledgers:
        why = NOT_PRIVATE_NO_LEDGER if served.run_dir is not None else \
            "NOT PRIVATE: a checkpoint outside any run (no ledger to state a privacy bound)"
        return {"private": False, "unit": None, "reason": why, "sites": {}}
    rows = budget_status(served.run_dir)
    sites = {r["site"]: {"epsilon": r["epsilon_spent"], "delta": r["delta"], "epsilon_budget": r["epsilon_budget"],
                         "rounds": r["rounds"], "private": r["private"], "guarantee": r["guarantee"],
                         "ledger": str(Path(r["ledger"]).resolve().relative_to(served.run_dir.resolve()))}
             for r in rows}
    private = bool(sites) and all(s["private"] for s in sites.values())
    reason = "every site's ε is a guarantee (secret-key noise, every release accounted)" if private else \
        "; ".join(f"site {k}: {v['guarantee']}" for k, v in sites.items() if not v["private"])
    return {"private": private, "unit": _dp_unit(served), "reason": reason, "sites": sites}


def erasure_statement(served) -> dict:
    """Every erasure request of the run as its certificate states it, and the ledger's chain check."""
    if served.run_dir is None or not (served.run_dir / LEDGER).is_file():
        return {"ledger": None, "chain_intact": None, "requests": []}
    ledger = ErasureLedger(served.run_dir / LEDGER, create=False)
    ok, problems = ledger.verify()
    out = []
    for r in ledger.requests():
        s = certificate_summary(ledger.entries(r["request"]))
        ver = s["verification"] or {}
        out.append({"request": s["request"], "kind": s["kind"], "site": s["site"], "subjects": s["subjects"],
                    "status": s["status"], "method": s["method"], "completed_at": s["completed_at"],
                    "verification": None if not ver else ("passed" if ver.get("passed") else "failed: " + "; ".join(
                        ver.get("failed_checks") or [])),
                    "membership": (s["membership"] or {}).get("result") if s["membership"] else None,
                    "certificate_hash": s["last_entry_hash"],
                    "model": (s["resulting_model"] or {}).get("sha256")})
    return {"ledger": LEDGER, "chain_intact": ok, "chain_problems": problems, "requests": out}


def data_statement(cohorts: list[tuple[str, object, list]]) -> dict:
    """Sites and the training patients (and scans) per site; held-out patients per site."""
    out = {}
    for site, _, subjects in cohorts:
        train = [s for s in subjects if s.split == "train"]
        held = [s for s in subjects if s.split == "test"]
        out[site] = {"patients": len({s.patient_id for s in train}), "scans": len(train),
                     "held_out_patients": len({s.patient_id for s in held})}
    return out


def statement(served, cohorts: list[tuple[str, object, list]]) -> dict:
    """The full privacy statement (see the module docstring)."""
    return {"model": {"sha256": file_sha256(served.checkpoint), "round": served.round,
                      "path": _rel(served), "run": str(served.run_dir.resolve()) if served.run_dir else None},
            "sites": data_statement(cohorts), "dp": dp_statement(served), "erasures": erasure_statement(served),
            "pending": [r["request"] for r in served.pending]}


def _rel(served) -> str:
    p = served.checkpoint.resolve()
    if served.run_dir is not None and p.is_relative_to(served.run_dir.resolve()):
        return str(p.relative_to(served.run_dir.resolve()))
    return str(p)


def evaluation(checkpoint: Path, cohorts: list[tuple[str, object, list]]) -> dict:
    """Dice per class on every site's held-out (test) patients, overall and per site."""
    rows = []
    for site, cohort, subjects in cohorts:
        held = [s.id for s in subjects if s.split == "test"]
        if held:
            rows += [{**r, "site": site} for r in evaluate_checkpoint(checkpoint, cohort, None, held)["subjects"]]
    if not rows:
        return {"n": 0, "note": "no held-out (test) patients to evaluate on"}
    return {"classes": cohorts[0][1].classes, **dice_summary(rows)}
