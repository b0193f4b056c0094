"""`privseg train|evaluate|predict|unlearn`: a model trained, scored, applied, and made to forget."""

from pathlib import Path

import typer

from privseg.cli import ui
from privseg.cli.ui import COHORT, ERASURE, PARAM, QUIET, READING, SPACING, STEPS, TRAINING, take, with_options
from privseg.cohorts import open_cohort, train_config
from privseg.data.intensity import check_window
from privseg.erasure.central import erase_central, membership_lines
from privseg.erasure.request import WITHOUT_REFERENCES, ErasureRequest
from privseg.errors import ConfigError
from privseg.export import predict_export
from privseg.report.text import print_central_erasure, print_dice, print_training
from privseg.train import Trainer
from privseg.train.inference import evaluate_checkpoint, predict_subject
from privseg.train.warm_start import public_kind, train_public
from privseg.unlearn import STRATEGIES, parse_ids
from privseg.utils import one_of, parse_params, write_json


def MODEL(checkpoint: Path = typer.Option(..., help="Checkpoint (.pt).")): ...
UNLEARN = ui.options_from(ErasureRequest, "target", "epochs", "seed")  # resolved as privseg erase resolves them


@with_options(COHORT, ..., STEPS, TRAINING, *READING, SPACING, QUIET)
def train(out_dir: Path = typer.Option(Path("runs/train"), "--out", help="Run folder (checkpoint: last.pt)."),
          resume: bool = typer.Option(True, help="Continue from RUN/last.pt when it exists."),
          public: bool = typer.Option(False, "--public", help="Train a public warm start (for --init) on the embedded "
                                      "public cohort of COHORT's kind of images, none of COHORT's patients."), **o):
    """Train a segmentation model on a cohort's training subjects."""
    c = open_cohort(o["cohort"], o["splits"], o["classes"], o["ct_window"])
    cfg = train_config(c, spacing=o["spacing"], **take(o, STEPS), **take(o, TRAINING))
    ui.warn(check_window(c, private=False, how="--ct-window {lo},{hi} (recorded in the checkpoint)"))
    with ui.progress("training", cfg.steps, o["quiet"]) as update:
        step = lambda s, n, loss: update(s, f"loss {loss:.3f}")  # noqa: E731
        if public:
            ui.out.print(f"public checkpoint: {train_public(public_kind(c), out_dir, cfg, on_step=step)}")
            return
        r = Trainer(c, cfg, out_dir).fit(resume=resume, on_step=step)
    if not o["quiet"]:
        print_training(ui.out, r)


@with_options(MODEL, COHORT, ..., *READING, QUIET)
def evaluate(split: str = typer.Option("test", help="train, val or test."),
             json_out: Path = typer.Option(None, "--json", help="Write the full result as JSON."),
             hd95: bool = typer.Option(False, help="Also compute HD95 (slower)."), **o) -> None:
    """Per-subject and per-site Dice/MAE table of a checkpoint."""
    c = open_cohort(o["cohort"], o["splits"], o["classes"], o["ct_window"], o["checkpoint"])
    with ui.progress("evaluating", len(c.select(split)), o["quiet"]) as update:
        result = evaluate_checkpoint(o["checkpoint"], c, split, with_hd95=hd95, on_subject=lambda k, _n: update(k))
    print_dice(ui.out, result)
    if json_out:
        write_json(json_out, result)


@with_options(MODEL, COHORT, ..., *READING, checkpoint=typer.Option(None, help="Checkpoint (.pt)."),
              cohort=typer.Option(None, help="Cohort folder or manifest."))
