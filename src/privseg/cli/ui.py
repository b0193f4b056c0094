"""Glue shared by the sub-commands: the two consoles, progress on stderr, and option groups that
several commands take (one definition each, added to a command with :func:`with_options`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from rich.console import Console

from privseg.privacy.grad_sample import GRAD_METHODS
from privseg.report import text
from privseg.runs import silence_known_noise

console, out = Console(stderr=True), Console()
silence_known_noise()
PARAM = typer.Option(None, help="Strategy hyper-parameter KEY=VALUE (repeatable).")


def progress(description: str, total: int, quiet: bool = False):
    return text.progress(description, total, quiet, console=console)


def with_options(*groups, **replaced):
    """Give a command the options of ``groups`` (functions whose parameters are typer options),
    after its own parameters or where ``...`` stands among the groups; a group's option also
    defines a parameter of the command's own by that name, and ``replaced`` swaps an option's
    definition (e.g. another default). Typer reads the signature set here."""
    def decorate(f):
        shared = {n for g in groups if g is not ... for n in inspect.signature(g).parameters}
        params = []
        for g in groups if ... in groups else (..., *groups):
            for p in inspect.signature(f if g is ... else g, eval_str=True).parameters.values():
                if p.kind is not p.VAR_KEYWORD and not (g is ... and p.name in shared):
                    params.append(p.replace(kind=p.KEYWORD_ONLY, default=replaced.get(p.name, p.default)))
        f.__signature__ = inspect.Signature(params)
        return f
    return decorate


def take(options: dict, group) -> dict:
    """Remove the options of ``group`` from a command's ``options`` and return them."""
    return {k: options.pop(k) for k in inspect.signature(group).parameters}


def QUIET(quiet: bool = typer.Option(False, "--quiet", "-q")): ...


def RUNS(runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run folders.")): ...


def JSON(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")): ...


def COHORT(cohort: Path = typer.Option(..., help="Cohort folder or manifest.")): ...


def ERASURE(
    statistic: str = typer.Option("loss", help="Per-patient membership test statistic: loss or dice."),
    reason: str = typer.Option("", help="Why, for the erasure ledger (e.g. 'GDPR art. 17')."),
    requested_by: str = typer.Option("", help="Who asked, for the erasure ledger."),
    approved_by: str = typer.Option("", help="Who approved the request (e.g. the data-protection officer), for "
                                    "the ledger and the certificate."),
): ...


def SPLITS(splits: Path = typer.Option(None, help="Pin the splits from a file: nnU-Net's splits_final.json (fold "
                                       "0), or a CSV with columns id,site,split (optional patient), e.g. a run's "
                                       "splits.csv.")): ...


def CLASSES(classes: str = typer.Option(None, help="Declare the classes of a plain NIfTI or 2D image folder, one "
                                        "name per label value 0, 1, 2, ..., e.g. background,lesion.")): ...


def CT_WINDOW(ct_window: str = typer.Option(
        None, metavar="LO,HI", help="CT intensity window in HU mapped to [0, 1], e.g. --ct-window=0,80 for brain "
        "(default: the cohort's ct_window in its manifest info or dataset.json, else -200,300). Recorded in the "
        "checkpoint, so evaluate/predict/unlearn use it again.")): ...


def SPACING(spacing: str = typer.Option(
        None, metavar="MM", help="Resample 3D volumes to this voxel spacing in mm: one number (isotropic) or X,Y,Z, "
        "e.g. 1 or 1,1,3 (default: keep each volume's own). Recorded in the checkpoint.")): ...


def TRAINING(
    model: str = typer.Option("unet", help="Network name (unet, unet_tiny, resnet10/18/34/50)."),
    norm: str = typer.Option("group", help="batch, group or instance."),
    patch: int = typer.Option(64, min=8, help="Patch side in voxels."),
    subjects_per_step: int = typer.Option(2, min=1), patches_per_subject: int = typer.Option(2, min=1),
    lr: float = typer.Option(2e-3), seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
): ...


def DP(
    dp: str = typer.Option("patient", help="DP unit: patient (DP-SGD in each site) or site (DP-FedAvg at the server)."),
    epsilon: float = typer.Option(8.0, help="Privacy budget epsilon (per site)."),
    delta: float = typer.Option(1e-5, help="delta; must be below 1/(patients at the site)."),
    clip: str = typer.Option("adaptive", help="fixed or adaptive (private quantile, Andrew et al. 2021)."),
    clip_norm: float = typer.Option(1.0, help="Clip norm (adaptive: its starting value)."),
    target_quantile: float = typer.Option(0.5, help="Adaptive clip: target quantile of the norms."),
    noise_schedule: str = typer.Option("constant", help="constant or decay (calibrated to the budget)."),
    allow_large_delta: bool = typer.Option(False, "--allow-large-delta", help="Allow delta >= 1/n (not recommended)."),
    dp_method: str = typer.Option("loop", help=f"Per-subject gradients: {', '.join(GRAD_METHODS)} (speeds: "
                                  "benchmarks/results/privacy.md)."),
): ...


READING = (SPLITS, CLASSES, CT_WINDOW)  # how the model commands read a cohort
