"""The model card: what data the model saw, what privacy it carries, which erasures were applied, how
well it segments held-out patients, and how it was trained. Markdown (the bundle's docs/README.md)
and one self-contained HTML page. Every privacy figure is the statement's (:mod:`.statement`), which
``privseg export verify`` recomputes from the run's ledgers."""

from __future__ import annotations

import html
import re


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def first_line(s: dict) -> str:
    if s["pending"]:
        return (f"**NOT CLEARED FOR USE: erasure request(s) {', '.join(s['pending'])} are not completed; "
                "this model may still carry those patients (exported with --allow-pending).**")
    dp = s["dp"]
    if dp["private"]:
        eps = ", ".join(f"{k} ε = {_num(v['epsilon'])} (δ = {v['delta']:g})" for k, v in dp["sites"].items())
        return f"**{dp['unit']}-level differential privacy per site, as the ledgers prove: {eps}.**"
    return f"**{dp['reason']}.**"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_num(c) for c in r) + " |" for r in rows] + [""]


def markdown(s: dict, ev: dict, meta: dict) -> str:
    """The card as Markdown (``s``: the privacy statement; ``ev``: held-out evaluation; ``meta``:
    model, training settings and export facts)."""
    lines = [first_line(s), "", f"# Model card: {meta['name']}", "",
             f"Exported by privseg {meta['privseg_version']} on {meta['exported_at']} from `{s['model']['path']}`"
             f" (SHA-256 `{s['model']['sha256']}`" + (f", round {s['model']['round']}" if s["model"]["round"] else "")
             + f") of run `{s['model']['run']}`." if s["model"]["run"] else
             f"Exported by privseg from the checkpoint `{s['model']['path']}` (no run folder).", "",
             "## Data", ""]
    lines += _table(["site", "training patients", "training scans", "held-out patients"],
                    [[k, v["patients"], v["scans"], v["held_out_patients"]] for k, v in s["sites"].items()])
    dp = s["dp"]
    lines += ["## Differential privacy", ""]
    if dp["sites"]:
        lines += [f"DP unit: {dp['unit']}. ε and δ per site as the site's ledger proves them "
                  "(the figures `privseg privacy status` prints):", ""]
        lines += _table(["site", "ε", "δ", "ε budget", "rounds booked", "guarantee"],
                        [[k, v["epsilon"], f"{v['delta']:g}", v["epsilon_budget"], v["rounds"],
                          "private" if v["private"] else v["guarantee"]] for k, v in dp["sites"].items()])
    lines += [f"Status: {dp['reason']}.", ""]
    er = s["erasures"]
    lines += ["## Erasures applied", ""]
    if er["requests"]:
        lines += [f"Erasure ledger `{er['ledger']}`, hash chain {'intact' if er['chain_intact'] else 'BROKEN'}.", ""]
        lines += _table(["request", "patients / site", "status", "verification", "membership test",
                         "certificate hash (last ledger entry)"],
                        [[r["request"], ", ".join(r["subjects"]) + f" at {r['site']}" if r["subjects"]
                          else f"site {r['site']}", r["status"], r["verification"] or "not run",
                          r["membership"] or "not run", f"`{r['certificate_hash']}`"] for r in er["requests"]])
    else:
        lines += ["None recorded.", ""]
    lines += ["## Evaluation on held-out patients", ""]
    if ev.get("n", 1) and "overall" in ev:
        classes = ev["classes"][1:]
        rows = [["all", ev["overall"]["n"], *ev["overall"]["dice"], ev["overall"]["mean_dice"]]]
        rows += [[site, v["n"], *v["dice"], v["mean_dice"]] for site, v in ev["sites"].items()]
        lines += _table(["site", "held-out scans", *[f"Dice {c}" for c in classes], "mean Dice"], rows)
    else:
        lines += [ev.get("note", "not evaluated"), ""]
    t = meta["training"]
    lines += ["## Model and training", ""]
    lines += _table(["setting", "value"], [[k, v] for k, v in t.items()])
    lines += ["## Intended use and limits", "",
              "- Research use on images like the training data: the same modality, channels and intensity "
              "preprocessing (recorded in `configs/metadata.json`). Not a medical device; a clinician reviews "
              "every segmentation.",
              "- The Dice figures are from the held-out patients of the sites above; other scanners, populations "
              "or protocols may segment worse.",
              "- The privacy figures bound what the model reveals about any one patient of a site only where "
              "the table says *private*; an erasure's evidence is the certificate the hash names.",
              *(["- FedBN: each site kept its own normalisation layers; this export holds the global ones, which "
                 "no site trained with as they are. Check it on your data before use."]
                if t.get("strategy") == "fedbn" else []),
              "", "## Checking this card", "",
              "`privseg export verify DIR` recomputes this statement from the run's ledgers and checks the "
              "hashes of the exported files.", ""]
    return "\n".join(lines)


def to_html(md: str, title: str) -> str:
    """The card as one printable HTML page (no script, no external resource)."""
    body, table = [], []

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in table if not set(r) <= set("|-")]
            body.append("<table>" + "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</"
                                                             f"{'th' if i == 0 else 'td'}>" for c in r) + "</tr>"
                                            for i, r in enumerate(cells)) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<p>&bull; {inline(line[2:])}</p>")
        elif line:
            body.append(f"<p>{inline(line)}</p>")
    flush()
    css = ("body{font-family:Helvetica,Arial,sans-serif;max-width:60em;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.3em .6em}"
           "code{font-size:.85em;word-break:break-all}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>{''.join(body)}</body></html>")
