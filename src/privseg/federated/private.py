"""Where federated training meets privacy: federated uses :mod:`privseg.privacy`, never the reverse.

The run's privacy spec (``FLConfig.privacy``, a :class:`~privseg.privacy.DPConfig`) is read in
the federated package here only; the ServerApp and the ClientApp ask this module and never
look at it themselves.

* Server: :func:`run_config` is the spec as the ``dp-*`` keys of every ClientApp's run
  configuration (the same in simulation and deployment); :func:`private_strategy` wraps the
  strategy -- client-level DP (``--dp site``): DP-FedAvg with its Poisson site sampling and its
  ledger (:class:`~privseg.federated.dp_strategy.ClientLevelDPStrategy` around the strategy,
  as Flower's own DP wrappers do, the mechanism from :func:`client_dp`);
  :func:`checkpoint_record` is the spec kept in every global checkpoint (provenance).
* Client: :func:`site_step_fn` builds the spec once from the run configuration; under
  patient-level DP (``--dp patient``) :func:`patient_dp_step_fn` makes the site's step -- it
  finds the site's patients, ledger and secret noise key (in the site's own state folder) and
  hands them, with the spec, to :func:`privseg.privacy.make_private`; the returned step runs
  the round's Poisson-sampled steps and reports only accounted figures. :func:`under_dp` tells
  the ClientApp's DP mod (:mod:`~privseg.federated.dp_mod`) that a run configuration carries a spec.
* A derived run (an erasure's retrain or calibration) books each site's spend in the original
  run's ledgers (:func:`derived_privacy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from privseg.errors import BudgetExceededError, ConfigError
from privseg.federated.config import FLConfig
from privseg.federated.dp_strategy import ClientLevelDPStrategy
from privseg.federated.runstate import PARTICIPATION_FILE, RunState
from privseg.federated.sites import SiteSpec, site_items, site_seed
from privseg.privacy import BudgetLedger, DPConfig, NoiseSource, make_private, noise_source
from privseg.privacy.accountant import epsilon
from privseg.privacy.budget import ledger_path
from privseg.privacy.client_dp import SERVER, ClientLevelDP
from privseg.privacy.spec import RUN_CONFIG_PREFIX
from privseg.train.loop import StepFn, TrainConfig, standard_step
from privseg.utils import append_line, site_dir

ERASURE_ROUND = "erasure-request"  # round-config key: a repair round of this erasure (it may spend the reserve)
CONTEXT_IGNORED = ("run-dir", "cache-sites", "eval-split", "dp-ledger", "dp-ledger-root")


class PatientDPStep:
    """The ClientApp's ``step_fn`` at a DP site: it brings its own Poisson-sampled ``train_steps``
    and the round's accounted metrics; as a plain step on a given batch it refuses.

    ``context`` (the server's round configuration) is part of every release's fingerprint
    (:meth:`privseg.privacy.PrivateSite.release_id`): the server cannot make the site draw the
    same noise for any other request."""

    def __init__(self, private, round_no: int, context: Mapping | None = None):
        self.private = private
        self.round_no = round_no
        # what the training output depends on (where the run lives, its cache, the evaluation split do not)
        self.context = ({str(k): context[k] for k in sorted(context) if str(k) not in CONTEXT_IGNORED}
                        if context is not None else {})

    def __call__(self, *args, **kwargs):
        return self.private.engine(*args, **kwargs)  # refuses: a DP site samples its own batches

    def release_id(self, model, optimizer, items, config, start: int, stop: int) -> str:
        return self.private.release_id(model, optimizer, items, config, self.round_no, start, stop, self.context)

    def train_steps(self, model, optimizer, items, config, start: int, stop: int) -> list[float]:
        losses = self.private.train_round(model, optimizer, items, config, self.round_no, start, stop,
                                          context=self.context)
        return [x for x in losses if not math.isnan(x)] or [float("nan")]

    def round_metrics(self) -> dict:
        return self.private.round_metrics()


def site_ledger_path(dp: DPConfig, site: str, state_dir: Path) -> Path:
    """The site's own ledger: its state folder's, or -- for an erasure's derived run -- the one in
    the original run (``ledger_root``), so every round the site pays for is in one place."""
    if dp.ledger:
        return Path(dp.ledger)
    if dp.ledger_root:
        return ledger_path(dp.ledger_root, site)
    return ledger_path(state_dir)


def patient_dp_step_fn(dp: DPConfig, tc: TrainConfig, msg_config: Mapping, spec: SiteSpec,
                       state_dir: Path) -> PatientDPStep:
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
                           resume_round=server_round,  # a round re-run after a crash starts as its first attempt
                           local_steps=steps,  # the erasure reserve is counted in rounds
                           spend_reserve=ERASURE_ROUND in msg_config)  # an erasure's repair round spends it
    return PatientDPStep(private, server_round, msg_config)


def under_dp(run_config: Mapping) -> bool:
    """Whether a ClientApp's run configuration carries a privacy spec (any ``dp-*`` key, patient-
    or site-level DP): what a DP site may say about its errors is then withheld (:mod:`~privseg.federated.dp_mod`)."""
    return any(str(k).startswith(RUN_CONFIG_PREFIX) for k in run_config.keys())


def site_step_fn(tc: TrainConfig, msg_config: Mapping, spec: SiteSpec, state_dir: Path) -> StepFn:
    """The ClientApp's default step at ``spec`` for the round in ``msg_config``: the privacy spec
    is built once from the run configuration's ``dp-*`` keys (:meth:`DPConfig.from_run_config`);
    under patient-level DP the site's private step (:func:`patient_dp_step_fn`), else the
    ordinary step (client-level DP adds nothing at the site: the server clips and noises)."""
    dp = DPConfig.from_run_config(msg_config)
    if dp is not None and dp.unit == "patient":
        return patient_dp_step_fn(dp, tc, msg_config, spec, state_dir)
    return standard_step


class PersonalDP:
    """Patient-level DP for a stage that trains at the sites after the rounds (personalisation,
    :mod:`privseg.federated.personalise`): each method's steps at a site are that site's DP-SGD
    steps (:class:`~privseg.privacy.PrivateSite`: the site's plan, its secret key bound to each
    release's inputs, booked once per fingerprint) in its own ledger, under the scope
    ``<scope>/<method>`` (so two methods never share a release id, nor its noise). Outside an
    erasure the stage must leave the erasure reserve; an erasure's (``spend_reserve``) spends it."""

    def __init__(self, run_dir: Path, cfg: FLConfig, scope: str, spend_reserve: bool = False):
        self.run_dir, self.cfg, self.scope, self.spend_reserve = Path(run_dir), cfg, scope, spend_reserve
        self.round_no = RunState.load(run_dir).rounds_done  # the releases are named by the global model's round
        self.booked: dict[str, dict[str, float]] = {}  # site -> method -> epsilon after its last release

    def private(self, spec: SiteSpec, method: str, items):
        dp, tc = self.cfg.privacy, self.cfg.train
        state_dir = site_dir(self.run_dir, spec.id)
        private = make_private(replace(dp, ledger_scope=f"{self.scope}/{method}"), site=spec.id, items=items,
                               ledger=BudgetLedger(site_ledger_path(dp, spec.id, state_dir)),
                               noise=noise_source(dp, state_dir, tc.seed + site_seed(spec.id)),
                               subjects_per_step=tc.subjects_per_step, total_steps=tc.steps,
                               local_steps=self.cfg.local_steps, spend_reserve=self.spend_reserve)
        if not self.spend_reserve:  # a scope of its own, yet not an erasure's: it must leave the reserve
            private.reserve = private.plan.reserve_events()
        return private

    def epoch_steps(self, spec: SiteSpec, items) -> int:
        """Steps of one epoch at ``spec`` from its plan's public sampling rate: ceil(1 / q), not
        ceil(n / batch), so the steps a method takes do not depend on the site's exact n."""
        return max(1, math.ceil(1.0 / self.private(spec, "", items).plan.q))

    def steps(self, spec: SiteSpec, method: str, items):
        """``(model, optimizer, items, config, start, stop) -> losses``: ``method``'s DP steps at ``spec``."""
        private = self.private(spec, method, items)

        def run(model, optimizer, batch_items, config, start: int, stop: int) -> list[float]:
            losses = private.train_round(model, optimizer, batch_items, config, self.round_no, start, stop)
            self.booked.setdefault(spec.id, {})[method] = private.epsilon
            return losses

        return run

    def cost(self, spec: SiteSpec, items, steps_by_method: Mapping[str, int]) -> dict:
        """ε at ``spec`` after the most steps each method may take (``steps_by_method``), composed with
        what the site spent (and, outside an erasure, with the reserve it must keep)."""
        private = self.private(spec, "", items)  # the site's plan and ledger (every method's steps use them)
        budget, delta = private.ledger.budget(spec.id)
        prior = private.ledger.events(spec.id)
        new = [e for n in steps_by_method.values() for e in private.plan.events(0, int(n))]
        after = epsilon(prior + new, delta)
        with_reserve = epsilon(prior + new + private.reserve, delta) if private.reserve else after
        return {"site": spec.id, "steps": {m: int(n) for m, n in steps_by_method.items()},
                "epsilon_spent": private.ledger.spent(spec.id), "epsilon_after": after,
                "epsilon_with_reserve": with_reserve, "epsilon_budget": budget, "delta": delta,
                "fits": not new or with_reserve <= budget * (1 + 1e-6) + 1e-9}

    def record(self, site: str) -> dict:
        """What personalisation.json keeps of a site's DP spend: the scopes booked and its ε now."""
        ledger = BudgetLedger(site_ledger_path(self.cfg.privacy, site, site_dir(self.run_dir, site)))
        budget, delta = ledger.budget(site)
        return {"scopes": [f"{self.scope}/{m}" for m in self.booked.get(site, {})], "epsilon_after": ledger.spent(site),
                "epsilon_budget": budget, "delta": delta}

    def require(self, rows: list[dict], what: str) -> list[dict]:
        """Raise :class:`~privseg.errors.BudgetExceededError` -- before any step -- when a site cannot pay."""
        short = [r for r in rows if not r["fits"]]
        if short:
            lines = "; ".join(
                f"site {r['site']} needs epsilon {r['epsilon_after']:.3g}"
                + (f" ({r['epsilon_with_reserve']:.3g} with the erasure reserve it keeps)" if not self.spend_reserve
                   else "")
                + f" for {' + '.join(f'{n} {m}' for m, n in r['steps'].items())} DP step(s) (spent "
                  f"{r['epsilon_spent']:.3g} of its budget {r['epsilon_budget']:g})" for r in short)
            raise BudgetExceededError(
                f"{what} refused before any training step: {lines}. Options: fewer --epochs, fewer methods "
                "(the local-only model under DP is a second DP training of the site: --method finetune), or "
                "raise the site's budget (privseg privacy budget RUN --site SITE --epsilon E, a decision recorded "
                "in its ledger)")
        return rows


def personal_dp(run_dir: str | Path, cfg: FLConfig, scope: str, spend_reserve: bool = False) -> PersonalDP | None:
    """The DP of a post-training stage at the sites (:class:`PersonalDP`), None without DP; under
    client-level DP (``--dp site``) refused: the server's noise covers the aggregate only, so a
    model trained at a site after the rounds would leave it unprotected."""
    if cfg.privacy is None:
        return None
    if cfg.privacy.unit != "patient":
        raise ConfigError(f"run {Path(run_dir).name} was trained with client-level DP (--dp site): the server's "
                          "noise covers the aggregate only, a model trained at a site afterwards would leave it "
                          "without protection; personalisation is refused (see docs/privacy.md)")
    return PersonalDP(Path(run_dir), cfg, scope, spend_reserve)


def served_ema_decay(cfg: FLConfig) -> float:
    """The decay of the weight average a DP run serves (0: it serves the last global model).
    Averaging released models is post-processing (:mod:`privseg.train.ema`): it books nothing."""
    return float(getattr(cfg.privacy, "ema", 0.0) or 0.0) if cfg.privacy is not None else 0.0


def run_config(cfg: FLConfig) -> dict:
    """The privacy spec of ``cfg`` as the ``dp-*`` keys of the ClientApps' run configuration
    (:meth:`DPConfig.to_run_config`); empty without DP."""
    return cfg.privacy.to_run_config() if cfg.privacy is not None else {}


def checkpoint_record(cfg: FLConfig) -> dict:
    """What a global checkpoint's ``extra`` keeps of the privacy spec: ``{"dp": ...}``, a record of
    the settings the model was trained under (provenance); empty without DP."""
    return {"dp": cfg.privacy.to_dict()} if cfg.privacy is not None else {}


# Under client-level DP who took part in a round is the secret coin the accountant's amplification
# rests on: it stays in a server-private file, never in a checkpoint, state.json, status or report.
_SECRET_ROUND_KEYS = ("participants", "train", "failed", "updates", "rejected", "train_s", "wall_s", "cpu_s")
WITHHELD = "withheld: client-level DP keeps who took part on the server only"


def public_round_entry(cfg: FLConfig, run_dir: str | Path, entry: dict) -> dict:
    """The round record that may leave the server. Under client-level DP (unit ``site``), who took
    part (and what only those who took part say: their metrics, failures, timings) is appended to
    ``<run>/server_private/participation.jsonl`` (mode 0600, fsync'd) and withheld from the rest."""
    if cfg.privacy is None or cfg.privacy.unit != "site":
        return entry
    secret = {k: entry[k] for k in _SECRET_ROUND_KEYS if k in entry}
    append_line(Path(run_dir) / PARTICIPATION_FILE, {"round": entry["round"], **secret}, default=float)
    return {**{k: v for k, v in entry.items() if k not in secret}, "participants": [], "participation": WITHHELD}


def private_strategy(strategy, cfg: FLConfig, run_dir: str | Path):
    """The server's strategy for the run's privacy spec: for client-level DP (unit ``site``)
    ``strategy`` wrapped in DP-FedAvg (:class:`ClientLevelDPStrategy`, mechanism :func:`client_dp`);
    otherwise ``strategy`` itself (patient-level DP happens at the sites). ``strategy`` is not changed."""
    if cfg.privacy is not None and cfg.privacy.unit == "site":
        return ClientLevelDPStrategy(strategy, client_dp(cfg, run_dir))
    return strategy


def releases_every_round(strategy) -> bool:
    """Whether the server aggregates a round whatever number of sites answered (none included):
    under client-level DP the sites are sampled by Poisson, and every round booked is released."""
    return isinstance(strategy, ClientLevelDPStrategy)


def derived_privacy(cfg: FLConfig, run_dir: Path, sub_dir: Path) -> FLConfig:
    """``cfg`` (the original run's, in ``run_dir``) for a run derived from it in ``sub_dir``: under
    patient-level DP every site keeps fresh state (so fresh secret noise keys: reused noise would
    cancel in a difference of models), but its spend goes into its own ledger in the original
    run, under the derived run's scope (:func:`site_ledger_path`)."""
    dp = cfg.privacy
    if dp is None or dp.unit != "patient":
        return cfg
    root = Path(dp.ledger_root or run_dir).resolve()
    scope = (str(sub_dir.resolve().relative_to(root)) if sub_dir.resolve().is_relative_to(root)
             else f"derived:{sub_dir.resolve()}")
    return replace(cfg, privacy=replace(dp, ledger_root=str(root), ledger_scope=scope))


def client_dp(cfg: FLConfig, run_dir: str | Path) -> ClientLevelDP:
    """The DP-FedAvg mechanism of ``cfg.privacy`` (unit ``site``), ledger in
    ``<run_dir>/privacy.sqlite``, noise key ``<run_dir>/server_noise.key``; on resume the adaptive
    clip continues from the ledger."""
    dp = cfg.privacy
    ledger = BudgetLedger(ledger_path(run_dir))
    mechanism = ClientLevelDP(n_sites=len(cfg.sites), fraction=cfg.fraction, clip=dp.clip, clip_norm=dp.clip_norm,
                              noise_multiplier=dp.noise_multiplier, epsilon=dp.epsilon, delta=dp.delta,
                              rounds=cfg.rounds, target_quantile=dp.target_quantile, clip_lr=dp.clip_lr,
                              sigma_b=dp.sigma_b, ledger=ledger,
                              noise=(NoiseSource.reproducible(cfg.train.seed) if dp.reproducible_noise
                                     else NoiseSource.for_state_dir(run_dir, "server_noise.key")),
                              allow_large_delta=dp.allow_large_delta)
    # the clip as it was before the round the server resumes at (a booked first attempt of that
    # round, cut short by a crash before state.json, must not move the starting point)
    last = ledger.last_info(SERVER, before_round=RunState.load_or_new(run_dir).rounds_done + 1)
    if last and last.get("clip"):
        mechanism.clipper.clip = float(last["clip"])
    return mechanism
