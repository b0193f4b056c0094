"""Empirical (rank) p-values of membership scores against a null sample of scores.

A patient's membership score ``s`` (higher = more member-like; typically calibrated against a
reference model that never saw the patient -- the retrain -- as Watson, Guo, Cormode and
Sablayrolles, "On the Importance of Difficulty Calibration in Membership Inference Attacks",
ICLR 2022, recommend) is compared with the scores ``z_1..z_n`` of patients nobody trained on
(the never-seen val/test patients, scored the same way). Under the null hypothesis "this patient
was not trained on", ``s`` is exchangeable with the ``z_k``, and the Monte Carlo p-value

    p = (1 + #{k : z_k >= s}) / (1 + n)

is valid: ``P(p <= a) <= a`` for every ``a`` (Davison and Hinkley, "Bootstrap Methods and their
Application", 1997, eq. 4.11; Phipson and Smyth, "Permutation P-values Should Never Be Zero",
Stat. Appl. Genet. Mol. Biol. 2010: the ``+1`` counts the observed score itself, so p is never 0).
Its smallest value is ``1 / (1 + n)``: with 12 never-seen patients no patient can reach p < 1/13,
which is why a threshold of 0.1 is "not above every never-seen patient". The same formula gives
the p-value of a statistic against its permutation distribution
(:func:`privseg.audit.mia.power_check`).

Unlike the parametric tests of :mod:`privseg.audit.lira` (a Gaussian per patient from several
reference models, or RMIA's population t), this one assumes nothing about the score's
distribution and needs one reference model; its price is the resolution ``1 / (1 + n)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from privseg.errors import ConfigError


def empirical_p_value(score: float, null: Sequence[float]) -> float:
    """``(1 + #{null >= score}) / (1 + len(null))``: the one-sided p-value of ``score`` (higher =
    more extreme) against the null sample ``null``. Raises ConfigError on an empty null sample or
    a NaN anywhere (a NaN compares false and would pass for a small p-value)."""
    z = np.asarray(null, dtype=float).reshape(-1)
    if z.size == 0:
        raise ConfigError("an empirical p-value needs at least one null score (no never-seen patient was scored)")
    if math.isnan(float(score)) or bool(np.isnan(z).any()):
        raise ConfigError("an empirical p-value of a NaN score, or against NaN null scores, is undefined")
    return (1 + int(np.sum(z >= float(score)))) / (1 + z.size)


def per_patient_p_values(scores: Mapping[str, float], null: Sequence[float], threshold: float) -> dict[str, dict]:
    """Per patient (id -> score): ``{"score", "p", "pass"}`` with ``p`` from
    :func:`empirical_p_value` against ``null`` and ``pass`` when ``p >= threshold`` (the patient
    looks like one nobody trained on)."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"p-value threshold {threshold} is not in (0, 1]")
    out = {}
    for pid, s in scores.items():
        p = empirical_p_value(s, null)
        out[pid] = {"score": s, "p": p, "pass": p >= threshold}
    return out


def pass_rate(patients: Mapping[str, Mapping]) -> float:
    """The share of patients whose ``pass`` is true (of :func:`per_patient_p_values`)."""
    if not patients:
        raise ConfigError("a pass rate needs at least one patient")
    return sum(bool(v["pass"]) for v in patients.values()) / len(patients)
