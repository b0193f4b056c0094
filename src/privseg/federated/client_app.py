"""The privseg ClientApp: one hospital trains and evaluates on its own subjects.

Which site a ClientApp serves comes from the node config (deployment:
``flower-supernode --node-config 'site="H1" cohort="/data/h1" cohort-site="" state-dir="..."'``,
plus ``exclude="S017,S020"`` for subjects erased at that site)
or, in simulation, from the partition ID mapped to the run's site list.

Each train message carries the global weights (``arrays``) and a config record -- the
ClientApp's run configuration, built by :func:`privseg.federated.server_app.client_run_config`
-- with the foundation's ``TrainConfig`` (``train-config``, JSON), ``server-round``,
``local-steps``, ``proximal-mu`` (FedProx), ``local-norm`` (FedBN) and, under DP, the privacy
spec as ``dp-*`` keys (read by :func:`privseg.federated.private.site_step_fn`, never here). The
client runs the foundation's :func:`privseg.train.loop.train_steps` for steps
``(round-1)*local_steps .. round*local_steps`` with a per-site seed, so a repeated round gives
the same update. Its reply holds the new weights (without the normalisation layers under
FedBN), and ``num-examples`` = training subjects, ``train-loss``, ``compute-s`` (local compute
time) in a MetricRecord, and the site ID in a ConfigRecord ``site``.

Site-local state (FedBN's normalisation layers) is written after every round to
``<state-dir>/local_r<round>.pt`` (default ``<run-dir>/sites/<site>/``); the next round, or
the same round repeated after a server crash, reads the newest file older than that round.

Hook for another local step: ``make_client_app(step_fn_factory=...)``; the factory gets
``(train_config, message_config, site, state_dir)`` and returns the ``step_fn`` that
:func:`train_steps` runs (default :func:`privseg.federated.private.site_step_fn`: the ordinary
step, or patient-level DP-SGD when the run's privacy spec has unit ``patient``). The train
handler's errors leave as :class:`~privseg.errors.SiteFailure`; under DP the ClientApp's mod
(:func:`privseg.federated.dp_mod.withhold_errors_mod`, Flower's idiom) lets only their class go.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privseg.data.cohort import SPLITS_FILE, write_splits
from privseg.errors import ConfigError, DataError, SiteFailure
from privseg.federated.dp_mod import withhold_errors_mod
from privseg.federated.private import site_step_fn
from privseg.federated.sites import SiteSpec, cached_cohort, site_items, site_seed, site_subjects
from privseg.federated.strategies import attach_proximal, global_params, load_arrays, norm_state_keys, state_to_arrays
from privseg.privacy.releases import ReleaseRecord, ReplyPacer
from privseg.train.inference import evaluate_subjects, summarise
from privseg.train.loop import StepFn, TrainConfig, make_optimizer, standard_step, train_steps
from privseg.utils import atomic_path, pick_device, site_dir

StepFnFactory = Callable[[TrainConfig, ConfigRecord, SiteSpec, Path], StepFn]
KEEP_LOCAL_STATES = 3

def resolve_site(context: Context, sites: Sequence[SiteSpec] | None, state_root: str | Path | None,
                 config: ConfigRecord | None = None) -> tuple[SiteSpec, Path]:
    """(site, state folder) of this node: node config ``site`` + ``cohort`` (deployment), else
    partition ID -> ``sites`` (simulation)."""
    nc = context.node_config
    if "site" in nc and "cohort" in nc:
        spec = SiteSpec(id=str(nc["site"]), cohort=str(nc["cohort"]),
                        cohort_site=str(nc.get("cohort-site", "")) or None,
                        exclude=tuple(i for i in str(nc.get("exclude", "")).split(",") if i),
                        splits=str(nc.get("splits", "")) or None)
    elif sites is not None and "partition-id" in nc:
        pid = int(nc["partition-id"])
        if not 0 <= pid < len(sites):
            raise ConfigError(f"partition {pid} has no site (the run has {len(sites)} sites)")
        spec = sites[pid]
    else:
        raise ConfigError("this SuperNode has no site: start it with --node-config 'site=\"H1\" cohort=\"/path\"' "
                          f"(node config: {dict(nc)})")
    if nc.get("state-dir"):
        state_dir = Path(str(nc["state-dir"]))
    else:
        root = state_root or (config.get("run-dir") if config is not None else None)
        if not root:
            raise ConfigError(f"site {spec.id}: no state-dir in the node config and no run-dir to fall back on")
        state_dir = site_dir(str(root), spec.id)
    return spec, state_dir


# -- site-local state (FedBN norms) ----------------------------------------------

def save_local_state(state_dir: Path, server_round: int, state: dict[str, torch.Tensor]) -> Path:
    path = state_dir / f"local_r{server_round:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    old = sorted(state_dir.glob("local_r*.pt"))
    for p in old[:-KEEP_LOCAL_STATES]:
        p.unlink(missing_ok=True)
    return path


def load_local_state(state_dir: Path, up_to_round: int) -> dict[str, torch.Tensor] | None:
    """The newest local state written in a round <= ``up_to_round`` (None if there is none)."""
    best = None
    for p in state_dir.glob("local_r*.pt"):
        try:
            r = int(p.stem.split("_r")[1])
        except (IndexError, ValueError):
            continue
        if r <= up_to_round and (best is None or r > best[0]):
            best = (r, p)
    if best is None:
        return None
    try:
        return torch.load(best[1], map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file must name itself
        raise DataError(best[1], f"site-local state unreadable ({type(exc).__name__}: {exc})") from None


# -- the two message handlers ----------------------------------------------------

def _train_config(config: ConfigRecord) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(str(config["train-config"])))
    except KeyError:
        raise ConfigError("train message has no train-config") from None


def _check_cohort(spec: SiteSpec, tc: TrainConfig) -> None:
    cohort = cached_cohort(spec.cohort)
    if cohort.num_classes != tc.num_classes or len(cohort.channels) != tc.in_channels:
        raise DataError(spec.cohort, f"site {spec.id} has {cohort.num_classes} classes and {len(cohort.channels)} "
                        f"channels; the federation's model has {tc.num_classes} and {tc.in_channels}")


def _local_model(msg: Message, tc: TrainConfig, local_norm: bool, state_dir: Path, up_to_round: int):
    model = tc.build_model().to(pick_device(tc.device))
    keys = norm_state_keys(model) if local_norm else set()
    load_arrays(model, msg.content["arrays"], skip=keys)
    if local_norm:
        local = load_local_state(state_dir, up_to_round)
        if local is not None:
            model.load_state_dict(local, strict=False)
    return model, keys


def local_train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, items: Sequence[dict], config: TrainConfig,
                start: int, stop: int, step_fn: StepFn = standard_step) -> list[float]:
    """A site's local work for one round: the foundation's ``train_steps``, unchanged."""
    own = getattr(step_fn, "train_steps", None)  # privseg.privacy: a DP step_fn brings its own Poisson sampling
    if own is not None:
        return own(model, optimizer, items, config, start, stop)
    return train_steps(model, optimizer, items, config, start=start, stop=stop, step_fn=step_fn)


def client_train(msg: Message, context: Context, sites: Sequence[SiteSpec] | None = None,
                 state_root: str | Path | None = None, step_fn_factory: StepFnFactory | None = None) -> Message:
    cfg = msg.content["config"]
    spec, state_dir = resolve_site(context, sites, state_root, cfg)
    try:
        return _train_at_site(msg, cfg, spec, state_dir, step_fn_factory)
    except Exception as exc:  # the reply names the site (see SiteFailure); under DP the mod withholds the text
        raise SiteFailure(spec.id, exc) from exc


def _train_at_site(msg: Message, cfg, spec: SiteSpec, state_dir: Path,
                   step_fn_factory: StepFnFactory | None) -> Message:
    server_round = int(cfg["server-round"])
    tc = _train_config(cfg)
    steps = int(cfg.get("local-steps", 1))
    mu = float(cfg.get("proximal-mu", 0.0))
    local_norm = bool(cfg.get("local-norm", False))
    _check_cohort(spec, tc)
    t0 = time.perf_counter()
    items = site_items(spec, "train", tc.spacing, int(cfg.get("cache-sites", 8)))
    if not items:
        raise DataError(spec.cohort, f"site {spec.id} has no training subjects")
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    torch.manual_seed(tc.seed + site_seed(spec.id) + server_round)
    model, local_keys = _local_model(msg, tc, local_norm, state_dir, server_round - 1)
    optimizer = make_optimizer(model, tc)
    handle = attach_proximal(optimizer, model, global_params(model, local_keys), mu) if mu > 0 else None
    site_cfg = replace(tc, seed=tc.seed + site_seed(spec.id))
    # privacy enters here, through privseg.federated.private: the spec from the run config's dp-* keys
    step_fn = (step_fn_factory or site_step_fn)(tc, cfg, spec, state_dir)
    start, stop = (server_round - 1) * steps, server_round * steps
    release = None
    if hasattr(step_fn, "release_id"):  # privseg.privacy: a request answered before gets its reply again
        release = step_fn.release_id(model, optimizer, items, site_cfg, start, stop)
        stored = ReleaseRecord(state_dir).stored_reply(release)
        if stored is not None:
            return _reply(msg, spec, stored["arrays"], stored["metrics"])
    losses = local_train(model, optimizer, items, site_cfg, start, stop, step_fn)
    if handle is not None:
        handle.remove()
    state = model.state_dict()
    if not (state_dir / SPLITS_FILE).exists():  # the site's split, kept at the site (subject IDs are its data)
        cohort = cached_cohort(spec.cohort)
        write_splits(cohort, state_dir, site_subjects(cohort, spec))
    if local_norm:
        save_local_state(state_dir, server_round, {k: state[k] for k in local_keys})
    compute = time.perf_counter() - t1
    if hasattr(step_fn, "round_metrics"):  # privseg.privacy: a DP site releases only what is accounted
        metrics = MetricRecord(dp_round_metrics(step_fn.round_metrics(), steps))
    else:
        metrics = MetricRecord({
            "num-examples": len(items), "train-loss": float(sum(losses) / len(losses)),
            "train-loss-last": losses[-1], "compute-s": compute, "load-s": t_load, "steps": steps})
    arrays = {k: v.detach().cpu() for k, v in state.items() if k not in local_keys}  # what leaves the site
    if release is not None:  # kept (fsync'd) before the reply leaves: the record of what the site released
        ReleaseRecord(state_dir).store(release, {"arrays": arrays, "metrics": dict(metrics)}, round=server_round,
                                       scope=str(cfg.get("dp-ledger-scope", "")), steps=[start, stop])
        ReplyPacer(state_dir).pad(t0, steps)  # the reply's timing must not tell how many were sampled
    return _reply(msg, spec, arrays, metrics)


def _reply(msg: Message, spec: SiteSpec, state: dict, metrics) -> Message:
    content = RecordDict({"arrays": state_to_arrays(state), "metrics": MetricRecord(dict(metrics)),
                          "site": ConfigRecord({"site": spec.id})})
    return Message(content, reply_to=msg)


def dp_round_metrics(dp_metrics: dict, steps: int) -> dict:
    """What a site under patient-level DP tells the server after a round: the public plan's
    figures (ε booked, δ, budget, noise multiplier) and the clip, itself a DP release. Not the
    training loss (one patient's exact loss when one is sampled), not the compute time (reveals
    how many were sampled), not its number of patients (``num-examples`` is 1: sites weigh
    equally, so n stays at the site) -- see docs/privacy.md."""
    return {"num-examples": 1, "steps": steps, **dp_metrics}


def client_evaluate(msg: Message, context: Context, sites: Sequence[SiteSpec] | None = None,
                    state_root: str | Path | None = None) -> Message:
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    spec, state_dir = resolve_site(context, sites, state_root, cfg)
    tc = _train_config(cfg)
    _check_cohort(spec, tc)
    split = str(cfg.get("eval-split", "test"))
    t0 = time.perf_counter()
    items = site_items(spec, split, tc.spacing, int(cfg.get("cache-sites", 8)))
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    model, _ = _local_model(msg, tc, bool(cfg.get("local-norm", False)), state_dir, server_round)
    rows = evaluate_subjects(model, items, tc.patch_size, tc.num_classes) if items else []
    compute = time.perf_counter() - t1
    if rows:
        s = summarise(rows)["overall"]
        values: dict[str, Any] = {"mean-dice": float(s["mean_dice"]), "mae": float(s["mae"]),
                                  "dice": [float(x) for x in s["dice"]]}
    else:
        values = {"mean-dice": 0.0, "mae": 0.0, "dice": [0.0] * (tc.num_classes - 1)}
    metrics = MetricRecord({"num-examples": len(rows), **values, "compute-s": compute, "load-s": t_load})
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site": spec.id, "split": split})})
    return Message(content, reply_to=msg)


def make_client_app(sites: Sequence[SiteSpec] | None = None, state_root: str | Path | None = None,
                    step_fn_factory: StepFnFactory | None = None) -> ClientApp:
    """A ClientApp; ``sites`` maps simulation partition IDs to sites (deployment: node config)."""
    sites = list(sites) if sites is not None else None
    root = str(state_root) if state_root is not None else None
    app = ClientApp()

    def state_dir_of(msg: Message, context: Context) -> Path:
        return resolve_site(context, sites, root, msg.content["config"])[1]

    @app.train(mods=[withhold_errors_mod(state_dir_of)])  # under DP an error's text stays at the site
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, sites, root, step_fn_factory)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, sites, root)

    return app


# For ``flwr run`` (the component named in the app's pyproject.toml).
app = make_client_app()
