"""The patient-level DP-SGD step (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
Alg. 1, with the patient as the record, as in user-level DP -- McMahan et al., ICLR 2018):

1. **Poisson-sample patients** from the site's secret key (:mod:`privseg.privacy.noise`): each
   joins the step independently with probability ``q``; a step may hold 0, 1, ... patients.
   Patches are then drawn from the chosen patients' files only: ``aug_mult`` = K random
   augmented patches (crops centred on foreground or background) from each of a patient's files.
2. **Per-patient gradient** -- the mean of the gradients of its K patches -- clipped once to ``C``
   (:mod:`privseg.privacy.grad_sample`). This is augmentation multiplicity (De, Berrada, Hayes,
   Smith & Balle, "Unlocking High-Accuracy Differentially Private Image Classification through
   Scale", 2022, Sec. 3.1): averaging before clipping leaves one patient's contribution at norm
   <= C, so K costs no privacy, while the average has less variance than one patch's gradient.
3. **Noise**: ``g = (sum_u g_u + N(0, (z_delta C)^2 I)) / B``; the optimiser steps on ``g``.
   A fixed clip has ``z_delta = z``; private adaptive clipping (Andrew et al., NeurIPS 2021,
   :mod:`privseg.privacy.clipping`) gives the update its share of ``z`` and moves ``C``.

Each step is booked as a Poisson-subsampled Gaussian ``(q, z)`` (Mironov 2017;
:mod:`privseg.privacy.accountant`). Models must not mix samples (BatchNorm does):
:func:`check_dp_model` refuses them. Threat model and releases: ``docs/privacy.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from privseg.errors import BudgetExceededError, ConfigError
from privseg.privacy.accountant import StepEvent
from privseg.privacy.clipping import make_clipper
from privseg.privacy.grad_sample import GRAD_METHODS, dp_params
from privseg.privacy.noise import NoiseSource
from privseg.privacy.spec import dp_default

_NOISE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privseg-dp-noise")


def check_dp_model(model: nn.Module) -> None:
    """Refuse normalisation that mixes samples: a patient's gradient must not depend on other patients."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"model layer {name or type(module).__name__} is BatchNorm, which mixes patients in a "
                              "batch and breaks per-patient clipping: use --norm group (or instance)")


@dataclass(frozen=True)
class SampledBatch:
    """A step's batch as the engine drew it: Poisson-sampled patients, their patches, and the
    patient index of each patch. Only the engine that drew it (for that step) accepts it."""

    engine_id: int
    step: int
    images: torch.Tensor | None
    labels: torch.Tensor | None
    owner: torch.Tensor | None
    patients: int


