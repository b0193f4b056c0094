"""Public data for a warm start: an embedded cohort no site's patient is ever in.

Public pretraining then private fine-tuning is how DP image models get near non-private utility
(De et al. 2022; Berrada et al. 2023, :mod:`privseg.train.warm_start`). Its premise is that the
public data holds none of the private patients and differs from them as an open dataset differs
from a hospital's. The public cohort is built so:

* **other patients**: every subject draws from the ``(seed, site, subject)`` stream of a seed at
  or above :data:`PUBLIC_SEED_BASE`; the site cohorts' builders refuse such seeds, so no public
  stream is ever a site's (:func:`check_site_cohort`);
* **other scanners**: only the ``public-*`` profiles of :data:`~privseg.data.synth.SCANNER_PROFILES`
  / :data:`~privseg.data.synth.CAMERA_PROFILES` (other field strength, contrast, resolution,
  calibration, optics), which the site builders refuse;
* **its own raters**: label noise of other amplitudes (:data:`PUBLIC_RATER`).

The cohort's manifest records all of it under ``info["public"]``; ``privseg train --public``
copies that record into the checkpoint it trains (``extra["public_data"]``).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from privseg.data.synth.builders import synth_cohort, synth_cohort_2d
from privseg.data.synth.params import SynthParams
from privseg.data.synth.reserved import (  # noqa: F401  (public here too)
    PUBLIC_PROFILES,
    PUBLIC_SEED_BASE,
    check_site_cohort,
    is_public_profile,
)
from privseg.errors import ConfigError

KINDS = tuple(PUBLIC_PROFILES)
# the public raters draw outlines of their own: larger and more frequent displacements than the sites'
PUBLIC_RATER = {"rater_patch_fraction": 0.35, "rater_shift_vox": 1.0, "rater_bias": 0.05, "derm_rater_offset": 0.06,
                "derm_rater_wobble": 0.06}


def public_seed(seed: int) -> int:
    if not 0 <= int(seed) < 0xFFFFFFFF - PUBLIC_SEED_BASE:
        raise ConfigError(f"public cohort seed {seed} must be a small non-negative integer")
    return PUBLIC_SEED_BASE + int(seed)


def public_cohort(out: str | Path, kind: str, *, subjects: int = 16, size: int = 32, seed: int = 0):
    """Write the public cohort of ``kind`` (``volume``: T1 MR, ``ct``, ``dermoscopy``) into ``out``:
    ``subjects`` per public scanner, every one a training subject (nothing of it is held out: it
    is not evaluated on), and return it. ``size``: volume side (3D) or image side (2D)."""
    if kind not in KINDS:
        raise ConfigError(f"public cohort kind {kind!r} is not one of {', '.join(KINDS)}")
    names = list(PUBLIC_PROFILES[kind])
    params = replace(SynthParams(), **PUBLIC_RATER)
    s = public_seed(seed)
    common = {"sites": len(names), "subjects": subjects, "size": size, "seed": s, "profiles": names,
              "test_fraction": 0.0, "params": params, "public": True}
    cohort = (synth_cohort_2d(out, kind="dermoscopy", **common) if kind == "dermoscopy"
              else synth_cohort(out, **common))
    cohort.info["public"] = {"kind": kind, "seed": s, "profiles": names, "subjects": subjects * len(names),
                             "size": size, "rater": asdict(params), "seed_base": PUBLIC_SEED_BASE}
    cohort.save()
    return cohort


__all__ = ["KINDS", "PUBLIC_PROFILES", "PUBLIC_RATER", "PUBLIC_SEED_BASE", "check_site_cohort", "is_public_profile",
           "public_cohort", "public_seed"]
