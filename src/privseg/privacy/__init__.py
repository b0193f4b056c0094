"""Differential privacy with every release accounted (threat model and releases: docs/privacy.md).

* :mod:`~privseg.privacy.dpsgd` -- patient-level DP-SGD inside a site (Poisson-sampled
  subjects, per-subject clipping, Gaussian noise; Abadi et al. 2016), central and federated.
* :mod:`~privseg.privacy.clipping` -- private adaptive clipping to a norm quantile
  (Andrew et al. 2021), with the noise split accounted.
* :mod:`~privseg.privacy.accountant` -- RDP composition (Mironov 2017) of heterogeneous
  Poisson-subsampled Gaussian steps; noise calibration by bisection; cross-checked against
  Google's dp-accounting.
* :mod:`~privseg.privacy.budget` -- the per-site budget ledger (SQLite, WAL, transactions).
* :mod:`~privseg.privacy.client_dp` -- client-level DP-FedAvg at the server (site = unit).
* :mod:`~privseg.privacy.noise` -- the secret per-site key every sample and noise draw comes from.
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
from privseg.privacy.clipping import QuantileClipper, split_noise
from privseg.privacy.dpsgd import (
    DPConfig,
    PatientDPSGD,
    SampledBatch,
    SitePlan,
    check_dp_model,
    fl_step_fn_factory,
    make_plan,
    train_private,
)
from privseg.privacy.noise import NoiseSource

__all__ = [
    "BudgetLedger",
    "DPConfig",
    "NoiseSource",
    "PatientDPSGD",
    "SampledBatch",
    "QuantileClipper",
    "SitePlan",
    "StepEvent",
    "calibrate_sigma",
    "check_dp_model",
    "epsilon",
    "epsilon_dp_accounting",
    "epsilon_pld",
    "find_ledgers",
    "fl_step_fn_factory",
    "make_plan",
    "schedule_multipliers",
    "split_noise",
    "train_private",
]
