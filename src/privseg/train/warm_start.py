"""A warm start and partial fine-tuning: the starting weights (``--init``) and which parameters train
(``--trainable``).

Public pretraining followed by DP fine-tuning of part of the network is what brings DP image
models near non-private utility (De, Berrada, Hayes, Smith & Balle, "Unlocking high-accuracy
differentially private image classification through scale", 2022; Berrada et al., "Unlocking
accuracy and fairness in differentially private image classification", 2023, on chest X-ray
and dermatology). DP-SGD's noise has one coordinate per *trained* parameter, so training fewer
parameters puts the same clipped signal against less noise in total: the frozen parameters get
neither gradient, nor clipping, nor noise (:func:`privseg.privacy.grad_sample._params` takes only
``requires_grad`` parameters, and the DP step draws noise for those alone).

``--init`` reads

* a privseg checkpoint (``privseg train``, ``--public`` included, or a federated run's
  ``global_r*.pt``): the served weights, and the architecture must match exactly;
* a MONAI bundle written by ``privseg export`` (the folder, or its ``models/model.pt``, which is
  a privseg checkpoint);
* a MedicalNet ``resnet_*.pth`` or any plain state dict: loaded leniently
  (:func:`privseg.models.medicalnet.load_medicalnet_weights`: tensors that do not fit are skipped).

A checkpoint made by ``privseg train --public`` carries ``extra["public_data"]`` (the public
cohort's generator, seed and scanner profiles); :func:`init_record` reports it, so a run started
from it says what its starting weights saw.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from privseg.errors import CheckpointError, ConfigError
from privseg.models.medicalnet import load_medicalnet_weights, unwrap_model

TRAINABLE = ("all", "norms", "decoder", "norms+decoder")
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
BUNDLE_WEIGHTS = Path("models") / "model.pt"  # privseg.export's bundle layout
PUBLIC_KEY = "public_data"  # a checkpoint's extra: what public data it was trained on


def check_trainable(which: str) -> str:
    if which not in TRAINABLE:
        raise ConfigError(f"--trainable {which!r} is not one of {', '.join(TRAINABLE)}")
    return which


def trainable_params(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters ``which`` trains: ``all``; ``norms`` (every normalisation layer's scale and
    shift); ``decoder`` (the task head, :func:`privseg.models.encoder_decoder_params`); or both."""
    from privseg.models.registry import encoder_decoder_params

    net = unwrap_model(model)
    if check_trainable(which) == "all":
        return list(net.parameters())
    chosen: dict[int, nn.Parameter] = {}
    if "norms" in which:
        chosen.update((id(p), p) for m in net.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False))
    if "decoder" in which:
        chosen.update((id(p), p) for p in encoder_decoder_params(net)[1])
    return [p for p in net.parameters() if id(p) in chosen]  # in the model's order


def set_trainable(model: nn.Module, which: str) -> int:
    """Freeze every parameter ``which`` does not name (``requires_grad = False``); returns how many
    scalars stay trainable. The optimiser skips a parameter without a gradient (AdamW applies no
    weight decay to it either), so a frozen parameter keeps its starting value exactly."""
    keep = {id(p) for p in trainable_params(model, which)}
    if not keep:
        raise ConfigError(f"--trainable {which}: {type(unwrap_model(model)).__name__} has no such parameters")
    for p in unwrap_model(model).parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in unwrap_model(model).parameters() if p.requires_grad)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        if (path / BUNDLE_WEIGHTS).is_file():
            return path / BUNDLE_WEIGHTS
        raise CheckpointError(f"--init {path}: a folder, but no MONAI bundle in it ({BUNDLE_WEIGHTS} missing)")
    return path


def init_record(path: str | os.PathLike) -> dict:
    """What ``--init PATH`` is: ``{"path", "kind": privseg|state_dict, "public_data": ... or None}``."""
    from privseg.train.checkpoint import FORMAT, load_checkpoint
    from privseg.utils import load_weights_only

    f = _weights_file(Path(path))
    payload = load_weights_only(f, "--init weights file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        payload = load_checkpoint(f)
        return {"path": str(path), "kind": "privseg", "public_data": payload.get("extra", {}).get(PUBLIC_KEY)}
    return {"path": str(path), "kind": "state_dict", "public_data": None}


def load_init(model: nn.Module, path: str | os.PathLike) -> dict:
    """Set ``model``'s weights from ``path`` (module docstring); returns :func:`init_record` plus
    what was loaded. A privseg checkpoint of another architecture is refused, naming the file."""
    from privseg.train.checkpoint import FORMAT, load_checkpoint
    from privseg.utils import load_weights_only

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


def write_start(config, path: str | os.PathLike) -> Path:
    """A federated run's round-0 checkpoint from ``config.init`` (the server starts from round 0's
    checkpoint when there is one), with what the weights are in ``extra["init"]``."""
    from privseg.train.checkpoint import save_checkpoint

    return save_checkpoint(path, config.initial_model(), config=config.to_dict(), step=0,
                           extra={"init": init_record(config.init)})


def public_kind(cohort) -> str:
    """The public cohort that matches ``cohort``'s images: ``dermoscopy`` (RGB), ``ct`` or ``volume`` (MR)."""
    if len(cohort.channels) == 3 or cohort.spatial_dims == 2:
        return "dermoscopy"
    return "ct" if any(s.modality.upper() == "CT" for s in cohort.subjects) else "volume"


def train_public(kind: str, out_dir: str | os.PathLike, config, *, subjects: int = 16, size: int | None = None,
                 seed: int = 0, on_step=None) -> Path:
    """``privseg train --public KIND``: build the public cohort of ``kind``
    (:func:`privseg.data.synth.public.public_cohort`, in ``OUT/public_cohort``), train ``config``
    on it (non-private: it holds no site's patient) and record the public data in the checkpoint
    (``extra["public_data"]``). Returns ``OUT/last.pt``, the ``--init`` for the sites' training.
    ``size``: the public images' side (default: the patch's, at least 32)."""
    from privseg.data.cohort import MANIFEST_NAME, Cohort
    from privseg.data.synth.public import public_cohort
    from privseg.train.checkpoint import load_checkpoint, save_checkpoint
    from privseg.train.loop import Trainer

    out_dir = Path(out_dir)
    where = out_dir / "public_cohort"
    cohort = (Cohort.from_manifest(where / MANIFEST_NAME) if (where / MANIFEST_NAME).exists()
              else public_cohort(where, kind, subjects=subjects, size=size or max(32, *config.patch_size), seed=seed))
    if cohort.info.get("public", {}).get("kind") != kind:
        raise ConfigError(f"{where}: holds public data of kind {cohort.info.get('public', {}).get('kind')!r}, not "
                          f"{kind!r}; use another --out")
    result = Trainer(cohort, config, out_dir).fit(on_step=on_step)
    payload = load_checkpoint(result["checkpoint"])
    extra = {**payload.get("extra", {}), PUBLIC_KEY: cohort.info["public"]}
    return save_checkpoint(result["checkpoint"], result["model"], config=payload["config"], step=payload["step"],
                           extra=extra)


__all__ = ["BUNDLE_WEIGHTS", "PUBLIC_KEY", "TRAINABLE", "check_trainable", "init_record", "load_init", "public_kind",
           "set_trainable", "train_public", "trainable_params", "write_start"]
