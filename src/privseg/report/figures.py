"""Figures for reports (matplotlib, Agg backend): one function per figure, each returns a Figure.

Colours are consistent across every figure: a class always has the same colour
(:func:`class_colour`), a site always has the same colour (:func:`site_colour`, by the
site's position in the sorted list of the run's sites), a model variant (original,
unlearned, retrain) always has the same colour (:data:`MODEL_COLOURS`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# Class 1.. colours (background is transparent); a colour-blind-friendly qualitative set.
CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324"]
SITE_COLOURS = list(plt.get_cmap("tab10").colors)
MODEL_COLOURS = {"original": "#4d4d4d", "unlearned": "#d62728", "retrain": "#1f77b4", "ground truth": "#2ca02c"}
GROUP_COLOURS = {"members": "#d62728", "non-members": "#1f77b4", "forgotten": "#ff7f0e", "retain": "#d62728",
                 "test": "#1f77b4", "forget": "#ff7f0e"}

plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.titlesize": 10, "axes.grid": False})


def class_colour(k: int) -> str:
    """Colour of foreground class ``k`` (1-based class index)."""
    return CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]


def site_colour(site: str, sites: Sequence[str]) -> tuple:
    ordered = sorted(sites)
    i = ordered.index(site) if site in ordered else len(ordered)
    return SITE_COLOURS[i % len(SITE_COLOURS)]


def label_cmap(num_classes: int) -> ListedColormap:
    return ListedColormap([(0, 0, 0, 0)] + [class_colour(k) for k in range(1, num_classes)])


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """Render ``fig`` as PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


