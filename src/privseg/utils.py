"""Small helpers shared across the pipeline: seeding, device choice, atomic writes."""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata as md
import json
import os
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch

from privseg.errors import CheckpointError, ConfigError, DataError, StorageError

T = TypeVar("T")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def setting(default: Any, help: str, *, min: float | None = None, choices: Mapping | None = None) -> Any:
    """A config dataclass field with its documentation: ``default``, ``help`` (one sentence, shown by
    ``privseg ... --help`` too), for numbers the smallest value ``min``, and for a name the registry
    that holds the names it takes (``choices``: the registry's dict itself, or ``{label: registry}``
    where two kinds share the field), kept in the field's metadata (``dataclasses.fields(TrainConfig)``).
    The command-line options that set a config's fields are made from these
    (:func:`privseg.cli.ui.options_from`), so each default and help text is written once, and the
    names a help lists are the registry's when the help is built (a new entry needs no edit)."""
    return field(default=default, metadata={"help": help, "min": min, "choices": choices})


def one_of(choices: Iterable[str] | Mapping[str, Mapping]) -> str:
    """"One of: a, b, c." for the names of a registry (``setting``'s ``choices``, read when called, so
    every name registered by then shows); for ``{label: registry}``, "Label: one of a, b." per label."""
    if isinstance(choices, Mapping) and choices and all(isinstance(v, Mapping) for v in choices.values()):
        return " ".join(f"{label.capitalize()}: one of {', '.join(names)}." for label, names in choices.items())
    return f"One of: {', '.join(choices)}."


SITES_DIR = "sites"  # the run folder's per-site subfolder, see site_dir


def site_dir(run_dir: str | os.PathLike, site: str) -> Path:
    """A site's own folder in a run (``<run_dir>/sites/<site>/``: its local state, privacy ledger,
    noise key and personalised models), the one place that spells the layout."""
    return Path(run_dir) / SITES_DIR / site


def check_id(value: str, what: str = "ID") -> str:
    """Reject IDs that could escape a folder or break a file name."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise ConfigError(
            f"{what} {value!r} is not safe: use letters, digits, '_', '-', '.' "
            "(no path separators, no '..', at most 128 characters)"
        )
    return value


def parse_ids(ids, what: str = "IDs") -> list[str]:
    """Subject IDs from "A,B" or a list: stripped, de-duplicated in order, never empty."""
    if ids is None:
        ids = []
    if isinstance(ids, str):
        ids = ids.split(",")
    out = list(dict.fromkeys(i.strip() for i in ids if i and i.strip()))
    if not out:
        raise ConfigError(f"{what}: the request is empty; name at least one subject ID")
    return out


def parse_params(values: list[str] | None, option: str = "--param") -> dict:
    """``KEY=VALUE`` items (``option``) as a dict; numbers become int or float."""
    params: dict = {}
    for v in values or []:
        if "=" not in v:
            raise ConfigError(f"{option} {v!r}: expected KEY=VALUE")
        k, raw = v.split("=", 1)
        try:
            val: object = float(raw) if any(c in raw for c in ".eE") else int(raw)
        except ValueError:
            val = raw
        params[k.strip()] = val
    return params


def registrar(table: dict[str, T], name: str, *, kind: str = "entry",
              entry: Callable[[object], T] | None = None) -> Callable[[object], object]:
    """A decorator that files what it decorates in ``table`` under ``name`` and returns it
    unchanged: the one idiom of privseg's registries (models, data formats, export formats, clip rules, per-subject
    gradient methods, FL strategies, unlearning strategies, site erasure methods, personalisation
    methods, membership tests, console pages; tests/system/test_registries.py checks each). ``entry``
    builds the filed record from the decorated object (default: the object). A name already taken
    is refused (a :class:`ConfigError` naming ``kind``), so a second entry never silently replaces the first."""

    def add(obj):
        if name in table:
            raise ConfigError(f"{kind} {name!r} is already registered")
        table[name] = entry(obj) if entry is not None else obj
        return obj

    return add


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so runs repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, otherwise CPU; an explicit choice wins."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success,
    so a crash never leaves a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except (OSError, RuntimeError) as exc:
        # torch reports a full disk as "enforce fail ... unexpected pos": say what happened
        free = _free_bytes(target.parent)
        enospc = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        if not enospc and (free is None or free >= _NEARLY_FULL):
            raise
        raise StorageError(f"{target}: not written, the disk is full ({(free or 0) / 2**20:.0f} MiB free in "
                           f"{target.parent}); the previous file, if any, is untouched. Free some space and "
                           "run the command again (long runs resume from their last checkpoint)") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def append_line(path: str | os.PathLike, record: dict, *, mode: int = 0o600, **dumps) -> None:
    """Append ``record`` as one JSON line (``json.dumps(record, **dumps)``) to ``path`` (created
    with ``mode``) and fsync it before returning: an append-only record that must be on disk
    before what it records happens (a DP reply leaving its site). One ``write`` on an O_APPEND
    descriptor, so concurrent appends never interleave within a line."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, (json.dumps(record, **dumps) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_NEARLY_FULL = 16 * 2**20  # bytes: below this, a failed write is taken to be a full disk


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def try_lock_file(path: str | os.PathLike, note: str) -> tuple[IO[str] | None, str]:
    """Take an exclusive OS lock on ``path`` (created, with its folder, if missing) without
    waiting. Got it: (the open file, which holds the lock until closed, ""), with ``note`` (who
    holds it) written into the file. Held elsewhere: (None, the holder's note). A killed process
    releases its lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - the caller holds it as long as it holds the lock
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        return None, holder
    fh.seek(0)
    fh.truncate()
    fh.write(note)
    fh.flush()
    return fh, ""


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing or malformed file is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"{what} is not valid JSON ({exc})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def load_weights_only(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True``; any failure is a :class:`CheckpointError`
    naming the file, and pickled objects are refused rather than executed (checkpoints, stored
    updates, MedicalNet weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
    except Exception as exc:  # weights_only refuses pickled objects with UnpicklingError
        raise CheckpointError(f"{path}: refused to load ({type(exc).__name__}: {str(exc)[:200]})") from None


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, stored with every result."""
    out = {}
    for name in ("privseg", "torch", "monai", "numpy", "nibabel", "flwr", "opacus"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out
