"""Membership inference for segmentation, at patient level.

The unit is the patient (docs/architecture.md, principle 1). For every subject the model is
run on several augmented views of the whole volume (sliding window); the
per-subject statistics are

- ``loss``: mean voxel cross-entropy of the softmax output against the label,
- ``dice``: mean foreground Dice of the argmax prediction,

each averaged over the views. The membership score is "higher means more likely a
member": ``-loss`` for the loss statistic, ``dice`` for the Dice statistic.

The attack's AUC separates members from non-members (subjects the model never
trained on); it is reported with a percentile bootstrap confidence interval that
resamples members and non-members independently.

Reference-model variant (LiRA-style, offline): given reference models that were
trained *without* the scored subjects (e.g. the model retrained from scratch
without the forget set: both the forget subjects and the test subjects are OUT for
it), each subject's score is calibrated against its score under the reference
models: ``s_cal(x) = (s(x) - mean_ref s(x)) / sd``. With one reference model the
calibration is the difference (``sd`` = 1); with several, ``sd`` is the per-subject
standard deviation across reference models, floored at the pooled one. This removes
the per-subject "difficulty" that otherwise dominates segmentation scores (an easy
anatomy has low loss under any model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from privseg.audit.pvalues import empirical_p_value
from privseg.data.transforms import load_preprocessed
from privseg.errors import ConfigError
from privseg.train import metrics
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.train.inference import check_fits, predict_probs
from privseg.utils import check_id, parse_ids

STATISTICS = ("loss", "dice")
# Below this many members or non-members the AUC moves in steps of 1/(m*n) and the bootstrap
# resamples the same few subjects: 1 member vs 2 non-members gives AUC 1.000 with CI [1, 1].
MIN_GROUP = 5


def small_sample_warning(n_members: int, n_nonmembers: int) -> str | None:
    """The warning every table of a membership audit must print when a group is too small, else None."""
    if n_members >= MIN_GROUP and n_nonmembers >= MIN_GROUP:
        return None
    return (f"only {n_members} member(s) vs {n_nonmembers} non-member(s) (fewer than {MIN_GROUP} in a group): "
            "the AUC and its 95 % CI are not informative")


def check_group_sizes(n_members: int, n_nonmembers: int, allow_small: bool = False) -> str | None:
    """Refuse (ConfigError) a membership audit with fewer than MIN_GROUP members or non-members,
    unless ``allow_small``; then return the warning to print beside the AUC and its CI."""
    warning = small_sample_warning(n_members, n_nonmembers)
    if warning and not allow_small:
        raise ConfigError(f"membership audit refused: {warning}. Score at least {MIN_GROUP} members and "
                          f"{MIN_GROUP} non-members, or allow a small audit and report the warning with the CI")
    return warning


# -- per-subject statistics ------------------------------------------------------
def _view(image: torch.Tensor, view: int, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View 0 is the image itself; later views flip random spatial axes and jitter the
    intensity (scale 1 ± 5 %, shift ± 0.05, Gaussian noise σ = 0.02), the augmentations
    training may have used. Returns the image and the flipped axes (to undo on the output)."""
    img = torch.as_tensor(image, dtype=torch.float32).clone()
    if view == 0:
        return img, ()
    dims = img.ndim - 1
    axes = tuple(1 + a for a in range(dims) if rng.random() < 0.5) or (1 + int(rng.integers(dims)),)
    img = torch.flip(img, axes)
    scale = 1.0 + float(rng.uniform(-0.05, 0.05))
    shift = float(rng.uniform(-0.05, 0.05))
    noise = torch.from_numpy(rng.normal(0.0, 0.02, size=tuple(img.shape)).astype(np.float32))
    return img * scale + shift + noise, axes


