"""Clip rules: fixed, private adaptive clipping to a target quantile of the norms, and normalising.

Normalising ("automatic clipping", Bu, Wang, Zha & Karypis, "Automatic Clipping: Differentially
Private Deep Learning Made Easier and Stronger", NeurIPS 2023; also Yang et al. 2022) scales every
contribution to ``C g_u / (||g_u|| + gamma)`` instead of ``g_u min(1, C/||g_u||)``: each
contribution has norm below ``C`` (so the sensitivity and the noise are those of a fixed clip at
``C``), there is no threshold to tune (``C`` only scales the update, which the learning rate --
or Adam's normalisation -- absorbs), and small gradients are not left small. ``gamma`` (default
``NORMALISE_GAMMA``, Bu et al.'s 0.01) keeps a near-zero gradient from being blown up to norm ``C``.

Adaptive clipping follows Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021 (Algorithm 1/2). With clip ``C`` and the
``m`` contributions of a step (patients' gradients, or sites' model updates):

    b_i   = 1[ ||Delta_i|| <= C ]                 (count the UNCLIPPED ones)
    b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2
                                                  (m: expected number of contributions)
    C    <- C * exp(-eta * (b_bar - gamma))       (geometric update toward quantile gamma)

If more than a fraction ``gamma`` is unclipped, ``C`` shrinks; if fewer, it grows: the fixed
point is the ``gamma``-quantile of the norms. (Counting *clipped* updates with this same
formula, as Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` does in flwr 1.41,
reverses the feedback: ``C`` runs away to 0 or infinity. ``benchmarks/privacy.py`` shows it.)

Privacy: what is noised and released is the *centred* count ``sum_i (b_i - 1/2)``: adding or
removing one unit moves it by exactly 1/2 (the plain count ``sum_i b_i`` moves by 1, which would
cost four times as much at the same ``sigma_b``; :func:`count_sensitivity` checks it). Releasing
it with std ``sigma_b`` and the clipped sum with multiplier ``z_delta`` is, by
composition of Gaussian mechanisms (Andrew et al., Thm. 1; Mironov 2017), one Gaussian
mechanism with multiplier ``z`` where ``z^-2 = z_delta^-2 + (2 sigma_b)^-2``. So for a target
``z`` the update gets

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)        (requires z < 2 sigma_b)

and the accountant books ``(q, z)`` for the step: the quantile estimate is paid for.
Andrew et al.'s gamma = 0.5, eta = 0.2 (the defaults of the spec's ``target_quantile``, ``clip_lr``),
sigma_b = m / 20 -- *when that is feasible*. With the few
patients per step of a hospital (m = q n ~ 2-20) m/20 would force z < m/10, i.e. almost no noise
and a useless budget; privseg then raises sigma_b to the value at which the update's noise is
inflated by 10 % (``z_delta = 1.1 z``): ``sigma_b = z / (2 sqrt(1 - 1.1^-2))`` ~ 1.2 z
(:func:`default_sigma_b`). The count is noisier per step, but the geometric update averages it
over many steps (the quantile test in tests/privacy/test_privacy.py uses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from privseg.errors import ConfigError
from privseg.utils import registrar


def split_noise(z: float, sigma_b: float) -> float:
    """Noise multiplier of the update, ``z_delta``, given the total budget-equivalent ``z`` and the
    count's noise std ``sigma_b`` (Andrew et al. 2021, Sec. 3.1)."""
    if z <= 0:
        raise ConfigError(f"noise multiplier {z} must be positive for adaptive clipping")
    if sigma_b <= 0:
        raise ConfigError(f"count noise sigma_b={sigma_b} must be positive")
    count_z = sigma_b / COUNT_SENSITIVITY  # the count's own noise multiplier
    if not z < count_z:
        raise ConfigError(f"adaptive clipping needs noise multiplier z={z:.4g} < 2*sigma_b={count_z:.4g}: "
                          "use more units per step (sigma_b = m/20), or --clip fixed")
    return (z ** -2 - count_z ** -2) ** -0.5


