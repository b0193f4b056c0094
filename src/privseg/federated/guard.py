"""Poisoning guard: the server refuses site updates that cannot be honest, and says why.

A site's update is ``Delta_k = w_k - w`` (its returned weights minus the global weights of the
round, over the floating-point entries both hold). Before any averaging, clipping or noise
(the guard runs as the *first* of the strategy's ``update_hooks``), every reply is checked:

1. **Malformed** -- no weights, an entry missing from or unknown to the global model, or a
   shape that differs from it: always rejected.
2. **Non-finite** -- any NaN or Inf in the returned weights: always rejected (one such update
   would turn the averaged model into NaN everywhere).
3. **Norm outlier** -- ``||Delta_k|| > k * median_j ||Delta_j||`` over the round's finite
   updates, with ``k = 10`` by default, applied only when at least ``min_sites = 3`` finite
   updates arrived (with two sites there is no majority to say which one is odd).
   Honest sites training the same model for the same number of local steps move it by
   comparable amounts: privseg's optimiser is AdamW, whose per-coordinate step is about the
   learning rate whatever the data, so an honest update's norm is near ``lr * sqrt(d)`` per
   local step (tests/federated/test_guard_security.py measures a max/min ratio of 1.00 across three sites after
   a round). A scaled (boosted) model-replacement attack needs a factor of about the number of
   sites or more to dominate the average; with a handful of hospitals k = 10 leaves a wide
   margin for honest heterogeneity and still catches such boosting. A poisoned update with a
   *normal* norm is not caught by this rule (nor meant to be).
4. **Absolute cap** -- optional ``max_norm``: ``||Delta_k|| > max_norm`` is rejected whatever
   the others sent (e.g. a multiple of the clip under client-level DP).

Under client-level DP (:mod:`privseg.privacy.client_dp`) rules 3 and the "too few left" rule
are off: they compare a site with the others before its update is clipped, so one site could
decide whether another's update counts (moving the sum by 2C, beyond what the noise covers).
Rules 1, 2 and 4 look at one site's update alone and stay on.

A rejected site is left out of the average for that round, logged as a warning on the
``privseg.federated.guard`` logger, kept in :attr:`UpdateGuard.rejected` (round, site, reason,
norm, median) and, when a run folder is known, appended to ``<run>/guard.jsonl``. If fewer
than the strategy's minimum number of sites remain, the round is not applied at all (the
server then keeps the global model, as for too few replies).

Configuration: ``FLConfig.extra["guard"]`` = ``{"enabled": true, "k": 10.0, "min_sites": 3,
"max_norm": null}``; :func:`attach_guard` reads it. The guard is on by default.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from privseg.errors import ConfigError

log = logging.getLogger("privseg.federated.guard")

DEFAULT_K = 10.0
DEFAULT_MIN_SITES = 3
GUARD_LOG = "guard.jsonl"


@dataclass
class GuardConfig:
    """Thresholds of the poisoning guard (see the module docstring)."""

    enabled: bool = True
    k: float = DEFAULT_K
    min_sites: int = DEFAULT_MIN_SITES
    max_norm: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, float)) and math.isfinite(self.k) and self.k > 1):
            raise ConfigError(f"guard k must be a finite number above 1 (got {self.k!r})")
        if not isinstance(self.min_sites, int) or self.min_sites < 2:
            raise ConfigError(f"guard min_sites must be an integer of at least 2 (got {self.min_sites!r})")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"guard max_norm must be positive (got {self.max_norm!r})")

    @classmethod
    def from_dict(cls, d: dict | None) -> GuardConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"guard: unknown setting(s) {sorted(unknown)} (known: enabled, k, min_sites, max_norm)")
        return cls(**d)


def _site(msg: Message) -> str:
    try:
        if msg.has_content() and "site" in msg.content.config_records:
            return str(msg.content["site"]["site"])
    except (KeyError, TypeError):
        pass
    return f"node-{msg.metadata.src_node_id}"


def update_norm(msg: Message, global_arrays: ArrayRecord | None) -> tuple[float | None, str | None]:
    """(L2 norm of the update, None) or (None, reason) when the reply cannot be used."""
    try:
        records = msg.content.array_records
    except Exception:  # noqa: BLE001 - a reply without content
        return None, "reply has no weights"
    if len(records) != 1:
        return None, f"reply has {len(records)} weight records (expected 1)"
    arrays = next(iter(records.values()))
    glob = global_arrays
    total = 0.0
    for key in arrays.keys():
        try:
            a = arrays[key].numpy()
        except Exception as exc:  # noqa: BLE001 - undecodable bytes
            return None, f"entry {key!r} cannot be decoded ({type(exc).__name__})"
        if glob is not None:
            if key not in glob:
                return None, f"entry {key!r} is not part of the global model"
            g = glob[key].numpy()
            if a.shape != g.shape:
                return None, f"entry {key!r} has shape {a.shape}, the global model {g.shape}"
        if a.dtype.kind not in "fc":
            continue
        if not np.all(np.isfinite(a)):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            return None, f"non-finite update: {bad} NaN/Inf value(s) in {key!r}"
        d = a.astype(np.float64) - (glob[key].numpy().astype(np.float64) if glob is not None else 0.0)
        total += float(np.dot(d.ravel(), d.ravel()))
    if not math.isfinite(total):
        return None, "non-finite update norm (overflow)"
    return math.sqrt(total), None


@dataclass
class UpdateGuard:
    """The update hook ``(server_round, replies, global_arrays) -> replies`` (module docstring)."""

    config: GuardConfig = field(default_factory=GuardConfig)
    min_keep: int = 1
    log_path: Path | None = None
    rejected: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    # Under client-level DP only per-site rules may run before clipping: a rule that compares a site
    # with the others (median, too few left) lets one site decide whether another's update counts.
    cross_site: bool = True

    def __call__(self, server_round: int, replies: Sequence[Message], global_arrays: ArrayRecord | None):
        replies = list(replies)
        if not self.config.enabled or not replies:
            return replies
        cfg = self.config
        norms: dict[int, float] = {}
        reasons: dict[int, str] = {}
        for i, msg in enumerate(replies):
            norm, why = update_norm(msg, global_arrays)
            if why is not None:
                reasons[i] = why
            else:
                norms[i] = float(norm)
        median = float(np.median(list(norms.values()))) if norms else math.nan
        if self.cross_site and len(norms) >= cfg.min_sites and median > 0:
            for i, n in norms.items():
                if n > cfg.k * median:
                    reasons[i] = (f"update norm {n:.4g} is {n / median:.1f} x the median {median:.4g} of "
                                  f"{len(norms)} sites (limit {cfg.k:g} x)")
        if cfg.max_norm is not None:
            for i, n in norms.items():
                if i not in reasons and n > cfg.max_norm:
                    reasons[i] = f"update norm {n:.4g} is above the cap {cfg.max_norm:g}"
        kept = [m for i, m in enumerate(replies) if i not in reasons]
        entries = [{"round": int(server_round), "site": _site(replies[i]), "reason": r, "norm": norms.get(i),
                    "median": median if math.isfinite(median) else None, "time": time.time()}
                   for i, r in sorted(reasons.items())]
        for e in entries:
            log.warning("round %s: update of site %s rejected: %s", e["round"], e["site"], e["reason"])
        if self.cross_site and entries and len(kept) < self.min_keep:
            log.warning("round %s: %d site(s) left after the guard, fewer than %d: round not applied",
                        server_round, len(kept), self.min_keep)
            for e in entries:
                e["round_dropped"] = True
            kept = []
        self.rejected.extend(entries)
        self.history.append({"round": int(server_round), "norms": {_site(replies[i]): n for i, n in norms.items()},
                             "median": median if math.isfinite(median) else None,
                             "rejected": [e["site"] for e in entries]})
        if entries and self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as fh:
                for e in entries:
                    fh.write(json.dumps(e) + "\n")
        return kept

    def rejected_in(self, server_round: int) -> list[dict]:
        return [e for e in self.rejected if e["round"] == server_round]


def attach_guard(strategy: Any, cfg: Any = None, run_dir: str | Path | None = None) -> UpdateGuard | None:
    """Put an :class:`UpdateGuard` first in ``strategy.update_hooks`` (before client-level DP
    clipping), configured from ``cfg.extra["guard"]`` (an :class:`~privseg.federated.FLConfig`,
    or None for the defaults). Returns the guard (also ``strategy.guard``), or None when
    disabled. Attaching twice keeps one guard."""
    existing = getattr(strategy, "guard", None)
    if isinstance(existing, UpdateGuard):
        return existing
    extra = getattr(cfg, "extra", None) or {}
    gcfg = GuardConfig.from_dict(extra.get("guard"))
    if not gcfg.enabled:
        return None
    min_keep = int(getattr(cfg, "min_sites", None) or getattr(strategy, "min_train_nodes", 1) or 1)
    guard = UpdateGuard(gcfg, min_keep=min_keep,
                        log_path=Path(run_dir) / GUARD_LOG if run_dir is not None else None,
                        cross_site=getattr(strategy, "client_dp", None) is None)
    strategy.update_hooks.insert(0, guard)
    strategy.guard = guard
    return guard


def read_guard_log(run_dir: str | Path) -> list[dict]:
    """The rejections recorded in ``<run>/guard.jsonl`` (empty when none)."""
    path = Path(run_dir) / GUARD_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the rest is still good
            continue
    return out
