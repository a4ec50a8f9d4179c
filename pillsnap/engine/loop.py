"""The step loop of one epoch: interleaved task steps, timing records for the callbacks, OOM recovery, time cap."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from pillsnap.engine.callbacks import CallbackList
from pillsnap.engine.distributed import DistInfo, any_rank, broadcast_object
from pillsnap.engine.early_stopping import time_cap_reached
from pillsnap.engine.interleave import interleave_schedule
from pillsnap.engine.oom import OomDecision, oom_recovery_state_machine
from pillsnap.engine.spec import interleave_shares, spec_of
from pillsnap.engine.task import StepOutput, Task
from pillsnap.utils import CUDA_PEAKS, StepTimer, is_out_of_memory

LOGGER = logging.getLogger(__name__)


class EmergencyExit(RuntimeError):
    """OOM recovery gave up (max_retries, or nothing left to shrink) on task `task`, after `retries` recoveries."""

    def __init__(self, message: str, task: str = "", retries: int = 0) -> None:
        super().__init__(message)
        self.task, self.retries = task, retries


class RankOutOfMemory(EmergencyExit):
    """Under DDP, this rank ran out of memory in a step. It cannot replay the step alone: the other ranks are inside
    the step's collectives (DDP's buffer broadcast, the gradient all-reduce), a retry would meet them out of order,
    and a recovery one rank made alone (a scaled learning rate, fp16 with its own loss scaler) would part its
    weights from theirs. So the run stops; the trainer saves `decision` for the restart, where every rank applies
    it."""

    def __init__(self, task: str, decision: OomDecision, made_for: dict, rank: int) -> None:
        super().__init__(f"rank {rank} ran out of memory in a {task} step", task, decision.retries)
        self.decision, self.made_for, self.rank = decision, made_for, rank


@dataclass
class RunState:
    """What belongs to the run rather than to a task: the step counter over all tasks, the stage clock, and the
    OOM retries per task. `clock_offset` is the stage time earlier runs spent, so a resumed run's time cap counts
    the whole stage."""

    global_step: int = 0
    started: float = field(default_factory=time.monotonic)
    oom_retries: dict[str, int] = field(default_factory=dict)
    clock_offset: float = 0.0

    def elapsed(self) -> float:
        return self.clock_offset + time.monotonic() - self.started


def record_due(step: int, steps: int, cfg: DictConfig) -> bool:
    """Log/check cadence: every train.step_log_interval steps and at the epoch's last step."""
    return step % max(int(cfg.train.step_log_interval), 1) == 0 or step == steps


