"""The console's web app (Starlette, server-rendered Jinja2 pages, one small vendored script).

Every page goes through :func:`_guard`: a live session (signed cookie -> server-side row), the
role the page allows, and for a form a size-capped URL-encoded body with the session's CSRF
token. Run and request names from the URL are resolved only through :mod:`privseg.console.runs`;
a site-scoped user gets the same 403 for another site's page as for one that does not exist,
so nothing about other sites leaks.
"""

from __future__ import annotations

import html
import secrets
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote

from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from privseg.console import erasure, runs
from privseg.console.accounts import Accounts, Session, User
from privseg.console.db import secret_key
from privseg.console.jobs import JobRunner
from privseg.console.store import OPEN, Store
from privseg.errors import ConfigError, PrivsegError

HERE = Path(__file__).parent
COOKIE, LOGIN_COOKIE = "privseg_session", "privseg_login"
MAX_BODY = 16 * 1024  # bytes of one form; a larger one is refused with 413
MAX_FIELD = {"reason": 2000, "note": 2000, "username": 64, "password": 1024}
MAX_OTHER_FIELD = 200
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
PAGE = 50  # rows of a request list or of the ledger per page
STAGES = {"patient": ("requested", "local_unlearned", "repaired", "verified", "completed"),
          "site": ("requested", "site_removed", "verified", "completed")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The run's own HTML report and certificates carry inline styles and embedded images; they may
# not run scripts or load anything.
DOC_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


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

    # -- access -----------------------------------------------------------------------------
    def run_for(self, ctx: Ctx, name: str) -> tuple[Path, dict]:
        d = runs.resolve_run(self.root, name)
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
        from privseg.audit.ledger import ErasureLedger

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


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read_form(request: Request) -> dict[str, list[str]]:
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


def _secure_headers(resp: Response, csp: str = CSP) -> Response:
    resp.headers.setdefault("content-security-policy", csp)
    resp.headers["x-content-type-options"] = "nosniff"
    resp.headers["x-frame-options"] = "DENY"
    resp.headers["referrer-policy"] = "no-referrer"
    resp.headers.setdefault("cache-control", "no-store")
    return resp


def create_app(root: str | Path, *, secure: bool = False, idle_minutes: float = 30, max_hours: float = 12,
               jobs: bool = True) -> Starlette:
    """The console over the run folders in ``root``. ``secure``: served over TLS (cookies get
    the Secure flag). ``jobs``: run approved erasures (off only in tests of the pages alone)."""
    c = Console(Path(root), secure=secure, idle_minutes=idle_minutes, max_hours=max_hours, jobs=jobs)

    def set_cookie(resp: Response, name: str, value: str, max_age: int | None) -> None:
        resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict", secure=c.secure)

    def current(request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            sid = c.signer.loads(raw, max_age=c.max_age_s)
        except BadSignature:
            return None
        return c.accounts.session(str(sid), c.idle_s, c.max_age_s)

    def guard(handler, roles=("officer", "site", "viewer"), post: bool = False):
        async def endpoint(request: Request) -> Response:
            ctx = None
            try:
                form = await _read_form(request) if post else {}
                session = await run_in_threadpool(current, request)
                if session is None:
                    expired = bool(request.cookies.get(COOKIE))
                    if post:
                        raise HTTPError(401, ("Your session has expired" if expired else "You are not logged in")
                                        + ": log in again. Nothing was changed.")
                    nxt = quote(request.url.path, safe="/")
                    return _secure_headers(RedirectResponse(f"/login?next={nxt}{'&expired=1' if expired else ''}",
                                                            status_code=303))
                ctx = Ctx(request, session.user, session, form)
                if session.user.role not in roles:
                    raise forbidden()
                if post and not secrets.compare_digest(ctx.one("csrf").encode(), session.csrf.encode()):
                    raise HTTPError(403, "The form's security token is missing or wrong (an old page, or a "
                                         "form from another site). Reload the page and try again. Nothing was changed.")
                resp = await run_in_threadpool(handler, ctx)
            except HTTPError as exc:
                resp = c.message(ctx, exc.status, exc.message)
            except PrivsegError as exc:
                resp = c.message(ctx, 400, f"{exc} Nothing was changed.")
            return _secure_headers(resp)

        return endpoint

    # -- login ---------------------------------------------------------------------------------
    def safe_next(nxt: str) -> str:
        return nxt if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/runs"

    async def login_page(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = c.page(None, "login.html", token=token, next=safe_next(request.query_params.get("next", "/runs")),
                      expired=request.query_params.get("expired") == "1", error=None)
        set_cookie(resp, LOGIN_COOKIE, c.signer.dumps(token), 600)
        return _secure_headers(resp)

    async def login(request: Request) -> Response:
        try:
            form = await _read_form(request)
        except HTTPError as exc:
            return _secure_headers(c.message(None, exc.status, exc.message))
        get = lambda k: (form.get(k) or [""])[0]  # noqa: E731
        try:
            expected = c.signer.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=600)
        except BadSignature:
            expected = None
        nxt = safe_next(get("next"))
        token = secrets.token_urlsafe(24)

        def again(status: int, error: str) -> Response:
            resp = c.page(None, "login.html", status=status, token=token, next=nxt, expired=False, error=error)
            set_cookie(resp, LOGIN_COOKIE, c.signer.dumps(token), 600)
            return _secure_headers(resp)

        if expected is None or not secrets.compare_digest(str(expected).encode(), get("csrf").encode()):
            return again(403, "The login form expired; please try again.")
        name, password = get("username").strip(), get("password")
        wait = await run_in_threadpool(c.accounts.throttled, name, _client(request))
        if wait > 0:
            return again(429, f"Too many failed attempts: try again in {int(wait // 60) + 1} minute(s).")
        user = await run_in_threadpool(c.accounts.authenticate, name, password, _client(request))
        if user is None:
            return again(401, "Wrong user name or password.")
        session = await run_in_threadpool(c.accounts.open_session, user)
        resp = RedirectResponse(nxt, status_code=303)
        set_cookie(resp, COOKIE, c.signer.dumps(session.id), int(c.max_age_s))
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return _secure_headers(resp)

    def logout(ctx: Ctx) -> Response:
        c.accounts.close_session(ctx.session.id)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # -- runs ------------------------------------------------------------------------------------
    def runs_page(ctx: Ctx) -> Response:
        return c.page(ctx, "runs.html", runs=runs.list_runs(c.root, ctx.user))

    def run_page(ctx: Ctx) -> Response:
        from privseg.console.svg import line_chart

        d, s = c.run_for(ctx, ctx.param("run"))
        rows, curves = runs.rounds_view(s, ctx.user)
        chart = line_chart(curves, title="Dice per site after each round", ylabel="mean Dice", ymin=0.0)
        return c.page(ctx, "run.html", run=s, rows=rows, chart=chart,
                      report=s["has_report"] and ctx.user.site is None)

    def report_page(ctx: Ctx) -> Response:
        d, s = c.run_for(ctx, ctx.param("run"))
        if ctx.user.site is not None:
            raise forbidden()  # the report shows every site's patients
        if not s["has_report"]:
            raise HTTPError(404, "This run has no report.html (write one with `privseg report`).")
        return _secure_headers(FileResponse(d / "report.html", media_type="text/html"), DOC_CSP)

    def budget_page(ctx: Ctx) -> Response:
        from privseg.console.svg import line_chart

        d, s = c.run_for(ctx, ctx.param("run"))
        rows = runs.budgets(d, s, ctx.user)
        charts = [line_chart({r["site"]: [(float(x), float(y)) for x, y in r["rounds_booked"]]},
                             title=f"ε spent by site {r['site']}", ylabel="ε", hline=r["epsilon_budget"],
                             hlabel=f"budget {r['epsilon_budget']:g}", ymin=0.0) for r in rows]
        return c.page(ctx, "budget.html", run=s, rows=rows, charts=charts, dp=s["dp"])

    # -- patients and requests -----------------------------------------------------------------
    def visible_requests(ctx: Ctx, d: Path, run: str, records: list[dict] | None = None) -> list[dict]:
        """Console records and ledger-only (CLI) requests of one run that the user may see
        (``records``: the run's console records, when already read)."""
        from privseg.console.cache import ledger_view

        recs = {r["id"]: r for r in (c.store.list(run) if records is None else records)
                if ctx.user.sees_site(r["site"])}
        path = erasure.ledger_path(d)
        ledger = ledger_view(path).requests if path.exists() else {}
        out = []
        for rid, r in recs.items():
            out.append({**r, "ledger_status": (ledger.get(rid) or {}).get("status")})
        for rid, r in ledger.items():
            if rid not in recs and r.get("site") and ctx.user.sees_site(r["site"]):
                out.append({"id": rid, "run": run, "kind": r.get("kind"), "site": r.get("site"),
                            "subjects": r.get("subjects", []), "reason": r.get("reason") or "", "state": "cli",
                            "filed_by": "command line", "filed_at": None, "ledger_status": r.get("status")})
        return out

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

    def patients_page(ctx: Ctx) -> Response:
        d, s = c.run_for(ctx, ctx.param("run"))
        site = ctx.user.site or ctx.request.query_params.get("site") or (s["sites"][0] if s["sites"] else "")
        if site not in s["sites"]:
            if ctx.user.site is not None:
                raise forbidden()
            raise HTTPError(404, "No such site in this run.")
        open_scans = {x: r["id"] for r in c.store.list(s["name"], states=OPEN) if r["site"] == site
                      for x in r["subjects"]}
        patients = erasure.patients(d, site)
        # a request names scans (each patient's every scan): the patient is pending if one of them is
        pending = {p["id"]: rid for p in patients for scan in p["scans"] if (rid := open_scans.get(scan["id"]))}
        return c.page(ctx, "patients.html", run=s, site=site, patients=patients, pending=pending)

    def requests_page(ctx: Ctx) -> Response:
        d, s = c.run_for(ctx, ctx.param("run"))
        return c.page(ctx, "requests.html", run=s, **paged(ctx, visible_requests(ctx, d, s["name"])))

    def inbox_page(ctx: Ctx) -> Response:
        records: dict[str, list[dict]] = {}
        for r in c.store.list():  # one query for every run
            records.setdefault(r["run"], []).append(r)
        items = []
        for s in runs.list_runs(c.root, ctx.user):
            items += visible_requests(ctx, c.root / s["name"], s["name"], records.get(s["name"], []))
        items.sort(key=lambda r: (r["state"] not in ("filed",), -(r.get("filed_at") or 0)))
        return c.page(ctx, "inbox.html", **paged(ctx, items))

    def file_request(ctx: Ctx) -> Response:
        d, s = c.run_for(ctx, ctx.param("run"))
        kind, site = ctx.one("kind", "patient"), ctx.one("site").strip()
        subjects = [x.strip() for x in ctx.form.get("subject", []) if x.strip()]
        reason = ctx.one("reason").strip()
        if ctx.user.role == "site" and (kind != "patient" or site != ctx.user.site):
            raise forbidden()  # a site files only for patients of its own site
        if kind not in ("patient", "site"):
            raise HTTPError(400, "Unknown kind of request. Nothing was changed.")
        if kind == "site" and subjects:
            raise HTTPError(400, "A whole-site request names no patients. Nothing was changed.")
        if kind == "patient" and not subjects:
            raise HTTPError(400, "Choose the patient(s) to erase. Nothing was changed.")
        if not reason:
            raise HTTPError(400, "Give the reason for the request (e.g. GDPR art. 17). Nothing was changed.")
        if site not in s["sites"]:
            if ctx.user.site is not None:
                raise forbidden()
            raise HTTPError(400, f"Unknown site {site!r} in this run. Nothing was changed.")
        erasure.check_new(d, kind, site, subjects)
        subjects = erasure.expand(d, kind, site, subjects)  # a patient ID -> every scan of that patient
        rid = erasure.request_id(d, kind, site, subjects)
        if not c.store.list(s["name"], states=("running",)):
            from privseg.federated.runstate import hold_run

            try:  # training or a command-line erasure holds the run: file later
                with hold_run(d, "console check"):
                    pass
            except ConfigError as exc:
                raise HTTPError(409, f"{exc}. Nothing was changed.") from None
        try:
            c.store.file(s["name"], rid, kind, site, subjects, reason, ctx.user.label)
        except ConfigError as exc:
            raise HTTPError(409, f"{exc}. Nothing was changed.") from None
        return RedirectResponse(f"/runs/{quote(s['name'])}/requests/{rid}", status_code=303)

    def request_page(ctx: Ctx) -> Response:
        from privseg.console.svg import bar_chart

        d, s = c.run_for(ctx, ctx.param("run"))
        rec, entries = c.request_for(ctx, d, s["name"], ctx.param("rid"))
        ver = next((e["body"] for e in reversed(entries) if e["event"] == "verified"), None)
        figure = None
        if ver:
            models = [m for m in ("before", "after", "retrain") if isinstance(ver.get(m), dict)]
            figure = bar_chart({k: {m: ver[m].get(k) for m in models} for k in ("mia_auc", "retain_dice", "test_dice")},
                               title="Verification", limit=(ver.get("thresholds") or {}).get("max_mia_auc"),
                               limit_label="max AUC")
        kind = rec["kind"] if rec else next(e["body"].get("kind") for e in entries if e["event"] == "requested")
        done = {e["event"] for e in entries}
        return c.page(ctx, "request.html", run=s, rec=rec, rid=ctx.param("rid"), entries=entries, ver=ver,
                      figure=figure, stages=[(st, st in done) for st in STAGES.get(kind, ())],
                      defaults=erasure.default_thresholds(), open_states=OPEN)

    def status_json(ctx: Ctx) -> Response:
        d, s = c.run_for(ctx, ctx.param("run"))
        rec, entries = c.request_for(ctx, d, s["name"], ctx.param("rid"))
        return JSONResponse({"state": rec["state"] if rec else "cli", "stage": rec.get("stage") if rec else None,
                             "message": rec.get("message") if rec else None,
                             "final": rec is None or rec["state"] not in OPEN,
                             "events": [{"event": e["event"], "at": e["at"]} for e in entries]})

    def decide(ctx: Ctx, approve: bool) -> Response:
        d, s = c.run_for(ctx, ctx.param("run"))
        rid = ctx.param("rid")
        rec, _ = c.request_for(ctx, d, s["name"], rid)
        if rec is None:
            raise HTTPError(409, "This request was made on the command line; finish it there. Nothing was changed.")
        note = ctx.one("note").strip()
        if approve:
            settings = erasure.clean_settings({k: ctx.one(k) for k in ctx.form})
            erasure.check_settings(rec["kind"], rec["site"], rec["subjects"], settings)
            if rec["state"] == "filed":
                erasure.check_new(d, rec["kind"], rec["site"], rec["subjects"])  # still valid now?
            c.store.approve(s["name"], rid, ctx.user.label, settings, note)
            if c.runner is not None:
                c.runner.wake()
        else:
            if not note:
                raise HTTPError(400, "Say why the request is rejected. Nothing was changed.")
            c.store.reject(s["name"], rid, ctx.user.label, note)
        return RedirectResponse(f"/runs/{quote(s['name'])}/requests/{rid}", status_code=303)

    def certificate(ctx: Ctx) -> Response:
        from privseg.audit.certificate import render_html, summarise
        from privseg.console.cache import ledger_view
        from privseg.utils import write_json

        d, s = c.run_for(ctx, ctx.param("run"))
        rid, fmt = ctx.param("rid"), ctx.param("fmt")
        rec, entries = c.request_for(ctx, d, s["name"], rid)
        if fmt not in ("html", "json"):
            raise HTTPError(404, "Certificates come as .html or .json.")
        if not entries:
            raise HTTPError(409, "The erasure has not started: there is no certificate yet.")
        path = erasure.ledger_path(d)
        view = ledger_view(path)
        # what write_certificate writes, with the chain check of the ledger view (a full re-hash of
        # the ledger per download made this page slow); test_console checks the two agree
        s_ = summarise(entries)
        if fmt == "html":
            data = render_html(s_, view.ok, view.problems, str(path)).encode()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_json(Path(tmp) / "c.json", {"certificate": s_, "ledger": str(path), "chain_intact": view.ok,
                                                  "chain_problems": view.problems, "entries": entries})
                data = (Path(tmp) / "c.json").read_bytes()
        resp = Response(data, media_type="text/html" if fmt == "html" else "application/json",
                        headers={"content-disposition": f'attachment; filename="{rid}.{fmt}"'})
        return _secure_headers(resp, DOC_CSP)

    def ledger_page(ctx: Ctx) -> Response:
        from privseg.console.cache import ledger_view

        d, s = c.run_for(ctx, ctx.param("run"))
        path = erasure.ledger_path(d)
        if not path.exists():
            return c.page(ctx, "ledger.html", run=s, exists=False)
        try:
            view = ledger_view(path)
        except sqlite3.DatabaseError as exc:
            return c.page(ctx, "ledger.html", run=s, exists=True, ok=False, checked=0, new=0, took=0.0,
                          problems=[f"unreadable ({exc})" if ctx.user.site is None else "the ledger is unreadable"],
                          head="", n=0, shown=[], page=1, pages=1)
        problems = view.problems
        seqs = view.all_seqs
        if ctx.user.site is not None:  # the site's requests only
            seqs = view.seqs_of_site(ctx.user.site)
            problems = [f"{len(problems)} problem(s) found; the privacy officer sees the details"] if problems else []
        p = paged(ctx, seqs[::-1])  # newest first
        return c.page(ctx, "ledger.html", run=s, exists=True, ok=view.ok, problems=problems, took=view.check_s,
                      checked=view.n, new=view.checked_new, head=view.head,
                      **{**p, "shown": view.rows(p["shown"])})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _secure_headers(Response("not found", status_code=404, media_type="text/plain"))
        resp = FileResponse(HERE / "static" / name, media_type=STATIC[name])
        resp.headers["cache-control"] = "max-age=3600"
        return _secure_headers(resp)

    async def home(request: Request) -> Response:
        return _secure_headers(RedirectResponse("/runs", status_code=303))

    officer, writers = ("officer",), ("officer", "site")
    routes = [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", guard(logout, post=True), methods=["POST"]),
        Route("/static/{name}", static),
        Route("/runs", guard(runs_page)),
        Route("/requests", guard(inbox_page)),
        Route("/runs/{run}", guard(run_page)),
        Route("/runs/{run}/report", guard(report_page)),
        Route("/runs/{run}/budget", guard(budget_page)),
        Route("/runs/{run}/patients", guard(patients_page, writers)),
        Route("/runs/{run}/requests", guard(requests_page), methods=["GET"]),
        Route("/runs/{run}/requests", guard(file_request, writers, post=True), methods=["POST"]),
        Route("/runs/{run}/requests/{rid}", guard(request_page)),
        Route("/runs/{run}/requests/{rid}/status", guard(status_json)),
        Route("/runs/{run}/requests/{rid}/approve", guard(lambda ctx: decide(ctx, True), officer, post=True),
              methods=["POST"]),
        Route("/runs/{run}/requests/{rid}/reject", guard(lambda ctx: decide(ctx, False), officer, post=True),
              methods=["POST"]),
        Route("/runs/{run}/requests/{rid}/certificate.{fmt}", guard(certificate)),
        Route("/runs/{run}/ledger", guard(ledger_page)),
    ]

    async def not_found(request: Request, exc) -> Response:
        return _secure_headers(HTMLResponse(f"<!DOCTYPE html><title>Not found</title><p>{html.escape('Not found.')}"
                                            "</p><p><a href='/runs'>Runs</a></p>", status_code=exc.status_code))

    def startup() -> None:
        import threading

        from privseg.console.cache import warm

        threading.Thread(target=warm, args=(c.root,), name="console-warm", daemon=True).start()
        if c.runner is not None:
            c.runner.start()

    def shutdown() -> None:
        if c.runner is not None:
            c.runner.stop()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        startup()
        try:
            yield
        finally:
            shutdown()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.console = c
    return app
