"""Erasure certificates: what a privacy officer files for one request.

:func:`write_certificate` turns the ledger entries of one request into ``<REQ>.json`` (the
entries themselves, the chain check and a summary) and ``<REQ>.html`` (one self-contained,
printable page: no script, no external resource; "Print to PDF" gives the PDF). Both state the
ledger's hash-chain status and the hash of the request's last entry, so the paper copy can
later be checked against the ledger (``privseg ledger verify``).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from privseg.audit.copies import copy_entry
from privseg.audit.ledger import ErasureLedger, open_stage
from privseg.audit.lira import title_of
from privseg.errors import ConfigError
from privseg.utils import atomic_path, write_json

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:60em;margin:2em auto;color:#222}
h1{font-size:1.5em;border-bottom:2px solid #333;padding-bottom:.3em}
h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;width:100%}
td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#f0f0f0}
.pass{color:#0a6b1f;font-weight:bold}.fail{color:#b00020;font-weight:bold}.nopower{color:#8a5a00;font-weight:bold}
.status{font-size:1.2em;padding:.6em;border:2px solid;margin:1em 0}
code{font-size:.85em;word-break:break-all}
@media print{body{margin:0}h2{page-break-after:avoid}table{page-break-inside:avoid}}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v) or "none"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "none"
    return "" if v is None else str(v)


def _rows(pairs) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in pairs)


_RESULT = {"pass": ("PASS", "pass"), "fail": ("FAIL", "fail"), "no power": ("NO POWER", "nopower"),
           "info": ("not used", "")}


def _result(check: dict) -> tuple[str, str]:
    """(label, css class) of one check; older records carry only ``ok``."""
    r = check.get("result") or ("pass" if check.get("ok") else "fail")
    return _RESULT.get(r, (r.upper(), ""))


def membership_statements(ver: dict) -> dict:
    """What the certificate states about membership: per erased patient, whether the model before
    the erasure was flagged and whether the erased model is indistinguishable from the reference
    models that never saw the patient; or that the calibrated test was not run, and why."""
    cal = (ver or {}).get("calibrated")
    if not cal:
        return {"available": False, "reason": "this verification predates the calibrated membership test",
                "statements": []}
    if not cal.get("available"):
        return {"available": False, "reason": cal.get("reason", ""), "statements": []}
    chk = cal["check"]
    alpha = chk["alpha"]
    out = []
    for r in chk["subjects"]:
        if r["flagged_before"]:
            verdict = "PASS" if r["indistinguishable_after"] else "FAIL"
            after = "indistinguishable from" if r["indistinguishable_after"] else "still distinguishable from"
            text = (f"patient {r['id']}: model before the erasure flagged (p = {r['p_before']:.4f} < {alpha}); "
                    f"erased model {after}"
                    f" the {r['n_out']} reference models that never saw the patient (p = {r['p_after']:.4f}"
                    f"{' >= ' if r['indistinguishable_after'] else ' < '}{alpha})")
        else:
            verdict = "NO POWER"
            text = (f"patient {r['id']}: model before the erasure NOT flagged (p = {r['p_before']:.4f} >= {alpha}): "
                    f"the membership test had no power for this patient, so the erased model's p = "
                    f"{r['p_after']:.4f} against {r['n_out']} reference models proves nothing")
        out.append({"id": r["id"], "verdict": verdict, "text": text, "flagged_before": r["flagged_before"],
                    "p_before": r["p_before"], "p_after": r["p_after"], "n_out_references": r["n_out"]})
    pop = {m: cal[m]["population"] for m in ("before", "after")}
    return {"available": True, "result": chk["result"], "n_references": cal["n_references"], "alpha": alpha,
            "test": chk.get("test", "lira"), "statements": out, "population": pop}


def cost_statement(ver: dict | None) -> dict:
    """The reference models' compute in units of the original training and its share per request
    (1, 10, 100 requests), as the verification recorded them; the request's own time is beside it."""
    refs = ((ver or {}).get("calibrated") or {}).get("references") or {}
    if "compute_ratio" not in refs:
        return {"available": False, "reason": "the verification used no reference models (or predates their cost)"}
    return {"available": True, "n_references": refs["n"], "compute_ratio": refs["compute_ratio"],
            "amortised_per_request": refs["amortised_per_request"]}


