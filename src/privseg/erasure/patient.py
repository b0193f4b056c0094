"""Erasure of a patient at a site, the stages after ``requested``: ``local_unlearned`` (an
unlearning strategy at the site, on the site's data only; DP fine-tuning in a DP run), ``repaired``
(ordinary federated rounds with every site from the unlearned model), ``verified`` and
``completed`` (see :mod:`privseg.erasure.federated` for the whole sequence)."""

from __future__ import annotations

import time
from dataclasses import replace

from privseg.audit.ledger import artefact, latest, latest_after
from privseg.audit.reference import load_references
from privseg.erasure.personalised import cover_personalised
from privseg.erasure.private import dp_local_finetune, dp_of, local_dp_steps
from privseg.erasure.request import ErasureJob
from privseg.erasure.verification import complete, superseded, verified, verify_patient
from privseg.errors import CheckpointError
from privseg.federated.retrain import round_seconds
from privseg.federated.simulation import run_rounds
from privseg.federated.sites import read_site_cohort, site_subjects
from privseg.unlearn.engine import unlearn


def erase_patient(job: ErasureJob) -> None:
    """The stages of a patient request after ``requested`` (each skipped when the ledger shows it done)."""
    run_dir, req = job.run_dir, job.req
    entries = job.entries()
    requested = latest(entries, "requested")["body"]
    n0 = int(requested["source"]["round"])
    # 2. local unlearning at the site
    local = latest(entries, "local_unlearned")
    if local is None:
        local = _local_unlearn(job, requested)
    # 3. repair rounds with every site
    repaired = _repair(job, n0, local)

    # 4. verification
    def evidence() -> dict:
        body = verify_patient(job, requested, repaired["body"])
        intermediate = [run_dir / local["body"]["model"]["path"]] if req.repair_rounds > 0 else []
        body["superseded"] = superseded(run_dir, job.state, upto_round=n0, extra=intermediate)
        body["seconds_erasure"] = float(local["body"]["seconds"]) + float(repaired["body"]["seconds"])
        body["cpu_s_erasure"] = float(local["body"].get("cpu_s", 0)) + float(repaired["body"].get("cpu_s", 0))
        return body

    ver = verified(job, "repaired", evidence, "membership test and Dice")
    if ver is None:
        return
    # 5. the site's personalised models, when the run has them (privseg.erasure.personalised)
    personal = cover_personalised(job)
    # 6. complete: delete what still carries the patient
    complete(job, ver, repaired["body"]["model"], personal)


def _local_unlearn(job: ErasureJob, requested: dict) -> dict:
    """Unlearn at the site with its own data, exclude the patient there; the ``local_unlearned`` entry.
    Target ``calibrated``: stop once the run's reference models no longer tell the patient from
    the site's never-seen ones (scored as the verification scores them: ``mia_views``)."""
    run_dir, req, rid, ledger, cfg, say = job.run_dir, job.req, job.rid, job.ledger, job.cfg, job.say
    work = run_dir / "erasure" / rid
    spec = cfg.site(req.site)
    # a crash after the exclusion was saved but before the ledger entry: the patient is still this request's
    spec = replace(spec, exclude=tuple(x for x in spec.exclude if x not in req.subjects))
    cohort = read_site_cohort(spec.cohort)
    site_cohort = cohort.with_subjects(site_subjects(cohort, spec))
    ledger.append(rid, "started", {"stage": "local_unlearned", "site": req.site})
    c0, t0 = time.process_time(), time.perf_counter()
    if dp_of(cfg) is not None:  # a DP run: the local stage is DP too, and paid from the site's budget
        steps = local_dp_steps(cfg, req)
        say("local_unlearned", f"site {req.site}: {steps} DP fine-tuning step(s) on its other patients")
        ckpt, info = dp_local_finetune(run_dir, cfg, req.site, req.subjects, run_dir / requested["source"]["path"],
                                       work / "local", steps, scope=f"erasure/{rid}/local")
        info.pop("retain_patients_at_site", None)  # n at the site: not released under DP
        body = {"site": req.site, **info, "params": {}, "target": "dp", "epochs": req.epochs,
                "stopped_early": False, "checks": []}
    else:
        say("local_unlearned", f"site {req.site}: {req.method} ({req.target}) on its own data")
        refs = load_references(run_dir) if req.needs_references else None
        res = unlearn(run_dir / requested["source"]["path"], site_cohort, list(req.subjects), **req.unlearn_args(),
                      out_dir=work / "local", evaluate=False, references=refs, mia_views=job.mia_views)
        r = res.report
        ckpt = res.checkpoint
        body = {"site": req.site, "strategy": req.method, "params": r["params"], "target": r["target"],
                "epochs": r["epochs"], "steps_run": r["steps_run"], "stopped_early": r["stopped_early"],
                "checks": r["checks"][-1:] if r["checks"] else [], "n_checks": len(r["checks"]),
                "retain_subjects_at_site": len(r["request"]["retain"])}
    cfg.sites = [replace(s, exclude=(*s.exclude, *req.subjects)) if s.id == req.site else s for s in cfg.sites]
    cfg.save(run_dir)  # from now on the site never uses the patient again
    return ledger.append(rid, "local_unlearned", {
        **body, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
        "model": artefact(run_dir, ckpt), "excluded_at_site": list(req.subjects)})


