"""Membership inference: AUC ≈ 1 against a memorising model, ≈ 0.5 without signal; CLI behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_cohort, tiny_central_run
from privseg.audit import mia
from privseg.cli import main
from privseg.errors import ConfigError

SIZE = 16


def test_auc_definition_and_ties():
    assert mia.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert mia.auc([0, 1], [2, 3]) == 0.0
    assert mia.auc([1, 1], [1, 1]) == 0.5
    assert mia.auc([2, 0], [1]) == 0.5
    with pytest.raises(ConfigError):
        mia.auc([], [1.0])


def test_no_signal_gives_half_and_the_interval_covers_it():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=800), rng.normal(size=800)
    assert abs(mia.auc(a, b) - 0.5) < 0.04
    lo, hi = mia.bootstrap_auc(a[:30], b[:30], n_boot=500)
    assert 0 <= lo <= mia.auc(a[:30], b[:30]) <= hi <= 1 and lo < 0.5 < hi


def test_calibration_against_reference_models():
    target = np.array([1.0, 2.0, 3.0])
    assert np.allclose(mia.calibrate(target, [np.array([0.5, 2.0, 1.0])]), [0.5, 0.0, 2.0])
    refs = [np.array([0.0, 1.0, 2.0]), np.array([2.0, 3.0, 4.0])]
    cal = mia.calibrate(target, refs)
    assert np.allclose(cal, (target - np.array([1.0, 2.0, 3.0])) / np.sqrt(2.0))


def _items(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        image = torch.from_numpy(rng.normal(size=(1, SIZE, SIZE, SIZE)).astype(np.float32))
        label = torch.from_numpy(rng.integers(0, 3, size=(1, SIZE, SIZE, SIZE)))  # unpredictable from the image
        out.append({"image": image, "label": label, "id": f"X{seed}{k:02d}", "site": "H1"})
    return out


class Memoriser(torch.nn.Module):
    """Has memorised its members' label maps; for anyone else it outputs a confident guess."""

    def __init__(self, members: list[dict]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = {round(float(m["image"].sum()), 2): m["label"][0] for m in members}

    def forward(self, x):
        outs = []
        for xi in x:
            lab = self.table.get(round(float(xi.sum()), 2))
            if lab is None:
                lab = torch.zeros(x.shape[2:], dtype=torch.long)
            outs.append(6.0 * torch.nn.functional.one_hot(lab, 3).permute(3, 0, 1, 2).float())
        return torch.stack(outs) + self.w


def test_memorising_model_is_caught_and_reference_calibration_keeps_it():
    members, nonmembers = _items(5, 1), _items(5, 2)
    res = mia.audit_items(Memoriser(members), members, nonmembers, (SIZE,) * 3, 3, views=1, n_boot=200)
    assert res.auc == 1.0 and res.ci_low == 1.0
    # A reference model that never saw anyone: calibration must not destroy the signal.
    ref = Memoriser([])
    cal = mia.audit_items(Memoriser(members), members, nonmembers, (SIZE,) * 3, 3, views=1, n_boot=200,
                          reference_models=[ref])
    assert cal.auc == 1.0 and cal.calibrated and cal.n_reference_models == 1
    # The Dice statistic sees it too.
    assert mia.audit_items(Memoriser(members), members, nonmembers, (SIZE,) * 3, 3, views=1, statistic="dice",
                           n_boot=200).auc == 1.0


def test_disjoint_random_models_give_no_signal():
    """Two random networks neither of which trained on anyone: 'members' of one are not special."""
    from privseg.models import build_model

    torch.manual_seed(0)
    aucs = []
    subjects = _items(8, 3)
    for seed in range(2):
        torch.manual_seed(seed)
        model = build_model("unet_tiny", in_channels=1, num_classes=3, spatial_dims=3, norm="group")
        res = mia.audit_items(model, subjects[:4], subjects[4:], (SIZE,) * 3, 3, views=2, n_boot=200, seed=seed)
        assert res.ci_low <= 0.5 <= res.ci_high or res.n_members < 5
        aucs.append(res.auc)
    assert 0.2 <= float(np.mean(aucs)) <= 0.8


def test_views_undo_their_flips():
    members = _items(1, 4)
    rows = mia.subject_statistics(Memoriser(members), members, (SIZE,) * 3, 3, views=1)
    assert rows[0]["dice"] == 1.0 and rows[0]["loss"] < 0.01


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mia")
    cohort = make_tiny_cohort(root / "cohort", sites=2, per_site=3, size=16)
    return cohort, tiny_central_run(cohort, root / "run", steps=2, patches_per_subject=1)


def test_cli_audit_mia(trained, tmp_path, capsys):
    cohort, ckpt = trained
    members = ",".join(s.id for s in cohort.select("train"))
    non = ",".join(s.id for s in cohort.select("test"))
    out = tmp_path / "mia.json"
    assert main(["audit", "mia", "--checkpoint", str(ckpt), "--cohort", str(cohort.root), "--members", members,
                 "--non-members", non, "--views", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0 <= res["auc"] <= 1 and res["n_members"] == len(cohort.select("train"))
    assert "MIA AUC" in capsys.readouterr().out
    # Non-members that trained the model, unknown IDs, empty lists: exit 2, nothing written.
    for bad_members, bad_non in ((members, members), (members, "S999"), (",", non)):
        target = tmp_path / "bad.json"
        assert main(["audit", "mia", "--checkpoint", str(ckpt), "--cohort", str(cohort.root), "--members",
                     bad_members, "--non-members", bad_non, "--out", str(target)]) == 2
        assert not target.exists()


def test_precomputed_reference_rows_equal_running_the_reference_model():
    from privseg.models import build_model

    members, nonmembers = _items(3, 4), _items(3, 5)
    torch.manual_seed(1)
    model = build_model("unet_tiny", in_channels=1, num_classes=3, spatial_dims=3, norm="group")
    torch.manual_seed(2)
    ref = build_model("unet_tiny", in_channels=1, num_classes=3, spatial_dims=3, norm="group")
    live = mia.audit_items(model, members, nonmembers, (SIZE,) * 3, 3, views=2, n_boot=50, reference_models=[ref])
    rows = (mia.subject_statistics(ref, members, (SIZE,) * 3, 3, views=2),
            mia.subject_statistics(ref, nonmembers, (SIZE,) * 3, 3, views=2))
    cached = mia.audit_items(model, members, nonmembers, (SIZE,) * 3, 3, views=2, n_boot=50, reference_rows=[rows])
    assert cached.auc == live.auc and cached.calibrated and cached.n_reference_models == 1
    assert [r["score"] for r in cached.members] == pytest.approx([r["score"] for r in live.members])
    with pytest.raises(ConfigError):
        mia.audit_items(model, members, nonmembers, (SIZE,) * 3, 3, views=2, n_boot=50, reference_rows=[rows[::-1]])
