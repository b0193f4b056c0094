"""The per-site privacy budget ledger: SQLite, crash-safe, refuses overspend before it happens.

One database (``privacy.sqlite``) holds, per site, its budget ``(epsilon, delta)``, its noise
plan, and one row per round with the mechanism events of that round (``[(q, sigma, steps),
...]``) and the ε spent after it. ε is always *recomputed* from all rounds' events by the RDP
accountant (:mod:`privseg.privacy.accountant`), never summed from the stored per-round
values, so a changing schedule composes correctly.

Crash safety: WAL journal, ``synchronous=FULL``, and every write is one transaction: a
process killed at any moment leaves either the whole round or none of it. A round is keyed
by ``(site, round)``: re-running a round after a crash (with the same seed, hence the same
noise and the same output) replaces its row instead of counting it twice.

:meth:`BudgetLedger.check_round` computes the ε the next round *would* bring and raises
:class:`~privseg.errors.BudgetExceededError` if it crosses the budget -- before the round runs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from privseg.errors import BudgetExceededError, ConfigError, DataError
from privseg.privacy.accountant import StepEvent, epsilon

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (site TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
                                    updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plans (site TEXT PRIMARY KEY, plan TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (site TEXT NOT NULL, round INTEGER NOT NULL, events TEXT NOT NULL,
                                   epsilon REAL NOT NULL, delta REAL NOT NULL, time REAL NOT NULL,
                                   info TEXT, PRIMARY KEY (site, round));
"""
TOLERANCE = 1e-9


class BudgetLedger:
    """Per-site ε ledger in SQLite (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con, con:
                con.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DataError(self.path, f"privacy ledger unreadable ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    # -- budgets and plans ---------------------------------------------------------
    def set_budget(self, site: str, eps: float, delta: float) -> None:
        with closing(self._connect()) as con, con:
            con.execute("INSERT INTO budgets VALUES (?, ?, ?, ?) ON CONFLICT(site) DO UPDATE SET "
                        "epsilon=excluded.epsilon, delta=excluded.delta, updated=excluded.updated",
                        (site, float(eps), float(delta), time.time()))

    def budget(self, site: str) -> tuple[float, float]:
        with closing(self._connect()) as con:
            row = con.execute("SELECT epsilon, delta FROM budgets WHERE site=?", (site,)).fetchone()
        if row is None:
            raise ConfigError(f"site {site!r} has no budget in {self.path}")
        return float(row[0]), float(row[1])

    def set_plan(self, site: str, plan: dict) -> None:
        with closing(self._connect()) as con, con:
            con.execute("INSERT OR REPLACE INTO plans VALUES (?, ?)", (site, json.dumps(plan)))

    def get_plan(self, site: str) -> dict | None:
        with closing(self._connect()) as con:
            row = con.execute("SELECT plan FROM plans WHERE site=?", (site,)).fetchone()
        return json.loads(row[0]) if row else None

    def sites(self) -> list[str]:
        with closing(self._connect()) as con:
            return [r[0] for r in con.execute("SELECT site FROM budgets ORDER BY site")]

    # -- rounds ----------------------------------------------------------------------
    def events(self, site: str, before_round: int | None = None, exclude_round: int | None = None) -> list[StepEvent]:
        sql, args = "SELECT round, events FROM rounds WHERE site=?", [site]
        if before_round is not None:
            sql += " AND round < ?"
            args.append(before_round)
        with closing(self._connect()) as con:
            rows = con.execute(sql + " ORDER BY round", args).fetchall()
        return [StepEvent(**e) for r, ev in rows if r != exclude_round for e in json.loads(ev)]

    def rounds(self, site: str) -> list[dict]:
        with closing(self._connect()) as con:
            rows = con.execute("SELECT round, epsilon, delta, time, info FROM rounds WHERE site=? ORDER BY round",
                               (site,)).fetchall()
        return [{"round": r, "epsilon": e, "delta": d, "time": t, "info": json.loads(i) if i else {}}
                for r, e, d, t, i in rows]

    def last_info(self, site: str, before_round: int | None = None) -> dict | None:
        """The info of the site's last booked round (before ``before_round`` when given: a round
        re-run after a crash must start from the state *before* its first attempt, not after it)."""
        rows = [r for r in self.rounds(site) if before_round is None or r["round"] < before_round]
        return rows[-1]["info"] if rows else None

    def spent(self, site: str) -> float:
        _, delta = self.budget(site)
        return epsilon(self.events(site), delta)

    def check_round(self, site: str, round_no: int, new_events: list[StepEvent]) -> float:
        """ε after the prospective round; raises :class:`BudgetExceededError` if it crosses the budget."""
        eps_budget, delta = self.budget(site)
        prior = self.events(site, exclude_round=round_no)
        before = epsilon(prior, delta)
        after = epsilon(prior + list(new_events), delta)
        if after > eps_budget * (1 + 1e-6) + TOLERANCE:
            done = len({r["round"] for r in self.rounds(site)} - {round_no})
            raise BudgetExceededError(
                f"site {site}: round {round_no} would bring epsilon to {after:.4g} at delta={delta:g}, over its budget "
                f"of {eps_budget:g} (spent {before:.4g} in {done} round(s)); training stops before that round. "
                "Raise the site's budget, or plan fewer rounds so the noise is calibrated to the budget")
        return after

    def commit_round(self, site: str, round_no: int, new_events: list[StepEvent], info: dict | None = None) -> float:
        """Book a round (one transaction, replacing a previous attempt at the same round); returns ε after it."""
        eps_budget, delta = self.budget(site)
        after = epsilon(self.events(site, exclude_round=round_no) + list(new_events), delta)
        with closing(self._connect()) as con, con:
            con.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (site, int(round_no), json.dumps([e.to_dict() for e in new_events]), after, delta,
                         time.time(), json.dumps(info or {}, default=float)))
        return after

    def status(self) -> list[dict]:
        """Per site: budget, spent, remaining, rounds booked."""
        out = []
        for site in self.sites():
            eps_budget, delta = self.budget(site)
            spent = self.spent(site)
            rounds = self.rounds(site)
            out.append({"site": site, "epsilon_budget": eps_budget, "delta": delta, "epsilon_spent": spent,
                        "epsilon_remaining": max(0.0, eps_budget - spent), "rounds": len(rounds),
                        "last_round": rounds[-1]["round"] if rounds else None,
                        "clip": (rounds[-1]["info"] or {}).get("clip") if rounds else None})
        return out


def find_ledgers(path: str | Path) -> list[Path]:
    """Ledgers under a run folder (``privacy.sqlite`` of the run and of each site) or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise DataError(p, "no such run folder or ledger")
    found = sorted(set(p.glob("privacy.sqlite")) | set(p.glob("sites/*/privacy.sqlite")))
    if not found:
        raise DataError(p, "no privacy ledger (privacy.sqlite) here or under sites/*/")
    return found
