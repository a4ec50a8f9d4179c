"""The step loop of one epoch: interleaved task steps, timing records for the callbacks, OOM recovery, time cap."""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from pillsnap.engine.callbacks import CallbackList
from pillsnap.engine.distributed import DistInfo, any_rank, any_ranks, broadcast_object, sum_over_ranks
from pillsnap.engine.early_stopping import time_cap_reached
from pillsnap.engine.interleave import interleave_schedule
from pillsnap.engine.oom import OomDecision, oom_recovery_state_machine
from pillsnap.engine.spec import interleave_shares, spec_of
from pillsnap.engine.task import StepOutput, Task
from pillsnap.utils import CUDA_PEAKS, StepTimer, host_rng_states, is_out_of_memory, restore_host_rng
from pillsnap.utils.signals import LAUNCHER_GONE, acting_on_stop, stop_requested, stops_at_safe_points

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


@dataclass
class EpochProgress:
    """How far a run has come inside an epoch: saved with a checkpoint written part-way through it, so that a
    resume goes on from there instead of redoing the epoch. Per task: the batches drawn from its loader and the
    sampler indices they took on all ranks together (a resume skips those, so a changed batch size or number of
    ranks still lands on the same photo), the steps trained, and the summed loss of every rank's steps with their
    count (saved as totals over the ranks, which rank 0 carries on a resume: the epoch's mean train loss goes on);
    the stage clock; each rank's host random states (the model's dropout and, without loader workers, the
    augmentation continue as they would have)."""

    epoch: int
    drawn: dict[str, int] = field(default_factory=dict)
    indices: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    loss_sum: dict[str, float] = field(default_factory=dict)
    loss_steps: dict[str, int] = field(default_factory=dict)  # the steps loss_sum sums (older saves: none)
    elapsed_s: float = 0.0
    rng: list[dict] = field(default_factory=list)  # host_rng_states() of each rank, in rank order

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> EpochProgress:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def rng_of(self, rank: int, world_size: int) -> dict:
        """Rank `rank`'s random states. Saved with another number of ranks: rank 0's for rank 0, none for the others
        (they keep their own epoch seeds: rank 0's states on every rank would draw alike on every rank)."""
        if not self.rng:
            return {}
        if len(self.rng) == world_size:
            return self.rng[rank]
        return self.rng[0] if rank == 0 else {}

    @classmethod
    def going_on(cls, epoch: int, tasks: list[str], saved: EpochProgress | None) -> EpochProgress:
        """A fresh copy of `saved` (the epoch's position a resume starts at), or of the epoch's start, with every
        task counted."""
        progress = cls.from_dict(saved.as_dict()) if saved is not None and saved.epoch == epoch else cls(epoch)
        for counts in (progress.drawn, progress.indices, progress.done):
            counts.update({n: int(counts.get(n, 0)) for n in tasks})
        progress.loss_sum.update({n: float(progress.loss_sum.get(n, 0.0)) for n in tasks})
        # a save from before loss_steps: its loss_sum was rank 0's own steps'
        progress.loss_steps.update({n: int(progress.loss_steps.get(n, progress.done[n])) for n in tasks})
        return progress

    def over_ranks(self, info: DistInfo, device: object) -> EpochProgress:
        """A copy whose loss sums and counts are every rank's together (call it on every rank at once)."""
        names = sorted(self.loss_sum)
        totals = sum_over_ranks(info, [v for n in names for v in (self.loss_sum[n], float(self.loss_steps[n]))],
                                device)
        copy = EpochProgress.from_dict(self.as_dict())
        copy.loss_sum = {n: totals[2 * i] for i, n in enumerate(names)}
        copy.loss_steps = {n: round(totals[2 * i + 1]) for i, n in enumerate(names)}
        return copy


def record_due(step: int, steps: int, cfg: DictConfig) -> bool:
    """Log/check cadence: every train.step_log_interval steps and at the epoch's last step."""
    return step % max(int(cfg.train.step_log_interval), 1) == 0 or step == steps


