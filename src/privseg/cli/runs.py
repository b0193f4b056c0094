"""`privseg runs list|show`: find past runs (train, federated, unlearn) under a runs folder."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import typer

from privseg.cli.ui import out, table

app = typer.Typer(no_args_is_help=True, help="Find past runs: list them, show one.")


def _date(ts) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OSError):
        return "-"


@app.command("list")
def list_runs(
    root: Path = typer.Argument(Path("runs"), help="Runs folder (searched 3 levels deep)."),
    kind: str = typer.Option(None, help="Only this kind: train, federated or unlearn."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Name, kind, date, status and key metric of every run, newest first."""
    from privseg.report.tracking import find_runs

    runs = [r for r in find_runs(root) if kind is None or r["kind"] == kind]
    if json_out:
        out.print_json(json.dumps([{k: v for k, v in r.items() if k not in ("config", "final")} for r in runs],
                                  default=str))
        return
    rows = [[r["name"], r["kind"], _date(r.get("date")), r.get("status") or "-", r["metric_name"],
             r["metric"] if r.get("metric") is not None else "-", r["path"]] for r in runs]
    out.print(table(f"{len(runs)} run(s) under {root}", ["name", "kind", "date", "status", "key metric", "value",
                                                          "path"], rows))


@app.command()
def show(
    run: Path = typer.Argument(..., help="Run folder, or a run's name under --root."),
    root: Path = typer.Option(Path("runs"), help="Runs folder to look the name up in."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Config and final metrics of one run."""
    from privseg.errors import DataError
    from privseg.report.tracking import describe_run, find_runs

    info = describe_run(run) if run.is_dir() else None
    if info is None and root.is_dir():
        named = [r for r in find_runs(root) if r["name"] == str(run) or Path(r["path"]).name == str(run)]
        info = named[0] if named else None
    if info is None:
        raise DataError(run, "not a run folder, and no run of that name under " + str(root))
    if json_out:
        out.print_json(json.dumps(info, default=str))
        return
    head = {k: info.get(k) for k in ("name", "kind", "status", "path", "cohort")}
    head["date"] = _date(info.get("date"))
    out.print(table("run", ["key", "value"], [[k, v] for k, v in head.items() if v is not None]))
    out.print(table("config", ["key", "value"], [[k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v]
                                                  for k, v in (info.get("config") or {}).items()]))
    out.print(table("final metrics", ["key", "value"], [[k, json.dumps(v, default=str) if isinstance(v, (dict, list))
                                                         else v] for k, v in (info.get("final") or {}).items()]))
