"""Which model an export takes, and the cohorts it was trained on: the model a run serves now.

- A federated run (``fl_config.json`` + ``state.json``) serves its state's ``last_checkpoint``: after
  an erasure, the erased model (:mod:`privseg.erasure.federated` installs it there).
- A training run (``last.pt``) serves ``last.pt``, or, once ``privseg unlearn`` completed an erasure
  recorded in the run's ledger, the model that erasure's ``completed`` entry names.
- A checkpoint file is exported as it is, unless the run it belongs to has erased a patient from it
  (its hash is a completed request's source): that file still carries the patient.

Erasure requests that are open or failed verification are ``pending``: the model served may still
carry their patients, so an export needs ``allow_pending`` (and the card says so first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privseg.audit.ledger import ErasureLedger, file_sha256
from privseg.cohorts import open_cohort
from privseg.erasure.request import LEDGER
from privseg.errors import CheckpointError, ConfigError, DataError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.sites import site_subjects
from privseg.report.tracking import read_run
from privseg.runs import erasure_requests


@dataclass
class Served:
    """The model to export and where its facts come from."""

    checkpoint: Path  # the model file
    kind: str  # federated | train | checkpoint
    run_dir: Path | None  # the run whose ledgers state its privacy (None: a bare checkpoint)
    requests: list[dict] = field(default_factory=list)  # erasure requests in the run's ledger
    round: int | None = None  # federated: the round the model closes

    @property
    def pending(self) -> list[dict]:
        """Requests not completed: still open, failed verification, or stopped by an error."""
        return [r for r in self.requests if not completed(r)]


def completed(request: dict) -> bool:
    """Whether a request (a ledger summary) was completed: events recorded after completion keep it so."""
    return "completed" in request.get("events", ())


def _federated(run_dir: Path) -> Served:
    state = RunState.load(run_dir)
    ckpt = state.last_checkpoint
    if ckpt is None or state.rounds_done < 1:
        raise CheckpointError(f"{run_dir}: the run has no model yet (no round finished)")
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: the model run {run_dir.name} serves is missing (state.json names it)")
    return Served(ckpt, "federated", run_dir, erasure_requests(run_dir), state.rounds_done)


def _completed_model(run_dir: Path, requests: list[dict]) -> Path | None:
    """The model of the latest completed erasure recorded in a training run's ledger."""
    done = [r for r in requests if completed(r)]
    if not done:
        return None
    entry = ErasureLedger(run_dir / LEDGER, create=False).events(done[-1]["request"])["completed"]
    path = Path(entry["body"]["model"]["path"])
    path = path if path.is_absolute() else run_dir / path
    if not path.is_file():
        raise CheckpointError(f"{path}: the erased model that request {done[-1]['request']} installed is missing "
                              f"(named in {run_dir / LEDGER})")
    return path


def _training(run_dir: Path) -> Served:
    requests = erasure_requests(run_dir)
    erased = _completed_model(run_dir, requests)
    if erased is None and not (run_dir / "last.pt").is_file():
        raise CheckpointError(f"{run_dir}: the run has no model (no last.pt)")
    return Served(erased or run_dir / "last.pt", "train", run_dir, requests)


def _run_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint file belongs to: its folder, or the folder above checkpoints/."""
    for d in (checkpoint.parent, checkpoint.parent.parent):
        if (d / "fl_config.json").is_file() or (d / "last.pt").is_file() or (d / LEDGER).is_file():
            return d
    return None


def served_model(source: str | Path) -> Served:
    """The model ``source`` (a run folder or a checkpoint file) serves, with its run's erasure requests."""
    p = Path(source)
    if not p.exists():
        raise DataError(p, "not found (no such run folder or checkpoint)")
    if p.is_dir():
        if (p / "fl_config.json").is_file():
            if not (p / "state.json").is_file():
                raise CheckpointError(f"{p}: the federated run has no model yet (no state.json)")
            return _federated(p)
        if (p / "last.pt").is_file() or (p / "run.json").is_file():
            return _training(p)
        raise DataError(p, "is a directory but not a run folder (no fl_config.json + state.json, no last.pt)")
    run_dir = _run_of(p.resolve())
    requests = erasure_requests(run_dir) if run_dir else []
    if requests:
        digest = file_sha256(p)
        ledger = ErasureLedger(run_dir / LEDGER, create=False)
        for r in requests:
            source = (ledger.events(r["request"]).get("requested") or {}).get("body", {}).get("source") or {}
            if completed(r) and source.get("sha256") == digest:
                served = _federated(run_dir) if (run_dir / "fl_config.json").is_file() else _training(run_dir)
                raise ConfigError(f"{p}: erasure request {r['request']} removed patient(s) "
                                  f"{', '.join(r.get('subjects') or []) or 'of site ' + str(r.get('site'))} from "
                                  f"this model; export the run, which serves {served.checkpoint}")
    kind = "federated" if run_dir and (run_dir / "fl_config.json").is_file() else "checkpoint"
    return Served(p, kind, run_dir, requests)


def check_pending(served: Served, allow_pending: bool) -> None:
    """Refuse a model with open or failed erasure requests unless ``allow_pending``."""
    if served.pending and not allow_pending:
        ids = ", ".join(f"{r['request']} ({r.get('status')})" for r in served.pending)
        raise ConfigError(f"{served.run_dir}: erasure request(s) {ids} are not completed, so the model may still "
                          "carry those patients; finish them (privseg erase ...) or export with --allow-pending "
                          "(the model card then says so in its first line)")


def cohorts_of(served: Served, cohort: str | Path | None = None) -> list[tuple[str, object, list]]:
    """(site, cohort, the site's subjects) of every site whose data trained the model, erased ones left
    out: the federated run's sites; a training run's cohort (run.json) per site; or ``cohort``."""
    if cohort is not None:
        c = open_cohort(Path(cohort), checkpoint=served.checkpoint)
        return [(site, c, c.select(None, site)) for site in c.sites]
    if served.kind == "federated" and served.run_dir is not None:
        cfg = FLConfig.load(served.run_dir)
        out = []
        for spec in cfg.sites:
            c = open_cohort(Path(spec.cohort), checkpoint=served.checkpoint)
            out.append((spec.id, c, site_subjects(c, spec)))
        return out
    if served.run_dir is not None:
        path = (read_run(served.run_dir) or {}).get("cohort_path")
        if path and Path(path).exists():
            splits = served.run_dir / "splits.csv"
            c = open_cohort(Path(path), splits if splits.is_file() else None, checkpoint=served.checkpoint)
            erased = {s for r in served.requests if completed(r) for s in r.get("subjects") or []}
            return [(site, c, [s for s in c.select(None, site) if s.id not in erased]) for site in c.sites]
    raise ConfigError(f"{served.checkpoint}: cannot tell which cohort the model was trained on (no run.json with "
                      "its cohort_path); give it with --cohort")
