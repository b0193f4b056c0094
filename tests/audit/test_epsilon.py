"""Lower bounds on ε from a DP audit's scores (privseg.audit.epsilon): known answers, edge cases,
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privseg.audit.epsilon import (
    clopper_pearson,
    cp_lower_bound,
    empirical_epsilon,
    exact_epsilon,
    gdp_delta,
    gdp_epsilon,
    gdp_lower_bound,
)
from privseg.errors import ConfigError


def test_clopper_pearson_matches_the_textbook_interval():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.3085, abs=1e-4)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.1871, abs=1e-4) and hi == pytest.approx(0.8129, abs=1e-4)


@pytest.mark.parametrize("sigma", [0.6, 1.2, 3.0])
def test_a_gaussian_mechanism_is_exactly_its_gdp_epsilon(sigma):
    """One Gaussian step (q = 1) is 1/sigma-GDP: both conversions give the same epsilon."""
    assert gdp_epsilon(1 / sigma, 1e-5) == pytest.approx(exact_epsilon(sigma, 1.0, 1, 1e-5), rel=0.02)


def test_gdp_fit_recovers_mu_and_its_lower_bound_sits_below():
    rng = np.random.default_rng(0)
    mu = 1.0
    fit = gdp_lower_bound(rng.normal(mu, 1, 4000), rng.normal(0, 1, 4000), 1e-5)
    assert fit["mu"] == pytest.approx(mu, abs=0.06) and fit["mu_lower"] < fit["mu"]
    assert fit["epsilon"] < fit["epsilon_point"] <= gdp_epsilon(mu + 0.1, 1e-5)
    assert gdp_lower_bound(rng.normal(0, 1, 500), rng.normal(0, 1, 500), 1e-5)["epsilon"] < 0.5


def test_cp_bound_chooses_its_threshold_on_other_trials():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(3, 1, 2000), rng.normal(0, 1, 2000)
    res = cp_lower_bound(s_in, s_out, 1e-5)
    assert res["trials_chosen_on"] == 2000 and res["trials_evaluated"] == 2000
    assert 1.0 < res["epsilon"] < gdp_epsilon(3.0, 1e-5)  # a valid lower bound of a 3-GDP mechanism
    # a threshold fitted to noise on one half certifies nothing on the other
    assert cp_lower_bound(rng.normal(0, 1, 400), rng.normal(0, 1, 400), 1e-5)["epsilon"] < 0.3


def test_perfectly_separated_worlds_give_the_clopper_pearson_limit():
    """Every "in" score above every "out" one: on the evaluated half (m per world) TPR = 1 and FPR = 0,
    so the bound is log((0.025^(1/m) - delta) / (1 - 0.025^(1/m))), the most m trials can certify."""
    m = 50
    res = cp_lower_bound(np.arange(2 * m) + 1000.0, np.arange(2 * m, dtype=float), 1e-5)
    lo = 0.025 ** (1 / m)
    assert res["epsilon"] == pytest.approx(math.log((lo - 1e-5) / (1 - lo)), rel=1e-9)
    assert res["trials_evaluated"] == 2 * m


def test_gdp_epsilon_inverts_gdp_delta_and_its_edges():
    for mu in (0.5, 2.0, 8.0):
        eps = gdp_epsilon(mu, 1e-5)
        assert gdp_delta(eps, mu) == pytest.approx(1e-5, rel=1e-4)
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and gdp_epsilon(-1.0, 1e-5) == 0.0
    assert gdp_epsilon(math.inf, 1e-5) == math.inf
    assert gdp_epsilon(1.0, 1e-5) < gdp_epsilon(2.0, 1e-5)  # more distinguishable, less private


def test_gdp_fit_without_spread_is_all_or_nothing():
    assert gdp_lower_bound([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 1e-5)["epsilon"] == math.inf
    assert gdp_lower_bound([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 1e-5)["epsilon"] == 0.0


def test_empirical_epsilon_reports_both_bounds_and_the_larger():
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(2, 1, 600), rng.normal(0, 1, 600)
    res = empirical_epsilon(s_in, s_out, 1e-5)
    assert res["gdp"] == gdp_lower_bound(s_in, s_out, 1e-5)
    assert res["clopper_pearson"] == cp_lower_bound(s_in, s_out, 1e-5)
    assert res["lower_bound"] == max(res["gdp"]["epsilon"], res["clopper_pearson"]["epsilon"]) > 0
    assert res["lower_bound"] < gdp_epsilon(2.0, 1e-5)  # a 2-GDP mechanism: the bound stays below its ε


@pytest.mark.parametrize(("call", "match"), [
    (lambda: clopper_pearson(11, 10), "11 successes of 10"),
    (lambda: clopper_pearson(0, 0), "0 successes of 0"),
    (lambda: cp_lower_bound([1.0, 2.0, 3.0], [0.0] * 10, 1e-5), "at least 4 trials"),
    (lambda: gdp_lower_bound([1.0, 2.0], [0.0] * 10, 1e-5), "at least 3 trials"),
    (lambda: empirical_epsilon([1.0] * 10, [0.0] * 10, 0.0), "delta 0.0"),
    (lambda: empirical_epsilon([1.0] * 10, [0.0] * 10, 1.5), "delta 1.5"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
