"""`privseg data synth|check|info`."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.ui import console, out, progress, table

app = typer.Typer(no_args_is_help=True, help="Build, check and describe cohorts.")


@app.command()
def synth(
    out_dir: Path = typer.Option(Path("data/cohort"), "--out", help="Folder to write the cohort into."),
    sites: int = typer.Option(3, min=1, help="Number of hospitals, each with its own scanner profile."),
    subjects: int = typer.Option(8, min=2, help="Subjects per site."),
    size: int = typer.Option(64, min=16, max=256, help="Volume side in voxels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same cohort."),
    layout: str = typer.Option("msd", help="File layout: msd or mrbrains."),
    lesions: bool = typer.Option(False, help="Add white-matter lesions as an extra class."),
    dims: int = typer.Option(3, help="3 for volumes, 2 for a 2D slice/dermoscopy task."),
    kind2d: str = typer.Option("dermoscopy", "--kind-2d", help="2D task: dermoscopy or slices."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Build the embedded multi-site cohort from the MNI152 template inside nilearn (offline)."""
    from privseg.data.synth import synth_cohort, synth_cohort_2d

    total = sites * subjects
    with progress("synthesising", total, quiet) as update:
        def cb(done: int, _total: int) -> None:
            update(done)

        if dims == 2:
            cohort = synth_cohort_2d(out_dir, sites=sites, subjects=subjects, seed=seed, kind=kind2d, progress=cb)
        else:
            cohort = synth_cohort(out_dir, sites=sites, subjects=subjects, size=size, seed=seed, layout=layout,
                                  lesions=lesions, progress=cb)
    if not quiet:
        out.print(f"wrote {len(cohort.subjects)} subjects at {len(cohort.sites)} sites to {out_dir}")


@app.command()
def check(path: Path = typer.Argument(..., help="Cohort folder or manifest."),
          quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Read and validate every file of a cohort; list every problem found (exit 2 if any)."""
    from privseg.data.formats import read_cohort
    from privseg.data.transforms import load_subject
    from privseg.errors import DataError, PrivsegError

    cohort = read_cohort(path)
    problems: list[str] = []
    with progress("checking", len(cohort.subjects), quiet) as update:
        for k, s in enumerate(cohort.subjects):
            try:
                load_subject(s, cohort)
            except PrivsegError as exc:
                problems.append(str(exc))
            update(k + 1)
    if problems:
        for p in problems:
            console.print(f"[red]✗[/red] {p}", highlight=False)
        raise DataError(path, f"{len(problems)} of {len(cohort.subjects)} subjects failed validation")
    if not quiet:
        out.print(f"[green]✓[/green] {len(cohort.subjects)} subjects valid ({cohort.format}, {path})")


@app.command()
def info(path: Path = typer.Argument(..., help="Cohort folder or manifest.")) -> None:
    """Sites, subjects per split, classes and channels of a cohort."""
    from privseg.data.formats import read_cohort

    cohort = read_cohort(path)
    out.print(f"[bold]{cohort.name}[/bold]  format={cohort.format}  dims={cohort.spatial_dims}D  "
              f"classes={cohort.classes}  channels={cohort.channels}")
    rows = []
    for site in cohort.sites:
        subs = cohort.select(site=site)
        mods = sorted({s.modality for s in subs})
        counts = [len([s for s in subs if s.split == sp]) for sp in ("train", "val", "test")]
        rows.append([site, ",".join(mods), *counts])
    out.print(table("subjects per site and split", ["site", "modality", "train", "val", "test"], rows))
