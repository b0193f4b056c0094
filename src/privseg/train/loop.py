"""Patch-based training with checkpoints and resume.

``train_steps`` is the one training loop; the :class:`Trainer` adds checkpointing and
resume on top, the federated client calls ``train_steps`` for its local epochs, and the
privacy module swaps in a DP step through ``step_fn``. What a run trains is its
:class:`~privseg.train.config.TrainConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from privseg.data.cohort import Cohort, write_splits
from privseg.data.transforms import PatchSampler, load_preprocessed
from privseg.errors import ConfigError
from privseg.train.checkpoint import load_checkpoint, save_checkpoint
from privseg.train.config import TrainConfig
from privseg.train.initial import initial_model
from privseg.train.losses import SegLoss
from privseg.train.tracking import RunTracker
from privseg.utils import pick_device, seed_everything


class StepFn(Protocol):
    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: SegLoss,
                 images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor) -> float: ...


def standard_step(model, optimizer, loss_fn, images, labels, owner) -> float:
    """One ordinary (non-private) optimisation step on a batch of patches."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def prepare_steps(model: torch.nn.Module, items: Sequence[dict], config, loss_fn: SegLoss | None = None,
                  sampler: PatchSampler | None = None) -> tuple[torch.device, SegLoss, PatchSampler]:
    """What every step loop needs: the model's device, the loss, the patch sampler; model in train mode."""
    if not items:
        raise ConfigError("no training subjects")
    model.train()
    return (next(model.parameters()).device, loss_fn or SegLoss(),
            sampler or PatchSampler(config.patch_size, config.patches_per_subject, config.seed))


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, items: Sequence[dict],
                config: TrainConfig, *, start: int = 0, stop: int | None = None, step_fn: StepFn = standard_step,
                loss_fn: SegLoss | None = None, sampler: PatchSampler | None = None,
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run steps ``start`` .. ``stop`` on ``items``. Each step draws ``subjects_per_step``
    subjects and ``patches_per_subject`` patches from each; the draw depends only on
    (seed, step), so a resumed run repeats an uninterrupted one."""
    stop = config.steps if stop is None else stop
    device, loss_fn, sampler = prepare_steps(model, items, config, loss_fn, sampler)
    losses = []
    for step in range(start, stop):
        rng = np.random.default_rng((config.seed, step))
        k = min(config.subjects_per_step, len(items))
        chosen = [items[i] for i in rng.choice(len(items), size=k, replace=False)]
        images, labels, owner = sampler.sample(chosen, seed=int(rng.integers(2**31)))
        loss = step_fn(model, optimizer, loss_fn, images.to(device), labels.to(device), owner.to(device))
        losses.append(loss)
        if on_step:
            on_step(step + 1, loss)
    return losses


class Trainer:
    """Trains on a cohort's training subjects, checkpointing to ``out_dir/last.pt`` every
    ``checkpoint_every`` steps and resuming from it when asked."""

    def __init__(self, cohort: Cohort, config: TrainConfig, out_dir: str | Path, subjects=None):
        self.cohort = cohort
        self.config = config
        self.out_dir = Path(out_dir)
        self.subjects = list(subjects) if subjects is not None else cohort.select("train")
        if not self.subjects:
            raise ConfigError(f"cohort {cohort.name} has no training subjects")
        self.device = pick_device(config.device)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    def fit(self, resume: bool = True, on_step: Callable[[int, int, float], None] | None = None,
            items: Sequence[dict] | None = None, step_fn: StepFn = standard_step) -> dict:
        cfg = self.config
        seed_everything(cfg.seed)
        resuming = resume and self.checkpoint_path.exists()
        model = (cfg.build_model() if resuming else initial_model(cfg)).to(self.device)
        optimizer = make_optimizer(model, cfg)
        start, history = 0, []
        if resuming:
            payload = load_checkpoint(self.checkpoint_path)
            model.load_state_dict(payload["model"])
            if "optimizer" in payload:
                optimizer.load_state_dict(payload["optimizer"])
            start = int(payload["step"])
            history = list(payload["extra"].get("history", []))
        if items is None:
            items = load_preprocessed(self.subjects, self.cohort, cfg.spacing)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_splits(self.cohort, self.out_dir)  # splits.csv: the split this run used, to see and to pin again
        tracker = self._start_tracking(history)  # privseg.train.tracking: run.json, live metrics, TensorBoard

        def _on_step(s: int, loss: float) -> None:
            tracker.log_metrics(s, {"loss": loss})
            if on_step:
                on_step(s, cfg.steps, loss)

        t0 = time.perf_counter()
        step = start
        try:
            while step < cfg.steps:
                stop = min(cfg.steps, (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
                losses = train_steps(model, optimizer, items, cfg, start=step, stop=stop, step_fn=step_fn,
                                     on_step=_on_step)
                history.extend({"step": step + i + 1, "loss": v} for i, v in enumerate(losses))
                step = stop
                self._save(model, optimizer, step, history)
        except BaseException:
            tracker.finish("failed")
            raise
        elapsed = time.perf_counter() - t0
        tracker.log_artifact(self.checkpoint_path, "checkpoint", "checkpoint")
        tracker.finish(final={"loss": history[-1]["loss"] if history else None, "steps": step}, seconds=elapsed)
        return {"model": model, "checkpoint": self.checkpoint_path, "steps": cfg.steps, "resumed_from": start,
                "history": history, "seconds": elapsed}

    def _save(self, model, optimizer, step, history) -> None:
        extra = {"history": history, "cohort": self.cohort.name,
                 "train_subjects": [s.id for s in self.subjects]}
        save_checkpoint(self.checkpoint_path, model, config=self.config.to_dict(), step=step,
                        optimizer=optimizer, extra=extra)
        self._tracker.write_history(history)  # metrics.jsonl, same format as before, atomically

    def _start_tracking(self, history: list[dict]):
        root = self.cohort.root
        self._tracker = RunTracker(self.out_dir, kind="train")
        self._tracker.log_config(self.config.to_dict(), cohort=self.cohort.name,
                                 cohort_path=str(Path(root).resolve()) if root else None,
                                 train_subjects=[s.id for s in self.subjects])
        self._tracker.write_history(history)  # a resumed run restarts from its checkpoint's history
        return self._tracker