def default_sigma_b(m: float, z: float, inflation: float = 1.1) -> float:
    """Andrew et al.'s ``m/20``, or -- when that leaves too little room for ``z`` -- the ``sigma_b``
    at which the update noise is inflated by ``inflation`` (see the module docstring)."""
    need = z / (2.0 * math.sqrt(1.0 - inflation ** -2)) if z > 0 else 0.0
    return max(m / 20.0, need)


COUNT_SENSITIVITY = 0.5  # of the centred count; split_noise's (2 sigma_b)^-2 is (sigma_b / 0.5)^-2


def count_sensitivity(clipper: QuantileClipper, norms: list[float], candidates: list[float]) -> float:
    """Largest change of the released count statistic when one unit (norm from ``candidates``) is
    added to or removed from ``norms``: the add/remove sensitivity the accountant must book."""
    base = clipper.centred_count(norms)
    worst = 0.0
    for c in candidates:
        worst = max(worst, abs(clipper.centred_count([*norms, c]) - base))
    for i in range(len(norms)):
        worst = max(worst, abs(clipper.centred_count(norms[:i] + norms[i + 1:]) - base))
    return worst


NORMALISE_GAMMA = 0.01  # Bu et al. 2023's stability constant of the normalising rule


@dataclass(frozen=True)
class Normalising:
    """The ``clip`` a per-subject method gets under the normalising rule: scale every contribution
    to ``C g / (||g|| + gamma)`` (Bu et al. 2023); ``float()`` of it is ``C``."""

    clip: float
    gamma: float = NORMALISE_GAMMA

    def __float__(self) -> float:
        return float(self.clip)


def clip_factors(norms: torch.Tensor, clip: float | Normalising) -> torch.Tensor:
    """Per-unit scale: ``min(1, C / ||g||)`` (Abadi et al. 2016), or ``C / (||g|| + gamma)`` for
    :class:`Normalising` (Bu et al. 2023). Either way a unit's scaled norm stays below ``C``."""
    if isinstance(clip, Normalising):
        return clip.clip / (torch.as_tensor(norms) + clip.gamma)
    return torch.clamp(clip / (norms + 1e-12), max=1.0)


@dataclass
class QuantileClipper:
    """Private geometric quantile tracking of the clip norm (Andrew et al. 2021).

    ``expected_m``: the expected number of contributions per step (Poisson: q*n) used as the
    denominator ``m`` and for the default ``sigma_b = m/20``. ``update`` takes the norms of one
    step's contributions, returns the noisy unclipped fraction, and moves ``clip``. The settings'
    defaults are the run's (:class:`~privseg.privacy.spec.DPConfig`: ``clip_norm``,
    ``target_quantile``, ``clip_lr``, ``sigma_b``)."""

    clip: float
    target_quantile: float
    lr: float
    expected_m: float
    sigma_b: float | None = None
    generator: torch.Generator | None = None
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.clip <= 0:
            raise ConfigError(f"initial clip norm {self.clip} must be positive")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"target quantile {self.target_quantile} must be in (0, 1)")
        if self.lr <= 0:
            raise ConfigError(f"clip learning rate {self.lr} must be positive")
        if self.expected_m <= 0:
            raise ConfigError(f"expected contributions per step {self.expected_m} must be positive")
        if self.sigma_b is None:
            self.sigma_b = self.expected_m / 20.0

    @property
    def count_noise(self) -> float:
        """The released count's noise per expected contribution, ``sigma_b / m`` (Andrew et al. work
        at 1/20; near 1/2 the clip wanders far from the quantile)."""
        return float(self.sigma_b) / self.expected_m

    def update_noise_multiplier(self, z: float) -> float:
        """The multiplier to use on the clipped sum so that the step (sum + count) costs ``z``."""
        return split_noise(z, float(self.sigma_b))

    def centred_count(self, norms: torch.Tensor | list[float]) -> float:
        """The statistic that is noised: ``sum_i (b_i - 1/2)``, sensitivity 1/2."""
        norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
        return float((norms <= self.clip).sum()) - 0.5 * len(norms)  # b_i = 1[||Delta_i|| <= C]

    def update(self, norms: torch.Tensor | list[float], draw: float | None = None) -> float:
        """``draw``: the step's standard normal draw for the count noise (from the site's secret
        :class:`~privseg.privacy.noise.NoiseSource`); without it, ``generator`` is used."""
        if draw is None:
            draw = float(torch.randn((), generator=self.generator, dtype=torch.float64))
        frac = (self.centred_count(norms) + float(draw) * float(self.sigma_b)) / self.expected_m + 0.5
        self.clip = self.clip * math.exp(-self.lr * (frac - self.target_quantile))
        self.history.append(self.clip)
        return frac

    def state(self) -> dict:
        return {"clip": self.clip, "target_quantile": self.target_quantile, "lr": self.lr,
                "expected_m": self.expected_m, "sigma_b": self.sigma_b}


