"""The DP training recipe (issue 26): augmentation multiplicity, the step planner, the weight EMA
served under DP, the normalising clip rule; and a public sampling rate (issue 25, item 6)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import volume_items
from privseg.errors import ConfigError
from privseg.privacy import (
    CLIP_RULES,
    BudgetLedger,
    DPConfig,
    NoiseSource,
    PatientDPSGD,
    StepEvent,
    make_plan,
    make_private,
)
from privseg.privacy.accountant import epsilon
from privseg.privacy.clipping import Normalising, clip_factors, make_clipper
from privseg.privacy.grad_sample import GRAD_METHODS, global_norm
from privseg.privacy.plan import NOISE_REF, plan_for, plan_training, public_cohort_size
from privseg.train import TrainConfig
from privseg.train.checkpoint import load_checkpoint, save_checkpoint, training_weights
from privseg.train.ema import WeightEMA, ema_of_checkpoints, load_ema, warmup_decay
from privseg.train.losses import SegLoss


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv3d(4, 3, 1))


def _grads(model, loss_fn, x, y) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn.per_sample(model(x), y).mean(), params))


# -- 1. augmentation multiplicity: K patches averaged, then one clip ----------------------------------------

@pytest.mark.parametrize("method", ["loop", "bk"])
def test_k_patches_are_averaged_before_one_clip(method):
    model, loss_fn = _toy(), SegLoss()
    torch.manual_seed(1)
    k = 4
    x = torch.randn(k, 1, 8, 8, 8)
    y = torch.randint(0, 3, (k, 1, 8, 8, 8)).float()
    per_patch = [_grads(model, loss_fn, x[i:i + 1], y[i:i + 1]) for i in range(k)]
    mean = [torch.stack(gs).mean(0) for gs in zip(*per_patch, strict=True)]
    clip = 0.5 * float(global_norm(mean))  # the averaged gradient is clipped
    acc, norms, _ = GRAD_METHODS[method](model, loss_fn, x, y, torch.zeros(k, dtype=torch.long), clip)
    assert len(norms) == 1 and math.isclose(float(norms[0]), float(global_norm(mean)), rel_tol=1e-4)
    assert float(global_norm(acc)) <= clip  # one patient's contribution: sensitivity <= C
    expected = [g * (clip / float(global_norm(mean))) for g in mean]
    for a, e in zip(acc, expected, strict=True):
        assert torch.allclose(a, e, rtol=1e-3, atol=1e-7)
    # clipping each patch and then averaging is another mechanism, and gives another sum
    per_patch_clipped = [torch.stack([g * min(1.0, clip / float(global_norm(gs))) for gs in per_patch for g in [gs[j]]]
                                     ).mean(0) for j in range(len(mean))]
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(acc, per_patch_clipped, strict=True))


@pytest.mark.parametrize("aug_mult,k", [(3, 3), (0, 1)])  # 0: a spec from before the recipe, patches_per_subject
def test_engine_draws_k_patches_per_sampled_patient(aug_mult, k):
    items = volume_items(6)
    cfg = TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), patches_per_subject=1, device="cpu", num_classes=3)
    eng = PatientDPSGD(q=0.5, n_subjects=6, multipliers=[1.0] * 4, noise=NoiseSource.reproducible(0),
                       aug_mult=aug_mult, clip_rule="fixed")
    seen, step = [], eng.step

    def spy(model, optimizer, loss_fn, batch):
        seen.append((batch.patients, 0 if batch.images is None else batch.images.shape[0],
                     [] if batch.owner is None else torch.bincount(batch.owner).tolist()))
        return step(model, optimizer, loss_fn, batch)

    eng.step = spy
    model = _toy()
    eng.train_steps(model, torch.optim.SGD(model.parameters(), lr=0.0), items, cfg, 0, 4)
    assert sum(p for p, _, _ in seen) > 0
    assert all(n == k * p and counts == [k] * p for p, n, counts in seen)  # K patches from each patient
    with pytest.raises(ConfigError, match="augmentation multiplicity"):
        PatientDPSGD(q=0.5, n_subjects=6, multipliers=[1.0], aug_mult=-1)


# -- 4. the normalising clip rule ---------------------------------------------------------------------------

def test_normalising_rule_bounds_every_contribution_and_is_registered():
    assert {"fixed", "adaptive", "normalise"} <= set(CLIP_RULES)
    norms = torch.tensor([1e-4, 0.5, 1.0, 1e3], dtype=torch.float64)
    rule = Normalising(2.0, 0.01)
    scaled = norms * clip_factors(norms, rule)
    assert torch.all(scaled < 2.0)
    assert torch.allclose(scaled, 2.0 * norms / (norms + 0.01))  # g / (|g| + gamma), Bu et al. 2023
    assert scaled[-1] > 1.99 and scaled[0] < 0.03  # large ones normalised to ~C, tiny ones not blown up
    clipper = make_clipper("normalise", 1.0, 2.0, 1.5, {"gamma": 0.01})
    assert clipper.update_noise_multiplier(1.5) == 1.5  # sensitivity C: all the step's noise on the update
    model, loss_fn = _toy(), SegLoss()
    x, y = torch.randn(4, 1, 8, 8, 8), torch.randint(0, 3, (4, 1, 8, 8, 8)).float()
    owner = torch.tensor([0, 0, 1, 1])
    acc, norms, _ = GRAD_METHODS["loop"](model, loss_fn, x, y, owner, clipper.scale)
    for u in (0, 1):  # each patient alone: its normalised contribution has norm |g|/(|g| + gamma) < 1
        one, n1, _ = GRAD_METHODS["loop"](model, loss_fn, x[owner == u], y[owner == u], owner[owner == u],
                                          clipper.scale)
        assert float(global_norm(one)) < 1.0
        assert math.isclose(float(global_norm(one)), float(n1[0]) / (float(n1[0]) * (1 + 1e-5) + 0.01), rel_tol=1e-3)
    dp = DPConfig(clip="normalise", epsilon=8.0, delta=1e-3)
    assert make_plan(dp, "H1", 20, 2, 10).base_sigma > 0


def test_normalise_is_the_default_clip_and_client_level_dp_applies_it():
    """The recipe's rule is the default (not adaptive, which lost to fixed and warns at a site's few patients
    a step); a site-level DP run asked for it normalises each site's update instead of clipping it."""
    from privseg.privacy.client_dp import ClientLevelDP

    assert DPConfig().clip == "normalise"
    glob = {"w": np.zeros(4, np.float32)}
    scaled = {}
    for rule in ("fixed", "normalise"):
        mechanism = ClientLevelDP(n_sites=2, clip=rule, clip_norm=1.0, noise_multiplier=1.0, delta=1e-2,
                                  noise=NoiseSource.reproducible(0))
        updates = [{"w": np.asarray(w, np.float32)} for w in ([0.3, 0, 0, 0], [0, 40.0, 0, 0])]
        out = mechanism.clip_round(1, glob, updates)
        scaled[rule] = [float(np.linalg.norm(u["w"])) for u in out]
    assert scaled["fixed"] == pytest.approx([0.3, 1.0])  # min(1, C/|u|): a small update stays small
    assert scaled["normalise"] == pytest.approx([0.3 / 0.31, 40.0 / 40.01])  # C u/(|u| + 0.01): all near C, < C


