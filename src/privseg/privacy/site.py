"""A site's private training in one object, and the entry point that makes it: :func:`make_private`.

``make_private(spec, site=..., items=..., ledger=..., noise=...)`` -> :class:`PrivateSite`, whose
``train_round`` is everything patient-level DP needs per round: the budget check before any
step, the Poisson-sampled, per-patient-clipped, noised steps, and the booking in the ledger.
Federated training (:mod:`privseg.federated.private`), central training
(:mod:`privseg.privacy.central`) and erasure (:mod:`privseg.erasure.private`) all go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privseg.privacy.accountant import StepEvent
from privseg.privacy.budget import BudgetLedger
from privseg.privacy.engine import PatientDPSGD, patient_groups
from privseg.privacy.noise import NoiseSource
from privseg.privacy.plan import SitePlan, plan_from_ledger_or_new
from privseg.privacy.releases import release_id
from privseg.privacy.spec import DPConfig


def noise_source(dp: DPConfig, state_dir: str | Path, seed: int) -> NoiseSource:
    """The site's secret noise key in ``state_dir``, or (``reproducible_noise``) one from the seed."""
    return NoiseSource.reproducible(seed) if dp.reproducible_noise else NoiseSource.for_state_dir(state_dir)


def engine_for(plan: SitePlan, dp: DPConfig, noise: NoiseSource, start: int = 0,
               subjects_per_step: int | None = None) -> PatientDPSGD:
    """The site's engine. With a public sampling rate (``--sampling-rate``, or the plan's) the
    update is divided by the plan's public expected batch (q x the declared size) or by the public
    ``subjects_per_step``, never by q*n, so nothing the site releases depends on n."""
    fixed_q = (dp.sampling_rate is not None or dp.plan == "auto") and subjects_per_step
    return PatientDPSGD(q=plan.q, n_subjects=plan.n_subjects, multipliers=plan.multipliers, clip_norm=dp.clip_norm,
                        clip_rule=dp.clip, target_quantile=dp.target_quantile, clip_lr=dp.clip_lr,
                        sigma_b=dp.sigma_b, method=dp.method, noise=noise, start=start,
                        expected_batch=plan.expected_batch or (float(subjects_per_step) if fixed_q else None),
                        aug_mult=dp.aug_mult, lr_scale=plan.lr_scale, clip_gamma=dp.clip_gamma)


