"""Unlearning: every strategy runs on a tiny cohort and changes only what it should; retrain never
sees the forget subjects; the report's gaps match their definitions; bad input is refused."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from conftest import make_tiny_cohort, tiny_central_run
from privseg.cli import main
from privseg.errors import CheckpointError, ConfigError
from privseg.train import TrainConfig, load_checkpoint, save_checkpoint
from privseg.unlearn import STRATEGIES, unlearn
from privseg.unlearn.strategies import decoder_state_keys


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny cohort (6 train, 2 test subjects, 16³), a 3-step original and its retrain reference."""
    root = tmp_path_factory.mktemp("unlearn")
    cohort = make_tiny_cohort(root / "cohort", sites=2, per_site=4, size=16)
    tiny_central_run(cohort, root / "orig", steps=3, patches_per_subject=1)
    items: dict = {}
    forget = cohort.select("train")[0].id
    rt = unlearn(root / "orig" / "last.pt", cohort, forget, "retrain", out_dir=root / "retrain", evaluate=False,
                 items=items, device="cpu")
    return {"root": root, "cohort": cohort, "ckpt": root / "orig" / "last.pt", "retrain": rt, "items": items,
            "retrain_ckpt": root / "retrain" / "unlearned.pt", "forget": forget}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_has_every_strategy_with_one_signature():
    expected = {"noisy_label", "retain_label", "max_loss", "random_encoder", "learn_others", "learn_noise", "retrain",
                "neggrad_plus", "scrub", "salun", "reference_teacher"}
    assert expected <= set(STRATEGIES)
    for s in STRATEGIES.values():
        assert list(inspect.signature(s.fn).parameters) == ["model", "ctx", "params"]


def test_retrain_never_sees_forget_subjects(setup):
    rep = setup["retrain"].report
    assert setup["forget"] not in rep["subjects_seen"] and rep["subjects_seen"]
    payload = load_checkpoint(setup["retrain_ckpt"])
    assert setup["forget"] not in payload["extra"]["train_subjects"]
    assert rep["steps_run"] == 3  # the original's step count


@pytest.mark.parametrize("name", sorted(n for n, s in STRATEGIES.items() if n != "retrain" and not s.needs_references))
def test_each_strategy_runs_and_fix_decoder_freezes_the_decoder(setup, name):
    from privseg.train import model_from_checkpoint

    before = _state(model_from_checkpoint(load_checkpoint(setup["ckpt"])))
    res = unlearn(setup["ckpt"], setup["cohort"], setup["forget"], name, fix_decoder=True, epochs=1, evaluate=False,
                  items=setup["items"], device="cpu")
    after = _state(res.model)
    dec = decoder_state_keys(res.model)
    assert dec and all(torch.equal(before[k], after[k]) for k in dec), "decoder changed under fix_decoder"
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in dec), "encoder did not change"
    assert res.report["params"] == {**STRATEGIES[name].defaults}
    assert res.report["steps_run"] == res.report["step_budget"] == 1
    if name in ("retain_label", "random_encoder"):
        assert setup["forget"] not in res.report["subjects_seen"]
    else:
        assert setup["forget"] in res.report["subjects_seen"]


def test_a_strategy_that_needs_reference_models_names_the_command_when_the_run_has_none(setup, tmp_path):
    with pytest.raises(ConfigError, match="privseg audit references"):
        unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "reference_teacher", epochs=1, out_dir=tmp_path / "o",
                items=setup["items"], device="cpu")
    assert not (tmp_path / "o").exists()


def test_random_encoder_reinitialises_only_the_encoder(setup, monkeypatch):
    from privseg.train import model_from_checkpoint
    from privseg.unlearn import strategies

    before = _state(model_from_checkpoint(load_checkpoint(setup["ckpt"])))
    seen = {}

    def no_training(model, ctx, items, step_fn, **kw):
        seen["state"] = _state(model)
        return model

    monkeypatch.setattr(strategies, "run_loop", no_training)
    res = unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "random_encoder", epochs=1, evaluate=False,
                  items=setup["items"], device="cpu")
    dec = decoder_state_keys(res.model)
    st = seen["state"]
    assert all(torch.equal(before[k], st[k]) for k in dec)
    weights = [k for k in before if k not in dec and k.endswith("weight") and before[k].ndim > 1]
    assert weights and all(not torch.equal(before[k], st[k]) for k in weights)


def test_salun_moves_only_masked_weights(setup):
    res = unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "salun", epochs=1, params={"fraction": 0.1},
                  evaluate=False, items=setup["items"], device="cpu")
    from privseg.train import model_from_checkpoint

    before = _state(model_from_checkpoint(load_checkpoint(setup["ckpt"])))
    after = _state(res.model)
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    assert 0 < changed <= 0.11 * total


def test_report_gaps_match_definitions_and_outputs_written(setup, tmp_path):
    out = tmp_path / "u"
    unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "noisy_label", epochs=1, out_dir=out,
                  retrain_checkpoint=setup["retrain_ckpt"], items=setup["items"], mia_views=1, device="cpu")
    r = json.loads((out / "report.json").read_text())
    assert (out / "unlearned.pt").exists()
    for name in ("original", "unlearned", "retrain"):
        m = r[name]
        assert m["dice_gap"] == pytest.approx(m["retain"]["dice"] - m["forget"]["dice"])
        assert m["mae_gap"] == pytest.approx(m["forget"]["mae"] - m["retain"]["mae"])
        assert 0 <= m["mia"]["auc"] <= 1
    assert r["forget_dice_distance_to_retrain"] == pytest.approx(
        abs(r["unlearned"]["forget"]["dice"] - r["retrain"]["forget"]["dice"]))
    assert r["vs_retrain"]["dice_gap"] == pytest.approx(r["unlearned"]["dice_gap"] - r["retrain"]["dice_gap"])
    assert r["vs_original"]["forget_dice"] == pytest.approx(
        r["unlearned"]["forget"]["dice"] - r["original"]["forget"]["dice"])
    assert r["time_ratio"] == pytest.approx(r["seconds"] / r["retrain_seconds"])
    assert r["params"]["retain_weight"] == 1.0 and r["epochs"] == 1