@torch.no_grad()
def subject_statistics(model: torch.nn.Module, items: Sequence[dict], patch_size: Sequence[int], num_classes: int,
                       views: int = 4, seed: int = 0, overlap: float = 0.25,
                       on_subject: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per-subject mean voxel loss and Dice of ``model``, averaged over ``views`` views.

    Returns one row per item: ``{"id", "loss", "dice", "loss_views", "dice_views"}``."""
    if views < 1:
        raise ConfigError(f"views must be at least 1 (got {views})")
    rows = []
    for k, item in enumerate(items):
        rng = np.random.default_rng((seed, k, 7))
        label = torch.as_tensor(item["label"]).long()
        losses, dices = [], []
        for v in range(views):
            img, axes = _view(item["image"], v, rng)
            probs = predict_probs(model, img, patch_size, overlap=overlap)
            if axes:
                probs = torch.flip(probs, axes)
            p_true = probs.gather(0, label).clamp_min(1e-6)
            losses.append(float(-p_true.log().mean()))
            dices.append(metrics.mean(metrics.dice_per_class(probs.argmax(0, keepdim=True), label, num_classes)))
        rows.append({"id": item["id"], "loss": float(np.mean(losses)), "dice": float(np.mean(dices)),
                     "loss_views": losses, "dice_views": dices})
        if on_subject:
            on_subject(k + 1, len(items))
    return rows


def membership_scores(rows: Sequence[dict], statistic: str = "loss") -> np.ndarray:
    """Scores where higher means "more likely a member"."""
    if statistic not in STATISTICS:
        raise ConfigError(f"statistic {statistic!r} is not one of {STATISTICS}")
    vals = np.array([r[statistic] for r in rows], dtype=float)
    return -vals if statistic == "loss" else vals


# -- AUC and its bootstrap interval ----------------------------------------------
def _pairwise(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    m = np.asarray(members, float)[:, None]
    n = np.asarray(nonmembers, float)[None, :]
    return (m > n).astype(float) + 0.5 * (m == n)


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties count one half
    (the Mann–Whitney U statistic divided by m·n)."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if members.size == 0 or nonmembers.size == 0:
        raise ConfigError("membership AUC needs at least one member and one non-member")
    return float(_pairwise(members, nonmembers).mean())


def bootstrap_auc(members: Sequence[float], nonmembers: Sequence[float], n_boot: int = 2000, alpha: float = 0.05,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling members and non-members
    independently (subjects are the unit)."""
    pair = _pairwise(np.asarray(members, float), np.asarray(nonmembers, float))
    m, n = pair.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(m * n, 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        ri = rng.integers(m, size=(b, m))
        ci = rng.integers(n, size=(b, n))
        stats[start:start + b] = pair[ri[:, :, None], ci[:, None, :]].mean(axis=(1, 2))
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def calibrate(target: np.ndarray, references: Sequence[np.ndarray]) -> np.ndarray:
    """LiRA-style offline calibration of per-subject scores against reference (OUT) models."""
    if not references:
        return np.asarray(target, float)
    ref = np.stack([np.asarray(r, float) for r in references])  # (R, subjects)
    centred = np.asarray(target, float) - ref.mean(0)
    if ref.shape[0] < 2:
        return centred
    sd = ref.std(0, ddof=1)
    pooled = float(np.sqrt(np.mean(sd**2))) or 1.0
    return centred / np.maximum(sd, pooled)


# -- the audit -------------------------------------------------------------------
@dataclass
class MIAResult:
    auc: float
    ci_low: float
    ci_high: float
    n_members: int
    n_nonmembers: int
    statistic: str
    calibrated: bool
    n_reference_models: int
    views: int
    members: list[dict] = field(default_factory=list)
    nonmembers: list[dict] = field(default_factory=list)
    warning: str | None = None  # set when a group is smaller than MIN_GROUP; print it with the AUC

    def to_dict(self) -> dict:
        return asdict(self)


# Progress of a long audit: on_progress(phase, done, total), a phase being e.g. "scoring the model";
# the command line shows one bar (or plain lines) per phase.
OnProgress = Callable[[str, int, int], None]


def phase_counter(on_progress: OnProgress | None, phase: str, total: int) -> Callable[[int, int], None] | None:
    """An ``on_subject(done, _total)`` callback reporting ``phase`` out of ``total`` (None: no progress);
    reports ``0`` at once so the phase shows before its first (slow) subject."""
    if on_progress is None:
        return None
    on_progress(phase, 0, total)
    return lambda done, _n: on_progress(phase, done, total)


def load_items(subjects: Sequence, cohort, spacing, on_progress: OnProgress | None = None) -> list[dict]:
    """``load_preprocessed`` one subject at a time, reporting the phase "loading subjects"."""
    tick = phase_counter(on_progress, "loading subjects", len(subjects))
    items = []
    for k, s in enumerate(subjects):
        items += load_preprocessed([s], cohort, spacing)
        if tick:
            tick(k + 1, len(subjects))
    return items


def audit_items(model: torch.nn.Module, members: Sequence[dict], nonmembers: Sequence[dict],
                patch_size: Sequence[int], num_classes: int, *, statistic: str = "loss", views: int = 4,
                reference_models: Sequence[torch.nn.Module] = (), seed: int = 0, n_boot: int = 2000,
                member_rows: Sequence[dict] | None = None, nonmember_rows: Sequence[dict] | None = None,
                reference_rows: Sequence[tuple[Sequence[dict], Sequence[dict]]] | None = None,
                allow_small: bool = True, on_progress: OnProgress | None = None) -> MIAResult:
    """Membership AUC of ``model`` on preprocessed items. Reference models, when given,
    must not have trained on any of the scored subjects. ``reference_rows`` gives, per reference
    model, its already computed ``subject_statistics`` rows on (members, nonmembers) (same order,
    views and seed) instead of the models themselves. With fewer than MIN_GROUP members or
    non-members the result carries a ``warning`` to print with its CI (``allow_small=False``:
    refused before any model is run). ``on_progress``: one phase per model scored."""
    if not members or not nonmembers:
        raise ConfigError("membership test needs at least one member and one non-member subject")
    warning = check_group_sizes(len(members), len(nonmembers), allow_small)
    overlap = {i["id"] for i in members} & {i["id"] for i in nonmembers}
    if overlap:
        raise ConfigError(f"subjects listed both as members and non-members: {', '.join(sorted(overlap))}")
    def score(m, phase: str) -> tuple[list[dict], list[dict]]:
        tick = phase_counter(on_progress, phase, len(members) + len(nonmembers))
        after = (lambda done, n: tick(len(members) + done, n)) if tick else None
        return (subject_statistics(m, members, patch_size, num_classes, views, seed, on_subject=tick),
                subject_statistics(m, nonmembers, patch_size, num_classes, views, seed, on_subject=after))

    if member_rows is None or nonmember_rows is None:
        mrows, nrows = score(model, "scoring the model")
    mrows = list(member_rows) if member_rows is not None else mrows
    nrows = list(nonmember_rows) if nonmember_rows is not None else nrows
    s_m, s_n = membership_scores(mrows, statistic), membership_scores(nrows, statistic)
    ref_pairs = [score(ref, f"scoring reference model {k + 1}/{len(reference_models)}")
                 for k, ref in enumerate(reference_models)]
    for rm, rn in reference_rows or ():
        if ([r["id"] for r in rm] != [i["id"] for i in members]
                or [r["id"] for r in rn] != [i["id"] for i in nonmembers]):
            raise ConfigError("reference_rows do not match the scored members and non-members")
        ref_pairs.append((list(rm), list(rn)))
    if ref_pairs:
        refs_m, refs_n = [], []
        for rm, rn in ref_pairs:
            refs_m.append(membership_scores(rm, statistic))
            refs_n.append(membership_scores(rn, statistic))
            for row, r in zip(mrows, rm, strict=True):
                row.setdefault("reference", []).append(r[statistic])
            for row, r in zip(nrows, rn, strict=True):
                row.setdefault("reference", []).append(r[statistic])
        refs = [np.concatenate([a, b]) for a, b in zip(refs_m, refs_n, strict=True)]
        cal = calibrate(np.concatenate([s_m, s_n]), refs)
        s_m, s_n = cal[: len(s_m)], cal[len(s_m):]
    for row, s in zip(mrows, s_m, strict=True):
        row["score"] = float(s)
    for row, s in zip(nrows, s_n, strict=True):
        row["score"] = float(s)
    lo, hi = bootstrap_auc(s_m, s_n, n_boot=n_boot, seed=seed)
    return MIAResult(auc=auc(s_m, s_n), ci_low=lo, ci_high=hi, n_members=len(s_m), n_nonmembers=len(s_n),
                     statistic=statistic, calibrated=bool(ref_pairs),
                     n_reference_models=len(ref_pairs), views=views, members=mrows, nonmembers=nrows,
                     warning=warning)


def audit_checkpoint(checkpoint, cohort, members: Sequence[str], nonmembers: Sequence[str], *,
                     reference_checkpoints: Sequence = (), statistic: str = "loss", views: int = 4,
                     seed: int = 0, n_boot: int = 2000, allow_small: bool = False,
                     on_progress: OnProgress | None = None) -> dict:
    """Membership test of a checkpoint on a cohort: members and non-members are subject IDs.
    Non-members must not be training subjects of the checkpoint (when it records them). Fewer
    than MIN_GROUP in a group is refused unless ``allow_small``; the result's ``warning`` then
    says so, to be printed with the CI. ``on_progress``: loading, then each model scored."""
    members = parse_ids(members, "--members")
    nonmembers = parse_ids(nonmembers, "--non-members")
    for i in (*members, *nonmembers):
        check_id(i, "subject ID")
        cohort.subject(i)  # ConfigError for unknown IDs
    check_group_sizes(len(members), len(nonmembers), allow_small)  # before loading any model
    payload = load_checkpoint(checkpoint)
    cfg = payload["config"]
    check_fits(cfg, cohort, checkpoint)
    trained = set(payload.get("extra", {}).get("train_subjects", []))
    leaked = [i for i in nonmembers if i in trained]
    if leaked:
        raise ConfigError(f"--non-members: {', '.join(leaked)} trained the model in {checkpoint}")
    model = model_from_checkpoint(payload, checkpoint)
    refs = []
    for path in reference_checkpoints:
        rp = load_checkpoint(path)
        check_fits(rp["config"], cohort, path)
        ref_trained = set(rp.get("extra", {}).get("train_subjects", []))
        bad = [i for i in (*members, *nonmembers) if i in ref_trained]
        if bad:
            raise ConfigError(f"--reference {path}: trained on scored subjects {', '.join(bad)} (must be OUT models)")
        refs.append(model_from_checkpoint(rp, path))
    items = load_items([cohort.subject(i) for i in (*members, *nonmembers)], cohort, cfg.get("spacing"), on_progress)
    m_items, n_items = items[:len(members)], items[len(members):]
    res = audit_items(model, m_items, n_items, cfg["patch_size"], cfg["num_classes"], statistic=statistic,
                      views=views, reference_models=refs, seed=seed, n_boot=n_boot, allow_small=allow_small,
                      on_progress=on_progress)
    out = res.to_dict()
    out["checkpoint"] = str(checkpoint)
    out["reference_checkpoints"] = [str(p) for p in reference_checkpoints]
    return out


# -- power checks ----------------------------------------------------------------
# Before a forgetting result counts, the original model must memorise (else "the forget set looks
# unseen" holds for any model), and the test itself must not see membership where there is none.
class PowerCheckError(ConfigError):
    """The membership test has no power here: the model does not memorise, the cohort is too small,
    or the null control is off. ``result`` holds the numbers."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def null_auc_sd(n1: int, n2: int) -> float:
    """Standard deviation of the AUC between two groups drawn from one population (Mann-Whitney)."""
    return math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))


def null_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The seeded random split of ``n`` never-seen patients into the null control's two halves."""
    order = np.random.default_rng((seed, 1790)).permutation(n)
    return order[: n // 2], order[n // 2:]


def power_check(member_scores: Sequence[float], nonmember_scores: Sequence[float], *, min_auc: float = 0.75,
                null_tolerance: float = 0.1, min_members: int = 24, min_nonmembers: int = 12, seed: int = 0,
                n_boot: int = 2000, n_perm: int = 2000, raise_on_fail: bool = True) -> dict:
    """Membership power of a model, from per-patient scores (higher = more likely a member).

    * ``member_auc``: all training vs all never-seen patients; must be >= ``min_auc``;
    * ``null_auc``: the same test between two random halves (seeded) of the never-seen patients;
      must satisfy ``|null_auc - 0.5| <= null_tolerance``. ``null_sd`` is its standard deviation
      for groups that size, so a reader sees how wide chance alone is;
    * ``member_p``: one-sided permutation p-value of ``member_auc`` (membership labels shuffled).

    Raises :class:`PowerCheckError` (with the numbers) when a check fails and ``raise_on_fail``."""
    s_m, s_n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if not (np.isfinite(s_m).all() and np.isfinite(s_n).all()):
        raise ConfigError("power check: membership scores must be finite")
    rng = np.random.default_rng((seed, 1789))
    res: dict = {"n_members": int(s_m.size), "n_nonmembers": int(s_n.size), "min_auc": min_auc,
                 "null_tolerance": null_tolerance, "seed": seed}
    problems = []
    if s_m.size < min_members or s_n.size < min_nonmembers or s_n.size < 2:
        problems.append(f"{s_m.size} training and {s_n.size} never-seen patients; the test needs at least "
                        f"{min_members} and {max(min_nonmembers, 2)}")
    if s_m.size and s_n.size >= 2:
        res["member_auc"] = auc(s_m, s_n)
        res["member_ci"] = list(bootstrap_auc(s_m, s_n, n_boot=n_boot, seed=seed))
        both = np.concatenate([s_m, s_n])
        perm = [auc(p[: s_m.size], p[s_m.size:]) for p in (rng.permutation(both) for _ in range(n_perm))]
        res["member_p"] = empirical_p_value(res["member_auc"], perm)
        ia, ib = null_halves(s_n.size, seed)
        half_a, half_b = s_n[ia], s_n[ib]
        res["null_split"] = [ia.tolist(), ib.tolist()]  # indices into the never-seen scores
        res["null_auc"] = auc(half_a, half_b)
        res["null_ci"] = list(bootstrap_auc(half_a, half_b, n_boot=n_boot, seed=seed))
        res["null_sd"] = null_auc_sd(half_a.size, half_b.size)
        # how often chance alone keeps a random halving within the tolerance at this sample size
        # (about half the time at 6 vs 6): read a failed null control against it
        within = 0
        for k in range(200):
            a, b = null_halves(s_n.size, seed + 1 + k)
            within += abs(auc(s_n[a], s_n[b]) - 0.5) <= null_tolerance
        res["null_pass_rate"] = within / 200
        if res["member_auc"] < min_auc:
            problems.append(f"the model does not memorise: membership AUC of all training vs all never-seen "
                            f"patients {res['member_auc']:.3f} < {min_auc}")
        if abs(res["null_auc"] - 0.5) > null_tolerance:
            problems.append(f"null control off: AUC between two random halves of the never-seen patients "
                            f"{res['null_auc']:.3f}, |AUC - 0.5| > {null_tolerance} (chance alone has sd "
                            f"{res['null_sd']:.3f} at {half_a.size} vs {half_b.size})")
    res["passed"] = not problems
    res["problems"] = problems
    if problems and raise_on_fail:
        raise PowerCheckError("membership test has no power: " + "; ".join(problems), res)
    return res


def power_check_model(model: torch.nn.Module, members: Sequence[dict], nonmembers: Sequence[dict],
                      patch_size: Sequence[int], num_classes: int, *, statistic: str = "loss", views: int = 2,
                      seed: int = 0, **kw) -> dict:
    """:func:`power_check` of ``model`` on preprocessed items: ``members`` are all its training
    patients, ``nonmembers`` all patients it never saw. Per-patient IDs and scores are in the result."""
    overlap = {i["id"] for i in members} & {i["id"] for i in nonmembers}
    if overlap:
        raise ConfigError(f"power check: patients both training and never-seen: {', '.join(sorted(overlap))}")
    mrows = subject_statistics(model, members, patch_size, num_classes, views, seed)
    nrows = subject_statistics(model, nonmembers, patch_size, num_classes, views, seed)
    s_m, s_n = membership_scores(mrows, statistic), membership_scores(nrows, statistic)
    extra = {"statistic": statistic, "views": views,
             "member_scores": {r["id"]: float(s) for r, s in zip(mrows, s_m, strict=True)},
             "nonmember_scores": {r["id"]: float(s) for r, s in zip(nrows, s_n, strict=True)}}
    try:
        res = power_check(s_m, s_n, seed=seed, **kw)
    except PowerCheckError as exc:
        exc.result.update(extra)
        raise
    res.update(extra)
    return res
