"""Patch-based training with checkpoints and resume.

``train_steps`` is the one training loop; the :class:`Trainer` adds checkpointing and
resume on top, the federated client calls ``train_steps`` for its local epochs, and the
privacy module swaps in a DP step through ``step_fn``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from privseg.data.cohort import Cohort, write_splits
from privseg.data.transforms import PatchSampler, load_preprocessed
from privseg.errors import ConfigError
from privseg.models import build_model
from privseg.train.checkpoint import load_checkpoint, save_checkpoint
from privseg.train.losses import SegLoss
from privseg.train.tracking import RunTracker
from privseg.train.warm_start import check_trainable, load_init, set_trainable
from privseg.utils import pick_device, seed_everything, setting


@dataclass
class TrainConfig:
    """What a training run needs; stored in every checkpoint. Each field's default and help text
    (``dataclasses.fields(TrainConfig)[i].metadata["help"]``) are also those of the command-line
    option that sets it (``privseg train --lr``)."""

    model: str = setting("unet", "Network name (unet, unet_tiny, resnet10/18/34/50).")
    norm: str = setting("group", "batch, group or instance.")
    patch_size: tuple[int, ...] = setting((64, 64, 64), "Patch shape in voxels, one side per spatial dimension.")
    subjects_per_step: int = setting(2, "Subjects sampled per optimisation step.", min=1)
    patches_per_subject: int = setting(2, "Patches drawn from each sampled subject.", min=1)
    steps: int = setting(300, "Optimisation steps.", min=1)
    lr: float = setting(2e-3, "Learning rate.")
    weight_decay: float = setting(1e-5, "Weight decay.")
    seed: int = setting(0, "Random seed.")
    spacing: tuple[float, ...] | None = setting(None, "Voxel spacing in mm to resample 3D volumes to (None: keep "
                                                "each volume's own).")
    checkpoint_every: int = setting(50, "Steps between checkpoints.", min=1)
    device: str = setting("auto", "auto, cpu or cuda.")
    in_channels: int = setting(1, "Input channels (the cohort's channels).")
    num_classes: int = setting(4, "Output classes, background included.")
    spatial_dims: int = setting(3, "2 or 3.")
    init: str | None = setting(None, "Start from these weights: a privseg checkpoint (e.g. from train --public), a "
                               "MONAI bundle (privseg export) or a MedicalNet .pth (privseg.models.warm_start).")
    trainable: str = setting("all", "Parameters trained: all, norms, decoder or norms+decoder (the rest stay as "
                             "--init gave them; under DP they get no clipping and no noise).")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != self.spatial_dims or any(p < 8 for p in self.patch_size):
            raise ConfigError(f"patch_size {self.patch_size} must have {self.spatial_dims} sides of at least 8 voxels")
        for name in ("subjects_per_step", "patches_per_subject", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive (got {self.lr})")
        check_trainable(self.trainable)

    @classmethod
    def for_cohort(cls, cohort: Cohort, **kw) -> TrainConfig:
        if "patch_size" not in kw:
            kw["patch_size"] = (64,) * cohort.spatial_dims if cohort.spatial_dims == 3 else (128, 128)
        return cls(in_channels=len(cohort.channels), num_classes=cohort.num_classes,
                   spatial_dims=cohort.spatial_dims, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["spacing"] = list(self.spacing) if self.spacing else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def build_model(self) -> torch.nn.Module:
        """The network, with only the ``trainable`` parameters requiring gradients."""
        model = build_model(self.model, in_channels=self.in_channels, num_classes=self.num_classes,
                            spatial_dims=self.spatial_dims, norm=self.norm)
        set_trainable(model, self.trainable)
        return model

    def initial_model(self) -> torch.nn.Module:
        """The model a fresh run starts from: :meth:`build_model` with the ``init`` weights, if any
        (a resumed run, or a site receiving the global model, builds with :meth:`build_model`)."""
        model = self.build_model()
        if self.init:
            load_init(model, self.init)
        return model


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
        model = (cfg.build_model() if resuming else cfg.initial_model()).to(self.device)
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
