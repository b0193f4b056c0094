"""`privseg fl run|deploy|status|personalise`: federated training with Flower."""

import json
from pathlib import Path

import typer

from privseg.cli import ui
from privseg.cli.ui import DP, JSON, QUIET, RUNS, SPLITS, TRAINING, console, options_from, out, take, with_options
from privseg.cohorts import site_window_warnings
from privseg.federated import FLConfig, RunState
from privseg.federated.assemble import FL_DEVICE, FL_NAME, FL_PATCH, fl_config_from_options, site_plans
from privseg.federated.deploy import INSECURE_WARNING
from privseg.federated.personalise import Personalisation, personalise
from privseg.privacy.budget import budget_status
from privseg.report.text import fl_start_text, print_budget, print_fl_status, print_personalisation, round_info
from privseg.runs import check_outcome, rounds_done, run_federated, run_folder, write_round_zero

app = typer.Typer(no_args_is_help=True, help="Federated training across hospitals (Flower).")
_NAME = "Run name: the run folder is RUNS/NAME; an existing run resumes."


def SITES(
    cohort: Path = typer.Option(None, help="Multi-site cohort (folder or manifest): every site of it is a site."),
    site: list[str] = typer.Option(None, help="ID=FOLDER of one site's data, any supported format (repeatable)."),
    sites_root: Path = typer.Option(None, help="Folder with one sub-folder per site (the folder name is the site ID)."),
    only_site: list[str] = typer.Option(None, help="With --cohort: use only these sites (repeatable)."),
): ...


# one-liners (PEP 8: no blank lines between them)
def NAME(name: str = typer.Option(FL_NAME, help=_NAME)): ...
def STRATEGY_PARAM(strategy_param: list[str] = typer.Option(
        None, help="The FL strategy's own parameter KEY=VALUE (repeatable), e.g. server_learning_rate=1.5 for "
        "fedavgm.")): ...
FEDERATION = options_from(FLConfig, "rounds", "strategy", "local_steps", "mu", STRATEGY_PARAM, "min_sites", "fraction",
                          "eval_every", "keep_updates", "round_timeout", rename={"mu": "proximal_mu"})


def FL_DP(
    site_budget: list[str] = typer.Option(None, help="SITE=EPSILON[,DELTA]: a stricter budget for one site "
                                          "(repeatable)."),
    dp_config: Path = typer.Option(None, help='JSON file with DP settings, e.g. {"sites": {"H2": {"epsilon": 3}}}.'),
): ...
_FL = dict(patch=typer.Option(FL_PATCH, min=8, help="Patch side in voxels."), device=typer.Option(
    FL_DEVICE, help="cpu, cuda or auto, for local training."), dp=typer.Option(
    "none", "--dp", help="none, patient (DP-SGD in each site) or site (DP-FedAvg at the server)."))
_GROUPS = (SITES, NAME, RUNS, FEDERATION, TRAINING, ..., DP, ui.RESERVE, FL_DP, SPLITS, QUIET)


def _fl(mode: str, o: dict, **kw) -> None:
    runs_dir, quiet = o.pop("runs_dir"), o.pop("quiet")
    cfg = fl_config_from_options(privacy={**take(o, DP), **take(o, ui.RESERVE), **take(o, FL_DP)}, **o)
    run_dir = runs_dir / cfg.name
    done = rounds_done(run_dir)
    for warning in site_window_warnings(cfg.sites, private=cfg.privacy is not None):  # even with --quiet
        ui.warn(warning)
    if not quiet:
        console.print(fl_start_text(mode, cfg, done))
        for line in site_plans(cfg):
            out.print(line, highlight=False)
    write_round_zero(cfg, run_dir)
    with ui.progress(f"fl {mode}", cfg.rounds, quiet) as update:
        update(min(done, cfg.rounds))
        state = run_federated(mode, cfg, run_dir, on_round=lambda e: update(int(e["round"]), round_info(e)), **kw)
    if not quiet:
        print_fl_status(out, state)
    for warning in check_outcome(state, done):  # printed even with --quiet
        ui.warn(warning)
    if cfg.privacy is not None and not quiet:
        print_budget(out, console, budget_status(run_dir), run_dir)


@app.command()
@with_options(*_GROUPS, **_FL)
def run(
    cpus_per_client: float = typer.Option(None, help="CPUs per simulated ClientApp (default: all; sites in turn)."),
    ray_address: str = typer.Option(None, help="Join an existing Ray cluster (e.g. auto or ray://HEAD:10001)."),
    in_process: bool = typer.Option(False, help="Run the sites in this process, without Ray (debugging, small runs)."),
    **o,
) -> None:
    """Federated training in simulation (Flower on Ray); resumes RUNS/NAME after a crash.
    With --dp patient|site, every round is accounted per site and stops before a budget is crossed."""
    kw = {} if in_process else {"cpus_per_client": cpus_per_client, "ray_address": ray_address}
    _fl("in-process" if in_process else "simulation", o, **kw)


@app.command()
@with_options(*_GROUPS, **_FL, name=typer.Option("fl-deploy", help=_NAME))
def deploy(
    superlink: str = typer.Option(None, help="Use this running SuperLink (HOST:PORT) instead of starting one."),
    root_certificates: Path = typer.Option(None, help="CA certificate of --superlink."),
    insecure: bool = typer.Option(False, help="No TLS and no SuperNode authentication (default: TLS with "
                                  "certificates generated for loopback). Prints a warning; for debugging only."),
    supernode_auth: bool = typer.Option(None, help="Authenticate each SuperNode with its own key pair (default: on "
                                        "when privseg starts the SuperLink with TLS; with --superlink, register the "
                                        "keys in deploy/certs/nodes/ yourself)."),
    **o,
) -> None:
    """Start a SuperLink and one SuperNode per site on this machine, run with `flwr run`, stop them.
    With --dp patient|site, the same accounting as `fl run` (each site's ledger in its state folder)."""
    if insecure:  # printed even with --quiet: a security downgrade is never silent
        ui.warn(f"--insecure: {INSECURE_WARNING}")
    _fl("deployment", o, superlink=superlink, root_certificates=root_certificates, insecure=insecure,
        supernode_auth=supernode_auth)


@app.command()
@with_options(..., RUNS, JSON, json_out=typer.Option(False, "--json", help="Print the run state as JSON."))
def status(name: str = typer.Argument(FL_NAME, help="Run name (or a run folder path)."), **o) -> None:
    """Rounds, sites and metrics of a federated run."""
    state = RunState.load(run_folder(name, o["runs_dir"], "fl_config.json"))
    out.print_json(json.dumps(state.data, default=str)) if o["json_out"] else print_fl_status(out, state)


@app.command("personalise")
@with_options(..., RUNS, options_from(Personalisation, "method", "epochs", "ditto_lambda"))
def personalise_run(name: str = typer.Argument(..., help="Run name (or a run folder path)."), **o) -> None:
    """Personalise each site's model; each site serves the best of global, personalised, local on validation."""
    print_personalisation(out, personalise(run_folder(name, o["runs_dir"], "fl_config.json"), o["method"], o["epochs"],
                                          ditto_lambda=o["ditto_lambda"]))