# -- image slices -----------------------------------------------------------------------
def _focus(label: np.ndarray | None, shape: Sequence[int]) -> list[int]:
    """Slice indices through the foreground's centre of mass (the volume's centre without one)."""
    if label is not None and np.any(label > 0):
        return [int(round(c)) for c in np.argwhere(label > 0).mean(0)]
    return [s // 2 for s in shape]


def voxel_spacing(image) -> tuple[float, ...] | None:
    """Voxel sizes (mm) of a preprocessed image (a MetaTensor's affine), or None without one."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine, dtype=float)
    n = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:n, :n], axis=0))


def view_aspects(spacing: Sequence[float] | None, ndim: int) -> list[float]:
    """Pixel height/width of each view of :func:`views`, so a 3 mm slice is drawn 3 times as tall
    as a 1 mm pixel (without it coronal and sagittal views of thick slices are flattened strips)."""
    if spacing is None or len(spacing) < ndim or not all(v > 0 for v in spacing[:ndim]):
        return [1.0] * (1 if ndim == 2 else 3)
    if ndim == 2:
        sx, sy = spacing[:2]
        return [sy / sx]
    sx, sy, sz = spacing[:3]
    return [sy / sx, sz / sx, sz / sy]


def views(volume: np.ndarray, centre: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """(name, 2D slice) for axial, coronal, sagittal of a RAS volume (x, y, z); one 'image'
    view for 2D. Slices are transposed so the first shown axis is horizontal."""
    if volume.ndim == 2:
        return [("image", volume.T)]
    x, y, z = centre
    return [("axial", volume[:, :, z].T), ("coronal", volume[:, y, :].T), ("sagittal", volume[x, :, :].T)]


def _show(ax, image2d: np.ndarray, label2d: np.ndarray | None, num_classes: int, title: str,
          contour: np.ndarray | None = None, aspect: float = 1.0) -> None:
    lo, hi = np.percentile(image2d, [1, 99]) if image2d.size else (0, 1)
    ax.imshow(image2d, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect)
    if label2d is not None:
        ax.imshow(np.ma.masked_equal(label2d, 0), cmap=label_cmap(num_classes), origin="lower", alpha=0.45,
                  vmin=0, vmax=num_classes - 1, interpolation="nearest", aspect=aspect)
    if contour is not None:
        for k in range(1, num_classes):
            if np.any(contour == k) and not np.all(contour == k):
                ax.contour((contour == k).astype(float), levels=[0.5], colors=[class_colour(k)], linewidths=0.8,
                           origin="lower")
    ax.set_aspect(aspect)  # contour resets nothing, but keep the voxel aspect explicit for every panel
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _class_legend(fig: Figure, classes: Sequence[str], extra: Sequence[Patch] = ()) -> None:
    handles = [Patch(color=class_colour(k), label=c) for k, c in enumerate(classes) if k > 0] + list(extra)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, -0.02))


def cohort_examples(examples: Sequence[dict], classes: Sequence[str]) -> Figure:
    """One axial slice per site: ``examples`` = [{"site", "id", "image", "label"}] (3D or 2D arrays),
    each with an optional ``"spacing"`` (mm per voxel axis) for the pixel aspect."""
    n = len(examples)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.4), squeeze=False)
    for ax, ex in zip(axes[0], examples, strict=True):
        centre = _focus(ex.get("label"), ex["image"].shape)
        name, img = views(ex["image"], centre)[0]
        lab = views(ex["label"], centre)[0][1] if ex.get("label") is not None else None
        _show(ax, img, lab, len(classes), f"{ex['site']} · {ex['id']} ({name})",
              aspect=view_aspects(ex.get("spacing"), ex["image"].ndim)[0])
    _class_legend(fig, classes)
    fig.suptitle("One example per site: image with ground-truth labels")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def overlays(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, classes: Sequence[str],
             title: str, spacing: Sequence[float] | None = None) -> Figure:
    """Prediction vs ground truth in axial, coronal and sagittal views: top row ground truth,
    bottom row prediction (filled) with the ground truth as outline. ``spacing`` (mm per voxel
    axis, e.g. :func:`voxel_spacing` of the image) draws each view at its true proportions."""
    centre = _focus(label if label is not None else pred, image.shape)
    iv = views(image, centre)
    aspect = view_aspects(spacing, image.ndim)
    gv = views(label, centre) if label is not None else [(n, None) for n, _ in iv]
    pv = views(pred, centre)
    cols = len(iv)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.6), squeeze=False)
    for j in range(cols):
        _show(axes[0, j], iv[j][1], gv[j][1], len(classes), f"ground truth, {iv[j][0]}", aspect=aspect[j])
        _show(axes[1, j], iv[j][1], pv[j][1], len(classes), f"prediction, {iv[j][0]}", contour=gv[j][1],
              aspect=aspect[j])
    _class_legend(fig, classes, [Patch(facecolor="none", edgecolor="k", label="outline = ground truth")])
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def side_by_side(image: np.ndarray, label: np.ndarray | None, preds: Mapping[str, np.ndarray],
                 classes: Sequence[str], title: str, spacing: Sequence[float] | None = None) -> Figure:
    """A subject under several models (original / unlearned / retrain): one column per model,
    rows axial and coronal (one row for 2D), drawn at the voxel ``spacing``'s proportions."""
    centre = _focus(label, image.shape)
    iv = views(image, centre)[:2]
    aspect = view_aspects(spacing, image.ndim)
    panels = ([("ground truth", label)] if label is not None else []) + list(preds.items())
    fig, axes = plt.subplots(len(iv), len(panels), figsize=(3.0 * len(panels), 3.1 * len(iv)), squeeze=False)
    for j, (name, vol) in enumerate(panels):
        vv = views(vol, centre)
        gv = views(label, centre) if label is not None and name != "ground truth" else [(None, None)] * len(vv)
        for i in range(len(iv)):
            _show(axes[i, j], iv[i][1], vv[i][1], len(classes), f"{name}, {iv[i][0]}", contour=gv[i][1],
                  aspect=aspect[i])
    _class_legend(fig, classes)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


# -- curves ------------------------------------------------------------------------------
def _finish(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8)


def loss_curve(history: Sequence[dict], per_site: Mapping[str, Sequence[tuple[float, float]]] | None = None,
               xlabel: str = "training step") -> Figure:
    """Training loss: a central run's per-step loss (with a moving average), or per site per round."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if per_site:
        sites = list(per_site)
        for site, pts in per_site.items():
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, "o-", ms=3, color=site_colour(site, sites), label=site)
    else:
        x = np.array([h["step"] for h in history], float)
        y = np.array([h["loss"] for h in history], float)
        ax.plot(x, y, color="#999999", lw=0.8, label="per step")
        if len(y) >= 10:
            k = max(3, len(y) // 20)
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1:], smooth, color="#d62728", lw=1.6, label=f"moving average ({k} steps)")
    _finish(ax, xlabel, "loss (Dice + cross-entropy, unitless)", "Training loss")
    fig.tight_layout()
    return fig


def dice_per_round(per_site: Mapping[str, Sequence[tuple[float, float]]], overall: Sequence[tuple] = ()) -> Figure:
    """Mean foreground Dice of each site's evaluation subjects after every round."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    sites = list(per_site)
    for site, pts in per_site.items():
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, "o-", ms=3, color=site_colour(site, sites), label=site)
    if overall:
        x, y = zip(*overall, strict=True)
        ax.plot(x, y, "k--", lw=1.2, label="mean over sites")
    ax.set_ylim(0, 1)
    _finish(ax, "federated round", "mean Dice (0–1)", "Dice per site per round")
    fig.tight_layout()
    return fig


def metric_by_site(rows: Sequence[dict], classes: Sequence[str]) -> Figure:
    """Per-subject mean Dice (points) and per-class site means (bars), grouped by site."""
    sites = sorted({r["site"] for r in rows})
    ncls = len(classes) - 1
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 * len(sites) * max(ncls, 1) / 2 + 2), 3.4))
    width = 0.8 / max(ncls, 1)
    for si, site in enumerate(sites):
        rs = [r for r in rows if r["site"] == site]
        for c in range(ncls):
            vals = [r["dice"][c] for r in rs]
            ax.bar(si + (c - (ncls - 1) / 2) * width, np.mean(vals), width * 0.9, color=class_colour(c + 1),
                   label=classes[c + 1] if si == 0 else None, alpha=0.85)
        ax.scatter([si] * len(rs), [r["mean_dice"] for r in rs], color="k", s=12, zorder=3,
                   label="subject mean Dice" if si == 0 else None)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylim(0, 1)
    _finish(ax, "site", "Dice (0–1)", "Dice per site and class")
    fig.tight_layout()
    return fig


