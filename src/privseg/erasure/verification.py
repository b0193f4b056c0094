"""Verification of an erasure and the record that closes it: the models before and after the
erasure (and a federated retrain, when given) scored on the erased subjects, the retained ones
and never-seen ones (Dice, membership AUC, the per-patient test against the run's reference
models), judged against the request's thresholds; on success the superseded artefacts are
deleted and the ``completed`` entry records them with the new model and the site's DP bound."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from privseg.audit import lira, mia
from privseg.audit import reference as refmod
from privseg.audit.copies import account, model_files
from privseg.audit.ledger import ErasureLedger, artefact, latest, latest_after
from privseg.audit.mia import OnProgress, phase_counter
from privseg.data.transforms import load_preprocessed
from privseg.erasure.private import dp_of
from privseg.erasure.request import ErasureJob, ErasureRequest
from privseg.errors import ConfigError, PrivsegError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.sites import SiteSpec, read_site_cohort, site_subjects
from privseg.privacy.budget import BudgetLedger, find_ledgers
from privseg.train import metrics
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.train.inference import evaluate_subjects
from privseg.utils import SITES_DIR


def site_cohorts(specs: Sequence[SiteSpec]) -> dict[str, object]:
    """The cohorts of ``specs``, each read once (path -> cohort)."""
    return {p: read_site_cohort(p) for p in dict.fromkeys(s.cohort for s in specs)}


def split_ids(cohorts: dict[str, object], spec: SiteSpec, splits: Sequence[str]) -> list[str]:
    """The IDs of the site's subjects (its excluded ones left out) in ``splits``."""
    return [s.id for s in site_subjects(cohorts[spec.cohort], spec) if s.split in splits]


def phases_of(on_progress: OnProgress | None, what: str) -> OnProgress | None:
    """``on_progress`` with each phase named after ``what`` (e.g. "model after the erasure: scoring
    the model"), so the same pass over several models reads as one phase each."""
    return None if on_progress is None else lambda phase, done, total: on_progress(f"{what}: {phase}", done, total)


def _dp_bound(run_dir: Path, cfg: FLConfig, site: str) -> dict | None:
    dp = cfg.privacy
    if dp is None:
        return None
    try:
        for path in find_ledgers(run_dir):
            for row in BudgetLedger(path).status():
                if row["site"] == site:
                    return {"unit": dp.unit, "epsilon": row["epsilon_spent"], "delta": row["delta"],
                            "ledger": str(path.resolve().relative_to(run_dir.resolve())), "private": row["private"],
                            "guarantee": row["guarantee"],
                            "meaning": "patient-level DP: a bound for every patient of the site"
                            if dp.unit == "patient" else "site-level DP: a bound for the site's whole data"}
    except PrivsegError:
        return None
    return None


def complete(job: ErasureJob, ver: dict, model: dict, personal: dict | None = None) -> None:
    """Delete the superseded files (listed, with their hashes, by the verification) and account
    for every copy of the erased data (:mod:`privseg.audit.copies`): the ``completed`` entry.
    ``personal``: the ``personalised`` stage's body (:mod:`privseg.erasure.personalised`), whose
    redone and deleted personalised models are copies too, and models the erasure covered."""
    run_dir, ledger, rid = job.run_dir, job.ledger, job.rid
    removed = []
    stale = [*ver["superseded"], *ver.get("references_superseded", [])]
    ledger.append(rid, "started", {"stage": "completed", "deleting": len(stale)})
    requested_at = latest(job.entries(), "requested")["at"]
    for a in stale:
        p = run_dir / a["path"]
        if p.is_file():
            p.unlink()
        removed.append(a)
    for d in sorted({(run_dir / a["path"]).parent for a in stale}, reverse=True):
        if d.is_dir() and d != run_dir and not any(d.iterdir()):
            d.rmdir()
    # the data-free initial model and the reference models that trained without the data never held it
    personal = personal or {}
    copies = account(run_dir, requested_at, deleted=removed, written=[run_dir / model["path"]],
                     never_saw=[job.state.checkpoint_path(0), *model_files(run_dir / refmod.REF_DIR),
                                *personal.get("never_saw", [])], personal=personal.get("copies", ()))
    covered = [{"model": "global", "path": model["path"], "fate": "erased"}, *personal.get("covered", [])]
    ledger.append(rid, "completed", {"model": model, "removed": removed, "copies": copies, "passed": True,
                                     "covered": covered, "serves": personal.get("serves"),
                                     "dp": _dp_bound(run_dir, job.cfg, job.req.site)})
    kept = [c["path"] for c in copies if c["fate"] == "kept"]
    job.say("completed", f"{len(removed)} superseded file(s) deleted; the run now serves {model['path']}"
            + (f"; {len(kept)} older file(s) kept that may hold the data: {', '.join(kept)}" if kept else ""))


