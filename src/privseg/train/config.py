"""The configuration of a training run (:class:`TrainConfig`), stored in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from privseg.data.cohort import Cohort
from privseg.errors import ConfigError
from privseg.models import MODELS, build_model
from privseg.models.lora import LORA_RANK, check_rank
from privseg.models.unet import DEFAULT_NORM
from privseg.train.trainable import check_trainable, set_trainable
from privseg.utils import setting

PATCH_SIDE = 64  # a 3D patch's side unless told (the field's default; the CLI's --patch)
PATCH_2D = (128, 128)  # a 2D cohort's patch unless told (the field's default is 3D)


@dataclass
class TrainConfig:
    """What a training run needs; stored in every checkpoint. Each field's default and help text
    (``dataclasses.fields(TrainConfig)[i].metadata["help"]``) are also those of the command-line
    option that sets it (``privseg train --lr``)."""

    model: str = setting("unet", "Network name.", choices=MODELS)
    norm: str = setting(DEFAULT_NORM, "batch, group or instance.")
    patch_size: tuple[int, ...] = setting((PATCH_SIDE,) * 3, "Patch shape in voxels, one side per spatial dimension.")
    subjects_per_step: int = setting(2, "Subjects sampled per optimisation step.", min=1)
    patches_per_subject: int = setting(2, "Patches drawn from each sampled subject.", min=1)
    steps: int = setting(300, "Optimisation steps.", min=1)
    lr: float = setting(2e-3, "Learning rate.")
    weight_decay: float = setting(1e-5, "Weight decay.")
    seed: int = setting(0, "Random seed.")
    spacing: tuple[float, ...] | None = setting(None, "Voxel spacing in mm to resample 3D volumes to (None: keep "
                                                "each volume's own).")
    checkpoint_every: int = setting(50, "Steps between checkpoints.", min=1)
    device: str = setting("auto", "auto, cpu or cuda.")
    in_channels: int = setting(1, "Input channels (the cohort's channels).")
    num_classes: int = setting(4, "Output classes, background included.")
    spatial_dims: int = setting(3, "2 or 3.")
    init: str | None = setting(None, "Start from these weights: a privseg checkpoint (e.g. from train --public), a "
                               "MONAI bundle (privseg export) or a MedicalNet .pth (privseg.models.medicalnet).")
    trainable: str = setting("all", "Parameters trained: all, norms, decoder, norms+decoder, lora (low-rank "
                             "adapters on every convolution, saved merged) or lora+norms (the rest stay as --init "
                             "gave them; under DP they get no clipping and no noise).")
    lora_rank: int = setting(LORA_RANK, "Rank of the LoRA adapters of --trainable lora (capped at each layer's full "
                             "rank).", min=1)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != self.spatial_dims or any(p < 8 for p in self.patch_size):
            raise ConfigError(f"patch_size {self.patch_size} must have {self.spatial_dims} sides of at least 8 voxels")
        for name in ("subjects_per_step", "patches_per_subject", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive (got {self.lr})")
        check_trainable(self.trainable)
        check_rank(self.lora_rank)

    @classmethod
    def for_cohort(cls, cohort: Cohort, **kw) -> TrainConfig:
        if "patch_size" not in kw:
            kw["patch_size"] = cls.__dataclass_fields__["patch_size"].default if cohort.spatial_dims == 3 else PATCH_2D
        return cls(in_channels=len(cohort.channels), num_classes=cohort.num_classes,
                   spatial_dims=cohort.spatial_dims, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["spacing"] = list(self.spacing) if self.spacing else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def build_model(self) -> torch.nn.Module:
        """The network, with only the ``trainable`` parameters requiring gradients (with the ``init``
        weights too: :func:`privseg.train.initial.initial_model`)."""
        model = build_model(self.model, in_channels=self.in_channels, num_classes=self.num_classes,
                            spatial_dims=self.spatial_dims, norm=self.norm)
        set_trainable(model, self.trainable, self.lora_rank)
        return model
