"""Differential privacy with every release accounted (threat model and releases: docs/privacy.md).

The entry point is :func:`make_private` (:mod:`~privseg.privacy.site`): from the run's
:class:`DPConfig` and a site's patients, the site's private training -- its fixed noise plan,
Poisson sampling of patients, per-patient clipping, noise from its secret key, and its ledger.

* :mod:`~privseg.privacy.spec` -- the typed, validated privacy spec (:class:`DPConfig`).
* :mod:`~privseg.privacy.engine` -- the patient-level DP-SGD step (Abadi et al. 2016).
* :mod:`~privseg.privacy.grad_sample` -- per-subject clipped gradients (loop / vmap / Opacus).
* :mod:`~privseg.privacy.clipping` -- clip rules: fixed, private adaptive (Andrew et al. 2021),
  normalising (Bu et al. 2023).
* :mod:`~privseg.privacy.noise` -- the secret per-site key every sample and noise draw comes from.
* :mod:`~privseg.privacy.plan` -- a site's noise plan, calibrated once to its budget, and the step
  planner (``--plan auto``) that chooses it from public figures only.
* :mod:`~privseg.privacy.accountant` -- RDP composition (Mironov 2017), cross-checked against
  Google's dp-accounting; noise calibration by bisection.
* :mod:`~privseg.privacy.budget` -- the per-site budget ledger (SQLite, WAL, transactions).
* :mod:`~privseg.privacy.central` -- central (single-site) DP training with checkpoints.
* :mod:`~privseg.privacy.client_dp` -- the client-level DP-FedAvg mechanism (site = unit), on plain
  arrays; Flower's strategy wrapper around it is :mod:`privseg.federated.dp_strategy`. No module
  here imports Flower.
"""

from privseg.privacy.accountant import (
    StepEvent,
    calibrate_sigma,
    epsilon,
    epsilon_dp_accounting,
    epsilon_pld,
    schedule_multipliers,
)
from privseg.privacy.budget import BudgetLedger, find_ledgers
from privseg.privacy.central import train_private
from privseg.privacy.clipping import CLIP_RULES, QuantileClipper, clip_rule, split_noise
from privseg.privacy.engine import PatientDPSGD, SampledBatch, check_dp_model, patient_groups
from privseg.privacy.grad_sample import GRAD_METHODS, per_subject
from privseg.privacy.noise import NoiseSource
from privseg.privacy.plan import SitePlan, TrainingPlan, make_plan, plan_training, site_plan
from privseg.privacy.site import PrivateSite, make_private, noise_source
from privseg.privacy.spec import DPConfig

__all__ = [
    "CLIP_RULES",
    "GRAD_METHODS",
    "BudgetLedger",
    "DPConfig",
    "NoiseSource",
    "PatientDPSGD",
    "PrivateSite",
    "QuantileClipper",
    "SampledBatch",
    "SitePlan",
    "StepEvent",
    "TrainingPlan",
    "calibrate_sigma",
    "check_dp_model",
    "clip_rule",
    "epsilon",
    "epsilon_dp_accounting",
    "epsilon_pld",
    "find_ledgers",
    "make_plan",
    "make_private",
    "noise_source",
    "patient_groups",
    "per_subject",
    "plan_training",
    "schedule_multipliers",
    "site_plan",
    "split_noise",
    "train_private",
]
