"""Assembling a federated run from options: one function, used by `fl run`, `fl deploy`, the
benchmarks, the demo and the tests, so the same options always make the same run config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from privseg.errors import ConfigError
from privseg.federated.config import FLConfig
from privseg.federated.sites import SiteSpec, check_sites, sites_from_cohort, sites_from_folders, sites_from_root
from privseg.privacy import DPConfig, check_dp_model
from privseg.privacy.plan import plan_for
from privseg.privacy.spec import dp_from_options
from privseg.train import TrainConfig
from privseg.train.initial import initial_model
from privseg.utils import check_id, parse_params


def federation_sites(cohort: str | Path | None = None, site: Sequence[str] | None = None,
                     sites_root: str | Path | None = None, only_site: Sequence[str] | None = None,
                     splits: str | Path | None = None) -> list[SiteSpec]:
    """The sites from exactly one of: a multi-site cohort (optionally ``only_site``), ``ID=FOLDER``
    items, or a folder with one sub-folder per site; ``splits`` pins every site's splits from one
    file (rows keyed by site ID and subject, as ``splits.csv`` beside a run has them)."""
    sites = _sites(cohort, site, sites_root, only_site)
    if splits:
        sites = [replace(s, splits=str(Path(splits).resolve())) for s in sites]
    return sites


def _sites(cohort, site, sites_root, only_site) -> list[SiteSpec]:
    given = [x for x in (cohort, site, sites_root) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --cohort, --site (repeatable) or --sites-root")
    for s in only_site or []:
        check_id(s, "--only-site")
    if cohort:
        return sites_from_cohort(cohort, list(only_site) if only_site else None)
    if site:
        return sites_from_folders(list(site))
    return sites_from_root(sites_root)


# the TrainConfig fields `fl run` sets by name (build_fl_config's other settings are FLConfig's)
TRAIN_SETTINGS = ("model", "norm", "subjects_per_step", "patches_per_subject", "lr", "seed", "trainable", "lora_rank")
FL_PATCH = 32  # `fl run`'s patch side in voxels (a site's volume is cut into cubes of this side)
FL_NAME = "fl"  # `fl run`'s run name unless told (the run folder is RUNS/fl)
FL_DEVICE = "cpu"  # where a site trains unless told (a hospital's node often has no GPU)


def build_fl_config(*, sites: Sequence[SiteSpec], name: str = FL_NAME, patch: int = FL_PATCH, device: str = FL_DEVICE,
                    init: str | None = None, dp: DPConfig | None = None, strategy_params: dict | None = None,
                    **settings) -> FLConfig:
    """A validated :class:`FLConfig` from the CLI's options: the :class:`TrainConfig` built from the
    sites' channels, classes and dimensionality, then :func:`fl_config`. ``settings``: the
    TrainConfig fields of ``TRAIN_SETTINGS`` and FLConfig's own (``rounds``, ``strategy``,
    ``local_steps``, ``mu`` for ``proximal_mu``, ...) by name; one left out (or None) keeps its
    field's default. The run trains ``rounds`` x ``local_steps`` steps."""
    check_id(name, "--name")
    info = check_sites(list(sites))
    dims = info["spatial_dims"]
    given = {k: v for k, v in settings.items() if v is not None}
    if "mu" in given:
        given["proximal_mu"] = given.pop("mu")
    train = {k: given.pop(k) for k in TRAIN_SETTINGS if k in given}
    rounds, local_steps = (given.get(k, FLConfig.__dataclass_fields__[k].default) for k in ("rounds", "local_steps"))
    tc = TrainConfig(patch_size=(patch,) * dims, steps=max(1, rounds * local_steps), device=device,
                     in_channels=len(info["channels"]), num_classes=len(info["classes"]), spatial_dims=dims,
                     init=str(init) if init else None, **train)
    return fl_config(sites=sites, train=tc, name=name, dp=dp, strategy_params=dict(strategy_params or {}), **given)


def fl_config(*, sites: Sequence[SiteSpec], train: TrainConfig, name: str = FL_NAME, dp: DPConfig | None = None,
              **fields) -> FLConfig:
    """A validated :class:`FLConfig` from the sites and a training config the caller built (the
    benchmarks' whole-volume patches, for one); ``fields`` are FLConfig's own (``rounds``,
    ``strategy``, ...: their defaults are on its fields). The model is built once so a bad name, or
    an ``init`` that does not fit, fails before any process starts; DP budgets must name known
    sites and the model must suit per-patient clipping."""
    built = initial_model(train)
    cfg = FLConfig(name=name, sites=list(sites), train=train, **fields)
    if dp is not None:
        unknown = set(dp.sites) - set(cfg.site_ids)
        if unknown:
            raise ConfigError(f"--site-budget names unknown site(s) {sorted(unknown)} "
                              f"(sites: {', '.join(cfg.site_ids)})")
        if dp.unit == "patient":
            check_dp_model(built)
        cfg = replace(cfg, privacy=dp)  # the DP run's own checks (e.g. no evaluation on training patients)
    return cfg


def fl_config_from_options(*, cohort: str | Path | None = None, site: Sequence[str] | None = None,
                           sites_root: str | Path | None = None, only_site: Sequence[str] | None = None,
                           splits: str | Path | None = None, strategy_param: Sequence[str] | None = None,
                           privacy: Mapping | None = None, **settings) -> FLConfig:
    """The run config of `privseg fl run` and `fl deploy` from their options, as they name them:
    the sites (:func:`federation_sites`), ``strategy_param`` the FL strategy's own parameters as
    ``KEY=VALUE`` items, ``privacy`` the DP options (``dp`` none/patient/site, ``epsilon``,
    ``site_budget``, ``dp_config``, ...: :func:`~privseg.privacy.spec.dp_from_options`), and
    ``settings`` the rest of :func:`build_fl_config`. The same options give the same config."""
    strategy_params = parse_params(strategy_param, "--strategy-param")
    dp = dp_from_options(**(privacy or {}))
    return build_fl_config(sites=federation_sites(cohort, site, sites_root, only_site, splits), dp=dp,
                           strategy_params=strategy_params, **settings)


def site_plans(cfg: FLConfig) -> list[str]:
    """Each site's DP step plan, for a patient-level run planned ``auto`` (none otherwise): public
    figures only, what each site will compute for itself."""
    dp = cfg.privacy
    if dp is None or dp.unit != "patient" or dp.plan != "auto":
        return []
    return [f"[{site}] " + plan_for(dp, site, cfg.train.steps, base_lr=cfg.train.lr,
                                    local_steps=cfg.local_steps).describe() for site in cfg.site_ids]
