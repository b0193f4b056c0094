"""Logging in and out: a login form with its own short-lived CSRF cookie, throttled argon2
checks, and a server-side session behind a signed cookie."""

from __future__ import annotations

import secrets

from itsdangerous import BadSignature
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from privseg.console.web import (
    COOKIE,
    LOGIN_COOKIE,
    Console,
    Ctx,
    HTTPError,
    client,
    read_form,
    register_pages,
    secure_headers,
)


def safe_next(nxt: str) -> str:
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"


@register_pages("login")
def register_accounts(c: Console) -> list[Route]:
    """``/login`` (GET: the form, POST: log in) and ``/logout`` (POST, with the session's token)."""

    async def login_page(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = c.page(None, "login.html", token=token, next=safe_next(request.query_params.get("next", "/")),
                      expired=request.query_params.get("expired") == "1", error=None)
        c.set_cookie(resp, LOGIN_COOKIE, c.signer.dumps(token), 600)
        return secure_headers(resp)

    async def login(request: Request) -> Response:
        try:
            form = await read_form(request)
        except HTTPError as exc:
            return secure_headers(c.message(None, exc.status, exc.message))
        get = lambda k: (form.get(k) or [""])[0]  # noqa: E731
        try:
            expected = c.signer.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=600)
        except BadSignature:
            expected = None
        nxt = safe_next(get("next"))
        token = secrets.token_urlsafe(24)

        def again(status: int, error: str) -> Response:
            resp = c.page(None, "login.html", status=status, token=token, next=nxt, expired=False, error=error)
            c.set_cookie(resp, LOGIN_COOKIE, c.signer.dumps(token), 600)
            return secure_headers(resp)

        if expected is None or not secrets.compare_digest(str(expected).encode(), get("csrf").encode()):
            return again(403, "The login form expired; please try again.")
        name, password = get("username").strip(), get("password")
        wait = await run_in_threadpool(c.accounts.throttled, name, client(request))
        if wait > 0:
            return again(429, f"Too many failed attempts: try again in {int(wait // 60) + 1} minute(s).")
        user = await run_in_threadpool(c.accounts.authenticate, name, password, client(request))
        if user is None:
            return again(401, "Wrong user name or password.")
        session = await run_in_threadpool(c.accounts.open_session, user)
        resp = RedirectResponse(nxt, status_code=303)
        c.set_cookie(resp, COOKIE, c.signer.dumps(session.id), int(c.max_age_s))
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return secure_headers(resp)

    def logout(ctx: Ctx) -> Response:
        c.accounts.close_session(ctx.session.id)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    return [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", c.guard(logout, post=True), methods=["POST"]),
    ]