# -- 2. the step planner: public figures only ----------------------------------------------------------------

def test_public_cohort_size_rounds_down_to_two_significant_digits():
    assert [public_cohort_size(n) for n in (1, 9, 12, 25, 99, 100, 137, 1234)] == [1, 9, 12, 25, 99, 100, 130, 1200]
    with pytest.raises(ConfigError):
        public_cohort_size(0)


def test_plan_follows_tan_and_scales_the_learning_rate_to_the_noise():
    few = plan_training(8.0, 1e-5, 100, steps=100, epochs=50, base_lr=2e-3)
    many = plan_training(8.0, 1e-5, 100, steps=400, epochs=50, base_lr=2e-3)
    assert few.sampling_rate == 0.5 and many.sampling_rate == 0.125  # q = epochs / steps
    assert few.expected_batch == 50 and few.noise_per_patient == few.noise_multiplier * 1.0 / 50
    assert few.noise_per_patient < many.noise_per_patient  # fewer, larger steps: less noise per step (TAN)
    for p in (few, many):  # each spends the budget, and the lr follows the noise (DP-AdamBC)
        assert 7.95 < epsilon([StepEvent(p.sampling_rate, p.noise_multiplier, p.steps)], 1e-5) <= 8.0 + 1e-6
        assert math.isclose(p.lr, 2e-3 * p.noise_per_patient / NOISE_REF)
    chosen = plan_training(8.0, 1e-5, 12, epochs=30)  # only epochs: full-batch steps, at least MIN_STEPS
    assert chosen.steps == 100 and math.isclose(chosen.sampling_rate, 0.3)
    text = few.describe()
    assert "declared cohort 100" in text and f"{few.noise_per_patient:.4g}" in text and "100 steps" in text
    with pytest.raises(ConfigError, match="delta"):
        plan_training(8.0, 0.05, 30, steps=10)  # delta >= 1/declared size