def predict(subject: str = typer.Option(None, help="Subject ID to segment."), out_path: Path = typer.Option(
        ..., "--out", help="Output label map: .nii.gz for a 3D cohort, .png for a 2D one."),
        bundle: Path = typer.Option(None, help="Run an export (privseg export) instead of a checkpoint."),
        image: list[Path] = typer.Option(None, help="With --bundle: the image to segment (one file per channel)."),
        **o) -> None:
    """Write a subject's predicted label map in the input's own space: for a 3D cohort a NIfTI with
    the image's affine and header; for a 2D cohort a PNG mask of the image's size, in the dataset's
    label values (e.g. 0/255 where the masks are 0/255). With --bundle DIR, the export segments
    --image FILE (or --cohort's --subject)."""
    if bundle:
        images = image or (open_cohort(o["cohort"], o["splits"]).subject(subject).images if o["cohort"] else [])
        ui.out.print(f"wrote {predict_export(bundle, list(images), out_path)}")
        return
    if not (o["checkpoint"] and o["cohort"] and subject):
        raise ConfigError("give --checkpoint, --cohort and --subject (or --bundle DIR with --image FILE)")
    c = open_cohort(o["cohort"], o["splits"], o["classes"], o["ct_window"], o["checkpoint"])
    ui.out.print(f"wrote {predict_subject(o['checkpoint'], c, subject, out_path)}")


@with_options(..., UNLEARN, ERASURE, *READING, QUIET)
def unlearn(
    checkpoint: Path = typer.Option(..., help="Trained checkpoint (.pt)."),
    cohort: Path = typer.Option(..., help="Cohort folder or manifest the model was trained on."),
    forget: str = typer.Option(..., help="Comma-separated subject IDs to erase, e.g. S03,S07."),
    strategy: str = typer.Option(None, help=f"An unlearning strategy; default as privseg erase: {WITHOUT_REFERENCES} "
                                 f"(with reference models, reference_teacher does best). {one_of(STRATEGIES)}"),
    out_dir: Path = typer.Option(..., "--out", help="Folder for unlearned.pt and report.json."),
    fix_decoder: bool = typer.Option(False, "--fix-decoder", help="Keep the decoder frozen."),
    even_if_unflagged: bool = typer.Option(False, "--even-if-unflagged", help="Erase even a patient the "
                                           "membership test does not flag (nothing measurable to forget)."),
    certificate: Path = typer.Option(None, help="Write the erasure certificate (JSON + HTML) into this folder."),
    retrain: Path = typer.Option(None, help="Retrained reference checkpoint (--strategy retrain) to compare with."),
    param: list[str] = PARAM, check_every: int = typer.Option(2, min=1, help="Steps between stopping checks."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."), **o,
) -> None:
    """Erase subjects from a trained model as privseg erase does in a federation (OUT/unlearned.pt,
    OUT/report.json, the ledger of the checkpoint's folder, each stage recorded when it starts and
    ends; run it again after a crash to continue). With reference models, each patient's membership
    test is shown first; a patient it does not flag stops the erasure unless --even-if-unflagged."""
    c = open_cohort(cohort, o["splits"], o["classes"], o["ct_window"], checkpoint)

    def on_membership(before: dict) -> bool:
        ui.out.print("\n".join(membership_lines(before)), highlight=False)
        return not before.get("nothing_to_forget") or even_if_unflagged

    with ui.phased_progress("unlearning", o["quiet"]) as on_progress:
        res = erase_central(
            checkpoint, c, parse_ids(forget, "--forget"), strategy, fix_decoder=fix_decoder, params=parse_params(param),
            out_dir=out_dir, retrain_checkpoint=retrain, check_every=check_every, device=device,
            certificate_dir=certificate, on_membership=on_membership, **take(o, UNLEARN), **take(o, ERASURE),
            on_stage=None if o["quiet"] else lambda st, msg: ui.console.print(f"{st}: {msg}", highlight=False),
            on_progress=on_progress)
    if res is None:  # said even under --quiet: the user decides
        ui.console.print("nothing measurable to forget: nothing was recorded; --even-if-unflagged erases anyway")
        raise typer.Exit(1)
    if not o["quiet"]:
        print_central_erasure(ui.out, res)
    if res.status != "completed":  # said even under --quiet: the ledger records the erasure as not completed
        ui.console.print(f"[red]erasure verification failed[/red] (request {res.request_id}, not completed): "
                         + "; ".join(res.verification["failed_checks"]))
