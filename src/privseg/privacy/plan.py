"""A site's DP plan: the sampling rate and noise multipliers fixed before its first round.

The multipliers are calibrated (bisection on the accountant, :func:`calibrate_sigma`) so that
the planned steps spend exactly the site's budget, then kept: more rounds, an erased patient or
an erasure's derived run use the same ``q`` and multipliers, and the ledger
(:class:`~privseg.privacy.budget.BudgetLedger`) refuses the round that would cross the budget.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

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
from privseg.privacy.clipping import default_sigma_b, split_noise
from privseg.privacy.spec import DPConfig


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


class AdaptiveClipNoiseWarning(UserWarning):
    """Adaptive clipping whose released count is mostly noise: the clip norm will wander."""


# Andrew et al. (2021) work at sigma_b / m = 1/20; at 1/2 the count's noise is half the largest
# possible count signal and the clip's estimate drifts by factors of several over a few hundred
# steps (benchmarks/privacy.py, part clipwalk: at 2 patients per step and eps 3, C ends anywhere
# in 0.2-5.4 for a right answer of 1).
COUNT_NOISE_LIMIT = 0.5


def _warn_if_count_is_noise(site: str, sigma_b: float, expected_m: float) -> None:
    ratio = sigma_b / expected_m
    if ratio > COUNT_NOISE_LIMIT:
        warnings.warn(f"site {site}: adaptive clipping with {expected_m:.3g} patients per step: the count it "
                      f"releases has noise {ratio:.2f} x the patients per step (Andrew et al. work at 0.05), so "
                      "the clip norm will wander far from the target quantile; prefer --clip fixed, or more "
                      "patients per step", AdaptiveClipNoiseWarning, stacklevel=3)


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
        sigma_b = dp.sigma_b or default_sigma_b(q * n_subjects, max(mult))
        split_noise(min(mult), sigma_b)
        _warn_if_count_is_noise(site, sigma_b, q * n_subjects)
    return SitePlan(site, n_subjects, q, total_steps, base, eps, delta, dp.noise_schedule, dp.decay_ratio)


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
