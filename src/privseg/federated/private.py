"""Where federated training meets privacy: federated uses :mod:`privseg.privacy`, never the reverse.

* Patient-level DP (``--dp patient``): :func:`patient_dp_step_fn` makes the ClientApp's step at
  a DP site from the spec the ClientApp built from its run config -- it finds the site's
  patients, ledger and secret noise key (in the site's own state folder) and hands them, with
  the spec, to :func:`privseg.privacy.make_private`; the returned step runs the round's
  Poisson-sampled steps and reports only accounted figures.
* Client-level DP (``--dp site``): :func:`attach_client_dp` puts DP-FedAvg's hooks and its
  Poisson site sampling on the server's strategy (as Flower's own DP wrappers do).
"""

from __future__ import annotations

import math
from pathlib import Path

from privseg.federated.runstate import RunState
from privseg.federated.sites import SiteSpec, site_items, site_seed
from privseg.privacy import BudgetLedger, DPConfig, NoiseSource, make_private, noise_source
from privseg.privacy.client_dp import SERVER, ClientLevelDP, ledger_for_run


class PatientDPStep:
    """The ClientApp's ``step_fn`` at a DP site: it brings its own Poisson-sampled ``train_steps``
    and the round's accounted metrics; as a plain step on a given batch it refuses."""

    def __init__(self, private, round_no: int):
        self.private = private
        self.round_no = round_no

    def __call__(self, *args, **kwargs):
        return self.private.engine(*args, **kwargs)  # refuses: a DP site samples its own batches

    def train_steps(self, model, optimizer, items, config, start: int, stop: int) -> list[float]:
        losses = self.private.train_round(model, optimizer, items, config, self.round_no, start, stop)
        return [x for x in losses if not math.isnan(x)] or [float("nan")]

    def round_metrics(self) -> dict:
        return self.private.round_metrics()


def site_ledger_path(dp: DPConfig, site: str, state_dir: Path) -> Path:
    """The site's own ledger: its state folder's, or -- for an erasure's derived run -- the one in
    the original run (``ledger_root``), so every round the site pays for is in one place."""
    if dp.ledger:
        return Path(dp.ledger)
    if dp.ledger_root:
        return Path(dp.ledger_root) / "sites" / site / "privacy.sqlite"
    return Path(state_dir) / "privacy.sqlite"


def patient_dp_step_fn(dp: DPConfig, tc, msg_config, spec: SiteSpec, state_dir: Path) -> PatientDPStep:
    """The ClientApp's step at a site under patient-level DP ``dp`` (the spec the ClientApp built
    from its run config), for the round in ``msg_config``."""
    server_round = int(msg_config["server-round"])
    steps = int(msg_config.get("local-steps", 1))
    items = site_items(spec, "train", tc.spacing, int(msg_config.get("cache-sites", 8)))
    private = make_private(dp, site=spec.id, items=items,
                           ledger=BudgetLedger(site_ledger_path(dp, spec.id, state_dir)),
                           noise=noise_source(dp, state_dir, tc.seed + site_seed(spec.id)),
                           subjects_per_step=tc.subjects_per_step, total_steps=tc.steps,
                           start=(server_round - 1) * steps,
                           resume_round=server_round)  # a round re-run after a crash starts as its first attempt
    return PatientDPStep(private, server_round)


def attach_client_dp(strategy, cfg, run_dir: str | Path) -> ClientLevelDP:
    """Attach DP-FedAvg to ``strategy`` from ``cfg.privacy`` (unit ``site``), ledger in
    ``<run_dir>/privacy.sqlite``, noise key ``<run_dir>/server_noise.key``; on resume the adaptive
    clip continues from the ledger."""
    dp = cfg.privacy
    ledger = ledger_for_run(run_dir)
    hooks = ClientLevelDP(n_sites=len(cfg.sites), fraction=cfg.fraction, clip=dp.clip, clip_norm=dp.clip_norm,
                          noise_multiplier=dp.noise_multiplier, epsilon=dp.epsilon, delta=dp.delta, rounds=cfg.rounds,
                          target_quantile=dp.target_quantile, clip_lr=dp.clip_lr, sigma_b=dp.sigma_b, ledger=ledger,
                          noise=(NoiseSource.reproducible(cfg.train.seed) if dp.reproducible_noise
                                 else NoiseSource.for_state_dir(run_dir, "server_noise.key")),
                          allow_large_delta=dp.allow_large_delta)
    # the clip as it was before the round the server resumes at (a booked first attempt of that
    # round, cut short by a crash before state.json, must not move the starting point)
    last = ledger.last_info(SERVER, before_round=RunState.load_or_new(run_dir).rounds_done + 1)
    if last and last.get("clip"):
        hooks.clipper.clip = float(last["clip"])
    hooks.attach(strategy)
    strategy.client_dp = hooks
    return hooks
