"""Central patient-level DP training: all training patients of a cohort in one place (one "site"),
checkpointed in chunks, each chunk one ledger round keyed by its first step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from privseg.errors import BudgetExceededError, ConfigError
from privseg.privacy.budget import BudgetLedger, ledger_path
from privseg.privacy.engine import check_dp_model
from privseg.privacy.site import make_private, noise_source
from privseg.privacy.spec import DPConfig
from privseg.utils import pick_device, seed_everything


def train_private(cohort, config, dp: DPConfig, out_dir: str | Path, *, site: str = "central",
                  resume: bool = True, on_step: Callable[[int, int, float], None] | None = None,
                  items: Sequence[dict] | None = None) -> dict:
    """Central patient-level DP training (all training subjects of ``cohort`` in one place).

    Checkpoints every ``config.checkpoint_every`` steps; each such chunk is one ledger round in
    ``out_dir/privacy.sqlite`` (site ``central``), checked before it runs. With ``dp.ema`` the
    checkpoint serves the weights' EMA (:mod:`privseg.train.ema`, post-processing, booked nothing)
    and keeps the last iterate to resume from; the returned ``model`` is the served one. Returns
    the trainer's result plus ``epsilon`` / ``delta`` / ``clip`` / ``plan``."""
    # why: privseg.train and privseg.data.transforms import MONAI (seconds); privseg.privacy's ledgers and plans
    # are read without them (console, reports)
    from privseg.data.cohort import write_splits
    from privseg.data.transforms import load_preprocessed
    from privseg.train.checkpoint import load_checkpoint, save_checkpoint, training_weights
    from privseg.train.ema import WeightEMA, load_ema
    from privseg.train.initial import initial_model
    from privseg.train.loop import make_optimizer

    out_dir = Path(out_dir)
    subjects = cohort.select("train")
    if not subjects:
        raise ConfigError(f"cohort {cohort.name} has no training subjects")
    seed_everything(config.seed)
    model = (config.build_model() if resume and (out_dir / "last.pt").exists() else initial_model(config))
    model = model.to(pick_device(config.device))
    check_dp_model(model)
    optimizer = make_optimizer(model, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_splits(cohort, out_dir)  # the split this run used, to see and to pin again
    ledger = BudgetLedger(Path(dp.ledger) if dp.ledger else ledger_path(out_dir))
    if items is None:
        items = load_preprocessed(subjects, cohort, config.spacing)
    ckpt = out_dir / "last.pt"
    start, history, ema = 0, [], None
    if not resume and ledger.rounds(site):
        raise BudgetExceededError(f"{ledger.path} already books DP steps of site {site!r}: a fresh start would "
                                  "replace released rounds in the ledger; resume, or use a new output folder")
    if resume and ckpt.exists():
        payload = load_checkpoint(ckpt)
        model.load_state_dict(training_weights(payload))  # the last iterate, not the served average
        ema = load_ema(payload, model)
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        start = int(payload["step"])
        history = list(payload["extra"].get("history", []))
    # Ledger rows name the chunk's first step (+1). A chunk repeated after a crash from the same
    # checkpoint is the same release (same inputs, same noise) and adds no row; a chunk run again
    # from other inputs is booked again, but the model holds only the last one of each.
    last_of_round = {r["round"]: r["steps"] for r in ledger.rounds(site, scope="") if r["round"] < start + 1}
    booked = sum(last_of_round.values())
    if booked != start:
        raise BudgetExceededError(f"{ledger.path}: the ledger books {booked} DP step(s) of site {site!r} before "
                                  f"step {start}, the checkpoint {ckpt} is at step {start}: refusing to resume "
                                  "a run whose spend does not match its model")
    private = make_private(dp, site=site, items=items, ledger=ledger, noise=noise_source(dp, out_dir, config.seed),
                           subjects_per_step=config.subjects_per_step, total_steps=config.steps, start=start,
                           resume_round=start + 1 if start else None)  # the clip as it was at `start`
    if ema is None and dp.ema:
        ema = WeightEMA(model, dp.ema)

    def _on_step(s: int, v: float) -> None:
        if ema is not None:
            ema.update(model)
        if on_step:
            on_step(s, config.steps, v)

    t0 = time.perf_counter()
    step = start
    eps = ledger.spent(site)
    while step < config.steps:
        stop = min(config.steps, (step // config.checkpoint_every + 1) * config.checkpoint_every)
        round_no = step + 1
        # the spend is booked before the checkpoint: a crash between them repeats the chunk with the
        # same noise (same output, same ledger row); the other order could lose a spend
        losses = private.train_round(model, optimizer, items, config, round_no, step, stop, on_step=_on_step)
        history.extend({"step": step + i + 1, "loss": v} for i, v in enumerate(losses))
        eps = private.epsilon
        save_checkpoint(ckpt, model, config=config.to_dict(), step=stop, optimizer=optimizer,
                        extra={"history": history, "cohort": cohort.name, "dp": dp.to_dict(),
                               "train_subjects": [s.id for s in subjects]}, ema=ema)
        step = stop
    if ema is not None:
        model.load_state_dict(ema.state_dict(model))  # the served model
    return {"model": model, "checkpoint": ckpt, "steps": config.steps, "resumed_from": start, "history": history,
            "seconds": time.perf_counter() - t0, "epsilon": eps, "delta": private.plan.delta,
            "budget": private.plan.epsilon, "clip": private.engine.clip, "noise_multiplier": private.plan.base_sigma,
            "q": private.plan.q, "plan": private.plan.to_dict()}


def central_dp_of(payload: dict) -> dict | None:
    """The privacy spec a checkpoint of central DP training was made under (None otherwise:
    no DP, or a federated run, whose derived work runs under each site's DP engine)."""
    extra = payload.get("extra") or {}
    return extra.get("dp") if extra.get("dp") and "federated" not in extra else None


def refuse_without_dp(payload: dict, path, what: str) -> None:
    """Refuse non-private work on a central DP run before it starts: ``what`` would train on the
    run's patients without DP and release a model that no ledger books."""
    if central_dp_of(payload):
        raise ConfigError(f"{path} was trained with central patient-level DP: {what} would train on its patients "
                          "without DP and release a model its ledger does not book, so privseg refuses it. To "
                          "remove a patient from a central DP model, train again without them: privseg privacy train "
                          "on the cohort without the patient (or its splits file without them, --splits) into a new "
                          "--out, DP and booked like the original")
