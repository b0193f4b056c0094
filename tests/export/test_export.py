"""Exporting the model a run serves (issue 28): a MONAI bundle that MONAI's own runner executes, a
TorchScript file and an ONNX file run by onnxruntime, each reproducing `privseg predict` on held-out
images; a model card whose privacy figures are the ledgers'; `export verify`; and the bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_cohort
from privseg.audit.ledger import ErasureLedger
from privseg.cli import main as cli_main
from privseg.data.cohort import Cohort
from privseg.data.formats import read_cohort
from privseg.errors import CheckpointError, ConfigError, DataError
from privseg.export import export_model, predict_export, verify_export
from privseg.train import TrainConfig, Trainer
from privseg.train.inference import predict_subject

AGREE = 0.999  # the bar: labels identical on >= 99.9 % of voxels


def _train(cohort: Cohort, out: Path, patch: tuple[int, ...], spacing=None) -> Path:
    cfg = TrainConfig.for_cohort(cohort, model="unet_tiny", patch_size=patch, steps=6, device="cpu",
                                 subjects_per_step=2, patches_per_subject=1, lr=5e-3, spacing=spacing)
    Trainer(cohort, cfg, out).fit()
    return out


@pytest.fixture(scope="module")
def run3d(tmp_path_factory) -> tuple[Cohort, Path]:
    """A tiny 3D run whose volumes are stored LPS (so the bundle must reorient) and trained resampled
    to another spacing (so it must resample, and map the prediction back)."""
    root = tmp_path_factory.mktemp("export3d")
    cohort = make_tiny_cohort(root / "tiny", size=20)
    lps = np.diag([-1.5, -1.5, 2.0, 1.0])
    for s in cohort.subjects:
        for f in (*s.images, s.label):
            img = nib.load(f)
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), lps), f)
    return cohort, _train(cohort, root / "run", (16, 16, 16), spacing=(2.0, 2.0, 2.5))


def monai_runner(bundle: Path, images: Path, out: Path) -> None:
    """The command the README gives, as a user runs it: MONAI's runner, from the bundle's folder."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--bundle_root", str(bundle), "--dataset_dir", str(images), "--output_dir", str(out)]
    r = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def same_nifti(a: Path, b: Path) -> float:
    """Share of identical labels; the shape and affine must be identical."""
    x, y = nib.load(str(a)), nib.load(str(b))
    assert x.shape == y.shape, (a, b)
    np.testing.assert_allclose(x.affine, y.affine, atol=1e-6)
    return float((np.asarray(x.dataobj) == np.asarray(y.dataobj)).mean())


@pytest.mark.slow  # MONAI's runner in a subprocess
def test_3d_bundle_torchscript_and_onnx_reproduce_predict(run3d, tmp_path):
    cohort, run = run3d
    held = cohort.select("test")
    assert held
    images = tmp_path / "images"
    images.mkdir()
    for s in held:  # the clinic's folder: one held-out volume per case
        shutil.copy(s.images[0], images / f"{s.id}.nii.gz")
        predict_subject(run / "last.pt", cohort, s.id, tmp_path / f"ref_{s.id}.nii.gz")

    bundle = tmp_path / "bundle"
    assert cli_main(["export", str(run), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "models/model.ts", "docs/README.md", "docs/model_card.html"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "core"}
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1 and "privacy" in meta
    assert meta["preprocessing"]["sliding_window"]["roi_size"] == [16, 16, 16]
    card = (bundle / "docs/README.md").read_text()
    assert card.splitlines()[0].startswith("**NOT PRIVATE: trained without differential privacy")
    assert "Dice organ" in card and "| H1 |" in card

    monai_runner(bundle, images, tmp_path / "runner")
    # MONAI's own checks of a bundle: the inference workflow's required properties, the network's shapes
    from monai.bundle import ConfigWorkflow, verify_net_in_out

    wf = ConfigWorkflow(config_file=str(bundle / "configs/inference.json"), workflow_type="inference",
                        logging_file=False,  # the bundle's logging.conf would reconfigure this test process
                        bundle_root=str(bundle), dataset_dir=str(images), output_dir=str(tmp_path / "wf"))
    wf.initialize()
    assert wf.check_properties() == []
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                      config_file=str(bundle / "configs/inference.json"), bundle_root=str(bundle), n=2, any=4)
    for fmt in ("torchscript", "onnx"):
        export_model(run, fmt, tmp_path / fmt, evaluate=False)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "torchscript" / "model.ts").is_file()
    for s in held:
        ref = tmp_path / f"ref_{s.id}.nii.gz"
        assert same_nifti(ref, tmp_path / "runner" / f"{s.id}_seg.nii.gz") >= AGREE
        for fmt in ("torchscript", "onnx"):  # onnxruntime (CPU) and TorchScript in privseg's sliding window
            got = predict_export(tmp_path / fmt, [images / f"{s.id}.nii.gz"], tmp_path / f"{fmt}_{s.id}.nii.gz")
            assert same_nifti(ref, got) >= AGREE
        assert cli_main(["predict", "--bundle", str(bundle), "--image", str(images / f"{s.id}.nii.gz"),
                         "--out", str(tmp_path / f"b_{s.id}.nii.gz")]) == 0
        assert same_nifti(ref, tmp_path / f"b_{s.id}.nii.gz") >= AGREE
    # the runner's labels are not all background: the comparison means something
    assert any(np.asarray(nib.load(str(tmp_path / "runner" / f"{s.id}_seg.nii.gz")).dataobj).any() for s in held)
    assert verify_export(bundle)["ok"] and cli_main(["export", "verify", str(bundle)]) == 0


