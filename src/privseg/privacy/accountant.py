"""Privacy accounting: RDP composition of Poisson-subsampled Gaussian steps, and noise calibration.

Every DP step privseg takes is a *Poisson-subsampled Gaussian mechanism*: each unit (patient,
or site for client-level DP) is included independently with probability ``q``, its
contribution is clipped to L2 norm ``C`` and Gaussian noise ``N(0, (z C)^2)`` is added to the
sum (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016). Its Rényi-DP curve
``eps_alpha(q, z)`` (Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar & Zhang,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019) composes additively over
steps, *whatever* ``(q, z)`` each step used, so a changing noise schedule, different local
steps per round or an adaptive-clipping step all compose by summing their RDP curves:

    RDP_total(alpha) = sum_t eps_alpha(q_t, z_t)
    eps(delta) = min_alpha RDP_total(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)

(the conversion of Balle et al. 2020 / Canonne et al. 2020, as used by both Opacus and
Google's dp-accounting). ``benchmarks/privacy.py`` and ``tests/privacy/test_privacy.py`` check the
result against Google's independent ``dp_accounting.rdp.RdpAccountant`` (same orders).

The ``pld`` mechanism (privacy loss distributions, ``dp_accounting.pld``; tighter than RDP,
slower) is available for reporting (:func:`epsilon_pld`).

An adaptive clipping step (Andrew et al. 2021) releases the noised sum at multiplier
``z_delta`` and the noised unclipped-count at std ``sigma_b``; their composition equals one
Gaussian mechanism with multiplier ``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2`` (the count has
sensitivity 1/2 after centring), so such a step is accounted as ``(q, z)``: see
:mod:`privseg.privacy.clipping`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from privseg.errors import BudgetExceededError, ConfigError

# Integer orders (exact closed form; fractional orders need a slowly converging series, on which
# dp-accounting itself gives up near alpha = 1). Costs little: the best order is > 2 for useful budgets.
ORDERS: tuple[float, ...] = tuple(float(a) for a in [*range(2, 65), 80, 96, 128, 160, 192, 256, 320, 384, 448, 512])


@dataclass(frozen=True)
class StepEvent:
    """``steps`` repetitions of a Poisson-subsampled Gaussian mechanism with sampling rate ``q``
    and noise multiplier ``sigma`` (noise std / L2 sensitivity)."""

    q: float
    sigma: float
    steps: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.q <= 1:
            raise ConfigError(f"sampling rate q={self.q} must be in (0, 1]")
        if not self.sigma >= 0:
            raise ConfigError(f"noise multiplier {self.sigma} must be >= 0")
        if int(self.steps) < 0:
            raise ConfigError(f"steps={self.steps} must be >= 0")

    def to_dict(self) -> dict:
        return {"q": self.q, "sigma": self.sigma, "steps": int(self.steps)}


def _rdp_batch(q: float, sigmas: np.ndarray, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at integer orders (Mironov, Talwar & Zhang 2019,
    Sec. 3.3), for several noise multipliers at once -> array (len(sigmas), len(orders)):
    ``A_alpha = sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k)/(2 sigma^2))``,
    ``eps(alpha) = log(A_alpha)/(alpha-1)``; ``q = 1`` gives the Gaussian's ``alpha/(2 sigma^2)``.
    Vectorised in log space (fast enough to bisect on a schedule with a different sigma per step)."""
    a = np.asarray(orders, dtype=np.float64)
    if np.any(a != np.round(a)) or np.any(a < 2):
        raise ConfigError("RDP orders must be integers >= 2")
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1, 1)
    if q == 1.0:
        with np.errstate(divide="ignore"):
            return np.broadcast_to(a[None, :] / (2 * sig[:, :, 0] ** 2), (sig.shape[0], len(a))).copy()
    k = np.arange(int(a.max()) + 1, dtype=np.float64)[None, :]
    al = a[:, None]
    valid = k <= al
    log_binom = np.where(valid, gammaln(al + 1) - gammaln(k + 1) - gammaln(np.maximum(al - k, 0) + 1), -np.inf)
    base = log_binom + k * math.log(q) + np.where(valid, (al - k) * math.log1p(-q), 0.0)  # (orders, K)
    with np.errstate(divide="ignore"):
        terms = base[None] + (k * k - k)[None] / (2 * sig**2)
    return logsumexp(terms, axis=-1) / (a - 1)[None, :]


