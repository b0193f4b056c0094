"""Empirical privacy audit of patient-level DP-SGD on the real site path: a lower bound on ε
from white-box gradient canaries, to set against the accounted ε.

Design (Nasr, Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini & Terzis, "Tight Auditing of
Differentially Private Machine Learning", USENIX Security 2023):

* **Dirac canary.** A canary patient whose gradient is ``a e_j`` -- all of it on one
  coordinate ``j``, chosen where the site's other patients' gradients are smallest -- joins the
  site in the "in" world. Everything else is the site's real step:
  :func:`privseg.privacy.make_private` (plan, ledger, noise bound to the release's inputs,
  per-patient clipping) and AdamW. The attacker observes the privatised gradient as it enters
  the optimiser (the model is post-processing of it) and scores a trial by its coordinate ``j``
  in units of ``C / B``: ``N(b, σ²)`` out, ``N(b + 1, σ²)`` in.
* **Two estimators.** Gaussian DP (Dong, Roth & Su 2019): the mechanism is ``μ``-GDP with
  ``μ = (mean_in - mean_out) / sd``; a one-sided 95 % lower confidence bound on ``μ`` gives ε at
  δ (:func:`gdp_epsilon`). And Clopper--Pearson (Jagielski, Ullman & Oprea 2020) with the
  threshold chosen on one half of the trials and the bound computed on the other
  (:func:`cp_lower_bound`), so the bound is not tuned on the data it reports.
* **Exact ε.** A lower bound is compared with the mechanism's exact ε by privacy loss
  distributions (:func:`privseg.privacy.accountant.epsilon_pld`), not with the RDP figure the
  ledger books (an upper bound: 4.00 booked is 3.70 exact for one step at q = 1).

The arms (secret key, noise from the public seed, noise reused by a resume on the old code path,
an identical replay) are in ``benchmarks/dp_audit.py``; this module holds the estimators and the
canary site, with unit tests in ``tests/audit/test_dp.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from privseg.errors import ConfigError

Z_95 = 1.6448536269514722  # one-sided 95 %


# -- estimators -----------------------------------------------------------------------------------

def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` Clopper--Pearson interval of a binomial proportion ``k / n``."""
    from scipy.stats import beta

    if not 0 <= k <= n or n < 1:
        raise ConfigError(f"Clopper-Pearson: {k} successes of {n} trials")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _cp_epsilon(s_in: np.ndarray, s_out: np.ndarray, threshold: float, delta: float) -> float:
    tpr_lo, _ = clopper_pearson(int((s_in >= threshold).sum()), len(s_in))
    _, fpr_hi = clopper_pearson(int((s_out >= threshold).sum()), len(s_out))
    return max(0.0, math.log((tpr_lo - delta) / fpr_hi)) if tpr_lo - delta > 0 and fpr_hi > 0 else 0.0


def cp_lower_bound(s_in: np.ndarray, s_out: np.ndarray, delta: float) -> dict:
    """ε lower bound from (TPR, FPR) with 95 % Clopper--Pearson intervals; the threshold is the
    best on the first half of each world's trials, the bound is computed on the second half."""
    s_in, s_out = np.asarray(s_in, float), np.asarray(s_out, float)
    if min(len(s_in), len(s_out)) < 4:
        raise ConfigError("the Clopper-Pearson audit needs at least 4 trials per world")
    hi, ho = len(s_in) // 2, len(s_out) // 2
    choose_in, choose_out, eval_in, eval_out = s_in[:hi], s_out[:ho], s_in[hi:], s_out[ho:]
    candidates = np.unique(np.concatenate([choose_in, choose_out]))
    best = max(candidates, key=lambda t: _cp_epsilon(choose_in, choose_out, t, delta))
    return {"epsilon": _cp_epsilon(eval_in, eval_out, float(best), delta), "threshold": float(best),
            "trials_chosen_on": hi + ho, "trials_evaluated": len(eval_in) + len(eval_out)}


