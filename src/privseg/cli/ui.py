"""Glue shared by the sub-commands: the two consoles, progress on stderr, and option groups that
several commands take (one definition each, added to a command with :func:`with_options`). An
option that sets a field of a library config (``TrainConfig``, ``DPConfig``, ``FLConfig``,
``ErasureRequest``, ``Thresholds``) is made from that field with :func:`options_from`: its default and help text
are written once, in the config."""

import inspect
from functools import partial
from pathlib import Path

import typer
from rich.console import Console

from privseg.erasure.request import ErasureRequest
from privseg.privacy.spec import DPConfig
from privseg.report import text
from privseg.runs import silence_known_noise
from privseg.train.config import PATCH_SIDE, TrainConfig
from privseg.utils import one_of

console, out = Console(stderr=True), Console()
silence_known_noise()
PARAM = typer.Option(None, help="Strategy hyper-parameter KEY=VALUE (repeatable).")
progress = partial(text.progress, console=console)  # (description, total, quiet) on stderr
phased_progress = partial(text.phased_progress, console=console)  # (description, quiet) on stderr


def warn(text: str | None) -> None:
    """A warning on stderr, even under --quiet (none when ``text`` is empty)."""
    if text:
        console.print(f"[bold yellow]privseg: warning:[/bold yellow] {text}", highlight=False, soft_wrap=True)


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


def options_from(config, *names, rename: dict | None = None, switches: tuple = (), helps: dict | None = None,
                 unset: bool = False):
    """An option group (for :func:`with_options`) made from fields of the dataclass ``config``:
    option ``--x-y`` sets field ``x_y`` (``rename`` maps an option to a field of another name) and
    takes the field's default, help, ``min`` and registry's names (:func:`privseg.utils.setting`). A name in
    ``switches`` is an on-switch (no ``--no-`` form); ``helps`` replace help texts; a group among
    ``names`` adds its own options there. With ``unset``, an option left out is None (the library
    takes the default) and its help names the default."""
    fields, hints = config.__dataclass_fields__, inspect.get_annotations(config, eval_str=True)
    params = []
    for name in names:
        if callable(name):
            params += inspect.signature(name, eval_str=True).parameters.values()
            continue
        f = fields[(rename or {}).get(name, name)]
        text = (helps or {}).get(name, f.metadata["help"])
        if f.metadata.get("choices") is not None:
            text = f"{text} {one_of(f.metadata['choices'])}"
        text, default = (f"{text[:-1]} (default {f.default:g}).", None) if unset else (text, f.default)
        option = typer.Option(default, *(["--" + name.replace("_", "-")] if name in switches else []), help=text,
                              min=f.metadata["min"])
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                        annotation=hints[f.name]))

    def group(**options): ...

    group.__signature__ = inspect.Signature(params)
    return group


def take(options: dict, group) -> dict:
    """Remove the options of ``group`` from a command's ``options`` and return them."""
    return {k: options.pop(k) for k in inspect.signature(group).parameters}


# Option groups shared by several commands: related one-liners, so (PEP 8) without blank lines between them.
def QUIET(quiet: bool = typer.Option(False, "--quiet", "-q")): ...
def RUNS(runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run folders.")): ...
def JSON(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")): ...
def COHORT(cohort: Path = typer.Option(..., help="Cohort folder or manifest.")): ...
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
def PATCH(patch: int = typer.Option(PATCH_SIDE, min=8, help="Patch side in voxels.")): ...


ERASURE = options_from(ErasureRequest, "statistic", "reason", "requested_by", "approved_by")
STEPS = options_from(TrainConfig, "steps")
TRAINING = options_from(TrainConfig, "model", "norm", PATCH, "subjects_per_step", "patches_per_subject", "lr", "seed",
                        "device", "init", "trainable", "lora_rank")
DP = options_from(DPConfig, "dp", "epsilon", "delta", "clip", "clip_norm", "target_quantile", "noise_schedule",
                  "allow_large_delta", "dp_method", "plan", "cohort_size", "epochs", "sampling_rate", "aug_mult", "ema",
                  rename={"dp": "unit", "dp_method": "method"}, switches=("allow_large_delta",))
RESERVE = options_from(DPConfig, "erasure_reserve")  # federated runs only: a central DP run has no erasure path
READING = (SPLITS, CLASSES, CT_WINDOW)  # how the model commands read a cohort
