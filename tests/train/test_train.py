"""Training loop, checkpoints, resume, evaluation and prediction on a tiny cohort."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from privseg.data.transforms import load_preprocessed
from privseg.errors import CheckpointError
from privseg.train import TrainConfig, Trainer, load_checkpoint, model_from_checkpoint
from privseg.train.inference import evaluate_checkpoint, predict_subject_to_nifti
from privseg.train.losses import SegLoss
from privseg.train.metrics import dice_per_class, mae


def tiny_config(cohort, **kw):
    base = dict(model="unet_tiny", patch_size=(16, 16, 16), steps=6, checkpoint_every=3, lr=5e-3, device="cpu")
    base.update(kw)
    return TrainConfig.for_cohort(cohort, **base)


def test_training_lowers_the_loss(tiny_cohort, tmp_path):
    cfg = tiny_config(tiny_cohort, steps=30, checkpoint_every=30)
    trainer = Trainer(tiny_cohort, cfg, tmp_path / "run")
    items = load_preprocessed(trainer.subjects, tiny_cohort)
    loss_fn = SegLoss()

    def full_loss(model):
        model.eval()
        with torch.no_grad():
            return np.mean([float(loss_fn(model(i["image"][None, :, :16, :16, :16].as_tensor()),
                                          i["label"][None, :, :16, :16, :16].as_tensor())) for i in items])

    torch.manual_seed(0)
    before = full_loss(cfg.build_model())
    result = trainer.fit(items=items)
    assert full_loss(result["model"]) < before * 0.8


def test_checkpoint_round_trip_and_resume_repeats_uninterrupted_run(tiny_cohort, tmp_path):
    cfg = tiny_config(tiny_cohort)
    full = Trainer(tiny_cohort, cfg, tmp_path / "full").fit()
    # "Crash" after the first checkpoint: train 3 steps, then resume to 6.
    Trainer(tiny_cohort, tiny_config(tiny_cohort, steps=3), tmp_path / "crashed").fit()
    resumed = Trainer(tiny_cohort, cfg, tmp_path / "crashed").fit(resume=True)
    assert resumed["resumed_from"] == 3
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    payload = load_checkpoint(tmp_path / "full" / "last.pt")
    assert payload["step"] == 6 and payload["config"]["model"] == "unet_tiny" and "torch" in payload["versions"]
    restored = model_from_checkpoint(payload)
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, a[k])


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "privseg-checkpoint/1", "obj": object()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_evaluate_and_predict_keep_the_input_geometry(tiny_cohort, tmp_path):
    cfg = tiny_config(tiny_cohort, steps=3)
    ckpt = Trainer(tiny_cohort, cfg, tmp_path / "run").fit()["checkpoint"]
    result = evaluate_checkpoint(ckpt, tiny_cohort, "test")
    assert len(result["subjects"]) == len(tiny_cohort.select("test"))
    assert set(result["summary"]["sites"]) <= set(tiny_cohort.sites)
    subject = tiny_cohort.select("test")[0]
    out = predict_subject_to_nifti(ckpt, tiny_cohort, subject.id, tmp_path / "pred.nii.gz")
    src, pred = nib.load(subject.images[0]), nib.load(str(out))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_checkpoint_for_other_class_count_is_refused(tiny_cohort, tmp_path):
    cfg = tiny_config(tiny_cohort, steps=1, checkpoint_every=1)
    ckpt = Trainer(tiny_cohort, cfg, tmp_path / "run").fit()["checkpoint"]
    other = tiny_cohort.with_subjects(tiny_cohort.subjects)
    other.classes = ["background", "organ"]
    with pytest.raises(CheckpointError, match="classes"):
        evaluate_checkpoint(ckpt, other, "test")


def test_metrics_follow_their_definitions():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 1
    pred = label.clone()
    pred[0, 0, 0, 0] = 0
    d = dice_per_class(pred, label, 3)
    assert d[0] == pytest.approx(2 * 31 / (31 + 32))
    assert d[1] == 1.0  # absent from both: nothing to find, nothing found
    probs = torch.nn.functional.one_hot(label[0], 3).permute(3, 0, 1, 2).float()
    assert mae(probs, label) == 0.0
    uniform = torch.full((3, 4, 4, 4), 1 / 3)
    expected = float((uniform[1:] - probs[1:]).abs().mean())
    assert mae(uniform, label) == pytest.approx(expected)


def test_segloss_equals_monai_dicece_and_gives_one_value_per_patch():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, 6, 6)
    labels = torch.randint(0, 4, (3, 1, 6, 6, 6))
    ours = SegLoss()
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(ours(logits, labels), expected, rtol=1e-5, atol=1e-6)
    per = ours(logits, labels, reduction="none")
    assert per.shape == (3,)
    for i in range(3):
        single = DiceCELoss(to_onehot_y=True, softmax=True)(logits[i : i + 1], labels[i : i + 1])
        torch.testing.assert_close(per[i], single, rtol=1e-5, atol=1e-6)
