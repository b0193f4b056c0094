"""The privseg ServerApp: runs the rounds, checkpoints every round, resumes after a crash.

The round loop is Flower's ``Strategy.start`` loop (configure_train -> send_and_receive ->
aggregate_train -> configure_evaluate -> send_and_receive -> aggregate_evaluate), written
out so that it can start at the round after the last checkpoint, write the run state after
every round, and record which sites took part, which failed and why. The strategies are
Flower's (see :mod:`privseg.federated.strategies`).

Faults: a site whose ClientApp raises returns an error reply; a site that is gone (killed
SuperNode) sends nothing before ``round_timeout``. Either way the round is aggregated from
the sites that did answer, provided at least ``min_sites`` did; otherwise the global model
is left unchanged for that round (recorded as ``applied: false``) and the run goes on.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from privseg.errors import ConfigError, SiteFailure
from privseg.federated import private
from privseg.federated.config import FLConfig
from privseg.federated.guard import attach_guard
from privseg.federated.runstate import RunState, hold_run
from privseg.federated.strategies import arrays_to_state, build_strategy, state_to_arrays
from privseg.train.checkpoint import load_checkpoint, save_checkpoint, training_weights
from privseg.train.ema import WeightEMA, load_ema
from privseg.utils import atomic_path, seed_everything

RoundCallback = Callable[[dict], None]


def _metrics(msg: Message) -> dict[str, Any]:
    rec = next(iter(msg.content.metric_records.values()))
    return {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}


def _site_of(msg: Message, node_site: dict[int, str]) -> str:
    """The site of a reply: from its content, or from the reason of a failed site's error reply
    (:class:`~privseg.errors.SiteFailure`); else the site this node answered as before."""
    nid = msg.metadata.src_node_id
    site = None
    if msg.has_content() and "site" in msg.content.config_records:
        site = str(msg.content["site"]["site"])
    elif msg.has_error():
        site = SiteFailure.site_in(str(msg.error.reason))
    if site is not None:
        node_site[nid] = site
        return site
    return node_site.get(nid, f"node-{nid}")


def wait_for_sites(grid: Grid, expected: int, minimum: int, timeout: float) -> list[int]:
    """Wait until ``expected`` nodes are connected, or ``timeout`` s; then at least ``minimum``
    must be, else the run cannot start."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise ConfigError(f"only {len(nodes)} site(s) connected within {timeout:.0f} s; "
                          f"at least {minimum} needed (min-sites)")
    return nodes


def _initial_model(cfg: FLConfig, state: RunState) -> tuple[torch.nn.Module, int, WeightEMA | None]:
    """The model the next round starts from (the last iterate), its round, and -- under DP with
    ``ema`` -- the weight average the run serves (continued from the checkpoint; started afresh
    from an erasure's restart model, so no average of the rounds before the erasure survives)."""
    seed_everything(cfg.train.seed)
    model = cfg.train.build_model()
    start = state.rounds_done + 1
    restart = state.restart_from
    if restart and state.rounds_done == int(restart["after_round"]):  # privseg.unlearn: repair after an erasure
        ckpt = state.run_dir / restart["checkpoint"]
    elif state.rounds_done > 0:
        ckpt = state.last_checkpoint
        if ckpt is None:
            raise ConfigError(f"{state.path}: {state.rounds_done} rounds done but no checkpoint recorded")
    else:  # round 0's checkpoint is the starting model (the seeded init, or a given one for a derived run)
        ckpt = state.checkpoint_path(0) if state.checkpoint_path(0).exists() else None
    payload = load_checkpoint(ckpt) if ckpt is not None else None
    if payload is not None:
        model.load_state_dict(training_weights(payload))
    decay = private.served_ema_decay(cfg)
    if not decay:
        return model, start, None
    ema = load_ema(payload, model) if payload is not None else None
    return model, start, ema or WeightEMA(model, decay)


