"""FedRecover site erasure (Cao et al., IEEE S&P 2023): the L-BFGS Hessian-vector product on a
quadratic, the exact-round schedule, an erasure of a tiny federation (8 rounds, 2 of them exact)
against its federated retrain, and bad settings refused before anything is recorded."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from conftest import tiny_federation
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.erasure import LEDGER, SITE_ERASERS, ErasureRequest, erase
from privseg.erasure.fedrecover import FedRecoverHook, fedrecover_schedule, lbfgs_hvp
from privseg.erasure.site import SiteJob
from privseg.errors import ConfigError
from privseg.federated import FLConfig, RunState
from privseg.federated.retrain import federated_retrain, round_seconds
from privseg.train.checkpoint import load_checkpoint

ROUNDS = 8
FEW_EXACT = {"warmup": 1, "correction": 100, "final": 1, "max_extra": 0}  # 2 exact rounds of 8


# -- the math ---------------------------------------------------------------------------------

def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 4.0, d, dtype=torch.float64)) @ q.T


def _bfgs_dense(s: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
    """The textbook BFGS recursion from sigma I (what the compact form must equal)."""
    sigma = (y[-1] @ s[-1]) / (s[-1] @ s[-1])
    b = sigma * torch.eye(len(s[0]), dtype=torch.float64)
    for sk, yk in zip(s, y, strict=True):
        bs = b @ sk
        b = b - torch.outer(bs, bs) / (sk @ bs) + torch.outer(yk, yk) / (yk @ sk)
    return b


def test_lbfgs_hessian_vector_product_on_a_quadratic():
    """f(w) = w^T A w / 2 has gradient A w, so gradient differences are y = A s exactly."""
    d = 7
    a = _spd(d, 0)
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3)]
    y = [a @ sk for sk in s]
    v = torch.randn(d, generator=g, dtype=torch.float64)
    # the compact representation is the BFGS matrix of the pairs, and it meets the newest secant equation
    torch.testing.assert_close(lbfgs_hvp(s, y, v), _bfgs_dense(s, y) @ v)
    torch.testing.assert_close(lbfgs_hvp(s, y, s[-1]), y[-1])
    # probed along A's eigenvectors (A-conjugate directions), every direction: B = A
    _, vecs = torch.linalg.eigh(a)
    e = [vecs[:, k] for k in range(d)]
    torch.testing.assert_close(lbfgs_hvp(e, [a @ x for x in e], v), a @ v)
    # a quadratic with Hessian c I: one pair recovers it; float32 in, float32 out
    c = 2.5
    out = lbfgs_hvp([s[0].float()], [c * s[0].float()], v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, c * v.float())
    with pytest.raises(ValueError):
        lbfgs_hvp([], [], v)


def test_the_schedule_has_warm_up_periodic_correction_and_final_tuning():
    plan = fedrecover_schedule(120, warmup=2, correction=10, final=3)
    exact = [p for p, x in enumerate(plan) if x]
    assert exact == [0, 1, *range(11, 112, 10), 117, 118, 119] and len(exact) == 16  # 0.13 of the rounds
    assert all(fedrecover_schedule(5, warmup=1, correction=1, final=0))  # every round exact: a retrain
    assert fedrecover_schedule(8, **{k: FEW_EXACT[k] for k in ("warmup", "correction", "final")}) == \
        [True] + [False] * 6 + [True]


# -- a tiny federation -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedrecover")
    tiny_federation(root, name="rec", rounds=ROUNDS, local_steps=2, per_site=3, size=16, subjects_per_step=1)
    retrain = federated_retrain(root / "original", root / "retrain", drop_site="H2")[0]
    return root / "original", retrain, round_seconds(RunState.load(root / "retrain"))[1]


def _copy(trained, to):
    shutil.copytree(trained[0], to)
    return to


def _job(run, tmp_path, **params):
    req = ErasureRequest(kind="site", site="H2", method="fedrecover", params=params)
    cfg, state = FLConfig.load(run), RunState.load(run)
    return SiteJob(run, req, cfg, state, state.rounds_of_site("H2"), state.rounds_done, tmp_path / "work",
                   "in-process", lambda stage, msg: None)


def test_fedrecover_erases_a_site_in_less_time_than_a_retrain(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    res = erase(run, ErasureRequest(kind="site", site="H2", method="fedrecover", params=FEW_EXACT), mia_views=1)
    assert res.status in ("completed", "verification-failed")
    removed = ErasureLedger(run / LEDGER).events(res.request_id)["site_removed"]["body"]
    assert removed["method"] == "fedrecover" and removed["rounds"] == ROUNDS and removed["from_round"] == 0
    assert (removed["exact_rounds"], removed["estimated_rounds"]) == (2, ROUNDS - 2)
    assert removed["counts"]["pairs"] >= 1 and removed["params"]["warmup"] == 1  # the final round had a pair
    # two of eight rounds train; the six estimated ones are server arithmetic, counted in the time
    assert 0 < removed["estimate_cpu_s"] < removed["cpu_s"] < trained[2], (removed, trained[2])


def test_with_every_round_exact_fedrecover_is_the_federated_retrain(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    path, _, _, info = SITE_ERASERS["fedrecover"].run(_job(run, tmp_path, warmup=1, correction=1))
    assert (info["exact_rounds"], info["estimated_rounds"]) == (ROUNDS, 0)
    ours, retrain = load_checkpoint(path)["model"], load_checkpoint(trained[1])["model"]
    for k in retrain:
        torch.testing.assert_close(ours[k], retrain[k], rtol=0, atol=0)


def test_dp_budget_and_strategies_it_cannot_replay(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    job = _job(run, tmp_path, warmup=2, correction=3, final=1, max_extra=1)
    # rounds 1, 2, 5, 8 exact (8 is also the final one), plus one extra round allowed: 5 rounds x 2 steps
    assert SITE_ERASERS["fedrecover"].dp_steps(job.cfg, job.state, job.req) == 5 * 2
    for cfg in (replace(job.cfg, strategy="fedavgm"),
                replace(job.cfg, train=replace(job.cfg.train, extra={"dp": {"unit": "site"}}))):
        with pytest.raises(ConfigError, match="federaser or retrain"):
            SITE_ERASERS["fedrecover"].run(replace(job, cfg=cfg))
    # an exact round is configured as the original round it replays (the sites' seeds and patch draws)
    hook = FedRecoverHook(run, RunState.load(run), list(range(1, ROUNDS + 1)), [True] * ROUNDS, ["H1", "H3"],
                          {"buffer": 2})
    hook.pos = 5
    assert hook.as_original_round(lambda server_round, *rest: server_round)(2, None, {}, None) == 6
    shutil.rmtree(run / "updates")
    with pytest.raises(ConfigError, match="stored updates"):
        SITE_ERASERS["fedrecover"].run(job)


@pytest.mark.parametrize("params, needle", [
    ({"nope": 1}, "no parameter.*nope"), ({"warmup": -1}, "warmup"), ({"warmup": 0}, "warmup"),
    ({"correction": 0}, "correction"), ({"final": -2}, "final"), ({"buffer": 1.5}, "buffer"),
    ({"abnormal": 0.5}, "abnormal"), ({"abnormal": "big"}, "abnormal"), ({"max_extra": -1}, "max_extra")])
def test_bad_params_are_refused(params, needle):
    with pytest.raises(ConfigError, match=needle):
        ErasureRequest(kind="site", site="H2", method="fedrecover", params=params)


def test_bad_params_are_refused_before_anything_is_recorded(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    for argv in (["--param", "warmup=-1"], ["--param", "speed=3"], ["--method", "federaser", "--param", "warmup=2"]):
        argv = ["erase", "--run", str(run), "--site", "H2", "--whole-site", "--method", "fedrecover", *argv, "-q"]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "--param" in err and "Traceback" not in err, err
    assert not (run / LEDGER).exists() and not (run / "erasure").exists()
    assert ErasureRequest(kind="site", site="H2", method="retrain").params == {}  # methods without settings
