"""Training engine: the task contract (Task, TaskSpec) and its two tasks, the step loop, the trainer, and the
policies they apply."""

from pillsnap.engine.classification import ClassificationTask, validate_classification
from pillsnap.engine.detection import DetectionTask, validate_detection
from pillsnap.engine.early_stopping import early_stopping, time_cap_success
from pillsnap.engine.interleave import interleave_schedule
from pillsnap.engine.oom import BatchChoice, OomDecision, auto_find_batch_size, oom_recovery_state_machine
from pillsnap.engine.optim import build_criterion_classification, build_optimizer, build_scheduler
from pillsnap.engine.precision import Precision
from pillsnap.engine.run import main, run_training
from pillsnap.engine.spec import TaskSpec
from pillsnap.engine.task import ResumeMismatchError, StepOutput, Task

__all__ = [
    "BatchChoice", "ClassificationTask", "DetectionTask", "OomDecision", "Precision", "ResumeMismatchError",
    "StepOutput", "Task", "TaskSpec", "auto_find_batch_size", "build_criterion_classification", "build_optimizer",
    "build_scheduler", "early_stopping", "interleave_schedule", "main", "oom_recovery_state_machine",
    "run_training", "time_cap_success", "validate_classification", "validate_detection",
]
