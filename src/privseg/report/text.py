"""Reports for a terminal: progress, tables, and the summaries the commands print (federated run
status, privacy budgets, erasure verification and requests, Dice, unlearning, membership audits,
runs, cohorts). Each ``print_*`` writes one result to a rich Console, so the CLI, the benchmarks
and the demo print a result the same way."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from privseg.audit.certificate import membership_statements
from privseg.errors import PrivsegError
from privseg.federated.personalise import GLOBAL, read_personalisation
from privseg.federated.sites import read_site_cohort
from privseg.unlearn import report_rows
from privseg.unlearn.engine import mia_warnings

# Redirected output gets a plain line at every tenth of the work, and at least this often.
PLAIN_EVERY_S = 30.0
TEXT_COLUMNS = ("subject", "site", "split", "class", "strategy", "metric")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in TEXT_COLUMNS else "right")
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    return t


def _plain(console: Console, description: str, total: int) -> tuple[Callable[..., None], Callable[[], None]]:
    """Log lines for a non-terminal stderr (a file, a pipe, CI): a live bar would be written
    there as one frame at the end, or as control codes."""
    state = {"description": description, "total": total, "t0": time.monotonic(), "last_t": None,
             "last_tenth": -1, "line": None}

    def emit(completed: int, info: str) -> None:
        total_ = max(int(state["total"]), 1)
        line = f"{state['description']}: {completed}/{state['total']}" + (f"  {info}" if info else "") \
            + f"  ({time.monotonic() - state['t0']:.0f} s)"
        console.print(line, highlight=False, markup=True, soft_wrap=True)
        state["last_t"], state["last_tenth"], state["line"] = time.monotonic(), 10 * completed // total_, None

    def update(completed: int, info: str = "", *, total: int | None = None, description: str | None = None) -> None:
        if total is not None or description is not None:  # a new phase starts its own count
            close()  # after the last state of the phase before
            state["total"] = state["total"] if total is None else total
            state["description"] = description or state["description"]
            state["t0"], state["last_t"], state["last_tenth"] = time.monotonic(), None, -1
        total_ = max(int(state["total"]), 1)
        due = (state["last_t"] is None or 10 * completed // total_ > state["last_tenth"]
               or completed >= state["total"] or time.monotonic() - state["last_t"] >= PLAIN_EVERY_S)
        if due:
            emit(completed, info)
        else:
            state["line"] = (completed, info)

    def close() -> None:
        pending = state["line"]
        if pending is not None:  # the last state reached is always reported
            emit(*pending)

    return update, close


@contextmanager
def progress(description: str, total: int, quiet: bool = False,
             console: Console | None = None) -> Iterator[Callable[..., None]]:
    """Yield ``update(completed, info="", *, total=None, description=None)``; silent with ``quiet``.

    Nothing is shown before the first update, so a command that fails while reading its data
    prints only the error (not a bar stuck at 0). ``total``/``description`` start a new phase
    (e.g. evaluating after training). On a terminal this is a Rich bar; otherwise plain lines
    (on stderr unless ``console`` says where)."""
    if quiet:
        yield lambda *a, **k: None
        return
    console = console or Console(stderr=True)
    if not console.is_terminal:
        update, close = _plain(console, description, total)
        try:
            yield update
        finally:
            close()
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False)
    task = None

    def rich_update(completed: int, info: str = "", *, total: int | None = None,
                    description: str | None = None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description or desc0, total=total if total is not None else total0, info="")
        elif total is not None or description is not None:
            bar.stop_task(task)  # the finished phase stays on screen; the new one gets its own line
            task = bar.add_task(description or bar.tasks[-1].description, info="",
                                total=total if total is not None else bar.tasks[-1].total)
        bar.update(task, completed=completed, info=info)

    desc0, total0 = description, total
    try:
        yield rich_update
    finally:
        if task is not None:
            bar.stop()


@contextmanager
def phased_progress(description: str, quiet: bool = False,
                    console: Console | None = None) -> Iterator[Callable[..., None]]:
    """Yield ``on_progress(phase, done, total, info="")`` (``privseg.audit.mia.OnProgress``, with
    an optional note such as the loss) for work done in phases (loading, scoring the model, each
    reference model): :func:`progress` with a new phase (its own bar, or its own plain lines)
    whenever the phase changes."""
    with progress(description, 0, quiet, console) as update:
        current: list[str] = []

        def on_progress(phase: str, done: int, total: int, info: str = "") -> None:
            if current != [phase]:
                current[:] = [phase]
                update(done, info, total=total, description=phase)
            else:
                update(done, info)

        yield on_progress


def date_text(ts) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OSError):
        return "-"


def _cell(v):
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else v


# -- federated runs ------------------------------------------------------------------------------
def round_info(e: dict) -> str:
    """One round of a federated run in a line: sites, failures, loss, Dice, applied or not."""
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


def fl_start_text(mode: str, cfg, done: int) -> str:
    """The line a federated run starts with: its mode, strategy, sites and rounds (and where it resumes)."""
    return (f"[bold]{mode}[/bold] run {cfg.name}: {cfg.strategy}, {len(cfg.sites)} sites ({', '.join(cfg.site_ids)}), "
            f"{cfg.rounds} rounds x {cfg.local_steps} local steps"
            + (f", resuming after round {done}" if 0 < done < cfg.rounds else ""))


def rounds_text(rounds: Sequence[dict], rounds_done: int, planned: int | None) -> str:
    """A federated run's rounds in words: its training rounds against the plan, then the rounds
    that erasures added (repair or retraining rounds, tagged ``erasure``: not part of the plan)."""
    erasure = sum(1 for e in rounds if e.get("erasure"))
    training = int(rounds_done) - erasure
    text = (f"{training} of {planned} training rounds" if planned is not None and training <= int(planned)
            else f"{training} training rounds" + (f" ({planned} planned)" if planned is not None else ""))
    return text + (f" + {erasure} erasure round{'s' if erasure != 1 else ''}" if erasure else "")


def print_fl_status(out: Console, state) -> None:
    """A federated run's rounds and each site's latest held-out evaluation."""
    d = state.data
    out.print(f"run [bold]{d.get('name', state.run_dir.name)}[/bold] ({d.get('strategy')}): "
              f"{rounds_text(state.rounds, state.rounds_done, d.get('rounds_planned'))}, status {state.status}, "
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
        names = class_names(state.run_dir, max(len(m.get("dice", [])) for m in latest.values()))
        out.print(table("latest evaluation per site (held-out subjects)",
                        ["site", "round", "subjects", *[f"Dice {n}" for n in names], "mean Dice", "MAE"], srows))
    print_personalisation(out, read_personalisation(state.run_dir))


def print_personalisation(out: Console, res: dict | None) -> None:
    """Per site: test Dice of the global, personalised and local-only models and the one the site
    serves (chosen on validation patients; privseg.federated.personalise)."""
    if not res:
        return
    names = [GLOBAL, *res["methods"]]
    rows = [[s, *("-" if r["test_dice"].get(n) is None else r["test_dice"][n] for n in names), r["serves"],
             r["val_dice"][r["serves"]]]
            for s, r in res["sites"].items()]
    out.print(table(f"model served per site (chosen on validation, test Dice; global round {res['global_round']})",
                    ["site", *[f"{n} Dice" for n in names], "serves", "its validation Dice"], rows))


def class_names(run_dir: Path, n_foreground: int) -> list[str]:
    """The foreground class names of a federated run (e.g. CSF, GM, WM), from the cohort of its
    first readable site; "c1", "c2", ... only when no site's data is readable from here (a
    deployment's sites)."""
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


