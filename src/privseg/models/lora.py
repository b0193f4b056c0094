"""Low-rank adapters (LoRA) on a network's convolutions: what ``--trainable lora`` fine-tunes.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) freezes a
weight ``W`` and trains a low-rank update: the layer computes ``W x + s B A x`` with ``A`` of
rank ``r``, ``B`` initialised to zero (so the adapted model starts exactly equal to ``W``'s) and
``s = alpha / r``, ``alpha`` fixed at the default rank as Hu et al. fix it at the first rank
tried (so changing ``r`` needs no new learning rate). For a convolution with weight
``(out, in, k, ..., k)`` the update is a rank-``r`` factorisation of its kernel matrix
``(out) x (in k^d)``: ``A`` is a ``k^d`` convolution from ``in`` to ``r`` channels with the
layer's stride, padding and dilation, ``B`` a ``1^d`` convolution from ``r`` back to ``out``
channels -- the form of Hugging Face PEFT's LoRA ``Conv2d``/``Conv3d`` layers. Their composition
is the convolution with kernel ``B A`` (reshaped), so merging is exact up to rounding. Being two
ordinary ``nn.ConvNd``, the adapters need nothing special from the per-patient gradient methods
(:mod:`privseg.privacy.grad_sample`: ``loop``, ``vmap``, ``opacus`` and ``bk``'s fast
convolution path all treat them as any other layer).

Why under DP: the noise has one coordinate per trained parameter. At the default rank 4, the
3D ``unet_tiny`` trains 17.5 k adapter weights instead of 81 k, the 3D ``unet`` 79 k instead of
1.33 M (a layer's rank is capped at its kernel matrix's full rank, ``min(out, in k^d)``, where a
low-rank update would not be lower).

The adapted model speaks plain weights. ``state_dict()`` gives each adapted convolution's merged
weight ``W + s B A`` under the convolution's own name and no adapter keys (while ``B`` is zero,
the weight ``W`` itself, so writing into it in place still loads the model); ``load_state_dict()``
takes plain weights into ``W`` and restarts ``B`` at zero. Checkpoints, the federated exchange,
the weights' EMA, export, inference and erasure therefore see an ordinary model of the
registered architecture. A model built afresh and loaded with trained weights -- each federated
round's local model, a resumed run -- starts new adapters from the merged weights (as ReLoRA
merges and restarts them: Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates",
ICLR 2024), so a federation's global update over many rounds is not limited to rank ``r``.
Transposed and grouped convolutions get no adapter (privseg's U-Nets have none; MedicalNet's
``upsample="transpose"`` head stays frozen).
"""

from __future__ import annotations

import torch
from torch import nn

from privseg.errors import ConfigError
from privseg.models.medicalnet import unwrap_model

LORA_RANK = 4  # the default rank (TrainConfig.lora_rank, --lora-rank)
LORA_ALPHA = float(LORA_RANK)  # s = alpha / r: 1 at the default rank (Hu et al. 2022, Sec. 4.1)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # not ConvTranspose: those are not subclasses of these


def check_rank(rank) -> int:
    """``rank`` as an int >= 1, else :class:`ConfigError` naming the setting."""
    if isinstance(rank, bool) or not isinstance(rank, int | float) or int(rank) != rank or rank < 1:
        raise ConfigError(f"lora_rank (--lora-rank) must be a whole number of at least 1 (got {rank!r})")
    return int(rank)


def full_rank(conv: nn.Module) -> int:
    """The rank of ``conv``'s kernel matrix ``(out) x (in k^d)`` at most: ``min(out, in k^d)``."""
    return min(conv.out_channels, conv.weight[0].numel())


def _adaptable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions that get (or have) an adapter; the adapters' own convolutions are not among them."""
    net = unwrap_model(model)
    adapters = {id(m) for c in net.modules() if hasattr(c, "lora_A") for m in (c.lora_A, c.lora_B)}
    return [(n, m) for n, m in net.named_modules() if type(m) in _CONVS and m.groups == 1 and id(m) not in adapters]


