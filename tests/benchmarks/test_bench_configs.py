"""The benchmarks build their runs through the library (privseg.federated.assemble.fl_config)."""

from __future__ import annotations

import ast
from dataclasses import fields, replace
from pathlib import Path

import pytest

from conftest import make_tiny_cohort
from privseg.errors import ConfigError
from privseg.federated import FLConfig, check_sites, sites_from_cohort
from privseg.federated.assemble import fl_config
from privseg.privacy import DPConfig
from privseg.train import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_builds_an_fl_config_by_hand():
    calls = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "FLConfig":
                calls.append(f"{path.name}:{node.lineno}")
    assert not calls, f"build runs with privseg.federated.assemble.fl_config, not FLConfig(...): {calls}"


def _sites_and_train(tmp_path: Path, model: str = "unet_tiny", norm: str = "group"):
    cohort = make_tiny_cohort(tmp_path / "c", size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model=model, norm=norm, patch_size=(16,) * 3, device="cpu", in_channels=len(info["channels"]),
                     num_classes=len(info["classes"]))
    return sites, tc


def test_fl_config_takes_the_fields_defaults_from_fl_config(tmp_path):
    sites, tc = _sites_and_train(tmp_path)
    cfg = fl_config(sites=sites, train=tc, name="b", rounds=3)
    defaults = FLConfig(name="x", sites=sites, train=tc)
    for f in fields(FLConfig):
        if f.name not in ("name", "rounds", "sites", "train"):
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    assert cfg.rounds == 3 and cfg.privacy is None and cfg.train is tc


def test_fl_config_attaches_and_checks_the_dp_spec(tmp_path):
    sites, tc = _sites_and_train(tmp_path)
    dp = DPConfig(unit="patient", epsilon=8.0, delta=1e-5)
    assert fl_config(sites=sites, train=tc, dp=dp).privacy == dp
    with pytest.raises(ConfigError, match="unknown site"):
        fl_config(sites=sites, train=tc, dp=replace(dp, sites={"NOPE": {"epsilon": 4.0}}))
    with pytest.raises(ConfigError, match="eval"):  # DP evaluates on val or test, never on training patients
        fl_config(sites=sites, train=tc, dp=dp, eval_split="train")


def test_fl_config_refuses_a_bad_model_or_strategy(tmp_path):
    sites, tc = _sites_and_train(tmp_path, model="no_such_net")
    with pytest.raises(ConfigError, match="no_such_net"):
        fl_config(sites=sites, train=tc)
    with pytest.raises(ConfigError, match="nope"):
        fl_config(sites=sites, train=replace(tc, model="unet_tiny"), strategy="nope")