def _round_reply(tmp_path, name: str, n: int, dp: DPConfig) -> dict:
    items = volume_items(n, size=10, seed=n)
    tc = TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), device="cpu", subjects_per_step=2,
                     patches_per_subject=1, steps=2, num_classes=3)
    private = make_private(dp, site="H1", items=items, ledger=BudgetLedger(tmp_path / name / "privacy.sqlite"),
                           noise=NoiseSource.reproducible(0), subjects_per_step=tc.subjects_per_step,
                           total_steps=tc.steps)
    model = tc.build_model()
    private.train_round(model, torch.optim.AdamW(model.parameters(), lr=tc.lr), items, tc, 1, 0, 2)
    reply = private.round_metrics()
    return {k: reply[k] for k in ("dp-epsilon", "dp-delta", "dp-budget", "dp-noise-multiplier", "dp-clip")}


def test_two_sites_with_the_same_declared_size_reply_the_same(tmp_path):
    """The plan never reads the exact n: sites of 30 and 34 patients that both declare 30 make the same
    plan and send the same accounted figures; without the planner (q = subjects per step / n) they differ."""
    dp = DPConfig(epsilon=8.0, delta=1e-3, clip="fixed", plan="auto", cohort_size=30, epochs=1.0, aug_mult=1)
    a, b = make_plan(dp, "H1", 30, 2, 2), make_plan(dp, "H1", 34, 2, 2)
    assert (a.q, a.base_sigma, a.expected_batch, a.lr_scale, a.cohort_size) == \
        (b.q, b.base_sigma, b.expected_batch, b.lr_scale, b.cohort_size)
    assert a.expected_batch == 0.5 * 30 and a.lr_scale == plan_for(dp, "H1", 2).lr_scale
    assert _round_reply(tmp_path, "a", 30, dp) == _round_reply(tmp_path, "b", 34, dp)
    old = replace(dp, plan="none")
    assert _round_reply(tmp_path, "c", 30, old)["dp-noise-multiplier"] != \
        _round_reply(tmp_path, "d", 34, old)["dp-noise-multiplier"]


