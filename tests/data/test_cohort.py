"""The patient is the unit: patient IDs on subjects, splits that never put one patient on two
sides, split files a user can pin, and membership audits that refuse too few subjects."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from privseg.audit import mia
from privseg.cli import main
from privseg.data.cohort import (
    MANIFEST_NAME,
    Cohort,
    Subject,
    apply_splits,
    assign_splits,
    read_splits,
    write_splits,
)
from privseg.data.formats import read_cohort
from privseg.data.transforms import load_preprocessed
from privseg.errors import ConfigError, DataError


def _subject(sid: str, patient: str | None = None, site: str = "H1", split: str = "train") -> Subject:
    return Subject(id=sid, site=site, images=(f"/x/{sid}.nii.gz",), label=None, patient_id=patient, split=split)


def _with_patients(cohort: Cohort, patients: dict[str, str]) -> Cohort:
    """The cohort with some subjects given to patients, re-split by patient, saved."""
    subjects = [replace(s, patient_id=patients.get(s.id, s.id)) for s in cohort.subjects]
    out = replace(cohort, subjects=assign_splits(subjects, test_fraction=0.34))
    out.save()
    return out


# -- patient IDs ------------------------------------------------------------------------


def test_patient_id_defaults_to_the_subject_and_is_checked() -> None:
    assert _subject("S1").patient_id == "S1"
    assert _subject("S1", "P7").patient_id == "P7"
    with pytest.raises(ConfigError, match=r"patient ID of subject S1 '\.\./x' is not safe"):
        _subject("S1", "../x")


def test_manifest_keeps_patient_ids_and_old_manifests_still_load(tiny_cohort: Cohort) -> None:
    first, second = tiny_cohort.select(site="H1")[:2]
    cohort = _with_patients(tiny_cohort, {first.id: "P1", second.id: "P1"})
    back = read_cohort(cohort.root)
    assert back.patient_of(first.id) == back.patient_of(second.id) == "P1" and back.has_patient_ids
    assert [s.id for s in back.patient_subjects("P1")] == [first.id, second.id]
    assert set(back.patients()) == {"P1"} | {s.id for s in back.subjects if s.id not in (first.id, second.id)}
    # a manifest written before patient IDs existed: every subject is its own patient
    path = cohort.root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for d in raw["subjects"]:
        del d["patient_id"]
    path.write_text(json.dumps(raw))
    old = read_cohort(path)
    assert not old.has_patient_ids and all(s.patient_id == s.id for s in old.subjects)
    with pytest.raises(ConfigError, match="unknown patient ID 'P1'"):
        old.patient_subjects("P1")
    raw["subjects"][0]["patient_id"] = 7
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"cohort\.json.*subjects\[0\]\.patient_id must be a string"):
        read_cohort(path)


def test_a_manifest_with_a_patient_on_two_sides_is_refused_naming_it(tiny_cohort: Cohort) -> None:
    path = tiny_cohort.root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    train = next(d for d in raw["subjects"] if d["split"] == "train")
    test = next(d for d in raw["subjects"] if d["split"] == "test")
    train["patient_id"] = test["patient_id"] = "P1"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"cohort\.json: patient 'P1' is in two splits"):
        read_cohort(path)


def test_splits_keep_each_patient_on_one_side() -> None:
    # 12 patients with 3 scans each, at two sites: no seed may split a patient
    subjects = [_subject(f"S{p:02d}{k}", f"P{p:02d}", site=f"H{p % 2}") for p in range(12) for k in range(3)]
    for seed in range(20):
        out = assign_splits(subjects, val_fraction=0.2, test_fraction=0.3, seed=seed)
        by_patient: dict[str, set[str]] = {}
        for s in out:
            by_patient.setdefault(s.patient_id, set()).add(s.split)
        assert all(len(v) == 1 for v in by_patient.values())
        # fractions count patients: 6 per site -> round(1.8) = 2 test patients, 6 test subjects
        assert [s.split for s in out].count("test") == 2 * 2 * 3
    # one file per patient: the split is the per-subject split it always was (pinned reproducibility)
    single = [_subject(f"S{k:02d}", site=f"H{k % 3}") for k in range(20)]
    assert "".join(s.split[:2] for s in assign_splits(single, val_fraction=0.2, test_fraction=0.25, seed=3)) == \
        "tetrtetrvatrteteva" "vatetetrtrtrtrtrtrtrtr"


def test_msd_training_entries_may_name_the_patient(tmp_path: Path) -> None:
    from test_formats import make_msd

    root = make_msd(tmp_path / "msd", n=3)
    ds = json.loads((root / "dataset.json").read_text())
    ds["training"][0]["patient"] = "P1"
    ds["training"][1]["patient"] = "P1"
    (root / "dataset.json").write_text(json.dumps(ds))
    cohort = read_cohort(root)
    a, b, c = cohort.subjects
    assert a.patient_id == b.patient_id == "P1" and a.split == b.split and c.patient_id == c.id
    ds["training"][2]["patient"] = "../P"
    (root / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(DataError, match=r"dataset\.json.*patient of case .* is not safe"):
        read_cohort(root)


def test_preprocessed_items_carry_the_patient(tiny_cohort: Cohort) -> None:
    first, second = tiny_cohort.select(site="H1")[:2]
    cohort = _with_patients(tiny_cohort, {first.id: "P1", second.id: "P1"})
    items = load_preprocessed([cohort.subject(first.id), cohort.subject(second.id)], cohort)
    assert [(i["id"], i["patient"]) for i in items] == [(first.id, "P1"), (second.id, "P1")]


# -- pinned splits ----------------------------------------------------------------------


def _split_csv(path: Path, cohort: Cohort, split_of=None, extra: str = "") -> Path:
    rows = ["id,site,split"] + [f"{s.id},{s.site},{(split_of or {}).get(s.id, s.split)}" for s in cohort.subjects]
    path.write_text("\n".join(rows) + "\n" + extra)
    return path


def test_pinned_splits_from_csv_and_from_nnunet_json(tiny_cohort: Cohort, tmp_path: Path) -> None:
    ids = [s.id for s in tiny_cohort.subjects]
    flipped = {i: ("test" if k % 2 else "train") for k, i in enumerate(ids)}
    pinned = read_cohort(tiny_cohort.root, splits=_split_csv(tmp_path / "s.csv", tiny_cohort, flipped))
    assert {s.id: s.split for s in pinned.subjects} == flipped
    folds = [{"train": ids[:4], "val": ids[4:]}, {"train": ids[2:], "val": ids[:2]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    fold0 = read_cohort(tiny_cohort.root, splits=tmp_path / "splits_final.json")
    assert [s.split for s in fold0.subjects] == ["train"] * 4 + ["val"] * 2
    assert apply_splits(tiny_cohort, read_splits(tmp_path / "splits_final.json", fold=1)).subject(ids[0]).split == "val"
    # the split a run used, written and pinned again, is the same split
    written = write_splits(fold0, tmp_path / "run")
    assert written.name == "splits.csv"
    again = read_cohort(tiny_cohort.root, splits=written)
    assert [(s.id, s.split, s.patient_id) for s in again.subjects] == \
        [(s.id, s.split, s.patient_id) for s in fold0.subjects]


def test_a_csv_patient_column_groups_subjects(tiny_cohort: Cohort, tmp_path: Path) -> None:
    a, b = tiny_cohort.select(site="H1")[:2]
    rows = ["id,site,split,patient"] + [f"{s.id},{s.site},train,{'P1' if s.id in (a.id, b.id) else ''}"
                                        for s in tiny_cohort.subjects]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    cohort = read_cohort(tiny_cohort.root, splits=tmp_path / "p.csv")
    assert [s.id for s in cohort.patient_subjects("P1")] == [a.id, b.id]


@pytest.mark.parametrize("content, match", [
    ("id,site,split\nS999,H1,train\n", r"names 1 subject\(s\) not in cohort tiny: S999"),
    ("id,site,split\n../x,H1,train\n", r"subject ID on line 2 '\.\./x' is not safe"),
    ("id,split\nS000,train\nS000,test\n", r"line 3: subject 'S000' is listed twice"),
    ("id,split\nS000,holdout\n", r"line 2: split 'holdout' is not one of"),
    ("name,split\nS000,train\n", r"has no id column"),
    ("id,split\nS000,train\n", r"gives no split for 5 subject\(s\)"),
    ('{"train": ["S000", "S001"], "val": ["S001"]}', r"subject 'S001' is in two splits \(train and val\)"),
    ('[{"train": ["S000"], "val": []}]', r"gives no split for 5"),
    ('{"train": [], "holdout": []}', r"unknown split name"),
    ("[]", r"empty list of folds"),
])
def test_bad_split_files_are_refused_naming_the_file(tiny_cohort: Cohort, tmp_path: Path, content: str,
                                                     match: str) -> None:
    path = tmp_path / ("bad.json" if content[0] in "[{" else "bad.csv")
    path.write_text(content)
    with pytest.raises(DataError, match=rf"bad\.(csv|json).*{match}"):
        read_cohort(tiny_cohort.root, splits=path)


def test_a_split_file_may_not_put_a_patient_on_both_sides(tiny_cohort: Cohort, tmp_path: Path) -> None:
    a, b = tiny_cohort.select(site="H1")[:2]
    cohort = _with_patients(tiny_cohort, {a.id: "P1", b.id: "P1"})
    path = _split_csv(tmp_path / "s.csv", cohort, {a.id: "train", b.id: "test"})
    with pytest.raises(DataError, match=r"s\.csv: patient 'P1' is in two splits"):
        read_cohort(cohort.root, splits=path)
    path.write_text("id,site,split\n" + "\n".join(f"{s.id},H9,{s.split}" for s in cohort.subjects) + "\n")
    with pytest.raises(DataError, match=r"s\.csv: puts subject \w+ at site H9"):
        read_cohort(cohort.root, splits=path)
    assert read_cohort(cohort.root).subject(b.id).split == cohort.subject(b.id).split  # nothing changed


# -- CLI ----------------------------------------------------------------------------------


def test_cli_data_info_lists_subjects_and_patients(tiny_cohort: Cohort, capsys) -> None:
    assert main(["data", "info", str(tiny_cohort.root), "--subjects"]) == 0
    text = capsys.readouterr().out
    assert "one file = one patient" in text
    for site in tiny_cohort.sites:
        for split in ("train", "test"):
            ids = " ".join(s.id for s in tiny_cohort.select(split, site))
            assert f"{site} {split} ({len(tiny_cohort.select(split, site))}): {ids}" in text
    a, b = tiny_cohort.select(site="H1")[:2]
    _with_patients(tiny_cohort, {a.id: "P1", b.id: "P1"})
    assert main(["data", "info", str(tiny_cohort.root), "--subjects"]) == 0
    text = capsys.readouterr().out
    assert f"P1: {a.id} {b.id}" in text and "5 patients, 6 subjects" in text and "one file" not in text


def test_cli_data_info_on_a_sites_root_and_with_pinned_splits(tmp_path: Path, capsys) -> None:
    from test_formats import make_msd

    for site in ("hospA", "hospB"):
        make_msd(tmp_path / "root" / site, n=4)
    assert main(["data", "info", str(tmp_path / "root"), "--subjects"]) == 0
    text = capsys.readouterr().out
    assert "hospA train (3): " in text and "hospB test (1): " in text
    ids = [f"BRATS_{k:03d}" for k in range(4)]
    rows = [f"{i},{site},{'test' if i == ids[0] else 'train'}" for site in ("hospA", "hospB") for i in ids]
    (tmp_path / "s.csv").write_text("id,site,split\n" + "\n".join(rows) + "\n")
    assert main(["data", "info", str(tmp_path / "root"), "--subjects", "--splits", str(tmp_path / "s.csv")]) == 0
    assert f"hospA test (1): {ids[0]}" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("id,site,split\nBRATS_009,hospA,train\n")
    assert main(["data", "info", str(tmp_path / "root"), "--splits", str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv" in capsys.readouterr().err
    # data check reads a sites root too, and lists the problems of every site
    assert main(["data", "check", str(tmp_path / "root"), "--quiet"]) == 0
    (tmp_path / "root" / "hospA" / "labelsTr" / "BRATS_001.nii.gz").unlink()
    (tmp_path / "root" / "hospB" / "labelsTr" / "BRATS_002.nii.gz").unlink()
    assert main(["data", "check", str(tmp_path / "root"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hospA/labelsTr/BRATS_001.nii.gz" in err and "hospB/labelsTr/BRATS_002.nii.gz" in err
    assert "2 problem(s) found; 6 subject(s) could be read" in err


def test_cli_train_writes_the_split_it_used_and_accepts_pinned_splits(tiny_cohort: Cohort, tmp_path: Path,
                                                                       capsys) -> None:
    moved = tiny_cohort.select("train")[0].id
    pinned = _split_csv(tmp_path / "s.csv", tiny_cohort, {moved: "test"})
    run = tmp_path / "run"
    assert main(["train", "--cohort", str(tiny_cohort.root), "--out", str(run), "--model", "unet_tiny", "--steps",
                 "1", "--patch", "16", "--quiet", "--device", "cpu", "--splits", str(pinned)]) == 0
    lines = (run / "splits.csv").read_text().splitlines()
    assert lines[0] == "id,site,split,patient" and len(lines) == 1 + len(tiny_cohort.subjects)
    split_of = {line.split(",")[0]: line.split(",")[2] for line in lines[1:]}
    assert split_of == {s.id: "test" if s.id == moved else s.split for s in tiny_cohort.subjects}
    # a small membership audit runs, and says beside its CI that it is not informative
    capsys.readouterr()
    trained = [i for i, sp in split_of.items() if sp == "train"]
    assert main(["audit", "mia", "--checkpoint", str(run / "last.pt"), "--cohort", str(tiny_cohort.root),
                 "--members", trained[0], "--non-members", trained[1],
                 "--views", "1", "--quiet", "--out", str(tmp_path / "mia.json")]) == 2  # a member as non-member
    members = ",".join(i for i, sp in split_of.items() if sp == "train")
    non = ",".join(i for i, sp in split_of.items() if sp == "test")
    assert main(["audit", "mia", "--checkpoint", str(run / "last.pt"), "--cohort", str(tiny_cohort.root),
                 "--members", members, "--non-members", non, "--views", "1", "--out", str(tmp_path / "mia.json"),
                 "--splits", str(pinned)]) == 0
    text = capsys.readouterr().out
    assert "95 % CI" in text and "warning: only 3 member(s) vs 3 non-member(s)" in text
    assert "not informative" in json.loads((tmp_path / "mia.json").read_text())["warning"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,split\nS000,train\nS000,test\n")
    assert main(["train", "--cohort", str(tiny_cohort.root), "--out", str(tmp_path / "run2"), "--splits",
                 str(bad), "--quiet"]) == 2
    assert not (tmp_path / "run2").exists()


# -- membership audits need enough subjects ---------------------------------------------------


def test_membership_audit_refuses_or_warns_below_five_per_group() -> None:
    with pytest.raises(ConfigError, match=r"refused: only 1 member\(s\) vs 2 non-member\(s\)"):
        mia.check_group_sizes(1, 2)
    assert mia.check_group_sizes(5, 5) is None
    assert "not informative" in mia.check_group_sizes(4, 9, allow_small=True)

    class Fixed(torch.nn.Module):  # the same confident output for everyone
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros((x.shape[0], 2, *x.shape[2:])) + torch.arange(2.0).view(1, 2, 1, 1, 1) + self.w

    items = [{"id": f"X{k}", "image": torch.randn(1, 8, 8, 8), "label": torch.ones(1, 8, 8, 8, dtype=torch.long)}
             for k in range(3)]
    res = mia.audit_items(Fixed(), items[:1], items[1:], (8, 8, 8), 2, views=1, n_boot=20)
    assert res.warning and "1 member(s) vs 2 non-member(s)" in res.warning and res.to_dict()["warning"]
    with pytest.raises(ConfigError, match="refused"):
        mia.audit_items(Fixed(), items[:1], items[1:], (8, 8, 8), 2, views=1, n_boot=20, allow_small=False)


def test_cli_audit_refuses_small_groups_before_loading_anything(tiny_cohort: Cohort, tmp_path: Path, capsys) -> None:
    train, test = tiny_cohort.select("train"), tiny_cohort.select("test")
    out = tmp_path / "mia.json"
    assert main(["audit", "mia", "--checkpoint", str(tmp_path / "missing.pt"), "--cohort", str(tiny_cohort.root),
                 "--members", train[0].id, "--non-members", ",".join(s.id for s in test), "--refuse-small",
                 "--out", str(out)]) == 2
    assert "refused: only 1 member(s) vs 2 non-member(s)" in capsys.readouterr().err and not out.exists()

