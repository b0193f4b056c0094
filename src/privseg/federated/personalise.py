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
* ``ditto`` -- Ditto's personal model (Li, Hu, Beirami & Smith, "Ditto: fair and robust federated
  learning through personalization", ICML 2021): minimise the site's loss plus
  ``lambda/2 ||v - w||^2``, the distance to the global model ``w`` (``ditto_lambda``). Trained
  here as a post-training stage from the finished global model, with finetune's epochs, draws
  and validation stop. Ditto proper updates the personal model beside every round's local
  update, against a global model that is still moving; once the global model is fixed the two
  solve the same problem (the personal objective only sees ``w``), so this is Ditto's limit
  for a converged federation, not its round-by-round path (and not its extra per-round cost).
  The term is applied *decoupled*, as AdamW decouples weight decay (Loshchilov & Hutter,
  ICLR 2019): after each optimiser step ``v <- v - c (v - w)`` with ``c = lr lambda / (1 +
  lr lambda)``, the proximal (implicit) step of the penalty. Added to the gradient instead,
  Adam would divide it by its own running scale and the pull would no longer grow with the
  distance; decoupled, ``lambda = 0`` is finetune exactly and a large ``lambda`` keeps ``v``
  at ``w``; under Adam (steps of about ``lr`` per weight) a weight settles within about
  ``1/lambda`` of the global one. ``<run>/sites/<site>/ditto.pt``.
* ``head`` -- a per-site head on the global body (FedRep's split, Collins et al., "Exploiting
  shared representations for personalized federated learning", ICML 2021; FedPer, Arivazhagan
  et al. 2019): the global model with only its decoder (the model's ``decoder_modules()``:
  U-Net decoder and output convolution) fine-tuned at the site, the encoder kept as the
  federation trained it, with finetune's epochs, draws and validation stop. FedRep trains the
  head at every round and the body on top of it; here the body is the finished global one.
  ``<run>/sites/<site>/head.pt``.

``finetune``, ``ditto`` and ``head`` draw the same patches at the same steps (one seed), so at a
site they differ only in what they train: a paired comparison.

FedBN (per-site normalisation layers, Li et al., ICLR 2021) is a training strategy: under it,
"global" at a site is already the shared weights with that site's own norms.

**The guard** (:func:`personalise`): each site evaluates the global model and every model trained
above on its **validation** patients, serves the best (a tie keeps the global model), and the
figures on its **test** patients are what is reported (the split that chose is not the split that
reports). The run keeps the global model; the choice, both Dice figures per candidate and each
method's own record go to ``<run>/personalisation.json`` (:func:`read_personalisation`).

