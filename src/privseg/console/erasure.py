"""The console's only link to the federated erasure (:mod:`privseg.unlearn.federated`).

Everything the console needs of it goes through here: the patients a site may name, the
request ID of a request, the checks made before a request is filed, and the one call that
carries an approved request out (:func:`apply`). A change of the erasure's signature is a
change here only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privseg.errors import ConfigError

# Settings the officer chooses on approval; defaults are the erasure's own.
SETTING_LIMITS = {"epochs": (1, 1000), "repair_rounds": (0, 100)}


def ledger_path(run_dir: Path) -> Path:
    from privseg.unlearn.federated import LEDGER

    return run_dir / LEDGER


def default_thresholds() -> dict:
    from privseg.unlearn.federated import DEFAULT_THRESHOLDS

    return dict(DEFAULT_THRESHOLDS)


def _request(kind: str, site: str, subjects: list[str], reason: str = "", requested_by: str = "",
             settings: dict | None = None, approved_by: str = ""):
    from privseg.unlearn.federated import ErasureRequest

    s = settings or {}
    return ErasureRequest(kind=kind, site=site, subjects=tuple(subjects), reason=reason, requested_by=requested_by,
                          approved_by=approved_by, method=s.get("method") or None, epochs=s.get("epochs"),
                          repair_rounds=s.get("repair_rounds"), thresholds=s.get("thresholds") or {})


def expand(run_dir: Path, kind: str, site: str, subjects: list[str]) -> list[str]:
    """The scans a request erases: every scan of each named patient (a scan ID or a patient ID)
    at the site, as the erasure itself expands it; names it does not know are kept (refused by
    :func:`check_new`)."""
    from privseg.federated.config import FLConfig
    from privseg.unlearn.federated import whole_patients

    return list(whole_patients(FLConfig.load(run_dir), _request(kind, site, subjects)).subjects)


def request_id(run_dir: Path, kind: str, site: str, subjects: list[str]) -> str:
    """The ledger's ID of this request (the same (run, kind, site, patients), the same ID: the
    scans are expanded to whole patients first, as the erasure does)."""
    from privseg.federated.config import FLConfig

    scans = expand(run_dir, kind, site, subjects)
    return _request(kind, site, scans).request_id(FLConfig.load(run_dir).name)


def _training_scans(run_dir: Path, site: str) -> list[tuple]:
    """(subject, erased_by) of each training scan of the site; ``erased_by``: the request ID of
    its erasure, "excluded", or None."""
    from privseg.console import cache
    from privseg.federated.config import FLConfig

    spec = FLConfig.load(run_dir).site(site)
    path = ledger_path(run_dir)
    erased = cache.ledger_view(path).erased_subjects(site) if path.exists() else {}
    return [(s, erased.get(s.id) or ("excluded" if s.id in spec.exclude else None))
            for s in cache.cohort(spec.cohort).select("train", spec.cohort_site)]


def patients(run_dir: Path, site: str) -> list[dict]:
    """The site's training patients, each with its scans: ``{"id", "scans": [{"id", "erased_by"}],
    "erased_by"}`` (``erased_by``: of the patient's first erased scan, or None)."""
    out: dict[str, dict] = {}
    for s, by in _training_scans(run_dir, site):
        p = out.setdefault(s.patient_id, {"id": s.patient_id, "scans": [], "erased_by": None})
        p["scans"].append({"id": s.id, "erased_by": by})
        p["erased_by"] = p["erased_by"] or by
    return list(out.values())


def check_new(run_dir: Path, kind: str, site: str, subjects: list[str]) -> None:
    """Refuse, with a clear message, a request the erasure would refuse (before anything is
    written): unknown or erased site; a name (scan or patient ID) that is unknown or not a
    training patient of that site; a patient already (partly) erased; or every remaining training
    patient of the site."""
    from privseg.federated.config import FLConfig

    cfg = FLConfig.load(run_dir)
    withdrawn = cfg.extra.get("withdrawn_sites", [])
    if site not in cfg.site_ids:
        raise ConfigError(f"site {site} was already erased from this run" if site in withdrawn
                          else f"unknown site {site!r} in this run")
    _request(kind, site, subjects)  # the erasure's own checks of kind and IDs
    if kind == "site":
        if len(cfg.sites) < 2:
            raise ConfigError(f"site {site} is the only site of the run: nothing would remain")
        return
    known = {p["id"]: p for p in patients(run_dir, site)}
    patient_of = {scan["id"]: p for p in known.values() for scan in p["scans"]}
    named = set()
    for s in subjects:
        p = patient_of.get(s) or known.get(s)
        if p is None:
            raise ConfigError(f"patient {s!r} is not a training patient of site {site}")
        if p["erased_by"]:
            raise ConfigError(f"patient {s} was already erased at site {site} ({p['erased_by']})")
        named.add(p["id"])
    if not {k for k, p in known.items() if not p["erased_by"]} - named:
        raise ConfigError(f"the request names every remaining training patient of site {site}: "
                          "erase the site instead")


def _setting(form: dict, key: str, parse: Callable[[str], float], name: str, what: str, lo: float, hi: float,
             bounds: str) -> float | None:
    """One number of the approval form, parsed and within ``[lo, hi]``; None when left empty."""
    raw = (form.get(key) or "").strip()
    if not raw:
        return None
    try:
        v = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not {what}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{name} must be between {bounds}")
    return v


def clean_settings(form: dict) -> dict:
    """The officer's approval settings, checked: method, epochs, repair rounds, thresholds."""
    out: dict = {}
    method = (form.get("method") or "").strip()
    if method:
        out["method"] = method
    for key, (lo, hi) in SETTING_LIMITS.items():
        v = _setting(form, key, int, key.replace("_", " "), "a whole number", lo, hi, f"{lo} and {hi}")
        if v is not None:
            out[key] = v
    th = {}
    for key in default_thresholds():
        v = _setting(form, key, float, key, "a number", 0.0, 1.0, "0 and 1")
        if v is not None:
            th[key] = v
    if th:
        out["thresholds"] = th
    return out


def check_settings(kind: str, site: str, subjects: list[str], settings: dict) -> None:
    """The erasure's own checks of the settings (method name, hyper-parameters)."""
    _request(kind, site, subjects, settings=settings)


def apply(run_dir: Path, rec: dict, on_stage: Callable[[str, str], None]):
    """Carry out an approved request (or finish it after a crash: the erasure resumes from its
    ledger). The requester and the approver are written into the ledger's ``requested`` entry."""
    from privseg.unlearn.federated import erase

    req = _request(rec["kind"], rec["site"], rec["subjects"], rec["reason"], rec["filed_by"], rec["settings"],
                   approved_by=rec["decided_by"] or "")
    return erase(run_dir, req, on_stage=on_stage)
