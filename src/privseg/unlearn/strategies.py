"""Unlearning strategies: one registry, one signature.

Every strategy is ``strategy(model, ctx, params) -> model``: it receives the trained
model (already on the device, with the decoder frozen when ``fix_decoder`` is on),
an :class:`UnlearnContext` with the retain/forget subjects, the step budget and the
``should_stop`` callback of the ``unseen`` target, and its hyper-parameters (the
registry's defaults merged with the caller's overrides; the engine records them).

Epoch (patch-based training has no natural one): one epoch is the number of steps
needed to draw every forget subject once, ``ceil(n_forget / subjects_per_step)``,
each step drawing ``subjects_per_step`` subjects × ``patches_per_subject`` patches
(the original training's batch). Strategies that train on retain subjects only
(``retain_label``, ``random_encoder``) get the same number of steps, so every
strategy has the same step budget. Strategies that interleave retain subjects add
a retain batch of the same size to every step.

All loops go through :func:`privseg.train.loop.train_steps` with a strategy-specific
``step_fn``; the budget is run in chunks of ``ctx.check_every`` steps with
``ctx.should_stop`` called between chunks (and once before the first step).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import ResizeWithPadOrCrop
from scipy.ndimage import gaussian_filter

from privseg.data.transforms import PatchSampler
from privseg.errors import ConfigError
from privseg.models import encoder_decoder_modules, reinit_encoder
from privseg.train.loop import TrainConfig, make_optimizer, standard_step, train_steps
from privseg.train.losses import SegLoss
from privseg.utils import parse_params, registrar  # noqa: F401  (KEY=VALUE strategy parameters; public here too)


# -- encoder / decoder -----------------------------------------------------------
def _decoder_module_list(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder modules as the model registry defines them (after MedicalNet's
    ``conv_seg``; the U-Net's up path and final convolution)."""
    return encoder_decoder_modules(model)[1]


def decoder_state_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers, e.g. BatchNorm statistics) of the decoder."""
    ids = {id(m) for d in _decoder_module_list(model) for m in d.modules()}
    keys = set()
    for name, mod in model.named_modules():
        if id(mod) in ids:
            for n, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                keys.add(f"{name}.{n}" if name else n)
    return keys


def decoder_parameter_names(model: torch.nn.Module) -> set[str]:
    params = {n for n, _ in model.named_parameters()}
    return decoder_state_keys(model) & params


def decoder_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for d in _decoder_module_list(model) for m in d.modules()]


# -- context ---------------------------------------------------------------------
class RecordingSampler(PatchSampler):
    """A :class:`PatchSampler` that records which subjects it drew patches from."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: list[str] = []
        self.last: list[str] = []  # the latest draw's subjects: a patch's ``owner`` indexes this list

    def sample(self, items, seed=None):
        self.last = [str(it.get("id")) for it in items]
        self.seen.extend(self.last)
        return super().sample(items, seed=seed)


