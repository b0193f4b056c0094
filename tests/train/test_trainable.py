"""Partial fine-tuning (issue 26, item 5; privseg.train.trainable): --trainable chooses the parameters,
and DP noise and clipping touch the trainable parameters only."""

from __future__ import annotations

import pytest
import torch

from conftest import volume_items
from privseg.errors import ConfigError
from privseg.models import encoder_decoder_params
from privseg.privacy import NoiseSource, PatientDPSGD
from privseg.train import TrainConfig
from privseg.train.trainable import TRAINABLE, set_trainable


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), device="cpu", num_classes=3, **kw)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_chooses_norms_and_decoder():
    model = _cfg(trainable="all").build_model()
    total = sum(p.numel() for p in model.parameters())
    assert set(_trainable(model)) == {n for n, _ in model.named_parameters()}
    net = _cfg(trainable="norms").build_model()
    norms = _trainable(net)
    of_norms = {f"{m}.{n}" for m, mod in net.named_modules() if isinstance(mod, torch.nn.GroupNorm)
                for n, _ in mod.named_parameters()}
    assert norms and set(norms) == of_norms  # scales and shifts of every GroupNorm, nothing else
    dec = _cfg(trainable="decoder").build_model()
    assert {id(p) for p in _trainable(dec).values()} == {id(p) for p in encoder_decoder_params(dec)[1]}
    both = _cfg(trainable="norms+decoder").build_model()
    assert set(_trainable(both)) == set(norms) | set(_trainable(dec))
    assert 0 < set_trainable(both, "norms+decoder") < total
    with pytest.raises(ConfigError, match="--trainable 'encoder'"):
        _cfg(trainable="encoder")
    # lora: the adapters (privseg.models.lora) and nothing else; lora+norms: and the norms' scales and shifts
    lora = _cfg(trainable="lora", lora_rank=2).build_model()
    adapters = {n for n, _ in lora.named_parameters() if n.endswith((".lora_A.weight", ".lora_B.weight"))}
    assert adapters and set(_trainable(lora)) == adapters
    assert set(_trainable(_cfg(trainable="lora+norms", lora_rank=2).build_model())) == adapters | set(norms)
    with pytest.raises(ConfigError, match="lora_rank"):
        _cfg(trainable="lora", lora_rank=0)
    assert TRAINABLE == ("all", "norms", "decoder", "norms+decoder", "lora", "lora+norms")


@pytest.mark.parametrize("which", ["decoder", "norms", "lora", "lora+norms"])
def test_dp_noise_and_clipping_touch_only_the_trainable_parameters(which, monkeypatch):
    cfg = _cfg(trainable=which, patches_per_subject=1)
    model = cfg.build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = PatientDPSGD(q=1.0, n_subjects=4, multipliers=[1.0] * 2, noise=NoiseSource.reproducible(0), aug_mult=1,
                       clip_rule="fixed")
    drawn, gaussian = [], NoiseSource.gaussian
    monkeypatch.setattr(NoiseSource, "gaussian",
                        lambda self, what, step, n, *a: (drawn.append((what, n)), gaussian(self, what, step, n, *a))[1])
    eng.train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), volume_items(4, size=10), cfg, 0, 2)
    trainable = _trainable(model)
    assert [n for what, n in drawn if what == "gradient"] == [sum(p.numel() for p in trainable.values())] * 2
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n  # frozen: bit for bit; trained: moved
