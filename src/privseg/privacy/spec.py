"""The privacy spec: every DP setting of a run in one typed, validated object, built once.

A federated run keeps it as ``FLConfig.privacy`` (``fl_config.json``: ``"privacy"``); the
ServerApp sends it to every ClientApp as flat ``dp-*`` keys of the run configuration
(:meth:`DPConfig.to_run_config`), and the ClientApp builds it back once
(:meth:`DPConfig.from_run_config`) -- in simulation and deployment alike. It is what
:func:`privseg.privacy.make_private` takes. Units, neighbouring relation and releases:
``docs/privacy.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from privseg.errors import ConfigError
from privseg.privacy.accountant import SCHEDULES, check_delta, check_epsilon
from privseg.privacy.clipping import CLIP_RULES
from privseg.privacy.grad_sample import GRAD_METHODS
from privseg.utils import setting

RUN_CONFIG_PREFIX = "dp-"  # the spec's keys in a Flower run configuration / ConfigRecord
_SITES_KEY = RUN_CONFIG_PREFIX + "sites."  # per-site overrides: dp-sites.<SITE>.epsilon / .delta
SITE_KEYS = ("epsilon", "delta", "cohort_size")  # what a site may set for itself
PLANS = ("auto", "none")
# what a spec saved (or sent) before the recipe existed ran with: it has no "plan" key
LEGACY = {"plan": "none", "aug_mult": 0, "ema": 0.0}


def _legacy(d: dict) -> dict:
    return d if "plan" in d else {**LEGACY, **d}


@dataclass
class DPConfig:
    """Differential-privacy settings of a run (JSON-serialisable; a federated run's ``FLConfig.privacy``).

    ``unit``: ``patient`` (DP-SGD inside each site) or ``site`` (client-level DP-FedAvg at the
    server, :mod:`privseg.privacy.client_dp`). ``epsilon``/``delta``: the budget (per site for
    ``patient``); ``sites`` overrides them per site, e.g. ``{"H2": {"epsilon": 3}}`` -- a
    hospital can demand a stricter budget. ``clip``: a rule of :data:`~privseg.privacy.clipping.CLIP_RULES`:
    ``normalise`` (``C g / (||g|| + gamma)``), ``fixed`` (at ``clip_norm``) or ``adaptive`` (starting at ``clip_norm``,
    tracking quantile ``target_quantile`` with learning rate ``clip_lr`` and count noise
    ``sigma_b``, None: m/20 where feasible, :func:`~privseg.privacy.clipping.default_sigma_b`). ``noise_schedule``:
    ``constant`` or ``decay`` (linear to ``decay_ratio`` x the first step's noise), calibrated to
    spend the budget over the planned steps; ``noise_multiplier`` fixes it instead (then the
    ledger stops the run when the budget runs out). ``plan``: ``auto`` -- the step planner
    (:func:`privseg.privacy.plan.plan_training`: sampling rate from the ``epochs`` budget and the
    steps, noise calibrated, learning rate scaled to the noise, all from public figures and the
    ``cohort_size`` the site declares public, never its exact n) -- or ``none`` (q defaults to
    ``subjects_per_step / n``, which reveals n). ``sampling_rate`` ``q`` fixes q either way.
    ``aug_mult``: patches per patient file averaged before the one clip (De et al. 2022); 0: the
    training config's ``patches_per_subject``, as before it existed. A spec saved before these
    settings existed (no ``plan`` key) keeps what it ran with (``LEGACY``).
    ``ema``: decay of the weight average served as the model (post-processing; 0: off).
    ``erasure_reserve``: rounds' worth of local DP steps each site keeps for erasures (a federated
    run's plan calibrates the noise so that training and the reserve spend the budget together;
    only an erasure's releases may spend it).
    ``allow_large_delta`` permits delta >= 1/n. ``reproducible_noise``:
noise from the public seed, for tests/benchmarks only (the run is "not private").
    ``ledger_root``/``ledger_scope``: a derived run (an erasure's retrain or calibration) books each
    site's spend in ``<ledger_root>/sites/<site>/privacy.sqlite`` -- the site's own ledger -- under
    its scope, at the noise of the site's original plan. The help texts of the fields the commands
    set (``--epsilon``, ``--dp-method`` for ``method``, ...) are in their metadata. Each default is
    written here, on its field, and read from it elsewhere (:func:`dp_default`)."""

    unit: str = setting("patient", "DP unit: patient (DP-SGD in each site) or site (DP-FedAvg at the server).")
    epsilon: float = setting(8.0, "Privacy budget epsilon (per site).")
    delta: float = setting(1e-5, "delta; must be below 1/(patients at the site).")
    # The clip rule of the recipe benchmarked in privacy_utility (version 2's recipe arm). Not adaptive:
    # privacy_utility version 1 (144 cells, a875fc5) measured adaptive below a fixed clip at every
    # epsilon, and at the few patients a step of a hospital site (q n ~ 2-3 in the recipe at n 12) its count is
    # mostly noise (AdaptiveClipNoiseWarning). Fixed vs normalise inside the recipe: the benchmark's clip cells,
    # key clip_rule_choice (pending). The recipe's defaults (this, aug_mult, ema) are provisional until
    # benchmarks/privacy_utility.py measures them (issue 26).
    clip: str = setting("normalise", "Clip rule (normalise: C g/(|g|+gamma), Bu et al. 2023; adaptive: a private "
                        "quantile, Andrew et al. 2021, needs many patients per step).", choices=CLIP_RULES)
    clip_norm: float = setting(1.0, "Clip norm (adaptive: its starting value).")
    target_quantile: float = setting(0.5, "Adaptive clip: target quantile of the norms.")
    clip_lr: float = 0.2
    sigma_b: float | None = None
    noise_schedule: str = setting("constant", "Noise schedule (decay: calibrated to the budget).", choices=SCHEDULES)
    decay_ratio: float = 0.5
    noise_multiplier: float | None = None
    sampling_rate: float | None = setting(None, "Public Poisson sampling rate q of patients per step (default: "
                                          "the plan's; with --plan none, subjects-per-step / n, which reveals n).")
    plan: str = setting("auto", "DP step plan: auto (sampling rate, noise and learning rate from epsilon, delta, "
                        "the epoch budget, the steps and the declared cohort size) or none.")
    cohort_size: int | None = setting(None, "Patients per site declared public for the plan (rounded down to 2 "
                                      "significant digits; never the exact count).", min=1)
    epochs: float | None = setting(None, "DP plan: the compute budget in epochs (expected passes over each patient); "
                                   "q = epochs / steps (default: the planner's).")
    # K = 4: De et al. 2022 gain most from the first few (they use up to 16)
    aug_mult: int = setting(4, "Augmented patches per patient file averaged before the one clip (augmentation "
                            "multiplicity, De et al. 2022).", min=1)
    # 0.999: with the warm-up of privseg.train.ema, the average spans ~min(t/10, 1000) steps
    ema: float = setting(0.999, "Decay of the weight EMA served as the model under DP (0: serve the last "
                         "weights).", min=0)
    # 2: one patient erasure with the default method (scrub: its DP fine-tuning, one round's steps, and one
    # repair round at every site) spends 2 rounds' worth of local steps at the erasing site
    # (privseg.erasure.private.dp_steps; tests/erasure/test_private_erasure.py checks the two agree)
    erasure_reserve: float = setting(2.0, "Federated runs: rounds' worth of local DP steps each site's "
                                     "budget keeps for erasures; the noise is calibrated so that training and the "
                                     "reserve together spend the budget (0: no reserve).", min=0)
    clip_gamma: float | None = None
    method: str = setting("loop", "Per-subject gradients (speeds: benchmarks/results/privacy.md).",
                          choices=GRAD_METHODS)
    allow_large_delta: bool = setting(False, "Allow delta >= 1/n (not recommended).")
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
        if self.clip not in CLIP_RULES:
            raise ConfigError(f"--clip {self.clip!r} is not one of {', '.join(sorted(CLIP_RULES))}")
        if not self.clip_norm > 0:
            raise ConfigError(f"--clip-norm {self.clip_norm} must be positive")
        if self.method not in GRAD_METHODS:
            raise ConfigError(f"DP method {self.method!r} is not one of {', '.join(GRAD_METHODS)}")
        if self.sampling_rate is not None and not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"sampling rate {self.sampling_rate} must be in (0, 1]")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise multiplier {self.noise_multiplier} must be positive")
        if self.plan not in PLANS:
            raise ConfigError(f"--plan {self.plan!r} is not one of {', '.join(PLANS)}")
        if self.cohort_size is not None and int(self.cohort_size) < 1:
            raise ConfigError(f"--cohort-size {self.cohort_size} must be at least 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs {self.epochs} must be positive")
        if int(self.aug_mult) < 0:
            raise ConfigError(f"--aug-mult {self.aug_mult} must be at least 1 (0: --patches-per-subject)")
        if not float(self.erasure_reserve) >= 0:
            raise ConfigError(f"--erasure-reserve {self.erasure_reserve} must be 0 or more")
        if not 0 <= float(self.ema) < 1:
            raise ConfigError(f"--ema {self.ema} must be in [0, 1)")
        if self.noise_schedule not in SCHEDULES:
            raise ConfigError(f"noise schedule {self.noise_schedule!r} is not one of {', '.join(SCHEDULES)}")
        for site, over in self.sites.items():
            bad = set(over) - set(SITE_KEYS)
            if bad:
                raise ConfigError(f"per-site DP override for {site!r} has unknown keys {sorted(bad)} "
                                  f"(only {', '.join(SITE_KEYS)})")
            if over.get("cohort_size") is not None and int(over["cohort_size"]) < 1:
                raise ConfigError(f"cohort size of site {site} must be at least 1")
            if "epsilon" in over:
                check_epsilon(over["epsilon"], f"epsilon of site {site}")
            if "delta" in over:
                check_delta(over["delta"], what=f"delta of site {site}")

    def clip_options(self) -> dict:
        """The clip rule's own settings, as :func:`~privseg.privacy.clipping.make_clipper` takes them."""
        return {"target_quantile": self.target_quantile, "clip_lr": self.clip_lr, "sigma_b": self.sigma_b,
                "gamma": self.clip_gamma}

    def for_site(self, site: str) -> DPConfig:
        over = self.sites.get(site, {})
        size = over.get("cohort_size", self.cohort_size)
        return replace(self, epsilon=float(over.get("epsilon", self.epsilon)),
                       delta=float(over.get("delta", self.delta)), cohort_size=int(size) if size else None)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_run_config(self) -> dict:
        """The spec as flat ``dp-*`` keys with Flower config values (str, int, float, bool), as the
        ServerApp sends it to every ClientApp: ``dp-epsilon``, ``dp-clip-norm``, ...; a setting
        that is None is left out; a per-site override is ``dp-sites.<SITE>.epsilon`` / ``.delta``.
        :meth:`from_run_config` reads it back to an equal spec."""
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sites":
                out.update({f"{_SITES_KEY}{site}.{k}": v for site, over in value.items() for k, v in over.items()})
            elif value is not None:
                out[RUN_CONFIG_PREFIX + f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_run_config(cls, config: Mapping) -> DPConfig | None:
        """The spec from the ``dp-*`` keys of a run configuration (:meth:`to_run_config`); None
        when it has none (no DP). Unknown ``dp-*`` keys are refused."""
        names = {RUN_CONFIG_PREFIX + f.name.replace("_", "-"): f.name for f in fields(cls) if f.name != "sites"}
        d: dict = {"sites": {}}
        for key in config.keys():
            key = str(key)
            if key.startswith(_SITES_KEY):
                site, _, what = key[len(_SITES_KEY):].rpartition(".")
                d["sites"].setdefault(site, {})[what] = config[key]
            elif key in names:
                d[names[key]] = config[key]
            elif key.startswith(RUN_CONFIG_PREFIX):
                raise ConfigError(f"run config key {key!r} is not a DP setting")
        return cls(**_legacy(d)) if len(d) > 1 or d["sites"] else None

    @classmethod
    def from_options(cls, *, site_budget: list[str] | None = None, config_file: str | Path | None = None,
                     **settings) -> DPConfig:
        """The spec from command-line style options: ``settings`` fields of :class:`DPConfig` by name
        (a None leaves the field's default), ``site_budget`` items ``SITE=EPS[,DELTA]``,
        ``config_file`` a JSON file of settings (``{"sites": {"H2": {"epsilon": 3, "cohort_size":
        40}}}``)."""
        d = {k: v for k, v in settings.items() if v is not None}
        d["sites"] = {}
        if config_file:
            try:
                extra = json.loads(Path(config_file).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"--dp-config {config_file}: cannot read JSON ({exc})") from None
            if not isinstance(extra, dict):
                raise ConfigError(f"--dp-config {config_file}: expected a JSON object")
            sites = extra.pop("sites", {})
            d.update(extra)
            d["sites"].update(sites)
        for item in site_budget or []:
            try:
                site, val = item.split("=", 1)
                parts = val.split(",")
                d["sites"].setdefault(site, {}).update({"epsilon": float(parts[0]),
                                                        **({"delta": float(parts[1])} if len(parts) > 1 else {})})
            except ValueError:
                raise ConfigError(f"--site-budget {item!r}: expected SITE=EPSILON or SITE=EPSILON,DELTA") from None
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_dict(cls, d: dict) -> DPConfig:
        known = _legacy({k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        return cls(**known)


def dp_default(name: str):
    """The default of :class:`DPConfig`'s field ``name``: written once, on the field."""
    return DPConfig.__dataclass_fields__[name].default


def dp_from_options(*, dp: str = "none", dp_method: str | None = None, site_budget: list[str] | None = None,
                    dp_config: str | Path | None = None, **settings) -> DPConfig | None:
    """:meth:`DPConfig.from_options` from the options named as the commands name them
    (``--dp`` for ``unit``, ``--dp-method`` for ``method``, ``--dp-config``, the rest by field
    name); ``dp="none"``: no DP (None)."""
    if dp == "none":
        return None
    return DPConfig.from_options(unit=dp, method=dp_method, site_budget=site_budget, config_file=dp_config,
                                 **settings)