@dataclass
class UnlearnContext:
    """What a strategy may use. ``should_stop(step, model)`` is the ``unseen`` target's
    test (always False for the ``zero`` target)."""

    config: TrainConfig
    retain_items: list[dict]
    forget_items: list[dict]
    steps: int
    steps_per_epoch: int
    seed: int = 0
    check_every: int = 2
    should_stop: Callable[[int, torch.nn.Module], bool] = lambda step, model: False
    on_step: Callable[[int, float], None] | None = None
    decoder_names: set[str] = field(default_factory=set)
    fix_decoder: bool = False
    device: torch.device = torch.device("cpu")
    loss_fn: SegLoss = field(default_factory=SegLoss)
    sampler: RecordingSampler | None = None
    references: object | None = None  # the run's ReferenceSet, for strategies registered with references=True
    steps_run: int = 0
    stopped_early: bool = False
    log: dict = field(default_factory=dict)
    _retain_draws: int = 0

    def __post_init__(self) -> None:
        if self.sampler is None:
            self.sampler = RecordingSampler(self.config.patch_size, self.config.patches_per_subject, self.seed)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def prepare(self, model: torch.nn.Module) -> None:
        """Keep the frozen decoder's normalisation statistics fixed (eval mode)."""
        if self.fix_decoder:
            for mod in decoder_modules(model):
                mod.eval()

    def retain_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of retain patches the size of a training batch, deterministic by seed."""
        rng = np.random.default_rng((self.seed, 7919, self._retain_draws))
        self._retain_draws += 1
        k = min(self.config.subjects_per_step, len(self.retain_items))
        chosen = [self.retain_items[i] for i in rng.choice(len(self.retain_items), size=k, replace=False)]
        images, labels, _ = self.sampler.sample(chosen, seed=int(rng.integers(2**31)))
        return images.to(self.device), labels.to(self.device)

    def random_labels(self, labels: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.seed * 1_000_003 + self._retain_draws + 17))
        return torch.randint(0, self.num_classes, labels.shape, generator=g).to(labels.device)


def run_loop(model: torch.nn.Module, ctx: UnlearnContext, items: Sequence[dict], step_fn, *, lr: float,
             steps: int | None = None, check: bool = True, config: TrainConfig | None = None) -> torch.nn.Module:
    """Run ``steps`` (default ``ctx.steps``) steps of ``train_steps`` over ``items`` in
    chunks of ``ctx.check_every``, stopping when ``ctx.should_stop`` says so."""
    steps = ctx.steps if steps is None else steps
    cfg = config or replace(ctx.config, seed=ctx.seed, lr=lr, steps=max(steps, 1))
    optimizer = make_optimizer(model, cfg)

    def wrapped(model, optimizer, loss_fn, images, labels, owner):
        ctx.prepare(model)
        return step_fn(model, optimizer, loss_fn, images, labels, owner)

    step = 0
    if check and ctx.should_stop(0, model):
        ctx.steps_run, ctx.stopped_early = 0, True
        return model
    while step < steps:
        stop = min(steps, step + ctx.check_every)
        train_steps(model, optimizer, items, cfg, start=step, stop=stop, step_fn=wrapped, loss_fn=ctx.loss_fn,
                    sampler=ctx.sampler, on_step=ctx.on_step)
        step = stop
        if check and step < steps and ctx.should_stop(step, model):
            ctx.stopped_early = True
            break
    ctx.steps_run = step
    if check and not ctx.stopped_early:
        ctx.stopped_early = bool(ctx.should_stop(step, model))  # records the final check
    return model


def _lr(ctx: UnlearnContext, params: dict) -> float:
    return float(params["lr"]) if params.get("lr") is not None else ctx.config.lr * float(params.get("lr_scale", 1.0))


def _with_retain(ctx: UnlearnContext, weight: float, forget_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A step on forget patches (``forget_loss(logits, labels)``) plus, when ``weight`` > 0,
    ``weight`` × the task loss on a retain batch, in one forward pass."""

    def step(model, optimizer, loss_fn, images, labels, owner):
        optimizer.zero_grad(set_to_none=True)
        if weight > 0:
            ri, rl = ctx.retain_batch()
            logits = model(torch.cat([images, ri]))
            n = images.shape[0]
            loss = forget_loss(logits[:n], labels) + weight * loss_fn(logits[n:], rl)
        else:
            loss = forget_loss(model(images), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


# -- registry --------------------------------------------------------------------
StrategyFn = Callable[[torch.nn.Module, UnlearnContext, dict], torch.nn.Module]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: StrategyFn
    defaults: dict
    summary: str
    needs_references: bool = False  # reads the run's reference models (``ctx.references``)

    def __call__(self, model: torch.nn.Module, ctx: UnlearnContext, params: dict | None = None) -> torch.nn.Module:
        return self.fn(model, ctx, self.resolve(params))

    def resolve(self, params: dict | None) -> dict:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"--param: strategy {self.name} has no parameter(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(self.defaults)) or 'none'})")
        return {**self.defaults, **params}


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, references: bool = False, **defaults) -> Callable[[StrategyFn], StrategyFn]:
    """Register ``fn`` under ``name`` with its parameters' defaults; ``references``: it needs the
    run's reference models (:mod:`privseg.audit.reference`), which the engine then loads."""

    return registrar(STRATEGIES, name, kind="unlearning strategy",
                     entry=lambda fn: Strategy(name, fn, dict(defaults), (fn.__doc__ or "").strip().splitlines()[0],
                                               references))


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"--strategy {name!r} is unknown (choose from {', '.join(STRATEGIES)})") from None


# -- the study's strategies ------------------------------------------------------
@register("noisy_label", lr=None, lr_scale=1.0, retain_weight=1.0)
def noisy_label(model, ctx: UnlearnContext, params: dict):
    """Forget subjects with uniformly random voxel labels, interleaved with retain subjects with true labels."""
    fl = _with_retain(ctx, float(params["retain_weight"]),
                      lambda logits, labels: ctx.loss_fn(logits, ctx.random_labels(labels)))
    return run_loop(model, ctx, ctx.forget_items, fl, lr=_lr(ctx, params))


