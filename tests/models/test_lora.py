"""LoRA adapters on the convolutions (issue 26, item 5: --trainable lora): the adapted model starts at
its weights, saves and loads plain weights, merges exactly, and every per-patient gradient method
gives the adapters' clipped per-patient sums."""

from __future__ import annotations

import copy

import pytest
import torch

from privseg.errors import ConfigError
from privseg.models import build_model
from privseg.models.lora import LORA_RANK, add_lora, check_rank, delta_weight, is_adapted, lora_params
from privseg.privacy.grad_sample import GRAD_METHODS, NORM_SLACK, global_norm
from privseg.train.losses import SegLoss


def _net(dims: int = 3, classes: int = 3):
    torch.manual_seed(0)
    return build_model("unet_tiny", in_channels=1, num_classes=classes, spatial_dims=dims)


def _convs(model):
    return [m for m in model.modules() if hasattr(m, "lora_A")]


def _nudge(model, scale: float = 0.05) -> None:
    """Move every adapter weight, as training would (B leaves zero)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_params(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_adapters_start_at_the_weights_and_the_model_saves_plain_weights():
    model = _net()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 1, 16, 16, 16)
    names = add_lora(model)
    assert is_adapted(model) and not is_adapted(plain)
    convs = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Conv3d)]
    assert names == convs  # every convolution of the U-Net
    assert torch.equal(model(x), plain(x))  # B = 0: exactly the warm start, bit for bit
    assert all(not c.lora_B.weight.any() for c in _convs(model))
    got, want = model.state_dict(), plain.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())  # no adapter keys
    # while B is zero the saved weight is W itself: writing into it loads the model (federated load_arrays)
    with torch.no_grad():
        got["encoder.0.conv_0.conv.weight"].add_(1.0)
    assert not torch.equal(model(x), plain(x))
    # rank-r factors of each kernel matrix, capped at its full rank; far fewer than the weights
    n_lora = sum(p.numel() for p in lora_params(model))
    assert n_lora == sum(min(LORA_RANK, c.out_channels, c.weight[0].numel()) * (c.weight[0].numel() + c.out_channels)
                         for c in _convs(model))
    assert n_lora < sum(p.numel() for p in plain.parameters()) / 4
    assert add_lora(model) == names and len(lora_params(model)) == 2 * len(names)  # adding again: no change


@pytest.mark.parametrize("dims", [2, 3])
def test_merged_weights_compute_what_the_adapted_model_computes(dims):
    model = _net(dims)
    add_lora(model, 2)
    _nudge(model)
    x = torch.randn(2, 1, *(16,) * dims)
    with torch.no_grad():
        adapted = model(x)
        merged = build_model("unet_tiny", in_channels=1, num_classes=3, spatial_dims=dims)
        merged.load_state_dict(model.state_dict())  # what a checkpoint holds: an ordinary model
        assert torch.allclose(merged(x), adapted, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(merged(x), _net(dims)(x), atol=1e-3)  # the adapters did change the model
        conv = _convs(model)[1]
        w = model.state_dict()["encoder.0.conv_1.conv.weight"]
        assert torch.allclose(w, conv.weight + delta_weight(conv)) and not torch.equal(w, conv.weight)
        # loading plain weights into an adapted model: W takes them, the adapters restart at B = 0
        a_before = [c.lora_A.weight.clone() for c in _convs(model)]
        model.load_state_dict(merged.state_dict())
        assert all(not c.lora_B.weight.any() for c in _convs(model))
        assert all(torch.equal(c.lora_A.weight, a) for c, a in zip(_convs(model), a_before, strict=True))
        assert torch.equal(model(x), merged(x))


@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_per_patient_adapter_gradients_match_a_loop_over_patients(method):
    model = _net(2, classes=2)
    add_lora(model, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_params(model):
        p.requires_grad_(True)
    _nudge(model)  # B != 0, so A gets a gradient too
    g = torch.Generator().manual_seed(1)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    x, y = torch.randn(6, 1, 16, 16, generator=g), torch.randint(0, 2, (6, 1, 16, 16), generator=g)
    loss_fn, clip, params = SegLoss(), 0.05, lora_params(model)
    want, norms_want = [torch.zeros_like(p) for p in params], []
    for u in range(3):  # the definition: each patient's mean-loss gradient, clipped to norm <= C, summed
        grads = torch.autograd.grad(loss_fn.per_sample(model(x[owner == u]), y[owner == u]).mean(), params)
        norm = float(global_norm(grads))
        norms_want.append(norm)
        for w, gr in zip(want, grads, strict=True):
            w.add_(gr * min(1.0, clip / (norm * (1 + NORM_SLACK))))
    acc, norms, _ = GRAD_METHODS[method](model, loss_fn, x, y, owner, clip)
    assert len(acc) == len(params) and all(a.shape == p.shape for a, p in zip(acc, params, strict=True))
    assert torch.allclose(norms.detach().double(), torch.tensor(norms_want, dtype=torch.float64), rtol=1e-4)
    assert min(norms_want) > clip  # every patient clipped: the sums test the clipping too
    for a, w in zip(acc, want, strict=True):
        assert torch.allclose(a, w, atol=1e-7, rtol=1e-4)
    assert all(w.abs().sum() > 0 for w in want)  # A and B both get gradients


def test_a_bad_rank_is_a_config_error_naming_the_setting():
    for bad in (0, -1, 2.5, "4", True, None):
        with pytest.raises(ConfigError, match="lora_rank"):
            check_rank(bad)
    with pytest.raises(ConfigError, match="lora_rank"):
        add_lora(_net(), 0)
    # unet_tiny's widest kernel matrix has rank 32 (32 output channels): rank 32 is low-rank nowhere
    with pytest.raises(ConfigError, match=r"lora_rank \(--lora-rank\) 32 is at least the full rank .* below 32"):
        add_lora(_net(), 32)
    assert add_lora(_net(), 31)
    model = _net()
    add_lora(model, 2)
    with pytest.raises(ConfigError, match="already has adapters of rank"):
        add_lora(model, 4)
    with pytest.raises(ConfigError, match="no convolution"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_cli_trains_lora_from_a_warm_start_and_saves_an_ordinary_model(tiny_cohort, tmp_path):
    from privseg.cli import main
    from privseg.train import TrainConfig
    from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    cfg = TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", patch_size=(16, 16, 16), device="cpu")
    torch.manual_seed(7)
    pub = save_checkpoint(tmp_path / "pub.pt", build_model("unet_tiny", in_channels=1, num_classes=cfg.num_classes),
                          config=cfg.to_dict())
    start = load_checkpoint(pub)["model"]
    common = ["--cohort", str(tiny_cohort.root), "--model", "unet_tiny", "--patch", "16", "--steps", "3", "--init",
              str(pub), "--device", "cpu", "-q"]
    assert main(["train", *common, "--trainable", "lora", "--lora-rank", "2", "--out", str(tmp_path / "run")]) == 0
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["config"]["trainable"] == "lora" and payload["config"]["lora_rank"] == 2
    end = payload["model"]
    assert list(end) == list(start)  # the merged weights under the plain names, no adapter keys
    convs = [k for k in start if k.endswith("conv.weight")]
    frozen = [k for k in start if k not in convs]  # the norms' scales and shifts, the biases
    assert any(".adn.N." in k for k in frozen) and all(torch.equal(end[k], start[k]) for k in frozen)
    assert convs and all(not torch.equal(end[k], start[k]) for k in convs)  # every kernel moved, through its adapter
    assert not is_adapted(model_from_checkpoint(payload))  # what export, inference and erasure load
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--cohort", str(tiny_cohort.root)]) == 0
    assert main(["train", *common, "--trainable", "lora", "--lora-rank", "32", "--out", str(tmp_path / "bad")]) == 2


def test_a_dp_federation_fine_tunes_adapters_and_exchanges_plain_weights(tmp_path):
    from dataclasses import replace

    from conftest import make_tiny_cohort, tiny_fl_config
    from privseg.federated import RunState
    from privseg.federated.simulation import simulate_inprocess
    from privseg.privacy import DPConfig
    from privseg.train.checkpoint import load_checkpoint

    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=4, size=16)
    cfg = tiny_fl_config(cohort, lr=1e-2, subjects_per_step=1, name="lora", rounds=2, local_steps=1,
                         privacy=DPConfig(epsilon=50.0, delta=1e-3, clip="fixed", sampling_rate=0.5,
                                          noise_multiplier=1.0, ema=0, erasure_reserve=0))
    cfg = replace(cfg, train=replace(cfg.train, trainable="lora", lora_rank=2, steps=2))
    state = simulate_inprocess(cfg, tmp_path / "run")
    assert state.status == "finished"
    run = RunState.load(tmp_path / "run")
    start, end = (load_checkpoint(run.checkpoint_path(r))["model"] for r in (0, 2))
    plain = build_model("unet_tiny", in_channels=1, num_classes=cfg.train.num_classes).state_dict()
    assert list(start) == list(end) == list(plain)  # global models are ordinary U-Nets
    convs = [k for k in start if k.endswith("conv.weight")]
    assert all(not torch.equal(end[k], start[k]) for k in convs)  # each site's adapters, merged, then averaged
    frozen = [k for k in start if k not in convs]  # the norms' scales and shifts, the biases
    assert any(".adn.N." in k for k in frozen) and all(torch.allclose(end[k], start[k]) for k in frozen)


def test_central_dp_with_lora_serves_the_merged_average(tiny_cohort, tmp_path):
    from privseg.privacy import DPConfig, train_private
    from privseg.train import TrainConfig
    from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint

    cfg = TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", patch_size=(16, 16, 16), steps=3, device="cpu",
                                 trainable="lora", lora_rank=2)
    dp = DPConfig(epsilon=50.0, delta=1e-2, clip="normalise", plan="auto", cohort_size=2, epochs=2.0, aug_mult=1,
                  ema=0.9, allow_large_delta=True, reproducible_noise=True)
    res = train_private(tiny_cohort, cfg, dp, tmp_path / "dp")
    payload = load_checkpoint(res["checkpoint"])
    plain = list(build_model("unet_tiny", in_channels=1, num_classes=cfg.num_classes).state_dict())
    assert list(payload["model"]) == list(payload["train_model"]) == plain  # the EMA and the iterate: plain weights
    served = res["model"].state_dict()
    assert all(torch.equal(served[k], v) for k, v in payload["model"].items())  # the run returns what it serves
    assert not all(torch.equal(payload["model"][k], v) for k, v in payload["train_model"].items())  # an average
    assert not is_adapted(model_from_checkpoint(payload))
