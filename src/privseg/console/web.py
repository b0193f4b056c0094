"""What every page of the console shares: the console's state, its access checks, the guard, and
the registry of pages (:data:`PAGES`, filled with :func:`register_pages`).

Every page goes through :meth:`Console.guard`: a live session (signed cookie -> server-side
row), the role the page allows, and for a form a size-capped URL-encoded body with the session's
CSRF token. Run and request names from the URL are resolved only through
:mod:`privseg.console.folders`; a site-scoped user gets the same 403 for another site's page as for
one that does not exist, so nothing about other sites leaks.

Adding a page: in a module of this package whose name ends in ``_page`` or ``_pages`` (the app
imports every such module), a function ``(console) -> list[Route]`` decorated with
``@register_pages("name")``, each route's endpoint wrapped in :meth:`Console.guard`::

    @register_pages("audit")
    def audit_pages(c: Console) -> list[Route]:
        return [Route("/runs/{run}/audit", c.guard(partial(audit_page, c), ("officer",)))]
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from privseg.audit.ledger import ErasureLedger
from privseg.console import erasure, runs
from privseg.console.accounts import Accounts, Session, User
from privseg.console.db import secret_key
from privseg.console.folders import resolve_run
from privseg.console.jobs import JobRunner
from privseg.console.store import Store
from privseg.errors import ConfigError, PrivsegError
from privseg.utils import registrar

HERE = Path(__file__).parent
COOKIE, LOGIN_COOKIE = "privseg_session", "privseg_login"
MAX_BODY = 16 * 1024  # bytes of one form; a larger one is refused with 413
MAX_FIELD = {"reason": 2000, "note": 2000, "username": 64, "password": 1024}
MAX_OTHER_FIELD = 200
PAGE = 50  # rows of a request list or of the ledger per page
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The run's own HTML report and certificates carry inline styles and embedded images; they may
# not run scripts or load anything.
DOC_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
ALL_ROLES = ("officer", "site", "viewer")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def forbidden() -> HTTPError:
    return HTTPError(403, "Forbidden: your account has no access to this page.")


@dataclass
class Ctx:
    request: Request
    user: User
    session: Session
    form: dict[str, list[str]] = field(default_factory=dict)

    def param(self, name: str) -> str:
        return self.request.path_params[name]

    def one(self, name: str, default: str = "") -> str:
        vals = self.form.get(name) or [default]
        return vals[0]


class Console:
    """State shared by the handlers: the runs root, accounts, request store, job runner."""

    def __init__(self, root: Path, *, secure: bool, idle_minutes: float, max_hours: float, jobs: bool):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"--runs {self.root}: no such folder")
        self.accounts, self.store = Accounts(self.root), Store(self.root)
        self.signer = URLSafeTimedSerializer(secret_key(self.root), salt="privseg-console-session")
        self.secure, self.idle_s, self.max_age_s = secure, idle_minutes * 60, max_hours * 3600
        self.runner = JobRunner(self.root) if jobs else None
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["when"] = lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"
        self.env.filters["num"] = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else v)
        self.env.filters["q"] = lambda s: quote(str(s), safe="")

    # -- rendering --------------------------------------------------------------------------
    def page(self, ctx: Ctx | None, name: str, status: int = 200, **kw) -> HTMLResponse:
        body = self.env.get_template(name).render(user=ctx.user if ctx else None,
                                                  csrf=ctx.session.csrf if ctx else "", **kw)
        return HTMLResponse(body, status_code=status)

    def message(self, ctx: Ctx | None, status: int, text: str, back: str | None = None) -> HTMLResponse:
        return self.page(ctx, "message.html", status=status, text=text, back=back, code=status)

    # -- sessions ---------------------------------------------------------------------------
    def set_cookie(self, resp: Response, name: str, value: str, max_age: int | None) -> None:
        resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict", secure=self.secure)

    def current(self, request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            sid = self.signer.loads(raw, max_age=self.max_age_s)
        except BadSignature:
            return None
        return self.accounts.session(str(sid), self.idle_s, self.max_age_s)

    def guard(self, handler, roles=ALL_ROLES, post: bool = False):
        """The endpoint for ``handler(ctx)``: logged in, one of ``roles``, and for a form
        (``post``) a readable body carrying the session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            ctx = None
            try:
                form = await read_form(request) if post else {}
                session = await run_in_threadpool(self.current, request)
                if session is None:
                    expired = bool(request.cookies.get(COOKIE))
                    if post:
                        raise HTTPError(401, ("Your session has expired" if expired else "You are not logged in")
                                        + ": log in again. Nothing was changed.")
                    nxt = quote(request.url.path, safe="/")
                    return secure_headers(RedirectResponse(f"/login?next={nxt}{'&expired=1' if expired else ''}",
                                                           status_code=303))
                ctx = Ctx(request, session.user, session, form)
                if session.user.role not in roles:
                    raise forbidden()
                if post and not secrets.compare_digest(ctx.one("csrf").encode(), session.csrf.encode()):
                    raise HTTPError(403, "The form's security token is missing or wrong (an old page, or a "
                                         "form from another site). Reload the page and try again. Nothing was changed.")
                resp = await run_in_threadpool(handler, ctx)
            except HTTPError as exc:
                resp = self.message(ctx, exc.status, exc.message)
            except PrivsegError as exc:
                resp = self.message(ctx, 400, f"{exc} Nothing was changed.")
            return secure_headers(resp)

        return endpoint

    # -- access -----------------------------------------------------------------------------
    def run_for(self, ctx: Ctx, name: str) -> tuple[Path, dict]:
        d = resolve_run(self.root, name)
        if d is None:
            if ctx.user.site is not None:
                raise forbidden()  # the same answer as for another site's run
            raise HTTPError(404, "No such run.")
        s = runs.summary(d)
        if not runs.can_see_run(ctx.user, s["cfg"]):
            raise forbidden()
        return d, s

    def request_for(self, ctx: Ctx, run_dir: Path, run: str, rid: str) -> tuple[dict | None, list[dict]]:
        """(console record, ledger entries) of one request the user may see; 403/404 otherwise."""
        rec = self.store.get(run, rid) if len(rid) <= 64 else None
        path = erasure.ledger_path(run_dir)
        entries = ErasureLedger(path).entries(rid) if path.exists() and len(rid) <= 64 else []
        site = rec["site"] if rec else next((e["body"].get("site") for e in entries if e["event"] == "requested"),
                                            None)
        if rec is None and not entries:
            if ctx.user.site is not None:
                raise forbidden()
            raise HTTPError(404, "No such request.")
        if site is None or not ctx.user.sees_site(site):
            raise forbidden()
        return rec, entries


