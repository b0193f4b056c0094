"""Patient-level DP-SGD, private adaptive clipping, accounting and the budget ledger (issue #6)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from privseg.errors import BudgetExceededError, ConfigError
from privseg.models import build_model
from privseg.privacy import (
    BudgetLedger,
    DPConfig,
    PatientDPSGD,
    QuantileClipper,
    SampledBatch,
    StepEvent,
    calibrate_sigma,
    check_dp_model,
    epsilon,
    epsilon_dp_accounting,
    make_plan,
    schedule_multipliers,
    split_noise,
)
from privseg.privacy.clipping import default_sigma_b
from privseg.privacy.grad_sample import clipped_sum_bk, clipped_sum_loop, clipped_sum_vmap
from privseg.train.losses import SegLoss


def _tiny2d():
    torch.manual_seed(0)
    return build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2)


def _batch(owner: list[int], size: int = 16):
    g = torch.Generator().manual_seed(1)
    n = len(owner)
    return (torch.randn(n, 1, size, size, generator=g), torch.randint(0, 2, (n, 1, size, size), generator=g),
            torch.tensor(owner))


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_per_subject_clipping_bounds_each_subject_however_many_patches():
    model, loss_fn, clip = _tiny2d(), SegLoss(), 0.01
    images, labels, owner = _batch([0] * 6 + [1] * 2)  # subject 0 gives 6 patches, subject 1 gives 2
    total, norms, _ = clipped_sum_loop(model, loss_fn, images, labels, owner, clip)
    assert len(norms) == 2 and bool((norms > clip).all())  # both were clipped
    parts = []
    for u in (0, 1):
        idx = owner == u
        part, _, _ = clipped_sum_loop(model, loss_fn, images[idx], labels[idx], owner[idx], clip)
        assert _flat(part).norm() <= clip * (1 + 1e-4)  # one subject moves the sum by at most C
        parts.append(_flat(part))
    assert torch.allclose(_flat(total), parts[0] + parts[1], atol=1e-6)
    # vmap over subjects computes the same clipped sum (equal patch counts)
    images2, labels2, owner2 = _batch([0, 0, 1, 1, 2, 2])
    a, na, _ = clipped_sum_loop(model, loss_fn, images2, labels2, owner2, clip)
    b, nb, _ = clipped_sum_vmap(model, loss_fn, images2, labels2, owner2, clip)
    assert torch.allclose(na, nb, rtol=1e-4) and torch.allclose(_flat(a), _flat(b), atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_has_the_calibrated_std(adaptive):
    model = _tiny2d()
    z, clip, q, n = 1.3, 0.5, 0.25, 40
    eng = PatientDPSGD(q=q, n_subjects=n, multipliers=[z], clip_norm=clip,
                       clip_rule="adaptive" if adaptive else "fixed")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _flat([p.detach().clone() for p in model.parameters()])
    nobody = SampledBatch(id(eng), eng.step_no, None, None, None, 0)  # nobody sampled: the step is pure noise
    eng.step(model, opt, SegLoss(), nobody)
    step = before - _flat([p.detach() for p in model.parameters()])
    z_eff = split_noise(z, default_sigma_b(q * n, z)) if adaptive else z
    assert not adaptive or abs(z_eff / z - 1.1) < 1e-9  # m/20 = 0.5 is infeasible: 10 % inflation
    expected = z_eff * clip / (q * n)
    assert step.numel() > 10_000 and abs(float(step.std()) / expected - 1) < 0.03
    assert eng.events == [StepEvent(q, z, 1)]  # booked at the full z: the quantile release is paid for


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_private_quantile_estimator_converges_to_the_target_quantile(target):
    rng = np.random.default_rng(0)
    clipper = QuantileClipper(clip=0.05, target_quantile=target, lr=0.2, expected_m=100,
                              generator=torch.Generator().manual_seed(0))
    for _ in range(600):
        clipper.update(rng.lognormal(mean=0.0, sigma=0.5, size=rng.poisson(100)))
    true_q = math.exp(0.5 * float(torch.distributions.Normal(0, 1).icdf(torch.tensor(target))))
    final = float(np.mean(clipper.history[-100:]))
    assert abs(final / true_q - 1) < 0.1, (final, true_q)
    # counting CLIPPED updates instead (Flower 1.41) runs away: tests/federated/test_dp_strategy.py


def test_changing_schedule_composes_like_dp_accounting():
    events = [StepEvent(0.05, 1.2, 100), StepEvent(0.05, 0.9, 40), StepEvent(0.1, 2.0, 30), StepEvent(1.0, 4.0, 3)]
    events += [StepEvent(0.2, z, 1) for z in schedule_multipliers(1.5, 20, "decay")]
    for delta in (1e-5, 1e-3):
        ours, theirs = epsilon(events, delta), epsilon_dp_accounting(events, delta)
        assert abs(ours - theirs) / theirs < 1e-3
    sigma = calibrate_sigma(3.0, 1e-5, 0.1, 200)
    assert 2.99 < epsilon([StepEvent(0.1, sigma, 200)], 1e-5) <= 3.0 + 1e-9


def test_ledger_refuses_overspend_before_the_round(tmp_path):
    ledger = BudgetLedger(tmp_path / "privacy.sqlite")
    plan = make_plan(DPConfig(epsilon=2.0, delta=1e-3, clip="fixed"), "H1", n_subjects=20, subjects_per_step=4,
                     total_steps=6)
    ledger.set_budget("H1", plan.epsilon, plan.delta)
    for r in range(3):  # 3 rounds of 2 steps: exactly the planned spend
        ledger.check_round("H1", r + 1, plan.events(2 * r, 2 * r + 2), release=f"r{r + 1}")
        eps = ledger.commit_round("H1", r + 1, plan.events(2 * r, 2 * r + 2), release=f"r{r + 1}")
    assert 1.99 < eps <= 2.0 + 1e-6 and abs(ledger.spent("H1") - eps) < 1e-9
    with pytest.raises(BudgetExceededError, match=r"site H1: round 4 would bring epsilon to .* over its budget of 2"):
        ledger.check_round("H1", 4, plan.events(4, 6))
    # the same release again (identical inputs, same noise) is booked once and costs nothing more
    assert ledger.check_round("H1", 3, plan.events(4, 6), release="r3") == ledger.spent("H1")
    ledger.commit_round("H1", 3, plan.events(4, 6), release="r3")
    assert len(ledger.rounds("H1")) == 3 and abs(ledger.spent("H1") - eps) < 1e-9
    # round 3 again from other inputs is another release: refused, it would cross the budget
    with pytest.raises(BudgetExceededError):
        ledger.check_round("H1", 3, plan.events(4, 6), release="r3-other")
    st = ledger.status()[0]
    assert st["site"] == "H1" and st["rounds"] == 3 and st["epsilon_remaining"] < 0.01


def test_the_ledgers_cached_curve_gives_the_epsilon_of_a_fresh_recompute(tmp_path):
    """check_round/commit_round/spent compose a cached RDP curve with the rows booked since; after
    appends (several sites, scopes, a replay, a zero-step row), a reopen, a cache left stale by
    another writer, and a ledger file replaced by another, ε is what recomputing every event gives."""
    from privseg.privacy import budget as budget_mod

    db = tmp_path / "privacy.sqlite"
    ledger = BudgetLedger(db)
    for site in ("H1", "H2"):
        ledger.set_budget(site, 50.0, 1e-5)

    def fresh(led, site):
        return epsilon(led.events(site), 1e-5)

    rng = np.random.default_rng(0)
    for r in range(1, 13):
        site = ("H1", "H2")[r % 2]
        ev = [StepEvent(float(rng.choice([0.05, 0.2])), float(rng.uniform(0.8, 3.0)), int(rng.integers(0, 6)))]
        after = ledger.check_round(site, r, ev, scope="" if r % 3 else "erasure/x", release=f"r{r}")
        assert ledger.commit_round(site, r, ev, scope="" if r % 3 else "erasure/x", release=f"r{r}") == after
        assert ledger.commit_round(site, r, ev, release=f"r{r}") == pytest.approx(fresh(ledger, site), rel=1e-12)
        for s in ("H1", "H2"):
            assert ledger.spent(s) == pytest.approx(fresh(ledger, s), rel=1e-12)
    assert ledger.epsilon_with("H1", [StepEvent(0.1, 1.0, 7)]) == pytest.approx(
        epsilon(ledger.events("H1") + [StepEvent(0.1, 1.0, 7)], 1e-5), rel=1e-12)
    # a reopen in this process (the cache is used) and in a new one (the cache is empty)
    key = (str(db.resolve()), "H1")
    assert key in budget_mod._CURVES
    assert BudgetLedger(db).spent("H1") == pytest.approx(fresh(ledger, "H1"), rel=1e-12)
    stale = budget_mod._CURVES.pop(key)
    assert BudgetLedger(db).spent("H1") == pytest.approx(fresh(ledger, "H1"), rel=1e-12)
    # another writer booked after this process's cache: its rows are read, not missed
    ledger.commit_round("H1", 20, [StepEvent(0.5, 0.7, 9)], release="other-process")
    budget_mod._CURVES[key] = stale
    assert ledger.spent("H1") == pytest.approx(fresh(ledger, "H1"), rel=1e-12)
    assert ledger.spent("H1") > stale.epsilon(1e-5)
    # the file replaced by a ledger with other rows: the cache is not trusted
    cached = ledger.spent("H1")
    db.unlink()
    for extra in ("-wal", "-shm"):
        db.with_name(db.name + extra).unlink(missing_ok=True)
    other = BudgetLedger(db)
    other.set_budget("H1", 50.0, 1e-5)
    other.commit_round("H1", 1, [StepEvent(0.05, 2.0, 1)])
    assert other.spent("H1") == pytest.approx(fresh(other, "H1"), rel=1e-12) and other.spent("H1") < cached


def test_ledger_survives_sigkill_between_rounds(tmp_path):
    db = tmp_path / "privacy.sqlite"
    script = textwrap.dedent(f"""
        import os, signal
        from privseg.privacy.budget import BudgetLedger
        from privseg.privacy.accountant import StepEvent
        led = BudgetLedger({str(db)!r})
        led.set_budget("H1", 8.0, 1e-5)
        for r in range(1, 4):
            led.commit_round("H1", r, [StepEvent(0.1, 1.0, 10)])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ledger = BudgetLedger(db)
    assert [r["round"] for r in ledger.rounds("H1")] == [1, 2, 3]
    assert abs(ledger.spent("H1") - epsilon([StepEvent(0.1, 1.0, 30)], 1e-5)) < 1e-9