@register("retain_label", lr=None, lr_scale=1.0)
def retain_label(model, ctx: UnlearnContext, params: dict):
    """Fine-tune on the retain subjects only (same step budget)."""
    return run_loop(model, ctx, ctx.retain_items, standard_step, lr=_lr(ctx, params))


def _ascent(ctx: UnlearnContext, params: dict):
    bound = float(params["bound"])
    fw = float(params.get("forget_weight", 1.0))
    # Bounded ascent: once the forget loss exceeds ``bound`` its gradient is cut (clamp).
    return _with_retain(ctx, float(params["retain_weight"]),
                        lambda logits, labels: -fw * torch.clamp(ctx.loss_fn(logits, labels), max=bound))


@register("max_loss", lr=None, lr_scale=0.5, bound=3.0, retain_weight=0.0)
def max_loss(model, ctx: UnlearnContext, params: dict):
    """Gradient ascent on the forget subjects' loss, bounded (no gradient once the loss exceeds `bound`)."""
    return run_loop(model, ctx, ctx.forget_items, _ascent(ctx, params), lr=_lr(ctx, params))


@register("random_encoder", lr=None, lr_scale=1.0)
def random_encoder(model, ctx: UnlearnContext, params: dict):
    """Re-initialise the encoder, keep the decoder, train on the retain subjects."""
    torch.manual_seed(ctx.seed + 7)
    reinit_encoder(model)
    ctx.log["reinitialised_tensors"] = len(set(model.state_dict()) - decoder_state_keys(model))
    return run_loop(model, ctx, ctx.retain_items, standard_step, lr=_lr(ctx, params))


def _swap_items(ctx: UnlearnContext, make_label: Callable[[dict, np.random.Generator], torch.Tensor]) -> list[dict]:
    rng = np.random.default_rng((ctx.seed, 4242))
    return [{"image": it["image"], "label": make_label(it, rng), "id": it["id"], "site": it.get("site")}
            for it in ctx.forget_items]


@register("learn_others", lr=None, lr_scale=1.0, retain_weight=0.0)
def learn_others(model, ctx: UnlearnContext, params: dict):
    """Train the forget images toward other (retain) subjects' label maps (padded/cropped to fit)."""
    def other(it, rng):
        donor = ctx.retain_items[int(rng.integers(len(ctx.retain_items)))]
        shape = tuple(torch.as_tensor(it["image"]).shape[1:])
        return torch.as_tensor(ResizeWithPadOrCrop(shape)(torch.as_tensor(donor["label"]))).long()

    items = _swap_items(ctx, other)
    step = _with_retain(ctx, float(params["retain_weight"]), ctx.loss_fn)
    return run_loop(model, ctx, items, step, lr=_lr(ctx, params))


def smooth_blobs(shape: Sequence[int], num_classes: int, rng: np.random.Generator, sigma: float) -> torch.Tensor:
    """A random label map of smooth blobs: argmax over classes of Gaussian-smoothed noise."""
    fields = np.stack([gaussian_filter(rng.standard_normal(tuple(shape)), sigma) for _ in range(num_classes)])
    return torch.from_numpy(fields.argmax(0)[None].astype(np.int64))


@register("learn_noise", lr=None, lr_scale=1.0, retain_weight=0.0, blob_sigma=3.0)
def learn_noise(model, ctx: UnlearnContext, params: dict):
    """Train the forget images toward random smooth blob label maps."""
    sigma = float(params["blob_sigma"])
    items = _swap_items(ctx, lambda it, rng: smooth_blobs(torch.as_tensor(it["image"]).shape[1:],
                                                          ctx.num_classes, rng, sigma))
    step = _with_retain(ctx, float(params["retain_weight"]), ctx.loss_fn)
    return run_loop(model, ctx, items, step, lr=_lr(ctx, params))