def superseded(run_dir: Path, state: RunState, upto_round: int, from_round: int = 1,
               sites: Sequence[str] | None = None, extra: Sequence[Path] = ()) -> list[dict]:
    """Files derived from rounds ``from_round..upto_round``: global checkpoints (round 0, the
    data-free initial model, stays), stored updates, site-local states; plus ``extra``."""
    out = []
    for r in range(max(1, from_round), upto_round + 1):
        for p in [state.checkpoint_path(r), *sorted((run_dir / "updates" / f"r{r:04d}").glob("*.pt"))]:
            if p.is_file():
                out.append(artefact(run_dir, p))
    for d in sorted((run_dir / SITES_DIR).glob("*")):
        for p in sorted(d.glob("local_r*.pt")):
            r = int(p.stem.split("_r")[1])
            if from_round <= r <= upto_round or (sites is not None and d.name in sites):
                out.append(artefact(run_dir, p))
    out += [artefact(run_dir, p) for p in extra if Path(p).is_file()]
    return out


# -- verification ------------------------------------------------------------------------

def _load(specs: Sequence[SiteSpec], ids_by_site: dict[str, list[str]], spacing,
          on_progress: OnProgress | None = None, what: str = "loading patients") -> list[dict]:
    cohorts = site_cohorts(specs)
    wanted = [(cohorts[spec.cohort], i) for spec in specs for i in ids_by_site.get(spec.id, [])]
    tick = phase_counter(on_progress, what, len(wanted))
    items = []
    for k, (c, i) in enumerate(wanted):
        items += load_preprocessed([c.subject(i)], c, spacing)
        if tick:
            tick(k + 1, len(wanted))
    return items


def _model(path: Path) -> tuple[torch.nn.Module, dict]:
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload, path).eval(), payload["config"]


def _scores(model, groups: dict[str, list[dict]], members, nonmembers, tc: dict, views: int, seed: int,
            reference_rows: tuple[list[dict], list[dict]] | None = None,
            on_progress: OnProgress | None = None) -> tuple[dict, tuple[list, list]]:
    """Dice per group and the membership AUC of ``members`` vs ``nonmembers``; with the retrain's
    per-subject rows, also the AUC calibrated against it (each subject's score relative to the
    retrain's on the same subject: a patient that is easy for any model no longer looks like a
    member). Returns (scores, this model's rows). ``on_progress``: each pass over the patients."""
    out = {}
    for name, items in groups.items():
        tick = phase_counter(on_progress, f"Dice on the {name} patients", len(items))
        rows = evaluate_subjects(model, items, tc["patch_size"], tc["num_classes"], on_subject=tick) if items else []
        out[f"{name}_dice"] = metrics.mean([r["mean_dice"] for r in rows]) if rows else math.nan
        out[f"{name}_n"] = len(rows)
    res = mia.audit_items(model, members, nonmembers, tc["patch_size"], tc["num_classes"], views=views, seed=seed,
                          n_boot=1000, on_progress=phases_of(on_progress, "membership test"))
    out["mia_auc"], out["mia_ci"] = res.auc, [res.ci_low, res.ci_high]
    out["member_scores"] = [{"id": r["id"], "score": r["score"], "dice": r["dice"]} for r in res.members]
    out["nonmember_mean_score"] = float(sum(r["score"] for r in res.nonmembers) / len(res.nonmembers))
    keep = ("id", "loss", "dice")
    rows = ([{k: r[k] for k in keep} for r in res.members], [{k: r[k] for k in keep} for r in res.nonmembers])
    if reference_rows is not None:
        cal = mia.audit_items(model, members, nonmembers, tc["patch_size"], tc["num_classes"], views=views, seed=seed,
                              n_boot=1000, member_rows=[dict(r) for r in rows[0]],
                              nonmember_rows=[dict(r) for r in rows[1]], reference_rows=[reference_rows])
        out["mia_auc_calibrated"] = cal.auc
    return out, rows


