"""Segmentation metrics (docs/architecture.md, "Metrics").

- Dice per foreground class and their mean (MONAI's DiceMetric).
- MAE = mean |softmax probability − one-hot label| over voxels and foreground classes
  (the unlearning study's calibration measure).
- HD95 in millimetres (MONAI's HausdorffDistanceMetric, 95th percentile).
- Gaps for unlearning: Dice gap = Dice_retain − Dice_forget; MAE gap = MAE_forget − MAE_retain.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class for one subject; ``pred`` and ``label`` are (1, *spatial)
    integer maps. A class absent from both prediction and label scores 1.0 (nothing to find,
    nothing found); absent from the label only, 0.0."""
    p = one_hot(pred[None].long(), num_classes)
    y = one_hot(label[None].long(), num_classes)
    d = compute_dice(p, y, include_background=False, ignore_empty=False)[0]
    return [float(x) if not math.isnan(float(x)) else 1.0 for x in d]


def mae(probs: torch.Tensor, label: torch.Tensor) -> float:
    """Mean |p − onehot| over voxels and foreground classes; ``probs`` is (C, *spatial)."""
    y = one_hot(label[None].long(), probs.shape[0])[0].to(probs.dtype)
    return float((probs[1:] - y[1:]).abs().mean())


def hd95(pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing=None) -> list[float]:
    """95th-percentile Hausdorff distance per foreground class (mm when ``spacing`` is given);
    NaN where a class is missing from prediction or label."""
    p = one_hot(pred[None].long(), num_classes)
    y = one_hot(label[None].long(), num_classes)
    d = compute_hausdorff_distance(p, y, include_background=False, percentile=95, spacing=spacing)[0]
    return [float(x) for x in d]


def mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def dice_gap(dice_retain: float, dice_forget: float) -> float:
    """Dice_retain − Dice_forget: positive when forget subjects are segmented worse."""
    return dice_retain - dice_forget


def mae_gap(mae_retain: float, mae_forget: float) -> float:
    """MAE_forget − MAE_retain: positive when the model is less confident-correct on forget subjects."""
    return mae_forget - mae_retain
