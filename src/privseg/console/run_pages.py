"""The pages of runs: the list, one run's rounds, its HTML report, privacy budgets and erasure ledger.
Each handler is ``(console, ctx) -> Response``; :func:`register_runs` binds them to their URLs (filed
as the ``runs`` pages)."""

from __future__ import annotations

import sqlite3
from functools import partial

from starlette.responses import FileResponse, Response
from starlette.routing import Route

from privseg.console import erasure, runs
from privseg.console.cache import ledger_view
from privseg.console.svg import line_chart
from privseg.console.web import DOC_CSP, Console, Ctx, HTTPError, forbidden, paged, register_pages, secure_headers
from privseg.report.served import served_view


def runs_page(c: Console, ctx: Ctx) -> Response:
    return c.page(ctx, "runs.html", runs=runs.list_runs(c.root, ctx.user))


def run_page(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    rows, curves = runs.rounds_view(s, ctx.user)
    chart = line_chart(dict(sorted(curves.items())), title="Dice per site after each round", ylabel="mean Dice",
                       ymin=0.0)
    return c.page(ctx, "run.html", run=s, rows=rows, chart=chart,
                  report=s["has_report"] and ctx.user.site is None,
                  served=served_view(d, ctx.user.sees_site))  # a site user sees its own site's row


def report_page(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    if ctx.user.site is not None:
        raise forbidden()  # the report shows every site's patients
    if not s["has_report"]:
        raise HTTPError(404, "This run has no report.html (write one with `privseg report`).")
    return secure_headers(FileResponse(d / "report.html", media_type="text/html"), DOC_CSP)


def budget_page(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    rows = runs.budgets(d, s, ctx.user)
    charts = []
    for r in rows:  # x: releases in booking order, one line per part of the run (training, each erasure)
        series: dict[str, list[tuple[float, float]]] = {}
        for p in r["points"]:
            series.setdefault(p["group"], []).append((p["n"], p["epsilon"]))
        charts.append(line_chart(series, title=f"ε spent by site {r['site']}", ylabel="ε",
                                 xlabel="release, in the order booked",
                                 steps=runs.budget_steps(r["history"], r["points"]),
                                 hlabel=f"budget {r['epsilon_budget']:g}", ymin=0.0, joined=True))
    return c.page(ctx, "budget.html", run=s, rows=rows, charts=charts, dp=s["dp"])


def ledger_page(c: Console, ctx: Ctx) -> Response:
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


@register_pages("runs")
def register_runs(c: Console) -> list[Route]:
    """The run pages, open to every role (what a site-scoped user sees is cut to its site)."""
    return [
        Route("/runs", c.guard(partial(runs_page, c))),
        Route("/runs/{run}", c.guard(partial(run_page, c))),
        Route("/runs/{run}/report", c.guard(partial(report_page, c))),
        Route("/runs/{run}/budget", c.guard(partial(budget_page, c))),
        Route("/runs/{run}/ledger", c.guard(partial(ledger_page, c))),
    ]