def _param_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| / ||b|| over the floating-point state."""
    sa, sb = a.state_dict(), b.state_dict()
    num = sum(float((sa[k].float() - sb[k].float()).pow(2).sum()) for k in sb if sb[k].is_floating_point())
    den = sum(float(sb[k].float().pow(2).sum()) for k in sb if sb[k].is_floating_point())
    return math.sqrt(num / den) if den else math.nan


RETAIN_WITHHELD = ("withheld under DP: retain Dice is a statistic of the training patients that no ledger books; "
                   "the model's utility is judged on held-out patients (test Dice)")


def withhold_training_statistics(ver: dict) -> dict:
    """``ver`` without the figures computed on training patients (retain Dice and counts): under DP
    a certificate states utility on held-out patients only (docs/privacy.md, "What is released")."""
    out = dict(ver)
    for name in ("before", "after", "retrain"):
        if isinstance(out.get(name), dict):
            out[name] = {k: v for k, v in out[name].items() if not k.startswith("retain_")}
    return out


def judge(th: dict, after: dict, base: dict, base_name: str, before: dict | None = None,
           calibrated: dict | None = None) -> tuple[dict, list[str]]:
    """Checks with ``ok`` True (pass), False (fail) or None (no power / informative only: neither)."""
    # With a retrain to calibrate against, membership is judged relative to it (see _scores).
    mia_key = "mia_auc_calibrated" if "mia_auc_calibrated" in after else "mia_auc"
    auc_check = {"value": after[mia_key], "max": th["max_mia_auc"], "ok": after[mia_key] <= th["max_mia_auc"]}
    if before is not None and before.get(mia_key) is not None and before[mia_key] <= th["max_mia_auc"]:
        # the model before the erasure was already under the bound: this check could not fail
        auc_check.update(ok=None, result="no power", note=f"the model before the erasure scored "
                         f"{before[mia_key]:.4f}, already within the bound: the check could not fail")
    if calibrated and calibrated.get("available"):
        auc_check.update(ok=None, result="info", note="membership is decided by the per-patient test against "
                         "the reference models")
    checks = {
        mia_key: auc_check,
        "retain_dice_ratio": ({"value": after["retain_dice"] / base["retain_dice"], "vs": base_name,
                               "min": th["min_retain_dice_ratio"]} if "retain_dice" in after and "retain_dice" in base
                              else {"value": None, "vs": base_name, "min": th["min_retain_dice_ratio"], "ok": None,
                                    "result": "withheld", "note": RETAIN_WITHHELD}),
        "test_dice_ratio": {"value": after["test_dice"] / base["test_dice"], "vs": base_name,
                            "min": th["min_test_dice_ratio"]},
    }
    for k in ("retain_dice_ratio", "test_dice_ratio"):
        if checks[k]["value"] is not None:
            checks[k]["ok"] = bool(checks[k]["value"] >= checks[k]["min"])
    if calibrated and calibrated.get("available"):
        c = calibrated["check"]
        checks["membership_calibrated"] = {
            "value": c["value"], "min": c["alpha"], "vs": f"{c['n_references']} reference models",
            "ok": {"pass": True, "fail": False}.get(c["result"]), "result": c["result"],
            "note": "smallest p-value after the erasure among the patients the model before it flagged"
            if c["value"] is not None else "the model before the erasure flagged no erased patient (p >= "
            f"{c['alpha']}): the membership test has no power here"}
    for c in checks.values():
        c.setdefault("result", "pass" if c["ok"] else "fail")
    failed = [f"{k} {c['value']:.3f} {'>' if 'max' in c else '<'} {c.get('max', c.get('min'))}"
              for k, c in checks.items() if c["ok"] is False]
    return checks, failed


def retry_advice(verification: dict) -> str:
    """What to change before submitting a failed erasure again, from the checks of its
    ``verification`` that failed. Repair rounds restore Dice, and they also bring an erased patient
    back: the erasure benchmark measured it (docs/membership.md)."""
    failed = {name for name, c in (verification.get("checks") or {}).items() if c.get("ok") is False}
    membership = bool(failed & {"membership_calibrated", "mia_auc"})
    dice = bool(failed & {"retain_dice_ratio", "test_dice_ratio"})
    if membership and dice:
        return ("another --method: more --repair-rounds would restore Dice but also bring the patient back, fewer "
                "would cost Dice; or retrain the federation without the patient")
    if membership:
        return ("fewer --repair-rounds or another --method (repair rounds bring the patient back; see "
                "docs/membership.md), or retrain the federation without the patient")
    return "more --repair-rounds (they restore Dice), another --method, or a federated retrain as --reference"


def verify(job: ErasureJob, source: Path, after_path: Path, members_by_site: dict, nonmembers_by_site: dict,
           retain_by_site: dict, test_by_site: dict) -> dict:
    """The ``verified`` body: the models before and after the erasure (and the retrain, when the
    request has a ``reference``) scored on the erased subjects (``members_by_site``), never-seen
    ones, the retained and the test ones, judged with the request's thresholds."""
    req, specs, views, on_progress = job.req, job.cfg.sites, job.mia_views, job.on_progress
    after, tc = _model(after_path)
    before, _ = _model(source)
    spacing = tc.get("spacing")
    members = _load(specs, members_by_site, spacing, on_progress, "loading the erased patients")
    nonmembers = _load(specs, nonmembers_by_site, spacing, on_progress, "loading never-seen patients")
    if not nonmembers:
        raise ConfigError("verification needs never-seen subjects (val or test splits) to compare with")
    groups = {"retain": _load(specs, retain_by_site, spacing, on_progress, "loading retained patients"),
              "test": _load(specs, test_by_site, spacing, on_progress, "loading test patients")}
    t0 = time.perf_counter()
    out = {"members": members_by_site, "nonmembers": nonmembers_by_site, "mia_views": views}
    ref_rows = None
    if job.reference is not None:
        ref, _ = _model(Path(job.reference))
        out["retrain"], ref_rows = _scores(ref, groups, members, nonmembers, tc, views, req.seed,
                                           on_progress=phases_of(on_progress, "retrain"))
        out["retrain"]["checkpoint"] = str(job.reference)
        out["distance_to_retrain"] = _param_distance(after, ref)
        out["distance_before_to_retrain"] = _param_distance(before, ref)
    out["before"] = _scores(before, groups, members, nonmembers, tc, views, req.seed, ref_rows,
                            phases_of(on_progress, "model before the erasure"))[0]
    out["after"] = _scores(after, groups, members, nonmembers, tc, views, req.seed, ref_rows,
                           phases_of(on_progress, "model after the erasure"))[0]
    out["calibrated"] = _calibrated(job, before, after, members, groups["retain"], nonmembers, tc)
    # reference models that trained on the erased patients carry them too: deleted on completion
    out["references_superseded"] = refmod.superseded(job.run_dir, [m["id"] for m in members])
    if dp_of(job.cfg) is not None:
        out = withhold_training_statistics(out)
    base_name, base = ("retrain", out["retrain"]) if job.reference is not None else ("before", out["before"])
    out["checks"], out["failed_checks"] = judge(req.thresholds, out["after"], base, base_name, out["before"],
                                                out["calibrated"])
    out["passed"] = not out["failed_checks"]
    out["thresholds"] = req.thresholds
    out["verification_s"] = time.perf_counter() - t0
    return out


