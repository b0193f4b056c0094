"""Per-patient membership test against reference models (offline LiRA): calibration under the
null, a memorised patient flagged, references kept with the run and reused, and what the erasure
certificate states (including "no power").

One tiny federated run (3 sites x 3 subjects, 2 rounds, unet_tiny, 16^3) and its 4 reference
models are trained once per module; the references' scores are cached with them (1 view), so the
tests that copy the run only score the models under test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import make_tiny_cohort, tiny_federation
from privseg.audit import lira, mia
from privseg.audit import reference as refmod
from privseg.audit.certificate import membership_statements, render_html, summarise, write_certificate
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.erasure import DEFAULT_THRESHOLDS, LEDGER, ErasureRequest, erase
from privseg.erasure.verification import judge
from privseg.errors import ConfigError
from privseg.federated import FLConfig, RunState
from privseg.federated import retrain as fed_retrain
from privseg.train import TrainConfig

SIZE = 16
LOOSE = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}


# -- the statistics ------------------------------------------------------------------------

def _synthetic(seed: int, n: int = 2000, refs: int = 4, gain: float = 0.25):
    """Patients with their own difficulty; references trained on complementary halves (IN adds
    1.0); the model under test trained on none of them but better overall by ``gain``."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i}" for i in range(n)]
    difficulty = rng.normal(0, 1, n)
    saw = [set() for _ in range(refs)]
    for p in ids[: n // 2]:  # the first half is the references' training pool
        for j in range(refs // 2):
            saw[2 * j + int(rng.integers(2))].add(p)
    ref_scores = [{p: difficulty[i] + rng.normal(0, 0.3) + (1.0 if p in saw[k] else 0.0)
                   for i, p in enumerate(ids)} for k in range(refs)]
    target = {p: difficulty[i] + rng.normal(0, 0.3) + gain for i, p in enumerate(ids)}
    return ids, target, ref_scores, saw


@pytest.mark.parametrize("seed", [0, 1])
def test_p_values_are_uniform_for_patients_no_model_saw(seed):
    ids, target, refs, saw = _synthetic(seed)
    res = lira.per_patient_test(target, refs, saw, never_seen=ids[len(ids) // 2:])
    p = np.array([r["p"] for r in res["patients"].values()])
    # pool patients (2 OUT references) and the rest (4) alike: about 5 % below 0.05, uniform overall
    assert 0.035 <= (p < 0.05).mean() <= 0.065
    assert stats.kstest(p, "uniform").pvalue > 0.001
    assert abs(res["shift"] - 0.25) < 0.05  # the whole-model gain is measured on the never-seen patients
    # without the shift (no never-seen patients to measure it) the better model flags far too many
    biased = lira.per_patient_test(target, refs, saw)
    assert np.mean([r["p"] < 0.05 for r in biased["patients"].values()]) > 0.1


def test_a_member_is_flagged_and_the_population_figures_see_it():
    ids, target, refs, saw = _synthetic(2, n=400)
    members = ids[:20]
    for p in members:
        target[p] += 2.0  # the model memorised these patients
    res = lira.per_patient_test(target, refs, saw, never_seen=ids[200:])
    assert all(res["patients"][p]["flagged"] for p in members)
    assert all(res["patients"][p]["log_lr"] is not None for p in members if any(p in s for s in saw))
    pop = lira.population(res, members, ids[200:])
    assert pop["auc"] > 0.95 and pop["tpr"] > 0.5 and pop["achieved_fpr"] <= 0.01
    assert lira.tpr_at_fpr([3.0, 1.0], [0.0, 2.0])["tpr"] == 0.5  # 2 non-members: threshold is the highest


def test_fewer_than_two_out_references_is_refused():
    target = {"A": 0.0, "B": 0.0}
    refs = [{"A": 0.1, "B": 0.2}, {"A": 0.3, "B": 0.1}]
    with pytest.raises(ConfigError, match="fewer than 2 reference models never saw patient.*A"):
        lira.per_patient_test(target, refs, [{"A"}, set()])


# -- tiny models: a memorised patient, scored through the same statistics as a real model --

def _items(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": torch.from_numpy(rng.normal(size=(1, SIZE, SIZE, SIZE)).astype(np.float32)),
             "label": torch.from_numpy(rng.integers(0, 3, size=(1, SIZE, SIZE, SIZE))), "id": f"X{seed}{k:02d}"}
            for k in range(n)]


class Memoriser(torch.nn.Module):
    """Outputs its members' label maps; anyone else gets a guess. ``noise`` makes two models that
    saw the same patients differ, as two trainings do."""

    def __init__(self, members: list[dict], seed: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = {round(float(m["image"].sum()), 2): m["label"][0] for m in members}
        self.seed = seed

    def forward(self, x):
        outs = []
        for xi in x:
            key = round(float(xi.sum()), 2)
            lab = self.table.get(key)
            g = torch.Generator().manual_seed(hash((self.seed, key)) % 2**31)
            conf = 3.0 + 0.5 * torch.randn(1, generator=g)
            if lab is None:
                lab = torch.zeros(x.shape[2:], dtype=torch.long)
                conf = 1.0 + 0.3 * torch.randn(1, generator=g)
            outs.append(conf * torch.nn.functional.one_hot(lab, 3).permute(3, 0, 1, 2).float())
        return torch.stack(outs) + self.w


def _scores(model, items):
    rows = mia.subject_statistics(model, items, (SIZE,) * 3, 3, views=1)
    return {r["id"]: lira.lira_score(r) for r in rows}


def test_tiny_models_flag_the_memorised_patient_and_pass_one_never_seen():
    pool, unseen = _items(6, 1), _items(4, 2)
    pool_ids = {"S": [i["id"] for i in pool]}
    ref_models, saw = [], []
    for k in range(6):
        half = set(refmod.halves(pool_ids, k, seed=0)["S"])
        ref_models.append(Memoriser([i for i in pool if i["id"] in half], seed=100 + k))
        saw.append(half)
    refs = [_scores(m, pool + unseen) for m in ref_models]
    never = [i["id"] for i in unseen]
    memorised = _scores(Memoriser(pool, seed=7), pool + unseen)
    res = lira.per_patient_test(memorised, refs, saw, never)
    assert all(res["patients"][i["id"]]["flagged"] for i in pool)
    assert all(res["patients"][i["id"]]["n_out"] == 3 for i in pool)
    # a model that never saw patient X: X is not flagged (nor is any never-seen patient)
    x = pool[0]["id"]
    without = _scores(Memoriser(pool[1:], seed=8), pool + unseen)
    res2 = lira.per_patient_test(without, refs, saw, never)
    assert not res2["patients"][x]["flagged"] and res2["patients"][x]["p"] > 0.2
    assert not any(res2["patients"][p]["flagged"] for p in never)


# -- what the verification and the certificate state ------------------------------------------

def _calibrated(p_before: float, p_after: float, n_out: int = 4) -> dict:
    def test(p):
        return {"patients": {"S1": {"p": p, "n_out": n_out, "n_in": 4, "log_lr": None}}, "n_references": 8,
                "population": {"auc": 0.7, "n_members": 10, "n_nonmembers": 6, "tpr": 0.1, "fpr_resolution": 1 / 6}}
    b, a = test(p_before), test(p_after)
    return {"available": True, "n_references": 8, "check": lira.erasure_check(b, a, ["S1"]), "before": b,
            "after": a}


def _verification(calibrated: dict | None, before_auc: float = 0.1667, after_auc: float = 0.1667) -> dict:
    th = dict(DEFAULT_THRESHOLDS)
    before = {"mia_auc": before_auc, "retain_dice": 0.8, "test_dice": 0.7}
    after = {"mia_auc": after_auc, "retain_dice": 0.8, "test_dice": 0.7}
    checks, failed = judge(th, after, before, "before", before, calibrated)
    ver = {"before": before, "after": after, "checks": checks, "failed_checks": failed, "passed": not failed,
           "thresholds": th}
    if calibrated is not None:
        ver["calibrated"] = calibrated
    return ver


def _page(ver: dict) -> str:
    entries = [{"request": "ER-x", "event": "requested", "seq": 1, "at": "t", "hash": "h1",
                "body": {"run": "fed", "kind": "patient", "site": "H1", "subjects": ["S1"]}},
               {"request": "ER-x", "event": "verified", "seq": 2, "at": "t", "hash": "h2", "body": ver}]
    return render_html(summarise(entries), True, [], "ledger.db")


def _membership_rows(page: str) -> str:
    return page.split("Per-patient membership test")[1]


def test_not_flagged_before_means_no_power_and_no_pass():
    ver = _verification(_calibrated(p_before=0.4, p_after=0.6))
    c = ver["checks"]["membership_calibrated"]
    assert c["ok"] is None and c["result"] == "no power" and ver["passed"]  # neither a pass nor a failure
    assert ver["checks"]["mia_auc"]["result"] == "info"  # the raw AUC no longer decides
    page = _page(ver)
    rows = _membership_rows(page)
    assert "NO POWER" in rows and "PASS" not in rows and "had no power for this patient" in rows
    assert membership_statements(ver)["statements"][0]["verdict"] == "NO POWER"


def test_flagged_before_then_indistinguishable_passes_and_still_flagged_fails():
    ok = _verification(_calibrated(p_before=0.001, p_after=0.3))
    assert ok["checks"]["membership_calibrated"]["ok"] is True and ok["passed"]
    rows = _membership_rows(_page(ok))
    assert "PASS" in rows and "indistinguishable from the 4 reference models" in rows
    bad = _verification(_calibrated(p_before=0.001, p_after=0.01))
    assert bad["checks"]["membership_calibrated"]["ok"] is False and not bad["passed"]
    assert bad["failed_checks"] == ["membership_calibrated 0.010 < 0.05"]
    assert "FAIL" in _membership_rows(_page(bad))


def test_without_references_the_raw_auc_that_could_not_fail_shows_no_pass():
    # the demo's case: AUC 0.1667 after, and 0.1667 before the erasure too
    ver = _verification({"available": False, "reason": "run X has no reference models; train them with: "
                         "privseg audit references --run X"})
    c = ver["checks"]["mia_auc"]
    assert c["ok"] is None and c["result"] == "no power" and "could not fail" in c["note"]
    page = _page(ver)
    row = page.split("<td>mia_auc</td>")[1].split("</tr>")[0]
    assert "NO POWER" in row and "PASS" not in row
    assert "NOT RUN" in page and "privseg audit references" in page
    # with power (the model before the erasure was above the bound) the raw check still decides
    powered = _verification(None, before_auc=0.9, after_auc=0.5)
    assert powered["checks"]["mia_auc"]["ok"] is True and "calibrated membership test" in _page(powered)


# -- references kept with a federated run ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    cohort, _ = tiny_federation(root, name="fed", rounds=2, local_steps=1, per_site=3, size=SIZE, patch=SIZE,
                                subjects_per_step=2, run="run")
    refs = refmod.ensure_references(root / "run", 4)
    refmod.run_membership(root / "run", views=1)  # fills the references' score caches
    return cohort, root / "run", refs


@pytest.fixture
def run(trained, tmp_path):
    cohort, original, _ = trained
    d = tmp_path / "fed"
    shutil.copytree(original, d)
    return cohort, d


def test_references_are_reused_not_retrained_and_foreign_sets_are_refused(trained, run, monkeypatch, tmp_path):
    cohort, d = run
    first = trained[2]
    assert first.trained == [0, 1, 2, 3] and first.reused == []
    index = json.loads((d / "audit/references/index.json").read_text())
    pool = {p for ids in index["pool"].values() for p in ids}
    for j in (0, 1):  # complementary halves: each training patient is OUT for exactly one of a pair
        a, b = (set().union(*index["references"][str(k)]["saw"].values()) for k in (2 * j, 2 * j + 1))
        assert a | b == pool and not a & b
    assert index["identity"]["run"] == "fed" and len(index["references"]["0"]["sha256"]) == 64

    def no_training(*a, **kw):
        raise AssertionError("a reference model was retrained")

    monkeypatch.setattr(fed_retrain, "federated_retrain", no_training)
    again = refmod.ensure_references(d, 4)
    assert again.reused == [0, 1, 2, 3] and again.trained == []
    monkeypatch.undo()
    # an altered checkpoint is retrained, the others are kept
    (d / "audit/references/1/model.pt").write_bytes(b"tampered")
    fixed = refmod.ensure_references(d, 4)
    assert fixed.trained == [1] and fixed.reused == [0, 2, 3]
    # a set copied from another run is refused, by the API and the command that reads it
    other = tmp_path / "other"
    shutil.copytree(d, other)
    cfg = FLConfig.load(other)
    cfg.name = "other"
    cfg.save(other)
    with pytest.raises(ConfigError, match="another run or model"):
        refmod.load_references(other)
    assert cli_main(["audit", "membership", "--run", str(other), "-q"]) == 2
    # a run without references: the error names the command that trains them
    shutil.rmtree(other / "audit")
    with pytest.raises(ConfigError, match="privseg audit references --run"):
        refmod.load_references(other)


def test_membership_command_reports_every_patient(run, tmp_path):
    cohort, d = run
    out = tmp_path / "m.json"
    assert cli_main(["audit", "membership", "--run", str(d), "--views", "1", "--out", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    train = {s.id for s in cohort.select("train")}
    assert set(res["patients"]) == train | {s.id for s in cohort.subjects if s.split in ("val", "test")}
    assert all(r["n_out"] == (2 if p in train else 4) for p, r in res["patients"].items())
    assert res["population"]["n_members"] == len(train) and 0 <= res["population"]["auc"] <= 1


def test_erasure_uses_the_references_and_deletes_those_that_saw_the_patient(run, tmp_path):
    cohort, d = run
    subject = [s.id for s in cohort.select("train", "H2")][0]
    saw_x = [k for k, e in json.loads((d / "audit/references/index.json").read_text())["references"].items()
             if subject in e["saw"]["H2"]]
    assert len(saw_x) == 2
    res = erase(d, ErasureRequest(kind="patient", site="H2", subjects=(subject,), epochs=2, thresholds=LOOSE),
                mia_views=1)
    assert res.status == "completed"
    ver = res.verification
    cal = ver["calibrated"]
    assert cal["available"] and cal["n_references"] == 4
    row = cal["check"]["subjects"][0]
    assert row["id"] == subject and row["n_out"] == 2
    check = ver["checks"]["membership_calibrated"]
    expected = "no power" if row["p_before"] >= 0.05 else ("pass" if row["p_after"] >= 0.05 else "fail")
    assert check["result"] == expected and ver["checks"]["mia_auc"]["result"] == "info"
    # the certificate states it, with the number of references
    j, h = write_certificate(d / LEDGER, res.request_id, tmp_path / "cert")
    m = json.loads(j.read_text())["certificate"]["membership"]
    assert m["available"] and m["n_references"] == 4 and m["statements"][0]["verdict"] == expected.upper()
    rows = _membership_rows(h.read_text())
    assert ("PASS" in rows) == (expected == "pass") and ("no power" in rows) == (expected == "no power")
    # the references that trained on the patient carry it: deleted with the run's other files
    removed = {a["path"] for a in ErasureLedger(d / LEDGER).events(res.request_id)["completed"]["body"]["removed"]}
    for k in saw_x:
        assert f"audit/references/{k}/model.pt" in removed and not (d / f"audit/references/{k}/model.pt").exists()
    # the next request retrains exactly those, without the erased patient
    after = refmod.ensure_references(d, 4)
    assert after.trained == sorted(int(k) for k in saw_x) and all(subject not in r.patients for r in after.references)


def test_central_run_gets_central_references(tmp_path):
    from privseg.train.loop import Trainer

    cohort = make_tiny_cohort(tmp_path / "tiny", sites=1, per_site=6, size=SIZE)
    tc = TrainConfig(model="unet_tiny", patch_size=(SIZE,) * 3, steps=3, checkpoint_every=3, device="cpu",
                     subjects_per_step=2, patches_per_subject=1, in_channels=1, num_classes=3)
    Trainer(cohort, tc, tmp_path / "central").fit()
    with pytest.raises(ConfigError, match="--cohort"):
        refmod.ensure_references(tmp_path / "central", 2)
    refs = refmod.ensure_references(tmp_path / "central", 2, cohort=cohort)
    train = {s.id for s in cohort.select("train")}
    assert refs.trained == [0, 1] and refs.references[0].patients | refs.references[1].patients == train
    assert not refs.references[0].patients & refs.references[1].patients
    # two references leave each training patient one that never saw it: LiRA cannot fit its Gaussian, the
    # RMIA-style test takes over and needs 3 never-seen patients (this cohort has 2)
    with pytest.raises(ConfigError, match="at least 3 scored patients that no model trained on"):
        refmod.run_membership(tmp_path / "central", cohort=cohort, views=1)
    more = refmod.ensure_references(tmp_path / "central", 4, cohort=cohort)
    assert more.reused == [0, 1] and more.trained == [2, 3]
    res = refmod.run_membership(tmp_path / "central", cohort=cohort, views=1)
    assert all(r["n_out"] == (2 if p in train else 4) for p, r in res["patients"].items())
    assert res["population"]["n_members"] == len(train)
    # a strategy that needs the references finds them beside the central checkpoint
    from privseg.unlearn.engine import unlearn

    forget = sorted(train)[0]
    out = unlearn(tmp_path / "central" / "last.pt", cohort, forget, "reference_teacher", epochs=1, evaluate=False,
                  device="cpu").report
    teacher = out["strategy_log"]["teacher_reference"][forget]
    assert out["steps_run"] == 1 and forget not in more.references[teacher].patients


# -- the calibrated stopping rule of local unlearning ------------------------------------------

class _Ref:
    """A reference model seen only through what the stopping rule asks of it."""

    def __init__(self, model, saw: set[str]):
        self.model, self.patients = model, saw

    def statistics(self, items, patch_size, num_classes, views, seed):
        return {r["id"]: {"loss": r["loss"], "dice": r["dice"]}
                for r in mia.subject_statistics(self.model, items, patch_size, num_classes, views)}


def test_calibrated_stopper_waits_while_the_patient_is_flagged_and_stops_once_it_is_not():
    pool, unseen = _items(6, 1), _items(4, 2)
    pool_ids = {"S": [i["id"] for i in pool]}
    refs = []
    for k in range(6):
        half = set(refmod.halves(pool_ids, k, seed=0)["S"])
        refs.append(_Ref(Memoriser([i for i in pool if i["id"] in half], seed=100 + k), half))
    ref_set = refmod.ReferenceSet(Path("."), {}, refs, [], [])
    log: list[dict] = []
    stop = refmod.calibrated_stopper(ref_set, pool[:1], unseen, (SIZE,) * 3, 3, views=1, log=log,
                                     utility_fraction=0.0)
    assert not stop(0, Memoriser(pool, seed=7))  # memorised: flagged, keep unlearning
    assert stop(2, Memoriser(pool[1:], seed=8))  # a model that never saw it: indistinguishable, stop
    assert [e["stop"] for e in log] == [False, True] and log[0]["p"][pool[0]["id"]] < refmod.STOP_P
    assert log[1]["p"][pool[0]["id"]] >= refmod.STOP_P
    with pytest.raises(ConfigError, match="never-seen"):
        refmod.calibrated_stopper(ref_set, pool[:1], [], (SIZE,) * 3, 3)


def test_erasure_with_the_calibrated_target_records_its_checks(run, tmp_path):
    cohort, d = run
    subject = [s.id for s in cohort.select("train", "H1")][0]
    res = erase(d, ErasureRequest(kind="patient", site="H1", subjects=(subject,), epochs=3, thresholds=LOOSE,
                                  target="calibrated", method="noisy_label"), mia_views=1)
    local = ErasureLedger(d / LEDGER).events(res.request_id)["local_unlearned"]["body"]
    assert local["target"] == "calibrated" and local["n_checks"] >= 1
    last = local["checks"][-1]
    assert subject in last["p"] and last["stop"] == (local["stopped_early"] or last["stop"])
    assert local["steps_run"] <= 3 * 1  # epochs x ceil(1 patient / 2 per step)


def test_calibrated_target_without_references_is_refused_before_anything_is_recorded(run, tmp_path):
    cohort, d = run
    shutil.rmtree(d / "audit")
    subject = [s.id for s in cohort.select("train", "H1")][0]
    with pytest.raises(ConfigError, match="privseg audit references --run"):
        erase(d, ErasureRequest(kind="patient", site="H1", subjects=(subject,), target="calibrated"))
    assert not (d / LEDGER).exists()
    with pytest.raises(ConfigError, match="--target"):
        ErasureRequest(kind="patient", site="H1", subjects=(subject,), target="sometimes")
    with pytest.raises(ConfigError, match="--statistic"):
        ErasureRequest(kind="patient", site="H1", subjects=(subject,), statistic="auc")


# -- the reference_teacher strategy ---------------------------------------------------------------

def _kl_to(teacher_probs: torch.Tensor, model, x: torch.Tensor) -> float:
    with torch.no_grad():
        s = torch.log_softmax(model(x), 1)
    return float((teacher_probs * (teacher_probs.clamp_min(1e-8).log() - s)).sum(1).mean())


def test_reference_teacher_pulls_the_patient_toward_the_references_that_never_saw_it(monkeypatch):
    from privseg.unlearn.strategies import STRATEGIES, UnlearnContext

    pool = _items(4, 3)
    forget, retain = pool[:1], pool[1:]
    tc = TrainConfig(model="unet_tiny", patch_size=(SIZE,) * 3, subjects_per_step=2, patches_per_subject=1, lr=1e-2,
                     device="cpu", in_channels=1, num_classes=3)
    torch.manual_seed(0)
    model, never_saw, saw = tc.build_model(), tc.build_model(), tc.build_model()
    by_path = {Path("never_saw.pt"): never_saw, Path("saw.pt"): saw}
    monkeypatch.setattr(refmod.Reference, "load_model", lambda ref: by_path[ref.checkpoint].eval())
    pid = forget[0]["id"]
    refs = refmod.ReferenceSet(Path("."), {}, [refmod.Reference(0, {"S": []}, Path("never_saw.pt"), ""),
                                               refmod.Reference(1, {"S": [pid]}, Path("saw.pt"), "")])
    x = forget[0]["image"][None]
    with torch.no_grad():
        target = torch.softmax(never_saw.eval()(x), 1)
    before = _kl_to(target, model.eval(), x)
    ctx = UnlearnContext(config=tc, retain_items=retain, forget_items=forget, steps=30, steps_per_epoch=1,
                         references=refs, check_every=30)
    # the forget term alone (the retain terms off): the patient's prediction moves to the teacher's,
    # the reference that never saw it, not to the one that did
    STRATEGIES["reference_teacher"](model, ctx, {"lr_scale": 1.0, "retain_weight": 0.0, "task_weight": 0.0})
    assert ctx.log["teacher_reference"] == {pid: 0}
    after = _kl_to(target, model.eval(), x)
    assert after < 0.5 * before
    with torch.no_grad():
        other = torch.softmax(saw.eval()(x), 1)
    assert after < 0.8 * _kl_to(other, model.eval(), x)


def test_reference_teacher_without_references_or_with_none_that_never_saw_the_patient_is_refused(run, tmp_path):
    from privseg.unlearn.engine import unlearn

    cohort, d = run
    subject = [s.id for s in cohort.select("train", "H1")][0]
    ckpt = RunState.load(d).last_checkpoint
    refs = refmod.load_references(d)
    saw = refmod.ReferenceSet(d, refs.index, [r for r in refs.references if subject in r.patients])
    with pytest.raises(ConfigError, match=f"every one of the run's 2 reference models trained on {subject}"):
        unlearn(ckpt, cohort, subject, "reference_teacher", epochs=1, evaluate=False, references=saw, device="cpu")
    shutil.rmtree(d / "audit")
    with pytest.raises(ConfigError, match="privseg audit references --run"):
        erase(d, ErasureRequest(kind="patient", site="H1", subjects=(subject,), method="reference_teacher"))
    assert not (d / LEDGER).exists()  # refused before anything was recorded


def test_erasure_defaults_follow_the_method():
    teacher = ErasureRequest(kind="patient", site="H1", subjects=("H1S01",), method="reference_teacher")
    assert (teacher.target, teacher.repair_rounds) == ("calibrated", 0)  # the setting it was measured with
    told = ErasureRequest(kind="patient", site="H1", subjects=("H1S01",), method="reference_teacher",
                          target="unseen", repair_rounds=2)
    assert (told.target, told.repair_rounds) == ("unseen", 2)
    plain = ErasureRequest(kind="patient", site="H1", subjects=("H1S01",))
    assert (plain.method, plain.target, plain.repair_rounds) == ("scrub", "unseen", 1)
    site = ErasureRequest(kind="site", site="H1")
    assert (site.method, site.repair_rounds) == ("federaser", 1)
