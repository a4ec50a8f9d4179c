"""The step loop of one epoch: interleaved task steps, timing records for the callbacks, OOM recovery, time cap."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig

from pillsnap.engine.callbacks import CallbackList
from pillsnap.engine.distributed import DistInfo, broadcast_object
from pillsnap.engine.early_stopping import time_cap_reached
from pillsnap.engine.interleave import CLASSIFICATION, DETECTION, interleave_schedule
from pillsnap.engine.oom import describe_decision, oom_recovery_state_machine
from pillsnap.utils import StepTimer, cuda_mem_mb

LOGGER = logging.getLogger(__name__)


class EmergencyExit(RuntimeError):
    """OOM recovery gave up (max_retries, or nothing left to shrink)."""


def record_due(step: int, steps: int, cfg: DictConfig) -> bool:
    """Log/check cadence: every train.step_log_interval steps and at the epoch's last step."""
    return step % max(int(cfg.train.step_log_interval), 1) == 0 or step == steps


class EpochRunner:
    """Runs epochs of steps over named tasks; holds the run-wide step counter, OOM retries and the stage clock."""

    def __init__(self, tasks: dict[str, Any], cfg: DictConfig, callbacks: CallbackList | None = None,
                 logger: logging.Logger | None = None, info: DistInfo | None = None,
                 time_limit_hours: float | None = None, max_epochs: int = 1) -> None:
        self.tasks, self.cfg = tasks, cfg
        self.callbacks = callbacks or CallbackList()
        self.logger, self.info = logger or LOGGER, info or DistInfo()
        self.time_limit_hours, self.max_epochs = time_limit_hours, max_epochs
        self.global_step = 0
        self.oom_retries = dict.fromkeys(tasks, 0)
        self.started = time.monotonic()

    def time_capped(self) -> bool:
        # Rank 0's clock decides, so that every rank leaves the epoch at the same step.
        capped = time_cap_reached(time.monotonic() - self.started, self.time_limit_hours)
        return bool(broadcast_object(self.info, capped))
    # ---- one epoch --------------------------------------------------------------------------------------------------
    def _guarded_step(self, name: str, batch: Any) -> dict:
        """task.train_step with OOM recovery: decide (pure policy), log, cool down, apply, replay the batch."""
        task = self.tasks[name]
        while True:
            try:
                return task.train_step(batch)
            except torch.OutOfMemoryError as err:
                if not hasattr(task, "apply_oom_decision"):
                    raise
                decision = oom_recovery_state_machine(self.oom_retries[name], task.oom_state(), self.cfg.train.oom)
                self.oom_retries[name] = decision["retries"]
                self.logger.warning("%s (%s)", describe_decision(decision), err)
                task.reset_after_oom()
                self.callbacks.fire("on_oom", {"task": name, "retries": decision["retries"], "global_step":
                                               self.global_step, "action": decision["action"],
                                               "state": task.oom_state()})
                if decision["action"] == "emergency_exit":
                    raise EmergencyExit(describe_decision(decision)) from err
                time.sleep(float(self.cfg.train.oom.cooldown_sec))
                task.apply_oom_decision(decision)
                self.callbacks.fire("on_oom", {"task": name, "retries": decision["retries"], "global_step":
                                               self.global_step, "action": "applied", "state": task.oom_state()})

    def _step_record(self, name: str, epoch: int, step: int, steps: int, out: dict, timer: StepTimer) -> dict:
        return {"task": name, "epoch": epoch, "max_epochs": self.max_epochs, "step": step, "steps": steps,
                "global_step": self.global_step, "loss": out["loss"], "lr": out["lr"], "n": out["n"],
                "data_time": timer.data_time, "compute_time": timer.compute_time,
                "throughput": out["n"] / max(timer.step_time, 1e-9), "cuda_mem": cuda_mem_mb(),
                "log": record_due(step, steps, self.cfg)}

    def train_one_epoch(self, epoch: int, active: list[str]) -> dict:
        """Interleave the active tasks' steps (train.interleave_ratio); returns mean train loss per task."""
        steps = {name: self.tasks[name].steps_per_epoch() for name in active}
        iters = {name: iter(self.tasks[name].train_loader) for name in active}
        done, loss_sum = dict.fromkeys(active, 0), dict.fromkeys(active, 0.0)
        ratio = list(self.cfg.train.interleave_ratio)
        timer = StepTimer()
        for name in interleave_schedule(steps.get(DETECTION, 0), steps.get(CLASSIFICATION, 0), ratio):
            batch = next(iters[name])
            timer.data_done()
            out = self._guarded_step(name, batch)
            timer.compute_done()
            done[name] += 1
            self.global_step += 1
            loss_sum[name] += out["loss"]
            self.callbacks.fire("on_step_end", self._step_record(name, epoch, done[name], steps[name], out, timer))
            if record_due(done[name], steps[name], self.cfg) and self.time_capped():
                break
        return {name: {"train_loss": loss_sum[name] / max(done[name], 1), "steps": done[name]} for name in active}


def train_one_epoch_classification(task: Any, epoch: int, cfg: DictConfig, callbacks: CallbackList | None = None,
                                   max_epochs: int | None = None) -> dict:
    """One classification-only epoch (the seed's function name): the trainer's loop with a single task."""
    runner = EpochRunner({CLASSIFICATION: task}, cfg, callbacks, max_epochs=max_epochs or int(cfg.train.epochs))
    return runner.train_one_epoch(epoch, [CLASSIFICATION])[CLASSIFICATION]
