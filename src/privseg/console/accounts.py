"""Console accounts: users with a role, argon2 password hashes, server-side sessions, and
login throttling.

Roles: ``officer`` (every site; approves erasures), ``site`` (one site: its own patients,
requests and budget), ``viewer`` (read-only; every site, or one when given ``site``).
Sessions are rows here; the cookie carries only the signed session ID, so logging out or
removing a user ends the session at once, and an idle or old session is refused.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from privseg.console.db import opened
from privseg.console.folders import known_sites
from privseg.errors import ConfigError
from privseg.utils import check_id

ROLES = ("officer", "site", "viewer")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
# Failed logins allowed per user name (and per client address) within the window before the
# console refuses further attempts until the window has passed.
MAX_FAILURES_USER = 5
MAX_FAILURES_CLIENT = 20
FAILURE_WINDOW_S = 15 * 60

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, site TEXT,
                                  hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL,
                                     created REAL NOT NULL, seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures(key);
"""

_hasher = PasswordHasher()
_DUMMY = _hasher.hash("not a password of anyone")  # unknown users cost the same time as known ones


@dataclass(frozen=True)
class User:
    name: str
    role: str
    site: str | None

    def sees_site(self, site: str) -> bool:
        return self.site is None or self.site == site

    @property
    def describe(self) -> str:
        """"site user of H2", "viewer of site H1", "officer (every site)", "viewer (every site)"."""
        if self.role == "site":
            return f"site user of {self.site}"
        return f"{self.role} " + (f"of site {self.site}" if self.site else "(every site)")

    @property
    def label(self) -> str:
        """How the user is written into the erasure ledger."""
        return f"{self.name} ({self.role}{' ' + self.site if self.site else ''})"


@dataclass(frozen=True)
class Session:
    id: str
    user: User
    csrf: str


class Accounts:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        with opened(self.root) as con:
            con.executescript(_SCHEMA)

    @classmethod
    def of_runs(cls, runs: str | Path) -> Accounts:
        """The accounts of the console over the runs folder ``runs``, which must exist."""
        if not Path(runs).is_dir():
            raise ConfigError(f"--runs {runs}: no such folder")
        return cls(runs)

    # -- users -----------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str, site: str | None = None,
                 replace: bool = False) -> User:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"user name {name!r}: use letters, digits, '_', '.', '@', '-' (at most 64)")
        if role not in ROLES:
            raise ConfigError(f"--role {role!r} is not one of {', '.join(ROLES)}")
        if role == "officer" and site:
            raise ConfigError("an officer sees every site: give no --site")
        if role == "site" and not site:
            raise ConfigError("a site user needs --site (the hospital's site ID)")
        if site:
            check_id(site, "--site")
            sites = known_sites(self.root)
            if sites and site not in sites:  # no run yet: nothing to check against (accounts may come first)
                raise ConfigError(f"--site {site}: no run under {self.root} has this site (sites: "
                                  f"{', '.join(sorted(sites))})")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise ConfigError(f"the password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        with opened(self.root) as con:
            if not replace and con.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise ConfigError(f"user {name} exists (use --replace to change role, site or password)")
            con.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?)",
                        (name, role, site or None, _hasher.hash(password), time.time()))
            con.execute("DELETE FROM sessions WHERE user=?", (name,))  # a changed account logs in again
        return User(name, role, site or None)

    def refuse_existing(self, name: str) -> None:
        """Refuse (ConfigError) a new user ``name`` that exists already (before asking for a password)."""
        if self.get(name) is not None:
            raise ConfigError(f"user {name} exists (use --replace to change role, site or password)")

    def remove_user(self, name: str, missing_ok: bool = True) -> bool:
        """Remove ``name`` (its sessions end at once); False when there was none, or with
        ``missing_ok=False`` a ConfigError."""
        with opened(self.root) as con:
            n = con.execute("DELETE FROM users WHERE name=?", (name,)).rowcount
            con.execute("DELETE FROM sessions WHERE user=?", (name,))
        if not n and not missing_ok:
            raise ConfigError(f"no user {name}")
        return bool(n)

    def users(self) -> list[User]:
        with opened(self.root) as con:
            return [User(r["name"], r["role"], r["site"]) for r in con.execute("SELECT * FROM users ORDER BY name")]

    def get(self, name: str) -> User | None:
        with opened(self.root) as con:
            r = con.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        return User(r["name"], r["role"], r["site"]) if r else None

    # -- login -------------------------------------------------------------------------
    def throttled(self, name: str, client: str) -> float:
        """Seconds until another attempt is allowed for this name or client (0: allowed now)."""
        now = time.time()
        with opened(self.root) as con:
            con.execute("DELETE FROM login_failures WHERE at < ?", (now - FAILURE_WINDOW_S,))
            wait = 0.0
            for key, limit in ((f"user:{name}", MAX_FAILURES_USER), (f"client:{client}", MAX_FAILURES_CLIENT)):
                rows = [r[0] for r in con.execute("SELECT at FROM login_failures WHERE key=? ORDER BY at", (key,))]
                if len(rows) >= limit:
                    wait = max(wait, rows[-limit] + FAILURE_WINDOW_S - now)
            return wait

    def authenticate(self, name: str, password: str, client: str) -> User | None:
        """The user when the password matches; records a failure otherwise. Callers check
        :meth:`throttled` first."""
        with opened(self.root) as con:
            r = con.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
            ok = False
            try:
                ok = _hasher.verify(r["hash"] if r else _DUMMY, password[:MAX_PASSWORD]) and r is not None
            except (VerificationError, InvalidHashError):
                ok = False
            if not ok:
                now = time.time()
                con.executemany("INSERT INTO login_failures VALUES (?, ?)",
                                [(f"user:{name}", now), (f"client:{client}", now)])
                return None
            con.execute("DELETE FROM login_failures WHERE key=?", (f"user:{name}",))
            return User(r["name"], r["role"], r["site"])

    # -- sessions ----------------------------------------------------------------------
    def open_session(self, user: User) -> Session:
        sid, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        with opened(self.root) as con:
            con.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (sid, user.name, csrf, now, now))
        return Session(sid, user, csrf)

    def session(self, sid: str, idle_s: float, max_age_s: float) -> Session | None:
        """The live session ``sid`` (its last-seen time refreshed), or None when unknown, idle
        too long, too old, or its user is gone."""
        now = time.time()
        with opened(self.root) as con:
            r = con.execute("SELECT s.*, u.role, u.site FROM sessions s JOIN users u ON u.name = s.user "
                            "WHERE s.id=?", (sid,)).fetchone()
            if r is None:
                return None
            if now - r["seen"] > idle_s or now - r["created"] > max_age_s:
                con.execute("DELETE FROM sessions WHERE id=?", (sid,))
                return None
            con.execute("UPDATE sessions SET seen=? WHERE id=?", (now, sid))
            return Session(sid, User(r["user"], r["role"], r["site"]), r["csrf"])

    def close_session(self, sid: str) -> None:
        with opened(self.root) as con:
            con.execute("DELETE FROM sessions WHERE id=?", (sid,))
