"""Killed processes (issue 9): kill -9 while a checkpoint is written, kill -9 of the server
mid-run then restart, kill -9 of a SuperNode mid-round in a real deployment.

Every kill is a real SIGKILL of a real process: the child processes are started here (their
PIDs are known), nothing is found by name. Each fault injected is counted in
:mod:`reliability_log`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import reliability_log as rlog
from privseg.train.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


def _child(script: str) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)


def _wait_for(proc: subprocess.Popen, token: str, timeout: float = 180.0) -> list[str]:
    """Read the child's output until a line equal to ``token`` (or fail with its output)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if lines[-1] == token:
            return lines
    proc.kill()
    raise AssertionError(f"child never printed {token!r}:\n" + "\n".join(lines[-40:]))


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


# -- kill -9 while a checkpoint is written ----------------------------------------------------------

CKPT_CHILD = """
import io, os, sys, time, torch
from privseg.models import build_model
from privseg.train import TrainConfig
from privseg.train import checkpoint as C

path, mode = {path!r}, {mode!r}
cfg = TrainConfig(model="unet", in_channels=1, num_classes=2, patch_size=(16, 16, 16)).to_dict()
model = build_model("unet", in_channels=1, num_classes=2, spatial_dims=3)

def fill(step):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))

fill(1)
C.save_checkpoint(path, model, config=cfg, step=1)
print("saved 1", flush=True)
if mode == "slow":  # the next write stops half way, with its bytes on disk
    real = torch.save
    def slow(obj, f):
        buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
            print("half written", flush=True)
            time.sleep(600)
    C.torch.save = slow
    fill(2)
    C.save_checkpoint(path, model, config=cfg, step=2)
else:  # write new checkpoints as fast as possible until killed
    print("looping", flush=True)
    step = 1
    while True:
        step += 1
        fill(step)
        C.save_checkpoint(path, model, config=cfg, step=step)
"""


