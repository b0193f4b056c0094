"""What the console's pages read, kept per process and keyed by the state of the file it comes
from, so that a page costs a ``stat`` (and for a ledger one indexed query) when nothing changed.

Nothing here is approximate: every entry is recomputed, with the project's own functions, as
soon as its file's state differs, so a page shows exactly what a fresh read would.

- run summaries (``fl_config.json``, ``state.json``, ``report.html``) and cohorts: by the files'
  (inode, size, mtime);
- a privacy ledger's per-site status (ε recomputed from every booked event by the accountant,
  :meth:`BudgetLedger.status`): by the SQLite file and its WAL, plus the row count and latest
  booking time of its tables (a rewrite inside one mtime tick still changes those);
- an erasure ledger (:class:`LedgerView`): request summaries, the rows of each request, and the
  hash-chain check. The ledger is append-only, so when it grew only the new rows are parsed and
  hashed; that the rows checked before are unchanged is confirmed by a SHA-256 over their
  stored text (no JSON parsing, no chain hashing), and any difference there -- a tampered or
  replaced file -- makes the check start again from the first row. The result is therefore the
  same as :meth:`ErasureLedger.verify` on the whole file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from privseg.audit.ledger import GENESIS, check_row, erased_in, fold_request
from privseg.console.folders import run_dirs
from privseg.federated.sites import read_site_cohort
from privseg.privacy.budget import BudgetLedger, find_ledgers

MAX_ENTRIES = 256  # per kind; a long-running console over many runs keeps the recently used ones


def stat_key(*paths: Path) -> tuple:
    """(inode, size, mtime in ns) of each path, None for a missing one."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def sqlite_key(path: Path) -> tuple:
    # A committed write lands in the -wal file first and reaches the main file at a checkpoint.
    # An empty -wal holds nothing: readers create and delete one, which must not count as a change.
    main, wal = stat_key(path, path.with_name(path.name + "-wal"))
    return main, (wal if wal and wal[1] > 0 else None)


