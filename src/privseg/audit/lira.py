"""Per-patient membership test calibrated with reference models (the statistics only).

After Carlini, Chien, Nasr, Song, Terzis and Tramèr, "Membership Inference Attacks From First
Principles", IEEE S&P 2022 (LiRA; here its *offline* variant), and Watson, Guo, Cormode and
Sablayrolles, "On the Importance of Difficulty Calibration in Membership Inference Attacks",
ICLR 2022.

The raw score of one patient says little: an easy anatomy has a low loss under *any* model,
so it looks like a member to all of them (Watson et al.). The test therefore asks a narrower
question per patient: is the score of the model under test higher than the scores of
reference models that never saw this patient?

For patient ``i`` let ``s`` be the model's score (higher = more member-like, rescaled to be
close to Gaussian: ``-log(loss)`` or ``logit(Dice)``, as Carlini et al. rescale confidences)
and ``o_1..o_n`` the scores of the ``n`` OUT references (references whose training halves did
not contain ``i``). The OUT distribution is Gaussian with mean ``mu_i`` (the patient's own
mean: difficulty calibration) and one variance pooled over every scored patient (LiRA's
"fixed variance", the choice Carlini et al. recommend with few reference models). Then

    t_i = (s - mu_i - shift) / (sd * sqrt(1 + 1/n))

follows a Student t with the pooled degrees of freedom when the model did not train on ``i``;
the p-value is the one-sided ``P(T >= t_i)`` (members score higher). ``shift`` is the median
of ``s - mu`` over patients *nobody* trained on (never-seen val/test patients): it removes the part of
the difference that comes from the model under test being trained on more data or for more
rounds than the references (a whole-model effect, not a membership one); 0 when no such
patient is scored.

Where IN references exist for the patient (those that saw it), the log-likelihood ratio
``log N(s; mu_in, sd) - log N(s; mu_out, sd)`` (online LiRA) is reported beside the p-value;
the decision uses only the offline p-value.

Population figures over members vs non-members: AUC of ``t`` and the TPR at 1 % FPR (Carlini
et al. argue the low-FPR regime is what matters). With fewer than 100 non-members an FPR of 1 %
cannot be resolved; the threshold is then the highest non-member ``t`` (FPR 0) and
``fpr_resolution`` says so.

With few reference models (two complementary halves: one OUT model per training patient) the
per-patient Gaussian cannot be fitted; :func:`rmia_test` (after RMIA, Zarifzadeh et al., ICML
2024) takes the null from the never-seen population instead. :func:`run_test` picks between
them (:data:`TESTS`) and records which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from privseg.audit.mia import STATISTICS, auc
from privseg.errors import ConfigError
from privseg.utils import registrar

ALPHA = 0.05  # flagged as a member when p < ALPHA
MIN_OUT = 2  # a mean and a spread need at least two OUT scores
MIN_POPULATION = 3  # RMIA-style test: a population mean and spread need a few never-seen patients


def lira_score(row: Mapping, statistic: str = "loss") -> float:
    """The per-patient score on a near-Gaussian scale, higher = more member-like."""
    if statistic == "loss":
        return -math.log(max(float(row["loss"]), 1e-12))
    if statistic == "dice":
        d = min(max(float(row["dice"]), 1e-6), 1 - 1e-6)
        return math.log(d / (1 - d))
    raise ConfigError(f"statistic {statistic!r} is not one of {STATISTICS}")


class PatientTest(NamedTuple):
    run: Callable[..., dict]  # (target, refs, saw, never_seen, alpha) -> {"patients": {id: row}, ...}
    title: str  # what a certificate calls it


# The per-patient tests, by name (:func:`membership_test` files one): every caller (the verification,
# the stopping rule, `privseg audit membership`) goes through run_test, which records the one it used.
TESTS: dict[str, PatientTest] = {}


def membership_test(name: str, title: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """File a per-patient test ``(target, refs, saw, never_seen, alpha) -> dict`` in :data:`TESTS`
    under ``name``; ``title`` names it in certificates. A name already taken is refused."""
    return registrar(TESTS, name, kind="membership test", entry=lambda run: PatientTest(run, title))


def title_of(test: str) -> str:
    """What a certificate calls the membership test ``test`` (its name when no registered test has it)."""
    return TESTS[test].title if test in TESTS else str(test)


def _out_in(pid: str, refs: Sequence[Mapping[str, float]], saw: Sequence[set]) -> tuple[list[float], list[float]]:
    out = [r[pid] for r, s in zip(refs, saw, strict=True) if pid not in s and pid in r]
    inn = [r[pid] for r, s in zip(refs, saw, strict=True) if pid in s and pid in r]
    return out, inn


@membership_test("lira", "offline LiRA with per-patient difficulty calibration")
def per_patient_test(target: Mapping[str, float], refs: Sequence[Mapping[str, float]], saw: Sequence[set],
                     never_seen: Sequence[str] = (), alpha: float = ALPHA) -> dict:
    """Offline LiRA for every patient in ``target`` (id -> score of the model under test).

    ``refs[k]``: id -> score of reference ``k``; ``saw[k]``: the patients reference ``k`` trained
    on. ``never_seen``: patients neither the model nor any reference trained on (to estimate
    ``shift``). Raises ConfigError when a patient has fewer than MIN_OUT OUT references."""
    if len(refs) != len(saw):
        raise ConfigError("one set of trained-on patients per reference model is needed")
    outs, ins = {}, {}
    for pid in target:
        outs[pid], ins[pid] = _out_in(pid, refs, saw)
    short = {p: len(o) for p, o in outs.items() if len(o) < MIN_OUT}
    if short:
        listed = ", ".join(f"{p} ({n})" for p, n in sorted(short.items())[:10])
        raise ConfigError(f"calibrated membership test refused: fewer than {MIN_OUT} reference models never saw "
                          f"patient(s) {listed}; train more reference models (privseg audit references "
                          "--run RUN --n N)")
    # pooled within-patient variance of the OUT scores (LiRA's fixed variance)
    ss = sum(float(np.sum((np.asarray(o) - np.mean(o)) ** 2)) for o in outs.values())
    df = sum(len(o) - 1 for o in outs.values())
    sd = math.sqrt(ss / df) if df and ss > 0 else 0.0
    if sd == 0.0:
        raise ConfigError("calibrated membership test refused: the reference models score every patient "
                          "identically (no spread to calibrate against)")
    diff = {p: target[p] - float(np.mean(outs[p])) for p in target}
    base = [diff[p] for p in never_seen if p in diff]
    shift = float(np.median(base)) if base else 0.0
    rows = {}
    for p in target:
        n_out = len(outs[p])
        t = (diff[p] - shift) / (sd * math.sqrt(1 + 1 / n_out))
        mu_out = float(np.mean(outs[p]))
        row = {"score": float(target[p]), "n_out": n_out, "n_in": len(ins[p]), "mu_out": mu_out,
               "t": t, "p": float(stats.t.sf(t, df)), "log_lr": None}
        if ins[p]:
            s, mu_in = target[p] - shift, float(np.mean(ins[p]))
            row["mu_in"] = mu_in
            row["log_lr"] = float(((s - mu_out) ** 2 - (s - mu_in) ** 2) / (2 * sd * sd))
        row["flagged"] = row["p"] < alpha
        rows[p] = row
    return {"patients": rows, "sd": sd, "df": df, "shift": shift, "n_shift": len(base), "alpha": alpha,
            "n_references": len(refs)}


@membership_test("rmia", "RMIA-style likelihood ratio against never-seen patients")
def rmia_test(target: Mapping[str, float], refs: Sequence[Mapping[str, float]], saw: Sequence[set],
              never_seen: Sequence[str] = (), alpha: float = ALPHA) -> dict:
    """A membership test that works with one OUT reference per patient, in the spirit of RMIA
    (Zarifzadeh, Liu, Cheng and Shokri, "Low-Cost High-Power Membership Inference Attacks",
    ICML 2024).

    RMIA divides the target model's likelihood of ``x`` by the reference models' (``LR(x)``) and
    asks how often that ratio beats the ratio of population samples ``z`` (patients nobody trained
    on): a member's ``LR(x)/LR(z)`` exceeds 1 for most ``z``. The null distribution therefore
    comes from the population, not from the spread between reference models, so one or two
    references suffice (LiRA's per-patient Gaussian needs several OUT models per patient).

    Here, on the near-Gaussian scale of :func:`lira_score` (a log-likelihood): ``r(x) = s(x) -
    mean of the OUT references' scores of x`` (RMIA's ``log LR`` with the references' geometric
    mean as ``p(x)``), and the population's ``r(z)`` over ``never_seen``. The per-patient p-value
    is parametric, so that a few dozen population patients give p-values below 0.05:

        t = (r(x) - mean r(z)) / sqrt(v_m * (1 + 1/|Z|)),   p = P(T_{|Z|-1} >= t)

    where ``v_m`` is the variance of ``r`` for a patient with ``m`` OUT references: the
    population's variance of ``r`` plus the references' within-patient variance times
    ``1/m - 1/n_z`` (a population patient's ``r`` averages its ``n_z`` references, a training
    patient of complementary halves has fewer OUT ones). ``rmia_score`` is RMIA's own statistic
    (``gamma = 1``): the fraction of population patients whose ratio ``x`` beats. Same keys as
    :func:`per_patient_test` (``t``, ``p``, ``flagged``, ``log_lr`` of the IN references when any)."""
    if len(refs) != len(saw):
        raise ConfigError("one set of trained-on patients per reference model is needed")
    outs, ins = {}, {}
    for pid in target:
        outs[pid], ins[pid] = _out_in(pid, refs, saw)
    none = sorted(p for p, o in outs.items() if not o)
    if none:
        raise ConfigError(f"membership test refused: every reference model trained on patient(s) "
                          f"{', '.join(none[:10])}; train more reference models (privseg audit references --run RUN "
                          "--n N)")
    pop = [p for p in dict.fromkeys(never_seen) if p in target and len(outs[p]) >= 2]
    if len(pop) < MIN_POPULATION:
        raise ConfigError(f"membership test with few reference models refused: it needs at least {MIN_POPULATION} "
                          f"scored patients that no model trained on, each scored by 2 or more references "
                          f"(got {len(pop)}); add never-seen (val/test) patients")
    r = {p: float(target[p] - np.mean(outs[p])) for p in target}
    rz = np.array([r[p] for p in pop])
    mean, var_pop = float(rz.mean()), float(rz.var(ddof=1))
    ss = sum(float(np.sum((np.asarray(outs[p]) - np.mean(outs[p])) ** 2)) for p in pop)
    var_ref = ss / sum(len(outs[p]) - 1 for p in pop)
    inv_nz = float(np.mean([1 / len(outs[p]) for p in pop]))
    if var_pop <= 0:
        raise ConfigError("membership test refused: the population patients' ratios do not vary (no spread to "
                          "calibrate against)")
    df = len(pop) - 1
    rows = {}
    for p in target:
        m = len(outs[p])
        v = var_pop + var_ref * max(1 / m - inv_nz, 0.0)
        t = (r[p] - mean) / math.sqrt(v * (1 + 1 / len(pop)))
        mu_out = float(np.mean(outs[p]))
        row = {"score": float(target[p]), "n_out": m, "n_in": len(ins[p]), "mu_out": mu_out, "t": t,
               "p": float(stats.t.sf(t, df)), "rmia_score": float(np.mean(r[p] > rz)), "log_lr": None}
        if ins[p]:
            s, mu_in, sd2 = target[p] - mean, float(np.mean(ins[p])), v
            row["mu_in"] = mu_in
            row["log_lr"] = float(((s - mu_out) ** 2 - (s - mu_in) ** 2) / (2 * sd2))
        row["flagged"] = row["p"] < alpha
        rows[p] = row
    return {"patients": rows, "sd": math.sqrt(var_pop), "df": df, "shift": mean, "n_shift": len(pop),
            "alpha": alpha, "n_references": len(refs)}


def choose_test(target: Mapping[str, float], saw: Sequence[set]) -> str:
    """``lira`` when every patient has MIN_OUT or more OUT references (its per-patient Gaussian
    can be fitted), else ``rmia`` (e.g. two complementary-half references: one OUT each)."""
    return "lira" if all(sum(p not in s for s in saw) >= MIN_OUT for p in target) else "rmia"


def run_test(target: Mapping[str, float], refs: Sequence[Mapping[str, float]], saw: Sequence[set],
             never_seen: Sequence[str] = (), alpha: float = ALPHA, test: str = "auto") -> dict:
    """The per-patient test ``test`` (a name in :data:`TESTS`, or ``auto``: :func:`choose_test`)."""
    if test != "auto" and test not in TESTS:
        raise ConfigError(f"membership test {test!r} is not one of auto, {', '.join(TESTS)}")
    name = choose_test(target, saw) if test == "auto" else test
    return {**TESTS[name].run(target, refs, saw, never_seen, alpha), "test": name}


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float = 0.01) -> dict:
    """TPR at the threshold whose FPR on ``nonmembers`` is at most ``fpr`` (higher = member)."""
    m, n = np.sort(np.asarray(members, float)), np.sort(np.asarray(nonmembers, float))
    if m.size == 0 or n.size == 0:
        raise ConfigError("TPR at low FPR needs members and non-members")
    allowed = int(math.floor(fpr * n.size))  # non-members allowed above the threshold
    thr = n[n.size - 1 - allowed]
    return {"fpr": fpr, "tpr": float(np.mean(m > thr)), "threshold": float(thr),
            "achieved_fpr": float(np.mean(n > thr)), "fpr_resolution": 1.0 / n.size}


def population(test: dict, members: Sequence[str], nonmembers: Sequence[str], fpr: float = 0.01) -> dict:
    """AUC and TPR at ``fpr`` of the calibrated statistic ``t``, members vs non-members."""
    pts = test["patients"]
    tm, tn = [pts[p]["t"] for p in members], [pts[p]["t"] for p in nonmembers]
    if not tm or not tn:
        return {"auc": math.nan, "n_members": len(tm), "n_nonmembers": len(tn)}
    return {"auc": auc(tm, tn), "n_members": len(tm), "n_nonmembers": len(tn), **tpr_at_fpr(tm, tn, fpr),
            "flagged_members": int(sum(pts[p]["flagged"] for p in members)),
            "flagged_nonmembers": int(sum(pts[p]["flagged"] for p in nonmembers))}


def erasure_check(before: dict, after: dict, erased: Sequence[str], alpha: float = ALPHA) -> dict:
    """The calibrated membership part of an erasure's verification, per erased patient.

    ``before``/``after``: :func:`per_patient_test` results of the model before the erasure and
    of the erased model. A patient the model before the erasure did not flag (p >= alpha) gives
    the test no power: it could not have failed, so it shows no pass. The check passes when every
    flagged patient is indistinguishable afterwards (p >= alpha), fails when one is still
    flagged, and has no power when no erased patient was flagged to begin with."""
    rows = []
    for p in erased:
        b, a = before["patients"][p], after["patients"][p]
        rows.append({"id": p, "p_before": b["p"], "flagged_before": b["p"] < alpha, "p_after": a["p"],
                     "indistinguishable_after": a["p"] >= alpha, "n_out": a["n_out"], "n_in": a["n_in"],
                     "log_lr_before": b["log_lr"], "log_lr_after": a["log_lr"]})
    powered = [r for r in rows if r["flagged_before"]]
    if not powered:
        result = "no power"
    else:
        result = "pass" if all(r["indistinguishable_after"] for r in powered) else "fail"
    return {"result": result, "alpha": alpha, "subjects": rows, "n_references": after["n_references"],
            "test": after.get("test", "lira"),
            "value": min(r["p_after"] for r in powered) if powered else None,
            "no_power": [r["id"] for r in rows if not r["flagged_before"]]}
