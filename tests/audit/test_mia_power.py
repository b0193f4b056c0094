"""Membership power checks: a model must memorise (training vs never-seen AUC >= 0.75) and the
null control (two random halves of the never-seen patients) must sit near 0.5, or the check fails
loudly. Also the power cohort's size rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_blob_subject
from privseg.audit import mia
from privseg.data.synth import power_cohort
from privseg.errors import ConfigError
from privseg.models import build_model

SIZE = 12


def test_separated_scores_pass_and_report_both_tests():
    rng = np.random.default_rng(0)
    # never-seen patients the model treats alike: the null control sits at 0.5 whatever the split
    res = mia.power_check(rng.normal(2.0, 1.0, 24), np.zeros(12), n_boot=200, n_perm=200)
    assert res["passed"] and res["problems"] == []
    assert res["member_auc"] >= 0.75 and res["member_ci"][0] <= res["member_auc"] <= res["member_ci"][1]
    assert res["null_auc"] == 0.5 and res["null_pass_rate"] == 1.0 and res["member_p"] < 0.05
    assert sorted(res["null_split"][0] + res["null_split"][1]) == list(range(12))
    assert res["null_sd"] == pytest.approx(mia.null_auc_sd(6, 6))


def test_null_control_width_at_twelve_never_seen():
    # exchangeable never-seen scores: a random halving lands within 0.1 of 0.5 only about half the time
    # at 6 vs 6 (sd 0.17), which the result reports so a failed null control can be read against it
    res = mia.power_check(np.full(24, 9.0), np.random.default_rng(5).normal(size=12), n_boot=50, n_perm=50,
                          raise_on_fail=False)
    assert 0.25 < res["null_pass_rate"] < 0.75
    assert res["null_sd"] == pytest.approx(0.1732, abs=1e-3)


def test_a_model_that_does_not_memorise_fails_loudly():
    rng = np.random.default_rng(1)
    with pytest.raises(mia.PowerCheckError, match="does not memorise: membership AUC") as err:
        mia.power_check(rng.normal(0, 1, 24), rng.normal(0, 1, 12), n_boot=200, n_perm=200)
    assert err.value.result["member_auc"] < 0.75 and not err.value.result["passed"]
    res = mia.power_check(rng.normal(0, 1, 24), rng.normal(0, 1, 12), n_boot=100, n_perm=100, raise_on_fail=False)
    assert not res["passed"]


def test_too_few_patients_fail_loudly():
    with pytest.raises(mia.PowerCheckError, match="9 training and 3 never-seen"):
        mia.power_check(np.arange(9.0) + 10, np.arange(3.0), n_boot=50, n_perm=50)


def test_null_control_off_fails_loudly():
    # never-seen patients whose seeded halves differ: the test "sees" membership where there is none
    ia, ib = mia.null_halves(12, seed=3)
    never = np.zeros(12)
    never[ia] = 1.0
    with pytest.raises(mia.PowerCheckError, match="null control off") as err:
        mia.power_check(np.full(24, 5.0), never, seed=3, n_boot=50, n_perm=50)
    assert err.value.result["null_auc"] == 1.0 and err.value.result["member_auc"] == 1.0


class _Memoriser(torch.nn.Module):
    """Predicts the exact label of every image it was 'trained' on (looked up by content) and
    nothing (uniform) on any other: the extreme of memorisation."""

    def __init__(self, items):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # predict_probs reads the device from a parameter
        self.table = {self._key(torch.as_tensor(i["image"])): torch.as_tensor(i["label"]).long() for i in items}

    @staticmethod
    def _key(x: torch.Tensor) -> float:
        return round(float(x.double().sum()), 3)

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3, *x.shape[2:])
        for b in range(x.shape[0]):
            label = self.table.get(self._key(x[b]))
            if label is not None:
                out[b] = 8.0 * torch.nn.functional.one_hot(label[0], 3).permute(3, 0, 1, 2).float()
        return out + self.w


def _items(n: int, offset: int) -> list[dict]:
    rng = np.random.default_rng(offset)
    out = []
    for k in range(n):
        image, label = make_blob_subject(rng, SIZE)
        # labels the image does not predict: only memorising them lowers a patient's loss
        label = np.where(rng.random(label.shape) < 0.3, rng.integers(0, 3, label.shape), label).astype(np.int64)
        out.append({"id": f"P{offset + k:03d}", "image": torch.from_numpy(image)[None], 
                    "label": torch.from_numpy(label)[None]})
    return out


def test_power_check_of_models():
    train, never = _items(24, 0), _items(12, 100)
    res = mia.power_check_model(_Memoriser(train), train, never, (SIZE,) * 3, 3, views=1, n_boot=100, n_perm=100)
    assert res["passed"] and res["member_auc"] == 1.0
    assert set(res["member_scores"]) == {i["id"] for i in train} and len(res["nonmember_scores"]) == 12

    torch.manual_seed(0)
    untrained = build_model("unet_tiny", in_channels=1, num_classes=3, spatial_dims=3)
    with pytest.raises(mia.PowerCheckError, match="does not memorise") as err:  # fewer patients: a real network is slow
        mia.power_check_model(untrained, train[:12], never[:6], (SIZE,) * 3, 3, views=1, n_boot=100, n_perm=100,
                              min_members=12, min_nonmembers=6)
    assert len(err.value.result["member_scores"]) == 12  # the per-patient evidence comes with the error
    with pytest.raises(ConfigError, match="both training and never-seen"):
        mia.power_check_model(untrained, train, train[:12], (SIZE,) * 3, 3, views=1)


def test_power_cohort_sizes(tmp_path):
    with pytest.raises(ConfigError, match="at least 24 and 12"):
        power_cohort(tmp_path / "small", sites=3, subjects=8)
    with pytest.raises(ConfigError, match="size 48"):
        power_cohort(tmp_path / "big", sites=3, size=48)
    c = power_cohort(tmp_path / "p", sites=3, size=24)
    counts = {s: len(c.select(sp)) for sp in ("train", "test") for s in [sp]}
    assert counts == {"train": 36, "test": 12} and len(c.sites) == 3
    assert all(len(c.select("test", s)) == 4 for s in c.sites)
