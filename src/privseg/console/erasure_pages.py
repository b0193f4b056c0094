"""The pages of erasure: a site's patients, requests (filed here or on the command line), filing,
the officer's approval or rejection, a request's progress and its certificate.
Each handler is ``(console, ctx) -> Response``; :func:`register_erasure` binds them to their URLs."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from urllib.parse import quote

from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from privseg.audit.certificate import write_certificate
from privseg.console import erasure, runs
from privseg.console.cache import ledger_view
from privseg.console.store import OPEN
from privseg.console.svg import bar_chart
from privseg.console.web import DOC_CSP, Console, Ctx, HTTPError, forbidden, paged, register_pages, secure_headers
from privseg.errors import ConfigError
from privseg.federated.runstate import hold_run

STAGES = {"patient": ("requested", "local_unlearned", "repaired", "verified", "completed"),
          "site": ("requested", "site_removed", "verified", "completed")}


def visible_requests(c: Console, ctx: Ctx, d: Path, run: str, records: list[dict] | None = None) -> list[dict]:
    """Console records and ledger-only (CLI) requests of one run that the user may see
    (``records``: the run's console records, when already read)."""
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
                        "filed_by": cli_requester(r.get("requested_by")), "filed_at": None,
                        "ledger_status": r.get("status")})
    return out


def cli_requester(requested_by: str | None) -> str:
    """Who filed a command-line request: its ``--requested-by``, marked as made on the command line."""
    return f"{requested_by} (command line)" if requested_by else "command line (no --requested-by)"


def patients_page(c: Console, ctx: Ctx) -> Response:
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