def _save_global(cfg: FLConfig, state: RunState, model: torch.nn.Module, arrays: ArrayRecord, server_round: int,
                 entry: dict | None = None, ema: WeightEMA | None = None) -> Path:
    model.load_state_dict(arrays_to_state(arrays))
    if ema is not None and server_round > 0:  # the round's global model stands for its local steps
        ema.update(model, cfg.local_steps)
    path = state.checkpoint_path(server_round)
    extra = {"federated": {"run": cfg.name, "round": server_round, "strategy": cfg.strategy,
                           "participants": list(entry.get("participants", [])) if entry else []}}
    extra.update(private.checkpoint_record(cfg))  # the DP settings the model was trained under (provenance)
    save_checkpoint(path, model, config=cfg.train.to_dict(), step=server_round, extra=extra, ema=ema)
    if cfg.keep_checkpoints:
        done = sorted(path.parent.glob("global_r*.pt"))
        for p in done[:-cfg.keep_checkpoints]:
            if p.name != "global_r0000.pt":  # the initial model stays: retraining starts from it
                p.unlink(missing_ok=True)
    return path


def _save_update(state: RunState, server_round: int, site: str, msg: Message) -> str:
    path = state.update_path(server_round, site)
    arrays = next(iter(msg.content.array_records.values()))
    with atomic_path(path) as tmp:
        torch.save(dict(arrays_to_state(arrays)), tmp)
    return str(path.relative_to(state.run_dir))


def client_run_config(cfg: FLConfig, run_dir: str | Path) -> dict[str, Any]:
    """What every ClientApp reads as its run configuration (the config record of each train and
    evaluate message), the same in simulation and deployment: the foundation's ``train-config``
    (JSON), ``local-steps``, ``run-dir``, ``eval-split``, ``cache-sites``, and the privacy spec
    as flat ``dp-*`` keys (:func:`privseg.federated.private.run_config`; none without DP)."""
    base = {"train-config": json.dumps(cfg.train.to_dict()), "local-steps": cfg.local_steps,
            "run-dir": str(Path(run_dir).resolve()), "eval-split": cfg.eval_split, "cache-sites": cfg.cache_sites}
    return {**base, **private.run_config(cfg)}


def run_server(grid: Grid, run_dir: str | Path, *, on_round: RoundCallback | None = None,
               rounds: int | None = None, strategy=None) -> RunState:
    """Run (or resume) the federated run in ``run_dir`` on ``grid``; returns its final state.
    ``rounds`` overrides the configured number of rounds (to extend a finished run)."""
    with hold_run(run_dir, "a federated training run"):
        return _run_server(grid, Path(run_dir), on_round=on_round, rounds=rounds, strategy=strategy)


