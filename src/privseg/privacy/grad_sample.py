"""Per-subject clipped gradient sums: one registry of methods with one signature.

A method is ``(model, loss_fn, images, labels, owner, clip) -> (per-parameter clipped sums,
per-subject norms, mean loss)``, where ``owner[i]`` is the subject (patient) of patch ``i``:

* ``loop`` (default): one forward/backward per subject over that subject's patches (a micro-
  batch of ``patches_per_subject`` >= 2 keeps oneDNN's fast Conv3d path on CPU); the clipped
  gradient is accumulated in place. Same arithmetic as a normal step.
* ``vmap``: ``torch.func.vmap(grad(...))`` over subjects (one batched call).
* ``opacus``: Opacus ``GradSampleModule`` per-patch gradients, summed per subject.
* ``bk``: one batched forward and input-gradient backward; each layer's per-subject weight
  gradient from its stored input and output gradient (book-keeping, Bu et al. 2023).

Clipping per subject (Abadi et al., CCS 2016): ``g_u <- g_u * min(1, C / ||g_u||)``, so one
patient moves the sum by at most ``C``; ``clip`` may instead be a
:class:`~privseg.privacy.clipping.Normalising` (``g_u <- C g_u / (||g_u|| + gamma)``, Bu et al.
2023), same bound. ``g_u`` is the gradient of the subject's mean loss over its patches, i.e. the
mean of its patches' gradients: with ``K`` augmented patches per patient this is augmentation
multiplicity (De et al. 2022), clipped once. ``benchmarks/privacy.py`` times the methods.
A new method is one function decorated with :func:`per_subject`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from privseg.errors import ConfigError
from privseg.privacy.clipping import clip_factors
from privseg.utils import registrar

GradMethod = Callable[..., tuple[list[torch.Tensor], torch.Tensor, float]]
GRAD_METHODS: dict[str, GradMethod] = {}


def per_subject(name: str) -> Callable[[GradMethod], GradMethod]:
    return registrar(GRAD_METHODS, name, kind="per-subject gradient method")


def dp_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DP-SGD clips and noises: those that require a gradient (a frozen one,
    ``--trainable``, gets neither gradient, nor clipping, nor noise)."""
    return [p for p in model.parameters() if p.requires_grad]


# Norms are summed in float32 (one pass, no float64 copy of the gradient); the factor divides by a
# norm made larger by this relative slack, more than float32 summation and the float32 product
# g * factor can err by, so a clipped subject's gradient never exceeds C.
NORM_SLACK = 1e-5


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm over a list of tensors (float64 scalar; per-tensor norms in their own dtype)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))).double())


def _groups(owner: torch.Tensor) -> list[torch.Tensor]:
    owner = owner.cpu()
    return [torch.nonzero(owner == u).flatten() for u in torch.unique(owner, sorted=True)]


def _clipped_sum_serial(model, loss_fn, images, labels, groups, clip, params):
    """One forward/backward per subject of ``groups``, in order: (clipped sum or None, norms, losses)."""
    acc = None
    norms, losses = [], []
    for idx in groups:
        loss = loss_fn.per_sample(model(images[idx]), labels[idx]).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        norm = global_norm(grads)
        factor = float(clip_factors(norm * (1 + NORM_SLACK), clip))
        if acc is None:
            acc = list(torch._foreach_mul(grads, factor))
        else:
            torch._foreach_add_(acc, grads, alpha=factor)
        norms.append(float(norm))
        losses.append(float(loss.detach()))
    return acc, norms, losses


_SUBJECT_POOL: list[ThreadPoolExecutor] = []


def _single_threaded(fn):
    def run(*args):
        torch.set_num_threads(1)  # this worker's ops on one core; the workers share the cores
        return fn(*args)
    return run


@per_subject("loop")
def clipped_sum_loop(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                     clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Sum over subjects of per-subject clipped gradients; one backward per subject over its patches.

    On a CPU with several torch threads, the subjects are split into contiguous chunks worked on
    side by side, one thread each: a subject's few patches keep one core busy better than they
    keep several (ResNet-10 at 32^3, 2 subjects: 1.09x a non-private step instead of 1.84x).
    Each chunk sums in subject order and the chunks are added in order, so a step is repeatable.

    Returns (per-parameter sums, per-subject norms, mean loss)."""
    params = dp_params(model)
    groups = [g.to(images.device) for g in _groups(owner)]
    threads = torch.get_num_threads()
    workers = min(len(groups), threads) if images.device.type == "cpu" else 1
    if workers < 2:
        parts = [_clipped_sum_serial(model, loss_fn, images, labels, groups, clip, params)]
    else:
        bounds = np.linspace(0, len(groups), workers + 1).round().astype(int)
        chunks = [groups[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if not _SUBJECT_POOL or _SUBJECT_POOL[0]._max_workers < workers:
            _SUBJECT_POOL[:] = [ThreadPoolExecutor(max_workers=workers, thread_name_prefix="privseg-subject")]
        work = _single_threaded(lambda chunk: _clipped_sum_serial(model, loss_fn, images, labels, chunk, clip,
                                                                  params))
        try:
            parts = list(_SUBJECT_POOL[0].map(work, chunks))
        finally:
            torch.set_num_threads(threads)
    acc, norms, losses = None, [], []
    for part_acc, part_norms, part_losses in parts:
        if part_acc is not None and acc is None:
            acc = part_acc
        elif part_acc is not None:
            torch._foreach_add_(acc, part_acc)
        norms += part_norms
        losses += part_losses
    if acc is None:
        acc = [torch.zeros_like(p) for p in params]
    return acc, torch.tensor(norms, dtype=torch.float64), float(np.mean(losses)) if losses else float("nan")


@per_subject("vmap")
def clipped_sum_vmap(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                     clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """As :func:`clipped_sum_loop`, with ``torch.func.vmap`` over subjects (equal patch counts needed)."""
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
    factors = clip_factors(norms * (1 + NORM_SLACK), clip).to(images.dtype)
    acc = [torch.einsum("k,k...->...", factors, grads[n]) for n in names]
    return acc, norms.detach().cpu(), float(losses.mean())


class _OpacusHelper:
    """Per-patch gradients via Opacus's GradSampleModule hooks (kept attached to one model)."""

    def __init__(self, model: nn.Module):
        from opacus import GradSampleModule  # why: seconds to import, and only method "opacus" uses it

        self.model = model
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=False)

    def __call__(self, model, loss_fn, images, labels, owner, clip):
        params = dp_params(model)
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
        factors = clip_factors(norms * (1 + NORM_SLACK), clip).to(images.dtype)
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