def epsilon_per_round(per_site: Mapping[str, Sequence[tuple[float, float]]], budgets: Mapping[str, float] = {},
                      delta: float | None = None) -> Figure:
    """Privacy spent (ε at the run's δ) per site after every round, with each site's budget."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    sites = list(per_site)
    for site, pts in per_site.items():
        x, y = zip(*pts, strict=True)
        col = site_colour(site, sites)
        ax.plot(x, y, "o-", ms=3, color=col, label=site)
        if site in budgets:
            ax.axhline(budgets[site], color=col, ls=":", lw=1, label=f"{site} budget")
    d = f" at δ = {delta:g}" if delta else ""
    _finish(ax, "round", f"ε spent{d}", "Privacy spent per site")
    fig.tight_layout()
    return fig


def dice_vs_epsilon(per_site: Mapping[str, Sequence[tuple[float, float]]], delta: float | None = None) -> Figure:
    """Utility against privacy: each site's evaluation Dice against the ε it had spent."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    sites = list(per_site)
    for site, pts in per_site.items():
        x, y = zip(*sorted(pts), strict=True)
        ax.plot(x, y, "o-", ms=3, color=site_colour(site, sites), label=site)
    ax.set_ylim(0, 1)
    d = f" (δ = {delta:g})" if delta else ""
    _finish(ax, f"ε spent{d}", "mean Dice (0–1)", "Dice vs ε")
    fig.tight_layout()
    return fig


def forgetting_curve(checks: Sequence[dict]) -> Figure:
    """Forget subjects' Dice and the membership AUC at each check of an unlearning run."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    x = [c["step"] for c in checks]
    ax.plot(x, [c.get("forget_dice") for c in checks], "o-", color=GROUP_COLOURS["forget"], label="forget Dice")
    if any("unseen_dice_mean" in c for c in checks):
        ax.plot(x, [c.get("unseen_dice_mean") for c in checks], "s-", color=GROUP_COLOURS["test"],
                label="unseen Dice (mean)")
    if any("auc_loss" in c for c in checks):
        ax.plot(x, [c.get("auc_loss") for c in checks], "^--", color="#7f7f7f", label="membership AUC (loss)")
    ax.axhline(0.5, color="#bbbbbb", lw=0.8)
    ax.set_ylim(0, 1.02)
    _finish(ax, "unlearning step", "Dice / AUC (0–1)", "Forgetting curve")
    fig.tight_layout()
    return fig


def study_bars(models: Mapping[str, Mapping]) -> Figure:
    """Retain / forget / test Dice for each model variant (the study's table as bars)."""
    groups = ["retain", "forget", "test"]
    names = list(models)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [models[name].get(g, {}).get("dice", np.nan) for g in groups]
        ax.bar(np.arange(3) + (i - (len(names) - 1) / 2) * width, vals, width * 0.9,
               color=MODEL_COLOURS.get(name, "#8c564b"), label=name)
    ax.set_xticks(range(3), [f"{g} subjects" for g in groups])
    ax.set_ylim(0, 1)
    _finish(ax, "subject group", "mean Dice (0–1)", "Dice by subject group and model")
    fig.tight_layout()
    return fig


def mia_distributions(scores: Mapping[str, Mapping[str, Sequence[float]]], xlabel: str) -> Figure:
    """Per-subject membership statistic for members, non-members and forgotten subjects,
    one panel per model variant."""
    names = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False, sharey=True)
    allv = [v for s in scores.values() for g in s.values() for v in g]
    lo, hi = (min(allv), max(allv)) if allv else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    for ax, name in zip(axes[0], names, strict=True):
        for k, (group, vals) in enumerate(scores[name].items()):
            if not len(vals):
                continue
            y = np.full(len(vals), k) + np.linspace(-0.15, 0.15, len(vals))
            ax.scatter(vals, y, color=GROUP_COLOURS.get(group, "k"), s=22, label=f"{group} (n={len(vals)})")
            ax.vlines(np.mean(vals), k - 0.3, k + 0.3, color=GROUP_COLOURS.get(group, "k"), lw=2)
        ax.set_yticks(range(len(scores[name])), list(scores[name]))
        ax.set_xlim(lo - pad, hi + pad)
        _finish(ax, xlabel, "", name, legend=False)
    fig.suptitle("Membership statistic per subject (bar = group mean)")
    fig.tight_layout()
    return fig


def blank_check(png: bytes) -> float:
    """Pixel standard deviation of a PNG (0 means blank); used by tests."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float).std())