def _disc_cohort(root: Path) -> Cohort:
    """RGB photographs (24 x 20: not square, so a transposed read would show) with 0/255 masks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :20]
    for k in range(6):
        cy, cx, r = rng.uniform(8, 16), rng.uniform(7, 13), rng.uniform(4, 7)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        img = (rng.normal(60, 10, (24, 20, 3)) + disc[..., None] * np.array([120, 40, 20])).clip(0, 255)
        for sub, arr in (("images", img.astype(np.uint8)), ("masks", (disc * 255).astype(np.uint8))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / f"case{k}.png")
    return read_cohort(root)


@pytest.mark.slow  # MONAI's runner in a subprocess
def test_2d_bundle_writes_the_masks_predict_writes(tmp_path):
    cohort = _disc_cohort(tmp_path / "derm")
    run = _train(cohort, tmp_path / "run", (16, 16))
    held = cohort.select("test")
    assert held and cohort.info["label_map"] == {255: 1}
    bundle = tmp_path / "bundle"
    export_model(run, "monai-bundle", bundle)
    images = tmp_path / "images"
    images.mkdir()
    for s in held:
        shutil.copy(s.images[0], images / f"{s.id}.png")
        predict_subject(run / "last.pt", cohort, s.id, tmp_path / f"ref_{s.id}.png")
    monai_runner(bundle, images, tmp_path / "runner")
    for fmt in ("torchscript", "onnx"):
        export_model(run, fmt, tmp_path / fmt, evaluate=False)
    for s in held:
        ref = np.asarray(Image.open(tmp_path / f"ref_{s.id}.png"))
        assert ref.shape == (24, 20) and set(np.unique(ref)) <= {0, 255}
        got = np.asarray(Image.open(tmp_path / "runner" / f"{s.id}_seg.png"))
        assert got.shape == ref.shape and (got == ref).mean() >= AGREE
        for fmt in ("torchscript", "onnx", "bundle"):  # privseg predict --bundle on each export
            out = predict_export(tmp_path / fmt, [images / f"{s.id}.png"], tmp_path / f"{fmt}_{s.id}.png")
            assert (np.asarray(Image.open(out)) == ref).mean() >= AGREE


@pytest.mark.slow  # a DP federation and a patient erasure
def test_dp_run_after_patient_erasure_card_states_the_ledger(tmp_path, capsys):
    from conftest import LOOSE, tiny_dp_run
    from privseg.erasure import LEDGER, ErasureRequest, erase
    from privseg.privacy import DPConfig

    dp = DPConfig(epsilon=100.0, delta=1e-3, clip="fixed", sampling_rate=0.5, noise_multiplier=1.5)
    cohort, run = tiny_dp_run(tmp_path, dp)
    patient = cohort.select("train", "H1")[0].id
    res = erase(run, ErasureRequest(kind="patient", site="H1", subjects=(patient,), reason="GDPR art. 17",
                                    thresholds=LOOSE, repair_rounds=1))
    assert res.status == "completed"
    bundle = tmp_path / "bundle"
    m = export_model(run, "monai-bundle", bundle)
    assert m["privacy"]["model"]["sha256"] == res.entries[-1]["body"]["model"]["sha256"]  # the erased model
    capsys.readouterr()
    assert cli_main(["privacy", "status", str(run), "--json"]) == 0
    status = {r["site"]: r for r in json.loads(capsys.readouterr().out)}
    dp_stmt = m["privacy"]["dp"]
    assert set(dp_stmt["sites"]) == set(status) == {"H1", "H2"} and dp_stmt["unit"] == "patient"
    card = (bundle / "docs/README.md").read_text()
    for site, row in status.items():
        assert dp_stmt["sites"][site]["epsilon"] == pytest.approx(row["epsilon_spent"], rel=1e-12)
        assert f"| {site} | {row['epsilon_spent']:.4g} | {row['delta']:g} |" in card
    [req] = m["privacy"]["erasures"]["requests"]
    entries = ErasureLedger(run / LEDGER).entries(res.request_id)
    assert req["request"] == res.request_id and req["certificate_hash"] == entries[-1]["hash"]
    assert req["status"] == "COMPLETED" and f"`{entries[-1]['hash']}`" in card
    assert m["privacy"]["sites"]["H1"]["patients"] == len(cohort.select("train", "H1")) - 1  # erased one left out
    assert verify_export(bundle)["ok"]
    # a statement edited by hand (a smaller epsilon) fails: the manifest's digest and the ledger's figure
    meta_path = bundle / "configs" / "metadata.json"
    original = meta_path.read_text()
    edited = json.loads(original)
    edited["privacy"]["dp"]["sites"]["H1"]["epsilon"] = 1.0
    meta_path.write_text(json.dumps(edited))
    problems = verify_export(bundle)["problems"]
    assert any(f"{meta_path}: changed since export" in p for p in problems)
    assert any("privacy statement no longer holds: dp.sites.H1.epsilon: 1.0 at export" in p for p in problems)
    with pytest.raises(CheckpointError, match="metadata.json: changed since export"):
        predict_export(bundle, [cohort.select("test")[0].images[0]], tmp_path / "x.nii.gz")
    meta_path.write_text(original)
    assert verify_export(bundle)["ok"]
    # one changed byte in the weights: verify fails, naming the file
    weights = bundle / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = verify_export(bundle)
    assert not r["ok"] and any(str(weights) in p and "changed since export" in p for p in r["problems"])
    assert cli_main(["export", "verify", str(bundle)]) == 1
    with pytest.raises(CheckpointError, match="model.pt: changed since export"):
        predict_export(bundle, [cohort.select("test")[0].images[0]], tmp_path / "x.nii.gz")


def test_an_open_erasure_request_needs_allow_pending_and_the_card_says_so(run3d, tmp_path):
    _, src = run3d
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ErasureLedger(run / "erasure" / "ledger.db").append("ER-000000000001", "requested", {
        "run": "run", "kind": "patient", "site": "H1", "subjects": ["S000"], "reason": "test"})
    with pytest.raises(ConfigError, match="ER-000000000001 .requested.*--allow-pending"):
        export_model(run, "onnx", tmp_path / "out", evaluate=False)
    assert not (tmp_path / "out").exists()
    m = export_model(run, "onnx", tmp_path / "out", allow_pending=True, evaluate=False)
    assert m["privacy"]["pending"] == ["ER-000000000001"]
    first = (tmp_path / "out" / "README.md").read_text().splitlines()[0]
    assert first.startswith("**NOT CLEARED FOR USE") and "ER-000000000001" in first
    assert verify_export(tmp_path / "out")["ok"]
    # the ledger records more for the request: the run no longer matches what the export stated
    ErasureLedger(run / "erasure" / "ledger.db").append("ER-000000000001", "failed", {"error": "test"})
    r = verify_export(tmp_path / "out")
    assert not r["ok"] and any("privacy statement no longer holds" in p for p in r["problems"])


def test_bad_inputs_are_refused_naming_the_problem(run3d, tmp_path, capsys):
    _, run = run3d
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match="empty_run: the run has no model"):
        export_model(empty, "onnx", tmp_path / "o1")
    with pytest.raises(DataError, match="not a run folder"):
        export_model(tmp_path, "onnx", tmp_path / "o1")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((run / "last.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="damaged.pt"):
        export_model(damaged, "onnx", tmp_path / "o2", cohort=run3d[0].root)
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["config"]["model"] = "vit_unknown"
    odd = tmp_path / "odd" / "model.pt"
    odd.parent.mkdir()
    torch.save(payload, odd)
    with pytest.raises(ConfigError, match=r"model.pt: network 'vit_unknown' is not supported"):
        export_model(odd, "torchscript", tmp_path / "o3", cohort=run3d[0].root)
    with pytest.raises(CheckpointError, match=r"last.pt: model has 1 input channels and 3 classes, cohort .* has 3"):
        export_model(run / "last.pt", "onnx", tmp_path / "o5", cohort=_disc_cohort(tmp_path / "derm").root)
    with pytest.raises(ConfigError, match="--format 'tflite'"):
        export_model(run, "tflite", tmp_path / "o4")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="busy: folder is not empty"):
        export_model(run, "onnx", busy, evaluate=False)
    with pytest.raises(ConfigError, match="holds no privseg export"):
        export_model(run, "onnx", busy, force=True, evaluate=False)
    assert (busy / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert cli_main(["export", str(run), "--format", "onnx", "--out", str(busy)]) == 2
    assert "folder is not empty" in capsys.readouterr().err
    # an earlier export is replaced with --force, and only then
    out = tmp_path / "again"
    export_model(run, "onnx", out, evaluate=False)
    with pytest.raises(ConfigError, match="--force"):
        export_model(run, "torchscript", out, evaluate=False)
    export_model(run, "torchscript", out, force=True, evaluate=False)
    assert (out / "model.ts").is_file() and not (out / "model.onnx").exists()
    with pytest.raises(DataError, match="not a privseg export"):
        verify_export(tmp_path / "busy")


def test_a_training_run_serves_its_erased_model_and_the_superseded_file_is_refused(run3d, tmp_path):
    from privseg.audit.ledger import file_sha256

    cohort, src = run3d
    run = tmp_path / "run"
    shutil.copytree(src, run)
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["step"] += 1  # another file: the model `privseg unlearn` would have written
    torch.save(payload, run / "unlearned.pt")
    erased = next(s.id for s in cohort.select("train") if s.site == "H1")
    ledger = ErasureLedger(run / "erasure" / "ledger.db")
    rid = "ER-000000000002"
    ledger.append(rid, "requested", {"run": "run", "kind": "patient", "site": "central", "subjects": [erased],
                                     "source": {"path": "last.pt", "sha256": file_sha256(run / "last.pt")}})
    ledger.append(rid, "completed", {"model": {"path": "unlearned.pt", "sha256": file_sha256(run / "unlearned.pt")},
                                     "removed": [], "passed": True, "dp": None})
    m = export_model(run, "torchscript", tmp_path / "out", evaluate=False)
    assert m["privacy"]["model"]["path"] == "unlearned.pt" and m["privacy"]["pending"] == []
    train_h1 = [s for s in cohort.select("train") if s.site == "H1"]
    assert m["privacy"]["sites"]["H1"]["scans"] == len(train_h1) - 1  # the erased patient is not counted
    with pytest.raises(ConfigError, match=rf"last.pt: erasure request {rid} removed patient\(s\) {erased} from this "
                                          r"model; export the run, which serves .*unlearned.pt"):
        export_model(run / "last.pt", "torchscript", tmp_path / "out2", evaluate=False)


def test_verify_without_the_data_and_a_checkpoint_outside_any_run(run3d, tmp_path):
    cohort, src = run3d
    run = tmp_path / "run"
    shutil.copytree(src, run)
    export_model(run, "onnx", tmp_path / "out", evaluate=False)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "cohort_path": str(tmp_path / "gone")}))
    r = verify_export(tmp_path / "out")  # the ledgers and the model are still checked
    assert r["ok"] and any("patients per site not rechecked" in c for c in r["checked"])
    data = bytearray((src / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "last.pt").write_bytes(bytes(data))  # the run's model changed since the export
    r = verify_export(tmp_path / "out")
    assert not r["ok"] and any("the run now serves last.pt" in p for p in r["problems"])
    # a checkpoint outside any run: exported with the cohort named; not private, hashes only to verify
    lone = tmp_path / "lone" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(src / "last.pt", lone)
    with pytest.raises(ConfigError, match="give it with --cohort"):
        export_model(lone, "onnx", tmp_path / "lone_out", evaluate=False)
    m = export_model(lone, "onnx", tmp_path / "lone_out", cohort=cohort.root, evaluate=False)
    assert m["privacy"]["dp"]["private"] is False and "outside any run" in m["privacy"]["dp"]["reason"]
    assert (tmp_path / "lone_out" / "README.md").read_text().startswith("**NOT PRIVATE: a checkpoint outside")
    r = verify_export(tmp_path / "lone_out")
    assert r["ok"] and any("no run" in c for c in r["checked"])
