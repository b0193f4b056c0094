"""The erasure ledger: an append-only, hash-chained record of every erasure request.

One SQLite file per run, federated or central (``runs/<name>/erasure/ledger.db``). Each row is one
event of one request (``requested``, ``local_unlearned``, ``repaired``, ``site_removed``,
``verified``, ``completed``, ``failed``) with a JSON body. The ledger is written ahead: a stage
appends ``started`` (body ``{"stage": <its end event>, ...}``) when it begins and its own event
when it ends, so every row's time is when it happened and a process killed mid-stage leaves a
record of the stage it was in (:func:`open_stage`). Row ``n`` stores

    hash_n = SHA-256( hash_{n-1} || canonical JSON of (seq, request, event, at, body) )

with ``hash_0`` = 64 zeros, so changing, removing or re-ordering any earlier row breaks every
hash after it (:meth:`ErasureLedger.verify`). SQLite triggers refuse ``UPDATE`` and ``DELETE``
on the table: the file can only grow through this API (a determined attacker with the file
can still rewrite it; the chain makes that detectable against any copy of a later hash, e.g.
the one printed on a certificate).

Each append is one ``BEGIN IMMEDIATE`` transaction (WAL journal), so a crash leaves either the
whole row or nothing, and two processes cannot interleave half-rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from privseg.errors import ConfigError, DataError

GENESIS = "0" * 64
EVENTS = ("requested", "started", "local_unlearned", "repaired", "site_removed", "verified", "personalised",
          "completed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    request TEXT NOT NULL,
    event TEXT NOT NULL,
    at TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS entries_request ON entries(request);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the erasure ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the erasure ledger is append-only'); END;
"""


