"""A small U-Net (2D or 3D) built from MONAI's BasicUNet blocks, without transposed convolutions.

Why not ``monai.networks.nets.BasicUNet`` itself: it always has five levels (four
2x poolings), so a 16³ patch reaches a 1³ bottleneck where InstanceNorm fails in
training and GroupNorm degenerates, and its features tuple is fixed at six entries.
This class reuses the same blocks (``TwoConv``, ``Down``, ``UpCat``) with any
number of levels. Upsampling is ``"nontrainable"``: a 1x1 convolution halves the
channels at the coarse resolution, then (bi/tri)linear interpolation doubles the
size; no ``ConvTranspose`` (whose per-sample gradients are costly and whose
checkerboard artefacts are well known). Odd sizes are handled by UpCat's one-voxel
replicate padding, so any input at least ``2**(levels-1)`` voxels per side works.

Activations are out-of-place LeakyReLU(0.1) because Opacus' per-sample gradient
hooks reject in-place edits of a hooked module's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from privseg.errors import ConfigError

DEFAULT_NORM = "group"  # per-sample-gradient friendly (DP-SGD); TrainConfig.norm's default too

NORMS = ("batch", "group", "instance")


def norm_spec(norm: str, features: Sequence[int], num_groups: int | None = None) -> tuple[str, dict]:
    """MONAI norm argument for ``norm``; GroupNorm's group count must divide every feature width.

    Default groups: the largest divisor of gcd(features) that is at most 8 and leaves at
    least 2 channels per group in the narrowest layer (so it never collapses to InstanceNorm).
    """
    if norm == "batch":
        return ("batch", {})
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm != "group":
        raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    common = math.gcd(*features)
    if num_groups is None:
        cap = max(1, min(8, min(features) // 2))
        num_groups = max(g for g in range(1, cap + 1) if common % g == 0)
    elif num_groups < 1 or common % num_groups:
        raise ConfigError(f"num_groups={num_groups} must divide every feature width {tuple(features)}")
    return ("group", {"num_groups": num_groups})


class UNet(nn.Module):
    """U-Net with ``len(features)`` levels: encoder = input block + poolings, decoder = up path + final 1x1 conv.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: output channels (background included).
        features: channel width per level, finest first, e.g. (16, 32, 64, 128).
        norm: "group" (default, per-sample-gradient friendly), "instance" or "batch".
        num_groups: GroupNorm groups (default chosen by :func:`norm_spec`).
        dropout: dropout ratio inside the convolution blocks.
    """

    def __init__(self, spatial_dims: int = 3, *, in_channels: int = 1, num_classes: int = 2,
                 features: Sequence[int] = (16, 32, 64, 128), norm: str = DEFAULT_NORM, num_groups: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims} must be 2 or 3")
        features = tuple(int(f) for f in features)
        if len(features) < 2 or min(features) < 2:
            raise ConfigError(f"features={features} needs at least two levels of width >= 2")
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels={in_channels} and num_classes={num_classes} must both be >= 1")
        act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": False})
        norm_arg = norm_spec(norm, features, num_groups)
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.features, self.norm = features, norm

        self.encoder = nn.ModuleList([TwoConv(spatial_dims, in_channels, features[0], act, norm_arg, True, dropout)])
        for prev, cur in zip(features[:-1], features[1:], strict=True):
            self.encoder.append(Down(spatial_dims, prev, cur, act, norm_arg, True, dropout))
        self.decoder = nn.ModuleList(
            UpCat(spatial_dims, deep, skip, skip, act, norm_arg, True, dropout, upsample="nontrainable",
                  interp_mode="linear", align_corners=False, halves=True)
            for deep, skip in zip(features[:0:-1], features[-2::-1], strict=True)
        )
        self.final_conv = Conv["conv", spatial_dims](features[0], num_classes, kernel_size=1)

    def encoder_modules(self) -> list[nn.Module]:
        """The down path (input block and every pooling stage)."""
        return [self.encoder]

    def decoder_modules(self) -> list[nn.Module]:
        """The up path and the final 1x1 convolution (frozen by ``fix_decoder``, kept by ``random_encoder``)."""
        return [self.decoder, self.final_conv]

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """PyTorch's default initialisation (what MONAI's blocks start from), reapplied on re-initialisation."""
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"{self.spatial_dims}D U-Net expects {self.spatial_dims + 2}D input (N, C, ...), "
                             f"got shape {tuple(x.shape)}")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.final_conv(x)
