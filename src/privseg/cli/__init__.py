"""Command-line interface: a thin layer over the Python API.

Each sub-command module parses arguments, calls the API and prints with rich.
Every :class:`PrivsegError` becomes one line on stderr and exit code 2.
"""

import sys

import click
import typer

from privseg.cli import audit, console, data, erase, export, fl, privacy, runs, train
from privseg.errors import PrivsegError

# click itself suggests a close command name ("Did you mean 'run'?"); typer's suggestion would repeat it
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, suggest_commands=False,
                  help="privseg: private federated segmentation, unlearning and audits.")
for command in (train.train, train.evaluate, train.predict, train.unlearn, runs.report):
    app.command()(command)
for name, group in (("data", data.app), ("audit", audit.app), ("fl", fl.app), ("privacy", privacy.app),
                    ("runs", runs.app), ("erase", erase.app), ("ledger", erase.ledger_app), ("console", console.app),
                    ("export", export.app)):
    app.add_typer(group, name=name)


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
