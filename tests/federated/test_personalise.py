"""Personalised federated models and the per-site guard (privseg.federated.personalise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_cohort, tiny_fl_config
from privseg.cli import main as cli_main
from privseg.data.cohort import Cohort
from privseg.errors import ConfigError
from privseg.federated import FLConfig
from privseg.federated.personalise import METHODS, personalise, read_personalisation, register
from privseg.federated.simulation import simulate_inprocess
from privseg.train import load_checkpoint


def odd_site_cohort(root: Path, per_site: int = 5, size: int = 16) -> Cohort:
    """3 sites of blobs with validation and test patients; site H3 labels the other way round (its
    'organ' is the others' core and vice versa): the global model cannot serve it and its own can."""
    return make_tiny_cohort(root, 3, per_site, size, val_fraction=0.2, test_fraction=0.2, name="odd",
                            relabel=lambda s, label: np.choose(label, [0, 2, 1]).astype(np.uint8) if s == 2 else label)


def fl_config(cohort: Cohort, **kw) -> FLConfig:
    return tiny_fl_config(cohort, lr=1e-2, **{"name": "p", "rounds": 4, "local_steps": 5, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pers")
    cohort = odd_site_cohort(root / "odd")
    simulate_inprocess(fl_config(cohort), root / "run")
    return root / "run"


def test_guard_serves_the_local_model_at_the_site_whose_data_differ(trained, capsys):
    # H3 labels the other way round: its own model beats the federation's on validation, and is served
    alone = personalise(trained, methods=["local"])["sites"]
    assert alone["H3"]["serves"] == "local" and alone["H3"]["val_dice"]["local"] > alone["H3"]["val_dice"]["global"]
    assert alone["H3"]["test_dice"]["local"] > alone["H3"]["test_dice"]["global"]  # and it holds on test
    result = personalise(trained, epochs=2)
    assert read_personalisation(trained) == json.loads(json.dumps(result))
    assert result["sites"]["H3"]["serves"] != "global"  # fine-tuning can adapt too; never the global model there
    for site, rec in result["sites"].items():
        assert set(rec["val_dice"]) == set(rec["test_dice"]) == {"global", *METHODS}
        # the guard: the served model is the best on validation, never worse than global or local there
        best = max(rec["val_dice"].values())
        assert rec["val_dice"][rec["serves"]] == best
        assert rec["val_patients"] == 1 and rec["test_patients"] == 1
        # the models are kept at the site, the global one in the run
        for name, file in (("finetune", "personal.pt"), ("local", "local.pt"), ("ditto", "ditto.pt"),
                           ("head", "head.pt")):
            assert rec["checkpoints"][name] == f"sites/{site}/{file}"
            payload = load_checkpoint(trained / rec["checkpoints"][name])
            assert payload["extra"]["personalisation"] == {"site": site, "method": name, "global_round": 4}
        assert (trained / rec["checkpoints"]["global"]).is_file()
        ft = rec["methods"]["finetune"]
        assert 1 <= ft["epochs_run"] <= 2 and 0 <= ft["best_epoch"] <= ft["epochs_run"]
        assert ft["val_dice_per_epoch"][0] == rec["val_dice"]["global"]  # epoch 0 is the global model
        assert rec["methods"]["local"]["steps"] == 20  # the federation's budget: 4 rounds x 5 local steps
        # the fine-tuned model is the best epoch's: its validation Dice is the best of the epochs run
        assert rec["val_dice"]["finetune"] == pytest.approx(max(ft["val_dice_per_epoch"]))
    # `privseg fl status` shows, per site, global vs personalised vs local Dice and the model served
    capsys.readouterr()
    assert cli_main(["fl", "status", str(trained)]) == 0
    shown = capsys.readouterr().out
    # (a narrow console wraps "finetune Dice" over two lines)
    assert "model served per site" in shown and all(m in shown for m in ("finetune", "ditto", "head", "local"))
    assert result["sites"]["H3"]["serves"] in shown.split("H3")[-1]


def test_duplicate_method_names_and_bad_requests_are_refused(trained, tmp_path):
    with pytest.raises(ConfigError, match="already registered"):
        register("finetune", file="x.pt")(lambda site, epochs: (None, {}))
    with pytest.raises(ConfigError, match="already registered"):
        register("global", file="x.pt")(lambda site, epochs: (None, {}))
    assert set(METHODS) >= {"finetune", "local", "ditto", "head"}
    with pytest.raises(ConfigError, match="--method fedrep"):
        personalise(trained, methods=["fedrep"])
    with pytest.raises(ConfigError, match="--epochs"):
        personalise(trained, epochs=0)
    with pytest.raises(ConfigError, match="--ditto-lambda"):
        personalise(trained, methods=["ditto"], ditto_lambda=float("nan"))
    assert cli_main(["fl", "personalise", str(trained), "--method", "fedrep"]) == 2
    assert cli_main(["fl", "personalise", str(trained), "--method", "ditto", "--ditto-lambda", "-1"]) == 2


def test_personalisation_needs_validation_patients_and_refuses_dp(tmp_path, trained):
    from conftest import make_tiny_cohort

    cohort = make_tiny_cohort(tmp_path / "noval", sites=2, per_site=3, size=16)  # train and test only
    simulate_inprocess(fl_config(cohort, rounds=1, local_steps=1), tmp_path / "run")
    with pytest.raises(ConfigError, match="site H1: no validation patients"):
        personalise(tmp_path / "run", methods=["local"])
    cfg = FLConfig.load(trained)
    from privseg.privacy import DPConfig

    dp = tmp_path / "dp"
    dp.mkdir()
    FLConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "privacy": DPConfig(unit="site")}).save(dp)
    (dp / "state.json").write_text((trained / "state.json").read_text())
    with pytest.raises(ConfigError, match="client-level DP"):  # patient-level DP: tests/federated/test_personal_dp.py
        personalise(dp)


def test_fedbn_sites_personalise_from_the_global_model_with_their_own_norms(tmp_path):
    from privseg.federated.client_app import load_local_state
    from privseg.federated.personalise import global_state
    from privseg.federated.runstate import RunState

    cohort = odd_site_cohort(tmp_path / "odd", per_site=5, size=16)
    state = simulate_inprocess(fl_config(cohort, strategy="fedbn", rounds=1, local_steps=1), tmp_path / "run")
    cfg = FLConfig.load(tmp_path / "run")
    glob = load_checkpoint(state.last_checkpoint)["model"]
    for site in ("H1", "H3"):
        own = load_local_state(tmp_path / "run" / "sites" / site, 1)
        served = global_state(cfg, RunState.load(tmp_path / "run"), tmp_path / "run" / "sites" / site)
        assert own and all(torch.equal(served[k], v) for k, v in own.items())  # the site's norms
        assert all(torch.equal(served[k], v) for k, v in glob.items() if k not in own)  # the shared weights
    assert not all(torch.equal(served[k], glob[k]) for k in own)  # FedBN norms differ from the initial ones


def _site(run: Path, site: str, lam: float = 100.0):
    from privseg.federated.personalise import site_run
    from privseg.federated.runstate import RunState

    cfg = FLConfig.load(run)
    return site_run(run, cfg, RunState.load(run), next(s for s in cfg.sites if s.id == site), lam)


def test_ditto_with_lambda_zero_is_finetune_and_its_pull_keeps_the_model_near_the_global_one(trained):
    from privseg.federated.personalise import attach_pull, distance, ditto, finetune
    from privseg.train.loop import make_optimizer, train_steps

    site = _site(trained, "H3", lam=0.0)
    ft, ft_info = finetune(site, 2)
    dt, dt_info = ditto(site, 2)
    assert dt_info["lambda"] == 0.0 and dt_info["val_dice_per_epoch"] == ft_info["val_dice_per_epoch"]
    assert all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), dt.state_dict().values(), strict=True))
    # the pull itself, over the same steps: none, moderate, huge
    moved = {}
    for lam in (0.0, 20.0, 1e9):
        model = site.global_model()
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = make_optimizer(model, site.train)
        if lam:
            attach_pull(optimizer, model, reference, lam, site.train.lr)
        train_steps(model, optimizer, site.train_items, site.site_config(1), start=0, stop=6)
        moved[lam] = distance(model, reference)
    assert moved[1e9] < 1e-5 * moved[0.0] and moved[1e9] < moved[20.0] < 0.9 * moved[0.0]
    # a huge lambda: every epoch's model is the global one (validation Dice unchanged), so it stops at once
    huge, info = ditto(_site(trained, "H3", lam=1e9), 3)
    assert info["epochs_run"] == 1 and info["best_epoch"] == 0 and info["distance_to_global"] == 0.0
    assert info["val_dice_per_epoch"][1] == pytest.approx(info["val_dice_per_epoch"][0], abs=1e-6)


