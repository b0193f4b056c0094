"""`privseg report RUN_OR_RESULT --out report.html`: one self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.ui import out


def register(app: typer.Typer) -> None:
    app.command()(report)


def report(
    path: Path = typer.Argument(..., help="Run folder (train, federated, unlearn), checkpoint, or result JSON."),
    out_html: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (figures go to "
                                  "<stem>_files/ beside it)."),
    subject: list[str] = typer.Option(None, help="Subject ID to show in the overlays (repeatable; default: the "
                                      "first test subject of each site)."),
    cohort: Path = typer.Option(None, help="Cohort folder or manifest, when the run does not record it."),
    evaluate: bool = typer.Option(True, help="Evaluate the run's checkpoint (Dice, MAE, HD95) when no "
                                  "evaluation with HD95 is stored."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write an HTML report (cohort, curves, metrics, overlays, privacy, unlearning) of a run."""
    from privseg.report import build_report

    path_out = build_report(path, out_html, subjects=subject or None, cohort=cohort, evaluate=evaluate)
    if not quiet:
        out.print(f"report: {path_out.resolve()}")
