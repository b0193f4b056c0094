"""Erasure from a centrally trained model, recorded like a federated one.

``privseg unlearn`` erases patients from a checkpoint of a central training run and records it in
the ledger of the checkpoint's run folder (``<run>/erasure/ledger.db``, the file a federated run
keeps), under the site ``central``; ``privseg erase status|certificate --run <run>`` read it as
they read a federated run's.

The request is the one ``privseg erase`` makes (:class:`~privseg.erasure.request.ErasureRequest`):
the same default method, target and stopping rule (``reference_teacher``: the calibrated target),
run through the same :meth:`~privseg.erasure.request.ErasureRequest.unlearn_args`. Before
anything is recorded, :func:`membership_before` tests each patient against the run's reference
models; a patient the test does not flag leaves nothing measurable to forget, and the caller
decides (``on_membership``) whether to go on.

The ledger is written ahead (:mod:`privseg.audit.ledger`): ``requested`` when the request is
accepted, then for each stage ``started`` when it begins and its event when it ends
(``local_unlearned``: the unlearning, its model written to ``out_dir``; ``verified``: the
evaluation and the verification; ``completed``: the copies of the patient dealt with). A process
killed at any point leaves the stage it was in on record (``privseg erase status``), and the same
request run again continues from there: a finished stage whose files are intact is not run again.

The verification is the federated one (:func:`privseg.erasure.verification.judge`): retain and
test Dice against the retrain when one was given (else the model before the erasure), and the
per-patient test against the run's reference models when the run has them (no PASS without
power; docs/membership.md). A request that was completed before is refused, never applied twice.

Completion accounts for every copy of the patients' influence (:mod:`privseg.audit.copies`):
reference models that trained on them are deleted (the next ``privseg audit references``
retrains them without the patients), as are the models of earlier attempts at the same request;
the source checkpoint is the training run's own file and is kept, listed as superseded and still
holding the patients, with any other model file of the run folder written before the erasure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from privseg.audit import lira
from privseg.audit import reference as refmod
from privseg.audit.certificate import write_certificate
from privseg.audit.copies import account, model_files, remaining
from privseg.audit.ledger import ErasureLedger, file_sha256, latest, open_stage
from privseg.audit.mia import OnProgress, load_items
from privseg.erasure.request import DEFAULT_THRESHOLDS, LEDGER, ErasureRequest, StageCallback
from privseg.erasure.verification import judge, phases_of, rejudged
from privseg.errors import ConfigError
from privseg.federated.runstate import hold_run
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.unlearn.engine import UnlearnResult, check_request, evaluate_unlearned, roles, unlearn
from privseg.utils import read_json, versions, write_json

CENTRAL_SITE = "central"
SOURCE_KEPT = ("the model the erasure started from, the training run's own checkpoint: privseg does not delete it, "
               "and it still holds the patient; delete it (and any copy of it) once the erased model replaces it")


class CentralRequest(NamedTuple):
    ledger: Path
    request: ErasureRequest
    request_id: str
    source_sha256: str  # the model the request is about, hashed once before anything runs


class CentralErasure(NamedTuple):
    result: object  # UnlearnResult: the erased model's report (its ``model`` is None when a stage was reused)
    request_id: str
    ledger: Path
    verification: dict
    certificate: tuple[Path, Path] | None
    status: str  # completed | verification-failed
    membership_before: dict


def central_request(checkpoint, forget: Sequence[str], strategy: str | None = None, *, target: str | None = None,
                    epochs: int | None = None, params: dict | None = None, seed: int = 0, reason: str = "",
                    requested_by: str = "", approved_by: str = "", statistic: str = "loss",
                    thresholds: dict | None = None) -> CentralRequest:
    """The ledger, request and request ID of a central erasure; refused when the same patients
    were already erased from this model, or when the request needs the run's reference models and
    there are none. Method, target and epochs left out are resolved as ``privseg erase`` resolves
    them (:class:`ErasureRequest`). A request is about one model: the run's name and the
    checkpoint's hash (a model trained again is another model, from which the same patient can
    be erased)."""
    run_dir = Path(checkpoint).resolve().parent
    req = ErasureRequest(kind="patient", site=CENTRAL_SITE, subjects=tuple(forget), reason=reason,
                         requested_by=requested_by, approved_by=approved_by, method=strategy, params=params or {},
                         target=target, epochs=epochs, repair_rounds=0, thresholds=thresholds or {}, seed=seed,
                         statistic=statistic)
    if req.needs_references:
        refmod.load_references(run_dir)  # none: refused before anything is recorded, naming the command
    sha = file_sha256(checkpoint)
    rid = req.request_id(f"{run_dir.name}@{sha[:16]}")
    path = run_dir / LEDGER
    if path.exists():
        ledger = ErasureLedger(path, create=False)
        if any(e["event"] == "completed" for e in ledger.entries(rid)):
            raise ConfigError(f"{', '.join(forget)} already erased from this model ({checkpoint}) by request {rid} "
                              f"(ledger {path}): an erasure is never applied twice")
    return CentralRequest(path, req, rid, sha)


def membership_before(central: CentralRequest, checkpoint, cohort, *, mia_views: int = 2,
                      on_progress: OnProgress | None = None) -> dict:
    """The per-patient test of the model before the erasure against the run's reference models
    (docs/membership.md), on the patients to erase, the model's other training patients and the
    never-seen test patients (the verification's "before", computed once). ``patients``: per
    patient to erase its p-value and whether the test flags it; ``nothing_to_forget`` when it
    flags none (the erasure could not be measured). Without reference models: ``available``
    False and the reason. ``on_progress``: loading the patients, then each model scored."""
    run_dir = Path(checkpoint).resolve().parent
    req = central.request
    try:
        refs = refmod.load_references(run_dir)
        payload = load_checkpoint(checkpoint)
        tc = payload["config"]
        retain, forget, _ = roles(payload, cohort, list(req.subjects), checkpoint)
        test = cohort.select("test")
        items = load_items([*forget, *retain, *test], cohort, tc.get("spacing"), on_progress)
        model = model_from_checkpoint(payload, checkpoint).eval()
        tb = refmod.calibrated_test(refs, model, items, tc["patch_size"], tc["num_classes"],
                                    members=[s.id for s in (*forget, *retain)], nonmembers=[s.id for s in test],
                                    views=mia_views, seed=req.seed, statistic=req.statistic, on_progress=on_progress)
    except ConfigError as exc:
        return {"available": False, "reason": str(exc)}
    rows = [{"id": p, "p": tb["patients"][p]["p"], "flagged": bool(tb["patients"][p]["flagged"]),
             "n_out": tb["patients"][p]["n_out"]} for p in req.subjects]
    return {"available": True, "alpha": tb["alpha"], "n_references": len(refs.references), "patients": rows,
            "nothing_to_forget": not any(r["flagged"] for r in rows), "test": tb}


def membership_lines(before: dict) -> list[str]:
    """:func:`membership_before` in words, one line per patient, for the person who decides."""
    if not before.get("available"):
        return [f"per-patient membership test: not run ({before.get('reason', '')}); the erasure cannot be "
                "measured against models that never saw the patient"]
    a = before["alpha"]
    lines = [f"patient {r['id']}: p = {r['p']:.4f} against {r['n_out']} reference models that never saw it: "
             + (f"flagged as trained-on (p < {a}): there is something to forget" if r["flagged"]
                else f"not flagged (p >= {a}): nothing measurable to forget") for r in before["patients"]]
    if before["nothing_to_forget"]:
        lines.append("the model before the erasure shows no measurable trace of the patient(s): an erasure "
                     "cannot be verified (the certificate would say NO POWER)")
    return lines


def erase_central(checkpoint, cohort, forget: Sequence[str], strategy: str | None = None, *,
                  target: str | None = None, epochs: int | None = None, params: dict | None = None, seed: int = 0,
                  reason: str = "", requested_by: str = "", approved_by: str = "", statistic: str = "loss",
                  thresholds: dict | None = None, mia_views: int = 2, certificate_dir=None, out_dir=None,
                  retrain_checkpoint=None, retrain_seconds: float | None = None, fix_decoder: bool = False,
                  check_every: int = 2, device: str = "auto",
                  on_membership: Callable[[dict], bool] | None = None, on_stage: StageCallback | None = None,
                  on_progress: Callable[..., None] | None = None) -> CentralErasure | None:
    """Erase ``forget`` from ``checkpoint``'s model, recorded stage by stage in the run's ledger
    (and its certificate written to ``certificate_dir``); or finish the same request after a
    crash. A bad or repeated request is refused before anything runs or is written. A new request
    first gets :func:`membership_before`; ``on_membership(result)`` returning False stops there,
    nothing recorded (returns None). ``on_progress(phase, done, total, info)`` reports each long
    part as it runs (:func:`privseg.report.text.phased_progress`): the membership tests (loading
    the patients, each model scored), the unlearning steps (info: the loss) and the evaluation
    (subject passes)."""
    central = central_request(checkpoint, forget, strategy, target=target, epochs=epochs, params=params, seed=seed,
                              reason=reason, requested_by=requested_by, approved_by=approved_by, statistic=statistic,
                              thresholds=thresholds)
    if out_dir is None:
        raise ConfigError("an erasure recorded in the ledger needs the unlearned model written (out_dir)")
    run_dir = Path(checkpoint).resolve().parent
    req, rid = central.request, central.request_id
    check_request(checkpoint, cohort, list(req.subjects), req.method, req.target, req.epochs, req.params)
    say = on_stage or (lambda stage, msg: None)
    with hold_run(run_dir, f"erasure request {rid}"):
        entries = ErasureLedger(central.ledger, create=False).entries(rid) if central.ledger.exists() else []
        requested = latest(entries, "requested")
        if requested is None:
            before = membership_before(central, checkpoint, cohort, mia_views=mia_views,
                                       on_progress=phases_of(on_progress, "membership test before"))
            if on_membership is not None and not on_membership(before):
                return None
        else:
            before = requested["body"].get("membership_before") or {"available": False, "reason": "not recorded"}
            stage = open_stage(entries)
            say("requested", f"request {rid} resumed" + (f" (interrupted in stage {stage['body']['stage']})"
                                                          if stage else ""))
        ledger = ErasureLedger(central.ledger)
        job = _Job(run_dir, Path(checkpoint), cohort, central, ledger, say, mia_views, device, {}, on_progress)
        try:
            if requested is None:
                requested = ledger.append(rid, "requested", {
                    "run": run_dir.name, "run_kind": "central", **req.to_dict(),
                    "source": {"round": None, "path": job.rel(checkpoint), "sha256": central.source_sha256},
                    "membership_before": before, "versions": versions()})
                say("requested", f"request {rid} recorded")
            local = job.local_stage(Path(out_dir), fix_decoder=fix_decoder, check_every=check_every)
            ver, report = job.verify_stage(local, retrain_checkpoint, retrain_seconds)
            if ver["passed"]:
                job.complete_stage(requested, local)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                ledger.append(rid, "failed", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            raise
    cert = None
    if certificate_dir is not None:
        cert = write_certificate(central.ledger, rid, certificate_dir)
    model_path = run_dir / local["model"]["path"]
    result = UnlearnResult(None, report, model_path, model_path.with_name("report.json"))
    return CentralErasure(result, rid, central.ledger, ver, cert, "completed" if ver["passed"]
                          else "verification-failed", before)


class _Job:
    """The stages of one central erasure request (each reads what the ledger already holds)."""

    def __init__(self, run_dir: Path, checkpoint: Path, cohort, central: CentralRequest, ledger: ErasureLedger,
                 say: StageCallback, mia_views: int, device: str, items: dict,
                 on_progress: Callable[..., None] | None = None):
        self.run_dir, self.checkpoint, self.cohort, self.central = run_dir, checkpoint, cohort, central
        self.req, self.rid, self.ledger, self.say = central.request, central.request_id, ledger, say
        self.mia_views, self.device, self.items, self.on_progress = mia_views, device, items, on_progress

    def _report(self, phase: str, info: str = ""):
        """A ``(done, total[, x])`` callback reporting ``phase`` (None without ``on_progress``)."""
        if self.on_progress is None:
            return None
        return lambda done, total, *x: self.on_progress(phase, min(done, total), total, info.format(*x))

    def rel(self, p) -> str:
        p = Path(p).resolve()
        return str(p.relative_to(self.run_dir)) if p.is_relative_to(self.run_dir) else str(p)

    def entries(self) -> list[dict]:
        return self.ledger.entries(self.rid)

    def settings(self, fix_decoder: bool, check_every: int) -> dict:
        return {**self.req.unlearn_args(), "fix_decoder": fix_decoder, "check_every": check_every}

    # -- 1. local unlearning ------------------------------------------------------------------
    def local_stage(self, out_dir: Path, *, fix_decoder: bool, check_every: int) -> dict:
        """The ``local_unlearned`` entry: an earlier one with the same settings whose model is
        intact, or a new unlearning (``started`` first)."""
        settings = self.settings(fix_decoder, check_every)
        done = latest(self.entries(), "local_unlearned")
        if done is not None and done["body"].get("settings") == settings and self._intact(done["body"]["model"]):
            self.say("local_unlearned", f"done before ({done['at']}): {done['body']['model']['path']}")
            return done["body"]
        self.ledger.append(self.rid, "started", {"stage": "local_unlearned", "settings": settings,
                                                 "out": self.rel(out_dir / "unlearned.pt")})
        self.say("local_unlearned", f"{self.req.method} ({self.req.target})")
        refs = None
        if self.req.needs_references:
            refs = refmod.load_references(self.run_dir)
        res = unlearn(self.checkpoint, self.cohort, list(self.req.subjects), **self.req.unlearn_args(),
                      out_dir=out_dir, evaluate=False, references=refs, mia_views=self.mia_views,
                      fix_decoder=fix_decoder, check_every=check_every, device=self.device, items=self.items,
                      on_step=self._report("unlearning", "loss {:.3f}"))
        r = res.report
        return self.ledger.append(self.rid, "local_unlearned", {
            "site": CENTRAL_SITE, "strategy": r["strategy"], "params": r["params"], "target": r["target"],
            "epochs": r["epochs"], "steps_run": r["steps_run"], "stopped_early": r["stopped_early"],
            "checks": r["checks"][-1:], "n_checks": len(r["checks"]), "seconds": r["seconds"],
            "retain_subjects_at_site": len(r["request"]["retain"]), "settings": settings,
            "model": {"path": self.rel(res.checkpoint), "sha256": file_sha256(res.checkpoint)}})["body"]

    def _intact(self, artefact: dict) -> bool:
        p = self.run_dir / artefact["path"]
        return p.is_file() and file_sha256(p) == artefact["sha256"]

    # -- 2. evaluation and verification ---------------------------------------------------------
    def verify_stage(self, local: dict, retrain_checkpoint, retrain_seconds) -> tuple[dict, dict]:
        """(verification, the unlearning report with its evaluation): the ``verified`` entry of
        this model when there is one (judged again if the thresholds changed), else evaluated now."""
        model_path = self.run_dir / local["model"]["path"]
        report_path = model_path.with_name("report.json")
        report = read_json(report_path, "unlearning report") if report_path.is_file() else {}
        entries = self.entries()
        ver = latest(entries, "verified")
        if ver is not None and ver["body"].get("model_sha256") == local["model"]["sha256"] and "unlearned" in report:
            return rejudged(self.rid, self.ledger, self.req, ver["body"]), report
        self.ledger.append(self.rid, "started", {"stage": "verified", "model": local["model"]})
        self.say("verified", "evaluating the models before and after, membership test and Dice")
        t0 = time.perf_counter()
        report.update(evaluate_unlearned(
            self.checkpoint, self.cohort, list(self.req.subjects), model_path, retrain_checkpoint=retrain_checkpoint,
            retrain_seconds=retrain_seconds, seconds=local["seconds"], mia_views=self.mia_views, seed=self.req.seed,
            device=self.device, items=self.items, on_evaluate=self._report("evaluating", "subject passes")))
        write_json(report_path, report)
        scores = {m: _scores(report[m]) for m in ("original", "unlearned", "retrain") if m in report}
        calibrated = self._calibrated(model_path, report)
        base_name = "retrain" if "retrain" in scores else "before"
        base = scores.get("retrain", scores["original"])
        checks, failed = judge(self.req.thresholds, scores["unlearned"], base, base_name, scores["original"],
                                calibrated)
        body = {"members": {CENTRAL_SITE: list(self.req.subjects)}, "mia_views": self.mia_views,
                "before": scores["original"], "after": scores["unlearned"],
                **({"retrain": scores["retrain"]} if "retrain" in scores else {}), "calibrated": calibrated,
                "checks": checks, "failed_checks": failed, "passed": not failed, "thresholds": self.req.thresholds,
                "seconds_erasure": local["seconds"], "verification_s": time.perf_counter() - t0,
                "model_sha256": local["model"]["sha256"]}
        self.ledger.append(self.rid, "verified", body)
        if failed:
            self.say("verified", "verification FAILED: " + "; ".join(failed))
        return body, report

    def _calibrated(self, model_path: Path, report: dict) -> dict:
        """The per-patient test of the models before and after against the run's reference models
        (the "before" one recorded with the request when it was run then)."""
        try:
            refs = refmod.load_references(self.run_dir)
        except ConfigError as exc:
            return {"available": False, "reason": str(exc)}
        req, rq = self.req, report["request"]
        payload = load_checkpoint(self.checkpoint)
        tc = payload["config"]
        ids = [*req.subjects, *rq["retain"], *rq["test"]]
        items = load_items([self.cohort.subject(i) for i in ids], self.cohort, tc.get("spacing"),
                           phases_of(self.on_progress, "membership test after"))
        kw = {"views": self.mia_views, "seed": req.seed, "nonmembers": rq["test"], "statistic": req.statistic}
        recorded = (latest(self.entries(), "requested")["body"].get("membership_before") or {}).get("test")
        after = model_from_checkpoint(load_checkpoint(model_path), model_path).eval()
        try:
            tb = recorded or refmod.calibrated_test(refs, model_from_checkpoint(payload, self.checkpoint).eval(),
                                                    items, tc["patch_size"], tc["num_classes"],
                                                    members=[*req.subjects, *rq["retain"]], **kw,
                                                    on_progress=phases_of(self.on_progress, "membership test before"))
            ta = refmod.calibrated_test(refs, after, items, tc["patch_size"], tc["num_classes"],
                                        members=rq["retain"], **kw,
                                        on_progress=phases_of(self.on_progress, "membership test after"))
        except ConfigError as exc:
            return {"available": False, "reason": str(exc)}
        return {"available": True, "n_references": len(refs.references), "references": refs.summary(),
                "check": lira.erasure_check(tb, ta, list(req.subjects)), "before": tb, "after": ta}

    # -- 3. every copy of the patients -----------------------------------------------------------
    def complete_stage(self, requested: dict, local: dict) -> dict:
        """Delete what the erasure may delete, account for every copy; the ``completed`` entry.
        The plan (the copies and their fates, with hashes) is recorded before anything is deleted,
        so a rerun after a crash mid-way finishes the same plan."""
        entries = self.entries()
        ver = latest(entries, "verified")
        planned = next((e for e in reversed(entries) if e["seq"] > ver["seq"] and e["event"] == "started"
                        and e["body"].get("stage") == "completed"), None)
        if planned is not None:
            copies = planned["body"]["copies"]
        else:
            copies = self._plan(requested, local, entries)
            self.ledger.append(self.rid, "started", {"stage": "completed", "copies": copies})
        self.say("completed", f"{len(copies)} copies of the patients' influence: deleting "
                 f"{sum(a['fate'] == 'deleted' for a in copies)}")
        removed = []
        for a in copies:
            if a["fate"] != "deleted":
                continue
            p = self.run_dir / a["path"]
            if p.is_file():
                p.unlink()
            removed.append({"path": a["path"], "sha256": a["sha256"]})
        for d in sorted({(self.run_dir / a["path"]).parent for a in removed}, reverse=True):
            if d.is_dir() and d != self.run_dir and not any(d.iterdir()):
                d.rmdir()
        left = remaining(copies)
        done = self.ledger.append(self.rid, "completed", {
            "model": local["model"], "removed": removed, "copies": copies,
            "superseded_kept": [a["path"] for a in left], "passed": True, "dp": None,
            "note": "still holding the patients: " + ", ".join(a["path"] for a in left) if left else ""})
        self.say("completed", f"{len(removed)} file(s) deleted; {len(left)} kept that still hold the patients"
                 + (": " + ", ".join(a["path"] for a in left) if left else ""))
        return done["body"]

    def _plan(self, requested: dict, local: dict, entries: list[dict]) -> list[dict]:
        final = local["model"]
        deleted = list(refmod.superseded(self.run_dir, self.req.subjects))
        notes = {}
        for e in entries:  # the models of earlier attempts at this request (other settings)
            m = e["body"].get("model") if e["event"] == "local_unlearned" else None
            if m and m["path"] != final["path"] and self._intact(m) and m["path"] not in {a["path"] for a in deleted}:
                deleted.append(m)
                notes[m["path"]] = "an earlier attempt at this request, superseded by the erased model"
        source = {"path": requested["body"]["source"]["path"], "sha256": self.central.source_sha256,
                  "reason": SOURCE_KEPT}
        final_path = self.run_dir / final["path"]
        return account(self.run_dir, requested["at"], deleted=deleted, superseded=[source], notes=notes,
                       never_saw=model_files(self.run_dir / refmod.REF_DIR), written=[final_path])


def _scores(block: dict) -> dict:
    mia = block.get("mia", {})
    out = {"retain_dice": block["retain"]["dice"], "test_dice": block["test"]["dice"],
           "forget_dice": block["forget"]["dice"], "mia_auc": mia.get("auc")}
    if mia.get("auc_calibrated") is not None:
        out["mia_auc_calibrated"] = mia["auc_calibrated"]
    return out


__all__ = ["CENTRAL_SITE", "DEFAULT_THRESHOLDS", "CentralErasure", "CentralRequest", "central_request",
           "erase_central", "membership_before", "membership_lines"]
