"""The console's only link to the federated erasure (:mod:`privseg.erasure`).

Everything the console needs of it goes through here: the patients a site may name, the
request ID of a request, the checks made before a request is filed (the erasure's own,
:func:`privseg.erasure.validate`), and the one call that carries an approved request out
(:func:`apply`). A change of the erasure's signature is a change here only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privseg.audit.ledger import ErasureLedger
from privseg.audit.reference import INDEX, REF_DIR
from privseg.console import cache
from privseg.erasure import (
    DEFAULT_THRESHOLDS,
    LEDGER,
    SITE_ERASERS,
    ErasureRequest,
    default_method,
    erase,
    validate,
    whole_patients,
)
from privseg.erasure.private import budget_options, dp_of, price
from privseg.errors import ConfigError, PrivsegError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.unlearn.strategies import STRATEGIES

# Settings the officer chooses on approval; defaults are the erasure's own.
SETTING_LIMITS = {"epochs": (1, 1000), "repair_rounds": (0, 100)}


def ledger_path(run_dir: Path) -> Path:
    return run_dir / LEDGER


def default_thresholds() -> dict:
    return dict(DEFAULT_THRESHOLDS)


def _request(kind: str, site: str, subjects: list[str], reason: str = "", requested_by: str = "",
             settings: dict | None = None, approved_by: str = ""):
    s = settings or {}
    return ErasureRequest(kind=kind, site=site, subjects=tuple(subjects), reason=reason, requested_by=requested_by,
                          approved_by=approved_by, method=s.get("method") or None, epochs=s.get("epochs"),
                          repair_rounds=s.get("repair_rounds"), thresholds=s.get("thresholds") or {})


def expand(run_dir: Path, kind: str, site: str, subjects: list[str]) -> list[str]:
    """The scans a request erases: every scan of each named patient (a scan ID or a patient ID)
    at the site, as the erasure itself expands it; names it does not know are kept (refused by
    :func:`check_new`)."""
    return list(whole_patients(FLConfig.load(run_dir), _request(kind, site, subjects)).subjects)


def request_id(run_dir: Path, kind: str, site: str, subjects: list[str]) -> str:
    """The ledger's ID of this request (the same (run, kind, site, patients), the same ID: the
    scans are expanded to whole patients first, as the erasure does)."""
    scans = expand(run_dir, kind, site, subjects)
    return _request(kind, site, scans).request_id(FLConfig.load(run_dir).name)


def _training_scans(run_dir: Path, site: str) -> list[tuple]:
    """(subject, erased_by) of each training scan of the site; ``erased_by``: the request ID of
    its erasure, "excluded", or None."""
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
    """Refuse, with a clear message, a request the erasure would refuse, before anything is
    written: the erasure's own checks (:func:`privseg.erasure.validate`) of the request as it will
    run, each named scan or patient expanded to the patient's every scan at the site (unknown or
    erased site, a name that is not a training patient of that site, a patient already erased, or
    every remaining training patient of the site)."""
    cfg = FLConfig.load(run_dir)
    req = whole_patients(cfg, _request(kind, site, subjects))  # the erasure's own checks of kind and IDs first
    path = ledger_path(run_dir)
    validate(cfg, RunState.load(run_dir), req, ErasureLedger(path, create=False) if path.exists() else None)


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


def check_settings(kind: str, site: str, subjects: list[str], settings: dict, run_dir: Path | None = None) -> None:
    """The erasure's own checks of the settings (method name, hyper-parameters); with ``run_dir``,
    the method must be one of the run's (:func:`methods`)."""
    _request(kind, site, subjects, settings=settings)
    if run_dir is not None and settings.get("method"):
        valid = [m["value"] for m in methods(run_dir, kind)["choices"]]
        if settings["method"] not in valid:
            raise ConfigError(f"method {settings['method']!r} is not one this run can use for a {kind} erasure "
                              f"(choose from {', '.join(v or 'the default' for v in valid)})")


