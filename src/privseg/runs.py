"""Runs as every entry point (CLI, benchmarks, demo, tests) finds, drives and judges them: one
rule for where a run folder is, a federated run driven in any of its modes, how it ended, and an
erasure request applied under the run's lock."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from flwr.supercore.logger import ConsoleHandler

from privseg.audit.certificate import write_certificate
from privseg.audit.ledger import ErasureLedger
from privseg.audit.reference import ensure_references
from privseg.erasure import LEDGER, ErasureRequest, default_method, erase
from privseg.errors import ConfigError, DataError, PrivsegError
from privseg.federated import RunState
from privseg.federated.deploy import deploy
from privseg.federated.simulation import simulate, simulate_inprocess
from privseg.report.tracking import describe_run, find_runs
from privseg.train.warm_start import write_start
from privseg.utils import parse_params

RUNS = Path("runs")
MODES = ("simulation", "in-process", "deployment")


def run_folder(run: str | Path, runs: str | Path = RUNS, marker: str | None = None, what: str | None = None) -> Path:
    """The one rule for run folders: RUN itself when it is there (holding ``marker`` when one is
    named), else RUNS/RUN. With ``what``, a RUNS/RUN without ``marker`` is refused, naming the path."""
    p = Path(run)
    if (p / marker).is_file() if marker else p.exists():
        return p
    cand = Path(runs) / run
    if what and not (cand / marker).is_file():
        raise DataError(p, f"not a {what} (no {marker} here or under {Path(runs)}/)")
    return cand


def find_run(run: str | Path, root: str | Path = RUNS) -> dict:
    """``describe_run`` of a run folder, or of the run of that name found under ``root``."""
    run, root = Path(run), Path(root)
    info = describe_run(run) if run.is_dir() else None
    if info is None and root.is_dir():
        named = [r for r in find_runs(root) if r["name"] == str(run) or Path(r["path"]).name == str(run)]
        info = named[0] if named else None
    if info is None:
        raise DataError(run, "not a run folder, and no run of that name under " + str(root))
    return info


# -- federated runs ------------------------------------------------------------------------------
def rounds_done(run_dir: Path) -> int:
    """Rounds a federated run has behind it (0 for a new run)."""
    return RunState.load_or_new(run_dir).rounds_done if (Path(run_dir) / "state.json").exists() else 0


def write_round_zero(cfg, run_dir: Path) -> None:
    """A new federated run with a warm start (``cfg.train.init``) begins from it: round 0's global
    checkpoint, written once."""
    path = RunState(run_dir).checkpoint_path(0)
    if cfg.train.init and not path.exists():
        write_start(cfg.train, path)


def run_federated(mode: str, cfg, run_dir: Path, on_round: Callable[[dict], None] | None = None, **kw):
    """Run (or resume) ``cfg`` in RUN_DIR: ``simulation`` (Flower on Ray), ``in-process`` (no Ray)
    or ``deployment`` (SuperLink and SuperNodes); ``kw`` goes to that mode's runner. Returns the
    run state."""
    if mode == "simulation":
        return simulate(cfg, run_dir, on_round=on_round, **kw)
    if mode == "in-process":
        return simulate_inprocess(cfg, run_dir, on_round=on_round, **kw)
    if mode == "deployment":
        return deploy(cfg, run_dir, on_round=on_round, **kw)
    raise ConfigError(f"mode {mode!r}: one of {', '.join(MODES)}")


def flower_reason(text: str) -> str:
    """Flower's error reply text ``<class 'privseg.errors.DataError'>:<'path: problem'>`` as
    ``DataError: path: problem``."""
    m = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", text.strip(), re.S)
    return f"{m.group(1)}: {m.group(2)}" if m else text.strip()


def check_outcome(state, done_before: int) -> list[str]:
    """Fail loudly when the rounds run after ``done_before`` applied none (every site failed, e.g.
    on unreadable data), with the first site error, instead of a "finished" run that learnt
    nothing. Returns a warning per site that failed in every round while others trained."""
    new = [e for e in state.rounds if int(e["round"]) > done_before]
    if not new:
        return []
    failed = [f for e in new for f in e.get("failed", [])]
    if not any(e.get("applied") for e in new):
        first = f"{failed[0]['site']}: {flower_reason(failed[0]['reason'])}" if failed else "no site replied"
        raise PrivsegError(f"{state.run_dir}: none of the {len(new)} round(s) run was applied (too few site "
                           f"updates); first failure: {first}")
    always = set.intersection(*[{f["site"] for f in e.get("failed", [])} for e in new])
    return [f"site {site} failed in every round "
            f"({flower_reason(next(f['reason'] for f in failed if f['site'] == site))[:300]})"
            for site in sorted(always)]


class _DropFlowerNoise(logging.Filter):
    """Flower lines that ask nothing of a privseg user:

    - "DEPRECATED FEATURE: The `run_simulation` function ...", at every simulation. The advice (use
      `flwr run`) is for code that calls Flower; privseg calls run_simulation itself because it
      drives the rounds in this process (progress, run state, resume).
    - "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.", at every round of a
      run without Flower's evaluation: privseg turns it off on purpose where it evaluates the
      model itself (erasure rounds, rounds between ``eval_every``)."""

    KNOWN = ("`run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(k in record.getMessage() for k in self.KNOWN)


def silence_known_noise() -> None:
    """Hide third-party warnings that ask nothing of a privseg user (each with its reason)."""
    flwr = logging.getLogger("flwr")
    if not any(isinstance(f, _DropFlowerNoise) for f in flwr.filters):
        flwr.addFilter(_DropFlowerNoise())
    plain_flower_logs()
    # Ray's tip announces that zero-GPU actors will one day see the GPUs. privseg gives simulated
    # sites num_gpus=0 and relies on today's behaviour (Ray hides the GPUs from them); nothing to do.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray, Ray will no longer override",
                            category=FutureWarning)


def plain_flower_logs() -> None:
    """Flower's own console lines as privseg wants them: no INFO lines (privseg reports each round
    itself, with its progress; warnings still show) and no colour codes where the stream is not a
    terminal (a file, a pipe, CI). Flower colours its level names whatever the stream, and only
    ``simulate`` lowered its level, so an in-process run (``fl run --in-process``, an erasure's
    repair rounds) printed both, ``--quiet`` or not."""
    for handler in logging.getLogger("flwr").handlers:
        if isinstance(handler, ConsoleHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.colored = bool(getattr(getattr(handler, "stream", None), "isatty", lambda: False)())


# -- erasure -------------------------------------------------------------------------------------
def erasure_request(run: str | None, *, site: str | None, subject: list[str] | None = None,
                    whole_site: bool = False, param: list[str] | None = None, max_mia_auc: float | None = None,
                    min_retain_dice_ratio: float | None = None, min_test_dice_ratio: float | None = None,
                    **fields) -> tuple[Path, object]:
    """The federated run folder and the :class:`ErasureRequest` of the erase options: a patient
    (``subject``, repeatable or ``A,B``) or a whole site; ``param`` as KEY=VALUE items; thresholds
    left out take the defaults."""
    if not site:
        raise ConfigError("--site is required")
    if whole_site and subject:
        raise ConfigError("give --subject or --whole-site, not both")
    if not whole_site and not subject:
        raise ConfigError("name the patient(s) with --subject, or erase the site with --whole-site")
    run_dir = federated_run(run)
    subjects = tuple(x for s in (subject or []) for x in s.split(",") if x.strip())
    given = {"max_mia_auc": max_mia_auc, "min_retain_dice_ratio": min_retain_dice_ratio,
             "min_test_dice_ratio": min_test_dice_ratio}
    if fields.get("method") is None:  # picked from the run (reference models or not), and said why
        fields["method"], fields["method_reason"] = default_method(run_dir, "site" if whole_site else "patient")
    return run_dir, ErasureRequest(kind="site" if whole_site else "patient", site=site, subjects=subjects,
                                   params=parse_params(param), **fields,
                                   thresholds={k: v for k, v in given.items() if v is not None})


def federated_run(run: str | None) -> Path:
    """The federated run folder RUN names (a folder, or a run name under runs/)."""
    if not run:
        raise ConfigError("--run is required (a federated run folder, or a run name under runs/)")
    return run_folder(run, RUNS, "fl_config.json", what="federated run")


def erase_from_run(run_dir: Path, request, references: int | None = None, backend: str = "in-process",
                   on_stage: Callable[[str, str], None] | None = None, **kw):
    """:func:`privseg.erasure.erase` of ``request`` on the run (``kw``: its other options, e.g.
    ``on_progress``). With ``references``, that many reference models of the run are trained (or
    reused) first, for the per-patient membership test."""
    if references:
        say = on_stage or (lambda stage, msg: None)
        # before the request: the references train on the run's patients as the model did
        ensure_references(run_dir, references, backend=backend,
                          on_reference=lambda k, what: say("references", f"reference model {k}: {what}"))
    return erase(run_dir, request, backend=backend, on_stage=on_stage, **kw)


def erasure_run(run: str) -> Path:
    """A federated run, or a central run whose erasures `privseg unlearn` recorded in its ledger."""
    try:
        return federated_run(run)
    except DataError:
        return run_folder(run, marker=LEDGER, what="federated run or a run with an erasure ledger")


def run_requests(run: str) -> tuple[Path, list[dict]]:
    """The run folder RUN names (:func:`erasure_run`) and the erasure requests of its ledger."""
    run_dir = erasure_run(run)
    return run_dir, erasure_requests(run_dir)


def erasure_certificate(run_dir: Path, request_id: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write the certificate of one erasure request of the run (JSON, printable HTML) into
    ``out_dir`` (default: RUN/erasure/); returns their paths."""
    return write_certificate(run_dir / LEDGER, request_id, out_dir or run_dir / "erasure")


def erasure_requests(run_dir: Path) -> list[dict]:
    """The erasure requests recorded in a run's ledger (none when it has no ledger)."""
    path = run_dir / LEDGER
    return ErasureLedger(path, create=False).requests() if path.exists() else []
