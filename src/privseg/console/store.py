"""Requests filed in the console and their erasure jobs.

What happens before an erasure starts (filed, approved or rejected, by whom) and the job's
bookkeeping (queued, running in process ``pid``, the stage it last reported) live here. What the
erasure did lives in the run's erasure ledger, which is the truth: after a restart the job is
reconciled against it (:mod:`privseg.console.jobs`).

States: ``filed`` -> ``rejected`` | ``queued`` (approved) -> ``running`` -> ``completed`` |
``verification-failed`` | ``failed``; a ``running`` job whose process died goes back to
``queued`` and resumes from the ledger.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from privseg.console.db import opened
from privseg.errors import ConfigError

OPEN = ("filed", "queued", "running")
FINAL = ("rejected", "completed", "verification-failed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    run TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, site TEXT NOT NULL, subjects TEXT NOT NULL,
    reason TEXT NOT NULL, filed_by TEXT NOT NULL, filed_at REAL NOT NULL, state TEXT NOT NULL,
    decided_by TEXT, decided_at REAL, note TEXT, settings TEXT, stage TEXT, message TEXT, pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, started_at REAL, finished_at REAL, updated REAL NOT NULL,
    PRIMARY KEY (run, id));
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, id TEXT NOT NULL, action TEXT NOT NULL,
    by TEXT NOT NULL, at REAL NOT NULL, note TEXT, settings TEXT);
"""


def _row(r) -> dict:
    d = dict(r)
    d["subjects"] = json.loads(d["subjects"])
    d["settings"] = json.loads(d["settings"]) if d["settings"] else {}
    return d


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        with opened(self.root) as con:
            con.executescript(_SCHEMA)

    def get(self, run: str, rid: str) -> dict | None:
        with opened(self.root) as con:
            r = con.execute("SELECT * FROM requests WHERE run=? AND id=?", (run, rid)).fetchone()
        return _row(r) if r else None

    def list(self, run: str | None = None, states: tuple[str, ...] | None = None) -> list[dict]:
        q, args = "SELECT * FROM requests WHERE 1=1", []
        if run is not None:
            q += " AND run=?"
            args.append(run)
        if states:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        with opened(self.root) as con:
            return [_row(r) for r in con.execute(q + " ORDER BY filed_at DESC", args)]

    def file(self, run: str, rid: str, kind: str, site: str, subjects: list[str], reason: str, filed_by: str) -> dict:
        """Record a new request; one that was rejected before may be filed again."""
        now = time.time()
        with opened(self.root) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                old = con.execute("SELECT state FROM requests WHERE run=? AND id=?", (run, rid)).fetchone()
                if old is not None and old["state"] != "rejected":
                    raise ConfigError(f"request {rid} was already filed (state: {old['state']})")
                con.execute("INSERT OR REPLACE INTO requests (run, id, kind, site, subjects, reason, filed_by, "
                            "filed_at, state, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'filed', ?)",
                            (run, rid, kind, site, json.dumps(subjects), reason, filed_by, now, now))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return self.get(run, rid)

    def _transition(self, run: str, rid: str, allowed: tuple[str, ...], **fields) -> dict:
        """Set ``fields`` only if the request is in one of ``allowed`` states (atomic)."""
        fields["updated"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with opened(self.root) as con:
            n = con.execute(f"UPDATE requests SET {sets} WHERE run=? AND id=? AND state IN "
                            f"({','.join('?' * len(allowed))})", [*fields.values(), run, rid, *allowed]).rowcount
        if not n:
            cur = self.get(run, rid)
            raise ConfigError(f"request {rid} is {cur['state'] if cur else 'unknown'}: "
                              f"only a request that is {' or '.join(allowed)} can be changed this way")
        return self.get(run, rid)

    def approve(self, run: str, rid: str, officer: str, settings: dict, note: str = "") -> dict:
        """Approve (or, after a failed verification or a failure, retry with new settings); each is
        a decision of its own in :meth:`decisions` (the first approval is not overwritten by a retry)."""
        cur = self.get(run, rid)
        rec = self._transition(run, rid, ("filed", "verification-failed", "failed"), state="queued",
                               decided_by=officer, decided_at=time.time(), note=note, settings=json.dumps(settings),
                               message="queued: waiting for the run", attempts=0)
        self._decide(run, rid, "approved" if cur and cur["state"] == "filed" else "retried", officer, note, settings)
        return rec

    def reject(self, run: str, rid: str, officer: str, note: str) -> dict:
        rec = self._transition(run, rid, ("filed",), state="rejected", decided_by=officer, decided_at=time.time(),
                               note=note, finished_at=time.time())
        self._decide(run, rid, "rejected", officer, note, None)
        return rec

    def _decide(self, run: str, rid: str, action: str, by: str, note: str, settings: dict | None) -> None:
        with opened(self.root) as con:
            con.execute("INSERT INTO decisions (run, id, action, by, at, note, settings) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (run, rid, action, by, time.time(), note, json.dumps(settings) if settings is not None
                         else None))

    def decisions(self, run: str, rid: str) -> list[dict]:
        """Every decision on the request (approved, rejected, retried), oldest first."""
        with opened(self.root) as con:
            rows = con.execute("SELECT action, by, at, note, settings FROM decisions WHERE run=? AND id=? ORDER BY seq",
                               (run, rid)).fetchall()
        return [{**dict(r), "settings": json.loads(r["settings"]) if r["settings"] else {}} for r in rows]

    def start(self, run: str, rid: str, pid: int) -> dict:
        cur = self.get(run, rid)
        return self._transition(run, rid, ("queued",), state="running", pid=pid, started_at=time.time(),
                                attempts=(cur or {}).get("attempts", 0) + 1, message="starting")

    def set_pid(self, run: str, rid: str, pid: int) -> None:
        with opened(self.root) as con:
            con.execute("UPDATE requests SET pid=? WHERE run=? AND id=?", (pid, run, rid))

    def stage(self, run: str, rid: str, stage: str, message: str) -> None:
        """Record the stage a job reports; never raises into the erasure it reports on."""
        with opened(self.root) as con:
            con.execute("UPDATE requests SET stage=?, message=?, updated=? WHERE run=? AND id=? AND state='running'",
                        (stage, message[:2000], time.time(), run, rid))

    def requeue(self, run: str, rid: str, message: str) -> dict:
        return self._transition(run, rid, ("running",), state="queued", pid=None, message=message[:2000])

    def finish(self, run: str, rid: str, state: str, message: str) -> dict:
        if state not in FINAL:
            raise ConfigError(f"{state!r} is not a final state")
        return self._transition(run, rid, ("running",), state=state, pid=None, message=message[:2000],
                                finished_at=time.time())
