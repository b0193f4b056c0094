"""`privseg audit mia`: patient-level membership inference against a checkpoint;
`privseg audit references` / `privseg audit membership`: reference models kept with a run and the
per-patient membership test calibrated with them."""

from pathlib import Path

import typer

from privseg.audit.mia import STATISTICS, audit_checkpoint
from privseg.audit.reference import ReferenceSettings, ensure_references, readiness, readiness_line, run_membership
from privseg.cli.ui import CLASSES, COHORT, QUIET, SPLITS, options_from, out, phased_progress, with_options
from privseg.cohorts import open_cohort
from privseg.report.text import print_membership, print_mia, print_references
from privseg.utils import one_of, write_json

app = typer.Typer(no_args_is_help=True, help="Audits: membership inference.")
_JSON = typer.Option(None, "--out", "--json", help="Write the result as JSON.")


@app.command()
@with_options(..., COHORT, SPLITS, CLASSES, QUIET)
def mia(
    checkpoint: Path = typer.Option(..., help="Checkpoint (.pt) to attack."),
    members: str = typer.Option(..., help="Comma-separated subject IDs the model trained on."),
    non_members: str = typer.Option(..., help="Comma-separated subject IDs it never saw."),
    reference: list[Path] = typer.Option(None, help="Reference checkpoint(s) trained without any scored subject "
                                         "(e.g. the retrained model): calibrates each subject's score (LiRA-style)."),
    statistic: str = typer.Option("loss", help=f"Membership statistic. {one_of(STATISTICS)}"),
    views: int = typer.Option(4, min=1, help="Augmented views per subject."),
    seed: int = typer.Option(0),
    refuse_small: bool = typer.Option(False, "--refuse-small", help="Refuse (exit 2) when fewer than 5 members or "
                                      "5 non-members are scored, instead of printing the warning with the CI."),
    json_out: Path = _JSON, **o,
) -> None:
    """Membership AUC (members vs never-trained subjects) with a bootstrap 95 % interval."""
    c = open_cohort(o["cohort"], o["splits"], o["classes"])
    with phased_progress("membership audit", o["quiet"]) as on_progress:
        res = audit_checkpoint(checkpoint, c, members, non_members, reference_checkpoints=reference or (),
                               statistic=statistic, views=views, seed=seed, allow_small=not refuse_small,
                               on_progress=on_progress)
    _write_and_print(res, json_out, o["quiet"], print_mia)


def _write_and_print(res: dict, json_out: Path | None, quiet: bool, show) -> None:
    if json_out:
        write_json(json_out, res)
    if not quiet:
        show(out, res)


@app.command()
@with_options(..., options_from(ReferenceSettings, "n", "seed", "schedule"), QUIET)
def references(
    run: Path = typer.Option(..., help="Run folder: a federated run (fl_config.json) or a training run (last.pt)."),
    cohort: Path = typer.Option(None, help="Cohort of a central training run (federated runs know their sites)."),
    backend: str = typer.Option("in-process", help="in-process or simulation (Ray), for federated references."),
    quiet: bool = False, **o,
) -> None:
    """Train the run's reference models (each on half of its training patients) or reuse those kept with it."""
    say = (lambda k, what: None) if quiet else (lambda k, what: out.print(f"reference {k}: {what}"))
    c = open_cohort(cohort) if cohort else None
    if not quiet:
        out.print(readiness_line(readiness(run, o["n"], o["schedule"])))
    with phased_progress("reference models", quiet) as on_progress:
        refs = ensure_references(run, **o, backend=backend, cohort=c, on_reference=say, on_progress=on_progress)
    if not quiet:
        print_references(out, refs)


@app.command()
@with_options(..., QUIET)
def membership(
    run: Path = typer.Option(..., help="Run folder with reference models (privseg audit references)."),
    checkpoint: Path = typer.Option(None, help="Model to test (default: the one the run serves)."),
    cohort: Path = typer.Option(None, help="Cohort of a central training run."),
    views: int = typer.Option(2, min=1, help="Augmented views per patient."),
    seed: int = typer.Option(0), json_out: Path = _JSON, quiet: bool = False,
) -> None:
    """Per-patient membership test calibrated with the run's reference models (offline LiRA):
    p-value per patient, population AUC and TPR at 1 % FPR (training vs val/test patients)."""
    c = open_cohort(cohort) if cohort else None
    with phased_progress("membership test", quiet) as on_progress:
        res = run_membership(run, checkpoint, cohort=c, views=views, seed=seed, on_progress=on_progress)
    _write_and_print(res, json_out, quiet, print_membership)
