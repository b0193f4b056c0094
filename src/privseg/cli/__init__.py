"""Command-line interface: a thin layer over the Python API.

Each sub-command module parses arguments, calls the API and prints with rich.
Every :class:`PrivsegError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click
import typer

from privseg.cli import audit as audit_cmds
from privseg.cli import data as data_cmds
from privseg.cli import train as train_cmds
from privseg.cli import unlearn as unlearn_cmds
from privseg.errors import PrivsegError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="privseg: private federated segmentation, unlearning and audits.")
app.add_typer(data_cmds.app, name="data")
train_cmds.register(app)
unlearn_cmds.register(app)
app.add_typer(audit_cmds.app, name="audit")
app.add_typer(__import__("privseg.cli.fl", fromlist=["app"]).app, name="fl")
app.add_typer(__import__("privseg.cli.privacy", fromlist=["app"]).app, name="privacy")
__import__("privseg.cli.report", fromlist=["register"]).register(app)
app.add_typer(__import__("privseg.cli.runs", fromlist=["app"]).app, name="runs")
__import__("privseg.cli.erase", fromlist=["register"]).register(app)
__import__("privseg.cli.console", fromlist=["register"]).register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here instead of raising
        if isinstance(code, int) and code:
            return code
    except PrivsegError as exc:
        print(f"privseg: error: {exc}", file=sys.stderr)
        return 2
    except click.exceptions.UsageError as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("privseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
