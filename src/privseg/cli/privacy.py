"""`privseg privacy status|train`: budgets and central DP training; `privseg fl run --dp` uses the
same options (defined here) for federated DP training."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from privseg.cli.cohorts import CLASSES, SPLITS
from privseg.cli.ui import console, out, progress, table

app = typer.Typer(no_args_is_help=True, help="Differential privacy: budgets per site, DP training.")

_DP = typer.Option("patient", "--dp", help="DP unit: patient (DP-SGD in each site) or site (DP-FedAvg at the server).")
_FL_DP = typer.Option("none", "--dp", help="none, patient (DP-SGD in each site) or site (DP-FedAvg at the server).")
_EPS = typer.Option(8.0, "--epsilon", help="Privacy budget epsilon (per site).")
_DELTA = typer.Option(1e-5, "--delta", help="delta; must be below 1/(patients at the site).")
_CLIP = typer.Option("adaptive", "--clip", help="fixed or adaptive (private quantile, Andrew et al. 2021).")
_CLIP_NORM = typer.Option(1.0, "--clip-norm", help="Clip norm (adaptive: its starting value).")
_QUANTILE = typer.Option(0.5, "--target-quantile", help="Adaptive clip: target quantile of the norms.")
_SCHEDULE = typer.Option("constant", "--noise-schedule", help="constant or decay (calibrated to the budget).")
_SITE_BUDGET = typer.Option(None, "--site-budget",
                            help="SITE=EPSILON[,DELTA]: a stricter budget for one site (repeatable).")
_RUN_CONFIG = typer.Option(None, "--dp-config",
                           help='JSON file with DP settings, e.g. {"sites": {"H2": {"epsilon": 3}}}.')
_LARGE_DELTA = typer.Option(False, "--allow-large-delta", help="Allow delta >= 1/n (not recommended).")
_METHOD = typer.Option("loop", "--dp-method", help="Per-subject gradients: loop, vmap or opacus.")


@app.command()
def status(
    run: str = typer.Argument(..., help="Run name, run folder, or privacy.sqlite file."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run folders."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Spent and remaining privacy budget per site."""
    from privseg.privacy import BudgetLedger, find_ledgers

    path = Path(run) if Path(run).exists() else runs_dir / run
    rows = []
    for ledger_path in find_ledgers(path):
        for r in BudgetLedger(ledger_path).status():
            rows.append({**r, "ledger": str(ledger_path)})
    if json_out:
        out.print_json(json.dumps(rows))
        return
    out.print(table(f"privacy budget ({path})", ["site", "epsilon spent", "epsilon budget", "remaining", "delta",
                                                 "rounds", "clip", "guarantee"],
                    [[r["site"], r["epsilon_spent"], r["epsilon_budget"], r["epsilon_remaining"], f"{r['delta']:g}",
                      r["rounds"], r["clip"] if r["clip"] is not None else "-",
                      "private" if r["private"] else r["guarantee"]] for r in rows]))
    for r in rows:
        if not r["private"]:
            console.print(f"[yellow]warning:[/yellow] site {r['site']}: {r['guarantee']} -- its epsilon is "
                          "bookkeeping, not a privacy guarantee")


@app.command()
def budget(
    run: str = typer.Argument(..., help="Run name, run folder, or privacy.sqlite file."),
    site: str = typer.Option(..., "--site", help="The site whose budget changes."),
    epsilon: float = typer.Option(..., "--epsilon", help="Its new total epsilon budget (delta unchanged)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run folders."),
) -> None:
    """Change one site's epsilon budget (e.g. so it can pay for an erasure): a decision recorded in
    its ledger. The noise plan stays as it was; only how far the ledger lets the site go changes."""
    from privseg.errors import ConfigError
    from privseg.privacy import BudgetLedger, find_ledgers
    from privseg.privacy.accountant import check_epsilon

    path = Path(run) if Path(run).exists() else runs_dir / run
    check_epsilon(epsilon)
    for ledger_path in find_ledgers(path):
        ledger = BudgetLedger(ledger_path)
        if site in ledger.sites():
            old, delta = ledger.budget(site)
            spent = ledger.spent(site)
            if epsilon < spent:
                raise ConfigError(f"site {site} has already spent epsilon {spent:.4g}: a budget of {epsilon:g} "
                                  "would be exceeded at once")
            ledger.set_budget(site, epsilon, delta)
            out.print(f"site {site}: epsilon budget {old:g} -> {epsilon:g} (spent {spent:.4g}, delta {delta:g}) "
                      f"in {ledger_path}")
            return
    raise ConfigError(f"no ledger under {path} has site {site!r}")


@app.command()
def train(
    cohort: Path = typer.Option(..., help="Cohort folder or manifest."),
    out_dir: Path = typer.Option(Path("runs/train-dp"), "--out", help="Run folder (last.pt, privacy.sqlite)."),
    model: str = typer.Option("unet"), norm: str = typer.Option("group", help="group or instance (not batch)."),
    steps: int = typer.Option(300, min=1), patch: int = typer.Option(64, min=8),
    subjects_per_step: int = typer.Option(2, min=1, help="Expected subjects per step (Poisson rate q = this/n)."),
    patches_per_subject: int = typer.Option(2, min=1), lr: float = typer.Option(2e-3), seed: int = typer.Option(0),
    device: str = typer.Option("auto"), dp: str = _DP, epsilon: float = _EPS, delta: float = _DELTA,
    clip: str = _CLIP, clip_norm: float = _CLIP_NORM, target_quantile: float = _QUANTILE,
    noise_schedule: str = _SCHEDULE, allow_large_delta: bool = _LARGE_DELTA, dp_method: str = _METHOD,
    splits: Path = SPLITS, classes: str = CLASSES, quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Central patient-level DP-SGD training (all training subjects in one place)."""
    from privseg.cli.cohorts import open_cohort
    from privseg.errors import ConfigError
    from privseg.privacy import DPConfig, train_private
    from privseg.train import TrainConfig

    cfg_dp = DPConfig.from_options(unit=dp, epsilon=epsilon, delta=delta, clip=clip, clip_norm=clip_norm,
                                   target_quantile=target_quantile, noise_schedule=noise_schedule,
                                   allow_large_delta=allow_large_delta, method=dp_method)
    if cfg_dp.unit != "patient":
        raise ConfigError("--dp site needs a federation: use `privseg fl run --dp site`")
    c = open_cohort(cohort, splits, classes)
    cfg = TrainConfig.for_cohort(c, model=model, norm=norm, steps=steps, patch_size=(patch,) * c.spatial_dims,
                                 subjects_per_step=subjects_per_step, patches_per_subject=patches_per_subject,
                                 lr=lr, seed=seed, device=device, extra={"dp": cfg_dp.to_dict()})
    with progress("DP training", steps, quiet) as update:
        result = train_private(c, cfg, cfg_dp, out_dir, on_step=lambda s, n, loss: update(s, f"loss {loss:.3f}"))
    if not quiet:
        out.print(f"checkpoint: {result['checkpoint']}  epsilon={result['epsilon']:.3f} at delta={result['delta']:g} "
                  f"(budget {result['budget']:g}; noise multiplier {result['noise_multiplier']:.3f}, "
                  f"q={result['q']:.3g}, "
                  f"final clip {result['clip']:.4g})")
