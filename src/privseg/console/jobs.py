"""The console's job runner: starts approved erasures, one at a time per run, and reconciles
jobs whose process ended without saying so.

A thread in the console looks at the store every ``interval`` seconds:

* a ``running`` job whose worker process is gone (killed, machine restarted, the console
  restarted and the worker with it) is reconciled against the run's erasure ledger: completed
  there -> reported completed; otherwise it goes back to the queue and the next worker resumes
  it from the ledger's last stage (the erasure never applies a stage twice). A job that died
  ``max_attempts`` times is reported failed;
* a worker that is still alive after a console restart is adopted (checked by its command
  line, so a recycled PID is not mistaken for it);
* a ``queued`` job starts when no other job of the same run is running; a job that found the
  run busy (training holds its lock) is retried after ``busy_retry_s``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from privseg.audit.ledger import ErasureLedger
from privseg.console.db import console_dir
from privseg.console.erasure import ledger_path
from privseg.console.folders import resolve_run
from privseg.console.store import Store


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class JobRunner:
    def __init__(self, root: str | Path, interval: float = 0.5, busy_retry_s: float = 5.0, max_attempts: int = 3):
        self.root = Path(root)
        self.store = Store(self.root)
        self.interval, self.busy_retry_s, self.max_attempts = interval, busy_retry_s, max_attempts
        self._procs: dict[tuple[str, str], subprocess.Popen] = {}
        self._not_before: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="privseg-console-jobs", daemon=True)
        self._thread.start()

    def stop(self, kill_workers: bool = False) -> None:
        """Stop watching. Workers go on (a restarted console adopts them) unless ``kill_workers``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if kill_workers:
            for p in self._procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the runner must outlive one bad pass
                print(f"privseg console: job runner: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop.wait(self.interval)

    def wake(self) -> None:
        """Run a pass now (after an approval), instead of at the next interval."""
        threading.Thread(target=self.tick, daemon=True).start()

    # -- one pass ------------------------------------------------------------------------
    def alive(self, rec: dict) -> bool:
        key = (rec["run"], rec["id"])
        p = self._procs.get(key)
        if p is not None:
            if p.poll() is None:
                return True
            del self._procs[key]
            return False
        pid = rec.get("pid")
        return bool(pid) and "privseg.console.worker" in (cmd := _cmdline(int(pid))) and rec["id"] in cmd

    def tick(self) -> None:
        with self._lock:
            busy = set()
            for rec in self.store.list(states=("running",)):
                if self.alive(rec):
                    busy.add(rec["run"])
                    continue
                cur = self.store.get(rec["run"], rec["id"])
                if cur is not None and cur["state"] == "running":  # the worker ended without a word
                    self._reconcile(cur)
            now = time.time()
            for rec in reversed(self.store.list(states=("queued",))):  # oldest first
                key = (rec["run"], rec["id"])
                if rec["run"] in busy or self._not_before.get(key, 0) > now:
                    continue
                self._spawn(rec)
                busy.add(rec["run"])

    def _reconcile(self, rec: dict) -> None:
        run_dir = resolve_run(self.root, rec["run"])
        events = []
        if run_dir is not None and ledger_path(run_dir).exists():
            events = [e["event"] for e in ErasureLedger(ledger_path(run_dir)).entries(rec["id"])]
        if "completed" in events:
            self.store.finish(rec["run"], rec["id"], "completed",
                              "completed (found in the erasure ledger after the job's process ended)")
        elif run_dir is None or rec["attempts"] >= self.max_attempts:
            self.store.finish(rec["run"], rec["id"], "failed",
                              "the run folder is gone" if run_dir is None else
                              f"the job's process ended {rec['attempts']} times without finishing "
                              f"(last stage: {events[-1] if events else 'none'}); see the job log")
        else:
            self.store.requeue(rec["run"], rec["id"], "the job's process ended; resuming from the ledger "
                               f"(last stage recorded: {events[-1] if events else 'none'})")

    def _spawn(self, rec: dict) -> None:
        run, rid = rec["run"], rec["id"]
        self.store.start(run, rid, pid=0)
        log_dir = console_dir(self.root) / "jobs"
        log_dir.mkdir(exist_ok=True)
        with open(log_dir / f"{run}-{rid}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "privseg.console.worker", str(self.root), run, rid],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # outlives a console restart; adopted after it
        self._procs[(run, rid)] = p
        self.store.set_pid(run, rid, p.pid)
        self._not_before[(run, rid)] = time.time() + self.busy_retry_s  # if it finds the run busy

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (tests, shutdown); True when idle."""
        end = time.time() + timeout
        while time.time() < end:
            if not self.store.list(states=("queued", "running")):
                return True
            time.sleep(0.2)
        return False
