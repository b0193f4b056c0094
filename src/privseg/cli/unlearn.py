"""`privseg unlearn`: erase subjects from a trained model and report the evidence."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.cohorts import CLASSES, CT_WINDOW, SPLITS, open_cohort
from privseg.cli.ui import out, progress, table


def register(app: typer.Typer) -> None:
    app.command()(unlearn)


def unlearn(
    checkpoint: Path = typer.Option(..., help="Trained checkpoint (.pt)."),
    cohort: Path = typer.Option(..., help="Cohort folder or manifest the model was trained on."),
    forget: str = typer.Option(..., help="Comma-separated subject IDs to erase, e.g. S03,S07."),
    strategy: str = typer.Option("noisy_label", help="noisy_label, retain_label, max_loss, random_encoder, "
                                 "learn_others, learn_noise, neggrad_plus, scrub, salun or retrain."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for unlearned.pt and report.json."),
    fix_decoder: bool = typer.Option(False, "--fix-decoder", help="Keep the decoder frozen."),
    epochs: int = typer.Option(None, min=1, help="Epochs (passes over the forget subjects); default 20 for "
                               "--target zero, 50 (maximum) for --target unseen."),
    target: str = typer.Option("zero", help="zero (drive forget Dice down, the study) or unseen (stop when the "
                               "forget subjects look like never-seen patients)."),
    retrain: Path = typer.Option(None, help="Retrained reference checkpoint (--strategy retrain) to compare with."),
    param: list[str] = typer.Option(None, help="Strategy hyper-parameter KEY=VALUE (repeatable)."),
    seed: int = typer.Option(0),
    check_every: int = typer.Option(2, min=1, help="--target unseen: steps between membership checks."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    splits: Path = SPLITS, classes: str = CLASSES, ct_window: str = CT_WINDOW,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Remove subjects' influence from a trained model; writes OUT/unlearned.pt and OUT/report.json.
    Then every model (original, unlearned, retrain) is evaluated on the retain, forget and test
    subjects, with progress: on CPU this can take longer than the unlearning."""
    from privseg.unlearn import parse_ids, report_rows
    from privseg.unlearn import unlearn as run_unlearn
    from privseg.unlearn.engine import mia_warnings

    ids = parse_ids(forget, "--forget")
    from privseg.unlearn.strategies import parse_params

    params = parse_params(param)
    c = open_cohort(cohort, splits, classes, ct_window, checkpoint)
    with progress(f"unlearning ({strategy})", 100, quiet) as update:
        evaluating = False

        def on_evaluate(done: int, total: int) -> None:
            nonlocal evaluating
            if not evaluating:  # a phase of its own, counted in subject passes
                evaluating = True
                update(done, "original, unlearned and retrain models", total=total, description="evaluating")
            else:
                update(done, "subject passes")

        result = run_unlearn(checkpoint, c, ids, strategy, fix_decoder=fix_decoder, epochs=epochs, target=target,
                             params=params, out_dir=out_dir, seed=seed, retrain_checkpoint=retrain,
                             check_every=check_every, device=device, on_evaluate=on_evaluate,
                             on_step=lambda s, n, loss: update(min(100, 100 * s // max(n, 1)),
                                                                 f"step {s}/{n} loss {loss:.3f}"))
    if quiet:
        return
    r = result.report
    cols, rows = report_rows(r)
    # one column per model, one row per metric: fits a terminal, and the CI sits under its AUC
    out.print(table(f"{strategy}{' + fix_decoder' if r['fix_decoder'] else ''}, target {target}: "
                    f"{r['steps_run']} steps, {r['seconds']:.1f} s", ["metric", *[row[0] for row in rows]],
                    [[c, *[row[i] for row in rows]] for i, c in enumerate(cols) if i]))
    for warning in mia_warnings(r):
        out.print(f"[bold yellow]* membership AUC:[/bold yellow] {warning}", highlight=False)
    if "forget_dice_distance_to_retrain" in r:
        out.print(f"|forget Dice - retrain's| = {r['forget_dice_distance_to_retrain']:.4f}   "
                  f"retain Dice / retrain's = {r['retain_dice_ratio']:.3f}")
    if "time_ratio" in r:
        out.print(f"time / retrain = {r['time_ratio']:.3f}  (speed-up {r['speedup']:.1f}x)")
    out.print(f"checkpoint: {result.checkpoint}\nreport: {result.report_path}")
