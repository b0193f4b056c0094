"""Federated training across hospitals with Flower (simulation on Ray, or real SuperLink/SuperNodes).

``simulate(cfg, run_dir)`` runs a :class:`FLConfig` in simulation; ``deploy(cfg, run_dir)``
starts a SuperLink and one SuperNode per site on this machine (TLS on loopback) and runs the
app with ``flwr run``. Run state and checkpoints live in ``runs/<name>/`` (:class:`RunState`).
"""

from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.sites import SiteSpec, check_sites, sites_from_cohort, sites_from_folders, sites_from_root

__all__ = ["FLConfig", "RunState", "SiteSpec", "check_sites", "sites_from_cohort", "sites_from_folders",
           "sites_from_root"]
