"""An erasure covers every model a site serves: the personalised models of the run.

After ``privseg fl personalise`` (:mod:`privseg.federated.personalise`) a site may serve its own
model instead of the global one (``personalisation.json``, ``sites/<site>/<method file>``). Those
models hold the erased data too: a model fine-tuned from the global model (``finetune``,
``ditto``, ``head``) carries everything the global model carried, and the erasing site's
local-only model trained on the patient directly. So an erasure, once its verification passed
and before it completes, runs the stage ``personalised`` (:func:`cover_personalised`):

* **a patient erased at site S**: at every site, each method whose model started from the
  global model is run again from the erased global model, with the method list and settings
  recorded in ``personalisation.json`` (epochs, ditto's lambda); at S the local-only model is
  retrained too (on the retained patients: the patient is in S's ``exclude`` list by now). A
  local-only model at another site never saw the patient (the data-free initial model and that
  site's own patients): it is kept and scored again. The guard then chooses again at every site
  (on validation, reported on test) -- the global model it compares against has changed.
* **a whole site erased**: its personalised models are deleted (their hashes recorded) and it
  leaves ``personalisation.json``; the other sites are redone as above (their fine-tuned models
  came from a global model that held the site), their local-only models kept.
* **when a site cannot be redone** (no validation patients left, a method no longer registered,
  under DP a budget that cannot pay for the steps): its stale personalised models are deleted and
  the site serves the erased global model; the record says why.

Under patient-level DP the redone training steps are DP steps booked in the site's ledger under
the erasure's scope (``erasure/<request>/personalise/<method>``), spending from the erasure
reserve like the erasure's other steps (:mod:`privseg.federated.private`).

The ``personalised`` ledger entry records, per site, what was redone, kept or deleted, with the
stale files' SHA-256 (taken before anything is overwritten, in the stage's ``started`` entry, so
a crash and a resumed request still name the old files); ``completed`` lists them as copies
(``retrained`` / ``deleted``) and the models the erasure covered (the global one, and each
site's personalised models).
"""

from __future__ import annotations

from pathlib import Path

from privseg.audit.ledger import file_sha256, latest_after
from privseg.erasure.request import ErasureJob, ErasureRequest
from privseg.errors import PrivsegError
from privseg.federated.config import FLConfig
from privseg.federated.personalise import (
    GLOBAL,
    METHODS,
    RESULT_FILE,
    choose,
    global_state,
    mean_dice,
    personalise_site,
    read_personalisation,
)
from privseg.federated.private import personal_dp
from privseg.federated.runstate import RunState
from privseg.federated.sites import site_items
from privseg.train.checkpoint import load_checkpoint
from privseg.utils import site_dir, write_json

# Methods whose model starts from the data-free initial model and trains on the site's own patients
# only (personalise.local_only): at a site other than the erasing one it never held the erased data.
# Any other method (finetune, ditto, head, one added later) starts from the global model: redone.
OWN_DATA_ONLY = frozenset({"local"})
# settings of personalisation.json that personalise_site takes as keyword arguments
SETTINGS = ("ditto_lambda",)


def _stale(res: dict, req: ErasureRequest, run_dir: Path) -> list[dict]:
    """The personalised model files that held the erased data (path, site, method, SHA-256)."""
    out = []
    for site, rec in res["sites"].items():
        for method, rel in rec.get("checkpoints", {}).items():
            if method == GLOBAL or (method in OWN_DATA_ONLY and site != req.site):
                continue
            path = run_dir / rel
            if path.is_file():
                out.append({"path": rel, "site": site, "method": method, "sha256": file_sha256(path)})
    return out


def _kept(res: dict, req: ErasureRequest, site: str) -> list[str]:
    """Methods at ``site`` whose model is kept as it is (it never held the erased data)."""
    return [m for m in res["methods"] if m in OWN_DATA_ONLY and site != req.site
            and m in res["sites"].get(site, {}).get("checkpoints", {})]


def _redo_site(run_dir: Path, cfg: FLConfig, state: RunState, site: str, res: dict, req: ErasureRequest,
               rid: str) -> dict:
    """Personalise ``site`` again from the erased global model (the methods that held the data),
    score the kept ones again, and choose as the guard does."""
    old = res["sites"][site]
    kept = _kept(res, req, site)
    redo = [m for m in res["methods"] if m not in kept]
    unknown = [m for m in redo if m not in METHODS]
    if unknown:
        raise PrivsegError(f"method(s) {', '.join(unknown)} are not registered in this version")
    spec = cfg.site(site)
    settings = {k: res[k] for k in SETTINGS if k in res}
    rec = personalise_site(run_dir, cfg, state, spec, redo, int(res["epochs"]), **settings,
                           **_dp_kwargs(run_dir, cfg, rid))
    tc = cfg.train
    val, test = site_items(spec, "val", tc.spacing), site_items(spec, "test", tc.spacing)
    for m in kept:
        model = tc.build_model()
        model.load_state_dict(load_checkpoint(run_dir / old["checkpoints"][m])["model"])
        rec["methods"][m] = {**old["methods"].get(m, {}), "kept": "never held the erased data"}
        rec["checkpoints"][m] = old["checkpoints"][m]
        rec["val_dice"][m], rec["test_dice"][m] = mean_dice(model, val, tc), mean_dice(model, test, tc)
    rec["serves"] = choose(rec["val_dice"])  # the guard, with the kept models among the candidates
    rec["redone"], rec["kept"] = redo, kept
    return rec