def test_site_declares_its_own_size_and_the_spec_travels():
    dp = DPConfig.from_options(unit="patient", plan="auto", cohort_size=40, aug_mult=2, ema=0.99, epochs=20.0,
                               sampling_rate=None, site_budget=["H2=3"])
    dp = replace(dp, sites={**dp.sites, "H2": {**dp.sites["H2"], "cohort_size": 137}})
    assert dp.for_site("H1").cohort_size == 40 and dp.for_site("H2").cohort_size == 137
    assert plan_for(dp, "H2", 100).cohort_size == 130 and plan_for(dp, "H2", 100).epsilon == 3.0
    assert DPConfig.from_run_config(dp.to_run_config()) == dp
    for bad in ({"plan": "manual"}, {"aug_mult": -1}, {"ema": 1.0}, {"epochs": 0}, {"sites": {"H1": {"n": 3}}}):
        with pytest.raises(ConfigError):
            DPConfig(**bad)
    assert (DPConfig().plan, DPConfig().aug_mult, DPConfig().ema) == ("auto", 4, 0.999)  # the recipe by default
    # a spec saved or sent before the recipe existed keeps what it ran with
    old = {k: v for k, v in DPConfig(clip="fixed").to_dict().items() if k not in ("plan", "aug_mult", "ema",
                                                                               "cohort_size", "epochs")}
    for spec in (DPConfig.from_dict(old), DPConfig.from_run_config(
            {k: v for k, v in DPConfig(clip="fixed").to_run_config().items()
             if k not in ("dp-plan", "dp-aug-mult", "dp-ema")})):
        assert (spec.plan, spec.aug_mult, spec.ema, spec.clip) == ("none", 0, 0.0, "fixed")


# -- 3. the weight EMA served under DP ----------------------------------------------------------------------

def _lin(w: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    return m


@pytest.mark.parametrize("decay", [0.05, 0.9])
def test_ema_equals_its_closed_form(decay):
    """ema_T = prod_t d_t * w_0 + sum_t (1 - d_t) prod_{s>t} d_s * w_t with d_t = min(decay, (1+t)/(10+t));
    at decay 0.05 (below every warm-up value) that is decay^T w_0 + (1 - decay) sum_t decay^(T-t) w_t."""
    ws = [3.0, 1.0, -2.0, 5.0, 0.5, 4.0, 7.0]
    model = _lin(ws[0])
    ema = WeightEMA(model, decay)
    for w in ws[1:]:
        model.weight.data.fill_(w)
        ema.update(model)
    d = [warmup_decay(decay, t) for t in range(len(ws) - 1)]
    closed = math.prod(d) * ws[0] + sum((1 - d[t]) * math.prod(d[t + 1:]) * ws[t + 1] for t in range(len(d)))
    assert math.isclose(float(ema.state_dict()["weight"]), closed, rel_tol=1e-5)
    if decay == 0.05:
        t_max = len(ws) - 1
        plain = decay ** t_max * ws[0] + (1 - decay) * sum(decay ** (t_max - t) * ws[t] for t in range(1, len(ws)))
        assert math.isclose(float(ema.state_dict()["weight"]), plain, rel_tol=1e-5)
    batched = WeightEMA(_lin(ws[0]), decay)
    batched.update(_lin(2.0), steps=3)
    single = WeightEMA(_lin(ws[0]), decay)
    for _ in range(3):
        single.update(_lin(2.0))
    assert math.isclose(float(batched.state_dict()["weight"]), float(single.state_dict()["weight"]), rel_tol=1e-5)


def test_checkpoint_serves_the_ema_and_resumes_from_the_last_iterate(tmp_path):
    model = TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), num_classes=3).build_model()
    ema = WeightEMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    cfg = TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), num_classes=3).to_dict()
    path = save_checkpoint(tmp_path / "last.pt", model, config=cfg, step=1, ema=ema)
    payload = load_checkpoint(path)
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point())
    assert torch.equal(training_weights(payload)[name], model.state_dict()[name])  # resume: the last iterate
    assert torch.allclose(payload["model"][name], ema.state_dict(model)[name])  # served: the average
    assert not torch.allclose(payload["model"][name], model.state_dict()[name])
    again = load_ema(payload, model)
    assert again.updates == 1 and again.decay == 0.9
    other = save_checkpoint(tmp_path / "plain.pt", model, config=cfg)
    assert load_ema(load_checkpoint(other), model) is None
    averaged = ema_of_checkpoints([other, other], 0.5)
    assert torch.allclose(averaged[name], model.state_dict()[name])


