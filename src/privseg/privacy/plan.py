"""A site's DP plan: the sampling rate and noise multipliers fixed before its first round, and the
step planner that chooses them from public figures only (``--plan auto``).

The multipliers are calibrated (bisection on the accountant, :func:`calibrate_sigma`) so that
the planned steps spend exactly the site's budget, then kept: more rounds, an erased patient or
an erasure's derived run use the same ``q`` and multipliers, and the ledger
(:class:`~privseg.privacy.budget.BudgetLedger`) refuses the round that would cross the budget.

**The step planner** (:func:`plan_training`). Inputs: (epsilon, delta), the cohort size the site
declares public (rounded down to 2 significant digits, :func:`public_cohort_size`, and stated in
the plan), a compute budget in epochs ``E`` and the number of steps ``T`` (a federation's rounds x
local steps; without it the planner chooses ``T``). Outputs: the sampling rate ``q``, ``T``, the
noise multiplier ``sigma``, the expected batch ``B = q N``, the noise per patient ``sigma C / B``
and a learning rate scaled to it. Nothing reads the site's exact n, so the plan -- and every reply
computed from it (``dp-noise-multiplier``, ``dp-epsilon``) -- says nothing about n beyond the
declared size.

* **Fewer, larger steps** (Sander, Stock & Sablayrolles, "TAN without a burn: Scaling laws of
  DP-SGD", ICML 2023). At a fixed budget the noise that matters is ``sigma / B`` per step; for
  ``sigma`` above about 1, ``sigma`` grows as ``q sqrt(T)``, so at a fixed compute budget
  ``E = q T`` the noise per step falls as ``sqrt(T)`` falls: spend the epochs on large batches.
  Given ``T``, ``q = min(1, E / T)`` (the largest batch the budget pays for). Given only ``E``,
  ``T = max(MIN_STEPS, E)`` -- full-batch steps unless that leaves fewer than ``MIN_STEPS``
  updates. ``q`` depends on (E, T) only: a public sampling rate (issue 25, item 6).
* **Learning rate scaled to the noise.** Under DP, Adam's second moment is dominated by the
  noise's variance ``(sigma C / B)^2`` per coordinate, so AdamW acts as SGD with step
  ``lr / (sigma C / B)`` (Tang, Panda, Sankararaman & Xu, "DP-AdamBC: Your DP-Adam Is Actually
  DP-SGD", AAAI 2024). Keeping that step the same across plans (TAN: runs at the same noise per
  step and steps behave alike) gives ``lr = base_lr * (sigma C / B) / NOISE_REF``, capped at
  ``LR_CAP`` x ``base_lr``: ``base_lr`` (``--lr``) is the rate at the reference noise.

**The erasure reserve.** A federated site's plan keeps ``dp.erasure_reserve`` rounds of local
steps for erasures (:func:`reserve_steps`): the noise is calibrated so that the training steps and
the reserved steps, at the schedule's last multiplier, compose to the budget, and the plan stores
the reserve as mechanism events (``SitePlan.reserve``). Training releases must leave room for
them (:meth:`~privseg.privacy.budget.BudgetLedger.check_round` ``reserve``); an erasure's spend
from them (:func:`privseg.privacy.make_private` ``spend_reserve``).

``DEFAULT_EPOCHS``, ``MIN_STEPS`` and ``NOISE_REF`` are provisional until
``benchmarks/privacy_utility.py`` measures them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

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
from privseg.privacy.clipping import make_clipper
from privseg.privacy.spec import DPConfig, dp_default


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
    schedule: str = dp_default("noise_schedule")
    decay_ratio: float = dp_default("decay_ratio")
    # from the step planner (--plan auto); None / 1.0 for a plan made without it
    cohort_size: int | None = None  # the declared public size, rounded
    expected_batch: float | None = None  # q * cohort_size: the public divisor of the noised sum
    lr_scale: float = 1.0  # the optimiser runs at lr * lr_scale
    # the erasure reserve: mechanism events (StepEvent dicts) the training must leave room for
    reserve: list = field(default_factory=list)

    @property
    def multipliers(self) -> list[float]:
        return schedule_multipliers(self.base_sigma, self.total_steps, self.schedule, self.decay_ratio)

    def reserve_events(self) -> list[StepEvent]:
        return [StepEvent(**e) for e in self.reserve]

    def events(self, start: int, stop: int) -> list[StepEvent]:
        """Events of steps ``start .. stop``; steps past the plan continue at the last multiplier
        (so the ledger can say what an extra round would cost, and refuse it)."""
        mult = self.multipliers
        return events_for(self.q, [mult[min(t, len(mult) - 1)] for t in range(start, stop)])

    def to_dict(self) -> dict:
        return asdict(self)


class AdaptiveClipNoiseWarning(UserWarning):
    """A clip rule (adaptive clipping) whose released count is mostly noise: the clip norm will wander."""


# Andrew et al. (2021) work at sigma_b / m = 1/20; at 1/2 the count's noise is half the largest
# possible count signal and the clip's estimate drifts by factors of several over a few hundred
# steps (benchmarks/privacy.py, part clipwalk: at 2 patients per step and eps 3, C ends anywhere
# in 0.2-5.4 for a right answer of 1).
COUNT_NOISE_LIMIT = 0.5


DEFAULT_EPOCHS = 50.0  # compute budget: expected passes over each patient (provisional)
MIN_STEPS = 100  # fewest updates the planner chooses when it chooses the steps (provisional)
# noise per patient (sigma C / B) at which --lr is used as given (provisional). Kept at 1 on the evidence so far:
# privacy_utility's lr search (x 1/3..27 of 5e-3, seed 0, 12 patients a site, eps 8, sigma C / B = 0.69) found the
# best factor 9 for the recipe on mri3d but 1/3 on ct3d and 3 on derm2d, and 1, 1/3, 3 from the public warm start:
# no one factor (docs/privacy.md). How the best rate moves with the noise (n 25-100, eps 3) is still to run.
NOISE_REF = 1.0
LR_CAP = 10.0  # the planned learning rate is at most this many times --lr


def public_cohort_size(declared: int) -> int:
    """The declared cohort size as the plan states it: rounded down to 2 significant digits
    (137 -> 130, 25 -> 25), so a plan never pins a count more finely than that. Rounding down
    makes ``delta < 1/N`` and the expected batch conservative."""
    n = int(declared)
    if n < 1:
        raise ConfigError(f"declared cohort size {declared} must be at least 1")
    step = 10 ** max(len(str(n)) - 2, 0)
    return n // step * step


@dataclass(frozen=True)
class TrainingPlan:
    """A DP training plan made from public figures only (:func:`plan_training`)."""

    epsilon: float
    delta: float
    cohort_size: int | None  # declared, rounded (public_cohort_size); None: not declared
    sampling_rate: float
    steps: int
    noise_multiplier: float
    clip_norm: float
    expected_batch: float | None  # q * cohort_size
    lr_scale: float
    lr: float | None  # base_lr * lr_scale, when a base_lr was given
    reserve_steps: int = 0  # steps at the last multiplier kept for erasures (the erasure reserve)

    @property
    def epochs(self) -> float:
        return self.sampling_rate * self.steps

    @property
    def noise_per_patient(self) -> float | None:
        """``sigma C / B``: the std of each coordinate of the noise on the averaged update, in the
        same units as one patient's clipped contribution -- the figure TAN shows utility follows."""
        return self.noise_multiplier * self.clip_norm / self.expected_batch if self.expected_batch else None

    def to_dict(self) -> dict:
        return {**asdict(self), "epochs": self.epochs, "noise_per_patient": self.noise_per_patient}

    def describe(self) -> str:
        size = (f"declared cohort {self.cohort_size} patients (rounded; the exact count is not used)"
                if self.cohort_size else "no cohort size declared (noise per patient and learning rate unscaled)")
        lines = [f"DP plan: epsilon {self.epsilon:g} at delta {self.delta:g}; {size}",
                 f"  {self.steps} steps at sampling rate q = {self.sampling_rate:.4g} ({self.epochs:.3g} epochs)",
                 f"  noise multiplier sigma = {self.noise_multiplier:.4g}, clip C = {self.clip_norm:g}"]
        if self.expected_batch:
            lines.append(f"  expected batch {self.expected_batch:.3g} patients; noise per patient sigma*C/B = "
                         f"{self.noise_per_patient:.4g}")
        lines.append(f"  learning rate {self.lr:.3g}" if self.lr is not None else
                     f"  learning rate x {self.lr_scale:.3g}")
        if self.reserve_steps:
            lines.append(f"  erasure reserve: {self.reserve_steps} step(s) at this noise kept out of training "
                         "(training and the reserve together spend the budget)")
        return "\n".join(lines)