# -- field baselines -------------------------------------------------------------
@register("neggrad_plus", lr=None, lr_scale=0.5, bound=3.0, retain_weight=1.0, forget_weight=1.0)
def neggrad_plus(model, ctx: UnlearnContext, params: dict):
    """NegGrad+: bounded ascent on forget plus descent on retain, in one step."""
    return run_loop(model, ctx, ctx.forget_items, _ascent(ctx, params), lr=_lr(ctx, params))


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over classes, mean over voxels and samples."""
    t = F.log_softmax(teacher_logits, dim=1)
    s = F.log_softmax(student_logits, dim=1)
    return (t.exp() * (t - s)).sum(1).mean()


@register("scrub", lr=None, lr_scale=1.0, alpha=1.0, beta=1.0, gamma=1.0, bound=3.0, max_fraction=0.5)
def scrub(model, ctx: UnlearnContext, params: dict):
    """SCRUB: student starts as the teacher (the original); maximise KL on forget (first `max_fraction` of the
    steps, bounded), minimise KL + task loss on retain."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    a, b, g, bound = (float(params[k]) for k in ("alpha", "beta", "gamma", "bound"))
    max_steps = int(math.ceil(float(params["max_fraction"]) * ctx.steps))
    count = {"n": 0}

    def step(model, optimizer, loss_fn, images, labels, owner):
        optimizer.zero_grad(set_to_none=True)
        ri, rl = ctx.retain_batch()
        x = torch.cat([images, ri])
        with torch.no_grad():
            teacher.train(model.training)
            t = teacher(x)
        s = model(x)
        n = images.shape[0]
        loss = a * _kl(t[n:], s[n:]) + g * loss_fn(s[n:], rl)
        if count["n"] < max_steps:
            loss = loss - b * torch.clamp(_kl(t[:n], s[:n]), max=bound)
        count["n"] += 1
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run_loop(model, ctx, ctx.forget_items, step, lr=_lr(ctx, params))


@register("salun", lr=None, lr_scale=1.0, fraction=0.5, saliency_batches=2, retain_weight=1.0)
def salun(model, ctx: UnlearnContext, params: dict):
    """SalUn: mask the top `fraction` of weights by forget-loss gradient magnitude, then random-label
    fine-tuning on forget + true labels on retain, updating only the masked weights."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sal = {n: torch.zeros_like(p) for n, p in trainable}
    model.train()
    ctx.prepare(model)
    for b in range(int(params["saliency_batches"])):
        rng = np.random.default_rng((ctx.seed, 31337, b))
        k = min(ctx.config.subjects_per_step, len(ctx.forget_items))
        chosen = [ctx.forget_items[i] for i in rng.choice(len(ctx.forget_items), size=k, replace=False)]
        images, labels, _ = ctx.sampler.sample(chosen, seed=int(rng.integers(2**31)))
        model.zero_grad(set_to_none=True)
        ctx.loss_fn(model(images.to(ctx.device)), labels.to(ctx.device)).backward()
        for n, p in trainable:
            if p.grad is not None:
                sal[n] += p.grad.detach().abs()
    model.zero_grad(set_to_none=True)
    flat = torch.cat([s.flatten() for s in sal.values()])
    kth = max(1, int(round((1 - float(params["fraction"])) * flat.numel())))
    threshold = flat.kthvalue(kth).values if kth < flat.numel() else flat.max()
    masks = {n: (s > threshold) if float(params["fraction"]) < 1 else torch.ones_like(s, dtype=torch.bool)
             for n, s in sal.items()}
    originals = {n: p.detach().clone() for n, p in trainable}
    ctx.log["masked_fraction"] = float(sum(int(m.sum()) for m in masks.values()) / max(flat.numel(), 1))
    inner = _with_retain(ctx, float(params["retain_weight"]),
                         lambda logits, labels: ctx.loss_fn(logits, ctx.random_labels(labels)))
    named = dict(trainable)

    def step(model, optimizer, loss_fn, images, labels, owner):
        loss = inner(model, optimizer, loss_fn, images, labels, owner)
        with torch.no_grad():  # only masked weights may move (weight decay included)
            for n, m in masks.items():
                p = named[n]
                p.copy_(torch.where(m, p, originals[n]))
        return loss

    # Unmasked weights also get no gradient, so the optimiser's moments stay at zero for them.
    hooks = [named[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
    try:
        return run_loop(model, ctx, ctx.forget_items, step, lr=_lr(ctx, params))
    finally:
        for h in hooks:
            h.remove()


@register("reference_teacher", references=True, lr=None, lr_scale=0.3, retain_weight=1.0, task_weight=1.0)
def reference_teacher(model, ctx: UnlearnContext, params: dict):
    """Distil each forget patient toward a reference model that never saw it, and the retain patients toward the
    original (plus their labels)."""
    # The forget target is what a model trained without the patient predicts for it: one of the run's
    # reference models that never saw it (Carlini et al. 2022, LiRA's OUT models), drawn per patient.
    # It is the "incompetent teacher" of Chundawat et al. 2023 (AAAI, "Can bad teaching induce
    # forgetting?") made competent-but-ignorant; the retain term is SCRUB's (Kurmanji et al. 2023) KL
    # to the original. One reference, not their mean: an ensemble segments better than any of its
    # members, so a model that copies the mean still reads as a member (docs/membership.md).
    # Pulling the patient to the never-saw-it level, not away from its labels, barely moves the model
    # elsewhere, so no repair rounds are needed (and repair rounds bring a memorised patient back).
    teachers = _never_saw(ctx)
    original = copy.deepcopy(model)
    for m in (original, *teachers.values()):
        for p in m.parameters():
            p.requires_grad_(False)
    rw, tw = float(params["retain_weight"]), float(params["task_weight"])
    with_retain = bool(ctx.retain_items) and (rw > 0 or tw > 0)  # a whole site forgotten has no retain patients

    def step(model, optimizer, loss_fn, images, labels, owner):
        ids = list(ctx.sampler.last)  # read before retain_batch() draws again
        optimizer.zero_grad(set_to_none=True)
        n = images.shape[0]
        with torch.no_grad():
            target = torch.cat([F.softmax(teachers[ids[int(k)]](images[i:i + 1]), 1) for i, k in enumerate(owner)])
        if not with_retain:
            loss = _soft_kl(target, model(images))
        else:
            ri, rl = ctx.retain_batch()
            with torch.no_grad():
                original.train(model.training)
                kept = F.softmax(original(ri), 1)
            logits = model(torch.cat([images, ri]))
            loss = _soft_kl(target, logits[:n]) + rw * _soft_kl(kept, logits[n:])
            if tw > 0:
                loss = loss + tw * loss_fn(logits[n:], rl)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run_loop(model, ctx, ctx.forget_items, step, lr=_lr(ctx, params))


def _soft_kl(target: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ student) over classes for target probabilities, mean over voxels and samples."""
    return (target * (target.clamp_min(1e-8).log() - F.log_softmax(student_logits, 1))).sum(1).mean()


