"""HTML report, figures, run tracking and `privseg runs` on a tiny trained run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import make_tiny_cohort, tiny_central_run
from privseg.cli import main
from privseg.errors import PrivsegError
from privseg.report import build_report, find_runs
from privseg.report.figures import blank_check


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cohort = make_tiny_cohort(root / "tiny")
    tiny_central_run(cohort, root / "runs" / "central", steps=3, lr=5e-3)
    return root, cohort


def sections(page: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)"', page))


def assert_self_contained(page: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') >= 1


def assert_pngs(folder: Path, names: set[str]) -> None:
    for n in names:
        png = folder / f"{n}.png"
        assert png.is_file(), png
        assert blank_check(png.read_bytes()) > 0, f"{png} is blank"


def test_tracking_writes_run_json_and_compatible_metrics(trained):
    root, _ = trained
    run = root / "runs" / "central"
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "train" and info["status"] == "finished" and info["config"]["model"] == "unet_tiny"
    assert "torch" in info["versions"] and Path(info["cohort_path"]).is_dir()
    assert info["artifacts"]["checkpoint"]["path"] == "last.pt"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(set(r) == {"step", "loss"} for r in rows)
    assert any((run / "tb").glob("events.out.tfevents.*"))


def test_report_of_a_trained_run_has_every_section(trained):
    root, cohort = trained
    out = build_report(root / "runs" / "central", root / "out" / "report.html")
    page = out.read_text()
    assert {"summary", "cohort", "training", "metrics", "overlays"} <= sections(page)
    assert_self_contained(page)
    assert "HD95" in page and "Per subject" in page and all(s.id in page for s in cohort.select("test"))
    assert_pngs(root / "out" / "report_files",
                {"cohort_examples", "loss", "dice_by_site", *[f"overlay_{s.id}" for s in cohort.select("test")]})


def test_dp_federated_and_erasure_sections_are_data_driven(trained, tmp_path):
    root, cohort = trained
    run = tmp_path / "fl"
    run.mkdir()
    (run / "fl_config.json").write_text(json.dumps({"name": "fl", "strategy": "fedavg", "rounds": 3, "sites": [
        {"id": s, "cohort": str(cohort.root), "cohort_site": s} for s in cohort.sites]}))
    rounds = [{"round": r, "participants": cohort.sites, "failed": [], "applied": True,
               "train": {s: {"train-loss": 1.0 / r + k, "dp-epsilon": 0.5 * r + k, "dp-delta": 1e-3}
                         for k, s in enumerate(cohort.sites)},
               "eval": {"sites": {s: {"mean-dice": 0.2 * r + 0.05 * k, "num-examples": 1}
                                  for k, s in enumerate(cohort.sites)}, "overall": {"site-mean-dice": 0.2 * r}}}
              for r in (1, 2, 3)]
    (run / "state.json").write_text(json.dumps({"version": 1, "name": "fl", "status": "finished", "rounds_done": 3,
                                                "rounds_planned": 3, "sites": cohort.sites, "rounds": rounds,
                                                "strategy": "fedavg", "last_checkpoint": None}))
    from privseg.audit.ledger import ErasureLedger

    ledger = ErasureLedger(run / "erasure" / "ledger.db")
    ledger.append("ER-0123456789ab", "requested", {"run": "fl", "kind": "patient", "site": "H1",
                                                   "subjects": ["S000"], "reason": "GDPR art. 17",
                                                   "source": {"round": 3, "path": "x.pt", "sha256": "0" * 64}})
    ledger.append("ER-0123456789ab", "verified", {"passed": True, "checks": {}, **{
        k: {"mia_auc": 0.5, "retain_dice": 0.8, "test_dice": 0.7} for k in ("before", "after")}})
    # after `fl personalise`: per site global vs personalised vs local-only Dice and the model it serves
    (run / "personalisation.json").write_text(json.dumps({
        "global_round": 3, "methods": ["finetune", "local"], "erasure": "ER-0123456789ab", "sites": {
            "H1": {"val_dice": {"global": 0.5, "finetune": 0.61, "local": 0.4}, "serves": "finetune",
                   "test_dice": {"global": 0.52, "finetune": 0.63, "local": 0.41}},
            "H2": {"val_dice": {"global": 0.3}, "test_dice": {"global": 0.33}, "serves": "global",
                   "fallback": "could not be personalised again (no validation patients)"}}}))
    out = build_report(run, tmp_path / "fl.html")
    page = out.read_text()
    assert {"summary", "cohort", "training", "privacy", "erasure", "personalisation"} <= sections(page)
    served = page.split('<section id="personalisation"')[1].split("</section>")[0]
    assert "personalised (finetune) Dice" in served and "local-only Dice" in served and "global Dice" in served
    h1 = served.split("<td class=\"l\">H1</td>")[1].split("</tr>")[0]
    assert ">0.5200<" in h1 and ">0.6300<" in h1 and ">0.4100<" in h1 and "personalised (finetune)" in h1
    h2 = served.split("<td class=\"l\">H2</td>")[1].split("</tr>")[0]
    assert "global" in h2 and "no validation patients" in h2 and "after erasure ER-0123456789ab" in served
    assert "ER-0123456789ab" in page and "hash chain intact" in page
    assert "unlearning" not in sections(page) and "overlays" not in sections(page)
    assert_self_contained(page)
    assert_pngs(tmp_path / "fl_files", {"epsilon_per_round", "dice_vs_epsilon", "dice_per_round", "loss_per_site"})


def test_report_of_an_unlearning_run(trained, tmp_path):
    from privseg.unlearn.engine import unlearn

    root, cohort = trained
    ckpt = root / "runs" / "central" / "last.pt"
    forget = [cohort.select("train")[0].id]
    unlearn(ckpt, cohort, forget, "retrain", epochs=1, out_dir=tmp_path / "retrain", mia_views=1, device="cpu")
    unlearn(ckpt, cohort, forget, "noisy_label", epochs=1, out_dir=tmp_path / "unl", mia_views=1, device="cpu",
            retrain_checkpoint=tmp_path / "retrain" / "unlearned.pt")
    out = build_report(tmp_path / "unl", tmp_path / "u.html")
    page = out.read_text()
    assert {"summary", "cohort", "unlearning"} <= sections(page)
    assert "Dice gap" in page and "retrain" in page
    assert_self_contained(page)
    assert_pngs(tmp_path / "u_files", {"unlearn_groups", f"forgotten_{forget[0]}", "mia_scores"})


def test_bad_path_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert not out.exists() and not (tmp_path / "r_files").exists()
    with pytest.raises(PrivsegError):
        build_report(tmp_path / "empty", out)
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]


def test_runs_list_and_show(trained, capsys):
    root, _ = trained
    runs = find_runs(root / "runs")
    assert [(r["name"], r["kind"]) for r in runs] == [("central", "train")] and runs[0]["metric"] is not None
    assert main(["runs", "list", str(root / "runs")]) == 0
    assert "central" in capsys.readouterr().out
    assert main(["runs", "show", "central", "--root", str(root / "runs")]) == 0
    shown = capsys.readouterr().out
    assert "unet_tiny" in shown and "loss" in shown
    assert main(["runs", "show", "nope", "--root", str(root / "runs")]) == 2
