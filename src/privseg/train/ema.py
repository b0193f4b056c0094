"""An exponential moving average (EMA) of a model's weights: the model served after DP training.

Averaging the iterates (Polyak & Juditsky 1992) smooths the noise DP-SGD adds at every step; De,
Berrada, Hayes, Smith & Balle ("Unlocking High-Accuracy Differentially Private Image
Classification through Scale", 2022, Sec. 3.3) serve an EMA of the DP weights. It is computed
from the released iterates only, so it is post-processing: it costs no privacy and books nothing.

After ``t`` updates the next one uses ``d_t = min(decay, (1 + t) / (10 + t))`` (the warm-up of
TensorFlow's ``ExponentialMovingAverage(num_updates=...)``): ``ema <- d_t ema + (1 - d_t) w``,
so early on the average forgets the random initialisation quickly and its span grows to about
``1 / (1 - decay)`` steps. Floating-point weights are averaged; integer buffers are copied.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from privseg.errors import ConfigError
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint


def warmup_decay(decay: float, t: int) -> float:
    """The decay of update number ``t`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(float(decay), (1.0 + t) / (10.0 + t))


class WeightEMA:
    """EMA of ``model``'s weights, started from its current weights (``updates`` = 0)."""

    def __init__(self, model: torch.nn.Module, decay: float, *, updates: int = 0,
                 shadow: dict[str, torch.Tensor] | None = None):
        if not 0 < float(decay) < 1:
            raise ConfigError(f"EMA decay {decay} must be in (0, 1)")
        self.decay = float(decay)
        self.updates = int(updates)
        source = shadow if shadow is not None else model.state_dict()
        # kept in the weights' own dtype, so a checkpoint holds the average exactly and a resumed
        # run continues it bit for bit
        self.shadow = {k: v.detach().clone() for k, v in source.items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, steps: int = 1) -> None:
        """Fold in ``model``'s weights as the iterate of the next ``steps`` updates (a federated
        round's global model stands for its ``steps`` local steps)."""
        d = 1.0
        for i in range(int(steps)):
            d *= warmup_decay(self.decay, self.updates + i)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach().to(self.shadow[k].device, self.shadow[k].dtype), alpha=1.0 - d)
            else:
                self.shadow[k] = v.detach().clone()
        self.updates += int(steps)

    def state_dict(self, like: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The averaged weights (a copy), in the dtypes of ``like``'s when given."""
        ref = like.state_dict() if like is not None else {}
        return {k: v.to(ref[k].dtype) if k in ref else v.clone() for k, v in self.shadow.items()}

    def record(self) -> dict:
        """What a checkpoint keeps to continue the average: decay and number of updates."""
        return {"decay": self.decay, "updates": self.updates}


def load_ema(payload: dict, model: torch.nn.Module) -> WeightEMA | None:
    """A checkpoint's weight average (:meth:`WeightEMA.record` beside the averaged ``"model"``), to
    continue it on resume (None when it has none)."""
    rec = payload.get("ema")
    if not isinstance(rec, dict):
        return None
    return WeightEMA(model, rec["decay"], updates=int(rec["updates"]), shadow=payload["model"])


def ema_of_checkpoints(paths: Sequence[str | os.PathLike], decay: float, steps_each: int = 1) -> dict:
    """The EMA over the weights of ``paths`` in order (e.g. a federation's global checkpoints of
    rounds 0, 1, ..., each standing for ``steps_each`` steps); the first starts the average.
    Returns the state dict of the averaged weights."""
    if not paths:
        raise ConfigError("EMA over checkpoints: no checkpoints given")
    model = model_from_checkpoint(load_checkpoint(paths[0]), paths[0])
    ema = WeightEMA(model, decay)
    for p in paths[1:]:
        model.load_state_dict(load_checkpoint(p)["model"])
        ema.update(model, steps_each)
    return ema.state_dict(model)


def write_ema_checkpoint(paths: Sequence[str | os.PathLike], out: str | os.PathLike, decay: float,
                         steps_each: int = 1) -> Path:
    """:func:`ema_of_checkpoints` written as a privseg checkpoint ``out`` (config of the last
    input; ``extra["ema"]`` records the decay and the checkpoints it averages, ``extra["dp"]`` is
    kept as provenance, nothing else of the inputs' ``extra`` is)."""
    last = load_checkpoint(paths[-1])
    model = model_from_checkpoint(last, paths[-1])
    model.load_state_dict(ema_of_checkpoints(paths, decay, steps_each))
    extra = {"ema": {"decay": float(decay), "steps_each": int(steps_each), "of": [Path(p).name for p in paths]},
             **{k: v for k, v in last.get("extra", {}).items() if k == "dp"}}  # provenance only
    return save_checkpoint(out, model, config=last["config"], step=int(last.get("step", 0)), extra=extra)
