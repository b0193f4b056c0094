"""The DP guarantee holds (issue: secret noise, the count's true sensitivity, nothing released
unaccounted, the patient as the unit). One test per defect of the audit; each failed before
the fix (noise seeded by the public seed, count booked at half its sensitivity, raw losses and
n in every reply, Flower's public fixed-size site sample, a median guard before clipping, erasure
runs with the same noise and their own ledgers, files as units, a resume that lost a step, an
engine that took any batch)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from privseg.errors import BudgetExceededError, ConfigError
from privseg.models import build_model
from privseg.privacy import (
    BudgetLedger,
    DPConfig,
    NoiseSource,
    PatientDPSGD,
    QuantileClipper,
    SampledBatch,
    StepEvent,
    patient_groups,
)
from privseg.privacy.clipping import COUNT_SENSITIVITY, count_sensitivity, split_noise
from privseg.privacy.noise import KEY_FILE, ReproducibleNoiseWarning
from privseg.train.losses import SegLoss


def _model():
    torch.manual_seed(0)
    return build_model("unet_tiny", in_channels=1, num_classes=2, spatial_dims=2)


def _items(n: int, patients: list[str] | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        img = torch.randn(1, 16, 16, generator=g)
        item = {"image": img, "label": (img > 0).long()}
        if patients is not None:
            item["patient"] = patients[i]
        out.append(item)
    return out


class _Cfg:  # the fields train_steps reads
    patch_size = (16, 16)
    patches_per_subject = 2
    seed = 0
    subjects_per_step = 2


def _release(noise: NoiseSource, items, steps: int = 2, q: float = 0.5, **kw) -> torch.Tensor:
    """The model after ``steps`` DP steps (what the server receives)."""
    model = _model()
    eng = PatientDPSGD(q=q, n_subjects=len(patient_groups(items)), multipliers=[1.0] * steps, clip_norm=1.0,
                       clip_rule="fixed", noise=noise, **kw)
    eng.train_steps(model, torch.optim.SGD(model.parameters(), lr=0.5), items, _Cfg(), 0, steps)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- 1. noise and sampling from a secret key ------------------------------------------------------------

def test_noise_is_secret_fresh_per_key_and_repeats_only_with_the_same_key(tmp_path):
    items = _items(4)
    a = _release(NoiseSource.for_state_dir(tmp_path / "a"), items)
    b = _release(NoiseSource.for_state_dir(tmp_path / "b"), items)  # same seed, same data, another site key
    assert not torch.equal(a, b)  # public config no longer determines the release
    again = _release(NoiseSource.for_state_dir(tmp_path / "a"), items)  # a resume reads the same key
    assert torch.equal(a, again)
    key = tmp_path / "a" / KEY_FILE
    assert len(key.read_bytes()) == 32 and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    # the seed-derived generator the audit used no longer reproduces the noise
    gen = torch.Generator().manual_seed(hash((0, 0, 0x5EED)) % 2**63)
    assert not torch.allclose(NoiseSource.for_state_dir(tmp_path / "a").gaussian("gradient", 0, 100).float(),
                              torch.randn(100, generator=gen))


def test_noise_draws_are_standard_normal_and_uniforms_uniform():
    src = NoiseSource.ephemeral()
    z = src.gaussian("gradient", 3, 200_000)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    u = src.uniform("sample", 3, 100_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert not torch.equal(src.gaussian("gradient", 4, 10), src.gaussian("gradient", 3, 10))


def test_reproducible_noise_warns_and_is_stamped_not_private(tmp_path):
    with pytest.warns(ReproducibleNoiseWarning):
        src = NoiseSource.reproducible(0)
    assert not src.private
    ledger = BudgetLedger(tmp_path / "privacy.sqlite")
    ledger.set_budget("H1", 8.0, 1e-5)
    ledger.commit_round("H1", 1, [StepEvent(0.5, 1.0, 1)], info={"noise": src.kind})
    row = ledger.status()[0]
    assert row["private"] is False and "NOT PRIVATE" in row["guarantee"]
    ledger.set_budget("H2", 8.0, 1e-5)
    ledger.commit_round("H2", 1, [StepEvent(0.5, 1.0, 1)], info={"noise": NoiseSource.ephemeral().kind})
    assert {r["site"]: r["private"] for r in ledger.status()} == {"H1": False, "H2": True}


def test_federated_dp_run_keeps_the_key_at_the_site_and_out_of_every_other_file(tmp_path):
    from conftest import make_tiny_cohort
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.simulation import simulate_inprocess
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=3, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    dp = DPConfig(epsilon=8.0, delta=1e-3, clip="fixed", sampling_rate=0.5)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=2, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                     steps=1)
    run = tmp_path / "run"
    state = simulate_inprocess(FLConfig(name="k", sites=sites, train=tc, rounds=1, local_steps=1, eval_every=1,
                                        privacy=dp), run)
    assert state.status == "finished"
    keys = {p.parent.name: p.read_bytes() for p in run.glob("sites/*/" + KEY_FILE)}
    assert sorted(keys) == ["H1", "H2"] and keys["H1"] != keys["H2"]
    for path in run.rglob("*"):
        if path.is_file() and path.name != KEY_FILE:
            blob = path.read_bytes()
            assert not any(k in blob or k.hex().encode() in blob for k in keys.values()), path
    # 2. what each site told the server: only accounted figures, n withheld
    for site, metrics in state.rounds[-1]["train"].items():
        assert metrics["num-examples"] == 1, site
        assert not {"train-loss", "train-loss-last", "compute-s", "load-s"} & set(metrics), metrics
        assert metrics["dp-epsilon"] > 0
    status = BudgetLedger(run / "sites" / "H1" / "privacy.sqlite").status()[0]
    assert status["private"] is True


# -- 2. nothing unaccounted ----------------------------------------------------------------------------

def test_dp_run_refuses_evaluation_on_training_patients(tiny_cohort):
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.train import TrainConfig

    sites = sites_from_cohort(tiny_cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", in_channels=len(info["channels"]), num_classes=len(info["classes"]))
    with pytest.raises(ConfigError, match="eval-split"):
        FLConfig(name="x", sites=sites, train=tc, eval_split="train", privacy=DPConfig())
    FLConfig(name="x", sites=sites, train=tc, eval_split="test", privacy=DPConfig())
    FLConfig(name="x", sites=sites, train=TrainConfig(model="unet_tiny"), eval_split="train")  # no DP: allowed


# -- 3. the adaptive count's sensitivity ------------------------------------------------------------------

def test_released_count_has_the_sensitivity_the_accountant_books():
    rng = np.random.default_rng(0)
    clipper = QuantileClipper(clip=1.0, target_quantile=0.5, lr=0.2, expected_m=10, sigma_b=3.0)
    worst = 0.0
    for _ in range(50):
        norms = list(rng.lognormal(0, 0.7, size=int(rng.integers(0, 12))))
        worst = max(worst, count_sensitivity(clipper, norms, candidates=[0.1, 1.0, 5.0]))
    assert worst == pytest.approx(COUNT_SENSITIVITY)
    # booked z: the update at z_delta and the count at sigma_b / sensitivity compose to exactly z
    z, sigma_b = 1.2, 3.0
    z_delta = split_noise(z, sigma_b)
    assert (z_delta ** -2 + (sigma_b / worst) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    # the noiseless estimate is the fraction unclipped
    frac = clipper.update([0.5, 0.5, 2.0, 2.0], draw=0.0)
    assert frac == pytest.approx((4 * 0.5 - 2) / 10 + 0.5)


# -- 5. client-level DP: the sampling that is booked happens --------------------------------------------

def test_client_dp_samples_sites_by_poisson_at_the_booked_rate(tmp_path):
    from privseg.privacy.client_dp import ClientLevelDP

    hooks = ClientLevelDP(n_sites=10, fraction=0.1, clip="fixed", noise_multiplier=1.0, delta=1e-2,
                          noise=NoiseSource.ephemeral())
    sizes = [len(hooks.select(r, list(range(100, 110)))) for r in range(2000)]
    assert abs(np.mean(sizes) - 1.0) < 0.1  # q * n, not Flower's max(floor(n f), min_sites) = 2
    assert 0 in sizes and max(sizes) >= 3


def test_guard_compares_sites_only_without_client_dp():
    from privseg.federated.guard import attach_guard
    from privseg.federated.strategies import build_strategy

    plain = build_strategy("fedavg", min_sites=1)
    assert attach_guard(plain).cross_site is True
    private = build_strategy("fedavg", min_sites=1)
    private.client_dp = object()
    assert attach_guard(private).cross_site is False


# -- 6. the patient is the unit ------------------------------------------------------------------------

def test_a_patient_with_several_scans_is_one_unit():
    items = _items(5, patients=["P1", "P1", "P1", "P2", "P3"])
    assert patient_groups(items) == [[0, 1, 2], [3], [4]]
    eng = PatientDPSGD(q=0.5, n_subjects=3, multipliers=[1.0] * 50, clip_rule="fixed", clip_norm=1.0)
    from privseg.data.transforms import PatchSampler

    sampler = PatchSampler((16, 16), 2)
    for step in range(30):
        batch = eng.sample(items, sampler, step)
        if batch.owner is not None:
            per = torch.bincount(batch.owner)
            assert len(per) == batch.patients  # one gradient (one clip) per patient
            # P1's three scans come together or not at all
            assert all(c in (2, 6) for c in per.tolist())  # P1: 3 scans x 2 patches, never split
    with pytest.raises(ConfigError, match="site has 3"):
        PatientDPSGD(q=0.5, n_subjects=5, multipliers=[1.0]).sample(items, sampler, 0)


# -- 8. central training books every step across a resume -----------------------------------------------

def test_central_resume_books_every_step(tiny_cohort, tmp_path):
    from dataclasses import replace

    from privseg.privacy import train_private
    from privseg.train import TrainConfig

    dp = DPConfig(epsilon=50.0, delta=1e-2, clip="fixed", sampling_rate=0.5, noise_multiplier=1.0,
                  allow_large_delta=True)
    cfg = TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", steps=4, patch_size=(16, 16, 16),
                                 subjects_per_step=1, patches_per_subject=2, device="cpu")
    cfg = replace(cfg, checkpoint_every=3)
    train_private(tiny_cohort, cfg, dp, tmp_path / "c")  # stops at step 4
    train_private(tiny_cohort, replace(cfg, steps=8), dp, tmp_path / "c")  # resumes 4 -> 8
    ledger = BudgetLedger(tmp_path / "c" / "privacy.sqlite")
    assert sum(e.steps for e in ledger.events("central")) == 8
    with pytest.raises(BudgetExceededError, match="fresh start"):
        train_private(tiny_cohort, replace(cfg, steps=8), dp, tmp_path / "c", resume=False)


# -- 9. the engine only takes the batches it sampled -------------------------------------------------------

def test_engine_refuses_batches_it_did_not_sample():
    model = _model()
    eng = PatientDPSGD(q=0.5, n_subjects=4, multipliers=[1.0] * 4, clip_rule="fixed")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, owner = torch.randn(4, 1, 16, 16), torch.zeros(4, 1, 16, 16, dtype=torch.long), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ConfigError, match="Poisson"):
        eng(model, opt, SegLoss(), x, y, owner)  # the old fixed-batch step_fn use
    other = PatientDPSGD(q=0.5, n_subjects=4, multipliers=[1.0] * 4, clip_rule="fixed")
    forged = SampledBatch(id(other), 0, x, y, owner, 2)
    with pytest.raises(ConfigError, match="sampled"):
        eng.step(model, opt, SegLoss(), forged)
    from privseg.train.loop import train_steps

    with pytest.raises(ConfigError):
        train_steps(model, opt, _items(4), _Cfg(), start=0, stop=1, step_fn=eng)


def test_key_file_damage_is_named(tmp_path):
    (tmp_path / KEY_FILE).write_bytes(b"short")
    from privseg.errors import DataError

    with pytest.raises(DataError, match="damaged"):
        NoiseSource.for_state_dir(tmp_path)


def test_ledger_from_before_scopes_migrates(tmp_path):
    import sqlite3

    path = tmp_path / "privacy.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
    CREATE TABLE budgets (site TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL, updated REAL NOT NULL);
    CREATE TABLE plans (site TEXT PRIMARY KEY, plan TEXT NOT NULL);
    CREATE TABLE rounds (site TEXT NOT NULL, round INTEGER NOT NULL, events TEXT NOT NULL, epsilon REAL NOT NULL,
                         delta REAL NOT NULL, time REAL NOT NULL, info TEXT, PRIMARY KEY (site, round));
    INSERT INTO budgets VALUES ('H1', 8.0, 1e-5, 0);
    """)
    con.execute("INSERT INTO rounds VALUES ('H1', 1, ?, 1.0, 1e-5, 0, '{}')",
                (json.dumps([{"q": 0.5, "sigma": 1.0, "steps": 3}]),))
    con.commit()
    con.close()
    ledger = BudgetLedger(path)
    assert ledger.rounds("H1")[0]["scope"] == "" and ledger.rounds("H1")[0]["steps"] == 3
    assert ledger.status()[0]["private"] is False  # booked before secret noise: not claimed private
    ledger.commit_round("H1", 1, [StepEvent(0.5, 1.0, 1)], scope="erasure/x/retrain")
    assert sum(e.steps for e in ledger.events("H1")) == 4  # a derived run's round adds, never replaces



