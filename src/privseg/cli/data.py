"""`privseg data synth|check|info`."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.cohorts import CLASSES, SPLITS
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


def _cohorts(path: Path, sites_root: bool, splits: Path | None, classes: str | None,
             problems: list | None = None) -> list[tuple[str | None, object]]:
    """(site, cohort) pairs: one cohort (site None), or with a sites root, as `fl run --sites-root`
    reads it, one cohort per sub-folder named after it. A folder in no known layout whose
    sub-folders are is taken as a sites root. With ``problems``, a site that cannot be read is
    noted there and the other sites are still read."""
    from privseg.cli.cohorts import open_cohort
    from privseg.data.cohort import apply_splits, read_splits
    from privseg.data.formats import is_known_layout
    from privseg.errors import DataError

    if not sites_root and not (path.is_dir() and not is_known_layout(path) and _has_site_folders(path)):
        return [(None, open_cohort(path, splits, classes))]
    from privseg.federated.sites import sites_from_root

    pinned = read_splits(splits) if splits else None
    out = []
    for spec in sites_from_root(path):
        try:
            cohort = open_cohort(Path(spec.cohort), None, classes)
            out.append((spec.id, apply_splits(cohort, pinned, site=spec.id) if pinned else cohort))
        except DataError as exc:
            if problems is None:
                raise
            problems.append(exc)
    return out


def _has_site_folders(path: Path) -> bool:
    from privseg.data.formats import is_known_layout

    subs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(subs) and all(is_known_layout(d) for d in subs)


_SITES_ROOT = typer.Option(False, "--sites-root", help="PATH holds one folder per site, read as `privseg fl run "
                           "--sites-root` reads it (default when PATH itself is in no known layout).")


@app.command()
def check(path: Path = typer.Argument(..., help="Cohort folder or manifest."),
          sites_root: bool = _SITES_ROOT, splits: Path = SPLITS, classes: str = CLASSES,
          quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Read and validate every file of a cohort; list every problem found (exit 2 if any)."""
    from privseg.data.formats import collect_problems
    from privseg.data.transforms import load_subject
    from privseg.errors import DataError, PrivsegError

    problems: list[str] = []
    with collect_problems() as noted:  # the readers note a broken subject and go on with the others
        try:
            cohorts = _cohorts(path, sites_root, splits, classes, noted)
        except DataError as exc:  # nothing readable left (or a broken split file): list what was found
            cohorts = []
            noted.append(exc)
    problems += list(dict.fromkeys(str(e) for e in noted))  # layout detection and reading may note one twice
    subjects = [(s, c) for _, c in cohorts for s in c.subjects]
    with progress("checking", len(subjects), quiet) as update:
        for k, (s, c) in enumerate(subjects):
            try:
                load_subject(s, c)
            except PrivsegError as exc:
                problems.append(str(exc))
            update(k + 1)
    if problems:
        for p in problems:
            console.print(f"[red]✗[/red] {p}", highlight=False, soft_wrap=True)  # paths stay whole
        raise DataError(path, f"{len(problems)} problem(s) found; {len(subjects)} subject(s) could be read")
    if not quiet:
        fmt = ",".join(sorted({c.format for _, c in cohorts}))
        out.print(f"[green]✓[/green] {len(subjects)} subjects valid ({fmt}, {path})")


@app.command()
def info(path: Path = typer.Argument(..., help="Cohort folder, manifest, or a folder of site folders."),
         subjects: bool = typer.Option(False, "--subjects", help="List subject (and patient) IDs per site and split."),
         sites_root: bool = _SITES_ROOT, splits: Path = SPLITS, classes: str = CLASSES) -> None:
    """Sites, subjects and patients per split, classes and channels of a cohort."""
    cohorts = _cohorts(path, sites_root, splits, classes)
    rows, listing, n_subjects, with_ids = [], [], 0, False
    for site_dir, cohort in cohorts:
        out.print(f"[bold]{cohort.name}[/bold]  format={cohort.format}  dims={cohort.spatial_dims}D  "
                  f"classes={cohort.classes}  channels={cohort.channels}"
                  + (f"  (site {site_dir})" if site_dir else ""), highlight=False)
        with_ids = with_ids or cohort.has_patient_ids
        for site in cohort.sites:
            name = site_dir or site
            subs = cohort.select(site=site)
            n_subjects += len(subs)
            mods = sorted({s.modality for s in subs})
            counts = [len([s for s in subs if s.split == sp]) for sp in ("train", "val", "test")]
            rows.append([name, ",".join(mods), *counts, len({s.patient_id for s in subs})])
            for sp in ("train", "val", "test"):
                patients = cohort.patients(split=sp, site=site)
                listing.append((name, sp, patients))
    out.print(table("subjects per site and split", ["site", "modality", "train", "val", "test", "patients"], rows))
    n_patients = sum(len(p) for _, _, p in listing)
    if with_ids:
        out.print(f"{n_patients} patients, {n_subjects} subjects (a patient's subjects share one split)")
    else:
        out.print(f"{n_patients} patients: no patient IDs in this data, so one file = one patient "
                  "(give a split file with a patient column, or patient_id in cohort.json, if patients "
                  "have several files)")
    if subjects:
        for name, sp, patients in listing:
            if not patients:
                continue
            ids = [" ".join(s.id for s in subs) if pid == subs[0].id and len(subs) == 1
                   else f"{pid}: {' '.join(s.id for s in subs)}" for pid, subs in patients.items()]
            n = sum(len(v) for v in patients.values())
            out.print(f"{name} {sp} ({n}): " + ("; ".join(ids) if with_ids else " ".join(ids)), highlight=False,
                      soft_wrap=True)