# -- clip rules: one registry, one signature ----------------------------------------------------
#
# A rule is a factory ``(clip_norm, expected_m, z_max, options) -> clipper``; a clipper has
# ``clip`` (the current norm), ``update_noise_multiplier(z)`` (the update's share of the step's
# noise) and ``update(norms, draw)`` (after the step; ``draw`` is the step's secret N(0, 1) draw
# for any noise the rule itself releases); optionally ``scale`` (what the per-subject method gets
# as its ``clip``: default the norm ``clip``, a :class:`Normalising` for the normalising rule) and
# ``count_noise`` (a rule that releases a noisy statistic of the norms: its noise per contribution,
# which the plan warns about when it is mostly noise).
# A new rule is one decorated function here or anywhere.

ClipRule = Callable[[float, float, float, dict], object]
CLIP_RULES: dict[str, ClipRule] = {}


def clip_rule(name: str) -> Callable[[ClipRule], ClipRule]:
    return registrar(CLIP_RULES, name, kind="clip rule")


def make_clipper(rule: str, clip_norm: float, expected_m: float, z_max: float, options: dict | None = None):
    """The clipper of rule ``rule``; ``options``: the rule's settings as the run's spec has them
    (:meth:`privseg.privacy.spec.DPConfig.clip_options`: ``target_quantile``, ``clip_lr``, ``sigma_b``,
    ``gamma``)."""
    if rule not in CLIP_RULES:
        raise ConfigError(f"--clip {rule!r} is not one of {', '.join(sorted(CLIP_RULES))}")
    return CLIP_RULES[rule](float(clip_norm), float(expected_m), float(z_max), dict(options or {}))


@dataclass
class FixedClipper:
    """Clip at a fixed norm (Abadi et al. 2016): the whole step's noise goes on the update."""

    clip: float

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"clip norm {self.clip} must be positive")

    def update_noise_multiplier(self, z: float) -> float:
        return z

    def update(self, norms, draw: float | None = None) -> None:
        return None


@clip_rule("fixed")
def _fixed(clip_norm: float, expected_m: float, z_max: float, options: dict) -> FixedClipper:
    return FixedClipper(clip_norm)


@dataclass
class NormalisingClipper(FixedClipper):
    """Normalise every contribution to ``C g / (||g|| + gamma)`` (Bu et al. 2023): sensitivity
    ``C``, so the whole step's noise goes on the update, as for a fixed clip."""

    gamma: float = NORMALISE_GAMMA

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gamma > 0:
            raise ConfigError(f"normalising clip gamma {self.gamma} must be positive")

    @property
    def scale(self) -> Normalising:
        return Normalising(self.clip, self.gamma)


@clip_rule("normalise")
def _normalise(clip_norm: float, expected_m: float, z_max: float, options: dict) -> NormalisingClipper:
    return NormalisingClipper(clip_norm, float(options.get("gamma") or NORMALISE_GAMMA))


@clip_rule("adaptive")
def _adaptive(clip_norm: float, expected_m: float, z_max: float, options: dict) -> QuantileClipper:
    sigma_b = options.get("sigma_b")
    return QuantileClipper(clip=clip_norm, target_quantile=float(options["target_quantile"]),
                           lr=float(options["clip_lr"]), expected_m=expected_m,
                           sigma_b=sigma_b if sigma_b is not None else default_sigma_b(expected_m, z_max))
