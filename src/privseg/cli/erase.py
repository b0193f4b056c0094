"""`privseg erase` (erase a patient or a site from a federated run, certificates, status)
and `privseg ledger` (check the erasure ledger's hash chain, list its requests)."""

from pathlib import Path

import typer

from privseg.audit.ledger import verify_ledgers
from privseg.cli.ui import ERASURE, PARAM, QUIET, console, options_from, out, phased_progress, with_options
from privseg.erasure import DEFAULT_THRESHOLDS, ErasureRequest, Thresholds, retry_advice
from privseg.report.text import print_erasure, print_erasure_requests, print_ledger_checks
from privseg.runs import erase_from_run, erasure_certificate, erasure_request, erasure_run, run_requests

app = typer.Typer(help="Erase a patient or a whole site from a federated run, with verification and a ledger.",
                  invoke_without_command=True)
ledger_app = typer.Typer(no_args_is_help=True, help="The erasure ledger: hash-chain check and request list.")


REQUEST = options_from(ErasureRequest, "method", "target", "epochs", "repair_rounds", "calibration_ratio",
                       "calibration_interval", "seed")
THRESHOLDS = options_from(Thresholds, *DEFAULT_THRESHOLDS, unset=True)  # None: the request takes the default


@app.callback()
@with_options(..., REQUEST, THRESHOLDS, ERASURE, QUIET)
def erase(
    ctx: typer.Context, run: str = typer.Option(None, help="Federated run folder (or its name under runs/)."),
    site: str = typer.Option(None, help="Site (hospital) ID."),
    subject: list[str] = typer.Option(None, help="Patient (subject) ID to erase (repeatable, or A,B)."),
    whole_site: bool = typer.Option(False, "--whole-site", help="Erase the whole site (it leaves the federation)."),
    param: list[str] = PARAM,
    reference: Path = typer.Option(None, help="Checkpoint of a federated retrain without the erased data, to "
                                   "compare with (default: compare with the model before the erasure)."),
    backend: str = typer.Option("in-process", help="in-process or simulation (Ray), for the federated rounds."),
    references: int = typer.Option(None, "--references", min=2, help="Train (or reuse) N reference models of the "
                                   "run first, for the per-patient membership test (privseg audit references)."),
    **o,
) -> None:
    """Erase a patient (--subject) or a site (--whole-site) from RUN: recorded first, unlearned at the
    site, repaired with every site, verified (its passes shown as they go), then the old model's files are
    deleted. Re-running the same request after a crash finishes it; after completion it is never applied twice."""
    if ctx.invoked_subcommand is not None:
        return
    request = {k: v for k, v in locals().items() if k not in ("ctx", "reference", "backend", "references", "o")}
    quiet = o.pop("quiet")
    run_dir, req = erasure_request(**request, **o)
    say = (lambda stage, msg: None) if quiet else (lambda stage, msg: console.print(f"[bold]{stage}[/bold]: {msg}"))
    with phased_progress("verification", quiet) as on_progress:  # within a stage: the verification's passes
        res = erase_from_run(run_dir, req, references, backend, say, reference=reference, on_progress=on_progress)
    if not quiet:
        print_erasure(out, res, run_dir)
    if res.status == "verification-failed":
        console.print("[red]verification failed[/red]: the request stays open; re-run it with "
                      + retry_advice(res.verification))
        raise typer.Exit(1)


@app.command()
@with_options(..., QUIET)
def certificate(
    request: str = typer.Argument(..., help="Request ID (ER-...)."),
    run: str = typer.Option(..., help="Run folder, federated or central (or its name under runs/)."),
    out_dir: Path = typer.Option(None, "--out", help="Folder for REQ.json and REQ.html (default: RUN/erasure/)."),
    quiet: bool = False,
) -> None:
    """Write the certificate of one erasure request (JSON + printable HTML)."""
    j, h = erasure_certificate(erasure_run(run), request, out_dir)
    if not quiet:
        out.print(f"certificate: {h}\nrecord: {j}")


@app.command()
def status(run: str = typer.Option(..., help="Run folder, federated or central (or its name under runs/).")) -> None:
    """List the erasure requests of a run and their state (a stage started and never ended: running, or killed)."""
    print_erasure_requests(out, *run_requests(run))


@ledger_app.command()
def verify(paths: list[Path] = typer.Argument(..., help="Run folders, runs roots, or ledger.db files.")) -> None:
    """Recompute each erasure ledger's hash chain; exit 1 if any is broken."""
    checks = verify_ledgers(paths)
    print_ledger_checks(out, checks)
    if not all(c["ok"] for c in checks):
        raise typer.Exit(1)


@ledger_app.command("show")
def show(run: str = typer.Argument(..., help="Run folder, federated or central (or its name under runs/).")) -> None:
    """List the erasure requests recorded in a run's ledger."""
    print_erasure_requests(out, *run_requests(run))

