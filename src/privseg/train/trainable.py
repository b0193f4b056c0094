"""Partial fine-tuning: which parameters train (``--trainable``); the rest stay as ``--init`` gave them.

DP-SGD's noise has one coordinate per *trained* parameter, so training fewer parameters puts the
same clipped signal against less noise in total (De, Berrada, Hayes, Smith & Balle, "Unlocking
high-accuracy differentially private image classification through scale", 2022; Berrada et al.,
"Unlocking accuracy and fairness in differentially private image classification", 2023): the
frozen parameters get neither gradient, nor clipping, nor noise (:func:`privseg.privacy.grad_sample.dp_params`
takes only ``requires_grad`` parameters, and the DP step draws noise for those alone).

``lora`` trains low-rank adapters on every convolution instead of any weight (Hu et al. 2022,
:mod:`privseg.models.lora`): the weights stay frozen, the adapters start at zero update, and the
saved model is the merged one, an ordinary network; ``lora+norms`` trains the normalisation layers'
scales and shifts beside them.
"""

from __future__ import annotations

from torch import nn

from privseg.errors import ConfigError
from privseg.models.lora import LORA_RANK, add_lora, lora_params
from privseg.models.medicalnet import unwrap_model
from privseg.models.registry import encoder_decoder_params

TRAINABLE = ("all", "norms", "decoder", "norms+decoder", "lora", "lora+norms")
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def check_trainable(which: str) -> str:
    if which not in TRAINABLE:
        raise ConfigError(f"--trainable {which!r} is not one of {', '.join(TRAINABLE)}")
    return which


def trainable_params(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters ``which`` trains: ``all``; ``norms`` (every normalisation layer's scale and
    shift); ``decoder`` (the task head, :func:`privseg.models.encoder_decoder_params`); or both;
    ``lora`` (the adapters :func:`set_trainable` adds), alone or with ``norms``."""
    net = unwrap_model(model)
    if check_trainable(which) == "all":
        return list(net.parameters())
    chosen: dict[int, nn.Parameter] = {}
    if "norms" in which:
        chosen.update((id(p), p) for m in net.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False))
    if "decoder" in which:
        chosen.update((id(p), p) for p in encoder_decoder_params(net)[1])
    if "lora" in which:
        chosen.update((id(p), p) for p in lora_params(net))
    return [p for p in net.parameters() if id(p) in chosen]  # in the model's order


def set_trainable(model: nn.Module, which: str, lora_rank: int = LORA_RANK) -> int:
    """Freeze every parameter ``which`` does not name (``requires_grad = False``); returns how many
    scalars stay trainable. The optimiser skips a parameter without a gradient (AdamW applies no
    weight decay to it either), so a frozen parameter keeps its starting value exactly. ``lora``
    first gives the model's convolutions adapters of rank ``lora_rank`` (in place)."""
    if "lora" in check_trainable(which):
        add_lora(model, lora_rank)
    keep = {id(p) for p in trainable_params(model, which)}
    if not keep:
        raise ConfigError(f"--trainable {which}: {type(unwrap_model(model)).__name__} has no such parameters")
    for p in unwrap_model(model).parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in unwrap_model(model).parameters() if p.requires_grad)


__all__ = ["TRAINABLE", "check_trainable", "set_trainable", "trainable_params"]