def test_head_trains_the_decoder_on_the_global_encoder(trained):
    from privseg.federated.personalise import head
    from privseg.models.registry import encoder_decoder_params

    site = _site(trained, "H3")  # labels the other way round: a new head alone can fix that
    model, info = head(site, 3)
    glob = site.global_model()
    (enc, dec), (genc, gdec) = encoder_decoder_params(model), encoder_decoder_params(glob)
    assert all(torch.equal(a, b) for a, b in zip(enc, genc, strict=True))  # the body is the federation's
    assert info["best_epoch"] >= 1 and info["distance_to_global"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(dec, gdec, strict=True))
    assert max(info["val_dice_per_epoch"]) > info["val_dice_per_epoch"][0]  # and it helps that site
    assert all(p.requires_grad for p in model.parameters())  # the served model is an ordinary one


def test_cli_personalise_with_ditto(trained, capsys):
    capsys.readouterr()
    assert cli_main(["fl", "personalise", str(trained), "--method", "ditto", "--ditto-lambda", "5",
                     "--epochs", "1"]) == 0
    res = read_personalisation(trained)
    assert res["methods"] == ["ditto"] and res["ditto_lambda"] == 5.0
    assert all(r["methods"]["ditto"]["lambda"] == 5.0 and set(r["val_dice"]) == {"global", "ditto"}
               for r in res["sites"].values())
    assert "ditto Dice" in capsys.readouterr().out