def rdp_curve(events: Iterable[StepEvent], orders: Sequence[float] = ORDERS) -> np.ndarray:
    """Summed RDP over ``events`` at each order (Mironov 2017, composition theorem)."""
    total = np.zeros(len(orders))
    by_q: dict[float, list[StepEvent]] = {}
    for e in events:
        if e.steps > 0:
            by_q.setdefault(float(e.q), []).append(e)
    for q, evs in by_q.items():
        sig = np.array([e.sigma for e in evs])
        steps = np.array([e.steps for e in evs], dtype=np.float64)
        if np.any(sig == 0):
            return np.full(len(orders), np.inf)
        total = total + (steps[:, None] * _rdp_batch(q, sig, orders)).sum(0)
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float] = ORDERS) -> tuple[float, float]:
    """(epsilon, best order) from an RDP curve (Canonne-Kamath-Steinke conversion, as Opacus)."""
    check_delta(delta)
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = r - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    eps = np.where(np.isnan(eps), np.inf, eps)
    k = int(np.argmin(eps))
    return max(0.0, float(eps[k])), float(a[k])


def epsilon(events: Iterable[StepEvent], delta: float, orders: Sequence[float] = ORDERS) -> float:
    """ε at ``delta`` after all ``events`` (RDP accountant); 0 when nothing was released."""
    events = [e for e in events if e.steps > 0]
    if not events:
        return 0.0
    return rdp_to_epsilon(rdp_curve(events, orders), delta, orders)[0]


def epsilon_dp_accounting(events: Iterable[StepEvent], delta: float, orders: Sequence[float] = ORDERS) -> float:
    """The same quantity computed by Google's dp-accounting (an independent implementation)."""
    import dp_accounting  # why: seconds to import, and only the cross-checks and PLD reports use it

    acc = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    for e in events:
        if e.steps > 0:
            acc.compose(dp_accounting.PoissonSampledDpEvent(e.q, dp_accounting.GaussianDpEvent(e.sigma)), int(e.steps))
    return float(acc.get_epsilon(delta))


def epsilon_pld(events: Iterable[StepEvent], delta: float, value_discretization_interval: float = 1e-3) -> float:
    """ε by privacy-loss-distribution accounting (dp-accounting's PLD; tighter than RDP)."""
    import dp_accounting  # why: seconds to import, and only the cross-checks and PLD reports use it

    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=value_discretization_interval)
    for e in events:
        if e.steps > 0:
            acc.compose(dp_accounting.PoissonSampledDpEvent(e.q, dp_accounting.GaussianDpEvent(e.sigma)), int(e.steps))
    return float(acc.get_epsilon(delta))


# -- input checks ------------------------------------------------------------------

def check_epsilon(eps: float, what: str = "--epsilon") -> float:
    if eps is None or not math.isfinite(float(eps)) or float(eps) <= 0:
        raise ConfigError(f"{what} {eps} must be a positive number (e.g. --epsilon 8)")
    return float(eps)


def check_delta(delta: float, n_units: int | None = None, allow_large: bool = False, what: str = "--delta") -> float:
    """δ must be in (0, 1) and, unless ``allow_large``, below 1/n (n = patients at the site):
    a δ of 1/n allows a mechanism that publishes one patient's record outright."""
    if delta is None or not 0 < float(delta) < 1:
        raise ConfigError(f"{what} {delta} must be in (0, 1), e.g. 1e-5")
    if n_units and not allow_large and float(delta) >= 1.0 / n_units:
        raise ConfigError(f"{what} {delta} is not below 1/n = 1/{n_units}: with n={n_units} protected units "
                          f"choose delta < {1.0 / n_units:.3g} (e.g. {min(1e-5, 0.1 / n_units):.1g}), or allow it "
                          "explicitly (allow_large_delta / --allow-large-delta)")
    return float(delta)