# -- book-keeping: one batched pass, per-subject weight gradients from stored activations -------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _owns_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _subject_grads(module: nn.Module, params: list[nn.Parameter], a: torch.Tensor, go: torch.Tensor,
                   groups: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``[subject][param]`` gradients of one layer call from its input ``a`` and output gradient ``go``.

    A convolution's weight gradient is the weight half of its backward on the subject's slice (no
    recomputed forward); any other layer (norm affine, PReLU, linear, transposed conv) re-runs its own
    forward on the slice and differentiates that -- exact for every layer that keeps samples apart."""
    out = []
    fast = (isinstance(module, _CONV) and module.padding_mode == "zeros" and not isinstance(module.padding, str))
    for idx in groups:
        a_u, go_u = a[idx], go[idx]
        if fast:
            bias = module.bias is not None and module.bias.requires_grad
            _, gw, gb = torch.ops.aten.convolution_backward(
                go_u, a_u, module.weight, [module.out_channels] if bias else None, list(module.stride),
                list(module.padding), list(module.dilation), False, [0] * len(module.stride), module.groups,
                [False, module.weight.requires_grad, bias])
            grads = {id(module.weight): gw, id(module.bias): gb}
            out.append([grads[id(p)] for p in params])
        else:
            with torch.enable_grad():
                out.append(list(torch.autograd.grad(module(a_u.detach()), params, go_u)))
    return out


@per_subject("bk")
def clipped_sum_bk(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor,
                   clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """As :func:`clipped_sum_loop`, from one forward and one input-gradient backward over the whole
    batch, then each layer's per-subject weight gradients from its stored input and output gradient
    ("book-keeping", Bu et al., "Differentially Private Optimization on Large Model at Small Cost",
    ICML 2023; per-sample weight gradients as in Goodfellow 2015 and Opacus, here summed per subject).
    The batched backward skips every weight gradient, so the cost is about one normal step plus the
    per-subject weight halves. Needs layers that keep samples apart (the engine refuses BatchNorm);
    a layer called several times per forward is summed over its calls."""
    params = dp_params(model)
    groups = [g.to(images.device) for g in _groups(owner)]
    calls: list[tuple[nn.Module, list[nn.Parameter], torch.Tensor, list, torch.Tensor]] = []
    replaying = [False]

    def capture(module, args, output):
        own = _owns_params(module)
        if replaying[0] or not own or not torch.is_tensor(output) or len(args) != 1 or not torch.is_tensor(args[0]):
            if own and not replaying[0]:
                raise ConfigError(f"per-subject method 'bk' cannot follow layer {type(module).__name__} (its "
                                  "parameters see more than one tensor input): use method 'loop'")
            return
        record = (module, own, args[0].detach(), [], output)
        if output.requires_grad:
            output.register_hook(lambda g, rec=record: rec[3].append(g.detach()))
        calls.append(record)

    handles = [m.register_forward_hook(capture) for m in model.modules() if _owns_params(m)]
    try:
        per_patch = loss_fn.per_sample(model(images), labels)
        counts = torch.bincount(owner.cpu()).to(per_patch.device).to(per_patch.dtype)
        # each patch weighted by 1/(its subject's patch count): a subject's loss is the mean of its patches.
        # Asking only for the layers' outputs skips every weight gradient and the input's gradient.
        outputs = [rec[4] for rec in calls if rec[4].requires_grad]
        if outputs:
            torch.autograd.grad((per_patch / counts[owner.to(per_patch.device)]).sum(), outputs, allow_unused=True)
        replaying[0] = True
        index = {id(p): i for i, p in enumerate(params)}
        per_subject_grads: list[list[torch.Tensor | None]] = [[None] * len(params) for _ in groups]
        for module, own, a, go, _ in calls:
            if not go:  # the output did not reach the loss: zero gradient
                continue
            for u, grads in enumerate(_subject_grads(module, own, a, go[0], groups)):
                for p, g in zip(own, grads, strict=True):
                    slot = per_subject_grads[u]
                    i = index[id(p)]
                    slot[i] = g if slot[i] is None else slot[i].add_(g)  # g is fresh: no zero-filled buffers
    finally:
        for h in handles:
            h.remove()
    per_subject_grads = [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]
                         for gs in per_subject_grads]
    norms = torch.stack([global_norm(gs) for gs in per_subject_grads])
    factors = clip_factors(norms * (1 + NORM_SLACK), clip).tolist()
    acc = list(torch._foreach_mul(per_subject_grads[0], factors[0]))
    for gs, factor in zip(per_subject_grads[1:], factors[1:], strict=True):
        torch._foreach_add_(acc, gs, alpha=factor)
    losses = [float(per_patch.detach()[g].mean()) for g in groups]
    return acc, norms, float(np.mean(losses)) if losses else float("nan")
