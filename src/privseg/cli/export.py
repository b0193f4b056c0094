"""`privseg export RUN|CHECKPOINT --format F --out DIR` and `privseg export verify DIR`."""

from pathlib import Path

import typer
from typer.core import TyperGroup

from privseg.cli.ui import out
from privseg.export import FORMATS, export_model, verify_export
from privseg.report.text import print_export, print_export_check


class _ExportGroup(TyperGroup):
    """`privseg export SOURCE ...` is `privseg export model SOURCE ...`; `verify` is the other command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_ExportGroup, no_args_is_help=True, help="privseg export RUN|CHECKPOINT --format F "
                  "--out DIR (the 'model' command): the model a run serves as a MONAI bundle, TorchScript or ONNX, "
                  "with its model card. privseg export verify DIR: check an export against its run.")


@app.command("model")
def model(
    source: str = typer.Argument(..., help="Run folder (federated or training) or checkpoint (.pt)."),
    fmt: str = typer.Option(..., "--format", help=" | ".join(FORMATS)),
    out_dir: Path = typer.Option(..., "--out", help="Export folder (must be empty, or an earlier export with "
                                 "--force)."),
    cohort: Path = typer.Option(None, help="The cohort the model trained on, where the run does not say."),
    modality: str = typer.Option(None, help="The modality whose preprocessing to record, where sites differ."),
    allow_pending: bool = typer.Option(False, "--allow-pending", help="Export although erasure requests are open "
                                       "or failed verification (the model card says so in its first line)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in --out."),
    evaluate: bool = typer.Option(True, help="Evaluate on the held-out patients for the model card."),
) -> None:
    """Export the model SOURCE serves (after an erasure, the erased model)."""
    m = export_model(source, fmt, out_dir, cohort=cohort, modality=modality, allow_pending=allow_pending,
                     force=force, evaluate=evaluate)
    print_export(out, m, out_dir)


@app.command("verify")
def verify(export_dir: Path = typer.Argument(..., help="An export folder."),
           run: Path = typer.Option(None, help="The run folder, if it moved since the export.")) -> None:
    """Check the exported files' hashes and recompute the privacy statement from the run; exit 1 if
    it no longer holds."""
    r = verify_export(export_dir, run)
    print_export_check(out, r)
    if not r["ok"]:
        raise typer.Exit(1)
