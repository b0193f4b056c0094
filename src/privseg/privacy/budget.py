"""The per-site privacy budget ledger: SQLite, append-only, hash-chained, refuses overspend
before it happens.

One database (``privacy.sqlite``) holds, per site, its budget ``(epsilon, delta)``, its noise
plan, and one row per *release* with the mechanism events it took (``[(q, sigma, steps),
...]``) and the ε spent after it. ε is always *recomputed* from every row's events by the RDP
accountant (:mod:`privseg.privacy.accountant`), never summed from the stored per-round
values, so a changing schedule composes correctly. The RDP curve of what a site has booked is
kept per process (``_CURVES``) with the last row it covers, so a check or a commit reads only
the rows booked since and adds their curves (RDP composes by summing): the per-round cost stays
flat as releases accumulate, and the ε is the one a fresh recompute gives.

**Append-only.** A row is never replaced or deleted (SQLite triggers refuse both). A release is
identified by its fingerprint (:func:`privseg.privacy.releases.release_id`): a round executed
again with identical inputs is the same release (its noise is bound to the fingerprint, so its
output is too) and adds no row; a round executed again with any other input is a new release
and a new row, paid for again. ``scope`` is ``""`` for the run itself and names a derived run
(an erasure's retrain, FedEraser calibration, repair) whose rounds the same site paid for:
every scope counts in the site's ε, because the server saw every one of those releases.

**Tamper-evident.** Each row (and each budget decision, kept in ``budget_log``) carries the
SHA-256 of the previous row's hash and its own content; :meth:`BudgetLedger.verify` recomputes
the chains and names the first row that was edited, reordered or removed from the middle.

Crash safety: WAL journal, ``synchronous=FULL``, and every write is one transaction: a process
killed at any moment leaves either the whole row or none of it.

:meth:`BudgetLedger.check_round` computes the ε the next release *would* bring and raises
:class:`~privseg.errors.BudgetExceededError` if it crosses the budget -- before the round runs.
Budgets change only through :func:`change_budget` (``privseg privacy budget``), each change a
row of ``budget_log``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import numpy as np

from privseg.errors import BudgetExceededError, ConfigError, DataError
from privseg.privacy.accountant import ORDERS, StepEvent, check_epsilon, rdp_curve, rdp_to_epsilon
from privseg.utils import site_dir

LEDGER_FILE = "privacy.sqlite"
GENESIS = "0" * 64
ROUND_COLUMNS = ("site", "scope", "round", "events", "epsilon", "delta", "time", "info", "release")
BUDGET_COLUMNS = ("site", "epsilon", "delta", "time", "reason")
SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (site TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
                                    updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plans (site TEXT PRIMARY KEY, plan TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (seq INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL,
                                     scope TEXT NOT NULL DEFAULT '', round INTEGER NOT NULL, events TEXT NOT NULL,
                                     epsilon REAL NOT NULL, delta REAL NOT NULL, time REAL NOT NULL, info TEXT,
                                     release TEXT, prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budget_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL,
                                       epsilon REAL NOT NULL, delta REAL NOT NULL, time REAL NOT NULL,
                                       reason TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS releases_by_release ON releases (site, release);
CREATE TRIGGER IF NOT EXISTS releases_no_update BEFORE UPDATE ON releases
    BEGIN SELECT RAISE(ABORT, 'privacy ledger rows are append-only'); END;
CREATE TRIGGER IF NOT EXISTS releases_no_delete BEFORE DELETE ON releases
    BEGIN SELECT RAISE(ABORT, 'privacy ledger rows are append-only'); END;
CREATE TRIGGER IF NOT EXISTS budget_log_no_update BEFORE UPDATE ON budget_log
    BEGIN SELECT RAISE(ABORT, 'privacy ledger rows are append-only'); END;
CREATE TRIGGER IF NOT EXISTS budget_log_no_delete BEFORE DELETE ON budget_log
    BEGIN SELECT RAISE(ABORT, 'privacy ledger rows are append-only'); END;
"""
TOLERANCE = 1e-9
ROW_SQL = "SELECT scope, round, epsilon, delta, time, info, events, release FROM releases WHERE site=?"


