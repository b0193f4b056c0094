"""`privseg train|evaluate|predict`."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.cohorts import CLASSES, CT_WINDOW, SPACING, SPLITS, open_cohort, parse_spacing
from privseg.cli.ui import out, progress, table
from privseg.utils import write_json


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(evaluate)
    app.command()(predict)


def train(
    cohort: Path = typer.Option(..., help="Cohort folder or manifest."),
    out_dir: Path = typer.Option(Path("runs/train"), "--out", help="Run folder (checkpoint: last.pt)."),
    model: str = typer.Option("unet", help="Network name (unet, unet_tiny, resnet10/18/34/50)."),
    norm: str = typer.Option("group", help="batch, group or instance."),
    steps: int = typer.Option(300, min=1),
    patch: int = typer.Option(64, min=8, help="Patch side in voxels."),
    subjects_per_step: int = typer.Option(2, min=1),
    patches_per_subject: int = typer.Option(2, min=1),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(True, help="Continue from RUN/last.pt when it exists."),
    splits: Path = SPLITS, classes: str = CLASSES, ct_window: str = CT_WINDOW, spacing: str = SPACING,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train a segmentation model on a cohort's training subjects."""
    from privseg.data.transforms import ct_window as task_window
    from privseg.train import TrainConfig, Trainer

    c = open_cohort(cohort, splits, classes, ct_window)
    # the window a CT model learnt its intensities under, so evaluate/predict/unlearn apply it again
    extra = ({"ct_window": list(task_window(c))} if any(s.modality.upper() == "CT" for s in c.subjects) else {})
    cfg = TrainConfig.for_cohort(c, model=model, norm=norm, steps=steps, patch_size=(patch,) * c.spatial_dims,
                                 subjects_per_step=subjects_per_step, patches_per_subject=patches_per_subject,
                                 lr=lr, seed=seed, device=device, spacing=parse_spacing(spacing, c.spatial_dims),
                                 extra=extra)
    with progress("training", steps, quiet) as update:
        result = Trainer(c, cfg, out_dir).fit(resume=resume, on_step=lambda s, n, loss: update(s, f"loss {loss:.3f}"))
    if not quiet:
        out.print(f"checkpoint: {result['checkpoint']}  ({result['seconds']:.0f} s, resumed from step "
                  f"{result['resumed_from']})")


def evaluate(
    checkpoint: Path = typer.Option(..., help="Checkpoint (.pt)."),
    cohort: Path = typer.Option(..., help="Cohort folder or manifest."),
    split: str = typer.Option("test", help="train, val or test."),
    json_out: Path = typer.Option(None, "--json", help="Write the full result as JSON."),
    hd95: bool = typer.Option(False, help="Also compute HD95 (slower)."),
    splits: Path = SPLITS, classes: str = CLASSES, ct_window: str = CT_WINDOW,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Per-subject and per-site Dice/MAE table of a checkpoint."""
    from privseg.train.inference import evaluate_checkpoint

    c = open_cohort(cohort, splits, classes, ct_window, checkpoint)
    n = len(c.select(split))
    with progress("evaluating", n, quiet) as update:
        result = evaluate_checkpoint(checkpoint, c, split, with_hd95=hd95, on_subject=lambda k, _n: update(k))
    print_dice_table(result)
    if json_out:
        write_json(json_out, result)


def print_dice_table(result: dict) -> None:
    classes = result["classes"][1:]
    rows = [[r["id"], r["site"], *r["dice"], r["mean_dice"], r["mae"]] for r in result["subjects"]]
    summary = result["summary"]
    for site, s in summary["sites"].items():
        rows.append([f"[bold]{site} mean", site, *s["dice"], s["mean_dice"], s["mae"]])
    o = summary["overall"]
    rows.append(["[bold]all", "", *o.get("dice", []), o["mean_dice"], o["mae"]])
    out.print(table(f"Dice on {result['split']} subjects", ["subject", "site", *classes, "mean Dice", "MAE"], rows))


def predict(
    checkpoint: Path = typer.Option(..., help="Checkpoint (.pt)."),
    cohort: Path = typer.Option(..., help="Cohort folder or manifest."),
    subject: str = typer.Option(..., help="Subject ID to segment."),
    out_path: Path = typer.Option(..., "--out", help="Output label map: .nii.gz for a 3D cohort, .png for a 2D one."),
    splits: Path = SPLITS, classes: str = CLASSES, ct_window: str = CT_WINDOW,
) -> None:
    """Write a subject's predicted label map in the input's own space: for a 3D cohort a NIfTI with
    the image's affine and header; for a 2D cohort a PNG mask of the image's size, in the dataset's
    label values (e.g. 0/255 where the masks are 0/255)."""
    from privseg.train.inference import predict_subject

    path = predict_subject(checkpoint, open_cohort(cohort, splits, classes, ct_window, checkpoint), subject, out_path)
    out.print(f"wrote {path}")
