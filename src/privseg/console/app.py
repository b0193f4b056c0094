"""The console's web app (Starlette, server-rendered Jinja2 pages, one small vendored script).

Every page goes through :meth:`~privseg.console.web.Console.guard`: a live session (signed
cookie -> server-side row), the role the page allows, and for a form a size-capped URL-encoded
body with the session's CSRF token. The app serves every entry of the page registry
(:data:`~privseg.console.web.PAGES`, filled with :func:`~privseg.console.web.register_pages`) after
importing each module of this package whose name ends in ``_page`` or ``_pages``: ``login``
(:mod:`~privseg.console.login_pages`), ``home`` (what needs attention), ``runs`` (runs, reports,
budgets, the erasure ledger) and ``erasure`` (patients, requests, decisions, certificates). A new
page is a registered function in such a module; nothing here changes.
"""

from __future__ import annotations

import html
import importlib
import ipaddress
import pkgutil
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from privseg.console.accounts import Accounts
from privseg.console.cache import warm
from privseg.console.web import HERE, PAGES, Console, secure_headers
from privseg.errors import ConfigError

STATIC = {"console.js": "text/javascript", "console.css": "text/css"}


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return secure_headers(Response("not found", status_code=404, media_type="text/plain"))
    resp = FileResponse(HERE / "static" / name, media_type=STATIC[name])
    resp.headers["cache-control"] = "max-age=3600"
    return secure_headers(resp)


async def not_found(request: Request, exc) -> Response:
    return secure_headers(HTMLResponse(f"<!DOCTYPE html><title>Not found</title><p>{html.escape('Not found.')}"
                                       "</p><p><a href='/runs'>Runs</a></p>", status_code=exc.status_code))


def _lifespan(c: Console):
    """Start-up: warm the ledger caches in the background and start the job runner; shutdown: stop it."""

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=warm, args=(c.root,), name="console-warm", daemon=True).start()
        if c.runner is not None:
            c.runner.start()
        try:
            yield
        finally:
            if c.runner is not None:
                c.runner.stop()

    return lifespan


def create_app(root: str | Path, *, secure: bool = False, idle_minutes: float = 30, max_hours: float = 12,
               jobs: bool = True) -> Starlette:
    """The console over the run folders in ``root``. ``secure``: served over TLS (cookies get
    the Secure flag). ``jobs``: run approved erasures (off only in tests of the pages alone)."""
    c = Console(Path(root), secure=secure, idle_minutes=idle_minutes, max_hours=max_hours, jobs=jobs)
    load_pages()
    routes = [Route("/static/{name}", static), *(route for pages in PAGES.values() for route in pages(c))]
    app = Starlette(routes=routes, lifespan=_lifespan(c), exception_handlers={404: not_found, 405: not_found})
    app.state.console = c
    return app


def load_pages() -> None:
    """Import every page module of this package (name ending in ``_page`` or ``_pages``): each files
    its pages in :data:`~privseg.console.web.PAGES` when first imported."""
    for mod in pkgutil.iter_modules([str(HERE)]):
        if mod.name.endswith(("_page", "_pages")):
            importlib.import_module(f"privseg.console.{mod.name}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(runs: str | Path, *, host: str = "127.0.0.1", port: int = 8700, certfile: Path | None = None,
          keyfile: Path | None = None, idle_minutes: float = 30.0, max_hours: float = 12.0,
          on_notice: Callable[[str, str], None] | None = None) -> None:
    """Serve the console over the runs folder ``runs`` with uvicorn until stopped: HTTPS with
    ``certfile`` and ``keyfile`` (give both or neither). ``on_notice(label, text)`` hears what the
    operator should know first: no account yet (``label`` "no account yet"), a non-loopback
    address without TLS ("warning"), and the address it serves on (label "")."""
    import uvicorn  # why: only a served console needs the server; tests and the CLI's other commands do not

    say = on_notice or (lambda label, text: None)
    if (certfile is None) != (keyfile is None):
        raise ConfigError("give both --certfile and --keyfile for TLS, or neither")
    for p in (certfile, keyfile):
        if p is not None and not p.is_file():
            raise ConfigError(f"{p}: no such file")
    if not Accounts.of_runs(runs).users():
        say("no account yet", f"add one with `privseg console add-user NAME --role officer --runs {runs}`")
    tls = certfile is not None
    if not is_loopback(host) and not tls:
        say("warning", f"serving on {host} without TLS: passwords and cookies cross the network in clear text "
            "(use --certfile/--keyfile)")
    say("", f"privseg console on {'https' if tls else 'http'}://{host}:{port}/ over {runs}")
    uvicorn.run(create_app(runs, secure=tls, idle_minutes=idle_minutes, max_hours=max_hours), host=host, port=port,
                ssl_certfile=str(certfile) if tls else None, ssl_keyfile=str(keyfile) if tls else None,
                log_level="warning", proxy_headers=False, server_header=False)
