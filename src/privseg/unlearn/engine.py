"""The unlearning engine: trained checkpoint + cohort + forget request → new checkpoint + report.

Targets:

- ``zero`` (the study): run the strategy for a fixed number of epochs (20 and 50 in
  the study), driving the forget subjects' Dice down.
- ``unseen``: stop as soon as the forget subjects look like patients the model never
  saw: every ``check_every`` steps (and before the first) the per-subject mean voxel
  loss and Dice of the forget subjects are compared with those of held-out
  "calibration" subjects (the ``val`` split, or ``test`` when there is no ``val``);
  the run stops when the membership AUC forget-vs-calibration on the loss is at most
  ``auc_threshold`` (0.55) *and* the forget subjects' mean Dice is no higher than the
  best calibration subject's, *and* the model still works on the calibration subjects (their mean
  Dice at least ``utility_fraction`` = 0.9 of the original model's). ``epochs`` is then the maximum
  budget (default 50).

The report holds, for the original, unlearned and (when given) retrained model:
Dice and MAE on retain, forget and test subjects, Dice gap (retain − forget), MAE gap
(forget − retain), the differences to the original and the retrained model,
|forget Dice − retrain's forget Dice|, the membership AUC (forget vs test subjects,
loss statistic, augmented views, bootstrap CI; plus the retrain-calibrated variant),
wall time of the strategy and the speed-up over retraining.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from privseg.audit import mia
from privseg.audit.reference import calibrated_stopper, load_references
from privseg.data.cohort import Cohort
from privseg.data.transforms import load_preprocessed
from privseg.errors import CheckpointError, ConfigError
from privseg.privacy.central import refuse_without_dp
from privseg.train import metrics
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from privseg.train.inference import check_fits, evaluate_subjects
from privseg.train.loop import TrainConfig
from privseg.unlearn.strategies import UnlearnContext, decoder_parameter_names, get_strategy
from privseg.utils import parse_ids, pick_device, seed_everything, versions, write_json

TARGETS = ("zero", "unseen", "calibrated")
DEFAULT_EPOCHS = {"zero": 20, "unseen": 50, "calibrated": 50}
EPOCH_DEFINITION = ("one epoch = ceil(n_forget / subjects_per_step) steps (every forget subject drawn once); "
                    "each step draws subjects_per_step subjects x patches_per_subject patches, plus an equal "
                    "retain batch for strategies that interleave retain subjects; retain-only strategies get the "
                    "same number of steps")


@dataclass
class UnlearnResult:
    model: torch.nn.Module
    report: dict
    checkpoint: Path | None = None
    report_path: Path | None = None




def _load_model(path, cohort: Cohort, what: str) -> tuple[dict, torch.nn.Module]:
    payload = load_checkpoint(path)
    try:
        check_fits(payload["config"], cohort, path)
    except KeyError as exc:
        raise CheckpointError(f"{what} {path}: config lacks {exc}") from None
    return payload, model_from_checkpoint(payload, path)


def _group_metrics(model: torch.nn.Module, groups: dict[str, list[dict]], cfg: TrainConfig,
                   tick: Callable[[int], None] | None = None) -> dict:
    out = {}
    for name, items in groups.items():
        if not items:
            out[name] = {"n": 0, "dice": math.nan, "mae": math.nan, "subjects": []}
            continue
        rows = evaluate_subjects(model, items, cfg.patch_size, cfg.num_classes,
                                 on_subject=(lambda k, n: tick(1)) if tick else None)
        out[name] = {"n": len(rows), "dice": metrics.mean([r["mean_dice"] for r in rows]),
                     "mae": metrics.mean([r["mae"] for r in rows]),
                     "subjects": [{"id": r["id"], "dice": r["mean_dice"], "mae": r["mae"]} for r in rows]}
    out["dice_gap"] = metrics.dice_gap(out["retain"]["dice"], out["forget"]["dice"])
    out["mae_gap"] = metrics.mae_gap(out["retain"]["mae"], out["forget"]["mae"])
    return out


KEYS = (("retain", "dice"), ("retain", "mae"), ("forget", "dice"), ("forget", "mae"), ("test", "dice"),
        ("test", "mae"))


def _flat(m: dict) -> dict:
    d = {f"{g}_{k}": m[g][k] for g, k in KEYS}
    d["dice_gap"], d["mae_gap"] = m["dice_gap"], m["mae_gap"]
    return d


def _mia(model, forget_items, test_items, cfg: TrainConfig, views: int, seed: int, reference=None,
         reference_rows: dict | None = None) -> dict:
    """Membership AUC forget vs test; with ``reference`` (the retrained model) also the calibrated AUC.
    ``reference_rows`` ({"members", "nonmembers"}: the reference model's per-subject rows on the same subjects,
    views and seed) skips re-running the reference model."""
    if not test_items:
        return {"auc": math.nan}
    res = mia.audit_items(model, forget_items, test_items, cfg.patch_size, cfg.num_classes, views=views, seed=seed,
                          n_boot=1000)
    out = {"auc": res.auc, "ci": [res.ci_low, res.ci_high], "members": res.n_members,
           "nonmembers": res.n_nonmembers, "views": views, "warning": res.warning}
    if reference is not None or reference_rows is not None:
        cal = mia.audit_items(model, forget_items, test_items, cfg.patch_size, cfg.num_classes, views=views,
                              seed=seed, n_boot=1000, reference_models=[reference] if reference is not None else (),
                              reference_rows=[(reference_rows["members"], reference_rows["nonmembers"])]
                              if reference_rows is not None else None,
                              member_rows=res.members, nonmember_rows=res.nonmembers)
        out["auc_calibrated"] = cal.auc
        out["ci_calibrated"] = [cal.ci_low, cal.ci_high]
    return out


@torch.no_grad()
def check_statistics(model: torch.nn.Module, items: list[dict], cfg: TrainConfig, batch: int = 8) -> list[dict]:
    """Per-subject mean voxel loss and Dice on one (unaugmented) view, as ``mia.subject_statistics(views=1)``.
    When every volume is exactly one patch (sliding-window inference is then one window), the subjects go
    through the network in batches instead of one at a time (same numbers, a fraction of the time on CPU)."""
    shapes = {tuple(torch.as_tensor(it["image"]).shape[1:]) for it in items}
    if shapes != {tuple(cfg.patch_size)}:
        return mia.subject_statistics(model, items, cfg.patch_size, cfg.num_classes, views=1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            x = torch.stack([torch.as_tensor(it["image"], dtype=torch.float32).as_subclass(torch.Tensor)
                             for it in chunk]).to(device)
            probs = torch.softmax(model(x).float(), dim=1).cpu()
            for it, p in zip(chunk, probs, strict=True):
                label = torch.as_tensor(it["label"]).long().as_subclass(torch.Tensor)
                loss = float(-p.gather(0, label).clamp_min(1e-6).log().mean())
                dice = metrics.mean(metrics.dice_per_class(p.argmax(0, keepdim=True), label, cfg.num_classes))
                rows.append({"id": it["id"], "loss": loss, "dice": dice, "loss_views": [loss], "dice_views": [dice]})
    finally:
        model.train(was_training)
    return rows


def unseen_stopper(forget_items: list[dict], calib_items: list[dict], cfg: TrainConfig, *,
                   auc_threshold: float = 0.55, utility_floor: float = 0.0,
                   log: list | None = None) -> Callable[[int, torch.nn.Module], bool]:
    """The ``unseen`` target's test: forget subjects indistinguishable from held-out ones, by a model that
    still works on held-out ones (their mean Dice at least ``utility_floor``; without this guard a strategy
    that wrecks the model, e.g. ``random_encoder`` right after re-initialisation, would "stop" at once)."""
    if not calib_items:
        raise ConfigError("--target unseen needs held-out subjects (a val or test split) to compare with")

    def should_stop(step: int, model: torch.nn.Module) -> bool:
        f = check_statistics(model, forget_items, cfg)
        u = check_statistics(model, calib_items, cfg)
        a = mia.auc(mia.membership_scores(f, "loss"), mia.membership_scores(u, "loss"))
        fd = metrics.mean([r["dice"] for r in f])
        max_u = max(r["dice"] for r in u)
        mean_u = metrics.mean([r["dice"] for r in u])
        done = a <= auc_threshold and fd <= max_u and mean_u >= utility_floor
        if log is not None:
            log.append({"step": step, "auc_loss": a, "forget_dice": fd, "unseen_dice_max": max_u,
                        "unseen_dice_mean": mean_u, "utility_floor": utility_floor, "stop": done})
        return done

    return should_stop


@dataclass
class _Loaded:
    """What the load stage found: the original model, its subjects by role and their preprocessed items."""

    payload: dict
    model: torch.nn.Module
    cfg: TrainConfig
    trained: list[str] | None
    retain_subj: list
    forget_subj: list
    test_subj: list
    calib_subj: list
    retrain_model: torch.nn.Module | None
    retrain_seconds: float | None
    retain_items: list[dict]
    forget_items: list[dict]
    test_items: list[dict]
    calib_items: list[dict]


@dataclass
class _Run:
    """What the run stage produced: the unlearned model and how it got there."""

    model: torch.nn.Module
    original: torch.nn.Module | None
    ctx: UnlearnContext
    checks: list[dict]
    floor: float
    seconds: float
    budget: int
    steps_per_epoch: int
    device: torch.device


def unlearn(checkpoint, cohort: Cohort, forget: str | Sequence[str], strategy: str = "noisy_label", *,
            fix_decoder: bool = False, epochs: int | None = None, target: str = "zero", params: dict | None = None,
            out_dir=None, seed: int = 0, calibration: Sequence[str] | None = None, retrain_checkpoint=None,
            retrain_seconds: float | None = None, check_every: int = 2, auc_threshold: float = 0.55,
            utility_fraction: float = 0.9,
            mia_views: int = 2, evaluate: bool = True, device: str = "auto",
            on_step: Callable[[int, int, float], None] | None = None, items: dict[str, dict] | None = None,
            original_metrics: dict | None = None, retrain_metrics: dict | None = None,
            on_evaluate: Callable[[int, int], None] | None = None, references=None,
            statistic: str = "loss", stop_p: float | None = None) -> UnlearnResult:
    """Remove the forget subjects' influence from ``checkpoint``'s model with ``strategy``.

    Nothing is written unless everything succeeded; with ``out_dir`` the new model goes
    to ``out_dir/unlearned.pt`` (the usual checkpoint format) and the report beside it
    as ``out_dir/report.json``. ``items`` is an optional cache of preprocessed subjects
    by ID; ``original_metrics`` an optional cache of the original model's evaluation
    (the ``"original"`` block of an earlier report on the same request); ``retrain_metrics`` likewise caches the
    retrained model's evaluation (the ``"retrain"`` block of an earlier report with the same ``retrain_checkpoint``,
    request, ``mia_views`` and ``seed``; its ``"reference_rows"`` spare re-running the reference model for the
    calibrated membership AUC). ``on_evaluate(done, total)`` reports the evaluation after the strategy, in
    subject passes (one subject through one model), which on CPU can take longer than the unlearning.
    ``target="calibrated"`` stops with :func:`privseg.audit.reference.calibrated_stopper` against
    ``references`` (default: the reference models kept with the checkpoint's run folder) scored
    with ``statistic``; a strategy registered with ``references=True`` gets them too."""
    strat, resolved, epochs, forget_ids = _validate(strategy, target, epochs, check_every, params, forget)
    if (target == "calibrated" or strat.needs_references) and references is None:
        references = load_references(Path(checkpoint).parent)  # a ConfigError naming the command if none
    data = _load(checkpoint, cohort, forget_ids, calibration, retrain_checkpoint, retrain_seconds, items)
    run = _run(strat, resolved, data, strategy=strategy, target=target, epochs=epochs, fix_decoder=fix_decoder,
               seed=seed, check_every=check_every, auc_threshold=auc_threshold, utility_fraction=utility_fraction,
               keep_original=evaluate and original_metrics is None, device=device, on_step=on_step,
               references=references, statistic=statistic, views=mia_views, stop_p=stop_p)
    report = _run_report(checkpoint, cohort, forget_ids, data, run, strategy=strategy, target=target,
                         fix_decoder=fix_decoder, resolved=resolved, epochs=epochs, check_every=check_every,
                         auc_threshold=auc_threshold, seed=seed)
    if evaluate:
        report.update(_evaluate(data, run.model, run.original, run.device, mia_views, seed, original_metrics,
                                retrain_metrics, on_evaluate))
    ckpt_path, report_path = _write(out_dir, checkpoint, cohort, forget_ids, data, run, report, strategy, target)
    return UnlearnResult(run.model, report, ckpt_path, report_path)


def _validate(strategy: str, target: str, epochs: int | None, check_every: int, params: dict | None,
              forget: str | Sequence[str]):
    """Refuse a bad request before any file is read: (strategy, resolved params, epochs, forget IDs)."""
    strat = get_strategy(strategy)
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if epochs is None:
        epochs = DEFAULT_EPOCHS[target]
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    if check_every < 1:
        raise ConfigError(f"check_every must be at least 1 (got {check_every})")
    resolved = strat.resolve(params)
    forget_ids = parse_ids(forget, "--forget")
    return strat, resolved, epochs, forget_ids


def check_request(checkpoint, cohort: Cohort, forget: str | Sequence[str], strategy: str, target: str,
                  epochs: int | None = None, params: dict | None = None) -> None:
    """Refuse what :func:`unlearn` would refuse, reading only the checkpoint (no volume), for a
    caller that records the request before the unlearning runs."""
    _validate(strategy, target, epochs, 1, params, forget)
    payload, _ = _load_model(checkpoint, cohort, "--checkpoint")
    refuse_without_dp(payload, checkpoint, f"unlearning with {strategy}")
    roles(payload, cohort, parse_ids(forget, "--forget"), checkpoint)
    if target != "zero" and not (cohort.select("val") or cohort.select("test")):
        raise ConfigError(f"--target {target} needs held-out subjects (a val or test split) to compare with")


def _load(checkpoint, cohort: Cohort, forget_ids: list[str], calibration: Sequence[str] | None,
          retrain_checkpoint, retrain_seconds: float | None, items: dict[str, dict] | None) -> _Loaded:
    """The original (and retrained) model, the subjects by role, checked against what trained each model,
    and their preprocessed items (cached by ID when the caller gives a cache)."""
    payload, model = _load_model(checkpoint, cohort, "--checkpoint")
    refuse_without_dp(payload, checkpoint, "unlearning")
    cfg = TrainConfig.from_dict(payload["config"])
    retain_subj, forget_subj, trained = roles(payload, cohort, forget_ids, checkpoint)
    test_subj = cohort.select("test")
    calib_subj = ([cohort.subject(i) for i in calibration] if calibration
                  else cohort.select("val") or test_subj)
    bad = [s.id for s in calib_subj if trained and s.id in set(trained)]
    if bad:
        raise ConfigError(f"calibration subjects {', '.join(bad)} trained the model: they are not unseen")

    retrain_model = None
    if retrain_checkpoint is not None:
        rp, retrain_model = _load_model(retrain_checkpoint, cohort, "--retrain")
        if rp["config"].get("model") != cfg.model:
            raise CheckpointError(f"--retrain {retrain_checkpoint}: model {rp['config'].get('model')!r} differs "
                                  f"from the original's {cfg.model!r}")
        rtrained = set(rp.get("extra", {}).get("train_subjects", []))
        leaked = [i for i in forget_ids if i in rtrained]
        if leaked:
            raise ConfigError(f"--retrain {retrain_checkpoint}: trained on forget subjects {', '.join(leaked)}")
        if retrain_seconds is None:
            retrain_seconds = rp.get("extra", {}).get("unlearn", {}).get("seconds")

    cache = items if items is not None else {}
    need = [s for s in (*retain_subj, *forget_subj, *test_subj, *calib_subj) if s.id not in cache]
    for s, it in zip(need, load_preprocessed(need, cohort, cfg.spacing), strict=True):
        cache[s.id] = it
    return _Loaded(payload, model, cfg, trained, retain_subj, forget_subj, test_subj, calib_subj, retrain_model,
                   retrain_seconds, [cache[s.id] for s in retain_subj], [cache[s.id] for s in forget_subj],
                   [cache[s.id] for s in test_subj], [cache[s.id] for s in calib_subj])


def roles(payload: dict, cohort: Cohort, forget_ids: list[str], checkpoint) -> tuple[list, list, list[str] | None]:
    """(retain subjects, forget subjects, the IDs that trained the model or None) of a request on the
    model ``payload`` (read from ``checkpoint``): the retain subjects are those that trained it."""
    try:
        retain_subj, forget_subj = cohort.forget_split(forget_ids)
    except ConfigError as exc:
        raise ConfigError(f"--forget: {exc}") from None
    trained = payload.get("extra", {}).get("train_subjects")
    if trained:
        missing = [i for i in forget_ids if i not in set(trained)]
        if missing:
            raise ConfigError(f"--forget: {', '.join(missing)} did not train the model in {checkpoint}")
        retain_subj = [s for s in retain_subj if s.id in set(trained)]
        if not retain_subj:
            raise ConfigError("--forget names every subject the model trained on: nothing left to retain")
    return retain_subj, forget_subj, trained


def _run(strat, resolved: dict, data: _Loaded, *, strategy: str, target: str, epochs: int, fix_decoder: bool,
         seed: int, check_every: int, auc_threshold: float, utility_fraction: float, keep_original: bool,
         device: str, on_step: Callable[[int, int, float], None] | None, references=None, statistic: str = "loss",
         views: int = 2, stop_p: float | None = None) -> _Run:
    """Run the strategy on the original model (moved to ``device``), within the step budget of ``epochs``."""
    cfg, forget_items, calib_items = data.cfg, data.forget_items, data.calib_items
    dev = pick_device(device)
    model = data.model.to(dev)
    original = None
    if keep_original:
        original = copy.deepcopy(model)

    steps_per_epoch = math.ceil(len(forget_items) / cfg.subjects_per_step)
    budget = epochs * steps_per_epoch
    checks: list[dict] = []
    floor = 0.0
    if target == "unseen":
        base = check_statistics(model, calib_items, cfg)
        floor = utility_fraction * metrics.mean([r["dice"] for r in base])
    should_stop = (unseen_stopper(forget_items, calib_items, cfg, auc_threshold=auc_threshold, utility_floor=floor,
                                  log=checks) if target == "unseen" else (lambda step, m: False))
    if target == "calibrated":
        should_stop = calibrated_stopper(references, forget_items, calib_items, cfg.patch_size, cfg.num_classes,
                                         views=views, seed=seed, statistic=statistic,
                                         utility_fraction=utility_fraction, log=checks,
                                         **({} if stop_p is None else {"stop_p": stop_p}))
    dec_names = decoder_parameter_names(model)
    ctx = UnlearnContext(config=cfg, retain_items=data.retain_items, forget_items=forget_items, steps=budget,
                         steps_per_epoch=steps_per_epoch, seed=seed, check_every=check_every,
                         should_stop=should_stop, decoder_names=dec_names, fix_decoder=fix_decoder, device=dev,
                         references=references,
                         on_step=(lambda s, loss: on_step(s, budget, loss)) if on_step else None)
    frozen = []
    if fix_decoder and strategy != "retrain":
        for n, p in model.named_parameters():
            if n in dec_names and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)

    seed_everything(seed)
    t0 = time.perf_counter()
    try:
        new_model = strat(model, ctx, resolved)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    seconds = time.perf_counter() - t0
    new_model.eval()
    return _Run(new_model, original, ctx, checks, floor, seconds, budget, steps_per_epoch, dev)


def _run_report(checkpoint, cohort: Cohort, forget_ids: list[str], data: _Loaded, run: _Run, *, strategy: str,
                target: str, fix_decoder: bool, resolved: dict, epochs: int, check_every: int, auc_threshold: float,
                seed: int) -> dict:
    """The report's account of the request and the run (the evaluation adds the models' scores)."""
    report: dict = {
        "request": {"checkpoint": str(checkpoint), "cohort": cohort.name, "forget": forget_ids,
                    "retain": [s.id for s in data.retain_subj], "test": [s.id for s in data.test_subj],
                    "calibration": [s.id for s in data.calib_subj]},
        "strategy": strategy, "fix_decoder": bool(fix_decoder and strategy != "retrain"), "target": target,
        "params": resolved, "epochs": epochs, "steps_per_epoch": run.steps_per_epoch,
        "step_budget": run.budget if strategy != "retrain" else data.cfg.steps, "epoch_definition": EPOCH_DEFINITION,
        "steps_run": run.ctx.steps_run, "stopped_early": run.ctx.stopped_early, "check_every": check_every,
        "auc_threshold": auc_threshold, "utility_floor": run.floor, "checks": run.checks, "seed": seed,
        "seconds": run.seconds, "strategy_log": run.ctx.log, "subjects_seen": sorted(set(run.ctx.sampler.seen)),
        "versions": versions(),
    }
    if data.retrain_seconds:
        report["retrain_seconds"] = float(data.retrain_seconds)
        report["time_ratio"] = run.seconds / float(data.retrain_seconds)
        report["speedup"] = float(data.retrain_seconds) / max(run.seconds, 1e-9)
    return report


def evaluate_unlearned(checkpoint, cohort: Cohort, forget: str | Sequence[str], unlearned, *,
                       retrain_checkpoint=None, retrain_seconds: float | None = None, seconds: float | None = None,
                       mia_views: int = 2, seed: int = 0, device: str = "auto",
                       items: dict[str, dict] | None = None,
                       on_evaluate: Callable[[int, int], None] | None = None) -> dict:
    """The evaluation :func:`unlearn` adds to its report (``evaluate=True``), of an unlearned model
    already written (``unlearned``: its checkpoint), so that an erasure can unlearn and evaluate in
    two recorded stages. ``seconds``: the unlearning's wall time, for the ratio to the retrain's."""
    forget_ids = parse_ids(forget, "--forget")
    data = _load(checkpoint, cohort, forget_ids, None, retrain_checkpoint, retrain_seconds, items)
    dev = pick_device(device)
    _, model = _load_model(unlearned, cohort, "unlearned model")
    out = _evaluate(data, model.to(dev).eval(), data.model.to(dev).eval(), dev, mia_views, seed, None, None,
                    on_evaluate)
    if data.retrain_seconds and seconds is not None:
        out.update(retrain_seconds=float(data.retrain_seconds), time_ratio=seconds / float(data.retrain_seconds),
                   speedup=float(data.retrain_seconds) / max(seconds, 1e-9))
    return out


def _evaluate(data: _Loaded, model: torch.nn.Module, original: torch.nn.Module | None, device: torch.device,
              mia_views: int, seed: int, original_metrics: dict | None, retrain_metrics: dict | None,
              on_evaluate: Callable[[int, int], None] | None) -> dict:
    """Scores of the original, unlearned (``model``) and (when given) retrained model, and the
    differences between them."""
    cfg, forget_items, test_items = data.cfg, data.forget_items, data.test_items
    retrain_model = data.retrain_model
    groups = {"retain": data.retain_items, "forget": forget_items, "test": test_items}
    # every pass below runs a model over whole subjects; counted so a caller can show progress
    n_groups = len(data.retain_items) + len(forget_items) + len(test_items)
    n_mia = (len(forget_items) + len(test_items)) if test_items else 0
    fresh_retrain = retrain_model is not None and retrain_metrics is None
    total = ((n_groups + n_mia if original_metrics is None else 0) + (n_groups + n_mia if fresh_retrain else 0)
             + n_groups + n_mia)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if on_evaluate:
            on_evaluate(done, total)

    if on_evaluate:
        on_evaluate(0, total)
    res: dict = {}
    # the retrained model first: its membership rows are the reference of the original's and the
    # unlearned model's calibrated AUC, so the reference model runs over the subjects once, not twice
    if retrain_model is not None:
        if retrain_metrics is not None:
            res["retrain"] = retrain_metrics
        else:
            retrain_model = retrain_model.to(device)
            res["retrain"] = _retrain_metrics(retrain_model, groups, cfg, mia_views, seed, tick, n_mia)
    ref_rows = res.get("retrain", {}).get("reference_rows")
    if original_metrics is not None:
        res["original"] = original_metrics
    else:
        res["original"] = _group_metrics(original, groups, cfg, tick)
        res["original"]["mia"] = _mia(original, forget_items, test_items, cfg, mia_views, seed,
                                      None if ref_rows else retrain_model, ref_rows)
        tick(n_mia)
    res["unlearned"] = _group_metrics(model, groups, cfg, tick)
    res["unlearned"]["mia"] = _mia(model, forget_items, test_items, cfg, mia_views, seed,
                                   None if ref_rows else retrain_model, ref_rows)
    tick(n_mia)
    out = dict(res)
    u = _flat(res["unlearned"])
    out["vs_original"] = {k: u[k] - v for k, v in _flat(res["original"]).items()}
    if "retrain" in res:
        r = _flat(res["retrain"])
        out["vs_retrain"] = {k: u[k] - v for k, v in r.items()}
        out["forget_dice_distance_to_retrain"] = abs(u["forget_dice"] - r["forget_dice"])
        out["retain_dice_ratio"] = u["retain_dice"] / r["retain_dice"] if r["retain_dice"] else math.nan
    out["mia_auc"] = {"original": res["original"]["mia"]["auc"], "unlearned": res["unlearned"]["mia"]["auc"],
                      "retrain": res.get("retrain", {}).get("mia", {}).get("auc")}
    return out


def _retrain_metrics(model: torch.nn.Module, groups: dict[str, list[dict]], cfg: TrainConfig, views: int, seed: int,
                     tick: Callable[[int], None], n_mia: int) -> dict:
    """The retrained model's scores, with its per-subject membership rows (the reference of the calibrated AUC)."""
    forget_items, test_items = groups["forget"], groups["test"]
    out = _group_metrics(model, groups, cfg, tick)
    rm = mia.audit_items(model, forget_items, test_items, cfg.patch_size, cfg.num_classes,
                         views=views, seed=seed, n_boot=1000) if test_items else None
    tick(n_mia)
    out["mia"] = ({"auc": rm.auc, "ci": [rm.ci_low, rm.ci_high], "members": rm.n_members,
                   "nonmembers": rm.n_nonmembers, "views": views, "warning": rm.warning}
                  if rm is not None else {"auc": math.nan})
    if rm is not None:
        out["reference_rows"] = {
            "members": [{k: r[k] for k in ("id", "loss", "dice")} for r in rm.members],
            "nonmembers": [{k: r[k] for k in ("id", "loss", "dice")} for r in rm.nonmembers]}
    return out


