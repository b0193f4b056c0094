"""The console app serves every page in the page registry (privseg.console.web.PAGES): a page
added with ``register_pages`` is served behind the guard without an edit of app.py, and a name
already taken is refused."""

from __future__ import annotations

import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from console_kit import add_users, login
from privseg.console import create_app
from privseg.console.app import load_pages
from privseg.console.web import PAGES, register_pages
from privseg.errors import ConfigError


def toy_pages(c) -> list[Route]:
    return [Route("/toy", c.guard(lambda ctx: PlainTextResponse(f"toy page for {ctx.user.name}"), ("officer",)))]


@pytest.fixture
def toy():
    register_pages("toy")(toy_pages)
    yield toy_pages
    del PAGES["toy"]


def test_a_registered_page_is_served_behind_the_guard(tmp_path, toy):
    add_users(tmp_path)
    officer, site = TestClient(create_app(tmp_path, jobs=False)), TestClient(create_app(tmp_path, jobs=False))
    assert officer.get("/toy", follow_redirects=False).headers["location"] == "/login?next=/toy"
    assert login(officer, "dpo").status_code == 303 and login(site, "h2").status_code == 303
    page = officer.get("/toy")
    assert (page.status_code, page.text) == (200, "toy page for dpo")
    assert page.headers["x-frame-options"] == "DENY"  # the guard's headers
    assert site.get("/toy").status_code == 403  # the role the page allows
    assert officer.get("/runs").status_code == 200  # the built-in pages are served beside it


def test_a_page_is_served_only_while_registered(tmp_path):
    add_users(tmp_path)
    client = TestClient(create_app(tmp_path, jobs=False))
    assert login(client, "dpo").status_code == 303
    assert client.get("/toy").status_code == 404


def test_a_page_name_taken_is_refused(toy):
    with pytest.raises(ConfigError, match="console page 'toy' is already registered"):
        register_pages("toy")(toy_pages)
    load_pages()  # the built-in pages are filed too
    assert {"login", "home", "runs", "erasure"} <= set(PAGES)
    with pytest.raises(ConfigError, match="console page 'runs' is already registered"):
        register_pages("runs")(toy_pages)
