"""A run derived from another one: the same model, training settings and strategy from a
chosen checkpoint, with some sites dropped or some patients excluded. The federated retrain
(the gold standard of an erasure, and the way reference models of the calibrated membership
test are trained) is one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from privseg.errors import CheckpointError
from privseg.federated.config import FLConfig
from privseg.federated.private import derived_privacy
from privseg.federated.runstate import RunState
from privseg.federated.simulation import prepare_run, run_rounds
from privseg.federated.sites import SiteSpec
from privseg.train.checkpoint import load_checkpoint, save_checkpoint, training_weights


def derived_run(run_dir: Path, sub_dir: Path, *, sites: Sequence[SiteSpec], start: Path, rounds: int,
                local_steps: int | None = None, name_suffix: str) -> FLConfig:
    """A run in ``sub_dir`` that starts from checkpoint ``start`` with ``sites`` (same model,
    training settings and strategy as ``run_dir``'s). Existing: left as it is (to resume)."""
    cfg = FLConfig.load(run_dir)
    cfg = derived_privacy(cfg, run_dir, sub_dir)  # a DP site's spend goes into its ledger in the original run
    sub = replace(cfg, name=f"{cfg.name}-{name_suffix}", sites=list(sites), rounds=int(rounds),
                  local_steps=int(local_steps or cfg.local_steps), keep_updates=False, eval_every=0, keep_checkpoints=1,
                  min_sites=min(cfg.min_sites, len(sites)), extra={**cfg.extra, "derived_from": str(run_dir)})
    if (sub_dir / "fl_config.json").exists():
        return FLConfig.load(sub_dir)
    sub_dir.mkdir(parents=True, exist_ok=True)
    model = cfg.train.build_model()
    model.load_state_dict(training_weights(load_checkpoint(start)))  # the iterate, not a served average
    save_checkpoint(RunState(sub_dir).checkpoint_path(0), model, config=cfg.train.to_dict(), step=0,
                    extra={"federated": {"run": sub.name, "round": 0, "start": str(start)}})
    prepare_run(sub, sub_dir)
    return sub


def federated_retrain(run_dir: str | Path, out_dir: str | Path, *, drop_site: str | None = None,
                      exclude: dict[str, Sequence[str]] | None = None, from_round: int = 0,
                      rounds: int | None = None, backend: str = "in-process", on_round=None) -> tuple[Path, float]:
    """Retrain the federation without ``drop_site`` and/or the ``exclude`` subjects (per site),
    from the global model after ``from_round`` (0: the initial model) for the rounds that
    followed it (default: up to the run's last round). Returns (final checkpoint, seconds of
    training rounds). The gold standard an erasure is measured against."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, state = FLConfig.load(run_dir), RunState.load(run_dir)
    exclude = exclude or {}
    sites = [replace(s, exclude=(*s.exclude, *exclude.get(s.id, ()))) for s in cfg.sites if s.id != drop_site]
    start = state.checkpoint_path(from_round)
    if not start.is_file():
        raise CheckpointError(f"{start}: the global model after round {from_round} is not kept; cannot retrain "
                              "from there")
    n = rounds if rounds is not None else state.rounds_done - from_round
    derived_run(run_dir, out_dir, sites=sites, start=start, rounds=n, name_suffix=out_dir.name)
    final = run_rounds(out_dir, backend, on_round=on_round)
    return final.last_checkpoint, round_seconds(final)[0]


def round_seconds(state: RunState, which: Callable[[dict], bool] = lambda e: True) -> tuple[float, float]:
    """(wall, CPU) seconds of the run's rounds that ``which`` selects. CPU time counts this process
    only, so it is robust to other load on the machine (in-process backend)."""
    rounds = [e for e in state.rounds if which(e)]
    return sum(float(e.get("wall_s", 0)) for e in rounds), sum(float(e.get("cpu_s", 0)) for e in rounds)