def test_unseen_target_checks_and_stops_within_budget(setup):
    res = unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "noisy_label", target="unseen", epochs=2,
                  check_every=1, evaluate=False, items=setup["items"], device="cpu")
    r = res.report
    assert r["checks"] and r["checks"][0]["step"] == 0
    assert r["steps_run"] <= r["step_budget"] == 2
    last = r["checks"][-1]
    assert r["stopped_early"] == last["stop"]
    if last["stop"]:
        assert last["auc_loss"] <= 0.55


@pytest.mark.parametrize("forget, match", [
    ("S999", "unknown"), ("", "empty"), ("S001,S100", "not a training subject"),
])
def test_bad_forget_requests(setup, tmp_path, forget, match):
    test_ids = {s.id for s in setup["cohort"].select("test")}
    if "not a training" in match:
        forget = sorted(test_ids)[0]
    with pytest.raises(ConfigError, match=match) as exc:
        unlearn(setup["ckpt"], setup["cohort"], forget, "noisy_label", out_dir=tmp_path / "o", device="cpu")
    assert "--forget" in str(exc.value)
    assert not (tmp_path / "o").exists()


def test_forgetting_everyone_is_refused(setup, tmp_path):
    everyone = [s.id for s in setup["cohort"].select("train")]
    with pytest.raises(ConfigError, match="nothing left to retain"):
        unlearn(setup["ckpt"], setup["cohort"], everyone, "retain_label", out_dir=tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()


def test_wrong_checkpoints_are_refused(setup, tmp_path):
    payload = load_checkpoint(setup["ckpt"])
    model = torch.nn.Conv3d(1, 2, 1)
    bad_classes = tmp_path / "classes.pt"
    save_checkpoint(bad_classes, model, config={**payload["config"], "num_classes": 2})
    with pytest.raises(CheckpointError, match="classes"):
        unlearn(bad_classes, setup["cohort"], setup["forget"], "noisy_label", device="cpu")
    bad_arch = tmp_path / "arch.pt"
    save_checkpoint(bad_arch, model, config={**payload["config"], "model": "unet"})
    with pytest.raises(CheckpointError, match="do not fit"):
        unlearn(bad_arch, setup["cohort"], setup["forget"], "noisy_label", device="cpu")
    with pytest.raises(ConfigError, match="--strategy"):
        unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "nope", device="cpu")
    with pytest.raises(ConfigError, match="--param"):
        unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "max_loss", params={"nope": 1}, device="cpu")


def test_cli_unlearn_success_and_exit_2(setup, tmp_path, capsys):
    root = str(setup["cohort"].root)
    out = tmp_path / "cli"
    code = main(["unlearn", "--checkpoint", str(setup["ckpt"]), "--cohort", root, "--forget", setup["forget"],
                 "--strategy", "retain_label", "--epochs", "1", "--fix-decoder", "--out", str(out), "--quiet",
                 "--device", "cpu"])
    assert code == 0 and (out / "report.json").exists() and (out / "unlearned.pt").exists()
    for bad in (["--forget", "S999"], ["--forget", ","], ["--forget", setup["forget"], "--strategy", "nope"],
                ["--forget", setup["forget"], "--target", "never"]):
        target = tmp_path / "bad"
        code = main(["unlearn", "--checkpoint", str(setup["ckpt"]), "--cohort", root, "--out", str(target),
                     "--quiet", *bad])
        assert code == 2 and not target.exists()
    err = capsys.readouterr().err
    assert "S999" in err and "--strategy" in err


def test_batched_check_statistics_match_sliding_window_ones(setup):
    from privseg.audit import mia
    from privseg.train import model_from_checkpoint
    from privseg.unlearn.engine import check_statistics

    payload = load_checkpoint(setup["ckpt"])
    model = model_from_checkpoint(payload)
    cfg = TrainConfig.from_dict(payload["config"])
    items = list(setup["items"].values())[:3]
    side = max(max(torch.as_tensor(it["image"]).shape[1:]) for it in items)
    whole = TrainConfig.from_dict({**payload["config"], "patch_size": [side] * 3})
    fast = check_statistics(model, items, whole)  # one window per subject: batched path when shapes agree
    slow = mia.subject_statistics(model, items, whole.patch_size, whole.num_classes, views=1)
    assert [r["loss"] for r in fast] == pytest.approx([r["loss"] for r in slow], abs=1e-5)
    assert [r["dice"] for r in fast] == pytest.approx([r["dice"] for r in slow], abs=1e-6)
    assert [r["id"] for r in check_statistics(model, items, cfg)] == [it["id"] for it in items]


def test_cached_retrain_metrics_give_the_same_report(setup):
    kw = dict(epochs=1, retrain_checkpoint=setup["retrain_ckpt"], items=setup["items"], mia_views=1, device="cpu")
    first = unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "retain_label", **kw).report
    again = unlearn(setup["ckpt"], setup["cohort"], setup["forget"], "retain_label",
                    retrain_metrics=first["retrain"], **kw).report
    assert again["retrain"] is first["retrain"]
    assert again["unlearned"]["mia"]["auc_calibrated"] == pytest.approx(first["unlearned"]["mia"]["auc_calibrated"])
    assert again["forget_dice_distance_to_retrain"] == pytest.approx(first["forget_dice_distance_to_retrain"])
