"""Model zoo: small GroupNorm U-Nets (2D/3D) and MedicalNet 3D ResNets, built by name.

``build_model(name, in_channels=, num_classes=, spatial_dims=, norm=)`` is the one entry
point; ``encoder_decoder_params`` / ``encoder_decoder_modules`` / ``reinit_encoder`` give
the encoder/decoder split unlearning needs, for every model.
"""

from privseg.models.medicalnet import MedicalNetResNet, load_medicalnet_weights, unwrap_model
from privseg.models.registry import (
    MODELS,
    build_model,
    encoder_decoder_modules,
    encoder_decoder_params,
    register_model,
    reinit_encoder,
)
from privseg.models.unet import UNet

__all__ = [
    "MODELS",
    "MedicalNetResNet",
    "UNet",
    "build_model",
    "encoder_decoder_modules",
    "encoder_decoder_params",
    "load_medicalnet_weights",
    "register_model",
    "reinit_encoder",
    "unwrap_model",
]