class _Memo:
    """A bounded map name -> (key, value), recomputed when the key differs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: OrderedDict = OrderedDict()

    def get(self, name, key, compute: Callable[[], object]):
        with self._lock:
            hit = self._data.get(name)
            if hit is not None and hit[0] == key:
                self._data.move_to_end(name)
                return hit[1]
        value = compute()
        with self._lock:
            self._data[name] = (key, value)
            self._data.move_to_end(name)
            while len(self._data) > MAX_ENTRIES:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_summaries, _cohorts, _budgets = _Memo(), _Memo(), _Memo()


def run_summary(d: Path, compute: Callable[[Path], dict]) -> dict:
    """``compute(d)`` (a run's summary), recomputed when one of its files changes. Callers must
    not modify the returned dict: it is shared."""
    key = stat_key(d / "fl_config.json", d / "state.json", d / "report.html")
    return _summaries.get(str(d), key, lambda: compute(d))


def cohort(path: str | Path):
    """The cohort at ``path`` (a manifest, or a folder), read once per change of it."""
    p = Path(path)
    key = stat_key(p, p / "cohort.json") if p.is_dir() else stat_key(p)
    return _cohorts.get(str(p.resolve()), key, lambda: read_site_cohort(p))


def budget_status(path: Path) -> list[dict]:
    """Per site of one privacy ledger: :meth:`BudgetLedger.status`, its booked releases in booking
    order (``booked``: round, scope, ε after, time) and its budget decisions (``history``)."""
    def compute() -> list[dict]:
        ledger = BudgetLedger(path)
        return [{**row, "booked": [{k: r[k] for k in ("round", "scope", "epsilon", "time", "steps")}
                                   for r in ledger.rounds(row["site"])],
                 "history": ledger.budget_history(row["site"])} for row in ledger.status()]

    try:
        con = sqlite3.connect(path, timeout=30)
        try:
            content = (con.execute("SELECT count(*), max(time), total(epsilon) FROM releases").fetchone(),
                       con.execute("SELECT count(*), max(time), total(epsilon) FROM budget_log").fetchone())
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return compute()  # not (yet) a ledger: BudgetLedger says why, nothing is cached
    return _budgets.get(str(path.resolve()), (sqlite_key(path), content), compute)


# -- the erasure ledger ----------------------------------------------------------------------

_ROWS = "SELECT seq, request, event, at, body, prev_hash, hash FROM entries"


@dataclass
class LedgerView:
    """What the pages need of one erasure ledger (see the module docstring)."""

    path: Path
    key: tuple = ()
    n: int = 0  # rows checked
    head: str = GENESIS  # hash of the last row
    prefix: str = ""  # SHA-256 of the stored text of the rows checked
    problems: list[str] = field(default_factory=list)
    requests: dict[str, dict] = field(default_factory=dict)  # request ID -> summary, in ledger order
    seqs: dict[str, list[int]] = field(default_factory=dict)  # request ID -> its rows' sequence numbers
    all_seqs: list[int] = field(default_factory=list)
    checked_new: int = 0  # rows parsed and hashed by the last refresh
    check_s: float = 0.0  # how long the last refresh took
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def erased_subjects(self, site: str | None = None) -> dict[str, str]:
        return erased_in(self.requests.values(), site)

    def site_of(self, rid: str) -> str | None:
        return (self.requests.get(rid) or {}).get("site")

    def seqs_of_site(self, site: str) -> list[int]:
        return sorted(s for rid, r in self.requests.items() if r.get("site") == site for s in self.seqs[rid])

    def rows(self, seqs: list[int]) -> list[dict]:
        """The stored rows with these sequence numbers (bodies not parsed), in the given order."""
        if not seqs:
            return []
        con = sqlite3.connect(self.path, timeout=30)
        try:
            got = {r[0]: r for r in con.execute(
                "SELECT seq, request, event, at, hash FROM entries WHERE seq IN "
                f"({','.join('?' * len(seqs))})", seqs)}
        finally:
            con.close()
        return [{"seq": s, "request": r[1], "event": r[2], "at": r[3], "hash": r[4]}
                for s in seqs if (r := got.get(s))]

    def _reset(self) -> None:
        self.n, self.head, self.prefix, self.problems = 0, GENESIS, "", []
        self.requests, self.seqs, self.all_seqs = {}, {}, []

    def refresh(self) -> LedgerView:
        """Bring the view up to the file's present state (nothing read when it is unchanged)."""
        with self.lock:
            t0 = time.perf_counter()
            key = sqlite_key(self.path)
            con = sqlite3.connect(self.path, timeout=30)
            try:
                last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
                if (key, last) == self.key:
                    self.checked_new, self.check_s = 0, time.perf_counter() - t0
                    return self
                raw = con.execute(_ROWS + " ORDER BY seq").fetchall()
            finally:
                con.close()
            digest = hashlib.sha256()
            for row in raw[:self.n]:
                digest.update(_text(row))
            if self.n > len(raw) or digest.hexdigest() != self.prefix:
                self._reset()  # the rows checked before changed: check every row again
                digest = hashlib.sha256()
            prev, expected = self.head, (raw[self.n - 1][0] + 1 if self.n else 1)
            new = raw[self.n:]
            for seq, rid, event, at, body, prev_hash, h in new:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = {"unparsable": body}  # its hash cannot match: reported below
                e = {"seq": seq, "request": rid, "event": event, "at": at, "body": parsed, "prev_hash": prev_hash,
                     "hash": h}
                self.problems += check_row(e, prev, expected)
                prev, expected = h, seq + 1
                fold_request(self.requests, e)
                if event == "requested" and isinstance(parsed, dict):  # who asked (--requested-by), for the inbox
                    self.requests[rid]["requested_by"] = parsed.get("requested_by") or None
                self.seqs.setdefault(rid, []).append(seq)
                self.all_seqs.append(seq)
                digest.update(_text((seq, rid, event, at, body, prev_hash, h)))
            self.n, self.head, self.prefix = len(raw), prev, digest.hexdigest()
            self.checked_new, self.check_s = len(new), time.perf_counter() - t0
            self.key = (key, last)
            return self


def _text(row: tuple) -> bytes:
    return "\x1f".join(map(str, row)).encode() + b"\x1e"


_views_lock = threading.Lock()
_views: OrderedDict[str, LedgerView] = OrderedDict()


def ledger_view(path: Path) -> LedgerView:
    """The up-to-date view of the erasure ledger at ``path`` (which must exist). An unreadable
    file raises :class:`sqlite3.DatabaseError`."""
    name = str(Path(path).resolve())
    with _views_lock:
        view = _views.get(name)
        if view is None:
            view = _views[name] = LedgerView(Path(path))
        _views.move_to_end(name)
        while len(_views) > MAX_ENTRIES:
            _views.popitem(last=False)
    return view.refresh()


def warm(root: Path) -> None:
    """Read every run's erasure and privacy ledgers once, so that the first visitor of a page does
    not wait for a full check of a large ledger (run in a background thread at start-up)."""
    for d in run_dirs(Path(root)):
        try:
            if (d / "erasure" / "ledger.db").is_file():
                ledger_view(d / "erasure" / "ledger.db")
            for p in find_ledgers(d):  # DataError when the run has none: nothing to warm
                budget_status(p)
        except Exception:  # noqa: BLE001 -- a page reading the same file reports what is wrong with it
            continue


def clear() -> None:
    """Forget everything (tests)."""
    for memo in (_summaries, _cohorts, _budgets):
        memo.clear()
    with _views_lock:
        _views.clear()