# -- 4. erasure runs: fresh keys, spend in the site's own ledger -------------------------------------------

def test_derived_run_gets_fresh_keys_and_books_into_the_sites_ledger(tmp_path):
    from conftest import make_tiny_cohort
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.retrain import federated_retrain
    from privseg.federated.simulation import simulate_inprocess
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=3, size=16)
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    dp = DPConfig(epsilon=200.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.0)
    tc = TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                     patches_per_subject=2, in_channels=len(info["channels"]), num_classes=len(info["classes"]),
                     steps=2)
    run = tmp_path / "run"
    simulate_inprocess(FLConfig(name="d", sites=sites, train=tc, rounds=2, local_steps=1, eval_every=0, privacy=dp),
                       run)
    ledger = BudgetLedger(run / "sites" / "H1" / "privacy.sqlite")
    before = ledger.spent("H1")
    sub = run / "erasure" / "req" / "retrain"
    federated_retrain(run, sub, drop_site="H2", from_round=0, rounds=2)
    scopes = {r["scope"] for r in ledger.rounds("H1")}
    assert scopes == {"", "erasure/req/retrain"}
    assert ledger.spent("H1") > before  # the retrain's releases count for the site
    assert not (sub / "sites" / "H1" / "privacy.sqlite").exists()  # no ledger nobody reads
    assert (sub / "sites" / "H1" / KEY_FILE).read_bytes() != (run / "sites" / "H1" / KEY_FILE).read_bytes()


