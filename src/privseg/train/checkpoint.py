"""Checkpoints: written atomically, read weights-only, with the config and versions inside.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(...,
weights_only=True)`` reads it and no pickle from a stranger is ever executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from privseg.errors import CheckpointError, ConfigError
from privseg.models import build_model
from privseg.train.config import TrainConfig
from privseg.utils import atomic_path, load_weights_only, versions  # load_weights_only: also read from here

FORMAT = "privseg-checkpoint/1"


class Averaged(Protocol):
    """What a checkpoint keeps of a weight average (:class:`privseg.train.ema.WeightEMA`)."""

    def state_dict(self, like: torch.nn.Module | None = None) -> dict[str, torch.Tensor]: ...

    def record(self) -> dict: ...


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, config: dict, step: int = 0,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                    ema: Averaged | None = None) -> Path:
    """Write ``model`` (and optionally the optimizer) with its config; a crash mid-write
    leaves the previous file untouched. With ``ema`` the served weights (``"model"``, what
    evaluate, predict and unlearn load) are the average, and the last iterate, which training
    resumes from, is kept as ``"train_model"`` (:func:`training_weights`)."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": weights if ema is None else {k: v.cpu() for k, v in ema.state_dict(model).items()},
        "config": config,
        "step": int(step),
        "versions": versions(),
        "extra": extra or {},
    }
    if ema is not None:
        payload["train_model"] = weights
        payload["ema"] = ema.record()
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    payload["rng"] = torch.get_rng_state()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def training_weights(payload: dict) -> dict:
    """The weights training resumes from: the last iterate (``"train_model"``) when the served
    ``"model"`` is an EMA, else ``"model"``."""
    return payload.get("train_model", payload["model"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a privseg checkpoint; every failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    payload = load_weights_only(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a privseg checkpoint (missing format {FORMAT!r})")
    _check_payload(payload, path)
    return payload


# config fields every reader of a checkpoint relies on, and their types
_REQUIRED = {"model": str, "norm": str, "in_channels": int, "num_classes": int, "spatial_dims": int}


def _check_payload(payload: dict, path: Path) -> None:
    """The structure the rest of privseg relies on: a state dict of tensors, a config that
    rebuilds the network, an integer step. Anything else is a CheckpointError naming the file."""
    model = payload.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise CheckpointError(f"{path}: checkpoint field 'model' must be a non-empty state dict of tensors")
    train_model = payload.get("train_model")
    if train_model is not None and not (isinstance(train_model, dict) and set(train_model) == set(model) and all(
            isinstance(v, torch.Tensor) for v in train_model.values())):
        raise CheckpointError(f"{path}: checkpoint field 'train_model' must be a state dict of the model's tensors")
    ema = payload.get("ema")
    if ema is not None and not (isinstance(ema, dict) and isinstance(ema.get("updates"), int)
                                and isinstance(ema.get("decay"), float) and 0 < ema["decay"] < 1):
        raise CheckpointError(f"{path}: checkpoint field 'ema' must hold a decay in (0, 1) and an update count")
    cfg = payload.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: checkpoint field 'config' must be a dict")
    for key, kind in _REQUIRED.items():
        value = cfg.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: checkpoint config field {key!r} is missing or not a {kind.__name__} "
                                  f"(got {value!r})")
    if cfg["spatial_dims"] not in (2, 3) or cfg["in_channels"] < 1 or cfg["num_classes"] < 2:
        raise CheckpointError(f"{path}: checkpoint config has impossible dimensions (spatial_dims "
                              f"{cfg['spatial_dims']}, in_channels {cfg['in_channels']}, classes {cfg['num_classes']})")
    try:
        TrainConfig.from_dict(cfg)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint config is invalid ({exc})") from None
    if not isinstance(payload.get("step", 0), int) or not isinstance(payload.get("extra", {}), dict):
        raise CheckpointError(f"{path}: checkpoint fields 'step' (int) or 'extra' (dict) are malformed")


def model_from_checkpoint(payload: dict, path: str | os.PathLike = "checkpoint") -> torch.nn.Module:
    """Rebuild the network named in the checkpoint's config and load its weights."""
    cfg = payload["config"]
    try:
        model = build_model(cfg["model"], in_channels=cfg["in_channels"], num_classes=cfg["num_classes"],
                            spatial_dims=cfg["spatial_dims"], norm=cfg["norm"])
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({str(exc)[:300]})") from None
    return model
