"""MedicalNet (Med3D) 3D ResNet segmentation networks.

The layout, module names and initialisation follow Tencent's MedicalNet
``models/resnet.py`` (Chen et al., "Med3D", 2019) so that its published
``resnet_*.pth`` state dicts load by key: ``conv1``, ``bn1``, ``layer1..4`` (blocks
with ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/.1``) and ``conv_seg.0..6``.
Norm layers keep the ``bn*`` names whatever their type, so the keys match even for
GroupNorm/InstanceNorm (whose missing running statistics then show up as
"unexpected" when a BatchNorm checkpoint is loaded).

Differences from MedicalNet, all deliberate:

* ``forward`` returns logits at the *input* spatial size. MedicalNet's head only
  upsamples 2x, so its output is at 1/4 of the input resolution (stride 2 in
  ``conv1``, the max-pool and ``layer2``); we interpolate the head's output
  trilinearly (``align_corners=False``) back to the input size, so every privseg
  model has the same output contract ``(N, classes, *input_spatial)``.
* ``upsample="trilinear"`` swaps the head's ``ConvTranspose3d`` for a 1x1x1
  convolution followed by 2x trilinear upsampling (kept together as
  ``conv_seg.0`` so the other head keys keep MedicalNet's indices). Applying the
  1x1 convolution before the interpolation is exactly equivalent to after it
  (both are linear and interpolation weights sum to one) and 8x cheaper.
* Activations and the residual addition are out-of-place, because per-sample
  gradient hooks (Opacus) reject in-place edits of a hooked module's output.
  This changes no parameter and no result.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from privseg.errors import CheckpointError, ConfigError
from privseg.utils import load_weights_only

NORMS = ("batch", "group", "instance")
UPSAMPLES = ("transpose", "trilinear")
SHORTCUTS = ("A", "B")


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of groups <= ``max_groups`` that divides ``channels`` (GroupNorm needs a divisor)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 3D normalisation layer by name; InstanceNorm is affine so it has the same weight/bias keys as BatchNorm."""
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")


def conv3x3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    """3x3x3 convolution whose padding equals its dilation, so stride 1 keeps the size."""
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


class ZeroPadShortcut(nn.Module):
    """MedicalNet's parameter-free type-A shortcut: subsample by ``stride`` and zero-pad the extra channels."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes = planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :, :: self.stride, :: self.stride, :: self.stride] if self.stride > 1 else x
        return F.pad(out, (0, 0, 0, 0, 0, 0, 0, self.planes - out.shape[1]))


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (ResNet-10/18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, norm: str, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = make_norm(norm, planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1 → 3x3x3 → 1x1 (x4 channels) residual block (ResNet-50)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, norm: str, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, dilation=dilation, padding=dilation,
                               bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = make_norm(norm, planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class PointwiseUpsample(nn.Module):
    """1x1x1 convolution then 2x trilinear upsampling: the DP-friendly stand-in for MedicalNet's ConvTranspose3d."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2, mode="trilinear", align_corners=False)


DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class MedicalNetResNet(nn.Module):
    """MedicalNet 3D ResNet with its ``conv_seg`` head; returns logits at the input size.

    Encoder = ``conv1``, ``bn1``, ``layer1..4`` (what MedicalNet pre-trained);
    decoder = ``conv_seg`` (task-specific head). See :meth:`decoder_modules`.

    Args:
        depth: 10, 18, 34 (BasicBlock) or 50 (Bottleneck).
        in_channels: image channels; MedicalNet's weights have 1, other counts make
            ``conv1.weight`` a shape mismatch when loading them.
        num_classes: output channels (background included).
        norm: "batch" (MedicalNet's setting), "group" or "instance" (per-sample-gradient friendly).
        upsample: "transpose" (MedicalNet's head) or "trilinear" (no transposed convolution).
        shortcut: "B" (1x1 conv + norm projection; MedicalNet's ResNet-10/50 weights) or
            "A" (parameter-free zero padding; MedicalNet's ResNet-18/34 weights were trained with it).
    """

    def __init__(self, depth: int = 10, *, in_channels: int = 1, num_classes: int = 2, norm: str = "batch",
                 upsample: str = "transpose", shortcut: str = "B"):
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"MedicalNet depth={depth} is not one of {sorted(DEPTHS)}")
        if norm not in NORMS:
            raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
        if upsample not in UPSAMPLES:
            raise ConfigError(f"upsample={upsample!r} is not one of {', '.join(UPSAMPLES)}")
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"shortcut={shortcut!r} is not one of {', '.join(SHORTCUTS)}")
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels={in_channels} and num_classes={num_classes} must both be >= 1")
        block, layers = DEPTHS[depth]
        self.depth, self.norm, self.upsample, self.shortcut = depth, norm, upsample, shortcut
        self.in_channels, self.num_classes = in_channels, num_classes
        self.inplanes = 64

        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)

        features = 512 * block.expansion
        up: nn.Module = (nn.ConvTranspose3d(features, 32, kernel_size=2, stride=2) if upsample == "transpose"
                         else PointwiseUpsample(features, 32))
        self.conv_seg = nn.Sequential(
            up,
            make_norm(norm, 32),
            nn.ReLU(),
            nn.Conv3d(32, 32, kernel_size=3, padding=1, bias=False),
            make_norm(norm, 32),
            nn.ReLU(),
            nn.Conv3d(32, num_classes, kernel_size=1, bias=False),
        )
        self.apply(self.init_weights)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(out_planes, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                    make_norm(self.norm, out_planes),
                )
        modules = [block(self.inplanes, planes, self.norm, stride=stride, dilation=dilation, downsample=downsample)]
        self.inplanes = out_planes
        modules += [block(self.inplanes, planes, self.norm, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """MedicalNet's initialisation (Kaiming-normal fan-out convolutions, unit/zero norms); used by ``apply``,
        and again when unlearning re-initialises the encoder."""
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.ConvTranspose3d):
            module.reset_parameters()
        elif isinstance(module, (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)):
            module.reset_parameters()  # weight 1, bias 0, and fresh running statistics for BatchNorm

    def encoder_modules(self) -> list[nn.Module]:
        """The pre-trainable backbone: everything before ``conv_seg``."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def decoder_modules(self) -> list[nn.Module]:
        """The segmentation head ``conv_seg`` (frozen by ``fix_decoder``, kept by ``random_encoder``)."""
        return [self.conv_seg]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        if len(size) != 3:
            raise ValueError(f"MedicalNet ResNet expects (N, C, D, H, W) input, got shape {tuple(x.shape)}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.conv_seg(x)
        if x.shape[2:] != size:
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        return x


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside an Opacus ``GradSampleModule`` or a (Distributed)DataParallel wrapper."""
    while True:
        inner = getattr(model, "_module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _strip_prefix(state: Mapping[str, object], prefix: str = "module.") -> dict[str, object]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_medicalnet_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a MedicalNet ``resnet_*.pth`` (or any state dict for ``model``) from a local file, leniently.

    Accepts a raw state dict or ``{"state_dict": ...}`` (MedicalNet's format), strips the
    ``module.`` prefix DataParallel adds, skips tensors whose shape does not fit (e.g.
    ``conv1`` for another channel count, the last head layer for another class count) and
    loads the rest with ``strict=False``, because transfer learning expects such gaps.

    Returns ``{"missing": [...], "unexpected": [...], "mismatched": [...], "loaded": [...]}``:
    ``missing`` = model keys not set from the file (mismatched ones included; BatchNorm's
    ``num_batches_tracked`` left out since it carries no learned value), ``unexpected`` =
    file keys the model has no slot for, ``mismatched`` = keys present in both with
    different shapes. Raises :class:`CheckpointError` (naming the path) when the file is
    missing, unreadable, not a state dict, or fits none of the model's tensors.
    """
    path = Path(path)
    payload = load_weights_only(path, "MedicalNet weights file")
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors, "
                              "or {'state_dict': ...})")
    state = _strip_prefix(payload)
    target = unwrap_model(model)
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if not usable:
        raise CheckpointError(f"{path}: none of its {len(state)} tensors fits the model "
                              f"({type(target).__name__}); is it the right architecture?")
    target.load_state_dict(usable, strict=False)
    if any(".downsample." in k for k in own if k not in state) and not any(".downsample." in k for k in state):
        warnings.warn(f"{path}: has no shortcut projection (downsample) weights but the model has; MedicalNet's "
                      "resnet_18/34 weights were trained with shortcut type A - build the model with shortcut='A'",
                      stacklevel=2)
    return {
        "missing": sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked")),
        "unexpected": sorted(k for k in state if k not in own),
        "mismatched": mismatched,
        "loaded": sorted(usable),
    }


def medicalnet(depth: int, *, in_channels: int, num_classes: int, norm: str = "batch",
               upsample: str = "transpose", shortcut: str = "B", pretrained: str | os.PathLike | None = None,
               ) -> MedicalNetResNet:
    """Build a MedicalNet ResNet and, if ``pretrained`` names a local ``.pth``, load it (lenient, see
    :func:`load_medicalnet_weights`; the report is kept on ``model.pretrained_report``)."""
    model = MedicalNetResNet(depth, in_channels=in_channels, num_classes=num_classes, norm=norm,
                             upsample=upsample, shortcut=shortcut)
    if pretrained is not None:
        model.pretrained_report = load_medicalnet_weights(model, pretrained)
    return model