Cost per site: for each of finetune, ditto and head at most ``epochs`` x ceil(train patients /
subjects per step) steps plus one validation pass per epoch (head's steps are cheaper: no
gradient for the encoder's weights), one local-only training (the federation's per-site steps),
and one evaluation of every candidate on validation and on test. Under patient-level DP every
method's training steps (the local-only model's too: a second DP training of the site) are DP
steps booked in the site's ledger under ``personalise/r<round>/<method>``, priced at every site
before any step and refused when a budget cannot pay (:class:`privseg.federated.private.PersonalDP`;
docs/privacy.md); under client-level DP it is refused. An erasure covers these models
(:mod:`privseg.erasure.personalised`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from privseg.errors import ConfigError
from privseg.federated.client_app import load_local_state
from privseg.federated.config import FLConfig
from privseg.federated.private import personal_dp
from privseg.federated.runstate import RunState, hold_run
from privseg.federated.sites import SiteSpec, site_items, site_seed
from privseg.federated.strategies import build_strategy
from privseg.models.registry import encoder_decoder_params
from privseg.train.checkpoint import load_checkpoint, save_checkpoint, training_weights
from privseg.train.inference import evaluate_subjects, summarise
from privseg.train.loop import TrainConfig, make_optimizer, train_steps
from privseg.utils import registrar, setting, site_dir, write_json

RESULT_FILE = "personalisation.json"
GLOBAL = "global"
DITTO_LAMBDA = 100.0  # with AdamW at lr 3e-3 (the benchmark's): c = 0.23 per step, weights within ~0.01 of global


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
    ditto_lambda: float = DITTO_LAMBDA  # ditto's pull towards the global model
    # under patient-level DP: the method's steps as the site's DP-SGD steps, booked in its ledger
    # (privseg.federated.private.PersonalDP.steps); None: plain steps
    steps: Callable | None = None
    # under patient-level DP: an epoch's steps from the site's public plan (1 / q), so the steps
    # taken -- and the epsilon booked -- never reveal the site's exact number of patients
    public_epoch: int | None = None

    def train_steps(self, model, optimizer, items: Sequence[dict], tc: TrainConfig, start: int, stop: int):
        """Training steps ``start .. stop`` on the site's patients (every method trains through here)."""
        if self.steps is not None:
            return self.steps(model, optimizer, items, tc, start, stop)
        return train_steps(model, optimizer, items, tc, start=start, stop=stop)

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
        if self.public_epoch is not None:
            return self.public_epoch
        return max(1, math.ceil(len(self.train_items) / self.train.subjects_per_step))


PersonaliseFn = Callable[[SiteRun, int], tuple[torch.nn.Module, dict]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: PersonaliseFn
    file: str  # in the site's state folder
    summary: str
    max_steps: Callable[[SiteRun, int], int] | None = None  # the most steps it takes (default: epochs x an epoch)

    def most_steps(self, site: SiteRun, epochs: int) -> int:
        """The most training steps the method takes at ``site`` (what a DP budget must be able to pay)."""
        return int(self.max_steps(site, epochs)) if self.max_steps else int(epochs) * site.epoch_steps()


METHODS: dict[str, Method] = {}


def register(name: str, *, file: str,
             max_steps: Callable[[SiteRun, int], int] | None = None) -> Callable[[PersonaliseFn], PersonaliseFn]:
    """File ``fn`` in :data:`METHODS` under ``name``, its model written to ``<site state>/<file>``;
    a name already taken is refused (a second method must not silently replace the first)."""

    if name == GLOBAL:  # the name the guard gives the global model
        raise ConfigError(f"personalisation method {name!r} is already registered")
    return registrar(METHODS, name, kind="personalisation method",
                     entry=lambda fn: Method(name, fn, file, (fn.__doc__ or "").strip().splitlines()[0], max_steps))


def mean_dice(model: torch.nn.Module, items: Sequence[dict], tc: TrainConfig) -> float | None:
    """Mean Dice over ``items`` (None when there are none)."""
    if not items:
        return None
    return float(summarise(evaluate_subjects(model, items, tc.patch_size, tc.num_classes))["overall"]["mean_dice"])


def attach_pull(optimizer: torch.optim.Optimizer, model: torch.nn.Module, reference: dict[str, torch.Tensor],
                lam: float, lr: float):
    """Ditto's proximal term ``lam/2 ||v - w||^2`` towards ``reference`` (``w``), applied decoupled:
    after each ``optimizer.step()``, ``v <- v - c (v - w)`` with ``c = lr lam / (1 + lr lam)`` (the
    implicit step of the penalty, stable for any ``lam``; module docstring). Returns the hook handle."""
    c = lr * lam / (1.0 + lr * lam)
    pairs = [(p, reference[n].to(p.device)) for n, p in model.named_parameters() if n in reference]

    def hook(_opt, _args, _kwargs) -> None:
        with torch.no_grad():
            for p, ref in pairs:
                p.sub_(p - ref, alpha=c)

    return optimizer.register_step_post_hook(hook)


def distance(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """L2 distance between the model's parameters and ``reference`` (how far personalisation moved it)."""
    return float(sum(((p.detach() - reference[n]) ** 2).sum() for n, p in model.named_parameters()) ** 0.5)


def adapt(site: SiteRun, epochs: int, *, lam: float = 0.0, head_only: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train the global model further on the site's patients, the validation Dice checked after each
    epoch, stopped when it stops improving, the best epoch kept (epoch 0 is the global model). With
    ``lam`` > 0 pulled towards the global model (ditto); with ``head_only`` only the decoder trains."""
    tc, per_epoch = site.site_config(1), site.epoch_steps()  # one seed for finetune, ditto and head: paired
    torch.manual_seed(tc.seed)
    model = site.global_model()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    if head_only:
        for p in encoder_decoder_params(model)[0]:
            p.requires_grad_(False)  # AdamW skips parameters without a gradient (no step, no weight decay)
    optimizer = make_optimizer(model, site.train)
    if lam > 0:
        attach_pull(optimizer, model, reference, lam, site.train.lr)
    best_dice, best_epoch = mean_dice(model, site.val_items, tc), 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history, epoch = [best_dice], 0
    for epoch in range(1, int(epochs) + 1):
        site.train_steps(model, optimizer, site.train_items, tc, (epoch - 1) * per_epoch, epoch * per_epoch)
        dice = mean_dice(model, site.val_items, tc)
        history.append(dice)
        if dice <= best_dice:  # validation stopped improving: stop, keep the best epoch
            break
        best_dice, best_epoch = dice, epoch
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.requires_grad_(True)
    return model, {"epochs_run": epoch, "best_epoch": best_epoch, "steps_per_epoch": per_epoch,
                   "steps": epoch * per_epoch, "val_dice_per_epoch": history,
                   "distance_to_global": distance(model, reference)}


@register("finetune", file="personal.pt")
def finetune(site: SiteRun, epochs: int) -> tuple[torch.nn.Module, dict]:
    """Fine-tune the global model on the site's patients, stopped by its validation Dice."""
    return adapt(site, epochs)


@register("ditto", file="ditto.pt")
def ditto(site: SiteRun, epochs: int) -> tuple[torch.nn.Module, dict]:
    """Ditto: a personal model pulled towards the global one (lambda), stopped by validation Dice."""
    model, info = adapt(site, epochs, lam=site.ditto_lambda)
    return model, {**info, "lambda": site.ditto_lambda}


@register("head", file="head.pt")
def head(site: SiteRun, epochs: int) -> tuple[torch.nn.Module, dict]:
    """A per-site decoder (head) on the global encoder (FedRep's split), stopped by validation Dice."""
    return adapt(site, epochs, head_only=True)


@register("local", file="local.pt", max_steps=lambda site, epochs: site.step_budget)
def local_only(site: SiteRun, epochs: int) -> tuple[torch.nn.Module, dict]:
    """The site's own model from the run's initial model, on its patients only, same step budget."""
    tc = site.site_config(2)
    torch.manual_seed(tc.seed)
    model = site.train.build_model()
    model.load_state_dict(training_weights(load_checkpoint(site.initial_checkpoint)))
    site.train_steps(model, make_optimizer(model, tc), site.train_items, tc, 0, site.step_budget)
    return model, {"steps": site.step_budget}


@dataclass
class Personalisation:
    """What :func:`personalise` is asked for (``privseg fl personalise`` options, made from these fields)."""

    method: list[str] | None = setting(None, "Method (repeatable; default: all).", choices=METHODS)
    epochs: int = setting(3, "Most epochs of finetune, ditto and head (validation stops them earlier).", min=1)
    ditto_lambda: float = setting(DITTO_LAMBDA, "Ditto's pull towards the global model (0: finetune).", min=0)


def global_state(cfg: FLConfig, state: RunState, state_dir: Path) -> dict[str, torch.Tensor]:
    """The served global weights, with the site's own norm layers under a strategy that keeps them local."""
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


def choose(val_dice: dict[str, float]) -> str:
    """The guard's choice: the candidate with the best validation Dice; a tie keeps the shared global model."""
    return max(val_dice, key=lambda k: (val_dice[k], k == GLOBAL))


def site_run(run_dir: Path, cfg: FLConfig, state: RunState, spec: SiteSpec,
             ditto_lambda: float = DITTO_LAMBDA, private=None) -> SiteRun:
    """What the methods get at site ``spec`` of the finished run in ``run_dir`` (``private``: its
    epochs are the site's public plan's, :meth:`privseg.federated.private.PersonalDP.epoch_steps`)."""
    tc = cfg.train
    state_dir = site_dir(run_dir, spec.id)
    val = site_items(spec, "val", tc.spacing)
    if not val:
        raise ConfigError(f"site {spec.id}: no validation patients in {spec.cohort}; the guard chooses the served "
                          "model on them (give the cohort a val split, or the site a split file that names some)")
    train = site_items(spec, "train", tc.spacing)
    return SiteRun(cfg, spec, state_dir, train, val, global_state(cfg, state, state_dir),
                   cfg.local_steps * training_rounds(state), state.checkpoint_path(0), float(ditto_lambda),
                   public_epoch=private.epoch_steps(spec, train) if private is not None else None)


def personalise_site(run_dir: Path, cfg: FLConfig, state: RunState, spec: SiteSpec, methods: Sequence[str],
                     epochs: int, ditto_lambda: float = DITTO_LAMBDA, private=None) -> dict:
    """Train ``methods`` at one site, then the guard: choose on validation, report on test.
    ``private`` (:class:`privseg.federated.private.PersonalDP`, under patient-level DP): every
    method's steps are DP steps booked in the site's ledger, refused before the first one when
    the site's budget cannot pay for the most steps the methods may take."""
    tc = cfg.train
    site = site_run(run_dir, cfg, state, spec, ditto_lambda, private)
    state_dir, val = site.state_dir, site.val_items
    if private is not None:
        private.require([private.cost(spec, site.train_items, {m: METHODS[m].most_steps(site, epochs)
                                                               for m in methods})], f"personalisation at {spec.id}")
    models = {GLOBAL: site.global_model()}
    record: dict = {"methods": {}, "checkpoints": {GLOBAL: str(state.last_checkpoint.relative_to(run_dir))}}
    for name in methods:
        t0 = time.perf_counter()
        site.steps = private.steps(spec, name, site.train_items) if private is not None else None
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
    record["serves"] = choose(record["val_dice"])
    record.update(val_patients=len(val), test_patients=len(test))
    if private is not None:
        record["dp"] = private.record(spec.id)
    return record


def personalise(run_dir: str | Path, methods: Sequence[str] | None = None, epochs: int = Personalisation.epochs,
                on_site: Callable[[str, dict], None] | None = None,
                ditto_lambda: float = Personalisation.ditto_lambda) -> dict:
    """Personalise every site of the finished run in ``run_dir`` with ``methods`` (default: every
    registered one) and apply the per-site guard; writes and returns ``personalisation.json``'s content."""
    run_dir = Path(run_dir)
    cfg, state = FLConfig.load(run_dir), RunState.load(run_dir)
    methods = check_methods(methods or tuple(METHODS))
    if int(epochs) < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    if not (math.isfinite(ditto_lambda) and ditto_lambda >= 0):
        raise ConfigError(f"--ditto-lambda must be a finite number >= 0 (got {ditto_lambda})")
    if state.rounds_done < 1 or state.last_checkpoint is None:
        raise ConfigError(f"run {run_dir.name} has no trained global model yet (run privseg fl run first)")
    # under patient-level DP the steps are DP steps in each site's ledger (None without DP; --dp site refused)
    private = personal_dp(run_dir, cfg, scope=f"personalise/r{state.rounds_done}")
    if private is not None:  # every site's most steps priced before any site takes one
        sites = [site_run(run_dir, cfg, state, spec, ditto_lambda, private) for spec in cfg.sites]
        private.require([private.cost(site.spec, site.train_items, {m: METHODS[m].most_steps(site, epochs)
                                                                    for m in methods}) for site in sites],
                        f"personalisation of run {run_dir.name}")
    out = {"global_round": state.rounds_done, "strategy": cfg.strategy, "methods": methods, "epochs": int(epochs),
           "choose_on": "val", "report_on": "test", "sites": {}}
    if "ditto" in methods:
        out["ditto_lambda"] = float(ditto_lambda)
    with hold_run(run_dir, "personalisation"):
        for spec in cfg.sites:
            out["sites"][spec.id] = personalise_site(run_dir, cfg, state, spec, methods, int(epochs),
                                                     float(ditto_lambda), private)
            if on_site:
                on_site(spec.id, out["sites"][spec.id])
        write_json(run_dir / RESULT_FILE, out)
    return out


def read_personalisation(run_dir: str | Path) -> dict | None:
    """The run's ``personalisation.json`` (None before :func:`personalise` ran)."""
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
