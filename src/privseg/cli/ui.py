"""Rich helpers shared by the sub-commands: progress bars and tables."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out = Console()

# Redirected output gets a plain line at every tenth of the work, and at least this often.
PLAIN_EVERY_S = 30.0


class _DropFlowerSimulationDeprecation(logging.Filter):
    """Flower logs "DEPRECATED FEATURE: The `run_simulation` function ..." at every simulation.
    The advice (use `flwr run`) is for code that calls Flower; privseg calls run_simulation itself
    because it drives the rounds in this process (progress, run state, resume), so a user can do
    nothing about the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def silence_known_noise() -> None:
    """Hide third-party warnings that ask nothing of a privseg user (each with its reason)."""
    flwr = logging.getLogger("flwr")
    if not any(isinstance(f, _DropFlowerSimulationDeprecation) for f in flwr.filters):
        flwr.addFilter(_DropFlowerSimulationDeprecation())
    # Ray's tip announces that zero-GPU actors will one day see the GPUs. privseg gives simulated
    # sites num_gpus=0 and relies on today's behaviour (Ray hides the GPUs from them); nothing to do.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray, Ray will no longer override",
                            category=FutureWarning)


silence_known_noise()


def _plain(description: str, total: int) -> tuple[Callable[..., None], Callable[[], None]]:
    """Log lines for a non-terminal stderr (a file, a pipe, CI): a live bar would be written
    there as one frame at the end, or as control codes."""
    state = {"description": description, "total": total, "t0": time.monotonic(), "last_t": None,
             "last_tenth": -1, "line": None}

    def emit(completed: int, info: str) -> None:
        total_ = max(int(state["total"]), 1)
        line = f"{state['description']}: {completed}/{state['total']}" + (f"  {info}" if info else "") \
            + f"  ({time.monotonic() - state['t0']:.0f} s)"
        console.print(line, highlight=False, markup=True, soft_wrap=True)
        state["last_t"], state["last_tenth"], state["line"] = time.monotonic(), 10 * completed // total_, None

    def update(completed: int, info: str = "", *, total: int | None = None, description: str | None = None) -> None:
        if total is not None or description is not None:  # a new phase starts its own count
            close()  # after the last state of the phase before
            state["total"] = state["total"] if total is None else total
            state["description"] = description or state["description"]
            state["t0"], state["last_t"], state["last_tenth"] = time.monotonic(), None, -1
        total_ = max(int(state["total"]), 1)
        due = (state["last_t"] is None or 10 * completed // total_ > state["last_tenth"]
               or completed >= state["total"] or time.monotonic() - state["last_t"] >= PLAIN_EVERY_S)
        if due:
            emit(completed, info)
        else:
            state["line"] = (completed, info)

    def close() -> None:
        pending = state["line"]
        if pending is not None:  # the last state reached is always reported
            emit(*pending)

    return update, close


@contextmanager
def progress(description: str, total: int, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """Yield ``update(completed, info="", *, total=None, description=None)``; silent with ``quiet``.

    Nothing is shown before the first update, so a command that fails while reading its data
    prints only the error (not a bar stuck at 0). ``total``/``description`` start a new phase
    (e.g. evaluating after training). On a terminal this is a Rich bar; otherwise plain lines."""
    if quiet:
        yield lambda *a, **k: None
        return
    if not console.is_terminal:
        update, close = _plain(description, total)
        try:
            yield update
        finally:
            close()
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False)
    task = None

    def rich_update(completed: int, info: str = "", *, total: int | None = None,
                    description: str | None = None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description or desc0, total=total if total is not None else total0, info="")
        elif total is not None or description is not None:
            bar.stop_task(task)  # the finished phase stays on screen; the new one gets its own line
            task = bar.add_task(description or bar.tasks[-1].description, info="",
                                total=total if total is not None else bar.tasks[-1].total)
        bar.update(task, completed=completed, info=info)

    desc0, total0 = description, total
    try:
        yield rich_update
    finally:
        if task is not None:
            bar.stop()


TEXT_COLUMNS = ("subject", "site", "split", "class", "strategy", "metric")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in TEXT_COLUMNS else "right")
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    return t
