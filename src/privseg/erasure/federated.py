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

from privseg.audit.ledger import ErasureLedger, artefact, latest
from privseg.audit.mia import OnProgress
from privseg.audit.reference import load_references
from privseg.erasure.patient import erase_patient
from privseg.erasure.private import check_budget
from privseg.erasure.request import (
    LEDGER,
    ErasureJob,
    ErasureRequest,
    ErasureResult,
    StageCallback,
    read_result,
    validate,
    whole_patients,
)
from privseg.erasure.site import erase_site
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState, hold_run
from privseg.utils import versions


def erase(run_dir: str | Path, request: ErasureRequest, *, backend: str = "in-process",
          reference: str | Path | None = None, on_stage: StageCallback | None = None,
          on_progress: OnProgress | None = None, mia_views: int = 2) -> ErasureResult:
    """Apply ``request`` to the federated run in ``run_dir`` (or finish it after a crash).

    ``reference``: a checkpoint of a federated retrain without the erased data, for the
    distance-to-retrain part of the verification. ``on_stage(stage, message)`` reports each stage;
    ``on_progress(phase, done, total)`` the passes within the verification (loading the patients,
    scoring each model). Returns when the request is completed or its verification failed
    (``status``); raises :class:`PrivsegError` for bad requests, before anything is written (no
    ledger file is created for a request refused on a run that has none).

    The one place along a request that holds the run's lock (no training and no other erasure
    meanwhile), and the one that reads the run's config and state: the stages get them from here
    (:class:`~privseg.erasure.request.ErasureJob`)."""
    run_dir = Path(run_dir)
    path = run_dir / LEDGER
    say = on_stage or (lambda stage, msg: None)
    with hold_run(run_dir, f"erasure request ({request.kind} at site {request.site})"):
        cfg, state = FLConfig.load(run_dir), RunState.load(run_dir)
        request = whole_patients(cfg, request)
        rid = request.request_id(cfg.name)
        ledger = ErasureLedger(path, create=False) if path.exists() else None
        entries = ledger.entries(rid) if ledger is not None else []
        if not latest(entries, "requested"):
            validate(cfg, state, request, ledger)
        if request.kind == "patient" and request.needs_references:
            load_references(run_dir)  # none: refused before anything is recorded, naming the command
        if not entries:
            check_budget(run_dir, cfg, state, request)  # a new request: refused before any file or compute
        if request.method_reason:
            say("method", f"{request.method} ({request.method_reason})")
        if latest(entries, "completed"):
            say("done", f"request {rid} was already completed; nothing applied again")
            return read_result(run_dir, ledger, rid, "already-completed")
        if not latest(entries, "requested"):
            body = {"run": cfg.name, **request.to_dict(),
                    "source": {"round": state.rounds_done, **artefact(run_dir, state.last_checkpoint)},
                    "rounds_of_site": state.rounds_of_site(request.site), "versions": versions()}
            ledger = ledger or ErasureLedger(path)  # the first request of the run creates its ledger
            ledger.append(rid, "requested", body)
            say("requested", f"request {rid} recorded")
        job = ErasureJob(run_dir, cfg, state, request, rid, ledger, say, backend,
                         Path(reference) if reference is not None else None, mia_views, on_progress)
        try:
            (erase_patient if request.kind == "patient" else erase_site)(job)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                ledger.append(rid, "failed", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            raise
    status = "completed" if latest(ledger.entries(rid), "completed") else "verification-failed"
    return read_result(run_dir, ledger, rid, status)