def test_bad_privacy_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="epsilon"):
        DPConfig(epsilon=0)
    with pytest.raises(ConfigError, match="delta"):
        DPConfig(delta=1.0)
    with pytest.raises(ConfigError, match="not below 1/n"):
        make_plan(DPConfig(delta=0.1), "H1", n_subjects=20, subjects_per_step=2, total_steps=10)
    make_plan(DPConfig(delta=0.1, allow_large_delta=True, clip="fixed"), "H1", 20, 2, 10)  # explicit override
    with pytest.raises(BudgetExceededError, match="too small for even"):
        make_plan(DPConfig(epsilon=1e-3, delta=1e-5, clip="fixed", sampling_rate=1.0), "H1", 1000, 2, 10**6)
    bn = build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2, norm="batch")
    with pytest.raises(ConfigError, match="use --norm group"):
        check_dp_model(bn)
    with pytest.raises(ConfigError, match="per-site"):
        DPConfig(sites={"H2": {"epsilonn": 3}})
    assert DPConfig(sites={"H2": {"epsilon": 3}}).for_site("H2").epsilon == 3


def test_federated_patient_dp_books_every_round_and_stops_at_the_budget(tmp_path):
    from conftest import make_tiny_cohort
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.simulation import simulate_inprocess
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=4, size=20)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    dp = DPConfig(epsilon=6.0, delta=1e-3, clip="adaptive", sampling_rate=0.5, sigma_b=2.0,
                  sites={"H2": {"epsilon": 3.0}}, erasure_reserve=0)  # training spends the whole budget
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=2, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                     steps=2)
    cfg = FLConfig(name="dp", sites=sites, train=tc, rounds=2, local_steps=1, eval_every=0, privacy=dp)
    state = simulate_inprocess(cfg, tmp_path / "run")
    assert state.status == "finished" and state.rounds_done == 2
    last = state.rounds[-1]["train"]
    assert abs(last["H1"]["dp-epsilon"] - 6.0) < 0.01 and abs(last["H2"]["dp-epsilon"] - 3.0) < 0.01
    # extending the run past the planned rounds: each site refuses the round before it runs
    cfg.rounds = 3
    state = simulate_inprocess(cfg, tmp_path / "run")
    assert state.status == "budget-exhausted" and state.rounds_done == 2
    assert "would bring epsilon" in state.data["stop_reason"]
    led = BudgetLedger(tmp_path / "run" / "sites" / "H2" / "privacy.sqlite")
    assert len(led.rounds("H2")) == 2