def print_budget(out: Console, err: Console, rows: list[dict], path: Path) -> None:
    """Spent and remaining epsilon per site (rows of ``BudgetLedger.status``); a site whose epsilon
    is bookkeeping rather than a guarantee is warned about on ``err``."""
    out.print(table(f"privacy budget ({path})", ["site", "epsilon spent", "epsilon budget", "remaining", "delta",
                                                 "rounds", "clip", "guarantee"],
                    [[r["site"], r["epsilon_spent"], r["epsilon_budget"], r["epsilon_remaining"], f"{r['delta']:g}",
                      r["rounds"], r["clip"] if r["clip"] is not None else "-",
                      "private" if r["private"] else r["guarantee"]] for r in rows]))
    for r in rows:
        if r.get("reserve_steps"):
            fits = r["epsilon_with_reserve"] <= r["epsilon_budget"] * (1 + 1e-6)
            out.print(f"site {r['site']}: erasure reserve of {r['reserve_steps']} DP step(s) kept out of training; "
                      f"spent now they would bring epsilon to {r['epsilon_with_reserve']:.4g} of "
                      f"{r['epsilon_budget']:g}"
                      + ("" if fits else " (no longer fits: an erasure needs a budget raise)"), highlight=False)
        if not r["private"]:
            err.print(f"[yellow]warning:[/yellow] site {r['site']}: {r['guarantee']} -- its epsilon is "
                      "bookkeeping, not a privacy guarantee")