def _write(out_dir, checkpoint, cohort: Cohort, forget_ids: list[str], data: _Loaded, run: _Run, report: dict,
           strategy: str, target: str) -> tuple[Path | None, Path | None]:
    """With ``out_dir``: the unlearned checkpoint and the report beside it; (None, None) without."""
    if out_dir is None:
        return None, None
    out_dir = Path(out_dir)
    retain_ids = [s.id for s in data.retain_subj]
    trained_list = retain_ids if strategy == "retrain" else list(data.trained or [*retain_ids, *forget_ids])
    extra = {"train_subjects": trained_list, "cohort": cohort.name,
             "unlearn": {"strategy": strategy, "forgotten": forget_ids, "target": target,
                         "fix_decoder": report["fix_decoder"], "seconds": run.seconds, "source": str(checkpoint)}}
    ckpt_path = save_checkpoint(out_dir / "unlearned.pt", run.model, config=data.cfg.to_dict(),
                                step=int(data.payload.get("step", 0)) + run.ctx.steps_run, extra=extra)
    report["output"] = str(ckpt_path)
    report_path = out_dir / "report.json"
    write_json(report_path, report)
    return ckpt_path, report_path


def report_rows(report: dict) -> tuple[list[str], list[list]]:
    """A readable table of a report: one row per model."""
    cols = ["model", "retain Dice", "forget Dice", "test Dice", "retain MAE", "forget MAE", "Dice gap", "MAE gap",
            "MIA AUC", "MIA 95 % CI"]
    rows = []
    for name in ("original", "unlearned", "retrain"):
        m = report.get(name)
        if not m:
            continue
        mia_ = m.get("mia", {})
        ci = mia_.get("ci")
        # a CI from fewer than 5 members or non-members is marked; mia_warnings() says why
        ci_text = (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-") + (" *" if mia_.get("warning") else "")
        rows.append([name, m["retain"]["dice"], m["forget"]["dice"], m["test"]["dice"], m["retain"]["mae"],
                     m["forget"]["mae"], m["dice_gap"], m["mae_gap"], mia_.get("auc", math.nan), ci_text])
    return cols, rows


def mia_warnings(report: dict) -> list[str]:
    """The small-sample warnings of a report's membership AUCs (one per distinct text), to print
    with the table: an AUC of 1.000, CI [1, 1] from 1 member vs 2 non-members means nothing."""
    found = [report.get(name, {}).get("mia", {}).get("warning") for name in ("original", "unlearned", "retrain")]
    return list(dict.fromkeys(w for w in found if w))
