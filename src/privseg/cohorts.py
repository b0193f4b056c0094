"""Cohorts opened the way every entry point asks for them (CLI, benchmarks, demo, tests), so pinned
splits, declared classes, a CT window and a spacing mean the same wherever they are given: one
cohort or a folder of site folders, read, checked file by file, or matched to a model's window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from privseg.data.cohort import apply_splits, read_splits
from privseg.data.formats import collect_problems, is_known_layout, read_cohort
from privseg.data.intensity import check_window
from privseg.data.transforms import ct_window, load_subject, parse_ct_window
from privseg.errors import ConfigError, DataError, PrivsegError
from privseg.federated.sites import read_site_cohort, site_subjects, sites_from_root
from privseg.train import TrainConfig
from privseg.train.checkpoint import load_checkpoint


def parse_classes(text: str) -> list[str]:
    """``"background,lesion"`` -> names; at least two, none empty or repeated."""
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
    """read_cohort with the options --splits, --classes and --ct-window. With ``checkpoint`` and no
    --ct-window, the window the model trained with (when it recorded one) is used: a model sees
    intensities scaled as at training. A --ct-window that contradicts the model's is refused."""
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


def train_config(cohort, *, patch: int, spacing: str | None = None, record_ct_window: bool = True, **settings):
    """The :class:`~privseg.train.TrainConfig` for training on ``cohort`` from command-line style
    options: a patch of side ``patch`` in every dimension, ``spacing`` as --spacing gives it
    (:func:`parse_spacing`), and -- with ``record_ct_window`` -- a CT cohort's intensity window kept
    in ``extra`` so that evaluate, predict and unlearn apply it again; ``settings`` are the other
    fields (steps, model, lr, ...)."""
    is_ct = record_ct_window and any(s.modality.upper() == "CT" for s in cohort.subjects)
    return TrainConfig.for_cohort(cohort, patch_size=(patch,) * cohort.spatial_dims,
                                  spacing=parse_spacing(spacing, cohort.spatial_dims),
                                  extra={"ct_window": list(ct_window(cohort))} if is_ct else {}, **settings)


def model_ct_window(checkpoint: Path) -> tuple[float, float] | None:
    """The CT window recorded in a checkpoint's config (``extra.ct_window``), if any."""
    config = load_checkpoint(checkpoint).get("config")
    extra = config.get("extra") if isinstance(config, dict) else None
    recorded = extra.get("ct_window") if isinstance(extra, dict) else None
    return parse_ct_window(recorded, f"{checkpoint}: ct_window") if recorded is not None else None


def open_cohorts(path: Path, sites_root: bool = False, splits: Path | None = None, classes: str | None = None,
                 problems: list | None = None) -> list[tuple[str | None, object]]:
    """(site, cohort) pairs: one cohort (site None), or with a sites root, as `fl run --sites-root`
    reads it, one cohort per sub-folder named after it. A folder in no known layout whose
    sub-folders are is taken as a sites root. With ``problems``, a site that cannot be read is
    noted there and the other sites are still read."""
    if not sites_root and not (path.is_dir() and not is_known_layout(path) and _has_site_folders(path)):
        return [(None, open_cohort(path, splits, classes))]
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
    subs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(subs) and all(is_known_layout(d) for d in subs)


def check_cohorts(path: Path, sites_root: bool = False, splits: Path | None = None, classes: str | None = None,
                  on_subject: Callable[[int, int], None] | None = None) -> tuple[list, int, list[str]]:
    """Read and load every file of a cohort (or of each site under a sites root): the (site,
    cohort) pairs read, how many subjects loaded without a problem, and every problem found (one
    text each)."""
    with collect_problems() as noted:  # the readers note a broken subject and go on with the others
        try:
            cohorts = open_cohorts(path, sites_root, splits, classes, noted)
        except DataError as exc:  # nothing readable left (or a broken split file): list what was found
            cohorts = []
            noted.append(exc)
    problems = list(dict.fromkeys(str(e) for e in noted))  # layout detection and reading may note one twice
    subjects = [(s, c) for _, c in cohorts for s in c.subjects]
    loaded = 0
    for k, (s, c) in enumerate(subjects):
        try:
            load_subject(s, c)
            loaded += 1
        except PrivsegError as exc:
            problems.append(str(exc))
        if on_subject:
            on_subject(k + 1, len(subjects))
    return cohorts, loaded, problems


def site_window_warnings(sites, private: bool) -> list[str]:
    """The CT window check (:func:`privseg.data.intensity.check_window`) of each of a federation's
    ``sites`` (SiteSpec) whose data this machine can read, as "site ID: warning" lines;
    ``private``: a DP run."""
    out = []
    for s in sites:
        try:
            cohort = read_site_cohort(s.cohort)
            subjects = site_subjects(cohort, s, "train")
        except PrivsegError:
            continue  # a site elsewhere (deployment), or one whose problem the run itself reports
        warning = check_window(cohort, subjects, private=private,
                               how='"ct_window": [{lo}, {hi}] in the site cohort\'s manifest info or dataset.json')
        if warning:
            out.append(f"site {s.id}: {warning}")
    return out
