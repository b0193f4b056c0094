"""`privseg audit mia`: patient-level membership inference against a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.cohorts import CLASSES, SPLITS, open_cohort
from privseg.cli.ui import out, table
from privseg.utils import write_json

app = typer.Typer(no_args_is_help=True, help="Audits: membership inference.")


@app.command()
def mia(
    checkpoint: Path = typer.Option(..., help="Checkpoint (.pt) to attack."),
    cohort: Path = typer.Option(..., help="Cohort folder or manifest."),
    members: str = typer.Option(..., help="Comma-separated subject IDs the model trained on."),
    non_members: str = typer.Option(..., "--non-members", help="Comma-separated subject IDs it never saw."),
    reference: list[Path] = typer.Option(None, help="Reference checkpoint(s) trained without any scored subject "
                                         "(e.g. the retrained model): calibrates each subject's score (LiRA-style)."),
    statistic: str = typer.Option("loss", help="loss or dice."),
    views: int = typer.Option(4, min=1, help="Augmented views per subject."),
    seed: int = typer.Option(0),
    refuse_small: bool = typer.Option(False, "--refuse-small", help="Refuse (exit 2) when fewer than 5 members or "
                                      "5 non-members are scored, instead of printing the warning with the CI."),
    splits: Path = SPLITS, classes: str = CLASSES,
    json_out: Path = typer.Option(None, "--out", "--json", help="Write the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Membership AUC (members vs never-trained subjects) with a bootstrap 95 % interval."""
    from privseg.audit.mia import audit_checkpoint

    c = open_cohort(cohort, splits, classes)
    res = audit_checkpoint(checkpoint, c, members, non_members, reference_checkpoints=reference or (),
                           statistic=statistic, views=views, seed=seed, allow_small=not refuse_small)
    if json_out:
        write_json(json_out, res)
    if quiet:
        return
    rows = [[r["id"], "member", r["loss"], r["dice"], r["score"]] for r in res["members"]]
    rows += [[r["id"], "non-member", r["loss"], r["dice"], r["score"]] for r in res["nonmembers"]]
    out.print(table("per-subject membership scores", ["subject", "split", "loss", "Dice", "score"], rows))
    kind = f"calibrated on {res['n_reference_models']} reference model(s)" if res["calibrated"] else "uncalibrated"
    out.print(f"MIA AUC = {res['auc']:.3f}  (95 % CI {res['ci_low']:.3f}-{res['ci_high']:.3f}; {res['statistic']}, "
              f"{kind}; {res['n_members']} members, {res['n_nonmembers']} non-members)", highlight=False)
    if res.get("warning"):
        out.print(f"[yellow]warning:[/yellow] {res['warning']}", highlight=False)