def _check_loadable(path: Path) -> int:
    payload = load_checkpoint(path)
    step = payload["step"]
    assert all(torch.all(v == float(step)) for k, v in payload["model"].items()
               if v.is_floating_point() and ("weight" in k or "bias" in k)), f"torn weights at step {step}"
    return step


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from privseg import utils
    from privseg.errors import StorageError
    from privseg.models import build_model
    from privseg.train.checkpoint import save_checkpoint

    model = build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=3)
    cfg = {"model": "unet_tiny", "norm": "instance", "in_channels": 1, "num_classes": 2, "spatial_dims": 3}
    path = save_checkpoint(tmp_path / "last.pt", model, config=cfg, step=1)
    Usage = namedtuple("Usage", "total used free")

    def torch_on_a_full_disk(payload, f):  # what torch.save raises when the disk fills mid-write
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(100 * 2**30, 100 * 2**30, 4096))
    with pytest.raises(StorageError, match="last.pt: not written, the disk is full"):
        save_checkpoint(path, model, config=cfg, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no torn temporary file left
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    # the same error from a plain write; an unrelated failure with room on the disk passes through
    with pytest.raises(StorageError), utils.atomic_path(tmp_path / "x.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RuntimeError, match="unrelated"), utils.atomic_path(tmp_path / "x.json"):
        raise RuntimeError("unrelated")


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "last.pt"
    proc = _child(CKPT_CHILD.format(path=str(path), mode="slow"))
    _wait_for(proc, "half written")
    torn = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.")]
    assert torn and torn[0].stat().st_size > 0  # the new checkpoint is half on disk, beside the old one
    _sigkill(proc)
    ok = _check_loadable(path) == 1
    rlog.record("fault", "kill-9:checkpoint-half-written", ok)
    assert ok
    # at random moments of a tight save loop: whatever was last renamed into place is whole
    proc = _child(CKPT_CHILD.format(path=str(path), mode="loop"))
    _wait_for(proc, "looping")
    steps = []
    for delay in (0.3, 0.7, 1.1):
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGSTOP)  # freeze mid-write to inspect, then kill
        steps.append(_check_loadable(path))
        os.kill(proc.pid, signal.SIGCONT)
    _sigkill(proc)
    steps.append(_check_loadable(path))
    rlog.record("fault", "kill-9:checkpoint-save-loop", True)
    assert steps == sorted(steps) and steps[-1] >= 2


# -- kill -9 of the server, then restart --------------------------------------------------------------

FL_SETUP = """
import dataclasses, json, os, signal, sys
import torch
torch.set_num_threads(2)  # as conftest.py sets it for the test process: same arithmetic
from conftest import make_tiny_cohort
from privseg.data.cohort import Cohort
from privseg.federated import FLConfig, check_sites, sites_from_cohort
from privseg.privacy import DPConfig
from privseg.train import TrainConfig

def fl_config(root):
    sites = sites_from_cohort(root)
    info = check_sites(sites)
    dp = DPConfig(epsilon=6.0, delta=1e-3, clip="adaptive", sampling_rate=0.5, sigma_b=2.0).to_dict()
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=2, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                     steps=3, extra={"dp": dp})
    return FLConfig(name="dpfl", sites=sites, train=tc, rounds=3, local_steps=1, eval_every=0)
"""

KILL_SERVER = FL_SETUP + """
from privseg.federated import server_app
from privseg.federated.client_app import make_client_app
from privseg.federated.simulation import InProcessGrid, prepare_run, simulate_inprocess

cohort_root, run_dir, where = __ARGS__
cfg = fl_config(cohort_root)
prepare_run(cfg, run_dir)
inner = make_client_app(sites=cfg.sites, state_root=run_dir)

def client(msg, context):
    rnd = int(msg.content["config"]["server-round"])
    if where == "mid-round" and rnd == 2 and context.node_config["partition-id"] == 1:
        print("killing mid-round 2, after site 1 trained and booked its round", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return inner(msg, context)

real_save = server_app._save_global
def save_then_die(cfg_, state, model, arrays, r, entry=None, ema=None):
    path = real_save(cfg_, state, model, arrays, r, entry, ema)
    if where == "after-checkpoint" and r == 2:
        print("killing after the round-2 checkpoint, before state.json", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return path
server_app._save_global = save_then_die
print("running", flush=True)
simulate_inprocess(cfg, run_dir, grid=InProcessGrid(client, len(cfg.sites)))
print("finished without a kill", flush=True)
"""

VOLATILE = {"time", "updated", "created"}  # and every duration (keys ending in _s or -s)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith(("_s", "-s"))}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _diff(a, b, at: str = "") -> list[str]:
    """Where two JSON-like values differ (paths), for a readable assertion message."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{at}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{at}[{i}]")]
    return [] if a == b else [f"{at}: {a!r} != {b!r}"]


def _ledgers(run_dir: Path) -> dict:
    from privseg.privacy.budget import BudgetLedger

    out = {}
    for db in sorted(run_dir.glob("sites/*/privacy.sqlite")):
        led = BudgetLedger(db)
        for site in led.sites():
            out[site] = {"budget": led.budget(site), "spent": led.spent(site),
                         "rounds": [_strip(r) for r in led.rounds(site)],
                         "events": [e.to_dict() for e in led.events(site)]}
    return out


@pytest.fixture(scope="module")
def dp_reference(tmp_path_factory):
    """The uninterrupted run, in a child process like the killed ones (same thread settings)."""
    root = tmp_path_factory.mktemp("faults")
    cohort = root / "cohort"
    run = root / "reference"
    proc = _child(FL_SETUP + f"""
make_tiny_cohort(__import__("pathlib").Path({str(cohort)!r}), sites=2, per_site=3, size=16)
from privseg.federated.simulation import simulate_inprocess
state = simulate_inprocess(fl_config({str(cohort)!r}), {str(run)!r})
print("done", state.status, state.rounds_done, flush=True)
""")
    lines = _wait_for(proc, "done finished 3", timeout=600)
    assert proc.wait(timeout=60) == 0, lines
    return cohort, run


def _resume(cohort: Path, run: Path) -> subprocess.Popen:
    return _child(FL_SETUP + f"""
from privseg.federated.simulation import simulate_inprocess
state = simulate_inprocess(fl_config({str(cohort)!r}), {str(run)!r})
print("resumed", state.data.get("resumed_from"), state.status, state.rounds_done, flush=True)
""")


@pytest.mark.parametrize("where", ["mid-round", "after-checkpoint"])
def test_server_killed_then_restarted_matches_an_uninterrupted_run(dp_reference, tmp_path, where):
    """kill -9 of the whole server process (in-process simulation: the ClientApps die with it),
    once in the middle of round 2 after one site has trained and booked its privacy spend, once
    after the round-2 checkpoint but before state.json. The restart resumes after round 1 and
    ends where the uninterrupted run ended: same per-round metrics, same budget ledgers (events,
    epsilon per round), same weights."""
    cohort, ref = dp_reference
    run = tmp_path / "run"
    # the sites keep their secret noise keys (as a real site's state folder does): the comparison with
    # the uninterrupted run needs the same keys, so they are provisioned from it before the first start
    for key in ref.glob("sites/*/dp_noise.key"):
        (run / "sites" / key.parent.name).mkdir(parents=True, exist_ok=True)
        (run / "sites" / key.parent.name / key.name).write_bytes(key.read_bytes())
    proc = _child(KILL_SERVER.replace("__ARGS__", repr((str(cohort), str(run), where))))
    lines = _wait_for(proc, "running")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, "\n".join(lines) + out
    state = json.loads((run / "state.json").read_text())
    assert state["rounds_done"] == 1  # round 2 was never recorded
    if where == "mid-round":  # a site had already booked round 2 in its ledger when the server died
        assert any(r["round"] == 2 for led in _ledgers(run).values() for r in led["rounds"])
    proc = _resume(cohort, run)
    lines = _wait_for(proc, "resumed 1 finished 3", timeout=600)
    assert proc.wait(timeout=60) == 0, lines
    a = json.loads((ref / "state.json").read_text())
    b = json.loads((run / "state.json").read_text())
    same_rounds = _strip(a["rounds"]) == _strip(b["rounds"])
    same_ledgers = _ledgers(ref) == _ledgers(run)
    wa = load_checkpoint(ref / "checkpoints" / "global_r0003.pt")["model"]
    wb = load_checkpoint(run / "checkpoints" / "global_r0003.pt")["model"]
    same_weights = all(torch.equal(wa[k], wb[k]) for k in wa)
    ok = same_rounds and same_ledgers and same_weights
    rlog.record("fault", f"kill-9:server-{where}", ok,
                f"rounds {same_rounds}, ledgers {same_ledgers}, weights {same_weights}")
    assert same_rounds, _diff(_strip(a["rounds"]), _strip(b["rounds"]))[:10]
    assert same_ledgers, _diff(_ledgers(ref), _ledgers(run))[:10]
    assert same_weights


# -- kill -9 of a SuperNode mid-round in a real deployment -----------------------------------------------

@pytest.mark.slow
def test_supernode_killed_mid_round_the_run_completes_with_the_others(tmp_path):
    """Real SuperLink + 3 authenticated SuperNodes over TLS, min_sites=2: SuperNode H3 is
    killed (SIGKILL to its process group: the SuperNode and its ClientApp) once it has received
    the round's train message. The round is aggregated from H1 and H2; H3 is recorded as failed.
    A fourth SuperNode with a key the SuperLink never registered is refused."""
    from conftest import make_tiny_cohort
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.deploy import (
        DeployError,
        Deployment,
        deploy,
        flower_binary,
        free_port,
        generate_node_keys,
        supernode_command,
    )
    from privseg.train import TrainConfig

    try:
        for b in ("flower-superlink", "flower-supernode", "flwr"):
            flower_binary(b)
    except DeployError as exc:
        pytest.skip(f"Flower binaries missing: {exc}")
    cohort = make_tiny_cohort(tmp_path / "c", sites=3, per_site=2, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=1, in_channels=len(info["channels"]), num_classes=len(info["classes"]))
    cfg = FLConfig(name="dep", sites=sites, train=tc, rounds=1, local_steps=1, eval_every=0, min_sites=2,
                   round_timeout=150, connect_timeout=120)
    d = Deployment(tmp_path / "dep")
    killed = threading.Event()

    def start_rogue(dep: Deployment) -> None:
        key, _ = generate_node_keys(tmp_path / "rogue", "rogue")  # never registered
        cmd = supernode_command(dep.address, free_port(), 'site="H9" cohort="/nonexistent"', ca=dep.ca,
                                private_key=key, max_wait=30)
        dep.start("supernode-rogue", cmd, dep.env)

    def killer() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed.is_set():
            p = d.proc("supernode-H3")
            if p is not None and p.alive() and "Receiving: train message" in p.tail(200):
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(timeout=30)
                killed.set()
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.monotonic()
    state = deploy(cfg, tmp_path / "dep", deployment=d, on_started=start_rogue)
    t.join(timeout=5)
    seconds = time.monotonic() - t0
    r1 = state.rounds[0]
    # the SuperLink answers for the dead node once it missed 2 heartbeats (Flower: 2 x 30 s);
    # (run_server currently books that error reply under the SuperLink's node ID *and* the dead
    # node as "no reply": one or two entries, both about H3's node)
    gone = [f for f in r1["failed"] if "Node Unavailable" in f["reason"] or "no reply" in f["reason"]]
    ok = (killed.is_set() and state.status == "finished" and r1["applied"]
          and r1["participants"] == ["H1", "H2"] and bool(gone) and len(gone) == len(r1["failed"]))
    rlog.record("fault", "kill-9:supernode-mid-round", ok, json.dumps(r1, default=str)[:500])
    assert killed.is_set(), "SuperNode H3 never received its train message"
    assert state.status == "finished" and r1["applied"], r1
    assert r1["participants"] == ["H1", "H2"] and gone and len(gone) == len(r1["failed"]), r1
    rogue = (tmp_path / "dep" / "deploy" / "logs" / "supernode-rogue.log").read_text(errors="replace")
    link = (tmp_path / "dep" / "deploy" / "logs" / "superlink.log").read_text(errors="replace")
    refused = "No SuperNode found with the given public key" in link + rogue or "PERMISSION_DENIED" in rogue
    rlog.record("invariant", "deploy:unregistered-supernode-refused", refused, rogue[-500:])
    assert refused, rogue[-2000:]
    print(f"deployment with a killed SuperNode: {seconds:.0f} s")


# -- kill -9 of a central erasure at each stage -------------------------------------------------------

ERASE_CHILD = """
import sys, time
from pathlib import Path
from privseg.cohorts import open_cohort
from privseg.erasure.central import erase_central

run, stop = Path({run!r}), {stop!r}

def on_stage(stage, msg):
    print(stage, flush=True)
    if stage == stop:  # the stage is under way (its start recorded): hold here until killed
        print("in " + stage, flush=True)
        time.sleep(600)

cohort = open_cohort(Path({cohort!r}), checkpoint=run / "last.pt")
erase_central(run / "last.pt", cohort, [{subject!r}], "noisy_label", epochs=1, out_dir=run / "unlearned",
              thresholds={loose!r}, mia_views=1, device="cpu", on_stage=on_stage)
"""


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    from conftest import make_tiny_cohort
    from privseg.train import TrainConfig
    from privseg.train.loop import Trainer

    root = tmp_path_factory.mktemp("central_kill")
    cohort = make_tiny_cohort(root / "tiny", sites=1, per_site=6, size=16)
    tc = TrainConfig(model="unet_tiny", patch_size=(16,) * 3, steps=2, checkpoint_every=2, device="cpu",
                     subjects_per_step=2, patches_per_subject=1, in_channels=1, num_classes=3)
    Trainer(cohort, tc, root / "run").fit()
    return cohort, root / "run"


@pytest.mark.parametrize("stage", ["requested", "local_unlearned", "verified", "completed"])
def test_central_erasure_killed_in_a_stage_is_on_record_and_a_rerun_finishes_it_once(central_run, tmp_path,
                                                                                    capsys, stage):
    """The erasure ledger is written ahead: a stage's start is recorded before its work. A kill -9
    while a stage runs leaves it on record (`privseg erase status` says which stage never ended);
    the same request run again continues from there and completes exactly once."""
    import shutil

    from privseg.audit.ledger import ErasureLedger
    from privseg.cli import main as cli_main
    from privseg.cohorts import open_cohort
    from privseg.erasure.central import erase_central

    cohort, original = central_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    subject = [s.id for s in cohort.select("train")][0]
    loose = {"max_mia_auc": 1.0, "min_retain_dice_ratio": 0.0, "min_test_dice_ratio": 0.0}
    proc = _child(ERASE_CHILD.format(run=str(run), stop=stage, cohort=str(cohort.root), subject=subject,
                                     loose=loose))
    _wait_for(proc, "in " + stage)
    _sigkill(proc)
    ledger = ErasureLedger(run / "erasure" / "ledger.db", create=False)
    (rid,) = {e["request"] for e in ledger.entries()}
    killed = ledger.entries(rid)
    on_record = killed[-1]["event"] == "requested" if stage == "requested" else \
        (killed[-1]["event"], killed[-1]["body"]["stage"]) == ("started", stage)
    capsys.readouterr()
    assert cli_main(["erase", "status", "--run", str(run)]) == 0
    status = capsys.readouterr().out
    reported = f"{rid}: {stage if stage == 'requested' else stage + ' started'} at " in " ".join(status.split())
    res = erase_central(run / "last.pt", open_cohort(cohort.root, checkpoint=run / "last.pt"), [subject],
                        "noisy_label", epochs=1, out_dir=run / "unlearned", thresholds=loose, mia_views=1,
                        device="cpu")
    entries = ErasureLedger(run / "erasure" / "ledger.db", create=False).entries(rid)
    ends = [e["event"] for e in entries if e["event"] != "started"]
    ok = (on_record and reported and res.status == "completed" and entries[:len(killed)] == killed
          and ends == ["requested", "local_unlearned", "verified", "completed"] and ledger.verify() == (True, []))
    rlog.record("fault", f"kill-9:central-erasure-in-{stage}", ok, f"{ends} reported={reported}")
    assert on_record, killed[-1]
    assert reported, status
    assert ok, ends