def patient_groups(items: Sequence[dict]) -> list[list[int]]:
    """Item indices per patient, in first-seen order: the DP unit is the patient, however many
    files (scans) they have. Items without a ``patient`` key are one patient each."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(str(item.get("patient", f"#item{i}")), []).append(i)
    return list(groups.values())


class PatientDPSGD:
    """Patient-level DP-SGD: draws its own Poisson sample of patients every step (:meth:`sample`),
    clips per patient, adds noise from a secret :class:`~privseg.privacy.noise.NoiseSource`,
    steps the optimiser (:meth:`step`); :meth:`train_steps` does both for a range of steps.

    ``clip_rule`` names a rule of :data:`~privseg.privacy.clipping.CLIP_RULES` (``clip_norm``,
    ``target_quantile``, ``clip_lr``, ``sigma_b``, ``clip_gamma``: its settings); every default is
    :class:`~privseg.privacy.spec.DPConfig`'s.
    ``multipliers[t]`` is the noise multiplier ``z`` booked for global step ``t``; the noised sum
    is divided by ``expected_batch`` (default q*n patients; a public constant such as
    ``subjects_per_step`` when the sampling rate is fixed, so the update does not reveal n).
    It is not a ``step_fn`` for a fixed batch: a batch it did not sample itself would be booked
    as a Poisson sample that never happened."""

    def __init__(self, *, q: float, n_subjects: int, multipliers: Sequence[float],
                 clip_rule: str = dp_default("clip"), clip_norm: float = dp_default("clip_norm"),
                 target_quantile: float = dp_default("target_quantile"), clip_lr: float = dp_default("clip_lr"),
                 sigma_b: float | None = dp_default("sigma_b"), clip_gamma: float | None = dp_default("clip_gamma"),
                 method: str = dp_default("method"), noise: NoiseSource | None = None, start: int = 0,
                 expected_batch: float | None = None, aug_mult: int | None = None, lr_scale: float = 1.0):
        if method not in GRAD_METHODS:
            raise ConfigError(f"DP method {method!r} is not one of {', '.join(GRAD_METHODS)}")
        self.q = float(q)
        self.n = int(n_subjects)
        # the divisor of the noised sum: a public constant when given (so the update does not reveal n)
        self.expected_batch = float(expected_batch) if expected_batch else self.q * self.n
        self.multipliers = [float(z) for z in multipliers]
        self.clip_norm = float(clip_norm)
        self.clip_rule = clip_rule
        self.clipper = make_clipper(self.clip_rule, clip_norm, self.expected_batch, max(self.multipliers, default=0.0),
                                    {"target_quantile": target_quantile, "clip_lr": clip_lr, "sigma_b": sigma_b,
                                     "gamma": clip_gamma})
        if aug_mult is not None and int(aug_mult) < 0:
            raise ConfigError(f"augmentation multiplicity {aug_mult} must be at least 1 patch per patient (0 or None: "
                              "the training config's patches_per_subject)")
        self.aug_mult = int(aug_mult) if aug_mult else None  # None: the training config's patches_per_subject
        if not lr_scale > 0:
            raise ConfigError(f"learning-rate scale {lr_scale} must be positive")
        self.lr_scale = float(lr_scale)  # the plan's: the optimiser runs at config.lr * lr_scale
        self.method = method
        self.noise = noise if noise is not None else NoiseSource.ephemeral()
        self.step_no = int(start)
        self.events: list[StepEvent] = []
        self.clip_trace: list[float] = []
        self.sampled: list[int] = []
        self.timings: list[float] = []

    @property
    def clip(self) -> float:
        return float(self.clipper.clip)

    def noise_multiplier(self, step: int) -> float:
        if not self.multipliers:
            raise BudgetExceededError("no DP steps planned")
        return self.multipliers[min(step, len(self.multipliers) - 1)]  # past the plan: the ledger guards

    def _clipped_sum(self, model, loss_fn, images, labels, owner, clip):
        return GRAD_METHODS[self.method](model, loss_fn, images, labels, owner, clip)

    def __call__(self, *args, **kwargs):
        raise ConfigError("PatientDPSGD is not a step function for a given batch: it books every step as a Poisson "
                          "sample of patients, so it must draw the batch itself -- use train_steps(), or "
                          "sample() then step()")

    def sample(self, items: Sequence[dict], sampler, step: int, device=None) -> SampledBatch:
        """Poisson sample of patients for ``step`` (each independently with probability ``q``, from
        the secret noise source), and the sampler's patches (``aug_mult`` in :meth:`train_steps`)
        from each of their files, all from the secret stream."""
        groups = patient_groups(items)
        if len(groups) != self.n:
            raise ConfigError(f"the DP plan is for {self.n} patients, the site has {len(groups)}")
        coins = self.noise.uniform("sample", step, len(groups))
        chosen = [g for g, c in zip(groups, coins, strict=True) if c < self.q]
        if not chosen:
            return SampledBatch(id(self), step, None, None, None, 0)
        idx = [i for g in chosen for i in g]
        patient_of = torch.tensor([p for p, g in enumerate(chosen) for _ in g])
        images, labels, owner = sampler.sample([items[i] for i in idx], seed=self.noise.integer("patches", step))
        owner = patient_of[owner]  # item index -> patient index: one clipped gradient per patient
        if device is not None:
            images, labels, owner = images.to(device), labels.to(device), owner.to(device)
        return SampledBatch(id(self), step, images, labels, owner, len(chosen))

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch: SampledBatch) -> float:
        """One DP step on a batch this engine sampled for the step it is at."""
        if not isinstance(batch, SampledBatch) or batch.engine_id != id(self) or batch.step != self.step_no:
            raise ConfigError("a DP step only takes the batch its engine sampled for that step (Poisson sampling "
                              "is what the accountant books)")
        t0 = time.perf_counter()
        z = self.noise_multiplier(self.step_no)
        clip = self.clip
        z_update = self.clipper.update_noise_multiplier(z)
        params = dp_params(model)
        # the noise depends only on the key and the step: it is drawn on a background thread while
        # the per-patient gradients are computed (same draws as drawing it here)
        dtype = params[0].dtype if len({p.dtype for p in params}) == 1 else torch.float64
        pending = _NOISE_THREAD.submit(self.noise.gaussian, "gradient", self.step_no,
                                       sum(p.numel() for p in params), dtype)
        try:
            if batch.images is not None:
                acc, norms, loss = self._clipped_sum(model, loss_fn, batch.images, batch.labels, batch.owner,
                                                     getattr(self.clipper, "scale", clip))
            else:  # nobody sampled: the step still releases noise, and is still accounted
                acc, norms = [torch.zeros_like(p) for p in params], torch.zeros(0, dtype=torch.float64)
                loss = float("nan")
        finally:
            draws = pending.result()
        offset = 0
        for p, a in zip(params, acc, strict=True):
            noise = draws[offset:offset + p.numel()].view(p.shape).to(device=p.device, dtype=p.dtype)
            offset += p.numel()
            p.grad = a.add_(noise, alpha=z_update * clip).div_(self.expected_batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.clipper.update(norms, draw=float(self.noise.gaussian("count", self.step_no, 1)[0]))
        self.events.append(StepEvent(self.q, z, 1))
        self.clip_trace.append(clip)
        self.sampled.append(int(batch.patients))
        self.step_no += 1
        self.timings.append(time.perf_counter() - t0)
        return loss

    def train_steps(self, model: nn.Module, optimizer: torch.optim.Optimizer, items: Sequence[dict], config,
                    start: int, stop: int, loss_fn=None, sampler=None,
                    on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Steps ``start .. stop``, each on its own Poisson sample; the draws depend only on the
        noise key and the step, so a resumed run repeats an uninterrupted one. Each sampled patient
        gives ``aug_mult`` patches per file (default ``config.patches_per_subject``); the optimiser
        runs at ``config.lr * lr_scale`` (the plan's learning rate, :mod:`privseg.privacy.plan`)."""
        # why: privseg.train and privseg.data.transforms import MONAI (seconds); privseg.privacy's ledgers and
        # plans are read without them (console, reports)
        from privseg.data.transforms import PatchSampler
        from privseg.train.loop import prepare_steps

        check_dp_model(model)
        if sampler is None and self.aug_mult:
            sampler = PatchSampler(config.patch_size, self.aug_mult, config.seed)
        if self.lr_scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * self.lr_scale
        device, loss_fn, sampler = prepare_steps(model, items, config, loss_fn, sampler)
        losses = []
        for step in range(start, stop):
            self.step_no = step
            loss = self.step(model, optimizer, loss_fn, self.sample(items, sampler, step, device))
            losses.append(loss)
            if on_step:
                on_step(step + 1, loss)
        return losses
