"""Per-subject clipped gradient sums: one registry of methods with one signature.

A method is ``(model, loss_fn, images, labels, owner, clip) -> (per-parameter clipped sums,
per-subject norms, mean loss)``, where ``owner[i]`` is the subject (patient) of patch ``i``:

* ``loop`` (default): one forward/backward per subject over that subject's patches (a micro-
  batch of ``patches_per_subject`` >= 2 keeps oneDNN's fast Conv3d path on CPU); the clipped
  gradient is accumulated in place. Same arithmetic as a normal step.
* ``vmap``: ``torch.func.vmap(grad(...))`` over subjects (one batched call).
* ``opacus``: Opacus ``GradSampleModule`` per-patch gradients, summed per subject.

Clipping per subject (Abadi et al., CCS 2016): ``g_u <- g_u * min(1, C / ||g_u||)``, so one
patient moves the sum by at most ``C``. ``benchmarks/privacy.py`` times all three.
A new method is one function decorated with :func:`per_subject`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from privseg.privacy.clipping import clip_factors
from privseg.utils import registrar

GradMethod = Callable[..., tuple[list[torch.Tensor], torch.Tensor, float]]
GRAD_METHODS: dict[str, GradMethod] = {}


def per_subject(name: str) -> Callable[[GradMethod], GradMethod]:
    return registrar(GRAD_METHODS, name)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _groups(owner: torch.Tensor) -> list[torch.Tensor]:
    owner = owner.cpu()
    return [torch.nonzero(owner == u).flatten() for u in torch.unique(owner, sorted=True)]


@per_subject("loop")
def clipped_sum_loop(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                     clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Sum over subjects of per-subject clipped gradients; one backward per subject over its patches.

    Returns (per-parameter sums, per-subject norms, mean loss)."""
    params = _params(model)
    acc = [torch.zeros_like(p) for p in params]
    norms, losses = [], []
    for idx in _groups(owner):
        idx = idx.to(images.device)
        loss = loss_fn.per_sample(model(images[idx]), labels[idx]).mean()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads))
        factor = float(clip_factors(norm, clip))
        for a, g in zip(acc, grads, strict=True):
            a.add_(g, alpha=factor)
        norms.append(float(norm))
        losses.append(float(loss.detach()))
    return acc, torch.tensor(norms, dtype=torch.float64), float(np.mean(losses)) if losses else float("nan")


@per_subject("vmap")
def clipped_sum_vmap(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                     clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """As :func:`clipped_sum_loop`, with ``torch.func.vmap`` over subjects (equal patch counts needed)."""
    from torch.func import functional_call, grad_and_value, vmap

    groups = _groups(owner)
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        return clipped_sum_loop(model, loss_fn, images, labels, owner, clip)
    order = torch.cat(groups).to(images.device)
    k, p = len(groups), sizes.pop()
    x = images[order].reshape(k, p, *images.shape[1:])
    y = labels[order].reshape(k, p, *labels.shape[1:])
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    params = {n: q.detach() for n, q in model.named_parameters() if q.requires_grad}
    buffers = dict(model.named_buffers())

    ncls = None

    def subject_loss(prm, xs, ys_onehot):
        out = functional_call(model, (prm, buffers), (xs,))
        return loss_fn.per_sample_onehot(out, ys_onehot).mean()

    with torch.no_grad():
        ncls = model(images[:1]).shape[1]
    y1 = torch.nn.functional.one_hot(y[:, :, 0].long(), ncls).movedim(-1, 2).to(images.dtype)  # (k, p, C, *sp)
    grads, losses = vmap(grad_and_value(subject_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y1)
    flat = [grads[n].reshape(k, -1) for n in names]
    norms = torch.sqrt(sum((f.double() ** 2).sum(1) for f in flat))
    factors = clip_factors(norms, clip).to(images.dtype)
    acc = [torch.einsum("k,k...->...", factors, grads[n]) for n in names]
    return acc, norms.detach().cpu(), float(losses.mean())


class _OpacusHelper:
    """Per-patch gradients via Opacus's GradSampleModule hooks (kept attached to one model)."""

    def __init__(self, model: nn.Module):
        from opacus import GradSampleModule

        self.model = model
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=False)

    def __call__(self, model, loss_fn, images, labels, owner, clip):
        params = _params(model)
        for prm in params:
            prm.grad_sample = None
        groups = _groups(owner)
        per_patch = loss_fn.per_sample(self.gsm(images), labels)
        # each patch's loss weighted by 1/(its subject's patch count): the subject loss is the mean
        counts = torch.bincount(owner.cpu()).to(per_patch.device).to(per_patch.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs require gradients"
            (per_patch / counts[owner.to(per_patch.device)]).sum().backward()
        uniq = torch.unique(owner.cpu(), sorted=True)
        remap = torch.full((int(owner.max()) + 1,), -1, dtype=torch.long)
        remap[uniq] = torch.arange(len(uniq))
        inv = remap[owner.cpu()].to(images.device)
        per_subject = []
        for prm in params:
            gs = prm.grad_sample
            s = torch.zeros((len(uniq), *prm.shape), dtype=gs.dtype, device=gs.device)
            s.index_add_(0, inv, gs)
            per_subject.append(s)
            prm.grad_sample = None
            prm.grad = None
        norms = torch.sqrt(sum((s.reshape(len(uniq), -1).double() ** 2).sum(1) for s in per_subject))
        factors = clip_factors(norms, clip).to(images.dtype)
        acc = [torch.einsum("k,k...->...", factors, s) for s in per_subject]
        losses = [float(per_patch.detach()[g.to(per_patch.device)].mean()) for g in groups]
        return acc, norms.detach().cpu(), float(np.mean(losses))


_OPACUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@per_subject("opacus")
def clipped_sum_opacus(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                       clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """As :func:`clipped_sum_loop`, from Opacus's per-patch gradients summed per subject (the
    GradSampleModule is attached once per model)."""
    helper = _OPACUS.get(model)
    if helper is None:
        helper = _OPACUS[model] = _OpacusHelper(model)
    return helper(model, loss_fn, images, labels, owner, clip)

