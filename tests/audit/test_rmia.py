"""The membership test with few reference models (RMIA-style, :func:`privseg.audit.lira.rmia_test`):
calibrated under the null with two complementary-half references, members told from non-members,
the choice between it and LiRA, and bad input refused."""

import numpy as np
import pytest
from scipy import stats

from privseg.audit import lira
from privseg.errors import ConfigError


def _two_refs(seed: int, n: int = 2000, gain: float = 0.25, member_gain: float = 0.0):
    """Patients with their own difficulty; two references trained on complementary halves of the
    first half (the pool; IN adds 1.0); the model under test better overall by ``gain`` and, when
    ``member_gain`` > 0, trained on the pool (its members score ``member_gain`` higher)."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i}" for i in range(n)]
    difficulty = rng.normal(0, 1, n)
    pool = ids[: n // 2]
    saw = [set(), set()]
    for p in pool:
        saw[int(rng.integers(2))].add(p)
    refs = [{p: difficulty[i] + rng.normal(0, 0.3) + (1.0 if p in saw[k] else 0.0) for i, p in enumerate(ids)}
            for k in range(2)]
    target = {p: difficulty[i] + rng.normal(0, 0.3) + gain + (member_gain if i < n // 2 else 0.0)
              for i, p in enumerate(ids)}
    return ids, pool, target, refs, saw


@pytest.mark.parametrize("seed", [0, 1])
def test_p_values_are_uniform_when_the_model_saw_nobody(seed):
    ids, pool, target, refs, saw = _two_refs(seed)
    res = lira.run_test(target, refs, saw, never_seen=ids[len(ids) // 2:])
    assert res["test"] == "rmia"  # one OUT reference per pool patient: LiRA cannot fit its Gaussian
    for group in (pool, ids[len(ids) // 2:]):  # 1 OUT reference, and 2
        p = np.array([res["patients"][q]["p"] for q in group])
        assert 0.03 <= (p < 0.05).mean() <= 0.07
        assert stats.kstest(p, "uniform").pvalue > 0.001
    assert abs(res["shift"] - 0.25) < 0.05  # the whole-model gain, measured on the population


def test_two_references_separate_members_from_never_seen_patients():
    ids, pool, target, refs, saw = _two_refs(2, n=1000, member_gain=1.0)
    never = ids[500:]
    res = lira.run_test(target, refs, saw, never_seen=never)
    pop = lira.population(res, pool, never)
    assert pop["auc"] > 0.9 and pop["tpr"] > 0.4 and pop["achieved_fpr"] <= 0.01
    assert np.mean([res["patients"][p]["flagged"] for p in pool]) > 0.6
    assert np.mean([res["patients"][p]["flagged"] for p in never]) < 0.08
    assert np.mean([res["patients"][p]["rmia_score"] for p in pool]) > 0.8  # RMIA's own gamma=1 score
    with pytest.raises(ConfigError, match="fewer than 2 reference models never saw"):
        lira.run_test(target, refs, saw, never_seen=never, test="lira")


def test_auto_picks_lira_with_enough_references_and_bad_input_is_refused():
    refs = [{"A": 0.1 * k, "B": 0.2, "C": 0.05 * k} for k in range(4)]
    saw = [{"A"}, set(), set(), set()]
    assert lira.choose_test({"A": 0.0, "B": 0.0}, saw) == "lira"
    assert lira.choose_test({"A": 0.0}, [{"A"}, set()]) == "rmia"
    with pytest.raises(ConfigError, match="not one of auto, lira, rmia"):
        lira.run_test({"A": 0.0}, refs, saw, test="bogus")
    with pytest.raises(ConfigError, match="every reference model trained on patient.*A"):
        lira.rmia_test({"A": 0.0}, refs[:1], saw[:1])
    with pytest.raises(ConfigError, match="at least 3 scored patients"):
        lira.rmia_test({"A": 0.0, "B": 1.0}, refs, saw, never_seen=["B"])


# -- two complementary-half references on a tiny federated run --------------------------------

def test_two_references_on_a_tiny_run_estimate_test_teach_and_certify(tmp_path, capsys):
    import json

    from conftest import tiny_federation
    from privseg.audit import reference as refmod
    from privseg.audit.certificate import write_certificate
    from privseg.cli import main as cli_main
    from privseg.erasure import LEDGER, ErasureRequest, erase

    cohort, run = tiny_federation(tmp_path, name="fed2", rounds=2, local_steps=1, per_site=9, size=16,
                                  subjects_per_step=2, run="run")
    from privseg.erasure.request import default_method

    assert default_method(run, "patient")[0] == "scrub"  # no references: the best method measured without them
    from privseg.console.erasure import methods

    assert methods(run, "patient")["default"] == "scrub"
    assert cli_main(["audit", "references", "--run", str(run), "--n", "2"]) == 0
    said = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    # the estimate comes first: 2 references with the run's 2 rounds = 2 original trainings
    assert said.index("readiness cost: 2 reference models") < said.index("reference 0:")
    assert "2.0 x the original training's compute (2 to train now" in said and "0.02 x over 100" in said
    refs = refmod.load_references(run)
    train = {s.id for s in cohort.select("train")}
    assert all(sum(p not in r.patients for r in refs.references) == 1 for p in train)  # exactly one never saw it
    assert refs.references[0].patients | refs.references[1].patients == train
    assert refmod.readiness(run, 2)["to_train"] == 0 and refmod.readiness(run, 4)["to_train"] == 2

    method, why = default_method(run, "patient")
    assert method == "reference_teacher" and "keeps 2 reference models" in why
    form = methods(run, "patient")  # the console's erase form: the same default, with the same reason
    assert (form["default"], form["default_reason"]) == (method, why)
    assert "reference_teacher" in [c["value"] for c in form["choices"]]
    with pytest.raises(ConfigError, match="not both present"):
        refmod.pair(refs, 1)
    res = refmod.run_membership(run, views=1, references=refmod.pair(refs))
    assert res["test"] == "rmia" and all(res["patients"][p]["n_out"] == 1 for p in train)

    subject = sorted(s.id for s in cohort.select("train", "H1"))[0]
    out = erase(run, ErasureRequest(kind="patient", site="H1", subjects=(subject,), method="reference_teacher",
                                    epochs=2, stop_p=0.2, thresholds={"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0,
                                                          "min_test_dice_ratio": 0.0}), mia_views=1)
    from privseg.audit.ledger import ErasureLedger

    checks = ErasureLedger(run / LEDGER).events(out.request_id)["local_unlearned"]["body"]["checks"]
    assert checks and all(c["stop_p"] == 0.2 for c in checks)  # the request's stopping threshold reached the rule
    with pytest.raises(ConfigError, match="stop_p must be in"):
        ErasureRequest(kind="patient", site="H1", subjects=(subject,), stop_p=1.5)
    cal = out.verification["calibrated"]
    assert cal["available"] and cal["check"]["test"] == "rmia" and cal["check"]["subjects"][0]["n_out"] == 1
    j, h = write_certificate(run / LEDGER, out.request_id, tmp_path / "cert")
    cert = json.loads(j.read_text())["certificate"]
    assert cert["cost"]["compute_ratio"] == 2.0 and cert["cost"]["amortised_per_request"]["10"] == 0.2
    assert cert["headline"].startswith(f"Erasure of patient(s) {subject} from run fed2 (reference_teacher)")
    assert "TPR" in cert["headline"] and "2.0 x the original training" in cert["headline"]
    assert "RMIA-style" in h.read_text() and cert["headline"] in h.read_text()


def test_references_with_a_shorter_schedule_cost_less_and_keep_their_schedule(tmp_path, capsys, monkeypatch):
    """`--schedule 0.5`: each reference trains half of the run's rounds, the readiness estimate says so before
    anything trains, the set records it, and a later call with another schedule is refused (exit 2) while one
    that leaves it out reuses the set."""
    from conftest import tiny_federation
    from privseg.audit import reference as refmod
    from privseg.cli import main as cli_main
    from privseg.federated import retrain

    _, run = tiny_federation(tmp_path, name="short", rounds=2, local_steps=1, per_site=3, size=16,
                             subjects_per_step=2, run="run")
    assert refmod.readiness(run, 2, 0.5)["compute_ratio"] == 1.0  # 2 references x 1 of the run's 2 rounds
    trained_rounds = []
    real = retrain.federated_retrain
    monkeypatch.setattr(retrain, "federated_retrain",
                        lambda *a, **kw: trained_rounds.append(kw["rounds"]) or real(*a, **kw))
    assert cli_main(["audit", "references", "--run", str(run), "--n", "2", "--schedule", "0.5"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "with 0.5 of the run's schedule" in said and "1.0 x the original training's compute" in said
    assert trained_rounds == [1, 1]
    refs = refmod.load_references(run)
    summary = refs.summary()
    assert (summary["schedule"], summary["rounds"], summary["compute_ratio"]) == (0.5, 1, 1.0)
    assert cli_main(["audit", "references", "--run", str(run), "--n", "2", "--schedule", "1", "-q"]) == 2
    assert "--schedule 0.5 to reuse" in " ".join(capsys.readouterr().err.split())
    assert refmod.ensure_references(run, 2).reused == [0, 1] and trained_rounds == [1, 1]
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        refmod.readiness(tmp_path / "run", 2, 1.5)
