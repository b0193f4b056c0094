"""Personalised models after federated training, and the per-site guard: no site served worse than
the global model or its own local-only model, as judged on its own validation patients.

A post-training stage, run at each site (here: in this process, from the run's site specs) once
the rounds are done. A personalisation method has one signature, ``fn(site: SiteRun, epochs) ->
(model, info)``, and is filed in :data:`METHODS` with :func:`register` (a name is registered once):

* ``finetune`` -- local fine-tuning of the global model (FedAvg+FT: Cheng et al., "Fine-tuning is
  fine in federated learning", 2021; Yu et al., "Salvaging federated learning by local
  adaptation", 2020): up to ``epochs`` epochs on the site's training patients, the validation Dice
  checked after each epoch, stopped when it stops improving, the best epoch kept (epoch 0 is the
  global model itself). Written to ``<run>/sites/<site>/personal.pt``.
* ``local`` -- the site's local-only model: trained from the run's initial model on the site's
  training patients alone, with the federation's step budget per site (rounds done x local
  steps), the baseline a hospital compares joining against. ``<run>/sites/<site>/local.pt``.

FedBN (per-site normalisation layers, Li et al., ICLR 2021) is a training strategy: under it,
"global" at a site is already the shared weights with that site's own norms.

**The guard** (:func:`personalise`): each site evaluates the global model and every model trained
above on its **validation** patients, serves the best (a tie keeps the global model), and the
figures on its **test** patients are what is reported (the split that chose is not the split that
reports). The run keeps the global model; the choice, both Dice figures per candidate and each
method's own record go to ``<run>/personalisation.json`` (:func:`read_personalisation`).

Cost: one fine-tuning (``epochs`` x ceil(train patients / subjects per step) steps, plus one
validation pass per epoch) and one local-only training (the federation's per-site steps) per
site, and three evaluations on validation and test. Under DP (patient or site level) this stage
is refused (its steps and its choice on validation patients would be releases outside the
ledger; see docs/privacy.md). Not done: an erasure does not yet cover the personalised and local models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from privseg.errors import ConfigError
from privseg.federated.config import FLConfig
from privseg.federated.runstate import RunState, hold_run
from privseg.federated.sites import SiteSpec, site_items, site_seed
from privseg.train.loop import TrainConfig
from privseg.utils import setting

RESULT_FILE = "personalisation.json"
GLOBAL = "global"


@dataclass
class SiteRun:
    """What a personalisation method gets at one site."""

    cfg: FLConfig
    spec: SiteSpec
    state_dir: Path
    train_items: Sequence[dict]
    val_items: Sequence[dict]
    global_state: dict[str, torch.Tensor]  # the global model as this site serves it (FedBN: its own norms)
    step_budget: int  # local steps this site took in the federation (training rounds x local steps)
    initial_checkpoint: Path  # the model the federation started from (checkpoints/global_r0000.pt)

    @property
    def train(self) -> TrainConfig:
        return self.cfg.train

    def site_config(self, offset: int) -> TrainConfig:
        """The run's training settings with this site's seed (``offset`` keeps each method's draws its own)."""
        return replace(self.train, seed=self.train.seed + site_seed(self.spec.id) + offset)

    def global_model(self) -> torch.nn.Module:
        model = self.train.build_model()
        model.load_state_dict(self.global_state)
        return model

    def epoch_steps(self) -> int:
        """Steps of one epoch: every training patient drawn once, in expectation."""
        return max(1, math.ceil(len(self.train_items) / self.train.subjects_per_step))


PersonaliseFn = Callable[[SiteRun, int], tuple[torch.nn.Module, dict]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: PersonaliseFn
    file: str  # in the site's state folder
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, *, file: str) -> Callable[[PersonaliseFn], PersonaliseFn]:
    """File ``fn`` in :data:`METHODS` under ``name``, its model written to ``<site state>/<file>``;
    a name already taken is refused (a second method must not silently replace the first)."""

    def deco(fn: PersonaliseFn) -> PersonaliseFn:
        if name in METHODS or name == GLOBAL:
            raise ConfigError(f"personalisation method {name!r} is already registered")
        METHODS[name] = Method(name, fn, file, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def mean_dice(model: torch.nn.Module, items: Sequence[dict], tc: TrainConfig) -> float | None:
    """Mean Dice over ``items`` (None when there are none)."""
    from privseg.train.inference import evaluate_subjects, summarise

    if not items:
        return None
    return float(summarise(evaluate_subjects(model, items, tc.patch_size, tc.num_classes))["overall"]["mean_dice"])


@register("finetune", file="personal.pt")
def finetune(site: SiteRun, epochs: int) -> tuple[torch.nn.Module, dict]:
    """Fine-tune the global model on the site's patients, stopped by its validation Dice."""
    from privseg.train.loop import make_optimizer, train_steps

    torch.manual_seed(site.site_config(1).seed)
    model = site.global_model()
    optimizer = make_optimizer(model, site.train)
    tc, per_epoch = site.site_config(1), site.epoch_steps()
    best_dice, best_epoch = mean_dice(model, site.val_items, tc), 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history, epoch = [best_dice], 0
    for epoch in range(1, int(epochs) + 1):
        train_steps(model, optimizer, site.train_items, tc, start=(epoch - 1) * per_epoch, stop=epoch * per_epoch)
        dice = mean_dice(model, site.val_items, tc)
        history.append(dice)
        if dice <= best_dice:  # validation stopped improving: stop, keep the best epoch
            break
        best_dice, best_epoch = dice, epoch
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, {"epochs_run": epoch, "best_epoch": best_epoch, "steps_per_epoch": per_epoch,
                   "steps": epoch * per_epoch, "val_dice_per_epoch": history}


@register("local", file="local.pt")
def local_only(site: SiteRun, epochs: int) -> tuple[torch.nn.Module, dict]:
    """The site's own model from the run's initial model, on its patients only, same step budget."""
    from privseg.train.checkpoint import load_checkpoint, training_weights
    from privseg.train.loop import make_optimizer, train_steps

    tc = site.site_config(2)
    torch.manual_seed(tc.seed)
    model = site.train.build_model()
    model.load_state_dict(training_weights(load_checkpoint(site.initial_checkpoint)))
    train_steps(model, make_optimizer(model, tc), site.train_items, tc, start=0, stop=site.step_budget)
    return model, {"steps": site.step_budget}


@dataclass
class Personalisation:
    """What :func:`personalise` is asked for (``privseg fl personalise`` options, made from these fields)."""

    method: list[str] | None = setting(None, f"Method: {' or '.join(METHODS)} (repeatable; default: all).")
    epochs: int = setting(3, "Most fine-tuning epochs (validation stops it earlier).", min=1)


def _global_state(cfg: FLConfig, state: RunState, state_dir: Path) -> dict[str, torch.Tensor]:
    """The served global weights, with the site's own norm layers under a strategy that keeps them local."""
    from privseg.federated.client_app import load_local_state
    from privseg.federated.strategies import build_strategy
    from privseg.train.checkpoint import load_checkpoint

    weights = dict(load_checkpoint(state.last_checkpoint)["model"])
    if build_strategy(cfg.strategy).local_norm:
        weights.update(load_local_state(state_dir, state.rounds_done) or {})
    return weights


def training_rounds(state: RunState) -> int:
    """Rounds that trained (an erasure's repair rounds are not the site's budget)."""
    return sum(1 for e in state.rounds if not e.get("erasure"))


def check_methods(methods: Sequence[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--method {', '.join(unknown) or '(none)'}: choose from {', '.join(METHODS)}")
    files = [METHODS[m].file for m in methods]
    if len(set(files)) < len(files):
        raise ConfigError(f"--method {', '.join(methods)}: two of them write the same model file; run them apart")
    return methods


def personalise_site(run_dir: Path, cfg: FLConfig, state: RunState, spec: SiteSpec, methods: Sequence[str],
                     epochs: int) -> dict:
    """Train ``methods`` at one site, then the guard: choose on validation, report on test."""
    from privseg.train.checkpoint import save_checkpoint

    tc = cfg.train
    state_dir = run_dir / "sites" / spec.id
    val = site_items(spec, "val", tc.spacing)
    if not val:
        raise ConfigError(f"site {spec.id}: no validation patients in {spec.cohort}; the guard chooses the served "
                          "model on them (give the cohort a val split, or the site a split file that names some)")
    site = SiteRun(cfg, spec, state_dir, site_items(spec, "train", tc.spacing), val,
                   _global_state(cfg, state, state_dir), cfg.local_steps * training_rounds(state),
                   state.checkpoint_path(0))
    models = {GLOBAL: site.global_model()}
    record: dict = {"methods": {}, "checkpoints": {GLOBAL: str(state.last_checkpoint.relative_to(run_dir))}}
    for name in methods:
        t0 = time.perf_counter()
        model, info = METHODS[name].fn(site, epochs)
        path = state_dir / METHODS[name].file
        save_checkpoint(path, model, config=tc.to_dict(), step=int(info.get("steps", 0)),
                        extra={"train_subjects": [i["id"] for i in site.train_items],
                               "personalisation": {"site": spec.id, "method": name,
                                                   "global_round": state.rounds_done}})
        models[name] = model
        record["methods"][name] = {**info, "seconds": time.perf_counter() - t0}
        record["checkpoints"][name] = str(path.relative_to(run_dir))
    test = site_items(spec, "test", tc.spacing)
    record["val_dice"] = {k: mean_dice(m, val, tc) for k, m in models.items()}
    record["test_dice"] = {k: mean_dice(m, test, tc) for k, m in models.items()}
    # the best on validation; a tie keeps the shared global model
    record["serves"] = max(models, key=lambda k: (record["val_dice"][k], k == GLOBAL))
    record.update(val_patients=len(val), test_patients=len(test))
    return record


def personalise(run_dir: str | Path, methods: Sequence[str] | None = None, epochs: int = Personalisation.epochs,
                on_site: Callable[[str, dict], None] | None = None) -> dict:
    """Personalise every site of the finished run in ``run_dir`` with ``methods`` (default: every
    registered one) and apply the per-site guard; writes and returns ``personalisation.json``'s content."""
    from privseg.federated.private import checkpoint_record
    from privseg.utils import write_json

    run_dir = Path(run_dir)
    cfg, state = FLConfig.load(run_dir), RunState.load(run_dir)
    methods = check_methods(methods or tuple(METHODS))
    if int(epochs) < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    dp = checkpoint_record(cfg).get("dp")  # the spec is read on the privacy path only (tests/test_layers.py)
    if dp:
        raise ConfigError(f"run {run_dir.name} was trained with differential privacy ({dp['unit']}-level): "
                          "personalisation would train and choose on the sites' patients outside the privacy "
                          "ledger, so it is refused (see docs/privacy.md)")
    if state.rounds_done < 1 or state.last_checkpoint is None:
        raise ConfigError(f"run {run_dir.name} has no trained global model yet (run privseg fl run first)")
    out = {"global_round": state.rounds_done, "strategy": cfg.strategy, "methods": methods, "epochs": int(epochs),
           "choose_on": "val", "report_on": "test", "sites": {}}
    with hold_run(run_dir, "personalisation"):
        for spec in cfg.sites:
            out["sites"][spec.id] = personalise_site(run_dir, cfg, state, spec, methods, int(epochs))
            if on_site:
                on_site(spec.id, out["sites"][spec.id])
        write_json(run_dir / RESULT_FILE, out)
    return out


def read_personalisation(run_dir: str | Path) -> dict | None:
    """The run's ``personalisation.json`` (None before :func:`personalise` ran)."""
    import json

    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