def requests_page(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    return c.page(ctx, "requests.html", run=s, **paged(ctx, visible_requests(c, ctx, d, s["name"])))


def inbox_page(c: Console, ctx: Ctx) -> Response:
    records: dict[str, list[dict]] = {}
    for r in c.store.list():  # one query for every run
        records.setdefault(r["run"], []).append(r)
    items = []
    for s in runs.list_runs(c.root, ctx.user):
        items += visible_requests(c, ctx, c.root / s["name"], s["name"], records.get(s["name"], []))
    items.sort(key=lambda r: (r["state"] not in ("filed",), -(r.get("filed_at") or 0)))
    return c.page(ctx, "inbox.html", **paged(ctx, items))


def file_request(c: Console, ctx: Ctx) -> Response:
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


def request_page(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    return _request_view(c, ctx, d, s, ctx.param("rid"))


APPROVABLE = ("filed", "verification-failed", "failed")


def _request_view(c: Console, ctx: Ctx, d: Path, s: dict, rid: str, settings: dict | None = None,
                  refused: str | None = None, status: int = 200) -> Response:
    """The request page; ``settings``: the officer's (priced instead of the record's), ``refused``:
    why an approval with them was refused (the page comes back with the price and the options)."""
    rec, entries = c.request_for(ctx, d, s["name"], rid)
    ver = next((e["body"] for e in reversed(entries) if e["event"] == "verified"), None)
    figure = None
    if ver:
        models = [m for m in ("before", "after", "retrain") if isinstance(ver.get(m), dict)]
        figure = bar_chart({k: {m: ver[m].get(k) for m in models} for k in ("mia_auc", "retain_dice", "test_dice")},
                           title="Verification", limit=(ver.get("thresholds") or {}).get("max_mia_auc"),
                           limit_label="max AUC")
    requested = next((e["body"] for e in entries if e["event"] == "requested"), {})
    kind = rec["kind"] if rec else requested.get("kind")
    chosen = settings if settings is not None else (rec or {}).get("settings") or {}
    priced = methods = None
    if rec is not None and rec["state"] in APPROVABLE:
        methods = erasure.methods(d, rec["kind"])
        if not entries:  # a request not yet started is priced whole (as the erasure checks it)
            priced = erasure.quote(d, rec["kind"], rec["site"], rec["subjects"], chosen)
    if priced is not None:  # a site user sees its own site's figures only
        priced = {**priced, "rows": [r for r in priced["rows"] if ctx.user.sees_site(r["site"])]}
    no_power = bool(ver) and any((ch or {}).get("result") == "no power" for ch in (ver.get("checks") or {}).values())
    return c.page(ctx, "request.html", status=status, run=s, rec=rec, rid=rid, entries=entries, ver=ver,
                  figure=figure, stages=stages(kind, entries), defaults=erasure.default_thresholds(),
                  requested_by=cli_requester(requested.get("requested_by")), open_states=OPEN,
                  approvable=APPROVABLE, quote=priced, methods=methods, chosen=chosen, refused=refused,
                  refusal=erasure.refusal(priced) if priced and not priced["fits"] else "", no_power=no_power,
                  decisions=c.store.decisions(s["name"], rid) if rec else [])


def stages(kind: str | None, entries: list[dict]) -> list[tuple[str, str]]:
    """Each stage of an erasure of this kind and how it stands: "done", "todo", or "skipped" (a
    repair stage that ran no round: nothing was repaired, so it gets no tick)."""
    last = {e["event"]: e["body"] for e in entries}
    names = STAGES.get(kind or "", ())
    begun = {e["body"].get("stage") for e in entries if e["event"] == "started"}
    if names and ("personalised" in last or "personalised" in begun):  # a run with personalised models
        names = (*names[:-1], "personalised", names[-1])
    out = []
    for st in names:
        body = last.get(st)
        skipped = st == "repaired" and isinstance(body, dict) and not body.get("rounds")
        out.append((st, "todo" if body is None else "skipped" if skipped else "done"))
    return out


def status_json(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    rec, entries = c.request_for(ctx, d, s["name"], ctx.param("rid"))
    return JSONResponse({"state": rec["state"] if rec else "cli", "stage": rec.get("stage") if rec else None,
                         "message": rec.get("message") if rec else None,
                         "final": rec is None or rec["state"] not in OPEN,
                         "events": [{"event": e["event"], "at": e["at"]} for e in entries],
                         "stages": dict(stages(rec["kind"] if rec else None, entries)) if rec else {}})


def decide(c: Console, ctx: Ctx, approve: bool) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    rid = ctx.param("rid")
    rec, _ = c.request_for(ctx, d, s["name"], rid)
    if rec is None:
        raise HTTPError(409, "This request was made on the command line; finish it there. Nothing was changed.")
    note = ctx.one("note").strip()
    if approve:
        settings = erasure.clean_settings({k: ctx.one(k) for k in ctx.form})
        erasure.check_settings(rec["kind"], rec["site"], rec["subjects"], settings, d)
        if rec["state"] == "filed":
            erasure.check_new(d, rec["kind"], rec["site"], rec["subjects"])  # still valid now?
        _, entries = c.request_for(ctx, d, s["name"], rid)
        priced = None if entries else erasure.quote(d, rec["kind"], rec["site"], rec["subjects"], settings)
        if priced is not None and not priced["fits"]:  # priced before it is approved: refused, with the options
            return _request_view(c, ctx, d, s, rid, settings=settings, status=409, refused=(
                f"Not approved: the privacy budget cannot pay for this erasure with these settings "
                f"({erasure.refusal(priced)}). Choose one of the options below. Nothing was changed."))
        c.store.approve(s["name"], rid, ctx.user.label, settings, note)
        if c.runner is not None:
            c.runner.wake()
    else:
        if not note:
            raise HTTPError(400, "Say why the request is rejected. Nothing was changed.")
        c.store.reject(s["name"], rid, ctx.user.label, note)
    return RedirectResponse(f"/runs/{quote(s['name'])}/requests/{rid}", status_code=303)


def certificate(c: Console, ctx: Ctx) -> Response:
    d, s = c.run_for(ctx, ctx.param("run"))
    rid, fmt = ctx.param("rid"), ctx.param("fmt")
    rec, entries = c.request_for(ctx, d, s["name"], rid)
    if fmt not in ("html", "json"):
        raise HTTPError(404, "Certificates come as .html or .json.")
    if not entries:
        raise HTTPError(409, "The erasure has not started: there is no certificate yet.")
    path = erasure.ledger_path(d)
    view = ledger_view(path)
    # the library's certificate, with the entries and chain check of the ledger view (a full re-hash
    # of the ledger per download made this page slow); test_cache checks it is privseg erase's
    with tempfile.TemporaryDirectory() as tmp:
        files = dict(zip(("json", "html"), write_certificate(path, rid, tmp, entries=entries,
                                                              chain=(view.ok, view.problems)), strict=True))
        data = files[fmt].read_bytes()
    resp = Response(data, media_type="text/html" if fmt == "html" else "application/json",
                    headers={"content-disposition": f'attachment; filename="{rid}.{fmt}"'})
    return secure_headers(resp, DOC_CSP)


@register_pages("erasure")
def register_erasure(c: Console) -> list[Route]:
    """The erasure pages: every role reads; officers and sites see patients and file (a site for
    its own patients only); only officers approve or reject."""
    officer, writers = ("officer",), ("officer", "site")
    return [
        Route("/requests", c.guard(partial(inbox_page, c))),
        Route("/runs/{run}/patients", c.guard(partial(patients_page, c), writers)),
        Route("/runs/{run}/requests", c.guard(partial(requests_page, c)), methods=["GET"]),
        Route("/runs/{run}/requests", c.guard(partial(file_request, c), writers, post=True), methods=["POST"]),
        Route("/runs/{run}/requests/{rid}", c.guard(partial(request_page, c))),
        Route("/runs/{run}/requests/{rid}/status", c.guard(partial(status_json, c))),
        Route("/runs/{run}/requests/{rid}/approve", c.guard(partial(decide, c, approve=True), officer, post=True),
              methods=["POST"]),
        Route("/runs/{run}/requests/{rid}/reject", c.guard(partial(decide, c, approve=False), officer, post=True),
              methods=["POST"]),
        Route("/runs/{run}/requests/{rid}/certificate.{fmt}", c.guard(partial(certificate, c))),
    ]