def is_adapted(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for m in unwrap_model(model).modules())


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' weights (every ``A`` and ``B``), in the model's parameter order."""
    return [p for n, p in unwrap_model(model).named_parameters() if n.endswith((".lora_A.weight", ".lora_B.weight"))]


def add_lora(model: nn.Module, rank: int = LORA_RANK) -> list[str]:
    """Give every (ungrouped, not transposed) convolution of ``model`` a rank-``rank`` adapter in
    place; returns the adapted layers' names. ``A`` starts as a convolution's default
    (Kaiming-uniform) weights, ``B`` at zero, so the model computes what it did before. A model
    already adapted at this rank is left as it is. :class:`ConfigError` for a bad rank, one that
    is at least every layer's full rank (the adapters would train more than the layers they adapt),
    another rank than the model's adapters have, or a model without convolutions."""
    rank = check_rank(rank)
    layers = _adaptable(model)
    if not layers:
        raise ConfigError(f"--trainable lora: {type(unwrap_model(model)).__name__} has no convolution to adapt")
    have = {m.lora_rank_setting for _, m in layers if hasattr(m, "lora_A")}
    if have:
        if have != {rank}:
            raise ConfigError(f"lora_rank {rank}: the model already has adapters of rank {sorted(have)}")
        return [n for n, _ in layers]
    widest = max(full_rank(m) for _, m in layers)
    if rank >= widest:
        raise ConfigError(f"lora_rank (--lora-rank) {rank} is at least the full rank of every convolution of "
                          f"{type(unwrap_model(model)).__name__} (the largest is {widest}): a LoRA update would not be "
                          f"low-rank anywhere; choose a rank below {widest}, or --trainable all")
    for _, conv in layers:
        _attach(conv, rank)
    return [n for n, _ in layers]


def _attach(conv: nn.Module, rank: int) -> None:
    r = min(rank, full_rank(conv))
    kind = type(conv)
    dev, dtype = conv.weight.device, conv.weight.dtype
    a = kind(conv.in_channels, r, conv.kernel_size, stride=conv.stride, padding=conv.padding,
             dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, device=dev, dtype=dtype)
    b = kind(r, conv.out_channels, 1, bias=False, device=dev, dtype=dtype)
    nn.init.zeros_(b.weight)
    conv.add_module("lora_A", a)  # A keeps nn.ConvNd's own Kaiming-uniform initialisation, as PEFT's does
    conv.add_module("lora_B", b)
    conv.lora_scale = LORA_ALPHA / r
    conv.lora_rank_setting = rank
    conv.register_forward_hook(_adapted_forward)
    conv.register_state_dict_post_hook(_merged_state)
    conv.register_load_state_dict_pre_hook(_load_plain)


def delta_weight(conv: nn.Module) -> torch.Tensor:
    """The adapter's update ``s B A`` as a kernel of ``conv``'s weight shape."""
    a = conv.lora_A.weight.reshape(conv.lora_A.out_channels, -1)
    b = conv.lora_B.weight.reshape(conv.out_channels, -1)
    return (conv.lora_scale * (b @ a)).reshape(conv.weight.shape)


def _adapted_forward(conv: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # always computed (no shortcut while B is zero): a data-dependent branch would break vmap, and
    # bk/opacus must see the adapters' calls. B = 0 adds exact zeros, so the output is unchanged.
    return output + conv.lora_scale * conv.lora_B(conv.lora_A(args[0]))


def _merged_state(conv: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the merged weight under ``prefix + "weight"``, no adapter keys."""
    for name in ("lora_A", "lora_B"):
        state.pop(f"{prefix}{name}.weight", None)
        getattr(state, "_metadata", {}).pop(f"{prefix}{name}", None)
    if conv.lora_B.weight.any():  # else W itself (already there): the exact merge, and it aliases W
        with torch.no_grad():
            state[f"{prefix}weight"] = conv.weight.detach() + delta_weight(conv).detach()


def _load_plain(conv: nn.Module, state: dict, prefix: str, local_metadata, strict, missing, unexpected,
                errors) -> None:
    """load_state_dict pre-hook: plain weights go into ``W``; the adapter restarts (``B`` = 0, ``A``
    kept), so the model computes exactly the weights loaded."""
    if f"{prefix}weight" not in state:  # a partial load (strict=False) that leaves this layer alone
        return
    state.setdefault(f"{prefix}lora_A.weight", conv.lora_A.weight.detach())
    state.setdefault(f"{prefix}lora_B.weight", torch.zeros_like(conv.lora_B.weight))


__all__ = ["LORA_ALPHA", "LORA_RANK", "add_lora", "check_rank", "delta_weight", "full_rank", "is_adapted",
           "lora_params"]
