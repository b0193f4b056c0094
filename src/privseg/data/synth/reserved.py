"""What a site cohort may not use: the generator seeds and scanner profiles reserved for public
data (:mod:`privseg.data.synth.public`), so no public subject is ever a site's patient. The site
builders (:mod:`privseg.data.synth.builders`) check it; the public cohort is built from it."""

from __future__ import annotations

from privseg.errors import ConfigError

PUBLIC_SEED_BASE = 0x50550000  # "PU..": site cohorts use seeds below it (the stream key is the seed mod 2^32)
PUBLIC_PROFILES = {"volume": ("public-T1-7T", "public-T1-1T"), "ct": ("public-CT-thin",),
                   "dermoscopy": ("public-archive", "public-atlas")}


def is_public_profile(name: str) -> bool:
    return any(name in names for names in PUBLIC_PROFILES.values())


def check_site_cohort(seed: int, profiles) -> None:
    """A site cohort (every builder but :func:`privseg.data.synth.public.public_cohort`) may not use
    public seeds or profiles."""
    if int(seed) & 0xFFFFFFFF >= PUBLIC_SEED_BASE:
        raise ConfigError(f"seed {seed}: seeds from {PUBLIC_SEED_BASE} up are reserved for public data "
                          "(privseg.data.synth.public); a site cohort uses a smaller seed")
    public = [p for p in profiles if is_public_profile(p)]
    if public:
        raise ConfigError(f"profiles {public} are public-data scanners (privseg.data.synth.public); a site cohort "
                          "uses the others")
