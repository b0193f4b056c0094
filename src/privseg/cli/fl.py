"""`privseg fl run|deploy|status`: federated training with Flower."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from privseg.cli import privacy as P
from privseg.cli.cohorts import SPLITS
from privseg.cli.ui import console, out, progress, table
from privseg.federated.strategies import FL_STRATEGIES

app = typer.Typer(no_args_is_help=True, help="Federated training across hospitals (Flower).")

_COHORT = typer.Option(None, help="Multi-site cohort (folder or manifest): every site of it is a site.")
_SITE = typer.Option(None, "--site", help="ID=FOLDER of one site's data, any supported format (repeatable).")
_SITES_ROOT = typer.Option(None, help="Folder with one sub-folder per site (the folder name is the site ID).")
_ONLY = typer.Option(None, "--only-site", help="With --cohort: use only these sites (repeatable).")


def _config(opts: dict, round_timeout: float):
    """The run config of `fl run` / `fl deploy` from their options (one library call each)."""
    from privseg.federated.assemble import build_fl_config, federation_sites
    from privseg.privacy import DPConfig

    dp = None if opts["dp"] == "none" else DPConfig.from_options(
        unit=opts["dp"], epsilon=opts["epsilon"], delta=opts["delta"], clip=opts["clip"], clip_norm=opts["clip_norm"],
        target_quantile=opts["target_quantile"], noise_schedule=opts["noise_schedule"],
        site_budget=opts["site_budget"], config_file=opts["dp_config"], allow_large_delta=opts["allow_large_delta"],
        method=opts["dp_method"])
    sites = federation_sites(opts["cohort"], opts["site"], opts["sites_root"], opts["only_site"], opts["splits"])
    keys = ("name", "rounds", "strategy", "local_steps", "model", "norm", "patch", "subjects_per_step",
            "patches_per_subject", "lr", "seed", "mu", "min_sites", "fraction", "eval_every", "keep_updates", "device")
    return build_fl_config(sites=sites, round_timeout=round_timeout, dp=dp, **{k: opts[k] for k in keys})


def _round_info(e: dict) -> str:
    ev = (e.get("eval") or {}).get("overall") or {}
    parts = [f"{len(e.get('participants', []))} sites"]
    if e.get("failed"):
        parts.append(f"[red]{len(e['failed'])} failed[/red]")
    loss = (e.get("train_aggregate") or {}).get("train-loss")
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if "site-mean-dice" in ev:
        parts.append(f"Dice {ev['site-mean-dice']:.3f}")
    if not e.get("applied"):
        parts.append("[yellow]not applied[/yellow]")
    return "  ".join(parts)


def _run_common(mode: str, cfg, runs_dir: Path, quiet: bool, **kw) -> None:
    from privseg.federated import RunState

    run_dir = runs_dir / cfg.name
    done = RunState.load_or_new(run_dir).rounds_done if (run_dir / "state.json").exists() else 0
    if not quiet:
        console.print(f"[bold]{mode}[/bold] run {cfg.name}: {cfg.strategy}, {len(cfg.sites)} sites "
                      f"({', '.join(cfg.site_ids)}), {cfg.rounds} rounds x {cfg.local_steps} local steps"
                      + (f", resuming after round {done}" if 0 < done < cfg.rounds else ""))
    with progress(f"fl {mode}", cfg.rounds, quiet) as update:
        update(min(done, cfg.rounds))

        def on_round(e: dict) -> None:
            update(int(e["round"]), _round_info(e))

        if mode == "simulation":
            from privseg.federated.simulation import simulate

            state = simulate(cfg, run_dir, on_round=on_round, **kw)
        elif mode == "in-process":
            from privseg.federated.simulation import simulate_inprocess

            state = simulate_inprocess(cfg, run_dir, on_round=on_round)
        else:
            from privseg.federated.deploy import deploy

            state = deploy(cfg, run_dir, on_round=on_round, **kw)
    if not quiet:
        _print_status(state)
    _check_outcome(state, done)


def _reason(text: str) -> str:
    """Flower's error reply text ``<class 'privseg.errors.DataError'>:<'path: problem'>`` as
    ``DataError: path: problem``."""
    import re

    m = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", text.strip(), re.S)
    return f"{m.group(1)}: {m.group(2)}" if m else text.strip()


def _check_outcome(state, done_before: int) -> None:
    """Fail loudly when this invocation ran rounds but applied none (every site failed, e.g. on
    unreadable data): exit 2 with the first site error, instead of a "finished" run that learnt
    nothing. Sites that failed in every round while others trained are named in a warning."""
    from privseg.errors import PrivsegError

    new = [e for e in state.rounds if int(e["round"]) > done_before]
    if not new:
        return
    failed = [f for e in new for f in e.get("failed", [])]
    if not any(e.get("applied") for e in new):
        first = f"{failed[0]['site']}: {_reason(failed[0]['reason'])}" if failed else "no site replied"
        raise PrivsegError(f"{state.run_dir}: none of the {len(new)} round(s) run was applied (too few site "
                           f"updates); first failure: {first}")
    always = set.intersection(*[{f["site"] for f in e.get("failed", [])} for e in new])
    for site in sorted(always):
        reason = next(f["reason"] for f in failed if f["site"] == site)
        console.print(f"[bold yellow]privseg: warning:[/bold yellow] site {site} failed in every round "
                      f"({_reason(reason)[:300]})", highlight=False)


_STRATEGY = typer.Option("fedavg", help="One of: " + ", ".join(FL_STRATEGIES) + ".")


@app.command()
def run(
    cohort: Path = _COHORT, site: list[str] = _SITE, sites_root: Path = _SITES_ROOT, only_site: list[str] = _ONLY,
    name: str = typer.Option("fl", help="Run name: the run folder is RUNS/NAME; an existing run resumes."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run folders."),
    rounds: int = typer.Option(20, min=1), strategy: str = _STRATEGY,
    local_steps: int = typer.Option(10, min=1, help="Local optimisation steps per site per round."),
    model: str = typer.Option("unet"), norm: str = typer.Option("group", help="batch, group or instance."),
    patch: int = typer.Option(32, min=8), subjects_per_step: int = typer.Option(2, min=1),
    patches_per_subject: int = typer.Option(2, min=1), lr: float = typer.Option(2e-3), seed: int = typer.Option(0),
    mu: float = typer.Option(0.01, "--mu", help="FedProx proximal weight."),
    min_sites: int = typer.Option(1, min=1, help="A round needs at least this many site updates."),
    fraction: float = typer.Option(1.0, help="Fraction of sites sampled per round."),
    eval_every: int = typer.Option(1, min=0, help="Evaluate on held-out subjects every N rounds (0: never)."),
    keep_updates: bool = typer.Option(False, help="Store every site's update per round (for erasure tracing)."),
    cpus_per_client: float = typer.Option(None, help="CPUs per simulated ClientApp (default: all; sites in turn)."),
    ray_address: str = typer.Option(None, help="Join an existing Ray cluster (e.g. auto or ray://HEAD:10001)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto, for local training."),
    dp: str = P._FL_DP, epsilon: float = P._EPS, delta: float = P._DELTA, clip: str = P._CLIP,
    clip_norm: float = P._CLIP_NORM, target_quantile: float = P._QUANTILE, noise_schedule: str = P._SCHEDULE,
    site_budget: list[str] = P._SITE_BUDGET, dp_config: Path = P._RUN_CONFIG, allow_large_delta: bool = P._LARGE_DELTA,
    dp_method: str = P._METHOD, splits: Path = SPLITS,
    in_process: bool = typer.Option(False, help="Run the sites in this process, without Ray (debugging, small runs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Federated training in simulation (Flower on Ray); resumes RUNS/NAME after a crash.
    With --dp patient|site, every round is accounted per site and stops before a budget is crossed."""
    cfg = _config(locals(), round_timeout=3600.0)
    if in_process:
        _run_common("in-process", cfg, runs_dir, quiet)
    else:
        _run_common("simulation", cfg, runs_dir, quiet, cpus_per_client=cpus_per_client, ray_address=ray_address)
    if dp != "none" and not quiet:
        P.status(str(runs_dir / cfg.name), runs_dir, False)