def _dp_kwargs(run_dir: Path, cfg: FLConfig, rid: str) -> dict:
    """Under patient-level DP: the redone steps are DP steps in the erasure's scope (empty otherwise)."""
    dp = personal_dp(run_dir, cfg, scope=f"erasure/{rid}/personalise", spend_reserve=True)
    return {"private": dp} if dp is not None else {}


def _fallback(run_dir: Path, cfg: FLConfig, state: RunState, site: str, why: str) -> dict:
    """The site serves the erased global model (its stale personalised models are deleted)."""
    tc, spec = cfg.train, cfg.site(site)
    model = tc.build_model()
    model.load_state_dict(global_state(cfg, state, site_dir(run_dir, site)))
    dice = {}
    for split in ("val", "test"):
        try:
            dice[split] = mean_dice(model, site_items(spec, split, tc.spacing), tc)
        except PrivsegError:
            dice[split] = None
    return {"methods": {}, "checkpoints": {GLOBAL: str(state.last_checkpoint.resolve().relative_to(run_dir.resolve()))},
            "val_dice": {GLOBAL: dice["val"]}, "test_dice": {GLOBAL: dice["test"]}, "serves": GLOBAL,
            "fallback": f"could not be personalised again ({why}); its personalised models were deleted and it "
                        "serves the erased global model"}


def cover_personalised(job: ErasureJob) -> dict | None:
    """The ``personalised`` stage (module docstring); its ledger body, or None when the run has no
    personalisation (the erasure then covers the global model alone)."""
    run_dir, req, rid, ledger, say = job.run_dir, job.req, job.rid, job.ledger, job.say
    res = read_personalisation(run_dir)
    entries = job.entries()
    done = latest_after(entries, "personalised", "verified")
    if done is not None:
        return done["body"]
    if res is None:
        return None
    began = latest_after(entries, "started", "verified")
    if began is None or began["body"].get("stage") != "personalised":
        # the stale files' hashes before anything is overwritten (a resumed stage reads them from here)
        began = ledger.append(rid, "started", {"stage": "personalised", "stale": _stale(res, req, run_dir)})
    stale = began["body"]["stale"]
    cfg, state = job.cfg, job.state
    sites, covered, copies = {}, [], []
    for site in res["sites"]:
        files = [s for s in stale if s["site"] == site]
        if site not in cfg.site_ids:  # a whole site erased: its models go
            why = f"personalised model of site {site}, erased with the site"
            sites[site] = {"erased": True}
        else:
            say("personalised", f"site {site}: personalising again from the erased global model")
            try:
                sites[site] = _redo_site(run_dir, cfg, state, site, res, req, rid)
                why = ""
            except PrivsegError as exc:
                why = str(exc)
                sites[site] = _fallback(run_dir, cfg, state, site, why)
                say("personalised", f"site {site}: {sites[site]['fallback']}")
        for f in files:
            redone = not why and f["method"] in sites[site].get("redone", [])
            if not redone:
                (run_dir / f["path"]).unlink(missing_ok=True)
            copies.append({"path": f["path"], "sha256": f["sha256"], "fate": "retrained" if redone else "deleted",
                           "what": f"personalised model ({f['method']}) of site {site}",
                           "reason": (f"personalised again ({f['method']}) from the erased global model on the "
                                      "retained patients" if redone else why)})
            covered.append({"model": f["method"], "site": site, "path": f["path"],
                            "fate": "retrained" if redone else "deleted"})
    out = {**res, "global_round": state.rounds_done, "erasure": rid,
           "sites": {s: r for s, r in sites.items() if not r.get("erased")}}
    write_json(run_dir / RESULT_FILE, out)
    # a remaining site's local-only model never held the erased data, whether it is still served or not
    never_saw = [rec["checkpoints"][m] for s, rec in res["sites"].items() if s in cfg.site_ids and s != req.site
                 for m in OWN_DATA_ONLY if m in rec.get("checkpoints", {})]
    return ledger.append(rid, "personalised", {
        "covered": covered, "copies": copies, "never_saw": never_saw,
        "serves": {s: r["serves"] for s, r in out["sites"].items()},
        "fallback": {s: r["fallback"] for s, r in out["sites"].items() if r.get("fallback")}})["body"]
