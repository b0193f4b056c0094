"""Patient-level DP-SGD: the patient (subject) is the protected unit, however many patches they give.

One step (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Alg. 1, with the
patient as the record, as in user-level DP -- McMahan et al. 2018):

1. **Poisson-sample subjects**: each of the site's ``n`` training subjects joins the step
   independently with probability ``q`` (default ``subjects_per_step / n``); a step may hold
   0, 1, ... subjects. Patches are then drawn from the chosen subjects only.
2. **Per-subject gradient**: ``g_u = grad (1/p_u) sum_{patches of u} loss`` -- one gradient
   per subject, however many patches (``p_u``) it contributed.
3. **Clip per subject**: ``g_u <- g_u * min(1, C / ||g_u||)``, so any one patient moves the
   sum by at most ``C``.
4. **Noise**: ``g = (sum_u g_u + N(0, (z_delta C)^2 I)) / (q n)``; the optimizer steps on ``g``.
   With fixed clipping ``z_delta = z``; with adaptive clipping (Andrew et al. 2021,
   :mod:`privseg.privacy.clipping`) ``z_delta`` is the update's share of ``z`` and ``C``
   moves toward the ``gamma``-quantile of the subjects' gradient norms, privately.

Each step is booked with the accountant as a Poisson-subsampled Gaussian ``(q, z)``
(Mironov 2017; :mod:`privseg.privacy.accountant`). The noise multipliers of a run are fixed in
advance by a schedule calibrated (bisection on the accountant) to spend exactly the site's
budget over the planned steps; the :class:`~privseg.privacy.budget.BudgetLedger` refuses
the round that would cross it, before it runs.

Per-subject gradients, three ways (``method``):

* ``loop`` (default): one forward/backward per subject over that subject's patches (a micro-
  batch of ``patches_per_subject`` >= 2 keeps oneDNN's fast Conv3d path on CPU); the clipped
  gradient is accumulated in place. Same arithmetic as a normal step.
* ``vmap``: ``torch.func.vmap(grad(...))`` over subjects (one batched call).
* ``opacus``: Opacus ``GradSampleModule`` per-patch gradients, summed per subject.

``benchmarks/privacy.py`` measures all three against the non-private step.

Models must not mix samples (BatchNorm does): :func:`check_dp_model` refuses them.
The sampling and the noise are drawn from the site's secret key
(:mod:`privseg.privacy.noise`), by step: a resumed or repeated round releases *the same*
output (no extra privacy cost for a repeat), and nobody without the key -- the server
included -- can regenerate the noise or tell who was sampled. ``reproducible_noise`` derives
the key from the public seed instead: for tests and benchmarks only, stamped "not private".
Threat model, neighbouring relation and every release: ``docs/privacy.md``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privseg.errors import BudgetExceededError, ConfigError
from privseg.privacy.accountant import (
    StepEvent,
    calibrate_sigma,
    check_delta,
    check_epsilon,
    epsilon,
    events_for,
    schedule_multipliers,
)
from privseg.privacy.clipping import QuantileClipper, clip_factors, default_sigma_b, split_noise
from privseg.privacy.noise import NoiseSource

METHODS = ("loop", "vmap", "opacus")


# -- configuration -------------------------------------------------------------------

@dataclass
class DPConfig:
    """Differential-privacy settings of a run (JSON-serialisable; stored in ``TrainConfig.extra["dp"]``).

    ``unit``: ``patient`` (DP-SGD inside each site) or ``site`` (client-level DP-FedAvg at the
    server, :mod:`privseg.privacy.client_dp`). ``epsilon``/``delta``: the budget (per site for
    ``patient``); ``sites`` overrides them per site, e.g. ``{"H2": {"epsilon": 3}}`` -- a
    hospital can demand a stricter budget. ``clip``: ``fixed`` (at ``clip_norm``) or
    ``adaptive`` (starting at ``clip_norm``, tracking quantile ``target_quantile`` with
    learning rate ``clip_lr`` and count noise ``sigma_b``, default m/20). ``noise_schedule``:
    ``constant`` or ``decay`` (linear to ``decay_ratio`` x the first step's noise), calibrated to
    spend the budget over the planned steps; ``noise_multiplier`` fixes it instead (then the
    ledger stops the run when the budget runs out). ``sampling_rate`` ``q``: default
    ``subjects_per_step / n``. ``allow_large_delta`` permits delta >= 1/n. ``reproducible_noise``:
noise from the public seed, for tests/benchmarks only (the run is "not private").
    ``ledger_root``/``ledger_scope``: a derived run (an erasure's retrain or calibration) books each
    site's spend in ``<ledger_root>/sites/<site>/privacy.sqlite`` -- the site's own ledger -- under
    its scope, at the noise of the site's original plan."""

    unit: str = "patient"
    epsilon: float = 8.0
    delta: float = 1e-5
    clip: str = "adaptive"
    clip_norm: float = 1.0
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    sigma_b: float | None = None
    noise_schedule: str = "constant"
    decay_ratio: float = 0.5
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    method: str = "loop"
    allow_large_delta: bool = False
    ledger: str | None = None
    sites: dict = field(default_factory=dict)
    reproducible_noise: bool = False
    ledger_root: str | None = None
    ledger_scope: str = ""

    def __post_init__(self) -> None:
        self.unit = str(self.unit).lower()
        if self.unit not in ("patient", "site"):
            raise ConfigError(f"--dp {self.unit!r} is not patient or site")
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        if self.clip not in ("fixed", "adaptive"):
            raise ConfigError(f"--clip {self.clip!r} is not fixed or adaptive")
        if not self.clip_norm > 0:
            raise ConfigError(f"--clip-norm {self.clip_norm} must be positive")
        if self.method not in METHODS:
            raise ConfigError(f"DP method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.sampling_rate is not None and not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"sampling rate {self.sampling_rate} must be in (0, 1]")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise multiplier {self.noise_multiplier} must be positive")
        if self.noise_schedule not in ("constant", "decay"):
            raise ConfigError(f"noise schedule {self.noise_schedule!r} is not constant or decay")
        for site, over in self.sites.items():
            bad = set(over) - {"epsilon", "delta"}
            if bad:
                raise ConfigError(f"per-site DP override for {site!r} has unknown keys {sorted(bad)} "
                                  "(only epsilon and delta)")
            if "epsilon" in over:
                check_epsilon(over["epsilon"], f"epsilon of site {site}")
            if "delta" in over:
                check_delta(over["delta"], what=f"delta of site {site}")

    def for_site(self, site: str) -> DPConfig:
        over = self.sites.get(site, {})
        return replace(self, epsilon=float(over.get("epsilon", self.epsilon)),
                       delta=float(over.get("delta", self.delta)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DPConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def check_dp_model(model: nn.Module) -> None:
    """Refuse normalisation that mixes samples: a patient's gradient must not depend on other patients."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"model layer {name or type(module).__name__} is BatchNorm, which mixes patients in a "
                              "batch and breaks per-patient clipping: use --norm group (or instance)")


# -- per-subject gradients -------------------------------------------------------------

def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _groups(owner: torch.Tensor) -> list[torch.Tensor]:
    owner = owner.cpu()
    return [torch.nonzero(owner == u).flatten() for u in torch.unique(owner, sorted=True)]


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


# -- the DP step ----------------------------------------------------------------------

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

    ``multipliers[t]`` is the noise multiplier ``z`` booked for global step ``t``; the noised sum
    is divided by ``expected_batch`` (default q*n patients; a public constant such as
    ``subjects_per_step`` when the sampling rate is fixed, so the update does not reveal n).
    It is not a ``step_fn`` for a fixed batch: a batch it did not sample itself would be booked
    as a Poisson sample that never happened."""

    def __init__(self, *, q: float, n_subjects: int, multipliers: Sequence[float], clip_norm: float = 1.0,
                 adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 sigma_b: float | None = None, method: str = "loop", noise: NoiseSource | None = None,
                 start: int = 0, expected_batch: float | None = None):
        if method not in METHODS:
            raise ConfigError(f"DP method {method!r} is not one of {', '.join(METHODS)}")
        self.q = float(q)
        self.n = int(n_subjects)
        # the divisor of the noised sum: a public constant when given (so the update does not reveal n)
        self.expected_batch = float(expected_batch) if expected_batch else self.q * self.n
        self.multipliers = [float(z) for z in multipliers]
        self.clip_norm = float(clip_norm)
        self.adaptive = bool(adaptive)
        if adaptive and sigma_b is None:
            sigma_b = default_sigma_b(self.expected_batch, max(self.multipliers, default=0.0))
        self.clipper = (QuantileClipper(clip=clip_norm, target_quantile=target_quantile, lr=clip_lr,
                                        expected_m=self.expected_batch, sigma_b=sigma_b) if adaptive else None)
        self.method = method
        self.noise = noise if noise is not None else NoiseSource.ephemeral()
        self.step_no = int(start)
        self.events: list[StepEvent] = []
        self.clip_trace: list[float] = []
        self.sampled: list[int] = []
        self._opacus: _OpacusHelper | None = None
        self.timings: list[float] = []

    @property
    def clip(self) -> float:
        return self.clipper.clip if self.clipper is not None else self.clip_norm

    def noise_multiplier(self, step: int) -> float:
        if not self.multipliers:
            raise BudgetExceededError("no DP steps planned")
        return self.multipliers[min(step, len(self.multipliers) - 1)]  # past the plan: the ledger guards

    def _clipped_sum(self, model, loss_fn, images, labels, owner, clip):
        if self.method == "vmap":
            return clipped_sum_vmap(model, loss_fn, images, labels, owner, clip)
        if self.method == "opacus":
            if self._opacus is None or self._opacus.model is not model:
                self._opacus = _OpacusHelper(model)
            return self._opacus(model, loss_fn, images, labels, owner, clip)
        return clipped_sum_loop(model, loss_fn, images, labels, owner, clip)

    def __call__(self, *args, **kwargs):
        raise ConfigError("PatientDPSGD is not a step function for a given batch: it books every step as a Poisson "
                          "sample of patients, so it must draw the batch itself -- use train_steps(), or "
                          "sample() then step()")

    def sample(self, items: Sequence[dict], sampler, step: int, device=None) -> SampledBatch:
        """Poisson sample of patients for ``step`` (each independently with probability ``q``, from
        the secret noise source), and ``patches_per_subject`` patches from each of their files."""
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
        z_update = self.clipper.update_noise_multiplier(z) if self.clipper is not None else z
        params = _params(model)
        if batch.images is not None:
            acc, norms, loss = self._clipped_sum(model, loss_fn, batch.images, batch.labels, batch.owner, clip)
        else:  # nobody sampled: the step still releases noise, and is still accounted
            acc, norms, loss = [torch.zeros_like(p) for p in params], torch.zeros(0, dtype=torch.float64), float("nan")
        draws = self.noise.gaussian("gradient", self.step_no, sum(p.numel() for p in params))
        offset = 0
        for p, a in zip(params, acc, strict=True):
            noise = draws[offset:offset + p.numel()].view(p.shape).to(device=p.device, dtype=p.dtype)
            offset += p.numel()
            p.grad = (a + noise * (z_update * clip)) / self.expected_batch
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.clipper is not None:
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
        noise key and the step, so a resumed run repeats an uninterrupted one."""
        from privseg.data.transforms import PatchSampler
        from privseg.train.losses import SegLoss

        if not items:
            raise ConfigError("no training subjects")
        check_dp_model(model)
        device = next(model.parameters()).device
        loss_fn = loss_fn or SegLoss()
        sampler = sampler or PatchSampler(config.patch_size, config.patches_per_subject, config.seed)
        model.train()
        losses = []
        for step in range(start, stop):
            self.step_no = step
            loss = self.step(model, optimizer, loss_fn, self.sample(items, sampler, step, device))
            losses.append(loss)
            if on_step:
                on_step(step + 1, loss)
        return losses


# -- a site's DP plan: calibration, ledger checks ---------------------------------------

@dataclass
class SitePlan:
    """The fixed-in-advance noise plan of one site: sampling rate, per-step multipliers."""

    site: str
    n_subjects: int
    q: float
    total_steps: int
    base_sigma: float
    epsilon: float
    delta: float
    schedule: str = "constant"
    decay_ratio: float = 0.5

    @property
    def multipliers(self) -> list[float]:
        return schedule_multipliers(self.base_sigma, self.total_steps, self.schedule, self.decay_ratio)

    def events(self, start: int, stop: int) -> list[StepEvent]:
        """Events of steps ``start .. stop``; steps past the plan continue at the last multiplier
        (so the ledger can say what an extra round would cost, and refuse it)."""
        mult = self.multipliers
        return events_for(self.q, [mult[min(t, len(mult) - 1)] for t in range(start, stop)])

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(dp: DPConfig, site: str, n_subjects: int, subjects_per_step: int, total_steps: int) -> SitePlan:
    """Validate a site's budget and calibrate its noise schedule to spend it over ``total_steps``."""
    dp = dp.for_site(site)
    if n_subjects < 1:
        raise ConfigError(f"site {site}: no training subjects")
    eps = check_epsilon(dp.epsilon, f"epsilon of site {site}")
    delta = check_delta(dp.delta, n_subjects, dp.allow_large_delta, what=f"delta of site {site}")
    q = dp.sampling_rate or min(1.0, subjects_per_step / n_subjects)
    if dp.noise_multiplier is not None:
        base = float(dp.noise_multiplier)
        first = epsilon(events_for(q, schedule_multipliers(base, 1, dp.noise_schedule)), delta)
        if first > eps:
            raise BudgetExceededError(f"site {site}: epsilon={eps:g} is too small for even one step at noise "
                                      f"multiplier {base:g} (one step costs {first:.3g}); "
                                      "raise the budget or the noise")
    else:
        base = calibrate_sigma(eps, delta, q, total_steps, schedule=dp.noise_schedule, ratio=dp.decay_ratio,
                               what=f"site {site}")
    if dp.clip == "adaptive":
        mult = schedule_multipliers(base, total_steps, dp.noise_schedule, dp.decay_ratio)
        split_noise(min(mult), dp.sigma_b or default_sigma_b(q * n_subjects, max(mult)))
    return SitePlan(site, n_subjects, q, total_steps, base, eps, delta, dp.noise_schedule, dp.decay_ratio)


def noise_source(dp: DPConfig, state_dir: str | Path, seed: int) -> NoiseSource:
    """The site's secret noise key in ``state_dir``, or (``reproducible_noise``) one from the seed."""
    return NoiseSource.reproducible(seed) if dp.reproducible_noise else NoiseSource.for_state_dir(state_dir)


def engine_for(plan: SitePlan, dp: DPConfig, noise: NoiseSource, start: int = 0,
               subjects_per_step: int | None = None) -> PatientDPSGD:
    """The site's engine. With a fixed ``--sampling-rate`` the update is divided by the public
    ``subjects_per_step`` rather than q*n, so nothing the site releases depends on n."""
    fixed_q = dp.sampling_rate is not None and subjects_per_step
    return PatientDPSGD(q=plan.q, n_subjects=plan.n_subjects, multipliers=plan.multipliers, clip_norm=dp.clip_norm,
                        adaptive=dp.clip == "adaptive", target_quantile=dp.target_quantile, clip_lr=dp.clip_lr,
                        sigma_b=dp.sigma_b, method=dp.method, noise=noise, start=start,
                        expected_batch=float(subjects_per_step) if fixed_q else None)


class SiteDPSession:
    """One site's DP work for one round (or one chunk of central training), bound to the ledger:
    ``check`` computes the ε the next round would bring and refuses it if it crosses the budget;
    ``commit`` books the round (one SQLite transaction)."""

    def __init__(self, ledger, plan: SitePlan, engine: PatientDPSGD, scope: str = ""):
        self.ledger = ledger
        self.plan = plan
        self.engine = engine
        self.scope = scope

    def check(self, round_no: int, start: int, stop: int) -> float:
        return self.ledger.check_round(self.plan.site, round_no, self.plan.events(start, stop), scope=self.scope)

    def commit(self, round_no: int, start: int, stop: int, info: dict | None = None) -> float:
        extra = {"clip": self.engine.clip, "clip_trace_last": self.engine.clip_trace[-1:] or None,
                 "mean_sampled": float(np.mean(self.engine.sampled)) if self.engine.sampled else 0.0,
                 "steps": [int(start), int(stop)], "noise": self.engine.noise.kind}
        extra.update(info or {})
        return self.ledger.commit_round(self.plan.site, round_no, self.plan.events(start, stop), info=extra,
                                        scope=self.scope)


def plan_from_ledger_or_new(ledger, dp: DPConfig, site: str, n_subjects: int, subjects_per_step: int,
                            total_steps: int) -> SitePlan:
    """The site's stored plan, or a new one calibrated to its budget.

    Once a site has a plan its noise stays fixed: more rounds, an erased patient (n - 1) or a
    derived run (``dp.ledger_scope``: an erasure's retrain or calibration) keep the same ``q`` and
    multipliers, spend budget as the original rounds did, and the ledger refuses what would
    cross the budget. (Recalibrating would plan the full budget again on top of what is spent.)"""
    stored = ledger.get_plan(site)
    if stored is None and dp.ledger_scope:
        raise ConfigError(f"site {site}: no original DP plan in {ledger.path} for the derived run "
                          f"{dp.ledger_scope!r}")
    if stored is not None:
        plan = SitePlan(**{**stored, "n_subjects": n_subjects})
        if dp.ledger_scope:
            ledger.set_plan(f"{site}@{dp.ledger_scope}", plan.to_dict())
        return plan
    plan = make_plan(dp, site, n_subjects, subjects_per_step, total_steps)
    ledger.set_budget(site, plan.epsilon, plan.delta)
    ledger.set_plan(site, plan.to_dict())
    return plan


def site_plan(ledger, site: str, n_subjects: int | None = None) -> SitePlan:
    """The plan fixed for ``site`` before its first round (what every later DP step of it uses)."""
    stored = ledger.get_plan(site)
    if stored is None:
        raise ConfigError(f"site {site}: no DP plan in {ledger.path}")
    return SitePlan(**{**stored, **({"n_subjects": n_subjects} if n_subjects is not None else {})})


# -- federated hook (patient-level DP at each site) ----------------------------------------

class _FLStepFn:
    """What :func:`fl_step_fn_factory` returns to the ClientApp: a ``step_fn`` that also brings its
    own Poisson-sampled ``train_steps`` and the metrics (ε spent) to report."""

    def __init__(self, session: SiteDPSession, round_no: int):
        self.session = session
        self.round_no = round_no
        self.engine = session.engine
        self._metrics: dict = {}

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)  # refuses: a DP site samples its own batches

    def train_steps(self, model, optimizer, items, config, start: int, stop: int) -> list[float]:
        self.session.check(self.round_no, start, stop)  # refuses before any step is taken
        losses = self.engine.train_steps(model, optimizer, items, config, start, stop)
        eps = self.session.commit(self.round_no, start, stop)
        self._metrics = {"dp-epsilon": eps, "dp-delta": self.session.plan.delta,
                         "dp-budget": self.session.plan.epsilon, "dp-clip": float(self.engine.clip),
                         "dp-noise-multiplier":
                             float(self.engine.multipliers[min(stop, len(self.engine.multipliers)) - 1])}
        return [x for x in losses if not math.isnan(x)] or [float("nan")]

    def round_metrics(self) -> dict:
        return dict(self._metrics)


def fl_step_fn_factory(tc, msg_config, spec, state_dir: Path):
    """``step_fn_factory`` for :func:`privseg.federated.client_app.make_client_app`: patient-level DP
    at site ``spec.id`` with the settings in ``tc.extra["dp"]`` and the site's ledger in
    ``<state_dir>/privacy.sqlite`` (the site holds its own budget)."""
    from privseg.federated.client_app import site_items, site_seed
    from privseg.privacy.budget import BudgetLedger

    dp = DPConfig.from_dict(tc.extra["dp"])
    server_round = int(msg_config["server-round"])
    steps = int(msg_config.get("local-steps", 1))
    items = site_items(spec, "train", tc.spacing, int(msg_config.get("cache-sites", 8)))
    if dp.ledger:
        ledger_path = Path(dp.ledger)
    elif dp.ledger_root:  # a derived run: the site's own ledger in the original run
        ledger_path = Path(dp.ledger_root) / "sites" / spec.id / "privacy.sqlite"
    else:
        ledger_path = Path(state_dir) / "privacy.sqlite"
    ledger = BudgetLedger(ledger_path)
    plan = plan_from_ledger_or_new(ledger, dp, spec.id, len(patient_groups(items)), tc.subjects_per_step, tc.steps)
    engine = engine_for(plan, dp.for_site(spec.id), noise_source(dp, state_dir, tc.seed + site_seed(spec.id)),
                        start=(server_round - 1) * steps, subjects_per_step=tc.subjects_per_step)
    # adaptive clip: continue from the clip the site reached in its previous round (not from a first
    # attempt at this round that a server crash cut short: the repeat must give the same update)
    last = ledger.last_info(spec.id, before_round=server_round, scope=dp.ledger_scope)
    if engine.clipper is not None and last and last.get("clip"):
        engine.clipper.clip = float(last["clip"])
    return _FLStepFn(SiteDPSession(ledger, plan, engine, dp.ledger_scope), server_round)


# -- central training -----------------------------------------------------------------------

def train_private(cohort, config, dp: DPConfig, out_dir: str | Path, *, site: str = "central",
                  resume: bool = True, on_step: Callable[[int, int, float], None] | None = None,
                  items: Sequence[dict] | None = None) -> dict:
    """Central patient-level DP training (all training subjects of ``cohort`` in one place).

    Checkpoints every ``config.checkpoint_every`` steps; each such chunk is one ledger round in
    ``out_dir/privacy.sqlite`` (site ``central``), checked before it runs. Returns the trainer's
    result plus ``epsilon`` / ``delta`` / ``clip``."""
    from privseg.data.transforms import load_preprocessed
    from privseg.privacy.budget import BudgetLedger
    from privseg.train.checkpoint import load_checkpoint, save_checkpoint
    from privseg.train.loop import make_optimizer
    from privseg.utils import pick_device, seed_everything

    out_dir = Path(out_dir)
    subjects = cohort.select("train")
    if not subjects:
        raise ConfigError(f"cohort {cohort.name} has no training subjects")
    seed_everything(config.seed)
    model = config.build_model().to(pick_device(config.device))
    check_dp_model(model)
    optimizer = make_optimizer(model, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = BudgetLedger(Path(dp.ledger) if dp.ledger else out_dir / "privacy.sqlite")
    if items is None:
        items = load_preprocessed(subjects, cohort, config.spacing)
    plan = plan_from_ledger_or_new(ledger, dp, site, len(patient_groups(items)), config.subjects_per_step,
                                   config.steps)
    ckpt = out_dir / "last.pt"
    start, history = 0, []
    if not resume and ledger.rounds(site):
        raise BudgetExceededError(f"{ledger.path} already books DP steps of site {site!r}: a fresh start would "
                                  "replace released rounds in the ledger; resume, or use a new output folder")
    if resume and ckpt.exists():
        payload = load_checkpoint(ckpt)
        model.load_state_dict(payload["model"])
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        start = int(payload["step"])
        history = list(payload["extra"].get("history", []))
    # Ledger rows are keyed by the chunk's first step (+1): a chunk repeated after a crash replaces its
    # own row (same key, same noise, same output), while chunks of another length never collide.
    booked = sum(r["steps"] for r in ledger.rounds(site, scope="") if r["round"] < start + 1)
    if booked != start:
        raise BudgetExceededError(f"{ledger.path}: the ledger books {booked} DP step(s) of site {site!r} before "
                                  f"step {start}, the checkpoint {ckpt} is at step {start}: refusing to resume "
                                  "a run whose spend does not match its model")
    engine = engine_for(plan, dp, noise_source(dp, out_dir, config.seed), start=start,
                        subjects_per_step=config.subjects_per_step)
    last = ledger.last_info(site, before_round=start + 1)  # the clip as it was at `start`
    if start and engine.clipper is not None and last and last.get("clip"):
        engine.clipper.clip = float(last["clip"])
    session = SiteDPSession(ledger, plan, engine)
    t0 = time.perf_counter()
    step = start
    eps = ledger.spent(site)
    while step < config.steps:
        stop = min(config.steps, (step // config.checkpoint_every + 1) * config.checkpoint_every)
        round_no = step + 1
        session.check(round_no, step, stop)
        losses = engine.train_steps(model, optimizer, items, config, step, stop,
                                    on_step=(lambda s, v: on_step(s, config.steps, v)) if on_step else None)
        history.extend({"step": step + i + 1, "loss": v} for i, v in enumerate(losses))
        # book the spend first: a crash before the checkpoint repeats the chunk with the same
        # noise (same output, same ledger row); the other order could lose a spend
        eps = session.commit(round_no, step, stop)
        save_checkpoint(ckpt, model, config=config.to_dict(), step=stop, optimizer=optimizer,
                        extra={"history": history, "cohort": cohort.name, "dp": dp.to_dict(),
                               "train_subjects": [s.id for s in subjects]})
        step = stop
    return {"model": model, "checkpoint": ckpt, "steps": config.steps, "resumed_from": start, "history": history,
            "seconds": time.perf_counter() - t0, "epsilon": eps, "delta": plan.delta, "budget": plan.epsilon,
            "clip": engine.clip, "noise_multiplier": plan.base_sigma, "q": plan.q}
