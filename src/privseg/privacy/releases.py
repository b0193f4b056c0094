"""What a site has released: a fingerprint of every input of a DP release, and an append-only
record of the releases, kept beside the site's secret noise key.

A DP guarantee composes over *releases*. Two releases that drew the same noise under different
inputs are not two Gaussian mechanisms: their difference cancels the noise and leaves the
clipped sums (the audit of issue "noise reuse": ``C2 r1 - C1 r2`` against a noise 1000x larger).
So each release is identified by :func:`release_id`, a SHA-256 over everything that goes into
it -- the site, the ledger scope, the round, the step range, the site's plan and settings, the
input model's and optimiser's exact bytes, and the patients -- and

* its noise is drawn from the site key bound to that id (:meth:`NoiseSource.bound`): a request
  that differs in any input draws fresh noise, whatever the server sends;
* the site's ledger books it once (:class:`~privseg.privacy.budget.BudgetLedger` rows carry
  the id): a request identical to one already answered costs nothing more;
* :class:`ReleaseRecord` keeps the reply sent for it (written and fsync'd before the reply
  leaves), so an identical request gets the stored reply again, bit for bit -- also on a GPU
  whose kernels are not deterministic. A request identical to an answered one whose stored
  reply was pruned is refused: recomputing it could release a second, slightly different
  output under the same noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from privseg.errors import ConfigError, DataError
from privseg.utils import append_line, atomic_path, write_json

RECORD_FILE = "releases.jsonl"
PAYLOAD_DIR = "releases"
KEEP_PAYLOADS = 3  # the replies a resume can ask for again (the last rounds); older ones are indexed only
VERSION = b"privseg-release-v1"


def _feed_tensors(h, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _optimizer_tensors(optimizer) -> Iterable[tuple[str, object]]:
    state = optimizer.state_dict()
    for idx in sorted(state.get("state", {})):
        for k, v in sorted(state["state"][idx].items()):
            yield f"state.{idx}.{k}", v
    yield "param_groups", json.dumps(state.get("param_groups", []), sort_keys=True, default=str)


def release_id(*, site: str, scope: str, round_no: int, start: int, stop: int, settings: Mapping,
               model: torch.nn.Module, optimizer=None, patients: Iterable[str] = ()) -> str:
    """SHA-256 (hex) of every input of one DP release (see the module docstring). ``settings``:
    the plan, the DP spec and the training settings as JSON-able values."""
    h = hashlib.sha256(VERSION)
    h.update(json.dumps({"site": site, "scope": scope, "round": int(round_no), "start": int(start),
                         "stop": int(stop), "settings": settings, "patients": list(patients)},
                        sort_keys=True, default=str).encode())
    _feed_tensors(h, sorted(model.state_dict().items()))
    if optimizer is not None:
        for name, v in _optimizer_tensors(optimizer):
            if isinstance(v, torch.Tensor):
                _feed_tensors(h, [(name, v)])
            else:
                h.update(f"{name}={v}".encode())
    return h.hexdigest()


class ReleaseRecord:
    """The site's append-only record of its releases (``<state-dir>/releases.jsonl``, one JSON
    line per release, fsync'd) and the stored replies of the last :data:`KEEP_PAYLOADS`
    (``<state-dir>/releases/<id>.pt``)."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.index = self.dir / RECORD_FILE

    def entries(self) -> list[dict]:
        if not self.index.exists():
            return []
        out = []
        lines = self.index.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):
                    break  # a line torn by a crash while it was appended: its reply never left
                raise DataError(self.index, f"line {n} is not JSON: the release record is damaged") from None
        return out

    def find(self, rid: str) -> dict | None:
        return next((e for e in self.entries() if e.get("release") == rid), None)

    def _payload(self, rid: str) -> Path:
        return self.dir / PAYLOAD_DIR / f"{rid}.pt"

    def stored_reply(self, rid: str) -> dict | None:
        """The reply sent for ``rid`` (None: never answered). Raises when it was answered but its
        stored reply is gone (see the module docstring)."""
        entry = self.find(rid)
        if entry is None:
            return None
        path = self._payload(rid)
        if not path.exists():
            raise ConfigError(f"round {entry.get('round')} of scope {entry.get('scope') or 'the run'} was already "
                              f"answered with these exact inputs ({rid[:12]}) and its stored reply is no longer kept: "
                              "answering again could release a second output under the same noise. Resume from a "
                              "later round, or start a new scope")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged reply must name its file
            raise DataError(path, f"stored reply unreadable ({type(exc).__name__}: {exc})") from None

    def store(self, rid: str, reply: dict, **meta) -> None:
        """Keep ``reply`` for ``rid`` and append its line (each fsync'd) -- before the reply leaves."""
        path = self._payload(rid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(reply, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        append_line(self.index, {"release": rid, "time": time.time(), **meta}, sort_keys=True, default=str)
        self._prune()

    def _prune(self) -> None:
        payloads = sorted((self.dir / PAYLOAD_DIR).glob("*.pt"), key=lambda p: p.stat().st_mtime)
        for p in payloads[:-KEEP_PAYLOADS]:
            p.unlink(missing_ok=True)


TIMING_FILE = "dp_timing.json"
PAD_MARGIN = 1.25  # a round up to 25 % slower than the slowest so far still leaves at the deadline


class ReplyPacer:
    """Pads a DP site's reply to a deadline, so its timing does not say how many patients were
    sampled (a step with 0, 1, 2, 3 patients takes about 2, 25, 46, 66 ms on a CPU: the reply
    time of an unpadded round correlates with the number sampled at r ~ 0.97).

    The deadline per step is :data:`PAD_MARGIN` x the slowest step rate the site has seen
    (``<state-dir>/dp_timing.json``, a ratchet): once the first rounds have set it, every round
    leaves at ``steps x deadline`` whatever it sampled. What still leaks is the first round and
    any round slower than every earlier one by more than the margin (each then raises the
    deadline); ``benchmarks/dp_audit.py`` measures the correlation that remains."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / TIMING_FILE

    def per_step(self) -> float:
        try:
            return float(json.loads(self.path.read_text())["per_step_s"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return 0.0  # no deadline yet (or a damaged file: the next round sets it again)

    def pad(self, started: float, steps: int) -> float:
        """Sleep until ``started + steps x deadline`` (``time.perf_counter`` clock); returns the
        seconds slept. Raises the deadline when this round ran past it."""
        per_step = self.per_step()
        elapsed = time.perf_counter() - started
        wait = max(0.0, per_step * max(int(steps), 1) - elapsed)
        if wait > 0:
            time.sleep(wait)
        seen = PAD_MARGIN * elapsed / max(int(steps), 1)
        if seen > per_step:
            write_json(self.path, {"per_step_s": seen})
        return wait
