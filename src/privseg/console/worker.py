"""One erasure job, in its own process: ``python -m privseg.console.worker ROOT RUN REQUEST``.

A separate process so training does not slow the pages, a crash does not take the console
down, and the job can outlive a console restart. The erasure it runs holds the run's lock for
the whole job (training and other erasures wait); it reports each stage to the console's store,
and records the outcome. Exit codes: 0 done (completed or verification failed), 1 failed, 75 the run is
busy (the job stays queued).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from privseg.console import erasure
from privseg.console.folders import resolve_run
from privseg.console.store import Store
from privseg.errors import PrivsegError
from privseg.federated.runstate import RunBusy

BUSY = 75


def run_job(root: Path, run: str, rid: str) -> int:
    store = Store(root)
    rec = store.get(run, rid)
    run_dir = resolve_run(root, run)
    if rec is None or rec["state"] != "running" or run_dir is None:
        return 1
    try:  # the erasure holds the run's lock for the whole job (training and other erasures wait)
        res = erasure.apply(run_dir, rec, on_stage=lambda stage, msg: store.stage(run, rid, stage, msg))
    except RunBusy as exc:  # training (or a CLI erasure) holds the run: wait for it
        store.requeue(run, rid, f"waiting: {exc}")
        return BUSY
    except PrivsegError as exc:
        store.finish(run, rid, "failed", f"{type(exc).__name__}: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the officer, with the trace in the job log
        traceback.print_exc()
        store.finish(run, rid, "failed", f"{type(exc).__name__}: {exc}")
        return 1
    if res.status == "verification-failed":
        failed = "; ".join(res.verification.get("failed_checks", []))
        store.finish(run, rid, "verification-failed", f"verification failed: {failed}")
    else:
        store.finish(run, rid, "completed", "completed" if res.status == "completed"
                     else "already completed: nothing applied again")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