def _never_saw(ctx: UnlearnContext) -> dict[str, torch.nn.Module]:
    """Forget patient -> one reference model (eval mode, on the device) that never trained on it, drawn
    with the request's seed."""
    refs = ctx.references
    if refs is None:
        raise ConfigError("strategy reference_teacher needs the run's reference models (privseg audit references)")
    models: dict[int, torch.nn.Module] = {}
    out: dict[str, torch.nn.Module] = {}
    chosen: dict[str, int] = {}
    for it in ctx.forget_items:
        pid = str(it["id"])
        outs = [r for r in refs.references if pid not in r.patients]
        if not outs:
            raise ConfigError(f"strategy reference_teacher: every one of the run's {len(refs.references)} reference "
                              f"models trained on {pid}; train more (privseg audit references --n)")
        pick = outs[int(np.random.default_rng((ctx.seed, *pid.encode())).integers(len(outs)))]
        if pick.k not in models:
            models[pick.k] = pick.load_model().to(ctx.device)
        out[pid], chosen[pid] = models[pick.k], pick.k
    ctx.log["teacher_reference"] = chosen  # recorded in the report: which reference taught which patient
    return out


# -- exact reference -------------------------------------------------------------
@register("retrain")
def retrain(model, ctx: UnlearnContext, params: dict):
    """Exact unlearning: a fresh model trained from scratch on the retain subjects with the original's config and
    step count (the reference; ignores the target and the epoch budget)."""
    cfg = ctx.config
    torch.manual_seed(cfg.seed)
    fresh = cfg.build_model().to(ctx.device)
    if ctx.fix_decoder:
        ctx.log["note"] = "fix_decoder does not apply to retrain (it starts from scratch)"
    ctx.fix_decoder = False
    sampler = ctx.sampler  # a sampler seeded like the original run's, recording into the caller's record
    ctx.sampler = RecordingSampler(cfg.patch_size, cfg.patches_per_subject, cfg.seed)
    try:
        run_loop(fresh, ctx, ctx.retain_items, standard_step, lr=cfg.lr, steps=cfg.steps, check=False, config=cfg)
    finally:
        sampler.seen.extend(ctx.sampler.seen)
        ctx.sampler = sampler
    ctx.log["steps"] = cfg.steps
    return fresh