def headline(s: dict) -> str:
    """The certificate in one line, for a person: what was erased, whether the evidence passed, the
    membership test's power (TPR at 1 % FPR on the model before the erasure) and the cost."""
    who = (f"patient(s) {', '.join(s['subjects'])}" if s["kind"] == "patient" else f"every patient of site {s['site']}")
    ver = s.get("verification") or {}
    evidence = "not verified yet" if not ver else ("passed" if ver.get("passed") else "FAILED")
    m = s.get("membership") or {}
    if m.get("available"):
        pop = m["population"]["before"]
        power = (f"TPR {pop['tpr']:.2f} at 1 % FPR" if "tpr" in pop else "TPR at 1 % FPR unknown")
        if pop.get("fpr_resolution", 0) > 0.01:
            power += f" (FPR resolvable only to {pop['fpr_resolution']:.2f})"
        power = f"membership test {m['result']}, power on the model before: {power} ({m['n_references']} references)"
    else:
        power = "no calibrated membership test (power unknown)"
    c = s.get("cost") or {}
    cost = (f"reference models {c['compute_ratio']:.1f} x the original training, per request "
            + ", ".join(f"{v:.2f} x over {k}" for k, v in c["amortised_per_request"].items())
            if c.get("available") else "no reference models")
    took = (s.get("work") or {}).get("seconds")
    return (f"Erasure of {who} from run {s['run']} ({s['method']}): evidence {evidence}; {power}; cost: {cost}"
            + (f", plus {took:.0f} s for this request" if isinstance(took, int | float) else "") + ".")


def summarise(entries: list[dict]) -> dict:
    """The facts a certificate states, from one request's ledger entries."""
    if not entries:
        raise ConfigError("no ledger entries for this request")
    by = {}
    for e in entries:
        by[e["event"]] = e  # the latest of each event
    req = by["requested"]["body"]
    ver = by.get("verified", {}).get("body", {})
    done = by.get("completed", {}).get("body")
    work = by.get("local_unlearned") or by.get("site_removed")
    status = "COMPLETED" if done else ("VERIFICATION FAILED" if ver and not ver.get("passed") else "IN PROGRESS")
    # settings as they ran (the ledger's stage entries), not as they were asked for
    ran = work["body"] if work else {}
    repaired = by.get("repaired", {}).get("body")
    if req.get("kind") == "patient":
        settings = {"params": ran.get("params"), "target": ran.get("target"), "epochs": ran.get("epochs"),
                    "local_steps": ran.get("steps_run"),
                    "repair_rounds": len(repaired["rounds"]) if repaired else None, "seed": req.get("seed")}
    else:
        settings = {k: ran.get(k) for k in ("ratio", "interval", "local_steps", "repair_rounds", "from_round",
                                            "rounds")}
        settings["seed"] = req.get("seed")
    copies = _copies(done) if done else []
    open_ = open_stage(entries)
    out = {
        "request": entries[0]["request"], "status": status, "run": req.get("run"), "kind": req.get("kind"),
        "run_kind": req.get("run_kind") or ("central" if req.get("site") == "central"
                                            and (req.get("source") or {}).get("round") is None else "federated"),
        "copies": copies, "copies_remaining": [c for c in copies if c["fate"] in ("superseded", "kept")],
        "open_stage": {"stage": open_["body"].get("stage"), "since": open_["at"]} if open_ else None,
        "site": req.get("site"), "subjects": req.get("subjects", []), "reason": req.get("reason"),
        "requested_by": req.get("requested_by"), "approved_by": req.get("approved_by") or None,  # None: not recorded
        "requested_at": by["requested"]["at"],
        "completed_at": by["completed"]["at"] if done else None, "method": ran.get("strategy") or req.get("method"),
        "settings": settings,
        "source_model": req.get("source"), "work": work["body"] if work else None,
        "repair": by.get("repaired", {}).get("body"), "verification": ver or None,
        "membership": membership_statements(ver) if ver else None, "cost": cost_statement(ver),
        "resulting_model": done["model"] if done else None, "removed": done["removed"] if done else [],
        # the models the erasure covered: the global one and each site's personalised ones (older
        # records covered the global model only); and the model each site serves after it
        "covered": (done.get("covered") or [{"model": "global", "path": done["model"]["path"], "fate": "erased"}])
        if done else [], "serves": done.get("serves") if done else None,
        "dp": done.get("dp") if done else None, "last_entry_hash": entries[-1]["hash"],
        "events": stage_rows(entries),
    }
    out["headline"] = headline(out)
    return out


