"""Which steps of a run's work after training are done, kept in reports/after_training.json, so that a run resumed
with nothing left to train (a torchrun restart after a step failed, a rerun of `pillsnap train`) does the steps
left and nothing twice: a calibration, a stage decision or a final test already written stays as it is.

The record names the training it follows by the SHA-256 of its reports/metrics.json, as the final test's results
do: a run that trains anything rewrites that file, so a record of an earlier training no longer counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pillsnap.utils import save_json

AFTER_TRAINING_FILE = "after_training.json"
# in the order the work after training runs them
STEPS = ("calibration", "reports", "stage_evaluation", "final_test")


@dataclass
class AfterTrainingRecord:
    """The steps done (`done`) of the work after the training whose metrics.json hashes to `metrics_sha256`."""

    path: Path
    metrics_sha256: str | None
    done: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, exp_dir: str | Path) -> AfterTrainingRecord:
        """The record of the run's training as its metrics.json now stands (no steps done where the file is
        missing, unreadable or of another training)."""
        from pillsnap.utils.io import file_sha256

        reports = Path(exp_dir) / "reports"
        metrics = reports / "metrics.json"
        sha = file_sha256(metrics) if metrics.is_file() else None
        record = cls(reports / AFTER_TRAINING_FILE, sha)
        try:
            saved = json.loads(record.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return record
        if sha is not None and isinstance(saved, dict) and saved.get("metrics_sha256") == sha:
            record.done = [step for step in STEPS if step in (saved.get("done") or [])]
        return record

    def owes(self, step: str) -> bool:
        """Whether `step` is still to do for this training."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; known: {STEPS}")
        return step not in self.done

    def mark(self, step: str) -> None:
        """`step` is done: written at once, so a failure in a later step keeps it."""
        if self.owes(step):
            self.done.append(step)
        if self.metrics_sha256 is not None:
            save_json(self.path, {"metrics_sha256": self.metrics_sha256, "done": self.done})


def mark_done(exp_dir: str | Path, step: str) -> None:
    """Record `step` of the work after the run's training as done, whoever ran it: the training's own work after
    it, or `pillsnap calibrate` / `pillsnap evaluate` run by hand to finish it."""
    AfterTrainingRecord.of(exp_dir).mark(step)