def plan_training(epsilon: float, delta: float, cohort_size: int | None, *, steps: int | None = None,
                  epochs: float | None = None, sampling_rate: float | None = None,
                  clip_norm: float = dp_default("clip_norm"), base_lr: float | None = None,
                  noise_multiplier: float | None = None, schedule: str = dp_default("noise_schedule"),
                  decay_ratio: float = dp_default("decay_ratio"),
                  allow_large_delta: bool = dp_default("allow_large_delta"), reserve_steps: int = 0,
                  what: str = "plan") -> TrainingPlan:
    """The step planner (module docstring): sampling rate, steps, noise multiplier and learning
    rate from the budget (``epsilon``, ``delta``), the declared public ``cohort_size`` and the
    compute budget (``epochs``, default ``DEFAULT_EPOCHS``; ``steps`` when the run fixes them).
    ``sampling_rate`` / ``noise_multiplier`` fix q / sigma instead. ``reserve_steps``: steps at
    the last multiplier kept for erasures (the noise is calibrated so that the training and they
    spend the budget together). It takes no exact n."""
    eps = check_epsilon(epsilon, f"epsilon of {what}")
    size = public_cohort_size(cohort_size) if cohort_size is not None else None
    dlt = check_delta(delta, size, allow_large_delta, what=f"delta of {what}")
    budget = float(epochs) if epochs is not None else DEFAULT_EPOCHS
    if not budget > 0:
        raise ConfigError(f"{what}: epoch budget {budget} must be positive")
    if steps is not None and int(steps) < 1:
        raise ConfigError(f"{what}: steps {steps} must be at least 1")
    if sampling_rate is not None:
        q = float(sampling_rate)
        if not 0 < q <= 1:
            raise ConfigError(f"{what}: sampling rate {q} must be in (0, 1]")
        t = int(steps) if steps is not None else max(MIN_STEPS, math.ceil(budget / q))
    elif steps is not None:
        t = int(steps)
        q = min(1.0, budget / t)  # the largest batch the budget pays for (TAN)
    else:
        t = max(MIN_STEPS, math.ceil(budget))  # full-batch steps unless that is fewer than MIN_STEPS
        q = min(1.0, budget / t)
    if noise_multiplier is not None:
        sigma = float(noise_multiplier)
        if epsilon_of(q, sigma, dlt, schedule) > eps:
            raise BudgetExceededError(f"{what}: epsilon={eps:g} is too small for even one step at noise multiplier "
                                      f"{sigma:g}; raise the budget or the noise")
    else:
        sigma = calibrate_sigma(eps, dlt, q, t, schedule=schedule, ratio=decay_ratio, reserve=reserve_steps,
                                what=what)
    batch = q * size if size else None
    scale = min(LR_CAP, sigma * clip_norm / batch / NOISE_REF) if batch else 1.0
    return TrainingPlan(eps, dlt, size, q, t, sigma, float(clip_norm), batch, scale,
                        base_lr * scale if base_lr is not None else None, int(reserve_steps))