def test_an_old_fl_config_with_the_spec_in_train_extra_loads_into_privacy(tmp_path):
    """fl_config.json files written before FLConfig.privacy kept the spec in train.extra["dp"]: it
    moves to the typed field on load, and the run config the ClientApps get carries it as dp-* keys."""
    import json

    from conftest import make_tiny_cohort
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.server_app import client_run_config
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=2, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    spec = DPConfig(epsilon=4.0, delta=1e-3, clip="fixed", sites={"H2": {"epsilon": 2.0}})
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), in_channels=len(info["channels"]),
                     num_classes=len(info["classes"]), extra={"ct_window": [0, 1]})
    new = FLConfig(name="old", sites=sites, train=tc, privacy=spec)
    old = new.to_dict()
    old.pop("privacy")
    old["train"]["extra"]["dp"] = spec.to_dict()  # the layout of an old fl_config.json
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "fl_config.json").write_text(json.dumps(old))
    cfg = FLConfig.load(tmp_path / "run")
    assert isinstance(cfg.privacy, DPConfig) and cfg.privacy == spec
    assert cfg.train.extra == {"ct_window": [0, 1]}  # the rest of extra stays
    assert cfg.to_dict() == new.to_dict() and client_run_config(cfg, "r") == client_run_config(new, "r")
    assert FLConfig.from_dict({**old, "eval_split": "val"}).privacy == spec
    with pytest.raises(ConfigError, match="eval-split"):  # the DP run's checks apply to a migrated spec too
        FLConfig.from_dict({**old, "eval_split": "train"})
    with pytest.raises(ConfigError, match="two different DP specs"):
        FLConfig.from_dict({**old, "privacy": DPConfig(epsilon=1.0).to_dict()})
    assert FLConfig.from_dict({**old, "privacy": spec.to_dict()}).privacy == spec  # both, the same: fine
    rc = DPConfig.from_run_config({**spec.to_run_config(), "server-round": 1})
    assert rc == spec and DPConfig.from_run_config({"server-round": 1}) is None
    with pytest.raises(ConfigError, match="not a DP setting"):
        DPConfig.from_run_config({"dp-epsilom": 3.0})


