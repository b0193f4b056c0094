"""`privseg console`: the privacy officer's web console over a runs folder, and its accounts."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import typer

from privseg.cli.ui import console as err
from privseg.cli.ui import out
from privseg.errors import ConfigError
from privseg.report.text import table

app = typer.Typer(help="The privacy officer's web console: erasure requests, budgets, certificates, with roles.",
                  invoke_without_command=True)
_RUNS = typer.Option(Path("runs"), "--runs", help="Folder holding the federated run folders.")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _accounts(runs: Path, must_exist: bool = True):
    from privseg.console.accounts import Accounts

    if must_exist and not runs.is_dir():
        raise ConfigError(f"--runs {runs}: no such folder")
    return Accounts(runs)


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
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from privseg.console import create_app

    if (certfile is None) != (keyfile is None):
        raise ConfigError("give both --certfile and --keyfile for TLS, or neither")
    for p in (certfile, keyfile):
        if p is not None and not p.is_file():
            raise ConfigError(f"{p}: no such file")
    if not _accounts(runs).users():
        err.print(f"[yellow]no account yet[/yellow]: add one with `privseg console add-user NAME --role officer "
                  f"--runs {runs}`")
    if not _loopback(host) and certfile is None:
        err.print(f"[yellow]warning[/yellow]: serving on {host} without TLS: passwords and cookies cross the "
                  "network in clear text (use --certfile/--keyfile)")
    tls = certfile is not None
    err.print(f"privseg console on {'https' if tls else 'http'}://{host}:{port}/ over {runs}")
    uvicorn.run(create_app(runs, secure=tls, idle_minutes=idle_minutes, max_hours=max_hours), host=host, port=port,
                ssl_certfile=str(certfile) if tls else None, ssl_keyfile=str(keyfile) if tls else None,
                log_level="warning", proxy_headers=False, server_header=False)


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
    accounts = _accounts(runs)
    if not replace and accounts.get(name) is not None:
        raise ConfigError(f"user {name} exists (use --replace to change role, site or password)")
    password = (sys.stdin.readline().rstrip("\r\n") if password_stdin
                else typer.prompt("Password", hide_input=True, confirmation_prompt=True))
    user = accounts.add_user(name, role, password, site=site, replace=replace)
    out.print(f"user {user.name}: {user.role}" + (f" of site {user.site}" if user.site else ""))


@app.command("users")
def users(runs: Path = _RUNS) -> None:
    """List the console's accounts."""
    out.print(table(f"console users ({runs})", ["name", "role", "site"],
                    [[u.name, u.role, u.site or "all"] for u in _accounts(runs, False).users()]))


@app.command("remove-user")
def remove_user(name: str = typer.Argument(...), runs: Path = _RUNS) -> None:
    """Remove an account (its sessions end at once)."""
    if not _accounts(runs, False).remove_user(name):
        raise ConfigError(f"no user {name}")
    out.print(f"user {name} removed")
