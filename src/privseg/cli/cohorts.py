"""The one place the CLI reads a cohort, so ``--splits``, ``--classes``, ``--ct-window`` and
``--spacing`` mean the same in every command that takes them (data info/check, train, evaluate,
predict, unlearn, audit mia, privacy train)."""

from __future__ import annotations

from pathlib import Path

import typer

SPLITS = typer.Option(None, "--splits", help="Pin the splits from a file: nnU-Net's splits_final.json (fold 0), "
                      "or a CSV with columns id,site,split (optional patient), e.g. a run's splits.csv.")
CLASSES = typer.Option(None, "--classes", help="Declare the classes of a plain NIfTI or 2D image folder, one name "
                       "per label value 0, 1, 2, ..., e.g. background,lesion.")
CT_WINDOW = typer.Option(None, "--ct-window", metavar="LO,HI",
                         help="CT intensity window in HU mapped to [0, 1], e.g. --ct-window=0,80 for brain "
                         "(default: the cohort's ct_window in its manifest info or dataset.json, else -200,300). "
                         "Recorded in the checkpoint, so evaluate/predict/unlearn use it again.")
SPACING = typer.Option(None, "--spacing", metavar="MM",
                       help="Resample 3D volumes to this voxel spacing in mm: one number (isotropic) or X,Y,Z, "
                       "e.g. 1 or 1,1,3 (default: keep each volume's own). Recorded in the checkpoint.")


def parse_classes(text: str) -> list[str]:
    """``"background,lesion"`` -> names; at least two, none empty or repeated."""
    from privseg.errors import ConfigError

    names = [c.strip() for c in text.split(",")]
    if len(names) < 2 or not all(names):
        raise ConfigError(f"--classes {text!r}: give background plus at least one class, comma-separated "
                          "(e.g. --classes background,lesion)")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ConfigError(f"--classes {text!r}: {', '.join(repeated)} given twice")
    return names


def parse_spacing(text: str | None, spatial_dims: int) -> tuple[float, ...] | None:
    """``"1"`` -> (1, 1, 1); ``"1,1,3"`` -> (1, 1, 3); None -> None (each volume keeps its spacing)."""
    from privseg.errors import ConfigError

    if text is None:
        return None
    if spatial_dims != 3:
        raise ConfigError(f"--spacing {text!r}: only 3D volumes are resampled (this cohort is {spatial_dims}D)")
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(0 < v < 1e3 for v in values):
        raise ConfigError(f"--spacing {text!r}: give one positive number in mm, or three as X,Y,Z (e.g. 1,1,3)")
    return values


def open_cohort(path: Path, splits: Path | None = None, classes: str | None = None, ct_window: str | None = None,
                checkpoint: Path | None = None):
    """read_cohort with the command line's --splits, --classes and --ct-window. With ``checkpoint``
    and no --ct-window, the window the model trained with (when it recorded one) is used: a model
    sees intensities scaled as at training. A --ct-window that contradicts the model's is refused."""
    from dataclasses import replace

    from privseg.data.formats import read_cohort
    from privseg.data.transforms import parse_ct_window
    from privseg.errors import ConfigError

    options = {"classes": parse_classes(classes)} if classes else {}
    window = parse_ct_window(ct_window, "--ct-window") if ct_window is not None else None
    cohort = read_cohort(path, splits=splits, **options)
    trained = model_ct_window(checkpoint) if checkpoint is not None else None
    if window is not None and trained is not None and window != trained:
        raise ConfigError(f"--ct-window {ct_window}: the model in {checkpoint} trained with the window "
                          f"{trained[0]:g},{trained[1]:g}; give that one (or none)")
    if window is not None and not any(s.modality.upper() == "CT" for s in cohort.subjects):
        raise ConfigError(f"--ct-window {ct_window}: cohort {cohort.name} has no CT subject (modalities: "
                          f"{', '.join(sorted({s.modality for s in cohort.subjects}))}); the window applies to CT only")
    chosen = window or trained
    return replace(cohort, info={**cohort.info, "ct_window": list(chosen)}) if chosen else cohort


def model_ct_window(checkpoint: Path) -> tuple[float, float] | None:
    """The CT window recorded in a checkpoint's config (``extra.ct_window``), if any."""
    from privseg.data.transforms import parse_ct_window
    from privseg.train.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint).get("config")
    extra = config.get("extra") if isinstance(config, dict) else None
    recorded = extra.get("ct_window") if isinstance(extra, dict) else None
    return parse_ct_window(recorded, f"{checkpoint}: ct_window") if recorded is not None else None