def test_erasing_one_scan_erases_the_whole_patient(tmp_path):
    from dataclasses import replace as dc_replace

    from conftest import make_tiny_cohort
    from privseg.erasure import ErasureRequest, whole_patients
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.train import TrainConfig

    cohort = make_tiny_cohort(tmp_path / "c", sites=2, per_site=4, size=16)
    a, b = cohort.select("train", "H1")[:2]
    subjects = [dc_replace(s, patient_id="PX", split=a.split) if s.id in (a.id, b.id) else s
                for s in cohort.subjects]
    cohort.with_subjects(subjects).save()
    sites = sites_from_cohort(cohort.root)
    info = check_sites(sites)
    cfg = FLConfig(name="p", sites=sites, train=TrainConfig(model="unet_tiny", in_channels=len(info["channels"]),
                                                             num_classes=len(info["classes"])))
    req = whole_patients(cfg, ErasureRequest(kind="patient", site="H1", subjects=(a.id,)))
    assert set(req.subjects) == {a.id, b.id}
    by_patient = whole_patients(cfg, ErasureRequest(kind="patient", site="H1", subjects=("PX",)))
    assert set(by_patient.subjects) == {a.id, b.id}
    assert by_patient.request_id("p") == req.request_id("p")  # the same patient: the same request


