"""A public warm start: ``privseg train --public`` trains the starting weights on public data, and a
federated run's round-0 checkpoint is written from ``--init``.

Public pretraining followed by DP fine-tuning of part of the network is what brings DP image
models near non-private utility (De, Berrada, Hayes, Smith & Balle, "Unlocking high-accuracy
differentially private image classification through scale", 2022; Berrada et al., "Unlocking
accuracy and fairness in differentially private image classification", 2023, on chest X-ray
and dermatology). What ``--init`` reads: :mod:`privseg.train.initial`; which parameters then
train (``--trainable``): :mod:`privseg.train.trainable`.
"""

from __future__ import annotations

import os
from pathlib import Path

from privseg.data.cohort import MANIFEST_NAME, Cohort
from privseg.data.synth.public import public_cohort
from privseg.errors import ConfigError
from privseg.train.checkpoint import load_checkpoint, save_checkpoint
from privseg.train.config import TrainConfig
from privseg.train.initial import PUBLIC_KEY, init_record, initial_model
from privseg.train.loop import Trainer


def write_start(config: TrainConfig, path: str | os.PathLike) -> Path:
    """A federated run's round-0 checkpoint from ``config.init`` (the server starts from round 0's
    checkpoint when there is one), with what the weights are in ``extra["init"]``."""
    return save_checkpoint(path, initial_model(config), config=config.to_dict(), step=0,
                           extra={"init": init_record(config.init)})


def public_kind(cohort: Cohort) -> str:
    """The public cohort that matches ``cohort``'s images: ``dermoscopy`` (RGB), ``ct`` or ``volume`` (MR)."""
    if len(cohort.channels) == 3 or cohort.spatial_dims == 2:
        return "dermoscopy"
    return "ct" if any(s.modality.upper() == "CT" for s in cohort.subjects) else "volume"


def train_public(kind: str, out_dir: str | os.PathLike, config: TrainConfig, *, subjects: int = 16,
                 size: int | None = None, seed: int = 0, on_step=None) -> Path:
    """``privseg train --public KIND``: build the public cohort of ``kind``
    (:func:`privseg.data.synth.public.public_cohort`, in ``OUT/public_cohort``), train ``config``
    on it (non-private: it holds no site's patient) and record the public data in the checkpoint
    (``extra["public_data"]``). Returns ``OUT/last.pt``, the ``--init`` for the sites' training.
    ``size``: the public images' side (default: the patch's, at least 32)."""
    out_dir = Path(out_dir)
    where = out_dir / "public_cohort"
    cohort = (Cohort.from_manifest(where / MANIFEST_NAME) if (where / MANIFEST_NAME).exists()
              else public_cohort(where, kind, subjects=subjects, size=size or max(32, *config.patch_size), seed=seed))
    if cohort.info.get("public", {}).get("kind") != kind:
        raise ConfigError(f"{where}: holds public data of kind {cohort.info.get('public', {}).get('kind')!r}, not "
                          f"{kind!r}; use another --out")
    result = Trainer(cohort, config, out_dir).fit(on_step=on_step)
    payload = load_checkpoint(result["checkpoint"])
    extra = {**payload.get("extra", {}), PUBLIC_KEY: cohort.info["public"]}
    return save_checkpoint(result["checkpoint"], result["model"], config=payload["config"], step=payload["step"],
                           extra=extra)


__all__ = ["public_kind", "train_public", "write_start"]
