"""Erasure requests in a federation: forget a patient at a site, or a whole site.

A request goes through stages, each finished by one event in the run's erasure ledger
(:mod:`privseg.audit.ledger`); an event is appended only after the stage's files are written
(atomically), so a crash at any point leaves the request resumable: submitting it again
skips the stages the ledger shows done and finishes the others. The request ID is derived
from (run, kind, site, subjects), so the same request submitted twice is the same request:
once ``completed`` it is never applied again.

Patient (``kind="patient"``), stages:

1. ``requested``  -- the request (who, what, why), the model it applies to (round, SHA-256).
2. ``local_unlearned`` -- at the site, with the site's data only: an unlearning strategy of
   :mod:`privseg.unlearn.strategies` (default ``scrub`` with the ``unseen`` target: stop when the
   erased patient looks like the site's held-out patients) on the current global model; the
   patient is added to the site's ``exclude`` list, so no later round uses it.
3. ``repaired`` -- ``repair_rounds`` ordinary federated rounds with every site, starting from
   the unlearned model (restores what unlearning cost the other sites); they are appended to
   the run, which then serves the repaired model.
4. ``verified`` -- membership test of the erased patient against never-seen patients (every
   site's val/test subjects), Dice on retain and test subjects against the model before the
   erasure (and a federated retrain, when given); pass/fail against the request's thresholds.
   A failure is recorded and the request stays open: submit it again with other settings
   (:func:`privseg.erasure.verification.retry_advice` says which, from the failed checks).
5. ``completed`` -- the superseded artefacts (global checkpoints, stored updates and site-local
   states of every round up to the request, all of which carry the patient's influence) are
   deleted and their hashes recorded, with the new model's hash and, for DP runs, the ε the
   accountant gives the site (a bound on what any of its patients, the erased one included,
   could have leaked before the erasure).

Site (``kind="site"``): ``requested`` -> ``site_removed`` (``method="federaser"``: calibrated
federated unlearning from the stored per-round updates, Liu et al., "FedEraser", IWQoS 2021;
``method="fedrecover"``: the same rounds replayed without the site, most of them with the
remaining sites' updates estimated by the server from the stored ones, Cao et al., "FedRecover",
IEEE S&P 2023; ``method="retrain"``: federated retraining of the rounds since the site joined,
from the last global model before it joined) -> ``verified`` (membership of the site's training patients vs
its held-out ones; Dice of the remaining sites) -> ``completed`` (the site leaves the run's
config, the new model is installed as the next round, artefacts of every round it touched are
deleted).

Erasure runs in simulation or in-process (the same ServerApp/ClientApp as ``fl run``); it
needs the sites' data to be reachable from this machine, as in a simulation.
"""

from __future__ import annotations

from pathlib import Path

from privseg.audit.ledger import ErasureLedger
from privseg.erasure.patient import _local_dp_steps, _patient
from privseg.erasure.request import (
    DEFAULT_THRESHOLDS,
    KINDS,
    LEDGER,
    ErasureRequest,
    ErasureResult,
    StageCallback,
    _artefact,
    _latest,
    _NoErasuresYet,
    _result,
    _validate,
    whole_patients,
)
from privseg.erasure.site import (
    SITE_ERASERS,
    FedEraserCalibration,
    FedEraserSite,
    FedRecoverSite,
    RetrainSite,
    SiteJob,
    _site,
    derived_run,
    federaser_groups,
    federated_retrain,
    round_seconds,
    site_eraser,
)
from privseg.erasure.verification import _judge
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState, hold_run
from privseg.utils import versions

# The stages live in request, patient_erasure, site_erasure and verification; the names callers
# import from here (and ``federated_retrain``, which tests patch here) stay importable from here.
__all__ = ["DEFAULT_THRESHOLDS", "KINDS", "LEDGER", "SITE_ERASERS", "ErasureRequest", "ErasureResult",
           "FedEraserCalibration", "FedEraserSite", "FedRecoverSite", "RetrainSite", "SiteJob", "StageCallback",
           "_judge", "derived_run", "erase", "federaser_groups", "federated_retrain", "round_seconds", "site_eraser",
           "whole_patients"]


def erase(run_dir: str | Path, request: ErasureRequest, *, backend: str = "in-process",
          reference: str | Path | None = None, on_stage: StageCallback | None = None,
          mia_views: int = 2) -> ErasureResult:
    """Apply ``request`` to the federated run in ``run_dir`` (or finish it after a crash).

    ``reference``: a checkpoint of a federated retrain without the erased data, for the
    distance-to-retrain part of the verification. Returns when the request is completed or its
    verification failed (``status``); raises :class:`PrivsegError` for bad requests."""
    run_dir = Path(run_dir)
    cfg = FLConfig.load(run_dir)
    request = whole_patients(cfg, request)
    rid = request.request_id(cfg.name)
    if not (run_dir / LEDGER).exists():  # a bad first request is refused before the ledger file exists
        _validate(cfg, RunState.load(run_dir), request, _NoErasuresYet())
    if request.kind == "patient" and request.needs_references:
        from privseg.audit.reference import load_references

        load_references(run_dir)  # none: refused before anything is recorded, naming the command
    if not (run_dir / LEDGER).exists() or not ErasureLedger(run_dir / LEDGER).entries(rid):
        _check_dp_budget(run_dir, cfg, request)  # a new request: refused before any file or compute
    ledger = ErasureLedger(run_dir / LEDGER)
    say = on_stage or (lambda stage, msg: None)
    if request.method_reason:
        say("method", f"{request.method} ({request.method_reason})")
    entries = ledger.entries(rid)
    if _latest(entries, "completed"):
        say("done", f"request {rid} was already completed; nothing applied again")
        return _result(run_dir, ledger, rid, "already-completed")
    with hold_run(run_dir, f"erasure request {rid}"):
        state = RunState.load(run_dir)
        if not _latest(entries, "requested"):
            _validate(cfg, state, request, ledger)
            src = state.last_checkpoint
            ledger.append(rid, "requested", {
                "run": cfg.name, **request.to_dict(),
                "source": {"round": state.rounds_done, **_artefact(run_dir, src)},
                "rounds_of_site": state.rounds_of_site(request.site), "versions": versions()})
            say("requested", f"request {rid} recorded")
        try:
            if request.kind == "patient":
                _patient(run_dir, request, rid, ledger, backend, reference, say, mia_views)
            else:
                _site(run_dir, request, rid, ledger, backend, reference, say, mia_views)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                ledger.append(rid, "failed", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            raise
    entries = ledger.entries(rid)
    status = "completed" if _latest(entries, "completed") else "verification-failed"
    return _result(run_dir, ledger, rid, status)


def _dp_steps(cfg: FLConfig, state: RunState, req: ErasureRequest) -> dict[str, int]:
    """The DP steps each site would take for ``req`` (what the budgets must pay for)."""
    if req.kind == "patient":
        steps = {s.id: req.repair_rounds * cfg.local_steps for s in cfg.sites}
        steps[req.site] += _local_dp_steps(cfg, req)
        return steps
    steps = SITE_ERASERS[req.method].dp_steps(cfg, state, req)
    return {s.id: steps for s in cfg.sites if s.id != req.site} if steps else {}


def _check_dp_budget(run_dir: Path, cfg: FLConfig, req: ErasureRequest) -> None:
    from privseg.erasure.private import dp_of, require_budget

    if dp_of(cfg) is None:
        return
    state = RunState.load(run_dir)
    if state.rounds_done >= 1:
        require_budget(run_dir, cfg, _dp_steps(cfg, state, req), f"erasure of {req.kind} at site {req.site}", req)