def test_gaussian_noise_is_the_textbook_box_muller_of_the_chacha20_stream_bit_for_bit():
    """The fast path draws exactly what the plain formula draws from the same keystream, so a run
    resumed on either draws the same noise (a repeated round releases the same output)."""
    import hashlib
    import hmac
    import math
    import warnings

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from privseg.privacy.noise import NoiseSource

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = NoiseSource.reproducible(3)

    def textbook(purpose: str, index: int, size: int) -> torch.Tensor:
        nonce = b"\0\0\0\0" + hmac.new(ns.key, f"{purpose}:{index}".encode(), hashlib.sha256).digest()[:12]
        half = (size + 1) // 2
        stream = Cipher(algorithms.ChaCha20(ns.key, nonce), mode=None).encryptor().update(bytes(16 * half))
        words = np.frombuffer(stream, dtype="<u8")
        u = torch.from_numpy(((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53)
        r, a = torch.sqrt(-2.0 * torch.log(u[:half])), 2.0 * math.pi * u[half:]
        return torch.cat([r * torch.cos(a), r * torch.sin(a)])[:size]

    for size in (1, 2, 7, 4096, 100_001):
        assert torch.equal(ns.gaussian("gradient", 5, size), textbook("gradient", 5, size)), size
    assert ns.uniform("u", 1, 3).dtype == np.float64 and ns.integer("i", 1, 10) in range(10)


# == the guarantee at every edge (issue 25) =============================================================
# Each failed on the code before it: a draw's nonce was (purpose, step) whatever the inputs, ledger rows
# were INSERT OR REPLACE, client-level DP wrote who took part into every checkpoint and state.json.

def _private_site(tmp_path, items, z: float = 5.0, eps: float = 1e4):
    from privseg.privacy import make_private

    dp = DPConfig(epsilon=eps, delta=1e-3, clip="fixed", noise_multiplier=z, sampling_rate=1.0,
                  allow_large_delta=True)
    return make_private(dp, site="H1", items=items, ledger=BudgetLedger(tmp_path / "privacy.sqlite"),
                        noise=NoiseSource.for_state_dir(tmp_path), subjects_per_step=2, total_steps=4)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def _update(private, w0: dict, round_no: int = 1, start: int = 0, stop: int = 2) -> torch.Tensor:
    """What the server learns from one release: the change of the model (SGD, so noise enters linearly)."""
    model = _model()
    model.load_state_dict(w0)
    before = _flat(model)
    private.train_round(model, torch.optim.SGD(model.parameters(), lr=1.0), _items(4), _Cfg(), round_no, start, stop)
    return _flat(model) - before


def test_a_round_resent_with_another_model_draws_fresh_noise(tmp_path):
    """The server re-sends round 1 with another model: with the old nonce (purpose, step) the two
    updates carried the same noise, and their difference left only the clipped sums (norm <= 2 C
    steps / B); noise bound to the inputs leaves a difference as large as the noise."""
    private = _private_site(tmp_path, _items(4))
    w0 = _model().state_dict()
    w1 = {k: v + 1e-3 for k, v in w0.items()}
    diff = _update(private, w0) - _update(private, w1)
    signal_bound = 2 * 1.0 * 2 * 2 / 2.0  # 2 releases x clip C=1 x 2 steps x 2 patients / expected batch 2
    assert float(diff.norm()) > 20 * signal_bound  # the noise (z=5, ~1e4 parameters) did not cancel
    rows = private.ledger.rounds("H1")
    assert len(rows) == 2 and rows[0]["release"] != rows[1]["release"]  # two releases, both paid for


def test_a_resume_with_other_local_steps_never_reuses_an_index(tmp_path):
    """Round 2 at 2 local steps draws indices 2-3; resumed at 3 local steps its round 2 draws 3-5:
    the old nonce gave index 3 the same noise in both."""
    private = _private_site(tmp_path, _items(4))
    w0 = _model().state_dict()
    a = private.site_noise.bound(private.release_id(_model(), None, _items(4), _Cfg(), 2, 2, 4))
    b = private.site_noise.bound(private.release_id(_model(), None, _items(4), _Cfg(), 2, 3, 6))
    ga, gb = a.gaussian("gradient", 3, 50_000), b.gaussian("gradient", 3, 50_000)
    assert abs(float(torch.corrcoef(torch.stack([ga, gb]))[0, 1])) < 0.05
    du = _update(private, w0, 2, 2, 4) - _update(private, w0, 2, 3, 5)
    assert float(du.norm()) > 20.0


def test_an_identical_request_is_the_same_release_booked_once(tmp_path):
    private = _private_site(tmp_path, _items(4))
    w0 = _model().state_dict()
    first, again = _update(private, w0), _update(private, w0)
    assert torch.equal(first, again)  # bound noise repeats only for identical inputs: the same output
    assert len(private.ledger.rounds("H1")) == 1


def test_federated_resume_with_other_local_steps_or_budget_is_refused(tiny_cohort, tmp_path):
    from privseg.federated import FLConfig, check_sites, sites_from_cohort
    from privseg.federated.simulation import prepare_run
    from privseg.train import TrainConfig

    sites = sites_from_cohort(tiny_cohort.root)
    info = check_sites(sites)
    tc = TrainConfig(model="unet_tiny", in_channels=len(info["channels"]), num_classes=len(info["classes"]))
    cfg = FLConfig(name="r", sites=sites, train=tc, local_steps=2, privacy=DPConfig(epsilon=8.0, delta=1e-3))
    prepare_run(cfg, tmp_path / "run")
    other = FLConfig(name="r", sites=sites, train=tc, local_steps=3, privacy=DPConfig(epsilon=8.0, delta=1e-3))
    with pytest.raises(ConfigError, match="local_steps: 2 -> 3"):
        prepare_run(other, tmp_path / "run")
    richer = FLConfig(name="r", sites=sites, train=tc, local_steps=2, privacy=DPConfig(epsilon=300.0, delta=1e-3))
    with pytest.raises(ConfigError, match="privacy.epsilon: 8.0 -> 300.0.*privseg privacy budget"):
        prepare_run(richer, tmp_path / "run")


def test_the_server_budget_is_the_ledgers_on_resume(tmp_path):
    from privseg.privacy.client_dp import SERVER, ClientLevelDP

    ledger = BudgetLedger(tmp_path / "privacy.sqlite")
    ClientLevelDP(n_sites=4, fraction=0.5, clip="fixed", epsilon=30.0, rounds=5, delta=1e-2, ledger=ledger)
    hooks = ClientLevelDP(n_sites=4, fraction=0.5, clip="fixed", epsilon=300.0, rounds=5, delta=1e-2, ledger=ledger)
    assert ledger.budget(SERVER)[0] == 30.0 and hooks.epsilon_budget == 30.0  # was silently reset to 300


def test_ledger_rows_are_append_only_and_an_edit_is_detected(tmp_path):
    import sqlite3

    path = tmp_path / "privacy.sqlite"
    ledger = BudgetLedger(path)
    ledger.set_budget("H1", 20.0, 1e-5)
    ev = [StepEvent(0.5, 1.0, 10)]
    ledger.commit_round("H1", 1, ev, release="a")
    spent_one = ledger.spent("H1")
    # a derived run recreated in the same folder books its round 1 again: a new row, never a replacement
    ledger.commit_round("H1", 1, ev, scope="retrain", release="b")
    ledger.commit_round("H1", 1, ev, scope="retrain", release="c")
    assert len(ledger.rounds("H1")) == 3 and ledger.spent("H1") > spent_one
    assert ledger.verify() == [] and ledger.status()[0]["intact"] is True
    con = sqlite3.connect(path)
    for sql in ("UPDATE releases SET events='[]' WHERE seq=2", "DELETE FROM releases WHERE seq=2"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)
    con.execute("DROP TRIGGER releases_no_update")  # someone edits the file by hand
    con.execute("UPDATE releases SET events='[]' WHERE seq=2")
    con.commit()
    con.close()
    problems = BudgetLedger(path).verify()
    assert problems and "releases row 2" in problems[0]
    row = BudgetLedger(path).status()[0]
    assert row["intact"] is False and row["private"] is False and "TAMPERED" in row["guarantee"]


def test_a_budget_change_is_recorded(tmp_path):
    from privseg.privacy.budget import change_budget

    ledger = BudgetLedger(tmp_path / "privacy.sqlite")
    ledger.set_budget("H1", 8.0, 1e-5)
    change_budget(tmp_path, "H1", 12.0)
    history = ledger.budget_history("H1")
    assert [h["epsilon"] for h in history] == [8.0, 12.0] and "privseg privacy budget" in history[-1]["reason"]
    assert ledger.verify() == []


def _tiny_federation(root, n_sites: int, per_site: int):
    """Sites of a tiny embedded cohort and a 2-step training config that fits them."""
    from conftest import make_tiny_cohort
    from privseg.federated import check_sites, sites_from_cohort
    from privseg.train import TrainConfig

    sites = sites_from_cohort(make_tiny_cohort(root, sites=n_sites, per_site=per_site, size=16).root)
    info = check_sites(sites)
    return sites, TrainConfig(model="unet_tiny", patch_size=(16, 16, 16), device="cpu", subjects_per_step=1,
                              patches_per_subject=1, in_channels=len(info["channels"]),
                              num_classes=len(info["classes"]), steps=2)


def test_client_dp_keeps_who_took_part_on_the_server(tmp_path):
    from privseg.federated import FLConfig
    from privseg.federated.runstate import PARTICIPATION_FILE, RunState
    from privseg.federated.simulation import simulate_inprocess
    from privseg.train.checkpoint import load_checkpoint

    sites, tc = _tiny_federation(tmp_path / "c", n_sites=3, per_site=2)
    dp = DPConfig(unit="site", epsilon=50.0, delta=1e-2, clip="fixed", allow_large_delta=True)
    run = tmp_path / "run"
    state = simulate_inprocess(FLConfig(name="c", sites=sites, train=tc, rounds=2, local_steps=1, eval_every=0,
                                        fraction=0.5, min_sites=1, privacy=dp), run)
    assert state.status == "finished"
    for e in RunState.load(run).rounds:
        assert e["participants"] == [] and "train" not in e and "train_s" not in e
        assert not any(site in json.dumps(e) for site in ("H1", "H2", "H3")), e
    for ckpt in run.glob("checkpoints/*.pt"):
        assert load_checkpoint(ckpt)["extra"]["federated"]["participants"] == []
    secret = run / PARTICIPATION_FILE
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    took_part = [json.loads(line)["participants"] for line in secret.read_text().splitlines()]
    assert len(took_part) == 2
    # what the server needs (an erasure of a site) still reads it
    assert RunState.load(run).rounds_of_site("H1") == [i + 1 for i, p in enumerate(took_part) if "H1" in p]


def test_a_dp_sites_error_reaches_the_server_as_its_class_and_site_only(tiny_cohort, tmp_path):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privseg.errors import SiteFailure
    from privseg.federated import sites_from_cohort
    from privseg.federated.client_app import make_client_app
    from privseg.federated.dp_mod import SITE_ERROR_LOG

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as Flower sets them in an app
    sites = sites_from_cohort(tiny_cohort.root)
    secret = "-4.2"  # stands for any figure an error message may quote
    config = ConfigRecord({"server-round": 1, "train-config": json.dumps({"lr": float(secret)}),
                           **DPConfig().to_run_config()})
    msg = Message(RecordDict({"config": config}), dst_node_id=0, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(SiteFailure) as err:  # the ClientApp's mod withholds the text
        make_client_app(sites, tmp_path)(msg, ctx)
    assert SiteFailure.site_in(str(err.value)) == sites[0].id and "ConfigError" in str(err.value)
    assert secret not in str(err.value) and "withheld" in str(err.value)
    assert secret in (tmp_path / "sites" / sites[0].id / SITE_ERROR_LOG).read_text()  # the site keeps it


def test_a_dp_reply_leaves_at_the_deadline_whatever_was_sampled(tmp_path):
    import time

    from privseg.privacy.releases import PAD_MARGIN, ReplyPacer

    pacer = ReplyPacer(tmp_path)
    slow = time.perf_counter()
    time.sleep(0.2)  # a round with many patients sampled
    assert pacer.pad(slow, steps=2) == 0.0 and pacer.per_step() == pytest.approx(PAD_MARGIN * 0.1, rel=0.2)
    fast = time.perf_counter()  # a round that sampled nobody
    waited = pacer.pad(fast, steps=2)
    took = time.perf_counter() - fast
    assert waited > 0.15 and took == pytest.approx(2 * pacer.per_step(), rel=0.1)


def test_a_dp_erasure_certificate_withholds_statistics_of_training_patients(tmp_path):
    """The certificate of an erasure from a DP run: no retain Dice or retain counts (figures of
    training patients no ledger books); its utility check is on held-out patients."""
    from conftest import LOOSE, tiny_dp_run
    from privseg.audit.certificate import render_html, summarise
    from privseg.audit.ledger import ErasureLedger
    from privseg.erasure import LEDGER, ErasureRequest, erase

    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    cohort, run = tiny_dp_run(tmp_path, dp)
    patient = cohort.select("train", "H1")[0].id
    res = erase(run, ErasureRequest(kind="patient", site="H1", subjects=(patient,), reason="GDPR art. 17",
                                    thresholds=LOOSE, repair_rounds=0))
    entries = ErasureLedger(run / LEDGER).entries(res.request_id)
    text = json.dumps([e["body"] for e in entries])
    for key in ('"retain_dice":', '"retain_n":', '"retain_subjects_at_site":', '"retain_patients_at_site":'):
        assert key not in text, key
    check = res.verification["checks"]["retain_dice_ratio"]
    assert check["ok"] is None and check["result"] == "withheld"
    assert "withheld (DP)" in render_html(summarise(entries), True, [], str(run / LEDGER))


def test_central_dp_runs_refuse_non_private_references_and_unlearning(tiny_cohort, tmp_path):
    from dataclasses import replace

    from privseg.audit.reference import ensure_references
    from privseg.privacy import train_private
    from privseg.train import TrainConfig
    from privseg.unlearn.engine import check_request

    dp = DPConfig(epsilon=50.0, delta=1e-2, clip="fixed", sampling_rate=0.5, noise_multiplier=1.0,
                  allow_large_delta=True)
    cfg = replace(TrainConfig.for_cohort(tiny_cohort, model="unet_tiny", steps=2, patch_size=(16, 16, 16),
                                         subjects_per_step=1, patches_per_subject=1, device="cpu"), checkpoint_every=2)
    train_private(tiny_cohort, cfg, dp, tmp_path / "c")
    with pytest.raises(ConfigError, match="central patient-level DP.*reference models"):
        ensure_references(tmp_path / "c", n=2, cohort=tiny_cohort)
    assert not (tmp_path / "c" / "references").exists()
    patient = tiny_cohort.select("train")[0].id
    with pytest.raises(ConfigError, match="central patient-level DP.*unlearning"):
        check_request(tmp_path / "c" / "last.pt", tiny_cohort, [patient], "scrub", "zero")


def test_site_erasure_keeps_the_sites_ledger_and_closes_it(tmp_path):
    from conftest import LOOSE, tiny_dp_run
    from privseg.erasure import ErasureRequest, erase

    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    _, run = tiny_dp_run(tmp_path, dp)
    spent = BudgetLedger(run / "sites" / "H2" / "privacy.sqlite").spent("H2")
    res = erase(run, ErasureRequest(kind="site", site="H2", reason="left the federation", thresholds=LOOSE,
                                    method="retrain"))
    assert res.status == "completed"
    ledger = BudgetLedger(run / "sites" / "H2" / "privacy.sqlite")
    assert ledger.spent("H2") == pytest.approx(spent) and ledger.verify() == []
    assert "erased" in (ledger.closed("H2") or "")
    assert sorted(p.name for p in (run / "sites" / "H2").iterdir() if not p.name.startswith("privacy.sqlite")) == []


def test_a_dp_federation_serves_the_weight_average_and_trains_on_the_iterate(tmp_path):
    """Under DP with ``ema`` the global checkpoint serves the average of the released models
    (post-processing) and keeps the iterate the next round starts from; a resume continues both."""
    from conftest import tiny_dp_run
    from privseg.federated.runstate import RunState
    from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint, training_weights
    from privseg.train.ema import WeightEMA, load_ema

    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5, ema=0.9)
    _, run = tiny_dp_run(tmp_path, dp, rounds=2)
    state = RunState.load(run)
    payloads = [load_checkpoint(state.checkpoint_path(r)) for r in range(3)]
    model = model_from_checkpoint(payloads[0], state.checkpoint_path(0))
    ema = WeightEMA(model, 0.9)
    for p in payloads[1:]:
        model.load_state_dict(training_weights(p))
        ema.update(model, 1)  # one local step per round
    served = payloads[-1]["model"]
    assert all(torch.equal(served[k], v) for k, v in ema.state_dict(model).items())
    assert not all(torch.equal(served[k], payloads[-1]["train_model"][k]) for k in served)
    assert load_ema(payloads[-1], model).updates == 2


def test_append_line_writes_one_fsynced_json_line_per_record(tmp_path, monkeypatch):
    """The one append the site's release record and the server's participation file use
    (privseg.utils.append_line): created 0600, a JSON line per record, each on disk (fsync'd)
    before the call returns."""
    from privseg import utils

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(utils.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "private" / "log.jsonl"
    utils.append_line(path, {"b": 1, "a": np.float32(0.5)}, default=float)
    utils.append_line(path, {"b": 2, "a": tmp_path}, sort_keys=True, default=str)
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"b": 1, "a": 0.5}, {"a": str(tmp_path), "b": 2}]
    assert lines[1].startswith('{"a"') and len(synced) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_dp_site_answers_an_identical_request_with_its_stored_reply(tmp_path):
    """The ClientApp under patient DP: the same round request twice gets the stored reply bit for
    bit and books once; the same round with another model is a new release with fresh noise."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from privseg.federated import FLConfig
    from privseg.federated.client_app import client_train
    from privseg.federated.server_app import client_run_config
    from privseg.federated.strategies import state_to_arrays
    from privseg.privacy.releases import RECORD_FILE

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    sites, tc = _tiny_federation(tmp_path / "c", n_sites=1, per_site=4)
    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5, aug_mult=1)
    cfg = FLConfig(name="s", sites=sites, train=tc, rounds=2, local_steps=1, privacy=dp)
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = tc.build_model()

    def request(state) -> Message:
        config = ConfigRecord({**client_run_config(cfg, run), "server-round": 1})
        return Message(RecordDict({"arrays": state_to_arrays(state), "config": config}), dst_node_id=0,
                       message_type="train")

    def weights(reply) -> dict:
        arrays: ArrayRecord = reply.content["arrays"]
        return {k: arrays[k].numpy().copy() for k in arrays.keys()}

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    first = weights(client_train(request(model.state_dict()), ctx, sites, run))
    again = weights(client_train(request(model.state_dict()), ctx, sites, run))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    site_dir = run / "sites" / sites[0].id
    assert len((site_dir / RECORD_FILE).read_text().splitlines()) == 1
    ledger = BudgetLedger(site_dir / "privacy.sqlite")
    assert len(ledger.rounds(sites[0].id)) == 1
    other = {k: v + 1e-3 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    moved = weights(client_train(request(other), ctx, sites, run))
    assert len(ledger.rounds(sites[0].id)) == 2 and len((site_dir / RECORD_FILE).read_text().splitlines()) == 2
    # fresh noise: the update's direction (AdamW: about the sign of the noised gradient) is redrawn, where
    # reused noise would keep nearly every sign for inputs 1e-3 apart
    keys = [k for k in first if first[k].dtype.kind == "f" and first[k].size > 100]
    u1 = np.concatenate([(first[k] - model.state_dict()[k].numpy()).ravel() for k in keys])
    u2 = np.concatenate([(moved[k] - other[k].numpy()).ravel() for k in keys])
    assert float(np.mean(np.sign(u1) != np.sign(u2))) > 0.2
