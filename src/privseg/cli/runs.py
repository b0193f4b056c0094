"""`privseg runs list|show`: find past runs (train, federated, unlearn) under a runs folder;
`privseg report RUN`: one self-contained HTML report of one."""

import json
from pathlib import Path

import typer

from privseg.cli.ui import QUIET, out, progress, with_options
from privseg.report import build_report
from privseg.report.text import print_run, print_runs, runs_json
from privseg.report.tracking import find_runs
from privseg.runs import find_run

app = typer.Typer(no_args_is_help=True, help="Find past runs: list them, show one.")


@app.command("list")
def list_runs(root: Path = typer.Argument(Path("runs"), help="Runs folder (searched 3 levels deep)."),
              kind: str = typer.Option(None, help="Only this kind: train, federated or unlearn."),
              json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Name, kind, date, status and key metric of every run, newest first."""
    runs = find_runs(root, kind=kind)
    out.print_json(runs_json(runs)) if json_out else print_runs(out, runs, root)


@app.command()
def show(run: Path = typer.Argument(..., help="Run folder, or a run's name under --root."),
         root: Path = typer.Option(Path("runs"), help="Runs folder to look the name up in."),
         json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Config and final metrics of one run."""
    info = find_run(run, root)
    out.print_json(json.dumps(info, default=str)) if json_out else print_run(out, info)


@with_options(..., QUIET)
def report(
    path: Path = typer.Argument(..., help="Run folder (train, federated, unlearn), checkpoint, or result JSON."),
    out_html: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (figures go to "
                                  "<stem>_files/ beside it)."),
    subject: list[str] = typer.Option(None, help="Subject ID to show in the overlays (repeatable; default: the "
                                      "first test subject of each site)."),
    cohort: Path = typer.Option(None, help="Cohort folder or manifest, when the run does not record it."),
    evaluate: bool = typer.Option(True, help="Evaluate the run's checkpoint (Dice, MAE, HD95) when no "
                                  "evaluation with HD95 is stored."), quiet: bool = False,
) -> None:
    """Write an HTML report (cohort, curves, metrics, overlays, privacy, unlearning) of a run."""
    with progress("evaluating for the report", 0, quiet) as update:  # the total is known once it starts
        path_out = build_report(path, out_html, subjects=subject or None, cohort=cohort, evaluate=evaluate,
                                on_evaluate=lambda k, n: update(k, total=n if k == 1 else None))
    if not quiet:
        out.print(f"report: {path_out.resolve()}")