# Under patient-level DP a patient is erased by DP fine-tuning on the site's other patients, booked in
# its ledger (privseg.erasure.private): the one method whose steps the budget accounts for.
DP_PATIENT_METHOD = {"value": "", "label": "dp_finetune", "summary": "DP fine-tuning on the site's other patients, "
                     "then the repair rounds: every step private and booked in the site's privacy ledger"}


def methods(run_dir: Path, kind: str) -> dict:
    """The methods valid for a ``kind`` erasure in this run: ``{"choices": [{"value", "label",
    "summary"}], "default": value, "dp": bool}``. A DP run erases a patient by DP fine-tuning only
    (its site erasures are DP runs of their own); otherwise a patient's default is the measured
    best, ``reference_teacher`` (docs/membership.md), when the run has reference models, else the
    erasure's own default."""
    dp = dp_of(FLConfig.load(run_dir)) is not None
    if kind == "site":
        choices = [{"value": m, "label": m, "summary": (type(SITE_ERASERS[m]).__doc__ or "").strip().splitlines()[0]}
                   for m in sorted(SITE_ERASERS)]
        return {"choices": choices, "default": _request("site", "S").method, "dp": dp}
    if dp:
        return {"choices": [DP_PATIENT_METHOD], "default": "", "dp": True}
    refs = (run_dir / REF_DIR / INDEX).is_file()
    choices = [{"value": n, "label": n, "summary": st.summary + (" (needs the run's reference models: privseg audit "
                                                                  "references)" if st.needs_references else "")}
               for n, st in sorted(STRATEGIES.items()) if refs or not st.needs_references]
    method, why = default_method(run_dir, "patient")  # the same choice as privseg erase's
    return {"choices": choices, "default": method, "default_reason": why, "dp": False}


def quote(run_dir: Path, kind: str, site: str, subjects: list[str], settings: dict | None = None) -> dict | None:
    """The erasure's price under patient-level DP, before it is approved: per site the DP steps it
    takes and the ε before and after them against the budget (:func:`privseg.erasure.private.price`,
    as the erasure itself checks it), whether all fit, and -- when not -- the options that would
    (:func:`privseg.erasure.private.budget_options`). None for a run without patient-level DP."""
    req = _request(kind, site, subjects, settings=settings)
    try:
        rows = price(run_dir, req)
    except PrivsegError as exc:  # e.g. a site ledger without its plan: the erasure would refuse it too
        return {"rows": [], "fits": False, "options": [], "error": str(exc), "settings": {}}
    if not rows:
        return None
    fits = all(r["fits"] for r in rows)
    return {"rows": rows, "fits": fits, "options": [] if fits else budget_options(run_dir, req, rows),
            "settings": {"epochs": req.epochs, "repair_rounds": req.repair_rounds, "method": req.method}}


def refusal(q: dict) -> str:
    """Why an unaffordable request cannot be approved, in one sentence per short site."""
    if q.get("error"):
        return f"the erasure cannot be priced: {q['error']}"
    short = [r for r in q["rows"] if not r["fits"]]
    return "; ".join(f"site {r['site']} would reach ε {r['epsilon_after']:.3g} for {r['steps']} DP step(s), over "
                     f"its budget of {r['epsilon_budget']:g} (spent {r['epsilon_spent']:.3g})" for r in short)


def apply(run_dir: Path, rec: dict, on_stage: Callable[[str, str], None]):
    """Carry out an approved request (or finish it after a crash: the erasure resumes from its
    ledger). The requester and the approver are written into the ledger's ``requested`` entry.
    The erasure holds the run's lock: a run busy with training raises
    :class:`privseg.federated.runstate.RunBusy`."""
    req = _request(rec["kind"], rec["site"], rec["subjects"], rec["reason"], rec["filed_by"], rec["settings"],
                   approved_by=rec["decided_by"] or "")
    return erase(run_dir, req, on_stage=on_stage)
