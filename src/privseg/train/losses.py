"""Segmentation loss: Dice + cross-entropy (MONAI), with per-sample values for DP and unlearning."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss


class SegLoss(torch.nn.Module):
    """Dice + CE on logits against integer labels of shape (N, 1, *spatial).

    ``reduction="none"`` returns one value per sample (patch), which patient-level
    DP-SGD sums per subject and membership inference uses as a score.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        # DiceLoss, not DiceCELoss: MONAI 1.6 refuses reduction="none" for DiceCELoss; CE is added below.
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_sample = self.per_sample(logits, labels)
        return per_sample.mean() if reduction == "mean" else per_sample.sum() if reduction == "sum" else per_sample

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, logits.ndim))
        dice = self.dice(logits, labels).reshape(logits.shape[0], -1).mean(dim=1)
        ce = torch.nn.functional.cross_entropy(logits, labels[:, 0].long(), reduction="none")
        return self.lambda_dice * dice + self.lambda_ce * ce.mean(dim=dims[:-1])