def canonical(obj) -> str:
    """The JSON text that is hashed: sorted keys, no whitespace, non-finite floats as strings."""
    return json.dumps(_finite(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def entry_hash(prev_hash: str, seq: int, request: str, event: str, at: str, body: dict) -> str:
    payload = canonical({"seq": seq, "request": request, "event": event, "at": at, "body": body})
    return hashlib.sha256((prev_hash + payload).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ErasureLedger:
    """Append-only, hash-chained erasure events of one run."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise DataError(self.path, "no erasure ledger here")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DataError(self.path, f"not a readable erasure ledger ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    # -- writing -------------------------------------------------------------------
    def append(self, request: str, event: str, body: dict) -> dict:
        """Append one event; returns the stored row."""
        return self.append_many([(request, event, body)])[0]

    def append_many(self, events: Iterable[tuple[str, str, dict]]) -> list[dict]:
        """Append ``(request, event, body)`` events in order, chained, in one transaction (all or
        none: a bulk import, or a benchmark's ledger of 10,000 rows); returns the stored rows."""
        events = list(events)
        unknown = sorted({e for _, e, _ in events} - set(EVENTS))
        if unknown:
            raise ConfigError(f"unknown ledger event(s) {', '.join(map(repr, unknown))}")
        con = self._connect()
        rows = []
        try:
            con.execute("BEGIN IMMEDIATE")
            last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            for request, event, body in events:
                at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
                body = json.loads(canonical(body))  # what is stored is exactly what was hashed
                h = entry_hash(prev, seq, request, event, at, body)
                con.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (seq, request, event, at, canonical(body), prev, h))
                rows.append({"seq": seq, "request": request, "event": event, "at": at, "body": body,
                             "prev_hash": prev, "hash": h})
                seq, prev = seq + 1, h
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return rows

    # -- reading -------------------------------------------------------------------
    def entries(self, request: str | None = None) -> list[dict]:
        con = self._connect()
        try:
            q = "SELECT seq, request, event, at, body, prev_hash, hash FROM entries"
            rows = (con.execute(q + " WHERE request = ? ORDER BY seq", (request,)) if request
                    else con.execute(q + " ORDER BY seq")).fetchall()
        finally:
            con.close()
        return [{"seq": s, "request": r, "event": e, "at": a, "body": json.loads(b), "prev_hash": p, "hash": h}
                for s, r, e, a, b, p, h in rows]

    def events(self, request: str) -> dict[str, dict]:
        """The latest entry of each event of one request."""
        return {e["event"]: e for e in self.entries(request)}

    def requests(self) -> list[dict]:
        """One summary per request: ID, kind, site, subjects, status (its latest event), last hash."""
        out: dict[str, dict] = {}
        for e in self.entries():
            fold_request(out, e)
        return list(out.values())

    def erased_subjects(self, site: str | None = None) -> dict[str, str]:
        """Subject ID -> request ID, for every completed patient erasure (of ``site``)."""
        return erased_in(self.requests(), site)

    def verify(self) -> tuple[bool, list[str]]:
        """Recompute the hash chain; returns (intact, problems)."""
        problems: list[str] = []
        prev = GENESIS
        expected_seq = 1
        try:
            rows = self.entries()
        except sqlite3.DatabaseError as exc:
            return False, [f"{self.path}: unreadable ({exc})"]
        for e in rows:
            problems += check_row(e, prev, expected_seq)
            prev, expected_seq = e["hash"], e["seq"] + 1
        return not problems, problems

    @property
    def head(self) -> str:
        rows = self.entries()
        return rows[-1]["hash"] if rows else GENESIS


def check_row(e: dict, prev: str, expected_seq: int) -> list[str]:
    """The chain problems of one row, given the previous row's hash and the expected sequence
    number (shared by :meth:`ErasureLedger.verify` and the console's incremental check)."""
    problems = []
    if e["seq"] != expected_seq:
        problems.append(f"row {e['seq']}: sequence gap (expected {expected_seq})")
    if e["prev_hash"] != prev:
        problems.append(f"row {e['seq']}: previous-hash link broken")
    h = entry_hash(e["prev_hash"], e["seq"], e["request"], e["event"], e["at"], e["body"])
    if h != e["hash"]:
        problems.append(f"row {e['seq']} ({e['request']} {e['event']}): content does not match its hash")
    return problems


def fold_request(out: dict[str, dict], e: dict) -> None:
    """Fold one entry into the per-request summaries ``out`` (see :meth:`ErasureLedger.requests`)."""
    r = out.setdefault(e["request"], {"request": e["request"], "events": []})
    r["events"].append(e["event"])
    r["status"], r["at"], r["hash"] = e["event"], e["at"], e["hash"]
    if e["event"] == "started":  # begun, not (yet) ended: running now, or killed mid-stage
        r["status"] = f"{e['body'].get('stage')} started"
    if e["event"] == "requested":
        b = e["body"]
        r.update(kind=b.get("kind"), site=b.get("site"), subjects=b.get("subjects", []),
                 reason=b.get("reason"), requested_at=e["at"])
    if e["event"] == "verified":
        r["passed"] = e["body"].get("passed")


def open_stage(entries: list[dict]) -> dict | None:
    """The ``started`` entry of a stage that never ended (the process running it now, or killed in
    it), among one request's entries; None when every stage begun has ended."""
    last = entries[-1] if entries else None
    return last if last is not None and last["event"] == "started" else None


def latest(entries: list[dict], event: str) -> dict | None:
    """The newest ``event`` entry among one request's entries, or None."""
    return next((e for e in reversed(entries) if e["event"] == event), None)


def latest_after(entries: list[dict], event: str, than: str) -> dict | None:
    """The newest ``event`` entry when it is newer than the newest ``than`` entry (the stage ran
    since), else None."""
    e, t = latest(entries, event), latest(entries, than)
    return e if e is not None and (t is None or e["seq"] > t["seq"]) else None


def artefact(run_dir: Path, path: str | Path) -> dict:
    """A file of the run as the ledger records it: its path relative to the run folder and its SHA-256."""
    return {"path": str(Path(path).resolve().relative_to(Path(run_dir).resolve())), "sha256": file_sha256(path)}


def erased_in(requests: Iterable[dict], site: str | None = None) -> dict[str, str]:
    """Subject ID -> request ID, for every completed patient erasure (of ``site``) among request summaries."""
    done = {r["request"]: r for r in requests if "completed" in r["events"] and r.get("kind") == "patient"}
    return {s: rid for rid, r in done.items() if site is None or r.get("site") == site for s in r["subjects"]}


def find_ledgers(paths: Iterable[str | Path]) -> list[Path]:
    """Ledger files named directly or found under run folders."""
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif (p / "erasure" / "ledger.db").is_file():
            out.append(p / "erasure" / "ledger.db")
        elif p.is_dir():
            out.extend(sorted(p.glob("*/erasure/ledger.db")))
    return out


def verify_ledgers(paths: Iterable[str | Path]) -> list[dict]:
    """Recompute the hash chain of every ledger named or found under ``paths``: per ledger its
    ``path``, ``ok``, ``entries`` (None when broken), ``head`` and ``problems``."""
    paths = [Path(p) for p in paths]
    found = find_ledgers(paths)
    if not found:
        raise DataError(paths[0] if paths else Path("."), "no erasure ledger (erasure/ledger.db) here")
    checks = []
    for p in found:
        led = ErasureLedger(p, create=False)
        ok, problems = led.verify()
        checks.append({"path": p, "ok": ok, "entries": len(led.entries()) if ok else None, "head": led.head,
                       "problems": problems})
    return checks
