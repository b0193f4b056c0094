"""Model zoo: output contract, norms, encoder/decoder split, MedicalNet weight loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privseg.errors import CheckpointError, ConfigError
from privseg.models import (
    MODELS,
    MedicalNetResNet,
    build_model,
    encoder_decoder_modules,
    encoder_decoder_params,
    load_medicalnet_weights,
    register_model,
    reinit_encoder,
)

# ResNet-34/50 are heavy on CPU; 16³ still leaves a 2³ map after the three stride-2 steps.
SIZES = {"unet": 32, "unet_tiny": 32, "resnet10": 32, "resnet18": 24, "resnet34": 16, "resnet50": 16}
NORM_TYPES = {"batch": nn.modules.batchnorm._BatchNorm, "group": nn.GroupNorm, "instance": nn.InstanceNorm3d}


def test_registry_names():
    assert set(SIZES) <= set(MODELS)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_output_at_input_size_and_encoder_decoder_partition(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, num_classes=3).eval()
    s = SIZES[name]
    with torch.no_grad():
        out = model(torch.randn(1, 2, s, s, s))
    assert out.shape == (1, 3, s, s, s)
    assert torch.isfinite(out).all()

    enc, dec = encoder_decoder_params(model)
    assert enc and dec
    ids_enc, ids_dec = {id(p) for p in enc}, {id(p) for p in dec}
    assert not ids_enc & ids_dec
    assert ids_enc | ids_dec == {id(p) for p in model.parameters()}
    assert len(enc) + len(dec) == len(list(model.parameters()))
    if isinstance(model, MedicalNetResNet):
        assert ids_dec == {id(p) for p in model.conv_seg.parameters()}
    enc_m, dec_m = encoder_decoder_modules(model)  # the module lists agree with the parameter split
    assert {id(p) for m in dec_m for p in m.parameters()} == ids_dec
    assert {id(p) for m in enc_m for p in m.parameters()} == ids_enc


@pytest.mark.parametrize("name", ["unet", "unet_tiny", "resnet10"])
def test_odd_sizes_3d(name):
    model = build_model(name, in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 17, 20, 23))
    assert out.shape == (1, 2, 17, 20, 23)


@pytest.mark.parametrize("name", ["unet", "unet_tiny"])
@pytest.mark.parametrize("size", [(32, 32), (37, 29)])
def test_unet_2d(name, size):
    model = build_model(name, in_channels=3, num_classes=4, spatial_dims=2)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 4, *size)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize("name", ["unet_tiny", "resnet10"])
def test_norms_train_step(name, norm):
    model = build_model(name, in_channels=1, num_classes=2, norm=norm)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]
    assert norms and all(isinstance(m, NORM_TYPES[norm]) for m in norms)
    if norm == "group":
        assert all(m.num_channels % m.num_groups == 0 and m.num_groups > 1 for m in norms)
    out = model(torch.randn(2, 1, 16, 16, 16))
    assert out.shape == (2, 2, 16, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_no_transposed_convolutions_where_promised():
    def has_transpose(m: nn.Module) -> bool:
        return any(isinstance(x, nn.modules.conv._ConvTransposeNd) for x in m.modules())

    assert not has_transpose(build_model("unet", in_channels=1, num_classes=2))
    assert not has_transpose(build_model("unet", in_channels=1, num_classes=2, spatial_dims=2))
    assert has_transpose(build_model("resnet10", in_channels=1, num_classes=2, norm="batch"))
    tri = build_model("resnet10", in_channels=1, num_classes=2, upsample="trilinear")
    assert not has_transpose(tri)
    with torch.no_grad():
        assert tri.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_bad_requests_raise_config_error():
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet18", in_channels=1, num_classes=2, spatial_dims=2)
    with pytest.raises(ConfigError, match="unet_tiny") as info:
        build_model("vnet", in_channels=1, num_classes=2)
    assert "resnet50" in str(info.value) and "vnet" in str(info.value)
    with pytest.raises(ConfigError, match="norm"):
        build_model("unet", in_channels=1, num_classes=2, norm="layer")
    with pytest.raises(ConfigError, match="num_groups"):
        build_model("unet", in_channels=1, num_classes=2, num_groups=3)
    with pytest.raises(ConfigError, match="unet"):
        build_model("unet", in_channels=1, num_classes=2, bogus=1)
    with pytest.raises(ConfigError):
        build_model("unet", in_channels=0, num_classes=2)


def test_register_model_is_one_function():
    @register_model("test_linear_seg")
    def _linear(*, in_channels, num_classes, spatial_dims, norm, **kwargs):
        return build_model("unet_tiny", in_channels=in_channels, num_classes=num_classes,
                           spatial_dims=spatial_dims, norm=norm, features=(4, 8))

    try:
        model = build_model("test_linear_seg", in_channels=1, num_classes=2, spatial_dims=2)
        assert model(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)
        with pytest.raises(ConfigError, match="already registered"):
            register_model("test_linear_seg")(_linear)
    finally:
        MODELS.pop("test_linear_seg", None)


@pytest.mark.parametrize("name", ["unet_tiny", "resnet10"])
def test_reinit_encoder_keeps_decoder(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=2, norm="batch")
    enc, dec = encoder_decoder_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before_enc = [p.detach().clone() for p in enc]
    before_dec = [p.detach().clone() for p in dec]
    reinit_encoder(model)
    assert all(torch.equal(a, b) for a, b in zip(before_dec, dec, strict=True))
    changed = [not torch.equal(a, b) for a, b in zip(before_enc, enc, strict=True)]
    assert all(changed)


def test_split_sees_through_wrappers():
    model = build_model("unet_tiny", in_channels=1, num_classes=2)
    enc, dec = encoder_decoder_params(nn.DataParallel(model))
    assert {id(p) for p in dec} == {id(p) for m in model.decoder_modules() for p in m.parameters()}
    assert len(enc) + len(dec) == len(list(model.parameters()))


def test_medicalnet_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet10", in_channels=1, num_classes=2, norm="batch")
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)

    target = build_model("resnet10", in_channels=1, num_classes=5, norm="batch")
    report = load_medicalnet_weights(target, path)
    assert report["mismatched"] == ["conv_seg.6.weight"]
    assert report["missing"] == ["conv_seg.6.weight"]
    assert report["unexpected"] == []
    src, dst = source.state_dict(), target.state_dict()
    for key in dst:
        if key != "conv_seg.6.weight":
            assert torch.equal(src[key], dst[key]), key
    assert dst["conv_seg.6.weight"].shape[0] == 5

    # a raw state dict (no "state_dict" wrapper, no prefix) and another channel count
    raw = tmp_path / "raw.pth"
    torch.save(source.state_dict(), raw)
    three = build_model("resnet10", in_channels=3, num_classes=2, norm="group")
    report = load_medicalnet_weights(three, raw)
    assert report["mismatched"] == ["conv1.weight"] and report["missing"] == ["conv1.weight"]
    assert any(k.endswith("running_mean") for k in report["unexpected"])  # GroupNorm has no running stats
    assert torch.equal(three.layer1[0].conv1.weight, source.layer1[0].conv1.weight)

    via_registry = build_model("resnet10", in_channels=1, num_classes=2, norm="batch", pretrained=path)
    assert via_registry.pretrained_report["missing"] == []


def test_medicalnet_shortcut_a_hint(tmp_path):
    a = build_model("resnet10", in_channels=1, num_classes=2, norm="batch", shortcut="A")
    assert not any("downsample" in k for k in a.state_dict())
    path = tmp_path / "resnet_a.pth"
    torch.save({"state_dict": a.state_dict()}, path)
    b = build_model("resnet10", in_channels=1, num_classes=2, norm="batch")
    with pytest.warns(UserWarning, match="shortcut='A'"):
        report = load_medicalnet_weights(b, path)
    assert report["missing"] and all(".downsample." in k for k in report["missing"])


def test_medicalnet_bad_files(tmp_path):
    model = build_model("resnet10", in_channels=1, num_classes=2)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_medicalnet_weights(model, corrupt)
    with pytest.raises(CheckpointError, match="absent.pth"):
        load_medicalnet_weights(model, tmp_path / "absent.pth")
    not_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_state)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_medicalnet_weights(model, not_state)
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pth"):
        load_medicalnet_weights(model, foreign)
