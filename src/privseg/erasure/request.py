"""An erasure request and what carries it out: what to erase, why and how
(:class:`ErasureRequest`), its ID, the site erasure methods it may name (:data:`SITE_ERASERS`),
the checks that refuse a bad request before anything runs (:func:`validate`), the request in
progress (:class:`ErasureJob`: the run's config and state, loaded once) and its result read back
from the run's erasure ledger (:mod:`privseg.audit.ledger`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from privseg.audit.ledger import ErasureLedger, canonical, latest
from privseg.audit.mia import STATISTICS, OnProgress
from privseg.audit.reference import STOP_P, load_references
from privseg.errors import ConfigError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState
from privseg.federated.sites import read_site_cohort, site_subjects
from privseg.unlearn.engine import TARGETS
from privseg.unlearn.strategies import STRATEGIES, get_strategy
from privseg.utils import check_id, parse_ids, registrar, setting

KINDS = ("patient", "site")
LEDGER = "erasure/ledger.db"

StageCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class Thresholds:
    """What an erasure's verification passes with (:data:`DEFAULT_THRESHOLDS`); the help texts of
    `privseg erase`'s options are in the fields' metadata."""

    max_mia_auc: float = setting(0.55, "Pass only if the erased patients' membership AUC <= this.")
    min_retain_dice_ratio: float = setting(0.95, "Pass only if retain Dice >= this x the reference's.")
    min_test_dice_ratio: float = setting(0.95, "Pass only if test Dice >= this x the reference's.")


DEFAULT_THRESHOLDS = asdict(Thresholds())


# The patient method used when the run has no reference models: the best measured without them
# (docs/membership.md, benchmarks/results/erasure.md); with references, reference_teacher.
WITHOUT_REFERENCES = "scrub"


def default_method(run_dir: str | Path, kind: str) -> tuple[str, str]:
    """(method, why) for a request that names none: a site erasure uses FedEraser; a patient erasure
    ``reference_teacher`` when the run keeps reference models, else :data:`WITHOUT_REFERENCES`."""
    if kind == "site":
        return "federaser", "a site erasure defaults to federaser"
    try:
        refs = load_references(run_dir, required=False)
    except ConfigError as exc:  # a foreign or broken set is never used
        refs, why = None, f" ({exc})"
    else:
        why = ""
    if refs is not None:
        return "reference_teacher", (f"the run keeps {len(refs.references)} reference models, and reference_teacher "
                                     "meets the Dice and membership targets best with them (docs/membership.md)")
    return WITHOUT_REFERENCES, (f"the run has no usable reference models{why}; {WITHOUT_REFERENCES} is the best "
                                "method measured without them (docs/membership.md)")


# -- site erasure methods: one registry ---------------------------------------------------------
#
# A method is a class with ``dp_steps(cfg, state, req)`` (DP steps each remaining site takes, for
# the budget check before anything runs) and ``run(job)`` (a :class:`privseg.erasure.site.SiteJob`)
# -> (model path, seconds, CPU seconds, info for the ledger), registered with :func:`site_eraser`.
# One with settings of its own gives them as a ``defaults`` dict (``--param`` overrides them; other
# names are refused) and may check their values in ``check(params)`` -- the request does both
# before anything is recorded. ``usable(cfg, state, site)``, when the method has it, says whether
# it could run on this run (a cheaper option offered when a DP budget cannot pay). The methods
# shipped are in :mod:`privseg.erasure.site`, registered when the package is imported.

SITE_ERASERS: dict[str, object] = {}


def site_eraser(name: str):
    """File the decorated method class (one instance of it) in :data:`SITE_ERASERS` under ``name``;
    a name already taken is refused."""
    return registrar(SITE_ERASERS, name, kind="site erasure method", entry=lambda cls: cls())


def site_params(method: str, params: dict | None) -> dict:
    """``method``'s ``defaults`` overridden by ``params``; unknown names and bad values refused."""
    eraser = SITE_ERASERS[method]
    defaults = dict(getattr(eraser, "defaults", {}))
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise ConfigError(f"--param: site erasure method {method} has no parameter(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(defaults)) or 'none'})")
    resolved = {**defaults, **(params or {})}
    if hasattr(eraser, "check"):
        eraser.check(resolved)
    return resolved


