"""`privseg audit mia`: patient-level membership inference against a checkpoint;
`privseg audit references` / `privseg audit membership`: reference models kept with a run and the
per-patient membership test calibrated with them."""

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


@app.command()
def references(
    run: Path = typer.Option(..., help="Run folder: a federated run (fl_config.json) or a training run (last.pt)."),
    n: int = typer.Option(8, "--n", min=2, help="Number of reference models (pairs of complementary halves)."),
    cohort: Path = typer.Option(None, help="Cohort of a central training run (federated runs know their sites)."),
    seed: int = typer.Option(0, help="Seed of the random halves."),
    backend: str = typer.Option("in-process", help="in-process or simulation (Ray), for federated references."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train the run's reference models (each on a random half of its training patients), or reuse
    those already kept under RUN/audit/references/."""
    from privseg.audit.reference import ensure_references

    c = open_cohort(cohort, None, None) if cohort else None
    say = (lambda k, what: None) if quiet else (lambda k, what: out.print(f"reference {k}: {what}"))
    refs = ensure_references(run, n, seed=seed, backend=backend, cohort=c, on_reference=say)
    if not quiet:
        out.print(f"{len(refs.references)} reference models in {refs.folder} ({len(refs.trained)} trained, "
                  f"{len(refs.reused)} reused)")


@app.command()
def membership(
    run: Path = typer.Option(..., help="Run folder with reference models (privseg audit references)."),
    checkpoint: Path = typer.Option(None, help="Model to test (default: the one the run serves)."),
    cohort: Path = typer.Option(None, help="Cohort of a central training run."),
    views: int = typer.Option(2, min=1, help="Augmented views per patient."),
    seed: int = typer.Option(0),
    json_out: Path = typer.Option(None, "--out", "--json", help="Write the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Per-patient membership test calibrated with the run's reference models (offline LiRA):
    p-value per patient, population AUC and TPR at 1 % FPR (training vs val/test patients)."""
    from privseg.audit.reference import run_membership

    c = open_cohort(cohort, None, None) if cohort else None
    res = run_membership(run, checkpoint, cohort=c, views=views, seed=seed)
    if json_out:
        write_json(json_out, res)
    if quiet:
        return
    rows = [[pid, r["n_out"], r["score"], r["mu_out"], r["t"], r["p"], "yes" if r["flagged"] else "no"]
            for pid, r in sorted(res["patients"].items())]
    out.print(table("per-patient membership test", ["patient", "OUT refs", "score", "OUT mean", "t", "p",
                                                    "flagged"], rows))
    pop = res["population"]
    out.print(f"population AUC = {pop['auc']:.3f}, TPR at 1 % FPR = {pop.get('tpr', float('nan')):.3f} "
              f"({pop['n_members']} training vs {pop['n_nonmembers']} never-seen patients; "
              f"{res['n_references']} reference models)", highlight=False)