# -- noise calibration -------------------------------------------------------------

DECAY_LEVELS = 10
SCHEDULES = ("constant", "decay")  # the noise schedules schedule_multipliers knows


def schedule_multipliers(base: float, total_steps: int, schedule: str = "constant", ratio: float = 0.5) -> list[float]:
    """Per-step noise multipliers of a schedule scaled by ``base``.

    ``constant``: ``base`` every step. ``decay``: from ``base`` down to ``ratio*base`` in
    ``DECAY_LEVELS`` equal stair steps (linear at coarse grain; few distinct values keep the
    accountant fast) (more noise early, when gradients are large and crude; less noise late,
    when fine updates matter) -- one of the ADP-FL-style "adaptive noise" schedules, fixed in
    advance so it depends on no private data."""
    if schedule == "constant" or total_steps <= 1:
        return [base] * max(total_steps, 0)
    if schedule == "decay":
        if not 0 < ratio <= 1:
            raise ConfigError(f"noise decay ratio {ratio} must be in (0, 1]")
        levels = min(total_steps, DECAY_LEVELS)
        return [base * (1 - (1 - ratio) * (t * levels // total_steps) / max(levels - 1, 1)) for t in range(total_steps)]
    raise ConfigError(f"noise schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def events_for(q: float, multipliers: Sequence[float]) -> list[StepEvent]:
    """Group a per-step multiplier list into events (consecutive equal values merged)."""
    out: list[StepEvent] = []
    for z in multipliers:
        z = float(z)
        if out and out[-1].sigma == z:
            out[-1] = StepEvent(q, z, out[-1].steps + 1)
        else:
            out.append(StepEvent(q, z, 1))
    return out


def calibrate_sigma(target_eps: float, delta: float, q: float, steps: int, *, schedule: str = "constant",
                    ratio: float = 0.5, prior: Sequence[StepEvent] = (), reserve: int = 0, lo: float = 0.3,
                    hi: float = 200.0, tol: float = 1e-4, what: str = "budget") -> float:
    """Smallest base noise multiplier whose schedule over ``steps`` steps (after ``prior``
    events, and with ``reserve`` more steps at the schedule's last multiplier kept for later)
    stays within ``target_eps`` at ``delta`` -- bisection on the RDP accountant, so the
    run spends (almost exactly) its budget. Raises :class:`BudgetExceededError` when even
    ``hi`` (an essentially useless amount of noise) cannot keep the run within budget."""
    check_epsilon(target_eps)
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1 to calibrate noise")

    def eps_at(base: float) -> float:
        mult = schedule_multipliers(base, steps, schedule, ratio)
        kept = [StepEvent(q, mult[-1], int(reserve))] if reserve > 0 else []
        return epsilon(list(prior) + events_for(q, mult) + kept, delta)

    if eps_at(hi) > target_eps:
        raise BudgetExceededError(
            f"{what}: epsilon={target_eps:g} at delta={delta:g} is too small for even {steps} step(s) at sampling "
            f"rate q={q:.3g} with noise multiplier {hi:g} (that would spend {eps_at(hi):.3g}); raise the budget, "
            "train fewer rounds/steps or sample fewer subjects per step")
    if eps_at(lo) <= target_eps:
        return lo
    while hi - lo > tol * lo:
        mid = math.sqrt(lo * hi) if hi / lo > 2 else 0.5 * (lo + hi)
        if eps_at(mid) <= target_eps:
            hi = mid
        else:
            lo = mid
    return hi