def stage_rows(entries: list[dict]) -> list[dict]:
    """One row per ledger entry, with each stage's ``started`` entry folded into the entry that
    ended it (``started_at``: when the stage began); a stage begun and never ended is a row of its
    own, ``<stage> (started, not finished)``."""
    rows, begun = [], {}

    def unfinished(st: dict) -> dict:
        return {"seq": st["seq"], "event": f"{st['body'].get('stage')} (started, not finished)", "at": st["at"],
                "hash": st["hash"], "started_at": st["at"]}

    for e in entries:
        if e["event"] == "started":
            if e["body"].get("stage") in begun:
                rows.append(unfinished(begun[e["body"].get("stage")]))
            begun[e["body"].get("stage")] = e
            continue
        st = begun.pop(e["event"], None)
        rows.append({"seq": e["seq"], "event": e["event"], "at": e["at"], "hash": e["hash"],
                     "started_at": st["at"] if st else None})
    rows += [unfinished(st) for st in begun.values()]
    return sorted(rows, key=lambda r: r["seq"])


def _copies(done: dict) -> list[dict]:
    """The copies of the patients' influence a ``completed`` entry accounts for (records written
    before the accounting: the deleted files, and the files it listed as kept)."""
    if "copies" in done:
        return done["copies"]
    return ([copy_entry(a["path"], a.get("sha256"), "deleted", "superseded by the erased model")
             for a in done.get("removed", [])]
            + [copy_entry(p, None, "superseded", done.get("note", "")) for p in done.get("superseded_kept", [])])


def _copies_html(s: dict) -> str:
    if s["status"] != "COMPLETED":
        return ""
    left = s["copies_remaining"]
    head = (f"<p class='nopower'>{len(left)} of {len(s['copies'])} copies still hold the erased patient(s): "
            + html.escape(", ".join(c["path"] for c in left)) + "</p>" if left else
            f"<p class='pass'>Every one of the {len(s['copies'])} copies of the erased patient(s)' influence "
            "was deleted or rebuilt without them.</p>")
    rows = "".join(f"<tr><td>{html.escape(c['path'])}</td><td>{html.escape(c['what'])}</td>"
                   f"<td class='{'pass' if c['fate'] in ('deleted', 'retrained') else 'nopower'}'>"
                   f"{html.escape(c['fate'])}</td><td>{html.escape(c.get('reason') or '')}</td></tr>"
                   for c in s["copies"])
    return ("<h2>Copies of the patient's influence</h2>" + head
            + "<table><tr><th>file</th><th>what</th><th>became</th><th>why</th></tr>" + rows + "</table>")


