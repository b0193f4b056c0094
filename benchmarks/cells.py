"""Resumable benchmark cells, shared by every benchmark script.

A benchmark is a list of named cells (task x method x epsilon x seed ...). Each finished cell
is written atomically to ``benchmarks/runs/<bench>/cells/<cell>.json`` (metrics, seconds,
versions, command); a cell already there is skipped, so a killed run loses at most the cell in
flight. After every cell the finished ones are merged into ``benchmarks/results/<bench>.json``
and ``.md`` with ``cells_done`` / ``cells_total`` and an estimate of the time left; ``--summary``
merges again without running anything (after the merge code changed, or beside a running runner).

A cell file that does not parse, names another cell, or was written by another version of the
benchmark (or with other parameters) is recomputed, never merged. One runner of the whole benchmark
at a time: a second one refuses (an OS file lock, released when the holder dies). A runner of
chosen cells (``--cells``) may run beside it, for a second core: every cell is locked while it
runs, so two runners never run the same cell (the other one skips it). Choosing cells whose inputs
are done (e.g. the erasure benchmark's patient cells once ``calibrated-original`` is) is up to you.

Everything else a cell writes (trained weights, cohorts, logs) goes under
``benchmarks/runs/<bench>/work/`` and stays out of git; only ``cells/*.json`` are committed.

Usage from a benchmark script::

    ap = argparse.ArgumentParser(); cells.add_args(ap); ...; args = ap.parse_args(argv)
    return cells.run("federated", VERSION, cell_list, run_cell, merge, render, args, argv)

with ``run_cell(cell, work_dir) -> metrics dict``, ``merge(done) -> summary dict`` and
``render(summary, done) -> markdown lines``; ``done`` maps cell name to its record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,150}$")

EXIT_UNKNOWN_CELL = 2
EXIT_LOCKED = 3


@dataclass(frozen=True)
class Cell:
    """One unit of work. ``params`` fully describe it (they are checked on resume); ``cost`` is its
    expected time relative to the other cells, for the estimate of the time left."""

    name: str
    params: dict = field(default_factory=dict)
    cost: float = 1.0

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"cell name {self.name!r}: use letters, digits and _ . = + - only")


class LockedError(RuntimeError):
    pass


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="skip cells already done (default); --no-resume recomputes every selected cell")
    ap.add_argument("--cells", default=None, help="comma-separated cell names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the cells and whether each is done, then exit")
    ap.add_argument("--summary", action="store_true",
                    help="merge the finished cells into the results (.json, .md) and exit: runs no cell, takes no "
                         "runner lock (safe beside a running benchmark)")
    ap.add_argument("--runs", type=Path, default=BENCH_DIR / "runs", help="where cells/ and work/ live")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="where the merged table goes")


def parse(doc: str, bench: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of a cell benchmark: the runner's options and ``--smoke`` (a tiny setting
    into a temporary folder: it checks the pipeline and is never the result)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny setting into a temporary folder (checks the pipeline; never the result)")
    args = ap.parse_args(argv)
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix=f"privseg-{bench}-smoke-"))
        args.runs, args.results = tmp / "runs", tmp / "results"
        print(f"smoke run in {tmp}", flush=True)
    return args


def shared_dir(args: argparse.Namespace, bench: str, setting: dict | None = None) -> Path:
    """Where a benchmark's cells share a cohort or trained models; with ``setting``, one folder per
    setting (the models of another setting are other models)."""
    if setting is None:
        return args.runs / bench / "work" / "_shared"
    key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    return args.runs / bench / "work" / f"_shared-{key}"


def write_study(name: str, out: dict, md: list[str]) -> None:
    """A side study's results: ``results/<name>.json`` and ``.md`` (a study without cells)."""
    res_dir = BENCH_DIR / "results"
    (res_dir / f"{name}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (res_dir / f"{name}.md").write_text("\n".join(md) + "\n")


def metrics_of(cells_dir: Path, name: str) -> dict:
    """The metrics of finished cell ``name`` (a later cell that builds on it reads them here)."""
    path = Path(cells_dir) / f"{name}.json"
    if not path.is_file():
        raise RuntimeError(f"cell {name} has not run yet ({path}); run it first: --cells {name}")
    return json.loads(path.read_text())["metrics"]


def versions(bench_version: str) -> dict:
    """The benchmark's version, Python's and the libraries' a result depends on (:func:`privseg.utils.versions`)."""
    from privseg.utils import versions as library_versions

    return {"benchmark": bench_version, "python": platform.python_version(), **library_versions()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, "
            f"OMP_NUM_THREADS={threads}")


def command(argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else "python"
    except ValueError:
        exe_s = "python"
    args = list(sys.argv[1:] if argv is None else argv)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join([exe_s, script_s, *args])


def _write_atomic(path: Path, text: str) -> None:
    from privseg.utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # a power cut must not leave a renamed but empty cell


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _holder() -> str:
    """What a lock file says of the runner holding it."""
    return f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"


class Runner:
    def __init__(self, bench: str, version: str, cells: Sequence[Cell], runs: Path, results: Path,
                 cmd: str = ""):
        names = [c.name for c in cells]
        if len(set(names)) != len(names):
            raise ValueError(f"{bench}: duplicate cell names")
        self.bench, self.version, self.cells, self.cmd = bench, version, list(cells), cmd
        self.root = Path(runs) / bench
        self.cells_dir, self.work = self.root / "cells", self.root / "work"
        self.results = Path(results)
        self._lock_fh = None

    # -- lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        from privseg.utils import try_lock_file

        path = self.root / "lock"
        fh, holder = try_lock_file(path, _holder())
        if fh is None:  # the file is held for the runner's lifetime
            raise LockedError(f"{self.bench}: another runner is working on this benchmark ({holder or 'unknown'}; "
                              f"lock {path}); wait for it to finish or stop that process, then run again")
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the flock
            self._lock_fh = None

    def lock_cell(self, cell: Cell):
        """(the open lock file, held while the cell runs, "") or (None, who is running it)."""
        from privseg.utils import try_lock_file

        return try_lock_file(self.root / "locks" / f"{cell.name}.lock", _holder())

    # -- cell files ---------------------------------------------------------------------
    def path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.name}.json"

    def load(self, cell: Cell) -> tuple[dict | None, str | None]:
        """The record of a finished cell, or (None, why it does not count)."""
        p = self.path(cell)
        if not p.exists():
            return None, None
        try:
            rec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"corrupt ({type(exc).__name__})"
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            return None, "corrupt (no metrics)"
        if rec.get("bench") != self.bench or rec.get("cell") != cell.name:
            return None, f"belongs to {rec.get('bench')}/{rec.get('cell')}"
        if rec.get("version") != self.version:
            return None, f"benchmark version {rec.get('version')!r}, now {self.version!r}"
        if rec.get("params") != _jsonable(cell.params):
            return None, "made with other parameters"
        return rec, None

    def done(self) -> dict[str, dict]:
        out = {}
        for c in self.cells:
            rec, _ = self.load(c)
            if rec is not None:
                out[c.name] = rec
        return out

    def save(self, cell: Cell, metrics: dict, seconds: float) -> dict:
        rec = {"bench": self.bench, "version": self.version, "cell": cell.name, "params": _jsonable(cell.params),
               "metrics": _jsonable(metrics), "seconds": seconds, "versions": versions(self.version),
               "command": self.cmd, "machine": machine(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_atomic(self.path(cell), json.dumps(rec, indent=2, sort_keys=True) + "\n")
        return rec

    # -- merge --------------------------------------------------------------------------
    def eta_s(self, done: dict[str, dict]) -> float | None:
        left = [c for c in self.cells if c.name not in done]
        if not left:
            return 0.0
        spent = sum(done[c.name]["seconds"] for c in self.cells if c.name in done)
        cost = sum(c.cost for c in self.cells if c.name in done)
        if cost <= 0:
            return None
        return spent / cost * sum(c.cost for c in left)

    def merge(self, merge_fn: Callable[[dict], dict], render_fn: Callable[[dict, dict], list[str]]) -> dict:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "merge.lock", "a") as fh:  # two runners: one merge at a time, each re-reads all
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            return self._merge(merge_fn, render_fn)

    def _merge(self, merge_fn, render_fn) -> dict:
        done = self.done()
        total = len(self.cells)
        eta = self.eta_s(done)
        summary = merge_fn(done) if done else {}
        out = {
            "benchmark": self.bench, "version": self.version, "command": self.cmd, "machine": machine(),
            "cells_done": len(done), "cells_total": total, "complete": len(done) == total,
            "eta_s": eta, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(self.version),
            **summary,
            "cells": {n: {"params": r["params"], "metrics": r["metrics"], "seconds": r["seconds"]}
                      for n, r in done.items()},
            "cells_missing": [c.name for c in self.cells if c.name not in done],
        }
        status = "complete" if out["complete"] else "PARTIAL"
        eta_s = "" if eta is None or out["complete"] else f"; about {eta / 60:.0f} min of compute left"
        md = [f"# {self.bench} benchmark", "",
              f"Command: `{self.cmd}`", "",
              f"Machine: {out['machine']}", "",
              f"Cells: {len(done)}/{total} ({status}{eta_s}); benchmark version `{self.version}`; "
              f"updated {out['updated']}", ""]
        if done:
            md += render_fn(out, done)
        if out["cells_missing"]:
            md += ["", f"Not yet run: {', '.join(out['cells_missing'])}"]
        _write_atomic(self.results / f"{self.bench}.json", json.dumps(out, indent=2) + "\n")
        _write_atomic(self.results / f"{self.bench}.md", "\n".join(md) + "\n")
        return out

    # -- the loop -----------------------------------------------------------------------
    def run(self, run_cell: Callable[[Cell, Path], dict], merge_fn, render_fn, selected: Sequence[Cell] | None = None,
            resume: bool = True, log=print) -> dict:
        todo = list(self.cells if selected is None else selected)
        if selected is None:
            self.lock()
        try:
            merged = self.merge(merge_fn, render_fn)  # a resumed run shows its state before the first new cell
            for k, cell in enumerate(todo, 1):
                rec, why = self.load(cell)
                if rec is not None and resume:
                    continue
                held, holder = self.lock_cell(cell)
                if held is None:
                    log(f"[{self.bench}] skipping {cell.name}: another runner is running it ({holder or 'unknown'})")
                    continue
                with held:
                    rec, why = self.load(cell)  # it may have finished in the other runner meanwhile
                    if rec is not None and resume:
                        continue
                    if why:
                        log(f"[{self.bench}] recomputing {cell.name}: the cell file {why}")
                    log(f"[{self.bench}] cell {k}/{len(todo)} {cell.name} ...")
                    t0 = time.perf_counter()
                    work = self.work / cell.name
                    work.mkdir(parents=True, exist_ok=True)
                    metrics = run_cell(cell, work)
                    seconds = time.perf_counter() - t0
                    self.save(cell, metrics, seconds)
                merged = self.merge(merge_fn, render_fn)
                eta = merged["eta_s"]
                log(f"[{self.bench}] {cell.name} done in {seconds:.0f} s; {merged['cells_done']}/"
                    f"{merged['cells_total']} cells" + (f", about {eta / 60:.0f} min left" if eta else ""))
            return merged
        finally:
            self.unlock()


def run(bench: str, version: str, cells: Sequence[Cell], run_cell, merge_fn, render_fn,
        args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """The command-line entry every benchmark script ends in; returns the exit status."""
    from privseg.runs import silence_known_noise

    silence_known_noise()  # the logs keep what asks something of the reader
    if args.summary:  # the results name the command that computes the cells, not the one that merged them
        argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--summary"]
    runner = Runner(bench, version, cells, args.runs, args.results, cmd=command(argv))
    by_name = {c.name: c for c in cells}
    selected = None
    if args.cells:
        wanted = [n.strip() for n in args.cells.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            print(f"{bench}: unknown cell(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
            return EXIT_UNKNOWN_CELL
        selected = [by_name[n] for n in wanted]
    if args.list:
        for c in cells:
            rec, why = runner.load(c)
            state = "done" if rec else (f"redo: {why}" if why else "todo")
            print(f"{c.name}\t{state}\t{json.dumps(c.params, sort_keys=True)}")
        return 0
    if args.summary:
        merged = runner.merge(merge_fn, render_fn)
        print(f"{bench}: {merged['cells_done']}/{merged['cells_total']} cells merged into "
              f"{runner.results / (bench + '.json')} and .md", flush=True)
        return 0
    try:
        merged = runner.run(run_cell, merge_fn, render_fn, selected, resume=args.resume,
                            log=lambda m: print(m, flush=True))
    except LockedError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_LOCKED
    print(f"{bench}: {merged['cells_done']}/{merged['cells_total']} cells; wrote "
          f"{runner.results / (bench + '.json')} and .md", flush=True)
    return 0
