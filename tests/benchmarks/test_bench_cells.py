"""The shared resumable-cell runner of the benchmarks (benchmarks/cells.py), on tiny cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import cells  # noqa: E402

# A tiny benchmark: each cell sleeps a little (so a run can be killed mid-way) and returns a
# value that depends only on its parameters; the summary is the sum over done cells.
TINY = """
import argparse, sys, time
sys.path.insert(0, {bench_dir!r})
import cells

VERSION = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1].startswith("v") else "v1"
CELLS = [cells.Cell(f"t{{t}}-s{{s}}", {{"t": t, "s": s}}) for t in range(3) for s in range(2)]

def run_cell(cell, work):
    time.sleep({sleep})
    (work / "weights.bin").write_bytes(b"x")  # stays out of git and out of the merge
    return {{"value": cell.params["t"] * 10 + cell.params["s"]}}

def merge(done):
    return {{"total": sum(r["metrics"]["value"] for r in done.values())}}

def render(out, done):
    rows = [f"| {{n}} | {{r['metrics']['value']}} |" for n, r in sorted(done.items())]
    return ["| cell | value |", "|---|---|"] + rows

ap = argparse.ArgumentParser()
cells.add_args(ap)
args = ap.parse_args()
sys.exit(cells.run("tiny", VERSION, CELLS, run_cell, merge, render, args))
"""


def _script(tmp: Path, sleep: float = 0.0) -> Path:
    p = tmp / "tiny_bench.py"
    p.write_text(TINY.format(bench_dir=str(REPO / "benchmarks"), sleep=sleep))
    return p


def _run(script: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args, "--runs", str(root / "runs"),
                           "--results", str(root / "results")], capture_output=True, text=True, timeout=120)


def _table(root: Path) -> tuple[dict, list[str]]:
    """The merged result without what legitimately differs between runs (times, dates)."""
    out = json.loads((root / "results" / "tiny.json").read_text())
    for k in ("eta_s", "updated", "machine", "command"):
        out.pop(k)
    for c in out["cells"].values():
        c.pop("seconds")
    md = [line for line in (root / "results" / "tiny.md").read_text().splitlines()
          if not line.startswith(("Cells:", "Command:", "Machine:"))]
    return out, md


def test_killed_run_resumes_to_the_same_table(tmp_path):
    full = tmp_path / "full"
    r = _run(_script(tmp_path), full)
    assert r.returncode == 0, r.stderr
    ref, ref_md = _table(full)
    assert ref["cells_done"] == ref["cells_total"] == 6 and ref["complete"] and ref["total"] == 63

    killed = tmp_path / "killed"
    (tmp_path / "slow").mkdir()
    slow = _script(tmp_path / "slow", sleep=0.4)
    proc = subprocess.Popen([sys.executable, str(slow), "--runs", str(killed / "runs"), "--results",
                             str(killed / "results")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells_dir = killed / "runs" / "tiny" / "cells"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(cells_dir.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(cells_dir.glob("*.json")))
    assert 2 <= n_before < 6, "the kill must land mid-run"
    partial = json.loads((killed / "results" / "tiny.json").read_text())
    # a kill between a cell's file and the merge after it leaves the table one cell behind (the cell
    # itself is kept and merged by the next run)
    assert not partial["complete"] and partial["cells_done"] in (n_before - 1, n_before) and partial["eta_s"] > 0
    assert "PARTIAL" in (killed / "results" / "tiny.md").read_text()

    r = _run(slow, killed)  # --resume is the default
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" ...\n") == 6 - n_before  # only the missing cells ran
    got, got_md = _table(killed)
    assert got == ref and got_md == ref_md
    # weights stay out of the cells folder (which is what git sees)
    assert {p.suffix for p in cells_dir.iterdir()} == {".json"}


def test_md_opens_with_command_machine_and_count(tmp_path):
    r = _run(_script(tmp_path), tmp_path, "--cells", "t0-s0,t2-s1")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "results" / "tiny.md").read_text().splitlines()
    assert lines[2].startswith("Command: `") and "tiny_bench.py --cells t0-s0,t2-s1" in lines[2]
    assert lines[4].startswith("Machine: ") and "CPUs" in lines[4]
    assert lines[6].startswith("Cells: 2/6 (PARTIAL")
    rec = json.loads((tmp_path / "runs" / "tiny" / "cells" / "t2-s1.json").read_text())
    assert rec["metrics"] == {"value": 21} and rec["versions"]["benchmark"] == "v1"
    assert set(rec["versions"]) >= {"privseg", "torch", "flwr", "python"} and rec["command"]


def test_corrupt_and_other_version_cells_are_recomputed(tmp_path):
    script = _script(tmp_path)
    assert _run(script, tmp_path).returncode == 0
    cdir = tmp_path / "runs" / "tiny" / "cells"
    (cdir / "t1-s0.json").write_text('{"bench": "tiny", "metr')  # truncated
    old = json.loads((cdir / "t2-s0.json").read_text())
    old["metrics"]["value"] = 999
    old["version"] = "v0"
    (cdir / "t2-s0.json").write_text(json.dumps(old))
    merged = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert merged["total"] == 63

    # before recomputing, neither file counts: the merge leaves both out
    tiny_cells = [cells.Cell(f"t{t}-s{s}", {"t": t, "s": s}) for t in range(3) for s in range(2)]
    runner = cells.Runner("tiny", "v1", tiny_cells, tmp_path / "runs", tmp_path / "results")
    assert set(runner.done()) == {"t0-s0", "t0-s1", "t1-s1", "t2-s1"}

    r = _run(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "recomputing t1-s0: the cell file corrupt" in r.stdout
    assert "recomputing t2-s0: the cell file benchmark version 'v0'" in r.stdout
    assert r.stdout.count(" ...\n") == 2
    merged = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert merged["total"] == 63 and merged["cells"]["t2-s0"]["metrics"]["value"] == 20

    # a new benchmark version recomputes everything
    r = subprocess.run([sys.executable, str(script), "v2", "--runs", str(tmp_path / "runs"), "--results",
                        str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count(" ...\n") == 6


def test_second_runner_is_refused(tmp_path):
    runner = cells.Runner("tiny", "v1", [cells.Cell("a")], tmp_path / "runs", tmp_path / "results")
    runner.lock()
    try:
        r = _run(_script(tmp_path), tmp_path)
        assert r.returncode == cells.EXIT_LOCKED
        assert "another runner is working on this benchmark" in r.stderr and f"pid {os.getpid()}" in r.stderr
        assert not (tmp_path / "runs" / "tiny" / "cells").exists()
    finally:
        runner.unlock()
    assert _run(_script(tmp_path), tmp_path).returncode == 0  # released: runs now


def test_a_runner_of_chosen_cells_runs_beside_a_full_one(tmp_path):
    full = cells.Runner("tiny", "v1", [cells.Cell("a")], tmp_path / "runs", tmp_path / "results")
    full.lock()  # a whole-benchmark runner is working...
    held, _ = cells.Runner("tiny", "v1", [], tmp_path / "runs", tmp_path / "results").lock_cell(cells.Cell("t0-s1"))
    try:  # ...on t0-s1: a --cells runner runs its other cells and leaves that one alone
        r = _run(_script(tmp_path), tmp_path, "--cells", "t0-s0,t0-s1")
        assert r.returncode == 0, r.stderr
        assert "cell 1/2 t0-s0 ..." in r.stdout and "t0-s1 ..." not in r.stdout
        assert "skipping t0-s1: another runner is running it (pid" in r.stdout
        assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / "cells").glob("*.json")) == ["t0-s0.json"]
    finally:
        held.close()
        full.unlock()
    r = _run(_script(tmp_path), tmp_path, "--cells", "t0-s0,t0-s1")  # released: it runs now, t0-s0 stays done
    assert r.returncode == 0 and r.stdout.count(" ...\n") == 1 and "t0-s1 ..." in r.stdout



def test_summary_merges_beside_a_running_runner_and_runs_nothing(tmp_path):
    script = _script(tmp_path)
    assert _run(script, tmp_path, "--cells", "t0-s0,t1-s1").returncode == 0
    (tmp_path / "results" / "tiny.json").unlink()
    full = cells.Runner("tiny", "v1", [cells.Cell("a")], tmp_path / "runs", tmp_path / "results")
    full.lock()  # a whole-benchmark runner holds the lock: --summary neither waits for it nor runs a cell
    try:
        r = _run(script, tmp_path, "--summary")
    finally:
        full.unlock()
    assert r.returncode == 0, r.stderr
    assert " ..." not in r.stdout and "2/6 cells merged" in r.stdout
    out = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert out["cells_done"] == 2 and out["total"] == 10 + 1 and "--summary" not in out["command"]

def test_unknown_cell_exits_2(tmp_path):
    r = _run(_script(tmp_path), tmp_path, "--cells", "t0-s0,nope")
    assert r.returncode == 2
    assert "unknown cell(s): nope" in r.stderr
    assert not (tmp_path / "runs" / "tiny" / "cells").exists()


def test_cell_names_and_duplicates_are_checked(tmp_path):
    with pytest.raises(ValueError, match="cell name"):
        cells.Cell("../escape")
    with pytest.raises(ValueError, match="duplicate"):
        cells.Runner("b", "v", [cells.Cell("a"), cells.Cell("a")], tmp_path, tmp_path)


def test_changed_params_are_recomputed(tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "results"
    ran = []

    def run_cell(cell, work):
        ran.append(cell.name)
        return {"v": cell.params["x"]}

    def merge(done):
        return {}

    r1 = cells.Runner("b", "v", [cells.Cell("a", {"x": 1})], runs, res)
    r1.run(run_cell, merge, lambda o, d: [], log=lambda m: None)
    r2 = cells.Runner("b", "v", [cells.Cell("a", {"x": 2})], runs, res)
    out = r2.run(run_cell, merge, lambda o, d: [], log=lambda m: None)
    assert ran == ["a", "a"] and out["cells"]["a"]["metrics"] == {"v": 2}


def _rec(params: dict, metrics: dict) -> dict:
    return {"params": params, "metrics": metrics, "seconds": 1.0}


def test_privacy_utility_keys_from_cells():
    """Issue 26's keys: each DP arm over the non-private run of the same initialisation, the
    better new arm per task, means over seeds; a key short of cells is computed from what exists and
    labelled PARTIAL (never judged against its target); the clip rule picked on held-out seeds."""
    import privacy_utility as pu

    dice = {"np": 0.80, "np_warm": 0.84, "old": 0.40, "recipe": 0.70, "warm": 0.80, "warm_lora": 0.82}
    clip = {"fixed": 0.02, "adaptive": -0.05}  # the recipe with these rules, against normalise's
    done = {}
    grid = pu.make_cells(pu.SMOKE)
    for c in grid:
        p = c.params
        if p["kind"] == "public":
            done[c.name] = _rec(p, {"dice": 0.5, "public_alone": {"H1": 0.5, "H2": 0.6, "H3": 0.7}})
            continue
        d = dice[p["arm"]] - 0.1 * (p["epsilon"] == 3.0) + 0.01 * p["seed"] + clip.get(p.get("clip"), 0.0)
        d -= 0.05 * (p["lr_pick"] in ("lo", "hi", "vhi", "vvhi"))  # the search keeps the best lr: mid
        done[c.name] = _rec(p, {"dice": d})
    out = pu.merge(done, len(grid))
    assert out["partial"] is False
    assert out["recipe_over_nonprivate"]["mri3d"]["12"]["8"] == pytest.approx(0.71 / 0.81)
    assert out["warm_over_nonprivate"]["ct3d"]["12"]["3"] == pytest.approx(0.71 / 0.85)
    assert out["ratio_basis"]["warm"]["ct3d"]["12"]["3"] == "complete"
    assert out["best_over_nonprivate_eps8_n12_3d"] == pytest.approx(0.81 / 0.85)  # warm / np_warm
    assert out["best_over_nonprivate_eps8_n12_derm2d"] == pytest.approx(0.81 / 0.85)
    assert out["recipe_minus_old_default_eps8_n12"] == pytest.approx(0.30) and out["met"][
        "recipe_minus_old_default_eps8_n12"]
    assert out["warm_gain_over_public_alone_eps8_n12"] == pytest.approx(0.81 - 0.6)
    assert out["best_over_nonprivate_eps8_n100"] is None  # the smoke grid has no n = 100
    assert out["key_basis"]["best_over_nonprivate_eps8_n100"] == "missing"
    choice = out["clip_rule_choice"]
    assert choice["best"] == "fixed" and choice["complete"]
    assert choice["mean_over_tasks_seeds_1_2"]["normalise"] == pytest.approx(0.715)  # seeds 1-2 only
    assert choice["per_task"]["ct3d"]["adaptive"]["mean_3_seeds"] == pytest.approx(0.66)
    lora = out["lora"]  # issue 26 item 5: the LoRA arm against np_warm and against the warm arm (all weights)
    assert lora["per_task"]["mri3d"]["over_nonprivate"] == pytest.approx(0.83 / 0.85)
    assert lora["per_task"]["derm2d"]["minus_warm"] == pytest.approx(0.02) and lora["pays"] is True
    assert out["best_over_nonprivate_eps8_n12_3d"] == pytest.approx(0.81 / 0.85)  # the keys: without it
    full = pu.make_cells(pu.FULL)
    names = [c.name for c in full]
    assert names[:3] == ["public-mri3d", "public-ct3d", "public-derm2d"]
    head = [c for c in full if c.params.get("n") in (12, 100) and c.params.get("epsilon") in (None, 8.0)
            and c.params["kind"] == "run" and (c.params.get("n") == 12 or c.params["task"] == "mri3d")]
    runs = [c for c in full[3:] if c.params["kind"] == "run"]
    head = [c for c in head if c.params["arm"] != pu.LORA_ARM]  # the LoRA cells: appended after everything
    assert max(names.index(c.name) for c in head) < min(names.index(c.name) for c in runs if c not in head)
    # 8 (task, n) x (2 non-private + 2 epsilons x 3 DP arms) x (5 lr on seed 0 + 2 seeds), then the clip cells,
    # then the LoRA cells (3 tasks x (5 lr on seed 0 + 2 seeds)): appended, so no earlier cell moved
    grid_cells = 3 + 8 * (2 + 2 * 3) * (len(pu.LR_FACTORS) + 2)
    assert len(full) == grid_cells + 3 * 2 * 3 + 3 * (len(pu.LR_FACTORS) + 2)
    assert all(c.params["kind"] == "clip" for c in full[grid_cells:grid_cells + 18])
    assert all(c.params["arm"] == pu.LORA_ARM and c.params["trainable"] == "lora" for c in full[grid_cells + 18:])

    done.pop("derm2d-n12-recipe-eps8-lrbest-seed2")  # one seed missing: computed from the others, PARTIAL
    done.pop("derm2d-n12-recipe-clipadaptive-eps8-lrbest-seed1")
    out = pu.merge(done, len(grid))
    assert out["partial"] == {"done": len(grid) - 2, "total": len(grid), "resume": pu.RESUME}
    assert out["recipe_over_nonprivate"]["derm2d"]["12"]["8"] == pytest.approx(0.705 / 0.81)
    assert out["ratio_basis"]["recipe"]["derm2d"]["12"]["8"].startswith("PARTIAL: 2 of 3 seeds")
    assert out["recipe_minus_old_default_eps8_n12"] is not None
    assert out["key_basis"]["recipe_minus_old_default_eps8_n12"].startswith("PARTIAL")
    assert out["met"]["recipe_minus_old_default_eps8_n12"] is None  # a partial key is not judged
    assert out["clip_rule_choice"]["best"] is None
    done.pop("ct3d-n12-warm_lora-eps8-lrbest-seed1")
    lora = pu.merge(done, len(grid))["lora"]
    assert lora["pays"] is None and lora["per_task"]["ct3d"]["basis"].startswith("PARTIAL: 2 of 3 seeds")
    lines = pu.render(out, done)
    assert any("PARTIAL" in ln and "--resume" in ln for ln in lines)
    assert any(ln.startswith("| recipe_minus_old_default_eps8_n12 | ") and "PARTIAL" in ln for ln in lines)


def test_federated_keys_from_cells():
    import federated as fb

    base = {"pooled": 0.80, "local": 0.60, "fedavg": 0.74, "fedprox": 0.75, "fedbn": 0.78, "fedavg+pers": 0.79,
            "fedbn+pers": 0.81, "fedavg+all": 0.785, "fedbn+all": 0.805}
    done = {}
    for c in fb.make_cells(fb.SMOKE):
        p = c.params
        if "many" in p:
            done[c.name] = _rec(p, {"sites": p["many"], "rounds": 1, "ok": True, "error": None,
                                    "peak_rss_mb": 100.0 * p["many"], "seconds": 3.0})
            continue
        sites = [f"H{k + 1}" for k in range(p["sites"])]
        m = {"dice": {s: base[p["method"]] + 0.01 * p["seed"] for s in sites}}
        if p["method"] in fb.STRATEGIES:
            m.update(overhead=0.05 + 0.01 * p["seed"], ray_startup_s=30.0)
        if p["method"] in fb.PERSONALISED:  # served = finetune; H1's own local-only model is 0.02 weaker
            m.update(serves={s: "finetune" for s in sites}, candidates={s: {
                "global": 0.7, "finetune": m["dice"][s], "local": 0.61 + 0.01 * p["seed"] - 0.02 * (s == "H1")}
                for s in sites})
        done[c.name] = _rec(p, m)
    out = fb.merge(done)
    assert out["gap_to_pooled"] == pytest.approx(0.02) and out["best_strategy"] == {"3": "fedbn", "5": "fedbn"}
    assert out["overhead"] == pytest.approx(0.06) and out["ray_startup_s"] == 30.0
    assert out["sites_100_ok"] is True and out["sites_100_peak_rss_mb"] == 10000.0
    assert out["table"]["5"]["fedavg"]["sites"]["H5"]["std"] == pytest.approx(np.std([0.74, 0.75, 0.76]))
    # issue 29's keys: the best personalised arm (fedbn+pers), its served Dice against the same cell's local-only
    assert out["best_personalised_arm"] == "fedbn+pers"
    assert out["min_site_gain_over_local"] == pytest.approx(0.82 - 0.62)  # the worst site: not H1
    assert out["personalisation_by_arm"]["fedbn+pers"]["gain_by_site"]["5:H1"] == pytest.approx(0.82 - 0.60)
    assert out["gap_to_pooled_personalised"] == pytest.approx(0.81 - 0.82)
    assert out["mean_gain_over_local"] == pytest.approx(0.82 - (0.62 - 0.02 / 5))
    assert out["table"]["3"]["fedbn+pers:local"]["sites"]["H1"]["mean"] == pytest.approx(0.60)
    assert not out["personalisation_partial"] and set(out["personalisation_by_arm"]) == set(fb.PERSONALISED)
    # an arm with a seed missing is partial: never the best while a complete arm exists
    done.pop("s5-fedbn+pers-seed2")
    partial = fb.merge(done)
    assert partial["personalisation_by_arm"]["fedbn+pers"]["partial"]
    assert partial["best_personalised_arm"] == "fedbn+all"
    # with no complete arm, the keys come from the cells there are, labelled partial (no 5-site mean gain)
    only3 = {k: v for k, v in done.items() if not (k.startswith("s5-") and "+" in k)}
    keys = fb.merge(only3)
    assert keys["personalisation_partial"] and keys["best_personalised_arm"] == "fedbn+pers"
    assert keys["mean_gain_over_local"] is None and keys["personalisation_by_arm"]["fedbn+pers"]["seeds"] == {"3": 3}
    assert any(ln.startswith("**Partial**") for ln in fb.render(keys, only3))
    done.pop("s5-fedbn-seed1")
    assert fb.merge(done)["gap_to_pooled"] is None  # a partial strategy is no "best"
    assert any("gap_to_pooled" in line for line in fb.render(fb.merge(done), done))


def test_a_later_cell_reads_a_finished_cells_metrics_or_is_told_to_run_it(tmp_path):
    (tmp_path / "original.json").write_text(json.dumps({"cell": "original", "metrics": {"auc": 0.9}}))
    assert cells.metrics_of(tmp_path, "original") == {"auc": 0.9}
    with pytest.raises(RuntimeError, match="--cells retrain"):
        cells.metrics_of(tmp_path, "retrain")


def test_unlearning_replaces_a_seed_whose_original_has_no_power(tmp_path):
    """A seed whose original fails the power check keeps its original cell and gives way to the
    next seed; its numbers count nowhere but in its own report line."""
    import unlearning as ub

    s = {**ub.settings(False), "n_memorised": 1, "n_random": 1}
    assert ub.seeds_to_run(s, tmp_path) == ([0, 1, 2], [])

    def original(seed: int, passed: bool) -> None:
        power = {"member_auc": 0.99, "member_ci": [0.98, 1.0], "null_auc": 0.5 if passed else 0.72, "null_sd": 0.17,
                 "null_pass_rate": 0.4, "passed": passed, "problems": [] if passed else ["null control off"],
                 "member_scores": {"A": 0.9, "B": 0.8}, "nonmember_scores": {"C": 0.1, "D": 0.2}}
        rec = {"params": {**s, "seed": seed}, "metrics": {"power": power, "forget": ["A", "B"], "memorised": ["A"],
                                                          "random": ["B"]}, "seconds": 1.0}
        (tmp_path / f"original-seed{seed}.json").write_text(json.dumps(rec))
        return rec

    done = {f"original-seed{k}": original(k, k != 1) for k in range(3)}
    assert ub.seeds_to_run(s, tmp_path) == ([0, 2, 3], [1])
    names = [c.name for c in ub.make_cells(s, cells_dir=tmp_path)]
    assert names[0] == "original-seed1" and "retrain-seed1" not in names and "retrain-seed3" in names
    assert len(names) == 1 + len(ub.make_cells(s, seeds=[0, 2, 3]))
    out = ub.merge(done)
    assert out["seeds_done"] == [0, 2] and list(out["seeds_replaced"]) == [1]
    assert out["mia_null_control"] == pytest.approx(0.5)  # the replaced seed's 0.72 is not in the mean
    assert any("Seed 1 replaced by the next seed" in line for line in ub.render(out, done))
    smoke = {**s, "smoke": True}
    assert ub.seeds_to_run(smoke, tmp_path)[0] == [0, 1, 2]  # a smoke run never replaces seeds


def test_privacy_utility_smoke_runs_a_warm_dp_cell_end_to_end(capsys):
    """--smoke: the public start of derm2d, its Dice alone, then the warm DP arm (DP noise from the
    secret key, every release booked) and the non-private run from the same start."""
    import privacy_utility as pu

    names = ["public-derm2d", "derm2d-n12-np_warm-lrmid-seed0", "derm2d-n12-warm-eps8-lrmid-seed0"]
    assert pu.main(["--smoke", "--cells", ",".join(names)]) == 0
    tmp = Path(capsys.readouterr().out.split("smoke run in ", 1)[1].split()[0])
    out = json.loads((tmp / "results" / "privacy_utility.json").read_text())
    assert out["cells_done"] == 3 and not out["complete"]
    assert set(out["public_alone"]["derm2d"]) == {"H1", "H2", "H3"}
    warm = out["cells"]["derm2d-n12-warm-eps8-lrmid-seed0"]["metrics"]
    assert warm["private"] and set(warm["epsilon_ledger"]) == {"H1", "H2", "H3"}
    assert warm["plan"]["cohort_size"] == 12 and 0 <= warm["dice"] <= 1
    assert "PARTIAL" in (tmp / "results" / "privacy_utility.md").read_text()