def render_html(s: dict, chain_ok: bool, chain_problems: list[str], ledger_path: str) -> str:
    ok = s["status"] == "COMPLETED"
    who = ("patient(s) " + ", ".join(s["subjects"])
           + (f" at site {s['site']}" if s.get("run_kind", "federated") == "federated" else "")
           if s["kind"] == "patient" else f"site {s['site']} (every patient of it)")
    status = s["status"]
    if ok and s.get("copies_remaining"):
        n = len(s["copies_remaining"])
        status += f" for the erased model; {n} {'copy still holds' if n == 1 else 'copies still hold'} the patient"
    if s.get("open_stage"):
        status += f" (stage {s['open_stage']['stage']} started at {s['open_stage']['since']} UTC, not finished)"
    parts = [f"<h1>Erasure certificate {html.escape(s['request'])}</h1>",
             f"<div class='status {'pass' if ok else 'fail'}'>Status: {html.escape(status)} &mdash; "
             f"erasure of {html.escape(who)} from {html.escape(s.get('run_kind', 'federated'))} run "
             f"{html.escape(str(s['run']))}</div>", f"<p><strong>{html.escape(s.get('headline') or headline(s))}"
             "</strong></p>", _copies_html(s),
             "<h2>Request</h2><table>",
             _rows([("Request ID", s["request"]), ("Kind", s["kind"]), ("Site", s["site"]),
                    ("Subjects", s["subjects"] or "all of the site"), ("Reason", s["reason"]),
                    ("Requested by", s["requested_by"]),
                    ("Approved by", s.get("approved_by") or "not recorded in the ledger"),
                    ("Recorded at (UTC)", s["requested_at"]),
                    ("Completed at (UTC)", s["completed_at"] or "not completed")]),
             "</table><h2>Model and method</h2><table>"]
    src = s["source_model"] or {}
    parts.append(_rows([("Model before (round)", src.get("round")), ("Model before (file)", src.get("path")),
                        ("Model before (SHA-256)", src.get("sha256")), ("Method", s["method"]),
                        ("Settings", {k: v for k, v in s["settings"].items() if v not in (None, {}, [])})]))
    if s["work"]:
        w = s["work"]
        parts.append(_rows([("Unlearning / removal time (s)", w.get("seconds")),
                            ("Steps or rounds", w.get("steps_run", w.get("rounds", w.get("original_rounds"))))]))
    if s["repair"]:
        failed = s["repair"].get("failed_sites") or []
        parts.append(_rows([("Repair rounds (the run's round numbers)", s["repair"].get("rounds")),
                            ("Repair time (s)", s["repair"].get("seconds"))]
                           + [("Site left out of a repair round", f"{f['site']} in round {f['round']}: {f['reason']}")
                              for f in failed]))
    parts.append("</table>")
    ver = s["verification"]
    if ver:
        parts.append("<h2>Verification</h2><table><tr><th>model</th><th>membership AUC (erased vs never seen)"
                     "</th><th>retain Dice</th><th>test Dice</th></tr>")
        for name in ("before", "after", "retrain"):
            m = ver.get(name)
            if m:
                retain = _fmt(m.get("retain_dice", "withheld (DP)"))
                parts.append(f"<tr><td>{name}</td><td>{_fmt(m['mia_auc'])}</td><td>{retain}</td>"
                             f"<td>{_fmt(m['test_dice'])}</td></tr>")
        parts.append("</table><table><tr><th>check</th><th>value</th><th>threshold</th><th>result</th></tr>")
        for k, c in ver["checks"].items():
            bound = f"&le; {c['max']}" if "max" in c else f"&ge; {c['min']} (vs {html.escape(str(c.get('vs')))})"
            label, css = _result(c)
            note = f"<br><small>{html.escape(c['note'])}</small>" if c.get("note") else ""
            parts.append(f"<tr><td>{k}</td><td>{_fmt(c['value'])}</td><td>{bound}</td>"
                         f"<td class='{css}'>{label}{note}</td></tr>")
        parts.append("</table>")
        parts.append(_membership_html(s.get("membership") or membership_statements(ver)))
        if "distance_to_retrain" in ver:
            parts.append(f"<p>Parameter distance to the federated retrain: {_fmt(ver['distance_to_retrain'])} "
                         f"(before the erasure: {_fmt(ver['distance_before_to_retrain'])}).</p>")
        parts.append("<p>Membership AUC: probability that the membership test scores an erased patient as more "
                     "likely trained-on than a patient no model ever saw; 0.5 = indistinguishable.</p>")
    c = s.get("cost") or {}
    if c.get("available"):
        parts.append("<h2>Cost of being ready</h2><table>" + _rows(
            [("Reference models' compute (x the original training)", c["compute_ratio"])]
            + [(f"Per request, shared by {k} request(s)", v) for k, v in c["amortised_per_request"].items()])
            + "</table>")
    if s["resulting_model"]:
        rm = s["resulting_model"]
        parts.append("<h2>Result</h2><table>" + _rows([("Model now served", rm["path"]), ("SHA-256", rm["sha256"]),
                                                        ("Superseded files deleted", len(s["removed"]))]) + "</table>")
        parts.append(_covered_html(s))
    if s["dp"]:
        d = s["dp"]
        if d.get("private"):
            parts.append(f"<h2>Differential privacy</h2><p>The run was trained with "
                         f"{html.escape(str(d['unit']))}-level DP. The site's ledger bounds site "
                         f"{html.escape(str(s['site']))} at &epsilon; = {_fmt(d['epsilon'])}, &delta; = {d['delta']:g} "
                         f"({html.escape(d['meaning'])}; {html.escape(str(d.get('guarantee', '')))}).</p>")
        else:
            parts.append(f"<h2>Differential privacy</h2><p><strong>NOT PRIVATE.</strong> The ledger books "
                         f"&epsilon; = {_fmt(d['epsilon'])} for site {html.escape(str(s['site']))}, but that is not a "
                         f"guarantee: {html.escape(str(d.get('guarantee') or 'no record of secret-key noise'))}.</p>")
    parts.append("<h2>Ledger</h2><table>" + _rows([
        ("Ledger file", ledger_path), ("Hash chain", "intact" if chain_ok else "BROKEN: " + "; ".join(chain_problems)),
        ("Hash of this request's last entry", s["last_entry_hash"])]) + "</table>")
    parts.append("<table><tr><th>#</th><th>stage</th><th>started (UTC)</th><th>ended (UTC)</th><th>entry hash</th>"
                 "</tr>" + "".join(
                     f"<tr><td>{e['seq']}</td><td>{html.escape(e['event'])}</td><td>{e.get('started_at') or ''}</td>"
                     f"<td>{'' if e['event'].endswith('not finished)') else e['at']}</td>"
                     f"<td><code>{e['hash']}</code></td></tr>" for e in s["events"]) + "</table>")
    if s["removed"]:
        parts.append("<h2>Deleted files</h2><table><tr><th>file</th><th>SHA-256</th></tr>" + "".join(
            f"<tr><td>{html.escape(a['path'])}</td><td><code>{a['sha256']}</code></td></tr>" for a in s["removed"])
            + "</table>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Erasure certificate "
            f"{html.escape(s['request'])}</title><style>{_CSS}</style></head><body>{''.join(parts)}"
            "<p><small>Written by privseg from the run's erasure ledger.</small></p></body></html>")


