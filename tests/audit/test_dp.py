"""The empirical DP audit's canary site (privseg.audit.dp); its estimators: test_epsilon.py."""

from __future__ import annotations

import pytest
import torch

from privseg.audit.dp import DiracCanary, observe_gradient, quiet_coordinate


def test_a_dirac_canary_moves_only_its_coordinate_by_one_clip_on_the_real_site(tmp_path):
    from privseg.models import build_model
    from privseg.privacy import BudgetLedger, DPConfig, NoiseSource, make_private

    g = torch.Generator().manual_seed(0)
    items = [{"image": (x := torch.randn(1, 16, 16, generator=g)), "label": (x > 0).long(), "patient": f"P{i}"}
             for i in range(3)]
    canary = {"image": torch.zeros(1, 16, 16), "label": torch.zeros(1, 16, 16, dtype=torch.long),
              "patient": "CANARY"}
    dp = DPConfig(epsilon=1e9, delta=1e-3, clip="fixed", clip_norm=0.5, noise_multiplier=1e-3, sampling_rate=1.0,
                  aug_mult=1, ema=0.0, allow_large_delta=True)

    class Cfg:
        patch_size, patches_per_subject, seed, subjects_per_step, lr = (16, 16), 1, 0, 3, 1e-3

    torch.manual_seed(0)
    init = build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2).state_dict()
    observed = {}
    for world, its in (("in", items + [canary]), ("out", items)):
        private = make_private(dp, site="H1", items=its, ledger=BudgetLedger(tmp_path / world / "p.sqlite"),
                               noise=NoiseSource.ephemeral(), subjects_per_step=3, total_steps=1)
        model = build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2)
        model.load_state_dict(init)
        if world == "in":
            j = quiet_coordinate(model, [torch.zeros_like(p) + k for k, p in enumerate(model.parameters())])
            DiracCanary("CANARY", j, magnitude=5.0).install(private.engine, its)
            with pytest.raises(Exception, match="already has a canary"):
                DiracCanary("CANARY", j, 5.0).install(private.engine, its)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        read = observe_gradient(opt, j)
        private.train_round(model, opt, its, Cfg(), 1, 0, 1)
        observed[world] = read()[0] * private.engine.expected_batch / private.engine.clip
    assert observed["in"] - observed["out"] == pytest.approx(1.0, abs=0.01)  # clipped to C: one unit of C/B
