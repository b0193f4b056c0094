"""The starting weights of a run (``--init``) and the model a fresh run starts from.

``--init`` reads

* a privseg checkpoint (``privseg train``, ``--public`` included, or a federated run's
  ``global_r*.pt``): the served weights, and the architecture must match exactly;
* a MONAI bundle written by ``privseg export`` (the folder, or its ``models/model.pt``, which is
  a privseg checkpoint);
* a MedicalNet ``resnet_*.pth`` or any plain state dict: loaded leniently
  (:func:`privseg.models.medicalnet.load_medicalnet_weights`: tensors that do not fit are skipped).

A checkpoint made by ``privseg train --public`` (:mod:`privseg.train.warm_start`) carries
``extra["public_data"]`` (the public cohort's generator, seed and scanner profiles);
:func:`init_record` reports it, so a run started from it says what its starting weights saw.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from privseg.errors import CheckpointError
from privseg.models.medicalnet import load_medicalnet_weights, unwrap_model
from privseg.train.checkpoint import FORMAT, load_checkpoint
from privseg.train.config import TrainConfig
from privseg.utils import load_weights_only

BUNDLE_WEIGHTS = Path("models") / "model.pt"  # privseg.export's bundle layout
PUBLIC_KEY = "public_data"  # a checkpoint's extra: what public data it was trained on


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        if (path / BUNDLE_WEIGHTS).is_file():
            return path / BUNDLE_WEIGHTS
        raise CheckpointError(f"--init {path}: a folder, but no MONAI bundle in it ({BUNDLE_WEIGHTS} missing)")
    return path


def init_record(path: str | os.PathLike) -> dict:
    """What ``--init PATH`` is: ``{"path", "kind": privseg|state_dict, "public_data": ... or None}``."""
    f = _weights_file(Path(path))
    payload = load_weights_only(f, "--init weights file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        payload = load_checkpoint(f)
        return {"path": str(path), "kind": "privseg", "public_data": payload.get("extra", {}).get(PUBLIC_KEY)}
    return {"path": str(path), "kind": "state_dict", "public_data": None}


def load_init(model: nn.Module, path: str | os.PathLike) -> dict:
    """Set ``model``'s weights from ``path`` (module docstring); returns :func:`init_record` plus
    what was loaded. A privseg checkpoint of another architecture is refused, naming the file."""
    f = _weights_file(Path(path))
    raw = load_weights_only(f, "--init weights file")
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        payload = load_checkpoint(f)
        own = unwrap_model(model).state_dict()
        theirs = payload["model"]
        bad = sorted(k for k in own if k not in theirs or theirs[k].shape != own[k].shape)
        if bad or set(theirs) - set(own):
            cfg = payload.get("config", {})
            raise CheckpointError(f"--init {f}: a {cfg.get('model')} checkpoint ({cfg.get('in_channels')} channels, "
                                  f"{cfg.get('num_classes')} classes) does not fit this model "
                                  f"({len(bad)} tensors differ, e.g. {(bad or sorted(set(theirs) - set(own)))[0]})")
        unwrap_model(model).load_state_dict(theirs)
        return {"path": str(path), "kind": "privseg", "loaded": len(theirs),
                "public_data": payload.get("extra", {}).get(PUBLIC_KEY)}
    got = load_medicalnet_weights(model, f)
    return {"path": str(path), "kind": "state_dict", "loaded": len(got["loaded"]), "missing": got["missing"],
            "public_data": None}


def initial_model(config: TrainConfig) -> nn.Module:
    """The model a fresh run starts from: :meth:`TrainConfig.build_model` with the ``init`` weights,
    if any (a resumed run, or a site receiving the global model, builds with ``build_model``)."""
    model = config.build_model()
    if config.init:
        load_init(model, config.init)
    return model


__all__ = ["BUNDLE_WEIGHTS", "PUBLIC_KEY", "init_record", "initial_model", "load_init"]
