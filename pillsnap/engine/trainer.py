"""The training run: build the tasks, interleave their steps, validate, commit checkpoints, resume, stop (the
process around it, its folder, signals and log files: engine/run.py).

Side concerns hang on callbacks (engine/callbacks.py); policies (OOM recovery, early stopping, time cap,
interleaving) are pure functions in their own modules. The trainer only speaks the Task contract.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from pillsnap.config import stage_settings
from pillsnap.engine import checkpointing as ck
from pillsnap.engine.build import BuildLoaders, TaskBuilder
from pillsnap.engine.callbacks import Callback, CallbackList, MemoryWatchCallback, default_callbacks
from pillsnap.engine.classification import ClassificationTask
from pillsnap.engine.detection import DetectionTask
from pillsnap.engine.distributed import (
    DistInfo,
    all_ranks,
    barrier,
    broadcast_object,
    device_for,
)
from pillsnap.engine.early_stopping import describe_best, judge_epoch, new_early_stopping_state, time_cap_success
from pillsnap.engine.loop import EmergencyExit, EpochProgress, EpochRunner, RankOutOfMemory, RunState
from pillsnap.engine.oom import (
    RECOVERY_FILE,
    SavedRecovery,
    load_recovery,
    recovered_state,
    save_recovery,
)
from pillsnap.engine.restart import max_restarts
from pillsnap.engine.spec import specs_by_name
from pillsnap.engine.task import ResumeMismatchError, Task
from pillsnap.utils import (
    TBWriter,
    load_ckpt,
    memory_snapshot,
    resolve_device,
)
from pillsnap.utils.logs import LOGGED
from pillsnap.utils.run_status import FINISHED_STATUSES
from pillsnap.utils.signals import EXIT_INTERRUPTED, held_signals

EXIT_OK, EXIT_CONFIG, EXIT_OOM, EXIT_TIME_CAP = 0, 2, 3, 4
# The tasks a run may train, in the order of a sequential run; each decides from the config and loaders whether
# it trains (Task.wanted).
DEFAULT_TASKS: tuple[type[Task], ...] = (ClassificationTask, DetectionTask)


RANK_SEED_STRIDE = 1_000_003  # a prime: rank r's seeds are (seed, epoch)'s plus r times it


def seed_epoch(seed: int, epoch: int, loaders: list[Any], rank: int = 0) -> None:
    """Seed every RNG from (seed, epoch, rank) so a resumed epoch replays the same shuffle, augmentation and
    dropout. Each rank gets its own augmentation and dropout draws (the same on every rank would flip, crop and
    drop alike at each batch position of every shard); the shards' shuffle comes from the sampler's own seed."""
    s = seed * 1000 + epoch + rank * RANK_SEED_STRIDE
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    for loader in loaders:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(s)


class Trainer:
    """One training run over the tasks that the config and loaders call for."""

    def __init__(self, cfg: DictConfig, info: DistInfo, logger: logging.Logger, tb: TBWriter,
                 build_loaders: BuildLoaders, extra_callbacks: list[Callback] | None = None,
                 task_types: Sequence[type[Task]] = DEFAULT_TASKS) -> None:
        self.cfg, self.info, self.logger, self.tb = cfg, info, logger, tb
        self.specs = specs_by_name(t.spec for t in task_types)
        self.exp_dir = Path(cfg.paths.exp_dir)
        self.store = ck.CheckpointStore(self.exp_dir / "checkpoints")
        if info.is_main:
            self.store.recover()
        self.device = device_for(info, resolve_device())
        self.callbacks = CallbackList()
        if info.is_main:
            self.callbacks = default_callbacks(self.exp_dir, logger, tb, float(cfg.train.memory_warning_ratio),
                                               int(cfg.train.profile_interval), self.specs)
            self.callbacks.callbacks.extend(extra_callbacks or [])
        self.stage = int(cfg.data.progressive_validation.current_stage)
        self.stage_cfg = stage_settings(cfg)
        self.state = RunState()
        built = TaskBuilder(cfg, info, self.device, logger, tb).build(build_loaders, task_types)
        self.tasks, self.meta = built.tasks, built.meta
        self.auto_batch = built.auto_batch  # what the auto batch search chose, per task
        if built.memory_bound:  # batches sized to fill the GPU up to the headroom: the memory warning starts there
            for watch in self.callbacks.of_type(MemoryWatchCallback):
                watch.sized_for(float(cfg.train.auto_batch_vram_headroom))
        logger.info("tasks: %s (strategy=%s, stage=%d, device=%s)", list(self.tasks), cfg.train.strategy,
                    self.stage, self.device)
        self.plan = self._epoch_plan()
        self.runner = EpochRunner(self.tasks, cfg, self.state, self.callbacks, logger, info,
                                  self.stage_cfg.get("time_limit_hours"), len(self.plan), self.save_progress)
        self.start_epoch, self.history = 0, []
        self.epoch_done = 0  # the last epoch whose checkpoints are committed
        # where the committed checkpoints stand inside epoch epoch_done + 1 (None: at its start); a resume from them
        # goes on from there
        self.progress: EpochProgress | None = None
        self.es_state = {name: new_early_stopping_state() for name in self.tasks}
        self.resume_newer_than: float | None = None  # a torchrun restart: ignore last files from before the job
        self.restart = 0  # torchrun's restart of this job, as the ranks agreed (engine.restart.settle_restart)
        self.stopped: set[str] = set()
        # per task, the validation metrics of the part of epoch progress.epoch that a time cap cut short, where its
        # weights are the best (resume): the finished epoch's record keeps them
        self.cut_best: dict[str, dict] = {}
        # a resumed run that trains nothing more (trains_nothing): the record of the training it resumed. Its
        # metrics.json stays as it was, or, where that training was cut before its end, keeps the training's memory
        # peaks (the stage report's GPU-memory advice reads them), not the restart's
        self.earlier: dict | None = None
        self.status = "running"
        self.samples_over_ranks: dict[str, int] = {}  # under DDP: every rank's samples, summed (_share_counts)
        self.recovery_read = False  # an OOM recovery file was read at start; rank 0 removes it after a commit
        # per task: the knobs of the last committed checkpoint, and the lr scale OOM recovery applied since
        self.recovery_base: dict[str, tuple[dict, float]] = {}
        self._rebase_recovery()

    def _epoch_plan(self) -> list[list[str]]:
        """Tasks trained in each epoch: all together while each has epochs left, or (train.strategy=sequential)
        one task after the other, each for its own epochs."""
        epochs = {name: task.epochs() for name, task in self.tasks.items()}
        if str(self.cfg.train.strategy) == "sequential":
            return [[name] for name, n in epochs.items() for _ in range(n)]
        return [[name for name, n in epochs.items() if n > i] for i in range(max(epochs.values(), default=0))]

    def last_epochs(self) -> dict[str, int]:
        """The last epoch the plan trains each task in (a task with fewer epochs, or the first of a sequential
        run, is done before the run is)."""
        return {name: max((i + 1 for i, tasks in enumerate(self.plan) if name in tasks), default=0)
                for name in self.tasks}

    def check_resumed_alike(self) -> None:
        """Under DDP every rank must go on from the same training: a node that cannot see rank 0's checkpoints (no
        folder shared by the nodes) would start fresh while the others resume, train other weights and hang at
        the end. Raises ResumeMismatchError naming what each rank found."""
        if not self.info.enabled:
            return
        found = all_ranks(self.info, (self.start_epoch, self.state.global_step))
        if any(state != found[0] for state in found):
            raise ResumeMismatchError(
                "the ranks found different checkpoints to resume from (epoch, step per rank: "
                f"{', '.join(f'{r}: {e}, {g}' for r, (e, g) in enumerate(found))}): every rank must see the run's "
                f"folder {self.exp_dir} (shared by every node), or start fresh")

    def trains(self, name: str) -> bool:
        """Whether the plan trains task `name` in any epoch."""
        return any(name in epoch for epoch in self.plan)

    # ---- resume -----------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """train.resume: restore every task that has a checkpoint (train.resume=last: its last one; a path: the
        checkpoints of that file's generation); the epochs after the newest one are (re)done, and the stage clock
        goes on from the time the earlier runs spent."""
        epochs = {}
        specs = [task.spec for task in self.tasks.values()]
        found = {}
        for name in self.tasks:
            path = ck.resume_source(self.cfg.train.resume, self.store.dir, name, specs)
            if path is not None and self.resume_newer_than and path.stat().st_mtime < self.resume_newer_than:
                self.logger.warning("%s was written before this torchrun job began (an older run's): %s starts "
                                    "fresh", path, name)
                continue
            if path is not None:
                found[name] = (path, load_ckpt(path, map_location=self.device))
        restored = ck.same_generation(self.cfg.train.resume, found, self.logger)
        for name, (path, ckpt) in restored.items():
            task = self.tasks[name]
            task.load_checkpoint_state(ckpt, origin=str(path))
            if not self.info.is_main:  # the checkpoint counts every rank's samples; rank 0 carries them on
                task.samples_seen = 0
            epochs[name] = int(ckpt["epoch"])
            self.state.global_step = max(self.state.global_step, int(ckpt.get("global_step") or 0))
            self.logger.info("resumed %s from %s (epoch %d, best %s); peak lr %.2e, lr now %.2e", name, path,
                             ckpt["epoch"], ckpt["best_metric"], task.peak_lr, task.lr)
        self._rebase_recovery()
        if not epochs:
            return
        self.tb.purge_from(self.state.global_step + 1)
        self.start_epoch = self.epoch_done = max(epochs.values())
        self.history = ck.previous_history(self.exp_dir / "reports" / "metrics.json", self.start_epoch)
        self.progress = ck.resumed_progress({name: ckpt for name, (_, ckpt) in restored.items()}, self.start_epoch,
                                            self.logger)
        # the stage clock goes on from the save inside the epoch, else from the last whole epoch's record
        self.state.clock_offset = (float(self.progress.elapsed_s) if self.progress is not None else
                                   float(self.history[-1].get("elapsed_s") or 0.0) if self.history else 0.0)
        if self.progress is not None:
            self.logger.info("resuming inside epoch %d, after %s", self.progress.epoch, _steps_text(self.progress))
        es = self.cfg.train.early_stopping
        for name, task in self.tasks.items():
            self.es_state[name] = ck.replay_early_stopping(self.history, name, task.monitor, task.mode,
                                                           float(es.min_delta), task.tie_break)
            # read by every rank, as each reads its last checkpoints (check_resumed_alike: every rank sees the
            # run's folder); no collective here, where ranks that found different checkpoints must still meet it
            cut = self._cut_best_metrics(name)
            if cut is not None:  # the epoch the time cap cut short left the best weights: judged as it was live,
                # and kept in that epoch's record once it is finished (end_epoch), where later resumes replay it
                judge_epoch(self.es_state[name], cut, task.monitor, task.mode, 10**9, float(es.min_delta),
                            task.tie_break)
                self.cut_best[name] = cut
            if name not in epochs:  # no weights restored: earlier epochs' best says nothing about this model
                self.es_state[name] = new_early_stopping_state()
                self._start_fresh(name, task)
            elif es.enabled and self.es_state[name]["bad_epochs"] >= int(es.patience):
                # it had stopped early: a resume (a torchrun restart after the work after training failed) keeps
                # it stopped rather than training it on until the rebuilt patience stops it again (fit)
                self.stopped.add(name)
                self.logger.info("%s stopped early before this resume (%d epochs without improvement, "
                                 "train.early_stopping.patience=%s, %s): it stays stopped", name,
                                 self.es_state[name]["bad_epochs"], es.patience,
                                 describe_best(self.es_state[name], task.monitor, task.tie_break))

    def _cut_best_metrics(self, name: str) -> dict | None:
        """The validation metrics of task `name`'s best checkpoint where it holds the epoch this run goes on inside,
        which the time cap had cut short (the history a resume replays ends before that epoch), else None."""
        path = ck.ckpt_path(self.store.dir, name, "best")
        if self.progress is None or not path.is_file():
            return None
        try:
            best = load_ckpt(path, map_location="cpu", mmap=True)  # the weights are not read
        except (OSError, RuntimeError, ValueError) as err:
            self.logger.warning("%s: cannot read its best checkpoint %s (%s)", name, path, err)
            return None
        if int(best.get("epoch", -1)) != self.progress.epoch:
            return None
        return (best.get("task_state") or {}).get(ck.CUT_SHORT_METRICS)

    def _start_fresh(self, name: str, task: Task) -> None:
        """A task with no checkpoint in a resumed run: its schedule spans the epochs it has left, not all of them."""
        left = sum(name in epoch for epoch in self.plan[self.start_epoch:])
        task.build_schedule(left)
        self.logger.info("%s starts fresh: its schedule spans its %d remaining epoch(s)", name, left)

    def trains_nothing(self) -> str | None:
        """Why a resumed run trains nothing more, or None when it trains: its checkpoints are at the last planned
        epoch, every task had stopped early, or the runs it resumes spent the stage's time cap. Such a run ends as
        its training did (or, cut before its end, as it would have), and the work after training left runs."""
        if self.start_epoch == 0 and self.progress is None:
            return None
        if self.start_epoch >= len(self.plan) and self.progress is None:
            return (f"already trained to epoch {self.start_epoch}; raise --epochs (train.epochs="
                    f"{self.cfg.train.epochs} now) to continue")
        if set(self.tasks) <= self.stopped:
            return f"every task had stopped early by epoch {self.start_epoch}: nothing more is trained"
        if self.runner.time_capped():
            # training on until the first check would turn a failed time cap (a torchrun restart after exit code
            # 4) into a pass
            return (f"stage {self.stage}: its time cap ({self.stage_cfg.get('time_limit_hours')} h) was spent by the "
                    "runs this one resumes; nothing more is trained (raise data.progressive_validation.stage_"
                    f"{self.stage}.time_limit_hours to train on)")
        return None

    # ---- validation, checkpoints, stopping --------------------------------------------------------------------------
    def validate(self, epoch: int, active: list[str]) -> dict[str, dict]:
        """Rank 0 validates, with every rank when the task shares its validation (TaskSpec.shared_validation);
        every rank receives the same metrics."""
        metrics = {}
        for name in active:
            task = self.tasks[name]
            if self.info.is_main or (self.info.enabled and task.spec.shared_validation):
                result = task.validate(epoch)
                if self.info.is_main:
                    metrics[name] = result
                    self.callbacks.fire("on_validation_end", name, epoch, result)
        return broadcast_object(self.info, metrics)

    def _state(self, name: str, epoch: int) -> dict:
        state = self.tasks[name].checkpoint_state(epoch, self.es_state[name]["best"])
        # the samples of every rank: a resumed rank 0 carries them on, the other ranks count from 0 (resume)
        state["task_state"] = {**state["task_state"], "samples_seen": self.samples_seen(name)}
        return {**state, "global_step": self.state.global_step}

    def end_epoch(self, epoch: int, active: list[str], train: dict, val: dict, cut_short: bool = False) -> None:
        """Early stopping per task, the epoch's history record and metrics.json, then one checkpoint generation.
        `cut_short`: the time cap ended the epoch before its last step. Its `last` checkpoints stay those saved where
        it was cut (still of the last whole epoch), and only a better `best` is written: committing the part-epoch
        as whole would have a resume with a raised cap skip the rest of it."""
        es = self.cfg.train.early_stopping
        record: dict[str, Any] = {"epoch": epoch, "elapsed_s": self.elapsed(), **memory_snapshot()}
        saves = []
        for name in active:
            task = self.tasks[name]
            stop, is_best = judge_epoch(self.es_state[name], val[name], task.monitor, task.mode, int(es.patience),
                                        float(es.min_delta), task.tie_break)
            if stop and es.enabled:
                self.stopped.add(name)
                self.logger.info("early stopping %s at epoch %d (%s)", name, epoch,
                                 describe_best(self.es_state[name], task.monitor, task.tie_break))
            record[name] = {**val[name], **train[name], "lr": task.lr}
            if not cut_short and name in self.cut_best and self.progress is not None and self.progress.epoch == epoch:
                record[name][ck.CUT_SHORT_METRICS] = self.cut_best.pop(name)
            kinds = [kind for kind, due in (("last", not cut_short), ("best", is_best)) if due]
            state = self._state(name, epoch)
            if cut_short:  # a resume that finishes the epoch judges it against these (resume), and the work
                # after training reads them if they stay the best (stage_measure.best_checkpoint_metrics)
                state["task_state"] = {**state["task_state"], ck.CUT_SHORT_METRICS: dict(val[name])}
            if kinds:
                saves.append(ck.Save(name, tuple(kinds), state, task.spec.checkpoint_aliases))
        self.history.append(record)
        # metrics.json before the checkpoints: a kill in between leaves a history that resume cuts back to the
        # committed epoch, never a committed epoch missing from the history.
        self.callbacks.fire("on_epoch_end", epoch, self.summary(epoch))
        with held_signals(doing="writing the epoch's checkpoints"):  # an interrupt lands after both, never between
            if self.info.is_main and saves:
                self._commit(epoch, saves)
            if not cut_short:
                self.epoch_done, self.progress = epoch, None
        self._rebase_recovery()

    def _commit(self, epoch: int, saves: list[ck.Save]) -> None:
        """Rank 0 commits a generation; an OOM recovery file read at the start goes once its knobs are in it."""
        self.store.commit(epoch, saves)
        if self.recovery_read:
            (self.store.dir / RECOVERY_FILE).unlink(missing_ok=True)
            self.recovery_read = False

    def save_progress(self, progress: EpochProgress, why: str | None = None) -> bool:
        """A checkpoint inside an epoch (train.checkpoint_interval_minutes, or `why`: where the time cap cut it):
        every task training in it commits its `last` checkpoint, still of the last whole epoch (`epoch` =
        epoch_done), with `progress`, where a resume goes on. `best` is left alone: nothing was validated. Called on
        every rank at the same step. One the disk has no room for is skipped (rank 0 decides for all)."""
        if not broadcast_object(self.info, self._room_for_progress(progress) if self.info.is_main else None):
            return False
        self._share_counts()
        # a copy (the epoch goes on changing `progress`), with the loss of every rank's steps
        saved = progress.over_ranks(self.info, self.tasks[next(iter(progress.drawn))].device)
        saved.rng = all_ranks(self.info, progress.rng[0])  # each rank's own random states
        with held_signals(doing="writing the checkpoints"):  # an interrupt lands after both, never between
            if self.info.is_main:
                where = {"progress": saved.as_dict()}
                saves = [ck.Save(name, ("last",), {**self._state(name, self.epoch_done), **where},
                                 self.tasks[name].spec.checkpoint_aliases) for name in progress.drawn]
                self._commit(self.epoch_done, saves)
            self.progress = saved  # committed
        if self.info.is_main:
            self.logger.info("checkpoint inside epoch %d saved, after %s (%s)", progress.epoch, _steps_text(progress),
                             why or f"train.checkpoint_interval_minutes={self.cfg.train.checkpoint_interval_minutes}")
        self._rebase_recovery()
        barrier(self.info)  # the other ranks wait for the save here (the wait group's timeout), not in a step's NCCL
        return True

    def _room_for_progress(self, progress: EpochProgress) -> bool:
        """Whether the disk has room for a generation of the tasks' `last` files as large as the ones there now: a
        checkpoint inside the epoch that fills it crashed the run (and under torchrun's restarts, again every
        interval). Skipped, the last commit stays where a resume goes on, and the run says so."""
        from pillsnap.utils.io import space_short

        # as large as the last files there, or, before any, the weights with Adam's two moments and the EMA
        files = [self.store.dir / f"{name}_last.pt" for name in progress.drawn]
        weights = sum(4 * sum(p.numel() * p.element_size() for p in self.tasks[name].raw_model.parameters())
                      for name in progress.drawn)
        short = space_short(self.store.dir, max(sum(f.stat().st_size for f in files if f.is_file()), weights))
        if short is None:
            return True
        need, free = short
        self.logger.warning("checkpoint inside epoch %d skipped: it needs about %.1f GB under %s and %.1f GB are "
                            "free; the last commit (%s) stays where a resume goes on. Free space before the epoch "
                            "ends: its commit needs as much", progress.epoch, need / 1e9, self.store.dir, free / 1e9,
                            self._committed())
        return False

    def elapsed(self) -> float:
        return round(self.state.elapsed(), 2)

    def summary(self, epoch: int) -> dict:
        """reports/metrics.json: latest metrics per task, history, stage/time-cap verdict, status. A run that trains
        nothing keeps the record of the training it resumed as it was, where this run ends as that one did (the same
        status, epoch, history and time-cap verdict): what follows the training (the work after it, its final test)
        names the record by its bytes."""
        earlier = self.earlier or {}
        out: dict[str, Any] = {"epoch": epoch, "status": self.status}
        for name, task in self.tasks.items():
            last = next((h[name] for h in reversed(self.history) if name in h), None)
            if last is not None:
                out[name] = {k: last.get(k) for k in task.spec.summary_keys}
        out["best"] = {name: s["best"] for name, s in self.es_state.items()}
        out["stopped_early"] = sorted(self.stopped)
        out["stage"] = {"current_stage": self.stage, "elapsed_s": self.elapsed()}
        out["system"] = earlier.get("system") or {
            "device": str(self.device), **memory_snapshot(),
            "init_weights": {name: task.weights_origin for name, task in self.tasks.items()}}
        out["batch"] = {name: {**asdict(task.knobs), "samples_seen": self.samples_seen(name),
                               "classes_seen": len(task.classes_seen), "world_size": self.info.world_size}
                        for name, task in self.tasks.items()}
        out["auto_batch"] = self.auto_batch
        if self.status == "time_capped":
            out["stage"]["time_cap"] = self.time_cap_verdict()
        out["history"] = self.history
        alike = self.ended_before(earlier) and earlier["status"] == self.status and epoch == self.start_epoch
        return earlier if alike and (earlier.get("stage") or {}).get("time_cap") == out["stage"].get("time_cap") \
            else out

    def samples_seen(self, name: str) -> int:
        """The samples task `name` trained on, on every rank together (each rank counts its own shard)."""
        return self.samples_over_ranks.get(name, self.tasks[name].samples_seen)

    def time_cap_verdict(self) -> dict:
        """The stage's time-cap success rule over the samples and classes of the tasks that count for it."""
        counted = [name for name, task in self.tasks.items() if task.spec.counts_for_time_cap]
        classes: set[int] = set().union(*(self.tasks[name].classes_seen for name in counted))
        return time_cap_success(self.stage_cfg, sum(self.samples_seen(name) for name in counted), len(classes))

    def _share_counts(self) -> None:
        """Under DDP each rank counts the samples and classes of its own shard: sum the samples (for the time-cap
        rule and metrics.json) and give every rank the union of the classes, which the checkpoint then keeps (a
        resumed rank restores rank 0's). Before, the time-cap rule saw rank 0's share alone, a world size too
        few, and could fail a stage that met its minimums."""
        if not self.info.enabled:
            return
        parts = all_ranks(self.info, {name: (task.samples_seen, sorted(task.classes_seen))
                                      for name, task in self.tasks.items()})
        for name, task in self.tasks.items():
            self.samples_over_ranks[name] = sum(part[name][0] for part in parts)
            task.classes_seen = set().union(*(part[name][1] for part in parts))

    # ---- the run ----------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train all planned epochs (or until early stop / time cap / OOM give-up); returns the exit code."""
        if self.info.is_main:
            ck.write_classes_json(self.store.dir, self.meta)
        self.callbacks.fire("on_train_start", {"tasks": list(self.tasks), "epochs": len(self.plan), "stage": self.stage,
                                               "start_epoch": self.start_epoch, "resumed_at": self._resumed_at(),
                                               "last_epochs": self.last_epochs(),
                                               "stopped_early": sorted(self.stopped),
                                               "time_limit_hours": self.stage_cfg.get("time_limit_hours"),
                                               "restart": self.restart,
                                               # the step records are rank 0's own (its batch, its time)
                                               "world_size": self.info.world_size,
                                               "max_restarts": max_restarts(),  # torchrun's --max-restarts
                                               "elapsed_s": self.state.elapsed()})  # the stage clock: earlier runs
        epoch = self.start_epoch
        why = self.trains_nothing()
        if why is not None:
            self.logger.warning("%s", why)
            self.earlier = ck.previous_summary(self.exp_dir / "reports" / "metrics.json")
            self.status = self._ended_as(self.earlier)
            self._share_counts()
            return self._finish(epoch)
        try:
            for epoch in range(self.start_epoch + 1, len(self.plan) + 1):
                active = [t for t in self.plan[epoch - 1] if t not in self.stopped]
                if not active:
                    continue
                self._run_epoch(epoch, active, self.progress)
                if self.status == "time_capped" or set(self.tasks) <= self.stopped:
                    break
        except RankOutOfMemory as err:
            return self._stop_for_restart(epoch, err)
        except EmergencyExit as err:
            return self._emergency(epoch, err)
        except KeyboardInterrupt:
            return self._interrupted(epoch)
        except Exception as err:
            self._crashed(epoch)
            setattr(err, LOGGED, True)  # the command line exits 1 without printing the traceback again
            raise
        return self._finish(epoch)

    def _ended_as(self, earlier: dict) -> str:
        """The status of a run that trains nothing (trains_nothing): with epochs left to train, its spent time cap;
        else its training's, where that training ended on its own at the resumed epoch, or (cut before its end)
        what it would have ended as. So a restart's own start-up never turns a finished run or an early stop into
        a time cap."""
        if self.start_epoch < len(self.plan) and not set(self.tasks) <= self.stopped:
            return "time_capped"
        if self.ended_before(earlier):
            return str(earlier["status"])
        return self.status

    def ended_before(self, earlier: dict) -> bool:
        """Whether `earlier` (a metrics.json) records a training that ended on its own at or past the resumed epoch:
        the training this run resumes, ended (`--only`, or a lower train.epochs, resumes it at an earlier epoch)."""
        return earlier.get("status") in FINISHED_STATUSES and int(earlier.get("epoch") or 0) >= self.start_epoch

    def has_record(self) -> bool:
        """Whether this folder records the training this run resumes: its metrics.json reaches the resumed epoch, or
        the run goes on inside an epoch. Checkpoints resumed from another folder, or a folder whose reports were
        removed, have none."""
        return self.progress is not None or (
            bool(self.history) and int(self.history[-1].get("epoch") or 0) == self.start_epoch)

    def _run_epoch(self, epoch: int, active: list[str], progress: EpochProgress | None = None) -> None:
        seed_epoch(int(self.cfg.train.seed), epoch, [self.tasks[t].train_loader for t in active], self.info.rank)
        if progress is not None and progress.epoch != epoch:
            progress = None
        self.callbacks.fire("on_epoch_start", epoch, {
            "total_steps": sum(self.tasks[t].steps_per_epoch() for t in active), "max_epochs": len(self.plan),
            "batch_size": self.tasks[active[0]].knobs.batch_size,
            "batch_sizes": {t: self.tasks[t].knobs.batch_size for t in active},
            "steps_done": sum(progress.drawn.get(t, 0) for t in active) if progress else 0})
        train = self.runner.train_one_epoch(epoch, active, progress)
        cut = self.runner.cut_short
        if cut is not None:  # saved as it was cut (before the epoch's end hooks count it) and before validation,
            # which a kill may interrupt
            self.save_progress(cut, why=f"the stage's time cap ({self.stage_cfg.get('time_limit_hours')} h) cut "
                                        "it short; a resume with a raised cap trains the rest of the epoch")
        else:
            self.runner.save_before_validation(next(iter(self.tasks.values())).device)
        for name in active:
            self.tasks[name].epoch_trained(epoch)
            if self.info.enabled:
                self.tasks[name].sync_replicas()
        self._share_counts()
        capped = self.runner.time_capped()  # asked of every rank alike (a vote under DDP)
        # a cap that fell in the last planned epoch's last logging window cut nothing: the run is complete, not
        # capped (the stage would have been judged as one that trained less than it planned)
        if capped and (cut is not None or epoch < len(self.plan)):
            self.status = "time_capped"
        self.end_epoch(epoch, active, train, self.validate(epoch, active), cut_short=cut is not None)
        barrier(self.info)

    def _finish(self, epoch: int) -> int:
        code = EXIT_OK
        if self.status == "running":
            self.status = "early_stopped" if self.stopped else "completed"
        if self.status == "time_capped":
            verdict = self.summary(epoch)["stage"]["time_cap"]
            self.logger.info("stage %d time cap reached: %s", self.stage, verdict)
            code = EXIT_OK if verdict["success"] else EXIT_TIME_CAP
        self.callbacks.fire("on_train_end", self.summary(epoch))
        return code

    def _emergency(self, epoch: int, err: EmergencyExit) -> int:
        self.status = "oom_emergency_exit"
        reason = str(err)
        if self.info.enabled and err.task in self.recovery_base:
            # a torchrun restart would only meet the same OOMs: it refuses to start instead (apply_saved_recovery)
            self._save_recovery(err.task, self.tasks[err.task].oom_state(), self.recovery_base[err.task][1],
                                err.retries, gave_up=True)
        if self.info.is_main:
            # epoch-1, the last whole epoch, and the place inside this one where the weights are: a resume from here
            # goes on from it (the batch the OOM stopped and an open window of accumulated gradients dropped), as
            # from a checkpoint inside the epoch; before, it trained the epoch again over weights that had trained
            # part of it, past the schedule's end
            done = max(epoch - 1, 0)
            place = self.runner.place()
            where = {} if place is None else {"progress": place.as_dict()}
            self.store.commit(done, [ck.Save(name, ("emergency",), {**self._state(name, done), **where})
                                     for name in self.tasks])
            self.logger.error("emergency checkpoints written: %s",
                              ", ".join(str(ck.ckpt_path(self.store.dir, n, "emergency")) for n in self.tasks))
        self.logger.error("training stopped: %s. Lower train.batch_size or model.image_size and resume.", reason)
        self.callbacks.fire("on_train_end", self.summary(epoch))
        return EXIT_OOM

    def _save_recovery(self, task: str, knobs: dict, lr_scale: float, retries: int, gave_up: bool = False) -> Path:
        """Save where OOM recovery brought `task`'s knobs (with `lr_scale`), from the last committed checkpoint's."""
        return save_recovery(self.store.dir, SavedRecovery(task, self.recovery_base[task][0], knobs, lr_scale, retries,
                                                           self.epoch_done, self.info.rank, gave_up))

    def _stop_for_restart(self, epoch: int, err: RankOutOfMemory) -> int:
        """A rank ran out of memory under DDP: save where recovery brings its knobs, for the restart, and stop (exit
        code 3). The other ranks wait in their collective (under gloo it fails) until torchrun stops them."""
        knobs, lr_scale = recovered_state(err.decision, err.made_for, self.recovery_base[err.task][1])
        path = self._save_recovery(err.task, knobs, lr_scale, err.decision.retries)
        self.status = "oom_emergency_exit"
        self.logger.error(
            "%s: under DDP one rank cannot replay a step alone, so the run stops. Saved the recovery (%s) to %s: "
            "every rank applies it when the run starts again from the checkpoints (%s). torchrun --max-restarts=N "
            "restarts it by itself; by hand, run the same torchrun command with train.resume=last.",
            err, err.decision.describe(), path, self._committed())
        self.callbacks.fire("on_train_end", self.summary(self.epoch_done))
        return EXIT_OOM

    def _rebase_recovery(self) -> None:
        """The knobs now in force are the ones a saved OOM recovery starts from (at the start, and after commits)."""
        self.recovery_base = {name: (task.oom_state(), 1.0) for name, task in self.tasks.items()}

    def _saved_recovery(self) -> dict:
        """The saved OOM recovery as rank 0 reads it, on every rank: each rank reading the file itself could find
        it gone (rank 0 removes it when the run does not resume) or not see it at all (a node with its own folder),
        and ranks applying different knobs wait on each other in the first step. A broken file stops every rank."""
        found: Any = None
        if self.info.is_main:
            try:
                found = load_recovery(self.store.dir)
            except ValueError as err:
                found = str(err)
        found = broadcast_object(self.info, found)
        if isinstance(found, str):
            raise ValueError(found)
        return found

    def apply_saved_recovery(self, resuming: bool) -> None:
        """Every rank applies the OOM recovery saved when a DDP run stopped (RankOutOfMemory), for each task whose
        state is the one it was saved from: a run that resumes (or a torchrun restart), at the epoch it was saved
        at, with the knobs it was made for; one that gave up stops the start (ValueError). A task in another state
        warns and leaves it, and rank 0 removes the file once a checkpoint is committed; a run that neither
        resumes nor restarts removes it at once (a later restart of that run must not find it)."""
        saved_tasks = self._saved_recovery()
        if saved_tasks and not resuming and self.info.is_main:
            (self.store.dir / RECOVERY_FILE).unlink(missing_ok=True)
        for name, saved in saved_tasks.items():
            self.recovery_read = True
            task = self.tasks.get(name)
            if task is None:
                continue
            why_not = ("this run neither resumes nor is a torchrun restart" if not resuming else
                       f"it goes on from epoch {saved.epoch}, this run from epoch {self.start_epoch}"
                       if saved.epoch != self.start_epoch else
                       f"it was made for {saved.made_for}, the run has {task.oom_state()}"
                       if task.oom_state() != saved.made_for else None)
            if why_not:
                self.logger.warning("%s: not applying the OOM recovery rank %d saved (%s): %s", name, saved.rank,
                                    saved.knobs, why_not)
                continue
            if saved.gave_up:
                raise ValueError(
                    f"{name}: OOM recovery gave up on rank {saved.rank} after {saved.retries} retries, with "
                    f"{saved.knobs}; a restart would run out of memory the same way. Lower train.batch_size or "
                    f"model.image_size, or delete {self.store.dir / RECOVERY_FILE} to try again as it was")
            for decision in saved.decisions():
                task.apply_oom_decision(decision)
                self.logger.warning("%s: applying the OOM recovery rank %d saved at epoch %d: %s", name, saved.rank,
                                    saved.epoch, decision.describe())
            self.state.oom_retries[name] = saved.retries
            self.recovery_base[name] = (saved.made_for, saved.lr_scale)

    def _resumed_at(self) -> dict | None:
        """Where inside its epoch the run goes on, per task, in epochs done (2.25: a quarter into epoch 3), for the
        dashboard, which keeps the steps before it; None at an epoch's start."""
        if self.progress is None:
            return None
        return {name: self.progress.epoch - 1 + n / max(self.tasks[name].steps_per_epoch(), 1)
                for name, n in self.progress.drawn.items() if name in self.tasks}

    def _committed(self) -> str:
        """What the committed checkpoints hold: 'epoch 3', 'epoch 3 and 400 classification steps of epoch 4', or
        '400 classification steps of epoch 1'."""
        if self.progress is None:
            return f"epoch {self.epoch_done}"
        inside = f"{_steps_text(self.progress)} of epoch {self.progress.epoch}"
        return f"epoch {self.epoch_done} and {inside}" if self.epoch_done else inside

    def _stopped_at_commit(self, status: str) -> None:
        """A run that stops before its end ("interrupted", "crashed") records where its checkpoints stand: a stop
        between metrics.json and the checkpoint commit leaves the uncommitted epoch in the history."""
        self.status = status
        self.history = [record for record in self.history if int(record["epoch"]) <= self.epoch_done]

    def _crashed(self, epoch: int) -> None:
        """An error no recovery handles (a full disk, a bug, a dead data source): the run's own log gets it with
        its traceback and metrics.json says "crashed" where the checkpoints stand, as after an interrupt; the error
        then goes on up. Without this a crash reached the console alone and metrics.json still said "running"."""
        self._stopped_at_commit("crashed")
        self.logger.exception("training crashed during epoch %d; the checkpoints hold %s, where train.resume=last "
                              "(--resume) continues once the cause is fixed", epoch, self._committed())
        try:
            self.callbacks.fire("on_train_end", self.summary(self.epoch_done))
        except Exception as err:  # the disk that failed the run may fail its end record too: keep the first error
            self.logger.error("the end of the run could not be recorded either: %s", err)

    def _interrupted(self, epoch: int) -> int:
        """Ctrl-C or SIGTERM: metrics.json says "interrupted"; the committed checkpoints are where resume starts."""
        self._stopped_at_commit("interrupted")
        self.logger.warning("interrupted during epoch %d; the checkpoints hold %s, where train.resume=last "
                            "(--resume) continues", epoch, self._committed())
        self.callbacks.fire("on_train_end", self.summary(self.epoch_done))
        return EXIT_INTERRUPTED


def _steps_text(progress: EpochProgress) -> str:
    """'120 classification + 30 detection steps' (the batches each task had drawn)."""
    return " + ".join(f"{n} {name}" for name, n in progress.drawn.items()) + " steps"
