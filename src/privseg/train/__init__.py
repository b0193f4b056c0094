"""Training, inference, metrics and checkpoints."""

from privseg.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from privseg.train.config import TrainConfig
from privseg.train.inference import evaluate_subjects, predict_probs, summarise, write_prediction
from privseg.train.loop import Trainer, standard_step, train_steps
from privseg.train.losses import SegLoss

__all__ = [
    "SegLoss", "TrainConfig", "Trainer", "evaluate_subjects", "load_checkpoint", "model_from_checkpoint",
    "predict_probs", "save_checkpoint", "standard_step", "summarise", "train_steps", "write_prediction",
]