class _Curve(NamedTuple):
    """The RDP curve of a site's booked events up to the row ``seq`` (whose hash is ``hash``);
    ``any`` whether one of them took a step (none: ε is 0, not the curve's conversion)."""

    seq: int
    hash: str
    any: bool
    rdp: np.ndarray

    def epsilon(self, delta: float, extra: list[StepEvent] | tuple = ()) -> float:
        """ε at ``delta`` of the booked events composed with ``extra`` (:func:`epsilon`'s value)."""
        extra = [e for e in extra if e.steps > 0]
        if not (self.any or extra):
            return 0.0
        return rdp_to_epsilon(self.rdp + rdp_curve(extra) if extra else self.rdp, delta)[0]


# Per process, per (ledger file, site): the curve of what the site booked (see the module docstring).
# Entries are replaced, never changed in place, so a reader always sees a consistent (seq, hash, curve).
_CURVES: dict[tuple[str, str], _Curve] = {}


def _row_hash(prev: str, values: tuple) -> str:
    return hashlib.sha256((prev + json.dumps(list(values), default=float)).encode()).hexdigest()


def _migrate(con: sqlite3.Connection) -> None:
    """Ledgers of earlier versions (a ``rounds`` table, one row per (site, scope, round)): their
    rows, in the order they were booked, become the first rows of the chain."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "rounds" not in tables:
        return
    cols = [r[1] for r in con.execute("PRAGMA table_info(rounds)")]
    scope = "scope" if "scope" in cols else "''"
    rows = con.execute(f"SELECT site, {scope}, round, events, epsilon, delta, time, info FROM rounds "
                       "ORDER BY time, rowid").fetchall()
    for row in rows:
        _append(con, "releases", ROUND_COLUMNS, (*row, None))
    if con.execute("SELECT COUNT(*) FROM budget_log").fetchone()[0] == 0:
        for site, eps, delta, updated in con.execute("SELECT site, epsilon, delta, updated FROM budgets").fetchall():
            _append(con, "budget_log", BUDGET_COLUMNS, (site, eps, delta, updated, "budget before the ledger log"))
    con.execute("DROP TABLE rounds")


def _append(con: sqlite3.Connection, table: str, columns: tuple[str, ...], values: tuple) -> None:
    last = con.execute(f"SELECT hash FROM {table} ORDER BY seq DESC LIMIT 1").fetchone()
    prev = last[0] if last else GENESIS
    con.execute(f"INSERT INTO {table} ({', '.join(columns)}, prev, hash) VALUES "
                f"({', '.join('?' * (len(columns) + 2))})", (*values, prev, _row_hash(prev, values)))


class BudgetLedger:
    """Per-site ε ledger in SQLite (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con, con:
                con.executescript(SCHEMA)
            with closing(self._connect()) as con, con:
                _migrate(con)
        except sqlite3.DatabaseError as exc:
            raise DataError(self.path, f"privacy ledger unreadable ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    # -- budgets and plans ---------------------------------------------------------
    def set_budget(self, site: str, eps: float, delta: float, reason: str = "plan") -> None:
        """Set the site's budget, recorded (with ``reason``) in the hash-chained ``budget_log``."""
        now = time.time()
        with closing(self._connect()) as con, con:
            con.execute("INSERT INTO budgets VALUES (?, ?, ?, ?) ON CONFLICT(site) DO UPDATE SET "
                        "epsilon=excluded.epsilon, delta=excluded.delta, updated=excluded.updated",
                        (site, float(eps), float(delta), now))
            _append(con, "budget_log", BUDGET_COLUMNS, (site, float(eps), float(delta), now, str(reason)))

    def budget(self, site: str) -> tuple[float, float]:
        with closing(self._connect()) as con:
            row = con.execute("SELECT epsilon, delta FROM budgets WHERE site=?", (site,)).fetchone()
        if row is None:
            raise ConfigError(f"site {site!r} has no budget in {self.path}")
        return float(row[0]), float(row[1])

    def has_budget(self, site: str) -> bool:
        return site in self.sites()

    def budget_history(self, site: str | None = None) -> list[dict]:
        """Every budget decision (plan, raise, closing), oldest first."""
        sql, args = "SELECT site, epsilon, delta, time, reason FROM budget_log", []
        if site is not None:
            sql, args = sql + " WHERE site=?", [site]
        with closing(self._connect()) as con:
            rows = con.execute(sql + " ORDER BY seq", args).fetchall()
        return [dict(zip(BUDGET_COLUMNS, r, strict=True)) for r in rows]

    def close_site(self, site: str, reason: str) -> None:
        """Mark the site closed (it left the federation): its rows stay, they are the record of what
        earlier models released; its budget stays as it was."""
        eps, delta = self.budget(site)
        self.set_budget(site, eps, delta, reason=f"closed: {reason}")

    def closed(self, site: str) -> str | None:
        """The reason the site was closed, or None."""
        last = [h for h in self.budget_history(site)]
        reason = last[-1]["reason"] if last else ""
        return reason[len("closed: "):] if reason.startswith("closed: ") else None

    def set_plan(self, site: str, plan: dict) -> None:
        """Store the site's noise plan (a derived scope's copy, ``SITE@SCOPE``, may be stored again
        with the same content; the plan of a site that has booked releases never changes)."""
        with closing(self._connect()) as con, con:
            old = con.execute("SELECT plan FROM plans WHERE site=?", (site,)).fetchone()
            if old is not None and json.loads(old[0]) != plan and "@" not in site and self._has_rows(con, site):
                raise ConfigError(f"site {site}: its DP plan is fixed once it has released; a new plan would "
                                  f"change the noise of released rounds ({self.path})")
            con.execute("INSERT OR REPLACE INTO plans VALUES (?, ?)", (site, json.dumps(plan)))

    @staticmethod
    def _has_rows(con, site: str) -> bool:
        return con.execute("SELECT 1 FROM releases WHERE site=? LIMIT 1", (site,)).fetchone() is not None

    def get_plan(self, site: str) -> dict | None:
        with closing(self._connect()) as con:
            row = con.execute("SELECT plan FROM plans WHERE site=?", (site,)).fetchone()
        return json.loads(row[0]) if row else None

    def sites(self) -> list[str]:
        with closing(self._connect()) as con:
            return [r[0] for r in con.execute("SELECT site FROM budgets ORDER BY site")]

    # -- releases --------------------------------------------------------------------
    def events(self, site: str) -> list[StepEvent]:
        """Every booked event of the site, every scope (the server saw every release)."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT events FROM releases WHERE site=? ORDER BY seq", (site,)).fetchall()
        return [StepEvent(**e) for (ev,) in rows for e in json.loads(ev)]

    def rounds(self, site: str, scope: str | None = None) -> list[dict]:
        """Booked releases of the site (of one ``scope`` when given), in the order they were booked;
        a round executed again with other inputs appears twice."""
        return self._rows(site, *(("scope=?", scope),) if scope is not None else ())

    def _rows(self, site: str, *where: tuple[str, object], last: bool = False) -> list[dict]:
        """The site's rows (that also meet each ``(condition, value)`` of ``where``), in booking
        order; with ``last`` only the last of them (read as one row, not as all of them)."""
        sql = ROW_SQL + "".join(f" AND {cond}" for cond, _ in where) + (" ORDER BY seq DESC LIMIT 1" if last
                                                                         else " ORDER BY seq")
        with closing(self._connect()) as con:
            rows = con.execute(sql, [site, *(v for _, v in where)]).fetchall()
        return [{"round": r, "scope": sc, "epsilon": e, "delta": d, "time": t, "info": json.loads(i) if i else {},
                 "steps": sum(int(x["steps"]) for x in json.loads(ev)), "release": rel}
                for sc, r, e, d, t, i, ev, rel in rows]

    def booked(self, site: str, release: str | None) -> dict | None:
        """The row of ``release`` when it is already booked (None otherwise)."""
        if release is None:
            return None
        return next(iter(self._rows(site, ("release=?", release), last=True)), None)

    def last_info(self, site: str, before_round: int | None = None, scope: str = "") -> dict | None:
        """The info of the site's last booked release of ``scope`` (of a round before ``before_round``
        when given: a round re-run after a crash starts from the state *before* its first attempt)."""
        where = [("scope=?", scope)] + ([("round<?", int(before_round))] if before_round is not None else [])
        rows = self._rows(site, *where, last=True)
        return rows[-1]["info"] if rows else None

    def _curve(self, con: sqlite3.Connection, site: str) -> _Curve:
        """The RDP curve of every event ``site`` booked (every scope), from ``_CURVES`` plus the rows
        booked since the last one it covers (by this process or any other); from scratch when that
        row is not there as it was (the file was replaced by another ledger)."""
        key = (str(self.path.resolve()), site)
        c = _CURVES.get(key)
        if c is None or con.execute("SELECT hash FROM releases WHERE seq=?", (c.seq,)).fetchone() != (c.hash,):
            c = _Curve(0, GENESIS, False, np.zeros(len(ORDERS)))
        rows = con.execute("SELECT seq, events, hash FROM releases WHERE site=? AND seq>? ORDER BY seq",
                           (site, c.seq)).fetchall()
        if rows:
            new = [e for _, ev, _ in rows for e in (StepEvent(**x) for x in json.loads(ev)) if e.steps > 0]
            c = _Curve(rows[-1][0], rows[-1][2], c.any or bool(new), c.rdp + rdp_curve(new) if new else c.rdp)
            _CURVES[key] = c
        return c

    def spent(self, site: str) -> float:
        _, delta = self.budget(site)
        with closing(self._connect()) as con:
            return self._curve(con, site).epsilon(delta)

    def epsilon_with(self, site: str, events: list[StepEvent] | tuple) -> float:
        """ε of the site if ``events`` were booked too (its spend composed with them)."""
        _, delta = self.budget(site)
        with closing(self._connect()) as con:
            return self._curve(con, site).epsilon(delta, list(events))

    def check_round(self, site: str, round_no: int, new_events: list[StepEvent], scope: str = "",
                    release: str | None = None, reserve: list[StepEvent] | tuple = ()) -> float:
        """ε after the prospective release (unchanged when ``release`` is already booked: the same
        release again); raises :class:`BudgetExceededError` if it crosses the budget. ``reserve``:
        mechanism events kept for later (an erasure reserve): the release is refused when it leaves
        too little budget for them too (composed, not subtracted: ε does not add up)."""
        eps_budget, delta = self.budget(site)
        with closing(self._connect()) as con:
            prior = self._curve(con, site)
        before = prior.epsilon(delta)
        if self.booked(site, release) is not None:
            return before
        after = prior.epsilon(delta, list(new_events))
        with_reserve = prior.epsilon(delta, [*new_events, *reserve]) if reserve else after
        if with_reserve > eps_budget * (1 + 1e-6) + TOLERANCE:
            kept = (f" ({with_reserve:.4g} with the erasure reserve the plan keeps)" if reserve and after <= eps_budget
                    else "")
            raise BudgetExceededError(
                f"site {site}: round {round_no} would bring epsilon to {after:.4g} at delta={delta:g}{kept}, over its "
                f"budget of {eps_budget:g} (spent {before:.4g} in {len(self.rounds(site))} release(s)); training stops "
                "before that round. Raise the site's budget (privseg privacy budget RUN --site SITE --epsilon E), "
                "or plan fewer rounds so the noise is calibrated to the budget")
        return after

    def commit_round(self, site: str, round_no: int, new_events: list[StepEvent], info: dict | None = None,
                     scope: str = "", release: str | None = None) -> float:
        """Book a release (one transaction, appended; nothing when ``release`` is already booked);
        returns ε after it."""
        eps_budget, delta = self.budget(site)
        with closing(self._connect()) as con, con:
            con.execute("BEGIN IMMEDIATE")  # two writers: the second sees the first's row
            prior = self._curve(con, site)
            if release is not None and con.execute("SELECT 1 FROM releases WHERE site=? AND release=?",
                                                   (site, release)).fetchone():
                return prior.epsilon(delta)
            after = prior.epsilon(delta, list(new_events))
            _append(con, "releases", ROUND_COLUMNS,
                    (site, scope, int(round_no), json.dumps([e.to_dict() for e in new_events]), after, delta,
                     time.time(), json.dumps(info or {}, default=float), release))
        return after

    def verify(self) -> list[str]:
        """Problems found by recomputing the hash chains (empty: intact) and checking that each
        site's budget is its last recorded decision."""
        problems = []
        with closing(self._connect()) as con:
            for table, columns in (("releases", ROUND_COLUMNS), ("budget_log", BUDGET_COLUMNS)):
                prev = GENESIS
                for row in con.execute(f"SELECT seq, {', '.join(columns)}, prev, hash FROM {table} ORDER BY seq"):
                    seq, values, (row_prev, row_hash) = row[0], tuple(row[1:-2]), row[-2:]
                    if row_prev != prev or _row_hash(prev, values) != row_hash:
                        problems.append(f"{self.path}: {table} row {seq} was edited, reordered or a row before it "
                                        "was removed (hash chain broken)")
                        break
                    prev = row_hash
            for site, eps, delta in con.execute("SELECT site, epsilon, delta FROM budgets").fetchall():
                last = con.execute("SELECT epsilon, delta FROM budget_log WHERE site=? ORDER BY seq DESC LIMIT 1",
                                   (site,)).fetchone()
                if last is None or (float(last[0]), float(last[1])) != (float(eps), float(delta)):
                    problems.append(f"{self.path}: site {site}'s budget ({eps:g}, {delta:g}) is not its last "
                                    "recorded budget decision")
        return problems

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
        problems = self.verify()
        for site in self.sites():
            eps_budget, delta = self.budget(site)
            spent = self.spent(site)
            rounds = self.rounds(site)
            private, why = self.private(site)
            # the erasure reserve the site's plan keeps (privseg.privacy.plan): ε if it were spent now
            kept = [StepEvent(**e) for e in (self.get_plan(site) or {}).get("reserve", [])]
            if problems:
                private, why = False, "LEDGER TAMPERED: " + problems[0]
            out.append({"site": site, "epsilon_budget": eps_budget, "delta": delta, "epsilon_spent": spent,
                        "epsilon_remaining": max(0.0, eps_budget - spent), "rounds": len(rounds),
                        "private": private, "guarantee": why, "intact": not problems, "closed": self.closed(site),
                        "last_round": rounds[-1]["round"] if rounds else None,
                        "clip": (rounds[-1]["info"] or {}).get("clip") if rounds else None,
                        "reserve_steps": sum(e.steps for e in kept),
                        "epsilon_with_reserve": self.epsilon_with(site, kept) if kept else None})
        return out


def ledger_path(run_dir: str | Path, site: str | None = None) -> Path:
    """Where a privacy ledger lives, the one place that spells it: the run's own
    (``<run_dir>/privacy.sqlite``: a central DP run, or the server of a site-level DP federation),
    or with ``site`` that site's (``<run_dir>/sites/<site>/privacy.sqlite``)."""
    folder = Path(run_dir) if site is None else site_dir(run_dir, site)
    return folder / LEDGER_FILE


def ledgers_in(run_dir: str | Path) -> list[Path]:
    """The privacy ledgers that exist in a run folder (:func:`ledger_path` of the run and of each
    site), sorted; empty when there is none."""
    return sorted({*Path(run_dir).glob(LEDGER_FILE), *Path(run_dir).glob(str(ledger_path("", "*")))})


def find_ledgers(path: str | Path) -> list[Path]:
    """Ledgers under a run folder (:func:`ledgers_in`) or the file itself; none is a DataError."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise DataError(p, "no such run folder or ledger")
    found = ledgers_in(p)
    if not found:
        raise DataError(p, f"no privacy ledger ({ledger_path('')}) here or under {ledger_path('', '*').parent}/")
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
            ledger.set_budget(site, eps, delta, reason=f"changed by privseg privacy budget from {old:g}")
            return {"ledger": ledger_path, "old": old, "spent": spent, "delta": delta}
    raise ConfigError(f"no ledger under {path} has site {site!r}")
