"""Lower bounds on ε from a DP audit's scores, and the mechanism's exact ε to set them against.

An audit runs the mechanism many times in two worlds -- with the canary ("in") and without it
("out") -- and scores each output (higher = more like "in"); :mod:`privseg.audit.dp` makes the
trials on the real site path. An (ε, δ)-DP mechanism bounds every test's true and false positive
rates: ``TPR <= e^ε FPR + δ`` (Kairouz, Oh & Viswanath 2015), so measured rates give a lower bound
on ε. Two estimators, each a bound that holds with 95 % confidence:

* **Clopper--Pearson** (Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine
  Learning: How Private is Private SGD?", NeurIPS 2020; Nasr, Song, Thakurta, Papernot & Carlini,
  "Adversary Instantiation: Lower Bounds for Differentially Private Machine Learning", IEEE S&P
  2021): ``ε >= log((TPR_lo - δ) / FPR_hi)`` with exact binomial confidence bounds on the two
  rates at a threshold; the threshold is chosen on one half of each world's trials and the bound
  computed on the other (:func:`cp_lower_bound`), so it is not tuned on the data it reports.
* **Gaussian DP** (Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022; used for audits
  by Nasr, Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini & Terzis, "Tight Auditing of
  Differentially Private Machine Learning", USENIX Security 2023): when the scores are Gaussian
  with a common spread (the Dirac canary's coordinate), the mechanism is ``μ``-GDP with
  ``μ = (mean_in - mean_out) / sd``; a one-sided lower confidence bound on ``μ`` gives ε at δ
  through GDP's exact trade-off curve (:func:`gdp_lower_bound`, :func:`gdp_epsilon`).

:func:`empirical_epsilon` reports both and their maximum (each is a valid 95 % bound). A lower
bound is compared with the mechanism's exact ε by privacy loss distributions
(:func:`exact_epsilon`), not with the RDP figure a ledger books (an upper bound: 4.00 booked is
3.70 exact for one step at q = 1).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta, norm

from privseg.errors import ConfigError
from privseg.privacy.accountant import StepEvent, epsilon_pld

Z_95 = 1.6448536269514722  # one-sided 95 %


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` Clopper--Pearson interval of a binomial proportion ``k / n``."""
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
    # e^eps Phi(.) in log space: a strong canary has mu in the hundreds
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(min(eps + norm.logcdf(-eps / mu - mu / 2), 700.0)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with ``δ(ε) <= delta`` for ``μ``-GDP (0 when ``μ <= 0``)."""
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
    return float(epsilon_pld([StepEvent(q, noise_multiplier, steps)], delta))


def empirical_epsilon(s_in, s_out, delta: float) -> dict:
    """Both lower bounds on ε at ``delta`` from the two worlds' scores (higher = "in"):
    ``{"gdp": gdp_lower_bound(...), "clopper_pearson": cp_lower_bound(...), "lower_bound": the larger ε}``."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta {delta} is not in (0, 1)")
    gdp, cp = gdp_lower_bound(s_in, s_out, delta), cp_lower_bound(s_in, s_out, delta)
    return {"gdp": gdp, "clopper_pearson": cp, "lower_bound": max(gdp["epsilon"], cp["epsilon"])}
