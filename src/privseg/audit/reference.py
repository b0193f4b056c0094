"""Reference models for the calibrated membership test, kept with the run.

The per-patient test of :mod:`privseg.audit.lira` (offline LiRA, Carlini et al., "Membership
Inference Attacks From First Principles", IEEE S&P 2022; difficulty calibration, Watson et al.,
"On the Importance of Difficulty Calibration in Membership Inference Attacks", ICLR 2022)
compares a model's score on a patient with the scores of models that never saw that patient.
Those reference models are trained here, once per run, each on a random half of the run's
training patients, the way the run itself was trained:

* federated run: a federated retrain from the run's initial (round-0, data-free) global model,
  the same sites, strategy and number of training rounds, each site keeping its half
  (:func:`privseg.federated.retrain.federated_retrain`);
* central run (a ``Trainer`` folder with ``last.pt``): the central trainer on the half, same
  config and seed (so the same initial model).

``schedule`` (:class:`ReferenceSettings`) shortens every reference of a set to that fraction of the
run's training rounds (central: steps), which cuts the readiness cost in the same proportion; the
erasure benchmark measures whether the test keeps its power (docs/membership.md).

Halves come in complementary pairs (reference ``2j`` takes half A of a seeded permutation of
every site's training patients, ``2j+1`` the rest), so every training patient is OUT for exactly
half of an even number of references and IN for the other half.

Layout (``<run>/audit/references/``)::

    index.json         run identity (name, initial model hash, model config hash), seed, schedule, rounds,
                       the training patients split (pool), and per reference: the patients it saw,
                       its checkpoint's SHA-256, training time
    <k>/model.pt       reference k
    <k>/scores.json    its per-patient loss/Dice, cached per (views, seed)

Every later request reuses them: a reference is retrained only when its checkpoint is missing
or altered, or when it saw a patient the run has since erased (its checkpoint carries that
patient, so an erasure deletes it; see :func:`superseded`). A set built for another run or
model is refused.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from privseg.audit import lira
from privseg.audit.ledger import ErasureLedger, canonical, file_sha256
from privseg.audit.mia import OnProgress, phase_counter, subject_statistics
from privseg.data.transforms import load_preprocessed
from privseg.errors import ConfigError
from privseg.federated import retrain
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState, hold_run
from privseg.federated.sites import read_site_cohort, site_subjects
from privseg.privacy.central import refuse_without_dp
from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from privseg.train.loop import TrainConfig, Trainer
from privseg.utils import read_json, setting, write_json

REF_DIR = Path("audit") / "references"
INDEX = "index.json"
DEFAULT_N = 8

OnReference = Callable[[int, str], None]  # (k, "reused" | "training" | "trained")


@dataclass(frozen=True)
class ReferenceSettings:
    """How a run's reference set is built (`privseg audit references` takes its options from these)."""

    n: int = setting(DEFAULT_N, "Number of reference models (pairs of complementary halves).", min=2)
    seed: int = setting(0, "Seed of the random halves.")
    schedule: float = setting(1.0, "Fraction of the run's training rounds (central: steps) each reference trains "
                              "for: the readiness cost shrinks with it; the erasure benchmark measures the test's "
                              "power at 0.5 and 0.25.", min=0.01)


def _command(run_dir: Path) -> str:
    return f"privseg audit references --run {run_dir}"


# -- the run a reference set belongs to --------------------------------------------------

def _is_federated(run_dir: Path) -> bool:
    return (run_dir / "fl_config.json").is_file()


def _identity(run_dir: Path) -> dict:
    """What a reference set must match: run, initial model, model config."""
    if _is_federated(run_dir):
        cfg, state = FLConfig.load(run_dir), RunState.load(run_dir)
        initial = state.checkpoint_path(0)
        if not initial.is_file():
            raise ConfigError(f"{initial}: the run's initial global model is not kept; reference models start "
                              "from it")
        return {"kind": "federated", "run": cfg.name, "initial_sha256": file_sha256(initial),
                "model_sha256": hashlib.sha256(canonical(cfg.train.to_dict()).encode()).hexdigest()}
    last = run_dir / "last.pt"
    if not last.is_file():
        raise ConfigError(f"{run_dir}: neither a federated run (fl_config.json) nor a training run (last.pt)")
    payload = load_checkpoint(last)
    refuse_without_dp(payload, last, "training reference models on half of its patients")
    cfg = payload["config"]
    # a central run starts from the model its seed builds, so the seed is the initial model
    return {"kind": "central", "run": run_dir.resolve().name, "initial_sha256": f"seed:{cfg.get('seed')}",
            "model_sha256": hashlib.sha256(canonical(cfg).encode()).hexdigest()}