def reserve_steps(dp: DPConfig, local_steps: int | None) -> int:
    """The DP steps a federated site's plan keeps for erasures: ``dp.erasure_reserve`` rounds of
    ``local_steps`` (0 without rounds: a central run has no DP erasure)."""
    return math.ceil(float(dp.erasure_reserve) * int(local_steps)) if local_steps else 0


def reserve_events(q: float, multipliers: list[float], steps: int) -> list[dict]:
    """The reserve as the plan stores it: ``steps`` steps at the last multiplier (what an erasure's
    steps past the plan run at, :meth:`SitePlan.events`)."""
    return [StepEvent(q, multipliers[-1], int(steps)).to_dict()] if steps > 0 else []


def plan_for(dp: DPConfig, site: str, steps: int | None, base_lr: float | None = None,
             local_steps: int | None = None) -> TrainingPlan:
    """:func:`plan_training` for ``site`` from the run's spec (its budget and declared size): what
    the site computes for itself, and what anyone holding the spec can compute and print.
    ``local_steps``: a federated run's steps per round (its erasure reserve is counted in rounds)."""
    dp = dp.for_site(site)
    return plan_training(dp.epsilon, dp.delta, dp.cohort_size, steps=steps, epochs=dp.epochs,
                         sampling_rate=dp.sampling_rate, clip_norm=dp.clip_norm, base_lr=base_lr,
                         noise_multiplier=dp.noise_multiplier, schedule=dp.noise_schedule, decay_ratio=dp.decay_ratio,
                         allow_large_delta=dp.allow_large_delta, reserve_steps=reserve_steps(dp, local_steps),
                         what=f"site {site}")


def epsilon_of(q: float, base: float, delta: float, schedule: str = dp_default("noise_schedule")) -> float:
    """Epsilon of one step at noise ``base`` under ``schedule`` (the first step's cost)."""
    return epsilon(events_for(q, schedule_multipliers(base, 1, schedule)), delta)


