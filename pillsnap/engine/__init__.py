"""Training engine: the trainer loop, the classification task, and the policies it applies.

The detection task (engine/detection.py) is imported lazily by the trainer, only when detection trains.
"""

from pillsnap.engine.classification import ClassificationTask, ResumeMismatchError, validate_classification
from pillsnap.engine.early_stopping import early_stopping, time_cap_success
from pillsnap.engine.interleave import interleave_schedule
from pillsnap.engine.loop import train_one_epoch_classification
from pillsnap.engine.oom import auto_find_batch_size, oom_recovery_state_machine
from pillsnap.engine.optim import build_criterion_classification, build_optimizer, build_scheduler
from pillsnap.engine.trainer import main, train_classification_stage, train_detection_stage

__all__ = [
    "ClassificationTask", "ResumeMismatchError", "auto_find_batch_size", "build_criterion_classification",
    "build_optimizer", "build_scheduler", "early_stopping", "interleave_schedule", "main",
    "oom_recovery_state_machine", "time_cap_success", "train_classification_stage", "train_detection_stage",
    "train_one_epoch_classification", "validate_classification",
]