class EpochRunner:
    """Runs epochs of steps over named tasks, advancing the run state."""

    def __init__(self, tasks: dict[str, Task], cfg: DictConfig, state: RunState | None = None,
                 callbacks: CallbackList | None = None, logger: logging.Logger | None = None,
                 info: DistInfo | None = None, time_limit_hours: float | None = None, max_epochs: int = 1) -> None:
        self.tasks, self.cfg = tasks, cfg
        self.state = state or RunState()
        self.callbacks = callbacks or CallbackList()
        self.logger, self.info = logger or LOGGER, info or DistInfo()
        self.time_limit_hours, self.max_epochs = time_limit_hours, max_epochs

    def time_capped(self, device: object = None) -> bool:
        """Whether the stage's clock has run out, by rank 0's clock, so that every rank leaves the epoch at the same
        step. Between steps (`device`: the step's), asked through the steps' own group; elsewhere through the wait
        group, since rank 0 may still be validating or saving."""
        capped = time_cap_reached(self.state.elapsed(), self.time_limit_hours)
        if device is not None:  # only rank 0 votes: the answer is its clock's (the steps' group keeps NCCL's timeout)
            return any_rank(self.info, capped and self.info.is_main, device)
        return bool(broadcast_object(self.info, capped))

    def guarded_step(self, name: str, batch: object) -> StepOutput:
        """task.train_step with OOM recovery: decide (pure policy), log, cool down, apply, replay the batch."""
        task = self.tasks[name]
        CUDA_PEAKS.start_window()  # the step record's cuda_mem: this step's own peak (after an OOM, the replay's)
        while True:
            try:
                return task.train_step(batch)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                decision = self._decide_after_oom(name, task, err)
            # Out of the except block, the failed step's tensors (its traceback held them) can be freed
            task.reset_after_oom()
            time.sleep(float(self.cfg.train.oom.cooldown_sec))
            task.apply_oom_decision(decision)
            self._fire_oom(name, "applied", decision.retries, task)

    def _decide_after_oom(self, name: str, task: Task, err: BaseException) -> OomDecision:
        """The state machine's decision, logged; raises where the run stops (gave up, or a rank under DDP)."""
        retries = self.state.oom_retries.get(name, 0)
        made_for = task.oom_state()
        decision = oom_recovery_state_machine(retries, {**made_for, "fp16_saves_memory": task.fp16_saves_memory},
                                              self.cfg.train.oom)
        self.state.oom_retries[name] = decision.retries
        self.logger.warning("%s: %s (%s)", name, decision.describe(), err)
        self._fire_oom(name, decision.action, decision.retries, task)
        if decision.action == "emergency_exit":
            task.reset_after_oom()
            raise EmergencyExit(decision.describe(), name, decision.retries) from err
        if self.info.enabled:
            task.reset_after_oom()
            raise RankOutOfMemory(name, decision, made_for, self.info.rank) from err
        return decision

    def _fire_oom(self, name: str, action: str, retries: int, task: Task) -> None:
        self.callbacks.fire("on_oom", {"task": name, "retries": retries, "global_step": self.state.global_step,
                                       "action": action, "state": task.oom_state()})

    def _step_record(self, name: str, epoch: int, step: int, steps: int, out: StepOutput, timer: StepTimer) -> dict:
        return {"task": name, "epoch": epoch, "max_epochs": self.max_epochs, "step": step, "steps": steps,
                "global_step": self.state.global_step, "loss": out.loss, "lr": out.lr, "n": out.n,
                "data_time": timer.data_time, "compute_time": timer.compute_time,
                "throughput": out.n / max(timer.step_time, 1e-9), "cuda_mem": CUDA_PEAKS.window_mb(),
                "log": record_due(step, steps, self.cfg)}

    def train_one_epoch(self, epoch: int, active: list[str]) -> dict:
        """Interleave the active tasks' steps (train.interleave_ratio); returns mean train loss per task."""
        steps = {name: self.tasks[name].steps_per_epoch() for name in active}
        iters = {name: iter(self.tasks[name].train_loader) for name in active}
        done, loss_sum = dict.fromkeys(active, 0), dict.fromkeys(active, 0.0)
        timer = StepTimer()
        ratio = list(self.cfg.train.interleave_ratio)
        schedule = interleave_schedule(steps, interleave_shares([spec_of(self.tasks[n]) for n in active], ratio))
        for name in schedule:
            batch = next(iters[name])
            timer.data_done()
            # every sample of a batch undecodable (safe_collate said which): nothing to learn. Under DDP every rank
            # skips the step together, else the others would wait for this rank's gradients
            lost = batch is None
            if self.info.enabled:
                lost = any_rank(self.info, lost, self.tasks[name].device)
            if lost:
                self.logger.warning("%s: skipped a batch with no readable sample%s (epoch %d)", name,
                                    "" if batch is None else " on another rank", epoch)
                continue
            out = self.guarded_step(name, batch)
            timer.compute_done()
            done[name] += 1
            self.state.global_step += 1
            loss_sum[name] += out.loss
            self.callbacks.fire("on_step_end", self._step_record(name, epoch, done[name], steps[name], out, timer))
            if record_due(done[name], steps[name], self.cfg) and self.time_capped(self.tasks[name].device):
                break
        return {name: {"train_loss": loss_sum[name] / max(done[name], 1), "steps": done[name]} for name in active}
