"""The model each site of a federated run serves, for the views (``privseg report``, the console).

From ``personalisation.json`` (:mod:`privseg.federated.personalise`): per site, the **test** Dice
of the global model, each personalised model and the local-only model, the model the site serves
(chosen by the per-site guard on its **validation** patients) with its validation Dice, and the
reason when an erasure left the site on the global model (:mod:`privseg.erasure.personalised`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privseg.federated.personalise import GLOBAL, read_personalisation

LOCAL = "local"  # personalise's local-only method: named "local-only" in the views


def label(method: str) -> str:
    """A model's name for a reader: global, personalised (finetune), local-only."""
    return "global" if method == GLOBAL else "local-only" if method == LOCAL else f"personalised ({method})"


def served_view(run_dir: str | Path, visible: Callable[[str], bool] = lambda site: True) -> dict | None:
    """``{"columns": [(method, label)], "rows": [...], "global_round", "erasure"}`` for the sites
    ``visible`` lets through (a site user sees its own), or None before ``fl personalise`` ran.
    A row: site, ``dice`` (method -> test Dice, None where not trained), ``serves``, its label,
    ``val_dice`` (the served model's validation Dice) and ``note`` (why it fell back, if it did)."""
    res = read_personalisation(run_dir)
    if not res:
        return None
    methods = [GLOBAL, *res.get("methods", [])]
    rows = [{"site": site, "dice": {m: (r.get("test_dice") or {}).get(m) for m in methods}, "serves": r["serves"],
             "serves_label": label(r["serves"]), "val_dice": (r.get("val_dice") or {}).get(r["serves"]),
             "note": r.get("fallback") or ""}
            for site, r in sorted(res.get("sites", {}).items()) if visible(site)]
    return {"columns": [(m, label(m)) for m in methods], "rows": rows, "global_round": res.get("global_round"),
            "erasure": res.get("erasure")}