def covered_text(c: dict) -> str:
    """One model an erasure covered, in words."""
    return ("the global model" if c["model"] == "global"
            else f"personalised model ({c['model']}) at site {c['site']}") + f": {c['fate']}"


def _covered_html(s: dict) -> str:
    """The models the erasure covered (the global one; each site's personalised models, redone
    without the patient or deleted) and the model each site serves after it."""
    rows = "".join(f"<tr><td>{html.escape(covered_text(c))}</td><td>{html.escape(c['path'])}</td></tr>"
                   for c in s.get("covered") or [])
    served = s.get("serves") or {}
    return ("<h2>Models the erasure covered</h2><table><tr><th>model</th><th>file</th></tr>" + rows + "</table>"
            + ("<p>Served after the erasure: " + html.escape(", ".join(f"site {k}: {v}" for k, v in served.items()))
               + "</p>" if served else ""))


def _membership_html(m: dict) -> str:
    parts = ["<h2>Per-patient membership test (reference models)</h2>"]
    if not m["available"]:
        parts.append(f"<p class='nopower'>Calibrated membership test: NOT RUN &mdash; {html.escape(m['reason'])}</p>"
                     "<p>The membership AUC above compares the erased patient with other patients, not with models "
                     "that never saw this patient; on its own it is not evidence that the patient was forgotten.</p>")
        return "".join(parts)
    parts.append(f"<p>Each erased patient's score under the model before and after the erasure is compared with "
                 f"its scores under the {m['n_references']} reference models of this run that never saw it "
                 f"({title_of(m.get('test', 'lira'))}; flagged when p &lt; {m['alpha']}).</p>"
                 "<table><tr><th>patient</th><th>before: flagged?</th><th>after: indistinguishable?</th>"
                 "<th>OUT references</th><th>result</th></tr>")
    for r in m["statements"]:
        css = {"PASS": "pass", "FAIL": "fail"}.get(r["verdict"], "nopower")
        after = ("n/a (no power)" if not r["flagged_before"] else
                 ("yes" if r["p_after"] >= m["alpha"] else "no") + f" (p = {r['p_after']:.4f})")
        parts.append(f"<tr><td>{html.escape(r['id'])}</td><td>{'yes' if r['flagged_before'] else 'no'} "
                     f"(p = {r['p_before']:.4f})</td><td>{after}</td><td>{r['n_out_references']}</td>"
                     f"<td class='{css}'>{r['verdict']}</td></tr>")
    parts.append("</table><ul>" + "".join(f"<li>{html.escape(r['text'])}</li>" for r in m["statements"]) + "</ul>")
    parts.append("<table><tr><th>model</th><th>population AUC (training vs never-seen patients)</th>"
                 "<th>TPR at 1 % FPR</th><th>members / non-members</th></tr>")
    for name, p in m["population"].items():
        tpr = f"{_fmt(p.get('tpr'))} (FPR resolution {_fmt(p.get('fpr_resolution'))})" if "tpr" in p else "n/a"
        parts.append(f"<tr><td>{name}</td><td>{_fmt(p.get('auc'))}</td><td>{tpr}</td>"
                     f"<td>{p.get('n_members')} / {p.get('n_nonmembers')}</td></tr>")
    return "".join(parts) + "</table>"