def test_central_dp_serves_the_ema_and_a_resume_repeats_the_run(tiny_cohort, tmp_path):
    from privseg.privacy import train_private

    dp = DPConfig(epsilon=50.0, delta=1e-2, clip="fixed", plan="auto", cohort_size=2, epochs=4.0, aug_mult=2,
                  ema=0.9, allow_large_delta=True, reproducible_noise=True)
    cfg = replace(TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", steps=4, patch_size=(16, 16, 16),
                                         device="cpu"), checkpoint_every=2)
    whole = train_private(tiny_cohort, cfg, dp, tmp_path / "whole")

    def crash(s, n, loss):
        if s == 3:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_private(tiny_cohort, cfg, dp, tmp_path / "cut", on_step=crash)
    resumed = train_private(tiny_cohort, cfg, dp, tmp_path / "cut")
    assert resumed["resumed_from"] == 2
    served = load_checkpoint(tmp_path / "whole" / "last.pt")
    raw = served["train_model"]
    assert served["ema"]["updates"] == 4
    for k, v in whole["model"].state_dict().items():
        assert torch.equal(v, served["model"][k])  # the returned model is the served average
        assert torch.equal(v, resumed["model"].state_dict()[k])  # bit-identical after a resume
    assert any(not torch.equal(served["model"][k], raw[k]) for k in raw)
    assert whole["plan"]["expected_batch"] == 2.0 and whole["q"] == 1.0  # q = epochs / steps


def test_privacy_train_prints_the_plan_from_the_declared_size(tiny_cohort, tmp_path, capsys):
    from privseg.cli import main

    args = ["privacy", "train", "--cohort", str(tiny_cohort.root), "--model", "unet_tiny", "--patch", "16", "--steps",
            "2", "--device", "cpu", "--epsilon", "8", "--delta", "1e-3", "--cohort-size", "137", "--epochs", "1",
            "--aug-mult", "1", "--clip", "normalise"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    plan = plan_training(8.0, 1e-3, 137, steps=2, epochs=1, base_lr=TrainConfig().lr)
    assert "declared cohort 130 patients" in out
    assert f"noise per patient sigma*C/B = {plan.noise_per_patient:.4g}" in out
    assert f"sampling rate q = {plan.sampling_rate:.4g}" in out and f"learning rate {plan.lr:.3g}" in out
    payload = load_checkpoint(tmp_path / "a" / "last.pt")
    assert payload["ema"]["updates"] == 2 and "train_model" in payload  # EMA served by default
    assert main([*args[:-2], "--clip", "nope", "--out", str(tmp_path / "b")]) == 2


def test_readme_quick_tour_trains_with_the_dp_defaults(tiny_cohort, tmp_path, capsys):
    """The README's quick tour runs DP training as written, on the defaults (plan auto, K crops, normalising
    clip, EMA served); only the cohort, the output folder and the steps are swapped for tiny ones here."""
    import shlex
    from pathlib import Path

    from privseg.cli import main

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    tour = readme.split("## Quick tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [shlex.split(ln.split("#", 1)[0]) for ln in tour.splitlines() if ln.startswith("privseg privacy ")]
    train, status = lines[0][1:], lines[1][1:]
    assert train[:2] == ["privacy", "train"] and status[:2] == ["privacy", "status"]
    assert not {"--clip", "--plan", "--aug-mult", "--ema", "--epsilon", "--delta"} & set(train)  # the defaults
    swap = {"--cohort": str(tiny_cohort.root), "--out": str(tmp_path / "dp"), "--steps": "2", "--patch": "16"}
    args = [swap.get(train[i - 1], a) if i else a for i, a in enumerate(train)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "DP plan: epsilon 8 at delta 1e-05; declared cohort 18 patients" in out and "noise per patient" in out
    payload = load_checkpoint(tmp_path / "dp" / "last.pt")
    dp = payload["extra"]["dp"]
    assert "ema" in payload and dp["clip"] == "normalise" and dp["aug_mult"] == 4 and dp["plan"] == "auto"
    assert main([*status[:2], str(tmp_path / "dp")]) == 0 and "private" in capsys.readouterr().out
