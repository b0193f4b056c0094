"""Security defaults (issue 9): TLS and SuperNode authentication by default, a loud --insecure,
weights-only loading of checkpoints and updates, and the poisoning guard."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import reliability_log as rlog
from privseg.errors import CheckpointError, ConfigError
from privseg.federated.guard import GuardConfig, attach_guard, read_guard_log
from privseg.federated.strategies import build_strategy
from privseg.train.checkpoint import load_checkpoint, load_weights_only

SRC = Path(__file__).resolve().parents[2] / "src" / "privseg"


# -- weights-only loading ------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickled_object_in_a_checkpoint_is_refused_not_executed(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"format": "privseg-checkpoint/1", "model": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: (refused to load|not a readable)"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_weights_only(path, "stored update")
    assert not marker.exists()
    rlog.record("invariant", "weights-only:pickle-refused", not marker.exists())


def test_every_torch_load_in_the_package_is_weights_only():
    """Static check of the source: no torch.load without weights_only=True, no pickle.load(s),
    no np.load(allow_pickle=True) -- an update or checkpoint is never unpickled."""
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            kw = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
            elif name == "np.load" and isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} np.load(allow_pickle=True)")
    rlog.record("invariant", "weights-only:static", not offenders, "; ".join(offenders))
    assert not offenders, offenders


# -- deployment defaults ----------------------------------------------------------------------------

def test_deployment_uses_tls_and_supernode_auth_by_default(tmp_path):
    import inspect

    from privseg.federated import deploy as D

    assert inspect.signature(D.deploy).parameters["insecure"].default is False
    certs = D.generate_certificates(tmp_path / "certs")
    link = D.superlink_command(9092, tmp_path, certs=certs)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(certs["cert"])
    key, pub = D.generate_node_keys(tmp_path / "certs" / "nodes", "H1")
    node = D.supernode_command("127.0.0.1:9092", 9094, 'site="H1"', ca=certs["ca"], private_key=key)
    assert "--insecure" not in node and node[node.index("--root-certificates") + 1] == str(certs["ca"])
    assert node[node.index("--auth-supernode-private-key") + 1] == str(key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and stat.S_IMODE(os.stat(certs["ca_key"]).st_mode) == 0o600
    # the keys are what Flower reads: an OpenSSH EC private key on a NIST curve, and its public key
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    priv = load_ssh_private_key(key.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == priv.public_key().public_numbers()
    # insecure only when asked, and never together with authentication
    assert D.superlink_command(9092, tmp_path, insecure=True)[-1] == "--insecure"
    assert D.supernode_command("127.0.0.1:9092", 9094, "", ca=None, insecure=True)[-1] == "--insecure"
    with pytest.raises(ConfigError, match="needs TLS"):
        D.deploy(None, tmp_path / "run", insecure=True, supernode_auth=True)
    rlog.record("invariant", "deploy:tls-default", True)


def test_insecure_deployment_prints_a_warning(tmp_path, capsys):
    from conftest import make_tiny_cohort
    from privseg.cli import main
    from privseg.federated.deploy import free_port

    cohort = make_tiny_cohort(tmp_path / "c", sites=1, per_site=2, size=16)
    code = main(["fl", "deploy", "--cohort", str(cohort.root), "--superlink", f"127.0.0.1:{free_port()}",
                 "--insecure", "-q", "--runs", str(tmp_path / "runs"), "--model", "unet_tiny"])
    err = capsys.readouterr().err
    assert code == 2  # nothing listens there
    assert "warning" in err and "--insecure" in err and "unencrypted" in err and "Traceback" not in err
    rlog.record("invariant", "deploy:insecure-warns", "unencrypted" in err)


# -- poisoning guard --------------------------------------------------------------------------------

@pytest.fixture(autouse=False)
def flower_ids():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _reply(site: str, w, n: int = 4, counter: int = 1) -> Message:
    arrays = ArrayRecord({"w": Array(np.asarray(w, np.float32)), "count": Array(np.full(1, counter, np.int64))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n}),
                          "site": ConfigRecord({"site": site})})
    return Message(content, dst_node_id=0, message_type="train")


def _strategy(global_w=(0.0, 0.0, 0.0, 0.0), **kw):
    s = build_strategy("fedavg", min_sites=kw.pop("min_sites", 1))
    s._global = ArrayRecord({"w": Array(np.asarray(global_w, np.float32)), "count": Array(np.zeros(1, np.int64))})
    return s


def test_guard_rejects_an_outlier_update_and_logs_it(flower_ids, tmp_path, caplog):
    s = _strategy()
    guard = attach_guard(s, None, tmp_path)
    honest = [_reply("H1", [1.0, 0, 0, 0]), _reply("H2", [0, 1.2, 0, 0]), _reply("H3", [0, 0, 0.8, 0])]
    boosted = _reply("H4", [0, 0, 0, 50.0])  # model replacement, scaled x ~50
    with caplog.at_level(logging.WARNING, logger="privseg.federated.guard"):
        arrays, _ = s.aggregate_train(3, [*honest, boosted])
    np.testing.assert_allclose(arrays["w"].numpy(), [1 / 3, 1.2 / 3, 0.8 / 3, 0.0], rtol=1e-6)
    [rej] = guard.rejected
    assert rej["site"] == "H4" and rej["round"] == 3 and "x the median" in rej["reason"] and rej["norm"] == 50.0
    assert "update of site H4 rejected" in caplog.text
    assert read_guard_log(tmp_path)[0]["site"] == "H4"
    rlog.record("invariant", "guard:outlier-rejected", True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_guard_always_rejects_non_finite_updates(flower_ids, bad):
    s = _strategy()
    guard = attach_guard(s)
    arrays, _ = s.aggregate_train(1, [_reply("H1", [1.0, 1, 1, 1]), _reply("H2", [bad, 0, 0, 0])])  # 2 sites
    assert np.all(np.isfinite(arrays["w"].numpy())) and np.allclose(arrays["w"].numpy(), 1.0)
    assert [(r["site"], "non-finite" in r["reason"]) for r in guard.rejected] == [("H2", True)]


def test_guard_rejects_malformed_updates(flower_ids):
    s = _strategy()
    guard = attach_guard(s)
    wrong_shape = _reply("H2", [1.0, 2.0, 3.0])
    extra_key = _reply("H3", [0.0, 0, 0, 0])
    extra_key.content["arrays"]["intruder"] = Array(np.zeros(3, np.float32))
    s.aggregate_train(1, [_reply("H1", [1.0, 1, 1, 1]), wrong_shape, extra_key])
    reasons = {r["site"]: r["reason"] for r in guard.rejected}
    assert "shape" in reasons["H2"] and "not part of the global model" in reasons["H3"]


def test_guard_needs_three_sites_for_the_norm_rule_and_honours_min_sites(flower_ids):
    s = _strategy()
    guard = attach_guard(s)
    s.aggregate_train(1, [_reply("H1", [1.0, 0, 0, 0]), _reply("H2", [100.0, 0, 0, 0])])
    assert guard.rejected == []  # two sites: no majority to call one of them odd
    # min_sites=3: after rejecting one of three, too few remain -> the round is not applied at all
    s3 = _strategy(min_sites=3)
    g3 = attach_guard(s3)
    replies = [_reply("H1", [1.0, 0, 0, 0]), _reply("H2", [0, 1.0, 0, 0]), _reply("H3", [0, 0, 0, 1e4])]
    assert g3(1, replies, s3._global) == []
    assert g3.rejected[0]["round_dropped"] is True


def test_guard_is_first_configurable_and_attached_once(flower_ids):
    from privseg.federated import FLConfig

    s = _strategy()
    s.update_hooks.append(lambda r, replies, g: replies)  # e.g. client-level DP clipping, attached earlier
    g1 = attach_guard(s)
    assert s.update_hooks[0] is g1 and attach_guard(s) is g1 and len(s.update_hooks) == 2
    assert g1.config == GuardConfig(enabled=True, k=10.0, min_sites=3, max_norm=None)

    class Cfg:  # what attach_guard reads from an FLConfig
        min_sites = 2
        extra = {"guard": {"k": 8.0, "max_norm": 5.0}}

    g2 = attach_guard(_strategy(), Cfg())
    assert g2.config.k == 8.0 and g2.min_keep == 2
    kept = g2(1, [_reply("H1", [1.0, 0, 0, 0]), _reply("H2", [6.0, 0, 0, 0]), _reply("H3", [0, 0.9, 0, 0])], None)
    assert len(kept) == 2 and "cap" in g2.rejected[0]["reason"]
    Cfg.extra = {"guard": {"enabled": False}}
    off = _strategy()
    assert attach_guard(off, Cfg()) is None and off.update_hooks == []
    for bad in ({"k": 0.5}, {"min_sites": 1}, {"max_norm": -1.0}, {"kk": 3}):
        with pytest.raises(ConfigError, match="guard"):
            GuardConfig.from_dict(bad)
    assert FLConfig.__dataclass_fields__["extra"]  # where the settings live


def test_guard_in_a_federated_round_drops_a_poisoned_site(flower_ids, tmp_path):
    """The real round loop (run_server on an in-process grid): one of three sites returns its
    honest update scaled x 1000; the guard rejects it and the global model is the average of the
    two honest sites. Honest sites' update norms stay within a small factor of each other."""
    from conftest import make_tiny_cohort
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.client_app import make_client_app
    from privseg.federated.server_app import run_server
    from privseg.federated.simulation import InProcessGrid, prepare_run
    from privseg.federated.strategies import arrays_to_state
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(tmp_path / "c", sites=3, per_site=2, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=2, in_channels=len(info["channels"]), num_classes=len(info["classes"]))
    cfg = FLConfig(name="guarded", sites=sites, train=tc, rounds=2, local_steps=1, eval_every=0)
    run_dir = prepare_run(cfg, tmp_path / "run")
    inner = make_client_app(sites=cfg.sites, state_root=run_dir)
    seen: dict = {}

    def poisoner(msg, context):  # site H3 boosts its update x 1000 in round 2
        reply = inner(msg, context)
        rnd = int(msg.content["config"]["server-round"])
        if context.node_config["partition-id"] == 2 and rnd == 2:
            glob = msg.content["arrays"]
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord({k: Array(
                (glob[k].numpy() + 1000 * (arrays[k].numpy() - glob[k].numpy())).astype(arrays[k].numpy().dtype)
                if np.issubdtype(arrays[k].numpy().dtype, np.floating) else arrays[k].numpy()) for k in arrays.keys()})
        if context.node_config["partition-id"] < 2 and rnd == 2:
            seen[context.node_config["partition-id"]] = {k: reply.content["arrays"][k].numpy().copy()
                                                         for k in reply.content["arrays"].keys()}
        return reply

    strategy = build_strategy(cfg.strategy, min_sites=cfg.min_sites)
    guard = attach_guard(strategy, cfg, run_dir)
    state = run_server(InProcessGrid(poisoner, len(sites)), run_dir, strategy=strategy)
    assert state.status == "finished" and state.rounds_done == 2
    assert [(r["round"], r["site"]) for r in guard.rejected] == [(2, "H3")]
    honest = [n for n in guard.history[0]["norms"].values()]
    ratio = max(honest) / min(honest)
    print(f"honest update norms, round 1: {guard.history[0]['norms']} (max/min {ratio:.2f})")
    assert ratio < 3, guard.history[0]  # round 1: every site honest
    final = load_checkpoint(state.checkpoint_path(2))["model"]
    avg = arrays_to_state(ArrayRecord({k: Array(((seen[0][k].astype(np.float64) + seen[1][k]) / 2).astype(
        seen[0][k].dtype)) for k in seen[0]}))
    for k, v in final.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, avg[k], rtol=1e-5, atol=1e-6)
    rlog.record("fault", "guard:poisoned-site-dropped", True)
    rlog.record("invariant", "guard:honest-norm-ratio<3", ratio < 3, f"ratio {ratio:.2f}")