@dataclass
class ErasureRequest:
    """What to erase, why, and how. ``method``: an unlearning strategy for a patient (default
    ``scrub``), ``federaser``, ``fedrecover`` or ``retrain`` for a site (``params``: the method's
    own settings, e.g. fedrecover's schedule). ``thresholds`` override :data:`DEFAULT_THRESHOLDS`
    (``min_*_dice_ratio`` compare with the federated retrain when one is given, else with the
    model before the erasure). ``target`` ``calibrated`` stops the local
    unlearning once the per-patient test against the run's reference models no longer flags the
    patient; ``statistic`` is that test's score (``loss`` or ``dice``), in the stopping rule and
    the verification alike. The help texts of the fields `privseg erase` sets are in their metadata."""

    kind: str
    site: str
    subjects: tuple[str, ...] = ()
    reason: str = setting("", "Why, for the erasure ledger (e.g. 'GDPR art. 17').")
    requested_by: str = setting("", "Who asked, for the erasure ledger.")
    approved_by: str = setting("", "Who approved the request (e.g. the data-protection officer), for the ledger and "
                               "the certificate.")  # not part of the request ID
    method: str | None = setting(None, "Patient: an unlearning strategy (default: reference_teacher when the run "
                                 "keeps reference models, else scrub). Site: a site erasure method (default "
                                 "federaser; fedrecover takes --param warmup=2 ...).",
                                 choices={"patient": STRATEGIES, "site": SITE_ERASERS})
    params: dict = field(default_factory=dict)
    target: str | None = setting(None, "Patient: unseen (stop when the patient looks never-seen), calibrated (stop "
                                 "when the run's reference models no longer tell it from never-seen patients; needs "
                                 "reference models: privseg audit references) or zero. Default: calibrated for "
                                 "reference_teacher, else unseen.")
    epochs: int | None = setting(None, "Patient: maximum unlearning epochs.", min=1)
    repair_rounds: int | None = setting(None, "Patient: federated rounds with every site after unlearning. Default: 0 "
                                        "for reference_teacher (repair rounds bring a memorised patient back), "
                                        "else 1.", min=0)
    calibration_ratio: float = setting(0.5, "FedEraser: calibration local steps / original local steps.")
    calibration_interval: int = setting(2, "FedEraser: calibrate every N-th round.", min=1)
    thresholds: dict = field(default_factory=dict)
    seed: int = setting(0, "Random seed.")
    statistic: str = setting("loss", "Per-patient membership test statistic.", choices=STATISTICS)
    stop_p: float = setting(STOP_P, "Patient, calibrated target: stop the local unlearning once every erased patient's "
                            "p-value against the reference models is >= this (a margin above the verification's 0.05).")
    method_reason: str = ""  # why the method was picked when the request named none (default_method)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"erasure kind {self.kind!r} is not one of {', '.join(KINDS)}")
        check_id(self.site, "--site")
        self.subjects = tuple(parse_ids(list(self.subjects), "--subject")) if self.subjects else ()
        for s in self.subjects:
            check_id(s, "--subject")
        if self.kind == "patient" and not self.subjects:
            raise ConfigError("a patient erasure needs --subject (one or more subject IDs)")
        if self.kind == "site" and self.subjects:
            raise ConfigError("a site erasure takes no --subject (it removes every patient of the site)")
        if self.method is None:
            self.method = WITHOUT_REFERENCES if self.kind == "patient" else "federaser"
        if self.kind == "site" and self.method not in SITE_ERASERS:
            raise ConfigError(f"--method {self.method!r}: a site erasure uses one of {', '.join(sorted(SITE_ERASERS))}")
        if self.kind == "site":
            site_params(self.method, self.params)
        teacher = False
        if self.kind == "patient":
            strategy = get_strategy(self.method)
            strategy.resolve(self.params)
            teacher = strategy.needs_references
        # reference_teacher is measured with the calibrated stopping rule and no repair round
        # (docs/membership.md); the others with the unseen rule and one repair round
        if self.target is None:
            self.target = "calibrated" if teacher else "unseen"
        if self.repair_rounds is None:
            self.repair_rounds = 0 if teacher else 1
        if self.kind == "patient":
            if self.target not in TARGETS:
                raise ConfigError(f"--target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.statistic not in STATISTICS:
            raise ConfigError(f"--statistic {self.statistic!r} is not one of {', '.join(STATISTICS)}")
        if not 0 < self.stop_p < 1:
            raise ConfigError(f"stop_p must be in (0, 1) (got {self.stop_p})")
        if self.repair_rounds < 0:
            raise ConfigError(f"--repair-rounds must be >= 0 (got {self.repair_rounds})")
        if not 0 < self.calibration_ratio <= 1 or self.calibration_interval < 1:
            raise ConfigError("FedEraser calibration ratio must be in (0, 1] and the interval >= 1")
        unknown = sorted(set(self.thresholds) - set(DEFAULT_THRESHOLDS))
        if unknown:
            raise ConfigError(f"unknown threshold(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_THRESHOLDS)})")
        self.thresholds = {**DEFAULT_THRESHOLDS, **{k: float(v) for k, v in self.thresholds.items()}}

    @property
    def needs_references(self) -> bool:
        """A patient erasure that reads the run's reference models (its target or its strategy)."""
        if self.kind != "patient":
            return False
        return self.target == "calibrated" or get_strategy(self.method).needs_references

    def unlearn_args(self) -> dict:
        """The settings :func:`privseg.unlearn.engine.unlearn` runs a patient request with, resolved
        here once for every erasure path (``privseg erase`` at a site, ``privseg unlearn`` centrally)."""
        return {"strategy": self.method, "target": self.target, "epochs": self.epochs, "params": self.params,
                "seed": self.seed, "statistic": self.statistic, "stop_p": self.stop_p}

    def request_id(self, run_name: str) -> str:
        """The same (run, kind, site, subjects) is the same request, whatever the settings."""
        key = canonical({"run": run_name, "kind": self.kind, "site": self.site, "subjects": sorted(self.subjects)})
        return "ER-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["subjects"] = list(self.subjects)
        return d


@dataclass
class ErasureResult:
    request_id: str
    status: str  # completed | already-completed | verification-failed
    passed: bool
    model: Path | None
    entries: list[dict]
    ledger: Path

    @property
    def verification(self) -> dict:
        return next((e["body"] for e in reversed(self.entries) if e["event"] == "verified"), {})


def read_result(run_dir: Path, ledger: ErasureLedger, rid: str, status: str) -> ErasureResult:
    """The request ``rid`` as its ledger entries leave it, with ``status``."""
    entries = ledger.entries(rid)
    done = latest(entries, "completed")
    ver = latest(entries, "verified")
    model = run_dir / done["body"]["model"]["path"] if done else None
    return ErasureResult(rid, status, bool(ver and ver["body"].get("passed")), model, entries, ledger.path)


@dataclass
class ErasureJob:
    """One request being carried out, what every stage reads: the run's config and state (loaded
    once, under the run's lock; a stage that changes them changes these objects and saves them),
    the request, its ID and ledger, and the callbacks. ``say(stage, message)`` reports each stage;
    ``on_progress(phase, done, total)`` the long parts within one (the verification's passes)."""

    run_dir: Path
    cfg: FLConfig
    state: RunState
    req: ErasureRequest
    rid: str
    ledger: ErasureLedger
    say: StageCallback
    backend: str = "in-process"
    reference: Path | None = None
    mia_views: int = 2
    on_progress: OnProgress | None = None

    def entries(self) -> list[dict]:
        return self.ledger.entries(self.rid)


# -- validation ------------------------------------------------------------------------

def validate(cfg: FLConfig, state: RunState, req: ErasureRequest, ledger: ErasureLedger | None = None) -> None:
    """Refuse, naming the problem, a request the run cannot take: no trained round; an unknown or
    already erased site; a site erasure that would leave no site; a subject that is not a training
    patient of the site, or already erased there (``ledger``: the run's erasure ledger, None when
    it has none yet); every remaining training patient of the site (erase the site instead). The
    console files a request only after these same checks."""
    if state.rounds_done < 1:
        raise ConfigError(f"run {cfg.name} has no trained rounds: nothing to erase from")
    if req.site not in cfg.site_ids:
        withdrawn = cfg.extra.get("withdrawn_sites", [])
        if req.site in withdrawn:
            raise ConfigError(f"site {req.site} was already erased from run {cfg.name}")
        raise ConfigError(f"unknown site {req.site!r} in run {cfg.name} (sites: {', '.join(cfg.site_ids)})")
    spec = cfg.site(req.site)
    if req.kind == "site":
        if len(cfg.sites) < 2:
            raise ConfigError(f"site {req.site} is the only site of run {cfg.name}: nothing would remain")
        return
    already = ledger.erased_subjects(req.site) if ledger is not None else {}
    for s in req.subjects:
        if s in spec.exclude or s in already:
            by = f" by request {already[s]}" if s in already else ""
            raise ConfigError(f"subject {s} was already erased at site {req.site}{by}")
    cohort = read_site_cohort(spec.cohort)
    train = {s.id for s in site_subjects(cohort, spec, "train")}
    for s in req.subjects:
        if s not in train:
            known = any(x.id == s for x in site_subjects(cohort, spec))
            raise ConfigError(f"subject {s} is not a training patient of site {req.site} ("
                              f"{'held out: not a training subject' if known else 'it is unknown there'}; "
                              f"cohort {spec.cohort})")
    if not train - set(req.subjects):
        raise ConfigError(f"the request names every training subject of site {req.site}, so every remaining "
                          "training patient: erase the site instead")


def whole_patients(cfg: FLConfig, req: ErasureRequest) -> ErasureRequest:
    """The unit is the patient: a request naming one scan (or a patient ID) erases every scan of
    that patient at the site. Unknown names are left for :func:`validate` to refuse."""
    if req.kind != "patient" or req.site not in cfg.site_ids:
        return req
    spec = cfg.site(req.site)
    subjects = site_subjects(read_site_cohort(spec.cohort), replace(spec, exclude=()))
    patient_of = {s.id: s.patient_id for s in subjects}
    patients = set(patient_of.values())
    wanted = {patient_of.get(x, x) for x in req.subjects}
    expanded = [s.id for s in subjects if s.patient_id in wanted]
    named = [x for x in req.subjects if x not in patient_of and x not in patients]
    if not expanded:
        return req
    return replace(req, subjects=tuple(dict.fromkeys([*expanded, *named])))