@app.command()
def deploy(
    cohort: Path = _COHORT, site: list[str] = _SITE, sites_root: Path = _SITES_ROOT, only_site: list[str] = _ONLY,
    name: str = typer.Option("fl-deploy", help="Run name: the run folder is RUNS/NAME; an existing run resumes."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run folders."),
    rounds: int = typer.Option(20, min=1), strategy: str = _STRATEGY,
    local_steps: int = typer.Option(10, min=1), model: str = typer.Option("unet"),
    norm: str = typer.Option("group"), patch: int = typer.Option(32, min=8),
    subjects_per_step: int = typer.Option(2, min=1), patches_per_subject: int = typer.Option(2, min=1),
    lr: float = typer.Option(2e-3), seed: int = typer.Option(0), mu: float = typer.Option(0.01, "--mu"),
    min_sites: int = typer.Option(1, min=1), fraction: float = typer.Option(1.0),
    eval_every: int = typer.Option(1, min=0), keep_updates: bool = typer.Option(False),
    round_timeout: float = typer.Option(600.0, help="Seconds to wait for site replies in a round."),
    superlink: str = typer.Option(None, help="Use this running SuperLink (HOST:PORT) instead of starting one."),
    root_certificates: Path = typer.Option(None, help="CA certificate of --superlink."),
    insecure: bool = typer.Option(False, help="No TLS and no SuperNode authentication (default: TLS with "
                                  "certificates generated for loopback). Prints a warning; for debugging only."),
    supernode_auth: bool = typer.Option(None, "--supernode-auth/--no-supernode-auth",
                                        help="Authenticate each SuperNode with its own key pair (default: on when "
                                        "privseg starts the SuperLink with TLS; with --superlink, register the keys "
                                        "in deploy/certs/nodes/ yourself)."),
    device: str = typer.Option("cpu"),
    dp: str = P._FL_DP, epsilon: float = P._EPS, delta: float = P._DELTA, clip: str = P._CLIP,
    clip_norm: float = P._CLIP_NORM, target_quantile: float = P._QUANTILE, noise_schedule: str = P._SCHEDULE,
    site_budget: list[str] = P._SITE_BUDGET, dp_config: Path = P._RUN_CONFIG, allow_large_delta: bool = P._LARGE_DELTA,
    dp_method: str = P._METHOD, splits: Path = SPLITS,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Start a SuperLink and one SuperNode per site on this machine, run with `flwr run`, stop them.
    With --dp patient|site, the same accounting as `fl run` (each site's ledger in its state folder)."""
    if insecure:  # printed even with --quiet: a security downgrade is never silent
        from privseg.federated.deploy import INSECURE_WARNING

        console.print(f"[bold yellow]privseg: warning:[/bold yellow] --insecure: {INSECURE_WARNING}", highlight=False)
    cfg = _config(locals(), round_timeout=round_timeout)
    _run_common("deployment", cfg, runs_dir, quiet, superlink=superlink, root_certificates=root_certificates,
                insecure=insecure, supernode_auth=supernode_auth)
    if dp != "none" and not quiet:
        P.status(str(runs_dir / cfg.name), runs_dir, False)


@app.command()
def status(
    name: str = typer.Argument("fl", help="Run name (or a run folder path)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs"),
    json_out: bool = typer.Option(False, "--json", help="Print the run state as JSON."),
) -> None:
    """Rounds, sites and metrics of a federated run."""
    from privseg.federated import RunState

    run_dir = Path(name) if Path(name).is_dir() and (Path(name) / "fl_config.json").exists() else runs_dir / name
    state = RunState.load(run_dir)
    if json_out:
        out.print_json(json.dumps(state.data, default=str))
        return
    _print_status(state)


def _print_status(state) -> None:
    d = state.data
    out.print(f"run [bold]{d.get('name', state.run_dir.name)}[/bold] ({d.get('strategy')}): "
              f"{state.rounds_done}/{d.get('rounds_planned', '?')} rounds, status {state.status}, "
              f"last checkpoint {d.get('last_checkpoint')}")
    rows = []
    for e in state.rounds:
        ev = (e.get("eval") or {}).get("overall") or {}
        loss = (e.get("train_aggregate") or {}).get("train-loss")
        rows.append([e["round"], ", ".join(e.get("participants", [])),
                     ", ".join(f["site"] for f in e.get("failed", [])) or "-",
                     "yes" if e.get("applied") else "no", loss if loss is not None else "-",
                     ev.get("site-mean-dice", "-"), e.get("wall_s", 0.0)])
    out.print(table("rounds", ["round", "site", "failed", "applied", "train loss", "mean Dice", "seconds"], rows))
    latest = state.site_metrics()
    if latest:
        srows = [[s, m["round"], m.get("num-examples", 0), *m.get("dice", []), m.get("mean-dice", 0.0),
                  m.get("mae", 0.0)] for s, m in sorted(latest.items())]
        ncls = max(len(m.get("dice", [])) for m in latest.values())
        names = _class_names(state.run_dir, ncls)
        out.print(table("latest evaluation per site (held-out subjects)",
                        ["site", "round", "subjects", *[f"Dice {n}" for n in names], "mean Dice", "MAE"], srows))


def _class_names(run_dir: Path, n_foreground: int) -> list[str]:
    """The foreground class names of a run (e.g. CSF, GM, WM), from the cohort of its first readable
    site; "c1", "c2", ... only when no site's data is readable from here (a deployment's sites)."""
    from privseg.errors import PrivsegError
    from privseg.federated.sites import read_site_cohort

    try:
        sites = json.loads((Path(run_dir) / "fl_config.json").read_text()).get("sites") or []
    except (OSError, ValueError, AttributeError):
        sites = []
    for spec in sites:
        try:
            classes = read_site_cohort(spec["cohort"]).classes[1:]
        except (PrivsegError, OSError, KeyError, TypeError):
            continue
        if len(classes) == n_foreground:
            return list(classes)
    return [f"c{k + 1}" for k in range(n_foreground)]