# -- erasure -------------------------------------------------------------------------------------
def print_users(out: Console, runs: Path, users) -> None:
    """The console's accounts (``Accounts.users``): name, role and site."""
    rows = [[u.name, u.role, u.site or "all"] for u in users]
    out.print(table(f"console users ({runs})", ["name", "role", "site"], rows))


def print_budget_change(out: Console, site: str, epsilon: float, c: dict) -> None:
    """A site's budget changed (``change_budget``): old and new epsilon, spent, delta and the ledger."""
    out.print(f"site {site}: epsilon budget {c['old']:g} -> {epsilon:g} (spent {c['spent']:.4g}, delta "
              f"{c['delta']:g}) in {c['ledger']}")


def print_verification(out: Console, ver: dict) -> None:
    """An erasure's verification: the models compared, each check against its bound, and the
    calibrated membership statements."""
    if not ver:
        return
    rows = [[name, ver[name]["mia_auc"], ver[name].get("retain_dice", "withheld (DP)"), ver[name]["test_dice"]]
            for name in ("before", "after", "retrain") if name in ver]
    out.print(table("verification", ["model", "MIA AUC (erased vs unseen)", "retain Dice", "test Dice"], rows))
    for k, c in ver["checks"].items():
        bound = f"<= {c['max']}" if "max" in c else f">= {c['min']} (vs {c['vs']})"
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        label = {None: "NO POWER" if c.get("result") == "no power" else "not used"}.get(
            c["ok"], "PASS" if c["ok"] else "FAIL")
        out.print(f"  {k}: {value} {bound}  {label}" + (f"  ({c['note']})" if c.get("note") else ""))
    m = membership_statements(ver)
    if not m["available"]:
        out.print(f"  calibrated membership test: not run ({m['reason']})")
    for r in m["statements"]:
        out.print(f"  {r['verdict']}: {r['text']}")


def print_erasure_requests(out: Console, run_dir: Path, requests: list[dict]) -> None:
    """The erasure requests of a run, then a line for each one not finished (running now, or stopped)."""
    rows = [[r["request"], r.get("kind"), r.get("site"), ",".join(r.get("subjects") or []) or "-", r["status"],
             {True: "pass", False: "FAIL"}.get(r.get("passed"), "-"), r.get("requested_at", "")] for r in requests]
    out.print(table(f"erasure requests of {run_dir.name}", ["request", "kind", "site", "subjects", "status",
                                                            "verification", "requested"], rows))
    for r in (r for r in requests if r["status"] in ("requested", "failed") or r["status"].endswith(" started")):
        out.print(f"{r['request']}: {r['status']} at {r['at']} UTC, not finished (running now, or stopped): the same "
                  "command again continues it", highlight=False)


def print_erasure(out: Console, res, run_dir: Path) -> None:
    """An erasure request's outcome (``privseg erase``): its verification, status, model and certificate."""
    print_verification(out, res.verification)
    out.print(f"request {res.request_id}: {res.status}" + (f"; model {res.model}" if res.model else "")
              + f"\ncertificate: privseg erase certificate {res.request_id} --run {run_dir}")


def print_ledger_checks(out: Console, checks: list[dict]) -> None:
    """Each erasure ledger's hash-chain check (as ``verify_ledgers`` gives them)."""
    for c in checks:
        out.print(f"{c['path']}: intact ({c['entries']} entries, head {c['head'][:16]}...)" if c["ok"]
                  else f"{c['path']}: BROKEN\n  " + "\n  ".join(c["problems"]))


def print_export(out: Console, manifest: dict, out_dir: Path) -> None:
    """An export written (``export_model``'s manifest): its format, files and model card."""
    card = next(f for f in manifest["privseg"]["files"] if Path(f).name == "README.md")  # where its format puts it
    out.print(f"exported {manifest['privseg']['format']} to {out_dir} ({len(manifest['privseg']['files'])} files; "
              f"model card {out_dir / card})")


def print_export_check(out: Console, r: dict) -> None:
    """An export's check (``verify_export``): what was checked, each problem, and the verdict."""
    for line in r["checked"]:
        out.print(f"checked: {line}")
    for p in r["problems"]:
        out.print(f"[red]FAIL[/red] {p}")
    out.print("statement holds" if r["ok"] else "[red]the export's statement does not hold[/red]")


