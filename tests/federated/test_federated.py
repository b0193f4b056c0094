"""Federated training with Flower: strategies, faults, resume, simulation on Ray, deployment.

Most tests drive the real ServerApp round loop and ClientApp handlers through
``InProcessGrid`` (Flower Messages, no Ray); one test runs the Ray simulation through the CLI
and one starts a real SuperLink + 2 SuperNodes over TLS on loopback.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_cohort
from privseg.cli import main as cli_main
from privseg.data.cohort import Cohort
from privseg.data.transforms import load_preprocessed
from privseg.errors import ConfigError, DataError, PrivsegError
from privseg.federated import FLConfig, RunState, check_sites, sites_from_cohort, sites_from_folders
from privseg.federated.client_app import make_client_app
from privseg.federated.simulation import InProcessGrid, simulate_inprocess
from privseg.federated.strategies import (
    attach_proximal,
    build_strategy,
    global_params,
    norm_state_keys,
    proximal_term,
)
from privseg.train import SegLoss, TrainConfig, load_checkpoint


@pytest.fixture(scope="module")
def fed_cohort(tmp_path_factory) -> Cohort:
    return make_tiny_cohort(tmp_path_factory.mktemp("fed") / "tiny", sites=3, per_site=3, size=20)


def fl_config(cohort: Cohort, name: str = "t", **kw) -> FLConfig:
    info = check_sites(sites_from_cohort(cohort.root))
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), lr=5e-3, device="cpu", subjects_per_step=2,
                     patches_per_subject=2, in_channels=len(info["channels"]), num_classes=len(info["classes"]))
    base = dict(name=name, sites=sites_from_cohort(cohort.root), train=tc, rounds=2, local_steps=2, eval_every=0)
    base.update(kw)
    return FLConfig(**base)


def global_loss(checkpoint: Path, cohort: Cohort) -> float:
    payload = load_checkpoint(checkpoint)
    model = TrainConfig.from_dict(payload["config"]).build_model()
    model.load_state_dict(payload["model"])
    model.eval()
    items = load_preprocessed(cohort.select("train"), cohort)
    loss_fn = SegLoss()
    with torch.no_grad():
        return float(np.mean([float(loss_fn(model(i["image"][None, :, :16, :16, :16].as_tensor()),
                                            i["label"][None, :, :16, :16, :16].as_tensor())) for i in items]))


def test_two_rounds_improve_over_round_zero_and_record_participants(fed_cohort, tmp_path):
    cfg = fl_config(fed_cohort, rounds=2, local_steps=3, eval_every=2, keep_updates=True)
    state = simulate_inprocess(cfg, tmp_path / "run")
    assert state.status == "finished" and state.rounds_done == 2
    assert [e["participants"] for e in state.rounds] == [["H1", "H2", "H3"]] * 2
    assert global_loss(state.checkpoint_path(2), fed_cohort) < global_loss(state.checkpoint_path(0), fed_cohort)
    # per-site evaluation on held-out subjects, and the erasure trail: rounds and stored updates per site
    ev = state.rounds[-1]["eval"]
    assert set(ev["sites"]) == {"H1", "H2", "H3"} and 0 <= ev["overall"]["site-mean-dice"] <= 1
    assert state.rounds_of_site("H2") == [1, 2]
    upd = tmp_path / "run" / state.rounds[0]["updates"]["H2"]
    assert upd.is_file() and torch.load(upd, weights_only=True)
    # the global checkpoint is an ordinary privseg checkpoint
    payload = load_checkpoint(state.checkpoint_path(2))
    assert payload["step"] == 2 and payload["extra"]["federated"]["participants"] == ["H1", "H2", "H3"]
    # `privseg fl status` reads it
    assert cli_main(["fl", "status", str(tmp_path / "run")]) == 0


def test_fedbn_keeps_normalisation_layers_site_local(fed_cohort, tmp_path):
    cfg = fl_config(fed_cohort, strategy="fedbn", rounds=2, local_steps=2, keep_updates=True)
    state = simulate_inprocess(cfg, tmp_path / "run")
    model = cfg.train.build_model()
    keys = norm_state_keys(model)
    assert keys, "the model has normalisation layers"
    init = load_checkpoint(state.checkpoint_path(0))["model"]
    final = load_checkpoint(state.checkpoint_path(2))["model"]
    # nothing of a norm layer travelled: updates lack them, the global keeps its initial values
    update = torch.load(tmp_path / "run" / state.rounds[1]["updates"]["H1"], weights_only=True)
    assert not keys & set(update) and set(update) == set(init) - keys
    for k in keys:
        torch.testing.assert_close(final[k], init[k])
    assert any(not torch.equal(final[k], init[k]) for k in set(init) - keys)
    # ... while each site trained its own
    local = {s: torch.load(tmp_path / "run" / "sites" / s / "local_r0002.pt", weights_only=True) for s in ("H1", "H2")}
    assert set(local["H1"]) == keys
    k = sorted(keys)[0]
    assert not torch.equal(local["H1"][k], local["H2"][k]) and not torch.equal(local["H1"][k], init[k])


def test_fedprox_term_is_zero_at_global_weights_and_its_gradient_is_applied():
    torch.manual_seed(0)
    cfg = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), in_channels=1, num_classes=3)
    model = cfg.build_model()
    ref = global_params(model)
    assert float(proximal_term(model, ref, mu=0.5)) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    term = proximal_term(model, ref, mu=0.5)
    assert float(term) > 0
    # the optimiser hook adds exactly d(term)/dw to the gradient before each step
    expected = torch.autograd.grad(term, list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    handle = attach_proximal(opt, model, ref, mu=0.5)
    opt.step()
    handle.remove()
    for b, p, g in zip(before, model.parameters(), expected, strict=True):
        torch.testing.assert_close(b - p.detach(), g)
    # the server side is Flower's FedProx, which sends mu to the clients
    assert build_strategy("fedprox", proximal_mu=0.5).proximal_mu == 0.5


def test_resume_after_a_crash_continues_at_the_right_round_and_repeats_the_run(fed_cohort, tmp_path):
    cfg = fl_config(fed_cohort, strategy="fedprox", rounds=3, local_steps=1)
    full = simulate_inprocess(cfg, tmp_path / "full")

    class Crash(Exception):
        pass

    def crash_after_round_2(entry):
        if entry["round"] == 2:
            raise Crash

    with pytest.raises(Crash):
        simulate_inprocess(cfg, tmp_path / "crashed", on_round=crash_after_round_2)
    assert RunState.load(tmp_path / "crashed").rounds_done == 2
    seen = []
    resumed = simulate_inprocess(cfg, tmp_path / "crashed", on_round=lambda e: seen.append(e["round"]))
    assert seen == [3] and resumed.data["resumed_from"] == 2 and resumed.rounds_done == 3
    a = load_checkpoint(full.checkpoint_path(3))["model"]
    b = load_checkpoint(resumed.checkpoint_path(3))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # a different model cannot silently resume this run
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model="unet"))
    with pytest.raises(ConfigError, match="different setup"):
        simulate_inprocess(other, tmp_path / "crashed")


def test_a_failing_site_does_not_stop_the_round_and_min_sites_is_enforced(fed_cohort, tmp_path):
    cfg = fl_config(fed_cohort, rounds=2, local_steps=1, min_sites=2)
    inner = make_client_app(sites=cfg.sites, state_root=tmp_path / "run")

    def flaky(msg, context):  # site H2 (partition 1) raises in round 1
        if context.node_config["partition-id"] == 1 and int(msg.content["config"]["server-round"]) == 1:
            raise RuntimeError("scanner archive offline")
        return inner(msg, context)

    grid = InProcessGrid(flaky, len(cfg.sites))
    state = simulate_inprocess(cfg, tmp_path / "run", grid=grid)
    r1, r2 = state.rounds
    assert r1["applied"] and r1["participants"] == ["H1", "H3"]
    assert "scanner archive offline" in r1["failed"][0]["reason"]
    assert r2["participants"] == ["H1", "H2", "H3"] and not r2["failed"]
    assert state.rounds_of_site("H2") == [2]
    # two sites gone (one raising, one silent like a killed SuperNode): fewer than min-sites=2,
    # so round 3 leaves the global model as it was, and the run still finishes
    cfg3 = dataclasses.replace(cfg, rounds=3)
    grid.down.add(grid.get_node_ids()[2])
    grid.client_app = lambda m, c: (_ for _ in ()).throw(RuntimeError("down")) if c.node_config["partition-id"] == 1 \
        else inner(m, c)
    state = simulate_inprocess(cfg3, tmp_path / "run", grid=grid)
    r3 = state.rounds[2]
    assert not r3["applied"] and r3["participants"] == ["H1"] and len(r3["failed"]) == 2
    assert any("no reply" in f["reason"] for f in r3["failed"])
    a, b = (load_checkpoint(state.checkpoint_path(r))["model"] for r in (2, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_federations_are_clear_errors(fed_cohort, tmp_path):
    # a site with no training subjects
    root = tmp_path / "empty_site"
    shutil.copytree(fed_cohort.root, root)
    c = Cohort.from_manifest(root / "cohort.json")
    c.with_subjects([dataclasses.replace(s, split="test") if s.site == "H2" else s for s in c.subjects]).save(
        root / "cohort.json")
    with pytest.raises(DataError, match="site H2 has no training subjects"):
        check_sites(sites_from_cohort(root))
    # mismatched class counts between sites given as folders
    other = tmp_path / "other"
    shutil.copytree(fed_cohort.root, other)
    c2 = Cohort.from_manifest(other / "cohort.json")
    dataclasses.replace(c2, classes=["background", "organ"]).save(other / "cohort.json")
    with pytest.raises(DataError, match="has 2 classes .* but site A has 3"):
        check_sites(sites_from_folders([f"A={fed_cohort.root}", f"B={other}"]))
    # the CLI turns them into one line and exit code 2
    assert cli_main(["fl", "run", "--site", f"A={fed_cohort.root}", "--site", f"B={other}", "-q",
                     "--runs", str(tmp_path / "runs")]) == 2
    assert cli_main(["fl", "run", "--cohort", str(tmp_path / "missing"), "-q"]) == 2
    # an unreachable SuperLink
    from privseg.federated.deploy import check_reachable, free_port

    with pytest.raises(PrivsegError, match="unreachable"):
        check_reachable(f"127.0.0.1:{free_port()}")
    assert cli_main(["fl", "deploy", "--cohort", str(fed_cohort.root), "--superlink", f"127.0.0.1:{free_port()}",
                     "--insecure", "-q", "--runs", str(tmp_path / "runs"), "--model", "unet_tiny"]) == 2


@pytest.mark.slow
def test_simulation_on_ray_through_the_cli(fed_cohort, tmp_path, capsys):
    pytest.importorskip("ray")
    args = ["fl", "run", "--cohort", str(fed_cohort.root), "--rounds", "1", "--strategy", "fedbn", "--local-steps",
            "1", "--model", "unet_tiny", "--patch", "16", "--name", "sim", "--runs", str(tmp_path / "runs"), "-q",
            "--only-site", "H1", "--only-site", "H2"]
    assert cli_main(args) == 0
    state = RunState.load(tmp_path / "runs" / "sim")
    assert state.rounds_done == 1 and state.rounds[0]["participants"] == ["H1", "H2"]
    assert set(state.rounds[0]["eval"]["sites"]) == {"H1", "H2"}
    assert cli_main(["fl", "status", "sim", "--runs", str(tmp_path / "runs"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds_done"] == 1


@pytest.mark.slow
def test_deployment_superlink_and_two_supernodes_over_tls(fed_cohort, tmp_path):
    from privseg.federated.deploy import DeployError, deploy, flower_binary

    try:
        for b in ("flower-superlink", "flower-supernode", "flwr"):
            flower_binary(b)
    except DeployError as exc:
        pytest.skip(f"Flower binaries missing: {exc}")
    cfg = fl_config(fed_cohort, name="dep", rounds=1, local_steps=1, eval_every=0, round_timeout=300,
                    connect_timeout=120)
    cfg = dataclasses.replace(cfg, sites=cfg.sites[:2])
    state = deploy(cfg, tmp_path / "dep")
    assert state.status == "finished" and state.rounds[0]["participants"] == ["H1", "H2"]
    assert (tmp_path / "dep" / "deploy" / "certs" / "ca.crt").is_file()
    log = (tmp_path / "dep" / "deploy" / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log  # TLS was on


def test_inprocess_grid_push_then_pull_matches_send_and_receive():
    from flwr.app import Message, RecordDict

    from privseg.federated.simulation import InProcessGrid

    def echo(msg, context):
        if context.node_id == 1001:
            raise RuntimeError("site down hard")
        return Message(RecordDict(), reply_to=msg)

    grid = InProcessGrid(echo, num_sites=3)
    grid.down.add(1002)
    msgs = [grid.create_message(RecordDict(), "train", nid, "1") for nid in grid.get_node_ids()]
    ids = grid.push_messages(msgs)
    replies = grid.pull_messages(ids)
    assert len(ids) == 3 and len(replies) == 2  # the node that is down never answers
    assert sum(r.has_error() for r in replies) == 1
    assert grid.pull_messages(ids) == []  # each reply is delivered once
