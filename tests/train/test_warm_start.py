"""Public warm start (issue 26, item 5): --init (privseg.train.initial), the public cohort no site's patient
is in, train --public and a federation fine-tuning from it (--trainable: test_trainable.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from privseg.data import synth
from privseg.data.synth.public import PUBLIC_PROFILES, PUBLIC_SEED_BASE, public_cohort
from privseg.errors import CheckpointError, ConfigError
from privseg.models import encoder_decoder_params
from privseg.train import TrainConfig, Trainer
from privseg.train.checkpoint import load_checkpoint, save_checkpoint
from privseg.train.initial import BUNDLE_WEIGHTS, init_record, initial_model
from privseg.train.warm_start import train_public


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), device="cpu", num_classes=3, **kw)


def _saved(tmp_path: Path, cfg: TrainConfig, name: str = "pub.pt", extra: dict | None = None) -> tuple[Path, dict]:
    torch.manual_seed(7)
    model = cfg.build_model()
    path = save_checkpoint(tmp_path / name, model, config=cfg.to_dict(), extra=extra or {})
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_init_reads_a_checkpoint_a_bundle_and_a_state_dict(tmp_path):
    path, weights = _saved(tmp_path, _cfg())
    bundle = tmp_path / "bundle"
    (bundle / BUNDLE_WEIGHTS).parent.mkdir(parents=True)
    (bundle / BUNDLE_WEIGHTS).write_bytes(path.read_bytes())
    torch.save(weights, tmp_path / "resnet_like.pth")
    for source in (path, bundle, tmp_path / "resnet_like.pth"):
        got = initial_model(_cfg(init=str(source))).state_dict()
        assert all(torch.equal(got[k], v) for k, v in weights.items()), source
    fresh = _cfg(init=str(path)).build_model().state_dict()  # a site's model: no file read
    assert not all(torch.equal(fresh[k], v) for k, v in weights.items())
    other, _ = _saved(tmp_path, TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), num_classes=5), "other.pt")
    with pytest.raises(CheckpointError, match="other.pt.*does not fit"):
        initial_model(_cfg(init=str(other)))
    with pytest.raises(CheckpointError, match="missing.pt"):
        initial_model(_cfg(init=str(tmp_path / "missing.pt")))
    with pytest.raises(CheckpointError, match="no MONAI bundle"):
        initial_model(_cfg(init=str(tmp_path)))


def test_trainer_starts_from_init_and_keeps_the_frozen_part(tiny_cohort, tmp_path):
    cfg = TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", patch_size=(16, 16, 16), steps=2, device="cpu")
    path, weights = _saved(tmp_path, cfg)
    cfg.init, cfg.trainable = str(path), "decoder"
    model = Trainer(tiny_cohort, cfg, tmp_path / "run").fit()["model"]
    enc, dec = encoder_decoder_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(torch.equal(p, weights[names[id(p)]]) for p in enc)  # started from init, never trained
    assert any(not torch.equal(p, weights[names[id(p)]]) for p in dec)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["init"] == str(path)


def _hashes(cohort) -> set[str]:
    from privseg.data.transforms import load_subject

    out = set()
    for s in cohort.subjects:
        loaded = load_subject(s, cohort)
        out.add(hashlib.sha256(np.ascontiguousarray(loaded.image.numpy()).tobytes()).hexdigest())
    return out


@pytest.mark.parametrize("kind", ["volume", "dermoscopy"])
def test_no_site_patient_is_ever_in_public_data(tmp_path, kind):
    if kind == "dermoscopy":
        site = synth.synth_cohort_2d(tmp_path / "site", sites=3, subjects=3, size=32, kind="dermoscopy", seed=2)
    else:
        site = synth.synth_cohort(tmp_path / "site", sites=3, subjects=2, size=16, seed=0)
    pub = public_cohort(tmp_path / "pub", kind, subjects=2, size=site.info["size"])
    info = pub.info["public"]
    assert info["seed"] >= PUBLIC_SEED_BASE > site.info["seed"]
    site_profiles = {p["name"] for p in site.info["profiles"].values()}
    assert set(info["profiles"]) == set(PUBLIC_PROFILES[kind]) and not set(info["profiles"]) & site_profiles
    assert info["rater"] != site.info["params"]  # its own raters
    assert all(s.id.startswith("P") and s.split == "train" for s in pub.subjects)
    assert not _hashes(pub) & _hashes(site)  # no image of a site's patient in public data
    with pytest.raises(ConfigError, match="reserved for public data"):
        synth.synth_cohort(tmp_path / "x", sites=1, subjects=1, size=16, seed=PUBLIC_SEED_BASE + 1)
    with pytest.raises(ConfigError, match="public-data scanners"):
        synth.synth_cohort_2d(tmp_path / "y", sites=1, subjects=1, size=32, kind="dermoscopy",
                              profiles=["public-atlas"])


def test_train_public_records_the_public_data(tmp_path):
    cfg = TrainConfig(model="unet_tiny", patch_size=(32, 32), spatial_dims=2, in_channels=3, num_classes=2, steps=1,
                      device="cpu")
    ckpt = train_public("dermoscopy", tmp_path / "pub", cfg, subjects=2, size=32)
    rec = load_checkpoint(ckpt)["extra"]["public_data"]
    assert rec["kind"] == "dermoscopy" and rec["seed"] >= PUBLIC_SEED_BASE and rec["subjects"] == 4
    assert init_record(ckpt)["public_data"] == rec
    with pytest.raises(ConfigError, match="not 'ct'"):
        train_public("ct", tmp_path / "pub", cfg)


def test_cli_trains_the_public_start_and_a_federation_fine_tunes_from_it(tmp_path):
    from privseg.cli import main
    from privseg.federated import RunState

    site = synth.synth_cohort_2d(tmp_path / "site", sites=2, subjects=2, size=32, kind="dermoscopy", seed=2)
    common = ["--model", "unet_tiny", "--patch", "32", "-q"]
    assert main(["train", "--cohort", str(site.root), "--public", "--out", str(tmp_path / "pub"), "--steps", "1",
                 *common]) == 0
    pub = tmp_path / "pub" / "last.pt"
    rec = load_checkpoint(pub)["extra"]["public_data"]
    assert rec["kind"] == "dermoscopy" and rec["size"] == 32
    assert main(["fl", "run", "--in-process", "--cohort", str(site.root), "--rounds", "1", "--local-steps", "1",
                 "--name", "w", "--runs", str(tmp_path / "runs"), "--init", str(pub), "--trainable", "decoder",
                 *common]) == 0
    state = RunState.load(tmp_path / "runs" / "w")
    start, end = load_checkpoint(state.checkpoint_path(0)), load_checkpoint(state.checkpoint_path(1))
    assert start["extra"]["init"]["public_data"] == rec
    assert all(torch.equal(v, load_checkpoint(pub)["model"][k]) for k, v in start["model"].items())
    model = TrainConfig.from_dict(end["config"]).build_model()
    enc, _ = encoder_decoder_params(model)
    frozen = {n for n, p in model.named_parameters() if any(p is q for q in enc)}
    assert frozen and all(torch.equal(end["model"][n], start["model"][n]) for n in frozen)
    assert any(not torch.equal(end["model"][k], start["model"][k]) for k in start["model"])
    assert main(["train", "--cohort", str(site.root), "--trainable", "head", *common]) == 2


def test_central_dp_fine_tunes_the_decoder_from_init(tiny_cohort, tmp_path):
    from privseg.privacy import DPConfig, train_private

    cfg = TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", patch_size=(16, 16, 16), steps=2, device="cpu")
    path, weights = _saved(tmp_path, cfg)
    cfg.init, cfg.trainable = str(path), "decoder"
    dp = DPConfig(epsilon=50.0, delta=1e-2, clip="fixed", plan="auto", cohort_size=2, epochs=2.0, aug_mult=1, ema=0,
                  allow_large_delta=True, reproducible_noise=True)
    model = train_private(tiny_cohort, cfg, dp, tmp_path / "dp")["model"]
    enc, dec = encoder_decoder_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(torch.equal(p, weights[names[id(p)]]) for p in enc)  # no gradient, no noise: as --init gave it
    assert all(not torch.equal(p, weights[names[id(p)]]) for p in dec if p.dim() > 1)  # noised and trained
