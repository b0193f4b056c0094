"""The empirical DP audit's estimators and canary (privseg.audit.dp): each can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privseg.audit.dp import (
    DiracCanary,
    clopper_pearson,
    cp_lower_bound,
    exact_epsilon,
    gdp_epsilon,
    gdp_lower_bound,
    observe_gradient,
    quiet_coordinate,
)


def test_clopper_pearson_matches_the_textbook_interval():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.3085, abs=1e-4)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.1871, abs=1e-4) and hi == pytest.approx(0.8129, abs=1e-4)


@pytest.mark.parametrize("sigma", [0.6, 1.2, 3.0])
def test_a_gaussian_mechanism_is_exactly_its_gdp_epsilon(sigma):
    """One Gaussian step (q = 1) is 1/sigma-GDP: both conversions give the same epsilon."""
    assert gdp_epsilon(1 / sigma, 1e-5) == pytest.approx(exact_epsilon(sigma, 1.0, 1, 1e-5), rel=0.02)


def test_gdp_fit_recovers_mu_and_its_lower_bound_sits_below():
    rng = np.random.default_rng(0)
    mu = 1.0
    fit = gdp_lower_bound(rng.normal(mu, 1, 4000), rng.normal(0, 1, 4000), 1e-5)
    assert fit["mu"] == pytest.approx(mu, abs=0.06) and fit["mu_lower"] < fit["mu"]
    assert fit["epsilon"] < fit["epsilon_point"] <= gdp_epsilon(mu + 0.1, 1e-5)
    assert gdp_lower_bound(rng.normal(0, 1, 500), rng.normal(0, 1, 500), 1e-5)["epsilon"] < 0.5


def test_cp_bound_chooses_its_threshold_on_other_trials():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(3, 1, 2000), rng.normal(0, 1, 2000)
    res = cp_lower_bound(s_in, s_out, 1e-5)
    assert res["trials_chosen_on"] == 2000 and res["trials_evaluated"] == 2000
    assert 1.0 < res["epsilon"] < gdp_epsilon(3.0, 1e-5)  # a valid lower bound of a 3-GDP mechanism
    # a threshold fitted to noise on one half certifies nothing on the other
    assert cp_lower_bound(rng.normal(0, 1, 400), rng.normal(0, 1, 400), 1e-5)["epsilon"] < 0.3


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
