"""Segmentation loss: Dice + cross-entropy with one value per sample.

The formula is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (Dice over all
classes including background, smoothing 1e-5, plus cross-entropy), written out so that
(a) it returns one value per patch, which patient-level DP-SGD sums per subject and
membership inference uses as a score, (b) it has no in-place one-hot scatter, so
``torch.func.vmap`` can batch it over subjects, and (c) the softmax is computed once for
both terms. ``tests/train/test_train.py`` checks it against MONAI's own loss.
"""

from __future__ import annotations

import torch

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr defaults


class SegLoss(torch.nn.Module):
    """Dice + CE on logits (N, C, *spatial) against integer labels (N, 1, *spatial)."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_sample = self.per_sample(logits, labels)
        return per_sample.mean() if reduction == "mean" else per_sample.sum() if reduction == "sum" else per_sample

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        return self.per_sample_onehot(logits, (labels == classes).to(logits.dtype))

    def per_sample_onehot(self, logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Per-sample loss against a one-hot target of the logits' shape."""
        dims = tuple(range(2, logits.ndim))
        log_prob = torch.log_softmax(logits, 1)
        prob = log_prob.exp()
        inter = (prob * onehot).sum(dims)
        denom = prob.sum(dims) + onehot.sum(dims)
        dice = (1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)).mean(1)
        ce = -(onehot * log_prob).sum(1).mean(dim=tuple(range(1, logits.ndim - 1)))
        return self.lambda_dice * dice + self.lambda_ce * ce