def _run_server(grid: Grid, run_dir: Path, *, on_round: RoundCallback | None, rounds: int | None,
                strategy) -> RunState:
    cfg = FLConfig.load(run_dir)
    if rounds is not None:
        cfg.rounds = int(rounds)
    state = RunState.load_or_new(run_dir)
    model, start, ema = _initial_model(cfg, state)
    strategy = strategy or build_strategy(cfg.strategy, min_sites=cfg.min_sites, fraction=cfg.fraction,
                                          proximal_mu=cfg.proximal_mu, params=cfg.strategy_params)
    arrays = state_to_arrays(model.state_dict())
    strategy.reference_dtypes = {k: arrays[k].numpy().dtype for k in arrays.keys()}
    strategy = private.private_strategy(strategy, cfg, run_dir)  # client-level DP: DP-FedAvg wraps the strategy
    attach_guard(strategy, cfg, run_dir)  # first of the update hooks: before any clipping or averaging
    state.data.update({"name": cfg.name, "strategy": cfg.strategy, "rounds_planned": cfg.rounds,
                       "sites": cfg.site_ids})
    if start > cfg.rounds:
        state.set_status("finished")
        return state
    wait_for_sites(grid, len(cfg.sites), cfg.min_sites, cfg.connect_timeout)
    if start == 1 and not state.checkpoint_path(0).exists():
        _save_global(cfg, state, model, arrays, 0, ema=ema)
    state.set_status("running", resumed_from=start - 1 if start > 1 else None)

    base = client_run_config(cfg, run_dir)
    node_site: dict[int, str] = {}
    for r in range(start, cfg.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        random.seed(cfg.train.seed * 100_003 + r)  # Flower samples nodes with `random`
        rf = state.restart_from
        repair = rf["request"] if rf and int(rf["after_round"]) < r <= int(rf.get("until_round", r)) else None
        config = {**base, private.ERASURE_ROUND: repair} if repair else dict(base)  # a repair round spends the
        msgs = list(strategy.configure_train(r, arrays, ConfigRecord(config), grid))  # sites' erasure reserve
        for m in msgs:
            m.metadata.group_id = str(r)
        replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout)) if msgs else []
        ok = [m for m in replies if not m.has_error()]
        failures = [{"site": _site_of(m, node_site), "reason": str(m.error.reason)[:1000]}
                    for m in replies if m.has_error()]
        answered = {m.metadata.src_node_id for m in replies}
        failures += [{"site": node_site.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}"),
                      "reason": f"no reply within {cfg.round_timeout:.0f} s"}
                     for m in msgs if m.metadata.dst_node_id not in answered]
        if not ok and failures and all("BudgetExceededError" in f["reason"] for f in failures):
            state.set_status("budget-exhausted", stop_reason=failures[0]["reason"])  # privseg.privacy: stop here
            return state
        site_train = {_site_of(m, node_site): _metrics(m) for m in ok}
        entry: dict[str, Any] = {"round": r, "participants": sorted(site_train), "failed": failures,
                                 "train": site_train, "applied": False}
        if repair:
            entry["erasure"] = repair  # a repair round of that erasure request
        # client-level DP samples sites by Poisson: any number (none included) is a round to release
        if len(ok) >= cfg.min_sites or private.releases_every_round(strategy):
            if cfg.keep_updates:
                entry["updates"] = {_site_of(m, node_site): _save_update(state, r, _site_of(m, node_site), m)
                                    for m in ok}
            new_arrays, agg = strategy.aggregate_train(r, ok)
            if getattr(strategy, "guard", None) is not None and strategy.guard.rejected_in(r):
                entry["rejected"] = strategy.guard.rejected_in(r)  # left out of the average (poisoning guard)
            if new_arrays is not None:
                arrays = new_arrays
                entry["applied"] = True
                entry["train_aggregate"] = dict(agg.items()) if agg is not None else {}
        else:
            entry["note"] = f"{len(ok)} site(s) returned an update, fewer than min-sites={cfg.min_sites}: " \
                            "global model unchanged"
        entry["train_s"] = time.perf_counter() - t0
        if cfg.eval_every and (r % cfg.eval_every == 0 or r == cfg.rounds):
            entry["eval"] = _evaluate_round(strategy, grid, r, arrays, base, cfg, node_site)
        entry["wall_s"] = time.perf_counter() - t0
        entry["cpu_s"] = time.process_time() - c0  # this process only: the in-process grid's sites, not Ray's
        entry = private.public_round_entry(cfg, run_dir, entry)  # client-level DP: participation stays here
        ckpt = _save_global(cfg, state, model, arrays, r, entry, ema)
        state.record_round(entry, ckpt)
        if on_round is not None:
            on_round(entry)
    state.set_status("finished")
    return state


def _evaluate_round(strategy, grid: Grid, r: int, arrays: ArrayRecord, base: dict, cfg: FLConfig,
                    node_site: dict[int, str]) -> dict:
    t0 = time.perf_counter()
    msgs = list(strategy.configure_evaluate(r, arrays, ConfigRecord(dict(base)), grid))
    for m in msgs:
        m.metadata.group_id = str(r)
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
    sites = {_site_of(m, node_site): _metrics(m) for m in replies if not m.has_error()}
    failed = [{"site": _site_of(m, node_site), "reason": str(m.error.reason)[:1000]} for m in replies if m.has_error()]
    agg = strategy.aggregate_evaluate(r, replies)
    scored = [m for m in sites.values() if m.get("num-examples", 0) > 0]
    overall = dict(agg.items()) if agg is not None else {}
    if scored:  # unweighted mean over sites, as the benchmark reports it
        overall["site-mean-dice"] = float(np.mean([m["mean-dice"] for m in scored]))
    return {"sites": sites, "overall": overall, "failed": failed, "split": cfg.eval_split,
            "eval_s": time.perf_counter() - t0}


def make_server_app(run_dir: str | Path | None = None, on_round: RoundCallback | None = None,
                    rounds: int | None = None, strategy=None) -> ServerApp:
    """A ServerApp for the run in ``run_dir`` (``flwr run``: the ``run-dir`` run config value)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rd = run_dir or context.run_config.get("run-dir")
        if not rd:
            raise ConfigError("no run-dir: set it in the app's [tool.flwr.app.config] or --run-config")
        n = rounds if rounds is not None else (int(context.run_config["rounds"])
                                               if int(context.run_config.get("rounds", 0) or 0) > 0 else None)
        run_server(grid, str(rd), on_round=on_round, rounds=n, strategy=strategy)

    return app


# For ``flwr run`` (the component named in the app's pyproject.toml).
app = make_server_app()
