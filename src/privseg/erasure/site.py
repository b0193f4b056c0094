"""Erasure of a whole site: the methods (``retrain``, ``federaser`` and ``fedrecover``, filed in
:data:`privseg.erasure.request.SITE_ERASERS`) and the stages of a site request after
``requested``: ``site_removed``, ``verified``, ``completed`` (the site leaves the run's config and
the new model is installed as the next round). The federated retrain they build on is
:mod:`privseg.federated.retrain`; FedRecover's estimation is :mod:`privseg.erasure.fedrecover`."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from privseg.audit.ledger import artefact, latest
from privseg.erasure.fedrecover import FedRecoverHook, fedrecover_schedule
from privseg.erasure.personalised import cover_personalised
from privseg.erasure.request import SITE_ERASERS, ErasureJob, ErasureRequest, StageCallback, site_eraser, site_params
from privseg.erasure.verification import complete, site_cohorts, split_ids, superseded, verified, verify
from privseg.errors import ConfigError
from privseg.federated.config import FLConfig
from privseg.federated.retrain import derived_run, federated_retrain, round_seconds
from privseg.federated.runstate import RunState
from privseg.federated.simulation import run_rounds
from privseg.federated.strategies import arrays_to_state, build_strategy, state_to_arrays
from privseg.privacy.budget import BudgetLedger, ledger_path
from privseg.train.checkpoint import load_checkpoint, load_weights_only, save_checkpoint, training_weights
from privseg.utils import site_dir


class FedEraserCalibration:
    """FedEraser's calibration as an update hook (Liu et al. 2021, eq. 3): calibration round ``i``
    stands for a group of consecutive original rounds ``T_i`` (``calibration_interval`` of them).
    Each remaining site trains briefly from the unlearned global model ``M~``; its update
    ``U~ = W~ - M~`` keeps its direction but takes, per tensor, the norm of the site's stored
    movement over the group, ``U = sum_{t in T_i} (W_t - M_{t-1})``:
    ``W~ <- M~ + ||U|| U~ / ||U~||``. FedAvg of the calibrated updates gives the next ``M~``.

    The paper keeps one round in ``interval`` and uses that round's update norm, so the
    unlearned model takes ``interval`` times fewer steps of the original size; summing the
    group's updates keeps the trajectory's length (measured here: with one round's norm, retain
    Dice fell to 0.4 x the retrain's at interval 4)."""

    def __init__(self, run_dir: Path, state: RunState, groups: Sequence[Sequence[int]]):
        self.run_dir = run_dir
        self.state = state
        self.groups = [list(g) for g in groups]
        self.log: list[dict] = []

    def _movement(self, rounds: Sequence[int], site: str) -> dict[str, torch.Tensor] | None:
        """Sum over ``rounds`` of the site's stored update minus the global model it started from."""

        total: dict[str, torch.Tensor] | None = None
        for t in rounds:
            entry = next((e for e in self.state.rounds if int(e["round"]) == t), {})
            rel = (entry.get("updates") or {}).get(site)
            if not rel:
                continue  # the site did not train in round t
            new = load_weights_only(self.run_dir / rel, "stored update")
            prev = training_weights(load_checkpoint(self.state.checkpoint_path(t - 1)))  # the iterate
            step = {k: new[k].float() - prev[k].float() for k in new if new[k].is_floating_point()}
            total = step if total is None else {k: total[k] + step[k] for k in step}
        return total

    def __call__(self, server_round: int, replies: list, global_arrays) -> list:

        if server_round > len(self.groups):
            return replies  # the repair rounds after the calibration: ordinary FedAvg
        rounds = self.groups[server_round - 1]
        g = arrays_to_state(global_arrays)
        kept = []
        for m in replies:
            site = str(m.content["site"]["site"])
            old = self._movement(rounds, site)
            if old is None:  # the site trained in none of these rounds: nothing to calibrate against
                self.log.append({"round": server_round, "original_rounds": rounds, "site": site, "skipped": True})
                continue
            new = arrays_to_state(m.content["arrays"])
            cal = {}
            for k, w in new.items():
                if not w.is_floating_point() or k not in old:
                    cal[k] = w
                    continue
                du = w - g[k]
                n_new, n_old = float(du.norm()), float(old[k].norm())
                cal[k] = g[k] + du * (n_old / n_new) if n_new > 0 else g[k].clone()
            m.content["arrays"] = state_to_arrays(cal)
            kept.append(m)
            self.log.append({"round": server_round, "original_rounds": rounds, "site": site})
        return kept or replies


def federaser_groups(state: RunState, site: str, interval: int) -> list[list[int]]:
    """The applied rounds since ``site`` joined, in groups of ``interval`` consecutive rounds."""
    applied = _replayed(state, site)
    return [applied[i:i + interval] for i in range(0, len(applied), interval)]


# -- the site erasure methods (the registry and what a method is: privseg.erasure.request) -------------

@dataclass
class SiteJob:
    """What a site erasure method's ``run`` gets: the run (its config and state), the request, the
    rounds the site trained in, the round the request applies to, a work folder of its own."""

    run_dir: Path
    req: ErasureRequest
    cfg: FLConfig
    state: RunState
    touched: list[int]
    source_round: int
    work: Path
    backend: str
    say: StageCallback


@site_eraser("retrain")
class RetrainSite:
    """Exact: a federated retrain without the site from the global model before it joined."""

    def dp_steps(self, cfg: FLConfig, state: RunState, req: ErasureRequest) -> int:
        touched = state.rounds_of_site(req.site)
        return (state.rounds_done - min(touched) + 1) * cfg.local_steps if touched else 0

    def usable(self, cfg: FLConfig, state: RunState, site: str) -> bool:
        return True

    def run(self, job: SiteJob):
        joined = min(job.touched)
        rounds = job.source_round - joined + 1
        job.say("site_removed", f"federated retrain without {job.req.site} from round {joined - 1}")
        model_path, _ = federated_retrain(job.run_dir, job.work, drop_site=job.req.site, from_round=joined - 1,
                                          rounds=rounds, backend=job.backend)
        seconds, cpu = round_seconds(RunState.load(job.work))
        return model_path, seconds, cpu, {"from_round": joined - 1, "rounds": rounds}


@site_eraser("federaser")
class FedEraserSite:
    """FedEraser (Liu et al., IWQoS 2021): calibrated replay of the stored updates without the site."""

    def dp_steps(self, cfg: FLConfig, state: RunState, req: ErasureRequest) -> int:
        if not state.rounds_of_site(req.site):
            return 0
        groups = federaser_groups(state, req.site, req.calibration_interval)
        return (len(groups) + req.repair_rounds) * max(1, round(req.calibration_ratio * cfg.local_steps))

    def usable(self, cfg: FLConfig, state: RunState, site: str) -> bool:
        """The stored updates and global checkpoints of every round since the site joined are there."""
        first = min(state.rounds_of_site(site), default=state.rounds_done + 1)
        return all(e.get("updates") and state.checkpoint_path(int(e["round"]) - 1).is_file()
                   for e in state.rounds if int(e["round"]) >= first)

    def run(self, job: SiteJob):
        req, cfg, state = job.req, job.cfg, job.state
        groups = federaser_groups(state, req.site, req.calibration_interval)
        stored = {int(e["round"]): e.get("updates") for e in state.rounds}
        missing = [t for g in groups for t in g if not (state.checkpoint_path(t - 1).is_file() and stored.get(t))]
        if missing:
            raise ConfigError(f"FedEraser needs the stored updates and global checkpoints of rounds "
                              f"{missing[:5]}... (the run was trained without --keep-updates, "
                              "pruned its checkpoints, or an earlier erasure deleted them); use --method retrain")
        steps = max(1, round(req.calibration_ratio * cfg.local_steps))
        remaining = [s for s in cfg.sites if s.id != req.site]
        sub_cfg = derived_run(job.run_dir, job.work, sites=remaining, start=state.checkpoint_path(min(job.touched) - 1),
                              rounds=len(groups) + req.repair_rounds, local_steps=steps, name_suffix=job.work.name)
        job.say("site_removed", f"FedEraser: {len(groups)} calibration rounds x {steps} local steps, then "
                                f"{req.repair_rounds} repair round(s), without {req.site}")
        strategy = build_strategy(cfg.strategy, min_sites=sub_cfg.min_sites, fraction=1.0,
                                  proximal_mu=cfg.proximal_mu, params=cfg.strategy_params, evaluate=False)
        hook = FedEraserCalibration(job.run_dir, state, groups)
        strategy.update_hooks.append(hook)
        final = run_rounds(job.work, job.backend, strategy=strategy)
        seconds, cpu = round_seconds(final)
        return final.last_checkpoint, seconds, cpu, {
            "original_rounds": groups, "local_steps": steps, "repair_rounds": req.repair_rounds,
            "ratio": req.calibration_ratio, "interval": req.calibration_interval, "calibrated": len(hook.log)}


def _replayed(state: RunState, site: str) -> list[int]:
    """The applied rounds since ``site`` joined (what an approximate erasure replays)."""
    joined = min(state.rounds_of_site(site))
    return [int(e["round"]) for e in state.rounds if e.get("applied") and int(e["round"]) >= joined]


@site_eraser("fedrecover")
class FedRecoverSite:
    """FedRecover (Cao et al., IEEE S&P 2023; :mod:`privseg.erasure.fedrecover`): the rounds since
    the site joined are replayed without it; the remaining sites train only in the exact rounds
    (``warmup`` first, every ``correction``-th, the ``final`` last, and up to ``max_extra`` whose
    estimate was abnormal: norm over ``abnormal`` x the stored update's, 0 = no check); in the
    others the server estimates their updates from the stored ones with L-BFGS (``buffer`` pairs).
    The paper's defaults (20 warm-up, every 10th, 5 final, buffer 2, of 2,000 rounds) scaled to
    runs of about a hundred rounds."""

    defaults = {"warmup": 2, "correction": 10, "final": 3, "buffer": 2, "abnormal": 3.0, "max_extra": 3}
    AVERAGING = ("fedavg", "fedprox")  # strategies whose server step the estimated rounds reproduce

    def check(self, p: dict) -> None:
        ints = {"warmup": 1, "correction": 1, "final": 0, "buffer": 1, "max_extra": 0}
        for k, low in ints.items():
            if isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < low:
                raise ConfigError(f"--param {k}={p[k]!r}: fedrecover needs an integer >= {low}")
        if isinstance(p["abnormal"], bool) or not isinstance(p["abnormal"], int | float) or not (
                p["abnormal"] == 0 or p["abnormal"] >= 1):
            raise ConfigError(f"--param abnormal={p['abnormal']!r}: fedrecover needs 0 (no check) or a ratio >= 1")

    def _plan(self, state: RunState, req: ErasureRequest) -> tuple[list[int], list[bool], dict]:
        p = site_params(req.method, req.params)
        rounds = _replayed(state, req.site)
        return rounds, fedrecover_schedule(len(rounds), p["warmup"], p["correction"], p["final"]), p

    def dp_steps(self, cfg: FLConfig, state: RunState, req: ErasureRequest) -> int:
        if not state.rounds_of_site(req.site):
            return 0
        rounds, exact, p = self._plan(state, req)  # the budget pays for every extra exact round allowed
        return min(len(rounds), sum(exact) + p["max_extra"]) * cfg.local_steps

    def usable(self, cfg: FLConfig, state: RunState, site: str) -> bool:
        return cfg.strategy in self.AVERAGING

    def run(self, job: SiteJob):
        req, cfg, state = job.req, job.cfg, job.state
        if (cfg.privacy is not None and cfg.privacy.unit == "site") or cfg.strategy not in self.AVERAGING:
            raise ConfigError(f"fedrecover estimates FedAvg rounds: it cannot replay a run with strategy "
                              f"{cfg.strategy} or client-level DP; use --method federaser or retrain")
        rounds, exact, p = self._plan(state, req)
        stored = {int(e["round"]): e.get("updates") or {} for e in state.rounds}
        missing = [t for t in rounds if not (state.checkpoint_path(t - 1).is_file() and stored.get(t)) or not all(
            (job.run_dir / rel).is_file() for s, rel in stored[t].items() if s != req.site)]
        if missing:
            raise ConfigError(f"FedRecover needs the stored updates and global checkpoints of rounds {missing[:5]}... "
                              "(the run was trained without --keep-updates, pruned its checkpoints, or an earlier "
                              "erasure deleted them); use --method retrain")
        shutil.rmtree(job.work, ignore_errors=True)  # the estimates live in memory: a crashed attempt starts over
        remaining = [s for s in cfg.sites if s.id != req.site]
        sub_cfg = derived_run(job.run_dir, job.work, sites=remaining, start=state.checkpoint_path(rounds[0] - 1),
                              rounds=sum(exact), name_suffix=job.work.name)
        job.say("site_removed", f"FedRecover: {len(rounds)} rounds without {req.site}, {sum(exact)} of them exact")
        strategy = build_strategy(cfg.strategy, min_sites=sub_cfg.min_sites, fraction=1.0,
                                  proximal_mu=cfg.proximal_mu, params=cfg.strategy_params, evaluate=False)
        hook = FedRecoverHook(job.run_dir, state, rounds, exact, [s.id for s in remaining], p)
        strategy.update_hooks.append(hook.on_updates)
        strategy.aggregate_hooks.append(hook.on_model)
        strategy.configure_train = hook.as_original_round(strategy.configure_train)
        final = RunState.load_or_new(job.work)
        while hook.pos < len(rounds):  # an abnormal estimate adds an exact round: extend the derived run
            before = hook.pos
            final = run_rounds(job.work, job.backend, rounds=final.rounds_done + hook.exact_left(), strategy=strategy)
            if hook.pos == before:
                raise ConfigError(f"FedRecover made no progress at original round {rounds[hook.pos]} "
                                  f"(run status {final.status}): too few sites answered")
        seconds, cpu = round_seconds(final)
        return final.last_checkpoint, seconds, cpu, {
            "from_round": rounds[0] - 1, "rounds": len(rounds), "exact_rounds": hook.counts["exact"],
            "estimated_rounds": hook.counts["estimated"], "extra_exact_rounds": hook.extra,
            "estimate_cpu_s": hook.estimate_cpu_s, "counts": hook.counts, "params": p}


def erase_site(job: ErasureJob) -> None:
    """The stages of a site request after ``requested`` (each skipped when the ledger shows it done)."""
    run_dir, req, rid, ledger, cfg, state = job.run_dir, job.req, job.rid, job.ledger, job.cfg, job.state
    entries = job.entries()
    requested = latest(entries, "requested")["body"]
    n0 = int(requested["source"]["round"])
    touched = state.rounds_of_site(req.site)
    removed = latest(entries, "site_removed")
    if removed is not None and removed["body"]["method"] != req.method:
        removed = None  # a new attempt with another method
    if removed is None:
        ledger.append(rid, "started", {"stage": "site_removed", "method": req.method})
        t0 = time.perf_counter()
        if not touched:
            model_path, info = run_dir / requested["source"]["path"], {"note": "the site never trained"}
            seconds = cpu = 0.0
        else:
            site_job = SiteJob(run_dir, req, cfg, state, touched, n0, run_dir / "erasure" / rid / req.method,
                               job.backend, job.say)
            model_path, seconds, cpu, info = SITE_ERASERS[req.method].run(site_job)
        removed = ledger.append(rid, "site_removed", {
            "site": req.site, "method": req.method, "rounds_touched": touched, "seconds": seconds, "cpu_s": cpu,
            "wall_s": time.perf_counter() - t0, "model": artefact(run_dir, model_path), **info})

    def evidence() -> dict:
        cohorts = site_cohorts(cfg.sites)
        spec = cfg.site(req.site)
        others = [s for s in cfg.sites if s.id != req.site]
        body = verify(job, run_dir / requested["source"]["path"], run_dir / removed["body"]["model"]["path"],
                      {req.site: split_ids(cohorts, spec, ("train",))},
                      {req.site: split_ids(cohorts, spec, ("val", "test"))},
                      {s.id: split_ids(cohorts, s, ("train",)) for s in others},
                      {s.id: split_ids(cohorts, s, ("test",)) for s in others})
        body["superseded"] = superseded(run_dir, state, upto_round=n0, from_round=min(touched) if touched else n0 + 1,
                                        sites=[req.site])
        body["seconds_erasure"] = float(removed["body"]["seconds"])
        body["cpu_s_erasure"] = float(removed["body"].get("cpu_s", 0))
        return body

    ver = verified(job, "site_removed", evidence, "membership test of the site's patients and Dice of the "
                   "remaining sites")
    if ver is None:
        return
    model = _install_site_removal(job, removed["body"], n0)
    personal = cover_personalised(job)  # the site's models go, the others' are redone
    complete(job, ver, model, personal)
    _remove_site_state(run_dir, req.site, rid)


def _remove_site_state(run_dir: Path, site: str, rid: str) -> None:
    """The site's state goes (local models, stored replies, its noise key), except its privacy
    ledger: that is the record of what the earlier models released, kept and marked closed."""
    folder, ledger = site_dir(run_dir, site), ledger_path(run_dir, site)
    if ledger.exists():
        BudgetLedger(ledger).close_site(site, f"site erased by request {rid}")
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.name.startswith(ledger.name):  # the ledger and its WAL files
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # no ledger (a run without DP): nothing to keep


def _install_site_removal(job: ErasureJob, removed: dict, n0: int) -> dict:
    """The site leaves the config; the new model becomes round ``n0 + 1`` of the run."""
    run_dir, req, cfg, state = job.run_dir, job.req, job.cfg, job.state
    if req.site in cfg.site_ids:
        cfg.sites = [s for s in cfg.sites if s.id != req.site]
        cfg.extra["withdrawn_sites"] = sorted({*cfg.extra.get("withdrawn_sites", []), req.site})
        cfg.min_sites = min(cfg.min_sites, len(cfg.sites))
        cfg.rounds = max(cfg.rounds, n0 + 1)
        cfg.save(run_dir)
    r = n0 + 1
    if state.rounds_done < r:
        model = cfg.train.build_model()
        model.load_state_dict(load_checkpoint(run_dir / removed["model"]["path"])["model"])
        path = save_checkpoint(state.checkpoint_path(r), model, config=cfg.train.to_dict(), step=r,
                               extra={"federated": {"run": cfg.name, "round": r, "erasure": job.rid,
                                                    "withdrawn": req.site}})
        state.record_round({"round": r, "participants": [], "failed": [], "train": {}, "applied": True,
                            "erasure": job.rid, "note": f"site {req.site} erased ({req.method})"}, path)
    return artefact(run_dir, state.checkpoint_path(r))