class EpochRunner:
    """Runs epochs of steps over named tasks, advancing the run state."""

    def __init__(self, tasks: dict[str, Task], cfg: DictConfig, state: RunState | None = None,
                 callbacks: CallbackList | None = None, logger: logging.Logger | None = None,
                 info: DistInfo | None = None, time_limit_hours: float | None = None, max_epochs: int = 1,
                 save_progress: Callable[..., bool] | None = None) -> None:
        self.tasks, self.cfg = tasks, cfg
        self.state = state or RunState()
        self.callbacks = callbacks or CallbackList()
        self.logger, self.info = logger or LOGGER, info or DistInfo()
        self.time_limit_hours, self.max_epochs = time_limit_hours, max_epochs
        # train.checkpoint_interval_minutes: a checkpoint inside the epoch once this long has passed since the last
        # one (0: at epoch ends only). `save_progress` commits it (on every rank: it may share counts).
        self.save_progress = save_progress
        minutes = OmegaConf.select(cfg, "train.checkpoint_interval_minutes", default=0.0)  # >= 0: config ranges
        self.checkpoint_interval_s = 60.0 * float(minutes or 0.0)
        self.last_checkpoint = time.monotonic()
        self.save_pending = False  # a save came due with gradients half accumulated: it is made once they are not
        # where the stage's time cap cut the last epoch short (None: it ran to its end). The trainer's `last`
        # checkpoint goes on from there, so that a resume with a raised cap trains the rest of the epoch
        self.cut_short: EpochProgress | None = None
        self.current: EpochProgress | None = None  # the epoch under way's place (an emergency checkpoint keeps it)

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

    def checkpoint_due(self, device: object) -> bool:
        """Whether a checkpoint inside the epoch is due, by rank 0's clock (asked of every rank between steps, like
        the time cap)."""
        due = time.monotonic() - self.last_checkpoint >= self.checkpoint_interval_s
        return any_rank(self.info, due and self.info.is_main, device)

    def _checkpoint_inside(self, progress: EpochProgress, training: list[str], device: object, vote: bool) -> None:
        """Save `progress` with the checkpoints when one is due (asked of the ranks when `vote`: at log steps), between
        optimizer steps only: a checkpoint holds no accumulated gradients, so a save due inside a window waits for
        the step that closes it (the windows and the vote are the same on every rank). `training`: the tasks with
        steps left; a task done with its epoch may hold a window open until the next one, and must not hold off
        the saves."""
        if self.save_progress is None or self.checkpoint_interval_s <= 0:
            return
        if vote and not self.save_pending:
            self.save_pending = self.checkpoint_due(device)
        if not self.save_pending or any(self.tasks[n].accumulating for n in training):
            return
        self.save_pending = False
        self.save_progress(self._stamped(progress))
        self.last_checkpoint = time.monotonic()

    def save_before_validation(self, device: object) -> None:
        """The epoch's steps done: its place saved before validation when the last save is older than a tenth of
        train.checkpoint_interval_minutes (3 min at the default 30; never in the demo's seconds-long epochs). A
        stop or crash during a Stage 4 validation (minutes, rank 0 alone for part of it) sent the resume back to
        the last save inside the epoch, up to the whole interval of every GPU's steps to train again; now it
        validates again. Not after the time cap cut the epoch short (saved already)."""
        progress = self.current
        if self.save_progress is None or self.checkpoint_interval_s <= 0 or progress is None or \
                self.cut_short is not None:
            return
        old = time.monotonic() - self.last_checkpoint >= self.checkpoint_interval_s / 10
        if any_rank(self.info, old and self.info.is_main, device):  # rank 0's clock, for every rank
            self.save_progress(self._stamped(progress), why="its steps done, before validation")
            self.last_checkpoint = time.monotonic()

    def _stamped(self, progress: EpochProgress) -> EpochProgress:
        """`progress` with the stage clock and this rank's random states of now, as a save keeps them (the trainer
        gathers every rank's)."""
        progress.elapsed_s, progress.rng = self.state.elapsed(), [host_rng_states()]
        return progress

    def _position(self, name: str, progress: EpochProgress) -> int:
        """Start task `name`'s loader where `progress` left it; returns the steps left in the epoch. A loader whose
        sampler can skip (EpochSampler) goes on in the epoch's own order, from this rank's share of the indices
        the ranks had taken (the same photo with another batch size or number of ranks); any other (ultralytics'
        detection loader, which prefetches across epochs) draws the steps left from a fresh pass."""
        loader, steps = self.tasks[name].train_loader, self.tasks[name].steps_per_epoch()
        taken = int(progress.indices.get(name, 0)) // self.info.world_size
        if not taken:
            return steps
        # with another number of ranks the ranks together take a few fewer; count what they take, so that a later
        # resume starts where this one left off
        progress.indices[name] = taken * self.info.world_size
        batch_size = _batch_size(loader)
        by_steps = max(steps - taken // batch_size, 0)
        sampler = getattr(loader, "sampler", None)
        if not hasattr(sampler, "skip"):
            self.logger.info("%s: its loader cannot skip the %d samples it had drawn; the rest of the epoch is drawn "
                             "from a fresh shuffle", name, taken)
            return by_steps
        sampler.skip(taken)
        rest = max(len(sampler) - taken, 0)
        return min(by_steps, rest // batch_size if loader.drop_last else -(-rest // batch_size))

    def _schedule(self, active: list[str], left: dict[str, int], progress: EpochProgress) -> Iterator[str]:
        """The order of the epoch's steps left: the rest of the whole epoch's order where the drawn steps are its
        beginning (so a resumed run interleaves as the unbroken one would), else an order over the steps left."""
        shares = interleave_shares([spec_of(self.tasks[n]) for n in active], list(self.cfg.train.interleave_ratio))
        whole = {name: self.tasks[name].steps_per_epoch() for name in active}
        drawn = {n: progress.drawn[n] for n in active if progress.drawn[n]}
        if drawn and all(whole[n] - progress.drawn[n] == left[n] for n in active):
            order = interleave_schedule(whole, shares)
            if Counter(itertools.islice(order, sum(drawn.values()))) == Counter(drawn):
                return order  # what is left of it
        return interleave_schedule(left, shares)

    def train_one_epoch(self, epoch: int, active: list[str], resume: EpochProgress | None = None) -> dict:
        """Interleave the active tasks' steps (train.interleave_ratio); returns mean train loss per task. `resume`:
        where a checkpoint saved inside this epoch left it (the epoch goes on from there)."""
        progress = EpochProgress.going_on(epoch, active, resume)
        self.current = progress
        if self.info.rank != 0:  # rank 0 carries the saved totals of every rank's loss; the others start from none
            progress.loss_sum = dict.fromkeys(progress.loss_sum, 0.0)  # the same tasks on every rank: over_ranks
            progress.loss_steps = dict.fromkeys(progress.loss_steps, 0)  # sums them in one list
        self.last_checkpoint, self.save_pending = time.monotonic(), False  # the last epoch's end was committed
        self.cut_short = None
        left = {name: self._position(name, progress) for name in active}
        steps = {name: progress.done[name] + left[name] for name in active}  # as the log line counts them
        iters = {name: iter(self.tasks[name].train_loader) for name in active}
        if resume is not None:  # after the loaders' start, which may draw a seed from them
            restore_host_rng(progress.rng_of(self.info.rank, self.info.world_size))
        timer = StepTimer()
        todo = dict(left)
        with stops_at_safe_points():
            self._steps(epoch, active, progress, steps, iters, todo, timer, self._schedule(active, left, progress))
        # the epoch's mean training loss over every rank's steps (each rank trains its own shard), in one sum
        totals = progress.over_ranks(self.info, next(iter(self.tasks.values())).device)
        return {name: {"train_loss": totals.loss_sum[name] / max(totals.loss_steps[name], 1),
                       "steps": progress.done[name],  # this rank's
                       "skipped_steps": self.tasks[name].skipped_steps}  # non-finite gradients, so far in the run
                for name in active}

    def place(self) -> EpochProgress | None:
        """The epoch under way's place with the clock and random states of now, for a checkpoint saved outside the
        steps (the emergency one); None before any step of it (a single process's: under DDP the ranks would have
        to join theirs)."""
        progress = self.current
        if progress is None or self.info.enabled or not any(progress.done.values()):
            return None
        return self._stamped(progress)

    def _stop_here(self, progress: EpochProgress, cause: BaseException | None = None) -> NoReturn:
        """A stop signal noted while training (utils.signals.stops_at_safe_points): save the epoch's place, as a
        checkpoint inside it, and stop. A window of accumulated gradients still open is dropped, its batches counted
        as drawn (as where the time cap cuts an epoch)."""
        name = acting_on_stop()
        why = name if name == LAUNCHER_GONE else f"{name} received"
        saved = False
        if self.save_progress is not None and any(progress.done.values()):
            saved = self.save_progress(self._stamped(progress), why=why)
        raise KeyboardInterrupt(("" if name == LAUNCHER_GONE else "signal ") + name +
                                (": the epoch's place saved" if saved else "")) from cause

    def _steps(self, epoch: int, active: list[str], progress: EpochProgress, steps: dict[str, int],
               iters: dict[str, Iterator], todo: dict[str, int], timer: StepTimer, order: Iterator[str]) -> None:
        """The epoch's steps in `order`, from where `progress` left it."""
        for name in order:
            todo[name] -= 1
            drew = True
            try:
                batch = next(iters[name])
            except Exception as err:
                if stop_requested() is None:
                    raise
                # the stop ended the loader's workers too (sent to the whole process group): stop where it was;
                # under DDP through the vote below, so that every rank saves together
                if not self.info.enabled:
                    self._stop_here(progress, err)
                batch, drew = None, False
            timer.data_done()
            # a batch less than half readable (safe_collate said which): nothing worth learning. Under DDP every rank
            # skips the step together, else the others would wait for this rank's gradients; and every rank saves
            # its place together when any of them was told to stop
            lost, stop = batch is None, stop_requested() is not None
            if self.info.enabled:
                lost, stop = any_ranks(self.info, [lost, stop], self.tasks[name].device)
            if lost and stop:
                # a stop, and a rank without its batch (the stop ended its loader's workers too, or it was
                # unreadable): nothing is trained, and the place saved leaves the batch to draw again, here too
                self._stop_here(progress)
            if drew:
                progress.drawn[name] += 1
                progress.indices[name] += _batch_size(self.tasks[name].train_loader) * self.info.world_size
            if lost:
                self.logger.warning("%s: skipped a batch less than half readable%s (epoch %d)", name,
                                    "" if batch is None else " on another rank", epoch)
                continue
            out = self.guarded_step(name, batch)
            timer.compute_done()
            progress.done[name] += 1
            self.state.global_step += 1
            progress.loss_sum[name] += out.loss
            progress.loss_steps[name] += 1
            step = progress.done[name]
            self.callbacks.fire("on_step_end", self._step_record(name, epoch, step, steps[name], out, timer))
            if stop:  # the batch drawn is trained first: its draw moved the random states the save keeps
                self._stop_here(progress)
            due = record_due(step, steps[name], self.cfg)
            if due and self.time_capped(self.tasks[name].device):
                if any(todo.values()):
                    # a window of accumulated gradients still open is dropped, its batches counted as drawn
                    self.cut_short = self._stamped(progress)
                break
            if any(todo.values()):  # the epoch's last step needs none: its end is committed
                self._checkpoint_inside(progress, [n for n in active if todo[n]], self.tasks[name].device, due)
        # a stop noted in the epoch's last step: its end would be committed only after validation
        stop = stop_requested() is not None
        if self.info.enabled:
            stop = any_rank(self.info, stop, next(iter(self.tasks.values())).device)
        if stop:
            self._stop_here(progress)


def _batch_size(loader: object) -> int:
    """The samples a loader's batch takes from its sampler (1 for a loader that batches nothing itself)."""
    return max(int(getattr(loader, "batch_size", None) or 1), 1)
