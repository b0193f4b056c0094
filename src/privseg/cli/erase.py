"""`privseg erase` (erase a patient or a site from a federated run, certificates, status)
and `privseg ledger` (check the erasure ledger's hash chain, list its requests)."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.ui import console, out, table

app = typer.Typer(help="Erase a patient or a whole site from a federated run, with verification and a ledger.",
                  invoke_without_command=True)
ledger_app = typer.Typer(no_args_is_help=True, help="The erasure ledger: hash-chain check and request list.")


def _run_dir(run: str | None) -> Path:
    from privseg.errors import ConfigError, DataError

    if not run:
        raise ConfigError("--run is required (a federated run folder, or a run name under runs/)")
    p = Path(run)
    for cand in (p, Path("runs") / run):
        if (cand / "fl_config.json").is_file():
            return cand
    raise DataError(p, "not a federated run (no fl_config.json here or under runs/)")


def _threshold_args(max_mia_auc, min_retain, min_test) -> dict:
    given = {"max_mia_auc": max_mia_auc, "min_retain_dice_ratio": min_retain, "min_test_dice_ratio": min_test}
    return {k: v for k, v in given.items() if v is not None}


@app.callback()
def erase(
    ctx: typer.Context,
    run: str = typer.Option(None, help="Federated run folder (or its name under runs/)."),
    site: str = typer.Option(None, help="Site (hospital) ID."),
    subject: list[str] = typer.Option(None, help="Patient (subject) ID to erase (repeatable, or A,B)."),
    whole_site: bool = typer.Option(False, "--whole-site", help="Erase the whole site (it leaves the federation)."),
    reason: str = typer.Option("", help="Why, for the ledger (e.g. 'GDPR art. 17')."),
    requested_by: str = typer.Option("", help="Who asked, for the ledger."),
    approved_by: str = typer.Option("", help="Who approved the request (e.g. the data-protection officer), "
                                    "for the ledger and the certificate."),
    method: str = typer.Option(None, help="Patient: an unlearning strategy (default scrub). "
                               "Site: federaser (default) or retrain."),
    param: list[str] = typer.Option(None, help="Strategy hyper-parameter KEY=VALUE (repeatable)."),
    target: str = typer.Option("unseen", help="Patient: unseen (stop when the patient looks never-seen) or zero."),
    epochs: int = typer.Option(None, min=1, help="Patient: maximum unlearning epochs."),
    repair_rounds: int = typer.Option(1, min=0, help="Patient: federated rounds with every site after unlearning."),
    calibration_ratio: float = typer.Option(0.5, help="FedEraser: calibration local steps / original local steps."),
    calibration_interval: int = typer.Option(2, min=1, help="FedEraser: calibrate every N-th round."),
    max_mia_auc: float = typer.Option(None, help="Pass only if the erased patients' membership AUC <= this "
                                      "(default 0.55)."),
    min_retain_dice_ratio: float = typer.Option(None, help="Pass only if retain Dice >= this x the reference's "
                                                "(default 0.95)."),
    min_test_dice_ratio: float = typer.Option(None, help="Pass only if test Dice >= this x the reference's "
                                              "(default 0.95)."),
    reference: Path = typer.Option(None, help="Checkpoint of a federated retrain without the erased data, to "
                                   "compare with (default: compare with the model before the erasure)."),
    backend: str = typer.Option("in-process", help="in-process or simulation (Ray), for the federated rounds."),
    references: int = typer.Option(None, "--references", min=2, help="Train (or reuse) N reference models of the "
                                   "run first, for the per-patient membership test (privseg audit references)."),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Erase a patient (--subject) or a site (--whole-site) from RUN: recorded first, unlearned at the
    site, repaired with every site, verified, then the old model's files are deleted. Re-running the same
    request after a crash finishes it; after completion it is never applied twice."""
    if ctx.invoked_subcommand is not None:
        return
    from privseg.errors import ConfigError
    from privseg.unlearn.federated import ErasureRequest
    from privseg.unlearn.federated import erase as run_erase
    from privseg.unlearn.strategies import parse_params

    if not site:
        raise ConfigError("--site is required")
    if whole_site and subject:
        raise ConfigError("give --subject or --whole-site, not both")
    if not whole_site and not subject:
        raise ConfigError("name the patient(s) with --subject, or erase the site with --whole-site")
    run_dir = _run_dir(run)
    subjects = tuple(x for s in (subject or []) for x in s.split(",") if x.strip())
    req = ErasureRequest(kind="site" if whole_site else "patient", site=site, subjects=subjects, reason=reason,
                         requested_by=requested_by, approved_by=approved_by, method=method,
                         params=parse_params(param), target=target,
                         epochs=epochs, repair_rounds=repair_rounds, calibration_ratio=calibration_ratio,
                         calibration_interval=calibration_interval,
                         thresholds=_threshold_args(max_mia_auc, min_retain_dice_ratio, min_test_dice_ratio),
                         seed=seed)
    say = (lambda stage, msg: None) if quiet else (lambda stage, msg: console.print(f"[bold]{stage}[/bold]: {msg}"))
    if references:
        from privseg.audit.reference import ensure_references

        # before the request: the references train on the run's patients as the model did
        ensure_references(run_dir, references, backend=backend,
                          on_reference=lambda k, what: say("references", f"reference model {k}: {what}"))
    res = _erase_leaving_no_empty_ledger(run_dir, lambda: run_erase(run_dir, req, backend=backend,
                                                                     reference=reference, on_stage=say))
    if not quiet:
        _print_verification(res.verification)
        out.print(f"request {res.request_id}: {res.status}"
                  + (f"; model {res.model}" if res.model else "")
                  + f"\ncertificate: privseg erase certificate {res.request_id} --run {run_dir}")
    if res.status == "verification-failed":
        console.print("[red]verification failed[/red]: the request stays open; re-run it with more "
                      "--repair-rounds, another --method, or a federated retrain as --reference")
        raise typer.Exit(1)


