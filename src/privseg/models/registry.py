"""One registry of segmentation networks, and one encoder/decoder split that works for all of them.

Adding a model is one decorated function::

    @register_model("mynet")
    def _mynet(*, in_channels, num_classes, spatial_dims, norm, **kwargs) -> nn.Module: ...

Every registered model returns logits of shape ``(N, num_classes, *input_spatial)`` and
implements ``decoder_modules() -> list[nn.Module]`` (and ``encoder_modules()``). The
decoder is the task head (U-Net: up path + final conv; MedicalNet: ``conv_seg``); the
encoder is *every other parameter*, so the split always covers the whole model with no
overlap. Unlearning uses it: ``fix_decoder`` freezes :func:`encoder_decoder_params`'s
second list, ``random_encoder`` calls :func:`reinit_encoder`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from privseg.errors import ConfigError
from privseg.models.medicalnet import MedicalNetResNet, medicalnet, unwrap_model
from privseg.models.unet import DEFAULT_NORM, UNet
from privseg.utils import registrar

NORMS = ("batch", "group", "instance")

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding ``fn(*, in_channels, num_classes, spatial_dims, norm, **kwargs)`` to :data:`MODELS`."""
    return registrar(MODELS, name.strip().lower(), kind="model")


def build_model(name: str, *, in_channels: int, num_classes: int, spatial_dims: int = 3, norm: str = DEFAULT_NORM,
                **kwargs) -> nn.Module:
    """Build the registered network ``name``; bad names or arguments raise :class:`ConfigError`.

    Extra keyword arguments go to the model (e.g. ``features=`` for U-Nets,
    ``upsample="trilinear"``, ``shortcut="A"`` or ``pretrained=path`` for MedicalNet ResNets).
    """
    key = str(name).strip().lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims={spatial_dims} must be 2 or 3")
    if int(in_channels) < 1 or int(num_classes) < 1:
        raise ConfigError(f"in_channels={in_channels} and num_classes={num_classes} must both be >= 1")
    try:
        return MODELS[key](in_channels=int(in_channels), num_classes=int(num_classes), spatial_dims=spatial_dims,
                           norm=norm, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {key!r}: bad arguments ({exc})") from None


@register_model("unet")
def _unet(*, in_channels: int, num_classes: int, spatial_dims: int, norm: str, **kwargs) -> nn.Module:
    """Default network: 4-level U-Net, 16-32-64-128 channels (1.3 M parameters in 3D, 0.45 M in 2D)."""
    kwargs.setdefault("features", (16, 32, 64, 128))
    return UNet(spatial_dims, in_channels=in_channels, num_classes=num_classes, norm=norm, **kwargs)


@register_model("unet_tiny")
def _unet_tiny(*, in_channels: int, num_classes: int, spatial_dims: int, norm: str, **kwargs) -> nn.Module:
    """3-level 8-16-32 U-Net for tests and smoke runs (works on 16³ patches)."""
    kwargs.setdefault("features", (8, 16, 32))
    return UNet(spatial_dims, in_channels=in_channels, num_classes=num_classes, norm=norm, **kwargs)


def _register_medicalnet(depth: int) -> None:
    name = f"resnet{depth}"

    @register_model(name)
    def _build(*, in_channels: int, num_classes: int, spatial_dims: int, norm: str, **kwargs) -> nn.Module:
        if spatial_dims != 3:
            raise ConfigError(f"model {name!r} (MedicalNet 3D ResNet) is 3D only; got spatial_dims={spatial_dims}")
        return medicalnet(depth, in_channels=in_channels, num_classes=num_classes, norm=norm, **kwargs)

    _build.__doc__ = f"MedicalNet 3D ResNet-{depth} with its conv_seg head (3D only)."


for _depth in (10, 18, 34, 50):
    _register_medicalnet(_depth)


def encoder_decoder_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(encoder_modules, decoder_modules)`` of a registered model (Opacus/DataParallel wrappers unwrapped)."""
    net = unwrap_model(model)
    if not callable(getattr(net, "decoder_modules", None)):
        raise ConfigError(f"{type(net).__name__} has no decoder_modules(); it cannot be split into encoder/decoder")
    decoder = list(net.decoder_modules())
    if callable(getattr(net, "encoder_modules", None)):
        encoder = list(net.encoder_modules())
    else:
        inside = {id(m) for d in decoder for m in d.modules()}
        encoder = [m for m in net.children() if id(m) not in inside]
    return encoder, decoder


def encoder_decoder_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(encoder_params, decoder_params)``: decoder = parameters of ``decoder_modules()``, encoder = all others.

    Defined by exclusion so the two lists always partition ``model.parameters()``.
    """
    _, decoder = encoder_decoder_modules(model)
    in_decoder = {id(p) for d in decoder for p in d.parameters()}
    params = list(unwrap_model(model).parameters())
    return [p for p in params if id(p) not in in_decoder], [p for p in params if id(p) in in_decoder]


def reinit_encoder(model: nn.Module) -> None:
    """Re-initialise the encoder in place with the model's own initialisation (``random_encoder`` unlearning)."""
    net = unwrap_model(model)
    init = getattr(net, "init_weights", None)
    encoder, _ = encoder_decoder_modules(net)
    for module in encoder:
        for sub in module.modules():
            if callable(init):
                init(sub)
            elif callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()


__all__ = ["MODELS", "MedicalNetResNet", "UNet", "build_model", "encoder_decoder_modules", "encoder_decoder_params",
           "register_model", "reinit_encoder"]