def test_privacy_status_cli_reports_spent_and_remaining(tmp_path, capsys):
    from privseg.cli import main as cli_main

    ledger = BudgetLedger(tmp_path / "run" / "sites" / "H1" / "privacy.sqlite")
    ledger.set_budget("H1", 8.0, 1e-5)
    ledger.commit_round("H1", 1, [StepEvent(0.1, 1.0, 10)])
    assert cli_main(["privacy", "status", str(tmp_path / "run"), "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)
    assert rows[0]["site"] == "H1" and 0 < rows[0]["epsilon_spent"] < 8 and rows[0]["rounds"] == 1
    assert cli_main(["privacy", "status", str(tmp_path / "nothing")]) == 2


def test_fl_run_cli_with_patient_dp_accounts_every_site(tiny_cohort, tmp_path, capsys):
    from privseg.cli import main

    args = ["fl", "run", "--cohort", str(tiny_cohort.root), "--runs", str(tmp_path / "runs"), "--name", "dp",
            "--model", "unet_tiny", "--patch", "16", "--rounds", "1", "--local-steps", "1", "--in-process",
            "--dp", "patient", "--epsilon", "8", "--delta", "1e-2", "--eval-every", "0"]
    assert main([*args, "--site-budget", "H9=1"]) == 2
    assert "H9" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "dp" / "state.json").exists()
    assert main([*args, "--site-budget", "H2=4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["privacy", "status", str(tmp_path / "runs" / "dp"), "--json"]) == 0
    status = capsys.readouterr().out
    assert "H1" in status and "H2" in status


class _Shared(torch.nn.Module):
    """A conv used twice per forward, a PReLU (parameter outside any conv), and an unused head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.act = torch.nn.PReLU()
        self.out = torch.nn.Conv2d(1, 2, 1)
        self.unused = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.out(self.act(self.conv(self.conv(x))))


@pytest.mark.parametrize("model_fn", [_tiny2d, _Shared,
                                      lambda: build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=3),
                                      lambda: build_model("resnet10", in_channels=1, num_classes=2, spatial_dims=3)])
def test_book_keeping_gives_the_loops_clipped_sum(model_fn):
    torch.manual_seed(0)
    model, loss_fn, clip = model_fn(), SegLoss(), 0.05
    dims = 3 if any(isinstance(m, torch.nn.Conv3d) for m in model.modules()) else 2
    g = torch.Generator().manual_seed(2)
    owner = torch.tensor([0, 0, 0, 2, 2, 5])  # unequal patch counts, gaps in the subject ids
    images = torch.randn(6, 1, *[16] * dims, generator=g)
    labels = torch.randint(0, 2, (6, 1, *[16] * dims), generator=g)
    a, na, la = clipped_sum_loop(model, loss_fn, images, labels, owner, clip)
    b, nb, lb = clipped_sum_bk(model, loss_fn, images, labels, owner, clip)
    assert torch.allclose(na, nb, rtol=1e-4) and abs(la - lb) < 1e-5
    assert torch.allclose(_flat(a), _flat(b), atol=1e-6, rtol=1e-4)
    assert all(not h for m in model.modules() for h in (m._forward_hooks,))  # hooks removed
    for p in model.parameters():
        assert p.grad is None  # the batched pass computed no weight gradient


def test_book_keeping_refuses_a_layer_with_two_inputs():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bilinear = torch.nn.Bilinear(4, 4, 2)

        def forward(self, x):
            return self.bilinear(x, x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TwoInputs()

        def forward(self, x):
            b, _, h, w = x.shape
            flat = x.permute(0, 2, 3, 1).reshape(-1, 1).expand(-1, 4)
            return self.inner(flat).reshape(b, h, w, 2).permute(0, 3, 1, 2)

    images, labels, owner = _batch([0, 1], size=4)
    with pytest.raises(ConfigError, match="use method 'loop'"):
        clipped_sum_bk(Net(), SegLoss(), images, labels, owner, 1.0)


def test_adaptive_plan_warns_when_the_count_is_mostly_noise():
    from privseg.privacy.plan import AdaptiveClipNoiseWarning, make_plan
    from privseg.privacy.spec import DPConfig

    with pytest.warns(AdaptiveClipNoiseWarning, match="2 patients per step"):
        make_plan(DPConfig(epsilon=3.0, delta=1e-5, clip="adaptive"), "H1", 12, 2, 200)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptiveClipNoiseWarning)
        make_plan(DPConfig(epsilon=8.0, delta=1e-6, clip="adaptive"), "H1", 2000, 200, 200)  # m = 200: quiet
        make_plan(DPConfig(epsilon=3.0, delta=1e-5, clip="fixed"), "H1", 12, 2, 200)


def test_loop_works_on_subjects_side_by_side_repeatably_and_restores_the_thread_count():
    model, loss_fn, clip = _tiny2d(), SegLoss(), 0.05
    images, labels, owner = _batch([0, 0, 1, 2, 2, 2, 3])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial, ns, _ = clipped_sum_loop(model, loss_fn, images, labels, owner, clip)
        torch.set_num_threads(3)  # 3 workers over 4 subjects: chunks of unequal size
        first, n1, l1 = clipped_sum_loop(model, loss_fn, images, labels, owner, clip)
        second, n2, l2 = clipped_sum_loop(model, loss_fn, images, labels, owner, clip)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_flat(first), _flat(second)) and torch.equal(n1, n2) and l1 == l2  # repeatable
    assert torch.allclose(_flat(first), _flat(serial), atol=1e-7, rtol=1e-5)
    assert torch.allclose(n1, ns, rtol=1e-5) and len(n1) == 4  # one norm per subject, in subject order