# -- models: evaluation, unlearning, membership --------------------------------------------------
def print_dice(out: Console, result: dict) -> None:
    """Per-subject, per-site and overall Dice/MAE of an evaluation result."""
    classes = result["classes"][1:]
    rows = [[r["id"], r["site"], *r["dice"], r["mean_dice"], r["mae"]] for r in result["subjects"]]
    summary = result["summary"]
    for site, s in summary["sites"].items():
        rows.append([f"[bold]{site} mean", site, *s["dice"], s["mean_dice"], s["mae"]])
    o = summary["overall"]
    rows.append(["[bold]all", "", *o.get("dice", []), o["mean_dice"], o["mae"]])
    out.print(table(f"Dice on {result['split']} subjects", ["subject", "site", *classes, "mean Dice", "MAE"], rows))


def print_unlearning(out: Console, result, strategy: str, target: str) -> None:
    """An unlearning report: one column per model, one row per metric (fits a terminal, and the CI
    sits under its AUC), the small-sample warnings, distances to the retrain and the files."""
    r = result.report
    cols, rows = report_rows(r)
    out.print(table(f"{strategy}{' + fix_decoder' if r['fix_decoder'] else ''}, target {target}: "
                    f"{r['steps_run']} steps, {r['seconds']:.1f} s", ["metric", *[row[0] for row in rows]],
                    [[c, *[row[i] for row in rows]] for i, c in enumerate(cols) if i]))
    for warning in mia_warnings(r):
        out.print(f"[bold yellow]* membership AUC:[/bold yellow] {warning}", highlight=False)
    if "forget_dice_distance_to_retrain" in r:
        out.print(f"|forget Dice - retrain's| = {r['forget_dice_distance_to_retrain']:.4f}   "
                  f"retain Dice / retrain's = {r['retain_dice_ratio']:.3f}")
    if "time_ratio" in r:
        out.print(f"time / retrain = {r['time_ratio']:.3f}  (speed-up {r['speedup']:.1f}x)")
    out.print(f"checkpoint: {result.checkpoint}\nreport: {result.report_path}")


def print_training(out: Console, r: dict) -> None:
    """A finished training run (``Trainer.fit``): its checkpoint, time, and where it resumed."""
    resumed = f", resumed from step {r['resumed_from']}" if r["resumed_from"] else ""  # 0: a fresh run
    out.print(f"checkpoint: {r['checkpoint']}  ({r['seconds']:.0f} s{resumed})")


def print_dp_training(out: Console, r: dict) -> None:
    """A finished central DP training run (``train_private``): its checkpoint and what it spent."""
    out.print(f"checkpoint: {r['checkpoint']}  epsilon={r['epsilon']:.3f} at delta={r['delta']:g} (budget "
              f"{r['budget']:g}; noise multiplier {r['noise_multiplier']:.3f}, q={r['q']:.3g}, final clip "
              f"{r['clip']:.4g})")


def print_references(out: Console, refs) -> None:
    """A run's reference models (``ensure_references``): how many, where, trained now or reused."""
    out.print(f"{len(refs.references)} reference models in {refs.folder} ({len(refs.trained)} trained, "
              f"{len(refs.reused)} reused)")


def print_central_erasure(out: Console, res) -> None:
    """A central erasure (``privseg unlearn``): the unlearning report, the checks as the certificate
    states them (NO POWER too), the ledger and the certificate."""
    print_unlearning(out, res.result, res.result.report["strategy"], res.result.report["target"])
    print_verification(out, res.verification)
    out.print(f"ledger: {res.ledger} (request {res.request_id})"
              + (f"\ncertificate: {res.certificate[1]}" if res.certificate else ""))


def print_mia(out: Console, res: dict) -> None:
    """A membership-inference audit: per-subject scores, the AUC with its interval, any warning."""
    rows = [[r["id"], "member", r["loss"], r["dice"], r["score"]] for r in res["members"]]
    rows += [[r["id"], "non-member", r["loss"], r["dice"], r["score"]] for r in res["nonmembers"]]
    out.print(table("per-subject membership scores", ["subject", "split", "loss", "Dice", "score"], rows))
    kind = f"calibrated on {res['n_reference_models']} reference model(s)" if res["calibrated"] else "uncalibrated"
    out.print(f"MIA AUC = {res['auc']:.3f}  (95 % CI {res['ci_low']:.3f}-{res['ci_high']:.3f}; {res['statistic']}, "
              f"{kind}; {res['n_members']} members, {res['n_nonmembers']} non-members)", highlight=False)
    if res.get("warning"):
        out.print(f"[yellow]warning:[/yellow] {res['warning']}", highlight=False)


