"""The run folders under the console's root: which names are runs, and the sites they hold.

A run is a direct sub-folder of the root holding ``fl_config.json`` and ``state.json`` (what
``privseg fl run --runs ROOT --name NAME`` writes). Names from URLs are checked against a
strict pattern and the resolved folder must sit directly in the root, so ``../`` or a link out
of the root never reaches a file. Everything above (accounts, caches, views) finds runs here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def read_dict(path: Path) -> dict:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object (a page
    shows what it can of a run being written)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_run(root: Path, name: str) -> Path | None:
    """The run folder called ``name`` directly under ``root``, or None."""
    if not isinstance(name, str) or not _RUN.match(name) or ".." in name:
        return None
    d = root / name
    try:
        if d.resolve().parent != root.resolve():
            return None
    except OSError:
        return None
    return d if (d / "fl_config.json").is_file() and (d / "state.json").is_file() else None


def run_dirs(root: Path) -> list[Path]:
    """The run folders directly under ``root``, by name; none when it cannot be listed."""
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [d for d in children if resolve_run(root, d.name) is not None]


def run_sites(cfg: dict) -> tuple[list[str], list[str]]:
    """(current sites, sites erased from the run)."""
    sites = [str(s.get("id")) for s in cfg.get("sites", []) if isinstance(s, dict)]
    return sites, [str(s) for s in (cfg.get("extra") or {}).get("withdrawn_sites", [])]


def known_sites(root: Path) -> set[str]:
    """Every site of the runs under ``root``, those erased from a run included (their users still
    read its history); empty when there is no run yet."""
    out: set[str] = set()
    for d in run_dirs(root):
        current, withdrawn = run_sites(read_dict(d / "fl_config.json"))
        out.update(current, withdrawn)
    return out
