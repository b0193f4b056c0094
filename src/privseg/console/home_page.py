"""The landing page: what needs the user's attention across the runs it may see -- requests
awaiting a decision, jobs queued or running, failed jobs, and budgets near their end -- with
the same cut by site as every other page."""

from __future__ import annotations

from functools import partial

from starlette.responses import Response
from starlette.routing import Route

from privseg.console import runs
from privseg.console.erasure_pages import visible_requests
from privseg.console.web import Console, Ctx, register_pages

FAILED = ("failed", "verification-failed")


def attention(c: Console, ctx: Ctx) -> dict:
    """Per heading, the items that need attention (each request or budget row once)."""
    records: dict[str, list[dict]] = {}
    for r in c.store.list():
        records.setdefault(r["run"], []).append(r)
    out: dict[str, list[dict]] = {"pending": [], "active": [], "failed": [], "budgets": []}
    for s in runs.list_runs(c.root, ctx.user):
        d = c.root / s["name"]
        for r in visible_requests(c, ctx, d, s["name"], records.get(s["name"], [])):
            key = {"filed": "pending", "queued": "active", "running": "active"}.get(r["state"])
            key = key or ("failed" if r["state"] in FAILED else None)
            if key:
                out[key].append(r)
        if s["dp"] == "patient":
            for b in runs.budgets(d, s, ctx.user):
                over_reserve = b.get("epsilon_with_reserve") is not None and \
                    b["epsilon_with_reserve"] > b["epsilon_budget"] * (1 + 1e-6)
                if b["warning"] or over_reserve:
                    out["budgets"].append({**b, "run": s["name"], "why": b["warning"] or
                                           "the erasure reserve no longer fits: the next erasure needs a raise"})
    return out


def home_page(c: Console, ctx: Ctx) -> Response:
    return c.page(ctx, "home.html", items=attention(c, ctx), runs=runs.list_runs(c.root, ctx.user))


@register_pages("home")
def register_home(c: Console) -> list[Route]:
    return [Route("/", c.guard(partial(home_page, c)))]