def gdp_delta(eps: float, mu: float) -> float:
    """δ(ε) of a ``μ``-GDP mechanism (Dong, Roth & Su 2019, Cor. 2.13)."""
    from scipy.stats import norm

    # e^eps Phi(.) in log space: a strong canary has mu in the hundreds
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(min(eps + norm.logcdf(-eps / mu - mu / 2), 700.0)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with ``δ(ε) <= delta`` for ``μ``-GDP (0 when ``μ <= 0``)."""
    from scipy.optimize import brentq

    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-10))


def gdp_lower_bound(s_in: np.ndarray, s_out: np.ndarray, delta: float) -> dict:
    """``μ`` fitted to the two worlds' scores (Gaussian with a common sd: the Dirac canary's
    observation), its one-sided 95 % lower confidence bound, and the ε each gives at ``delta``."""
    s_in, s_out = np.asarray(s_in, float), np.asarray(s_out, float)
    n1, n0 = len(s_in), len(s_out)
    if min(n1, n0) < 3:
        raise ConfigError("the Gaussian-DP audit needs at least 3 trials per world")
    sd = math.sqrt(((n1 - 1) * s_in.var(ddof=1) + (n0 - 1) * s_out.var(ddof=1)) / (n1 + n0 - 2))
    if sd == 0:  # no spread: the worlds are told apart exactly (or not at all)
        mu = math.inf if s_in.mean() > s_out.mean() else 0.0
        return {"mu": mu, "mu_lower": mu, "epsilon": mu, "epsilon_point": mu}
    mu = (s_in.mean() - s_out.mean()) / sd
    se = math.sqrt(1 / n1 + 1 / n0 + mu * mu / (2 * (n1 + n0 - 2)))  # delta method for a standardised difference
    mu_lo = mu - Z_95 * se
    return {"mu": float(mu), "mu_lower": float(mu_lo), "epsilon": gdp_epsilon(mu_lo, delta),
            "epsilon_point": gdp_epsilon(mu, delta)}


def exact_epsilon(noise_multiplier: float, q: float, steps: int, delta: float) -> float:
    """The mechanism's ε by privacy loss distributions (tight), for the audit's denominator."""
    from privseg.privacy.accountant import StepEvent, epsilon_pld

    return float(epsilon_pld([StepEvent(q, noise_multiplier, steps)], delta))


# -- the canary site ------------------------------------------------------------------------------

@dataclass
class DiracCanary:
    """A canary patient whose per-patient gradient is ``magnitude * e_j`` (before clipping) on
    flat coordinate ``coordinate`` of the model's trainable parameters."""

    patient: str
    coordinate: int
    magnitude: float

    def install(self, engine, items: Sequence[dict]) -> None:
        """Make ``engine`` (a :class:`~privseg.privacy.PatientDPSGD`) give the canary patient's
        contribution as the Dirac gradient, clipped like any patient's; the other patients' clipped
        sum is the engine's own."""
        from privseg.privacy.engine import patient_groups

        if getattr(engine, "_canary", None) is not None:
            raise ConfigError("this engine already has a canary")
        engine._canary = self
        groups = patient_groups(items)
        ids = [str(items[g[0]].get("patient")) for g in groups]
        if self.patient not in ids:
            raise ConfigError(f"canary patient {self.patient} is not among the site's patients")
        original = engine._clipped_sum

        def clipped_sum(model, loss_fn, images, labels, owner, clip):
            chosen = _chosen_patients(engine, items, groups)
            canary_at = chosen.index(self.patient) if self.patient in chosen else None
            keep = owner != canary_at if canary_at is not None else torch.ones_like(owner, dtype=torch.bool)
            if bool(keep.any()):
                acc, norms, loss = original(model, loss_fn, images[keep], labels[keep], _renumber(owner[keep]), clip)
            else:
                params = [p for p in model.parameters() if p.requires_grad]
                acc, norms, loss = [torch.zeros_like(p) for p in params], torch.zeros(0, dtype=torch.float64), 0.0
            if canary_at is not None:
                scale = min(1.0, float(clip) / self.magnitude)
                _add_at(acc, self.coordinate, self.magnitude * scale)
                norms = torch.cat([norms.to(torch.float64), torch.tensor([self.magnitude], dtype=torch.float64)])
            return acc, norms, loss

        engine._clipped_sum = clipped_sum


def _chosen_patients(engine, items, groups) -> list[str]:
    """The patients the engine's Poisson sample holds at its current step (its own coins)."""
    coins = engine.noise.uniform("sample", engine.step_no, len(groups))
    return [str(items[g[0]].get("patient")) for g, c in zip(groups, coins, strict=True) if c < engine.q]


def _renumber(owner: torch.Tensor) -> torch.Tensor:
    _, inverse = torch.unique(owner, sorted=True, return_inverse=True)
    return inverse


def _add_at(tensors: Sequence[torch.Tensor], flat_index: int, value: float) -> None:
    offset = 0
    for t in tensors:
        if flat_index < offset + t.numel():
            t.view(-1)[flat_index - offset] += value
            return
        offset += t.numel()
    raise ConfigError(f"coordinate {flat_index} is past the model's {offset} parameters")


def quiet_coordinate(model: torch.nn.Module, grads: Sequence[torch.Tensor]) -> int:
    """The flat coordinate where the summed |gradient| of the other patients is smallest (where a
    Dirac canary stands out most), among the trainable parameters."""
    flat = torch.cat([g.detach().abs().reshape(-1) for g in grads])
    return int(torch.argmin(flat))


def observe_gradient(optimizer: torch.optim.Optimizer, coordinate: int) -> Callable[[], list[float]]:
    """Record coordinate ``coordinate`` of the gradient each time ``optimizer`` steps (the
    privatised gradient, before the optimiser's post-processing); returns a reader."""
    seen: list[float] = []

    def hook(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"]]
        offset = 0
        for p in params:
            if coordinate < offset + p.numel():
                seen.append(float(p.grad.reshape(-1)[coordinate - offset]) if p.grad is not None else 0.0)
                return
            offset += p.numel()

    optimizer.register_step_pre_hook(hook)
    return lambda: list(seen)
