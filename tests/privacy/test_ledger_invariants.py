"""Invariants as property tests (issue 9): the per-site privacy budget is never exceeded, for
any sequence of runs, rounds, repeated rounds, budget changes and restarts.

(The erasure ledger's invariants -- hash chain verifies after any interleaving of requests and
crashes, a request is applied once -- belong with the erasure ledger and are added there.)

Hypothesis drives :class:`~privseg.privacy.budget.BudgetLedger` through the protocol the
trainers use (``check_round`` before a round, ``commit_round`` after it) against a model of
what should be booked. The model's RDP accountant is memoised for speed (it is a pure function
of the events and delta; its correctness is tested in privacy/test_privacy.py); the ledger composes the
curve it keeps per site with the rows booked since, so comparing its spend with the model's
recompute from every event also checks that cache, across restarts.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import reliability_log as rlog
from privseg.errors import BudgetExceededError
from privseg.privacy import budget as budget_mod
from privseg.privacy.accountant import StepEvent, epsilon

SCALE = float(os.environ.get("PRIVSEG_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("PRIVSEG_FUZZ_RANDOM", "") not in ("", "0")
SITES = ("H1", "H2", "server")
SLACK = 1e-6  # the ledger's own relative tolerance


@functools.lru_cache(maxsize=4096)
def _eps_cached(events: tuple, delta: float) -> float:
    return epsilon([StepEvent(*e) for e in events], delta)


def _eps(events, delta: float) -> float:
    return _eps_cached(tuple((e.q, e.sigma, e.steps) for e in events), float(delta))


# from cheap rounds (many fit a budget) to ones that blow any budget at once
events_st = st.lists(st.builds(StepEvent, q=st.sampled_from([0.01, 0.05, 0.2, 1.0]),
                               sigma=st.sampled_from([0.7, 1.5, 4.0, 10.0]), steps=st.integers(1, 25)),
                     min_size=1, max_size=2)


class BudgetMachine(RuleBasedStateMachine):
    """Runs and rounds at several sites, budgets set and changed at any time, rounds repeated
    (a crash re-runs a round: the same release when its inputs are the same, a new one otherwise),
    the ledger reopened (a restarted process)."""

    @initialize()
    def open(self):
        self.dir = tempfile.mkdtemp(prefix="ledger-")
        self.path = Path(self.dir) / "privacy.sqlite"
        self.ledger = budget_mod.BudgetLedger(self.path)
        self.budget: dict[str, tuple[float, float]] = {}
        self.max_budget: dict[str, float] = {}
        # per site, the releases in the order they were booked: (round, events, release id)
        self.booked: dict[str, list[tuple[int, list[StepEvent], str]]] = {s: [] for s in SITES}
        self.refused = 0

    def _spent_model(self, site: str) -> float:
        events = [e for _, evs, _ in self.booked[site] for e in evs]
        return _eps(events, self.budget[site][1])

    def _attempt(self, site: str, round_no: int, events: list[StepEvent]) -> bool:
        """The trainers' protocol: check before the round, commit after it."""
        eps_budget, _ = self.budget[site]
        rows_before = self.ledger.rounds(site)
        release = f"r{round_no}:{[e.to_dict() for e in events]}"  # identical inputs: the same release
        try:
            after = self.ledger.check_round(site, round_no, events, release=release)
        except BudgetExceededError:
            self.refused += 1
            held = self.ledger.rounds(site) == rows_before  # a refusal books nothing
            rlog.record("invariant", "budget:refusal-books-nothing", held)
            assert held
            return False
        booked = self.ledger.commit_round(site, round_no, events, release=release)
        held = abs(booked - after) <= 1e-9 and booked <= eps_budget * (1 + SLACK) + 1e-9
        rlog.record("invariant", "budget:accepted-round-within-budget", held, f"{site} r{round_no} {booked}")
        assert held, (site, round_no, booked, after, eps_budget)
        if release not in {rel for _, _, rel in self.booked[site]}:  # a replay books nothing; never a replacement
            self.booked[site].append((round_no, list(events), release))
        return True

    @rule(site=st.sampled_from(SITES), eps=st.floats(0.3, 12.0), delta=st.sampled_from([1e-5, 1e-3]))
    def set_budget(self, site, eps, delta):
        if site in self.budget and self.budget[site][1] != delta and self.booked[site]:
            return  # the spend so far was accounted at the old delta; privseg never changes it mid-run
        self.ledger.set_budget(site, eps, delta)
        self.budget[site] = (eps, delta)
        self.max_budget[site] = max(eps, self.max_budget.get(site, 0.0))

    @precondition(lambda self: bool(self.budget))
    @rule(data=st.data(), round_no=st.integers(1, 6), events=events_st)
    def run_round(self, data, round_no, events):
        site = data.draw(st.sampled_from(sorted(self.budget)))
        self._attempt(site, round_no, events)

    @precondition(lambda self: bool(self.budget))
    @rule(data=st.data(), sigma=st.sampled_from([1.0, 2.0, 6.0]), q=st.sampled_from([0.02, 0.1, 0.5]),
          steps_per_round=st.integers(1, 20), rounds=st.integers(1, 5), extra=st.integers(0, 2))
    def planned_run(self, data, sigma, q, steps_per_round, rounds, extra):
        """A run with a fixed noise plan: rounds 1..rounds (+ extra ones past the plan, as an
        extended run asks for), each checked then booked; the first refusal stops the run."""
        site = data.draw(st.sampled_from(sorted(self.budget)))
        for r in range(1, rounds + extra + 1):
            if not self._attempt(site, r, [StepEvent(q, sigma, steps_per_round)]):
                break

    @rule()
    def restart(self):
        """A new process opens the same database."""
        self.ledger = budget_mod.BudgetLedger(self.path)

    @invariant()
    def never_exceeded_and_booked_once(self):
        if not hasattr(self, "ledger"):
            return
        for site in self.budget:
            rows = self.ledger.rounds(site)
            spent = self.ledger.spent(site)
            rounds = [r["round"] for r in rows]
            releases = [r["release"] for r in rows]
            once = (releases == [rel for _, _, rel in self.booked[site]] and len(releases) == len(set(releases))
                    and self.ledger.verify() == [])
            consistent = math.isclose(spent, self._spent_model(site), rel_tol=1e-9, abs_tol=1e-12)
            rlog.record("invariant", "budget:each-round-booked-once", once, f"{site}: {rounds}")
            rlog.record("invariant", "budget:spent-is-recomputed-from-all-rounds", consistent,
                        f"{site}: {spent} vs {self._spent_model(site)}")
            assert once and consistent
            # spent moves only by accepted rounds, each within the budget of its time; a budget
            # lowered below the spend afterwards refuses every further round instead
            within = spent <= self.max_budget[site] * (1 + SLACK) + 1e-9
            rlog.record("invariant", "budget:never-exceeded", within, f"{site}: {spent} > {self.max_budget[site]}")
            assert within


BudgetMachine.TestCase.settings = settings(
    max_examples=max(1, int(30 * SCALE)), stateful_step_count=12, deadline=None, database=None,
    derandomize=not RANDOM, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_budget_never_exceeded = BudgetMachine.TestCase


def test_a_lowered_budget_refuses_every_further_round(tmp_path):
    """The one way spent > budget can be seen: the budget was lowered after the spend. Then the
    next round is refused, whatever it is (even an empty one is refused when spent > budget)."""
    led = budget_mod.BudgetLedger(tmp_path / "privacy.sqlite")
    led.set_budget("H1", 8.0, 1e-5)
    led.commit_round("H1", 1, [StepEvent(0.5, 1.0, 30)])
    led.set_budget("H1", 0.5, 1e-5)
    refused = 0
    for events in ([StepEvent(0.05, 4.0, 1)], [StepEvent(1.0, 10.0, 1)]):
        with pytest.raises(BudgetExceededError, match="over its budget"):
            led.check_round("H1", 2, events)
        refused += 1
    rlog.record("invariant", "budget:lowered-budget-refuses", refused == 2)
