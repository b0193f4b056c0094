"""The configuration of one federated run, stored as ``runs/<name>/fl_config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from privseg.errors import ConfigError, DataError
from privseg.federated.sites import SiteSpec
from privseg.federated.strategies import FL_STRATEGIES, strategy_param_names
from privseg.privacy.spec import DPConfig
from privseg.train.loop import TrainConfig
from privseg.utils import check_id, setting, write_json

CONFIG_NAME = "fl_config.json"


@dataclass
class FLConfig:
    """Everything a federated run needs besides the data.

    ``train`` is the foundation's :class:`TrainConfig` (model, patch size, batch shape, lr,
    seed); each round every chosen site runs ``local_steps`` of :func:`train_steps` on it.
    ``min_sites``: a round is applied when at least this many sites return an update (the
    others may fail or time out); fewer, and the global model stays as it was for that round.
    ``keep_updates`` writes every site's update per round under ``updates/`` so an erasure
    can later be traced to (and undone from) the rounds a site took part in.
    ``privacy``: the run's differential-privacy spec (None: no DP), built once and validated;
    the ServerApp sends it to the ClientApps (:meth:`DPConfig.to_run_config`). A config written
    before it had this field kept it in ``train.extra["dp"]``: it is moved here on load.
    The help texts of the fields `privseg fl run` sets (``--rounds``, ``--mu`` for
    ``proximal_mu``, ...) are in their metadata.
    """

    name: str
    sites: list[SiteSpec]
    train: TrainConfig
    strategy: str = setting("fedavg", "Aggregation strategy.", choices=FL_STRATEGIES)
    rounds: int = setting(20, "Federated rounds.", min=1)
    local_steps: int = setting(10, "Local optimisation steps per site per round.", min=1)
    proximal_mu: float = setting(0.01, "FedProx proximal weight.")
    min_sites: int = setting(1, "A round needs at least this many site updates.", min=1)
    fraction: float = setting(1.0, "Fraction of sites sampled per round.")
    round_timeout: float = setting(3600.0, "Seconds to wait for site replies in a round.")
    connect_timeout: float = 120.0
    eval_every: int = setting(1, "Evaluate on held-out subjects every N rounds (0: never).", min=0)
    eval_split: str = "test"
    keep_updates: bool = setting(False, "Store every site's update per round (for erasure tracing).")
    keep_checkpoints: int = 0  # 0: keep every round's global checkpoint
    cache_sites: int = 8  # preprocessed sites kept in memory per client worker
    extra: dict = field(default_factory=dict)
    strategy_params: dict = field(default_factory=dict)  # the strategy's own settings (see FL_STRATEGIES)
    privacy: DPConfig | None = None

    def __post_init__(self) -> None:
        check_id(self.name, "run name")
        self._migrate_privacy()
        self.strategy = self.strategy.lower()
        if self.strategy not in FL_STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r} is not one of {', '.join(FL_STRATEGIES)}")
        unknown = sorted(set(self.strategy_params) - strategy_param_names(self.strategy))
        if unknown:
            raise ConfigError(f"strategy {self.strategy!r} has no parameter(s) {', '.join(unknown)}")
        for k in ("rounds", "local_steps", "min_sites"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k.replace('_', '-')} must be at least 1 (got {getattr(self, k)})")
        if self.eval_every < 0 or self.keep_checkpoints < 0 or self.cache_sites < 1:
            raise ConfigError("eval-every and keep-checkpoints must be >= 0, cache-sites >= 1")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1] (got {self.fraction})")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0 (got {self.proximal_mu})")
        if self.round_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("round and connect timeouts must be positive")
        if self.eval_split not in ("train", "val", "test"):
            raise ConfigError(f"eval split {self.eval_split!r} is not train, val or test")
        if not self.sites:
            raise ConfigError("the federation has no sites")
        if self.privacy is not None and self.eval_split == "train":
            raise ConfigError("under DP a site releases nothing about its training patients that is not accounted: "
                              "evaluate on val or test (--eval-split), not train")
        if self.min_sites > len(self.sites):
            raise ConfigError(f"--min-sites {self.min_sites} is more than the {len(self.sites)} sites")

    def _migrate_privacy(self) -> None:
        """``privacy`` as a typed :class:`DPConfig`; an old config's ``train.extra["dp"]`` moves here."""
        if isinstance(self.privacy, dict):
            self.privacy = DPConfig.from_dict(self.privacy)
        if "dp" not in self.train.extra:
            return
        old = self.train.extra["dp"]
        self.train = replace(self.train, extra={k: v for k, v in self.train.extra.items() if k != "dp"})
        if not old:
            return
        old = old if isinstance(old, DPConfig) else DPConfig.from_dict(old)
        if self.privacy is not None and self.privacy != old:
            raise ConfigError("two different DP specs: FLConfig.privacy and train.extra['dp'] (give it once, "
                              "as privacy)")
        self.privacy = old

    @property
    def site_ids(self) -> list[str]:
        return [s.id for s in self.sites]

    def site(self, site_id: str) -> SiteSpec:
        for s in self.sites:
            if s.id == site_id:
                return s
        raise ConfigError(f"unknown site {site_id!r} (sites: {', '.join(self.site_ids)})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sites"] = [s.to_dict() for s in self.sites]
        d["train"] = self.train.to_dict()
        d["privacy"] = self.privacy.to_dict() if self.privacy is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FLConfig:
        d = dict(d)
        try:
            d["sites"] = [SiteSpec.from_dict(s) for s in d["sites"]]
            d["train"] = TrainConfig.from_dict(d["train"])
            d["privacy"] = DPConfig.from_dict(d["privacy"]) if d.get("privacy") else None
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"federated config is missing or has a malformed field ({exc})") from None
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CONFIG_NAME
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> FLConfig:
        path = Path(run_dir) / CONFIG_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DataError(path, "no federated run here (fl_config.json missing)") from None
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON ({exc})") from None

    def compatible_with(self, other: FLConfig) -> list[str]:
        """Differences that forbid resuming ``other``'s run with this config."""
        diffs = []
        for k in ("strategy",):
            if getattr(self, k) != getattr(other, k):
                diffs.append(f"{k}: {getattr(other, k)} -> {getattr(self, k)}")
        for k in ("model", "norm", "in_channels", "num_classes", "spatial_dims"):
            a, b = getattr(self.train, k), getattr(other.train, k)
            if a != b:
                diffs.append(f"{k}: {b} -> {a}")
        if self.privacy is not None or other.privacy is not None:
            diffs += self._privacy_diffs(other)
        return diffs

    def _privacy_diffs(self, other: FLConfig) -> list[str]:
        """Under DP, what the released rounds were planned with stays: the steps per round (the
        noise indices and the plan), the training settings, and the privacy spec. A budget changes
        only through ``privseg privacy budget`` (recorded in the ledger)."""
        diffs = []
        if self.local_steps != other.local_steps:
            diffs.append(f"local_steps: {other.local_steps} -> {self.local_steps}")
        if self.fraction != other.fraction:
            diffs.append(f"fraction: {other.fraction} -> {self.fraction}")
        mine, theirs = self.train.to_dict(), other.train.to_dict()
        diffs += [f"train.{k}: {theirs.get(k)} -> {mine.get(k)}" for k in sorted(set(mine) | set(theirs))
                  if k not in ("device", "steps", "checkpoint_every") and mine.get(k) != theirs.get(k)]
        a = self.privacy.to_dict() if self.privacy is not None else None
        b = other.privacy.to_dict() if other.privacy is not None else None
        if a is None or b is None:
            return [*diffs, f"privacy: {b} -> {a}"]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                hint = (" (change a budget with privseg privacy budget RUN --site SITE --epsilon E)"
                        if k in ("epsilon", "delta", "sites") else "")
                diffs.append(f"privacy.{k}: {b.get(k)} -> {a.get(k)}{hint}")
        return diffs
