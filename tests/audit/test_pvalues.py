"""Empirical per-patient p-values (privseg.audit.pvalues): known answers, validity, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privseg.audit.pvalues import empirical_p_value, pass_rate, per_patient_p_values
from privseg.errors import ConfigError


@pytest.mark.parametrize(("score", "p"), [(5.0, 1 / 4), (3.0, 2 / 4), (2.5, 2 / 4), (2.0, 3 / 4), (0.0, 1.0)])
def test_p_counts_the_null_scores_at_least_as_high_plus_one(score, p):
    assert empirical_p_value(score, [1.0, 2.0, 3.0]) == p  # ties count against the patient


def test_p_is_never_below_one_over_n_plus_one():
    assert empirical_p_value(1e9, np.zeros(12)) == 1 / 13


def test_p_is_valid_under_the_null():
    """A score exchangeable with 12 null scores has P(p <= 0.1) = 1/13 (the largest k/13 <= 0.1)."""
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20000, 13))
    ps = np.array([empirical_p_value(row[0], row[1:]) for row in draws])
    assert np.mean(ps <= 0.1) == pytest.approx(1 / 13, abs=0.006)
    assert np.mean(ps <= 0.5) == pytest.approx(6 / 13, abs=0.01)


def test_per_patient_pass_at_the_threshold_and_rate():
    got = per_patient_p_values({"A": 5.0, "B": 2.0, "C": 0.5}, [1.0, 2.0, 3.0], threshold=0.5)
    assert {k: v["p"] for k, v in got.items()} == {"A": 0.25, "B": 0.75, "C": 1.0}
    assert [got[k]["pass"] for k in "ABC"] == [False, True, True]
    assert got["A"]["score"] == 5.0
    assert pass_rate(got) == pytest.approx(2 / 3)
    assert pass_rate(per_patient_p_values({"A": 1.0}, [1.0], threshold=1.0)) == 1.0  # p = 1 passes p >= 1


@pytest.mark.parametrize(("score", "null", "match"), [
    (1.0, [], "at least one null score"),
    (math.nan, [1.0], "NaN"),
    (1.0, [0.0, math.nan], "NaN"),
])
def test_bad_input_is_refused(score, null, match):
    with pytest.raises(ConfigError, match=match):
        empirical_p_value(score, null)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_a_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(ConfigError, match="not in"):
        per_patient_p_values({"A": 1.0}, [0.0], threshold)


def test_pass_rate_of_no_patient_is_refused():
    with pytest.raises(ConfigError, match="at least one patient"):
        pass_rate({})
