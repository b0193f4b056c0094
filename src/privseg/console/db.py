"""The console's own SQLite file, beside the runs: ``<runs>/.console/console.db``.

Accounts, sessions, login attempts and the filed/approved requests live here; what an erasure
did lives only in the run's erasure ledger. The folder starts with a dot so ``privseg runs list``
and the console's run list never take it for a run.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONSOLE_DIR = ".console"


def console_dir(root: str | Path) -> Path:
    d = Path(root) / CONSOLE_DIR
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def connect(root: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (each write its own transaction); WAL so pages can read
    while a job records its stages."""
    con = sqlite3.connect(console_dir(root) / "console.db", timeout=30, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.row_factory = sqlite3.Row
    return con


def secret_key(root: str | Path) -> bytes:
    """The key that signs session cookies: made once, readable by the owner only."""
    path = console_dir(root) / "secret.key"
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another console process made it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


@contextmanager
def opened(root: str | Path) -> Iterator[sqlite3.Connection]:
    con = connect(root)
    try:
        yield con
    finally:
        con.close()