def _repair(job: ErasureJob, n0: int, local: dict) -> dict:
    """Run the repair rounds not yet recorded (from the unlearned model); the latest ``repaired`` entry.
    The rounds append to the run: ``job.state`` becomes the state they leave."""
    run_dir, req, rid, ledger = job.run_dir, job.req, job.rid, job.ledger
    until = n0 + req.repair_rounds
    repaired = latest_after(job.entries(), "repaired", "requested")
    if repaired is None or int(repaired["body"]["until_round"]) < until:
        state = job.state
        tagged = [e for e in state.rounds if int(e["round"]) > n0 and e.get("erasure") != rid]
        if tagged:
            raise CheckpointError(f"run {run_dir.name} trained round {tagged[0]['round']} after the request "
                                  f"(made at round {n0}) outside this erasure; submit a new request")
        state.data["restart_from"] = {"after_round": n0, "until_round": until, "request": rid,
                                      "checkpoint": local["body"]["model"]["path"]}
        state.save()
        ledger.append(rid, "started", {"stage": "repaired", "until_round": until})
        t0 = time.perf_counter()
        if until > state.rounds_done:
            job.say("repaired", f"{until - state.rounds_done} repair round(s) with every site")
            state = job.state = run_rounds(run_dir, job.backend, rounds=until)
        if state.rounds_done < until:
            raise CheckpointError(f"repair rounds stopped at round {state.rounds_done} ({state.status}); "
                                  f"{state.data.get('stop_reason', '')}")
        repair_s, repair_cpu = round_seconds(state, lambda e: e.get("erasure") == rid)
        # a site that failed a repair round was left out of it (fault tolerance): the record says so
        failed_sites = [{"round": int(e["round"]), "site": f["site"], "reason": f["reason"]}
                        for e in state.rounds if e.get("erasure") == rid for f in e.get("failed", [])]
        ckpt = state.checkpoint_path(until) if until > n0 else run_dir / local["body"]["model"]["path"]
        if until == n0:  # no repair: the unlearned model is served as it is
            state.data["last_checkpoint"] = local["body"]["model"]["path"]
            state.save()
        ledger.append(rid, "repaired", {"rounds": list(range(n0 + 1, until + 1)), "until_round": until,
                                        "seconds": repair_s, "cpu_s": repair_cpu, "wall_s": time.perf_counter() - t0,
                                        "failed_sites": failed_sites,
                                        "model": artefact(run_dir, ckpt)})
    return latest_after(job.entries(), "repaired", "requested")
