"""The per-site privacy budget ledger: SQLite, crash-safe, refuses overspend before it happens.

One database (``privacy.sqlite``) holds, per site, its budget ``(epsilon, delta)``, its noise
plan, and one row per round with the mechanism events of that round (``[(q, sigma, steps),
...]``) and the ε spent after it. ε is always *recomputed* from all rounds' events by the RDP
accountant (:mod:`privseg.privacy.accountant`), never summed from the stored per-round
values, so a changing schedule composes correctly.

Crash safety: WAL journal, ``synchronous=FULL``, and every write is one transaction: a
process killed at any moment leaves either the whole round or none of it. A round is keyed
by ``(site, scope, round)``: re-running a round after a crash (with the same key, hence the same
noise and the same output) replaces its row instead of counting it twice. ``scope`` is ``""``
for the run itself and names a derived run (an erasure's retrain, FedEraser calibration, repair)
whose rounds the same site paid for: every scope counts in the site's ε, because the server saw
every one of those releases.

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
from privseg.privacy.accountant import StepEvent, check_epsilon, epsilon

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (site TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
                                    updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plans (site TEXT PRIMARY KEY, plan TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (site TEXT NOT NULL, round INTEGER NOT NULL, events TEXT NOT NULL,
                                   epsilon REAL NOT NULL, delta REAL NOT NULL, time REAL NOT NULL,
                                   info TEXT, scope TEXT NOT NULL DEFAULT '', PRIMARY KEY (site, scope, round));
"""
# Ledgers written before scopes existed: same rows, scope '' (the run itself).
MIGRATE = """
ALTER TABLE rounds RENAME TO rounds_v1;
CREATE TABLE rounds (site TEXT NOT NULL, round INTEGER NOT NULL, events TEXT NOT NULL,
                     epsilon REAL NOT NULL, delta REAL NOT NULL, time REAL NOT NULL,
                     info TEXT, scope TEXT NOT NULL DEFAULT '', PRIMARY KEY (site, scope, round));
INSERT INTO rounds SELECT site, round, events, epsilon, delta, time, info, '' FROM rounds_v1;
DROP TABLE rounds_v1;
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
                cols = [r[1] for r in con.execute("PRAGMA table_info(rounds)")]
            if "scope" not in cols:
                with closing(self._connect()) as con:
                    con.executescript("BEGIN;" + MIGRATE + "COMMIT;")
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
    def events(self, site: str, before_round: int | None = None, exclude_round: int | None = None,
               scope: str = "") -> list[StepEvent]:
        """Every booked event of the site; ``before_round`` / ``exclude_round`` filter the rounds of
        ``scope`` only (the other scopes' releases always count)."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT scope, round, events FROM rounds WHERE site=? ORDER BY scope, round",
                               (site,)).fetchall()
        keep = [ev for sc, r, ev in rows
                if sc != scope or ((before_round is None or r < before_round) and r != exclude_round)]
        return [StepEvent(**e) for ev in keep for e in json.loads(ev)]

    def rounds(self, site: str, scope: str | None = None) -> list[dict]:
        """Booked rounds of the site (of one ``scope`` when given)."""
        sql, args = "SELECT scope, round, epsilon, delta, time, info, events FROM rounds WHERE site=?", [site]
        if scope is not None:
            sql += " AND scope=?"
            args.append(scope)
        with closing(self._connect()) as con:
            rows = con.execute(sql + " ORDER BY scope, round", args).fetchall()
        return [{"round": r, "scope": sc, "epsilon": e, "delta": d, "time": t, "info": json.loads(i) if i else {},
                 "steps": sum(int(x["steps"]) for x in json.loads(ev))}
                for sc, r, e, d, t, i, ev in rows]

    def last_info(self, site: str, before_round: int | None = None, scope: str = "") -> dict | None:
        """The info of the site's last booked round of ``scope`` (before ``before_round`` when given: a
        round re-run after a crash must start from the state *before* its first attempt, not after it)."""
        rows = [r for r in self.rounds(site, scope) if before_round is None or r["round"] < before_round]
        return rows[-1]["info"] if rows else None

    def spent(self, site: str) -> float:
        _, delta = self.budget(site)
        return epsilon(self.events(site), delta)

    def check_round(self, site: str, round_no: int, new_events: list[StepEvent], scope: str = "") -> float:
        """ε after the prospective round; raises :class:`BudgetExceededError` if it crosses the budget."""
        eps_budget, delta = self.budget(site)
        prior = self.events(site, exclude_round=round_no, scope=scope)
        before = epsilon(prior, delta)
        after = epsilon(prior + list(new_events), delta)
        if after > eps_budget * (1 + 1e-6) + TOLERANCE:
            done = len({(r["scope"], r["round"]) for r in self.rounds(site)} - {(scope, round_no)})
            raise BudgetExceededError(
                f"site {site}: round {round_no} would bring epsilon to {after:.4g} at delta={delta:g}, over its budget "
                f"of {eps_budget:g} (spent {before:.4g} in {done} round(s)); training stops before that round. "
                "Raise the site's budget, or plan fewer rounds so the noise is calibrated to the budget")
        return after

    def commit_round(self, site: str, round_no: int, new_events: list[StepEvent], info: dict | None = None,
                     scope: str = "") -> float:
        """Book a round (one transaction, replacing a previous attempt at the same round); returns ε after it."""
        eps_budget, delta = self.budget(site)
        after = epsilon(self.events(site, exclude_round=round_no, scope=scope) + list(new_events), delta)
        with closing(self._connect()) as con, con:
            con.execute("INSERT OR REPLACE INTO rounds (site, round, events, epsilon, delta, time, info, scope) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (site, int(round_no), json.dumps([e.to_dict() for e in new_events]), after, delta,
                         time.time(), json.dumps(info or {}, default=float), scope))
        return after

    def private(self, site: str) -> tuple[bool, str]:
        """Whether every booked round of the site drew its noise from a secret key (and so the
        ε is a guarantee), with the reason when not."""
        rounds = self.rounds(site)
        if not rounds:
            return False, "no rounds booked"
        kinds = {str((r["info"] or {}).get("noise", "unrecorded")) for r in rounds}
        if kinds == {"secret"}:
            return True, "secret-key noise, every release accounted"
        if any(k.startswith("reproducible") for k in kinds):
            return False, "NOT PRIVATE: noise reproducible from the public seed (a test/benchmark setting)"
        return False, "NOT PRIVATE: rounds booked before secret-key noise (noise predictable from the seed)"

    def status(self) -> list[dict]:
        """Per site: budget, spent, remaining, rounds booked."""
        out = []
        for site in self.sites():
            eps_budget, delta = self.budget(site)
            spent = self.spent(site)
            rounds = self.rounds(site)
            private, why = self.private(site)
            out.append({"site": site, "epsilon_budget": eps_budget, "delta": delta, "epsilon_spent": spent,
                        "epsilon_remaining": max(0.0, eps_budget - spent), "rounds": len(rounds),
                        "private": private, "guarantee": why,
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


def budget_status(path: str | Path) -> list[dict]:
    """:meth:`BudgetLedger.status` of every ledger under a run folder (or of the file), each row
    with its ``ledger`` path."""
    return [{**r, "ledger": str(p)} for p in find_ledgers(path) for r in BudgetLedger(p).status()]


def change_budget(path: str | Path, site: str, eps: float) -> dict:
    """Set ``site``'s total epsilon budget (delta unchanged) in the ledger under ``path`` that has
    the site: a decision recorded in the ledger; the noise plan stays as it was. Refused below what
    the site has spent. Returns the ledger, the old budget, the spend and delta."""
    check_epsilon(eps)
    for ledger_path in find_ledgers(path):
        ledger = BudgetLedger(ledger_path)
        if site in ledger.sites():
            old, delta = ledger.budget(site)
            spent = ledger.spent(site)
            if eps < spent:
                raise ConfigError(f"site {site} has already spent epsilon {spent:.4g}: a budget of {eps:g} "
                                  "would be exceeded at once")
            ledger.set_budget(site, eps, delta)
            return {"ledger": ledger_path, "old": old, "spent": spent, "delta": delta}
    raise ConfigError(f"no ledger under {path} has site {site!r}")