def make_plan(dp: DPConfig, site: str, n_subjects: int, subjects_per_step: int, total_steps: int,
              local_steps: int | None = None) -> SitePlan:
    """Validate a site's budget and calibrate its noise schedule to spend it over ``total_steps``
    and the erasure reserve (``dp.erasure_reserve`` rounds of ``local_steps``; none without them),
    which the plan stores as events."""
    dp = dp.for_site(site)
    if n_subjects < 1:
        raise ConfigError(f"site {site}: no training subjects")
    eps = check_epsilon(dp.epsilon, f"epsilon of site {site}")
    # delta < 1/n is checked against the exact n here, at the site, before anything is released
    delta = check_delta(dp.delta, n_subjects, dp.allow_large_delta, what=f"delta of site {site}")
    if dp.plan == "auto":  # from public figures only: the declared size, never n_subjects
        tp = plan_for(dp, site, total_steps, local_steps=local_steps)
        _check_clip(dp, site, tp.noise_multiplier, total_steps, tp.expected_batch or subjects_per_step)
        mult = schedule_multipliers(tp.noise_multiplier, total_steps, dp.noise_schedule, dp.decay_ratio)
        return SitePlan(site, n_subjects, tp.sampling_rate, total_steps, tp.noise_multiplier, eps, delta,
                        dp.noise_schedule, dp.decay_ratio, tp.cohort_size, tp.expected_batch, tp.lr_scale,
                        reserve_events(tp.sampling_rate, mult, tp.reserve_steps))
    q = dp.sampling_rate or min(1.0, subjects_per_step / n_subjects)
    kept = reserve_steps(dp, local_steps)
    if dp.noise_multiplier is not None:
        base = float(dp.noise_multiplier)
        first = epsilon_of(q, base, delta, dp.noise_schedule)
        if first > eps:
            raise BudgetExceededError(f"site {site}: epsilon={eps:g} is too small for even one step at noise "
                                      f"multiplier {base:g} (one step costs {first:.3g}); "
                                      "raise the budget or the noise")
    else:
        base = calibrate_sigma(eps, delta, q, total_steps, schedule=dp.noise_schedule, ratio=dp.decay_ratio,
                               reserve=kept, what=f"site {site}")
    _check_clip(dp, site, base, total_steps, q * n_subjects)
    mult = schedule_multipliers(base, total_steps, dp.noise_schedule, dp.decay_ratio)
    return SitePlan(site, n_subjects, q, total_steps, base, eps, delta, dp.noise_schedule, dp.decay_ratio,
                    reserve=reserve_events(q, mult, kept))


def _check_clip(dp: DPConfig, site: str, base: float, total_steps: int, expected_m: float) -> None:
    """The clip rule's own checks of the plan (any rule of ``CLIP_RULES``): its clipper must leave
    the update some noise at every planned multiplier (adaptive clipping spends part of it on its
    count), and a rule whose released count is mostly noise (``count_noise``) is warned about."""
    mult = schedule_multipliers(base, total_steps, dp.noise_schedule, dp.decay_ratio)
    clipper = make_clipper(dp.clip, dp.clip_norm, expected_m, max(mult), dp.clip_options())
    clipper.update_noise_multiplier(min(mult))
    ratio = getattr(clipper, "count_noise", None)
    if ratio is not None and ratio > COUNT_NOISE_LIMIT:
        warnings.warn(f"site {site}: --clip {dp.clip} with {expected_m:.3g} patients per step: the count it "
                      f"releases has noise {ratio:.2f} x the patients per step (Andrew et al. work at 0.05), so "
                      "the clip norm will wander far from the target quantile; prefer --clip normalise (the "
                      "default) or fixed, or more patients per step", AdaptiveClipNoiseWarning, stacklevel=2)


def plan_from_ledger_or_new(ledger, dp: DPConfig, site: str, n_subjects: int, subjects_per_step: int,
                            total_steps: int, local_steps: int | None = None) -> SitePlan:
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
    plan = make_plan(dp, site, n_subjects, subjects_per_step, total_steps, local_steps)
    ledger.set_budget(site, plan.epsilon, plan.delta)
    ledger.set_plan(site, plan.to_dict())
    return plan


def site_plan(ledger, site: str, n_subjects: int | None = None) -> SitePlan:
    """The plan fixed for ``site`` before its first round (what every later DP step of it uses)."""
    stored = ledger.get_plan(site)
    if stored is None:
        raise ConfigError(f"site {site}: no DP plan in {ledger.path}")
    return SitePlan(**{**stored, **({"n_subjects": n_subjects} if n_subjects is not None else {})})
