"""privseg.federated.assemble: the run config of `fl run` from its options, each default read from its field."""

from __future__ import annotations

import dataclasses

from privseg.federated import FLConfig, sites_from_cohort
from privseg.federated.assemble import FL_DEVICE, FL_PATCH, build_fl_config
from privseg.train import TrainConfig


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_options_left_out_keep_their_fields_defaults(tiny_cohort):
    sites = sites_from_cohort(tiny_cohort.root)
    cfg = build_fl_config(sites=sites, model="unet_tiny", rounds=None)  # None: as if left out
    fl, train = _defaults(FLConfig), _defaults(TrainConfig)
    for k in ("strategy", "rounds", "local_steps", "proximal_mu", "min_sites", "fraction", "eval_every",
              "keep_updates", "round_timeout"):
        assert getattr(cfg, k) == fl[k], k
    for k in ("norm", "subjects_per_step", "patches_per_subject", "lr", "seed", "trainable", "lora_rank"):
        assert getattr(cfg.train, k) == train[k], k
    assert cfg.train.steps == fl["rounds"] * fl["local_steps"] and cfg.train.device == FL_DEVICE
    assert cfg.train.patch_size == (FL_PATCH,) * 3 and cfg.privacy is None
    given = build_fl_config(sites=sites, model="unet_tiny", patch=16, rounds=3, local_steps=2, mu=0.5, lr=1e-3,
                            strategy="fedprox")
    assert (given.rounds, given.proximal_mu, given.strategy, given.train.lr, given.train.steps) == (
        3, 0.5, "fedprox", 1e-3, 6)
