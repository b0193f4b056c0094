"""The run folder of a federated run: ``runs/<name>/``.

::

    runs/<name>/
      fl_config.json            FLConfig (sites, strategy, TrainConfig, ...)
      state.json                rounds done, per-round participants / failures / metrics,
                                path of the last global checkpoint (written atomically)
      checkpoints/global_r0003.pt   global model after round 3 (save_checkpoint, weights-only)
      updates/r0003/H1.pt       optional: site H1's update in round 3 (keep_updates)
      server_private/participation.jsonl   client-level DP: who took part in each round (0600;
                                never in state.json, a checkpoint, a status or a report)
      sites/H1/local_r0003.pt   site-local state (FedBN norm layers) after round 3
      app/pyproject.toml        Flower app config for ``flwr run`` (deployment)

Write order per round: checkpoint (and updates) first, then ``state.json``; a crash between
the two repeats that round on resume, and training is deterministic by (seed, site, round),
so the repeat gives the same model.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from privseg.errors import ConfigError, DataError
from privseg.utils import try_lock_file, write_json

STATE_NAME = "state.json"
PARTICIPATION_FILE = Path("server_private") / "participation.jsonl"  # client-level DP: server-only


def participation(run_dir: str | Path) -> dict[int, dict]:
    """Round -> the server-private record of who took part (client-level DP,
    :func:`privseg.federated.private.public_round_entry`); the last record of a round wins (a
    round re-run after a crash)."""
    path = Path(run_dir) / PARTICIPATION_FILE
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash: that round was not recorded in state.json either
        out[int(rec.pop("round"))] = rec
    return out


class RunState:
    """Rounds done and what happened in each; one JSON document, rewritten atomically."""

    def __init__(self, run_dir: str | Path, data: dict | None = None):
        self.run_dir = Path(run_dir)
        self.data = data or {"version": 1, "status": "new", "rounds_done": 0, "last_checkpoint": None,
                             "rounds": [], "created": time.time()}

    # -- persistence ---------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.run_dir / STATE_NAME

    @classmethod
    def load(cls, run_dir: str | Path) -> RunState:
        path = Path(run_dir) / STATE_NAME
        try:
            return cls(run_dir, json.loads(path.read_text()))
        except FileNotFoundError:
            raise DataError(path, "no federated run state here (state.json missing)") from None
        except json.JSONDecodeError as exc:
            raise DataError(path, f"run state is not valid JSON ({exc})") from None

    @classmethod
    def load_or_new(cls, run_dir: str | Path) -> RunState:
        return cls.load(run_dir) if (Path(run_dir) / STATE_NAME).is_file() else cls(run_dir)

    def save(self) -> None:
        self.data["updated"] = time.time()
        write_json(self.path, self.data)

    # -- accessors -----------------------------------------------------------
    @property
    def rounds_done(self) -> int:
        return int(self.data.get("rounds_done", 0))

    @property
    def rounds(self) -> list[dict]:
        return self.data.setdefault("rounds", [])

    @property
    def status(self) -> str:
        return self.data.get("status", "new")

    def set_status(self, status: str, **extra) -> None:
        self.data["status"] = status
        self.data.update(extra)
        self.save()

    @property
    def last_checkpoint(self) -> Path | None:
        rel = self.data.get("last_checkpoint")
        return self.run_dir / rel if rel else None

    def checkpoint_path(self, server_round: int) -> Path:
        return self.run_dir / "checkpoints" / f"global_r{server_round:04d}.pt"

    def update_path(self, server_round: int, site: str) -> Path:
        return self.run_dir / "updates" / f"r{server_round:04d}" / f"{site}.pt"

    def record_round(self, entry: dict, checkpoint: Path) -> None:
        """Append (or replace, on a repeated round) one round's record and mark it done."""
        r = int(entry["round"])
        self.data["rounds"] = [e for e in self.rounds if int(e["round"]) < r] + [entry]
        self.data["rounds_done"] = r
        self.data["last_checkpoint"] = str(checkpoint.relative_to(self.run_dir))
        self.save()

    @property
    def restart_from(self) -> dict | None:
        """Set by an erasure: ``{"after_round", "checkpoint", "request"}`` -- the rounds after
        ``after_round`` start from ``checkpoint`` (the unlearned model), not from the last one."""
        return self.data.get("restart_from")

    def rounds_of_site(self, site: str) -> list[int]:
        """Rounds whose aggregate included ``site``'s update (what an erasure of the site touches)."""
        secret = participation(self.run_dir)  # client-level DP: who took part is kept on the server only
        rounds = [{**e, **secret.get(int(e["round"]), {})} if "participation" in e else e for e in self.rounds]
        return [int(e["round"]) for e in rounds if e.get("applied") and site in e.get("participants", [])
                and site not in {x.get("site") for x in e.get("rejected", [])}]

    def site_metrics(self) -> dict[str, dict]:
        """Latest evaluation per site."""
        latest: dict[str, dict] = {}
        for e in self.rounds:
            for site, m in (e.get("eval") or {}).get("sites", {}).items():
                latest[site] = {"round": e["round"], **m}
        return latest


# -- one writer per run ------------------------------------------------------------
class RunBusy(ConfigError):
    """Another process holds the run's lock (training, an erasure): try again once it has finished."""


_HELD: dict[str, list] = {}  # lock path -> [open file, depth]: re-entrant within a process


@contextmanager
def hold_run(run_dir: str | Path, what: str):
    """Hold the run's lock (``run_dir/.lock``) while training or erasing; a second holder in
    another process gets a clear error instead of both writing the run. The lock is an OS
    file lock, so a killed process releases it."""
    path = Path(run_dir) / ".lock"
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    f, holder = try_lock_file(path, f"{what} (pid {os.getpid()})")
    if f is None:
        raise RunBusy(f"run {Path(run_dir).name} is busy: {holder or 'another process'} holds it; "
                          "try again when it has finished")
    _HELD[key] = [f, 1]
    try:
        yield
    finally:
        del _HELD[key]
        f.close()
