"""Erasure from a centrally trained model, recorded like a federated one.

``privseg unlearn`` runs :func:`privseg.unlearn.engine.unlearn` on a checkpoint; this module
writes what it did into the ledger of the checkpoint's run folder (``<run>/erasure/ledger.db``,
the file a federated run keeps), with the events a federated patient erasure writes:
``requested`` -> ``local_unlearned`` -> ``verified`` -> ``completed`` (or the verification
failed), under the site ``central``. ``privseg erase certificate --run <run> REQUEST`` then
renders the same certificate.

The verification is the federated one (:func:`privseg.unlearn.verification._judge`): retain and
test Dice against the retrain when one was given (else the model before the erasure), and the
per-patient test against the run's reference models when the run has them (no PASS without
power; docs/membership.md). A request that was completed before is refused, never applied
twice. The source checkpoint is not deleted (it is the user's file): the ``completed`` entry
lists it as superseded and still present.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from privseg.audit.ledger import ErasureLedger, file_sha256
from privseg.errors import ConfigError
from privseg.unlearn.request import DEFAULT_THRESHOLDS, ErasureRequest
from privseg.utils import versions

CENTRAL_SITE = "central"
LEDGER = Path("erasure") / "ledger.db"


class CentralRequest(NamedTuple):
    ledger: Path
    request: ErasureRequest
    request_id: str
    source_sha256: str  # the model the request is about, hashed once before anything runs


def central_request(checkpoint, forget: Sequence[str], strategy: str, *, target: str, epochs: int | None,
                    params: dict | None, seed: int, reason: str = "", requested_by: str = "", approved_by: str = "",
                    statistic: str = "loss", thresholds: dict | None = None) -> CentralRequest:
    """The ledger, request and request ID of a central erasure; refused when the same patients
    were already erased from this model. A request is about one model: the run's name and the
    checkpoint's hash (a model trained again is another model, from which the same patient can
    be erased)."""
    run_dir = Path(checkpoint).resolve().parent
    req = ErasureRequest(kind="patient", site=CENTRAL_SITE, subjects=tuple(forget), reason=reason,
                         requested_by=requested_by, approved_by=approved_by, method=strategy, params=params or {},
                         target=target, epochs=epochs, repair_rounds=0, thresholds=thresholds or {}, seed=seed,
                         statistic=statistic)
    sha = file_sha256(checkpoint)
    rid = req.request_id(f"{run_dir.name}@{sha[:16]}")
    path = run_dir / LEDGER
    if path.exists():
        ledger = ErasureLedger(path, create=False)
        if any(e["event"] == "completed" for e in ledger.entries(rid)):
            raise ConfigError(f"{', '.join(forget)} already erased from this model ({checkpoint}) by request {rid} "
                              f"(ledger {path}): an erasure is never applied twice")
    return CentralRequest(path, req, rid, sha)


def erase_central(checkpoint, cohort, forget: Sequence[str], strategy: str = "noisy_label", *, target: str = "zero",
                  epochs: int | None = None, params: dict | None = None, seed: int = 0, reason: str = "",
                  requested_by: str = "", approved_by: str = "", statistic: str = "loss",
                  thresholds: dict | None = None, mia_views: int = 2, certificate_dir=None, **unlearn_kw):
    """:func:`privseg.unlearn.engine.unlearn` with the erasure recorded in the run's ledger (and
    its certificate written to ``certificate_dir``). A bad or repeated request is refused before
    anything runs or is written. Returns (UnlearnResult, request ID, ledger path, verification,
    certificate paths or None)."""
    from privseg.unlearn.engine import unlearn

    central = central_request(checkpoint, forget, strategy, target=target, epochs=epochs, params=params, seed=seed,
                              reason=reason, requested_by=requested_by, approved_by=approved_by, statistic=statistic,
                              thresholds=thresholds)
    # target "calibrated": the engine loads the reference models kept with the checkpoint's run
    result = unlearn(checkpoint, cohort, list(central.request.subjects), strategy, target=target, epochs=epochs,
                     params=params, seed=seed, mia_views=mia_views, statistic=statistic, **unlearn_kw)
    if result.checkpoint is None:
        raise ConfigError("an erasure recorded in the ledger needs the unlearned model written (out_dir)")
    ver = record_central_erasure(result, checkpoint, cohort, central, mia_views=mia_views)
    cert = None
    if certificate_dir is not None:
        from privseg.audit.certificate import write_certificate

        cert = write_certificate(central.ledger, central.request_id, certificate_dir)
    return result, central.request_id, central.ledger, ver, cert


def record_central_erasure(result, checkpoint, cohort, central: CentralRequest, *, mia_views: int = 2) -> dict:
    """Write the ledger entries of a finished central unlearning (``result``: an ``UnlearnResult``
    evaluated with the original and, when given, the retrained model). Returns the verification."""
    from privseg.unlearn.verification import _judge

    r = result.report
    if "unlearned" not in r:
        raise ConfigError("the unlearning was not evaluated: the ledger needs its verification")
    req, rid = central.request, central.request_id
    run_dir = Path(checkpoint).resolve().parent
    ledger = ErasureLedger(central.ledger)

    def rel(p) -> str:
        p = Path(p).resolve()
        return str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)

    ledger.append(rid, "requested", {"run": run_dir.name, **req.to_dict(),
                                     "source": {"round": None, "path": rel(checkpoint),
                                                "sha256": central.source_sha256}, "versions": versions()})
    ledger.append(rid, "local_unlearned", {
        "site": CENTRAL_SITE, "strategy": r["strategy"], "params": r["params"], "target": r["target"],
        "epochs": r["epochs"], "steps_run": r["steps_run"], "stopped_early": r["stopped_early"],
        "checks": r["checks"][-1:], "n_checks": len(r["checks"]), "seconds": r["seconds"],
        "retain_subjects_at_site": len(r["request"]["retain"]),
        "model": {"path": rel(result.checkpoint), "sha256": file_sha256(result.checkpoint)}})
    scores = {m: _scores(r[m]) for m in ("original", "unlearned", "retrain") if m in r}
    calibrated = _calibrated(run_dir, checkpoint, result, cohort, req, mia_views)
    base_name = "retrain" if "retrain" in scores else "before"
    base = scores.get("retrain", scores["original"])
    checks, failed = _judge(req.thresholds, scores["unlearned"], base, base_name, scores["original"], calibrated)
    ver = {"members": {CENTRAL_SITE: list(req.subjects)}, "mia_views": mia_views, "before": scores["original"],
           "after": scores["unlearned"], **({"retrain": scores["retrain"]} if "retrain" in scores else {}),
           "calibrated": calibrated, "checks": checks, "failed_checks": failed, "passed": not failed,
           "thresholds": req.thresholds, "seconds_erasure": r["seconds"]}
    ledger.append(rid, "verified", ver)
    if ver["passed"]:
        ledger.append(rid, "completed", {
            "model": {"path": rel(result.checkpoint), "sha256": file_sha256(result.checkpoint)}, "removed": [],
            "superseded_kept": [rel(checkpoint)], "passed": True, "dp": None,
            "note": "the source checkpoint still carries the patients: delete it (and its copies) to finish"})
    return ver


def _scores(block: dict) -> dict:
    mia = block.get("mia", {})
    out = {"retain_dice": block["retain"]["dice"], "test_dice": block["test"]["dice"],
           "forget_dice": block["forget"]["dice"], "mia_auc": mia.get("auc")}
    if mia.get("auc_calibrated") is not None:
        out["mia_auc_calibrated"] = mia["auc_calibrated"]
    return out


def _calibrated(run_dir: Path, checkpoint, result, cohort, req: ErasureRequest, views: int) -> dict:
    """The per-patient test of the models before and after against the run's reference models."""
    from privseg.audit import lira
    from privseg.audit import reference as refmod
    from privseg.data.transforms import load_preprocessed
    from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint

    try:
        refs = refmod.load_references(run_dir)
    except ConfigError as exc:
        return {"available": False, "reason": str(exc)}
    rq = result.report["request"]
    ids = [*req.subjects, *rq["retain"], *rq["test"]]
    payload = load_checkpoint(checkpoint)
    tc = payload["config"]
    items = load_preprocessed([cohort.subject(i) for i in ids], cohort, tc.get("spacing"))
    before = model_from_checkpoint(payload, checkpoint).eval()
    kw = {"views": views, "seed": req.seed, "nonmembers": rq["test"], "statistic": req.statistic}
    try:
        tb = refmod.calibrated_test(refs, before, items, tc["patch_size"], tc["num_classes"],
                                    members=[*req.subjects, *rq["retain"]], **kw)
        ta = refmod.calibrated_test(refs, result.model.eval(), items, tc["patch_size"], tc["num_classes"],
                                    members=rq["retain"], **kw)
    except ConfigError as exc:
        return {"available": False, "reason": str(exc)}
    return {"available": True, "n_references": len(refs.references), "references": refs.summary(),
            "check": lira.erasure_check(tb, ta, list(req.subjects)), "before": tb, "after": ta}


__all__ = ["CENTRAL_SITE", "DEFAULT_THRESHOLDS", "CentralRequest", "central_request", "erase_central",
           "record_central_erasure"]
