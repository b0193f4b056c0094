"""One registry idiom: a toy FL strategy (with a parameter of its own), a toy site-erasure method
and a toy clip rule are each one registration, and run through the public API."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_cohort
from privseg.errors import ConfigError
from privseg.federated import FLConfig, check_sites, sites_from_cohort
from privseg.federated.simulation import simulate_inprocess
from privseg.federated.strategies import FL_STRATEGIES, PrivsegFedAvg, fl_strategy
from privseg.train import TrainConfig
from privseg.train.checkpoint import load_checkpoint


@pytest.fixture
def toy_strategy():
    @fl_strategy("damped")
    def damped(common: dict, server_lr: float = 1.0):
        strategy = PrivsegFedAvg(**common)

        def step(server_round, arrays):  # global + server_lr * (average - global)
            from flwr.app import Array, ArrayRecord

            glob = strategy._global
            return ArrayRecord({k: Array(glob[k].numpy() + server_lr * (arrays[k].numpy() - glob[k].numpy()))
                                for k in arrays.keys()})
        strategy.aggregate_hooks.append(step)
        return strategy
    yield "damped"
    FL_STRATEGIES.pop("damped")


def _cfg(cohort, **kw):
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=1, in_channels=len(info["channels"]), num_classes=len(info["classes"]))
    return FLConfig(name="reg", sites=sites, train=tc, rounds=1, local_steps=1, eval_every=0, **kw)


def test_a_registered_strategy_with_its_own_parameter_runs(toy_strategy, tmp_path):
    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=2, size=16)
    with pytest.raises(ConfigError, match="no parameter"):
        _cfg(cohort, strategy=toy_strategy, strategy_params={"server_momentum": 0.9})
    run = tmp_path / "run"
    state = simulate_inprocess(_cfg(cohort, strategy=toy_strategy, strategy_params={"server_lr": 0.0}), run)
    assert state.status == "finished"
    before = load_checkpoint(run / "checkpoints" / "global_r0000.pt")["model"]
    after = load_checkpoint(run / "checkpoints" / "global_r0001.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())  # lr 0: no move


def test_a_registered_clip_rule_runs_through_make_private(tiny_cohort, tmp_path):
    from privseg.privacy import CLIP_RULES, DPConfig, clip_rule, train_private
    from privseg.privacy.clipping import FixedClipper

    @clip_rule("quarter")
    def quarter(clip_norm, expected_m, z_max, options):
        return FixedClipper(clip_norm / 4)

    try:
        dp = DPConfig(epsilon=50.0, delta=1e-2, clip="quarter", clip_norm=2.0, sampling_rate=0.5,
                      noise_multiplier=1.0, allow_large_delta=True)
        cfg = TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", steps=1, patch_size=(16, 16, 16),
                                     subjects_per_step=1, patches_per_subject=1, device="cpu")
        assert train_private(tiny_cohort, cfg, dp, tmp_path / "c")["clip"] == 0.5
    finally:
        CLIP_RULES.pop("quarter")
    with pytest.raises(ConfigError, match="quarter"):
        DPConfig(clip="quarter")


def test_a_registered_site_erasure_method_runs_through_erase(tmp_path):
    from privseg.erasure import SITE_ERASERS, ErasureRequest, erase, site_eraser

    @site_eraser("keep_source")
    class KeepSource:  # a do-nothing method: the source model is served again
        def dp_steps(self, cfg, state, req):
            return 0

        def run(self, job):
            return job.state.last_checkpoint, 0.0, 0.0, {"note": "toy"}

    try:
        cohort = make_tiny_cohort(tmp_path / "c", sites=3, per_site=3, size=16)
        run = tmp_path / "run"
        simulate_inprocess(_cfg(cohort), run)
        loose = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}
        res = erase(run, ErasureRequest(kind="site", site="H3", method="keep_source", thresholds=loose), mia_views=1)
        assert res.status == "completed"
        assert "H3" not in FLConfig.load(run).site_ids
    finally:
        SITE_ERASERS.pop("keep_source")
    with pytest.raises(ConfigError, match="keep_source|federaser"):
        ErasureRequest(kind="site", site="H3", method="keep_source")


def _capture(seen: dict, mode: str, cfg, run_dir):
    """Stands in for the federated run: keeps the config the command assembled, runs nothing."""
    from privseg.federated.runstate import RunState
    from privseg.privacy import BudgetLedger

    seen.setdefault(mode, cfg)
    BudgetLedger(run_dir / "privacy.sqlite")  # what the command reads back after a DP run (empty here)
    return RunState(run_dir)


def test_fl_run_and_fl_deploy_build_the_same_run_config(tiny_cohort, tmp_path, monkeypatch):
    from privseg.cli import fl as fl_cli
    from privseg.cli import main

    seen = {}
    monkeypatch.setattr(fl_cli, "run_federated", lambda mode, cfg, run_dir, **k: _capture(seen, mode, cfg, run_dir))
    common = ["--cohort", str(tiny_cohort.root), "--runs", str(tmp_path), "--name", "same", "--model", "unet_tiny",
              "--patch", "16", "--rounds", "2", "--strategy", "fedprox", "--mu", "0.3", "--dp", "patient",
              "--epsilon", "5", "--delta", "1e-2", "--site-budget", "H2=3", "--clip", "fixed",
              "--erasure-reserve", "1.5"]
    assert main(["fl", "run", *common, "--in-process"]) == 0
    assert main(["fl", "deploy", *common]) == 0  # the same defaults, round timeout included
    run, deploy = seen["in-process"].to_dict(), seen["deployment"].to_dict()
    assert run == deploy
    assert run["privacy"]["sites"] == {"H2": {"epsilon": 3.0}} and run["proximal_mu"] == 0.3
    assert run["privacy"]["erasure_reserve"] == 1.5  # --erasure-reserve (a field of DPConfig, cli.ui.RESERVE)
    # what every ClientApp reads as its run configuration: the same dp-* keys from `fl run` and from
    # `fl deploy` (whose ServerApp reads the spec back from fl_config.json), one typed spec again
    import json

    from flwr.app import ConfigRecord
    from flwr.common.serde import config_record_from_proto, config_record_to_proto

    from privseg.federated.server_app import client_run_config
    from privseg.privacy import DPConfig

    spec = seen["in-process"].privacy
    deployed = FLConfig.from_dict(json.loads(json.dumps(deploy)))  # as the deployed ServerApp loads it
    rc_run, rc_deploy = (client_run_config(c, tmp_path / "same") for c in (seen["in-process"], deployed))
    assert rc_run == rc_deploy
    dp_keys = {k: v for k, v in rc_run.items() if k.startswith("dp-")}
    assert dp_keys == spec.to_run_config() and dp_keys["dp-unit"] == "patient" and dp_keys["dp-epsilon"] == 5.0
    assert dp_keys["dp-delta"] == 1e-2 and dp_keys["dp-clip"] == "fixed" and dp_keys["dp-sites.H2.epsilon"] == 3.0
    wire = config_record_from_proto(config_record_to_proto(ConfigRecord(dict(rc_deploy))))  # as a SuperNode gets it
    assert DPConfig.from_run_config(wire) == spec == deployed.privacy
    assert "dp" not in json.loads(rc_run["train-config"])["extra"]  # the spec travels once, typed


def test_fedavgm_applies_the_average_update_at_its_server_learning_rate(tmp_path):
    """FedAvgM with server learning rate 2 moves the global model twice as far as FedAvg from the
    same start with the same site updates (momentum 0)."""
    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=2, size=16)
    with pytest.raises(ConfigError, match="server_learning_rate"):
        from privseg.federated.strategies import build_strategy

        build_strategy("fedavgm", params={"server_learning_rate": 0})
    moved = {}
    for name, params in (("fedavg", {}), ("fedavgm", {"server_learning_rate": 2.0})):
        run = tmp_path / name
        assert simulate_inprocess(_cfg(cohort, strategy=name, strategy_params=params), run).status == "finished"
        r0 = load_checkpoint(run / "checkpoints" / "global_r0000.pt")["model"]
        r1 = load_checkpoint(run / "checkpoints" / "global_r0001.pt")["model"]
        moved[name] = {k: r1[k] - r0[k] for k in r0 if r0[k].is_floating_point()}
    for k, d in moved["fedavg"].items():
        assert torch.allclose(moved["fedavgm"][k], 2 * d, atol=1e-5), k


def test_a_strategys_own_parameters_come_from_the_command_line(tiny_cohort, tmp_path, monkeypatch, capsys):
    from privseg.cli import fl as fl_cli
    from privseg.cli import main

    seen = {}
    monkeypatch.setattr(fl_cli, "run_federated", lambda mode, cfg, run_dir, **k: _capture(seen, mode, cfg, run_dir))
    common = ["--cohort", str(tiny_cohort.root), "--runs", str(tmp_path), "--name", "m", "--model", "unet_tiny",
              "--patch", "16", "--rounds", "1", "--strategy", "fedavgm", "--in-process"]
    assert main(["fl", "run", *common, "--strategy-param", "server_learning_rate=1.5",
                 "--strategy-param", "server_momentum=0.9"]) == 0
    assert seen["in-process"].strategy_params == {"server_learning_rate": 1.5, "server_momentum": 0.9}
    # a parameter the strategy does not take, or no KEY=VALUE: exit 2, named
    assert main(["fl", "run", *common, "--strategy-param", "proximal_mu=0.1"]) == 2
    assert "proximal_mu" in capsys.readouterr().err
    assert main(["fl", "run", *common, "--strategy-param", "server_learning_rate"]) == 2
    assert "--strategy-param" in capsys.readouterr().err


def _registries() -> list[tuple[str, object, str]]:
    """(kind, name -> decorator, a name filed already) of every registry in privseg."""
    from privseg.audit.lira import membership_test
    from privseg.console.app import load_pages
    from privseg.console.web import register_pages
    from privseg.data.formats import register_format
    from privseg.erasure import site_eraser
    from privseg.export.formats import export_format
    from privseg.federated.personalise import register as personalisation
    from privseg.models.registry import register_model
    from privseg.privacy.clipping import clip_rule
    from privseg.privacy.grad_sample import per_subject
    from privseg.unlearn.strategies import register as unlearning

    load_pages()  # the console's built-in pages are filed when their modules are imported
    return [("model", register_model, "unet"), ("format", register_format, "msd"), ("clip rule", clip_rule, "fixed"),
            ("per-subject gradient method", per_subject, "loop"), ("FL strategy", fl_strategy, "fedavg"),
            ("unlearning strategy", unlearning, "scrub"), ("site erasure method", site_eraser, "federaser"),
            ("personalisation method", lambda name: personalisation(name, file="p.pt"), "finetune"),
            ("membership test", lambda name: membership_test(name, "a test"), "lira"),
            ("console page", register_pages, "runs"),
            ("export format", lambda name: export_format(name, network="m.ts", read_network=None), "onnx")]


def test_every_registry_refuses_a_name_taken():
    """One idiom (privseg.utils.registrar) for every kind: a second entry under a taken name is
    refused, naming the kind; and every registry in src is checked here."""
    from pathlib import Path

    import privseg

    registries = _registries()
    for kind, register, taken in registries:
        with pytest.raises(ConfigError, match=f"{kind} {taken!r} is already registered"):
            register(taken)(lambda *a, **k: None)
    src = Path(privseg.__file__).parent
    uses = sum(p.read_text().count("registrar(") for p in src.rglob("*.py") if p.name != "utils.py")
    assert uses == len(registries)  # a new registry: add it above
