"""Sliding-window inference (MONAI), per-subject evaluation, and predictions written back in
the input's own space: NIfTI with its affine and header (3D), a PNG mask of its size (2D), so
viewers overlay them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from PIL import Image

from privseg.data.transforms import load_preprocessed, load_subject, preprocess
from privseg.errors import CheckpointError, ConfigError
from privseg.train import metrics
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.utils import atomic_path


@torch.no_grad()
def predict_probs(model: torch.nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                  device: torch.device | None = None, overlap: float = 0.25, sw_batch_size: int = 4) -> torch.Tensor:
    """Softmax probabilities (C, *spatial) for one channel-first image."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    logits = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size, predictor=model,
                                      overlap=overlap, mode="gaussian", padding_mode="constant")
    model.train(was_training)
    return torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu()


def evaluate_subjects(model: torch.nn.Module, items: Sequence[dict], patch_size: Sequence[int], num_classes: int,
                      with_hd95: bool = False, on_subject: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per-subject Dice per class, mean Dice, MAE (and HD95) on preprocessed items."""
    rows = []
    for k, item in enumerate(items):
        probs = predict_probs(model, item["image"], patch_size)
        pred = probs.argmax(0, keepdim=True)
        label = torch.as_tensor(item["label"])
        dice = metrics.dice_per_class(pred, label, num_classes)
        row = {"id": item["id"], "site": item["site"], "dice": dice, "mean_dice": metrics.mean(dice),
               "mae": metrics.mae(probs, label)}
        if with_hd95:
            spacing = item["image"].pixdim.tolist() if hasattr(item["image"], "pixdim") else None
            row["hd95"] = metrics.hd95(pred, label, num_classes, spacing)
        rows.append(row)
        if on_subject:
            on_subject(k + 1, len(items))
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """Mean of the per-subject metrics, overall and per site."""
    def agg(rs):
        out = {"n": len(rs), "mean_dice": metrics.mean([r["mean_dice"] for r in rs]),
               "mae": metrics.mean([r["mae"] for r in rs])}
        if rs:
            out["dice"] = [metrics.mean([r["dice"][c] for r in rs]) for c in range(len(rs[0]["dice"]))]
        return out

    sites = sorted({r["site"] for r in rows})
    return {"overall": agg(list(rows)), "sites": {s: agg([r for r in rows if r["site"] == s]) for s in sites}}


def write_prediction(item: dict, probs: torch.Tensor, source, out_path: str | os.PathLike) -> Path:
    """Undo the preprocessing (crop, resampling, orientation) with MONAI's inverse and
    write the label map with the source image's affine and header."""
    pred = probs.argmax(0, keepdim=True).to(torch.float32)
    if isinstance(pred, MetaTensor):  # keep only the image's geometry: MONAI warns when two affines meet
        pred = pred.as_tensor()
    image = item["image"]
    pred_mt = MetaTensor(pred, affine=image.affine, applied_operations=list(image.applied_operations))
    inverted = item["transform"].inverse({"image": pred_mt})["image"]
    arr = np.asarray(torch.as_tensor(inverted)[0].round()).astype(np.uint8)
    out_path = Path(out_path)
    if arr.shape != tuple(source.array.shape):
        raise RuntimeError(f"inverse transform gave shape {arr.shape}, expected {source.array.shape}")
    header = source.header.copy() if source.header is not None else None
    img = nib.Nifti1Image(arr, source.affine, header)
    img.set_data_dtype(np.uint8)
    if header is not None:
        img.header["scl_slope"], img.header["scl_inter"] = 1, 0
    suffix = ".nii.gz" if str(out_path).endswith(".nii.gz") else ".nii"
    with atomic_path(out_path) as tmp:
        real_tmp = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(img, str(real_tmp))
            os.replace(real_tmp, tmp)
        finally:
            if real_tmp.exists():
                real_tmp.unlink()
    return out_path


def write_mask_2d(probs: torch.Tensor, source, out_path: str | os.PathLike, label_map: dict | None = None) -> Path:
    """Write a 2D prediction as an 8-bit PNG mask of the image's size. With the cohort's
    ``label_map`` (raw value -> class, e.g. {255: 1}) the classes go back to the dataset's own values,
    so the mask reads like the ground-truth masks it sits beside; otherwise the value is the class index."""
    arr = np.asarray(torch.as_tensor(probs).argmax(0)).astype(np.int64)
    shape = tuple(source.array.shape[:2])
    if arr.shape != shape:
        raise RuntimeError(f"prediction has shape {arr.shape}, the image {shape}")
    values = np.arange(int(probs.shape[0]))
    if label_map:
        inverse = {int(v): int(k) for k, v in label_map.items()}
        if len(inverse) == len(label_map):  # one raw value per class: invertible
            values = np.array([inverse.get(k, k) for k in range(len(values))])
    if values.max() > 255 or values.min() < 0:
        raise RuntimeError(f"class values {values.tolist()} do not fit an 8-bit mask")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:  # the temporary name has no .png suffix: name the format
            Image.fromarray(values[arr].astype(np.uint8), mode="L").save(f, format="PNG")
    return out_path


def check_fits(config: dict, cohort, path) -> None:
    if config["num_classes"] != cohort.num_classes or config["in_channels"] != len(cohort.channels):
        raise CheckpointError(
            f"{path}: model has {config['in_channels']} input channels and {config['num_classes']} classes, "
            f"cohort {cohort.name} has {len(cohort.channels)} and {cohort.num_classes}"
        )


def evaluate_checkpoint(checkpoint: str | os.PathLike, cohort, split: str | None = "test",
                        subject_ids: Sequence[str] | None = None, with_hd95: bool = False,
                        on_subject: Callable[[int, int], None] | None = None) -> dict:
    """Per-subject and per-site Dice/MAE(/HD95) of a checkpoint on a cohort split."""
    payload = load_checkpoint(checkpoint)
    cfg = payload["config"]
    check_fits(cfg, cohort, checkpoint)
    subjects = [cohort.subject(i) for i in subject_ids] if subject_ids else cohort.select(split)
    model = model_from_checkpoint(payload, checkpoint)
    items = load_preprocessed(subjects, _with_model_window(cohort, cfg), cfg.get("spacing"))
    rows = evaluate_subjects(model, items, cfg["patch_size"], cfg["num_classes"], with_hd95, on_subject)
    return {"checkpoint": str(checkpoint), "split": split, "classes": cohort.classes, "subjects": rows,
            "summary": summarise(rows)}


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def predict_subject(checkpoint: str | os.PathLike, cohort, subject_id: str, out_path: str | os.PathLike) -> Path:
    """Segment one subject and write the label map in its original space: NIfTI with the image's
    affine and header for a 3D cohort, a PNG mask of the image's size for a 2D one."""
    name = str(out_path).lower()
    if cohort.spatial_dims == 2 and name.endswith(NIFTI_SUFFIXES):
        raise ConfigError(f"--out {out_path}: a 2D cohort's prediction is a PNG mask; give a .png path")
    if cohort.spatial_dims == 3 and name.endswith(".png"):
        raise ConfigError(f"--out {out_path}: a 3D prediction is a NIfTI label map; give a .nii.gz path")
    payload = load_checkpoint(checkpoint)
    cfg = payload["config"]
    check_fits(cfg, cohort, checkpoint)
    model = model_from_checkpoint(payload, checkpoint)
    data = load_subject(cohort.subject(subject_id), _with_model_window(cohort, cfg))
    item = preprocess(data, cfg.get("spacing"))
    probs = predict_probs(model, item["image"], cfg["patch_size"])
    if cohort.spatial_dims == 2:
        return write_mask_2d(probs, data.source, out_path, cohort.info.get("label_map"))
    return write_prediction(item, probs, data.source, out_path)


def predict_subject_to_nifti(checkpoint: str | os.PathLike, cohort, subject_id: str,
                             out_path: str | os.PathLike) -> Path:
    """Segment one subject of a 3D cohort and write the label map in the subject's original image space."""
    if cohort.spatial_dims != 3:
        raise ConfigError("a NIfTI prediction needs a 3D cohort; predict_subject writes a 2D one as PNG")
    return predict_subject(checkpoint, cohort, subject_id, out_path)


def _with_model_window(cohort, cfg: dict):
    """The cohort with the CT window the model trained with (``extra.ct_window``), unless the cohort
    already names one: intensities must be scaled as they were at training."""
    recorded = (cfg.get("extra") or {}).get("ct_window") if isinstance(cfg.get("extra"), dict) else None
    if recorded is None or cohort.info.get("ct_window") is not None:
        return cohort
    return replace(cohort, info={**cohort.info, "ct_window": list(recorded)})
