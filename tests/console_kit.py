"""Helpers shared by the console tests (no tests here): run folders, accounts, logins.

``crafted_root`` writes a runs folder without training (a real tiny cohort, a real FLConfig and
run state, a real privacy ledger and erasure ledger, made with the project's own APIs): enough
for every page and every check made before an erasure. ``trained_run`` trains one tiny
federation once per test session, for the tests that carry out a real erasure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import make_tiny_cohort, tiny_fl_config
from privseg.audit.ledger import ErasureLedger
from privseg.console.accounts import Accounts
from privseg.federated import FLConfig, RunState, sites_from_cohort
from privseg.privacy.accountant import StepEvent
from privseg.privacy.budget import BudgetLedger
from privseg.privacy.plan import SitePlan
from privseg.train import TrainConfig

warnings.filterwarnings("ignore", message=".*httpx.*starlette.testclient.*")

PASSWORDS = {"dpo": "officer-password-1", "h2": "site-h2-password", "h1": "site-h1-password",
             "viewer": "viewer-password-1"}
LOOSE = {"max_mia_auc": "1.0", "min_retain_dice_ratio": "0.0", "min_test_dice_ratio": "0.0"}


def add_users(root: Path) -> None:
    acc = Accounts(root)
    acc.add_user("dpo", "officer", PASSWORDS["dpo"])
    acc.add_user("h2", "site", PASSWORDS["h2"], site="H2")
    acc.add_user("h1", "site", PASSWORDS["h1"], site="H1")
    acc.add_user("viewer", "viewer", PASSWORDS["viewer"])


def _tc(n_classes: int = 3) -> TrainConfig:
    return TrainConfig(model="unet_tiny", patch_size=(8, 8, 8), device="cpu", in_channels=1, num_classes=n_classes)


def craft_run(root: Path, name: str, cohort_root: Path, sites: list[str] | None = None, dp: bool = False) -> Path:
    """A federated run folder as `fl run` leaves it (config, state, round records), untrained."""
    specs = sites_from_cohort(cohort_root, only=sites)
    extra = {"dp": {"unit": "patient", "epsilon": 4.0, "delta": 1e-3}} if dp else {}
    tc = _tc()
    tc.extra.update(extra)
    cfg = FLConfig(name=name, sites=specs, train=tc, rounds=4, local_steps=1)
    d = root / name
    d.mkdir(parents=True)
    cfg.save(d)
    st = RunState(d)
    ids = [s.id for s in specs]
    (d / "checkpoints").mkdir()
    for r in (1, 2, 3):
        ckpt = d / "checkpoints" / f"global_r{r:04d}.pt"
        ckpt.write_bytes(b"crafted")
        st.data.update({"name": name, "sites": ids})
        st.record_round({"round": r, "participants": ids, "failed": [], "applied": True,
                         "eval": {"sites": {s: {"mean-dice": 0.5 + 0.1 * r + 0.01 * i} for i, s in enumerate(ids)},
                                  "overall": {"site-mean-dice": 0.5 + 0.1 * r}}}, ckpt)
    if dp:
        for i, s in enumerate(ids):
            led = BudgetLedger(d / "sites" / s / "privacy.sqlite")
            budget = 20.0 if s != "H3" else 1.0  # H3 far overspent: no erasure step fits there
            led.set_budget(s, budget, 1e-3)
            led.set_plan(s, SitePlan(s, 6, 0.5, 15, 1.2 + 0.1 * i, budget, 1e-3).to_dict())
            for r in (1, 2, 3):
                led.commit_round(s, r, [StepEvent(q=0.5, sigma=1.2 + 0.1 * i, steps=5)])
        st.set_status("finished")
    else:
        st.set_status("finished")
    return d


def crafted_root(base: Path) -> tuple[Path, Path]:
    """(runs root, cohort root): run ``fed`` (H1-H3, DP, a command-line request of H1 in its
    ledger), run ``other`` (H1 and H3 only), four users."""
    cohort = make_tiny_cohort(base / "cohort", sites=3, per_site=6, size=8)
    root = base / "runs"
    root.mkdir()
    fed = craft_run(root, "fed", cohort.root, dp=True)
    craft_run(root, "other", cohort.root, sites=["H1", "H3"])
    h1 = [s.id for s in cohort.select("train", "H1")]
    ErasureLedger(fed / "erasure" / "ledger.db").append("ER-cli0000000h1", "requested", {
        "run": "fed", "kind": "patient", "site": "H1", "subjects": [h1[0]], "reason": "cli request",
        "requested_by": "shell user",
        "source": {"round": 3, "path": "checkpoints/global_r0003.pt", "sha256": "0" * 64}})
    (fed / "report.html").write_text("<!DOCTYPE html><title>report</title><p>every site's patients</p>")
    add_users(root)
    return root, cohort.root



def crafted_fixtures(name: str):
    """Two pytest fixtures over :func:`crafted_root`, for a test module to bind as ``template, fresh =
    crafted_fixtures(NAME)``: ``template``, the crafted runs root built once per module (under a temporary
    folder called NAME); ``fresh``, a private copy of it per test (accounts included; the cohort is
    shared, read-only)."""

    @pytest.fixture(scope="module")
    def template(tmp_path_factory) -> tuple[Path, Path]:
        return crafted_root(tmp_path_factory.mktemp(name))

    @pytest.fixture
    def fresh(template, tmp_path) -> tuple[Path, Path]:
        root, cohort = template
        shutil.copytree(root, tmp_path / "runs")
        return tmp_path / "runs", cohort

    return template, fresh


@contextmanager
def run_lock_held(run: Path, note: str) -> Iterator[None]:
    """Within the block another process holds the run's lock as ``fl run`` does: an OS lock on
    RUN/.lock, with ``note`` (``{pid}``: the holder's process ID) inside, naming the holder."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"f = open({str(run / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        f"f.truncate(0); f.write({note!r}.format(pid=os.getpid())); f.flush()\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()

def train_ids(cohort_root: Path, site: str) -> list[str]:
    from privseg.data.formats import read_cohort

    return [s.id for s in read_cohort(cohort_root).select("train", site)]


def token_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def login(client, user: str, password: str | None = None):
    page = client.get("/login")
    return client.post("/login", data={"csrf": token_of(page.text), "username": user,
                                       "password": PASSWORDS[user] if password is None else password,
                                       "next": "/runs"}, follow_redirects=False)


def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, cohort root) of one tiny trained federation (3 sites x 4 patients, 16^3
    patches, 3 rounds with evaluation and stored updates), trained once per session."""
    base = tmp_path_factory.getbasetemp() / "console-trained"
    run = base / "fed"
    if not (run / "state.json").is_file():
        from privseg.federated.simulation import simulate_inprocess

        shutil.rmtree(base, ignore_errors=True)
        cohort = make_tiny_cohort(base / "tiny", sites=3, per_site=4, size=20)
        simulate_inprocess(tiny_fl_config(cohort, lr=5e-3, subjects_per_step=2, name="fed", rounds=3, local_steps=1,
                                          eval_every=1, keep_updates=True), run)
    return run, base / "tiny"


def trained_root(tmp_path_factory, base: Path) -> tuple[Path, Path]:
    """A runs root holding a copy of the trained run as ``fed`` and a crafted ``other`` run
    (sites H1 and H3 only), with the four users."""
    run, cohort = trained_run(tmp_path_factory)
    root = base / "runs"
    root.mkdir(parents=True)
    shutil.copytree(run, root / "fed")
    craft_run(root, "other", cohort, sites=["H1", "H3"])
    add_users(root)
    return root, cohort


def trained_dp_run(tmp_path_factory) -> Path:
    """A tiny federation trained under patient-level DP (2 sites x 4 patients, 2 rounds), with an
    erasure reserve of one round's steps: a default patient erasure (local stage + one repair
    round) does not fit at the patient's site, the same erasure without repair rounds does."""
    base = tmp_path_factory.getbasetemp() / "console-trained-dp"
    run = base / "dpfed"
    if not (run / "state.json").is_file():
        from privseg.federated import check_sites
        from privseg.federated.simulation import simulate_inprocess
        from privseg.privacy import DPConfig

        shutil.rmtree(base, ignore_errors=True)
        cohort = make_tiny_cohort(base / "tiny", sites=2, per_site=4, size=16)
        info = check_sites(sites_from_cohort(cohort.root))
        tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                         patches_per_subject=1, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                         steps=2)
        cfg = FLConfig(name="dpfed", sites=sites_from_cohort(cohort.root), train=tc, rounds=2, local_steps=1,
                       eval_every=1, eval_split="test", keep_updates=True,
                       privacy=DPConfig(delta=1e-3, clip="fixed", erasure_reserve=1))
        simulate_inprocess(cfg, run)
    return run
