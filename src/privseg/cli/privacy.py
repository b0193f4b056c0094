"""`privseg privacy status|budget|train`: budgets and central DP training (`privseg fl run --dp`
takes the same DP options, from cli/ui.py)."""

import json
from pathlib import Path

import typer

from privseg.cli import ui
from privseg.cli.ui import CLASSES, COHORT, DP, JSON, QUIET, RUNS, SPLITS, STEPS, TRAINING, out, take, with_options
from privseg.cohorts import open_cohort, train_config
from privseg.data.intensity import check_window
from privseg.errors import ConfigError
from privseg.privacy import train_private
from privseg.privacy.budget import LEDGER_FILE, budget_status, change_budget
from privseg.privacy.plan import plan_for
from privseg.privacy.spec import dp_from_options
from privseg.report.text import print_budget, print_budget_change, print_dp_training
from privseg.runs import run_folder

app = typer.Typer(no_args_is_help=True, help="Differential privacy: budgets per site, DP training.")


def RUN(run: str = typer.Argument(..., help=f"Run name, run folder, or {LEDGER_FILE} file.")): ...


@app.command()
@with_options(RUN, RUNS, JSON)
def status(run: str, **o) -> None:
    """Spent and remaining privacy budget per site."""
    path = run_folder(run, o["runs_dir"])
    rows = budget_status(path)
    out.print_json(json.dumps(rows)) if o["json_out"] else print_budget(out, ui.console, rows, path)


@app.command()
@with_options(RUN, ..., RUNS)
def budget(
    run: str, site: str = typer.Option(..., help="The site whose budget changes."),
    epsilon: float = typer.Option(..., help="Its new total epsilon budget (delta unchanged)."), **o,
) -> None:
    """Change one site's epsilon budget (e.g. so it can pay for an erasure): a decision recorded in
    its ledger. The noise plan stays as it was; only how far the ledger lets the site go changes."""
    print_budget_change(out, site, epsilon, change_budget(run_folder(run, o["runs_dir"]), site, epsilon))


@app.command()
@with_options(COHORT, ..., STEPS, TRAINING, DP, SPLITS, CLASSES, QUIET, norm=typer.Option(
              "group", help="group or instance (not batch)."), subjects_per_step=typer.Option(
              2, min=1, help="Expected subjects per step (Poisson rate q = this/n, under --plan none)."))
def train(out_dir: Path = typer.Option(Path("runs/train-dp"), "--out", help=f"Run folder (last.pt, {LEDGER_FILE})."),
          **o) -> None:
    """Central patient-level DP-SGD training (all training subjects in one place)."""
    dp = dp_from_options(**take(o, DP))
    if dp.unit != "patient":
        raise ConfigError("--dp site needs a federation: use `privseg fl run --dp site`")
    c = open_cohort(o["cohort"], o["splits"], o["classes"])
    ui.warn(check_window(c, private=True, how='"ct_window": [LO, HI] in the cohort manifest\'s info or dataset.json'))
    cfg = train_config(c, record_ct_window=False, **take(o, STEPS), **take(o, TRAINING))
    if dp.plan == "auto" and not o["quiet"]:
        out.print(plan_for(dp, "central", cfg.steps, base_lr=cfg.lr).describe(), highlight=False)
    with ui.progress("DP training", cfg.steps, o["quiet"]) as update:
        r = train_private(c, cfg, dp, out_dir, on_step=lambda s, n, loss: update(s, f"loss {loss:.3f}"))
    if not o["quiet"]:
        print_dp_training(out, r)
