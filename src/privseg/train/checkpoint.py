"""Checkpoints: written atomically, read weights-only, with the config and versions inside.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(...,
weights_only=True)`` reads it and no pickle from a stranger is ever executed.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from privseg.errors import CheckpointError
from privseg.utils import atomic_path, versions

FORMAT = "privseg-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, config: dict, step: int = 0,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` (and optionally the optimizer) with its config; a crash mid-write
    leaves the previous file untouched."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "step": int(step),
        "versions": versions(),
        "extra": extra or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    payload["rng"] = torch.get_rng_state()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_weights_only(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True``; any failure is a :class:`CheckpointError`
    naming the file, and pickled objects are refused rather than executed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
    except Exception as exc:  # weights_only refuses pickled objects with UnpicklingError
        raise CheckpointError(f"{path}: refused to load ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a privseg checkpoint; every failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    payload = load_weights_only(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a privseg checkpoint (missing format {FORMAT!r})")
    return payload


def model_from_checkpoint(payload: dict, path: str | os.PathLike = "checkpoint") -> torch.nn.Module:
    """Rebuild the network named in the checkpoint's config and load its weights."""
    from privseg.models import build_model

    cfg = payload["config"]
    try:
        model = build_model(cfg["model"], in_channels=cfg["in_channels"], num_classes=cfg["num_classes"],
                            spatial_dims=cfg["spatial_dims"], norm=cfg["norm"])
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({str(exc)[:300]})") from None
    return model
