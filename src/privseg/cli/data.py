"""`privseg data synth|check|info`."""

from pathlib import Path

import typer

from privseg.cli.ui import CLASSES, QUIET, SPLITS, console, one_of, out, progress, with_options
from privseg.cohorts import check_cohorts, open_cohorts
from privseg.data.synth import KINDS_2D, LAYOUTS, synth_cohort_nd
from privseg.errors import DataError
from privseg.report.text import print_cohort_check, print_cohorts

app = typer.Typer(no_args_is_help=True, help="Build, check and describe cohorts.")


@app.command()
@with_options(..., QUIET)
def synth(
    out_dir: Path = typer.Option(Path("data/cohort"), "--out", help="Folder to write the cohort into."),
    sites: int = typer.Option(3, min=1, help="Number of hospitals, each with its own scanner profile."),
    subjects: int = typer.Option(8, min=2, help="Subjects per site."),
    size: int = typer.Option(64, min=16, max=256, help="Volume side in voxels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same cohort."),
    layout: str = typer.Option("msd", help=f"File layout. {one_of(LAYOUTS)}"),
    lesions: bool = typer.Option(False, help="Add white-matter lesions as an extra class."),
    dims: int = typer.Option(3, help="3 for volumes, 2 for a 2D slice/dermoscopy task."),
    kind2d: str = typer.Option("dermoscopy", "--kind-2d", help=f"2D task. {one_of(KINDS_2D)}"), quiet: bool = False,
) -> None:
    """Build the embedded multi-site cohort from the MNI152 template inside nilearn (offline)."""
    with progress("synthesising", sites * subjects, quiet) as update:
        cohort = synth_cohort_nd(out_dir, dims, kind=kind2d, size=size, layout=layout, lesions=lesions, sites=sites,
                                 subjects=subjects, seed=seed, progress=lambda done, _total: update(done))
    if not quiet:
        out.print(f"wrote {len(cohort.subjects)} subjects at {len(cohort.sites)} sites to {out_dir}")


def SITES_ROOT(sites_root: bool = typer.Option(
        False, "--sites-root", help="PATH holds one folder per site, read as `privseg fl run --sites-root` reads "
        "it (default when PATH itself is in no known layout).")): ...


@app.command()
@with_options(..., SITES_ROOT, SPLITS, CLASSES, QUIET)
def check(path: Path = typer.Argument(..., help="Cohort folder or manifest."), **o) -> None:
    """Read and validate every file of a cohort; list every problem found (exit 2 if any)."""
    with progress("checking", 0, o["quiet"]) as update:  # the total is known once the cohort is read
        cohorts, n, problems = check_cohorts(path, o["sites_root"], o["splits"], o["classes"],
                                             on_subject=lambda k, total: update(k, total=total if k == 1 else None))
    print_cohort_check(out, console, path, cohorts, n, problems, o["quiet"])
    if problems:
        raise DataError(path, f"{len(problems)} problem(s) found; {n} subject(s) could be read")


@app.command()
@with_options(..., SITES_ROOT, SPLITS, CLASSES)
def info(path: Path = typer.Argument(..., help="Cohort folder, manifest, or a folder of site folders."),
         subjects: bool = typer.Option(False, "--subjects", help="List subject (and patient) IDs per site and split."),
         **o) -> None:
    """Sites, subjects and patients per split, classes and channels of a cohort."""
    print_cohorts(out, open_cohorts(path, o["sites_root"], o["splits"], o["classes"]), subjects)