def _training_patients(run_dir: Path) -> dict[str, list[str]]:
    """The patients the run trains on now, per site (erased ones left out)."""
    if _is_federated(run_dir):
        cfg = FLConfig.load(run_dir)
        return {s.id: sorted(x.id for x in site_subjects(read_site_cohort(s.cohort), s, "train")) for s in cfg.sites}
    # a central erasure leaves last.pt as it was (the user's file); its ledger names who was erased
    ledger = run_dir / "erasure" / "ledger.db"
    erased = ErasureLedger(ledger, create=False).erased_subjects("central") if ledger.is_file() else {}
    return {"central": sorted(p for p in load_checkpoint(run_dir / "last.pt")["extra"].get("train_subjects", [])
                              if p not in erased)}


def _training_rounds(run_dir: Path) -> int:
    """Rounds of ordinary training (an erasure's repair rounds are not the run's training)."""
    return sum(1 for e in RunState.load(run_dir).rounds if not e.get("erasure"))


def halves(pool: dict[str, list[str]], k: int, seed: int) -> dict[str, list[str]]:
    """Reference ``k``'s half of every site's pool: pairs (2j, 2j+1) are complementary."""
    rng = np.random.default_rng((seed, k // 2, 4242))
    out = {}
    for site in sorted(pool):
        ids = sorted(pool[site])
        perm = [ids[i] for i in rng.permutation(len(ids))]
        cut = (len(ids) + (k // 2) % 2) // 2  # odd sizes: the larger half alternates between pairs
        out[site] = sorted(perm[:cut] if k % 2 == 0 else perm[cut:])
    return out


# -- what the set costs --------------------------------------------------------------------

REQUESTS = (1, 10, 100)  # request counts the readiness cost is amortised over


def amortised(compute_ratio: float, own: float = 0.0) -> dict[str, float]:
    """Cost per request, in units of the original training, when the reference models'
    ``compute_ratio`` is shared by 1, 10 or 100 requests (``own``: each request's own compute)."""
    return {str(k): compute_ratio / k + own for k in REQUESTS}


def _check_schedule(schedule: float) -> float:
    if not 0 < schedule <= 1:
        raise ConfigError(f"--schedule {schedule:g}: a fraction of the run's training schedule, in (0, 1]")
    return float(schedule)


def _reference_rounds(run_dir: Path, schedule: float) -> int:
    """A federated reference's rounds at ``schedule`` of the run's training rounds (at least one)."""
    return max(1, round(schedule * _training_rounds(run_dir)))


def _per_reference(run_dir: Path, index: dict | None, schedule: float | None = None) -> float:
    """One reference's compute in units of the original training: its rounds over the run's, or (central)
    its share of the run's steps. A set already built has its own schedule; ``schedule`` is a new set's."""
    sched = index.get("schedule", 1.0) if index else _check_schedule(1.0 if schedule is None else schedule)
    if not _is_federated(run_dir):
        return sched
    rounds = int(index["rounds"]) if index and index.get("rounds") else _reference_rounds(run_dir, sched)
    return rounds / max(_training_rounds(run_dir), 1)


def readiness(run_dir: str | Path, n: int = DEFAULT_N, schedule: float | None = None) -> dict:
    """The reference models' compute in units of the original training, before any is trained.

    A reference trains with the run's schedule (the same rounds of the same local steps, or the same
    central steps), or ``schedule`` of it (a set already built: its own), on half of the patients. The
    compute of a step does not depend on how many patients the step draws from, so a half-data
    reference costs about one original training, not half of one:
    ``compute_ratio = n x reference rounds / run rounds``. ``to_train``: how many of the ``n`` are not
    already kept and valid (the others are reused at no cost)."""
    run_dir = Path(run_dir)
    if _is_federated(run_dir):
        cfg = FLConfig.load(run_dir)
        run_rounds = _training_rounds(run_dir)
        unit = f"{run_rounds} training rounds x {cfg.local_steps} local steps x {len(cfg.sites)} sites"
    else:
        _identity(run_dir)  # a clear error for a folder that is neither kind of run
        unit = f"{load_checkpoint(run_dir / 'last.pt')['config'].get('steps')} steps"
    index = _read_index(run_dir)
    per_reference = _per_reference(run_dir, index, None if schedule is None else _check_schedule(schedule))
    erased = _erased(run_dir, index) if index else set()
    keep = 0
    for k in range(n):
        entry = (index or {}).get("references", {}).get(str(k))
        ref = _valid(run_dir, entry) if entry else None
        keep += ref is not None and not (ref.patients & erased)
    ratio = n * per_reference
    return {"n": n, "to_train": n - keep, "patient_fraction": 0.5, "per_reference": per_reference,
            "compute_ratio": ratio, "to_train_ratio": (n - keep) * per_reference, "original_training": unit,
            "amortised_per_request": amortised(ratio)}


def readiness_line(est: dict) -> str:
    """One line for `privseg audit references`, printed before anything is trained."""
    per = est["amortised_per_request"]
    part = "the run's" if est["per_reference"] == 1 else f"{est['per_reference']:.2g} of the run's"
    return (f"readiness cost: {est['n']} reference models, each a training on half of the patients with {part} "
            f"schedule ({est['original_training']}) = {est['compute_ratio']:.1f} x the original training's compute "
            f"({est['to_train']} to train now: {est['to_train_ratio']:.1f} x); per erasure request "
            + ", ".join(f"{per[k]:.2f} x over {k}" for k in per))


# -- the set ----------------------------------------------------------------------------

@dataclass
class Reference:
    k: int
    saw: dict[str, list[str]]
    checkpoint: Path
    sha256: str

    @property
    def patients(self) -> set[str]:
        return {p for ids in self.saw.values() for p in ids}

    def load_model(self):
        """This reference's model, in eval mode."""
        return _load_model(self.checkpoint)

    def statistics(self, items: Sequence[dict], patch_size, num_classes: int, views: int, seed: int,
                   on_subject: Callable[[int, int], None] | None = None) -> dict:
        """id -> {"loss", "dice"} of this reference (``mia.subject_statistics``), cached beside it;
        ``on_subject(done, total)`` after each item (a cached one counts at once)."""
        cache_path = self.checkpoint.parent / "scores.json"
        cache = read_json(cache_path, "reference scores") if cache_path.is_file() else {}
        if cache.get("sha256") != self.sha256:
            cache = {"sha256": self.sha256}
        key = f"views={views},seed={seed}"
        known = cache.setdefault(key, {})
        todo = [it for it in items if it["id"] not in known]
        cached = len(items) - len(todo)
        if on_subject:
            on_subject(cached, len(items))
        if todo:
            model = self.load_model()
            # the same views as the model under test: subject_statistics seeds views by (seed, position)
            for k, it in enumerate(todo):
                row = subject_statistics(model, [it], patch_size, num_classes, views, _view_seed(seed, it["id"]))[0]
                known[it["id"]] = {"loss": row["loss"], "dice": row["dice"]}
                if on_subject:
                    on_subject(cached + k + 1, len(items))
            write_json(cache_path, cache)
        return {it["id"]: known[it["id"]] for it in items}


def _view_seed(seed: int, pid: str) -> int:
    """Views of a patient depend on (seed, patient) only, so every model sees the same views."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:4], "little")


def _load_model(path: Path):
    return model_from_checkpoint(load_checkpoint(path), path).eval()


@dataclass
class ReferenceSet:
    run_dir: Path
    index: dict
    references: list[Reference]
    trained: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.run_dir / REF_DIR

    def summary(self) -> dict:
        n = len(self.references)
        ratio = n * _per_reference(self.run_dir, self.index)
        return {"folder": str(REF_DIR), "n": n, "seed": self.index["seed"],
                "schedule": self.index.get("schedule", 1.0), "rounds": self.index.get("rounds"),
                "identity": self.index["identity"],
                "compute_ratio": ratio, "amortised_per_request": amortised(ratio),
                "references": [{"k": r.k, "sha256": r.sha256, "patients": len(r.patients)} for r in self.references]}


def _read_index(run_dir: Path) -> dict | None:
    path = run_dir / REF_DIR / INDEX
    if not path.is_file():
        return None
    index = read_json(path, "reference index")
    if not isinstance(index, dict) or "identity" not in index or "references" not in index:
        raise ConfigError(f"{path}: not a reference index; remove {path.parent} and run {_command(run_dir)}")
    ident = _identity(run_dir)
    if index["identity"] != ident:
        what = [k for k in ident if index["identity"].get(k) != ident[k]]
        raise ConfigError(f"reference models in {path.parent} were built for another run or model "
                          f"({', '.join(what)} differ: {index['identity'].get('run')!r} vs {ident['run']!r}); "
                          f"refused. Remove that folder and run {_command(run_dir)}")
    return index


def _valid(run_dir: Path, entry: dict) -> Reference | None:
    """The reference if its checkpoint is there and unaltered, else None."""
    path = run_dir / REF_DIR / entry["checkpoint"]
    if not path.is_file() or file_sha256(path) != entry["sha256"]:
        return None
    return Reference(int(entry["k"]), {s: list(v) for s, v in entry["saw"].items()}, path, entry["sha256"])


def load_references(run_dir: str | Path, required: bool = True) -> ReferenceSet | None:
    """The run's reference models (those present and unaltered). Without any: a ConfigError
    naming the command that trains them (``required``), else None."""
    run_dir = Path(run_dir)
    index = _read_index(run_dir)
    refs = [r for e in (index or {}).get("references", {}).values() if (r := _valid(run_dir, e))]
    if not refs:
        if required:
            raise ConfigError(f"run {run_dir} has no reference models for the calibrated membership test; "
                              f"train them with: {_command(run_dir)} [--n {DEFAULT_N}]")
        return None
    return ReferenceSet(run_dir, index, sorted(refs, key=lambda r: r.k))


def pair(refs: ReferenceSet, j: int = 0) -> ReferenceSet:
    """The complementary pair ``(2j, 2j+1)`` of a set: two references, one of which never saw each
    training patient (the cheapest set the RMIA-style test works with)."""
    two = [r for r in refs.references if r.k in (2 * j, 2 * j + 1)]
    if len(two) != 2:
        raise ConfigError(f"references {2 * j} and {2 * j + 1} of {refs.folder} are not both present; "
                          f"run {_command(refs.run_dir)} --n {2 * j + 2}")
    return ReferenceSet(refs.run_dir, refs.index, two)


def _erased(run_dir: Path, index: dict) -> set[str]:
    """Patients of the pool the run no longer trains on (erased, or their site withdrawn)."""
    now = {p for ids in _training_patients(run_dir).values() for p in ids}
    return {p for ids in index["pool"].values() for p in ids} - now


def ensure_references(run_dir: str | Path, n: int = DEFAULT_N, *, seed: int = 0, schedule: float | None = None,
                      backend: str = "in-process", cohort=None, on_reference: OnReference | None = None,
                      on_progress: OnProgress | None = None) -> ReferenceSet:
    """Train the run's ``n`` reference models, or reuse those already there.

    Reused: checkpoint present and unaltered, built for this run and model with this seed, and
    trained on no patient the run has erased since. Otherwise (re)trained. ``schedule``: the fraction
    of the run's training each reference trains for (:class:`ReferenceSettings`); None takes the set's
    own (a new set: 1.0), another than the set's is refused like another seed. ``cohort``: the cohort
    of a central run (federated runs know their sites). Each finished reference is recorded in
    the index at once, so an interrupted call resumes. ``on_progress``: the rounds (federated) or
    steps (central) of each reference trained, one phase per reference."""
    run_dir = Path(run_dir)
    if n < 2:
        raise ConfigError(f"--n {n}: the calibrated test needs at least 2 reference models (pairs of halves)")
    say = on_reference or (lambda k, what: None)
    folder = run_dir / REF_DIR
    with hold_run(run_dir, "reference model training"):
        index = _read_index(run_dir)
        if index is not None and int(index["seed"]) != seed:
            raise ConfigError(f"reference models in {folder} use seed {index['seed']}, not {seed}: reuse that seed, "
                              f"or remove the folder to build a new set")
        if index is not None and schedule is not None and index.get("schedule", 1.0) != _check_schedule(schedule):
            raise ConfigError(f"reference models in {folder} train for {index.get('schedule', 1.0):g} of the run's "
                              f"schedule, not {schedule:g}: pass --schedule {index.get('schedule', 1.0):g} to reuse "
                              f"them, or remove the folder to build a new set")
        if index is None:
            pool = _training_patients(run_dir)
            small = {s: len(v) for s, v in pool.items() if len(v) < 2}
            if small:
                raise ConfigError("reference models train on half of every site's training patients; site(s) "
                                  + ", ".join(f"{s} ({c})" for s, c in small.items()) + " have fewer than 2")
            sched = _check_schedule(1.0 if schedule is None else schedule)
            index = {"version": 1, "identity": _identity(run_dir), "seed": seed, "pool": pool, "schedule": sched,
                     "rounds": _reference_rounds(run_dir, sched) if _is_federated(run_dir) else None,
                     "references": {}}
        erased = _erased(run_dir, index)
        refs = []
        trained, reused = [], []
        for k in range(n):
            entry = index["references"].get(str(k))
            ref = _valid(run_dir, entry) if entry else None
            if ref is not None and not (ref.patients & erased):
                refs.append(ref)
                reused.append(k)
                say(k, "reused")
                continue
            say(k, "training")
            shutil.rmtree(folder / str(k), ignore_errors=True)  # an altered or superseded model goes first
            index["references"].pop(str(k), None)
            saw = {s: [p for p in ids if p not in erased] for s, ids in halves(index["pool"], k, seed).items()}
            entry = _train(run_dir, index, k, saw, backend, cohort,
                           (lambda done, total, k=k: on_progress(f"reference model {k}", done, total))
                           if on_progress else None)
            index["references"][str(k)] = entry
            write_json(folder / INDEX, index)
            refs.append(_valid(run_dir, entry))
            trained.append(k)
            say(k, "trained")
        write_json(folder / INDEX, index)
    return ReferenceSet(run_dir, index, refs, trained, reused)


def _train(run_dir: Path, index: dict, k: int, saw: dict[str, list[str]], backend: str, cohort,
           on_progress: Callable[[int, int], None] | None = None) -> dict:
    folder = run_dir / REF_DIR / str(k)
    tick = on_progress or (lambda done, total: None)
    t0, c0 = time.perf_counter(), time.process_time()
    if index["identity"]["kind"] == "federated":
        train_now = _training_patients(run_dir)
        exclude = {s: [p for p in ids if p not in saw.get(s, [])] for s, ids in train_now.items()}
        # a site whose half is empty (its other patients erased) sits this reference out
        empty = [s for s in train_now if not saw.get(s)]
        if len(empty) > 1:
            raise ConfigError(f"reference model {k}: sites {', '.join(empty)} have no training patient left in "
                              f"its half; remove {folder.parent} and build a new set ({_command(run_dir)})")
        rounds = int(index["rounds"])
        tick(0, rounds)
        final, _ = retrain.federated_retrain(run_dir, folder / "run", exclude=exclude, from_round=0,
                                     drop_site=empty[0] if empty else None, rounds=rounds, backend=backend,
                                     on_round=lambda e: tick(int(e["round"]), rounds))
        shutil.copyfile(final, folder / "model.pt")
        shutil.rmtree(folder / "run")  # the derived run's other rounds and site states are not needed
    else:
        if cohort is None:
            raise ConfigError("reference models of a central run need its cohort (--cohort)")
        cfg = TrainConfig.from_dict(load_checkpoint(run_dir / "last.pt")["config"])
        cfg = replace(cfg, steps=max(1, round(index.get("schedule", 1.0) * cfg.steps)))  # a shorter schedule
        tick(0, cfg.steps)
        res = Trainer(cohort, cfg, folder / "run", subjects=[cohort.subject(i) for i in saw["central"]]).fit(
            on_step=lambda step, steps, _loss: tick(step, steps))
        shutil.copyfile(res["checkpoint"], folder / "model.pt")
        shutil.rmtree(folder / "run")
    return {"k": k, "saw": saw, "checkpoint": f"{k}/model.pt", "sha256": file_sha256(folder / "model.pt"),
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def superseded(run_dir: str | Path, subjects: Sequence[str]) -> list[dict]:
    """Reference checkpoints (and their score caches) that trained on any of ``subjects``: an
    erasure of those patients deletes them with the run's other files that carry them."""
    run_dir = Path(run_dir)
    try:
        index = _read_index(run_dir)
    except ConfigError:
        return []  # a foreign set is never used, so it is not this erasure's business
    out = []
    for e in (index or {}).get("references", {}).values():
        if not set(subjects) & {p for ids in e["saw"].values() for p in ids}:
            continue
        for p in (run_dir / REF_DIR / e["checkpoint"], (run_dir / REF_DIR / e["checkpoint"]).parent / "scores.json"):
            if p.is_file():
                out.append({"path": str(p.relative_to(run_dir)), "sha256": file_sha256(p)})
    return out


# -- the test of one model ----------------------------------------------------------------

def calibrated_test(refs: ReferenceSet, model, items: Sequence[dict], patch_size, num_classes: int, *,
               members: Sequence[str], nonmembers: Sequence[str], views: int = 2, seed: int = 0,
               statistic: str = "loss", alpha: float = lira.ALPHA, test: str = "auto",
               on_progress: OnProgress | None = None) -> dict:
    """Per-patient calibrated test of ``model`` on ``items`` (every patient to test), plus the
    population AUC and TPR at 1 % FPR over ``members`` (the model's training patients) vs
    ``nonmembers`` (patients it never saw). The shift of :mod:`privseg.audit.lira` is estimated
    on the non-members that no reference saw either. ``on_progress``: one phase per model scored
    (a reference's cached scores count at once). ``test``: :func:`privseg.audit.lira.run_test`'s
    (``auto``: LiRA with 2+ OUT references per patient, else the RMIA-style test)."""
    ids = [it["id"] for it in items]
    tick = phase_counter(on_progress, "scoring the model", len(items))
    model_rows = {}
    for k, it in enumerate(items):
        model_rows[it["id"]] = subject_statistics(model, [it], patch_size, num_classes, views,
                                                  _view_seed(seed, it["id"]))[0]
        if tick:
            tick(k + 1, len(items))
    target = {p: lira.lira_score(model_rows[p], statistic) for p in ids}
    n = len(refs.references)
    ref_scores = [{p: lira.lira_score(r, statistic) for p, r in ref.statistics(
        items, patch_size, num_classes, views, seed,
        on_subject=phase_counter(on_progress, f"scoring reference model {j + 1}/{n}", len(items))).items()}
        for j, ref in enumerate(refs.references)]
    saw = [ref.patients for ref in refs.references]
    anyone = set().union(*saw)
    test = lira.run_test(target, ref_scores, saw, [p for p in nonmembers if p not in anyone], alpha, test)
    for p, row in test["patients"].items():
        row["loss"], row["dice"] = model_rows[p]["loss"], model_rows[p]["dice"]
    test["population"] = lira.population(test, [p for p in members if p in target],
                                         [p for p in nonmembers if p in target])
    test.update({"statistic": statistic, "views": views, "seed": seed})
    return test


def run_membership(run_dir: str | Path, checkpoint: str | Path | None = None, *, cohort=None, views: int = 2,
                   seed: int = 0, statistic: str = "loss", on_progress: OnProgress | None = None,
                   references: ReferenceSet | None = None) -> dict:
    """The calibrated test of a run's model (default: the one it serves) on every patient: its
    training patients are the members, the val/test patients the non-members. Needs the run's
    reference models (a ConfigError naming the command that trains them otherwise).
    ``on_progress``: loading the patients, then each model scored. ``references``: a subset of the
    run's set (e.g. one complementary pair, :func:`pair`) instead of all of it."""
    run_dir = Path(run_dir)
    refs = references or load_references(run_dir)
    train = sorted({p for ids in _training_patients(run_dir).values() for p in ids})
    if _is_federated(run_dir):
        cfg = FLConfig.load(run_dir)
        path = Path(checkpoint) if checkpoint else RunState.load(run_dir).last_checkpoint
        subjects = [(c, x) for s in cfg.sites for c in [read_site_cohort(s.cohort)] for x in site_subjects(c, s)]
    else:
        if cohort is None:
            raise ConfigError("the calibrated test of a central run needs its cohort (--cohort)")
        path = Path(checkpoint) if checkpoint else run_dir / "last.pt"
        subjects = [(cohort, x) for x in cohort.subjects]
    model = _load_model(path)
    tc = load_checkpoint(path)["config"]
    members = [x for c, x in subjects if x.id in train]
    nonmembers = [x for c, x in subjects if x.split in ("val", "test")]
    items = []
    tested = [(c, x) for c, x in subjects if x.id in train or x.split in ("val", "test")]
    tick = phase_counter(on_progress, "loading patients", len(tested))
    for k, (c, x) in enumerate(tested):
        items += load_preprocessed([x], c, tc.get("spacing"))
        if tick:
            tick(k + 1, len(tested))
    res = calibrated_test(refs, model, items, tc["patch_size"], tc["num_classes"], members=[x.id for x in members],
                          nonmembers=[x.id for x in nonmembers], views=views, seed=seed, statistic=statistic,
                          on_progress=on_progress)
    res["checkpoint"] = str(path)
    res["references"] = refs.summary()
    return res


# -- a stopping rule for local unlearning --------------------------------------------------

STOP_P = 0.1  # stop at twice ALPHA: a margin for the repair rounds that follow the local stage


def calibrated_stopper(refs: ReferenceSet, forget: Sequence[dict], never_seen: Sequence[dict], patch_size,
                       num_classes: int, *, views: int = 2, seed: int = 0, statistic: str = "loss",
                       stop_p: float = STOP_P, utility_fraction: float = 0.9, test: str = "auto",
                       log: list | None = None) -> Callable[[int, object], bool]:
    """``should_stop(step, model)`` for local unlearning: True once the calibrated test no longer
    tells any ``forget`` patient from patients nobody trained on (every p >= ``stop_p``), while
    the model still works on ``never_seen`` (their mean Dice at least ``utility_fraction`` of its
    value at the first check, taken before the first step; a strategy that wrecks the model would
    otherwise "forget" at once).

    Only data the erasing site holds is needed: its forget and never-seen patients (these also
    give the shift of :func:`privseg.audit.lira.per_patient_test`) and the reference models'
    scores on them, computed once and cached with the references."""
    if not never_seen:
        raise ConfigError("the calibrated stopping rule needs never-seen patients at the site (a val or test "
                          "split) to estimate the shift")
    items = [*forget, *never_seen]
    ref_scores = [{p: lira.lira_score(r, statistic) for p, r in
                   ref.statistics(items, patch_size, num_classes, views, seed).items()} for ref in refs.references]
    saw = [ref.patients for ref in refs.references]
    nobody = [it["id"] for it in never_seen if not any(it["id"] in s for s in saw)]
    floor: list[float] = []

    def should_stop(step: int, model) -> bool:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                rows = {it["id"]: subject_statistics(model, [it], patch_size, num_classes, views,
                                                     _view_seed(seed, it["id"]))[0] for it in items}
        finally:
            model.train(was_training)
        res = lira.run_test({p: lira.lira_score(r, statistic) for p, r in rows.items()}, ref_scores, saw, nobody,
                            test=test)
        p_forget = {it["id"]: res["patients"][it["id"]]["p"] for it in forget}
        dice = float(np.mean([rows[it["id"]]["dice"] for it in never_seen]))
        if not floor:
            floor.append(utility_fraction * dice)
        done = min(p_forget.values()) >= stop_p and dice >= floor[0]
        if log is not None:
            log.append({"step": step, "p": p_forget, "never_seen_dice": dice, "utility_floor": floor[0],
                        "stop_p": stop_p, "statistic": statistic, "test": res["test"],
                        "stop": done})
        return done

    return should_stop