def _calibrated(job: ErasureJob, before, after, erased: list[dict], retain: list[dict], never_seen: list[dict],
                tc: dict) -> dict:
    """The per-patient membership test of the models before and after the erasure against the run's
    reference models (:mod:`privseg.audit.reference`), or why it was not run."""
    erased_ids = [m["id"] for m in erased]
    kept = [r for r in retain if r["id"] not in erased_ids]
    items = [*erased, *kept, *never_seen]
    never = [n["id"] for n in never_seen]
    try:
        refs = refmod.load_references(job.run_dir)
        kw = {"views": job.mia_views, "seed": job.req.seed, "nonmembers": never, "statistic": job.req.statistic}
        tb = refmod.calibrated_test(refs, before, items, tc["patch_size"], tc["num_classes"],
                                    members=[*erased_ids, *(r["id"] for r in kept)], **kw,
                                    on_progress=phases_of(job.on_progress, "per-patient test, model before"))
        ta = refmod.calibrated_test(refs, after, items, tc["patch_size"], tc["num_classes"],
                                    members=[r["id"] for r in kept], **kw,
                                    on_progress=phases_of(job.on_progress, "per-patient test, model after"))
    except ConfigError as exc:
        return {"available": False, "reason": str(exc)}
    return {"available": True, "n_references": len(refs.references), "references": refs.summary(),
            "check": lira.erasure_check(tb, ta, erased_ids), "before": tb, "after": ta}


