"""`privseg console`: the privacy officer's web console over a runs folder, and its accounts."""

import sys
from pathlib import Path

import typer

from privseg.cli.ui import console as err
from privseg.cli.ui import out
from privseg.console import serve as serve_console
from privseg.console.accounts import Accounts
from privseg.console.folders import known_sites
from privseg.report.text import print_users

app = typer.Typer(help="The privacy officer's web console: erasure requests, budgets, certificates, with roles.",
                  invoke_without_command=True)
_RUNS = typer.Option(Path("runs"), "--runs", help="Folder holding the federated run folders.")


@app.callback()
def serve(
    ctx: typer.Context, runs: Path = _RUNS,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8700, min=1, max=65535),
    certfile: Path = typer.Option(None, help="TLS certificate (PEM); with --keyfile, serve HTTPS."),
    keyfile: Path = typer.Option(None, help="TLS private key (PEM)."),
    idle_minutes: float = typer.Option(30.0, min=1, help="Log a session out after this long without a request."),
    max_hours: float = typer.Option(12.0, min=0.1, help="Log a session out after this long in any case."),
) -> None:
    """Serve the console over RUNS (`privseg console --runs demo_out/runs`). Add accounts first with
    `privseg console add-user`."""
    if ctx.invoked_subcommand is None:
        serve_console(runs, host=host, port=port, certfile=certfile, keyfile=keyfile, idle_minutes=idle_minutes,
                      max_hours=max_hours,
                      on_notice=lambda label, text: err.print(f"[yellow]{label}[/yellow]: {text}" if label else text))


@app.command("add-user")
def add_user(
    name: str = typer.Argument(..., help="User name."),
    role: str = typer.Option(..., help="officer (every site; approves erasures), site (one site) or viewer "
                             "(read-only)."),
    site: str = typer.Option(None, help="The user's site (required for --role site; optional for viewer)."),
    runs: Path = _RUNS,
    replace: bool = typer.Option(False, "--replace", help="Change an existing user (role, site, password)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from the first line "
                                        "of standard input (for scripts) instead of prompting."),
) -> None:
    """Add a console account. The password is prompted (never taken from the command line)."""
    accounts = Accounts.of_runs(runs)
    if not replace:
        accounts.refuse_existing(name)
    password = (sys.stdin.readline().rstrip("\r\n") if password_stdin
                else typer.prompt("Password", hide_input=True, confirmation_prompt=True))
    user = accounts.add_user(name, role, password, site=site, replace=replace)
    out.print(f"user {user.name}: {user.describe}")
    if user.site and not known_sites(runs):
        err.print(f"[yellow]note[/yellow]: no run under {runs} yet: site {user.site} was not checked", highlight=False)


@app.command("users")
def users(runs: Path = _RUNS) -> None:
    """List the console's accounts."""
    print_users(out, runs, Accounts(runs).users())


@app.command("remove-user")
def remove_user(name: str = typer.Argument(...), runs: Path = _RUNS) -> None:
    """Remove an account (its sessions end at once)."""
    Accounts(runs).remove_user(name, missing_ok=False)
    out.print(f"user {name} removed")