def write_certificate(ledger_path: str | Path, request_id: str, out_dir: str | Path, *,
                      entries: list[dict] | None = None,
                      chain: tuple[bool, list[str]] | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<REQ>.json`` and ``<REQ>.html``; returns their paths. ``entries`` (the
    request's ledger entries) and ``chain`` (the ledger's hash-chain check, ``(ok, problems)``)
    when the caller has them already, e.g. the console's ledger view (a full re-hash per download
    made its page slow); read from the ledger otherwise."""
    ledger = ErasureLedger(ledger_path, create=False) if entries is None or chain is None else None
    entries = ledger.entries(request_id) if entries is None else entries
    if not entries:
        known = ", ".join(r["request"] for r in ErasureLedger(ledger_path, create=False).requests()) or "none"
        raise ConfigError(f"no erasure request {request_id!r} in {ledger_path} (requests: {known})")
    ok, problems = ledger.verify() if chain is None else chain
    s = summarise(entries)
    out = Path(out_dir)
    json_path, html_path = out / f"{request_id}.json", out / f"{request_id}.html"
    write_json(json_path, {"certificate": s, "ledger": str(ledger_path), "chain_intact": ok,
                           "chain_problems": problems, "entries": entries})
    with atomic_path(html_path) as tmp:
        Path(tmp).write_text(render_html(s, ok, problems, str(ledger_path)))
    return json_path, html_path