def client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def read_form(request: Request) -> dict[str, list[str]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise HTTPError(415, "Forms must be sent URL-encoded.")
    try:
        if int(request.headers.get("content-length", "0")) > MAX_BODY:
            raise HTTPError(413, f"The form is too large (at most {MAX_BODY // 1024} KiB).")
    except ValueError:
        raise HTTPError(400, "Bad Content-Length.") from None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPError(413, f"The form is too large (at most {MAX_BODY // 1024} KiB).")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "The form could not be read.") from None
    for k, vals in form.items():
        limit = MAX_FIELD.get(k, MAX_OTHER_FIELD)
        if any(len(v) > limit for v in vals):
            raise HTTPError(413, f"The field {k!r} is too long (at most {limit} characters). Nothing was changed.")
    return form


def secure_headers(resp: Response, csp: str = CSP) -> Response:
    resp.headers.setdefault("content-security-policy", csp)
    resp.headers["x-content-type-options"] = "nosniff"
    resp.headers["x-frame-options"] = "DENY"
    resp.headers["referrer-policy"] = "no-referrer"
    resp.headers.setdefault("cache-control", "no-store")
    return resp


def paged(ctx: Ctx, items: list) -> dict:
    """One page of ``items`` (``?page=N``, from 1; out of range: the nearest page)."""
    try:
        page_no = int(ctx.request.query_params.get("page", "1"))
    except ValueError:
        page_no = 1
    pages = max(1, -(-len(items) // PAGE))
    page_no = min(max(1, page_no), pages)
    return {"shown": items[(page_no - 1) * PAGE: page_no * PAGE], "page": page_no, "pages": pages,
            "n": len(items)}


Pages = Callable[["Console"], list[Route]]
PAGES: dict[str, Pages] = {}


def register_pages(name: str) -> Callable[[Pages], Pages]:
    """File a function ``(console) -> list[Route]`` (a concern's pages) in :data:`PAGES` under
    ``name``; the app serves the routes of every entry. A name already taken is refused."""
    return registrar(PAGES, name, kind="console page")