def verified(job: ErasureJob, after_event: str, evidence: Callable[[], dict], what: str) -> dict | None:
    """The verification of the latest ``after_event`` (computed by ``evidence`` once, then read from the
    ledger), judged with the request's thresholds; None when it failed."""
    if latest_after(job.entries(), "verified", after_event) is None:
        job.ledger.append(job.rid, "started", {"stage": "verified"})
        job.say("verified", what)
        job.ledger.append(job.rid, "verified", evidence())
    ver = rejudged(job.rid, job.ledger, job.req, latest_after(job.entries(), "verified", after_event)["body"])
    if not ver["passed"]:
        job.say("verified", "verification FAILED: " + "; ".join(ver["failed_checks"]))
        return None
    return ver


def rejudged(rid: str, ledger: ErasureLedger, req: ErasureRequest, ver: dict) -> dict:
    """The stored verification, judged again (and recorded) when the request's thresholds changed."""
    if ver["thresholds"] == req.thresholds:
        return ver
    base_name = "retrain" if "retrain" in ver else "before"
    checks, failed = judge(req.thresholds, ver["after"], ver[base_name], base_name, ver.get("before"),
                           ver.get("calibrated"))
    ver = {**ver, "checks": checks, "failed_checks": failed, "passed": not failed, "thresholds": req.thresholds,
           "rejudged": True}
    ledger.append(rid, "verified", ver)
    return ver


def verify_patient(job: ErasureJob, requested: dict, repaired: dict) -> dict:
    """:func:`verify` of a patient erasure: the erased patients against every site's never-seen
    ones; Dice on every site's retained training and test patients."""
    req, sites = job.req, job.cfg.sites
    cohorts = site_cohorts(sites)
    return verify(job, job.run_dir / requested["source"]["path"], job.run_dir / repaired["model"]["path"],
                  {req.site: list(req.subjects)},
                  {s.id: split_ids(cohorts, s, ("val", "test")) for s in sites},
                  {s.id: split_ids(cohorts, s, ("train",)) for s in sites},
                  {s.id: split_ids(cohorts, s, ("test",)) for s in sites})
