"""The one place the CLI reads a cohort, so ``--splits`` and ``--classes`` mean the same in
every command that takes one (data info/check, train, evaluate, predict, unlearn, audit mia,
privacy train)."""

from __future__ import annotations

from pathlib import Path

import typer

SPLITS = typer.Option(None, "--splits", help="Pin the splits from a file: nnU-Net's splits_final.json (fold 0), "
                      "or a CSV with columns id,site,split (optional patient), e.g. a run's splits.csv.")
CLASSES = typer.Option(None, "--classes", help="Declare the classes of a plain NIfTI or 2D image folder, one name "
                       "per label value 0, 1, 2, ..., e.g. background,lesion.")


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


def open_cohort(path: Path, splits: Path | None = None, classes: str | None = None):
    """read_cohort with the command line's --splits and --classes."""
    from privseg.data.formats import read_cohort

    options = {"classes": parse_classes(classes)} if classes else {}
    return read_cohort(path, splits=splits, **options)