class PrivateSite:
    """A site's private training, bound to its ledger: ``train_round`` fingerprints the round's
    inputs (:func:`~privseg.privacy.releases.release_id`), checks the ε the release would bring
    (refusing it before any step if it crosses the budget), runs the engine's Poisson-sampled DP
    steps on noise bound to that fingerprint, and books the release once (one SQLite transaction)."""

    def __init__(self, ledger: BudgetLedger, plan: SitePlan, engine: PatientDPSGD, scope: str = "",
                 settings: dict | None = None, reserve: Sequence[StepEvent] = ()):
        self.ledger = ledger
        self.reserve = list(reserve)  # events this site's training must leave room for (the erasure reserve)
        self.plan = plan
        self.engine = engine
        self.scope = scope
        self.settings = dict(settings or {})
        self.site_noise = engine.noise  # the site key; each release draws from it bound to its inputs
        self.epsilon = float("nan")
        self.release: str | None = None

    def release_id(self, model, optimizer, items, config, round_no: int, start: int, stop: int,
                   context: dict | None = None) -> str:
        """The fingerprint of the release ``train_round`` would make from these inputs (``context``:
        anything else the caller's output depends on, e.g. the server's round configuration)."""
        to_dict = getattr(config, "to_dict", None)
        settings = {"plan": self.plan.to_dict(), "dp": self.settings, "clip": self.engine.clip,
                    "clip_rule": self.engine.clip_rule, "expected_batch": self.engine.expected_batch,
                    "train": to_dict() if to_dict else repr(vars(config) if hasattr(config, "__dict__") else config),
                    "context": context or {}}
        patients = [str(item.get("patient", item.get("id", i))) for i, item in enumerate(items)]
        return release_id(site=self.plan.site, scope=self.scope, round_no=round_no, start=start, stop=stop,
                          settings=settings, model=model, optimizer=optimizer, patients=patients)

    def check(self, round_no: int, start: int, stop: int, release: str | None = None) -> float:
        return self.ledger.check_round(self.plan.site, round_no, self.plan.events(start, stop), scope=self.scope,
                                       release=release, reserve=self.reserve)

    def commit(self, round_no: int, start: int, stop: int, info: dict | None = None,
               release: str | None = None) -> float:
        # the clip is a DP release (post-processing of the noised count); how many were sampled is not
        extra = {"clip": self.engine.clip, "steps": [int(start), int(stop)], "noise": self.engine.noise.kind}
        extra.update(info or {})
        return self.ledger.commit_round(self.plan.site, round_no, self.plan.events(start, stop), info=extra,
                                        scope=self.scope, release=release)

    def train_round(self, model, optimizer, items, config, round_no: int, start: int, stop: int,
                    on_step=None, context: dict | None = None) -> list[float]:
        self.release = self.release_id(model, optimizer, items, config, round_no, start, stop, context)
        self.check(round_no, start, stop, self.release)  # refuses before any step is taken
        self.engine.noise = self.site_noise.bound(self.release)  # never the noise of another input
        losses = self.engine.train_steps(model, optimizer, items, config, start, stop, on_step=on_step)
        self.epsilon = self.commit(round_no, start, stop, release=self.release)
        return losses

    def round_metrics(self) -> dict:
        """What the site may tell others after a round: the plan's public figures and the clip."""
        mult = self.engine.multipliers
        return {"dp-epsilon": self.epsilon, "dp-delta": self.plan.delta, "dp-budget": self.plan.epsilon,
                "dp-clip": float(self.engine.clip),
                "dp-noise-multiplier": float(mult[min(self.engine.step_no, len(mult)) - 1])}


def make_private(spec: DPConfig, *, site: str, items: Sequence[dict], ledger: BudgetLedger, noise: NoiseSource,
                 subjects_per_step: int, total_steps: int, start: int = 0,
                 resume_round: int | None = None, local_steps: int | None = None,
                 spend_reserve: bool = False) -> PrivateSite:
    """The one entry point (as Opacus's ``PrivacyEngine.make_private``): from the run's privacy
    spec and a site's patients, the site's noise plan (calibrated and stored in its ledger the
    first time, reused after), its engine (Poisson sampling of patients, per-patient clipping,
    noise from ``noise``) and its ledger. ``resume_round``: continue the adaptive clip from the
    site's last round before it (a round re-run after a crash starts from where its first
    attempt started). ``local_steps``: a federated run's steps per round (a new plan keeps its
    erasure reserve in rounds of them); the releases of training must leave the reserve, an
    erasure's (``spend_reserve``, or a derived run's scope) spend from it."""
    plan = plan_from_ledger_or_new(ledger, spec, site, len(patient_groups(items)), subjects_per_step, total_steps,
                                   local_steps)
    engine = engine_for(plan, spec.for_site(site), noise, start=start, subjects_per_step=subjects_per_step)
    if resume_round is not None:
        last = ledger.last_info(site, before_round=resume_round, scope=spec.ledger_scope)
        if last and last.get("clip"):
            engine.clipper.clip = float(last["clip"])
    # the settings a release's fingerprint covers: all but where the ledgers live (no effect on the output)
    settings = {k: v for k, v in spec.for_site(site).to_dict().items() if k not in ("ledger", "ledger_root")}
    reserve = [] if spend_reserve or spec.ledger_scope else plan.reserve_events()
    return PrivateSite(ledger, plan, engine, spec.ledger_scope, settings=settings, reserve=reserve)