def _erase_leaving_no_empty_ledger(run_dir: Path, apply):
    """Run ``apply`` (the erasure) so that a request refused before anything was recorded leaves
    the run as it was: the library opens the ledger before it validates the request, and an empty
    erasure/ledger.db would claim the run has an erasure history. The run's lock is held meanwhile,
    so no other erasure can be writing to a ledger this removes."""
    from privseg.audit.ledger import ErasureLedger
    from privseg.federated.runstate import hold_run
    from privseg.unlearn.federated import LEDGER

    path = run_dir / LEDGER
    had_ledger = path.exists()
    with hold_run(run_dir, "erasure request (privseg erase)"):
        try:
            return apply()
        except BaseException:
            if not had_ledger and path.exists() and not ErasureLedger(path, create=False).entries():
                for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                    p.unlink(missing_ok=True)
                if not any(path.parent.iterdir()):
                    path.parent.rmdir()
            raise


def _print_verification(ver: dict) -> None:
    if not ver:
        return
    rows = [[name, ver[name]["mia_auc"], ver[name]["retain_dice"], ver[name]["test_dice"]]
            for name in ("before", "after", "retrain") if name in ver]
    out.print(table("verification", ["model", "MIA AUC (erased vs unseen)", "retain Dice", "test Dice"], rows))
    from privseg.audit.certificate import membership_statements

    for k, c in ver["checks"].items():
        bound = f"<= {c['max']}" if "max" in c else f">= {c['min']} (vs {c['vs']})"
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        label = {None: "NO POWER" if c.get("result") == "no power" else "not used"}.get(
            c["ok"], "PASS" if c["ok"] else "FAIL")
        out.print(f"  {k}: {value} {bound}  {label}" + (f"  ({c['note']})" if c.get("note") else ""))
    m = membership_statements(ver)
    if not m["available"]:
        out.print(f"  calibrated membership test: not run ({m['reason']})")
    for r in m["statements"]:
        out.print(f"  {r['verdict']}: {r['text']}")


@app.command()
def certificate(
    request: str = typer.Argument(..., help="Request ID (ER-...)."),
    run: str = typer.Option(..., help="Federated run folder (or its name under runs/)."),
    out_dir: Path = typer.Option(None, "--out", help="Folder for REQ.json and REQ.html (default: RUN/erasure/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write the certificate of one erasure request (JSON + printable HTML)."""
    from privseg.audit.certificate import write_certificate
    from privseg.unlearn.federated import LEDGER

    run_dir = _run_dir(run)
    j, h = write_certificate(run_dir / LEDGER, request, out_dir or run_dir / "erasure")
    if not quiet:
        out.print(f"certificate: {h}\nrecord: {j}")


@app.command()
def status(run: str = typer.Option(..., help="Federated run folder (or its name under runs/).")) -> None:
    """List the erasure requests of a run and their state."""
    _list_requests(_run_dir(run))


def _list_requests(run_dir: Path) -> None:
    from privseg.audit.ledger import ErasureLedger
    from privseg.unlearn.federated import LEDGER

    path = run_dir / LEDGER
    reqs = ErasureLedger(path, create=False).requests() if path.exists() else []
    rows = [[r["request"], r.get("kind"), r.get("site"), ",".join(r.get("subjects") or []) or "-", r["status"],
             {True: "pass", False: "FAIL"}.get(r.get("passed"), "-"), r.get("requested_at", "")] for r in reqs]
    out.print(table(f"erasure requests of {run_dir.name}", ["request", "kind", "site", "subjects", "status",
                                                            "verification", "requested"], rows))


@ledger_app.command()
def verify(paths: list[Path] = typer.Argument(..., help="Run folders, runs roots, or ledger.db files.")) -> None:
    """Recompute each erasure ledger's hash chain; exit 1 if any is broken."""
    from privseg.audit.ledger import ErasureLedger, find_ledgers
    from privseg.errors import DataError

    found = find_ledgers(paths)
    if not found:
        raise DataError(paths[0], "no erasure ledger (erasure/ledger.db) here")
    broken = 0
    for p in found:
        led = ErasureLedger(p, create=False)
        ok, problems = led.verify()
        n = len(led.entries()) if ok else "?"
        out.print(f"{p}: {'intact' if ok else 'BROKEN'} ({n} entries, head {led.head[:16]}...)" if ok
                  else f"{p}: BROKEN\n  " + "\n  ".join(problems))
        broken += not ok
    if broken:
        raise typer.Exit(1)


@ledger_app.command("show")
def show(run: str = typer.Argument(..., help="Federated run folder (or its name under runs/).")) -> None:
    """List the erasure requests recorded in a run's ledger."""
    _list_requests(_run_dir(run))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="erase")
    root.add_typer(ledger_app, name="ledger")