def print_membership(out: Console, res: dict) -> None:
    """The per-patient membership test calibrated with reference models, and its population figures."""
    rows = [[pid, r["n_out"], r["score"], r["mu_out"], r["t"], r["p"], "yes" if r["flagged"] else "no"]
            for pid, r in sorted(res["patients"].items())]
    out.print(table("per-patient membership test", ["patient", "OUT refs", "score", "OUT mean", "t", "p",
                                                    "flagged"], rows))
    pop = res["population"]
    out.print(f"population AUC = {pop['auc']:.3f}, TPR at 1 % FPR = {pop.get('tpr', float('nan')):.3f} "
              f"({pop['n_members']} training vs {pop['n_nonmembers']} never-seen patients; "
              f"{res['n_references']} reference models)", highlight=False)


# -- runs and cohorts ----------------------------------------------------------------------------
def print_runs(out: Console, runs: list[dict], root: Path) -> None:
    """Name, kind, date, status and key metric of runs (as ``find_runs`` lists them)."""
    rows = [[r["name"], r["kind"], date_text(r.get("date")), r.get("status") or "-", r["metric_name"],
             r["metric"] if r.get("metric") is not None else "-", r["path"]] for r in runs]
    out.print(table(f"{len(runs)} run(s) under {root}", ["name", "kind", "date", "status", "key metric", "value",
                                                          "path"], rows))


def runs_json(runs: list[dict]) -> str:
    """Runs (as ``find_runs`` lists them) as JSON, without their config and final metrics."""
    return json.dumps([{k: v for k, v in r.items() if k not in ("config", "final")} for r in runs], default=str)


def print_run(out: Console, info: dict) -> None:
    """One run (as ``describe_run`` gives it): what it is, its config and its final metrics."""
    head = {k: info.get(k) for k in ("name", "kind", "status", "path", "cohort")}
    head["date"] = date_text(info.get("date"))
    out.print(table("run", ["key", "value"], [[k, v] for k, v in head.items() if v is not None]))
    out.print(table("config", ["key", "value"], [[k, _cell(v)] for k, v in (info.get("config") or {}).items()]))
    out.print(table("final metrics", ["key", "value"], [[k, _cell(v)] for k, v in (info.get("final") or {}).items()]))


def print_cohort_check(out: Console, err: Console, path: Path, cohorts: list, n: int, problems: list[str],
                       quiet: bool = False) -> None:
    """`privseg data check`: every problem found (on ``err``), or the cohort's subjects valid."""
    for p in problems:
        err.print(f"[red]✗[/red] {p}", highlight=False, soft_wrap=True)  # paths stay whole
    if not problems and not quiet:
        out.print(f"[green]✓[/green] {n} subjects valid ({','.join(sorted({c.format for _, c in cohorts}))}, {path})")


def print_cohorts(out: Console, cohorts: list[tuple[str | None, object]], subjects: bool = False) -> None:
    """Sites, subjects and patients per split, classes and channels of (site, cohort) pairs; with
    ``subjects``, the subject (and patient) IDs per site and split."""
    rows, listing, n_subjects, with_ids = [], [], 0, False
    for site_dir, cohort in cohorts:
        out.print(f"[bold]{cohort.name}[/bold]  format={cohort.format}  dims={cohort.spatial_dims}D  "
                  f"classes={cohort.classes}  channels={cohort.channels}"
                  + (f"  (site {site_dir})" if site_dir else ""), highlight=False)
        with_ids = with_ids or cohort.has_patient_ids
        for site in cohort.sites:
            name = site_dir or site
            subs = cohort.select(site=site)
            n_subjects += len(subs)
            counts = [len([s for s in subs if s.split == sp]) for sp in ("train", "val", "test")]
            rows.append([name, ",".join(sorted({s.modality for s in subs})), *counts,
                         len({s.patient_id for s in subs})])
            listing += [(name, sp, cohort.patients(split=sp, site=site)) for sp in ("train", "val", "test")]
    out.print(table("subjects per site and split", ["site", "modality", "train", "val", "test", "patients"], rows))
    n_patients = sum(len(p) for _, _, p in listing)
    if with_ids:
        out.print(f"{n_patients} patients, {n_subjects} subjects (a patient's subjects share one split)")
    else:
        out.print(f"{n_patients} patients: no patient IDs in this data, so one file = one patient "
                  "(give a split file with a patient column, or patient_id in cohort.json, if patients "
                  "have several files)")
    for name, sp, patients in listing if subjects else ():
        if not patients:
            continue
        ids = [" ".join(s.id for s in subs) if pid == subs[0].id and len(subs) == 1
               else f"{pid}: {' '.join(s.id for s in subs)}" for pid, subs in patients.items()]
        n = sum(len(v) for v in patients.values())
        out.print(f"{name} {sp} ({n}): " + ("; ".join(ids) if with_ids else " ".join(ids)), highlight=False,
                  soft_wrap=True)
