"""Training: the trainer, checkpoints, the main job and its plots."""

from ..runs import load_run_config
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .run import default_model_config, run_train
from .trainer import Trainer, TrainingDiverged, TrainingInterrupted, evaluate, load_trained

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "TrainingDiverged",
    "evaluate",
    "load_trained",
    "run_train",
    "default_model_config",
    "load_run_config",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
]
